"""Final-evaluation interventions: expert ablation, drop-top-1, the test-time capacity sweep."""

from __future__ import annotations

import pytest
import torch
from reference_moe import recorded_routing, reference_forward

from moebench.core.layer import MoELayer
from moebench.core.routing import Routing
from moebench.training.interventions import intervening, measure, without_expert, without_top1


def test_without_top1_removes_each_tokens_first_choice():
    r = Routing(
        token=torch.tensor([0, 0, 1, 1]),
        expert=torch.tensor([2, 0, 1, 3]),
        weight=torch.tensor([0.7, 0.3, 0.6, 0.4]),
        num_tokens=2,
        num_experts=4,
        slot=torch.tensor([0, 1, 0, 1]),
    )
    kept = without_top1(r)
    assert kept.expert.tolist() == [0, 3]
    # no slots (expert choice, remoe): the largest-weight pair of each token, one even on ties
    r2 = Routing(
        token=torch.tensor([0, 1, 0, 1, 2]),
        expert=torch.tensor([0, 0, 1, 1, 2]),
        weight=torch.tensor([0.2, 0.5, 0.9, 0.5, 0.1]),
        num_tokens=3,
        num_experts=3,
    )
    kept2 = without_top1(r2)
    assert sorted(zip(kept2.token.tolist(), kept2.expert.tolist())) == [(0, 0), (1, 1)]


def test_dropped_expert_through_the_layer_matches_reference():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router="softmax-topk")
    x = torch.randn(2, 8, 16)
    with recorded_routing(layer) as routings, intervening([layer], without_expert(1)):
        y = layer(x)
    assert layer.stats["counts"][1] == 0
    torch.testing.assert_close(y, reference_forward(layer, x, without_expert(1)(routings[0])))
    assert layer.intervention is None, "the intervention is undone afterwards"
    soft = MoELayer(16, 32, 4, router="soft-moe")
    full = soft(x)
    with intervening([soft], without_expert(2)):
        dropped = soft(x)
    assert not torch.allclose(full, dropped)
    with pytest.raises(ValueError, match="not defined for dense"):
        with intervening([soft], without_top1):
            soft(x)


def test_measure_signs_and_capacity_sweep():
    torch.manual_seed(0)
    layers = [("a", MoELayer(16, 32, 4, router="softmax-topk")), ("b", MoELayer(16, 32, 4, router="switch"))]
    x = torch.randn(32, 16)
    for _, layer in layers:
        layer.eval()
    target = [layer(x).detach() for _, layer in layers]

    def headline():  # higher is better: 0 for the untouched layers, negative when anything changes
        with torch.no_grad():
            return -float(sum((layer(x) - t).pow(2).sum() for (_, layer), t in zip(layers, target)))

    out = measure(layers, headline, higher_is_better=True)
    assert out["base"] == 0.0
    assert [len(row["drop"]) for row in out["expert_drop"]["per_layer"]] == [4, 4]
    assert all(d >= 0 for row in out["expert_drop"]["per_layer"] for d in row["drop"])
    assert out["expert_drop"]["max"] > 0 and out["drop_top1"] > 0
    sweep = {row["capacity_factor"]: row["value"] for row in out["capacity_sweep"]}
    assert list(sweep) == [0.5, 1.0, 1.5, 2.0]
    assert sweep[2.0] == 0.0  # switch evaluates at 2.0 already; top-2 at 2.0 drops nothing here
    assert sweep[0.5] < 0.0
    assert [layer.capacity_factor for _, layer in layers] == [None, None]
    lower = measure(layers, lambda: -headline(), higher_is_better=False)
    assert lower["drop_top1"] == pytest.approx(out["drop_top1"])
