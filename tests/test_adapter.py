"""Adapter MoE (moe.mode: adapter) and frozen backbones: the branch computes x + alpha * MoE(x) on the
patch tokens only, experts are bias-free bottlenecks, only MoE + head train, costs count it all."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from moebench.core.layer import MoELayer, moe_layers
from moebench.core.moefy import moefy
from moebench.core.registry import ROUTERS

ROUTER_ARGS = {"emoe": {"rank": 8}}


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
    ).eval()


def test_adapter_branch_is_residual_on_patches_only():
    net = tiny_vit()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 16, 16)
    moefy(net, blocks=[1], num_experts=4, router="softmax-topk", d_hidden=8, mode="adapter", patches_only=True)
    adapter = net.blocks[1].moe_adapter
    assert isinstance(adapter.moe, MoELayer) and adapter.prefix == 1 and float(adapter.alpha.detach()) == 1.0
    experts = adapter.moe.experts
    assert "b1" not in dict(experts.named_parameters()) and experts.d_hidden == 8 and experts.activation == "gelu"
    # dense MLP kept, branch added after the block: reproduce by hand from the dense model's block
    tokens = dense.patch_embed(x)
    tokens = dense._pos_embed(tokens)
    y0 = dense.blocks[0](tokens)
    y1 = dense.blocks[1](y0)
    with torch.no_grad():
        adapter.alpha.fill_(0.7)
    got = net.blocks[1](net.blocks[0](tokens))
    want = y1.clone()
    want[:, 1:] = y1[:, 1:] + 0.7 * adapter.moe(y1[:, 1:])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[:, 0], y1[:, 0])  # CLS untouched
    assert adapter.moe.stats["tokens"] == 2 * 16  # 16 patches per image routed, not 17


@pytest.mark.parametrize(
    "router",
    [
        n
        for n in ROUTERS.builtin_names()
        if not getattr(ROUTERS.get(n), "image_level", False) and not getattr(ROUTERS.get(n), "needs_group", False)
    ],
)  # oracle: test_structure.py
def test_every_router_runs_as_adapter_on_a_frozen_backbone(router):
    net = tiny_vit()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    moefy(
        net,
        blocks="last-2",
        num_experts=4,
        router=router,
        router_args=ROUTER_ARGS.get(router, {}),
        d_hidden=8,
        mode="adapter",
        patches_only=True,
        freeze_backbone=True,
    )
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".moe_adapter." in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "blocks.2.moe_adapter.alpha"} <= trainable
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    loss = net(x).logsumexp(-1).mean() + sum(m.aux_loss for m in moe_layers(net))
    loss.backward()
    opt.step()
    for m in moe_layers(net):
        m.after_step()
    for n, p in net.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]) == (n not in trainable), n  # backbone unchanged, head moved


def test_train_norms_unfreezes_layernorms_only():
    net = tiny_vit()
    moefy(
        net,
        blocks=[2],
        num_experts=2,
        router="softmax-topk",
        d_hidden=8,
        mode="adapter",
        freeze_backbone=True,
        train_norms=True,
    )
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trainable and "blocks.0.attn.qkv.weight" not in trainable


def test_replace_mode_can_freeze_too():
    net = tiny_vit()
    moefy(net, blocks=[2], num_experts=2, router="softmax-topk", freeze_backbone=True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if n.startswith(("blocks.2.mlp.", "head."))}


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"mode": "adapter", "upcycle": True}, "upcycle=True needs mode='replace'"),
        ({"patches_only": True}, "patches_only=True applies to mode='adapter'"),
        ({"mode": "sideways"}, "mode must be one of"),
    ],
)
def test_bad_adapter_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        moefy(tiny_vit(), blocks=[1], num_experts=2, **kw)


def test_adapter_default_width_is_a_quarter_of_d():
    net = tiny_vit()
    moefy(net, blocks=[0], num_experts=2, mode="adapter")
    assert net.blocks[0].moe_adapter.moe.d_hidden == 32 // 4


def test_grid_costs_count_the_adapter_branch_on_top_of_the_dense_mlps(tmp_path):
    import yaml

    from moebench.grids import expand as expand_mod
    from moebench.grids.matching import costs

    grid = {
        "name": "adapt",
        "task": "classification",
        "preset": "quick",
        "seeds": [0],
        "match": "none",
        "moe": {
            "blocks": "last-2",
            "num_experts": 8,
            "d_hidden": 16,
            "mode": "adapter",
            "patches_only": True,
            "freeze_backbone": True,
        },
        "routers": ["dense", "softmax-topk"],
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(grid))
    dense, moe = expand_mod.expand(str(path))
    assert moe["moe"]["mode"] == "adapter" and moe["moe"]["patches_only"] and moe["moe"]["freeze_backbone"]
    c_dense, c_moe = costs(dense, blocks="last-2"), costs(moe)
    d, E, b, k = 64, 8, 16, 2  # the quick classification ViT: dim 64
    router = 2 * d * E
    assert c_moe["mlp_flops_per_token"] == c_dense["mlp_flops_per_token"] + 2 * (k * 4 * d * b + router)
    assert c_moe["params_total"] == c_dense["params_total"] + 2 * (E * 2 * d * b + d * E + 1)  # no biases; + alpha
