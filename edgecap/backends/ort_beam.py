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
from edgecap.build.beam_step import INT32_OUTPUTS, MAX_BLOCKED, beam_io, beam_step_model
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
    come back to the host.

    Everything is bound once a search, in three bindings: the first word's (reading the
    encoder's h0 / c0 and the rules' first states, writing the first set), then two used in
    turn (reading one set, writing the other): a device tensor bound to a graph that reads it
    on that device is read where it lies at every run (the states feed the step's matrix
    products and gathers, which the CUDA provider runs; a consumer on the CPU would have
    been given a copy made at binding). Only the per-word inputs (tokens, source rows,
    scores) are bound at each word, from the host (onnxruntime copies a host input to the
    device where the graph reads it when it is bound, not at each run: a host array bound once
    and written in place would never be seen again), and a bias or blocked words on the words
    that have them. The results are written by onnxruntime into host arrays of the session's
    own: a word's work on the host is three binds, the run and the results' copies, not some
    thirty bind calls (``benchmarks/graph_host.py --session binding``); they are never read
    through ``get_outputs()``, whose values onnxruntime 1.16 to 1.23 free on
    ``clear_binding_outputs()``."""

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

        self._session = step_session
        rows = len(image_index)

        def on_device(array: np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)

        def on_host(array: np.ndarray):  # the array's own memory (a host OrtValue is not a copy)
            return ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0)

        fixed = {
            "features": tensors["features"],
            "att_proj": tensors["att_proj"],
            "image_index": on_device(np.asarray(image_index, np.int32)),
            **{name: on_device(np.asarray(value, np.float32)) for name, value in rules.fixed.items()},
        }
        self._held: dict[str, np.ndarray] = {}  # the host arrays bound at this word
        first = {"h": tensors["h0"], "c": tensors["c0"]}  # S = N rows until the first step
        first.update({name: on_device(value) for name, value in rules.carried.items()})
        hidden = tensors["h0"].shape()[1]
        shapes = {"h": (rows, hidden), "c": (rows, hidden)}
        shapes.update({name: value.shape for name, value in rules.carried.items()})
        sets = [
            {
                name: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, device_id)
                for name, shape in shapes.items()
            }
            for _ in range(2)
        ]
        self._current = first  # the states the next word reads
        self._zeros = on_device(np.zeros((rows, vocab_size), np.float32))
        self._none_blocked = on_device(np.full((rows, MAX_BLOCKED), -1, np.int32))
        kept = {f"{name}_next" for name in shapes}
        self.results = {
            name: np.zeros(rows, np.int32 if name in INT32_OUTPUTS else np.float32)
            for name in beam_io(rules.lms is not None)[1]
            if name not in kept
        }
        host = {name: on_host(array) for name, array in self.results.items()}  # written in the run
        # the first word's binding, then the two used in turn: (states read, states written)
        self._bindings = []
        for read, written in ((first, sets[0]), (sets[0], sets[1]), (sets[1], sets[0])):
            io = step_session.io_binding()
            for name, value in {**fixed, **read}.items():
                io.bind_ortvalue_input(name, value)
            for name, value in written.items():
                io.bind_ortvalue_output(f"{name}_next", value)
            for name in self.results:
                io.bind_ortvalue_output(name, host[name])
            self._bindings.append({"io": io, "read": read, "written": written, "bias": None, "blocked": None})
        self._word = 0

    def step(self, tokens, source_rows, scores, word_bias, blocked_words) -> BeamStepResult:
        binding = self._bindings[0 if self._word == 0 else 1 + (self._word - 1) % 2]
        io = binding["io"]
        # this word's: copied to the device when bound (kept while bound: where the graph
        # reads them on the host, it reads them in place)
        for name, values, dtype in (
            ("tokens", tokens, np.int32),
            ("source_rows", source_rows, np.int32),
            ("scores", scores, np.float32),
        ):
            self._held[name] = np.ascontiguousarray(values, dtype)
            io.bind_cpu_input(name, self._held[name])
        # the bias and the blocked words: the device's constant where there are none (bound
        # again only when the binding held a host value), else this word's
        if word_bias is None:
            if binding["bias"] is not self._zeros:
                io.bind_ortvalue_input("word_bias", self._zeros)
                binding["bias"] = self._zeros
        else:  # (kept while bound: onnxruntime may read the array where it lies)
            binding["bias"] = np.ascontiguousarray(word_bias, np.float32)
            io.bind_cpu_input("word_bias", binding["bias"])
        if blocked_words is None:
            if binding["blocked"] is not self._none_blocked:
                io.bind_ortvalue_input("blocked_words", self._none_blocked)
                binding["blocked"] = self._none_blocked
        else:
            binding["blocked"] = np.ascontiguousarray(blocked_words, np.int32)
            io.bind_cpu_input("blocked_words", binding["blocked"])
        self._session.run_with_iobinding(io)
        self._current = binding["written"]
        self._word += 1
        return BeamStepResult(**{name: value.copy() for name, value in self.results.items()})


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
