"""moe.router_init_std: each router's default gate init is what the README documents; the option
redraws exactly the learned gate from N(0, std^2), is refused (naming the field) by routers without one,
leaves every earlier run id alone at its default, and reaches the model through moefy and a run spec."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import make_spec, task_for

from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS
from moebench.training import records
from moebench.training.spec import SpecError, resolve_spec, run_id
from moebench.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, E = 256, 32, 8
LINEAR = 1 / math.sqrt(3 * D)  # nn.Linear's default: U(-1/sqrt(d), 1/sqrt(d))
# The README's table "Router initialisation": the default std of each router's learned gate at d = D.
DEFAULT_STD = {
    name: LINEAR
    for name in (
        "softmax-topk",
        "switch",
        "expert-choice",
        "loss-free",
        "deepseek-v3",
        "top-p",
        "remoe",
        "base",
        "sinkhorn",
        "ssmoe",
        "xmoe",
    )
}
DEFAULT_STD.update({"emoe": 1.0, "soft-moe": 1 / math.sqrt(D)})
NO_GATE = {"hash", "uniform", "random", "oracle", "collapse", "ermoe"}
ARGS = {"emoe": {"rank": 64}, "soft-moe": {"tokens_per_sequence": 16}}
LAYER_ROUTERS = [n for n in ROUTERS.builtin_names() if not getattr(ROUTERS.get(n), "image_level", False)]


def _layer(name, **kw):
    torch.manual_seed(0)
    return MoELayer(D, H, E, router=name, router_args=ARGS.get(name), **kw)


def test_every_router_is_documented():
    assert set(LAYER_ROUTERS) == set(DEFAULT_STD) | NO_GATE


@pytest.mark.parametrize("name", sorted(DEFAULT_STD))
def test_default_init_is_the_documented_one_and_the_option_redraws_it(name):
    params = _layer(name).router.gate_parameters()
    assert params and all(p.requires_grad for p in params)
    assert torch.cat([p.flatten() for p in params]).std().item() == pytest.approx(DEFAULT_STD[name], rel=0.15)
    redrawn = torch.cat([p.flatten() for p in _layer(name, router_init_std=0.2).router.gate_parameters()])
    assert redrawn.std().item() == pytest.approx(0.2, rel=0.15)
    assert abs(redrawn.mean().item()) < 0.05


@pytest.mark.parametrize("name", sorted(NO_GATE))
def test_routers_without_a_gate_refuse_it_naming_the_field(name):
    assert _layer(name).router.gate_parameters() == []
    with pytest.raises(ValueError, match=rf"moe.router_init_std=0.02 cannot apply to router '{name}'.*null"):
        _layer(name, router_init_std=0.02)


def test_only_the_gate_changes():
    a, b = _layer("softmax-topk").state_dict(), _layer("softmax-topk", router_init_std=0.002).state_dict()
    assert not torch.equal(a["router.gate.weight"], b["router.gate.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a if k != "router.gate.weight")


def test_spec_records_it_and_old_run_ids_are_unchanged():
    spec = make_spec()
    base = run_id(spec)
    spec["moe"]["router_init_std"] = None
    assert run_id(spec) == base  # the default is left out of the id: earlier runs keep theirs
    spec["moe"]["router_init_std"] = 0.02
    assert run_id(spec) != base and resolve_spec(spec)["moe"]["router_init_std"] == 0.02
    spec["moe"]["router_init_std"] = 0
    with pytest.raises(SpecError, match="moe.router_init_std must be a number > 0 or null"):
        resolve_spec(spec)


def _metrics(tmp_path, std):
    spec = make_spec(steps=4, eval_every=4, checkpoint_every=0, eval_at_start=True)
    spec["moe"]["router_init_std"] = std
    train(task_for(spec), spec, tmp_path / str(std), progress=False)
    return records.read_jsonl(tmp_path / str(std) / "metrics.jsonl")


def test_a_run_uses_it_and_logs_step_0(tmp_path):
    """Top-k selection is scale-invariant, so two stds (the same draw, scaled) route the first MoE layer
    identically at step 0; the scale shows in the weights (softmax temperature), hence in the next
    layer's input, and once the gate learns."""
    small, large = _metrics(tmp_path, 1e-3), _metrics(tmp_path, 1.0)
    assert [line["step"] for line in small] == [0, 4] and small[0]["train_loss"] is None
    first = [[line["routing"]["per_layer"][0]["load_cv"] for line in run] for run in (small, large)]
    assert first[0][0] == first[1][0]
    assert small[1]["routing"]["mean"]["load_cv"] != large[1]["routing"]["mean"]["load_cv"]
    default = make_spec(steps=4, eval_every=4, checkpoint_every=0)
    train(task_for(default), default, tmp_path / "default", progress=False)
    # every MoE run evaluates at step 0 (issue 18: the routing before any learning is in every record)
    assert [line["step"] for line in records.read_jsonl(tmp_path / "default" / "metrics.jsonl")] == [0, 4]
