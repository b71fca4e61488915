"""Hand-computed cases for routers and expert variants (gated and shared experts, deepseek-v3, soft-moe,
top-p, remoe, null experts, BASE, sinkhorn, priority capacity) and the properties that define each.
Equality with `transformers` lives in tests/test_peers.py."""

from __future__ import annotations

import math

import pytest
import torch
from reference_moe import fixed_routing
from router_cases import EVAL, TRAIN, build, set_gate

from moebench.core.config import EXPERT_ACTIVATIONS
from moebench.core.experts import ACTIVATIONS, Experts
from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS
from moebench.core.routing import Routing, RoutingContext

e = math.e


def silu(v):
    return v / (1 + math.exp(-v))


def pairs(routing):
    return {(t, ex): w for t, ex, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist())}


@pytest.mark.parametrize("name", ["deepseek-v3", "soft-moe", "top-p"])
def test_registered_with_paper_and_formula(name):
    doc = __import__(ROUTERS.get(name).__module__, fromlist=["_"]).__doc__
    assert "20" in doc and "=" in doc
    assert name in ROUTERS.names()


# --- gated experts ----------------------------------------------------------------------------------


def test_config_lists_the_experts_activations():
    assert set(EXPERT_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize(
    "act,gate_fn", [("swiglu", silu), ("geglu", lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))]
)
def test_gated_expert_hand_case(act, gate_fn):
    # d = 2, h = 1: W1 = [W_gate | W_up] = [[1, 2], [0, 1]], W2 = [[2, -1]]; x = (1, 1): gate 1, up 3
    ex = Experts(1, 2, 1, act)
    assert ex.w1.shape == (1, 2, 2) and ex.gated
    with torch.no_grad():
        ex.w1.copy_(torch.tensor([[[1.0, 2.0], [0.0, 1.0]]]))
        ex.w2.copy_(torch.tensor([[[2.0, -1.0]]]))
        ex.b1.zero_()
        ex.b2.zero_()
    y = ex(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    h = gate_fn(1.0) * 3.0
    torch.testing.assert_close(y, torch.tensor([[2 * h, -h]]))
    # 3 matrices of d x h instead of 2: 3/2 the FLOPs and the matrix parameters
    assert Experts(4, 8, 16, act).flops_per_expert() == 1.5 * Experts(4, 8, 16, "gelu").flops_per_expert()


def test_gated_experts_cannot_upcycle_a_dense_mlp():
    with pytest.raises(ValueError, match="cannot upcycle a dense.*swiglu"):
        Experts(2, 4, 8, "swiglu").load_dense(torch.randn(8, 4), None, torch.randn(4, 8), None)


# --- shared experts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_are_n_always_on_experts(act, gate):
    d, h, n = 8, 4, 3
    layer = MoELayer(d, h, 4, router="softmax-topk", activation=act, shared_experts=n, shared_expert_gate=gate)
    x = torch.randn(5, d)
    no_pairs = Routing(
        token=torch.zeros(0, dtype=torch.long),
        expert=torch.zeros(0, dtype=torch.long),
        weight=torch.zeros(0),
        num_tokens=5,
        num_experts=4,
    )
    with fixed_routing(layer, no_pairs):
        y = layer(x)
    mlp = layer.shared.mlp
    w1, b1 = mlp.w1[0], mlp.b1[0]
    expected = mlp.b2[0].expand(5, d).clone()
    for j in range(n):  # the N experts of width h, one by one (gated: [gates | ups], each N*h wide)
        cols = torch.arange(j * h, (j + 1) * h)
        if act == "swiglu":
            cols = torch.cat([cols, cols + n * h])
        hid = mlp.act(x @ w1[:, cols] + b1[cols])
        expected = expected + hid @ mlp.w2[0][j * h : (j + 1) * h]
    if gate:
        expected = torch.sigmoid(x @ layer.shared.gate.weight[0]).unsqueeze(1) * expected
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # every token pays for the shared experts
    plain = MoELayer(d, h, 4, router="softmax-topk", activation=act)
    extra = n * plain.experts.flops_per_expert() + (2 * d if gate else 0)
    assert layer.flops_per_token() == pytest.approx(plain.flops_per_token() + extra)


# --- deepseek-v3 ------------------------------------------------------------------------------------


def _logit(p):
    return math.log(p / (1 - p))


def test_deepseek_v3_group_limited_hand_case():
    # 4 experts in 2 groups {0, 1}, {2, 3}; one group allowed; top-2. Scores (.6, .6 | .9, .1):
    # group sums of top-2 are 1.2 and 1.0, so group 0 wins although expert 2 is the single best.
    r = build("deepseek-v3", 1, 4, top_k=2, num_groups=2, group_top_k=1, scaling=2.5)
    set_gate(r, [[_logit(0.6)], [_logit(0.6)], [_logit(0.9)], [_logit(0.1)]])
    x = torch.ones(1, 1)
    assert pairs(r(x, EVAL)) == {(0, 0): pytest.approx(1.25), (0, 1): pytest.approx(1.25)}
    # the bias moves selection only: +0.5 on expert 3 gives group 1 the sum 1.5 > 1.2; weights stay unbiased
    r.expert_bias = torch.tensor([0.0, 0.0, 0.0, 0.5])
    assert pairs(r(x, EVAL)) == {(0, 2): pytest.approx(2.5 * 0.9), (0, 3): pytest.approx(2.5 * 0.1)}
    # without the group limit the best two are 2 and 0/1 (.9 and .6)
    free = build("deepseek-v3", 1, 4, top_k=2, num_groups=1)
    set_gate(free, [[_logit(0.6)], [_logit(0.5)], [_logit(0.9)], [_logit(0.1)]])
    assert pairs(free(x, EVAL)) == {(0, 2): pytest.approx(0.9 / 1.5), (0, 0): pytest.approx(0.6 / 1.5)}
    assert r(x, EVAL).aux_losses == {}


def test_deepseek_v3_bias_update_is_loss_free():
    r = build("deepseek-v3", 2, 4, top_k=1, num_groups=1, update_rate=0.1)
    set_gate(r, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, -1.0]])
    x = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    r(x, TRAIN)  # loads (3, 1, 0, 0), mean 1
    r.after_step()
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    assert "expert_bias" not in dict(r.named_parameters())


def test_deepseek_v3_defaults_and_errors():
    r = build("deepseek-v3", 8, 8)
    assert (r.num_groups, r.group_top_k, r.scaling) == (4, 2, 1.0)
    assert build("deepseek-v3", 8, 6).num_groups == 1
    with pytest.raises(ValueError, match="num_groups=3 must be a positive divisor of num_experts=8"):
        build("deepseek-v3", 8, 8, num_groups=3)
    with pytest.raises(ValueError, match="top_k=4 exceeds the experts of the 1 allowed groups"):
        build("deepseek-v3", 8, 8, top_k=4, num_groups=4, group_top_k=1)


# --- soft-moe ---------------------------------------------------------------------------------------


def test_soft_moe_hand_case():
    # one sequence of 2 tokens, 2 experts x 1 slot, Phi = I, no normalisation: logits = X
    r = build("soft-moe", 2, 2, normalize=False)
    with torch.no_grad():
        r.phi.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = r(x, RoutingContext(seq_len=2))
    a, b = e / (e + 1), e**2 / (e**2 + 1)
    # dispatch: softmax over tokens (columns); combine: softmax over slots (rows)
    torch.testing.assert_close(out.dispatch[0], torch.tensor([[a, 1 - b], [1 - a, b]]))
    torch.testing.assert_close(out.combine[0], torch.tensor([[a, 1 - a], [1 - b, b]]))
    assert out.num_pairs == 0 and out.counts().tolist() == [1, 1]
    # through the layer with identity experts (relu, W = I, no bias, positive inputs): y = C D^T X
    layer = MoELayer(2, 2, 2, router="soft-moe", router_args={"normalize": False}, activation="relu")
    with torch.no_grad():
        layer.router.phi.copy_(torch.eye(2))
        layer.experts.w1.copy_(torch.eye(2).expand(2, 2, 2))
        layer.experts.w2.copy_(torch.eye(2).expand(2, 2, 2))
        layer.experts.b1.zero_()
        layer.experts.b2.zero_()
    y = layer(x.unsqueeze(0))[0]
    slots = [(a * 1, (1 - a) * 2), ((1 - b) * 1, b * 2)]
    expected = [
        [a * slots[0][0] + (1 - a) * slots[1][0], a * slots[0][1] + (1 - a) * slots[1][1]],
        [(1 - b) * slots[0][0] + b * slots[1][0], (1 - b) * slots[0][1] + b * slots[1][1]],
    ]
    torch.testing.assert_close(y, torch.tensor(expected))
    assert layer.stats["counts"].tolist() == [1, 1] and layer.stats["dropped"] == 0
    # routing statistics: every token reaches the experts (none unrouted); its top-1 is the expert
    # carrying most of its combine weight (a > 1/2 for token 0 on expert 0, b > 1/2 for token 1 on 1)
    assert int(layer.stats["unrouted_tokens"]) == 0 and layer.stats["top1"].tolist() == [0, 1]


def test_soft_moe_mixes_within_a_sequence_only_and_counts_slots():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="soft-moe", router_args={"slots_per_expert": 3})
    x = torch.randn(2, 6, 8)
    y = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn(6, 8)
    torch.testing.assert_close(layer(x2)[0], y[0])  # sequence 0 does not see sequence 1
    assert layer.stats["counts"].tolist() == [6, 6, 6, 6]  # 2 sequences x 3 slots per expert
    # FLOP matching: E * S slot evaluations per sequence of N tokens = E * S / N experts per token
    assert layer.router.active_experts_per_token == pytest.approx(4 * 3 / 6)
    assert layer.flops_per_token() == pytest.approx(2 * layer.experts.flops_per_expert() + 3 * 2 * 8 * 12)
    fresh = build("soft-moe", 8, 4, slots_per_expert=2)
    with pytest.raises(ValueError, match="set router_args.tokens_per_sequence"):
        _ = fresh.active_experts_per_token
    assert build("soft-moe", 8, 4, slots_per_expert=2, tokens_per_sequence=16).active_experts_per_token == 0.5
    with pytest.raises(ValueError, match=r"args.slots_per_expert: expected an integer >= 1, got 0"):
        build("soft-moe", 8, 4, slots_per_expert=0)


# --- top-p ------------------------------------------------------------------------------------------


def test_top_p_hand_case():
    r = build("top-p", 3, 3, p=0.6, dynamic_weight=0.1, balance_weight=0.0)
    set_gate(r, torch.eye(3))
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2]])
    out = r(probs.log(), EVAL)
    # token 0: 0.5 < 0.6 so expert 1 joins (0.8 >= 0.6); token 1: 0.7 alone reaches 0.6
    assert pairs(out) == {(0, 0): pytest.approx(0.5), (0, 1): pytest.approx(0.3), (1, 1): pytest.approx(0.7)}
    assert out.slot.tolist() == [0, 1, 0]
    entropy = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    torch.testing.assert_close(out.aux_losses["dynamic"], torch.tensor(0.1 * sum(entropy) / 2))
    assert float(out.stats["experts_per_token"]) == 1.5
    assert r.active_experts_per_token == 1.5  # measured, not assumed
    capped = build("top-p", 3, 3, p=1.0, max_k=2)
    set_gate(capped, torch.eye(3))
    assert capped(probs.log(), EVAL).num_pairs == 4


def test_top_p_active_experts_prefers_evaluation_mean():
    r = build("top-p", 4, 4, expected_experts=2.5)
    assert r.active_experts_per_token == 2.5  # nothing seen yet: the declared value grids match to
    a = r(torch.randn(10, 4), TRAIN)
    b = r(torch.randn(6, 4), TRAIN)
    assert r.active_experts_per_token == pytest.approx((a.num_pairs + b.num_pairs) / 16)
    out = r(torch.randn(8, 4) * 3, EVAL)
    assert r.active_experts_per_token == pytest.approx(out.num_pairs / 8)
    with pytest.raises(ValueError, match=r"args.p: expected a number > 0 and <= 1, got 0.0"):
        build("top-p", 4, 4, p=0.0)


# --- remoe ------------------------------------------------------------------------------------------


def test_remoe_hand_case_and_adaptive_l1():
    r = build("remoe", 3, 3, top_k=1, lambda_init=0.01, alpha=2.0)
    set_gate(r, torch.eye(3))
    x = torch.tensor([[1.0, -1.0, 2.0]])
    out = r(x, TRAIN)
    assert pairs(out) == {(0, 0): 1.0, (0, 2): 2.0}  # ReLU gates, only the positive ones run
    # f = E / (k T) * active counts = 3 * (1, 0, 1); reg = lambda * (1 * 3 + 2 * 3)
    torch.testing.assert_close(out.aux_losses["l1"], torch.tensor(0.01 * 9))
    assert float(out.stats["sparsity"]) == pytest.approx(1 / 3)
    r.after_step()  # sparsity 1/3 < target 1 - 1/3: lambda doubles
    assert float(r.l1_weight) == pytest.approx(0.02)
    r(torch.tensor([[-1.0, -1.0, 2.0]]), TRAIN)  # sparsity 2/3 = target: unchanged
    r.after_step()
    assert float(r.l1_weight) == pytest.approx(0.02)
    r(-torch.ones(1, 3), TRAIN)  # all zero: too sparse, lambda halves
    r.after_step()
    assert float(r.l1_weight) == pytest.approx(0.01)
    r(x, EVAL)
    r.after_step()
    assert float(r.l1_weight) == pytest.approx(0.01), "evaluation forwards do not steer lambda"
    assert r.active_experts_per_token == 2.0  # measured in evaluation: 2 experts for that token


def test_remoe_l1_drives_sparsity_toward_target():
    torch.manual_seed(0)
    r = build("remoe", 8, 8, top_k=2, lambda_init=1e-3, alpha=1.2)
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    x = torch.randn(256, 8) + 1.0  # a shared mean direction the gates can turn away from
    start = float(r(x, EVAL).stats["sparsity"])
    for _ in range(150):
        out = r(x, TRAIN)
        opt.zero_grad()
        out.aux_losses["l1"].backward()
        opt.step()
        r.after_step()
    end = float(r(x, EVAL).stats["sparsity"])
    assert start < 0.65 and abs(end - 0.75) < abs(start - 0.75) and end > 0.65, (start, end)


# --- null experts -----------------------------------------------------------------------------------


def test_null_experts_hand_case():
    d = 4
    layer = MoELayer(d, 8, 2, router="softmax-topk", null_experts=4)  # experts 2..5: zero, copy, constant x2
    assert layer.null.kinds == ["zero", "copy", "constant", "constant"]
    assert layer.router.num_experts == 6 and layer.experts.num_experts == 2
    x = torch.randn(3, d)
    with torch.no_grad():
        layer.null.vectors.copy_(torch.arange(2 * d, dtype=torch.float32).reshape(2, d))
        layer.null.mix.zero_()  # a = softmax(0) = (1/2, 1/2)
    routing = Routing(
        token=torch.tensor([0, 1, 2, 2]),
        expert=torch.tensor([2, 3, 5, 0]),
        weight=torch.tensor([0.9, 0.5, 0.25, 0.75]),
        num_tokens=3,
        num_experts=6,
        slot=torch.tensor([0, 0, 0, 1]),
    )
    with fixed_routing(layer, routing):
        y = layer(x)
    ex = layer.experts
    expert0 = ex.act(x[2] @ ex.w1[0] + ex.b1[0]) @ ex.w2[0] + ex.b2[0]
    torch.testing.assert_close(y[0], torch.zeros(d))  # zero expert
    torch.testing.assert_close(y[1], 0.5 * x[1])  # copy expert
    torch.testing.assert_close(y[2], 0.25 * (0.5 * x[2] + 0.5 * layer.null.vectors[1]) + 0.75 * expert0)
    assert layer.stats["counts"].tolist() == [1, 0]
    assert float(layer.stats["null_share"]) == 0.75
    assert layer.stats["scores"] is None or layer.stats["scores"].shape[1] == 2
    # FLOPs: only the real experts a token visited (1 of 3 tokens here), not k = 2
    assert layer.real_experts_per_token() == pytest.approx(1 / 3)


# --- the layer options against the slow reference ---------------------------------------------------

LAYER_OPTIONS = [
    ("softmax-topk", {}, {"activation": "swiglu"}),
    ("softmax-topk", {}, {"activation": "geglu", "shared_experts": 2}),
    ("deepseek-v3", {}, {"activation": "swiglu", "shared_experts": 1, "shared_expert_gate": True}),
    ("softmax-topk", {"top_k": 3}, {"null_experts": 4}),
    ("switch", {}, {"null_experts": 3, "shared_experts": 1}),
    ("soft-moe", {"slots_per_expert": 2}, {"activation": "swiglu", "shared_experts": 1}),
    ("softmax-topk", {}, {"capacity_factor": 0.5, "capacity_policy": "priority"}),
    ("switch", {}, {"capacity_policy": "priority", "null_experts": 2}),
]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "fallback"])
@pytest.mark.parametrize("name,args,options", LAYER_OPTIONS)
def test_layer_options_match_reference(name, args, options, grouped):
    from reference_moe import recorded_routing, reference_forward

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router=name, router_args=args, **options).train()
    layer.experts.use_grouped_mm = grouped
    if layer.null is not None:
        with torch.no_grad():
            layer.null.mix.normal_()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with recorded_routing(layer) as routings:
        fast = layer(x)
    ref = reference_forward(layer, x, routings[0])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(fast.sum(), params, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), params, retain_graph=True, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().sum() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if layer.null is not None:
        assert any(int(ex) >= 4 for ex in routings[0].expert), "the case must route some pairs to null experts"


# --- base / sinkhorn --------------------------------------------------------------------------------


def test_base_assignment_hand_case_and_optimality():
    from itertools import product

    from moebench.routers.base_layers import balanced_assignment

    # every token prefers expert 0; with capacity 1 the best total gives expert 0 to token 1 (largest margin)
    scores = torch.tensor([[1.0, 0.9], [1.0, 0.0]])
    assert balanced_assignment(scores, 1, eps=1e-4).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(10):  # against brute force: 6 tokens, 3 experts, capacity 2
        s = torch.randn(6, 3, generator=g)
        a = balanced_assignment(s, 2, eps=1e-5)
        assert torch.bincount(a, minlength=3).max() <= 2
        best = max(
            sum(float(s[t, p[t]]) for t in range(6))
            for p in product(range(3), repeat=6)
            if max(p.count(ex) for ex in range(3)) <= 2
        )
        assert sum(float(s[t, a[t]]) for t in range(6)) >= best - 6e-5


def test_base_router_balanced_in_training_greedy_in_eval():
    r = build("base", 2, 2)
    set_gate(r, torch.eye(2))
    x = torch.tensor([[1.0, 0.9], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    train = r(x, TRAIN)
    assert train.counts().tolist() == [2, 2]
    assert train.expert.tolist() == [1, 0, 0, 1]  # token 0 and 3 lose the least by moving
    torch.testing.assert_close(train.weight, torch.sigmoid(torch.tensor([0.9, 1.0, 2.0, 0.0])))
    assert r(x, EVAL).expert.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="top-1 by definition"):
        build("base", 2, 2, top_k=2)


def test_sinkhorn_balances_a_skewed_router():
    from moebench.routers.sinkhorn import sinkhorn

    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    p = sinkhorn(logits, 50)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    torch.testing.assert_close(p.sum(0), torch.full((2,), 2.0))
    r = build("sinkhorn", 2, 2, iterations=50)
    set_gate(r, torch.eye(2))
    out = r(logits, TRAIN)
    assert out.counts().tolist() == [2, 2]  # greedy would send all four to expert 0
    assert out.expert.tolist() == [0, 1, 0, 1]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(out.weight, probs[torch.arange(4), out.expert])  # raw probabilities
    assert r(logits, EVAL).expert.tolist() == [0, 0, 0, 0]


# --- capacity policy (V-MoE batch-prioritised routing) -----------------------------------------------


def test_priority_capacity_keeps_confident_tokens():
    from moebench.core.routing import apply_capacity

    # 4 tokens all to expert 0 (top-1), capacity ceil(0.5 * 4 / 2) = 1: position keeps token 0,
    # priority keeps the token with the highest top gate score (token 2)
    scores = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.55, 0.45]])
    routing = Routing(
        token=torch.arange(4),
        expert=torch.zeros(4, dtype=torch.long),
        weight=scores[:, 0],
        num_tokens=4,
        num_experts=2,
        slot=torch.zeros(4, dtype=torch.long),
        stats={"scores": scores},
    )
    assert apply_capacity(routing, 0.5).token.tolist() == [0]
    assert apply_capacity(routing, 0.5, "priority").token.tolist() == [2]
    assert apply_capacity(routing, 1.0, "priority").token.tolist() == [1, 2]
    # k-major still holds: a confident token's second choice loses to any first choice
    two = Routing(
        token=torch.tensor([0, 0, 1]),
        expert=torch.tensor([1, 0, 0]),
        weight=torch.ones(3),
        num_tokens=2,
        num_experts=2,
        slot=torch.tensor([0, 1, 0]),
        stats={"scores": torch.tensor([[0.2, 0.8], [0.6, 0.4]])},
    )
    assert sorted(
        zip(
            *[
                t.tolist()
                for t in (apply_capacity(two, 0.5, "priority").token, apply_capacity(two, 0.5, "priority").expert)
            ]
        )
    ) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="capacity policy 'random' is unknown"):
        apply_capacity(routing, 0.5, "random")
    layer = MoELayer(
        4, 8, 2, router="softmax-topk", router_args={"top_k": 1}, capacity_factor=0.5, capacity_policy="priority"
    )
    with fixed_routing(layer, routing):
        layer(torch.randn(4, 4))
    assert layer.stats["counts"].tolist() == [1, 0] and layer.stats["dropped"] == 3


# --- global-batch balance loss -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["switch", "softmax-topk"])
def test_global_batch_balance_accumulates_over_micro_batches(name):
    kw = {"top_k": 1, "balance_weight": 1.0}
    if name == "switch":
        kw.update(jitter=0.0, z_weight=0.0)
    micro, glob = build(name, 2, 2, **kw), build(name, 2, 2, balance_scope="global", **kw)
    for r in (micro, glob):
        set_gate(r, torch.eye(2))
    a = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # micro-batch 1: both tokens to expert 0
    b = torch.tensor([[0.0, 3.0], [0.0, 3.0]])  # micro-batch 2: both to expert 1
    p_b = torch.softmax(b, -1).mean(0)
    glob(a, TRAIN)
    got = glob(b, TRAIN).aux_losses["balance"]
    # global f over both micro-batches = (1/2, 1/2); micro f = (0, 1)
    torch.testing.assert_close(got, 2 * (0.5 * p_b).sum())
    torch.testing.assert_close(micro(b, TRAIN).aux_losses["balance"], 2 * p_b[1])
    glob.after_step()  # a new step starts from zero
    torch.testing.assert_close(glob(b, TRAIN).aux_losses["balance"], 2 * p_b[1])
    torch.testing.assert_close(glob(b, EVAL).aux_losses["balance"], 2 * p_b[1])
    with pytest.raises(ValueError, match=r"args.balance_scope: expected one of micro, global, got 'batch'"):
        build(name, 2, 2, balance_scope="batch")


def test_softmax_topk_has_no_balance_loss_by_default():
    assert build("softmax-topk", 4, 4)(torch.randn(3, 4), TRAIN).aux_losses == {}


# --- the routers-all grid -------------------------------------------------------------------------------


def test_routers_all_grid_covers_every_router_flop_matched():
    from moebench.grids import expand as expand_mod

    specs = expand_mod.expand("routers-all")
    routers = {s["moe"]["router"] if s["moe"] else "dense" for s in specs}
    layer_routers = {
        n
        for n in ROUTERS.builtin_names()
        if not getattr(ROUTERS.get(n), "image_level", False)
        and (n == "random" or not getattr(ROUTERS.get(n), "control", False))
    }
    # image-level ermoe-released: the ermoe-readings grid; the oracle and collapse controls: structure
    assert routers == layer_routers | {"dense"}
    assert {s["seed"] for s in specs} == {0, 1, 2}
    assert len({s["match"]["expert_flops_per_token"] for s in specs if s["moe"]}) == 1
    by_label = {s["label"]: s for s in specs if s["seed"] == 0}
    assert by_label["shared1-top1"]["moe"]["shared_experts"] == 1
    assert by_label["shared1-top1"]["moe"]["d_hidden"] == 128  # 1 shared + top-1 = 2 experts per token
    assert by_label["null-experts"]["moe"]["null_experts"] == 4
    assert by_label["switch-priority"]["moe"]["capacity_policy"] == "priority"
    assert by_label["soft-moe"]["match"]["active_experts_per_token"] == 2.0


def test_new_schema_keys_leave_run_ids_alone_at_their_defaults():
    """A spec that spells a 2026 moe / train key at its default names the same run as one that leaves
    it out (so adding an option reruns nothing), and a non-default value makes a new run."""
    from moebench.grids import expand as expand_mod
    from moebench.training.spec import ID_OPTIONAL, run_id

    spec = expand_mod.expand("toy")[1]
    assert spec["moe"] is not None
    bare = {
        **spec,
        "moe": {k: v for k, v in spec["moe"].items() if k not in ID_OPTIONAL["moe"]},
        "train": {k: v for k, v in spec["train"].items() if k not in ID_OPTIONAL["train"]},
    }
    assert run_id(bare) == run_id(spec)
    assert run_id({**spec, "moe": {**spec["moe"], "capacity_policy": "position"}}) == run_id(spec)
    assert run_id({**spec, "moe": {**spec["moe"], "shared_experts": 1}}) != run_id(spec)
