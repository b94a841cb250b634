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
# is captioned, as a camera's auto-exposure would: when the brightest 1% of its pixels (the 99th
# percentile of each pixel's largest channel, at the model's size) are below DARK_LEVEL, its levels
# are multiplied so that they reach TARGET_LEVEL, by at most MAX_GAIN (3 stops). On the 160
# everyday dev photos (their lowest level is 168: none is brightened as taken), darkened and
# captioned with the blank check on, CIDEr without -> with it (docs/cameras.md, "Dark frames"):
# x0.5 0.394 -> 0.428, x0.3 0.366 -> 0.438, x0.2 0.321 -> 0.426, x0.1 0.063 -> 0.401 (129 of the
# 160 had been "nothing recognisable"; as taken 0.436). The blank check (``recognisable``) sees
# the brightened frame.
DARK_LEVEL = 128
TARGET_LEVEL = 255
MAX_GAIN = 8.0


def brightness_level(pixels: np.ndarray) -> int:
    """uint8 (3, H, W) -> the 99th percentile of each pixel's largest channel (the value of rank
    ``n - n // 100`` of ``n`` in ascending order: a level, no interpolation)."""
    # the channels' elementwise maximum (a reduction over the planes of the (3, H, W) view of an
    # (H, W, 3) image is ten times slower), then the level from its histogram: 0.13 ms at 224 px
    bright = np.maximum(np.maximum(pixels[0], pixels[1]), pixels[2]).ravel()
    rank = bright.size - bright.size // 100 - 1
    counts = np.cumsum(np.bincount(bright, minlength=256))
    return int(np.searchsorted(counts, rank + 1))  # the first level with more than rank below it


def exposure_gain(pixels: np.ndarray) -> np.float32:
    """uint8 (3, H, W) -> the factor a dark frame's levels are multiplied by (1 for a frame that
    is not dark; see ``DARK_LEVEL``), in float32 as the device path computes it."""
    level = brightness_level(pixels)
    if level >= DARK_LEVEL:
        return np.float32(1)
    return min(np.float32(MAX_GAIN), np.float32(TARGET_LEVEL) / np.float32(max(level, 1)))


# A frame with nothing to recognise: uniform (black, white, a lens cap, one colour) or blurred
# past any detail. Measured on the encoder input of the shipped model in pixel levels (0-255),
# on the grey image averaged over 4x4 blocks (56x56 at 224 px, so that small photos scaled up
# are not taken for blurred ones): over 1,160 real photos (coco-ood-dev, coco-ood-dev-b, 600
# Flickr8k dev) the lowest standard deviation was 15.6 and the lowest mean |Laplacian| 5.27;
# a uniform frame gives 0 and 0; the example photos blurred by a Gaussian of radius 16 px (at
# 224 px) give 0.28-1.17, radius 8 px 0.76-4.9, radius 4 px 2.4-13.6; shrunk to 32 px wide
# 3.1-17.4, to 16 px 0.96-6.7.
MIN_PIXEL_STD = 6.4
MIN_DETAIL = 1.5
BLOCK = 4
# ... or, in a brightened frame, noise: sensor noise (a lens cap, brightened 8x as a dark frame)
# has a mean |Laplacian| of about 3.5 times its spread at any strength (3.2-3.7 measured), photos
# at most 1.85 (the 1,160 dev photos darkened to a half, a fifth and a tenth, brightened). A
# brightened frame above MAX_DETAIL_RATIO is noise, not a scene. Frames that are not brightened
# are not judged by it: close-ups of text, fine tiles and codes reach 2.6-5.7 too.
MAX_DETAIL_RATIO = 2.5


def frame_statistics(x: np.ndarray, pre: Preprocessing) -> tuple[float, float]:
    """Encoder input (3, H, W) -> (standard deviation, mean |Laplacian|) of its grey image
    averaged over ``BLOCK`` x ``BLOCK`` pixels, both in pixel levels."""
    grey = (x * np.asarray(pre.std, np.float32)[:, None, None]).mean(0)
    h, w = grey.shape[0] // BLOCK * BLOCK, grey.shape[1] // BLOCK * BLOCK
    grey = grey[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean((1, 3))
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(grey.std()), float(np.abs(laplacian).mean())


def recognisable(x: np.ndarray, pre: Preprocessing, brightened: bool = False) -> bool:
    """Whether the encoder input (3, H, W) holds anything to caption (see the thresholds);
    ``brightened``: it was brightened (``model_input``'s gain above 1), so noise is judged too."""
    spread, detail = frame_statistics(x, pre)
    # the ratio in float32, as the device check computes it
    noise = brightened and np.float32(detail) > np.float32(MAX_DETAIL_RATIO) * np.float32(spread)
    return spread >= MIN_PIXEL_STD and detail >= MIN_DETAIL and not noise
