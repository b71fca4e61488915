"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; as used in DeepSeek-V3, DeepSeek-AI 2024).

    s      = sigmoid(x W_g)   (DeepSeek-V3; ``score_fn='softmax'`` gives softmax(x W_g))   float32
    S      = top-k(s + b)     b: per-expert bias (a buffer, not trained by gradients), used ONLY to select
    w_i    = s_i / sum_{j in S} s_j      gate weights from the unbiased scores, renormalised over the k
    after each optimiser step:  b_i += u * sign(mean_j c_j - c_i)
                                c_i: assignments to expert i counted over the training forwards since
                                the previous step, u = ``update_rate`` (1e-3)

No auxiliary loss: overloaded experts get their bias lowered and are chosen less, underloaded ones more.
Under torch.distributed the counts are summed over ranks before the update so every rank keeps the
same bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, expert_counts, topk_routing

_SCORE_FNS = ("sigmoid", "softmax")


@register_router(
    "loss-free", "DeepSeek aux-loss-free balancing: sigmoid gate, per-expert selection bias updated by load"
)
class LossFreeRouter(Router):
    """Sigmoid (or softmax) gate with a load-driven selection bias; see the module docstring."""

    expert_bias: Tensor
    load: Tensor

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "score_fn": option(
            "sigmoid", "choice", choices=_SCORE_FNS, doc="gate scores: sigmoid (DeepSeek-V3) or softmax"
        ),
        "update_rate": option(1e-3, "float", minimum=0.0, doc="selection-bias step per optimiser step (u)"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        score_fn: str = "sigmoid",
        update_rate: float = 1e-3,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.score_fn = score_fn
        self.update_rate = float(update_rate)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load", torch.zeros(num_experts), persistent=False)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = torch.sigmoid(logits) if self.score_fn == "sigmoid" else torch.softmax(logits, dim=-1)
        top_i = (scores.detach() + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
        top_s = scores.gather(1, top_i)
        weights = top_s / top_s.sum(-1, keepdim=True).clamp_min(1e-20)
        if ctx.training:
            with torch.no_grad():
                self.load += expert_counts(top_i.reshape(-1), self.num_experts).to(self.load.dtype)
        return topk_routing(top_i, weights, self.num_experts, stats={"scores": scores.detach()})

    @torch.no_grad()
    def after_step(self) -> None:
        load = self.load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            load = load.clone()
            torch.distributed.all_reduce(load)
        if load.sum() > 0:
            self.expert_bias += self.update_rate * torch.sign(load.mean() - load)
        self.load.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, score_fn={self.score_fn!r}, update_rate={self.update_rate}"
