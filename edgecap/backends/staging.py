"""A batch's host-side stack and its copy to the GPU, through kept page-locked buffers.

The torch backend on CUDA takes a batch as separate arrays (the preprocessed images, or the
decoded frames with ``preprocess="device"``). Stacked by ``np.stack`` into a fresh array, the
host first faults in every page of it (at batch 64 on a 2-core Intel Xeon the stack takes
0.089 ms an image of preprocessed images into a new array, 0.047 into a kept one; VGA frames
0.196 and 0.114: ``benchmarks/host_share.py``), and the copy to the GPU from pageable memory
goes through the driver's own staging copy. ``Staging.stack`` writes the batch into a buffer
kept for its shape instead, page-locked (pinned) on CUDA, and ``Staging.upload`` copies it to
the device without blocking the host.

Kept per calling thread (a thread-safe backend's batches run in several threads at once) and
per shape, the last ``KEPT`` shapes a thread used, up to ``KEEP_AT_MOST`` bytes a batch; a
buffer is written again only after its last upload has finished (a CUDA event). Where
page-locked memory cannot be had (a host short of it) the buffer is kept in pageable memory.
Not yet timed on a GPU (``benchmarks/gpu_check.py`` times it against the fresh stack:
"Host-to-GPU copies").

A large batch is stacked by several threads at once, each copying a share of the images
(``stack_into``): numpy copies without the interpreter's lock, and one core does not reach the
memory's bandwidth (into a kept buffer on a 2-core AMD EPYC, ms an image at batch 64, one thread
against two: preprocessed images 0.068 and 0.047, VGA frames 0.103 and 0.064;
``benchmarks/results/host_share_amd.md``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch

from edgecap.prefetch import usable_cores

KEPT = 2  # buffers a thread keeps: the preprocessed images' and the frames' shapes, say
# a batch larger than this (64 frames of 1080p: 398 MB) is stacked into a new array each time,
# not kept (nor page-locked): memory a host cannot spare for good
KEEP_AT_MOST = 256 * 2**20
# a stack of at least this many bytes is split between STACK_THREADS threads (the calling one
# and a shared pool's): below it, handing a share to another thread cost more than it saved
# (2-core AMD EPYC, kept buffer: 8 preprocessed images, 4.6 MiB, 0.15 ms by one thread and 0.19
# by two; 16, 9.2 MiB, 0.36 and 0.29; 64, 36.8 MiB, 2.9 and 1.5)
SPLIT_AT_LEAST = 8 * 2**20
STACK_THREADS = min(4, usable_cores())

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def stack_into(arrays: Sequence[np.ndarray], out: np.ndarray) -> None:
    """``np.stack(arrays, out=out)``, by up to ``STACK_THREADS`` threads when ``out`` holds at
    least ``SPLIT_AT_LEAST`` bytes, each stacking a run of the arrays into its rows. Every run is
    written before this returns or raises (a bad array's error, the first run's first). Where
    no thread takes work (the interpreter exiting) the calling thread stacks the runs left."""
    threads = min(STACK_THREADS, len(arrays))
    if threads < 2 or out.nbytes < SPLIT_AT_LEAST:
        np.stack(arrays, out=out)
        return
    bounds = [len(arrays) * i // threads for i in range(threads + 1)]
    runs = list(zip(bounds[:-1], bounds[1:]))
    pool = _stack_pool()
    others = []
    try:
        for a, b in runs[1:]:
            others.append(pool.submit(np.stack, arrays[a:b], out=out[a:b]))
    except RuntimeError:  # the interpreter is exiting: no new work for threads; the rest here
        pass
    try:
        for a, b in [runs[0], *runs[len(others) + 1 :]]:
            np.stack(arrays[a:b], out=out[a:b])
    finally:
        wait(others)  # none still writing into ``out`` once this returns or raises
    for other in others:
        other.result()  # its error, if it had one


def _stack_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(STACK_THREADS - 1, thread_name_prefix="edgecap-stack")
        return _pool


def _forget_the_pool() -> None:
    """In a fork's child: the parent's pool has no threads there (its idle count says they
    wait, so work given it would never run); a new one is made on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_the_pool)


class Staging:
    """Kept host buffers for ``device`` (page-locked when it is a CUDA device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._local = threading.local()
        # the copy to the device, and what says when it has read the buffer (None: it has
        # when the copy returns): on CUDA a copy that does not block, and an event after it
        self._copy: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.clone
        self._copy_started: Callable[[torch.Tensor], Any] | None = None
        if self.pinned:
            self._copy = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
            self._copy_started = self._recorded_event

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Arrays of one shape and dtype -> them stacked (N, ...) in this thread's kept host
        buffer for that shape (made at its first use), once its last upload has finished.
        The tensor is that buffer: ``upload`` it before this thread stacks that shape again.
        Over ``KEEP_AT_MOST`` bytes: a new array, as ``np.stack`` makes it."""
        first = np.asarray(arrays[0])
        if len(arrays) * first.nbytes > KEEP_AT_MOST:
            return torch.from_numpy(np.stack(arrays))
        key = (len(arrays), *first.shape, first.dtype.str)
        kept: OrderedDict = self._kept()
        entry = kept.pop(key, None)
        if entry is None:
            entry = [self._buffer((len(arrays), *first.shape), first.dtype), None]
            while len(kept) >= KEPT:
                kept.popitem(last=False)
        kept[key] = entry  # the most recently used last
        buffer, uploaded = entry
        if uploaded is not None:
            uploaded.synchronize()  # its last copy to the device has read it
            entry[1] = None
        stack_into(arrays, buffer.numpy())
        return buffer

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A ``stack`` result -> a copy of it on the device, the host not waiting for the copy
        on CUDA; never the buffer itself, which the next ``stack`` of its shape writes again."""
        out = self._copy(host)
        if self._copy_started is not None:
            started = self._copy_started(host)
            for entry in self._kept().values():
                if entry[0] is host:
                    entry[1] = started
        return out

    def _recorded_event(self, host: torch.Tensor) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _kept(self) -> OrderedDict:
        kept = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = OrderedDict()
        return kept

    def _buffer(self, shape: tuple, dtype: np.dtype) -> torch.Tensor:
        torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        if self.pinned:
            try:
                return torch.empty(shape, dtype=torch_dtype, pin_memory=True)
            except RuntimeError:  # no page-locked memory to be had: a pageable buffer, kept
                pass
        return torch.empty(shape, dtype=torch_dtype)
