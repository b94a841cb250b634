"""Builders shared by several test modules (import them from here, never from another test)."""

from __future__ import annotations

import numpy as np

from edgecap import images


def rgb_array(image, color: str = "rgb") -> np.ndarray:
    """What the loader gives the preprocessing, as uint8 (H, W, 3) RGB."""
    return np.asarray(images.load_rgb(image, color))
