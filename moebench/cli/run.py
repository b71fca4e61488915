"""``moebench run``: expand a grid, launch its runs with submitit, then write the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moebench.cli._help import SET_HELP, command

DEFAULT_GRID = "quick"
#: what `moebench run` with no GRID runs, in order: the pretrained-regime benchmark, then the ground-truth
#: structure track (each with its own results folder and report)
DEFAULT_GRIDS = (DEFAULT_GRID, "structure")


def add_parser(sub) -> None:
    p = command(
        sub,
        "run",
        f"run a grid (default: {', then '.join(DEFAULT_GRIDS)}), then write its report",
        description=f"Expand a grid into matched runs, run what is not done yet (resuming interrupted "
        f"runs from their checkpoints, skipping finished ones), then write "
        f"RESULTS/<grid>/report/. With no GRID, runs the shipped '{DEFAULT_GRID}' grid on "
        f"the offline defaults (CPU, minutes), then the 'structure' grid (ground-truth routing). Rerunning the same command is safe: it "
        f"picks up where the last one stopped.",
        func=run,
    )
    p.add_argument(
        "grid",
        nargs="?",
        default=None,
        help="a YAML grid file, or the name of a shipped grid (see `moebench grid show NAME`) "
        f"(default: {', then '.join(DEFAULT_GRIDS)})",
    )
    p.add_argument(
        "--cluster",
        choices=["local", "slurm", "debug"],
        default=None,
        help="where jobs run: local subprocesses, a SLURM job array, or in-process (debug); "
        "default: the grid's executor.cluster, where auto means local unless the grid "
        "declares executor.partition and SLURM answers",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--results", default="results", help="results root; runs go to RESULTS/<grid>/<run_id>/")
    p.add_argument("--dry-run", action="store_true", help="print what would run and where, run nothing")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun runs that failed before (by default they are skipped and listed)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report afterwards")


def _write_report(grid_dir: Path) -> str | None:
    from moebench.report.build import write_report

    out = grid_dir / "report"
    print(f"writing the report to {out} (under a minute for the shipped grids on 2 cores)", flush=True)
    try:
        write_report(grid_dir, out)
    except Exception as err:  # noqa: BLE001 - the runs are safe on disk; say what broke
        print(
            f"report failed: {type(err).__name__}: {err}; rerun it with `moebench report {grid_dir}`", file=sys.stderr
        )
        return None
    print(f"report: {out}")
    return str(out)


def run(args) -> int:
    """Run ``args.grid``, or each of `DEFAULT_GRIDS` in turn; the worst exit code wins."""
    if args.grid is not None:
        return run_one(args)
    worst = 0
    for name in DEFAULT_GRIDS:
        print(f"== moebench run {name} ==", flush=True)
        code = run_one(argparse.Namespace(**{**vars(args), "grid": name}))
        if code in (2, 130):  # a bad grid or an interrupt: stop here
            return code
        worst = max(worst, code)
    return worst


def run_one(args) -> int:
    """Exit 0 when every run is done (or running elsewhere) and the report was written; 1 if any run
    failed, is left to run, or the report could not be written; 2 for a bad grid or unusable cluster."""
    from moebench.grids.launch import run_grid
    from moebench.grids.schema import GridError, load
    from moebench.training.stop import Stopped

    try:
        out = run_grid(
            load(args.grid, overrides=args.set),
            cluster=args.cluster,
            results=args.results,
            dry_run=args.dry_run,
            retry_failed=args.retry_failed,
        )
    except Stopped as err:  # SIGINT / SIGTERM: the jobs checkpointed; no report of a half-run grid
        print(f"{err}", file=sys.stderr)
        return 130
    except (GridError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk while writing the plan; name the file, no traceback
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: cannot write the grid's records{where}: {err.strerror or err}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    ok = out["counts"]["failed"] == 0 and out["counts"]["queued"] == 0
    if not args.no_report and _write_report(Path(out["results"])) is None:
        ok = False
    return 0 if ok else 1
