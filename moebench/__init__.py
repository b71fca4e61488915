"""moebench: compare Mixture-of-Experts routers under matched conditions."""
from .layer import MoELayer, moe_layers
from .registry import ROUTERS, TASKS, register_router, register_task
from .routing import Router, Routing, RoutingContext, topk_routing

__version__ = "0.1.0"
__all__ = [
    "MoELayer", "moe_layers", "ROUTERS", "TASKS", "register_router", "register_task",
    "Router", "Routing", "RoutingContext", "topk_routing", "__version__",
]
