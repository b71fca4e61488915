"""The claims audit, equivalence and summary (issue 20) against hand-made records and hand computations:
every verdict (supported, contradicted, equivalent, not testable) is reached on a small results folder;
TOST and P(improve) match values computed by hand; Borda and normalisation match a hand-made table."""

import math

import numpy as np
import pandas as pd
import pytest

from moebench.report.aggregate import borda, iqm, normalise, performance_profile, summarise
from moebench.report.build import build_report, write_report
from moebench.report.claims import combine, reading
from moebench.report.equivalence import p_improve, p_improve_interval, tost_bootstrap, tost_t
from moebench.report.stats import t_cdf
from moebench.training.records import atomic_write_json, atomic_write_yaml, write_status

SEEDS = (0, 1, 2, 3)


def write(grid, task, label, router, seed, value, *, higher=True, margin=None, top1=(30, 25, 25, 20), **mean):
    """One done run: spec, status and final.json with the given routing means and first-choice counts."""
    run = grid / f"{task}-{label}-{seed}"
    moe = None if router == "dense" else {"router": router, "num_experts": 4, "mode": "replace"}
    atomic_write_yaml(
        run / "spec.yaml", {"grid": grid.name, "task": task, "label": label, "seed": seed, "sweep": {}, "moe": moe}
    )
    write_status(run, "done", None)
    mean = {"margin": 0.3, **mean}  # the gate's top-1 margin statistic, as real records carry it
    per_layer = [{"layer": "blocks.1", "top1_counts": list(top1), **mean}] if moe else []
    atomic_write_json(
        run / "final.json",
        {
            "run_id": run.name,
            "grid": grid.name,
            "task": task,
            "router": router,
            "label": label,
            "seed": seed,
            "sweep": {},
            "headline": {
                "name": "top1" if higher else "mae",
                "value": value,
                "higher_is_better": higher,
                "margin": margin,
            },
            "metrics": {},
            "routing": {"mean": mean if moe else {}, "per_layer": per_layer},
            "cost": {"params_total": 4e6 if moe else 1e6, "params_active": 1e6, "flops_per_token": 2e6},
        },
    )


def claims_folder(root, collapse=False, ermoe_switch=None):
    """Classification: ermoe as stable as claimed (switch rate 0.01 vs 0.2), less balanced (load CV 0.9
    vs 0.3), equivalent in accuracy and label MI; switch's balance gradient opposes the task's (cos
    -0.4); brain age: ermoe's MAE 20 % below both references. No retrieval runs."""
    grid = root / "g"
    for s in SEEDS:
        e = 1e-4 * (s - 1.5)
        top1 = (90, 4, 3, 3) if collapse else (30, 25, 25, 20)
        write(
            grid,
            "classification",
            "ermoe",
            "ermoe",
            s,
            0.80 + 0.01 * s + e,
            margin=0.01,
            top1=top1,
            switch_rate=(0.01 + 0.001 * s) if ermoe_switch is None else ermoe_switch(s),
            load_cv=0.9 + 0.01 * s,
            mutual_info_norm=0.300 + 0.001 * s,
        )
        for lab in ("softmax-topk", "switch"):
            extra = {"grad_cos_task_balance": -0.4 - 0.02 * s} if lab == "switch" else {}
            write(
                grid,
                "classification",
                lab,
                lab,
                s,
                0.80 + 0.01 * s,
                margin=0.01,
                switch_rate=0.2 + 0.01 * s,
                load_cv=0.3 + 0.01 * s,
                mutual_info_norm=0.300 + 0.0012 * s,
                **extra,
            )
        write(grid, "brain-age", "ermoe", "ermoe", s, 4.0 + 0.05 * s, higher=False, margin=0.5, mutual_info_norm=0.3)
        for lab in ("softmax-topk", "switch"):
            write(grid, "brain-age", lab, lab, s, 5.0 + 0.06 * s, higher=False, margin=0.5, mutual_info_norm=0.3)
        write(grid, "classification", "dense", "dense", s, 0.79 + 0.01 * s, margin=0.01)
    return grid


def verdicts(rep):
    return {claim: (verdict, note) for claim, cand, verdict, note in rep.claims.verdicts if cand == "ermoe"}


def test_each_verdict_is_reached(tmp_path):
    rep = build_report(claims_folder(tmp_path))
    v = verdicts(rep)
    assert v["Stable routing"][0] == "supported"
    assert v["High utilisation, flatter expert load without a balance loss"][0] == "contradicted"
    assert v["Gradient purity: no interfering balance-loss gradient"][0] == "supported"
    assert v["Interpretable specialisation, feature-space alignment"][0] == "equivalent"
    assert v["State-of-the-art ImageNet accuracy"][0] == "equivalent"
    assert v["Brain-age MAE down by more than 7 %"][0] == "supported"
    assert v["State-of-the-art COCO / Flickr30K retrieval"][0] == "not testable here"
    rows = rep.claims.frame
    assert set(rows[rows["claim"] == "stability"]["reading"]) == {"better"}
    stab = rows[(rows["claim"] == "stability") & (rows["reference"] == "switch")].iloc[0]
    assert stab["diff"] == pytest.approx(np.mean([0.01 + 0.001 * s - 0.2 - 0.01 * s for s in SEEDS]))
    assert stab["ci_low"] <= stab["diff"] <= stab["ci_high"] < 0 and stab["n_pairs"] == len(SEEDS)
    assert set(rows[(rows["claim"] == "imagenet")]["reference"]) == {"softmax-topk", "switch"}
    # the paired comparison carries the TOST verdict, the margin and P(improve) with its interval
    p = rep.paired[(rep.paired["label"] == "ermoe") & (rep.paired["bench"] == "classification")].iloc[0]
    assert p["tost"] == "equivalent" and p["margin"] == 0.01
    assert p["p_improve_low"] <= p["p_improve"] <= p["p_improve_high"]


def test_collapsed_router_cannot_support_stability_or_utilisation(tmp_path):
    v = verdicts(build_report(claims_folder(tmp_path, collapse=True)))
    assert v["Stable routing"] == (
        "not testable here",
        "collapsed in 4/8 runs: trivially stable",
    )  # classification only
    assert v["High utilisation, flatter expert load without a balance loss"][0] == "contradicted"


def test_collapsed_router_is_never_as_stable_as_the_references(tmp_path):
    """Equivalent switch rates (within the 0.02 margin of both references) read "equivalent" for a
    router that routes, and "not testable here" once it has collapsed: a collapsed router is stable
    by construction, so "as stable as" says nothing either."""
    same = {"ermoe_switch": lambda s: 0.2 + 0.01 * s + 1e-4 * (s - 1.5)}
    routes = verdicts(build_report(claims_folder(tmp_path / "a", **same)))
    assert routes["Stable routing"][0] == "equivalent"
    collapsed = verdicts(build_report(claims_folder(tmp_path / "b", collapse=True, **same)))
    assert collapsed["Stable routing"] == ("not testable here", "collapsed in 4/8 runs: trivially stable")


def test_report_opens_with_claims_and_summary(tmp_path):
    out = write_report(claims_folder(tmp_path), tmp_path / "rep", formats=("md", "csv", "html"), plots=False)
    md = (out / "leaderboard.md").read_text()
    assert md.index("## Claims audit") < md.index("## Summary across tasks") < md.index("## Key findings")
    assert md.index("## Key findings") < md.index("## Per task, in words")
    runs = pd.read_csv(out / "runs.csv")
    assert {"tost", "p_improve", "p_improve_low", "p_improve_high", "equivalence_margin"} <= set(runs.columns)
    assert set(runs.loc[runs["task"] == "classification", "equivalence_margin"]) == {0.01}
    paired = pd.read_csv(out / "paired.csv")
    assert {"tost", "p_improve", "margin", "tost_p"} <= set(paired.columns)
    assert (out / "claims.csv").exists() and "Claims audit" in (out / "report.html").read_text()


# --- TOST and P(improve) --------------------------------------------------------------------------
def test_tost_t_matches_hand_computation():
    # Δ = 0.002, se = 0.003, df = 4, δ = 0.01: t1 = 0.012/0.003 = 4, t2 = -0.008/0.003 = -2.667
    r = tost_t(0.002, 0.003, 4, 0.01)
    assert r.p_lower == pytest.approx(1 - t_cdf(4.0, 4), abs=1e-9)  # the report's own t, written out
    assert r.p_upper == pytest.approx(t_cdf(-8 / 3, 4), abs=1e-9)
    assert r.p_lower == pytest.approx(0.00806, abs=5e-5) and r.p_upper == pytest.approx(0.0280, abs=5e-4)
    assert r.p == r.p_upper and r.equivalent


def test_tost_one_sided_tests_disagree():
    # Δ = 0.009 near +δ: the lower test rejects (Δ is far above -δ), the upper one does not
    r = tost_t(0.009, 0.003, 4, 0.01)
    assert r.p_lower == pytest.approx(1 - t_cdf(19 / 3, 4), abs=1e-9) and r.p_lower < 0.05  # t1 = 0.019/0.003
    assert r.p_upper == pytest.approx(t_cdf(-1 / 3, 4), abs=1e-9) and r.p_upper > 0.3  # t2 = -0.001/0.003
    assert not r.equivalent and r.p == r.p_upper


def test_tost_bootstrap_counts_resamples_beyond_the_margin():
    boot = np.linspace(-0.005, 0.005, 999)
    assert tost_bootstrap(boot, 0.01).p == pytest.approx(1 / 1000) and tost_bootstrap(boot, 0.01).equivalent
    r = tost_bootstrap(boot, 0.004)  # 100 resamples at or below -0.004 (and as many above +0.004)
    assert r.p_lower == pytest.approx((int((boot <= -0.004).sum()) + 1) / 1000) and not r.equivalent


def test_p_improve_hand_count_and_direction():
    x, y = [1.0, 2.0, 3.0], [0.0, 2.0, 2.5]
    assert p_improve(x, y) == pytest.approx(5.5 / 9)  # 5 wins, 1 tie of 9 pairs
    assert p_improve(x, y, higher_is_better=False) == pytest.approx(3.5 / 9)
    est, lo, hi = p_improve_interval([5.0, 6.0], [1.0, 2.0])
    assert (est, lo, hi) == (1.0, 1.0, 1.0)
    est, lo, hi = p_improve_interval(x, y)
    assert 0.0 <= lo <= est <= hi <= 1.0 and hi - lo > 0.1


# --- summary ----------------------------------------------------------------------------------------
def lb_table():
    rows = [
        ("t1", "a", 0.9, True),
        ("t1", "b", 0.8, True),
        ("t1", "random", 0.5, True),
        ("t1", "dense", 0.7, True),
        ("t2", "a", 5.0, False),
        ("t2", "b", 4.0, False),
        ("t2", "random", 9.0, False),
        ("t2", "dense", 6.0, False),
    ]
    return pd.DataFrame(
        [
            {
                "bench": b,
                "task": b,
                "label": lab,
                "variant": "",
                "headline_mean": m,
                "higher_is_better": h,
                "params_active": 1.0,
                "params_total": 2.0,
            }
            for b, lab, m, h in rows
        ]
    )


def test_borda_and_normalisation_by_hand():
    lb = lb_table()
    got = borda(lb).set_index("label")
    # t1 order a > b > dense > random: 3, 2, 1, 0 points; t2 (lower better) b > a > dense > random: 3, 2, 1, 0
    assert got["borda_points"].to_dict() == {"a": 5.0, "b": 5.0, "dense": 2.0, "random": 0.0}
    assert got.loc["a", "borda_rank"] == got.loc["b", "borda_rank"] == 1 and got.loc["random", "borda_rank"] == 4
    assert normalise(0.8, 0.5, 0.9) == pytest.approx(75.0)
    assert normalise(5.0, 9.0, 4.0) == pytest.approx(80.0)  # error metric: (9 - 5) / (9 - 4)
    assert math.isnan(normalise(1.0, 2.0, 2.0))
    runs = pd.DataFrame(
        [
            {
                "bench": r.bench,
                "label": r.label,
                "variant": "",
                "seed": s,
                "state": "done",
                "headline_value": r.headline_mean,
            }
            for r in lb.itertuples()
            for s in (0, 1)
        ]
    )
    s = summarise(lb, runs)
    t = s.table.set_index("label")
    assert s.zero_label == "random"
    assert t.loc["b", "score:t1"] == pytest.approx(75.0) and t.loc["a", "score:t2"] == pytest.approx(80.0)
    assert t.loc["a", "mean_score"] == pytest.approx((100 + 80) / 2)
    assert t.loc["random", "mean_score"] == pytest.approx(0.0)
    assert t.loc["a", "iqm"] == pytest.approx(90.0)  # runs 100, 100, 80, 80: the middle two average 90
    without = summarise(lb[lb["label"] != "random"], runs[runs["label"] != "random"])
    assert without.zero_label == "dense"
    assert without.table.set_index("label").loc["b", "score:t1"] == pytest.approx(50.0)  # (0.8-0.7)/(0.9-0.7)


def test_iqm_and_profile():
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(np.mean([2, 3, 4, 5]))
    assert list(performance_profile(np.array([10.0, 50.0, 90.0]), np.array([0.0, 50.0, 95.0]))) == [1.0, 1 / 3, 0.0]


def test_reading_and_combine_rules():
    assert reading(-0.05, 0.05, -0.04, 0.04, 0.1, True) == "equivalent"
    assert reading(-0.3, -0.1, -0.28, -0.12, 0.1, True) == "better"
    assert reading(-0.3, -0.1, -0.28, -0.12, 0.1, False) == "worse"
    assert reading(-0.3, 0.3, -0.2, 0.2, 0.1, True) == "inconclusive"
    assert combine(["better", "better"]) == "supported"
    assert combine(["better", "worse"]) == "contradicted"
    assert combine(["better", "equivalent"]) == "equivalent"
    assert combine(["better", "inconclusive"]) == "inconclusive"
    assert combine(["no data"]) == combine([]) == "not testable here"


@pytest.mark.slow
def test_claims_and_summary_fit_1400px(tmp_path):
    """The claims audit's long text cells wrap instead of widening the page (headless Chromium)."""
    import subprocess

    from test_report_browser import CHROMIUM, PROBE, WIDTH

    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    out = write_report(claims_folder(tmp_path), tmp_path / "rep", formats=("html",), plots=False)
    probe = tmp_path / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={WIDTH},900",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next((ln for ln in proc.stdout.splitlines() if "RESULT" in ln), None)
    assert line is not None, f"Chromium printed no result: {proc.stderr[-2000:]}"
    _, n_tables, bad = line.split("RESULT", 1)[1].strip().split(" ", 2)
    assert int(n_tables) >= 4 and bad.startswith("[]"), f"tables wider than the page at {WIDTH}px: {bad}"


def test_a_data_sweep_is_a_task_of_its_own_in_the_summary():
    """Two generators with different scales: each is normalised and Borda-counted on its own."""
    from moebench.report.aggregate import summarise

    rows, runs = [], []
    for variant, scale in (("task_args.data=a", 1.0), ("task_args.data=b", 100.0)):
        for label, v in (("random", 0.1), ("switch", 0.5), ("oracle", 0.9)):
            rows.append(
                {
                    "bench": "structure",
                    "label": label,
                    "variant": variant,
                    "headline_mean": v * scale,
                    "higher_is_better": True,
                    "params_active": 1.0,
                    "params_total": 1.0,
                }
            )
            runs.append(
                {
                    "bench": "structure",
                    "label": label,
                    "variant": variant,
                    "seed": 0,
                    "state": "done",
                    "headline_value": v * scale,
                }
            )
    t = summarise(pd.DataFrame(rows), pd.DataFrame(runs)).table.set_index("label")
    assert set(t.index) == {"random", "switch", "oracle"} and (t["variant"] == "").all()
    assert t.loc["switch", "score:structure: a"] == pytest.approx(50.0)
    assert t.loc["switch", "score:structure: b"] == pytest.approx(50.0)
    assert t.loc["oracle", "borda_points"] == 4 and t.loc["oracle", "borda_rank"] == 1
