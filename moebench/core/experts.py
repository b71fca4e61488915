"""Batched experts: E two-layer MLPs stored as (E, d, h) / (E, h, d) tensors and run as one grouped
matrix product per projection over tokens already sorted by expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu-tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick-gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
}
# Gated (GLU) experts, expert(x) = (act(x W_gate) * (x W_up)) W_down (Shazeer 2020, "GLU Variants Improve
# Transformer"; Mixtral, DeepSeek, Qwen-MoE). W_gate and W_up are stored side by side as one fc1 of width
# 2h ([gate | up]), so fc1 stays ONE grouped GEMM and the activation takes the 2h-wide product.
GATED = {"swiglu": F.silu, "geglu": F.gelu}
ACTIVATIONS.update({name: (lambda gate_act: lambda h: _glu(h, gate_act))(fn) for name, fn in GATED.items()})


def _glu(h: Tensor, gate_act) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return gate_act(gate) * up


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's backward
    rejects the zero-stride (expanded) gradient that e.g. ``y.sum().backward()`` sends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _GroupedBiasAdd(torch.autograd.Function):
    """``h[rows of group e] += bias[e]`` in place on the grouped GEMM's fresh output: one pass over
    memory, no (N, h) repeated-bias tensor; backward sums the gradient per group."""

    @staticmethod
    def forward(ctx, h, bias, sizes):
        ctx.sizes = sizes
        for e, part in enumerate(torch.split(h, sizes)):
            if sizes[e]:
                part.add_(bias[e])
        ctx.mark_dirty(h)
        return h

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # what the grouped GEMM's backward needs (see _ContiguousGrad)
        grad_bias = torch.stack([part.sum(0) for part in torch.split(grad, ctx.sizes)])
        return grad, grad_bias, None


class _GatheredBiasAdd(torch.autograd.Function):
    """``h + bias[group_of_row]`` for accelerators: the bias gradient is one small GEMM
    (one-hot(groups)^T @ grad) instead of index_select's backward, whose atomics into only E rows
    cost more than the expert GEMMs themselves on an H100."""

    @staticmethod
    def forward(ctx, h, bias, group):
        ctx.save_for_backward(group)
        ctx.num_groups = bias.shape[0]
        return h + bias.index_select(0, group)

    @staticmethod
    def backward(ctx, grad):
        (group,) = ctx.saved_tensors
        one_hot = torch.nn.functional.one_hot(group, ctx.num_groups).to(grad.dtype)
        return grad.contiguous(), one_hot.T @ grad, None


def _grouped_mm_usable(x: Tensor, w: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16
    elif x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16)
    else:
        return False
    align = 16 // x.element_size()  # 16-byte aligned strides
    return ok_dtype and w.dtype == x.dtype and x.shape[-1] % align == 0 and w.shape[-1] % align == 0


def grouped_matmul(
    x: Tensor, w: Tensor, counts: Tensor, use_grouped_mm: bool = True, contiguous_grad: bool = True
) -> Tensor:
    """Rows of ``x`` (N, a) come in E consecutive groups of sizes ``counts``; group e is multiplied by
    ``w[e]`` (a, b). One grouped GEMM where the build supports it, a loop over groups otherwise.
    ``contiguous_grad=False`` only when the caller's next op already hands back a contiguous gradient.

    Under ``torch.compile`` a product torch cannot trace (float32 ``_grouped_mm``, whose fake kernel
    admits only bf16 / fp16, or the loop, whose group sizes are host values) runs as one opaque custom
    op, ``moebench::grouped_mm``, so the graph does not break there."""
    compiling = torch.compiler.is_compiling()
    if (
        use_grouped_mm
        and _grouped_mm_usable(x, w)
        and not (compiling and x.dtype not in (torch.bfloat16, torch.float16))
    ):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        if w.stride(-1) != 1 and w.stride(-2) != 1:  # row- or column-major (e.g. U.mT) go in as they are
            w = w.contiguous()
        out = torch._grouped_mm(x.contiguous(), w, offs=offs)
        return _ContiguousGrad.apply(out) if contiguous_grad else out
    if compiling:
        return grouped_mm_op(x, w, counts, use_grouped_mm)
    return _grouped_loop(x, w, counts)


def _grouped_loop(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    sizes = counts.tolist()
    parts = [xe @ w[e] for e, xe in enumerate(torch.split(x, sizes)) if sizes[e] > 0]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


@torch.library.custom_op("moebench::grouped_mm", mutates_args=())
def grouped_mm_op(x: Tensor, w: Tensor, counts: Tensor, use_grouped_mm: bool) -> Tensor:
    """``grouped_matmul`` as one op torch.compile does not look into (its eager body may sync)."""
    if use_grouped_mm and _grouped_mm_usable(x, w):
        return torch._grouped_mm(x.contiguous(), w.contiguous(), offs=torch.cumsum(counts, 0).to(torch.int32))
    return _grouped_loop(x, w, counts)


@grouped_mm_op.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor, use_grouped_mm: bool) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moebench::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    """dL/dw of ``grouped_mm_op``: ``x_e^T grad_e`` per group, shape (E, a, b)."""
    out = x.new_zeros(counts.shape[0], x.shape[1], grad.shape[1])
    sizes = counts.tolist()
    for e, (xe, ge) in enumerate(zip(torch.split(x, sizes), torch.split(grad, sizes))):
        if sizes[e]:
            out[e] = xe.T @ ge
    return out


@grouped_mm_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, counts, use_grouped_mm = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.use_grouped_mm = use_grouped_mm


def _grouped_mm_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm_op(grad, w.mT, counts, ctx.use_grouped_mm) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class Experts(nn.Module):
    """E experts ``x -> act(x W1_e + b1_e) W2_e + b2_e``; fc1 weight comes from ``fc1_weight()`` so a
    router that reparameterises experts (ERMoE) can substitute its own through ``Router.wrap_experts``.
    With a gated activation (``swiglu`` / ``geglu``) W1_e is [W_gate | W_up], of width 2 * d_hidden."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "gelu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        self.act = activation_fn(activation)
        self.gated = activation in GATED
        fc1_width = 2 * d_hidden if self.gated else d_hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, fc1_width))
        self.b1 = nn.Parameter(torch.empty(num_experts, fc1_width))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.use_grouped_mm = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def fc1_weight(self) -> Tensor:
        return self.w1

    def flops_per_expert(self) -> float:
        """Matmul FLOPs of one expert on one token (2 per multiply-add): fc1 (twice as wide when gated)
        and fc2."""
        return 2.0 * self.d_model * self.d_hidden * (3 if getattr(self, "gated", False) else 2)

    @torch.no_grad()
    def load_dense(
        self, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None
    ) -> None:
        """Upcycle: every expert becomes a copy of a dense MLP given in nn.Linear layout (out, in)."""
        if self.gated:
            raise ValueError(
                f"cannot upcycle a dense (non-gated) MLP into {self.activation!r} experts; "
                f"set moe.activation to null (the dense MLP's) or moe.upcycle to false"
            )
        self.check_dense_shapes(fc1_weight, fc2_weight)
        self.w1.copy_(fc1_weight.t().unsqueeze(0).expand_as(self.w1))
        self.w2.copy_(fc2_weight.t().unsqueeze(0).expand_as(self.w2))
        self.b1.copy_(fc1_bias if fc1_bias is not None else torch.zeros(self.d_hidden))
        self.b2.copy_(fc2_bias if fc2_bias is not None else torch.zeros(self.d_model))

    @torch.no_grad()
    def load_experts(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Upcycle from per-expert weights (E, d, h) / (E, h) / (E, h, d) / (E, d) (Drop-Upcycling)."""
        if self.gated:
            raise ValueError(
                f"cannot upcycle a dense (non-gated) MLP into {self.activation!r} experts; "
                f"set moe.activation to null (the dense MLP's) or moe.upcycle to false"
            )
        for name, value in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            getattr(self, name).copy_(value)

    def fc1(self, x_sorted: Tensor, counts: Tensor, contiguous_grad: bool = True) -> Tensor:
        """First projection without bias; a reparameterising subclass (ERMoE) overrides this alone."""
        return grouped_matmul(
            x_sorted, self.fc1_weight().to(x_sorted.dtype), counts, self.use_grouped_mm, contiguous_grad
        )

    def check_dense_shapes(self, fc1_weight: Tensor, fc2_weight: Tensor) -> None:
        """A dense MLP can only be upcycled into experts of its own width."""
        if fc1_weight.shape != (self.d_hidden, self.d_model) or fc2_weight.shape != (self.d_model, self.d_hidden):
            raise ValueError(
                f"dense MLP shapes fc1 {tuple(fc1_weight.shape)} / fc2 {tuple(fc2_weight.shape)} do not match "
                f"experts of d_model={self.d_model}, d_hidden={self.d_hidden}"
            )

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.num_experts

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        # add_group_bias's eager CPU path makes the gradient contiguous
        fused = x_sorted.device.type == "cpu" and not torch.compiler.is_compiling()
        h = self.act(add_group_bias(self.fc1(x_sorted, counts, contiguous_grad=not fused), self.b1, counts))
        y = grouped_matmul(h, self.w2.to(h.dtype), counts, self.use_grouped_mm, contiguous_grad=not fused)
        return add_group_bias(y, self.b2, counts)


def add_group_bias(h: Tensor, bias: Tensor, counts: Tensor) -> Tensor:
    """Add ``bias[e]`` to the rows of group e. In place (one memory pass) on CPU, where the per-group
    loop is cheap; on accelerators one gathered add avoids E small kernels and a host sync."""
    if h.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: the sync-free path below
        return _GroupedBiasAdd.apply(h, bias.to(h.dtype), counts.tolist())
    group = torch.repeat_interleave(torch.arange(len(counts), device=h.device), counts, output_size=h.shape[0])
    return _GatheredBiasAdd.apply(h, bias.to(h.dtype), group)
