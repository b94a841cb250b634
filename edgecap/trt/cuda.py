"""CUDA device memory for the TensorRT backend: one small interface, two implementations.

``PycudaDevice`` uses pycuda (the design card's choice, and what JetPack users have);
``CudaPythonDevice`` uses NVIDIA's cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` in
older releases), which NVIDIA's own samples use since TensorRT 10.14. Every call is checked and
raises ``BackendError`` naming the operation. Tests use a fake with the same interface.

A CUDA context is current in one thread at a time: the backend may be made in one thread and
called from another (``edgecap serve`` captions in a worker thread), so every use of the device,
TensorRT's included, runs inside ``with device.active():``, which makes the device's context
current in the calling thread for its duration (pycuda: push and pop the primary context;
cuda-python: ``cudaSetDevice``, which binds the device's primary context to the thread).

Not yet run on a real GPU.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np

from edgecap.errors import BackendError


class CudaDevice(ABC):
    """Device memory, pinned host memory and one stream's async copies on one GPU."""

    name: str = "?"
    compute_capability: tuple[int, int] = (0, 0)

    @abstractmethod
    def alloc(self, nbytes: int) -> int:
        """Device memory of ``nbytes``; returns its address."""

    @abstractmethod
    def free(self, ptr: int) -> None: ...

    @abstractmethod
    def host_array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A page-locked host array (async copies need one)."""

    @abstractmethod
    def free_host(self, array: np.ndarray) -> None: ...

    @abstractmethod
    def create_stream(self) -> Any: ...

    @abstractmethod
    def stream_handle(self, stream) -> int:
        """The ``cudaStream_t`` as an int, for ``execute_async_v3``."""

    @abstractmethod
    def destroy_stream(self, stream) -> None: ...

    @abstractmethod
    def copy_to_device(self, dst: int, src: np.ndarray, stream) -> None:
        """Async copy of all of ``src`` (pinned, contiguous) to address ``dst``."""

    @abstractmethod
    def copy_to_host(self, dst: np.ndarray, src: int, stream) -> None:
        """Async copy of ``dst.nbytes`` bytes from address ``src`` into ``dst`` (pinned)."""

    @abstractmethod
    def synchronize(self, stream) -> None: ...

    def active(self) -> AbstractContextManager[None]:
        """The device's CUDA context current in the calling thread while the ``with`` block
        runs (nested uses are fine); a device with no context of its own needs nothing."""
        return nullcontext()

    def close(self) -> None:  # noqa: B027 - optional: a device with nothing to release keeps it
        """Release the device (after every buffer was freed)."""


def open_device(index: int = 0) -> CudaDevice:
    """pycuda when installed, else cuda-python; ``BackendError`` naming both when neither is."""
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        pass
    else:
        return PycudaDevice(index)
    if _import_cudart() is not None:
        return CudaPythonDevice(index)
    raise BackendError(
        "the TensorRT backend needs pycuda or cuda-python for GPU memory: "
        "pip install pycuda (on a Jetson: pip install pycuda, with the CUDA "
        "toolkit on PATH), or pip install 'cuda-python==12.*' (the major version of your CUDA)"
    )


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    return cudart


class PycudaDevice(CudaDevice):
    """pycuda, on the device's primary context (the one TensorRT and other libraries use)."""

    def __init__(self, index: int = 0):
        import pycuda.driver as cuda

        self._cuda = cuda
        self._allocations: dict[int, Any] = {}
        with self._checked("initialising CUDA"):
            cuda.init()
            device = cuda.Device(index)
            self._context = device.retain_primary_context()
            self.name = device.name()
            self.compute_capability = tuple(device.compute_capability())

    def _checked(self, what: str):
        return _Checked(what, self._cuda.Error)

    @contextmanager
    def active(self) -> Iterator[None]:
        # pycuda's copies (memcpy_*_async) use whatever context is current in the thread, and
        # its objects free themselves only where their context is current: push it for the call
        with self._checked("making the GPU's CUDA context current"):
            self._context.push()
        try:
            yield
        finally:
            with self._checked("releasing the GPU's CUDA context from this thread"):
                self._cuda.Context.pop()

    def alloc(self, nbytes: int) -> int:
        with self._checked(f"allocating {nbytes} bytes on the GPU"):
            allocation = self._cuda.mem_alloc(max(int(nbytes), 1))
        ptr = int(allocation)
        self._allocations[ptr] = allocation
        return ptr

    def free(self, ptr: int) -> None:
        with self._checked("freeing GPU memory"):
            self._allocations.pop(ptr).free()

    def host_array(self, shape, dtype) -> np.ndarray:
        with self._checked("allocating pinned host memory"):
            return self._cuda.pagelocked_empty(shape, dtype)

    def free_host(self, array: np.ndarray) -> None:
        free = getattr(array.base, "free", None)
        if free is not None:
            with self._checked("freeing pinned host memory"):
                free()

    def create_stream(self):
        with self._checked("creating a CUDA stream"):
            return self._cuda.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def destroy_stream(self, stream) -> None:
        with self._checked("synchronising the CUDA stream"):
            stream.synchronize()

    def copy_to_device(self, dst: int, src: np.ndarray, stream) -> None:
        with self._checked("copying to the GPU"):
            self._cuda.memcpy_htod_async(dst, src, stream)

    def copy_to_host(self, dst: np.ndarray, src: int, stream) -> None:
        with self._checked("copying from the GPU"):
            self._cuda.memcpy_dtoh_async(dst, src, stream)

    def synchronize(self, stream) -> None:
        with self._checked("running on the GPU (stream synchronize)"):
            stream.synchronize()

    def close(self) -> None:
        if self._context is not None:
            with self._checked("releasing the CUDA context"):
                # the reference to the primary context taken in __init__ (pycuda releases it
                # from the thread that made this device; from another it leaves it to exit)
                self._context.detach()
            self._context = None


class _Checked:
    """Turns the CUDA library's exceptions into ``BackendError`` naming the operation."""

    def __init__(self, what: str, error_type):
        self.what, self.error_type = what, error_type

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, self.error_type):
            raise BackendError(f"CUDA error while {self.what}: {exc}") from exc
        return False


class CudaPythonDevice(CudaDevice):
    """cuda-python's runtime API; every call returns ``(error, *results)`` and is checked."""

    def __init__(self, index: int = 0, cudart=None):
        self._rt = cudart or _import_cudart()
        if self._rt is None:
            raise BackendError(
                "cuda-python is not installed: pip install 'cuda-python==12.*' "
                "(the major version of your CUDA)"
            )
        self._pinned: dict[int, int] = {}  # id(array) -> host pointer
        self._index = index
        self._call("selecting the GPU", self._rt.cudaSetDevice, index)
        props = self._call("reading the GPU's properties", self._rt.cudaGetDeviceProperties, index)
        name = props.name
        self.name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        self.compute_capability = (int(props.major), int(props.minor))

    def _call(self, what: str, fn, *args):
        result = fn(*args)
        err, values = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            text = text.decode() if isinstance(text, bytes) else text
            raise BackendError(f"CUDA error while {what}: {err} ({text})")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    @contextmanager
    def active(self) -> Iterator[None]:
        # the runtime API's current device is per thread (a new thread starts on GPU 0): ours
        # for the block, then the thread's own again (its other CUDA code keeps its device)
        before = self._call("reading the current GPU", self._rt.cudaGetDevice)
        self._call("selecting the GPU", self._rt.cudaSetDevice, self._index)
        try:
            yield
        finally:
            self._call("selecting the GPU again", self._rt.cudaSetDevice, before)

    def alloc(self, nbytes: int) -> int:
        return int(
            self._call(f"allocating {nbytes} bytes on the GPU", self._rt.cudaMalloc, max(int(nbytes), 1))
        )

    def free(self, ptr: int) -> None:
        self._call("freeing GPU memory", self._rt.cudaFree, ptr)

    def host_array(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._call("allocating pinned host memory", self._rt.cudaMallocHost, nbytes))
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        array = raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
        self._pinned[id(array)] = ptr
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._call("freeing pinned host memory", self._rt.cudaFreeHost, self._pinned.pop(id(array)))

    def create_stream(self):
        return self._call("creating a CUDA stream", self._rt.cudaStreamCreate)

    def stream_handle(self, stream) -> int:
        return int(stream)

    def destroy_stream(self, stream) -> None:
        self._call("destroying the CUDA stream", self._rt.cudaStreamDestroy, stream)

    def copy_to_device(self, dst: int, src: np.ndarray, stream) -> None:
        self._call(
            "copying to the GPU",
            self._rt.cudaMemcpyAsync,
            dst,
            src.ctypes.data,
            src.nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            stream,
        )

    def copy_to_host(self, dst: np.ndarray, src: int, stream) -> None:
        self._call(
            "copying from the GPU",
            self._rt.cudaMemcpyAsync,
            dst.ctypes.data,
            src,
            dst.nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            stream,
        )

    def synchronize(self, stream) -> None:
        self._call("running on the GPU (stream synchronize)", self._rt.cudaStreamSynchronize, stream)
