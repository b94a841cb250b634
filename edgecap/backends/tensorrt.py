"""The TensorRT backend: FP16 engines, device-resident image tensors and decoder state.

Per batch: the images are copied to the GPU once and encoded; ``features`` / ``att_proj`` stay
where the encoder wrote them and the step engine reads them there. Per step: ``tokens`` and
``source_rows`` go up, the step reads ``h``/``c`` from one pair of state buffers and writes
``h_out``/``c_out`` to the other (ping-pong; the first step reads the encoder's ``h0``/``c0``),
only ``topk_logprobs`` / ``topk_ids`` (and ``alpha`` when asked for) come back, and the stream is
synchronised once. Every buffer is allocated once, for the largest shapes the engines accept, and
freed by ``close()`` (or leaving a ``with`` block).

One backend owns one set of device buffers, so it decodes one batch at a time: ``encode`` then
``start`` then ``step``... A newer ``encode`` or ``start`` makes older ``Encoded`` objects and
sessions stale (using them raises ``BackendError``): a session checks both that no later
``start`` took over the step buffers and that no later ``encode`` overwrote its image tensors.
The class sets ``thread_safe = False``; the ``Captioner`` serialises calls to it with a lock.
Code driving the backend directly from several threads must do the same, or use one backend
per thread.

Not yet run on real TensorRT: tested with fakes of the calls used (tests/test_tensorrt_fake.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecap.backends._checks import check_threads
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.contract import ENCODER_INPUTS, ENCODER_OUTPUTS, ROLES, Limits, tensor_dtype
from edgecap.errors import BackendError
from edgecap.manifest import Manifest

if TYPE_CHECKING:  # the TensorRT API's types (tensorrt-stubs); never imported at run time
    import tensorrt

    from edgecap.backends.tensorrt_beam import TensorRTGraphSearch
    from edgecap.trt import TensorRTModule


@dataclass
class _DeviceTensor:
    name: str
    ptr: int
    dtype: np.dtype
    tail: tuple[int, ...]  # the shape after the row dimension
    max_rows: int

    def nbytes(self, rows: int) -> int:
        return rows * int(np.prod(self.tail, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class _EncodedOnDevice:
    generation: int
    n_images: int


class DeviceBuffers:
    """Everything a batch writes on the device, for one backend: every tensor (allocated once,
    for the largest shapes the engines accept), its pinned host staging, the ping-pong decoder
    state, the execution contexts' addresses and input shapes, and the stream. The backend's
    encode and its sessions' steps use it only through these methods; ``close`` frees it all."""

    def __init__(self, device, contexts: dict[str, tensorrt.IExecutionContext], tensor_info, limits: Limits):
        """``tensor_info(role, name)`` -> (dtype, inner shape) of an engine tensor."""
        self._device = device
        self._contexts = contexts
        self._limits = limits
        self._pointers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.stream = None
        self._closed = False
        try:
            self.stream = device.create_stream()
            self._allocate(tensor_info, limits)
        except BaseException:
            self.close()
            raise

    def _new(self, tensor_info, role: str, name: str, rows: int) -> _DeviceTensor:
        dtype, tail = tensor_info(role, name)
        tensor = _DeviceTensor(name, 0, dtype, tail, rows)
        tensor.ptr = self._device.alloc(tensor.nbytes(rows))
        self._pointers.append(tensor.ptr)
        return tensor

    def _allocate(self, tensor_info, limits: Limits) -> None:
        n, r = limits.max_batch, limits.max_rows
        t: dict[str, _DeviceTensor] = {}
        for name in ENCODER_INPUTS + ENCODER_OUTPUTS:  # image, features, ..., class_probs
            t[name] = self._new(tensor_info, "encoder", name, n)
        for name in (
            "tokens",
            "source_rows",
            "image_index",
            "word_bias",
            "topk_logprobs",
            "topk_ids",
            "alpha",
        ):
            t[name] = self._new(tensor_info, "decoder_step", name, r)
        # ping-pong decoder state: a step reads one pair and writes the other
        self._state = [
            (
                self._new(tensor_info, "decoder_step", "h_out", r),
                self._new(tensor_info, "decoder_step", "c_out", r),
            )
            for _ in range(2)
        ]
        self._tensors = t
        # pinned host staging for what crosses the bus
        for name in (
            "image",
            "class_probs",
            "tokens",
            "source_rows",
            "image_index",
            "word_bias",
            "topk_logprobs",
            "topk_ids",
            "alpha",
        ):
            self._host[name] = self._device.host_array((t[name].max_rows, *t[name].tail), t[name].dtype)
        # fixed addresses: the step reads the encoder's outputs in place
        for name in ENCODER_INPUTS + ENCODER_OUTPUTS:
            self.bind("encoder", name, t[name])
        for name in (
            "tokens",
            "source_rows",
            "image_index",
            "word_bias",
            "features",
            "att_proj",
            "topk_logprobs",
            "topk_ids",
            "alpha",
        ):
            self.bind("decoder_step", name, t[name])
        self._bias_rows_zero = 0  # word_bias rows known to hold zeros on the device

    def tensor(self, name: str) -> _DeviceTensor:
        return self._tensors[name]

    def state(self, pair: int) -> tuple[_DeviceTensor, _DeviceTensor]:
        """Ping-pong pair ``pair`` (0 or 1) of the decoder state: (h, c)."""
        return self._state[pair]

    def bind(self, role: str, name: str, tensor: _DeviceTensor) -> None:
        if not self._contexts[role].set_tensor_address(name, tensor.ptr):
            raise BackendError(f"TensorRT refused the address of tensor {name!r}")

    def set_shape(self, role: str, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get((role, name)) == shape:
            return
        if not self._contexts[role].set_input_shape(name, shape):
            raise BackendError(
                f"TensorRT refused shape {shape} for {role} input {name!r} "
                f"(engine limits: {self._limits}); rebuild with larger "
                "--max-batch / --max-beam"
            )
        self._shapes[(role, name)] = shape

    def execute(self, role: str) -> None:
        if not self._contexts[role].execute_async_v3(self._device.stream_handle(self.stream)):
            raise BackendError(f"TensorRT failed to run the {role} engine")

    def upload(self, name: str, values: np.ndarray) -> None:
        host = self._host[name][: len(values)]
        host[...] = values
        self._device.copy_to_device(self._tensors[name].ptr, host, self.stream)

    def upload_bias(self, word_bias: np.ndarray | None, rows: int) -> None:
        """This step's word bias (checked by ``DecoderSession.step``); with none, zeros, uploaded
        only when the device rows may hold an earlier bias (no copy per step while nothing
        steers the search)."""
        tail = self._tensors["word_bias"].tail
        if word_bias is None:
            if self._bias_rows_zero >= rows:
                return
            self.upload("word_bias", np.zeros((rows, *tail), np.float32))
            self._bias_rows_zero = rows
            return
        if word_bias.shape != (rows, *tail):
            raise BackendError(f"word_bias must have shape ({rows}, {tail[0]}), got {word_bias.shape}")
        self.upload("word_bias", word_bias)
        self._bias_rows_zero = 0

    def download(self, name: str, rows: int) -> np.ndarray:
        """Queue the copy of ``rows`` rows of ``name`` to its pinned host buffer; -> that buffer
        (valid after ``synchronize``)."""
        host = self._host[name][:rows]
        self._device.copy_to_host(host, self._tensors[name].ptr, self.stream)
        return host

    def synchronize(self) -> None:
        self._device.synchronize(self.stream)

    def close(self) -> None:
        """Free every device and pinned buffer and the stream; idempotent."""
        if self._closed:
            return
        self._closed = True
        device = self._device
        if self.stream is not None:
            device.synchronize(self.stream)
        for array in self._host.values():
            device.free_host(array)
        self._host.clear()
        for ptr in self._pointers:
            device.free(ptr)
        self._pointers.clear()
        if self.stream is not None:
            device.destroy_stream(self.stream)
            self.stream = None


def execution_context(engine: tensorrt.ICudaEngine, what: str) -> tensorrt.IExecutionContext:
    """``engine``'s execution context; TensorRT returns None when it cannot make one (its
    activation memory did not fit on the GPU)."""
    context = engine.create_execution_context()
    if context is None:
        raise BackendError(
            f"TensorRT could not create an execution context for {what} (out of GPU memory?); "
            "free GPU memory, or build smaller engines (edgecap build --max-batch N)"
        )
    return context


class TensorRTBackend(Backend):
    name = "tensorrt"
    # One set of device buffers and execution contexts: concurrent encode/start/step calls
    # would overwrite each other's tensors. The Captioner serialises calls to such a backend.
    thread_safe = False

    def __init__(
        self,
        manifest: Manifest,
        precision: str = "fp16",
        limits: Limits | None = None,
        cache_dir: str | Path | None = None,
        *,
        device: str | None = None,
        cuda_device=None,
        log=sys.stderr,
        threads: int | None = None,
        search: str = "host",
        fp32_encoder: bool | None = None,
    ):
        """``limits``: the largest batch and beam the engines take (default 8 x 5);
        ``device``: None or "cuda" (TensorRT runs on the GPU only); ``cuda_device``: an opened
        ``edgecap.trt.cuda`` device (default: GPU 0). ``threads`` is checked like the other
        backends' and has nothing to set: the engines run on the GPU, and the CPU side (the
        beam search) is one Python thread. ``search``: "host" (the numpy loop between steps)
        or "graph" (the beam bookkeeping in a beam-step engine, ``edgecap.backends.tensorrt_beam``;
        docs/gpu-search.md). ``fp32_encoder`` (with ``precision="fp16"``): the encoder engine
        FP32 behind the FP16 decoder step, the FP16 that keeps the captions; None (the default):
        so when the model directory is FP32; False: the encoder engine FP16 too
        (``edgecap.trt.engines.role_precisions``)."""
        check_threads(threads)
        if search not in ("host", "graph"):
            raise ValueError(f"search must be one of host, graph, got {search!r}")
        from edgecap.trt import import_tensorrt
        from edgecap.trt.cuda import open_device
        from edgecap.trt.engines import EngineCache, Target, role_precisions

        if device not in (None, "cuda"):
            raise ValueError(f"the tensorrt backend runs on the GPU only; got device={device!r}")
        self.manifest = manifest
        self.precision = precision
        self.precisions = role_precisions(manifest, precision, fp32_encoder)  # each engine's
        self.limits = limits or Limits()
        trt = import_tensorrt()
        self._trt: TensorRTModule = trt
        self._owns_device = cuda_device is None
        self._device = cuda_device or open_device()
        self.buffers: DeviceBuffers | None = None
        self._graph_search: TensorRTGraphSearch | None = None
        self._closed = False
        try:
            target = Target(self._device.name, tuple(self._device.compute_capability), trt.__version__)
            self._cache = EngineCache(trt, target, cache_dir, log)
            with self._device.active():
                self._engines: dict[str, tensorrt.ICudaEngine] = {
                    role: self._cache.load(manifest, role, self.precisions[role], self.limits)
                    for role in ROLES
                }
                self._contexts: dict[str, tensorrt.IExecutionContext] = {
                    role: execution_context(engine, f"the {role} engine")
                    for role, engine in self._engines.items()
                }
                self.buffers = DeviceBuffers(self._device, self._contexts, self._tensor_info, self.limits)
        except BaseException:
            self.close()
            raise
        self.top_k = self.buffers.tensor("topk_ids").tail[0]
        if search == "graph":
            from edgecap.backends.tensorrt_beam import TensorRTGraphSearch

            self._graph_search = TensorRTGraphSearch(self)
        self._generation = 0  # bumped by encode: older Encoded objects are stale
        self._session_id = 0  # bumped by start: older sessions are stale

    def _tensor_info(self, role: str, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        engine = self._engines[role]
        dtype = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
        expected = tensor_dtype(name)
        if dtype != expected:
            raise BackendError(
                f"{role} engine tensor {name!r} is {dtype}, the contract says "
                f"{expected}; rebuild the engines from an edgecap model"
            )
        # Inner dimensions come from the manifest; the engine reports -1 for those its ONNX
        # left symbolic (e.g. the regions axis of the encoder's outputs) and must agree on the rest.
        expected_tail = self.manifest.dims.tails(self.manifest.preprocessing.size)[name]
        found = tuple(int(d) for d in engine.get_tensor_shape(name)[1:])
        if len(found) != len(expected_tail) or any(f >= 0 and f != e for f, e in zip(found, expected_tail)):
            raise BackendError(
                f"{role} engine tensor {name!r} has inner shape {found}; the "
                f"manifest says {expected_tail}. Rebuild the engines "
                "(edgecap build) or re-export the model"
            )
        return dtype, expected_tail

    def _open_buffers(self) -> DeviceBuffers:
        if self._closed or self.buffers is None:
            raise BackendError("this TensorRT backend was closed")
        return self.buffers

    def check_session(self, session_id: int, generation: int) -> DeviceBuffers:
        """The buffers, for the session ``session_id`` of the encode ``generation``; raises
        ``BackendError`` when a later start() or encode() took them over, or after close()."""
        buffers = self._open_buffers()
        if session_id != self._session_id:
            raise BackendError(
                "a later start() on this TensorRT backend took over its buffers; "
                "decode one batch at a time per backend"
            )
        if generation != self._generation:
            raise BackendError(
                "this session's encoded images were overwritten by a later "
                "encode() on the same TensorRT backend; encode, start and step "
                "one batch at a time per backend"
            )
        return buffers

    # -- Backend -------------------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> Encoded:
        buffers = self._open_buffers()
        images = np.asarray(images, dtype=np.float32)
        tail = buffers.tensor("image").tail
        if images.ndim != 4 or images.shape[1:] != tail:
            raise BackendError(f"images must be float32 (N, {', '.join(map(str, tail))}); got {images.shape}")
        n = images.shape[0]
        if not 1 <= n <= self.limits.max_batch:
            raise BackendError(
                f"{n} images in one batch; these engines take 1 to "
                f"{self.limits.max_batch} (edgecap build --max-batch N)"
            )
        with self._device.active():
            buffers.upload("image", images)
            buffers.set_shape("encoder", "image", images.shape)
            buffers.execute("encoder")
            probs = buffers.download("class_probs", n)
            # the pinned image buffer is reused by the next call: wait for the copy to finish
            buffers.synchronize()
        self._generation += 1
        return Encoded(n_images=n, tensors=_EncodedOnDevice(self._generation, n), class_probs=probs.copy())

    def start(
        self, encoded: Encoded, image_index: np.ndarray, return_attention: bool = False
    ) -> DecoderSession:
        buffers = self._open_buffers()
        handle = encoded.tensors
        if not isinstance(handle, _EncodedOnDevice) or handle.generation != self._generation:
            raise BackendError(
                "this batch's encoded images were overwritten by a later encode() "
                "on the same TensorRT backend; encode, start and step one batch "
                "at a time (or use one backend per thread)"
            )
        image_index = np.asarray(image_index)
        rows = len(image_index)
        if image_index.ndim != 1 or not 1 <= rows <= self.limits.max_rows:
            raise BackendError(
                f"{rows} rows; these engines take 1 to {self.limits.max_rows} "
                "(edgecap build --max-batch N --max-beam K)"
            )
        if image_index.min() < 0 or image_index.max() >= handle.n_images:
            raise BackendError(f"image_index must lie in [0, {handle.n_images})")
        with self._device.active():
            buffers.upload("image_index", image_index.astype(np.int32))
        self._session_id += 1
        return TensorRTSession(
            self,
            self._session_id,
            handle.generation,
            handle.n_images,
            image_index.astype(np.int32),
            return_attention,
        )

    def search_on_device(self, encoded: Encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """The hook of ``edgecap.decoding.search_with_tags``: each image's hypotheses from the
        beam-step engine (``search="graph"``), or None: the numpy loop searches."""
        if self._graph_search is None:
            return None
        self._open_buffers()
        with self._device.active():
            return self._graph_search(encoded, options, start_id, end_id, tag_words, fusion)

    def describe(self) -> str:
        from edgecap.trt.engines import precision_label

        d = self._device
        return (
            f"tensorrt {self._trt.__version__} {precision_label(self.precisions)} on {d.name} "
            f"(sm{d.compute_capability[0]}{d.compute_capability[1]}), engines in "
            f"{self._cache.cache_dir}"
            + ("; beam bookkeeping in the engine" if getattr(self, "_graph_search", None) else "")
        )

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Free every device and pinned buffer and the stream; idempotent."""
        if self._closed:
            return
        self._closed = True
        device = self._device
        try:
            with device.active():
                try:
                    if self._graph_search is not None:
                        if self.buffers is not None:
                            # a beam step that failed after its launch may still use the
                            # beam-step engine's buffers on the stream: done before they go
                            self.buffers.synchronize()
                        self._graph_search.close()
                    if self.buffers is not None:
                        self.buffers.close()
                finally:
                    self._release_tensorrt()
        finally:
            self._release_tensorrt()  # also when the context could not be made current
            if self._owns_device:
                device.close()

    def _release_tensorrt(self) -> None:
        """Drop the execution contexts, then the engines (before the device; idempotent). The
        dicts are emptied, not only unnamed: the device buffers hold the contexts' dict."""
        for name in ("_contexts", "_engines"):
            held = self.__dict__.pop(name, None)
            if held is not None:
                held.clear()

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorRTSession(DecoderSession):
    """One batch's decoding on the device: the state stays in the backend's ping-pong buffers,
    which it reaches through ``DeviceBuffers``' methods only."""

    def __init__(
        self,
        backend: TensorRTBackend,
        session_id: int,
        generation: int,
        n_images: int,
        image_index: np.ndarray,
        return_attention: bool,
    ):
        self._backend = backend
        self._id = session_id
        self._generation = generation  # the encode() whose features / att_proj / h0 it reads
        self._n_images = n_images
        self._rows = len(image_index)
        self._return_attention = return_attention
        self._current: int | None = None  # which ping-pong pair holds the state; None: h0/c0

    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        buffers = self._backend.check_session(self._id, self._generation)
        with self._backend._device.active():
            return self._run_step(buffers, tokens, source_rows, word_bias)

    def _run_step(
        self,
        buffers: DeviceBuffers,
        tokens: np.ndarray,
        source_rows: np.ndarray,
        word_bias: np.ndarray | None,
    ) -> StepResult:
        tokens, source_rows = np.asarray(tokens), np.asarray(source_rows)
        r = self._rows
        if tokens.shape != (r,) or source_rows.shape != (r,):
            raise BackendError(
                f"tokens and source_rows must have shape ({r},), got {tokens.shape} and {source_rows.shape}"
            )
        if self._current is None:
            h_src, c_src = buffers.tensor("h0"), buffers.tensor("c0")
            s, dst = self._n_images, 0
        else:
            (h_src, c_src), s = buffers.state(self._current), r
            dst = 1 - self._current
        if source_rows.min() < 0 or source_rows.max() >= s:
            raise BackendError(f"source_rows must lie in [0, {s}) at this step")
        h_dst, c_dst = buffers.state(dst)

        buffers.upload("tokens", tokens.astype(np.int32))
        buffers.upload("source_rows", source_rows.astype(np.int32))
        buffers.upload_bias(word_bias, r)
        hidden = h_src.tail
        for name, shape in (
            ("tokens", (r,)),
            ("source_rows", (r,)),
            ("image_index", (r,)),
            ("word_bias", (r, *buffers.tensor("word_bias").tail)),
            ("h", (s, *hidden)),
            ("c", (s, *hidden)),
            ("features", (self._n_images, *buffers.tensor("features").tail)),
            ("att_proj", (self._n_images, *buffers.tensor("att_proj").tail)),
        ):
            buffers.set_shape("decoder_step", name, shape)
        for name, tensor in (("h", h_src), ("c", c_src), ("h_out", h_dst), ("c_out", c_dst)):
            buffers.bind("decoder_step", name, tensor)
        buffers.execute("decoder_step")

        logprobs = buffers.download("topk_logprobs", r)
        ids = buffers.download("topk_ids", r)
        alpha = buffers.download("alpha", r) if self._return_attention else None
        buffers.synchronize()
        self._current = dst
        return StepResult(
            topk_logprobs=logprobs.copy(),
            topk_ids=ids.copy(),
            alpha=alpha.copy() if alpha is not None else None,
        )


__all__ = ["DeviceBuffers", "TensorRTBackend", "TensorRTSession"]
