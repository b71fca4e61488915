"""Fixtures shared by several test files (plain helpers live in tests/helpers/, on pytest's pythonpath)."""

from __future__ import annotations

import pytest
import torch
from tiny_grid import tiny_grid


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def done_grid(tmp_path_factory):
    """One finished two-run grid (softmax-topk and dense), copied by each test that damages it."""
    from moebench.grids import launch

    tmp = tmp_path_factory.mktemp("done")
    path = tiny_grid(tmp, routers=("softmax-topk", "dense"))
    launch.run_grid(path, cluster="debug", results=tmp / "results", log=lambda s: None)
    return path, tmp / "results"
