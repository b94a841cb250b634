"""The onnxruntime backend's beam search with the bookkeeping in the graph
(``OnnxRuntimeBackend(search="graph")``; ``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``).

The beam-step graph is derived from the model's ``decoder_step.onnx`` once per beam size (and
once more with the fused caption language models stepped in it), in memory (needs the ``onnx``
package: ``pip install onnx``). On the CPU provider it runs with
numpy feeds (``OnnxBeamSession``). Where the backend decodes on a device (a CUDA or TensorRT
provider: ``ort_gpu.IOBindingDecoder``) it runs with I/O binding on the CUDA provider
(``IOBindingBeamSession``): the image tensors and h / c stay on the device, the (R,) results
come back. The TensorRT execution provider is not used for it (its optimisation profile is the
step graph's). The binding path is tested on the CPU provider (device 'cpu'); the 'cuda' path
has not run (no onnxruntime-gpu on our machines).
"""

from __future__ import annotations

import threading

import numpy as np

from edgecap.backends.base import Encoded
from edgecap.build.beam_step import MAX_BLOCKED, beam_io, beam_step_model
from edgecap.contract import DECODER_STEP
from edgecap.decoding.graph_search import BeamStepResult, GraphRules, graph_rules, search_with_rules
from edgecap.decoding.options import CaptionOptions
from edgecap.errors import BackendError

SEARCH_MODES = ("host", "graph")


class OnnxBeamSession:
    """``BeamStepSession`` over an onnxruntime session of the beam-step graph: h / c, the image
    tensors and the rules' inputs and states (``GraphRules``) as numpy arrays between steps."""

    def __init__(self, run, tensors: dict, image_index: np.ndarray, vocab_size: int, rules: GraphRules):
        self._run = run
        self.h, self.c = tensors["h0"], tensors["c0"]  # S = N until the first step
        self._fixed = {
            "features": tensors["features"],
            "att_proj": tensors["att_proj"],
            "image_index": np.ascontiguousarray(image_index, np.int32),
            **{name: np.ascontiguousarray(value, np.float32) for name, value in rules.fixed.items()},
        }
        self.carried = dict(rules.carried)  # the graph reorders them by the back-pointers
        self._outputs = list(beam_io(rules.lms is not None)[1])
        self._zeros = np.zeros((len(image_index), vocab_size), np.float32)
        self._none_blocked = np.full((len(image_index), MAX_BLOCKED), -1, np.int32)

    def step(self, tokens, source_rows, scores, word_bias, blocked_words) -> BeamStepResult:
        feed = {
            "tokens": np.ascontiguousarray(tokens, np.int32),
            "source_rows": np.ascontiguousarray(source_rows, np.int32),
            "h": self.h,
            "c": self.c,
            "scores": np.ascontiguousarray(scores, np.float32),
            "word_bias": self._zeros if word_bias is None else np.ascontiguousarray(word_bias, np.float32),
            "blocked_words": (
                self._none_blocked if blocked_words is None else np.ascontiguousarray(blocked_words, np.int32)
            ),
            **self._fixed,
            **self.carried,
        }
        outputs = dict(zip(self._outputs, self._run(self._outputs, feed)))
        self.h, self.c = outputs.pop("h_next"), outputs.pop("c_next")
        for name in self.carried:
            self.carried[name] = outputs.pop(f"{name}_next")
        return BeamStepResult(**outputs)


class IOBindingBeamSession:
    """``BeamStepSession`` with I/O binding: the encoder's device tensors (``OrtValue``) read in
    place, h / c and the rules' carried states in two sets of device tensors used in turn (the
    graph writes the reordered ones into the set it does not read), the rules' fixed inputs,
    zeros for no bias and -1s for no blocked word kept on the device, only the (R,) results
    bound to the host."""

    def __init__(
        self,
        step_session,
        tensors: dict,
        image_index: np.ndarray,
        vocab_size: int,
        device: str,
        device_id: int,
        rules: GraphRules,
    ):
        import onnxruntime as ort

        self._session, self._device, self._device_id = step_session, device, device_id
        rows = len(image_index)

        def on_device(array: np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)

        self._io = step_session.io_binding()
        self._io.bind_ortvalue_input("features", tensors["features"])
        self._io.bind_ortvalue_input("att_proj", tensors["att_proj"])
        self._io.bind_ortvalue_input("image_index", on_device(np.asarray(image_index, np.int32)))
        for name, value in rules.fixed.items():
            self._io.bind_ortvalue_input(name, on_device(np.asarray(value, np.float32)))
        # the states a step reads (the encoder's h0 / c0 and the rules' first values), then two
        # sets written in turn
        self._current = {"h": tensors["h0"], "c": tensors["c0"]}
        self._current.update({name: on_device(value) for name, value in rules.carried.items()})
        hidden = tensors["h0"].shape()[1]
        shapes = {"h": (rows, hidden), "c": (rows, hidden)}
        shapes.update({name: value.shape for name, value in rules.carried.items()})
        self._sets = [
            {
                name: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, device_id)
                for name, shape in shapes.items()
            }
            for _ in range(2)
        ]
        self._next = 0
        self._zeros = on_device(np.zeros((rows, vocab_size), np.float32))
        self._none_blocked = on_device(np.full((rows, MAX_BLOCKED), -1, np.int32))
        kept = {f"{name}_next" for name in shapes}
        self._results = [name for name in beam_io(rules.lms is not None)[1] if name not in kept]

    def step(self, tokens, source_rows, scores, word_bias, blocked_words) -> BeamStepResult:
        io = self._io
        io.bind_cpu_input("tokens", np.ascontiguousarray(tokens, np.int32))
        io.bind_cpu_input("source_rows", np.ascontiguousarray(source_rows, np.int32))
        io.bind_cpu_input("scores", np.ascontiguousarray(scores, np.float32))
        if word_bias is None:
            io.bind_ortvalue_input("word_bias", self._zeros)
        else:
            io.bind_cpu_input("word_bias", np.ascontiguousarray(word_bias, np.float32))
        if blocked_words is None:
            io.bind_ortvalue_input("blocked_words", self._none_blocked)
        else:
            io.bind_cpu_input("blocked_words", np.ascontiguousarray(blocked_words, np.int32))
        written = self._sets[self._next]
        for name, value in self._current.items():
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(f"{name}_next", written[name])
        for name in self._results:
            io.bind_output(name, "cpu")
        self._session.run_with_iobinding(io)
        # get_outputs() follows the order of the bind calls above: the states first
        values = [value.numpy() for value in io.get_outputs()[len(written) :]]
        io.clear_binding_outputs()
        self._current = written
        self._next = 1 - self._next
        return BeamStepResult(**dict(zip(self._results, values)))


def _one_image(encoded: Encoded, i: int) -> Encoded:
    """Image ``i`` of a batch encoded on the host, as a batch of its own."""
    return Encoded(
        1,
        {name: tensor[i : i + 1] for name, tensor in encoded.tensors.items()},
        None if encoded.class_probs is None else encoded.class_probs[i : i + 1],
    )


def import_onnx():
    """The onnx package, with which search='graph' derives its step graph; without it, one
    BackendError naming ``pip install onnx`` (``OnnxRuntimeBackend`` asks when it is made)."""
    try:
        import onnx
    except ImportError as exc:
        raise BackendError(
            "search='graph' derives its step graph with the onnx package: pip install onnx"
        ) from exc
    return onnx


class OnnxGraphSearch:
    """The graph search of one onnxruntime backend: one beam-step session per beam size. The
    backend is thread-safe (``Captioner`` lets several threads caption on it at once), so the
    sessions are made under a lock: threads that ask for a new beam size together wait for one
    session instead of each building its own."""

    def __init__(self, backend):
        self.backend = backend
        # where the fused language models step: in the graph (nothing of theirs on the host or
        # the bus per word: half the host's work a word, the same search time on the CPU
        # provider, benchmarks/graph_host.py), or, False, in their own session on the host
        # between two runs of the graph (the benchmark's comparison)
        self.lms_in_graph = True
        self._sessions: dict[tuple, object] = {}  # (beam, end id, language models or None)
        self._lock = threading.Lock()

    def session(self, beam: int, end_id: int, lms=None):
        """The onnxruntime session of the beam-step graph for ``beam`` (made once); ``lms``:
        the language models (everyday, in-domain) it steps too, or None."""
        key = (beam, end_id, lms)
        found = self._sessions.get(key)
        if found is not None:
            return found
        with self._lock:
            if key in self._sessions:
                return self._sessions[key]
            onnx = import_onnx()
            import onnxruntime as ort

            from edgecap.backends.onnxruntime import session_options

            backend = self.backend
            dims = backend.manifest.dims
            model = beam_step_model(
                onnx.load(str(backend.manifest.path(DECODER_STEP))),
                beam,
                end_id,
                dims.top_k,
                dims.hidden_dim,
                dims.vocab_size,
                lms,
            )
            self._sessions[key] = ort.InferenceSession(
                model.SerializeToString(), session_options(backend.threads), providers=self._providers()
            )
        return self._sessions[key]

    def _providers(self) -> list:
        """The step graph's providers and their options, without the TensorRT execution
        provider (whose profile is the step graph's); the CPU provider alone on the CPU."""
        from edgecap.backends.ort_providers import CPU, TENSORRT

        if self.backend._device_decoder is None:
            return [CPU]
        options = self.backend.decoder.get_provider_options()
        return [(name, options.get(name, {})) for name in self.backend.providers if name != TENSORRT]

    def __call__(self, encoded, options: CaptionOptions, start_id: int, end_id: int, tag_words, fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        dims = backend.manifest.dims
        options.validate(dims.top_k)
        if backend._device_decoder is None and encoded.n_images > 1 and backend.images_apart:
            # an int8 step: each image searched alone, as the host search steps it
            # (OnnxDecoderSession.per_image), so that its caption does not depend on its batch
            return [
                hypotheses
                for i in range(encoded.n_images)
                for hypotheses in self(
                    _one_image(encoded, i),
                    options,
                    start_id,
                    end_id,
                    None if tag_words is None else tag_words[i : i + 1],
                    fusion,
                )
            ]
        beam = options.beam_size
        image_index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
        rules = graph_rules(
            options,
            dims.vocab_size,
            tag_words,
            fusion,
            image_index,
            encoded.class_probs,
            lms_in_graph=self.lms_in_graph,
        )
        step = self.session(beam, end_id, rules.lms)
        decoder = backend._device_decoder
        session: OnnxBeamSession | IOBindingBeamSession
        if decoder is None:
            session = OnnxBeamSession(step.run, encoded.tensors, image_index, dims.vocab_size, rules)
        else:
            session = IOBindingBeamSession(
                step, encoded.tensors, image_index, dims.vocab_size, decoder.device, decoder.device_id, rules
            )
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
