"""Output framing of ``edgecap caption`` (issue 16, class 4): a file name cannot forge a record,
output is always valid UTF-8 / JSON, a closed pipe stops quietly, an unwritable output is exit 2.

Every hostile file name is made here, in tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap.commands.output import EXIT_PIPE_CLOSED, caption_fields, escape_field, json_line, print_result

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file names and pipes")


def _photo(path, shade: int = 90):
    Image.fromarray(np.full((24, 32, 3), shade, np.uint8)).save(path, format="PNG")
    return path


def cli(*args, model, env=ENV, stdout=subprocess.PIPE):
    return subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", *args, "--model", str(model), "--max-length", "4"],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
    )


def _unescape(field: str) -> bytes:
    """The reverse of the documented rules, written independently: -> the file name's bytes."""
    out, i = bytearray(), 0
    while i < len(field):
        c = field[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        kind = field[i + 1]
        if kind in "\\tnr":
            out += {"\\": b"\\", "t": b"\t", "n": b"\n", "r": b"\r"}[kind]
            i += 2
        elif kind == "x":
            out.append(int(field[i + 2 : i + 4], 16))  # one byte
            i += 4
        else:
            assert kind == "u"
            out += chr(int(field[i + 2 : i + 6], 16)).encode("utf-8")
            i += 6
    return bytes(out)


HOSTILE_NAMES = [
    "two\nlines.png",
    "tab\there.png",
    "back\\slash.png",
    "esc\x1b[31mred.png",
    "bidi\u202egnp.png",
    "c1\x85x.png",
    "cr\rx.png",
]


def test_plain_records_cannot_be_forged(tiny_model_dir, tmp_path):
    paths = [_photo(tmp_path / name, 40 + 10 * i) for i, name in enumerate(HOSTILE_NAMES)]
    out = cli(*map(str, paths), model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(paths)  # one record per image
    for path, line in zip(paths, lines):
        name, caption = line.split("\t")  # exactly two fields
        assert _unescape(name) == os.fsencode(path)
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202e]", name + caption)
        assert caption


def test_non_utf8_name_in_json_and_plain_output(tiny_model_dir, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9\n.png"
    _photo(raw)
    broken = os.fsencode(tmp_path) + b"/\xff.png"
    Path(os.fsdecode(broken)).write_bytes(b"not an image")
    out = cli(os.fsdecode(raw), os.fsdecode(broken), "--json", model=tiny_model_dir)
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.decode("utf-8").splitlines()]
    assert len(records) == 2
    assert records[0]["path"].endswith("caf\ufffd\n.png") and records[0]["caption"]
    assert base64.b64decode(records[0]["path_base64"]) == raw
    assert base64.b64decode(records[1]["path_base64"]) == broken and records[1]["error"]
    out.stderr.decode("utf-8")  # stderr is escaped too: valid UTF-8, one line per input
    assert out.stderr.count(b"\n") == 1 and b"\\xff.png: not an image" in out.stderr
    plain = cli(os.fsdecode(raw), model=tiny_model_dir)
    assert plain.returncode == 0
    assert _unescape(plain.stdout.decode("utf-8").split("\t")[0]) == raw


def test_a_name_that_is_not_utf8_in_an_error_is_utf8_in_json(tiny_model_dir, tmp_path):
    """docs/reliability.md: ``--json`` is always valid UTF-8. A problem that names another file
    that is not UTF-8 (a broken link's target; the name a file was already captioned under)
    has each bad byte as \\xff text in ``error``, as stderr writes it: it had been a lone
    surrogate escape (\\udcff), which a strict reader refuses and no UTF-8 can encode."""
    folder = tmp_path / "album"
    folder.mkdir()
    os.symlink(os.fsdecode(b"tar\xffget"), folder / "broken.jpg")
    first = os.fsencode(folder) + b"/a\xfe.png"
    _photo(first)
    twin = os.fsencode(tmp_path) + b"/tw\xfdin.png"  # the same file under another name
    os.symlink(first, twin)
    out = cli(str(folder), os.fsdecode(twin), "--json", model=tiny_model_dir)
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.decode("utf-8").splitlines()]
    errors = {
        base64.b64decode(r["path_base64"]) if "path_base64" in r else os.fsencode(r["path"]): r["error"]
        for r in records
        if "error" in r
    }
    assert errors == {
        os.fsencode(folder / "broken.jpg"): "skipped: broken symbolic link (to tar\\xffget)",
        twin: f"skipped: the same file as {folder}/a\\xfe.png, already captioned",
    }
    for problem in errors.values():
        problem.encode("utf-8")  # no lone surrogate


def test_strict_ascii_locale_still_gives_utf8(tiny_model_dir, tmp_path):
    path = _photo(tmp_path / "café.png")
    env = {**ENV, "PYTHONIOENCODING": "ascii:strict", "LC_ALL": "C"}
    for args in ((), ("--json",)):
        out = cli(str(path), *args, model=tiny_model_dir, env=env)
        assert out.returncode == 0, out.stderr
        assert "café.png" in out.stdout.decode("utf-8")


def test_escape_field_leaves_ordinary_text_alone():
    assert escape_field("photos/été 2024/IMG_0001.JPG") == "photos/été 2024/IMG_0001.JPG"
    assert escape_field("a\\b\tc\n") == "a\\\\b\\tc\\n"


# The bidirectional controls that CVE-2021-42574 ("Trojan Source") names: the embeddings and
# overrides U+202A-U+202E (LRE RLE PDF LRO RLO) and the isolates U+2066-U+2069 (LRI RLI FSI PDI).
TROJAN_SOURCE = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_escape_field_writes_each_class_of_character_as_the_help_says():
    """``edgecap caption --help``: a carriage return \\r, another ASCII control character
    (0x00-0x1f and DEL 0x7f) \\xHH with two hex digits, a C1 control (0x80-0x9f), a line
    separator (U+2028, U+2029) or a bidirectional override \\uHHHH; expected strings written
    out by hand."""
    assert escape_field("a\rb") == "a\\rb"
    assert escape_field("\x00\x01\x0b\x1b\x1f\x7f") == "\\x00\\x01\\x0b\\x1b\\x1f\\x7f"
    assert escape_field("\x80\x85\x9f") == "\\u0080\\u0085\\u009f"
    assert escape_field("a\u2028b\u2029c") == "a\\u2028b\\u2029c"
    assert escape_field(TROJAN_SOURCE) == ("\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069")
    # the first characters past each class are written as they are
    assert escape_field(" \xa0\u2027\u202f\u206a") == " \xa0\u2027\u202f\u206a"


def test_json_line_escapes_del_c1_line_separators_and_bidi_controls():
    """``--json``: control characters, line separators and bidirectional overrides are \\u
    escapes (json.dumps leaves DEL, C1 and those as they are); the line still reads back as
    the record."""
    record = {"path": "a\u202eb\u2066.png", "caption": "x\x7fy\x85z"}
    line = json_line(record)
    assert line == '{"path": "a\\u202eb\\u2066.png", "caption": "x\\u007fy\\u0085z"}'
    assert json.loads(line) == record
    for char in TROJAN_SOURCE + "\x7f\x80\x9f\u2028\u2029":
        assert json_line({"path": char}) == f'{{"path": "\\u{ord(char):04x}"}}'


def test_path_base64_only_for_a_name_whose_bytes_are_not_utf8(monkeypatch):
    """docs/cli.md: ``path_base64`` for a name that is not UTF-8. Under a Latin-1 file system
    encoding (simulated: ``os.fsencode`` as Latin-1) the UTF-8 name b"caf\\xc3\\xa9.png"
    arrives as "caf\u00c3\u00a9.png": its record says "caf\u00e9.png" and, its bytes being
    UTF-8, has no path_base64; the Latin-1 name b"caf\\xe9.png" is not UTF-8: U+FFFD in path,
    its bytes in path_base64."""
    from types import SimpleNamespace

    from edgecap.commands import output

    monkeypatch.setattr(output, "os", SimpleNamespace(fsencode=lambda name: name.encode("latin-1")))
    assert json.loads(json_line({"path": "caf\u00c3\u00a9.png"})) == {"path": "caf\u00e9.png"}
    assert json.loads(json_line({"path": "caf\u00e9.png"})) == {
        "path": "caf\ufffd.png",
        "path_base64": base64.b64encode(b"caf\xe9.png").decode("ascii"),
    }


def test_a_bag_named_with_bytes_that_are_not_utf8_gets_bag_base64():
    """A --bag record names its recording in "bag": a name that is not UTF-8 (b"r\\xffn.bag")
    is U+FFFD there and its exact bytes in bag_base64, as "path" and path_base64 are for a
    photo; it had been a lone surrogate, which strict JSON readers refuse."""
    name = os.fsdecode(b"r\xffn.bag")
    record = json.loads(json_line({"bag": name, "topic": "/cam", "path": None}))
    assert record == {
        "bag": "r\ufffdn.bag",
        "bag_base64": base64.b64encode(b"r\xffn.bag").decode("ascii"),
        "topic": "/cam",
        "path": None,
    }
    assert json.loads(json_line({"bag": "run.bag"})) == {"bag": "run.bag"}


def test_eval_s_names_in_its_summary_get_their_bytes_too():
    """edgecap eval --json names its references file at the top and the model's folder inside
    "model": a name that is not UTF-8 is U+FFFD there with its exact bytes beside it
    (references_base64, model.path_base64), not a lone surrogate escape."""
    summary = {"references": os.fsdecode(b"refs\xff.json"), "model": {"path": os.fsdecode(b"/m/mod\xe9l")}}
    record = json.loads(json_line(summary))
    assert record == {
        "references": "refs\ufffd.json",
        "references_base64": base64.b64encode(b"refs\xff.json").decode("ascii"),
        "model": {"path": "/m/mod\ufffdl", "path_base64": base64.b64encode(b"/m/mod\xe9l").decode("ascii")},
    }
    assert "\\ud" not in json_line(summary)


def _caption(confidence):
    from edgecap.api import Caption

    return Caption("a cat", -0.5, ["a", "cat"], -1.0, confidence=confidence)


def test_min_confidence_marks_only_captions_below_it():
    """docs/cli.md: ``low_confidence`` on a caption whose confidence is *below* X: one at
    exactly X is not marked, one just under it is."""
    assert caption_fields(_caption(0.5), min_confidence=0.5) == ["a cat"]
    assert caption_fields(_caption(0.4999), min_confidence=0.5) == ["a cat", "low confidence"]


def test_a_failed_input_has_low_confidence_null_with_min_confidence(capsys):
    """docs/cli.md: with ``--json`` a failed input has a caption's keys, each null, and
    ``error``; with ``--min-confidence`` those keys include ``low_confidence``."""
    from edgecap.errors import InputError

    print_result("ok.png", _caption(0.9), as_json=True, min_confidence=0.5)
    print_result("bad.png", InputError("bad.png", "not an image"), as_json=True, min_confidence=0.5)
    out = capsys.readouterr()
    ok, bad = (json.loads(line) for line in out.out.splitlines())
    keys = ["path", "caption", "score", "objects", "confidence", "recognisable", "crop", "low_confidence"]
    assert list(ok) == keys and ok["low_confidence"] is False
    assert list(bad) == [*keys, "error"] and bad["error"] == "not an image"
    assert all(bad[key] is None for key in keys[1:])
    assert out.err == "edgecap: bad.png: not an image\n"


def test_the_problem_on_stderr_is_escaped_too(capsys):
    """``edgecap caption --help``: errors go to stderr, escaped alike; a problem may name
    something from the input (a recording's frame), so it cannot clear the terminal or turn
    the line around either."""
    from edgecap.commands.output import report_error

    report_error("run.db3", "cam/frame\u202e1: not an image\x1b[2J")
    assert capsys.readouterr().err == "edgecap: run.db3: cam/frame\\u202e1: not an image\\x1b[2J\n"


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for i in range(60):
        _photo(root / f"p{i:02d}.png", i)
    return root


# ``python -m edgecap`` whose second record waits until the reader of stdout has gone (the pipe
# then reports an error to its writer): otherwise a loaded machine, keeping the test from closing
# the pipe, let the command caption every photo into the pipe's buffer and exit 0
_READER_GONE_AFTER_THE_FIRST_RECORD = (
    "import select, sys\n"
    "from edgecap.commands import caption\n"
    "printed, first = caption.print_result, []\n"
    "def print_result(*args):\n"
    "    printed(*args)\n"
    "    if not first:\n"
    "        first.append(args)\n"
    "        poll = select.poll()\n"
    "        poll.register(sys.stdout.fileno(), select.POLLERR)\n"
    "        poll.poll(60_000)  # (a hang guard only)\n"
    "caption.print_result = print_result\n"
    "from edgecap.cli import run_command  # as edgecap/__main__.py\n"
    "run_command()\n"
)


def test_closed_pipe_stops_quietly(tiny_model_dir, many_photos):
    """``edgecap caption DIR | head -1``: no traceback, the SIGPIPE status. Run as from a
    user's shell, without PYTHONUNBUFFERED (set where the tests run): stdout to a pipe is then
    block-buffered, so the first record arrives at once only if edgecap flushes each record,
    and the records still buffered when the pipe closed must not fail again at exit ("Exception
    ignored ... BrokenPipeError", status 120). The command writes its second record once the
    pipe is closed, however long the test takes to close it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _READER_GONE_AFTER_THE_FIRST_RECORD,
            "caption",
            str(many_photos),
            "--model",
            str(tiny_model_dir),
            "--batch-size",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"},
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line, like head -1
    stderr = proc.stderr.read()
    proc.wait()
    assert first.startswith(str(many_photos / "p00.png").encode())
    assert proc.returncode == EXIT_PIPE_CLOSED == 141
    assert stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_exit_2_in_one_line(tiny_model_dir, many_photos):
    with open("/dev/full", "w") as full:
        out = cli(str(many_photos / "p00.png"), model=tiny_model_dir, stdout=full)
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [
        "edgecap caption: error: cannot write the output (No space left on device)"
    ]


def test_closed_stdout_is_exit_2_not_silence(tiny_model_dir, many_photos):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecap",
            "caption",
            str(many_photos / "p00.png"),
            "--model",
            str(tiny_model_dir),
        ],
        stdout=None,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=lambda: os.close(1),
    )
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [
        "edgecap caption: error: cannot write the output: standard output is closed"
    ]


def test_with_stderr_closed_the_error_lines_stay_out_of_the_records(tiny_model_dir, many_photos, tmp_path):
    """Started with stderr closed (``2>&-``, as cron or a daemon may), a bad photo's line
    ``edgecap: NAME: problem`` is not written to stdout among the records (Python's
    ``print(file=None)`` writes there): stdout holds one JSON record per photo, exit 1."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = str(many_photos / "p00.png")
    for extra, parse in ((["--json"], json.loads), ([], lambda line: line.split("\t"))):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgecap",
                "caption",
                good,
                str(empty),
                *extra,
                "--model",
                str(tiny_model_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=None,
            env=ENV,
            preexec_fn=lambda: os.close(2),
        )
        assert out.returncode == 1
        records = [parse(line) for line in out.stdout.decode().splitlines()]
        if extra:
            assert [r["path"] for r in records] == [good, str(empty)]
            assert records[1]["error"] == "file is empty (0 bytes)"
        else:  # the plain output has no record of a failed photo
            assert [r[0] for r in records] == [good]


def test_error_lines_are_utf8_whatever_the_locale(tiny_model_dir, tmp_path):
    """A name's characters on stderr are written as UTF-8 (as on stdout) under an ASCII
    locale, not as ``\\xfc``, which the output keeps for a byte of a name that is not UTF-8."""
    bad = tmp_path / "f\u00fcnf.png"
    bad.write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", str(bad), "--model", str(tiny_model_dir)],
        capture_output=True,
        env={**ENV, "PYTHONIOENCODING": "ascii"},
    )
    assert out.returncode == 1
    assert out.stderr.decode("utf-8").splitlines() == [f"edgecap: {bad}: file is empty (0 bytes)"]


def test_every_non_utf8_byte_of_a_name_is_one_escape():
    """The lowest (0x80) and highest (0xff) bytes that are never UTF-8 on their own come out as
    \\x80 and \\xff, never as a surrogate (\\udc80) or a character."""
    name = os.fsdecode(b"a\x80b\xffc\xc3.png")
    assert escape_field(name) == "a\\x80b\\xffc\\xc3.png"
    assert _unescape(escape_field(name)) == b"a\x80b\xffc\xc3.png"


def test_attention_on_a_bad_photo_fails_and_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    figure = tmp_path / "figure.png"
    out = cli(str(bad), "--attention", str(figure), model=tiny_model_dir)
    assert out.returncode == 1, out.stderr
    assert b"broken.png: not an image" in out.stderr and not figure.exists()


def test_plain_record_with_objects_ends_with_the_low_confidence_mark(capsys):
    """docs/cli.md: with --objects a record is PATH<TAB>caption<TAB>tags (``Egyptian Mau 0.79,
    tiger cat 0.09``), and with --min-confidence a caption below X gets a *last* field ``low
    confidence``: after the tags, so that a reader taking field 3 as the tags still finds them."""
    from edgecap.api import Caption

    caption = Caption(
        "a cat",
        -0.5,
        ["a", "cat"],
        -1.0,
        objects=(("Egyptian Mau", 0.79), ("tiger cat", 0.09)),
        confidence=0.3,
    )
    print_result("cat.png", caption, as_json=False, objects=True, min_confidence=0.5)
    assert capsys.readouterr().out == "cat.png\ta cat\tEgyptian Mau 0.79, tiger cat 0.09\tlow confidence\n"


def test_caption_and_tag_fields_are_escaped_like_the_name(capsys):
    """docs/cli.md: *each* field is escaped, not only the file name: a caption or an object tag
    holding a TAB, a newline or an ESC (words and classes come from the model directory) cannot
    add a field or a record either."""
    from edgecap.api import Caption

    caption = Caption("a\tcat\non\x1b[2Jmat", -0.5, ["a"], -1.0, objects=(("tab\tby", 0.5),))
    print_result("cat.png", caption, as_json=False, objects=True)
    assert capsys.readouterr().out == "cat.png\ta\\tcat\\non\\x1b[2Jmat\ttab\\tby 0.50\n"


def test_names_are_utf8_in_plain_output_and_stderr_whatever_the_fs_encoding(tiny_model_dir, tmp_path):
    """docs/reliability.md §4: stdout is UTF-8 whatever the locale, and ``\\xHH`` is one byte of a
    name that is not UTF-8. Under ``LC_ALL=C PYTHONUTF8=0`` Python decodes names as ASCII: the
    UTF-8 name b"caf\\xc3\\xa9.png" had been printed as "caf\\xc3\\xa9.png" (plain) where
    ``--json`` says "café.png", and under a Latin-1 locale as "cafÃ©.png", which leads back to
    no file. Expected: the bytes written out by hand, as a UTF-8 locale prints them."""
    folder = tmp_path / "album"
    folder.mkdir()
    _photo(os.fsencode(folder) + b"/caf\xc3\xa9.png")
    _photo(os.fsencode(folder) + b"/bad\xff.png", 60)
    os.symlink("caf\u00e9.png", folder / "link.png")  # a skip that names the first: café.png
    env = {**ENV, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = cli(str(folder), str(folder / "nosuch\u00e9.png"), model=tiny_model_dir, env=env)
    assert out.returncode == 1, out.stderr
    assert [line.split(b"\t")[0] for line in out.stdout.splitlines()] == [
        os.fsencode(folder) + b"/bad\\xff.png",
        os.fsencode(folder) + b"/caf\xc3\xa9.png",
    ]
    assert out.stderr.splitlines() == [
        b"edgecap: "
        + os.fsencode(folder)
        + b"/link.png: skipped: the same file as "
        + os.fsencode(folder)
        + b"/caf\xc3\xa9.png, already captioned",
        b"edgecap: " + os.fsencode(folder) + b"/nosuch\xc3\xa9.png: no such file",
    ]


def test_a_name_decoded_as_latin1_is_written_as_its_utf8_bytes(monkeypatch):
    """Under a Latin-1 file-system encoding (simulated: ``os.fsencode`` as Latin-1) the UTF-8
    name b"caf\\xc3\\xa9.png" arrives as "caf\u00c3\u00a9.png" and b"bad\\xff.png" as
    "bad\u00ff.png": plain output and stderr write "café.png" and "bad\\xff.png", the escapes
    that lead back to the bytes; a caption is text, never re-encoded."""
    from types import SimpleNamespace

    from edgecap.commands import output

    monkeypatch.setattr(output, "os", SimpleNamespace(fsencode=lambda name: name.encode("latin-1")))
    assert output.escape_name("caf\u00c3\u00a9.png") == "caf\u00e9.png"
    assert output.escape_name("bad\u00ff.png") == "bad\\xff.png"
    assert output.escape_name("\u20ac.png") == "\u20ac.png"  # not a name Latin-1 holds: as it is
    assert output.escape_field("caf\u00c3\u00a9") == "caf\u00c3\u00a9"
