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

from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.contract import ENCODER_INPUTS, ENCODER_OUTPUTS, ROLES, Limits, tensor_dtype
from edgecap.errors import BackendError
from edgecap.manifest import Manifest

if TYPE_CHECKING:  # the TensorRT API's types (tensorrt-stubs); never imported at run time
    import tensorrt

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


class TensorRTBackend(Backend):
    name = "tensorrt"
    # One set of device buffers and execution contexts: concurrent encode/start/step calls
    # would overwrite each other's tensors. The Captioner serialises calls to such a backend.
    thread_safe = False

    def __init__(self, manifest: Manifest, precision: str = "fp16", limits: Limits | None = None,
                 cache_dir: str | Path | None = None, *, device: str | None = None,
                 cuda_device=None, log=sys.stderr):
        """``limits``: the largest batch and beam the engines take (default 8 x 5);
        ``device``: None or "cuda" (TensorRT runs on the GPU only); ``cuda_device``: an opened
        ``edgecap.trt.cuda`` device (default: GPU 0)."""
        from edgecap.trt import import_tensorrt
        from edgecap.trt.cuda import open_device
        from edgecap.trt.engines import EngineCache, Target

        if device not in (None, "cuda"):
            raise ValueError(f"the tensorrt backend runs on the GPU only; got device={device!r}")
        self.manifest = manifest
        self.precision = precision
        self.limits = limits or Limits()
        trt = import_tensorrt()
        self._trt: TensorRTModule = trt
        self._owns_device = cuda_device is None
        self._device = cuda_device or open_device()
        self._buffers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self._stream = None
        self._closed = False
        try:
            target = Target(self._device.name, tuple(self._device.compute_capability),
                            trt.__version__)
            self._cache = EngineCache(trt, target, cache_dir, log)
            self._engines: dict[str, tensorrt.ICudaEngine] = {role: self._cache.load(manifest, role, precision, self.limits)
                             for role in ROLES}
            self._contexts: dict[str, tensorrt.IExecutionContext] = {role: engine.create_execution_context()
                              for role, engine in self._engines.items()}
            self._stream = self._device.create_stream()
            self._allocate()
        except BaseException:
            self.close()
            raise
        self.top_k = self._tensors["topk_ids"].tail[0]
        self._generation = 0   # bumped by encode: older Encoded objects are stale
        self._session_id = 0   # bumped by start: older sessions are stale
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}

    # -- buffers -------------------------------------------------------------------------------
    def _tensor_info(self, role: str, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        engine = self._engines[role]
        dtype = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
        expected = tensor_dtype(name)
        if dtype != expected:
            raise BackendError(f"{role} engine tensor {name!r} is {dtype}, the contract says "
                               f"{expected}; rebuild the engines from an edgecap model")
        # Inner dimensions come from the manifest; the engine reports -1 for those its ONNX
        # left symbolic (e.g. the regions axis of the encoder's outputs) and must agree on the rest.
        expected_tail = self.manifest.dims.tails(self.manifest.preprocessing.size)[name]
        found = tuple(int(d) for d in engine.get_tensor_shape(name)[1:])
        if len(found) != len(expected_tail) or any(
                f >= 0 and f != e for f, e in zip(found, expected_tail)):
            raise BackendError(f"{role} engine tensor {name!r} has inner shape {found}; the "
                               f"manifest says {expected_tail}. Rebuild the engines "
                               "(edgecap build) or re-export the model")
        return dtype, expected_tail

    def _new_tensor(self, role: str, name: str, rows: int) -> _DeviceTensor:
        dtype, tail = self._tensor_info(role, name)
        tensor = _DeviceTensor(name, 0, dtype, tail, rows)
        tensor.ptr = self._device.alloc(tensor.nbytes(rows))
        self._buffers.append(tensor.ptr)
        return tensor

    def _allocate(self) -> None:
        n, r = self.limits.max_batch, self.limits.max_rows
        t: dict[str, _DeviceTensor] = {}
        for name in ENCODER_INPUTS + ENCODER_OUTPUTS:  # image, features, ..., class_probs
            t[name] = self._new_tensor("encoder", name, n)
        for name in ("tokens", "source_rows", "image_index", "word_bias"):
            t[name] = self._new_tensor("decoder_step", name, r)
        for name in ("topk_logprobs", "topk_ids", "alpha"):
            t[name] = self._new_tensor("decoder_step", name, r)
        # ping-pong decoder state: a step reads one pair and writes the other
        self._state = [(self._new_tensor("decoder_step", "h_out", r),
                        self._new_tensor("decoder_step", "c_out", r)) for _ in range(2)]
        self._tensors = t
        # pinned host staging for what crosses the bus
        for name in ("image", "class_probs", "tokens", "source_rows", "image_index", "word_bias",
                     "topk_logprobs", "topk_ids", "alpha"):
            self._host[name] = self._device.host_array((t[name].max_rows, *t[name].tail),
                                                       t[name].dtype)
        # fixed addresses: the step reads the encoder's outputs in place
        enc, step = self._contexts["encoder"], self._contexts["decoder_step"]
        for name in ENCODER_INPUTS + ENCODER_OUTPUTS:
            self._set_address(enc, name, t[name].ptr)
        for name in ("tokens", "source_rows", "image_index", "word_bias", "features",
                     "att_proj", "topk_logprobs", "topk_ids", "alpha"):
            self._set_address(step, name, t[name].ptr)
        self._bias_rows_zero = 0  # word_bias rows known to hold zeros on the device

    @staticmethod
    def _set_address(context: tensorrt.IExecutionContext, name: str, ptr: int) -> None:
        if not context.set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the address of tensor {name!r}")

    def _set_shape(self, role: str, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get((role, name)) == shape:
            return
        if not self._contexts[role].set_input_shape(name, shape):
            raise BackendError(f"TensorRT refused shape {shape} for {role} input {name!r} "
                               f"(engine limits: {self.limits}); rebuild with larger "
                               "--max-batch / --max-beam")
        self._shapes[(role, name)] = shape

    def _execute(self, role: str) -> None:
        if not self._contexts[role].execute_async_v3(self._device.stream_handle(self._stream)):
            raise BackendError(f"TensorRT failed to run the {role} engine")

    def _upload(self, name: str, values: np.ndarray) -> None:
        host = self._host[name][:len(values)]
        host[...] = values
        self._device.copy_to_device(self._tensors[name].ptr, host, self._stream)

    # -- Backend -------------------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> Encoded:
        self._check_open()
        images = np.asarray(images, dtype=np.float32)
        tail = self._tensors["image"].tail
        if images.ndim != 4 or images.shape[1:] != tail:
            raise BackendError(f"images must be float32 (N, {', '.join(map(str, tail))}); "
                               f"got {images.shape}")
        n = images.shape[0]
        if not 1 <= n <= self.limits.max_batch:
            raise BackendError(f"{n} images in one batch; these engines take 1 to "
                               f"{self.limits.max_batch} (edgecap build --max-batch N)")
        self._upload("image", images)
        self._set_shape("encoder", "image", images.shape)
        self._execute("encoder")
        probs = self._host["class_probs"][:n]
        self._device.copy_to_host(probs, self._tensors["class_probs"].ptr, self._stream)
        # the pinned image buffer is reused by the next call: wait for the copy to finish
        self._device.synchronize(self._stream)
        self._generation += 1
        return Encoded(n_images=n, tensors=_EncodedOnDevice(self._generation, n),
                       class_probs=probs.copy())

    def start(self, encoded: Encoded, image_index: np.ndarray,
              return_attention: bool = False) -> DecoderSession:
        self._check_open()
        handle = encoded.tensors
        if not isinstance(handle, _EncodedOnDevice) or handle.generation != self._generation:
            raise BackendError("this batch's encoded images were overwritten by a later encode() "
                               "on the same TensorRT backend; encode, start and step one batch "
                               "at a time (or use one backend per thread)")
        image_index = np.asarray(image_index)
        rows = len(image_index)
        if image_index.ndim != 1 or not 1 <= rows <= self.limits.max_rows:
            raise BackendError(f"{rows} rows; these engines take 1 to {self.limits.max_rows} "
                               "(edgecap build --max-batch N --max-beam K)")
        if image_index.min() < 0 or image_index.max() >= handle.n_images:
            raise BackendError(f"image_index must lie in [0, {handle.n_images})")
        self._upload("image_index", image_index.astype(np.int32))
        self._session_id += 1
        return TensorRTSession(self, self._session_id, handle.generation, handle.n_images,
                               image_index.astype(np.int32), return_attention)

    def describe(self) -> str:
        d = self._device
        return (f"tensorrt {self._trt.__version__} {self.precision} on {d.name} "
                f"(sm{d.compute_capability[0]}{d.compute_capability[1]}), engines in "
                f"{self._cache.cache_dir}")

    # -- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this TensorRT backend was closed")

    def close(self) -> None:
        """Free every device and pinned buffer and the stream; idempotent."""
        if self._closed:
            return
        self._closed = True
        device = self._device
        try:
            if self._stream is not None:
                device.synchronize(self._stream)
            for array in self._host.values():
                device.free_host(array)
            self._host.clear()
            for ptr in self._buffers:
                device.free(ptr)
            self._buffers.clear()
            if self._stream is not None:
                device.destroy_stream(self._stream)
                self._stream = None
        finally:
            # contexts before engines, engines before the runtime
            self.__dict__.pop("_contexts", None)
            self.__dict__.pop("_engines", None)
            if self._owns_device:
                device.close()

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorRTSession(DecoderSession):
    """One batch's decoding on the device: the state stays in the backend's ping-pong buffers."""

    def __init__(self, backend: TensorRTBackend, session_id: int, generation: int,
                 n_images: int, image_index: np.ndarray, return_attention: bool):
        self._backend = backend
        self._id = session_id
        self._generation = generation  # the encode() whose features / att_proj / h0 it reads
        self._n_images = n_images
        self._rows = len(image_index)
        self._return_attention = return_attention
        self._current: int | None = None  # which ping-pong pair holds the state; None: h0/c0

    def _step(self, tokens: np.ndarray, source_rows: np.ndarray,
              word_bias: np.ndarray | None) -> StepResult:
        b = self._backend
        b._check_open()
        if self._id != b._session_id:
            raise BackendError("a later start() on this TensorRT backend took over its buffers; "
                               "decode one batch at a time per backend")
        if self._generation != b._generation:
            raise BackendError("this session's encoded images were overwritten by a later "
                               "encode() on the same TensorRT backend; encode, start and step "
                               "one batch at a time per backend")
        tokens, source_rows = np.asarray(tokens), np.asarray(source_rows)
        r = self._rows
        if tokens.shape != (r,) or source_rows.shape != (r,):
            raise BackendError(f"tokens and source_rows must have shape ({r},), got "
                               f"{tokens.shape} and {source_rows.shape}")
        t = b._tensors
        if self._current is None:
            h_src, c_src, s = t["h0"], t["c0"], self._n_images
            dst = 0
        else:
            (h_src, c_src), s = b._state[self._current], r
            dst = 1 - self._current
        if source_rows.min() < 0 or source_rows.max() >= s:
            raise BackendError(f"source_rows must lie in [0, {s}) at this step")
        h_dst, c_dst = b._state[dst]

        b._upload("tokens", tokens.astype(np.int32))
        b._upload("source_rows", source_rows.astype(np.int32))
        self._upload_bias(word_bias)
        hidden = h_src.tail
        for name, shape in (("tokens", (r,)), ("source_rows", (r,)), ("image_index", (r,)),
                            ("word_bias", (r, *t["word_bias"].tail)),
                            ("h", (s, *hidden)), ("c", (s, *hidden)),
                            ("features", (self._n_images, *t["features"].tail)),
                            ("att_proj", (self._n_images, *t["att_proj"].tail))):
            b._set_shape("decoder_step", name, shape)
        context = b._contexts["decoder_step"]
        for name, tensor in (("h", h_src), ("c", c_src), ("h_out", h_dst), ("c_out", c_dst)):
            b._set_address(context, name, tensor.ptr)
        b._execute("decoder_step")

        wanted = ("topk_logprobs", "topk_ids") + (("alpha",) if self._return_attention else ())
        for name in wanted:
            b._device.copy_to_host(b._host[name][:r], t[name].ptr, b._stream)
        b._device.synchronize(b._stream)
        self._current = dst
        return StepResult(topk_logprobs=b._host["topk_logprobs"][:r].copy(),
                          topk_ids=b._host["topk_ids"][:r].copy(),
                          alpha=b._host["alpha"][:r].copy() if self._return_attention else None)


    def _upload_bias(self, word_bias: np.ndarray | None) -> None:
        """Upload this step's word bias; with none, zeros, uploaded only when the device rows
        may hold an earlier bias (no copy per step while nothing steers the search)."""
        b, r = self._backend, self._rows
        if word_bias is None:
            if b._bias_rows_zero >= r:
                return
            b._upload("word_bias", np.zeros((r, *b._tensors["word_bias"].tail), np.float32))
            b._bias_rows_zero = r
            return
        if word_bias.shape != (r, *b._tensors["word_bias"].tail):
            raise BackendError(f"word_bias must have shape ({r}, "
                               f"{b._tensors['word_bias'].tail[0]}), got {word_bias.shape}")
        b._upload("word_bias", word_bias)
        b._bias_rows_zero = 0


__all__ = ["TensorRTBackend", "TensorRTSession"]
