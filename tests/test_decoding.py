"""The decoding layer (``edgecap.decoding``): the rules as parts, the options' thresholds as the
search reads them, and the tag constraint kept by the one beam loop."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, TagBonus, TagConstraint, beam_search, search, search_with_tags
from edgecap.decoding.rules import NeverFirst, NoRepeatNgram, Scorer, tag_bias
from edgecap.objects import ObjectClasses
from fakes import END, START, PrefixHashBackend
from helpers import TableBackend

# -- the tag bonus and its thresholds ---------------------------------------------------------------


def _first_step_bias(probability: float, **options) -> np.ndarray | None:
    """The word_bias the decoder step gets at the first word, for one image whose only class
    (naming word 7) has ``probability``."""
    backend = PrefixHashBackend(vocab_size=12, top_k=8)
    encoded = backend.encode(np.array([5]))
    encoded.class_probs = np.array([[probability]], np.float32)
    classes = ObjectClasses(("thing",), ((7,),))
    search(backend, encoded, CaptionOptions(**options), START, END, 12, classes)
    return backend.biases[0]


def test_the_tag_bonus_reads_the_guidance_threshold_not_the_constraints():
    # 0.2: above guidance_min_prob (0.1), below constraint_min_prob (0.3)
    bias = _first_step_bias(0.2)
    assert bias is not None and bias[0, 7] == 2.0 and bias[0].sum() == 2.0
    assert _first_step_bias(0.05) is None  # below both: no tag, no bias
    assert _first_step_bias(0.2, guidance_bonus=3.5)[0, 7] == 3.5
    assert _first_step_bias(0.2, guidance_bonus=0) is None


def test_the_constraint_reads_its_own_threshold():
    # constrained: 0.2 is below constraint_min_prob (0.3): searched plainly, no bias at all
    assert _first_step_bias(0.2, constrained=True) is None
    bias = _first_step_bias(0.35, constrained=True)
    assert bias is not None and bias[0, 7] == 100.0  # state 0's rows get the tag word surfaced
    assert _first_step_bias(0.2, constrained=True, constraint_min_prob=0.15) is not None


def test_the_tag_bonus_takes_the_guidance_tags_most_probable_classes():
    """Four classes naming words 7, 8, 9, 10 at probabilities 0.2, 0.5, 0.4, 0.3 (all above
    guidance_min_prob 0.1): guidance_tags=n puts the bonus on the words of the n most probable,
    8, 9, 10, 7 in that order (the default 3: not on 7)."""
    classes = ObjectClasses(("w", "x", "y", "z"), ((7,), (8,), (9,), (10,)))
    bonused = {}
    for n in (1, 2, 3, 4, None):
        backend = PrefixHashBackend(vocab_size=12, top_k=8)
        encoded = backend.encode(np.array([5]))
        encoded.class_probs = np.array([[0.2, 0.5, 0.4, 0.3]], np.float32)
        options = CaptionOptions() if n is None else CaptionOptions(guidance_tags=n)
        search(backend, encoded, options, START, END, 12, classes)
        bonused[n] = set(np.flatnonzero(backend.biases[0][0]).tolist())
    assert bonused == {1: {8}, 2: {8, 9}, 3: {8, 9, 10}, 4: {7, 8, 9, 10}, None: {8, 9, 10}}


def test_the_constraint_holds_with_the_tag_bonus_off():
    """guidance_bonus=0 (--no-objects-guidance) turns the bonus off, not the constraint: a
    constrained search still reads the image's tag words and surfaces word 7 on state 0."""
    bias = _first_step_bias(0.35, constrained=True, guidance_bonus=0)
    assert bias is not None and bias[0, 7] == 100.0 and bias[0].sum() == 100.0


def test_the_tag_bonus_switches_off_per_beam_once_it_said_a_tag_word():
    rule = TagBonus((frozenset({7}),), 10, 2.0, np.zeros(3, np.int32))
    assert (rule.bias(0, None, None)[:, 7] == 2.0).all()
    # row 0 said the tag word; rows 1 and 2 did not
    rule.update(np.array([0, 1, 2]), np.array([7, 5, 5]), np.ones(3, bool))
    np.testing.assert_array_equal(rule.bias(1, None, None)[:, 7], [0.0, 2.0, 2.0])
    # rows 0 and 1 continue row 0 (said it), row 2 continues row 1 (did not)
    rule.update(np.array([0, 0, 1]), np.array([5, 6, 5]), np.ones(3, bool))
    np.testing.assert_array_equal(rule.bias(2, None, None)[:, 7], [0.0, 0.0, 2.0])
    # a masked row is not steered; with no row steered, no bias is sent at all
    rule.update(np.array([0, 1, 2]), np.array([5, 5, 5]), np.array([True, True, False]))
    assert rule.bias(3, None, None) is None


def test_an_image_without_tag_words_is_never_steered():
    """Two images, two beams each: image 0 has no tag word, image 1 has word 7. Image 0's rows
    get nothing; once image 1's rows have said 7, no row is steered and no bias is sent at all
    (image 0's rows do not keep the bonus switched on for the batch)."""
    rule = TagBonus((frozenset(), frozenset({7})), 10, 2.0, np.repeat([0, 1], 2))
    expected = np.zeros((4, 10))
    expected[[2, 3], 7] = 2.0
    np.testing.assert_array_equal(rule.bias(0, None, None), expected)
    rule.update(np.arange(4), np.array([5, 6, 7, 7]), np.ones(4, bool))
    assert rule.bias(1, None, None) is None


# -- the tag constraint in the one loop ---------------------------------------------------------------

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits", "on", "mat"]


def _slow_cat(prefix):
    """Plain captions end soon ("a dog <end>", "a dog runs <end>"); a caption with "cat" takes
    longer ("cat sits on mat <end>")."""
    tail = {"cat": -6.0}
    if not prefix:
        return {"a": -0.1, **tail}
    last = prefix[-1]
    table = {
        "a": {"dog": -0.2},
        "dog": {"<end>": -0.05, "runs": -0.5},
        "runs": {"<end>": -0.05},
        "cat": {"sits": -0.3},
        "sits": {"on": -0.1},
        "on": {"mat": -0.1},
        "mat": {"<end>": -0.05},
    }
    return {**table.get(last, {"<end>": -0.05}), **tail}


def test_a_constrained_image_is_not_done_when_its_plain_captions_are():
    """The plain state fills its beam of finished captions (step 4) before any caption with the
    tag word has ended (step 5): the image must go on until one has."""
    backend = TableBackend(WORDS, _slow_cat, top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=2, max_length=10, no_repeat_ngram=0, constrained=True)
    [hyps] = search_with_tags(
        backend, encoded, options, START, END, len(WORDS), (frozenset({WORDS.index("cat")}),)
    )
    best = [WORDS[w] for w in hyps[0].tokens]
    assert "cat" in best and hyps[0].finished, best


def test_without_the_constraint_the_same_table_gives_the_plain_caption():
    backend = TableBackend(WORDS, _slow_cat, top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    [hyps] = search_with_tags(
        backend, encoded, CaptionOptions(beam_size=2, no_repeat_ngram=0), START, END, len(WORDS), None
    )
    assert [WORDS[w] for w in hyps[0].tokens] == ["a", "dog"]


def test_the_tag_bonus_ranks_the_candidates_but_never_enters_the_log_prob():
    """Beam 1, bonus 2 on "cat". Word 1: "a" -0.1, "cat" -1.0 + 2 = 1.0: "cat" is kept (ranked
    by the bonus, not the model's -1.0 < -0.1). Word 2: "cat <end>" -0.4, the bonus off once
    "cat" is said: log_prob -1.0 - 0.4 = -1.4, score -1.4 / 2 = -0.7, rank score
    (1.0 - 0.4) / 2 = 0.3."""
    rows = {(): {"a": -0.1, "cat": -1.0}, ("a",): {"dog": -0.2}, ("cat",): {"<end>": -0.4}}
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"<end>": -0.3}), top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, guidance_bonus=2.0)
    [[best]] = search_with_tags(
        backend, encoded, options, START, END, len(WORDS), (frozenset({WORDS.index("cat")}),)
    )
    assert [WORDS[w] for w in best.tokens] == ["cat"] and best.finished
    assert best.log_prob == pytest.approx(-1.4)
    assert best.score == pytest.approx(-0.7)
    assert best.rank_score == pytest.approx(0.3)


def test_the_tag_bias_of_each_image_is_on_its_own_tag_words():
    np.testing.assert_array_equal(
        tag_bias((frozenset(), frozenset({3, 4})), 6, 2.0),
        [[0, 0, 0, 0, 0, 0], [0, 0, 0, 2, 2, 0]],
    )


def test_the_constraint_surfaces_the_tag_words_on_state_0_rows_only():
    """Beam 2, two images: rows 0-1 image 0 state 0, rows 2-3 its state 1, rows 4-7 image 1
    likewise; SURFACE (100) on a state-0 row's own tag words, nothing on a state-1 row."""
    bias = TagConstraint((frozenset({3}), frozenset({4})), 6).surfacing_bias(np.repeat([0, 1], 4), 2)
    expected = np.zeros((8, 6))
    expected[[0, 1], 3] = 100.0
    expected[[4, 5], 4] = 100.0
    np.testing.assert_array_equal(bias, expected)


def test_each_image_of_a_constrained_batch_has_its_own_tag_words():
    """Image 0 has no tag word (its plain caption "a dog"), image 1 must say "cat" (the table
    of the test above, for both)."""
    backend = TableBackend(WORDS, _slow_cat, top_k=4)
    encoded = backend.encode(np.zeros((2, 3, 4, 4), np.float32))
    options = CaptionOptions(beam_size=2, max_length=10, no_repeat_ngram=0, constrained=True)
    tags = (frozenset(), frozenset({WORDS.index("cat")}))
    plain, tagged = search_with_tags(backend, encoded, options, START, END, len(WORDS), tags)
    assert [WORDS[w] for w in plain[0].tokens] == ["a", "dog"]
    said = [WORDS[w] for w in tagged[0].tokens]
    assert "cat" in said and tagged[0].finished, said


# -- adding a rule is adding a part ------------------------------------------------------------------


class _Ban(Scorer):
    """A test rule: a word never chosen (a large negative bias), counting its calls."""

    def __init__(self, word: int, vocab_size: int, image_index: np.ndarray):
        self.row = np.zeros((len(image_index), vocab_size), np.float32)
        self.row[:, word] = -50.0
        self.updates = 0

    def bias(self, t, tokens, source_rows):
        return self.row

    def update(self, source_rows, words, live):
        self.updates += 1


def test_a_new_scorer_plugs_into_the_loop():
    backend = PrefixHashBackend(vocab_size=12, top_k=6, end_bias=-2.0)
    seeds = np.array([3, 11, 42])
    options = CaptionOptions(beam_size=3, max_length=8, no_repeat_ngram=0)
    filters = [NeverFirst([END])]
    plain = beam_search(backend, backend.encode(seeds), options, START, END, filters=filters)
    said = {w for hyps in plain for w in hyps[0].tokens}
    banned = max(said, key=lambda w: sum(w in h[0].tokens for h in plain))
    made = []

    def factory(image_index):
        made.append(_Ban(banned, 12, image_index))
        return made[-1]

    ruled = beam_search(
        backend, backend.encode(seeds), options, START, END, filters=filters, scorers=[factory]
    )
    assert all(banned not in hyps[0].tokens for hyps in ruled)
    assert made and made[0].updates > 0
    # the caption's own log-probability never includes a rule's bias
    assert all(h[0].rank_score == pytest.approx(h[0].score) for h in ruled)


class _Boost(Scorer):
    """A test rule: ``value`` on one word for every row, every step."""

    def __init__(self, word: int, value: float, vocab_size: int, image_index: np.ndarray):
        self.row = np.zeros((len(image_index), vocab_size), np.float32)
        self.row[:, word] = value

    def bias(self, t, tokens, source_rows):
        return self.row


def test_a_constrained_search_sends_the_scorers_bias_with_the_surfacing():
    """Beam 2, one image, tag word 7: rows 0-1 state 0, rows 2-3 state 1. A scorer adds 1.5 to
    word 5 (as the fused language models add to every word): the first step's word_bias is
    that on every row plus SURFACE (100) on word 7 of the state-0 rows, so the scorer's word
    can reach the step's top K in a constrained search too."""
    backend = PrefixHashBackend(vocab_size=12, top_k=6)
    options = CaptionOptions(beam_size=2, max_length=3, no_repeat_ngram=0)
    beam_search(
        backend,
        backend.encode(np.array([4])),
        options,
        START,
        END,
        scorers=[partial(_Boost, 5, 1.5, 12)],
        partition=TagConstraint((frozenset({7}),), 12),
    )
    expected = np.zeros((4, 12))
    expected[:, 5] = 1.5
    expected[[0, 1], 7] = 100.0
    np.testing.assert_array_equal(backend.biases[0], expected)


def test_filters_are_parts_too():
    rule = NoRepeatNgram(2, END)
    rule.begin_step(0)
    assert rule.blocks(0, [4, 5, 4], 5, row=0)  # "4 5" again
    assert not rule.blocks(0, [4, 5, 4], 6, row=1)
    assert not rule.blocks(0, [4, 5, 4], END, row=2)  # <end> is never blocked
    assert NeverFirst([END]).blocks(0, [], END, 0) and not NeverFirst([END]).blocks(1, [4], END, 0)


def test_every_image_of_a_batch_keeps_its_own_rules():
    """Two images, one with a tag: the other one's captions are those of a search without tags."""
    backend = PrefixHashBackend(vocab_size=14, top_k=8, end_bias=-1.0)
    seeds = np.array([3, 11])
    options = CaptionOptions(beam_size=3, max_length=8, no_repeat_ngram=0)
    tagged = search_with_tags(
        backend, backend.encode(seeds), options, START, END, 14, (frozenset({9}), frozenset())
    )
    alone = search_with_tags(backend, backend.encode(seeds[1:]), options, START, END, 14, None)
    assert [h.tokens for h in tagged[1]] == [h.tokens for h in alone[0]]


def test_partial_factories_are_the_scorer_contract():
    backend = PrefixHashBackend(vocab_size=12, top_k=6)
    options = CaptionOptions(beam_size=2, max_length=5, no_repeat_ngram=0)
    [hyps] = beam_search(
        backend,
        backend.encode(np.array([4])),
        options,
        START,
        END,
        scorers=[partial(TagBonus, (frozenset({9}),), 12, 10.0)],
    )
    assert 9 in hyps[0].tokens


# -- the word_bias contract, one place for every backend ------------------------------------------


def test_every_backend_gets_the_word_bias_checked_by_the_base_session(any_model_dir):
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend
    from edgecap.errors import BackendError
    from edgecap.manifest import load_manifest

    manifest = load_manifest(any_model_dir)
    backend = OnnxRuntimeBackend(manifest)
    h, w = manifest.preprocessing.size
    encoded = backend.encode(np.zeros((1, 3, h, w), np.float32))
    session = backend.start(encoded, np.zeros(2, np.int32))
    tokens, rows = np.full(2, START, np.int32), np.zeros(2, np.int32)
    V = manifest.dims.vocab_size
    with pytest.raises(BackendError, match=r"shape \(2, vocabulary size\)"):
        session.step(tokens, rows, np.zeros((3, V), np.float32))
    with pytest.raises(BackendError, match="non-finite"):
        session.step(tokens, rows, np.full((2, V), np.nan, np.float32))
    # float64 and None both work: converted once, in the base class
    plain = session.step(tokens, rows, None)
    session = backend.start(encoded, np.zeros(2, np.int32))
    zeros = session.step(tokens, rows, np.zeros((2, V), np.float64))
    np.testing.assert_array_equal(plain.topk_ids, zeros.topk_ids)
