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
