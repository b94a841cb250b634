"""The consensus choice (``edgecap.decoding.consensus``) against values worked out by hand (the
arithmetic is in the comments), and the searches' endings it chooses among.

F(h, r) = P R / (0.85 P + 0.15 R), P and R the weighted matches over h's and r's weights (a
content word 0.75, a function word 0.25); a candidate's value is sum_j w_j F(h, h_j) with
w = softmax(rank score / 0.2), plus 0.05 per tag word it says.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, Consensus, search_with_tags
from edgecap.decoding.beam import Hypothesis
from fakes import END, START, PrefixHashBackend
from helpers import TableBackend

A, DOG, RUNS, CAT = 3, 4, 5, 6  # "a" is the function word


def hyp(tokens, rank_score=-1.0) -> Hypothesis:
    return Hypothesis(list(tokens), rank_score, rank_score, True, rank_score=rank_score)


def test_agreement_weighs_recall_and_content_words():
    # h = a dog runs (0.25 + 0.75 + 0.75 = 1.75), r = a dog (1.0): matched a + dog = 1.0;
    # P = 1/1.75 = 4/7, R = 1; F = (4/7) / (0.85 * 4/7 + 0.15) = 4 / 4.45
    consensus = Consensus({A})
    assert consensus.agreement([A, DOG, RUNS], [A, DOG]) == pytest.approx(4 / 4.45)
    # the other way round P = 1, R = 4/7: F = (4/7) / (0.85 + 0.15 * 4/7) = 4 / 6.55: recall counts more
    assert consensus.agreement([A, DOG], [A, DOG, RUNS]) == pytest.approx(4 / 6.55)
    assert consensus.agreement([CAT], [DOG]) == 0.0


# H1 = dog, H2 = dog runs, H3 = cat runs (all content words: their weights cancel)
# F(H1,H2): P 1, R 1/2 -> 0.5 / 0.925 = 0.5405; F(H2,H1): P 1/2, R 1 -> 0.5 / 0.575 = 0.8696;
# F(H2,H3) = F(H3,H2): P = R = 1/2 -> 0.5; F(H1,H3) = 0
H1, H2, H3 = [DOG], [DOG, RUNS], [CAT, RUNS]


def names(hyps):
    return [{tuple(H1): "H1", tuple(H2): "H2", tuple(H3): "H3"}[tuple(h.tokens)] for h in hyps]


def test_equally_likely_captions_the_one_the_others_agree_with_wins():
    # equal rank scores, w = 1/3 each: U(H1) = (1 + 0.5405) / 3 = 0.514,
    # U(H2) = (0.8696 + 1 + 0.5) / 3 = 0.790, U(H3) = (0.5 + 1) / 3 = 0.5
    order = Consensus(()).order([hyp(H1), hyp(H2), hyp(H3)])
    assert names(order) == ["H2", "H1", "H3"]


def test_a_tag_word_said_adds_005():
    # tag "cat": U(H3) = 0.5 + 0.05 = 0.55 passes U(H1) = 0.514
    order = Consensus(()).order([hyp(H1), hyp(H2), hyp(H3)], tag_words={CAT})
    assert names(order) == ["H2", "H3", "H1"]


def test_the_rank_scores_weigh_the_others_at_temperature_02():
    # H1 at -1.0, H2 and H3 at -1.2: w = 1, e^-1 = 0.3679, 0.3679 (sum 1.7358):
    # U(H1) = (1 + 0.3679 * 0.5405) / 1.7358 = 0.691, U(H2) = (0.8696 + 0.3679 + 0.1839) / 1.7358 = 0.819
    close = Consensus(()).order([hyp(H1, -1.0), hyp(H2, -1.2), hyp(H3, -1.2)])
    assert names(close)[0] == "H2"
    # H2 and H3 at -1.5: w = e^-2.5 = 0.0821 each (sum 1.1642): U(H1) = (1 + 0.0444) / 1.1642 = 0.897,
    # U(H2) = (0.8696 + 0.0821 + 0.0410) / 1.1642 = 0.853: the likeliest stays
    far = Consensus(()).order([hyp(H1, -1.0), hyp(H2, -1.5), hyp(H3, -1.5)])
    assert names(far)[0] == "H1"


def test_one_candidate_or_none_is_kept():
    consensus = Consensus(())
    assert names(consensus.order([hyp(H3)])) == ["H3"]
    assert consensus.order([]) == []


WORDS = ["<pad>", "<start>", "<end>", "a", "dog", "runs", "cat"]


def table_search(consensus):
    """Beam 1: "a" (-0.1) -> "dog" (-0.1); then "runs" (-0.1) ranks above <end> (-0.3), so
    the beam goes on to "a dog runs" and ends there (-1.9): its one finished caption. But
    "a dog" could have ended: mean per word (-0.1 - 0.1 - 0.3) / 3 = -0.1667, against
    "a dog runs" (-0.1 * 3 - 1.9) / 4 = -0.55."""
    rows = {
        (): {"a": -0.1, "cat": -3.0},
        ("a",): {"dog": -0.1, "cat": -3.0},
        ("a", "dog"): {"runs": -0.1, "<end>": -0.3},
        ("a", "dog", "runs"): {"<end>": -1.9, "cat": -3.0},
    }
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"cat": -5.0, "runs": -6.0}), top_k=2)
    image = np.zeros((1, 3, 4, 4), np.float32)
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, guidance_bonus=0.0)
    hyps = search_with_tags(
        backend, backend.encode(image), options, START, END, len(WORDS), None, consensus=consensus
    )[0]
    return [[WORDS[w] for w in h.tokens] for h in hyps]


def test_the_choice_is_among_every_place_the_search_could_have_ended():
    # without the choice: the beam's one finished caption
    assert table_search(None) == [["a", "dog", "runs"]]
    # the endings "a dog" (-0.1667) and "a dog runs" (-0.55): w = 1 and e^(-0.3833 / 0.2) =
    # 0.1471 (sum 1.1471); "a" a function word: F(a dog, a dog runs) = 4 / 6.55 = 0.6107,
    # F(a dog runs, a dog) = 4 / 4.45 = 0.8989; U(a dog) = (1 + 0.1471 * 0.6107) / 1.1471 =
    # 0.950 > U(a dog runs) = (0.8989 + 0.1471) / 1.1471 = 0.912
    assert table_search(Consensus({3})) == [["a", "dog"]]


@pytest.mark.parametrize("seed", range(6))
def test_the_choice_never_returns_an_unfinished_caption_before_a_finished_one(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(10, 30))
    backend = PrefixHashBackend(vocab_size=vocab, top_k=6, end_bias=float(rng.uniform(-3, 1.5)), seed=seed)
    options = CaptionOptions(beam_size=3, n_best=3, max_length=int(rng.integers(2, 10)))
    images = rng.integers(0, 1000, 3)
    for hyps in search_with_tags(
        backend, backend.encode(images), options, START, END, vocab, None, consensus=Consensus({4})
    ):
        assert 1 <= len(hyps) <= 3
        flags = [h.finished for h in hyps]
        assert flags == sorted(flags, reverse=True)
