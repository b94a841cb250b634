"""Camera frames from robot recordings, and captions written back next to them.

    from edgecap import Captioner
    from edgecap.recordings import open_recording

    captioner = Captioner()
    with open_recording("run_0412/") as recording:        # a ROS 2 bag folder
        frames = list(recording.frames(every=1.0))         # at most one frame a second a topic
    results = captioner.caption_batch([f.image for f in frames], on_error="return")

Recordings (read by ``rosbags``, pure Python: the ``ros`` extra):

- a ROS 2 bag: its folder (``metadata.yaml`` with sqlite3 or MCAP storage), or one of its
  ``.db3`` / ``.mcap`` files on its own; a plain ``.mcap`` file recorded with the ROS 2 profile;
- a ROS 1 bag (``.bag``, also with bz2 / lz4 chunks);
- a ``.mcap`` file with the ROS 1 profile (``mcap convert`` of a ROS 1 bag), read with the
  ``mcap`` package (``Ros1McapReader``); captions are not written back into these.

Frames come from ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` topics. Raw encodings
(``RAW_ENCODINGS``): rgb8, bgr8, rgba8, bgra8, mono8, mono16, rgb16, bgr16, rgba16, bgra16, 8UC1,
8UC3, 8UC4, the 8- and 16-bit Bayer patterns (demosaicked at half resolution, plenty for the
model's 224-pixel input) and YUV 4:2:2 (``yuv422`` / ``uyvy``, ``yuv422_yuy2`` / ``yuyv``).
Compressed frames (JPEG, PNG, ...) are decoded by ``edgecap.images`` with its format and size
limits. Depth images (16UC1, 32FC1, ``compressedDepth``) are not pictures a caption describes and
are refused. Each frame that cannot be used (an unknown encoding, data of the wrong size, corrupt
compressed bytes, a message that does not deserialise) carries its ``InputError``, naming the
topic and the time; the other frames are unaffected.

Captions go back as ``std_msgs/String`` messages on ``<image topic>/caption`` (``write_captions``),
each with the log time of the frame it describes. Why ``String`` and not a message with a
header: every ROS 1 and ROS 2 install, ``ros2 bag play``, ``rostopic echo`` and Foxglove decode it
without a custom message package (a sqlite3 bag written before ROS 2 Iron carries no message
definitions, so a custom type would be unreadable there), and players and viewers line messages
up by their log time, which is the frame's own. The frame's header stamp is in the caption
records (``Frame.stamp_ns``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecap.errors import EdgecapError, InputError, MissingPackageError, reason
from edgecap.extras import install_hint
from edgecap.files import folder_problem
from edgecap.files import kind_of as file_kind
from edgecap.images import array_to_rgb, pixel_limit_problem, shown_in_repr

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)
STRING = "std_msgs/msg/String"
CAPTION_SUFFIX = "/caption"

# encoding -> (channels, numpy dtype, channel order): what array_to_rgb turns into RGB
RAW_ENCODINGS = {
    "rgb8": (3, np.uint8, "rgb"),
    "bgr8": (3, np.uint8, "bgr"),
    "rgba8": (4, np.uint8, "rgb"),
    "bgra8": (4, np.uint8, "bgr"),
    "mono8": (1, np.uint8, "rgb"),
    "8uc1": (1, np.uint8, "rgb"),
    # OpenCV's channel order, as cv_bridge reads these
    "8uc3": (3, np.uint8, "bgr"),
    "8uc4": (4, np.uint8, "bgr"),
    "mono16": (1, np.uint16, "rgb"),
    "rgb16": (3, np.uint16, "rgb"),
    "bgr16": (3, np.uint16, "bgr"),
    "rgba16": (4, np.uint16, "rgb"),
    "bgra16": (4, np.uint16, "bgr"),
}
BAYER = {
    f"bayer_{p}{bits}": (p, dtype)
    for p in ("rggb", "bggr", "gbrg", "grbg")
    for bits, dtype in (("8", np.uint8), ("16", np.uint16))
}
YUV422 = {"yuv422": "uyvy", "uyvy": "uyvy", "yuv422_yuy2": "yuyv", "yuyv": "yuyv"}
DEPTH = ("16uc1", "32fc1")


class RecordingError(EdgecapError):
    """A recording that cannot be read or written as a whole (missing, corrupt, not a bag, no
    such topic); the message names it and says what is wrong."""


class RecordingBrokeOff(RecordingError):
    """A recording that opened but breaks off while its messages are read (a corrupt chunk):
    what was read before it stands. ``Recording.frames`` raises it once its frames so far are
    out; ``write_captions`` raises it when the copy, which reads every topic, meets it (the
    copy is removed)."""


@dataclass(frozen=True)
class Frame:
    """One image message. ``time_ns``: its log time (when it was recorded; what players and
    viewers order by); ``stamp_ns``: its header stamp (when the camera took it). ``image``: an
    RGB uint8 (H, W, 3) array for a raw frame, the encoded bytes of a compressed one, or the
    ``InputError`` saying why it cannot be used. ``index``: its position among its topic's
    messages (0-based), which tells frames with equal times apart."""

    topic: str
    time_ns: int
    stamp_ns: int
    index: int
    image: np.ndarray | bytes | InputError

    @property
    def name(self) -> str:
        """How errors name the frame: ``TOPIC at SECONDS``."""
        return f"{self.topic} at {seconds_text(self.time_ns)}"

    def __repr__(self) -> str:
        return (
            f"Frame(topic={self.topic!r}, time_ns={self.time_ns!r}, stamp_ns={self.stamp_ns!r}, "
            f"index={self.index!r}, image={shown_in_repr(self.image)})"
        )


def seconds_text(ns: int) -> str:
    """Nanoseconds -> exact seconds with nine decimals (``1700000000.050000000``)."""
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(int(ns)), 1_000_000_000)
    return f"{sign}{whole}.{frac:09d}"


def _rosbags():
    try:
        from rosbags import highlevel, rosbag1, rosbag2, typesys
    except ImportError as exc:
        raise MissingPackageError(f"reading recordings needs rosbags: {install_hint('ros')} ({exc})") from exc
    return highlevel, rosbag1, rosbag2, typesys


# the files of a ROS 2 bag folder that rosbags opens: its metadata and its storage files
_BAG_FOLDER_FILES = (".mcap", ".db3", ".zstd")


def _check_regular_files(path: Path) -> None:
    """``RecordingError`` where the recording ``path`` (a file, or a bag folder's metadata and
    storage files) is a named pipe, a device or a socket: opening a named pipe waits for a
    writer (sqlite's open, of a .db3, even through Ctrl-C and SIGTERM: the run hung), a device
    could be read for ever. What is missing or cannot be read is left to the reader to say."""
    files = [path]
    if path.is_dir():
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        files = [
            path / name
            for name in names
            if name == "metadata.yaml" or name.lower().endswith(_BAG_FOLDER_FILES)
        ]
    for file in files:
        try:
            mode = os.stat(file).st_mode
        except (OSError, ValueError):
            continue
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise RecordingError(f"{file}: is {file_kind(mode)}, not a regular file")


def kind_of(path: str | os.PathLike) -> str:
    """ "ros1" (a .bag file), "mcap" or "sqlite3" (a ROS 2 bag folder, or one storage file).
    ``RecordingError`` for another file, or a named pipe, a device or a socket."""
    path = Path(path)
    _check_regular_files(path)
    if path.is_dir():
        # a bag recorded with --compression-mode file holds run_0.mcap.zstd
        if any(path.glob("*.mcap")) or any(path.glob("*.mcap.zstd")):
            return "mcap"
        return "sqlite3"
    suffix = path.suffix.lower()
    if suffix == ".bag":
        return "ros1"
    if suffix == ".mcap":
        return "mcap-ros1" if mcap_profile(path) == "ros1" else "mcap"
    if suffix == ".db3":
        return "sqlite3"
    raise RecordingError(
        f"{path}: not a recording edgecap reads (a ROS 1 .bag file, a ROS 2 bag "
        "folder, or a .mcap / .db3 file)"
    )


_MCAP_MAGIC = b"\x89MCAP0\r\n"  # an MCAP file's first and last eight bytes


def mcap_profile(path: Path) -> str | None:
    """The profile in an MCAP file's header ("ros2", "ros1", ...; one of at most 64 bytes), None
    when unreadable: no MCAP file, or a header cut before its profile's end."""
    try:
        with open(path, "rb") as f:
            head = f.read(8 + 1 + 8 + 4 + 64)
    except OSError:
        return None
    if not head.startswith(_MCAP_MAGIC) or len(head) < 21 or head[8] != 0x01:
        return None
    size = int.from_bytes(head[17:21], "little")
    if size > 64 or len(head) < 21 + size:
        return None
    return head[21 : 21 + size].decode("utf-8", "replace")


def open_recording(path: str | os.PathLike) -> Recording:
    """Open a recording (see the module docstring); ``RecordingError`` when it cannot be read.
    Use it as a context manager."""
    return Recording(path)


# what rosbags says of a recording its recorder has not closed (killed, or still recording):
# the index, summary or metadata it writes last is not there yet -> what to do about it
_UNFINISHED = (
    *(
        (words, "a ROS 1 bag cut short or still being recorded has no index: rosbag reindex makes one")
        for words in ("not indexed", "Bag index")
    ),
    *(
        (words, "an MCAP file cut short or still being recorded has no end: mcap recover repairs one")
        for words in ("end magic", "Truncated record")  # the latter: cut within its first records
    ),
    (
        "Expected metadata file",
        "a ROS 2 bag folder gets its metadata.yaml when its recorder stops: ros2 bag reindex makes one",
    ),
)


def _unfinished(problem: str, path: Path) -> str:
    hint = next((hint for words, hint in _UNFINISHED if words in problem), None)
    if hint is None or ("metadata.yaml" in hint and not _holds_ros2_storage(path)):
        return ""  # (a folder of photos or of ROS 1 bags is no bag folder that reindex mends)
    return f"; {hint}"


def _holds_ros2_storage(folder: Path) -> bool:
    try:
        return any(name.lower().endswith(_BAG_FOLDER_FILES) for name in os.listdir(folder))
    except OSError:
        return False


class Recording:
    """An open recording: ``image_topics``, ``frames(...)``, ``connections``."""

    def __init__(self, path: str | os.PathLike):
        highlevel, _, _, typesys = _rosbags()
        self.path = Path(path)
        if not self.path.exists():
            raise RecordingError(f"{self.path}: no such file or folder")
        self.kind = kind_of(self.path)
        self.closed = False
        # A ROS 2 sqlite3 bag recorded before Iron carries no message definitions: the standard
        # ones (sensor_msgs, std_msgs) come from rosbags' own ROS 2 type store.
        default = typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)
        try:
            if self.kind == "mcap-ros1":
                self.reader: Any = Ros1McapReader(self.path)  # AnyReader's interface, in part
            else:
                self.reader = highlevel.AnyReader([self.path], default_typestore=default)
                self.reader.open()
        except Exception as exc:  # noqa: BLE001 (rosbags raises many kinds on corrupt files)
            raise RecordingError(
                f"{self.path}: cannot read this recording ({reason(exc)})"
                f"{_unfinished(str(exc), self.path) or self._still(exc)}"
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        # an open AnyReader has a stack from rosbags 0.11.6, isopen before (edgecap[ros]: >= 0.11)
        reader = self.reader
        is_open = reader.stack is not None if hasattr(reader, "stack") else reader.isopen
        if is_open:
            reader.close()

    # Read after close() (its with block ended): one error that says so. It had been the reader's
    # words for a closed file, as a recording that breaks off ("seek of closed file"), "no image
    # topic" (a closed reader has no connections) or a frame that "cannot deserialise".
    def _closed_error(self) -> RecordingError:
        return RecordingError(
            f"{self.path}: the recording is closed (its with block has ended, or close() was "
            "called): read its frames and write its copy while it is open"
        )

    @property
    def connections(self) -> list:
        if self.closed:
            raise self._closed_error()
        return self.reader.connections

    @property
    def image_topics(self) -> dict[str, str]:
        """topic -> message type, for the topics that hold images, sorted by topic."""
        return dict(sorted((c.topic, c.msgtype) for c in self.connections if c.msgtype in IMAGE_TYPES))

    def check_topics(self, topics: Iterable[str] | None) -> list[str]:
        """The image topics to read: ``topics`` (each must be an image topic of the recording, and
        at least one), or all of them when None; ``RecordingError`` otherwise."""
        available = self.image_topics
        if not available:
            others = ", ".join(sorted({f"{c.topic} ({c.msgtype})" for c in self.connections}))
            raise RecordingError(
                f"{self.path}: no sensor_msgs/Image or CompressedImage topic (topics: {others or 'none'})"
            )
        if topics is None:
            return list(available)
        wanted = list(dict.fromkeys(topics))
        if not wanted:  # an empty selection (a filter that matched nothing): no frames, silently
            raise RecordingError(
                f"{self.path}: no topic given (None: every image topic); image topics: {', '.join(available)}"
            )
        for topic in wanted:
            if topic not in available:
                types = {c.topic: c.msgtype for c in self.connections}
                what = (
                    f"is a {types[topic]} topic, not an image topic"
                    if topic in types
                    else "is not in the recording"
                )
                raise RecordingError(
                    f"{self.path}: topic {topic} {what}; image topics: {', '.join(available)}"
                )
        return wanted

    def frames(self, topics: Iterable[str] | None = None, every: float | None = None) -> Iterator[Frame]:
        """The image messages of ``topics`` (None: every image topic) in log-time order, at most
        one per ``every`` seconds of log time on each topic (None: all). A message that cannot
        be used is a ``Frame`` whose ``image`` is its ``InputError``. A recording that breaks
        while it is read raises ``RecordingBrokeOff`` (a ``RecordingError``). Checked here, not
        when the frames are first asked for: a topic the recording has no images on
        (``RecordingError``) and an ``every`` that is not None or a positive number of seconds
        (``ValueError``)."""
        from edgecap.stream import _check_every, _Sampler  # the sampling grid of --video's --every

        _check_every(every)  # also when no topic would make a sampler
        chosen = self.check_topics(topics)
        samplers = {topic: _Sampler(every) for topic in chosen}
        return self._frames(chosen, samplers)

    def _frames(self, chosen: list[str], samplers: dict) -> Iterator[Frame]:
        # a topic may also have a connection of another type (two publishers): not frames
        connections = [c for c in self.connections if c.topic in chosen and c.msgtype in IMAGE_TYPES]
        counts = dict.fromkeys(chosen, 0)
        # a recording defines its own types: one whose sensor_msgs/Image lacks the standard
        # fields (or has them with other types) gives frames that each carry that problem
        problems = {c.id: _type_problem(self.reader.typestore, c.msgtype) for c in connections}
        for connection, time_ns, raw in self._messages(connections):
            index = counts[connection.topic]
            counts[connection.topic] += 1
            if not samplers[connection.topic].take(time_ns / 1e9):
                continue
            yield self._frame(connection, time_ns, raw, index, problems.get(connection.id))

    def messages(self) -> Iterator[tuple[Any, int, bytes]]:  # (rosbags Connection, ...)
        """Every message, raw: (connection, log time ns, serialised bytes), in log-time order."""
        return self._messages(())

    def _messages(self, connections) -> Iterator[tuple[Any, int, bytes]]:
        if self.closed:
            raise self._closed_error()
        try:
            yield from self.reader.messages(connections=connections)
        except Exception as exc:  # noqa: BLE001 (a corrupt chunk, a truncated file)
            if self.closed:  # closed while read
                raise self._closed_error() from None
            raise RecordingBrokeOff(
                f"{self.path}: the recording breaks off while being read ({reason(exc)}){self._still(exc)}"
            ) from None

    def _still(self, exc: BaseException) -> str:
        """A .db3 is read without sqlite's locks (rosbags opens it immutable): one still being
        recorded reads as malformed, opened or read, though it is whole once the recorder stops."""
        if self.kind == "sqlite3" and "malformed" in str(exc):
            return "; a .db3 still being recorded reads so: caption it once the recorder stops"
        return ""

    def _frame(
        self, connection, time_ns: int, raw: bytes, index: int, type_problem: str | None = None
    ) -> Frame:
        name = f"{connection.topic} at {seconds_text(time_ns)}"
        stamp_ns = 0
        image: np.ndarray | bytes | InputError
        if type_problem is not None:
            return Frame(connection.topic, time_ns, 0, index, InputError(name, type_problem))
        try:
            msg = self.reader.deserialize(raw, connection.msgtype)
        except Exception as exc:  # noqa: BLE001 (a message that does not match its type)
            if self.closed:  # read after its recording was closed: no fault of the message's
                raise self._closed_error() from None
            image = InputError(name, f"cannot deserialise this {connection.msgtype} message ({reason(exc)})")
        else:
            stamp_ns, image = message_image(msg, connection.msgtype == COMPRESSED, name)
        return Frame(connection.topic, time_ns, stamp_ns, index, image)


class Ros1McapReader:
    """The part of rosbags' ``AnyReader`` that ``Recording`` uses, for an MCAP file with the
    ROS 1 profile (what ``mcap convert`` makes of a ROS 1 bag), which rosbags does not read: the
    ``mcap`` package reads the records, rosbags' type system deserialises the ROS 1 messages
    from the definitions the file carries."""

    def __init__(self, path: Path):
        try:
            from mcap.reader import make_reader
        except ImportError as exc:
            raise MissingPackageError(
                f"reading a ROS 1-profile MCAP file needs mcap: {install_hint('ros')} ({exc})"
            ) from exc
        _, _, _, typesys = _rosbags()
        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.stack: bool | None = True
        try:
            # the mcap package reads the summary from where the footer should be: of a file cut
            # short it read whatever lies there ("unknown (opcode 222) record has length ...",
            # "[Errno 22] Invalid argument"); said as rosbags says it of a ROS 2-profile one, so
            # that the error names mcap recover (_UNFINISHED)
            size = self.file.seek(0, os.SEEK_END)
            self.file.seek(max(size - len(_MCAP_MAGIC), 0))
            if size < 2 * len(_MCAP_MAGIC) or self.file.read() != _MCAP_MAGIC:
                raise ValueError("File end magic is invalid.")
            self.file.seek(0)
            self._reader = make_reader(self.file)
            summary = self._reader.get_summary()
            if summary is None:
                raise RecordingError(f"{path}: MCAP file without a summary section")
            types: dict = {}
            self.connections = []
            for channel in sorted(summary.channels.values(), key=lambda c: c.id):
                schema = summary.schemas.get(channel.schema_id)
                if schema is None or schema.encoding != "ros1msg":
                    continue  # not a ROS 1 message: not an image topic either
                msgtype = _ros2_name(schema.name)
                types.update(typesys.get_types_from_msg(schema.data.decode(), msgtype))
                self.connections.append(_Channel(channel.id, channel.topic, msgtype))
            self.typestore = typesys.get_typestore(typesys.Stores.EMPTY)
            self.typestore.register(types)
        except BaseException:
            self.close()
            raise

    def messages(self, connections=()):
        wanted = {c.id: c for c in (connections or self.connections)}
        for _, channel, message in self._reader.iter_messages(
            topics=sorted({c.topic for c in wanted.values()}), log_time_order=True
        ):
            if channel.id in wanted:
                yield wanted[channel.id], message.log_time, message.data

    def deserialize(self, raw: bytes, msgtype: str):
        return self.typestore.deserialize_ros1(raw, msgtype)

    def close(self) -> None:
        self.stack = None
        self.file.close()


@dataclass(frozen=True)
class _Channel:
    id: int
    topic: str
    msgtype: str


_INT = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool")
# the fields edgecap reads, as (name, what it must be): "int", "string", "uint8[]" or a type
_FIELDS = {
    IMAGE: (
        ("header", "std_msgs/msg/Header"),
        ("height", "int"),
        ("width", "int"),
        ("encoding", "string"),
        ("is_bigendian", "int"),
        ("step", "int"),
        ("data", "uint8[]"),
    ),
    COMPRESSED: (("header", "std_msgs/msg/Header"), ("format", "string"), ("data", "uint8[]")),
    "std_msgs/msg/Header": (("stamp", "builtin_interfaces/msg/Time"),),
    "builtin_interfaces/msg/Time": (("sec", "int"), ("nanosec", "int")),
}


def _type_problem(typestore, msgtype: str) -> str | None:
    """None when the recording's definition of ``msgtype`` (an image type) has the standard
    fields edgecap reads, with their types; else the problem, e.g. "message lacks the standard
    sensor_msgs fields: header, height (std_msgs/msg/Header, uint32)"."""
    wrong: list[str] = []

    def check(typename: str, prefix: str) -> None:
        fields = dict(getattr(typestore, "fielddefs", {}).get(typename, ((), ()))[1])
        for field, want in _FIELDS[typename]:
            node = fields.get(field)
            kind: Any
            details: Any  # rosbags' field definition: (kind, details), details by kind
            kind, details = node if node is not None else (None, None)
            kind = getattr(kind, "name", kind)
            if want == "int":
                ok = kind == "BASE" and details[0] in _INT
            elif want == "string":
                ok = kind == "BASE" and details[0] == "string"
            elif want == "uint8[]":
                ok = (
                    kind in ("SEQUENCE", "ARRAY")
                    and getattr(details[0][0], "name", None) == "BASE"
                    and details[0][1][0] in ("uint8", "int8", "char", "byte")
                )
            else:
                ok = kind == "NAME" and details == want
                if ok:
                    check(want, f"{prefix}{field}.")
                    continue
            if not ok:
                wrong.append(f"{prefix}{field} ({want})")

    check(msgtype, "")
    if not wrong:
        return None
    return f"message lacks the standard sensor_msgs fields: {', '.join(wrong)}"


def _ros2_name(name: str) -> str:
    """ROS 1 type names (sensor_msgs/Image) as rosbags spells every type (sensor_msgs/msg/Image)."""
    package, _, message = name.rpartition("/")
    return name if "/msg/" in name or not package else f"{package}/msg/{message}"


def _check_compressed(fmt: str, name: str) -> None:
    # image_transport's "compressed" plugin also carries depth images, as 16-bit PNG: its format
    # names the image's encoding first ("16UC1; png compressed ")
    depth = fmt.split(";")[0].strip().lower() in DEPTH
    if depth or "compresseddepth" in fmt.lower().replace(" ", ""):
        raise InputError(name, f"a compressed depth image ({fmt!r}), not a picture to caption")


def header_stamp_ns(msg) -> int:
    """A message's header stamp in nanoseconds (AttributeError, TypeError, ValueError or
    OverflowError where its header is not a ``std_msgs/Header``)."""
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def message_image(msg, compressed: bool, name: str) -> tuple[int, np.ndarray | bytes | InputError]:
    """A ``sensor_msgs/Image`` or, ``compressed``, ``sensor_msgs/CompressedImage`` message (a
    recording's, or a live topic's: any object with the message's fields) -> (its header stamp
    in nanoseconds, its picture): an RGB uint8 array of a raw image, the encoded bytes of a
    compressed one (``Captioner.caption`` decodes them), or the ``InputError`` naming the frame
    (``name``) of one that cannot be used (stamp 0 where the header is not a header; the
    header's stamp where another field is not what it should be)."""
    stamp_ns = 0
    try:
        stamp_ns = header_stamp_ns(msg)
        if not compressed:
            return stamp_ns, raw_to_rgb(msg, name)
        _check_compressed(msg.format, name)
        data = bytes(msg.data)
    except InputError as exc:
        return stamp_ns, exc
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        # a recording's types passed _type_problem's checks, yet a field is not what it should be
        # (the header's stamp kept where it was read: only another field is not)
        return stamp_ns, InputError(name, f"message lacks the standard sensor_msgs fields: {reason(exc)}")
    return stamp_ns, data if data else InputError(name, "no image data (0 bytes)")


def raw_to_rgb(msg, name: str) -> np.ndarray:
    """A ``sensor_msgs/Image`` (any object with its fields) -> RGB uint8 (H, W, 3); ``InputError``
    naming the frame for an unknown encoding or data of the wrong size."""
    encoding, pixels = _raw_pixels(msg, name)
    # one block, as before the view was shared: rows padded past their pixels, or 16-bit pixels
    # off their alignment (an odd step), are copied
    pixels = np.ascontiguousarray(pixels)
    if encoding in BAYER:
        pixels = demosaic_half(pixels[:, :, 0], BAYER[encoding][0], name)
    elif encoding in YUV422:
        height, width, _ = pixels.shape
        return yuv422_to_rgb(pixels.reshape(height, width * 2), YUV422[encoding], name)
    return array_to_rgb(pixels, RAW_ENCODINGS[encoding][2] if encoding in RAW_ENCODINGS else "rgb", name)


def _raw_pixels(msg, name: str) -> tuple[str, np.ndarray]:
    """A ``sensor_msgs/Image``'s (encoding, lower case; its pixels (H, W, C) in the encoding's
    dtype and byte order, C 2 for YUV 4:2:2's byte pairs): a view of ``msg.data`` where that is
    a buffer (bytes, bytearray, rclpy's array.array, an array), its rows ``step`` bytes apart,
    nothing copied. ``InputError`` naming the frame for no pixels, too many, a depth image, an
    unknown encoding or data of the wrong size; a field that is not what it should be raises
    what reading it raises (AttributeError, TypeError, ValueError, OverflowError)."""
    encoding = str(msg.encoding).strip().lower()
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height < 1 or width < 1:
        raise InputError(name, f"image has no pixels ({width}x{height})")
    too_big = pixel_limit_problem(width, height)
    if too_big:
        raise InputError(name, too_big)
    if encoding in DEPTH:
        raise InputError(name, f"a depth image ({msg.encoding}), not a picture to caption")
    if encoding in RAW_ENCODINGS:
        channels, dtype, _ = RAW_ENCODINGS[encoding]
    elif encoding in BAYER:
        channels, dtype = 1, BAYER[encoding][1]
    elif encoding in YUV422:
        channels, dtype = 2, np.uint8
    else:
        known = sorted([*RAW_ENCODINGS, *BAYER, *YUV422])
        raise InputError(name, f"unknown image encoding {msg.encoding!r} (known: {', '.join(known)})")
    dtype = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    # bytes are one buffer to numpy, not a sequence of numbers: np.asarray(b"...", np.uint8)
    # raises, with all the image's bytes in its message. One block (copied only where the data
    # is strided, a slice's every other byte): numpy views no strided bytes as 16-bit pixels
    data = (
        np.frombuffer(msg.data, np.uint8)
        if isinstance(msg.data, (bytes, bytearray))
        else np.ascontiguousarray(np.asarray(msg.data, dtype=np.uint8).reshape(-1))
    )
    if step < row_bytes:
        raise InputError(
            name, f"step {step} is shorter than a row of {width} {msg.encoding} pixels ({row_bytes} bytes)"
        )
    if data.size != step * height:
        raise InputError(
            name,
            f"data is {data.size:,} bytes, but {width}x{height} "
            f"{msg.encoding} with step {step} needs {step * height:,}",
        )
    # each row's pixels as the dtype (a view: its bytes are contiguous, the rows step apart)
    rows = data.reshape(height, step)[:, :row_bytes]
    return encoding, rows.view(dtype).reshape(height, width, channels)


def raw_sharpness_view(msg) -> np.ndarray | None:
    """A raw ``sensor_msgs/Image``'s pixels as ``edgecap.stream.sharpness`` measures them, without
    converting it: a view of its bytes (nothing copied where ``data`` is a buffer: bytes,
    bytearray, rclpy's array.array). rgb8, bgr8, rgba8, bgra8 (8UC3, 8UC4) and their 16-bit
    kinds as (H, W, C), which ``sharpness`` reads the green channel of (channel 1, in either
    order); mono8 / mono16 / 8UC1 and the Bayer mosaics as (H, W) (a 2x2 block of a Bayer
    mosaic, which ``sharpness`` sums, is R + 2 G + B: a luminance); YUV 4:2:2 as its Y bytes
    (H, W), a strided view. 16-bit pixels in their own byte order. None for anything else: a
    depth or unknown encoding, data of the wrong size, an odd width of YUV 4:2:2, a message
    lacking the fields (a compressed one); it never raises (it runs in a live stream's reader
    thread, for each frame that competes)."""
    try:
        encoding, pixels = _raw_pixels(msg, "frame")
    except Exception:  # noqa: BLE001 (InputError, or a field that is not what it should be)
        return None
    if encoding in YUV422:
        if pixels.shape[1] % 2:  # yuv422_to_rgb refuses it: not a picture to measure either
            return None
        # the byte pairs: (U, Y), (V, Y) in UYVY; (Y, U), (Y, V) in YUYV
        return pixels[:, :, 1 if YUV422[encoding] == "uyvy" else 0]
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def demosaic_half(mosaic: np.ndarray, pattern: str, name: str) -> np.ndarray:
    """A Bayer mosaic (H, W) -> RGB (H // 2, W // 2, 3) of the same dtype: each 2x2 cell gives
    one pixel (its red, the mean of its two greens, its blue). ``pattern``: the cell's colours
    row by row ("rggb")."""
    h, w = mosaic.shape[0] // 2 * 2, mosaic.shape[1] // 2 * 2
    if h == 0 or w == 0:
        raise InputError(
            name, f"a Bayer image needs at least 2x2 pixels, got {mosaic.shape[1]}x{mosaic.shape[0]}"
        )
    cells = {
        (0, 0): mosaic[0:h:2, 0:w:2],
        (0, 1): mosaic[0:h:2, 1:w:2],
        (1, 0): mosaic[1:h:2, 0:w:2],
        (1, 1): mosaic[1:h:2, 1:w:2],
    }
    where = dict(zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern))
    greens = [cells[k].astype(np.uint32) for k, c in where.items() if c == "g"]
    red = next(cells[k] for k, c in where.items() if c == "r")
    blue = next(cells[k] for k, c in where.items() if c == "b")
    green = ((greens[0] + greens[1] + 1) // 2).astype(mosaic.dtype)
    return np.stack([red, green, blue], axis=2)


def yuv422_to_rgb(packed: np.ndarray, order: str, name: str) -> np.ndarray:
    """Packed YUV 4:2:2, uint8 (H, 2 W) -> RGB uint8 (H, W, 3), BT.601 limited range (the
    conversion OpenCV's ``COLOR_YUV2RGB_UYVY`` / ``_YUYV`` does, so cv_bridge's). ``order``:
    "uyvy" or "yuyv"."""
    height, n = packed.shape
    if n % 4:
        raise InputError(name, f"YUV 4:2:2 needs an even width, got {n // 2}")
    quads = packed.reshape(height, n // 4, 4).astype(np.float32)
    if order == "uyvy":
        u, y0, v, y1 = (quads[:, :, i] for i in range(4))
    else:
        y0, u, y1, v = (quads[:, :, i] for i in range(4))
    y = np.stack([y0, y1], axis=2).reshape(height, n // 2) - 16.0
    u = np.repeat(u - 128.0, 2, axis=1)
    v = np.repeat(v - 128.0, 2, axis=1)
    y *= 1.164
    rgb = np.stack([y + 1.596 * v, y - 0.391 * u - 0.813 * v, y + 2.018 * u], axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# -- captions back into a recording ------------------------------------------------------------
def output_problem(source: str | os.PathLike, out: str | os.PathLike) -> str | None:
    """What is wrong with writing ``out`` as the captioned copy of ``source``, or None.
    A ROS 1 bag gives a ROS 1 ``.bag`` file; a ROS 2 bag or MCAP file gives a ROS 2 bag folder
    with the same storage (sqlite3 or MCAP)."""
    out = Path(out)
    try:
        os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        pass  # a new name (one below a file: its folder is checked below)
    except OSError as exc:  # a name too long, a loop of links: lexists says False
        return f"{out}: {exc.strerror or exc}"
    else:
        return f"{out} exists already; name a new file or folder"
    if not os.path.lexists(source):  # open_recording says so, as without --write-bag
        return None
    if kind_of(source) == "mcap-ros1":
        return (
            f"{out}: captions are not written into a copy of a ROS 1-profile MCAP file; "
            "caption the ROS 1 bag it was converted from"
        )
    ros1_in = kind_of(source) == "ros1"
    suffix = out.suffix.lower()
    if ros1_in != (suffix == ".bag") or (not ros1_in and suffix in (".mcap", ".db3")):
        # a folder named run.mcap, holding run.mcap.mcap, is not the file that name promises
        return (
            f"{out}: a ROS 1 bag is written to a .bag file"
            if ros1_in
            else f"{out}: a ROS 2 recording is written to a ROS 2 bag folder "
            "(a name without .bag, .mcap or .db3)"
        )
    problem = folder_problem(out)  # (a file there is no folder that is missing)
    return f"{out}: {problem}" if problem else None


def caption_topic(topic: str) -> str:
    return topic.rstrip("/") + CAPTION_SUFFIX


def check_caption_topics(recording: Recording, topics: Iterable[str]) -> None:
    """``RecordingError`` when the recording already has the caption topic of one of ``topics``
    (its captions would be mixed into it); ``edgecap caption --write-bag`` asks before it
    captions, so that a long recording is not captioned for a copy that cannot be written."""
    taken = {c.topic for c in recording.connections} & {caption_topic(t) for t in topics}
    if taken:
        raise RecordingError(
            f"{recording.path}: already has a topic {min(taken)}; captions would be mixed into it"
        )


def write_captions(recording: Recording, out: str | os.PathLike, captions: dict[tuple[str, int], str]) -> int:
    """Write a copy of ``recording`` to ``out`` with, for each ``(topic, index): text`` of
    ``captions``, a ``std_msgs/String`` on ``caption_topic(topic)`` at the log time of that
    frame (the ``index``-th message of ``topic``). Every message is copied unchanged, in order,
    each caption just after its frame. -> the number of captions written. ``RecordingError`` when
    a caption's topic is not an image topic of the recording (nothing written) or the copy
    cannot be written, ``RecordingBrokeOff`` when the recording breaks off while it is copied
    (every topic is read, also those that were not captioned); a half-written copy is removed."""
    _, rosbag1, rosbag2, typesys = _rosbags()
    problem = output_problem(recording.path, out)
    if problem:
        raise RecordingError(problem)

    ros1 = recording.kind == "ros1"
    topics = {topic for topic, _ in captions}
    if topics:  # a caption for a topic it lacks would go nowhere (no captions: a plain copy)
        recording.check_topics(sorted(topics))
    check_caption_topics(recording, topics)
    store = typesys.get_typestore(typesys.Stores.ROS1_NOETIC if ros1 else typesys.Stores.ROS2_HUMBLE)
    string_type = store.types[STRING]
    serialize = store.serialize_ros1 if ros1 else store.serialize_cdr
    try:  # nothing is written yet: a failure here has no copy to remove
        if ros1:
            writer = rosbag1.Writer(out)
        else:
            plugin = rosbag2.StoragePlugin.MCAP if recording.kind == "mcap" else rosbag2.StoragePlugin.SQLITE3
            writer = rosbag2.Writer(out, version=9, storage_plugin=plugin)
    except Exception as exc:  # noqa: BLE001 (rosbags' WriterError: it exists now; an OSError)
        raise RecordingError(f"{out}: cannot write the captioned copy ({reason(exc)})") from None
    written = 0
    try:
        writer.open()
        copies = {
            id(c): _copy_connection(writer, c, recording.reader.typestore, ros1)
            for c in recording.connections
        }
        outputs = {
            t: writer.add_connection(caption_topic(t), STRING, typestore=store) for t in sorted(topics)
        }
        counts: dict[str, int] = {}
        for connection, time_ns, raw in recording.messages():
            writer.write(copies[id(connection)], time_ns, raw)
            if connection.msgtype not in IMAGE_TYPES:  # counted as Recording.frames counts
                continue
            index = counts.get(connection.topic, 0)
            counts[connection.topic] = index + 1
            text = captions.get((connection.topic, index))
            if text is not None:
                writer.write(
                    outputs[connection.topic], time_ns, bytes(serialize(string_type(data=text), STRING))
                )
                written += 1
        writer.close()
    except BaseException as exc:
        _abort(writer, out)
        if isinstance(exc, RecordingError) or not isinstance(exc, Exception):
            raise
        raise RecordingError(f"{out}: cannot write the captioned copy ({reason(exc)})") from None
    return written


def _copy_connection(writer, connection, typestore, ros1: bool):
    """The writer's connection for a copy of ``connection``, its definition and digest kept."""
    has_definition = bool(connection.msgdef.data) and bool(connection.digest)
    definition = {"msgdef": connection.msgdef.data} if has_definition else {"typestore": typestore}
    if ros1:
        extra = {
            "md5sum": connection.digest,
            "callerid": connection.ext.callerid,
            "latching": connection.ext.latching,
        }
    else:
        extra = {
            "rihs01": connection.digest,
            "serialization_format": connection.ext.serialization_format,
            "offered_qos_profiles": connection.ext.offered_qos_profiles,
        }
    if not has_definition:
        extra.pop("md5sum" if ros1 else "rihs01")
    return writer.add_connection(connection.topic, connection.msgtype, **definition, **extra)


def _abort(writer, out) -> None:
    with contextlib.suppress(Exception):  # already failing; the partial output goes below
        writer.abort()
    out = Path(out)
    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    elif out.exists():
        out.unlink()
