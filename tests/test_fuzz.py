"""Property-based tests (hypothesis): random bytes, damaged image files and random arrays thrown at
preprocessing and at ``Captioner.caption`` (tiny model). The only outcomes allowed are a caption
or an ``InputError`` naming the input in one line: never another exception, never a hang.

Example counts stay modest (CI time); each test has a wall-clock cap per example.
"""

from __future__ import annotations

import io
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import edgecap  # noqa: E402
from edgecap import Caption, Captioner, EdgecapError, InputError  # noqa: E402
from edgecap import images  # noqa: E402
from edgecap.preprocess import Preprocessing  # noqa: E402

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
SECONDS_PER_EXAMPLE = 30  # far above the slowest legitimate case; a hang fails instead of waiting
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@contextmanager
def no_hang(seconds: int = SECONDS_PER_EXAMPLE):
    """Fail (rather than wait forever) when one example takes longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM"):  # Windows: no alarm; rely on the CI job's timeout
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError(f"one example took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _encoded_examples() -> list[bytes]:
    """Small valid files in the formats people send: the seeds that mutations damage."""
    with Image.open(EXAMPLES / "chelsea.png") as im:
        photo = im.convert("RGB").resize((24, 16))
    seeds = []
    for mode, fmt, kwargs in [
        ("RGB", "JPEG", {}),
        ("RGB", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "GIF", {}),
        ("RGB", "WEBP", {}),
        ("RGB", "BMP", {}),
        ("RGB", "TIFF", {}),
        ("CMYK", "JPEG", {}),
        ("L", "PNG", {}),
        ("I;16", "PNG", {}),
        ("RGB", "ICO", {}),
    ]:
        buf = io.BytesIO()
        try:
            photo.convert(mode).save(buf, fmt, **kwargs)
        except (OSError, KeyError, ValueError):  # a codec this Pillow lacks
            continue
        seeds.append(buf.getvalue())
    return seeds


SEEDS = _encoded_examples()


@st.composite
def damaged_files(draw) -> bytes:
    """A valid small image file with a few bytes flipped, cut out or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[max(pos, 1) :]
        if not data:
            break
    return bytes(data)


def _check_image_outcome(image) -> None:
    """``load_rgb`` + preprocessing: an RGB uint8 image and finite model input, or an InputError
    that names the input in one line."""
    try:
        with no_hang(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd-but-readable files
            rgb = images.load_rgb(image)
            x = images.preprocess([rgb], Preprocessing())
    except InputError as exc:
        assert exc.source == images.describe(image)
        assert "\n" not in str(exc) and exc.problem
        return
    assert rgb.mode == "RGB" and rgb.width >= 1 and rgb.height >= 1
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and np.isfinite(x).all()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data):
    _check_image_outcome(data)


@FUZZ
@given(data=damaged_files())
def test_damaged_files(data):
    _check_image_outcome(data)


@FUZZ
@given(data=damaged_files())
def test_damaged_files_on_disk(tmp_path, data):
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    _check_image_outcome(str(path))


DTYPES = st.sampled_from(
    [
        np.uint8,
        np.uint16,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.float16,
        np.float32,
        np.float64,
        np.bool_,
        np.complex64,
        ">u2",
        ">f4",
        "<f8",
    ]
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12)
IMAGE_SHAPES = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]))


@st.composite
def arrays(draw) -> np.ndarray:
    """Arrays of any dtype and shape, some image-shaped, with values that include NaN and inf
    and out-of-range numbers, laid out C- or Fortran-ordered or strided."""
    dtype = np.dtype(draw(DTYPES))
    shape = draw(st.one_of(SHAPES, IMAGE_SHAPES))
    if dtype.kind == "f":
        elements = st.one_of(
            st.floats(0, 1, width=min(dtype.itemsize * 8, 64)),
            st.floats(allow_nan=True, allow_infinity=True, width=min(dtype.itemsize * 8, 64)),
        )
    else:
        elements = None
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    layout = draw(st.sampled_from(["c", "fortran", "reversed"]))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "reversed" and array.ndim:
        array = array[::-1]
    return array


@FUZZ
@given(array=arrays(), color=st.sampled_from(["rgb", "bgr"]))
def test_random_arrays(array, color):
    try:
        with no_hang():
            rgb = images.array_to_rgb(array, color)
    except InputError as exc:
        assert exc.source == images.describe(array) and "\n" not in str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[:2] == array.shape[:2]


# -- the public API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=3, beam_size=2)


def _check_caption_outcome(captioner, image) -> None:
    try:
        with no_hang(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            caption = captioner.caption(image)
    except EdgecapError as exc:
        assert isinstance(exc, InputError), repr(exc)
        assert exc.source == images.describe(image) and "\n" not in str(exc)
        return
    assert isinstance(caption, Caption) and np.isfinite(caption.score)


@settings(FUZZ, max_examples=40)
@given(array=arrays())
def test_caption_random_arrays(captioner, array):
    _check_caption_outcome(captioner, array)


@settings(FUZZ, max_examples=40)
@given(data=st.one_of(damaged_files(), st.binary(max_size=512)))
def test_caption_random_files(captioner, data):
    _check_caption_outcome(captioner, data)


@settings(FUZZ, max_examples=20)
@given(batch=st.lists(st.one_of(arrays(), damaged_files()), min_size=1, max_size=6))
def test_caption_batch_of_random_inputs(captioner, batch):
    """A batch never fails as a whole: each slot is a Caption or that input's InputError."""
    with no_hang(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = captioner.caption_batch(batch, on_error="return")
    assert len(results) == len(batch)
    for image, result in zip(batch, results):
        if isinstance(result, InputError):
            assert result.source == images.describe(image)
        else:
            assert isinstance(result, Caption)
