"""A run's folder: where it lives, who owns it (an exclusive flock), and what state its records say.

Shared by the launcher, ``moebench train``, ``moebench status`` and the report, so all of them read a
run folder the same way.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from moebench.training import records

LOCK_NAME = ".lock"
JOBS_LOG = "jobs.jsonl"
STALE_DIR = ".stale"


def run_path(results, grid: str, run_id: str) -> Path:
    """``<results>/<grid>/<run_id>``: the one place a run folder's path is built."""
    return Path(results) / grid / run_id


# -- run ownership -----------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(run_dir, wait_s: float = 0.0):
    """Yield True while holding the exclusive lock of ``run_dir``, False if another process holds it
    (after retrying for ``wait_s`` seconds, which rides over a launcher's brief probe)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    got = False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        if got:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        yield got
    finally:
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_held(run_dir) -> bool:
    """True when a live process holds the run's lock (probes by trying to take it for an instant)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


# -- reading a run's state ---------------------------------------------------------------------------
def run_dir_of(spec: dict, results) -> Path:
    """The folder of ``spec``'s run under ``results``."""
    from moebench.training.spec import run_id

    return run_path(results, spec["grid"], run_id(spec))


def inspect(run_dir) -> dict:
    """The run's state as the launcher sees it: ``state`` (new, queued, running, interrupted, done,
    failed, corrupt), ``reason``, ``attempts`` and, when corrupt, ``corrupt`` (what is unreadable)."""
    run_dir = Path(run_dir)
    out = {"state": "new", "reason": None, "attempts": 0, "corrupt": None}
    try:
        status = records.read_status(run_dir)
    except records.CorruptRecordError as err:
        return {**out, "state": "corrupt", "corrupt": str(err)}
    if status is None:
        return {**out, "state": "running" if lock_held(run_dir) else "new"}
    if not isinstance(status, dict) or status.get("state") not in records.STATES:
        return {**out, "state": "corrupt",
                "corrupt": f"{run_dir / 'status.json'}: no valid 'state' (one of {', '.join(records.STATES)})"}
    out.update(state=status["state"], reason=status.get("reason"), attempts=status.get("attempts") or 0)
    if status["state"] == "done":
        try:
            final = records.read_json(run_dir / "final.json")
        except records.CorruptRecordError as err:
            return {**out, "state": "corrupt", "corrupt": str(err)}
        if not isinstance(final, dict):
            return {**out, "state": "corrupt",
                    "corrupt": f"{run_dir / 'final.json'}: missing although status.json says done"}
    elif status["state"] in ("running", "queued") and not lock_held(run_dir):
        if status["state"] == "running":
            out.update(state="interrupted", reason="no live process holds the run (killed or crashed)")
    elif status["state"] == "queued" and lock_held(run_dir):
        out["state"] = "running"
    return out


def _set_aside(run_dir: Path, names) -> Path | None:
    """Move unusable record files to ``.stale/<time>/`` (kept for inspection, out of the reader's way)."""
    present = [n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    dest = run_dir / STALE_DIR / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    dest.mkdir(parents=True, exist_ok=True)
    for n in present:
        os.replace(run_dir / n, dest / n)
    return dest


