"""Seaborn figures for the report, sized for a paper column (3.5 in wide), saved as PNG and PDF.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot), so plotting never touches a GUI
backend or global figure state."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from moebench.report.load import RecordSet
from moebench.report.render import slug
from moebench.report.sweeps import task_sweeps_as_tasks, without_data_sweep_variant
from moebench.report.tables import entry_name

BASELINE = "softmax-topk"  # the reference router the headline plot marks

WIDTH = 3.5  # inches: one paper column
WIDE = 7.0  # inches: the full page width, for small multiples
DPI = 200
RC: Any = {  # matplotlib types its keys as literals"font.size": 7, "axes.labelsize": 7, "axes.titlesize": 7.5, "figure.titlesize": 7.5, "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 6.5,
    "pdf.fonttype": 42,
    "axes.titleweight": "normal",
    "lines.linewidth": 1.2,
}
MARKERS = "osD^vPX*<>p"


@dataclass
class Plot:
    bench: str
    kind: str  # headline | tradeoff | pareto_* | stability | per_layer | load | specialisation
    caption: str
    png: Path
    pdf: Path


class Plotter:
    """Draws every figure for a record set into ``out_dir`` with one colour and marker per router."""

    def __init__(self, rs: RecordSet, lb: pd.DataFrame, out_dir: Path):
        # a sweep over the task's data (the structure track's generators) is a task of its own here too,
        # as in the rank and normalised-score tables: one figure per generator, placed in its task's
        # section (`home`), each legend naming routers only
        runs = task_sweeps_as_tasks(rs.runs)
        self.home = dict(zip(runs["bench"], rs.runs["bench"])) if not rs.runs.empty else {}
        rs = dataclasses.replace(
            rs,
            runs=runs,
            layers=without_data_sweep_variant(rs.layers),
            evals=without_data_sweep_variant(rs.evals),
            probes=without_data_sweep_variant(rs.probes),
        )
        self.rs, self.lb, self.out = rs, task_sweeps_as_tasks(lb), Path(out_dir)
        labels = sorted(set(rs.runs["label"].dropna()))
        pal = sns.color_palette("colorblind" if len(labels) <= 10 else "husl", max(len(labels), 1))
        self.color = {lab: pal[i] for i, lab in enumerate(labels)}
        if "dense" in self.color:
            self.color["dense"] = (0.35, 0.35, 0.35)
        self.marker = {lab: MARKERS[i % len(MARKERS)] for i, lab in enumerate(labels)}

    def all(self) -> list[Plot]:
        self.out.mkdir(parents=True, exist_ok=True)
        plots: list[Plot] = []
        with sns.axes_style("whitegrid"), mpl.rc_context(RC):
            for bench, lb_b in self.lb.groupby("bench", sort=True):
                runs_b = self.rs.runs[(self.rs.runs["bench"] == bench) & (self.rs.runs["state"] == "done")]
                runs_b = runs_b[runs_b["headline_value"].notna()]
                if runs_b.empty:
                    continue
                for make in (
                    self.headline,
                    self.tradeoff,
                    self.pareto_flops,
                    self.pareto_router_flops,
                    self.pareto_params,
                    self.stability,
                    self.per_layer,
                    self.load,
                    self.specialisation,
                ):
                    plots += [
                        dataclasses.replace(p, bench=self.home.get(bench, bench)) for p in make(bench, lb_b, runs_b)
                    ]
        return plots

    def profile(self, totals) -> Plot:
        """rliable's performance profile: share of a router's (task, seed) runs whose normalised score
        exceeds τ, one line per router."""
        from moebench.report.aggregate import performance_profile

        sc = totals.run_scores.dropna(subset=["score"])
        taus = np.linspace(min(0.0, sc["score"].min()), max(100.0, sc["score"].max()), 201)
        fig = _figure((WIDTH, 3.2))  # room for the two-line x label and the legend below
        ax = fig.add_subplot()
        for (label, variant), g in sc.groupby(["label", "variant"], sort=True):
            ax.plot(
                taus,
                performance_profile(g["score"].to_numpy(), taus),
                label=entry_name(label, variant),
                color=self.color.get(label),
                drawstyle="steps-post",
            )
        ax.set_xlabel(f"normalised score τ\n(0 = {totals.zero_label}, 100 = best per task)")
        ax.set_ylabel("share of runs > τ")
        ax.set_ylim(-0.02, 1.02)
        self._legend_below(ax, fig, sc["label"].nunique())
        self.out.mkdir(parents=True, exist_ok=True)
        return self._save(
            fig,
            "(all tasks)",
            "profile",
            "Performance profile (rliable): for each τ, the share of a router's (task, seed) runs whose "
            f"normalised score exceeds τ; higher and further right is better. 0 = {totals.zero_label}.",
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _save(self, fig: Figure, bench: str, kind: str, caption: str, suffix: str = "") -> Plot:
        stem = slug(f"{kind}_{bench}" + (f"_{suffix}" if suffix else ""))
        png, pdf = self.out / f"{stem}.png", self.out / f"{stem}.pdf"
        fig.savefig(png, dpi=DPI)  # no tight bbox: the file keeps the exact column width
        fig.savefig(pdf)
        return Plot(bench, kind, caption, png, pdf)

    def _legend_below(self, ax, fig: Figure, n: int) -> None:
        """Legend under the axes, outside them; the constrained layout makes room within the width."""
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(
                handles,
                labels,
                loc="outside lower center",
                ncol=2 if n > 1 else 1,
                frameon=False,
                handletextpad=0.3,
                columnspacing=1.0,
            )

    def _entries(self, lb_b: pd.DataFrame) -> list[tuple[str, str, bool]]:
        return [(r["label"], r["variant"], bool(r["complete"])) for _, r in lb_b.iterrows() if r["n_done"] > 0]

    # -- figures -----------------------------------------------------------------------------------
    def headline(self, bench, lb_b, runs_b) -> list[Plot]:
        entries = self._entries(lb_b)
        name, hib = _headline(lb_b)
        fig = _figure((WIDTH, 0.8 + 0.24 * len(entries)))
        ax = fig.subplots()
        rng = np.random.default_rng(0)
        ticks = []
        for y, (label, variant, complete) in enumerate(entries):
            vals = runs_b[(runs_b["label"] == label) & (runs_b["variant"] == variant)]["headline_value"].to_numpy()
            row = lb_b[(lb_b["label"] == label) & (lb_b["variant"] == variant)].iloc[0]
            lo, hi = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
            mean = vals.mean()
            xerr = None if pd.isna(lo) else [[mean - lo], [hi - mean]]
            ax.errorbar(mean, y, xerr=xerr, fmt=self.marker[label], color=self.color[label], ms=4, capsize=2, zorder=3)
            ax.scatter(
                vals,
                y + rng.uniform(-0.18, 0.18, len(vals)),
                s=5,
                color=self.color[label],
                alpha=0.45,
                linewidths=0,
                zorder=2,
            )
            ticks.append(f"{entry_name(label, variant)}{'' if complete else '*'} (n={len(vals)})")
            if label == BASELINE:
                ax.axvline(mean, color=self.color[label], ls="--", lw=0.8, zorder=1)
        ax.set_yticks(range(len(entries)))
        ax.set_yticklabels(ticks)
        ax.set_ylim(len(entries) - 0.5, -0.5)
        ax.set_xlabel(metric_label(name, bench, hib, runs_b["headline_value"]))
        incomplete = not all(ok for *_, ok in entries)
        fig.suptitle(f"{bench}: mean with 95% CI; n = seeds" + ("; * incomplete" if incomplete else ""))
        return [
            self._save(
                fig,
                bench,
                "headline",
                f"{bench}: headline metric per router, mean with its 95% "
                f"interval (as in the leaderboard), one dot per seed; dashed "
                f"line = the {BASELINE} baseline's mean.",
            )
        ]

    def _scatter_vs(self, bench, lb_b, runs_b, xcol, xlabel, kind, caption, xscale=1.0, pareto=False) -> list[Plot]:
        name, hib = _headline(lb_b)
        entries = [(lab, var) for lab, var, _ in self._entries(lb_b)]
        have = runs_b[runs_b[xcol].notna()] if xcol in runs_b else runs_b.iloc[:0]
        if have.empty:
            return []
        fig = _figure((WIDTH, 2.1 + 0.13 * math.ceil(len(entries) / 2)))
        ax = fig.subplots()
        points = []
        for label, variant in entries:
            g = runs_b[(runs_b["label"] == label) & (runs_b["variant"] == variant)]
            x, y = g[xcol].to_numpy(dtype=float) / xscale, g["headline_value"].to_numpy(dtype=float)
            if np.isnan(x).all():
                ax.axhline(
                    np.nanmean(y),
                    color=self.color[label],
                    ls="--",
                    lw=1,
                    label=f"{entry_name(label, variant)} (no MoE layers)",
                )
            else:
                points.append((label, variant, x, y))
        means = []
        for label, variant, x, y in points:  # true positions only: overlapping routers differ by marker
            sx = np.nanstd(x, ddof=1) if np.isfinite(x).sum() > 1 else 0.0
            sy = np.nanstd(y, ddof=1) if len(y) > 1 else 0.0
            ax.scatter(x, y, s=6, color=self.color[label], alpha=0.4, linewidths=0)
            ax.errorbar(
                np.nanmean(x),
                np.nanmean(y),
                xerr=sx,
                yerr=sy,
                fmt=self.marker[label],
                ms=4,
                capsize=2,
                color=self.color[label],
                label=entry_name(label, variant),
                mfc="none" if label != BASELINE else None,
            )
            means.append((float(np.nanmean(x)), float(np.nanmean(y))))
        if pareto and len(means) > 1:
            front = _pareto_front(means, hib)
            ax.plot(*zip(*front), color="0.4", lw=0.8, ls=":", zorder=1, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(name, bench, hib, runs_b["headline_value"]))
        fig.suptitle(bench)
        self._legend_below(ax, fig, len(entries))
        return [self._save(fig, bench, kind, caption)]

    def tradeoff(self, bench, lb_b, runs_b) -> list[Plot]:
        return self._scatter_vs(
            bench,
            lb_b,
            runs_b,
            "load_cv",
            "Load CV across experts (std/mean; 0 = balanced)",
            "tradeoff",
            f"{bench}: headline metric against load imbalance (CV of expert "
            f"loads), mean ± s.d. over seeds; small dots are seeds.",
        )

    def _pareto(self, bench, lb_b, runs_b, col, what, kind) -> list[Plot]:
        if col not in runs_b or runs_b[col].isna().all():
            return []
        top = runs_b[col].max()
        scale, prefix = next(
            ((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= s), (1.0, "")
        )
        return self._scatter_vs(
            bench,
            lb_b,
            runs_b,
            col,
            what.format(p=prefix),
            kind,
            f"{bench}: headline metric against {what.format(p=prefix).lower()}, mean ± s.d. "
            f"over seeds; dotted = Pareto front (no router is both cheaper and better).",
            xscale=scale,
            pareto=True,
        )

    def pareto_flops(self, bench, lb_b, runs_b) -> list[Plot]:
        return self._pareto(
            bench, lb_b, runs_b, "flops_per_token", "Active compute ({p}FLOPs per token)", "pareto_flops"
        )

    def pareto_router_flops(self, bench, lb_b, runs_b) -> list[Plot]:
        return self._pareto(
            bench, lb_b, runs_b, "router_flops_per_token", "Router compute ({p}FLOPs per token)", "pareto_router_flops"
        )

    def per_layer(self, bench, lb_b, runs_b) -> list[Plot]:
        """Small multiples: one panel per statistic, x = MoE layer index, one line per router (seed mean)."""
        lay = self.rs.layers
        if lay.empty or "layer_idx" not in lay:
            return []
        lay = lay[lay["run_id"].isin(runs_b["run_id"])]
        nmi = "nmi" if "nmi" in lay and lay["nmi"].notna().any() else "mutual_info_norm"
        stats = [(c, t) for c, t in PER_LAYER_PANELS + [(nmi, "NMI ↑")] if c in lay and lay[c].notna().any()]
        if lay.empty or not stats or lay["layer_idx"].nunique() < 1:
            return []
        entries = [(lab, var) for lab, var, _ in self._entries(lb_b)]
        fig = _figure((WIDE, 2.3 + 0.13 * math.ceil(len(entries) / 4)))
        axes = np.atleast_1d(fig.subplots(1, len(stats), squeeze=False)).ravel()
        for ax, (col, title) in zip(axes, stats):
            for label, variant in entries:
                g = lay[(lay["label"] == label) & (lay["variant"] == variant)]
                m = g.groupby("layer_idx")[col].mean().dropna()
                if m.empty:
                    continue
                scale = 100.0 if col == "switch_rate" else 1.0
                ax.plot(
                    m.index,
                    m.to_numpy() * scale,
                    marker=self.marker[label],
                    ms=3,
                    color=self.color[label],
                    label=entry_name(label, variant),
                )
            ax.set_title(title)
            ax.set_xlabel("MoE layer (index)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(f"{bench}: routing statistics per MoE layer, mean over seeds")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), frameon=False)
        names = ", ".join(f"{int(i)} = {n}" for i, n in lay.groupby("layer_idx")["layer"].first().items())
        return [
            self._save(
                fig,
                bench,
                "per_layer",
                f"{bench}: load CV, top-1 switch rate, MI and NMI between "
                f"label and expert in each MoE layer, mean over seeds "
                f"(layers: {names}).",
            )
        ]

    def pareto_params(self, bench, lb_b, runs_b) -> list[Plot]:
        return self._pareto(bench, lb_b, runs_b, "params_total", "Total parameters ({p})", "pareto_params")

    def stability(self, bench, lb_b, runs_b) -> list[Plot]:
        # the probe points (every train.probe_every steps) where the runs recorded them, else the evaluations
        probes = self.rs.probes
        has_probes = not probes.empty and "switch_rate" in probes and probes["switch_rate"].notna().any()
        ev = probes if has_probes else self.rs.evals
        if ev.empty or "switch_rate" not in ev:
            return []
        ev = ev[ev["run_id"].isin(runs_b["run_id"]) & ev["switch_rate"].notna()].copy()
        if ev.empty:
            return []
        ev["entry"] = [entry_name(a, b) for a, b in zip(ev["label"], ev["variant"])]
        ev["switch_pct"] = 100 * ev["switch_rate"]
        seen = set(ev["entry"])
        order = [entry_name(lab, var) for lab, var, _ in self._entries(lb_b) if entry_name(lab, var) in seen]
        colour = {entry_name(lab, var): self.color[lab] for lab, var, _ in self._entries(lb_b)}
        collapsed = {
            entry_name(r["label"], r["variant"])
            for _, r in lb_b.iterrows()
            if not pd.isna(r.get("collapsed", math.nan)) and r["collapsed"] > 0
        }
        cols = min(4, len(order))
        rows = math.ceil(len(order) / cols)
        fig = _figure((WIDE, 0.5 + 1.3 * rows))
        axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
        top = float(ev["switch_pct"].max()) if len(ev) else 1.0
        for ax, entry in zip(axes, order):
            e = ev[ev["entry"] == entry].groupby("step")["switch_pct"]
            m, sd = e.mean(), e.std(ddof=1).fillna(0)
            ax.fill_between(m.index, (m - sd).clip(lower=0), m + sd, color=colour[entry], alpha=0.2, lw=0)
            ax.plot(m.index, m.to_numpy(), marker="o", ms=2.5, color=colour[entry])
            ax.set_title(entry + (" (collapsed)" if entry in collapsed else ""), fontsize="small")  # trivially stable
            ax.set_ylim(-0.03 * max(top, 1.0), max(top * 1.05, 1.0))  # a 0 line stays visible
        for ax in axes[len(order) :]:
            ax.set_visible(False)
        fig.supxlabel("Training step", fontsize=7)
        fig.supylabel("Top-1 switch rate (% of probe tokens)", fontsize=7)
        fig.suptitle(f"{bench}: routing stability, mean ± s.d. over seeds")
        since = "probe point" if has_probes else "evaluation"
        return [
            self._save(
                fig,
                bench,
                "stability",
                f"{bench}: share of fixed probe tokens whose top-1 expert "
                f"changed since the previous {since}, one panel per router.",
            )
        ]

    def _layers_with(self, runs_b, column: str) -> pd.DataFrame:
        """Per-layer rows of these runs that recorded a non-empty list in ``column``."""
        lay = self.rs.layers
        if lay.empty or column not in lay:
            return lay.iloc[0:0]
        lay = lay[lay["run_id"].isin(runs_b["run_id"])]
        return lay[lay[column].map(lambda v: isinstance(v, list) and len(v) > 0)]

    def load(self, bench, lb_b, runs_b) -> list[Plot]:
        lay = self._layers_with(runs_b, "counts")
        if lay.empty:
            return []
        plots = []
        entries = [(lab, var) for lab, var, _ in self._entries(lb_b)]
        for (idx, layer), part in lay.groupby(["layer_idx", "layer"], sort=True):
            rows, names = [], []
            for label, variant in entries:
                g = part[(part["label"] == label) & (part["variant"] == variant)]
                if g.empty:
                    continue
                shares = [100 * np.sort(np.asarray(c, float))[::-1] / max(np.sum(c), 1) for c in g["counts"]]
                width = max(len(s) for s in shares)
                mat = np.full((len(shares), width), np.nan)
                for i, s in enumerate(shares):
                    mat[i, : len(s)] = s
                rows.append(np.nanmean(mat, axis=0))
                names.append(entry_name(label, variant))
            if not rows:
                continue
            width = max(len(r) for r in rows)
            data = pd.DataFrame(
                [np.pad(r, (0, width - len(r)), constant_values=np.nan) for r in rows],
                index=names,
                columns=range(1, width + 1),
            )
            fig = _figure((WIDTH, max(1.7, 0.75 + 0.22 * len(names))))  # room for the colour-bar label
            ax = fig.subplots()
            uniform = 100 / width  # one fixed scale for every load figure: white = uniform, 0 .. 2x uniform
            sns.heatmap(
                data,
                ax=ax,
                cmap="RdBu_r",
                center=uniform,
                vmin=0,
                vmax=2 * uniform,
                annot=width <= 8,
                fmt=".1f",
                annot_kws={"fontsize": 5.5},
                linewidths=0.3,
                linecolor="white",
                cbar_kws={"label": "Share of tokens (%); white = 1/E", "pad": 0.02},
            )
            ax.set_xlabel(f"Expert, sorted by load within each run (uniform = {100 / width:.1f}%)")
            ax.set_ylabel("")
            ax.tick_params(axis="y", rotation=0)
            fig.suptitle(f"{bench}: expert load, layer {layer}")
            plots.append(
                self._save(
                    fig,
                    bench,
                    "load",
                    f"{bench}, layer {layer}: share of tokens per expert, "
                    f"experts sorted by load in each run (expert indices are "
                    f"not comparable across seeds), averaged over seeds.",
                    suffix=f"{idx}_{layer}",
                )
            )
        return plots

    def specialisation(self, bench, lb_b, runs_b) -> list[Plot]:
        lay = self._layers_with(runs_b, "label_by_expert")
        if lay.empty:
            return []
        panels = []
        for label, variant in [(lab, var) for lab, var, _ in self._entries(lb_b)]:
            g = lay[(lay["label"] == label) & (lay["variant"] == variant)]
            if g.empty:
                continue
            seed = g["seed"].min()
            r = g[g["seed"] == seed].sort_values("layer_idx").iloc[-1]
            panels.append((entry_name(label, variant), int(seed), r))
        if not panels:
            return []
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        n_labels = min(20, max(len(p[2]["label_by_expert"]) for p in panels))
        fig = _figure((WIDE, 0.6 + rows * (0.6 + 0.16 * n_labels)))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for k, (ax, (entry, _seed, r)) in enumerate(zip(axes, panels)):
            share, names, columns, extra = _label_shares(r)
            sns.heatmap(
                pd.DataFrame(share, index=names, columns=columns),
                ax=ax,
                cmap="mako_r",
                vmin=0,
                vmax=100,
                annot=False,
                linewidths=0.2,
                linecolor="white",
                cbar=k == len(panels) - 1,
                cbar_kws={"label": "Label's tokens (%)", "pad": 0.02},
            )
            mi = r.get("mutual_info", math.nan)
            ax.set_title(f"{entry}" + ("" if pd.isna(mi) else f" (MI {mi:.2f})"))
            ax.set_xlabel("Expert (none = unrouted)" if extra else "Expert")
            ax.tick_params(axis="y", rotation=0, labelsize=5.5)
            ax.tick_params(axis="x", labelsize=5.5)
            if k % cols:
                ax.set_yticklabels([])
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        layer = panels[0][2]["layer"]
        fig.suptitle(f"{bench}: where each label's tokens go (dispatched top-1), last MoE layer {layer}, lowest seed")
        return [
            self._save(
                fig,
                bench,
                "specialisation",
                f"{bench}: per router, the share of each label's tokens whose highest-weight dispatched "
                f"expert is each expert (rows sum to 100%; 'none' = unrouted), last MoE layer, lowest seed.",
            )
        ]


def _label_shares(r) -> tuple[np.ndarray, list[str], list[str], bool]:
    """A layer's label-by-expert counts as row shares (%) for the heatmap: at most 20 labels (the
    largest), short names, unrouted tokens as a last column 'none' when there are any."""
    mat = np.asarray(r["label_by_expert"], dtype=float)
    unrouted = r.get("label_unrouted")
    extra = isinstance(unrouted, list) and len(unrouted) == len(mat) and sum(unrouted) > 0
    if extra:  # unrouted tokens are their own column
        mat = np.hstack([mat, np.asarray(unrouted, dtype=float)[:, None]])
    names = r.get("labels")
    if not isinstance(names, list) or len(names) != len(mat):
        names = [str(i) for i in range(len(mat))]
    names = [n if len(str(n)) <= 12 else str(n)[:11] + "…" for n in names]
    keep = np.sort(np.argsort(-mat.sum(1))[:20]) if len(mat) > 20 else np.arange(len(mat))
    mat, names = mat[keep], [names[i] for i in keep]
    share = 100 * mat / np.maximum(mat.sum(1, keepdims=True), 1)
    columns = [str(i) for i in range(share.shape[1] - extra)] + (["none"] if extra else [])
    return share, names, columns, extra


PER_LAYER_PANELS = [("load_cv", "Load CV ↓"), ("switch_rate", "Switch rate (%) ↓"), ("mutual_info", "MI (nats) ↑")]


def _pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (x, lower better) and quality (y), sorted by cost."""
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    front: list = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or better(y, front[-1][1]):
            front.append((x, y))
    return front


def _figure(size) -> Figure:
    """A figure whose constrained layout keeps labels and legend inside the column width."""
    return Figure(figsize=size, layout="constrained")


def _headline(lb_b: pd.DataFrame) -> tuple[str, bool]:
    name = lb_b["headline_name"].dropna().iloc[0] if lb_b["headline_name"].notna().any() else "headline"
    hib = bool(lb_b["higher_is_better"].dropna().iloc[0]) if lb_b["higher_is_better"].notna().any() else True
    return name, hib


_PRETTY = {
    "top1": "Top-1 accuracy",
    "top5": "Top-5 accuracy",
    "acc": "Accuracy",
    "accuracy": "Accuracy",
    "mae": "MAE",
    "mse": "MSE",
    "rmse": "RMSE",
    "mean_r1": "Mean R@1",
    "r1": "R@1",
    "recall@1": "R@1",
    "mean_recall@1": "Mean R@1",
    "r@1": "R@1",
    "loss": "Loss",
}


def metric_label(name: str, task: str, hib: bool, values) -> str:
    """Axis label with units: accuracy / recall as fraction or %, brain-age errors in years."""
    key = str(name).lower()
    pretty = _PRETTY.get(key, str(name).replace("_", " "))
    unit = None
    if re.search(r"acc|top\d|r@?\d|recall", key):
        finite = pd.Series(values, dtype=float).dropna()
        unit = "%" if len(finite) and finite.max() > 1.0 else "fraction"
    elif re.search(r"mae|rmse|error", key) and re.search(r"age|brain", f"{task} {key}".lower()):
        unit = "years"
    direction = "higher is better" if hib else "lower is better"
    return f"{pretty} ({unit}; {direction})" if unit else f"{pretty} ({direction})"


def write_plots(rs: RecordSet, lb: pd.DataFrame, out_dir, totals=None) -> list[Plot]:
    """Every figure for the record set; returns what was written, in report order (the performance
    profile across tasks first, when ``totals`` has normalised scores)."""
    if lb.empty:
        return []
    plotter = Plotter(rs, lb, out_dir)
    plots = plotter.all()
    if totals is not None and not totals.run_scores.empty and totals.run_scores["score"].notna().any():
        with sns.axes_style("whitegrid"), mpl.rc_context(RC):
            plots.insert(0, plotter.profile(totals))
    return plots
