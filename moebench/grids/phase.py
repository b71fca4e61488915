"""One phase of a grid: plan its runs, say what is skipped and why, queue them, submit them through the
executor, wait and show progress. The grid's runs are one phase, the dense pretraining runs they start
from another (``moebench.grids.pretrain``); both go through `run_phase`.

- **Idempotent**: a run is identified by its spec (``moebench.training.spec.run_id``), so running a grid again
  skips runs whose ``status.json`` says done *and* whose ``final.json`` reads back; an interrupted run
  (status running, but no live process holds its lock) is resubmitted and the runner resumes it from
  its ``checkpoint.pt``; a failed run is rerun only with ``retry_failed``. An unreadable (half-written
  or hand-edited) ``status.json`` / ``final.json`` is reported, set aside under ``.stale/`` and the run
  is done again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from moebench.core.progress import LOG_EVERY_S
from moebench.grids.jobs import ChunkJob, RunJob, make_executor, max_workers, squeue_ids
from moebench.grids.planned import Action, PlannedRun
from moebench.grids.status import count_planned
from moebench.training import records
from moebench.training.rundir import ask_to_stop, inspect, run_lock, run_path
from moebench.training.spec import RunSpec
from moebench.training.stop import STOP_REQUESTED, Stopped, stop_on_signals


@dataclass(frozen=True)
class Executor:
    """Where a phase's jobs run: the cluster (local, slurm or debug), the grid's ``executor:`` section
    (time_min, cpus_per_task, max_workers, array_parallelism, ...), how often to look at the run
    folders, and where progress lines go."""

    cluster: str
    section: dict
    poll_s: float = 1.0
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Phase:
    """What a phase runs into: ``name`` names its jobs, ``folder`` holds its run folders (and submitit's
    ``.submitit/``), ``results`` is the results root the jobs write under."""

    name: str
    folder: Path
    results: Path
    verb: str = "run"  # "would <verb> ..." in a dry run


def run_phase(runs: list[PlannedRun], phase: Phase, ex: Executor, dry_run: bool = False) -> list[PlannedRun]:
    """Run the planned ``runs`` (from `plan`) whose action is run: log what is skipped or resumed,
    queue them under their locks, submit them through the executor and wait, printing each state
    change. Returns ``runs`` as the phase left them (one queued or trained elsewhere meanwhile is a
    skip, with ``outcome`` elsewhere); a dry run only logs what it would do."""
    todo = [r for r in runs if r.action == "run"]
    log_plan(runs, todo, ex.log, dry_run, verb=phase.verb)
    if dry_run:
        return runs
    progress = Progress(runs, ex.log)
    for r in queue(todo):
        progress.update(r)
    progress.poll()
    todo = [r for r in progress.runs if r.action == "run"]
    if todo:
        submit_and_wait(todo, phase, ex, progress)
    progress.poll()
    return progress.runs


# checking a finished record (final.json, metrics.jsonl, spec.yaml hashed to the folder name) costs ~10 ms;
# re-checking 120 of them every second kept a core busy while the jobs needed it
FINAL_STATES = ("done", "failed")


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


class Progress:
    """Prints one line per run state change, read from the run directories, and a count of states
    when nothing changed for ``LOG_EVERY_S`` (30 s), so a long run still shows signs of life."""

    def __init__(self, runs: list[PlannedRun], log):
        self.runs, self.log = list(runs), log
        self.start = self.quiet_since = time.monotonic()
        self.last = {r.run_id: "done" for r in runs if r.why == "done"}  # the header counted them
        self.width = max((len(r.run_id) for r in runs), default=10)

    def update(self, run: PlannedRun) -> None:
        """``run`` replaces the planned run of the same id (queued, or found running elsewhere)."""
        self.runs = [run if r.run_id == run.run_id else r for r in self.runs]

    def poll(self) -> None:
        for i, r in enumerate(self.runs, 1):
            if self.last.get(r.run_id) in FINAL_STATES:
                continue  # a run done or failed stays so within a phase: reading its records again is waste
            st = inspect(r.run_dir)
            shown = st["state"]
            if r.outcome == "elsewhere":
                shown = "running elsewhere"
            if self.last.get(r.run_id) != shown:
                old = self.last.get(r.run_id)
                self.last[r.run_id] = shown
                extra = f" ({st['why']})" if st["why"] and shown in ("failed", "corrupt", "interrupted") else ""
                arrow = f"{old} -> {shown}" if old else shown
                n = len(self.runs)
                self.log(f"[{_now()}] [{i:>{len(str(n))}}/{n}] {r.run_id.ljust(self.width)} {arrow}{extra}")
                self.quiet_since = time.monotonic()
        if time.monotonic() - self.quiet_since >= LOG_EVERY_S:
            self.quiet_since = time.monotonic()
            counts = count_planned(self.runs)
            self.log(
                f"[{_now()}] still working: "
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + f" (of {len(self.runs)}; {int(time.monotonic() - self.start) // 60} min so far; "
                f"each run's own progress is in its job log)"
            )


def plan(
    specs: Sequence[RunSpec | dict], results, retry_failed: bool = False, max_retries: int = 2
) -> list[PlannedRun]:
    """What to do with each run: ``action`` skip (done / failed without retry / running elsewhere)
    or run, with ``why``. A run that failed for the machine's sake (killed, out of memory, disk full;
    ``retryable`` in its status) is resumed while it has had at most ``max_retries`` retries; a run
    that failed for the router's sake (divergence, a bug) only with ``retry_failed``."""
    out = []
    for s in specs:
        spec = RunSpec.from_dict(s)
        run_dir = run_path(results, spec.grid, spec.run_id)
        st = inspect(run_dir)
        action: Action
        why: str
        action, why = "run", {"new": "new", "queued": "queued earlier, never started"}.get(st["state"], st["why"])
        if st["state"] == "done":
            action, why = "skip", "done"
        elif st["state"] == "running":
            action, why = "skip", "running elsewhere"
        elif st["state"] == "failed" and st["retryable"] and st["attempts"] <= max_retries:
            action, why = (
                "run",
                (f"retry {st['attempts']} of {max_retries} after an infrastructure failure: {st['reason']}"),
            )
        elif st["state"] == "failed":
            gave_up = (
                f" after {st['attempts']} attempts (executor.max_retries={max_retries})" if st["retryable"] else ""
            )
            action, why = (
                ("run", f"retry after failure: {st['reason']}")
                if retry_failed
                else ("skip", f"failed ({st['reason']}){gave_up}; rerun with --retry-failed")
            )
        elif st["state"] == "corrupt":
            why = st["why"]
        out.append(PlannedRun(spec, run_dir, action, why, st["state"]))
    return out


def log_plan(runs: list[PlannedRun], todo: list[PlannedRun], log, dry_run: bool, verb: str = "run") -> None:
    """Say what is skipped or resumed and why (new runs go unmentioned); with ``dry_run``, each run too."""
    for r in runs:
        if r.why != "done" and (r.action == "skip" or r.state != "new"):
            log(f"  {r.run_id}: {r.action}: {r.why}")
    if dry_run:
        for r in todo:
            log(f"  would {verb} {r.run_id} ({r.why})")


def queue(todo: list[PlannedRun]) -> list[PlannedRun]:
    """Mark each run queued under its lock, so a run finishing elsewhere is never overwritten; returns
    ``todo`` as it is now: a run locked by another process, or done meanwhile, becomes a skip (the
    first with ``outcome`` elsewhere); the rest are still to submit."""
    out = []
    for r in todo:
        with run_lock(r.run_dir) as got:
            if not got:
                r = r.replace(action="skip", outcome="elsewhere")
            elif inspect(r.run_dir)["state"] == "done":
                r = r.replace(action="skip")
            else:
                if not (r.run_dir / "spec.yaml").exists():
                    records.atomic_write_yaml(r.run_dir / "spec.yaml", r.spec.to_dict())
                if r.state != "corrupt":
                    records.write_status(r.run_dir, "queued")
        out.append(r)
    return out


def submit_and_wait(todo: list[PlannedRun], phase: Phase, ex: Executor, progress: Progress) -> None:
    """Submit ``todo`` (in-process one by one on debug, at most ``max_workers`` local jobs at once, or one
    SLURM array) and collect until every job is over; a signal stops the jobs (see `_stop_jobs`)."""
    folder = phase.folder / ".submitit"
    executor = make_executor(ex.cluster, folder, ex.section, phase.name)
    job_fn = RunJob(threads=ex.section.get("cpus_per_task") if ex.cluster != "debug" else None)
    if ex.cluster == "debug":  # in-process, one after the other, so a debugger can step in
        with stop_on_signals():
            for r in todo:
                job = executor.submit(job_fn, r.spec, str(phase.results))
                progress.update(_finish(r, job, ex.log))
                progress.poll()
                if STOP_REQUESTED.is_set():
                    raise Stopped("stopped by a signal; rerun the same command to resume")
        return
    per_job = int(ex.section.get("runs_per_job") or 1)
    chunk_fn = ChunkJob(threads=job_fn.threads) if per_job > 1 else None
    with stop_on_signals():
        _wait(_Jobs(executor, job_fn, folder, todo, chunk_fn), phase, ex, progress)


@dataclass
class _Jobs:
    """The submitted side of one phase: the submitit executor, the callable, its log folder, the runs."""

    executor: Any  # a submitit Executor
    job_fn: RunJob
    folder: Path
    todo: list[PlannedRun]
    chunk_fn: ChunkJob | None = None  # executor.runs_per_job > 1: several runs per job


def _stop_jobs(running, cluster, log, wait_s: float = 120.0) -> None:
    """SIGINT / SIGTERM reached the launcher: ask every running local job to checkpoint and exit, wait
    for them (``wait_s`` at most), then cancel what is left; SLURM jobs keep running (``moebench cancel``
    stops them). Raises `Stopped`, so ``moebench run`` exits non-zero and a rerun resumes."""
    if cluster == "slurm":
        where = running[0][0][0].run_dir.parent if running else None  # the cluster owns them (README: Ctrl-C)
        how = (
            f"`moebench status {where}`; stop them with `moebench cancel {where.parent} {where.name}`"
            if where
            else "`moebench status`; stop them with `moebench cancel`"
        )
        raise Stopped(f"stopped by a signal; the SLURM jobs keep running (follow them with {how})")
    asked = [pid for chunk, _ in running for r in chunk if (pid := ask_to_stop(r.run_dir))]
    log(f"[{_now()}] stopping: asked {len(asked)} running job(s) to checkpoint and exit")
    deadline = time.monotonic() + wait_s
    while any(not job.done() for _, job in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _, job in running:
        if not job.done():
            job.cancel(check=False)
    raise Stopped(f"stopped by a signal; {len(running)} job(s) checkpointed; rerun the same command to resume")


def _wait(jobs: _Jobs, phase: Phase, ex: Executor, progress: Progress) -> None:
    """Submit (at most ``max_workers`` local jobs at once, or one SLURM array) and collect until done."""
    cluster, log, poll_s, results, executor, job_fn = (
        ex.cluster,
        ex.log,
        ex.poll_s,
        phase.results,
        jobs.executor,
        jobs.job_fn,
    )
    # one job per run, or per chunk of `runs_per_job` runs (ChunkJob): `pending` / `running` hold chunks
    per_job = int(ex.section.get("runs_per_job") or 1) if jobs.chunk_fn is not None else 1
    pending: list[list[PlannedRun]] = [jobs.todo[i : i + per_job] for i in range(0, len(jobs.todo), per_job)]
    running: list = []

    def submit(chunk: list[PlannedRun]):
        if jobs.chunk_fn is None:
            return executor.submit(job_fn, chunk[0].spec, str(results))
        return executor.submit(jobs.chunk_fn, [r.spec for r in chunk], str(results))

    if cluster == "slurm":
        if jobs.chunk_fn is None:
            array = executor.map_array(job_fn, [c[0].spec for c in pending], [str(results)] * len(pending))
        else:
            array = executor.map_array(
                jobs.chunk_fn, [[r.spec for r in c] for c in pending], [str(results)] * len(pending)
            )
        running = list(zip(pending, array))
        pending = []
        log(
            f"[{_now()}] submitted {len(jobs.todo)} runs in {len(array)} job{'s' if len(array) != 1 else ''} as SLURM array "
            f"{array[0].job_id.split('_')[0]} (at most {ex.section.get('array_parallelism')} at once); logs in "
            f"{jobs.folder}"
        )
    limit = max_workers(ex.section, len(pending)) if cluster == "local" else len(jobs.todo)
    missing: dict[str, int] = {}
    while pending or running:
        if STOP_REQUESTED.is_set():
            _stop_jobs(running, cluster, log)
        while pending and len(running) < limit:
            chunk = pending.pop(0)
            running.append((chunk, submit(chunk)))
        time.sleep(poll_s)
        progress.poll()
        alive = squeue_ids() if cluster == "slurm" else None
        still = []
        for chunk, job in running:
            # SLURM: the result file, or squeue (without accounting, submitit's sacct check only warns)
            finished = job.paths.result_pickle.exists() if cluster == "slurm" else job.done()
            if not finished and alive is not None:  # a job SLURM no longer lists is over too
                gone = job.job_id not in alive
                missing[job.job_id] = missing.get(job.job_id, 0) + 1 if gone else 0
                finished = missing[job.job_id] >= 3
            if finished:
                for r in chunk:
                    progress.update(_finish(r, job, log))
            else:
                still.append((chunk, job))
        running = still


def _finish(r: PlannedRun, job, log) -> PlannedRun:
    """Collect a finished job; if it died without its run reaching a final state, record why. Returns
    the run, with ``outcome`` elsewhere when its job found another process training it."""
    try:
        if hasattr(job, "paths") and not job.paths.result_pickle.exists() and not hasattr(job, "_submission"):
            raise RuntimeError("the job left no result (killed, cancelled or crashed)")
        res = job.results()[0] if getattr(job, "_sub_jobs", None) else job.result()  # rank 0's, data parallel
        if isinstance(res, list):  # a chunk's job (ChunkJob): this run's outcome
            res = next((x for x in res if isinstance(x, dict) and x.get("run_id") == r.run_id), None)
        if isinstance(res, dict) and res.get("state") == "skipped" and res.get("reason") == "running elsewhere":
            r = r.replace(outcome="elsewhere")
        err = None
    except Exception as e:  # noqa: BLE001 - any job failure is recorded, the grid goes on
        err = e
    st = inspect(r.run_dir)
    if st["state"] in ("done", "failed") or r.outcome == "elsewhere":
        return r
    with run_lock(r.run_dir) as got:
        if got and inspect(r.run_dir)["state"] not in ("done", "failed"):
            first = str(err).strip().splitlines()[-1][:500] if err else "the job ended but the run did not finish"
            log_path = getattr(getattr(job, "paths", None), "stderr", None)
            records.write_status(
                r.run_dir,
                "failed",
                f"job {job.job_id} ended without finishing the run: {first}"
                + (f" (log: {log_path})" if log_path else ""),
                retryable=True,
            )  # killed, OOM or node loss: the next run resumes it
    return r
