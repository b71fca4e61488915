"""X-MoE routing (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts").

Routing scores are computed on a low-dimensional hypersphere to avoid representation collapse:

    z      = x W_p                          W_p: d x r linear projection, r = ``proj_dim`` (16), no bias
    s_i    = cos(z, e_i) / tau              e_i: learnable expert embeddings (E x r), both L2-normalised
    tau    = exp(log_tau), clamped to [min_temperature, max_temperature]; learnable, init 0.07
    p      = softmax(s)                     float32
    S      = top-k(p);  w_i = p_i           gate weight = the softmax probability (not renormalised)
    balance = alpha * E * sum_i f_i P_i     f_i: share of the T*k assignments that go to expert i,
                                            P_i: mean p_i (Switch-style; uniform routing -> alpha)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, expert_counts, topk_routing


@register_router(
    "xmoe", "X-MoE (Chi et al. 2022): low-dim cosine routing with learnable temperature, Switch balance loss"
)
class XMoERouter(Router):
    """Cosine routing in a ``proj_dim``-dimensional space with learnable temperature; see the module docstring."""

    sequence_refusal = "it L2-normalises each token's projection before the cosine score"
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "proj_dim": option(16, "int", minimum=1, doc="dimension of the routing space"),
        "temperature": option(
            0.07, "float", minimum=0.0, strict=True, doc="initial temperature, in [min_temperature, max_temperature]"
        ),
        "learn_temperature": option(True, "bool", doc="the temperature is learned"),
        "min_temperature": option(0.01, "float", minimum=0.0, strict=True, doc="lower clamp of the temperature"),
        "max_temperature": option(1.0, "float", minimum=0.0, strict=True, doc="upper clamp (>= min_temperature)"),
        "balance_weight": option(1e-2, "float", minimum=0.0, doc="Switch balance loss weight"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        proj_dim: int = 16,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        balance_weight: float = 1e-2,
    ):
        super().__init__(d_model, num_experts, top_k)
        if min_temperature > max_temperature:
            raise ValueError(
                f"xmoe options need 0 < min_temperature <= max_temperature, got {min_temperature!r}, {max_temperature!r}"
            )
        if not min_temperature <= temperature <= max_temperature:
            raise ValueError(
                f"xmoe option temperature={temperature!r} must lie in [min_temperature, max_temperature] = "
                f"[{min_temperature}, {max_temperature}]"
            )
        self.proj_dim = proj_dim
        self.min_temperature, self.max_temperature = float(min_temperature), float(max_temperature)
        self.balance_weight = float(balance_weight)
        self.proj = nn.Linear(d_model, proj_dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, proj_dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)  # direction is all that matters
        log_tau = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> Tensor:
        """The effective temperature tau, clamped to [min_temperature, max_temperature]."""
        return self.log_temperature.float().exp().clamp(self.min_temperature, self.max_temperature)

    def gate_parameters(self) -> list[Tensor]:
        """The projection (moe.router_init_std); the score is a cosine, so only its directions matter."""
        return [self.proj.weight]

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.proj_dim + 2.0 * self.proj_dim * self.num_experts

    def cosine_scores(self, x: Tensor) -> Tensor:
        """cos(x W_p, e_i) for every token and expert, shape (T, E)."""
        z = F.normalize(F.linear(x.float(), self.proj.weight.float()), dim=-1)
        e = F.normalize(self.expert_embeddings.float(), dim=-1)
        return z @ e.t()

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        probs = torch.softmax(self.cosine_scores(x) / self.temperature, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        f = expert_counts(top_i.reshape(-1), self.num_experts).float() / max(top_i.numel(), 1)
        balance = self.balance_weight * self.num_experts * (f * probs.mean(0)).sum()
        return topk_routing(
            top_i, top_p, self.num_experts, aux_losses={"balance": balance}, stats={"scores": probs.detach()}
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, proj_dim={self.proj_dim}, balance_weight={self.balance_weight}"
