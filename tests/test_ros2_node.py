"""``examples/ros2_node.py``, the live ROS 2 captioning node, against stand-ins of the parts of
rclpy, sensor_msgs and std_msgs it uses (ROS 2 is not installed from PyPI; the stand-ins take
the calls as rclpy documents them: ``declare_parameter(name, value).value``,
``create_subscription(type, topic, callback, qos)``, ``create_publisher(type, topic, depth)``,
``get_logger().warning``, ``rclpy.try_shutdown``; once the context is shut down, as rclpy's
SIGINT / SIGTERM handler does, a publisher refuses to publish, as rcl_publish does; a parameter
of the wrong type is rclpy's ParameterException). Expected captions are the README's."""

from __future__ import annotations

import array
import importlib.util
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageFilter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "edgecap" / "assets" / "examples"
CAT = "a cat laying on a bed"  # README.md's caption of chelsea.png
ROCKET = "a man standing in front of a large group of people and a person"  # and of rocket.jpg


class Message:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def header(sec: int, nanosec: int = 0, frame_id: str = "camera") -> Message:
    return Message(stamp=Message(sec=sec, nanosec=nanosec), frame_id=frame_id)


def raw_message(path: Path, encoding: str = "rgb8", sec: int = 100, nanosec: int = 0) -> Message:
    """A sensor_msgs/Image of a photo, its data an array.array('B') as rclpy gives it."""
    pixels = np.asarray(PILImage.open(path).convert("RGB"))
    if encoding == "bgr8":
        pixels = pixels[:, :, ::-1]
    height, width, _ = pixels.shape
    return Message(
        header=header(sec, nanosec),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * 3,
        data=array.array("B", np.ascontiguousarray(pixels).tobytes()),
    )


class Publisher:
    def __init__(self, topic: str, context):
        self.topic_name = topic
        self.published: list = []
        self.context = context

    def publish(self, msg) -> None:
        if not self.context.ok():  # rcl_publish checks the publisher's context (RCLError)
            raise RuntimeError("Failed to publish: publisher's context is invalid")
        self.published.append(msg)


class Logger:
    """Every call in ``lines`` (rclpy's throttling left out: each call is kept), the
    ``throttle_duration_sec`` of each in ``throttles``."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self.throttles: list[float | None] = []

    def _log(self, level: str, message: str, throttle_duration_sec: float | None) -> None:
        self.lines.append((level, message))
        self.throttles.append(throttle_duration_sec)

    def info(self, message, *, throttle_duration_sec=None):
        self._log("info", message, throttle_duration_sec)

    def warning(self, message, *, throttle_duration_sec=None):
        self._log("warning", message, throttle_duration_sec)

    def error(self, message, *, throttle_duration_sec=None):
        self._log("error", message, throttle_duration_sec)


@pytest.fixture
def ros(monkeypatch):
    """The stand-in modules, installed for the test; ``ros.parameters`` sets the node's
    parameters, ``ros.nodes`` holds the nodes made, ``ros.shutdowns`` counts try_shutdown,
    ``ros.context.ok()`` is False once shut down (as rclpy's SIGINT / SIGTERM handler does)."""
    state = types.SimpleNamespace(parameters={}, nodes=[], shutdowns=[], spin=None)
    state.context = types.SimpleNamespace(shut=False)
    state.context.ok = lambda: not state.context.shut

    class ParameterException(Exception):
        pass

    class InvalidParameterTypeException(ParameterException):
        pass

    class NameValidationException(Exception):
        pass

    class Node:
        def __init__(self, name: str):
            self.name = name
            self.subscriptions: list = []
            self.publishers: list[Publisher] = []
            self.logger = Logger()
            self.destroyed = False
            state.nodes.append(self)

        @property
        def context(self):
            return state.context

        def declare_parameter(self, name, value, descriptor=None):
            if name in state.parameters and not getattr(descriptor, "dynamic_typing", False):
                given = state.parameters[name]
                if type(given) is not type(value):
                    raise InvalidParameterTypeException(
                        f"Trying to set parameter '{name}' to '{given}' of type "
                        f"'{type(given).__name__}', expecting type '{type(value).__name__}'"
                    )
            return types.SimpleNamespace(value=state.parameters.get(name, value))

        def create_publisher(self, msg_type, topic, depth):
            assert msg_type is std_msgs.String and depth >= 1
            publisher = Publisher(topic.replace("~", "/" + self.name, 1), state.context)
            self.publishers.append(publisher)
            return publisher

        def create_subscription(self, msg_type, topic, callback, qos):
            self.subscriptions.append((msg_type, topic, callback, qos))

        def get_logger(self):
            return self.logger

        def destroy_node(self):
            self.destroyed = True

    class ExternalShutdownException(Exception):
        pass

    def try_shutdown():
        state.shutdowns.append(True)
        state.context.shut = True

    rclpy = types.ModuleType("rclpy")
    rclpy.init = lambda args=None: setattr(state.context, "shut", False)
    rclpy.try_shutdown = try_shutdown
    rclpy.spin = lambda node: state.spin(node)
    node_module = types.ModuleType("rclpy.node")
    node_module.Node = Node
    exceptions = types.ModuleType("rclpy.exceptions")
    exceptions.ParameterException = ParameterException
    exceptions.NameValidationException = NameValidationException
    executors = types.ModuleType("rclpy.executors")
    executors.ExternalShutdownException = ExternalShutdownException
    qos = types.ModuleType("rclpy.qos")
    qos.qos_profile_sensor_data = object()
    sensor_msgs = types.ModuleType("sensor_msgs.msg")
    sensor_msgs.Image = type("Image", (Message,), {})
    sensor_msgs.CompressedImage = type("CompressedImage", (Message,), {})
    std_msgs = types.ModuleType("std_msgs.msg")
    std_msgs.String = type("String", (Message,), {})
    rcl_interfaces = types.ModuleType("rcl_interfaces.msg")
    rcl_interfaces.ParameterDescriptor = Message
    modules = {
        "rclpy": rclpy,
        "rclpy.node": node_module,
        "rclpy.exceptions": exceptions,
        "rclpy.executors": executors,
        "rclpy.qos": qos,
        "sensor_msgs": types.ModuleType("sensor_msgs"),
        "sensor_msgs.msg": sensor_msgs,
        "std_msgs": types.ModuleType("std_msgs"),
        "std_msgs.msg": std_msgs,
        "rcl_interfaces": types.ModuleType("rcl_interfaces"),
        "rcl_interfaces.msg": rcl_interfaces,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("ros2_node_example", ROOT / "examples" / "ros2_node.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    state.example, state.qos, state.sensor_msgs = example, qos, sensor_msgs
    return state


def deliver(node, msg, timeout: float = 120.0):
    """Hand ``msg`` to the node's subscription and wait for what it leads to (a caption
    published, or a warning or error logged): the next frame only after it, so none is dropped
    as stale. The timeout only guards against a hang."""
    publisher, logger = node.publishers[0], node.logger

    def outcomes() -> tuple[int, int]:
        return len(publisher.published), sum(level != "info" for level, _ in logger.lines)

    before = outcomes()
    node.subscriptions[0][2](msg)
    deadline = time.monotonic() + timeout
    while outcomes() == before:
        assert time.monotonic() < deadline, "the node neither published nor logged"
        time.sleep(0.01)


def last_caption(node) -> dict:
    return json.loads(node.publishers[0].published[-1].data)


def test_a_raw_image_topic_is_captioned_and_published_as_json(ros, default_model_dir, tmp_path):
    """rgb8 and bgr8 sensor_msgs/Image frames give the README's caption of the photo, with the
    frame's stamp and frame_id, on /edgecap/caption; a frame of an unknown encoding is one
    warning naming the topic and the frame's time, and the next frame is still captioned. A
    frame with black bars (the photo letterboxed) says the part captioned in "crop"."""
    from edgecap import Captioner

    ros.parameters["image_topic"] = "/camera/image_raw"
    captioner = Captioner(default_model_dir)
    node = ros.example.CaptionNode(captioner)
    try:
        [(msg_type, topic, _, qos)] = node.subscriptions
        assert (msg_type, topic) == (ros.sensor_msgs.Image, "/camera/image_raw")
        assert qos is ros.qos.qos_profile_sensor_data
        assert node.publishers[0].topic_name == "/edgecap/caption"
        deliver(node, raw_message(EXAMPLES / "chelsea.png", "rgb8", sec=100, nanosec=5))
        record = last_caption(node)
        want = captioner.caption(EXAMPLES / "chelsea.png")
        assert record["text"] == CAT and record["recognisable"] is True
        assert record["stamp"] == {"sec": 100, "nanosec": 5} and record["frame_id"] == "camera"
        assert record["objects"] == [[name, round(p, 4)] for name, p in want.objects]
        assert record["confidence"] == round(want.confidence, 4)
        assert record["dropped"] == 0 and record["latency_ms"] > 0
        assert record["crop"] is None

        bad = raw_message(EXAMPLES / "chelsea.png", sec=101)
        bad.encoding = "weird"
        deliver(node, bad)
        assert node.logger.lines[-1][0] == "warning"
        assert node.logger.lines[-1][1].startswith(
            "/camera/image_raw at 101.000000000: unknown image encoding 'weird' (known: "
        )
        deliver(node, raw_message(EXAMPLES / "chelsea.png", "bgr8", sec=102))
        assert last_caption(node)["text"] == CAT and last_caption(node)["stamp"]["sec"] == 102
        assert len(node.publishers[0].published) == 2
        with PILImage.open(EXAMPLES / "chelsea.png") as im:
            picture = np.asarray(im.convert("RGB").resize((640, 360)))
        framed = np.zeros((480, 640, 3), np.uint8)
        framed[60:420] = picture
        PILImage.fromarray(framed).save(tmp_path / "letterboxed.png")
        deliver(node, raw_message(tmp_path / "letterboxed.png", sec=103))
        assert last_caption(node)["crop"] == [0.0, 0.125, 1.0, 0.875]
    finally:
        node.close()
    assert not node._thread.is_alive()
    with pytest.raises(Exception, match="closed"):
        captioner.caption(EXAMPLES / "chelsea.png")


def test_a_compressed_topic_is_captioned_and_a_truncated_jpeg_is_one_warning(ros, default_model_dir):
    """A topic named .../compressed is subscribed as sensor_msgs/CompressedImage: the JPEG's
    own bytes give the README's caption of rocket.jpg; a frame cut short is one warning naming
    the frame (by its number where the driver left the stamp 0), and the node goes on."""
    from edgecap import Captioner

    ros.parameters["image_topic"] = "/camera/image_raw/compressed"
    node = ros.example.CaptionNode(Captioner(default_model_dir))
    try:
        assert node.subscriptions[0][0] is ros.sensor_msgs.CompressedImage
        jpeg = (EXAMPLES / "rocket.jpg").read_bytes()
        cut = Message(header=header(0), format="jpeg", data=array.array("B", jpeg[: len(jpeg) // 3]))
        deliver(node, cut)
        level, line = node.logger.lines[-1]
        assert level == "warning" and line.startswith("/camera/image_raw/compressed frame 0: ")
        deliver(node, Message(header=header(7, 250, "front"), format="jpeg", data=array.array("B", jpeg)))
        record = last_caption(node)
        assert record["text"] == ROCKET
        assert record["stamp"] == {"sec": 7, "nanosec": 250} and record["frame_id"] == "front"
        depth = Message(header=header(8), format="16UC1; png compressed ", data=array.array("B", b"x"))
        deliver(node, depth)
        assert "a compressed depth image" in node.logger.lines[-1][1]
    finally:
        node.close()


def test_every_samples_by_the_frames_stamps(ros, default_model_dir):
    """``every``: at most one caption per that many seconds of the frames' header stamps (the
    camera's clock, not the arrival time here): frames 0.4 s apart with every 1.0 give captions
    of the frames at 0, 1.2 and 2.0 s after the first."""
    from edgecap import Captioner

    ros.parameters.update(image_topic="/cam", every=1)  # an integer, as every:=1 gives it
    node = ros.example.CaptionNode(Captioner(default_model_dir))
    published = node.publishers[0].published
    try:
        for tenths in range(0, 24, 4):
            before = len(published)
            msg = raw_message(EXAMPLES / "chelsea.png", sec=100 + tenths // 10, nanosec=tenths % 10 * 10**8)
            node.subscriptions[0][2](msg)
            if tenths in (0, 12, 20):  # due: wait for its caption before the next frame
                deadline = time.monotonic() + 120
                while len(published) == before:
                    assert time.monotonic() < deadline, f"no caption of the frame at {tenths / 10} s"
                    time.sleep(0.01)
    finally:
        node.close()
    records = [json.loads(msg.data) for msg in published]
    stamps = [(r["stamp"]["sec"], r["stamp"]["nanosec"]) for r in records]
    assert stamps == [(100, 0), (101, 2 * 10**8), (102, 0)]


def test_closing_a_node_that_never_got_a_frame_returns(ros):
    """close() with no message ever delivered (the camera never started) ends the captioning
    thread and closes the captioner; it does not wait for a frame."""

    class Stand:
        closed = False

        def caption(self, image, color="rgb", return_attention=False):
            raise AssertionError("no frame was delivered")

        def close(self):
            self.closed = True

    captioner = Stand()
    node = ros.example.CaptionNode(captioner)
    node.close()
    assert not node._thread.is_alive() and captioner.closed


def test_a_model_failure_is_logged_and_shuts_the_node_down(ros):
    """The model raising (out of memory) ends the captioning: one error line, rclpy shut down
    so that spin() returns, and main's exit status 1."""

    class Failing:
        def caption(self, image, color="rgb", return_attention=False):
            raise RuntimeError("CUDA out of memory")

        def close(self):
            pass

    readers_before = {t for t in threading.enumerate() if t.name == "edgecap-frame-reader"}
    node = ros.example.CaptionNode(Failing())
    deliver(node, raw_message(EXAMPLES / "chelsea.png"))
    node._thread.join(30)
    assert node.logger.lines[-1] == ("error", "captioning stopped: RuntimeError: CUDA out of memory")
    assert ros.shutdowns and isinstance(node.failure, RuntimeError)
    # the frames ended with the stream: its reader is not left waiting for a message (it had
    # been, and the stream's end waited READER_JOIN_S for it). Waited for here (60 s only
    # guards the wait): on a loaded machine the reader may end after the stream's end, which
    # waits READER_JOIN_S (2 s) for it, has given up
    left = [t for t in threading.enumerate() if t.name == "edgecap-frame-reader" and t not in readers_before]
    for reader in left:
        reader.join(60)
    assert not [t for t in left if t.is_alive()]
    node.close()


def test_main_reports_a_bad_model_and_ends_cleanly_on_ctrl_c(ros, tiny_model_dir, tmp_path, capsys):
    """main(): a model folder that does not exist, or an ``every`` that is not a number or is
    below 0, is one line and exit 2; Ctrl-C during spin
    closes the node (its thread ended, the node destroyed) and exits 0."""
    ros.parameters["model"] = str(tmp_path / "missing")
    assert ros.example.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ros2_node: ") and "missing" in err and len(err.splitlines()) == 1

    ros.parameters.update(model=str(tiny_model_dir), every="often")
    assert ros.example.main([]) == 2
    assert capsys.readouterr().err == "ros2_node: every must be a number of seconds, got 'often'\n"
    # a negative or NaN interval is said before the model loads: with a model folder that does
    # not exist, the error is the interval's
    for every, shown in ((-1, "-1"), (float("nan"), "nan")):
        ros.parameters.update(model=str(tmp_path / "missing"), every=every)
        assert ros.example.main([]) == 2
        assert capsys.readouterr().err == (
            "ros2_node: every must be 0 (as fast as the model goes) or a positive number of seconds, "
            f"got {shown}\n"
        )
    ros.parameters["model"] = str(tiny_model_dir)

    ros.parameters["every"] = 0.5

    def interrupted(node):
        raise KeyboardInterrupt

    ros.spin = interrupted
    assert ros.example.main([]) == 0
    node = ros.nodes[-1]
    assert node.destroyed and not node._thread.is_alive()


def test_message_frames_keep_the_newest_messages(ros):
    """Messages arriving faster than the stream reads them: at most ``keep`` wait, the oldest
    pushed out; closing ends the frames even with none coming."""
    frames = ros.example.MessageFrames("/cam", compressed=False, keep=2)
    for sec in (1, 2, 3):
        frames.put(raw_message(EXAMPLES / "chelsea.png", sec=sec))
    reader = iter(frames)
    first = next(reader)
    assert first.timestamp == 2.0 and first.name == "/cam at 2.000000000"
    frames.close()
    rest = list(reader)  # held, as the stream holds the frame it captions (a header goes with its frame)
    assert [f.timestamp for f in rest] == [3.0]
    assert frames.header(1) == (3 * 10**9, "camera") and frames.header(0) == (0, "")


class Slow:
    """A captioner whose caption waits for ``release``; ``started`` is set once one has begun."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def caption(self, image, color="rgb", return_attention=False):
        self.started.set()
        assert self.release.wait(60)
        return types.SimpleNamespace(text="a cat", recognisable=True, confidence=None, objects=[])

    def warm_up(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_frames_dropped_before_a_frame_that_failed_are_counted_in_the_next_caption(ros):
    """docs/recordings.md: "dropped" counts the frames dropped since the previous caption. Frame
    2 arrives while frame 1 is captioned and is replaced by frame 3, which cannot be captioned
    (an unknown encoding): the drop was the failed frame's event's, which is a warning, not a
    record, so no record ever counted it. Frame 4's record now does (1)."""
    slow = Slow()
    node = ros.example.CaptionNode(slow)
    try:
        callback = node.subscriptions[0][2]
        callback(raw_message(EXAMPLES / "chelsea.png", sec=1))
        assert slow.started.wait(60)
        callback(raw_message(EXAMPLES / "chelsea.png", sec=2))
        bad = raw_message(EXAMPLES / "chelsea.png", sec=3)
        bad.encoding = "weird"
        callback(bad)  # replaces frame 2, which is dropped
        # the stream's reader takes the messages off the node's queue in a thread of its own:
        # frame 1 finishes only once frame 3 has replaced frame 2 (released earlier, the
        # captioner took frame 2 before the reader had read frame 3, and captioned it)
        deadline = time.monotonic() + 60
        while node.stream.stats.dropped < 1:
            assert time.monotonic() < deadline, "frame 3 never replaced frame 2"
            time.sleep(0.01)
        slow.release.set()
        deadline = time.monotonic() + 60
        while not (
            node.publishers[0].published and any(level == "warning" for level, _ in node.logger.lines)
        ):
            assert time.monotonic() < deadline, "frame 1's caption and frame 3's warning never came"
            time.sleep(0.01)
        deliver(node, raw_message(EXAMPLES / "chelsea.png", sec=4))
        records = [json.loads(m.data) for m in node.publishers[0].published]
    finally:
        node.close()
    assert [(r["stamp"]["sec"], r["dropped"]) for r in records] == [(1, 0), (4, 1)]
    assert node.stream.stats.dropped == 1


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_caption_ends_the_node_cleanly(ros, monkeypatch, signal_name):
    """Ctrl-C (or ros2 launch's SIGTERM) while a frame is captioned: rclpy's signal handler
    shuts the context down, after which a publisher refuses to publish. The caption finishing
    then is not published and is no error: no error line, and exit status 0 (it had been
    "captioning stopped: RuntimeError: Failed to publish ..." and 1, every Ctrl-C while the
    camera ran)."""
    slow = Slow()
    monkeypatch.setattr(ros.example, "Captioner", lambda *args, **kwargs: slow)

    def spin(node):
        node.subscriptions[0][2](raw_message(EXAMPLES / "chelsea.png"))
        assert slow.started.wait(60)
        ros.context.shut = True  # rclpy's handler thread: the context shut down
        slow.release.set()
        if signal_name == "SIGINT":
            raise KeyboardInterrupt
        raise ros.example.ExternalShutdownException  # spin's wait wakes to a shut-down context

    ros.spin = spin
    assert ros.example.main([]) == 0
    node = ros.nodes[-1]
    assert node.failure is None and not node._thread.is_alive()
    assert [line for line in node.logger.lines if line[0] != "info"] == []
    assert node.publishers[0].published == []


def test_main_exits_1_when_the_model_fails(ros, monkeypatch):
    """The model failing while spin() runs: one error line, spin returns (the context shut
    down), and main's exit status is 1."""

    class Failing(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ros.example, "Captioner", lambda *args, **kwargs: Failing())

    def spin(node):  # as rclpy.spin: until the context is shut down
        node.subscriptions[0][2](raw_message(EXAMPLES / "chelsea.png"))
        deadline = time.monotonic() + 60
        while ros.context.ok():
            assert time.monotonic() < deadline, "the context was never shut down"
            time.sleep(0.01)

    ros.spin = spin
    assert ros.example.main([]) == 1
    node = ros.nodes[-1]
    assert [line for line in node.logger.lines if line[0] != "info"] == [
        ("error", "captioning stopped: RuntimeError: CUDA out of memory")
    ]


def test_a_parameter_of_the_wrong_type_is_one_line(ros, capsys):
    """``-p beam_size:=5.0`` (rclpy refuses a double for an integer parameter with its
    ParameterException) is one line and exit 2, not a traceback."""
    ros.parameters["beam_size"] = 5.0
    assert ros.example.main([]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ros2_node: Trying to set parameter 'beam_size' to '5.0'")
        and len(err.splitlines()) == 1
    )


def test_frames_that_cannot_be_captioned_leave_no_headers_behind(ros):
    """A topic whose every frame fails (a depth camera's, an unknown encoding): each is one
    warning through rclpy's throttle, counting the failures so far, and its stamp and frame_id
    are let go (they had been kept for a caption that never
    came: a dict growing by one entry a frame for as long as the node ran)."""

    class Unused(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            raise AssertionError("no frame can be captioned")

    node = ros.example.CaptionNode(Unused())
    try:
        for sec in range(5):
            bad = raw_message(EXAMPLES / "chelsea.png", sec=100 + sec)
            bad.encoding = "16UC1"
            deliver(node, bad)
        warnings = [
            (line, every)
            for (level, line), every in zip(node.logger.lines, node.logger.throttles)
            if level == "warning"
        ]
        # each through rclpy's throttle (a depth camera's 30 frames a second: not 30 lines a
        # second), each after the first counting the frames not captioned so far
        assert [every for _, every in warnings] == [5.0] * 5
        assert (
            warnings[0][0].startswith("/image_raw at 100.000000000: a depth image (16UC1)")
            and "so far" not in warnings[0][0]
        )
        assert warnings[4][0].startswith("/image_raw at 104.000000000: ")
        assert warnings[4][0].endswith(" (5 frames not captioned so far)")
        assert node.frames._headers == {}
    finally:
        node.close()


@pytest.mark.parametrize("kind", ["array", "bytes", "bytearray", "list", "ndarray"])
def test_message_image_takes_the_data_of_a_raw_image_in_any_form(kind):
    """``edgecap.recordings.message_image``: a raw image's ``data`` as rclpy gives it
    (array.array), as bytes (a message made by hand, another library's decoder), a list or an
    array: the same pixels and stamp. Bytes had been "message lacks the standard sensor_msgs
    fields: invalid literal for int() with base 10: b'...'", every byte of the image written
    out, and the stamp lost."""
    from edgecap.recordings import message_image

    msg = raw_message(EXAMPLES / "chelsea.png", "rgb8", sec=3, nanosec=4)
    want = np.asarray(PILImage.open(EXAMPLES / "chelsea.png").convert("RGB"))
    raw = msg.data.tobytes()
    msg.data = {
        "array": msg.data,
        "bytes": raw,
        "bytearray": bytearray(raw),
        "list": list(raw),
        "ndarray": np.frombuffer(raw, np.uint8),
    }[kind]
    stamp_ns, image = message_image(msg, False, "/cam frame 0")
    assert stamp_ns == 3 * 10**9 + 4
    assert isinstance(image, np.ndarray) and np.array_equal(image, want)


def send_six_frames_with_every_one_second(node) -> None:
    """Six raw frames of the cat 0.4 s apart (stamps 100.0 to 102.0 s) to a node with ``every``
    1.0: the three it samples (100.0, 101.2, 102.0 s) each waited for until captioned, the three
    it skips sent without waiting."""
    for tenths in range(0, 24, 4):
        msg = raw_message(EXAMPLES / "chelsea.png", sec=100 + tenths // 10, nanosec=tenths % 10 * 10**8)
        if tenths in (0, 12, 20):
            deliver(node, msg)
        else:
            node.subscriptions[0][2](msg)


def test_only_the_frames_captioned_are_converted(ros, monkeypatch):
    """A raw frame's picture is made (``message_image``: a 1080p bgr8 frame 12 ms, a yuv422 one
    35 ms on a 2-core EPYC) for the frames captioned only, not for the ones ``every`` skips: six
    frames 0.4 s apart with every 1.0 give three captions from three conversions (every frame
    had been converted in the reader thread, most of a core for a 30 fps yuv422 camera)."""
    converted = []
    real = ros.example.message_image

    def counting(msg, compressed, name):
        converted.append(msg.header.stamp.sec * 10 + msg.header.stamp.nanosec // 10**8)
        return real(msg, compressed, name)

    monkeypatch.setattr(ros.example, "message_image", counting)

    class Quick(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            assert isinstance(image, np.ndarray) and image.shape == (300, 451, 3)
            return types.SimpleNamespace(text="a cat", recognisable=True, confidence=None, objects=[])

    ros.parameters.update(every=1.0)
    node = ros.example.CaptionNode(Quick())
    published = node.publishers[0].published
    try:
        send_six_frames_with_every_one_second(node)
    finally:
        node.close()
    assert len(published) == 3 and converted == [1000, 1012, 1020]


def test_pick_sharpest_measures_only_the_frames_every_lets_through(ros, monkeypatch):
    """With ``every`` 1.0 and six frames 0.4 s apart, three are sampled: with pick "sharpest"
    those three are measured (on their own bytes) and captioned, the three skipped are neither
    measured nor converted (each frame had been measured as it arrived, before the sampling)."""
    measured, converted = [], []
    real_sharpness, real_image = ros.example.sharpness, ros.example.message_image

    def measuring(view):
        measured.append(view.shape)
        return real_sharpness(view)

    def converting(msg, compressed, name):
        converted.append(msg.header.stamp.sec * 10 + msg.header.stamp.nanosec // 10**8)
        return real_image(msg, compressed, name)

    monkeypatch.setattr(ros.example, "sharpness", measuring)
    monkeypatch.setattr(ros.example, "message_image", converting)

    class Quick(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            return types.SimpleNamespace(text="a cat", recognisable=True, confidence=None, objects=[])

    ros.parameters.update(every=1.0, pick="sharpest")
    node = ros.example.CaptionNode(Quick())
    published = node.publishers[0].published
    try:
        send_six_frames_with_every_one_second(node)
    finally:
        node.close()
    assert len(published) == 3 and converted == [1000, 1012, 1020]
    assert measured == [(300, 451, 3)] * 3


def blurred_message(tmp_path: Path, sec: int) -> Message:
    """chelsea.png blurred (a camera moving during the exposure), as a raw rgb8 frame."""
    path = tmp_path / "blurred.png"
    if not path.exists():
        PILImage.open(EXAMPLES / "chelsea.png").convert("RGB").filter(ImageFilter.BoxBlur(4)).save(path)
    return raw_message(path, sec=sec)


@pytest.mark.parametrize("pick, captioned", [("sharpest", 2), ("newest", 3)])
def test_pick_sharpest_captions_the_sharp_frame_that_came_while_the_model_was_busy(
    ros, monkeypatch, tmp_path, pick, captioned
):
    """``-p pick:=sharpest``: while frame 1 is captioned, a sharp frame (2) and then a blurred
    one (3) arrive; the sharp one is captioned next (the blurred one dropped), the newest without
    the pick. Each raw frame is measured in the stream's reader thread (``MessageFrames.frame``)
    on a view of its bytes; with "newest" none is; and still only the frames captioned are
    converted (``message_image``)."""
    converted, measured, readers = [], [], set()
    real_image, real_sharpness = ros.example.message_image, ros.example.sharpness

    def converting(msg, compressed, name):
        converted.append(msg.header.stamp.sec)
        return real_image(msg, compressed, name)

    def measuring(view):
        measured.append(None if view is None else view.shape)
        readers.add(threading.current_thread().name)
        return real_sharpness(view)

    monkeypatch.setattr(ros.example, "message_image", converting)
    monkeypatch.setattr(ros.example, "sharpness", measuring)
    handled = [threading.Event() for _ in range(3)]

    class Watched(ros.example.MessageFrames):
        def __iter__(self):
            for n, frame in enumerate(super().__iter__()):
                yield frame
                handled[n].set()  # the reader asks for the next frame: done with this one

    monkeypatch.setattr(ros.example, "MessageFrames", Watched)
    ros.parameters["pick"] = pick
    slow = Slow()
    node = ros.example.CaptionNode(slow)
    publisher, two_published = node.publishers[0], threading.Event()

    def publish(msg):
        Publisher.publish(publisher, msg)
        if len(publisher.published) == 2:
            two_published.set()

    publisher.publish = publish
    try:
        callback = node.subscriptions[0][2]
        callback(raw_message(EXAMPLES / "chelsea.png", sec=1))
        assert slow.started.wait(60)
        callback(raw_message(EXAMPLES / "chelsea.png", sec=2))
        callback(blurred_message(tmp_path, sec=3))
        assert handled[2].wait(60), "the reader never took frame 3"
        slow.release.set()
        assert two_published.wait(60), "no caption after frame 1's"
    finally:
        node.close()
    records = [json.loads(m.data) for m in publisher.published]
    assert [(r["stamp"]["sec"], r["dropped"]) for r in records] == [(1, 0), (captioned, 1)]
    assert converted == [1, captioned]
    if pick == "sharpest":
        assert measured == [(300, 451, 3)] * 3 and readers == {"edgecap-frame-reader"}
    else:
        assert measured == []


def test_pick_sharpest_on_a_compressed_topic_says_its_frames_are_taken_as_the_newest(ros, monkeypatch):
    """A compressed topic's frames are not measured (decoding them is most of a caption's cost):
    the node starts, says so once, measures nothing and captions them as the newest."""
    measured = []
    monkeypatch.setattr(ros.example, "raw_sharpness_view", lambda msg: measured.append(msg))

    class Quick(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            assert isinstance(image, bytes)
            return types.SimpleNamespace(text="a rocket", recognisable=True, confidence=None, objects=[])

    ros.parameters.update(image_topic="/cam/compressed", pick="sharpest")
    node = ros.example.CaptionNode(Quick())
    try:
        assert node.stream.pick == "sharpest"
        warnings = [line for level, line in node.logger.lines if level == "warning"]
        assert warnings == [
            "pick sharpest: /cam/compressed's frames are compressed, which are not measured without "
            "decoding them: the newest frame is captioned (subscribe to the raw topic for the pick)"
        ]
        jpeg = (EXAMPLES / "rocket.jpg").read_bytes()
        deliver(node, Message(header=header(7), format="jpeg", data=array.array("B", jpeg)))
        assert last_caption(node)["text"] == "a rocket"
    finally:
        node.close()
    assert measured == []


def test_a_pick_that_is_not_newest_or_sharpest_is_one_line_before_the_model_loads(ros, tmp_path, capsys):
    """``-p pick:=blurriest`` is one line and exit 2, said before the model loads (with a model
    folder that does not exist, the error is the pick's); a pick of the wrong type is rclpy's
    ParameterException, one line too."""
    ros.parameters.update(model=str(tmp_path / "missing"), pick="blurriest")
    assert ros.example.main([]) == 2
    assert capsys.readouterr().err == "ros2_node: pick must be one of newest, sharpest, got 'blurriest'\n"
    ros.parameters["pick"] = 1
    assert ros.example.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ros2_node: Trying to set parameter 'pick' to '1'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_min_change_captions_a_still_scene_once_measured_on_the_messages_bytes(ros, monkeypatch, encoding):
    """``-p min_change:=0.05``: the cat, the same cat again (unchanged: nothing published, not
    converted), then the coffee cup (changed): two captions, for frames 1 and 3; the frames'
    views are the messages' own bytes (``raw_sharpness_view``); without the parameter, three."""
    converted, viewed = [], []
    real_image, real_view = ros.example.message_image, ros.example.raw_sharpness_view

    def converting(msg, compressed, name):
        converted.append(msg.header.stamp.sec)
        return real_image(msg, compressed, name)

    def viewing(msg):
        view = real_view(msg)
        viewed.append(np.shares_memory(view, np.frombuffer(msg.data, np.uint8)))
        return view

    monkeypatch.setattr(ros.example, "message_image", converting)
    monkeypatch.setattr(ros.example, "raw_sharpness_view", viewing)

    class Quick(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            return types.SimpleNamespace(
                text=f"{image.shape}", recognisable=True, confidence=None, objects=[]
            )

    for change, captions in ((0.05, [1, 3]), (0.0, [1, 2, 3])):
        converted.clear()
        viewed.clear()
        ros.parameters["min_change"] = change
        node = ros.example.CaptionNode(Quick())
        try:
            deliver(node, raw_message(EXAMPLES / "chelsea.png", encoding, sec=1))
            if change:
                node.subscriptions[0][2](raw_message(EXAMPLES / "chelsea.png", encoding, sec=2))
                deadline = time.monotonic() + 60
                while node.stream.stats.unchanged == 0:
                    assert time.monotonic() < deadline, "frame 2 was never passed over"
                    time.sleep(0.01)
            else:
                deliver(node, raw_message(EXAMPLES / "chelsea.png", encoding, sec=2))
            deliver(node, raw_message(EXAMPLES / "coffee.png", encoding, sec=3))
        finally:
            node.close()
        records = [json.loads(m.data) for m in node.publishers[0].published]
        assert [r["stamp"]["sec"] for r in records] == captions
        assert converted == captions
        assert viewed == ([True] * 3 if change else [])


def test_min_change_on_a_compressed_topic_says_each_frame_is_captioned(ros):
    ros.parameters.update(image_topic="/cam/compressed", min_change=0.05)

    class Quick(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            return types.SimpleNamespace(text="a rocket", recognisable=True, confidence=None, objects=[])

    node = ros.example.CaptionNode(Quick())
    try:
        warnings = [line for level, line in node.logger.lines if level == "warning"]
        assert warnings == [
            "min_change: /cam/compressed's frames are compressed, which are not measured without "
            "decoding them: each frame due is captioned (subscribe to the raw topic for min_change)"
        ]
        jpeg = (EXAMPLES / "rocket.jpg").read_bytes()
        for sec in (7, 8):
            deliver(node, Message(header=header(sec), format="jpeg", data=array.array("B", jpeg)))
        assert [json.loads(m.data)["stamp"]["sec"] for m in node.publishers[0].published] == [7, 8]
    finally:
        node.close()


def test_frames_passed_over_as_unchanged_leave_no_headers_behind(ros):
    """A robot standing still (``min_change``): six frames of one scene, the first captioned,
    five passed over as unchanged, of which no caption asks the stamp and frame_id. They are let
    go with the frames (they had been kept until the next caption, which a still scene never
    brings: a dict growing by one entry a frame for as long as the robot stood still)."""
    from edgecap.stream import caption_stream

    frames = ros.example.MessageFrames("/image_raw", compressed=False, keep=8, view=True)
    for sec in range(1, 7):
        frames.put(raw_message(EXAMPLES / "chelsea.png", sec=sec))
    frames.close()

    class Quick:
        def caption(self, image, color="rgb", return_attention=False):
            return types.SimpleNamespace(text="a cat", recognisable=True, confidence=None, objects=[])

    stream = caption_stream(Quick(), frames, live=False, on_error="return", min_change=0.05)
    stamps = [frames.header(event.frame_index)[0] for event in stream]
    assert stamps == [1_000_000_000] and stream.stats.unchanged == 5
    assert frames._headers == {}


@pytest.mark.parametrize("change", ["often", True, -0.1, 1.5, float("nan")])
def test_a_min_change_that_is_not_a_share_of_the_view_is_one_line_before_the_model_loads(
    ros, tmp_path, capsys, change
):
    ros.parameters.update(model=str(tmp_path / "missing"), min_change=change)
    assert ros.example.main([]) == 2
    assert capsys.readouterr().err == (
        "ros2_node: min_change must be 0 (every frame due is captioned) or a share of the view up to 1, "
        f"got {change!r}\n"
    )


def test_hold_offers_each_frame_the_caption_published_last_and_says_which_were_held(ros):
    """``-p hold:=true``: the first frame's captioner is offered nothing, each next one the
    caption published before it (the node's stream, ``caption_stream(hold=True)``); a caption
    the captioner held is published with "held": true. Without the parameter nothing is
    offered (a captioner without ``previous`` works) and every record says false."""
    offered = []

    class Holding(Slow):
        texts = ["a cat", "a cat", "a dog"]

        def caption(self, image, color="rgb", return_attention=False, **kwargs):
            previous = kwargs.get("previous", "not offered")
            offered.append(getattr(previous, "text", previous))
            text = self.texts[len(offered) - 1]
            held = previous not in (None, "not offered") and previous.text == text
            return types.SimpleNamespace(text=text, recognisable=True, confidence=None, objects=[], held=held)

    class Plain(Slow):
        def caption(self, image, color="rgb", return_attention=False):
            offered.append("plain")
            return types.SimpleNamespace(text="a cat", recognisable=True, confidence=None, objects=[])

    for hold, captioner, want_offered, want_held in (
        (True, Holding(), [None, "a cat", "a cat"], [False, True, False]),
        (False, Plain(), ["plain"] * 3, [False] * 3),
    ):
        offered.clear()
        ros.parameters["hold"] = hold
        node = ros.example.CaptionNode(captioner)
        try:
            for sec in (1, 2, 3):
                deliver(node, raw_message(EXAMPLES / "chelsea.png", sec=sec))
        finally:
            node.close()
        records = [json.loads(m.data) for m in node.publishers[0].published]
        assert offered == want_offered
        assert [r["held"] for r in records] == want_held


@pytest.mark.parametrize("hold", [True, False])
def test_the_node_warms_up_its_captioner_for_its_hold(ros, tiny_model_dir, monkeypatch, hold):
    """The Captioner the node makes is warmed up with the node's ``hold``: with CUDA graphs, the
    pass that scores the caption published last is captured before the camera runs."""
    warmed = []
    monkeypatch.setattr(
        ros.example.Captioner, "warm_up", lambda self, *args, hold=False, **kwargs: warmed.append(hold)
    )
    ros.parameters.update(model=str(tiny_model_dir), hold=hold)
    ros.example.CaptionNode().close()
    assert warmed == [hold]


@pytest.mark.parametrize("hold", ["yes", 1, 0.0])
def test_a_hold_that_is_not_true_or_false_is_one_line_before_the_model_loads(ros, tmp_path, capsys, hold):
    ros.parameters.update(model=str(tmp_path / "missing"), hold=hold)
    assert ros.example.main([]) == 2
    assert capsys.readouterr().err == f"ros2_node: hold must be true or false, got {hold!r}\n"
