"""Preprocessing in numpy and Pillow (no torch): a decoded RGB photo -> the encoder input.
Decoding any input to RGB is ``edgecap.images``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the encoder's input; recorded in every model manifest."""

    size: tuple[int, int] = (224, 224)  # (height, width); photos are squashed, as in training
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    resample: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            size=tuple(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resample=d.get("resample", "bilinear"),
        )


def to_model_input(image: Image.Image, pre: Preprocessing, brighten: bool = False) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) normalised as the encoder expects; ``brighten``: a
    dark frame's levels multiplied by its ``exposure_gain`` first (at most 255)."""
    return model_input(image, pre, brighten)[0]


def model_input(
    image: Image.Image, pre: Preprocessing, brighten: bool = False
) -> tuple[np.ndarray, np.float32]:
    """``to_model_input`` and the gain its levels were multiplied by (1: not brightened)."""
    h, w = pre.size
    if image.size != (w, h):
        image = image.resize((w, h), getattr(Image.Resampling, pre.resample.upper()))
    # (x - mean) / std as one multiply-add, written straight into the (3, H, W) layout.
    scale = 1.0 / np.asarray(pre.std, np.float32)
    offset = -np.asarray(pre.mean, np.float32) * scale
    pixels = np.asarray(image).transpose(2, 0, 1)
    gain = exposure_gain(pixels) if brighten else np.float32(1)
    if gain != 1:  # float32 levels: the product, then the cap (the device path's two roundings)
        pixels = np.minimum(pixels * gain, np.float32(255))
    out = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, scale[:, None, None], out=out)
    out += offset[:, None, None]
    return out, gain


# A dark frame (a dim room, a night scene, a camera without auto-exposure) is brightened before it
# is captioned, much as a camera's auto-exposure would: when the brightest 1% of its pixels (the
# 99th percentile of each pixel's largest channel, at the model's size) are below DARK_LEVEL, its
# levels are multiplied so that they reach TARGET_LEVEL, by at most MAX_GAIN (3 stops). On the 160
# everyday dev photos (their lowest level is 168: none is brightened as taken), darkened and
# captioned with the blank check on, CIDEr without -> with it (docs/cameras.md, "Dark frames"):
# x0.5 0.394 -> 0.428, x0.3 0.367 -> 0.436, x0.2 0.356 -> 0.427, x0.1 0.286 -> 0.401 (as taken
# 0.436; with the blank check before 2026-12-06, 0.321 and 0.063 without, 129 of the 160 at x0.1
# "nothing recognisable"). The blank check (``recognisable``) sees
# the brightened frame.
# Lights in view (a lamp, a window, a lit screen over 1-5% of a dark frame) are let clip, as a
# camera metering on the scene lets them: where the brightest 1% are at least LIGHTS_RATIO times
# the level of the brightest 5% (the 95th percentile), the frame is metered on the brightest 5%.
# Chosen on data (docs/cameras.md, "Lights in view"): 273 dev photos at 6% of their light with
# lamps over 2% of the frame, CIDEr 0.126 -> 0.311 (+0.185 [+0.144, +0.229]), none brightened
# before; the 160 everyday photos as taken and darkened keep every caption, 4 of the 1,000
# Flickr8k dev photos are brightened anew (+0.001 [-0.000, +0.002]). Metering every frame on the
# 95th percentile won on the lamps too but lost on darkened photos (x0.3 -0.024 [-0.051, +0.002]:
# a scene's own highlights clipped).
# Lights over more than 5% of a night scene (a lit window, a screen, a row of street lamps) are
# let clip too: where the brightest 5% are at least LIGHTS_RATIO times the level of the brightest
# WIDE_SHARE percent and that level is under NIGHT_LEVEL, the frame is metered on the brightest
# WIDE_SHARE percent (the guard keeps a day's bright sky over its darker ground as it is). The
# 273 dev photos at 6% of their light with lamps over 5 / 10 / 20% of the frame: CIDEr 0.204 ->
# 0.319, 0.128 -> 0.313, 0.111 -> 0.252 (+0.114 to +0.185, every interval above 0); of the 160
# everyday photos 3 at x0.3 and 7 at x0.2 brightened otherwise (-0.001 [-0.008, +0.005], +0.001
# [-0.002, +0.005]), as taken, x0.7, x0.5 and x0.1 none; 2 of the 1,000 Flickr8k dev photos as
# taken (-0.000) (benchmarks/lights.py).
DARK_LEVEL = 128
TARGET_LEVEL = 255
MAX_GAIN = 8.0
LIGHTS_RATIO = 2
TOP_SHARE = 1  # percent of the pixels above the level: the brightest 1%
SCENE_SHARE = 5  # ... and, with lights in view, the brightest 5%
WIDE_SHARE = 25  # ... and, with lights over 5-25% of a night scene, the brightest 25%
NIGHT_LEVEL = 32  # ... where that level is under this: a night scene, not a day's sky and ground


def percentile_rank(n: int, share: int) -> int:
    """The rank (from 0, ascending) of the level that ``share`` percent of ``n`` values are not
    below: ``n - n * share // 100 - 1`` (the 99th percentile for 1, no interpolation)."""
    return n - n * share // 100 - 1


def brightness_levels(pixels: np.ndarray) -> tuple[int, int, int]:
    """uint8 (3, H, W) -> the levels of the brightest ``TOP_SHARE``, ``SCENE_SHARE`` and
    ``WIDE_SHARE`` percent of each pixel's largest channel (the values of ``percentile_rank``:
    levels, no interpolation)."""
    # the channels' elementwise maximum (a reduction over the planes of the (3, H, W) view of an
    # (H, W, 3) image is ten times slower), then the levels from its histogram: 0.13 ms at 224 px
    bright = np.maximum(np.maximum(pixels[0], pixels[1]), pixels[2]).ravel()
    counts = np.cumsum(np.bincount(bright, minlength=256))
    # the first level with more than the rank below it
    top, scene, wide = (
        int(np.searchsorted(counts, percentile_rank(bright.size, share) + 1))
        for share in (TOP_SHARE, SCENE_SHARE, WIDE_SHARE)
    )
    return top, scene, wide


def metered_gain(top, scene, wide):
    """The gain of frames whose brightest 1%, 5% and 25% are at levels ``top``, ``scene`` and
    ``wide`` (``brightness_levels``): elementwise, on float32 numpy arrays or torch tensors, so
    that the host and the torch backend's device (``edgecap.backends.torch_preprocess``) compute
    the same float32 gain by the same expression. Every step is exact but the one division."""
    lights = top >= LIGHTS_RATIO * scene
    # lights over more than 5% of a night scene: its brightest 5% are lights too
    wide_lights = ~lights & (scene >= LIGHTS_RATIO * wide) & (wide < NIGHT_LEVEL)
    metered = ~lights & ~wide_lights
    level = (top * metered + scene * lights + wide * wide_lights).clip(min=1)  # two of the terms are 0
    # an array or tensor divided (torch computes a number divided by a tensor as a reciprocal
    # times the number, which can differ in the last bit)
    gain = ((level * 0 + TARGET_LEVEL) / level).clip(max=MAX_GAIN)
    dark = level < DARK_LEVEL
    return gain * dark + ~dark


def exposure_gain(pixels: np.ndarray) -> np.float32:
    """uint8 (3, H, W) -> the factor a dark frame's levels are multiplied by (1 for a frame that
    is not dark; see ``DARK_LEVEL``), in float32 as the device path computes it."""
    return metered_gain(*(np.array([level], np.float32) for level in brightness_levels(pixels)))[0]


# A frame with nothing to recognise: uniform (black, white, a lens cap, one colour) or blurred
# past any detail. Measured on the encoder input of the shipped model in pixel levels (0-255),
# on the grey image averaged over 4x4 blocks (56x56 at 224 px, so that small photos scaled up
# are not taken for blurred ones): the standard deviation ("spread") and the mean |Laplacian|
# ("detail"). Over real photos the lowest spread was 9.4 (all 7,091 Flickr8k photos: a skier on
# a snow slope; 13.8 over the 1,000 dev photos, 17.5 over coco-ood-dev and -b) and the lowest
# detail 5.15 (5.27 over the 1,160 dev photos of the first measurement); a uniform frame gives 0
# and 0; the example photos blurred by a Gaussian of radius 16 px (at 224 px) give 0.28-1.17,
# radius 8 px 0.76-4.9, radius 4 px 2.4-13.6; shrunk to 32 px wide 3.1-17.4, to 16 px 0.96-6.7.
# Fog or haze lowers a photo's spread and detail together (the same photo blended 80% toward a
# light grey keeps a fifth of each): 273 dev photos (coco-ood-dev, coco-ood-dev-b, 113 Flickr8k
# dev at full resolution) blended 80% toward level 200 have spreads of 3.5-18 and details of
# 1.1-14, while the blank frames a review tried have at most 0.8 (grey and white walls, JPEG or
# with noise, a "no signal" blue, a lens cap) or a detail of at most 0.72 (a gradient, a blue
# sky). So a frame as taken needs a spread of MIN_PIXEL_STD and a detail of MIN_DETAIL.
MIN_PIXEL_STD = 1.5
MIN_DETAIL = 1.5
BLOCK = 4
# A frame of little spread (under LOW_PIXEL_STD) whose detail is over MAX_DETAIL_RATIO times its
# spread is noise, not a faint scene: sensor noise and random pixels have a mean |Laplacian| of
# about 3.5 times their spread at any strength (3.2-3.7 measured), photos at most 1.89 (all
# 7,091 Flickr8k photos; the 1,160 dev photos darkened to a half, a fifth and a tenth and
# brightened, at most 1.85; fog does not change the ratio). A brightened frame (``exposure_gain``
# above 1: its levels, noise included, multiplied by up to 8) is judged by the ratio whatever its
# spread, and needs a spread of LOW_PIXEL_STD: a lens cap with hot pixels, brightened 8x, has a
# spread of 5.8-6.0 and a scene's ratio (1.7-2.4). A frame in good light with a spread of
# LOW_PIXEL_STD or more is not judged by the ratio: close-ups of text, fine tiles and codes reach
# 2.6-5.7 too.
LOW_PIXEL_STD = 6.4
MAX_DETAIL_RATIO = 2.5


def frame_grey(x: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Encoder input (3, H, W) -> its grey image (H, W) in pixel levels, float32 as the input:
    what the blank check (``frame_statistics``) and ``frame_blurriness`` measure (in float64 the
    blurriness took 1.6-1.9 ms a frame instead of 0.45-0.73 on one core, the same to 2e-7)."""
    return (x * np.asarray(pre.std, np.float32)[:, None, None]).mean(0)


def frame_statistics(x: np.ndarray, pre: Preprocessing) -> tuple[float, float]:
    """Encoder input (3, H, W) -> (standard deviation, mean |Laplacian|) of its grey image
    averaged over ``BLOCK`` x ``BLOCK`` pixels, both in pixel levels."""
    return grey_statistics(frame_grey(x, pre))


def grey_statistics(grey: np.ndarray) -> tuple[float, float]:
    """``frame_statistics`` of an encoder input's grey image (``frame_grey``)."""
    h, w = grey.shape[0] // BLOCK * BLOCK, grey.shape[1] // BLOCK * BLOCK
    grey = grey[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean((1, 3))
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(grey.std()), float(np.abs(laplacian).mean())


# How blurred a frame looks, for the confidence model's blur penalty (``ConfidenceModel.blur``):
# motion blur takes the detail along one direction and keeps it across, defocus or a thumbnail
# scaled up takes it in every direction, and captions of such frames are right far less often
# than their search's signals say (docs/confidence.md).
BLUR_EPSILON = 1e-3  # levels squared / levels: keeps the logs finite on a uniform frame


def blurriness(grey, xp=np):
    """A grey image (..., H, W) in levels (an encoder input's, ``frame_grey``) -> how blurred it
    looks, (...), lower for a blurrier frame: the log of the weakest over the strongest axis of
    its gradient structure tensor (central differences; near 0 where detail runs every way, far
    below where one direction has none: motion) plus the log of its least detail of four
    directions (the mean absolute difference along rows, columns and both diagonals, the
    diagonals per pixel of distance) over its spread (low where every direction lost its
    detail: defocus, a thumbnail). On numpy arrays (``xp=np``) or torch tensors
    (``xp=torch``), the same expression."""
    gx = grey[..., 1:-1, 2:] - grey[..., 1:-1, :-2]
    gy = grey[..., 2:, 1:-1] - grey[..., :-2, 1:-1]
    jxx, jyy, jxy = (gx * gx).mean((-2, -1)), (gy * gy).mean((-2, -1)), (gx * gy).mean((-2, -1))
    half, disc = (jxx + jyy) / 2, xp.hypot((jxx - jyy) / 2, jxy)
    # the weaker axis, >= 0: in float32 a strong one-way frame (a fine grating) rounds it below
    # -BLUR_EPSILON, whose log was NaN
    weak = xp.clip(half - disc, 0, None)
    axes = xp.log((weak + BLUR_EPSILON) / (half + disc + BLUR_EPSILON))
    rows = abs(grey[..., :, 1:] - grey[..., :, :-1]).mean((-2, -1))
    columns = abs(grey[..., 1:, :] - grey[..., :-1, :]).mean((-2, -1))
    diagonal = abs(grey[..., 1:, 1:] - grey[..., :-1, :-1]).mean((-2, -1)) / 2**0.5
    anti = abs(grey[..., 1:, :-1] - grey[..., :-1, 1:]).mean((-2, -1)) / 2**0.5
    least = xp.minimum(xp.minimum(rows, columns), xp.minimum(diagonal, anti))
    mean = grey.mean((-2, -1))
    spread = xp.sqrt(xp.clip((grey * grey).mean((-2, -1)) - mean * mean, 0, None))
    return axes + xp.log((least + BLUR_EPSILON) / (spread + BLUR_EPSILON))


def frame_blurriness(x: np.ndarray, pre: Preprocessing) -> float:
    """``blurriness`` of an encoder input (3, H, W)."""
    return float(blurriness(frame_grey(x, pre)))


def judged_recognisable(spread, detail, brightened):
    """The blank check's rule on a frame's statistics (``frame_statistics``) and whether it was
    brightened: elementwise, on float32 numpy arrays and bool arrays or on torch tensors, so that
    the host and the torch backend's device (``edgecap.backends.torch_preprocess``) judge by the
    same expression, in float32."""
    low = spread < LOW_PIXEL_STD
    noise = (detail > MAX_DETAIL_RATIO * spread) & (brightened | low)
    return (spread >= MIN_PIXEL_STD) & (detail >= MIN_DETAIL) & ~(low & brightened) & ~noise


def recognisable(x: np.ndarray, pre: Preprocessing, brightened: bool = False) -> bool:
    """Whether the encoder input (3, H, W) holds anything to caption (see the thresholds);
    ``brightened``: it was brightened (``model_input``'s gain above 1), so it is judged as such."""
    return grey_recognisable(frame_grey(x, pre), brightened)


def grey_recognisable(grey: np.ndarray, brightened: bool = False) -> bool:
    """``recognisable`` of an encoder input's grey image (``frame_grey``)."""
    spread, detail = grey_statistics(grey)
    # one-element float32 arrays: the comparisons in float32, as the device check computes them
    verdict = judged_recognisable(
        np.array([spread], np.float32), np.array([detail], np.float32), np.array([brightened])
    )
    return bool(verdict[0])


# Letterbox and pillarbox bars (16:9 video in a 4:3 frame, 4:3 in 16:9): the encoder squashes the
# whole frame, bars and all, and captions lose to them; a blank frame with bars escapes the blank
# check. Bars are cropped before the frame is captioned and checked. A bar is a run of lines from
# an edge inward, each dark (every channel of every pixel at most BAR_LEVEL), flat (the standard
# deviation of its pixels' largest channels at most BAR_STD levels: a video's black, a codec's
# or a sensor's noise, at any width) and at the edge line's level (its mean at most BAR_STEP
# levels above the edge line's: a dark wall or a lens cap between black bars is no bar), that
# ends at the picture's edge: a line, at most the ring window after it (BAR_RING_LINES lines or
# RING_SHARE percent of the frame's side: a codec's ringing, stretched where the video was
# upscaled), of which PICTURE_SHARE percent of the pixels are over BAR_CONTRAST levels above the
# bar's brightest; the dark of a dim scene fades into its light, and is no bar. And one on the
# opposite edge: both at least MIN_BAR_SHARE percent of the frame's height (width), their
# pictures' edges at most BAR_RING_LINES lines or MIN_BAR_SHARE percent apart, with at least
# MIN_PICTURE_SHARE percent of the frame between them (a 2.39:1 film on a 9:19.5 phone screen:
# 19%). Measured with benchmarks/bars.py (docs/cameras.md, "Black bars").
BAR_LEVEL = 24
BAR_STD = 2.5
BAR_STEP = 2
BAR_CONTRAST = 2
PICTURE_SHARE = 50
BAR_RING_LINES = 16
RING_SHARE = 4
MIN_BAR_SHARE = 2
MIN_PICTURE_SHARE = 15


def _largest_channel(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> each pixel's largest channel (...,)."""
    return np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])


def _flat_dark(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (n, length, 3) lines -> (n,) whether each is a bar's (dark and flat), and (n,)
    the level of each line's brightest pixel and each line's mean level (by each pixel's
    largest channel)."""
    bright = _largest_channel(lines)
    top, mean, spread = bright.max(1), bright.mean(1), bright.std(1)
    return (top <= BAR_LEVEL) & (spread <= BAR_STD), top, mean


def _bar_line(line: np.ndarray) -> bool:
    """Whether one uint8 (length, 3) line is a bar's (dark and flat)."""
    return bool(line.max() <= BAR_LEVEL and _flat_dark(line[None])[0][0])


def _bar(lines: np.ndarray, window: int) -> tuple[int, int]:
    """uint8 (n, length, 3) lines from a frame's edge inward -> (the lines of the bar there, the
    same up to the picture's edge line, at most ``window`` lines after it: the codec's ringing
    between them); (0, 0) where the edge line is no bar's, or no picture's edge line follows
    the bar. Read a few lines at a time from the edge, up to the first that is no bar's and the
    picture's edge after it."""
    core, level, n = 0, 0, len(lines)
    chunk = 1  # the edge line alone first: most frames end there
    edge = None
    while core < n:
        flat, top, mean = _flat_dark(lines[core : core + chunk])
        if edge is None:
            edge = float(mean[0])
        flat &= mean <= edge + BAR_STEP
        ends = int(np.argmin(flat)) if not flat.all() else len(flat)
        if ends:
            level = max(level, int(top[:ends].max()))
        core += ends
        if ends < len(flat):
            break
        chunk = 32
    if not core:
        return 0, 0
    after = lines[core : core + window + 1]
    if not len(after):  # bars to the middle: no picture (``_paired`` says so)
        return core, core
    picture = (_largest_channel(after) > level + BAR_CONTRAST).mean(axis=1) * 100 >= PICTURE_SHARE
    if not picture.any():  # the dark goes on: a dark scene's, no bar's
        return 0, 0
    return core, core + int(np.argmax(picture))


def _ring_window(size: int) -> int:
    """The most lines a codec's ringing may take after a bar in a frame of ``size`` lines."""
    return max(BAR_RING_LINES, size * RING_SHARE // 100)


def _paired(one: tuple[int, int], other: tuple[int, int], size: int) -> bool:
    """Whether the bars found at two opposite edges of a side of ``size`` lines are a pair:
    both wide enough, ending at the picture alike, with a picture of at least
    ``MIN_PICTURE_SHARE`` percent of the side between them."""
    (a, a_picture), (b, b_picture) = one, other
    least = MIN_BAR_SHARE * size / 100
    return (
        min(a, b) >= least
        and abs(a_picture - b_picture) <= max(BAR_RING_LINES, least)
        and (size - a_picture - b_picture) * 100 >= MIN_PICTURE_SHARE * size
    )


def bars(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """uint8 RGB (H, W, 3) -> the lines of letterbox (top, bottom) and pillarbox (left, right)
    bars to crop, codec ringing included; 0s where there are none (see ``BAR_LEVEL``)."""
    h, w = pixels.shape[:2]
    columns = pixels.transpose(1, 0, 2)
    crop = []
    # each edge's bar searched over the half of the frame on its side
    for lines, size in ((pixels, h), (columns, w)):
        window = _ring_window(size)
        one, other = _bar(lines[: size // 2 + 1], window), _bar(lines[::-1][: size // 2 + 1], window)
        crop += [one[1], other[1]] if _paired(one, other, size) else [0, 0]
    return crop[0], crop[1], crop[2], crop[3]


def _edge_line(image: Image.Image | np.ndarray, side: int) -> np.ndarray:
    """An image's top (``side`` 0), bottom (1), left (2) or right (3) line, uint8 (length, 3)."""
    if isinstance(image, Image.Image):
        w, h = image.size
        box = ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))[side]
        return np.asarray(image.crop(box)).reshape(-1, 3)
    return (image[0], image[-1], image[:, 0], image[:, -1])[side]


def bar_box(image: Image.Image | np.ndarray) -> tuple[int, int, int, int] | None:
    """An RGB PIL image or uint8 (H, W, 3) array -> the box (left, top, right, bottom), in
    pixels, of the picture between its letterbox or pillarbox bars (``bars``); None where it has
    none. A frame whose opposite edge lines are not both a bar's (nearly every photo) is
    answered from its edge lines alone, the second of a pair read only when the first is."""
    if not any(all(_bar_line(_edge_line(image, side)) for side in pair) for pair in ((0, 1), (2, 3))):
        return None
    w, h = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
    top, bottom, left, right = bars(np.asarray(image))
    if not (top or bottom or left or right):
        return None
    return left, top, w - right, h - bottom
