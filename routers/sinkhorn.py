"""S-BASE: Sinkhorn-balanced routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models",
after BASE layers, Lewis et al. 2021).

    l      = x W_g                         (T, E), float32
    P      = exp(l) rescaled by Sinkhorn:  ``iterations`` rounds of making every row sum to 1 and every
             column sum to T / E (each expert's fair share), computed without gradient
    S(t)   = top-k of P(t)                 the balanced assignment (training only; evaluation: top-k of l)
    w_i    = softmax(l)_i for i in S(t)    the raw router probabilities, as in Switch (not renormalised)

No auxiliary loss. Sinkhorn is a few matrix-vector products, far cheaper than BASE's exact assignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@torch.no_grad()
def sinkhorn(logits: Tensor, iterations: int) -> Tensor:
    """Rows sum to 1, columns to T / E (approximately, after ``iterations`` rounds), in log space."""
    num_tokens, num_experts = logits.shape
    log_p = logits.float() - logits.float().max()
    col_target = torch.log(torch.tensor(num_tokens / num_experts, device=logits.device))
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + col_target
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp()


@register_router(
    "sinkhorn", "S-BASE (Clark et al. 2022): Sinkhorn-balanced top-k in training, raw probabilities as weights"
)
class SinkhornRouter(Router):
    """Sinkhorn-balanced selection, raw-probability weights; see the module docstring."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(1, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "iterations": option(8, "int", minimum=1, doc="Sinkhorn iterations (training)"),
    }

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, iterations: int = 8):
        super().__init__(d_model, num_experts, top_k)
        self.iterations = iterations
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        choice = sinkhorn(logits.detach(), self.iterations) if ctx.training else logits.detach()
        top_i = choice.topk(self.top_k, dim=-1).indices
        return topk_routing(top_i, probs.gather(1, top_i), self.num_experts, stats={"scores": probs.detach()})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}"
