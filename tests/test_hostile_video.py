"""Hostile videos and cameras (issue 25, classes 3 and 4): video frames obey the still photos'
pixel limit before any frame is decoded, a damaged or cut video is one error line and a
non-zero exit with the decoder's own noise silenced, and a camera index OpenCV would read as
"any camera" (a crash on machines without one) is refused, from the API and the CLI.

The videos are made here from the bundled example photos (``test_stream.make_video``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgecap import images
from edgecap.errors import InputError
from edgecap.stream import camera_frames, video_frames
from test_cli_video import ENV
from test_stream import VIDEO_SIZE, make_video

PIXELS = VIDEO_SIZE[0] * VIDEO_SIZE[1]


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "clip.avi", seconds=2.0, fps=10.0)  # 20 frames


@pytest.fixture
def small_limit():
    images.set_max_pixels(PIXELS - 1)
    yield
    images.set_max_pixels(None)


def test_video_frames_over_the_pixel_limit_are_refused_from_the_header(clip, small_limit, monkeypatch):
    import cv2

    def never(self):
        raise AssertionError("a frame was decoded before the size was checked")

    monkeypatch.setattr(cv2.VideoCapture, "read", never, raising=False)
    with pytest.raises(
        InputError, match=f"video frames are 320x240 = {PIXELS:,} pixels, over the limit of {PIXELS - 1:,}"
    ):
        video_frames(clip)


def test_a_video_at_the_pixel_limit_is_read(clip):
    images.set_max_pixels(PIXELS)
    try:
        assert len(list(video_frames(clip))) == 20
    finally:
        images.set_max_pixels(None)


def _cut(clip, keep: float):
    data = clip.read_bytes()
    cut = clip.with_name("cut.avi")
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


def _jpeg_starts(data) -> list[int]:
    return [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]  # each frame's


def _garbled(clip):
    data = bytearray(clip.read_bytes())
    for start in _jpeg_starts(data):  # every frame's JPEG without its header: none decodes
        data[start : start + 300] = bytes(300)
    bad = clip.with_name("garbled.avi")
    bad.write_bytes(bytes(data))
    return bad


def test_a_cut_video_gives_its_frames_then_an_error(clip):
    frames = []
    with pytest.raises(InputError, match=r"cut.avi: the video ends after (\d+) of its 20 frames"):
        for frame in video_frames(_cut(clip, 0.5)):
            frames.append(frame)
    assert 5 <= len(frames) < 18


def test_a_damaged_video_that_decodes_nothing_is_an_error(clip):
    with pytest.raises(InputError, match="garbled.avi: no frame could be decoded"):
        list(video_frames(_garbled(clip)))


def _caption(*args, model):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecap",
            "caption",
            *map(str, args),
            "--model",
            str(model),
            "--max-length",
            "4",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )


def test_cli_damaged_and_cut_videos_are_one_line_exit_1_without_decoder_noise(clip, tiny_model_dir):
    out = _caption("--video", _garbled(clip), model=tiny_model_dir)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr  # the error, then the stream's counts
    assert "garbled.avi: no frame could be decoded" in lines[0]
    assert lines[1].startswith("edgecap: 0 captions from 0 frames")
    cut = _caption("--video", _cut(clip, 0.5), model=tiny_model_dir)
    assert cut.returncode == 1 and "Traceback" not in cut.stderr
    n_captions = len(cut.stdout.splitlines())
    assert n_captions >= 5  # the readable frames are captioned and kept
    assert f"the video ends after {n_captions} of its 20 frames" in cut.stderr


def test_cli_video_over_the_pixel_limit_is_exit_2(clip, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(ENV, images.MAX_PIXELS_ENV, str(PIXELS - 1))
    out = _caption("--video", clip, model=tiny_model_dir)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "over the limit" in out.stderr and "EDGECAP_MAX_PIXELS" in out.stderr


def test_cli_a_video_whose_name_is_not_utf8_is_captioned_not_a_crash(clip, tiny_model_dir):
    """A file name that is not UTF-8 (a camera's card written on another system, an old
    archive): Python gives it with surrogate escapes, on which cv2.VideoCapture crashed (a
    segmentation fault, exit -11, no word); its frames are captioned as under any name."""
    named = clip.rename(clip.with_name(os.fsdecode(b"clip-\xff\xfe.avi")))
    out = _caption("--video", named, "--every", "1", model=tiny_model_dir)
    assert out.returncode == 0, out
    times = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert times == ["0.00s", "1.00s"]  # 20 frames at 10 fps, one a second
    assert out.stderr.startswith("edgecap: 2 captions from 20 frames"), out.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="opened through /proc/self/fd (Linux)")
def test_a_video_whose_name_is_not_utf8_is_read_by_an_opencv_that_takes_no_bytes(clip, monkeypatch):
    """OpenCV 4.8 (the oldest edgecap[video] allows) takes a name as str only: the name's bytes
    were a cv2.error ("Overload resolution failed"), a traceback from the CLI, and the str a
    segmentation fault. Imitated: a VideoCapture refusing bytes as 4.8 does; the 20 frames of
    the clip are read all the same, and the file is not left open."""
    import cv2

    real = cv2.VideoCapture

    def like_opencv_4_8(name, *args):
        if isinstance(name, bytes):
            raise cv2.error("OpenCV(4.8.0) :-1: error: (-5:Bad argument) in function 'VideoCapture'")
        return real(name, *args)

    monkeypatch.setattr(cv2, "VideoCapture", like_opencv_4_8)
    named = clip.rename(clip.with_name(os.fsdecode(b"clip-\xff\xfe.avi")))
    open_before = set(os.listdir("/proc/self/fd"))
    frames = list(video_frames(named))
    assert [f.index for f in frames] == list(range(20))
    assert set(os.listdir("/proc/self/fd")) <= open_before


def test_a_video_name_too_long_for_the_file_system_is_one_line_exit_2(tmp_path, tiny_model_dir):
    """A file name over the file system's 255 bytes (a name built from a long title, a path
    pasted twice): the check that the file exists raised OSError ENAMETOOLONG, a traceback and
    exit 1 from the CLI; it is the video's InputError, exit 2 like a missing file."""
    pytest.importorskip("cv2")
    name = str(tmp_path / ("a" * 300 + ".mp4"))
    with pytest.raises(InputError, match=r"cannot read the file \(File name too long\)"):
        video_frames(name)
    out = _caption("--video", name, model=tiny_model_dir)
    assert (out.returncode, out.stdout) == (2, ""), out
    assert out.stderr == f"edgecap caption: error: {name}: cannot read the file (File name too long)\n"


@pytest.mark.parametrize("index", [-1, -2, 1024, True, 1.5, "0"])
def test_camera_index_out_of_range_is_refused_before_opencv(index, monkeypatch):
    import cv2

    def never(*args):
        raise AssertionError("OpenCV was asked to open the camera")

    monkeypatch.setattr(cv2, "VideoCapture", never)
    with pytest.raises(InputError, match="the camera index must be a whole number from 0 to 1023"):
        camera_frames(index)


@pytest.mark.parametrize("size", [{"width": -640}, {"height": 0}, {"width": 1 << 20}])
def test_camera_capture_size_out_of_range_is_refused(size):
    with pytest.raises(InputError, match="must be a whole number from 1 to 32768"):
        camera_frames(0, **size)


def test_cli_negative_camera_index_is_one_line_exit_2_not_a_crash(tiny_model_dir):
    pytest.importorskip("cv2")
    out = _caption("--camera=-1", model=tiny_model_dir)
    assert out.returncode == 2, out  # was -11 (SIGSEGV) where no camera is connected
    assert out.stderr == (
        "edgecap caption: error: camera -1: the camera index must be a whole number from 0 to 1023\n"
    )


def _one_frame_damaged(clip, frame: int):
    data = bytearray(clip.read_bytes())
    start = _jpeg_starts(data)[frame]
    data[start : start + 300] = bytes(300)
    bad = clip.with_name("one_damaged.avi")
    bad.write_bytes(bytes(data))
    return bad


def test_a_damaged_frame_in_the_middle_loses_only_itself(clip, tiny_model_dir):
    """One damaged frame (of 20) used to end the video there: the 12 frames after it were lost."""
    bad = _one_frame_damaged(clip, 7)
    frames = []
    with pytest.raises(InputError, match=r"one_damaged.avi: 1 frame could not be decoded .*frame 7\)"):
        for frame in video_frames(bad):
            frames.append(frame)
    assert [f.index for f in frames] == [i for i in range(20) if i != 7]
    out = _caption("--video", bad, model=tiny_model_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stdout.splitlines()) == 19
    assert "1 frame could not be decoded" in out.stderr
