"""`moebench bench model`: training throughput of a whole model with MoE layers against its dense twin
(the same model before moefy), side by side in one process.

A training step is forward + backward + AdamW step on random inputs of the config's shape (bf16
autocast on CUDA, as the training loop does). The two models alternate every repeat, so drift in the
machine's speed hits both; the medians' ratio is the result, and it replaces the grids' assumed
"+20 % for the MoE layers". Tokens per sample are those the first MoE layer sees (CLIP: the vision
tower's). Memory: see ``moebench.bench.memory``."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moebench.bench.memory import step_memory
from moebench.core.layer import moe_layers
from moebench.core.models import build_model
from moebench.core.moefy import moefy


@dataclass
class ModelConfig:
    """A full-scale model of a shipped grid: its dense config, its grid's ``moe`` section, its inputs."""

    model: dict
    moe: dict
    inputs: str  # image | clip | volume
    size: int  # image side (2D) or volume side (3D) at full scale
    note: str = ""
    skip: str = ""  # why this config cannot run in this build (empty: it can)
    extra: dict = field(default_factory=dict)


CONFIGS: dict[str, ModelConfig] = {
    "vit-s16": ModelConfig(
        {"family": "timm", "name": "vit_small_patch16_224", "num_classes": 1000},
        {"blocks": "last-2", "num_experts": 8, "d_hidden": 768},
        "image",
        224,
        "imagenet grid: ViT-S/16, MoE in the last 2 blocks",
    ),
    "vit-b16-adapters": ModelConfig(
        {"family": "timm", "name": "vit_base_patch16_224", "num_classes": 1000},
        {"blocks": "last-6", "num_experts": 8},
        "image",
        224,
        "ViT-B/16 with MoE adapters on the last 6 blocks",
        skip="the adapter mode of moefy (issue 11) is not in this build",
    ),
    "clip-b32": ModelConfig(
        {"family": "open_clip", "name": "ViT-B-32"},
        {"blocks": "last-2", "num_experts": 8, "d_hidden": 1536},
        "clip",
        224,
        "retrieval grid: CLIP ViT-B/32, MoE in the last 2 blocks of each tower",
    ),
    "vit3d": ModelConfig(
        {
            "family": "vit3d",
            "img_size": 96,
            "patch_size": 16,
            "embed_dim": 384,
            "depth": 8,
            "num_heads": 6,
            "mlp_ratio": 4.0,
            "num_outputs": 1,
        },
        {"blocks": "last-2", "num_experts": 8, "d_hidden": 768},
        "volume",
        96,
        "brain-age grid: 3D ViT 96^3 / 16^3, MoE in the last 2 blocks",
    ),
}


def _sized(cfg: ModelConfig, size: int | None) -> dict:
    """The model config at input side ``size`` (None: full scale)."""
    model = dict(cfg.model)
    if size is None or size == cfg.size:
        return model
    if cfg.inputs == "image":
        model["img_size"] = size
    elif cfg.inputs == "clip":
        model["force_image_size"] = size
    else:
        model["img_size"] = size
    return model


def _batch(cfg: ModelConfig, model: nn.Module, batch_size: int, size: int, device) -> tuple:
    g = torch.Generator().manual_seed(0)
    if cfg.inputs == "image":
        return (
            torch.randn(batch_size, 3, size, size, generator=g).to(device),
            torch.randint(0, 1000, (batch_size,), generator=g).to(device),
        )
    if cfg.inputs == "clip":
        ctx, vocab = model.context_length, model.vocab_size
        return (
            torch.randn(batch_size, 3, size, size, generator=g).to(device),
            torch.randint(0, vocab, (batch_size, ctx), generator=g).to(device),  # type: ignore[call-overload]  # open_clip's ints, see _loss
        )
    return (
        torch.randn(batch_size, 1, size, size, size, generator=g).to(device),
        torch.randn(batch_size, generator=g).to(device),
    )


def _loss(cfg: ModelConfig, model: nn.Module, batch: tuple) -> torch.Tensor:
    if cfg.inputs == "image":
        return F.cross_entropy(model(batch[0]).float(), batch[1])
    if cfg.inputs == "clip":
        # open_clip's CLIP methods: nn.Module.__getattr__ types them as Tensor | Module
        img = model.encode_image(batch[0], normalize=True).float()  # type: ignore[operator]
        txt = model.encode_text(batch[1], normalize=True).float()  # type: ignore[operator]
        logits = model.logit_scale.exp() * img @ txt.T  # type: ignore[operator]
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return F.mse_loss(model(batch[0]).squeeze(-1).float(), batch[1])


def _train_step(cfg: ModelConfig, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple, device) -> Callable:
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp if amp is not None else torch.autocast("cpu", enabled=False):
            loss = _loss(cfg, model, batch)
        loss = loss + sum((m.aux_loss.float() for m in moe_layers(model)), torch.zeros((), device=device))
        loss.backward()
        opt.step()

    return step


def _timed(step: Callable, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _tokens_per_sample(model: nn.Module, run: Callable, batch_size: int) -> float | None:
    layers = moe_layers(model)
    if not layers:
        return None
    seen: list[float] = []
    handle = layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[:-1].numel() / batch_size))
    with torch.no_grad():
        run()
    handle.remove()
    return seen[0] if seen else None


def bench_model(
    name: str,
    router: str = "softmax-topk",
    top_k: int = 2,
    batch_size: int = 64,
    size: int | None = None,
    device: str = "cpu",
    repeats: int = 10,
    warmup: int = 3,
    compile: bool = False,
    num_experts: int | None = None,
) -> dict:
    """One config, MoE vs dense: median step time, samples/s, tokens/s and memory of each, and ratios."""
    if name not in CONFIGS:
        raise ValueError(f"unknown bench model config {name!r}; choose from {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    if cfg.skip:
        return {"config": name, "skipped": cfg.skip}
    dev = torch.device(device)
    side = size or cfg.size
    torch.manual_seed(0)
    dense = build_model(_sized(cfg, size))
    moe = copy.deepcopy(dense)
    moe_cfg = {**cfg.moe, "router": router, "router_args": {"top_k": top_k}}
    if num_experts:
        moe_cfg["num_experts"] = num_experts
    moefy(moe, **moe_cfg)
    models = {"dense": dense.to(dev).train(), "moe": moe.to(dev).train()}
    batch = _batch(cfg, dense, batch_size, side, dev)
    tokens = _tokens_per_sample(models["moe"], lambda: _loss(cfg, models["moe"], batch), batch_size)
    if compile:
        from moebench.core.compile import compile_blocks

        for m in models.values():
            compile_blocks(m)
    steps = {k: _train_step(cfg, m, torch.optim.AdamW(m.parameters(), lr=1e-4), batch, dev) for k, m in models.items()}
    memory, samples = _measure(steps, models, dev, warmup, repeats)
    row: dict = {
        "config": name,
        "router": router,
        "k": top_k,
        "batch": batch_size,
        "size": side,
        "device": str(dev),
        "compile": compile,
        "tokens_per_sample": tokens,
    }
    _add_measurements(row, samples, memory, batch_size, tokens)
    return row


def _measure(steps: dict, models: dict, dev: torch.device, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Warm up, then the memory of one step and ``repeats`` timings of each model's step, interleaved."""
    for _ in range(warmup):  # also the compile, when on
        for s in steps.values():
            s()
    memory = {k: step_memory(s, dev, models[k].parameters()) for k, s in steps.items()}
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            samples[k].append(_timed(s, dev))
    return memory, samples


def _add_measurements(row: dict, samples: dict, memory: dict, batch_size: int, tokens: float | None) -> None:
    """Median time, throughput and memory of each model, then MoE over dense."""
    for k in samples:
        sec = statistics.median(samples[k])
        row[f"{k}_ms"] = round(sec * 1e3, 2)
        row[f"{k}_samples_per_s"] = round(batch_size / sec, 2)
        row[f"{k}_tokens_per_s"] = None if tokens is None else round(batch_size * tokens / sec, 1)
        row[f"{k}_saved_mb"] = round(memory[k]["saved_mb"], 1)
        row[f"{k}_peak_mb"] = None if memory[k]["peak_mb"] is None else round(memory[k]["peak_mb"], 1)  # type: ignore[arg-type]  # mypy does not narrow memory[k]
    row["time_ratio"] = round(row["moe_ms"] / row["dense_ms"], 3)
    row["saved_mem_ratio"] = round(row["moe_saved_mb"] / row["dense_saved_mb"], 3)
    row["peak_mem_ratio"] = (
        None if row["dense_peak_mb"] is None else round(row["moe_peak_mb"] / row["dense_peak_mb"], 3)
    )


def format_rows(rows: list[dict]) -> str:
    """Dense and MoE side by side, one line per config, with MoE/dense ratios."""
    cols = [
        "config",
        "batch",
        "size",
        "dense_ms",
        "moe_ms",
        "time_ratio",
        "dense_samples_per_s",
        "moe_samples_per_s",
        "moe_tokens_per_s",
        "dense_saved_mb",
        "moe_saved_mb",
        "saved_mem_ratio",
        "dense_peak_mb",
        "moe_peak_mb",
        "peak_mem_ratio",
    ]
    done = [r for r in rows if "skipped" not in r]
    lines = []
    if done:
        widths = {c: max(len(c), *(len(str(r[c])) for r in done)) for c in cols}
        lines.append("  ".join(c.ljust(widths[c]) for c in cols))
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in done]
    lines += [f"skipped {r['config']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(lines)
