"""Routing statistics describe what was dispatched, not the router's score argmax (issue 9).

For every registered router: the recorded top-1 is, per token, the highest-weight expert among the pairs
that survived capacity (or -1 when none did), and the accumulator's top-1 counts equal those dispatch
counts. Hand-made cases pin uniform / expert-choice / loss-free, the three routers whose score argmax
differs from their dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from moebench.core.layer import MoELayer, dispatched_top1
from moebench.core.registry import ROUTERS
from moebench.core.routing import apply_capacity
from moebench.training import metrics as M

D, H, E = 16, 32, 4


def _reference_top1(routing, num_tokens):
    """Plain-Python per-token highest-weight dispatched expert (ties: earlier slot, then lower index),
    -1 if none."""
    best: dict[int, tuple] = {}
    slots = routing.slot.tolist() if routing.slot is not None else [0] * routing.num_pairs
    for t, e, w, k in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist(), slots):
        if t not in best or (-w, k, e) < best[t]:
            best[t] = (-w, k, e)
    return [best[t][2] if t in best else -1 for t in range(num_tokens)]


LAYER_ROUTERS = [
    n
    for n in ROUTERS.names()
    if not getattr(ROUTERS.get(n), "image_level", False) and not getattr(ROUTERS.get(n), "needs_group", False)
]  # oracle needs a task's true groups
SMALL_D_ARGS = {"emoe": {"rank": 4}}  # options a router needs at d = D (emoe's rank must be below d)


@pytest.mark.parametrize("name", LAYER_ROUTERS)
def test_recorded_top1_is_the_dispatched_top1(name):
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router=name, router_args=SMALL_D_ARGS.get(name), capacity_factor=0.75).eval()
    captured = {}
    original = layer._record_stats

    def spy(routing, counts, num_tokens):
        captured["routing"] = routing
        original(routing, counts, num_tokens)

    layer._record_stats = spy  # type: ignore[method-assign]
    x = torch.randn(2, 12, D)
    with torch.no_grad():
        layer(
            x,
            context=torch.randn(2, 12, D) if layer.router.needs_context else None,
            token_ids=torch.randint(0, 50, (2, 12)),
        )
    routing = captured["routing"]
    if routing.is_dense:  # soft-moe: every token reaches every expert; top-1 = most combine weight
        want = routing.combine.reshape(24, E, -1).sum(-1).argmax(-1).tolist()
    else:
        want = _reference_top1(routing, 24)
    assert layer.stats["top1"].tolist() == want
    assert int(layer.stats["unrouted_tokens"]) == want.count(-1)
    # the accumulator's top-1 counts are exactly these dispatch counts
    acc = M.RoutingStatsAccumulator(nn.Sequential(layer), None)
    with acc, torch.no_grad():
        layer(
            x,
            context=torch.randn(2, 12, D) if layer.router.needs_context else None,
            token_ids=torch.randint(0, 50, (2, 12)),
        )
        acc.update(x, batch_size=2)
    d = acc.per_layer()[0]
    got = np.bincount([e for e in layer.stats["top1"].tolist() if e >= 0], minlength=E)
    assert d["top1_counts"] == got.tolist()
    assert d["unrouted_tokens"] == int((layer.stats["top1"] < 0).sum())
    assert sum(d["top1_counts"]) + d["unrouted_tokens"] == 24


def test_dispatched_top1_hand_case():
    token = torch.tensor([0, 0, 1, 1, 3])
    expert = torch.tensor([2, 1, 3, 0, 1])
    weight = torch.tensor([0.4, 0.6, 0.5, 0.5, 1.0])
    # token 0: expert 1 has the larger weight; token 1: tie -> lower index 0; token 2: nowhere
    assert dispatched_top1(token, expert, weight, 4, 4).tolist() == [1, 0, -1, 1]
    # with slots, a tie goes to the token's first choice (slot 0): token 1 chose expert 3 first
    slot = torch.tensor([0, 1, 0, 1, 0])
    assert dispatched_top1(token, expert, weight, 4, 4, slot).tolist() == [1, 3, -1, 1]


class _Labelled(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.moe = layer

    def forward(self, x):
        return self.moe(x)


class _PositionLabels:
    """Token t of a sample is labelled t % 4."""

    label_names = ["a", "b", "c", "d"]

    def batch_size(self, batch):
        return batch.shape[0]

    def token_labels(self, batch, layer_name, tokens_per_sample):
        return torch.arange(tokens_per_sample).remainder(4).expand(batch.shape[0], -1)


def _per_layer(layer, x):
    acc = M.RoutingStatsAccumulator(_Labelled(layer), _PositionLabels())
    with acc, torch.no_grad():
        layer(x)
        acc.update(x)
    return acc.per_layer()[0]


def test_uniform_top2_specialisation_follows_dispatch():
    # uniform top-2 sends token t to experts t%4 (its first choice) and (t+1)%4 with equal weights; the
    # tie goes to the first choice, so label l = t%4 has top-1 expert l and every expert shows its
    # 1/E. (The old score-argmax basis sent label 3 to expert 0 and showed expert 3 at 0 %.)
    layer = MoELayer(D, H, E, router="uniform", router_args={"top_k": 2}).eval()
    d = _per_layer(layer, torch.randn(2, 8, D))
    assert d["label_by_expert"] == (4 * np.eye(4, dtype=int)).tolist()
    assert d["top1_counts"] == [4, 4, 4, 4] and d["counts"] == [8, 8, 8, 8] and d["unrouted_rate"] == 0.0
    assert d["mutual_info"] == pytest.approx(math.log(4))
    layer1 = MoELayer(D, H, E, router="uniform", router_args={"top_k": 1}).eval()
    d1 = _per_layer(layer1, torch.randn(2, 8, D))
    assert d1["label_by_expert"] == (4 * np.eye(4, dtype=int)).tolist()


def test_expert_choice_unrouted_tokens_are_their_own_category():
    layer = MoELayer(D, H, E, router="expert-choice", router_args={"capacity": 1}).eval()
    with torch.no_grad():  # logits = the first 4 input features
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :E] = torch.eye(E)
    x = torch.zeros(1, 8, D)
    x[0, :4, :E] = torch.tensor([[10.0 - t, 0, 0, 0] for t in range(4)])  # tokens 0..3: expert 0, fading
    x[0, 4:6, :E] = torch.tensor([-10.0, 10, 10, 10])  # tokens 4, 5: experts 1-3 equally
    x[0, 6:8, :E] = torch.tensor([5.0, 10, 10, 10])  # tokens 6, 7: the same a little less
    d = _per_layer(layer, x)
    # C = ceil(8 * 1 / 4) = 2: expert 0 takes tokens 0, 1; experts 1-3 take tokens 4, 5 (equal weights:
    # top-1 is expert 1); tokens 2, 3, 6, 7 go nowhere. Labels are t % 4.
    assert d["counts"] == [2, 2, 2, 2]
    assert d["unrouted_tokens"] == 4 and d["unrouted_rate"] == pytest.approx(4 / 8)
    assert d["top1_counts"] == [2, 2, 0, 0]
    assert d["label_by_expert"] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert d["label_unrouted"] == [0, 0, 2, 2]
    # MI over (label, expert-or-unrouted): labels 0,1 -> {e0, e1} evenly; labels 2,3 -> unrouted
    assert d["mutual_info"] == pytest.approx(math.log(2))


def test_loss_free_bias_moves_the_recorded_top1():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="loss-free", router_args={"top_k": 1}).eval()
    with torch.no_grad():  # scores favour expert 0 for every token; a large bias on expert 2 overrides it
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, :] = 1.0
        layer.router.expert_bias[2] = 10.0
    d = _per_layer(layer, torch.ones(2, 8, D))
    assert d["counts"] == [0, 0, 16, 0]
    assert d["top1_counts"] == [0, 0, 16, 0]
    assert np.array(d["label_by_expert"])[:, 2].sum() == 16


def test_capacity_drops_of_every_choice_make_a_token_unrouted():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="softmax-topk", router_args={"top_k": 1}, capacity_factor=0.25).eval()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, :] = 1.0  # every token picks expert 0
    d = _per_layer(layer, torch.ones(1, 8, D))
    # capacity ceil(0.25 * 8 / 4) = 1: one token kept, seven dropped and sent nowhere
    assert d["counts"] == [1, 0, 0, 0] and d["unrouted_tokens"] == 7
    assert d["drop_rate"] == pytest.approx(7 / 8)
    assert d["near_dead_experts"] == 3 and d["max_vio"] == pytest.approx(3.0)
    assert (d["min_load_share"], d["max_load_share"]) == (0.0, 1.0)


def test_apply_capacity_keeps_routing_for_reference():
    # guard for the spy above: capacity returns a Routing whose pairs are the kept ones
    from moebench.core.routing import topk_routing

    r = topk_routing(torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), 4)
    kept = apply_capacity(r, 0.25)
    assert kept.num_pairs == 1 and kept.dropped == 7


def test_load_diagnostics_hand_values():
    c = [100, 100, 100, 0.5 * 0.01 * 300.5 / 4]  # last expert below 1 % of the uniform share
    assert M.near_dead_experts(c) == 1
    assert M.near_dead_experts([10, 10, 10, 10]) == 0
    assert M.max_violation([30, 10, 0, 0]) == pytest.approx(30 / 10 - 1)
    assert M.load_share_range([30, 10, 0, 0]) == (0.0, 0.75)


def test_overlap_with_final_and_last_fluctuation_step():
    hist = [np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])]
    steps = [10, 20, 30, 40]
    assert M.overlap_with_final(hist) == [0.5, 0.75, 1.0, 1.0]
    assert M.last_fluctuation_step(hist, steps) == 30  # the last change happens at the third evaluation
    assert M.last_fluctuation_step(hist[:1] * 3, steps[:3]) == 10  # never changed
    assert M.last_fluctuation_step([], []) is None
