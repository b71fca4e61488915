"""Softmax top-k routing (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    p = softmax(x W_g)            W_g: d x E, no bias, float32
    S = top-k(p)                  the k largest probabilities
    w_i = p_i / sum_{j in S} p_j  weights renormalised over the k (Mixtral; ``norm_topk_prob=True``, the default)
    w_i = p_i                     ``norm_topk_prob=False``: the raw probabilities (Qwen1.5-MoE / Qwen2-MoE's
                                  default, OLMoE), transformers' option of the same name; the k weights
                                  then sum to less than 1

Optional balance loss (``balance_weight`` > 0; off by default): alpha * E * sum_i f_i P_i with f_i the
share of the T*k chosen pairs that go to expert i and P_i the mean probability (GShard / Switch), f over
the micro-batch or, with ``balance_scope='global'``, over the global batch (Qiu et al. 2025; see
moebench.core.balance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.balance import BALANCE_SCOPES, BalanceFrequencies
from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@register_router(
    "softmax-topk",
    "linear gate, softmax, top-k, weights renormalised over the k (Mixtral/GShard) or raw "
    "(norm_topk_prob: false, Qwen-MoE / OLMoE)",
)
class SoftmaxTopK(Router):
    """Linear gate, softmax in float32, top-k, weights renormalised over the chosen k (or raw: norm_topk_prob)."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "balance_weight": option(0.0, "float", minimum=0.0, doc="GShard / Switch balance loss weight; 0: off"),
        "balance_scope": option(
            "micro", "choice", choices=BALANCE_SCOPES, doc="balance frequencies over the micro or global batch"
        ),
        "norm_topk_prob": option(
            True, "bool", doc="renormalise over the k (Mixtral); false: raw probabilities (Qwen-MoE, OLMoE)"
        ),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        balance_weight: float = 0.0,
        balance_scope: str = "micro",
        norm_topk_prob: bool = True,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.norm_topk_prob = norm_topk_prob
        self.balance_weight = float(balance_weight)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.frequencies = BalanceFrequencies(num_experts, balance_scope)

    def after_step(self) -> None:
        self.frequencies.reset()

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        probs = torch.softmax(F.linear(x, self.gate.weight.float()), dim=-1)  # float32 even in a bf16 model
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True) if self.norm_topk_prob else top_p
        aux = {}
        if self.balance_weight > 0:
            f = self.frequencies(top_i, ctx.training)
            aux["balance"] = self.balance_weight * self.num_experts * (f * probs.mean(0)).sum()
        return topk_routing(top_i, weights, self.num_experts, aux_losses=aux, stats={"scores": probs.detach()})
