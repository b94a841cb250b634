"""Decoding workers (``Captioner(decode_workers=N)``, ``--decode-workers N``): photos are read,
decoded and preprocessed in threads while the model works on a batch. Users rely on the
results being those of ``decode_workers=0``: in the input order, a bad photo's error in its own
slot with every other photo captioned, and on a bounded read-ahead (a generator of frames or a
huge folder is never read far ahead of the captions).

Most tests run a fake model (``helpers.TableBackend``) whose caption of a solid red frame names
its red level: the expected captions come from the table, not from the captioner."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import Caption, Captioner, InputError, api
from edgecap.backends import ort_providers
from edgecap.cli import main
from edgecap.prefetch import DEFAULT_CPU_DECODE_WORKERS, default_decode_workers
from helpers import TableBackend, encoded_bytes, run_script, solid

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
WORDS = json.loads((Path(edgecap.__file__).parent / "assets" / "default" / "vocab.json").read_text())["words"]
FIRST = 200  # the caption of red level 5 * i is the one word WORDS[FIRST + i]
STEP = 5


def red(i: int) -> np.ndarray:
    return solid((STEP * i, 0, 0))


def word(i: int) -> str:
    return WORDS[FIRST + i]


def _by_red_level(prefix, key):
    if prefix:
        return {"<end>": -0.1}
    level = round((key * 127.5 + 127.5) / STEP)  # channel 0 of the encoder input, back to i
    return {WORDS[FIRST + level]: -0.1}


class RecordingBackend(TableBackend):
    """TableBackend that calls ``on_encode(batch)`` before encoding a batch."""

    on_encode = staticmethod(lambda images: None)

    def encode(self, images):
        self.on_encode(images)
        return super().encode(images)


@pytest.fixture
def fake(monkeypatch):
    """Captioner(...) over the red-level table; ``started``: (input index or None, thread name)
    of each decode, in the order they started; each decode of red(i) may be slowed down by
    ``delay(i)`` seconds."""
    backend = RecordingBackend(WORDS, _by_red_level, top_k=10, keyed=True)
    monkeypatch.setattr(api, "load_backend", lambda name, manifest, **kw: backend)
    state = {"started": [], "delay": lambda i: 0.0, "backend": backend}
    real_load = api.load_rgb
    lock = threading.Lock()

    def load_rgb(image, *args, **kwargs):
        i = int(image[0, 0, 0]) // STEP if isinstance(image, np.ndarray) else None
        with lock:
            state["started"].append((i, threading.current_thread().name))
        if i is not None:
            time.sleep(state["delay"](i))
        return real_load(image, *args, **kwargs)

    monkeypatch.setattr(api, "load_rgb", load_rgb)
    return state


def captioner(workers: int, batch: int) -> Captioner:
    # the table reads each frame's red level as it is: no brightening of the dark ones
    return Captioner(
        backend="onnxruntime", blank_check=False, brighten=False, batch_size=batch, decode_workers=workers
    )


def texts(results) -> list:
    return [r.text if isinstance(r, Caption) else f"error: {r}" for r in results]


@pytest.mark.parametrize("batch", [1, 3])
def test_results_keep_the_input_order_when_later_photos_decode_first(fake, batch):
    fake["delay"] = lambda i: 0.002 * (12 - i)  # the earlier the photo, the slower its decode
    frames = [red(i) for i in range(12)]
    results = captioner(workers=3, batch=batch).caption_batch(frames)
    assert texts(results) == [word(i) for i in range(12)]
    # and the decoding did run in the workers, not in the calling thread
    names = {name for _, name in fake["started"]}
    assert names and all(name.startswith("edgecap-decode") for name in names)


def test_without_workers_everything_is_decoded_in_the_calling_thread(fake):
    results = captioner(workers=0, batch=2).caption_batch([red(i) for i in range(5)])
    assert texts(results) == [word(i) for i in range(5)]
    assert {name for _, name in fake["started"]} == {threading.current_thread().name}


def test_one_photo_is_decoded_in_the_calling_thread(fake):
    cap = captioner(workers=2, batch=4)
    assert cap.caption(red(3)).text == word(3)
    assert {name for _, name in fake["started"]} == {threading.current_thread().name}


def test_the_next_batch_decodes_while_the_model_works(fake):
    batch, workers = 2, 2
    seen = []

    def on_encode(images):
        # the batch waits in the model until the workers start on the photos after it (at most
        # 60 s, only so that a read-ahead that never comes fails rather than hangs: a loaded
        # machine may leave the workers unscheduled for seconds)
        deadline = time.monotonic() + 60
        while len(fake["started"]) <= batch and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(len(fake["started"]))

    fake["backend"].on_encode = on_encode
    results = captioner(workers, batch).caption_batch([red(i) for i in range(8)])
    assert texts(results) == [word(i) for i in range(8)]
    assert seen[0] > batch  # photos of the next batch were being decoded during the first


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_photo_gives_its_error_and_the_others_their_captions(fake, tmp_path, workers):
    missing = tmp_path / "gone.jpg"
    inputs = [red(0), red(1), b"", red(3), red(4), red(5), red(6), str(missing), red(8)]
    results = captioner(workers, batch=2).caption_batch(inputs, on_error="return")
    assert [type(r) for r in results] == [Caption] * 2 + [InputError] + [Caption] * 4 + [InputError, Caption]
    assert texts(results)[:2] + texts(results)[3:7] + texts(results)[8:] == [
        word(i) for i in (0, 1, 3, 4, 5, 6, 8)
    ]
    assert "0 bytes" in str(results[2]) and results[7].source == str(missing)


@pytest.mark.parametrize("on_error", ["raise", "return"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_decode_failure_that_is_not_an_input_error_is_raised(fake, workers, on_error):
    """on_error covers InputError only: another exception while a photo is read (here a
    RuntimeError from the second photo's decode) is raised, with "return" too, not kept in
    its slot."""

    def fail_on_the_second(i):
        if i == 1:
            raise RuntimeError("the disk went away")
        return 0.0

    fake["delay"] = fail_on_the_second
    with pytest.raises(RuntimeError, match="the disk went away"):
        captioner(workers=workers, batch=2).caption_batch([red(i) for i in range(4)], on_error=on_error)


@pytest.mark.parametrize("workers", [0, 2])
def test_with_raise_the_bad_photo_raises_after_the_batches_before_it(fake, workers):
    inputs = [red(0), red(1), red(2), red(3), b"", red(5), red(6)]
    results = captioner(workers, batch=2).iter_captions(iter(inputs))
    assert [next(results).text for _ in range(4)] == [word(i) for i in range(4)]
    with pytest.raises(InputError, match="0 bytes"):
        next(results)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_with_raise_the_first_bad_photo_of_a_batch_raises_after_the_photos_before_it(
    fake, tmp_path, workers, overlap
):
    """docs/python-api.md: with "raise" iter_captions yields the captions of every image before
    the bad one, those of its own batch included, then raises its error. Here the third batch
    of 3 holds a good photo, an empty file and a missing one: photos 0 to 6 are captioned, then
    the empty file's error comes (the first bad one, not the missing file's), with or without
    the workers and the overlap."""
    inputs = [red(i) for i in range(7)] + [b"", str(tmp_path / "gone.jpg"), red(9), red(10)]
    results = captioner(workers, batch=3).iter_captions(iter(inputs), overlap=overlap)
    got = []
    with pytest.raises(InputError, match="0 bytes"):
        for result in results:
            got.append(result.text)
    assert got == [word(i) for i in range(7)]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_caption_batch_with_raise_searches_no_batch_for_a_bad_photo_seen_without_decoding(
    fake, tmp_path, workers, overlap
):
    """docs/python-api.md: caption_batch(on_error="raise") raises the first unusable image's
    error and returns no caption. A photo seen to be unusable without decoding it (a missing
    file, an array of the wrong shape or dtype) late in the list (or just past the first batch,
    or in a 1-D array of paths) costs no search: the photos
    before it are read, and the first bad one among them (a photo only decoding finds bad)
    raises first, as before; then its own error comes. Until 2026-12-07 the 7 batches before
    it were searched and thrown away. A file missing when the call began but there when it is
    read is captioned with the rest."""
    encoded = []
    fake["backend"].on_encode = lambda images: encoded.append(len(images))
    cap = captioner(workers, batch=4)
    cap.overlap = overlap
    frames = [red(i) for i in range(40)]
    missing = tmp_path / "gone.jpg"
    five_channels = np.zeros((8, 8, 5), np.uint8)
    for bad, error in (
        (str(missing), f"{missing}: no such file"),
        (five_channels, "expected 1, 3 or 4 channels in the last axis, got 5"),
        (red(30).astype(np.int32), "unsupported dtype int32"),
    ):
        with pytest.raises(InputError, match=error):
            cap.caption_batch([*frames[:30], bad, *frames[31:]])
        assert encoded == []
    # the first photo past the first batch (index 4 of batches of 4), and in a 1-D array of paths
    with pytest.raises(InputError, match=f"{missing}: no such file"):
        cap.caption_batch([*frames[:4], str(missing), *frames[5:]])
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(red(i)).save(paths[-1])
    paths[5] = missing
    with pytest.raises(InputError, match=f"{missing}: no such file"):
        cap.caption_batch(np.array([str(p) for p in paths]))
    assert encoded == []
    # an earlier photo that only decoding finds bad is still the error raised
    with pytest.raises(InputError, match="cannot identify|not an image"):
        cap.caption_batch([*frames[:10], b"not an image", *frames[11:30], str(missing), *frames[31:]])
    assert encoded == []

    def made_while_reading(i):  # the missing file appears while photo 10 is read
        if i == 10 and not missing.exists():
            Image.fromarray(red(30)).save(missing, format="PNG")
        return 0.0

    fake["delay"] = made_while_reading
    results = cap.caption_batch([*frames[:30], str(missing), *frames[31:]])
    assert texts(results) == [word(i) for i in range(40)]


class _PathFailing(os.PathLike):
    """A path object whose ``__fspath__`` fails (a lazily resolved path that cannot be)."""

    def __fspath__(self):
        raise RuntimeError("cannot resolve the path")


def _released() -> memoryview:
    view = memoryview(b"\x89PNG")
    view.release()
    return view


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "odd", [_PathFailing, _released], ids=["path whose __fspath__ fails", "released memoryview"]
)
def test_caption_batch_with_raise_gives_an_input_that_fails_to_be_looked_at_its_input_error(
    fake, workers, overlap, odd
):
    """docs/python-api.md: with "raise", the first unusable image raises its ``InputError``, and
    looking for one unusable without reading it gives the same error. An input that fails even
    to be looked at (a path object whose __fspath__ raises, a released memoryview) is its own
    InputError ("cannot load this input"), as loading it says, and an earlier photo that only
    decoding finds bad still comes first. Until this fix the look-ahead let the input's own
    exception (RuntimeError, ValueError) out of caption_batch, before the earlier photo's error."""
    encoded = []
    fake["backend"].on_encode = lambda images: encoded.append(len(images))
    cap = captioner(workers, batch=4)
    cap.overlap = overlap
    frames = [red(i) for i in range(40)]
    with pytest.raises(InputError, match="cannot load this input"):
        cap.caption_batch([*frames[:30], odd(), *frames[31:]])
    with pytest.raises(InputError, match="not an image"):
        cap.caption_batch([*frames[:10], b"not an image", *frames[11:30], odd(), *frames[31:]])
    assert encoded == []


class _ListThatFails(list):
    """A list whose iteration fails after its items (a source that fails: a lazily read set)."""

    def __iter__(self):
        yield from super().__iter__()
        raise RuntimeError("the list failed")


@pytest.mark.parametrize("workers", [0, 2])
def test_caption_batch_with_raise_in_a_list_that_fails_gives_the_earlier_bad_photos_error(fake, workers):
    """A list whose iteration fails after its images is a source that fails: with "raise", a
    photo before the failure that only decoding finds bad raises its InputError first, as from a
    generator. Until this fix caption_batch's look-ahead for an unusable image (a list longer
    than a batch) let the list's RuntimeError out at once."""
    images = _ListThatFails([*(red(i) for i in range(5)), b"not an image", red(6), red(7)])
    with pytest.raises(InputError, match="not an image"):
        captioner(workers, batch=4).caption_batch(images)


@pytest.mark.parametrize("on_error", ["raise", "return"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_that_fails_midway_costs_none_of_the_photos_it_gave(fake, workers, on_error):
    """A generator of frames that raises after three of them (a camera unplugged, a recording
    cut short) in the first batch of 8: iter_captions yields those three frames' captions, then
    raises the source's own error (before the fix: the error at once, the three frames lost)."""

    def unplugged():
        yield from (red(i) for i in range(3))
        raise RuntimeError("camera unplugged")

    results = captioner(workers, batch=8).iter_captions(unplugged(), on_error=on_error)
    got = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        for result in results:
            got.append(result.text)
    assert got == [word(0), word(1), word(2)]


def test_without_workers_a_camera_loop_that_refills_one_buffer_gets_each_frames_caption(fake):
    """iter_captions' advice for a live source is decode_workers=0; a camera loop that reads
    each frame into the same array (cv2's read(image=buf), an SDK's recycled frame memory)
    gets the caption of each frame, not the last frame's for all of its batch of 8 (each photo
    is decoded as soon as it is read, before the next read)."""
    buffer = np.empty_like(red(0))

    def camera():
        for i in range(3):
            buffer[...] = red(i)
            yield buffer

    results = captioner(workers=0, batch=8).iter_captions(camera())
    assert texts(results) == [word(0), word(1), word(2)]


class _Wrapped:
    """Another library's array (numpy reads it through ``__array__``) over the camera's buffer."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def __array__(self, dtype=None, copy=None):
        return self.pixels


@pytest.mark.parametrize("kind", ["array", "tensor", "bytearray", "memoryview", "pil-closed", "array-like"])
def test_with_workers_a_source_that_refills_or_closes_its_frames_gets_each_frames_caption(fake, kind):
    """The same as without workers (the test above; docs: "the results do not change") for a
    source whose frames do not outlive its next read: one array refilled for every frame (a
    camera SDK's frame pool), one torch tensor refilled, one ``bytearray`` of encoded bytes
    (or a ``memoryview`` of it), or PIL images opened lazily, each yielded inside its ``with``
    block, which closes its file (nothing left to decode) when the next is read. The workers
    decode a frame after the source has been asked for the next ones; each photo still gets its
    own caption."""
    buffer: object = {
        "array": np.empty_like(red(0)),
        "array-like": np.empty_like(red(0)),
        "tensor": None,
        "bytearray": bytearray(len(encoded_bytes(red(0), "BMP"))),
        "memoryview": bytearray(len(encoded_bytes(red(0), "BMP"))),
    }.get(kind)
    if kind == "tensor":
        torch = pytest.importorskip("torch")
        buffer = torch.empty(red(0).shape, dtype=torch.uint8)

    def camera():
        for i in range(6):
            if kind == "pil-closed":
                with Image.open(io.BytesIO(encoded_bytes(red(i), "BMP"))) as image:  # not read yet
                    yield image
                continue
            if kind in ("array", "array-like"):
                buffer[...] = red(i)
            elif kind == "tensor":
                buffer.copy_(torch.from_numpy(red(i)))
            else:
                buffer[:] = encoded_bytes(red(i), "BMP")
            yield (
                memoryview(buffer)
                if kind == "memoryview"
                else _Wrapped(buffer)
                if kind == "array-like"
                else buffer
            )

    results = captioner(workers=2, batch=4).caption_batch(camera(), on_error="return")
    assert texts(results) == [word(i) for i in range(6)]


def test_with_workers_a_lists_images_are_not_copied(fake, monkeypatch):
    """A list's images are all there before the call (nothing the source does can change them):
    they go to the workers as they are, without the copy a generator's frames get."""
    copied = []
    real = api.own_input
    monkeypatch.setattr(api, "own_input", lambda image: copied.append(1) or real(image))
    frames = [red(i) for i in range(3)]
    assert texts(captioner(workers=2, batch=4).caption_batch(frames)) == [word(i) for i in range(3)]
    assert copied == []
    assert texts(captioner(workers=2, batch=4).caption_batch(iter(frames))) == [word(i) for i in range(3)]
    assert len(copied) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_is_read_no_further_than_its_error(fake, workers):
    """A camera object whose read fails once and would then give frames again (its own
    iterator, not a generator): the images end at its error, which comes right after the
    captions of the three frames before it; the frames it would give after it are neither read
    nor captioned (docs/python-api.md: the captions of what the source gave, then its error)."""

    class Camera:
        def __init__(self):
            self.reads = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.reads += 1
            if self.reads == 4:
                raise OSError("camera read failed")
            if self.reads > 8:
                raise StopIteration
            return red(self.reads - 1 if self.reads < 4 else self.reads)

    camera = Camera()
    got = []
    with pytest.raises(OSError, match="camera read failed"):
        for result in captioner(workers, batch=8).iter_captions(camera, on_error="return"):
            got.append(result.text)
    assert got == [word(0), word(1), word(2)]
    assert camera.reads == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_in_the_source_stops_at_once(fake, workers):
    """Ctrl-C while the source waits for a frame (where a camera loop spends its time) is
    raised at once, as it is, not kept until the frames before it are captioned."""

    def frames():
        yield from (red(i) for i in range(3))
        raise KeyboardInterrupt

    results = captioner(workers, batch=8).iter_captions(frames())
    with pytest.raises(KeyboardInterrupt):
        next(results)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_read_ahead_is_bounded(fake, overlap):
    batch, workers = 2, 2
    # the documented window; with the overlap one batch more: the one searched while the batch
    # before it is built
    ahead = max(batch, 2 * workers) + (batch if overlap else 0)
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield red(i % 40)
            i += 1

    results = captioner(workers, batch).iter_captions(endless(), overlap=overlap)
    assert pulled == []  # nothing is read before the first result is asked for
    for k in range(20):
        assert next(results).text == word(k % 40)
        # the batch of result k, and at most `ahead` photos beyond it
        assert len(pulled) <= (k // batch + 1) * batch + ahead
    assert len(pulled) == 20 + ahead  # a full window, not less: the workers are kept busy


def test_closing_early_cancels_the_photos_not_yet_decoding(fake):
    # Photos after the first batch hold their worker until `release` is set, so when the loop
    # stops both workers are busy (photos 2 and 3) and the rest read ahead are queued.
    release, running = threading.Event(), threading.Semaphore(0)

    def held(i):
        if i >= 2:
            running.release()
            assert release.wait(30)
        return 0.0

    fake["delay"] = held
    frames = iter([red(i) for i in range(30)])
    cap = captioner(workers=2, batch=2)
    results = cap.iter_captions(frames)
    assert next(results).text == word(0)
    read = 30 - len(list(frames))  # what the captioner took from the iterator
    assert read > 4  # photos beyond the two running were read ahead
    for _ in range(2):
        assert running.acquire(timeout=30)  # both workers are decoding (photos 2 and 3)
    results.close()
    release.set()
    cap._workers().shutdown(wait=True)  # runs whatever is still queued, then returns
    # the two running photos finished; the queued ones were cancelled, never decoded
    assert sorted(i for i, _ in fake["started"]) == [0, 1, 2, 3]


def test_same_captions_with_and_without_workers_on_the_real_model(tmp_path):
    pytest.importorskip("onnxruntime")
    photos = sorted(str(p) for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    big = tmp_path / "big.jpg"  # a camera-size JPEG: decoded at a reduced scale
    Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((1600, 1200)).save(big)
    inputs = photos + [str(tmp_path / "broken.jpg"), Path(photos[0]).read_bytes(), str(big), photos[1]]
    plain = Captioner(batch_size=2, decode_workers=0).caption_batch(inputs, on_error="return")
    workers = Captioner(batch_size=2, decode_workers=2).caption_batch(inputs, on_error="return")
    assert [type(r) for r in workers] == [type(r) for r in plain]
    assert isinstance(plain[len(photos)], InputError)
    # Caption equality: text, score, tokens, log-probability, alternatives
    assert [r if isinstance(r, Caption) else str(r) for r in workers] == [
        r if isinstance(r, Caption) else str(r) for r in plain
    ]


def test_caption_command_output_is_the_same_with_workers(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(EXAMPLES.iterdir()):
        if p.suffix in (".jpg", ".png"):
            (folder / p.name).write_bytes(p.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    outputs = []
    for workers in ("0", "2"):
        code = main(
            [
                "caption",
                "--json",
                "--batch-size",
                "2",
                "--decode-workers",
                workers,
                "--no-progress",
                str(folder),
            ]
        )
        captured = capsys.readouterr()
        outputs.append((code, captured.out, captured.err))
    assert outputs[0] == outputs[1]
    code, out, err = outputs[0]
    assert code == 1 and len(out.splitlines()) == 5 and "empty.jpg" in err


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "65", "1000", ""])
def test_a_bad_decode_workers_option_is_one_line(value, capsys):
    assert main(["caption", "--decode-workers", value, "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "--decode-workers must be a whole number from 0 to 64" in err and len(err.splitlines()) == 1


def test_decode_workers_option_takes_0_to_64():
    """--decode-workers says "0: none, at most 64": both ends are taken as they are."""
    from edgecap.commands._options import decode_workers_value

    assert decode_workers_value("0") == 0 and decode_workers_value("64") == 64
    assert decode_workers_value(None) is None  # not given: the default


def test_the_decode_workers_option_reaches_the_captioner(built, capsys):
    """--decode-workers N is the command's Captioner's decode_workers (the CPU default is 0,
    so 2 is visible; 0 given is 0)."""
    photo = str(EXAMPLES / "chelsea.png")
    for value in ("2", "0"):
        argv = ["caption", photo, "--device", "cpu", "--decode-workers", value, "--max-length", "3"]
        assert main(argv) == 0
        assert built[-1].decode_workers == int(value)
    assert capsys.readouterr().out.startswith(f"{photo}\t")


@pytest.mark.parametrize("value", [-1, True, 1.5, "2", 65])
def test_a_bad_decode_workers_argument_fails_before_loading(value, monkeypatch):
    monkeypatch.setattr(api, "load_manifest", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="decode_workers must be a whole number"):
        Captioner(decode_workers=value)


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (4, 3), (16, 8)])
def test_default_workers_on_a_gpu_leave_a_core_to_the_model(monkeypatch, cores, expected):
    """docs/performance-options.md's defaults: on a GPU one per usable core of this process
    less one, at least 1 and at most 8; on the CPU none."""

    def affinity(pid):
        assert pid == 0, "the cores of another process than this one"
        return set(range(cores))

    monkeypatch.setattr("os.sched_getaffinity", affinity, raising=False)
    assert default_decode_workers(on_gpu=True) == expected
    assert default_decode_workers(on_gpu=False) == DEFAULT_CPU_DECODE_WORKERS == 0


@pytest.mark.parametrize("cores, expected", [(4, 3), (None, 1)])
def test_default_workers_without_an_affinity_mask_count_the_cpus(monkeypatch, cores, expected):
    """macOS and Windows have no os.sched_getaffinity: the machine's CPUs count instead (4: 3
    workers), and a count Python cannot tell (None) is one CPU (1 worker)."""
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_decode_workers(on_gpu=True) == expected


class _Providers:
    def __init__(self, *providers):
        self.providers = list(providers)


@pytest.mark.parametrize(
    "name, device, backend, on_gpu",
    [
        ("torch", "cuda", None, True),
        ("torch", "cuda:1", None, True),
        ("torch", "cpu", None, False),
        ("torch", None, None, False),
        ("tensorrt", None, None, True),
        ("onnxruntime", None, _Providers(ort_providers.CUDA, ort_providers.CPU), True),
        ("onnxruntime", None, _Providers(ort_providers.TENSORRT, ort_providers.CPU), True),
        ("onnxruntime", None, _Providers(ort_providers.CPU), False),
        # the first provider runs the model; CUDA after the CPU is only a fallback
        ("onnxruntime", None, _Providers(ort_providers.CPU, ort_providers.CUDA), False),
        ("onnxruntime", "cpu", _Providers(ort_providers.CPU), False),
    ],
)
def test_where_the_model_runs_decides_the_default(name, device, backend, on_gpu):
    assert api._on_gpu(name, device, backend) is on_gpu


def test_the_default_follows_the_device(fake, monkeypatch):
    monkeypatch.setattr(api, "default_decode_workers", lambda on_gpu: 5 if on_gpu else 0)
    assert Captioner(backend="onnxruntime", device="cuda").decode_workers == 5
    assert Captioner(backend="onnxruntime", device="cpu").decode_workers == 0
    assert Captioner(backend="onnxruntime", device="cuda", decode_workers=1).decode_workers == 1
    # and so does the overlap of a batch's captions with the next batch's search
    assert Captioner(backend="onnxruntime", device="cuda").overlap is True
    assert Captioner(backend="onnxruntime", device="cpu").overlap is False
    assert Captioner(backend="onnxruntime", device="cuda", overlap=False).overlap is False


def test_the_file_rate_benchmark_reports_files_and_memory_for_every_setting(tmp_path):
    pytest.importorskip("onnxruntime")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import file_rate

    file_rate.main(
        [
            "--images",
            str(EXAMPLES),
            "--n",
            "3",
            "--batches",
            "1,2",
            "--workers",
            "0,2,default",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "file_rate.json").read_text())
    assert {(r["batch"], r["workers"], r["input"]) for r in data["results"]} == {
        (b, w, what)
        for b in (1, 2)
        for w in ("0", "2", f"{DEFAULT_CPU_DECODE_WORKERS} (default)")
        for what in ("files", "memory")
    }
    assert all(r["photos"] == 3 and r["captions_per_s"] > 0 and r["same"] == 1.0 for r in data["results"])
    assert "| 2 | 2 |" in (tmp_path / "file_rate.md").read_text()


def _decode_threads(before=frozenset()) -> set:
    return {t for t in threading.enumerate() if t.name.startswith("edgecap-decode") and t not in before}


def _settled(count, before, timeout=60.0) -> set:
    """The decoding threads started since ``before``, once at most ``count`` are left alive
    (a pool shut down without waiting lets its idle threads go shortly after; on a loaded
    machine maybe seconds after: the timeout only ends a wait for threads that never go)."""
    deadline = time.monotonic() + timeout
    while len(_decode_threads(before)) > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _decode_threads(before)


@pytest.mark.parametrize("value", [-1, True, 1.5, "2", 65, 1000])
def test_a_bad_decode_workers_attribute_fails_when_set(fake, value):
    cap = captioner(workers=2, batch=2)
    with pytest.raises(
        ValueError, match=rf"decode_workers must be a whole number >= 0 \(at most 64\) or None, got {value!r}"
    ):
        cap.decode_workers = value
    assert cap.decode_workers == 2  # unchanged, and the captioner still works
    assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]


def test_both_ends_of_the_workers_range_are_accepted(fake):
    """0 to 64 workers, both ends included (``--decode-workers`` says "from 0 to 64")."""
    cap = captioner(workers=64, batch=2)
    assert cap.decode_workers == 64
    assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    cap.decode_workers = 0
    assert texts(cap.caption_batch([red(i) for i in range(2)])) == [word(i) for i in range(2)]
    cap.close()


def test_decode_workers_none_is_the_default_again(fake, monkeypatch):
    monkeypatch.setattr(api, "default_decode_workers", lambda on_gpu: 5 if on_gpu else 0)
    cap = Captioner(backend="onnxruntime", device="cuda", decode_workers=1)
    cap.decode_workers = None
    assert cap.decode_workers == 5


def test_a_numpy_integer_is_a_number_of_workers(fake):
    cap = captioner(workers=np.int64(2), batch=2)
    assert cap.decode_workers == 2 and type(cap.decode_workers) is int
    assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    cap.close()


def test_changing_decode_workers_keeps_one_pool(fake):
    """Each call decodes on the number of workers set before it (each decode slowed, so that
    every worker takes some: n threads' names among its decodes), and one pool is kept."""
    before = frozenset(threading.enumerate())
    cap = captioner(workers=1, batch=2)
    fake["delay"] = lambda i: 0.05
    for n in (1, 2, 3, 4):
        cap.decode_workers = n
        fake["started"].clear()
        assert texts(cap.caption_batch([red(i) for i in range(12)])) == [word(i) for i in range(12)]
        assert len({name for i, name in fake["started"] if i is not None}) == n, fake["started"]
    assert len(_settled(4, before)) <= 4  # the last pool's threads only (was 1 + 2 + 3 + 4)
    cap.close()


def test_calls_with_the_same_number_of_workers_share_their_threads(fake, monkeypatch):
    """One pool is kept between calls: the second call's photos are decoded by the thread that
    decoded the first's (one worker), not by a new one."""
    cap = captioner(workers=1, batch=2)
    decoders = []
    load = api.load_rgb

    def recorded(image, *args, **kwargs):
        decoders.append(threading.current_thread())
        return load(image, *args, **kwargs)

    monkeypatch.setattr(api, "load_rgb", recorded)
    for _ in range(2):
        assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    assert len(decoders) == 8 and len(set(decoders)) == 1
    assert decoders[0].name.startswith("edgecap-decode")
    cap.close()


def test_a_call_keeps_its_workers_when_the_number_changes(fake):
    before = frozenset(threading.enumerate())
    cap = captioner(workers=2, batch=2)
    first = cap.iter_captions([red(i) for i in range(10)])
    assert next(first).text == word(0)
    cap.decode_workers = 3  # another call now gets a new pool; this one keeps its own
    assert texts(cap.caption_batch([red(i) for i in range(6)])) == [word(i) for i in range(6)]
    assert texts(first) == [word(i) for i in range(1, 10)]
    # its pool, replaced meanwhile, is shut down once the call is done: the new pool's 3 are left
    assert len(_settled(3, before)) <= 3
    cap.close()


def test_close_stops_the_workers_of_a_call_whose_pool_was_replaced(fake):
    """close() stops every decoding worker (its docstring), also those of a call still under
    way whose pool was replaced when ``decode_workers`` changed (the call keeps its own pool,
    test above): once close() returns no decoding thread is left, and the call stops with the
    closed error at its next batch."""
    before = frozenset(threading.enumerate())
    cap = captioner(workers=2, batch=2)
    first = cap.iter_captions([red(i) for i in range(10)])
    assert next(first).text == word(0)
    cap.decode_workers = 3
    assert texts(cap.caption_batch([red(i) for i in range(6)])) == [word(i) for i in range(6)]
    cap.close()
    assert [t.name for t in _decode_threads(before) if t.is_alive()] == []
    assert next(first).text == word(1)  # the batch handed out before close()
    with pytest.raises(ValueError, match="this Captioner is closed"):
        next(first)


def test_a_call_starting_while_another_thread_sets_no_workers_keeps_its_own(fake):
    """One Captioner shared by threads: a call with 2 workers reads its first photos (to see
    whether there is more than one) when another thread sets ``decode_workers = 0``, here
    between the two. The call runs with the workers it began with and gives its captions (it
    was ``ValueError: max_workers must be greater than 0``); the next call has no workers."""
    cap = captioner(workers=2, batch=2)

    def frames():
        yield red(0)
        cap.decode_workers = 0  # another thread's setting, while this call reads its frames
        yield from (red(i) for i in range(1, 5))

    assert texts(cap.iter_captions(frames())) == [word(i) for i in range(5)]
    fake["started"].clear()
    assert texts(cap.caption_batch([red(i) for i in range(3)])) == [word(i) for i in range(3)]
    assert {name for _, name in fake["started"]} == {threading.current_thread().name}
    cap.close()


def test_close_and_with_stop_the_workers_and_the_backend(fake):
    closed = []
    fake["backend"].close = lambda: closed.append(True)
    before = frozenset(threading.enumerate())
    with captioner(workers=3, batch=2) as cap:
        assert texts(cap.caption_batch([red(i) for i in range(8)])) == [word(i) for i in range(8)]
        assert _decode_threads(before)
    assert not any(t.is_alive() for t in _decode_threads(before))  # none left running
    assert closed == [True]
    with pytest.raises(ValueError, match="closed"):
        cap.caption_batch([red(0), red(1)])
    cap.close()  # again: nothing to do
    assert closed == [True]


def test_closing_after_a_batch_in_the_same_thread_releases_a_one_batch_at_a_time_backend(fake):
    """``with Captioner(backend="tensorrt") as cap: cap.caption_batch(...)``: the block's close()
    runs in the thread whose batch has ended, not inside it; the backend (one set of device
    buffers, ``thread_safe`` False) is released then, once, and a close() from another thread
    returns."""
    fake["backend"].thread_safe = False
    closed = []
    fake["backend"].close = lambda: closed.append(True)
    with captioner(workers=0, batch=2) as cap:
        assert texts(cap.caption_batch([red(i) for i in range(3)])) == [word(i) for i in range(3)]
    assert closed == [True]
    again = threading.Thread(target=cap.close, daemon=True)
    again.start()
    again.join(10)
    assert not again.is_alive() and closed == [True]


def _caption_in_a_thread(cap, n: int) -> tuple[threading.Thread, dict]:
    """``cap.caption_batch`` of red(0..n-1) started in a (daemon: a hang does not hang pytest)
    thread -> (the thread, its outcome: "results" or "error", once it ends)."""
    outcome: dict = {}

    def call():
        try:
            outcome["results"] = cap.caption_batch([red(i) for i in range(n)])
        except Exception as exc:  # noqa: BLE001 (what the call raised is what is checked)
            outcome["error"] = exc

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    return caller, outcome


def _held_in_the_model(fake, workers: int):
    """A Captioner on a one-batch-at-a-time backend (as TensorRT's: buffers to release) whose
    batches wait in the model until ``release`` is set -> (captioner, in_model, release,
    events): ``in_model`` is set when a batch is in the model; events: "encode" for each
    batch, "backend closed" when the backend is released."""
    fake["backend"].thread_safe = False
    cap = captioner(workers=workers, batch=2)
    in_model, release, events = threading.Event(), threading.Event(), []

    def on_encode(images):
        events.append("encode")
        in_model.set()
        assert release.wait(10)

    fake["backend"].on_encode = on_encode
    fake["backend"].close = lambda: events.append("backend closed")
    return cap, in_model, release, events


def _close_begun(cap) -> None:
    """Wait (at most 60 s) until a close() started in another thread has marked ``cap`` closed,
    its first step: from then on no batch of a call starts. A batch released before it (a
    loaded machine may leave the closing thread unscheduled for a while) is followed by the
    call's next batch, which captions."""
    deadline = time.monotonic() + 60
    while not cap._closed:
        assert time.monotonic() < deadline, "close() never began"
        time.sleep(0.005)


@pytest.mark.parametrize("workers", [0, 2])
def test_close_in_another_thread_waits_for_the_batch_in_the_model_and_stops_the_call(fake, workers):
    """docs/python-api.md: a closed Captioner captions no more. close() from another thread
    lets the batch in the model finish before it releases a backend of one set of buffers (a
    TensorRT backend's freed under a running search), and the call then stops with the closed
    error at its next batch; with workers it was a bare RuntimeError from the shut-down pool,
    without them the call captioned every photo after close()."""
    cap, in_model, release, events = _held_in_the_model(fake, workers)
    caller, outcome = _caption_in_a_thread(cap, 8)
    assert in_model.wait(10)
    closer = threading.Thread(target=cap.close)
    closer.start()
    _close_begun(cap)
    closer.join(0.3)
    assert closer.is_alive() and events == ["encode"]  # close() waits for the batch in the model
    release.set()
    closer.join(10)
    caller.join(10)
    assert events.count("encode") == 1 and events.index("backend closed") > 0
    error = outcome.get("error")
    assert isinstance(error, ValueError) and "this Captioner is closed" in str(error), outcome


def test_close_does_not_decode_the_photos_queued_for_the_workers(fake, monkeypatch):
    """close(): the photo being decoded finishes, the ones queued behind it (read ahead by a
    call in another thread) are not decoded, and that call stops with the closed error."""
    stopped = threading.Event()

    class Pool(ThreadPoolExecutor):
        """The decoding pool; says when its shutdown has dealt with the queue, before it waits
        for the photo being decoded."""

        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            stopped.set()
            super().shutdown(wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(api, "ThreadPoolExecutor", Pool)

    def held(i):
        # one worker, busy with photo 0 until close() has stopped the pool (a fixed time was
        # not always enough: photo 0 done before close() came, the worker went on to photo 1)
        if i == 0:
            assert stopped.wait(60)
        return 0.0

    fake["delay"] = held
    cap = captioner(workers=1, batch=2)  # photos 0-3 queued: a batch and its read-ahead
    caller, outcome = _caption_in_a_thread(cap, 8)
    deadline = time.monotonic() + 60
    while not fake["started"]:
        assert time.monotonic() < deadline, "photo 0 was never decoded"
        time.sleep(0.005)
    cap.close()  # while photo 0 decodes
    caller.join(60)
    assert [i for i, _ in fake["started"]] == [0]
    error = outcome.get("error")
    assert isinstance(error, ValueError) and "this Captioner is closed" in str(error)


@pytest.mark.parametrize(
    "error", [RuntimeError("cannot schedule new futures after shutdown"), CancelledError()]
)
def test_the_workers_shut_down_by_close_are_the_closed_error(fake, error):
    """close() in another thread shuts the decoding pool down under a call: a new decode is
    refused (RuntimeError) and a queued one cancelled (CancelledError, which escaped as is);
    both are the closed error. Before close() they are not hidden. (Which of them a call meets
    depends on timing, so the translation is driven directly here.)"""
    cap = captioner(workers=2, batch=2)

    def chunks():
        yield ["first batch"]
        raise error

    running = cap._until_closed(chunks())
    assert next(running) == ["first batch"]
    with pytest.raises(type(error)):
        next(running)
    cap.close()
    closed = cap._until_closed(chunks())
    assert next(closed) == ["first batch"]
    with pytest.raises(ValueError, match="this Captioner is closed") as raised:
        next(closed)
    assert raised.value.__cause__ is error


def test_close_from_inside_the_batch_s_own_thread_releases_the_backend_after_it(fake):
    """A signal handler calling close() runs in the thread whose batch holds the backend (a
    TensorRT one: one batch at a time): waiting for the batch hung forever. The backend is
    released when that batch ends, and the call then stops with the closed error."""
    fake["backend"].thread_safe = False
    cap = captioner(workers=0, batch=2)
    events = []

    def on_encode(images):
        events.append("encode")
        if events.count("encode") == 1:
            cap.close()  # as a SIGTERM handler in this thread would, mid-batch
            events.append("close returned")

    fake["backend"].on_encode = on_encode
    fake["backend"].close = lambda: events.append("backend closed")
    caller, outcome = _caption_in_a_thread(cap, 4)
    caller.join(10)
    assert not caller.is_alive(), "close() from inside the batch hung"
    assert events == ["encode", "close returned", "backend closed"]  # released after the batch
    error = outcome.get("error")
    assert isinstance(error, ValueError) and "this Captioner is closed" in str(error), outcome
    again = threading.Thread(target=cap.close, daemon=True)  # a later close(): done already
    again.start()
    again.join(10)
    assert not again.is_alive() and events.count("backend closed") == 1


def test_a_second_close_returns_only_once_the_backend_is_released(fake):
    """A shutdown hook's close() racing a ``with`` block's: the second call returned at once,
    while the first still waited for the batch in the model, so a caller that freed the GPU
    next did so under the live buffers. It returns once the backend is released."""
    cap, in_model, release, events = _held_in_the_model(fake, workers=0)
    caller, _ = _caption_in_a_thread(cap, 4)
    assert in_model.wait(10)
    first = threading.Thread(target=cap.close, daemon=True)
    first.start()
    _close_begun(cap)
    first.join(0.3)
    assert first.is_alive()  # waiting for the batch in the model

    def second_close():
        cap.close()
        events.append("second close returned")

    second = threading.Thread(target=second_close, daemon=True)
    second.start()
    second.join(0.3)
    assert second.is_alive() and events == ["encode"]
    release.set()
    for thread in (first, second, caller):
        thread.join(10)
        assert not thread.is_alive()
    assert events == ["encode", "backend closed", "second close returned"]


def test_a_second_close_from_inside_the_batch_does_not_wait_for_it(fake):
    """The first close() waits for the batch in the model; a signal handler's close() in the
    batch's own thread must not wait for the first (which waits for this very batch)."""
    fake["backend"].thread_safe = False
    cap = captioner(workers=0, batch=2)
    in_model, first_waiting, events = threading.Event(), threading.Event(), []

    def on_encode(images):
        events.append("encode")
        in_model.set()
        assert first_waiting.wait(10)
        cap.close()  # as a SIGTERM handler in this thread would, mid-batch
        events.append("close in the batch returned")

    fake["backend"].on_encode = on_encode
    fake["backend"].close = lambda: events.append("backend closed")
    caller, outcome = _caption_in_a_thread(cap, 4)
    assert in_model.wait(10)
    first = threading.Thread(target=cap.close, daemon=True)
    first.start()
    first.join(0.3)
    assert first.is_alive()
    first_waiting.set()
    for thread in (caller, first):
        thread.join(10)
        assert not thread.is_alive(), "close() from inside the batch waited for itself"
    assert events == ["encode", "close in the batch returned", "backend closed"]
    assert "this Captioner is closed" in str(outcome.get("error"))


def test_a_second_close_from_inside_the_first_does_not_wait_for_it(fake):
    """A SIGTERM handler's close() runs in the thread of a ``with`` block's close() that is
    still at work (waiting for the decoding workers, releasing the backend): it must not wait
    for the first close(), which cannot go on until the handler returns (it hung forever)."""
    cap = captioner(workers=2, batch=2)
    events = []

    def backend_close():
        events.append("releasing")
        cap.close()  # as a signal handler in this thread would, mid-release
        events.append("inner close returned")

    fake["backend"].close = backend_close
    first = threading.Thread(target=cap.close, daemon=True)
    first.start()
    first.join(10)
    assert not first.is_alive(), "the handler's close() waited for the close() it interrupted"
    assert events == ["releasing", "inner close returned"]


def _closing_inside(monkeypatch, cap, where: str, events: list) -> None:
    """Have ``cap.close()`` called once, as a signal handler in the calling thread would, from
    inside ``where``: "the pool lock" (``_borrowed_workers`` holding the Captioner's pool lock,
    the pool just made) or "submit" (``ThreadPoolExecutor.submit``, holding the pool's own
    lock)."""

    def close_here():
        if "close returned" not in events:
            cap.close()
            events.append("close returned")

    if where == "the pool lock":
        workers_locked = cap._workers_locked

        def made_then_closed(*args):
            pool = workers_locked(*args)
            close_here()
            return pool

        monkeypatch.setattr(cap, "_workers_locked", made_then_closed)
    else:
        from concurrent.futures import thread as futures_thread

        class ClosingWorkItem(futures_thread._WorkItem):
            def __init__(self, *args, **kwargs):
                if threading.current_thread().name == "caller":
                    close_here()
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(futures_thread, "_WorkItem", ClosingWorkItem)


@pytest.mark.parametrize("where", ["the pool lock", "submit"])
def test_close_from_a_signal_handler_inside_the_workers_own_locks_does_not_hang(fake, monkeypatch, where):
    """docs/python-api.md: close() may be called from a signal handler in the thread whose call
    is running. Landing while that thread held the Captioner's pool lock (making or borrowing
    the pool) or the pool's own (inside ``pool.submit``), close() waited for the lock its own
    thread held: the call hung for good. The close returns, the pool is shut down at the end
    of what it interrupted, the call stops with the closed error as anywhere else, no
    decoding thread is left and a later close() from another thread returns."""
    before = frozenset(threading.enumerate())
    cap = captioner(workers=2, batch=2)
    closed: list = []
    fake["backend"].close = lambda: closed.append(True)
    events: list = []
    _closing_inside(monkeypatch, cap, where, events)
    outcome: dict = {}

    def call():
        try:
            outcome["results"] = cap.caption_batch([red(i) for i in range(8)])
        except Exception as exc:  # noqa: BLE001 (what the call raised is what is checked)
            outcome["error"] = exc

    caller = threading.Thread(target=call, name="caller", daemon=True)  # a hang does not hang pytest
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), f"close() from inside {where} hung"
    assert events == ["close returned"]
    error = outcome.get("error")
    assert isinstance(error, ValueError) and "this Captioner is closed" in str(error), outcome
    assert not any(t.is_alive() for t in _decode_threads(before))
    assert closed == [True]
    again = threading.Thread(target=cap.close, daemon=True)
    again.start()
    again.join(10)
    assert not again.is_alive() and closed == [True]


def test_close_from_a_signal_handler_inside_close_s_own_lock_releases_the_backend_once(fake):
    """The pool lock is re-entrant, so a signal handler's close() that lands inside the first
    close()'s own hold of it (the first has found itself first, the Captioner not yet marked
    closed) no longer waits for good; it returns at once and leaves the work to the first,
    which releases the backend once (twice: a copy's backend closed under it). The handler is
    forced onto that line by a trace function (this thread only)."""
    import inspect
    import sys

    cap = captioner(workers=2, batch=2)
    assert texts(cap.caption_batch([red(i) for i in range(3)])) == [word(i) for i in range(3)]
    released: list = []
    fake["backend"].close = lambda: released.append(True)
    lines, start = inspect.getsourcelines(Captioner.close)
    line = start + next(i for i, text in enumerate(lines) if "self._closed = True" in text)
    fired: list = []

    def tracer(frame, event, arg):
        if frame.f_code is not Captioner.close.__code__:
            return None
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(True)
            cap.close()  # as a SIGTERM handler in this thread would, just there
        return tracer

    def close_traced():
        sys.settrace(tracer)
        try:
            cap.close()
        finally:
            sys.settrace(None)

    closer = threading.Thread(target=close_traced, daemon=True)  # a hang does not hang pytest
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "the handler's close() waited for the lock its thread held"
    assert fired and released == [True]


def test_an_iteration_begun_before_close_stops_at_its_next_batch(fake):
    cap = captioner(workers=0, batch=1)
    results = cap.iter_captions([red(i) for i in range(4)])
    assert next(results).text == word(0)
    cap.close()
    with pytest.raises(ValueError, match="this Captioner is closed"):
        next(results)


def test_one_lazily_opened_pil_image_given_several_times_is_read_once_safely(fake, tmp_path):
    """A PIL image opened (not yet loaded) and given several times in one batch is loaded by
    several decoding workers at once; Pillow's load is not safe in two threads (it reads, then
    closes, the file), which failed about 4 calls in 5 with 'truncated or corrupt image data'."""
    path = tmp_path / "red.png"
    Image.fromarray(red(7)).save(path)
    cap = captioner(workers=4, batch=4)
    for _ in range(20):
        with Image.open(path) as image:
            assert texts(cap.caption_batch([image] * 4, on_error="return")) == [word(7)] * 4


def test_an_error_that_ends_the_run_cancels_the_rest_of_its_batch():
    """An exception other than the kept kind ends the batches; the batch's later photos, not
    yet started, are cancelled rather than decoded for nothing (a pool that starts nothing:
    what would run is then decided by the cancellation alone)."""
    from concurrent.futures import Executor, Future

    from edgecap.prefetch import prefetched_batches

    class Queued(Executor):  # the first photo's decode has failed; the others wait their turn
        def __init__(self):
            self.futures: list[Future] = []

        def submit(self, fn, /, *args, **kwargs):
            future: Future = Future()
            if not self.futures:
                future.set_exception(RuntimeError("the model directory went away"))
            self.futures.append(future)
            return future

    pool = Queued()
    batches = prefetched_batches(pool, str, iter(range(6)), batch=4, ahead=2, keep=ValueError)
    with pytest.raises(RuntimeError, match="went away"):
        next(batches)
    assert [f.cancelled() for f in pool.futures] == [False] + [True] * 5


def test_photos_decoded_here_when_the_pool_refuses_keep_their_errors_in_their_slots():
    """A pool shut down by the interpreter's exit (``inline``: True) refuses work, and the photos
    are decoded in the calling thread: an unusable one's error (the kept kind) is still in its
    own slot, the others prepared, in order; another exception is raised when its batch is due,
    after the batches before it."""
    from concurrent.futures import ThreadPoolExecutor

    from edgecap.prefetch import prefetched_batches

    def prepare(item):
        if item == "bad":
            raise ValueError("unusable")
        if item == "broken":
            raise RuntimeError("the disk went away")
        return item.upper()

    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    items = iter(["a", "bad", "c", "d", "broken"])
    batches = prefetched_batches(pool, prepare, items, batch=2, ahead=2, keep=ValueError, inline=lambda: True)
    first = next(batches)
    assert first[0] == "A" and isinstance(first[1], ValueError) and str(first[1]) == "unusable"
    assert next(batches) == ["C", "D"]
    with pytest.raises(RuntimeError, match="the disk went away"):
        next(batches)


@pytest.mark.parametrize("change", ["workers", "close"])
def test_a_copy_s_workers_are_its_own(fake, change):
    """``copy.copy(captioner)`` (the benchmarks' rows of other options) shares the model and the
    backend, not the decoding workers: the copy's new number of workers, or its close(), shut
    down a pool the original still called on next ("RuntimeError: cannot schedule new futures
    after shutdown")."""
    import copy

    cap = captioner(workers=2, batch=2)
    assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    other = copy.copy(cap)
    if change == "workers":
        other.decode_workers = 1
        assert texts(other.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    else:
        other.close()
    assert texts(cap.caption_batch([red(i) for i in range(4)])) == [word(i) for i in range(4)]
    cap.close()
    other.close()


@pytest.mark.parametrize("first", ["copy", "original"])
def test_the_backend_a_copy_shares_is_released_by_the_last_of_them_to_close(fake, first):
    """``copy.copy(captioner)`` shares the backend: whichever of the two closes first leaves it
    to the other (a copy's close() had released it under the original: a TensorRT backend's
    device buffers freed while the original still captioned), and the last one releases it,
    once; a copy of a closed Captioner is closed and releases nothing."""
    import copy

    releases = []
    fake["backend"].close = lambda: releases.append(1)
    cap = captioner(workers=1, batch=2)
    other = copy.copy(cap)
    closing, staying = (other, cap) if first == "copy" else (cap, other)
    closing.close()
    assert releases == []
    assert texts(staying.caption_batch([red(i) for i in range(3)])) == [word(i) for i in range(3)]
    staying.close()
    closing.close()  # again: nothing more
    assert releases == [1]
    late = copy.copy(cap)
    late.close()
    assert releases == [1]
    with pytest.raises(ValueError, match="closed"):
        late.caption_batch([red(0)])


def test_a_thread_the_main_thread_left_running_and_an_exit_hook_caption_with_workers(tmp_path):
    """A program whose main thread returns while another thread (not a daemon) still captions,
    and an atexit hook that captions: the interpreter's exit shuts every thread pool down
    (``concurrent.futures``' own exit hook), and the workers' refusal was the call's error
    ("RuntimeError: cannot schedule new futures after interpreter shutdown", the thread's
    traceback). The photos are decoded in the calling thread instead, the same captions."""
    photos = [str(p) for p in sorted(EXAMPLES.glob("*.png"))[:3]]
    done = run_script(
        tmp_path,
        f"""
import atexit, threading, time
from edgecap import Captioner

captioner = Captioner(batch_size=1, decode_workers=2)
photos = {photos!r}
print("before", [c.text for c in captioner.caption_batch(photos)])
started = threading.Event()

def late():
    started.set()
    time.sleep(0.5)  # the main thread has returned by now
    print("thread", [c.text for c in captioner.caption_batch(photos)])

atexit.register(lambda: print("exit", [c.text for c in captioner.caption_batch(photos)]))
threading.Thread(target=late).start()
started.wait()
""",
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    before, thread, hook = done.stdout.splitlines()
    assert thread.split(" ", 1)[1] == hook.split(" ", 1)[1] == before.split(" ", 1)[1]
    assert (before.split()[0], thread.split()[0], hook.split()[0]) == ("before", "thread", "exit")
