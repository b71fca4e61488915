"""Oracle control: every token goes to the expert numbered by its true group (the task's ground truth).

It reads ``ctx.group`` (T,), which only tasks with known structure provide (``structure``: the group of
the example each token belongs to); tokens without a group (-1) go to expert 0. With E >= K groups the
expert-group map is the identity, so the recovery metrics must come out perfect (NMI = 1): a control
with a known answer for the metrics, not a router one could deploy. Weight 1, top-1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@register_router("oracle", "control: each token to the expert of its true group (tasks with ground truth only)")
class OracleRouter(Router):
    """Expert = true group (``ctx.group``); see the module docstring."""

    needs_group = True  # reads RoutingContext.group: runs only on tasks with ground truth (generic layer tests skip it)
    control = True  # a control with known answers, not a router to rank (grids list it where it applies)
    sequence_routing = True  # the group is the example's, so one decision per sequence is the same decision
    options = {"top_k": option(1, "choice", choices=(1,), fix="one true group per token: use top_k: 1")}

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1):
        super().__init__(d_model, num_experts, top_k)

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        if ctx.group is None:
            raise ValueError(
                "router 'oracle' needs each token's true group (RoutingContext.group), which only "
                "tasks with ground truth provide (the 'structure' task); use another router here"
            )
        group = ctx.group.to(x.device).long().reshape(-1)
        if group.shape[0] != x.shape[0]:
            raise ValueError(f"router 'oracle': {group.shape[0]} groups for {x.shape[0]} tokens")
        if int(group.max()) >= self.num_experts:
            raise ValueError(
                f"router 'oracle' needs moe.num_experts >= the task's groups (a group "
                f"{int(group.max())} came with {self.num_experts} experts); raise num_experts"
            )
        idx = group.clamp(min=0).unsqueeze(1)
        weights = torch.ones(x.shape[0], 1, device=x.device)
        scores = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter_(1, idx, 1.0)
        return topk_routing(idx, weights, self.num_experts, stats={"scores": scores})
