"""``edgecap caption --video / --camera / --attention`` and ``examples/robot_loop.py``, end to end
(the command's entry point in this process, its output read at the file descriptors:
``helpers.run_edgecap``; the example script and a Python without OpenCV in subprocesses), on a
2 s, 10 fps video made from the bundled example photos and on the ``tiny_model_dir`` model
(tests/conftest.py)."""

from __future__ import annotations

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
from edgecap import Captioner
from test_stream import make_video
from helpers import EXAMPLES, run_edgecap
from test_viz import GREEN, find_panels

ROOT = Path(edgecap.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd)


def edgecap_caption(capfd, *args, model) -> subprocess.CompletedProcess:
    return run_edgecap(capfd, "caption", *args, "--model", model, "--max-length", "6")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.avi", seconds=2.0, fps=10.0)


def test_video_every_prints_one_timestamped_caption_per_interval(
    tiny_model_dir, video, tmp_path, capfd, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = edgecap_caption(capfd, "--video", video, "--every", "0.5", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [time for time, _ in lines] == ["0.00s", "0.50s", "1.00s", "1.50s"]
    # the same frames, decoded the same way, captioned in this process
    from edgecap.stream import video_frames

    captioner = Captioner(tiny_model_dir, max_length=6, threads=1)
    frames = [f for f in video_frames(video) if f.index in (0, 5, 10, 15)]
    assert [text for _, text in lines] == [captioner.caption(f.image, color="bgr").text for f in frames]
    assert "4 captions from 20 frames" in out.stderr and "16 skipped" in out.stderr
    assert list(tmp_path.iterdir()) == []  # wrote nothing


def test_video_every_pick_sharpest_captions_each_intervals_least_blurred_frame(
    tiny_model_dir, tmp_path, capfd
):
    """A 1 s, 10 fps video of the cat whose frames are all blurred by motion but frames 3 and 6:
    with --every 0.5 --pick sharpest those two are captioned (0.30s and 0.60s), not each
    interval's first frame (0.00s and 0.50s, without --pick)."""
    cv2 = pytest.importorskip("cv2")
    from test_stream import example_frames, motion_blurred

    from edgecap.stream import video_frames

    cat = example_frames()[0]
    path = tmp_path / "shaky.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (cat.shape[1], cat.shape[0]))
    for i in range(10):
        frame = cat if i in (3, 6) else motion_blurred(cat, 9)
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    out = edgecap_caption(
        capfd, "--video", path, "--every", "0.5", "--pick", "sharpest", model=tiny_model_dir
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [time for time, _ in lines] == ["0.30s", "0.60s"]
    captioner = Captioner(tiny_model_dir, max_length=6, threads=1)
    frames = [f for f in video_frames(path) if f.index in (3, 6)]
    assert [text for _, text in lines] == [captioner.caption(f.image, color="bgr").text for f in frames]
    assert "2 captions from 10 frames" in out.stderr and "8 skipped" in out.stderr
    plain = edgecap_caption(capfd, "--video", path, "--every", "0.5", model=tiny_model_dir)
    assert [line.split("\t")[0] for line in plain.stdout.splitlines()] == ["0.00s", "0.50s"]


def test_video_changes_only_captions_each_scene_once(tiny_model_dir, video, capfd):
    """The 2 s video is the cat for 1 s, then the coffee cup: --changes-only captions the first
    frame of each (0.00s, 1.00s), the 18 others counted unchanged; --min-change 1 (every cell
    must move) the first frame alone."""
    out = edgecap_caption(capfd, "--video", video, "--changes-only", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [time for time, _ in lines] == ["0.00s", "1.00s"]
    every = edgecap_caption(capfd, "--video", video, model=tiny_model_dir).stdout.splitlines()
    assert out.stdout.splitlines() == [every[0], every[10]]
    assert "2 captions from 20 frames" in out.stderr and "18 unchanged" in out.stderr
    whole = edgecap_caption(capfd, "--video", video, "--min-change", "1", model=tiny_model_dir)
    assert [line.split("\t")[0] for line in whole.stdout.splitlines()] == ["0.00s"]


def test_video_hold_keeps_a_still_scene_s_caption_and_says_which_were_held(tmp_path, capfd):
    """A video of the coffee cup with other sensor noise in each frame, the shipped model: with --hold
    every frame says the first frame's caption (the frames the search captions otherwise
    marked "held" in --json, counted in the summary), as caption_stream(hold=True) says them;
    without it the captions flicker. --hold without a camera or video is a usage error."""
    cv2 = pytest.importorskip("cv2")
    from test_stream import example_frames

    from edgecap.stream import caption_stream, video_frames

    rng = np.random.default_rng(1)
    cup = example_frames()[1].astype(np.float32)
    path = tmp_path / "still.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (cup.shape[1], cup.shape[0]))
    for _ in range(8):
        frame = np.clip(np.round(cup + rng.normal(0, 4, cup.shape)), 0, 255).astype(np.uint8)
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    out = run_edgecap(capfd, "caption", "--video", path, "--hold", "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    plain = run_edgecap(capfd, "caption", "--video", path, "--json")
    flicker = [json.loads(line)["caption"] for line in plain.stdout.splitlines()]
    assert len(set(flicker)) > 1 and "held" not in json.loads(plain.stdout.splitlines()[0])
    assert [r["caption"] for r in records] == [flicker[0]] * 8
    assert [r["held"] for r in records] == [c != flicker[0] for c in flicker]
    expected = [e.caption for e in caption_stream(Captioner(), video_frames(path), live=False, hold=True)]
    assert [(c.text, c.held) for c in expected] == [(r["caption"], r["held"]) for r in records]
    assert f", {sum(r['held'] for r in records)} held" in out.stderr
    usage = run_edgecap(capfd, "caption", str(EXAMPLES / "chelsea.png"), "--hold")
    assert usage.returncode == 2 and "--hold needs --camera, --video or --bag" in usage.stderr


def test_the_changes_only_help_gives_the_stream_s_min_change():
    import argparse

    from edgecap.commands import caption
    from edgecap.stream import MIN_CHANGE

    parser = argparse.ArgumentParser()
    caption.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert f"(default: {MIN_CHANGE} with --changes-only)" in text


def test_video_json_every_frame(tiny_model_dir, video, capfd):
    out = edgecap_caption(capfd, "--video", video, "--json", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["frame"] for r in records] == list(range(20))
    assert [r["time"] for r in records] == [round(i / 10, 3) for i in range(20)]
    for r in records:
        assert isinstance(r["caption"], str) and r["caption"]
        assert isinstance(r["score"], float) and r["dropped"] == 0
        assert set(r["timings"]) == {"preprocess_ms", "encode_ms", "decode_ms"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video", "missing.mp4"], "missing.mp4: no such file"),
        (["--video", "missing.mp4", "photo.jpg"], "exactly one of them"),
        ([], "exactly one of them"),
        (["photo.jpg", "--every", "1"], "--every needs --video, --camera or --bag"),
        (["--video", "missing.mp4", "--every", "0"], "--every must be a positive number"),
        (
            ["--video", "missing.mp4", "--every", "nan"],
            "--every must be a positive number of seconds, got nan",
        ),
        (["--video", "missing.mp4", "--attention", "out.png"], "--attention needs one image PATH"),
        (["--camera", "0", "--attention", "out.png"], "--attention needs one image PATH"),
        (["photo.jpg", "--attention", "out.xyz"], "unknown image format"),
        (["photo.jpg", "--pick", "sharpest"], "--pick sharpest needs --camera, or --video with --every"),
        (
            ["--video", "missing.mp4", "--pick", "sharpest"],
            "--pick sharpest needs --camera, or --video with --every",
        ),
        (["--bag", "a.mcap", "--every", "1", "--pick", "sharpest"], "--pick sharpest needs --camera"),
        (["--camera", "0", "--pick", "blurry"], "argument --pick: invalid choice: 'blurry'"),
        (["photo.jpg", "--changes-only"], "--changes-only needs --camera, --video or --bag"),
        (["photo.jpg", "--min-change", "0.1"], "--min-change needs --camera, --video or --bag"),
        (["--camera", "0", "--min-change", "0"], "--min-change must be a share of the view over 0"),
        (["--video", "missing.mp4", "--min-change", "1.5"], "at most 1, got 1.5"),
        (["--video", "missing.mp4", "--min-change", "nan"], "at most 1, got nan"),
    ],
)
def test_bad_arguments_are_clean_errors(tiny_model_dir, tmp_path, args, message, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = edgecap_caption(capfd, *args, model=tiny_model_dir)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--bag", "a.mcap", "--bag", "b.bag"], "--bag"),
        (["--video", "x.avi", "--video", "y.mp4"], "--video"),
        (["--camera", "0", "--camera", "1"], "--camera"),
        (["--video", "x.avi", "--vid", "x.avi"], "--video"),  # abbreviated, the same file: still two
    ],
)
def test_a_source_given_twice_is_a_usage_error_naming_it(args, flag, video, tmp_path, capfd, monkeypatch):
    """--bag, --video or --camera given twice: a usage error (exit 2) naming the option, before
    the model is loaded (here there is none), as two sources of different kinds are. The last
    one had been captioned alone, the first dropped without a word, exit 0."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.mcap", "b.bag", "x.avi", "y.mp4"):  # sources that exist: refused as two
        (tmp_path / name).write_bytes(video.read_bytes())
    out = run_edgecap(capfd, "caption", *args, "--model", tmp_path / "no-model")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [
        f"edgecap caption: error: {flag} given more than once: give image PATHs, --video FILE, "
        "--camera INDEX or --bag PATH (exactly one of them)"
    ]


def test_missing_camera_is_a_clean_error(tiny_model_dir, capfd):
    pytest.importorskip("cv2")
    out = edgecap_caption(capfd, "--camera", "99", model=tiny_model_dir)
    assert out.returncode == 2
    assert "camera 99: cannot open the camera" in out.stderr and "Traceback" not in out.stderr


def test_every_is_taken_with_a_camera(tiny_model_dir, capfd):
    """--every goes with --video, --camera or --bag: with a camera it is no usage error (this
    one is missing, so the run gets as far as opening it)."""
    pytest.importorskip("cv2")
    out = edgecap_caption(capfd, "--camera", "99", "--every", "1", model=tiny_model_dir)
    assert out.returncode == 2
    assert "edgecap caption: error: camera 99: cannot open the camera" in out.stderr
    assert "--every" not in out.stderr


def test_attention_to_a_folder_is_refused_before_captioning(tiny_model_dir, tmp_path, capfd):
    """An --attention name that is a folder (fig.png/): one line naming it, escaped (a newline
    in the name stays on the line), exit 2 and no caption; it had been found only once the photo
    was captioned and printed."""
    target = tmp_path / "fig\n1.png"
    target.mkdir()
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", target, model=tiny_model_dir)
    assert (out.returncode, out.stdout) == (2, "")
    shown = str(target).replace("\n", "\\n")
    assert out.stderr == (
        f"edgecap caption: error: --attention {shown} is a folder; name a .png or .jpg file\n"
    )


def test_attention_names_its_format_in_any_case(tiny_model_dir, tmp_path, capfd):
    """OUT.JPG is a .jpg file: the figure is written, as a JPEG."""
    target = tmp_path / "FIGURE.JPG"
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", target, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    with Image.open(target) as figure:
        assert figure.format == "JPEG"


@pytest.mark.parametrize("name", ["figure.psd", "figure.FITS", "figure.xpm"])
def test_attention_in_a_format_pillow_only_reads_is_refused_before_captioning(
    name, tiny_model_dir, tmp_path, capfd
):
    """A .psd, .fits or .xpm is an image format Pillow knows but cannot write: refused as a
    usage error in one line (exit 2), nothing printed or written; before the fix the caption
    was printed, then a KeyError traceback from Image.save, exit 1."""
    target = tmp_path / name
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", target, model=tiny_model_dir)
    assert (out.returncode, out.stdout) == (2, "")
    suffix = target.suffix.lower()
    assert out.stderr == (
        f"edgecap caption: error: --attention {target}: {suffix} images can be read, not written; "
        "name a .png or .jpg file\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("nodir/sub/fig.png", "folder {tmp}/nodir/sub does not exist"),
        ("notes.txt/fig.png", "{tmp}/notes.txt is not a folder"),
        (
            "fig.xbm",
            "Pillow cannot write the figure as .xbm (cannot write mode RGB as XBM); name a .png or .jpg file",
        ),
        (
            "fig.palm",
            "Pillow cannot write the figure as .palm (cannot write mode RGB as Palm);"
            " name a .png or .jpg file",
        ),
    ],
)
def test_an_attention_figure_that_cannot_be_written_is_refused_before_captioning(
    name, problem, tiny_model_dir, tmp_path, capfd
):
    """--attention in a folder that does not exist (or below a file), or in a format Pillow
    cannot write an RGB figure in: one line, exit 2, nothing on stdout. It had been found only
    after the photo was captioned and its record printed ("cannot write nodir/x.png: No such
    file or directory", "cannot write mode RGB as XBM"), as --write-bag's missing folder is not."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target = tmp_path / name
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", target, model=tiny_model_dir)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"edgecap caption: error: --attention {target}: {problem.format(tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


_SIGNAL_AFTER_FIRST_CAPTION = (
    "import os, signal, sys\n"
    "from edgecap.commands import caption_media\n"
    "from edgecap import cli\n"
    "entry, sig = sys.argv[1], getattr(signal, sys.argv[2])\n"
    "# as nohup leaves SIGHUP, or the default (the tests themselves may run under nohup)\n"
    "signal.signal(sig, signal.SIG_IGN if sys.argv[3] == 'ignored' else signal.SIG_DFL)\n"
    "printed, sent = caption_media._print_event, []\n"
    "def print_then_signal(event, *options):\n"
    "    printed(event, *options)\n"
    "    if not sent:\n"
    "        sent.append(event)\n"
    "        os.kill(os.getpid(), sig)  # a supervisor's stop once the first caption is out\n"
    "caption_media._print_event = print_then_signal\n"
    "sys.argv[1:4] = []\n"
    "cli.run_command() if entry == 'command' else sys.exit(cli.main(sys.argv[1:]))\n"
)


def test_ctrl_c_during_a_video_ends_with_its_summary(tiny_model_dir, video):
    """Ctrl-C once captions are coming: exit 130, the captions so far on stdout and the
    summary on stderr (the command finishes its output; it is not just cut off)."""
    args = ["caption", "--video", video, "--model", tiny_model_dir, "--max-length", "4"]
    out = run("-c", _SIGNAL_AFTER_FIRST_CAPTION, "main", "SIGINT", "handled", *args)
    assert out.returncode == 130, out.stderr
    assert len(out.stdout.splitlines()) == 1 and out.stdout.startswith("0.00s\t")
    assert re.fullmatch(r"edgecap: 1 caption from \d+ frames? in .*", out.stderr.splitlines()[-1]), out.stderr
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM and SIGHUP")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_supervisors_stop_during_a_video_cleans_up_as_ctrl_c_then_ends_by_the_signal(
    name, tiny_model_dir, video
):
    """SIGTERM (systemd, docker stop, a launch file) or SIGHUP (a closed terminal) once captions
    are coming: the command finishes as on Ctrl-C (the captions so far, the summary on stderr),
    then the ``edgecap`` command ends by that signal, as its sender expects (``main`` returns
    128 + its number). It had been killed outright: no summary, and a --write-bag copy or a
    conversion left half-written. One that is ignored (nohup's SIGHUP) stays ignored."""
    import signal

    sig = getattr(signal, name)
    args = ["caption", "--video", video, "--model", tiny_model_dir, "--max-length", "4"]
    for entry, code in (("command", -sig), ("main", 128 + sig)):
        out = run("-c", _SIGNAL_AFTER_FIRST_CAPTION, entry, name, "handled", *args)
        assert out.returncode == code, (entry, out.stderr)
        assert len(out.stdout.splitlines()) == 1 and out.stdout.startswith("0.00s\t")
        summary = out.stderr.splitlines()[-1]
        assert re.fullmatch(r"edgecap: 1 caption from \d+ frames? in .*", summary), out.stderr
        assert "Traceback" not in out.stderr and "Terminated" not in out.stderr
    out = run("-c", _SIGNAL_AFTER_FIRST_CAPTION, "command", name, "ignored", *args)
    assert out.returncode == 0 and len(out.stdout.splitlines()) > 1, out.stderr


_SIGNAL_WHILE_THE_MODEL_LOADS = (
    "import os, signal, sys\n"
    "from edgecap.commands import caption\n"
    "from edgecap import cli\n"
    "sig = getattr(signal, sys.argv[1])\n"
    "signal.signal(sig, signal.SIG_DFL)  # (the tests themselves may run under nohup)\n"
    "loaded = caption.load_captioner\n"
    "def load_after_a_stop(args):\n"
    "    os.kill(os.getpid(), sig)  # a supervisor's stop while the model loads\n"
    "    return loaded(args)\n"
    "caption.load_captioner = load_after_a_stop\n"
    "sys.argv[1:2] = []\n"
    "cli.run_command()\n"
)


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM and SIGHUP")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_supervisors_stop_while_the_command_starts_ends_it_by_the_signal(name, tiny_model_dir, video):
    """SIGTERM or SIGHUP before a command's output starts (the model loading) ends it at once,
    by the signal, as docs/cli.md's table says and as after the clean-up: it had exited with
    status 128 + the signal's number, which systemd takes for a failure (an end by SIGTERM is
    a clean stop to it)."""
    import signal

    sig = getattr(signal, name)
    args = ["caption", "--video", video, "--model", tiny_model_dir, "--max-length", "4"]
    out = run("-c", _SIGNAL_WHILE_THE_MODEL_LOADS, name, *args)
    assert out.returncode == -sig, out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr


def test_video_without_opencv_names_the_extra(tiny_model_dir, video):
    code = (
        "import sys\nsys.modules['cv2'] = None\nfrom edgecap.cli import main\n"
        f"sys.exit(main(['caption', '--video', {str(video)!r}, "
        f"'--model', {str(tiny_model_dir)!r}]))"
    )
    out = run("-c", code)
    assert out.returncode == 2
    assert "pip install '.[video]'" in out.stderr and "Traceback" not in out.stderr


def test_attention_png_has_one_panel_per_word_at_the_photo_aspect(
    tiny_model_dir, tmp_path, capfd, monkeypatch
):
    photos, work = tmp_path / "photos", tmp_path / "work"
    photos.mkdir()
    work.mkdir()
    photo = photos / "green.png"
    # green checks of two shades: something to recognise (20 px squares: checks of 10 px would
    # be noise at the model's 224 px, their detail 2.9 times their spread), every panel green
    squares = (np.indices((200, 300)) // 20).sum(0) % 2
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[..., 1] = np.where(squares, 255, 190)
    Image.fromarray(pixels).save(photo)
    target = photos / "attention.png"
    monkeypatch.chdir(work)
    out = edgecap_caption(capfd, photo, "--attention", target, "--json", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    (record,) = (json.loads(line) for line in out.stdout.splitlines())
    n_words = len(record["caption"].split())
    assert sorted(photos.iterdir()) == [target, photo] and list(work.iterdir()) == []
    with Image.open(target) as figure:
        assert figure.format == "PNG"
        panels = find_panels(figure.convert("RGB"))
    assert len(panels) == n_words
    assert {(w, h) for _, _, w, h in panels} == {(224, 149)}  # 300 x 200 -> 224 x 149.33


def test_attention_of_more_than_one_photo_is_one_line(tiny_model_dir, tmp_path, capfd):
    """A folder (or a glob) that names two photos: --attention draws one, so it says how
    many it got (exit 2), not a traceback, and writes nothing."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.open(EXAMPLES / "chelsea.png").save(photos / name)
    out = edgecap_caption(capfd, photos, "--attention", tmp_path / "out.png", model=tiny_model_dir)
    assert out.returncode == 2
    assert out.stderr == "edgecap caption: error: --attention takes one image, got 2\n"
    assert sorted(tmp_path.iterdir()) == [photos]


def test_attention_figure_that_cannot_be_written_is_one_line(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """OUT that fails only as it is written (a full disk; a folder that does not exist is
    refused before captioning): the caption is printed, then one error line naming OUT and
    the system's reason (exit 2), not a traceback."""
    import errno

    from edgecap import viz

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(viz, "write_whole", full_disk)
    target = tmp_path / "out.png"
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", target, model=tiny_model_dir)
    assert out.returncode == 2
    assert len(out.stdout.splitlines()) == 1
    assert out.stderr == f"edgecap caption: error: cannot write {target}: No space left on device\n"
    assert not target.exists()


def test_stream_records_give_the_time_to_the_millisecond_and_the_frames_dropped(capsys):
    """--video / --camera --json: "time" in seconds with three decimals (frame 1 of a 30 fps
    video is at 0.033 s, not 0.0), "dropped" the frames the live camera dropped before it;
    plain records: the time with two decimals; both with more where frames are closer."""
    from types import SimpleNamespace

    from edgecap.commands.caption_media import _print_event

    caption = SimpleNamespace(
        text="a cat",
        score=-0.61234,
        objects=[("tabby", 0.51234)],
        confidence=0.8,
        recognisable=True,
        timings={"encode_ms": 3.14159},
        crop=(0.0, 0.125, 1.0, 0.87501),
    )
    event = SimpleNamespace(timestamp=1 / 30, frame_index=1, caption=caption, dropped=2)
    _print_event(event, as_json=True)
    _print_event(event, as_json=False)
    record, plain = capsys.readouterr().out.splitlines()
    assert json.loads(record) == {
        "time": 0.033,
        "frame": 1,
        "caption": "a cat",
        "score": -0.6123,
        "objects": [["tabby", 0.5123]],  # as in a photo's record, with or without --objects
        "confidence": 0.8,
        "recognisable": True,
        "crop": [0.0, 0.125, 1.0, 0.875],  # the picture between the bars, to four decimals
        "timings": {"encode_ms": 3.14},
        "dropped": 2,
    }
    assert plain == "0.03s\ta cat"
    # frames closer than a millisecond (time_decimals: 5): the time to the 10 microseconds
    event = SimpleNamespace(timestamp=0.0012345, frame_index=5, caption=caption, dropped=0)
    _print_event(event, as_json=True, decimals=5)
    _print_event(event, as_json=False, decimals=5)
    record, plain = capsys.readouterr().out.splitlines()
    assert json.loads(record)["time"] == 0.00123 and plain == "0.00123s\ta cat"


@pytest.mark.parametrize(
    "every, fps, decimals",
    [
        (None, 10.0, 2),  # frames 0.1 s apart
        (None, 30.0, 2),
        (None, 60.0, 2),  # 0.0167 s apart: 0.00, 0.02, 0.03, 0.05 (more than 0.01 apart)
        (None, 100.0, 3),  # 0.01 s apart: at two decimals 0.015 (0.01499...) and 0.005 collide
        (None, 240.0, 3),  # a phone's slow motion: 0.0042 s apart
        (None, 1000.0, 4),
        (0.5, 240.0, 2),  # sampled 0.5 s apart
        (0.004, 30.0, 2),  # a frame every 0.033 s whatever every says
        (0.005, 240.0, 3),
        # kept 0.011 s apart at 240 fps: the first frame of each 0.011 s interval, so two can be
        # 0.011 - 1/240 = 0.0068 s apart: frames 6 and 8 (0.025 s, 0.0333 s) were both '0.03s'
        (0.011, 240.0, 3),
        (None, None, 2),  # a camera
        (1e-308, None, 6),  # at most microseconds
        (float("inf"), None, 2),
    ],
)
def test_frame_times_are_printed_with_the_decimals_that_tell_frames_apart(every, fps, decimals):
    """Plain --video records print the time with two decimals, or more where frames can be
    closer than 0.01 s: a 240 fps video's frames 0.0042 s apart were all '0.00s', '0.00s',
    '0.01s', '0.01s'. Decimals by hand: the fewest, at least 2, whose last place is smaller than
    the least time between printed frames (every, or one frame)."""
    from edgecap.commands.caption_media import time_decimals

    assert time_decimals(every, fps) == decimals


def test_a_fast_video_prints_each_frame_at_its_own_time(tiny_model_dir, tmp_path, capfd):
    """A 240 fps video captioned frame by frame: each line's time is its own (frame k at k / 240
    s, to the millisecond), in text and in --json."""
    video = make_video(tmp_path / "fast.avi", seconds=6 / 240, fps=240.0)
    out = edgecap_caption(capfd, "--video", video, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    times = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert times == ["0.000s", "0.004s", "0.008s", "0.013s", "0.017s", "0.021s"]
    out = edgecap_caption(capfd, "--video", video, "--json", model=tiny_model_dir)
    assert [json.loads(line)["time"] for line in out.stdout.splitlines()] == [
        0.0,
        0.004,
        0.008,
        0.013,
        0.017,
        0.021,
    ]


def test_frames_kept_every_0_011_s_of_a_fast_video_print_different_times(tiny_model_dir, tmp_path, capfd):
    """A 240 fps video with --every 0.011: the frames kept are the first of each 0.011 s
    interval, frames 0, 3, 6, 8, 11 (by hand: the first k / 240 at or after 0.011 n), so two can
    be 0.0083 s apart, and at two decimals frames 6 and 8 (0.025 s, 0.0333 s) were both 0.03s."""
    video = make_video(tmp_path / "fast.avi", seconds=12 / 240, fps=240.0)
    out = edgecap_caption(capfd, "--video", video, "--every", "0.011", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    times = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert times == ["0.000s", "0.013s", "0.025s", "0.033s", "0.046s"]


def test_video_captions_are_marked_below_min_confidence_and_tagged_with_objects(
    tmp_path, default_model_dir, video, capfd
):
    """--min-confidence and --objects with --video mark and tag each frame's caption as they do
    a photo's (docs/cli.md); they were ignored without a word, so a filter on "low_confidence"
    let every frame through. A model whose confidence is 1 / (1 + e^-3) = 0.9526 for every
    caption: X = 1 marks each frame, 0.5 none; --objects adds the five object tags (plain: a
    field before the mark; --json: "objects", [name, probability] pairs)."""
    from test_confidence import _model_with_confidence

    sure = _model_with_confidence(tmp_path, default_model_dir, bias=3.0)

    def caption(*extra) -> list[str]:
        out = run_edgecap(capfd, "caption", "--video", video, "--every", "1", "--model", sure, *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    for x, marked in (("1", True), ("0.5", False)):
        records = [json.loads(line) for line in caption("--json", "--min-confidence", x)]
        assert [(r["time"], r["low_confidence"]) for r in records] == [(0.0, marked), (1.0, marked)]
        # "objects" in every --json record, as in a photo's
        assert all(
            r["confidence"] == pytest.approx(0.9526, abs=1e-4) and len(r["objects"]) == 5 for r in records
        )
    plain = [line.split("\t") for line in caption("--min-confidence", "1", "--objects")]
    assert [(f[0], len(f), f[3]) for f in plain] == [
        ("0.00s", 4, "low confidence"),
        ("1.00s", 4, "low confidence"),
    ]
    for fields in plain:
        assert re.fullmatch(r"([^,]+ [01]\.\d\d, ){4}[^,]+ [01]\.\d\d", fields[2]), fields
    records = [json.loads(line) for line in caption("--json", "--objects")]
    assert [len(r["objects"]) for r in records] == [5, 5] and "low_confidence" not in records[0]


def test_attention_for_an_unreadable_image_writes_nothing(tiny_model_dir, tmp_path, capfd):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = edgecap_caption(capfd, broken, "--attention", tmp_path / "out.png", model=tiny_model_dir)
    assert out.returncode == 1
    assert f"edgecap: {broken}: " in out.stderr
    assert list(tmp_path.iterdir()) == [broken]


def test_robot_loop_example(tiny_model_dir, video):
    out = run(ROOT / "examples" / "robot_loop.py", video, "--model", tiny_model_dir, "--every", "0.5")
    assert out.returncode == 0, out.stderr
    *events, summary = out.stdout.splitlines()
    frames = [int(line.split("frame")[1].split()[0]) for line in events]
    assert frames and frames == sorted(set(frames)) and set(frames) <= {0, 5, 10, 15}
    assert all("encode" in line and "decode" in line and "dropped" in line for line in events)
    assert summary.startswith("done: ") and "from 20 frames" in summary


def test_robot_loop_example_passes_its_pick_to_the_stream(tiny_model_dir, video, monkeypatch, capsys):
    """--pick sharpest, --changes-only and --hold reach caption_stream (a live stream over the video
    played in real time; which frames it then picks depends on the machine's speed, so the
    stream itself is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robot_loop", ROOT / "examples" / "robot_loop.py")
    assert spec is not None and spec.loader is not None
    robot_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robot_loop)
    real, asked = robot_loop.caption_stream, []

    def recording(captioner, frames, **options):  # the video closed unread: a stream of no frame
        asked.append(options)
        frames.close()
        return real(captioner, [], **options)

    monkeypatch.setattr(robot_loop, "caption_stream", recording)
    warmed = []  # each warm-up's hold: the hold pass warmed for a loop that holds
    monkeypatch.setattr(
        robot_loop.Captioner, "warm_up", lambda self, *args, hold=False, **kwargs: warmed.append(hold)
    )
    from edgecap.stream import MIN_CHANGE

    assert robot_loop.main([str(video), "--model", str(tiny_model_dir), "--pick", "sharpest"]) == 0
    assert (
        robot_loop.main(
            [str(video), "--model", str(tiny_model_dir), "--every", "0.5", "--changes-only", "--hold"]
        )
        == 0
    )
    assert asked == [
        {"every": None, "pick": "sharpest", "min_change": None, "hold": False},
        {"every": 0.5, "pick": "newest", "min_change": MIN_CHANGE, "hold": True},
    ]
    assert warmed == [False, True]
    assert capsys.readouterr().out.count("done: 0 captions from 0 frames") == 2
    with pytest.raises(SystemExit):
        robot_loop.main([str(video), "--pick", "blurry"])


def test_robot_loop_example_runs_without_docstrings():
    """``python -OO`` (docstrings stripped): the example's ``--help`` took its description from
    ``__doc__``, None there (an AttributeError)."""
    out = run("-OO", ROOT / "examples" / "robot_loop.py", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: robot_loop.py"), out.stdout


def test_robot_loop_example_on_a_cut_video_names_the_problem_after_its_captions(
    tiny_model_dir, video, tmp_path
):
    """A recording cut short (the robot lost power): the captions of the frames before the cut,
    then the video's InputError in one line and the summary over the frames read, exit 1; it
    was a traceback."""
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # 5 to 17 of its 20 frames (test_hostile_video)
    out = run(ROOT / "examples" / "robot_loop.py", cut, "--model", tiny_model_dir, "--every", "0.5")
    assert out.returncode == 1, out.stderr
    error = re.fullmatch(
        r"robot_loop: .*cut\.avi: the video ends after (\d+) of its 20 frames .*\n", out.stderr
    )
    assert error, out.stderr
    read = int(error[1])
    *events, summary = out.stdout.splitlines()
    frames = [int(line.split("frame")[1].split()[0]) for line in events]
    assert frames and set(frames) <= {i for i in (0, 5, 10, 15) if i < read}
    assert summary.startswith("done: ") and f"from {read} frames" in summary


def test_attention_of_a_blank_photo_says_so_and_writes_nothing(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """docs/cameras.md: a photo with nothing recognisable has no figure to draw: its record
    printed as usual, one line on stderr, exit 1 (without --attention: 0), no file written and
    one already there left as it was."""
    photo = tmp_path / "green.png"
    Image.new("RGB", (300, 200), GREEN).save(photo)
    target = tmp_path / "attention.png"
    monkeypatch.chdir(tmp_path)
    out = edgecap_caption(capfd, photo, "--attention", target, model=tiny_model_dir)
    assert out.returncode == 1
    assert out.stdout == f"{photo}\tnothing recognisable\n"
    assert (
        out.stderr.splitlines()[-1] == f"edgecap: {photo}: nothing recognisable: no attention figure written"
    )
    assert not target.exists()
    target.write_bytes(b"an earlier figure")
    assert edgecap_caption(capfd, photo, "--attention", target, model=tiny_model_dir).returncode == 1
    assert target.read_bytes() == b"an earlier figure"
    assert edgecap_caption(capfd, photo, model=tiny_model_dir).returncode == 0


def test_camera_is_captioned_live_and_a_video_in_order_both_sampled_by_every(
    tiny_model_dir, video, capfd, monkeypatch
):
    """docs/cameras.md: "--camera is live: older frames are dropped when captioning is slower than
    the camera"; "--video captions every sampled frame in order"; --every samples either. The
    streams the command asks for (the video's source closed unread; a fake camera that gives no
    frame): --video --every 0.5 is in order with every=0.5, --camera 0 --every 2 live with 2.0;
    --pick sharpest is passed on, "newest" without it; --changes-only as MIN_CHANGE, --min-change
    X as X; --hold as hold=True."""
    import edgecap.stream
    from test_stream import FakeCv2

    real, asked = edgecap.stream.caption_stream, []

    def recording(captioner, frames, **options):
        asked.append(options)
        frames.close()
        return real(captioner, [], **options)

    monkeypatch.setattr(edgecap.stream, "caption_stream", recording)
    recorded = edgecap_caption(capfd, "--video", video, "--every", "0.5", model=tiny_model_dir)
    monkeypatch.setitem(sys.modules, "cv2", FakeCv2(n_frames=0))
    camera = edgecap_caption(capfd, "--camera", "0", "--every", "2", model=tiny_model_dir)
    sharpest = edgecap_caption(capfd, "--camera", "0", "--pick", "sharpest", model=tiny_model_dir)
    changes = edgecap_caption(capfd, "--camera", "0", "--changes-only", model=tiny_model_dir)
    tuned = edgecap_caption(
        capfd, "--camera", "0", "--changes-only", "--min-change", "0.3", model=tiny_model_dir
    )
    held = edgecap_caption(capfd, "--camera", "0", "--hold", model=tiny_model_dir)
    assert (recorded.returncode, camera.returncode, sharpest.returncode) == (0, 0, 0)
    assert (changes.returncode, tuned.returncode, held.returncode) == (0, 0, 0)
    assert asked == [
        {"every": 0.5, "live": False, "pick": "newest", "min_change": None, "hold": False},
        {"every": 2.0, "live": True, "pick": "newest", "min_change": None, "hold": False},
        {"every": None, "live": True, "pick": "sharpest", "min_change": None, "hold": False},
        {
            "every": None,
            "live": True,
            "pick": "newest",
            "min_change": edgecap.stream.MIN_CHANGE,
            "hold": False,
        },
        {"every": None, "live": True, "pick": "newest", "min_change": 0.3, "hold": False},
        {"every": None, "live": True, "pick": "newest", "min_change": None, "hold": True},
    ]


def test_a_camera_is_warmed_up_at_its_frame_size_before_its_stream(tiny_model_dir, video, capfd, monkeypatch):
    """docs/cameras.md: --camera meets the first frames' slow parts before the stream starts
    (``Captioner.warm_up`` at the camera's frame size, the hold pass too with --hold), the frame
    read for its size dropped; a camera that gives no frame, and a video, warm nothing up;
    Ctrl-C while it warms up stops the command (130, no traceback), the camera released."""
    from edgecap import Captioner
    from test_stream import FakeCv2

    real, warmed = Captioner.warm_up, []

    def recording(self, batch_sizes=(1,), frame_size=(480, 640), hold=False):
        warmed.append((tuple(batch_sizes), tuple(frame_size), hold))
        return real(self, batch_sizes, frame_size, hold)

    monkeypatch.setattr(Captioner, "warm_up", recording)
    assert edgecap_caption(capfd, "--video", video, "--every", "1", model=tiny_model_dir).returncode == 0
    camera = FakeCv2(n_frames=3)
    monkeypatch.setitem(sys.modules, "cv2", camera)
    held = edgecap_caption(capfd, "--camera", "0", "--hold", "--json", model=tiny_model_dir)
    assert held.returncode == 0, held.stderr
    plain = edgecap_caption(capfd, "--camera", "0", model=tiny_model_dir)
    assert plain.returncode == 0, plain.stderr
    assert warmed == [((1,), (4, 6), True), ((1,), (4, 6), False)]
    assert [c.read_count for c in camera.captures] == [3, 3]  # every frame read, the first for its size
    records = [json.loads(line) for line in held.stdout.splitlines()]
    assert records and all(r["frame"] >= 1 for r in records)  # not the first frame (frame 0)
    monkeypatch.setitem(sys.modules, "cv2", FakeCv2(n_frames=0))
    assert edgecap_caption(capfd, "--camera", "0", model=tiny_model_dir).returncode == 0
    assert len(warmed) == 2

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Captioner, "warm_up", interrupted)  # Ctrl-C while it warms up
    camera = FakeCv2(n_frames=3)
    monkeypatch.setitem(sys.modules, "cv2", camera)
    stopped = edgecap_caption(capfd, "--camera", "0", model=tiny_model_dir)
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (130, "", "")
    assert camera.captures[0].released.is_set()


def test_attention_of_a_model_without_attention_is_refused(tmp_path, capfd):
    """A Show-and-Tell model (``edgecap train --no-attention``) has no attention: its maps would
    be uniform, a figure of nothing. --attention says so in one line (exit 2) and writes nothing;
    before, it drew the uniform maps without a word."""
    pytest.importorskip("torch")
    from helpers import tiny_export

    from edgecap.models.efficientnet_lite import load_pretrained

    model = tiny_export(load_pretrained(), tmp_path / "show-and-tell", attention=False)
    out = edgecap_caption(capfd, EXAMPLES / "chelsea.png", "--attention", tmp_path / "a.png", model=model)
    assert out.returncode == 2
    assert out.stderr == (
        f"edgecap caption: error: --attention: {model} is a Show-and-Tell model (trained with "
        "--no-attention): it has no attention to draw\n"
    )
    assert not (tmp_path / "a.png").exists()
