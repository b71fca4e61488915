"""A router that does not route is called so everywhere: a gate whose bias sends every token's first
choice to expert 0 is `collapsed` in final.json (per layer and run), in runs.csv, in the diagnostics
table (and never bold for stability there) and in the key findings; the random control is not."""

import csv

import pytest
import torch
from torch import nn

from moebench.core.registry import register_router
from moebench.core.routing import Router, topk_routing
from moebench.report.build import build_report, write_report
from moebench.training import records
from moebench.training.metrics import COLLAPSE_SHARE, collapsed, first_choice_max_share, moved_from_init
from moebench.training.runner import execute

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@register_router("test-biased-gate", "test only: a learned softmax gate with a large bias on expert 0")
class BiasedGate(Router):
    """softmax(x W + b) with b_0 = 20: expert 0 is every token's first choice whatever W learns."""

    def __init__(self, d_model, num_experts, top_k=2, bias=20.0):
        super().__init__(d_model, num_experts, top_k)
        self.gate = nn.Linear(d_model, num_experts)
        with torch.no_grad():
            self.gate.bias.zero_()
            self.gate.bias[0] = bias

    def forward(self, x, ctx):
        probs = torch.softmax(self.gate(x.float()), -1)
        w, idx = probs.topk(self.top_k, -1)
        return topk_routing(
            idx, w / w.sum(-1, keepdim=True), self.num_experts, stats={"scores": probs.detach(), "top1": idx[:, 0]}
        )


def test_metric_definitions():
    assert first_choice_max_share([6, 2, 2, 0]) == pytest.approx(0.6)
    assert first_choice_max_share([0, 0]) is None
    assert collapsed(0.6) is True and collapsed(COLLAPSE_SHARE) is False and collapsed(None) is None
    assert moved_from_init([0, 1, 2, 3], [0, 1, 3, 3]) == pytest.approx(0.25)


def _spec(router, label, seed, **args):
    return {
        "grid": "collapse",
        "task": "toy",
        "label": label,
        "seed": seed,
        "task_args": {"num_train": 256, "num_eval": 64},
        "model": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        "moe": {"blocks": "all", "num_experts": 4, "router": router, "router_args": args},
        "train": {
            "steps": 20,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_every": 0,
            "checkpoint_every": 0,
            "probe_size": 16,
        },
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse")
    for seed in (0, 1):
        for router, label in (("test-biased-gate", "biased"), ("random", "random")):
            res = execute(_spec(router, label, seed), root, progress=False)
            assert res["state"] == "done", res["reason"]
    return root


def _finals(results, label):
    return [records.read_json(p) for p in sorted((results / "collapse").glob(f"{label}-s*/final.json"))]


def test_record_calls_it_collapsed_per_layer_and_run(results):
    for final in _finals(results, "biased"):
        per_layer = final["routing"]["per_layer"]
        assert len(per_layer) == 2
        for d in per_layer:
            assert d["first_choice_max_share"] == pytest.approx(1.0)
            assert d["first_choice_max_share_init"] == pytest.approx(1.0)  # measured at step 0
            assert d["collapsed"] is True
            assert d["moved_from_init"] == 0.0
        assert final["routing"]["mean"]["collapsed"] is True
        assert len(final["routing"]["probe"]["steps"]) >= 10  # stability points
    for final in _finals(results, "random"):
        assert final["routing"]["mean"]["collapsed"] is False
        assert all(d["first_choice_max_share"] <= 0.5 for d in final["routing"]["per_layer"])


def test_runs_csv_diagnostics_and_findings_call_it_collapsed(results, tmp_path):
    out = write_report(results / "collapse", tmp_path / "report", formats=("md", "csv"), plots=False)
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("first_choice_max_share", "first_choice_max_share_init", "collapsed", "moved_from_init"):
        assert key in rows[0], key
    assert {r["collapsed"] for r in rows if r["label"] == "biased"} == {"True"}
    assert {r["collapsed"] for r in rows if r["label"] == "random"} == {"False"}

    rep = build_report(results / "collapse")
    diag = next(t for _, tables in rep.bench_tables for t in tables if t.title.startswith("Routing diagnostics"))
    row = {r[0]: i for i, r in enumerate(diag.rows)}
    col = diag.columns.index("Collapsed (seeds)")
    assert diag.rows[row["biased"]][col] == "yes (2/2)" and diag.rows[row["random"]][col] == "no"
    assert diag.rows[row["biased"]][diag.columns.index("Moved from init (%)")] == "0.0"
    switch = diag.columns.index("Switch (%) ↓")
    assert diag.rows[row["biased"]][switch].endswith("(collapsed)")  # 0 switches: trivially stable
    assert (row["biased"], switch) not in diag.bold
    findings = " ".join(rep.findings)  # the key-finding bullets
    assert "collapsed, so not routing" in findings and "biased (2/2 seeds)" in findings
    assert "random (" not in findings
    notes = " ".join(rep.task_notes)  # the per-task paragraphs
    assert "Collapsed (one expert takes over 50 % of first choices in a layer): biased (2/2 seeds" in notes
    assert "Most stable router that did not collapse: random" in notes
    md = (out / "leaderboard.md").read_text()
    assert "yes (2/2)" in md and "(collapsed)" in md
