"""One FLOPs definition everywhere: `grid show`'s flops/tok is the number a run records as
cost.flops_per_token (the report's FLOPs/token), and mlp_flops/tok is the MoE blocks' part of it."""

import pytest

from moebench.core.registry import TASKS
from moebench.grids.expand import expand
from moebench.grids.matching import costs
from moebench.training.train import model_cost

GRID = {
    "name": "flops",
    "task": "toy",
    "task_args": {"num_train": 64, "num_eval": 32},
    "model": {"dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
    "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 32},
    "seeds": [0],
    "routers": ["dense", "softmax-topk", "switch", "ermoe"],
}


@pytest.mark.parametrize("label", ["dense", "softmax-topk", "switch", "ermoe"])
def test_grid_show_flops_equal_the_recorded_cost(label):
    specs = expand(GRID)
    spec = next(s for s in specs if s["label"] == label)
    moe_spec = next(s for s in specs if s["moe"])
    shown = costs(spec, blocks=moe_spec["moe"]["blocks"])
    task = TASKS.get(spec["task"])(**spec["task_args"])
    model = task.build_model({**dict(getattr(task, "default_model", {}) or {}), **spec["model"]}, spec["moe"])
    recorded = model_cost(model)  # what train() writes into final.json's cost
    assert shown["flops_per_token"] == pytest.approx(recorded["flops_per_token"])
    assert 0 < shown["mlp_flops_per_token"] < shown["flops_per_token"]
    assert shown["params_active"] == pytest.approx(recorded["params_active"])
