"""``moebench grid show``: a grid's expanded, matched runs and their costs, without running them."""

from __future__ import annotations

import sys

from moebench.cli._help import SET_HELP, command


def add_parser(sub) -> None:
    grid = command(
        sub,
        "grid",
        "inspect grid files (what a grid expands to, before running it)",
        description="Inspect a grid file without running it. A grid (YAML) fixes a task, model, "
        "data, budget and seeds, and lists the routers to compare; see "
        "`moebench grid show quick`.",
    )
    grid_sub = grid.add_subparsers(
        dest="grid_cmd", required=True, metavar="SUBCOMMAND", help="show: the expanded runs and their costs"
    )
    show = command(
        grid_sub,
        "show",
        "print a grid's expanded, matched runs with their FLOPs and parameters",
        description="Print one row per run the grid expands to (router x seed x sweep), with the "
        "expert width that FLOP matching gave it, the MLP and router FLOPs per token, "
        "and the total and active parameters. Nothing is trained; the models are "
        "built once to count. Refuses placeholder paths (/path/to/...) left in the "
        "grid; --set gives a value without editing the file.",
        func=run,
    )
    show.add_argument("grid", help="a YAML grid file, or the name of a shipped grid (e.g. quick, toy, imagenet)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def run(args) -> int:
    print(
        f"moebench grid show: loading {args.grid} (imports torch and the task modules: a few seconds)",
        file=sys.stderr,
        flush=True,
    )
    from moebench.grids.schema import GridError, load
    from moebench.grids.show import show

    try:
        print(show(load(args.grid, overrides=args.set)))
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
