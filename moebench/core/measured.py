"""Measured experts per token, for routers whose count varies (top-p, ReLU routing, null experts).

FLOP accounting must use what the router actually did, not what it was asked for: the mean over
evaluation forwards when there were any (the model as it is reported), else over training forwards,
else a declared value (what a grid matches widths to before any data is seen)."""

from __future__ import annotations

import torch
from torch import nn


class ExpertsPerTokenMeter(nn.Module):
    """Running [tokens, assignments] in evaluation (row 0) and training (row 1) forwards."""

    def __init__(self):
        super().__init__()
        self.seen: torch.Tensor
        self.register_buffer("seen", torch.zeros(2, 2, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def add(self, tokens: int, pairs, training: bool) -> None:
        row = self.seen[1 if training else 0]
        row[0] += tokens
        row[1] += pairs

    def mean(self, default: float) -> float:
        if self.seen.is_meta:  # built on the meta device to count costs: nothing was ever run
            return default
        for tokens, pairs in self.seen.tolist():
            if tokens > 0:
                return pairs / tokens
        return default

    def reset(self) -> None:
        self.seen.zero_()
