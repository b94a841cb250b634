"""``edgecap caption --bag`` and ``edgecap.recordings``: real recordings written here by rosbags
(ROS 1 bags, ROS 2 bags with sqlite3 and MCAP storage, a plain .mcap file) from the bundled
example photos, captioned by the shipped model through the command (``edgecap.cli.main`` in this
process, its output read at the file descriptors: ``helpers.run_edgecap``), and the captioned
copies read back with rosbags' own reader. Expected captions come from ``Captioner.caption`` on the photo."""

from __future__ import annotations

import array
import errno
import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("rosbags")

from rosbags.highlevel import AnyReader
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_typestore


from edgecap import Captioner, images
from edgecap.commands.output import caption_record
from edgecap.errors import InputError
from edgecap.stream import sharpness
from edgecap.recordings import (
    RecordingBrokeOff,
    RecordingError,
    demosaic_half,
    kind_of,
    open_recording,
    output_problem,
    raw_sharpness_view,
    raw_to_rgb,
    seconds_text,
    write_captions,
    yuv422_to_rgb,
)
from helpers import EXAMPLES, encoded_bytes, run_edgecap

SECOND = 1_000_000_000
IMAGE, COMPRESSED = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"
T0 = 1_700_000_000 * SECOND  # log times; header stamps are 0.25 s earlier (the camera's clock)
KINDS = ("ros1", "sqlite3", "mcap", "mcap-file")


def photo(name: str, size=(160, 120)) -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / name).convert("RGB").resize(size))


CHELSEA, COFFEE = photo("chelsea.png"), photo("coffee.png")
GRAY = np.asarray(Image.fromarray(COFFEE).convert("L"))


# -- writing recordings with rosbags -----------------------------------------------------------
def image_msg(
    store,
    encoding: str,
    pixels: np.ndarray,
    stamp_ns: int,
    step: int | None = None,
    data: np.ndarray | None = None,
    bigendian: bool = False,
):
    height, width = pixels.shape[:2]
    raw = np.ascontiguousarray(pixels).view(np.uint8).reshape(height, -1)
    step = raw.shape[1] if step is None else step
    rows = np.zeros((height, step), np.uint8)
    rows[:, : raw.shape[1]] = raw
    return store.types["sensor_msgs/msg/Image"](
        header=header(store, stamp_ns),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=int(bigendian),
        step=step,
        data=rows.reshape(-1) if data is None else data,
    )


def compressed_msg(store, fmt: str, data: bytes, stamp_ns: int):
    return store.types["sensor_msgs/msg/CompressedImage"](
        header=header(store, stamp_ns), format=fmt, data=np.frombuffer(data, np.uint8)
    )


def header(store, stamp_ns: int):
    fields = {
        "stamp": store.types["builtin_interfaces/msg/Time"](
            sec=stamp_ns // SECOND, nanosec=stamp_ns % SECOND
        ),
        "frame_id": "camera",
    }
    if "seq" in store.types["std_msgs/msg/Header"].__dataclass_fields__:
        fields["seq"] = 0
    return store.types["std_msgs/msg/Header"](**fields)


def store_for(kind: str):
    return get_typestore(Stores.ROS1_NOETIC if kind == "ros1" else Stores.ROS2_HUMBLE)


def own_image_store(definition: str):
    """A type store whose sensor_msgs/Image is a recording's own ``definition`` (the standard
    std_msgs/Header and Time beside it)."""
    from rosbags.typesys import get_types_from_msg

    standard = store_for("mcap").fielddefs
    store = get_typestore(Stores.EMPTY)
    store.register({k: standard[k] for k in ("std_msgs/msg/Header", "builtin_interfaces/msg/Time")})
    store.register(get_types_from_msg(definition, IMAGE))
    return store


def write_recording(folder: Path, kind: str, messages) -> Path:
    """``messages``: (topic, message type, log time ns, message object) in any order. -> the
    path to give ``--bag`` (for "mcap-file": the .mcap file inside the bag folder)."""
    store = store_for(kind)
    if kind == "ros1":
        path = folder / "run.bag"
        writer = Writer1(path)
    else:
        path = folder / "run"
        plugin = StoragePlugin.SQLITE3 if kind == "sqlite3" else StoragePlugin.MCAP
        writer = Writer2(path, version=9, storage_plugin=plugin)
    serialize = store.serialize_ros1 if kind == "ros1" else store.serialize_cdr
    with writer:
        connections = {}
        for topic, msgtype, time_ns, msg in sorted(messages, key=lambda m: m[2]):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connections[topic], time_ns, bytes(serialize(msg, msgtype)))
    return path / "run.mcap" if kind == "mcap-file" else path


def camera_messages(kind: str):
    """Two frames on each of four image topics (rgb8, bgr8, mono8, JPEG) and a log topic.
    -> (messages, {(topic, index): (log time, stamp, what Captioner.caption is given)})."""
    store = store_for(kind)
    jpeg = [encoded_bytes(p, "JPEG", quality=92) for p in (CHELSEA, COFFEE)]
    messages, frames = [], {}
    for i, (rgb, gray) in enumerate(((CHELSEA, GRAY), (COFFEE, GRAY[::-1].copy()))):
        for j, (topic, encoding, data, expected) in enumerate(
            (
                ("/cam/rgb", "rgb8", rgb, rgb),
                ("/cam/bgr", "bgr8", rgb[:, :, ::-1], rgb),
                ("/cam/mono", "mono8", gray, gray),
                ("/cam/jpeg", "jpeg", jpeg[i], jpeg[i]),
            )
        ):
            time_ns = T0 + i * SECOND + j * 1000
            stamp_ns = time_ns - SECOND // 4
            if encoding == "jpeg":
                msgtype = "sensor_msgs/msg/CompressedImage"
                msg = compressed_msg(store, "jpeg", data, stamp_ns)
            else:
                msgtype, msg = "sensor_msgs/msg/Image", image_msg(store, encoding, data, stamp_ns)
            messages.append((topic, msgtype, time_ns, msg))
            frames[(topic, i)] = (time_ns, stamp_ns, expected)
    messages.append(
        ("/log", "std_msgs/msg/String", T0 + 5, store.types["std_msgs/msg/String"](data="recording started"))
    )
    return messages, frames


def edgecap_caption(capfd, *args) -> subprocess.CompletedProcess:
    """``edgecap caption ARGS``, in this process (``helpers.run_edgecap``)."""
    return run_edgecap(capfd, "caption", *args)


def read_back(path: Path):
    """Every message of a recording via rosbags' AnyReader: (topic, log time, raw bytes, msg)."""
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        return [(c.topic, t, raw, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages()]


@pytest.fixture(scope="module")
def captioner(default_model_dir):
    return Captioner(default_model_dir)


# -- the issue's "done when": each kind captioned, the copy holds the captions ------------------
@pytest.mark.parametrize("kind", KINDS)
def test_recording_captioned_and_written_back(kind, tmp_path, captioner, capfd):
    messages, frames = camera_messages(kind)
    bag = write_recording(tmp_path, kind, messages)
    out = tmp_path / ("captioned.bag" if kind == "ros1" else "captioned")
    done = edgecap_caption(capfd, "--bag", bag, "--json", "--write-bag", out)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == len(frames)  # the /log topic is not an image topic
    for record in records:
        index = 0 if record["time_ns"] < T0 + SECOND else 1
        time_ns, stamp_ns, image = frames[(record["topic"], index)]
        assert (record["time_ns"], record["stamp_ns"]) == (time_ns, stamp_ns)
        assert record["bag"] == str(bag)
        fields = {k: v for k, v in record.items() if k not in ("bag", "topic", "time_ns", "stamp_ns")}
        assert fields == caption_record(captioner.caption(image)), record["topic"]
    # the copy: every original message unchanged, and one caption per frame at its log time
    original = read_back(bag)
    copied = read_back(out)
    assert [m[:3] for m in copied if not m[0].endswith("/caption")] == [m[:3] for m in original]
    captions = sorted((m[0], m[1], m[3].data) for m in copied if m[0].endswith("/caption"))
    assert captions == sorted((r["topic"] + "/caption", r["time_ns"], r["caption"]) for r in records)
    with AnyReader([out]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
    assert types["/cam/rgb/caption"] == "std_msgs/msg/String"


@pytest.mark.parametrize(
    "error, code",
    [
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141),
        (OSError(errno.ENOSPC, "No space left on device"), 2),
    ],
)
def test_write_bag_says_its_copy_is_not_written_when_the_records_cannot_be(
    error, code, tmp_path, monkeypatch, capsys
):
    """The records' reader gone (| head) or a full disk stops the run as it stops caption's; the
    copy, written once every frame is captioned, is not there either, and a line says so as it
    does for Ctrl-C (the run had ended with no word of it: 141 quietly)."""
    import sys

    from edgecap.cli import main
    from helpers import UnwritableStdout

    bag = write_recording(tmp_path, "mcap", camera_messages("mcap")[0])
    out = tmp_path / "copy"
    monkeypatch.setattr(sys, "stdout", UnwritableStdout(error))
    assert main(["caption", "--bag", str(bag), "--write-bag", str(out)]) == code
    assert f"edgecap: {out} not written: the captions could not be written to standard output" in (
        capsys.readouterr().err.splitlines()
    )
    assert not out.exists()


def test_plain_output_and_topic_choice(tmp_path, captioner, capfd):
    messages, frames = camera_messages("mcap")
    bag = write_recording(tmp_path, "mcap", messages)
    done = edgecap_caption(capfd, "--bag", bag, "--topic", "/cam/jpeg", "--topic", "/cam/mono")
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    expected = []
    for (topic, _), (time_ns, stamp_ns, image) in sorted(frames.items(), key=lambda f: f[1][0]):
        if topic in ("/cam/jpeg", "/cam/mono"):
            expected.append(
                [
                    topic,
                    f"{time_ns // SECOND}.{time_ns % SECOND:09d}",
                    f"{stamp_ns // SECOND}.{stamp_ns % SECOND:09d}",
                    captioner.caption(image).text,
                ]
            )
    assert lines == expected
    assert lines[0][1] == "1700000000.000002000" and lines[0][2] == "1699999999.750002000"


# -- bad frames: one line each with topic and time, the others kept -----------------------------
def test_bad_frames_reported_and_skipped(tmp_path, captioner, capfd):
    store = store_for("sqlite3")
    good = image_msg(store, "rgb8", CHELSEA, T0)
    truncated = image_msg(store, "rgb8", CHELSEA, T0, data=good.data[:-7])
    messages = [
        ("/cam/raw", "sensor_msgs/msg/Image", T0, good),
        ("/cam/raw", "sensor_msgs/msg/Image", T0 + SECOND, truncated),
        ("/cam/raw", "sensor_msgs/msg/Image", T0 + 2 * SECOND, image_msg(store, "weird8", CHELSEA, T0)),
        (
            "/cam/depth",
            "sensor_msgs/msg/Image",
            T0 + 3 * SECOND,
            image_msg(store, "16UC1", GRAY.astype(np.uint16), T0),
        ),
        (
            "/cam/jpeg",
            "sensor_msgs/msg/CompressedImage",
            T0 + 4 * SECOND,
            compressed_msg(store, "jpeg", encoded_bytes(COFFEE, "JPEG")[:300], T0),
        ),
        (
            "/cam/jpeg",
            "sensor_msgs/msg/CompressedImage",
            T0 + 5 * SECOND,
            compressed_msg(store, "jpeg", encoded_bytes(COFFEE, "JPEG"), T0),
        ),
    ]
    bag = write_recording(tmp_path, "sqlite3", messages)
    out = tmp_path / "out"
    done = edgecap_caption(capfd, "--bag", bag, "--write-bag", out)
    assert done.returncode == 1
    captioned = [line.split("\t")[:2] for line in done.stdout.splitlines()]
    assert captioned == [["/cam/raw", "1700000000.000000000"], ["/cam/jpeg", "1700000005.000000000"]]
    problems = [line for line in done.stderr.splitlines() if not line.startswith("edgecap: wrote")]
    assert len(problems) == 4, done.stderr
    for line, (topic, seconds, why) in zip(
        problems,
        [
            ("/cam/raw", 1, "but 160x120 rgb8 with step 480 needs 57,600"),
            ("/cam/raw", 2, "unknown image encoding 'weird8'"),
            ("/cam/depth", 3, "depth image"),
            ("/cam/jpeg", 4, "corrupt"),
        ],
    ):
        assert line.startswith(f"edgecap: {bag}: {topic} at 170000000{seconds}.000000000: ")
        assert why in line
    # the copy holds the two captions, and all six frames
    copied = read_back(out)
    assert len([m for m in copied if m[0].endswith("/caption")]) == 2
    assert len([m for m in copied if not m[0].endswith("/caption")]) == 6


def test_a_bad_frame_has_a_json_record_too(tmp_path, captioner, capfd):
    """docs/recordings.md: with --json "a frame that failed has "caption": null and "error"",
    named by bag, topic and times like the others (a reader pairs records with frames)."""
    store = store_for("mcap")
    stamp = T0 - SECOND // 4
    messages = [
        ("/cam/raw", IMAGE, T0, image_msg(store, "rgb8", CHELSEA, stamp)),
        ("/cam/raw", IMAGE, T0 + SECOND, image_msg(store, "weird8", CHELSEA, stamp + SECOND)),
    ]
    bag = write_recording(tmp_path, "mcap", messages)
    done = edgecap_caption(capfd, "--bag", bag, "--json")
    assert done.returncode == 1
    good, bad = (json.loads(line) for line in done.stdout.splitlines())
    head = {"bag": str(bag), "topic": "/cam/raw"}
    assert good == {**head, "time_ns": T0, "stamp_ns": stamp, **caption_record(captioner.caption(CHELSEA))}
    error = bad.pop("error")
    assert bad == {
        **head,
        "time_ns": T0 + SECOND,
        "stamp_ns": stamp + SECOND,
        **dict.fromkeys(("caption", "score", "objects", "confidence", "recognisable", "crop")),
    }
    assert "unknown image encoding 'weird8'" in error
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"edgecap: {bag}: /cam/raw at 1700000001.000000000: ") and "weird8" in line


def test_write_bag_says_how_many_captions_it_wrote_on_which_topics(tmp_path, capfd):
    """The one line --write-bag ends with names the copy, the recording, the number of
    captions and the topics they are on (where a player finds them): TOPIC/caption; with
    no caption at all (every frame failed), "no topic"."""
    store = store_for("mcap")
    for name, encoding, summary, code in (
        ("good", "rgb8", "1 caption (/cam/raw/caption)", 0),
        ("bad", "weird8", "0 captions (no topic)", 1),
    ):
        folder = tmp_path / name
        folder.mkdir()
        frame = ("/cam/raw", IMAGE, T0, image_msg(store, encoding, CHELSEA, T0))
        bag = write_recording(folder, "mcap", [frame])
        out = folder / "copy"
        done = edgecap_caption(capfd, "--bag", bag, "--write-bag", out)
        assert done.returncode == code
        assert done.stderr.splitlines()[-1] == f"edgecap: wrote {out}: a copy of {bag} with {summary}"


def test_every_samples_each_topic_on_its_own_grid(tmp_path):
    store = store_for("mcap")
    messages = [
        (
            topic,
            "sensor_msgs/msg/Image",
            T0 + offset + k * 4 * SECOND // 10,
            image_msg(store, "mono8", GRAY, T0),
        )
        for topic, offset in (("/a", 0), ("/b", SECOND // 10))
        for k in range(5)
    ]
    bag = write_recording(tmp_path, "mcap", messages)
    with open_recording(bag) as recording:
        taken = [(f.topic, f.time_ns - T0, f.index) for f in recording.frames(every=1.0)]
    # 0, 0.4, 0.8, 1.2, 1.6 s (and 0.1 s later on /b): the first of each 1 s slot
    assert sorted(taken) == [
        ("/a", 0, 0),
        ("/a", 12 * SECOND // 10, 3),
        ("/b", SECOND // 10, 0),
        ("/b", 13 * SECOND // 10, 3),
    ]


@pytest.mark.parametrize("every", [0, 0.0, -1.0, float("nan"), "1"])
def test_an_every_that_is_not_a_positive_number_is_a_value_error(tmp_path, every):
    """``frames(every=...)`` is held to ``caption_stream``'s rule: 0 was a ZeroDivisionError
    from the sampling grid, a negative interval gave no frame at all, without a word. The error
    comes from the call, naming the value, as ``caption_stream``'s does: ``frames`` handed on
    to other code (``caption_stream(captioner, recording.frames(every=0))``) was a generator
    that raised only when first iterated, far from the mistake."""
    store = store_for("mcap")
    messages = [
        ("/a", "sensor_msgs/msg/Image", T0 + k * SECOND, image_msg(store, "mono8", GRAY, T0))
        for k in range(3)
    ]
    bag = write_recording(tmp_path, "mcap", messages)
    with (
        open_recording(bag) as recording,
        pytest.raises(
            ValueError,
            match=re.escape(f"every must be None or a positive number of seconds, got {every!r}"),
        ),
    ):
        recording.frames(every=every)


class AnyReaderBefore0116:
    """rosbags 0.11.0 to 0.11.5's ``AnyReader`` (edgecap[ros] asks for rosbags >= 0.11): whether
    it is open is its ``isopen``, and ``close()`` asserts that it is; the ``stack`` attribute came
    in 0.11.6. The real ``AnyReader`` does the reading."""

    made: list = []

    def __init__(self, paths, default_typestore=None):
        self._real = AnyReader(paths, default_typestore=default_typestore)
        self.isopen = False
        self.closes = 0
        AnyReaderBefore0116.made.append(self)

    def open(self):
        assert not self.isopen
        self._real.open()
        self.isopen = True

    def close(self):
        assert self.isopen
        self._real.close()
        self.isopen = False
        self.closes += 1

    def __getattr__(self, name):  # connections, messages, deserialize, typestore; no stack
        if name == "stack":
            raise AttributeError(name)
        return getattr(self._real, name)


def test_a_recording_is_read_and_closed_with_rosbags_before_0_11_6(tmp_path, capfd, monkeypatch):
    """Before the fix, closing any recording opened with rosbags 0.11.0 to 0.11.5 read the
    reader's ``stack`` and raised AttributeError: every ``--bag`` run ended in a traceback
    (seen with rosbags 0.11.0 on Python 3.10)."""
    from rosbags import highlevel

    monkeypatch.setattr(highlevel, "AnyReader", AnyReaderBefore0116)
    monkeypatch.setattr(AnyReaderBefore0116, "made", [])
    messages, frames = camera_messages("sqlite3")
    bag = write_recording(tmp_path, "sqlite3", messages)
    with open_recording(bag) as recording:
        assert list(recording.image_topics) == ["/cam/bgr", "/cam/jpeg", "/cam/mono", "/cam/rgb"]
    recording.close()  # a second close does nothing, as with rosbags 0.11.6 and later
    done = edgecap_caption(capfd, "--bag", bag, "--topic", "/cam/jpeg")
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == ["/cam/jpeg", "/cam/jpeg"]
    assert [(r.isopen, r.closes) for r in AnyReaderBefore0116.made] == [(False, 1), (False, 1)]


# -- whole-recording problems: one line, exit 2 -------------------------------------------------
def test_recording_problems(tmp_path, capfd):
    messages, _ = camera_messages("ros1")
    bag = write_recording(tmp_path, "ros1", messages)
    fake = tmp_path / "notes.bag"
    fake.write_text("not a bag")
    for args, message in [
        (["--bag", tmp_path / "missing.bag"], "missing.bag: no such file or folder"),
        # --every goes with --bag: taken, so the missing recording is what is reported
        (["--bag", tmp_path / "missing.bag", "--every", "1"], "missing.bag: no such file or folder"),
        (["--bag", fake], "notes.bag: cannot read this recording"),
        (
            ["--bag", bag, "--topic", "/log"],
            (
                "topic /log is a std_msgs/msg/String topic, not "
                "an image topic; image topics: /cam/bgr, "
                "/cam/jpeg, /cam/mono, /cam/rgb"
            ),
        ),
        (["--bag", bag, "--write-bag", tmp_path / "copy"], "a ROS 1 bag is written to a .bag"),
        (["--bag", bag, "--write-bag", bag], "exists already"),
        (["--topic", "/cam/rgb", str(EXAMPLES / "coffee.png")], "--topic needs --bag"),
        (["--write-bag", tmp_path / "copy.bag", str(EXAMPLES / "coffee.png")], "--write-bag needs --bag"),
    ]:
        done = edgecap_caption(capfd, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
        assert done.stdout == ""
    store = store_for("mcap")
    only_text = write_recording(
        tmp_path, "mcap", [("/log", "std_msgs/msg/String", T0, store.types["std_msgs/msg/String"](data="x"))]
    )
    with pytest.raises(
        RecordingError,
        match=r"no sensor_msgs/Image or CompressedImage topic "
        r"\(topics: /log \(std_msgs/msg/String\)\)",
    ):
        open_recording(only_text).check_topics(None)


def _unblocking_readers_of(fifo: Path, seconds: float = 5.0):
    """A thread that, for ``seconds``, opens ``fifo`` for writing (and closes it) as soon as
    a reader waits on it: a reader that opened the pipe sees it empty instead of waiting for
    ever (so a test of a refusal fails rather than hangs where the pipe is opened)."""
    import threading
    import time

    def unblock():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: no reader yet
            except OSError:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.parametrize(
    "name", ["run.bag", "run.mcap", "run.db3", "folder/metadata.yaml", "folder/run.mcap"]
)
def test_a_named_pipe_in_a_recordings_place_is_refused_not_waited_on(tmp_path, capfd, name):
    """A named pipe given as the recording, or as a bag folder's metadata or storage file, is
    one line and exit 2 before it is opened: opening it waits for a writer (sqlite's open of
    a .db3 even through Ctrl-C and SIGTERM), and the run hung."""
    if name.startswith("folder/"):
        messages, _ = camera_messages("mcap")
        folder = write_recording(tmp_path, "mcap", messages)
        (folder / name.split("/")[1]).unlink()
        fifo, bag = folder / name.split("/")[1], folder
    else:
        fifo = bag = tmp_path / name
    os.mkfifo(fifo)
    _unblocking_readers_of(fifo)
    done = edgecap_caption(capfd, "--bag", bag)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"edgecap caption: error: {fifo}: is a named pipe (FIFO), not a regular file\n"
    with pytest.raises(RecordingError, match="is a named pipe"):
        open_recording(bag)


def test_existing_caption_topic_is_not_mixed_into(tmp_path, capfd):
    store = store_for("sqlite3")
    bag = write_recording(
        tmp_path,
        "sqlite3",
        [
            ("/cam", "sensor_msgs/msg/Image", T0, image_msg(store, "mono8", GRAY, T0)),
            ("/cam/caption", "std_msgs/msg/String", T0, store.types["std_msgs/msg/String"](data="x")),
        ],
    )
    done = edgecap_caption(capfd, "--bag", bag, "--write-bag", tmp_path / "copy")
    assert done.returncode == 2 and "already has a topic /cam/caption" in done.stderr
    assert not (tmp_path / "copy").exists()
    # refused before the frames are captioned: not after an hour of a recording
    assert done.stdout == "", done.stdout


# -- raw encodings --------------------------------------------------------------------------------
def decode(encoding: str, pixels: np.ndarray, **kw) -> np.ndarray:
    return raw_to_rgb(image_msg(store_for("mcap"), encoding, pixels, T0, **kw), "/t at 0")


def test_raw_encodings_give_the_photo():
    assert np.array_equal(decode("rgb8", CHELSEA), CHELSEA)
    assert np.array_equal(decode("bgr8", CHELSEA[:, :, ::-1]), CHELSEA)
    assert np.array_equal(decode("8UC3", CHELSEA[:, :, ::-1]), CHELSEA)  # OpenCV's order
    rgba = np.dstack([CHELSEA, np.full(GRAY.shape, 255, np.uint8)])
    assert np.array_equal(decode("bgra8", rgba[:, :, [2, 1, 0, 3]]), CHELSEA)
    assert np.array_equal(decode("mono8", GRAY), np.dstack([GRAY] * 3))
    assert np.array_equal(decode("8UC1", GRAY), np.dstack([GRAY] * 3))
    assert np.array_equal(decode("rgba8", rgba), CHELSEA)
    assert np.array_equal(decode("8UC4", rgba[:, :, [2, 1, 0, 3]]), CHELSEA)  # OpenCV's BGRA
    # rows padded past the pixels (step > width x bytes per pixel)
    assert np.array_equal(decode("rgb8", CHELSEA, step=CHELSEA.shape[1] * 3 + 32), CHELSEA)
    # 16 bits, both byte orders
    wide = GRAY.astype(np.uint16) * 256 + 3  # the two bytes differ: a swap changes the value
    scaled = np.dstack([wide // 257] * 3).astype(np.uint8)  # 0..65535 -> 0..255
    assert np.array_equal(decode("mono16", wide), scaled)
    assert np.array_equal(decode("mono16", wide.astype(">u2"), bigendian=True), scaled)
    rgb16 = CHELSEA.astype(np.uint16) * 257  # 0..255 -> 0..65535, which scales back exactly
    rgba16 = np.dstack([rgb16, np.full(GRAY.shape, 65535, np.uint16)])
    assert np.array_equal(decode("rgb16", rgb16), CHELSEA)
    assert np.array_equal(decode("bgr16", rgb16[:, :, ::-1]), CHELSEA)
    assert np.array_equal(decode("rgba16", rgba16), CHELSEA)
    assert np.array_equal(decode("bgra16", rgba16[:, :, [2, 1, 0, 3]]), CHELSEA)


def test_depth_images_are_refused():
    with pytest.raises(InputError, match=r"a depth image \(16UC1\), not a picture to caption"):
        decode("16UC1", GRAY.astype(np.uint16))
    with pytest.raises(InputError, match=r"a depth image \(32FC1\), not a picture to caption"):
        decode("32FC1", GRAY.astype(np.float32) / 255)


def test_raw_frames_over_the_pixel_limit_are_refused():
    images.set_max_pixels(160 * 120 - 1)
    with pytest.raises(InputError, match="image is 160x120 = 19,200 pixels, over the limit of 19,199"):
        decode("rgb8", CHELSEA)


def test_bayer_is_demosaicked_at_half_resolution():
    mosaic = np.zeros((120, 160), np.uint8)
    # RGGB: red at (even, even), green at (even, odd) and (odd, even), blue at (odd, odd)
    mosaic[0::2, 0::2] = CHELSEA[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = CHELSEA[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = CHELSEA[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = CHELSEA[1::2, 1::2, 2]
    rgb = decode("bayer_rggb8", mosaic)
    assert rgb.shape == (60, 80, 3)
    assert np.array_equal(rgb[:, :, 0], CHELSEA[0::2, 0::2, 0])
    assert np.array_equal(rgb[:, :, 2], CHELSEA[1::2, 1::2, 2])
    greens = (CHELSEA[0::2, 1::2, 1].astype(int) + CHELSEA[1::2, 0::2, 1] + 1) // 2
    assert np.array_equal(rgb[:, :, 1], greens)
    # the same mosaic read as BGGR swaps red and blue
    assert np.array_equal(demosaic_half(mosaic, "bggr", "x")[:, :, 0], rgb[:, :, 2])


def test_yuv422_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    uyvy = rng.integers(16, 240, (6, 16), dtype=np.uint8)  # 6 rows of 8 pixels
    expected = cv2.cvtColor(uyvy.reshape(6, 8, 2), cv2.COLOR_YUV2RGB_UYVY)
    assert np.abs(yuv422_to_rgb(uyvy, "uyvy", "x").astype(int) - expected).max() <= 1
    yuyv = uyvy.reshape(6, 4, 4)[:, :, [1, 0, 3, 2]].reshape(6, 16)
    assert np.abs(yuv422_to_rgb(yuyv, "yuyv", "x").astype(int) - expected).max() <= 1
    assert np.array_equal(decode("yuv422", uyvy.reshape(6, 8, 2)), yuv422_to_rgb(uyvy, "uyvy", "x"))


# A 4x4 mosaic of 2x2 cells; cell (r, c), k = 2 r + c, holds 10 + k, 20 + k in its top row and
# 30 + k, 40 + k in its bottom row.
MOSAIC = np.array(
    [
        [10, 20, 11, 21],
        [30, 40, 31, 41],
        [12, 22, 13, 23],
        [32, 42, 33, 43],
    ],
    np.uint8,
)


@pytest.mark.parametrize(
    "pattern, cell",
    [
        # ROS image_encodings: the pattern names the cell's colours row by row; one pixel a cell:
        # its red, (green + green + 1) // 2, its blue. Cell k: 10 + k, 20 + k / 30 + k, 40 + k.
        ("rggb", lambda k: (10 + k, (20 + k + 30 + k + 1) // 2, 40 + k)),
        ("bggr", lambda k: (40 + k, (20 + k + 30 + k + 1) // 2, 10 + k)),
        ("gbrg", lambda k: (30 + k, (10 + k + 40 + k + 1) // 2, 20 + k)),
        ("grbg", lambda k: (20 + k, (10 + k + 40 + k + 1) // 2, 30 + k)),
    ],
)
def test_each_bayer_pattern_takes_red_and_blue_from_its_own_cells(pattern, cell):
    expected = np.array([[cell(0), cell(1)], [cell(2), cell(3)]], np.uint8)
    assert np.array_equal(decode(f"bayer_{pattern}8", MOSAIC), expected)
    # an odd row and column past the last whole cell are left out
    ragged = np.full((5, 5), 255, np.uint8)
    ragged[:4, :4] = MOSAIC
    assert np.array_equal(decode(f"BAYER_{pattern.upper()}8", ragged), expected)


def test_sixteen_bit_bayer_in_both_byte_orders():
    # RGGB: every cell's two greens sum to an even number, so x 257 scales back exactly
    wide = MOSAIC.astype(np.uint16) * 257
    expected = np.array([[(10, 25, 40), (11, 26, 41)], [(12, 27, 42), (13, 28, 43)]], np.uint8)
    assert np.array_equal(decode("bayer_rggb16", wide), expected)
    assert np.array_equal(decode("bayer_rggb16", wide.astype(">u2"), bigendian=True), expected)


def test_a_bayer_image_without_a_whole_cell_is_an_input_error():
    with pytest.raises(InputError, match=r"a Bayer image needs at least 2x2 pixels, got 4x1"):
        decode("bayer_rggb8", MOSAIC[:1])


@pytest.mark.parametrize("encoding", ["uyvy", "yuv422", "yuyv", "yuv422_yuy2", "YUYV"])
def test_yuv422_pixels_worked_out_from_bt601(encoding):
    """BT.601 limited range, each macropixel's U and V shared by its two pixels:
    R = 1.164 (Y - 16) + 1.596 (V - 128), G = 1.164 (Y - 16) - 0.391 (U - 128) - 0.813 (V - 128),
    B = 1.164 (Y - 16) + 2.018 (U - 128), rounded, clipped to 0..255. ROS: yuv422 is UYVY
    (U Y0 V Y1), yuv422_yuy2 is YUYV (Y0 U Y1 V). OpenCV's COLOR_YUV2RGB_UYVY gives the same pixels."""
    macropixels = {  # (Y0, U, Y1, V): the two pixels
        # Y 16 and 235 with neutral chroma: black, and 1.164 x 219 = 254.916 -> 255
        (16, 128, 235, 128): [(0, 0, 0), (255, 255, 255)],
        # 1.164 x 84 = 97.776; V - 128 = 32: R 97.776 + 51.072, G 97.776 - 26.016
        (100, 128, 100, 160): [(149, 72, 98)] * 2,
        # U - 128 = -32: G 97.776 + 12.512, B 97.776 - 64.576
        (100, 96, 100, 128): [(98, 110, 33)] * 2,
    }
    rows = [list(macropixels), list(macropixels)[::-1]]
    uyvy = encoding.lower() in ("uyvy", "yuv422")
    packed = np.array(
        [[[u, y0, v, y1] if uyvy else [y0, u, y1, v] for y0, u, y1, v in row] for row in rows], np.uint8
    )
    expected = np.array([[p for m in row for p in macropixels[m]] for row in rows], np.uint8)
    assert np.array_equal(decode(encoding, packed.reshape(2, 6, 2)), expected)


def test_yuv422_of_an_odd_width_is_an_input_error():
    with pytest.raises(InputError, match="YUV 4:2:2 needs an even width, got 3"):
        decode("uyvy", np.full((2, 3, 2), 128, np.uint8))


def test_raw_data_longer_than_its_rows_is_an_input_error():
    pixels = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(InputError, match="data is 13 bytes, but 2x2 rgb8 with step 6 needs 12"):
        decode("rgb8", pixels, data=np.zeros(13, np.uint8))


def test_wrong_sizes_are_input_errors():
    store = store_for("mcap")
    short = image_msg(store, "rgb8", CHELSEA, T0)
    image = store.types["sensor_msgs/msg/Image"]
    for height, width, step, data, problem in (
        (120, 160, 100, short.data, "step 100 is shorter than a row of 160 rgb8"),
        # one byte short of a row: the same InputError (not numpy's reshape error)
        (2, 2, 5, np.zeros(10, np.uint8), r"step 5 is shorter than a row of 2 rgb8 pixels \(6 bytes\)"),
        (120, 0, 0, short.data[:0], r"no pixels \(0x120\)"),
    ):
        message = image(
            header=short.header,
            height=height,
            width=width,
            encoding="rgb8",
            is_bigendian=0,
            step=step,
            data=data,
        )
        with pytest.raises(InputError, match=problem):
            raw_to_rgb(message, "/t at 0")


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 5), (4, 1)])
def test_a_raw_image_one_pixel_high_or_wide_is_converted(height, width):
    """The least image a camera topic can carry (1 x 1, one row, one column) is a picture, not
    "no pixels": its RGB array, each pixel as sent."""
    pixels = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    message = image_msg(store_for("mcap"), "rgb8", pixels, T0)
    assert np.array_equal(raw_to_rgb(message, "/t at 0"), pixels)


@pytest.mark.parametrize(
    ("name", "spelled"),
    [
        ("sensor_msgs/Image", "sensor_msgs/msg/Image"),
        ("sensor_msgs/msg/Image", "sensor_msgs/msg/Image"),
        ("Image", "Image"),  # no package: nothing to put /msg/ after
    ],
)
def test_ros1_type_names_are_spelled_as_rosbags_spells_them(name, spelled):
    from edgecap.recordings import _ros2_name

    assert _ros2_name(name) == spelled


# -- a raw frame measured without converting it (the ROS 2 node's pick="sharpest") -------------
def plain_msg(encoding: str, pixels: np.ndarray, step: int | None = None, bigendian: bool = False):
    """A sensor_msgs/Image as a live topic hands it over (any object with the fields), its data
    a bytearray: a buffer the test can write to."""
    msg = image_msg(store_for("mcap"), encoding, pixels, T0, step=step, bigendian=bigendian)
    return SimpleNamespace(**{**vars(msg), "data": bytearray(msg.data.tobytes())})


def block_luminance(mosaic: np.ndarray) -> np.ndarray:
    """A float frame whose every 2x2 block holds a quarter of the mosaic's block sum: the same
    block sums, which is all ``sharpness`` reads."""
    h, w = mosaic.shape
    sums = mosaic.astype(np.float64).reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    return np.repeat(np.repeat(sums / 4, 2, axis=0), 2, axis=1)


def test_a_raw_frame_is_measured_on_a_view_of_its_own_bytes():
    """``raw_sharpness_view``: the pixels ``sharpness`` measures, as a view of the message's bytes
    (writing to them changes the view: nothing was copied), giving the sharpness of the frame
    converted. rgb8 / bgr8 / rgba8 / bgra8 as (H, W, C), whose channel 1 is green in either order;
    rows padded past their pixels; mono8 as (H, W); 16 bits in both byte orders; a Bayer mosaic
    as (H, W), whose 2x2 blocks sum R + 2 G + B; YUV 4:2:2 as its Y bytes, strided."""
    want = sharpness(CHELSEA)
    rgba = np.dstack([CHELSEA, np.full(GRAY.shape, 255, np.uint8)])
    for encoding, pixels, step in (
        ("rgb8", CHELSEA, None),
        ("bgr8", CHELSEA[:, :, ::-1], None),
        ("rgba8", rgba, None),
        ("bgra8", rgba[:, :, [2, 1, 0, 3]], None),
        ("8UC3", CHELSEA[:, :, ::-1], None),
        ("rgb8", CHELSEA, CHELSEA.shape[1] * 3 + 32),
    ):
        msg = plain_msg(encoding, pixels, step)
        view = raw_sharpness_view(msg)
        assert view.shape == pixels.shape and np.array_equal(view, pixels)
        assert sharpness(view) == want, encoding
        msg.data[1] ^= 0xFF  # the first pixel's green, in the message's own bytes
        assert view[0, 0, 1] == pixels[0, 0, 1] ^ 0xFF
    assert not raw_sharpness_view(plain_msg("rgb8", CHELSEA, CHELSEA.shape[1] * 3 + 32)).flags.c_contiguous

    for encoding in ("mono8", "8UC1"):
        view = raw_sharpness_view(plain_msg(encoding, GRAY))
        assert view.shape == GRAY.shape and np.array_equal(view, GRAY)
        assert sharpness(view) == sharpness(GRAY)

    wide = GRAY.astype(np.uint16) * 256 + 3  # the two bytes differ: a swap changes the value
    for pixels, bigendian in ((wide, False), (wide.astype(">u2"), True)):
        view = raw_sharpness_view(plain_msg("mono16", pixels, bigendian=bigendian))
        assert view.dtype.kind == "u" and np.array_equal(view, wide)
        assert sharpness(view) == pytest.approx(sharpness(wide.astype(np.float64)), rel=1e-6)
    rgb16 = CHELSEA.astype(np.uint16) * 257
    view = raw_sharpness_view(plain_msg("bgr16", rgb16[:, :, ::-1].astype(">u2"), bigendian=True))
    assert np.array_equal(view[:, :, 1], rgb16[:, :, 1])

    mosaic = np.zeros((120, 160), np.uint8)  # RGGB, from the photo's own channels
    mosaic[0::2, 0::2] = CHELSEA[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = CHELSEA[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = CHELSEA[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = CHELSEA[1::2, 1::2, 2]
    for encoding, pixels in (("bayer_rggb8", mosaic), ("bayer_gbrg16", mosaic.astype(np.uint16) * 257)):
        view = raw_sharpness_view(plain_msg(encoding, pixels))
        assert view.shape == (120, 160) and np.array_equal(view, pixels)
        assert sharpness(view) == pytest.approx(sharpness(block_luminance(pixels)), rel=1e-6)

    y = GRAY[:, :160]
    chroma = np.random.default_rng(0).integers(16, 240, (120, 160), dtype=np.uint8)
    for encoding, order in (("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"), ("YUYV", "yuyv")):
        pairs = np.dstack([chroma, y] if order == "uyvy" else [y, chroma])  # (U|V, Y) or (Y, U|V)
        msg = plain_msg(encoding, pairs)
        view = raw_sharpness_view(msg)
        assert view.shape == (120, 160) and np.array_equal(view, y)
        assert sharpness(view) == sharpness(y)
        msg.data[1 if order == "uyvy" else 0] ^= 0xFF  # the first Y byte
        assert view[0, 0] == y[0, 0] ^ 0xFF


@pytest.mark.parametrize("kind", ["array", "bytes", "bytearray", "ndarray"])
def test_a_raw_frame_view_copies_none_of_the_data_as_rclpy_or_a_recording_gives_it(kind):
    """The message's data as rclpy gives it (array.array), bytes, a bytearray or an array: the
    view is of that memory."""
    msg = plain_msg("bgr8", CHELSEA[:, :, ::-1])
    raw = bytes(msg.data)
    msg.data = {
        "array": array.array("B", raw),
        "bytes": raw,
        "bytearray": bytearray(raw),
        "ndarray": np.frombuffer(raw, np.uint8),
    }[kind]
    view = raw_sharpness_view(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))
    assert sharpness(view) == sharpness(CHELSEA)


def test_a_raw_frame_that_cannot_be_measured_as_it_is_has_no_view():
    """None, never an error (it runs in the live stream's reader thread, for every frame): a
    compressed message, a depth or unknown encoding, data of the wrong size, rows shorter than
    their pixels, no pixels, YUV 4:2:2 of an odd width, a message lacking fields or with a field
    of the wrong kind, a frame over the pixel limit."""
    store = store_for("mcap")

    def changed(**fields):
        return SimpleNamespace(**{**vars(plain_msg("rgb8", CHELSEA)), **fields})

    cases = [
        compressed_msg(store, "jpeg", encoded_bytes(CHELSEA, "JPEG"), T0),
        plain_msg("16UC1", GRAY.astype(np.uint16)),
        plain_msg("32FC1", GRAY.astype(np.float32)),
        changed(encoding="weird"),
        changed(data=bytearray(100)),
        changed(step=100),
        changed(width=0, step=0, data=bytearray()),
        changed(height="tall"),
        changed(data=None),
        SimpleNamespace(header=None),
        plain_msg("uyvy", np.full((2, 3, 2), 128, np.uint8)),
    ]
    for msg in cases:
        assert raw_sharpness_view(msg) is None
    assert raw_sharpness_view(plain_msg("rgb8", CHELSEA)) is not None
    images.set_max_pixels(160 * 120 - 1)  # (conftest restores the limit)
    assert raw_sharpness_view(plain_msg("rgb8", CHELSEA)) is None


@pytest.mark.parametrize("kind", ["ndarray", "memoryview"])
def test_sixteen_bit_data_that_is_a_strided_array_is_read_as_a_contiguous_one(kind):
    """A message's data that is every other byte of a larger buffer (a strided 1-D array or
    memoryview, as a slice gives it): 16-bit pixels read as from the same bytes in one block, by
    raw_to_rgb and raw_sharpness_view alike (numpy cannot view a strided byte array as uint16)."""
    wide = GRAY.astype(np.uint16) * 256 + 3
    for encoding, pixels, bigendian in (
        ("mono16", wide, False),
        ("bgr16", (CHELSEA.astype(np.uint16) * 257)[:, :, ::-1].astype(">u2"), True),
        ("bayer_rggb16", wide, False),
    ):
        msg = plain_msg(encoding, pixels, bigendian=bigendian)
        expected = raw_to_rgb(msg, "f")
        doubled = np.repeat(np.frombuffer(bytes(msg.data), np.uint8), 2)
        msg.data = doubled[::2] if kind == "ndarray" else memoryview(doubled)[::2]
        assert np.array_equal(raw_to_rgb(msg, "f"), expected), encoding
        assert np.array_equal(raw_sharpness_view(msg), pixels), encoding


def test_missing_rosbags_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_rosbags(name, *args, **kwargs):
        if name == "rosbags" or name.startswith("rosbags."):
            raise ImportError("No module named 'rosbags'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rosbags)
    from edgecap.errors import MissingPackageError

    with pytest.raises(MissingPackageError, match=r"needs rosbags: pip install .*'\.\[ros\]'"):
        open_recording(tmp_path)


def test_recording_that_breaks_off_keeps_the_captions_so_far(
    tmp_path, monkeypatch, capsys, default_model_dir
):
    """A reader error in the middle (rosbags raises on a corrupt chunk; simulated here after two
    messages): the captions so far are printed, one line says what broke, no copy, exit 1."""
    from rosbags.highlevel import AnyReader as Reader

    from edgecap.cli import main

    messages, _ = camera_messages("mcap")
    bag = write_recording(tmp_path, "mcap", messages)
    real = Reader.messages

    def breaks_off(self, *args, **kwargs):
        for n, item in enumerate(real(self, *args, **kwargs)):
            if n == 2:
                raise ValueError("Chunk checksum mismatch.")
            yield item

    monkeypatch.setattr(Reader, "messages", breaks_off)
    out = tmp_path / "copy"
    code = main(["caption", "--bag", str(bag), "--write-bag", str(out), "--model", str(default_model_dir)])
    captured = capsys.readouterr()
    assert code == 1
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == ["/cam/rgb", "/cam/bgr"]
    assert captured.err.splitlines() == [
        f"edgecap: {bag}: the recording breaks off while being read (Chunk checksum mismatch.)",
        f"edgecap: {out} not written: the recording could not be read to its end",
    ]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_a_recording_that_breaks_off_outside_its_image_topics_writes_no_copy_and_says_so(
    kind, tmp_path, captioner, capfd
):
    """A corrupt chunk that holds only a /log topic's messages: the frames are read without it
    and captioned, but the copy reads every topic and meets it. That is the recording breaking
    off, as in its frames: the captions stay, one line says what broke, one that the copy is not
    written, no copy, exit 1. It had printed the captions, then "edgecap caption: error: ...
    breaks off ..." as a usage error (exit 2), and no word of the copy."""
    import random

    store = store_for(kind)
    text = random.Random(0)
    messages = [
        ("/cam", IMAGE, T0 + k * SECOND, image_msg(store, "rgb8", photo, T0 + k * SECOND))
        for k, photo in enumerate((CHELSEA, COFFEE))
    ]
    messages += [  # 2.5 MB of log after the frames: the frames' chunk (1 MB) and two of log alone
        (
            "/log",
            "std_msgs/msg/String",
            T0 + 10 * SECOND + k,
            store.types["std_msgs/msg/String"](data="".join(text.choice("abc") for _ in range(10_000))),
        )
        for k in range(250)
    ]
    bag = write_recording(tmp_path, kind, messages)
    storage = bag if kind == "ros1" else next(bag.glob("*.mcap"))
    data = bytearray(storage.read_bytes())
    data[1_500_000:1_520_000] = bytes(b ^ 0xA5 for b in data[1_500_000:1_520_000])  # in a log chunk
    storage.write_bytes(bytes(data))
    expected = [f"/cam\t{seconds_text(T0 + k * SECOND)}\t" for k in range(2)]

    done = edgecap_caption(capfd, "--bag", bag)  # the frames alone read to their end
    assert (done.returncode, done.stderr) == (0, "")
    assert [line[: len(expected[0])] for line in done.stdout.splitlines()] == expected

    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    done = edgecap_caption(capfd, "--bag", bag, "--write-bag", out)
    assert done.returncode == 1
    assert [line.split("\t")[3] for line in done.stdout.splitlines()] == [
        captioner.caption(p).text for p in (CHELSEA, COFFEE)
    ]
    broke, not_written = done.stderr.splitlines()
    assert broke.startswith(f"edgecap: {bag}: the recording breaks off while being read (")
    assert not_written == f"edgecap: {out} not written: the recording could not be read to its end"
    assert not out.exists()


@pytest.mark.parametrize("kind", ["sqlite3", "mcap"])
def test_a_db3_read_as_malformed_says_it_may_still_be_recorded(
    kind, tmp_path, default_model_dir, monkeypatch, capsys
):
    """rosbags reads a .db3 without sqlite's locks: one still being recorded reads as "database
    disk image is malformed" (7 of 20 opens while a writer committed), which had made a whole
    bag look corrupt. The error says so for a sqlite3 recording; another kind's is as it was."""
    import sqlite3

    from rosbags.highlevel import AnyReader as Reader

    from edgecap.cli import main

    bag = three_frames(tmp_path, kind)
    real = Reader.messages

    def malformed(self, *args, **kwargs):
        for n, item in enumerate(real(self, *args, **kwargs)):
            if n == 1:
                raise sqlite3.DatabaseError("database disk image is malformed")
            yield item

    monkeypatch.setattr(Reader, "messages", malformed)
    assert main(["caption", "--bag", str(bag), "--model", str(default_model_dir)]) == 1
    (err,) = capsys.readouterr().err.splitlines()
    hint = "; a .db3 still being recorded reads so: caption it once the recorder stops"
    assert err.startswith(f"edgecap: {bag}") and "(database disk image is malformed)" in err
    assert err.endswith(hint) == (kind == "sqlite3"), err


@pytest.mark.parametrize(
    "kind", ["ros1", "mcap file", "ros2 folder", "ros1-profile mcap file", "mcap file cut in its header"]
)
def test_a_recording_its_recorder_has_not_closed_says_what_makes_it_readable(kind, tmp_path):
    """A recording cut short (its recorder killed) or still being recorded lacks what its
    recorder writes last: a ROS 1 bag its index, an MCAP file its end, a ROS 2 bag folder its
    metadata.yaml. rosbags' words for it ("File end magic is invalid.") said neither why nor
    what to do: the error adds both, naming the tool that mends it. A ROS 1-profile MCAP file
    (read with the mcap package) had said what it read where the end should be ("unknown
    (opcode 222) record has length ..."), without the hint."""
    if kind == "ros1-profile mcap file":
        store = store_for("ros1")
        messages = [("/cam", IMAGE, T0 + k * SECOND, image_msg(store, "mono8", GRAY, T0)) for k in range(3)]
        bag = write_ros1_mcap(tmp_path / "run.mcap", messages)
    else:
        bag = three_frames(tmp_path, "ros1" if kind == "ros1" else "mcap")
    if kind == "ros2 folder":
        (bag / "metadata.yaml").unlink()
        hint = "a ROS 2 bag folder gets its metadata.yaml when its recorder stops: ros2 bag reindex makes one"
    else:
        if kind.startswith("mcap file"):
            bag = next(bag.glob("*.mcap"))
        data = bag.read_bytes()
        # the recorder killed two thirds of the way, or as it began (30 bytes: "Truncated record
        # at offset 17", which had come without the hint)
        bag.write_bytes(data[:30] if kind.endswith("header") else data[: len(data) * 2 // 3])
        kind = "mcap file" if kind.endswith("header") else kind
        hint = {
            "ros1": "a ROS 1 bag cut short or still being recorded has no index: rosbag reindex makes one",
            "mcap file": "an MCAP file cut short or still being recorded has no end: "
            "mcap recover repairs one",
        }[kind.removeprefix("ros1-profile ")]
    from edgecap.recordings import Recording

    with pytest.raises(RecordingError) as raised:
        Recording(bag)
    message = str(raised.value)
    assert message.startswith(f"{bag}: cannot read this recording (") and message.endswith(f"); {hint}")


def _mcap_start(profile: bytes, opcode: int = 0x01, magic: bytes = b"\x89MCAP0\r\n") -> bytes:
    """An MCAP file's first bytes as the specification lays them out: the magic, the Header
    record's opcode (0x01) and length (uint64), its profile and library (each a uint32 length
    and UTF-8 bytes)."""
    body = len(profile).to_bytes(4, "little") + profile + (4).to_bytes(4, "little") + b"test"
    return magic + bytes([opcode]) + len(body).to_bytes(8, "little") + body


def test_an_mcap_files_profile_is_read_from_its_header_and_a_damaged_one_is_none(tmp_path):
    """``mcap_profile`` (how a ROS 1-profile MCAP file is told from a ROS 2 one): the header's
    profile; None for a file that is no MCAP file, a header cut within its profile, a profile
    longer than the 64 bytes read, a file that cannot be opened."""
    from mcap.writer import Writer

    from edgecap.recordings import mcap_profile

    path = tmp_path / "run.mcap"

    def profile(data: bytes):
        path.write_bytes(data)
        return mcap_profile(path)

    with open(path, "wb") as f:  # the layout above is the mcap package's own
        writer = Writer(f)
        writer.start(profile="ros1", library="test")
        writer.finish()
    assert path.read_bytes().startswith(_mcap_start(b"ros1")) and mcap_profile(path) == "ros1"
    assert profile(_mcap_start(b"ros2")) == "ros2" and profile(_mcap_start(b"")) == ""
    assert profile(_mcap_start(b"p" * 64)) == "p" * 64
    assert profile(_mcap_start(b"p" * 65)) is None
    assert profile(_mcap_start(b"")[:21]) == ""  # cut right after an empty profile
    assert profile(_mcap_start(b"ros2")[:24]) is None  # cut within the profile
    assert profile(_mcap_start(b"")[:20]) is None  # cut within the profile's length
    assert profile(_mcap_start(b"ros2", opcode=0x02)) is None  # the first record no header
    assert profile(_mcap_start(b"ros2", magic=b"\x89PNG\r\n\x1a\n")) is None
    assert mcap_profile(tmp_path / "missing.mcap") is None


def test_a_missing_metadata_file_gets_the_reindex_hint_only_for_a_bag_folder(tmp_path):
    """rosbags' "Expected metadata file" gets the ROS 2 hint (ros2 bag reindex) for a folder
    holding a bag's storage files only: not for a folder of photos, a path that is no folder."""
    from edgecap.recordings import _unfinished

    problem = "Expected metadata file."
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "run_0.mcap").write_bytes(_mcap_start(b"ros2"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    assert "ros2 bag reindex makes one" in _unfinished(problem, tmp_path / "bag")
    assert _unfinished(problem, tmp_path / "photos") == ""
    assert _unfinished(problem, tmp_path / "missing") == ""
    assert _unfinished(problem, tmp_path / "photos" / "a.jpg") == ""


class _NamingCaptioner:
    """Stands in for a Captioner in ``run_bag``: each frame's caption a new string, as the
    model's are."""

    def iter_captions(self, images, on_error="raise", overlap=None):
        from edgecap.api import Caption

        for i, _ in enumerate(images):
            yield Caption(f"a dog runs through the grass after a red ball, frame {i}", 0.0, [], 0.0)


def test_a_run_without_write_bag_keeps_nothing_per_frame(tmp_path, monkeypatch):
    """``--bag`` without ``--write-bag`` holds no memory per frame: what is in use once the
    last of 2,000 frames is out is what was in use at the 200th. It kept each frame's caption
    text for a copy it would never write (about 230 bytes a frame: some 200 MB for eight hours
    of a 30 Hz camera)."""
    import argparse
    import gc
    import tracemalloc

    from edgecap.commands import caption_bag

    frames = 2000
    store = store_for("mcap")
    pixels = np.zeros((2, 2, 3), np.uint8)
    messages = [
        ("/cam", IMAGE, T0 + i * SECOND // 30, image_msg(store, "rgb8", pixels, T0)) for i in range(frames)
    ]
    bag = write_recording(tmp_path, "mcap", messages)
    in_use: dict[int, int] = {}

    def measured(bag, frame, result, args):
        if frame.index in (frames // 10, frames - 1):
            gc.collect()
            in_use[frame.index] = tracemalloc.get_traced_memory()[0]

    monkeypatch.setattr(caption_bag, "_print_frame", measured)
    args = argparse.Namespace(
        bag=str(bag), topic=None, every=None, write_bag=None, changes_only=False, min_change=None, hold=False
    )
    args.json, args.show_objects, args.min_confidence = False, False, None
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        assert caption_bag.run_bag(_NamingCaptioner(), args) == 0
    finally:
        if not tracing:
            tracemalloc.stop()
    per_frame = (in_use[frames - 1] - in_use[frames // 10]) / (frames - 1 - frames // 10)
    assert per_frame < 20, f"{per_frame:.0f} bytes more in use per frame captioned"


def write_ros1_mcap(path: Path, messages, in_time_order: bool = True) -> Path:
    """An MCAP file with the ROS 1 profile (what ``mcap convert`` makes of a ROS 1 bag), written
    with the mcap package; ``messages`` as for ``write_recording`` (``in_time_order`` False: in
    the order given)."""
    from mcap.writer import Writer

    store = store_for("ros1")
    with open(path, "wb") as f:
        writer = Writer(f)
        writer.start(profile="ros1", library="test")
        channels = {}
        for topic, msgtype, time_ns, msg in (
            sorted(messages, key=lambda m: m[2]) if in_time_order else messages
        ):
            if topic not in channels:
                definition, _ = store.generate_msgdef(msgtype)
                schema = writer.register_schema(
                    name=msgtype.replace("/msg/", "/"), encoding="ros1msg", data=definition.encode()
                )
                channels[topic] = writer.register_channel(
                    topic=topic, message_encoding="ros1", schema_id=schema
                )
            writer.add_message(
                channel_id=channels[topic],
                log_time=time_ns,
                publish_time=time_ns,
                data=bytes(store.serialize_ros1(msg, msgtype)),
            )
        writer.finish()
    return path


def test_ros1_profile_mcap_file_is_read(tmp_path, captioner, capfd):
    """An MCAP file with the ROS 1 profile: its frames are captioned like the ROS 1 bag's; no
    copy into it."""
    messages, frames = camera_messages("ros1")
    path = write_ros1_mcap(tmp_path / "converted.mcap", messages)
    done = edgecap_caption(capfd, "--bag", path, "--json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == len(frames)
    assert [r["time_ns"] for r in records] == sorted(t for t, _, _ in frames.values())
    for record in records:
        index = 0 if record["time_ns"] < T0 + SECOND else 1
        time_ns, stamp_ns, image = frames[(record["topic"], index)]
        assert (record["time_ns"], record["stamp_ns"]) == (time_ns, stamp_ns)
        fields = {k: v for k, v in record.items() if k not in ("bag", "topic", "time_ns", "stamp_ns")}
        assert fields == caption_record(captioner.caption(image)), record["topic"]
    refused = edgecap_caption(capfd, "--bag", path, "--write-bag", tmp_path / "copy")
    assert refused.returncode == 2 and "ROS 1-profile MCAP" in refused.stderr


@pytest.mark.parametrize(
    ("definition", "height"),
    [
        ("string encoding\nuint8[] data", None),
        (
            "std_msgs/Header header\nstring height\nuint32 width\n"
            "string encoding\nuint8 is_bigendian\nuint32 step\n"
            "uint8[] data",
            "120",
        ),
        (
            "std_msgs/Header header\nfloat64 height\nuint32 width\n"
            "string encoding\nuint8 is_bigendian\nuint32 step\n"
            "uint8[] data",
            120.0,
        ),
    ],
    ids=["no-header", "string-height", "float-height"],
)
def test_image_type_without_the_standard_fields_is_one_line_a_frame(
    definition, height, tmp_path, captioner, capfd
):
    """A recording defines its own types: a sensor_msgs/Image without header/height/... (or
    with height a string, or a float: a whole number of pixels would have read as one) is
    refused frame by frame, naming topic and time; the others kept."""
    store = store_for("mcap")
    hostile = own_image_store(definition)
    fields = hostile.fielddefs["sensor_msgs/msg/Image"][1]
    values = {
        name: {
            "encoding": "rgb8",
            "data": CHELSEA.reshape(-1),
            "height": height,
            "header": header(hostile, T0),
            "width": 160,
            "step": 480,
            "is_bigendian": 0,
        }[name]
        for name, _ in fields
    }
    bad = hostile.types["sensor_msgs/msg/Image"](**values)
    path = tmp_path / "run"
    with Writer2(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        raw = writer.add_connection("/cam/raw", "sensor_msgs/msg/Image", typestore=hostile)
        jpeg = writer.add_connection("/cam/jpeg", "sensor_msgs/msg/CompressedImage", typestore=store)
        for i in range(2):
            writer.write(raw, T0 + 2 * i * SECOND, bytes(hostile.serialize_cdr(bad, "sensor_msgs/msg/Image")))
            writer.write(
                jpeg,
                T0 + (2 * i + 1) * SECOND,
                bytes(
                    store.serialize_cdr(
                        compressed_msg(store, "jpeg", encoded_bytes(COFFEE, "JPEG"), T0),
                        "sensor_msgs/msg/CompressedImage",
                    )
                ),
            )
    done = edgecap_caption(capfd, "--bag", path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert [line.split("\t")[:2] for line in done.stdout.splitlines()] == [
        ["/cam/jpeg", "1700000001.000000000"],
        ["/cam/jpeg", "1700000003.000000000"],
    ]
    problems = done.stderr.splitlines()
    assert len(problems) == 2, done.stderr
    for line, seconds in zip(problems, (0, 2)):
        assert line.startswith(
            f"edgecap: {path}: /cam/raw at 170000000{seconds}.000000000: "
            "message lacks the standard sensor_msgs fields: "
        ), line
        assert "height" in line


def _bare_recording(deserialize):
    """A ``Recording`` whose reader only deserialises (``deserialize(raw, msgtype)``), and the
    connection of a camera topic /cam: what ``Recording._frame`` reads, without a file."""
    from types import SimpleNamespace

    from edgecap.recordings import Recording

    recording = Recording.__new__(Recording)
    recording.reader, recording.closed = SimpleNamespace(deserialize=deserialize), False
    return recording, SimpleNamespace(topic="/cam", msgtype="sensor_msgs/msg/Image", id=1)


def test_field_of_the_wrong_kind_is_an_input_error_not_a_traceback():
    """Past the type check, a field that does not convert (a height "tall") is the frame's
    InputError; the frame keeps its header's stamp (sec 1: 1e9 ns), which was read, for the
    --json line that reports it (it had been 0, as for a header that is not one)."""
    from types import SimpleNamespace

    msg = SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0)),
        height="tall",
        width=2,
        step=6,
        encoding="rgb8",
        is_bigendian=0,
        data=b"\0" * 12,
    )
    recording, connection = _bare_recording(lambda raw, msgtype: msg)
    frame = recording._frame(connection, T0, b"", 0)
    assert isinstance(frame.image, InputError)
    assert str(frame.image).startswith(
        "/cam at 1700000000.000000000: message lacks the standard sensor_msgs fields: "
    )
    assert frame.stamp_ns == 1_000_000_000
    msg.header = SimpleNamespace(stamp=SimpleNamespace(sec="soon", nanosec=0))  # no stamp to read
    assert recording._frame(connection, T0, b"", 0).stamp_ns == 0


def test_a_frame_refused_before_its_header_is_read_has_no_stamp():
    """A frame whose type the recording defines without the standard fields, or whose bytes do
    not deserialise, is its InputError with stamp 0 (no header was read), at its recording's
    time and place."""

    def refuse(raw, msgtype):
        raise ValueError("buffer too short")

    recording, connection = _bare_recording(refuse)
    typed = recording._frame(connection, T0, b"", 3, type_problem="message lacks the standard fields: height")
    garbled = recording._frame(connection, T0, b"\0", 4)
    assert (typed.stamp_ns, typed.index, garbled.stamp_ns, garbled.index) == (0, 3, 0, 4)
    assert str(typed.image) == "/cam at 1700000000.000000000: message lacks the standard fields: height"
    assert str(garbled.image) == (
        "/cam at 1700000000.000000000: cannot deserialise this sensor_msgs/msg/Image message "
        "(buffer too short)"
    )


def test_image_data_of_another_element_type_is_no_picture(tmp_path):
    """A recording's own sensor_msgs/Image whose data is float32[] (its other fields standard)
    is refused frame by frame, naming the field: its numbers were read as pixel bytes."""
    hostile = own_image_store(
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\n"
        "uint8 is_bigendian\nuint32 step\nfloat32[] data"
    )
    pixels = np.full((2, 2, 3), 7, np.uint8)
    msg = hostile.types[IMAGE](
        header=header(hostile, T0),
        height=2,
        width=2,
        encoding="rgb8",
        is_bigendian=0,
        step=6,
        data=pixels.reshape(-1).astype(np.float32),
    )
    path = tmp_path / "run"
    with Writer2(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection("/cam", IMAGE, typestore=hostile)
        writer.write(connection, T0, bytes(hostile.serialize_cdr(msg, IMAGE)))
    with open_recording(path) as recording:
        (frame,) = recording.frames()
    assert str(frame.image) == (
        "/cam at 1700000000.000000000: message lacks the standard sensor_msgs fields: data (uint8[])"
    )


# -- names, kinds and frames that carry their problem -------------------------------------------
def test_times_are_exact_seconds_with_their_sign():
    assert seconds_text(T0 + 50_000_000) == "1700000000.050000000"
    assert seconds_text(-1_500_000_000) == "-1.500000000"
    assert seconds_text(-500_000_000) == "-0.500000000"
    # a recording on simulated time starts at 0: no sign there
    assert seconds_text(0) == "0.000000000"


def test_a_recording_is_known_by_its_suffix_in_any_case(tmp_path):
    assert kind_of(tmp_path / "RUN.BAG") == "ros1"
    assert kind_of(tmp_path / "run.DB3") == "sqlite3"


def test_a_copy_over_a_file_or_into_a_missing_folder_is_refused_before_writing(tmp_path):
    bag = three_frames(tmp_path, "ros1")
    assert output_problem(bag, bag) == f"{bag} exists already; name a new file or folder"
    out = tmp_path / "no-such-folder" / "copy.bag"
    assert output_problem(bag, out) == f"{out}: folder {out.parent} does not exist"
    # below a file: that file is named as no folder, not as missing
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    out = notes / "copy.bag"
    assert output_problem(bag, out) == f"{out}: {notes} is not a folder"


def test_a_copy_name_too_long_is_refused_before_captioning(tmp_path):
    """lexists() says False for a name over 255 bytes: it had passed, and once every frame was
    captioned rosbags' Writer raised ENAMETOOLONG, a traceback (exit 1)."""
    bag = three_frames(tmp_path, "ros1")
    out = tmp_path / ("c" * 300 + ".bag")
    assert output_problem(bag, out) == f"{out}: File name too long"


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_a_copy_whose_name_is_taken_after_the_check_is_a_recording_error_and_kept(
    kind, tmp_path, monkeypatch
):
    """A file made at OUT between the check and the writing (another run's copy): rosbags'
    Writer refuses it, which had escaped as its own WriterError (a traceback); it is named in a
    RecordingError and the file there is left alone."""
    import edgecap.recordings as recordings

    bag = three_frames(tmp_path, kind)
    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    monkeypatch.setattr(recordings, "output_problem", lambda source, out: None)
    out.write_text("another run's copy")
    with open_recording(bag) as recording:
        with pytest.raises(RecordingError, match="cannot write the captioned copy"):
            write_captions(recording, out, {})
    assert out.read_text() == "another run's copy"


def test_a_topic_the_recording_lacks_is_named_with_the_image_topics(tmp_path):
    """Refused by the call to ``frames``, not when its frames are first asked for."""
    with open_recording(three_frames(tmp_path, "mcap")) as recording:
        with pytest.raises(
            RecordingError, match=r"topic /cam/left is not in the recording; image topics: /cam$"
        ):
            recording.frames(["/cam/left"])
        # an empty selection (a filtered list that came out empty) is no silent empty stream
        with pytest.raises(
            RecordingError, match=r"no topic given \(None: every image topic\); image topics: /cam$"
        ):
            recording.frames([])
        with pytest.raises(ValueError, match=r"every must be None or a positive number of seconds, got 0"):
            recording.frames([], every=0)  # the interval checked first, as with any topics
        # a topic given twice (--topic /cam --topic /cam) is one topic: named once in messages
        assert recording.check_topics(["/cam", "/cam"]) == ["/cam"]


def test_compressed_depth_and_empty_compressed_frames_carry_their_error(tmp_path):
    store = store_for("mcap")
    depth = encoded_bytes(GRAY, "PNG")
    messages = [
        ("/cam/depth", COMPRESSED, T0, compressed_msg(store, "16UC1; compressedDepth png", depth, T0)),
        ("/cam/jpeg", COMPRESSED, T0 + SECOND, compressed_msg(store, "jpeg", b"", T0)),
        (
            "/cam/jpeg",
            COMPRESSED,
            T0 + 2 * SECOND,
            compressed_msg(store, "jpeg", b"\xff\xd8jpeg", T0 + 250_000_000),
        ),
    ]
    with open_recording(write_recording(tmp_path, "mcap", messages)) as recording:
        depth_frame, empty, jpeg = recording.frames()
    assert str(depth_frame.image) == (
        "/cam/depth at 1700000000.000000000: a compressed depth image ('16UC1; compressedDepth png'), "
        "not a picture to caption"
    )
    assert str(empty.image) == "/cam/jpeg at 1700000001.000000000: no image data (0 bytes)"
    assert jpeg.image == b"\xff\xd8jpeg"  # decoded (and checked) when captioned
    assert (jpeg.time_ns, jpeg.stamp_ns) == (T0 + 2 * SECOND, T0 + 250_000_000)


# -- writing the captioned copy ----------------------------------------------------------------
def three_frames(tmp_path, kind: str) -> Path:
    store = store_for(kind)
    return write_recording(
        tmp_path,
        kind,
        [("/cam", IMAGE, T0 + k * SECOND, image_msg(store, "mono8", GRAY, T0)) for k in range(3)],
    )


@pytest.mark.parametrize("kind", ["ros1", "mcap", "sqlite3"])
def test_a_recording_read_after_its_with_block_says_it_is_closed(kind, tmp_path):
    """Frames read, or a copy written, after the recording's with block: one RecordingError
    that says the recording is closed. It had been the reader's words for a closed file, as if
    the healthy recording broke off ("RecordingBrokeOff: ... (seek of closed file)"), "no
    sensor_msgs/Image or CompressedImage topic (topics: none)", or (MCAP) a frame whose image
    was "cannot deserialise this sensor_msgs/msg/Image message"."""
    bag = three_frames(tmp_path, kind)
    with open_recording(bag) as recording:
        started = recording.frames()
        first = next(started)
        lazy = recording.frames()
    assert isinstance(first.image, np.ndarray)
    closed = f"{bag}: the recording is closed (its with block has ended, or close() was called)"
    for later in (lambda: list(started), lambda: list(lazy), recording.frames):
        with pytest.raises(RecordingError) as raised:
            later()
        assert str(raised.value).startswith(closed) and not isinstance(raised.value, RecordingBrokeOff)
    copy = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    with pytest.raises(RecordingError, match="the recording is closed"):
        write_captions(recording, copy, {})
    assert not copy.exists()


def test_write_captions_counts_the_captions_it_writes(tmp_path):
    with open_recording(three_frames(tmp_path, "sqlite3")) as recording:
        count = write_captions(recording, tmp_path / "copy", {("/cam", 0): "first", ("/cam", 2): "third"})
    assert count == 2
    captions = [(m[1], m[3].data) for m in read_back(tmp_path / "copy") if m[0] == "/cam/caption"]
    assert captions == [(T0, "first"), (T0 + 2 * SECOND, "third")]


def _fails_at_the_second_message(recording, monkeypatch, error: BaseException) -> None:
    """``recording``'s messages raise ``error`` when the second one is read (a full disk, a
    Ctrl-C while the copy is written)."""
    every = recording.messages

    def breaks_off():
        for n, item in enumerate(every()):
            if n == 1:
                raise error
            yield item

    monkeypatch.setattr(recording, "messages", breaks_off)


@pytest.mark.parametrize("kind", ["ros1", "sqlite3"])
def test_a_copy_that_fails_while_written_is_removed(kind, tmp_path, monkeypatch):
    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    with open_recording(three_frames(tmp_path, kind)) as recording:
        _fails_at_the_second_message(recording, monkeypatch, OSError("No space left on device"))
        with pytest.raises(RecordingError, match="cannot write the captioned copy.*No space left"):
            write_captions(recording, out, {("/cam", 0): "first"})
    assert not out.exists()


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_a_copy_stopped_by_ctrl_c_is_removed_and_the_interrupt_goes_on(kind, tmp_path, monkeypatch):
    """Ctrl-C while the copy is written: no half-written copy is left (it would not read, and
    the next --write-bag to that name would be refused as existing), and the KeyboardInterrupt
    reaches the caller as it is."""
    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    with open_recording(three_frames(tmp_path, kind)) as recording:
        _fails_at_the_second_message(recording, monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            write_captions(recording, out, {("/cam", 0): "first"})
    assert not out.exists()


def test_ctrl_c_while_captioning_a_recording_says_the_copy_is_not_written(
    tmp_path, monkeypatch, capsys, default_model_dir
):
    """Ctrl-C part-way through a recording with --write-bag: the captions so far are out, exit
    130, and one line says the copy was not written (it had exited without a word, the user
    left to find no copy); without --write-bag nothing more is said."""
    from rosbags.highlevel import AnyReader as Reader

    from edgecap.cli import main

    bag = three_frames(tmp_path, "mcap")
    real = Reader.messages

    def interrupted(self, *args, **kwargs):
        for n, item in enumerate(real(self, *args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Reader, "messages", interrupted)
    out = tmp_path / "copy"
    argv = ["caption", "--bag", str(bag), "--model", str(default_model_dir), "--batch-size", "1"]
    assert main([*argv, "--write-bag", str(out)]) == 130
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and not out.exists()
    assert captured.err.splitlines() == [f"edgecap: {out} not written: interrupted"]
    assert main(argv) == 130
    assert capsys.readouterr().err == ""


def test_the_copy_keeps_latched_topics_latched(tmp_path):
    """A latched topic (a map, /tf_static) is replayed as recorded: ROS 1 latching, ROS 2
    transient-local durability, kept in the copy with the publisher's name."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    never = QosTime(0, 0)
    latched = Qos(
        QosHistory.KEEP_LAST,
        1,
        QosReliability.RELIABLE,
        QosDurability.TRANSIENT_LOCAL,
        never,
        never,
        QosLiveliness.AUTOMATIC,
        never,
        False,
    )
    for kind, path, extra in [
        ("ros1", tmp_path / "run.bag", {"latching": 1, "callerid": "/map_server"}),
        ("sqlite3", tmp_path / "run", {"offered_qos_profiles": [latched]}),
    ]:
        store = store_for(kind)
        serialize = store.serialize_ros1 if kind == "ros1" else store.serialize_cdr
        with Writer1(path) if kind == "ros1" else Writer2(path, version=9) as writer:
            connection = writer.add_connection("/map", IMAGE, typestore=store, **extra)
            writer.write(connection, T0, bytes(serialize(image_msg(store, "mono8", GRAY, T0), IMAGE)))
        out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
        with open_recording(path) as recording:
            write_captions(recording, out, {("/map", 0): "a map"})
        with AnyReader([out], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
            (copied,) = [c for c in reader.connections if c.topic == "/map"]
        if kind == "ros1":
            assert (copied.ext.latching, copied.ext.callerid) == (1, "/map_server")
        else:
            assert [q.durability for q in copied.ext.offered_qos_profiles] == [QosDurability.TRANSIENT_LOCAL]


def test_each_channel_of_a_ros1_profile_mcap_file_keeps_its_topic(tmp_path):
    messages, frames = camera_messages("ros1")
    with open_recording(write_ros1_mcap(tmp_path / "converted.mcap", messages)) as recording:
        got = [(f.topic, f.index, f.time_ns, f.stamp_ns) for f in recording.frames()]
    assert got == sorted(
        ((topic, i, t, stamp) for (topic, i), (t, stamp, _) in frames.items()), key=lambda f: f[2]
    )


def test_frames_of_a_ros1_profile_mcap_file_come_in_log_time_order(tmp_path):
    """MCAP files need not hold their messages in time order (a converter writes them as it
    meets them): frames come in log-time order all the same, and each frame's index is its
    place in its topic's log-time order (what write_captions pairs captions by)."""
    store = store_for("ros1")
    times = [T0 + 2 * SECOND, T0, T0 + SECOND]  # stored in this order
    messages = [("/cam", IMAGE, t, image_msg(store, "mono8", GRAY, t - SECOND // 4)) for t in times]
    with open_recording(write_ros1_mcap(tmp_path / "run.mcap", messages, in_time_order=False)) as recording:
        got = [(f.index, f.time_ns, f.stamp_ns) for f in recording.frames()]
    assert got == [(k, T0 + k * SECOND, T0 + k * SECOND - SECOND // 4) for k in range(3)]


def test_a_ros1_profile_mcap_file_with_a_channel_of_another_encoding_is_read(tmp_path):
    """An MCAP file with the ROS 1 profile may hold channels that are no ROS 1 messages (JSON
    diagnostics a tool added): they are no image topics, and the ROS 1 frames are read as
    without them (a JSON schema read as a ROS 1 message definition made the file unreadable)."""
    from mcap.writer import Writer

    store = store_for("ros1")
    path = tmp_path / "run.mcap"
    with open(path, "wb") as f:
        writer = Writer(f)
        writer.start(profile="ros1", library="test")
        definition, _ = store.generate_msgdef(IMAGE)
        image_schema = writer.register_schema(
            name="sensor_msgs/Image", encoding="ros1msg", data=definition.encode()
        )
        camera = writer.register_channel(topic="/cam", message_encoding="ros1", schema_id=image_schema)
        json_schema = writer.register_schema(
            name="Diagnostics", encoding="jsonschema", data=b'{"type": "object"}'
        )
        diagnostics = writer.register_channel(
            topic="/diagnostics", message_encoding="json", schema_id=json_schema
        )
        for k in range(2):
            time_ns = T0 + k * SECOND
            msg = image_msg(store, "mono8", GRAY, time_ns - SECOND // 4)
            writer.add_message(
                channel_id=camera,
                log_time=time_ns,
                publish_time=time_ns,
                data=bytes(store.serialize_ros1(msg, IMAGE)),
            )
            writer.add_message(
                channel_id=diagnostics, log_time=time_ns + 1, publish_time=time_ns + 1, data=b'{"ok": true}'
            )
        writer.finish()
    with open_recording(path) as recording:
        assert recording.image_topics == {"/cam": IMAGE}
        got = [(f.topic, f.index, f.time_ns, f.stamp_ns) for f in recording.frames()]
        assert all(np.array_equal(f.image, np.dstack([GRAY] * 3)) for f in recording.frames())
    assert got == [("/cam", k, T0 + k * SECOND, T0 + k * SECOND - SECOND // 4) for k in range(2)]


@pytest.mark.parametrize("kind, storage", [("sqlite3", ".db3"), ("mcap", ".mcap"), ("mcap-file", ".mcap")])
def test_the_copy_of_a_ros2_recording_keeps_its_storage(kind, storage, tmp_path):
    """docs: a ROS 2 bag or MCAP file gives a ROS 2 bag folder with the same storage (sqlite3
    or MCAP): a sqlite3 bag's copy is a .db3 bag, an MCAP bag's or file's an .mcap bag."""
    with open_recording(three_frames(tmp_path, kind)) as recording:
        write_captions(recording, tmp_path / "copy", {("/cam", 0): "first"})
    assert [p.suffix for p in (tmp_path / "copy").iterdir() if p.name != "metadata.yaml"] == [storage]
    assert kind_of(tmp_path / "copy") == ("sqlite3" if storage == ".db3" else "mcap")


@pytest.mark.parametrize("kind", ["sqlite3", "mcap"])
def test_a_caption_comes_just_after_its_frame(kind, tmp_path):
    """In the copy each caption is the message just after its frame (the same log time), so a
    player replays a frame, then its caption: two topics' frames at the same times."""
    store = store_for(kind)
    frames = [("/a", IMAGE, T0 + k * SECOND, image_msg(store, "mono8", GRAY, T0)) for k in range(2)]
    frames += [("/b", IMAGE, T0 + k * SECOND, image_msg(store, "mono8", GRAY, T0)) for k in range(2)]
    with open_recording(write_recording(tmp_path, kind, frames)) as recording:
        captions = {(topic, k): f"{topic} {k}" for topic in ("/a", "/b") for k in range(2)}
        write_captions(recording, tmp_path / "copy", captions)
    copied = [(m[0], m[1]) for m in read_back(tmp_path / "copy")]
    assert copied == [
        (name, T0 + k * SECOND)
        for k in range(2)
        for topic in ("/a", "/b")
        for name in (topic, topic + "/caption")
    ]


def test_a_ros1_bag_is_written_to_a_bag_file_in_any_case(tmp_path):
    """The suffix is read in any case, as kind_of reads it: COPY.BAG is a ROS 1 bag's copy, and
    no name for a ROS 2 recording's copy folder."""
    ros1, ros2 = three_frames(tmp_path, "ros1"), three_frames(tmp_path, "mcap")
    assert output_problem(ros1, tmp_path / "COPY.BAG") is None
    assert output_problem(ros2, tmp_path / "COPY.BAG") == (
        f"{tmp_path / 'COPY.BAG'}: a ROS 2 recording is written to a ROS 2 bag folder "
        "(a name without .bag, .mcap or .db3)"
    )


def test_a_sqlite3_bag_without_message_definitions_is_read_with_the_standard_types(tmp_path):
    """A sqlite3 bag recorded before ROS 2 Iron carries no message definitions (made here by
    emptying the definitions table of a bag rosbags wrote): its frames are read with the
    standard sensor_msgs types, and its copy with captions is a readable bag."""
    import sqlite3

    bag = write_recording(
        tmp_path, "sqlite3", [("/cam", IMAGE, T0, image_msg(store_for("sqlite3"), "rgb8", CHELSEA, T0))]
    )
    (db3,) = bag.glob("*.db3")
    with sqlite3.connect(db3) as db:
        db.execute("DELETE FROM message_definitions")
    db.close()
    with open_recording(bag) as recording:
        assert all(not c.msgdef.data for c in recording.connections)  # nothing to read types from
        (frame,) = recording.frames()
        assert np.array_equal(frame.image, CHELSEA) and frame.stamp_ns == T0
        write_captions(recording, tmp_path / "copy", {("/cam", 0): "a cat"})
    copied = read_back(tmp_path / "copy")
    assert [(m[0], m[1]) for m in copied] == [("/cam", T0), ("/cam/caption", T0)]
    assert copied[1][3].data == "a cat"


def test_a_recording_s_frames_go_through_caption_stream(tmp_path, captioner):
    """``caption_stream`` takes ``Recording.frames`` as they are: each frame keeps its topic's
    index and its log time (seconds), an RGB frame is captioned as ``Captioner.caption`` captions
    the array, and a frame the recording cannot give (a depth image) is that frame's own
    ``InputError`` with ``on_error="return"`` (before: every frame was "unsupported input
    type")."""
    from edgecap.stream import caption_stream

    store = store_for("mcap")
    depth = np.full((4, 4), 1000, np.uint16)
    messages = [
        ("/cam", IMAGE, T0, image_msg(store, "rgb8", CHELSEA, T0)),
        ("/cam", IMAGE, T0 + SECOND, image_msg(store, "16UC1", depth, T0)),
        ("/cam", IMAGE, T0 + 2 * SECOND, image_msg(store, "rgb8", COFFEE, T0)),
        ("/jpeg", COMPRESSED, T0 + 3 * SECOND, compressed_msg(store, "jpeg", b"\xff\xd8 not a jpeg", T0)),
    ]
    with open_recording(write_recording(tmp_path, "mcap", messages)) as recording:
        events = list(caption_stream(captioner, recording.frames(), live=False, on_error="return"))
        with pytest.raises(InputError) as raised:
            list(caption_stream(captioner, recording.frames(["/jpeg"]), live=False))
    expected_times = [T0 / SECOND + k for k in range(3)] + [T0 / SECOND + 3]
    assert [(e.frame_index, e.timestamp) for e in events] == list(zip([0, 1, 2, 0], expected_times))
    assert events[0].caption.text == captioner.caption(CHELSEA).text
    assert events[2].caption.text == captioner.caption(COFFEE).text
    assert isinstance(events[1].caption, InputError)
    assert "a depth image (16UC1), not a picture to caption" in str(events[1].caption)
    # a compressed frame that does not decode is named by its topic and log time, as
    # ``edgecap caption --bag`` names it (not "<bytes (13 bytes)>"), returned or raised
    assert isinstance(events[3].caption, InputError)
    assert events[3].caption.source == raised.value.source == "/jpeg at 1700000003.000000000"


def test_captions_for_a_topic_the_recording_lacks_are_refused_before_writing(tmp_path):
    """``write_captions`` with a caption keyed by a topic that is not an image topic of the
    recording (a typo, another camera's name) names the topic and writes nothing; before, it
    wrote a copy with an empty caption topic and returned 0, without a word."""
    with open_recording(three_frames(tmp_path, "mcap")) as recording:
        with pytest.raises(
            RecordingError, match=r"topic /cam/left is not in the recording; image topics: /cam$"
        ):
            write_captions(recording, tmp_path / "copy", {("/cam", 0): "first", ("/cam/left", 0): "x"})
    assert not (tmp_path / "copy").exists()


def test_write_captions_refuses_a_recording_that_has_the_caption_topic_already(tmp_path):
    """``write_captions`` itself (not only ``edgecap caption --write-bag``) refuses a recording
    that already has ``/cam/caption``: in a ROS 1 bag where another node published there, the
    copy had held that node's messages and the captions mixed on one topic."""
    store = store_for("ros1")
    bag = tmp_path / "run.bag"
    string = "std_msgs/msg/String"
    with Writer1(bag) as writer:
        camera = writer.add_connection("/cam", IMAGE, typestore=store, callerid="/camera")
        theirs = writer.add_connection("/cam/caption", string, typestore=store, callerid="/another_captioner")
        writer.write(camera, T0, bytes(store.serialize_ros1(image_msg(store, "mono8", GRAY, T0), IMAGE)))
        writer.write(theirs, T0, bytes(store.serialize_ros1(store.types[string](data="theirs"), string)))
    out = tmp_path / "copy.bag"
    with open_recording(bag) as recording:
        with pytest.raises(
            RecordingError, match=r"already has a topic /cam/caption; captions would be mixed into it$"
        ):
            write_captions(recording, out, {("/cam", 0): "a cup of coffee"})
    assert not out.exists()


def test_no_captions_is_a_plain_copy_even_of_a_recording_without_images(tmp_path):
    """``write_captions`` with no captions copies the recording and writes 0 captions, as it
    always did, whether or not the recording has an image topic (the topic check of
    1ae28ae only looks at the topics the captions name)."""
    store = store_for("mcap")
    only_text = write_recording(
        tmp_path, "mcap", [("/log", "std_msgs/msg/String", T0, store.types["std_msgs/msg/String"](data="x"))]
    )
    with open_recording(only_text) as recording:
        assert write_captions(recording, tmp_path / "copy", {}) == 0
    assert [(m[0], m[3].data) for m in read_back(tmp_path / "copy")] == [("/log", "x")]


def test_a_file_compressed_mcap_bag_is_copied_as_an_mcap_bag(tmp_path):
    """``ros2 bag record -s mcap --compression-mode file`` holds run.mcap.zstd: its copy is an
    MCAP bag, as the docs promise (the same storage), not a sqlite3 one."""
    from rosbags.rosbag2 import CompressionFormat, CompressionMode

    store = store_for("mcap")
    bag = tmp_path / "run"
    writer = Writer2(bag, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.FILE, CompressionFormat.ZSTD)
    with writer:
        connection = writer.add_connection("/cam", IMAGE, typestore=store)
        writer.write(connection, T0, bytes(store.serialize_cdr(image_msg(store, "rgb8", CHELSEA, T0), IMAGE)))
    assert [p.name for p in bag.glob("*.mcap*")] == ["run.mcap.zstd"]
    assert kind_of(bag) == "mcap"
    with open_recording(bag) as recording:
        assert write_captions(recording, tmp_path / "copy", {("/cam", 0): "a cat"}) == 1
    assert [p.name for p in (tmp_path / "copy").iterdir() if p.name != "metadata.yaml"] == ["copy.mcap"]
    assert [(m[0], m[1]) for m in read_back(tmp_path / "copy")] == [("/cam", T0), ("/cam/caption", T0)]


def test_a_topic_with_a_connection_of_another_type_is_no_traceback(tmp_path, captioner, capfd):
    """A ROS 1 bag with two publishers on /cam, one of sensor_msgs/Image and one of
    std_msgs/String: the String messages are not frames (it was a KeyError traceback), and the
    captions of the copy go to the image frames they describe."""
    store = store_for("ros1")
    bag = tmp_path / "mixed.bag"
    string = "std_msgs/msg/String"
    with Writer1(bag) as writer:
        images = writer.add_connection("/cam", IMAGE, typestore=store, callerid="/camera")
        strings = writer.add_connection("/cam", string, typestore=store, callerid="/other")
        writer.write(strings, T0, bytes(store.serialize_ros1(store.types[string](data="x"), string)))
        for k, rgb in enumerate((CHELSEA, COFFEE)):
            time_ns = T0 + (k + 1) * SECOND
            writer.write(
                images, time_ns, bytes(store.serialize_ros1(image_msg(store, "rgb8", rgb, time_ns), IMAGE))
            )
    out = tmp_path / "copy.bag"
    done = edgecap_caption(capfd, "--bag", bag, "--write-bag", out)
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[1] for line in done.stdout.splitlines()] == [
        seconds_text(T0 + SECOND),
        seconds_text(T0 + 2 * SECOND),
    ]
    captions = [(m[1], m[3].data) for m in read_back(out) if m[0] == "/cam/caption"]
    assert captions == [
        (T0 + SECOND, captioner.caption(CHELSEA).text),
        (T0 + 2 * SECOND, captioner.caption(COFFEE).text),
    ]


def test_a_ros2_copy_named_as_a_file_is_refused_and_a_missing_recording_named(tmp_path):
    """A ROS 2 copy is a bag folder: --write-bag copy.mcap made a folder copy.mcap holding
    copy.mcap.mcap. A recording that does not exist is named as missing, with or without
    --write-bag (it was "not a recording edgecap reads" for a folder's name)."""
    bag = three_frames(tmp_path, "mcap")
    for name in ("copy.mcap", "copy.db3"):
        assert output_problem(bag, tmp_path / name) == (
            f"{tmp_path / name}: a ROS 2 recording is written to a ROS 2 bag folder "
            "(a name without .bag, .mcap or .db3)"
        )
    assert output_problem(tmp_path / "no-such-run", tmp_path / "copy") is None
    with pytest.raises(RecordingError, match="no-such-run: no such file or folder"):
        open_recording(tmp_path / "no-such-run")


def test_a_recording_named_with_a_trailing_slash_that_breaks_off_is_named_once(
    tmp_path, monkeypatch, capsys, default_model_dir
):
    """``--bag run/`` (a shell's completion of a folder): the line says what broke after the
    name as given, without the name again as the path reads it (it was "run/: run: ...")."""
    from rosbags.highlevel import AnyReader as Reader

    from edgecap.cli import main

    bag = three_frames(tmp_path, "mcap")
    real = Reader.messages

    def breaks_off(self, *args, **kwargs):
        for n, item in enumerate(real(self, *args, **kwargs)):
            if n == 1:
                raise ValueError("Chunk checksum mismatch.")
            yield item

    monkeypatch.setattr(Reader, "messages", breaks_off)
    code = main(["caption", "--bag", f"{bag}/", "--model", str(default_model_dir)])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"edgecap: {bag}/: the recording breaks off while being read (Chunk checksum mismatch.)"
    ]


def test_depth_images_through_the_plain_compressed_transport_are_refused(tmp_path):
    """image_transport's "compressed" plugin sends a 16UC1 depth image as a 16-bit PNG with the
    format "16UC1; png compressed " (a depth camera's .../compressed topic): refused like the
    compressedDepth ones (it was captioned as a picture: "a small child is in the air ...");
    a mono16 or rgb8 PNG is still a picture."""
    store = store_for("mcap")
    png = encoded_bytes(GRAY, "PNG")
    formats = (
        "16UC1; png compressed ",
        "32FC1; png compressed ",
        "mono16; png compressed ",
        "rgb8; png compressed ",
    )
    messages = [
        ("/cam/compressed", COMPRESSED, T0 + k, compressed_msg(store, fmt, png, T0))
        for k, fmt in enumerate(formats)
    ]
    with open_recording(write_recording(tmp_path, "mcap", messages)) as recording:
        frames = list(recording.frames())
    assert [str(f.image) for f in frames[:2]] == [
        f"/cam/compressed at {seconds_text(T0 + k)}: a compressed depth image ({fmt!r}), "
        "not a picture to caption"
        for k, fmt in enumerate(formats[:2])
    ]
    assert [f.image for f in frames[2:]] == [png, png]


def _bag_writer(tmp_path, kind: str):
    """-> (the recording's path, an unopened rosbags writer of it, its type store): a ROS 1 bag
    or a ROS 2 MCAP bag folder under tmp_path/bag."""
    folder = tmp_path / "bag"
    folder.mkdir()
    if kind == "ros1":
        bag = folder / "run.bag"
        return bag, Writer1(bag), store_for(kind)
    bag = folder / "run"
    return bag, Writer2(bag, version=9, storage_plugin=StoragePlugin.MCAP), store_for(kind)


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_an_image_topic_without_messages_is_said_not_passed_over(kind, tmp_path, capfd):
    """A recording whose image topic holds no message (a camera that never published): one line
    saying there was nothing to caption, exit 1 and no copy, as a folder without photos; it had
    printed nothing and exited 0."""
    bag, writer, store = _bag_writer(tmp_path, kind)
    with writer:
        writer.add_connection("/cam", IMAGE, typestore=store)
    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    done = edgecap_caption(capfd, "--bag", bag, "--write-bag", out)
    assert (done.returncode, done.stdout, out.exists()) == (1, "", False)
    assert done.stderr.splitlines() == [f"edgecap: {bag}: no image messages on /cam: nothing to caption"]


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_a_named_topic_without_messages_is_said_beside_one_with_frames(kind, tmp_path, captioner, capfd):
    """``--topic /cam/empty --topic /cam``, /cam/empty a camera that never published: /cam is
    captioned (and its copy written), /cam/empty is the line it would be alone, and the exit
    status is 1. It had been passed over without a word, exit 0, because only a run without a
    single frame was checked. Not named (every image topic), a topic without messages beside
    ones with frames is no error: exit 0, nothing on stderr."""
    bag, writer, store = _bag_writer(tmp_path, kind)
    with writer:
        writer.add_connection("/cam/empty", IMAGE, typestore=store)
        cam = writer.add_connection("/cam", IMAGE, typestore=store)
        serialize = store.serialize_ros1 if kind == "ros1" else store.serialize_cdr
        for k, pixels in enumerate((CHELSEA, COFFEE)):
            msg = image_msg(store, "rgb8", pixels, T0 + k * SECOND)
            writer.write(cam, T0 + k * SECOND, bytes(serialize(msg, IMAGE)))
    captions = [
        f"/cam\t{seconds_text(T0 + k * SECOND)}\t{seconds_text(T0 + k * SECOND)}\t{captioner.caption(p).text}"
        for k, p in enumerate((CHELSEA, COFFEE))
    ]
    said = f"edgecap: {bag}: no image messages on /cam/empty: nothing to caption"

    named = ("--topic", "/cam/empty", "--topic", "/cam")
    done = edgecap_caption(capfd, "--bag", bag, *named)
    assert (done.returncode, done.stdout.splitlines(), done.stderr.splitlines()) == (1, captions, [said])

    out = tmp_path / ("copy.bag" if kind == "ros1" else "copy")
    done = edgecap_caption(capfd, "--bag", bag, *named, "--write-bag", out)
    assert (done.returncode, done.stdout.splitlines()) == (1, captions)
    assert done.stderr.splitlines() == [
        said,
        f"edgecap: wrote {out}: a copy of {bag} with 2 captions (/cam/caption)",
    ]
    assert [m[3].data for m in read_back(out) if m[0] == "/cam/caption"] == [
        c.split("\t")[3] for c in captions
    ]

    done = edgecap_caption(capfd, "--bag", bag)
    assert (done.returncode, done.stdout.splitlines(), done.stderr) == (0, captions, "")


@pytest.mark.parametrize("holds", ["photos", "ros1 bags", "nothing"])
def test_a_folder_that_is_no_ros2_bag_is_not_told_to_reindex(holds, tmp_path):
    """``--bag`` given a folder of photos, of ROS 1 bags, or an empty one: rosbags expects a
    metadata.yaml there, but no ROS 2 recorder wrote one, and ``ros2 bag reindex`` finds no
    storage file to mend: the line says what rosbags says, not that the recorder has not
    stopped."""
    folder = tmp_path / "folder"
    folder.mkdir()
    if holds == "photos":
        (folder / "photo.jpg").write_bytes(encoded_bytes(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    elif holds == "ros1 bags":
        three_frames(tmp_path, "ros1").rename(folder / "run.bag")
    from edgecap.recordings import Recording

    with pytest.raises(RecordingError) as raised:
        Recording(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}: cannot read this recording (") and message.endswith(")"), message
    assert "reindex" not in message


def test_a_db3_that_cannot_be_opened_as_malformed_says_it_may_still_be_recorded(tmp_path, monkeypatch):
    """A .db3 being recorded fails mostly at the open (its schema and topics read mid-write:
    59 of 60 opens so while a writer wrote, measured), not only while its messages are read:
    the open's line says so too."""
    import sqlite3

    from rosbags.highlevel import AnyReader as Reader

    from edgecap.recordings import Recording

    bag = three_frames(tmp_path, "sqlite3")

    def malformed(self):
        raise sqlite3.DatabaseError(f"Cannot open database {bag}: database disk image is malformed")

    monkeypatch.setattr(Reader, "open", malformed)
    with pytest.raises(RecordingError) as raised:
        Recording(bag)
    assert str(raised.value).endswith(
        "database disk image is malformed); a .db3 still being recorded reads so: caption it once the "
        "recorder stops"
    ), str(raised.value)


def test_changes_only_captions_each_topics_scene_once(tmp_path, capfd):
    """--bag --changes-only: /cam/rgb gives the cat, the cat again, the coffee cup; /cam/mono the
    grey cup twice: the second cat and the second grey cup are passed over (each compared with
    its own topic's frame captioned last, not the other topic's), said on stderr; --write-bag's
    copy holds the three captions. Without it, all five."""
    store = store_for("mcap")
    messages = []
    for i, (topic, encoding, pixels) in enumerate(
        (
            ("/cam/rgb", "rgb8", CHELSEA),
            ("/cam/mono", "mono8", GRAY),
            ("/cam/rgb", "rgb8", CHELSEA),
            ("/cam/mono", "mono8", GRAY),
            ("/cam/rgb", "rgb8", COFFEE),
        )
    ):
        time_ns = T0 + i * SECOND
        messages.append(
            (topic, "sensor_msgs/msg/Image", time_ns, image_msg(store, encoding, pixels, time_ns))
        )
    bag = write_recording(tmp_path, "mcap", messages)
    out = tmp_path / "captioned"
    done = edgecap_caption(capfd, "--bag", bag, "--json", "--changes-only", "--write-bag", out)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["topic"], (r["time_ns"] - T0) // SECOND) for r in records] == [
        ("/cam/rgb", 0),
        ("/cam/mono", 1),
        ("/cam/rgb", 4),
    ]
    assert "edgecap: 2 frames passed over as unchanged (1 on /cam/mono, 1 on /cam/rgb)" in done.stderr
    assert "with 3 captions" in done.stderr
    every = edgecap_caption(capfd, "--bag", bag, "--json")
    assert len(every.stdout.splitlines()) == 5 and "unchanged" not in every.stderr


def test_changes_only_captions_every_frame_of_a_compressed_topic(tmp_path, capfd):
    """A compressed topic's frames are bytes, not measured without decoding them: with
    --changes-only the same JPEG twice is captioned twice, and nothing is passed over."""
    store = store_for("mcap")
    jpeg = encoded_bytes(CHELSEA, "JPEG", quality=92)
    messages = [
        (
            "/cam/jpeg",
            "sensor_msgs/msg/CompressedImage",
            T0 + i * SECOND,
            compressed_msg(store, "jpeg", jpeg, T0),
        )
        for i in range(2)
    ]
    bag = write_recording(tmp_path, "mcap", messages)
    done = edgecap_caption(capfd, "--bag", bag, "--changes-only")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert "edgecap: 0 frames passed over as unchanged\n" in done.stderr


def test_hold_keeps_each_topics_words_as_a_stream_of_that_topic_would(tmp_path, capfd):
    """--bag --hold: /cam/a films the astronaut and /cam/b the coffee cup, each frame with its
    own sensor noise, the topics interleaved; each topic's captions are those caption_stream
    with hold gives that topic's frames alone (the other topic's captions never offered), the
    frames held marked "held" and counted per topic on stderr. Without --hold the captions
    flicker and no record has "held"."""
    from edgecap import Captioner
    from edgecap.stream import caption_stream

    rng = np.random.default_rng(0)
    person = photo("astronaut.png").astype(np.float32)
    cup = COFFEE.astype(np.float32)

    def noisy(pixels):
        return np.clip(np.round(pixels + rng.normal(0, 4, pixels.shape)), 0, 255).astype(np.uint8)

    store = store_for("mcap")
    frames = {"/cam/a": [noisy(person) for _ in range(5)], "/cam/b": [noisy(cup) for _ in range(5)]}
    messages = []
    for i in range(10):
        topic = "/cam/a" if i % 2 == 0 else "/cam/b"
        time_ns = T0 + i * SECOND
        pixels = frames[topic][i // 2]
        messages.append((topic, "sensor_msgs/msg/Image", time_ns, image_msg(store, "rgb8", pixels, time_ns)))
    bag = write_recording(tmp_path, "mcap", messages)
    done = edgecap_caption(capfd, "--bag", bag, "--json", "--hold")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    captioner = Captioner()
    for topic in frames:
        want = [e.caption for e in caption_stream(captioner, frames[topic], live=False, hold=True)]
        got = [r for r in records if r["topic"] == topic]
        assert [(r["caption"], r["held"]) for r in got] == [(c.text, c.held) for c in want]
    held = {t: sum(r["held"] for r in records if r["topic"] == t) for t in frames}
    assert sum(held.values()) > 0
    shown = ", ".join(f"{n} on {t}" for t, n in sorted(held.items()) if n)
    assert f"edgecap: {sum(held.values())} captions held ({shown})" in done.stderr
    plain = [json.loads(line) for line in edgecap_caption(capfd, "--bag", bag, "--json").stdout.splitlines()]
    assert "held" not in plain[0] and "held" not in edgecap_caption(capfd, "--bag", bag).stderr
    flicker = [r["caption"] for r in plain if r["topic"] == "/cam/a"]
    assert len(set(flicker)) > len({r["caption"] for r in records if r["topic"] == "/cam/a"})
