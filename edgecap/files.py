"""Reading files that edgecap did not write: only regular files, and never more than a ceiling.

Every file edgecap reads whole (an image, ``manifest.json``, ``vocab.json``, ``classes.json``) and
every model file it hashes goes through ``open_regular`` / ``read_regular`` (``read_json`` for
JSON, which also bounds the nesting):

- the path is checked with ``stat`` (symbolic links followed) before it is opened, so a named
  pipe, a character or block device, a socket or a folder is refused without being opened
  (opening a FIFO blocks until a writer comes; reading a device may never end);
- the file is then opened non-blocking and checked again with ``fstat`` (the path may have been
  swapped in between);
- its size is compared with the ceiling before anything is read, and the read itself stops one
  byte past the ceiling, so a file that grows while it is read is refused too.

Failures are ``FileProblem(problem)``; callers turn them into ``InputError`` (images) or
``ModelError`` (model files), which name the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class FileProblem(Exception):
    """A file that cannot be read as a regular file; the message is the problem, one line."""


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def write_problem(exc: OSError, path: object) -> str:
    """A folder or file that could not be made or written, as ``PATH: why`` (the error's own
    file name, else ``path``): a file in the way, no permission, a full disk. An error without
    a file name where no temporary folder can be written (TMPDIR, /tmp, /var/tmp, /usr/tmp and
    the working folder all read-only: onnxruntime's int8 quantizer and torch's ONNX export need
    one) says that, not ``path``."""
    if exc.filename is None:
        try:
            tempfile.gettempdir()
        except OSError as none:
            return f"no writable temporary folder: set TMPDIR to one ({none.strerror or none})"
    return f"{exc.filename or path}: {exc.strerror or exc}"


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same existing file (links and hard links included); False
    where either is missing (a new output file) or cannot be read."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def nearest_existing(path: Path) -> Path:
    """``path``, or the nearest folder above it that exists (a link, even a broken one, counts):
    what decides whether ``path`` can be made as a folder."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why no new file can be made at ``path`` for want of its folder: ``folder X does not
    exist``, ``X is not a folder`` (a file there), or None."""
    parent = Path(path).parent
    if parent.is_dir():
        return None
    return f"{parent} is not a folder" if os.path.lexists(parent) else f"folder {parent} does not exist"


def os_problem(exc: BaseException) -> str:
    """Why a file could not be read, in a few words ("no such file", "permission denied")."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return f"cannot read the file ({exc.strerror or exc})"
    if isinstance(exc, UnicodeError):  # a str path the file system encoding cannot hold
        return "the path cannot be encoded for this file system"
    if isinstance(exc, ValueError):  # embedded NUL byte
        return "the path contains a NUL byte"
    return f"cannot read the file ({exc})"


def write_whole(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], replace_link: bool = False
) -> None:
    """Write the file ``path`` whole or not at all: ``write(f)`` fills a hidden file beside it
    (through a link: beside the link's target, which is replaced; with ``replace_link``, beside
    the link, which is replaced by the file), which is then renamed to it,
    so that a write stopped part-way (Ctrl-C, a SIGTERM, a full disk) leaves neither a truncated
    file under its name nor a truncated earlier one there. An OSError of the hidden file names
    ``path``. Anything but a regular file there (/dev/full, a named pipe) is written in place, as
    asked: never replaced by a file; so is an earlier file in a folder where no file may be made."""
    kind: int | None
    if replace_link and os.path.islink(path):
        final, kind = Path(path), None  # the link itself goes, not what it leads to
    else:
        final = Path(os.path.realpath(path))
        try:
            kind = os.stat(final).st_mode
        except OSError:  # nothing there yet (or nothing to stat: open says why)
            kind = None
    if kind is not None and not stat.S_ISREG(kind):
        with open(path, "wb") as f:
            write(f)
        return
    partial = final.with_name(f".{short_name(final.name)}.{secrets.token_hex(4)}.partial")
    try:
        f = open(partial, "xb")  # noqa: SIM115 (a new file, made as a plain write makes it: the umask)
    except PermissionError:
        if kind is None:  # nothing there, and no file may be made beside it: open says so
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path)) from None
        # an earlier file that may be written in a folder that may not: written in place, as
        # before (not whole, but not refused)
        with open(path, "wb") as f:
            write(f)
        return
    except OSError as exc:  # named as it was asked for
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    try:
        with f:
            write(f)
        if kind is not None:  # an earlier file's permissions kept, as a plain write keeps them
            with contextlib.suppress(OSError):  # (a file made private had become readable by all)
                os.chmod(partial, stat.S_IMODE(kind) & 0o777)
        os.replace(partial, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(exc, OSError) and exc.filename == str(partial):  # named as it was asked for
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise


def newer_format(data: object, expected: str) -> str | None:
    """Where a JSON file's ``"format"`` is a later version of ``expected`` (``edgecap-fusion/2``
    where this edgecap reads ``edgecap-fusion/1``), what to say: that a newer edgecap made it
    (not "malformed": it cannot be mended or re-made here). None for anything else, which the
    caller judges as before (that format, another kind of file, an older version)."""
    found = data.get("format") if isinstance(data, dict) else None
    kind, _, version = expected.rpartition("/")
    if not isinstance(found, str) or not found.startswith(f"{kind}/"):
        return None
    later = found[len(kind) + 1 :]
    if not (later.isascii() and later.isdigit()) or int(later) <= int(version):
        return None
    return f"made by a newer edgecap (format {found!r}; this edgecap reads {expected}); upgrade edgecap"


def short_name(name: str, limit: int = 64) -> str:
    """``name`` cut to at most ``limit`` bytes as the file system writes it, for a hidden name
    made from it (a name near the file system's 255 bytes had no room for the rest; cut at 64
    characters, a name of 4-byte characters, emoji, still had none)."""
    return os.fsencode(name)[:limit].decode(sys.getfilesystemencoding(), "ignore")


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """``stat`` the path (following symbolic links); ``FileProblem`` unless a regular file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise FileProblem(os_problem(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"is {kind_of(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | os.PathLike, max_bytes: int | None, what: str = "file"):
    """Open a regular file for reading in binary mode after the checks above (a file object).
    ``max_bytes`` None: no ceiling."""
    check_regular(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise FileProblem(os_problem(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the stat and the open
            raise FileProblem(f"is {kind_of(st.st_mode)}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileProblem(f"{what} is {st.st_size:,} bytes, over the limit of {max_bytes:,}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # regular files never block; plain reads from here
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The whole file, at most ``max_bytes`` (``FileProblem`` otherwise, before or while
    reading)."""
    f = open_regular(path, max_bytes, what)
    with f:
        try:
            # the file's size and one byte more (to see it grew), not max_bytes + 1 at once: a
            # read of n bytes reserves n first (128 MiB a photo, refused under ulimit -v)
            size = min(os.fstat(f.fileno()).st_size, max_bytes)
            data = f.read(size + 1)
            if size < len(data) <= max_bytes:  # it grew: the rest, to one byte past the ceiling
                data += f.read(max_bytes + 1 - len(data))
        except OSError as exc:
            raise FileProblem(os_problem(exc)) from None
    if len(data) > max_bytes:
        raise FileProblem(f"{what} grew past the limit of {max_bytes:,} bytes while being read")
    return data


MAX_JSON_DEPTH = 32  # edgecap's own JSON files nest 4 deep
MAX_VOCAB_BYTES = 16 << 20  # vocab.json and classes.json: the shipped ones are 30-60 KB


def read_json(path: str | os.PathLike, max_bytes: int, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file that edgecap did not write: a regular file of at most ``max_bytes``, UTF-8,
    nested at most ``max_depth`` deep (checked without recursion); ``FileProblem`` otherwise. A
    leading byte order mark ("UTF-8 with BOM": Notepad, Excel) is read as none, as JSON allows."""
    data = read_regular(path, max_bytes, "JSON file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    depth = _bracket_depth(text)
    if depth > max_depth:
        raise FileProblem(f"JSON nested {depth} deep, over the limit of {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FileProblem(f"not valid JSON ({exc})") from None


# a string: to its closing quote, or to the end of the text when it has none (invalid JSON): each
# match then ends where the scan stopped, so the work is linear (a quote that had to be tried
# against the rest of the text from every later quote took quadratic time: 10 s for 60 KB of
# escaped quotes, about 45 minutes for 1 MB)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (an upper bound for invalid JSON), in
    linear time without recursion."""
    import numpy as np

    codes = np.frombuffer(_STRING.sub('""', text).encode("utf-8"), np.uint8)
    opens = ((codes == 0x5B) | (codes == 0x7B)).view(np.int8)
    closes = ((codes == 0x5D) | (codes == 0x7D)).view(np.int8)
    return int(np.cumsum(opens - closes, dtype=np.int32).max(initial=0))
