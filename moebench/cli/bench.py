"""``moebench bench layer``: the MoE layer against a dense FFN of equal active FLOPs, side by side."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moebench.cli._help import command


def add_parser(sub) -> None:
    bench = command(sub, "bench", "benchmarks, timed side by side in one process",
                    description="Benchmarks, timed side by side in one process (interleaved, median of "
                                "repeats) and printed as ratios, so the machine's speed cancels out.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK",
                                     help="layer: one MoE layer per router against a dense FFN")
    layer = command(bench_sub, "layer", "MoE layer vs dense FFN of equal active FLOPs (forward + backward)",
                    description="Time one MoE layer per router (forward + backward) against a dense FFN "
                                "of the same active FLOPs per token (hidden width k x d_hidden), and each "
                                "router alone as a share of the softmax-topk layer. Prints a table, then "
                                "the rows as JSON.", func=run_layer)
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


def run_layer(args) -> int:
    import torch

    from moebench.bench.layer import bench_layer, format_table
    from moebench.core.registry import ROUTERS

    routers = [r for r in args.routers.split(",") if r]
    print(f"moebench bench layer: {', '.join(routers)} vs dense, k = {args.top_k}, {args.repeats} timed steps each",
          file=sys.stderr, flush=True)
    for r in routers:
        ROUTERS.get(r)  # clear error for an unknown name before any timing
    rows = bench_layer(routers, args.experts, [int(k) for k in args.top_k.split(",")], args.tokens, args.d_model,
                       args.d_hidden, getattr(torch, args.dtype), args.device, args.repeats, peers=not args.no_peers)
    print(format_table(rows))
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
