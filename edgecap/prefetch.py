"""Decoding workers: threads that read, decode and preprocess the next photos while the model
works on a batch (``Captioner(decode_workers=N)``, ``--decode-workers N``).

The inputs are read in the calling thread, in order, and only as far as the window allows:
while the caller works on one batch, at most ``ahead`` inputs after it are being prepared or
wait, prepared, for their turn. Results come back in the input order, each input's failure in
its own slot. Pillow's decoders and resizing and numpy's arithmetic release the GIL, so the
workers overlap the model's own work (a GPU's, or onnxruntime's threads).
"""

from __future__ import annotations

import itertools
import numbers
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

# On a GPU the host's decoding is what the model waits for: one worker per usable CPU core but
# one (the thread that drives the GPU), at most this many.
MAX_GPU_DECODE_WORKERS = 8
# On the CPU the model already keeps the cores busy (onnxruntime: one thread per core); see
# docs/performance-options.md for what workers did there.
DEFAULT_CPU_DECODE_WORKERS = 0
# Each worker keeps two photos decoded ahead (``window``): 64 workers hold 128 preprocessed photos,
# more than any batch (at most 64) needs. Beyond it a typo (1000) would start a thousand threads.
MAX_DECODE_WORKERS = 64

Item = TypeVar("Item")  # an input
T = TypeVar("T")  # what it is prepared into


def default_decode_workers(on_gpu: bool) -> int:
    """The decoding workers when none are asked for: on a GPU one per usable core less one, at
    least 1 and at most ``MAX_GPU_DECODE_WORKERS``; on the CPU ``DEFAULT_CPU_DECODE_WORKERS``."""
    if not on_gpu:
        return DEFAULT_CPU_DECODE_WORKERS
    return max(1, min(MAX_GPU_DECODE_WORKERS, usable_cores() - 1))


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_decode_workers(workers: object) -> None:
    """``decode_workers``: None or a whole number from 0 to ``MAX_DECODE_WORKERS``; anything else
    is a ``ValueError``."""
    if workers is not None and (
        isinstance(workers, bool)
        or not isinstance(workers, numbers.Integral)  # numpy integers too
        or not 0 <= int(workers) <= MAX_DECODE_WORKERS
    ):
        raise ValueError(
            f"decode_workers must be a whole number >= 0 (at most {MAX_DECODE_WORKERS}) or None, "
            f"got {workers!r}"
        )


def window(batch: int, workers: int) -> int:
    """Inputs prepared ahead of the batch being captioned: a batch, and enough to keep every
    worker busy when batches are small."""
    return max(batch, 2 * workers)


def prefetched_batches(
    pool: Executor,
    prepare: Callable[[Item], T],
    items: Iterator[Item],
    batch: int,
    ahead: int,
    keep: type[Exception],
    inline: Callable[[], bool] = lambda: False,
) -> Generator[list[T | Exception], None, None]:
    """Lists of ``batch`` results of ``prepare(item)`` (the last may be shorter), in ``items``'
    order, prepared on ``pool`` up to ``ahead`` items beyond the list handed out. An item whose
    ``prepare`` raises ``keep`` has that exception in its slot; any other exception is raised
    when its batch is due. Closing the generator cancels what has not started. An item the
    pool refuses (``RuntimeError``: it was shut down) is prepared in the calling thread where
    ``inline()`` says so (the pool was shut down by the interpreter's exit, not by its owner),
    else that error is raised."""
    pending: deque[Future] = deque()
    futures: list[Future] = []  # the batch being handed out
    try:
        while True:
            for item in itertools.islice(items, batch + ahead - len(pending)):
                try:
                    pending.append(pool.submit(prepare, item))
                except RuntimeError:
                    if not inline():
                        raise
                    pending.append(_prepared_here(prepare, item))
            if not pending:
                return
            futures = [pending.popleft() for _ in range(min(batch, len(pending)))]
            chunk: list[T | Exception] = []
            for future in futures:
                try:
                    chunk.append(future.result())
                except keep as exc:
                    chunk.append(exc)
            yield chunk
    finally:
        # inputs nobody will caption are not decoded: those after the batch, and the rest of
        # the batch when one of its items raised (cancelling a finished one does nothing)
        for future in itertools.chain(futures, pending):
            future.cancel()


def _prepared_here(prepare: Callable[[Item], T], item: Item) -> Future:
    """``prepare(item)`` run in the calling thread, as a finished ``Future``."""
    future: Future = Future()
    try:
        future.set_result(prepare(item))
    except Exception as exc:  # noqa: BLE001 (in its slot, as a worker's would be)
        future.set_exception(exc)
    return future
