"""Each router against hand-computed cases, plus the properties that define it (balance-loss values,
expert-choice capacity, hash content-independence, loss-free bias dynamics, X-MoE temperature)."""

from __future__ import annotations

import math

import pytest
import torch
from router_cases import EVAL, TRAIN, build, set_gate

from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS
from moebench.core.routing import Router, RoutingContext

e = math.e


def by_token(routing):
    """{token: [(expert, weight), ...]} in slot order."""
    out: dict[int, list] = {}
    for t, ex, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist()):
        out.setdefault(t, []).append((ex, w))
    return out


def cv(counts):
    counts = counts.float()
    return float(counts.std(unbiased=False) / counts.mean())


# --- every router ---------------------------------------------------------------------------------

MINE = ["switch", "expert-choice", "hash", "xmoe", "loss-free"]


@pytest.mark.parametrize("name", MINE)
def test_registered_with_description_and_formula(name):
    cls = ROUTERS.get(name)
    assert issubclass(cls, Router)
    assert dict(ROUTERS.describe())[name]
    doc = __import__(cls.__module__, fromlist=["_"]).__doc__
    assert re_year(doc), f"{name}: module docstring must cite the paper (author, year)"
    assert "=" in doc, f"{name}: module docstring must give the formula"


def re_year(text):
    import re

    return re.search(r"(19|20)\d\d", text or "")


@pytest.mark.parametrize("name", MINE)
def test_computes_in_float32_and_returns_valid_routing(name):
    router = build(name, 8, 4, **({"top_k": 1} if name == "switch" else {}))
    x = torch.randn(10, 8).bfloat16()
    r = router(x, RoutingContext(positions=torch.arange(10), training=True))
    assert r.weight.dtype == torch.float32
    assert r.num_tokens == 10 and r.num_experts == 4
    assert r.token.shape == r.expert.shape == r.weight.shape
    assert int(r.expert.min()) >= 0 and int(r.expert.max()) < 4
    assert r.stats["scores"].shape == (10, 4)
    for k, v in r.aux_losses.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
    if r.slot is not None:  # token choice: each token's experts are distinct
        for _t, pairs in by_token(r).items():
            experts = [p[0] for p in pairs]
            assert len(set(experts)) == len(experts)


# --- switch -------------------------------------------------------------------------------------


def test_switch_hand_case():
    r = build("switch", 2, 2, balance_weight=0.01, z_weight=1e-3)
    set_gate(r, torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    out = r(x, EVAL)
    assert out.expert.tolist() == [0, 1, 0]
    assert out.token.tolist() == [0, 1, 2]
    expected_w = [e / (e + 1), e**2 / (e**2 + 1), e**3 / (e**3 + 1)]  # raw probability, not renormalised
    torch.testing.assert_close(out.weight, torch.tensor(expected_w))
    p0 = (e / (e + 1) + 1 / (1 + e**2) + e**3 / (e**3 + 1)) / 3
    balance = 0.01 * 2 * (2 / 3 * p0 + 1 / 3 * (1 - p0))
    z = 1e-3 * (math.log(e + 1) ** 2 + math.log(e**2 + 1) ** 2 + math.log(e**3 + 1) ** 2) / 3
    torch.testing.assert_close(out.aux_losses["balance"], torch.tensor(balance))
    torch.testing.assert_close(out.aux_losses["z"], torch.tensor(z))
    assert set(out.aux_losses) == {"balance", "z"}


def test_switch_balance_is_weight_at_uniform_and_grows_with_imbalance():
    w = 0.01
    r = build("switch", 4, 4, balance_weight=w)
    set_gate(r, torch.eye(4))
    # perfectly balanced: each token points at a different expert -> f_i = P_i = 1/4
    balanced = 5.0 * torch.eye(4)
    torch.testing.assert_close(r(balanced, EVAL).aux_losses["balance"], torch.tensor(1.0 * w))
    # uniform probabilities (zero logits) -> P_i = 1/E -> exactly 1 whatever f is
    torch.testing.assert_close(r(torch.zeros(6, 4), EVAL).aux_losses["balance"], torch.tensor(1.0 * w))
    values = []
    for m in range(4):  # redirect m tokens to expert 0
        x = balanced.clone()
        x[1 : m + 1] = torch.tensor([5.0, 0, 0, 0])
        values.append(float(r(x, EVAL).aux_losses["balance"].detach()))
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > 3.5 * w  # near the maximum E * w when everything collapses onto one expert


def test_switch_jitter_training_only_and_top1_only():
    r = build("switch", 8, 4, jitter=0.2)
    x = torch.randn(32, 8)
    a, b = r(x, TRAIN), r(x, TRAIN)
    assert not torch.equal(a.weight, b.weight), "training must jitter the router input"
    c, d = r(x, EVAL), r(x, EVAL)
    assert torch.equal(c.weight, d.weight) and torch.equal(c.expert, d.expert)
    # jitter is multiplicative within [1 - eps, 1 + eps]: probabilities stay close to the clean ones
    clean = torch.softmax(x @ r.gate.weight.t(), -1)
    assert (a.stats["scores"] - clean).abs().max() < 0.5
    r0 = build("switch", 8, 4, jitter=0.0)
    assert torch.equal(r0(x, TRAIN).weight, r0(x, TRAIN).weight)
    with pytest.raises(ValueError, match=r"args.top_k: expected one of 1, got 2 .*use top_k: 1"):
        build("switch", 8, 4, top_k=2)
    with pytest.raises(ValueError, match="jitter"):
        build("switch", 8, 4, jitter=1.5)


def test_switch_capacity_defaults():
    r = build("switch", 8, 4)
    assert r.default_capacity_factor(True) == 1.25 and r.default_capacity_factor(False) == 2.0
    layer = MoELayer(8, 16, 4, router="switch")
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0  # x with positive mean -> most tokens pick expert 0
    x = torch.rand(40, 8) + 0.5
    layer.train()(x)
    assert int(layer.stats["counts"].max()) == math.ceil(1.25 * 40 / 4)
    layer.eval()(x)
    assert int(layer.stats["counts"].max()) == math.ceil(2.0 * 40 / 4)


# --- expert choice -------------------------------------------------------------------------------


def test_expert_choice_hand_case():
    r = build("expert-choice", 2, 2, capacity=1)  # C = ceil(4 * 1 / 2) = 2
    set_gate(r, torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    out = r(x, EVAL)
    p0 = [e**2 / (e**2 + 1), 1 / (1 + e), e / (e + 1), 1 / (1 + e**3)]
    got = {(t, ex): w for t, ex, w in zip(out.token.tolist(), out.expert.tolist(), out.weight.tolist())}
    assert set(got) == {(0, 0), (2, 0), (3, 1), (1, 1)}
    assert got[(0, 0)] == pytest.approx(p0[0]) and got[(2, 0)] == pytest.approx(p0[2])
    assert got[(3, 1)] == pytest.approx(1 - p0[3]) and got[(1, 1)] == pytest.approx(1 - p0[1])
    assert float(out.stats["unrouted"]) == 0.0
    assert out.aux_losses == {}
    assert r.active_experts_per_token == 1.0


def test_expert_choice_unrouted_tokens():
    # scores set through logits = log p: token 0 is every expert's favourite for experts 0 and 1
    r = build("expert-choice", 3, 3, capacity=1)  # C = ceil(3 * 1 / 3) = 1
    set_gate(r, torch.eye(3))
    p = torch.tensor([[0.45, 0.45, 0.10], [0.30, 0.30, 0.40], [0.35, 0.35, 0.30]])
    out = r(p.log(), EVAL)
    assert sorted(zip(out.expert.tolist(), out.token.tolist())) == [(0, 0), (1, 0), (2, 1)]
    torch.testing.assert_close(out.weight.sort().values, torch.tensor([0.40, 0.45, 0.45]))
    assert float(out.stats["unrouted"]) == pytest.approx(1 / 3)
    layer = MoELayer(3, 8, 3, router="expert-choice", router_args={"capacity": 1})
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(3))
    y = layer(p.log())
    assert layer.stats["unrouted_tokens"] == 1
    assert torch.equal(y[2], torch.zeros(3)), "a token no expert picked contributes zero"


@pytest.mark.parametrize("capacity,num_experts", [(2, 4), (1, 4), (0.5, 4), (1.5, 3)])
def test_expert_choice_every_expert_gets_exactly_c(capacity, num_experts):
    T = 24
    r = build("expert-choice", 8, num_experts, capacity=capacity)
    out = r(torch.randn(T, 8), TRAIN)
    c = min(T, math.ceil(T * capacity / num_experts))
    assert torch.equal(out.counts(), torch.full((num_experts,), c))
    for ex in range(num_experts):  # no token twice for one expert
        toks = out.token[out.expert == ex]
        assert toks.unique().numel() == c


def test_expert_choice_capacity_capped_at_tokens_and_validated():
    r = build("expert-choice", 8, 2, capacity=3)  # ceil(T * 3 / 2) > T
    out = r(torch.randn(5, 8), EVAL)
    assert torch.equal(out.counts(), torch.tensor([5, 5]))
    assert r.active_experts_per_token == 2.0
    assert build("expert-choice", 8, 4, top_k=1).capacity == 1.0  # top_k is an alias for capacity
    with pytest.raises(ValueError, match=r"args.capacity: expected a number > 0 or null"):
        build("expert-choice", 8, 4, capacity=0)
    with pytest.raises(ValueError, match="set only one of them"):
        build("expert-choice", 8, 4, capacity=2, top_k=1)


# --- hash ---------------------------------------------------------------------------------------


def test_hash_position_hand_case():
    r = build("hash", 4, 4, top_k=2)
    r.position_table = torch.tensor([2, 0, 3, 1])
    ctx = RoutingContext(positions=torch.tensor([0, 1, 2, 3, 4, 5]))
    out = r(torch.randn(6, 4), ctx)
    assert by_token(out) == {
        0: [(2, 0.5), (3, 0.5)],
        1: [(0, 0.5), (1, 0.5)],
        2: [(3, 0.5), (0, 0.5)],
        3: [(1, 0.5), (2, 0.5)],
        4: [(2, 0.5), (3, 0.5)],
        5: [(0, 0.5), (1, 0.5)],
    }
    assert list(r.parameters()) == [], "hash routing learns nothing"


def test_hash_position_ignores_content_and_is_balanced():
    E = 4
    r = build("hash", 8, E)
    pos = torch.arange(12).repeat(3)  # 3 sequences of 12 tokens
    ctx = RoutingContext(positions=pos, training=True)
    a = r(torch.randn(36, 8), ctx)
    b = r(100 * torch.randn(36, 8), ctx)
    assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.counts(), torch.full((E,), 9)), "positions are spread evenly over experts"
    assert torch.equal(a.expert[:12], a.expert[12:24]), "same position -> same expert in every sequence"
    # the table is fixed by the seed: a rebuilt router (another rank, a resumed run) agrees
    assert torch.equal(build("hash", 8, E).position_table, r.position_table)
    assert not torch.equal(build("hash", 8, E, seed=1).position_table, r.position_table)
    # through the layer: two different inputs of the same shape are routed identically
    layer = MoELayer(8, 16, E, router="hash", router_args={"top_k": 2})
    layer(torch.randn(3, 12, 8))
    c1 = layer.stats["counts"].clone()
    layer(torch.randn(3, 12, 8) * 7)
    assert torch.equal(c1, layer.stats["counts"])


def test_hash_token_id():
    r = build("hash", 4, 4, by="token-id")
    r.hash_coeffs = torch.tensor([3, 1])
    ids = torch.tensor([5, 2, 0, 5])
    out = r(torch.randn(4, 4), RoutingContext(token_ids=ids))
    # ((3 * id + 1) mod (2^31 - 1)) mod 4
    assert out.expert.tolist() == [16 % 4, 7 % 4, 1 % 4, 16 % 4]
    assert torch.equal(out.expert, r(torch.randn(4, 4), RoutingContext(token_ids=ids)).expert)
    with pytest.raises(ValueError, match="needs token ids.*token_ids=ids"):
        r(torch.randn(4, 4), RoutingContext())
    with pytest.raises(ValueError, match=r"args.by: expected one of position, token-id, lsh, got 'nope'"):
        build("hash", 4, 4, by="nope")


def test_hash_lsh():
    r = build("hash", 2, 3, by="lsh")
    r.projection = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.1]])
    assert r(x, EVAL).expert.tolist() == [0, 1, 2]
    assert r(3.0 * x, EVAL).expert.tolist() == [0, 1, 2], "direction, not scale, decides"
    assert list(r.parameters()) == [] and "projection" in r.state_dict()
    r3 = build("hash", 8, 4, by="lsh", top_k=3)
    out = r3(torch.randn(20, 8), EVAL)
    assert all(len({ex for ex, _ in v}) == 3 for v in by_token(out).values())
    torch.testing.assert_close(out.weight, torch.full((60,), 1 / 3))


# --- X-MoE --------------------------------------------------------------------------------------


def _xmoe(**kw):
    r = build("xmoe", 2, 2, proj_dim=2, **kw)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(2))
        r.expert_embeddings.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    return r


def test_xmoe_hand_case():
    r = _xmoe(top_k=1, balance_weight=0.01)
    assert float(r.temperature.detach()) == pytest.approx(0.07)
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 0.5]])
    out = r(x, EVAL)
    s = 1 / 0.07
    p_first = math.exp(s) / (math.exp(s) + 1)  # cos = (1, 0) / 0.07
    probs = torch.tensor([[p_first, 1 - p_first], [0.5, 0.5], [1 - p_first, p_first]])
    torch.testing.assert_close(out.stats["scores"], probs)
    assert out.expert.tolist()[0] == 0 and out.expert.tolist()[2] == 1
    torch.testing.assert_close(out.weight[[0, 2]], torch.tensor([p_first, p_first]))  # raw probability
    f = torch.bincount(out.expert, minlength=2).float() / 3
    torch.testing.assert_close(out.aux_losses["balance"], 0.01 * 2 * (f * probs.mean(0)).sum())


def test_xmoe_normalisation_and_temperature():
    r = _xmoe(top_k=2)
    x = torch.randn(16, 2)
    base = r(x, EVAL).stats["scores"]
    torch.testing.assert_close(r(5.0 * x, EVAL).stats["scores"], base)  # input scale is irrelevant
    with torch.no_grad():
        r.expert_embeddings.mul_(10.0)
    torch.testing.assert_close(r(x, EVAL).stats["scores"], base)  # embedding scale is irrelevant
    # lower temperature -> sharper distribution
    with torch.no_grad():
        r.log_temperature.fill_(math.log(0.5))
    soft = r(x, EVAL).stats["scores"]
    assert soft.max(-1).values.mean() < base.max(-1).values.mean()
    # clamped to [min, max]
    with torch.no_grad():
        r.log_temperature.fill_(math.log(1e-6))
    assert float(r.temperature.detach()) == pytest.approx(0.01)
    with torch.no_grad():
        r.log_temperature.fill_(math.log(50.0))
    assert float(r.temperature.detach()) == pytest.approx(1.0)
    # the temperature is learnable: the gate's output carries a gradient to it
    r2 = _xmoe(top_k=1)
    out = r2(x, TRAIN)
    (out.weight.sum() + out.aux_losses["balance"]).backward()
    assert r2.log_temperature.grad is not None and r2.log_temperature.grad.abs() > 0
    fixed = _xmoe(learn_temperature=False)
    assert "log_temperature" not in dict(fixed.named_parameters())
    with pytest.raises(ValueError, match="temperature"):
        build("xmoe", 8, 4, temperature=5.0)


# --- loss-free ----------------------------------------------------------------------------------


def test_loss_free_hand_case():
    r = build("loss-free", 2, 3, top_k=2)
    set_gate(r, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    x = torch.tensor([[2.0, 1.0]])  # logits (2, 1, 0), scores sigmoid: .881 .731 .5
    s = [1 / (1 + math.exp(-v)) for v in (2.0, 1.0, 0.0)]
    out = r(x, EVAL)
    assert by_token(out)[0] == [(0, pytest.approx(s[0] / (s[0] + s[1]))), (1, pytest.approx(s[1] / (s[0] + s[1])))]
    assert out.aux_losses == {}
    r.expert_bias = torch.tensor([0.0, 0.0, 0.5])  # bias changes the selection only ...
    out = r(x, EVAL)
    assert by_token(out)[0] == [(2, pytest.approx(s[2] / (s[2] + s[0]))), (0, pytest.approx(s[0] / (s[2] + s[0])))]
    # ... and the weights still come from the unbiased scores, with gradient to the gate only
    out.weight.sum().backward()
    assert r.gate.weight.grad is not None
    assert "expert_bias" not in dict(r.named_parameters()) and "expert_bias" in r.state_dict()
    soft = build("loss-free", 2, 3, top_k=1, score_fn="softmax")
    set_gate(soft, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    o = soft(x, EVAL)
    assert o.expert.tolist() == [0] and o.weight.tolist() == [pytest.approx(1.0)]
    torch.testing.assert_close(o.stats["scores"], torch.softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1))


def test_loss_free_after_step_update_rule():
    r = build("loss-free", 2, 3, top_k=1, update_rate=0.1)
    set_gate(r, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    x = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0], [-3.0, -3.0]])
    r(x, EVAL)
    r.after_step()
    assert torch.equal(r.expert_bias, torch.zeros(3)), "evaluation forwards must not move the bias"
    r(x, TRAIN)  # load (3, 2, 1), mean 2
    assert r.load.tolist() == [3.0, 2.0, 1.0]
    r.after_step()
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.0, 0.1]))
    assert r.load.sum() == 0, "the load resets after each step"
    r.after_step()  # nothing routed since: no change
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.0, 0.1]))
    with pytest.raises(ValueError, match=r"args.score_fn: expected one of sigmoid, softmax, got 'tanh'"):
        build("loss-free", 2, 3, score_fn="tanh")


def test_loss_free_bias_moves_toward_balance():
    torch.manual_seed(0)
    E, d = 4, 8
    r = build("loss-free", d, E, top_k=1, update_rate=0.01)
    direction = torch.randn(d)
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.3)
        r.gate.weight[0] += direction  # the stream leans toward expert 0
    g = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(128, d, generator=g) * 0.5 + direction

    start = r(batch(), EVAL).counts()
    for _ in range(150):
        r(batch(), TRAIN)
        r.after_step()
    end = sum(r(batch(), EVAL).counts() for _ in range(5))
    assert cv(start) > 1.0, f"the stream must start skewed (CV {cv(start):.2f})"
    assert cv(end) < 0.5 * cv(start), (start.tolist(), end.tolist())
    assert r.expert_bias[0] < 0 and (r.expert_bias[1:] > r.expert_bias[0]).all()


def test_softmax_topk_raw_weights_are_the_top_k_probabilities():
    """norm_topk_prob=False (Qwen-MoE / OLMoE): the k weights are the softmax probabilities themselves."""
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    raw = build("softmax-topk", 8, 4, norm_topk_prob=False)
    norm = build("softmax-topk", 8, 4)
    probs = torch.softmax(x @ raw.gate.weight.T, -1)
    r_raw, r_norm = raw(x, RoutingContext()), norm(x, RoutingContext())
    want_w, want_i = probs.topk(2, -1)
    assert torch.equal(r_raw.expert.view(10, 2), want_i) and torch.equal(r_norm.expert, r_raw.expert)
    torch.testing.assert_close(r_raw.weight.view(10, 2), want_w)
    torch.testing.assert_close(r_norm.weight.view(10, 2), want_w / want_w.sum(-1, keepdim=True))
    assert (r_raw.weight.view(10, 2).sum(-1) < 1).all()
    with pytest.raises(ValueError, match="args.norm_topk_prob: expected true or false"):
        build("softmax-topk", 8, 4, norm_topk_prob="maybe")
