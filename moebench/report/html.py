"""The self-contained report.html: every table and every figure (PNG embedded as base64) in one file
that can be mailed or attached to a paper review without its folder."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

from moebench.report.plots import Plot
from moebench.report.render import Table, slug, to_html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1320px;margin:1.5em auto;
     padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{white-space:normal;vertical-align:bottom;max-width:9em}
th.l,td.l{text-align:left}
thead th{border-bottom:2px solid #444}
.notes{font-size:12px;color:#555;max-width:1100px}
.problems{background:#fff4e5;border-left:4px solid #e69500;padding:.5em 1em;font-size:13px}
.findings{background:#eef6ee;border-left:4px solid #3a7d44;padding:.5em 1em}
.repro td{text-align:left;white-space:normal;font-size:12px}
nav ul{columns:2;font-size:14px}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top;max-width:620px}
figure img{width:100%;max-width:620px}
figure.wide{max-width:100%}
figure.wide img{max-width:100%;width:auto}
figcaption{font-size:12px;color:#444}
details{margin:.5em 0}
summary{cursor:pointer;font-weight:600}
.wrap{overflow-x:auto}
.top td{white-space:normal;min-width:5em;vertical-align:top}
.top td.l{min-width:9em;max-width:22em}
.claims td:nth-last-child(-n+2),.claims th:nth-last-child(-n+2){text-align:left;min-width:14em}
"""


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png.read_bytes()).decode("ascii")
    wide = ' class="wide"' if plot.kind in ("specialisation", "stability", "load", "per_layer") else ""
    return (
        f'<figure{wide}><img alt="{html.escape(plot.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(plot.caption)} "
        f"(<code>{html.escape(plot.pdf.name)}</code>)</figcaption></figure>"
    )


def _anchor(text: str) -> str:
    return "sec-" + slug(text)


def render_page(
    title: str,
    summary: list[str],
    problems: list[str],
    per_bench: list[tuple[str, list[Table]]],
    overall: list[Table],
    plots: list[Plot],
    extra: list[Table],
    findings: list[str] | None = None,
    repro: list[tuple[str, str]] | None = None,
    top: list[Table] | None = None,
    task_notes: list[str] | None = None,
) -> str:
    top = top or []
    sections = (
        [t.title for t in top]
        + (["Key findings"] if findings else [])
        + (["Reproducibility"] if repro else [])
        + (["Problems with records"] if problems else [])
        + (["Across tasks"] if overall else [])
        + (["Per task, in words"] if task_notes else [])
        + [f"Task: {b}" for b, _ in per_bench]
        + [t.title for t in extra]
    )
    out = _page_head(title, summary, sections)
    for t in top:
        kind = " claims" if t.label == "tab:claims" else ""
        out.append(f'<div class="wrap top{kind}" id="{_anchor(t.title)}">{to_html(t, level=2)}</div>')
    out += [_figure(p) for p in plots if p.kind == "profile"]
    out += _text_sections(findings, repro, problems)
    if overall:
        out.append(f'<h2 id="{_anchor("Across tasks")}">Across tasks</h2>')
        out += [f'<div class="wrap">{to_html(t)}</div>' for t in overall]
    if task_notes:
        out.append(
            f'<h2 id="{_anchor("Per task, in words")}">Per task, in words</h2>'
            + "".join(f"<p>{html.escape(f)}</p>" for f in task_notes)
        )
    for bench, tables in per_bench:
        out += _bench_section(bench, tables, [p for p in plots if p.bench == bench])
    for t in extra:
        out.append(f'<div class="wrap" id="{_anchor(t.title)}">{to_html(t, level=2)}</div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _page_head(title: str, summary: list[str], sections: list[str]) -> list[str]:
    """Doctype, title, the summary lines with the time of generation, and the contents."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{'<br>'.join(html.escape(s) for s in summary)}<br>Generated "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.</p>",
        "<nav><b>Contents</b><ul>"
        + "".join(f'<li><a href="#{_anchor(s)}">{html.escape(s)}</a></li>' for s in sections)
        + "</ul></nav>",
    ]


def _text_sections(findings: list[str] | None, repro: list[tuple[str, str]] | None, problems: list[str]) -> list[str]:
    """Key findings, reproducibility and problems with records (each only when there is any)."""
    out = []
    if findings:
        out.append(
            f'<h2 id="{_anchor("Key findings")}">Key findings</h2><div class="findings"><ul>'
            + "".join(f"<li>{html.escape(f)}</li>" for f in findings)
            + "</ul></div>"
        )
    if repro:
        out.append(
            f'<h2 id="{_anchor("Reproducibility")}">Reproducibility</h2><table class="repro"><tbody>'
            + "".join(
                f'<tr><td class="l"><b>{html.escape(k)}</b></td><td class="l">{html.escape(v)}</td></tr>'
                for k, v in repro
            )
            + "</tbody></table>"
        )
    if problems:
        out.append(
            f'<div class="problems" id="{_anchor("Problems with records")}"><b>Problems with records</b><ul>'
            + "".join(f"<li>{html.escape(p)}</li>" for p in problems)
            + "</ul></div>"
        )
    return out


def _bench_section(bench: str, tables: list[Table], mine: list[Plot]) -> list[str]:
    """One task: its tables, its figures, and the per-expert heatmaps folded away."""
    out = [f'<h2 id="{_anchor("Task: " + bench)}">Task: {html.escape(bench)}</h2>']
    out += [f'<div class="wrap">{to_html(t)}</div>' for t in tables]
    out += [_figure(p) for p in mine if p.kind not in ("specialisation", "load")]
    folded = [p for p in mine if p.kind in ("specialisation", "load")]
    if folded:
        out.append(
            "<details><summary>Per-expert load and specialisation heatmaps "
            f"({len(folded)} figure{'s' if len(folded) > 1 else ''})</summary>"
            + "".join(_figure(p) for p in folded)
            + "</details>"
        )
    return out
