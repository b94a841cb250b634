"""Input robustness: every supported input becomes RGB uint8, every bad one an InputError naming it.

Fixture files are made here with Pillow (never dataset photos).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecap import images
from edgecap.errors import InputError
from edgecap.preprocess import Preprocessing
from helpers import needs_pillow, png_header_only, rgb_array


def _save(im: Image.Image, path, **kwargs):
    im.save(path, **kwargs)
    return path


def _rgb(color=(200, 30, 40), size=(16, 12)) -> Image.Image:
    return Image.new("RGB", size, color)


def _assert_input_error(image, source: str, *words: str, color: str = "rgb") -> InputError:
    with pytest.raises(InputError) as info:
        images.load_rgb(image, color)
    err = info.value
    assert err.source == source
    assert source in str(err)
    for word in words:
        assert word in err.problem, (word, err.problem)
    return err


# -- files that cannot be read -----------------------------------------------------------------
def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.jpg")
    _assert_input_error(path, path, "no such file")


def test_directory(tmp_path):
    _assert_input_error(str(tmp_path), str(tmp_path), "directory")


def test_a_relative_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_input_error("nope.jpg", "nope.jpg", "no such file")
    _assert_input_error(Path("sub") / "nope.png", str(Path("sub") / "nope.png"), "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_input_error(path, str(path), "0 bytes")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    _assert_input_error(path, str(path), "not an image")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _assert_input_error(path, str(path), "truncated")


def test_empty_bytes():
    _assert_input_error(b"", "<bytes (0 bytes)>", "0 bytes")


def test_garbage_bytes():
    _assert_input_error(b"\x00\x01garbage", "<bytes (9 bytes)>", "not an image")


def test_unsupported_type():
    _assert_input_error(12345, "<int>", "unsupported input type")


def test_none_says_what_gives_none():
    # cv2.imread("missing.jpg") is None: the user needs to hear that the read failed
    _assert_input_error(None, "<NoneType>", "no image (None: OpenCV's imread returns None")


def test_bad_color_argument():
    with pytest.raises(ValueError, match="color"):
        images.load_rgb(np.zeros((4, 4, 3), np.uint8), color="rgba")


# -- unusual but valid files -------------------------------------------------------------------
def test_png_with_alpha_goes_over_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    x = rgb_array(_save(im, tmp_path / "a.png"))
    assert x.dtype == np.uint8 and x.shape == (8, 8, 3)
    assert tuple(x[1, 1]) == (255, 255, 255)
    assert tuple(x[0, 0]) == (0, 0, 255)


def test_half_transparent_png_pixels_are_blended_with_white(tmp_path):
    """Alpha 128 of 255 over white: each channel is c * 128/255 + 255 * 127/255, so black gives
    127 and red (255, 127, 127) (to within Pillow's rounding); not the bare colour."""
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (0, 0, 0, 128))
    im.putpixel((1, 0), (255, 0, 0, 128))
    x = rgb_array(_save(im, tmp_path / "half.png")).astype(int)
    assert np.abs(x[0, 0] - (127, 127, 127)).max() <= 1
    assert np.abs(x[0, 1] - (255, 127, 127)).max() <= 1


def test_gray_with_alpha_goes_over_white(tmp_path):
    im = Image.new("LA", (2, 1), (50, 0))  # transparent gray
    im.putpixel((1, 0), (50, 255))  # opaque gray
    for image in (im, _save(im, tmp_path / "la.png")):
        x = rgb_array(image)
        assert tuple(x[0, 0]) == (255, 255, 255) and tuple(x[0, 1]) == (50, 50, 50)


@pytest.mark.parametrize("mode", ["RGBA", "RGBa", "LA", "PA"])
def test_a_pil_image_of_any_alpha_mode_goes_over_white(mode):
    """A PIL image passed in any of Pillow's modes with alpha (PA: a palette with alpha, built
    here pixel by pixel: Pillow's convert("PA") drops the alpha before Pillow 12, every pixel
    opaque) has its transparent pixels white, not the colour stored under them (black here, or
    palette entry 1). The opaque pixel keeps its colour: (200, 30, 40), or in LA its luma,
    200 * 0.299 + 30 * 0.587 + 40 * 0.114 = 81.97 -> 82."""
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (200, 30, 40, 255))
    if mode == "PA":
        image = Image.new("PA", (2, 1))
        image.putpalette([0, 0, 0, 200, 30, 40])  # entry 0 black, entry 1 the colour
        image.putpixel((0, 0), (1, 255))  # the colour, opaque
        image.putpixel((1, 0), (1, 0))  # the colour again, transparent
    else:
        image = rgba.convert(mode)
    x = rgb_array(image)
    assert tuple(x[0, 1]) == (255, 255, 255)
    assert tuple(x[0, 0]) == ((82, 82, 82) if mode == "LA" else (200, 30, 40))


def test_a_colour_key_png_is_flattened_onto_white(tmp_path):
    """A PNG's tRNS colour key makes every pixel of that colour transparent (Pillow opens an RGB
    or L image with info["transparency"]): those pixels become white like any transparency;
    the others keep their colour (the RGB one was returned as stored)."""
    rgb = _rgb((10, 20, 30), (3, 2))
    rgb.putpixel((0, 0), (200, 0, 0))
    gray = Image.new("L", (3, 2), 40)
    gray.putpixel((0, 0), 90)
    for im, key, kept in ((rgb, (10, 20, 30), (200, 0, 0)), (gray, 40, (90, 90, 90))):
        x = rgb_array(_save(im, tmp_path / f"key_{im.mode}.png", transparency=key))
        assert tuple(x[0, 0]) == kept, im.mode
        assert (x.reshape(-1, 3)[1:] == 255).all(), im.mode


def test_a_pil_image_with_an_rgba_palette_goes_over_white(tmp_path):
    """A P image whose palette holds RGBA colours (what Pillow's convert("P") and quantize()
    make of an RGBA image; no "transparency" in its info) has its transparent pixels white, as
    the same image saved as a PNG has; they were the colour stored under them (here black)."""
    image = Image.new("P", (2, 1))
    image.putpalette([200, 30, 40, 255, 0, 0, 0, 0], rawmode="RGBA")  # entry 0 opaque, 1 clear
    image.putpixel((1, 0), 1)
    if getattr(image.palette, "mode", None) != "RGBA":
        pytest.skip("this Pillow keeps no alpha in a palette")
    for im in (image, _save(image, tmp_path / "rgba_palette.png")):
        x = rgb_array(im)
        assert tuple(x[0, 0]) == (200, 30, 40) and tuple(x[0, 1]) == (255, 255, 255), im


def test_a_one_bit_png_with_a_transparent_colour_goes_over_white(tmp_path):
    """A 1-bit PNG with a tRNS key (Pillow opens it as mode 1 with info["transparency"]): the
    transparent pixels are white, not the black stored under them."""
    im = Image.new("1", (3, 1), 0)
    im.putpixel((0, 0), 1)
    x = rgb_array(_save(im, tmp_path / "bits.png", transparency=0))
    assert x[0].tolist() == [[255, 255, 255]] * 3


def test_a_16_bit_png_with_a_transparent_value_goes_over_white(tmp_path, monkeypatch):
    """A 16-bit grayscale PNG's tRNS value: those pixels white (they were that value // 257,
    a dark grey); the others scaled as any 16-bit pixel."""
    monkeypatch.setattr(images, "_warned_sixteen_bits", True)
    values = np.array([[1000, 40000, 1000]], np.uint16)
    path = tmp_path / "key16.png"
    try:
        _save(Image.fromarray(values), path, transparency=1000)
    except OSError:  # Pillow 9.1 writes no transparency for I;16, but does for I (a 16-bit PNG too)
        _save(Image.fromarray(values.astype(np.int32)), path, transparency=1000)
    x = rgb_array(path)
    assert x[0, :, 0].tolist() == [255, 40000 // 257, 255] and (x[0] == x[0, :, :1]).all()


def test_a_valid_kind_of_file_the_reader_cannot_decode_is_not_called_corrupt(tmp_path):
    """A TIFF of three float32 samples (OpenCV writes them) or a 12-bit JPEG: Pillow reads their
    headers but decodes neither; said to be an unsupported kind of file (or a damaged header:
    the words cannot tell), not flatly a corrupt header."""
    jpeg = io.BytesIO()
    _rgb().save(jpeg, format="JPEG")
    data = bytearray(jpeg.getvalue())
    data[data.find(b"\xff\xc0") + 4] = 12  # the frame header's sample precision: 12 bits
    err = _assert_input_error(bytes(data), f"<bytes ({len(data)} bytes)>", "unsupported kind of JPEG")
    assert "corrupt" not in err.problem and "(cannot handle 12-bit layers)" in err.problem
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "float.tif"
    # uncompressed: OpenCV 4.8 writes three float32 samples as SGILog (LogLuv) by default,
    # which Pillow 9.1 calls "unknown data organization"
    assert cv2.imwrite(str(path), np.full((4, 5, 3), 0.5, np.float32), [cv2.IMWRITE_TIFF_COMPRESSION, 1])
    err = _assert_input_error(path, str(path), "unsupported kind of TIFF")
    assert "corrupt" not in err.problem


def test_a_pil_image_closed_before_it_was_read_says_so(tmp_path):
    """``with Image.open(path) as im`` left before the pixels were read (Pillow: AssertionError),
    or an image closed after: said to be closed and what to do, not "truncated or corrupt image
    data" (the file is fine); an open one whose file is cut short is that, not closed."""
    path = _save(_rgb(), tmp_path / "a.png")
    with Image.open(path) as lazy:
        pass
    loaded = Image.open(path)
    loaded.load()
    loaded.close()
    for im in (lazy, loaded):
        err = _assert_input_error(im, "<PIL image 16x12 RGB>", "the PIL image is closed")
        assert "corrupt" not in err.problem
        assert err.problem.startswith("the PIL image is closed (")
        assert err.problem.endswith("); pass it before its with block ends, or pass the path")
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:-30])
    with Image.open(cut) as truncated:
        _assert_input_error(truncated, "<PIL image 16x12 RGB>", "truncated or corrupt image data")


def test_broken_exif_in_a_png_keeps_the_stored_pixels(tmp_path):
    """EXIF that is not TIFF data (Pillow's exif_transpose raises SyntaxError on it in a PNG):
    the photo is read as stored, not refused."""
    im = _rgb((1, 2, 3), (4, 2))
    im.putpixel((0, 0), (250, 0, 0))
    path = _save(im, tmp_path / "badexif.png", exif=b"Exif\x00\x00garbage-not-tiff")
    x = rgb_array(path)
    assert x.shape == (2, 4, 3) and tuple(x[0, 0]) == (250, 0, 0) and tuple(x[1, 3]) == (1, 2, 3)


def test_a_32_bit_image_with_8_bit_values_keeps_them():
    """Pillow's I mode holding 0..255 is an 8-bit image in disguise: 255 stays 255 (scaled as
    16-bit data, 255 // 257 would be black)."""
    im = Image.fromarray(np.array([[0, 128, 255]], np.int32))
    assert im.mode == "I"
    assert rgb_array(im)[0, :, 0].tolist() == [0, 128, 255]


def test_a_32_bit_image_over_16_bits_is_white_not_wrapped():
    # values over 65535 are clipped to it (255), not 70000 // 257 = 272 wrapped to 16
    im = Image.fromarray(np.array([[257, 65535, 70000, 2**31 - 1]], np.int32))
    assert rgb_array(im)[0, :, 0].tolist() == [1, 255, 255, 255]


@pytest.mark.parametrize("opened_as", ["installed", "I"])
def test_a_16_bit_file_with_8_bit_values_is_read_as_16_bit(tmp_path, monkeypatch, opened_as):
    """Only a 32-bit image keeps values that fit in 8 bits: a 16-bit PNG holds 0-65535, so 255
    is 255 // 257 = 0 (as in test_16_bit_arrays_and_files_read_as_0_to_65535_alike_and_in_order),
    also where Pillow opens it as I, 32-bit (before Pillow 10.3, whose PNG plugin maps a 16-bit
    grayscale PNG to ("I", "I;16B"); edgecap asks for Pillow >= 9.1). Before the fix: 255 with
    Pillow 9.1.1."""
    from PIL import PngImagePlugin

    if opened_as == "I":
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    monkeypatch.setattr(images, "_warned_sixteen_bits", True)  # the dark-frame hint: said before
    path = _save(Image.fromarray(np.array([[0, 200, 255]], np.uint16)), tmp_path / "deep.png")
    with Image.open(path) as im:
        assert im.mode in (("I",) if opened_as == "I" else ("I;16", "I"))
        assert rgb_array(im).max() == 0  # a PIL image opened from the file, too
    assert rgb_array(path).max() == 0


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_a_pil_image_with_no_pixels_is_an_input_error(size):
    w, h = size
    _assert_input_error(Image.new("RGB", size), f"<PIL image {w}x{h} RGB>", f"image has no pixels ({w}x{h})")


def test_a_32_bit_image_with_a_negative_value_is_refused():
    im = Image.fromarray(np.array([[0, -1, 200]], np.int32))
    _assert_input_error(im, "<PIL image 3x1 I>", "negative pixel values")


def test_an_input_error_names_a_pil_image_by_width_then_height():
    _assert_input_error(Image.new("La", (5, 3)), "<PIL image 5x3 La>", "cannot convert a La image")


def test_out_of_memory_while_decoding_names_the_size_width_first(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = _save(_rgb(size=(30, 20)), tmp_path / "wide.png")

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    _assert_input_error(path, str(path), "not enough memory to decode a 30x20 image")


def test_palette_png(tmp_path):
    im = _rgb((10, 120, 250)).convert("P", palette=Image.Palette.ADAPTIVE)
    x = rgb_array(_save(im, tmp_path / "p.png"))
    assert x.shape == (12, 16, 3)
    assert np.abs(x[0, 0].astype(int) - (10, 120, 250)).max() <= 8


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    x = rgb_array(_save(im, tmp_path / "t.png", transparency=1))
    assert tuple(x[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # red in CMYK
    x = rgb_array(_save(im, tmp_path / "cmyk.jpg"))
    assert x.shape == (10, 10, 3)
    assert x[5, 5, 0] > 200 and x[5, 5, 1] < 60 and x[5, 5, 2] < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    im = Image.fromarray(np.full((4, 5), 40000, np.uint16))
    path = _save(im, tmp_path / "deep.png")
    x = rgb_array(path)
    assert x.shape == (4, 5, 3)
    assert (x == 40000 // 257).all()


def test_exif_rotation(tmp_path):
    im = _rgb(size=(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    x = rgb_array(_save(im, tmp_path / "rot.jpg", exif=exif))
    assert x.shape == (20, 10, 3)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    x = rgb_array(path)
    assert x[0, 0, 0] > 200 and x[0, 0, 2] < 50


def test_webp(tmp_path):
    pytest.importorskip("PIL.WebPImagePlugin")
    x = rgb_array(_save(_rgb(), tmp_path / "a.webp", lossless=True))
    assert tuple(x[0, 0]) == (200, 30, 40)


def test_one_pixel_image(tmp_path):
    path = _save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "dot.png")
    x = images.preprocess([images.load_rgb(path)], Preprocessing())
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_bytes_and_pil_inputs_match_path(tmp_path):
    path = _save(_rgb(), tmp_path / "a.png")
    from_path = rgb_array(path)
    assert np.array_equal(rgb_array(path.read_bytes()), from_path)
    assert np.array_equal(rgb_array(Image.open(path)), from_path)
    assert np.array_equal(rgb_array(str(path)), from_path)


def test_pil_input_is_not_modified():
    im = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    images.load_rgb(im)
    assert im.mode == "RGBA" and im.getpixel((0, 0)) == (0, 0, 0, 0)


def test_an_exif_rotated_pil_image_is_turned_upright_without_turning_the_callers(tmp_path):
    upright = Image.new("RGB", (2, 3), (0, 0, 200))
    upright.putpixel((0, 0), (250, 0, 0))  # the top-left corner, where the viewer shows it
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise: rotate clockwise to display
    path = _save(upright.transpose(Image.Transpose.ROTATE_90), tmp_path / "turned.png", exif=exif)
    with Image.open(path) as im:
        x = rgb_array(im)
        assert im.size == (3, 2) and im.getexif()[0x0112] == 6  # the caller's, as stored
    assert x.shape == (3, 2, 3) and tuple(x[0, 0]) == (250, 0, 0)


def test_bundled_example_photos():
    from importlib.resources import files

    examples = files("edgecap") / "assets" / "examples"
    for name in ("chelsea.png", "rocket.jpg"):
        with examples.joinpath(name).open("rb") as f:
            x = rgb_array(f.read())
        assert x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8


# -- decompression bombs -----------------------------------------------------------------------
def test_decompression_bomb_far_over_limit(tmp_path):
    # over twice the limit: Pillow refuses while opening, but the message is edgecap's, with the
    # limit edgecap documents (89,478,485), not Pillow's doubled one (178,956,970)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    err = _assert_input_error(
        path,
        str(path),
        "10,000,000,000 pixels, over the limit of 89,478,485",
        "set_max_pixels",
        "EDGECAP_MAX_PIXELS",
    )
    assert "178956970" not in str(err) and "178,956,970" not in str(err)


def test_decompression_bomb_with_warnings_as_errors(tmp_path):
    # python -W error: Pillow's warning (between the limit and twice it) is raised while opening;
    # the image is still refused as too large, not as a corrupt header
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_input_error(path, str(path), "100,000,000 pixels, over the limit of 89,478,485")


def test_set_max_pixels(tmp_path):
    path = _save(_rgb(size=(20, 20)), tmp_path / "a.png")
    images.set_max_pixels(100)
    _assert_input_error(path, str(path), "400 pixels", "set_max_pixels")
    images.set_max_pixels(400)
    assert rgb_array(path).shape == (20, 20, 3)


def test_set_max_pixels_above_pillow_limit_lets_pillow_open(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    images.set_max_pixels(10**10)
    # Pillow no longer refuses the header; the (fake) pixel data then fails to decode.
    _assert_input_error(path, str(path), "truncated")


def test_set_max_pixels_raises_pillows_guard_at_once_and_never_lowers_it():
    """set_max_pixels(n) raises Pillow's process-wide guard to n when it is larger, at once, so
    a program that opens a large photo with Pillow itself (to pass edgecap the PIL image) is not
    refused by Pillow before edgecap has decoded anything: a 15,000 x 15,000 header is
    225,000,000 pixels, over twice Pillow's default of 89,478,485 (178,956,970), which Pillow
    refuses while opening. A lower n leaves Pillow's guard as it is (the caller's, not ours)."""
    data = png_header_only(15_000, 15_000)
    default = Image.MAX_IMAGE_PIXELS
    assert default == 89_478_485  # Pillow's default (the conftest restores it after each test)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    images.set_max_pixels(300_000_000)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    with Image.open(io.BytesIO(data)) as im:  # the caller's own call, before any edgecap decode
        assert im.size == (15_000, 15_000)
    images.set_max_pixels(100)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    Image.MAX_IMAGE_PIXELS = default
    images.set_max_pixels(100)
    _assert_input_error(_png((11, 10)), f"<bytes ({len(_png((11, 10)))} bytes)>", "over the limit of 100")
    assert Image.MAX_IMAGE_PIXELS == default  # nor does decoding under a lower limit


def test_env_var_limit(tmp_path, monkeypatch):
    path = _save(_rgb(size=(20, 20)), tmp_path / "a.png")
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "50")
    _assert_input_error(path, str(path), "over the limit of 50")


def _png(size) -> bytes:
    buf = io.BytesIO()
    _rgb(size=size).save(buf, format="PNG")
    return buf.getvalue()


# Every input kind is held to the same limit, not only paths and bytes: 11 wide x 10 high is
# 110 pixels, over a limit of 100; 10 x 10 is 100 pixels, at the limit, and accepted.
@pytest.mark.parametrize(
    "make, source, subject",
    [
        (lambda w, h: np.zeros((h, w, 3), np.uint8), "<array (10, 11, 3) uint8>", "array is"),
        (lambda w, h: np.zeros((h, w), np.float32), "<array (10, 11) float32>", "array is"),
        (lambda w, h: np.zeros((h, w, 4), np.uint16), "<array (10, 11, 4) uint16>", "array is"),
        (lambda w, h: Image.new("RGB", (w, h)), "<PIL image 11x10 RGB>", "PIL image is"),
        (lambda w, h: _png((w, h)), f"<bytes ({len(_png((11, 10)))} bytes)>", "image is"),
    ],
    ids=["rgb array", "gray float array", "rgba uint16 array", "PIL image", "bytes"],
)
def test_every_input_kind_is_held_to_the_pixel_limit(monkeypatch, make, source, subject):
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "100")
    for load in (images.load_rgb, images.load_rgb_array):  # load_rgb_array: a backend's own resize
        with pytest.raises(InputError) as info:
            load(make(11, 10))
        assert info.value.source == source
        assert info.value.problem.startswith(f"{subject} 11x10 = 110 pixels, over the limit of 100")
        assert "set_max_pixels" in info.value.problem and images.MAX_PIXELS_ENV in info.value.problem
        assert np.asarray(load(make(10, 10))).shape == (10, 10, 3)
    images.set_max_pixels(110)  # raised in code: accepted
    assert images.load_rgb_array(make(11, 10)).shape == (10, 11, 3)


# A side over 1,000,000 pixels is refused whatever the pixel count (1 x 1,000,001 is far under
# the 89,478,485-pixel limit): resizing a 1 x 89,000,000 strip had taken 2.4 GB. 1 x 1,000,000
# is at the limit and accepted; the strip is refused lying down too.
@pytest.mark.parametrize(
    "make, subject",
    [
        (lambda w, h: np.zeros((h, w, 3), np.uint8), "array is"),
        (lambda w, h: np.zeros((h, w), np.float32), "array is"),
        (lambda w, h: Image.new("RGB", (w, h)), "PIL image is"),
        (lambda w, h: _png((w, h)), "image is"),
    ],
    ids=["rgb array", "gray float array", "PIL image", "png bytes"],
)
def test_every_input_kind_is_held_to_the_side_limit(make, subject):
    for load in (images.load_rgb, images.load_rgb_array):
        for w, h in ((1, 1_000_001), (1_000_001, 1)):
            with pytest.raises(InputError) as info:
                load(make(w, h))
            assert info.value.problem.startswith(
                f"{subject} {w}x{h}, a side over the limit of 1,000,000 pixels"
            ), info.value.problem
        assert np.asarray(load(make(1, 1_000_000))).shape == (1_000_000, 1, 3)


def test_bad_limits(monkeypatch):
    with pytest.raises(ValueError):
        images.set_max_pixels(0)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=images.MAX_PIXELS_ENV):
        images.max_pixels()


def test_an_environment_limit_above_pillows_lets_pillow_open(tmp_path, monkeypatch):
    """As set_max_pixels does: EDGECAP_MAX_PIXELS above Pillow's guard raises that guard, so
    Pillow does not refuse what edgecap allows."""
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    monkeypatch.setenv(images.MAX_PIXELS_ENV, str(10**10))
    _assert_input_error(path, str(path), "truncated")  # the (fake) pixel data, not the size


@pytest.mark.parametrize("value", ["0", "-5"])
def test_an_environment_limit_below_one_is_refused(monkeypatch, value):
    monkeypatch.setenv(images.MAX_PIXELS_ENV, value)
    with pytest.raises(ValueError, match=f"{images.MAX_PIXELS_ENV} must be a positive integer"):
        images.max_pixels()
    monkeypatch.setenv(images.MAX_FILE_BYTES_ENV, value)
    with pytest.raises(ValueError, match=f"{images.MAX_FILE_BYTES_ENV} must be a positive integer"):
        images.max_file_bytes()


# -- arrays ------------------------------------------------------------------------------------
def test_rgb_array_passes_through():
    x = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(rgb_array(x), x)


def test_bgr_array():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV order
    assert tuple(rgb_array(bgr, color="bgr")[0, 0]) == (0, 0, 255)
    assert tuple(rgb_array(bgr[:, ::-1], color="bgr")[0, 0]) == (0, 0, 255)


def test_grayscale_arrays():
    for gray in (np.full((3, 4), 77, np.uint8), np.full((3, 4, 1), 77, np.uint8)):
        x = rgb_array(gray)
        assert x.shape == (3, 4, 3) and (x == 77).all()


def test_rgba_and_bgra_arrays_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    x = rgb_array(rgba)
    assert tuple(x[0, 0]) == (255, 0, 0) and tuple(x[1, 1]) == (255, 255, 255)
    assert tuple(rgb_array(rgba, color="bgr")[0, 0]) == (0, 0, 255)


def test_float_arrays_take_the_whole_closed_range():
    assert (rgb_array(np.ones((2, 2, 3), np.float32)) == 255).all()  # 1.0 is white, not refused
    assert (rgb_array(np.zeros((2, 2), np.float64)) == 0).all()


def test_half_transparent_array_pixels_are_blended_with_white_and_rounded():
    # (c * 128 + 255 * 127) / 255: c = 1 gives 127.502 -> 128, c = 0 gives 127, c = 255 gives 255
    rgba = np.array([[[1, 0, 255, 128]]], np.uint8)
    assert tuple(rgb_array(rgba)[0, 0]) == (128, 127, 255)
    assert tuple(rgb_array(rgba, color="bgr")[0, 0]) == (255, 127, 128)


def test_float_and_uint16_arrays():
    assert (rgb_array(np.full((2, 2, 3), 0.5, np.float32)) == 128).all()
    assert (rgb_array(np.full((2, 2, 3), 65535, np.uint16)) == 255).all()
    assert (rgb_array(np.full((2, 2, 3), 40000, np.uint16)) == 155).all()  # 40000 // 257


def test_a_non_contiguous_memoryview_is_an_input_error_in_its_slot():
    """Naming the input must not fail on it (describe() cast the view, which raises for a
    non-contiguous one: the whole batch was lost to a TypeError)."""
    view = memoryview(np.zeros((10, 10), np.uint8)[:, ::2])
    with pytest.raises(InputError, match=r"^<bytes \(50 bytes\)>: not an image"):
        images.load_rgb(view)


def test_16_bit_arrays_and_files_read_as_0_to_65535_alike_and_in_order(tmp_path):
    """uint16 arrays and 16-bit PNGs (Pillow's I;16) map the same values to the same levels,
    x // 257, so a brighter pixel is never darker (values kept when they fit in 8 bits made
    255 bright and 256 black)."""
    values = np.array([[0, 200, 255, 256], [3000, 4095, 40000, 65535]], np.uint16)
    want = values // 257  # [0, 0, 0, 0], [11, 15, 155, 255]
    assert (rgb_array(values)[:, :, 0] == want).all()
    assert (rgb_array(np.stack([values] * 3, axis=2)) == want[:, :, None]).all()
    assert (rgb_array(_save(Image.fromarray(values), tmp_path / "deep.png")) == want[:, :, None]).all()


_SIXTEEN_BITS = np.array([[0, 256, 3000, 40000, 65535]], np.uint16)
_SIXTEEN_BITS_READ = np.array([[0, 0, 11, 155, 255]], np.uint8)  # values // 257, by hand


def test_16_bit_images_of_either_byte_order_are_scaled_not_clipped(tmp_path):
    """A big-endian 16-bit TIFF (byte order "MM": Pillow opens it as mode I;16B, not I;16)
    reads as x // 257 as I;16 does; Pillow's own convert("RGB") clips it instead (256 and 40000
    both white)."""
    big_endian = Image.frombytes("I;16B", (5, 1), _SIXTEEN_BITS.astype(">u2").tobytes())
    path = _save(big_endian, tmp_path / "deep.tif")
    with Image.open(path) as im:
        assert im.mode == "I;16B"  # what this test is about: a file that opens as I;16B
    assert (rgb_array(path) == _SIXTEEN_BITS_READ[:, :, None]).all()


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_pil_images_of_the_other_16_bit_modes_are_scaled_not_clipped(mode, dtype):
    """PIL images of Pillow's other 16-bit modes read as x // 257 as I;16 does (the values of
    test_16_bit_images_of_either_byte_order_are_scaled_not_clipped)."""
    if mode == "I;16N":
        needs_pillow("9.5", "an I;16N image from bytes")  # 9.1: "unknown raw mode"
    im = Image.frombytes(mode, (5, 1), _SIXTEEN_BITS.astype(dtype).tobytes())
    assert im.mode == mode
    assert (rgb_array(im) == _SIXTEEN_BITS_READ[:, :, None]).all()


def test_dark_16_bit_data_is_captioned_with_a_hint_said_once(monkeypatch):
    """12-bit sensor data (0-4095) or 8-bit data cast to uint16 reads as a dark frame (with
    nothing said before): read as it is, with one UserWarning naming the shift; a camera loop
    does not get it every frame."""
    monkeypatch.setattr(images, "_warned_sixteen_bits", False)
    frame = np.full((4, 4, 3), 4095, np.uint16)
    with pytest.warns(UserWarning, match=r"highest is 4095\).*array << 4 for 12-bit"):
        assert (rgb_array(frame) == 4095 // 257).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb_array(frame)  # said once
        rgb_array(np.full((4, 4, 3), 40000, np.uint16))  # bright enough: nothing to say
    assert (rgb_array(frame << 4) == (4095 << 4) // 257).all()  # the shift: a bright frame


@pytest.mark.parametrize(("highest", "hinted"), [(1, True), (4095, True), (4096, False), (0, False)])
def test_the_dark_data_hint_is_for_16_bit_values_all_below_4096_not_all_0(monkeypatch, highest, hinted):
    """The hint's edges (``_sixteen_bits_to_uint8``: values all below 4096, not all 0): a
    highest value of 1 or 4095 is hinted, 4096 (13 bits) and a black frame are not."""
    monkeypatch.setattr(images, "_warned_sixteen_bits", False)
    frame = np.zeros((4, 4, 3), np.uint16)
    frame[0, 0, 0] = highest
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rgb_array(frame)
    hints = [str(w.message) for w in said if "16-bit pixel values all below 4096" in str(w.message)]
    assert [hint.partition(") are read")[0] + ")" for hint in hints] == (
        [f"<array (4, 4, 3) uint16>: 16-bit pixel values all below 4096 (the highest is {highest})"]
        if hinted
        else []
    )


def test_an_all_black_16_bit_frame_does_not_use_up_the_dark_data_hint(monkeypatch):
    """The hint is for values all below 4096 but not all 0: a black uint16 frame (a camera's
    first frames, a lens cap) is black whatever its bit depth, says nothing, and leaves the one
    hint for the 12-bit frame after it."""
    monkeypatch.setattr(images, "_warned_sixteen_bits", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (rgb_array(np.zeros((4, 4, 3), np.uint16)) == 0).all()
    with pytest.warns(UserWarning, match=r"highest is 4095\)"):
        rgb_array(np.full((4, 4, 3), 4095, np.uint16))


def test_a_32_bit_float_image_is_scaled_from_0_1_like_a_float_array(tmp_path):
    """A float TIFF (Pillow's mode F), as a file or a PIL image, holds levels in [0, 1] as a
    float array does: 0 -> 0, 0.25 -> round(63.75) = 64, 0.5 -> round(127.5) = 128 (numpy
    rounds half to even), 1 -> 255; not truncated to integers (0 and 1: black)."""
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    want = np.array([[0, 64, 128, 255]], np.uint8)
    im = Image.fromarray(values)
    assert im.mode == "F"
    path = _save(im, tmp_path / "float.tif")
    for image in (im, path):
        assert (rgb_array(image) == want[:, :, None]).all()


def test_a_32_bit_float_image_in_levels_is_read_as_pillow_reads_it(tmp_path):
    """Pillow's own ``convert("F")`` of a grey image keeps its levels (0-255), and so does a
    float TIFF made that way: 0 -> 0, 3.7 -> 3, 127.5 -> 127 (truncated), 200 -> 200, 255 ->
    255, as a file or a PIL image, as Pillow's ``convert("L")`` gives them. Values
    past 255 or below 0 fit neither convention: an ``InputError`` naming both ranges. A float
    array keeps the one convention (levels in [0, 1])."""
    values = np.array([[0.0, 3.7, 127.5, 200.0, 255.0]], np.float32)
    want = np.array([[0, 3, 127, 200, 255]], np.uint8)
    im = Image.fromarray(values)
    assert im.mode == "F" and (np.asarray(im.convert("L")) == want).all()
    path = _save(im, tmp_path / "levels.tif")
    for image in (im, path):
        assert (rgb_array(image) == want[:, :, None]).all()
    grey = Image.fromarray(np.array([[0, 90, 255]], np.uint8)).convert("F")
    assert (rgb_array(grey)[:, :, 0] == [[0, 90, 255]]).all()
    for bad in (np.array([[0.0, 300.0]], np.float32), np.array([[-2.0, 100.0]], np.float32)):
        with pytest.raises(InputError, match=r"must lie in \[0, 1\] or \[0, 255\] \(levels\)"):
            rgb_array(Image.fromarray(bad))
    with pytest.raises(InputError, match=r"must lie in \[0, 1\], got \[0.0, 200.0\]"):
        rgb_array(np.array([[0.0, 200.0]], np.float32))
    # a value just over 1 (a resize's overshoot) is shown as it is, not rounded to "1", which
    # had read "must lie in [0, 1], got [0, 1]"
    with pytest.raises(InputError, match=r"must lie in \[0, 1\], got \[0.0, 1.0000001\];"):
        rgb_array(np.array([[0.0, 1.0000001]], np.float32))


def test_a_float_image_a_little_over_1_is_refused_not_read_as_a_black_frame(tmp_path):
    """A float TIFF in [0, 1] whose highlights go over 1 (brightest 1.5) had been read as levels
    0-1, a black frame ("nothing recognisable"); it cannot be told from levels, so it is refused,
    naming both readings, as a file and as a PIL image. At 2 and over it is levels, as before."""
    im = Image.fromarray(np.array([[0.03, 0.5, 1.5]], np.float32))
    for image in (im, _save(im, tmp_path / "hdr.tif")):
        with pytest.raises(InputError, match=r"\[0.03, 1.5\]: \[0, 1\] with highlights over 1, or levels"):
            rgb_array(image)
    levels = Image.fromarray(np.array([[0.0, 1.0, 2.0]], np.float32))
    assert rgb_array(levels)[0, :, 0].tolist() == [0, 1, 2]


def test_pillows_guard_turned_off_by_the_program_stays_off():
    """A program that sets PIL.Image.MAX_IMAGE_PIXELS = None (no limit) for its own Pillow calls
    keeps that: decoding with edgecap (its own limit still applies) and set_max_pixels leave
    Pillow's guard off, and a 15,000 x 15,000 header (225,000,000 pixels, over twice Pillow's
    default) still opens in the program's own Image.open afterwards."""
    Image.MAX_IMAGE_PIXELS = None  # restored by the conftest
    data = png_header_only(15_000, 15_000)
    assert images.load_rgb(_png((11, 10))).size == (11, 10)
    _assert_input_error(data, f"<bytes ({len(data)} bytes)>", "over the limit of 89,478,485")
    images.set_max_pixels(10**9)
    assert Image.MAX_IMAGE_PIXELS is None
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (15_000, 15_000)


def test_lazily_opened_images_do_not_share_one_load_lock():
    """Loads of one image object take one lock (Pillow's load is not thread-safe), but loads of
    different images run in parallel: ids are aligned addresses, and ``id % 64`` had put every
    image on the same lock."""
    kept = [Image.new("RGB", (2, 2)) for _ in range(64)]
    assert len({id(images._load_lock(im)) for im in kept}) >= 16
    assert all(images._load_lock(im) is images._load_lock(im) for im in kept)


@pytest.mark.parametrize("stride", [48, 96, 128, 192, 256])
def test_images_made_one_after_another_spread_over_the_load_locks(stride):
    """Images made in a row lie a fixed stride apart (a PIL image: 48 bytes on Python 3.10, 96 on
    3.12, 128 on 3.13, 256 on 3.11); ``hash((id,)) % 64`` put 64 of them 48, 96 or 192 bytes
    apart on 15 to 18 locks, whatever the first address (the test above failed on Python 3.10
    about one run in two). Random slots would fill about 40."""
    for base in (0x7F7A0540F1F0, 0x55D0C3A2B000, 0x7FFF12345670):
        slots = {images._lock_slot(base + k * stride) for k in range(64)}
        assert len(slots) >= 30, (hex(base), len(slots))


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((4, 4, 3), np.int64), ["dtype int64"]),
        (np.zeros((4, 4, 3), bool), ["dtype bool"]),
        (np.zeros((4, 4, 2), np.uint8), ["got 2"]),
        (np.zeros((3, 8, 8), np.uint8), ["channels-first"]),
        (np.zeros((4, 8, 8), np.uint8), ["channels-first"]),  # RGBA, channels first
        (np.zeros((1, 8, 8), np.uint8), ["channels-first"]),  # grey, channels first
        (np.zeros((2, 4, 4, 3), np.uint8), ["4 dimensions", "pass one image at a time or a list of images"]),
        (np.zeros((5,), np.uint8), ["got 1 dimension"]),  # not "1 dimensions"
        (np.zeros((0, 4, 3), np.uint8), ["empty"]),
        (np.full((4, 4, 3), np.nan, np.float32), ["NaN"]),
        (np.full((4, 4, 3), 200.0), ["[0, 1]"]),
    ],
)
def test_bad_arrays(array, words):
    _assert_input_error(array, f"<array {tuple(array.shape)} {array.dtype}>", *words)


def test_a_one_dimensional_array_is_counted_in_the_singular():
    """It had said "got 1 dimensions" (4 dimensions: the plural, in test_bad_arrays)."""
    err = _assert_input_error(np.zeros((5,), np.uint8), "<array (5,) uint8>")
    assert err.problem == "expected an (H, W, 3) image array, got 1 dimension"


def test_preprocess_batch():
    pre = Preprocessing()
    batch = images.preprocess(
        [
            images.load_rgb(np.zeros((30, 40, 3), np.uint8)),
            images.load_rgb(np.full((224, 224), 255, np.uint8)),
        ],
        pre,
    )
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    assert np.allclose(batch[0], -1.0) and np.allclose(batch[1], 1.0)
    assert images.preprocess([], pre).shape == (0, 3, 224, 224)
    # (N, 3, H, W) for a model size that is not square too, an empty batch included
    wide = Preprocessing(size=(120, 200))
    assert images.preprocess([images.load_rgb(np.zeros((5, 7, 3), np.uint8))], wide).shape == (1, 3, 120, 200)
    assert images.preprocess([], wide).shape == (0, 3, 120, 200)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_model_input():
    """draft_size: a 4000x3000 JPEG is decoded at 1/8 scale (both sides still >= 224), and the
    224x224 model input barely changes."""
    examples = Path(images.__file__).parent / "assets" / "examples"
    big = Image.open(examples / "astronaut.png").convert("RGB").resize((4000, 3000))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    full = images.load_rgb(buf.getvalue())
    reduced = images.load_rgb(buf.getvalue(), draft_size=(224, 224))
    assert full.size == (4000, 3000)
    assert reduced.size == (500, 375)
    a, b = (images.preprocess([im], Preprocessing()) for im in (full, reduced))
    assert np.abs(a - b).mean() < 0.01


def test_reduced_scale_keeps_both_sides_of_a_non_square_model_input():
    """draft_size (320, 224): a JPEG is reduced only while the photo stays at least 320 wide and
    224 high, upright (EXIF) or not. A 1200x2000 portrait: 1/4 would give 300x500, under 320
    wide, so 1/2 (600x1000); stored as 2000x1200 with orientation 6, the same upright 600x1000."""
    portrait = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 1200, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for stored, kwargs in ((portrait, {}), (portrait.transpose(Image.Transpose.ROTATE_90), {"exif": exif})):
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=80, **kwargs)
        assert images.load_rgb(buf.getvalue(), draft_size=(320, 224)).size == (600, 1000)


def test_a_cameras_multi_picture_jpeg_is_decoded_at_reduced_scale_too():
    """An MPO (Pillow's format for a camera's JPEG with a second picture) is a JPEG: 2000x1600 at
    1/4 is 500x400 (1/8, 250x200, would be under 224 high)."""
    needs_pillow("9.3", "writing an MPO")  # 9.1: KeyError 'MPO' (it reads them)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 2000, 3), np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[photo.resize((200, 160))])
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.format == "MPO"
    assert images.load_rgb(buf.getvalue(), draft_size=(224, 224)).size == (500, 400)


# -- embedded colour profiles ------------------------------------------------------------------
# sRGB's primaries as an ICC profile holds them (XYZ, adapted to D50) and its tone curve (IEC
# 61966-2-1) as an ICC parametric curve of type 3: g, a, b, c, d.
SRGB_PRIMARIES = {
    "r": (0.4360747, 0.2225045, 0.0139322),
    "g": (0.3850649, 0.7168786, 0.0971045),
    "b": (0.1430804, 0.0606169, 0.7141733),
}
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)


def _icc_rgb_profile(description: str, primaries: dict, curve=SRGB_CURVE, extra: bytes = b"") -> bytes:
    """A matrix/TRC RGB display profile (ICC.1:2001-04, version 2.1; the tone curve as a
    parametric curve) written from the ICC specification's layout, for profiles no package here
    ships (Adobe RGB and the like). ``extra``: the data of one more, private tag (as a camera's
    profile carries its maker's data), which a reader skips."""
    import struct

    def fixed(*values):  # s15Fixed16Number
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    text = description.encode("ascii") + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    para = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + fixed(*curve)
    d50 = (0.9642, 1.0, 0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ \0\0\0\0" + fixed(*d50))]
    tags += [(c.encode() + b"XYZ", b"XYZ \0\0\0\0" + fixed(*primaries[c])) for c in "rgb"]
    tags += [(c.encode() + b"TRC", para) for c in "rgb"]
    tags += [(b"zpad", extra)] if extra else []
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + fixed(*d50)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def _rotated_primaries_profile(description: str = "rotated primaries") -> bytes:
    """sRGB with its primaries rotated: the stored channels are sRGB's green, blue and red, so
    a pixel stored as (x, y, z) is sRGB (z, x, y)."""
    p = SRGB_PRIMARIES
    return _icc_rgb_profile(description, {"r": p["g"], "g": p["b"], "b": p["r"]})


def _colours() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)


def test_an_embedded_rgb_profile_is_converted_to_srgb(tmp_path):
    """A photo in another RGB space (Adobe RGB, Display P3, a camera's) is read as a
    colour-managed viewer shows it: here a space whose stored channels are sRGB's green, blue
    and red, so each pixel comes back with its channels rotated (to lcms's 8-bit precision). As
    a file, as its bytes and as an opened PIL image; an RGBA image too, over white."""
    stored = _colours()
    profile = _rotated_primaries_profile()
    expected = stored[:, :, [2, 0, 1]].astype(int)
    path = _save(Image.fromarray(stored), tmp_path / "rotated.png", icc_profile=profile)
    with Image.open(path) as opened:
        for image in (path, path.read_bytes(), opened):
            got = rgb_array(image).astype(int)
            assert np.abs(got - expected).max() <= 2, image
    rgba = np.dstack([stored, np.full(stored.shape[:2], 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel: white, which is white in both spaces
    got = rgb_array(_save(Image.fromarray(rgba), tmp_path / "rgba.png", icc_profile=profile)).astype(int)
    assert np.abs(got[1:] - expected[1:]).max() <= 2 and (got[0, 0] >= 253).all()


def test_a_profile_is_converted_with_a_pillow_that_has_no_imagecms_flags(tmp_path, monkeypatch):
    """pyproject allows Pillow 9.1: ``ImageCms.Flags`` came in 10.3 (before it a ``FLAGS`` dict),
    and asking for it there had left every profile unapplied (the AttributeError taken for an
    unreadable profile)."""
    from PIL import ImageCms

    # an older Pillow itself (9.1 to 10.2), or this one without Flags; the flag is worked out when
    # edgecap.images is imported, so it is worked out again here
    if hasattr(ImageCms, "Flags"):
        assert images._NOCACHE == ImageCms.Flags.NOCACHE
        monkeypatch.delattr(ImageCms, "Flags")
    else:
        assert images._NOCACHE == ImageCms.FLAGS["NOTCACHE"]
    monkeypatch.setattr(images, "_NOCACHE", images._nocache_flag())
    assert images._NOCACHE == 0x40
    profile = _rotated_primaries_profile("rotated primaries, an older Pillow")  # not cached yet
    path = _save(Image.fromarray(_colours()), tmp_path / "rotated.png", icc_profile=profile)
    got = rgb_array(path).astype(int)
    assert np.abs(got - _colours()[:, :, [2, 0, 1]].astype(int)).max() <= 2


def test_an_srgb_or_unusable_profile_leaves_the_pixels_as_stored(tmp_path, monkeypatch):
    """A profile that says sRGB (by its name, as cameras write "sRGB IEC61966-2.1"), bytes lcms
    cannot read, one over MAX_PROFILE_BYTES, and a grey image's profile: the pixels as stored,
    bit for bit, and no error."""
    stored = _colours()
    cases = {
        "srgb.png": _rotated_primaries_profile("sRGB IEC61966-2.1"),
        "garbage.png": b"not a colour profile at all",
        "large.png": _rotated_primaries_profile("rotated primaries, named at length to be the largest"),
    }
    monkeypatch.setattr(images, "MAX_PROFILE_BYTES", len(cases["large.png"]) - 1)
    for name, profile in cases.items():
        path = _save(Image.fromarray(stored), tmp_path / name, icc_profile=profile)
        assert (rgb_array(path) == stored).all(), name
    grey = stored[:, :, 0]
    path = _save(Image.fromarray(grey), tmp_path / "grey.png", icc_profile=_rotated_primaries_profile())
    assert (rgb_array(path) == grey[:, :, None]).all()


def test_a_profile_of_up_to_4_mib_is_applied_and_one_over_it_is_not():
    """docs/reliability.md: an embedded profile over 4 MiB is not applied (the pixels as
    stored); real profiles with tone curves as tables, or a maker's private data, run to tens
    or hundreds of KiB, and are applied. The rotated-primaries profile padded by a private tag
    to exactly 4 MiB (4,194,304 bytes) is applied, 4 bytes more is not."""
    stored = _colours()
    p = SRGB_PRIMARIES
    rotated = {"r": p["g"], "g": p["b"], "b": p["r"]}
    small = len(_icc_rgb_profile("rotated primaries, padded", rotated, extra=b"\0" * 4))
    for size, applied in ((4 << 20, True), ((4 << 20) + 4, False)):
        pad = b"\0" * (size - small + 4)
        profile = _icc_rgb_profile("rotated primaries, padded", rotated, extra=pad)
        assert len(profile) == size
        image = Image.fromarray(stored)
        image.info["icc_profile"] = profile
        got = rgb_array(image).astype(int)
        if applied:
            assert np.abs(got - stored[:, :, [2, 0, 1]].astype(int)).max() <= 2
        else:
            assert (got == stored).all()


def test_an_input_held_past_the_sources_next_read_is_copied_unless_over_the_pixel_limit():
    """``own_input`` (what a decoding worker or a live stream holds while its source reads the
    next frame): an array, 2-D or 3-D, or a torch tensor comes back as a copy with the same
    pixels that the source refilling its buffer does not change; a picture over the pixel limit
    (H x W counted from its first two axes, whatever its channels) comes back as it is, not
    copied, for preparing it to refuse it; bytes and paths as they are."""
    torch = pytest.importorskip("torch")
    for frame in (
        np.arange(48, dtype=np.uint8).reshape(4, 4, 3),
        np.arange(16, dtype=np.uint8).reshape(4, 4),
    ):
        held = images.own_input(frame)
        assert held is not frame and np.array_equal(held, frame)
        frame[:] = 0  # the source refills its buffer
        assert held.max() > 0
    tensor = torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3)
    held = images.own_input(tensor)
    assert isinstance(held, torch.Tensor)  # cloned as a tensor (a CUDA one has no numpy view)
    tensor.zero_()
    assert held.sum() == sum(range(48))
    images.set_max_pixels(100)
    for over in (np.zeros((20, 10, 3), np.uint8), np.zeros((20, 10), np.uint8), Image.new("RGB", (10, 20))):
        assert images.own_input(over) is over  # 200 pixels (by 3 channels or 10 columns: 60, 100)
    within = np.zeros((10, 10, 3), np.uint8)
    assert images.own_input(within) is not within
    assert images.own_input(b"\xff\xd8") == b"\xff\xd8" and images.own_input("a.jpg") == "a.jpg"


def test_an_image_sure_to_be_refused_is_found_without_reading_any(tmp_path):
    """``first_unusable_unread`` (how ``caption_batch(on_error="raise")`` skips the searches a
    late bad image would throw away): the index of the first image its docstring lists as sure
    to be refused unread, each kind alone after a good photo; None where every image may be
    usable (a file is not opened: one that is no image counts as usable here)."""
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    empty, folder, not_an_image = tmp_path / "empty.jpg", tmp_path / "folder", tmp_path / "text.jpg"
    empty.write_bytes(b"")
    folder.mkdir()
    not_an_image.write_bytes(b"not an image")
    usable = [
        str(good),
        good,
        str(not_an_image),
        b"\xff\xd8",
        bytearray(b"x"),
        memoryview(b"x"),
        Image.new("RGB", (2, 2)),
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4, 4), np.float32),
        np.zeros((4, 4, 3), ">u2"),
        _ArrayLike(),
    ]
    unusable = [
        str(tmp_path / "missing.jpg"),
        str(folder),
        str(empty),
        None,
        b"",
        bytearray(),
        memoryview(b""),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((4, 4, 3), np.int32),
        42,
        object(),
    ]
    assert images.first_unusable_unread(usable) is None
    for bad in unusable:
        assert images.first_unusable_unread([good, bad, None]) == 1, bad
    images.set_max_file_bytes(good.stat().st_size - 1)
    try:
        assert images.first_unusable_unread([np.zeros((4, 4, 3), np.uint8), good]) == 1  # over the limit
    finally:
        images.set_max_file_bytes(None)
    images.set_max_file_bytes(good.stat().st_size)
    try:
        assert images.first_unusable_unread([good]) is None  # at the limit: read
    finally:
        images.set_max_file_bytes(None)


class _ArrayLike:
    """Another library's image: numpy reads it through ``__array__``."""

    def __array__(self, *args, **kwargs):
        return np.zeros((4, 4, 3), np.uint8)
