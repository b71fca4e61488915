"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

    S = softmax(x W_g)                 (T, E), softmax over experts, W_g: d x E, no bias, float32
    C = min(T, ceil(T * c / E))        tokens per expert; c = ``capacity`` = average experts per token
    for each expert i: G_i = top-C tokens of column S[:, i]
    y(t) = sum_{i : t in G_i} S[t, i] * expert_i(x(t))

Every expert processes exactly C tokens, so the load is perfectly balanced and there is no auxiliary
loss; a token may be picked by several experts or by none (``stats['unrouted']`` is the fraction of
tokens picked by no expert; the residual carries them). The choice looks at the whole batch, so it is
non-causal: fine for vision / encoders, not for autoregressive decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, expert_counts


@register_router(
    "expert-choice", "experts pick their top-C tokens (Zhou et al. 2022): perfectly balanced, no aux loss, non-causal"
)
class ExpertChoiceRouter(Router):
    """Each expert takes its C highest-scoring tokens; see the module docstring.

    ``capacity`` (default 2) is the average number of experts per token; ``top_k`` is accepted as an
    alias for it (so a grid that sets top_k for every router means the same compute here)."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(
            None, "float", minimum=0.0, strict=True, nullable=True, doc="alias for capacity (set only one)"
        ),
        "capacity": option(
            None, "float", minimum=0.0, strict=True, nullable=True, doc="average experts per token; null: top_k or 2"
        ),
    }

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, capacity: float | None = None):
        if capacity is None:
            capacity = 2.0 if top_k is None else top_k
        elif top_k is not None and float(top_k) != float(capacity):
            raise ValueError(
                f"expert-choice got top_k={top_k} and capacity={capacity}; top_k is an alias for capacity "
                f"(average experts per token): set only one of them"
            )
        super().__init__(d_model, num_experts, top_k=min(num_experts, max(1, math.ceil(capacity))))
        self.capacity = float(capacity)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def active_experts_per_token(self) -> float:
        return min(self.capacity, float(self.num_experts))

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def tokens_per_expert(self, num_tokens: int) -> int:
        """C = min(T, ceil(T * capacity / E))."""
        return min(num_tokens, math.ceil(num_tokens * self.capacity / self.num_experts))

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        num_tokens = x.shape[0]
        scores = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)  # (T, E)
        c = self.tokens_per_expert(num_tokens)
        weight, token = scores.t().topk(c, dim=1)  # (E, C) each
        expert = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        token = token.reshape(-1)
        picked = expert_counts(token, num_tokens)
        return Routing(
            token=token,
            expert=expert,
            weight=weight.reshape(-1),
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            slot=None,
            stats={
                "scores": scores.detach(),
                "unrouted": (picked == 0).float().mean() if num_tokens else scores.new_zeros(()),
            },
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, capacity={self.capacity}"
