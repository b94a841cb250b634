"""The TensorRT backend's beam search with the bookkeeping in the engine
(``TensorRTBackend(search="graph")``; ``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``).

One beam-step engine per beam size (``EngineCache.load_beam``), built from the step graph with the
bookkeeping and the tag bonus appended in FP32, and another with the fused caption language models
stepped in it too, for batches the options and the fusion gate give them. It reads the encoder's
outputs and the step's input buffers where the backend keeps them, and writes h / c, already
reordered by the back-pointers, into the backend's ping-pong state buffers (the rows still steered
and the language models' states into two sets of its own, used in turn). Per word: ``tokens``,
``scores`` (R values) go up, and ``blocked_words`` (R x 200 int32 ids) only when the n-gram rule
blocks a word (``word_bias`` stays zeros: the rules' bias is made in the engine); the ten (R,)
results come back in one synchronisation. The context keeps its tensors' shapes and addresses
between runs: a word sets only those that change (h / c and the carried states, whose two
buffers alternate), not some twenty-five. A search's rules (``GraphRules``: the tag rows, the
language models' row weights, the carried states' first values) go up at its first step. Its own
buffers (scores, blocked_words, the results, the rules', their pinned host copies) are allocated
once, for the engine's largest shapes, and freed by ``close``.

Not yet run on real TensorRT: tested with fakes of the calls used (tests/test_graph_search.py,
with tests/test_tensorrt_fake.py's fake TensorRT, whose engines run the ONNX on onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgecap.backends.tensorrt import execution_context
from edgecap.build.beam_step import INT32_OUTPUTS, LM_STATES, MAX_BLOCKED, beam_io, lm_state_widths
from edgecap.decoding.graph_search import BeamStepResult, GraphRules, graph_rules, search_with_rules
from edgecap.errors import BackendError

if TYPE_CHECKING:
    import tensorrt

    from edgecap.backends.tensorrt import DeviceBuffers, TensorRTBackend


def results(lms: bool) -> tuple[str, ...]:
    """The outputs copied back each word: all but the states, which stay on the device."""
    states = {"h_next", "c_next", "steered_next", *(f"{name}_next" for name in LM_STATES)}
    return tuple(name for name in beam_io(lms)[1] if name not in states)


RESULTS = results(False)


class BeamEngine:
    """One beam-step engine, its execution context and the buffers only it uses: the rules'
    fixed inputs (``GraphRules.fixed``: the tag rows; with the language models ``lms`` in the
    engine, their row weights), uploaded at a search's first step, and two sets of
    the rules' carried states (``GraphRules.carried``: the rows still steered; the language
    models' states) used in turn (a step reads one set and writes the other)."""

    def __init__(self, backend: TensorRTBackend, engine: tensorrt.ICudaEngine, lms=None):
        self._device = backend._device
        # the engine is kept, not left to the context's hold on it: ``close`` releases the
        # context, then the engine, before the backend releases the device (as TensorRTBackend
        # does with its own contexts and engines)
        self.engine: tensorrt.ICudaEngine | None = engine
        self.context: tensorrt.IExecutionContext | None = execution_context(engine, "the beam-step engine")
        rows = backend.limits.max_rows
        vocab = backend.manifest.dims.vocab_size
        self.results = results(lms is not None)
        self._pointers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self.ptr: dict[str, int] = {}
        # the rules' inputs: name -> shape; the carried ones' first values go up from here too
        self.fixed: dict[str, tuple[int, ...]] = {"tag_bias": (rows, vocab)}
        self.carried: dict[str, tuple[int, ...]] = {"steered": (rows,)}
        if lms is not None:
            self.fixed["lm_weights"] = (rows, 1)
            self.carried.update({name: (rows, width) for name, width in lm_state_widths(lms).items()})
        self.sets: list[dict[str, int]] = []  # two sets of the carried states: name -> address
        shapes = {
            "scores": ((rows,), np.float32),
            "blocked_words": ((rows, MAX_BLOCKED), np.int32),
            **{name: ((rows,), np.int32 if name in INT32_OUTPUTS else np.float32) for name in self.results},
            **{name: (shape, np.float32) for name, shape in self.fixed.items()},
        }
        try:
            for name, (shape, dtype) in shapes.items():
                self._host[name] = self._device.host_array(shape, dtype)
                self.ptr[name] = self._device.alloc(self._host[name].nbytes)
                self._pointers.append(self.ptr[name])
            for name, shape in self.carried.items():  # the first values' way up; on the device, the sets
                self._host[name] = self._device.host_array(shape, np.float32)
            for _ in range(2):
                self.sets.append({})
                for name in self.carried:
                    self.sets[-1][name] = self._device.alloc(self._host[name].nbytes)
                    self._pointers.append(self.sets[-1][name])
        except BaseException:
            self.close()
            raise
        self.rows_none_blocked = 0  # blocked_words rows known to hold -1 (none) on the device
        # what the context holds (it keeps both between runs): set again only when they change,
        # so that a word sets the few addresses that alternate, not every tensor's
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def live_context(self) -> tensorrt.IExecutionContext:
        if self.context is None:
            raise BackendError("the beam-step engine is closed")
        return self.context

    def bind(self, name: str, ptr: int) -> None:
        if self._addresses.get(name) == ptr:
            return
        self._addresses.pop(name, None)  # (unknown if refused)
        if not self.live_context().set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the address of tensor {name!r}")
        self._addresses[name] = ptr

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) == shape:
            return
        self._shapes.pop(name, None)
        if not self.live_context().set_input_shape(name, shape):
            raise BackendError(f"TensorRT refused shape {shape} for beam-step input {name!r}")
        self._shapes[name] = shape

    def upload(self, name: str, values: np.ndarray, stream) -> None:
        self.upload_to(self.ptr[name], name, values, stream)

    def upload_to(self, ptr: int, name: str, values: np.ndarray, stream) -> None:
        """``values`` up to ``ptr`` through ``name``'s pinned host buffer."""
        host = self._host[name][: len(values)]
        host[...] = values
        self._device.copy_to_device(ptr, host, stream)

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
        self.rules: GraphRules | None = None  # the search's (TensorRTGraphSearch sets them)
        self._set = 0  # the set of the engine's carried states this step reads

    def step(self, tokens, source_rows, scores, word_bias, blocked_words) -> BeamStepResult:
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
        if blocked_words is not None:
            engine.rows_none_blocked = 0  # before the upload, which may fail half-way
            engine.upload("blocked_words", np.asarray(blocked_words, np.int32), stream)
        elif engine.rows_none_blocked < r:
            engine.upload("blocked_words", np.full((r, MAX_BLOCKED), -1, np.int32), stream)
            engine.rows_none_blocked = r
        for name, shape in (
            ("tokens", (r,)),
            ("source_rows", (r,)),
            ("image_index", (r,)),
            ("scores", (r,)),
            ("word_bias", (r, *vocab)),
            ("blocked_words", (r, MAX_BLOCKED)),
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
        for name in ("scores", "blocked_words", *engine.results):
            engine.bind(name, engine.ptr[name])
        device = self._backend._device
        if self._current is None:  # a search's first step: its rules' inputs and first states
            rules = self.rules
            if (
                rules is None
                or set(rules.fixed) != set(engine.fixed)
                or set(rules.carried) != set(engine.carried)
            ):
                raise BackendError("the beam-step engine was given other rules than it was built for")
            for name, value in rules.fixed.items():
                engine.upload(name, np.asarray(value, np.float32), stream)
            self._set = 0
            for name, value in rules.carried.items():
                engine.upload_to(engine.sets[0][name], name, np.asarray(value, np.float32), stream)
        read, write = engine.sets[self._set], engine.sets[1 - self._set]
        for name, shape in {**engine.fixed, **engine.carried}.items():
            engine.set_shape(name, (r, *shape[1:]))
        for name in engine.fixed:
            engine.bind(name, engine.ptr[name])
        for name in engine.carried:
            engine.bind(name, read[name])
            engine.bind(f"{name}_next", write[name])
        if not engine.live_context().execute_async_v3(device.stream_handle(stream)):
            raise BackendError("TensorRT failed to run the beam-step engine")
        results = {name: engine.download(name, r, stream) for name in engine.results}
        buffers.synchronize()
        self._current = dst
        self._set = 1 - self._set
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
            self._engines[key] = BeamEngine(backend, loaded, lms)
        return self._engines[key]

    def __call__(self, encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        dims = backend.manifest.dims
        options.validate(dims.top_k)
        beam = options.beam_size
        image_index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
        # the tag bonus in the engine, and the language models whenever the options and the
        # fusion gate give a photo of the batch them
        rules = graph_rules(options, dims.vocab_size, tag_words, fusion, image_index, encoded.class_probs)
        engine = self.engine(beam, end_id, rules.lms)
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
        session.rules = rules
        return search_with_rules(
            session,
            encoded.n_images,
            options,
            dims,
            start_id,
            end_id,
            rules,
            encoded.class_probs,
            backend.describe,
        )

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
