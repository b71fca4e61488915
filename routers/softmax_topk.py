"""Softmax top-k routing (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    p = softmax(x W_g)            W_g: d x E, no bias, float32
    S = top-k(p)                  the k largest probabilities
    w_i = p_i / sum_{j in S} p_j  weights renormalised over the k (Mixtral)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@register_router("softmax-topk", "linear gate, softmax, top-k, weights renormalised over the k (Mixtral/GShard)")
class SoftmaxTopK(Router):
    """Linear gate, softmax in float32, top-k, weights renormalised over the chosen k."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2):
        super().__init__(d_model, num_experts, top_k)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        probs = torch.softmax(F.linear(x, self.gate.weight.float()), dim=-1)  # float32 even in a bf16 model
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        return topk_routing(top_i, weights, self.num_experts, stats={"scores": probs.detach()})
