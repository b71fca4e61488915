"""``moebench train``: one run, no grid; the spec comes from the task's preset plus the flags."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from moebench.cli._help import command

if TYPE_CHECKING:
    from moebench.training.spec import RunSpec

SIZES = ("tiny", "quick")


def add_parser(sub) -> None:
    p = command(
        sub,
        "train",
        "train one run (no grid) and print its headline metric",
        func=run,
        description="Train one run, no grid. The record goes to RESULTS/single/<run_id>/ "
        "(RESULTS defaults to ./results under the current folder). A rerun of the "
        "same spec skips it when done and resumes it when interrupted.",
    )
    p.add_argument("--task", required=True, help="registered task name (see `moebench tasks`); required")
    p.add_argument("--router", default="softmax-topk", help="router name (see `moebench routers`), or 'dense'")
    p.add_argument(
        "--router-args",
        default=None,
        help='router options as a JSON or YAML mapping, e.g. "{top_k: 1}" (default: the router\'s own)',
    )
    p.add_argument("--seed", type=int, default=0, help="the run's seed (model init, data order)")
    p.add_argument(
        "--size",
        default="quick",
        choices=SIZES,
        help="the task's preset size for its offline default: tiny (seconds, for tests) or quick",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's for --size)")
    p.add_argument("--results", default="results", help="results root; the run goes to RESULTS/single/<run_id>/")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec entry, e.g. --set train.lr=3e-4 (repeatable)",
    )


def spec_from_args(args) -> RunSpec:
    """The spec ``moebench train`` runs (`moebench.training.single.single_spec` from the flags)."""
    import yaml

    from moebench.core.registry import ROUTERS, TASKS
    from moebench.training.single import single_spec
    from moebench.training.spec import SpecError

    TASKS.get(args.task)  # name errors come before option errors, as they always did
    if args.router != "dense":
        ROUTERS.get(args.router)
    router_args = {}
    if args.router != "dense" and args.router_args:
        try:
            router_args = yaml.safe_load(args.router_args)
        except yaml.YAMLError as err:
            raise SpecError(f"--router-args {args.router_args!r} is not valid YAML / JSON: {err}") from err
        if not isinstance(router_args, dict):
            raise SpecError(f'--router-args must be a mapping such as "{{top_k: 1}}", got {args.router_args!r}')
    return single_spec(args.task, args.router, router_args, args.seed, args.size, args.steps, args.set or [])


def run(args) -> int:
    """Prints the headline and where the record is; exit 1 when the run failed, 2 for a bad flag."""
    print(
        f"moebench train: {args.task} / {args.router}, size {args.size}: loading torch and the task",
        file=sys.stderr,
        flush=True,
    )
    from moebench.training.records import UnsafeRecordError
    from moebench.training.rundir import run_path
    from moebench.training.single import train_single
    from moebench.training.spec import SpecError

    try:
        spec = spec_from_args(args)
    except (SpecError, ValueError, KeyError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = run_path(args.results, spec.grid, spec.run_id)
    try:
        result = train_single(spec, args.results)
    except UnsafeRecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result is None:
        print(
            f"error: run {run_dir.name} is being trained by another process (it holds "
            f"{run_dir / '.lock'}); wait for it, or see `moebench status {args.results}`",
            file=sys.stderr,
        )
        return 1
    run_dir = result["run_dir"]
    if result["state"] == "stopped":
        print(f"run {result['run_id']} {result['reason']}; record: {run_dir}", file=sys.stderr)
        return 130
    if result["state"] != "done":
        print(f"run {result['run_id']} failed: {result['reason']}", file=sys.stderr)
        if run_dir:
            print(f"record: {run_dir}", file=sys.stderr)
        return 1
    final = result["final"]
    h = final["headline"]
    arrow = "higher is better" if h["higher_is_better"] else "lower is better"
    note = " (already done; skipped)" if result["skipped"] else ""
    print(f"{final['task']} / {final['label']} seed {final['seed']}: {h['name']} = {h['value']:.4f} ({arrow}){note}")
    print(f"record: {run_dir}")
    return 0
