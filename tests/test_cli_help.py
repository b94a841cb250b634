"""Every option of every ``edgecap`` command explains itself: help text, and the default shown
where there is one; ``convert --help`` names what the converter keeps in FP32 from its own
constants; ``build --max-beam`` and ``caption --beam-size`` tell the same story."""

from __future__ import annotations

import argparse

import pytest

from edgecap import cli
from edgecap.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The rendered help of one option, as ``--help`` prints it (one line)."""
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split())


def test_every_command_is_walked():
    assert set(_commands()) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    missing, hidden = [], []
    for action in _options(parser):
        name = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(name)
            continue
        default = action.default
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS:
            continue  # nothing to show: the help says what happens without the option
        if str(default) not in _help_of(parser, action):
            hidden.append(f"{name} (default {default!r})")
    assert not missing, f"edgecap {command}: options without help: {missing}"
    assert not hidden, f"edgecap {command}: defaults not shown: {hidden}"


def test_help_shows_the_default_after_the_text(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from edgecap.decoding import CaptionOptions

    assert f"(default: {CaptionOptions().beam_size})" in text
    assert f"(default: {CaptionOptions().batch_size})" in text
    assert "--threads N" in text and "--no-progress" in text


@pytest.mark.parametrize("command", ["caption", "eval", "serve"])
def test_backend_choices_list_the_default_first(command, capsys):
    """--backend's choices read its default, auto, first and then the three backends, in the
    error for a backend there is not and in --help."""
    import re

    with pytest.raises(SystemExit):
        main([command, "--backend", "cuda"])
    said = re.search(r"invalid choice: 'cuda' \(choose from (.*)\)$", capsys.readouterr().err.strip())
    choices = said.group(1).replace("'", "").split(", ")  # quoted before Python 3.12
    assert choices[0] == "auto" and sorted(choices[1:]) == ["onnxruntime", "tensorrt", "torch"]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"--backend {{{','.join(choices)}}}" in capsys.readouterr().out


def test_convert_help_lists_what_the_converter_keeps_in_fp32(monkeypatch):
    from edgecap.build import convert as converter
    from edgecap.commands.convert import precision_help

    text = precision_help()
    for op in converter.FP32_OP_TYPES:
        assert op in text
    assert f"first {converter.ENCODER_FP32_BLOCKS} blocks" in text
    assert f"first {converter.INT8_ENCODER_FP32_BLOCKS} blocks" in text
    # read from the converter's constants, not written again
    monkeypatch.setattr(converter, "ENCODER_FP32_BLOCKS", 7)
    monkeypatch.setattr(converter, "FP32_OP_TYPES", (*converter.FP32_OP_TYPES, "Erf"))
    changed = precision_help()
    assert "first 7 blocks" in changed and "Erf" in changed


def test_the_fp32_blocks_are_the_measured_rule_the_docs_state():
    """docs/precision.md states the rule its table measured: FP16 keeps the encoder's stem and
    first 4 blocks in FP32 (97.6% captions identical to FP32, the rule's row), static int8 its
    stem and blocks 0-1; ``convert --help`` says it from the constants, so they must be these."""
    import re
    from pathlib import Path

    from edgecap.build import convert as converter

    text = (Path(__file__).parents[1] / "docs" / "precision.md").read_text()
    fp16 = {int(n) for n in re.findall(r"stem and first (\d+) blocks", text)}
    int8 = {int(n) + 1 for n in re.findall(r"stem, blocks 0-(\d+)", text)}
    assert fp16 == {converter.ENCODER_FP32_BLOCKS}
    assert int8 == {converter.INT8_ENCODER_FP32_BLOCKS}


def test_build_and_caption_agree_on_beams_and_engines():
    from edgecap.api import default_model_dir
    from edgecap.contract import Limits
    from edgecap.manifest import load_manifest

    top_k = load_manifest(default_model_dir()).dims.top_k
    commands = _commands()
    build = {a.dest: a for a in _options(commands["build"])}
    caption = {a.dest: a for a in _options(commands["caption"])}
    assert build["max_beam"].default == Limits().max_beam
    assert build["max_batch"].default == Limits().max_batch
    beam_help = _help_of(commands["caption"], caption["beam_size"])
    max_beam_help = _help_of(commands["build"], build["max_beam"])
    # both give the shipped model's real top_k, and what a larger request does to the engines
    for text in (beam_help, max_beam_help):
        assert f"top_k ({top_k} for the shipped model)" in text
        assert "builds engines for exactly its own beam and batch on first use" in text
    assert f"{Limits().max_beam} beams x {Limits().max_batch} images" in beam_help


def test_build_refuses_more_beams_than_the_model_searches(capsys):
    from edgecap.api import default_model_dir
    from edgecap.manifest import load_manifest

    top_k = load_manifest(default_model_dir()).dims.top_k
    assert main(["build", "--max-beam", str(2 * top_k + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--max-beam {2 * top_k + 1}" in err and f"at most {top_k} beams" in err


@pytest.mark.parametrize(
    "flag, stated, highest, too_high",
    [
        ("--max-length", "1 to 200", "200", "201"),
        ("--no-repeat-ngram", "at most 10", "10", "11"),
        ("--guidance-bonus", "0 to 10", "10", "10.5"),
        ("--fusion-weight", "0 to 2", "2", "2.5"),
        ("--length-penalty", "0 to 2", "2", "2.5"),
        ("--batch-size", "1 to 64", "64", "65"),
    ],
)
def test_caption_help_states_the_range_the_option_takes(flag, stated, highest, too_high, capsys):
    """--help is the reference: the range it states is the one the command accepts."""
    from edgecap.commands._options import caption_options

    parser = _commands()["caption"]
    action = next(a for a in _options(parser) if flag in a.option_strings)
    assert stated in " ".join(_help_of(parser, action).split())
    caption_options(parser.parse_args([flag, highest, "photo.jpg"])).validate(10)  # accepted
    with pytest.raises(ValueError):
        caption_options(parser.parse_args([flag, too_high, "photo.jpg"])).validate(10)


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-fusion", "--fusion-weight", "1"],
        ["--fusion-weight", "1", "--no-fusion"],
        ["--no-objects-guidance", "--guidance-bonus", "3"],
        ["--guidance-bonus", "3", "--no-objects-guidance"],
    ],
)
@pytest.mark.parametrize("command", ["caption", "eval", "serve"])
def test_contradictory_options_are_refused_not_last_one_wins(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, *flags])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_option_errors_name_the_flag_a_user_typed():
    from edgecap.commands._options import in_flag_words

    args = build_parser().parse_args(["caption", "photo.jpg"])
    said = "beam_size must be between 1 and 10 (the model's top_k: its graph returns 10 best words), got 0"
    assert in_flag_words(said, args) == (
        "--beam-size must be between 1 and 10 (the model's top_k: its graph returns 10 best words), got 0"
    )
    assert (
        in_flag_words("length_penalty must be None or a number in [0, 2], got 5.0", args)
        == "--length-penalty must be a number in [0, 2], got 5.0"
    )
    assert in_flag_words("no_repeat_ngram must be between 0 (off) and 4", args).startswith(
        "--no-repeat-ngram must"
    )
    # a path or a file name that holds a field's name is left as it is
    assert in_flag_words("/data/beam_size/x.json: beam_size must be 1, see beam_size.txt", args) == (
        "/data/beam_size/x.json: --beam-size must be 1, see beam_size.txt"
    )
    # a field the command has no flag for keeps its name (caption has no --n-best)
    assert in_flag_words("n_best must be between 1 and beam_size (3), got 4", args) == (
        "n_best must be between 1 and --beam-size (3), got 4"
    )


def test_caption_takes_the_length_penalty_as_eval_does():
    from edgecap.commands._options import caption_options

    eval_args = ["--references", "refs.json", "--images", "photos"]
    for command, rest in (("caption", []), ("serve", []), ("eval", eval_args)):
        args = build_parser().parse_args([command, *rest, "--length-penalty", "0.7"])
        assert caption_options(args).length_penalty == 0.7
        assert caption_options(build_parser().parse_args([command, *rest])).length_penalty is None


@pytest.mark.parametrize("command", ["caption", "eval", "serve"])
def test_the_no_flags_are_their_option_at_zero(command):
    """--help: --no-objects-guidance is --guidance-bonus 0, --no-fusion is --fusion-weight 0;
    without either, CaptionOptions' defaults (the model's own fusion weight: None)."""
    from edgecap.commands._options import caption_options
    from edgecap.decoding import CaptionOptions

    rest = ["--references", "refs.json", "--images", "photos"] if command == "eval" else []
    parse = lambda *flags: caption_options(build_parser().parse_args([command, *rest, *flags]))  # noqa: E731
    assert parse("--no-objects-guidance").guidance_bonus == 0.0
    assert parse("--no-fusion").fusion_weight == 0.0
    plain = parse()
    assert plain.guidance_bonus == CaptionOptions().guidance_bonus != 0.0
    assert plain.fusion_weight is None


def test_build_help_names_the_engine_cache_it_uses(monkeypatch, tmp_path):
    """engines/README.md: the engine cache is $EDGECAP_CACHE/engines when set, otherwise
    $XDG_CACHE_HOME/edgecap/engines, by default ~/.cache/edgecap/engines; `edgecap build
    --help` (the reference, docs/cli.md) says the same, in that order, and each is the
    directory used. Before the fix the help left out $XDG_CACHE_HOME, where the engines go on
    a system that sets it."""
    from edgecap.trt.engines import default_cache_dir

    parser = _commands()["build"]
    action = next(a for a in _options(parser) if "--out" in a.option_strings)
    assert " ".join(_help_of(parser, action).split()) == (
        "engine cache directory (default: $EDGECAP_CACHE/engines, else "
        "$XDG_CACHE_HOME/edgecap/engines, else ~/.cache/edgecap/engines)"
    )
    monkeypatch.setenv("EDGECAP_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own" / "engines"
    monkeypatch.delenv("EDGECAP_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "edgecap" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "edgecap" / "engines"


def test_no_overlap_says_where_it_changes_nothing():
    """``caption`` and ``eval`` overlap a call's batches, and ``--no-overlap`` turns that off;
    ``serve`` searches each batch of requests as one batch: its ``--no-overlap`` (taken, so that
    one command line serves all three) says it has no effect there."""
    helps = {}
    for name in ("caption", "eval", "serve"):
        parser = _commands()[name]
        action = next(a for a in _options(parser) if "--no-overlap" in a.option_strings)
        helps[name] = _help_of(parser, action)
    assert helps["caption"] == helps["eval"] and helps["caption"].startswith("build each batch's captions")
    assert helps["serve"].startswith("no effect here") and "--max-batch" in helps["serve"]
