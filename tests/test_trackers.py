"""train.log_to: TensorBoard event files and an offline W&B run hold exactly metrics.jsonl's numbers
(read back with TensorBoard's own reader and a reader of W&B's file format). Each tracker's test is
skipped, with the reason, where that optional package is not installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
from test_train import make_spec

from moebench.training import records
from moebench.training.runner import execute
from moebench.training.spec import run_id
from moebench.training.trackers import scalars

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb")}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv("WANDB_MODE", raising=False)  # offline by default, no network
    monkeypatch_module.setenv("WANDB_API_KEY", "")  # and no credentials to find
    log_to = [name for name, ok in HAVE.items() if ok]
    if not log_to:
        pytest.skip("neither tensorboard nor wandb is installed (pip install 'moebench[trackers]')")
    spec = make_spec(steps=8, eval_every=4, checkpoint_every=4, log_to=log_to)
    res = execute(spec, tmp_path_factory.mktemp("logged"), progress=False)
    assert res["state"] == "done", res["reason"]
    return res["run_dir"], records.read_jsonl(f"{res['run_dir']}/metrics.jsonl")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _expected(lines):
    return {int(line["step"]): scalars(line) for line in lines}


def test_scalars_flattens_a_metrics_line():
    line = {
        "step": 5,
        "train_loss": 0.5,
        "aux_loss": None,
        "lr": 1e-3,
        "metrics": {"accuracy": 0.75},
        "routing": {
            "mean": {"load_cv": 0.2, "switch_rate": None},
            "per_layer": [
                {"layer": "blocks.0.mlp", "load_cv": 0.1, "counts": [1, 2]},
                {"layer": "blocks.1.mlp", "load_cv": 0.3},
            ],
        },
    }
    assert scalars(line) == {
        "train_loss": 0.5,
        "lr": 1e-3,
        "metrics/accuracy": 0.75,
        "routing/load_cv": 0.2,
        "routing/load_cv.layer0": 0.1,
        "routing/load_cv.layer1": 0.3,
    }


def test_log_to_is_not_in_the_run_id():
    assert run_id(make_spec(log_to=["tensorboard"])) == run_id(make_spec())


@pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed (pip install 'moebench[trackers]')")
def test_tensorboard_events_read_back_as_metrics_jsonl(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, lines = logged
    expected = _expected(lines)
    assert sorted(expected) == [0, 4, 8] and len(expected[8]) > 20  # loss, lr, task metrics, routing per layer
    acc = EventAccumulator(f"{run_dir}/tensorboard", size_guidance={"scalars": 0})
    acc.Reload()
    got: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            got.setdefault(ev.step, {})[tag] = ev.value
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        assert set(got[step]) == set(values), step
        for tag, value in values.items():
            assert got[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, tag)  # float32 events


@pytest.mark.skipif(not HAVE["wandb"], reason="wandb is not installed (pip install 'moebench[trackers]')")
def test_wandb_offline_run_reads_back_as_metrics_jsonl(logged):
    from pathlib import Path

    from wandb_log import history

    run_dir, lines = logged
    files = list(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    assert not any(p.is_symlink() for p in Path(run_dir).rglob("*"))  # run folders hold no links
    got = history(files[0])
    for step, values in _expected(lines).items():
        mine = {k: v for k, v in got[step].items() if not k.startswith("_")}
        assert set(mine) == set(values), step
        for tag, value in values.items():
            assert math.isclose(mine[tag], value, rel_tol=1e-12), (step, tag)
