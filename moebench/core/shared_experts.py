"""Shared experts: N always-on experts whose output is added to the routed experts' output
(DeepSeek-MoE, Dai et al. 2024; Qwen2-MoE, Qwen team 2024).

    y(x) = sum_{routed (e, w)} w * expert_e(x)  +  g(x) * shared(x)
    shared = one MLP of width N * d_hidden (N experts of width d_hidden side by side: the same function as
             summing N separate experts, computed as one matrix product, as DeepSeek-V3 does)
    g(x)   = sigmoid(x w_g) with ``gate=True`` (Qwen2-MoE's shared_expert_gate), else 1 (DeepSeek)

Every token pays for the shared experts, so they count N whole experts in the active FLOPs and params.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moebench.core.experts import Experts


class SharedExperts(nn.Module):
    """``num_shared`` always-on experts of width ``d_hidden`` each (stored as one expert of N x width)."""

    def __init__(self, num_shared: int, d_model: int, d_hidden: int, activation: str, gate: bool = False):
        super().__init__()
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 1:
            raise ValueError(f"shared_experts must be a positive integer, got {num_shared!r}")
        self.num_shared = num_shared
        self.mlp = Experts(1, d_model, num_shared * d_hidden, activation)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        counts = torch.full((1,), x.shape[0], dtype=torch.long, device=x.device)
        y = self.mlp(x, counts)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x.float())).to(y.dtype) * y
        return y

    def flops_per_token(self) -> float:
        gate = 2.0 * self.mlp.d_model if self.gate is not None else 0.0
        return self.mlp.flops_per_expert() + gate

    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"num_shared={self.num_shared}, gate={self.gate is not None}"
