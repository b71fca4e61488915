"""``moebench routers``: the registered routers, with a one-line description each."""

from __future__ import annotations

from moebench.cli._help import command


def add_parser(sub) -> None:
    command(
        sub,
        "routers",
        "list the registered routers (built-in and plugins)",
        description="List every registered router with its one-line description: the built-in ones "
        "(moebench/routers/) and those that installed packages add through the "
        "'moebench.routers' entry-point group. Use a name in a grid's `routers:` list or "
        "with `moebench train --router NAME`.",
        func=run,
    )


def run(args) -> int:
    from moebench.core.registry import ROUTERS

    rows = ROUTERS.listing()  # read from source: no torch import
    width = max(len(n) for n, _ in rows)
    print(f"{'router'.ljust(width)}  description")
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0
