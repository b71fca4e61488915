"""The claims audit: each claim of the ERMoE abstract, the measurement in this run that tests it, and
a verdict, so the question the suite exists for has its answer in one place.

Candidates are runs of the routers ``ermoe`` / ``emoe`` / ``ermoe-released`` (under any label, e.g.
``emoe-adapter``); each is compared with the ``softmax-topk`` and ``switch`` runs of the same MoE slot
(``moe.mode``: replace or adapter), pairing runs by (task, seed). Per reference the comparison reads:
better (95% interval of the paired difference excludes 0 on the claimed side), worse (on the other
side), equivalent (90% interval inside ±δ: TOST at α = 0.05, checked first) or inconclusive. The claim's
verdict against all references (``combine``): supported when better than every reference, contradicted
when worse than any, equivalent when every reference is equivalent or beaten, inconclusive otherwise;
not testable here when the run has no measurement for it. A collapsed router (one expert takes more
than half of the first choices) cannot support a stability or utilisation claim."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moebench.report.render import Table

CANDIDATES = ("ermoe", "emoe", "ermoe-released")
REFERENCES = ("softmax-topk", "switch")
SUPPORTED, CONTRADICTED, EQUIVALENT, INCONCLUSIVE, NOT_TESTABLE = (
    "supported",
    "contradicted",
    "equivalent",
    "inconclusive",
    "not testable here",
)
COLLAPSE_SHARE = 0.5  # issue 18's threshold: one expert takes more than half of the first choices
N_BOOT = 2000


@dataclass(frozen=True)
class Measure:
    """A run-level column compared between routers: better direction, equivalence margin and why."""

    column: str
    lower_is_better: bool
    margin: float
    why: str


SWITCH = Measure("switch_rate", True, 0.02, "2 % of the probe tokens changing expert between evaluations")
LOAD_CV = Measure("load_cv", True, 0.1, "a quarter of the CV when one of 8 experts carries twice its share")
NMI = Measure("nmi", False, 0.05, "5 % of a perfect recovery of the true groups")
MI = Measure("mutual_info_norm", False, 0.02, "2 % of the label entropy")
GRAD_MARGIN = 0.05  # a cosine within ±0.05 of 0 is no interference worth avoiding


# ------------------------------------------------------------------------------------------ helpers
def collapsed(runs: pd.DataFrame, layers: pd.DataFrame) -> pd.Series:
    """Per run: issue 18's ``collapsed`` when recorded, else the same rule from final.json's per-layer
    ``top1_counts`` (any layer whose most popular first choice takes > 50 %); NaN when neither exists."""
    out = pd.Series(math.nan, index=runs.index, dtype=object)
    if "collapsed" in runs:
        out = runs["collapsed"].map(lambda v: bool(v) if not pd.isna(v) else math.nan).astype(object)
    if layers is not None and not layers.empty and "top1_counts" in layers:
        share = {}
        for rid, g in layers.groupby("run_id"):
            vals = [max(c) / sum(c) for c in g["top1_counts"] if isinstance(c, list) and c and sum(c) > 0]
            if vals:
                share[rid] = max(vals) > COLLAPSE_SHARE
        derived = runs["run_id"].map(share)
        out = out.where(out.notna(), derived)
    return out


def _boot_mean(values: np.ndarray, strata: np.ndarray, level: float, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean, resampling within each stratum (task)."""
    rng = np.random.default_rng(seed)
    groups = [values[strata == s] for s in np.unique(strata)]
    boot = np.empty(N_BOOT)
    for i in range(N_BOOT):
        boot[i] = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups]).mean()
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def value_cell(runs: pd.DataFrame, column: str) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of ``column`` over done runs (seed duplicates averaged), 95% stratified
    bootstrap over runs within each task."""
    if column not in runs:
        return math.nan, math.nan, math.nan, 0
    per = runs.dropna(subset=[column]).groupby(["bench", "seed"])[column].mean().reset_index()
    if per.empty:
        return math.nan, math.nan, math.nan, 0
    v, s = per[column].to_numpy(float), per["bench"].astype(str).to_numpy()
    lo, hi = _boot_mean(v, s, 0.95) if len(v) > 1 else (math.nan, math.nan)
    return float(v.mean()), lo, hi, len(v)


def compare(cand: pd.DataFrame, ref: pd.DataFrame, m: Measure) -> dict:
    """Paired (task, seed) difference cand − ref on ``m.column`` with its 95% and 90% intervals and the
    per-reference reading (better / worse / equivalent / inconclusive / no data)."""
    if m.column not in cand or m.column not in ref:
        return {"n_pairs": 0, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "reading": "no data"}
    a = cand.dropna(subset=[m.column]).groupby(["bench", "seed"])[m.column].mean()
    b = ref.dropna(subset=[m.column]).groupby(["bench", "seed"])[m.column].mean()
    keys = sorted(set(a.index) & set(b.index), key=str)
    if len(keys) < 2:
        return {"n_pairs": len(keys), "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "reading": "no data"}
    d = np.array([a[k] - b[k] for k in keys], dtype=float)
    strata = np.array([str(k[0]) for k in keys])
    lo, hi = _boot_mean(d, strata, 0.95)
    lo90, hi90 = _boot_mean(d, strata, 0.90)
    return {
        "n_pairs": len(keys),
        "diff": float(d.mean()),
        "ci_low": lo,
        "ci_high": hi,
        "reading": reading(lo, hi, lo90, hi90, m.margin, m.lower_is_better),
    }


def reading(lo: float, hi: float, lo90: float, hi90: float, margin: float, lower_is_better: bool) -> str:
    """equivalent if the 90% interval lies inside ±margin (TOST, checked first); else better / worse
    when the 95% interval excludes 0; else inconclusive."""
    if -margin < lo90 and hi90 < margin:
        return "equivalent"
    if hi < 0 or lo > 0:
        return "better" if (hi < 0) == lower_is_better else "worse"
    return "inconclusive"


def combine(readings: list[str]) -> str:
    """One verdict against every reference (see the module docstring)."""
    got = [r for r in readings if r != "no data"]
    if not got:
        return NOT_TESTABLE
    if "worse" in got:
        return CONTRADICTED
    if all(r == "better" for r in got):
        return SUPPORTED
    if all(r in ("better", "equivalent") for r in got):
        return EQUIVALENT
    return INCONCLUSIVE


def paired_reading(row) -> str:
    """A row of the report's paired comparison as a reading: TOST equivalence first, then the
    Holm-corrected better / worse."""
    if row is None:
        return "no data"
    if row.get("tost") == "equivalent":
        return "equivalent"
    return {"better": "better", "worse": "worse"}.get(row.get("verdict"), "inconclusive")


# ------------------------------------------------------------------------------------------- claims
@dataclass
class Context:
    """What the rules read: done runs (with ``collapsed``), the leaderboard, and the paired comparison
    against each reference label."""

    runs: pd.DataFrame
    lb: pd.DataFrame
    paired: dict[str, pd.DataFrame]


@dataclass
class Outcome:
    verdict: str
    readings: dict[str, str]  # reference label -> better / worse / equivalent / inconclusive / no data
    note: str = ""
    details: dict | None = None  # reference label -> {n_pairs, diff, ci_low, ci_high} (claims.csv)


def _compared(cand, refs, m: Measure, scope=lambda r: r) -> tuple[dict, dict]:
    """(readings, details) of ``compare`` against every reference."""
    details = {lab: compare(scope(cand), scope(ref), m) for lab, ref in refs.items()}
    return {lab: d["reading"] for lab, d in details.items()}, details


def _not_brain(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["task"] != "brain-age"]


def _task(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    return runs[runs["task"] == task]


def _collapse_note(cand: pd.DataFrame) -> tuple[int, int]:
    c = cand["collapsed"].dropna()
    return int(sum(bool(x) for x in c)), len(c)


def rule_stability(cand, refs, ctx) -> Outcome:
    """Fewer probe tokens switching expert (switch rate at the last evaluation) than every reference;
    a collapsed router is trivially stable, so it can neither support the claim nor be "as stable as"
    the references: with any collapsed run, supported and equivalent become not testable here."""
    readings, details = _compared(cand, refs, SWITCH)
    verdict = combine(list(readings.values()))
    k, n = _collapse_note(cand)
    moved = cand["moved_from_init"].dropna() if "moved_from_init" in cand else pd.Series(dtype=float)
    extra = [f"moved from init {100 * moved.mean():.0f} %"] if len(moved) else []
    if k and verdict in (SUPPORTED, EQUIVALENT):
        return Outcome(
            NOT_TESTABLE, readings, "; ".join([f"collapsed in {k}/{n} runs: trivially stable"] + extra), details
        )
    return Outcome(verdict, readings, "; ".join(([f"collapsed in {k}/{n} runs"] if k else []) + extra), details)


def rule_utilisation(cand, refs, ctx) -> Outcome:
    """Flatter expert load (lower load CV) than every reference, with no balance loss; a collapsed
    router has low utilisation by definition, so collapse contradicts the claim."""
    readings, details = _compared(cand, refs, LOAD_CV)
    verdict = combine(list(readings.values()))
    k, n = _collapse_note(cand)
    if k:
        return Outcome(CONTRADICTED, readings, f"collapsed in {k}/{n} runs", details)
    return Outcome(verdict, readings, "", details)


def rule_gradient(cand, refs, ctx) -> Outcome:
    """The premise: a balance loss's gradient on the router opposes the task's. Supported when the
    references' cosine (task vs balance gradient) lies below 0; contradicted when it lies above −0.05
    (no interference to avoid); the candidate itself has no balance loss by construction."""
    pooled = pd.concat(list(refs.values())) if refs else pd.DataFrame()
    mean, lo, hi, n = value_cell(pooled, "grad_cos_task_balance") if len(pooled) else (math.nan,) * 3 + (0,)
    readings = {lab: ("no data" if n == 0 else "measured") for lab in refs}
    if n < 2:
        return Outcome(NOT_TESTABLE, readings, "no reference run with a balance loss logged grad_cos_task_balance")
    if hi < 0:
        return Outcome(SUPPORTED, readings, f"cos {mean:.2f} [{lo:.2f}, {hi:.2f}] < 0")
    if lo > -GRAD_MARGIN:
        return Outcome(CONTRADICTED, readings, f"cos {mean:.2f} [{lo:.2f}, {hi:.2f}]: no conflict")
    return Outcome(INCONCLUSIVE, readings, f"cos {mean:.2f} [{lo:.2f}, {hi:.2f}]")


def rule_specialisation(cand, refs, ctx) -> Outcome:
    """Higher recovery of the true groups (NMI, ground-truth task) than every reference; without a
    ground-truth task, the normalised MI between expert and the task's token label, as a proxy."""
    if "nmi" in cand and cand["nmi"].notna().any():
        m, scope = NMI, lambda r: r[r["nmi"].notna()]
        note = ""
    else:
        m, scope, note = MI, _not_brain, "proxy: MI with the task's label, no known partition"
    readings, details = _compared(cand, refs, m, scope)
    return Outcome(combine(list(readings.values())), readings, note, details)


def _paired_row(ctx: Context, ref: str, label: str, task: str):
    p = ctx.paired.get(ref)
    if p is None or p.empty:
        return None
    rows = p[(p["label"] == label) & (p["bench"].isin(ctx.runs[ctx.runs["task"] == task]["bench"].unique()))]
    return rows.iloc[0].to_dict() if len(rows) else None


def _accuracy_rule(task: str, direct):
    def rule(cand, refs, ctx) -> Outcome:
        """State of the art: better than every reference on the task's headline (paired comparison,
        Holm-corrected; TOST against the task's margin first)."""
        if cand.empty or _task(cand, task).empty:
            return Outcome(NOT_TESTABLE, {}, f"no {task} runs")
        label = cand["label"].iloc[0]
        rows = {lab: _paired_row(ctx, lab, label, task) for lab in refs}
        readings = {lab: paired_reading(row) for lab, row in rows.items()}
        details = {
            lab: {
                "n_pairs": row["n_pairs"],
                "diff": row["diff_mean"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
            }
            for lab, row in rows.items()
            if row is not None
        }
        data = _task(cand, task)["data"].dropna().unique() if "data" in cand else []
        note = "" if any(direct(str(d)) for d in data) else "proxy: the task's offline data, not the paper's"
        return Outcome(combine(list(readings.values())), readings, note, details)

    return rule


def rule_brain_age(cand, refs, ctx) -> Outcome:
    """MAE down by more than 7 % of the reference's: supported when the whole 95% interval of the
    relative change lies below −7 %, contradicted when it lies above −7 %."""
    if _task(cand, "brain-age").empty:
        return Outcome(NOT_TESTABLE, {}, "no brain-age runs")
    label = cand["label"].iloc[0]
    readings, notes = {}, []
    for lab in refs:
        row = _paired_row(ctx, lab, label, "brain-age")
        ref_mean = ctx.lb[(ctx.lb["label"] == lab) & (ctx.lb["task"] == "brain-age")]["headline_mean"]
        if row is None or not len(ref_mean) or pd.isna(row["ci_low"]):
            readings[lab] = "no data"
            continue
        lo, hi = row["ci_low"] / ref_mean.iloc[0], row["ci_high"] / ref_mean.iloc[0]
        readings[lab] = "better" if hi < -0.07 else "worse" if lo > -0.07 else "inconclusive"
        notes.append(f"vs {lab} {100 * row['diff_mean'] / ref_mean.iloc[0]:+.1f} % [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    data = _task(cand, "brain-age")["data"].dropna().unique() if "data" in cand else []
    proxy = [] if any(d != "synthetic" for d in data) else ["proxy: synthetic cohort"]
    return Outcome(combine(list(readings.values())), readings, "; ".join(notes + proxy))


def rule_anatomy(cand, refs, ctx) -> Outcome:
    """Experts more anatomical than the references': normalised MI between expert and tissue label
    (grey / white matter / CSF) on brain age."""
    if _task(cand, "brain-age").empty:
        return Outcome(NOT_TESTABLE, {}, "no brain-age runs")
    scope = lambda r: _task(r, "brain-age")  # noqa: E731
    readings, details = _compared(cand, refs, MI, scope)
    return Outcome(combine(list(readings.values())), readings, "", details)


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    measured_by: str
    column: str | None  # the value shown per router (None: the task's headline)
    task: str | None  # the task the values come from (None: every task)
    rule: Callable[..., Any]  # (candidate rows, reference labels, Context) -> Outcome
    test_with: str


CLAIMS = [
    Claim(
        "stability",
        "Stable routing",
        "switch rate: share of probe tokens whose top-1 expert changed since the "
        "previous evaluation, lower = stabler; collapsed runs flagged",
        "switch_rate",
        None,
        rule_stability,
        "quick with train.probe_every (issue 18: >= 10 probe points per run), CPU; at scale the imagenet "
        "grid (moebench/grids/configs/imagenet.yaml), GPUs",
    ),
    Claim(
        "utilisation",
        "High utilisation, flatter expert load without a balance loss",
        "load CV over experts (dispatched tokens), lower = flatter; collapse = contradiction",
        "load_cv",
        None,
        rule_utilisation,
        "measured here; at scale the imagenet grid on GPUs",
    ),
    Claim(
        "gradient",
        "Gradient purity: no interfering balance-loss gradient",
        "cosine between the router's task-loss and balance-loss gradients, routers with a balance loss",
        "grad_cos_task_balance",
        None,
        rule_gradient,
        "any grid with switch run by this version (quick: CPU, minutes) logs grad_cos_task_balance",
    ),
    Claim(
        "specialisation",
        "Interpretable specialisation, feature-space alignment",
        "NMI between expert and true group (structure task); else normalised MI with the token label",
        "mutual_info_norm",
        None,
        rule_specialisation,
        "the structure grid (issue 19: known partitions), CPU minutes",
    ),
    Claim(
        "imagenet",
        "State-of-the-art ImageNet accuracy",
        "top-1 vs each reference (paired, Holm; TOST ±δ)",
        None,
        "classification",
        _accuracy_rule("classification", lambda d: "imagenet" in d.lower()),
        "the imagenet / emoe-imagenet grids (ImageNet-1k, ViT-S/16 or ViT-B/16): multi-GPU",
    ),
    Claim(
        "retrieval",
        "State-of-the-art COCO / Flickr30K retrieval",
        "mean R@1 vs each reference (paired, Holm; TOST ±δ)",
        None,
        "retrieval",
        _accuracy_rule("retrieval", lambda d: d.lower() in ("coco", "flickr30k", "karpathy")),
        "the retrieval-coco-flickr grid (COCO + Flickr30K, CLIP ViT-B/32): one or more GPUs",
    ),
    Claim(
        "brain-age",
        "Brain-age MAE down by more than 7 %",
        "relative MAE change vs each reference, 95% interval",
        None,
        "brain-age",
        rule_brain_age,
        "the brain-age grid (moebench/grids/configs/brain-age.yaml) on a real T1w cohort (BIDS): one GPU",
    ),
    Claim(
        "anatomy",
        "Anatomically interpretable experts (brain age)",
        "normalised MI between expert and tissue label (grey / white matter, CSF)",
        "mutual_info_norm",
        "brain-age",
        rule_anatomy,
        "the brain-age grid on real T1w volumes with tissue maps: one GPU",
    ),
]


# ------------------------------------------------------------------------------------------- audit
@dataclass
class Audit:
    """``frame``: one row per (claim, candidate, reference) with the reading and the claim's verdict
    (claims.csv); ``table``: one row per claim for the report (None when no candidate ran)."""

    frame: pd.DataFrame
    table: Table | None
    verdicts: list[tuple[str, str, str, str]]  # (claim, candidate, verdict, note)


def pairs(runs: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
    """candidate label -> {reference label -> its runs}: references of the same MoE slot."""
    out = {}
    routers = runs.groupby("label")["router"].first()
    modes = runs.groupby("label")["moe_mode"].first() if "moe_mode" in runs else pd.Series(dtype=object)
    for cand in sorted(
        (lab for lab, r in routers.items() if r in CANDIDATES), key=lambda x: (CANDIDATES.index(routers[x]), x)
    ):
        refs = [lab for lab, r in routers.items() if r in REFERENCES and modes.get(lab) == modes.get(cand)]
        out[cand] = {
            lab: runs[runs["label"] == lab] for lab in sorted(refs, key=lambda x: (REFERENCES.index(routers[x]), x))
        }
    return out


def audit(runs: pd.DataFrame, layers: pd.DataFrame, lb: pd.DataFrame, paired: dict[str, pd.DataFrame]) -> Audit:
    done = runs[(runs["state"] == "done")].dropna(subset=["bench", "label"]).copy()
    for col in ("router", "moe_mode", "data"):
        if col not in done:
            done[col] = None
    done["collapsed"] = collapsed(done, layers)
    ctx = Context(done, lb, paired)
    matched = pairs(done)
    if not matched:
        return Audit(pd.DataFrame(), None, [])
    rows, verdicts = [], []
    for claim in CLAIMS:
        for cand, refs in matched.items():
            out = claim.rule(done[done["label"] == cand], refs, ctx)
            verdicts.append((claim.claim, cand, out.verdict, out.note))
            for ref, rd in (out.readings or {"": "no data"}).items():
                d = (out.details or {}).get(ref) or {}
                rows.append(
                    {
                        "claim": claim.key,
                        "candidate": cand,
                        "reference": ref,
                        "reading": rd,
                        "n_pairs": d.get("n_pairs"),
                        "diff": d.get("diff"),
                        "ci_low": d.get("ci_low"),
                        "ci_high": d.get("ci_high"),
                        "verdict": out.verdict,
                        "note": out.note,
                        "measured_by": claim.measured_by,
                    }
                )
    return Audit(pd.DataFrame(rows), _table(done, lb, matched, verdicts), verdicts)


def _fmt(x: float) -> str:
    a = abs(x)
    return f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.3f}"


def _cell(mean, lo, hi) -> str:
    if pd.isna(mean):
        return "–"
    return _fmt(mean) if pd.isna(lo) else f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"


def claim_value(claim: Claim, runs: pd.DataFrame, lb: pd.DataFrame, label: str) -> str:
    """What the row shows for one router: its measurement's mean [95% CI] over the claim's runs."""
    mine = runs[runs["label"] == label]
    if claim.column is None:
        row = lb[(lb["label"] == label) & (lb["task"] == claim.task)]
        return "–" if row.empty else _cell(row["headline_mean"].iloc[0], row["ci_low"].iloc[0], row["ci_high"].iloc[0])
    column = claim.column
    if claim.key == "specialisation":
        if "nmi" in mine and mine["nmi"].notna().any():
            column = "nmi"
        else:
            mine = _not_brain(mine)
    if claim.task:
        mine = _task(mine, claim.task)
    mean, lo, hi, _ = value_cell(mine, column)
    return _cell(mean, lo, hi)


def _table(runs, lb, matched, verdicts) -> Table:
    entries = list(matched) + sorted({r for refs in matched.values() for r in refs} - set(matched))
    by_claim: dict[str, list[str]] = {}
    for key, cand, verdict, note in verdicts:
        text = verdict + (f" ({note})" if note else "")
        by_claim.setdefault(key, []).append(text if len(matched) == 1 else f"{cand}: {text}")
    rows = []
    for claim in CLAIMS:
        rows.append(
            [claim.claim, claim.measured_by]
            + [claim_value(claim, runs, lb, e) for e in entries]
            + ["; ".join(by_claim.get(claim.claim, [])), claim.test_with]
        )
    notes = [
        "One row per claim of the ERMoE abstract. Values: mean [95% interval] over the runs the claim "
        "reads (stratified bootstrap over (task, seed) runs; accuracy rows: the leaderboard's headline "
        "and interval). " + ", ".join(matched) + " are compared with the softmax-topk / switch runs of the "
        "same MoE slot: " + "; ".join(f"{c} vs {', '.join(r) or 'none'}" for c, r in matched.items()) + ".",
        "Verdict per reference, paired by (task, seed): better when the 95% interval of the difference "
        "excludes 0 on the claimed side, worse on the other, equivalent when the 90% interval lies inside "
        f"±δ (TOST, α = 0.05; δ: switch rate {SWITCH.margin:g}, load CV {LOAD_CV.margin:g}, NMI "
        f"{NMI.margin:g}, normalised MI {MI.margin:g}, accuracy: the task's margin). Claim: supported = "
        "better than every reference; contradicted = worse than one; equivalent = every reference "
        "equivalent or beaten, not all beaten; inconclusive otherwise; not testable here = no measurement in these "
        "runs. A collapsed router (> 50 % of first choices to one expert) never supports stability or "
        "utilisation. 'proxy' = measured on this suite's offline data, not the paper's benchmark.",
    ]
    return Table(
        "Claims audit (ERMoE abstract)",
        ["Claim", "Measured by"] + entries + ["Verdict", "What would test it"],
        rows,
        set(),
        notes,
        "tab:claims",
        left=2,
    )
