"""A robot-style captioning loop: frames in, one timestamped caption at a time out.

    python examples/robot_loop.py clip.mp4                 # the shipped model
    python examples/robot_loop.py clip.mp4 --model DIR --every 0.5
    python examples/robot_loop.py ride.mp4 --pick sharpest   # the least blurred of the frames
    python examples/robot_loop.py patrol.mp4 --changes-only  # a scene captioned once
    python examples/robot_loop.py patrol.mp4 --changes-only --hold  # ... and its words kept

The video is played at its own frame rate, as a camera would deliver it; when captioning is
slower than the frames arrive, the newest frame wins and the older ones are dropped, so the
caption is never stale by more than one caption's time (``--pick sharpest``: the least blurred of
the frames that arrived while the last caption was made, for a camera that moves; docs/cameras.md,
"Blurred frames"; ``--changes-only``: a frame only when its view changed since the last caption,
so a robot standing still spends one caption on its scene, "A scene said once"; ``--hold``: the
caption said last kept while it fits the new frames about as well as their own, so that a scene
keeps its words, "A scene's words kept"). On a robot, swap
``video_frames(path, realtime=True)`` for ``camera_frames(0)`` and act on
``event.caption.text`` where this prints it.
Needs OpenCV: pip install 'edgecap[video]'.
"""

from __future__ import annotations

import argparse
import sys

from edgecap import Captioner, EdgecapError
from edgecap.stream import MIN_CHANGE, caption_stream, video_frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])  # None: python -OO
    parser.add_argument("video", help="a video file, played back in real time")
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("--every", type=float, help="at most one caption per SECONDS")
    parser.add_argument(
        "--pick",
        choices=("newest", "sharpest"),
        default="newest",
        help="which of the frames that arrive during a caption to caption next (default: newest)",
    )
    parser.add_argument(
        "--changes-only",
        action="store_true",
        help="caption a frame only when its view changed since the last caption",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="keep the caption said last while it fits the new frames about as well as their own",
    )
    args = parser.parse_args(argv)

    try:
        captioner = Captioner(args.model, beam_size=3, max_length=12)
        # the first frames' slow parts met now, not mid-stream: the runtime's first run, and on a
        # GPU with CUDA graphs their captures (a decode graph per plan a frame can need, and with
        # --hold the pass that scores the caption said last)
        captioner.warm_up((1,), frame_size=(480, 640), hold=args.hold)
        frames = video_frames(args.video, realtime=True)
        stream = caption_stream(
            captioner,
            frames,
            every=args.every,
            pick=args.pick,
            min_change=MIN_CHANGE if args.changes_only else None,
            hold=args.hold,
        )
    except (EdgecapError, ValueError) as exc:  # ValueError: a bad --every
        print(f"robot_loop: {exc}", file=sys.stderr)
        return 2
    try:
        for event in stream:
            t = event.caption.timings
            print(
                f"{event.timestamp:6.2f}s frame {event.frame_index:5d}  "
                f"{event.caption.text!r}{' (held)' if event.caption.held else ''}  "
                f"[prep {t['preprocess_ms']:.1f} ms, encode "
                f"{t['encode_ms']:.1f} ms, decode {t['decode_ms']:.1f} ms, latency "
                f"{event.latency_ms:.0f} ms, dropped {event.dropped}]",
                flush=True,
            )
    except KeyboardInterrupt:  # Ctrl-C: stop the reader and release the video, then report
        stream.close()
    except EdgecapError as exc:  # a cut or damaged video, after its readable frames' captions
        print(f"robot_loop: {exc}", file=sys.stderr)
        print(f"done: {stream.stats}", flush=True)
        return 1
    print(f"done: {stream.stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
