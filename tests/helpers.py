"""Shared builders for tests: a fake backend driven by a hand-written table of log-probabilities,
solid-colour images, and two ways to force threads to interleave deterministically (decoder
steps in lockstep; every line of package code in turn).

Everything here uses the backend interface (``edgecap.backends.base``) only, so it survives a
refactor of the package's internals.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image

from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult

FILL = -30.0  # log-prob of every word a table does not name (far below any named word)


class TableBackend(Backend):
    """A decoder whose next-word log-probabilities come from ``rule(prefix)``.

    ``words``: the vocabulary (id = position); ``rule``: a function of the words generated so far
    (a tuple of strings, without <start>) returning ``{word: log_prob}``; every other word gets
    ``FILL``. The step returns the ``top_k`` best, best first (ties: lower id first). Each
    session keeps its rows' prefixes itself (never the backend), as a real session keeps h/c.
    ``keyed=True``: the rule is ``rule(prefix, key)``, ``key`` the image's mean input value in
    channel 0 (so differently coloured images can follow different tables).
    """

    name = "fake-table"

    def __init__(self, words: list[str], rule: Callable[..., dict[str, float]],
                 top_k: int = 4, start: str = "<start>", keyed: bool = False):
        self.words, self.rule, self.top_k, self.start_word = list(words), rule, top_k, start
        self.keyed = keyed
        self.index = {w: i for i, w in enumerate(self.words)}
        self.n_regions = 4
        self.encoded_batches: list[np.ndarray] = []

    def encode(self, images: np.ndarray) -> Encoded:
        self.encoded_batches.append(np.array(images))
        keys = [float(np.asarray(image)[0].mean()) for image in images]
        return Encoded(n_images=len(images), tensors=keys)

    def start(self, encoded, image_index, return_attention=False):
        return TableSession(self, encoded.tensors, image_index, return_attention)

    def logprobs(self, prefix: tuple[str, ...], key: float | None = None) -> np.ndarray:
        lp = np.full(len(self.words), FILL)
        rule = self.rule(prefix, key) if self.keyed else self.rule(prefix)
        for word, value in rule.items():
            lp[self.index[word]] = value
        return lp


class TableSession(DecoderSession):
    def __init__(self, backend: TableBackend, keys: list[float], image_index, return_attention):
        self.backend = backend
        self.prefixes: list[tuple[str, ...] | None] = [None] * len(keys)  # None: before <start>
        self.row_keys = [keys[i] for i in np.asarray(image_index).tolist()]
        self.return_attention = return_attention

    def step(self, tokens, source_rows):
        b = self.backend
        new = []
        for src, tok in zip(source_rows.tolist(), tokens.tolist()):
            prev = self.prefixes[src]
            word = b.words[tok]
            new.append(() if prev is None else prev + (word,))
            assert prev is not None or word == b.start_word
        self.prefixes = new
        lp = np.stack([b.logprobs(p, k) for p, k in zip(new, self.row_keys)])
        ids = np.argsort(-lp, axis=1, kind="stable")[:, : b.top_k]
        alpha = (np.full((len(new), b.n_regions), 1.0 / b.n_regions, np.float32)
                 if self.return_attention else None)
        return StepResult(np.take_along_axis(lp, ids, 1).astype(np.float32),
                          ids.astype(np.int32), alpha)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """uint8 (H, W, 3) array of one colour; ``size`` is (width, height)."""
    w, h = size
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def encoded_bytes(array: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    """An RGB uint8 array encoded as PNG / JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


class LockstepSessions:
    """Wraps ``backend.start`` so that every session's ``step`` first waits at a barrier shared by
    ``parties`` threads: the searches of those threads advance one word at a time together, so
    all of them are mid-decoding at once whatever the scheduler does (no sleeps, no timing).

    A thread whose search ends (or fails) calls ``leave()``: the barrier is then broken and the
    others carry on without waiting, so nobody waits forever.
    """

    def __init__(self, backend: Backend, parties: int):
        self.barrier = threading.Barrier(parties)
        self.steps_together = 0
        self._lock = threading.Lock()
        self._start = backend.start
        backend.start = self.start  # instance attribute: only this backend object is affected

    def start(self, *args, **kwargs):
        return _LockstepSession(self, self._start(*args, **kwargs))

    def leave(self) -> None:
        self.barrier.abort()


class _LockstepSession(DecoderSession):
    def __init__(self, owner: LockstepSessions, inner: DecoderSession):
        self.owner, self.inner = owner, inner

    def step(self, tokens, source_rows):
        try:
            if self.owner.barrier.wait() == 0:
                with self.owner._lock:
                    self.owner.steps_together += 1
        except threading.BrokenBarrierError:
            pass  # another thread is finished: no partner left to wait for
        return self.inner.step(tokens, source_rows)


class LineLockstep:
    """Threads run the Python code of files under ``directory`` one line each in turn.

    Each thread calls ``run(fn)``; once all ``parties`` have, a baton goes round: at every line
    of traced code a thread hands the baton to the next thread and waits for it to come back
    (``sys.settrace``, this thread only). Code outside ``directory`` (numpy, onnxruntime, the
    test) runs freely, so a thread inside a backend call simply keeps the others waiting until
    its next traced line. Two calls that run the same code are thus interleaved line by line,
    whatever the scheduler does: state they share (an attribute set on a shared object, a
    module-level cache) is read and written between each other's lines.

    Never use it around code that waits for another thread (a lock another traced thread can
    hold): the waiting thread would hold the baton.
    """

    def __init__(self, directory, parties: int):
        self.prefix = str(directory)
        self.parties = parties
        self.cond = threading.Condition()
        self.ring: list[int] = []   # threads inside run(), in turn order
        self.joined = 0             # threads that have called run() (still in it or left)
        self.turn: int | None = None
        self.switches = 0

    def run(self, fn):
        me = threading.get_ident()
        with self.cond:
            self.ring.append(me)
            self.joined += 1
            if self.joined == self.parties:
                self.turn = self.ring[0]  # everyone is here: the baton starts
                self.cond.notify_all()
        sys.settrace(self._on_call)
        try:
            return fn()
        finally:
            sys.settrace(None)
            with self.cond:
                i = self.ring.index(me)
                self.ring.remove(me)
                if self.turn == me:
                    self.turn = self.ring[i % len(self.ring)] if self.ring else None
                self.cond.notify_all()

    def _on_call(self, frame, event, arg):
        return self._on_line if frame.f_code.co_filename.startswith(self.prefix) else None

    def _on_line(self, frame, event, arg):
        if event == "line":
            me = threading.get_ident()
            with self.cond:
                if self.turn == me and len(self.ring) > 1:
                    self.turn = self.ring[(self.ring.index(me) + 1) % len(self.ring)]
                    self.switches += 1
                    self.cond.notify_all()
                self.cond.wait_for(lambda: self.turn == me)
        return self._on_line
