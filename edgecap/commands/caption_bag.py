"""``edgecap caption --bag PATH [--topic T ...] [--every SECONDS] [--write-bag OUT]``: caption the
image topics of a robot recording (``edgecap.recordings``: ROS 1 bags, ROS 2 bags with sqlite3 or
MCAP storage, plain MCAP files).

One record per captioned frame: plain ``TOPIC<TAB>TIME<TAB>STAMP<TAB>caption`` (times in seconds
with nine decimals: the message's log time and its header stamp), or with ``--json`` ``bag``,
``topic``, ``time_ns``, ``stamp_ns`` (integers, nanoseconds) and the caption fields of
``edgecap caption --json``. A frame that cannot be captioned is reported on stderr as
``edgecap: BAG: TOPIC at TIME: problem`` and the others are kept (exit 1). ``--write-bag OUT``
then writes a copy of the recording with each caption as a ``std_msgs/String`` on
``TOPIC/caption``, at its frame's log time. ``--changes-only`` (``--min-change X``) captions a
frame only when its view changed since the frame of its topic captioned last
(``edgecap.stream.view_change``, as a live stream's ``min_change``), and says on stderr how many
frames it passed over.
"""

from __future__ import annotations

import argparse
import sys

from edgecap.commands.output import (
    OutputFailed,
    caption_fields,
    caption_record,
    error_record,
    escape_field,
    escape_name,
    json_line,
    report_error,
    write,
)


def run_bag(captioner, args: argparse.Namespace) -> int:
    from edgecap.recordings import output_problem

    if args.write_bag is not None:
        problem = output_problem(args.bag, args.write_bag)
        if problem:
            print(f"edgecap caption: error: --write-bag {escape_field(problem)}", file=sys.stderr)
            return 2
    try:
        return _run(captioner, args)
    except KeyboardInterrupt:  # Ctrl-C: the captions so far are out; say the copy is not there
        if args.write_bag is not None:
            print(f"edgecap: {escape_name(args.write_bag)} not written: interrupted", file=sys.stderr)
        raise
    except OutputFailed:  # the records' reader gone (| head), a full disk: the run stops, as
        # caption's does, and the copy, written once every frame is captioned, is not there either
        if args.write_bag is not None:
            print(
                f"edgecap: {escape_name(args.write_bag)} not written: the captions could not be "
                "written to standard output",
                file=sys.stderr,
            )
        raise


def _run(captioner, args: argparse.Namespace) -> int:
    from edgecap.commands.caption import _captions
    from edgecap.commands.caption_media import wanted_min_change
    from edgecap.errors import InputError, counted
    from edgecap.recordings import (
        RecordingBrokeOff,
        RecordingError,
        caption_topic,
        check_caption_topics,
        open_recording,
        write_captions,
    )

    broken: list[RecordingError] = []

    def frames_until_broken(frames):
        # a reader error ends the frames, not the batch the captioner is filling: the frames
        # read before it are still captioned
        try:
            yield from frames
        except RecordingError as exc:
            broken.append(exc)

    failed = 0
    heard: set[str] = set()  # the topics that gave a frame
    # the copy's captions, kept until it is written; without a copy none is kept (a recording
    # of hours would hold every frame's caption text for nothing)
    captions: dict[tuple[str, int], str] = {}
    keep = args.write_bag is not None
    min_change = wanted_min_change(args)
    unchanged: dict[str, int] = {}
    held: dict[str, int] = {}  # with --hold, per topic: the captions held
    with open_recording(args.bag) as recording:
        topics = recording.check_topics(args.topic)
        if keep:  # refused now, not once every frame is captioned
            check_caption_topics(recording, topics)
        frames = recording.frames(topics, args.every)
        if min_change is not None:
            frames = changed_frames(frames, min_change, unchanged)
        captioned = (
            held_per_topic(captioner, frames_until_broken(frames), held)
            if args.hold
            else _captions(captioner, ((f, f.image) for f in frames_until_broken(frames)))
        )
        for frame, result in captioned:
            heard.add(frame.topic)
            if isinstance(result, InputError):
                failed += 1
            elif keep:
                captions[(frame.topic, frame.index)] = result.text
            _print_frame(args.bag, frame, result, args)
        write(None)
        if min_change is not None:
            passed = ", ".join(f"{n} on {t}" for t, n in sorted(unchanged.items()))
            print(
                f"edgecap: {counted(sum(unchanged.values()), 'frame')} passed over as unchanged"
                + (f" ({escape_field(passed)})" if passed else ""),
                file=sys.stderr,
            )
        if args.hold:
            kept = ", ".join(f"{n} on {t}" for t, n in sorted(held.items()) if n)
            print(
                f"edgecap: {counted(sum(held.values()), 'caption')} held"
                + (f" ({escape_field(kept)})" if kept else ""),
                file=sys.stderr,
            )
        # an image topic that gave no message (a camera that never published; not said where
        # the recording broke off before its end): one named with --topic is said, and is exit 1;
        # those found by themselves are said when none of them gave one (a recording often
        # declares a topic nothing was published on, beside the cameras that were)
        silent = [t for t in topics if t not in heard] if not broken else []
        if silent and (args.topic is not None or not heard):
            report_error(args.bag, f"no image messages on {', '.join(silent)}: nothing to caption")
            if not heard:  # as a folder with no photos: no copy
                return 1
        else:
            silent = []
        if args.write_bag is not None and not broken:
            try:
                count = write_captions(recording, args.write_bag, captions)
            except RecordingBrokeOff as exc:  # the copy reads every topic: a corrupt chunk of
                # one not captioned (a /log) breaks it off as a frame's would have
                broken.append(exc)
            else:
                written = ", ".join(sorted({caption_topic(t) for t, _ in captions})) or "no topic"
                print(
                    f"edgecap: wrote {escape_name(args.write_bag)}: a copy of "
                    f"{escape_name(args.bag)} with {counted(count, 'caption')} ({written})",
                    file=sys.stderr,
                )
        if broken:  # the captions so far are out; the copy is not written
            # the error names the recording as its path reads (run/ -> run): named once
            report_error(args.bag, str(broken[0]).removeprefix(f"{recording.path}: "))
    if broken and args.write_bag is not None:
        print(
            f"edgecap: {escape_name(args.write_bag)} not written: the recording could not be read to its end",
            file=sys.stderr,
        )
    return 1 if failed or broken or silent else 0


def held_per_topic(captioner, frames, held: dict[str, int]):
    """(frame, ``Caption`` or ``InputError``) for each of ``frames`` (a recording's) in order, each
    captioned alone with the caption said last on its topic offered (``Captioner.caption(...,
    previous=...)``, as ``caption_stream``'s ``hold``): a frame with nothing recognisable ends
    its topic's hold, one that cannot be used does not. ``held``: per topic, the captions held
    (counted here)."""
    from edgecap.errors import InputError

    said: dict[str, object] = {}
    for frame in frames:
        held.setdefault(frame.topic, 0)
        if isinstance(frame.image, InputError):
            yield frame, frame.image
            continue
        try:
            caption = captioner.caption(frame.image, previous=said.get(frame.topic))
        except InputError as exc:
            yield frame, exc
            continue
        said[frame.topic] = caption if caption.recognisable else None
        held[frame.topic] += caption.held
        yield frame, caption


def changed_frames(frames, min_change: float, unchanged: dict[str, int]):
    """``frames`` (a recording's) less those whose view changed less than ``min_change`` since
    the frame of their topic passed on last (``caption_stream``'s ``min_change``, per topic; a
    frame that cannot be measured, a compressed one, is passed on, and so is the next);
    ``unchanged`` counts those left out by topic."""
    import numpy as np

    from edgecap.stream import _layout, _unchanged

    last: dict[str, np.ndarray | None] = {}
    for frame in frames:
        layout = _layout(frame.image)
        if _unchanged(last.get(frame.topic), layout, min_change):
            unchanged[frame.topic] = unchanged.get(frame.topic, 0) + 1
            continue
        last[frame.topic] = layout
        yield frame


def _print_frame(bag: str, frame, result, args: argparse.Namespace) -> None:
    from edgecap.errors import InputError
    from edgecap.recordings import seconds_text

    head = {"bag": bag, "topic": frame.topic, "time_ns": frame.time_ns, "stamp_ns": frame.stamp_ns}
    if isinstance(result, InputError):
        report_error(bag, f"{frame.name}: {result.problem}")  # the captioner names bytes only
        if args.json:
            write(json_line({**head, **error_record(result.problem, args.min_confidence)}))
        return
    if args.json:
        held = {"held": result.held} if args.hold else {}
        write(json_line({**head, **caption_record(result, args.min_confidence), **held}))
        return
    fields = [
        frame.topic,
        seconds_text(frame.time_ns),
        seconds_text(frame.stamp_ns),
        *caption_fields(result, args.show_objects, args.min_confidence),
    ]
    write("\t".join(escape_field(f) for f in fields))
