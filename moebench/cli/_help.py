"""The formatter every subcommand uses: defaults shown, description kept as written."""

from __future__ import annotations

import argparse
import textwrap

SET_HELP = (
    "set a grid entry without editing the grid file, e.g. --set task_args.data=/data/imagenet, "
    "--set executor.partition=gpu, --set tasks.0.task_args.root=/data/coco (VALUE is YAML; repeatable)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after a flag's help when there is a default worth showing (not None, False
    or empty, and not already stated in the help), and keeps the description's paragraphs."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if (
            "(default" in help
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, (list, str)) and not default)
        ):
            return help
        return super()._get_help_string(action)


def _wrap(text: str) -> str:
    """Fill each paragraph (blank-line separated) to 90 columns; lines starting with spaces stay as written."""
    out = []
    for para in text.strip().split("\n\n"):
        out.append(para if para.startswith(" ") else textwrap.fill(" ".join(para.split()), 90))
    return "\n\n".join(out)


def command(sub, name: str, help: str, description: str | None = None, func=None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter; ``func`` runs it."""
    p = sub.add_parser(name, help=help, description=_wrap(description or help), formatter_class=HelpFormatter)
    if func is not None:
        p.set_defaults(func=func)
    return p
