"""The launcher with the real runner and the toy task: local subprocesses and in-process (debug) runs,
skipping finished runs, resuming a killed grid, corrupt records, failures, --retry-failed, run locks
and two grids sharing one results folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moebench.cli import main
from moebench.grids import expand as expand_mod
from moebench.grids import launch
from moebench.grids.expand import expand
from moebench.training import records, rundir
from moebench.training.rundir import run_path
from moebench.training.spec import run_id

REPO = Path(__file__).resolve().parents[1]


def toy_grid(tmp_path, name="g", routers=("dense", "softmax-topk"), steps=20, file=None, **extra) -> Path:
    grid = {
        "name": name,
        "task": "toy",
        "task_args": {"num_train": 128, "num_eval": 64},
        "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 32},
        "train": {
            "steps": steps,
            "batch_size": 16,
            "eval_every": 10,
            "checkpoint_every": 10,
            "probe_size": 16,
            "warmup_steps": 2,
        },
        "seeds": [0],
        "routers": list(routers),
        "executor": {"time_min": 10, "cpus_per_task": 1},
        **extra,
    }
    path = tmp_path / (file or f"{name}.yaml")
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run_dirs(grid_path, results) -> dict[str, Path]:
    return {s["label"]: run_path(results, s["grid"], run_id(s)) for s in expand(grid_path)}


def metric_steps(run_dir: Path) -> list[int]:
    """Evaluation steps after training began (an MoE run also logs step 0: its routing before learning)."""
    return [row["step"] for row in records.read_jsonl(run_dir / "metrics.jsonl") if row["step"] > 0]


def attempts_logged(run_dir: Path) -> int:
    return len(records.read_jsonl(run_dir / rundir.JOBS_LOG))


def test_local_grid_runs_and_a_rerun_skips_finished_runs(tmp_path):
    path = toy_grid(tmp_path)
    results = tmp_path / "results"
    lines: list[str] = []
    out = launch.run_grid(path, cluster="local", results=results, log=lines.append)
    assert out["counts"] == {"done": 2, "running": 0, "failed": 0, "queued": 0}
    dirs = run_dirs(path, results)
    for d in dirs.values():
        assert records.read_status(d)["state"] == "done"
        assert records.read_json(d / "final.json")["run_id"] == d.name
        assert metric_steps(d) == [10, 20]
        assert attempts_logged(d) == 1
        assert records.read_jsonl(d / rundir.JOBS_LOG)[0]["cluster"] == "local"
    assert any("queued -> running" in line for line in lines) and any("-> done" in line for line in lines)
    expected = records.read_json(results / "g" / "expected.json")
    assert sorted(e["run_id"] for e in expected) == sorted(d.name for d in dirs.values())

    mtimes = {k: (d / "final.json").stat().st_mtime_ns for k, d in dirs.items()}
    lines.clear()
    again = launch.run_grid(path, cluster="local", results=results, log=lines.append)
    assert again["counts"]["done"] == 2
    assert lines[0] == "executor: local (--cluster local)"  # first: where, and why
    assert "2 done already, 0 to run" in lines[1]
    assert {k: (d / "final.json").stat().st_mtime_ns for k, d in dirs.items()} == mtimes
    assert all(attempts_logged(d) == 1 for d in dirs.values())


def test_corrupt_records_are_reported_set_aside_and_rerun(tmp_path, capsys):
    path = toy_grid(tmp_path, routers=["softmax-topk"])
    results = tmp_path / "results"
    launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    (d,) = run_dirs(path, results).values()
    good_final = (d / "final.json").read_text()
    (d / "final.json").write_text(good_final[: len(good_final) // 2])  # half-written

    assert rundir.inspect(d)["state"] == "corrupt"
    assert main(["status", str(results)]) == 1
    out = capsys.readouterr().out
    assert f"{d.name}: corrupt record: {d / 'final.json'}: not valid JSON" in out

    lines: list[str] = []
    res = launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert any("run: corrupt record: " in line for line in lines)
    assert res["counts"]["done"] == 1
    assert records.read_json(d / "final.json")["run_id"] == d.name
    assert metric_steps(d) == [10, 20]  # retrained from scratch, old lines set aside, not duplicated
    stale = list((d / rundir.STALE_DIR).glob("*/final.json"))
    assert len(stale) == 1 and stale[0].read_text() == good_final[: len(good_final) // 2]

    (d / "status.json").write_text('{"state": ')
    assert rundir.inspect(d)["state"] == "corrupt"
    res = launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    assert res["counts"]["done"] == 1 and records.read_status(d)["state"] == "done"
    assert attempts_logged(d) == 3


def test_a_failed_run_is_recorded_the_grid_goes_on_and_retry_failed_reruns_it(tmp_path, capsys):
    path = toy_grid(tmp_path, routers=["softmax-topk"], sweep={"train.max_loss": [1e6, 1e-9]})
    results = tmp_path / "results"
    out = launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    assert out["counts"] == {"done": 1, "running": 0, "failed": 1, "queued": 0}
    failed = next(r for r in out["runs"] if r["state"] == "failed")
    assert "max_loss" in failed["reason"]
    failed_dir = results / "g" / failed["run_id"]
    assert records.read_status(failed_dir)["attempts"] == 1

    assert main(["status", str(results)]) == 1
    assert "max_loss" in capsys.readouterr().out  # the status table gives the reason

    lines: list[str] = []
    launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert any("rerun with --retry-failed" in line for line in lines)
    assert records.read_status(failed_dir)["attempts"] == 1

    assert (
        main(["run", str(path), "--cluster", "debug", "--results", str(results), "--no-report", "--retry-failed"]) == 1
    )  # still fails, so the exit status says so
    assert records.read_status(failed_dir)["attempts"] == 2
    assert attempts_logged(failed_dir) == 2


def test_a_run_locked_by_a_live_process_is_left_alone(tmp_path):
    path = toy_grid(tmp_path, routers=["softmax-topk"])
    results = tmp_path / "results"
    (spec,) = expand_mod.expand(path)
    d = rundir.run_dir_of(spec, results)
    records.write_status(d, "running")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from moebench.training.rundir import run_lock\n"
                f"with run_lock({str(d)!r}) as got:\n    print(got, flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        assert rundir.lock_held(d) and rundir.inspect(d)["state"] == "running"
        (planned,) = launch.plan([spec], results)
        assert planned.action == "skip" and planned.why == "running elsewhere"

        def must_not_run(spec, results):
            raise AssertionError("a locked run was executed")

        res = launch.run_one(spec, results, lock_wait_s=0.5, execute=must_not_run)
        assert res == {"run_id": d.name, "state": "skipped", "reason": "running elsewhere"}
    finally:
        holder.kill()
        holder.wait()
    assert not rundir.lock_held(d)
    assert rundir.inspect(d)["state"] == "interrupted"  # the owner died: the next grid run resumes it


def test_auto_cluster_is_local_without_a_slurm_controller(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.choose_cluster(None, "auto") == "local"
    assert launch.choose_cluster("debug", "auto") == "debug"
    with pytest.raises(RuntimeError, match="`sbatch` is not on PATH"):
        launch.choose_cluster("slurm", "auto")


def _moebench_run(path, results, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moebench",
            "run",
            str(path),
            "--cluster",
            "local",
            "--results",
            str(results),
            "--no-report",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_killed_grid_resumes_and_finishes_every_run_exactly_once(tmp_path):
    path = toy_grid(
        tmp_path, routers=["dense", "softmax-topk", "switch"], steps=300, executor={"time_min": 10, "max_workers": 1}
    )
    gpath = yaml.safe_load(path.read_text())
    gpath["train"].update(eval_every=50, checkpoint_every=10)
    path.write_text(yaml.safe_dump(gpath))
    results = tmp_path / "results"
    dirs = run_dirs(path, results)
    with open(tmp_path / "first.log", "w") as log:
        proc = _moebench_run(path, results, log)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                states = {k: rundir.inspect(d)["state"] for k, d in dirs.items()}
                done = [k for k, s in states.items() if s == "done"]
                mid = [k for k, s in states.items() if s == "running" and (dirs[k] / "checkpoint.pt").exists()]
                if done and mid:
                    break
                assert proc.poll() is None, (tmp_path / "first.log").read_text()
                time.sleep(0.2)
            else:
                pytest.fail(f"never saw one run done and one mid-way: {states}")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its job processes, as in a crash
            proc.wait()
    killed = mid[0]
    deadline = time.monotonic() + 20  # SIGKILL is delivered asynchronously: let the kernel reap the jobs
    while rundir.lock_held(dirs[killed]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rundir.inspect(dirs[killed])["state"] == "interrupted"
    finished_before = {k: (dirs[k] / "final.json").stat().st_mtime_ns for k in done}

    out = launch.run_grid(path, cluster="local", results=results, log=lambda s: None)
    assert out["counts"]["done"] == 3
    for k, d in dirs.items():
        assert metric_steps(d) == [50, 100, 150, 200, 250, 300], k  # no duplicate, none missing
    for k in done:  # not touched again
        assert (dirs[k] / "final.json").stat().st_mtime_ns == finished_before[k]
        assert attempts_logged(dirs[k]) == 1
    assert attempts_logged(dirs[killed]) == 2
    assert records.read_status(dirs[killed])["attempts"] == 2


@pytest.mark.slow
def test_two_grids_sharing_a_results_folder_train_a_shared_run_once(tmp_path):
    a = toy_grid(
        tmp_path,
        name="shared",
        routers=["softmax-topk", "dense"],
        file="a.yaml",
        executor={"time_min": 10, "max_workers": 1},
    )
    b = toy_grid(
        tmp_path,
        name="shared",
        routers=["softmax-topk", "switch"],
        file="b.yaml",
        executor={"time_min": 10, "max_workers": 1},
    )
    results = tmp_path / "results"
    with open(tmp_path / "a.log", "w") as la, open(tmp_path / "b.log", "w") as lb:
        procs = [_moebench_run(a, results, la), _moebench_run(b, results, lb)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert codes == [0, 0], logs
    dirs = {**run_dirs(a, results), **run_dirs(b, results)}
    assert len(dirs) == 3
    for label, d in dirs.items():
        assert rundir.inspect(d)["state"] == "done", label
        assert records.read_json(d / "final.json")["run_id"] == d.name
        assert metric_steps(d) == [10, 20], label
        assert attempts_logged(d) == 1, label  # the shared run was trained by one grid only
        assert not (d / rundir.STALE_DIR).exists()
    assert records.read_status(dirs["softmax-topk"])["attempts"] == 1


def test_dry_run_lists_the_plan_and_touches_nothing(tmp_path, capsys):
    path = toy_grid(tmp_path)
    results = tmp_path / "results"
    assert main(["run", str(path), "--cluster", "debug", "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for d in run_dirs(path, results).values():
        assert f"would run {d.name} (new)" in out
    assert not results.exists()


def test_runs_per_job_trains_a_chunk_in_one_process_a_failure_does_not_stop_it(tmp_path):
    """executor.runs_per_job: 3 runs (one failing on max_loss) in one local job, one process: each run has
    its own record and job line; the failed one is recorded and the chunk goes on; a rerun skips them."""
    path = toy_grid(
        tmp_path,
        routers=["dense", "softmax-topk"],
        sweep={"train.max_loss": [1e6, 1e-9]},
        executor={"time_min": 10, "cpus_per_task": 1, "runs_per_job": 4, "max_workers": 1},
    )
    results = tmp_path / "results"
    out = launch.run_grid(path, cluster="local", results=results, log=lambda s: None)
    assert sum(out["counts"].values()) == 4 and out["counts"]["done"] >= 2 and out["counts"]["queued"] == 0
    assert out["counts"]["done"] + out["counts"]["failed"] == 4 and out["counts"]["failed"] >= 1
    dirs = [results / "g" / r["run_id"] for r in out["runs"]]
    pids = {records.read_jsonl(d / rundir.JOBS_LOG)[0]["pid"] for d in dirs}
    assert len(pids) == 1  # one process trained all four
    again = launch.run_grid(path, cluster="local", results=results, log=lambda s: None)
    assert again["counts"] == out["counts"] and all(attempts_logged(d) == 1 for d in dirs)


def test_runs_per_job_is_refused_with_data_parallel(tmp_path):
    from moebench.grids.schema import GridError

    path = toy_grid(tmp_path, executor={"runs_per_job": 2, "tasks_per_node": 2})
    with pytest.raises(GridError, match="runs_per_job"):
        expand(path)


def test_the_launcher_does_not_reread_a_finished_run_each_poll(tmp_path, monkeypatch):
    """A finished record is checked once (final.json, metrics.jsonl, spec hashed to its folder: ~10 ms);
    re-checking every finished run every second kept a core busy on a 120-run grid."""
    from moebench.grids import phase

    path = toy_grid(tmp_path, routers=("dense",), steps=2)
    results = tmp_path / "results"
    launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    runs = phase.plan(expand(path), results)
    assert [r.state for r in runs] == ["done"]
    calls = []
    real = phase.inspect
    monkeypatch.setattr(phase, "inspect", lambda d: calls.append(d) or real(d))
    progress = phase.Progress(runs, log=lambda s: None)
    progress.last.clear()  # as if it had not been done when the phase started
    for _ in range(3):
        progress.poll()
    assert len(calls) == 1 and progress.last[runs[0].run_id] == "done"
