"""The TensorRT backend's beam search with the bookkeeping in the engine
(``TensorRTBackend(search="graph")``; ``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``).

One beam-step engine per beam size (``EngineCache.load_beam``), built from the step graph with
the bookkeeping appended in FP32, and another with the fused caption language models stepped
in it too, for batches the options and the fusion gate give them. It reads the encoder's
outputs and the step's input buffers where the backend keeps them, and writes h / c, already
reordered by the back-pointers, into the backend's ping-pong state buffers (the language
models' states into two sets of its own, used in turn). Per word: ``tokens``, ``scores`` (R
floats) go up, and ``word_bias`` / ``word_block`` (R x V) only when the rules set them (zeros
are uploaded once); the eight (R,) results (ten with the language models) come back in one
synchronisation. Its own buffers (scores, word_block, the results, their pinned host copies;
the language models' row weights and states) are allocated once, for the engine's largest
shapes, and freed by ``close``.

Not yet run on real TensorRT: tested with fakes of the calls used (tests/test_graph_search.py,
with tests/test_tensorrt_fake.py's fake TensorRT, whose engines run the ONNX on onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgecap.backends.tensorrt import execution_context
from edgecap.build.beam_step import LM_STATES, beam_io
from edgecap.decoding.graph_search import BeamStepResult, lm_row_weights, search_with_rules
from edgecap.errors import BackendError

if TYPE_CHECKING:
    import tensorrt

    from edgecap.backends.tensorrt import DeviceBuffers, TensorRTBackend

_INT32 = frozenset({"next_tokens", "back_pointers", "choices", "end_positions"})


def results(lms: bool) -> tuple[str, ...]:
    """The outputs copied back each word: all but the states, which stay on the device."""
    states = {"h_next", "c_next", *(f"{name}_next" for name in LM_STATES)}
    return tuple(name for name in beam_io(lms)[1] if name not in states)


RESULTS = results(False)


class BeamEngine:
    """One beam-step engine, its execution context and the buffers only it uses: with the
    language models in it (``lm_hidden`` > 0), their row weights and two sets of their states
    used in turn (a step reads one set and writes the other)."""

    def __init__(self, backend: TensorRTBackend, engine: tensorrt.ICudaEngine, lm_hidden: int = 0):
        self._device = backend._device
        # the engine is kept, not left to the context's hold on it: ``close`` releases the
        # context, then the engine, before the backend releases the device (as TensorRTBackend
        # does with its own contexts and engines)
        self.engine: tensorrt.ICudaEngine | None = engine
        self.context: tensorrt.IExecutionContext | None = execution_context(engine, "the beam-step engine")
        rows = backend.limits.max_rows
        vocab = backend.manifest.dims.vocab_size
        self.lm_hidden = lm_hidden
        self.results = results(lm_hidden > 0)
        self._pointers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self.ptr: dict[str, int] = {}
        self.lm_states: list[dict[str, int]] = []  # two sets: state name -> address
        shapes = {
            "scores": ((rows,), np.float32),
            "word_block": ((rows, vocab), np.float32),
            **{name: ((rows,), np.int32 if name in _INT32 else np.float32) for name in self.results},
        }
        if lm_hidden:
            # the weights go up once a search; the zeros a search's states start from, once
            shapes.update(
                {"lm_weights": ((rows, 1), np.float32), "lm_zeros": ((rows, lm_hidden), np.float32)}
            )
        try:
            for name, (shape, dtype) in shapes.items():
                self._host[name] = self._device.host_array(shape, dtype)
                self.ptr[name] = self._device.alloc(self._host[name].nbytes)
                self._pointers.append(self.ptr[name])
            if lm_hidden:
                self._host["lm_zeros"][...] = 0.0
                for _ in range(2):
                    self.lm_states.append({})
                    for name in LM_STATES:
                        self.lm_states[-1][name] = self._device.alloc(self._host["lm_zeros"].nbytes)
                        self._pointers.append(self.lm_states[-1][name])
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

    def zeros(self, rows: int) -> np.ndarray:
        """``rows`` rows of zeros of a language-model state, pinned, to copy up."""
        return self._host["lm_zeros"][:rows]

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
        self.lm_weights: np.ndarray | None = None  # (R, 1) with the language models in the engine
        self._lm_current = 0  # the set of the engine's language-model states this step reads

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
        for name in ("scores", "word_block", *engine.results):
            engine.bind(name, engine.ptr[name])
        device = self._backend._device
        if engine.lm_hidden:
            if self._current is None:  # a search's first step: its weights, its states at zero
                if self.lm_weights is None:
                    raise BackendError("the beam-step engine steps the language models: no weights given")
                engine.upload("lm_weights", np.asarray(self.lm_weights, np.float32), stream)
                self._lm_current = 0
                for ptr in engine.lm_states[0].values():
                    device.copy_to_device(ptr, engine.zeros(r), stream)
            read, write = engine.lm_states[self._lm_current], engine.lm_states[1 - self._lm_current]
            engine.set_shape("lm_weights", (r, 1))
            engine.bind("lm_weights", engine.ptr["lm_weights"])
            for name in LM_STATES:
                engine.set_shape(name, (r, engine.lm_hidden))
                engine.bind(name, read[name])
                engine.bind(f"{name}_next", write[name])
        if not engine.live_context().execute_async_v3(device.stream_handle(stream)):
            raise BackendError("TensorRT failed to run the beam-step engine")
        results = {name: engine.download(name, r, stream) for name in engine.results}
        buffers.synchronize()
        self._current = dst
        self._lm_current = 1 - self._lm_current
        return BeamStepResult(**{name: value.copy() for name, value in results.items()})


class TensorRTGraphSearch:
    """The graph search of one TensorRT backend: one beam-step engine per beam size."""

    def __init__(self, backend: TensorRTBackend):
        self.backend = backend
        self._engines: dict[tuple, BeamEngine] = {}

    def engine(self, beam: int, end_id: int, lms=None) -> BeamEngine:
        """The beam-step engine for ``beam``; ``lms``: the language models (everyday,
        in-domain) it steps too, or None."""
        key = (beam, end_id, lms)
        if key not in self._engines:
            backend = self.backend
            loaded = backend._cache.load_beam(
                backend.manifest, beam, end_id, backend.precision, backend.limits, lms
            )
            self._engines[key] = BeamEngine(backend, loaded, 0 if lms is None else lms[0].hidden)
        return self._engines[key]

    def __call__(self, encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        dims = backend.manifest.dims
        options.validate(dims.top_k)
        beam = options.beam_size
        image_index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
        # the language models step in the engine whenever the options fuse them for a photo
        weights = lm_row_weights(options, fusion, image_index, encoded.class_probs)
        lms = None if weights is None else (fusion.everyday, fusion.in_domain)
        engine = self.engine(beam, end_id, lms)
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
        session.lm_weights = weights
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
            lms_in_graph=lms is not None,
        )

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
