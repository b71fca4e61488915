"""From real (toy) runs to the report: per-layer runs.csv columns equal final.json's per-layer numbers,
the router's own parameters / FLOPs and the measured ms per step are recorded, the report's MoE / dense
step ratio is their quotient on the same device, and each run leaves its probe top-1 for the
cross-seed agreement."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_train import make_spec

from moebench.report.build import build_report, write_report
from moebench.training import records
from moebench.training.runner import execute

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for router, seed in (("softmax-topk", 0), ("softmax-topk", 1), ("dense", 0)):
        spec = {**make_spec(router, steps=6, eval_every=3, checkpoint_every=0), "seed": seed}
        res = execute(spec, root, progress=False)
        assert res["state"] == "done", res["reason"]
    return root / "test"


def _finals(grid):
    return {p.parent.name: records.read_json(p) for p in grid.glob("*/final.json")}


def test_final_json_records_router_cost_and_step_time(grid):
    for final in _finals(grid).values():
        cost = final["cost"]
        assert cost["ms_per_step"] == pytest.approx(1000 * cost["train_time_s"] / final["steps"])
        if final["router"] == "dense":
            assert cost["router_params"] == 0 and cost["router_flops_per_token"] == 0.0
        else:  # 2 MoE layers, each a 16 x 4 linear gate without bias
            assert cost["router_params"] == 2 * 16 * 4
            assert cost["router_flops_per_token"] == 2 * 2 * 16 * 4


def test_probe_top1_is_the_final_evaluations_dispatched_top1(grid):
    for rid, final in _finals(grid).items():
        got = records.read_probe_top1(grid / rid / records.PROBE_TOP1_FILE)
        if final["router"] == "dense":
            assert got is None
            continue
        names, layers = got
        assert names == [d["layer"] for d in final["routing"]["per_layer"]]
        for top1, d in zip(layers, final["routing"]["per_layer"]):
            assert top1.size == 16 * 16  # probe_size samples x 16 tokens (toy seq_len)
            assert top1.min() >= 0 and top1.max() < 4  # dropless top-2: every token routed
            # the probe is the first 16 eval samples: its top-1 counts are within the eval set's
            assert (np.bincount(top1, minlength=4) <= np.asarray(d["top1_counts"])).all()


def test_runs_csv_has_per_layer_columns_and_the_report_the_step_ratio(grid, tmp_path):
    out = write_report(grid, tmp_path / "rep", formats=("csv", "md"), plots=False)
    runs = pd.read_csv(out / "runs.csv").set_index("run_id")
    finals = _finals(grid)
    moe = [rid for rid, f in finals.items() if f["router"] != "dense"]
    for rid in moe:
        per_layer = finals[rid]["routing"]["per_layer"]
        for key in ("load_cv", "max_vio", "gate_entropy", "mutual_info", "switch_rate", "dead_experts"):
            for i, d in enumerate(per_layer):
                assert runs.loc[rid, f"{key}.layer{i}"] == pytest.approx(d[key]), (key, i)
            assert runs.loc[rid, key] == pytest.approx(np.mean([d[key] for d in per_layer]))
        assert 0 <= runs.loc[rid, "seed_agreement"] <= 1 and runs.loc[rid, "seed_agreement.layer1"] >= 0
    assert runs.loc[moe[0], "seed_agreement"] == runs.loc[moe[1], "seed_agreement"]  # one pair: one number
    lb = build_report(grid).leaderboard.set_index("label")
    dense_ms = lb.loc["dense", "ms_per_step"]
    assert lb.loc["softmax-topk", "step_ratio"] == pytest.approx(lb.loc["softmax-topk", "ms_per_step"] / dense_ms)
    assert lb.loc["dense", "step_ratio"] == pytest.approx(1.0)
    assert lb.loc["softmax-topk", "router_flops_per_token"] == 256 and lb.loc["dense", "router_params"] == 0
    assert lb.loc["softmax-topk", "load_cv.layer1"] == pytest.approx(runs.loc[moe, "load_cv.layer1"].mean())
    md = (out / "leaderboard.md").read_text()
    assert "### Cost: toy" in md and "Router FLOPs/token" in md and "Step × dense" in md
    assert "CPU" in md  # the device the times were measured on is named


def test_step_ratio_is_left_out_across_devices(grid):
    rep = build_report(grid)
    from moebench.report.tables import step_ratio

    lb = rep.leaderboard.copy()
    lb.loc[lb["label"] == "dense", "device"] = "NVIDIA H200"
    assert step_ratio(lb, lb).isna().loc[lb["label"] == "softmax-topk"].all()
    assert not math.isnan(step_ratio(rep.leaderboard, rep.leaderboard).max())


def test_per_layer_panel_is_drawn(grid, tmp_path):
    import matplotlib as mpl
    import seaborn as sns

    from moebench.report.plots import RC, Plotter

    rep = build_report(grid)
    plotter = Plotter(rep.rs, rep.leaderboard, tmp_path)
    runs = rep.rs.runs[rep.rs.runs["state"] == "done"]
    with sns.axes_style("whitegrid"), mpl.rc_context(RC):
        plots = plotter.per_layer("toy", rep.leaderboard, runs)
        pareto = plotter.pareto_router_flops("toy", rep.leaderboard, runs)
    assert [p.kind for p in plots] == ["per_layer"] and plots[0].png.stat().st_size > 10_000
    assert "0 = blocks.0.mlp, 1 = blocks.1.mlp" in plots[0].caption
    assert [p.kind for p in pareto] == ["pareto_router_flops"]
