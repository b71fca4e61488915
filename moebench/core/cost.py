"""What a model costs per token: parameters (total and active) and forward FLOPs, counted the same way
for the trainer's record (``final.json``'s cost) and for ``moebench grid show``."""

from __future__ import annotations

from torch import nn

from moebench.core.layer import MoELayer


def model_cost(model: nn.Module) -> dict:
    """params_total; params_active = non-MoE params + each MoE layer's active_params(); flops_per_token
    = 2 * (weights of every nn.Linear outside MoE layers) + each MoE layer's flops_per_token() (its
    visited experts plus its router); router_params / router_flops_per_token = the routers' own share
    (0 for a dense model, which has none). An estimate per token of the blocks: attention score / softmax
    FLOPs, convolutions (patch embeddings) and elementwise ops are not counted."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    routers = {id(p): p for layer in layers for p in layer.router.parameters()}
    moe_params = {id(p) for layer in layers for p in layer.parameters()}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    non_moe = sum(p.numel() for pid, p in {id(p): p for p in model.parameters()}.items() if pid not in moe_params)
    active = non_moe + sum(layer.active_params() for layer in layers)
    flops = linear_flops_outside_moe(model) + sum(layer.flops_per_token() for layer in layers)
    return {
        "params_total": int(total),
        "params_active": float(active),
        "flops_per_token": float(flops),
        "router_params": int(sum(p.numel() for p in routers.values())),
        "router_flops_per_token": float(sum(layer.router.flops_per_token() for layer in layers)),
    }


def linear_flops_outside_moe(model: nn.Module) -> float:
    """2 x the weights of every nn.Linear outside the MoE layers: the non-MoE part of ``flops_per_token``
    (shared with `grid show`, so its flops/tok column and the report's FLOPs/token are one number)."""
    inside = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside)
