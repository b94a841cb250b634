"""Letterbox and pillarbox bars (docs/cameras.md, "Black bars"): found to the line in frames
built here with bars of known size, cropped before a frame is captioned and checked, on the host
and on the torch backend's device, said in ``Caption.crop`` and ``--json``'s ``crop``, and the
attention figure drawn over the picture between them. Frames that are photos, or whose dark
edges are not a pair of flat bars, are left whole."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from edgecap import Captioner
from edgecap.api import NOTHING_RECOGNISABLE
from edgecap.errors import InputError
from edgecap.cli import main
from edgecap.preprocess import bar_box
from edgecap.viz import attention_figure
from helpers import EXAMPLES


def _picture(name: str, width: int, height: int) -> np.ndarray:
    with Image.open(EXAMPLES / name) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))


def _framed(picture: np.ndarray, top: int, bottom: int, left: int, right: int, level: int = 0) -> np.ndarray:
    """``picture`` with bars of these many lines, each pixel of them at ``level``."""
    h, w = picture.shape[:2]
    frame = np.full((top + h + bottom, left + w + right, 3), level, np.uint8)
    frame[top : top + h, left : left + w] = picture
    return frame


def _jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("RGB"))


# 16:9 in 4:3: a 640x360 picture in a 640x480 frame, 60 lines above and below
LETTERBOXED = _framed(_picture("chelsea.png", 640, 360), 60, 60, 0, 0)


def test_letterbox_and_pillarbox_bars_are_found_to_the_line():
    """Black bars, and the level-16 bars of video that keeps its limited range, as a PIL image
    and as an array; bars of 59 and 61 lines (an odd difference) too."""
    assert bar_box(LETTERBOXED) == (0, 60, 640, 420)
    assert bar_box(Image.fromarray(LETTERBOXED)) == (0, 60, 640, 420)
    pillarboxed = _framed(_picture("astronaut.png", 480, 360), 0, 0, 80, 80, level=16)  # 4:3 in 16:9
    assert bar_box(pillarboxed) == (80, 0, 560, 360)
    assert bar_box(Image.fromarray(pillarboxed)) == (80, 0, 560, 360)
    assert bar_box(_framed(_picture("coffee.png", 640, 360), 59, 61, 0, 0)) == (0, 59, 640, 419)


def test_bars_are_dark_up_to_level_24():
    """docs/cameras.md: a bar is dark, no channel above level 24. Flat bars at 24 are bars; at
    25, or with one channel at 25, they are not."""
    picture = _picture("chelsea.png", 640, 360)
    assert bar_box(_framed(picture, 60, 60, 0, 0, level=24)) == (0, 60, 640, 420)
    assert bar_box(_framed(picture, 60, 60, 0, 0, level=25)) is None
    reddish = _framed(picture, 60, 60, 0, 0, level=24)
    reddish[:60, :, 0] = reddish[-60:, :, 0] = 25
    assert bar_box(reddish) is None


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_bars_through_jpeg_are_cropped_with_the_codecs_ringing(quality):
    """JPEG rings at the picture's edge (up to 12 levels over the bar's last 8-12 lines): the
    bars end at the picture's edge all the same, within a JPEG block (8 lines) of it."""
    left, top, right, bottom = bar_box(_jpeg(LETTERBOXED, quality))
    assert (left, right) == (0, 640)
    assert abs(top - 60) <= 8 and abs(bottom - 420) <= 8


def test_the_documented_thresholds_of_a_pair_of_bars():
    """docs/cameras.md, on 400-line frames: each bar at least 2% of the frame (8 lines and 8,
    not 7 and 8); at least 15% of the frame between them (60 lines, not 59); the picture's
    edges at most 16 lines apart (40 and 56, not 57), or 2% on a 1,000-line frame (100 and
    120, not 121); a bar's lines
    within 2 levels of its edge line (30 lines at 0 then 30 at 2: one bar of 60; at 3 the
    bar ends at 30, the band at 3 part of the picture); the picture's edge within 16 lines
    (here also 4% of the frame) after the bar, past lines that are neither flat nor picture
    (40% of their pixels at 20): 16 such lines are cropped with the bar, 17 leave it no bar;
    on a 300-line frame too (4% of it is 12 lines); a line of which half the pixels (320 of 640)
    are over 2 levels above the bar is the picture's edge, 319 are not."""
    picture = lambda lines: _picture("chelsea.png", 640, lines)  # noqa: E731
    assert bar_box(_framed(picture(384), 8, 8, 0, 0)) == (0, 8, 640, 392)
    assert bar_box(_framed(picture(385), 7, 8, 0, 0)) is None
    assert bar_box(_framed(picture(60), 170, 170, 0, 0)) == (0, 170, 640, 230)
    assert bar_box(_framed(picture(59), 170, 171, 0, 0)) is None
    # the picture's two edges at most 16 lines apart, or 2% of the frame where that is more
    assert bar_box(_framed(picture(304), 40, 56, 0, 0)) == (0, 40, 640, 344)
    assert bar_box(_framed(picture(303), 40, 57, 0, 0)) is None
    assert bar_box(_framed(picture(780), 100, 120, 0, 0)) == (0, 100, 640, 880)
    assert bar_box(_framed(picture(779), 100, 121, 0, 0)) is None
    for inner, top in ((2, 60), (3, 30)):
        frame = _framed(picture(280), 60, 60, 0, 0)
        frame[30:60] = frame[-60:-30] = inner
        assert bar_box(frame) == (0, top, 640, 400 - top), inner
    for lines, ring, box in ((400, 16, (0, 56, 640, 344)), (400, 17, None), (300, 16, (0, 56, 640, 244))):
        frame = _framed(picture(lines - 80 - 2 * ring), 40 + ring, 40 + ring, 0, 0)
        frame[40 : 40 + ring, :256] = frame[-40 - ring : -40, :256] = 20
        assert bar_box(frame) == box, (lines, ring)
    # flat: a standard deviation of at most 2.5 levels along a line (every other pixel at 5,
    # the rest 0: 2.5; at 6: 3)
    for level, box in ((5, (0, 60, 640, 340)), (6, None)):
        frame = _framed(picture(280), 60, 60, 0, 0)
        frame[:60, ::2] = frame[-60:, ::2] = level
        assert bar_box(frame) == box, level
    # half the pixels of a line over 2 levels above the bar make it the picture's edge line
    for brighter, top in ((320, 40), (319, 56)):
        frame = _framed(picture(288), 56, 56, 0, 0)
        frame[40:56, :brighter] = frame[-56:-40, :brighter] = 20
        assert bar_box(frame) == (0, top, 640, 400 - top), brighter


def test_frames_without_a_pair_of_flat_dark_bars_are_left_whole(example_images):
    """Photos; a dark band at one edge only (a night sky); bars thinner than 2% of the frame;
    bars of very different size; dark edges that are not flat (a dark scene's texture); a
    frame that is black throughout (the blank check's, not the bars')."""
    for path in example_images:
        with Image.open(path) as im:
            assert bar_box(im.convert("RGB")) is None, path.name
    picture = _picture("chelsea.png", 640, 360)
    assert bar_box(_framed(picture, 120, 0, 0, 0)) is None
    assert bar_box(_framed(picture, 7, 7, 0, 0)) is None  # 7 of 374 lines: under 2%
    assert bar_box(_framed(picture, 80, 30, 0, 0)) is None
    rng = np.random.default_rng(0)
    textured = _framed(picture, 60, 60, 0, 0)
    textured[:60] = rng.integers(0, 25, (60, 640, 3), dtype=np.uint8)  # dark, but 24 levels apart
    textured[-60:] = rng.integers(0, 25, (60, 640, 3), dtype=np.uint8)
    assert bar_box(textured) is None
    assert bar_box(np.zeros((480, 640, 3), np.uint8)) is None


def test_a_dim_scene_lit_in_the_middle_is_left_whole():
    """A dim room lit in the middle (a lamp's pool of light, peak level 60): its edges are dark
    and flat as bars are, at all four sides, but the dark fades into the light instead of ending
    at the picture's edge line. It had been cropped to the pool of light (as were 154 of 1,500
    Flickr8k photos at a twentieth of their light, one to a strip of 6 lines, their captions
    the worse for it)."""
    rows, columns = np.mgrid[0:480, 0:640]
    level = 60 * np.exp(-((rows - 240) ** 2 + (columns - 320) ** 2) / (2 * 100**2))
    assert bar_box(np.repeat(np.round(level).astype(np.uint8)[..., None], 3, axis=2)) is None


def test_bars_must_leave_a_quarter_of_the_frame_to_the_picture():
    """A black frame with a lit line across it (an LED strip, a slit of light under a door): no
    picture between bars (it had been cropped to the one line); a 9:16 phone video pillarboxed
    in 16:9, 32% of the width, is."""
    slit = np.zeros((480, 640, 3), np.uint8)
    slit[240] = 200
    assert bar_box(slit) is None
    phone = _framed(_picture("astronaut.png", 203, 360), 0, 0, 218, 219)  # 203 of 640 columns
    assert bar_box(phone) == (218, 0, 421, 360)


@pytest.fixture(scope="module")
def shipped(default_model_dir):
    return Captioner(default_model_dir)


def test_a_letterboxed_frame_is_captioned_as_the_picture_between_its_bars(shipped, default_model_dir):
    """The caption of the frame is the picture's own (the bars squashed in with it gave the
    shipped model another one), and ``crop`` says which part was captioned; ``crop_bars=False``
    captions the whole frame."""
    picture = LETTERBOXED[60:420]
    framed, alone = shipped.caption(LETTERBOXED), shipped.caption(picture)
    assert (framed.text, framed.confidence) == (alone.text, alone.confidence)
    assert framed.crop == (0.0, 0.125, 1.0, 0.875) and alone.crop is None
    whole = Captioner(default_model_dir, crop_bars=False).caption(LETTERBOXED)
    assert whole.crop is None and whole.text != alone.text


def test_a_blank_frame_with_bars_is_nothing_recognisable(shipped, default_model_dir):
    """The bars had made a blank frame (a wall, a covered lens) look like a scene: captioned
    with invented text. Between its bars it is uniform, and judged so."""
    wall = _framed(np.full((360, 480, 3), 200, np.uint8), 0, 0, 80, 80)
    seen = shipped.caption(wall)
    assert (seen.text, seen.recognisable, seen.crop) == (
        NOTHING_RECOGNISABLE,
        False,
        (1 / 8, 0.0, 7 / 8, 1.0),
    )
    assert Captioner(default_model_dir, crop_bars=False).caption(wall).recognisable
    # a covered lens (level 6, dark and flat as the bars are) between black bars: the bars end
    # where the level rises (the 16 lines after them taken for a codec's ringing)
    capped = _framed(np.full((360, 640, 3), 6, np.uint8), 60, 60, 0, 0)
    left, top, right, bottom = bar_box(capped)
    assert (left, right) == (0, 640) and 60 <= top <= 60 + 16 and 420 - 16 <= bottom <= 420
    assert shipped.caption(capped).text == NOTHING_RECOGNISABLE
    assert Captioner(default_model_dir, crop_bars=False).caption(capped).recognisable


def test_the_device_preprocessing_crops_the_bars_as_the_host(default_model_dir):
    """The torch backend's ``preprocess="device"`` gets the picture between the bars: the host
    path's caption and crop."""
    pytest.importorskip("torch")
    host = Captioner(default_model_dir, backend="torch", device="cpu")
    device = Captioner(default_model_dir, backend="torch", device="cpu", preprocess="device")
    assert device.backend.prepares_frames
    want, got = host.caption(LETTERBOXED), device.caption(LETTERBOXED)
    assert (
        (got.text, got.crop)
        == (want.text, want.crop)
        == (host.caption(LETTERBOXED[60:420]).text, (0.0, 0.125, 1.0, 0.875))
    )


def test_json_says_the_part_captioned(tmp_path, capsys):
    """``edgecap caption --json``: ``crop`` as [left, top, right, bottom] fractions, null for a
    frame captioned whole (a photo, or --no-crop-bars)."""
    framed = tmp_path / "framed.png"
    Image.fromarray(LETTERBOXED).save(framed)
    assert main(["caption", "--json", "--no-progress", str(framed), str(EXAMPLES / "chelsea.png")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["crop"] for r in records] == [[0.0, 0.125, 1.0, 0.875], None]
    assert main(["caption", "--json", "--no-progress", "--no-crop-bars", str(framed)]) == 0
    assert json.loads(capsys.readouterr().out)["crop"] is None


def test_the_attention_figure_shows_the_picture_between_the_bars(shipped):
    """The maps cover the part captioned: the figure of the letterboxed frame is the figure of
    the picture between its bars, pixel for pixel."""
    caption = shipped.caption(LETTERBOXED, return_attention=True)
    figure = attention_figure(LETTERBOXED, caption, panel_size=160)
    alone = attention_figure(LETTERBOXED[60:420], replace(caption, crop=None), panel_size=160)
    np.testing.assert_array_equal(np.asarray(figure), np.asarray(alone))


def test_the_alternatives_say_the_part_captioned_too(default_model_dir):
    """``n_best``: the alternatives were searched for in the same part of the frame."""
    caption = Captioner(default_model_dir, beam_size=3, n_best=3).caption(LETTERBOXED)
    assert len(caption.alternatives) == 2
    assert [a.crop for a in caption.alternatives] == [caption.crop] * 2 == [(0.0, 0.125, 1.0, 0.875)] * 2


def test_memory_run_out_looking_for_bars_is_that_inputs_error(shipped, monkeypatch):
    """The search copies a frame with bars whole (a 48-megapixel one: 144 MB): memory run out
    there is that input's error, in its slot, and the other inputs are captioned (it had ended
    the whole call)."""
    import edgecap.api

    real = edgecap.api.bar_box

    def short_of_memory(picture):
        if np.asarray(picture).shape[:2] == LETTERBOXED.shape[:2]:
            raise MemoryError
        return real(picture)

    monkeypatch.setattr(edgecap.api, "bar_box", short_of_memory)
    chelsea = str(EXAMPLES / "chelsea.png")
    failed, captioned = shipped.caption_batch([LETTERBOXED, chelsea], on_error="return")
    assert isinstance(failed, InputError) and "out of memory looking for its black bars (640x480)" in str(
        failed
    )
    assert captioned.text == shipped.caption(chelsea).text


def test_upscaled_video_noisy_bars_and_portrait_frames_are_cropped():
    """What a review found left whole: a compressed SD frame shown upscaled (a player's
    screenshot, a capture card at 1080p: the codec's ringing stretched to 20-30 lines); bars of
    limited-range video at level 16 with a sensor's or an analogue source's noise, 1920 wide
    (a line's brightest and darkest pixels over 6 levels apart by chance alone); a 2.39:1 film
    in a 9:16 phone screen (24% of its height)."""
    upscaled = np.asarray(
        Image.fromarray(_jpeg(LETTERBOXED, 75)).resize((1440, 1080), Image.Resampling.BICUBIC)
    )
    left, top, right, bottom = bar_box(upscaled)
    assert (left, right) == (0, 1440) and abs(top - 135) <= 6 and abs(bottom - 945) <= 6
    film = _framed(_picture("rocket.jpg", 1920, 803), 138, 139, 0, 0, level=16).astype(np.float32)
    film += np.random.default_rng(0).normal(0, 1.0, film.shape)
    assert bar_box(np.clip(np.round(film), 0, 255).astype(np.uint8)) == (0, 138, 1920, 941)
    phone = _framed(_picture("coffee.png", 1080, 452), 734, 734, 0, 0)
    assert bar_box(phone) == (0, 734, 1080, 1186)
