"""The self-contained report.html: every table and every figure (PNG embedded as base64) in one file
that can be mailed or attached to a paper review without its folder."""
from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

from moebench.report.plots import Plot
from moebench.report.render import Table, to_html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th.l,td.l{text-align:left}
thead th{border-bottom:2px solid #444}
.notes{font-size:12px;color:#555;max-width:1000px}
.problems{background:#fff4e5;border-left:4px solid #e69500;padding:.5em 1em;font-size:13px}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top;max-width:520px}
figure img{width:100%;max-width:520px}
figcaption{font-size:12px;color:#444}
.wrap{overflow-x:auto}
"""


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(plot.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(plot.caption)} "
            f'(<code>{html.escape(plot.pdf.name)}</code>)</figcaption></figure>')


def render_page(title: str, summary: list[str], problems: list[str], per_bench: list[tuple[str, Table]],
                overall: list[Table], plots: list[Plot], extra: list[Table]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p>{'<br>'.join(html.escape(s) for s in summary)}<br>Generated "
           f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.</p>"]
    if problems:
        out.append('<div class="problems"><b>Problems with records</b><ul>'
                   + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul></div>")
    if overall:
        out.append("<h2>Across tasks</h2>")
        out += [f'<div class="wrap">{to_html(t)}</div>' for t in overall]
    for bench, table in per_bench:
        out.append(f"<h2>Task: {html.escape(bench)}</h2>")
        out.append(f'<div class="wrap">{to_html(table)}</div>')
        out += [_figure(p) for p in plots if p.bench == bench]
    for t in extra:
        out.append(f'<div class="wrap">{to_html(t, level=2)}</div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
