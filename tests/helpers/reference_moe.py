"""A slow, obviously-correct reference for MoELayer's forward, to test the fast path against.

The reference takes the router's answer (a `Routing`), applies the layer's effective capacity with
`moebench.core.routing.apply_capacity`, runs EVERY expert densely on EVERY token with plain matrix products
(no sorting, no grouped GEMM) and sums ``weight * expert_e(x[t])`` over the surviving pairs.

To compare deterministically (Switch jitters its input in training, and some routers keep state), the
router runs once: `recorded_routing` captures the Routing the fast path computed, and the reference
reuses that very Routing, so both outputs hang off the same router graph and gradients can be compared
with ``torch.autograd.grad(..., retain_graph=True)``. `fixed_routing` makes the layer use a hand-made
Routing instead of calling its router.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from moebench.core.layer import MoELayer
from moebench.core.routing import Routing, apply_capacity


def effective_capacity(layer: MoELayer) -> float | None:
    """The capacity factor the layer applies in its current mode: its own, else the router's default."""
    if layer.capacity_factor is not None:
        return layer.capacity_factor
    return layer.router.default_capacity_factor(layer.training)


@contextmanager
def recorded_routing(layer: MoELayer):
    """Within the block, every router call is recorded (the Routing before capacity) in the yielded list."""
    calls: list[Routing] = []
    original = layer.router.forward

    def forward(x, ctx):
        routing = original(x, ctx)
        calls.append(routing)
        return routing

    layer.router.forward = forward  # instance attribute shadows the method; nn.Module.__call__ uses it
    try:
        yield calls
    finally:
        del layer.router.forward


@contextmanager
def fixed_routing(layer: MoELayer, routing: Routing):
    """Within the block, the layer's router returns ``routing`` instead of computing one."""
    layer.router.forward = lambda x, ctx: routing
    try:
        yield
    finally:
        del layer.router.forward


def dense_expert(layer: MoELayer, e: int, x: Tensor) -> Tensor:
    """expert_e(x) = act(x W1_e + b1_e) W2_e + b2_e on all rows of x (N, d), plain matmuls."""
    ex = layer.experts
    h = ex.act(x @ ex.fc1_weight()[e] + ex.b1[e])
    return h @ ex.w2[e] + ex.b2[e]


def shared_reference(layer: MoELayer, x: Tensor) -> Tensor:
    """The shared experts on every row of x: g(x) * (act(x W1 + b1) W2 + b2), g = sigmoid gate or 1."""
    mlp = layer.shared.mlp
    y = mlp.act(x @ mlp.w1[0] + mlp.b1[0]) @ mlp.w2[0] + mlp.b2[0]
    if layer.shared.gate is not None:
        y = (x @ layer.shared.gate.weight[0]).sigmoid().unsqueeze(1) * y
    return y


def dense_reference(layer: MoELayer, flat: Tensor, routing: Routing) -> Tensor:
    """Soft MoE, slot by slot: slot m of sequence b = sum_n dispatch[b, n, m] x[b, n]; it runs through
    expert m // S; out[b, n] = sum_m combine[b, n, m] * slot_output[b, m]."""
    b, n, m = routing.dispatch.shape
    per_expert = m // layer.num_experts
    xb = flat.reshape(b, n, -1)
    out = []
    for i in range(b):
        acc = flat.new_zeros(n, flat.shape[-1])
        for slot in range(m):
            mixed = (routing.dispatch[i, :, slot].unsqueeze(1) * xb[i]).sum(0, keepdim=True)
            y = dense_expert(layer, slot // per_expert, mixed)
            acc = acc + routing.combine[i, :, slot].unsqueeze(1) * y
        out.append(acc)
    return torch.cat(out)


def null_reference(layer: MoELayer, flat: Tensor, kept: Routing) -> Tensor:
    """Null experts pair by pair: zero adds nothing, copy adds w * x, constant adds w * (a1 x + a2 v)."""
    out = flat.new_zeros(flat.shape)
    null = layer.null
    for t, ex, w in zip(kept.token.tolist(), kept.expert.tolist(), kept.weight):
        if ex < layer.num_experts:
            continue
        kind = null.kinds[ex - layer.num_experts]
        if kind == "copy":
            out[t] = out[t] + w * flat[t]
        elif kind == "constant":
            c = null.kinds[: ex - layer.num_experts].count("constant")
            a = torch.softmax(null.mix[c] @ flat[t], dim=0)
            out[t] = out[t] + w * (a[0] * flat[t] + a[1] * null.vectors[c])
    return out


def reference_forward(layer: MoELayer, x: Tensor, routing: Routing) -> Tensor:
    """out[t] = sum over kept pairs (t, e, w) of w * expert_e(x[t]) (+ the shared experts); ``routing``
    is before capacity."""
    shape = x.shape
    num_tokens = math.prod(shape[:-1])
    flat = x.reshape(num_tokens, shape[-1])
    if routing.is_dense:
        out = dense_reference(layer, flat, routing)
    else:
        kept = apply_capacity(routing, effective_capacity(layer), getattr(layer, "capacity_policy", "position"))
        out = flat.new_zeros(num_tokens, shape[-1])
        for e in range(layer.num_experts):
            y_e = dense_expert(layer, e, flat)  # (T, d): expert e on every token
            mask = kept.expert == e
            tokens = kept.token[mask]
            weights = kept.weight[mask].to(y_e.dtype)
            out = out.index_add(0, tokens, weights.unsqueeze(1) * y_e[tokens])
        if layer.null is not None:
            out = out + null_reference(layer, flat, kept)
    if layer.shared is not None:
        out = out + shared_reference(layer, flat)
    return out.reshape(shape)
