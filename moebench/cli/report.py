"""``moebench report``: leaderboards, paired comparisons and plots from a results folder's records."""

from __future__ import annotations

import sys

from moebench.cli._help import command

FORMATS = "md,csv,html,tex"


def add_parser(sub) -> None:
    p = command(
        sub,
        "report",
        "leaderboards, paired comparisons and plots from run records",
        description="Read the run records (final.json, metrics.jsonl) under RESULTS and write "
        "the leaderboard (mean and 95% CI over seeds per router), per-seed paired "
        "differences against the softmax-topk baseline, ranks across tasks and plots, "
        "as Markdown, CSV, HTML and LaTeX. `moebench run` writes it at the end; run "
        "this to rebuild it. See the README section 'Reading the report'.",
        func=run,
    )
    p.add_argument(
        "results",
        nargs="?",
        default="results",
        help="a grid's results folder (e.g. results/quick), or a folder of grid folders",
    )
    p.add_argument("--out", default=None, help="folder to write the report into (default: RESULTS/report)")
    p.add_argument("--format", default=FORMATS, help="comma-separated output formats, any of " + FORMATS)


def run(args) -> int:
    from moebench.report.build import ReportError, write_report

    formats = [f.strip() for f in str(args.format).split(",") if f.strip()]
    print(
        f"moebench report: reading the run records under {args.results} and drawing the plots (under a minute for the committed sample on 2 cores)",
        file=sys.stderr,
        flush=True,
    )
    try:
        out = write_report(args.results, args.out, formats)
    except (ReportError, FileNotFoundError) as err:
        print(f"moebench report: {err}", file=sys.stderr)
        return 2
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(files)} files to {out}:")
    for p in files:
        print(f"  {p.relative_to(out)}")
    return 0
