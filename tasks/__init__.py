"""Built-in task adapters: one module each, each registers itself with ``@register_task``."""
