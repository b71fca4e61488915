"""The ``moebench`` command. Each subcommand's work lives in its own module, imported lazily so
``moebench routers`` does not pay for pandas or submitit."""
from __future__ import annotations

import argparse
import sys


def _cmd_routers(args) -> int:
    from .registry import ROUTERS

    rows = ROUTERS.describe()
    width = max(len(n) for n, _ in rows)
    print(f"{'router'.ljust(width)}  description")
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


def _cmd_tasks(args) -> int:
    from .registry import TASKS

    for name, desc in TASKS.describe():
        print(f"{name:16s}  {desc}")
    return 0


def _lazy(module: str, func: str):
    def run(args):
        import importlib

        return importlib.import_module(f"moebench.{module}").__dict__[func](args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moebench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("routers", help="list registered routers").set_defaults(func=_cmd_routers)
    sub.add_parser("tasks", help="list registered tasks").set_defaults(func=_cmd_tasks)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    layer = bench_sub.add_parser("layer", help="MoE layer vs dense FFN of equal active FLOPs (forward+backward)")
    layer.add_argument("--routers", default="uniform,softmax-topk,ermoe", help="comma-separated router names")
    layer.add_argument("--experts", type=int, default=8)
    layer.add_argument("--top-k", default="2,1", help="comma-separated k values")
    layer.add_argument("--tokens", type=int, default=4096)
    layer.add_argument("--d-model", type=int, default=384)
    layer.add_argument("--d-hidden", type=int, default=1536)
    layer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    layer.add_argument("--device", default="cpu")
    layer.add_argument("--repeats", type=int, default=15)
    layer.add_argument("--json", default=None, help="also write the results as JSON to this file")
    layer.add_argument("--no-peers", action="store_true", help="skip the transformers Mixtral peer row")
    layer.set_defaults(func=_lazy("bench", "cli_bench_layer"))

    train = sub.add_parser("train", help="one run, no grid")
    train.add_argument("--task", required=True)
    train.add_argument("--router", default="softmax-topk", help="router name, or 'dense'")
    train.add_argument("--router-args", default=None, help='JSON or YAML dict, e.g. "{top_k: 1}"')
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--size", default="quick", help="preset size of the task's offline default")
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--results", default="results")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec entry, e.g. --set train.lr=3e-4 (repeatable)")
    train.set_defaults(func=_lazy("runner", "cli_train"))

    grid = sub.add_parser("grid", help="grid files")
    grid_sub = grid.add_subparsers(dest="grid_cmd", required=True)
    show = grid_sub.add_parser("show", help="print a grid's expanded, matched runs")
    show.add_argument("grid", help="YAML file or shipped grid name (e.g. quick)")
    show.set_defaults(func=_lazy("grid", "cli_show"))

    run = sub.add_parser("run", help="run a grid (default: quick) then write its report")
    run.add_argument("grid", nargs="?", default="quick")
    run.add_argument("--cluster", choices=["local", "slurm", "debug"], default=None)
    run.add_argument("--results", default="results")
    run.add_argument("--dry-run", action="store_true")
    run.add_argument("--retry-failed", action="store_true")
    run.add_argument("--no-report", action="store_true")
    run.set_defaults(func=_lazy("launch", "cli_run"))

    status = sub.add_parser("status", help="state of every run under a results folder")
    status.add_argument("results", nargs="?", default="results")
    status.set_defaults(func=_lazy("launch", "cli_status"))

    report = sub.add_parser("report", help="leaderboards and plots from run records")
    report.add_argument("results", nargs="?", default="results")
    report.add_argument("--out", default=None)
    report.add_argument("--format", default="md,csv,html,tex")
    report.set_defaults(func=_lazy("report", "cli_report"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
