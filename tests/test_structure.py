"""The `structure` task's generators, sequence-level routing and the oracle / collapse controls."""

import math

import pytest
import torch

from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS
from moebench.core.routing import RoutingContext
from moebench.tasks.structure import NOISE, ROLES, StructureTask, _Constants, subspace_bases


def _data(data, n=4000, **kw):
    task = StructureTask(data=data, num_train=n, num_eval=8, **kw)
    x, target, label, role, group = task.datasets()[0].tensors
    return task, x, target, label, role, group


def test_clusters_follow_chen_et_al():
    g = torch.Generator().manual_seed(0)
    const = _Constants({"data": "clusters"}, g)
    basis = torch.cat([const.v, const.c])  # 8 vectors in R^50
    assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-5)  # orthonormal features and centres
    task, x, target, label, role, group = _data("clusters")
    assert x.shape[1:] == (4, 50)
    assert (torch.sort(role, 1).values == torch.arange(4)).all()  # one patch of each role per example
    assert (role == NOISE).float().mean() == 0.25 and ((label == -1) == (role == NOISE)).all()
    assert abs(target.float().mean() - 0.5) < 0.03  # y balanced
    assert (torch.bincount(group, minlength=4).float() / len(group) - 0.25).abs().max() < 0.03
    feat = x[role == ROLES.index("feature")] / 10
    alpha = feat.norm(dim=1)
    assert alpha.min() >= 0.5 - 1e-4 and alpha.max() <= 2 + 1e-4  # |y α v_k| = α ~ U(0.5, 2)
    centre = x[role == ROLES.index("centre")] / 10
    on_centre = (centre @ const.c.T).abs().max(1).values  # each centre patch lies on one c_k: β c_k
    assert torch.allclose(on_centre, centre.norm(dim=1), atol=1e-4) and on_centre.min() >= 1 - 1e-4
    for setting in (1, 2):
        _, xs, _, _, rs, _ = _data("clusters", n=2000, setting=setting)
        sigma = (xs[rs == NOISE] / 10).std().item()
        assert sigma == pytest.approx(setting / math.sqrt(50), rel=0.05)


@pytest.mark.parametrize("angle", [30.0, 60.0, 90.0])
def test_subspaces_have_the_stated_principal_angles(angle):
    u = subspace_bases(32, 4, 4, angle, torch.Generator().manual_seed(1))
    for a in range(4):
        assert torch.allclose(u[a].T @ u[a], torch.eye(4), atol=1e-5)
        for b in range(a + 1, 4):
            cosines = torch.linalg.svdvals(u[a].T @ u[b])
            assert torch.allclose(torch.rad2deg(torch.arccos(cosines.clamp(max=1))), torch.full((4,), angle), atol=0.1)


@pytest.mark.parametrize("data", ["subspaces", "mean-shift", "latent-regression"])
def test_other_generators_balance_groups_and_plant_the_stated_share_of_irrelevant_tokens(data):
    task, x, target, label, role, group = _data(data, seq_len=8, noise_tokens=2)
    assert ((label == -1) == (role == NOISE)).all() and (role == NOISE).float().mean() == 0.25
    assert ((label == group[:, None]) | (label == -1)).all()
    assert (torch.bincount(group, minlength=4).float() / len(group) - 0.25).abs().max() < 0.03
    if data != "latent-regression":
        assert abs(target.float().mean() - 0.5) < 0.05
    noise_positions = (role == NOISE).float().mean(0)
    assert noise_positions.min() > 0.15  # noise tokens are not parked at fixed positions


def test_mean_shift_means_differ_only_in_sign_and_readouts_are_orthogonal_to_them():
    const = _Constants({"data": "mean-shift"}, torch.Generator().manual_seed(0))
    assert torch.allclose(const.w @ const.mu.T, torch.zeros(4, 2), atol=1e-5)
    task, x, target, label, role, group = _data("mean-shift")
    feat = role != NOISE
    m = [x[feat & (group[:, None] == g)].mean(0) for g in range(4)]
    assert torch.allclose(m[0], -m[1], atol=0.15) and torch.allclose(m[2], -m[3], atol=0.15)
    assert m[0].norm() == pytest.approx(3.0, rel=0.05)


def test_latent_regression_signs_sum_to_zero():
    const = _Constants({"data": "latent-regression"}, torch.Generator().manual_seed(0))
    assert float(const.s.sum()) == 0.0


def test_sequence_routing_sends_each_example_once_from_its_summed_logits():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="softmax-topk", router_args={"top_k": 1}, routing_unit="sequence")
    x = torch.randn(5, 6, 8)
    layer(x)
    top1 = layer.stats["top1"].view(5, 6)
    assert (top1 == top1[:, :1]).all()  # one decision per sequence
    summed_logits = (x @ layer.router.gate.weight.T).sum(1)  # Chen et al.: sum of the gate logits
    assert torch.equal(top1[:, 0], summed_logits.argmax(-1))


@pytest.mark.parametrize("router", ["ermoe", "emoe", "hash", "soft-moe", "xmoe"])
def test_sequence_routing_refuses_routers_without_linear_gate_logits(router):
    args = {"rank": 4} if router == "emoe" else {}
    with pytest.raises(ValueError, match=f"router '{router}' cannot route by sequence"):
        MoELayer(8, 16, 4, router=router, router_args=args, routing_unit="sequence")


def test_oracle_routes_to_the_true_group_and_needs_it():
    oracle = ROUTERS.get("oracle")(8, 4)
    group = torch.tensor([2, 0, 3, 1, -1])
    r = oracle(torch.randn(5, 8), RoutingContext(group=group))
    assert r.expert.tolist() == [2, 0, 3, 1, 0]
    with pytest.raises(ValueError, match="needs each token's true group"):
        oracle(torch.randn(5, 8), RoutingContext())


def test_collapse_sends_everything_to_one_expert():
    r = ROUTERS.get("collapse")(8, 4)(torch.randn(7, 8), RoutingContext())
    assert r.expert.tolist() == [0] * 7


def test_the_task_passes_the_group_to_the_oracle_through_the_layer(one_thread):
    task = StructureTask(data="clusters", num_train=64, num_eval=64)
    model = task.build_model({}, {"blocks": [-1], "num_experts": 4, "router": "oracle", "d_hidden": 16})
    batch = task.datasets()[1].tensors
    task.forward(model, batch)
    (layer,) = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert torch.equal(layer.stats["top1"].view(64, 4), batch[4][:, None].expand(64, 4))


@pytest.mark.slow
def test_controls_come_out_as_they_must_on_clusters(tmp_path, one_thread):
    """End to end: oracle NMI ~ 1, random and collapse NMI ~ 0, collapse below the oracle on accuracy."""
    import json
    from pathlib import Path

    from moebench.cli import main

    finals = {}
    for router in ("oracle", "random", "collapse"):
        args = [
            "train",
            "--task",
            "structure",
            "--size",
            "tiny",
            "--router",
            router,
            "--results",
            str(tmp_path),
            "--router-args",
            "{top_k: 1}",
            "--set",
            "moe.blocks=[-1]",
            "--set",
            "train.steps=150",
            "--set",
            "task_args.num_eval=512",
        ]
        assert main(args) == 0
        (path,) = [p for p in Path(tmp_path, "single").glob(f"{router}-*/final.json")]
        finals[router] = json.loads(path.read_text())
    nmi = {r: f["routing"]["mean"]["nmi"] for r, f in finals.items()}
    assert nmi["oracle"] >= 0.95 and nmi["random"] <= 0.05 and nmi["collapse"] <= 0.05
    assert finals["oracle"]["routing"]["recovery_by_role"]["distractor"]["routing_accuracy"] == 1.0
    score = {r: f["headline"]["value"] for r, f in finals.items()}
    assert score["collapse"] < score["oracle"]


def test_the_token_mlp_is_timms_mlp():
    """The structure model's own Mlp (timm is not imported on its path) has timm Mlp's children, init and
    outputs, so runs and checkpoints are unchanged."""
    import timm.layers
    import torch

    from moebench.tasks.structure import Mlp

    torch.manual_seed(0)
    a = timm.layers.Mlp(32, 64)
    torch.manual_seed(0)
    b = Mlp(32, 64)
    assert [n for n, _ in a.named_children()] == [n for n, _ in b.named_children()]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    x = torch.randn(5, 32)
    assert torch.equal(a(x), b(x))
