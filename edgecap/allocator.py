"""The process's C allocator kept from giving big blocks back to the system: what the command
line does for the torch backend on the CPU (docs/performance-options.md).

glibc's ``malloc`` serves a block above its mmap threshold (dynamic, at most 32 MB by default on
64-bit) with fresh pages and returns them on free. The torch backend on the CPU makes and frees
activations that large in every call from batch 8 on, and so faults in (the kernel zeroing
each page first) about 78,000 pages a call at batch 8 and 2 million at batch 64. With both
thresholds at ``KEEP_BELOW`` the blocks come from the heap and stay there: 1.29x and 1.94x
faster calls there (``benchmarks/malloc.py``), onnxruntime (its own arena) and one photo at a
time unchanged; the process keeps its peak memory. Process-wide, so the library never does it
by itself: ``edgecap caption``, ``eval`` and ``serve`` do for ``--backend torch`` on the CPU.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEEP_BELOW = 2**31 - 1  # bytes: blocks below this come from the heap and the heap is not trimmed
# the most an older glibc's mallopt takes for the mmap threshold (its DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit, mallopt(3)): where 2 GiB is refused, blocks up to 32 MiB are kept (batch 8's
# activations in part; batch 64's not)
OLDER_GLIBC_MOST = 32 * 2**20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# what glibc reads the two thresholds from at the process's start: an operator's own choice
THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
THRESHOLD_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to ``KEEP_BELOW`` for this process (the mmap
    threshold to ``OLDER_GLIBC_MOST`` where an older glibc refuses more); True where done,
    False where the C library is not glibc (musl, macOS, Windows) or refused, or where the
    environment sets either threshold already (left as the operator set it)."""
    if not sys.platform.startswith("linux"):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in THRESHOLD_VARIABLES) or any(
        t in tunables for t in THRESHOLD_TUNABLES
    ):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
    except OSError:  # pragma: no cover - a Linux process without a dynamic C library
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:  # musl's does nothing
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap = mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) or mallopt(M_MMAP_THRESHOLD, OLDER_GLIBC_MOST)
    return bool(mmap) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
