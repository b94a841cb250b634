"""Progress of long ``edgecap caption`` runs: on stderr, only when stderr is a terminal and
``--no-progress`` was not given; stdout (plain records or JSON) is the same with or without it.
The terminal is a real pseudo-terminal in the subprocess tests."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgecap
from edgecap.cli import main
from edgecap.commands import progress

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counter_waits_then_counts_and_clears_for_other_lines():
    clock, stream = FakeClock(), io.StringIO()
    counter = progress.Counter(None, stream, delay=1.0, clock=clock)
    counter.update(1)
    assert stream.getvalue() == ""  # a short run shows nothing
    clock.now += 1.0
    counter.update(1)
    assert stream.getvalue() == "\r2 images, 2.0/s\x1b[K"
    with counter.paused():  # the line is cleared before another line is written
        assert stream.getvalue().endswith("\r\x1b[K")
    assert stream.getvalue().endswith("\r2 images, 2.0/s\x1b[K")  # and drawn again
    counter.close()
    assert stream.getvalue().endswith("\n")


def test_a_warning_of_edgecap_s_is_written_on_its_own_line_not_over_the_progress(monkeypatch):
    """A warning raised while the progress line is on the terminal (a 12-bit photo read as a dark
    frame, decoded in a worker thread) clears the line first and draws it again after, as the
    error lines do: it had been written onto it ("29 images, 8.2/s\\x1b[Kedgecap: warning: ...").
    With the progress closed, the warning is its line alone."""
    import threading

    from edgecap import cli, images

    clock, stream = FakeClock(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    show = cli._one_line_warnings(lambda *args: None)
    counter = progress.Counter(None, stream, delay=0.0, clock=clock)
    clock.now += 1.0
    counter.update(1)
    drawn = "\r1 image, 1.0/s\x1b[K"
    assert stream.getvalue() == drawn
    worker = threading.Thread(target=show, args=("dark", UserWarning, images.__file__, 1))
    worker.start()
    worker.join()
    assert stream.getvalue() == drawn + "\r\x1b[K" + "edgecap: warning: dark\n" + drawn
    counter.close()
    after = len(stream.getvalue())
    show("later", UserWarning, images.__file__, 1)
    assert stream.getvalue()[after:] == "edgecap: warning: later\n"


def test_counter_with_a_total_gives_the_time_left():
    clock, stream = FakeClock(), io.StringIO()
    counter = progress.Counter(30, stream, delay=0.0, clock=clock)
    clock.now += 10.0
    counter.update(10)  # 1 image/s, 20 to go
    assert stream.getvalue() == "\r10/30 images, 1.0/s, 0:20 left\x1b[K"
    counter.close()
    assert stream.getvalue().endswith("\n")


def test_counter_redraws_at_most_every_tenth_of_a_second():
    """Many images a second are not as many lines rewritten: an update 0.05 s after a drawing
    changes nothing on the terminal; the next, 0.5 s later, draws the count so far."""
    clock, stream = FakeClock(), io.StringIO()
    counter = progress.Counter(None, stream, delay=1.0, clock=clock)
    clock.now += 1.0
    counter.update(1)
    clock.now += 0.05
    counter.update(1)
    assert stream.getvalue() == "\r1 image, 1.0/s\x1b[K"
    clock.now += 0.45
    counter.update(1)  # 3 images in 1.5 s
    assert stream.getvalue() == "\r1 image, 1.0/s\x1b[K\r3 images, 2.0/s\x1b[K"


@pytest.mark.parametrize(("total", "drawn"), [(1, "1/1 image, 1.0/s"), (2, "1/2 images, 1.0/s")])
def test_a_total_of_one_image_is_counted_in_the_singular(total, drawn):
    """One photo given ('edgecap caption photo.jpg' on a terminal): "1/1 image", not "1/1 images"."""
    clock, stream = FakeClock(), io.StringIO()
    counter = progress.Counter(total, stream, delay=0.0, clock=clock)
    clock.now += 1.0
    counter.update(1)
    assert stream.getvalue().startswith(f"\r{drawn}, ")


def test_time_left_is_minutes_and_two_digit_seconds():
    clock, stream = FakeClock(), io.StringIO()
    counter = progress.Counter(75, stream, delay=0.0, clock=clock)
    clock.now += 10.0
    counter.update(10)  # 1 image/s, 65 to go: 1 minute 5 seconds
    assert stream.getvalue() == "\r10/75 images, 1.0/s, 1:05 left\x1b[K"


def test_open_progress_counts_against_its_total_and_is_silent_when_off(monkeypatch):
    """``edgecap eval`` knows how many photos it captions: its progress gives the total and
    the time left; switched off, nothing is written."""
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    shown = progress.open_progress(30, enabled=True)
    shown.update(3)
    shown.close()
    assert re.fullmatch(r"\r3/30 images, [0-9.]+/s, \d+:\d\d left\x1b\[K(\r.*)?\n", terminal.getvalue(), re.S)
    terminal.seek(0)
    terminal.truncate()
    hidden = progress.open_progress(30, enabled=False)
    hidden.update(3)
    hidden.close()
    assert terminal.getvalue() == ""


def test_no_progress_on_a_closed_or_missing_stderr(monkeypatch):
    """An embedding program that closed stderr, or a Python started without one (sys.stderr
    None): no progress, and no error from asking whether it is a terminal."""
    import argparse

    args = argparse.Namespace(no_progress=False)
    closed = open(os.devnull, "w")
    closed.close()  # isatty() on it raises ValueError
    assert progress.progress_enabled(args, closed) is False
    monkeypatch.setattr(sys, "stderr", None)
    assert progress.progress_enabled(args) is False
    assert progress.progress_enabled(args, _Terminal()) is True


def test_nothing_shown_is_nothing_closed():
    stream = io.StringIO()
    counter = progress.Counter(5, stream, delay=60.0)
    counter.update(5)
    with counter.paused():
        pass
    counter.close()
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """12 photos in a folder, and a file that is not a photo (an error line on stderr)."""
    root = tmp_path_factory.mktemp("many")
    for i in range(3):
        for photo in sorted(EXAMPLES.iterdir()):
            shutil.copy(photo, root / f"{i}-{photo.name}")
    (root / "z-broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.mark.parametrize("json_output", [False, True], ids=["plain", "json"])
def test_stdout_is_the_same_with_progress_on(json_output, many_photos, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    args = [
        "caption",
        str(many_photos),
        "--model",
        str(tiny_model_dir),
        "--max-length",
        "4",
        "--batch-size",
        "5",
        *(["--json"] if json_output else []),
    ]
    runs = {}
    for stderr in ("terminal", "file"):
        terminal = _Terminal() if stderr == "terminal" else io.StringIO()
        monkeypatch.setattr(sys, "stderr", terminal)
        code = main(args)
        runs[stderr] = code, capsys.readouterr().out, terminal.getvalue()
    (code_tty, out_tty, err_tty), (code_file, out_file, err_file) = runs["terminal"], runs["file"]
    assert code_tty == code_file == 1  # the broken file
    # a record per photo; --json also one for the broken file (plain: stderr only)
    assert out_tty == out_file and len(out_tty.splitlines()) == (13 if json_output else 12)
    assert "images, " not in out_tty and "\x1b" not in out_tty
    assert "12 images, " in err_tty and err_tty.endswith("\n")
    # the last line drawn counts each input once: the 12 photos and the broken file
    drawn = [part.split(",")[0] for part in err_tty.split("\r") if "images, " in part]
    assert drawn[-1] == "13 images"
    assert "images, " not in err_file  # not a terminal: no progress
    for err in (err_tty, err_file):  # the error line is whole in both
        assert "z-broken.jpg" in err


@pytest.mark.parametrize("flag", ["--no-progress", "--quiet"])
def test_no_progress_switches_it_off_on_a_terminal(many_photos, tiny_model_dir, monkeypatch, capsys, flag):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(["caption", str(many_photos), "--model", str(tiny_model_dir), "--max-length", "4", flag])
    assert "images, " not in terminal.getvalue()
    assert len(capsys.readouterr().out.splitlines()) == 12


_RUN = (
    "import sys; from edgecap.commands import progress; progress.DELAY_S = 0.0; "
    "from edgecap.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _caption(folder: Path, model: Path, stderr_tty: bool) -> tuple[str, str]:
    """Run ``edgecap caption`` in a subprocess, stdout a pipe, stderr a pseudo-terminal or a
    pipe -> (stdout, stderr)."""
    import pty

    command = [
        sys.executable,
        "-c",
        _RUN,
        "caption",
        str(folder),
        "--model",
        str(model),
        "--max-length",
        "4",
        "--json",
    ]
    if not stderr_tty:
        done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, env=ENV)
        os.close(slave)
        err = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal (EIO)
                break
            if not chunk:
                break
            err += chunk
        out = proc.stdout.read().decode()
        proc.wait(timeout=600)
    finally:
        os.close(master)
    return out, err.decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_only_on_a_real_terminal(many_photos, tiny_model_dir):
    out_tty, err_tty = _caption(many_photos, tiny_model_dir, stderr_tty=True)
    out_pipe, err_pipe = _caption(many_photos, tiny_model_dir, stderr_tty=False)
    assert out_tty == out_pipe and len(out_tty.splitlines()) == 13
    assert "12 images, " in err_tty
    assert "images, " not in err_pipe and "z-broken.jpg" in err_pipe
