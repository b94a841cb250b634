"""``edgecap caption PATH...``: caption image files, folders (searched recursively) and globs.

Prints ``PATH<TAB>caption`` per image (``--objects``: then ``<TAB>`` and the object tags, e.g.
``Egyptian Mau 0.79, tiger cat 0.09``), or with ``--json`` one JSON object per line (``path``,
``caption``, ``score``, ``objects`` as [name, probability] pairs; ``error`` and a null caption for
an input that failed). Every field is escaped so that a record is one line whatever the file
name (``escape_field``, ``json_line``; the rules are in ``--help``). A failed or skipped input
is reported on stderr as ``edgecap: PATH: problem`` and the others are still captioned; the
exit code is then 1. Output that cannot be written is exit 2; a closed pipe (``| head``) stops
the command quietly with 141.

``edgecap caption IMG --attention OUT.png`` also writes the photo with each word's attention
over it, one panel per word (``edgecap.viz``); nothing else is written anywhere.

``edgecap caption --video FILE [--every SECONDS]`` and ``edgecap caption --camera INDEX`` print
``SECONDS<TAB>caption`` per captioned frame (``12.40s<TAB>a dog runs``), or with ``--json``
``time``, ``frame``, ``caption``, ``score``, ``objects``, ``confidence``, ``recognisable``,
``crop``, ``timings`` (ms) and ``dropped``; a summary goes to
stderr at the end. A video is read at the captioner's pace, every sampled frame is captioned and
times are video time; a camera is live: the newest frame wins, older ones are dropped
(``edgecap.stream``), and it runs until the camera stops or Ctrl-C. ``--pick sharpest`` captions
the least blurred of the frames that compete for a caption instead (``caption_stream``'s
``pick``). Both need OpenCV (the ``video`` extra).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from edgecap.cli import interrupt_normally
from edgecap.commands._options import add_model_arguments, load_captioner
from edgecap.commands.caption_bag import run_bag
from edgecap.commands.caption_media import run_attention, run_stream
from edgecap.commands.progress import add_progress_argument, open_progress, progress_enabled
from edgecap.commands.output import (
    OutputFailed,
    output_failed,
    print_result,
    report_note,
    stdout_closed,
    utf8_output,
    write,
)
from edgecap.paths import Note, expand_all

FINISHES_ON_INTERRUPT = True  # edgecap.cli: Ctrl-C before the model is loaded just exits


EXIT_CODES = """output:
  one record per line, always UTF-8. Plain: PATH<TAB>caption (--objects: <TAB>tags). In each
  field a backslash is written \\\\, a TAB \\t, a newline \\n, a carriage return \\r, another
  ASCII control character \\xHH, a C1 control, line separator or bidirectional override
  \\uHHHH, and each byte of a file name that is not valid UTF-8 \\xHH (\\xHH: one byte,
  \\uHHHH: one character): a file name can never forge a field or a record. --json: one JSON
  object per line; a path that is not valid UTF-8 has U+FFFD for each bad byte in "path" and
  its exact bytes in "path_base64". Errors go to stderr, escaped alike.

paths:
  folders are searched recursively, following links to folders; each folder is searched and
  each file captioned once (by device and inode). A quoted glob gives what the shell's
  expansion would: a folder it matches ('photos/2024-*') is searched recursively. A link
  loop, a folder or file seen before under another name, a broken link or one that cannot be
  followed, an unreadable folder (no permission, a path too long) and an empty PATH are each
  reported on stderr (edgecap: PATH: skipped: why) and count as failed inputs. A file given
  again under the same name ('photos photos/a.jpg') is left out: no record, a note on stderr.

exit status:
  0  every input was captioned
  1  some inputs could not be captioned or were skipped (each is named on stderr:
     edgecap: PATH: problem); the others were captioned. With --attention, also a photo
     with nothing recognisable (no figure to draw: none written)
  2  usage, model or backend error (bad option, unusable model directory, missing runtime,
     --device cuda without a usable CUDA), or the output could not be written (disk full,
     stdout closed)
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (| head): the command stops quietly

Images over 89,478,485 pixels (EDGECAP_MAX_PIXELS=N to change) or with a side over 1,000,000
pixels, or files over 128 MiB (EDGECAP_MAX_FILE_BYTES=N) are refused; only JPEG, PNG, GIF, WebP,
TIFF and BMP files are read (and AVIF where Pillow decodes it; not HEIC, which a folder says it
left out), and only regular files (not pipes or devices)."""


class _OneSource(argparse.Action):
    """``--video``, ``--camera`` and ``--bag``: the value stored as argparse's "store" stores
    it, and the option noted in ``repeated_source`` when it is given again: "store" let
    ``--bag a.mcap --bag b.bag`` caption b alone, without a word; ``_check_arguments`` refuses
    it, as it refuses two sources of different kinds."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            namespace.repeated_source = self.option_strings[0]
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXIT_CODES  # edgecap.cli's formatter keeps its layout
    p.set_defaults(repeated_source=None)
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="image files, folders (searched recursively, depth first, in code-point order of the names: "
        "IMG_10 before IMG_9, uppercase first) or quoted globs",
    )
    p.add_argument("--video", metavar="FILE", action=_OneSource, help="caption a video file's frames")
    p.add_argument(
        "--camera",
        metavar="INDEX",
        type=int,
        action=_OneSource,
        help="caption a live camera (0: the first one, /dev/video0 on Linux)",
    )
    p.add_argument(
        "--bag",
        metavar="PATH",
        action=_OneSource,
        help="caption a robot recording's image topics: a ROS 2 bag folder, a .mcap "
        "or .db3 file, or a ROS 1 .bag (needs edgecap[ros]; see docs/recordings.md)",
    )
    p.add_argument(
        "--topic",
        metavar="T",
        action="append",
        help="with --bag: caption this image topic (repeat for more; default: all)",
    )
    p.add_argument(
        "--write-bag",
        metavar="OUT",
        help="with --bag: also write a copy of the recording with each caption as a "
        "std_msgs/String on TOPIC/caption at its frame's time",
    )
    p.add_argument(
        "--every",
        metavar="SECONDS",
        type=float,
        help="with --video, --camera or --bag: at most one caption per SECONDS of "
        "video (recording) time, per topic (default: every frame of a video or recording; "
        "from a camera, the newest frame whenever the captioner is free)",
    )
    p.add_argument(
        "--pick",
        choices=("newest", "sharpest"),
        default="newest",
        help="with --camera, or --video and --every: which frame to caption of those that "
        "compete for one caption (a camera's that arrive while the captioner is busy; a video's "
        "in one --every interval): the newest (the default; for a video, the interval's first), "
        "or the sharpest, the least blurred by motion (of frames about as sharp, the newest)",
    )
    p.add_argument(
        "--changes-only",
        action="store_true",
        help="with --camera, --video or --bag (per topic): caption a frame only when its view "
        "changed since the frame captioned last (a twentieth of it, edgecap.stream.MIN_CHANGE: "
        "not sensor noise, an exposure change or a view moved by a pixel or two), so a still "
        "scene is said once and a camera standing still costs one caption, not one a frame",
    )
    p.add_argument(
        "--min-change",
        metavar="X",
        type=float,
        help="with --camera, --video or --bag: as --changes-only, with the share of the view (over 0, at "
        "most 1) that must change for a frame to be captioned (default: 0.05 with --changes-only)",
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="with --camera, --video or --bag (per topic): keep the caption said last while it fits "
        "the new frames about as well as the caption they would get (CaptionOptions.hold_margin), "
        "so that the frames of one scene keep its words rather than flicker between near ties; held "
        "captions are counted in the summary (and 'held' in --json)",
    )
    p.add_argument(
        "--attention",
        metavar="OUT.png",
        help="with one image: also write its attention figure, one panel per word",
    )
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="X",
        help="mark captions whose confidence (0-1: the chance the caption is right, "
        "from the model's confidence.json) is below X: --json adds "
        '"low_confidence": true, plain output a last field "low confidence" (default: none '
        "marked; refused where captions get no confidence: a model without confidence.json, or "
        "a --fusion-weight above the one it was fitted at, see docs/confidence.md)",
    )
    p.add_argument(
        "--objects",
        dest="show_objects",
        action="store_true",
        help="also print each photo's object tags (the encoder's own ImageNet "
        "classes with their probabilities; always in --json)",
    )
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    problem = _check_arguments(args)
    if problem:
        print(f"edgecap caption: error: {problem}", file=sys.stderr)
        return 2
    if stdout_closed("caption"):  # started with stdout closed (>&-): nothing could be written
        return 2
    utf8_output()
    # The command owns its process: Pillow's bomb warning would only repeat the InputError.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # Pillow's warnings about a file's metadata (an EXIF or TIFF tag past the file's end: "Tag
    # data larger than file", "Truncated File Read", "Corrupt EXIF data") name no file, and came
    # as two lines of Pillow's source: the photo is captioned, or refused in its own line, anyway
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    try:
        captioner = load_captioner(args)
    except ValueError as exc:  # a bad option value: report it like argparse would
        print(f"edgecap caption: error: {exc}", file=sys.stderr)
        return 2
    if args.min_confidence is not None and captioner.confidence_model is None:
        captioner.close()  # nothing would ever be marked: say so instead of marking nothing
        print(
            f"edgecap caption: error: --min-confidence: the model {captioner.manifest.directory} has no "
            "confidence model (confidence.json), so its captions have no confidence to compare"
            if captioner.unrated is None
            else f"edgecap caption: error: --min-confidence: the model {captioner.manifest.directory}: "
            f"{captioner.unrated} (--fusion-weight), so its captions have no confidence to compare",
            file=sys.stderr,
        )
        return 2
    interrupt_normally()  # output starts: Ctrl-C from here is a KeyboardInterrupt (stats, 130)
    try:
        with captioner:  # its decoding workers stopped, a TensorRT backend's buffers freed
            if args.bag is not None:
                return run_bag(captioner, args)
            if args.video is not None or args.camera is not None:
                return run_stream(captioner, args)
            return _run_paths(captioner, args)
    except OutputFailed as failure:
        return output_failed("caption", failure.error)


def _run_paths(captioner, args: argparse.Namespace) -> int:
    from edgecap.errors import InputError

    inputs = expand_all(args.paths)
    if args.attention is not None:
        images = []
        for name, item in inputs:
            if isinstance(item, Note):
                report_note(name, item.text)
            else:
                images.append((name, item))
        return run_attention(captioner, images, args)
    failed = 0
    progress = open_progress(None, progress_enabled(args))  # a folder's size is not known
    try:
        for name, result in _captions(captioner, inputs):
            if isinstance(result, Note):  # no record, no failure
                with progress.paused():
                    report_note(name, result.text)
                continue
            failed += isinstance(result, InputError)
            with progress.paused():  # stdout and stderr may be the same terminal
                print_result(name, result, args.json, args.show_objects, args.min_confidence)
            progress.update(1)
    finally:
        progress.close()
    write(None)  # the last flush
    return 1 if failed else 0


Name = TypeVar("Name")  # what names an input: a path's text, a recording's frame


def _captions(captioner, inputs: Iterable[tuple[Name, object]]) -> Iterator[tuple[Name, Any]]:
    """(name, input) pairs -> (name, Caption or InputError), in order, each batch as soon as the
    captioner is done with it (with the Captioner's ``overlap``, on a GPU: once the next batch
    is searched too, its host work done meanwhile). An input that is already an ``InputError``
    (an empty folder, an unmatched glob) or a ``Note`` keeps its place without going to the
    captioner."""
    from edgecap.errors import InputError

    pulled: deque = deque()  # (name, its InputError, Note or None) read by the captioner, not yet out

    def images():
        for name, item in inputs:
            held = isinstance(item, (InputError, Note))
            pulled.append((name, item if held else None))
            if not held:
                yield item

    for result in captioner.iter_captions(images(), on_error="return", overlap=None):
        while pulled[0][1] is not None:
            yield pulled.popleft()
        yield pulled.popleft()[0], result
    yield from pulled


def _check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of arguments, or None."""
    one_source = "give image PATHs, --video FILE, --camera INDEX or --bag PATH (exactly one of them)"
    if args.repeated_source is not None:
        return f"{args.repeated_source} given more than once: {one_source}"
    sources = bool(args.paths) + (args.video is not None) + (args.camera is not None) + (args.bag is not None)
    if sources != 1:
        return one_source
    if args.every is not None and args.video is None and args.camera is None and args.bag is None:
        return "--every needs --video, --camera or --bag"
    for flag, value in (("--topic", args.topic), ("--write-bag", args.write_bag)):
        if value is not None and args.bag is None:
            return f"{flag} needs --bag"
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        return f"--min-confidence must be between 0 and 1, got {args.min_confidence}"
    if args.every is not None and not args.every > 0:
        return f"--every must be a positive number of seconds, got {args.every}"
    if args.pick != "newest" and args.camera is None and (args.video is None or args.every is None):
        return (
            f"--pick {args.pick} needs --camera, or --video with --every "
            "(without --every every frame of a video is captioned)"
        )
    changes = "--changes-only" if args.min_change is None else "--min-change"
    wants_change = args.changes_only or args.min_change is not None
    if wants_change and args.camera is None and args.video is None and args.bag is None:
        return f"{changes} needs --camera, --video or --bag"
    if args.min_change is not None and not 0 < args.min_change <= 1:
        return f"--min-change must be a share of the view over 0 and at most 1, got {args.min_change}"
    if args.hold and args.camera is None and args.video is None and args.bag is None:
        return "--hold needs --camera, --video or --bag"
    if args.attention is not None:
        if not args.paths:
            return "--attention needs one image PATH (not --video or --camera)"
        from edgecap.commands.output import escape_name
        from edgecap.files import folder_problem
        from edgecap.viz import figure_format_problem

        # before the model is loaded and the photo captioned, as --write-bag's folder is checked
        problem = folder_problem(args.attention) or figure_format_problem(args.attention)
        if problem is not None:  # no folder; unknown, read only (.psd), not for RGB (.xbm)
            return f"--attention {escape_name(args.attention)}: {escape_name(problem)}"  # names in it too
    return None
