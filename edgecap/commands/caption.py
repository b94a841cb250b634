"""``edgecap caption PATH...``: caption image files, folders (searched recursively) and globs.

Prints ``PATH<TAB>caption`` per image (``--objects``: then ``<TAB>`` and the object tags, e.g.
``Egyptian Mau 0.79, tiger cat 0.09``), or with ``--json`` one JSON object per line (``path``,
``caption``, ``score``, ``objects`` as [name, probability] pairs; ``error`` and a null caption for
an input that failed). A failed input is
reported on stderr as ``edgecap: PATH: problem`` and the others are still captioned; the exit
code is then 1.

``edgecap caption IMG --attention OUT.png`` also writes the photo with each word's attention
over it, one panel per word (``edgecap.viz``); nothing else is written anywhere.

``edgecap caption --video FILE [--every SECONDS]`` and ``edgecap caption --camera INDEX`` print
``SECONDS<TAB>caption`` per captioned frame (``12.40s<TAB>a dog runs``), or with ``--json``
``time``, ``frame``, ``caption``, ``score``, ``timings`` (ms) and ``dropped``; a summary goes to
stderr at the end. A video is read at the captioner's pace, every sampled frame is captioned and
times are video time; a camera is live: the newest frame wins, older ones are dropped
(``edgecap.stream``), and it runs until the camera stops or Ctrl-C. Both need OpenCV
(``pip install 'edgecap[video]'``).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgecap.commands._options import add_model_arguments, load_captioner

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


EXIT_CODES = """exit status:
  0  every input was captioned
  1  some inputs could not be captioned (each is named on stderr: edgecap: PATH: problem);
     the others were captioned
  2  usage, model or backend error (bad option, unusable model directory, missing runtime)
  130  interrupted (Ctrl-C)

Images over 89,478,485 pixels are refused (a decompression-bomb guard); to caption larger
trusted images set EDGECAP_MAX_PIXELS=N."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog, p.formatter_class = EXIT_CODES, argparse.RawDescriptionHelpFormatter
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files, folders (searched recursively) or quoted globs")
    p.add_argument("--video", metavar="FILE", help="caption a video file's frames")
    p.add_argument("--camera", metavar="INDEX", type=int,
                   help="caption a live camera (0: the first one, /dev/video0 on Linux)")
    p.add_argument("--every", metavar="SECONDS", type=float,
                   help="with --video or --camera: at most one caption per SECONDS of video time")
    p.add_argument("--attention", metavar="OUT.png",
                   help="with one image: also write its attention figure, one panel per word")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--objects", dest="show_objects", action="store_true",
                   help="also print each photo's object tags (the encoder's own ImageNet "
                        "classes with their probabilities; always in --json)")


def expand(arg: str) -> Iterator[tuple[str, object]]:
    """One command-line PATH -> (name, input) pairs: a file (even a missing one: the captioner
    reports it), a folder's image files, or a glob's image files, sorted. A folder or glob with no
    images gives one (arg, InputError) pair."""
    from edgecap.errors import InputError

    path = Path(arg)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if _is_image_file(f))
        if not files:
            yield arg, InputError(arg, "folder holds no image files "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:
            yield str(f), str(f)
    elif path.exists() or not glob.has_magic(arg):
        yield arg, arg
    else:
        files = sorted(Path(m) for m in glob.glob(arg, recursive=True) if _is_image_file(Path(m)))
        if not files:
            yield arg, InputError(arg, "the pattern matches no image files")
        for f in files:
            yield str(f), str(f)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def run(args: argparse.Namespace) -> int:
    import os

    # The command writes only where told: onnxruntime (1.32 checked) otherwise writes a telemetry
    # device id under ~/.cache/Microsoft when imported (ORT_DISABLE_TELEMETRY=0 to allow it).
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from edgecap.errors import InputError
    from PIL import Image

    problem = _check_arguments(args)
    if problem:
        print(f"edgecap caption: error: {problem}", file=sys.stderr)
        return 2
    # The command owns its process: Pillow's bomb warning would only repeat the InputError.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        captioner = load_captioner(args)
    except ValueError as exc:  # a bad option value: report it like argparse would
        print(f"edgecap caption: error: {exc}", file=sys.stderr)
        return 2
    if args.video is not None or args.camera is not None:
        return _run_stream(captioner, args)
    inputs = (pair for arg in args.paths for pair in expand(arg))
    if args.attention is not None:
        return _run_attention(captioner, list(inputs), args)
    failed = 0
    for name, result in _captions(captioner, inputs):
        failed += isinstance(result, InputError)
        _print(name, result, args.json, args.show_objects)
    return 1 if failed else 0


def _captions(captioner, inputs: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """(name, input) pairs -> (name, Caption or InputError), in order, each batch as soon as the
    captioner is done with it. An input that is already an ``InputError`` (an empty folder, an
    unmatched glob) keeps its place without going to the captioner."""
    from edgecap.errors import InputError

    pulled: deque = deque()  # (name, its InputError or None) read by the captioner, not yet out

    def images():
        for name, item in inputs:
            failed = isinstance(item, InputError)
            pulled.append((name, item if failed else None))
            if not failed:
                yield item

    for result in captioner.iter_captions(images(), on_error="return"):
        while pulled[0][1] is not None:
            yield pulled.popleft()
        yield pulled.popleft()[0], result
    yield from pulled


def _print(name: str, result, as_json: bool, objects: bool = False) -> None:
    from edgecap.errors import InputError

    if isinstance(result, InputError):
        print(f"edgecap: {name}: {result.problem}", file=sys.stderr, flush=True)
        if as_json:
            line = {"path": name, "caption": None, "score": None, "objects": None,
                    "error": result.problem}
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return
    if as_json:
        line = {"path": name, "caption": result.text, "score": round(result.score, 4),
                "objects": [[tag, round(p, 4)] for tag, p in result.objects]}
        print(json.dumps(line, ensure_ascii=False), flush=True)
    elif objects:
        tags = ", ".join(f"{tag} {p:.2f}" for tag, p in result.objects)
        print(f"{name}\t{result.text}\t{tags}", flush=True)
    else:
        print(f"{name}\t{result.text}", flush=True)


def _check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of arguments, or None."""
    from PIL import Image

    sources = bool(args.paths) + (args.video is not None) + (args.camera is not None)
    if sources != 1:
        return "give image PATHs, --video FILE or --camera INDEX (exactly one of them)"
    if args.every is not None and args.video is None and args.camera is None:
        return "--every needs --video or --camera"
    if args.every is not None and not args.every > 0:
        return f"--every must be a positive number of seconds, got {args.every}"
    if args.attention is not None:
        if not args.paths:
            return "--attention needs one image PATH (not --video or --camera)"
        if Path(args.attention).suffix.lower() not in Image.registered_extensions():
            return (f"--attention {args.attention}: unknown image format; "
                    "name a .png or .jpg file")
    return None


def _run_attention(captioner, inputs: list[tuple[str, object]], args) -> int:
    """Caption one image and write its attention figure to ``args.attention``."""
    from edgecap.errors import InputError
    from edgecap.viz import save_attention

    if len(inputs) != 1:
        print(f"edgecap caption: error: --attention takes one image, got {len(inputs)}",
              file=sys.stderr)
        return 2
    (name, item), = inputs
    result = item if isinstance(item, InputError) else captioner.caption_batch(
        [item], return_attention=True, on_error="return")[0]
    _print(name, result, args.json, args.show_objects)
    if isinstance(result, InputError):
        return 1
    try:
        save_attention(item, result, args.attention)
    except (OSError, ValueError) as exc:
        print(f"edgecap caption: error: cannot write {args.attention}: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_stream(captioner, args: argparse.Namespace) -> int:
    """Caption a video file (every sampled frame, in order) or a camera (live)."""
    from edgecap.stream import camera_frames, caption_stream, video_frames

    if args.video is not None:
        stream = caption_stream(captioner, video_frames(args.video), every=args.every, live=False)
    else:
        stream = caption_stream(captioner, camera_frames(args.camera), every=args.every, live=True)
    try:
        for event in stream:
            _print_event(event, args.json)
    except KeyboardInterrupt:
        stream.close()
        print(f"edgecap: {stream.stats}", file=sys.stderr)
        return 130
    print(f"edgecap: {stream.stats}", file=sys.stderr)
    return 0


def _print_event(event, as_json: bool) -> None:
    caption = event.caption
    if as_json:
        line = {"time": round(event.timestamp, 3), "frame": event.frame_index,
                "caption": caption.text, "score": round(caption.score, 4),
                "timings": {k: round(v, 2) for k, v in caption.timings.items()},
                "dropped": event.dropped}
        print(json.dumps(line, ensure_ascii=False), flush=True)
    else:
        print(f"{event.timestamp:.2f}s\t{caption.text}", flush=True)
