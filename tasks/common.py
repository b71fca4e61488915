"""Small pieces the task adapters share: MoE placement on a built model, per-token labels with
prefix (class) tokens, and top-k accuracy. Not a task itself (registers nothing)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def apply_moe(net: nn.Module, moe: dict | None, **extra) -> nn.Module:
    """MoE-fy ``net`` in place with the run spec's ``moe`` section (None = dense baseline). An
    image-level router (``ermoe-released``) instead returns its own model built around ``net``."""
    if moe is not None:
        from moebench.core.registry import ROUTERS

        router_cls = ROUTERS.get(moe.get("router", "softmax-topk"))  # a partial section takes moefy's default
        if router_cls.image_level:
            return router_cls.build_model(net, moe)
        from moebench.core.moefy import moefy

        moefy(net, **{**moe, **extra})
    return net


def with_prefix_tokens(patch_labels: Tensor, tokens_per_sample: int) -> Tensor | None:
    """Patch labels (B, P) -> (B, tokens_per_sample), labelling prefix tokens (cls / registers) -1.
    None when the layer sees fewer tokens than there are patches (a shape this task did not expect)."""
    extra = tokens_per_sample - patch_labels.shape[1]
    if extra < 0:
        return None
    pad = patch_labels.new_full((patch_labels.shape[0], extra), -1)
    return torch.cat([pad, patch_labels], dim=1)


def topk_correct(logits: Tensor, labels: Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at #classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels.unsqueeze(1)
    return {k: int(hit[:, : min(k, logits.shape[-1])].any(1).sum()) for k in ks}
