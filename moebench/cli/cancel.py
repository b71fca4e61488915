"""``moebench cancel``: stop the runs of a results folder (or one grid of it) that are training now
(what it does: `moebench.grids.cancel`; this module parses the arguments and prints)."""

from __future__ import annotations

import sys
from pathlib import Path

from moebench.cli._help import command


def add_parser(sub) -> None:
    p = command(
        sub,
        "cancel",
        "stop the running and queued jobs of a results folder (local and SLURM)",
        func=run,
        description="Stop what is training under RESULTS (or RESULTS/GRID): local runs "
        "checkpoint and exit (a rerun resumes them); SLURM jobs are cancelled with scancel.",
    )
    p.add_argument("results", help="a results folder (holding <grid>/<run_id>/) or one grid's folder")
    p.add_argument("grid", nargs="?", default=None, help="only this grid (a folder name under RESULTS)")


def run(args) -> int:
    """Exit 0 when something was asked to stop or nothing was running; 1 when scancel failed; 2 for a
    missing folder."""
    from moebench.grids.cancel import cancel

    root = Path(args.results) / args.grid if args.grid else Path(args.results)
    if not root.is_dir():
        print(
            f"error: {root} is not a folder; give the results folder (and optionally a grid name in it)",
            file=sys.stderr,
        )
        return 2
    done = cancel(root)
    for error, text in done.lines:
        print(text, file=sys.stderr if error else sys.stdout)
    if not done.stopped and not done.failed:
        print(f"nothing is training under {root}")
    return 1 if done.failed else 0
