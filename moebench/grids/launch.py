"""Run a grid with submitit: local subprocesses by default, SLURM job arrays on a cluster, in-process
for debugging; skip what is done, resume what was interrupted, report what is broken.

Why it looks like this:

- **Idempotent**: a run is identified by its spec (``moebench.training.spec.run_id``), so running a grid again
  skips runs whose ``status.json`` says done *and* whose ``final.json`` reads back; an interrupted run
  (status running, but no live process holds its lock) is resubmitted and the runner resumes it from
  its ``checkpoint.pt``; a failed run is rerun only with ``retry_failed``. An unreadable (half-written
  or hand-edited) ``status.json`` / ``final.json`` is reported, set aside under ``.stale/`` and the run
  is done again.
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
import shutil
import socket
import subprocess
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from moebench.core.progress import LOG_EVERY_S
from moebench.grids.status import _counts, _rows, format_table
from moebench.training import records
from moebench.training.rundir import JOBS_LOG, _set_aside, ask_to_stop, check_inside, inspect, run_lock, run_path
from moebench.training.stop import STOP_REQUESTED, Stopped, stop_on_signals


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
        _set_aside(run_dir, ["status.json", "final.json", "spec.yaml"])
    try:
        records.read_jsonl(run_dir / "metrics.jsonl")  # a torn tail is cut back by the trainer on resume
    except records.CorruptRecordError:  # a bad line inside: the history is gone, so start from zero
        _set_aside(run_dir, ["metrics.jsonl", "checkpoint.pt"])
    if not (run_dir / "checkpoint.pt").exists():
        _set_aside(run_dir, ["final.json", "metrics.jsonl"])
    return None


# -- the submitted callable --------------------------------------------------------------------------
def _execute(spec: dict, results) -> dict:
    from moebench.training.runner import execute

    return execute(spec, results)


def _job_env() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
    try:
        import submitit

        env = submitit.JobEnvironment()
        info.update(job_id=env.job_id, cluster=env.cluster, global_rank=env.global_rank, num_tasks=env.num_tasks)
    except RuntimeError:  # not inside a submitit job (a direct call)
        info.update(job_id=None, cluster=None, global_rank=0, num_tasks=1)
    return info


def run_one(spec: dict, results, threads: int | None = None, lock_wait_s: float = 5.0, execute=None) -> dict:
    """Run one spec as its owner: lock, re-check, tidy the record, log the attempt, execute.
    Returns {"run_id", "state", "reason"}; state "skipped" when done already or running elsewhere."""
    from moebench.training.spec import run_id

    execute = execute or _execute
    rid = run_id(spec)
    run_dir = run_path(results, spec["grid"], rid)
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
            records.write_status(run_dir, "failed", f"{type(err).__name__}: {err}",
                                 traceback=traceback.format_exc(limit=20))


try:
    import submitit as _submitit

    _Checkpointable = _submitit.helpers.Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class RunJob(_Checkpointable):
    """What submitit runs for one spec. Checkpointable: on preemption / timeout, submitit calls
    ``checkpoint`` (inherited: resubmit this same call) and requeues; training resumes from the
    runner's latest checkpoint, so nothing but the steps since it is lost."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __call__(self, spec: dict, results: str) -> dict:
        return run_one(spec, results, threads=self.threads)


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


def explain_cluster(requested: str | None, grid_cluster: str = "auto",
                    partition: str | None = None) -> tuple[str, str]:
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
        raise RuntimeError("cluster slurm requested but `sbatch` is not on PATH; run on a SLURM login node, "
                           "start the one-node cluster with scripts/local-slurm.sh, or use --cluster local")
    return cluster, why


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

    from moebench.grids.schema import tasks_per_node

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    gpus, tasks = ex.get("gpus_per_node") or 0, tasks_per_node(ex)
    params = {"timeout_min": int(math.ceil(ex.get("time_min") or 60)), "name": f"moebench-{grid_name}"}
    if cluster == "slurm":
        params.update(cpus_per_task=ex.get("cpus_per_task") or 1,
                      slurm_array_parallelism=ex.get("array_parallelism") or 64)
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


def _squeue_ids() -> set[str] | None:
    """Job ids SLURM still knows (pending, running, requeued); None if squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


# -- the grid loop -----------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


class _Progress:
    """Prints one line per run state change, read from the run directories, and a count of states
    when nothing changed for ``LOG_EVERY_S`` (30 s), so a long run still shows signs of life."""

    def __init__(self, runs: list[dict], log):
        self.runs, self.log = runs, log
        self.start = self.quiet_since = time.monotonic()
        self.last = {r["run_id"]: "done" for r in runs if r["why"] == "done"}  # the header counted them
        self.width = max((len(r["run_id"]) for r in runs), default=10)

    def poll(self) -> None:
        for i, r in enumerate(self.runs, 1):
            st = inspect(r["run_dir"])
            shown = st["state"]
            if r.get("outcome") == "elsewhere":
                shown = "running elsewhere"
            if self.last.get(r["run_id"]) != shown:
                old = self.last.get(r["run_id"])
                self.last[r["run_id"]] = shown
                extra = f" ({st['why']})" if st["why"] and shown in ("failed", "corrupt", "interrupted") else ""
                arrow = f"{old} -> {shown}" if old else shown
                n = len(self.runs)
                self.log(f"[{_now()}] [{i:>{len(str(n))}}/{n}] {r['run_id'].ljust(self.width)} {arrow}{extra}")
                self.quiet_since = time.monotonic()
        if time.monotonic() - self.quiet_since >= LOG_EVERY_S:
            self.quiet_since = time.monotonic()
            counts = _counts(self.runs)
            self.log(f"[{_now()}] still working: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                     + f" (of {len(self.runs)}; {int(time.monotonic() - self.start) // 60} min so far; "
                       f"each run's own progress is in its job log)")


def plan(specs: list[dict], results, retry_failed: bool = False, max_retries: int = 2) -> list[dict]:
    """What to do with each run: ``action`` skip (done / failed without retry / running elsewhere)
    or run, with ``why``. A run that failed for the machine's sake (killed, out of memory, disk full;
    ``retryable`` in its status) is resumed while it has had at most ``max_retries`` retries; a run
    that failed for the router's sake (divergence, a bug) only with ``retry_failed``."""
    from moebench.training.spec import run_id

    out = []
    for spec in specs:
        rid = run_id(spec)
        run_dir = run_path(results, spec["grid"], rid)
        st = inspect(run_dir)
        action, why = "run", {"new": "new", "queued": "queued earlier, never started"}.get(st["state"], st["why"])
        if st["state"] == "done":
            action, why = "skip", "done"
        elif st["state"] == "running":
            action, why = "skip", "running elsewhere"
        elif st["state"] == "failed" and st["retryable"] and st["attempts"] <= max_retries:
            action, why = "run", (f"retry {st['attempts']} of {max_retries} after an infrastructure failure: "
                                  f"{st['reason']}")
        elif st["state"] == "failed":
            gave_up = f" after {st['attempts']} attempts (executor.max_retries={max_retries})" if st["retryable"] else ""
            action, why = ("run", f"retry after failure: {st['reason']}") if retry_failed else \
                ("skip", f"failed ({st['reason']}){gave_up}; rerun with --retry-failed")
        elif st["state"] == "corrupt":
            why = st["why"]
        out.append({"spec": spec, "run_id": rid, "run_dir": run_dir, "action": action, "why": why,
                    "state": st["state"]})
    return out


def log_plan(runs: list[dict], todo: list[dict], log, dry_run: bool, verb: str = "run") -> None:
    """Say what is skipped or resumed and why (new runs go unmentioned); with ``dry_run``, each run too."""
    for r in runs:
        if r["why"] != "done" and (r["action"] == "skip" or r["state"] != "new"):
            log(f"  {r['run_id']}: {'skip' if r['action'] == 'skip' else 'run'}: {r['why']}")
    if dry_run:
        for r in todo:
            log(f"  would {verb} {r['run_id']} ({r['why']})")


def queue(todo: list[dict]) -> list[dict]:
    """Mark each run queued under its lock, so a run finishing elsewhere is never overwritten; returns
    the runs still to submit (one locked by another process, or done meanwhile, is skipped)."""
    for r in todo:
        with run_lock(r["run_dir"]) as got:
            if not got:
                r["action"], r["outcome"] = "skip", "elsewhere"
            elif inspect(r["run_dir"])["state"] == "done":
                r["action"] = "skip"
            else:
                if not (r["run_dir"] / "spec.yaml").exists():
                    records.atomic_write_yaml(r["run_dir"] / "spec.yaml", r["spec"])
                if r["state"] != "corrupt":
                    records.write_status(r["run_dir"], "queued")
    return [r for r in todo if r["action"] == "run"]


def run_grid(grid, cluster: str | None = None, results="results", dry_run: bool = False,
             retry_failed: bool = False, poll_s: float | None = None, log=print) -> dict:
    """Expand ``grid`` (path or shipped name), run what is not done, print progress and a summary.
    Returns {"grid", "results", "runs": [{run_id, label, seed, state, reason}], "counts": {state: n}}.
    The report is the caller's job (``moebench run`` writes it afterwards)."""
    from moebench.grids.expand import expand_with_pretrain
    from moebench.grids.pretrain import hold_back, pretrain_phase
    from moebench.grids.schema import load

    g = load(grid)
    specs, pretrains = expand_with_pretrain(g, results)
    results = Path(results)
    grid_dir = results / g["name"]
    ex = g["executor"]
    cluster, why = explain_cluster(cluster, ex.get("cluster"), ex.get("partition"))
    log(f"executor: {cluster} ({why})")
    # phase 1: the dense pretraining runs the others start from (moebench.grids.pretrain)
    blocked = pretrain_phase(pretrains, results, cluster, ex, g["name"], retry_failed, dry_run,
                             poll_s if poll_s is not None else (5.0 if cluster == "slurm" else 1.0), log)
    runs = plan(specs, results, retry_failed, ex.get("max_retries", 2))
    hold_back(runs, blocked)
    todo = [r for r in runs if r["action"] == "run"]
    log(f"grid {g['name']}: {len(runs)} runs -> {grid_dir} ({cluster}); "
        f"{sum(r['why'] == 'done' for r in runs)} done already, {len(todo)} to run")
    log_plan(runs, todo, log, dry_run)
    if dry_run:
        return {"grid": g["name"], "results": str(grid_dir), "runs": _rows(runs), "counts": _counts(runs)}

    todo = queue(todo)
    write_expected(grid_dir, runs)
    write_grid_source(grid_dir, g)
    progress = _Progress(runs, log)
    progress.poll()
    if todo:
        _submit_and_wait(todo, cluster, ex, grid_dir, g["name"], results.resolve(), progress,
                         poll_s if poll_s is not None else (5.0 if cluster == "slurm" else 1.0), log)
    progress.poll()
    rows = _rows(runs)
    log(format_table(rows, title=f"grid {g['name']} summary"))
    return {"grid": g["name"], "results": str(grid_dir), "runs": rows, "counts": _counts(runs)}


def write_grid_source(grid_dir: Path, g: dict) -> None:
    """``<grid>/grid_source.json``: the grid file, its sha256 and the command that launched it, for the
    report's reproducibility block."""
    import hashlib
    import sys

    file = g.get("file")
    digest = None
    if file and Path(file).is_file():
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    records.atomic_write_json(grid_dir / "grid_source.json", {
        "file": str(file) if file else None, "sha256": digest,
        "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)),
        "launched": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def write_expected(grid_dir: Path, runs: list[dict]) -> None:
    """``<grid>/expected.json``: every run the grid expands to, so the report can list missing ones."""
    records.atomic_write_json(grid_dir / "expected.json", [
        {"run_id": r["run_id"], "label": r["spec"]["label"], "task": r["spec"]["task"],
         "seed": r["spec"]["seed"], "sweep": r["spec"]["sweep"]} for r in runs])


def _submit_and_wait(todo, cluster, ex, grid_dir, name, results, progress, poll_s, log) -> None:
    folder = grid_dir / ".submitit"
    executor = make_executor(cluster, folder, ex, name)
    job_fn = RunJob(threads=ex.get("cpus_per_task") if cluster != "debug" else None)
    if cluster == "debug":  # in-process, one after the other, so a debugger can step in
        with stop_on_signals():
            for r in todo:
                job = executor.submit(job_fn, r["spec"], str(results))
                _finish(r, job, log)
                progress.poll()
                if STOP_REQUESTED.is_set():
                    raise Stopped("stopped by a signal; rerun the same command to resume")
        return
    pending = list(todo)
    running: list[tuple[dict, object]] = []
    with stop_on_signals():
        _wait(pending, running, executor, job_fn, cluster, ex, folder, todo, results, progress, poll_s, log)


def _stop_jobs(running, cluster, log, wait_s: float = 120.0) -> None:
    """SIGINT / SIGTERM reached the launcher: ask every running local job to checkpoint and exit, wait
    for them (``wait_s`` at most), then cancel what is left; SLURM jobs keep running (``moebench cancel``
    stops them). Raises `Stopped`, so ``moebench run`` exits non-zero and a rerun resumes."""
    if cluster == "slurm":  # the cluster owns them (README: Ctrl-C); say how to follow or stop them
        where = running[0][0]["run_dir"].parent if running else None
        how = f"`moebench status {where}`; stop them with `moebench cancel {where.parent} {where.name}`" if where \
            else "`moebench status`; stop them with `moebench cancel`"
        raise Stopped(f"stopped by a signal; the SLURM jobs keep running (follow them with {how})")
    asked = [pid for r, _ in running if (pid := ask_to_stop(r["run_dir"]))]
    log(f"[{_now()}] stopping: asked {len(asked)} running job(s) to checkpoint and exit")
    deadline = time.monotonic() + wait_s
    while any(not job.done() for _, job in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _, job in running:
        if not job.done():
            job.cancel(check=False)
    raise Stopped(f"stopped by a signal; {len(running)} job(s) checkpointed; rerun the same command to resume")


def _wait(pending, running, executor, job_fn, cluster, ex, folder, todo, results, progress, poll_s, log) -> None:
    """Submit (at most ``max_workers`` local jobs at once, or one SLURM array) and collect until done."""
    if cluster == "slurm":
        jobs = executor.map_array(job_fn, [r["spec"] for r in pending], [str(results)] * len(pending))
        running = list(zip(pending, jobs))
        pending = []
        log(f"[{_now()}] submitted {len(jobs)} runs as SLURM array {jobs[0].job_id.split('_')[0]} "
            f"(at most {ex.get('array_parallelism')} at once); logs in {folder}")
    limit = max_workers(ex, len(todo)) if cluster == "local" else len(todo)
    missing: dict[str, int] = {}
    while pending or running:
        if STOP_REQUESTED.is_set():
            _stop_jobs(running, cluster, log)
        while pending and len(running) < limit:
            r = pending.pop(0)
            running.append((r, executor.submit(job_fn, r["spec"], str(results))))
        time.sleep(poll_s)
        progress.poll()
        alive = _squeue_ids() if cluster == "slurm" else None
        still = []
        for r, job in running:
            # SLURM: the result file, or squeue (without accounting, submitit's sacct check only warns)
            finished = job.paths.result_pickle.exists() if cluster == "slurm" else job.done()
            if not finished and alive is not None:  # a job SLURM no longer lists is over too
                gone = job.job_id not in alive
                missing[job.job_id] = missing.get(job.job_id, 0) + 1 if gone else 0
                finished = missing[job.job_id] >= 3
            if finished:
                _finish(r, job, log)
            else:
                still.append((r, job))
        running = still


def _finish(r: dict, job, log) -> None:
    """Collect a finished job; if it died without its run reaching a final state, record why."""
    try:
        if hasattr(job, "paths") and not job.paths.result_pickle.exists() and not hasattr(job, "_submission"):
            raise RuntimeError("the job left no result (killed, cancelled or crashed)")
        res = job.results()[0] if getattr(job, "_sub_jobs", None) else job.result()  # rank 0's, data parallel
        if isinstance(res, dict) and res.get("state") == "skipped" and res.get("reason") == "running elsewhere":
            r["outcome"] = "elsewhere"
        err = None
    except Exception as e:  # noqa: BLE001 - any job failure is recorded, the grid goes on
        err = e
    st = inspect(r["run_dir"])
    if st["state"] in ("done", "failed") or r.get("outcome") == "elsewhere":
        return
    with run_lock(r["run_dir"]) as got:
        if got and inspect(r["run_dir"])["state"] not in ("done", "failed"):
            first = str(err).strip().splitlines()[-1][:500] if err else "the job ended but the run did not finish"
            log_path = getattr(getattr(job, "paths", None), "stderr", None)
            records.write_status(r["run_dir"], "failed",
                                 f"job {job.job_id} ended without finishing the run: {first}"
                                 + (f" (log: {log_path})" if log_path else ""),
                                 retryable=True)  # killed, OOM or node loss: the next run resumes it
