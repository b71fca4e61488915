"""Diagnostics shared by the eigenbasis routers (ermoe, emoe): how far a routing basis has moved."""
from __future__ import annotations

import torch
from torch import Tensor

LR_SCALE_ATTR = "lr_scale"  # a Parameter attribute moebench.training.train.param_groups reads


@torch.no_grad()
def subspace_overlap(initial: Tensor, current: Tensor) -> Tensor:
    """Mean over bases of ||B0^T B||_F^2 / r for orthonormal (..., d, r) bases: 1 = the same span,
    r / d = what two random r-dimensional subspaces share on average. 0-d, detached, float32."""
    b0, b = initial.detach().float(), current.detach().float()
    if b.ndim == 2:
        b0, b = b0.unsqueeze(0), b.unsqueeze(0)
    q0, q = torch.linalg.qr(b0)[0], torch.linalg.qr(b)[0]  # drifted columns: measure the spans
    return ((q0.mT @ q).square().sum((-2, -1)) / b.shape[-1]).mean()


def scale_lr(params, scale: float) -> None:
    """Mark ``params`` to train at ``scale`` x the run's learning rate (1.0: unmarked)."""
    if scale != 1.0:
        for p in params:
            setattr(p, LR_SCALE_ATTR, float(scale))
