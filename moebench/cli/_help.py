"""The formatter every subcommand uses: defaults shown, description kept as written."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after each flag's help, and keeps the description's line breaks."""


def command(sub, name: str, help: str, description: str | None = None, func=None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter; ``func`` runs it."""
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    if func is not None:
        p.set_defaults(func=func)
    return p
