"""Drop-Upcycling (moe.upcycle: drop): ratio 0 is plain upcycling, the re-drawn share is the one asked
for, each expert re-draws its own units from the dense weights' statistics, every router accepts it,
and bad values are refused naming the field and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moebench.core.models import build_model
from moebench.core.moefy import moefy
from moebench.training.spec import SpecError, resolve_spec

TIMM = {
    "family": "timm",
    "name": "vit-custom",
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 5,
}  # mlp width 128


def _dense():
    torch.manual_seed(0)
    return build_model(TIMM)


def _moe(net, router="softmax-topk", **kw):
    torch.manual_seed(1)  # the run's seed: router init and the drop draw both follow it
    out = copy.deepcopy(net)
    moefy(out, blocks="last-1", num_experts=4, router=router, **kw)
    return out


def test_ratio_zero_is_plain_upcycling():
    net = _dense()
    plain, drop0 = _moe(net, upcycle=True), _moe(net, upcycle="drop", upcycle_drop=0.0)
    a, b = plain.state_dict(), drop0.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_each_expert_redraws_the_asked_share_from_the_dense_statistics(ratio):
    net = _dense()
    dense = net.blocks[-1].mlp
    w1, w2 = dense.fc1.weight.detach().t(), dense.fc2.weight.detach().t()  # (d, h), (h, d)
    experts = _moe(net, upcycle="drop", upcycle_drop=ratio).blocks[-1].mlp.experts
    h = w1.shape[1]
    masks = []
    for e in range(4):
        changed = (experts.w1[e] != w1).any(0)  # hidden units whose input weights were re-drawn
        assert int(changed.sum()) == round(ratio * h)
        assert torch.equal((experts.w2[e] != w2).any(1), changed)  # the same units' output weights
        assert torch.equal(experts.w1[e][:, ~changed], w1[:, ~changed])  # the rest: the dense MLP
        new = experts.w1[e][:, changed]
        assert new.mean().item() == pytest.approx(w1.mean().item(), abs=3 * w1.std().item() / new.numel() ** 0.5)
        assert new.std().item() == pytest.approx(w1.std().item(), rel=0.15)
        masks.append(changed)
    if ratio < 1.0:
        assert any(not torch.equal(masks[0], m) for m in masks[1:])  # each expert its own subset
    again = _moe(net, upcycle="drop", upcycle_drop=ratio).blocks[-1].mlp.experts
    assert torch.equal(again.w1, experts.w1)  # the same seed: the same experts


@pytest.mark.parametrize("router", ["softmax-topk", "switch", "hash", "random", "expert-choice", "ermoe"])
def test_every_router_gets_distinct_experts(router):
    net = _dense()
    layer = _moe(net, router=router, upcycle="drop").blocks[-1].mlp
    w1 = layer.experts.fc1_weight().detach()  # (E, d, h); ermoe: rebuilt from its SVD
    for e in range(1, 4):
        assert not torch.allclose(w1[0], w1[e])
    x = torch.randn(2, 5, 32)
    assert layer(x).shape == x.shape
    if router == "ermoe":  # the eigen experts hold exactly the drop-upcycled weights (to float tolerance)
        ref = _moe(net, upcycle="drop").blocks[-1].mlp.experts.w1.detach()
        torch.testing.assert_close(w1, ref, atol=1e-5, rtol=1e-4)


def test_plain_upcycled_experts_are_identical_so_routing_cannot_matter():
    """Why the option exists: with plain upcycling the layer's output is the dense MLP's whatever the
    router picks; Drop-Upcycling makes it depend on the routing."""
    net = _dense()
    x = torch.randn(2, 17, 32)
    dense = net.blocks[-1].mlp
    plain = _moe(net, upcycle=True).blocks[-1].mlp
    torch.testing.assert_close(plain(x), dense(x), atol=1e-5, rtol=1e-5)
    drop = _moe(net, upcycle="drop").blocks[-1].mlp
    assert (drop(x) - dense(x)).abs().max() > 1e-3
    assert F.mse_loss(drop(x), dense(x)) < dense(x).pow(2).mean()  # still close to the dense MLP


def test_bad_values_name_the_field_and_the_fix():
    base = {"task": "toy", "moe": {"router": "softmax-topk", "upcycle": "drop", "upcycle_drop": 1.5}}
    with pytest.raises(SpecError, match=r"moe.upcycle_drop must be a number >= 0 and <= 1"):
        resolve_spec(base)
    with pytest.raises(
        SpecError, match=r"moe.upcycle_drop=0.5 applies only with moe.upcycle: drop.*set moe.upcycle: drop"
    ):
        resolve_spec({"task": "toy", "moe": {"router": "softmax-topk", "upcycle": True, "upcycle_drop": 0.5}})
    with pytest.raises(SpecError, match=r"moe.upcycle must be one of false, true, drop"):
        resolve_spec({"task": "toy", "moe": {"router": "softmax-topk", "upcycle": "dropped"}})
    assert (
        resolve_spec({"task": "toy", "moe": {"router": "softmax-topk", "upcycle": "drop"}})["moe"]["upcycle_drop"]
        is None
    )
    with pytest.raises(ValueError, match="upcycle must be true, false or 'drop'"):
        moefy(_dense(), upcycle="yes please")
