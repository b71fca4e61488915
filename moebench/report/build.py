"""`moebench report`: run records -> leaderboards (Markdown, CSV, LaTeX), plots (PNG, PDF) and one
self-contained report.html.

Pieces (``moebench.report.*``): ``load`` reads records, ``items`` reads per-item evaluations,
``tables`` aggregates and lays out tables (its ``COLUMNS`` is the one catalogue of column labels),
``stats`` computes intervals, Holm correction and rank groups, ``equivalence`` the TOST and
P(improve), ``agreement`` cross-seed routing agreement, ``aggregate`` the summary across tasks,
``claims`` the claims audit, ``cost_table`` the cost table, ``structure`` the structure-recovery
section, ``summary`` writes the key findings, ``render`` writes tables per format, ``plots`` draws,
``html`` assembles the page. Missing runs are detected from ``<results>/<grid>/expected.json``
written by the launcher (see ``load``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moebench.report.aggregate import Summary, summarise, summary_table
from moebench.report.agreement import add_seed_agreement
from moebench.report.claims import Audit, audit
from moebench.report.cost_table import cost_table
from moebench.report.items import load_headline_items
from moebench.report.load import RecordSet, load_record_set, load_records  # noqa: F401  (public API)
from moebench.report.render import Table, to_latex, to_markdown
from moebench.report.summary import claim_findings, collapse_findings, key_findings, reproducibility
from moebench.report.tables import (
    add_intervals,
    leaderboard_frame,
    leaderboard_tables,
    paired_frame,
    paired_table,
    rank_frame,
    rank_table,
    unfinished_table,
)

FORMATS = ("md", "csv", "html", "tex")
ACROSS = "(all tasks)"  # the bench of figures drawn across tasks (performance profiles)
BASELINE = "softmax-topk"
REFERENCE_ROUTERS = ("softmax-topk", "switch")  # the claims audit compares against each label of these


class ReportError(RuntimeError):
    """Nothing to report, or a bad request (unknown format)."""


@dataclass
class Report:
    """Everything the writers need: the records, the numeric frames and the display tables."""

    rs: RecordSet
    leaderboard: pd.DataFrame
    ranks: pd.DataFrame
    paired: pd.DataFrame
    bench_tables: list[tuple[str, list[Table]]]
    overall: list[Table]
    unfinished: Table | None
    summary: list[str]
    findings: list[str]
    repro: list[tuple[str, str]]
    claims: Audit
    totals: Summary
    headline_tables: list[Table]  # the claims audit and the summary table: the top of the report
    task_notes: list[str]  # the long per-task paragraphs, placed below the tables


def build_report(results_dir, baseline: str = BASELINE) -> Report:
    rs = load_record_set(results_dir)
    if rs.runs.empty:
        raise ReportError(
            f"no run records under {rs.root} (looked for <grid>/<run_id>/ folders holding "
            f"spec.yaml, status.json, final.json or metrics.jsonl); run a grid first or pass "
            f"the results folder it wrote to"
        )
    add_seed_agreement(rs.runs, rs.layers, rs.problems)
    items = load_headline_items(rs.runs, rs.problems)
    lb = add_intervals(leaderboard_frame(rs), rs, items, baseline)
    ranks = rank_frame(lb)
    paired = paired_frame(rs, lb, baseline, items=items) if not lb.empty else pd.DataFrame()
    bench_tables = leaderboard_tables(lb) if not lb.empty else []
    for bench, tables in bench_tables:
        cost = cost_table(bench, lb[lb["bench"] == bench])
        if cost is not None:
            tables.append(cost)
    overall = _overall_tables(rs, lb, ranks, paired, baseline)
    from moebench.report.structure import structure_section

    structure_tables, structure_lines = structure_section(rs, lb, items) if not lb.empty else ([], [])
    overall += structure_tables
    summary = _summary_lines(rs)
    refs = {baseline: paired}
    for ref in sorted(set(rs.runs.loc[rs.runs["router"].isin(REFERENCE_ROUTERS), "label"].dropna()) - {baseline}):
        refs[ref] = paired_frame(rs, lb, ref, items=items) if not lb.empty else pd.DataFrame()
    claims = audit(rs.runs, rs.layers, lb, refs) if not lb.empty else Audit(pd.DataFrame(), None, [])
    totals = summarise(lb, rs.runs)
    headline_tables = [t for t in (claims.table, summary_table(totals)) if t is not None]
    task_notes = key_findings(lb, paired, baseline)
    return Report(
        rs,
        lb,
        ranks,
        paired,
        bench_tables,
        overall,
        unfinished_table(rs.runs),
        summary,
        claim_findings(claims.verdicts, totals, paired, baseline)
        + collapse_findings(lb)
        + [f"Structure recovery, {line}" for line in structure_lines],
        reproducibility(rs.runs, rs.root, lb),
        claims,
        totals,
        headline_tables,
        task_notes,
    )


def _overall_tables(rs: RecordSet, lb: pd.DataFrame, ranks: pd.DataFrame, paired: pd.DataFrame, baseline: str):
    """The tables across tasks: average ranks and the paired comparison (or a problem saying why not)."""
    overall = []
    if not ranks.empty:
        overall.append(rank_table(ranks, lb))
    if not lb.empty:
        if not paired.empty:
            overall.append(paired_table(paired, baseline))
        elif baseline not in set(lb["label"]):
            rs.problems.append(f"no runs labelled {baseline!r}: the paired comparison against it is skipped")
        else:
            rs.problems.append(
                f"no task has finished seeds of both {baseline} and another router at the same "
                f"sweep point: the paired comparison is skipped"
            )
    return overall


def _summary_lines(rs: RecordSet) -> list[str]:
    """The report's opening lines: the folder, runs per state, how missing runs were found."""
    states = rs.runs["state"].value_counts()
    return [
        f"Results folder: {rs.root}",
        f"{len(rs.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in states.sort_index().items()),
        "Missing runs: "
        + (
            f"{int(states.get('missing', 0))} (checked against the expected.json of grid(s) "
            f"{', '.join(sorted(rs.grids_with_expected))})"
            if rs.grids_with_expected
            else "no expected.json found, so only seeds that other routers of the same task have are detected"
        ),
    ]


def write_report(results_dir, out_dir=None, formats=FORMATS, baseline: str = BASELINE, plots: bool = True) -> Path:
    """Write the report into ``out_dir`` (default ``<results_dir>/report``) and return that folder.
    Plots (``plots/*.png|pdf``) are drawn when ``plots`` and the formats include md or html, which show
    them; csv / tex alone skip the slow part."""
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ReportError(f"unknown report format(s) {unknown}; choose from {', '.join(FORMATS)}")
    rep = build_report(results_dir, baseline)
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plots and {"md", "html"} & set(formats):
        from moebench.report.plots import write_plots  # seaborn / matplotlib only when drawing

        figures = write_plots(rep.rs, rep.leaderboard, out / "plots", rep.totals)
    if "csv" in formats:
        _write_csvs(rep, out)
    if "md" in formats:
        (out / "leaderboard.md").write_text(_markdown(rep, figures, out), encoding="utf-8")
    if "tex" in formats:
        (out / "leaderboard.tex").write_text(_latex(rep), encoding="utf-8")
    if "html" in formats:
        from moebench.report.html import render_page

        page = render_page(
            f"moebench report: {Path(results_dir).resolve().name}",
            rep.summary,
            rep.rs.problems,
            rep.bench_tables,
            rep.overall,
            figures,
            [rep.unfinished] if rep.unfinished else [],
            findings=rep.findings,
            repro=rep.repro,
            top=rep.headline_tables,
            task_notes=rep.task_notes,
        )
        (out / "report.html").write_text(page, encoding="utf-8")
    return out


def _write_csvs(rep: Report, out: Path) -> None:
    rep.leaderboard.to_csv(out / "leaderboard.csv", index=False)
    rep.ranks.to_csv(out / "ranks.csv", index=False)
    rep.paired.to_csv(out / "paired.csv", index=False)
    rep.claims.frame.to_csv(out / "claims.csv", index=False)
    rep.totals.table.to_csv(out / "summary.csv", index=False)
    runs = rep.rs.runs.drop(columns=["sweep"], errors="ignore").copy()
    for col in [c for c in runs if c == "collapsed" or c.startswith("collapsed.")]:
        runs[col] = runs[col].map(lambda v: None if pd.isna(v) else bool(v)).astype("boolean")  # True / False
    if not rep.paired.empty:  # each run carries its group's verdicts against the baseline
        cols = ["tost", "p_improve", "p_improve_low", "p_improve_high"]
        runs = runs.merge(
            rep.paired[["bench", "label", "variant"] + cols], on=["bench", "label", "variant"], how="left"
        )
    runs.to_csv(out / "runs.csv", index=False)


def _markdown(rep: Report, figures, out: Path) -> str:
    parts = ["# moebench leaderboard", "", *[f"{s}  " for s in rep.summary], ""]
    for t in rep.headline_tables:
        parts.append(to_markdown(t, level=2))
    parts += [f"![{f.caption}]({f.png.relative_to(out).as_posix()})" for f in figures if f.bench == ACROSS]
    if rep.findings:
        parts += ["", "## Key findings", "", *[f"- {f}" for f in rep.findings], ""]
    if rep.repro:
        parts += ["## Reproducibility", "", *[f"- **{k}:** {v}" for k, v in rep.repro], ""]
    if rep.rs.problems:
        parts += ["## Problems with records", "", *[f"- {' '.join(p.split())}" for p in rep.rs.problems], ""]
    if rep.overall:
        parts += ["## Across tasks", ""] + [to_markdown(t) for t in rep.overall]
    if rep.task_notes:
        parts += ["## Per task, in words", "", *[f"- {f}" for f in rep.task_notes], ""]
    for bench, tables in rep.bench_tables:
        parts += [f"## Task: {bench}", ""] + [to_markdown(t) for t in tables]
        parts += [f"![{f.caption}]({f.png.relative_to(out).as_posix()})" for f in figures if f.bench == bench]
        parts.append("")
    if rep.unfinished:
        parts.append(to_markdown(rep.unfinished, level=2))
    return "\n".join(parts).rstrip() + "\n"


def _latex(rep: Report) -> str:
    head = ["% moebench leaderboard tables; needs \\usepackage{booktabs,graphicx}", ""]
    tables = rep.headline_tables + rep.overall + [t for _, ts in rep.bench_tables for t in ts]
    return "\n".join(head) + "\n".join(to_latex(t) for t in tables)
