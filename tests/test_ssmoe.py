"""SSMoE (routers/ssmoe.py) against an independent transcription of the released CLIP-MoE block on copied
weights; c = 0 is softmax top-k bit for bit; the cache is taken at the first forward, kept across a
state-dict round trip and refreshed only when asked."""

from __future__ import annotations

import pytest
import torch
from ssmoe_reference import release_experts, release_moe, release_svd

from moebench.core.layer import MoELayer
from moebench.core.routing import RoutingContext

D, H, E = 16, 32, 4


def _layer(seed=0, **args):
    torch.manual_seed(seed)
    layer = MoELayer(D, H, E, router="ssmoe", router_args=args).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # experts that differ clearly, as trained ones do
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def _x(seed=1):
    return torch.randn(2, 12, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("second_layer", ["reshape", "transpose"])
@pytest.mark.parametrize("c", [1.0, 0.3])
def test_matches_the_release_on_copied_weights(second_layer, c):
    layer = _layer(c=c, second_layer=second_layer)
    experts, gate = release_experts(layer), layer.router.gate.weight.detach()
    x = _x()
    with torch.no_grad():
        want, selected, weights = release_moe(x, gate, experts, top_k=2, c=c, transpose_fc2=second_layer == "transpose")
        got = layer(x)
    torch.testing.assert_close(
        layer.router.basis, release_svd(gate, experts, transpose_fc2=second_layer == "transpose"), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    routing = layer.router(x.reshape(-1, D), _ctx())
    assert torch.equal(routing.expert.view(-1, 2), selected)
    torch.testing.assert_close(routing.weight.view(-1, 2), weights, rtol=1e-5, atol=1e-6)
    assert len(set(selected[:, 0].tolist())) > 1  # the test routes tokens to several experts


def _ctx():
    return RoutingContext(training=False)


def test_c0_is_softmax_topk_exactly():
    ss = _layer(c=0.0)
    sm = MoELayer(D, H, E, router="softmax-topk").eval()
    sm.load_state_dict(
        {k: v for k, v in ss.state_dict().items() if not k.startswith("router.") or k == "router.gate.weight"}
    )
    x = _x()
    with torch.no_grad():
        a, b = ss(x), sm(x)
    assert torch.equal(a, b)
    ra, rb = ss.router(x.reshape(-1, D), _ctx()), sm.router(x.reshape(-1, D), _ctx())
    assert torch.equal(ra.expert, rb.expert) and torch.equal(ra.weight, rb.weight)
    assert torch.equal(ra.stats["scores"], rb.stats["scores"])
    # and c matters: the default c = 1 routes differently on the same weights
    assert not torch.equal(_layer(c=1.0).router(x.reshape(-1, D), _ctx()).expert, ra.expert)


def test_cache_taken_once_then_refreshed_only_when_asked():
    layer = _layer()
    layer(_x())
    cached = layer.router.basis.clone()
    with torch.no_grad():
        layer.experts.w1.mul_(-1.0).add_(0.5)
    layer(_x())
    layer.after_step()
    assert torch.equal(layer.router.basis, cached)  # the release: SVD at the first forward only
    fresh = _layer(refresh_every=2)
    fresh(_x())
    before = fresh.router.basis.clone()
    with torch.no_grad():
        fresh.experts.w1.mul_(-1.0).add_(0.5)
    fresh.after_step()
    assert torch.equal(fresh.router.basis, before)  # one step: not yet
    fresh.after_step()
    assert not torch.equal(fresh.router.basis, before)
    torch.testing.assert_close(fresh.router.basis, fresh.router.compute_basis())


def test_state_dict_round_trip_keeps_the_cache():
    layer = _layer()
    layer(_x())
    twin = _layer(seed=5)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        twin.experts.w1.add_(1.0)  # a resumed run's experts moved since the cache was taken
    twin(_x())
    assert torch.equal(twin.router.basis, layer.router.basis)


def test_upcycled_identical_experts_get_different_vectors():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="ssmoe").eval()
    fc1, fc2 = torch.randn(H, D), torch.randn(D, H)
    layer.experts.load_dense(fc1, torch.zeros(H), fc2, torch.zeros(D))
    layer(_x())
    cols = layer.router.basis.T.reshape(E, 2, D)
    assert torch.linalg.matrix_rank(cols[:, 0]) > 1  # the gate rows pick different singular vectors
    counts = layer.stats["counts"]
    assert int((counts > 0).sum()) > 1


def test_gated_experts_use_gate_up_and_down():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="ssmoe", activation="swiglu")
    layer(_x())
    assert layer.router.num_matrices == 3 and layer.router.basis.shape == (D, 3 * E)
    assert layer.router.flops_per_token() == 2 * D * E * 3 + E * 3


@pytest.mark.parametrize(
    "args,words",
    [
        ({"c": 1.5}, r"args.c: expected a finite number >= 0 and <= 1, got 1.5"),
        ({"k": 0}, r"args.k: expected an integer >= 1, got 0"),
        ({"k": 17}, "k=17"),
        ({"second_layer": "both"}, "second_layer"),
        ({"refresh_every": -1}, "refresh_every"),
    ],
)
def test_bad_options_name_the_option(args, words):
    with pytest.raises((ValueError, TypeError), match=words):
        MoELayer(D, H, E, router="ssmoe", router_args=args)


def test_null_experts_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="moe.null_experts"):
        MoELayer(D, H, E, router="ssmoe", null_experts=2)


@pytest.mark.slow  # costing builds a ViT-L/14 (430M parameters): minutes on a shared 2-core CPU
def test_clip_moe_grid_expands_once_its_paths_are_set():
    """SSMoE's CLIP-MoE protocol: placeholders refused, then every run is ViT-L/14 with 4 experts, top-2,
    in every block, on COCO and Flickr30K, 3 seeds, ssmoe among the routers."""
    import yaml

    from moebench.grids import expand as expand_mod
    from moebench.grids import schema

    path = schema.resolve_path("clip-moe")
    found = schema.placeholders(yaml.safe_load(path.read_text()))
    assert {schema._shell_key(k) for k, _ in found} >= {"tasks.0.task_args.root", "tasks.0.model.pretrained"}
    with pytest.raises(Exception, match="placeholder|/path/to"):
        expand_mod.expand(schema.load("clip-moe"))
    sets = [f"{schema._shell_key(k)}=/data/{i}" for i, (k, _) in enumerate(found)]
    specs = expand_mod.expand(schema.load("clip-moe", overrides=sets))
    moes = [s["moe"] for s in specs if s["moe"]]
    assert {s["task_args"]["data"] for s in specs} == {"coco", "flickr30k"} and {s["seed"] for s in specs} == {0, 1, 2}
    assert {s["model"]["name"] for s in specs} == {"ViT-L-14"}
    assert all(m["num_experts"] == 4 and m["blocks"] == "all" and m["d_hidden"] == 2048 for m in moes)
    assert all(m["router_args"].get("top_k", 2) == 2 for m in moes)
    assert {"ssmoe-c0.5", "dense"} <= {s["label"] for s in specs}
    assert {"ssmoe", "softmax-topk", "ermoe", "emoe"} <= {m["router"] for m in moes}
    assert all(m["router_args"]["refresh_every"] == 100 for m in moes if m["router"] == "ssmoe")
    assert all(s["train"]["eval_at_start"] for s in specs)
