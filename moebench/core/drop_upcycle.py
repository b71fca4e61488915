"""Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): upcycled experts that differ.

Plain upcycling copies the dense MLP into every expert; with identical experts and gate weights that
sum to 1 the layer's output does not depend on the routing, so the task loss gives the router no
gradient until the experts drift apart. Drop-Upcycling breaks the symmetry: for each expert e an
independent random subset S_e of round(ratio * h) hidden units is re-initialised,

    W_in[:, S_e]   ~ N(mean(W_in), std(W_in))      (the unit's input weights;  b_in[S_e] likewise
    W_out[S_e, :]  ~ N(mean(W_out), std(W_out))     from b_in's statistics)    (its output weights)

with the statistics of the whole dense matrix (the paper's choice), so each expert keeps 1 - ratio of
the dense MLP's knowledge. ratio 0 is plain upcycling; the paper uses 0.5. The draw uses its own
generator seeded from torch's initial seed and the layer's name: the same run gets the same experts,
and the global RNG stream (router init, everything after) is the same as with plain upcycling.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def drop_generator(layer_name: str) -> torch.Generator:
    """A generator for one layer's draw: torch's initial seed (set by the run's seed) and the layer."""
    digest = hashlib.sha256(f"{torch.initial_seed()}:{layer_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _redraw(like: Tensor, generator: torch.Generator) -> Tensor:
    """Normal samples shaped like ``like``, with its mean and standard deviation (float32)."""
    ref = like.float()
    std = ref.std() if ref.numel() > 1 else ref.new_zeros(())
    return torch.randn(like.shape, generator=generator) * std + ref.mean()


@torch.no_grad()
def drop_upcycle(
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, num_experts: int, ratio: float, generator: torch.Generator
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Per-expert weights from one dense MLP in expert layout (w1 (d, h), b1 (h,), w2 (h, d), b2 (d,)):
    ((E, d, h), (E, h), (E, h, d), (E, d)) with a share ``ratio`` of each expert's hidden units
    re-drawn, and the (E, h) mask of the re-drawn units."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"moe.upcycle_drop must be a number in [0, 1] (the share of each expert's hidden units "
            f"re-drawn; Drop-Upcycling uses 0.5), got {ratio!r}"
        )
    d, h = w1.shape
    E = num_experts
    n_drop = int(round(ratio * h))
    mask = torch.zeros(E, h, dtype=torch.bool)
    for e in range(E):
        if n_drop:
            mask[e, torch.randperm(h, generator=generator)[:n_drop]] = True
    W1, B1 = w1.float().unsqueeze(0).repeat(E, 1, 1), b1.float().unsqueeze(0).repeat(E, 1)
    W2, B2 = w2.float().unsqueeze(0).repeat(E, 1, 1), b2.float().unsqueeze(0).repeat(E, 1)
    if n_drop:
        # draw a full matrix per expert and keep the dropped units' part (simple; h x d is small)
        new_w1 = torch.stack([_redraw(w1, generator) for _ in range(E)])
        new_b1 = torch.stack([_redraw(b1, generator) for _ in range(E)])
        new_w2 = torch.stack([_redraw(w2, generator) for _ in range(E)])
        W1 = torch.where(mask.unsqueeze(1), new_w1, W1)
        B1 = torch.where(mask, new_b1, B1)
        W2 = torch.where(mask.unsqueeze(2), new_w2, W2)
    return (W1, B1, W2, B2), mask
