"""The Python API for one's own model: ``moebench.moefy`` turns chosen blocks of a timm ViT or an
open_clip CLIP into MoE layers with any registered router; ``moebench.routing_stats`` reads the routing
statistics afterwards. Both are faces of the code the benchmark itself runs (`moebench.core.moefy`,
`moebench.training.metrics`), so a user's numbers mean what the report's mean."""

from __future__ import annotations

from torch import nn

from moebench.core import moefy as _moefy
from moebench.training.routing_stats import routing_stats

__all__ = ["moefy", "routing_stats"]


def moefy(
    model: nn.Module,
    *,
    router: str = "softmax-topk",
    blocks="all",
    num_experts: int = 8,
    upcycle: bool = False,
    router_args: dict | None = None,
    **options,
) -> list[str]:
    """Replace the MLPs of ``blocks`` ('all', 'last-N', 'first-N', 'every-N' or a list of indices; for
    CLIP, per tower) by MoE layers routed by ``router`` (any name `moebench routers` lists, with its own
    ``router_args``, e.g. ``{"top_k": 1}``), in place. ``upcycle`` copies each dense MLP into every
    expert. Further ``options`` are those of a grid's ``moe`` section: d_hidden, capacity_factor,
    activation, tower ('both', 'visual', 'text'), shared_experts, null_experts, capacity_policy, mode
    ('adapter': a residual MoE branch after each block), freeze_backbone, ... Returns the names of the
    new MoE layers; ``.notes`` says where the result is not an exact upcycle. The router's auxiliary
    losses of the latest forward: ``sum(m.aux_loss for m in moebench.moe_layers(model))``; routers with
    per-step updates (bias balancing, re-orthonormalisation) want ``m.after_step()`` after each
    optimiser step."""
    return _moefy.moefy(
        model,
        router=router,
        blocks=blocks,
        num_experts=num_experts,
        upcycle=upcycle,
        router_args=router_args,
        **options,
    )
