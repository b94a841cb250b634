"""The beam search on the device (``edgecap.decoding.device``) against the numpy loop
(``edgecap.decoding.beam``), run here on torch CPU tensors: the same captions, finished flags and
scores. The numpy loop is the reference: the expected hypotheses come from it, not from the code
under test.

Three drivers: fake backends through ``SessionStep`` (random prefix-hash models over many
settings, and hand-made tables for the rare paths: no beam ever ends, every continuation
blocked), the shipped model on the example photos through the torch backend, and the
whole-decode graph (``DecodeGraphs``) with ``EagerGraph`` standing in for a CUDA graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.base import Backend  # noqa: E402
from edgecap.backends.torch import TorchBackend  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from edgecap.backends.torch_search import TorchDeviceSearch, checked_search  # noqa: E402
from edgecap.decoding import device as device_module  # noqa: E402
from edgecap.decoding.device import DECODE_CHECKS  # noqa: E402
from edgecap.decoding import CaptionOptions, search, search_with_tags  # noqa: E402
from edgecap.decoding.device import (  # noqa: E402
    MAX_GRAPHS,
    DeviceBeamSearch,
    Rules,
    SessionStep,
    TorchStep,
    rules_for,
)
from edgecap.decoding.fusion import CaptionLM, Fusion  # noqa: E402
from edgecap.errors import BackendError  # noqa: E402
from edgecap.images import load_rgb, preprocess  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402
from fakes import END, START, PrefixHashBackend  # noqa: E402
from helpers import (  # noqa: E402
    END_TIED_WITH_THE_LAST_CONTINUATION,
    LATER_TIED_ENDING,
    TableBackend,
    captioner_search,
)


def _device(
    backend: Backend,
    encoded,
    options,
    tag_words=None,
    fusion=None,
    fixed=False,
    vocab_size=None,
    endings=False,
    wrap=lambda step: step,
):
    """The device search over ``backend``'s own session (one host round trip per step);
    ``wrap``: the step -> the step the search drives. ``fixed``: False (the early-exit loop),
    True (the fixed-shape masked one), CHECKED (the fixed one reading "all done?" after the
    steps of ``DECODE_CHECKS``, as on a GPU) or NUMBERED (the fixed loop as ``compile_search``
    runs it, every step after the first told its number as a tensor only, run here
    uncompiled)."""
    vocab_size = vocab_size or backend.vocab_size
    rules = rules_for(options, encoded.n_images, tag_words, fusion, encoded.class_probs)
    search = DeviceBeamSearch(
        vocab_size, torch.device("cpu"), compiled=fixed == NUMBERED, fused=fixed == FUSED
    )
    with mock.patch.object(device_module, "_compiled_step", lambda: device_module._step):
        return search.search(
            lambda index: wrap(SessionStep(backend.start(encoded, index.numpy()))),
            encoded.n_images,
            options,
            backend.top_k,
            START,
            END,
            rules,
            fixed=bool(fixed),
            endings=endings,
            checks=DECODE_CHECKS if fixed == CHECKED else (),
        )


NUMBERED, CHECKED, FUSED = "numbered", "checked", "fused"  # see _device
# the fused search's kernel runs on CPU tensors in Triton's interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 unless told otherwise: benchmarks/gpu_check.py runs the gpu tests with 0)
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the fused search needs triton")
LOOPS = [False, True, CHECKED, NUMBERED] + ([FUSED] if HAS_TRITON else [])


def _same(host, device, exact: bool = True):
    for want, got in zip(host, device, strict=True):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.finished for h in got] == [h.finished for h in want]
        for a, b in zip(want, got):
            if exact:  # the same float64 sums of the same float32 step outputs
                assert (b.log_prob, b.score, b.rank_score) == (a.log_prob, a.score, a.rank_score)
            else:
                assert b.score == pytest.approx(a.score, abs=1e-5)
                assert b.rank_score == pytest.approx(a.rank_score, abs=1e-5)


def _lm(rng, vocab: int, hidden: int = 8, embed: int = 6) -> CaptionLM:
    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return CaptionLM(
        {
            "embed": normal(vocab, embed),
            "w_ih": normal(4 * hidden, embed),
            "w_hh": normal(4 * hidden, hidden) * 0.5,
            "bias": normal(4 * hidden),
            "out_w": normal(vocab, hidden),
            "out_b": normal(vocab),
        }
    )


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(10, 30))
    top_k = int(rng.integers(4, 10))
    beam = int(rng.integers(1, min(top_k, 5) + 1))
    backend = PrefixHashBackend(
        vocab_size=vocab, top_k=top_k, end_bias=float(rng.uniform(-3, 1.5)), seed=seed
    )
    options = CaptionOptions(
        beam_size=beam,
        max_length=int(rng.integers(2, 14)),
        n_best=int(rng.integers(1, beam + 1)),
        no_repeat_ngram=int(rng.integers(0, 4)),
        length_penalty=[None, 0.7, 1.5][seed % 3],
        guidance_bonus=float(rng.choice([0.0, 1.0, 3.0])),
        fusion_weight=float(rng.choice([0.0, 0.6])),
    )
    n_images = int(rng.integers(1, 5))
    tag_words = tuple(
        frozenset(int(w) for w in rng.choice(np.arange(3, vocab), int(rng.integers(0, 3))))
        for _ in range(n_images)
    )
    fusion = Fusion(_lm(rng, vocab), _lm(rng, vocab), 0.5, {})
    return backend, options, rng.integers(0, 1000, n_images), tag_words, fusion, vocab


@pytest.mark.parametrize("seed", range(30))
def test_device_search_is_the_numpy_search_on_random_models(seed):
    backend, options, seeds, tag_words, fusion, vocab = _random_case(seed)
    host = search_with_tags(
        backend, backend.encode(seeds), options, START, END, vocab, tag_words, fusion=fusion
    )
    for fixed in LOOPS:  # the early-exit loop, the fixed-shape masked one, as compiled
        device = _device(backend, backend.encode(seeds), options, tag_words, fusion, fixed)
        # with fusion, torch's matrix products round differently from numpy's
        _same(host, device, exact=not options.fusion_weight)


@pytest.mark.parametrize("seed", range(24))
def test_device_endings_are_the_numpy_searchs(seed):
    """Every place the search could have ended (what the consensus choice chooses among), as
    the numpy loop collects them."""
    from edgecap.decoding import _search

    backend, options, seeds, tag_words, fusion, vocab = _random_case(seed)
    host = _search(backend, backend.encode(seeds), options, START, END, vocab, tag_words, fusion, False)
    for fixed in LOOPS:
        device = _device(backend, backend.encode(seeds), options, tag_words, fusion, fixed, endings=True)
        _same(host, device, exact=not options.fusion_weight)


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c"]


def _table(rule, top_k=2):
    return TableBackend(WORDS, rule, top_k=top_k)


def _both(backend, options, fixed=False, tags=None):
    """One photo's hypotheses from the numpy search and from the device search (``tags``:
    its tag words, or None)."""
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    host = search_with_tags(backend, encoded, options, START, END, len(WORDS), tags)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    return host, _device(backend, encoded, options, tags, fixed=fixed, vocab_size=len(WORDS))


@pytest.mark.parametrize("fixed", LOOPS)
def test_every_continuation_blocked_keeps_the_live_beam(fixed):
    """ "a" then "b", then both repeat a word (no_repeat_ngram=1) and <end> is not in the top
    K: the live beam "a b" is the caption, unfinished."""
    backend = _table(lambda prefix: {"a": -0.1, "b": -0.2})
    host, device = _both(backend, CaptionOptions(beam_size=1, no_repeat_ngram=1), fixed)
    assert [WORDS[w] for w in host[0][0].tokens] == ["a", "b"] and not host[0][0].finished
    _same(host, device)


def _masked_row_table():
    """The table of the masked-row tests below: with beam 2 and no word twice, "b c a" is the
    only continuation at word 3 (row 1 masked), and after "<end>" the table puts "<end>" first."""
    rows = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"c": -0.1, "a": -0.2},
        ("b",): {"c": -0.1, "b": -0.2},
        ("a", "c"): {"a": -0.1, "c": -0.2},
        ("b", "c"): {"a": -0.1, "b": -0.2},
        ("b", "c", "a"): {"b": -0.1, "c": -0.2},
    }
    after_end = {"<end>": -0.1, "a": -0.2}
    return _table(lambda prefix: after_end if "<end>" in prefix else rows.get(prefix, {"a": -0.1, "b": -0.2}))


@pytest.mark.parametrize("fixed", LOOPS)
def test_every_continuation_blocked_with_a_masked_row_keeps_the_live_beam(fixed):
    """Beam 2, no word twice, top K 2. Word 1: "a" (-0.1), "b" (-0.2). Word 2: "a c" (-0.2),
    "b c" (-0.3) ("a a", "b b" blocked). Word 3: "b c a" (-0.4) is the only continuation
    ("a c a", "a c c", "b c b" blocked): row 1 is masked. Word 4: "b c a b", "b c a c"
    blocked; the masked row's candidates are no live ones (its input is "<end>", after which
    the table puts "<end>" first: no place to end either), so the image is done and "b c a"
    is the caption, unfinished."""
    backend = _masked_row_table()
    host, device = _both(backend, CaptionOptions(beam_size=2, no_repeat_ngram=1), fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [(["b", "c", "a"], False)]
        assert hyps[0].log_prob == pytest.approx(-0.4)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_every_continuation_blocked_after_one_ended_keeps_only_the_ended(fixed):
    """Beam 2, no word twice (no_repeat_ngram=1), top K 2. Word 1: "a" -0.1, "b" -0.2. Word 2:
    "a <end>" (-0.2) finishes; "b b" (-0.3) is blocked; "a b", "b a" (-0.4) go on. Word 3:
    each row's top K is "a", "b", both said: no live candidate, and a caption has ended, so
    the image is done with it alone (the blocked beams are not kept beside it)."""
    rows = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"<end>": -0.1, "b": -0.3},
        ("b",): {"b": -0.1, "a": -0.2},
    }
    backend = _table(lambda prefix: rows.get(prefix, {"a": -0.1, "b": -0.2}))
    options = CaptionOptions(beam_size=2, n_best=2, no_repeat_ngram=1)
    host, device = _both(backend, options, fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [(["a"], True)]
        assert hyps[0].log_prob == pytest.approx(-0.2)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_no_repeat_blocks_no_word_the_row_never_said_id_0_included(fixed):
    """No word twice (no_repeat_ngram=1), beam 1, top K 2, over a vocabulary whose word 0 is
    "x", an ordinary word. Word 1: "a" (-0.1). Word 2: "a a" is blocked, "a x" (-0.3) is not:
    "x" was never said (the words so far past the step are zeros, which are no words said).
    Word 3: "a x <end>" (-0.4) finishes: the caption "a x", not the blocked beam "a"."""
    words = ["x", "<start>", "<end>", "<unk>", "a", "b"]
    rows = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"a": -0.1, "x": -0.2},
        ("a", "x"): {"<end>": -0.1, "b": -0.2},
    }
    backend = TableBackend(words, lambda prefix: rows.get(prefix, {"b": -0.1}), top_k=2)
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=1)
    host = search_with_tags(backend, backend.encode(np.zeros((1, 3, 4, 4))), options, START, END, 6, None)
    device = _device(backend, backend.encode(np.zeros((1, 3, 4, 4))), options, fixed=fixed, vocab_size=6)
    for hyps in (host[0], device[0]):
        assert [([words[w] for w in h.tokens], h.finished) for h in hyps] == [(["a", "x"], True)]
        assert hyps[0].log_prob == pytest.approx(-0.4)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_no_more_than_beam_captions_finish(fixed):
    """Beam 2, top K 3. Word 1: "a" (-0.1), "b" (-0.2). Word 2: "a <end>" (-0.6) finishes,
    "a c" (-0.7) and "a b" (-0.8) go on. Word 3: "a c <end>" (-0.71) finishes, the second
    caption of beam 2: the image is done, and "a b <end>" (-0.81), ranked next, is no caption,
    although its score (-0.81 / 3) beats the first caption's (-0.6 / 2). n_best 2: "a c", "a"."""
    rows = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"<end>": -0.5, "c": -0.6, "b": -0.7},
        ("b",): {"c": -1.0, "a": -1.1, "b": -1.2},
        ("a", "c"): {"<end>": -0.01, "a": -5.0, "b": -6.0},
        ("a", "b"): {"<end>": -0.01, "a": -5.0, "c": -6.0},
    }
    backend = _table(lambda prefix: rows.get(prefix, {"<end>": -0.1}), top_k=3)
    options = CaptionOptions(beam_size=2, n_best=2, max_length=5, no_repeat_ngram=0, length_penalty=None)
    host, device = _both(backend, options, fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [
            (["a", "c"], True),
            (["a"], True),
        ]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_one_ended_and_every_continuation_blocked_in_the_same_step_keeps_only_the_ended(fixed):
    """Beam 2, no word twice, top K 2. Word 1: "a" (-0.1), "b" (-0.2). Word 2: "a b" (-0.3),
    "b a" (-0.4) ("a a", "b b" blocked). Word 3: "a b <end>" (-0.4) finishes while every
    continuation ("a b a", "b a a", "b a b") is blocked, in the same step: the image is done
    with that caption alone, the live beams not kept beside it (the numpy loop keeps them only
    when nothing has finished, this step's endings counted)."""
    rows = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"a": -0.1, "b": -0.2},
        ("b",): {"b": -0.1, "a": -0.2},
        ("a", "b"): {"<end>": -0.1, "a": -0.2},
        ("b", "a"): {"a": -0.1, "b": -0.2},
    }
    backend = _table(lambda prefix: rows.get(prefix, {"a": -0.1, "b": -0.2}))
    host, device = _both(backend, CaptionOptions(beam_size=2, n_best=2, no_repeat_ngram=1), fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [(["a", "b"], True)]
        assert hyps[0].log_prob == pytest.approx(-0.4)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_every_continuation_blocked_with_a_tag_bonus_keeps_the_model_and_rank_sums(fixed):
    """As test_every_continuation_blocked_keeps_the_live_beam with the tag bonus (4) on "a":
    the live beam "a b", kept unfinished, has the model's log-probability -0.3 and the rank
    sum -0.3 + 4 (the bonus of its first word, ranked over its 2 words)."""
    backend = _table(lambda prefix: {"a": -0.1, "b": -0.2})
    options = CaptionOptions(beam_size=1, no_repeat_ngram=1, guidance_bonus=4.0, length_penalty=None)
    tags = (frozenset({WORDS.index("a")}),)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    host = search_with_tags(backend, encoded, options, START, END, len(WORDS), tags)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    device = _device(backend, encoded, options, tags, fixed=fixed, vocab_size=len(WORDS))
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [(["a", "b"], False)]
        assert hyps[0].log_prob == pytest.approx(-0.3)
        assert hyps[0].rank_score == pytest.approx((4.0 - 0.3) / 2)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_every_continuation_blocked_with_a_masked_row_keeps_no_masked_beam(fixed):
    """The table of test_every_continuation_blocked_with_a_masked_row_keeps_the_live_beam with
    n_best 2: the live beam "b c a" is the only caption; the masked row (no beam since word 3)
    is not kept beside it as a second one."""
    backend = _masked_row_table()
    host, device = _both(backend, CaptionOptions(beam_size=2, n_best=2, no_repeat_ngram=1), fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [(["b", "c", "a"], False)]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
@pytest.mark.parametrize("first", [0.0, 1.0], ids=["one caption first", "two captions first"])
def test_images_of_one_batch_keep_their_own_number_of_captions(fixed, first):
    """Two images in one batch, beam 2, n_best 2: the first (all zeros) follows
    ``_masked_row_table`` and has one caption, "b c a" (unfinished); the second (all ones) has
    two, "a" and "b" (both end at word 2). Each image gets its own captions, as many as the
    numpy loop gives it, in either order in the batch: not the other image's count of them."""
    masked = _masked_row_table().rule
    ends = {
        (): {"a": -0.1, "b": -0.2},
        ("a",): {"<end>": -0.1, "c": -0.2},
        ("b",): {"<end>": -0.1, "c": -0.2},
    }

    def rule(prefix, key):
        return masked(prefix) if key == 0.0 else ends.get(prefix, {"<end>": -0.1, "c": -0.2})

    backend = TableBackend(WORDS, rule, top_k=2, keyed=True)
    images = np.zeros((2, 3, 4, 4), np.float32)
    images[0], images[1] = first, 1.0 - first
    options = CaptionOptions(beam_size=2, n_best=2, no_repeat_ngram=1, consensus=False)
    host = search_with_tags(backend, backend.encode(images), options, START, END, len(WORDS), None)
    device = _device(backend, backend.encode(images), options, fixed=fixed, vocab_size=len(WORDS))
    one, two = [(["b", "c", "a"], False)], [(["a"], True), (["b"], True)]
    for got in (host, device):
        assert [[([WORDS[w] for w in h.tokens], h.finished) for h in hyps] for hyps in got] == (
            [one, two] if first == 0.0 else [two, one]
        )
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_masked_row_finishes_no_caption(fixed):
    """Beam 2, top K 2. Word 1: "a" (-0.1); "<end>" is never first, so row 1 has no beam
    (masked, its input "<end>"). Word 2: "a <end>" (-0.2) finishes, "a b" (-0.3) goes on; the
    masked row's top K ("<end>", "a") are no candidates (a masked row's scores are -inf), so
    its "<end>" finishes nothing. Word 3: "a b <end>" (-0.4) finishes, the second caption."""
    rows = {
        (): {"a": -0.1, "<end>": -0.2},
        ("a",): {"<end>": -0.1, "b": -0.2},
        ("a", "b"): {"<end>": -0.1, "c": -0.2},
    }
    backend = _table(lambda prefix: rows.get(prefix, {"<end>": -0.1, "a": -0.2}))
    options = CaptionOptions(beam_size=2, n_best=2, max_length=5, no_repeat_ngram=0, length_penalty=None)
    host, device = _both(backend, options, fixed)
    for hyps in (host[0], device[0]):
        assert [([WORDS[w] for w in h.tokens], h.finished) for h in hyps] == [
            (["a"], True),
            (["a", "b"], True),
        ]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
@pytest.mark.parametrize("penalty", [None, 0.7])
def test_captions_cut_at_a_max_length_of_one_are_scored_over_their_one_word(fixed, penalty):
    """max_length=1: no beam can end (<end> is never the first word), so the captions are the
    live beams, one word each and unfinished, each scored over that one word: its log-prob
    itself (the mean over 1 word; GNMT's ((5 + 1) / 6) ** p is 1)."""
    backend = _table(lambda prefix: {"<end>": -0.1, "a": -0.5, "b": -1.5}, top_k=4)
    options = CaptionOptions(beam_size=2, n_best=2, max_length=1, length_penalty=penalty, consensus=False)
    host, device = _both(backend, options, fixed)
    assert [([WORDS[w] for w in h.tokens], h.score, h.finished) for h in host[0]] == [
        (["a"], -0.5, False),
        (["b"], -1.5, False),
    ]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_an_end_tied_with_the_beams_last_continuation_from_a_later_row_is_not_taken(fixed):
    """``helpers.END_TIED_WITH_THE_LAST_CONTINUATION``: the numpy loop meets the first row's
    continuation first, which fills the beam; the later row's <end> finishes no caption."""
    rows = END_TIED_WITH_THE_LAST_CONTINUATION
    options = CaptionOptions(
        beam_size=2, n_best=2, max_length=2, no_repeat_ngram=1, length_penalty=None, consensus=False
    )
    host, device = _both(_table(lambda prefix: rows[prefix], top_k=4), options, fixed)
    assert [([WORDS[w] for w in h.tokens], h.finished, h.log_prob) for h in host[0]] == [
        (["a"], True, -1.0),
        (["b", "a"], False, -1.0),
    ]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_no_beam_ends_gives_the_best_place_to_end(fixed):
    """No beam takes <end> before max_length (it is third in every top K); the caption is the
    best ending seen, a finished hypothesis, not the cut beam."""

    def rule(prefix):
        return {"a": -0.1, "b": -0.3, "<end>": -2.0 - 0.5 * (len(prefix) == 3)}

    backend = _table(rule, top_k=4)
    host, device = _both(
        backend, CaptionOptions(beam_size=2, max_length=5, no_repeat_ngram=0, n_best=2), fixed
    )
    assert host[0][0].finished and len(host[0][0].tokens) < 5
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_the_best_place_to_end_among_equal_rows_is_the_first_rows(fixed):
    """No beam ends (<end> ranks after every continuation) and both rows' <end>s tie exactly,
    rank and log-probability, at every step: the numpy loop keeps the first row's ending
    ("a a a" rather than "a a b"), so must the device search."""
    backend = _table(lambda prefix: {"a": -0.1, "b": -0.1, "<end>": -2.0}, top_k=4)
    host, device = _both(backend, CaptionOptions(beam_size=2, max_length=4, no_repeat_ngram=0), fixed)
    assert host[0][0].finished and [WORDS[w] for w in host[0][0].tokens] == ["a", "a", "a"]
    _same(host, device)


def _tied_endings_table():
    """Beam 2, the tag bonus (1) on "a": "a" (-1.25, ranked -0.25) then "b" (-0.5) as first
    words, then "c" continues both beams and <end> ranks after both continuations, so no beam
    ends. After the first word both rows' <end>s tie exactly in rank, -2.5 over 2 words ("a":
    -0.25 - 2.25, "b": -0.5 - 2.0), but not in the model's log-probability ("a <end>": -3.5,
    "b <end>": -2.5); every later <end> ranks lower (-5)."""
    rows = {
        (): {"a": -1.25, "b": -0.5},
        ("a",): {"c": -0.25, "<end>": -2.25},
        ("b",): {"c": -0.25, "<end>": -2.0},
    }
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"c": -0.25, "<end>": -5.0}), top_k=4)
    options = CaptionOptions(
        beam_size=2,
        max_length=3,
        no_repeat_ngram=0,
        length_penalty=None,
        guidance_bonus=1.0,
        consensus=False,
    )
    return backend, options, (frozenset({WORDS.index("a")}),)


@pytest.mark.parametrize("fixed", LOOPS)
def test_the_best_place_to_end_among_equal_ranks_is_the_higher_log_probability(fixed):
    """``_tied_endings_table``: the caption is the best place to end, and of the two endings
    of equal rank the numpy loop keeps the one of the higher log-probability, "b" (-2.5),
    though the first row's ("a") was met first; the device search must keep the same one,
    its words with its log-probability."""
    backend, options, tags = _tied_endings_table()
    host, device = _both(backend, options, fixed, tags)
    for hyps in (host[0], device[0]):
        assert [WORDS[w] for w in hyps[0].tokens] == ["b"] and hyps[0].finished
        assert (hyps[0].log_prob, hyps[0].rank_score) == (-2.5, -1.25)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_later_place_to_end_of_a_higher_log_probability_but_a_lower_rank_is_not_kept(fixed):
    """Beam 2, the tag bonus (3) on "a", three words at most, no beam ever ends (each <end>
    ranks after both continuations). After the first word the best place to end is "a <end>"
    (log-prob -3.75, ranked (-1.25 + 3 - 2.5) / 2 = -0.375, the bonus in its rank only); after
    the second, "b c <end>" has the higher log-probability (-3.6) but ranks lower (-1.2): the
    numpy loop keeps "a" (a later place to end must rank better; the log-probability decides
    equal ranks only), so must the device search."""
    rows = {
        (): {"a": -1.25, "b": -0.5},
        ("a",): {"c": -0.25, "<end>": -2.5},
        ("b",): {"c": -0.1, "<end>": -3.0},
        ("a", "c"): {"b": -0.25, "<end>": -9.0},
        ("b", "c"): {"a": -0.25, "<end>": -3.0},
    }
    options = CaptionOptions(
        beam_size=2, max_length=3, no_repeat_ngram=0, length_penalty=None, guidance_bonus=3.0, consensus=False
    )
    backend = _table(lambda prefix: rows[prefix], top_k=4)
    host, device = _both(backend, options, fixed, (frozenset({WORDS.index("a")}),))
    for hyps in (host[0], device[0]):
        assert [WORDS[w] for w in hyps[0].tokens] == ["a"] and hyps[0].finished
        assert (hyps[0].log_prob, hyps[0].rank_score) == (-3.75, -0.375)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_later_place_to_end_tied_in_rank_and_log_probability_keeps_the_earlier(fixed):
    """``_tied_endings_table``'s first words and bonus, three words at most, no beam ever
    ends: "a <end>" after the first word and "b c <end>" after the second tie exactly, in
    rank (-2.0 over 2 words, -3.0 over 3) and log-probability (-3.0 both). The numpy loop
    keeps the earlier (a later one must rank strictly better); so must the device search."""
    _, options, tags = _tied_endings_table()
    rows = LATER_TIED_ENDING
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"c": -0.25, "<end>": -5.0}), top_k=4)
    host, device = _both(backend, options, fixed, tags)
    for hyps in (host[0], device[0]):
        assert [WORDS[w] for w in hyps[0].tokens] == ["a"] and hyps[0].finished
        assert (hyps[0].log_prob, hyps[0].rank_score) == (-3.0, -1.0)
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_equal_candidates_keep_the_numpy_order(fixed):
    """ "a" and "b" tie as first words: the numpy loop takes the one first in the step's top K
    (its sort is stable), so must the device search."""
    backend = _table(lambda prefix: {"a": -0.5, "b": -0.5} if not prefix else {"<end>": -0.5})
    host, device = _both(backend, CaptionOptions(beam_size=1), fixed)
    assert [WORDS[w] for w in host[0][0].tokens] == ["a"]
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_wide_tie_keeps_the_row_order(fixed):
    """Beam 4, five candidates a row: 20 candidates, enough for an unstable sort to reorder
    ties. Word 1: a b c d (-1 each); word 2: every row's a b c d e (-1 each: 20 ties at -2),
    taken in row order then rank order: row 0's "a a", "a b", "a c", "a d"; word 3: each ends
    (-3, tied again), ranked as they finished."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c", "d", "e"]
    first = {w: -1.0 for w in "abcd"}
    second = {w: -1.0 for w in "abcde"}
    rule = {0: first, 1: second, 2: {"<end>": -1.0}}
    backend = TableBackend(words, lambda prefix: rule.get(len(prefix), {"<end>": -1.0}), top_k=5)
    options = CaptionOptions(beam_size=4, n_best=4, max_length=5, no_repeat_ngram=0)
    want = [["a", "a"], ["a", "b"], ["a", "c"], ["a", "d"]]
    host = search_with_tags(backend, backend.encode(np.zeros((1, 3, 4, 4))), options, START, END, 9, None)
    assert [[words[w] for w in h.tokens] for h in host[0]] == want
    device = _device(backend, backend.encode(np.zeros((1, 3, 4, 4))), options, fixed=fixed, vocab_size=9)
    assert [[words[w] for w in h.tokens] for h in device[0]] == want
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_equal_endings_keep_the_first(fixed):
    """No beam ends; the endings after "a" (step 2) and after "a c c" (step 4) rank the same
    (0 with the tag bonus of 4 on "a") and have the same log-probability (-4): the numpy loop
    keeps the first one it saw."""
    ends = {1: -3.5, 2: -5.0, 3: -3.0}

    def rule(prefix):
        if not prefix:
            return {"a": -0.5, "b": -1.0}
        return {"c": -0.25, "<end>": ends.get(len(prefix), -9.0)}

    backend = TableBackend(WORDS, rule, top_k=3)
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0, guidance_bonus=4.0)
    tags = (frozenset({WORDS.index("a")}),)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    host = search_with_tags(backend, encoded, options, START, END, len(WORDS), tags)
    assert [WORDS[w] for w in host[0][0].tokens] == ["a"] and host[0][0].finished
    assert (host[0][0].rank_score, host[0][0].log_prob) == (0.0, -4.0)
    device = _device(
        backend,
        backend.encode(np.zeros((1, 3, 4, 4), np.float32)),
        options,
        tags,
        fixed=fixed,
        vocab_size=len(WORDS),
    )
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_equal_endings_of_different_rows_and_steps_come_step_by_step(fixed):
    """The endings come as the numpy loop collects them, step by step and row by row within a
    step, so a tie between an ending of row 1 at word 1 and one of row 0 at word 2 keeps the
    earlier step's first. Beam 2, length_penalty 0 (a rank score is the log-probability sum),
    every value a multiple of 1/8 (exact sums). Word 1: "a" -0.25 (row 0), "b" -0.5 (row 1).
    Word 2: "a a" -0.5, "a b" -0.625 beat "b a", "b b" (-1.0) and the <end>s, which are in each
    row's top 3: "a" -0.25 - 4 = -4.25 (row 0), "b" -0.5 - 2 = -2.5 (row 1). Word 3 (the last):
    "a a a" -0.75, "a a b" -1.0 (cut at max_length), endings "a a" -0.5 - 2 = -2.5 (row 0) and
    "a b" -0.625 - 4 = -4.625 (row 1). Best first: "b" and "a a" tie at -2.5 (rank and
    log-probability): "b", ended a step earlier, first; row by row first would put "a a" first."""
    table = {
        (): {"a": -0.25, "b": -0.5},
        ("a",): {"a": -0.25, "b": -0.375, "<end>": -4.0},
        ("b",): {"a": -0.5, "b": -0.5, "<end>": -2.0},
        ("a", "a"): {"a": -0.25, "b": -0.5, "<end>": -2.0},
        ("a", "b"): {"a": -1.0, "b": -1.5, "<end>": -4.0},
    }
    backend = _table(lambda prefix: table[prefix], top_k=3)
    options = CaptionOptions(beam_size=2, max_length=3, no_repeat_ngram=0, length_penalty=0)
    device = _device(
        backend,
        backend.encode(np.zeros((1, 3, 4, 4), np.float32)),
        options,
        fixed=fixed,
        vocab_size=len(WORDS),
        endings=True,
    )
    got = [([WORDS[w] for w in h.tokens], h.finished, h.rank_score, h.log_prob) for h in device[0]]
    assert got == [
        (["b"], True, -2.5, -2.5),
        (["a", "a"], True, -2.5, -2.5),
        (["a"], True, -4.25, -4.25),
        (["a", "b"], True, -4.625, -4.625),
        (["a", "a", "a"], False, -0.75, -0.75),
        (["a", "a", "b"], False, -1.0, -1.0),
    ]


class _BrokenFrom:
    """A step that returns a NaN (row 0's best word) from its ``bad``-th call on."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.t = inner, bad, 0

    def first_state(self):
        return None

    def __call__(self, state, tokens, source_rows, word_bias):
        values, ids, state = self.inner(state, tokens, source_rows, word_bias)
        self.t += 1
        if self.t >= self.bad:
            values = values.clone()
            values[0, 0] = float("nan")
        return values, ids, state


def _broken_search(backend, encoded, vocab_size: int, options, fixed: bool):
    """The device search over ``backend``'s session, broken from word 3."""
    return _device(
        backend, encoded, options, fixed=fixed, vocab_size=vocab_size, wrap=lambda step: _BrokenFrom(step, 3)
    )


def test_a_non_finite_step_is_an_error_naming_the_word():
    """Broken from word 3 on: the error names the first broken word."""
    backend = PrefixHashBackend(vocab_size=12, top_k=5, end_bias=-5.0)
    encoded = backend.encode(np.array([3]))
    options = CaptionOptions(beam_size=2, max_length=6, no_repeat_ngram=0)
    for fixed in (False, True):
        with pytest.raises(BackendError, match="non-finite log-probabilities at word 3"):
            _broken_search(backend, encoded, 12, options, fixed)


def test_a_non_finite_first_step_is_an_error_naming_word_1():
    """Broken from the first word on (the step's first output already NaN): an error naming
    word 1, as the numpy loop raises it, in every form of the loop, not captions built on the
    NaN (the first bad step is the step numbered 0)."""
    backend = PrefixHashBackend(vocab_size=12, top_k=5, end_bias=-5.0)
    encoded = backend.encode(np.array([3, 7]))
    options = CaptionOptions(beam_size=2, max_length=6, no_repeat_ngram=0)
    wrap = lambda step: _BrokenFrom(step, 1)  # noqa: E731
    for fixed in LOOPS:
        with pytest.raises(BackendError, match="non-finite log-probabilities at word 1 "):
            _device(backend, encoded, options, fixed=fixed, vocab_size=12, wrap=wrap)


def test_a_search_after_a_broken_one_is_unharmed():
    """A search whose step broke from word 3 (an image that never ends: the error names word
    3), then one of the same shape that is done at word 2 ("a" -0.1, "a <end>" -0.2, beam 1),
    over a sound step: "a", finished, in every form of the loop (the early-exit one stops
    before word 3): the record of non-finite steps is each search's own."""
    never_ends = _table(lambda prefix: {"a": -0.1, "b": -0.3})
    rows = {(): {"a": -0.1, "b": -0.3}, ("a",): {"<end>": -0.1, "b": -0.2}}
    ends = _table(lambda prefix: rows.get(prefix, {"b": -0.1}))
    encoded = ends.encode(np.zeros((1, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0)
    for fixed in LOOPS:
        with pytest.raises(BackendError, match="non-finite log-probabilities at word 3"):
            _broken_search(never_ends, encoded, len(WORDS), options, fixed)
        [[hyp]] = _device(ends, encoded, options, fixed=fixed, vocab_size=len(WORDS))
        assert [WORDS[w] for w in hyp.tokens] == ["a"] and hyp.finished
        assert hyp.log_prob == pytest.approx(-0.2)


def test_the_fixed_search_ignores_a_broken_step_after_every_image_is_done():
    """The fixed-shape search (a captured graph) runs all ``max_length`` steps; a step that
    returns NaN only after the last image is done (the numpy loop never runs it) is no error.
    Beam 1: "a" (-0.1), "a <end>" (-0.2) at word 2, done; the step breaks from word 3."""
    rows = {(): {"a": -0.1, "b": -0.3}, ("a",): {"<end>": -0.1, "b": -0.2}}
    backend = _table(lambda prefix: rows.get(prefix, {"b": -0.1}))
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0)
    for fixed in (False, True):
        [[hyp]] = _broken_search(backend, encoded, len(WORDS), options, fixed)
        assert [WORDS[w] for w in hyp.tokens] == ["a"] and hyp.finished
        assert hyp.log_prob == pytest.approx(-0.2)


@pytest.mark.parametrize("fixed", LOOPS)
def test_the_fixed_search_ignores_a_broken_step_after_every_image_is_done_with_endings(fixed):
    """As test_the_fixed_search_ignores_a_broken_step_after_every_image_is_done, with every
    ending (what the consensus choice chooses among) and a table whose best word after "<end>"
    is "<end>": the masked row's NaN "<end>" (the step broken from word 3, after the image is
    done) is no ending; the numpy loop's endings, "a" alone."""
    from edgecap.decoding import _search

    rows = {(): {"a": -0.1, "b": -0.3}, ("a",): {"<end>": -0.1, "b": -0.2}}
    backend = _table(lambda prefix: rows.get(prefix, {"<end>": -0.1, "b": -0.2}))
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    host = _search(backend, encoded, options, START, END, len(WORDS), None, None, False)
    assert [([WORDS[w] for w in h.tokens], h.finished) for h in host[0]] == [(["a"], True)]
    device = _device(
        backend,
        encoded,
        options,
        fixed=fixed,
        vocab_size=len(WORDS),
        endings=True,
        wrap=lambda step: _BrokenFrom(step, 3),
    )
    _same(host, device)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_broken_step_after_three_images_are_done_is_no_error(fixed):
    """As above with three images (a batch that is no power of two: the fused kernel reads
    every image's done flag in a block of four): each is "a" (-0.1), "a <end>" (-0.2), done
    at word 2; the step returns NaN from word 3 on, which the numpy loop never runs: no error,
    each image's caption "a", finished."""
    rows = {(): {"a": -0.1, "b": -0.3}, ("a",): {"<end>": -0.1, "b": -0.2}}
    backend = _table(lambda prefix: rows.get(prefix, {"b": -0.1}))
    encoded = backend.encode(np.zeros((3, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0)
    got = _broken_search(backend, encoded, len(WORDS), options, fixed)
    assert [[([WORDS[w] for w in h.tokens], h.finished) for h in hyps] for hyps in got] == [
        [(["a"], True)]
    ] * 3
    assert [hyps[0].log_prob for hyps in got] == pytest.approx([-0.2] * 3)


@pytest.mark.parametrize("fixed", LOOPS)
def test_a_broken_step_while_one_image_is_done_is_an_error(fixed):
    """Two images, beam 1: the second (all ones) is "a" (-0.1), "a <end>" (-0.2), done at
    word 2; the first (all zeros) never ends, and its row's best word is NaN from word 3 on.
    The numpy loop still steps the first image at word 3: an error naming word 3, not
    captions (one image done is not every image done)."""
    rows = {(): {"a": -0.1, "b": -0.3}, ("a",): {"<end>": -0.1, "b": -0.2}}

    def rule(prefix, key):
        return {"a": -0.1, "b": -0.3} if key == 0.0 else rows.get(prefix, {"b": -0.1})

    backend = TableBackend(WORDS, rule, top_k=2, keyed=True)
    images = np.zeros((2, 3, 4, 4), np.float32)
    images[1] = 1.0
    options = CaptionOptions(beam_size=1, max_length=5, no_repeat_ngram=0)
    with pytest.raises(BackendError, match="non-finite log-probabilities at word 3"):
        _broken_search(backend, backend.encode(images), len(WORDS), options, fixed)


# -- the shipped model on the example photos ---------------------------------------------------

OPTIONS = [
    dict(),
    dict(n_best=3),
    dict(beam_size=5, n_best=5, max_length=8),
    dict(length_penalty=0.7, no_repeat_ngram=1),
    dict(fusion_weight=0),
    dict(guidance_bonus=0, beam_size=1),
    # no word bias at all: the top K's own log-probabilities
    dict(fusion_weight=0, guidance_bonus=0),
    # without the consensus choice the device search ranks and cuts to n_best itself (unpack)
    dict(consensus=False, n_best=3),
]


@pytest.fixture(scope="module")
def shipped(default_model_dir, example_images):
    """The shipped model's torch backend (device search) and the example photos, encoded."""
    captioner = Captioner(default_model_dir, backend="torch", device="cpu", search="device")
    photos = [str(p) for p in example_images]
    batch = np.stack([preprocess([load_rgb(p)], captioner.manifest.preprocessing)[0] for p in photos])
    return captioner, captioner.backend.encode(batch), photos


def _search(captioner, encoded, options, on_device: bool):
    backend = captioner.backend
    backend.on_device = on_device
    try:
        return captioner_search(captioner, encoded, options)
    finally:
        backend.on_device = True


def _fused_search(captioner, encoded, options):
    """The device search with its bookkeeping in the Triton kernel (``fused_search=True``), the
    backend's own device search put back after."""
    backend = captioner.backend
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(backend, fused=True)
        return _search(captioner, encoded, options, on_device=True)
    finally:
        backend.device_search = kept


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_device_search_captions_the_examples_as_the_numpy_search(shipped, options):
    captioner, encoded, _ = shipped
    options = replace(CaptionOptions(), **options)
    host = _search(captioner, encoded, options, on_device=False)
    device = _search(captioner, encoded, options, on_device=True)
    _same(host, device, exact=False)  # the fused language models: torch's products round apart


def test_the_whole_decode_graph_captions_as_the_numpy_search(shipped):
    """``DecodeGraphs`` with ``EagerGraph``: the fixed-shape search over static buffers,
    captured once per shape and replayed; another shape gets its own graph."""
    captioner, encoded, _ = shipped
    backend = captioner.backend
    options = CaptionOptions(n_best=2)
    host = _search(captioner, encoded, options, on_device=False)
    kept = backend.device_search
    backend.device_search = graphed = TorchDeviceSearch(backend, EagerGraph)
    try:
        _same(host, _search(captioner, encoded, options, on_device=True), exact=False)
        _same(host, _search(captioner, encoded, options, on_device=True), exact=False)
        graphs = graphed.graphs.graphs
        assert graphs.limit == MAX_GRAPHS  # kept per plan and shape, but not for every one seen
        assert graphs.made == 1  # the same shape: one set of graphs, replayed
        ((entry,),) = [graphs.entries.values()]
        parts, packing = entry.graphs, entry.packing
        assert len(parts) == 4  # steps 0-7, 8-11, 12-15, 16-19 (DECODE_CHECKS)
        assert parts[0].replays == 3 and packing.replays == 2  # and once after its capture
        short = replace(options, max_length=6)  # another plan: its own graph, the first kept
        _same(
            _search(captioner, encoded, short, on_device=False),
            _search(captioner, encoded, short, on_device=True),
            exact=False,
        )
        assert graphs.made == 2 and len(graphs.entries) == 2
    finally:
        backend.device_search = kept


class StrictGraph:
    """A stand-in for ``CudaGraph`` that holds the capture to CUDA's rules: two warm-up runs,
    then the captured run, in which any copy from the host (``torch.tensor``,
    ``torch.from_numpy``, ``torch.as_tensor``) or read back to it (``item``, ``tolist``,
    ``numpy``, ``bool``) raises, as it fails a real capture; ``replay`` runs it again."""

    BARRED = ((torch, "tensor"), (torch, "from_numpy"), (torch, "as_tensor")) + tuple(
        (torch.Tensor, name) for name in ("item", "tolist", "numpy", "__bool__")
    )

    def __init__(self, fn):
        self.fn = fn
        fn()
        fn()
        with contextlib.ExitStack() as stack:
            for owner, name in self.BARRED:
                stack.enter_context(mock.patch.object(owner, name, self._barred(name)))
            fn()

    @staticmethod
    def _barred(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} while capturing: a CUDA graph capture fails on it")

        return call

    def replay(self) -> None:
        self.fn()


@pytest.mark.parametrize("form", ["plain", NUMBERED, FUSED])
def test_the_whole_decode_graph_copies_nothing_from_the_host_while_capturing(shipped, form):
    """The whole-decode graph's captured run makes no host copy and reads nothing back (its
    constant tables are made in the warm-up runs), plain, in the compiled search's form (run
    uncompiled here) and fused (its Triton kernel's launch included: the eager device search's
    hypotheses bit for bit); with the language models, the tag bonus and the endings."""
    if form == FUSED and not HAS_TRITON:
        pytest.skip("the fused search needs triton")
    captioner, encoded, _ = shipped
    backend = captioner.backend
    options = CaptionOptions(n_best=2, guidance_bonus=2.0, no_repeat_ngram=2, length_penalty=0.7)
    # the numpy loop; for the fused search, the eager device search
    want = _search(captioner, encoded, options, on_device=form == FUSED)
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(
            backend, StrictGraph, compiled=form == NUMBERED, fused=form == FUSED
        )
        with mock.patch.object(device_module, "_compiled_step", lambda: device_module._step):
            for _ in range(2):  # captured, then replayed
                _same(want, _search(captioner, encoded, options, on_device=True), exact=form == FUSED)
    finally:
        backend.device_search = kept


@pytest.mark.parametrize("where", ["host", "device"])
def test_every_graph_of_the_captioner_keeps_to_the_capture_rules(shipped, where):
    """A graphed torch Captioner (the encoder's graphs, the step's with the host search, the
    whole decode's with the device search) under ``StrictGraph``: every capture copies
    nothing from the host and reads nothing back, and the captions are the eager ones."""
    captioner, _, photos = shipped
    graphed = Captioner(
        captioner.manifest.directory, backend="torch", device="cpu", search=where, graph_factory=StrictGraph
    )
    want = [c.text for c in captioner.caption_batch(photos)]
    for _ in range(2):  # captured, then replayed
        assert [c.text for c in graphed.caption_batch(photos)] == want
    assert graphed.caption(photos[0]).text == want[0]  # another batch size: captured again


def test_the_decode_graphs_stop_at_the_first_check_after_every_image_is_done(shipped, monkeypatch):
    """The whole-decode graphs read "every image done?" after steps 8, 12 and 16 and run no
    further part once it is: as many steps as the first check at or after the step where the
    early-exit loop (which reads it after every step) stopped; the same hypotheses."""
    captioner, _, photos = shipped
    backend = captioner.backend
    # the cat and the coffee (the astronaut's caption runs to the last step)
    pre = captioner.manifest.preprocessing
    encoded = backend.encode(np.stack([preprocess([load_rgb(p)], pre)[0] for p in photos[1:3]]))
    options = CaptionOptions(n_best=2)
    steps = []
    real = device_module._step

    def counting(loop, t, number, carry):
        steps.append(number)
        return real(loop, t, number, carry)

    monkeypatch.setattr(device_module, "_step", counting)
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(backend)  # on the CPU: reads after every step
        early = _search(captioner, encoded, options, on_device=True)
        stopped = len(steps)
        assert stopped < 16  # done before the last check
        backend.device_search = graphed = TorchDeviceSearch(backend, EagerGraph)
        _search(captioner, encoded, options, on_device=True)  # captured (every part runs)
        steps.clear()
        _same(early, _search(captioner, encoded, options, on_device=True))  # replayed
        ran = min(c for c in (*DECODE_CHECKS, options.max_length) if c >= stopped)
        assert len(steps) == ran == graphed.graphs.last_steps < options.max_length
        ((entry,),) = [graphed.graphs.graphs.entries.values()]
        assert [g.replays for g in entry.graphs] == [3, *(2 if end <= ran else 0 for end in (12, 16, 20))]
    finally:
        backend.device_search = kept


def test_language_models_of_different_sizes_caption_as_the_numpy_search(shipped):
    """A fusion whose two language models have different hidden sizes (the numpy and
    onnxruntime steps take them: tests/test_fusion.py) gives the numpy search's hypotheses with
    the device search on, not an error: the device search steps both models as one stack
    (``TorchLMPair``, equal sizes only), so the backend leaves such a search to the host loop."""
    captioner, encoded, _ = shipped
    backend = captioner.backend
    rng = np.random.default_rng(5)
    vocab = len(captioner.vocab)
    mixed = Fusion(_lm(rng, vocab, hidden=8), _lm(rng, vocab, hidden=5), 1.0, {})
    options = CaptionOptions(n_best=2, fusion_weight=1.0)
    args = (encoded, options, captioner.vocab.start, captioner.vocab.end, vocab, captioner.classes, mixed)
    backend.on_device = False
    try:
        host = search(backend, *args)
    finally:
        backend.on_device = True
    _same(host, search(backend, *args))


def test_the_captioner_uses_the_device_search(shipped, monkeypatch):
    """A torch Captioner with search="device" runs it for plain captions, and the numpy loop
    for the attention maps and the tag constraint."""
    captioner, _, photos = shipped
    host = Captioner(captioner.manifest.directory, backend="torch", device="cpu")
    assert not host.backend.on_device  # "auto" on the CPU: the numpy loop
    calls = []
    original = captioner.backend.device_search

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(captioner.backend, "device_search", spy)
    want = host.caption_batch(photos[:2])
    got = captioner.caption_batch(photos[:2])
    assert [c.text for c in got] == [c.text for c in want] and calls == [1]
    caption = captioner.caption(photos[0], return_attention=True)
    assert caption.attention is not None and calls == [1]
    monkeypatch.setattr(
        captioner, "options", replace(CaptionOptions(), constrained=True, constraint_min_prob=0.01)
    )
    captioner.caption(photos[1])
    assert calls == [1]


def test_search_option(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir)
    with pytest.raises(ValueError, match="search must be one of auto, host, device, got 'gpu'"):
        TorchBackend(manifest, device="cpu", search="gpu")
    assert TorchBackend(manifest, device="cpu").on_device is False  # auto on the CPU: host
    backend = TorchBackend(manifest, device="cpu", search="device")
    assert backend.on_device and backend.device_search.graphs is None


def test_auto_searches_on_the_device_on_cuda_from_12_beam_rows(tiny_model_dir, monkeypatch):
    """search="auto": on CUDA the device search for a batch of at least 12 beam rows (images x
    beam; where it measured faster on an H200), the numpy loop below and on the CPU. The CUDA
    case here: a CPU backend with its search set as CUDA's "auto" sets it."""
    assert checked_search("auto", torch.device("cuda")) and not checked_search("auto", torch.device("cpu"))
    assert checked_search("device", torch.device("cpu")) and not checked_search("host", torch.device("cuda"))
    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu", search="device")
    backend.search_mode = "auto"
    assert "on the device from 12 beam rows a batch" in backend.describe()
    rows = []

    def device_search(encoded, options, *rest):
        rows.append(encoded.n_images * options.beam_size)
        return "searched on the device"

    monkeypatch.setattr(backend, "device_search", device_search)
    images = np.zeros((12, 3, 224, 224), np.float32)
    for n, beam, on_device in ((1, 3, False), (3, 3, False), (4, 3, True), (11, 1, False), (12, 1, True)):
        encoded = backend.encode(images[:n])
        got = backend.search_on_device(encoded, CaptionOptions(beam_size=beam), START, END, None, None)
        assert (got == "searched on the device") is on_device, (n, beam)
    assert rows == [12, 12]
    backend.search_mode = "device"  # "device": whatever the batch
    assert backend.search_on_device(backend.encode(images[:1]), CaptionOptions(), START, END, None, None)


def test_auto_counts_the_rows_of_the_padded_batch_with_graphs(tiny_model_dir, photos):
    """docs/gpu-search.md: with graphs, "auto" counts the rows of the batch as it runs, padded
    (``graph_batch_size``): after a batch of 4, 3 photos at beam 3 run as 4, 12 rows, on the
    device; without graphs 9 rows, the numpy loop. CUDA's "auto" set on a CPU backend, as
    above."""
    for graphs, want in ((None, []), (EagerGraph, [12])):
        extra = {} if graphs is None else {"graph_factory": graphs}
        captioner = Captioner(
            tiny_model_dir, backend="torch", device="cpu", search="device", beam_size=3, max_length=4, **extra
        )
        backend = captioner.backend
        backend.search_mode = "auto"
        rows, real = [], backend.device_search

        def counted(encoded, options, *rest, real=real, rows=rows):
            rows.append(encoded.n_images * options.beam_size)
            return real(encoded, options, *rest)

        captioner.caption_batch(photos[:4])  # the largest batch run: 4 photos
        backend.device_search = counted
        assert len(captioner.caption_batch(photos[:3])) == 3
        assert rows == want, graphs


@needs_triton
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_the_fused_device_search_is_the_device_search_bit_for_bit(shipped, options, monkeypatch):
    """``fused_search=True``: the bookkeeping of every step after the first in one Triton kernel
    (``edgecap.decoding.device_kernel``, run here by Triton's interpreter on CPU tensors) gives
    the eager device search's hypotheses with the same float64 scores to the last bit, and so
    the numpy loop's captions, for every option set of the tests above."""
    captioner, encoded, _ = shipped
    options = replace(CaptionOptions(), **options)
    eager = _search(captioner, encoded, options, on_device=True)
    steps = _count_fused_decoder_steps(monkeypatch)
    fused = _fused_search(captioner, encoded, options)
    assert steps, "the decoder's step did not run through its kernels"
    _same(eager, fused, exact=True)
    _same(_search(captioner, encoded, options, on_device=False), fused, exact=False)


@needs_triton
def test_the_fused_search_over_a_decoder_without_attention_is_the_device_search(
    tmp_path, example_images, monkeypatch
):
    """A Show-and-Tell model (``edgecap train --no-attention``): its step has no kernels of its
    own (``step_kernels.decoder_of``), so the fused search runs it as it is, each row from the
    state its back-pointer names, with the bookkeeping in the kernel: the eager device search's
    hypotheses bit for bit, and the numpy loop's captions."""
    from edgecap.models.efficientnet_lite import load_pretrained
    from helpers import tiny_export

    model = tiny_export(load_pretrained(), tmp_path / "show-and-tell", width=32, attention=False)
    captioner = Captioner(model, backend="torch", device="cpu", search="device")
    photos = [load_rgb(p) for p in sorted(example_images)]
    encoded = captioner.backend.encode(preprocess(photos, captioner.manifest.preprocessing))
    steps = _count_fused_decoder_steps(monkeypatch)
    for options in (CaptionOptions(max_length=8), CaptionOptions(beam_size=4, n_best=3, length_penalty=0.7)):
        eager = _search(captioner, encoded, options, on_device=True)
        fused = _fused_search(captioner, encoded, options)
        _same(eager, fused, exact=True)
        _same(_search(captioner, encoded, options, on_device=False), fused, exact=False)
        assert len({tuple(h.tokens) for hyps in fused for h in hyps}) > 1  # captions that differ
    assert steps == []  # the step as it is, not the attention decoder's kernels


@needs_triton
@pytest.mark.parametrize("hidden", [16, 12], ids=["hidden 16", "hidden 12"])
@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("tags", [True, False], ids=["tag bonus", "no tag bonus"])
def test_the_language_models_kernels_give_the_eager_word_bias_bit_for_bit(first, tags, hidden):
    """``lm_kernels.word_bias`` against ``_word_bias`` on random language models over 3,001
    words (three blocks of the logits' kernels, the last one part full; each row's largest
    logit wherever it falls, not in the first block as a frequency-ordered vocabulary's tends
    to be), a hidden size that is a power of two and one that is not (the kernels' masked
    lanes), 5 rows with their own weights, states and source rows, the tag bonus on some: the
    same bias and new states to the last bit."""
    from types import SimpleNamespace

    from edgecap.decoding import lm_kernels
    from edgecap.decoding.device import TorchLM, TorchLMPair, _word_bias

    rng = np.random.default_rng(7)
    vocab, R = 3001, 5
    assert vocab > 2 * lm_kernels.WORDS_AT_A_TIME
    lms = TorchLMPair(tuple(TorchLM(_lm(rng, vocab, hidden=hidden), torch.device("cpu")) for _ in range(2)))

    def normal(*shape):
        return torch.from_numpy(rng.normal(size=shape).astype(np.float32))

    tag_bias = torch.from_numpy((rng.random((R, vocab)) < 0.01).astype(np.float32) * np.float32(1.5))
    loop = SimpleNamespace(
        lms=lms, fusion_weights=normal(R, 1).abs(), tag_bias=tag_bias if tags else None, tag_rows=None
    )
    tokens = torch.from_numpy(rng.integers(0, vocab, R))
    source = torch.tensor([2, 0, 4, 4, 1])
    steered = torch.tensor([True, False, True, True, False]) if tags else None
    states = (normal(2, R, hidden), normal(2, R, hidden))
    carry = (tokens, source, None, None, None, None, None, steered, states)
    t = 0 if first else None
    want_bias, (want_h, want_c) = _word_bias(loop, t, carry)
    bias, (h, c) = lm_kernels.word_bias(loop, t, carry)
    # the largest logits fall past the first block: the kernels' loops over it are what runs
    raw = torch.stack([h[m] @ lms.out_w_t[m] for m in range(2)]) + lms.out_b
    assert (raw.argmax(2) >= lm_kernels.WORDS_AT_A_TIME).any()
    for got, want in ((bias, want_bias), (h, want_h), (c, want_c)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)
    # after the decoder's step (the fused decoder step): the hidden states and the input rows
    # gathered by its row kernel, and the log-probabilities plus the bias written by the bias's
    # kernel too
    logprobs = torch.log_softmax(normal(R, vocab) * 4, dim=1)
    gathered = None if first else states[0].index_select(1, source)
    for lm_in in (None, lms.input.index_select(1, tokens)):
        bias, (h, c), ranked = lm_kernels.ranked_bias(loop, t, carry, logprobs, gathered, lm_in)
        for got, want in ((bias, want_bias), (h, want_h), (c, want_c), (ranked, logprobs + want_bias)):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want)


@needs_triton
def test_the_tag_bonus_alone_and_what_the_step_ranks_by_in_one_kernel():
    """Without the language models, ``lm_kernels.ranked_bias``: the steered rows' tag bonus and
    the log-probabilities plus it (``_tagged``), as ``_word_bias`` and the step make them, bit
    for bit; with neither, no bias. 2,500 words: the last block part full."""
    from types import SimpleNamespace

    from edgecap.decoding import lm_kernels
    from edgecap.decoding.device import _word_bias

    rng = np.random.default_rng(5)
    R, V = 4, 2500
    tag_bias = torch.from_numpy((rng.random((R, V)) < 0.05).astype(np.float32) * np.float32(2.0))
    loop = SimpleNamespace(lms=None, fusion_weights=None, tag_bias=tag_bias, tag_rows=None)
    steered = torch.tensor([True, False, True, False])
    carry = (torch.arange(R), torch.arange(R), None, None, None, None, None, steered, None)
    logprobs = torch.log_softmax(torch.from_numpy(rng.normal(size=(R, V)).astype(np.float32)) * 4, dim=1)
    want, _ = _word_bias(loop, None, carry)
    bias, states, ranked = lm_kernels.ranked_bias(loop, None, carry, logprobs, None)
    assert states is None and torch.equal(bias, want) and torch.equal(ranked, logprobs + want)
    assert bias[0].sum() > 0 and bias[1].abs().sum() == 0  # steered rows, and a row that is not
    unsteered = carry[:7] + (None, None)
    assert lm_kernels.ranked_bias(loop, None, unsteered, logprobs, None) == (None, None, None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_the_decoder_steps_kernels_give_torchs_operations_bit_for_bit(dtype):
    """``step_kernels``: the row kernel gathers the words' embeddings, the rows' h and c and the
    language models' hidden states and input rows as ``embedding`` and ``index_select`` do
    (more rows than states, as the first step's images; int32 indices, as its tokens; the input
    rows without the states, as the first step's); ``KernelJoins``' LSTM
    input and deep sum are ``StepJoins``' to the last bit, in FP16 too (each sum rounded to
    FP16 before the next, as torch's). Sizes that are no power of two: the masked lanes."""
    from edgecap.decoding import step_kernels
    from edgecap.models.decoder import TORCH_JOINS

    rng = np.random.default_rng(11)

    def normal(*shape, scale=1.0):
        return torch.from_numpy((rng.normal(size=shape) * scale).astype(np.float32)).to(dtype)

    R, S, V, E, F, H, HL = 64, 3, 50, 12, 20, 10, 6
    # h a slice of a wider buffer: its rows H + 5 apart, c's H apart
    embed, h, c = normal(V, E), normal(S, H + 5)[:, 3 : 3 + H], normal(S, H)
    assert h.stride(0) != c.stride(0)
    lm_h, lm_input = normal(2, S, HL).float(), normal(2, V, 4 * HL).float()
    tokens = torch.from_numpy(rng.integers(0, V, R))
    source = torch.from_numpy(rng.integers(0, S, R))
    got = step_kernels.gather_rows(embed, tokens, source, h, c, lm_h, lm_input)
    emb = got[0]
    wants = (
        torch.nn.functional.embedding(tokens, embed),
        h.index_select(0, source),
        c.index_select(0, source),
        lm_h.index_select(1, source),
        lm_input.index_select(1, tokens),
    )
    for mine, want in zip(got, wants, strict=True):
        assert mine.dtype == want.dtype and torch.equal(mine, want)
    alone = step_kernels.gather_rows(embed, tokens.int(), source.int(), h, c)
    assert alone[3] is None and alone[4] is None
    for mine, want in zip(alone[:3], wants[:3]):
        assert torch.equal(mine, want)
    first = step_kernels.gather_rows(embed, tokens.int(), source.int(), h, c, None, lm_input)
    assert first[3] is None and torch.equal(first[4], wants[4])

    beta, context = torch.sigmoid(normal(R, F)), normal(R, F, scale=3.0)
    got = step_kernels.KERNEL_JOINS.lstm_input(emb, beta, context)
    for mine, theirs in zip(got, TORCH_JOINS.lstm_input(emb, beta, context), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    # magnitudes far apart: a sum rounded once, or in another order, comes out otherwise
    a, b = normal(R, E, scale=100.0), normal(R, E, scale=0.03)
    mine, theirs = step_kernels.KERNEL_JOINS.deep(emb, a, b), TORCH_JOINS.deep(emb, a, b)
    assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


@pytest.mark.parametrize(
    "dtype, island",
    [(torch.float32, False), (torch.float16, True), (torch.float16, False)],
    ids=["float32", "float16, the projection an FP32 island", "float16"],
)
def test_the_masked_projection_gives_the_masked_word_logits_bit_for_bit(dtype, island):
    """``KernelJoins.word_logits``: the projection with the never-generated words' rows zero and
    their bias ``LOGIT_FLOOR`` gives ``mask_logits`` of the projection exactly (those words at
    the floor, the others untouched), an FP16 model's FP32 island's cast included; made once
    per projection, again once its weights change in place."""
    from edgecap.backends.torch_graphs import keep_fp32
    from edgecap.decoding.step_kernels import KernelJoins
    from edgecap.models.decoder import LOGIT_FLOOR, mask_logits
    from edgecap.vocab import NEVER_GENERATED_IDS

    torch.manual_seed(3)
    out_vocab = torch.nn.Linear(24, 300).to(dtype)
    if island:
        keep_fp32(out_vocab)
    x = (torch.randn(7, 24) * 2).to(dtype)
    joins = KernelJoins()
    want = mask_logits(out_vocab(x))
    got = joins.word_logits(out_vocab, x)
    assert got.dtype == want.dtype == (torch.float32 if island else dtype)
    assert torch.equal(got, want)
    assert (got[:, list(NEVER_GENERATED_IDS)] == LOGIT_FLOOR).all()
    from edgecap.models.decoder import TORCH_JOINS

    assert not TORCH_JOINS.masks_words and torch.equal(TORCH_JOINS.word_logits(out_vocab, x), out_vocab(x))
    kept = joins.masked_projection(out_vocab)
    assert joins.masked_projection(out_vocab) is kept  # made once
    for change in (lambda: out_vocab.bias.add_(1.0), lambda: out_vocab.weight.mul_(0.5)):
        with torch.no_grad():
            change()
        assert joins.masked_projection(out_vocab) is not kept
        kept = joins.masked_projection(out_vocab)
        assert torch.equal(joins.word_logits(out_vocab, x), mask_logits(out_vocab(x)))


@needs_triton
@pytest.mark.parametrize("fp32_logits", [True, False], ids=["word logits FP32", "word logits FP16"])
def test_the_fused_decoder_step_in_fp16_is_the_eager_one_bit_for_bit(
    default_model_dir, example_images, fp32_logits, monkeypatch
):
    """The torch backend in FP16 (``fp16=True``: the FP16 decoder, its FP32 islands, the word
    logits in FP32 or not), searched fused (the decoder's gathers and joins in
    ``step_kernels``' kernels, on FP16 tensors) and eager: the same hypotheses and float64
    scores to the last bit, with the language models and the tag bonus."""
    captioner = Captioner(default_model_dir, backend="torch", device="cpu", search="device")
    backend = captioner.backend
    backend._setup(*TorchBackend._build(backend.manifest), "cpu", fp16=True, fp32_logits=fp32_logits)
    assert backend.decoder.embed.weight.dtype == torch.float16
    photos = [str(p) for p in example_images]
    batch = np.stack([preprocess([load_rgb(p)], captioner.manifest.preprocessing)[0] for p in photos])
    encoded = backend.encode(batch.astype(np.float16))
    options = CaptionOptions(n_best=2)
    backend.device_search = TorchDeviceSearch(backend)
    eager = _search(captioner, encoded, options, on_device=True)
    steps = _count_fused_decoder_steps(monkeypatch)
    backend.device_search = TorchDeviceSearch(backend, fused=True)
    _same(eager, _search(captioner, encoded, options, on_device=True), exact=True)
    assert steps and all(dtype == torch.float16 for dtype in steps)  # the kernels on FP16 tensors


def _count_fused_decoder_steps(monkeypatch) -> list:
    """Records each step run through ``step_kernels.fused_step`` (the decoder's step in its
    kernels): the dtype of the embeddings its row kernel gathered."""
    from edgecap.decoding import step_kernels

    steps: list = []
    real = step_kernels.gather_rows

    def gather_rows(embed, *args, **kwargs):
        steps.append(embed.dtype)
        return real(embed, *args, **kwargs)

    monkeypatch.setattr(step_kernels, "gather_rows", gather_rows)
    return steps


@needs_triton
def test_the_logits_shift_kernel_takes_each_rows_maximum():
    """``lm_kernels._shift``: each row's logits plus their bias, their maximum and the logits
    less it, exactly (a log-sum-exp gives nearly the same result whatever it is shifted by, so
    the bias alone would hide a wrong maximum): rows whose logits are all far below zero (a
    maximum over the masked lanes would be 0) and rows spanning over 200, whose maximum is in
    the first block, the last (part full) block or elsewhere."""
    from edgecap.decoding import lm_kernels

    rng = np.random.default_rng(3)
    R, V = 4, 2500
    BV = lm_kernels.WORDS_AT_A_TIME
    block = -(-R * V // 128) * 128
    flat = torch.from_numpy(rng.normal(size=2 * block).astype(np.float32))
    raw = flat.as_strided((2, R, V), (block, V, 1))
    bias = torch.from_numpy(rng.normal(size=(2, 1, V)).astype(np.float32))
    bias[1] -= 150.0  # the second model's every logit far below zero
    bias[0, 0, :BV] += 100.0  # the first model's rows span over 200 ...
    raw[0, 1, BV + 7] += 300.0  # ... and this row's maximum is in the second block
    raw[0, 2, V - 1] += 300.0  # this one's at the last word, in the part-full last block
    shifted = torch.empty((2, R, V))
    top = torch.empty((2, R))
    lm_kernels._kernels()["_shift"][(2 * R,)](flat, block, bias, shifted, top, R, V, BV=BV)
    logits = raw + bias
    assert torch.equal(top, logits.max(2).values)
    assert torch.equal(shifted, logits - top[:, :, None])
    assert top[1].max() < -100 and top[0, 1] > 250 and top[0, 2] > 250
    assert logits[0, 1].argmax() == BV + 7 and logits[0, 2].argmax() == V - 1


@needs_triton
@pytest.mark.parametrize("beam, launched", [(10, True), (11, False)])
def test_a_beam_too_wide_for_the_kernel_runs_the_eager_step(beam, launched, monkeypatch):
    """The kernel ranks an image's candidates pairwise in one program: beam 10 (10 x 11 = 110
    candidates, 128 padded) runs it, beam 11 (132) the eager step; the numpy search's
    hypotheses either way."""
    from edgecap.decoding import device_kernel

    backend = PrefixHashBackend(vocab_size=40, top_k=14, end_bias=-0.5, seed=5)
    options = CaptionOptions(beam_size=beam, max_length=5, n_best=3, no_repeat_ngram=2)
    launches = []
    real = device_kernel.bookkeeping

    def counted(*args, **kwargs):
        launches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(device_kernel, "bookkeeping", counted)
    seeds = np.array([3, 7])
    host = search_with_tags(backend, backend.encode(seeds), options, START, END, 40, None)
    _same(host, _device(backend, backend.encode(seeds), options, fixed=FUSED))
    assert bool(launches) == launched


@needs_triton
def test_fused_search_goes_with_the_device_search_on_a_gpu(tiny_model_dir, monkeypatch):
    manifest = load_manifest(tiny_model_dir)
    for where in ("auto", "host"):
        with pytest.raises(ValueError, match=f"fused_search=True .* search='device', got search='{where}'"):
            TorchBackend(manifest, device="cpu", search=where, fused_search=True)
    with pytest.raises(ValueError, match="one or the other"):
        TorchBackend(manifest, device="cpu", search="device", fused_search=True, compile_search=True)
    backend = TorchBackend(manifest, device="cpu", search="device", fused_search=True)
    assert backend.device_search.search.fused and "beam search on the device (fused)" in backend.describe()
    graphed = TorchBackend(
        manifest, device="cpu", search="device", fused_search=True, graph_factory=EagerGraph
    )
    assert graphed.device_search.graphs is not None and graphed.device_search.search.fused
    assert not TorchBackend(manifest, device="cpu", search="device").device_search.search.fused
    # on the CPU the kernel runs only in Triton's interpreter; without triton, not at all
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="on a CUDA GPU, not on cpu"):
        TorchBackend(manifest, device="cpu", search="device", fused_search=True)
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(BackendError, match="install triton"):
        Captioner(tiny_model_dir, backend="torch", device="cpu", search="device", fused_search=True)


def test_compile_search_goes_with_the_device_search(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir)
    for where in ("auto", "host"):
        with pytest.raises(ValueError, match=f"compile_search=True .* search='device', got search='{where}'"):
            TorchBackend(manifest, device="cpu", search=where, compile_search=True)
    backend = TorchBackend(manifest, device="cpu", search="device", compile_search=True)
    assert backend.device_search.search.compiled
    graphed = TorchBackend(
        manifest, device="cpu", search="device", compile_search=True, graph_factory=EagerGraph
    )
    assert graphed.device_search.graphs is not None and graphed.device_search.search.compiled
    assert "beam search on the device (compiled)" in backend.describe()
    assert not TorchBackend(manifest, device="cpu", search="device").device_search.search.compiled


def test_the_compiled_device_search_captions_as_the_numpy_search(shipped, monkeypatch):
    """``compile_search=True``: the fixed-shape search through ``torch.compile`` (TorchInductor
    on the CPU here) gives the numpy loop's captions on the example photos, plain and inside
    the whole-decode graph (``EagerGraph``). Short captions keep the compile short."""
    captioner, encoded, _ = shipped
    backend = captioner.backend
    options = CaptionOptions(max_length=8, n_best=2)
    host = _search(captioner, encoded, options, on_device=False)
    kept = backend.device_search
    made = []
    real = device_module._compiled_step

    def compiled_step():
        made.append(1)
        return real()

    monkeypatch.setattr(device_module, "_compiled_step", compiled_step)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        backend.device_search = TorchDeviceSearch(backend, compiled=True)
        _same(host, _search(captioner, encoded, options, on_device=True), exact=False)
        backend.device_search = TorchDeviceSearch(backend, EagerGraph, compiled=True)
        _same(host, _search(captioner, encoded, options, on_device=True), exact=False)
    finally:
        backend.device_search = kept
    # both searches ran the compiled step (made for the plain search's call and for the
    # graphs' capture), compiled by torch
    assert len(made) == 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs


def test_past_the_recompile_limit_a_new_shape_runs_uncompiled_not_raises(tiny_model_dir, monkeypatch, caplog):
    """``compile_search=True`` with ``torch._dynamo``'s recompile limit at 1 (8 by default: a
    service meets more batch sizes and plans): the first shape compiles, a second one runs the
    uncompiled step with a warning, once, instead of dynamo's ``FailOnRecompileLimitHit``
    (``fullgraph=True`` makes it raise), and its hypotheses are the uncompiled search's. Dynamo
    is asked once for that shape, not at every step of every search after (each time its
    guards and a logged warning of several lines). A counting backend stands in for
    TorchInductor."""
    from torch._dynamo.testing import CompileCounter

    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu", search="device")
    counter = CompileCounter()
    torch._dynamo.reset()  # no graphs of other tests' compiles of ``_step``
    compiled = device_module._compile(counter)
    monkeypatch.setattr(device_module, "_compiled_step", lambda: compiled)
    options = CaptionOptions(beam_size=3, max_length=6, n_best=2)
    rng = np.random.default_rng(0)
    batches = {n: backend.encode(rng.normal(size=(n, 3, 224, 224)).astype(np.float32)) for n in (2, 3)}

    def search(n: int, compiled: bool) -> list:
        backend.device_search = TorchDeviceSearch(backend, compiled=compiled)
        return backend.device_search(batches[n], options, START, END, None, None)

    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            first = search(2, True)
            assert counter.frame_count == 1
            with pytest.warns(UserWarning, match="recompile limit"):
                second = search(3, True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again = search(3, True)  # said once
            assert counter.frame_count == 1
            search(2, True)  # the shape compiled first: no compile again
            assert counter.frame_count == 1
        hits = [r for r in caplog.records if "recompile_limit" in r.getMessage()]
        assert len(hits) == 1  # dynamo asked once for the shape past the limit
        for got, n in ((first, 2), (second, 3), (again, 3)):
            _same(search(n, False), got, exact=False)
    finally:
        torch._dynamo.reset()


def test_the_compiled_step_compiles_once_per_shape_plain_and_in_the_decode_graph(tiny_model_dir, monkeypatch):
    """``compile_search=True`` compiles once per batch shape (``_compiled_step``), whether the
    search runs plain or inside the whole-decode graph: both run in inference mode. Before, the
    graph's ran under ``no_grad`` and the plain one under ``inference_mode``, so the tensors'
    dispatch keys failed dynamo's guards and a shape used both ways compiled twice (12-25 s a
    shape on a 2-core CPU). Dynamo's frame count, a counting backend standing in for
    TorchInductor: plain, graphed, plain, graphed at 2 images: 1; the same at 3 images: 2."""
    from torch._dynamo.testing import CompileCounter

    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu", search="device")
    counter = CompileCounter()
    torch._dynamo.reset()  # no graphs of other tests' compiles of ``_step``
    compiled = torch.compile(device_module._step, fullgraph=True, dynamic=False, backend=counter)
    monkeypatch.setattr(device_module, "_compiled_step", lambda: compiled)
    options = CaptionOptions(beam_size=3, max_length=6, n_best=2)
    rng = np.random.default_rng(0)

    def search(n: int, capture) -> list:
        backend.device_search = TorchDeviceSearch(backend, capture, compiled=True)
        encoded = backend.encode(rng.normal(size=(n, 3, 224, 224)).astype(np.float32))
        return backend.device_search(encoded, options, START, END, None, None)

    try:
        for n, compiles in ((2, 1), (3, 2)):
            for capture in (None, EagerGraph, None, EagerGraph):
                assert len(search(n, capture)) == n
            assert counter.frame_count == compiles
    finally:
        torch._dynamo.reset()


def test_the_compiled_step_compiles_once_across_the_decode_graphs_parts(tiny_model_dir, monkeypatch):
    """At the default ``max_length`` of 20 the whole decode is four graphs (steps 0-7, 8-11,
    12-15, 16-19: ``DECODE_CHECKS``), each part after the first starting from the carry the
    one before it kept. The compiled step guards on its inputs' strides (static shapes), so
    those kept buffers have the carry's own strides (the rank and model sums are columns of one
    (R + 1, 4) tensor, stride 4): plain, graphed, plain, graphed at 2 images compile once
    (Dynamo's frame count, a counting backend standing in for TorchInductor). Before, the
    buffers were contiguous copies and the parts after the first compiled the step again
    ("carry[3] stride mismatch"): twice the compile per shape (25 s cold on a 2-core CPU), and
    the shapes Dynamo's recompile limit lets compile halved."""
    from torch._dynamo.testing import CompileCounter

    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu", search="device")
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(device_module._step, fullgraph=True, dynamic=False, backend=counter)
    monkeypatch.setattr(device_module, "_compiled_step", lambda: compiled)
    options = CaptionOptions(beam_size=3, max_length=20, n_best=2)
    assert len(device_module._segments(options.max_length, DECODE_CHECKS)) == 4
    rng = np.random.default_rng(0)
    try:
        for capture in (None, EagerGraph, None, EagerGraph):
            backend.device_search = TorchDeviceSearch(backend, capture, compiled=True)
            encoded = backend.encode(rng.normal(size=(2, 3, 224, 224)).astype(np.float32))
            assert len(backend.device_search(encoded, options, START, END, None, None)) == 2
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_torch_step_is_the_backend_session(tiny_model_dir):
    """``TorchStep`` (what the device search drives on a GPU) and the backend's own session
    give the same search on a tiny random model (a step with h/c on the device)."""
    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu")
    images = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    encoded = backend.encode(images)
    vocab = backend.decoder.cfg.vocab_size
    options = CaptionOptions(beam_size=3, max_length=7, n_best=2)
    host = search_with_tags(backend, encoded, options, START, END, vocab, None)
    search = DeviceBeamSearch(vocab, torch.device("cpu"))
    for fixed in (False, True):
        with torch.inference_mode():
            device = search.search(
                lambda index: TorchStep(backend.step_graph, encoded.tensors, index),
                3,
                options,
                backend.top_k,
                START,
                END,
                Rules(),
                fixed=fixed,
            )
        _same(host, device, exact=True)


def test_an_fp16_decoder_behind_an_fp32_encoder_keeps_the_captions(shipped):
    """FP16 as the CUDA path runs it (``fp16=True, fp32_encoder=True``: the log-softmax, the
    attention softmax and the word bias in FP32 inside the step, the scores summed in float64
    by the search), emulated on the CPU: the example photos' captions are FP32's."""
    captioner, encoded, photos = shipped
    manifest = captioner.manifest
    half = TorchBackend.__new__(TorchBackend)
    half._setup(*TorchBackend._build(manifest), "cpu", fp16=True, fp32_encoder=True)
    half.on_device, half.manifest = True, manifest
    half.device_search = TorchDeviceSearch(half)
    assert half.encoder._conv_head.weight.dtype == torch.float32
    assert half.decoder.lstm.weight_ih.dtype == torch.float16
    assert "fp16 decoder, fp32 encoder" in half.describe()
    batch = np.stack([preprocess([load_rgb(p)], manifest.preprocessing)[0] for p in photos])
    with torch.inference_mode():
        encoded16 = half.encode(batch)
    assert encoded16.tensors["features"].dtype == torch.float16
    np.testing.assert_allclose(encoded16.class_probs, encoded.class_probs, atol=1e-5)
    options = CaptionOptions()
    want = _search(captioner, encoded, options, on_device=False)
    got = captioner_search(captioner, encoded16, options, backend=half)
    assert [h[0].tokens for h in got] == [h[0].tokens for h in want]
    assert [h[0].score for h in got] == pytest.approx([h[0].score for h in want], abs=0.01)
    with pytest.raises(ValueError, match="fp32_encoder=True goes with fp16=True"):
        TorchBackend(manifest, device="cpu", fp32_encoder=True)


def test_the_fp16_step_computes_its_word_logits_in_fp32(shipped):
    """The FP16 decoder's word logits come out of an FP32 projection: logits of 8 to 16 (the
    shipped model's best words reach ~10) would be rounded to multiples of 2^-7 in FP16, an
    error of up to 2^-8 in each log-probability, the size of the gaps a beam is decided by
    (benchmarks/results/fp16_emulation.md: 6 of 360 captions). With the FP32 projection only
    the FP16 inputs' rounding is left: over 12 greedy steps of the example photos the top 10
    log-probabilities stay within 2^-9 of FP32's (measured 0.0014; FP16 logits: 0.0051)."""
    captioner, encoded, _ = shipped
    half = TorchBackend.__new__(TorchBackend)
    half._setup(*TorchBackend._build(captioner.manifest), "cpu", fp16=True, fp32_encoder=True)
    full, low = captioner.backend.decoder, half.decoder
    t = encoded.tensors
    n = t["h0"].shape[0]
    tokens, h, c = torch.full((n,), captioner.vocab.start), t["h0"], t["c0"]
    worst = 0.0
    with torch.inference_mode():
        for _ in range(12):
            logits, h32, c32, _ = full.logits(tokens, h, c, t["features"], t["att_proj"])
            logits16 = low.logits(tokens, h.half(), c.half(), t["features"].half(), t["att_proj"].half())[0]
            assert logits16.dtype == torch.float32
            want, got = torch.log_softmax(logits, 1), torch.log_softmax(logits16, 1)
            top = want.topk(10, 1).indices
            worst = max(worst, float((want.gather(1, top) - got.gather(1, top)).abs().max()))
            tokens, h, c = logits.argmax(1), h32, c32
    assert 0 < worst < 2**-9


# -- on a real GPU (``pytest -m gpu``; deselected by default, run by benchmarks/gpu_check.py) ----


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_the_device_search_on_the_gpu_captions_as_the_host_search(default_model_dir, example_images, graphs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    photos = [str(p) for p in example_images] * 3  # batches of 8 and 4
    host = Captioner(default_model_dir, backend="torch", device="cuda", search="host", cuda_graphs=graphs)
    device = Captioner(default_model_dir, backend="torch", device="cuda", search="device", cuda_graphs=graphs)
    assert device.backend.on_device
    for _ in range(2):  # the second time through the captured graphs
        want, got = host.caption_batch(photos), device.caption_batch(photos)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-4)
    if graphs:
        assert device.backend.device_search.graphs.graphs.made == 2


@pytest.mark.gpu
def test_the_compiled_search_on_the_gpu_captions_as_the_host_search(default_model_dir, example_images):
    """``compile_search=True`` inside the whole-decode CUDA graph (one batch shape: one compile
    of the step, then the capture of 20 calls of it) gives the host search's captions."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    photos = [str(p) for p in example_images] * 2  # one batch of 8
    host = Captioner(default_model_dir, backend="torch", device="cuda", search="host", cuda_graphs=True)
    compiled = Captioner(
        default_model_dir,
        backend="torch",
        device="cuda",
        search="device",
        cuda_graphs=True,
        compile_search=True,
    )
    for _ in range(2):  # the second time through the captured graph
        want, got = host.caption_batch(photos), compiled.caption_batch(photos)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the fused search's kernel compiled by Triton: needs triton, and TRITON_INTERPRET=0 "
    "(benchmarks/gpu_check.py runs the gpu tests so)",
)
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_the_fused_search_on_the_gpu_is_the_device_search(default_model_dir, example_images, graphs, fp16):
    """``fused_search=True`` on CUDA (the Triton kernels compiled for the GPU: the bookkeeping,
    the language models' and the decoder step's; inside the whole-decode CUDA graph with
    ``graphs``) gives the eager device search's captions and scores exactly, FP32 and with the
    FP16 decoder (``fp16=True``); and in FP32 the host search's captions."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    photos = [str(p) for p in example_images] * 3  # batches of 8 and 4
    made = {
        name: Captioner(
            default_model_dir,
            backend="torch",
            device="cuda",
            search=search,
            cuda_graphs=graphs,
            fp16=fp16,
            **extra,
        )
        for name, search, extra in (
            ("host", "host", {}),
            ("device", "device", {}),
            ("fused", "device", {"fused_search": True}),
        )
    }
    for _ in range(2):  # the second time through the captured graphs
        host, device, fused = (made[name].caption_batch(photos) for name in ("host", "device", "fused"))
        assert [c.text for c in fused] == [c.text for c in device]
        assert [c.score for c in fused] == [c.score for c in device]
        if not fp16:  # FP16's host and device searches may part at a near tie
            assert [c.text for c in device] == [c.text for c in host]


@pytest.mark.gpu
def test_the_whole_decode_with_conditional_nodes_on_the_gpu_captions_as_the_parts(
    default_model_dir, example_images
):
    """Where this PyTorch has CUDA graph conditional nodes (``torch_graphs.conditional_nodes``),
    the whole decode captured as one graph with them: captured without falling back, the same
    captions and scores as the parts with a host check between, and as many steps run (the
    parts stop at the first check after every image is done: tested on the CPU)."""
    from edgecap.backends.torch_graphs import conditional_nodes, conditionals_wanted

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not conditional_nodes():
        pytest.skip(f"torch {torch.__version__} has no CUDA graph conditional nodes")
    if not conditionals_wanted():
        pytest.skip("EDGECAP_GRAPH_CONDITIONALS=0 (gpu_check.py's probe of them failed)")
    photos = [str(p) for p in example_images]
    made = {
        name: Captioner(default_model_dir, backend="torch", device="cuda", search="device", cuda_graphs=True)
        for name in ("conditional", "parts")
    }
    made["parts"].backend.device_search.graphs.use_conditional(False)
    for batch in (photos[1:3], photos * 2):  # ending early; a batch of 8 with the astronaut
        for _ in range(2):  # the second time through the captured graphs
            got = {name: cap.caption_batch(batch) for name, cap in made.items()}
            assert [c.text for c in got["conditional"]] == [c.text for c in got["parts"]]
            assert [c.score for c in got["conditional"]] == [c.score for c in got["parts"]]
            steps = {name: cap.backend.device_search.graphs.last_steps for name, cap in made.items()}
            assert steps["conditional"] == steps["parts"]
        graphs = made["conditional"].backend.device_search.graphs
        assert graphs.conditional_error is None and graphs.conditional is not None
        assert all(e.packing is None for e in graphs.graphs.entries.values())
