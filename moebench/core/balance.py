"""Expert frequencies f_i for the Switch-style balance loss E * sum_i f_i P_i, over the micro-batch or
over the global batch (Qiu et al., ACL 2025, "Demons in the Detail: On Implementing Load Balancing Loss
for Training Specialized Mixture-of-Expert Models").

``micro``: f from this forward's assignments (the usual implementation). ``global``: f from every
assignment of the current optimiser step so far (earlier micro-batches of a gradient-accumulation step
included) summed over all ranks under torch.distributed, so the loss asks for balance over the global
batch rather than inside each small batch, which lets experts specialise by domain. f never carries a
gradient (it is a count), so only P_i is trained either way. Evaluation forwards always use ``micro``
and do not touch the accumulator; ``reset()`` runs after each optimiser step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BALANCE_SCOPES = ("micro", "global")


class BalanceFrequencies(nn.Module):
    def __init__(self, num_experts: int, scope: str = "micro"):
        super().__init__()
        if scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope {scope!r} is unknown; choose one of {list(BALANCE_SCOPES)}")
        self.num_experts, self.scope = num_experts, scope
        self.accumulated: Tensor
        self.register_buffer("accumulated", torch.zeros(num_experts), persistent=False)

    def forward(self, experts: Tensor, training: bool) -> Tensor:
        """f (E,) from the chosen experts of this forward's assignments (any shape)."""
        now = torch.bincount(experts.reshape(-1), minlength=self.num_experts).float()
        if self.scope == "micro" or not training:
            return now / now.sum().clamp_min(1)
        with torch.no_grad():
            total = now + self.accumulated
            self.accumulated += now
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(total)
        return total / total.sum().clamp_min(1)

    def reset(self) -> None:
        self.accumulated.zero_()
