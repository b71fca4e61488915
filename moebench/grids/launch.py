"""Run a grid with submitit: local subprocesses by default, SLURM job arrays on a cluster, in-process
for debugging; skip what is done, resume what was interrupted, report what is broken.

The grid is two phases (``moebench.grids.phase``): the dense pretraining runs that the runs still to
do start from (``moebench.grids.pretrain``), then the runs. What a job runs and how jobs are made is
``moebench.grids.jobs``; `plan`, `run_one`, `RunJob`, `make_executor`, ... are re-exported here.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from moebench.grids.jobs import RunJob, make_executor, max_workers, run_one, squeue_ids
from moebench.grids.phase import Executor, Phase, log_plan, plan, queue, run_phase
from moebench.grids.planned import PlannedRun
from moebench.grids.status import count_planned, format_table, plan_rows
from moebench.training import records

__all__ = [
    "RunJob",
    "make_executor",
    "max_workers",
    "run_one",
    "squeue_ids",
    "log_plan",
    "plan",
    "PlannedRun",
    "queue",
    "choose_cluster",
    "explain_cluster",
    "run_grid",
    "slurm_available",
]


# -- executors ---------------------------------------------------------------------------------------
def slurm_available() -> bool:
    """``sbatch`` is on PATH and the controller answers (an installed but stopped SLURM does not count)."""
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def choose_cluster(requested: str | None, grid_cluster: str = "auto", partition: str | None = None) -> str:
    """The executor ``explain_cluster`` picks (without its reason)."""
    return explain_cluster(requested, grid_cluster, partition)[0]


def explain_cluster(requested: str | None, grid_cluster: str = "auto", partition: str | None = None) -> tuple[str, str]:
    """(executor, why): the CLI's ``--cluster``, else the grid's ``executor.cluster``. ``auto`` means
    slurm only when the grid declares ``executor.partition`` and a SLURM controller answers; else
    local. Why not "slurm whenever sbatch answers": on a shared machine that sent a user's grid into
    someone else's cluster, to queue behind their jobs. A cluster the user did not name is never used."""
    if requested:
        cluster, why = requested, f"--cluster {requested}"
    elif grid_cluster and grid_cluster != "auto":
        cluster, why = grid_cluster, f"the grid's executor.cluster is {grid_cluster}"
    elif not partition:
        cluster = "local"
        why = "executor.cluster is auto and the grid declares no executor.partition"
        if shutil.which("sbatch"):
            why += "; SLURM is installed here: pass --cluster slurm (or set executor.partition) to submit to it"
    elif slurm_available():
        cluster, why = "slurm", f"executor.cluster is auto, the grid declares partition {partition!r} and SLURM answers"
    else:
        cluster = "local"
        why = f"executor.cluster is auto and the grid declares partition {partition!r}, but no SLURM controller answers here"
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise RuntimeError(
            "cluster slurm requested but `sbatch` is not on PATH; run on a SLURM login node, "
            "start the one-node cluster with scripts/local-slurm.sh, or use --cluster local"
        )
    return cluster, why


def run_grid(
    grid,
    cluster: str | None = None,
    results="results",
    dry_run: bool = False,
    retry_failed: bool = False,
    poll_s: float | None = None,
    log=print,
) -> dict:
    """Expand ``grid`` (path or shipped name), run what is not done, print progress and a summary.
    Returns {"grid", "results", "runs": [{run_id, label, seed, state, reason}], "counts": {state: n}}.
    The report is the caller's job (``moebench run`` writes it afterwards)."""
    from moebench.grids.expand import expand_with_pretrain
    from moebench.grids.pretrain import hold_back, needed, pretrain_phase
    from moebench.grids.schema import load

    g = load(grid)
    specs, pretrains = expand_with_pretrain(g)
    results = Path(results)
    grid_dir = results / g["name"]
    section = g["executor"]
    cluster, why = explain_cluster(cluster, section.get("cluster"), section.get("partition"))
    log(f"executor: {cluster} ({why})")
    ex = Executor(cluster, section, poll_s if poll_s is not None else (5.0 if cluster == "slurm" else 1.0), log)
    runs = plan(specs, results, retry_failed, section.get("max_retries", 2))
    # phase 1: the dense pretraining runs that the runs still to do start from (moebench.grids.pretrain)
    runs = hold_back(runs, pretrain_phase(needed(pretrains, runs), results, ex, g["name"], retry_failed, dry_run))
    # phase 2: the grid's runs
    todo = [r for r in runs if r.action == "run"]
    log(
        f"grid {g['name']}: {len(runs)} runs -> {grid_dir} ({cluster}); "
        f"{sum(r.why == 'done' for r in runs)} done already, {len(todo)} to run"
    )
    if not dry_run:
        write_expected(grid_dir, runs)
        write_grid_source(grid_dir, g)
    runs = run_phase(runs, Phase(g["name"], grid_dir, results.resolve()), ex, dry_run)
    rows = plan_rows(runs)
    if not dry_run:
        log(format_table(rows, title=f"grid {g['name']} summary"))
    return {"grid": g["name"], "results": str(grid_dir), "runs": rows, "counts": count_planned(runs)}


def write_grid_source(grid_dir: Path, g: dict) -> None:
    """``<grid>/grid_source.json``: the grid file, its sha256 and the command that launched it, for the
    report's reproducibility block."""
    import hashlib
    import sys

    file = g.get("file")
    digest = None
    if file and Path(file).is_file():
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    records.atomic_write_json(
        grid_dir / "grid_source.json",
        {
            "file": str(file) if file else None,
            "sha256": digest,
            "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)),
            "launched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def write_expected(grid_dir: Path, runs: list[PlannedRun]) -> None:
    """``<grid>/expected.json``: every run the grid expands to, so the report can list missing ones."""
    records.atomic_write_json(
        grid_dir / "expected.json",
        [
            {
                "run_id": r.run_id,
                "label": r.spec.label,
                "task": r.spec.task,
                "seed": r.spec.seed,
                "sweep": r.spec["sweep"],
            }
            for r in runs
        ],
    )
