"""Adapter MoE and frozen backbones: the setting EMoE (and adapter-MoE work generally) runs in.

``moe.mode: adapter`` keeps each chosen block's dense MLP and adds a residual MoE branch after the
block: ``x <- x + alpha * MoE(x)`` with ``alpha`` learnable (init 1) and bottleneck experts
d -> b -> d, GELU, no bias (EMoE: b = 192 on ViT-B's d = 768, i.e. d / 4, the default when
``moe.d_hidden`` is null). ``patches_only`` routes the patch tokens alone: prefix tokens (CLS,
registers) pass through untouched. The branch hangs off the block by a forward hook, so the
backbone's module names (and its pretrained state dict) stay as they are; the branch's parameters
live under ``<block>.moe_adapter``.

``freeze_backbone`` (``moe.freeze_backbone``; here rather than in the task-specific ``model``
section so every task's build path gets it through moefy): only the MoE layers (and adapter
alphas) and the classifier head train; ``train_norms`` also leaves the LayerNorms trainable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moebench.core.layer import MoELayer, moe_layers

ADAPTER_ACTIVATION = "gelu"
MODES = ("replace", "adapter")


def adapter_width(d_model: int, d_hidden: int | None) -> int:
    """The bottleneck width: ``d_hidden``, or d / 4 when null (EMoE's 192 of 768)."""
    return d_hidden if d_hidden is not None else max(1, d_model // 4)


def drop_expert_biases(layer: MoELayer) -> MoELayer:
    """Bias-free experts: b1 and b2 become zero buffers (not parameters: nothing trains or counts them)."""
    experts = layer.experts
    for name in ("b1", "b2"):
        value = getattr(experts, name)
        delattr(experts, name)
        experts.register_buffer(name, torch.zeros_like(value.detach()), persistent=False)
    return layer


def build_adapter_layer(
    d_model: int,
    d_hidden: int | None,
    num_experts: int,
    router: str,
    router_args: dict | None,
    capacity_factor: float | None,
    **layer_options,
) -> MoELayer:
    """One adapter MoE layer: bottleneck experts, GELU, no bias. ``layer_options`` (shared / null
    experts, capacity policy) are MoELayer's, the same as in replace mode."""
    layer = MoELayer(
        d_model,
        adapter_width(d_model, d_hidden),
        num_experts,
        router=router,
        router_args=router_args,
        capacity_factor=capacity_factor,
        activation=ADAPTER_ACTIVATION,
        **layer_options,
    )
    return drop_expert_biases(layer)


class AdapterMoE(nn.Module):
    """The residual MoE branch of one block: ``y + alpha * moe(y)`` on the tokens after ``prefix``."""

    def __init__(self, moe: MoELayer, prefix: int = 0, seq_first: bool = False):
        super().__init__()
        self.moe = moe
        self.alpha = nn.Parameter(torch.ones(()))
        self.prefix, self.seq_first = int(prefix), seq_first

    def forward(self, y: Tensor) -> Tensor:
        if self.seq_first:
            y = y.transpose(0, 1)
        context = self.moe.pending_context  # the block's attention output, when the router reads it
        self.moe.pending_context = None
        p = self.prefix
        if context is not None:
            context = (context.transpose(0, 1) if self.seq_first else context)[:, p:]
        branch = self.moe(y[:, p:], context=context)
        out = (
            torch.cat([y[:, :p], y[:, p:] + self.alpha.to(y.dtype) * branch], dim=1)
            if p
            else y + self.alpha.to(y.dtype) * branch
        )
        return out.transpose(0, 1) if self.seq_first else out

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}"


class AdapterHook:
    """Forward hook on a block: its output goes through the block's ``moe_adapter`` (an object, not a
    closure, so deepcopy and pickling carry it over to the copy's own adapter)."""

    def __init__(self, adapter: AdapterMoE):
        self.adapter = adapter

    def __call__(self, module, args, output):
        return self.adapter(output)


def prefix_tokens(model: nn.Module, tower: str) -> int:
    """CLS / register tokens in front of the patches: timm's ``num_prefix_tokens``, a ``cls_token`` or
    open_clip's ``class_embedding``; text towers have none."""
    if tower == "text":
        return 0
    owner = getattr(model, "visual", model)
    n = getattr(owner, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    if getattr(owner, "cls_token", None) is not None or getattr(owner, "class_embedding", None) is not None:
        return 1
    return 0


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier the task trains on top: timm's ``get_classifier()``, else a ``head`` module."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    return [head] if isinstance(head, nn.Module) else []


def freeze_backbone(model: nn.Module, train_norms: bool = False) -> int:
    """Freeze every parameter but the MoE layers', the adapter alphas, the head's (and the norms' with
    ``train_norms``). Returns the number of parameters left trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    keep: list[nn.Module] = list(moe_layers(model)) + [m for m in model.modules() if isinstance(m, AdapterMoE)]
    keep += head_modules(model)
    if train_norms:
        keep += [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d))]
    for m in keep:
        for p in m.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
