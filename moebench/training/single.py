"""One run without a grid (``moebench train``): its spec from a task's preset, and training it under the
run's lock (the lock the grid launcher takes, so one process trains a run, never two)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moebench.training.rundir import check_inside, run_lock, run_path
from moebench.training.runner import execute
from moebench.training.spec import RunSpec, SpecError, apply_override


def single_spec(
    task: str,
    router: str = "softmax-topk",
    router_args: dict | None = None,
    seed: int = 0,
    size: str | None = "quick",
    steps: int | None = None,
    overrides: Sequence[str] = (),
) -> RunSpec:
    """The spec of one run: the task's preset for ``size``, then ``router`` ("dense": no MoE) with
    ``router_args``, ``seed``, ``steps``, then every ``key.path=value`` override. Unknown names fail
    here, before any record."""
    from moebench.core.registry import ROUTERS, TASKS

    task_cls = TASKS.get(task)
    task_args, model, moe_defaults, train = {}, {}, {}, {}
    if getattr(task_cls, "presets", None):
        preset = task_cls.preset(size)
        task_args, model, moe_defaults, train = (
            dict(p) for p in (preset.task_args, preset.model, preset.moe, preset.train)
        )
    elif size not in (None, "quick"):
        print(f"note: task {task!r} defines no preset sizes; --size {size} ignored", file=sys.stderr)
    if router == "dense":
        moe = None
    else:
        ROUTERS.get(router)  # a typo is an error here, not a failed run record
        if not isinstance(router_args or {}, dict):
            raise SpecError(f"router options must be a mapping such as {{top_k: 1}}, got {router_args!r}")
        moe_defaults = {k: v for k, v in moe_defaults.items() if k not in ("router", "router_args")}
        moe = {**moe_defaults, "router": router, "router_args": dict(router_args or {})}
    if steps is not None:
        train["steps"] = steps
    spec = {
        "grid": "single",
        "task": task,
        "task_args": task_args,
        "model": model,
        "moe": moe,
        "label": router,
        "seed": seed,
        "train": train,
    }
    for assignment in overrides:
        apply_override(spec, assignment)
    return RunSpec.from_dict(spec)


def train_single(spec: RunSpec | dict, results) -> dict | None:
    """Train ``spec`` into ``results/single/<run_id>/`` under its lock (`runner.execute`'s result), or
    None when another process holds the lock. Raises ``UnsafeRecordError`` for a planted link."""
    spec = RunSpec.from_dict(spec)
    run_dir = run_path(results, spec.grid, spec.run_id)
    check_inside(results, run_dir)
    with run_lock(run_dir) as got:
        if not got:
            return None
        return execute(spec, results)
