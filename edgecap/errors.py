"""The exceptions edgecap raises on purpose. Catch ``EdgecapError`` to catch them all.

- ``InputError``: an image (path, bytes, array) that cannot be captioned; names the input.
- ``ModelError``: a model directory, file, vocabulary or manifest that cannot be used.
- ``BackendError``: a runtime that is missing or failed (names the extra to install).
- ``DataError``: training data that cannot be used (a captions file with the wrong columns, no
  usable photo); names the file and, where there is one, the line.
"""

from __future__ import annotations

import re


class EdgecapError(Exception):
    """Base class of every error edgecap raises on purpose."""


def reason(exc: BaseException) -> str:
    """An exception as a one-line reason to put in a message: its text with every run of
    whitespace (newlines of a decoder's message included) one space, or its type's name when it
    has no text."""
    return " ".join(str(exc).split()) or type(exc).__name__


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun that goes with it, for a message: ``counted(1, "image")`` is "1 image",
    ``counted(2, "image")`` "2 images" (0 takes the plural too). ``plural`` where adding an s
    is wrong, a verb that agrees with the count included: ``counted(n, "photo is missing",
    "photos are missing")``."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def out_of_memory(exc: BaseException) -> str | None:
    """What could not be allocated, in a few words, where ``exc`` is running out of memory
    (an address-space limit, ulimit -v; strict overcommit; a GPU's memory), else None: Python's
    MemoryError (numpy, Pillow, an import), onnxruntime's failure to allocate (its arena's
    'Failed to allocate memory for requested buffer of size N', a C++ bad_alloc) and torch's
    (CPU: a RuntimeError 'DefaultCPUAllocator: can't allocate memory: you tried to allocate N
    bytes'; torch.OutOfMemoryError, CUDA's) and protobuf's, reading an ONNX file for torch
    ('Error parsing message with type 'onnx.ModelProto': Arena alloc failed'), and onnxruntime's
    CUDA provider's (``gpu_out_of_memory``)."""
    if isinstance(exc, MemoryError):
        return "MemoryError"
    text = str(exc)
    size = re.search(r"(?:requested buffer of size|you tried to allocate) (\d+)", text)
    library = type(exc).__module__.split(".")[0]
    if library == "onnxruntime" and (size or "bad_alloc" in text):
        what = f"{int(size.group(1)):,} bytes" if size else "memory (bad_alloc)"
        return f"onnxruntime could not allocate {what}"
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in text and size:
        return f"torch could not allocate {int(size.group(1)):,} bytes"
    if library == "google" and "Arena alloc failed" in text:  # protobuf reading an ONNX file (onnx.load)
        return "protobuf could not allocate memory (Arena alloc failed)"
    if library == "torch" and type(exc).__name__ == "OutOfMemoryError":  # CUDA's
        return f"torch: {text.splitlines()[0]}" if text else "torch.OutOfMemoryError"
    gpu = _CUDA_OUT_OF_MEMORY.search(text)
    if library == "onnxruntime" and gpu:  # the CUDA provider's, as its errors word it
        return f"onnxruntime: {gpu.group(0)}"
    return None


# onnxruntime's CUDA execution provider out of the GPU's memory, as its errors word it ("CUDA
# failure 2: out of memory ; GPU=0 ; ... expr=cudaMalloc(...)", "CUDA error
# cudaErrorMemoryAllocation:out of memory", cuBLAS's and cuDNN's allocation failures)
_CUDA_OUT_OF_MEMORY = re.compile(
    r"CUDA failure 2: out of memory|cudaErrorMemoryAllocation:out of memory|"
    r"CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
)


def gpu_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (one ``out_of_memory`` names) is a GPU's memory running out, not the
    host's: torch's CUDA allocator (torch.OutOfMemoryError) or onnxruntime's CUDA provider."""
    library = type(exc).__module__.split(".")[0]
    if library == "torch" and type(exc).__name__ == "OutOfMemoryError":
        return True
    return library == "onnxruntime" and bool(_CUDA_OUT_OF_MEMORY.search(str(exc)))


class InputError(EdgecapError, ValueError):
    """An input image that cannot be captioned. ``source`` names it (a path or a description)."""

    def __init__(self, source: str, problem: str):
        # One line, always: the CLI prints ``edgecap: SOURCE: PROBLEM`` per failed input, and
        # decoder messages (libtiff, libpng) sometimes carry newlines.
        self.source = source
        self.problem = " ".join(str(problem).split())
        name = str(source)
        if not name.isprintable():  # a file name with a newline, a byte that is not UTF-8 ...
            from edgecap.commands.output import escape_field

            name = escape_field(name)  # escaped as ``edgecap caption`` does: still one line
        super().__init__(f"{name}: {self.problem}")

    def __reduce__(self):
        # pickled (raised or returned by a process pool's worker) as its two arguments: by
        # default as its message alone, which cannot make one again (a broken process pool)
        return type(self), (self.source, self.problem)


class ModelError(EdgecapError):
    """A model directory or artifact that cannot be used; the message says what to do."""


class BackendError(EdgecapError):
    """A backend that is not installed or failed to run."""


class MissingPackageError(BackendError, ImportError):
    """An optional package a command needs is not installed; the message names the pip command
    (an ``ImportError`` too, for code that checks for one)."""


class DataError(EdgecapError, ValueError):
    """Training data that cannot be used as a whole; the message names the file and line."""


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused (directly or not) by, a KeyboardInterrupt: a Ctrl-C
    that arrives inside an import or a C extension can surface as another exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
