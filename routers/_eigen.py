"""Diagnostics shared by the eigenbasis routers (ermoe, emoe): how far a routing basis has moved."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class CapturesInitialBasis(nn.Module):
    """Records the routing basis B0 at the first forward (after any weight loading) into the buffer
    ``initial_basis``, flagged by the buffer ``basis_captured`` (both saved with the model). Forward
    branches on a Python flag, never on the buffer: the buffer is read once, when a state dict is
    loaded, so a compiled forward is one graph and reads nothing back to the host."""

    initial_basis: Tensor
    basis_captured: Tensor
    _captured_flag = False  # per instance once set: True after a capture or loading a captured B0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._captured_flag = bool(self.basis_captured)

    def capture_initial_basis(self, basis: Tensor) -> None:
        """Copy ``basis`` into ``initial_basis`` unless B0 is already held (a no-op after the first call)."""
        if not self._captured_flag:
            with torch.no_grad():
                self.initial_basis.copy_(basis.detach())
                self.basis_captured.fill_(True)
            self._captured_flag = True


def scale_lr(params, scale: float) -> None:
    """Mark ``params`` to train at ``scale`` x the run's learning rate (1.0: unmarked)."""
    if scale != 1.0:
        for p in params:
            setattr(p, LR_SCALE_ATTR, float(scale))
