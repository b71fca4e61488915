"""moebench: compare Mixture-of-Experts routers under matched conditions.

Layers, lowest first (a lower layer never imports a higher one; tests/test_architecture.py checks):
``core`` (routing contract, registry, MoE layer, experts, moefy, models, task contract) <
``training`` (spec, train loop, runner, records, metrics) < ``grids`` / ``report`` / ``bench`` < ``cli``.
Built-in routers and tasks install as ``moebench.routers`` and ``moebench.tasks``.

The public names below are imported lazily, so ``import moebench`` (and ``moebench --help``) does
not pay for torch.
"""

from __future__ import annotations

import importlib

from moebench.version import __version__

_PUBLIC = {
    "MoELayer": "moebench.core.layer",
    "moe_layers": "moebench.core.layer",
    "ROUTERS": "moebench.core.registry",
    "TASKS": "moebench.core.registry",
    "register_router": "moebench.core.registry",
    "register_task": "moebench.core.registry",
    "Router": "moebench.core.routing",
    "Routing": "moebench.core.routing",
    "RoutingContext": "moebench.core.routing",
    "topk_routing": "moebench.core.routing",
    "moefy": "moebench.api",
    "routing_stats": "moebench.api",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'moebench' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
