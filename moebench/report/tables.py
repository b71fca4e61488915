"""Leaderboards as numbers (pandas frames, written to CSV) and as display tables (bold best values,
footnotes for incomplete groups). A group is one router label at one sweep point of one task; its
numbers are means over the seeds that finished, and a group missing any seed is flagged, never
silently averaged over fewer seeds."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from moebench.report.equivalence import (
    p_improve_interval,
    tost_bootstrap,
    tost_t,
)
from moebench.report.items import seed_matrix
from moebench.report.load import ROUTES_KEYS, RecordSet
from moebench.report.render import Table, slug
from moebench.report.stats import (
    bootstrap_mean,
    holm,
    minimum_detectable_effect,
    paired_bootstrap,
    paired_bootstrap_means,
    paired_difference,
    rank_groups,
    t_quantile,
)
from moebench.report.sweeps import task_sweeps_as_tasks

GROUP = ["bench", "label", "variant"]
# The one catalogue of the report's per-router columns: key -> (header, better direction or None,
# formatter kind). Every table takes its headers from here, so a metric has one label everywhere.
COLUMNS: dict[str, tuple[str, str | None, str]] = {
    "load_cv": ("Load CV ↓", "lower", "f3"),
    "max_mean": ("Max/mean ↓", "lower", "f2"),
    "norm_entropy": ("Norm. entropy ↑", "higher", "f3"),
    "max_vio": ("MaxVio ↓", "lower", "f2"),
    "min_load_share": ("Min load (%)", None, "pct"),
    "max_load_share": ("Max load (%)", None, "pct"),
    "near_dead_experts": ("Near-dead experts ↓", "lower", "f1"),
    "dead_experts": ("Dead experts ↓", "lower", "f1"),
    "unrouted_rate": ("Unrouted (%) ↓", "lower", "pct"),
    "drop_rate": ("Dropped (%) ↓", "lower", "pct"),
    "switch_rate": ("Switch (%) ↓", "lower", "pct"),
    "final_switch": ("Overlap w/ final (%) ↑", "higher", "overlap"),
    "last_fluctuation_step": ("Last fluctuation (step)", None, "f0"),
    "mutual_info": ("MI (nats) ↑", "higher", "f3"),
    "nmi": ("NMI ↑", "higher", "f3"),
    "ari": ("ARI ↑", "higher", "f3"),
    "h_group_given_expert": ("H(group|expert) ↓", "lower", "f3"),
    "h_expert_given_group": ("H(expert|group) ↓", "lower", "f3"),
    "routing_accuracy": ("Routing acc. ↑", "higher", "f3"),
    "principal_angle_mean_deg": ("Principal angle (°) ↓", "lower", "f1"),
    "flops_per_token": ("{p}FLOPs/token", None, "si"),  # {p}: SI prefix chosen per table
    "params_active": ("Active params ({p})", None, "si"),
    "params_total": ("Params ({p})", None, "si"),
    "tokens_per_s": ("Tokens/s ({p}) ↑", "higher", "si"),
    "seed_agreement": ("Seed agreement (%) ↑", "higher", "pct"),
    "seed_load_jsd": ("Seed load JSD ↓", "lower", "f3"),
    "first_choice_max_share_init": ("1st-choice max at step 0 (%, per layer)", None, "layers"),
    "first_choice_max_share": ("1st-choice max (%, per layer)", None, "layers"),
    "collapsed": ("Collapsed (seeds)", None, "seeds"),
    "moved_from_init": ("Moved from init (%)", None, "pct"),
}
# the routing and cost statistics averaged per router
STAT_COLUMNS = [
    "load_cv",
    "max_mean",
    "norm_entropy",
    "dead_experts",
    "drop_rate",
    "switch_rate",
    "mutual_info",
    "flops_per_token",
    "params_active",
    "params_total",
    "tokens_per_s",
]
DIAG_EXTRA = ["max_vio", "min_load_share", "max_load_share", "near_dead_experts", "last_fluctuation_step"]
MEAN_COLUMNS = (
    STAT_COLUMNS
    + DIAG_EXTRA
    + [
        "gini",
        "balance",
        "gate_entropy",
        "margin",
        "fallback_rate",
        "unrouted_rate",
        "mutual_info_norm",
        "final_switch",
        "settle_fraction",
        "wall_time_s",
        "peak_memory_mb",
        "router_params",
        "router_flops_per_token",
        "ms_per_step",
        "seed_agreement",
        "seed_load_jsd",
        "nmi",
        "ari",
        "h_group_given_expert",
        "h_expert_given_group",
        "routing_accuracy",
        "principal_angle_mean_deg",
        *ROUTES_KEYS,
    ]
)


_PER_LAYER = re.compile(r"\.layer\d+$")  # runs.csv's per-layer columns: leaderboard.csv gets their seed means


# ---------------------------------------------------------------------------------------------- numbers
def leaderboard_frame(rs: RecordSet) -> pd.DataFrame:
    """One row per (task, router label, sweep point): headline mean/std (ddof=1) over finished seeds,
    means of the routing and cost statistics, seeds done/expected, and a note on what is incomplete."""
    runs = rs.runs.dropna(subset=["bench", "label"])
    rows = []
    for bench, bdf in runs.groupby("bench", sort=True):
        bench_seeds = set(bdf["seed"].dropna())
        for (label, variant), g in bdf.groupby(["label", "variant"], sort=True):
            rows.append(_group_row(bench, label, variant, g, bench_seeds, rs.grids_with_expected))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = []
    for _, b in frame.groupby("bench", sort=True):
        hib = bool(b["higher_is_better"].dropna().iloc[0]) if b["higher_is_better"].notna().any() else True
        order.append(b.sort_values("headline_mean", ascending=not hib, na_position="last", kind="stable"))
    return pd.concat(order, ignore_index=True)


def _group_row(bench, label, variant, g: pd.DataFrame, bench_seeds: set, grids_with_expected: set) -> dict:
    done = g[(g["state"] == "done") & g["headline_value"].notna()]
    cols = ["headline_value"] + [c for c in MEAN_COLUMNS if c in g] + [c for c in g if _PER_LAYER.search(str(c))]
    per_seed = done.groupby("seed")[cols].mean() if len(done) else pd.DataFrame(columns=cols)
    listed = set(g["seed"].dropna())
    expected = len(listed) if g["grid"].iloc[0] in grids_with_expected else len(bench_seeds | listed)
    n_done = len(per_seed)
    problems = []
    for _, r in g[g["state"] != "done"].sort_values("seed").iterrows():
        why = f": {r['reason']}" if isinstance(r["reason"], str) and r["reason"] else ""
        problems.append(f"seed {_seed(r['seed'])} {r['state']}{why}")
    for _, r in g[(g["state"] == "done") & g["headline_value"].isna()].iterrows():
        problems.append(f"seed {_seed(r['seed'])} done but final.json has no headline value")
    for seed in sorted(bench_seeds - listed):
        problems.append(f"seed {_seed(seed)} has no run (other routers of this task have it)")
    h = per_seed["headline_value"]
    row = {
        "bench": bench,
        "grid": g["grid"].iloc[0],
        "task": g["task"].iloc[0],
        "label": label,
        "variant": variant,
        "headline_name": g["headline_name"].dropna().iloc[0] if g["headline_name"].notna().any() else None,
        "higher_is_better": g["higher_is_better"].dropna().iloc[0] if g["higher_is_better"].notna().any() else None,
        "n_done": n_done,
        "n_expected": expected,
        "complete": n_done == expected and n_done > 0 and not problems,
        "headline_mean": float(h.mean()) if n_done else math.nan,
        "headline_std": float(h.std(ddof=1)) if n_done > 1 else math.nan,
        "seeds_done": " ".join(_seed(s) for s in per_seed.index),
        "states": ", ".join(f"{k} {v}" for k, v in g["state"].value_counts().sort_index().items()),
        "problems": "; ".join(problems),
        "device": ", ".join(sorted(set(done["device"].dropna()))) if "device" in done else "",
        "equivalence_margin": _first(g, "equivalence_margin"),
        "equivalence_margin_reason": _first(g, "equivalence_margin_reason"),
    }
    for c in cols[1:]:
        row[c] = float(per_seed[c].mean()) if n_done and per_seed[c].notna().any() else math.nan
    return row


def _first(g: pd.DataFrame, col: str):
    """The group's first recorded value of ``col`` (NaN when none)."""
    if col not in g or not g[col].notna().any():
        return math.nan
    return g[col].dropna().iloc[0]


def _seed(s) -> str:
    return str(int(s)) if isinstance(s, (int, float, np.integer, np.floating)) and float(s).is_integer() else str(s)


def rank_frame(lb: pd.DataFrame) -> pd.DataFrame:
    """LibMoE-style: rank the groups of each task by headline mean (1 = best, ties share the average
    rank), then average each router's ranks over the tasks it ran. Groups with no finished seed get
    no rank."""
    if lb.empty:
        return pd.DataFrame()
    lb = task_sweeps_as_tasks(lb)  # a data sweep's points are tasks: never ranked against each other
    parts = []
    for _bench, b in lb.groupby("bench", sort=True):
        b = b[b["headline_mean"].notna()].copy()
        hib = bool(b["higher_is_better"].iloc[0]) if len(b) else True
        b["rank"] = b["headline_mean"].rank(ascending=not hib, method="average")
        parts.append(b[["bench", "label", "variant", "rank", "complete", "headline_mean"]])
    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot_table(index=["label", "variant"], columns="bench", values="rank", aggfunc="first")
    wide.columns = [f"rank:{c}" for c in wide.columns]
    incomplete = long[~long["complete"].astype(bool)].groupby(["label", "variant"])["bench"].agg(lambda s: " ".join(s))
    wide["avg_rank"] = long.groupby(["label", "variant"])["rank"].mean()
    wide["n_tasks"] = long.groupby(["label", "variant"])["rank"].count()
    wide["of_tasks"] = lb["bench"].nunique()
    wide["incomplete_in"] = incomplete.reindex(wide.index).fillna("")
    return wide.sort_values("avg_rank", kind="stable").reset_index()


def add_intervals(lb: pd.DataFrame, rs: RecordSet, items: dict, baseline: str, level: float = 0.95) -> pd.DataFrame:
    """Per group: the headline's CI (bootstrap over seeds and eval items when every finished seed has
    per-example outputs, else a t interval over seeds), eval-set size and its standard error, rank group
    within the task, active-FLOPs overhead over dense (%) and total parameters / the baseline's."""
    if lb.empty:
        return lb
    lb = lb.copy()
    runs = rs.runs
    for col in ("ci_low", "ci_high", "eval_n", "eval_se", "flops_overhead", "params_ratio", "step_ratio"):
        lb[col] = math.nan
    lb["ci_method"] = ""
    for i, r in lb.iterrows():
        g = runs[(runs["bench"] == r["bench"]) & (runs["label"] == r["label"]) & (runs["variant"] == r["variant"])]
        seeds, m = seed_matrix(g, items)
        if m is not None and len(seeds) == r["n_done"]:
            iv = bootstrap_mean(m, level)
            lb.loc[i, ["ci_low", "ci_high", "eval_n"]] = [iv.ci_low, iv.ci_high, m.shape[1]]
            lb.loc[i, "eval_se"] = float(m.mean(0).std(ddof=1) / math.sqrt(m.shape[1])) if m.shape[1] > 1 else math.nan
            lb.loc[i, "ci_method"] = "bootstrap"
        elif r["n_done"] >= 2 and not math.isnan(r["headline_std"]):
            half = t_quantile(0.5 + level / 2, r["n_done"] - 1) * r["headline_std"] / math.sqrt(r["n_done"])
            lb.loc[i, ["ci_low", "ci_high"]] = [r["headline_mean"] - half, r["headline_mean"] + half]
            lb.loc[i, "ci_method"] = "t"
    lb["rank_group"] = math.nan
    for _, b in lb.groupby(["bench", "variant"], sort=False):
        hib = bool(b["higher_is_better"].dropna().iloc[0]) if b["higher_is_better"].notna().any() else True
        groups = rank_groups([(i, r["headline_mean"], r["ci_low"], r["ci_high"]) for i, r in b.iterrows()], hib)
        for i, grp in groups.items():
            lb.loc[i, "rank_group"] = grp
        dense = (
            b[b["label"] == "dense"]["flops_per_token"].dropna() if "flops_per_token" in b else pd.Series(dtype=float)
        )
        ref = b[b["label"] == baseline]["params_total"].dropna() if "params_total" in b else pd.Series(dtype=float)
        if len(dense) and dense.iloc[0] > 0:
            lb.loc[b.index, "flops_overhead"] = 100 * (b["flops_per_token"] / dense.iloc[0] - 1)
        if len(ref) and ref.iloc[0] > 0:
            lb.loc[b.index, "params_ratio"] = b["params_total"] / ref.iloc[0]
        lb.loc[b.index, "step_ratio"] = step_ratio(b, lb[lb["bench"] == b["bench"].iloc[0]])
    return lb


def step_ratio(b: pd.DataFrame, bench: pd.DataFrame) -> pd.Series:
    """Measured ms per training step over the dense twin's (same task and sweep point, else the task's
    dense run without a sweep), only where both ran on the same one device (a ratio across devices says
    nothing about the router)."""
    out = pd.Series(math.nan, index=b.index)
    if "ms_per_step" not in b:
        return out
    dense = b[b["label"] == "dense"]
    if dense.empty:
        dense = bench[(bench["label"] == "dense") & (bench["variant"] == "")]
    if dense.empty or pd.isna(dense["ms_per_step"].iloc[0]) or not dense["ms_per_step"].iloc[0] > 0:
        return out
    if "device" not in b:
        return out
    ref, device = dense["ms_per_step"].iloc[0], dense["device"].fillna("").iloc[0]
    devices = b["device"].fillna("")
    same = (devices == device) & (device != "") & ~devices.str.contains(",", regex=False)
    return (b["ms_per_step"] / ref).where(same)


def paired_frame(
    rs: RecordSet, lb: pd.DataFrame, baseline: str = "softmax-topk", level: float = 0.95, items: dict | None = None
) -> pd.DataFrame:
    """Each router minus ``baseline`` on the headline metric over the seeds both finished, per task and
    sweep point. With per-example outputs for every matched seed: a paired bootstrap over seeds and eval
    items; otherwise a paired t test over seeds. p values are Holm-corrected across the routers of a
    task (and sweep point); the verdict (better / worse / n.s.) uses the corrected p and respects
    higher_is_better. ``mde`` is the minimum detectable effect (80 % power, two-sided ``1 - level``)
    for that comparison's standard error."""
    items = items or {}
    runs = rs.runs[(rs.runs["state"] == "done") & rs.runs["headline_value"].notna()].dropna(subset=["bench"])
    per_seed = runs.groupby(GROUP + ["seed"])["headline_value"].mean()
    rows = []
    for _, r in lb.iterrows():
        row = None if r["label"] == baseline else _paired_row(runs, per_seed, r, baseline, level, items)
        if row is not None:
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["p_holm"] = math.nan
    for _, g in frame.groupby(["bench", "variant"], sort=False):
        frame.loc[g.index, "p_holm"] = holm(g["p_value"].tolist())
    frame["verdict"] = [_verdict(r, level) for _, r in frame.iterrows()]
    frame["tost"] = [_tost_label(r) for _, r in frame.iterrows()]
    return frame


def _paired_row(runs: pd.DataFrame, per_seed: pd.Series, r, baseline: str, level: float, items: dict) -> dict | None:
    """Leaderboard row ``r`` against ``baseline`` over their common seeds (None when there are none)."""
    try:
        a = per_seed.loc[(r["bench"], r["label"], r["variant"])]
        b = per_seed.loc[(r["bench"], baseline, r["variant"])]
    except KeyError:
        return None
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return None
    ga = runs[(runs["bench"] == r["bench"]) & (runs["label"] == r["label"]) & (runs["variant"] == r["variant"])]
    gb = runs[(runs["bench"] == r["bench"]) & (runs["label"] == baseline) & (runs["variant"] == r["variant"])]
    sa, ma = seed_matrix(ga, items, set(seeds))
    sb, mb = seed_matrix(gb, items, set(seeds))
    margin = _margin(runs, r["bench"])
    if ma is not None and mb is not None and sa == sb == seeds and ma.shape == mb.shape:
        method, n_items = "bootstrap", ma.shape[1]
        (mean, sd, lo, hi, p, se), tost = _bootstrap_test(ma, mb, level, margin)
    else:
        res = paired_difference(a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy(), level)
        method, n_items = "t", math.nan
        mean, sd, lo, hi, p = res.mean, res.sd, res.ci_low, res.ci_high, res.p_value
        se = res.sd / math.sqrt(res.n) if res.n >= 2 else math.nan
        tost = tost_t(mean, se, res.n - 1, margin)
    hib = bool(r["higher_is_better"]) if r["higher_is_better"] is not None else True
    pi, pi_lo, pi_hi = p_improve_interval(a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy(), hib, level)
    return {
        "bench": r["bench"],
        "label": r["label"],
        "variant": r["variant"],
        "baseline": baseline,
        "headline_name": r["headline_name"],
        "higher_is_better": hib,
        "n_pairs": len(seeds),
        "n_items": n_items,
        "method": method,
        "seeds": " ".join(_seed(s) for s in seeds),
        "diff_mean": mean,
        "diff_sd": sd,
        "diff_se": se,
        "ci_low": lo,
        "ci_high": hi,
        "level": level,
        "p_value": p,
        "mde": minimum_detectable_effect(se, 1 - level) if not math.isnan(se) else math.nan,
        "margin": margin,
        "tost_p": tost.p,
        "tost_p_lower": tost.p_lower,
        "tost_p_upper": tost.p_upper,
        "tost_equivalent": tost.equivalent,
        "p_improve": pi,
        "p_improve_low": pi_lo,
        "p_improve_high": pi_hi,
    }


def _bootstrap_test(ma, mb, level: float, margin: float):
    """Paired bootstrap over seeds and items: (mean, sd (nan), ci low, ci high, p, se) and the TOST."""
    iv = paired_bootstrap(ma, mb, level)
    tost = tost_bootstrap(paired_bootstrap_means(ma, mb), margin)
    return (iv.mean, math.nan, iv.ci_low, iv.ci_high, iv.p_value, iv.se), tost


def _verdict(r, level: float) -> str:
    """better / worse (Holm-corrected p below 1 - level and the interval clear of 0), n.s., or n<2."""
    if r["method"] == "t" and (r["n_pairs"] < 2 or math.isnan(r["ci_low"])):
        return "n<2"
    if r["p_holm"] < 1 - level and (r["ci_low"] > 0 or r["ci_high"] < 0):
        return "better" if (r["diff_mean"] > 0) == r["higher_is_better"] else "worse"
    return "n.s."


def _tost_label(r) -> str:
    """equivalent / different / inconclusive (``tost_verdict``), or why there is no TOST."""
    if math.isnan(r["margin"]):
        return "no margin"
    if r["verdict"] == "n<2":
        return "n<2"
    if r["tost_equivalent"]:
        return "equivalent"
    return "different" if r["verdict"] in ("better", "worse") else "inconclusive"


def _margin(runs: pd.DataFrame, bench) -> float:
    """The task's equivalence margin (NaN when none is declared, or its runs disagree)."""
    if "equivalence_margin" not in runs:
        return math.nan
    m = runs.loc[runs["bench"] == bench, "equivalence_margin"].dropna().unique()
    return float(m[0]) if len(m) == 1 else math.nan


# ---------------------------------------------------------------------------------------------- display
def fmt_value(x: float, kind: str = "auto", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = float(x)
    if kind == "pct":
        return f"{100 * x:.1f}"
    if kind == "si":
        return _sig(x / scale)
    if kind.startswith("f"):
        return f"{x:.{int(kind[1:])}f}"
    return _auto(x)


def _sig(x: float) -> str:
    a = abs(x)
    return f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}"


def _decimals(x: float) -> int:
    a = abs(x)
    return 1 if a >= 100 else 2 if a >= 1 else 3


def _auto(x: float) -> str:
    return f"{x:.{_decimals(x)}f}"


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    d = _decimals(mean)
    return f"{mean:.{d}f}" if math.isnan(std) else f"{mean:.{d}f} ± {std:.{d}f}"


def si_scale(values) -> tuple[float, str]:
    top = np.nanmax(np.abs(values)) if len(values) and np.isfinite(values).any() else 0.0
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if top >= scale:
            return scale, prefix
    return 1.0, ""


def entry_name(label: str, variant: str) -> str:
    return f"{label} ({variant})" if variant else str(label)


def _bold_best(rows_vals: list[tuple[int, float, bool]], texts: list[str], direction: str) -> set[int]:
    """Rows whose shown value equals the best shown value among eligible rows (complete groups, or
    every row with a value when no group is complete)."""
    with_value = [(i, v, ok) for i, v, ok in rows_vals if not math.isnan(v)]
    pool = [x for x in with_value if x[2]] or with_value
    if not pool:
        return set()
    if len({texts[i] for i, _, _ in with_value}) < 2:
        return set()  # all rows show the same value: bold would single nothing out
    best = (max if direction == "higher" else min)(pool, key=lambda x: x[1])
    return {i for i, _, _ in pool if texts[i] == texts[best[0]]}


def leaderboard_tables(lb: pd.DataFrame) -> list[tuple[str, list[Table]]]:
    """Per task: the core leaderboard (headline with CI and rank group, cost matching, unrouted /
    dropped tokens) and the routing diagnostics table."""
    out = []
    for bench, b in lb.groupby("bench", sort=False):
        b = b.reset_index(drop=True)
        out.append((bench, [_leaderboard_table(bench, b), _diagnostics_table(bench, b)]))
    return out


def column_or_nan(b: pd.DataFrame, key: str) -> pd.Series:
    """The column ``key`` of ``b``, or NaN for every row where the records never had it."""
    return b[key] if key in b else pd.Series([math.nan] * len(b), index=b.index)


def _hides_tokens(b: pd.DataFrame) -> list[bool]:
    """Rows whose balance / drop numbers look better because tokens were left out (unrouted or dropped):
    such a value is never set in bold."""
    un, dr = column_or_nan(b, "unrouted_rate").fillna(0), column_or_nan(b, "drop_rate").fillna(0)
    return [bool(u > 0 or d > 0) for u, d in zip(un, dr)]


def _ci_text(mean: float, lo: float, hi: float) -> str:
    if math.isnan(mean):
        return "–"
    d = _decimals(mean)
    return f"{mean:.{d}f}" if math.isnan(lo) else f"{mean:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def _leaderboard_table(bench: str, b: pd.DataFrame) -> Table:
    hib = bool(b["higher_is_better"].dropna().iloc[0]) if b["higher_is_better"].notna().any() else True
    name = b["headline_name"].dropna().iloc[0] if b["headline_name"].notna().any() else "headline"
    show_variant = (b["variant"] != "").any()
    pscale, pprefix = si_scale(column_or_nan(b, "params_total").to_numpy(dtype=float))
    columns = (
        ["Router"]
        + (["Sweep"] if show_variant else [])
        + [
            "Seeds",
            f"{name} {'↑' if hib else '↓'} (95% CI)",
            "Rank group",
            "Eval n",
            "Eval SE",
            "FLOPs vs dense (%)",
            f"Params ({pprefix})".replace(" ()", ""),
            "Params × ref",
            "Unrouted (%)",
            "Dropped (%)",
        ]
    )
    cells: list[list[str]] = []
    notes: list[str] = []
    bold: set[tuple[int, int]] = set()
    for i, (_, r) in enumerate(b.iterrows()):
        seeds = f"{r['n_done']}/{r['n_expected']}"
        if not r["complete"]:
            notes.append(
                f"[{len(notes) + 1}] {entry_name(r['label'], r['variant'])}: "
                f"{r['n_done']}/{r['n_expected']} seeds averaged; {r['problems'] or 'incomplete'}."
            )
            seeds += f" [{len(notes)}]"
        cells.append([r["label"]] + ([r["variant"]] if show_variant else []) + [seeds] + _leaderboard_cells(r, pscale))
        group = r.get("rank_group", math.nan)
        if group == 1 and r["complete"] and (column_or_nan(b, "rank_group") > 1).any():  # bold only if it singles out
            bold |= {(i, len(columns) - 9), (i, len(columns) - 8)}
    return Table(
        title=f"Leaderboard: {bench}",
        columns=columns,
        rows=cells,
        bold=bold,
        notes=[_leaderboard_note(b, name)] + notes,
        label=f"tab:leaderboard-{slug(bench)}",
        left=1 + show_variant,
    )


def _leaderboard_cells(r, pscale: float) -> list[str]:
    """A leaderboard row from its headline on (after router, sweep and seeds)."""
    head = (
        _ci_text(r["headline_mean"], r.get("ci_low", math.nan), r.get("ci_high", math.nan))
        if r["n_done"]
        else _no_value(r)
    )
    group = r.get("rank_group", math.nan)
    fo = r.get("flops_overhead", math.nan)
    return [
        head,
        "–" if pd.isna(group) else str(int(group)),
        "–" if pd.isna(r.get("eval_n", math.nan)) else str(int(r["eval_n"])),
        fmt_value(r.get("eval_se", math.nan), "auto"),
        "–" if pd.isna(fo) else f"{fo:+.1f}",
        fmt_value(r.get("params_total", math.nan), "si", pscale),
        "–" if pd.isna(r.get("params_ratio", math.nan)) else f"{r['params_ratio']:.2f}",
        fmt_value(r.get("unrouted_rate", math.nan), "pct"),
        fmt_value(r.get("drop_rate", math.nan), "pct"),
    ]


def _leaderboard_note(b: pd.DataFrame, name: str) -> str:
    """The leaderboard's general note: how the intervals were made, what each column means, the margin."""
    methods = set(column_or_nan(b, "ci_method").dropna()) if "ci_method" in b else set()
    how = []
    if "bootstrap" in methods:
        how.append("bootstrap: 2000 two-level resamples of seeds and eval items (percentile interval)")
    if "t" in methods:
        how.append("t: mean ± t(n−1) · sd/√n over seeds (runs without per-example outputs)")
    general = (
        "Headline = mean over the seeds that finished, with its 95% CI (" + "; ".join(how or ["none"]) + "). "
        "Rank group 1 (bold) = the best router and every router whose interval overlaps it; group 2 "
        "starts at the best of the rest, and so on. Eval n = eval items per run; Eval SE = standard "
        "error of the headline over those items (seed-averaged). FLOPs vs dense = active FLOPs per "
        "token over the dense model's (+ = costlier). Params × ref = total parameters / the "
        "reference router's. Unrouted = tokens sent to no expert; Dropped = (token, expert) "
        "assignments removed by the capacity limit."
    )
    margin, reason = _first(b, "equivalence_margin"), _first(b, "equivalence_margin_reason")
    if not pd.isna(margin):
        general += f" Equivalence margin δ = {margin:g} {name}" + (f": {reason}." if isinstance(reason, str) else ".")
    return general


# the diagnostics table's columns, in order (headers from COLUMNS); tokens/s is in the cost table
DIAG_COLUMNS = [
    "load_cv",
    "max_vio",
    "min_load_share",
    "max_load_share",
    "first_choice_max_share_init",
    "first_choice_max_share",
    "collapsed",
    "moved_from_init",
    "near_dead_experts",
    "dead_experts",
    "unrouted_rate",
    "drop_rate",
    "switch_rate",
    "final_switch",
    "last_fluctuation_step",
    "mutual_info",
    "seed_agreement",
    "seed_load_jsd",
    "nmi",
    "ari",
    "h_group_given_expert",
    "h_expert_given_group",
    "routing_accuracy",
]
_BALANCE_KEYS = {"load_cv", "max_vio", "near_dead_experts", "dead_experts", "unrouted_rate", "drop_rate"}
_STABILITY_KEYS = {"switch_rate", "final_switch", "last_fluctuation_step"}  # never "stable" when collapsed


def collapsed_seeds(r) -> int:
    """Seeds of a leaderboard group whose router collapsed (``collapsed`` is their mean, 0..1)."""
    share = r.get("collapsed", math.nan)
    return 0 if pd.isna(share) else int(round(float(share) * int(r["n_done"])))


def layers_text(r, key: str) -> str:
    """Per-layer means over seeds in %, "L0 / L1 / ..." (the run mean when no layer column exists)."""
    cols = sorted((c for c in r.index if c.startswith(f"{key}.layer")), key=lambda c: int(c.rsplit("layer", 1)[1]))
    vals = [r[c] for c in cols if not pd.isna(r[c])] or ([r[key]] if key in r and not pd.isna(r[key]) else [])
    return " / ".join(f"{100 * float(v):.0f}" for v in vals) if vals else "–"


_DIAG_NOTE = (
    "Means over seeds and MoE layers, from the experts tokens were actually dispatched to. Load = "
    "routed (token, expert) pairs per expert: CV = std/mean; MaxVio = max/mean − 1; min / max "
    "load = the least / most loaded expert's share (uniform = 100/E %); near-dead = experts "
    "under 1 % of the uniform share. 1st-choice max = share of the dispatched first choices "
    "(top-1) taken by the most popular expert, per MoE layer, at step 0 (before training) and at "
    "the end (uniform = 100/E %); collapsed = one expert takes more than 50 % of them in some "
    "layer (seeds where it did); moved from init = probe tokens whose top-1 differs from step 0's "
    "(0: the router never left its initial routing). Switch = probe tokens whose top-1 expert "
    "changed since the previous probe point (the probe samples are routed every "
    "train.probe_every steps); overlap w/ final = probe tokens whose top-1 equals the final "
    "checkpoint's, averaged over probe points (LibMoE); last fluctuation = the last probe step at "
    "which any probe token changed expert (StableMoE). A collapsed router is trivially stable: its "
    "stability values are marked (collapsed) and never bold. MI = mutual information between the "
    "token's label and its top-1 expert, unrouted tokens as their own category. Seed agreement = "
    "probe tokens whose top-1 expert is the same in two seeds after matching expert indices "
    "(Hungarian method on co-assignment counts), mean over seed pairs; seed load JSD = "
    "Jensen-Shannon divergence (base 2) between two seeds' matched load distributions. NMI (arithmetic "
    "normaliser), ARI, H(group|expert), H(expert|group) (nats) and the Hungarian-matched routing "
    "accuracy (E = number of labels only) read the label-by-expert table. Bold = best "
    "among complete groups; a row with unrouted or dropped tokens is never bold in a balance "
    "column."
)


def _diagnostics_table(bench: str, b: pd.DataFrame) -> Table:
    show_variant = (b["variant"] != "").any()
    columns = ["Router"] + (["Sweep"] if show_variant else [])
    cells = [[r["label"]] + ([r["variant"]] if show_variant else []) for _, r in b.iterrows()]
    bold: set[tuple[int, int]] = set()
    hides = _hides_tokens(b)
    collapsed = [collapsed_seeds(r) > 0 for _, r in b.iterrows()]
    for key in DIAG_COLUMNS:
        header, direction, kind = COLUMNS[key]
        if key not in b or b[key].isna().all():
            continue
        if kind in ("layers", "seeds"):
            columns.append(header)
            for i, (_, r) in enumerate(b.iterrows()):
                if kind == "layers":
                    cells[i].append(layers_text(r, key))
                else:
                    n = collapsed_seeds(r)
                    cells[i].append("–" if pd.isna(r[key]) else (f"yes ({n}/{int(r['n_done'])})" if n else "no"))
            continue
        vals = b[key].astype(float)
        if kind == "overlap":  # mean over evaluations of the share matching the final routing = 1 - final_switch
            vals, kind = 1 - vals, "pct"
        scale = 1.0
        if kind == "si":
            scale, prefix = si_scale(vals.to_numpy(dtype=float))
            header = header.replace("{p}", prefix).replace(" ()", "")
        columns.append(header)
        texts = [fmt_value(v, kind, scale) for v in vals]
        for i, t in enumerate(texts):
            # a collapsed router's routing is trivially "stable": say so next to the number
            cells[i].append(t + (" (collapsed)" if key in _STABILITY_KEYS and collapsed[i] and t != "–" else ""))
        if direction:
            eligible = [
                (
                    i,
                    float(v),
                    bool(b["complete"].iloc[i])
                    and not (key in _BALANCE_KEYS and hides[i])
                    and not (key in _STABILITY_KEYS and collapsed[i]),
                )
                for i, v in enumerate(vals)
            ]
            if key in _BALANCE_KEYS or key in _STABILITY_KEYS:  # never bold: tokens left out / collapsed
                eligible = [e for e in eligible if e[2]]
            bold |= {(i, len(columns) - 1) for i in _bold_best(eligible, texts, direction)}
    notes = [_DIAG_NOTE]
    return Table(
        title=f"Routing diagnostics: {bench}",
        columns=columns,
        rows=cells,
        bold=bold,
        notes=notes,
        label=f"tab:diagnostics-{slug(bench)}",
        left=1 + show_variant,
    )


def _no_value(r) -> str:
    states = r["states"]
    for s in ("failed", "missing", "corrupt", "running", "interrupted", "queued", "new"):
        if s in states:
            return s
    return "–"


def rank_table(ranks: pd.DataFrame, lb: pd.DataFrame) -> Table:
    benches = [c[len("rank:") :] for c in ranks.columns if c.startswith("rank:")]
    show_variant = (ranks["variant"] != "").any()
    columns = ["Router"] + (["Sweep"] if show_variant else []) + benches + ["Avg rank ↓", "Tasks"]
    rows, bold = [], set()
    for _, r in ranks.iterrows():
        row = [r["label"]] + ([r["variant"]] if show_variant else [])
        inc = set(r["incomplete_in"].split(" ")) if r["incomplete_in"] else set()
        for bname in benches:
            v = r[f"rank:{bname}"]
            row.append("–" if pd.isna(v) else f"{v:g}" + ("*" if bname in inc else ""))
        row += [f"{r['avg_rank']:.2f}", f"{int(r['n_tasks'])}/{int(r['of_tasks'])}"]
        rows.append(row)
    first = len(columns) - len(benches) - 2
    for j in range(first, len(columns) - 1):
        vals = [float(x.rstrip("*")) if x != "–" else math.nan for x in (row[j] for row in rows)]
        bold |= {
            (i, j)
            for i in _bold_best(
                [(i, v, True) for i, v in enumerate(vals)], [row[j].rstrip("*") for row in rows], "lower"
            )
        }
    notes = [
        "Rank 1 = best headline mean in that task (ties share the average rank); average over the tasks "
        "the router ran. * = that group is incomplete (see its leaderboard footnote)."
    ]
    return Table("Average rank across tasks", columns, rows, bold, notes, "tab:avg-rank", left=1 + show_variant)


def paired_table(paired: pd.DataFrame, baseline: str) -> Table:
    show_variant = not paired.empty and (paired["variant"] != "").any()
    columns = (
        ["Task", "Router"]
        + (["Sweep"] if show_variant else [])
        + [
            f"Δ vs {baseline}",
            "95% CI",
            "Seeds",
            "Eval n",
            "Method",
            "p",
            "p (Holm)",
            "MDE",
            "Verdict",
            "±δ",
            "TOST",
            "P(improve) [95% CI]",
        ]
    )
    rows, bold = [], set()
    for i, (_, r) in enumerate(paired.iterrows()):
        rows.append(_paired_cells(r, show_variant))
        if r["verdict"] == "better":
            bold |= {(i, len(columns) - 12), (i, len(columns) - 4)}
    notes = _paired_notes(baseline)
    return Table(
        f"Paired comparison against {baseline}", columns, rows, bold, notes, "tab:paired", left=2 + show_variant
    )


def _paired_cells(r, show_variant: bool) -> list[str]:
    """One row of the paired table."""
    d = _decimals(r["diff_mean"]) + 1 if r["diff_mean"] != 0 else 3
    ci = "–" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}]"
    p = "–" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
    ph = "–" if math.isnan(r["p_holm"]) else f"{r['p_holm']:.3f}"
    mde = "–" if math.isnan(r["mde"]) else f"{r['mde']:.{d}f}"
    n_items = "–" if pd.isna(r["n_items"]) else str(int(r["n_items"]))
    return (
        [r["bench"], r["label"]]
        + ([r["variant"]] if show_variant else [])
        + [
            f"{r['diff_mean']:+.{d}f}",
            ci,
            str(r["n_pairs"]),
            n_items,
            r["method"],
            p,
            ph,
            mde,
            r["verdict"],
            "–" if math.isnan(r["margin"]) else f"{r['margin']:g}",
            r["tost"],
            _p_improve_text(r),
        ]
    )


def _paired_notes(baseline: str) -> list[str]:
    return [
        f"Δ = router − {baseline} on the task's headline metric, over the seeds both finished. Method "
        f"bootstrap: 2000 paired resamples of seeds and eval items (the same items for both routers), "
        f"percentile 95% CI and two-sided p; t: paired t test over seeds (runs without per-example "
        f"outputs). p (Holm) = Holm-corrected across the routers of a task. better / worse: corrected "
        f"p < 0.05 and the CI excludes 0; n.s. otherwise; n<2: too few matched seeds. MDE = minimum "
        f"detectable effect, 2.8 × the difference's standard error (80 % power, α = 0.05, before "
        f"correction): a smaller true difference is likely to read n.s.",
        "±δ = the task's equivalence margin (its reason is in the task's leaderboard notes). TOST = two "
        "one-sided tests at α = 0.05 on the same resamples (or t): equivalent = the data rule out any "
        "difference beyond ±δ; different = the Holm-corrected test above rejected; inconclusive = neither. "
        "P(improve) = the probability that a seed of the router beats a seed of the reference on the "
        "headline (rliable; ties count half; 'beats' follows the metric's direction), with a 95% "
        "bootstrap interval over seeds.",
    ]


def _p_improve_text(r) -> str:
    if math.isnan(r["p_improve"]):
        return "–"
    return f"{r['p_improve']:.2f} [{r['p_improve_low']:.2f}, {r['p_improve_high']:.2f}]"


def unfinished_table(runs: pd.DataFrame) -> Table | None:
    bad = runs[runs["state"] != "done"]
    if bad.empty:
        return None
    rows = [
        [
            str(r["bench"] if isinstance(r["bench"], str) else r["grid"]),
            str(r["label"]),
            r["variant"] or "",
            _seed(r["seed"]) if pd.notna(r["seed"]) else "?",
            r["state"],
            r["reason"] if isinstance(r["reason"], str) else "",
            str(r["run_id"]),
        ]
        for _, r in bad.iterrows()
    ]
    return Table(
        "Runs without a result",
        ["Task", "Router", "Sweep", "Seed", "State", "Reason", "Run id"],
        rows,
        label="tab:unfinished",
        left=7,
    )
