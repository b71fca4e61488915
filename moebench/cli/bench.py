"""``moebench bench layer`` / ``model``: an MoE layer against a dense FFN of equal active FLOPs, and a
whole model's training step against its dense twin, each timed side by side in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moebench.cli._help import command


def add_parser(sub) -> None:
    bench = command(
        sub,
        "bench",
        "benchmarks, timed side by side in one process",
        description="Benchmarks, timed side by side in one process (interleaved, median of "
        "repeats) and printed as ratios, so the machine's speed cancels out.",
    )
    bench_sub = bench.add_subparsers(
        dest="bench", required=True, metavar="BENCHMARK", help="layer: one MoE layer per router against a dense FFN"
    )
    _add_layer_parser(bench_sub)
    _add_model_parser(bench_sub)


def _add_layer_parser(bench_sub) -> None:
    layer = command(
        bench_sub,
        "layer",
        "MoE layer vs dense FFN of equal active FLOPs (forward + backward)",
        description="Time one MoE layer per router (forward + backward) against a dense FFN "
        "of the same active FLOPs per token (hidden width k x d_hidden), and each "
        "router alone as a share of the softmax-topk layer. Prints a table, then "
        "the rows as JSON.",
        func=run_layer,
    )
    layer.add_argument("--routers", default="uniform,softmax-topk,ermoe", help="comma-separated router names")
    layer.add_argument("--experts", type=int, default=8, help="number of experts E")
    layer.add_argument("--top-k", default="2,1", help="comma-separated k values (experts per token)")
    layer.add_argument("--tokens", type=int, default=4096, help="tokens per step T")
    layer.add_argument("--d-model", type=int, default=384, help="model width d")
    layer.add_argument("--d-hidden", type=int, default=1536, help="dense FFN hidden width; experts get d_hidden / k")
    layer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and input dtype")
    layer.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    layer.add_argument("--repeats", type=int, default=15, help="timed steps per module (interleaved)")
    layer.add_argument("--json", default=None, help="also write the results as JSON to this file")
    layer.add_argument("--no-peers", action="store_true", help="skip the transformers Mixtral peer row")
    layer.add_argument(
        "--preset",
        default=None,
        choices=sorted(LAYER_PRESETS),
        help="realistic sizes: "
        + "; ".join(f"{k}: {v['doc']}" for k, v in sorted(LAYER_PRESETS.items()))
        + " (sets --d-model, --d-hidden, --tokens; bf16 on cuda, float32 on cpu)",
    )


def _add_model_parser(bench_sub) -> None:
    model = command(
        bench_sub,
        "model",
        "a model's training step (samples/s, tokens/s, memory): MoE vs its dense twin",
        func=run_model,
    )
    model.add_argument(
        "--configs",
        default="vit-s16,vit-b16-adapters,clip-b32,vit3d",
        help="comma-separated configs: vit-s16, vit-b16-adapters, clip-b32, vit3d",
    )
    model.add_argument("--router", default="softmax-topk", help="router of the MoE layers")
    model.add_argument("--top-k", type=int, default=2, help="experts per token")
    model.add_argument("--experts", type=int, default=None, help="experts per layer; default: the grid's (8)")
    model.add_argument("--batch-size", type=int, default=64, help="samples per step (use 2-8 on a CPU)")
    model.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side in pixels / voxels (default: full scale, 224 / 96); e.g. 64 / 32 on a CPU",
    )
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    model.add_argument("--repeats", type=int, default=10, help="timed steps per model (interleaved)")
    model.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (and the compile)")
    model.add_argument("--compile", action="store_true", help="torch.compile every block (as train.compile does)")
    model.add_argument("--json", default=None, help="also write the results as JSON to this file")


LAYER_PRESETS = {
    "vit-s": {
        "d_model": 384,
        "d_hidden": 1536,
        "tokens": 32768,
        "doc": "d=384, h=1536 (ViT-S), T=32768 (a batch of 164 ViT-S/16 images)",
    },
    "vit-b": {"d_model": 768, "d_hidden": 3072, "tokens": 32768, "doc": "d=768, h=3072 (ViT-B), T=32768"},
    "vit-b-large-batch": {
        "d_model": 768,
        "d_hidden": 3072,
        "tokens": 200704,
        "doc": "d=768, h=3072, T=200704 (1024 ViT-B/16 images of 196 patches)",
    },
}


def run_layer(args) -> int:
    import torch

    from moebench.bench.layer import bench_layer, format_table
    from moebench.core.registry import ROUTERS

    routers = [r for r in args.routers.split(",") if r]
    print(
        f"moebench bench layer: {', '.join(routers)} vs dense, k = {args.top_k}, {args.repeats} timed steps each",
        file=sys.stderr,
        flush=True,
    )
    for r in routers:
        ROUTERS.get(r)  # clear error for an unknown name before any timing
    if args.preset:
        preset = LAYER_PRESETS[args.preset]
        args.d_model, args.d_hidden, args.tokens = preset["d_model"], preset["d_hidden"], preset["tokens"]
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    rows = bench_layer(
        routers,
        args.experts,
        [int(k) for k in args.top_k.split(",")],
        args.tokens,
        args.d_model,
        args.d_hidden,
        getattr(torch, args.dtype),
        args.device,
        args.repeats,
        peers=not args.no_peers,
    )
    print(format_table(rows))
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def run_model(args) -> int:
    from moebench.bench.model import CONFIGS, bench_model, format_rows
    from moebench.core.registry import ROUTERS

    names = [c for c in args.configs.split(",") if c]
    for name in names:
        if name not in CONFIGS:
            print(f"error: --configs: unknown config {name!r}; choose from {', '.join(CONFIGS)}")
            return 2
    ROUTERS.get(args.router)
    rows = []
    for name in names:
        rows.append(
            bench_model(
                name,
                args.router,
                args.top_k,
                args.batch_size,
                args.size,
                args.device,
                args.repeats,
                args.warmup,
                args.compile,
                args.experts,
            )
        )
        print(format_rows(rows[-1:]), flush=True)
    print(format_rows(rows))
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
