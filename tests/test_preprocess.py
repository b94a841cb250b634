"""The encoder's input for images whose three channels differ: channel order (RGB, never BGR),
normalisation and the (3, H, W) layout, against values computed by hand; and the blank-frame
check's statistics (``recognisable``) on grey frames worked out by hand.

The shipped model's preprocessing (edgecap/assets/default/manifest.json, copied here as
literals): size 224 x 224, bilinear, mean (127.5, 127.5, 127.5), std (127.5, 127.5, 127.5) on
the 0-255 scale, so input = (x - 127.5) / 127.5 = 2 * (x / 255) - 1:
    R = 255 -> (255 - 127.5) / 127.5 =  1.0
    G =   0 -> (  0 - 127.5) / 127.5 = -1.0
    B = 128 -> (128 - 127.5) / 127.5 =  0.5 / 127.5 = 0.0039215686
Images of one solid colour, so resizing (bilinear) keeps every pixel value.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import Captioner
from edgecap.images import load_rgb, preprocess
from edgecap.preprocess import Preprocessing, frame_statistics, recognisable, to_model_input
from helpers import EXAMPLES, TableBackend, encoded_bytes, solid, with_lights

MANIFEST = Path(edgecap.__file__).parent / "assets" / "default" / "manifest.json"
SHIPPED = Preprocessing(
    size=(224, 224), mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), resample="bilinear"
)
COLOUR = (255, 0, 128)  # R, G, B
EXPECTED = (1.0, -1.0, 0.0039215686)  # per channel, worked out above
JPEG_TOL = 4 / 127.5  # JPEG may move a solid colour by a few levels


def test_the_literals_are_the_shipped_manifests():
    pre = json.loads(MANIFEST.read_text())["preprocessing"]
    assert pre == {
        "size": [224, 224],
        "mean": [127.5, 127.5, 127.5],
        "std": [127.5, 127.5, 127.5],
        "resample": "bilinear",
    }


def _model_input(image, color="rgb", pre=SHIPPED) -> np.ndarray:
    out = preprocess([load_rgb(image, color)], pre)
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    return out[0]


def _assert_channels(x: np.ndarray, expected, tol=1e-6):
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(x[channel], value, atol=tol, err_msg=f"channel {channel}")


def _png_path(tmp_path, array) -> str:
    path = tmp_path / "solid.png"
    Image.fromarray(array).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["rgb array", "bgr array", "pil", "png bytes", "png path"])
def test_solid_colour_is_normalised_per_channel_in_rgb_order(kind, tmp_path):
    rgb = solid(COLOUR)
    image, color = {
        "rgb array": (rgb, "rgb"),
        "bgr array": (np.ascontiguousarray(rgb[:, :, ::-1]), "bgr"),
        "pil": (Image.fromarray(rgb), "rgb"),
        "png bytes": (encoded_bytes(rgb, "PNG"), "rgb"),
        "png path": (_png_path(tmp_path, rgb), "rgb"),
    }[kind]
    _assert_channels(_model_input(image, color), EXPECTED)


@pytest.mark.parametrize("as_path", [False, True])
def test_solid_colour_jpeg(as_path, tmp_path):
    data = encoded_bytes(solid(COLOUR), "JPEG", quality=95)
    if as_path:
        (tmp_path / "solid.jpg").write_bytes(data)
        data = str(tmp_path / "solid.jpg")
    _assert_channels(_model_input(data), EXPECTED, tol=JPEG_TOL)


def test_rgb_array_read_as_bgr_swaps_red_and_blue():
    # The same bytes declared BGR: the first stored channel (255) is blue, the last (128) red.
    #   R = 128 -> 0.0039215686, G = 0 -> -1.0, B = 255 -> 1.0
    _assert_channels(_model_input(solid(COLOUR), "bgr"), (0.0039215686, -1.0, 1.0))


def test_distinct_mean_and_std_per_channel():
    # ImageNet-style values on the 0-255 scale, so each channel has its own mean and std:
    #   R: (255 - 123.675) / 58.395 = 131.325 / 58.395 =  2.2489083
    #   G: (  0 - 116.28)  / 57.12  = -116.28 / 57.12  = -2.0357143
    #   B: (128 - 103.53)  / 57.375 =  24.47  / 57.375 =  0.4264924
    pre = Preprocessing(size=(224, 224), mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    _assert_channels(_model_input(solid(COLOUR), pre=pre), (2.2489083, -2.0357143, 0.4264924), tol=1e-5)


def test_layout_is_channels_height_width():
    # A 224 x 224 image (no resize): top half (R, G, B) = (255, 0, 128), bottom half
    # (0, 255, 64), left and right alike. (3, H, W): rows 0-111 hold the first colour.
    #   bottom: R 0 -> -1.0, G 255 -> 1.0, B 64 -> (64 - 127.5) / 127.5 = -0.4980392
    image = np.zeros((224, 224, 3), np.uint8)
    image[:112] = COLOUR
    image[112:] = (0, 255, 64)
    x = _model_input(image)
    _assert_channels(x[:, :112, :], EXPECTED)
    _assert_channels(x[:, 112:, :], (-1.0, 1.0, -0.4980392))


def test_resize_to_the_model_size_keeps_a_solid_colour():
    for size in [(7, 5), (224, 224), (640, 480), (300, 1000)]:
        _assert_channels(_model_input(solid(COLOUR, size)), EXPECTED)


def test_a_model_size_that_is_not_square_is_height_by_width():
    # size (120, 200): 120 rows, 200 columns, whatever the photo's own shape; a photo 200 wide
    # and 120 high keeps its layout: rows 0-59 hold its top half
    pre = Preprocessing(size=(120, 200), mean=SHIPPED.mean, std=SHIPPED.std)
    for size in [(200, 120), (120, 200), (640, 480)]:  # (width, height)
        x = to_model_input(load_rgb(solid(COLOUR, size), "rgb"), pre)
        assert x.shape == (3, 120, 200), size
        _assert_channels(x, EXPECTED)
    image = np.zeros((120, 200, 3), np.uint8)
    image[:60] = COLOUR
    x = to_model_input(load_rgb(image, "rgb"), pre)
    _assert_channels(x[:, :60], EXPECTED)
    _assert_channels(x[:, 60:], (-1.0, -1.0, -1.0))


def test_a_photo_with_one_side_of_the_model_size_is_still_resized():
    """A 224-wide portrait (224 x 448) or a 224-high panorama (448 x 224) has one side at the
    model size already; the other must still be squashed to it: (3, 224, 224), the top half
    of the portrait (rows 0-223 of 448, the colour worked out above) in rows 0-111 of the input
    and its black bottom half ((0 - 127.5) / 127.5 = -1) in rows 112-223, the panorama's left
    half in columns 0-111. Rows and columns next to the boundary (bilinear blends them) are
    left out."""
    portrait = np.zeros((448, 224, 3), np.uint8)
    portrait[:224] = COLOUR
    x = _model_input(portrait)
    _assert_channels(x[:, :108], EXPECTED)
    _assert_channels(x[:, 116:], (-1.0, -1.0, -1.0))
    x = _model_input(np.ascontiguousarray(portrait.transpose(1, 0, 2)))
    _assert_channels(x[:, :, :108], EXPECTED)
    _assert_channels(x[:, :, 116:], (-1.0, -1.0, -1.0))


def test_a_manifest_without_resample_reads_as_bilinear():
    d = SHIPPED.to_dict()
    assert Preprocessing.from_dict(d) == SHIPPED
    del d["resample"]
    assert Preprocessing.from_dict(d).resample == "bilinear"


def test_a_manifests_preprocessing_is_written_and_read_back_field_for_field():
    """What a model's manifest.json records (Manifest, checkpoints, the feature cache key) is
    to_dict's, and from_dict gives the same preprocessing back. The shipped one has mean and
    std equal and a square size, so a swap would not show: an ImageNet normalisation on a
    120 x 200 (height x width) input, written out by hand."""
    pre = Preprocessing(size=(120, 200), mean=IMAGENET.mean, std=IMAGENET.std, resample="bicubic")
    written = {
        "size": [120, 200],
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "resample": "bicubic",
    }
    assert pre.to_dict() == written
    assert Preprocessing.from_dict(json.loads(json.dumps(written))) == pre
    assert Preprocessing.from_dict(written).size == (120, 200)


def test_the_manifests_resample_filter_is_the_one_used():
    """resample="nearest" copies pixels (each output pixel is one of the photo's), where the
    default bilinear blends neighbours: a 4 x 4 checkerboard of 0 and 255 shrunk to 2 x 2 is
    all -1.0 / 1.0 with nearest, and strictly between with bilinear."""
    board = np.where(np.add.outer(np.arange(4), np.arange(4)) % 2 == 1, 255, 0).astype(np.uint8)
    image = load_rgb(np.repeat(board[:, :, None], 3, axis=2), "rgb")
    nearest = to_model_input(
        image, Preprocessing(size=(2, 2), mean=SHIPPED.mean, std=SHIPPED.std, resample="nearest")
    )
    assert np.isin(nearest, (-1.0, 1.0)).all()
    blended = to_model_input(image, Preprocessing(size=(2, 2), mean=SHIPPED.mean, std=SHIPPED.std))
    assert (np.abs(blended) < 0.99).all()


# -- the blank-frame check (edgecap.preprocess.recognisable) -----------------------------------
# Grey frames, 224 x 224 (no resize): the grey image in pixel levels is the pixel value minus the
# mean, averaged over 4 x 4 blocks (56 x 56). A vertical ramp, pixel row r at level r, gives the
# blocks 4i + 1.5 (i the block row): variance 16 (56^2 - 1) / 12 = 4180, and no Laplacian (a
# linear image: 2 g(i) - g(i - 1) - g(i + 1) = 0).


def _ramp(columns: np.ndarray) -> np.ndarray:
    """The ramp plus ``columns`` (224,) levels added to each pixel column, as an RGB frame."""
    grey = np.arange(224)[:, None] + columns[None, :]
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


# stripes 8 px wide, alternately 0 and 1 level: block columns 0 0 1 1 0 0 ...; every interior
# block's |2 s(j) - s(j - 1) - s(j + 1)| = 1; variance 4180 + 0.25
STRIPES = (np.arange(224) // 8 % 2).astype(np.int64)
# one line 4 px wide (block column 28), 8 levels: |Laplacian| 16 at it, 8 beside it, over the
# 54 interior block columns: mean 32 / 54
LINE = np.where(np.arange(224) // 4 == 28, 8, 0)
IMAGENET = Preprocessing(size=(224, 224), mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


@pytest.mark.parametrize("pre", [SHIPPED, IMAGENET], ids=["shipped", "imagenet"])
def test_the_frame_statistics_are_in_pixel_levels_whatever_the_normalisation(pre):
    x = to_model_input(load_rgb(_ramp(STRIPES), "rgb"), pre)
    spread, detail = frame_statistics(x, pre)
    assert spread == pytest.approx(4180.25**0.5, rel=1e-4) and detail == pytest.approx(1.0, abs=1e-3)
    _, detail = frame_statistics(to_model_input(load_rgb(_ramp(LINE), "rgb"), pre), pre)
    assert detail == pytest.approx(32 / 54, abs=1e-3)


def test_a_frame_that_varies_but_holds_no_detail_is_not_recognisable():
    # std 64.7 (>= 6.4) but mean |Laplacian| 0, 1.0 or 0.59 (< 1.5): a smooth gradient, and one
    # with faint stripes or a faint line, is blurred past any detail
    for columns in (np.zeros(224, np.int64), STRIPES, LINE):
        assert not recognisable(to_model_input(load_rgb(_ramp(columns), "rgb"), SHIPPED), SHIPPED)
    # the same stripes at 2 levels (mean |Laplacian| 2.0) are detail enough
    assert recognisable(to_model_input(load_rgb(_ramp(2 * STRIPES), "rgb"), SHIPPED), SHIPPED)


def test_a_frame_of_little_spread_is_recognisable_unless_it_is_uniform_or_noise():
    """Stripes 8 pixels wide of 100 and 100 + a levels: the 56 blocks of a row go 0, 0, a, a,
    ..., standard deviation a / 2, and each interior block has one horizontal neighbour like it
    and one a away: mean |Laplacian| a (>= 1.5; a ratio of 2, a scene's, not noise's). As taken,
    a frame needs a deviation of 1.5 (a foggy photo's contrast: a = 4, deviation 2.0, is
    recognisable; a = 2, deviation 1.0, is not); brightened, of 6.4 (a = 12, deviation 6.0, is
    not; a = 13, 6.5, is). A checkerboard of 4 pixel squares (mean |Laplacian| 4 a, 8 times the
    deviation: noise's ratio) of deviation under 6.4 is noise as taken too (a = 12); a = 13 in
    good light is not judged by the ratio (close-ups of text and tiles reach it)."""
    stripes = np.tile((np.arange(224) // 8) % 2, (224, 1))
    checker = np.add.outer(np.arange(224) // 4, np.arange(224) // 4) % 2
    cases = [  # (blocks, a, ratio, recognisable as taken, recognisable brightened)
        (stripes, 2, 2, False, False),
        (stripes, 4, 2, True, False),
        (stripes, 12, 2, True, False),
        (stripes, 13, 2, True, True),
        (checker, 12, 8, False, False),
        (checker, 13, 8, True, False),
    ]
    for blocks, a, ratio, as_taken, brightened in cases:
        frame = np.repeat((100 + a * blocks).astype(np.uint8)[:, :, None], 3, axis=2)
        x = to_model_input(load_rgb(frame, "rgb"), SHIPPED)
        spread, detail = frame_statistics(x, SHIPPED)
        assert spread == pytest.approx(a / 2, rel=1e-4) and detail == pytest.approx(ratio * a / 2, rel=1e-4)
        assert recognisable(x, SHIPPED) is as_taken, (ratio, a)
        assert recognisable(x, SHIPPED, brightened=True) is brightened, (ratio, a)


def test_a_brightened_frame_whose_detail_is_noise_is_not_recognisable():
    """4 x 4 pixel squares in a checkerboard of 100 and 100 + a levels: the blocks alternate 0
    and a, standard deviation a / 2, each interior block a away from its 4 neighbours: mean
    |Laplacian| 4 a, 8 times the spread, as noise has it (photos: at most 1.85 times; sensor
    noise about 3.5). Brightened, not recognisable at any contrast (a = 13 and 80 pass the
    spread and detail thresholds). Stripes 4 pixels wide (each block a away from both
    horizontal neighbours: mean |Laplacian| 2 a, 4 times the spread) are not either; 8 pixels
    wide (one neighbour a away: a, twice the spread) are. A frame that was not brightened is not
    judged by the ratio (close-ups of text and tiles reach it too): all are recognisable."""
    checker = np.add.outer(np.arange(224) // 4, np.arange(224) // 4) % 2
    narrow = np.tile((np.arange(224) // 4) % 2, (224, 1))
    wide = np.tile((np.arange(224) // 8) % 2, (224, 1))
    for blocks, ratio, expected in ((checker, 8, False), (narrow, 4, False), (wide, 2, True)):
        for a in (13, 80):
            frame = np.repeat((100 + a * blocks).astype(np.uint8)[:, :, None], 3, axis=2)
            x = to_model_input(load_rgb(frame, "rgb"), SHIPPED)
            spread, detail = frame_statistics(x, SHIPPED)
            assert detail == pytest.approx(ratio * spread, rel=1e-4)
            assert recognisable(x, SHIPPED, brightened=True) is expected, (ratio, a)
            assert recognisable(x, SHIPPED) is True, (ratio, a)


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "tall"])
def test_the_frame_statistics_of_a_model_size_that_is_not_square_cover_the_whole_frame(wide):
    """A model input of 16 x 32 pixels (or 32 x 16) is 4 x 8 blocks: the half away from the
    origin 30 levels above the other (100 and 130), a step across the long side. Standard
    deviation 30 / 2 = 15; the mean |Laplacian| over the 2 x 6 interior blocks: at the two
    block lines beside the step |2 g - left - right| = 30, elsewhere 0, so 2 x 30 / 6 = 10.
    The statistics see the whole frame, not its first square (all 100: 0 and 0)."""
    blocks = np.full((4, 8), 100, np.uint8)
    blocks[:, 4:] = 130
    grey = np.kron(blocks, np.ones((4, 4), np.uint8))
    if not wide:
        grey = grey.T
    pre = Preprocessing(size=grey.shape, mean=SHIPPED.mean, std=SHIPPED.std)
    x = to_model_input(load_rgb(np.repeat(grey[:, :, None], 3, axis=2), "rgb"), pre)
    assert x.shape == (3, *grey.shape)
    spread, detail = frame_statistics(x, pre)
    assert spread == pytest.approx(15.0, rel=1e-4) and detail == pytest.approx(10.0, rel=1e-4)
    assert recognisable(x, pre)


# -- through the Captioner: what reaches the encoder ------------------------------------------
@pytest.fixture
def recording_captioner(monkeypatch):
    """Captioner() on the shipped model's manifest, its backend a TableBackend that records
    each batch given to ``encode``."""
    words = json.loads((MANIFEST.parent / "vocab.json").read_text())["words"]
    backend = TableBackend(words, lambda prefix: {"a": -0.1, "<end>": -0.2}, top_k=10)
    monkeypatch.setattr(edgecap.api, "load_backend", lambda name, manifest, **kw: backend)
    return Captioner(backend="onnxruntime"), backend


def test_the_encoder_gets_rgb_channels_from_every_kind_of_input(recording_captioner, tmp_path):
    captioner, backend = recording_captioner
    rgb = solid(COLOUR)
    inputs = [
        (rgb, "rgb"),
        (np.ascontiguousarray(rgb[:, :, ::-1]), "bgr"),
        (encoded_bytes(rgb, "PNG"), "rgb"),
        (_png_path(tmp_path, rgb), "rgb"),
        (Image.fromarray(rgb), "rgb"),
    ]
    for image, color in inputs:
        captioner.caption(image, color=color)
        (x,) = backend.encoded_batches[-1]
        assert x.shape == (3, 224, 224)
        _assert_channels(x, EXPECTED)
    captioner.caption(encoded_bytes(rgb, "JPEG", quality=95))
    _assert_channels(backend.encoded_batches[-1][0], EXPECTED, tol=JPEG_TOL)
    # The RGB array declared BGR reaches the encoder with red and blue swapped.
    captioner.caption(rgb, color="bgr")
    _assert_channels(backend.encoded_batches[-1][0], (0.0039215686, -1.0, 1.0))


def test_caption_batch_keeps_each_images_colour(recording_captioner):
    captioner, backend = recording_captioner
    # (10, 20, 250): -117.5 / 127.5 = -0.9215686, -107.5 / 127.5 = -0.8431373,
    #                 122.5 / 127.5 =  0.9607843
    colours = {
        (255, 0, 128): EXPECTED,
        (0, 255, 64): (-1.0, 1.0, -0.4980392),
        (10, 20, 250): (-0.9215686, -0.8431373, 0.9607843),
    }
    captioner.caption_batch([solid(c) for c in colours])
    (batch,) = backend.encoded_batches
    assert batch.shape == (3, 3, 224, 224)
    for x, expected in zip(batch, colours.values()):
        _assert_channels(x, expected)


# -- dark frames ---------------------------------------------------------------------------------


def _level_frame(level: int, bright: int = 0, at: int = 255) -> np.ndarray:
    """A 224 x 224 frame of ``level`` with its first ``bright`` pixels (of 50,176) at ``at``."""
    frame = np.full((224 * 224, 3), level, np.uint8)
    frame[:bright] = at
    return frame.reshape(224, 224, 3)


def test_a_dark_frame_is_multiplied_up_to_the_full_range_by_at_most_8():
    """The gain, hand-computed: a frame whose brightest 1% (the 99th percentile of each pixel's
    largest channel) is at 51 is multiplied by 255 / 51 = 5; at 20, by 8 (the cap, not 12.75);
    at 127 by 255 / 127; at 128 and above not at all, nor a black frame (0) beyond 8. 501
    pixels at 101 (under 1% of 50,176) leave a frame of 51 at 5x; 502 at 101 make its level
    101 (255 / 101); 502 at 102, twice the 51 of its brightest 5%, are lights: metered on the
    brightest 5%, 5x. Lights at 255 over 2,508 pixels (5%) leave it at 5x; over 2,509 it is
    not dark."""
    from edgecap.preprocess import exposure_gain

    def gain(frame):
        return float(exposure_gain(np.asarray(frame).transpose(2, 0, 1)))

    assert gain(_level_frame(51)) == 5.0
    assert gain(_level_frame(20)) == 8.0 and gain(_level_frame(0)) == 8.0
    assert gain(_level_frame(127)) == pytest.approx(255 / 127, rel=1e-7)
    assert gain(_level_frame(128)) == 1.0 and gain(_level_frame(200)) == 1.0
    assert gain(_level_frame(51, bright=501, at=101)) == 5.0
    assert gain(_level_frame(51, bright=502, at=101)) == pytest.approx(255 / 101, rel=1e-7)
    assert gain(_level_frame(51, bright=502, at=102)) == 5.0
    assert gain(_level_frame(51, bright=502)) == 5.0
    assert gain(_level_frame(51, bright=2508)) == 5.0
    assert gain(_level_frame(51, bright=2509)) == 1.0
    # the largest channel counts: a deep red at 200 is not dark
    red = np.zeros((224, 224, 3), np.uint8)
    red[..., 0] = 200
    assert gain(red) == 1.0


def test_a_dark_scene_with_lights_in_view_is_brightened():
    """The cat photo at a tenth of its light (its brightest pixels under level 26) with a white
    patch over 2% of the frame: the patch is its brightest 1% but not 5%, so the frame is
    metered on the scene and gets the 8x cap (255 / 26 is over 8), as it does without the patch;
    the patch clips. Over 6% and 20% of the frame the patch is the brightest 5% too, but not the
    brightest 25% (the scene, under level 32): metered on those, 8x. Over 30% the lights are the
    scene: not brightened. The photo as taken is not brightened."""
    from edgecap.preprocess import model_input

    photo = np.asarray(load_rgb(str(EXAMPLES / "chelsea.png"), "rgb"))

    def gain(frame):
        return float(model_input(Image.fromarray(frame), SHIPPED, brighten=True)[1])

    assert photo.max() * 0.1 < 26
    assert gain(np.round(photo * 0.1).astype(np.uint8)) == 8.0
    assert gain(with_lights(photo, 0.1, 0.02)) == 8.0
    assert gain(with_lights(photo, 0.1, 0.06)) == 8.0
    assert gain(with_lights(photo, 0.1, 0.2)) == 8.0
    assert gain(with_lights(photo, 0.1, 0.3)) == 1.0
    assert gain(photo) == 1.0


def test_lights_over_5_to_25_percent_of_a_night_scene_are_let_clip():
    """The wide tier, hand-computed on 50,176 pixels: a night frame of level 20 with 12,544
    pixels (25%) at 255 has lights as its brightest 1% and 5% alike, but its brightest 25% are at
    20, under half of 255 and under level 32: metered on them, 255 / 20 capped at 8x. One pixel
    more and the lights are the brightest 25%: not dark. Lights at 40 (twice 20) over 10% are
    lights: 8x; at 39, not: metered on the brightest 1% (39), 255 / 39. A scene of level 32 is
    not a night scene: lights over 10% of it leave it as it is (a day's sky over its ground)."""
    from edgecap.preprocess import exposure_gain

    def gain(frame):
        return float(exposure_gain(np.asarray(frame).transpose(2, 0, 1)))

    assert gain(_level_frame(20, bright=12544)) == 8.0
    assert gain(_level_frame(20, bright=12545)) == 1.0
    assert gain(_level_frame(20, bright=5018, at=40)) == 8.0
    assert gain(_level_frame(20, bright=5018, at=39)) == pytest.approx(255 / 39, rel=1e-7)
    assert gain(_level_frame(31, bright=5018)) == 8.0
    assert gain(_level_frame(32, bright=5018)) == 1.0


def test_a_black_frame_gets_the_full_gain_without_a_division_by_zero():
    """A black frame (a lens cap) has level 0: its gain is 255 / max(0, 1) = 255, capped at 8,
    worked out without dividing by zero, so a program running with warnings as errors (python
    -W error) is not stopped by a RuntimeWarning; its input stays black ((0 - 127.5) / 127.5 =
    -1)."""
    from edgecap.preprocess import exposure_gain

    black = _level_frame(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(exposure_gain(black.transpose(2, 0, 1))) == 8.0
        x = to_model_input(Image.fromarray(black), SHIPPED, brighten=True)
    _assert_channels(x, (-1.0, -1.0, -1.0))


def test_brightening_multiplies_the_levels_and_caps_them_at_255():
    """The encoder input of a dark frame brightened is that of the frame with its levels times
    the gain (51 -> 255 at 5x, 60 -> 300 capped at 255); a frame that is not dark is the same
    input either way."""
    frame = _level_frame(51, bright=0)
    frame[0, :5] = 60  # a few pixels above the level
    got = to_model_input(Image.fromarray(frame), SHIPPED, brighten=True)
    want = to_model_input(
        Image.fromarray(np.minimum(frame.astype(np.int64) * 5, 255).astype(np.uint8)), SHIPPED
    )
    np.testing.assert_array_equal(got, want)
    photo = np.asarray(load_rgb(str(EXAMPLES / "astronaut.png"), "rgb"))
    np.testing.assert_array_equal(
        to_model_input(Image.fromarray(photo), SHIPPED, brighten=True),
        to_model_input(Image.fromarray(photo), SHIPPED),
    )
