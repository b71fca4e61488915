"""Switch Transformer top-1 routing (Fedus, Zoph & Shazeer 2021, "Switch Transformers"), with the router
z-loss of ST-MoE (Zoph et al. 2022).

    x~    = x * U(1 - eps, 1 + eps)          multiplicative jitter, training only, router input only
    l     = x~ W_g                           W_g: d x E, no bias, float32
    p     = softmax(l)
    e(t)  = argmax_i p_i(t)                  one expert per token
    w(t)  = p_{e(t)}(t)                      the raw probability (not renormalised), so the gate learns
    balance = alpha * E * sum_i f_i P_i      f_i: fraction of tokens whose argmax is i (in this batch, or
                                             over the global batch with ``balance_scope='global'``: Qiu et
                                             al. 2025, see moebench.core.balance),
                                             P_i: mean router probability of expert i  (uniform -> alpha)
    z       = beta * mean_t (logsumexp_i l_i(t))^2

Capacity C = ceil(cf * T / E) slots per expert with cf = ``capacity_factor`` (1.25) in training and
``eval_capacity_factor`` (2.0) in evaluation, unless the layer sets its own; overflowing tokens are
dropped (the residual carries them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.balance import BALANCE_SCOPES, BalanceFrequencies
from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, expert_counts, topk_routing


def switch_balance_loss(probs: Tensor, top1: Tensor, num_experts: int, f: Tensor | None = None) -> Tensor:
    """E * sum_i f_i P_i, equal to 1 when routing is perfectly uniform (unweighted); ``f`` overrides the
    frequencies counted from ``top1`` (e.g. global-batch ones)."""
    if f is None:
        f = expert_counts(top1, num_experts).to(probs.dtype) / max(top1.numel(), 1)
    p = probs.mean(0)
    return num_experts * (f * p).sum()


@register_router(
    "switch", "Switch Transformer top-1: raw-probability gate, balance loss, z-loss, jitter, capacity 1.25/2.0"
)
class SwitchRouter(Router):
    """Switch Transformer top-1 router (Fedus et al. 2021) with ST-MoE z-loss; see the module docstring."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(
            1,
            "choice",
            choices=(1,),
            fix="switch is top-1 by definition: use top_k: 1 (or router softmax-topk for top-k routing)",
        ),
        "balance_weight": option(1e-2, "float", minimum=0.0, doc="balance loss weight alpha"),
        "z_weight": option(1e-3, "float", minimum=0.0, doc="router z-loss weight beta (ST-MoE)"),
        "jitter": option(
            1e-2,
            "float",
            minimum=0.0,
            maximum=1.0,
            strict_max=True,
            doc="multiplicative input jitter eps, training only",
        ),
        "capacity_factor": option(
            1.25, "float", minimum=0.0, strict=True, nullable=True, doc="training capacity; null: dropless"
        ),
        "eval_capacity_factor": option(
            2.0, "float", minimum=0.0, strict=True, nullable=True, doc="evaluation capacity; null: dropless"
        ),
        "balance_scope": option(
            "micro", "choice", choices=BALANCE_SCOPES, doc="balance frequencies over the micro or global batch"
        ),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        balance_weight: float = 1e-2,
        z_weight: float = 1e-3,
        jitter: float = 1e-2,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        balance_scope: str = "micro",
    ):
        super().__init__(d_model, num_experts, top_k)
        self.balance_weight, self.z_weight, self.jitter = float(balance_weight), float(z_weight), float(jitter)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.frequencies = BalanceFrequencies(num_experts, balance_scope)

    def after_step(self) -> None:
        self.frequencies.reset()

    def default_capacity_factor(self, training: bool) -> float | None:
        return self.capacity_factor if training else self.eval_capacity_factor

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        x = x.float()
        if ctx.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        logits = F.linear(x, self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.max(dim=-1, keepdim=True)
        aux = {
            "balance": self.balance_weight
            * switch_balance_loss(probs, top_i.squeeze(1), self.num_experts, self.frequencies(top_i, ctx.training)),
            "z": self.z_weight * torch.logsumexp(logits, dim=-1).pow(2).mean(),
        }
        return topk_routing(top_i, top_p, self.num_experts, aux_losses=aux, stats={"scores": probs.detach()})

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, balance_weight={self.balance_weight}, z_weight={self.z_weight}, "
            f"jitter={self.jitter}, capacity_factor={self.capacity_factor}/{self.eval_capacity_factor}"
        )
