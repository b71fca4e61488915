"""moebench.moefy / moebench.routing_stats beyond the README: options pass through to the one moefy,
mistakes are refused with the fix, and routing_stats counts exactly what the layers dispatched."""

from __future__ import annotations

import pytest
import torch
from test_moefy import TIMM, _images, _model

import moebench

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_moefy_passes_options_through_and_refuses_unknown_ones():
    model = _model(TIMM)
    names = moebench.moefy(model, router="hash", blocks=[0, -1], num_experts=3, d_hidden=8)
    assert list(names) == ["blocks.0.mlp", "blocks.3.mlp"]
    layers = moebench.moe_layers(model)
    assert [(m.router_name, m.num_experts, m.d_hidden) for m in layers] == [("hash", 3, 8)] * 2
    with pytest.raises(TypeError, match="num_expert"):
        moebench.moefy(_model(TIMM), num_expert=4)
    with pytest.raises(KeyError, match="softmax-topk"):  # the registry names what exists
        moebench.moefy(_model(TIMM), router="softmax-top")


def test_routing_stats_counts_what_was_dispatched():
    model = _model(TIMM)
    moebench.moefy(model, router="softmax-topk", blocks="last-1", num_experts=4)
    with pytest.raises(ValueError, match="have not run yet"):
        moebench.routing_stats(model)
    batches = [_images(3, seed=s) for s in range(3)]
    expected = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        for b in batches:
            model(b)
            expected += moebench.moe_layers(model)[0].stats["counts"]
    model.train()
    stats = moebench.routing_stats(model, batches)
    assert model.training  # the mode is restored
    (layer,) = stats["per_layer"]
    assert layer["counts"] == expected.tolist() and sum(layer["counts"]) == 9 * 17 * 2  # (16 patches + cls) x top-2
    assert stats["mean"]["load_cv"] == layer["load_cv"]
    with pytest.raises(ValueError, match="no MoE layers"):
        moebench.routing_stats(_model(TIMM))
