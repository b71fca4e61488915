"""Leaderboards as numbers (pandas frames, written to CSV) and as display tables (bold best values,
footnotes for incomplete groups). A group is one router label at one sweep point of one task; its
numbers are means over the seeds that finished, and a group missing any seed is flagged, never
silently averaged over fewer seeds."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moebench.report.load import RecordSet
from moebench.report.render import Table, slug
from moebench.report.stats import paired_difference

GROUP = ["bench", "label", "variant"]
# (column, header, better direction or None, formatter kind)
STAT_COLUMNS = [
    ("load_cv", "Load CV ↓", "lower", "f3"),
    ("max_mean", "Max/mean ↓", "lower", "f2"),
    ("norm_entropy", "Norm. entropy ↑", "higher", "f3"),
    ("dead_experts", "Dead experts ↓", "lower", "f1"),
    ("drop_rate", "Drop % ↓", "lower", "pct"),
    ("switch_rate", "Switch % ↓", "lower", "pct"),
    ("mutual_info", "MI (nats) ↑", "higher", "f3"),
    ("flops_per_token", "{p}FLOPs/token", None, "si"),      # {p}: SI prefix chosen per table
    ("params_active", "Active params ({p})", None, "si"),
    ("params_total", "Params ({p})", None, "si"),
    ("tokens_per_s", "Tokens/s ({p}) ↑", "higher", "si"),
]
MEAN_COLUMNS = [c for c, *_ in STAT_COLUMNS] + ["gini", "balance", "gate_entropy", "margin", "fallback_rate",
                                                 "unrouted_rate", "mutual_info_norm", "final_switch", "settle_fraction",
                                                 "wall_time_s", "peak_memory_mb"]


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
    cols = ["headline_value"] + [c for c in MEAN_COLUMNS if c in g]
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
        "bench": bench, "grid": g["grid"].iloc[0], "task": g["task"].iloc[0], "label": label, "variant": variant,
        "headline_name": g["headline_name"].dropna().iloc[0] if g["headline_name"].notna().any() else None,
        "higher_is_better": g["higher_is_better"].dropna().iloc[0] if g["higher_is_better"].notna().any() else None,
        "n_done": n_done, "n_expected": expected,
        "complete": n_done == expected and n_done > 0 and not problems,
        "headline_mean": float(h.mean()) if n_done else math.nan,
        "headline_std": float(h.std(ddof=1)) if n_done > 1 else math.nan,
        "seeds_done": " ".join(_seed(s) for s in per_seed.index),
        "states": ", ".join(f"{k} {v}" for k, v in g["state"].value_counts().sort_index().items()),
        "problems": "; ".join(problems),
    }
    for c in cols[1:]:
        row[c] = float(per_seed[c].mean()) if n_done and per_seed[c].notna().any() else math.nan
    return row


def _seed(s) -> str:
    return str(int(s)) if isinstance(s, (int, float, np.integer, np.floating)) and float(s).is_integer() else str(s)


def rank_frame(lb: pd.DataFrame) -> pd.DataFrame:
    """LibMoE-style: rank the groups of each task by headline mean (1 = best, ties share the average
    rank), then average each router's ranks over the tasks it ran. Groups with no finished seed get
    no rank."""
    if lb.empty:
        return pd.DataFrame()
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


def paired_frame(rs: RecordSet, lb: pd.DataFrame, baseline: str = "softmax-topk", level: float = 0.95) -> pd.DataFrame:
    """Each router minus ``baseline`` on the headline metric over the seeds both finished, per task and
    sweep point: mean difference, paired-t CI, p value and a verdict that respects higher_is_better."""
    done = rs.runs[(rs.runs["state"] == "done") & rs.runs["headline_value"].notna()].dropna(subset=["bench"])
    per_seed = done.groupby(GROUP + ["seed"])["headline_value"].mean()
    rows = []
    for _, r in lb.iterrows():
        if r["label"] == baseline:
            continue
        key_base = (r["bench"], baseline, r["variant"])
        try:
            a = per_seed.loc[(r["bench"], r["label"], r["variant"])]
            b = per_seed.loc[key_base]
        except KeyError:
            continue
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        res = paired_difference(a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy(), level)
        hib = bool(r["higher_is_better"]) if r["higher_is_better"] is not None else True
        if res.n < 2 or math.isnan(res.ci_low):
            verdict = "n<2"
        elif res.ci_low > 0 or res.ci_high < 0:
            verdict = "better" if (res.mean > 0) == hib else "worse"
        else:
            verdict = "n.s."
        rows.append({"bench": r["bench"], "label": r["label"], "variant": r["variant"], "baseline": baseline,
                     "headline_name": r["headline_name"], "higher_is_better": hib, "n_pairs": res.n,
                     "seeds": " ".join(_seed(s) for s in seeds), "diff_mean": res.mean, "diff_sd": res.sd,
                     "ci_low": res.ci_low, "ci_high": res.ci_high, "level": level, "p_value": res.p_value,
                     "verdict": verdict})
    return pd.DataFrame(rows)


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


def _si_scale(values) -> tuple[float, str]:
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


def leaderboard_tables(lb: pd.DataFrame) -> list[Table]:
    tables = []
    for bench, b in lb.groupby("bench", sort=False):
        tables.append(_leaderboard_table(bench, b.reset_index(drop=True)))
    return tables


def _leaderboard_table(bench: str, b: pd.DataFrame) -> Table:
    hib = bool(b["higher_is_better"].dropna().iloc[0]) if b["higher_is_better"].notna().any() else True
    name = b["headline_name"].dropna().iloc[0] if b["headline_name"].notna().any() else "headline"
    show_variant = (b["variant"] != "").any()
    columns = ["Router"] + (["Sweep"] if show_variant else []) + ["Seeds", f"{name} {'↑' if hib else '↓'}"]
    cells = [[r["label"]] + ([r["variant"]] if show_variant else []) for _, r in b.iterrows()]
    notes, bold = [], set()
    for i, (_, r) in enumerate(b.iterrows()):
        seeds = f"{r['n_done']}/{r['n_expected']}"
        if not r["complete"]:
            notes.append(f"[{len(notes) + 1}] {entry_name(r['label'], r['variant'])}: "
                         f"{r['n_done']}/{r['n_expected']} seeds averaged; {r['problems'] or 'incomplete'}.")
            seeds += f" [{len(notes)}]"
        head = mean_std(r["headline_mean"], r["headline_std"]) if r["n_done"] else _no_value(r)
        cells[i] += [seeds, head]
    eligible = [(i, r["headline_mean"], bool(r["complete"])) for i, (_, r) in enumerate(b.iterrows())]
    col = len(columns) - 1
    means = [mean_std(m, math.nan) for m in b["headline_mean"]]  # ties judged on the shown mean, not the std
    bold |= {(i, col) for i in _bold_best(eligible, means, "higher" if hib else "lower")}
    for key, header, direction, kind in STAT_COLUMNS:
        if key not in b or b[key].isna().all():
            continue
        scale = 1.0
        if kind == "si":
            scale, prefix = _si_scale(b[key].to_numpy(dtype=float))
            header = header.replace("{p}", prefix).replace("()", "").replace("  ", " ").strip()
        columns.append(header)
        texts = [fmt_value(v, kind, scale) for v in b[key]]
        for i, t in enumerate(texts):
            cells[i].append(t)
        if direction:
            eligible = [(i, float(v), bool(b["complete"].iloc[i])) for i, v in enumerate(b[key])]
            bold |= {(i, len(columns) - 1) for i in _bold_best(eligible, texts, direction)}
    general = ("Mean ± sample std (ddof=1) over the seeds that finished; other columns are means over the "
               "same seeds. Switch % = probe tokens whose top-1 expert changed since the previous evaluation, "
               "at the last evaluation. Bold = best among complete groups.")
    return Table(title=f"Leaderboard: {bench}", columns=columns, rows=cells, bold=bold,
                 notes=[general] + notes, label=f"tab:leaderboard-{slug(bench)}", left=1 + show_variant)


def _no_value(r) -> str:
    states = r["states"]
    for s in ("failed", "missing", "corrupt", "running", "queued"):
        if s in states:
            return s
    return "–"


def rank_table(ranks: pd.DataFrame, lb: pd.DataFrame) -> Table:
    benches = [c[len("rank:"):] for c in ranks.columns if c.startswith("rank:")]
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
        bold |= {(i, j) for i in _bold_best([(i, v, True) for i, v in enumerate(vals)],
                                            [row[j].rstrip("*") for row in rows], "lower")}
    notes = ["Rank 1 = best headline mean in that task (ties share the average rank); average over the tasks "
             "the router ran. * = that group is incomplete (see its leaderboard footnote)."]
    return Table("Average rank across tasks", columns, rows, bold, notes, "tab:avg-rank", left=1 + show_variant)


def paired_table(paired: pd.DataFrame, baseline: str) -> Table:
    show_variant = not paired.empty and (paired["variant"] != "").any()
    columns = ["Task", "Router"] + (["Sweep"] if show_variant else []) + \
              [f"Δ vs {baseline}", "95% CI", "Seeds", "p", "Verdict"]
    rows, bold = [], set()
    for i, (_, r) in enumerate(paired.iterrows()):
        d = _decimals(r["diff_mean"]) + 1 if r["diff_mean"] != 0 else 3
        ci = "–" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}]"
        p = "–" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
        rows.append([r["bench"], r["label"]] + ([r["variant"]] if show_variant else []) +
                    [f"{r['diff_mean']:+.{d}f}", ci, str(r["n_pairs"]), p, r["verdict"]])
        if r["verdict"] == "better":
            bold |= {(i, len(columns) - 5), (i, len(columns) - 1)}
    notes = [f"Δ = router − {baseline} on the task's headline metric, averaged over the seeds both finished; "
             f"95% CI from a paired t test with n−1 degrees of freedom. better / worse: the CI excludes 0 "
             f"(direction from the metric's higher-is-better); n.s.: it does not; n<2: too few matched seeds."]
    return Table(f"Paired comparison against {baseline}", columns, rows, bold, notes, "tab:paired",
                 left=2 + show_variant)


def unfinished_table(runs: pd.DataFrame) -> Table | None:
    bad = runs[runs["state"] != "done"]
    if bad.empty:
        return None
    rows = [[str(r["bench"] if isinstance(r["bench"], str) else r["grid"]), str(r["label"]), r["variant"] or "",
             _seed(r["seed"]) if pd.notna(r["seed"]) else "?", r["state"],
             r["reason"] if isinstance(r["reason"], str) else "", str(r["run_id"])]
            for _, r in bad.iterrows()]
    return Table("Runs without a result", ["Task", "Router", "Sweep", "Seed", "State", "Reason", "Run id"], rows,
                 label="tab:unfinished", left=7)
