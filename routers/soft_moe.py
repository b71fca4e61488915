"""Soft MoE (Puigcerver, Riquelme, Mustafa & Houlsby, ICLR 2024, "From Sparse to Soft Mixtures of Experts").

Per sequence X (N tokens x d), with Phi (d x M) learned slot parameters, M = E * S slots (S =
``slots_per_expert``, slot m belongs to expert m // S):

    logits = scale * l2norm(X) l2norm(Phi)         (N, M)   (the paper's normalisation, scale learned, init 1)
    D      = softmax over tokens  (dim N) of logits  dispatch: slot m = sum_n D[n, m] x_n
    C      = softmax over slots   (dim M) of logits  combine:  y_n = sum_m C[n, m] expert_{m // S}(slot_m)

No token is dropped and every expert sees exactly S slots per sequence, so the load is balanced by
construction and there is no auxiliary loss. The layer runs this through the routing contract's dense
form (`Routing.dispatch` / ``combine``), not the flat token -> expert list. Slots mix the tokens of one
sequence only (never across the batch).

FLOP matching: the experts cost E * S expert evaluations per sequence, i.e. E * S / N experts per token
(``active_experts_per_token``). A grid sets ``tokens_per_sequence`` (N) so this is known before any
data is seen (a forward with another length is refused); S is then chosen so E * S / N equals the
reference's experts per token (e.g. N = 16, E = 8: S = 4 gives 2). Without it the count uses the last
sequence length seen. One setting fits one sequence length, so a grid mixing tasks (or CLIP's two
towers) cannot FLOP-match soft-moe with one set of options. The router's own cost,
logits + dispatch + combine, is 3 * 2 * d * M FLOPs per token (``flops_per_token``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext


@register_router(
    "soft-moe", "Soft MoE (Puigcerver et al. 2024): experts process softmax-weighted slots; dense dispatch/combine"
)
class SoftMoERouter(Router):
    """Slots as soft mixtures of a sequence's tokens; see the module docstring."""

    sequence_refusal = "it sends weighted mixtures of tokens (dense dispatch), not one choice per token"
    options = {
        "slots_per_expert": option(1, "int", minimum=1, doc="slots each expert processes per sequence"),
        "tokens_per_sequence": option(
            None, "int", minimum=1, nullable=True, doc="tokens per sample, for the FLOP count before any data"
        ),
        "normalize": option(True, "bool", doc="l2-normalise tokens and phi, with a learned scale"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        slots_per_expert: int = 1,
        tokens_per_sequence: int | None = None,
        normalize: bool = True,
    ):
        super().__init__(d_model, num_experts, top_k=1)
        self.slots_per_expert = slots_per_expert
        self.tokens_per_sequence = tokens_per_sequence
        self.num_slots = num_experts * slots_per_expert
        self.normalize = bool(normalize)
        self.phi = nn.Parameter(torch.randn(d_model, self.num_slots) * d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None
        self.seen_seq_len: int | None = None

    def gate_parameters(self) -> list[Tensor]:
        """The slot parameters phi (moe.router_init_std; with ``normalize`` their scale does not matter)."""
        return [self.phi]

    @property
    def active_experts_per_token(self) -> float:
        n = self.tokens_per_sequence or self.seen_seq_len
        if n is None:
            raise ValueError(
                "soft-moe cannot count its experts per token (E * slots_per_expert / tokens per "
                "sequence) before it has seen data: set router_args.tokens_per_sequence to the "
                "model's tokens per sample (e.g. 65 for 64 patches + a class token)"
            )
        return self.num_slots / n

    def flops_per_token(self) -> float:
        return 3 * 2.0 * self.d_model * self.num_slots

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        num_tokens = x.shape[0]
        n = ctx.seq_len or num_tokens
        if num_tokens % n:
            raise ValueError(f"soft-moe: {num_tokens} tokens are not whole sequences of {n}")
        if self.tokens_per_sequence is not None and n != self.tokens_per_sequence:
            raise ValueError(
                f"soft-moe was declared with tokens_per_sequence={self.tokens_per_sequence} (its FLOP "
                f"count) but sees sequences of {n} tokens; set router_args.tokens_per_sequence: {n}"
            )
        self.seen_seq_len = n
        xb = x.float().reshape(num_tokens // n, n, self.d_model)
        phi = self.phi.float()
        if self.normalize:
            assert self.scale is not None  # a parameter when normalize
            logits = self.scale * F.normalize(xb, dim=-1) @ F.normalize(phi, dim=0)
        else:
            logits = xb @ phi
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits, dim=2)
        per_expert = combine.reshape(num_tokens, self.num_experts, self.slots_per_expert).sum(-1)
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return Routing(
            token=empty,
            expert=empty,
            weight=x.new_zeros(0, dtype=torch.float32),
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            dispatch=dispatch,
            combine=combine,
            stats={"scores": per_expert.detach()},
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"tokens_per_sequence={self.tokens_per_sequence}"
        )
