"""Random control: every forward, every token goes to k distinct experts drawn uniformly at random.

Neither content nor position decides: it is the floor for "does routing by content help at all", and
the control with known answers for the routing metrics (mutual information / NMI with any label ~ 0,
switch rate ~ 1 - 1/E for top-1, load ~ uniform). ``hash`` with ``by: position`` is *not* such a
control on images (fixed position-specific experts); this one is.

The draw is a counter-based hash, not a torch generator: for each token t and expert e a 31-bit key
    key(t, e) = mix(seed, calls, t, e)        (integer multiply / xor-shift mixing, int64, no overflow)
and the token takes the k experts with the largest keys (a uniform random k-subset, in random order).
``calls`` is a buffer incremented at every forward, so each forward draws afresh, the draw does not
touch the global RNG stream (the rest of the run is unchanged by adding the control), and a resumed run
(the buffer is in the checkpoint) continues the same sequence. Weights are 1 / k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing

_MASK = 0x7FFFFFFF  # 31 bits: a 31-bit value times a 31-bit constant stays below 2**62


def _mix(x: Tensor) -> Tensor:
    """A 31-bit integer mixer (two multiply / xor-shift rounds); int64 in, int64 in [0, 2**31) out."""
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


@register_router(
    "random", "control: each forward, each token to k experts drawn uniformly at random (no content, no position)"
)
class RandomRouter(Router):
    """Fresh uniform random k-subset of experts per token per forward; see the module docstring."""

    calls: Tensor

    control = True  # a control with known answers, not a router to rank (grids list it where it applies)
    sequence_routing = True  # reads no content: one random draw per sequence
    options = {
        "top_k": option(1, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "seed": option(0, "int", minimum=0, doc="seed of the per-forward draws"),
    }

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, seed: int = 0):
        super().__init__(d_model, num_experts, top_k)
        self.seed = seed
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        num_tokens, num_experts, k = x.shape[0], self.num_experts, self.top_k
        t = torch.arange(num_tokens, device=x.device, dtype=torch.long).unsqueeze(1)
        e = torch.arange(num_experts, device=x.device, dtype=torch.long).unsqueeze(0)
        calls = self.calls.to(x.device)
        base = _mix(_mix(calls * 0x2545F49 + self.seed) + t * 0x3C6EF35)
        keys = _mix(base + e * 0x1B873593)
        idx = keys.topk(k, dim=-1).indices
        with torch.no_grad():
            self.calls.add_(1)
        weights = torch.full((num_tokens, k), 1.0 / k, device=x.device, dtype=torch.float32)
        scores = torch.zeros(num_tokens, num_experts, device=x.device).scatter_(1, idx, weights)
        return topk_routing(idx, weights, num_experts, stats={"scores": scores})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
