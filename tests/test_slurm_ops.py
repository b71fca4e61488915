"""What a user does to a grid on a real (one-node) SLURM cluster: `moebench cancel` one grid while
another runs, Ctrl-C on `moebench run`, and a node lost while a job trains. Each ends with every run
recorded once. Needs scripts/local-slurm.sh's cluster (skips, saying why, without it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_cluster import not_ready, squeue, wait_for

from moebench.grids.expand import expand
from moebench.training import records, rundir, runner
from moebench.training.rundir import run_path
from moebench.training.spec import run_id

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def slurm_ready():
    why = not_ready()
    if why:
        pytest.skip(why)


def grid(tmp_path, name, routers, steps, eval_every=50, checkpoint_every=25, parallel=2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "task": "toy",
                "task_args": {"num_train": 128, "num_eval": 64},
                "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 32},
                "train": {
                    "steps": steps,
                    "batch_size": 16,
                    "eval_every": eval_every,
                    "checkpoint_every": checkpoint_every,
                    "probe_size": 16,
                    "warmup_steps": 2,
                },
                "seeds": [0],
                "routers": list(routers),
                "executor": {"time_min": 10, "cpus_per_task": 1, "array_parallelism": parallel},
            }
        )
    )
    return path


def dirs_of(path, results) -> dict[str, Path]:
    return {s["label"]: run_path(results, s["grid"], run_id(s)) for s in expand(path)}


def launch(path, results) -> subprocess.Popen:
    """`moebench run GRID --cluster slurm` as a user starts it, in its own process group."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moebench",
            "run",
            str(path),
            "--cluster",
            "slurm",
            "--results",
            str(results),
            "--no-report",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def rerun(path, results) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "moebench",
            "run",
            str(path),
            "--cluster",
            "slurm",
            "--results",
            str(results),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )


def jobs_named(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", f"moebench-{name}", "-o", "%i %T"], capture_output=True, text=True, timeout=30
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def reaped(*procs, grids=()):
    """Whatever happens in the test: its launchers killed and its grids' SLURM jobs cancelled."""
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for name in grids:
            subprocess.run(["scancel", "-n", f"moebench-{name}"], capture_output=True, timeout=30)


def test_cancel_stops_one_grids_running_and_queued_jobs_and_leaves_the_other(tmp_path):
    results = tmp_path / "results"
    a = grid(tmp_path, "cancel-a", ("softmax-topk", "dense"), steps=5000, parallel=1)  # one runs, one waits
    b = grid(tmp_path, "cancel-b", ("dense",), steps=600)
    a_dirs, b_dirs = dirs_of(a, results), dirs_of(b, results)
    pa = launch(a, results)
    pb = None
    with reaped(pa, grids=("cancel-a", "cancel-b")):
        wait_for(
            lambda: any(rundir.lock_held(d) for d in a_dirs.values()) and len(jobs_named("cancel-a")) == 2,
            "grid a: one job training, one queued",
            240,
        )
        pb = launch(b, results)
        with reaped(pb):
            wait_for(lambda: all(rundir.lock_held(d) for d in b_dirs.values()), "grid b training", 240)
            states = " ".join(jobs_named("cancel-a"))
            assert "RUNNING" in states and "PENDING" in states, states
            out = subprocess.run(
                [sys.executable, "-m", "moebench", "cancel", str(results), "cancel-a"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0 and "cancelled SLURM job(s)" in out.stdout, out
            wait_for(lambda: not jobs_named("cancel-a"), "grid a's jobs gone from squeue", 90)
            assert pa.wait(timeout=120) == 1  # its runs did not finish: the launcher says so
            assert pb.wait(timeout=300) == 0, pb.stderr.read()  # the other grid ran on to the end
    assert all(rundir.inspect(d)["state"] == "done" for d in b_dirs.values())
    assert all(len(records.read_jsonl(d / rundir.JOBS_LOG)) == 1 for d in b_dirs.values())
    a_states = sorted(rundir.inspect(d)["state"] for d in a_dirs.values())
    assert "done" not in a_states and len(a_states) == 2, a_states
    started = [d for d in a_dirs.values() if (d / rundir.JOBS_LOG).exists()]
    assert len(started) == 1  # the queued one never started: cancelled while pending


def test_ctrl_c_on_moebench_run_leaves_slurm_jobs_running_and_a_rerun_records_them_once(tmp_path):
    results = tmp_path / "results"
    path = grid(tmp_path, "ctrl-c", ("dense",), steps=300)
    (d,) = dirs_of(path, results).values()
    proc = launch(path, results)
    with reaped(grids=("ctrl-c",)):  # its job must outlive the launcher; cancelled only if the test fails
        with reaped(proc):
            wait_for(lambda: rundir.lock_held(d), "the job training", 180)
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=60) == 130
            err = proc.stderr.read()
            assert "the SLURM jobs keep running" in err and "moebench cancel" in err, err
        assert jobs_named("ctrl-c") or rundir.inspect(d)["state"] == "done"  # not cancelled by Ctrl-C
        wait_for(lambda: rundir.inspect(d)["state"] == "done", "the job to finish on its own", 300, 1.0)
        out = rerun(path, results)
    assert out.returncode == 0 and "1 done already, 0 to run" in out.stdout, out
    assert len(records.read_jsonl(d / rundir.JOBS_LOG)) == 1  # one attempt: recorded once


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                kids.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        children = kids.get(todo.pop(), [])
        out += children
        todo += children
    return out


def _job_processes(job_id: str) -> list[int]:
    """slurmstepd of every step of ``job_id`` and everything under it: what a dead node takes along."""
    steps = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if p.name.isdigit() and f"[{job_id}." in (p / "cmdline").read_bytes().decode(errors="replace"):
                steps.append(int(p.name))
    return steps + [k for s in steps for k in _descendants(s)]


def test_a_lost_node_ends_with_the_run_resumed_by_the_next_moebench_run_and_recorded_once(tmp_path):
    results = tmp_path / "results"
    path = grid(tmp_path, "lost-node", ("softmax-topk",), steps=400, eval_every=100, checkpoint_every=25)
    (d,) = dirs_of(path, results).values()
    (spec,) = expand(path)
    proc = launch(path, results)
    host = socket.gethostname().split(".")[0]
    try:
        with reaped(proc, grids=("lost-node",)):
            wait_for(lambda: (d / "checkpoint.pt").exists(), "a checkpoint", 180, 0.3)
            job_id = str(records.read_jsonl(d / rundir.JOBS_LOG)[0]["slurm_job_id"])
            # a cluster that does not requeue on node failure (JobRequeue=0 / --no-requeue): the run
            # must come back through `moebench run` (with requeue, SLURM resumes the job itself)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], check=True, timeout=30)
            slurmd = int(Path("/run/slurm-local/slurmd.pid").read_text())
            victims = _job_processes(job_id)
            assert victims, f"no processes of job {job_id} found"
            for pid in [slurmd] + victims:  # the node dies: its slurmd and the job's processes
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # what slurmctld does once the node stops answering (SlurmdTimeout, 300 s here)
            subprocess.run(
                ["scontrol", "update", f"NodeName={host}", "State=DOWN", "Reason=lost node (test)"],
                check=True,
                timeout=30,
            )
            assert proc.wait(timeout=180) == 1  # the launcher saw the job end without finishing the run
        st = rundir.inspect(d)
        assert st["state"] == "failed" and st["retryable"], st
    finally:  # the node returns: slurmd restarts and the node resumes (the script does both)
        subprocess.run(["bash", str(REPO / "scripts" / "local-slurm.sh")], capture_output=True, timeout=180)
    assert not_ready() is None, not_ready()
    assert not jobs_named("lost-node"), squeue()
    out = rerun(path, results)
    assert out.returncode == 0, out
    status = records.read_status(d)
    assert status["state"] == "done" and status["attempts"] == 2 and status["resumed_from"] > 0, status
    ref = runner.execute(spec, tmp_path / "ref", progress=False)  # uninterrupted, in this process
    lines = records.read_jsonl(d / "metrics.jsonl", strict=True)
    ref_lines = records.read_jsonl(Path(ref["run_dir"]) / "metrics.jsonl", strict=True)
    strip = [{k: v for k, v in m.items() if k != "elapsed_s"} for m in lines]
    assert strip == [{k: v for k, v in m.items() if k != "elapsed_s"} for m in ref_lines]  # once, identical
    assert len(records.read_jsonl(d / rundir.JOBS_LOG)) == 2
