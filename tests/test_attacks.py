"""A results folder is untrusted input: each test plants one attack or one kind of damage and checks
that it is refused (no file created, no link target changed) or caught and redone."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_grid import tiny_grid

from moebench.cli import main
from moebench.core.registry import TASKS
from moebench.grids import launch
from moebench.grids.expand import expand
from moebench.grids.schema import GridError, load
from moebench.training import records, rundir, runner
from moebench.training.records import UnsafeRecordError
from moebench.training.rundir import run_path
from moebench.training.spec import SpecError, apply_override, resolve_spec, run_id
from moebench.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


REPO = Path(__file__).resolve().parents[1]


def toy_spec(steps=8, **train_opts):
    return resolve_spec(
        {
            "grid": "t",
            "task": "toy",
            "task_args": {"num_train": 64, "num_eval": 32},
            "model": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
            "moe": {"blocks": "all", "num_experts": 4, "router": "softmax-topk", "router_args": {}},
            "seed": 0,
            "train": {
                "steps": steps,
                "batch_size": 16,
                "lr": 3e-3,
                "warmup_steps": 2,
                "eval_every": 4,
                "checkpoint_every": 4,
                "probe_size": 8,
                **train_opts,
            },
        }
    )


def task_for(spec):
    return TASKS.get(spec["task"])(**spec["task_args"])


def comparable(final):
    return {k: v for k, v in final.items() if k not in ("cost", "env")}


def only_run_dir(grid_path, results):
    (spec,) = expand(grid_path)
    return run_path(results, spec["grid"], run_id(spec))


# --- 1. checkpoints -----------------------------------------------------------------------------------
class _Plant:
    """Unpickling this creates a file: what a planted checkpoint could do with weights_only=False."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_planted_pickle_checkpoint_runs_no_code_and_is_set_aside(tmp_path, capsys):
    spec = toy_spec()
    rid = run_id(spec)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    created = tmp_path / "pwned"
    torch.save({"version": 1, "run_id": rid, "step": 4, "x": _Plant(created)}, run_dir / "checkpoint.pt")
    final = train(task_for(spec), spec, run_dir, progress=False)
    assert not created.exists()
    assert "cannot be resumed" in capsys.readouterr().err
    assert comparable(final) == comparable(train(task_for(spec), spec, tmp_path / "clean", progress=False))
    (stale,) = (run_dir / ".stale").glob("*/checkpoint.pt")
    torch.load(stale, weights_only=False)  # the plant is live: the old loader would have run it
    assert created.exists()


def test_an_unreadable_checkpoint_restarts_the_run_from_zero_with_the_reason(tmp_path):
    spec = toy_spec()
    results = tmp_path / "results"
    run_dir = run_path(results, "t", run_id(spec))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn zip")
    (run_dir / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a killed atomic write
    records.atomic_write_yaml(run_dir / "spec.yaml", spec)
    records.write_status(run_dir, "running", None, attempts=1)
    res = runner.execute(spec, results, progress=False)
    assert res["state"] == "done"
    status = records.read_status(run_dir)
    assert status["state"] == "done" and "restarted from step 0" in status["note"]
    assert [r["step"] for r in records.read_jsonl(run_dir / "metrics.jsonl")] == [
        0,
        4,
        8,
    ]  # 0: the routing before learning
    assert not list(run_dir.glob(".*.tmp"))


def test_a_torn_metrics_tail_is_cut_before_resuming(tmp_path):
    spec = toy_spec()

    class Stop(Exception):
        pass

    def stop(step):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train(task_for(spec), spec, tmp_path / "cut", progress=False, on_step=stop)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "metr')  # killed in the middle of an append
    resumed = train(task_for(spec), spec, tmp_path / "cut", progress=False)
    full = train(task_for(spec), spec, tmp_path / "full", progress=False)
    assert comparable(resumed) == comparable(full)
    lines = records.read_jsonl(tmp_path / "cut" / "metrics.jsonl", strict=True)
    assert [r["step"] for r in lines] == [0, 4, 8]


# --- 2. symlinks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".lock", "jobs.jsonl"])
def test_a_planted_link_in_a_run_folder_is_refused_and_its_target_unchanged(tmp_path, name):
    path = tiny_grid(tmp_path)
    results = tmp_path / "results"
    run_dir = only_run_dir(path, results)
    run_dir.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, run_dir / name)
    (spec,) = expand(path)
    out = launch.run_one(spec, results, lock_wait_s=0)
    assert out["state"] == "failed" and "symbolic link" in out["reason"]
    assert target.read_text() == "keep me\n"
    assert not (run_dir / "final.json").exists()


def test_a_planted_metrics_or_stale_link_is_never_written_through(tmp_path):
    spec = toy_spec()
    results = tmp_path / "results"
    run_dir = run_path(results, "t", run_id(spec))
    run_dir.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(target, run_dir / "metrics.jsonl")
    os.symlink(outside, run_dir / ".stale")
    os.symlink(target, run_dir / "checkpoint.pt")
    with pytest.raises(UnsafeRecordError):
        records.append_jsonl(run_dir / "metrics.jsonl", {"step": 1})
    assert runner.execute(spec, results, progress=False)["state"] == "done"
    assert target.read_text() == "keep me\n" and not list(outside.iterdir())


def test_a_run_folder_linked_outside_the_results_root_is_refused(tmp_path):
    path = tiny_grid(tmp_path)
    results = tmp_path / "results"
    run_dir = only_run_dir(path, results)
    run_dir.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run_dir)
    (spec,) = expand(path)
    assert "symbolic link" in launch.run_one(spec, results)["reason"]
    assert "symbolic link" in runner.execute(spec, results, progress=False)["reason"]
    assert rundir.inspect(run_dir)["state"] == "corrupt"
    assert not list(elsewhere.iterdir())


# --- 3. executor strings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "executor, key",
    [
        ({"partition": "x\ntouch F #"}, "executor.partition"),
        ({"sbatch_extra": {"qos": "x\ntouch F #"}}, "executor.sbatch_extra.qos"),
        ({"sbatch_extra": {"qos\ntouch F #": "x"}}, "executor.sbatch_extra.qos\ntouch F #"),
        ({"sbatch_extra": {"account": "a\rb"}}, "executor.sbatch_extra.account"),
    ],
)
def test_control_characters_in_executor_strings_are_refused(tmp_path, monkeypatch, executor, key):
    monkeypatch.chdir(tmp_path)
    path = tiny_grid(tmp_path, executor=executor)
    with pytest.raises(GridError, match="without newlines or control characters") as err:
        load(path)
    assert f": {key}: " in str(err.value)
    assert main(["run", str(path), "--cluster", "slurm", "--results", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "F").exists() and not (tmp_path / "r").exists()


def test_plain_executor_strings_still_pass(tmp_path):
    g = load(tiny_grid(tmp_path, executor={"partition": "gpu", "sbatch_extra": {"qos": "high", "nodes": 1}}))
    assert g["executor"]["partition"] == "gpu" and g["executor"]["max_retries"] == 2


# --- 4. one validator ---------------------------------------------------------------------------------


def _copy(done_grid, tmp_path):
    path, results = done_grid
    shutil.copytree(results, tmp_path / "results")
    dirs = {s["label"]: run_path(tmp_path / "results", s["grid"], run_id(s)) for s in expand(path)}
    return path, tmp_path / "results", dirs


DAMAGE = {
    "empty final.json": lambda d, o: records.atomic_write_json(d / "final.json", {}),
    "final.json of another run": lambda d, o: shutil.copy(o / "final.json", d / "final.json"),
    "torn metrics tail": lambda d, o: (d / "metrics.jsonl").write_bytes((d / "metrics.jsonl").read_bytes()[:-9]),
    "spec.yaml of another run": lambda d, o: shutil.copy(o / "spec.yaml", d / "spec.yaml"),
    "spec.yaml not YAML": lambda d, o: (d / "spec.yaml").write_text("seed: [unclosed\n"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_record_is_caught_by_status_launcher_and_report(tmp_path, capsys, done_grid, damage):
    from moebench.report.load import load_record_set

    path, results, dirs = _copy(done_grid, tmp_path)
    d, other = dirs["softmax-topk"], dirs["dense"]
    DAMAGE[damage](d, other)
    assert rundir.inspect(d)["state"] == "corrupt"
    assert main(["status", str(results)]) == 1
    assert f"{d.name}: corrupt record: " in capsys.readouterr().out
    rs = load_record_set(results / "g")
    row = rs.runs.set_index("run_id").loc[d.name]
    assert row["state"] == "corrupt" and (rs.runs["state"] == "done").sum() == 1  # never counted
    out = launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    assert out["counts"]["done"] == 2  # the status message's promise: set aside and rerun
    assert rundir.record_problem(d) is None and list((d / rundir.STALE_DIR).iterdir())


def test_a_failed_run_with_an_invalid_spec_is_rerun_as_status_says(tmp_path, capsys, done_grid):
    path, results, dirs = _copy(done_grid, tmp_path)
    d = dirs["softmax-topk"]
    records.write_status(d, "failed", "diverged at step 3: loss=nan")
    (d / "spec.yaml").write_text("seed: [unclosed\n")
    main(["status", str(results)])
    assert "rerunning the grid sets it aside and reruns it" in capsys.readouterr().out
    assert launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)["counts"]["done"] == 2


# --- 5. retries and the run lock ----------------------------------------------------------------------
def test_a_killed_job_is_resumed_up_to_max_retries_and_divergence_is_not(tmp_path):
    path = tiny_grid(tmp_path, executor={"time_min": 5, "max_retries": 1})
    results = tmp_path / "results"
    d = only_run_dir(path, results)
    (spec,) = expand(path)
    for attempts, action in ((1, "run"), (2, "skip")):
        records.atomic_write_yaml(d / "spec.yaml", resolve_spec(spec))
        records.write_status(
            d, "failed", "job 7 ended without finishing the run: killed", attempts=attempts, retryable=True
        )
        (r,) = launch.plan([spec], results, max_retries=1)
        assert r.action == action, r.why
    records.write_status(d, "failed", "diverged at step 3: loss=nan", attempts=1, retryable=False)
    assert launch.plan([spec], results, max_retries=1)[0].action == "skip"


def test_moebench_train_waits_for_no_one_else_on_its_run(tmp_path, capsys):
    argv = ["train", "--task", "toy", "--size", "tiny", "--steps", "4", "--results", str(tmp_path)]
    from moebench.cli import build_parser
    from moebench.cli.train import spec_from_args

    spec = spec_from_args(build_parser().parse_args(argv))
    d = run_path(tmp_path, "single", run_id(spec))
    with rundir.run_lock(d) as got:
        assert got
        assert main(argv) == 1
    assert "being trained by another process" in capsys.readouterr().err
    assert not (d / "metrics.jsonl").exists()


# --- 6. disk full -------------------------------------------------------------------------------------
def test_too_little_free_space_fails_the_run_naming_the_disk_and_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "MIN_FREE_MB", 10**12)
    res = runner.execute(toy_spec(), tmp_path, progress=False)
    assert res["state"] == "failed" and res["reason"].startswith("disk full: only ")
    assert "mounted at /" in res["reason"] and str(tmp_path) in res["reason"]
    assert rundir.inspect(res["run_dir"])["retryable"]
    assert main(["status", str(tmp_path)]) == 1
    assert "infrastructure failure: the next `moebench run` resumes it" in capsys.readouterr().out


def test_moebench_run_exits_non_zero_when_the_report_cannot_be_written(tmp_path, monkeypatch, done_grid, capsys):
    import moebench.report.build as build

    path, results, _ = _copy(done_grid, tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(results / "g" / "report" / "index.html"))

    monkeypatch.setattr(build, "write_report", full)
    assert main(["run", str(path), "--cluster", "debug", "--results", str(results)]) == 1
    assert "report failed: OSError" in capsys.readouterr().err


# --- 8. bad inputs ------------------------------------------------------------------------------------
def test_a_yaml_tag_in_an_override_names_the_key():
    with pytest.raises(SpecError, match=r"override train\.lr: cannot parse value '!!python/object:os.system"):
        apply_override({}, "train.lr=!!python/object:os.system {}")


def test_a_truncated_jpeg_names_its_file(tmp_path):
    from PIL import Image

    from moebench.tasks.datasets.classification import imagefolder_datasets

    for split in ("train", "val"):
        p = tmp_path / split / "cat" / "0.jpg"
        p.parent.mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(p, quality=95)
    bad = tmp_path / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    tr, _ = imagefolder_datasets(tmp_path)
    with pytest.raises(OSError, match=f"cannot read image {bad}"):
        tr[0]


def test_records_never_contain_non_json_numbers_from_checkpoints(tmp_path):
    """The checkpoint holds plain types only: it loads with weights_only=True."""
    spec = toy_spec(keep_checkpoint=True)
    train(task_for(spec), spec, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["run_id"] == run_id(spec) and json.dumps(ck["last_eval"])


# --- 7. stop and cancel -------------------------------------------------------------------------------
def test_sigint_during_training_checkpoints_and_a_rerun_ends_identical(tmp_path):
    import signal

    from moebench.training.stop import Stopped

    spec = toy_spec(steps=12, checkpoint_every=100)

    def interrupt(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # what `moebench cancel` sends; no KeyboardInterrupt

    with pytest.raises(Stopped, match="at step 6 of 12"):
        train(task_for(spec), spec, tmp_path / "cut", progress=False, on_step=interrupt)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6  # saved on stop
    resumed = train(task_for(spec), spec, tmp_path / "cut", progress=False)
    assert comparable(resumed) == comparable(train(task_for(spec), spec, tmp_path / "full", progress=False))


def test_moebench_cancel_asks_the_process_holding_a_run_to_stop(tmp_path, capsys):
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "g" / "softmax-topk-s0-0123456789"
    run_dir.mkdir(parents=True)
    records.write_status(run_dir, "running")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import time
from moebench.training.rundir import run_lock
from moebench.training.stop import STOP_REQUESTED, stop_on_signals
with run_lock({str(run_dir)!r}) as got, stop_on_signals():
    print("locked", flush=True)
    while not STOP_REQUESTED.is_set():
        time.sleep(0.05)
    print("stopped cleanly", flush=True)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert main(["cancel", str(tmp_path), "g"]) == 0
    assert f"g/{run_dir.name}: asked pid {holder.pid} to checkpoint and exit" in capsys.readouterr().out
    assert holder.stdout.readline().strip() == "stopped cleanly"
    assert holder.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while rundir.lock_held(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert main(["cancel", str(tmp_path)]) == 0
    assert "nothing is training" in capsys.readouterr().out


def test_moebench_cancel_scancels_recorded_slurm_jobs(tmp_path, monkeypatch, capsys):
    import subprocess

    from moebench.grids import jobs

    grid = tmp_path / "g"
    (grid / "r1").mkdir(parents=True)
    records.write_status(grid / "r1", "running")
    records.append_jsonl(grid / "r1" / rundir.JOBS_LOG, {"slurm_job_id": "41"})
    (grid / ".submitit").mkdir()
    (grid / ".submitit" / "57_submitted.pkl").write_bytes(b"")
    (grid / ".submitit" / "12_submitted.pkl").write_bytes(b"")  # finished: squeue no longer lists it
    monkeypatch.setattr(jobs, "squeue_ids", lambda: {"41", "57_0", "57_1", "99"})
    calls = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")
    )
    assert main(["cancel", str(tmp_path)]) == 0
    assert calls == [["scancel", "41", "57"]]
    assert "cancelled SLURM job(s) 41, 57" in capsys.readouterr().out


# --- 9. slow adversarial probes -----------------------------------------------------------------------
def _strip(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.mark.slow
def test_sigkill_at_seeded_random_moments_then_a_rerun_gives_identical_records(tmp_path, capsys):
    """scripts/kill_sweep.py with 3 trials (seed 2 draws launcher, jobs, both): after each SIGKILL a
    rerun finishes every run exactly once with records identical to an uninterrupted grid. The script
    runs the same with N >= 30 (see the CHANGELOG for a sweep's count)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_sweep", REPO / "scripts" / "kill_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.main(["-n", "3", "--seed", "2", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == ["launcher", "jobs", "both"]
    assert all(r["ok"] for r in rows) and rows[1]["killed"], rows  # the jobs trial killed a training job


def _crash_in_write(kind: str, nth: int, spec, results):
    """Fork; the child trains ``spec`` and dies (os._exit, no cleanup) half-way through its ``nth``
    write of ``kind``, leaving what a kill would: a temp file, or a torn line."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        count = {"n": 0}
        real_atomic, real_append = records.atomic_write, records.append_jsonl

        def atomic(path, write):
            if os.path.basename(path) == kind:
                count["n"] += 1
                if count["n"] == nth:
                    import tempfile

                    fd, _ = tempfile.mkstemp(prefix=f".{kind}.", suffix=".tmp", dir=os.path.dirname(path))
                    os.write(fd, b"half")
                    os._exit(9)
            return real_atomic(path, write)

        def append(path, obj):
            if os.path.basename(path) == kind:
                count["n"] += 1
                if count["n"] == nth:
                    with open(path, "a") as f:
                        f.write(json.dumps(obj)[:20])
                    os._exit(9)
            return real_append(path, obj)

        import moebench.training.train as train_mod

        for mod in (records, train_mod, runner, launch):
            for name, fn in (("atomic_write", atomic), ("append_jsonl", append)):
                if hasattr(mod, name):
                    setattr(mod, name, fn)
        records.atomic_write_bytes.__globals__["atomic_write"] = atomic
        launch.run_one(spec, results)
    finally:
        os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, nth", [("checkpoint.pt", 2), ("metrics.jsonl", 2), ("status.json", 2), ("final.json", 1), ("jobs.jsonl", 1)]
)
def test_a_crash_in_the_middle_of_each_kind_of_write_is_redone_identically(tmp_path, kind, nth):
    spec = toy_spec(steps=12)
    ref = runner.execute(spec, tmp_path / "ref", progress=False)["final"]
    results = tmp_path / "results"
    _crash_in_write(kind, nth, spec, results)
    d = run_path(results, "t", run_id(spec))
    assert rundir.inspect(d)["state"] != "done"  # the crash really happened before the end
    out = launch.run_one(spec, results)
    assert out["state"] == "done", out
    assert comparable(records.read_json(d / "final.json")) == comparable(ref)
    ref_lines = records.read_jsonl(tmp_path / "ref" / "t" / run_id(spec) / "metrics.jsonl")
    assert _strip(records.read_jsonl(d / "metrics.jsonl", strict=True)) == _strip(ref_lines)
    assert not list(d.glob(".*.tmp"))


@pytest.mark.slow
def test_a_2mib_tmpfs_results_folder_fails_clearly_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({res.stderr.strip() or 'mount failed'})")
    try:
        path = tiny_grid(tmp_path, routers=("softmax-topk", "dense"))
        assert main(["run", str(path), "--cluster", "debug", "--results", str(mnt)]) == 1
        runs = [d for d in (mnt / "g").iterdir() if (d / "status.json").exists()]
        st = [rundir.inspect(d) for d in runs]
        assert len(st) == 2 and all(s["state"] == "failed" and s["retryable"] for s in st)
        assert all(s["reason"].startswith("disk full: only ") and f"mounted at {mnt}" in s["reason"] for s in st)
        # below the start threshold, a real ENOSPC in the middle of the run: still a clear reason
        monkeypatch.setattr(runner, "MIN_FREE_MB", 0)
        with open(mnt / "ballast", "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * (2 * 2**20))
        code = main(["run", str(path), "--cluster", "debug", "--results", str(mnt)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        for d in runs:
            s = rundir.inspect(d)
            assert s["state"] != "done", s
            if s["state"] == "failed":
                assert "disk full" in s["reason"], s["reason"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_sigterm_to_moebench_run_stops_its_local_jobs_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = tiny_grid(
        tmp_path,
        train={
            "steps": 5000,
            "batch_size": 16,
            "eval_every": 10,
            "checkpoint_every": 0,
            "probe_size": 8,
            "warmup_steps": 2,
        },
    )
    results = tmp_path / "results"
    d = only_run_dir(path, results)
    proc = subprocess.Popen(
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not records.read_jsonl(d / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rundir.lock_held(d)
        proc.send_signal(signal.SIGTERM)  # the launcher only: it must stop its jobs itself
        assert proc.wait(timeout=120) == 130
        assert "checkpointed" in proc.stderr.read()
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no job process outlives the launcher
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not rundir.lock_held(d) and rundir.inspect(d)["state"] == "interrupted"
    logs = "".join(p.read_text() for p in (results / "g" / ".submitit").rglob("*.err"))
    assert "stopped by a signal at step" in logs
    step = int(logs.split("stopped by a signal at step ")[1].split()[0])
    assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == step  # saved on the way out
