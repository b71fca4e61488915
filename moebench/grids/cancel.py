"""Stop the runs of a results folder (or one grid of it) that are training now (``moebench cancel``).

Local runs (``moebench run`` on this host, ``moebench train``) get SIGINT: each checkpoints after its
current step and exits, so a rerun resumes it. SLURM jobs are cancelled with ``scancel``: the job ids
recorded in each run's ``jobs.jsonl`` and the ids submitit left in ``<grid>/.submitit/`` (queued array
tasks that have not started yet), as far as ``squeue`` still lists them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from moebench.grids import jobs
from moebench.grids.status import grid_dirs
from moebench.training import records
from moebench.training.rundir import JOBS_LOG, ask_to_stop, lock_held


@dataclass
class Cancelled:
    """What `cancel` did, in order: ``lines`` as (is_error, text); ``stopped`` counts the local runs
    asked to stop and the SLURM jobs cancelled; ``failed`` when squeue or scancel did not answer."""

    lines: list[tuple[bool, str]] = field(default_factory=list)
    stopped: int = 0
    failed: bool = False

    def say(self, text: str, error: bool = False) -> None:
        self.lines.append((error, text))


def slurm_job_ids(grid_dir: Path) -> set[str]:
    """Every SLURM job id recorded for the grid: jobs.jsonl lines and submitit's job pickles."""
    ids = set()
    for log in grid_dir.glob(f"*/{JOBS_LOG}"):
        try:
            rows = records.read_jsonl(log)
        except records.CorruptRecordError:
            continue
        ids |= {str(r["slurm_job_id"]) for r in rows if isinstance(r, dict) and r.get("slurm_job_id")}
    ids |= {p.name.split("_submitted.pkl")[0] for p in (grid_dir / ".submitit").glob("*_submitted.pkl")}
    return ids


def cancel(root: Path) -> Cancelled:
    """Ask every run training under ``root`` (a results folder or one grid's folder) to checkpoint and
    exit, and scancel the grid's SLURM jobs that squeue still lists."""
    out = Cancelled()
    elsewhere: list[Path] = []
    for grid_dir in grid_dirs(root):
        for run_dir in sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            pid = ask_to_stop(run_dir)
            if pid:
                out.stopped += 1
                out.say(f"{grid_dir.name}/{run_dir.name}: asked pid {pid} to checkpoint and exit")
            elif lock_held(run_dir):
                elsewhere.append(run_dir)
        _scancel(grid_dir, out)
    for run_dir in elsewhere:
        out.say(f"{run_dir}: held by a process on another host; cancel it there (or through SLURM)", error=True)
    return out


def _scancel(grid_dir: Path, out: Cancelled) -> None:
    """scancel the grid's recorded SLURM jobs that squeue still lists (squeue is asked only when any)."""
    ids = slurm_job_ids(grid_dir)
    alive = jobs.squeue_ids() if ids else set()
    if alive is None:
        out.say(f"{grid_dir.name}: squeue does not answer; cannot cancel its SLURM jobs {sorted(ids)}", error=True)
        out.failed = True
        return
    # an array's tasks show as <array>_<i>: cancel by the array id when any of its tasks is listed
    live = sorted({i for i in ids if i in alive or any(a.startswith(f"{i}_") for a in alive)})
    if not live:
        return
    done = subprocess.run(["scancel", *live], capture_output=True, text=True)
    if done.returncode != 0:
        out.say(f"{grid_dir.name}: scancel {' '.join(live)} failed: {done.stderr.strip()}", error=True)
        out.failed = True
    else:
        out.stopped += len(live)
        out.say(f"{grid_dir.name}: cancelled SLURM job(s) {', '.join(live)}")
