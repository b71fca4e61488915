"""The summary a reader of MTEB, the Open LLM Leaderboard or rliable looks for first.

- Borda rank (MTEB): in each task a router scores one point per router it beats (ties: half), the
  points are summed over tasks and the sum ranked (1 = most points).
- Normalised score (Open LLM Leaderboard): per task, 0 = the ``random`` control's mean headline,
  100 = the best router's; without a ``random`` run the fallback zero is named in ``zero_label``.
- Interquartile mean over (task, seed) runs of the normalised score, with a stratified bootstrap
  interval (rliable, Agarwal et al. 2021): seeds are resampled within each task, the reference points
  stay fixed.
- Performance profile (rliable): the share of a router's runs whose normalised score exceeds τ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from moebench.report.render import Table
from moebench.report.sweeps import task_sweeps_as_tasks
from moebench.report.tables import fmt_value, si_scale

ZERO = "random"
FALLBACK_ZERO = "dense"


@dataclass
class Summary:
    """``table``: one row per (label, variant) with borda_points, borda_rank, score:<bench> per task,
    mean_score, iqm, iqm_low, iqm_high, params_active, params_total; ``run_scores``: the normalised
    score of every done run (bench, label, variant, seed, score); ``zero_label``: what 0 means."""

    table: pd.DataFrame
    run_scores: pd.DataFrame
    zero_label: str | None


def borda(lb: pd.DataFrame) -> pd.DataFrame:
    """(label, variant, borda_points, borda_rank) from the per-task headline means."""
    points: dict[tuple, float] = {}
    for _, b in lb[lb["headline_mean"].notna()].groupby("bench", sort=True):
        hib = bool(b["higher_is_better"].iloc[0]) if b["higher_is_better"].notna().any() else True
        ranks = b["headline_mean"].rank(ascending=not hib, method="average")  # 1 = best
        for (_, r), rank in zip(b.iterrows(), ranks):
            key = (r["label"], r["variant"])
            points[key] = points.get(key, 0.0) + (len(b) - rank)
    out = pd.DataFrame(
        [{"label": k[0], "variant": k[1], "borda_points": v} for k, v in points.items()],
        columns=["label", "variant", "borda_points"],
    )
    out["borda_rank"] = out["borda_points"].rank(ascending=False, method="min")
    return out.sort_values(["borda_rank", "label"], kind="stable").reset_index(drop=True)


def normalise(value, zero: float, best: float) -> Any:
    """100 × (value − zero) / (best − zero): 0 at the zero point, 100 at the best, the same formula for
    error metrics (best < zero). NaN when the two points coincide or are missing."""
    if any(pd.isna(x) for x in (zero, best)) or best == zero:
        return math.nan
    return 100.0 * (np.asarray(value, dtype=float) - zero) / (best - zero)


def reference_points(lb: pd.DataFrame, zero_label: str) -> dict[str, tuple[float, float]]:
    """bench -> (zero, best): the zero label's mean and the best mean among the other groups."""
    out = {}
    for bench, b in lb[lb["headline_mean"].notna()].groupby("bench", sort=True):
        hib = bool(b["higher_is_better"].iloc[0]) if b["higher_is_better"].notna().any() else True
        z = b[b["label"] == zero_label]["headline_mean"]
        others = b[b["label"] != zero_label]["headline_mean"]
        if len(z) and len(others):
            out[bench] = (float(z.iloc[0]), float(others.max() if hib else others.min()))
    return out


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50 % (scipy's trim_mean, 25 % cut each side)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(stats.trim_mean(v, 0.25)) if v.size else math.nan


def stratified_iqm_interval(
    scores: pd.DataFrame, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(IQM, low, high) of one router's run scores (columns bench, score); each resample draws, in
    every task, as many runs as it has, with replacement."""
    groups = [g["score"].to_numpy(dtype=float) for _, g in scores.dropna(subset=["score"]).groupby("bench")]
    if not groups:
        return math.nan, math.nan, math.nan
    est = iqm(np.concatenate(groups))
    rng = np.random.default_rng(seed)
    resamples = np.stack([np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups]) for _ in range(n_boot)])
    boot = stats.trim_mean(resamples, 0.25, axis=1)  # one call, not n_boot: scipy's per-call cost dominated
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return est, float(lo), float(hi)


def summarise(lb: pd.DataFrame, runs: pd.DataFrame) -> Summary:
    """The summary table (rows in Borda order) and every run's normalised score."""
    if lb.empty:
        return Summary(pd.DataFrame(), pd.DataFrame(), None)
    lb, runs = task_sweeps_as_tasks(lb), task_sweeps_as_tasks(runs)
    labels = set(lb["label"])
    zero_label = ZERO if ZERO in labels else FALLBACK_ZERO if FALLBACK_ZERO in labels else None
    table = borda(lb)
    points = reference_points(lb, zero_label) if zero_label else {}
    done = runs[(runs["state"] == "done") & runs["headline_value"].notna()].dropna(subset=["bench"])
    per_seed = done.groupby(["bench", "label", "variant", "seed"], as_index=False)["headline_value"].mean()
    per_seed["score"] = [
        normalise(v, *points[b]) if b in points else math.nan
        for b, v in zip(per_seed["bench"], per_seed["headline_value"])
    ]
    benches = sorted(lb["bench"].unique())
    rows = []
    for _, t in table.iterrows():
        mine = lb[(lb["label"] == t["label"]) & (lb["variant"] == t["variant"])]
        row = {}
        for bench in benches:
            m = mine[mine["bench"] == bench]["headline_mean"]
            row[f"score:{bench}"] = normalise(m.iloc[0], *points[bench]) if len(m) and bench in points else math.nan
        task_scores = [v for v in row.values() if not pd.isna(v)]
        row["mean_score"] = float(np.mean(task_scores)) if task_scores else math.nan
        sc = per_seed[(per_seed["label"] == t["label"]) & (per_seed["variant"] == t["variant"])]
        row["iqm"], row["iqm_low"], row["iqm_high"] = stratified_iqm_interval(sc)
        for col in ("params_active", "params_total"):
            row[col] = float(mine[col].mean()) if col in mine and mine[col].notna().any() else math.nan
        rows.append(row)
    table = pd.concat([table, pd.DataFrame(rows, index=table.index)], axis=1)
    return Summary(table, per_seed, zero_label)


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Share of ``scores`` strictly above each τ (rliable's run-score distribution)."""
    s = np.asarray(scores, dtype=float)
    s = s[~np.isnan(s)]
    if not s.size:
        return np.full(len(taus), np.nan)
    return (s[None, :] > np.asarray(taus, dtype=float)[:, None]).mean(1)


def summary_table(summary: Summary) -> Table | None:
    """The display form: Borda rank and points, the normalised score per task, their mean, the IQM with
    its interval, active and total parameters; one note per column."""
    t = summary.table
    if t.empty:
        return None
    benches = [c[len("score:") :] for c in t.columns if c.startswith("score:")]
    show_variant = (t["variant"] != "").any()
    scale, prefix = si_scale(np.concatenate([t["params_active"].to_numpy(float), t["params_total"].to_numpy(float)]))
    columns = (
        ["Router"]
        + (["Sweep"] if show_variant else [])
        + ["Borda rank", "Borda points"]
        + [f"Score: {b}" for b in benches]
        + [
            "Mean score",
            "IQM [95% CI]",
            f"Active params ({prefix})".replace(" ()", ""),
            f"Params ({prefix})".replace(" ()", ""),
        ]
    )
    rows = []
    for _, r in t.iterrows():
        iq = "–" if pd.isna(r["iqm"]) else f"{r['iqm']:.1f} [{r['iqm_low']:.1f}, {r['iqm_high']:.1f}]"
        rows.append(
            [r["label"]]
            + ([r["variant"]] if show_variant else [])
            + [f"{r['borda_rank']:g}", f"{r['borda_points']:g}"]
            + [_score(r[f"score:{b}"]) for b in benches]
            + [
                _score(r["mean_score"]),
                iq,
                fmt_value(r["params_active"], "si", scale),
                fmt_value(r["params_total"], "si", scale),
            ]
        )
    zero = (
        f"0 = the `{summary.zero_label}` {'control' if summary.zero_label == ZERO else 'model'}'s mean"
        if summary.zero_label
        else "no `random` or `dense` run, so no zero point: scores are blank"
    )
    fallback = (
        ""
        if summary.zero_label in (ZERO, None)
        else f" (no `{ZERO}` control ran, so the zero is the fallback `{summary.zero_label}`, not chance)"
    )
    notes = [
        "Borda rank: each task gives a router one point per router with a worse headline mean (ties half); "
        "points summed over tasks, rank 1 = most points (MTEB).",
        f"Score: <task>: the router's headline mean normalised per task, {zero}{fallback}, 100 = the best "
        "router's mean in that task (a single run can score above 100); below 0 = worse than the zero point.",
        "Mean score: the mean of the per-task scores.",
        "IQM: interquartile mean of the normalised score over all (task, seed) runs, with a 95% "
        "stratified bootstrap interval (2000 resamples of seeds within each task; rliable).",
        "Active / total params: per-token active and total parameters, averaged over the tasks' models.",
    ]
    return Table("Summary across tasks", columns, rows, set(), notes, "tab:summary", left=1 + show_variant)


def _score(x) -> str:
    return "–" if pd.isna(x) else f"{x + 0.0:.1f}".replace("-0.0", "0.0")
