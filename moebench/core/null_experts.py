"""Null experts (MoE++, Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts"): cheap experts added to the router's pool, so a token can spend less compute.

With E real experts and N null experts the router chooses among E + N; experts E .. E+N-1 are null, of
kinds in this order: the first is a zero expert, the second a copy expert, the rest constant experts
(N = 4 gives MoE++'s 1 zero, 1 copy, 2 constant):

    zero:      E(x) = 0
    copy:      E(x) = x
    constant:  E(x) = a1 x + a2 v,   [a1, a2] = softmax(W_c x),  v and W_c (2 x d) learned per expert

A pair (t, e, w) to a null expert adds w * E(x_t) without touching the expert GEMMs. The layer's
FLOPs count only the real experts a token visits (measured share of null choices). The routing
statistics cover the real experts (scores restricted to their columns) plus ``null_share``, the share
of chosen pairs that went to null experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moebench.core.measured import ExpertsPerTokenMeter
from moebench.core.routing import Routing

KINDS = ("zero", "copy", "constant")


def null_kinds(num_null: int) -> list[str]:
    return ["zero", "copy", *["constant"] * max(0, num_null - 2)][:num_null]


class NullExperts(nn.Module):
    """``num_null`` zero / copy / constant experts following ``num_real`` real ones."""

    def __init__(self, num_null: int, num_real: int, d_model: int):
        super().__init__()
        if isinstance(num_null, bool) or not isinstance(num_null, int) or num_null < 1:
            raise ValueError(f"null_experts must be a positive integer, got {num_null!r}")
        self.num_real, self.kinds = num_real, null_kinds(num_null)
        n_const = self.kinds.count("constant")
        self.vectors = nn.Parameter(torch.randn(n_const, d_model) * d_model**-0.5)
        self.mix = nn.Parameter(torch.zeros(n_const, 2, d_model))
        self.meter = ExpertsPerTokenMeter()  # real experts per token

    def flops_per_token(self) -> float:
        """Upper bound on the constant experts' own cost (W_c and the mix), if a token picked them all."""
        return float(self.vectors.shape[0] * (2 * 2 * self.vectors.shape[1] + 3 * self.vectors.shape[1]))

    def _real_scores(self, stats: dict) -> dict:
        """Scores over the real experts only: the statistics are per real expert (counts, loads)."""
        scores = stats.get("scores")
        return {} if scores is None else {"scores": scores[:, : self.num_real]}

    def split(self, routing: Routing, x: Tensor, training: bool) -> tuple[Routing, Tensor]:
        """(the routing restricted to real experts, the null experts' summed output (T, d))."""
        real = routing.expert < self.num_real
        out = torch.zeros_like(x)
        null_idx = (~real).nonzero(as_tuple=True)[0]
        if null_idx.numel():
            token, kind_id = routing.token[null_idx], routing.expert[null_idx] - self.num_real
            weight = routing.weight[null_idx].to(x.dtype).unsqueeze(1)
            xt = x[token]
            copy = torch.tensor([k == "copy" for k in self.kinds], device=x.device)[kind_id]
            out = out.index_add(0, token[copy], weight[copy] * xt[copy])
            const_slot = torch.tensor(
                [self.kinds[:i].count("constant") for i in range(len(self.kinds))], device=x.device
            )[kind_id]
            const = torch.tensor([k == "constant" for k in self.kinds], device=x.device)[kind_id]
            if const.any():
                c, xc = const_slot[const], xt[const]
                a = torch.softmax(torch.einsum("nkd,nd->nk", self.mix[c].to(x.dtype), xc), dim=-1)
                y = a[:, :1] * xc + a[:, 1:] * self.vectors[c].to(x.dtype)
                out = out.index_add(0, token[const], weight[const] * y)
        self.meter.add(routing.num_tokens, int(real.sum()), training)
        kept = Routing(
            token=routing.token[real],
            expert=routing.expert[real],
            weight=routing.weight[real],
            num_tokens=routing.num_tokens,
            num_experts=self.num_real,
            slot=None if routing.slot is None else routing.slot[real],
            aux_losses=routing.aux_losses,
            stats={
                **routing.stats,
                **self._real_scores(routing.stats),
                "null_share": (~real).float().mean() if real.numel() else x.new_zeros(()),
            },
            dropped=routing.dropped,
        )
        return kept, out
