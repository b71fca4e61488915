"""``moebench tasks``: the registered tasks, with a one-line description each."""
from __future__ import annotations

from moebench.cli._help import command


def add_parser(sub) -> None:
    command(sub, "tasks", "list the registered tasks (built-in and plugins)", func=run)


def run(args) -> int:
    from moebench.core.registry import TASKS

    for name, desc in TASKS.listing():  # read from source: no torch import
        print(f"{name:16s}  {desc}")
    return 0
