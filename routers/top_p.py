"""Top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

    p     = softmax(x W_g)                          (T, E), float32
    S(t)  = the smallest set of experts, taken in order of decreasing p, whose probabilities sum to >= ``p``
            (at least 1 expert, at most ``max_k``: E by default)
    w_i   = p_i for i in S(t)                        raw probabilities, not renormalised (as in the paper)
    dynamic = beta * mean_t ( - sum_i p_i log p_i )  the paper's dynamic loss: low router entropy, so a
                                                     confident token needs few experts (beta = 1e-4)
    balance = alpha * E * sum_i f_i P_i              f_i: share of the selected pairs that go to i (1e-2)

The number of experts per token varies. ``stats['experts_per_token']`` holds each forward's mean, and
``active_experts_per_token`` (what FLOP counting uses) is the mean measured over evaluation forwards,
else training forwards, else ``expected_experts`` (default 2: what a grid matches the width to before
any data is seen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.measured import ExpertsPerTokenMeter
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext


@register_router(
    "top-p", "dynamic top-p (Huang et al. 2024): fewest experts reaching cumulative probability p, entropy loss"
)
class TopPRouter(Router):
    """Variable experts per token by cumulative probability; see the module docstring."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "p": option(0.4, "float", minimum=0.0, strict=True, maximum=1.0, doc="cumulative probability to reach"),
        "max_k": option(None, "int", minimum=1, nullable=True, doc="most experts per token; null: num_experts"),
        "dynamic_weight": option(1e-4, "float", minimum=0.0, doc="entropy (dynamic) loss weight beta"),
        "balance_weight": option(1e-2, "float", minimum=0.0, doc="balance loss weight alpha"),
        "expected_experts": option(
            2.0, "float", minimum=1.0, doc="experts per token assumed before any is measured (<= max_k)"
        ),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        p: float = 0.4,
        max_k: int | None = None,
        dynamic_weight: float = 1e-4,
        balance_weight: float = 1e-2,
        expected_experts: float = 2.0,
    ):
        max_k = num_experts if max_k is None else max_k
        super().__init__(d_model, num_experts, top_k=max_k)
        if expected_experts > max_k:
            raise ValueError(f"top-p option expected_experts must be in [1, max_k={max_k}], got {expected_experts!r}")
        self.p, self.max_k = float(p), max_k
        self.dynamic_weight, self.balance_weight = float(dynamic_weight), float(balance_weight)
        self.expected_experts = float(expected_experts)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.meter = ExpertsPerTokenMeter()

    @property
    def active_experts_per_token(self) -> float:
        return self.meter.mean(self.expected_experts)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # probability mass of the experts ranked above
        keep = before < self.p
        keep[:, 0] = True
        keep[:, self.max_k :] = False
        token, slot = keep.nonzero(as_tuple=True)
        expert = order[token, slot]
        weight = probs[token, expert]
        num_tokens = x.shape[0]
        self.meter.add(num_tokens, token.numel(), ctx.training)
        f = torch.bincount(expert, minlength=self.num_experts).float() / max(token.numel(), 1)
        aux = {
            "balance": self.balance_weight * self.num_experts * (f * probs.mean(0)).sum(),
            "dynamic": self.dynamic_weight * -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean(),
        }
        per_token = keep.sum(-1).float()
        return Routing(
            token=token,
            expert=expert,
            weight=weight,
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            slot=slot,
            aux_losses=aux,
            stats={
                "scores": probs.detach(),
                "experts_per_token": per_token.mean().detach(),
                "experts_per_token_hist": torch.bincount(keep.sum(-1), minlength=self.max_k + 1),
            },
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, p={self.p}, max_k={self.max_k}"
