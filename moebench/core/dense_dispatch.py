"""The layer's one extra path, for dense routings (`Routing.dispatch` / ``combine``, e.g. Soft MoE):
slots are weighted mixtures of a sequence's tokens, the experts run on their slots through the same
grouped GEMM as routed tokens, and each token's output is a weighted mixture of slot outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moebench.core.routing import Routing


def dense_dispatch(
    experts: nn.Module, x: Tensor, routing: Routing, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``x`` (T, d) -> (output (T, d), slots per expert (E,)).

    slots[b] = dispatch[b]^T x[b] (M, d); slots are regrouped expert-major (expert e's B * S slots in
    one block) for the grouped GEMM; out[b] = combine[b] @ y[b]."""
    dispatch, combine = routing.dispatch, routing.combine
    assert dispatch is not None and combine is not None
    b, n, m = dispatch.shape
    e = routing.num_experts
    s, d = m // e, x.shape[-1]
    slots = torch.einsum("bnm,bnd->bmd", dispatch.to(compute_dtype), x.reshape(b, n, d).to(compute_dtype))
    slots = slots.reshape(b, e, s, d).transpose(0, 1).reshape(e * b * s, d)
    counts = routing.counts()
    y = experts(slots, counts)
    y = y.reshape(e, b, s, d).transpose(0, 1).reshape(b, m, d)
    out = torch.einsum("bnm,bmd->bnd", combine.to(y.dtype), y)
    return out.reshape(b * n, d), counts
