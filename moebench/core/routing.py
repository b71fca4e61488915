"""The router's answer (`Routing`), what a router may read (`RoutingContext`), the `Router` base class,
and the capacity / drop logic every router shares.

One flat form covers every routing family that sends tokens: a list of (token, expert, weight)
assignment pairs. A token-choice top-k router emits T*k pairs, expert-choice emits E*C pairs, a
capacity limit removes pairs. The one other form is dense: routers that send weighted MIXTURES of
tokens (Soft MoE) give ``dispatch`` / ``combine`` matrices instead (see `Routing`). The MoE layer
handles exactly these two forms, so it needs no per-router code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moebench.core.config import ConfigError, OptionError, check_options


@dataclass
class RoutingContext:
    """Optional extras a router may read. ``context`` is the token's attention output (T, d) for routers
    that declare ``needs_context``; ``positions`` (T,) index tokens within their sequence;
    ``token_ids`` (T,) exist only for text; ``seq_len`` is the tokens per sequence (the T tokens are
    T / seq_len sequences laid out one after another). ``group`` (T,) is the token's true group where a
    task knows it (the ``structure`` task; -1 = none): only control routers such as ``oracle`` read it."""

    positions: Tensor | None = None
    token_ids: Tensor | None = None
    context: Tensor | None = None
    training: bool = False
    seq_len: int | None = None
    group: Tensor | None = None


@dataclass
class Routing:
    """Assignments as flat (N,) tensors plus losses and statistics.

    ``slot`` is each pair's rank within its token's choices (0 = the token's first choice); the layer's
    capacity logic fills experts slot-major ("k-major") so first choices are never dropped for a
    second choice. ``stats`` holds detached per-token tensors for metrics: ``scores`` (T, E) router
    probabilities or scores, and any router-specific counters (e.g. ``fallback``).

    Dense form (Soft MoE): ``dispatch`` and ``combine`` of shape (B, N, M) for B sequences of N tokens
    and M = E * S slots, slot m belonging to expert m // S. Slot inputs are
    ``slots[b] = dispatch[b]^T x[b]``, each expert runs on its B * S slots, and
    ``y[b] = combine[b] @ slot_outputs[b]``. The flat lists are then empty; ``counts()`` gives the slots
    each expert processed."""

    token: Tensor
    expert: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    slot: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    dropped: int = 0
    dispatch: Tensor | None = None
    combine: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dispatch is None) != (self.combine is None):
            raise ValueError("a dense Routing needs both dispatch and combine (shape (B, N, E * slots))")
        if self.dispatch is not None and self.combine is not None:
            shape = tuple(self.dispatch.shape)
            if (
                len(shape) != 3
                or tuple(self.combine.shape) != shape
                or shape[0] * shape[1] != self.num_tokens
                or shape[2] % self.num_experts
            ):
                raise ValueError(
                    f"dense Routing: dispatch {shape} and combine {tuple(self.combine.shape)} must both "
                    f"be (B, N, E * slots) with B * N = {self.num_tokens} tokens and "
                    f"E = {self.num_experts}"
                )

    @property
    def is_dense(self) -> bool:
        return self.dispatch is not None

    @property
    def num_pairs(self) -> int:
        return int(self.token.numel())

    def counts(self) -> Tensor:
        """Tokens assigned to each expert (after any drops), shape (E,); for the dense form the slots
        each expert processed."""
        if self.dispatch is not None:
            per_expert = self.dispatch.shape[0] * self.dispatch.shape[2] // self.num_experts
            return torch.full((self.num_experts,), per_expert, dtype=torch.long, device=self.dispatch.device)
        return expert_counts(self.expert, self.num_experts)


def expert_counts(index: Tensor, size: int) -> Tensor:
    """``bincount(index, minlength=size)`` with a fixed output size: no host sync on CUDA (bincount reads
    the max to size its output) and no data-dependent shape, so ``torch.compile`` keeps one graph."""
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


def topk_routing(indices: Tensor, weights: Tensor, num_experts: int, **extra) -> Routing:
    """Build a Routing from per-token choices ``indices`` (T, k) and gate ``weights`` (T, k)."""
    num_tokens, k = indices.shape
    token = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
    slot = torch.arange(k, device=indices.device).repeat(num_tokens)
    return Routing(
        token=token,
        expert=indices.reshape(-1),
        weight=weights.reshape(-1),
        num_tokens=num_tokens,
        num_experts=num_experts,
        slot=slot,
        **extra,
    )


def expert_capacity(num_tokens: int, pairs_per_token: float, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(factor * T * k / E), at least 1 and never above T."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor!r}")
    cap = math.ceil(capacity_factor * num_tokens * pairs_per_token / num_experts)
    return max(1, min(num_tokens, cap))


CAPACITY_POLICIES = ("position", "priority")


def apply_capacity(routing: Routing, capacity_factor: float | None, policy: str = "position") -> Routing:
    """Keep at most C pairs per expert, filling slot-major: every token's first choice is placed before
    any second choice. Within a slot, ``position`` takes earlier tokens first; ``priority`` (V-MoE's
    batch-prioritised routing, Riquelme et al. 2021) takes tokens in order of their top gate score
    (``stats['scores']``' row maximum, else the token's largest pair weight), so confident tokens are the
    last to be dropped. Dropped pairs are removed and counted."""
    if policy not in CAPACITY_POLICIES:
        raise ValueError(f"capacity policy {policy!r} is unknown; choose one of {list(CAPACITY_POLICIES)}")
    if capacity_factor is None or routing.num_pairs == 0:
        return routing
    pairs_per_token = routing.num_pairs / max(routing.num_tokens, 1)
    cap = expert_capacity(routing.num_tokens, pairs_per_token, routing.num_experts, capacity_factor)
    slot = routing.slot if routing.slot is not None else torch.zeros_like(routing.token)
    token_rank = routing.token if policy == "position" else _priority_rank(routing)[routing.token]
    priority = slot * routing.num_tokens + token_rank
    # Sort by (expert, priority) with one stable key; the rank inside each expert's block is the slot used.
    key = routing.expert * (priority.max() + 1) + priority
    order = torch.argsort(key, stable=True)
    expert_sorted = routing.expert[order]
    counts = expert_counts(expert_sorted, routing.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[expert_sorted]
    keep_sorted = rank < cap
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    dropped = int((~keep).sum())
    if dropped == 0:
        return routing
    return Routing(
        token=routing.token[keep],
        expert=routing.expert[keep],
        weight=routing.weight[keep],
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        slot=None if routing.slot is None else routing.slot[keep],
        aux_losses=routing.aux_losses,
        stats=routing.stats,
        dropped=routing.dropped + dropped,
    )


def _priority_rank(routing: Routing) -> Tensor:
    """Each token's rank (0 = first served) by decreasing top gate score; ties by position."""
    scores = routing.stats.get("scores")
    if scores is not None and scores.shape[0] == routing.num_tokens:
        top = scores.detach().float().max(-1).values
    else:
        top = torch.full((routing.num_tokens,), -math.inf, device=routing.token.device)
        top = top.scatter_reduce(0, routing.token, routing.weight.detach().float(), reduce="amax")
    order = torch.argsort(-top, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


class Router(nn.Module):
    """Base class: ``forward(x (T, d) float32, ctx) -> Routing``.

    The contract, everything the layer, the trainer, the tasks and the grid read from a router class
    (the class attributes below, with their defaults, and these methods): subclasses may override
    ``after_step()`` (called after each optimiser step), ``flops_per_token()`` (the router's own cost,
    counted in the run's active FLOPs) and ``wrap_experts()`` (the one declared hook through which a
    router may own the experts' parameterisation, as ERMoE does). ``default_capacity_factor`` returns
    the capacity the router wants when the layer is given none (Switch: 1.25 train / 2.0 eval). The
    registry (``@register_router``) accepts only subclasses of this class."""

    #: the router reads ``ctx.context`` (the token's attention output), so the layer computes it
    needs_context: bool = False
    #: ``moe.routing_unit: sequence`` routes the sum of a sequence's tokens once. That equals summing the
    #: gate logits only when they are linear in x (a linear gate), or the router reads no content (the
    #: controls); such routers set this True. Others set ``sequence_refusal`` to say why they cannot.
    sequence_routing: bool = False
    sequence_refusal: str = (
        "its scores are not linear in the token, so routing the summed tokens is not summing its logits"
    )
    #: not a token router: it routes whole images and builds its own model around the backbone through
    #: the classmethod ``build_model(backbone, moe) -> nn.Module`` (tasks call it instead of moefy; grid
    #: matching counts its cost per image). Token routers leave it False and never define build_model.
    image_level: bool = False
    #: bump when a change alters this router's numbers: it enters the run id, so exactly its runs rerun
    version: int = 1
    #: the router's options (its constructor's keyword arguments after d_model and num_experts), declared
    #: once as ``name: moebench.core.config.option(default, kind, minimum=..., choices=..., doc=...)``.
    #: Every constructor call checks the declared ones before its body runs (a bad value raises
    #: ``OptionError``, worded like a grid file's errors: ``router 'NAME': args.OPTION: expected ...,
    #: got ...``); the grid validator checks a grid's router args against the same declaration, and
    #: ``moebench routers --options NAME`` prints it. Only checks that relate an option to another
    #: value (``top_k <= num_experts``, ``rank < d_model``) stay in the constructor.
    options: ClassVar[dict[str, dataclasses.Field]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ and cls.__dict__.get("options"):
            cls.__init__ = _checks_options(cls.__dict__["__init__"], cls)  # type: ignore[method-assign]

    @classmethod
    def build_model(cls, backbone: nn.Module, moe: dict) -> nn.Module:
        """The whole model of an ``image_level`` router around ``backbone`` (only those define it)."""
        raise NotImplementedError(
            f"{cls.__name__} is a token router (image_level is False): moefy places it in "
            f"the model's blocks; only image-level routers build their own model"
        )

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k={top_k} is invalid for num_experts={num_experts}: choose 1 <= top_k <= num_experts"
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k

    @property
    def active_experts_per_token(self) -> float:
        """Average expert evaluations per token, which sets the expert width under FLOP matching."""
        return float(self.top_k)

    def flops_per_token(self) -> float:
        return 0.0

    def after_step(self) -> None:
        pass

    def wrap_experts(self, experts: nn.Module) -> nn.Module:
        return experts

    def default_capacity_factor(self, training: bool) -> float | None:
        return None

    def gate_parameters(self) -> list[Tensor]:
        """The learned gate weights that ``moe.router_init_std`` redraws: the weight of an ``nn.Linear``
        named ``gate`` by default; a router with another gate overrides this, one with none returns []."""
        gate = getattr(self, "gate", None)
        return [gate.weight] if isinstance(gate, nn.Linear) else []


def _checks_options(init: Any, owner: Any) -> Any:
    """``owner.__init__`` that first checks its declared options (`Router.options`) and passes them on
    normalised (``2.0`` -> ``2`` for an integer option); arguments it cannot bind go to ``init`` as given,
    so Python's own TypeError names them."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return init(self, *args, **kwargs)
        try:
            bound.arguments.update(check_options(owner.options, bound.arguments, "args"))
        except ConfigError as err:
            name = getattr(owner, "registry_name", None) or owner.__name__
            raise OptionError(f"router {name!r}", err) from None
        return init(*bound.args, **bound.kwargs)

    return checked


def init_router_gate(router: Router, std: float, name: str) -> None:
    """Redraw ``router``'s learned gate weights from N(0, std^2) (``moe.router_init_std``)."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or not std > 0:
        raise ValueError(f"moe.router_init_std must be a number > 0 (or null: the router's own init), got {std!r}")
    params = router.gate_parameters()
    if not params:
        raise ValueError(
            f"moe.router_init_std={std!r} cannot apply to router {name!r}: it has no learned gate "
            f"(it routes by hash, position, chance or the experts' own weights); leave "
            f"moe.router_init_std null for it"
        )
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, float(std))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
