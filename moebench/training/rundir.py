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


def check_inside(results, run_dir) -> None:
    """Refuse a run folder that is a symbolic link or resolves outside the results root: a planted link
    would send every record write (and the run's checkpoint) to wherever it points."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise records.UnsafeRecordError(
            f"run folder {run_dir} is a symbolic link; refusing to use it (remove the link and rerun)"
        )
    root = Path(results).resolve()
    real = run_dir.resolve()
    if real != root and root not in real.parents:
        raise records.UnsafeRecordError(
            f"run folder {run_dir} leads to {real}, outside the results folder "
            f"{root}; refusing to use it (remove the link and rerun)"
        )


# -- run ownership -----------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(run_dir, wait_s: float = 0.0):
    """Yield True while holding the exclusive lock of ``run_dir``, False if another process holds it
    (after retrying for ``wait_s`` seconds, which rides over a launcher's brief probe)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise records.UnsafeRecordError(
            f"run folder {run_dir} is a symbolic link; refusing to use it (remove the link and rerun)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = records.open_nofollow(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
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
    if not path.exists() or path.is_symlink():
        return False
    fd = records.open_nofollow(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


def lock_owner(run_dir) -> tuple[str, int] | None:
    """(host, pid) of the live process holding the run's lock, as it wrote them; None when unheld."""
    if not lock_held(run_dir):
        return None
    try:
        fd = records.open_nofollow(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
        with os.fdopen(fd, "r") as f:
            host, _, pid = f.read(200).strip().rpartition(":")
        return host, int(pid)
    except (OSError, ValueError, records.UnsafeRecordError):
        return None


def ask_to_stop(run_dir) -> int | None:
    """Send SIGINT to the process training the run when it runs on this host: it checkpoints after its
    current step and exits (``moebench.training.stop``). Returns its pid, or None when none was asked."""
    import signal

    owner = lock_owner(run_dir)
    if owner is None or owner[0] != socket.gethostname():
        return None
    try:
        os.kill(owner[1], signal.SIGINT)
    except ProcessLookupError:
        return None
    return owner[1]


# -- reading a run's state ---------------------------------------------------------------------------
def run_dir_of(spec, results) -> Path:
    """The folder of ``spec``'s run (a `RunSpec` or a spec dict) under ``results``."""
    from moebench.training.spec import RunSpec

    spec = RunSpec.from_dict(spec)
    return run_path(results, spec.grid, spec.run_id)


# -- the one validator of a run folder (launcher, `moebench status`, report) --------------------------
FINAL_FIELDS = ("run_id", "task", "label", "seed", "headline", "metrics")


def spec_problem(run_dir, require_resolvable: bool = True) -> str | None:
    """Why ``spec.yaml`` cannot be trusted (unparsable, not a valid spec, or its hash is not the folder
    name), or None; a missing spec.yaml is no problem here (the launcher writes it before a run).
    ``require_resolvable=False`` (the report) accepts a spec the current schema cannot resolve, e.g.
    one written by an older version, and a folder not named like a run id (hand-made records); a
    folder the launcher named (``<label>-s<seed>-<10 hex>``) must still hash to its name."""
    import re

    from moebench.training.spec import run_id

    run_dir = Path(run_dir)
    path = run_dir / "spec.yaml"
    try:
        spec = records.read_spec(run_dir)
    except records.CorruptRecordError as err:
        return str(err)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return f"{path}: not a mapping of spec keys"
    if not require_resolvable and not re.fullmatch(r".+-s\d+-[0-9a-f]{10}", run_dir.name):
        return None
    try:
        rid = run_id(spec)
    except Exception as err:  # noqa: BLE001 - any resolve error means the spec is not usable
        return f"{path}: not a valid run spec ({err})" if require_resolvable else None
    if rid != run_dir.name:
        return f"{path}: describes run {rid}, not {run_dir.name} (copied from another run or edited)"
    return None


def record_problem(run_dir, require_resolvable: bool = True) -> str | None:
    """Why a finished record is not to be counted, or None when all of these agree: final.json parses
    and holds the fields the report needs; its run_id is the folder name and its label / seed are
    spec.yaml's; spec.yaml hashes to the folder name (see `spec_problem`); every metrics.jsonl line
    parses (a torn tail means the run was killed after its last append)."""
    run_dir = Path(run_dir)
    path = run_dir / "final.json"
    try:
        final = records.read_json(path)
    except records.CorruptRecordError as err:
        return str(err)
    if not isinstance(final, dict):
        return f"{path}: missing although status.json says done"
    missing = [k for k in FINAL_FIELDS if k not in final]
    if missing:
        return f"{path}: lacks {', '.join(missing)}"
    head = final["headline"]
    if not (
        isinstance(head, dict)
        and isinstance(head.get("name"), str)
        and isinstance(head.get("value"), (int, float))
        and not isinstance(head.get("value"), bool)
    ):
        return f"{path}: headline is not {{name, value, higher_is_better}}"
    if final["run_id"] != run_dir.name:
        return f"{path}: belongs to run {final['run_id']!r}, not {run_dir.name!r} (copied from another run?)"
    problem = spec_problem(run_dir, require_resolvable)
    if problem:
        return problem
    try:
        spec = records.read_spec(run_dir)
    except records.CorruptRecordError as err:  # pragma: no cover - spec_problem read it already
        return str(err)
    if isinstance(spec, dict):
        for key in ("label", "seed"):
            if key in spec and spec[key] != final[key]:
                return f"{path}: {key} {final[key]!r} differs from spec.yaml's {spec[key]!r}"
    elif require_resolvable:
        return f"{run_dir / 'spec.yaml'}: missing although the run is done"
    try:
        records.read_jsonl(run_dir / "metrics.jsonl", strict=True)
    except records.CorruptRecordError as err:
        return str(err)
    return None


def inspect(run_dir, require_resolvable: bool = True) -> dict:
    """The run's state as the launcher sees it: ``state`` (new, queued, running, interrupted, done,
    failed, corrupt), ``reason``, ``attempts``, ``retryable`` (a failure of the machine, not the
    router), when corrupt ``corrupt`` (what is unreadable or inconsistent), and ``why``: the one line
    that ``moebench status``, the launcher and ``moebench report`` all print for it (`verdict_text`).
    ``require_resolvable=False`` (the report) also reads hand-made or older specs (`spec_problem`)."""
    st = _inspect(Path(run_dir), require_resolvable)
    return {**st, "why": verdict_text(st)}


def verdict_text(st: dict) -> str:
    """The state's reason in words, the same wherever a run folder is shown: what is wrong with a
    corrupt record and what a rerun does about it, a failure's reason (saying when it is the
    machine's, which a rerun resumes), an interruption's."""
    if st["state"] == "corrupt":
        return f"corrupt record: {st['corrupt']}; rerunning the grid sets it aside and reruns it"
    text = st["reason"] or ""
    if st["state"] == "failed" and st.get("retryable"):
        text += " (infrastructure failure: the next `moebench run` resumes it, up to executor.max_retries)"
    if st["state"] == "interrupted":
        text += "; the next `moebench run` resumes it from its checkpoint"
    return text


def _inspect(run_dir: Path, require_resolvable: bool) -> dict:
    out = {"state": "new", "reason": None, "attempts": 0, "corrupt": None, "retryable": False}
    if run_dir.is_symlink():
        return {
            **out,
            "state": "corrupt",
            "corrupt": f"run folder {run_dir} is a symbolic link; remove it (it is never written through)",
        }
    try:
        status = records.read_status(run_dir)
    except records.CorruptRecordError as err:
        return {**out, "state": "corrupt", "corrupt": str(err)}
    if status is None:
        if lock_held(run_dir):
            return {**out, "state": "running"}
        problem = spec_problem(run_dir, require_resolvable)
        return {**out, "state": "corrupt", "corrupt": problem} if problem else out
    if not isinstance(status, dict) or status.get("state") not in records.STATES:
        got = status.get("state") if isinstance(status, dict) else None
        return {
            **out,
            "state": "corrupt",
            "corrupt": f"{run_dir / 'status.json'}: state {got!r} is not one of {', '.join(records.STATES)}",
        }
    attempts = status.get("attempts") or 0
    out.update(
        state=status["state"],
        reason=status.get("reason"),
        attempts=attempts if isinstance(attempts, int) else 0,
        retryable=status.get("retryable") is True,
    )
    if status["state"] == "done":
        problem = record_problem(run_dir, require_resolvable)
        if problem:
            return {**out, "state": "corrupt", "corrupt": problem}
    elif status["state"] != "running" or not lock_held(run_dir):
        problem = spec_problem(run_dir, require_resolvable)
        if problem:
            return {**out, "state": "corrupt", "corrupt": problem}
    if status["state"] in ("running", "queued") and not lock_held(run_dir):
        if status["state"] == "running":
            out.update(state="interrupted", reason="no live process holds the run (killed or crashed)")
    elif status["state"] == "queued" and lock_held(run_dir):
        out["state"] = "running"
    return out


def set_aside(run_dir: Path, names) -> Path | None:
    """Move unusable record files to ``.stale/<time>/`` (kept for inspection, out of the reader's way)."""
    present = [n for n in names if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if not present:
        return None
    if (run_dir / STALE_DIR).is_symlink():  # planted: never move records to where it points
        (run_dir / STALE_DIR).unlink()
    dest = run_dir / STALE_DIR / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    dest.mkdir(parents=True, exist_ok=True)
    for n in present:
        os.replace(run_dir / n, dest / n)
    return dest
