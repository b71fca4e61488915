"""``routing_stats(model)``: the suite's routing statistics for a model trained in the user's own loop.

Why: a user who put moebench routers into their own model (``moebench.moefy``) and trains it with their
own loop still wants the numbers the benchmark reports (load CV, MaxVio, dead experts, gate entropy,
drop and unrouted rates), with the same definitions: this runs the trainer's own accumulator
(`moebench.training.metrics.RoutingStatsAccumulator`) on what each layer actually dispatched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from moebench.training.metrics import RoutingStatsAccumulator, mean_over_layers

_LISTS = ("counts", "top1_counts")  # per-expert lists kept in the answer; the other keys are numbers


def routing_stats(model: nn.Module, batches: Iterable | None = None, forward: Callable | None = None) -> dict:
    """``{"mean": {stat: value}, "per_layer": [{"layer": name, stat: value, "counts": [...]}]}``.

    With ``batches``: each is passed through ``forward(model, batch)`` (default ``model(batch)``) in eval
    mode without gradients, and the statistics cover all of them (the training mode is restored after).
    Without: the statistics of each MoE layer's latest forward (e.g. the last training step). Mutual
    information needs token labels, which only a moebench task gives, so it is left out here (None),
    as is the switch rate, which needs earlier evaluations."""
    acc = RoutingStatsAccumulator(model)
    if not acc.layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers; call moebench.moefy(model, ...) first")
    if batches is None:
        idle = [name for name, layer in acc.layers if not layer.stats]
        if idle:
            raise ValueError(f"MoE layer(s) {', '.join(idle)} have not run yet: run a forward first or pass batches")
        acc.fold_latest()
    else:
        run = forward or (lambda m, b: m(b))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), acc:
                for batch in batches:
                    run(model, batch)
                    acc.update(batch)
        finally:
            model.train(was_training)
    per_layer = [{k: v for k, v in d.items() if k in _LISTS or not isinstance(v, list)} for d in acc.per_layer()]
    return {"mean": mean_over_layers(per_layer), "per_layer": per_layer}
