"""``moebench tasks``: the registered tasks, with a one-line description each."""

from __future__ import annotations

from moebench.cli._help import command


def add_parser(sub) -> None:
    command(
        sub,
        "tasks",
        "list the registered tasks (built-in and plugins)",
        description="List every registered task with its one-line description: the built-in ones "
        "(moebench/tasks/) and those added through the 'moebench.tasks' entry-point "
        "group. Use a name as a grid's `task:` or with `moebench train --task NAME`.",
        func=run,
    )


def run(args) -> int:
    from moebench.core.registry import TASKS

    for name, desc in TASKS.listing():  # read from source: no torch import
        print(f"{name:16s}  {desc}")
    return 0
