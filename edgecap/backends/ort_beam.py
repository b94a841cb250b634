"""The onnxruntime backend's beam search with the bookkeeping in the graph
(``OnnxRuntimeBackend(search="graph")``; ``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``).

The beam-step graph is derived from the model's ``decoder_step.onnx`` once per beam size, in
memory (needs the ``onnx`` package: ``pip install onnx``), and run with numpy feeds: this is
the CPU form, which checks the graph's bookkeeping against the numpy loop. On a GPU provider
the backend keeps the host search (its I/O-binding decoder is not wired to the beam-step graph
yet).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from edgecap.build.beam_step import BEAM_OUTPUTS, beam_step_model, beam_width
from edgecap.contract import DECODER_STEP
from edgecap.decoding.graph_search import BeamStepResult, graph_beam_search
from edgecap.decoding.options import CaptionOptions
from edgecap.decoding.rules import TagBonus
from edgecap.errors import BackendError
from edgecap.vocab import NEVER_FIRST_IDS

SEARCH_MODES = ("host", "graph")


def scorers_for(options: CaptionOptions, vocab_size: int, tag_words, fusion, class_probs):
    """The scorers ``edgecap.decoding.search_with_tags`` makes for an unconstrained search: the
    tag bonus, and the fused language models with the option's weight (None: the model's)."""
    scorers: list = []
    if tag_words is not None and any(tag_words) and options.guidance_bonus > 0:
        scorers.append(partial(TagBonus, tag_words, vocab_size, options.guidance_bonus))
    if fusion is not None:
        weight = fusion.weight if options.fusion_weight is None else options.fusion_weight
        if weight > 0:
            scorers.append(partial(fusion.scorer, weight, class_probs=class_probs))
    return scorers


class OnnxBeamSession:
    """``BeamStepSession`` over an onnxruntime session of the beam-step graph: h / c (and the
    image tensors) as numpy arrays between steps."""

    def __init__(self, run, tensors: dict, image_index: np.ndarray, vocab_size: int):
        self._run = run
        self.h, self.c = tensors["h0"], tensors["c0"]  # S = N until the first step
        self._fixed = {"features": tensors["features"], "att_proj": tensors["att_proj"],
                       "image_index": np.ascontiguousarray(image_index, np.int32)}
        self._zeros = np.zeros((len(image_index), vocab_size), np.float32)

    def step(self, tokens, source_rows, scores, word_bias, word_block) -> BeamStepResult:
        feed = {"tokens": np.ascontiguousarray(tokens, np.int32),
                "source_rows": np.ascontiguousarray(source_rows, np.int32),
                "h": self.h, "c": self.c, "scores": np.ascontiguousarray(scores, np.float32),
                "word_bias": self._zeros if word_bias is None else
                np.ascontiguousarray(word_bias, np.float32),
                "word_block": self._zeros if word_block is None else word_block, **self._fixed}
        outputs = dict(zip(BEAM_OUTPUTS, self._run(list(BEAM_OUTPUTS), feed)))
        self.h, self.c = outputs.pop("h_next"), outputs.pop("c_next")
        return BeamStepResult(**outputs)


class OnnxGraphSearch:
    """The graph search of one onnxruntime backend: one beam-step session per beam size."""

    def __init__(self, backend):
        self.backend = backend
        self._sessions: dict[tuple[int, int], object] = {}

    def session(self, beam: int, end_id: int):
        """The onnxruntime session of the beam-step graph for ``beam`` (made once)."""
        key = (beam, end_id)
        if key not in self._sessions:
            try:
                import onnx
            except ImportError as exc:
                raise BackendError("search='graph' derives its step graph with the onnx "
                                   "package: pip install onnx") from exc
            import onnxruntime as ort

            from edgecap.backends.onnxruntime import session_options

            backend = self.backend
            dims = backend.manifest.dims
            model = beam_step_model(onnx.load(str(backend.manifest.path(DECODER_STEP))), beam,
                                    end_id, dims.top_k, dims.hidden_dim, dims.vocab_size)
            self._sessions[key] = ort.InferenceSession(model.SerializeToString(),
                                                       session_options(backend.threads),
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def __call__(self, encoded, options: CaptionOptions, start_id: int, end_id: int, tag_words,
                 fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        dims = backend.manifest.dims
        options.validate(dims.top_k)
        beam = options.beam_size
        image_index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
        session = OnnxBeamSession(self.session(beam, end_id).run, encoded.tensors, image_index,
                                  dims.vocab_size)
        scorers = scorers_for(options, dims.vocab_size, tag_words, fusion, encoded.class_probs)
        return graph_beam_search(session, encoded.n_images, options, dims.top_k,
                                 beam_width(beam, dims.top_k), start_id, end_id, dims.vocab_size,
                                 never_first=NEVER_FIRST_IDS, scorers=scorers,
                                 describe=backend.describe)
