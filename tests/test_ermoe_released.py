"""ermoe-released: the released ERMoE method (image-level routing over whole-backbone experts), checked
against a transcription of the facts in docs/ERMOE.md; identical copies tie, perturbed ones do not."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from moebench.core.image_moe import eigen_attention_score, select_experts
from moebench.core.layer import MoELayer, moe_layers
from tasks.common import apply_moe


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        in_chans=1,
    )


def build(E=4, **args):
    return apply_moe(tiny_vit(), {"router": "ermoe-released", "num_experts": E, "router_args": args})


def test_score_matches_a_numpy_transcription():
    g = torch.Generator().manual_seed(0)
    # P = 6 patches <= d = 9: the Gram matrix has full rank, so its eigenvectors are unique up to sign
    # (with P > d the null-space eigenvectors are arbitrary and so is the score: docs/ERMOE.md)
    x = torch.randn(3, 6, 9, generator=g)
    a = torch.softmax(torch.randn(3, 6, 6, generator=g), -1)
    got = eigen_attention_score(x, a)
    for b in range(3):
        xb, ab = x[b].numpy().astype(np.float64), a[b].numpy().astype(np.float64)
        _, u = np.linalg.eigh(xb @ xb.T)
        m = u.T @ ab @ u
        want = np.sum(np.diag(m) ** 2) / (np.sum(m**2) + 1e-10)
        assert got[b].item() == pytest.approx(want, rel=1e-5)


def test_selection_threshold_free_experts_then_highest():
    s = torch.tensor(
        [
            [0.9, 0.2, 0.7, 0.6],  # three qualify: the top-2 of them
            [0.1, 0.3, 0.8, 0.2],  # one qualifies: + free expert 0
            [0.1, 0.3, 0.4, 0.2],
        ]
    )  # none: free expert 0, then the highest remaining (2)
    idx, fallback = select_experts(s, 2, 0.5, (0,))
    assert idx.tolist() == [[0, 2], [2, 0], [0, 2]]
    assert fallback.tolist() == [False, True, True]
    idx, _ = select_experts(s[2:], 3, 0.5, (3, 1))  # two free experts, in random order, before the rest
    assert set(idx[0, :2].tolist()) == {1, 3} and idx[0, 2].item() == 2


def test_identical_copies_tie_and_the_output_is_the_score_weighted_head_average():
    net = build()
    x = torch.randn(6, 1, 16, 16)
    out = net(x)
    stats = net.routing.stats
    assert float(stats["tie"]) == 1.0  # the faithful, degenerate case
    assert float(stats["fallback"]) == 1.0 or float(stats["fallback"]) == 0.0
    S = stats["scores"]
    logits = torch.stack([e.head(e.forward_features(x)[:, 0]) for e in net.experts], 1)  # CLS token (timm default)
    idx, _ = select_experts(S, 2, 0.5, (0,))
    w = S.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    want = (w.unsqueeze(-1) * logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, 5))).sum(1)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # each expert has its own head


def test_expert_noise_breaks_the_ties_and_only_heads_train_by_default():
    net = build(expert_noise=0.05)
    net(torch.randn(6, 1, 16, 16))
    assert float(net.routing.stats["tie"]) == 0.0
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"experts.{e}.head.{w}" for e in range(4) for w in ("weight", "bias")}
    unfrozen = build(freeze_experts=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_routing_stats_reach_the_records_like_a_moe_layer():
    from moebench.training import metrics as M

    net = build()
    assert moe_layers(net) == [net.routing]
    acc = M.RoutingStatsAccumulator(net)
    with acc:
        net(torch.randn(5, 1, 16, 16))
        acc.update((torch.zeros(5), torch.arange(5)))
    layer = acc.per_layer()[0]
    assert sum(layer["counts"]) == 5 * 2 and layer["fallback_rate"] == 1.0


def test_ermoe_released_refuses_to_sit_in_a_moe_layer():
    with pytest.raises(ValueError, match="routes whole images"):
        MoELayer(16, 32, 4, router="ermoe-released")
    with pytest.raises(ValueError, match="needs a ViT with forward_features"):
        apply_moe(torch.nn.Linear(3, 3), {"router": "ermoe-released", "num_experts": 2, "router_args": {}})


def test_a_backbone_without_class_token_uses_its_own_pooling_and_routes_every_patch():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        in_chans=1,
        class_token=False,
        global_pool="avg",
    )
    net = apply_moe(vit, {"router": "ermoe-released", "num_experts": 2, "router_args": {}})
    assert net.prefix == 0
    x = torch.randn(3, 1, 16, 16)
    net(x)
    e = net.experts[0]
    feats = e.forward_features(x)
    torch.testing.assert_close(net._head(e, feats), e.head(e.fc_norm(feats.mean(1))))  # timm: avg pool, fc_norm


def test_grid_show_costs_count_every_backbone_copy(tmp_path):
    import yaml

    from moebench.grids import expand as expand_mod
    from moebench.grids.matching import costs

    grid = {
        "name": "rel",
        "task": "classification",
        "preset": "tiny",
        "seeds": [0],
        "moe": {"blocks": "last-2", "num_experts": 3},
        "routers": ["dense", "softmax-topk", "ermoe-released"],
    }
    path = tmp_path / "rel.yaml"
    path.write_text(yaml.safe_dump(grid))
    dense, _, rel = expand_mod.expand(str(path))
    assert "not width-matched" in rel["match"]["note"]
    c_dense, c_rel = costs(dense, blocks="all"), costs(rel)
    assert c_rel["params_total"] == c_rel["params_active"] == 3 * c_dense["params_total"]
    assert c_rel["mlp_flops_per_token"] == 3 * c_dense["mlp_flops_per_token"]  # all blocks of all copies
    assert c_rel["router_flops_per_token"] > 0
