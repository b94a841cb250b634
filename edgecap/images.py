"""Any supported input -> an RGB image -> the encoder's input array (numpy and Pillow, no torch).

Inputs:

- a path (``str`` or ``os.PathLike``) to an image file, or its encoded ``bytes``: JPEG (and
  MPO), PNG, GIF, WebP, TIFF or BMP, and AVIF where this Pillow decodes it
  (``ACCEPTED_FORMATS``; see "Hostile files" below; HEIC is refused, saying so). EXIF
  orientation is applied, an animated image gives its first frame, palette / CMYK / 16-bit
  images are converted to 8-bit RGB, and an embedded RGB colour profile other than sRGB (Adobe
  RGB, Display P3, a camera's own) is converted to sRGB, the colours a colour-managed viewer
  shows and the model learned from (``_srgb_transform``; benchmarks/colour_profiles.py).
- a ``PIL.Image.Image`` (EXIF orientation and its colour profile are applied too).
- a numpy array: (H, W, 3) RGB, (H, W) grayscale, (H, W, 1), or (H, W, 4) RGBA; ``color="bgr"``
  reads 3/4-channel arrays as BGR/BGRA (OpenCV frames). dtype uint8 (0-255), uint16 (0-65535) or
  float in [0, 1] (what ``skimage.img_as_float`` gives); anything else is refused rather than
  guessed. uint16 (and 16-bit files) are read as 0-65535: 8-bit data cast to uint16, or 10- or
  12-bit sensor data (all values below 4096), is then a dark frame (12-bit data is brightened 8x
  and usually captioned, 10-bit and 8-bit data mostly "nothing recognisable": docs/reliability.md);
  it is read as it is, with a ``UserWarning`` (once in the process) that says what to pass
  instead.

Transparency is flattened onto **white**: transparent product shots, logos and icons are drawn on
white far more often than on black, and the colour under a fully transparent pixel is often junk.

Every failure raises ``edgecap.errors.InputError(source, problem)``, ``source`` naming the input
(the path, or a description such as ``<array (480, 640, 2) uint8>``).

Hostile files (paths and encoded bytes; arrays and PIL images are already decoded):

- only regular files are read (a named pipe, a device, a socket or a folder is refused without
  being read: ``edgecap.files``), and a file over ``max_file_bytes()`` (128 MiB; raise it with
  ``set_max_file_bytes(n)`` or ``EDGECAP_MAX_FILE_BYTES=n``) is refused before it is read;
- only ``ACCEPTED_FORMATS`` are parsed at all (the formats cameras and photo libraries write:
  JPEG (with MPO), PNG, GIF, WebP, TIFF, and BMP; AVIF where this Pillow decodes it); Pillow's
  other plugins never see the bytes;
- the size is read from the header before any pixel is decoded: an image of more than
  ``max_pixels()`` pixels (89,478,485, Pillow's default) is refused. Raise the limit with
  ``set_max_pixels(n)`` or ``EDGECAP_MAX_PIXELS=n``; both also raise Pillow's own process-wide
  guard (``PIL.Image.MAX_IMAGE_PIXELS``) so Pillow does not refuse what edgecap allows. edgecap
  keeps its own default: a program that sets ``PIL.Image.MAX_IMAGE_PIXELS = None`` changes
  Pillow's guard, not edgecap's. A side over ``MAX_SIDE`` (1,000,000) is refused too (a thin
  strip within the pixel limit takes gigabytes to resize). Arrays and PIL images are held to
  the same limits, from their shape and size;
- decoding work is bounded before decoding, from the headers: a JPEG may have at most
  ``MAX_JPEG_SCANS`` scans (a progressive JPEG has about 10; each scan is a pass over the whole
  image) and ``MAX_JPEG_HEADER_SEGMENTS`` segments before its first scan (counted before Pillow
  parses them: it reads each in Python and keeps every APPn and comment, and a 128 MiB file of
  empty ones took 31 s and 4.6 GB), a TIFF only the compressions in ``TIFF_COMPRESSIONS``
  (linear-time codecs), a BMP no RLE compression (Pillow decodes it in Python). Every accepted
  codec is then linear in the file size and the pixel count, both bounded.
"""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # colour profiles need Pillow built with Little CMS (its wheels are)
    from PIL import ImageCms
except ImportError:  # pragma: no cover - a Pillow built without it: profiles are not applied
    ImageCms = None  # type: ignore[assignment]

from edgecap.errors import InputError, caused_by_interrupt, counted, reason
from edgecap.files import FileProblem, check_regular, read_regular
from edgecap.preprocess import Preprocessing, to_model_input

_T = TypeVar("_T")


class ArrayConvertible(Protocol):
    """Another library's array that numpy reads (``__array__``: a torch tensor on the CPU, a JAX
    array), taken as its numpy array."""

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray: ...


# ``os.PathLike`` with its argument: a bare one is ``PathLike[Unknown]`` to pyright, whose strict
# mode then reported every call that takes an image as partially unknown
ImageInput = (
    str
    | os.PathLike[str]
    | os.PathLike[bytes]
    | bytes
    | bytearray
    | memoryview
    | Image.Image
    | np.ndarray
    | ArrayConvertible
)

COLORS = ("rgb", "bgr")
# Loading a lazily opened PIL image reads (and then closes) its file, and Pillow does not make
# that safe in two threads at once: the same image given twice in a batch decoded by worker
# threads, or to two threads' captions. Loads of one image object take the same lock.
_LOAD_LOCKS = tuple(threading.Lock() for _ in range(64))


_warned_sixteen_bits = False  # the 10/12-bit hint given (``_sixteen_bits_to_uint8``)


def _load_lock(im: Image.Image) -> threading.Lock:
    """The lock of ``im``'s loads: one of ``_LOAD_LOCKS`` by its id, mixed (``_lock_slot``)."""
    return _LOAD_LOCKS[_lock_slot(id(im))]


_MASK64 = (1 << 64) - 1


def _lock_slot(address: int) -> int:
    """An object's address -> a slot of ``_LOAD_LOCKS``, every bit of it mixed in (splitmix64's
    finaliser). Ids are aligned addresses, and images made one after another lie a fixed stride
    apart (48 or 96 bytes on Python 3.10 and 3.12): ``id % 64`` put every image on one lock, and
    ``hash((id,)) % 64`` put 64 of them on 15 to 18 locks (random slots: about 40)."""
    x = address & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) % len(_LOAD_LOCKS)


MAX_PIXELS_ENV = "EDGECAP_MAX_PIXELS"
MAX_FILE_BYTES_ENV = "EDGECAP_MAX_FILE_BYTES"
BACKGROUND = (255, 255, 255)  # transparency is flattened onto white (see the module docstring)
# What ``load_rgb`` makes of a file, in the feature caches' key (``training.features.cache_key``):
# features of photos decoded otherwise are not reused. 2: embedded colour profiles applied and
# the transparency of palette, 1-bit and 16-bit grey PNGs over white (2026-12-06).
DECODING = 2
# Pillow's default, written down rather than copied from ``Image.MAX_IMAGE_PIXELS`` at import:
# a program may have set that to None (no limit) before importing edgecap.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_FILE_BYTES = 128 * 1024 * 1024


def _decodes_avif() -> bool:
    """Whether this Pillow decodes AVIF (its AVIF plugin, built with libavif)."""
    from PIL import features

    try:
        return "avif" in features.modules and bool(features.check_module("avif"))
    except Exception:  # noqa: BLE001 (a Pillow that cannot even say: no)
        return False


# Pillow format names: what cameras and photo libraries write (a camera's multi-picture JPEG
# opens as JPEG, format "MPO"), and AVIF where this Pillow decodes it. ICO, PSD, PDF, EPS, SGI,
# TGA, PCX, XPM, ... are refused without being parsed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP") + (("AVIF",) if _decodes_avif() else ())
# Photos that this Pillow cannot decode, by kind: why, said of a named file here and of a
# folder's files by edgecap.paths. HEIC (an iPhone's) needs the pillow-heif plugin.
UNDECODABLE = {
    "HEIC/HEIF": (
        "which this Pillow cannot decode (only with the pillow-heif plugin, which edgecap does not load)"
    ),
    "AVIF": "which this Pillow cannot decode (it was built without AVIF support)",
}
# ISO-BMFF brands (the ftyp box): AVIF's, then HEIF's (an AVIF file lists mif1 too)
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {
    b"heic",
    b"heix",
    b"heim",
    b"heis",
    b"hevc",
    b"hevx",
    b"hevm",
    b"hevs",
    b"mif1",
    b"mif2",
    b"msf1",
}
MAX_JPEG_SCANS = 64
MAX_JPEG_HEADER_SEGMENTS = 4096  # photos have 10-30 (an ICC profile adds at most 255 parts)
TIFF_COMPRESSIONS = ("raw", "packbits", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate")
_max_pixels_override: int | None = None
_max_file_bytes_override: int | None = None


# -- the decompression-bomb limit --------------------------------------------------------------
def set_max_pixels(n: int | None) -> None:
    """Allow images of up to ``n`` pixels (None: back to the environment / Pillow default).

    Process-wide, like Pillow's own guard, which this raises to ``n`` when ``n`` is larger.
    """
    global _max_pixels_override
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"max pixels must be a positive integer or None, got {n!r}")
    _max_pixels_override = n
    _raise_pillow_limit(max_pixels())


def max_pixels() -> int:
    """The largest image (width x height) edgecap decodes: ``set_max_pixels``, else
    ``$EDGECAP_MAX_PIXELS``, else Pillow's default (89,478,485)."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    return _env_limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def set_max_file_bytes(n: int | None) -> None:
    """Read image files of up to ``n`` bytes (None: back to the environment / the default,
    128 MiB). Process-wide."""
    global _max_file_bytes_override
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"max file bytes must be a positive integer or None, got {n!r}")
    _max_file_bytes_override = n


def max_file_bytes() -> int:
    """The largest image file edgecap reads: ``set_max_file_bytes``, else
    ``$EDGECAP_MAX_FILE_BYTES``, else 128 MiB (134,217,728 bytes)."""
    if _max_file_bytes_override is not None:
        return _max_file_bytes_override
    return _env_limit(MAX_FILE_BYTES_ENV, DEFAULT_MAX_FILE_BYTES)


def _env_limit(name: str, default: int) -> int:
    env = os.environ.get(name)
    if not env:
        return default
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {env!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {env!r}")
    return value


def _raise_pillow_limit(limit: int) -> None:
    # Pillow refuses images over 2x its own limit while opening them; keep it at or above ours
    # so our check (with its clear message) is the one that decides. Never lowered here.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and limit > current:
        Image.MAX_IMAGE_PIXELS = limit


def pixel_limit_problem(width: int, height: int, subject: str = "image is") -> str | None:
    """Why a picture of this size is refused (over ``max_pixels()``, or a side over
    ``MAX_SIDE``), for pictures that do not come from a file Pillow opens (video frames, raw
    recording frames, arrays, PIL images); None: it is not."""
    limit = max_pixels()
    if width * height > limit:
        return (
            f"{subject} {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
            f"raise it with edgecap.images.set_max_pixels(n) or {MAX_PIXELS_ENV}=n"
        )
    return side_problem(width, height, subject)


# A picture with a side over this many pixels is refused, whatever its pixel count: resizing a
# side to the model's 224 takes memory in proportion to its length (Pillow's resampling weights,
# about 24 bytes a pixel of it). Within the pixel limit, a 1 x 89,000,000 strip took 2.7 s and
# 2.4 GB (peak RSS, Pillow 13), a 9,434 x 9,434 image 0.46 s and 370 MB, 1 x 1,000,000 0.07 s and
# 42 MB. No camera or photo format of a real scene comes near (JPEG's sides end at 65,535).
MAX_SIDE = 1_000_000


def side_problem(width: int, height: int, subject: str = "image is") -> str | None:
    """Why a picture of this size is refused for a side over ``MAX_SIDE``; None: it is not."""
    if max(width, height) <= MAX_SIDE:
        return None
    return (
        f"{subject} {width}x{height}, a side over the limit of {MAX_SIDE:,} pixels (a strip, not a "
        "photo: resizing it for the model would take gigabytes of memory)"
    )


def own_input(image: _T) -> _T:
    """``image`` as its source can no longer change it, for an input held after the source is
    asked for the next one (a decoding worker's, a live stream's): a copy of a buffer the source
    may refill (a numpy array, a ``bytearray`` or ``memoryview``, a torch tensor, another
    library's array: as a numpy array) or close (a PIL image, loaded and copied: a ``with
    Image.open(...)`` block that ends closes its file, which leaves a lazily opened image
    nothing to decode); a path or ``bytes`` as it is. A picture over the pixel limits, or one
    whose copy fails (a closed PIL image), is returned as it is: preparing it says what is
    wrong, as it would have."""
    try:
        if isinstance(image, (bytearray, memoryview)):
            return bytes(image)  # type: ignore[return-value]
        if isinstance(image, Image.Image):
            # size first: a decompression bomb is refused unread, as preparing it refuses it
            return image if pixel_limit_problem(image.width, image.height) else image.copy()  # type: ignore[return-value]
        if type(image).__module__.partition(".")[0] == "torch" and hasattr(image, "clone"):
            return image.clone()
        if hasattr(image, "__array__"):  # a numpy array, or another library's numpy reads
            array = image if isinstance(image, np.ndarray) else np.asarray(image)
            over = array.ndim >= 2 and pixel_limit_problem(array.shape[1], array.shape[0]) is not None
            return image if over else array.copy()
    except Exception:  # noqa: BLE001 (preparing it names the input and what is wrong)
        return image
    return image


def _check_pixels(width: int, height: int, source: str, subject: str) -> None:
    """An InputError for an already decoded picture (an array, a PIL image) over the limit."""
    problem = pixel_limit_problem(width, height, subject)
    if problem:
        raise InputError(source, problem)


# How to raise the pixel limit, at the end of the problem of an image over it: for whoever runs
# edgecap (the command line, a program); edgecap serve tells its HTTP clients the problem without it
PIXEL_LIMIT_HINT = (
    f"; if you trust it, raise the limit with edgecap.images.set_max_pixels(n) or {MAX_PIXELS_ENV}=n"
)


def _bomb_problem(size: str, limit: int) -> str:
    """Why an opened image is refused; ``size``: its size in words ("W x H = N pixels")."""
    return (
        f"image is {size}, over the limit of {limit:,} (a guard against decompression bombs)"
        + PIXEL_LIMIT_HINT
    )


def _pillow_bomb_size(message: str) -> str:
    """The size of an image Pillow refused while opening it, from its message ("Image size (N
    pixels) exceeds limit of M pixels ..."), which gives the pixel count, not the sides."""
    found = re.search(r"\((\d+) pixels\)", message)
    return f"{int(found.group(1)):,} pixels" if found else "too many pixels"


# -- naming inputs -----------------------------------------------------------------------------
# Longer than any path an OS opens (Linux's PATH_MAX: 4096 bytes, its end included): a str
# input this long is an image's text (base64, a data: URL), named by its start
MAX_PATH_CHARS = 4096


def describe(image: object) -> str:
    """A short name for an input, used as ``InputError.source``; never raises (an object that
    fails to say its path or shape is named by its type, and loading it says what failed)."""
    try:
        return _described(image)
    except Exception:  # noqa: BLE001 (a PathLike whose __fspath__ raises, a shape that does)
        return f"<{type(image).__name__}>"


def shown_in_repr(image: object) -> str:
    """A frame's image as its repr shows it (``edgecap.stream.Frame``,
    ``edgecap.recordings.Frame``): named as errors name it, an ``InputError`` as itself; a
    compressed frame's repr had been all its bytes."""
    return repr(image) if isinstance(image, InputError) else describe(image)


def _described(image: object) -> str:
    if isinstance(image, (str, os.PathLike)):
        # "" (an unset variable): named, else the message would be ": no such file"; a PathLike
        # of bytes as the text the OS's names are held as (its bytes not UTF-8: surrogates)
        name = os.fsdecode(os.fspath(image)) or "<empty path>"
        if len(name) > MAX_PATH_CHARS:  # no path (base64 text, a data: URL): its start, not all of it
            return f"<{type(name).__name__} of {len(name):,} characters: {name[:40]!r}...>"
        return name
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<bytes ({memoryview(image).nbytes} bytes)>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.width}x{image.height} {image.mode}>"
    if isinstance(image, np.ndarray):
        return f"<array {tuple(image.shape)} {image.dtype}>"
    shape = getattr(image, "shape", None) if hasattr(image, "__array__") else None
    if shape is not None:  # an array of another library (a torch tensor): its shape and type
        return f"<{type(image).__name__} {tuple(shape)} {getattr(image, 'dtype', '?')}>"
    return f"<{type(image).__name__}>"


# -- any input -> RGB PIL image ----------------------------------------------------------------
def load_rgb(
    image: ImageInput | None, color: str = "rgb", draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Any supported input -> an 8-bit RGB PIL image. ``color`` applies to arrays only (files and
    PIL images carry their own channel order). ``draft_size`` (width, height): a JPEG file may be
    decoded at a reduced scale (1/2, 1/4, 1/8) as long as both sides stay at least this size,
    which makes a camera-size JPEG several times faster to decode for a 224x224 model input.
    Raises ``InputError`` naming the input."""
    return _loaded(image, color, lambda source: _load_rgb(image, color, draft_size, source))


def load_rgb_array(
    image: ImageInput | None, color: str = "rgb", draft_size: tuple[int, int] | None = None
) -> np.ndarray:
    """``load_rgb`` as a uint8 (H, W, 3) array of its own (never the caller's buffer, which a
    camera loop refills): an array input is converted without a round trip through a PIL
    image. Raises ``InputError`` naming the input."""
    if not isinstance(image, np.ndarray):
        return np.asarray(load_rgb(image, color, draft_size))
    rgb = _loaded(image, color, lambda source: array_to_rgb(image, color, source))
    return rgb.copy() if np.may_share_memory(rgb, image) else rgb


def _loaded(image: ImageInput | None, color: str, load: Callable[[str], _T]) -> _T:
    """``load(source)`` with any failure of this one input as its ``InputError``."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    source = describe(image)
    try:
        return load(source)
    except Exception as exc:  # noqa: BLE001
        if caused_by_interrupt(exc):  # Ctrl-C inside a decoder or a lazy plugin import
            raise KeyboardInterrupt from exc
        if isinstance(exc, InputError):
            raise
        # Whatever else goes wrong with one input (a path the OS refuses, memory for one huge
        # image) belongs to that input: callers such as caption_batch(on_error="return") rely
        # on every per-input failure being an InputError.
        raise InputError(source, f"cannot load this input ({reason(exc)})") from exc


def _load_rgb(
    image: ImageInput | None, color: str, draft_size: tuple[int, int] | None, source: str
) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(array_to_rgb(image, color, source))
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, source, "PIL image is")
        return pil_to_rgb(image, source)
    if isinstance(image, (str, os.PathLike)):
        if len(os.fspath(image)) > MAX_PATH_CHARS:
            raise InputError(
                source,
                "not a file path (longer than any path): for an image given as text (base64, a "
                "data: URL) pass its bytes, base64.b64decode(text)",
            )
        return _decode(_read_file(image, source), source, draft_size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InputError(source, "no image data (0 bytes)")
        return _decode(data, source, draft_size)
    if image is None:  # what cv2.imread and a failed camera read give
        raise InputError(source, "no image (None: OpenCV's imread returns None for a file it could not read)")
    if hasattr(image, "__array__"):  # a torch tensor on the CPU, a JAX array ...: as its numpy array
        try:
            array = np.asarray(image)
        except Exception as exc:  # noqa: BLE001 - a tensor on a GPU: "Use Tensor.cpu() ..."
            raise InputError(source, f"cannot read it as a numpy array ({reason(exc)})") from None
        return Image.fromarray(array_to_rgb(array, color, source))
    raise InputError(
        source, "unsupported input type; pass a file path, encoded bytes, a PIL image or a numpy array"
    )


def first_unusable_unread(images: Iterable[object]) -> int | None:
    """The index of the first of ``images`` that loading is sure to refuse, seen without reading
    or decoding any (None: none is): a path to no regular file (missing, unreadable, a folder),
    to an empty one or to one past ``max_file_bytes()``; None; empty bytes; a numpy array of no
    image's shape or dtype; a type that is no image; one that fails even to be looked at (a path
    object whose ``__fspath__`` raises, a released memoryview), whose loading says so as its
    ``InputError``. An image not seen here may still be refused once read (a file that is not
    an image), and a file may change before it is read. A list whose iteration fails: None
    unless an image before the failure is seen to be unusable."""
    limit = max_file_bytes()
    numbered = enumerate(images)
    while True:
        try:
            i, image = next(numbered)
        except Exception:  # noqa: BLE001 - the end, or a list whose iteration fails (a source that
            return None  # fails): captioning meets that where it did, after the images before it
        try:
            if _unusable_unread(image, limit):
                return i
        except Exception:  # noqa: BLE001 - not this check's to raise: loading it names the input
            return i


def _unusable_unread(image: object, limit: int) -> bool:
    """``first_unusable_unread``'s test of one image."""
    if image is None:
        return True
    if isinstance(image, np.ndarray):
        try:
            _check_shape(np.asarray(image), "")
        except InputError:
            return True
        return not _usable_dtype(image.dtype)
    if isinstance(image, (str, os.PathLike)):
        try:
            size = check_regular(image).st_size
        except FileProblem:
            return True
        return not 0 < size <= limit
    if isinstance(image, (bytes, bytearray, memoryview)):
        return not memoryview(image).nbytes
    return not isinstance(image, Image.Image) and not hasattr(image, "__array__")


def _read_file(path: str | os.PathLike, source: str) -> bytes:
    """The file's bytes: a regular file of at most ``max_file_bytes()`` (``edgecap.files``); a
    missing, special, unreadable, oversized or empty file is an InputError.

    Reading the bytes first (rather than handing Pillow the path) keeps the file closed before
    decoding starts and gives each failure its own message.
    """
    limit = max_file_bytes()
    try:
        data = read_regular(path, limit, "file")
    except FileProblem as exc:
        problem = str(exc)
        if "over the limit" in problem or "past the limit" in problem:
            other = _video_or_recording_file(path)  # videos are large: say what it is instead
            if other:
                raise InputError(source, other) from None
            problem += (
                f"; if you trust it, raise the limit with "
                f"edgecap.images.set_max_file_bytes(n) or {MAX_FILE_BYTES_ENV}=n"
            )
        raise InputError(source, problem) from None
    if not data:
        raise InputError(source, "file is empty (0 bytes)")
    return data


# Pillow's reasons for a header that describes a kind of image it does not decode: a TIFF of 3
# float32 or int32 samples (OpenCV writes them), a 12-bit JPEG; or a damaged header (a float
# TIFF cut before its SampleFormat tag reads as 32-bit integers), which these words cannot tell.
_UNSUPPORTED_KIND = re.compile(r"unknown pixel mode|cannot handle")


def _unidentified_problem(data: bytes) -> str:
    """Why Pillow identified none of the accepted formats in ``data``: bytes that begin as one
    of them are that format with a broken header (``corrupt PNG header (...)``, as Pillow's
    own refusals are put): the reason its reader gives where it says what is broken (a PNG
    whose header checksum is wrong; ``Image.open`` keeps it only as a warning), "cut short"
    where it only ran out of bytes; a HEIC photo (or an AVIF one, where this Pillow has no AVIF)
    says that this Pillow cannot decode it; others are not an image in an accepted format."""
    kind = _bmff_kind(data)
    if kind == "HEIC/HEIF" or (kind == "AVIF" and "AVIF" not in ACCEPTED_FORMATS):
        article = "an" if kind == "AVIF" else "a"
        return f"{article} {kind} image, {UNDECODABLE[kind]}: convert it to JPEG or PNG"
    other = _video_or_recording(data, kind)
    if other:
        return other
    Image.init()
    for name in ACCEPTED_FORMATS:
        factory, accept = Image.OPEN.get(name, (None, None))
        accepted = True if accept is None else accept(data[:16])
        if isinstance(accepted, str):  # a format this Pillow was built without: its words (a warning)
            return f"a {name} image, which this Pillow cannot read ({accepted})"
        if factory is None or not accepted:
            continue
        try:
            factory(io.BytesIO(data), "").close()
        except Exception as exc:  # noqa: BLE001 (a plugin's reason, whatever its type)
            said = reason(exc)
            # out of bytes: struct.error "unpack_from requires a buffer ..." (which Pillow raises
            # again as a SyntaxError), "not identified by this driver" (a JPEG cut in its markers)
            short = (struct.error, EOFError, IndexError)
            cut = isinstance(exc, short) or isinstance(exc.__cause__, short) or "not identified" in said
            if not cut and _UNSUPPORTED_KIND.match(said):  # a kind the reader does not decode
                return f"unsupported kind of {name}, or a damaged header ({said})"
            return f"corrupt {name} header ({'cut short' if cut else said})"
    return f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})"


def _video_or_recording(data: bytes, bmff_kind: str | None) -> str | None:
    """What to say of a video or a robot recording given where a photo was expected (``edgecap
    caption clip.mp4`` without ``--video``), told by its first bytes; None for anything else."""
    if data[4:8] == b"ftyp" and bmff_kind is None and _is_video_brand(data[8:12]):
        video = "an MP4 / QuickTime video"
    elif data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        video = "an AVI video"
    elif data[:4] == b"\x1aE\xdf\xa3":  # EBML
        video = "a Matroska / WebM video"
    elif data[:5] == b"\x89MCAP":
        return "an MCAP recording, not a photo: caption its image topics with edgecap caption --bag FILE"
    elif data[:13] == b"#ROSBAG V2.0\n":
        return "a ROS 1 bag, not a photo: caption its image topics with edgecap caption --bag FILE"
    else:
        return None
    return f"{video}, not a photo: caption its frames with edgecap caption --video FILE"


def _is_video_brand(major: bytes) -> bool:
    """Whether an ISO-BMFF file's major brand is a video's (MP4, QuickTime, 3GP, a camera's XAVC),
    not sound alone (M4A) nor a still photo in the same boxes (a Canon CR3 raw: crx)."""
    return major.startswith((b"iso", b"mp4", b"3g")) or major in _VIDEO_BRANDS


_VIDEO_BRANDS = {
    b"avc1",
    b"qt  ",
    b"M4V ",
    b"M4VH",
    b"M4VP",
    b"dash",
    b"mmp4",
    b"MSNV",
    b"XAVC",
    b"NDAS",
    b"f4v ",
}


def _video_or_recording_file(path: str | os.PathLike) -> str | None:
    """``_video_or_recording`` of a file's first bytes (None where they cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never waits on a pipe
        try:
            head = os.read(fd, 64)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    return _video_or_recording(head, _bmff_kind(head))


def _bmff_kind(data: bytes) -> str | None:
    """ "AVIF" or "HEIC/HEIF" where ``data`` begins as an ISO-BMFF photo of that kind (its ftyp
    box's major or compatible brands), else None."""
    if data[4:8] != b"ftyp":
        return None
    box = data[8 : max(16, min(int.from_bytes(data[:4], "big"), 1024))]
    brands = {box[:4]} | {box[i : i + 4] for i in range(8, len(box) - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    return "HEIC/HEIF" if brands & _HEIF_BRANDS else None


def _decode(data: bytes, source: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Encoded image bytes -> RGB: an accepted format, its size and decoding work checked from
    the headers before any pixel is decoded."""
    limit = max_pixels()
    _raise_pillow_limit(limit)
    if data[:3] == b"\xff\xd8\xff":  # what Pillow opens as a JPEG (or MPO)
        if jpeg_header_segments(data, MAX_JPEG_HEADER_SEGMENTS) > MAX_JPEG_HEADER_SEGMENTS:
            raise InputError(
                source,
                f"JPEG with more than {MAX_JPEG_HEADER_SEGMENTS:,} segments before its image data "
                "(photos have about 10-30; each is parsed and kept in memory)",
            )
    try:
        # Pillow's limit is kept >= ours, so its DecompressionBombWarning only ever comes with an
        # image that our check below refuses anyway. ``formats``: no other plugin sees the bytes.
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(source, _unidentified_problem(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # over twice Pillow's limit (or over it, with warnings turned into errors): Pillow refuses
        # while opening, before our check, and says its own limit; say ours, as for the others
        raise InputError(source, _bomb_problem(_pillow_bomb_size(str(exc)), limit)) from None
    except Exception as exc:  # noqa: BLE001
        # Pillow's plugins raise OSError, SyntaxError, but also NotImplementedError, struct.error,
        # IndexError ... on hostile bytes: whatever the reason, these bytes are not a usable image.
        raise InputError(source, f"corrupt image header ({reason(exc)})") from exc
    with im:
        if im.width * im.height > limit:
            raise InputError(
                source, _bomb_problem(f"{im.width}x{im.height} = {im.width * im.height:,} pixels", limit)
            )
        problem = side_problem(im.width, im.height)
        if problem:
            raise InputError(source, problem)
        problem = _decoding_work_problem(im, data)
        if problem:
            raise InputError(source, problem)
        try:
            im.seek(0)  # animated GIF / WebP / APNG: the first frame
            if draft_size and im.format in ("JPEG", "MPO"):
                # square, of the longer side: the EXIF rotation may swap the sides later, and
                # each side must stay at least as long as the one it becomes
                side = max(draft_size)
                im.draft(None, (side, side))
            im.load()
        except MemoryError:
            raise InputError(source, f"not enough memory to decode a {im.width}x{im.height} image") from None
        except Exception as exc:  # noqa: BLE001 (as above)
            raise InputError(source, f"truncated or corrupt image data ({reason(exc)})") from exc
        return pil_to_rgb(im, source)


def _decoding_work_problem(im: Image.Image, data: bytes) -> str | None:
    """Why decoding this opened (not yet decoded) image could cost far more than its pixel count
    and file size say, or None."""
    if im.format in ("JPEG", "MPO"):
        scans = jpeg_scans(data, MAX_JPEG_SCANS)
        if scans > MAX_JPEG_SCANS:
            return (
                f"JPEG with more than {MAX_JPEG_SCANS} scans (progressive JPEGs have about "
                "10; each scan is another pass over the image)"
            )
    elif im.format == "TIFF":
        compression = im.info.get("compression", "raw")
        if compression not in TIFF_COMPRESSIONS:
            return (
                f"TIFF compression {compression!r} is not accepted (accepted: {', '.join(TIFF_COMPRESSIONS)})"
            )
    elif im.format == "BMP":
        if any(tile[0] == "bmp_rle" for tile in getattr(im, "tile", ())):  # opened: an ImageFile
            return "BMP with RLE compression is not accepted (Pillow decodes it in Python)"
    return None


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")


def _jpeg_markers(data: bytes) -> Iterator[int]:
    """The markers of the JPEG in ``data`` after its SOI, in order, found without parsing: each
    segment's declared length skipped, and the entropy-coded data after an SOS by the marker
    search (its stuffed bytes and restart markers are no markers). A marker is given before its
    length is read; the walk ends where a length runs past the data."""
    pos, n = 2, len(data)
    while pos < n:
        match = _JPEG_MARKER.search(data, pos)
        if match is None:
            return
        marker, pos = match.group(1)[0], match.end()
        yield marker
        if marker == 0xD8 or marker == 0x01 or marker == 0xD9:  # SOI, TEM, EOI: no length
            continue
        if pos + 2 > n:
            return
        pos += int.from_bytes(data[pos : pos + 2], "big")


def jpeg_header_segments(data: bytes, stop_after: int) -> int:
    """The number of marker segments before the first scan (SOS) of the JPEG in ``data``,
    counted from the markers without parsing them; counting stops past ``stop_after``."""
    segments = 0
    for marker in _jpeg_markers(data):
        if marker == 0xDA or marker == 0xD9 or segments > stop_after:  # SOS: the image data, or EOI
            break
        segments += 1
    return segments


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The number of scans (SOS markers) of the first JPEG image in ``data``, counted from the
    markers without decoding; counting stops past ``stop_after``."""
    upper_bound = data.count(b"\xff\xda")  # thumbnails and stray bytes add to it
    if upper_bound <= stop_after:
        return upper_bound
    scans = 0
    for segments, marker in enumerate(_jpeg_markers(data), 1):
        if marker == 0xD9 or segments > 64 * stop_after:  # EOI, or absurdly many segments
            return scans if marker == 0xD9 else stop_after + 1
        scans += marker == 0xDA
        if scans > stop_after:
            break
    return scans


def pil_to_rgb(im: Image.Image, source: str) -> Image.Image:
    """A decoded PIL image of any mode -> RGB, upright (EXIF), transparency over white."""
    if im.width < 1 or im.height < 1:
        raise InputError(source, f"image has no pixels ({im.width}x{im.height})")
    try:
        with _load_lock(im):
            im.load()  # a lazily opened PIL image reads its file only now
    except Exception as exc:  # noqa: BLE001 (see _decode)
        said = reason(exc)
        # opened lazily, then its file closed before it was read (``with Image.open(p) as im``
        # left; Pillow says AssertionError), or the image itself closed: not a corrupt file
        if (getattr(im, "fp", True) is None and getattr(im, "tile", None)) or "closed image" in said:
            raise InputError(
                source,
                f"the PIL image is closed ({said}); pass it before its with block ends, or pass the path",
            ) from exc
        raise InputError(source, f"truncated or corrupt image data ({said})") from exc
    # a 16-bit grayscale PNG: Pillow opens it as I;16 from 10.3, as I (32-bit) before
    sixteen_bit_png = im.format == "PNG" and im.mode == "I"
    profile = im.info.get("icc_profile") if im.mode in _COLOUR_MODES else None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        pass  # broken EXIF is common and harmless: keep the stored orientation
    # exif_transpose returned a new image: the caller's image is never modified or closed.
    rgb = _to_rgb(im, source, sixteen_bit_png)
    usable = isinstance(profile, bytes) and 0 < len(profile) <= MAX_PROFILE_BYTES
    transform = _srgb_transform(profile) if usable else None
    if transform is None:
        return rgb
    try:
        return transform.apply(rgb)
    except Exception:  # noqa: BLE001 (a profile lcms read but cannot apply: as a broken EXIF)
        return rgb


def _to_rgb(im: Image.Image, source: str, sixteen_bit_png: bool) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and not _has_alpha(im):  # an RGB PNG may have a tRNS colour key
        return im
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(im)
        gray = _gray_to_uint8(values, source, sixteen_bits=sixteen_bit_png, levels=True)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        key = im.info.get("transparency")  # a 16-bit grayscale PNG's tRNS value
        if isinstance(key, int) and mode != "F":  # (Pillow's own convert("RGBA") clips to 255)
            rgb[values == key] = BACKGROUND
        return Image.fromarray(rgb)
    try:
        if _has_alpha(im):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:  # a mode Pillow cannot convert (e.g. "La")
        raise InputError(source, f"cannot convert a {mode} image to RGB ({reason(exc)})") from exc


# Modes whose embedded colour profile is applied: RGB, with or without alpha and in a palette.
# A grey or CMYK image's profile is not (``_srgb_transform``).
_COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA")
MAX_PROFILE_BYTES = 4 << 20  # a larger embedded profile is not read, the pixels used as stored


@functools.lru_cache(maxsize=8)
def _srgb_transform(profile: bytes) -> Any:
    """The embedded ICC profile's transform to sRGB (lcms, through Pillow's ImageCms), or None:
    an sRGB profile (by its description: "sRGB IEC61966-2.1", "Nikon sRGB 4.0.0.3002", ...),
    whose pixels are used as stored; not an RGB profile; or one lcms cannot read (as broken
    EXIF: the pixels as stored). Photos in another RGB space (Adobe RGB, Display P3, a camera's
    own) are read as a colour-managed viewer shows them, the colours the model learned from (its
    training photos carry no profile: sRGB)."""
    if ImageCms is None:
        return None
    try:
        cms = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if cms.profile.xcolor_space != "RGB " or "srgb" in (cms.profile.profile_description or "").lower():
            return None
        # NOCACHE: lcms's one-pixel cache is not safe in two decoding threads at once
        return ImageCms.buildTransform(cms, _srgb(), "RGB", "RGB", flags=_NOCACHE)
    except Exception:  # noqa: BLE001 (lcms raises PyCMSError, OSError, TypeError on a bad profile)
        return None


def _nocache_flag() -> Any:
    """lcms's cmsFLAGS_NOCACHE (0x40): ImageCms.Flags.NOCACHE from Pillow 10.3, FLAGS["NOTCACHE"]
    before it (pyproject allows 9.1: asking for Flags there left every profile unapplied)."""
    return getattr(getattr(ImageCms, "Flags", None), "NOCACHE", 0x40)


_NOCACHE: Any = _nocache_flag()


@functools.lru_cache(maxsize=1)
def _srgb() -> Any:
    assert ImageCms is not None
    return ImageCms.createProfile("sRGB")


def _has_alpha(im: Image.Image) -> bool:
    # a palette of RGBA colours: what Pillow's convert("P") and quantize() make of an RGBA image
    rgba_palette = im.mode == "P" and getattr(im.palette, "mode", None) == "RGBA"
    return (
        im.mode in ("RGBA", "RGBa", "LA", "La", "PA")
        or rgba_palette
        or (im.mode in ("1", "P", "L", "RGB") and "transparency" in im.info)
    )


def _gray_to_uint8(
    x: np.ndarray, source: str, sixteen_bits: bool = False, levels: bool = False
) -> np.ndarray:
    """32-bit / 16-bit / float grayscale (H, W) -> uint8 (H, W); ``sixteen_bits``: 32-bit
    pixels read from a 16-bit file; ``levels``: floats may be 0-255 levels too (a PIL image or
    file in mode F, as Pillow's own ``convert("L")`` reads them)."""
    if x.dtype.kind == "f":
        return _float_to_uint8(x, source, levels)
    wide = x.dtype.itemsize > 2 and not sixteen_bits  # Pillow's "I" (32-bit) mode
    x = x.astype(np.int64)
    if x.min(initial=0) < 0:
        raise InputError(source, "grayscale image has negative pixel values")
    # 16-bit files hold 0..65535 (Pillow opens them as I;16 or I); an I image whose values fit
    # in 8 bits is an 8-bit image in disguise and is kept as is.
    if wide and x.max(initial=0) <= 255:
        return x.astype(np.uint8)
    return _sixteen_bits_to_uint8(np.clip(x, 0, 65535), source)


def _sixteen_bits_to_uint8(x: np.ndarray, source: str) -> np.ndarray:
    """Integer pixels in 0..65535 -> uint8 (x // 257: monotonic; the bit depth cannot be told
    from the values). Values all below 4096 (not all 0) are probably 8-bit data cast to uint16 or
    10- or 12-bit sensor data, which this reads as a dark frame: a ``UserWarning``, once in the
    process (a camera loop would say it every frame), says what to pass instead."""
    global _warned_sixteen_bits
    top = int(x.max(initial=0))
    if 0 < top < 4096 and not _warned_sixteen_bits:
        _warned_sixteen_bits = True
        warnings.warn(
            f"{source}: 16-bit pixel values all below 4096 (the highest is {top}) are read as "
            "0-65535, a dark frame; pass 8-bit data as uint8, and scale 10- or 12-bit sensor data "
            "to 16 bits first (array << 6 for 10-bit, array << 4 for 12-bit); said once",
            UserWarning,
            stacklevel=2,
        )
    return (x // 257).astype(np.uint8)


# -- arrays ------------------------------------------------------------------------------------
def array_to_rgb(array: np.ndarray, color: str = "rgb", source: str | None = None) -> np.ndarray:
    """A numpy image -> uint8 (H, W, 3) RGB. Accepts (H, W), (H, W, 1), (H, W, 3), (H, W, 4)."""
    source = source or describe(array)
    x = _check_shape(np.asarray(array), source)  # np.matrix and other subclasses: plain arrays
    _check_pixels(x.shape[1], x.shape[0], source, "array is")
    x = _to_uint8(x, source)
    channels = x.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(x, 3, axis=2))
    if color == "bgr":
        x = x[:, :, [2, 1, 0, 3][:channels]]
    if channels == 4:
        return _flatten_alpha(x)
    return np.ascontiguousarray(x)


def _check_shape(array: np.ndarray, source: str) -> np.ndarray:
    """-> (H, W, C) with C in (1, 3, 4), or an InputError saying what is wrong."""
    if array.size == 0:
        raise InputError(source, "array is empty")
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise InputError(
            source,
            f"expected an (H, W, 3) image array, got {counted(array.ndim, 'dimension')}"
            + ("; pass one image at a time or a list of images" if array.ndim == 4 else ""),
        )
    channels = array.shape[2]
    if channels in (1, 3, 4):
        return array
    hint = ""
    if array.shape[0] in (1, 3, 4):
        hint = "; it looks channels-first (C, H, W): transpose it with array.transpose(1, 2, 0)"
    raise InputError(source, f"expected 1, 3 or 4 channels in the last axis, got {channels}{hint}")


def _usable_dtype(dtype: np.dtype) -> bool:
    """uint8, uint16 or a float, in either byte order."""
    native = dtype.newbyteorder("=") if dtype.kind in "uif" else dtype
    return native in (np.uint8, np.uint16) or native.kind == "f"


def _to_uint8(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype.kind in "uif" and not x.dtype.isnative:  # big-endian data (FITS, network)
        x = x.astype(x.dtype.newbyteorder("="))
    if not _usable_dtype(x.dtype):
        raise InputError(
            source, f"unsupported dtype {x.dtype}; pass uint8 (0-255), uint16 or float in [0, 1]"
        )
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return _sixteen_bits_to_uint8(x, source)
    return _float_to_uint8(x, source)


def _float_to_uint8(x: np.ndarray, source: str, levels: bool = False) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 (x 255, rounded). ``levels`` (a mode F image, whose
    values Pillow reads as levels): values above 1 and up to 255 are levels, truncated as
    Pillow's ``convert("L")`` does; all in [0, 1] they are still read as [0, 1], the other
    convention for float images. A brightest value between 1 and 2 is refused: [0, 1] with
    highlights over 1 (a float TIFF) or levels of a frame that is black (0-1), it cannot be told,
    and read as levels a photo became "nothing recognisable"."""
    if not np.isfinite(x).all():
        raise InputError(source, "array contains NaN or infinite values")
    low, high = x.min(), x.max()
    lo, hi = float(low), float(high)
    # as the array's own type writes them, shortest: 1.0000001 over 1 is not shown as "1"
    shown = f"[{low!s}, {high!s}]"
    if levels and lo >= 0.0 and 1.0 < hi < 2.0:
        raise InputError(
            source,
            f"float (mode F) pixel values in {shown}: [0, 1] with highlights over 1, or "
            "levels 0-255 of a black frame? Clip them to [0, 1] or scale them to 0-255",
        )
    if levels and lo >= 0.0 and 1.0 < hi <= 255.0:  # truncated, as Pillow's convert("L")
        return x.astype(np.uint8)
    if lo < 0.0 or hi > 1.0:
        if levels:
            raise InputError(
                source,
                f"float (mode F) pixel values must lie in [0, 1] or [0, 255] (levels), got {shown}",
            )
        raise InputError(
            source,
            f"float pixel values must lie in [0, 1], got {shown}; scale them, or pass uint8 (0-255)",
        )
    return np.round(x.astype(np.float32) * 255.0).astype(np.uint8)


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) -> uint8 (H, W, 3), composited over ``BACKGROUND``."""
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    background = np.asarray(BACKGROUND, np.float32)
    rgb = rgba[:, :, :3].astype(np.float32) * alpha + background * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


# -- the encoder's input -----------------------------------------------------------------------
def preprocess(images: Sequence[Image.Image], pre: Preprocessing, brighten: bool = False) -> np.ndarray:
    """RGB PIL images -> float32 (N, 3, H, W), resized and normalised as the manifest says;
    ``brighten``: dark frames brightened first (``edgecap.preprocess.exposure_gain``)."""
    if not images:
        h, w = pre.size
        return np.zeros((0, 3, h, w), np.float32)
    return np.stack([to_model_input(im, pre, brighten) for im in images])
