"""``edgecap.stream``: latest-frame-wins live streams, in-order streams, ``every`` sampling, and the
OpenCV video source.

The live-stream test drives the reader and the captioner with events, not sleeps, so what it
checks does not depend on the machine's speed. Model-backed tests use ``tiny_model_dir``
(tests/conftest.py); videos are made here from the bundled example photos.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import Captioner, images
from edgecap.errors import BackendError, InputError
from edgecap.stream import Frame, StreamStats, _Sampler, caption_stream, camera_frames, video_frames
from helpers import in_forked_child

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
DEADLOCK_GUARD_S = 60  # only ever reached if the stream deadlocks; never a speed limit
VIDEO_SIZE = (320, 240)


def example_frames(size=VIDEO_SIZE) -> list[np.ndarray]:
    """uint8 (H, W, 3) RGB frames of the bundled example photos, resized to ``size``."""
    return [
        np.asarray(Image.open(EXAMPLES / name).convert("RGB").resize(size))
        for name in ("chelsea.png", "coffee.png")
    ]


def make_video(path: Path, seconds: float = 2.0, fps: float = 10.0) -> Path:
    """A Motion-JPEG AVI: the cat for the first half, the coffee cup for the second."""
    cv2 = pytest.importorskip("cv2")
    cat, coffee = example_frames()
    n_frames = round(seconds * fps)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, VIDEO_SIZE)
    assert writer.isOpened(), "OpenCV cannot write MJPG video here"
    for i in range(n_frames):
        writer.write(np.ascontiguousarray((cat if i < n_frames // 2 else coffee)[:, :, ::-1]))
    writer.release()
    return path


class FakeCaptioner:
    """Records what it captions; ``caption`` calls ``hook`` first (to block it)."""

    def __init__(self, hook=None):
        self.hook = hook
        self.seen: list = []

    def caption(self, image, color="rgb", return_attention=False):
        if self.hook is not None:
            self.hook(len(self.seen))
        self.seen.append((image, color))
        return edgecap.Caption(text=f"frame {image}", score=0.0, tokens=["frame"], log_prob=0.0)


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, max_length=6, threads=1)


# -- live: the newest frame wins ---------------------------------------------------------------
def test_live_stream_drops_old_frames_and_keeps_no_backlog():
    """Frame 0 is captioned slowly; meanwhile frames 1..49 arrive. Only the newest of them (49)
    is captioned next; 1..48 are dropped, not queued."""
    n = 50
    captioning, all_read, source_closed = threading.Event(), threading.Event(), threading.Event()

    def source():
        try:
            yield 0
            assert captioning.wait(DEADLOCK_GUARD_S)
            yield from range(1, n)
            all_read.set()
        finally:
            source_closed.set()

    def slow_first_caption(calls):
        if calls == 0:
            captioning.set()
            assert all_read.wait(DEADLOCK_GUARD_S), "the reader stalled"

    fake = FakeCaptioner(slow_first_caption)
    stream = caption_stream(fake, source())
    events = list(stream)
    assert [(e.frame_index, e.dropped) for e in events] == [(0, 0), (n - 1, n - 2)]
    assert [e.caption.text for e in events] == ["frame 0", f"frame {n - 1}"]
    stats = stream.stats
    assert (stats.frames, stats.captioned, stats.dropped, stats.skipped) == (n, 2, n - 2, 0)
    assert source_closed.is_set()


def test_leaving_a_live_stream_early_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for _event in caption_stream(FakeCaptioner(), endless()):
        break
    assert closed.wait(DEADLOCK_GUARD_S), "the camera / video would still be open"


def test_dropped_counts_only_the_frames_since_the_previous_event():
    """Frame 0 is captioned slowly while frames 1..3 arrive: 1 and 2 are dropped and 3 is
    captioned next (dropped=2). Frame 4 comes only once the captioner has taken 3, so it replaces
    nothing: its event says 0 dropped, not 2 again (``dropped``: since the previous event)."""
    first_captioning, first_burst_read, third_taken = threading.Event(), threading.Event(), threading.Event()

    def source():
        yield 0
        assert first_captioning.wait(DEADLOCK_GUARD_S)
        yield from (1, 2, 3)
        first_burst_read.set()
        assert third_taken.wait(DEADLOCK_GUARD_S)
        yield 4

    def hook(calls):
        if calls == 0:
            first_captioning.set()
            assert first_burst_read.wait(DEADLOCK_GUARD_S), "the reader stalled"
        elif calls == 1:  # frame 3 is out of the slot: frame 4 lands in an empty one
            third_taken.set()

    stream = caption_stream(FakeCaptioner(hook), source())
    assert [(e.frame_index, e.dropped) for e in stream] == [(0, 0), (3, 2), (4, 0)]
    assert (stream.stats.frames, stream.stats.captioned, stream.stats.dropped) == (5, 3, 2)


@pytest.mark.parametrize("kind", ["array", "bytearray", "memoryview"])
def test_a_live_frame_keeps_its_pixels_when_the_source_refills_its_buffer(kind):
    """A camera that refills one buffer (a camera SDK's frame pool, a preallocated array; or one
    reused ``bytearray`` of encoded bytes, a JPEG ``Captioner`` decodes, or a ``memoryview`` of
    it) hands the reader the same buffer for every frame. Frame 0 (all 0s) is being captioned
    when the camera refills the buffer with frame 1 (all 1s): each event is the caption of its
    own frame's pixels, frame 0's of 0s, not of the pixels of the frame read after it."""
    buffer = np.zeros((4, 6, 3), np.uint8) if kind == "array" else bytearray(8)
    captioning, refilled = threading.Event(), threading.Event()

    def frame():
        return memoryview(buffer) if kind == "memoryview" else buffer

    def camera():
        yield frame()
        assert captioning.wait(DEADLOCK_GUARD_S)  # frame 0 is with the captioner
        buffer[:] = b"\x01" * 8 if kind != "array" else 1  # the next frame, into the same buffer
        refilled.set()
        yield frame()

    def hook(calls):
        captioning.set()
        assert refilled.wait(DEADLOCK_GUARD_S), "the reader stalled"

    fake = FakeCaptioner(hook)
    events = list(caption_stream(fake, camera()))
    assert [e.frame_index for e in events] == [0, 1]
    assert [max(bytes(image)) for image, _ in fake.seen] == [0, 1]


def test_a_live_frame_keeps_its_pixels_when_the_source_closes_its_pil_image():
    """A source that opens each frame's file lazily inside a ``with`` block (``with
    Image.open(f) as im: yield im``) closes that file when the reader asks for the next frame,
    while frame 0 waits for, or is with, the captioner: frame 0 is still captioned from its
    own pixels (all 0s), frame 1 from its own (all 1s), neither refused as a closed image."""
    captioning, read_on = threading.Event(), threading.Event()

    def encoded(level: int) -> io.BytesIO:
        out = io.BytesIO()
        Image.fromarray(np.full((4, 6, 3), level, np.uint8)).save(out, format="BMP")
        out.seek(0)
        return out

    def camera():
        with Image.open(encoded(0)) as image:  # opened, not yet read
            yield image
        assert captioning.wait(DEADLOCK_GUARD_S)  # frame 0 is with the captioner; its file closed
        read_on.set()
        with Image.open(encoded(1)) as image:
            yield image

    def hook(calls):
        captioning.set()
        assert read_on.wait(DEADLOCK_GUARD_S), "the reader stalled"

    fake = FakeCaptioner(hook)
    events = list(caption_stream(fake, camera()))
    assert [e.frame_index for e in events] == [0, 1]
    assert [int(np.asarray(image).max()) for image, _ in fake.seen] == [0, 1]


def endless_source(closed: threading.Event, read_s: float = 0.0):
    """0, 1, 2, ... (a camera), each read taking ``read_s``; sets ``closed`` when closed."""
    try:
        i = 0
        while True:
            time.sleep(read_s)
            yield i
            i += 1
    finally:
        closed.set()


def test_leaving_a_live_loop_has_closed_the_source_by_the_next_statement(monkeypatch):
    """Leaving the loop waits for the reader's current read (``READER_JOIN_S``, made long here so
    that a slow test machine cannot fail it) and the source is closed when the loop is left: a
    program can reopen the camera on the next line. Each read takes 20 ms, as a camera's would."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", DEADLOCK_GUARD_S)
    closed = threading.Event()
    for _event in caption_stream(FakeCaptioner(), endless_source(closed, read_s=0.02)):
        break
    assert closed.is_set(), "the camera is still open after the loop"


def test_a_program_that_leaves_a_live_loop_exits_though_its_camera_has_stalled():
    """A program that breaks out of a live loop and ends, its camera stalled in a read that
    never returns: the reader thread does not keep the process alive (it is a daemon; Python
    waits at exit for the others). A subprocess, bounded only by the deadlock guard."""
    code = (
        "import threading\n"
        "import edgecap\n"
        "from edgecap.stream import caption_stream\n"
        "class Fake:\n"
        "    def caption(self, image, color='rgb', return_attention=False):\n"
        "        return edgecap.Caption(text='a frame', score=0.0, tokens=['frame'], log_prob=0.0)\n"
        "def camera():\n"
        "    yield 0\n"
        "    threading.Event().wait()  # the next read never returns\n"
        "import edgecap.stream\n"
        "edgecap.stream.READER_JOIN_S = 0.1\n"
        "for event in caption_stream(Fake(), camera()):\n"
        "    print(event.caption.text)\n"
        "    break\n"
    )
    here = os.pathsep.join([str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=DEADLOCK_GUARD_S,
            env={**os.environ, "PYTHONPATH": here},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its frame reader thread kept it alive")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a frame\n"


@pytest.mark.parametrize("live", [True, False])
def test_close_inside_the_loop_ends_it_and_closes_the_source(live, monkeypatch):
    """``close()`` called from the loop's thread: the source is closed when it returns, and the
    loop gives no further event."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", DEADLOCK_GUARD_S)
    closed = threading.Event()
    stream = caption_stream(FakeCaptioner(), endless_source(closed), live=live)
    got = []
    for event in stream:
        got.append(event.frame_index)
        stream.close()
        assert closed.is_set(), "the camera is still open after close()"
    assert len(got) == 1


@pytest.mark.parametrize("live", [True, False])
def test_close_from_another_thread_while_a_frame_is_captioned_ends_the_loop(live):
    """A shutdown hook in another thread calls ``close()`` while the loop captions a frame: the
    call returns (it was ``ValueError: generator already executing``), the loop ends after that
    frame's event (live: the frames the reader holds are not captioned) and the camera is
    closed."""
    closed, outcome = threading.Event(), []

    def hook(calls):
        if calls == 0:

            def shutdown_hook():
                try:
                    stream.close()
                    outcome.append("closed")
                except Exception as exc:  # noqa: BLE001 (what the hook's thread would get)
                    outcome.append(repr(exc))

            hook_thread = threading.Thread(target=shutdown_hook)
            hook_thread.start()
            hook_thread.join(DEADLOCK_GUARD_S)

    stream = caption_stream(FakeCaptioner(hook), endless_source(closed, read_s=0.001), live=live)
    indexes = [e.frame_index for e in stream]
    assert outcome == ["closed"]
    assert len(indexes) == 1, indexes
    assert closed.wait(DEADLOCK_GUARD_S), "the camera is still open"


def test_close_from_another_thread_ends_a_live_loop_waiting_for_a_stalled_camera(monkeypatch):
    """The camera gives frame 0, then stalls (a read that does not return). A watchdog thread
    calls ``close()`` once the camera has stalled and the loop waits for the next frame: the
    loop ends after frame 0's event, within the wait for the reader's read (``READER_JOIN_S``,
    0.1 s here), not when the camera comes back (after a minute, or as soon as the loop ends).
    The watchdog waits for both rather than for a fixed time: on a loaded machine it had closed
    the stream before frame 0 was read, or before the reader had gone back to the camera."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", 0.1)
    loop_ended, stalled, waiting, camera = threading.Event(), threading.Event(), threading.Event(), []

    def stalling_camera():
        yield 0
        camera.append("stalled")
        stalled.set()
        loop_ended.wait(DEADLOCK_GUARD_S)
        camera.append("back")
        yield 1

    fake = FakeCaptioner()
    stream = caption_stream(fake, stalling_camera())

    class Watched(threading.Condition):
        """The stream's lock, which its loop waits on for a frame: says when it waits after
        frame 0 was captioned."""

        def wait(self, timeout=None):
            if fake.seen:
                waiting.set()
            return super().wait(timeout)

    stream._lock = Watched()
    ready = []

    def watchdog():
        ready.extend((stalled.wait(DEADLOCK_GUARD_S), waiting.wait(DEADLOCK_GUARD_S)))
        stream.close()  # whatever came: the loop ends, not waiting for the camera for good

    watchdog_thread = threading.Thread(target=watchdog)
    watchdog_thread.start()
    try:
        indexes = [e.frame_index for e in stream]
        seen_by_then = list(camera)
    finally:
        loop_ended.set()
        watchdog_thread.join(DEADLOCK_GUARD_S)
    assert ready == [True, True], "the camera never stalled, or the loop never waited after frame 0"
    assert indexes == [0] and seen_by_then == ["stalled"]


def test_close_from_another_thread_between_events_ends_the_loop_without_an_error(monkeypatch):
    """A shutdown hook calls ``close()`` while the loop is busy with an event (publishing the
    caption: outside the stream) and the stream is still closing (the reader's stalled read is
    waited for, ``READER_JOIN_S``) when the loop asks for the next event: the loop ends, without
    an error. Before, the loop's next step raised ``ValueError: generator already executing``
    (13 of 40 such closes of a live stream at random moments)."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", 1.0)
    closing, camera_back, closed, outcome = threading.Event(), threading.Event(), threading.Event(), []

    def stalling_camera():
        try:
            yield 0
            camera_back.wait(DEADLOCK_GUARD_S)  # an unplugged camera: the read does not return
            yield 1
        finally:
            closed.set()

    def shutdown_hook():
        closing.set()
        stream.close()
        outcome.append("closed")

    stream = caption_stream(FakeCaptioner(), stalling_camera())
    hook = threading.Thread(target=shutdown_hook)
    indexes = []
    try:
        for event in stream:
            indexes.append(event.frame_index)
            hook.start()
            assert closing.wait(DEADLOCK_GUARD_S)
            time.sleep(0.2)  # the hook is closing the stream, which waits for the stalled read
    finally:
        camera_back.set()
        hook.join(DEADLOCK_GUARD_S)
    assert indexes == [0] and outcome == ["closed"]
    assert closed.wait(DEADLOCK_GUARD_S), "the camera is still open"


class SdkCamera:
    """A camera SDK's frame source (its own iterator): counts its opens (``iter``), reads and
    closes. Such an SDK's close frees a device handle: it must be called once, by one side."""

    def __init__(self):
        self.opens = self.reads = self.closes = 0

    def __iter__(self):
        self.opens += 1
        return self

    def __next__(self):
        self.reads += 1
        return self.reads - 1

    def close(self):
        self.closes += 1


@pytest.mark.parametrize("live", [True, False])
def test_close_from_another_thread_before_the_first_read_closes_the_source_once(live, monkeypatch):
    """A shutdown hook calls ``close()`` from another thread after the loop has begun (the live
    reader thread started; the in-order loop asking for its first frame) but before the stream's
    reading (``_read``) has begun: ``close()`` closes the camera, the reading that begins after
    it must not open, read or close it again. Before, both closed it (``close()`` saw reading not
    yet begun; the reading then began, saw the stop and closed the source in its ``finally``).
    The window is a few bytecodes wide; the gate in front of ``_read`` holds it open."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", DEADLOCK_GUARD_S)
    camera = SdkCamera()
    stream = caption_stream(FakeCaptioner(), camera, live=live)
    about_to_read, go_on = threading.Event(), threading.Event()
    read = stream._read

    def gated_read(**options):  # the thread that will read waits here, before _read's first line
        about_to_read.set()
        assert go_on.wait(DEADLOCK_GUARD_S)
        yield from read(**options)

    stream._read = gated_read
    events: list = []
    loop = threading.Thread(target=lambda: events.extend(stream))
    loop.start()
    try:
        assert about_to_read.wait(DEADLOCK_GUARD_S)
        stream.close()
        assert (camera.opens, camera.reads, camera.closes) == (0, 0, 1)
    finally:
        go_on.set()
        loop.join(DEADLOCK_GUARD_S)
    assert not loop.is_alive() and events == []
    assert (camera.opens, camera.reads, camera.closes) == (0, 0, 1)


@pytest.mark.parametrize("live", [True, False])
def test_a_stream_closed_before_its_loop_closes_its_source_once(live):
    """``close()`` twice (``safe to call more than once``: a shutdown hook, then the end of a
    ``with`` block), then the loop: the camera is closed once and never read; the loop gives no
    event. Before, each ``close()`` closed the camera and the loop opened and closed it again."""
    camera = SdkCamera()
    stream = caption_stream(FakeCaptioner(), camera, live=live)
    stream.close()
    stream.close()
    assert list(stream) == []
    assert (camera.opens, camera.reads, camera.closes) == (0, 0, 1)


@pytest.mark.parametrize("live", [True, False])
def test_source_errors_reach_the_caller(live):
    def broken():
        yield 0
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError, match="camera unplugged"):
        list(caption_stream(FakeCaptioner(), broken(), live=live))


class PickyCaptioner(FakeCaptioner):
    """A FakeCaptioner that refuses None frames as Captioner does (what a failed camera read
    gives), and releases ``handled`` after each frame, taken or refused."""

    def __init__(self):
        super().__init__()
        self.handled = threading.Semaphore(0)

    def caption(self, image, color="rgb", return_attention=False):
        try:
            if image is None:
                raise InputError("<NoneType>", "no image (None)")
            return super().caption(image, color, return_attention)
        finally:
            self.handled.release()


def _paced(frames, captioner):
    """``frames``, each yielded only once the previous one was handled (a live stream then
    drops none of them)."""
    for i, frame in enumerate(frames):
        if i:
            assert captioner.handled.acquire(timeout=DEADLOCK_GUARD_S)
        yield frame


@pytest.mark.parametrize("live", [False, True])
def test_a_bad_frame_with_return_is_an_event_and_the_stream_goes_on(live):
    """A robot's loop keeps captioning after a failed camera read (None): its event holds the
    InputError, the frames after it are captioned, and stats count it as failed."""
    fake = PickyCaptioner()
    stream = caption_stream(fake, _paced([0, None, 2, None, 4], fake), live=live, on_error="return")
    events = list(stream)
    assert [e.frame_index for e in events] == [0, 1, 2, 3, 4]
    assert [e.caption.text if not isinstance(e.caption, InputError) else "error" for e in events] == [
        "frame 0",
        "error",
        "frame 2",
        "error",
        "frame 4",
    ]
    assert str(events[1].caption) == "<NoneType>: no image (None)"
    stats = stream.stats
    assert (stats.frames, stats.captioned, stats.failed, stats.dropped) == (5, 3, 2, 0)
    assert str(stats).endswith(", 2 failed")


@pytest.mark.parametrize("live", [False, True])
def test_a_bad_frame_raises_by_default_after_the_frames_before_it(live):
    fake = PickyCaptioner()
    stream = caption_stream(fake, _paced([0, None, 2], fake), live=live)
    got = []
    with pytest.raises(InputError, match="no image"):
        for event in stream:
            got.append(event.caption.text)
    assert got == ["frame 0"] and stream.stats.failed == 0


@pytest.mark.parametrize("live", [False, True])
def test_a_bad_frame_that_raises_has_closed_the_source(live, monkeypatch):
    """The InputError ends the stream and closes the source: in the caller's ``except`` block
    (where a robot would reopen its camera) the source is already closed. The camera goes on
    giving frames after the bad one, each read taking a millisecond; the loop's end waits for
    the reader's current read (``READER_JOIN_S``, made long here so that a slow test machine
    cannot fail it). The camera's reads after the bad frame do not wait for the captioner: a
    read that waited for a frame never captioned had held the reader past ``READER_JOIN_S``
    whenever it got there before the loop's end stopped it."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", DEADLOCK_GUARD_S)
    fake = PickyCaptioner()
    closed = threading.Event()

    def source():
        try:
            yield from _paced([0, None, 2], fake)  # 2 once None was handled: None not dropped
            i = 3
            while True:
                time.sleep(0.001)
                yield i
                i += 1
        finally:
            closed.set()

    try:
        for _event in caption_stream(fake, source(), live=live):
            pass
    except InputError:
        assert closed.is_set(), "the camera is still open in the except block"
    else:
        pytest.fail("the None frame raised no InputError")


@pytest.mark.parametrize("live", [False, True])
def test_on_error_return_keeps_only_input_errors(live):
    """``on_error="return"`` turns a frame the captioner cannot use (an ``InputError``) into an
    event; any other failure of the captioner (a broken model, a bug) still raises, rather than
    becoming an event whose ``caption`` is neither a Caption nor an InputError."""

    def crash(calls):
        raise RuntimeError("the model crashed")

    with pytest.raises(RuntimeError, match="the model crashed"):
        list(caption_stream(FakeCaptioner(crash), ["a"], live=live, on_error="return"))


# -- in order: every sampled frame -------------------------------------------------------------
def test_in_order_stream_samples_by_frame_time():
    frames = [Frame(index=i, timestamp=i / 10, image=i, color="bgr") for i in range(20)]
    fake = FakeCaptioner()
    stream = caption_stream(fake, frames, every=0.5, live=False)
    events = list(stream)
    assert [e.frame_index for e in events] == [0, 5, 10, 15]
    assert [e.timestamp for e in events] == [0.0, 0.5, 1.0, 1.5]
    assert all(e.dropped == 0 and e.latency_ms >= 0 for e in events)
    assert [color for _, color in fake.seen] == ["bgr"] * 4  # a Frame's own color applies
    stats = stream.stats
    assert (stats.frames, stats.captioned, stats.dropped, stats.skipped) == (20, 4, 0, 16)
    assert stats.elapsed_s == stream.stats.elapsed_s  # frozen once the stream has ended
    assert stats.captions_per_second > 0 and "4 captions from 20 frames" in str(stats)


def test_bare_frames_are_numbered_and_take_the_stream_color():
    fake = FakeCaptioner()
    stream = caption_stream(fake, ["a", "b", "c"], color="bgr", live=False)
    events = list(stream)
    assert [e.frame_index for e in events] == [0, 1, 2]
    assert all(b >= a >= 0 for a, b in zip([e.timestamp for e in events], [e.timestamp for e in events][1:]))
    # seconds since the stream started: within the stream's own elapsed time
    assert events[-1].timestamp <= stream.stats.elapsed_s
    assert fake.seen == [("a", "bgr"), ("b", "bgr"), ("c", "bgr")]


def test_every_grid_starts_at_the_first_frames_timestamp():
    """Frames at 0.7, 1.2, 1.7, 2.2 and 2.7 s with every=1.0: the slots are [0.7, 1.7),
    [1.7, 2.7), [2.7, 3.7) (from the first frame, not from 0 s), so 0.7, 1.7 and 2.7 s are
    captioned; slots from 0 s would take 0.7, 1.2 and 2.2 s."""
    frames = [Frame(index=i, timestamp=0.7 + i / 2, image=i) for i in range(5)]
    events = list(caption_stream(FakeCaptioner(), frames, every=1.0, live=False))
    assert [e.frame_index for e in events] == [0, 2, 4]


def test_every_takes_at_most_one_frame_per_interval_after_a_gap():
    """A source that stalls: frames at 0.0, 2.5, 2.7 and 3.0 s with every=1.0. The slots are
    [0, 1), [1, 2), [2, 3), [3, 4): 0.0, 2.5 and 3.0 s are captioned; 2.7 s shares 2.5 s's slot
    and is skipped (at most one frame per interval, even after an empty interval)."""
    frames = [Frame(index=i, timestamp=t, image=i) for i, t in enumerate([0.0, 2.5, 2.7, 3.0])]
    stream = caption_stream(FakeCaptioner(), frames, every=1.0, live=False)
    assert [e.frame_index for e in stream] == [0, 1, 3]
    assert (stream.stats.frames, stream.stats.skipped) == (4, 1)


def test_every_starts_afresh_when_the_time_goes_back():
    """A recording replayed in a loop: frames at 0-5 s, then 0-6 s again, every=1.0. The replay is
    sampled as the first pass was (all 13 frames, one per interval); before, its frames were
    skipped until the time passed the first pass's 5 s (7 captioned). A frame a little out of
    order (4.9 s after 5.0 s: back by less than an interval) is no new start: on the grid from
    4.0 s it falls in [4, 5), taken already, and is skipped, as 5.2 s in [5, 6) is."""
    stamps = [*range(6), *range(7)]
    frames = [Frame(index=i, timestamp=float(t), image=i) for i, t in enumerate(stamps)]
    events = list(caption_stream(FakeCaptioner(), frames, every=1.0, live=False))
    assert [e.frame_index for e in events] == list(range(13))
    jitter = [Frame(index=i, timestamp=t, image=i) for i, t in enumerate([4.0, 5.0, 4.9, 5.2, 6.0])]
    events = list(caption_stream(FakeCaptioner(), jitter, every=1.0, live=False))
    assert [e.frame_index for e in events] == [0, 1, 4]


def test_every_starts_afresh_only_more_than_an_interval_back_or_back_to_the_grids_start():
    """The rule's boundaries (docs/cameras.md), every=1.0. 0, 1, 2 s, then 1.0 s: exactly one
    interval back from the last frame taken, not more, nor back to the grid's start: no new
    start, and in [1, 2), taken already: skipped; then 0.99 s, more than one before the last
    frame taken (2 s): a new start, taken. 0 s taken, 0.95 s skipped, then -0.5 s: before the
    grid's first frame, after a later one (a clock reset): a new start, taken, and 0.5 s in the
    new grid's [1, 2) too (the rule had asked for more than an interval before the last frame
    taken, 0 s: both skipped). 0 s, 0.5 s, then 0.2 s: a little out of order, no new start."""

    def taken(stamps):
        frames = [Frame(index=i, timestamp=t, image=i) for i, t in enumerate(stamps)]
        return [e.frame_index for e in caption_stream(FakeCaptioner(), frames, every=1.0, live=False)]

    assert taken([0.0, 1.0, 2.0, 1.0, 0.99]) == [0, 1, 2, 4]
    assert taken([0.0, 0.95, -0.5, 0.5]) == [0, 2, 3]
    assert taken([0.0, 0.5, 0.2, 1.0]) == [0, 3]
    # two frames stamped alike at the grid's start (a decoder repeating a stamp): the second is
    # no replay back to the start (it comes from the start, not from a later frame): skipped
    assert taken([0.0, 0.0, 0.5, 1.0]) == [0, 3]


@pytest.mark.parametrize("length_s", [0.5, 1.5, 2.0, 2.5])
def test_a_looped_replay_of_any_length_is_sampled_again_on_every_pass(length_s):
    """A recording looped five times (ros2 bag play --loop: its stamps start again each pass),
    10 frames a second, every=1.0: each pass gets the captions the first got (a 0.5 s loop: its
    first frame; 1.5 and 2.0 s: 0 and 1 s; 2.5 s: 0, 1 and 2 s). A loop of under two intervals
    had been captioned on its first pass only: its frames never fall more than an interval
    before the last one taken."""
    per_pass = round(length_s * 10)
    stamps = [k / 10 for _ in range(5) for k in range(per_pass)]
    frames = [Frame(index=i, timestamp=t, image=i) for i, t in enumerate(stamps)]
    events = list(caption_stream(FakeCaptioner(), frames, every=1.0, live=False))
    first = [k / 10 for k in range(0, per_pass, 10)]
    assert [stamps[e.frame_index] for e in events] == first * 5


def test_without_every_frames_stamped_nan_are_captioned():
    """Only every= samples by the timestamps: without it, frames of your own stamped NaN (no
    stamp known) are each captioned, in order."""
    frames = [Frame(index=i, timestamp=float("nan"), image=i) for i in range(3)]
    events = list(caption_stream(FakeCaptioner(), frames, live=False))
    assert [e.frame_index for e in events] == [0, 1, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_with_a_frame_stamped_nan_or_infinite_says_which_frame(bad):
    """Frames of your own (Frame(index, timestamp, image), e.g. from message stamps) sampled with
    every=: a NaN or infinite timestamp is a ValueError naming the frame and its timestamp
    (before: Python's "cannot convert float NaN to integer", naming neither)."""
    frames = [Frame(index=7, timestamp=0.0, image="a"), Frame(index=8, timestamp=bad, image="b")]
    with pytest.raises(ValueError, match=rf"frame 8: timestamp {bad!r} is not a finite number"):
        list(caption_stream(FakeCaptioner(), frames, every=1.0, live=False))


def test_latency_is_in_milliseconds_and_counts_the_captioning():
    """A caption that takes 50 ms: the event's latency, from the read to the caption, is at
    least 50 (ms), not 0.05."""
    fake = FakeCaptioner(lambda calls: time.sleep(0.05))
    (event,) = caption_stream(fake, ["a"], live=False)
    assert 50 <= event.latency_ms < 60_000


@pytest.mark.parametrize(
    "fps, every, expected",
    [
        (10.0, 0.5, [0, 5, 10, 15]),
        (29.97, 1.0, [0, 30, 60, 90]),  # first frame at or after each whole second
        (10.0, 0.25, [0, 3, 5, 8, 10, 13, 15, 18]),
        (10.0, 0.05, list(range(20))),  # finer than the frame rate: every frame
        (10.0, 0.2, list(range(0, 20, 2))),  # (6 / 10) // 0.2 is 2.0 in floating point, not 3
        # so fine that a slot's number overflows a float (1.8 / 1e-308; 0.1 / 5e-324): every
        # frame, as for any interval finer than the frame rate; it was an OverflowError
        (10.0, 1e-308, list(range(20))),
        (10.0, 5e-324, list(range(20))),
    ],
)
def test_every_grid(fps, every, expected):
    sampler = _Sampler(every)
    n = 20 if fps == 10.0 else 100
    taken = [i for i in range(n) if sampler.take(i / fps)]
    assert taken == expected


@pytest.mark.parametrize("every", [np.float32(0.5), np.float64(0.5), np.int64(1), 1])
def test_every_may_be_a_numpy_number(every):
    """``every`` read from a numpy array or a config parsed into numpy numbers: frames at 0,
    0.25, 0.5 and 1 s give the first of each interval (0.5 s: frames 0, 2, 3; 1 s: 0, 3)."""
    stamps = [0.0, 0.25, 0.5, 1.0]
    frames = [Frame(i, t, i) for i, t in enumerate(stamps)]
    events = caption_stream(FakeCaptioner(), frames, every=every, live=False)
    assert [e.frame_index for e in events] == ([0, 2, 3] if every < 1 else [0, 3])


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"every": -1.0}, {"every": True}, {"color": "bgra"}, {"on_error": "skip"}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        caption_stream(FakeCaptioner(), [], **kwargs)


@pytest.mark.parametrize("live", [True, False])
def test_a_stream_is_iterated_once(live):
    stream = caption_stream(FakeCaptioner(), ["a", "b"], live=live)
    assert len(list(stream)) >= 1
    with pytest.raises(RuntimeError, match="a CaptionStream can be iterated once"):
        iter(stream)


def test_stats_before_start():
    stats = caption_stream(FakeCaptioner(), []).stats
    assert stats == StreamStats() and stats.captions_per_second == stats.frames_per_second == 0.0


def test_stats_rates_and_summary():
    """20 frames in 2 s, 4 captioned, 16 skipped: 2 captions/s, 10 frames/s (the source's rate,
    not the captions'); no ", 0 failed" in the summary when none failed."""
    stats = StreamStats(frames=20, skipped=16, captioned=4, elapsed_s=2.0)
    assert (stats.captions_per_second, stats.frames_per_second) == (2.0, 10.0)
    assert str(stats) == (
        "4 captions from 20 frames in 2.00 s (2.00 captions/s, 10.0 frames/s); "
        "0 dropped, 16 skipped by sampling"
    )


@pytest.mark.parametrize(
    ("frames", "captioned", "start"),
    [
        (1, 1, "1 caption from 1 frame in "),
        (2, 1, "1 caption from 2 frames in "),
        (2, 2, "2 captions from 2 frames in "),
    ],
)
def test_stats_summary_counts_one_caption_and_one_frame_in_the_singular(frames, captioned, start):
    """A one-frame clip's summary ('edgecap caption --video clip.mp4') had said "1 captions from
    1 frames"."""
    assert str(StreamStats(frames=frames, captioned=captioned, elapsed_s=1.0)).startswith(start)


@pytest.mark.parametrize("live", [True, False])
def test_stats_stop_the_clock_when_the_stream_ends(live):
    """``elapsed_s`` of a finished stream is its running time, fixed (so are its rates), live or
    not: no longer than the wall time around the whole stream, and the rates are its counts over
    it (a stream of a fraction of a second too)."""
    began = time.perf_counter()
    stream = caption_stream(FakeCaptioner(), ["a", "b"], live=live)
    list(stream)
    wall = time.perf_counter() - began
    stats = stream.stats
    elapsed = stats.elapsed_s
    time.sleep(0.01)
    stream.close()  # a with block's end, after the loop: the clock stays stopped where it ended
    assert stream.stats.elapsed_s == elapsed > 0
    assert elapsed <= wall
    assert stats.frames == 2 and stats.captioned >= 1  # live: frame a may be dropped for b
    assert (stats.frames_per_second, stats.captions_per_second) == (2 / elapsed, stats.captioned / elapsed)


# -- with the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("live", [False, True])
def test_rgb_and_bgr_frames_give_the_same_captions(captioner, live):
    rgb = example_frames()
    expected = [c.text for c in captioner.caption_batch(rgb)]

    def texts(stream):
        return [e.caption.text for e in stream]

    if live:  # one frame per stream: a live stream may drop all but the newest of several
        got_rgb = [texts(caption_stream(captioner, [f]))[0] for f in rgb]
        got_bgr = [texts(caption_stream(captioner, [f[:, :, ::-1]], color="bgr"))[0] for f in rgb]
    else:
        got_rgb = texts(caption_stream(captioner, rgb, live=False))
        got_bgr = texts(caption_stream(captioner, [f[:, :, ::-1] for f in rgb], color="bgr", live=False))
    assert got_rgb == got_bgr == expected
    bgr_frames = [Frame(i, float(i), f[:, :, ::-1].copy(), "bgr") for i, f in enumerate(rgb)]
    assert texts(caption_stream(captioner, bgr_frames, live=False)) == expected


def test_stream_returns_attention_when_asked(captioner):
    (event,) = caption_stream(captioner, example_frames()[:1], live=False, return_attention=True)
    assert event.caption.attention.shape == (len(event.caption.tokens), 7, 7)
    assert set(event.caption.timings) == {"preprocess_ms", "encode_ms", "decode_ms"}


# -- OpenCV sources ----------------------------------------------------------------------------
def test_video_frames(tmp_path):
    video = make_video(tmp_path / "clip.avi")
    frames = list(video_frames(video))
    assert [f.index for f in frames] == list(range(20))
    assert [f.timestamp for f in frames] == [i / 10 for i in range(20)]
    assert all(
        f.color == "bgr" and f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames
    )
    cat = example_frames()[0].astype(np.float32)
    first = frames[0].image.astype(np.float32)
    # BGR, not RGB: the reversed frame is close to the photo (only JPEG loss), the frame is not
    assert np.abs(first[:, :, ::-1] - cat).mean() < 8 < np.abs(first - cat).mean()


def test_a_variable_frame_rate_video_is_stamped_with_its_frames_own_times(tmp_path, monkeypatch, video_file):
    """A video whose frames are not evenly spaced (a phone's, an animated GIF) is stamped with
    each frame's presentation time, not index / fps: with frames at 0, 0.5, 1.5, 1.7 and 3.0 s a
    container reports the mean rate (5 frames over 3.4 s: 1.47 fps), and index / fps gave 0, 0.68,
    1.36, 2.04, 2.72 s, so --every sampled the wrong frames and --json said the wrong times. A
    real GIF of those frame durations (Pillow), read by the real OpenCV; then the decoder's
    answers where they cannot be used (the fake cv2): no time stamp (0 after the first frame),
    not a number, a time before the last frame's."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "VideoCapture"):
        pytest.skip("OpenCV is a stand-in here")
    gif = tmp_path / "uneven.gif"
    shades = [Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)) for i in range(5)]
    shades[0].save(gif, save_all=True, append_images=shades[1:], duration=[500, 1000, 200, 1300, 400], loop=0)
    assert [f.timestamp for f in video_frames(gif)] == pytest.approx([0.0, 0.5, 1.5, 1.7, 3.0], abs=1e-6)
    # the decoder's time stamps, each usable or not, at 10 fps; expected worked by hand
    times_ms = [0.0, 0.0, 250.0, float("nan"), 400.00000000000006, 900.0, 200.0]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(7), times_ms=times_ms))
    assert [f.timestamp for f in video_frames(video_file)] == [
        0.0,  # the first frame at 0
        0.1,  # no time stamp (0 after the first frame): 1 / 10
        0.25,  # the decoder's
        0.3,  # not a number: 3 / 10
        0.4,  # the decoder's 0.4000000000000001, a constant rate's rounding: 4 / 10 exactly
        0.9,  # the decoder's
        0.9 + 0.1,  # before the last frame's, and 6 / 10 is not later either: one interval on
    ]


def test_video_frames_bad_files(tmp_path):
    pytest.importorskip("cv2")
    with pytest.raises(InputError, match="no such file"):
        video_frames(tmp_path / "missing.mp4")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    with pytest.raises(InputError, match="cannot open it as a video"):
        video_frames(not_video)


def test_a_video_that_may_not_be_read_is_said_to_be_so(tmp_path, monkeypatch):
    """A video file without read permission (another user's recording, one still being written
    by a camera process with mode 0600) is "permission denied", not OpenCV's "not a video"."""
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, VIDEO_SIZE)
    for frame in example_frames():
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    video.chmod(0)
    if os.access(video, os.R_OK):  # root reads it all the same: as OpenCV meets a file it may not read
        real_open, real_capture = os.open, cv2.VideoCapture

        def refused(path, *args, **kwargs):
            if os.fspath(path) == str(video):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refused)
        monkeypatch.setattr(cv2, "VideoCapture", lambda name, *a: real_capture(str(tmp_path / "none.avi")))
    with pytest.raises(InputError, match=f"^{re.escape(str(video))}: permission denied$"):
        video_frames(video)


def _box(kind: bytes, payload: bytes = b"", size: int | None = None) -> bytes:
    """An MP4 box: 32-bit big-endian size (header included), 4-letter type, payload."""
    return (8 + len(payload) if size is None else size).to_bytes(4, "big") + kind + payload


def test_an_unfinished_mp4_is_said_to_be_cut_short(tmp_path):
    """A recording cut off before its recorder closed it (power lost, a copy stopped part-way)
    has no index (the 'moov' box, which OpenCV's mp4v writer, like most recorders, writes last):
    FFmpeg cannot open it, and the error says why rather than 'not a video'."""
    cv2 = pytest.importorskip("cv2")
    whole = tmp_path / "whole.mp4"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"mp4v"), 10, VIDEO_SIZE)
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write mp4v video here")
    for frame in example_frames() * 5:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    data = whole.read_bytes()
    assert len(list(video_frames(whole))) == 10  # the whole file plays
    moov = data.rindex(b"moov") - 4  # where the index box starts (its size field)
    half, no_index = tmp_path / "half.mp4", tmp_path / "no_index.mp4"
    half.write_bytes(data[: len(data) // 2])
    no_index.write_bytes(data[:moov])  # every box whole, the index missing
    cut = f"cut short, {len(data) // 2:,} bytes where its boxes need {moov:,},"
    with pytest.raises(InputError, match=cut):
        video_frames(half)
    unfinished = "without its index, the 'moov' box: a recording that was not finished"
    with pytest.raises(InputError, match=unfinished):
        video_frames(no_index)
    # by hand: a 16-byte ftyp, then an mdat with a 64-bit size (1, then the size after the type)
    ftyp = _box(b"ftyp", b"isom\0\0\0\x01")
    big = tmp_path / "big.mp4"
    big.write_bytes(ftyp + _box(b"mdat", (24).to_bytes(8, "big") + b"\0" * 8, size=1))
    with pytest.raises(InputError, match="without its index"):
        video_frames(big)
    big.write_bytes(ftyp + _box(b"mdat", (1 << 33).to_bytes(8, "big") + b"\0" * 8, size=1))
    with pytest.raises(InputError, match=f"cut short, 40 bytes where its boxes need {16 + (1 << 33):,},"):
        video_frames(big)
    # size 0: the box runs to the end of the file (a recorder's mdat before it is closed)
    big.write_bytes(ftyp + _box(b"mdat", b"\0" * 100, size=0))
    with pytest.raises(InputError, match="without its index"):
        video_frames(big)
    # an index that is there but cut: cut short too
    cut_index = tmp_path / "cut_index.mp4"
    cut_index.write_bytes(data[: moov + 20])
    cut = f"cut short, {moov + 20:,} bytes where its boxes need {len(data):,},"
    with pytest.raises(InputError, match=cut):
        video_frames(cut_index)
    # not an MP4 at all (no known first box): the general message
    other = tmp_path / "other.mp4"
    other.write_bytes(_box(b"junk", b"\0" * 64))
    with pytest.raises(InputError, match="not a video, or a format OpenCV's FFmpeg cannot read"):
        video_frames(other)


def test_an_mp4_that_is_not_cut_short_keeps_the_general_message(tmp_path):
    """The box walk blames a cut recording only where the boxes read as a cut recording: a file
    that FFmpeg cannot open for another reason keeps 'not a video, or a format OpenCV's FFmpeg
    cannot read'. By hand: an empty file (no box at all); whole boxes with their index, the 'moov'
    box, there (its contents not an index FFmpeg can use); a box whose size (4) is less than its
    own 8-byte header. Boxes after the first may be of any type: a cut file with a 'uuid' box
    (as some cameras write) between its ftyp and its mdat is still cut short."""
    pytest.importorskip("cv2")
    general = "not a video, or a format OpenCV's FFmpeg cannot read"
    ftyp = _box(b"ftyp", b"isom\0\0\0\x01")  # 16 bytes
    video = tmp_path / "clip.mp4"
    for data in (
        b"",
        ftyp + _box(b"moov", b"\xff" * 24) + _box(b"mdat", b"\0" * 64),
        ftyp + _box(b"mdat", b"\0" * 64) + _box(b"moov", b"\xff" * 24),
        ftyp + _box(b"free", size=4) + _box(b"mdat", b"\0" * 64),
    ):
        video.write_bytes(data)
        with pytest.raises(InputError, match=general):
            video_frames(video)
    # ftyp (16) + uuid (8 + 16 = 24) + an mdat of 8 + 1,000 bytes, the file cut after 100 of them
    video.write_bytes(ftyp + _box(b"uuid", b"\x01" * 16) + _box(b"mdat", b"\0" * 100, size=1008))
    with pytest.raises(InputError, match="cut short, 148 bytes where its boxes need 1,048,"):
        video_frames(video)


def test_an_unfinished_android_recording_is_said_to_be_without_its_index(tmp_path):
    """Android's MPEG4Writer (MediaRecorder, camera apps) writes its mdat box's size as '????'
    (or, with 64-bit sizes, 1 and '????????') and the real size only when the recording is
    finished: a recording cut off has those placeholders, which are no size (0x3F3F3F3F bytes,
    about 1 GB; 4.6e18), so the message is that of a recording without its index, not 'cut
    short, 124 bytes where its boxes need 1,061,109,583'."""
    pytest.importorskip("cv2")
    ftyp = _box(b"ftyp", b"isom\0\0\0\x01")  # 16 bytes
    video = tmp_path / "VID_20261205_070000.mp4"
    for mdat in (b"????mdat", b"\0\0\0\x01mdat????????"):
        video.write_bytes(ftyp + mdat + b"\0" * 100)
        with pytest.raises(InputError, match="without its index, the 'moov' box: a recording that was not"):
            video_frames(video)
    # a box whose size runs past the end is cut short as before
    video.write_bytes(ftyp + _box(b"mdat", b"\0" * 100, size=1000))
    with pytest.raises(InputError, match="cut short, 124 bytes where its boxes need 1,016,"):
        video_frames(video)


def test_missing_opencv_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    for open_source in (lambda: video_frames(tmp_path / "clip.avi"), lambda: camera_frames(0)):
        with pytest.raises(BackendError, match=r"needs OpenCV.*pip install '\.\[video\]'"):
            open_source()


def test_importing_the_stream_module_does_not_import_opencv():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    code = "import sys, edgecap.stream, edgecap.viz; assert 'cv2' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


class FakeCv2:
    """The few cv2 names ``camera_frames`` uses: a camera that gives ``n_frames`` frames. A fake:
    no real camera is touched (none is attached to the test machines)."""

    CAP_PROP_FRAME_WIDTH, CAP_PROP_FRAME_HEIGHT = 3, 4

    def __init__(self, n_frames: int, opens: bool = True):
        self.n_frames, self.opens = n_frames, opens
        self.captures: list = []

    def VideoCapture(self, index):  # noqa: N802 (OpenCV's name)
        fake = self

        class Capture:
            def __init__(self):
                self.index, self.read_count, self.props = index, 0, {}
                self.released = threading.Event()
                fake.captures.append(self)

            def isOpened(self):  # noqa: N802
                return fake.opens

            def set(self, prop, value):
                self.props[prop] = value

            def read(self):
                if self.read_count >= fake.n_frames:
                    return False, None
                self.read_count += 1
                return True, np.full((4, 6, 3), self.read_count % 256, np.uint8)  # any number of frames

            def release(self):
                self.released.set()

        return Capture()


def test_camera_frames_with_a_fake_opencv(monkeypatch):
    fake = FakeCv2(n_frames=5)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    frames = list(camera_frames(2, width=640, height=480))
    (capture,) = fake.captures
    assert capture.index == 2 and capture.props == {3: 640, 4: 480}
    assert capture.released.is_set()
    assert [f.index for f in frames] == list(range(5))
    assert all(f.color == "bgr" and f.image.shape == (4, 6, 3) for f in frames)
    times = [f.timestamp for f in frames]
    assert times == sorted(times) and times[0] >= 0


def test_camera_is_released_when_a_live_loop_stops_early(monkeypatch):
    fake = FakeCv2(n_frames=10**9)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    for _event in caption_stream(FakeCaptioner(), camera_frames(0)):
        break
    (capture,) = fake.captures
    # the reader thread releases it after its current read
    assert capture.released.wait(DEADLOCK_GUARD_S)


def test_camera_that_does_not_open(monkeypatch):
    fake = FakeCv2(n_frames=0, opens=False)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(InputError, match="camera 7: cannot open the camera"):
        camera_frames(7)
    assert fake.captures[0].released.is_set()


def test_a_camera_that_gives_no_frame_is_an_empty_stream(monkeypatch):
    """A camera's frames run until it stops giving them; one that gives none at once is an empty
    stream (the "no frame could be decoded" error is a video's, whose header promised frames)."""
    fake = FakeCv2(n_frames=0)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    assert list(camera_frames(0)) == []
    assert fake.captures[0].released.is_set()


def test_a_camera_that_stops_giving_frames_is_not_read_again(monkeypatch):
    """A video's damaged frames are read past; a camera's failed read ends its frames at once:
    read again, a camera unplugged or frozen would be waited on up to 100 more times, each read
    up to its driver's timeout."""
    fake = FakeCv2(n_frames=3)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    frames = camera_frames(0)
    (capture,) = fake.captures
    reads = []
    real = capture.read
    capture.read = lambda: reads.append(1) or real()
    assert [f.index for f in frames] == [0, 1, 2]
    assert len(reads) == 4  # three frames, then the one read that failed


def test_a_camera_index_and_size_of_numpy_are_whole_numbers_too(monkeypatch):
    """numpy integers (an index from an array of camera indices) are whole numbers, as they are
    for threads, beam_size and every other option: camera_frames(np.int64(2)) had been refused,
    "the camera index must be a whole number"; OpenCV gets Python ints. A bool, a float (even of a
    whole number) or a string is refused as an index or a side, as are sides out of 1..32768."""
    fake = FakeCv2(n_frames=1)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    assert len(list(camera_frames(np.int64(2), width=np.int32(640), height=np.uint16(480)))) == 1
    (capture,) = fake.captures
    assert capture.index == 2 and capture.props == {3: 640, 4: 480}
    assert type(capture.index) is int and {type(v) for v in capture.props.values()} == {int}
    for bad in (np.float64(2.0), np.bool_(True), True):
        with pytest.raises(InputError, match="the camera index must be a whole number from 0 to 1023"):
            camera_frames(bad)
    for side in (True, 640.0, np.float32(480), 0, 32769, "640"):
        for asked in ({"width": side}, {"height": side}):
            with pytest.raises(
                InputError, match=f"the {next(iter(asked))} must be a whole number from 1 to 32768"
            ):
                camera_frames(2, **asked)


def test_the_highest_camera_index_and_capture_size_are_accepted(monkeypatch):
    """Camera indexes run 0..1023 and capture sides 1..32768, both ends included."""
    fake = FakeCv2(n_frames=1)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    assert len(list(camera_frames(1023, width=32768, height=1))) == 1
    (capture,) = fake.captures
    assert capture.index == 1023 and capture.props == {3: 32768, 4: 1}


def test_closing_a_stream_never_iterated_releases_the_camera(monkeypatch):
    """A program that opens the camera, then stops before its loop (``close()``, or a ``with``
    block left early), gets the camera back at once: it can open it again."""
    fake = FakeCv2(n_frames=10)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    caption_stream(FakeCaptioner(), camera_frames(0)).close()
    with caption_stream(FakeCaptioner(), camera_frames(1)):
        pass
    assert [c.released.is_set() for c in fake.captures] == [True, True]


@pytest.mark.parametrize("live", [True, False])
def test_closing_a_stream_whose_loop_never_began_releases_the_camera(monkeypatch, live):
    """``iter(stream)`` taken (a loop about to begin, ``next(events)`` by hand) but no frame
    asked for: ``close()``, or the end of its ``with`` block, still gives the camera back."""
    fake = FakeCv2(n_frames=10)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    stream = caption_stream(FakeCaptioner(), camera_frames(0), live=live)
    events = iter(stream)
    stream.close()
    with caption_stream(FakeCaptioner(), camera_frames(1), live=live) as stream:
        events = iter(stream)
    assert [c.released.is_set() for c in fake.captures] == [True, True]
    assert list(events) == []


class FakeVideoCv2:
    """The cv2 names ``video_frames`` uses: a video file whose header gives ``fps``, a
    ``width`` x ``height`` frame size and ``count`` frames, and which decodes ``frames`` (uint8
    arrays). A fake, so that the header can say what a real encoder would not write."""

    CAP_PROP_POS_MSEC, CAP_PROP_FRAME_WIDTH, CAP_PROP_FRAME_HEIGHT, CAP_PROP_FPS, CAP_PROP_FRAME_COUNT = (
        0,
        3,
        4,
        5,
        7,
    )

    def __init__(self, frames, fps=10.0, count=None, size=(6, 4), times_ms=None):
        """``times_ms``: each frame's presentation time as the decoder gives it once the frame is
        read (None: 0 for every frame, as OpenCV answers for frames without a time stamp)."""
        self.frames, self.released = list(frames), threading.Event()
        self.header = {3: size[0], 4: size[1], 5: fps, 7: len(self.frames) if count is None else count}
        self.times_ms = times_ms

    def VideoCapture(self, source):  # noqa: N802 (OpenCV's name)
        fake, frames = self, iter(self.frames)
        times = iter(self.times_ms or ())

        class Capture:
            position = 0.0

            def isOpened(self):  # noqa: N802
                return True

            def get(self, prop):
                return self.position if prop == FakeVideoCv2.CAP_PROP_POS_MSEC else fake.header[prop]

            def read(self):
                frame = next(frames, None)
                self.position = next(times, 0.0)
                return (False, None) if frame is None else (True, frame)

            def release(self):
                fake.released.set()

        return Capture()


def small_frames(n: int, shape=(4, 6, 3)) -> list[np.ndarray]:
    return [np.full(shape, i, np.uint8) for i in range(n)]


@pytest.fixture
def video_file(tmp_path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"read by the fake cv2, never by this test")
    return path


def test_a_video_a_frame_or_two_short_of_its_header_is_read_without_error(monkeypatch, video_file):
    """A header count may be an estimate (from the duration): 5 frames where it says 7 are read
    without an error; where it says 8, the video is cut short, after its 5 frames."""
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(5), count=7))
    assert [f.index for f in video_frames(video_file)] == [0, 1, 2, 3, 4]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(5), count=8))
    got = []
    with pytest.raises(InputError, match="the video ends after 5 of its 8 frames"):
        got.extend(video_frames(video_file))
    assert len(got) == 5


def test_realtime_video_frames_come_no_sooner_than_their_timestamps(monkeypatch, video_file):
    """At 20 frames a second, frame i is given no sooner than i / 20 s after the video opened
    (a camera's pace); 5 frames take at least 0.2 s."""
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(5), fps=20.0))
    opened = time.perf_counter()
    for frame in video_frames(video_file, realtime=True):
        assert time.perf_counter() - opened >= frame.timestamp == frame.index / 20


def test_leaving_a_live_loop_over_a_slow_realtime_video_releases_it_at_once(monkeypatch, video_file):
    """A time-lapse clip played with realtime=True (a frame every 1,000 s): leaving the live loop
    after its first caption ends the reader's wait for the next frame's time, and the video is
    released by the next statement (docs/cameras.md: leaving the loop releases it). The wait had
    gone on: the loop's end gave up on the reader after READER_JOIN_S and the file stayed open
    until the next frame's time. ``READER_JOIN_S`` is made long here (still far shorter than a
    frame's time) so that a slow test machine cannot fail it."""
    monkeypatch.setattr("edgecap.stream.READER_JOIN_S", DEADLOCK_GUARD_S)
    fake = FakeVideoCv2(small_frames(3), fps=0.001)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    for _event in caption_stream(FakeCaptioner(), video_frames(video_file, realtime=True)):
        break
    assert fake.released.is_set(), "the video is still open after the loop"


def test_a_video_whose_frame_rate_is_not_a_number_is_refused(monkeypatch, video_file):
    fake = FakeVideoCv2(small_frames(3), fps=float("nan"))
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(InputError, match="the video has no frame rate"):
        video_frames(video_file)
    assert fake.released.is_set()


def test_a_frame_larger_than_its_header_said_is_refused_over_the_pixel_limit(monkeypatch, video_file):
    """The header says 6x4 (24 pixels, under a limit of 30); the third frame is 8x6 (48): its
    frames before it are given, then an InputError naming it."""
    images.set_max_pixels(30)
    frames = [*small_frames(2), np.zeros((6, 8, 3), np.uint8)]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(frames, size=(6, 4)))
    got = []
    with pytest.raises(InputError, match="frame 2: video frames are 8x6 = 48 pixels, over the limit of 30"):
        got.extend(video_frames(video_file))
    assert len(got) == 2


# -- mutation sampling of edgecap/stream.py, second round ---------------------------------------
def test_camera_timestamps_are_seconds_since_the_camera_opened(monkeypatch):
    """Docs: camera frames are stamped "in seconds since the camera opened" (what --camera
    prints). On a clock at 1000 s when the camera opens and moved 0.04 s by each read (25 frames
    a second), three frames are at 0.04, 0.08 and 0.12 s, not 1000.04 ...; a fake camera."""
    import edgecap.stream

    now = [1000.0]
    monkeypatch.setattr(
        edgecap.stream, "time", SimpleNamespace(perf_counter=lambda: now[0], sleep=time.sleep)
    )
    fake = FakeCv2(n_frames=3)
    opened = fake.VideoCapture

    def capture_at_25_fps(index):
        capture = opened(index)
        read = capture.read

        def read_one():
            now[0] += 0.04
            return read()

        capture.read = read_one
        return capture

    fake.VideoCapture = capture_at_25_fps
    monkeypatch.setitem(sys.modules, "cv2", fake)
    assert [f.timestamp for f in camera_frames(0)] == pytest.approx([0.04, 0.08, 0.12])


def test_a_video_that_gives_no_frame_is_an_error_even_when_its_header_has_no_count(monkeypatch, video_file):
    """Docs: a video "that yields no frame at all raises it at once", also one whose header gives
    no frame count (0: unknown, as for some containers), rather than an empty stream and exit 0."""
    fake = FakeVideoCv2([], count=0)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(InputError, match="no frame could be decoded"):
        list(video_frames(video_file))
    assert fake.released.is_set()


@pytest.mark.parametrize("fps", [0.0, -1.0])
def test_a_video_whose_frame_rate_is_zero_or_negative_is_refused(monkeypatch, video_file, fps):
    """A header frame rate of 0 or below (some OpenCV backends give -1 for "unknown") dates no
    frame: refused as NaN is, rather than stamping frames 0, -1, -2 ... s."""
    fake = FakeVideoCv2(small_frames(3), fps=fps)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(InputError, match="the video has no frame rate"):
        video_frames(video_file)
    assert fake.released.is_set()


def test_a_frame_count_no_video_has_is_taken_as_unknown(monkeypatch, video_file):
    """A header count of 2**62 frames (a corrupt header: no video is that long; above 2**40 the
    count is not trusted) is unknown: the video's 5 frames are read without a "the video ends
    after 5 of its ... frames" error."""
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(5), count=float(2**62)))
    assert [f.index for f in video_frames(video_file)] == [0, 1, 2, 3, 4]


def test_a_live_stream_captions_the_frame_read_before_its_source_failed():
    """The newest frame waiting when the source fails (a camera unplugged, a recording cut short
    and played with realtime=True) is still captioned, then the error is raised: frame 0 is being
    captioned while the reader takes frame 1, and the source then raises and the reader ends;
    events 0 and 1, then the RuntimeError (not the error with frame 1 lost)."""
    captioning, failing = threading.Event(), threading.Event()
    before = set(threading.enumerate())

    def source():
        yield "zero"
        assert captioning.wait(DEADLOCK_GUARD_S)
        yield "one"
        failing.set()
        raise RuntimeError("camera unplugged")

    def hook(calls):
        if calls == 0:  # frame 0 in the model until the reader has ended, frame 1 in the slot
            (reader,) = (
                t for t in threading.enumerate() if t.name == "edgecap-frame-reader" and t not in before
            )
            captioning.set()
            assert failing.wait(DEADLOCK_GUARD_S)
            reader.join(DEADLOCK_GUARD_S)
            assert not reader.is_alive()

    got = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        for event in caption_stream(FakeCaptioner(hook), source()):
            got.append((event.frame_index, event.caption.text, event.dropped))
    assert got == [(0, "frame zero", 0), (1, "frame one", 0)]


@pytest.mark.parametrize(
    "bad",
    [
        {"every": -1.0},
        {"color": "hsv"},
        {"on_error": "ignore"},
        {"pick": "sharp"},
        {"pick": "sharpest", "live": False},
        {"min_change": 0},
        {"min_change": 1.5},
        {"min_change": float("nan")},
        {"min_change": True},
        {"min_change": "0.1"},
    ],
)
def test_a_stream_refused_for_its_arguments_closes_the_source_it_was_given(bad):
    """``caption_stream(captioner, camera_frames(0), every=-1)``: the camera was opened for a
    stream that will never read it; the ValueError comes with the camera released (its
    ``close``), not held until the garbage collector finds it."""

    class Camera:
        closed = False

        def __iter__(self):
            return iter(())

        def close(self):
            self.closed = True

    camera = Camera()
    with pytest.raises(ValueError):
        caption_stream(FakeCaptioner(), camera, **bad)
    assert camera.closed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_live_stream_in_a_forked_child_raises_instead_of_waiting_forever():
    """A process forks while a live stream runs (the loop's body starts a fork multiprocessing
    pool): the frames are read by a thread the child does not have, so the child's next step
    waited for a frame forever (the loop hung). It raises a RuntimeError saying so; the parent's
    stream goes on. Guarded: a child still waiting after 30 s is ended by SIGALRM."""

    def frames():
        for i in range(1000):
            time.sleep(0.01)
            yield i

    stream = caption_stream(FakeCaptioner(), frames(), live=True)
    events = iter(stream)
    first = next(events)
    code, said = in_forked_child(lambda: repr(next(events)), alarm_s=30)
    assert code == 0, said
    assert said == repr(
        RuntimeError(
            "this live stream's frames are read by a thread of the process that made it, which a "
            "forked child does not have: make a new caption_stream in this process"
        )
    )
    later = next(events)  # the parent's stream goes on, with newer frames
    assert later.frame_index > first.frame_index
    stream.close()


def test_a_video_damaged_all_along_holds_no_memory_per_damaged_frame(monkeypatch, video_file):
    """Every other frame of 20,000 damaged (from frame 3; the last one, at the end, is no frame):
    what is in use once the last frame is given is what was in use at frame 2,000 (an int was kept
    for each damaged frame, for the count and the first that the error names), and the error still
    says how many and which came first."""
    import gc
    import tracemalloc

    frame = np.zeros((4, 6, 3), np.uint8)
    frames = [None if i % 2 else frame for i in range(20_000)]
    frames[1] = frame  # the first damaged frame is frame 3
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(frames))
    in_use = {}
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        with pytest.raises(
            InputError, match=r"9998 frames could not be decoded \(damaged; the first: frame 3\)"
        ):
            for got in video_frames(video_file):
                if got.index in (2_000, 19_998):
                    gc.collect()
                    in_use[got.index] = tracemalloc.get_traced_memory()[0]
    finally:
        if not tracing:
            tracemalloc.stop()
    per_damaged = (in_use[19_998] - in_use[2_000]) / 9_000
    assert per_damaged < 4, f"{per_damaged:.1f} bytes more in use per damaged frame"


def test_a_damaged_frame_in_the_middle_of_a_video_does_not_end_it(monkeypatch, video_file):
    """The decoder fails on frame 2 of 5 and goes on with frame 3 (what OpenCV does with a
    damaged JPEG in an AVI): frames 3 and 4 are still given, with their own index and time, and
    the error after the last frame names the damaged one."""
    frames = small_frames(5)
    frames[2] = None  # the fake's read gives (False, None) for it
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(frames, count=5))
    got = []
    with pytest.raises(InputError, match=r"1 frame could not be decoded \(damaged; the first: frame 2\)"):
        got.extend(video_frames(video_file))
    assert [(f.index, f.timestamp) for f in got] == [(0, 0.0), (1, 0.1), (3, 0.3), (4, 0.4)]
    assert [int(f.image[0, 0, 0]) for f in got] == [0, 1, 3, 4]


# -- mutation sampling of edgecap/stream.py, third round ----------------------------------------
def _clock(monkeypatch, start=1000.0):
    """``edgecap.stream``'s clock, moved only by the test: a list whose one item is the time."""
    import edgecap.stream

    now = [start]
    monkeypatch.setattr(
        edgecap.stream, "time", SimpleNamespace(perf_counter=lambda: now[0], sleep=time.sleep)
    )
    return now


def test_live_latency_counts_the_wait_for_the_captioner_from_the_read(monkeypatch):
    """Docs: ``latency_ms`` runs "from the moment the reader got the frame to the moment its
    caption was ready (waiting for the captioner included)". On a clock moved only here: frames 0
    and 1 are read at 1000 s; frame 0's caption takes 0.25 s, during which frame 1 waits in the
    slot; frame 1's takes 0.125 s. Latencies 250 and 375 ms (not 125: the wait left out)."""
    now = _clock(monkeypatch)
    captioning, one_read = threading.Event(), threading.Event()

    def source():
        yield 0
        assert captioning.wait(DEADLOCK_GUARD_S)
        yield 1
        one_read.set()  # the reader has stamped frame 1 and put it in the slot

    def hook(calls):
        if calls == 0:
            captioning.set()
            assert one_read.wait(DEADLOCK_GUARD_S), "the reader stalled"
            now[0] += 0.25
        else:
            now[0] += 0.125

    events = list(caption_stream(FakeCaptioner(hook), source(), live=True))
    assert [(e.frame_index, e.dropped, e.latency_ms) for e in events] == [(0, 0, 250.0), (1, 0, 375.0)]


@pytest.mark.parametrize("live", [False, True])
def test_latency_does_not_count_the_wait_for_the_frame(monkeypatch, live):
    """The source takes 2 s to give its frame (a camera's next exposure): that is before the
    reader got the frame, so not latency; the caption's 0.125 s is: 125 ms, not 2125."""
    now = _clock(monkeypatch)

    def slow_camera():
        now[0] += 2.0
        yield "a"

    def hook(calls):
        now[0] += 0.125

    (event,) = caption_stream(FakeCaptioner(hook), slow_camera(), live=live)
    assert event.latency_ms == 125.0


def test_close_from_another_thread_does_not_caption_the_frame_waiting_in_the_slot():
    """A shutdown hook calls ``close()`` while frame 0 is captioned and frame 1 already waits in
    the live slot: the loop ends after frame 0's event (docs: "ends the loop after that frame's
    event"); frame 1 is not captioned, whatever the thread timing."""
    captioning, one_read, outcome = threading.Event(), threading.Event(), []

    def source():
        yield 0
        assert captioning.wait(DEADLOCK_GUARD_S)
        yield 1
        one_read.set()  # frame 1 is in the slot

    def hook(calls):
        if calls == 0:
            captioning.set()
            assert one_read.wait(DEADLOCK_GUARD_S), "the reader stalled"
            closer = threading.Thread(target=lambda: (stream.close(), outcome.append("closed")))
            closer.start()
            closer.join(DEADLOCK_GUARD_S)

    fake = FakeCaptioner(hook)
    stream = caption_stream(fake, source(), live=True)
    assert [e.frame_index for e in stream] == [0]
    assert outcome == ["closed"] and fake.seen == [(0, "rgb")]
    assert (stream.stats.frames, stream.stats.captioned) == (2, 1)


def test_up_to_100_damaged_frames_in_a_row_are_passed_over_and_the_first_is_named(monkeypatch, video_file):
    """Docs: a damaged part of a video "(up to 100 in a row) is passed over". Frames 1 and 2 of 5
    damaged: 3 and 4 are given, and the error names frame 1, the first of the run (not the last,
    2). Frames 1..100 damaged (100 in a row): frame 101 is still given, at 10.1 s. Frames 1..101
    (101 in a row): the video ends there, after 1 of its 103 frames."""
    good = small_frames(1)[0]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2([good, None, None, good, good]))
    got = []
    with pytest.raises(InputError, match=r"2 frames could not be decoded \(damaged; the first: frame 1\)"):
        got.extend(video_frames(video_file))
    assert [f.index for f in got] == [0, 3, 4]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2([good, *[None] * 100, good]))
    got = []
    with pytest.raises(InputError, match=r"100 frames could not be decoded \(damaged; the first: frame 1\)"):
        got.extend(video_frames(video_file))
    assert [(f.index, f.timestamp) for f in got] == [(0, 0.0), (101, 10.1)]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2([good, *[None] * 101, good]))
    got = []
    with pytest.raises(InputError, match="the video ends after 1 of its 103 frames"):
        got.extend(video_frames(video_file))
    assert [f.index for f in got] == [0]


def test_a_frame_at_the_same_time_as_the_one_before_keeps_the_decoders_time(monkeypatch, video_file):
    """``frame_time``: the decoder's time is not used where it is *before* the last frame's; a
    frame at the same time (a repeated frame) keeps it. At 10 fps, times 0, 500, 500, 1000 ms:
    0, 0.5, 0.5, 1.0 s (not 0.6 s, one interval on, for the third). The same time up to a
    rounding too: times 0, 200, 100, 300 ms put the third frame one interval after the second,
    at 0.2 + 0.1 s (0.30000000000000004), and the fourth, stamped 300 ms, at that time, not at
    0.4 s; the times never go back."""
    times_ms = [0.0, 500.0, 500.0, 1000.0]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(4), times_ms=times_ms))
    assert [f.timestamp for f in video_frames(video_file)] == [0.0, 0.5, 0.5, 1.0]
    times_ms = [0.0, 200.0, 100.0, 300.0, 400.0]
    monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(5), times_ms=times_ms))
    stamps = [f.timestamp for f in video_frames(video_file)]
    assert stamps == pytest.approx([0.0, 0.2, 0.3, 0.3, 0.4], abs=1e-12)
    assert stamps == sorted(stamps)


def test_a_frame_the_decoder_stamps_before_the_last_comes_after_it(monkeypatch, video_file):
    """``frame_time``: a decoder's time before the last frame's is not used; the frame's time is
    ``index / fps`` where that is later than the last frame's, else one interval after it, never
    the last frame's own time. At 10 fps, times 0, 200, 100, 400 ms: the third frame's counted
    time (0.2 s) is the second's, so it is 0.3 s; 0, 500, 100 ms: 0.2 s counted is before 0.5,
    so 0.6 s."""
    for times_ms, want in (
        ([0.0, 200.0, 100.0, 400.0], [0.0, 0.2, 0.3, 0.4]),
        ([0.0, 500.0, 100.0], [0.0, 0.5, 0.6]),
    ):
        monkeypatch.setitem(sys.modules, "cv2", FakeVideoCv2(small_frames(len(times_ms)), times_ms=times_ms))
        assert [f.timestamp for f in video_frames(video_file)] == pytest.approx(want, abs=1e-12)


# -- pick="sharpest": the least blurred of the frames that compete for one caption --------------
def motion_blurred(frame: np.ndarray, length: int = 9) -> np.ndarray:
    """``frame`` blurred by horizontal motion: each pixel the mean of ``length`` pixels of its
    row (edges repeated), rounded to uint8: what a camera turning during the exposure gives."""
    padded = np.pad(
        frame.astype(np.float64), ((0, 0), (length // 2, length - 1 - length // 2), (0, 0)), "edge"
    )
    sums = np.concatenate([np.zeros_like(padded[:, :1]), padded.cumsum(1)], 1)
    return np.round((sums[:, length:] - sums[:, :-length]) / length).astype(np.uint8)


def with_noise(frame: np.ndarray, seed: int) -> np.ndarray:
    """``frame`` with sensor noise (s.d. 2 levels): another frame of the same still scene."""
    noise = np.random.default_rng(seed).normal(0.0, 2.0, frame.shape)
    return np.clip(np.round(frame + noise), 0, 255).astype(np.uint8)


def test_sharpness_by_hand():
    """A 6 x 6 grey frame, one lit 2 x 2 block in the middle: its 2 x 2 sums are 0 but the
    centre's 4v; the one inner Laplacian 16v; the sums' s.d. 4v sqrt(1/9 - 1/81) = 4v sqrt(8) / 9:
    sharpness 36 / sqrt(8), whatever v (the exposure)."""
    from edgecap.stream import sharpness

    for level in (10, 200):
        frame = np.zeros((6, 6), np.uint8)
        frame[2:4, 2:4] = level
        assert sharpness(frame) == pytest.approx(36 / np.sqrt(8), rel=1e-9)
    # an odd last row and column are left out of the 2 x 2 blocks
    frame = np.zeros((7, 7), np.uint8)
    frame[2:4, 2:4], frame[6, :], frame[:, 6] = 50, 255, 255
    assert sharpness(frame) == pytest.approx(36 / np.sqrt(8), rel=1e-9)
    # colour: the second channel (green in RGB and in BGR) is the one measured
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[2:4, 2:4, 1] = 90
    assert sharpness(rgb) == pytest.approx(36 / np.sqrt(8), rel=1e-9)
    rgb[..., 1], rgb[2:4, 2:4, 0] = 0, 90  # the block in red only: a uniform green
    assert sharpness(rgb) == 0.0


def documented_sharpness(image: np.ndarray) -> float:
    """``sharpness`` as its docstring defines it, written apart from it in float64: the measured
    channel (the second of three or four, else the first) cut to even sides, summed over 2 x 2
    blocks, the mean absolute 5-point Laplacian of the sums over their standard deviation."""
    channel = image if image.ndim == 2 else image[:, :, 1 if image.shape[2] >= 3 else 0]
    h, w = channel.shape[0] // 2 * 2, channel.shape[1] // 2 * 2
    sums = channel[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    centre = sums[1:-1, 1:-1]
    laplacian = 4 * centre - sums[:-2, 1:-1] - sums[2:, 1:-1] - sums[1:-1, :-2] - sums[1:-1, 2:]
    spread = sums.std()
    return float(np.abs(laplacian).mean() / spread) if spread > 0 else 0.0


@pytest.mark.parametrize("shape", [(13, 10), (13, 10, 1), (13, 10, 2), (12, 11, 3), (13, 10, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_sharpness_is_the_documented_measure_of_any_frame(shape, dtype):
    """Random frames of every layout and dtype the stream measures, odd sides included: the
    score is the documented one (a grey frame's only channel, the grey of grey + alpha, the
    green of RGB / BGR and of RGBA; floats in [0, 1], whose spread is under 1)."""
    from edgecap.stream import sharpness

    rng = np.random.default_rng(sum(shape) + np.dtype(dtype).itemsize)
    top = 1.0 if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max
    frame = (rng.random(shape) * top).astype(dtype)
    assert sharpness(frame) == pytest.approx(documented_sharpness(frame), rel=1e-6)
    assert documented_sharpness(frame) > 0


def test_a_blurred_frame_is_less_sharp_than_the_same_frame_sharp():
    """The example photos: 9 px of motion blur takes a frame under ``SHARPER_BY`` of itself
    sharp, so it gives way; two frames of one still scene differing only in sensor noise stay
    within it (and a brighter exposure of a frame is about as sharp: float frames, exactly)."""
    from edgecap.stream import SHARPER_BY, sharpness

    for photo in example_frames(size=(320, 240)):
        sharp, again = with_noise(photo, 0), with_noise(photo, 1)
        assert sharpness(motion_blurred(sharp)) < SHARPER_BY * sharpness(sharp)
        assert sharpness(again) >= SHARPER_BY * sharpness(sharp)
        assert sharpness(sharp.astype(np.float32) * 0.4) == pytest.approx(sharpness(sharp), rel=1e-6)
        # 8-bit frames are summed in int16: exactly the float result
        assert sharpness(sharp) == pytest.approx(sharpness(sharp.astype(np.float64)), rel=1e-12)
        assert sharpness(Image.fromarray(sharp)) == sharpness(sharp)


@pytest.mark.parametrize(
    "image",
    [
        b"\xff\xd8 compressed",
        "photo.jpg",
        np.zeros((5, 8, 3), np.uint8),  # under 6 x 6
        np.zeros((8, 8, 3, 1), np.uint8),
        np.zeros((8, 8, 5), np.uint8),
        np.zeros((8, 8), bool),
        np.full((8, 8), np.nan, np.float32),
        np.pad(np.full((1, 1), np.inf), 4),  # one infinite pixel: inf - inf in the Laplacian
        np.pad(np.full((1, 1, 3), -np.inf, np.float32), ((4, 4), (4, 4), (0, 0))),
        np.pad(np.full((2, 2), 1e300), 4),  # finite, but not as float32
        np.array([["a"] * 8] * 8),
        Image.new("P", (8, 8)),
        None,
    ],
    ids=[
        "bytes",
        "path",
        "small",
        "4-d",
        "5-channels",
        "bool",
        "nan",
        "inf",
        "-inf",
        "over-float32",
        "strings",
        "palette",
        "none",
    ],
)
def test_sharpness_that_cannot_be_told_is_none(image):
    """None, and no numpy warning (a 5 x 5 frame would have had no inner 2 x 2 block: the
    mean of nothing) on a stream's stderr."""
    import warnings

    from edgecap.stream import sharpness

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharpness(image) is None


def test_sharpness_is_not_measured_over_the_pixel_limit():
    from edgecap.stream import sharpness

    frame = with_noise(np.full((40, 40, 3), 100, np.uint8), 0)
    assert sharpness(frame) is not None
    images.set_max_pixels(1000)  # (conftest restores the limit)
    assert sharpness(frame) is None and sharpness(Image.fromarray(frame)) is None


def burst_while_busy(frames: list, pick: str) -> tuple[list[tuple[int, int]], StreamStats]:
    """Frame 0 is captioned slowly while ``frames`` arrive (indices 1..): the events
    (frame index, dropped) and the stats of a live stream with ``pick``."""
    captioning, all_read = threading.Event(), threading.Event()

    def source():
        yield frames[0]
        assert captioning.wait(DEADLOCK_GUARD_S)
        yield from frames[1:]
        all_read.set()

    def hook(calls):
        if calls == 0:
            captioning.set()
            assert all_read.wait(DEADLOCK_GUARD_S), "the reader stalled"

    stream = caption_stream(FakeCaptioner(hook), source(), pick=pick)
    return [(e.frame_index, e.dropped) for e in stream], stream.stats


def test_a_live_stream_picks_the_sharpest_frame_that_arrived_while_it_was_busy():
    """While frame 0 is captioned, a sharp frame (1) and two blurred ones (2, 3) arrive: with
    pick="sharpest" frame 1 is captioned next, the blurred ones dropped; the newest (3) without."""
    photo = example_frames()[0]
    frames = [
        with_noise(photo, 0),
        with_noise(photo, 1),
        motion_blurred(with_noise(photo, 2)),
        motion_blurred(with_noise(photo, 3), 5),
    ]
    events, stats = burst_while_busy(frames, "sharpest")
    assert events == [(0, 0), (1, 2)]
    assert (stats.frames, stats.captioned, stats.dropped) == (4, 2, 2)
    assert burst_while_busy(frames, "newest")[0] == [(0, 0), (3, 2)]


def test_of_frames_about_as_sharp_the_newest_is_picked():
    """A still scene: frames 1-3 differ only in noise, so the newest (3) is captioned, as
    without the pick; a blurred frame (2) between sharp ones does not hold back the newer sharp
    frame (3) either."""
    photo = example_frames()[1]
    still = [with_noise(photo, seed) for seed in range(4)]
    assert burst_while_busy(still, "sharpest")[0] == [(0, 0), (3, 2)]
    mixed = [still[0], still[1], motion_blurred(still[2]), still[3]]
    assert burst_while_busy(mixed, "sharpest")[0] == [(0, 0), (3, 2)]


def test_frames_whose_sharpness_cannot_be_told_are_picked_as_the_newest():
    """Compressed frames (bytes): the newest wins; a sharp array then takes the place of the
    bytes, and a blurred one after it does not take the sharp one's."""
    photo = example_frames()[0]
    sharp, blurred = with_noise(photo, 0), motion_blurred(with_noise(photo, 1))
    assert burst_while_busy([sharp, sharp, b"jpeg one", b"jpeg two"], "sharpest")[0] == [(0, 0), (3, 2)]
    assert burst_while_busy([sharp, b"jpeg", sharp, blurred], "sharpest")[0] == [(0, 0), (2, 2)]


def test_an_in_order_stream_captions_the_sharpest_frame_of_each_interval():
    """live=False with every=0.5 s: frames 0-4 (0.0-0.4 s) are one interval, 5-7 (0.5-0.7 s)
    the next, 8-9 (1.0, 1.1 s) the last. Of the first, the sharp frame 2 among blurred ones; of
    the second, the newest of two about as sharp (7); of the last, all blurred, the less blurred
    (9), however much sharper the frames of the interval before were. Each event is stamped with
    its frame's own time; the others count as skipped."""
    photo = example_frames()[0]
    sharp = [with_noise(photo, seed) for seed in range(10)]
    blur = {0: 5, 1: 9, 3: 3, 4: 9, 5: 9, 8: 9, 9: 5}  # frame: px of motion blur
    images_ = [motion_blurred(frame, blur[i]) if i in blur else frame for i, frame in enumerate(sharp)]
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0, 1.1]
    frames = [Frame(index=i, timestamp=t, image=image) for i, (t, image) in enumerate(zip(times, images_))]
    fake = FakeCaptioner()
    stream = caption_stream(fake, frames, every=0.5, live=False, pick="sharpest")
    events = list(stream)
    assert [(e.frame_index, e.timestamp, e.dropped) for e in events] == [
        (2, 0.2, 0),
        (7, 0.7, 0),
        (9, 1.1, 0),
    ]
    assert all(np.array_equal(image, images_[i]) for (image, _), i in zip(fake.seen, (2, 7, 9), strict=True))
    stats = stream.stats
    assert (stats.frames, stats.captioned, stats.skipped, stats.dropped) == (10, 3, 7, 0)
    # the default: each interval's first frame
    assert [e.frame_index for e in caption_stream(FakeCaptioner(), frames, every=0.5, live=False)] == [
        0,
        5,
        8,
    ]


def test_an_in_order_stream_holds_its_own_copy_of_the_frame_it_picked():
    """A source that refills one buffer: the frame picked in an interval is captioned once the
    next interval begins, by when the buffer holds another frame; it is captioned as it was."""
    photo = example_frames()[0]
    contents = [
        motion_blurred(with_noise(photo, 0)),
        with_noise(photo, 1),
        motion_blurred(with_noise(photo, 2)),
        with_noise(photo, 3),
    ]
    buffer = np.empty_like(contents[0])

    def source():
        for i, content in enumerate(contents):
            buffer[...] = content
            yield Frame(index=i, timestamp=i * 0.3, image=buffer)

    fake = FakeCaptioner()
    events = list(caption_stream(fake, source(), every=0.5, live=False, pick="sharpest"))
    assert [e.frame_index for e in events] == [1, 3]
    assert np.array_equal(fake.seen[0][0], contents[1]) and np.array_equal(fake.seen[1][0], contents[3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pick": "sharp"}, "pick must be one of ('newest', 'sharpest'), got 'sharp'"),
        ({"pick": "sharpest", "live": False}, "with live=False and no every, every frame is captioned"),
    ],
)
def test_a_pick_that_cannot_be_made_is_refused_saying_why(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        caption_stream(FakeCaptioner(), [], **kwargs)
    caption_stream(FakeCaptioner(), [], pick="sharpest", live=False, every=1.0)  # with every: fine


@pytest.mark.parametrize(
    "scores, picked",
    [
        ([5.0, 10.0, 9.5, 8.6], 2),  # 8.6 is under 0.9 of the sharpest (10), not of the one held (9.5)
        ([5.0, 10.0, 9.0], 2),  # exactly 0.9 of the sharpest: the newer frame
        ([5.0, 10.0, 8.99], 1),
        ([5.0, 10.0, 3.0, 9.2], 3),  # a newer frame near the sharpest wins over the one held
        ([5.0, 1.0, 2.0, 1.9], 3),  # the first frame after the take is only the first to compete
    ],
)
def test_the_pick_holds_the_newest_frame_within_sharper_by_of_the_sharpest(monkeypatch, scores, picked):
    """The rule alone, with each frame's sharpness given (``sharpness`` read from the frame):
    a newer frame takes the held one's place unless it is under ``SHARPER_BY`` (0.9) of the
    sharpest frame since the captioner last took one."""
    import edgecap.stream as stream_module

    assert stream_module.SHARPER_BY == 0.9
    monkeypatch.setattr(stream_module, "sharpness", lambda image: float(image[0, 0]))
    frames = [np.full((2, 2), score) for score in scores]
    assert burst_while_busy(frames, "sharpest")[0] == [(0, 0), (picked, len(scores) - 2)]


def test_close_from_another_thread_does_not_caption_the_frame_an_in_order_pick_holds():
    """In-order, pick="sharpest": frame 0's caption is made when frame 1 begins the next
    interval, and frame 1 is held for its own. A shutdown hook's ``close()`` during frame 0's
    caption ends the loop after its event; frame 1 is not captioned."""
    photo = example_frames()[0]
    frames = [Frame(index=i, timestamp=float(i), image=with_noise(photo, i)) for i in range(3)]
    outcome = []

    def hook(calls):
        if calls == 0:
            closer = threading.Thread(target=lambda: (stream.close(), outcome.append("closed")))
            closer.start()
            closer.join(DEADLOCK_GUARD_S)

    fake = FakeCaptioner(hook)
    stream = caption_stream(fake, frames, every=0.5, live=False, pick="sharpest")
    assert [e.frame_index for e in stream] == [0]
    assert outcome == ["closed"] and len(fake.seen) == 1
    assert (stream.stats.frames, stream.stats.captioned) == (2, 1)


def undecodable_pil_images() -> list[Image.Image]:
    """PIL images that cannot be decoded: a JPEG cut short (opened lazily, as ``Image.open``
    does) and one whose file was closed before it was read."""
    encoded = io.BytesIO()
    Image.fromarray(example_frames(size=(64, 48))[0]).save(encoded, "JPEG")
    data = encoded.getvalue()
    closed = Image.open(io.BytesIO(data))
    closed.close()
    return [Image.open(io.BytesIO(data[: len(data) // 2])), closed]


@pytest.mark.parametrize("which", [0, 1], ids=["truncated", "closed"])
def test_sharpness_of_a_pil_image_that_cannot_be_decoded_is_none(which):
    """It is not measured (the captioner then says what is wrong with it), rather than its
    decoder's error raised out of ``sharpness``."""
    from edgecap.stream import sharpness

    assert sharpness(undecodable_pil_images()[which]) is None


@pytest.mark.parametrize("live", [False, True])
def test_a_pil_image_that_cannot_be_decoded_is_an_input_error_with_pick_sharpest(captioner, live):
    """``caption_stream(..., pick="sharpest", on_error="return")`` over a cut-short JPEG opened
    with ``Image.open``: its event holds the captioner's InputError and the stream goes on, as
    with pick="newest"; measuring its sharpness had raised the decoder's OSError out of the loop
    (``image file is truncated``), ending the stream."""
    truncated = undecodable_pil_images()[0]
    frames = [Frame(index=0, timestamp=0.0, image=truncated)]
    events = list(caption_stream(captioner, frames, every=1.0, live=live, pick="sharpest", on_error="return"))
    assert [(e.frame_index, type(e.caption)) for e in events] == [(0, InputError)]
    assert "truncated" in str(events[0].caption)


def test_pick_sharpest_never_takes_a_frame_that_cannot_be_captioned_over_one_that_can():
    """pick="sharpest": a frame that cannot be captioned at all (None from a failed camera read,
    a recording's frame whose ``image`` is its InputError) is no competitor for one that can: a
    live stream keeps the sharp frame that arrived before it, and an in-order interval's usable
    frame is captioned rather than the stream raising the bad frame's InputError. Such a frame
    is still captioned when no usable frame competes with it (its error is not hidden), and a
    usable frame after it takes its place."""
    photo = example_frames()[0]
    sharp = with_noise(photo, 0)
    bad = InputError("/camera at 0.300s", "cannot decode the frame")
    assert burst_while_busy([sharp, sharp, None], "sharpest")[0] == [(0, 0), (1, 1)]
    assert burst_while_busy([sharp, sharp, bad], "sharpest")[0] == [(0, 0), (1, 1)]
    assert burst_while_busy([sharp, b"jpeg", None], "sharpest")[0] == [(0, 0), (1, 1)]  # unmeasured
    assert burst_while_busy([sharp, None, sharp], "sharpest")[0] == [(0, 0), (2, 1)]
    assert burst_while_busy([sharp, sharp, None], "newest")[0] == [(0, 0), (2, 1)]  # as before
    images_ = [sharp, bad, None, bad, sharp, None]
    times = [0.0, 0.2, 0.5, 0.7, 1.0, 1.2]  # every=0.5: frames 0-1, 2-3 and 4-5 compete
    frames = [Frame(index=i, timestamp=t, image=image) for i, (t, image) in enumerate(zip(times, images_))]
    stream = caption_stream(
        PickyCaptioner(), frames, every=0.5, live=False, pick="sharpest", on_error="return"
    )
    events = list(stream)
    assert [(e.frame_index, isinstance(e.caption, InputError)) for e in events] == [
        (0, False),
        (3, True),
        (4, False),
    ]
    assert (stream.stats.captioned, stream.stats.failed, stream.stats.skipped) == (2, 1, 3)


def test_an_in_order_interval_of_frames_not_measured_captions_its_first_as_without_the_pick():
    """Compressed frames (a recording's compressed images, JPEG bytes) are not measured, so they
    are taken as without the pick: in order, each interval's first frame, not its last (its
    caption up to an interval later in the video than pick="newest"'s); a sharp array after a
    frame not measured still takes its place, and a frame not measured does not take a sharp
    one's."""
    sharp = with_noise(example_frames()[0], 0)
    times = [0.0, 0.2, 0.4, 0.5, 0.7, 1.0, 1.2]  # every=0.5: frames 0-2, 3-4 and 5-6 compete
    images_ = [b"jpeg 0", b"jpeg 1", b"jpeg 2", b"jpeg 3", sharp, sharp, b"jpeg 6"]
    frames = [Frame(index=i, timestamp=t, image=image) for i, (t, image) in enumerate(zip(times, images_))]
    picked = [
        e.frame_index for e in caption_stream(FakeCaptioner(), frames, every=0.5, live=False, pick="sharpest")
    ]
    assert picked == [0, 4, 5]
    assert [e.frame_index for e in caption_stream(FakeCaptioner(), frames, every=0.5, live=False)] == [
        0,
        3,
        5,
    ]


def test_frames_that_carry_their_sharpness_are_picked_by_it_and_not_measured(monkeypatch):
    """``Frame.sharpness``: a score the source already knows (the ROS 2 node's, measured on a
    raw message's own bytes) is the frame's, and ``sharpness`` is never called: here the given
    scores rank the frames the other way round from their pixels, and the pick follows the
    scores, live and in order. A frame that cannot be captioned at all (None) stays unusable
    whatever score it carries; a NaN given counts as not measured."""
    import edgecap.stream as stream_module

    def not_measured(image):
        raise AssertionError("a frame that carries its sharpness was measured")

    monkeypatch.setattr(stream_module, "sharpness", not_measured)
    photo = example_frames()[0]
    sharp, blurred = with_noise(photo, 0), motion_blurred(with_noise(photo, 1))

    def frames(*scored):
        return [
            Frame(index=i, timestamp=i * 0.1, image=image, sharpness=score)
            for i, (image, score) in enumerate(scored)
        ]

    # the blurred frame 2 given 10.0 wins over the sharp frame 1 given 1.0; frame 3 (2.0) is
    # under 0.9 of it
    burst = frames((sharp, 5.0), (sharp, 1.0), (blurred, 10.0), (sharp, 2.0))
    assert burst_while_busy(burst, "sharpest")[0] == [(0, 0), (2, 2)]
    in_order = caption_stream(FakeCaptioner(), burst[1:], every=1.0, live=False, pick="sharpest")
    assert [e.frame_index for e in in_order] == [2]
    assert burst_while_busy(frames((sharp, 5.0), (sharp, 1.0), (None, 100.0)), "sharpest")[0] == [
        (0, 0),
        (1, 1),
    ]
    # frame 2's NaN takes frame 1's place as a frame not measured does, and frame 3, measured,
    # then takes its place (a NaN held had kept every later frame out)
    nan = float("nan")
    burst = frames((sharp, 5.0), (sharp, 10.0), (sharp, nan), (blurred, 1.0))
    assert burst_while_busy(burst, "sharpest")[0] == [(0, 0), (3, 2)]
    # a negative score (no sharpness is under 0: a source's mistake) counts as not measured too,
    # not as a score that reverses the comparison (-11.0 is not under 0.9 x -10.0: the older
    # frame had been kept)
    burst = frames((sharp, 5.0), (sharp, 10.0), (sharp, -1.0), (blurred, 1.0))
    assert burst_while_busy(burst, "sharpest")[0] == [(0, 0), (3, 2)]
    burst = frames((sharp, 5.0), (sharp, -10.0), (sharp, -11.0))
    assert burst_while_busy(burst, "sharpest")[0] == [(0, 0), (2, 1)]
    # 0.0 (a uniform frame's sharpness) is a score, the least: frame 1 (10.0) is kept over it
    burst = frames((sharp, 5.0), (sharp, 10.0), (sharp, 0.0))
    assert burst_while_busy(burst, "sharpest")[0] == [(0, 0), (1, 1)]


def test_a_frames_sharpness_is_in_its_repr_and_equality_when_given():
    """A frame without a score reads as before; one with a score shows it, and two frames
    differing only in their scores are not equal."""
    plain = Frame(index=1, timestamp=0.5, image=b"jpeg", name="/cam frame 1")
    assert repr(plain) == (
        "Frame(index=1, timestamp=0.5, image=<bytes (4 bytes)>, color='rgb', name='/cam frame 1')"
    )
    scored = Frame(index=1, timestamp=0.5, image=b"jpeg", name="/cam frame 1", sharpness=2.5)
    assert repr(scored) == repr(plain)[:-1] + ", sharpness=2.5)"
    assert scored == Frame(index=1, timestamp=0.5, image=b"jpeg", name="/cam frame 1", sharpness=2.5)
    assert scored != plain and scored != Frame(1, 0.5, b"jpeg", name="/cam frame 1", sharpness=2.6)


def test_an_in_order_pick_is_captioned_before_the_error_that_ends_its_source():
    """A video cut short raises its InputError after its readable frames (``video_frames``):
    with pick="sharpest" the last interval's pick is captioned before the error is raised, as
    every frame read before it is without the pick and as a live stream's frame read before it
    is; it had been lost (frames 1 and 3 captioned, not 4)."""
    photo = example_frames()[0]

    def source():
        for i in range(5):  # every=0.5: frames 0-1 (0.0, 0.3 s), 2-3 (0.6, 0.9 s), 4 (1.2 s)
            yield Frame(index=i, timestamp=i * 0.3, image=with_noise(photo, i))
        raise InputError("clip.avi", "ends after 5 of its 10 frames")

    got = []
    with pytest.raises(InputError, match="ends after 5 of its 10 frames"):
        for event in caption_stream(FakeCaptioner(), source(), every=0.5, live=False, pick="sharpest"):
            got.append(event.frame_index)
    assert got == [1, 3, 4]


@pytest.mark.parametrize("live", [True, False])
def test_a_frames_sharpness_may_be_a_function_called_only_when_the_frame_competes(live):
    """``Frame.sharpness`` as a function (the ROS 2 node's: a raw message measured on its own
    bytes): called for the frames ``every`` lets compete, never for those it skips live (0.4 and
    0.8 s, with every=1 s); in order every frame of an interval competes, so each is measured.
    What it returns is the frame's score (None: taken as not measured), and a frame's repr says
    it is measured when it competes rather than naming the function."""
    called = []

    def measure(i, score):
        def measured():
            called.append(i)
            return score

        return measured

    times, scores = [0.0, 0.4, 0.8, 1.2, 1.6], [1.0, 9.0, 9.0, None, 2.0]
    frames = [
        Frame(index=i, timestamp=t, image=np.zeros((8, 8, 3), np.uint8), sharpness=measure(i, s))
        for i, (t, s) in enumerate(zip(times, scores))
    ]
    events = list(caption_stream(FakeCaptioner(), frames, every=1.0, live=live, pick="sharpest"))
    if live:  # which of the two is captioned depends on when the loop takes frame 0
        assert called == [0, 3] and [e.frame_index for e in events][-1] == 3
    else:  # 0-0.8 s: 9.0 (frame 1, then 2 as sharp and newer); 1.2-1.6 s: frame 3 not measured
        # (None), then frame 4, measured, in its place
        assert called == [0, 1, 2, 3, 4] and [e.frame_index for e in events] == [2, 4]
    assert repr(frames[0]).endswith(", sharpness=<measured when it competes>)")


# -- min_change: a scene captioned once, again when its view changed ---------------------------
def halves(flipped: int = 0, low: int = 0, high: int = 100) -> np.ndarray:
    """A 32 x 32 grey frame whose 2 x 2-pixel cells (16 x 16 of them) are ``low`` on the left
    half and ``high`` on the right, the first ``flipped`` cells of the left half (row by row)
    made ``high``."""
    cells = np.full((16, 16), low, np.uint8)
    cells[:, 8:] = high
    cells.reshape(-1)[[row * 16 + column for row in range(16) for column in range(8)][:flipped]] = high
    return np.kron(cells, np.ones((2, 2), np.uint8))


def test_view_change_by_hand():
    """Half the cells at 0, half at 100: standardised -1 and +1. One cell flipped to 100 (129
    of 256 lit: mean 50.39, s.d. 49.998) moves the others by under 0.01 and itself by 1.99: 1 of
    256 cells changed. The same frame twice as bright (0 and 200) is no change; the left and
    right halves swapped, every cell."""
    from edgecap.stream import view_change

    assert view_change(halves(), halves(1)) == 1 / 256
    assert view_change(halves(), halves(13)) == 13 / 256
    assert view_change(halves(), halves(high=200)) == 0.0
    assert view_change(halves(), halves(high=200)[:, ::-1]) == 1.0
    assert (
        view_change(halves(), np.dstack([np.zeros_like(halves()), halves(5), halves()])) == 5 / 256
    )  # green
    assert view_change(Image.fromarray(halves()), halves(2).astype(np.float32)) == 2 / 256
    assert view_change(np.zeros((32, 32), np.uint8), np.full((32, 32), 7, np.uint8)) == 0.0  # uniform

    # a lens cap: two frames of a dark sensor's noise (level 3, s.d. 2), whose cells (1,200
    # pixels each) differ by hundredths of a level: within a level of each other, flat, no change
    dark = [with_noise(np.full((480, 640, 3), 3, np.uint8), seed) for seed in (0, 1)]
    assert view_change(*dark) == 0.0


def documented_cells(image: np.ndarray) -> np.ndarray:
    """``view_change``'s standardised cells as its docstring defines them, written apart from
    it: the measured channel's 16 x 16 cells (cell i spanning rows i * H // 16 to (i + 1) * H //
    16, and the same for columns), each cell's mean level, less the cells' mean, over their
    standard deviation floored at one 8-bit level of the frame's range."""
    channel = image if image.ndim == 2 else image[:, :, 1 if image.shape[2] >= 3 else 0]
    height, width = channel.shape
    cells = np.array(
        [
            [
                channel[r * height // 16 : (r + 1) * height // 16, c * width // 16 : (c + 1) * width // 16]
                .astype(np.float64)
                .mean()
                for c in range(16)
            ]
            for r in range(16)
        ]
    )
    level = np.iinfo(channel.dtype).max / 255 if channel.dtype.kind in "ui" else 1 / 255
    return (cells - cells.mean()) / max(cells.std(), level)


@pytest.mark.parametrize(("size", "channels"), [((37, 53), 0), ((48, 64), 3), ((50, 41), 4), ((16, 16), 1)])
def test_view_change_is_the_documented_share_of_cells_moved(size, channels):
    """Random pairs of frames of sides that 16 does and does not divide: the share of cells
    whose standardised level moved by more than 0.5, as documented (each pair a blend of two
    random frames, so that the shares run from none to most of the view)."""
    from edgecap.stream import view_change

    rng = np.random.default_rng(size[0] * 100 + channels)
    shape = size if channels == 0 else (*size, channels)
    shares = []
    for mix in (0.0, 0.1, 0.3, 0.6, 1.0):
        first, other = rng.integers(0, 256, shape), rng.integers(0, 256, shape)
        second = np.round((1 - mix) * first + mix * other)
        first, second = first.astype(np.uint8), second.astype(np.uint8)
        moved = np.abs(documented_cells(first) - documented_cells(second)) > 0.5
        shares.append(view_change(first, second))
        assert shares[-1] == np.count_nonzero(moved) / 256
    assert shares[0] == 0.0 and shares[-1] > 0.5


def test_cells_a_level_or_two_apart_are_measured_in_levels():
    """The spread is floored at one 8-bit level: cells 0 and 2 levels (a spread of exactly 1
    level) standardise to -1 and +1 as any other frame's, and the halves swapped are every
    cell changed; cells 0 and 1 (a spread of half a level) are measured in whole levels (+-0.5),
    so a cell moving by a level has changed and one moving by a quarter (one pixel of a cell's
    four) has not."""
    from edgecap.stream import view_change

    assert view_change(halves(high=2), halves(high=2)[:, ::-1]) == 1.0
    assert view_change(halves(high=1), halves(high=1)[:, ::-1]) == 1.0
    quarter = halves(high=1)
    quarter[0, 0] = 1
    assert view_change(halves(high=1), quarter) == 0.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_a_lens_cap_in_float_is_no_change_either(dtype):
    """A float frame is read in [0, 1] (the captioner's convention): the same lens cap's noise
    as the uint8 frames above, divided by 255, is within a level of 8 bits too, and no change
    (it had been 72% of the view: no flat floor for floats, the noise magnified to a change);
    a scene in float measures as it does in uint8."""
    from edgecap.stream import view_change

    dark = [with_noise(np.full((480, 640, 3), 3, np.uint8), seed) for seed in (0, 1)]
    assert view_change(*(frame.astype(dtype) / dtype(255) for frame in dark)) == 0.0
    assert view_change(*(halves(flipped).astype(dtype) / dtype(255) for flipped in (0, 13))) == 13 / 256


def test_a_still_scene_is_no_change_and_a_tenth_of_it_replaced_is():
    """The example photos: sensor noise, the exposure at 0.6 and the view moved by a pixel are
    under ``MIN_CHANGE``; the other photo over a tenth of the frame (a patch in the middle) and
    the other photo itself are over it."""
    from edgecap.stream import MIN_CHANGE, view_change

    cat, coffee = example_frames()
    for photo, other in ((cat, coffee), (coffee, cat)):
        frame = with_noise(photo, 0)
        assert view_change(frame, with_noise(photo, 1)) < MIN_CHANGE
        assert view_change(frame, with_noise(np.round(photo * 0.6).astype(np.uint8), 1)) < MIN_CHANGE
        assert view_change(frame[1:, 1:], frame[:-1, :-1]) < MIN_CHANGE
        patched = frame.copy()
        h, w = np.array(frame.shape[:2]) * np.sqrt(0.1)
        top, left = (frame.shape[0] - int(h)) // 2, (frame.shape[1] - int(w)) // 2
        patched[top : top + int(h), left : left + int(w)] = other[top : top + int(h), left : left + int(w)]
        assert view_change(frame, patched) >= MIN_CHANGE
        assert view_change(frame, other) > 0.3


@pytest.mark.parametrize(
    "image",
    [
        b"\xff\xd8 compressed",
        "photo.jpg",
        np.zeros((15, 40, 3), np.uint8),  # under 16 pixels a side
        np.zeros((16, 16, 5), np.uint8),
        np.zeros((16, 16), bool),
        np.pad(np.full((1, 1), np.nan, np.float32), 16),
        np.pad(np.full((1, 1), np.inf), 16),
        Image.new("P", (16, 16)),
        None,
    ],
    ids=["bytes", "path", "small", "5-channels", "bool", "nan", "inf", "palette", "none"],
)
def test_view_change_that_cannot_be_told_is_none(image):
    import warnings

    from edgecap.stream import view_change

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert view_change(image, halves()) is None and view_change(halves(), image) is None


def captioned_with_min_change(frames, min_change=0.05, **options):
    """The indices captioned by an in-order stream with ``min_change``, and its stats."""
    stream = caption_stream(FakeCaptioner(), frames, live=False, min_change=min_change, **options)
    return [e.frame_index for e in stream], stream.stats


def test_an_in_order_stream_captions_a_scene_again_only_when_it_changed():
    """Frames of a still scene (noise only), then another scene, then the first again: each
    scene's first frame is captioned, the others counted unchanged; without min_change, all."""
    cat, coffee = example_frames()
    frames = [with_noise(cat, s) for s in range(3)] + [with_noise(coffee, s) for s in range(3, 5)]
    frames += [with_noise(cat, 5)]
    indices, stats = captioned_with_min_change(frames)
    assert indices == [0, 3, 5]
    assert (stats.frames, stats.captioned, stats.unchanged) == (6, 3, 3)
    assert str(stats).endswith(", 3 unchanged")
    assert captioned_with_min_change(frames, min_change=None)[0] == list(range(6))


def test_each_frame_is_compared_with_the_one_captioned_not_the_one_before():
    """One more cell changes with each frame (1/256 of the view from the frame before): the
    change builds up against the frame captioned, so frames 13 and 26 are captioned (13/256 >=
    0.05 > 12/256); the boundary is min_change itself."""
    frames = [halves(flipped) for flipped in range(40)]
    assert captioned_with_min_change(frames)[0] == [0, 13, 26, 39]
    assert captioned_with_min_change(frames, min_change=13 / 256)[0] == [0, 13, 26, 39]
    assert captioned_with_min_change(frames, min_change=12 / 256 + 1e-9)[0] == [0, 13, 26, 39]
    assert captioned_with_min_change(frames, min_change=12 / 256)[0] == [0, 12, 24, 36]
    # min_change=1 (its greatest): only a frame whose every cell changed is captioned again
    swapped = halves()[:, ::-1]
    assert captioned_with_min_change([halves(), halves(40), swapped], min_change=1)[0] == [0, 2]


def test_frames_that_cannot_be_measured_are_captioned_and_so_is_the_next():
    """Bytes (not decoded) are captioned whatever came before; the frame after one is too (there
    is nothing captioned to compare it with), the one after that is compared with it."""
    assert captioned_with_min_change([halves(), b"jpeg", halves(), halves(), b"jpeg", halves(1)])[0] == [
        0,
        1,
        2,
        4,
        5,
    ]


def test_a_frame_that_failed_is_not_what_the_next_is_compared_with():
    """on_error="return": frame 1 (the changed view) fails in the captioner, so frame 2 (the same
    view) is still a change from frame 0, the last captioned, and is captioned."""

    class FailsSecond(FakeCaptioner):
        def caption(self, image, color="rgb", return_attention=False):
            if len(self.seen) == 1:
                self.seen.append((image, color))
                raise InputError("<array>", "unreadable")
            return super().caption(image, color, return_attention)

    stream = caption_stream(
        FailsSecond(), [halves(), halves(40), halves(40)], live=False, min_change=0.05, on_error="return"
    )
    events = list(stream)
    assert [(e.frame_index, isinstance(e.caption, InputError)) for e in events] == [
        (0, False),
        (1, True),
        (2, False),
    ]
    assert (stream.stats.captioned, stream.stats.failed, stream.stats.unchanged) == (2, 1, 0)


def test_with_every_and_the_sharpest_pick_only_a_changed_pick_is_captioned():
    """In order, every=1 s and pick="sharpest" (frames 2 a second): of frames about as sharp
    each interval's newest is picked, 1, 3 and 5; 3 is the same scene as 1 (unchanged), 5
    another."""
    cat, coffee = example_frames()
    frames = [
        Frame(index=i, timestamp=i / 2, image=image)
        for i, image in enumerate(
            [with_noise(cat, 0), with_noise(cat, 1), with_noise(cat, 2), with_noise(cat, 3), coffee, coffee]
        )
    ]
    indices, stats = captioned_with_min_change(frames, every=1.0, pick="sharpest")
    assert indices == [1, 5]
    assert (stats.captioned, stats.unchanged, stats.skipped) == (2, 1, 3)


def test_a_live_stream_passes_over_an_unchanged_frame_and_counts_its_drops_in_the_next_event():
    """Frame 0 is captioned slowly while frames 1 and 2 (the same scene) arrive: frame 2 is taken
    (1 dropped) and passed over as unchanged; then frame 3, another scene, is captioned, its
    event counting the frame dropped before frame 2."""
    cat, coffee = example_frames()
    captioning, all_read = threading.Event(), threading.Event()
    stream = None

    def source():
        yield with_noise(cat, 0)
        assert captioning.wait(DEADLOCK_GUARD_S)
        yield with_noise(cat, 1)
        yield with_noise(cat, 2)
        all_read.set()
        deadline = time.monotonic() + DEADLOCK_GUARD_S
        while stream.stats.unchanged == 0:  # frame 2 passed over before frame 3 is read
            assert time.monotonic() < deadline, "the loop stalled"
            time.sleep(0.001)
        yield coffee

    def hook(calls):
        if calls == 0:
            captioning.set()
            assert all_read.wait(DEADLOCK_GUARD_S), "the reader stalled"

    stream = caption_stream(FakeCaptioner(hook), source(), min_change=0.05)
    assert [(e.frame_index, e.dropped) for e in stream] == [(0, 0), (3, 1)]
    assert (stream.stats.frames, stream.stats.captioned, stream.stats.dropped, stream.stats.unchanged) == (
        4,
        2,
        1,
        1,
    )
