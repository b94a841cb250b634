"""Every option of every benchmark script explains itself, as every option of ``edgecap`` does
(tests/test_cli_help.py): help text, and the default shown where there is one. The scripts are
found, not listed: each ``benchmarks/*.py`` that runs as a command (a ``__main__`` block; the
``_*.py`` helpers left out) must expose ``build_parser()``, and its ``--help`` prints that
parser. The caption language model's trainer (``python -m edgecap.training.language_model``,
and its ``install``) is held to the same."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

LANGUAGE_MODEL = "edgecap.training.language_model"


def _scripts() -> list[str]:
    return sorted(
        path.stem
        for path in BENCH.glob("*.py")
        if not path.name.startswith("_") and "__main__" in path.read_text("utf-8")
    )


def _root_parser(name: str) -> argparse.ArgumentParser:
    if name == f"{LANGUAGE_MODEL} install":
        return importlib.import_module(LANGUAGE_MODEL).build_install_parser()
    module = importlib.import_module(name)
    assert hasattr(module, "build_parser"), (
        f"{name}: expose build_parser() (its parser, from _common.argument_parser) so that its "
        "--help is checked here"
    )
    return module.build_parser()


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of ``parser`` and of each of its subcommands, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The rendered help of one option, as ``--help`` prints it (one line)."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _shown(default) -> list[str]:
    """How ``default`` may read in the help: as argparse formats it, or for a list as it is typed
    (``--clients 1 4 16``)."""
    forms = [str(default)]
    if isinstance(default, list | tuple):
        forms.append(" ".join(map(str, default)))
    return forms


def _problems(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """-> (options without help, options whose default the help does not show)."""
    missing, hidden = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing += [
                f"{a.dest} (subcommand)" for a in action._choices_actions if not (a.help or "").strip()
            ]
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        text = _help_of(parser, action) if action.help and action.help != argparse.SUPPRESS else ""
        if not text.split("(default")[0].strip():  # nothing, or only the default
            missing.append(name)
            continue
        default = action.default
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS:
            continue  # nothing to show: the help says what happens without the option
        if not any(form in text for form in _shown(default)):
            hidden.append(f"{name} (default {default!r})")
    return missing, hidden


def test_the_scripts_are_found():
    scripts = _scripts()
    assert {"latency", "e2e", "throughput", "gpu_check", "device_search"} <= set(scripts)
    assert not any(name.startswith("_") for name in scripts)


@pytest.mark.parametrize("name", [*_scripts(), LANGUAGE_MODEL, f"{LANGUAGE_MODEL} install"])
def test_every_option_has_help_and_shows_its_default(name):
    for label, parser in _parsers(_root_parser(name), name):
        missing, hidden = _problems(parser)
        assert not missing, f"{label}: options without help: {missing}"
        assert not hidden, f"{label}: defaults not shown: {hidden}"


@pytest.mark.parametrize("name", _scripts())
def test_help_prints_the_checked_parser(name, capsys):
    """``python benchmarks/NAME.py --help`` runs and prints ``build_parser()``'s help (so the
    parser checked above is the one the script parses with), and nothing is measured."""
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out == module.build_parser().format_help()


def test_language_model_help_prints_the_checked_parsers(capsys):
    module = importlib.import_module(LANGUAGE_MODEL)
    for argv, parser in (
        (["--help"], module.build_parser()),
        (["install", "--help"], module.build_install_parser()),
    ):
        with pytest.raises(SystemExit) as done:
            module.main(argv)
        assert done.value.code == 0
        assert capsys.readouterr().out == parser.format_help()


def test_a_default_is_shown_after_the_text():
    latency = importlib.import_module("latency")
    parser = latency.build_parser()
    beams = next(a for a in parser._actions if "--beams" in a.option_strings)
    assert _help_of(parser, beams).endswith(f"(default: {','.join(map(str, latency.BEAMS))})")
