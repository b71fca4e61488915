"""MoELayer: the fast path (sort + grouped GEMM + scatter) against the slow reference, for every router
in the registry; capacity / drop semantics; determinism; clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch
from reference_moe import dense_expert, fixed_routing, recorded_routing, reference_forward

from moebench.core import experts as experts_mod
from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS, UnknownNameError
from moebench.core.routing import Routing, apply_capacity, expert_capacity

D, H, E = 16, 32, 4  # multiples of 4 floats: torch._grouped_mm's 16-byte alignment holds, so it is used
BATCH, SEQ = 2, 12
VOCAB = 50

# Constructor args for routers that need them; every registered router runs with {} unless listed here.
ROUTER_ARGS: dict[str, dict] = {"emoe": {"rank": 8}}  # emoe refuses rank >= d_model (D = 16)
# Extra variants worth covering on top of each router's defaults.
EXTRA_CASES = [
    ("softmax-topk", {"top_k": 1}),
    ("hash", {"by": "token-id", "top_k": 2}),
    ("hash", {"by": "lsh", "top_k": 2}),
    ("loss-free", {"score_fn": "softmax", "top_k": 1}),
    ("expert-choice", {"capacity": 1}),
    ("xmoe", {"top_k": 1}),
    ("softmax-topk", {"balance_weight": 0.01, "balance_scope": "global"}),
    ("switch", {"balance_scope": "global"}),
    ("deepseek-v3", {"num_groups": 2, "group_top_k": 1}),
    ("soft-moe", {"slots_per_expert": 2}),
    ("top-p", {"p": 0.8, "max_k": 3}),
    ("sinkhorn", {"top_k": 2}),
    ("emoe", {"rank": 8, "mode": "soft"}),
    ("emoe", {"rank": 4, "mode": "top2"}),
]


# Image-level routers (ermoe-released) are model families, not MoE layers: tests/test_ermoe_released.py
IMAGE_LEVEL = {n for n in ROUTERS.names() if getattr(ROUTERS.get(n), "image_level", False)}


def _cases():
    cases = [(name, ROUTER_ARGS.get(name, {})) for name in ROUTERS.names() if name not in IMAGE_LEVEL]
    cases += [c for c in EXTRA_CASES if c[0] in ROUTERS]
    return [
        pytest.param(n, a, id=f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in a.items()) if a else ''}") for n, a in cases
    ]


CASES = _cases()


def make_layer(name, args, seed=0, **kw):
    torch.manual_seed(seed)
    return MoELayer(D, H, E, router=name, router_args=dict(args), **kw)


def make_inputs(seed=1, shape=(BATCH, SEQ, D)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).requires_grad_(True)
    context = torch.randn(*shape, generator=g)
    token_ids = torch.randint(0, VOCAB, shape[:-1], generator=g)
    return x, context, token_ids


def call(layer, x, context, token_ids):
    # a true group per token, as a task with ground truth passes it (only the oracle control reads it)
    layer.pending_group = torch.arange(x.shape[:-1].numel()).reshape(x.shape[:-1]) % layer.num_experts
    return layer(x, context=context if layer.router.needs_context else None, token_ids=token_ids)


def grads(out, inputs):
    gs = torch.autograd.grad(out.sum(), inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "fallback"])
@pytest.mark.parametrize("name,args", CASES)
def test_fast_path_matches_reference(name, args, grouped, training, monkeypatch):
    layer = make_layer(name, args).train(training)
    layer.experts.use_grouped_mm = grouped
    # count torch._grouped_mm calls made by the experts (a router may use grouped products of its own)
    calls = {"n": 0, "in_experts": False}
    real_grouped_mm = getattr(torch, "_grouped_mm", None)
    if real_grouped_mm is not None:

        def counting(*a, **k):
            calls["n"] += calls["in_experts"]
            return real_grouped_mm(*a, **k)

        monkeypatch.setattr(torch, "_grouped_mm", counting)
        experts_forward = layer.experts.forward

        def flagged_forward(*a, **k):
            calls["in_experts"] = True
            try:
                return experts_forward(*a, **k)
            finally:
                calls["in_experts"] = False

        monkeypatch.setattr(layer.experts, "forward", flagged_forward)

    x, context, token_ids = make_inputs()
    with recorded_routing(layer) as routings:
        fast = call(layer, x, context, token_ids)
    assert len(routings) == 1, "the layer must call its router exactly once per forward"
    ref = reference_forward(layer, x, routings[0])

    if grouped and real_grouped_mm is not None:
        assert calls["n"] >= 2, "the grouped-mm path was not exercised (alignment or dtype check failed?)"
    if not grouped:
        assert calls["n"] == 0, "use_grouped_mm=False must take the loop fallback"
    assert fast.shape == x.shape and fast.dtype == x.dtype
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert fast.abs().sum() > 0

    # loss = y.sum() sends an expanded (zero-stride) gradient: the grouped-mm backward pitfall
    params = [p for p in layer.parameters() if p.requires_grad]
    names = ["input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    g_fast = grads(fast, [x] + params)
    g_ref = grads(ref, [x] + params)
    for n, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")
    assert g_fast[0].abs().sum() > 0
    assert any(g.abs().sum() > 0 for g in g_fast[1:])

    # the layer's own statistics agree with the routing it used
    kept = apply_capacity(routings[0], _effective_capacity(layer))
    assert torch.equal(layer.stats["counts"], kept.counts())
    assert layer.stats["dropped"] == kept.dropped
    assert layer.stats["tokens"] == BATCH * SEQ
    expected_aux = sum(routings[0].aux_losses.values()) if routings[0].aux_losses else torch.zeros(())
    torch.testing.assert_close(layer.aux_loss, torch.as_tensor(expected_aux, dtype=torch.float32))


def _effective_capacity(layer):
    cf = layer.capacity_factor
    return cf if cf is not None else layer.router.default_capacity_factor(layer.training)


def test_every_router_is_covered():
    covered = {c.values[0] for c in CASES}
    assert set(ROUTERS.builtin_names()) - IMAGE_LEVEL <= covered
    assert {"softmax-topk", "uniform", "switch", "expert-choice", "hash", "xmoe", "loss-free"} <= covered


def test_grouped_mm_is_usable_for_test_dims():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch build has no torch._grouped_mm")
    x = torch.randn(8, D)
    assert experts_mod._grouped_mm_usable(x, torch.randn(E, D, H))
    assert experts_mod._grouped_mm_usable(torch.randn(8, H), torch.randn(E, H, D))


# --- capacity -------------------------------------------------------------------------------------


def _pairs(r: Routing) -> set[tuple[int, int]]:
    return set(zip(r.token.tolist(), r.expert.tolist()))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "fallback"])
def test_capacity_with_drops_matches_reference(grouped):
    layer = make_layer("softmax-topk", {"top_k": 2}, capacity_factor=0.5)
    layer.experts.use_grouped_mm = grouped
    x, context, token_ids = make_inputs()
    with recorded_routing(layer) as routings:
        fast = layer(x)
    routing = routings[0]
    cap = expert_capacity(BATCH * SEQ, 2, E, 0.5)
    assert cap == math.ceil(0.5 * BATCH * SEQ * 2 / E)
    assert layer.stats["dropped"] > 0
    assert int(layer.stats["counts"].max()) <= cap
    assert int(layer.stats["counts"].sum()) + layer.stats["dropped"] == routing.num_pairs
    ref = reference_forward(layer, x, routing)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    params = [x] + list(layer.parameters())
    for a, b in zip(grads(fast, params), grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # k-major: for every expert, no first choice is dropped while a second choice to it is kept
    kept = apply_capacity(routing, 0.5)
    kept_pairs = _pairs(kept)
    for e in range(E):
        first = [
            (t, e)
            for t, ee, s in zip(routing.token.tolist(), routing.expert.tolist(), routing.slot.tolist())
            if ee == e and s == 0
        ]
        second_kept = [
            (t, ee)
            for t, ee, s in zip(kept.token.tolist(), kept.expert.tolist(), kept.slot.tolist())
            if ee == e and s == 1
        ]
        if second_kept:
            assert all(p in kept_pairs for p in first), f"expert {e}: a first choice was dropped for a second choice"


def test_dropped_tokens_contribute_zero():
    T = 8
    layer = make_layer("softmax-topk", {"top_k": 1}, capacity_factor=0.5)  # cap = ceil(0.5 * 8 / 4) = 1
    x = torch.randn(T, D, requires_grad=True)
    routing = Routing(
        token=torch.arange(T),
        expert=torch.zeros(T, dtype=torch.long),
        weight=torch.full((T,), 0.5),
        num_tokens=T,
        num_experts=E,
        slot=torch.zeros(T, dtype=torch.long),
    )
    with fixed_routing(layer, routing):
        out = layer(x)
    assert layer.stats["dropped"] == T - 1
    assert torch.equal(out[1:], torch.zeros(T - 1, D)), "dropped tokens must contribute exactly zero"
    torch.testing.assert_close(out[0], 0.5 * dense_expert(layer, 0, x[:1])[0], rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.equal(x.grad[1:], torch.zeros(T - 1, D))
    assert x.grad[0].abs().sum() > 0


def test_k_major_priority_hand_case():
    # T=4, E=2, k=2, cf=0.5 -> cap = ceil(0.5 * 4 * 2 / 2) = 2 per expert.
    # expert 0 gets first choices from tokens 1, 2 and second choices from tokens 0, 3: the earlier token 0's
    # second choice must lose to the later tokens' first choices.
    token = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expert = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0])
    slot = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    routing = Routing(token=token, expert=expert, weight=torch.full((8,), 0.5), num_tokens=4, num_experts=2, slot=slot)
    kept = apply_capacity(routing, 0.5)
    assert _pairs(kept) == {(1, 0), (2, 0), (0, 1), (3, 1)}
    assert kept.dropped == 4
    assert (kept.slot == 0).all()

    # the same through the layer: each token's output is exactly its first choice's half
    layer = MoELayer(D, H, 2, router="softmax-topk", capacity_factor=0.5)
    x = torch.randn(4, D)
    with fixed_routing(layer, routing):
        out = layer(x)
    first = {0: 1, 1: 0, 2: 0, 3: 1}
    for t, e in first.items():
        torch.testing.assert_close(out[t], 0.5 * dense_expert(layer, e, x[t : t + 1])[0], rtol=1e-5, atol=1e-6)


def test_capacity_never_above_token_count():
    for T in (1, 3, 10):
        for k in (1, 2):
            for cf in (0.1, 1.0, 4.0, 1000.0):
                cap = expert_capacity(T, k, E, cf)
                assert 1 <= cap <= T
    assert expert_capacity(10, 2, 4, 1000.0) == 10
    # every token on one expert with a huge factor: nothing can be dropped, and nothing beyond T is kept
    T = 6
    routing = Routing(
        token=torch.arange(T),
        expert=torch.zeros(T, dtype=torch.long),
        weight=torch.ones(T),
        num_tokens=T,
        num_experts=E,
        slot=torch.zeros(T, dtype=torch.long),
    )
    assert apply_capacity(routing, 1000.0).dropped == 0
    layer = make_layer("softmax-topk", {"top_k": 1}, capacity_factor=1000.0)
    with fixed_routing(layer, routing):
        layer(torch.randn(T, D))
    assert layer.stats["dropped"] == 0 and int(layer.stats["counts"][0]) == T


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,args", CASES)
def test_same_seed_is_bitwise_identical(name, args):
    def run():
        layer = make_layer(name, args, seed=123).train()
        x, context, token_ids = make_inputs(seed=7)
        torch.manual_seed(99)  # the router's jitter / any sampling draws from here
        out = call(layer, x, context, token_ids)
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        return out.detach(), grads(out, params), layer.aux_loss.detach()

    out1, g1, aux1 = run()
    out2, g2, aux2 = run()
    assert torch.equal(out1, out2)
    assert torch.equal(aux1, aux2)
    assert len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_router_lists_known_names_and_closest():
    with pytest.raises(UnknownNameError) as err:
        MoELayer(D, H, E, router="softmax-topkk")
    msg = str(err.value)
    assert "softmax-topkk" in msg and "Did you mean 'softmax-topk'" in msg
    for name in ROUTERS.names():
        assert name in msg


def test_wrong_input_shape():
    layer = MoELayer(D, H, E)
    with pytest.raises(ValueError, match=rf"expects input of shape \(\.\.\., {D}\), got \(4, {D + 1}\)"):
        layer(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="expects input of shape"):
        layer(torch.randn(D))


@pytest.mark.parametrize("name", ["softmax-topk", "xmoe", "loss-free", "hash", "uniform"])
def test_top_k_above_num_experts(name):
    with pytest.raises(ValueError, match=rf"top_k={E + 1} is invalid for num_experts={E}"):
        MoELayer(D, H, E, router=name, router_args={"top_k": E + 1})


def test_switch_rejects_top_k_other_than_one():
    with pytest.raises(ValueError, match=r"args.top_k: expected one of 1, got 2 .*use top_k: 1"):
        MoELayer(D, H, E, router="switch", router_args={"top_k": 2})


@pytest.mark.parametrize("cf", [0, -1.0])
def test_capacity_factor_must_be_positive(cf):
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0"):
        MoELayer(D, H, E, capacity_factor=cf)
    with pytest.raises(ValueError, match=r"args.capacity_factor: expected a number > 0 or null"):
        MoELayer(D, H, E, router="switch", router_args={"capacity_factor": cf})


def test_bad_router_option_names_the_router():
    with pytest.raises(TypeError, match="bad router_args for router 'switch'.*no_such_option"):
        MoELayer(D, H, E, router="switch", router_args={"no_such_option": 1})


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "fallback"])
def test_experts_backward_with_sum_loss(grouped):
    """Inside the layer the scatter makes the gradient contiguous; the experts alone receive y.sum()'s
    zero-stride gradient directly, which torch._grouped_mm's backward rejects unless the layer fixes it."""
    layer = make_layer("uniform", {})
    layer.experts.use_grouped_mm = grouped
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    y = layer.experts(x, counts)
    params = [x] + list(layer.experts.parameters())
    g = grads(y, params)
    ref = torch.cat([dense_expert(layer, e, xe) for e, xe in enumerate(torch.split(x, counts.tolist()))])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(g[2][1], torch.zeros(H)), "an expert with no tokens gets zero bias gradient"
