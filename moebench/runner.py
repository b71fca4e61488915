"""Execute one run spec into its record folder, and the ``moebench train`` command.

`execute` never raises for a failing run (it records status failed with the reason and returns), so a
grid goes on with its other runs; it skips a run that is already done, and a rerun of an interrupted
run resumes from its checkpoint (the trainer does that)."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import yaml

from .records import CorruptRecordError, atomic_write_yaml, read_json, read_status_safe, write_status
from .spec import SpecError, apply_override, resolve_spec, run_id


def run_dir_for(spec: dict, results_dir) -> Path:
    """``results_dir/<grid>/<run_id>`` of a spec."""
    s = resolve_spec(spec)
    return Path(results_dir) / s["grid"] / run_id(s)


def _reason(err: BaseException) -> str:
    """Type, message and the innermost traceback line: enough to tell a bug from a bad option."""
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"{type(err).__name__}: {err}{where}"


def _finished(run_dir: Path) -> dict | None:
    """The final record when the run is done and its final.json reads back, else None."""
    status = read_status_safe(run_dir)
    if not status or status.get("state") != "done":
        return None
    try:
        return read_json(run_dir / "final.json")
    except CorruptRecordError:
        return None


def execute(spec: dict, results_dir="results", device=None, progress: bool | None = None) -> dict:
    """Run ``spec`` into ``results_dir/<grid>/<run_id>/``. Returns ``{"state": done|failed, "run_id",
    "run_dir", "reason", "skipped", "final"}``; never raises for a failing run."""
    try:
        spec = resolve_spec(spec)
    except SpecError as err:
        return {"state": "failed", "run_id": None, "run_dir": None, "reason": f"invalid spec: {err}",
                "skipped": False, "final": None}
    rid = run_id(spec)
    run_dir = Path(results_dir) / spec["grid"] / rid
    out = {"state": None, "run_id": rid, "run_dir": str(run_dir), "reason": None, "skipped": False, "final": None}
    final = _finished(run_dir)
    if final is not None:
        return {**out, "state": "done", "skipped": True, "final": final}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(run_dir / "spec.yaml", spec)
    attempts = int((read_status_safe(run_dir) or {}).get("attempts", 0)) + 1
    write_status(run_dir, "running", None, owner=f"{socket.gethostname()}:{os.getpid()}", attempts=attempts)
    try:
        from .registry import TASKS
        from .train import train

        task = TASKS.get(spec["task"])(**spec["task_args"])
        result = train(task, spec, run_dir, device=device, progress=progress)
    except Exception as err:  # a failing run must not stop the grid
        reason = _reason(err)
        write_status(run_dir, "failed", reason)
        return {**out, "state": "failed", "reason": reason}
    if result.get("state") == "failed":
        return {**out, "state": "failed", "reason": result.get("reason")}
    write_status(run_dir, "done", None)
    return {**out, "state": "done", "final": result}


# ----------------------------------------------------------------------------------------------------
# `moebench train`

def spec_from_args(args) -> dict:
    """The spec ``moebench train`` runs: the task's preset for ``--size`` (see `preset` in the report
    / Task docs), then --router / --router-args / --seed / --steps, then every --set."""
    from .registry import TASKS

    task_cls = TASKS.get(args.task)
    task_args, model, moe_defaults, train = {}, {}, {}, {}
    if getattr(task_cls, "presets", None):
        preset = task_cls.preset(args.size)
        if not (isinstance(preset, tuple) and len(preset) == 4):
            raise SpecError(
                f"{task_cls.__name__}.preset({args.size!r}) must return (task_args, model, moe_defaults, train), "
                f"got {type(preset).__name__}"
            )
        task_args, model, moe_defaults, train = (dict(p or {}) for p in preset)
    elif args.size not in (None, "quick"):
        print(f"note: task {args.task!r} defines no preset sizes; --size {args.size} ignored", file=sys.stderr)
    if args.router == "dense":
        moe = None
    else:
        router_args = {}
        if args.router_args:
            try:
                router_args = yaml.safe_load(args.router_args)
            except yaml.YAMLError as err:
                raise SpecError(f"--router-args {args.router_args!r} is not valid YAML / JSON: {err}") from err
            if not isinstance(router_args, dict):
                raise SpecError(f"--router-args must be a mapping such as \"{{top_k: 1}}\", got {args.router_args!r}")
        moe_defaults = {k: v for k, v in moe_defaults.items() if k not in ("router", "router_args")}
        moe = {**moe_defaults, "router": args.router, "router_args": router_args}
    if args.steps is not None:
        train["steps"] = args.steps
    spec = {"grid": "single", "task": args.task, "task_args": task_args, "model": model, "moe": moe,
            "label": args.router, "seed": args.seed, "train": train}
    for assignment in args.set or []:
        apply_override(spec, assignment)
    return resolve_spec(spec)


def cli_train(args) -> int:
    """``moebench train``: one run, no grid; prints the headline and where the record is."""
    try:
        spec = spec_from_args(args)
    except (SpecError, ValueError, KeyError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = execute(spec, args.results)
    run_dir = result["run_dir"]
    if result["state"] != "done":
        print(f"run {result['run_id']} failed: {result['reason']}", file=sys.stderr)
        if run_dir:
            print(f"record: {run_dir}", file=sys.stderr)
        return 1
    final = result["final"]
    h = final["headline"]
    arrow = "higher is better" if h["higher_is_better"] else "lower is better"
    note = " (already done; skipped)" if result["skipped"] else ""
    print(f"{final['task']} / {final['label']} seed {final['seed']}: {h['name']} = {h['value']:.4f} ({arrow}){note}")
    print(f"record: {run_dir}")
    return 0
