"""Collapse control: every token to expert 0, weight 1 (a planted routing collapse).

The routing carries no information about any label (NMI = 0, one expert holds all the load) and the
model has one expert's capacity: on a task where routing matters it must come last. A control with
known answers for the recovery metrics and the load statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@register_router("collapse", "control: every token to expert 0 (a planted collapse: NMI 0, one expert busy)")
class CollapseRouter(Router):
    """All tokens to expert 0; see the module docstring."""

    control = True  # a control with known answers, not a router to rank (grids list it where it applies)
    sequence_routing = True  # reads no content
    options = {"top_k": option(1, "choice", choices=(1,), fix="collapse sends every token to expert 0 alone")}

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1):
        super().__init__(d_model, num_experts, top_k)

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        weights = torch.ones(x.shape[0], 1, device=x.device)
        scores = torch.zeros(x.shape[0], self.num_experts, device=x.device)
        scores[:, 0] = 1.0
        return topk_routing(idx, weights, self.num_experts, stats={"scores": scores})
