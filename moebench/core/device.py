"""Moving a task's batch to a device: the one helper every task's ``evaluate`` and the trainer share."""

from __future__ import annotations

import torch


def to_device(batch, device, non_blocking: bool = False):
    """Move every tensor inside a (nested) tuple / list / dict batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device, non_blocking) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch
