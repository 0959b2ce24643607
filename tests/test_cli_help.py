"""``xsml --help`` and every subcommand's help: plain text, every option explained."""

from __future__ import annotations

import argparse

import pytest

from bluesky_xsml.cli import SUBCOMMANDS, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _problems(parser: argparse.ArgumentParser, where: str) -> list[str]:
    problems = []
    for text in (parser.description, parser.epilog):
        if text and "``" in text:
            problems.append(f"{where}: reStructuredText markup in {text!r}")
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if action.help is argparse.SUPPRESS:
            continue
        if not action.help:
            problems.append(f"{where} {name}: no help text")
        elif "``" in action.help:
            problems.append(f"{where} {name}: reStructuredText markup in {action.help!r}")
    return problems


def test_top_level_help_is_plain_text(capsys):
    parser = build_parser()
    assert _problems(parser, "xsml") == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    for name in SUBCOMMANDS:
        assert name in out


def test_every_subcommand_option_has_plain_help():
    parser = build_parser(SUBCOMMANDS)
    subs = _subparsers(parser)
    assert set(subs) == set(SUBCOMMANDS)
    problems = []
    for name, sub in subs.items():
        # each subcommand adds options; a module that adds none would slip through unchecked
        assert len(sub._actions) > 1, name
        problems += _problems(sub, f"xsml {name}")
    assert problems == []


def test_problems_are_found():
    """The checker itself catches a bare option and markup (so a pass above means something)."""
    parser = argparse.ArgumentParser(description="The ``xsml`` command")
    parser.add_argument("--bare")
    parser.add_argument("--marked", help="see ``xsml demo``")
    found = _problems(parser, "p")
    assert len(found) == 3
