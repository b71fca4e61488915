"""One neutral table form (text cells, bold flags, footnotes) rendered to Markdown, LaTeX and HTML, so
every output format shows the same numbers and the same bold best values."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to set in bold
    notes: list[str] = field(default_factory=list)  # footnotes printed under the table
    label: str = ""  # LaTeX \label / HTML id
    left: int = 1  # leading text columns, left-aligned


def to_markdown(table: Table, level: int = 3) -> str:
    def cell(r, c, text):
        text = text.replace("|", "\\|")
        return f"**{text}**" if (r, c) in table.bold and text else text

    out = [f"{'#' * level} {table.title}", ""]
    out.append("| " + " | ".join(c.replace("|", "\\|") for c in table.columns) + " |")
    out.append("|" + "|".join("---" if i < table.left else "--:" for i in range(len(table.columns))) + "|")
    for r, row in enumerate(table.rows):
        out.append("| " + " | ".join(cell(r, c, t) for c, t in enumerate(row)) + " |")
    out.append("")
    out += [f"{n}  " for n in table.notes]
    return "\n".join(out).rstrip() + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_TEX_SYMBOLS = {
    "±": r"$\pm$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "−": "$-$",
    "×": r"$\times$",
    "Δ": r"$\Delta$",
    "–": "--",
    "—": "---",
}


def tex_escape(text: str) -> str:
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    out = re.sub(r"(?<![\w.])-(?=\d)", "−", out)  # a negative number gets a real minus sign
    for sym, rep in _TEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs,graphicx}``); tables of more than
    seven columns span the page (``table*``) scaled to its width."""

    def cell(r, c, text):
        text = tex_escape(text)
        return f"\\textbf{{{text}}}" if (r, c) in table.bold and text else text

    n = len(table.columns)
    spec = "l" * min(table.left, n) + "r" * max(n - table.left, 0)
    wide = n > 7  # wider than a column: span the page (table*) and scale to its width
    env = "table*" if wide else "table"
    out = [f"\\begin{{{env}}}[t]", "\\centering", "\\small", f"\\caption{{{tex_escape(table.title)}}}"]
    if table.label:
        out.append(f"\\label{{{table.label}}}")
    out += [
        ("\\resizebox{\\linewidth}{!}{%\n" if wide else "") + f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(tex_escape(c) for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(cell(r, c, t) for c, t in enumerate(row)) + " \\\\" for r, row in enumerate(table.rows)]
    out.append("\\bottomrule")
    out.append("\\end{tabular}" + ("}" if wide else ""))
    if table.notes:
        out.append("\\par\\smallskip\\footnotesize " + " \\\\{} ".join(tex_escape(n) for n in table.notes))
    out.append(f"\\end{{{env}}}")
    return "\n".join(out) + "\n"


_LEFT = ' class="l"'


def to_html(table: Table, level: int = 3) -> str:
    def cell(r, c, text):
        text, cls = html.escape(text), _LEFT if c < table.left else ""
        return f"<td{cls}><b>{text}</b></td>" if (r, c) in table.bold and text else f"<td{cls}>{text}</td>"

    ident = f' id="{html.escape(table.label)}"' if table.label else ""
    out = [
        f"<h{level}{ident}>{html.escape(table.title)}</h{level}>",
        "<table>",
        "<thead><tr>"
        + "".join(f"<th{_LEFT if i < table.left else ''}>{html.escape(c)}</th>" for i, c in enumerate(table.columns))
        + "</tr></thead>",
        "<tbody>",
    ]
    out += ["<tr>" + "".join(cell(r, c, t) for c, t in enumerate(row)) + "</tr>" for r, row in enumerate(table.rows)]
    out.append("</tbody></table>")
    if table.notes:
        out.append('<p class="notes">' + "<br>".join(html.escape(n) for n in table.notes) + "</p>")
    return "\n".join(out) + "\n"


def slug(text: str) -> str:
    """A file- and label-safe form of ``text`` (plot file names, LaTeX labels): one rule everywhere."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
