"""``edgecap caption``'s output: every record one line, unambiguous, UTF-8 (``escape_field`` for
the plain form, ``json_line`` for ``--json``), written and flushed one record at a time, with a
write failure turned into ``OutputFailed`` (a closed pipe: ``EXIT_PIPE_CLOSED``)."""

from __future__ import annotations

import base64
import json
import os
import re
import sys


# -- output: every record one line, unambiguous, UTF-8 ----------------------------------------
EXIT_PIPE_CLOSED = 141  # what a shell reports for a Unix tool stopped by SIGPIPE (128 + 13)
_UNSAFE = re.compile(
    r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    r"\ud800-\udfff]"
)
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class OutputFailed(Exception):
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


def utf8_name(name: str) -> str:
    """A file name as the OS gave it (decoded with the file-system encoding) -> the same bytes
    read as UTF-8, each byte that is not UTF-8 a surrogate escape (``escape_field``: \\xHH).
    The same name under a UTF-8 locale; under Latin-1 the UTF-8 name b"caf\\xc3\\xa9.png"
    arrives as "caf\u00c3\u00a9.png" and is "caf\u00e9.png" again. Names only, never a
    caption: one that the file-system encoding cannot hold is as it is."""
    try:
        return os.fsencode(name).decode("utf-8", "surrogateescape")
    except UnicodeError:
        return name


def escape_name(name: str) -> str:
    """A file name as a plain field or on stderr: ``utf8_name``, then ``escape_field``, so that
    undoing the escapes gives the name's bytes whatever the locale."""
    return escape_field(utf8_name(name))


def one_line(message: str) -> str:
    """An error message as the command line prints it: ``escape_field``'s escapes but for the
    backslash (a message's names may already be escaped), so that a name it holds with a
    newline (a model folder's) cannot break it in two, nor bytes that are not UTF-8 show
    as surrogates."""
    return _UNSAFE.sub(lambda m: m.group() if m.group() == "\\" else _escape_char(m), message)


# the records' keys that hold a file's name as the OS gave it (eval's summary: "references", and
# "path" in its "model"; export's and serve's /health "model", train's "best_checkpoint")
NAME_KEYS = ("path", "bag", "references", "model", "best_checkpoint")


def json_line(record: dict) -> str:
    """One JSON object on one line, pure UTF-8: a name (``NAME_KEYS``: ``path``, ``bag``,
    ``references``, ``model``, ``best_checkpoint``, in the record or an object in it) that is
    not valid UTF-8 holds U+FFFD for each bad byte and ``path_base64`` (``bag_base64``, ...)
    beside it holds the exact bytes; control characters, line separators, bidirectional
    overrides and lone surrogates are \\u escapes."""
    line = json.dumps(names_repaired(record), ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def names_repaired(record: dict) -> dict:
    """``record`` with each name of ``NAME_KEYS`` that is not UTF-8 as ``json_line`` writes it,
    in the objects it holds too (eval's ``model``)."""
    for key, value in record.items():
        if isinstance(value, dict):
            record = {**record, key: names_repaired(value)}
    for key in NAME_KEYS:
        name = record.get(key)
        try:
            raw = os.fsencode(name) if isinstance(name, str) else None
        except UnicodeError:  # not a name the OS could give: its lone surrogates are \u escapes
            raw = None
        if raw is not None and raw.decode("utf-8", "replace") != name:
            record = {**record, key: raw.decode("utf-8", "replace")}
            if not _is_utf8(raw):
                record[f"{key}_base64"] = base64.b64encode(raw).decode("ascii")
    return record


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write(line: str | None) -> None:
    """One record on stdout, flushed (None: only flush); a failed write is ``OutputFailed``."""
    try:
        if line is not None:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError as exc:  # BrokenPipeError, ENOSPC, EIO, EBADF ...
        raise OutputFailed(exc) from None


def utf8_output() -> None:
    """Records, and the error lines on stderr, are UTF-8 whatever the locale (all that could
    not be encoded is escaped first: a ``\\xHH`` in either is one byte of a name, never a
    character the locale could not write)."""
    for stream, errors in ((sys.stdout, "strict"), (sys.stderr, "backslashreplace")):
        try:
            stream.reconfigure(encoding="utf-8", errors=errors)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass  # a replaced stream (tests, embedding): written as it is


def stdout_closed(command: str) -> bool:
    """Whether ``edgecap COMMAND`` was started with standard output closed (``>&-``: Python's
    ``sys.stdout`` is None, and ``print`` drops every line without a word); if so, said in one
    line on stderr, for the command to stop (exit 2) before its work, whose output would be lost."""
    if sys.stdout is not None:
        return False
    print(f"edgecap {command}: error: cannot write the output: standard output is closed", file=sys.stderr)
    return True


def output_failed(command: str, error: OSError) -> int:
    """The exit status of ``edgecap COMMAND`` whose standard output could not be written: a
    reader gone away (``| head``: a broken pipe) stops it quietly, as Unix tools stop (141);
    anything else (a full disk) is one line, exit 2. Either way what is still buffered is
    dropped, so that Python's flush at exit does not fail again."""
    discard_stdout()
    if isinstance(error, BrokenPipeError):
        return EXIT_PIPE_CLOSED
    print(f"edgecap {command}: error: cannot write the output ({error.strerror or error})", file=sys.stderr)
    return 2


def discard_stdout() -> None:
    """Point stdout at the null device so that Python's own flush at exit is silent."""
    to_null(sys.stdout)


def to_null(stream) -> bool:
    """Point ``stream``'s file descriptor at the null device (what is written to it from now on,
    by Python or a C library, is dropped); False where it has none (a replaced stream)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def print_result(
    name: str, result, as_json: bool, objects: bool = False, min_confidence: float | None = None
) -> None:
    """One input's record: its caption (or its error, also on stderr). ``--json`` adds
    ``confidence`` and ``recognisable``; with ``min_confidence``, a caption below it is marked
    (``"low_confidence": true``; plain: a last field ``low confidence``)."""
    from edgecap.errors import InputError

    if isinstance(result, InputError):
        report_error(name, result.problem)
        if as_json:
            write(json_line({"path": name, **error_record(result.problem, min_confidence)}))
        return
    if as_json:
        write(json_line({"path": name, **caption_record(result, min_confidence)}))
        return
    fields = [escape_name(name), *map(escape_field, caption_fields(result, objects, min_confidence))]
    write("\t".join(fields))


def report_error(name: str, problem: str) -> None:
    """``edgecap: NAME: problem`` on stderr, escaped (the names a problem holds are
    ``utf8_name``'s already: ``edgecap.paths``)."""
    print(f"edgecap: {escape_name(name)}: {escape_field(problem)}", file=sys.stderr, flush=True)


def report_note(name: str, text: str) -> None:
    """``edgecap: note: NAME: text`` on stderr, escaped: said of a PATH, no failure."""
    print(f"edgecap: note: {escape_name(name)}: {escape_field(text)}", file=sys.stderr, flush=True)


def error_record(problem: str, min_confidence: float | None = None) -> dict:
    """The ``--json`` fields of an input that failed: a caption's keys, each null, and ``error``
    (a reader indexing ``record["confidence"]`` on every line does not fail on this one)."""
    record: dict = dict.fromkeys(("caption", "score", "objects", "confidence", "recognisable", "crop"))
    if min_confidence is not None:
        record["low_confidence"] = None
    # a name in the problem that is not UTF-8 (a broken link's target, a file already captioned
    # under another name) has each bad byte \xHH, as on stderr: a lone surrogate, which strict
    # JSON readers refuse and no UTF-8 can hold, had been written as \udcff
    record["error"] = _SURROGATE.sub(_escape_char, problem)
    return record


def caption_record(result, min_confidence: float | None = None) -> dict:
    """The ``--json`` fields of a caption (after the fields that name the input)."""
    record = {
        "caption": result.text,
        "score": round(result.score, 4),
        "objects": [[tag, round(p, 4)] for tag, p in result.objects],
        "confidence": result.confidence,
        "recognisable": result.recognisable,
        # the part of the frame captioned, bars cropped: [left, top, right, bottom] fractions
        # (a stream's captioner may be any object with the caption fields: none without one)
        "crop": None if getattr(result, "crop", None) is None else [round(v, 4) for v in result.crop],
    }
    if min_confidence is not None:
        record["low_confidence"] = _low(result, min_confidence)
    return record


def caption_fields(result, objects: bool = False, min_confidence: float | None = None) -> list[str]:
    """The plain fields of a caption (after the fields that name the input), not yet escaped."""
    fields = [result.text]
    if objects:
        fields.append(", ".join(f"{tag} {p:.2f}" for tag, p in result.objects))
    if _low(result, min_confidence):
        fields.append("low confidence")
    return fields


def _low(result, min_confidence: float | None) -> bool:
    return min_confidence is not None and result.confidence is not None and result.confidence < min_confidence
