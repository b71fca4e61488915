"""The job side of a phase: what submitit runs for one spec (`RunJob` -> `run_one`: lock, re-check,
tidy the record, execute) and the submitit executors that run it (`make_executor`).

- **One owner per run**: the process that trains a run holds an exclusive ``fcntl.flock`` on
  ``<run_dir>/.lock`` for the whole run (taken here, around ``moebench.training.runner.execute``). The kernel
  drops the lock when that process dies, so "locked" means "a live process is on it": two grids (or
  two launchers of one grid) writing into one results folder never train the same run twice; the
  second one reports it as "running elsewhere". flock works on local disks and NFSv4; on a shared
  file system without lock support two launchers must not share a results folder.
- **Preemption**: the submitted callable is a ``submitit.helpers.Checkpointable``; on preemption or
  timeout SLURM signals it, submitit pickles the call again and requeues it, and the new attempt
  resumes from the runner's latest periodic checkpoint. Each attempt appends a line to
  ``<run_dir>/jobs.jsonl`` (job id, host, pid, ``SLURM_RESTART_COUNT``) so the history is visible.
- **Data parallel** (``executor.tasks_per_node > 1``, by default one task per GPU): each task exports
  the torch.distributed environment from ``submitit.JobEnvironment`` (MASTER_ADDR / PORT, RANK,
  WORLD_SIZE, LOCAL_RANK) and calls ``init_process_group`` (gloo on CPU, nccl on GPU); only global
  rank 0 takes the run lock and decides for all ranks whether to train. The trainer splits each
  global batch over the ranks, averages gradients and writes only from rank 0 (tested through a
  real one-node SLURM with two gloo tasks, tests/test_slurm_dp.py; not yet run on several GPUs).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import traceback
from datetime import datetime, timezone
from pathlib import Path

from submitit.helpers import Checkpointable

from moebench.training import records
from moebench.training.rundir import JOBS_LOG, check_inside, inspect, run_lock, run_path, set_aside
from moebench.training.spec import RunSpec


def _prepare(run_dir: Path) -> str | None:
    """Under the run's lock: make the record consistent before (re)running. Returns why it skipped,
    or None to run. Done and consistent -> skip. Unreadable or inconsistent status/final/spec -> set
    aside (see ``rundir.record_problem``); killed writes' temp files -> deleted. With no checkpoint
    to resume from, old metrics lines are set aside too, so a restart from step 0 never duplicates
    them (with a checkpoint, the runner resumes and keeps the lines up to its step)."""
    state = inspect(run_dir)
    if state["state"] == "done":
        return "already done"
    records.remove_temp_files(run_dir)  # left by a killed write; we hold the lock, so no writer is live
    if state["state"] == "corrupt":
        set_aside(run_dir, ["status.json", "final.json", "spec.yaml"])
    try:
        records.read_jsonl(run_dir / "metrics.jsonl")  # a torn tail is cut back by the trainer on resume
    except records.CorruptRecordError:  # a bad line inside: the history is gone, so start from zero
        set_aside(run_dir, ["metrics.jsonl", "checkpoint.pt"])
    if not (run_dir / "checkpoint.pt").exists():
        set_aside(run_dir, ["final.json", "metrics.jsonl"])
    return None


# -- the submitted callable --------------------------------------------------------------------------
def _execute(spec: RunSpec, results) -> dict:
    from moebench.training.runner import execute

    return execute(spec, results)


def _job_env() -> dict:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }
    try:
        import submitit

        env = submitit.JobEnvironment()
        info.update(job_id=env.job_id, cluster=env.cluster, global_rank=env.global_rank, num_tasks=env.num_tasks)
    except RuntimeError:  # not inside a submitit job (a direct call)
        info.update(job_id=None, cluster=None, global_rank=0, num_tasks=1)
    return info


def _init_data_parallel() -> None:
    """torch.distributed from submitit's view of the job (SLURM or local tasks): MASTER_ADDR / PORT,
    RANK, WORLD_SIZE, LOCAL_RANK exported, then one process group: nccl with GPUs, gloo without."""
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _run_data_parallel(spec, results, run_dir, rid, env, lock_wait_s, execute) -> dict:
    """Every rank trains in step; rank 0 alone owns the run: it takes the lock, tidies the record and
    logs the attempt, then tells the other ranks whether to train (they must all skip together, or
    the collectives would wait forever). Only rank 0 writes; it returns the run's outcome."""
    import torch.distributed as dist

    _init_data_parallel()
    decision: list = [None]
    if env["global_rank"] != 0:
        dist.broadcast_object_list(decision, src=0)
        if decision[0] is None:
            execute(spec, results)
        return {"run_id": rid, "state": "worker", "reason": decision[0]}
    try:
        with run_lock(run_dir, wait_s=lock_wait_s) as got:
            decision[0] = _prepare(run_dir) if got else "running elsewhere"
            if decision[0] is None:
                records.append_jsonl(run_dir / JOBS_LOG, env)
            dist.broadcast_object_list(decision, src=0)
            if decision[0]:
                return {"run_id": rid, "state": "skipped", "reason": decision[0]}
            _execute_recording_errors(spec, results, run_dir, execute)
            state = inspect(run_dir)
    except records.UnsafeRecordError as err:
        records.write_status(run_dir, "failed", str(err), retryable=False)
        return {"run_id": rid, "state": "failed", "reason": str(err)}
    return {"run_id": rid, "state": state["state"], "reason": state["reason"]}


def _execute_recording_errors(spec, results, run_dir, execute) -> None:
    """``execute``; an exception the runner did not record itself becomes the run's failure."""
    try:
        execute(spec, results)
    except Exception as err:  # the runner records its own failures; this is for the rest
        status = records.read_status_safe(run_dir) or {}
        if status.get("state") != "failed":
            records.write_status(
                run_dir, "failed", f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=20)
            )


def run_one(spec: RunSpec | dict, results, threads: int | None = None, lock_wait_s: float = 5.0, execute=None) -> dict:
    """Run one spec as its owner: lock, re-check, tidy the record, log the attempt, execute.
    Returns {"run_id", "state", "reason"}; state "skipped" when done already or running elsewhere."""
    execute = execute or _execute
    spec = RunSpec.from_dict(spec)
    rid = spec.run_id
    run_dir = run_path(results, spec.grid, rid)
    try:
        check_inside(results, run_dir)
    except records.UnsafeRecordError as err:  # a planted link: write nothing through it
        return {"run_id": rid, "state": "failed", "reason": str(err)}
    env = _job_env()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if env["num_tasks"] > 1:  # data parallel: one process per task (see the module docstring)
        return _run_data_parallel(spec, results, run_dir, rid, env, lock_wait_s, execute)
    try:
        with run_lock(run_dir, wait_s=lock_wait_s) as got:
            if not got:
                return {"run_id": rid, "state": "skipped", "reason": "running elsewhere"}
            why = _prepare(run_dir)
            if why:
                return {"run_id": rid, "state": "skipped", "reason": why}
            records.append_jsonl(run_dir / JOBS_LOG, env)
            _execute_recording_errors(spec, results, run_dir, execute)
            state = inspect(run_dir)
    except records.UnsafeRecordError as err:  # a planted link (.lock, jobs.jsonl): refused, never followed
        records.write_status(run_dir, "failed", str(err), retryable=False)  # atomic: replaces, never follows
        return {"run_id": rid, "state": "failed", "reason": str(err)}
    return {"run_id": rid, "state": state["state"], "reason": state["reason"]}


class RunJob(Checkpointable):
    """What submitit runs for one spec. Checkpointable: on preemption / timeout, submitit calls
    ``checkpoint`` (inherited: resubmit this same call) and requeues; training resumes from the
    runner's latest checkpoint, so nothing but the steps since it is lost."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __call__(self, spec: RunSpec, results: str) -> dict:
        return run_one(spec, results, threads=self.threads)


class ChunkJob(Checkpointable):
    """What submitit runs for several specs (``executor.runs_per_job`` > 1): `run_chunk`, one run after
    the other in one process, so the process start and the imports (torch alone is ~4 s of CPU) are paid
    once per chunk, not once per run. Each run keeps its own lock, status, checkpoint and resume. On
    preemption / timeout submitit resubmits the same chunk; its finished runs are then skipped ("already
    done") and the interrupted one resumes from its checkpoint."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __call__(self, specs: list[RunSpec], results: str) -> list[dict]:
        return run_chunk(specs, results, threads=self.threads)


def run_chunk(specs: list[RunSpec] | list[dict], results, threads: int | None = None, execute=None) -> list[dict]:
    """`run_one` for each spec in order; one outcome per spec. A run that fails is recorded as failed
    (by `run_one`) and the chunk goes on; a stop signal (``moebench cancel``, a signalled launcher)
    stops the chunk after the run it interrupted: the runs not started stay queued for a rerun."""
    from moebench.training.spec import run_id
    from moebench.training.stop import STOP_REQUESTED, stop_on_signals

    out: list[dict] = []
    with stop_on_signals():
        for spec in specs:
            if STOP_REQUESTED.is_set():
                out.append({"run_id": run_id(spec), "state": "skipped", "reason": "stopped by a signal"})
                continue
            try:
                out.append(run_one(spec, results, threads=threads, execute=execute))
            except Exception as err:  # noqa: BLE001 - run_one records the run's own failures; the chunk goes on
                out.append({"run_id": run_id(spec), "state": "failed", "reason": f"{type(err).__name__}: {err}"})
    return out


# -- executors ---------------------------------------------------------------------------------------
def max_workers(ex: dict, n_runs: int) -> int:
    """Local parallelism: the grid's max_workers, else as many runs as cores allow at cpus_per_task each."""
    if ex.get("max_workers"):
        return max(1, min(ex["max_workers"], n_runs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_runs, cores // max(1, ex.get("cpus_per_task") or 1)))


def make_executor(cluster: str, folder: Path, ex: dict, grid_name: str):
    """A submitit AutoExecutor for ``cluster`` with the grid's executor section translated to its
    parameters (time limit, CPUs, GPUs as one task per GPU, memory, partition, array parallelism,
    extra sbatch options); job logs and pickles go to ``folder``."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    from moebench.grids.schema import tasks_per_node

    gpus, tasks = ex.get("gpus_per_node") or 0, tasks_per_node(ex)
    params = {"timeout_min": int(math.ceil(ex.get("time_min") or 60)), "name": f"moebench-{grid_name}"}
    if cluster == "slurm":
        params.update(
            cpus_per_task=ex.get("cpus_per_task") or 1, slurm_array_parallelism=ex.get("array_parallelism") or 64
        )
        if gpus:
            params["gpus_per_node"] = gpus
        if tasks > 1:
            params["tasks_per_node"] = tasks
        if ex.get("mem_gb"):
            params["mem_gb"] = ex["mem_gb"]
        if ex.get("partition"):
            params["slurm_partition"] = ex["partition"]
        if ex.get("sbatch_extra"):
            params["slurm_additional_parameters"] = dict(ex["sbatch_extra"])
    elif cluster == "local" and (gpus or tasks > 1):
        params.update(gpus_per_node=gpus, tasks_per_node=tasks)
    executor.update_parameters(**params)
    return executor


def squeue_ids() -> set[str] | None:
    """Job ids SLURM still knows (pending, running, requeued); None if squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}
