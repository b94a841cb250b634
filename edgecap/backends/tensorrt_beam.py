"""The TensorRT backend's beam search with the bookkeeping in the engine
(``TensorRTBackend(search="graph")``; ``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``).

One beam-step engine per beam size (``EngineCache.load_beam``), built from the step graph with
the bookkeeping appended in FP32. It reads the encoder's outputs and the step's input buffers
where the backend keeps them, and writes h / c, already reordered by the back-pointers, into the
backend's ping-pong state buffers. Per word: ``tokens``, ``scores`` (R floats) go up, and
``word_bias`` / ``word_block`` (R x V) only when the rules set them (zeros are uploaded once);
the eight (R,) results come back in one synchronisation. Its own buffers (scores, word_block,
the results, their pinned host copies) are allocated once, for the engine's largest shapes,
and freed by ``close``.

Not yet run on real TensorRT: tested with fakes of the calls used (tests/test_graph_search.py,
with tests/test_tensorrt_fake.py's fake TensorRT, whose engines run the ONNX on onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgecap.backends.tensorrt import execution_context
from edgecap.build.beam_step import BEAM_OUTPUTS
from edgecap.decoding.graph_search import BeamStepResult, search_with_rules
from edgecap.errors import BackendError

if TYPE_CHECKING:
    import tensorrt

    from edgecap.backends.tensorrt import DeviceBuffers, TensorRTBackend

RESULTS = tuple(name for name in BEAM_OUTPUTS if name not in ("h_next", "c_next"))
_INT32 = frozenset({"next_tokens", "back_pointers", "choices", "end_positions"})


class BeamEngine:
    """One beam-step engine, its execution context and the buffers only it uses."""

    def __init__(self, backend: TensorRTBackend, engine: tensorrt.ICudaEngine):
        self._device = backend._device
        # the engine is kept, not left to the context's hold on it: ``close`` releases the
        # context, then the engine, before the backend releases the device (as TensorRTBackend
        # does with its own contexts and engines)
        self.engine: tensorrt.ICudaEngine | None = engine
        self.context: tensorrt.IExecutionContext | None = execution_context(engine, "the beam-step engine")
        rows = backend.limits.max_rows
        vocab = backend.manifest.dims.vocab_size
        self._pointers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self.ptr: dict[str, int] = {}
        shapes = {
            "scores": ((rows,), np.float32),
            "word_block": ((rows, vocab), np.float32),
            **{name: ((rows,), np.int32 if name in _INT32 else np.float32) for name in RESULTS},
        }
        try:
            for name, (shape, dtype) in shapes.items():
                self._host[name] = self._device.host_array(shape, dtype)
                self.ptr[name] = self._device.alloc(self._host[name].nbytes)
                self._pointers.append(self.ptr[name])
        except BaseException:
            self.close()
            raise
        self.block_rows_zero = 0  # word_block rows known to hold zeros on the device
        self._shapes: dict[str, tuple[int, ...]] = {}

    def live_context(self) -> tensorrt.IExecutionContext:
        if self.context is None:
            raise BackendError("the beam-step engine is closed")
        return self.context

    def bind(self, name: str, ptr: int) -> None:
        if not self.live_context().set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the address of tensor {name!r}")

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) == shape:
            return
        if not self.live_context().set_input_shape(name, shape):
            raise BackendError(f"TensorRT refused shape {shape} for beam-step input {name!r}")
        self._shapes[name] = shape

    def upload(self, name: str, values: np.ndarray, stream) -> None:
        host = self._host[name][: len(values)]
        host[...] = values
        self._device.copy_to_device(self.ptr[name], host, stream)

    def download(self, name: str, rows: int, stream) -> np.ndarray:
        host = self._host[name][:rows]
        self._device.copy_to_host(host, self.ptr[name], stream)
        return host

    def close(self) -> None:
        """Free the buffers, then release the context and then the engine; idempotent."""
        try:
            for array in self._host.values():
                self._device.free_host(array)
            self._host.clear()
            for ptr in self._pointers:
                self._device.free(ptr)
            self._pointers.clear()
        finally:
            self.context = None  # contexts before engines
            self.engine = None


class TensorRTBeamSession:
    """``BeamStepSession`` on a beam-step engine: the state in the backend's ping-pong
    buffers, only (R,) results copied back."""

    def __init__(
        self,
        backend: TensorRTBackend,
        engine: BeamEngine,
        session_id: int,
        generation: int,
        n_images: int,
        rows: int,
    ):
        self._backend, self._engine = backend, engine
        self._id, self._generation = session_id, generation
        self._n_images, self._rows = n_images, rows
        self._current: int | None = None  # the ping-pong pair holding h / c; None: h0 / c0

    def step(self, tokens, source_rows, scores, word_bias, word_block) -> BeamStepResult:
        buffers: DeviceBuffers = self._backend.check_session(self._id, self._generation)
        engine, r, stream = self._engine, self._rows, buffers.stream
        if self._current is None:
            (h_src, c_src), s, dst = (buffers.tensor("h0"), buffers.tensor("c0")), self._n_images, 0
        else:
            (h_src, c_src), s, dst = buffers.state(self._current), r, 1 - self._current
        h_dst, c_dst = buffers.state(dst)
        buffers.upload("tokens", np.asarray(tokens, np.int32))
        buffers.upload("source_rows", np.asarray(source_rows, np.int32))
        buffers.upload_bias(word_bias, r)
        engine.upload("scores", np.asarray(scores, np.float32), stream)
        vocab = buffers.tensor("word_bias").tail
        if word_block is not None:
            engine.upload("word_block", word_block, stream)
            engine.block_rows_zero = 0
        elif engine.block_rows_zero < r:
            engine.upload("word_block", np.zeros((r, *vocab), np.float32), stream)
            engine.block_rows_zero = r
        for name, shape in (
            ("tokens", (r,)),
            ("source_rows", (r,)),
            ("image_index", (r,)),
            ("scores", (r,)),
            ("word_bias", (r, *vocab)),
            ("word_block", (r, *vocab)),
            ("h", (s, *h_src.tail)),
            ("c", (s, *c_src.tail)),
            ("features", (self._n_images, *buffers.tensor("features").tail)),
            ("att_proj", (self._n_images, *buffers.tensor("att_proj").tail)),
        ):
            engine.set_shape(name, shape)
        for name in ("tokens", "source_rows", "image_index", "word_bias", "features", "att_proj"):
            engine.bind(name, buffers.tensor(name).ptr)
        for name, tensor in (("h", h_src), ("c", c_src), ("h_next", h_dst), ("c_next", c_dst)):
            engine.bind(name, tensor.ptr)
        for name in ("scores", "word_block", *RESULTS):
            engine.bind(name, engine.ptr[name])
        device = self._backend._device
        if not engine.live_context().execute_async_v3(device.stream_handle(stream)):
            raise BackendError("TensorRT failed to run the beam-step engine")
        results = {name: engine.download(name, r, stream) for name in RESULTS}
        buffers.synchronize()
        self._current = dst
        return BeamStepResult(**{name: value.copy() for name, value in results.items()})


class TensorRTGraphSearch:
    """The graph search of one TensorRT backend: one beam-step engine per beam size."""

    def __init__(self, backend: TensorRTBackend):
        self.backend = backend
        self._engines: dict[tuple[int, int], BeamEngine] = {}

    def engine(self, beam: int, end_id: int) -> BeamEngine:
        key = (beam, end_id)
        if key not in self._engines:
            backend = self.backend
            loaded = backend._cache.load_beam(
                backend.manifest, beam, end_id, backend.precision, backend.limits
            )
            self._engines[key] = BeamEngine(backend, loaded)
        return self._engines[key]

    def __call__(self, encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        dims = backend.manifest.dims
        options.validate(dims.top_k)
        beam = options.beam_size
        image_index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
        engine = self.engine(beam, end_id)
        # start() checks the batch, uploads the image index and takes the buffers over (any
        # older session is stale from here)
        backend.start(encoded, image_index)
        session = TensorRTBeamSession(
            backend,
            engine,
            backend._session_id,
            encoded.tensors.generation,
            encoded.n_images,
            len(image_index),
        )
        return search_with_rules(
            session,
            encoded.n_images,
            options,
            dims,
            start_id,
            end_id,
            tag_words,
            fusion,
            encoded.class_probs,
            backend.describe,
        )

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
