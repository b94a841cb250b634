"""Every kind of input through the API: each supported one becomes a caption, each bad one an
``InputError`` whose one-line message names it; decompression bombs are refused before decoding.

Uses the ``tiny_model_dir`` and ``zoo`` fixtures (tests/conftest.py). Test images are made with
Pillow from the bundled example photos; never dataset photos.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from PIL import Image

from edgecap import Caption, Captioner, InputError
from edgecap import images
from helpers import BAD, GOOD, chelsea, rgb_array


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=6)


def test_every_good_file_is_captioned(captioner, zoo):
    for name in GOOD:
        caption = captioner.caption(str(zoo / name))
        assert isinstance(caption, Caption) and caption.text, name


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_file_is_a_one_line_input_error(captioner, zoo, name):
    path = str(zoo / name)
    with pytest.raises(InputError) as info:
        captioner.caption(path)
    assert info.value.source == path and str(info.value).startswith(f"{path}: ")
    assert BAD[name] in info.value.problem and "\n" not in str(info.value)


class _RefusingPath(os.PathLike):
    """A path object that cannot say its path (a lazily resolved remote path, say)."""

    def __fspath__(self):
        raise RuntimeError("the share is not mounted")


class _NumberPath(os.PathLike):
    def __fspath__(self):
        return 42


def test_a_path_object_that_cannot_say_its_path_is_its_own_input_error(captioner, zoo):
    """Its failure is an InputError in its slot, named by its type and saying what failed;
    the photos beside it are captioned (``on_error="return"``)."""
    good = str(zoo / GOOD[0])
    out = captioner.caption_batch([good, _RefusingPath(), _NumberPath(), good], on_error="return")
    assert isinstance(out[0], Caption) and isinstance(out[3], Caption)
    assert out[0].text == out[3].text == captioner.caption(good).text
    assert isinstance(out[1], InputError) and out[1].source == "<_RefusingPath>"
    assert out[1].problem == "cannot load this input (the share is not mounted)"
    assert isinstance(out[2], InputError) and out[2].source == "<_NumberPath>"
    assert "__fspath__() to return str or bytes, not int" in out[2].problem


class _BytesPath(os.PathLike):
    def __init__(self, raw: bytes):
        self.raw = raw

    def __fspath__(self):
        return self.raw


def test_a_path_object_of_bytes_is_named_as_text(captioner, zoo, tmp_path):
    """docs: ``InputError.source`` holds the name (a str): a PathLike whose path is bytes
    (``os.PathLike[bytes]``) is named by that path as text, a byte that is not UTF-8 as the
    message writes it (\\xff), not as a bytes object (the message had begun "b'/nope\\xff.jpg'");
    one that names a photo is captioned."""
    missing = os.fsencode(tmp_path) + b"/nope\xff.jpg"
    out = captioner.caption_batch(
        [_BytesPath(missing), _BytesPath(os.fsencode(zoo / GOOD[0]))], on_error="return"
    )
    assert isinstance(out[0], InputError) and out[0].source == os.fsdecode(missing)
    assert str(out[0]) == f"{tmp_path}/nope\\xff.jpg: no such file"
    assert isinstance(out[1], Caption) and out[1].text == captioner.caption(zoo / GOOD[0]).text


def test_missing_path_and_directory(captioner, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        captioner.caption(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="directory"):
        captioner.caption(tmp_path)


def test_16bit_files_are_scaled(zoo):
    photo = np.asarray(chelsea())
    assert np.array_equal(rgb_array(zoo / "rgb48.png"), photo)
    gray = np.asarray(chelsea().convert("L"))
    assert np.array_equal(rgb_array(zoo / "gray16.png")[..., 0], gray)


@pytest.mark.parametrize(
    "orientation, stored_as",
    [
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
        (3, Image.Transpose.ROTATE_180),
        (4, Image.Transpose.FLIP_TOP_BOTTOM),
        (5, Image.Transpose.TRANSPOSE),
        (6, Image.Transpose.ROTATE_90),
        (7, Image.Transpose.TRANSVERSE),
        (8, Image.Transpose.ROTATE_270),
    ],
)
def test_exif_orientation_gives_the_upright_pixels(tmp_path, orientation, stored_as):
    upright = chelsea((90, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "stored.png"  # lossless, so pixels can be compared exactly
    upright.transpose(stored_as).save(path, exif=exif)
    assert np.array_equal(rgb_array(path), np.asarray(upright))


def test_exif_rotated_file_is_captioned_like_the_upright_pixels(captioner, tmp_path):
    upright = chelsea((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    rotated_caption = captioner.caption(path)
    assert rotated_caption == captioner.caption(np.asarray(upright))
    # ... and the orientation matters to the model: the stored pixels caption differently.
    stored = captioner.caption(np.asarray(upright.transpose(Image.Transpose.ROTATE_90)))
    assert stored.score != rotated_caption.score


@pytest.mark.parametrize(
    "exc",
    [
        NotImplementedError("unknown pixel format"),
        struct.error("unpack requires a buffer"),
        IndexError(),
        MemoryError(),
    ],
)
def test_any_decoder_failure_is_an_input_error(monkeypatch, tmp_path, exc):
    path = tmp_path / "odd.png"
    chelsea().save(path)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(Image.Image, "load", fail)
    with pytest.raises(InputError, match="odd.png") as info:
        images.load_rgb(path)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(InputError, match="corrupt image header"):
        images.load_rgb(path.read_bytes())


def test_lazily_opened_truncated_pil_image(captioner, zoo):
    with Image.open(zoo / "truncated.jpg") as im:  # opens (header only); pixels are missing
        with pytest.raises(InputError, match="truncated"):
            captioner.caption(im)


def test_pil_mode_that_cannot_become_rgb():
    im = Image.new("La", (4, 4))
    with pytest.raises(InputError, match="La"):
        images.load_rgb(im)


def test_multiline_problems_are_one_line():
    err = InputError("x.tif", "TIFFReadDirectory: bad\nTIFFFetch: worse\r\n")
    assert str(err) == "x.tif: TIFFReadDirectory: bad TIFFFetch: worse"


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((8, 8, 3), np.int32), "dtype int32"),
        (np.zeros((8, 8, 3), np.complex64), "dtype complex64"),
        (np.zeros((8, 8, 3), object), "dtype object"),
        (np.zeros((8, 8, 5), np.uint8), "got 5"),
        (np.zeros((3, 16, 16), np.float32), "channels-first"),
        (np.zeros((1, 8, 8, 3), np.uint8), "4 dimensions"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), np.inf, np.float64), "infinite"),
        (np.full((8, 8), -0.5, np.float16), "[0, 1]"),
    ],
)
def test_bad_arrays_through_the_api(captioner, array, words):
    with pytest.raises(InputError, match=r"<array .*>") as info:
        captioner.caption(array)
    assert words in info.value.problem


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, on purpose
def test_unusual_but_valid_arrays(captioner):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    reference = captioner.caption(rgb)
    assert captioner.caption(np.asfortranarray(rgb)) == reference
    assert captioner.caption(rgb[::-1].copy()[::-1]) == reference  # negative strides
    big_endian = (rgb.astype(np.uint16) * 257).astype(">u2")
    assert captioner.caption(big_endian) == reference
    assert captioner.caption(np.zeros((1, 1, 3), np.uint8)).text
    assert rgb_array(np.matrix(rgb[..., 0])).shape == (40, 30, 3)


def test_bomb_limit_is_clear_and_can_be_raised(captioner, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    chelsea((400, 300)).save(path)  # 120,000 pixels
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "100000")
    with pytest.raises(InputError, match="120,000 pixels.*over the limit of 100,000") as info:
        captioner.caption(path)
    assert "set_max_pixels" in info.value.problem and images.MAX_PIXELS_ENV in info.value.problem
    images.set_max_pixels(200_000)  # the documented way to raise it, in code
    assert captioner.caption(path).text


def test_a_thin_strip_is_its_own_input_error_and_the_others_are_captioned(captioner, tmp_path):
    """A PNG of 1 x 1,000,001 pixels (a few kilobytes, far under the pixel limit) is refused from
    its header, in its own slot, not resized (a 1 x 89,000,000 strip had taken 2.4 GB, and a
    MemoryError there had ended the whole call); the photos around it are captioned."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 1_000_001)).save(strip)
    photo = np.asarray(chelsea((40, 30)))
    results = captioner.caption_batch([photo, strip, photo], on_error="return")
    assert [type(r).__name__ for r in results] == ["Caption", "InputError", "Caption"]
    assert results[1].source == str(strip)
    assert results[1].problem.startswith("image is 1x1000001, a side over the limit of 1,000,000 pixels")


def test_running_out_of_memory_resizing_one_photo_costs_only_its_caption(captioner, monkeypatch):
    """The memory to resize one photo (a picture the limits let through, on a machine short of
    memory) is that photo's InputError in its slot, not an error that ends the call: docs/
    reliability.md, whatever fails while one input is loaded, even a MemoryError."""
    from edgecap import api

    real = api.model_input

    def model_input(image, *args, **kwargs):
        if image.size == (41, 30):
            raise MemoryError
        return real(image, *args, **kwargs)

    monkeypatch.setattr(api, "model_input", model_input)
    small, odd = np.asarray(chelsea((40, 30))), np.asarray(chelsea((41, 30)))
    for workers in (0, 2):
        captioner.decode_workers = workers
        try:
            results = captioner.caption_batch([small, odd, small], on_error="return")
        finally:
            captioner.decode_workers = 0
        assert [type(r).__name__ for r in results] == ["Caption", "InputError", "Caption"]
        assert results[1].source == "<array (30, 41, 3) uint8>"
        assert results[1].problem == "out of memory resizing it (41x30) for the model"


def test_arrays_and_pil_images_are_held_to_the_limit_per_input(captioner, monkeypatch):
    """An array or a PIL image over the limit is that input's InputError, as a file is: the other
    inputs of the batch are still captioned. 40 wide x 30 high = 1,200 pixels, over 1,000;
    30 x 20 = 600 pixels, under it."""
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000")
    small = np.asarray(chelsea((30, 20)))
    big_array, big_pil = np.asarray(chelsea((40, 30))), chelsea((40, 30))
    results = captioner.caption_batch([small, big_array, big_pil, small], on_error="return")
    assert isinstance(results[0], Caption) and results[0].text
    assert isinstance(results[3], Caption) and results[3].text == results[0].text
    expected = [("<array (30, 40, 3) uint8>", "array is"), ("<PIL image 40x30 RGB>", "PIL image is")]
    for result, (source, subject) in zip(results[1:3], expected):
        assert isinstance(result, InputError) and result.source == source
        assert result.problem.startswith(f"{subject} 40x30 = 1,200 pixels, over the limit of 1,000")
    with pytest.raises(InputError, match=r"<array \(30, 40, 3\) uint8>: .*1,200 pixels"):
        captioner.caption(big_array)
    iterated = list(captioner.iter_captions([big_array, small], on_error="return"))
    assert isinstance(iterated[0], InputError) and isinstance(iterated[1], Caption)


@pytest.mark.parametrize("name", [images.MAX_PIXELS_ENV, images.MAX_FILE_BYTES_ENV])
@pytest.mark.parametrize("value", ["a lot", "-5"])
def test_malformed_limit_fails_at_construction(tiny_model_dir, monkeypatch, name, value):
    """Not an error blamed on every photo later."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Captioner(tiny_model_dir)


@pytest.mark.parametrize(
    "exc, want",
    [
        (OSError("libtiff: bad directory\n  at offset 8\r\n"), "libtiff: bad directory at offset 8"),
        (ValueError(), "ValueError"),
        (RuntimeError(" \n "), "RuntimeError"),
    ],
)
def test_a_reason_in_a_message_is_one_line_or_the_exceptions_type(exc, want):
    """What images, recordings and the service put after "(" in their errors."""
    from edgecap.errors import reason

    assert reason(exc) == want


def test_an_input_error_survives_a_process_pool():
    """A worker process that raises an InputError, or returns caption_batch(on_error="return")
    results holding one, pickles it: it comes back with its source, problem and message (before
    the fix the pickle could not make one again, and concurrent.futures' process pool broke:
    BrokenProcessPool for every pending call)."""
    import pickle

    for source in ("photo.jpg", "new\nline.png"):
        err = InputError(source, "no such file")
        back = pickle.loads(pickle.dumps([err]))[0]
        assert type(back) is InputError
        assert (back.source, back.problem, str(back)) == (source, "no such file", str(err))


class _ArrayLike:
    """An array of another library as numpy sees it (``__array__``), as a JAX array or a torch
    tensor on the CPU is; ``fails``: its conversion raises, as a tensor on a GPU's does."""

    def __init__(self, array: np.ndarray, fails: str | None = None):
        self._array, self._fails = array, fails
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __array__(self, dtype=None, copy=None):
        if self._fails:
            raise TypeError(self._fails)
        return self._array if dtype is None else self._array.astype(dtype)

    def __iter__(self):
        return (_ArrayLike(a) for a in self._array)


def test_an_array_of_another_library_is_captioned_as_its_numpy_array(captioner):
    """An image as another library's array (anything numpy reads through ``__array__``: a torch
    tensor on the CPU, a JAX array) is captioned as the numpy array it gives, checked as arrays
    are (a channels-first one is told to transpose); a batch of them (N, H, W, 3) is a batch, one
    image given as the batch a TypeError, as for numpy arrays. One that cannot be converted (a
    tensor on a GPU) is an InputError with numpy's reason. Before: '<Tensor>: unsupported input
    type; pass a file path, encoded bytes, a PIL image or a numpy array'."""
    rgb = np.asarray(chelsea())
    expected = captioner.caption(rgb).text
    assert captioner.caption(_ArrayLike(rgb)).text == expected
    assert captioner.caption(_ArrayLike(rgb.astype(np.float32) / 255)).text == expected
    batch = _ArrayLike(np.stack([rgb, rgb[::-1]]))
    assert [c.text for c in captioner.caption_batch(batch)] == [
        expected,
        captioner.caption(rgb[::-1]).text,
    ]
    with pytest.raises(TypeError, match="take a list of images; use caption"):
        captioner.caption_batch(_ArrayLike(rgb))
    with pytest.raises(InputError, match=r"channels-first \(C, H, W\)") as info:
        captioner.caption(_ArrayLike(np.ascontiguousarray(rgb.transpose(2, 0, 1))))
    h, w = rgb.shape[:2]
    assert info.value.source == f"<_ArrayLike (3, {h}, {w}) uint8>"
    cuda = (
        "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory"
    )
    with pytest.raises(InputError) as info:
        captioner.caption(_ArrayLike(rgb, fails=cuda))
    assert info.value.problem == f"cannot read it as a numpy array ({cuda})"


def test_a_torch_tensor_is_captioned_as_its_array(captioner):
    """A torch tensor on the CPU, (H, W, 3) uint8 or float in [0, 1], and a batch (N, H, W, 3):
    the numpy array's captions."""
    torch = pytest.importorskip("torch")
    rgb = np.asarray(chelsea())
    tensor = torch.from_numpy(rgb.copy())
    expected = captioner.caption(rgb).text
    assert captioner.caption(tensor).text == expected
    assert captioner.caption(tensor.float() / 255).text == expected
    assert [c.text for c in captioner.caption_batch(torch.stack([tensor, tensor]))] == [expected] * 2
