"""Caption a stream of frames (a camera, a video) without falling behind.

    from edgecap import Captioner
    from edgecap.stream import camera_frames, caption_stream

    stream = caption_stream(Captioner(), camera_frames(0), every=0.5)
    for event in stream:
        print(f"{event.timestamp:.2f}s {event.caption.text} "
              f"({event.caption.timings}, {event.dropped} frames dropped)")
    print(stream.stats)

Two ways to consume frames:

- ``live=True`` (the default): a reader thread pulls frames from the source as fast as it gives
  them and keeps only the newest; the captioning loop always takes the newest frame. When
  captioning is slower than the frames arrive, older frames are **dropped** (counted, never
  queued), so a caption is never more than one caption's time behind the camera. The reader
  keeps a copy of each array frame, made before it reads the next: a source may refill one buffer.
- ``live=False``: every frame (after ``every`` sampling) is captioned in order and the source
  waits for the captioner: for video files processed offline, where the output must not depend on
  the machine's speed.

Frames are ``Frame`` objects (``video_frames`` and ``camera_frames`` yield them, with the source's
own index and timestamp and OpenCV's BGR channel order), a recording's frames
(``edgecap.recordings.Frame``, from ``Recording.frames``: their topic's index, their log time
in seconds, the ``InputError`` of a frame that cannot be used as that frame's error), or bare
images of any kind ``Captioner.caption`` takes (numpy arrays, PIL images, paths, bytes),
numbered from 0 and stamped with the seconds since the stream started when the reader got them.

``pick="sharpest"`` captions the least blurred of the frames that compete for one caption instead
of the newest: in a live stream, those that arrive while the captioner is busy (so a moving robot's
blurred frames give way to a sharp one taken a moment before; a caption is then up to one
caption's time older than the newest frame, as it is up to one caption's time behind the camera
either way); in an in-order stream with ``every``, all the frames of one interval (its pick is
captioned once the next interval begins or the source ends). Frames that cannot be measured
without decoding (compressed bytes, paths; ``sharpness``) are taken as with "newest" (in order, an
interval of them has its first captioned); a frame that cannot be captioned at all (None, a
recording's ``InputError``) only when no other frame competes with it. Of frames about as sharp
(within ``SHARPER_BY``), the newest wins, so a still camera's captions are as fresh as without the
pick. A ``Frame`` may carry its ``sharpness``, measured by its source where that is cheaper than
the stream could (the ROS 2 node measures a raw message's own bytes, not converting it): the stream
takes it and does not measure the image.

``min_change=MIN_CHANGE`` captions a frame only when its view changed since the frame captioned
last (``view_change``: the share of 16 x 16 cells whose level moved against the others; sensor
noise, an exposure change and a view moved by a pixel or two do not count), so a robot standing
still spends one caption on its scene and says it once; a change builds up until it counts
(each frame is compared with the one captioned, not with the one before). The frames passed over
are counted in ``stats.unchanged``. It applies to the frame that would be captioned (after
``every`` and ``pick``); one that cannot be measured without decoding (bytes, paths) is captioned,
as is the frame after it.

``every=SECONDS`` samples at most one frame per interval of frame time, on a grid that starts at
the first frame's timestamp: for a video, one frame per ``every`` seconds of video time. A frame
stamped more than ``every`` before the last frame taken, or at or before the grid's first
frame after a later one (a recording replayed in a loop, however short; a
camera's clock reset; not a frame a little out of order) starts the grid afresh at its own
timestamp, so the frames after it are sampled again rather than skipped until the time passes
the old highest.

A frame the captioner cannot use (None from a failed camera read, a wrong shape or dtype) raises
its ``InputError`` out of the loop by default (``on_error="raise"``), which ends the stream and
closes the source. ``on_error="return"`` keeps a robot's loop going: the frame's event holds the
``InputError`` in ``caption`` (counted in ``stats.failed``) and the next frame is captioned.

OpenCV (the ``video`` extra) is imported only by ``video_frames`` and
``camera_frames``; FFmpeg's and OpenCV's own log lines are silenced (``OPENCV_FFMPEG_LOGLEVEL``,
``OPENCV_LOG_LEVEL``, unless set) so that a damaged video gives one error, not decoder noise.

Video frames obey the still photos' pixel limit (``edgecap.images.max_pixels``): a video whose
frames are larger is refused from its header, before any frame is decoded. A video that ends
before the frame count its header gives (truncated, or frames the decoder cannot read) raises
``InputError`` after its readable frames; one that yields no frame at all raises it at once. A
damaged frame in the middle of a video (up to 100 in a row) is passed over: the frames after it
keep their own index and time, and ``InputError`` after the last frame says how many could not be
decoded.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, cast, overload

import numpy as np
from PIL import Image

from edgecap.api import ON_ERROR, Caption
from edgecap.errors import BackendError, InputError, counted
from edgecap.extras import install_hint
from edgecap.files import os_problem
from edgecap.images import COLORS, ImageInput, own_input, pixel_limit_problem, shown_in_repr

if TYPE_CHECKING:  # a default for a type checker (PEP 696; typing's own from Python 3.13)
    from typing_extensions import TypeVar

    # what an event's ``caption`` holds: a ``Caption`` with on_error="raise" (``caption_stream``
    # says which); a bare ``StreamEvent`` or ``CaptionStream`` either
    _C = TypeVar("_C", bound="Caption | InputError", covariant=True, default="Caption | InputError")
else:
    from typing import TypeVar

    _C = TypeVar("_C", covariant=True)

READER_JOIN_S = 2.0  # how long closing a stream waits for the reader's current read to return
_EPSILON_S = 1e-6  # video timestamps (index / fps, or the decoder's) land on the `every` grid up to rounding
MAX_CAMERA_INDEX = 1023  # /dev/video<N>; OpenCV reads a negative index as "any camera" (which
# crashes some builds without a camera: refused)
MAX_CAPTURE_SIDE = 1 << 15
# Frames missing at the end of a video before it counts as cut short: containers whose frame
# count is an estimate (from the duration) may be off by a few frames.
_MISSING_FRAMES_OK = 2
# Frames in a row the decoder may fail on (a damaged part of a video) before the video counts as
# ending there: the frames after a damaged one are still read.
_UNREADABLE_IN_A_ROW = 100
# pick="sharpest": a newer frame takes the place of the one held for the next caption unless it
# is under this share of the sharpest frame since then. Motion blur of 4 px takes a frame's
# ``sharpness`` to a median 0.68 of the same frame unblurred, 8 px to 0.51, and above 0.9 for 1
# of the 273 dev photos (at 4 px; at most 0.89 from 8 px on), each blurred along its rows or
# columns; two frames of one still scene differing only in sensor noise (s.d. 2 levels) stay
# within 0.995 of each other (``benchmarks/sharpest.py``). So a frame blurred by a few pixels
# gives way to a sharp one, and of frames about as sharp the newest wins.
SHARPER_BY = 0.9
PICKS = ("newest", "sharpest")
# min_change=MIN_CHANGE: a frame is captioned when at least this share of its view changed
# since the frame captioned last (``view_change``). On the 273 dev photos, sensor noise (s.d. 2 or
# 8 levels), the exposure at 0.7, JPEG at quality 30 and a view moved by 1 px never reach it;
# the exposure at 1.3 (bright parts clipped) reaches it for 8 photos, a view moved by 3 px for
# 6; another photo's patch over a twentieth of the frame for 91, over a tenth for 255, over a
# fifth for all 273 (``benchmarks/changes_only.py``).
MIN_CHANGE = 0.05
_CELLS = 16  # view_change's cells a side
_CELL_MOVED = 0.5  # a cell changed: its standardised level moved by more than this

__all__ = [
    "Frame",
    "StreamEvent",
    "StreamStats",
    "CaptionStream",
    "caption_stream",
    "sharpness",
    "view_change",
    "MIN_CHANGE",
    "video_frames",
    "camera_frames",
]


@dataclass(frozen=True)
class Frame:
    """One frame of a stream. ``timestamp``: seconds (video time for a file, seconds since the
    camera opened for a camera); ``color``: the channel order of ``image`` when it is an array.
    ``sharpness``: the frame's ``sharpness`` where its source can tell it better than the stream
    can from ``image`` (the ROS 2 node measures a raw message's pixels without converting it):
    ``pick="sharpest"`` then takes it rather than measuring ``image``. A number, or a function
    of no arguments giving one, called only for a frame that competes (after ``every``
    sampling), so a frame the sampling skips costs nothing (None: measured as the image is; a
    NaN, an infinity or a negative number, given or returned, counts as not measured).
    ``view``: where ``image`` is not pixels the stream can measure (a raw ROS message, converted
    only if it is captioned), a function of no arguments giving an array that ``view_change``
    measures for ``min_change`` instead (a view of the message's bytes; None from it: not
    measured), called for each frame the stream would caption."""

    index: int
    timestamp: float
    image: ImageInput | InputError  # an InputError: a recording's frame that cannot be used
    color: str = "rgb"
    name: str | None = None  # how an error names the frame (None: as the captioner names the image)
    sharpness: float | Callable[[], float | None] | None = None
    view: Callable[[], object] | None = None

    def __repr__(self) -> str:
        # the image named (``<bytes (N bytes)>``, ``<array (480, 640, 3) uint8>``), not written
        # out: a compressed frame's repr had been all its bytes (1.2 MB for a 300 KB JPEG)
        return (
            f"Frame(index={self.index!r}, timestamp={self.timestamp!r}, image={shown_in_repr(self.image)}, "
            f"color={self.color!r}, name={self.name!r}"
            + ("" if self.sharpness is None else f", sharpness={_shown_sharpness(self.sharpness)}")
            + ")"
        )


@dataclass(frozen=True)
class StreamEvent(Generic[_C]):
    """One captioned frame (``caption``: its ``Caption``, or with ``on_error="return"`` the
    ``InputError`` of a frame that could not be captioned).

    ``dropped``: frames that were due (after ``every`` sampling) but replaced by a newer frame
    (or, with ``pick="sharpest"``, passed over for a sharper one) before the captioner was free,
    since the previous event; always 0 with ``live=False``.
    ``latency_ms``: from the moment the reader got the frame to the moment its caption was ready
    (waiting for the captioner included).
    """

    frame_index: int
    timestamp: float
    caption: _C  # Caption | InputError; a Caption alone with on_error="raise" (to a type checker too)
    dropped: int
    latency_ms: float


@dataclass(frozen=True)
class StreamStats:
    """Counts since the stream started. ``frames``: frames read from the source; ``skipped``: left
    out by ``every`` sampling (with ``pick="sharpest"`` and ``live=False``, the interval's frames
    but the one picked); ``dropped``: due but not captioned, replaced by a newer frame or passed
    over for a sharper one (live streams only);
    ``captioned``: frames captioned; ``failed``: frames the captioner could not use (their events
    hold the ``InputError``, with ``on_error="return"``); ``unchanged``: frames not captioned
    because their view had changed less than ``min_change`` since the frame captioned last;
    ``held``: of the frames captioned, those whose caption is the one said before, held
    (``hold=True``: ``Caption.held``).
    ``elapsed_s``: wall-clock seconds since the first read."""

    frames: int = 0
    skipped: int = 0
    dropped: int = 0
    captioned: int = 0
    elapsed_s: float = 0.0
    failed: int = 0
    unchanged: int = 0
    held: int = 0

    @property
    def captions_per_second(self) -> float:
        return self.captioned / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def frames_per_second(self) -> float:
        """The rate the source delivered frames at."""
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{counted(self.captioned, 'caption')} from {counted(self.frames, 'frame')} "
            f"in {self.elapsed_s:.2f} s "
            f"({self.captions_per_second:.2f} captions/s, {self.frames_per_second:.1f} "
            f"frames/s); {self.dropped} dropped, {self.skipped} skipped by sampling"
            + (f", {self.failed} failed" if self.failed else "")
            + (f", {self.unchanged} unchanged" if self.unchanged else "")
            + (f", {self.held} held" if self.held else "")
        )


def _check_min_change(min_change: float | None) -> float | None:
    """``min_change`` as a float: None or a share of the view over 0 and at most 1."""
    if min_change is not None and (
        isinstance(min_change, bool) or not isinstance(min_change, numbers.Real) or not 0 < min_change <= 1
    ):
        raise ValueError(
            f"min_change must be None or a share of the view over 0 and at most 1, got {min_change!r}"
        )
    return None if min_change is None else float(min_change)


def _check_every(every: float | None) -> float | None:
    """``every`` as a float: None or a positive number of seconds (numpy's numbers too); anything
    else is a ``ValueError`` (0 would divide by zero, a negative interval take no frame)."""
    if every is not None and (
        isinstance(every, bool) or not isinstance(every, numbers.Real) or not every > 0
    ):
        raise ValueError(f"every must be None or a positive number of seconds, got {every!r}")
    return None if every is None else float(every)


class _Sampler:
    """Keeps at most one frame per ``every`` seconds of frame time (all frames when None)."""

    def __init__(self, every: float | None):
        self.every = _check_every(every)
        self.origin: float | None = None
        self.next_slot = 0.0  # a float: an interval so short (every=1e-308) that a slot's number
        # overflows makes it infinite (every frame taken); int(inf) raised OverflowError
        self.last = -math.inf  # the timestamp of the last frame taken
        self.previous = -math.inf  # ... and of the frame before, taken or not

    def take(self, timestamp: float) -> bool:
        if self.every is None:
            return True
        previous, self.previous = self.previous, timestamp
        if (
            self.origin is None
            # time went back by more than an interval from the last frame taken (a clock reset;
            # not a frame a little out of order) ...
            or timestamp < self.last - self.every
            # ... or to the grid's first frame or before it, from a later one: a looped replay,
            # however short (one of under two intervals is never an interval before the last
            # frame taken, and its later passes had no caption)
            or timestamp <= self.origin < previous
        ):
            self.origin, self.next_slot = timestamp, 0.0  # a new grid from this frame
        slot = (timestamp - self.origin + _EPSILON_S) // self.every
        if slot < self.next_slot:
            return False
        self.last = timestamp
        self.next_slot = slot + 1
        return True


def sharpness(image: object) -> float | None:
    """How sharp a frame is, to choose the least blurred of a few frames of one scene
    (``caption_stream(..., pick="sharpest")``): the mean absolute Laplacian of its second
    channel (green, in RGB and BGR; a grey frame's only one) summed over 2x2 blocks, over the
    standard deviation of those sums. Motion blur and defocus take away the fine detail the
    Laplacian measures and leave the spread, so a blurred frame scores lower than the same
    frame sharp; the ratio does not move with the exposure (a camera's gain changing between
    frames), and the 2x2 blocks average sensor noise down. Comparable between frames of one
    scene, not between scenes; 0.0 for a uniform frame.

    None where it cannot be told without decoding or at all: compressed bytes, a path, a
    tensor, a PIL image of a mode other than RGB, RGBA or L or that cannot be decoded (cut
    short, closed), an array that is not (H, W) or (H, W, C) numbers of at least 6 x 6 pixels,
    one over the pixel limit (``edgecap.images.max_pixels``), or one with a NaN or an infinity.
    It never raises: it runs in a live stream's reader thread."""
    channel = _measured_channel(image, least=6)
    if channel is None:
        return None
    height, width = channel.shape
    grey = channel[: height // 2 * 2, : width // 2 * 2]
    # a float frame with an infinity (inf - inf) or over float32's range gives NaN or an
    # infinity, and None below, with no numpy warning on the stream's stderr
    with np.errstate(over="ignore", invalid="ignore"):
        # 8-bit frames in int16, exactly (a block's sum is at most 1020, the Laplacian within
        # 8160): about half the time float32 takes (benchmarks/sharpest.py: 0.4-0.6 ms for a
        # VGA frame on one core, 1.3-1.8 ms for 1280 x 720)
        blocks = grey[0::2, 0::2].astype(np.int16 if grey.dtype == np.uint8 else np.float32)
        for rows, columns in ((1, 0), (0, 1), (1, 1)):
            np.add(blocks, grey[rows::2, columns::2], out=blocks, casting="same_kind")
        laplacian = blocks[1:-1, 1:-1] * 4
        for neighbour in (blocks[:-2, 1:-1], blocks[2:, 1:-1], blocks[1:-1, :-2], blocks[1:-1, 2:]):
            np.subtract(laplacian, neighbour, out=laplacian)
        np.abs(laplacian, out=laplacian)
        detail = float(laplacian.mean(dtype=np.float64))
        spread = float(blocks.std(dtype=np.float64))
    if not (math.isfinite(detail) and math.isfinite(spread)):
        return None
    return detail / spread if spread > 0 else 0.0


def _measured_channel(image: object, least: int) -> np.ndarray | None:
    """The (H, W) channel ``sharpness`` and ``view_change`` measure: an array's or a PIL
    image's second channel (green, in RGB and BGR), a grey frame's only one; None for anything
    else (see ``sharpness``) or a frame under ``least`` pixels a side."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA", "L") or pixel_limit_problem(image.width, image.height):
            return None
        try:  # decodes a lazily opened image: one cut short, or closed, is the captioner's to name
            array = np.asarray(image)
        except Exception:  # noqa: BLE001 (OSError, ValueError, PIL's SyntaxError...)
            return None
    elif isinstance(image, np.ndarray):
        array = image
    else:
        return None
    if array.ndim == 3 and 1 <= array.shape[2] <= 4:
        channel = array[:, :, 1 if array.shape[2] >= 3 else 0]
    elif array.ndim == 2:
        channel = array
    else:
        return None
    height, width = channel.shape
    if array.dtype.kind not in "uif" or height < least or width < least or pixel_limit_problem(width, height):
        return None
    return channel


def view_change(before: object, after: object) -> float | None:
    """How much of the view changed from one frame to another, 0.0 to 1.0, to caption a scene
    again only when it changed (``caption_stream(..., min_change=MIN_CHANGE)``): each frame's
    green channel (a grey frame's only one) as 16 x 16 cells, each cell's mean level
    standardised by the mean and standard deviation of the frame's cells, and the share of
    cells whose standardised level moved by more than 0.5. Sensor noise averages out in a cell;
    a camera's exposure moving (without clipping) moves every cell alike and none relative to
    the others; a view moved by a few pixels moves a cell by a few pixels' share of its width.
    Frames of different sizes compare as their cells do (a camera changing resolution over one
    view is little change).

    None where either frame cannot be measured (as for ``sharpness``; or under 16 pixels a
    side). It never raises."""
    first, second = _layout(before), _layout(after)
    if first is None or second is None:
        return None
    return _changed_share(first, second)


def _layout(image: object) -> np.ndarray | None:
    """``view_change``'s cells of one frame, standardised (float64 (16, 16)), or None."""
    channel = _measured_channel(image, least=_CELLS)
    if channel is None:
        return None
    height, width = channel.shape
    rows = np.linspace(0, height, _CELLS + 1).astype(np.intp)
    columns = np.linspace(0, width, _CELLS + 1).astype(np.intp)
    # 8-bit sums exactly in uint64, whatever the pixel limit is raised to (uint32 would wrap past
    # 16.8 million pixels a column strip, for 7% less time); 0.29 ms for a VGA frame on one core
    exact = np.uint64 if channel.dtype == np.uint8 else np.float64
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduceat(channel, columns[:-1], axis=1, dtype=exact)
        cells = np.add.reduceat(sums, rows[:-1], axis=0).astype(np.float64)
        cells /= np.outer(np.diff(rows), np.diff(columns))
        spread = float(cells.std())
        if not math.isfinite(spread):  # a NaN or an infinity in the frame
            return None
        # a frame's cells within a level of 8 bits of each other (a uniform frame, a lens cap's
        # noise) are taken as flat, not their rounding or noise magnified: a level as the
        # captioner reads the frame, 1/255 of an integer type's range or of a float's [0, 1]
        level = np.iinfo(channel.dtype).max / 255 if channel.dtype.kind in "ui" else 1 / 255
        spread = max(spread, level)
        if spread == 0:
            return np.zeros_like(cells)
        return (cells - cells.mean()) / spread


def _changed_share(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.count_nonzero(np.abs(first - second) > _CELL_MOVED)) / first.size


def _unchanged(last: np.ndarray | None, layout: np.ndarray | None, min_change: float) -> bool:
    """``min_change``'s rule: a frame of cells ``layout`` is passed over when it and the frame
    captioned last (``last``) could both be measured and under ``min_change`` of the view
    changed; otherwise it is captioned."""
    return layout is not None and last is not None and _changed_share(last, layout) < min_change


# The score of a frame that cannot be captioned at all (None from a failed read, a recording's
# frame whose image is its InputError): under any other frame's.
_UNUSABLE = -math.inf


def _score(frame: Frame) -> float | None:
    """The frame's ``sharpness`` (the one it carries where its source gave one, or the one its
    function gives: its image is not measured), or ``_UNUSABLE`` for a frame that cannot be
    captioned at all."""
    if frame.image is None or isinstance(frame.image, InputError):
        return _UNUSABLE
    given = frame.sharpness
    if given is None:
        return sharpness(frame.image)
    if callable(given):
        given = given()
        if given is None:
            return None
    # a NaN, an infinity or a negative number given (a score of its own a source got wrong) as
    # not measured: NaN compares false with every score, -inf is _UNUSABLE's, and a negative one
    # reverses the comparison (-11 is not under 0.9 x -10)
    return float(given) if math.isfinite(given) and given >= 0 else None


def _shown_sharpness(given: float | Callable[[], float | None]) -> str:
    """How a frame's repr shows its ``sharpness``: the number, or that it is measured when the
    frame competes (a function's repr names its address, different on every run)."""
    return "<measured when it competes>" if callable(given) else repr(given)


class _Sharpest:
    """``pick="sharpest"``: which of the frames that compete for one caption is captioned, by
    their ``_score``. The first is held; a newer one takes its place unless its ``sharpness``
    is under ``SHARPER_BY`` of the sharpest of them so far, so the frame held is never much
    blurrier than the sharpest and, of frames about as sharp, it is the newest. A frame whose
    sharpness cannot be told (None) is taken as without the pick: live (``newest``), it takes
    the place of any, and one that can be told then takes its place; in order, it takes none's
    (an interval of such frames has its first captioned). A frame that cannot be captioned at
    all takes the place of none but another such frame (it is captioned, saying what is wrong,
    only when nothing else competed with it); any other frame takes its place."""

    def __init__(self, newest: bool) -> None:
        self.newest = newest  # a frame not measured takes the held one's place (live)
        self.sharpest: float | None = None

    def first(self, score: float | None) -> None:
        self.sharpest = score

    def replaces(self, score: float | None) -> bool:
        held = self.sharpest
        if held == _UNUSABLE:  # any frame takes the place of one that cannot be captioned ...
            self.sharpest = score
            return True
        if score == _UNUSABLE:  # ... and one that cannot takes no other's
            return False
        if score is None or held is None:  # not measured: as without the pick
            if score is None and not self.newest:  # in order: the interval's first is kept
                return False
            self.sharpest = score
            return True
        if score < SHARPER_BY * held:
            return False
        self.sharpest = max(held, score)
        return True


class _Captions(Protocol):
    """What a stream captions with (a ``Captioner``)."""

    def caption(self, image: Any, color: str = ..., return_attention: bool = ...) -> Caption: ...


class CaptionStream(Generic[_C]):
    """What ``caption_stream`` returns: iterate it for ``StreamEvent``s; ``stats`` any time.

    Iterate it once, from one thread. Leaving the loop early (``break``, an exception) or
    calling ``close()`` from that thread stops the reader and closes the frame source (releasing
    a camera or video file); ``close()`` from another thread (a shutdown hook) while the loop
    captions a frame ends the loop after that frame's event, and the loop closes the source (a
    live loop waiting for a frame ends without it, even if the camera has stalled); between two
    events, it closes the stream at once and the loop's next step ends it.
    """

    def __init__(
        self,
        captioner: _Captions,
        frames: Iterable[object],
        every: float | None = None,
        color: str = "rgb",
        live: bool = True,
        return_attention: bool = False,
        on_error: str = "raise",
        pick: str = "newest",
        min_change: float | None = None,
        hold: bool = False,
    ):
        try:
            if not isinstance(hold, (bool, np.bool_)):
                raise ValueError(f"hold must be True or False, got {hold!r}")
            if color not in COLORS:
                raise ValueError(f"color must be one of {COLORS}, got {color!r}")
            if on_error not in ON_ERROR:
                raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
            every = _check_every(every)
            min_change = _check_min_change(min_change)
            if pick not in PICKS:
                raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
            if pick == "sharpest" and not live and every is None:
                raise ValueError(
                    'pick="sharpest" chooses among frames that compete for one caption (a live '
                    "stream's that arrive while the captioner is busy, or every= seconds' "
                    "frames): with live=False and no every, every frame is captioned"
                )
        except ValueError:
            # the stream will never read its source: a camera opened for it is released now,
            # not when the garbage collector finds it
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            raise
        self.captioner = captioner
        self.frames = frames
        self.every = every
        self.color = color
        self.live = live
        self.return_attention = return_attention
        self.on_error = on_error
        self.pick = pick
        self.min_change = min_change
        self.hold = bool(hold)
        # with hold, the caption said last (of a frame with something to recognise), offered to
        # the captioner with the next frame; None: none yet, or the last said nothing was there
        self._said: Caption | None = None
        # the cells (``_layout``) of the frame captioned last, with min_change; None: none yet,
        # or that frame could not be measured (the next frame is captioned)
        self._last_layout: np.ndarray | None = None
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._counts = {
            "frames": 0,
            "skipped": 0,
            "dropped": 0,
            "captioned": 0,
            "failed": 0,
            "unchanged": 0,
            "held": 0,
        }
        self._started: float | None = None
        self._ended: float | None = None
        self._started_iterating = False
        # the source is taken, once, under the lock, by the one side that closes it: ``_read`` as
        # it begins (it closes the source when it ends), or ``close()`` before any reading
        self._source_taken = False
        # weakly held: a strong reference would make a cycle (the generator's frame holds self),
        # and leaving a for loop early must close the generator, and the camera, at once
        self._events: weakref.ref | None = None
        self._forked = False  # this is a fork's child of the process whose thread reads the frames

    @property
    def stats(self) -> StreamStats:
        with self._lock:
            if self._started is None:
                elapsed = 0.0
            else:
                elapsed = (self._ended or time.perf_counter()) - self._started
            return StreamStats(elapsed_s=elapsed, **self._counts)

    def __iter__(self) -> Iterator[StreamEvent[_C]]:
        if self._started_iterating:
            raise RuntimeError("a CaptionStream can be iterated once; make a new one")
        self._started_iterating = True
        events = _Events(self._live() if self.live else self._in_order())
        self._events = weakref.ref(events)
        # on_error="raise" (a CaptionStream[Caption]): no event holds an InputError
        return cast("Iterator[StreamEvent[_C]]", events)

    def close(self) -> None:
        """Stop reading frames and close the source; safe to call more than once."""
        self._stop.set()
        events = self._events() if self._events is not None else None
        if events is not None and not events.close():
            # the loop is captioning a frame or waiting for one (close() from another thread, a
            # shutdown hook): the stop flag ends it after that frame (a live loop waiting is
            # woken now, whether or not the camera gives another frame), and it closes the source
            with self._lock:
                self._lock.notify_all()
        with self._lock:
            close_here, self._source_taken = not self._source_taken, True
        if close_here:  # never read (not iterated, or its loop never begun: closing a
            # generator that never started runs none of its code): the source may hold a camera
            # or file open
            close = getattr(self.frames, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> CaptionStream[_C]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def _read(self, skipped: bool = False) -> Generator[tuple[Frame, float, bool], None, None]:
        """The source's frames that pass sampling, each with the perf_counter time it was read
        and True; with ``skipped``, the frames sampling leaves out too, with False (each after
        the frame taken in its interval). Counts frames and skips; closes the source when done or
        stopped. Nothing (the source untouched) when ``close()`` has taken it first: another
        thread's ``close()`` after the loop began, before this began."""
        with self._lock:
            if self._source_taken:
                return
            self._source_taken = True
        sampler = _Sampler(self.every)
        source = iter(self.frames)
        try:
            with self._lock:
                self._started = time.perf_counter()
            position = 0
            while not self._stop.is_set():
                try:
                    item = next(source)
                except StopIteration:
                    return
                now = time.perf_counter()
                frame = _as_frame(item, position, now - self._started, self.color)
                position += 1
                if self.every is not None and not math.isfinite(frame.timestamp):
                    raise ValueError(
                        f"frame {frame.index}: timestamp {frame.timestamp!r} is not a finite number "
                        "of seconds, which every= samples frames by"
                    )
                with self._lock:
                    self._counts["frames"] += 1
                    taken = sampler.take(frame.timestamp)
                    if not taken:
                        self._counts["skipped"] += 1
                if taken or skipped:
                    yield frame, now, taken
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _caption_if_changed(self, frame: Frame, read_at: float, dropped: int) -> StreamEvent | None:
        """``frame``'s event; None, with ``min_change``, when its view changed less than that
        since the frame captioned last (counted in ``stats.unchanged``). A frame that cannot be
        measured (``view_change``) is captioned, as is any after one captioned that could not."""
        if self.min_change is None:
            return self._caption(frame, read_at, dropped)
        layout = _layout(frame.image if frame.view is None else frame.view())
        if _unchanged(self._last_layout, layout, self.min_change):
            with self._lock:
                self._counts["unchanged"] += 1
            return None
        event = self._caption(frame, read_at, dropped)
        if not isinstance(event.caption, InputError):
            self._last_layout = layout
        return event

    def _caption(self, frame: Frame, read_at: float, dropped: int) -> StreamEvent:
        caption: Caption | InputError
        try:
            if isinstance(frame.image, InputError):  # a recording's frame that cannot be used
                raise frame.image
            held = {"previous": self._said} if self.hold else {}
            caption = self.captioner.caption(
                frame.image, color=frame.color, return_attention=self.return_attention, **held
            )
            if self.hold:
                self._said = caption if caption.recognisable else None
        except InputError as exc:
            error = exc
            if frame.name is not None and exc.source != frame.name:  # not "<bytes (100 bytes)>"
                error = InputError(frame.name, exc.problem)
            if self.on_error == "raise":
                if error is exc:
                    raise
                raise error from exc
            caption = error
        with self._lock:
            self._counts["failed" if isinstance(caption, InputError) else "captioned"] += 1
            if getattr(caption, "held", False) is True:
                self._counts["held"] += 1
        return StreamEvent(
            frame_index=frame.index,
            timestamp=frame.timestamp,
            caption=caption,
            dropped=dropped,
            latency_ms=(time.perf_counter() - read_at) * 1e3,
        )

    # -- offline: every sampled frame, in order ----------------------------------------------
    def _in_order(self) -> Generator[StreamEvent, None, None]:
        sharpest = self.pick == "sharpest"
        reader = self._read(skipped=sharpest)
        try:
            if sharpest:
                yield from self._sharpest_of_each_interval(reader)
            else:
                for frame, read_at, _ in reader:
                    event = self._caption_if_changed(frame, read_at, 0)
                    if event is not None:
                        yield event
        finally:
            reader.close()
            self._end()

    def _sharpest_of_each_interval(
        self, reader: Iterator[tuple[Frame, float, bool]]
    ) -> Generator[StreamEvent, None, None]:
        """In order with ``pick="sharpest"``: every= seconds' frames compete (``reader`` gives
        those sampling skips too); the one picked is captioned once the next interval begins or
        the source ends, the others count as skipped, as they would have. A source that fails (a
        video cut short) has its error raised after the last interval's pick is captioned, as
        the frames read before it are without the pick."""
        pick, held, failure = _Sharpest(newest=False), None, None
        while True:
            try:
                frame, read_at, taken = next(reader)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 (raised below, once the pick is captioned)
                failure = exc
                break
            score = _score(frame)
            if taken:  # an interval begins (the first frame read is always taken)
                if held is not None and (event := self._caption_if_changed(*held, 0)) is not None:
                    yield event
                pick.first(score)
            elif not pick.replaces(score):
                continue
            held = _own_pixels(frame), read_at  # held while the source reads the next frames
        if held is not None and not self._stop.is_set():
            if (event := self._caption_if_changed(*held, 0)) is not None:
                yield event
        if failure is not None:
            raise failure

    # -- live: a reader thread keeps the newest frame ----------------------------------------
    def _live(self) -> Generator[StreamEvent, None, None]:
        state = _Latest()
        thread = threading.Thread(
            target=self._reader_thread, args=(state,), name="edgecap-frame-reader", daemon=True
        )
        thread.start()
        _LIVE_STREAMS.add(self)
        passed_over = 0  # frames dropped before a frame not captioned (unchanged): the next event's
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(
                        lambda: state.frame is not None or state.done or self._stop.is_set() or self._forked
                    )
                    if self._forked:
                        raise RuntimeError(_FORKED)
                    if self._stop.is_set():  # close() from another thread: no frame after it
                        return
                    if state.frame is None:  # done and nothing left
                        if state.error is not None:
                            raise state.error
                        return
                    (frame, read_at), dropped = state.frame, state.dropped
                    state.frame, state.dropped = None, 0
                event = self._caption_if_changed(frame, read_at, passed_over + dropped)
                if event is None:
                    passed_over += dropped
                else:
                    passed_over = 0
                    yield event
        finally:
            self._stop.set()
            if isinstance(self.frames, _CaptureFrames):  # video_frames' realtime pacing
                self.frames.interrupt()
            thread.join(READER_JOIN_S)
            self._end()

    def _forked_away(self) -> None:
        """In a fork's child: the reader thread stayed in the parent (a child has no other
        thread), so the loop would wait for frames forever; it raises instead. The locks the
        reader may have held at the fork are fresh."""
        self._forked = True
        self._lock = threading.Condition()
        events = self._events() if self._events is not None else None
        if events is not None:
            events._lock = threading.Lock()

    def _end(self) -> None:
        with self._lock:
            if self._started is not None and self._ended is None:
                self._ended = time.perf_counter()

    def _reader_thread(self, state: _Latest) -> None:
        pick = _Sharpest(newest=True) if self.pick == "sharpest" else None
        try:
            for frame, read_at, _ in self._read():
                # the frame's own pixels, taken before the source is asked for the next frame: a
                # source that refills one buffer (a camera SDK's frame pool) would otherwise change
                # this frame while it waits for the captioner, or while it is captioned
                item = _own_pixels(frame), read_at
                score = _score(item[0]) if pick is not None else None
                with self._lock:
                    if state.frame is None:
                        if pick is not None:
                            pick.first(score)
                    else:  # the captioner is busy: the newest frame wins (or the sharpest)
                        state.dropped += 1
                        self._counts["dropped"] += 1
                        if pick is not None and not pick.replaces(score):
                            continue
                    state.frame = item
                    self._lock.notify()
        except BaseException as exc:  # handed to the captioning loop, which raises it
            state.error = exc
        finally:
            with self._lock:
                state.done = True
                self._lock.notify()


_FORKED = (
    "this live stream's frames are read by a thread of the process that made it, which a forked "
    "child does not have: make a new caption_stream in this process"
)
# The live streams whose loop has begun, for a fork's child (``CaptionStream._forked_away``).
_LIVE_STREAMS: weakref.WeakSet[CaptionStream] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for stream in list(_LIVE_STREAMS):
        stream._forked_away()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Events:
    """The stream's iterator: its generator advanced under a lock, so that ``close()`` from
    another thread never runs the generator's cleanup while the loop asks for its next event
    (that next step would raise ``ValueError: generator already executing``)."""

    def __init__(self, generator: Generator[StreamEvent, None, None]):
        self._generator = generator
        self._lock = threading.Lock()

    def __iter__(self) -> _Events:
        return self

    def __next__(self) -> StreamEvent:
        with self._lock:
            return next(self._generator)

    def close(self) -> bool:
        """Close the generator unless it is running now (False: the caller stops it instead)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._generator.close()
        finally:
            self._lock.release()
        return True


class _Latest:
    """The slot shared by the reader thread and the captioning loop (guarded by the lock)."""

    def __init__(self):
        self.frame: tuple[Frame, float] | None = None
        self.dropped = 0
        self.done = False
        self.error: BaseException | None = None


def _own_pixels(frame: Frame) -> Frame:
    """``frame`` with its image as the source can no longer change it (``own_input``)."""
    image = own_input(frame.image)
    return frame if image is frame.image else replace(frame, image=image)


def _as_frame(item, position: int, seconds: float, color: str) -> Frame:
    if isinstance(item, Frame):
        return item
    from edgecap.recordings import Frame as RecordedFrame, seconds_text

    if isinstance(item, RecordedFrame):  # its topic's own index, its log time; RGB when an array
        name = f"{item.topic} at {seconds_text(item.time_ns)}"  # as edgecap caption --bag names it
        return Frame(index=item.index, timestamp=item.time_ns / 1e9, image=item.image, name=name)
    return Frame(index=position, timestamp=seconds, image=item, color=color)


# For a type checker: with on_error "raise" (the default) each event's ``caption`` is a
# ``Caption``; with "return" it may be an ``InputError``.
@overload
def caption_stream(
    captioner: _Captions,
    frames: Iterable[object],
    every: float | None = ...,
    color: str = ...,
    live: bool = ...,
    return_attention: bool = ...,
    on_error: Literal["raise"] = ...,
    pick: str = ...,
    min_change: float | None = ...,
    hold: bool = ...,
) -> CaptionStream[Caption]: ...


@overload
def caption_stream(
    captioner: _Captions,
    frames: Iterable[object],
    every: float | None = ...,
    color: str = ...,
    live: bool = ...,
    return_attention: bool = ...,
    on_error: str = ...,
    pick: str = ...,
    min_change: float | None = ...,
    hold: bool = ...,
) -> CaptionStream[Caption | InputError]: ...


def caption_stream(
    captioner: _Captions,
    frames: Iterable[object],
    every: float | None = None,
    color: str = "rgb",
    live: bool = True,
    return_attention: bool = False,
    on_error: str = "raise",
    pick: str = "newest",
    min_change: float | None = None,
    hold: bool = False,
) -> CaptionStream[Caption] | CaptionStream[Caption | InputError]:
    """Caption a stream of frames; iterate the result for ``StreamEvent``s.

    Args:
        captioner: a ``Captioner`` (anything with ``caption(image, color=, return_attention=)``).
        frames: ``Frame``s or bare images (see the module docstring); a ``Frame``'s own
            ``color`` applies to it, ``color`` to bare images.
        every: seconds of frame time between captions (None: every frame that can be captioned).
        live: True: the newest frame wins and older ones are dropped when captioning is slower
            than the source; False: every sampled frame is captioned, in order.
        return_attention: passed to ``captioner.caption``.
        on_error: "raise": a frame the captioner cannot use raises its ``InputError`` (ending the
            stream); "return": its event holds the error and the stream goes on.
        pick: which of the frames that compete for one caption is captioned: "newest", or
            "sharpest" (the least blurred, by ``sharpness``; of frames about as sharp, the
            newest). Frames compete in a live stream when they arrive (after ``every``
            sampling) while the captioner is busy; in an in-order stream, those of one ``every``
            interval (each interval's pick captioned once the next interval begins). See the
            module docstring.
        min_change: caption a frame only when at least this share of its view (0 to 1) changed
            since the frame captioned last (``view_change``; ``MIN_CHANGE``, 0.05, keeps a still
            camera's noise and exposure changes out and catches most changes over a tenth of the
            view: 255 of the benchmark's 273 patches of another photo); the
            frames passed over are counted in ``stats.unchanged``. None (the default): every
            frame due is captioned. A robot standing still then captions its scene once.
        hold: offer each frame's captioner the caption said last (``captioner.caption(image,
            ..., previous=caption)``), which keeps it (``Caption.held``, counted in
            ``stats.held``) when it fits the new frame about as well as the caption the search
            chooses (``CaptionOptions.hold_margin``): two frames of one scene then keep their
            words instead of flickering between near ties (``benchmarks/hold.py``: of 273 pairs
            of frames differing in sensor noise, 105 captioned differently without, 30 with).
            A frame of nothing recognisable ends the hold; a failed frame does not. Costs one
            more pass of the decoder over the previous caption's words when the new caption
            differs from it.
    """
    return CaptionStream(
        captioner,
        frames,
        every=every,
        color=color,
        live=live,
        return_attention=return_attention,
        on_error=on_error,
        pick=pick,
        min_change=min_change,
        hold=hold,
    )


# -- OpenCV sources ----------------------------------------------------------------------------
def _cv2():
    # Read by OpenCV when it first loads FFmpeg / logs: decoder messages would reach stderr raw
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    try:
        import cv2
    except ImportError as exc:
        raise BackendError(
            f"reading videos and cameras needs OpenCV, which is not installed: {install_hint('video')}"
        ) from exc
    return cv2


def video_frames(path: str | os.PathLike[str], realtime: bool = False) -> Iterator[Frame]:
    """A video file's frames, decoded by OpenCV: ``Frame``s with BGR uint8 (H, W, 3) arrays,
    ``index`` counted from 0 and ``timestamp`` the frame's time in the video (``frame_time``: its
    presentation time, right for a variable frame rate; ``index / fps`` for a constant one).

    ``realtime=True`` paces the frames at the video's frame rate, as a camera would deliver them
    (to try a live loop on a recording). Raises ``InputError`` when the file cannot be opened.
    """
    cv2 = _cv2()
    source = os.fspath(path)
    try:
        problem = (
            None if Path(source).is_file() else "not a file" if Path(source).exists() else "no such file"
        )
    except OSError as exc:  # a name too long for the file system, a folder one may not enter
        problem = f"cannot read the file ({exc.strerror or exc})"
    if problem:
        raise InputError(source, problem)
    try:  # OpenCV says only that it cannot open a file it may not read: "not a video"
        os.close(os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except (OSError, ValueError) as exc:
        raise InputError(source, os_problem(exc)) from None
    capture = _open_capture(cv2, source)
    if not capture.isOpened():
        capture.release()
        raise InputError(
            source,
            "cannot open it as a video ("
            + (_mp4_problem(source) or "not a video, or a format OpenCV's FFmpeg cannot read")
            + ")",
        )
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps or fps != fps or fps <= 0:  # 0 or NaN: a container without a frame rate
        capture.release()
        raise InputError(source, "the video has no frame rate, so its frames have no timestamps")
    width, height = (int(capture.get(p) or 0) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
    problem = _frame_size_problem(width, height)
    if problem:
        capture.release()
        raise InputError(source, problem)
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    count = int(count) if count == count and 0 < count < 1 << 40 else 0  # 0: unknown
    return _video_frames(capture, fps, realtime, source, count)


# The first box of an MP4 / QuickTime file (ISO base media: .mp4, .mov, .m4v, .3gp)
_MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}


def _mp4_problem(source: str) -> str | None:
    """Why an MP4 / QuickTime file that FFmpeg would not open cannot be played, read from its
    top-level boxes (each a 32-bit big-endian size, or 1 and a 64-bit one, then a 4-letter type):
    without its index (the ``moov`` box, written last by most recorders, phones and OpenCV
    included) the frames in it cannot be found. None: not such a file, or its index is there."""
    try:
        with open(source, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            position, boxes = 0, 0
            while position < end and boxes < 100_000:
                f.seek(position)
                header = f.read(16)
                kind = header[4:8]
                if len(header) < 8 or (position == 0 and kind not in _MP4_FIRST_BOXES):
                    return None
                size = int.from_bytes(header[:4], "big")
                if size == 1 and len(header) == 16:  # a 64-bit size follows the type
                    size = int.from_bytes(header[8:16], "big")
                elif size == 0:  # the box runs to the end of the file
                    size = end - position
                if position + size > end and size in _UNWRITTEN_SIZES:  # a size not written yet
                    size = end - position
                if size < 8:
                    return None  # not a box: leave it to the general message
                if position + size > end:  # the file ends inside this box
                    return _CUT_SHORT.format(end=end, whole=position + size)
                if kind == b"moov":
                    return None
                position += size
                boxes += 1
    except OSError:
        return None
    if boxes and position >= end:
        return (
            "an MP4 / QuickTime file without its index, the 'moov' box: a recording that was not "
            "finished, so its frames cannot be found"
        )
    return None


# Android's MPEG4Writer (MediaRecorder, camera apps) writes its mdat's size as "????" (1 and
# "????????" with 64-bit sizes) until the recording is finished: the box runs to the file's end
_UNWRITTEN_SIZES = {int.from_bytes(b"????", "big"), int.from_bytes(b"????????", "big")}

_CUT_SHORT = (
    "an MP4 / QuickTime file cut short, {end:,} bytes where its boxes need {whole:,}, without its "
    "whole index, the 'moov' box: a recording that was not finished, or a copy that stopped "
    "part-way, so its frames cannot be found"
)


def _opencv_name(source: str) -> str | bytes:
    """``source`` as OpenCV can open it: a name that is not UTF-8 (its bytes decoded with
    surrogateescape, as Python gives them) crashes ``cv2.VideoCapture`` given as a str (a
    segmentation fault); its bytes open the file."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(source)
    return source


def _open_capture(cv2, source: str):
    """``cv2.VideoCapture`` of the file ``source``. An OpenCV that takes no bytes for a name
    (4.8, the oldest edgecap[video] allows: cv2.error "Overload resolution failed") opens a name
    that is not UTF-8 through a descriptor of it (Linux: /proc/self/fd/N), closed once open."""
    name = _opencv_name(source)
    try:
        return cv2.VideoCapture(name)
    except (cv2.error, TypeError):
        if not isinstance(name, bytes) or not os.path.isdir("/proc/self/fd"):
            raise
    descriptor = os.open(name, os.O_RDONLY)
    try:
        return cv2.VideoCapture(f"/proc/self/fd/{descriptor}")
    finally:
        os.close(descriptor)


def _frame_size_problem(width: int, height: int) -> str | None:
    """Why frames of this size are refused (the still photos' pixel limit); None: they are not."""
    return pixel_limit_problem(width, height, "video frames are")


def _video_frames(capture, fps: float, realtime: bool, source: str, count: int) -> Iterator[Frame]:
    start = time.perf_counter()
    position = _cv2().CAP_PROP_POS_MSEC
    previous = [-math.inf]  # the last frame's time
    # set by a live stream that stops while its reader waits here for the next frame's time: the
    # wait ends at once (a slow clip's 5 s between frames had kept the file open that long and
    # the loop's end waiting READER_JOIN_S for the reader)
    woken = threading.Event()

    def timestamp(index: int) -> float:
        stamp = previous[0] = frame_time(capture.get(position), index, fps, previous[0])
        if realtime:  # play at the file's frame rate, as a camera would deliver it
            wait = start + stamp - time.perf_counter()
            if wait > 0:
                woken.wait(wait)
        return stamp

    return _read_frames(capture, timestamp, source, count, fps, woken)


def frame_time(position_ms: float, index: int, fps: float, previous: float) -> float:
    """A video frame's time, in seconds from the video's start: its presentation time as the
    decoder gives it (OpenCV's ``CAP_PROP_POS_MSEC`` once the frame is read), which a
    variable-frame-rate video needs (a phone's; frames at 0, 0.5, 1.5, 1.7 s were stamped 0,
    0.68, 1.36, 2.04 as index / its mean rate; an mkv declaring 10 fps, 0.7 s for 5.0 s). Where
    the decoder gives none usable (not a number, negative, 0 after the first frame: no time
    stamp; or before ``previous``, the last frame's), ``index / fps``, or one frame interval after
    the last frame where that is not later: for a constant-rate video all are ``index / fps``. A
    decoder's time within a rounding of the last frame's is the last frame's (a frame pushed one
    interval on is at 0.2 + 0.1 = 0.30000000000000004 s, and the next, stamped 300 ms, at the same
    time, not one interval later)."""
    stamp, counted = position_ms / 1e3, index / fps
    if math.isfinite(stamp) and stamp >= 0 and (index == 0 or stamp > 0) and stamp > previous - _EPSILON_S:
        # a constant rate's time exactly as counted (the decoder's is off by a rounding: 0.30000000000000004)
        return max(counted if abs(stamp - counted) < _EPSILON_S else stamp, previous)
    return counted if counted > previous else previous + 1 / fps


class _CaptureFrames(Iterator[Frame]):
    """The frames of an OpenCV capture (``_frames_of``). ``close()`` releases the capture even
    before the first frame is asked for: closing a generator that never started runs none of its
    code, so a stream closed before its loop would keep the camera or file open."""

    def __init__(
        self,
        capture,
        frames: Generator[Frame, None, None],
        fps: float | None = None,
        woken: threading.Event | None = None,
    ):
        self._capture, self._frames = capture, frames
        self.fps = fps  # a video's frame rate (its header's); None for a camera
        self._woken = woken

    def __next__(self) -> Frame:
        return next(self._frames)

    def interrupt(self) -> None:
        """From another thread: a wait for the next frame's time (``realtime``) ends now."""
        if self._woken is not None:
            self._woken.set()

    def close(self) -> None:
        self._frames.close()
        self._capture.release()


def _read_frames(
    capture,
    timestamp,
    source: str,
    count: int | None = None,
    fps: float | None = None,
    woken: threading.Event | None = None,
) -> Iterator[Frame]:
    """BGR frames from an OpenCV capture until it runs dry; ``timestamp(index)`` dates each.
    A video (``count``: its header's frame count, 0 unknown) that gives no frame, or ends more
    than a few frames short of its count, raises ``InputError`` after its last good frame; so
    does a frame over the pixel limit (a stream whose size changes). Closing it releases the
    capture, read or not."""
    return _CaptureFrames(capture, _frames_of(capture, timestamp, source, count), fps, woken)


def _frames_of(capture, timestamp, source: str, count: int | None) -> Generator[Frame, None, None]:
    index = 0  # the next frame's position in the video, frames that could not be decoded included
    read = 0  # frames decoded
    failed_in_a_row = 0
    # the frames the decoder failed on, with decoded frames after them: how many, and the first
    # (a count, not a list: a long video damaged all along held an int for each)
    unreadable, first_unreadable = 0, 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                # a video (not a camera) may have a damaged frame in the middle: the decoder goes
                # on with the next one, so the frames after it are not lost
                failed_in_a_row += 1
                if count is None or failed_in_a_row > _UNREADABLE_IN_A_ROW or (count and index >= count):
                    break
                index += 1
                continue
            if failed_in_a_row and not unreadable:
                first_unreadable = index - failed_in_a_row
            unreadable += failed_in_a_row
            failed_in_a_row = 0
            problem = _frame_size_problem(*_size(image))
            if problem:
                raise InputError(source, f"frame {index}: {problem}")
            yield Frame(index=index, timestamp=timestamp(index), image=image, color="bgr")
            index += 1
            read += 1
    finally:
        capture.release()
    if count is None:
        return
    if read == 0:
        raise InputError(
            source, "no frame could be decoded (a damaged video, or a codec OpenCV's FFmpeg lacks)"
        )
    index -= max(failed_in_a_row - 1, 0)  # the failed reads at the end: no frames
    if count and index < count - _MISSING_FRAMES_OK:
        raise InputError(
            source,
            f"the video ends after {index} of its {count} frames (cut "
            "short, or frames the decoder cannot read)",
        )
    if unreadable:
        raise InputError(
            source,
            f"{counted(unreadable, 'frame')} could not be decoded (damaged; the first: frame "
            f"{first_unreadable}); "
            f"the frames after {'it' if unreadable == 1 else 'them'} were read",
        )


def _size(image) -> tuple[int, int]:
    shape = getattr(image, "shape", (0, 0))
    return (int(shape[1]), int(shape[0])) if len(shape) >= 2 else (0, 0)


def camera_frames(index: int = 0, width: int | None = None, height: int | None = None) -> Iterator[Frame]:
    """Frames from camera ``index`` (``/dev/video<index>`` on Linux) through OpenCV, until the
    camera stops giving frames: ``Frame``s with BGR uint8 arrays, timestamps in seconds since the
    camera opened. ``width`` / ``height`` request a capture size (the camera may choose another).
    Raises ``InputError`` (a ``ValueError``) when the camera cannot be opened, or for an index
    or a size that is not a whole number in range (0..1023; 1..32768)."""
    # whole numbers of numpy too (np.int64 from an array of camera indices), as OpenCV takes int
    if (
        isinstance(index, bool)
        or not isinstance(index, numbers.Integral)
        or not 0 <= index <= MAX_CAMERA_INDEX
    ):
        raise InputError(
            f"camera {index!r}", f"the camera index must be a whole number from 0 to {MAX_CAMERA_INDEX}"
        )
    index = int(index)
    for name, side in (("width", width), ("height", height)):
        if side is not None and (
            isinstance(side, bool)
            or not isinstance(side, numbers.Integral)
            or not 0 < side <= MAX_CAPTURE_SIDE
        ):
            raise InputError(
                f"camera {index}",
                f"the {name} must be a whole number from 1 to {MAX_CAPTURE_SIDE}, got {side!r}",
            )
    width, height = (None if side is None else int(side) for side in (width, height))
    cv2 = _cv2()
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        raise InputError(f"camera {index}", "cannot open the camera (is it connected, and free?)")
    if width is not None:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    if height is not None:
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    return _camera_frames(capture, index)


def _camera_frames(capture, index: int) -> Iterator[Frame]:
    start = time.perf_counter()
    return _read_frames(capture, lambda i: time.perf_counter() - start, f"camera {index}")
