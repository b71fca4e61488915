"""BASE layers (Lewis, Bhosale, Dettmers, Goyal & Zettlemoyer 2021, "BASE Layers: Simplifying Training of
Large, Sparse Models").

    a_t      = x_t . w_e                      token-expert affinities (T, E), W: d x E, float32
    training: assignment = argmax_{balanced} sum_t a_{t, e(t)}   subject to every expert taking at most
              C = ceil(T / E) tokens (a linear assignment, solved by an auction, Bertsekas 1988)
    eval:     e(t) = argmax_e a_te            greedy top-1 (no balancing at test time)
    y(t)     = sigmoid(a_{t, e(t)}) * expert_{e(t)}(x_t)

No auxiliary loss: the assignment itself is balanced. The auction: unassigned tokens bid for their best
expert at price + (best - second best value) + eps, each expert keeps its C highest bids and its price
becomes the lowest bid it holds once full; after ``max_iterations`` rounds any token still without an
expert takes the best expert with room (so balance is exact, optimality approximate to eps per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing


@torch.no_grad()
def balanced_assignment(scores: Tensor, capacity: int, eps: float = 1e-3, max_iterations: int = 100) -> Tensor:
    """Expert per token (T,) maximising sum of ``scores`` (T, E) with at most ``capacity`` tokens per expert."""
    num_tokens, num_experts = scores.shape
    if capacity * num_experts < num_tokens:
        raise ValueError(f"capacity {capacity} x {num_experts} experts cannot hold {num_tokens} tokens")
    device = scores.device
    owner = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    held = torch.zeros(num_tokens, dtype=scores.dtype, device=device)
    price = torch.zeros(num_experts, dtype=scores.dtype, device=device)
    tokens = torch.arange(num_tokens, device=device)
    for _ in range(max_iterations):
        free = (owner < 0).nonzero(as_tuple=True)[0]
        if free.numel() == 0:
            break
        value = scores[free] - price
        if num_experts > 1:
            top = value.topk(2, dim=-1)
            best, gain = top.indices[:, 0], top.values[:, 0] - top.values[:, 1]
        else:
            best, gain = torch.zeros_like(free), torch.zeros(free.numel(), dtype=scores.dtype, device=device)
        bid = price[best] + gain + eps
        holders = (owner >= 0).nonzero(as_tuple=True)[0]
        cand_tok = torch.cat([tokens[holders], free])
        cand_exp = torch.cat([owner[holders], best])
        cand_bid = torch.cat([held[holders], bid])
        # rank each candidate within its expert by decreasing bid; keep the top `capacity`
        order = torch.argsort(cand_bid, descending=True, stable=True)
        order = order[torch.argsort(cand_exp[order], stable=True)]
        exp_sorted = cand_exp[order]
        counts = torch.bincount(exp_sorted, minlength=num_experts)
        rank = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[exp_sorted]
        keep = order[rank < capacity]
        owner[cand_tok] = -1
        owner[cand_tok[keep]] = cand_exp[keep]
        held[cand_tok[keep]] = cand_bid[keep]
        full = counts >= capacity
        lowest = torch.full((num_experts,), math.inf, dtype=scores.dtype, device=device)
        lowest = lowest.scatter_reduce(0, cand_exp[keep], cand_bid[keep], reduce="amin")
        price = torch.where(full, lowest, price)
    free = (owner < 0).nonzero(as_tuple=True)[0]
    if free.numel():  # leftover tokens: greedily to the best expert with room
        room = capacity - torch.bincount(owner[owner >= 0], minlength=num_experts)
        for t in free.tolist():
            choice = scores[t].masked_fill(room <= 0, -math.inf).argmax()
            owner[t] = choice
            room[choice] -= 1
    return owner


@register_router(
    "base", "BASE layers (Lewis et al. 2021): balanced linear assignment in training, greedy top-1 at eval"
)
class BaseRouter(Router):
    """Top-1 by balanced assignment in training, greedy at evaluation; see the module docstring.

    ``compile_fullgraph = False``: the training assignment is an auction whose number of rounds, and
    the set of tokens bidding in each, depend on the scores (it stops at convergence), so torch.compile
    cannot trace it into one graph and it reads values back to the host. Evaluation (greedy top-1)
    compiles into one graph."""

    sequence_routing = True  # gate logits linear in x: routing the summed tokens = summing the logits

    compile_fullgraph = False
    compile_fullgraph_reason = (
        "the training assignment is an auction run until convergence: its rounds and "
        "bidders are data-dependent, so it breaks the graph and syncs with the host"
    )

    options = {
        "top_k": option(1, "choice", choices=(1,), fix="BASE routing is top-1 by definition: use top_k: 1"),
        "eps": option(1e-3, "float", minimum=0.0, strict=True, doc="auction bid increment"),
        "max_iterations": option(100, "int", minimum=1, doc="auction rounds at most"),
    }

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, eps: float = 1e-3, max_iterations: int = 100):
        super().__init__(d_model, num_experts, top_k)
        self.eps, self.max_iterations = float(eps), int(max_iterations)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        scores = F.linear(x.float(), self.gate.weight.float())
        if ctx.training:
            capacity = math.ceil(x.shape[0] / self.num_experts)
            expert = balanced_assignment(scores.detach(), capacity, self.eps, self.max_iterations)
        else:
            expert = scores.detach().argmax(-1)
        weight = torch.sigmoid(scores.gather(1, expert.unsqueeze(1)))
        return topk_routing(
            expert.unsqueeze(1), weight, self.num_experts, stats={"scores": torch.softmax(scores, -1).detach()}
        )
