"""The consensus choice (``edgecap.decoding.consensus``) against values worked out by hand (the
arithmetic is in the comments), and the searches' endings it chooses among.

F(h, r) = P R / (0.85 P + 0.15 R), P and R the weighted matches over h's and r's weights (a
content word 0.75, a function word 0.25); a candidate's value is sum_j w_j F(h, h_j) with
w = softmax(rank score / 0.2), plus 0.05 per tag word it says, less 0.1 each time it says a
content word again and 0.1 when it ends on a word no caption ends on ("in front", "with a").
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, Consensus, search, search_with_tags
from edgecap.decoding.beam import Hypothesis
from edgecap.objects import ObjectClasses
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


def test_a_word_said_twice_matches_as_often_as_the_other_says_it():
    # h = dog dog (0.75 + 0.75 = 1.5), r = dog (0.75): dog matches min(1.5, 0.75) = 0.75 times;
    # P = 0.75 / 1.5 = 0.5, R = 1: F = 0.5 / (0.85 * 0.5 + 0.15) = 0.5 / 0.575
    consensus = Consensus(())
    assert consensus.agreement([DOG, DOG], [DOG]) == pytest.approx(0.5 / 0.575)
    # the other way round P = 1, R = 0.5: F = 0.5 / (0.85 + 0.075) = 0.5 / 0.925
    assert consensus.agreement([DOG], [DOG, DOG]) == pytest.approx(0.5 / 0.925)


def test_two_candidates_are_chosen_between_too():
    # H1, H2 equally likely (w = 1/2 each): U(H1) = (1 + 0.5405) / 2 = 0.770,
    # U(H2) = (0.8696 + 1) / 2 = 0.935: H2 first, whichever order they come in
    consensus = Consensus(())
    assert names(consensus.order([hyp(H1), hyp(H2)])) == ["H2", "H1"]
    assert names(consensus.order([hyp(H2), hyp(H1)])) == ["H2", "H1"]


def test_a_tag_word_is_worth_005_no_more_no_less():
    # H1 at -1.0 (w = 1), H2 = dog runs at -1.0 - d (w = x = e^(-d / 0.2)), tag "runs" (H2's):
    # U(H1) = (1 + 0.5405 x) / (1 + x), U(H2) = (0.8696 + x) / (1 + x) + 0.05.
    # d = 0.35, x = 0.1738: U(H1) = 0.9320, U(H2) = 0.8889 + 0.05 = 0.9389: the tag word passes
    # a gap of 0.043 (at 0.03 it would not)
    near = Consensus(()).order([hyp(H1, -1.0), hyp(H2, -1.35)], tag_words={RUNS})
    assert names(near) == ["H2", "H1"]
    # d = 0.4, x = 0.1353: U(H1) = 0.9452, U(H2) = 0.8851 + 0.05 = 0.9351: a gap of 0.060 stays
    # (at 0.1 it would not)
    far = Consensus(()).order([hyp(H1, -1.0), hyp(H2, -1.4)], tag_words={RUNS})
    assert names(far) == ["H1", "H2"]


def test_a_tag_word_said_twice_counts_once():
    # X = cat cat, Y = cat runs at -1.0 (w = 1), Z = runs at -1.6 (w = e^-3 = 0.0498; sum 2.0498).
    # F(X, Y): bags {cat 1.5} and {cat 0.75, runs 0.75}, matched 0.75, P = R = 0.5: F = 0.5 (and
    # F(Y, X) = 0.5); F(Y, Z): matched 0.75, P 0.5, R 1: 0.8696; F(X, Z) = 0.
    # U(X) = (1 + 0.5) / 2.0498 = 0.7318, U(Y) = (0.5 + 1 + 0.0498 * 0.8696) / 2.0498 = 0.7529.
    # Tag cat: each says it, +0.05 each (X 0.7818, Y 0.8029): Y first. Counted twice, X would
    # get +0.10 (0.8318) and pass Y.
    # (X says "cat" twice: the repeat term off, so that only the tag term differs)
    X, Y, Z = [CAT, CAT], [CAT, RUNS], [RUNS]
    order = Consensus((), repeat_weight=0.0).order([hyp(X), hyp(Y), hyp(Z, -1.6)], tag_words={CAT})
    assert [h.tokens for h in order] == [Y, X, Z]


def test_a_tie_keeps_the_order_given():
    # "dog runs" and "runs dog" have the same bag: F(P, j) = F(Q, j) for every j, so their values
    # tie whatever the weights; the order given (the search's, best first) decides.
    P, Q = [DOG, RUNS], [RUNS, DOG]
    consensus = Consensus(())
    assert [h.tokens for h in consensus.order([hyp(P, -1.0), hyp(Q, -1.5)])] == [P, Q]
    assert [h.tokens for h in consensus.order([hyp(Q, -1.0), hyp(P, -1.5)])] == [Q, P]
    # a third candidate "cat" at -1.2 that agrees with neither: w = 1, e^-2.5 = 0.0821, e^-1 = 0.3679
    # (sum 1.4500): U(P) = U(Q) = (1 + 0.0821) / 1.45 = 0.746 > U(cat) = 0.3679 / 1.45 = 0.254
    order = consensus.order([hyp(P, -1.0), hyp(Q, -1.5), hyp([CAT], -1.2)])
    assert [h.tokens for h in order] == [P, Q, [CAT]]


def test_the_weighted_sums_add_left_to_right_on_every_python():
    # Eight one-word candidates: "dog" at 2, 3, 6, 7 and "cat" at 0, 1, 4, 5, the same four rank
    # scores each (-0.05, -0.1, -0.22, -0.49: w = 1, e^-0.25, e^-0.85, e^-2.2), so exactly their
    # values tie (F = 1 with their own word, 0 with the other). In floating point, left to right
    # in the order given: dog 1 + e^-0.85 + e^-0.25 + e^-2.2 = 2.317018873382466, cat e^-2.2 + 1
    # + e^-0.85 + e^-0.25 = 2.3170188733824655, one unit in the last place less: dog first. A
    # pairwise (numpy's sum of eight) or compensated (Python 3.12's sum()) total rounds both to
    # 2.3170188733824655, a tie, and the order given would put cat first.
    scores = [-0.49, -0.05, -0.05, -0.22, -0.22, -0.1, -0.1, -0.49]
    words = [CAT, CAT, DOG, DOG, CAT, CAT, DOG, DOG]
    hyps = [hyp([word], score) for word, score in zip(words, scores)]
    order = Consensus(()).order(hyps)
    assert [hyps.index(h) for h in order] == [2, 3, 6, 7, 0, 1, 4, 5]


def test_many_endings_of_many_words_take_no_memory_for_every_pair_and_word():
    # 200 endings of 3 words each, no word shared (600 words): each agrees only with itself
    # (F = 1), every U = 1/200, a tie: the order given. All pairs' minima over all words at once
    # would be 200 x 200 x 600 float64 = 183 MiB; a search of thousands of endings (beam 10,
    # max_length 200) many gigabytes.
    hyps = [hyp([3 * i + 10, 3 * i + 11, 3 * i + 12]) for i in range(200)]
    tracemalloc.start()
    try:
        order = Consensus(()).order(hyps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [hyps.index(h) for h in order] == list(range(200))
    assert peak < 32 * 2**20


def test_a_caption_of_no_words_agrees_with_nothing_and_warns_of_nothing():
    # "" against H1 and H2: F = 0 both ways (nothing matched), no 0 / 0 anywhere: U("") = 0;
    # U(H1) = (0 + 1 + 0.5405) / 3 = 0.514, U(H2) = (0 + 0.8696 + 1) / 3 = 0.623
    consensus = Consensus(())
    assert consensus.agreement([], [DOG]) == 0.0 and consensus.agreement([DOG], []) == 0.0
    assert consensus.agreement([], []) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order = consensus.order([hyp([]), hyp(H1), hyp(H2)])
        assert [h.tokens for h in order] == [H2, H1, []]
        assert [h.tokens for h in consensus.order([hyp([]), hyp([])])] == [[], []]


def test_rank_scores_far_apart_weigh_the_far_one_zero():
    # Rank scores are totals with length_penalty 0: a long caption's can be -200 against a short
    # one's -1. w = 1 and e^(-199 / 0.2) = e^-995 (0 in floating point, no overflow):
    # U(H1) = 1, U(H3) = F(H3, H1) = 0.
    order = Consensus(()).order([hyp(H3, -200.0), hyp(H1, -1.0)])
    assert names(order) == ["H1", "H3"]


def test_the_weights_are_the_rank_scores_not_the_model_scores():
    # The model scores of H2 and H3 are -1.5 (alone: H1 would win, the case "far" above) but
    # their rank scores (with the bonuses that steered them) are -1.2: the case "close", H2 wins.
    def steered(tokens, score, rank_score):
        return Hypothesis(list(tokens), 2 * score, score, True, rank_score=rank_score)

    hyps = [steered(H1, -1.0, -1.0), steered(H2, -1.5, -1.2), steered(H3, -1.5, -1.2)]
    assert names(Consensus(()).order(hyps))[0] == "H2"


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


RUNS_TABLE = {
    (): {"dog": -0.1, "cat": -3.0},
    ("dog",): {"runs": -0.15, "<end>": -0.2},
    ("dog", "runs"): {"<end>": -1.15, "cat": -3.0},
}


def tagged_search(guidance_bonus):
    """Beam 1 through ``search``: one image whose one class (p 0.9) is named by "runs". The
    endings: E1 = "dog" (-0.3 / 2 = -0.15) and E2 = "dog runs" (-1.4 / 3 = -0.4667; its rank
    score with a bonus b on "runs": (-1.4 + b) / 3)."""
    backend = TableBackend(WORDS, lambda prefix: RUNS_TABLE.get(prefix, {"cat": -5.0, "runs": -6.0}), top_k=2)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    encoded.class_probs = np.array([[0.9]], np.float32)
    classes = ObjectClasses(("runner",), ((RUNS,),))
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, guidance_bonus=guidance_bonus)
    [hyps] = search(backend, encoded, options, START, END, len(WORDS), classes)
    return [WORDS[w] for w in hyps[0].tokens]


def test_the_tag_words_count_in_the_choice_when_the_guidance_is_on():
    # F(E1, E2) = 0.5405, F(E2, E1) = 0.8696 (H1, H2 above).
    # Guidance off: no tag words. w(E1) = e^(0.3167 / 0.2) = 4.871, w(E2) = 1:
    # U(E1) = (4.871 + 0.5405) / 5.871 = 0.922 > U(E2) = (4.871 * 0.8696 + 1) / 5.871 = 0.892
    assert tagged_search(0.0) == ["dog"]
    # Bonus 0.01: E2's rank score -1.39 / 3 = -0.4633, w(E1) = e^(0.3133 / 0.2) = 4.791:
    # U(E1) = (4.791 + 0.5405) / 5.791 = 0.921, U(E2) = (4.791 * 0.8696 + 1) / 5.791 = 0.892,
    # + 0.05 for the tag word "runs" = 0.942: E2 wins on its tag word
    assert tagged_search(0.01) == ["dog", "runs"]


def test_repeats_count_each_content_word_said_again():
    consensus = Consensus({A})
    assert consensus.repeats([A, DOG, RUNS]) == 0
    assert consensus.repeats([A, DOG, A, CAT]) == 0  # "a" twice: a function word
    assert consensus.repeats([A, DOG, A, DOG]) == 1
    assert consensus.repeats([DOG, DOG, DOG, CAT, CAT]) == 3  # dog twice again, cat once
    assert consensus.repeats([]) == 0


def test_a_content_word_said_again_costs_01():
    # K = dog runs at -1.0 (w = 1), H = dog runs dog at -1.1 (w = e^-0.5 = 0.6065; sum 1.6065);
    # all content words. Bags: H {dog 1.5, runs 0.75} (2.25), K {dog 0.75, runs 0.75} (1.5):
    # matched 1.5; F(H, K): P 2/3, R 1 -> (2/3) / (0.5667 + 0.15) = 0.9302; F(K, H): P 1, R 2/3
    # -> (2/3) / (0.85 + 0.1) = 0.7018.
    # U(H) = (0.6065 + 0.9302) / 1.6065 = 0.9566, U(K) = (0.6065 * 0.7018 + 1) / 1.6065 = 0.8875:
    # recall favours H by 0.069; less 0.1 for its second "dog" (0.8566), K wins
    H, K = [DOG, RUNS, DOG], [DOG, RUNS]
    hyps = [hyp(K, -1.0), hyp(H, -1.1)]
    assert [h.tokens for h in Consensus(()).order(hyps)] == [K, H]
    assert [h.tokens for h in Consensus((), repeat_weight=0.0).order(hyps)] == [H, K]


def test_a_caption_ending_on_a_dangling_word_costs_01():
    # P = dog runs, Q = dog runs a, both at -1.0 (w = 1/2 each); "a" a function word (0.25)
    # that no caption ends on. Bags: P 1.5, Q 1.75, matched 1.5; F(P, Q): P 1, R 0.8571 ->
    # 0.8571 / 0.9786 = 0.8759; F(Q, P): P 0.8571, R 1 -> 0.8571 / 0.8786 = 0.9756.
    # U(P) = (1 + 0.8759) / 2 = 0.9380, U(Q) = (0.9756 + 1) / 2 = 0.9878: recall favours Q by
    # 0.050; less 0.1 for ending on "a" (0.8878), P wins
    P, Q = [DOG, RUNS], [DOG, RUNS, A]
    hyps = [hyp(Q), hyp(P)]
    assert [h.tokens for h in Consensus({A}, {A}).order(hyps)] == [P, Q]
    assert [h.tokens for h in Consensus({A}, {A}, dangling_weight=0.0).order(hyps)] == [Q, P]
    assert [h.tokens for h in Consensus({A}).order(hyps)] == [Q, P]  # "a" not given as dangling
    # a dangling word inside the caption costs nothing
    assert not Consensus({A}, {A}).dangles([A, DOG]) and Consensus({A}, {A}).dangles([DOG, A])
    assert not Consensus({A}, {A}).dangles([])


def test_a_content_word_said_again_costs_01_no_more():
    # H = dog runs dog at -1.0 (w = 1), K = dog runs at -1.1 (w = e^-0.5 = 0.6065; sum 1.6065);
    # F(H, K) = 0.9302, F(K, H) = 0.7018 (above). U(H) = (1 + 0.6065 * 0.9302) / 1.6065 =
    # 0.9737, U(K) = (0.7018 + 0.6065) / 1.6065 = 0.8144: H ahead by 0.159, so its second "dog"
    # at 0.1 leaves it first (0.8737); at 0.2 (0.7737) it would not. With the test above (H
    # 0.069 ahead loses): the weight is above 0.069 and below 0.159.
    H, K = [DOG, RUNS, DOG], [DOG, RUNS]
    hyps = [hyp(H, -1.0), hyp(K, -1.1)]
    assert [h.tokens for h in Consensus(()).order(hyps)] == [H, K]


def test_a_caption_ending_on_a_dangling_word_costs_01_no_more():
    # Q = dog runs a at -1.0 (w = 1), P = dog runs at -2.0 (w = e^-5 = 0.006738; sum
    # 1.006738); F(P, Q) = 0.8759, F(Q, P) = 0.9756 (above). U(Q) = (1 + 0.006738 * 0.9756) /
    # 1.006738 = 0.9998, U(P) = (0.8759 + 0.006738) / 1.006738 = 0.8767: Q ahead by 0.123, so
    # ending on "a" at 0.1 leaves it first (0.8998); at 0.2 (0.7998) it would not. With the
    # tests above (0.050 and 0.092 ahead lose): the weight is above 0.092 and below 0.123.
    P, Q = [DOG, RUNS], [DOG, RUNS, A]
    hyps = [hyp(Q, -1.0), hyp(P, -2.0)]
    assert [h.tokens for h in Consensus({A}, {A}).order(hyps)] == [Q, P]


DANGLE_TABLE = {
    (): {"dog": -0.1, "cat": -3.0},
    ("dog",): {"a": -0.2, "<end>": -0.3},
    ("dog", "a"): {"<end>": -0.6, "cat": -3.0},
}


def dangling_search(dangling_ids):
    """Beam 1 through ``search`` (the Captioner's path: the consensus from the class list):
    the endings E1 = "dog" ((-0.1 - 0.3) / 2 = -0.2) and E2 = "dog a" (-0.9 / 3 = -0.3)."""
    table = lambda prefix: DANGLE_TABLE.get(prefix, {"cat": -5.0, "runs": -6.0})  # noqa: E731
    backend = TableBackend(WORDS, table, top_k=2)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    encoded.class_probs = np.array([[0.9]], np.float32)
    classes = ObjectClasses(("runner",), ((RUNS,),), frozenset(), frozenset(dangling_ids))
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, guidance_bonus=0.0)
    [hyps] = search(backend, encoded, options, START, END, len(WORDS), classes)
    return [WORDS[w] for w in hyps[0].tokens]


def test_the_search_s_choice_counts_the_class_list_s_dangling_words():
    # all content words: F(E1, E2) = 0.5405, F(E2, E1) = 0.8696 (H1, H2 above); w(E1) = 1,
    # w(E2) = e^(-0.1 / 0.2) = 0.6065 (sum 1.6065): U(E1) = (1 + 0.6065 * 0.5405) / 1.6065 =
    # 0.8265, U(E2) = (0.8696 + 0.6065) / 1.6065 = 0.9188: "dog a" by 0.092 without the term,
    # "dog" with it (0.8188)
    assert dangling_search(()) == ["dog", "a"]
    assert dangling_search({A}) == ["dog"]


def test_the_shipped_vocabulary_s_dangling_words_leave_a_phrase_unfinished():
    """The shipped model's class list (what the Captioner's choice uses): a caption ending on a
    preposition, an article, a conjunction, a possessive or "is" is dangling ("standing in
    front", "doing a trick on", "with a stick in", "sitting on her": docs/everyday-photos.md,
    readable choices), while the particles and pronouns that end English captions ("skiing
    down", "jumping up", "with his arms out", "playing together", "looking at it") are not and
    cost nothing. The words are English grammar, listed here by hand."""
    from pathlib import Path

    import edgecap
    from edgecap.vocab import Vocabulary

    model = Path(edgecap.__file__).parent / "assets" / "default"
    vocab = Vocabulary.load(model / "vocab.json").index
    classes = ObjectClasses.load(model / "classes.json", vocab, n_classes=1000)
    dangling = "front on in at with of to a an the and his her their its is are".split()
    ending = "up down out together off away there it them two one other".split()
    assert {w for w in dangling if vocab[w] not in classes.dangling_ids} == set()
    assert {w for w in ending if vocab[w] in classes.dangling_ids} == set()


def _shipped_classes():
    from pathlib import Path

    import edgecap
    from edgecap.vocab import Vocabulary

    model = Path(edgecap.__file__).parent / "assets" / "default"
    vocab = Vocabulary.load(model / "vocab.json").index
    return vocab, ObjectClasses.load(model / "classes.json", vocab, n_classes=1000)


def test_the_shipped_vocabulary_s_other_prepositions_and_while_dangle_too():
    """The rest of the shipped class list's dangling words, each leaving a phrase unfinished
    when a caption stops on it: "waiting for", "sitting by", "jumping from", "dressed as",
    "running into", "standing near", "standing next", "smiles while" (English grammar, listed
    here by hand; the articles, "in front", "on", "with" ... are in the test above)."""
    vocab, classes = _shipped_classes()
    dangling = "for by from as into near next while".split()
    assert {w for w in dangling if vocab[w] not in classes.dangling_ids} == set()


def test_the_shipped_vocabulary_s_relation_words_are_function_words():
    """The shipped class list's function words (weighed 0.25, never counted as a word said
    again): the articles, prepositions and words of place ("next to", "near", "in front of",
    "up", "down"), conjunctions, is/are, the possessives and pronouns (English grammar, listed
    here by hand); the things, colours and actions captions name are content words (0.75).
    Counted by hand: "a dog next to a cat next to a tree" says only "dog", "cat", "tree" as
    content words, once each: no repeat, nor "a dog near a cat near a tree"; "a man in a white
    shirt and a white hat" says "white" again: one."""
    vocab, classes = _shipped_classes()
    function = (
        "a an the of in on at with and is are to its it his her their for by from as into near next "
        "front up down while there this that"
    ).split()
    content = "dog man woman girl red white shirt beach snow grass ball runs standing".split()
    consensus = Consensus(classes.function_ids, classes.dangling_ids)
    assert {w for w in function if consensus.weight(vocab[w]) != 0.25} == set()
    assert {w for w in content if consensus.weight(vocab[w]) != 0.75} == set()
    said = {
        "a dog next to a cat next to a tree": 0,
        "a dog near a cat near a tree": 0,
        "a man in a white shirt and a white hat": 1,
    }
    assert {text: consensus.repeats([vocab[w] for w in text.split()]) for text in said} == said


def test_the_first_step_s_end_is_no_place_to_end():
    """Beam 1, max_length 3: "<end>" is the likeliest first word (-0.01) but no caption is
    empty (``NeverFirst``), and no later step has "<end>" among its top 2: no place to end
    after the first word, so the caption is the live beam cut at max_length, "a dog runs"
    (unfinished), never the empty caption (was one of the endings when the first step's
    top K counted)."""
    rows = {
        (): {"<end>": -0.01, "a": -0.5},
        ("a",): {"dog": -0.1, "cat": -3.0},
        ("a", "dog"): {"runs": -0.1, "cat": -3.0},
    }
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"cat": -5.0, "runs": -6.0}), top_k=2)
    options = CaptionOptions(beam_size=1, max_length=3, no_repeat_ngram=0, guidance_bonus=0.0)
    [hyps] = search_with_tags(
        backend,
        backend.encode(np.zeros((1, 3, 4, 4), np.float32)),
        options,
        START,
        END,
        len(WORDS),
        None,
        consensus=Consensus({A}),
    )
    assert [[WORDS[w] for w in h.tokens] for h in hyps] == [["a", "dog", "runs"]]
    assert not hyps[0].finished


BONUS_TABLE = {
    (): {"dog": -0.1, "cat": -3.0},
    ("dog",): {"runs": -0.15, "<end>": -0.2},
    ("dog", "runs"): {"<end>": -0.5, "cat": -3.0},
}


def bonus_search(guidance_bonus):
    """Beam 1 through ``search``: one image whose one class (p 0.9) is named by "dog", the
    first word of both endings E1 = "dog" (-0.3) and E2 = "dog runs" (-0.75)."""
    table = lambda prefix: BONUS_TABLE.get(prefix, {"cat": -5.0, "runs": -6.0})  # noqa: E731
    backend = TableBackend(WORDS, table, top_k=2)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    encoded.class_probs = np.array([[0.9]], np.float32)
    classes = ObjectClasses(("dog",), ((DOG,),))
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, guidance_bonus=guidance_bonus)
    [hyps] = search(backend, encoded, options, START, END, len(WORDS), classes)
    return [WORDS[w] for w in hyps[0].tokens]


def test_the_endings_weigh_in_with_the_bonus_that_steered_them():
    # All content words: F(E1, E2) = 0.5405, F(E2, E1) = 0.8696 (H1, H2 above); both say the
    # tag word once (+0.05 each). With w = w(E1) / w(E2): U(E1) - U(E2) =
    # (0.1304 w - 0.4595) / (w + 1), so E1 wins when w > 3.524, its rank score ahead by more
    # than 0.2 ln 3.524 = 0.252.
    # Guidance off: E1 -0.3 / 2 = -0.15, E2 -0.75 / 3 = -0.25: ahead by 0.1 (w = 1.649):
    # U(E1) = (1.649 + 0.5405) / 2.649 = 0.827 < U(E2) = (1.649 * 0.8696 + 1) / 2.649 = 0.919
    assert bonus_search(0.0) == ["dog", "runs"]
    # Bonus 2 on "dog", said once by each: E1 (-0.3 + 2) / 2 = 0.85, E2 (-0.75 + 2) / 3 =
    # 0.4167: ahead by 0.433 (w = e^2.167 = 8.73): U(E1) = (8.73 + 0.5405) / 9.73 = 0.953 >
    # U(E2) = (8.73 * 0.8696 + 1) / 9.73 = 0.883 (without the bonus in the rank scores it
    # would still be 0.827 against 0.919)
    assert bonus_search(2.0) == ["dog"]


@pytest.mark.parametrize("consensus", [None, Consensus({A})], ids=["own ranking", "consensus"])
def test_a_masked_row_is_no_place_to_end(consensus):
    """Beam 2, top 2: the first step's "<end>" is blocked, so the second row stays masked (no
    beam); its step still runs on filler (whose top 2 holds "<end>"), but a masked row is no
    place to end. No live row has "<end>" among its top 2 within max_length 3: the captions
    are the live beams cut there, "a dog runs" (-0.3) and "a dog cat" (-0.4), unfinished,
    never a masked row's ending (a caption of no words at -inf)."""
    rows = {
        (): {"a": -0.1, "<end>": -0.2},
        ("a",): {"dog": -0.1, "cat": -0.2},
        ("a", "dog"): {"runs": -0.1, "cat": -0.2},
        ("a", "cat"): {"runs": -0.1, "dog": -0.2},
    }
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {"<end>": -0.1, "cat": -0.2}), top_k=2)
    options = CaptionOptions(beam_size=2, n_best=2, max_length=3, no_repeat_ngram=0, guidance_bonus=0.0)
    [hyps] = search_with_tags(
        backend,
        backend.encode(np.zeros((1, 3, 4, 4), np.float32)),
        options,
        START,
        END,
        len(WORDS),
        None,
        consensus=consensus,
    )
    assert [(" ".join(WORDS[w] for w in h.tokens), h.finished) for h in hyps] == [
        ("a dog runs", False),
        ("a dog cat", False),
    ]
    assert [h.log_prob for h in hyps] == pytest.approx([-0.3, -0.4])


def test_each_time_a_content_word_is_said_again_costs_01():
    # H = dog runs dog dog (dog said again twice: 0.2), K = dog runs, both at -1.0 (w = 1/2
    # each); all content words. Bags: H {dog 2.25, runs 0.75} (3.0), K {dog 0.75, runs 0.75}
    # (1.5): matched 1.5; F(H, K): P 0.5, R 1 -> 0.5 / 0.575 = 0.8696; F(K, H): P 1, R 0.5 ->
    # 0.5 / 0.925 = 0.5405. U(H) = (1 + 0.8696) / 2 = 0.9348, U(K) = (0.5405 + 1) / 2 = 0.7703:
    # recall favours H by 0.165, more than one word said again costs (0.1) but less than two
    # (0.2): K wins
    H, K = [DOG, RUNS, DOG, DOG], [DOG, RUNS]
    hyps = [hyp(H), hyp(K)]
    assert Consensus(()).repeats(H) == 2
    assert [h.tokens for h in Consensus(()).order(hyps)] == [K, H]
    assert [h.tokens for h in Consensus((), repeat_weight=0.0).order(hyps)] == [H, K]
