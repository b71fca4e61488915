"""Stopping a run cleanly: a signal sets a flag, and the trainer checkpoints after its current step and
leaves (``Stopped``), instead of dying in the middle of a write. Used by the trainer, by the launcher
(SIGINT / SIGTERM to ``moebench run`` stops its jobs) and by ``moebench cancel`` (which sends SIGINT).
No torch here, so the launcher and the CLI can import it cheaply."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class Stopped(RuntimeError):
    """SIGINT / SIGTERM asked the run to stop: it saved a checkpoint after its current step and left;
    a rerun resumes it (``moebench cancel`` and a signalled ``moebench run`` send it)."""


STOP_REQUESTED = threading.Event()
_handlers_depth = [0]


@contextlib.contextmanager
def stop_on_signals():
    """While inside: SIGINT (and SIGTERM, except under SLURM, where submitit handles it for requeueing)
    set ``STOP_REQUESTED`` instead of killing the process mid-write, so the trainer can checkpoint and
    the launcher can stop its jobs cleanly. A no-op outside the main thread; nests."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT] + ([] if os.environ.get("SLURM_JOB_ID") else [signal.SIGTERM])
    if _handlers_depth[0] == 0:
        STOP_REQUESTED.clear()
    old = {s: signal.signal(s, lambda signum, frame: STOP_REQUESTED.set()) for s in sigs}
    _handlers_depth[0] += 1
    try:
        yield
    finally:
        _handlers_depth[0] -= 1
        for s, h in old.items():
            signal.signal(s, h)
