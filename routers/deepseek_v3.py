"""DeepSeek-V3 routing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", sec. 2.1.2; the bias update is
Wang et al. 2024's auxiliary-loss-free balancing, shared with router ``loss-free``).

    s       = sigmoid(x W_g)                       (T, E), float32
    c       = s + b                                b: per-expert selection bias (a buffer, no gradient)
    groups  : the E experts split into G equal groups of consecutive experts
    g_j     = sum of the top-2 entries of c within group j      (the whole group if it has one expert)
    allowed = experts of the top ``group_top_k`` groups by g_j
    S       = top-k of c over the allowed experts              (group-limited routing)
    w_i     = scaling * s_i / (sum_{j in S} s_j + 1e-20)       unbiased scores, renormalised over the k,
                                                               times ``scaling`` (routed_scaling_factor)
    after each optimiser step: b_i += u * sign(mean_j c_j - c_i)  (loads c_i counted in training forwards)

Defaults for small E: G = 4 groups and 2 of them allowed when E is a multiple of 4 and at least 8,
else no group limit (G = 1); scaling 1. DeepSeek-V3 itself: E = 256, G = 8, group_top_k = 4, k = 8,
scaling 2.5. Same cost as ``loss-free``: one d x E gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Routing, RoutingContext, topk_routing
from moebench.routers.loss_free import LossFreeRouter


@register_router(
    "deepseek-v3", "DeepSeek-V3: sigmoid gate, loss-free selection bias, group-limited top-k, scaled weights"
)
class DeepSeekV3Router(LossFreeRouter):
    """Group-limited sigmoid top-k with the loss-free bias; see the module docstring."""

    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= the allowed groups' experts)"),
        "num_groups": option(
            None,
            "int",
            minimum=1,
            nullable=True,
            doc="expert groups (divides num_experts); null: 4 if E % 4 == 0 and E >= 8, else 1",
        ),
        "group_top_k": option(
            None,
            "int",
            minimum=1,
            nullable=True,
            doc="groups a token may use (<= num_groups); null: num_groups // 2, at least 1",
        ),
        "scaling": option(1.0, "float", minimum=0.0, strict=True, doc="routed-weight scaling factor"),
        "update_rate": option(1e-3, "float", minimum=0.0, doc="selection-bias step per optimiser step (u)"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        num_groups: int | None = None,
        group_top_k: int | None = None,
        scaling: float = 1.0,
        update_rate: float = 1e-3,
    ):
        super().__init__(d_model, num_experts, top_k, score_fn="sigmoid", update_rate=update_rate)
        if num_groups is None:
            num_groups = 4 if num_experts % 4 == 0 and num_experts >= 8 else 1
        if group_top_k is None:
            group_top_k = max(1, num_groups // 2)
        if num_experts % num_groups:
            raise ValueError(
                f"deepseek-v3 option num_groups={num_groups!r} must be a positive divisor of num_experts={num_experts}"
            )
        if group_top_k > num_groups:
            raise ValueError(f"deepseek-v3 option group_top_k={group_top_k!r} must be in [1, num_groups={num_groups}]")
        group_size = num_experts // num_groups
        if top_k > group_top_k * group_size:
            raise ValueError(
                f"deepseek-v3: top_k={top_k} exceeds the experts of the {group_top_k} allowed groups "
                f"({group_top_k} x {group_size}); raise group_top_k or lower top_k"
            )
        self.num_groups, self.group_top_k, self.scaling = num_groups, group_top_k, float(scaling)

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        top_i = self.select(scores.detach() + self.expert_bias.float())
        top_s = scores.gather(1, top_i)
        weights = self.scaling * top_s / (top_s.sum(-1, keepdim=True) + 1e-20)
        if ctx.training:
            with torch.no_grad():
                self.load += torch.bincount(top_i.reshape(-1), minlength=self.num_experts).to(self.load.dtype)
        return topk_routing(top_i, weights, self.num_experts, stats={"scores": scores.detach()})

    def select(self, choice: Tensor) -> Tensor:
        """Group-limited top-k indices (T, k) from the biased scores ``choice`` (T, E)."""
        t, size = choice.shape[0], self.num_experts // self.num_groups
        if self.num_groups > 1:
            grouped = choice.view(t, self.num_groups, size)
            group_score = grouped.topk(min(2, size), dim=-1).values.sum(-1)  # (T, G)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.group_top_k, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
        return choice.topk(self.top_k, dim=-1).indices

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, group_top_k={self.group_top_k}, "
            f"scaling={self.scaling}"
        )
