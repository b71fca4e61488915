"""Gradient purity (issue 20): the cosine between the router's task-loss and balance-loss gradients,
checked against a hand computation and logged at probe steps of a real (toy) run."""

import math

import pytest
import torch
from test_train import make_spec, task_for

from moebench.core.layer import MoELayer
from moebench.training import records
from moebench.training.gradprobe import grad_cosine, probe_due
from moebench.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_steps_are_eval_steps_and_probe_every():
    due = [s for s in range(1, 31) if probe_due(s, 30, 10)]
    assert due == [10, 20, 30]
    assert [s for s in range(1, 31) if probe_due(s, 30, 10, probe_every=4)] == [4, 8, 10, 12, 16, 20, 24, 28, 30]


def test_cosine_matches_separate_backward_passes():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="switch", router_args={"top_k": 1})
    x = torch.randn(2, 10, 8)
    target = torch.randn(2, 10, 8)
    task_loss = ((layer(x) - target) ** 2).mean()
    got = grad_cosine(task_loss, [("moe", layer)])
    params = list(layer.router.parameters())
    g_task = torch.cat([g.reshape(-1) for g in torch.autograd.grad(task_loss, params, retain_graph=True)])
    g_bal = torch.cat([g.reshape(-1) for g in torch.autograd.grad(layer.aux_losses["balance"], params)])
    want = float(g_task @ g_bal / (g_task.norm() * g_bal.norm()))
    assert got["grad_cos_task_balance"] == pytest.approx(want, abs=1e-6)
    assert got["per_layer"]["moe"] == pytest.approx(want, abs=1e-6)
    assert -1.0 <= want <= 1.0 and want != 0.0


def test_router_without_balance_loss_is_not_probed():
    layer = MoELayer(8, 16, 4, router="softmax-topk")
    loss = layer(torch.randn(1, 5, 8)).pow(2).mean()
    assert grad_cosine(loss, [("moe", layer)]) is None


def test_run_logs_the_cosine_at_each_eval_and_its_mean(tmp_path):
    spec = make_spec("switch", steps=20, eval_every=10)
    spec["moe"]["router_args"] = {"top_k": 1}
    final = train(task_for(spec), spec, tmp_path / "run", progress=False)
    lines = records.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    per_step = [
        ln["routing"]["mean"]["grad_cos_task_balance"] for ln in lines if ln["step"] > 0
    ]  # step 0: no gradient yet
    assert [ln["step"] for ln in lines] == [0, 10, 20] and all(isinstance(v, float) for v in per_step)
    assert [p["step"] for p in final["routing"]["grad_probe"]] == [10, 20]
    assert math.isclose(final["routing"]["mean"]["grad_cos_task_balance"], sum(per_step) / 2, rel_tol=1e-9)
    plain = train(
        task_for(make_spec("softmax-topk", steps=10)),
        make_spec("softmax-topk", steps=10),
        tmp_path / "plain",
        progress=False,
    )
    assert "grad_cos_task_balance" not in plain["routing"]["mean"]
