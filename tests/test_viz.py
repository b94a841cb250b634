"""``edgecap.viz``: one panel per word, each at the photo's aspect ratio, the map the right way up.

Panels are found from the pixels: the test photos are pure green, which the overlay keeps green
(dimmed or brightened) while the background is white and the text grey, so the green pixels of
the figure are exactly its panels.
"""

from __future__ import annotations

import os

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFont

from edgecap import Caption, Captioner, viz
from edgecap.viz import MARGIN, attention_figure, panel_size_for, save_attention

GREEN = (0, 200, 0)


def green_photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), GREEN)


def fake_caption(n_words: int, attention: np.ndarray | None = None) -> Caption:
    if attention is None:
        attention = np.random.default_rng(0).random((n_words, 7, 7)).astype(np.float32)
        attention /= attention.sum((1, 2), keepdims=True)
    words = [f"w{i}" for i in range(n_words)]
    return Caption(text=" ".join(words), score=-1.0, tokens=words, log_prob=-2.0, attention=attention)


def find_panels(figure: Image.Image) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of each green rectangle, row by row, left to right."""
    x = np.asarray(figure, dtype=np.int32)
    green = x[:, :, 1] - np.maximum(x[:, :, 0], x[:, :, 2]) > 30
    rows, columns = _runs(green.any(axis=1)), _runs(green.any(axis=0))
    panels = []
    for top, height in rows:
        for left, width in columns:
            block = green[top : top + height, left : left + width]
            if block.all():
                panels.append((left, top, width, height))
            else:
                assert not block.any(), "a panel that is not a full rectangle"
    return panels


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize(
    "photo_size, n_words, columns",
    [
        ((300, 150), 7, 3),  # landscape 2:1, rows of 3, 3, 1
        ((120, 240), 5, 5),  # portrait 1:2, one row
        ((451, 300), 1, 5),  # one word: one panel, the figure one panel wide
    ],
)
def test_one_panel_per_word_at_the_photo_aspect_ratio(photo_size, n_words, columns):
    figure = attention_figure(
        green_photo(*photo_size), fake_caption(n_words), columns=columns, panel_size=200
    )
    panels = find_panels(figure)
    assert len(panels) == n_words
    width, height = panel_size_for(photo_size, 200)
    assert max(width, height) == 200
    assert abs(width / height - photo_size[0] / photo_size[1]) < 1 / min(width, height)
    assert {(w, h) for _, _, w, h in panels} == {(width, height)}
    # the grid: `columns` to a row, left to right, top to bottom
    used = min(columns, n_words)
    lefts = sorted({left for left, _, _, _ in panels})
    assert len(lefts) == used
    assert [left for left, _, _, _ in panels] == [lefts[i % used] for i in range(n_words)]
    assert figure.width == MARGIN + used * (width + MARGIN)


def test_a_photo_far_wider_than_high_gets_a_panel_a_pixel_high():
    """panel_size_for: the shorter side rounded, at least 1: a 4000x3 strip (a line-scan
    camera's) at 224 pixels is 224x1, not 224x0, and its figure is drawn."""
    assert panel_size_for((4000, 3), 224) == (224, 1)
    assert panel_size_for((3, 4000), 224) == (1, 224)
    figure = attention_figure(green_photo(4000, 3), fake_caption(2))
    assert [p[2:] for p in find_panels(figure)] == [(224, 1), (224, 1)]


def test_each_word_lights_the_region_it_attends():
    cells = [(0, 0), (0, 6), (6, 0), (3, 3), (5, 2)]
    attention = np.zeros((len(cells), 7, 7), np.float32)
    for i, (r, c) in enumerate(cells):
        attention[i, r, c] = 1.0
    figure = attention_figure(green_photo(280, 140), fake_caption(len(cells), attention), panel_size=280)
    x = np.asarray(figure, dtype=np.float32)
    for (left, top, width, height), (r, c) in zip(find_panels(figure), cells):
        brightness = x[top : top + height, left : left + width].sum(axis=2)
        y, x_ = np.unravel_index(np.argmax(brightness), brightness.shape)
        assert (int(y * 7 // height), int(x_ * 7 // width)) == (r, c)
        # smooth: bilinear, not one hard-edged block
        assert len(np.unique(brightness)) > 10


def test_bad_captions():
    photo = green_photo(64, 64)
    with pytest.raises(ValueError, match="return_attention=True"):
        attention_figure(photo, dataclasses.replace(fake_caption(2), attention=None))
    with pytest.raises(ValueError, match="square grid"):
        attention_figure(photo, dataclasses.replace(fake_caption(2), attention=np.ones((2, 10), np.float32)))
    with pytest.raises(ValueError, match="3 attention maps for 2 words"):
        attention_figure(
            photo, dataclasses.replace(fake_caption(2), attention=np.ones((3, 7, 7), np.float32))
        )
    with pytest.raises(ValueError, match="columns"):
        attention_figure(photo, fake_caption(2), columns=0)
    with pytest.raises(ValueError, match="columns must be a positive integer, got True"):
        attention_figure(photo, fake_caption(2), columns=True)
    # a caption without words (and so without maps): no figure of no panels
    with pytest.raises(ValueError, match="0 attention maps for 0 words"):
        attention_figure(photo, _caption_of([], np.zeros((0, 7, 7), np.float32)))


def test_a_nothing_recognisable_caption_says_so_not_to_pass_return_attention():
    """A blank frame captioned with return_attention=True has no words and no maps (Caption
    docs: text "nothing recognisable", tokens empty): the error says that, rather than telling
    the caller to pass the return_attention=True they passed."""
    from edgecap.api import NOTHING_RECOGNISABLE

    blank = Caption(text=NOTHING_RECOGNISABLE, score=-1.0, tokens=[], log_prob=-2.0, recognisable=False)
    with pytest.raises(ValueError, match="nothing recognisable") as info:
        attention_figure(green_photo(64, 64), blank)
    assert "return_attention" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("figure.psd", ".psd images can be read, not written; name a .png or .jpg file"),
        ("figure.XPM", ".xpm images can be read, not written; name a .png or .jpg file"),
        ("figure.notanimage", "unknown image format; name a .png or .jpg file"),
        # formats Pillow writes, but not an RGB figure, or only with a handler it has not got
        (
            "figure.xbm",
            "Pillow cannot write the figure as .xbm (cannot write mode RGB as XBM); name a .png or .jpg file",
        ),
        (
            "figure.MSP",
            "Pillow cannot write the figure as .msp (cannot write mode RGB as MSP); name a .png or .jpg file",
        ),
        (
            "figure.h5",
            "Pillow cannot write the figure as .h5 (HDF5 save handler not installed);"
            " name a .png or .jpg file",
        ),
    ],
)
def test_a_figure_pillow_cannot_write_is_a_value_error_naming_it(name, problem, tmp_path):
    """save_attention to a format Pillow only reads (it had raised a bare KeyError from
    Image.save) or does not know: a ValueError naming the path, nothing written."""
    caption = Caption(
        text="a cat", score=-1.0, tokens=["a", "cat"], log_prob=-2.0, attention=np.ones((2, 7, 7), np.float32)
    )
    with pytest.raises(ValueError) as info:
        save_attention(green_photo(64, 64), caption, tmp_path / name)
    assert str(info.value) == f"{tmp_path / name}: {problem}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_figure_through_a_link_to_a_special_file_is_written_to_it_never_replacing_it(tmp_path):
    """A figure is written whole through a hidden file renamed to its name, except where the name
    (or a link's target) is no regular file: a device such as /dev/null, or a named pipe, is
    written in place, as asked. Renamed over, /dev/null would have become a PNG file in /dev
    (root may write there); a named pipe of the test's own stands in for it, so that a
    regression replaces that pipe, not the machine's /dev/null (it did, run as root: every
    later ``> /dev/null`` on the machine then wrote to a file). A link to a regular file is
    followed and its target replaced, the link kept."""
    import stat

    caption = fake_caption(2)
    pipe, special = tmp_path / "pipe", tmp_path / "special.png"
    os.mkfifo(pipe)
    special.symlink_to(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the figure's open does not wait
    try:
        # a small figure, which the pipe holds whole until it is read
        assert save_attention(green_photo(64, 48), caption, special, panel_size=16) == special
        written = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and special.is_symlink()
    assert written.startswith(b"\x89PNG")
    target, link = tmp_path / "figure.png", tmp_path / "link.png"
    target.write_bytes(b"earlier")
    link.symlink_to(target)
    save_attention(green_photo(64, 48), caption, link)
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "link.png", "pipe", "special.png"]


@pytest.mark.parametrize("earlier", [False, True])
def test_a_figure_stopped_while_written_leaves_no_half_written_file(earlier, tmp_path, monkeypatch):
    """Ctrl-C (or a SIGTERM) while the figure is written, which takes a few tenths of a second
    for a photo's PNG: no truncated image is left under its name (Pillow removes what it wrote
    on an Exception, not on a KeyboardInterrupt; ``edgecap caption IMG --attention OUT.png``
    stopped then left a broken OUT.png, exit 130), and an earlier figure there is kept whole."""
    caption = fake_caption(2)
    target = tmp_path / "attention.png"
    if earlier:
        save_attention(green_photo(64, 48), caption, target)
    before = target.read_bytes() if earlier else None
    Image.init()  # the format plugins, PNG's writer among them
    real = Image.SAVE["PNG"]

    def stopped(image, fp, filename):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # part of the file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setitem(Image.SAVE, "PNG", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_attention(green_photo(64, 64), caption, target)
    assert [p.name for p in tmp_path.iterdir()] == (["attention.png"] if earlier else [])
    if earlier:
        assert target.read_bytes() == before
    monkeypatch.setitem(Image.SAVE, "PNG", real)
    assert save_attention(green_photo(64, 64), caption, target) == target
    assert [p.name for p in tmp_path.iterdir()] == ["attention.png"]
    with Image.open(target) as saved:
        saved.load()
        assert saved.format == "PNG" and saved.width > 64


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_figure_written_over_an_earlier_one_keeps_its_permissions(tmp_path):
    """The figure is written to a hidden file renamed over the earlier one: that file's
    permissions are kept, as a plain write keeps them (a figure made private had become
    readable by all, the umask's)."""
    caption = fake_caption(2)
    target = tmp_path / "attention.png"
    target.write_bytes(b"earlier")
    target.chmod(0o600)
    save_attention(green_photo(64, 48), caption, target)
    assert target.read_bytes().startswith(b"\x89PNG") and target.stat().st_mode & 0o777 == 0o600


def test_a_figure_named_in_four_byte_characters_near_255_bytes_is_written(tmp_path):
    """The hidden file's name is made from the figure's, cut short: cut at 64 characters, a
    name of emoji (4 bytes each) near the file system's 255 bytes had no room for the rest
    ("File name too long" for a name that is not)."""
    caption = fake_caption(2)
    target = tmp_path / ("\U0001f600" * 62 + ".png")  # 252 bytes
    try:
        target.write_bytes(b"")
    except OSError:
        pytest.skip("the file system takes no such name")
    assert save_attention(green_photo(64, 48), caption, target) == target
    assert target.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_real_caption_and_save(tiny_model_dir, example_images, tmp_path):
    photo = next(p for p in example_images if p.name == "chelsea.png")
    caption = Captioner(tiny_model_dir, max_length=6, threads=1).caption(photo, return_attention=True)
    path = save_attention(photo, caption, tmp_path / "attention.png")
    assert path == tmp_path / "attention.png" and list(tmp_path.iterdir()) == [path]
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.mode == "RGB"
        width, _ = panel_size_for(Image.open(photo).size, 224)
        used = min(5, len(caption.tokens))
        assert saved.width == MARGIN + used * (width + MARGIN)
    # a BGR frame with color="bgr" draws the same figure as the RGB photo
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    assert np.array_equal(
        np.asarray(attention_figure(rgb, caption)),
        np.asarray(attention_figure(rgb[:, :, ::-1], caption, color="bgr")),
    )


def _caption_of(words: list[str], attention: np.ndarray) -> Caption:
    return Caption(text=" ".join(words), score=-1.0, tokens=words, log_prob=-2.0, attention=attention)


class _BitmapFontOfPillow91(ImageFont.ImageFont):
    """Pillow's bitmap font as Pillow 9.1 has it (edgecap asks for Pillow >= 9.1): getsize and
    getmask, no getbbox or getlength (Pillow 9.2 added them)."""

    def __init__(self, bitmap: ImageFont.ImageFont):
        self.font = bitmap.font

    def __getattribute__(self, name):
        if name in ("getbbox", "getlength"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def getsize(self, text, *args, **kwargs):
        return self.font.getsize(text)


@pytest.fixture(params=["default", "bitmap", "bitmap-pillow-9.1"])
def font(request, monkeypatch):
    """The figure's font: the default (FreeType's, from Pillow 10.1), Pillow's bitmap font (the
    figure's before Pillow 10.1, or without FreeType: Latin-1 characters alone) and that font
    as Pillow 9.1 has it. Before the fix the bitmap font failed on a shortened word's "…"
    (UnicodeEncodeError) and Pillow 9.1's on every figure (AttributeError: getbbox)."""
    if request.param != "default":
        bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
        made = bitmap if request.param == "bitmap" else _BitmapFontOfPillow91(bitmap)
        monkeypatch.setattr(viz, "_font", lambda size: made)
    return request.param


def test_the_caption_heads_the_figure_and_each_word_labels_its_own_panel(font):
    """Two captions that differ in their second word only, with the same maps: their figures
    differ above the panels (the caption across the top) and under the second panel (its
    word), nowhere else. With 7 words and the default columns, 5 panels to a row."""
    attention = fake_caption(3).attention
    photo = green_photo(200, 100)
    one = attention_figure(photo, _caption_of(["cat", "dog", "sun"], attention), panel_size=160)
    two = attention_figure(photo, _caption_of(["cat", "mmm", "sun"], attention), panel_size=160)
    panels = find_panels(one)
    assert panels == find_panels(two) and len(panels) == 3
    changed = (np.asarray(one, np.int32) != np.asarray(two, np.int32)).any(axis=2)
    top = panels[0][1]
    assert changed[:top].any(), "the caption is not written above the panels"
    left, _, width, height = panels[1]
    below = changed[top:]
    ys, xs = np.nonzero(below)
    assert len(ys) > 0, "no panel's label changed with its word"
    assert xs.min() >= left and xs.max() < left + width  # under the second panel
    assert ys.min() >= height  # under it, not over the photo

    lefts = {left for left, _, _, _ in find_panels(attention_figure(photo, fake_caption(7), panel_size=64))}
    assert len(lefts) == 5


def test_each_words_map_is_scaled_to_its_own_peak():
    """Module docstring: each word's map is scaled so its strongest region is 1; a map and the
    same map at a fiftieth of the weight draw the same figure."""
    caption = fake_caption(3)
    photo = green_photo(140, 140)
    faint = dataclasses.replace(caption, attention=caption.attention / 50)
    assert np.array_equal(
        np.asarray(attention_figure(photo, caption, panel_size=70)),
        np.asarray(attention_figure(photo, faint, panel_size=70)),
    )


@pytest.mark.parametrize("panel_size", [15, 0, True, 100.0])
def test_panel_size_below_16_pixels_or_not_an_integer_is_refused(panel_size):
    with pytest.raises(
        ValueError, match=rf"panel_size must be an integer of at least 16 pixels, got {panel_size!r}"
    ):
        attention_figure(green_photo(64, 32), fake_caption(2), panel_size=panel_size)
    assert find_panels(attention_figure(green_photo(64, 32), fake_caption(2), panel_size=16))[0][2:] == (
        16,
        8,
    )


def test_caption_lines_are_as_far_apart_in_pillow_9_1s_bitmap_font():
    """The caption's lines are spaced as in the same font on a newer Pillow: its height (getbbox's
    bottom for "Ayg", 11 pixels in Pillow's bitmap font) and 4 pixels, where Pillow 9.1's font
    has getsize alone."""
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    if not hasattr(bitmap, "getbbox"):
        pytest.skip("Pillow before 9.2: no getbbox to compare with")
    height = bitmap.getbbox("Ayg")[3]
    assert viz._line_height(_BitmapFontOfPillow91(bitmap)) == viz._line_height(bitmap) == height + 4


def test_a_long_caption_wraps_inside_the_figure_and_a_long_word_stays_under_its_panel(font):
    """Six words each wider than a panel (40 pixels; 'elephant0' is about 56 in the 12-pixel
    font), two panels to a row: the caption wraps over several lines inside the figure, and
    each label is shortened to its panel's width; no text in the margins at either side."""
    words = [f"elephant{i}" for i in range(6)]
    figure = attention_figure(
        green_photo(80, 40), _caption_of(words, fake_caption(6).attention), columns=2, panel_size=40
    )
    x = np.asarray(figure, dtype=np.int32)
    ink = (x.max(axis=2) < 160) & (x.max(axis=2) - x.min(axis=2) < 20)  # grey text, not green
    panels = find_panels(figure)
    assert len(panels) == 6 and figure.width == MARGIN + 2 * (40 + MARGIN)
    assert not ink[:, :MARGIN].any() and not ink[:, -MARGIN:].any()
    assert len(_runs(ink[: panels[0][1]].any(axis=1))) >= 3  # the caption: lines of text
    for row in (panels[0:2], panels[2:4], panels[4:6]):
        top, height = row[0][1], row[0][3]
        below = [p[1] for p in panels if p[1] > top]
        band = ink[top + height : below[0] if below else figure.height]
        under = np.zeros(figure.width, bool)
        for left, _, width, _ in row:
            assert band[:, left : left + width].any()  # the word under its panel
            under[left : left + width] = True
        assert not band[:, ~under].any()  # and not past it
    # short words fill each line of the caption up to the right margin, never into it
    words = "a cat and a dog sit on a mat by the red door in the sun".split()
    figure = attention_figure(
        green_photo(80, 40), _caption_of(words, fake_caption(len(words)).attention), columns=2, panel_size=40
    )
    x = np.asarray(figure, dtype=np.int32)
    ink = (x.max(axis=2) < 160) & (x.max(axis=2) - x.min(axis=2) < 20)
    header = ink[: find_panels(figure)[0][1]]
    assert len(_runs(header.any(axis=1))) >= 3
    assert not header[:, :MARGIN].any() and not header[:, -MARGIN:].any()


def test_a_figure_over_an_earlier_one_in_a_folder_that_may_not_be_written_is_written_in_place(
    tmp_path, monkeypatch
):
    """A figure is written whole through a hidden file beside it; where no file may be made
    there (a folder that may not be written, an earlier figure that may), it is written in
    place, as it was before that, not refused; with nothing there, the refusal names the path
    asked for, not the hidden file."""
    import builtins

    caption = fake_caption(2)
    target = tmp_path / "attention.png"
    target.write_bytes(b"earlier")
    real = builtins.open

    def no_new_files(file, mode="r", *args, **kwargs):  # the folder's permissions, as a user's
        if "x" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_new_files)
    assert save_attention(green_photo(64, 48), caption, target) == target
    assert target.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == [
        "attention.png"
    ]
    with pytest.raises(PermissionError) as refused:
        save_attention(green_photo(64, 48), caption, tmp_path / "new.png")
    assert refused.value.filename == str(tmp_path / "new.png")
