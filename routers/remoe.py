"""ReMoE: ReLU routing (Wang, Chen, Zhu & Zhu, ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts
with ReLU Routing").

    G(t)     = ReLU(x W_g)                          (T, E), float32; expert e runs on t iff G_e(t) > 0
    y(t)     = sum_{e : G_e(t) > 0} G_e(t) expert_e(x(t))
    reg      = lambda * mean_t sum_e f_e G_e(t)     L1 on the gates, weighted by the load
                                                    f_e = E / (k T) * #{t : G_e(t) > 0} (detached)
    after each optimiser step: lambda *= alpha ** sign(target - S)
                                                    S = share of zero gates over the training forwards since
                                                    the previous step, target = 1 - k / E, alpha = 1.2,
                                                    lambda starts at 1e-8

So the sparsity is steered toward k experts per token on average without a top-k: the routing stays
fully differentiable. ``stats['sparsity']`` is each forward's share of zero gates (the achieved
sparsity) and ``active_experts_per_token`` the measured mean (see moebench.core.measured), k before
any data. A token with every gate at zero is carried by the residual alone.
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
    "remoe", "ReLU routing (ReMoE, Wang et al. 2025): gates ReLU(xW), adaptive L1 toward k experts per token"
)
class ReMoERouter(Router):
    """ReLU gates with an adaptively weighted, load-balanced L1 penalty; see the module docstring."""

    l1_weight: Tensor
    zeros_seen: Tensor

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(2, "int", minimum=1, doc="target experts per token (sets the target sparsity)"),
        "alpha": option(1.2, "float", minimum=1.0, strict=True, doc="the L1 weight's step factor"),
        "lambda_init": option(1e-8, "float", minimum=0.0, strict=True, doc="initial L1 weight"),
        "balance": option(True, "bool", doc="load-balanced L1 penalty"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        alpha: float = 1.2,
        lambda_init: float = 1e-8,
        balance: bool = True,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.alpha, self.balance = float(alpha), bool(balance)
        self.target_sparsity = 1.0 - top_k / num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("l1_weight", torch.tensor(float(lambda_init), dtype=torch.float64))
        # zero gates and all gates seen in training forwards since the last step
        self.register_buffer("zeros_seen", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.meter = ExpertsPerTokenMeter()

    @property
    def active_experts_per_token(self) -> float:
        return self.meter.mean(float(self.top_k))

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        gates = F.relu(F.linear(x.float(), self.gate.weight.float()))
        active = gates > 0
        token, expert = active.nonzero(as_tuple=True)
        num_tokens = x.shape[0]
        n_active = active.sum()
        if self.balance:
            f = self.num_experts / (self.top_k * max(num_tokens, 1)) * active.sum(0).float()
        else:
            f = torch.ones(self.num_experts, device=x.device)
        reg = self.l1_weight.float() * (gates * f).sum(-1).mean()
        sparsity = 1.0 - n_active.float() / max(gates.numel(), 1)
        if ctx.training:
            with torch.no_grad():
                self.zeros_seen += torch.stack(
                    [
                        (gates.numel() - n_active).double(),
                        torch.tensor(float(gates.numel()), dtype=torch.float64, device=x.device),
                    ]
                )
        self.meter.add(num_tokens, token.numel(), ctx.training)
        return Routing(
            token=token,
            expert=expert,
            weight=gates[token, expert],
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            slot=None,
            aux_losses={"l1": reg},
            stats={
                "scores": gates.detach(),
                "sparsity": sparsity.detach(),
                "experts_per_token": (n_active.float() / max(num_tokens, 1)).detach(),
            },
        )

    @torch.no_grad()
    def after_step(self) -> None:
        zeros, total = self.zeros_seen.tolist()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seen = self.zeros_seen.clone()
            torch.distributed.all_reduce(seen)
            zeros, total = seen.tolist()
        if total > 0:
            gap = self.target_sparsity - zeros / total
            if gap > 1e-9:
                self.l1_weight *= self.alpha
            elif gap < -1e-9:
                self.l1_weight /= self.alpha
        self.zeros_seen.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target_sparsity={self.target_sparsity:g}, alpha={self.alpha}"
