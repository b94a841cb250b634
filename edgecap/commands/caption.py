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
``time``, ``frame``, ``caption``, ``score``, ``timings`` (ms) and ``dropped``; a summary goes to
stderr at the end. A video is read at the captioner's pace, every sampled frame is captioned and
times are video time; a camera is live: the newest frame wins, older ones are dropped
(``edgecap.stream``), and it runs until the camera stops or Ctrl-C. Both need OpenCV
(``pip install 'edgecap[video]'``).
"""

from __future__ import annotations

import argparse
import base64
import errno
import fnmatch
import glob
import json
import os
import re
import stat
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgecap.cli import interrupt_normally
from edgecap.commands._options import add_model_arguments, load_captioner

FINISHES_ON_INTERRUPT = True  # edgecap.cli: Ctrl-C before the model is loaded just exits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
  each file captioned once (by device and inode). A link loop, a folder or file seen before
  under another name, a broken link, an unreadable folder and an empty PATH are each reported
  on stderr (edgecap: PATH: skipped: why) and count as failed inputs.

exit status:
  0  every input was captioned
  1  some inputs could not be captioned or were skipped (each is named on stderr:
     edgecap: PATH: problem); the others were captioned
  2  usage, model or backend error (bad option, unusable model directory, missing runtime,
     --device cuda without a usable CUDA), or the output could not be written (disk full,
     stdout closed)
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (| head): the command stops quietly

Images over 89,478,485 pixels (EDGECAP_MAX_PIXELS=N to change) or files over 128 MiB
(EDGECAP_MAX_FILE_BYTES=N) are refused; only JPEG, PNG, GIF, WebP, TIFF and BMP files are read,
and only regular files (not pipes or devices)."""


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


def expand_all(args: Iterable[str]) -> Iterator[tuple[str, object]]:
    """Command-line PATHs -> (name, input) pairs, in order: a file (even a missing one: the
    captioner reports it), a folder's image files (searched recursively, sorted), or a glob's
    image files (sorted; ``**`` for any depth). Symbolic links to folders are followed, but each
    folder is searched once and each file (by device and inode) captioned once over the whole
    run; everything skipped comes as a (name, InputError) pair that says why: a link loop, a
    folder or file already seen under another name, a broken link, an unreadable folder, an
    empty PATH, a folder or glob with no images."""
    state = _Seen()
    for arg in args:
        yield from _expand_one(arg, state)


class _Seen:
    """What the run has already captioned: (st_dev, st_ino) -> the first name."""

    def __init__(self):
        self.files: dict[tuple[int, int], str] = {}


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _expand_one(arg: str, state: _Seen) -> Iterator[tuple[str, object]]:
    from edgecap.errors import InputError

    if arg == "":
        yield arg, InputError(arg, "empty PATH argument (an unset shell variable?); "
                                   "write . for the current folder")
        return
    path = Path(arg)
    literal = glob.has_magic(arg) and not os.path.lexists(arg)
    if not literal and path.is_dir():
        found = False
        for name, item in _walk(path, lambda rel: _has_image_suffix(rel[-1]),
                                lambda rel: True, state):
            found = found or _is_match(item)
            yield name, item
        if not found:
            yield arg, InputError(arg, "folder holds no image files "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
    elif not literal:
        yield from _checked_file(arg, state)
    else:
        yield from _expand_glob(arg, state)


def _checked_file(name: str, state: _Seen) -> Iterator[tuple[str, object]]:
    """A file to caption, or why it is skipped (the same file as one already captioned)."""
    from edgecap.errors import InputError

    try:
        st = os.stat(name)
    except (OSError, ValueError):
        yield name, name  # the captioner says what is wrong with it
        return
    if stat.S_ISREG(st.st_mode):
        if _key(st) in state.files:
            yield name, InputError(name, f"skipped: the same file as {state.files[_key(st)]}, "
                                         "already captioned")
            return
        state.files[_key(st)] = name
    yield name, name


def _expand_glob(pattern: str, state: _Seen) -> Iterator[tuple[str, object]]:
    from edgecap.errors import InputError

    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    base = Path(*parts[:fixed]) if fixed else Path()
    rest = parts[fixed:]
    found = False
    if base == Path() or base.is_dir():
        for name, item in _walk(base, lambda rel: _has_image_suffix(rel[-1])
                                and _match(rest, rel),
                                lambda rel: _may_descend(rest, rel), state):
            found = found or _is_match(item)
            yield name, item
    if not found:
        yield pattern, InputError(pattern, "the pattern matches no image files")


def _match_part(pattern: str, name: str) -> bool:
    # as glob: a wildcard does not match a leading dot
    return fnmatch.fnmatch(name, pattern) and (not name.startswith(".")
                                                or pattern.startswith("."))


def _match(pattern: tuple[str, ...], rel: tuple[str, ...]) -> bool:
    """Whether the relative path ``rel`` matches the pattern's parts (``**``: any folders)."""
    if not pattern:
        return not rel
    if pattern[0] == "**":
        return any(_match(pattern[1:], rel[i:]) for i in range(len(rel) + 1)
                   if all(not part.startswith(".") for part in rel[:i]))
    return bool(rel) and _match_part(pattern[0], rel[0]) and _match(pattern[1:], rel[1:])


def _may_descend(pattern: tuple[str, ...], rel: tuple[str, ...]) -> bool:
    """Whether a folder at ``rel`` may hold matches: its parts match the pattern's leading parts
    (up to a ``**``) and the pattern is deep enough."""
    for i, part in enumerate(rel):
        if i >= len(pattern) - 1:
            return False
        if pattern[i] == "**":
            return not part.startswith(".") and all(not p.startswith(".") for p in rel[i:])
        if not _match_part(pattern[i], part):
            return False
    return True


def _walk(top: Path, want_file, want_dir, state: _Seen) -> Iterator[tuple[str, object]]:
    """Depth first, each folder's entries sorted by name: (name, name) for each file that
    ``want_file(relative parts)`` takes, (name, InputError) for each entry skipped. Folders
    (and links to folders) are entered when ``want_dir(relative parts)``; never twice, and a
    link back to a folder being searched is reported as a loop. Iterative: any depth."""
    from edgecap.errors import InputError

    try:
        top_stat = os.stat(top)
    except OSError as exc:
        yield str(top), InputError(str(top), f"cannot read the folder ({exc.strerror or exc})")
        return
    folders = {_key(top_stat): str(top)}  # this walk's: a glob may search a folder again
    # each frame: (folder path, its relative parts, its key, the sorted entries left)
    stack = [(top, (), _key(top_stat), None)]
    while stack:
        folder, rel, key, entries = stack[-1]
        if entries is None:
            try:
                with os.scandir(folder) as it:
                    entries = iter(sorted(((e.name, e.is_symlink()) for e in it)))
            except OSError as exc:
                stack.pop()
                reason = "permission denied" if isinstance(exc, PermissionError) else (
                    exc.strerror or str(exc))
                yield str(folder), InputError(str(folder), f"skipped: cannot read the folder "
                                                           f"({reason})")
                continue
            stack[-1] = (folder, rel, key, entries)
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, is_link = entry
        path, parts = folder / name, (*rel, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            if is_link and (want_file(parts) or want_dir(parts)):
                why = ("a loop of symbolic links" if getattr(exc, "errno", None) == errno.ELOOP
                       else "broken symbolic link")
                target = _readlink(path)
                yield str(path), InputError(str(path), f"skipped: {why} (to {target})")
            elif not is_link and want_file(parts):
                yield str(path), str(path)  # vanished: the captioner reports it
            continue
        if stat.S_ISDIR(st.st_mode):
            if not want_dir(parts):
                continue
            ancestors = {frame[2]: frame[0] for frame in stack}
            if _key(st) in ancestors:
                yield str(path), InputError(str(path), "skipped: a symbolic link loop (it leads "
                                                       f"back to {ancestors[_key(st)]})")
                continue
            if _key(st) in folders:
                yield str(path), InputError(str(path), "skipped: the same folder as "
                                                       f"{folders[_key(st)]}, already searched")
                continue
            folders[_key(st)] = str(path)
            stack.append((path, parts, _key(st), None))
        elif want_file(parts):
            if stat.S_ISREG(st.st_mode) and _key(st) in state.files:
                yield str(path), InputError(str(path), "skipped: the same file as "
                                                       f"{state.files[_key(st)]}, already "
                                                       "captioned")
                continue
            if stat.S_ISREG(st.st_mode):
                state.files[_key(st)] = str(path)
            yield str(path), str(path)  # a special file: the captioner says what it is


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _is_match(item: object) -> bool:
    """An image the walk found: one to caption, or one already captioned under another name."""
    from edgecap.errors import InputError

    return not isinstance(item, InputError) or item.problem.startswith("skipped: the same file")


def _has_image_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def run(args: argparse.Namespace) -> int:
    # The command writes only where told: onnxruntime (1.32 checked) otherwise writes a telemetry
    # device id under ~/.cache/Microsoft when imported (ORT_DISABLE_TELEMETRY=0 to allow it);
    # the onnxruntime backend sets the same default for library users.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from PIL import Image

    problem = _check_arguments(args)
    if problem:
        print(f"edgecap caption: error: {problem}", file=sys.stderr)
        return 2
    if sys.stdout is None:  # started with stdout closed (>&-): nothing could be written
        print("edgecap caption: error: cannot write the output: standard output is closed",
              file=sys.stderr)
        return 2
    _utf8_stdout()
    # The command owns its process: Pillow's bomb warning would only repeat the InputError.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        captioner = load_captioner(args)
    except ValueError as exc:  # a bad option value: report it like argparse would
        print(f"edgecap caption: error: {exc}", file=sys.stderr)
        return 2
    interrupt_normally()  # output starts: Ctrl-C from here is a KeyboardInterrupt (stats, 130)
    try:
        if args.video is not None or args.camera is not None:
            return _run_stream(captioner, args)
        return _run_paths(captioner, args)
    except _OutputFailed as failure:
        _discard_stdout()  # what is still buffered must not fail again at exit
        if isinstance(failure.error, BrokenPipeError):
            return EXIT_PIPE_CLOSED  # the reader is gone (| head): stop quietly, like Unix tools
        print(f"edgecap caption: error: cannot write the output "
              f"({failure.error.strerror or failure.error})", file=sys.stderr)
        return 2


def _run_paths(captioner, args: argparse.Namespace) -> int:
    from edgecap.errors import InputError

    inputs = expand_all(args.paths)
    if args.attention is not None:
        return _run_attention(captioner, list(inputs), args)
    failed = 0
    for name, result in _captions(captioner, inputs):
        failed += isinstance(result, InputError)
        _print(name, result, args.json, args.show_objects)
    _write(None)  # the last flush
    return 1 if failed else 0


# -- output: every record one line, unambiguous, UTF-8 ----------------------------------------
EXIT_PIPE_CLOSED = 141  # what a shell reports for a Unix tool stopped by SIGPIPE (128 + 13)
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     r"\ud800-\udfff]")
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


class _OutputFailed(Exception):
    """Standard output could not be written (``error``: the OSError)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    # \xHH is a byte: ASCII controls, and the bytes of names that are not UTF-8 (above); every
    # other character is \uHHHH, so that the two never mean the same thing
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def escape_field(text: str) -> str:
    """A plain-output field: backslash, TAB, newline, CR as \\\\ \\t \\n \\r; other ASCII
    control characters as \\xHH; C1 controls, line separators and bidirectional overrides as
    \\uHHHH; each byte of a file name that is not valid UTF-8 as \\xHH. Everything else as is:
    \\xHH is always one byte of the name, \\uHHHH one character."""
    return _UNSAFE.sub(_escape_char, text)


def json_line(record: dict) -> str:
    """One JSON object on one line, pure UTF-8: a ``path`` that is not valid UTF-8 holds U+FFFD
    for each bad byte and ``path_base64`` holds the exact bytes; control characters, line
    separators, bidirectional overrides and lone surrogates are \\u escapes."""
    path = record.get("path")
    try:
        raw = os.fsencode(path) if isinstance(path, str) else None
    except UnicodeError:  # not a name the OS could give: its lone surrogates are \u escapes
        raw = None
    if raw is not None and raw.decode("utf-8", "replace") != path:
        record = {**record, "path": raw.decode("utf-8", "replace")}
        if not _is_utf8(raw):
            record["path_base64"] = base64.b64encode(raw).decode("ascii")
    line = json.dumps(record, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _write(line: str | None) -> None:
    """One record on stdout, flushed (None: only flush); a failed write is ``_OutputFailed``."""
    try:
        if line is not None:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError as exc:  # BrokenPipeError, ENOSPC, EIO, EBADF ...
        raise _OutputFailed(exc) from None


def _utf8_stdout() -> None:
    """Records are UTF-8 whatever the locale (all that could not be encoded is escaped)."""
    try:
        sys.stdout.reconfigure(encoding="utf-8", errors="strict")
    except (AttributeError, ValueError, OSError):
        pass  # a replaced sys.stdout (tests, embedding): written as it is


def _discard_stdout() -> None:
    """Point stdout at the null device so that Python's own flush at exit is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


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
        print(f"edgecap: {escape_field(name)}: {escape_field(result.problem)}", file=sys.stderr,
              flush=True)
        if as_json:
            _write(json_line({"path": name, "caption": None, "score": None, "objects": None,
                              "error": result.problem}))
        return
    if as_json:
        _write(json_line({"path": name, "caption": result.text, "score": round(result.score, 4),
                          "objects": [[tag, round(p, 4)] for tag, p in result.objects]}))
        return
    fields = [name, result.text]
    if objects:
        fields.append(", ".join(f"{tag} {p:.2f}" for tag, p in result.objects))
    _write("\t".join(escape_field(f) for f in fields))


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
    if not isinstance(item, InputError) and _same_file(args.attention, item):
        print(f"edgecap caption: error: --attention {escape_field(args.attention)} is the input "
              "photo itself; name another file", file=sys.stderr)
        return 2
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


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same existing file (links and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


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
        _write(json_line(line))
    else:
        _write(f"{event.timestamp:.2f}s\t{escape_field(caption.text)}")
