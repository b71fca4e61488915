"""Execute one run spec into its record folder.

`execute` never raises for a failing run (it records status failed with the reason and returns), so a
grid goes on with its other runs; it skips a run that is already done, and a rerun of an interrupted
run resumes from its checkpoint (the trainer does that)."""
from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

from moebench.training.records import CorruptRecordError, atomic_write_yaml, read_json, read_status_safe, write_status
from moebench.training.rundir import run_path
from moebench.training.spec import SpecError, resolve_spec, run_id


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
    run_dir = run_path(results_dir, spec["grid"], rid)
    out = {"state": None, "run_id": rid, "run_dir": str(run_dir), "reason": None, "skipped": False, "final": None}
    final = _finished(run_dir)
    if final is not None:
        return {**out, "state": "done", "skipped": True, "final": final}
    from moebench.training.train import data_parallel

    if data_parallel()[0] != 0:  # a data-parallel worker trains in step with rank 0 and writes nothing
        from moebench.core.registry import TASKS
        from moebench.training.train import train

        result = train(TASKS.get(spec["task"])(**spec["task_args"]), spec, run_dir, device=device, progress=False)
        return {**out, "state": result.get("state", "done"), "reason": result.get("reason"), "final": None}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(run_dir / "spec.yaml", spec)
    attempts = int((read_status_safe(run_dir) or {}).get("attempts", 0)) + 1
    write_status(run_dir, "running", None, owner=f"{socket.gethostname()}:{os.getpid()}", attempts=attempts)
    try:
        from moebench.core.registry import TASKS
        from moebench.training.train import train

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
