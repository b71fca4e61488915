"""Built-in routers: one module each, each registers itself with ``@register_router``."""
