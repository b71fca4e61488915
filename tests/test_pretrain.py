"""The pretrain stage: a grid's `pretrain:` section, its expansion into one dense pretraining run per
task block and seed, the launcher running it first (debug cluster, toy task), dependants starting
from its weights, held back when it fails, and the weights file read without unpickling objects."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from moebench.core.registry import TASKS
from moebench.grids import launch
from moebench.grids.expand import expand, expand_with_pretrain
from moebench.grids.pretrain import CHECKPOINT, WEIGHTS, extract_weights, pretrain_dir, reference
from moebench.grids.schema import GridError, load
from moebench.training import records, rundir
from moebench.training.pretrained import with_weights_path
from moebench.training.spec import run_id


def grid(tmp_path, name="g", routers=("dense", "softmax-topk", "hash"), **extra) -> dict:
    g = {
        "name": name,
        "task": "toy",
        "task_args": {"num_train": 128, "num_eval": 64},
        "moe": {"blocks": [-1], "num_experts": 4, "upcycle": True},
        "train": {
            "steps": 6,
            "batch_size": 16,
            "eval_every": 3,
            "checkpoint_every": 3,
            "probe_size": 16,
            "warmup_steps": 1,
        },
        "pretrain": {"steps": 8, "lr": 3e-3},
        "seeds": [0, 1],
        "routers": list(routers),
        "match": "none",
        "executor": {"time_min": 10, "cpus_per_task": 1},
    }
    g.update(extra)
    return g


def write(tmp_path, g: dict):
    path = tmp_path / f"{g['name']}.yaml"
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


def test_pretrain_section_is_checked_against_the_train_schema(tmp_path):
    with pytest.raises(GridError, match=r"pretrain\.stepz.*did you mean 'steps'"):
        load(grid(tmp_path, pretrain={"stepz": 3}))
    with pytest.raises(GridError, match=r"pretrain\.steps"):
        load(grid(tmp_path, pretrain={"lr": 1e-3}))
    with pytest.raises(GridError, match=r"pretrain\.lr"):
        load(grid(tmp_path, pretrain={"steps": 3, "lr": -1}))


def test_a_block_can_switch_the_grids_pretrain_off(tmp_path):
    g = grid(tmp_path)
    g.pop("task")
    g.pop("task_args")
    g["tasks"] = [
        {"task": "toy", "task_args": {"num_train": 128, "num_eval": 64}},
        {"task": "toy", "task_args": {"num_train": 96, "num_eval": 64}, "pretrain": None},
    ]
    specs, pretrains = expand_with_pretrain(g)
    assert {p["task_args"]["num_train"] for p in pretrains} == {128}
    assert all("pretrained" not in s["model"] for s in specs if s["task_args"]["num_train"] == 96)
    assert all("pretrained" in s["model"] for s in specs if s["task_args"]["num_train"] == 128)


def test_one_pretrain_per_seed_shared_by_every_router_and_named_in_every_spec(tmp_path):
    g = grid(tmp_path)
    specs, pretrains = expand_with_pretrain(g)
    assert sorted(p["seed"] for p in pretrains) == [0, 1]
    by_seed = {p["seed"]: p for p in pretrains}
    for spec in specs:  # the dense row too: the pretrained model fine-tuned for the same budget
        assert spec["model"]["pretrained"] == reference(by_seed[spec["seed"]])
        assert spec["model"]["pretrained"] == f"pretrain:{run_id(by_seed[spec['seed']])}"  # an id, no path
    pre = by_seed[0]
    assert pre["moe"] is None and pre["train"]["steps"] == 8 and pre["train"]["lr"] == 3e-3
    assert pre["train"]["batch_size"] == 16  # the block's train section under the overrides
    # the same grid from scratch has other run ids; other routers keep the same pretraining runs
    scratch = {run_id(s) for s in expand({**g, "pretrain": None})}
    assert not scratch & {run_id(s) for s in specs}
    _, fewer = expand_with_pretrain(grid(tmp_path, routers=("switch",)))
    assert [run_id(p) for p in fewer] == [run_id(p) for p in pretrains]
    # a different pretraining budget is a different cache entry, and different dependants
    _, longer = expand_with_pretrain(grid(tmp_path, pretrain={"steps": 9}))
    assert not {run_id(p) for p in longer} & {run_id(p) for p in pretrains}


def test_the_launcher_pretrains_once_per_seed_and_runs_start_from_its_weights(tmp_path):
    path = write(tmp_path, grid(tmp_path))
    results = tmp_path / "results"
    lines: list[str] = []
    out = launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert out["counts"]["done"] == 6
    specs, pretrains = expand_with_pretrain(path)
    for p in pretrains:
        d = pretrain_dir(results, p)
        assert (d / WEIGHTS).is_file() and not (d / CHECKPOINT).exists()
        assert len(records.read_jsonl(d / rundir.JOBS_LOG)) == 1
    # the dependent dense model is the pretrained one, before fine-tuning
    task = TASKS.get("toy")(num_train=128, num_eval=64)
    dense = next(s for s in specs if s["label"] == "dense" and s["seed"] == 1)
    net = task.build_model(with_weights_path(dense, results)["model"], None)
    saved = torch.load(with_weights_path(dense, results)["model"]["pretrained"], weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    fresh = task.build_model({}, None)
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    # ... and the upcycled softmax-topk run computes what the pretrained dense model computes
    topk = next(s for s in specs if s["label"] == "softmax-topk" and s["seed"] == 1)
    x = task.datasets()[1].tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(
            task.build_model(with_weights_path(topk, results)["model"], topk["moe"]).eval()(x),
            net.eval()(x),
            atol=2e-5,
            rtol=1e-5,
        )
    # a second launch trains nothing again
    lines.clear()
    launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert not any(line.startswith("pretrain:") for line in lines)  # every dependant is done: no pretrain phase
    for p in pretrains:
        assert len(records.read_jsonl(pretrain_dir(results, p) / rundir.JOBS_LOG)) == 1


def test_a_failed_pretrain_holds_back_its_dependants_with_the_reason(tmp_path):
    g = grid(tmp_path, routers=("dense", "softmax-topk"), seeds=[0], pretrain={"steps": 4, "max_loss": 1e-9})
    path = write(tmp_path, g)
    results = tmp_path / "results"
    lines: list[str] = []
    out = launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert out["counts"]["done"] == 0 and out["counts"]["queued"] == 2
    held = [line for line in lines if "waits: its dense pretrain pretrain-s0-" in line]
    assert len(held) == 2 and all("is failed: diverged" in line and "--retry-failed" in line for line in held)
    for s in expand(path):
        assert rundir.inspect(rundir.run_dir_of(s, results))["state"] == "new"


def test_done_pretrain_without_weights_is_trained_again(tmp_path):
    g = grid(tmp_path, routers=("dense",), seeds=[0])
    path = write(tmp_path, g)
    results = tmp_path / "results"
    launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    ([spec], [p]) = expand_with_pretrain(path)
    d = pretrain_dir(results, p)
    (d / WEIGHTS).unlink()
    launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    assert not (d / WEIGHTS).is_file()  # its dependant is done: the pretrain is not needed
    import shutil

    shutil.rmtree(rundir.run_dir_of(spec, results))  # ... until a dependant is to run again
    launch.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    assert (d / WEIGHTS).is_file() and len(records.read_jsonl(d / rundir.JOBS_LOG)) == 2


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_weights_extraction_never_unpickles_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "run"
    d.mkdir()
    with open(d / CHECKPOINT, "wb") as f:
        pickle.dump({"model": {"w": _Boom()}}, f, protocol=2)
    torch.save({"model": {"w": _Boom()}}, d / "other.pt")
    assert extract_weights(d) is False
    (d / CHECKPOINT).unlink()
    (d / "other.pt").rename(d / CHECKPOINT)
    assert extract_weights(d) is False
    assert not (tmp_path / "PWNED").exists() and not (d / WEIGHTS).exists()


class _Killed(Exception):
    pass


def test_an_interrupted_pretrain_is_resumed_from_its_checkpoint(tmp_path):
    from moebench.training.train import train

    path = write(tmp_path, grid(tmp_path, routers=("softmax-topk",), seeds=[0]))
    results = tmp_path / "results"
    (_, [p]) = expand_with_pretrain(path)
    d = pretrain_dir(results, p)
    d.mkdir(parents=True)
    records.atomic_write_yaml(d / "spec.yaml", p)
    records.write_status(d, "running")

    def die(step):
        if step == 4:
            raise _Killed

    with pytest.raises(_Killed):  # killed after step 4; its last checkpoint is at step 3
        train(TASKS.get("toy")(num_train=128, num_eval=64), p, d, on_step=die)
    assert rundir.inspect(d)["state"] == "interrupted"
    lines: list[str] = []
    out = launch.run_grid(path, cluster="debug", results=results, log=lines.append)
    assert any("resumes it from its checkpoint" in line for line in lines)
    assert out["counts"]["done"] == 1 and (d / WEIGHTS).is_file()
    assert [row["step"] for row in records.read_jsonl(d / "metrics.jsonl")] == [3, 6, 8]


def test_run_ids_do_not_depend_on_the_results_folder_and_a_finished_grid_plans_nothing(tmp_path, monkeypatch, capsys):
    """The same grid under --results res (relative) and --results /abs/elsewhere has the same run ids;
    run to completion, then moved, `moebench run --dry-run` plans no pretrain and no run."""
    from moebench.cli import main

    path = write(tmp_path, grid(tmp_path, routers=("dense", "softmax-topk"), seeds=[0]))
    monkeypatch.chdir(tmp_path)
    ids = {}
    for results in ("res", str(tmp_path / "abs" / "results")):
        out = launch.run_grid(path, cluster="debug", results=results, dry_run=True, log=lambda s: None)
        ids[results] = sorted(r["run_id"] for r in out["runs"])
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["res"]) == 2
    out = launch.run_grid(path, cluster="debug", results="res", log=lambda s: None)
    assert out["counts"]["done"] == 2 and sorted(r["run_id"] for r in out["runs"]) == ids["res"]
    (tmp_path / "res").rename(tmp_path / "moved")  # a moved results folder keeps its ids
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--cluster", "debug", "--results", str(tmp_path / "moved")]) == 0
    said = capsys.readouterr().out
    assert "would" not in said and "pretrain:" not in said and "2 done already, 0 to run" in said
    # a dependant not done yet brings its pretrain back into the plan (done already: nothing to train)
    spec = next(s for s in expand(path) if s["label"] == "softmax-topk")
    import shutil

    shutil.rmtree(rundir.run_dir_of(spec, tmp_path / "moved"))
    lines: list[str] = []
    launch.run_grid(path, cluster="debug", results=tmp_path / "moved", dry_run=True, log=lines.append)
    assert any("1 done already, 0 to run first" in line for line in lines)
    assert any(f"would run {run_id(spec)}" in line for line in lines)
