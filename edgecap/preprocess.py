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
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resample=d.get("resample", "bilinear"))


def to_model_input(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) normalised as the encoder expects."""
    h, w = pre.size
    if image.size != (w, h):
        image = image.resize((w, h), getattr(Image.Resampling, pre.resample.upper()))
    # (x - mean) / std as one multiply-add, written straight into the (3, H, W) layout.
    scale = 1.0 / np.asarray(pre.std, np.float32)
    offset = -np.asarray(pre.mean, np.float32) * scale
    pixels = np.asarray(image).transpose(2, 0, 1)
    out = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, scale[:, None, None], out=out)
    out += offset[:, None, None]
    return out


# A frame with nothing to recognise: uniform (black, white, a lens cap, one colour) or blurred
# past any detail. Measured on the encoder input of the shipped model, in pixel levels (0-255),
# grey image: over 1,160 real photos (coco-ood-dev, coco-ood-dev-b, 1,000 Flickr8k dev) the
# lowest standard deviation was 18.0 and the lowest mean |Laplacian| 2.70; a uniform frame gives
# 0 and 0, faint noise (sigma 3) 0.97 and 2.74; the example photos blurred by a Gaussian of
# radius 4 px (at 224 px) 0.67-1.19 |Laplacian|, of radius 2 px 0.98-2.82 (some still show it).
MIN_PIXEL_STD = 6.4
MIN_DETAIL = 1.5


def frame_statistics(x: np.ndarray, pre: Preprocessing) -> tuple[float, float]:
    """Encoder input (3, H, W) -> (standard deviation, mean |Laplacian| of the grey image), both
    in pixel levels."""
    grey = (x * np.asarray(pre.std, np.float32)[:, None, None]).mean(0)
    laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2]
                 - grey[1:-1, 2:])
    return float(grey.std()), float(np.abs(laplacian).mean())


def recognisable(x: np.ndarray, pre: Preprocessing) -> bool:
    """Whether the encoder input (3, H, W) holds anything to caption (see the thresholds)."""
    spread, detail = frame_statistics(x, pre)
    return spread >= MIN_PIXEL_STD and detail >= MIN_DETAIL
