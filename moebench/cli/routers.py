"""``moebench routers``: the registered routers, with a one-line description each; ``--options NAME``
prints one router's declared options (`Router.options`: default, what it admits, doc)."""

from __future__ import annotations

import sys

from moebench.cli._help import command


def add_parser(sub) -> None:
    p = command(
        sub,
        "routers",
        "list the registered routers (built-in and plugins)",
        description="List every registered router with its one-line description: the built-in ones "
        "(moebench/routers/) and those that installed packages add through the "
        "'moebench.routers' entry-point group. Use a name in a grid's `routers:` list or "
        "with `moebench train --router NAME`. With --options NAME: that router's options (a grid "
        "entry's `args:`), their defaults and what each admits.",
        func=run,
    )
    p.add_argument("--options", metavar="NAME", help="print router NAME's declared options")


def run(args) -> int:
    from moebench.core.registry import ROUTERS

    if getattr(args, "options", None):
        from moebench.core.registry import UnknownNameError

        try:
            return _options(ROUTERS.get(args.options))
        except UnknownNameError as err:
            print(f"moebench routers --options: {err}", file=sys.stderr)
            return 2
    rows = ROUTERS.listing()  # read from source: no torch import
    width = max(len(n) for n, _ in rows)
    print(f"{'router'.ljust(width)}  description")
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


def _options(cls) -> int:
    from moebench.core.config import describe_options

    rows = describe_options(cls.options)
    print(
        f"router {cls.registry_name!r} options (a grid entry's `args:`, `moebench train --set router_args.NAME=...`):"
    )
    if not rows:
        print("  (none declared)")
        return 0
    header = ("option", "default", "admits", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + ("  " + row[3] if row[3] else ""))
    return 0
