"""Memory of one training step, measured the same way for an MoE module and its dense twin.

CUDA: the allocator's peak (``max_memory_allocated``) over the step, reset before it. Every device,
CPU included: the activation bytes autograd keeps for the backward (``saved_tensors_hooks``, each
storage once, the parameters themselves left out), which is what grows with the batch and what
dispatch buffers add; the CPU has no
allocator peak to read (the process's max RSS only ever grows), so this is the number compared there."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypedDict

import torch

MB = 2**20


class StepMemory(TypedDict):
    saved_mb: float
    peak_mb: float | None


def step_memory(step: Callable[[], object], device: torch.device, params: Iterable[torch.Tensor] = ()) -> StepMemory:
    """Run ``step`` (forward + backward) once; return ``saved_mb`` (activations saved for the backward,
    ``params`` excluded) and ``peak_mb`` (CUDA only, else None)."""
    storages: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            if s.data_ptr() in skip:
                return t
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. fake / sparse)
            pass
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MB
    return {"saved_mb": sum(storages.values()) / MB, "peak_mb": peak}
