"""Causal routing measurements at the final evaluation (observational routing metrics can mislead).

- Expert ablation: for each MoE layer and each of its experts, evaluate with that expert removed
  (its assignments dropped; the token's other experts and the residual carry it; for dense routings
  its slots' outputs are dropped) and record the headline drop: how much the model relies on it.
- Drop-top-1 (LibMoE): evaluate with every token's first choice removed in every layer (slot 0; the
  largest-weight pair for routers without slots). Not defined for dense (soft) routings.
- Capacity sweep (V-MoE's test-time capacity): evaluate with every layer's capacity factor set to
  0.5, 1, 1.5 and 2 (the layer's own policy: position or priority).

A drop is signed so that positive means worse: base - value when higher is better, value - base
otherwise. Every intervention goes through `MoELayer.intervention` (a Routing -> Routing hook applied
after capacity) or the layer's capacity factor, and is undone afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from moebench.core.layer import MoELayer
from moebench.core.routing import Routing

CAPACITY_FACTORS = (0.5, 1.0, 1.5, 2.0)


def drop_pairs(routing: Routing, keep: torch.Tensor) -> Routing:
    return Routing(
        token=routing.token[keep],
        expert=routing.expert[keep],
        weight=routing.weight[keep],
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        slot=None if routing.slot is None else routing.slot[keep],
        aux_losses=routing.aux_losses,
        stats=routing.stats,
        dropped=routing.dropped,
    )


def without_expert(expert: int) -> Callable[[Routing], Routing]:
    def apply(routing: Routing) -> Routing:
        if routing.is_dense:
            assert routing.combine is not None
            per = routing.combine.shape[2] // routing.num_experts
            combine = routing.combine.clone()
            combine[..., expert * per : (expert + 1) * per] = 0
            return Routing(
                token=routing.token,
                expert=routing.expert,
                weight=routing.weight,
                num_tokens=routing.num_tokens,
                num_experts=routing.num_experts,
                slot=routing.slot,
                aux_losses=routing.aux_losses,
                stats=routing.stats,
                dispatch=routing.dispatch,
                combine=combine,
            )
        return drop_pairs(routing, routing.expert != expert)

    return apply


def without_top1(routing: Routing) -> Routing:
    if routing.is_dense:
        raise ValueError("drop-top-1 is not defined for dense (soft) routing")
    if routing.num_pairs == 0:
        return routing
    if routing.slot is not None:
        return drop_pairs(routing, routing.slot != 0)
    best = torch.full((routing.num_tokens,), -torch.inf, device=routing.weight.device)
    best = best.scatter_reduce(0, routing.token, routing.weight.float(), reduce="amax")
    idx = (routing.weight.float() == best[routing.token]).nonzero(as_tuple=True)[0]
    # one pair per token even on ties: the first in order
    pos = torch.full((routing.num_tokens,), routing.num_pairs, dtype=torch.long, device=idx.device)
    pos = pos.scatter_reduce(0, routing.token[idx], idx, reduce="amin")
    first = torch.zeros_like(routing.token, dtype=torch.bool)
    first[pos[pos < routing.num_pairs]] = True
    return drop_pairs(routing, ~first)


@contextmanager
def intervening(
    layers: list[MoELayer], fn: Callable[[Routing], Routing] | None = None, capacity_factor: float | None = None
):
    saved = [(layer.intervention, layer.capacity_factor) for layer in layers]
    try:
        for layer in layers:
            layer.intervention = fn
            if capacity_factor is not None:
                layer.capacity_factor = capacity_factor
        yield
    finally:
        for layer, (fn0, cf0) in zip(layers, saved):
            layer.intervention, layer.capacity_factor = fn0, cf0


def measure(
    named_layers: list[tuple[str, MoELayer]],
    headline: Callable[[], float],
    higher_is_better: bool,
    factors=CAPACITY_FACTORS,
) -> dict:
    """All three measurements; ``headline()`` evaluates the model as it currently is."""

    def drop(value: float) -> float:
        return base - value if higher_is_better else value - base

    base = headline()
    per_layer: list[dict] = []
    for name, layer in named_layers:
        drops = []
        for e in range(layer.num_experts):
            with intervening([layer], without_expert(e)):
                drops.append(drop(headline()))
        per_layer.append({"layer": name, "drop": drops, "mean": sum(drops) / len(drops), "max": max(drops)})
    layers = [layer for _, layer in named_layers]
    try:
        with intervening(layers, without_top1):
            top1 = drop(headline())
    except ValueError:
        top1 = None
    sweep = []
    for cf in factors:
        with intervening(layers, capacity_factor=cf):
            sweep.append({"capacity_factor": cf, "value": headline()})
    all_drops = [d for row in per_layer for d in row["drop"]]
    return {
        "base": base,
        "expert_drop": {
            "per_layer": per_layer,
            "mean": sum(all_drops) / len(all_drops) if all_drops else None,
            "max": max(all_drops) if all_drops else None,
        },
        "drop_top1": top1,
        "capacity_sweep": sweep,
    }
