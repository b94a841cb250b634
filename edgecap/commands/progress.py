"""Progress on stderr for the commands that caption many images (``caption``, ``eval``): shown
only when stderr is a terminal and ``--no-progress`` was not given, never on stdout, so records
and JSON stay clean whatever is shown.

``open_progress(total, enabled)`` -> an object with ``update(n)``, ``paused()`` (a context in
which other lines may be written to the same terminal: the progress line is cleared first and
drawn again after) and ``close()``: a ``Counter`` line rewritten in place (no tqdm: the
captioning runtime does not depend on it). ``paused_progress()``: the open ``Counter``'s
``paused()``, for a line written from elsewhere (edgecap's warnings, from a decoding worker
too).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time

from edgecap.errors import counted

# Nothing is drawn before this many seconds: a short run shows no progress at all.
DELAY_S = 1.0
_REDRAW_S = 0.1


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        "--quiet",
        dest="no_progress",
        action="store_true",
        help="no progress line on stderr (it is shown only when stderr is a terminal, never on stdout)",
    )


def progress_enabled(args: argparse.Namespace, stream=None) -> bool:
    """Progress is shown when asked (no ``--no-progress``) and ``stream`` (stderr) is a
    terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # a replaced or closed stderr
        tty = False
    return tty and not args.no_progress


class Counter:
    """``done/total images, R/s, M:SS left`` (without a total: ``done images, R/s``) rewritten in
    place on ``stream``, at most every 0.1 s, from ``delay`` seconds on (None: ``DELAY_S``)."""

    def __init__(self, total: int | None, stream=None, delay: float | None = None, clock=time.monotonic):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.clock, self.started = clock, clock()
        self.delay = DELAY_S if delay is None else delay
        self.last = 0.0
        self.shown = False  # a progress line is on the terminal now
        # a warning's line may come from a decoding worker while this thread draws
        self._lock = threading.RLock()
        global _open
        _open = self

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if now - self.started >= self.delay and (not self.shown or now - self.last >= _REDRAW_S):
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        if self.total is None:
            text = f"{counted(self.done, 'image')}, {rate:.1f}/s"
        else:
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            text = (
                f"{self.done}/{counted(self.total, 'image')}, {rate:.1f}/s, "
                f"{int(left) // 60}:{int(left) % 60:02d} left"
            )
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.shown, self.last = True, now

    @contextlib.contextmanager
    def paused(self):
        with self._lock:
            was_shown = self.shown
            if was_shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.shown = False
            try:
                yield
            finally:
                if was_shown:
                    self._draw(self.clock())

    def close(self) -> None:
        global _open
        with self._lock:
            if _open is self:
                _open = None
            if self.shown:
                self._draw(self.clock())
                self.stream.write("\n")
                self.stream.flush()
                self.shown = False


# the Counter drawn now (one at a time: a command's), for paused_progress
_open: Counter | None = None


def paused_progress():
    """A context in which a line may be written to stderr without landing on the progress line:
    the open ``Counter``'s ``paused()``, or nothing where none is open."""
    counter = _open
    return counter.paused() if counter is not None else contextlib.nullcontext()


class NoProgress:
    def update(self, n: int) -> None:
        pass

    @contextlib.contextmanager
    def paused(self):
        yield

    def close(self) -> None:
        pass


def open_progress(total: int | None, enabled: bool):
    """The progress display of ``total`` images (None: not known in advance); nothing when not
    ``enabled``."""
    return Counter(total) if enabled else NoProgress()
