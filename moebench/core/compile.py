"""Regional ``torch.compile``: the trainer's ``train.compile`` and ``moebench bench --compile``."""

from __future__ import annotations

from torch import nn

from moebench.core.moefy import find_blocks


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block in place (regional compilation: identical blocks share
    one compiled graph, so compiling costs one block, not the model, and methods other than forward,
    e.g. CLIP's encode_image, run compiled blocks too); the whole model's forward if it has no blocks
    moefy knows. Parameters and state-dict keys are unchanged. Returns the number of compiled modules."""
    try:
        blocks = [ref.block for ref in find_blocks(model)]
    except ValueError:
        blocks = []
    for module in blocks or [model]:
        module.compile(backend=backend)
    return len(blocks) or 1
