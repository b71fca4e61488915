"""Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed, unlearned assignment.

    by = "position":  h(t) = table[pos(t) mod L]      table: L = ``table_size`` entries made of
                                                      concatenated random permutations of 0..E-1, so any
                                                      aligned run of E positions visits every expert once
    by = "token-id":  h(t) = ((a * id(t) + b) mod P) mod E      universal hash, P = 2^31 - 1, a, b fixed
    by = "lsh":       h(t) = argmax_i (x(t) R)_i      R: d x E fixed Gaussian projection (a buffer, never
                                                      trained): random-hyperplane locality-sensitive hash
    experts:  e_j(t) = (h(t) + j) mod E, j < k        (lsh: the k largest projections), all distinct
    weights:  w_j(t) = 1 / k

Nothing here is learned and the position / token-id assignments do not look at the content at all; all
tables are drawn from ``seed`` so every run (and every rank) gets the same assignment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing

_MODES = ("position", "token-id", "lsh")
_PRIME = 2**31 - 1


@register_router(
    "hash", "fixed unlearned hash assignment (Roller et al. 2021) by position, token id or LSH of the input"
)
class HashRouter(Router):
    """Fixed hash routing by position, token id or locality-sensitive hash; see the module docstring."""

    position_table: Tensor
    hash_coeffs: Tensor
    projection: Tensor

    sequence_refusal = "it has no gate logits (a fixed hash of position, token id or input)"
    options = {
        "top_k": option(1, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "by": option("position", "choice", choices=_MODES, doc="what is hashed: position, token id, or an LSH of x"),
        "seed": option(0, "int", doc="seed of the fixed table / hash"),
        "table_size": option(4096, "int", minimum=1, doc="positions in the position table"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        by: str = "position",
        seed: int = 0,
        table_size: int = 4096,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.by = by
        self.seed = seed
        gen = torch.Generator().manual_seed(int(seed))
        if by == "position":
            reps = -(-table_size // num_experts)
            table = torch.cat([torch.randperm(num_experts, generator=gen) for _ in range(reps)])[:table_size]
            self.register_buffer("position_table", table)
        elif by == "token-id":
            a = int(torch.randint(1, _PRIME, (1,), generator=gen))
            b = int(torch.randint(0, _PRIME, (1,), generator=gen))
            self.register_buffer("hash_coeffs", torch.tensor([a, b], dtype=torch.int64))
        else:
            self.register_buffer("projection", torch.randn(d_model, num_experts, generator=gen))

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts if self.by == "lsh" else 0.0

    def _hash(self, x: Tensor, ctx: RoutingContext) -> Tensor:
        num_tokens = x.shape[0]
        if self.by == "position":
            pos = ctx.positions
            if pos is None:  # called outside a layer: treat the batch as one sequence
                pos = torch.arange(num_tokens, device=x.device)
            return self.position_table[pos.to(x.device).long() % self.position_table.numel()]
        ids = ctx.token_ids
        if ids is None:
            raise ValueError(
                "hash router with by='token-id' needs token ids: call the layer as layer(x, token_ids=ids) "
                "(text tasks only), or use by='position' / by='lsh'"
            )
        if ids.numel() != num_tokens:
            raise ValueError(f"token_ids has {ids.numel()} entries but the input has {num_tokens} tokens")
        a, b = self.hash_coeffs.to(x.device)  # tensors, not .tolist(): no host sync, one compiled graph
        ids = ids.reshape(-1).to(x.device).long() % _PRIME
        return ((ids * a + b) % _PRIME) % self.num_experts  # < 2**62: no int64 overflow

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        num_tokens, k = x.shape[0], self.top_k
        if self.by == "lsh":
            idx = (x.detach().float() @ self.projection.float()).topk(k, dim=-1).indices
        else:
            h = self._hash(x, ctx)
            idx = (h.unsqueeze(1) + torch.arange(k, device=x.device)) % self.num_experts
        weights = torch.full((num_tokens, k), 1.0 / k, device=x.device, dtype=torch.float32)
        scores = torch.zeros(num_tokens, self.num_experts, device=x.device).scatter_(1, idx, weights)
        return topk_routing(idx, weights, self.num_experts, stats={"scores": scores})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, by={self.by!r}, seed={self.seed}"
