"""Building routers for hand-computed cases: a seeded router by name, and a gate set by hand."""

from __future__ import annotations

import torch

from moebench.core.registry import ROUTERS
from moebench.core.routing import RoutingContext

EVAL = RoutingContext(training=False)
TRAIN = RoutingContext(training=True)


def build(name, d, num_experts, **kw):
    torch.manual_seed(0)
    return ROUTERS.get(name)(d_model=d, num_experts=num_experts, **kw)


def set_gate(router, weight):
    with torch.no_grad():
        router.gate.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
