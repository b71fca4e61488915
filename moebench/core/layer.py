"""MoELayer: a router from the registry, batched experts, sort -> grouped GEMM -> weighted scatter.

Every router speaks the same flat `Routing` form, so this is the only dispatch code in the suite;
capacity (k-major slot priority, never above the token count) is applied here, once."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from moebench.core.experts import Experts
from moebench.core.registry import ROUTERS
from moebench.core.routing import RoutingContext, apply_capacity, expert_counts


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
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoELayer {name} must be a positive integer, got {value!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                f"MoELayer capacity_factor must be > 0, or None for dropless routing; got {capacity_factor!r}"
            )
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.capacity_factor = capacity_factor
        self.router_name = router
        router_cls = ROUTERS.get(router)
        args = dict(router_args or {})
        for reserved in ("d_model", "num_experts"):
            if reserved in args:
                raise ValueError(f"router_args must not set {reserved!r}: the layer fills it in")
        try:
            self.router = router_cls(d_model=d_model, num_experts=num_experts, **args)
        except TypeError as err:
            raise TypeError(f"bad router_args for router {router!r}: {err}") from err
        self.experts = self.router.wrap_experts(Experts(num_experts, d_model, d_hidden, activation))
        self.aux_loss: Tensor = torch.zeros(())
        self.stats: dict = {}
        self.pending_context: Tensor | None = None  # set by a hook on the block's attention (moefy)

    # --- cost -------------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Active FLOPs per token (2 per multiply-add): the experts each token visits plus the router."""
        expert = 2 * 2 * self.d_model * self.d_hidden
        return self.router.active_experts_per_token * expert + self.router.flops_per_token()

    def active_params(self) -> float:
        """Parameters touched per token: router + the average number of experts a token visits."""
        router = sum(p.numel() for p in self.router.parameters())
        return router + self.router.active_experts_per_token * self.experts.params_per_expert()

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects input of shape (..., {self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        num_tokens = math.prod(shape[:-1])
        flat = x.reshape(num_tokens, self.d_model)
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
        ctx = RoutingContext(
            positions=torch.arange(seq_len, device=x.device).repeat(num_tokens // seq_len),
            token_ids=None if token_ids is None else token_ids.reshape(num_tokens),
            context=None if context is None else context.reshape(num_tokens, self.d_model).float(),
            training=self.training,
        )
        autocast_off = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
        with autocast_off:
            routing = self.router(flat.float(), ctx)
        capacity = self.capacity_factor if self.capacity_factor is not None else self.router.default_capacity_factor(self.training)
        routing = apply_capacity(routing, capacity)

        order = torch.argsort(routing.expert, stable=True)
        token_sorted = routing.token[order]
        counts = expert_counts(routing.expert, self.num_experts)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else flat.dtype
        y_sorted = self.experts(flat[token_sorted].to(compute_dtype), counts)
        y_sorted = y_sorted * routing.weight[order].to(y_sorted.dtype).unsqueeze(1)
        out = torch.zeros(num_tokens, self.d_model, dtype=y_sorted.dtype, device=x.device)
        out = out.index_add(0, token_sorted, y_sorted)

        losses = list(routing.aux_losses.values())
        self.aux_loss = torch.stack(losses).sum() if losses else flat.new_zeros((), dtype=torch.float32)
        self._record_stats(routing, counts, num_tokens)
        return out.to(x.dtype).reshape(shape)

    @torch.no_grad()
    def _record_stats(self, routing, counts: Tensor, num_tokens: int) -> None:
        scores = routing.stats.get("scores")
        top1 = routing.stats.get("top1")
        if top1 is None and scores is not None:
            top1 = scores.argmax(-1)
        routed = expert_counts(routing.token, num_tokens)
        self.stats = {  # tensors stay on the device: no host sync in the forward pass
            "counts": counts.detach(),
            "tokens": num_tokens,
            "pairs": routing.num_pairs,
            "dropped": routing.dropped,
            "unrouted_tokens": (routed == 0).sum(),
            "top1": None if top1 is None else top1.detach(),
            "scores": None if scores is None else scores.detach(),
            **{k: v for k, v in routing.stats.items() if k not in ("scores", "top1")},
        }
        # detached 0-d tensors, read (and synced) by the statistics code, never in the forward
        self.stats["aux_losses"] = {k: v.detach() for k, v in routing.aux_losses.items()}

    def after_step(self) -> None:
        self.router.after_step()

    def extra_repr(self) -> str:
        return f"router={self.router_name!r}, capacity_factor={self.capacity_factor}"


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
