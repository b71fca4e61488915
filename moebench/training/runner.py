"""Execute one run spec into its record folder.

`execute` never raises for a failing run (it records status failed with the reason and returns), so a
grid goes on with its other runs; it skips a run that is already done, and a rerun of an interrupted
run resumes from its checkpoint (the trainer does that)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import traceback
from pathlib import Path

from moebench.training.records import (
    CorruptRecordError,
    UnsafeRecordError,
    atomic_write_yaml,
    read_json,
    read_status_safe,
    write_status,
)
from moebench.training.rundir import check_inside, record_problem, run_path
from moebench.training.spec import RunSpec, SpecError
from moebench.training.stop import Stopped

MIN_FREE_MB = 100  # below this a run does not start: a checkpoint or record write would fail half-way


def _mount_of(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_problem(path, need_mb: float | None = None) -> str | None:
    """Why the disk holding ``path`` cannot take a run (less than ``need_mb`` MiB free), naming the disk
    (its mount point) and the path; None when there is room or the free space cannot be read."""
    need_mb = MIN_FREE_MB if need_mb is None else need_mb
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free_mb = shutil.disk_usage(probe).free / 2**20
    except OSError:
        return None
    if free_mb >= need_mb:
        return None
    return (
        f"disk full: only {free_mb:.1f} MiB free on the disk mounted at {_mount_of(probe)} (holding "
        f"{path}); a run needs at least {need_mb:g} MiB. Free space there or pass another --results"
    )


def _reason(err: BaseException, run_dir: Path | None = None) -> str:
    """Type, message and the innermost traceback line: enough to tell a bug from a bad option; when the
    disk is (nearly) full, says so first, since the error itself often does not (torch's 'unexpected
    pos 64 vs 0')."""
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    text = f"{type(err).__name__}: {err}{where}"
    disk = disk_problem(run_dir) if run_dir is not None else None
    if disk or (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return f"{disk or f'disk full on the disk holding {run_dir}'} ({text})"
    return text


def infrastructure_failure(err: BaseException, reason: str) -> bool:
    """A failure of the machine, not of the router (out of memory, disk full): a rerun resumes it, up to
    ``executor.max_retries``. Divergence and bugs are not."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return reason.startswith("disk full") or (isinstance(err, OSError) and err.errno == errno.ENOSPC)


def _finished(run_dir: Path) -> dict | None:
    """The final record when the run is done and its final.json reads back, else None."""
    status = read_status_safe(run_dir)
    if not status or status.get("state") != "done" or record_problem(run_dir):
        return None
    try:
        return read_json(run_dir / "final.json")
    except CorruptRecordError:
        return None


def execute(spec: RunSpec | dict, results_dir="results", device=None, progress: bool | None = None) -> dict:
    """Run ``spec`` into ``results_dir/<grid>/<run_id>/``. Returns ``{"state": done|failed, "run_id",
    "run_dir", "reason", "skipped", "final"}``; never raises for a failing run."""
    try:
        run = RunSpec.from_dict(spec)
    except SpecError as err:
        return {
            "state": "failed",
            "run_id": None,
            "run_dir": None,
            "reason": f"invalid spec: {err}",
            "skipped": False,
            "final": None,
        }
    rid = run.run_id
    run_dir = run_path(results_dir, run.grid, rid)
    out = {"state": None, "run_id": rid, "run_dir": str(run_dir), "reason": None, "skipped": False, "final": None}
    try:
        check_inside(results_dir, run_dir)
    except UnsafeRecordError as err:  # nothing is written through a planted link
        return {**out, "state": "failed", "reason": str(err)}
    final = _finished(run_dir)
    if final is not None:
        return {**out, "state": "done", "skipped": True, "final": final}
    from moebench.training.train import data_parallel

    if data_parallel()[0] != 0:  # a data-parallel worker trains in step with rank 0 and writes nothing
        result = _train(run, run_dir, device, False, results_dir)
        return {**out, "state": result.get("state", "done"), "reason": result.get("reason"), "final": None}
    disk = disk_problem(run_dir)
    if disk:
        with contextlib.suppress(OSError):
            write_status(run_dir, "failed", disk, retryable=True)
        return {**out, "state": "failed", "reason": disk}
    try:
        _mark_running(run_dir, run)
        result = _train(run, run_dir, device, progress, results_dir)
    except Stopped as err:  # status stays "running": with the lock gone it reads as interrupted
        return {**out, "state": "stopped", "reason": str(err)}
    except Exception as err:  # a failing run must not stop the grid
        reason = _reason(err, run_dir)
        with contextlib.suppress(OSError):
            write_status(run_dir, "failed", reason, retryable=infrastructure_failure(err, reason))
        return {**out, "state": "failed", "reason": reason}
    if result.get("state") == "failed":
        return {**out, "state": "failed", "reason": result.get("reason")}
    write_status(run_dir, "done", None)
    return {**out, "state": "done", "final": result}


def _mark_running(run_dir: Path, spec: RunSpec) -> None:
    """The run folder with its spec.yaml, and status.json saying this process runs it (one attempt more)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(run_dir / "spec.yaml", spec.to_dict())
    status = read_status_safe(run_dir) or {}
    attempts = int(status.get("attempts", 0) or 0) + 1
    write_status(
        run_dir,
        "running",
        None,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        attempts=attempts,
        retryable=False,
        resumed_from=None,
    )  # train() sets resumed_from when this attempt resumes


def _train(spec: RunSpec, run_dir: Path, device, progress: bool | None, results_dir) -> dict:
    """Build the spec's task and train it (`moebench.training.train.train`), the spec passed whole."""
    from moebench.core.registry import TASKS
    from moebench.training.train import train

    task = TASKS.get(spec.task)(**spec["task_args"])
    return train(task, spec, run_dir, device=device, progress=progress, results=results_dir)
