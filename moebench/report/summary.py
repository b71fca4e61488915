"""The top of the report: what it found (key findings) and how to reproduce it (reproducibility block).

Findings are generated from the same frames the tables show, so every sentence restates a number a
reader can find below; the reproducibility block reads what the runs recorded (final.json's env,
spec.yaml, the launcher's grid_source.json), never what the machine building the report has."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from moebench.training.records import CorruptRecordError, read_json, read_spec

FLOPS_TOLERANCE_PCT = 1.0  # active-FLOPs overhead over dense worth calling a confound
PARAMS_TOLERANCE = 1.10  # total-parameter ratio to the reference worth calling a confound
NOT_MOVED = 0.05  # moved_from_init below this: the router kept (almost) its step-0 routing


def _fmt(x: float) -> str:
    a = abs(x)
    return f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.3f}"


def key_findings(lb: pd.DataFrame, paired: pd.DataFrame, baseline: str) -> list[str]:
    """One short paragraph per task: the best rank group, who beats / loses to the baseline after Holm
    correction, the minimum detectable effect, and the confounds (extra FLOPs, extra parameters,
    unrouted or dropped tokens)."""
    out: list[str] = []
    if lb.empty:
        return out
    for bench, b in lb.groupby("bench", sort=False):
        name = b["headline_name"].dropna().iloc[0] if b["headline_name"].notna().any() else "headline"
        parts = []
        for variant, v in b.groupby("variant", sort=False):
            parts += _variant_findings(v, variant, paired, bench, name, baseline)
        parts.append(_routing_sentence(b))
        parts.append(_confounds_sentence(b))
        out.append(f"{bench}: " + " ".join(parts))
    return out


def _variant_findings(
    v: pd.DataFrame, variant: str, paired: pd.DataFrame, bench, name: str, baseline: str
) -> list[str]:
    """The best rank group of one sweep point, who beats / loses to the baseline, the detectable effect."""
    parts = []
    where = f" ({variant})" if variant else ""
    best = v[v.get("rank_group", pd.Series(dtype=float)) == 1] if "rank_group" in v else v.iloc[:0]
    if len(best):
        members = ", ".join(f"{r['label']} {_fmt(r['headline_mean'])}" for _, r in best.iterrows())
        parts.append(
            f"Best group on {name}{where}: {members} (intervals overlap the best's; {len(best)} of {len(v)} routers)."
        )
    else:
        parts.append(
            f"No confidence intervals on {name}{where}: too few seeds and no per-example outputs, so no rank groups."
        )
    pv = paired[(paired["bench"] == bench) & (paired["variant"] == variant)] if not paired.empty else paired
    if len(pv):
        better = pv[pv["verdict"] == "better"]
        worse = pv[pv["verdict"] == "worse"]
        say = lambda f: ", ".join(f"{r['label']} ({r['diff_mean']:+.3g})" for _, r in f.iterrows())  # noqa: E731
        parts.append(
            f"Beats {baseline} after Holm correction: {say(better) or 'none'}; "
            f"worse than {baseline}: {say(worse) or 'none'}."
        )
        mde = pv["mde"].dropna()
        if len(mde):
            seeds = int(pv["n_pairs"].max())
            items = pv["n_items"].dropna()
            n_items = f" × {int(items.max())} eval items" if len(items) else ""
            parts.append(
                f"With {seeds} seed(s){n_items}, differences below about {_fmt(mde.median())} "
                f"{name} are unlikely to be detected (median minimum detectable effect, 80 % power)."
            )
    return parts


def _confounds_sentence(b: pd.DataFrame) -> str:
    """Routers off the dense FLOPs or the reference's parameters, or leaving tokens out."""
    conf = []
    for _, r in b.iterrows():
        fo, pr = r.get("flops_overhead", math.nan), r.get("params_ratio", math.nan)
        un, dr = r.get("unrouted_rate", math.nan), r.get("drop_rate", math.nan)
        bits = []
        if not pd.isna(fo) and abs(fo) > FLOPS_TOLERANCE_PCT:
            bits.append(f"{fo:+.1f} % active FLOPs vs dense")
        if not pd.isna(pr) and pr > PARAMS_TOLERANCE:
            bits.append(f"{pr:.2f}× the reference's parameters")
        if not pd.isna(un) and un > 0:
            bits.append(f"{100 * un:.1f} % tokens unrouted")
        if not pd.isna(dr) and dr > 0:
            bits.append(f"{100 * dr:.1f} % assignments dropped")
        if bits:
            conf.append(f"{r['label']}{' (' + r['variant'] + ')' if r['variant'] else ''}: {', '.join(bits)}")
    return (
        "Confounds: "
        + (
            "; ".join(conf)
            if conf
            else "none (all routers matched within "
            f"{FLOPS_TOLERANCE_PCT:g} % FLOPs and {PARAMS_TOLERANCE:g}× parameters, no token left out)"
        )
        + "."
    )


def collapse_findings(lb: pd.DataFrame) -> list[str]:
    """One key-finding bullet per task where a router collapsed (one expert takes over 50 % of first
    choices in some layer): such a router does not route, whatever its headline or stability."""
    from moebench.report.tables import collapsed_seeds

    out: list[str] = []
    if lb.empty or "collapsed" not in lb:
        return out
    for bench, b in lb.groupby("bench", sort=False):
        bad = [
            f"{r['label']}{' (' + r['variant'] + ')' if r['variant'] else ''} ({collapsed_seeds(r)}/"
            f"{int(r['n_done'])} seeds)"
            for _, r in b.iterrows()
            if collapsed_seeds(r)
        ]
        if bad:
            out.append(
                f"{bench}: collapsed, so not routing (one expert takes over 50 % of first choices in a "
                f"layer): {', '.join(bad)}."
            )
    return out


def _routing_sentence(b: pd.DataFrame) -> str:
    """Who collapsed (one expert takes > 50 % of first choices in some layer), who never left its step-0
    routing, and the most stable router among those that did not collapse (a collapsed router is
    trivially stable, so it is never named as such)."""
    from moebench.report.tables import collapsed_seeds, layers_text

    routed = b[b["collapsed"].notna()] if "collapsed" in b else b.iloc[:0]
    if routed.empty:
        return ""
    bad, still, ok = [], [], []
    for _, r in routed.iterrows():
        name = r["label"] + (f" ({r['variant']})" if r["variant"] else "")
        n = collapsed_seeds(r)
        if n:
            bad.append(
                f"{name} ({n}/{int(r['n_done'])} seeds; first-choice max "
                f"{layers_text(r, 'first_choice_max_share')} % per layer, "
                f"{layers_text(r, 'first_choice_max_share_init')} % at step 0)"
            )
        else:
            ok.append(r)
        moved = r.get("moved_from_init", math.nan)
        if not pd.isna(moved) and moved < NOT_MOVED:
            still.append(f"{name} ({100 * moved:.1f} %)")
    text = (
        f"Collapsed (one expert takes over 50 % of first choices in a layer): {'; '.join(bad) or 'none'}. "
        f"Kept its step-0 routing (under {100 * NOT_MOVED:g} % of probe tokens moved): "
        f"{', '.join(still) or 'none'}."
    )
    stable = [r for r in ok if not pd.isna(r.get("switch_rate", math.nan))]
    if stable:
        best = min(stable, key=lambda r: r["switch_rate"])
        text += (
            f" Most stable router that did not collapse: {best['label']} (switch "
            f"{100 * best['switch_rate']:.1f} % of probe tokens at the last probe point)."
        )
    elif bad:
        text += " No router that did not collapse has a stability measure."
    return text


def _read(read, path):
    try:
        return read(path)
    except CorruptRecordError:
        return None


def reproducibility(runs: pd.DataFrame, root: Path, lb: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    """(field, value) rows from the done runs' records; a field whose runs disagree lists every value
    with its count, so a mixed-commit or mixed-hardware grid is visible."""
    done = runs[(runs["state"] == "done") & runs["run_dir"].map(lambda d: isinstance(d, str))]
    fields: dict[str, Counter] = {
        k: Counter()
        for k in ("Commit", "Packages", "Python", "Device", "CPU", "CPU cores / torch threads", "Train device / AMP")
    }
    train: dict[str, Counter] = {}
    for _, r in done.iterrows():
        final = _read(read_json, Path(r["run_dir"]) / "final.json") or {}
        env = final.get("env") or {}
        if env:
            commit = env.get("git_commit") or "unknown"
            fields["Commit"][
                commit
                + (
                    ""
                    if commit == "unknown"
                    else (" (dirty: uncommitted changes)" if commit.endswith("-dirty") else " (clean)")
                )
            ] += 1
            libs = env.get("libraries") or {}
            fields["Packages"][", ".join(f"{k} {v}" for k, v in sorted(libs.items()) if v)] += 1
            fields["Python"][str(env.get("python"))] += 1
            fields["Device"][str(env.get("device"))] += 1
            fields["CPU"][str(env.get("cpu_model") or env.get("processor"))] += 1
            fields["CPU cores / torch threads"][f"{env.get('cpu_count')} / {env.get('torch_threads')}"] += 1
            fields["Train device / AMP"][f"{env.get('train_device')} / {env.get('amp')}"] += 1
        spec = _read(read_spec, Path(r["run_dir"])) or {}
        t = spec.get("train") or {}
        if t:
            key = str(r["bench"])
            train.setdefault(key, Counter())[
                f"steps {t.get('steps')}, batch {t.get('batch_size')}, lr {t.get('lr')}, "
                f"eval batch {t.get('eval_batch_size')}"
            ] += 1
    rows = []
    for k, c in fields.items():
        if c:
            rows.append((k, _counts(c)))
    for grid in sorted(set(done["grid"])):
        src = _read(read_json, root / grid / "grid_source.json") if (root / grid).is_dir() else None
        if src is None and root.name == grid:
            src = _read(read_json, root / "grid_source.json")
        if src:
            rows.append((f"Grid {grid}", f"{repo_relative(src.get('file'))} (sha256 {str(src.get('sha256'))[:16]}…)"))
            rows.append((f"Command ({grid})", str(src.get("command"))))
        else:
            rows.append((f"Grid {grid}", "no grid_source.json (launched before it was recorded, or by hand)"))
    eval_n = {}
    if lb is not None and not lb.empty and "eval_n" in lb:
        eval_n = lb.groupby("bench")["eval_n"].max().dropna().to_dict()
    for bench, c in sorted(train.items()):
        n = f"; eval set {int(eval_n[bench])} items" if bench in eval_n else ""
        rows.append((f"Training ({bench})", _counts(c) + n))
    return rows


def repo_relative(path) -> str:
    """A grid file as the repository names it (``moebench/grids/configs/quick.yaml``), not the absolute
    path of the machine that launched it; a file outside the repository keeps only its name."""
    text = str(path or "")
    marker = "moebench/grids/configs/"
    if marker in text.replace("\\", "/"):
        return marker + text.replace("\\", "/").rsplit(marker, 1)[1]
    return Path(text).name or "unknown"


def claim_findings(verdicts, totals, paired: pd.DataFrame, baseline: str) -> list[str]:
    """Short bullets, one fact each: the claims audit's verdicts first, then the summary's leaders,
    then per task who differs from or is equivalent to the baseline."""
    out = [
        f"{claim}, {cand}: {verdict}" + (f" ({note})" if note else "") + "." for claim, cand, verdict, note in verdicts
    ]
    t = totals.table
    if not t.empty:
        first = t[t["borda_rank"] == t["borda_rank"].min()]
        out.append(f"Borda rank 1 over tasks: {', '.join(first['label'])} ({first['borda_points'].iloc[0]:g} points).")
        if t["iqm"].notna().any():
            best = t.loc[t["iqm"].idxmax()]
            out.append(
                f"Highest IQM of the normalised score: {best['label']} {best['iqm']:.1f} "
                f"[{best['iqm_low']:.1f}, {best['iqm_high']:.1f}] (0 = {totals.zero_label}, 100 = best per task)."
            )
    if paired.empty:
        return out
    for bench, p in paired.groupby("bench", sort=False):
        say = lambda f: ", ".join(f"{r['label']} ({r['diff_mean']:+.3g})" for _, r in f.iterrows())  # noqa: E731
        for word, rows in (("better", p[p["verdict"] == "better"]), ("worse", p[p["verdict"] == "worse"])):
            if len(rows):
                out.append(f"{bench}: {word} than {baseline} after Holm correction: {say(rows)}.")
        eq = p[p["tost"] == "equivalent"]
        if len(eq):
            out.append(f"{bench}: equivalent to {baseline} within ±{eq['margin'].iloc[0]:g}: {', '.join(eq['label'])}.")
    return out


def _counts(c: Counter) -> str:
    if len(c) == 1:
        return next(iter(c))
    return "; ".join(f"{v} ({n} runs)" for v, n in c.most_common())
