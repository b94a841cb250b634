"""Beam search: against a plain list-based reference on a prefix-dependent fake model."""

from __future__ import annotations

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, length_normalised
from helpers import plain_search as beam_search
from fakes import END, START, PrefixHashBackend
from helpers import TableBackend, has_repeated_ngram


def search_options(**fields) -> CaptionOptions:
    """Options with repeated n-grams allowed (the default blocks trigrams), as the reference
    search below allows them; ``fields`` override."""
    return CaptionOptions(**{"no_repeat_ngram": 0, **fields})


def reference_beam_search(backend, seed, beam, max_length, penalty=None):
    """Textbook beam search, one image, lists and the full distribution."""
    live = [([], 0.0, PrefixHashBackend.next_state(seed, START))]
    finished = []
    ending = None  # the best caption any live beam could have ended as (<end> in its top K)
    for t in range(max_length):
        cands = []
        for words, lp, state in live:
            dist = backend.logprobs(state)
            if t > 0 and not finished and END in np.argsort(-dist, kind="stable")[: backend.top_k]:
                option = (words, lp + dist[END], True)
                if ending is None or (length_normalised(option[1], len(words) + 1, penalty), option[1]) > (
                    length_normalised(ending[1], len(ending[0]) + 1, penalty),
                    ending[1],
                ):
                    ending = option
            top = np.argsort(-dist, kind="stable")[: backend.top_k][: beam + 1]
            for w in top:
                cands.append((lp + dist[w], words, int(w), state))
        cands.sort(key=lambda c: -c[0])  # stable: ties keep beam-then-rank order
        live = []
        for score, words, w, state in cands:
            if len(live) == beam:
                break
            if w == END:
                if t == 0:
                    continue
                if len(finished) < beam:
                    finished.append((words, score, True))
                continue
            live.append((words + [w], score, PrefixHashBackend.next_state(state, w)))
        if len(finished) >= beam:
            break
    else:
        finished += [(w, lp, False) for w, lp, _ in live][: beam - len(finished)]
    if ending is not None and not any(f[2] for f in finished):
        finished.append(ending)  # never a caption cut mid-phrase when one could have ended
    # captions that ended first, then those cut at max_length; each by normalised score
    ranked = sorted(
        finished, key=lambda f: (not f[2], -length_normalised(f[1], len(f[0]) + f[2], penalty), -f[1])
    )
    return ranked[:beam]


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
@pytest.mark.parametrize("end_bias", [-1.0, 1.5])
def test_matches_reference_for_every_image_of_a_batch(beam, end_bias):
    backend = PrefixHashBackend(vocab_size=9, top_k=5, end_bias=end_bias)
    seeds = np.array([3, 11, 42, 7])
    opts = search_options(beam_size=beam, max_length=8, n_best=beam)
    result = beam_search(backend, backend.encode(seeds), opts, START, END)
    assert len(result) == len(seeds)
    for seed, hyps in zip(seeds, result):
        ref = reference_beam_search(backend, int(seed), beam, 8)
        assert [h.tokens for h in hyps] == [r[0] for r in ref]
        np.testing.assert_allclose([h.log_prob for h in hyps], [r[1] for r in ref], rtol=1e-5)
        # the score: the mean log-probability per word, a caption's <end> counted as a word
        assert [h.finished for h in hyps] == [r[2] for r in ref]
        np.testing.assert_allclose(
            [h.score for h in hyps], [r[1] / (len(r[0]) + r[2]) for r in ref], rtol=1e-5
        )


def test_batch_equals_images_alone():
    backend = PrefixHashBackend(end_bias=0.5)
    seeds = np.array([5, 6, 7, 8, 9])
    opts = search_options(beam_size=3, max_length=10)
    together = beam_search(backend, backend.encode(seeds), opts, START, END)
    for seed, hyps in zip(seeds, together):
        alone = beam_search(backend, backend.encode(np.array([seed])), opts, START, END)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]


def test_beam_one_is_greedy():
    backend = PrefixHashBackend(end_bias=0.5)
    hyp = beam_search(backend, backend.encode(np.array([13])), search_options(beam_size=1), START, END)[0][0]
    state, words = PrefixHashBackend.next_state(13, START), []
    while True:
        dist = backend.logprobs(state)
        if len(words) == 0:
            dist[END] = -np.inf
        w = int(np.argmax(dist))
        if w == END or len(words) == 20:
            break
        words.append(w)
        state = PrefixHashBackend.next_state(state, w)
    assert hyp.tokens == words


def test_never_empty_and_cut_at_max_length_when_end_is_unlikely():
    backend = PrefixHashBackend(end_bias=-50.0)  # <end> practically never wins
    result = beam_search(backend, backend.encode(np.arange(3)), search_options(max_length=6), START, END)
    for hyps in result:
        assert len(hyps[0].tokens) == 6 and not hyps[0].finished


def test_max_length_counts_the_steps_of_the_search_its_end_among_them():
    """CaptionOptions.max_length (--max-length N) is the search's steps, the end one of them (as
    max_new_tokens in Hugging Face's generate): a caption of N - 1 words can end; one of N words
    cannot, however likely its end was next. Here "a b c" then <end> at -0.01: with N = 3 the
    search ends where it could within its steps, "a b" (its <end> among the step's top words)."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c"]
    rows = {(): {"a": -0.1}, ("a",): {"b": -0.1}, ("a", "b"): {"c": -0.1}, ("a", "b", "c"): {"<end>": -0.01}}
    backend = TableBackend(words, lambda prefix: rows.get(prefix, {"<end>": -0.01}), top_k=4)
    for max_length, caption in ((4, ["a", "b", "c"]), (3, ["a", "b"])):
        options = search_options(beam_size=1, max_length=max_length)
        [hyps] = beam_search(backend, backend.encode(np.zeros((1, 1))), options, 1, 2)
        assert ([words[w] for w in hyps[0].tokens], hyps[0].finished) == (caption, True)


def test_a_caption_that_ended_and_one_cut_at_max_length_each_come_once():
    """Beam 2, max_length 3: "a" then <end> (-0.2) ends at the second step; "a dog runs" (-0.4)
    is still going when the steps run out. n_best 2: the caption that ended, then the one cut,
    each once."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "cat"]
    rows = {(): {"a": -0.1, "cat": -5.0}, ("a",): {"<end>": -0.1, "dog": -0.2}, ("a", "dog"): {"runs": -0.1}}
    backend = TableBackend(words, lambda prefix: rows.get(prefix, {}), top_k=4)
    options = search_options(beam_size=2, max_length=3, n_best=2)
    [hyps] = beam_search(backend, backend.encode(np.zeros((1, 1))), options, 1, 2)
    said = [([words[w] for w in h.tokens], h.finished) for h in hyps]
    assert said == [(["a"], True), (["a", "dog", "runs"], False)]
    assert [h.log_prob for h in hyps] == pytest.approx([-0.2, -0.4])


def test_first_word_is_never_end():
    backend = PrefixHashBackend(end_bias=50.0)  # <end> always the likeliest word
    for hyps in beam_search(backend, backend.encode(np.arange(4)), search_options(beam_size=3), START, END):
        assert len(hyps[0].tokens) == 1 and hyps[0].finished


def test_stops_early_when_every_image_is_done():
    backend = PrefixHashBackend(end_bias=3.0)
    beam_search(backend, backend.encode(np.arange(2)), search_options(max_length=20), START, END)
    assert backend.steps < 20


def test_n_best_sorted_and_deterministic():
    backend = PrefixHashBackend(end_bias=0.5)
    opts = search_options(beam_size=4, n_best=4)
    a = beam_search(backend, backend.encode(np.array([21])), opts, START, END)[0]
    b = beam_search(backend, backend.encode(np.array([21])), opts, START, END)[0]
    assert [h.tokens for h in a] == [h.tokens for h in b]
    scores = [h.score for h in a]
    assert scores == sorted(scores, reverse=True) and len(a) == 4


def test_attention_follows_the_reordered_rows():
    backend = PrefixHashBackend(end_bias=0.5)
    hyps = beam_search(
        backend,
        backend.encode(np.array([4, 9])),
        search_options(beam_size=3),
        START,
        END,
        return_attention=True,
    )
    for seed, (hyp,) in zip([4, 9], hyps):
        state = PrefixHashBackend.next_state(seed, START)
        assert hyp.attention.shape == (len(hyp.tokens), 4)
        for i, w in enumerate(hyp.tokens):
            assert hyp.attention[i, 0] == pytest.approx(0.25 + (state % 7) / 100.0, abs=1e-6)
            state = PrefixHashBackend.next_state(state, w)


class _PrefixAttentionBackend(TableBackend):
    """A table decoder whose attention names the row's input prefix: region 0 its length,
    region 1 its last word (0 for the empty prefix)."""

    def start(self, encoded, image_index, return_attention=False):
        session = super().start(encoded, image_index, return_attention)
        step = session._step

        def _step(tokens, source_rows, word_bias=None):
            result = step(tokens, source_rows, word_bias)
            if result.alpha is not None:
                result.alpha[:] = 0.0
                for row, prefix in enumerate(session.prefixes):
                    result.alpha[row, 0] = len(prefix)
                    result.alpha[row, 1] = self.index[prefix[-1]] if prefix else 0
            return result

        session._step = _step
        return session


def test_attention_follows_the_back_pointers_across_rows():
    """Beam 2: word 1 "a" (-0.1, row 0), "cat" (-0.2, row 1); word 2 both new beams continue
    row 1 ("cat runs" -0.3, "cat fast" -0.5; "a dog" is -3.1), so the best caption's second
    word was chosen in row 1 and its rows moved. Word 3 both end ("cat runs <end>" -0.4,
    "cat fast <end>" -2.5). The best caption "cat runs" (ids 5 6) attended, word by word, from
    the prefixes () and ("cat",): [[0, 0], [1, 5]] in regions 0-1."""
    words = ["<pad>", "<start>", "<end>", "a", "dog", "cat", "runs", "fast"]
    rows = {
        (): {"a": -0.1, "cat": -0.2},
        ("a",): {"dog": -3.0, "runs": -3.5},
        ("cat",): {"runs": -0.1, "fast": -0.3},
        ("cat", "runs"): {"<end>": -0.1},
    }
    backend = _PrefixAttentionBackend(words, lambda prefix: rows.get(prefix, {"<end>": -2.0}))
    options = search_options(beam_size=2, n_best=2, max_length=5)
    encoded = backend.encode(np.zeros((1, 3, 2, 2), np.float32))
    (hyps,) = beam_search(backend, encoded, options, START, END, return_attention=True)
    assert [[words[w] for w in h.tokens] for h in hyps] == [["cat", "runs"], ["cat", "fast"]]
    for hyp in hyps:
        np.testing.assert_array_equal(hyp.attention, [[0, 0, 0, 0], [1, 5, 0, 0]])


@pytest.mark.parametrize(
    "bad",
    [
        dict(beam_size=0),
        dict(beam_size=6),
        dict(max_length=0),
        dict(n_best=4, beam_size=3),
        dict(length_penalty=-1.0),
    ],
)
def test_bad_options_are_rejected(bad):
    backend = PrefixHashBackend(top_k=5)
    with pytest.raises(ValueError):
        beam_search(backend, backend.encode(np.array([1])), search_options(**bad), START, END)


def test_non_finite_step_output_is_a_backend_error():
    from edgecap.errors import BackendError

    class NaNBackend(PrefixHashBackend):
        def logprobs(self, state):
            out = super().logprobs(state)
            out[:] = np.nan
            return out

    backend = NaNBackend()
    with pytest.raises(BackendError, match="non-finite"):
        beam_search(backend, backend.encode(np.array([1])), search_options(), START, END)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_an_overflowed_step_output_is_a_backend_error(value):
    """Not only NaN: a step whose log-probabilities overflowed (+inf, as an FP16 engine out of
    range gives, or -inf on every word) is refused too, naming the word (the first), rather
    than searched on: every log-probability of the fake step is set to ``value``."""
    from edgecap.errors import BackendError

    class OverflowBackend(PrefixHashBackend):
        def logprobs(self, state):
            out = super().logprobs(state)
            out[:] = value
            return out

    backend = OverflowBackend()
    with pytest.raises(BackendError, match="non-finite log-probabilities at word 1"):
        beam_search(backend, backend.encode(np.array([1])), search_options(), START, END)


def test_no_repeat_ngram_blocks_repeated_trigrams():
    # A small vocabulary and no <end>: long captions repeat themselves without the block.
    backend = PrefixHashBackend(vocab_size=5, top_k=4, end_bias=-50.0)
    seeds = np.arange(6)
    plain = beam_search(backend, backend.encode(seeds), search_options(max_length=15), START, END)
    assert any(has_repeated_ngram(h[0].tokens, 3) for h in plain)
    blocked = beam_search(
        backend, backend.encode(seeds), search_options(max_length=15, no_repeat_ngram=3), START, END
    )
    for hyps in blocked:
        assert hyps and not has_repeated_ngram(hyps[0].tokens, 3)
    # Trigrams are blocked by default.
    default = beam_search(backend, backend.encode(seeds), CaptionOptions(max_length=15), START, END)
    assert [h[0].tokens for h in default] == [h[0].tokens for h in blocked]


def test_a_row_whose_best_words_are_all_blocked_keeps_its_caption_so_far():
    """Beam 1 (each row's best beam + 1 = 2 words of the top K are its candidates, then the
    rules filter them), no repeated bigram: "a dog a cat a" then "dog" (a dog again) and "cat"
    (a cat again) are blocked; "runs", the third word, is not among the row's candidates, and
    no "<end>" is in any top K: the caption is the live beam as it is, cut there (unfinished),
    not "a dog a cat a runs" and not no caption at all."""
    words = ["<pad>", "<start>", "<end>", "a", "dog", "cat", "runs"]
    rows = {
        (): {"a": -0.1, "dog": -1.0, "cat": -1.1},
        ("a",): {"dog": -0.1, "a": -1.0, "cat": -1.1},
        ("a", "dog"): {"a": -0.1, "cat": -1.0, "runs": -1.1},
        ("a", "dog", "a"): {"cat": -0.1, "a": -1.0, "runs": -1.1},
        ("a", "dog", "a", "cat"): {"a": -0.1, "dog": -1.0, "runs": -1.1},
        ("a", "dog", "a", "cat", "a"): {"dog": -0.1, "cat": -0.2, "runs": -0.3},
    }
    backend = TableBackend(
        words, lambda prefix: rows.get(prefix, {"runs": -0.1, "a": -1.0, "cat": -1.1}), top_k=3
    )
    options = search_options(beam_size=1, max_length=10, no_repeat_ngram=2)
    [hyps] = beam_search(backend, backend.encode(np.zeros((1, 1))), options, START, END)
    assert [([words[w] for w in h.tokens], h.finished) for h in hyps] == [
        (["a", "dog", "a", "cat", "a"], False)
    ]
    assert hyps[0].log_prob == pytest.approx(-0.5)
