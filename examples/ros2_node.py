"""A ROS 2 node that captions a camera topic live: images in, one JSON caption a frame out.

    source /opt/ros/humble/setup.bash    # rclpy, sensor_msgs, std_msgs come with ROS 2
    python examples/ros2_node.py --ros-args -p image_topic:=/camera/image_raw -p every:=0.5
    ros2 topic echo /edgecap/caption

Subscribes to ``image_topic`` (``sensor_msgs/Image``; ``sensor_msgs/CompressedImage`` when the
name ends in ``/compressed``, image_transport's naming) with the sensor-data QoS, and captions
the newest frame whenever the model is free: when captioning is slower than the camera, older
frames are dropped (``edgecap.stream.caption_stream``, live), so a caption is never more than one
caption's time behind. Each caption is a ``std_msgs/String`` on ``~/caption`` (``/edgecap/caption``)
holding one JSON object: the frame's ``stamp`` ({"sec", "nanosec"}) and ``frame_id``, ``text``,
``recognisable`` (false for a frame with nothing in it, whose text is then "nothing
recognisable"), ``confidence`` (null where the model has none), ``objects`` ([[class,
probability], ...]), ``latency_ms`` (from the frame's arrival to its caption) and ``dropped``
(frames replaced by newer ones since the last caption). ``String`` rather than a message of our
own: every ROS 2 install, ``ros2 topic echo``, rosbag and Foxglove read it without building a
message package.

Parameters: ``image_topic`` (default ``/image_raw``), ``every`` (at most one caption per that
many seconds of the frames' header stamps; 0.0: as fast as the model goes), ``pick`` ("newest",
the default, or "sharpest": of the frames that arrive while the model is busy, the least blurred
rather than the newest, ``caption_stream``'s pick; each raw frame ``every`` lets through is
measured on a view of its message's own bytes, ``edgecap.recordings.raw_sharpness_view``, not
converted: 3.2-3.5 ms for a 1080p frame, where converting a bgr8 one takes 17 ms and a yuv422
one 67 ms; a compressed topic's frames are not measured, so they are taken as the newest, which
the node says once as it starts), ``min_change`` (0.0, the default: every frame due is
captioned; over 0, up to 1: a frame only when that share of its view changed since the frame
captioned last, ``caption_stream``'s ``min_change``; ``edgecap.stream.MIN_CHANGE``, 0.05, keeps
a still robot's frames from being captioned again; a raw frame is measured on a view of its
message's bytes, not converted; a compressed topic's frames are not measured, so each is
captioned, which the node says once as it starts), ``hold`` (false, the default; true: each
frame's captioner is offered the caption published last, kept while it fits the new frames
about as well as their own caption, ``caption_stream``'s ``hold``, so that a scene keeps its
words; the record's ``held`` says so), ``model`` (a model folder; "": the
shipped model), ``backend`` ("auto"), ``device`` ("": the backend's own), ``beam_size`` (3),
``max_length`` (20). The raw encodings ``edgecap caption --bag`` reads are read here the same way
(``edgecap.recordings.message_image``), for the frames captioned only; a frame that cannot be
captioned (an unknown encoding, a truncated JPEG) is one warning naming it, and the node goes
on.

edgecap must be importable by the Python ROS 2 runs: install it into that interpreter, or into a
venv made with ``--system-site-packages`` after sourcing ROS 2 (docs/recordings.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import sys
import threading
import time
import weakref

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import NameValidationException, ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from edgecap import Captioner, EdgecapError, InputError
from edgecap.recordings import header_stamp_ns, message_image, raw_sharpness_view, seconds_text
from edgecap.stream import PICKS, Frame, caption_stream, sharpness

_END = object()
# a topic whose every frame fails (a depth camera's, at 30 frames a second): at most one warning
# this often (rclpy's throttle), each saying how many frames have failed so far
WARN_EVERY_S = 5.0


class MessageFrames:
    """The frames of the messages a subscription hands over (``put``, from the executor's
    thread), as ``caption_stream`` reads them (``__iter__``, from its reader thread): each
    frame's image is the message itself, its picture made only if the stream captions it
    (``MessageCaptioner``), not for the frames ``every`` skips or a newer frame replaces. At
    most ``keep`` messages wait; a newer one pushes the oldest out (the stream keeps only the
    newest frame anyway). ``header(index)`` gives a frame's stamp and frame_id back for its
    caption; a frame the stream lets go of uncaptioned (skipped, dropped, passed over as
    unchanged) takes its own with it. ``measure`` (pick="sharpest" on a raw topic): each frame
    carries a function that measures its ``sharpness`` on a view of the message's own bytes (no
    conversion), which the stream calls, in its reader thread, for the frames that compete (not
    those ``every`` skips). ``view`` (min_change on a raw topic): each frame carries a function giving that
    view (``Frame.view``), which the stream measures for each frame it would caption."""

    def __init__(
        self, topic: str, compressed: bool, keep: int = 4, measure: bool = False, view: bool = False
    ):
        self.topic = topic
        self.compressed = compressed
        self.measure = measure
        self.view = view
        self._waiting: queue.Queue = queue.Queue(keep)
        self._headers: dict[int, tuple[int, str]] = {}
        self._count = 0
        # reentrant: a frame let go (its header with it, ``_forget``) may be freed on any
        # thread, this lock's holder's included
        self._lock = threading.RLock()
        self._started = time.monotonic()

    def put(self, msg) -> None:
        while True:
            try:
                self._waiting.put_nowait(msg)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._waiting.get_nowait()

    def close(self) -> None:
        """End the frames (the reader's ``next`` returns at once, even with no message coming)."""
        self.put(_END)

    def __iter__(self):
        while True:
            msg = self._waiting.get()
            if msg is _END:
                return
            yield self.frame(msg)

    def frame(self, msg) -> Frame:
        index = self._count
        self._count += 1
        stamp_ns, frame_id = message_header(msg)
        with self._lock:
            self._headers[index] = (stamp_ns, frame_id)
        if stamp_ns:  # the camera's clock drives ``every``, and names the frame in errors
            timestamp = stamp_ns / 1e9
            name = f"{self.topic} at {seconds_text(stamp_ns)}"
        else:  # a driver that leaves its stamps 0: the time it arrived here
            timestamp = time.monotonic() - self._started
            name = f"{self.topic} frame {index}"
        # measured by the stream when the frame competes (not for frames every= skips); None
        # where the message cannot be measured as it is (an unknown encoding, a wrong size): the
        # stream then takes it as with pick="newest"
        score = functools.partial(raw_sharpness, msg) if self.measure else None
        view = functools.partial(raw_sharpness_view, msg) if self.view else None
        frame = Frame(index=index, timestamp=timestamp, image=msg, name=name, sharpness=score, view=view)
        # the header goes with the frame: one the stream lets go of uncaptioned (every= skips it,
        # a newer one replaces it, min_change passes it over) is never asked for; a still scene
        # brings no caption to let them go, so they had piled up, one a frame
        weakref.finalize(frame, self._forget, index)
        return frame

    def _forget(self, index: int) -> None:
        with self._lock:
            self._headers.pop(index, None)

    def header(self, index: int) -> tuple[int, str]:
        """Frame ``index``'s (stamp in nanoseconds, frame_id); those of older frames are let go
        (dropped frames are never asked for)."""
        with self._lock:
            for older in [i for i in list(self._headers) if i < index]:
                self._headers.pop(older, None)
            return self._headers.pop(index, (0, ""))


def raw_sharpness(msg) -> float | None:
    """A raw message's ``sharpness``, measured on a view of its own bytes (no conversion)."""
    return sharpness(raw_sharpness_view(msg))


def message_header(msg) -> tuple[int, str]:
    """A message's (header stamp in nanoseconds, frame_id); (0, "") where it has no header."""
    try:
        return header_stamp_ns(msg), str(msg.header.frame_id)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0, ""


class MessageCaptioner:
    """``captioner`` captioning the frames of ``MessageFrames``, whose images are messages: the
    picture is made from the message here, in the captioning thread, for the frames captioned
    only; one that cannot be used raises its ``InputError`` (the stream names it by its frame)."""

    def __init__(self, captioner, frames: MessageFrames):
        self.captioner = captioner
        self.frames = frames

    def caption(self, msg, color: str = "rgb", return_attention: bool = False, **held):
        """``held``: ``previous=`` (the stream's ``hold``), passed on."""
        _, image = message_image(msg, self.frames.compressed, "frame")
        if isinstance(image, InputError):
            raise image
        try:
            return self.captioner.caption(image, color=color, return_attention=return_attention, **held)
        except InputError:
            raise
        except BaseException:
            # the model failing ends the stream, which then waits for its reader, itself waiting
            # for a message that may never come: the frames end now (the reader had held the
            # node's end 2 s, READER_JOIN_S)
            self.frames.close()
            raise


def caption_record(event, stamp_ns: int, frame_id: str, dropped: int | None = None) -> dict:
    """The JSON object published for one captioned frame; ``dropped``: the frames dropped since
    the previous caption published (None: the event's)."""
    caption = event.caption
    return {
        "stamp": {"sec": stamp_ns // 1_000_000_000, "nanosec": stamp_ns % 1_000_000_000},
        "frame_id": frame_id,
        "text": caption.text,
        "recognisable": caption.recognisable,
        "confidence": None if caption.confidence is None else round(caption.confidence, 4),
        "objects": [[name, round(p, 4)] for name, p in caption.objects],
        # the part of the frame captioned, its black bars cropped (None: the whole frame)
        "crop": None if getattr(caption, "crop", None) is None else [round(v, 4) for v in caption.crop],
        "latency_ms": round(event.latency_ms, 1),
        "dropped": event.dropped if dropped is None else dropped,
        # the caption published before, kept for this frame (the node's ``hold``)
        "held": getattr(caption, "held", False) is True,
    }


class CaptionNode(Node):
    """Captions ``image_topic`` in a thread of its own and publishes on ``~/caption``.
    ``captioner``: a made ``Captioner`` to use (None: one made from the parameters)."""

    def __init__(self, captioner: Captioner | None = None):
        super().__init__("edgecap")
        topic = self.declare_parameter("image_topic", "/image_raw").value
        # any number (every:=1 as well as every:=1.0): a fixed DOUBLE refuses an integer
        every = self.declare_parameter("every", 0.0, ParameterDescriptor(dynamic_typing=True)).value
        if isinstance(every, bool) or not isinstance(every, (int, float)):
            raise ValueError(f"every must be a number of seconds, got {every!r}")
        if not every >= 0:  # a negative or NaN interval: said now, not after the model has loaded
            raise ValueError(
                f"every must be 0 (as fast as the model goes) or a positive number of seconds, got {every!r}"
            )
        pick = self.declare_parameter("pick", "newest").value
        if pick not in PICKS:  # said now, not after the model has loaded
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
        change = self.declare_parameter("min_change", 0.0, ParameterDescriptor(dynamic_typing=True)).value
        if isinstance(change, bool) or not isinstance(change, (int, float)) or not 0 <= change <= 1:
            raise ValueError(
                "min_change must be 0 (every frame due is captioned) or a share of the view up to 1, "
                f"got {change!r}"
            )
        hold = self.declare_parameter("hold", False, ParameterDescriptor(dynamic_typing=True)).value
        if not isinstance(hold, bool):
            raise ValueError(f"hold must be true or false, got {hold!r}")
        model = self.declare_parameter("model", "").value
        backend = self.declare_parameter("backend", "auto").value
        device = self.declare_parameter("device", "").value
        beam_size = self.declare_parameter("beam_size", 3).value
        max_length = self.declare_parameter("max_length", 20).value
        if captioner is None:
            captioner = Captioner(
                model or None, backend, device=device or None, beam_size=beam_size, max_length=max_length
            )
            # the first frame's slow parts now, not while the camera runs: the runtime's first
            # run, and on a GPU with CUDA graphs their captures (the hold pass's too, with hold)
            captioner.warm_up((1,), frame_size=(480, 640), hold=hold)
        self.captioner = captioner
        compressed = topic.rstrip("/").endswith("/compressed")
        # a compressed frame is not measured without decoding it (most of what captioning it
        # costs): its topic's frames are taken as the newest
        self.frames = MessageFrames(
            topic,
            compressed,
            measure=pick == "sharpest" and not compressed,
            view=bool(change) and not compressed,
        )
        # live: the newest (or sharpest) frame whenever the model is free; "return": a bad frame
        # is an event
        self.stream = caption_stream(
            MessageCaptioner(captioner, self.frames),
            self.frames,
            every=every or None,
            on_error="return",
            pick=pick,
            min_change=change or None,
            hold=hold,
        )
        self.publisher = self.create_publisher(String, "~/caption", 10)
        self.create_subscription(
            CompressedImage if compressed else Image, topic, self.frames.put, qos_profile_sensor_data
        )
        self.failure: BaseException | None = None
        self.not_captioned = 0  # frames that could not be captioned (``InputError``)
        self._thread = threading.Thread(target=self._caption, name="edgecap-captions", daemon=True)
        self._thread.start()
        kind = "sensor_msgs/CompressedImage" if compressed else "sensor_msgs/Image"
        self.get_logger().info(f"captioning {topic} ({kind}) on {self.publisher.topic_name}")
        if pick == "sharpest" and compressed:
            self.get_logger().warning(
                f"pick sharpest: {topic}'s frames are compressed, which are not measured without "
                "decoding them: the newest frame is captioned (subscribe to the raw topic for the pick)"
            )
        if change and compressed:
            self.get_logger().warning(
                f"min_change: {topic}'s frames are compressed, which are not measured without "
                "decoding them: each frame due is captioned (subscribe to the raw topic for min_change)"
            )

    def _caption(self) -> None:
        # frames dropped before a frame that could not be captioned: counted in the next record
        # published ("dropped": since the previous caption), not lost with the failed frame's
        carried = 0
        try:
            for event in self.stream:
                header = self.frames.header(event.frame_index)  # let go of a failed frame's too
                if isinstance(event.caption, InputError):
                    carried += event.dropped
                    self.not_captioned += 1
                    line = str(event.caption)
                    if self.not_captioned > 1:
                        line += f" ({self.not_captioned} frames not captioned so far)"
                    self.get_logger().warning(line, throttle_duration_sec=WARN_EVERY_S)
                    continue
                message = String(data=json.dumps(caption_record(event, *header, event.dropped + carried)))
                carried = 0
                try:
                    self.publisher.publish(message)
                except Exception:  # noqa: BLE001 (rclpy's RCLError)
                    if self.context.ok():
                        raise
                    # shut down while this frame was captioned (Ctrl-C or SIGTERM: rclpy's signal
                    # handler shuts the context down, and a publisher then refuses to publish):
                    # nowhere to publish it, and nothing went wrong
                    return
        except Exception as exc:  # noqa: BLE001 (the model failing: the node ends, its supervisor may restart it)
            self.failure = exc
            self.get_logger().error(f"captioning stopped: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                rclpy.try_shutdown()  # spin() in the main thread returns

    def close(self) -> None:
        """Stop captioning (the frame being captioned finishes) and release the model."""
        self.frames.close()
        self.stream.close()
        self._thread.join()
        self.captioner.close()


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv)
    try:
        node = CaptionNode()
    except (EdgecapError, ValueError, ParameterException, NameValidationException) as exc:
        # a missing model folder, a bad beam_size, a parameter of the wrong type (beam_size:=5.0,
        # device:=0), an image_topic that is no topic name
        print(f"ros2_node: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if node.failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
