"""The training loop, run records and runner on the toy task (a few seconds per run on one thread)."""

import copy
import json
import math

import pytest
import torch
import yaml
from torch import nn

import moebench.tasks.toy as toy
from moebench.cli import main
from moebench.core.registry import TASKS, register_router, register_task
from moebench.core.routing import Router, topk_routing
from moebench.training import records
from moebench.training.runner import execute
from moebench.training.spec import SpecError, apply_override, resolve_spec, run_id
from moebench.training.train import lr_factor, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_spec(router="softmax-topk", steps=30, **train):
    moe = None if router == "dense" else {"blocks": "all", "num_experts": 4, "router": router, "router_args": {}}
    return {
        "grid": "test",
        "task": "toy",
        "task_args": {"num_train": 256, "num_eval": 64},
        "model": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        "moe": moe,
        "seed": 0,
        "train": {
            "steps": steps,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 3,
            "eval_every": 10,
            "checkpoint_every": 4,
            "probe_size": 16,
            **train,
        },
    }


def comparable(final):
    """The parts of a final record that must not depend on timing or the machine."""
    return {k: v for k, v in final.items() if k not in ("cost", "env")}


def task_for(spec):
    return TASKS.get(spec["task"])(**spec["task_args"])


# --- spec ---------------------------------------------------------------------------------------------
def test_run_id_is_stable_and_sensitive():
    spec = make_spec()
    rid = run_id(spec)
    assert rid.startswith("softmax-topk-s0-") and len(rid.split("-")[-1]) == 10
    assert run_id(resolve_spec(spec)) == rid  # defaults spelled out: same run
    assert run_id({**spec, "grid": "other"}) == rid  # grid is where, not what
    assert run_id({**spec, "seed": 1}) != rid
    changed = copy.deepcopy(spec)
    changed["train"]["lr"] = "3e-3"  # YAML 1.1 string: coerced, same run
    assert run_id(changed) == rid
    changed["train"]["lr"] = 1e-3
    assert run_id(changed) != rid


def test_spec_errors_name_field_and_fix():
    with pytest.raises(SpecError, match="train.steps must be an integer >= 1"):
        resolve_spec({**make_spec(), "train": {"steps": 0}})
    with pytest.raises(SpecError, match=r"unknown train key\(s\) 'stpes' \(did you mean 'steps'\?\)"):
        resolve_spec({**make_spec(), "train": {"stpes": 3}})
    with pytest.raises(SpecError, match="unknown top-level spec key"):
        resolve_spec({**make_spec(), "optimizer": "sgd"})
    with pytest.raises(SpecError, match="label must be"):
        resolve_spec({**make_spec(), "label": "a/b"})
    with pytest.raises(SpecError, match="moe is null"):
        apply_override(make_spec("dense"), "moe.num_experts=4")
    with pytest.raises(SpecError, match="train.deterministic"):
        resolve_spec({**make_spec(), "train": {"deterministic": "sometimes"}})
    assert resolve_spec(make_spec())["train"]["deterministic"] == "auto"
    s = apply_override(make_spec(), "train.lr=3e-4")
    assert s["train"]["lr"] == pytest.approx(3e-4)


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


# --- learning and records -----------------------------------------------------------------------------
def test_toy_learns_and_writes_schema_conformant_records(tmp_path):
    spec = make_spec(steps=60, eval_every=20, checkpoint_every=20)
    spec["model"]["dim"] = 32
    res = execute(spec, tmp_path, progress=False)
    assert res["state"] == "done", res["reason"]
    run_dir = tmp_path / "test" / run_id(spec)
    assert res["run_dir"] == str(run_dir)
    assert yaml.safe_load((run_dir / "spec.yaml").read_text()) == resolve_spec(spec)
    status = records.read_status(run_dir)
    assert status["state"] == "done" and status["reason"] is None and status["attempts"] == 1
    assert ":" in status["owner"]
    assert not (run_dir / "checkpoint.pt").exists()

    lines = records.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 20, 40, 60]  # step 0: the routing before any learning
    assert lines[0]["train_loss"] is None
    for r in lines:
        assert {"step", "train_loss", "lr", "metrics", "routing"} <= set(r)
        assert r["step"] == 0 or math.isfinite(r["train_loss"])
        assert r["lr"] > 0
        assert len(r["routing"]["per_layer"]) == 2
        for d in r["routing"]["per_layer"]:
            assert len(d["counts"]) == 4 and sum(d["counts"]) == 64 * 16 * 2  # top-2 of every eval token
            assert "load_cv" in d and "label_by_expert" not in d
    assert lines[0]["routing"]["per_layer"][0]["switch_rate"] is None  # nothing to compare with yet
    assert lines[1]["routing"]["per_layer"][0]["switch_rate"] is not None

    final = records.read_json(run_dir / "final.json")
    assert final == json.loads(json.dumps(res["final"], default=records.json_default))
    for key in (
        "run_id",
        "grid",
        "task",
        "router",
        "label",
        "seed",
        "sweep",
        "headline",
        "metrics",
        "routing",
        "cost",
        "env",
    ):
        assert key in final, key
    assert final["headline"]["name"] == "accuracy" and final["headline"]["higher_is_better"] is True
    assert final["headline"]["value"] == final["metrics"]["accuracy"] > 0.6  # chance is 0.25
    layer = final["routing"]["per_layer"][0]
    assert len(layer["label_by_expert"]) == 4 and len(layer["labels"]) == 4
    # probe_every null: steps // 10, so probe points 0, 6, ..., 60 plus the evaluations at 20 and 40
    steps = sorted(set(range(0, 61, 6)) | {20, 40})
    assert layer["final_switch"][-1] == 0.0 and len(layer["final_switch"]) == len(steps) == 13
    fs = final["routing"]["final_switch"]
    assert fs["steps"] == steps and fs["per_eval"][-1] == 0.0
    probe = final["routing"]["probe"]
    assert probe["steps"] == fs["steps"] and probe["switch_rate"][0] is None and len(probe["switch_rate"]) == 13
    for d in final["routing"]["per_layer"]:
        counts = d["top1_counts"]
        assert d["first_choice_max_share"] == pytest.approx(max(counts) / sum(counts))
        assert d["collapsed"] is (d["first_choice_max_share"] > 0.5)
        assert (
            d["first_choice_max_share_init"]
            == lines[0]["routing"]["per_layer"][final["routing"]["per_layer"].index(d)]["first_choice_max_share"]
        )
        assert 0.0 <= d["moved_from_init"] <= 1.0 and d["moved_from_init"] == pytest.approx(d["final_switch"][0])
    assert final["routing"]["mean"]["collapsed"] is any(d["collapsed"] for d in final["routing"]["per_layer"])
    assert fs["mean"] == pytest.approx(sum(fs["per_eval"][:-1]) / 12)
    assert fs["mean"] == pytest.approx(final["routing"]["mean"]["final_switch_mean"])
    assert final["routing"]["mean"]["mutual_info"] > 0.05  # experts pick up the token components
    cost = final["cost"]
    for key in ("params_total", "params_active", "flops_per_token", "wall_time_s", "tokens_per_s", "peak_memory_mb"):
        assert cost[key] > 0, key
    assert cost["params_active"] < cost["params_total"]  # 2 of 4 experts per token
    assert final["env"]["libraries"]["torch"]

    again = execute(spec, tmp_path, progress=False)  # done: skipped, not rerun
    assert again["state"] == "done" and again["skipped"] and comparable(again["final"]) == comparable(final)


def test_flops_include_the_router():
    task = task_for(make_spec())
    from moebench.training.train import model_cost

    spec = resolve_spec(make_spec())
    net = task.build_model(spec["model"], spec["moe"])
    cost = model_cost(net)
    from moebench.core.layer import moe_layers

    layers = moe_layers(net)
    router = sum(m.router.flops_per_token() for m in layers)
    assert router == 2 * 2 * 16 * 4  # 2 layers of a d x E linear gate
    experts = sum(2 * 2 * 2 * 16 * 32 for _ in layers)  # top-2, two projections, 2 FLOPs per MAC
    linear_outside = 2 * sum(
        m.weight.numel() for n, m in net.named_modules() if isinstance(m, nn.Linear) and ".mlp" not in n
    )
    assert cost["flops_per_token"] == pytest.approx(linear_outside + experts + router)


def test_same_seed_same_metrics_and_seed_matters(tmp_path):
    spec = make_spec(steps=20)
    a = train(task_for(spec), spec, tmp_path / "a", progress=False)
    b = train(task_for(spec), spec, tmp_path / "b", progress=False)
    assert comparable(a) == comparable(b)
    other = {**spec, "seed": 1}
    c = train(task_for(other), other, tmp_path / "c", progress=False)
    assert c["metrics"] != a["metrics"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("router", ["switch"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, router):
    # switch: jitter draws from the global RNG and capacity drops tokens, so RNG state must resume too
    spec = make_spec(router, steps=30, eval_every=10, checkpoint_every=4)
    spec["moe"]["router_args"] = {"top_k": 1}
    full = train(task_for(spec), spec, tmp_path / "full", progress=False)

    run = tmp_path / "cut"

    def stop(step):
        if step == 14:  # last checkpoint at 12 (eval at 10): steps 13-14 are redone
            raise Interrupt

    with pytest.raises(Interrupt):
        train(task_for(spec), spec, run, progress=False, on_step=stop)
    assert (run / "checkpoint.pt").exists()
    assert [r["step"] for r in records.read_jsonl(run / "metrics.jsonl")] == [0, 10]
    # a line written after the checkpoint (killed between eval and save) must be dropped on resume
    records.append_jsonl(run / "metrics.jsonl", {"step": 20, "metrics": {"accuracy": -1.0}})

    resumed = train(task_for(spec), spec, run, progress=False)
    assert comparable(resumed) == comparable(full)
    assert resumed["cost"]["wall_time_s"] > 0
    cut_lines = records.read_jsonl(run / "metrics.jsonl")
    full_lines = records.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in cut_lines] == [0, 10, 20, 30]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(cut_lines) == strip(full_lines)
    assert not (run / "checkpoint.pt").exists()


def test_probes_do_not_change_the_run(tmp_path):
    """Routing the probe samples every step must leave training exactly as without probes (they run in
    eval mode, under no_grad, with the RNG state forked: switch's jitter draws from the global RNG)."""
    finals = {}
    for every in (0, 1):
        spec = make_spec("switch", steps=12, eval_every=6, checkpoint_every=0, probe_every=every)
        spec["moe"]["router_args"] = {"top_k": 1}
        finals[every] = train(task_for(spec), spec, tmp_path / str(every), progress=False)
    assert finals[1]["metrics"] == finals[0]["metrics"]
    assert finals[0]["routing"]["probe"]["steps"] == [0, 6, 12]  # 0: only at the evaluations
    assert finals[1]["routing"]["probe"]["steps"] == list(range(13))


def test_checkpoint_of_another_run_is_set_aside_and_the_run_restarts(tmp_path, capsys):
    spec = make_spec(steps=8, eval_every=4, checkpoint_every=4)

    def stop(step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(task_for(spec), spec, tmp_path / "run", progress=False, on_step=stop)
    other = {**spec, "seed": 3}
    resumed = train(task_for(other), other, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "belongs to run 'softmax-topk-s0-" in err and "restarted from step 0" in err
    clean = train(task_for(other), other, tmp_path / "clean", progress=False)
    assert comparable(resumed) == comparable(clean)  # started from zero, not from the other run's weights
    assert [r["step"] for r in records.read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 4, 8]
    assert len(list((tmp_path / "run" / ".stale").glob("*/checkpoint.pt"))) == 1


# --- failures -----------------------------------------------------------------------------------------
@register_task("test-toy-nan", "toy whose loss turns NaN at step 3 (tests)")
class NanToy(toy.ToyTask):
    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def loss(self, outputs, batch):
        self.calls += 1
        loss = super().loss(outputs, batch)
        return loss * float("nan") if self.calls >= 3 else loss


def test_nan_loss_fails_the_run_without_raising(tmp_path):
    spec = {**make_spec(steps=10), "task": "test-toy-nan"}
    res = execute(spec, tmp_path, progress=False)
    assert res["state"] == "failed"
    assert res["reason"] == "diverged at step 3: loss=nan"
    run_dir = tmp_path / "test" / run_id(spec)
    status = records.read_status(run_dir)
    assert status["state"] == "failed" and status["reason"] == "diverged at step 3: loss=nan"
    assert not (run_dir / "final.json").exists()


def test_loss_above_max_loss_fails_the_run(tmp_path):
    res = execute(make_spec(max_loss=0.5), tmp_path, progress=False)  # initial CE ~ log 4 = 1.39
    assert res["state"] == "failed"
    assert res["reason"].startswith("diverged at step 1: loss=1.") and "> max_loss=0.5" in res["reason"]


def test_a_crashing_run_is_recorded_not_raised(tmp_path):
    spec = make_spec()
    spec["task_args"]["no_such_option"] = 1
    res = execute(spec, tmp_path, progress=False)
    assert res["state"] == "failed"
    assert res["reason"].startswith("TypeError: task 'toy' got unknown option(s) ['no_such_option']")
    assert records.read_status(tmp_path / "test" / run_id(spec))["state"] == "failed"
    bad = execute({**make_spec(), "train": {"steps": -1}}, tmp_path)
    assert bad["state"] == "failed" and "train.steps" in bad["reason"]


# --- aux losses and after_step ------------------------------------------------------------------------
@register_router("test-aux-counter", "top-1 gate with an L2 aux loss on its weights; counts after_step (tests)")
class AuxCounterRouter(Router):
    after_steps = 0

    def __init__(self, d_model, num_experts, top_k=1, coef=0.0):
        super().__init__(d_model, num_experts, top_k)
        self.coef = coef
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x, ctx):
        probs = torch.softmax(self.gate(x), -1)
        top_p, top_i = probs.topk(self.top_k, -1)
        aux = {"l2": self.coef * self.gate.weight.pow(2).sum()}
        return topk_routing(
            top_i,
            top_p / top_p.sum(-1, keepdim=True),
            self.num_experts,
            aux_losses=aux,
            stats={"scores": probs.detach()},
        )

    def after_step(self):
        type(self).after_steps += 1
        type(self).last_norm = float(self.gate.weight.detach().norm())


def test_aux_losses_enter_the_loss_and_after_step_runs(tmp_path):
    norms, aux = {}, {}
    for coef in (0.0, 5.0):
        spec = make_spec("test-aux-counter", steps=12, eval_every=12, checkpoint_every=0, lr=3e-2)
        spec["moe"]["router_args"] = {"coef": coef}
        AuxCounterRouter.after_steps = 0
        train(task_for(spec), spec, tmp_path / str(coef), progress=False)
        assert AuxCounterRouter.after_steps == 12 * 2  # every step, every MoE layer
        norms[coef] = AuxCounterRouter.last_norm
        aux[coef] = records.read_jsonl(tmp_path / str(coef) / "metrics.jsonl")[-1]["aux_loss"]
    assert aux[0.0] == 0.0 and aux[5.0] > 0.0
    assert norms[5.0] < 0.5 * norms[0.0]  # the aux gradient shrank the gate


def test_switch_balance_loss_is_recorded(tmp_path):
    spec = make_spec("switch", steps=4, eval_every=4)
    spec["moe"]["router_args"] = {"top_k": 1}
    final = train(task_for(spec), spec, tmp_path, progress=False)
    line = records.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert line["aux_loss"] > 2 * 0.01 * 0.9  # two layers, balance ~ 0.01 * (>= ~1) each, plus z-loss
    assert final["routing"]["per_layer"][0]["aux_balance"] > 0


def test_dense_baseline_has_no_routing(tmp_path):
    spec = make_spec("dense", steps=4, eval_every=4)
    final = train(task_for(spec), spec, tmp_path, progress=False)
    assert final["router"] == "dense" and final["routing"]["per_layer"] == []
    assert final["cost"]["params_active"] == final["cost"]["params_total"]


# --- CLI ----------------------------------------------------------------------------------------------
def test_cli_train_runs_and_rejects_bad_overrides(tmp_path, capsys):
    args = [
        "train",
        "--task",
        "toy",
        "--size",
        "tiny",
        "--router",
        "switch",
        "--router-args",
        "{top_k: 1}",
        "--steps",
        "4",
        "--set",
        "train.eval_every=2",
        "--set",
        "task_args.num_train=128",
        "--set",
        "model.dim=16",
        "--results",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "toy / switch seed 0: accuracy = " in out and f"record: {tmp_path}/single/switch-s0-" in out
    run_dirs = list((tmp_path / "single").iterdir())
    spec = records.read_spec(run_dirs[0])
    assert spec["train"]["steps"] == 4 and spec["moe"]["router_args"] == {"top_k": 1}
    assert spec["moe"]["num_experts"] == 4  # the toy preset's moe default
    assert main(["train", "--task", "toy", "--set", "trian.lr=1", "--results", str(tmp_path)]) == 2
    assert "unknown top-level key 'trian' (did you mean 'train'?)" in capsys.readouterr().err


def test_eigenbasis_routers_log_the_load_at_step_0_and_basis_drift(tmp_path):
    lines, finals = {}, {}
    for router in ("ermoe", "softmax-topk"):
        spec = make_spec(router, steps=6, eval_every=6, checkpoint_every=0)
        finals[router] = train(task_for(spec), spec, tmp_path / router, progress=False)
        lines[router] = records.read_jsonl(tmp_path / router / "metrics.jsonl")
    # the step-0 evaluation must not be taken for the first training batch when counting tokens
    for router, final in finals.items():
        assert final["cost"]["tokens_per_sample"] == finals["softmax-topk"]["cost"]["tokens_per_sample"] > 1, router
    first, last = lines["ermoe"][0], lines["ermoe"][-1]
    assert [line["step"] for line in lines["ermoe"]] == [0, 6]  # the load before any learning
    assert first["train_loss"] is None and first["routing"]["mean"]["load_cv"] is not None
    assert first["routing"]["mean"]["router_basis_overlap"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < last["routing"]["mean"]["router_basis_overlap"] < 1.0
    assert [line["step"] for line in lines["softmax-topk"]] == [0, 6]  # every MoE run: the routing at step 0
