"""The beam search with its bookkeeping in the step graph (``edgecap.build.beam_step``,
``edgecap.decoding.graph_search``, ``OnnxRuntimeBackend(search="graph")``) against the numpy loop
(``edgecap.decoding.beam``) on onnxruntime CPU: the same hypotheses, finished flags and scores.
The numpy loop is the reference: the expected hypotheses come from it, not from the code under
test. The graph is what a TensorRT engine would be built from; it runs here on onnxruntime only.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from edgecap.build.beam_step import BEAM_INPUTS, BEAM_OUTPUTS, MAX_BLOCKED, beam_step_model  # noqa: E402
from edgecap.build.convert import fold_constants  # noqa: E402
from edgecap.decoding import CaptionOptions, search_with_tags  # noqa: E402
from edgecap.decoding.fusion import CaptionLM, Fusion  # noqa: E402
from edgecap.decoding.graph_search import BeamStepResult, graph_beam_search  # noqa: E402
from edgecap.errors import BackendError  # noqa: E402
from edgecap.images import load_rgb, preprocess  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402
from fakes import PrefixHashBackend  # noqa: E402
from helpers import END_TIED_WITH_THE_LAST_CONTINUATION, LATER_TIED_ENDING, TableBackend  # noqa: E402

START, END = 1, 2


def _same(host, graph):
    """The same hypotheses: words, finished flags and (bit for bit) scores."""
    for want, got in zip(host, graph, strict=True):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.finished for h in got] == [h.finished for h in want]
        assert [(h.log_prob, h.score, h.rank_score) for h in got] == [
            (h.log_prob, h.score, h.rank_score) for h in want
        ]


def _random_lm(rng, vocab: int, hidden: int = 8, embed: int = 6) -> CaptionLM:
    arrays = {
        "embed": (vocab, embed),
        "w_ih": (4 * hidden, embed),
        "w_hh": (4 * hidden, hidden),
        "bias": (4 * hidden,),
        "out_w": (vocab, hidden),
        "out_b": (vocab,),
    }
    return CaptionLM({k: rng.normal(size=shape).astype(np.float32) for k, shape in arrays.items()})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model on onnxruntime CPU, both searches, three encoded random images."""
    manifest = load_manifest(tiny_model_dir)
    host = OnnxRuntimeBackend(manifest, device="cpu", threads=1)
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 3, *manifest.preprocessing.size)).astype(np.float32)
    return manifest, host, graph, images


# beam, no_repeat_ngram, length_penalty, n_best, max_length, guidance bonus, fusion weight
CASES = [
    (1, 0, None, 1, 20, 0.0, 0.0),
    (1, 1, None, 1, 20, 0.0, 0.0),
    (2, 2, 0.7, 2, 12, 2.0, 0.0),
    (3, 3, None, 3, 20, 2.0, 0.6),
    (3, 0, 1.5, 1, 3, 0.0, 0.0),
    (4, 1, None, 2, 8, 3.0, 0.6),
    (5, 2, 0.7, 5, 15, 1.0, 0.0),
    (10, 3, None, 4, 10, 2.0, 0.3),
]


@pytest.mark.parametrize("lms_in_graph", [False, True], ids=["lms-on-host", "lms-in-graph"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_graph_search_is_the_numpy_search_on_the_tiny_model(tiny, case, lms_in_graph, monkeypatch):
    """The numpy search's hypotheses, with the language models stepped in the graph (the
    default) and on the host."""
    manifest, host, graph, images = tiny
    monkeypatch.setattr(graph._graph_search, "lms_in_graph", lms_in_graph)
    beam, ngram, penalty, n_best, max_length, bonus, weight = case
    options = CaptionOptions(
        beam_size=beam,
        no_repeat_ngram=ngram,
        length_penalty=penalty,
        n_best=n_best,
        max_length=max_length,
        guidance_bonus=bonus,
        fusion_weight=weight,
    )
    vocab = manifest.dims.vocab_size
    rng = np.random.default_rng(beam)
    # the two language models of different widths: each state carried at its own
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab, hidden=5), 0.5, {})
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))
    want = search_with_tags(host, host.encode(images), options, START, END, vocab, tags, fusion=fusion)
    got = search_with_tags(graph, graph.encode(images), options, START, END, vocab, tags, fusion=fusion)
    _same(want, got)


def test_the_graph_keeps_its_bookkeeping_in_fp32_with_a_constant_k(tiny):
    """What TensorRT needs of it: TopK's K a stored constant (the beam for the candidates, the
    model's K in the step), every appended float tensor FP32, int32 indices at the I/O."""
    manifest = tiny[0]
    dims = manifest.dims
    step = onnx.load(str(manifest.path("decoder_step")))
    model = beam_step_model(step, 3, END, dims.top_k, dims.hidden_dim, dims.vocab_size)
    model = fold_constants(model)  # as the TensorRT build prepares every graph
    graph = model.graph
    assert [i.name for i in graph.input] == list(BEAM_INPUTS)
    assert [o.name for o in graph.output] == list(BEAM_OUTPUTS)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    topks = [n for n in graph.node if n.op_type == "TopK"]
    assert len(topks) == 2
    assert all(n.input[1] in stored for n in topks)
    assert int(stored["beam/beam_k"][0]) == 3
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
    appended = [o for n in graph.node if n.name.startswith("beam/") for o in n.output]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    assert {types[name] for name in appended if types.get(name) in floats} == {onnx.TensorProto.FLOAT}
    int_io = {o.name for o in graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.INT32}
    assert int_io == {"next_tokens", "back_pointers", "choices", "end_positions"}


@pytest.mark.parametrize(
    "n_images, gated", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-gated-lms"]
)
def test_an_int8_models_graph_search_gives_each_photo_its_caption_alone(tiny, tmp_path, n_images, gated):
    """An int8 step quantises its inputs with one scale over all the rows of a run, so the graph
    search takes each image of a batch alone, as the host search steps it
    (``OnnxDecoderSession.per_image``): a photo's hypotheses in a batch are those it gets alone,
    bit for bit, and the host search's, from a batch of two on. They had been searched together
    (docs/precision.md said so), and the other photos' rows moved a photo's scores. With the
    language models fused under a gate, each photo alone keeps its own class probabilities, so
    its own share of the fusion weight."""
    from edgecap.backends.base import Encoded
    from edgecap.build.convert import convert_model_dir
    from edgecap.decoding.fusion import Gate

    manifest = convert_model_dir(tiny[0].directory, tmp_path / "int8", "int8")
    host = OnnxRuntimeBackend(manifest, device="cpu", threads=1)
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    images = tiny[3][:n_images].copy()
    images[1] *= 8  # one photo of a much wider range: one scale for all would move the others
    options = CaptionOptions(beam_size=3, no_repeat_ngram=0, n_best=3, max_length=6, guidance_bonus=2.0)
    vocab = manifest.dims.vocab_size
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))[:n_images]
    encoded = graph.encode(images)
    fusion = None
    if gated:  # the two photos' shares of the fusion weight apart: about 1/4 and 3/4
        options = replace(options, fusion_weight=0.6)
        prior = np.ones(encoded.class_probs.shape[1])
        low, high = sorted(encoded.class_probs[:2] @ prior)
        gate = Gate(prior, low - (high - low) / 2, high + (high - low) / 2)
        assert (
            0.1 < gate(encoded.class_probs[:2]).min() < 0.4 < 0.6 < gate(encoded.class_probs[:2]).max() < 0.9
        )
        rng = np.random.default_rng(7)
        fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {}, gate)
    batch = search_with_tags(graph, encoded, options, START, END, vocab, tags, fusion=fusion)
    for i in range(len(images)):
        one = Encoded(
            1, {k: v[i : i + 1] for k, v in encoded.tensors.items()}, encoded.class_probs[i : i + 1]
        )
        (alone,) = search_with_tags(graph, one, options, START, END, vocab, tags[i : i + 1], fusion=fusion)
        _same([alone], [batch[i]])
    _same(search_with_tags(host, host.encode(images), options, START, END, vocab, tags, fusion=fusion), batch)


def test_fp16_model_graph_search_gives_its_numpy_captions(tiny, tmp_path):
    """An FP16 model directory (``edgecap convert``): the bookkeeping (and the language models'
    step, in FP32 on its float32 inputs) is appended to its step's float32 outputs, and its
    captions are the FP16 model's own numpy-search captions."""
    from edgecap.build.convert import convert_fp16

    manifest, _, _, images = tiny
    half = convert_fp16(manifest, tmp_path / "fp16")
    host = OnnxRuntimeBackend(half, device="cpu", threads=1)
    graph = OnnxRuntimeBackend(half, device="cpu", threads=1, search="graph")
    vocab = half.dims.vocab_size
    rng = np.random.default_rng(6)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {})
    for beam, weight in ((1, 0.0), (3, 0.0), (3, 0.6)):
        options = CaptionOptions(beam_size=beam, n_best=beam, fusion_weight=weight)
        _same(
            search_with_tags(host, host.encode(images), options, START, END, vocab, None, fusion=fusion),
            search_with_tags(graph, graph.encode(images), options, START, END, vocab, None, fusion=fusion),
        )
    assert [lms is not None for _, _, lms in graph._graph_search._sessions] == [False, False, True]


def test_the_graph_steps_the_language_models_and_the_host_sends_no_bias_for_them(tiny, monkeypatch):
    """With the language models fused and the tag bonus on (the default options' rules, no
    n-gram rule), the graph search (which steps the language models in the graph by default)
    runs no rule's scorer on the host and sends up no bias (zeros stay where they are): the
    bias is made in the graph. The captions are the numpy search's, which makes it on the host,
    as the graph search does for the language models with ``lms_in_graph`` off (a graph without
    them)."""
    from edgecap.backends.ort_beam import OnnxBeamSession
    from edgecap.decoding.fusion import FusionScorer
    from edgecap.decoding.rules import TagBonus

    manifest, host, _, images = tiny
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    vocab = manifest.dims.vocab_size
    rng = np.random.default_rng(3)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {})
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))
    options = CaptionOptions(
        beam_size=3, no_repeat_ngram=0, n_best=3, max_length=10, fusion_weight=0.6, guidance_bonus=2.0
    )
    want = search_with_tags(host, host.encode(images), options, START, END, vocab, tags, fusion=fusion)
    graph._graph_search.lms_in_graph = False
    _same(
        want, search_with_tags(graph, graph.encode(images), options, START, END, vocab, tags, fusion=fusion)
    )
    assert [lms for _, _, lms in graph._graph_search._sessions] == [None]
    graph._graph_search.lms_in_graph = True  # the default

    def refuse(*args):
        raise AssertionError("the host made a rule's bias")

    biases = []
    real_step = OnnxBeamSession.step

    def step(self, tokens, source_rows, scores, word_bias, blocked_words):
        biases.append(word_bias)
        return real_step(self, tokens, source_rows, scores, word_bias, blocked_words)

    monkeypatch.setattr(FusionScorer, "bias", refuse)
    monkeypatch.setattr(TagBonus, "bias", refuse)
    monkeypatch.setattr(OnnxBeamSession, "step", step)
    got = search_with_tags(graph, graph.encode(images), options, START, END, vocab, tags, fusion=fusion)
    _same(want, got)
    assert len(biases) > 1 and all(bias is None for bias in biases)
    assert [lms is not None for _, _, lms in graph._graph_search._sessions] == [False, True]


def test_a_gate_that_gives_no_photo_the_language_models_keeps_them_out_of_the_graph(tiny):
    """Where the fusion gate gives every photo of a batch weight 0 the host's search steps no
    language model; the graph search then runs the graph without them (the cheaper), with the
    same captions."""
    from edgecap.decoding.fusion import Gate

    manifest, host, _, images = tiny
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    vocab = manifest.dims.vocab_size
    encoded = host.encode(images)
    assert encoded.class_probs is not None
    rng = np.random.default_rng(4)
    lms = (_random_lm(rng, vocab), _random_lm(rng, vocab))
    typical = encoded.class_probs @ np.ones(encoded.class_probs.shape[1])
    for none_above, in_graph in ((float(typical.min()) - 1.0, False), (float(typical.max()) + 2.0, True)):
        gate = Gate(np.ones(encoded.class_probs.shape[1]), none_above - 1.0, none_above)
        fusion = Fusion(*lms, 0.5, {}, gate)
        options = CaptionOptions(beam_size=2, n_best=2, max_length=8, fusion_weight=0.6)
        want = search_with_tags(host, encoded, options, START, END, vocab, None, fusion=fusion)
        _same(
            want,
            search_with_tags(graph, graph.encode(images), options, START, END, vocab, None, fusion=fusion),
        )
        assert [lms is not None for _, _, lms in graph._graph_search._sessions][-1] == in_graph


def test_io_binding_graph_search_gives_the_numpy_captions(tiny, monkeypatch):
    """The device path of onnxruntime (I/O binding: the image tensors and h / c as device
    ``OrtValue``s between steps), run here on the CPU provider with device 'cpu'; the 'cuda'
    strings are the same calls on another device."""
    from edgecap.backends.ort_beam import IOBindingBeamSession
    from edgecap.backends.ort_gpu import IOBindingDecoder

    manifest, host, _, images = tiny
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    vocab = manifest.dims.vocab_size
    graph._device_decoder = IOBindingDecoder(graph.encoder, graph.decoder, vocab, device="cpu")
    sessions = []
    real_step = IOBindingBeamSession.step

    def step(self, *args):
        sessions.append(self)
        return real_step(self, *args)

    monkeypatch.setattr(IOBindingBeamSession, "step", step)
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))
    rng = np.random.default_rng(5)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab, hidden=5), 0.5, {})  # two widths
    for beam, ngram, weight in ((1, 0, 0.0), (3, 3, 0.0), (3, 2, 0.6)):
        options = CaptionOptions(
            beam_size=beam, no_repeat_ngram=ngram, n_best=beam, guidance_bonus=2.0, fusion_weight=weight
        )
        want = search_with_tags(host, host.encode(images), options, START, END, vocab, tags, fusion=fusion)
        encoded = graph.encode(images)
        assert not isinstance(encoded.tensors["h0"], np.ndarray)  # device tensors
        _same(want, search_with_tags(graph, encoded, options, START, END, vocab, tags, fusion=fusion))
    assert sessions  # the binding session ran the steps
    assert "everyday_h" in sessions[-1]._current  # the last search's language-model states
    assert set(sessions[0]._current) == {"h", "c", "steered"}  # the tag bonus's: always
    # a batch of two photos (not as many as an image's three channels) is two photos
    encoded = graph.encode(images[:2])
    assert encoded.n_images == 2 and encoded.class_probs.shape[0] == 2
    want = search_with_tags(
        host, host.encode(images[:2]), options, START, END, vocab, tags[:2], fusion=fusion
    )
    _same(want, search_with_tags(graph, encoded, options, START, END, vocab, tags[:2], fusion=fusion))


def test_graph_session_on_a_gpu_keeps_cuda_and_leaves_out_the_tensorrt_provider():
    """The beam-step graph has inputs the TensorRT execution provider's profile (made for the
    step graph) does not know: it runs on the step's CUDA provider, with its options."""
    from types import SimpleNamespace

    from edgecap.backends.ort_beam import OnnxGraphSearch
    from edgecap.backends.ort_providers import CPU, CUDA, TENSORRT

    options = {TENSORRT: {"trt_fp16_enable": "1"}, CUDA: {"device_id": "1"}, CPU: {}}
    backend = SimpleNamespace(
        _device_decoder=object(),
        providers=[TENSORRT, CUDA, CPU],
        decoder=SimpleNamespace(get_provider_options=lambda: options),
    )
    assert OnnxGraphSearch(backend)._providers() == [(CUDA, {"device_id": "1"}), (CPU, {})]
    backend._device_decoder = None
    assert OnnxGraphSearch(backend)._providers() == [CPU]


class _Emulated:
    """The beam-step graph's arithmetic (``edgecap.build.beam_step``) in numpy over a fake
    backend's session: drives the host side on hand-made tables and prefix-hash models, where
    the rare paths are easy to reach. The fake gathers its state by ``source_rows`` when a step
    starts; given the last step's back-pointers it is in the state the graph's reorder leaves."""

    def __init__(self, session, beam: int, width: int, top_k: int):
        self.session, self.beam, self.width, self.top_k = session, beam, width, top_k
        self.pointers = None

    def step(self, tokens, source_rows, scores, word_bias, blocked_words):
        beam, width = self.beam, self.width
        rows = source_rows if self.pointers is None else self.pointers[source_rows]
        result = self.session.step(tokens, rows.astype(np.int32), word_bias)
        lp, ids = result.topk_logprobs.astype(np.float32), result.topk_ids
        bias = (
            np.zeros(ids.shape, np.float32)
            if word_bias is None
            else np.take_along_axis(word_bias, ids.astype(np.int64), 1)
        )
        end_bias = np.zeros(len(tokens), np.float32) if word_bias is None else word_bias[:, END]
        cand = scores[:, None] + (lp + bias)
        is_end = ids == END
        blocked = (
            np.zeros(ids[:, :width].shape, bool)
            if blocked_words is None
            else (ids[:, :width, None] == blocked_words[:, None, :]).any(2)
        )
        going = np.where(blocked | is_end[:, :width], -np.inf, cand[:, :width])
        going = going.reshape(-1, beam * width)
        choice = np.argsort(-going, axis=1, kind="stable")[:, :beam]
        first = np.arange(len(going))[:, None] * beam
        self.pointers = (first + choice // width).reshape(-1).astype(np.int32)

        def pick(values):
            return np.take_along_axis(values[:, :width].reshape(-1, beam * width), choice, 1).reshape(-1)

        return BeamStepResult(
            pick(ids).astype(np.int32),
            self.pointers,
            choice.reshape(-1).astype(np.int32),
            np.take_along_axis(going, choice, 1).reshape(-1),
            pick(lp),
            np.where(is_end, lp, -np.inf).max(1),
            np.where(is_end.any(1), is_end.argmax(1), self.top_k).astype(np.int32),
            (lp - lp).sum(1),
            end_bias,
            pick(bias),
        )


def _emulated_search(backend, encoded, options, vocab, tags=None, fusion=None, endings=False):
    from edgecap.decoding import scorers_for
    from edgecap.build.beam_step import beam_width
    from edgecap.vocab import NEVER_FIRST_IDS

    beam, top_k = options.beam_size, backend.top_k
    index = np.repeat(np.arange(encoded.n_images, dtype=np.int32), beam)
    session = _Emulated(backend.start(encoded, index), beam, beam_width(beam, top_k), top_k)
    return graph_beam_search(
        session,
        encoded.n_images,
        options,
        top_k,
        beam_width(beam, top_k),
        START,
        END,
        never_first=NEVER_FIRST_IDS,
        scorers=scorers_for(options, vocab, tags, fusion, encoded.class_probs),
        endings=endings,
    )


# the settings a random case draws from (beam and n_best are drawn to fit the model's K)
DRAWS = {
    "max_length": [2, 3, 5, 8, 13],
    "no_repeat_ngram": [0, 1, 2, 3],
    "length_penalty": [None, 0.7, 1.5],
    "guidance_bonus": [0.0, 1.0, 3.0],
    "fusion_weight": [0.0, 0.6],
}


@pytest.mark.parametrize("seed", range(12))
def test_host_side_is_the_numpy_search_on_random_fake_models(seed):
    """Random prefix-hash models (a row's next word depends on its whole prefix, so a wrong
    back-pointer changes the caption) with random rules and options."""
    rng = np.random.default_rng(100 + seed)
    vocab, top_k, n_images = (int(v) for v in rng.integers([10, 4, 1], [30, 10, 5]))
    beam = int(rng.integers(1, min(top_k, 5) + 1))
    drawn = {name: values[int(rng.integers(len(values)))] for name, values in DRAWS.items()}
    options = CaptionOptions(beam_size=beam, n_best=int(rng.integers(1, beam + 1)), **drawn)
    backend = PrefixHashBackend(vocab, top_k, end_bias=float(rng.uniform(-3, 1.5)), seed=seed)
    tags = tuple(frozenset(rng.integers(3, vocab, int(rng.integers(0, 3))).tolist()) for _ in range(n_images))
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {})
    images = rng.integers(0, 1000, n_images)
    want = search_with_tags(backend, backend.encode(images), options, START, END, vocab, tags, fusion=fusion)
    _same(want, _emulated_search(backend, backend.encode(images), options, vocab, tags, fusion))


@pytest.mark.parametrize("seed", range(8))
def test_host_side_endings_are_the_numpy_searchs(seed):
    """Every place the search could have ended (what the consensus choice chooses among), as
    the numpy loop collects them: the same words, scores and order."""
    from edgecap.decoding import _search

    rng = np.random.default_rng(200 + seed)
    vocab, top_k, n_images = (int(v) for v in rng.integers([10, 4, 1], [30, 10, 5]))
    beam = int(rng.integers(1, min(top_k, 5) + 1))
    drawn = {name: values[int(rng.integers(len(values)))] for name, values in DRAWS.items()}
    options = CaptionOptions(beam_size=beam, **drawn)
    backend = PrefixHashBackend(vocab, top_k, end_bias=float(rng.uniform(-3, 1.5)), seed=seed)
    tags = tuple(frozenset(rng.integers(3, vocab, int(rng.integers(0, 3))).tolist()) for _ in range(n_images))
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {})
    images = rng.integers(0, 1000, n_images)
    want = _search(backend, backend.encode(images), options, START, END, vocab, tags, fusion, False)
    assert sum(len(h) for h in want) > n_images * options.n_best or options.max_length < 3
    _same(want, _emulated_search(backend, backend.encode(images), options, vocab, tags, fusion, endings=True))


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c"]


def _tables(rule, options, top_k=2, tags=None):
    backend = TableBackend(WORDS, rule, top_k=top_k)
    image = np.zeros((1, 3, 4, 4), np.float32)
    want = search_with_tags(backend, backend.encode(image), options, START, END, len(WORDS), tags)
    return want, _emulated_search(backend, backend.encode(image), options, len(WORDS), tags)


def test_the_blocked_words_are_each_rows_ids_in_its_own_places():
    """The host's ``_blocked``: at the first word the never-first ids in every row; then, per
    live row, the words that followed its last n - 1 words earlier (each once, sorted), -1
    past them; a masked row none; a row barred from as many words as it has said fills every
    place it has; more never-first ids than places are refused."""
    from edgecap.decoding.graph_search import _blocked

    never = np.array([END])
    live = np.ones(3, bool)
    first = _blocked(0, np.zeros((3, 0), np.int64), live, never, 3)
    assert first.shape == (3, MAX_BLOCKED) and (first[:, 0] == END).all() and (first[:, 1:] == -1).all()
    said = np.array([[4, 5, 6, 4, 5, 7, 4, 5], [4, 5, 6, 4, 5, 7, 4, 5], [1, 2, 3, 1, 2, 9, 1, 2]])
    got = _blocked(8, said, np.array([True, False, True]), never, 3)
    assert got[0, :2].tolist() == [6, 7] and got[2, :2].tolist() == [3, 9]
    assert (got[:, 2:] == -1).all() and (got[1] == -1).all()
    assert _blocked(8, said, live, never, 0) is None  # no rule, past the first word
    # 7 followed "4 5" three times and 2 once: each once
    again = np.array([[4, 5, 7, 4, 5, 7, 4, 5, 2, 4, 5, 7, 4, 5]])
    assert _blocked(14, again, live[:1], never, 3)[0, :3].tolist() == [2, 7, -1]
    # bigrams (n = 2): the words that followed the last word
    assert _blocked(8, said[2:], live[:1], never, 2)[0, :4].tolist() == [3, 9, -1, -1]
    # n = 1: every word said so far, here 200 different ones, each once
    full = _blocked(200, np.arange(200)[None, :], live[:1], never, 1)
    assert full[0].tolist() == list(range(200))
    twice = np.array([[5, 3, 5, 3], [5, 3, 5, 3]])
    once_each = _blocked(4, twice, np.array([True, False]), never, 1)
    assert once_each[0, :3].tolist() == [3, 5, -1] and (once_each[1] == -1).all()
    # nothing repeats: no n-gram blocked
    assert _blocked(3, np.array([[4, 5, 6]]), live[:1], never, 2) is None
    with pytest.raises(ValueError, match="at most 200 never-first words"):
        _blocked(0, np.zeros((1, 0), np.int64), live[:1], np.arange(MAX_BLOCKED + 1), 3)
    # as many as there are places: each in its place
    most = _blocked(0, np.zeros((1, 0), np.int64), live[:1], np.arange(MAX_BLOCKED), 3)
    assert most[0].tolist() == list(range(MAX_BLOCKED))


def test_every_continuation_blocked_keeps_the_live_beam():
    """ "a" then "b", then both repeat a word (no_repeat_ngram=1) and <end> is not in the top
    K: the live beam "a b" is the caption, unfinished."""
    want, got = _tables(lambda prefix: {"a": -0.1, "b": -0.2}, CaptionOptions(beam_size=1, no_repeat_ngram=1))
    assert [WORDS[w] for w in want[0][0].tokens] == ["a", "b"] and not want[0][0].finished
    _same(want, got)


@pytest.mark.parametrize("penalty", [None, 0.7, 1.5])
def test_captions_cut_at_a_max_length_of_one_are_scored_over_their_one_word(penalty):
    """max_length=1: no beam can end (<end> is never the first word), so the captions are the
    live beams, one word each and unfinished, each scored over that one word: its log-prob
    itself, whatever the penalty (the mean over 1 word; GNMT's ((5 + 1) / 6) ** p is 1)."""
    options = CaptionOptions(beam_size=2, n_best=2, max_length=1, length_penalty=penalty, consensus=False)
    want, got = _tables(lambda prefix: {"<end>": -0.1, "a": -0.5, "b": -1.5}, options, top_k=4)
    assert [[WORDS[w] for w in h.tokens] for h in want[0]] == [["a"], ["b"]]
    assert [(h.score, h.finished) for h in want[0]] == [(-0.5, False), (-1.5, False)]
    _same(want, got)


def test_search_with_rules_reads_as_many_candidates_a_row_as_the_graph_offers():
    """``search_with_rules`` (what both backends call) over a graph made for beam 1 (each row
    offers its first 2 words, K = 4), no_repeat_ngram=1. After "a", <end> is fourth: "a <end>"
    is a place to end (mean log-prob -0.35). After "a b" both offered words repeat a word and
    <end> is fourth again: nothing is left to take, and an <end> past the offered words does
    not finish the beam, so the caption is the best place to end, "a <end>" (not "a b <end>",
    -1.1), as in the numpy loop."""
    from types import SimpleNamespace

    from edgecap.build.beam_step import beam_width
    from edgecap.decoding.graph_search import graph_rules, search_with_rules

    def rule(prefix):
        if len(prefix) == 1:
            return {"b": -0.1, "a": -0.2, "c": -0.5, "<end>": -0.6}
        return {"a": -0.1, "b": -0.2, "c": -0.5, "<end>": -3.0} if prefix else {"a": -0.1}

    options = CaptionOptions(
        beam_size=1, no_repeat_ngram=1, max_length=6, length_penalty=None, consensus=False
    )
    backend = TableBackend(WORDS, rule, top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    want = search_with_tags(backend, encoded, options, START, END, len(WORDS), None)
    assert [WORDS[w] for w in want[0][0].tokens] == ["a"] and want[0][0].finished
    session = _Emulated(backend.start(encoded, np.zeros(1, np.int32)), 1, beam_width(1, 4), 4)
    dims = SimpleNamespace(top_k=4, vocab_size=len(WORDS))
    rules = graph_rules(options, len(WORDS), None, None, np.zeros(1, np.int32), None)
    got = search_with_rules(session, 1, options, dims, START, END, rules, None, lambda: "fake")
    _same(want, got)


def test_no_beam_ends_gives_the_best_place_to_end():
    """<end> is third in every top K, so no beam takes it before max_length: the caption is the
    best ending seen, a finished hypothesis, not the cut beam."""

    def rule(prefix):
        return {"a": -0.1, "b": -0.3, "<end>": -2.0 - 0.5 * (len(prefix) == 3)}

    want, got = _tables(rule, CaptionOptions(beam_size=2, max_length=5, no_repeat_ngram=0, n_best=2), top_k=4)
    assert want[0][0].finished and len(want[0][0].tokens) < 5
    _same(want, got)


def test_equal_places_to_end_keep_the_first():
    """Beam 2: "a" and "b" tie as first words and <end> is fourth in every later top K (past
    the 3 candidates a row offers), so no beam ends: the caption is the best place to end, after
    the first word (mean log-prob -0.75; later -1.87). "a <end>" and "b <end>" tie exactly; the
    first one met (row 0, "a") stays, as in the numpy loop, where a later ending must rank
    strictly better."""

    def rule(prefix):
        if not prefix:
            return {"a": -0.5, "b": -0.5}
        return {"c": -0.1, "a": -0.2, "b": -0.3, "<end>": -1.0 if len(prefix) == 1 else -5.0}

    options = CaptionOptions(beam_size=2, max_length=3, no_repeat_ngram=0, length_penalty=None)
    want, got = _tables(rule, options, top_k=4)
    assert [WORDS[w] for w in want[0][0].tokens] == ["a"] and want[0][0].finished
    _same(want, got)


def test_an_end_tied_with_the_beams_last_continuation_from_a_later_row_is_not_taken():
    """``helpers.END_TIED_WITH_THE_LAST_CONTINUATION``: the numpy loop meets the first row's
    continuation first, which fills the beam; the later row's <end> finishes no caption."""
    rows = END_TIED_WITH_THE_LAST_CONTINUATION
    options = CaptionOptions(
        beam_size=2, n_best=2, max_length=2, no_repeat_ngram=1, length_penalty=None, consensus=False
    )
    want, got = _tables(lambda prefix: rows[prefix], options, top_k=4)
    assert [([WORDS[w] for w in h.tokens], h.finished, h.log_prob) for h in want[0]] == [
        (["a"], True, -1.0),
        (["b", "a"], False, -1.0),
    ]
    _same(want, got)


def _best_place_to_end(rows: dict, words: list[str], log_prob: float, rank_score: float) -> None:
    """Beam 2, the tag bonus (1) on "a", three words at most, table ``rows`` (prefix -> the
    next words' log-probabilities; any other prefix: "c" -0.25, <end> -5): the numpy loop's
    caption and the host side's are ``words``, ended, with these scores."""
    options = CaptionOptions(
        beam_size=2, max_length=3, no_repeat_ngram=0, length_penalty=None, guidance_bonus=1.0, consensus=False
    )
    tags = (frozenset({WORDS.index("a")}),)
    want, got = _tables(
        lambda prefix: rows.get(prefix, {"c": -0.25, "<end>": -5.0}), options, top_k=4, tags=tags
    )
    for hyps in (want[0], got[0]):
        assert [WORDS[w] for w in hyps[0].tokens] == words and hyps[0].finished
        assert (hyps[0].log_prob, hyps[0].rank_score) == (log_prob, rank_score)
    _same(want, got)


def test_equal_ranked_places_to_end_keep_the_higher_log_probability():
    """ "a" (-1.25, ranked -0.25) then "b" (-0.5) as first words, then "c" continues both
    beams and <end> ranks after both, so no beam ends. After the first word both <end>s tie
    exactly in rank (-2.5 over 2 words) but not in the model's log-probability ("a <end>":
    -3.5, "b <end>": -2.5): the numpy loop's caption is "b", the later row's, and so must the
    host side's be."""
    rows = {
        (): {"a": -1.25, "b": -0.5},
        ("a",): {"c": -0.25, "<end>": -2.25},
        ("b",): {"c": -0.25, "<end>": -2.0},
    }
    _best_place_to_end(rows, ["b"], -2.5, -1.25)


def test_a_later_place_to_end_tied_in_rank_and_log_probability_keeps_the_earlier():
    """No beam ever ends (every <end> ranks after both continuations) and the words run out
    after three: the caption is the best place to end. "a <end>" after the first word and
    "b c <end>" after the second tie exactly, in rank (-2.0 over 2 words, -3.0 over 3) and in
    the model's log-probability (-3.0 both): the earlier stays, as in the numpy loop, where a
    later one must rank strictly better."""
    _best_place_to_end(LATER_TIED_ENDING, ["a"], -3.0, -1.0)


def test_equal_candidates_and_endings_keep_the_numpy_order():
    """Beam 2: "a" and "b" tie as first words; then an ending ties with the beam's second
    continuation. Where the ending comes first among the candidates (its row is first) it
    finishes a hypothesis; where it comes after the second continuation the numpy loop never
    reaches it."""

    def run(ending_row):
        def rule(prefix):
            if not prefix:
                return {"a": -0.5, "b": -0.5}
            if len(prefix) == 1:
                return {"<end>": -0.5} if prefix[0] == ending_row else {"a": -0.5, "c": -0.5}
            return {"<end>": -0.1}

        want, got = _tables(rule, CaptionOptions(beam_size=2, max_length=4, n_best=2))
        _same(want, got)
        return [[WORDS[w] for w in h.tokens] for h in want[0]]

    assert ["a"] in run("a")  # <end> at candidate 0: before both continuations
    assert ["b"] not in run("b")  # <end> at candidate 2: after the second, never met


class _NaNStep:
    """A beam step whose log-probabilities went non-finite (an FP16 engine out of range)."""

    def step(self, tokens, source_rows, scores, word_bias, blocked_words):
        rows = len(tokens)
        ints, floats = np.zeros(rows, np.int32), np.zeros(rows, np.float32)
        return BeamStepResult(
            ints + 4,
            ints,
            ints,
            floats,
            floats,
            floats,
            ints + 5,
            np.full(rows, np.nan, np.float32),
            floats,
            floats,
        )


def test_non_finite_log_probabilities_fail_loudly():
    with pytest.raises(BackendError, match="non-finite log-probabilities at word 1"):
        graph_beam_search(_NaNStep(), 1, CaptionOptions(beam_size=2), 5, 3, START, END)


def _fold_like_tensorrt(model):
    """What TensorRT may do to a graph unless ``kSTRICT_NANS`` is set (NvInfer.h, BuilderFlag):
    x - x => 0, x / x => 1, 0 * x => 0, identities that are false for inf and NaN."""
    from onnx import helper

    zero = {t.name for t in model.graph.initializer if not onnx.numpy_helper.to_array(t).any()}
    nodes = []
    for node in model.graph.node:
        if node.op_type in ("Sub", "Div") and len(set(node.input)) == 1:
            x, value = node.input[0], 0.0 if node.op_type == "Sub" else 1.0
        elif node.op_type == "Mul" and any(i in zero for i in node.input):
            x, value = next((i for i in node.input if i not in zero), node.input[0]), 0.0
        else:
            nodes.append(node)
            continue
        shape = node.output[0] + "/shape"
        fill = helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [value])
        nodes += [
            helper.make_node("Shape", [x], [shape]),
            helper.make_node("ConstantOfShape", [shape], node.output, value=fill),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_the_finiteness_check_survives_tensorrts_nan_unsafe_folds(tiny, monkeypatch):
    """An FP16 engine's log-probabilities out of range fail loudly even after TensorRT's
    floating-point identities (the check must not be x - x, which TensorRT may make 0)."""
    import edgecap.backends.ort_beam as ort_beam

    manifest, _, _, images = tiny
    monkeypatch.setattr(ort_beam, "beam_step_model", lambda *a: _fold_like_tensorrt(beam_step_model(*a)))
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    encoded = graph.encode(images)
    encoded.tensors["h0"] = np.full_like(encoded.tensors["h0"], np.inf)  # the step's state gone bad
    vocab = manifest.dims.vocab_size
    with pytest.raises(BackendError, match="non-finite log-probabilities at word 1"):
        search_with_tags(graph, encoded, CaptionOptions(beam_size=3), START, END, vocab, (frozenset(),) * 3)


def test_search_must_be_host_or_graph(tiny):
    with pytest.raises(ValueError, match="search must be one of host, graph"):
        OnnxRuntimeBackend(tiny[0], device="cpu", search="device")


@pytest.fixture(scope="module")
def shipped(default_model_dir, example_images):
    """The shipped model's host and graph Captioners, and the example photos preprocessed."""
    host = Captioner(default_model_dir, backend="onnxruntime", threads=1)
    graph = Captioner(default_model_dir, backend="onnxruntime", threads=1, search="graph")
    batch = np.stack([preprocess([load_rgb(p)], host.manifest.preprocessing)[0] for p in example_images])
    return host, graph, batch


@pytest.mark.parametrize("lms_in_graph", [False, True], ids=["lms-on-host", "lms-in-graph"])
@pytest.mark.parametrize(
    "options",
    [{}, {"fusion_weight": 0.0}, {"n_best": 3, "length_penalty": 0.7}],
    ids=["default", "no-fusion", "n-best-3-penalty-0.7"],
)
def test_shipped_model_graph_search_gives_the_numpy_captions(shipped, options, lms_in_graph, monkeypatch):
    """The example photos with the default rules (the tag bonus, the fused language models with
    the gate, no repeated trigram) and two variations; the language models stepped in the graph
    (the default) and on the host."""
    from edgecap.decoding import search

    host, graph, batch = shipped
    monkeypatch.setattr(graph.backend._graph_search, "lms_in_graph", lms_in_graph)
    opts = replace(host.options, **options)
    vocab = host.vocab
    want = search(
        host.backend,
        host.backend.encode(batch),
        opts,
        vocab.start,
        vocab.end,
        len(vocab),
        host.classes,
        host.fusion,
    )
    got = search(
        graph.backend,
        graph.backend.encode(batch),
        opts,
        vocab.start,
        vocab.end,
        len(vocab),
        graph.classes,
        graph.fusion,
    )
    _same(want, got)


def test_constrained_search_and_attention_stay_on_the_host(shipped, example_images, monkeypatch):
    """The tag constraint and the attention maps are the numpy loop's: the graph search is not
    asked, and the captions (and maps) are the host Captioner's."""
    host, graph, _ = shipped

    def refuse(*args):
        raise AssertionError("the graph search was asked")

    monkeypatch.setattr(graph.backend, "_graph_search", refuse)
    photos = [str(p) for p in example_images[:2]]
    want = [host.caption(p, return_attention=True) for p in photos]
    got = [graph.caption(p, return_attention=True) for p in photos]
    assert [c.text for c in got] == [c.text for c in want]
    assert all(np.array_equal(a.attention, b.attention) for a, b in zip(got, want))
    for captioner in (host, graph):
        monkeypatch.setattr(captioner, "options", replace(captioner.options, constrained=True))
    assert [c.text for c in graph.caption_batch(photos)] == [c.text for c in host.caption_batch(photos)]


# -- TensorRT, with the fake TensorRT of tests/test_tensorrt_fake.py (its engines run the parsed
# ONNX on onnxruntime): the buffer bookkeeping, not real TensorRT ----------------------------


def _fake_tensorrt(monkeypatch, version):
    import sys

    from test_tensorrt_fake import FakeDevice, make_fake_trt

    device = FakeDevice()
    trt = make_fake_trt(version, device)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, device


def _fake_tensorrt_search(monkeypatch, version, manifest, precision, cache_dir, images, fusion=None):
    """One beam-2 graph search on a fresh fake TensorRT ``version`` (``fusion``: with those
    language models fused); returns that fake."""
    import io

    from edgecap.backends.tensorrt import TensorRTBackend

    trt, device = _fake_tensorrt(monkeypatch, version)
    options = CaptionOptions(beam_size=2, max_length=4, fusion_weight=None if fusion else 0.0)
    with TensorRTBackend(
        manifest,
        precision=precision,
        cache_dir=cache_dir,
        cuda_device=device,
        log=io.StringIO(),
        search="graph",
    ) as backend:
        vocab = manifest.dims.vocab_size
        search_with_tags(backend, backend.encode(images), options, START, END, vocab, None, fusion=fusion)
    return trt


def _fake_tensorrt_graph_backend(monkeypatch, cache_dir, manifest):
    """An FP32 TensorRT backend with search="graph" on a fresh fake TensorRT 10.3: (the fake,
    its device, the backend, the backend's log)."""
    import io

    from edgecap.backends.tensorrt import TensorRTBackend

    trt, device = _fake_tensorrt(monkeypatch, "10.3.0.26")
    log = io.StringIO()
    backend = TensorRTBackend(
        manifest, precision="fp32", cache_dir=cache_dir, cuda_device=device, log=log, search="graph"
    )
    return trt, device, backend, log


@pytest.mark.parametrize("part", ["fixed", "carried"])
def test_fake_tensorrt_beam_step_refuses_rules_it_was_not_built_for(monkeypatch, tmp_path, tiny, part):
    """Rules with an input the beam-step engine was not built with (a fixed one, or a carried
    state): one BackendError saying so at the search's first word, not a search over buffers
    the engine does not have; the backend still searches with the rules it was built for."""
    import edgecap.backends.tensorrt_beam as tensorrt_beam

    manifest, _, _, images = tiny
    _, _, backend, _ = _fake_tensorrt_graph_backend(monkeypatch, tmp_path, manifest)
    real = tensorrt_beam.graph_rules

    def surplus(*args, **kwargs):
        rules = real(*args, **kwargs)
        rows = len(rules.fixed["tag_bias"])
        return replace(rules, **{part: {**getattr(rules, part), "surplus": np.zeros((rows, 1), np.float32)}})

    options = CaptionOptions(beam_size=2, max_length=4, fusion_weight=0.0)
    vocab = manifest.dims.vocab_size
    with backend:
        monkeypatch.setattr(tensorrt_beam, "graph_rules", surplus)
        with pytest.raises(
            BackendError, match="the beam-step engine was given other rules than it was built for"
        ):
            search_with_tags(backend, backend.encode(images), options, START, END, vocab, None)
        monkeypatch.setattr(tensorrt_beam, "graph_rules", real)
        assert len(
            search_with_tags(backend, backend.encode(images), options, START, END, vocab, None)
        ) == len(images)


def test_fake_tensorrt_graph_search_gives_the_numpy_captions(monkeypatch, tmp_path, tiny):
    manifest, host, _, images = tiny
    trt, device, backend, log = _fake_tensorrt_graph_backend(monkeypatch, tmp_path, manifest)
    vocab = manifest.dims.vocab_size
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))
    searches = []
    for beam, ngram in ((1, 0), (3, 3), (5, 1)):
        options = CaptionOptions(beam_size=beam, no_repeat_ngram=ngram, n_best=beam, max_length=10)
        want = search_with_tags(host, host.encode(images), options, START, END, vocab, tags)
        encoded = backend.encode(images)
        before, runs = dict(device.calls), len(trt.stats["executions"])
        got = search_with_tags(backend, encoded, options, START, END, vocab, tags)
        _same(want, got)
        steps = len(trt.stats["executions"]) - runs
        assert device.calls["sync"] - before["sync"] == steps  # one sync a word
        assert device.calls["dtoh"] - before["dtoh"] == 10 * steps  # ten (R,) results
        searches.append(trt.stats["executions"][runs:])
        if ngram == 0:  # the last step blocked no word (only the first word has blocks)
            last = searches[-1][-1]
            rows = encoded.n_images * beam
            with device.active():
                assert (device.read(last["blocked_words"], (rows, MAX_BLOCKED), np.int32) == -1).all()
    assert "beam-step engine (5 beams)" in log.getvalue()
    assert backend.describe().endswith("; beam bookkeeping in the engine")
    for runs in searches:
        # h / c ping-pong: the first step reads the encoder's h0, each next one what the last
        # wrote, never in place
        assert runs[0]["h"] == trt.stats["executions"][0]["h0"]
        assert [e["h"] for e in runs[1:]] == [e["h_next"] for e in runs[:-1]]
        assert all(e["h"] != e["h_next"] and e["c"] != e["c_next"] for e in runs)
        # the tag bonus's rows still steered likewise, in the engine's two sets
        assert [e["steered"] for e in runs[1:]] == [e["steered_next"] for e in runs[:-1]]
        assert all(e["steered"] != e["steered_next"] for e in runs)
    backend.close()
    assert device.memory == {} and device.pinned == [] and device.streams == []


def test_fake_tensorrt_beam_step_sets_an_address_only_when_it_changes(monkeypatch, tmp_path, tiny):
    """The context keeps its tensors' addresses between runs: after a search's first word a
    word sets only those that alternate (h / c and the rows still steered, read from one set
    and written to the other), and a second search on the same engine sets nothing its first
    word reads from where the last search left it; its captions are the numpy search's."""
    manifest, host, _, images = tiny
    trt, device, backend, log = _fake_tensorrt_graph_backend(monkeypatch, tmp_path, manifest)
    vocab = manifest.dims.vocab_size
    options = CaptionOptions(beam_size=3, no_repeat_ngram=3, max_length=10)
    want = search_with_tags(host, host.encode(images), options, START, END, vocab, None)
    _same(want, search_with_tags(backend, backend.encode(images), options, START, END, vocab, None))
    [engine] = backend._graph_search._engines.values()
    words: list[list[str]] = []
    real_set, real_run = engine.context.set_tensor_address, engine.context.execute_async_v3
    monkeypatch.setattr(
        engine.context, "set_tensor_address", lambda name, ptr: words[-1].append(name) or real_set(name, ptr)
    )
    monkeypatch.setattr(
        engine.context, "execute_async_v3", lambda handle: words.append([]) or real_run(handle)
    )
    words.append([])  # the first word's, before its run
    _same(want, search_with_tags(backend, backend.encode(images), options, START, END, vocab, None))
    words.pop()  # (after the last run)
    alternating = {"h", "c", "h_next", "c_next", "steered", "steered_next"}
    assert len(words) > 3 and all(set(names) <= alternating for names in words)
    assert all(len(names) == len(set(names)) for names in words)
    assert all(set(names) == alternating for names in words[1:])  # each word's, set once
    backend.close()


def test_fake_tensorrt_engine_steps_the_language_models(monkeypatch, tmp_path, tiny):
    """With the language models fused, the beam-step engine steps them (an engine of its own,
    named by their weights): the numpy search's captions, their states in two sets of device
    buffers used in turn (a step reads what the last wrote, never in place; each search starts
    from zeros), the row weights on the device, and no language model on the host."""
    from edgecap.decoding.fusion import FusionScorer

    manifest, host, _, images = tiny
    trt, device, backend, log = _fake_tensorrt_graph_backend(monkeypatch, tmp_path, manifest)
    vocab = manifest.dims.vocab_size
    rng = np.random.default_rng(9)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab, hidden=5), 0.5, {})  # two widths
    tags = (frozenset({5, 9}), frozenset(), frozenset({11}))
    options = CaptionOptions(
        beam_size=3, no_repeat_ngram=2, n_best=3, max_length=10, guidance_bonus=2.0, fusion_weight=0.6
    )
    want = search_with_tags(host, host.encode(images), options, START, END, vocab, tags, fusion=fusion)
    monkeypatch.setattr(FusionScorer, "bias", lambda *a: pytest.fail("the host stepped a language model"))
    searches = []
    for _ in range(2):  # the second search on the same engine and buffers
        runs = len(trt.stats["executions"])
        got = search_with_tags(
            backend, backend.encode(images), options, START, END, vocab, tags, fusion=fusion
        )
        _same(want, got)
        searches.append([e for e in trt.stats["executions"][runs:] if "lm_weights" in e])
    assert "beam-step engine (3 beams, the language models in it)" in log.getvalue()
    assert len([p for p in tmp_path.glob("beam_step3-*.engine") if "-lm" in p.name]) == 1
    for runs in searches:
        assert len(runs) > 2
        for name in ("everyday_h", "everyday_c", "in_domain_h", "in_domain_c"):
            assert [e[name] for e in runs[1:]] == [e[f"{name}_next"] for e in runs[:-1]]
            assert all(e[name] != e[f"{name}_next"] for e in runs)
    assert searches[0][0]["everyday_h"] == searches[1][0]["everyday_h"]  # each starts from zeros
    rows = len(images) * 3
    with device.active():
        weights = device.read(searches[1][0]["lm_weights"], (rows, 1), np.float32)
    np.testing.assert_array_equal(weights, np.full((rows, 1), 0.6, np.float32))
    backend.close()
    assert device.memory == {} and device.pinned == [] and device.streams == []


def test_fake_tensorrt_close_waits_for_a_failed_beam_step_before_freeing_its_buffers(
    monkeypatch, tmp_path, tiny
):
    """A beam step that fails after its engine was launched (here: the copy of its results)
    leaves work on the stream that reads and writes the beam-step engine's buffers; close()
    must synchronise the stream before it frees them."""
    import io

    from edgecap.backends.tensorrt import TensorRTBackend

    trt, device = _fake_tensorrt(monkeypatch, "10.3.0.26")
    manifest, _, _, images = tiny
    backend = TensorRTBackend(
        manifest, precision="fp32", cache_dir=tmp_path, cuda_device=device, log=io.StringIO(), search="graph"
    )
    encoded = backend.encode(images)
    events = []

    def failed_copy(dst, src, stream):
        raise BackendError("CUDA error while copying from the GPU: launch failed")

    monkeypatch.setattr(device, "copy_to_host", failed_copy)
    with pytest.raises(BackendError, match="copying from the GPU"):
        options = CaptionOptions(beam_size=2, max_length=4)
        search_with_tags(backend, encoded, options, START, END, manifest.dims.vocab_size, None)
    sync, free = device.synchronize, device.free
    monkeypatch.setattr(device, "synchronize", lambda stream: (events.append("sync"), sync(stream)))
    monkeypatch.setattr(device, "free", lambda ptr: (events.append("free"), free(ptr)))
    backend.close()
    assert events and events[0] == "sync", events[:3]
    assert device.memory == {} and device.pinned == [] and device.streams == []


def test_fake_tensorrt_fp16_keeps_the_bookkeeping_in_fp32(monkeypatch, tmp_path, tiny):
    """TensorRT < 10.12 (BuilderFlag.FP16): the appended layers are pinned to FP32; 10.12+
    (strongly typed FP16 ONNX): the appended nodes read the step's float32 outputs."""
    manifest, _, _, images = tiny
    vocab = manifest.dims.vocab_size
    rng = np.random.default_rng(1)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.5, {})
    for version, typed in (("10.3.0.26", False), ("10.12.0.36", True)):
        for lms in (None, fusion):  # the language models' step in the graph too: FP32 as well
            cache = tmp_path / version / ("lm" if lms else "plain")
            trt = _fake_tensorrt_search(monkeypatch, version, manifest, "fp16", cache, images, lms)
            build = trt.stats["builds"][-1]
            assert "scores" in build["profile"] and ("lm_weights" in build["profile"]) == bool(lms)
            model = onnx.load_from_string(build["onnx"])
            assert build["fp16_weights"] == typed
            inferred = onnx.shape_inference.infer_shapes(model).graph
            types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
            appended = [n for n in model.graph.node if n.name.startswith("beam/")]
            assert onnx.TensorProto.FLOAT16 not in {types.get(o) for n in appended for o in n.output}
            if lms:
                assert len([n for n in appended if n.name.startswith("beam/lm/")]) == 2 * 18 + 2
            if not typed:
                assert build["pinned"].count("other") >= 10
                if lms:
                    pinned = set(build["pinned_outputs"])
                    for role in ("everyday", "in_domain"):
                        assert {f"beam/lm/{role}_logits", f"beam/lm/{role}_log_p"} <= pinned
                    assert {"beam/bias", "end_biases", "next_biases", "everyday_h_next"} <= pinned


def test_fake_tensorrt_a_new_beam_step_version_rebuilds_the_cached_graph(monkeypatch, tmp_path, tiny):
    """The cached beam-step ONNX and engine are reused while the appended graph is the same, and
    rebuilt (not silently reused) by an edgecap whose ``BEAM_STEP_VERSION`` differs."""
    from edgecap.build import beam_step

    manifest, _, _, images = tiny
    prepared = []
    real = beam_step.beam_step_model
    monkeypatch.setattr(beam_step, "beam_step_model", lambda *a: prepared.append(1) or real(*a))

    def caption_once():
        trt = _fake_tensorrt_search(monkeypatch, "10.3.0.26", manifest, "fp32", tmp_path, images)
        return len(trt.stats["builds"])

    first = caption_once()  # the encoder, the step and the beam-step engines
    assert first == 3 and len(prepared) == 1
    assert caption_once() == 0 and len(prepared) == 1  # all from the cache
    monkeypatch.setattr(beam_step, "BEAM_STEP_VERSION", beam_step.BEAM_STEP_VERSION + 1)
    assert caption_once() == 1 and len(prepared) == 2  # the beam-step graph and engine, anew
    assert caption_once() == 0 and len(prepared) == 2


def test_fake_tensorrt_close_releases_the_beam_step_engine_and_context(monkeypatch, tmp_path, tiny):
    """close() lets go of the beam-step engine and its execution context, even while something
    still holds the beam-step object (a search's session), before the device is released."""
    import gc
    import io
    import weakref

    from edgecap.backends.tensorrt import TensorRTBackend

    trt, device = _fake_tensorrt(monkeypatch, "10.3.0.26")
    manifest, _, _, images = tiny
    backend = TensorRTBackend(
        manifest, precision="fp32", cache_dir=tmp_path, cuda_device=device, log=io.StringIO(), search="graph"
    )
    options = CaptionOptions(beam_size=2, max_length=4)
    search_with_tags(backend, backend.encode(images), options, START, END, manifest.dims.vocab_size, None)
    held = backend._graph_search.engine(2, END)  # what a session of that search holds
    engine, context = weakref.ref(held.context.engine), weakref.ref(held.context)
    backend.close()
    gc.collect()
    assert engine() is None and context() is None
    assert device.memory == {} and device.pinned == []
    with pytest.raises(BackendError, match="closed"):
        held.bind("scores", 0)


def _graph_search_as_host(manifest, host, images) -> None:
    """onnxruntime's graph search (search="graph") gives ``host``'s hypotheses on ``images``,
    with no language models and with them (two beam-step graphs: the second steps them)."""
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    vocab = manifest.dims.vocab_size
    rng = np.random.default_rng(7)
    fusion = Fusion(_random_lm(rng, vocab), _random_lm(rng, vocab), 0.6, {})
    for weight in (0.0, 0.6):
        options = CaptionOptions(beam_size=3, n_best=3, max_length=8, fusion_weight=weight)
        want = search_with_tags(host, host.encode(images), options, START, END, vocab, None, fusion=fusion)
        got = search_with_tags(graph, graph.encode(images), options, START, END, vocab, None, fusion=fusion)
        _same(want, got)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_a_step_graph_of_opset_18_gives_the_numpy_captions(tiny, monkeypatch, opset):
    """ReduceMax takes its axes as an input from opset 18 (the attribute is gone there): a step
    graph converted to opset 18 gets a valid beam-step graph with the numpy loop's captions; so
    does one of opset 13, the least it takes (the docs' "axes as inputs"). onnx has no adapter
    down to 13 (Shape's, from 15), but each op the tiny step uses means the same at 13 as at
    its 17: that one is the step relabelled (Reshape's allowzero=0, from 14, is 13's rule)."""
    from onnx import version_converter

    from edgecap.backends import ort_beam

    manifest, host, _, images = tiny
    real = ort_beam.beam_step_model
    converted = []

    def at_opset(step, *args):
        if opset == 13:
            step = onnx.ModelProto.FromString(step.SerializeToString())
            (imported,) = [o for o in step.opset_import if o.domain in ("", "ai.onnx")]
            imported.version = 13
            for node in step.graph.node:
                kept = [a for a in node.attribute if not (a.name == "allowzero" and a.i == 0)]
                del node.attribute[:]
                node.attribute.extend(kept)
            onnx.checker.check_model(step, full_check=True)
        else:
            step = version_converter.convert_version(step, opset)
        model = real(step, *args)
        converted.append([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")])
        return model

    monkeypatch.setattr(ort_beam, "beam_step_model", at_opset)
    _graph_search_as_host(manifest, host, images)
    assert converted == [[opset], [opset]]  # without and with the language models


def test_a_step_graph_before_opset_13_is_refused_naming_its_opset(tiny):
    manifest = tiny[0]
    dims = manifest.dims
    step = onnx.load(str(manifest.path("decoder_step")))
    for imported in step.opset_import:
        if imported.domain in ("", "ai.onnx"):
            imported.version = 12
    with pytest.raises(BackendError, match="opset is 12; the beam-step graph needs opset 13"):
        beam_step_model(step, 3, END, dims.top_k, dims.hidden_dim, dims.vocab_size)


def test_search_graph_without_onnx_fails_when_the_backend_is_made(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx: ImportError
    with pytest.raises(BackendError, match=r"onnx package: pip install onnx$"):
        OnnxRuntimeBackend(tiny[0], device="cpu", threads=1, search="graph")
    OnnxRuntimeBackend(tiny[0], device="cpu", threads=1)  # the host search needs no onnx


def test_threads_that_ask_for_a_new_beam_size_at_once_share_one_beam_step_session(tiny, monkeypatch):
    """The onnxruntime backend is thread-safe: four threads that start a search at a beam size
    not seen yet get one session between them, built once, not one each."""
    import threading
    import time

    from edgecap.backends import ort_beam

    manifest = tiny[0]
    real = ort_beam.beam_step_model
    built = []

    def slow(*args):
        built.append(args[1])
        time.sleep(0.2)  # every thread reaches the check while the first one is still building
        return real(*args)

    monkeypatch.setattr(ort_beam, "beam_step_model", slow)
    graph = OnnxRuntimeBackend(manifest, device="cpu", threads=1, search="graph")
    start = threading.Barrier(4)
    sessions = []

    def ask():
        start.wait()
        sessions.append(graph._graph_search.session(3, END))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == [3]
    assert len(sessions) == 4 and all(s is sessions[0] for s in sessions)


# -- the beam-step graph alone, on a contract-shaped step graph (quick) ----------------------


@pytest.fixture(scope="module")
def small_step(tmp_path_factory):
    """``helpers.contract_model_dir``'s step graph (K = 5, V = 20, Hd = 10, 4 regions) and
    manifest."""
    from helpers import contract_model_dir

    manifest = load_manifest(contract_model_dir(tmp_path_factory.mktemp("small") / "model"))
    step = onnx.load(str(manifest.path("decoder_step")))
    for node in step.graph.node:  # its attention logits are named like the beam graph's input
        node.input[:] = ["att_scores" if name == "scores" else name for name in node.input]
        node.output[:] = ["att_scores" if name == "scores" else name for name in node.output]
    return step, manifest


def test_the_beam_step_graph_does_the_loops_bookkeeping(small_step):
    """Two images, beam 2 (each row offers its first 3 words), on hand-set biases: row 0 has
    <end> first (it never continues; its place 0), row 1 has word 7 first (blocked for that row)
    and <end> second, rows 2 and 3 have no <end> in their top 5 (place K = 5, log-prob -inf).
    The expected values follow the module's description, worked in numpy from the plain step's
    outputs on the same inputs."""
    import onnxruntime as ort

    step, manifest = small_step
    dims = manifest.dims
    K, V, beam, width = dims.top_k, dims.vocab_size, 2, 3
    rng = np.random.default_rng(4)
    rows = 4
    feeds = {
        "tokens": rng.integers(3, V, rows).astype(np.int32),
        "h": rng.normal(size=(rows, dims.hidden_dim)).astype(np.float32),
        "c": rng.normal(size=(rows, dims.hidden_dim)).astype(np.float32),
        "source_rows": np.array([1, 0, 3, 3], np.int32),
        "features": rng.normal(size=(2, dims.regions, dims.feature_dim)).astype(np.float32),
        "att_proj": rng.normal(size=(2, dims.regions, dims.attention_dim)).astype(np.float32),
        "image_index": np.array([0, 0, 1, 1], np.int32),
        "word_bias": np.zeros((rows, V), np.float32),
    }
    feeds["word_bias"][0, END] = 50.0
    feeds["word_bias"][1, [7, END]] = [60.0, 50.0]
    feeds["word_bias"][2:, END] = -50.0
    feeds["word_bias"][3, 9] = 1.5
    scores = np.array([-1.0, -2.0, -0.5, -np.inf], np.float32)  # row 3: a finished beam
    block = np.full((rows, MAX_BLOCKED), -1, np.int32)  # the ids a row may not take, -1 past them
    block[1, :2] = [19, 19]  # row 1: 19 (not among its candidates), and in the last place word 7
    block[1, -1] = 7
    block[3, 0] = 7  # another row's block: not row 1's

    plain = ort.InferenceSession(step.SerializeToString(), providers=["CPUExecutionProvider"])
    lp, ids, h_out, c_out, _ = plain.run(None, feeds)
    graph = beam_step_model(step, beam, END, K, dims.hidden_dim, V)
    assert [i.name for i in graph.graph.input] == list(BEAM_INPUTS)
    assert [o.name for o in graph.graph.output] == list(BEAM_OUTPUTS)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    no_tags = {"tag_bias": np.zeros((rows, V), np.float32), "steered": np.zeros(rows, np.float32)}
    got = dict(
        zip(BEAM_OUTPUTS, session.run(None, {**feeds, "scores": scores, "blocked_words": block, **no_tags}))
    )

    assert ids[0, 0] == END and ids[1, 0] == 7 and ids[1, 1] == END and not (ids[2:] == END).any()
    np.testing.assert_array_equal(got["end_positions"], [0, 1, K, K])
    np.testing.assert_array_equal(got["end_logprobs"][:2], [lp[0, 0], lp[1, 1]])
    assert (got["end_logprobs"][2:] == -np.inf).all()
    np.testing.assert_array_equal(got["logprob_check"], np.zeros(rows, np.float32))
    # the candidates: running score + log-prob + bias; <end> and blocked words never continue
    ranked = scores[:, None] + (lp + np.take_along_axis(feeds["word_bias"], ids.astype(np.int64), 1))
    going = ranked[:, :width].copy()
    going[ids[:, :width] == END] = -np.inf
    going[1, 0] = -np.inf  # word 7, blocked for row 1
    going = going.reshape(2, beam * width)
    choice = np.argsort(-going, axis=1, kind="stable")[:, :beam]
    np.testing.assert_array_equal(got["choices"], choice.reshape(-1))
    pointers = (np.array([[0], [2]]) + choice // width).reshape(-1)
    np.testing.assert_array_equal(got["back_pointers"], pointers)
    assert (pointers[2:] == 2).all()  # image 1's finished row 3 offers nothing
    pick = lambda a: np.take_along_axis(a[:, :width].reshape(2, -1), choice, 1).reshape(-1)  # noqa: E731
    np.testing.assert_array_equal(got["next_tokens"], pick(ids))
    np.testing.assert_array_equal(got["next_scores"], np.take_along_axis(going, choice, 1).reshape(-1))
    np.testing.assert_array_equal(got["next_logprobs"], pick(lp))  # without the bias
    np.testing.assert_array_equal(got["h_next"], h_out[pointers])
    np.testing.assert_array_equal(got["c_next"], c_out[pointers])
    # the bias the host sums from: <end>'s and the chosen word's; no tag bonus, no row steered
    np.testing.assert_array_equal(got["end_biases"], feeds["word_bias"][:, END])
    np.testing.assert_array_equal(got["next_biases"], feeds["word_bias"][pointers, got["next_tokens"]])
    np.testing.assert_array_equal(got["steered_next"], np.zeros(rows, np.float32))


def _two_images(rng, dims) -> dict:
    """A step's inputs for two images of two rows each (the state already reordered: source
    rows the identity), random, with a random host bias."""
    rows = 4
    return {
        "tokens": rng.integers(3, dims.vocab_size, rows).astype(np.int32),
        "h": rng.normal(size=(rows, dims.hidden_dim)).astype(np.float32),
        "c": rng.normal(size=(rows, dims.hidden_dim)).astype(np.float32),
        "source_rows": np.arange(rows, dtype=np.int32),
        "features": rng.normal(size=(2, dims.regions, dims.feature_dim)).astype(np.float32),
        "att_proj": rng.normal(size=(2, dims.regions, dims.attention_dim)).astype(np.float32),
        "image_index": np.array([0, 0, 1, 1], np.int32),
        "word_bias": rng.normal(scale=0.5, size=(rows, dims.vocab_size)).astype(np.float32),
    }


def test_the_beam_step_graph_applies_the_tag_bonus_as_the_host_would(small_step):
    """The tag bonus in the graph: the graph given the tag rows and the rows still steered is
    the graph given the host's bias + the host's ``TagBonus.bias``, and a row goes on steered as
    ``TagBonus.update`` says (its source row was, it continues, its word is no tag word).
    Expected values: the graph without tags given the summed bias, and ``TagBonus`` itself."""
    import onnxruntime as ort

    from edgecap.decoding.rules import TagBonus

    step, manifest = small_step
    dims = manifest.dims
    K, V, beam, rows = dims.top_k, dims.vocab_size, 2, 4
    rng = np.random.default_rng(12)
    model = beam_step_model(step, beam, END, K, dims.hidden_dim, V)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        **_two_images(rng, dims),
        "scores": np.array([-1.0, -2.0, -0.5, -np.inf], np.float32),  # row 3: a finished beam
        "blocked_words": np.full((rows, MAX_BLOCKED), -1, np.int32),
    }
    names = [o.name for o in model.graph.output]
    untagged = {"tag_bias": np.zeros((rows, V), np.float32), "steered": np.zeros(rows, np.float32)}
    probe = dict(zip(names, session.run(None, {**feeds, **untagged})))
    # each image's tag words: two of the words its rows would take, so that some row says one
    chosen = probe["next_tokens"]
    words = (frozenset({int(chosen[0]), 3}), frozenset({int(chosen[2]), int(chosen[3])}))
    bonus = TagBonus(words, V, 6.0, feeds["image_index"])
    bonus.steered = np.array([True, False, True, True])  # row 1 said a tag word already
    tagged = {"tag_bias": bonus.row_bias, "steered": bonus.steered.astype(np.float32)}
    got = dict(zip(names, session.run(None, {**feeds, **tagged})))
    summed = feeds["word_bias"] + bonus.bias(1, feeds["tokens"], feeds["source_rows"])
    want = dict(zip(names, session.run(None, {**feeds, "word_bias": summed, **untagged})))
    for name in names:
        if name != "steered_next":
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (
        got["end_biases"].any()
        and (got["next_biases"] != feeds["word_bias"][got["back_pointers"], got["next_tokens"]]).any()
    )
    live = got["next_scores"] != -np.inf
    bonus.update(got["back_pointers"], got["next_tokens"], live)
    np.testing.assert_array_equal(got["steered_next"], bonus.steered.astype(np.float32))
    assert got["steered_next"].any() and not got["steered_next"].all()
    # a done image (every row masked): its rows, steered before, are not steered on (though
    # the words they stand on are no tag words: no tags for it here)
    done = {**feeds, "scores": np.array([-1.0, -2.0, -np.inf, -np.inf], np.float32)}
    tag_rows, steered = bonus.row_bias.copy(), np.ones(rows, np.float32)
    tag_rows[2:] = 0.0
    got = dict(zip(names, session.run(None, {**done, "tag_bias": tag_rows, "steered": steered})))
    assert (got["next_scores"][2:] == -np.inf).all()
    np.testing.assert_array_equal(got["steered_next"][2:], [0.0, 0.0])


def test_the_beam_step_graph_steps_the_language_models_as_the_host_would(small_step):
    """With the language models in it, the graph is the plain beam-step graph given the host's
    bias + their weighted density ratio (as the host's language-model session computes it), and
    it returns that bias at each row's <end> and chosen word and their next states reordered by
    the back-pointers. Expected values: the plain graph and the host's session (OnnxPairStep)
    on the same inputs."""
    import onnxruntime as ort

    from edgecap.build.beam_step import LM_INPUTS, LM_OUTPUTS, beam_io
    from edgecap.decoding.fusion_graph import OnnxPairStep

    step, manifest = small_step
    dims = manifest.dims
    K, V, beam, rows = dims.top_k, dims.vocab_size, 2, 4
    rng = np.random.default_rng(11)
    everyday, in_domain = _random_lm(rng, V), _random_lm(rng, V)
    feeds = {
        **_two_images(rng, dims),
        "scores": np.array([-1.0, -2.0, -0.5, -3.0], np.float32),
        "blocked_words": np.concatenate(
            [
                rng.integers(0, V, size=(rows, 3), dtype=np.int32),
                np.full((rows, MAX_BLOCKED - 3), -1, np.int32),
            ],
            1,
        ),
        "tag_bias": np.zeros((rows, V), np.float32),  # the tag bonus: its own test
        "steered": np.zeros(rows, np.float32),
    }
    weights = np.array([[0.7], [0.7], [0.0], [0.3]], np.float32)  # image 1's rows: 0 and 0.3
    states = [tuple(rng.normal(size=(rows, 8)).astype(np.float32) for _ in "hc") for _ in "ei"]
    ratio, next_states = OnnxPairStep(everyday, in_domain)(feeds["tokens"], states, weights)
    np.testing.assert_array_equal(ratio[2], 0.0)  # row 2: weight 0, a bias of 0
    assert (ratio[[0, 1, 3]] != 0).all()

    def run(model, feed):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in model.graph.output], session.run(None, feed)))

    plain = run(
        beam_step_model(step, beam, END, K, dims.hidden_dim, V),
        {**feeds, "word_bias": feeds["word_bias"] + ratio},
    )
    fused_model = beam_step_model(step, beam, END, K, dims.hidden_dim, V, lms=(everyday, in_domain))
    assert ([i.name for i in fused_model.graph.input], [o.name for o in fused_model.graph.output]) == tuple(
        list(names) for names in beam_io(True)
    )
    state_feed = dict(zip(LM_INPUTS[1:], [a for pair in states for a in pair]))
    got = run(fused_model, {**feeds, "lm_weights": weights, **state_feed})
    for name in BEAM_OUTPUTS:  # the same search step as the plain graph given the summed bias
        np.testing.assert_array_equal(got[name], plain[name], err_msg=name)
    total = feeds["word_bias"] + ratio
    pointers, words = plain["back_pointers"], plain["next_tokens"]
    np.testing.assert_array_equal(got["end_biases"], total[:, END])
    np.testing.assert_array_equal(got["next_biases"], total[pointers, words])
    want_states = [a[pointers] for pair in next_states for a in pair]
    for name, want in zip(LM_OUTPUTS, want_states):
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("beam", [0, 6])
def test_a_beam_outside_one_to_k_is_refused(small_step, beam):
    step, manifest = small_step
    dims = manifest.dims  # K = 5
    with pytest.raises(ValueError, match=r"beam must be between 1 and the model's top_k \(5\)"):
        beam_step_model(step, beam, END, dims.top_k, dims.hidden_dim, dims.vocab_size)


def test_the_beam_step_profile_takes_a_score_and_blocked_words_for_every_row():
    """The rows of a search with 2 beams: 2 an image, 1 or 2 images (the limits' 3 beams do not
    count): min and opt 2 (one image), max 4, so the graph's reshape of the rows to (-1, 2)
    holds at the opt shapes, which TensorRT's builder checks (NVIDIA/TensorRT issues 3405, 3916:
    "kOPT values for profile 0 violate shape constraints"). h / c also take the first step's
    one row an image."""
    from edgecap.build.beam_step import row_ranges
    from edgecap.contract import Limits

    ranges = row_ranges(Limits(max_batch=2, max_beam=3), beam=2)
    assert ranges["scores"] == ranges["blocked_words"] == ranges["tokens"] == (2, 2, 4)
    assert ranges["source_rows"] == ranges["image_index"] == ranges["word_bias"] == (2, 2, 4)
    assert ranges["h"] == ranges["c"] == (1, 2, 4)
    assert ranges["features"] == ranges["att_proj"] == (1, 1, 2)
    # the language models' weights and states: a row a beam from the first step (zeros then)
    from edgecap.build.beam_step import LM_INPUTS, beam_io

    with_lms = row_ranges(Limits(max_batch=2, max_beam=3), beam=2, lms=True)
    assert set(with_lms) == set(beam_io(True)[0]) and set(ranges) == set(beam_io(False)[0])
    assert {with_lms[name] for name in LM_INPUTS} == {(2, 2, 4)}


def test_the_language_models_digest_names_their_weights():
    """Cached beam-step graphs and engines with the language models in them are named by a
    digest of their weights: the same weights, the same name; one changed weight, another."""
    from edgecap.build.beam_step import lm_tag

    rng = np.random.default_rng(2)
    everyday, in_domain = _random_lm(rng, 20), _random_lm(rng, 20)
    again = CaptionLM({k: v.copy() for k, v in everyday.arrays.items()})
    assert lm_tag((everyday, in_domain)) == lm_tag((again, in_domain))
    again.arrays["out_b"][3] += 1e-3
    assert lm_tag((everyday, in_domain)) != lm_tag((again, in_domain))
    assert lm_tag((everyday, in_domain)) != lm_tag((in_domain, everyday))


def test_a_step_graph_of_opset_13_gives_the_numpy_captions(tiny, monkeypatch):
    """Opset 13 is the first the beam-step graph takes (Unsqueeze, Slice and ReduceSum with their
    axes as inputs; the module's MIN_OPSET and the refusal's message): the tiny model's opset-17
    step graph declared opset 13 (it uses nothing newer but Reshape's allowzero, here 0, its
    default, so dropped) is taken and captions as the numpy loop does."""
    from edgecap.backends import ort_beam

    manifest, host, _, images = tiny
    real = ort_beam.beam_step_model
    built = []

    def at_opset_13(step, *args):
        step = onnx.ModelProto.FromString(step.SerializeToString())
        for imported in step.opset_import:
            if imported.domain in ("", "ai.onnx"):
                imported.version = 13
        for node in step.graph.node:
            for attribute in [a for a in node.attribute if a.name == "allowzero"]:
                assert attribute.i == 0
                node.attribute.remove(attribute)
        onnx.checker.check_model(step)
        model = real(step, *args)
        built.append([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")])
        return model

    monkeypatch.setattr(ort_beam, "beam_step_model", at_opset_13)
    _graph_search_as_host(manifest, host, images)
    assert built == [[13], [13]]  # without and with the language models


def test_the_beam_step_graph_declares_its_inputs_and_outputs_shapes(small_step):
    """As the module describes them: R rows (dynamic), ``blocked_words`` (R, ``MAX_BLOCKED``),
    every result (R,) but the reordered state, (R, Hd); the step's own inputs as the step graph
    declares them."""
    step, manifest = small_step
    dims = manifest.dims  # K = 5, V = 20, Hd = 10
    model = beam_step_model(step, 2, END, dims.top_k, dims.hidden_dim, dims.vocab_size)

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    declared = shapes(model.graph.output)
    assert declared == {name: ["r", 10] if name in ("h_next", "c_next") else ["r"] for name in BEAM_OUTPUTS}
    inputs = shapes(model.graph.input)
    assert inputs["scores"] == inputs["steered"] == ["r"]
    assert inputs["tag_bias"] == ["r", 20] and inputs["blocked_words"] == ["r", MAX_BLOCKED] == ["r", 200]
    appended = ("scores", "blocked_words", "tag_bias", "steered")
    assert {k: v for k, v in inputs.items() if k not in appended} == shapes(step.graph.input)
