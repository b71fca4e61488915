"""``moebench cancel``: stop the runs of a results folder (or one grid of it) that are training now.

Local runs (``moebench run`` on this host, ``moebench train``) get SIGINT: each checkpoints after its
current step and exits, so a rerun resumes it. SLURM jobs are cancelled with ``scancel``: the job ids
recorded in each run's ``jobs.jsonl`` and the ids submitit left in ``<grid>/.submitit/`` (queued array
tasks that have not started yet), as far as ``squeue`` still lists them."""

from __future__ import annotations

import sys
from pathlib import Path

from moebench.cli._help import command


def add_parser(sub) -> None:
    p = command(
        sub,
        "cancel",
        "stop the running and queued jobs of a results folder (local and SLURM)",
        func=run,
        description="Stop what is training under RESULTS (or RESULTS/GRID): local runs "
        "checkpoint and exit (a rerun resumes them); SLURM jobs are cancelled with scancel.",
    )
    p.add_argument("results", help="a results folder (holding <grid>/<run_id>/) or one grid's folder")
    p.add_argument("grid", nargs="?", default=None, help="only this grid (a folder name under RESULTS)")


def slurm_job_ids(grid_dir: Path) -> set[str]:
    """Every SLURM job id recorded for the grid: jobs.jsonl lines and submitit's job pickles."""
    from moebench.training import records
    from moebench.training.rundir import JOBS_LOG

    ids = set()
    for log in grid_dir.glob(f"*/{JOBS_LOG}"):
        try:
            rows = records.read_jsonl(log)
        except records.CorruptRecordError:
            continue
        ids |= {str(r["slurm_job_id"]) for r in rows if isinstance(r, dict) and r.get("slurm_job_id")}
    ids |= {p.name.split("_submitted.pkl")[0] for p in (grid_dir / ".submitit").glob("*_submitted.pkl")}
    return ids


def run(args) -> int:
    """Exit 0 when something was asked to stop or nothing was running; 1 when scancel failed; 2 for a
    missing folder."""
    import subprocess

    from moebench.grids.jobs import squeue_ids
    from moebench.grids.status import grid_dirs
    from moebench.training.rundir import ask_to_stop, lock_held

    root = Path(args.results) / args.grid if args.grid else Path(args.results)
    if not root.is_dir():
        print(
            f"error: {root} is not a folder; give the results folder (and optionally a grid name in it)",
            file=sys.stderr,
        )
        return 2
    stopped, elsewhere, rc = 0, [], 0
    for grid_dir in grid_dirs(root):
        for run_dir in sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            pid = ask_to_stop(run_dir)
            if pid:
                stopped += 1
                print(f"{grid_dir.name}/{run_dir.name}: asked pid {pid} to checkpoint and exit")
            elif lock_held(run_dir):
                elsewhere.append(run_dir)
        ids = slurm_job_ids(grid_dir)
        alive = squeue_ids() if ids else set()
        if alive is None:  # only asked when there are ids
            print(
                f"{grid_dir.name}: squeue does not answer; cannot cancel its SLURM jobs {sorted(ids)}", file=sys.stderr
            )
            rc = 1
            continue
        # an array's tasks show as <array>_<i>: cancel by the array id when any of its tasks is listed
        live = sorted({i for i in ids if i in alive or any(a.startswith(f"{i}_") for a in alive)})
        if live:
            out = subprocess.run(["scancel", *live], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{grid_dir.name}: scancel {' '.join(live)} failed: {out.stderr.strip()}", file=sys.stderr)
                rc = 1
            else:
                stopped += len(live)
                print(f"{grid_dir.name}: cancelled SLURM job(s) {', '.join(live)}")
    for run_dir in elsewhere:
        print(f"{run_dir}: held by a process on another host; cancel it there (or through SLURM)", file=sys.stderr)
    if not stopped and rc == 0:
        print(f"nothing is training under {root}")
    return rc
