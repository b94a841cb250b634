"""``edgecap caption``'s runs other than a list of photos: one photo with its attention figure
(``--attention``), and a video file or a live camera (``--video``, ``--camera``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from edgecap.files import same_file
from edgecap.commands.output import (
    caption_fields,
    caption_record,
    escape_field,
    escape_name,
    json_line,
    print_result,
    write,
)


def run_attention(captioner, inputs: list[tuple[str, Any]], args) -> int:  # (name, path or InputError)
    """Caption one image and write its attention figure to ``args.attention``."""
    from edgecap.errors import InputError
    from edgecap.viz import save_attention

    if len(inputs) != 1:
        print(f"edgecap caption: error: --attention takes one image, got {len(inputs)}", file=sys.stderr)
        return 2
    if captioner.manifest.info.get("attention", True) is False:
        print(
            f"edgecap caption: error: --attention: {escape_name(str(captioner.manifest.directory))} "
            "is a Show-and-Tell model (trained with --no-attention): it has no attention to draw",
            file=sys.stderr,
        )
        return 2
    ((name, item),) = inputs
    if not isinstance(item, InputError) and same_file(args.attention, item):
        print(
            f"edgecap caption: error: --attention {escape_name(args.attention)} is the input "
            "photo itself; name another file",
            file=sys.stderr,
        )
        return 2
    if os.path.isdir(args.attention):  # else found only once the photo is captioned
        print(
            f"edgecap caption: error: --attention {escape_name(args.attention)} is a folder; "
            "name a .png or .jpg file",
            file=sys.stderr,
        )
        return 2
    result = (
        item
        if isinstance(item, InputError)
        else captioner.caption_batch([item], return_attention=True, on_error="return")[0]
    )
    print_result(name, result, args.json, args.show_objects, args.min_confidence)
    if isinstance(result, InputError):
        return 1
    if not result.recognisable:
        print(
            f"edgecap: {escape_name(name)}: nothing recognisable: no attention figure written",
            file=sys.stderr,
        )
        return 1
    try:
        save_attention(item, result, args.attention)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # named once
        print(
            f"edgecap caption: error: cannot write {escape_name(args.attention)}: {reason}", file=sys.stderr
        )
        return 2
    return 0


def run_stream(captioner, args: argparse.Namespace) -> int:
    """Caption a video file (every sampled frame, in order) or a camera (live)."""
    from edgecap.errors import InputError
    from edgecap.stream import camera_frames, caption_stream, video_frames

    min_change = wanted_min_change(args)
    if args.video is not None:
        frames = video_frames(args.video)
        live = False
    else:
        frames = camera_frames(args.camera)
        live = True
        try:
            warm_for_camera(captioner, frames, args.hold)
        except (KeyboardInterrupt, InputError) as exc:  # Ctrl-C, or the camera's first read failed
            getattr(frames, "close", lambda: None)()  # the camera released
            if isinstance(exc, KeyboardInterrupt):
                return 130
            print(f"edgecap: {escape_name(exc.source)}: {escape_field(exc.problem)}", file=sys.stderr)
            return 1
    stream = caption_stream(
        captioner, frames, every=args.every, live=live, pick=args.pick, min_change=min_change, hold=args.hold
    )
    decimals = time_decimals(args.every, getattr(frames, "fps", None))
    try:
        for event in stream:
            _print_event(event, args.json, args.show_objects, args.min_confidence, decimals, args.hold)
    except KeyboardInterrupt:
        stream.close()
        print(f"edgecap: {stream.stats}", file=sys.stderr)
        return 130
    except InputError as exc:  # a damaged or cut video, after its readable frames' captions
        print(f"edgecap: {escape_name(exc.source)}: {escape_field(exc.problem)}", file=sys.stderr)
        print(f"edgecap: {stream.stats}", file=sys.stderr)
        return 1
    print(f"edgecap: {stream.stats}", file=sys.stderr)
    return 0


def warm_for_camera(captioner, frames, hold: bool) -> None:
    """A live camera's first frames' slow parts met before the stream starts
    (``Captioner.warm_up`` at the camera's frame size, with ``hold`` the pass that scores the
    caption said last too): the runtime's first run, and with CUDA graphs the captures of each
    plan a frame can need, which mid-stream would cost the frames that arrive meanwhile. The
    frame read for the camera's size is dropped: it is stale once the warm-up is done."""
    first = next(frames, None)
    shape: tuple[int, ...] = getattr(getattr(first, "image", None), "shape", ())
    if len(shape) < 2:
        return  # no frame: the stream says so
    try:
        captioner.warm_up((1,), frame_size=(int(shape[0]), int(shape[1])), hold=hold)
    except ValueError:  # a frame size past the image limits: each frame's own error says so
        pass


def wanted_min_change(args: argparse.Namespace) -> float | None:
    """The share of the view that must change for a frame to be captioned: --min-change X, or
    ``edgecap.stream.MIN_CHANGE`` with --changes-only; None without either."""
    from edgecap.stream import MIN_CHANGE

    if args.min_change is not None:
        return args.min_change
    return MIN_CHANGE if args.changes_only else None


def time_decimals(every: float | None, fps: float | None) -> int:
    """The decimals a frame's time is printed with: 2, or as many as it takes for the frames
    printed to show different times (a unit in the last place smaller than the least time between
    them: one frame of a video at ``fps``, 3 decimals from 100 frames a second; frames kept
    ``every`` seconds apart are each the first of its interval, so two may be one frame less than
    ``every`` apart), at most 6."""
    frame = 1 / fps if fps else 0.0
    spacing = max(frame, (every or 0.0) - frame)
    if spacing <= 0 or not math.isfinite(spacing):
        return 2
    return min(6, max(2, math.floor(-math.log10(spacing)) + 1))


def _print_event(
    event,
    as_json: bool,
    objects: bool = False,
    min_confidence: float | None = None,
    decimals: int = 2,
    hold: bool = False,
) -> None:
    """One frame's record: a photo's fields (``--json``: "objects" always, as a photo's record
    has them; ``--min-confidence`` adds "low_confidence"; ``--hold`` adds "held"; in text,
    ``--objects`` adds the tags), after the frame's time (``decimals``: ``time_decimals``; JSON
    at least 3)."""
    caption = event.caption
    if as_json:
        record = caption_record(caption, min_confidence)
        line = {
            "time": round(event.timestamp, max(3, decimals)),
            "frame": event.frame_index,
            **record,
            **({"held": caption.held} if hold else {}),
            "timings": {k: round(v, 2) for k, v in caption.timings.items()},
            "dropped": event.dropped,
        }
        write(json_line(line))
    else:
        fields = caption_fields(caption, objects, min_confidence)
        write("\t".join([f"{event.timestamp:.{decimals}f}s", *map(escape_field, fields)]))
