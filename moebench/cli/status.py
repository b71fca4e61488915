"""``moebench status``: done / running / failed / queued for every run under a results folder."""

from __future__ import annotations

import sys
from pathlib import Path

from moebench.cli._help import command


def add_parser(sub) -> None:
    p = command(
        sub,
        "status",
        "state of every run under a results folder, with each failure's reason",
        description="One table per grid folder: each run's state (done, running, queued, "
        "interrupted, failed, corrupt), its attempts, and why it failed or from which "
        "step it resumed. Read from the run records alone; works while a grid runs. "
        "Exit status 1 when a run failed or its record is unreadable.",
        func=run,
    )
    p.add_argument(
        "results",
        nargs="?",
        default="results",
        help="a results root holding <grid>/<run_id>/ (e.g. results), or one grid's folder "
        "holding <run_id>/ (e.g. results/quick)",
    )


def run(args) -> int:
    """A table per grid folder; exit 1 if any run failed or is corrupt."""
    from moebench.grids.status import format_table, grid_dirs, status_rows

    root = Path(args.results)
    dirs = grid_dirs(root)
    if not dirs:
        if not root.is_dir():
            print(
                f"{root}: no such folder. `moebench run GRID` writes results/<grid>/<run_id>/; give "
                f"results (every grid) or results/<grid> (one grid)",
                file=sys.stderr,
            )
        else:
            print(
                f"no run records under {root}: looked for {root}/<run_id>/status.json (a grid's folder, "
                f"e.g. results/quick) and {root}/<grid>/<run_id>/status.json (a results root, e.g. "
                f"results). Runs appear there once `moebench run` or `moebench train` starts them.",
                file=sys.stderr,
            )
        return 1
    bad = 0
    for d in dirs:
        rows = status_rows(d)
        print(format_table(rows, title=f"grid {d.name} ({d})"))
        for r in rows:
            if r["state"] == "corrupt":
                print(f"{r['run_id']}: {r['reason']}")
        bad += sum(r["state"] in ("failed", "corrupt") for r in rows)
        print()
    return 1 if bad else 0
