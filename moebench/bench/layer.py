"""`moebench bench layer`: forward+backward time of an MoE layer against a dense FFN doing the same
active FLOPs per token (hidden width k * d_hidden), measured side by side in one process.

Ratios, not absolute times, are the result: both sides share the machine, threads and allocator, so
the ratio isolates what routing and dispatch cost. Medians of interleaved repeats resist noise.
Memory of one step per module (``moebench.bench.memory``): activations saved for the backward on
every device, the allocator's peak on CUDA."""

from __future__ import annotations

import math
import statistics
import time
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from moebench.bench.memory import step_memory
from moebench.core.layer import MoELayer
from moebench.core.progress import Progress


class DenseFFN(nn.Module):
    """The dense baseline: Linear(d, width) -> GELU -> Linear(width, d)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, width), nn.Linear(width, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DenseSwiGLU(nn.Module):
    """Dense equivalent of a Mixtral expert set: SwiGLU of width k * d_hidden, no biases."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, width, bias=False)
        self.w3 = nn.Linear(d_model, width, bias=False)
        self.w2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _step_time(module: nn.Module, x: torch.Tensor) -> float:
    """One forward + backward with loss = sum, in seconds (synchronised on GPU)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_side_by_side(
    modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per forward+backward for each module, interleaving them each repeat."""
    for _ in range(warmup):
        for m in modules.values():
            _step_time(m, x)
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, m in modules.items():
            samples[name].append(_step_time(m, x))
    return {name: statistics.median(v) for name, v in samples.items()}


class RouterOnly(nn.Module):
    """A layer's router alone (scores, selection, gate weights, aux losses), to time what routing
    itself costs apart from the experts; the output keeps autograd through weights and losses."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from moebench.core.routing import RoutingContext

        flat = x.reshape(-1, x.shape[-1]).float()
        routing = self.layer.router(flat, RoutingContext(training=self.training))
        total = routing.weight.sum() + 0.0 * flat.sum()  # keeps a graph for content-blind routers
        if routing.is_dense:  # soft routing: its dispatch / combine weights are the router's output
            total = total + routing.dispatch.sum() + routing.combine.sum()
        for loss in routing.aux_losses.values():
            total = total + loss
        return total


def _mixtral_peer(d_model: int, d_hidden: int, num_experts: int, k: int):
    """The Mixtral sparse MoE block of `transformers` (optional peer row), or None if not installed."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=d_hidden,
        num_local_experts=num_experts,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    return MixtralSparseMoeBlock(cfg)


def router_args_at(name: str, k: int, tokens: int, num_experts: int) -> dict:
    """Options that give router ``name`` k experts per token: ``top_k`` where it has one; Soft MoE gets
    k * T / E slots per expert (the bench input is one sequence of T tokens); others (top-p, whose count
    is its own) get none."""
    import inspect

    from moebench.core.registry import ROUTERS

    params = inspect.signature(ROUTERS.get(name).__init__).parameters
    if "top_k" in params:
        return {"top_k": k}
    if "slots_per_expert" in params:
        return {"slots_per_expert": max(1, math.ceil(k * tokens / num_experts))}
    return {}


def bench_layer(
    routers: list[str],
    num_experts: int,
    ks: list[int],
    tokens: int,
    d_model: int,
    d_hidden: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 15,
    peers: bool = True,
) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    rows = []
    bar = Progress(len(ks), "bench layer (one k at a time)", every_s=5, unit="k")
    for k in ks:
        modules = _layer_modules(routers, num_experts, k, tokens, d_model, d_hidden, peers)
        for m in modules.values():
            m.to(device=device, dtype=dtype).train()
        times = time_side_by_side(modules, x.unsqueeze(0), repeats)
        memory = {
            name: step_memory(lambda m=m: _step_time(m, x.unsqueeze(0)), torch.device(device), m.parameters())  # type: ignore[misc]  # mypy cannot type a lambda's default argument
            for name, m in modules.items()
        }
        common = {
            "E": num_experts,
            "k": k,
            "T": tokens,
            "d": d_model,
            "d_hidden": d_hidden,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
        }
        rows += [_layer_row(name, times, memory, common) for name in times]
        bar.update()
    bar.close()
    return rows


def _layer_modules(
    routers: list[str], num_experts: int, k: int, tokens: int, d_model: int, d_hidden: int, peers: bool
) -> dict[str, nn.Module]:
    """What is timed at ``k``: the dense FFN of k experts' width, each router's layer (a router that
    refuses k is skipped) and its router alone, and with ``peers`` Mixtral's block and a dense SwiGLU."""
    modules: dict[str, nn.Module] = {"dense": DenseFFN(d_model, k * d_hidden)}
    for name in routers:
        try:
            modules[name] = MoELayer(
                d_model,
                d_hidden,
                num_experts,
                router=name,
                router_args=router_args_at(name, k, tokens, num_experts),
            )
        except ValueError as err:  # e.g. Switch is top-1 only: no row at this k
            print(f"skip {name} at k={k}: {err}")
    for name in [n for n in routers if n in modules]:
        modules[f"{name} (router only)"] = RouterOnly(cast(MoELayer, modules[name]))
    mixtral = _mixtral_peer(d_model, d_hidden, num_experts, k) if peers else None
    if mixtral is not None:
        modules["mixtral (transformers)"] = mixtral
        modules["dense swiglu"] = DenseSwiGLU(d_model, k * d_hidden)
    return modules


def _layer_row(name: str, times: dict, memory: dict, common: dict) -> dict:
    """One module's row: its time and memory, and their ratios to its reference (the dense FFN, the dense
    SwiGLU for Mixtral, the softmax-topk layer for a router alone)."""
    seconds = times[name]
    base_name = "dense swiglu" if name.startswith("mixtral") else "dense"
    base, base_mem = times[base_name], memory[base_name]
    if name.endswith("(router only)") and "softmax-topk" in times:
        base, base_name = times["softmax-topk"], "softmax-topk layer"  # routing's share of a layer
        base_mem = memory["softmax-topk"]
    mem = memory[name]
    return {
        "router": name,
        **common,
        "ms": round(seconds * 1e3, 2),
        "ratio": round(seconds / base, 3),
        "ratio_to": base_name,
        "saved_mb": round(mem["saved_mb"], 1),
        "saved_ratio": round(mem["saved_mb"] / base_mem["saved_mb"], 3) if base_mem["saved_mb"] else None,
        "peak_mb": None if mem["peak_mb"] is None else round(mem["peak_mb"], 1),
        "peak_ratio": (
            None
            if mem["peak_mb"] is None or not base_mem["peak_mb"]
            else round(mem["peak_mb"] / base_mem["peak_mb"], 3)
        ),
    }


def format_table(rows: list[dict]) -> str:
    cols = [
        "router",
        "E",
        "k",
        "T",
        "d",
        "d_hidden",
        "dtype",
        "ms",
        "ratio",
        "ratio_to",
        "saved_mb",
        "saved_ratio",
        "peak_mb",
        "peak_ratio",
    ]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
