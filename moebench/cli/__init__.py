"""The ``moebench`` command: one module per subcommand (``add_parser`` + ``run``), lm-eval style.

Each subcommand module imports only argparse at the top, and its heavy imports (torch, pandas,
submitit) inside ``run``, so ``moebench --help`` and ``moebench routers`` start fast.
"""

from __future__ import annotations

import argparse
import sys

from moebench.cli import bench, cancel, grid, report, routers, run, status, tasks, train
from moebench.version import __version__

COMMANDS = (run, grid, status, cancel, report, train, routers, tasks, bench)

DESCRIPTION = """\
Compare Mixture-of-Experts routers under matched conditions (same data, seeds, budget and active
FLOPs per token). Start with `moebench run`: it runs the shipped `quick` grid on the offline
defaults and writes a report to results/quick/report/."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moebench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"moebench {__version__}")
    sub = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`moebench COMMAND --help` describes each"
    )
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
