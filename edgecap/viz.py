"""Attention figures like the Show, Attend and Tell paper's, drawn with Pillow only.

    caption = captioner.caption("photo.jpg", return_attention=True)
    save_attention("photo.jpg", caption, "attention.png")

The figure: the full caption across the top, then one panel per word, in order, left to right and
top to bottom, ``columns`` to a row. Each panel is the photo at its own aspect ratio (its longer
side ``panel_size`` pixels) with that word's attention map over it and the word under it. The 7x7
map is upsampled bilinearly to the panel (the encoder squashes the whole photo to its input size,
so the map covers the whole photo; a photo whose letterbox or pillarbox bars were cropped,
``Caption.crop``, is shown without them), scaled so each word's strongest region is 1, and shown as in
the paper: attended regions bright, the rest dimmed.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgecap.errors import reason
from edgecap.files import write_whole
from edgecap.images import ImageInput, load_rgb

if TYPE_CHECKING:
    from edgecap.api import Caption

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
MARGIN = 8  # pixels around and between panels
DIM = 0.3  # brightness kept where a word attends least
GLOW = 0.35  # white blended in where a word attends most

__all__ = ["attention_figure", "save_attention", "panel_size_for"]


@dataclass(frozen=True)
class _Layout:
    panel: tuple[int, int]  # (width, height) of each photo panel
    columns: int
    rows: int
    line_height: int
    header_lines: list[str]

    @property
    def label_height(self) -> int:
        return self.line_height + MARGIN // 2

    @property
    def header_height(self) -> int:
        return len(self.header_lines) * self.line_height + MARGIN

    @property
    def size(self) -> tuple[int, int]:
        width = MARGIN + self.columns * (self.panel[0] + MARGIN)
        height = MARGIN + self.header_height + self.rows * (self.panel[1] + self.label_height + MARGIN)
        return width, height

    def panel_origin(self, i: int) -> tuple[int, int]:
        row, column = divmod(i, self.columns)
        x = MARGIN + column * (self.panel[0] + MARGIN)
        y = MARGIN + self.header_height + row * (self.panel[1] + self.label_height + MARGIN)
        return x, y


def panel_size_for(photo_size: tuple[int, int], panel_size: int) -> tuple[int, int]:
    """(width, height) of a panel for a photo of ``photo_size``: the photo's aspect ratio, the
    longer side ``panel_size`` pixels (the shorter one rounded, at least 1)."""
    width, height = photo_size
    scale = panel_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _captioned_part(photo: Image.Image, crop) -> Image.Image:
    """The part of ``photo`` the caption was made of: between its bars where they were cropped
    (``Caption.crop``, fractions of the width and height), the attention maps' regions."""
    if crop is None:
        return photo
    w, h = photo.size
    left, top, right, bottom = crop
    return photo.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


def attention_figure(
    image: ImageInput, caption: Caption, color: str = "rgb", panel_size: int = 224, columns: int = 5
) -> Image.Image:
    """The photo with each word's attention over it, one panel per word (see the module
    docstring). ``image``: what was captioned (any input ``Captioner.caption`` takes, ``color``
    as there); ``caption``: a ``Caption`` made with ``return_attention=True``. -> RGB image."""
    attention = _check_attention(caption)
    if isinstance(panel_size, bool) or not isinstance(panel_size, int) or panel_size < 16:
        raise ValueError(f"panel_size must be an integer of at least 16 pixels, got {panel_size!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    photo = _captioned_part(load_rgb(image, color), getattr(caption, "crop", None))
    font = _font(max(12, panel_size // 14))
    n_words = len(caption.tokens)
    panel = panel_size_for(photo.size, panel_size)
    columns = min(columns, n_words)
    layout = _Layout(
        panel=panel,
        columns=columns,
        rows=math.ceil(n_words / columns),
        line_height=_line_height(font),
        header_lines=[],
    )
    width = layout.size[0]
    layout = _Layout(
        panel=panel,
        columns=columns,
        rows=layout.rows,
        line_height=layout.line_height,
        header_lines=_wrap(caption.text, font, width - 2 * MARGIN),
    )

    figure = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for i, line in enumerate(layout.header_lines):
        draw.text((MARGIN, MARGIN + i * layout.line_height), line, fill=TEXT_COLOR, font=font)
    small = np.asarray(photo.resize(panel, Image.Resampling.BILINEAR), dtype=np.float32)
    for i, (word, weights) in enumerate(zip(caption.tokens, attention)):
        x, y = layout.panel_origin(i)
        figure.paste(_overlay(small, weights), (x, y))
        label = _fit(word, font, panel[0])
        label_width = _width(font, label)
        draw.text(
            (x + (panel[0] - label_width) / 2, y + panel[1] + MARGIN // 2), label, fill=TEXT_COLOR, font=font
        )
    return figure


def save_attention(image: ImageInput, caption: Caption, path: str | os.PathLike[str], **options: Any) -> Path:
    """Write ``attention_figure(image, caption, **options)`` to ``path`` (format from its
    extension, e.g. .png) and return the path. ``ValueError`` before drawing for an extension
    Pillow cannot write (``figure_format_problem``)."""
    path = Path(path)
    problem = figure_format_problem(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    figure = attention_figure(image, caption, **options)
    # whole or not at all: Ctrl-C while a figure was saved had left a truncated image under its
    # name, or truncated an earlier figure there (Pillow removes what it wrote on an Exception only)
    write_whole(path, lambda f: figure.save(f, format=Image.registered_extensions()[path.suffix.lower()]))
    return path


def figure_format_problem(path: str | os.PathLike) -> str | None:
    """Why Pillow cannot write a figure to ``path``, judged by its extension (unknown; a format it
    reads only, .psd; one it cannot write an RGB image in, .xbm, or has no handler for, .h5:
    found by writing a 1x1 figure to memory), or None."""
    suffix = Path(path).suffix.lower()
    if suffix not in Image.registered_extensions():
        return "unknown image format; name a .png or .jpg file"
    if Image.registered_extensions()[suffix] not in Image.SAVE:
        return f"{suffix} images can be read, not written; name a .png or .jpg file"
    try:
        Image.new("RGB", (1, 1), BACKGROUND).save(io.BytesIO(), format=Image.registered_extensions()[suffix])
    except Exception as exc:  # noqa: BLE001 (a plugin's reason, whatever its type)
        return f"Pillow cannot write the figure as {suffix} ({reason(exc)}); name a .png or .jpg file"
    return None


def _check_attention(caption) -> np.ndarray:
    """The caption's maps as float32 (n_words, s, s), or a ValueError saying what to do."""
    attention = getattr(caption, "attention", None)
    if attention is None and getattr(caption, "recognisable", True) is False:
        # return_attention=True was given, but a blank frame's caption has no words to draw
        raise ValueError(
            "the caption is 'nothing recognisable' (a frame with nothing to caption): it has no "
            "words, so no attention maps; blank_check=False captions such a frame anyway"
        )
    if attention is None:
        raise ValueError("the caption has no attention maps; caption the image with return_attention=True")
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3:
        raise ValueError(
            f"expected attention maps of shape (n_words, s, s), got "
            f"{attention.shape}: this model's regions are not a square grid"
        )
    if len(attention) != len(caption.tokens) or not caption.tokens:
        raise ValueError(f"{len(attention)} attention maps for {len(caption.tokens)} words")
    return attention


def _overlay(photo: np.ndarray, weights: np.ndarray) -> Image.Image:
    """photo float32 (h, w, 3) and one word's map (s, s) -> the panel: bright where the word
    attends, dimmed elsewhere."""
    height, width = photo.shape[:2]
    small = Image.fromarray(np.ascontiguousarray(weights, dtype=np.float32))
    heat = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    peak = float(heat.max())
    heat = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat)
    heat = heat[:, :, None]
    lit = photo * (DIM + (1.0 - DIM) * heat)
    lit = lit * (1.0 - GLOW * heat) + 255.0 * GLOW * heat
    return Image.fromarray(np.clip(np.round(lit), 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(font) -> int:
    if not hasattr(font, "getbbox"):  # Pillow 9.1's bitmap font: getsize alone
        return int(font.getsize("Ayg")[1]) + 4
    left, top, right, bottom = font.getbbox("Ayg")
    return int(bottom) + 4


def _width(font, text: str) -> float:
    """``text``'s width in pixels. Pillow's bitmap font (Pillow before 10.1, or without FreeType)
    has getlength from Pillow 9.2, getsize alone before (edgecap asks for Pillow >= 9.1)."""
    if not hasattr(font, "getlength"):
        return font.getsize(text)[0]
    return font.getlength(text)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word gets a
    line of its own)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and _width(font, candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def _fit(word: str, font, width: int) -> str:
    """``word``, shortened with an ellipsis if it is wider than ``width`` pixels ("..." in the
    bitmap font, which has Latin-1 characters alone)."""
    if _width(font, word) <= width:
        return word
    ellipsis = "…" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    while len(word) > 1 and _width(font, word + ellipsis) > width:
        word = word[:-1]
    return word + ellipsis
