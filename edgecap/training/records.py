"""Reading the files training writes and reads back (checkpoints, the optimizer's state, the
feature caches and their records) with the discipline of ``edgecap.files``: they may have been
copied, swapped or damaged since, so each is a regular file under a size ceiling before it is
read, its JSON nests at most ``files.MAX_JSON_DEPTH`` deep, and every value is checked for its
type and range before it is used (a size written in a record never allocates before it is
checked). Each failure is one line naming the file: the error class the caller passes
(``ModelError`` for a checkpoint, ``FeatureCacheError`` for a cache).
"""

from __future__ import annotations

import builtins
import json
import os
import stat
import struct
from pathlib import Path

from edgecap.commands.output import escape_field
from edgecap.errors import EdgecapError, ModelError
from edgecap.files import FileProblem, check_regular, open_regular, read_json

MAX_RECORD_BYTES = 256 << 20  # plan.json / index.json of 123k COCO photos by absolute path: ~20 MB
MAX_SMALL_BYTES = 16 << 20  # checkpoint.json, optimizer.json, a shard's record: a few KB
MAX_WEIGHTS_BYTES = 4 << 30  # model / optimizer safetensors (the shipped decoder's: ~50 MB)
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (safetensors' own limit)


def shown(path) -> str:
    """A path as problem reports print it (``edgecap caption``'s escaping)."""
    return escape_field(os.fspath(path) if not isinstance(path, str) else path)


RUN_LOCK = ".edgecap-train.lock"


def open_lock_file(path: Path) -> int | None:
    """A descriptor of the lock file ``path`` (made when missing) to ``fcntl.flock``, or None
    where it cannot be had: no ``fcntl`` (Windows), a folder that cannot be written (the writes
    after it say what is wrong), or something other than a regular file in its place (a named
    pipe: opened without blocking, so that it cannot hang the run, and passed over)."""
    try:
        import fcntl  # noqa: F401 (only whether there is one)
    except ImportError:  # pragma: no cover - Windows
        return None
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    return fd


class RunLock:
    """An exclusive lock on a run folder (``OUT/.edgecap-train.lock``, ``fcntl.flock``) while a
    run writes it: a second run into the same ``--out`` while the first still runs (a job
    started twice, a supervisor's restart while the old process lingers) is refused at once,
    naming the folder; both had written best/, last/ and steps.jsonl, and one's recovery could
    remove the other's half-written checkpoint. ``take`` once the folder exists (a new run's is
    made late, when its data and features are ready); the system releases the lock when the
    process ends (kill -9 leaves none behind). Without ``fcntl`` (Windows), or on a file system
    without locks, nothing is held, as before."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def take(self, out: Path) -> None:
        if self._fd is not None or not out.is_dir():
            return
        fd = open_lock_file(out / RUN_LOCK)
        if fd is None:
            return
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EdgecapError(
                f"{shown(out)}: another training run is writing this folder now; wait for it to "
                "end (the same command then resumes from its last/) or give another --out"
            ) from None
        except OSError:  # no locks on this file system (ENOLCK): not held, as before
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Record:
    """A JSON object read from ``path``; its getters check each value's type and range and raise
    ``error`` naming the file and the key."""

    def __init__(self, path: Path, data: dict, error: type[Exception]):
        self.path, self.data, self.error = path, data, error

    def fail(self, problem: str) -> Exception:
        return self.error(f"{shown(self.path)}: {problem}")

    def get(self, key: str, kind, what: str):
        if key not in self.data:
            raise self.fail(f"no {key!r}")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{key!r} is not {what}")
        return value

    def int(self, key: str, low: int = 0, high: int | None = None) -> int:
        value = self.get(key, int, "an integer")
        if value < low or (high is not None and value > high):
            raise self.fail(f"{key!r} is {value}, outside {low}..{'' if high is None else high}")
        return value

    def str(self, key: str) -> str:
        return self.get(key, str, "a string")

    # below the methods named str and int: the builtins spelt out for the type checker
    def dict(self, key: builtins.str) -> dict:
        return self.get(key, dict, "an object")

    def strings(self, key: builtins.str) -> list[builtins.str]:
        value = self.get(key, list, "a list")
        if not all(isinstance(v, str) for v in value):
            raise self.fail(f"{key!r} holds something other than strings")
        return value

    def ints(
        self, key: builtins.str, low: builtins.int = 0, high: builtins.int | None = None
    ) -> list[builtins.int]:
        value = self.get(key, list, "a list")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
            for v in value
        ):
            raise self.fail(
                f"{key!r} holds something other than integers in {low}..{'' if high is None else high}"
            )
        return value


def read_record(path: Path, error: type[Exception] = ModelError, max_bytes: int = MAX_SMALL_BYTES) -> Record:
    """The JSON object in ``path`` (``error`` if it is not a regular file of at most
    ``max_bytes``, not JSON, nested too deep or not an object)."""
    try:
        data = read_json(path, max_bytes)
    except FileProblem as exc:
        raise error(f"{shown(path)}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{shown(path)}: not a JSON object ({type(data).__name__})")
    return Record(Path(path), data, error)


def check_file(
    path: Path, error: type[Exception] = ModelError, max_bytes: int | None = MAX_WEIGHTS_BYTES
) -> int:
    """``error`` unless ``path`` is a regular file of at most ``max_bytes``; -> its size."""
    try:
        size = check_regular(path).st_size
    except FileProblem as exc:
        raise error(f"{shown(path)}: {exc}") from None
    if max_bytes is not None and size > max_bytes:
        raise error(f"{shown(path)}: {size:,} bytes, over the limit of {max_bytes:,}")
    return size


def safetensors_shapes(path: Path, error: type[Exception] = ModelError) -> dict[str, tuple]:
    """The tensor shapes a safetensors file declares ({name: shape}), read from its header
    alone (a regular file under ``MAX_WEIGHTS_BYTES``): nothing is allocated for the tensors."""
    size = check_file(path, error)
    try:
        with open_regular(path, MAX_WEIGHTS_BYTES, "weights file") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{shown(path)}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise error(
                    f"{shown(path)}: not a safetensors file (a header of {n:,} bytes in a file of {size:,})"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except FileProblem as exc:
        raise error(f"{shown(path)}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{shown(path)}: not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise error(f"{shown(path)}: not a safetensors file (the header is not an object)")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise error(f"{shown(path)}: tensor {name!r} has no valid shape")
        shapes[name] = tuple(shape)
    return shapes
