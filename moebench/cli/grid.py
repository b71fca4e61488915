"""``moebench grid show``: a grid's expanded, matched runs and their costs, without running them."""
from __future__ import annotations

import sys

from moebench.cli._help import command


def add_parser(sub) -> None:
    grid = sub.add_parser("grid", help="inspect grid files", description="Inspect grid files.")
    grid_sub = grid.add_subparsers(dest="grid_cmd", required=True, metavar="SUBCOMMAND")
    show = command(grid_sub, "show", "print a grid's expanded, matched runs with their FLOPs and parameters",
                   func=run)
    show.add_argument("grid", help="a YAML grid file, or the name of a shipped grid (e.g. quick, toy, imagenet)")


def run(args) -> int:
    print(f"moebench grid show: loading {args.grid} (imports torch and the task modules: a few seconds)",
          file=sys.stderr, flush=True)
    from moebench.grids.schema import GridError
    from moebench.grids.show import show

    try:
        print(show(args.grid))
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
