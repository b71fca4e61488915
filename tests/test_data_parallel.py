"""Data parallelism on CPU (gloo, two processes): the same losses and metrics as one process with
the same global batch, and only rank 0 writes the run's record."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebench.core.registry import TASKS
from moebench.training.train import EpochBatchSampler, train


def _spec() -> dict:
    return {
        "grid": "test",
        "task": "toy",
        "task_args": {"num_train": 128, "num_eval": 32},
        "model": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        # softmax-topk: no auxiliary loss, whose balance term would depend on the per-rank batch
        "moe": {"blocks": "all", "num_experts": 4, "router": "softmax-topk", "router_args": {}},
        "seed": 0,
        "train": {
            "steps": 6,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 1,
            "eval_every": 3,
            "checkpoint_every": 0,
            "probe_size": 8,
        },
    }


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        spec = _spec()
        train(TASKS.get("toy")(**spec["task_args"]), spec, f"{root}/rank{rank}", progress=False)
    finally:
        dist.destroy_process_group()


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ranks_share_each_global_batch_exactly():
    whole = [next(iter(EpochBatchSampler(100, 8, seed=3, epoch=e, start=s))) for e, s in ((0, 0), (1, 2))]
    for i, (e, s) in enumerate(((0, 0), (1, 2))):
        parts = [next(iter(EpochBatchSampler(100, 8, seed=3, epoch=e, start=s, rank=r, world=2))) for r in (0, 1)]
        assert parts[0] + parts[1] == whole[i]


@pytest.mark.slow  # two processes importing torch and timm: ~15-30 s
def test_two_gloo_processes_match_one_process_and_only_rank0_writes(tmp_path):
    spec = _spec()
    single = train(TASKS.get("toy")(**spec["task_args"]), spec, tmp_path / "single", progress=False)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert not (tmp_path / "rank1").exists()  # the worker wrote nothing, not even its folder
    final = json.loads((tmp_path / "rank0" / "final.json").read_text())
    for a, b in zip(_lines(tmp_path / "single"), _lines(tmp_path / "rank0"), strict=True):
        assert a["step"] == b["step"]
        # the step-0 evaluation (every MoE run) comes before any training step: no train loss yet
        assert b["train_loss"] == (None if a["train_loss"] is None else pytest.approx(a["train_loss"], rel=1e-5))
        for k in a["metrics"]:
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-6), k
    assert final["cost"]["tokens_per_sample"] == single["cost"]["tokens_per_sample"]
    assert final["steps"] == single["steps"] == 6


def test_tasks_per_node_is_checked_against_the_batch_and_the_gpus(tmp_path):
    import yaml

    from moebench.grids.schema import GridError, load, tasks_per_node

    def grid(**executor):
        path = tmp_path / "g.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "g",
                    "task": "toy",
                    "train": {"batch_size": 16},
                    "seeds": [0],
                    "routers": ["dense"],
                    "executor": executor,
                }
            )
        )
        return path

    assert tasks_per_node(load(grid())["executor"]) == 1
    assert tasks_per_node(load(grid(gpus_per_node=4))["executor"]) == 4
    assert tasks_per_node(load(grid(tasks_per_node=2))["executor"]) == 2
    with pytest.raises(GridError, match=r"executor.tasks_per_node: 3 processes cannot share train.batch_size 16"):
        load(grid(tasks_per_node=3))
    with pytest.raises(GridError, match=r"executor.tasks_per_node: is 4 but gpus_per_node is 2"):
        load(grid(tasks_per_node=4, gpus_per_node=2))
