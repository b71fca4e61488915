"""The smallest grid that trains: 8 steps of the toy task, for tests that need finished runs, not numbers."""

from __future__ import annotations

import yaml


def tiny_grid(tmp_path, routers=("softmax-topk",), **extra):
    grid = {
        "name": "g",
        "task": "toy",
        "task_args": {"num_train": 64, "num_eval": 32},
        "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 16},
        "train": {
            "steps": 8,
            "batch_size": 16,
            "eval_every": 4,
            "checkpoint_every": 4,
            "probe_size": 8,
            "warmup_steps": 2,
        },
        "seeds": [0],
        "routers": list(routers),
        "executor": {"time_min": 5, "cpus_per_task": 1},
        **extra,
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
