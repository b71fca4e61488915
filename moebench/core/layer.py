"""MoELayer: a router from the registry, batched experts, sort -> grouped GEMM -> weighted scatter.

Every router speaks the same flat `Routing` form, so this is the only dispatch code in the suite;
capacity (k-major slot priority, never above the token count) is applied here, once."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from moebench.core.config import LAYER_FILLED_ARGS
from moebench.core.dense_dispatch import dense_dispatch
from moebench.core.experts import Experts
from moebench.core.null_experts import NullExperts
from moebench.core.registry import ROUTERS
from moebench.core.routing import (
    CAPACITY_POLICIES,
    Routing,
    RoutingContext,
    apply_capacity,
    expert_counts,
    init_router_gate,
)
from moebench.core.shared_experts import SharedExperts

ROUTING_UNITS = ("token", "sequence")


def _check_layer_args(
    d_model: int, d_hidden: int, num_experts: int, capacity_factor: float | None, capacity_policy: str
) -> None:
    for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"MoELayer {name} must be a positive integer, got {value!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"MoELayer capacity_factor must be > 0, or None for dropless routing; got {capacity_factor!r}")
    if capacity_policy not in CAPACITY_POLICIES:
        raise ValueError(f"MoELayer capacity_policy must be one of {list(CAPACITY_POLICIES)}, got {capacity_policy!r}")


def _check_routing_unit(routing_unit: str, router: nn.Module, name: str) -> None:
    """``routing_unit`` is known, and "sequence" only with a router that can route by sequence."""
    if routing_unit not in ROUTING_UNITS:
        raise ValueError(f"MoELayer routing_unit must be one of {list(ROUTING_UNITS)}, got {routing_unit!r}")
    if routing_unit == "sequence" and not getattr(router, "sequence_routing", False):
        raise ValueError(
            f"router {name!r} cannot route by sequence (moe.routing_unit: sequence): "
            f"{router.sequence_refusal}; use routing_unit: token, or a router with a "
            f"linear gate (softmax-topk, switch, top-p, loss-free, deepseek-v3, remoe, sinkhorn, "
            f"base, expert-choice) or the random / collapse / oracle controls"
        )


class MoELayer(nn.Module):
    """Drop-in replacement for a transformer MLP: (..., d_model) -> (..., d_model).

    After each forward, ``aux_loss`` holds the summed (already weighted) auxiliary losses and ``stats``
    the routing statistics of that forward (expert counts, drops, per-token top-1 expert and scores)."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        router: str = "softmax-topk",
        router_args: dict | None = None,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        shared_experts: int = 0,
        shared_expert_gate: bool = False,
        null_experts: int = 0,
        capacity_policy: str = "position",
        router_init_std: float | None = None,
        routing_unit: str = "token",
    ):
        super().__init__()
        _check_layer_args(d_model, d_hidden, num_experts, capacity_factor, capacity_policy)
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.capacity_factor = capacity_factor
        self.capacity_policy = capacity_policy
        self.router_name = router
        router_cls = ROUTERS.get(router)
        args = dict(router_args or {})
        for reserved in LAYER_FILLED_ARGS:
            if reserved in args:
                raise ValueError(f"router_args must not set {reserved!r}: the layer fills it in")
        try:
            self.router = router_cls(d_model=d_model, num_experts=num_experts + null_experts, **args)
        except TypeError as err:
            raise TypeError(f"bad router_args for router {router!r}: {err}") from err
        _check_routing_unit(routing_unit, self.router, router)
        self.routing_unit = routing_unit
        self.experts = self.router.wrap_experts(Experts(num_experts, d_model, d_hidden, activation))
        self.null = NullExperts(null_experts, num_experts, d_model) if null_experts else None
        self.shared = (
            SharedExperts(shared_experts, d_model, d_hidden, activation, shared_expert_gate) if shared_experts else None
        )
        self.aux_loss: Tensor = torch.zeros(())
        self.aux_losses: dict[str, Tensor] = {}  # the same, by name (the gradient-purity probe reads "balance")
        self.stats: dict = {}
        self.pending_context: Tensor | None = None  # set by a hook on the block's attention (moefy)
        self.pending_group: Tensor | None = None  # (..., ) true group per token, set by a task that knows it
        self.intervention: Callable[[Routing], Routing] | None = None  # after capacity (training.interventions)
        if router_init_std is not None:  # last: every other weight is drawn as without the option
            init_router_gate(self.router, router_init_std, router)

    # --- cost -------------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Active FLOPs per token (2 per multiply-add): the experts each token visits plus the router."""
        expert = self.experts.flops_per_expert()
        shared = self.shared.flops_per_token() if self.shared is not None else 0.0
        shared += self.null.flops_per_token() if self.null is not None else 0.0  # upper bound, small
        return self.real_experts_per_token() * expert + self.router.flops_per_token() + shared

    def real_experts_per_token(self) -> float:
        """Expert evaluations per token; with null experts, the measured real ones (the router's count
        before any data)."""
        routed = self.router.active_experts_per_token
        return routed if self.null is None else self.null.meter.mean(routed)

    def active_params(self) -> float:
        """Parameters touched per token: router + the average number of experts a token visits (+ shared)."""
        router = sum(p.numel() for p in self.router.parameters())
        shared = self.shared.params() if self.shared is not None else 0
        null = sum(p.numel() for p in self.null.parameters()) if self.null is not None else 0
        return router + self.real_experts_per_token() * self.experts.params_per_expert() + shared + null

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects input of shape (..., {self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        num_tokens = math.prod(shape[:-1])
        flat = x.reshape(num_tokens, self.d_model)
        ctx, seq_len = self._routing_context(x, num_tokens, context, token_ids)
        capacity = (
            self.capacity_factor
            if self.capacity_factor is not None
            else self.router.default_capacity_factor(self.training)
        )
        autocast_off = (
            torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
        )
        with autocast_off:
            if self.routing_unit == "sequence":
                routing = self._route_sequences(flat.float(), ctx, seq_len, capacity)
            else:
                routing = apply_capacity(self.router(flat.float(), ctx), capacity, self.capacity_policy)
        if self.intervention is not None:
            routing = self.intervention(routing)
        null_out = None
        if self.null is not None:
            routing, null_out = self.null.split(routing, flat, self.training)
        compute_dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else flat.dtype
        )

        out, counts = self._dispatch(flat, routing, compute_dtype)
        if self.shared is not None:
            out = out + self.shared(flat.to(compute_dtype)).to(out.dtype)
        if null_out is not None:
            out = out + null_out.to(out.dtype)

        self.aux_losses = dict(routing.aux_losses)
        losses = list(routing.aux_losses.values())
        self.aux_loss = torch.stack(losses).sum() if losses else flat.new_zeros((), dtype=torch.float32)
        self._record_stats(routing, counts, num_tokens)
        return out.to(x.dtype).reshape(shape)

    def _routing_context(
        self, x: Tensor, num_tokens: int, context: Tensor | None, token_ids: Tensor | None
    ) -> tuple[RoutingContext, int]:
        """What the router sees besides the tokens: positions, token ids, the attention context (given or
        hooked in), the pending group ids; and the sequence length."""
        shape = x.shape
        if context is None:
            context = self.pending_context
            self.pending_context = None
        if self.router.needs_context and context is None:
            raise ValueError(
                f"router {self.router_name!r} needs the attention context: call the layer as "
                f"layer(x, context=attn_out), or build the model with moebench.core.moefy which hooks it in"
            )
        if context is not None and context.shape != shape:
            raise ValueError(f"context shape {tuple(context.shape)} must equal input shape {tuple(shape)}")
        seq_len = shape[-2] if x.dim() >= 3 else num_tokens
        group, self.pending_group = self.pending_group, None
        ctx = RoutingContext(
            positions=torch.arange(seq_len, device=x.device).repeat(num_tokens // seq_len),
            token_ids=None if token_ids is None else token_ids.reshape(num_tokens),
            context=None if context is None else context.reshape(num_tokens, self.d_model).float(),
            training=self.training,
            seq_len=seq_len,
            group=None if group is None else group.reshape(num_tokens).to(x.device),
        )
        return ctx, seq_len

    def _dispatch(self, flat: Tensor, routing: Routing, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The experts' weighted outputs summed per token, and the tokens per expert."""
        if routing.is_dense:
            out, counts = dense_dispatch(self.experts, flat, routing, compute_dtype)
        else:
            order = torch.argsort(routing.expert, stable=True)
            token_sorted = routing.token[order]
            counts = expert_counts(routing.expert, self.num_experts)
            y_sorted = self.experts(flat[token_sorted].to(compute_dtype), counts)
            y_sorted = y_sorted * routing.weight[order].to(y_sorted.dtype).unsqueeze(1)
            out = torch.zeros(flat.shape[0], self.d_model, dtype=y_sorted.dtype, device=flat.device)
            out = out.index_add(0, token_sorted, y_sorted)
        return out, counts

    def _route_sequences(self, flat: Tensor, ctx: RoutingContext, seq_len: int, capacity) -> Routing:
        """One decision per sequence (Chen et al. 2022 sum the gate logits over patches): the router sees
        each sequence's summed tokens (for a linear gate, the summed logits), capacity counts sequences,
        and every token of a sequence gets its sequence's pairs."""
        num_seq = flat.shape[0] // seq_len

        def pool(t: Tensor | None, how: str) -> Tensor | None:
            if t is None:
                return None
            t = t.reshape(num_seq, seq_len, *t.shape[1:])
            return t.sum(1) if how == "sum" else t[:, 0]

        seq_ctx = RoutingContext(
            positions=torch.zeros(num_seq, dtype=torch.long, device=flat.device),
            token_ids=None,
            context=pool(ctx.context, "sum"),
            training=ctx.training,
            seq_len=1,
            group=pool(ctx.group, "first"),
        )
        r = apply_capacity(self.router(pool(flat, "sum"), seq_ctx), capacity, self.capacity_policy)
        if r.is_dense:
            raise ValueError(f"router {self.router_name!r} returned a dense routing under routing_unit: sequence")
        offsets = torch.arange(seq_len, device=flat.device)
        token = (r.token.unsqueeze(1) * seq_len + offsets).reshape(-1)

        def spread(t: Tensor) -> Tensor:
            return t.repeat_interleave(seq_len, 0)

        stats = {
            k: (spread(v) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == num_seq else v)
            for k, v in r.stats.items()
        }
        slot = None if r.slot is None else spread(r.slot)
        return Routing(
            token=token,
            expert=spread(r.expert),
            weight=spread(r.weight),
            num_tokens=num_seq * seq_len,
            num_experts=r.num_experts,
            slot=slot,
            aux_losses=r.aux_losses,
            stats=stats,
            dropped=r.dropped * seq_len,
        )

    @torch.no_grad()
    def _record_stats(self, routing, counts: Tensor, num_tokens: int) -> None:
        """Statistics of what was dispatched (after capacity), not of the router's raw scores: a
        router's score argmax can differ from where its tokens went (ties, selection biases, expert
        choice), and every routing metric must describe the real assignment."""
        scores = routing.stats.get("scores")
        if routing.is_dense:  # every token reaches every expert's slots: its top-1 carries most combine weight
            combine = routing.combine.detach().float().reshape(num_tokens, self.num_experts, -1)
            top1 = combine.sum(-1).argmax(-1)
        else:
            top1 = dispatched_top1(
                routing.token, routing.expert, routing.weight, num_tokens, self.num_experts, routing.slot
            )
        self.stats = {  # tensors stay on the device: no host sync in the forward pass
            "counts": counts.detach(),
            "tokens": num_tokens,
            "pairs": routing.num_pairs,
            "dropped": routing.dropped,
            "unrouted_tokens": (top1 < 0).sum(),
            "top1": top1,
            "scores": None if scores is None else scores.detach(),
            **{k: v for k, v in routing.stats.items() if k not in ("scores", "top1")},
        }
        # detached 0-d tensors, read (and synced) by the statistics code, never in the forward
        self.stats["aux_losses"] = {k: v.detach() for k, v in routing.aux_losses.items()}

    def after_step(self) -> None:
        self.router.after_step()

    def extra_repr(self) -> str:
        return f"router={self.router_name!r}, capacity_factor={self.capacity_factor}"


def dispatched_top1(
    token: Tensor, expert: Tensor, weight: Tensor, num_tokens: int, num_experts: int, slot: Tensor | None = None
) -> Tensor:
    """Per token, the highest-weight expert it was actually sent to, or -1 where no pair survived
    ("unrouted": expert-choice leftovers, capacity drops of every choice). Equal weights go to the
    token's earlier choice (lower ``slot``: round-robin's own expert, not always expert 0), then to
    the lower expert index. Scatter reductions only, so no host sync on CUDA."""
    device = token.device
    w = weight.detach().float()
    best = torch.full((num_tokens,), -math.inf, device=device).scatter_reduce(0, token, w, "amax")
    rank = expert.long() if slot is None else slot.long() * num_experts + expert.long()
    none = 2**62  # above any slot * E + expert; a constant, so no host sync
    candidate = torch.where(w == best[token], rank, torch.full_like(rank, none))
    key = torch.full((num_tokens,), none, dtype=torch.long, device=device).scatter_reduce(0, token, candidate, "amin")
    return torch.where(key == none, torch.full_like(key, -1), key % num_experts)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
