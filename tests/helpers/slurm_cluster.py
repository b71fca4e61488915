"""The one-node SLURM cluster of scripts/local-slurm.sh, as the slurm-marked tests use it: whether it
is up (they skip, saying why, when not), waiting on a job, lifting a requeue's BeginTime hold."""

from __future__ import annotations

import shutil
import subprocess
import time

from moebench.training import records


def not_ready(wait_s: float = 90) -> str | None:
    """Why the cluster cannot take a job now, or None when a node is idle (a node still completing or
    busy with an earlier test's job gets ``wait_s`` seconds to free up)."""
    deadline = time.monotonic() + wait_s
    while True:
        why = _not_ready()
        if why is None or "completing" not in why and "allocated" not in why or time.monotonic() > deadline:
            return why
        time.sleep(2)


def _not_ready() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo, sbatch) not found; start a cluster with scripts/local-slurm.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed ({err}); start the cluster with scripts/local-slurm.sh"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]}; start the cluster with scripts/local-slurm.sh"
    states = out.stdout.split()
    if "idle" not in states and "mixed" not in states:
        return f"no idle SLURM node (node states: {states or 'none'}); is scripts/local-slurm.sh running?"
    return None


def node_cpus() -> int:
    """CPUs of the cluster's node (scripts/local-slurm.sh gives it the machine's real count)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=20).stdout
    return max((int(c) for c in out.split() if c.isdigit()), default=0)


def squeue(job_id: str | None = None) -> str:
    """``squeue`` lines "<id> <state> <reason>" (all jobs, or one job's)."""
    cmd = ["squeue", "-h", "-r", "-o", "%i %T %r"] + (["-j", job_id] if job_id else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


def release_hold(job_id: str) -> bool:
    """SLURM holds a requeued job (Reason=BeginTime) for a minute or two; start it now instead (the
    requeue and resume path is unchanged). True when a hold was lifted."""
    if "BeginTime" not in squeue(job_id):
        return False
    return (
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20
        ).returncode
        == 0
    )


def wait_for(cond, what: str, timeout_s: float, every_s: float = 0.5, on_wait=None):
    """Poll ``cond()`` until it returns something true; fail naming ``what`` after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - t0 < timeout_s, f"{what}: not after {timeout_s:.0f}s"
        if on_wait:
            on_wait()
        time.sleep(every_s)


def final_state(run_dir, job_id: str | None = None, timeout_s: float = 420) -> dict:
    """status.json once it says done or failed, lifting any requeue hold of ``job_id`` meanwhile."""

    def done():
        st = records.read_status_safe(run_dir) or {}
        return st if st.get("state") in ("done", "failed") else None

    return wait_for(
        done,
        f"run {run_dir} to finish",
        timeout_s,
        every_s=1.0,
        on_wait=(lambda: release_hold(job_id)) if job_id else None,
    )
