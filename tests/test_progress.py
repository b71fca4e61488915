"""Signs of life: progress lines in logs (no TTY) without flooding, and a resumed run says from where."""

import io

import pytest
import torch
from test_train import Interrupt, make_spec, task_for

from moebench.core import progress as P
from moebench.grids.status import status_rows
from moebench.training import records
from moebench.training.rundir import run_path
from moebench.training.runner import execute
from moebench.training.spec import run_id
from moebench.training.train import train


def test_log_progress_prints_a_start_line_then_at_most_one_line_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = P.Progress(1000, "run-x", file=out, every_s=30)
    for _ in range(1000):  # 1000 steps over 125 s: lines at 30, 60, 90, 120 s only
        clock[0] += 0.125
        bar.update()
    bar.note("loss 0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("run-x: 0/1000 (0%)") and lines[0].endswith("started")
    assert len(lines) == 6, lines
    assert lines[1].startswith("run-x: 240/1000 (24%), 0:30 elapsed, eta 1:35")
    assert lines[-1].startswith("run-x: 1000/1000 (100%)") and lines[-1].endswith("loss 0.5, finished")


def test_train_without_a_tty_logs_setup_and_progress(tmp_path, capsys):
    torch.set_num_threads(1)
    spec = make_spec(steps=8, eval_every=4, checkpoint_every=4)
    train(task_for(spec), spec, tmp_path, progress=None)
    err = capsys.readouterr().err.splitlines()
    rid = run_id(spec)
    assert err[0].startswith(f"moebench: run {rid}: setting up")
    assert err[1].startswith(f"{rid}: 0/8 (0%)")
    assert err[-1].startswith(f"{rid}: 8/8 (100%)") and err[-1].endswith("finished")
    assert len(err) <= 4  # a run of seconds: no flood


def test_a_resumed_run_says_from_which_step_in_the_log_and_in_status(tmp_path, capsys):
    torch.set_num_threads(1)
    spec = {**make_spec(steps=12, eval_every=4, checkpoint_every=4), "grid": "g"}
    run_dir = run_path(tmp_path, "g", run_id(spec))

    def stop(step):
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):  # attempt 1, killed after the step-4 checkpoint
        records.write_status(run_dir, "running", None, attempts=1)
        train(task_for(spec), spec, run_dir, progress=False, on_step=stop)
    assert execute(spec, tmp_path)["state"] == "done"  # attempt 2 resumes
    assert f"moebench: run {run_id(spec)} resumed from step 4 of 12 (attempt 2)" in capsys.readouterr().err
    [row] = status_rows(tmp_path / "g")
    assert row["state"] == "done" and row["reason"] == "resumed from step 4 (attempt 2)"
    assert execute({**spec, "seed": 1}, tmp_path)["state"] == "done"  # a fresh run: no note
    assert sorted(r["reason"] for r in status_rows(tmp_path / "g")) == ["", "resumed from step 4 (attempt 2)"]
