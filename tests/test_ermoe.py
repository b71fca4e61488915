"""ERMoE router and eigen experts: hand-computed scores, exact equivalence with plain experts at init and
after upcycling, orthonormality under training, selection with threshold / free experts, losses, errors."""

from __future__ import annotations

import copy
import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moebench.core.experts import Experts
from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS
from moebench.core.routing import RoutingContext
from moebench.routers.ermoe import EigenExperts, ErMoERouter


def _router(d=4, h=8, E=3, **kw) -> ErMoERouter:
    torch.manual_seed(0)
    r = ErMoERouter(d, E, **kw)
    r.wrap_experts(Experts(E, d, h))
    return r


def _set_bases(router: ErMoERouter, perms, s=None) -> None:
    """Expert e's eigenbasis = coordinate axes in the order perms[e] (a permutation matrix)."""
    eig = router.eigen_experts
    with torch.no_grad():
        for e, perm in enumerate(perms):
            eig.V[e] = torch.eye(eig.d_model)[:, perm]
            if s is not None:
                eig.s[e] = torch.tensor(s[e], dtype=torch.float32)


def _per_token(routing):
    """Experts of each token in slot order, as python lists."""
    T = routing.num_tokens
    out = [[None] * int((routing.token == t).sum()) for t in range(T)]
    for t, e, j in zip(routing.token.tolist(), routing.expert.tolist(), routing.slot.tolist()):
        out[t][j] = e
    return out


# --------------------------------------------------------------------------------------------------
def test_registered_with_reconstruction_docstring():
    cls = ROUTERS.get("ermoe")
    assert cls is ErMoERouter
    doc = (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")
    assert "2511.10971" in doc and "reconstruct" in doc.lower()


# Tiny case: d=4, three experts whose routing bases (r=2) are coordinate axes.
# x = (1, 2, 2, 0), |x| = 3; c = (0, 1, 0, 1).
#   expert 0: B = (e1, e2)  B^T x = (1, 2)   B^T c = (0, 1)   s = (2, 1, ..)
#   expert 1: B = (e3, e4)  B^T x = (2, 0)   B^T c = (0, 1)   s = (1, 3, ..)
#   expert 2: B = (e2, e3)  B^T x = (2, 2)   B^T c = (1, 0)   s = (1, 1, ..)
PERMS = [[0, 1, 2, 3], [2, 3, 0, 1], [1, 2, 3, 0]]
SVALS = [[2.0, 1.0, 0.5, 0.5], [1.0, 3.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5]]
EXPECTED = {
    "subspace": [math.sqrt(5) / 3, 2 / 3, math.sqrt(8) / 3],
    # ||(2*1, 1*2)|| / (max(2,1) * 3), ||(1*2, 3*0)|| / (3 * 3), ||(2, 2)|| / (1 * 3)
    "weighted": [math.sqrt(8) / 6, 2 / 9, math.sqrt(8) / 3],
    # cos((1,2),(0,1)), cos((2,0),(0,1)), cos((2,2),(1,0))
    "context": [2 / math.sqrt(5), 0.0, 1 / math.sqrt(2)],
}


@pytest.mark.parametrize("score", ["subspace", "weighted", "context"])
def test_hand_computed_scores_and_weights(score):
    router = _router(score=score, route_rank=2)
    _set_bases(router, PERMS, SVALS)
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    c = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    expected = torch.tensor([EXPECTED[score]])
    torch.testing.assert_close(router.scores(x, c), expected, atol=1e-6, rtol=0)

    top2 = expected[0].topk(2).indices
    sel = expected[0, top2]
    if score == "context":
        sel = (1 + sel) / 2  # cosine mapped to [0, 1] before normalising
    want_w = sel / sel.sum()
    # no grad: all-expert path (S.gather); with grad: per-pair recomputation. Both must agree.
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            routing = router(x, RoutingContext(context=c))
        assert routing.expert.tolist() == top2.tolist()
        torch.testing.assert_close(routing.weight.detach(), want_w, atol=1e-6, rtol=0)
        torch.testing.assert_close(routing.stats["scores"], expected, atol=1e-6, rtol=0)


def test_softmax_weights_use_temperature():
    router = _router(route_rank=2, weights="softmax", temperature=0.5)
    _set_bases(router, PERMS)
    routing = router(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), RoutingContext())
    s = torch.tensor(EXPECTED["subspace"])[[2, 0]]
    torch.testing.assert_close(routing.weight, torch.softmax(s / 0.5, 0), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,h", [(8, 16), (16, 8)])
@pytest.mark.parametrize("fc1_mode", ["factored", "dense"])
def test_fresh_eigen_experts_compute_the_plain_experts_function(d, h, fc1_mode):
    torch.manual_seed(1)
    plain = Experts(4, d, h)
    eig = EigenExperts.from_experts(plain, fc1_mode=fc1_mode)
    assert eig.V.shape == (4, d, min(d, h)) and eig.U.shape == (4, h, min(d, h)) and eig.s.shape == (4, min(d, h))
    torch.testing.assert_close(eig.fc1_weight(), plain.w1, atol=1e-5, rtol=1e-5)
    counts = torch.tensor([3, 0, 5, 2])  # an empty expert too
    x = torch.randn(int(counts.sum()), d)
    for gmm in (True, False):
        plain.use_grouped_mm = eig.use_grouped_mm = gmm
        torch.testing.assert_close(eig(x, counts), plain(x, counts), atol=1e-5, rtol=1e-5)
    # the parameter count includes V, U and s (reported, not hidden)
    m = min(d, h)
    assert eig.params_per_expert() == d * m + h * m + m + h + h * d + d


def test_fresh_ermoe_layer_equals_plain_layer_with_same_weights_and_routing():
    torch.manual_seed(2)
    layer = MoELayer(8, 16, 4, router="ermoe")
    assert isinstance(layer.experts, EigenExperts)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    top1 = layer.stats["top1"].clone()
    eig = layer.experts
    plain = Experts(4, 8, 16)
    with torch.no_grad():
        plain.w1.copy_(eig.fc1_weight())
        for name in ("b1", "w2", "b2"):
            getattr(plain, name).copy_(getattr(eig, name))
    layer.experts = plain  # the router still scores with its own reference to the eigenbasis
    y_plain = layer(x)
    assert torch.equal(layer.stats["top1"], top1)
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)


def test_state_dict_holds_the_eigen_experts_once_and_deepcopy_keeps_the_link():
    layer = MoELayer(8, 16, 4, router="ermoe")
    keys = list(layer.state_dict())
    assert sorted(k for k in keys if k.endswith((".V", ".U", ".s"))) == ["experts.U", "experts.V", "experts.s"]
    # the router's only state, buffers: the snapshot B0 of the routing bases (drift diagnostic) and the
    # per-expert score gains of upcycled experts (calibrate)
    assert sorted(k for k in keys if k.startswith("router.")) == [
        "router.basis_captured",
        "router.initial_basis",
        "router.score_gain",
    ]
    assert sum(p.numel() for p in layer.router.parameters()) == 0
    clone = copy.deepcopy(layer)
    assert clone.router.eigen_experts is clone.experts
    assert clone.router.eigen_experts is not layer.experts


@pytest.mark.parametrize("ortho", ["qr", "cayley"])
def test_upcycling_via_load_dense_reproduces_the_dense_mlp(ortho):
    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    layer = MoELayer(8, 16, 4, router="ermoe", router_args={"ortho": ortho})
    x = torch.randn(3, 7, 8)
    dense = fc2(F.gelu(fc1(x)))
    assert not torch.allclose(layer(x), dense, atol=1e-3)  # random experts differ from the MLP
    layer.experts.load_dense(fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach())
    # every expert is now the MLP and the gate weights sum to 1, so the layer is the MLP
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    assert layer.router.orthogonality_error("V") < 1e-4


# --------------------------------------------------------------------------------------------------
def _train(layer, steps, lr=1e-2, seed=0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a shared machine
    try:
        return _train_steps(layer, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train_steps(layer, steps, lr, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, layer.d_model, generator=g)
    target = torch.tanh(x @ torch.randn(layer.d_model, layer.d_model, generator=g))
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    drift = 0.0
    for step in range(steps):
        loss = F.mse_loss(layer(x), target) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:  # before re-orthonormalising
            drift = max(drift, float(layer.router.orthogonality_error("V")))
        layer.after_step()
    return drift


def test_qr_keeps_bases_orthonormal_over_200_adamw_steps():
    torch.manual_seed(4)
    layer = MoELayer(8, 16, 4, router="ermoe", router_args={"ortho": "qr"})
    v0 = layer.experts.V.detach().clone()
    drift = _train(layer, 200)
    assert (layer.experts.V.detach() - v0).abs().max() > 1e-2  # the bases did learn
    assert drift > 1e-4  # each optimiser step breaks orthonormality ...
    assert layer.router.orthogonality_error("V") < 1e-4  # ... and after_step restores it
    assert layer.router.orthogonality_error("U") < 1e-4


@pytest.mark.parametrize("ortho", ["cayley", "matrix_exp"])
def test_parametrized_bases_stay_orthonormal_without_after_step_work(ortho):
    torch.manual_seed(5)
    layer = MoELayer(8, 16, 4, router="ermoe", router_args={"ortho": ortho})
    v0 = layer.experts.V.detach().clone()
    drift = _train(layer, 20)
    assert (layer.experts.V.detach() - v0).abs().max() > 1e-3
    assert drift < 1e-4
    assert layer.router.orthogonality_error("U") < 1e-4


def test_penalty_adds_the_orth_loss_and_nothing_else():
    torch.manual_seed(6)
    layer = MoELayer(8, 16, 4, router="ermoe", router_args={"ortho": "penalty", "lambda_orth": 0.1})
    eig = layer.experts
    with torch.no_grad():
        eig.V.add_(0.05 * torch.randn_like(eig.V))
        eig.U.add_(0.05 * torch.randn_like(eig.U))
    routing = layer.router(torch.randn(10, 8), RoutingContext(training=True))
    assert set(routing.aux_losses) == {"orth"}
    V, U = eig.V.detach(), eig.U.detach()
    eye = torch.eye(8)
    want = 0.1 * sum(float(torch.linalg.matrix_norm(B.mT @ B - eye) ** 2) for B in (*V, *U))
    assert abs(float(routing.aux_losses["orth"].detach()) - want) < 1e-4 * want
    torch.testing.assert_close(routing.stats["ortho_error"], eig.orthogonality_error("V"), atol=1e-5, rtol=1e-4)
    layer.train()
    layer(torch.randn(2, 5, 8))
    again = layer.router(torch.randn(3, 8), RoutingContext()).aux_losses["orth"].detach()
    assert abs(float(layer.aux_loss.detach()) - float(again)) < 1e-6
    assert set(layer.stats["aux_losses"]) == {"orth"}


def test_no_aux_loss_but_orth_for_any_option_combination():
    x, c = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    combos = itertools.product(
        ["qr", "cayley", "matrix_exp", "penalty"],
        ["subspace", "context", "weighted"],
        ["normalized", "softmax"],
        [{}, {"threshold": 0.6, "free_experts": [0]}],
    )
    for ortho, score, weights, extra in combos:
        torch.manual_seed(7)
        layer = MoELayer(8, 16, 4, router="ermoe", router_args=dict(ortho=ortho, score=score, weights=weights, **extra))
        for training in (True, False):
            layer.train(training)
            layer(x, context=c)
            want = {"orth"} if ortho == "penalty" else set()
            assert set(layer.stats["aux_losses"]) == want, (ortho, score, weights, extra)
            assert layer.stats["counts"].sum() == 12 * 2  # every token: exactly k pairs
            assert layer.stats["ortho_error"].dim() == 0 and layer.stats["fallback"].dim() == 0


# --------------------------------------------------------------------------------------------------
# Selection: d=4, E=4, r=2, expert e's basis = axes (e, e+1 mod 4), so S_e = ||(x_e, x_{e+1})|| / ||x||.
CYCLIC = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
TOKENS = torch.tensor(
    [
        [0.0, 1.0, 0.0, 0.0],  # S = (1, 1, 0, 0): two candidates -> {0, 1}, no fallback
        [0.6, 0.8, 0.0, 0.0],  # S = (1, .8, 0, .6): one candidate -> 0, then free 3 (before 1) ; fallback
        [0.8, 0.0, 0.6, 0.0],  # S = (.8, .6, .6, .8): none -> free 3, then best remaining 0 ; fallback
        [0.0, 0.0, 1.0, 0.0],  # S = (0, 1, 1, 0): two candidates -> {1, 2}, no fallback
    ]
)


def test_threshold_free_experts_fill_first_and_fallback_is_counted():
    router = _router(d=4, h=4, E=4, route_rank=2, threshold=0.9, free_experts=[3])
    _set_bases(router, CYCLIC)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            routing = router(TOKENS, RoutingContext())
        chosen = _per_token(routing)
        assert sorted(chosen[0]) == [0, 1]
        assert chosen[1] == [0, 3]
        assert chosen[2] == [3, 0]
        assert sorted(chosen[3]) == [1, 2]
        assert float(routing.stats["fallback"]) == pytest.approx(0.5)
        assert routing.stats["top1"].tolist()[1:3] == [0, 3]

    plain = _router(d=4, h=4, E=4, route_rank=2, threshold=0.9)  # no free expert: highest remaining score
    _set_bases(plain, CYCLIC)
    assert _per_token(plain(TOKENS, RoutingContext()))[1] == [0, 1]


def test_every_token_gets_k_distinct_experts_when_few_qualify():
    torch.manual_seed(8)
    router = _router(d=16, h=32, E=8, top_k=3, route_rank=4, threshold=0.7, free_experts=[5, 2])
    x = torch.randn(200, 16)
    routing = router(x, RoutingContext())
    per_token = _per_token(routing)
    assert all(len(set(p)) == len(p) == 3 for p in per_token)
    S = router.scores(x)
    qualified = (S >= 0.7).sum(-1)
    assert 0 < float((qualified < 3).float().mean()) < 1  # the case is mixed
    assert float(routing.stats["fallback"]) == pytest.approx(float((qualified < 3).float().mean()))
    free_left = 2 - (S[:, [5, 2]] >= 0.7).sum(-1)  # free experts that are not already candidates
    for t in range(200):  # a short token keeps its candidates, then takes the free experts first
        q, f = int(qualified[t]), int(free_left[t])
        if q < 3:
            assert set(per_token[t][:q]) == set(S[t].topk(q).indices.tolist()) if q else True
            assert set(per_token[t][q : q + min(f, 3 - q)]) <= {5, 2}


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["subspace", "weighted", "context"])
def test_gradient_reaches_V_through_the_gate_weights(score):
    torch.manual_seed(9)
    router = _router(d=8, h=16, E=4, route_rank=2, score=score)
    eig = router.eigen_experts
    x, c = torch.randn(12, 8, requires_grad=True), torch.randn(12, 8)
    coef = torch.randn(12 * 2)
    routing = router(x, RoutingContext(context=c))
    (routing.weight * coef).sum().backward()
    g_pair, gx_pair = eig.V.grad.clone(), x.grad.clone()
    assert g_pair[:, :, :2].abs().sum() > 0  # routing columns get gradient
    assert torch.count_nonzero(g_pair[:, :, 2:]) == 0  # the rest of the basis plays no part in the score

    eig.V.grad, x.grad = None, None  # reference: all-expert scores, then gather
    S = router.scores(x, c)
    idx, _ = router.select(S)
    s = S.gather(1, idx)
    s = (1 + s) / 2 if score == "context" else s
    ((s / s.sum(-1, keepdim=True)).reshape(-1) * coef).sum().backward()
    torch.testing.assert_close(g_pair, eig.V.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_pair, x.grad, atol=1e-5, rtol=1e-4)


def test_deterministic_with_a_fixed_seed():
    def run():
        torch.manual_seed(10)
        layer = MoELayer(8, 16, 4, router="ermoe", router_args={"threshold": 0.5, "free_experts": [1]})
        _train(layer, 3)
        y = layer(torch.randn(4, 8))
        return y.detach(), layer.stats["counts"].clone(), layer.experts.V.detach().clone()

    (y1, c1, v1), (y2, c2, v2) = run(), run()
    assert torch.equal(y1, y2) and torch.equal(c1, c2) and torch.equal(v1, v2)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ortho": "svd"}, r"args.ortho: expected one of qr, cayley, matrix_exp, penalty, got 'svd'"),
        ({"score": "cosine"}, r"args.score: expected one of subspace, context, weighted, got 'cosine'"),
        ({"weights": "sum"}, r"args.weights: expected one of normalized, softmax, got 'sum'"),
        ({"fc1_mode": "fast"}, r"args.fc1_mode: expected one of auto, factored, dense, got 'fast'"),
        ({"temperature": 0}, r"args.temperature: expected a finite number > 0, got 0"),
        ({"threshold": 1.5}, r"args.threshold: expected a number >= -1 and <= 1, got 1.5"),
        ({"lambda_orth": -1.0}, r"args.lambda_orth: expected a finite number >= 0, got -1.0"),
        ({"route_rank": 0}, r"args.route_rank: expected an integer >= 1 or null, got 0"),
        ({"route_rank": 8}, r"route_rank must be .* identically 1"),
        ({"eigen_lr_scale": 0}, r"args.eigen_lr_scale: expected a finite number > 0, got 0"),
        ({"route_rank": 2.5}, r"args.route_rank: expected an integer >= 1 or null, got 2.5"),
        ({"free_experts": [4]}, r"free_experts has 4: every entry must be an expert index in \[0, 3\]"),
        (
            {"free_experts": [1, 1]},
            r"args.free_experts: expected a list of distinct integers >= 0 or null, got \[1, 1\]",
        ),
        ({"free_experts": "01"}, r"args.free_experts: expected a list of distinct integers >= 0 or null, got '01'"),
        ({"top_k": 5}, r"top_k=5 is invalid for num_experts=4"),
        ({"top_k": 1.5}, r"args.top_k: expected an integer >= 1, got 1.5"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErMoERouter(8, 4, **kwargs)


def test_route_rank_above_the_eigenbasis_size_is_refused_and_the_default_is_capped():
    with pytest.raises(ValueError, match=r"route_rank=12 exceeds the eigenbasis size m=.*8"):
        MoELayer(16, 8, 2, router="ermoe", router_args={"route_rank": 12})
    with pytest.raises(ValueError, match=r"route_rank=8 exceeds the eigenbasis size m=.*8 or equals it"):
        MoELayer(16, 8, 2, router="ermoe", router_args={"route_rank": 8})
    layer = MoELayer(16, 4, 2, router="ermoe")  # default max(8, 16 // 2) = 8 >= m = 4: one below m
    assert layer.router.route_rank == 3
    assert ErMoERouter(64, 4).route_rank == 16 and ErMoERouter(16, 8).route_rank == 8


def test_context_score_without_context_raises_the_layer_error():
    layer = MoELayer(8, 16, 4, router="ermoe", router_args={"score": "context"})
    assert layer.router.needs_context and not ErMoERouter.needs_context
    assert not MoELayer(8, 16, 4, router="ermoe").router.needs_context
    with pytest.raises(ValueError, match="needs the attention context"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="score='context' needs the attention context"):
        layer.router(torch.randn(3, 8), RoutingContext())
    with pytest.raises(RuntimeError, match="call router.wrap_experts"):
        ErMoERouter(8, 4)(torch.randn(3, 8), RoutingContext())


def test_cost_counts_the_score_and_the_eigen_parameters():
    layer = MoELayer(32, 64, 4, router="ermoe", router_args={"top_k": 2})
    r = layer.router.route_rank
    assert r == 8
    router_flops = layer.flops_per_token() - 2 * 2 * 2 * 32 * 64
    assert 2 * 4 * 32 * r <= router_flops <= 1.2 * 2 * 4 * 32 * r
    assert layer.router.active_experts_per_token == 2
    ctx_layer = MoELayer(32, 64, 4, router="ermoe", router_args={"score": "context"})
    assert ctx_layer.router.flops_per_token() > 1.9 * layer.router.flops_per_token()
    plain = MoELayer(32, 64, 4, router="softmax-topk")
    assert layer.experts.params_per_expert() == plain.experts.params_per_expert() + 32 * 32 + 32


# --- corrections of the reconstruction (issue: ERMoE as its authors ran it) -----------------------
def _upcycled(d=16, h=32, E=4, **args):
    torch.manual_seed(5)
    fc1, fc2 = nn.Linear(d, h), nn.Linear(h, d)
    layer = MoELayer(d, h, E, router="ermoe", router_args=args)
    layer.experts.load_dense(fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach())
    return layer, fc1, fc2


@pytest.mark.parametrize("slices", ["interleaved", "snake", "contiguous"])
def test_upcycled_experts_route_on_different_slices_and_stay_the_dense_mlp(slices):
    layer, fc1, fc2 = _upcycled(route_rank=4, slices=slices)
    x = torch.randn(3, 20, 16)
    torch.testing.assert_close(layer(x), fc2(F.gelu(fc1(x))), atol=1e-5, rtol=1e-5)  # function exact
    S = layer.stats["scores"]
    assert (S.max(-1).values - S.min(-1).values > 1e-3).all()  # no token sees all experts tie
    assert len(set(layer.stats["top1"].tolist())) > 1
    # expert e leads with its own dense eigen-directions: interleaved e, e+4, e+8, e+12
    V = layer.experts.V.detach()
    u_dense = torch.linalg.svd(fc1.weight.detach().t(), full_matrices=False)[0]
    want = {
        "interleaved": lambda e: [e, e + 4, e + 8, e + 12],
        "snake": lambda e: [e, 7 - e, 8 + e, 15 - e],
        "contiguous": lambda e: [4 * e + j for j in range(4)],
    }[slices]
    for e in range(4):
        overlap = (u_dense[:, want(e)].T @ V[e, :, :4]).square().sum() / 4
        assert overlap > 0.999


@pytest.mark.parametrize("slices", ["contiguous", "interleaved"])
def test_calibrated_upcycling_spreads_first_choices_and_keeps_the_dense_function(slices):
    """Tokens whose energy sits in the leading eigen-directions (as real tokens' does) all pick the
    expert holding direction 0 without calibration; the gains fitted at the first forward spread
    them, keep the dense function, stay fixed afterwards and are saved with the model."""
    torch.manual_seed(0)
    d, h, E = 16, 32, 4
    fc1, fc2 = nn.Linear(d, h), nn.Linear(h, d)
    u = torch.linalg.svd(fc1.weight.detach().t(), full_matrices=False)[0]  # dense eigen-directions
    x = (torch.randn(400, d) * torch.linspace(3.0, 0.2, d)) @ u.T  # energy decays along them
    shares = {}
    for calibrate in (False, True):
        layer = MoELayer(
            d, h, E, router="ermoe", router_args={"route_rank": 4, "slices": slices, "calibrate": calibrate}
        )
        layer.experts.load_dense(fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach())
        y = layer(x.unsqueeze(0))
        torch.testing.assert_close(y[0], fc2(F.gelu(fc1(x))), atol=1e-5, rtol=1e-5)  # still the dense MLP
        shares[calibrate] = torch.bincount(layer.stats["top1"], minlength=E).max().item() / 400
        gain = layer.router.score_gain.clone()
        layer(x[:50].unsqueeze(0))  # a later forward does not refit
        assert torch.equal(layer.router.score_gain, gain)
        assert (not torch.equal(gain, torch.ones(E))) == calibrate
    assert shares[True] <= 1.2 / E < shares[False]  # near the uniform 1/E
    if slices == "contiguous":
        assert shares[False] > 0.5  # issue 18: expert 0 takes most first choices


def test_interleaved_slices_give_no_expert_the_leading_direction_band():
    """Contiguous slices put every leading direction in expert 0; interleaved ones one per expert per band."""
    from moebench.routers.ermoe import slice_indices

    assert slice_indices("contiguous", 4, 16, 4)[0] == [0, 1, 2, 3]
    assert [s[0] for s in slice_indices("interleaved", 4, 16, 4)] == [0, 1, 2, 3]
    assert sorted(i for s in slice_indices("interleaved", 4, 16, 4) for i in s) == list(range(16))
    with pytest.raises(ValueError, match="slices"):
        _upcycled(slices="diagonal")


def test_basis_overlap_starts_at_one_and_falls_as_the_basis_learns():
    layer, _, _ = _upcycled(route_rank=4)
    x = torch.randn(4, 8, 16)
    layer.eval()
    layer(x)
    assert float(layer.stats["basis_overlap"]) == pytest.approx(1.0, abs=1e-5)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)  # the basis barely moves at sane rates (docs/ERMOE.md)
    for _ in range(5):
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.after_step()
    layer.eval()
    layer(x)
    assert 0.0 < float(layer.stats["basis_overlap"]) < 1.0 - 1e-4


def test_frozen_basis_routes_on_the_initial_projection():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router="ermoe", router_args={"freeze_basis": True, "route_rank": 4})
    x = torch.randn(4, 8, 16)
    layer.eval()
    layer(x)
    s0 = layer.stats["scores"].clone()
    with torch.no_grad():
        layer.experts.V.copy_(torch.linalg.qr(torch.randn_like(layer.experts.V))[0])
    layer(x)
    torch.testing.assert_close(layer.stats["scores"], s0)  # the experts moved, the routing did not
    assert float(layer.stats["basis_overlap"]) < 0.9


def test_eigen_lr_scale_gives_the_eigen_parameters_their_own_group():
    from moebench.training.train import param_groups

    layer = MoELayer(16, 32, 4, router="ermoe", router_args={"eigen_lr_scale": 0.1})
    groups = param_groups(layer, 0.05, lr=1e-3)
    scaled = [g for g in groups if "lr" in g]
    assert {id(p) for g in scaled for p in g["params"]} == {
        id(layer.experts.V),
        id(layer.experts.U),
        id(layer.experts.s),
    }
    assert all(g["lr"] == pytest.approx(1e-4) for g in scaled)
    plain = param_groups(MoELayer(16, 32, 4, router="ermoe"), 0.05, lr=1e-3)
    assert len(plain) == 2 and all("lr" not in g for g in plain)
