"""Uniform round-robin control: token t goes to experts (t + j) mod E for j < k, weight 1/k.

Ignores content entirely, so it measures the pure dispatch cost of the layer and the value of
routing at all (a content-aware router should beat it)."""

from __future__ import annotations

import torch
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@register_router("uniform", "round-robin control: ignores content, perfectly balanced (throughput / sanity)")
class UniformRouter(Router):
    """Round-robin over experts by token index, equal weights 1/k."""

    sequence_refusal = "it has no gate logits (round-robin by position)"
    options = {"top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)")}

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2):
        super().__init__(d_model, num_experts, top_k)

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        t = torch.arange(x.shape[0], device=x.device)
        idx = (t.unsqueeze(1) + torch.arange(self.top_k, device=x.device)) % self.num_experts
        weights = torch.full(idx.shape, 1.0 / self.top_k, device=x.device, dtype=torch.float32)
        scores = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter_(1, idx, weights)
        return topk_routing(idx, weights, self.num_experts, stats={"scores": scores})
