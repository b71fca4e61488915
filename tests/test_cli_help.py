"""Every command has a real description and every flag says what it does (issue 13)."""

import argparse

from moebench.cli import build_parser


def _parsers(parser, path=("moebench",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_command_has_a_description_and_every_flag_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        if len(path) > 1 and len((parser.description or "").split()) < 4:
            missing.append(f"{' '.join(path)}: description {parser.description!r}")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


def test_help_shows_defaults_and_choices():
    parsers = dict(_parsers(build_parser()))
    train = parsers[("moebench", "train")].format_help()
    assert "{tiny,quick}" in train and "(default: quick)" in train
    run = parsers[("moebench", "run")].format_help()
    assert "{local,slurm,debug}" in run and "(default: quick, then structure)" in " ".join(run.split())
    for path, parser in parsers.items():  # no noise such as "(default: None)"
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, path
    assert "(default: the preset's for --size)" in " ".join(train.split())  # said once, not twice
    assert "--size) (default" not in " ".join(train.split())
