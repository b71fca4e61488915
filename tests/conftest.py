"""Fixtures shared by several test files (plain helpers live in tests/helpers/, on pytest's pythonpath)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
