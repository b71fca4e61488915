"""The report reads per-example outputs (eval_items.npz): bootstrap intervals, Holm-corrected paired
comparison, rank groups and the columns that show matching and left-out tokens (issue 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import write_run

from moebench.report.build import build_report, write_report
from moebench.training.records import atomic_write_json, write_eval_items

N = 400


def _hits(rate: float, seed: int) -> np.ndarray:
    """Exactly round(rate * N) hits, in a seeded order."""
    h = np.zeros(N, dtype=np.int8)
    h[: round(rate * N)] = 1
    return np.random.default_rng(seed).permutation(h)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    g = tmp_path_factory.mktemp("res") / "g"
    rates = {"softmax-topk": 0.60, "good": 0.75, "same": 0.61}
    for k, (label, rate) in enumerate(rates.items()):
        for seed in range(3):
            hits = _hits(rate, 10 * k + seed)  # independent orders: no router's hits contain another's
            run = write_run(g, f"{label}-{seed}", "cls", label, seed, float(hits.mean()))
            write_eval_items(run / "eval_items.npz", {"headline": hits, "correct": hits})
            if label == "good":  # expert-choice-like: leaves tokens unrouted
                rec = json.loads((run / "final.json").read_text())
                rec["routing"]["mean"]["unrouted_rate"] = 0.15
                atomic_write_json(run / "final.json", rec)
    return g


def test_bootstrap_intervals_groups_and_holm(grid):
    rep = build_report(grid)
    lb = rep.leaderboard.set_index("label")
    assert (lb["ci_method"] == "bootstrap").all() and (lb["eval_n"] == N).all()
    assert lb.loc["good", "headline_mean"] == pytest.approx(0.75)
    assert lb.loc["good", "ci_low"] < 0.75 < lb.loc["good", "ci_high"]
    # 0.75 vs 0.60 / 0.61 with SE ~0.012: good alone in group 1, the other two share group 2
    assert lb.loc["good", "rank_group"] == 1
    assert lb.loc["softmax-topk", "rank_group"] == lb.loc["same", "rank_group"] == 2
    eval_se = np.mean([_hits(0.75, 10 + s) for s in range(3)], axis=0).std(ddof=1) / np.sqrt(N)
    assert lb.loc["good", "eval_se"] == pytest.approx(eval_se)
    paired = rep.paired.set_index("label")
    assert paired.loc["good", "method"] == "bootstrap" and paired.loc["good", "n_items"] == N
    assert paired.loc["good", "diff_mean"] == pytest.approx(0.15)
    assert paired.loc["good", "verdict"] == "better" and paired.loc["same", "verdict"] == "n.s."
    # Holm over two routers: the smaller p doubled, the larger kept (but never below the smaller)
    p = paired["p_value"].sort_values()
    assert paired.loc[p.index[0], "p_holm"] == pytest.approx(min(1.0, 2 * p.iloc[0]))
    assert paired.loc[p.index[1], "p_holm"] == pytest.approx(max(p.iloc[1], min(1.0, 2 * p.iloc[0])))


def test_findings_and_table_say_what_was_left_out(grid, tmp_path):
    out = write_report(grid, tmp_path / "rep", formats=("md",), plots=False)
    md = (out / "leaderboard.md").read_text()
    assert "Best group on top1: good 0.750" in md
    assert "Beats softmax-topk after Holm correction: good (+0.15)" in md
    assert "good: 15.0 % tokens unrouted" in md
    assert "| good | 3/3 | **0.750 [" in md and "| **1** | 400 |" in md  # bold: group 1 singles it out
    # the diagnostics table never bolds a balance value of a row that leaves tokens out
    diag = md[md.index("### Routing diagnostics") :]
    good_row = next(line for line in diag.splitlines() if line.startswith("| good |"))
    assert "**" not in good_row.split("|")[2]  # load CV
    assert "15.0" in good_row


def test_items_whose_mean_is_not_the_headline_are_skipped(tmp_path):
    g = tmp_path / "g"
    for seed in range(2):
        run = write_run(g, f"a{seed}", "cls", "softmax-topk", seed, 0.5)
        write_eval_items(run / "eval_items.npz", {"headline": _hits(0.9, seed)})
    (g / "a1" / "eval_items.npz").write_bytes(b"not a zip")
    rep = build_report(g)
    assert any("differs from final.json's headline" in p for p in rep.rs.problems)
    assert any("not a readable .npz" in p for p in rep.rs.problems)
    assert rep.leaderboard["ci_method"].iloc[0] == "t"  # fell back to the seed-level interval
