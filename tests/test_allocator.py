"""``edgecap.allocator``: glibc kept from giving big blocks back, and the command line asking
for it with the torch backend on the CPU only (docs/performance-options.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from edgecap.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
    reason="glibc's malloc on Linux",
)

FAULTS = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    if sys.argv[1] == "keep":
        from edgecap.allocator import keep_freed_memory
        assert keep_freed_memory()
    counts = []
    for _ in range(5):  # a 64 MB block made, written and freed, as a batch's activation is
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.empty(64 * 2**20, np.uint8)
        block.fill(1)
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(counts))
    """
)


def _faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@glibc_only
def test_a_big_block_freed_is_faulted_in_again_unless_kept():
    """Each time a 64 MB block is made again glibc maps it afresh and the kernel faults it in
    again; kept, the block comes back from the heap with no fault after the first time. At
    least 16 faults a fresh block: one per 2 MiB huge page is 32, which is what a block that
    lands 2 MiB-aligned takes (numpy asks for huge pages for it): 33 a block in a worker thread
    on the 2-core Xeon (kernel 6.18, THP madvise), 544 in the main thread there."""
    plain, kept = _faults("plain"), _faults("keep")
    assert all(count >= 16 for count in plain[1:]), plain
    assert kept[0] >= 16 and kept[1:] == [0, 0, 0, 0], kept


def test_elsewhere_than_linux_nothing_is_set(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False


@pytest.mark.parametrize(("backend", "asked"), [("torch", True), ("onnxruntime", False)])
def test_the_command_line_keeps_memory_for_the_torch_backend_on_the_cpu(monkeypatch, backend, asked):
    pytest.importorskip(backend)
    from edgecap.cli import build_parser
    from edgecap.commands import _options

    calls = []
    monkeypatch.setattr(_options, "keep_freed_memory", lambda: calls.append(1) or True)
    args = build_parser().parse_args(["caption", "x.jpg", "--backend", backend])
    captioner = _options.load_captioner(args)
    captioner.close()
    assert bool(calls) is asked


@pytest.mark.parametrize(("name", "device", "asked"), [("torch", "cpu", True), ("torch", "cuda", False)])
def test_the_command_line_leaves_the_allocator_alone_for_the_torch_backend_on_a_gpu(
    monkeypatch, name, device, asked
):
    """The torch backend on CUDA keeps its activations on the GPU: the command line asks glibc to
    keep freed memory for it on the CPU only (a stand-in Captioner, no model loaded)."""
    torch = pytest.importorskip("torch")
    import edgecap.api
    from edgecap.cli import build_parser
    from edgecap.commands import _options

    class Captioner:
        def __init__(self, **kwargs):
            calls.append("made")
            self.backend = SimpleNamespace(name=name, device=torch.device(kwargs["device"] or "cpu"))
            self.fusion = None

    calls = []
    monkeypatch.setattr(edgecap.api, "Captioner", Captioner)
    monkeypatch.setattr(_options, "keep_freed_memory", lambda: calls.append("kept") or True)
    flags = ["caption", "x.jpg", "--backend", "torch"] + (["--device", device] if device == "cuda" else [])
    _options.load_captioner(build_parser().parse_args(flags))
    # before the Captioner is made: before any thread of the model allocates
    assert calls == (["kept", "made"] if asked else ["made"])


@pytest.mark.parametrize(
    ("name", "value", "set_here"),
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072", False),
        ("MALLOC_TRIM_THRESHOLD_", "131072", False),
        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=131072", False),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536", False),
        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2", True),  # no threshold of its own
    ],
)
def test_thresholds_the_environment_sets_are_left_as_they_are(monkeypatch, name, value, set_here):
    """glibc reads its mmap and trim thresholds from the environment at the process's start
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``'
    ``glibc.malloc.mmap_threshold`` / ``trim_threshold``: the glibc manual's "Malloc Tunable
    Parameters" and "Memory Allocation Tunables"); an operator who set one (a container that
    must give memory back) keeps it: nothing set, False. A stand-in C library records calls."""
    from edgecap import allocator

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    libc = SimpleNamespace(mallopt=mallopt, gnu_get_libc_version=lambda: b"2.36")
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    for other in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is set_here
    # M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD -1 in glibc's malloc.h
    assert calls == ([(-3, 2**31 - 1), (-1, 2**31 - 1)] if set_here else [])


def test_an_older_glibc_that_refuses_2_gib_keeps_blocks_up_to_32_mib(monkeypatch):
    """glibc before the limit was lifted refuses an mmap threshold above 32 MiB (mallopt(3):
    DEFAULT_MMAP_THRESHOLD_MAX, 4 * 1024 * 1024 * sizeof(long) on 64-bit): the threshold is then
    32 MiB and the trim threshold 2 GiB; one that refuses even that sets nothing more."""
    from edgecap import allocator

    for other in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for most, want, calls_made in (
        (32 * 2**20, True, [(-3, 2**31 - 1), (-3, 32 * 2**20), (-1, 2**31 - 1)]),
        (16 * 2**20, False, [(-3, 2**31 - 1), (-3, 32 * 2**20)]),
    ):
        calls = []

        def mallopt(param, value, most=most, calls=calls):
            calls.append((param, value))
            return int(param != -3 or value <= most)

        libc = SimpleNamespace(mallopt=mallopt, gnu_get_libc_version=lambda: b"2.30")
        monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name, libc=libc: libc)
        assert keep_freed_memory() is want
        assert calls == calls_made


def test_a_c_library_that_is_not_glibc_is_left_alone(monkeypatch):
    """musl's ``mallopt`` exists and does nothing (it returns 0 or 1 whatever it is asked):
    where the process's C library has no ``gnu_get_libc_version`` (glibc's own), nothing is
    called and nothing is reported as done. A stand-in C library records calls."""
    from edgecap import allocator

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    for other in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert keep_freed_memory() is False
    assert calls == []
