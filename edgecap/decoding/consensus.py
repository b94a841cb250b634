"""Consensus choice: the caption is chosen among every place the search could have ended.

A rule of the decoding layer applied once per image after the search, with no decoder step of
its own. The candidates are the search's **endings**: every live row's caption so far, at every
word, whose ``<end>`` was among the step's top K (the searches' ``endings``; the beam's own
finished hypotheses are among them), each with its ranking score (length-normalised, with the
bonuses that steered it). Each candidate ``h`` gets the expected agreement with the others,

    sum_j w_j F(h, h_j) + TAG_WEIGHT x (number of the image's tag words h says)
        - REPEAT_WEIGHT x (times h says a content word again)
        - DANGLING_WEIGHT x (h ends on a word no sentence ends on),
    w = softmax(rank scores / TEMPERATURE),

where ``F`` is a unigram F-mean weighted toward recall (METEOR's alpha 0.85) whose matched words
count 0.75 for a content word and 0.25 for a function word (``FUNCTION_WORDS``; METEOR's delta
0.75): a minimum-Bayes-risk choice whose utility is METEOR's, so the caption that names the
words the likely captions share wins over the single likeliest one. The tag words are those of
the tag bonus (``CaptionOptions.guidance_*``). The last two terms keep the choice readable: a
caption that says a content word again ("a man in a white shirt and a white shirt", "on the
beach on a beach") or stops on a preposition or an article ("standing on a mountain in front")
loses to one that does not, among endings that agree about as well. Chosen on the 160 everyday
dev photos and Flickr8k dev (docs/everyday-photos.md; ``benchmarks/consensus_rules.py``).
``CaptionOptions.consensus=False`` keeps the search's own ranking.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgecap.decoding.beam import Hypothesis

TEMPERATURE = 0.2  # of the softmax over the candidates' rank scores (mean log-prob per word)
TAG_WEIGHT = 0.05  # per tag word the candidate says
REPEAT_WEIGHT = 0.1  # per content word said again (each time after its first)
DANGLING_WEIGHT = 0.1  # a candidate whose last word is one of DANGLING_WORDS
_CELLS = 1 << 20  # of the pairwise minima computed at once (8 MB of float64)
ALPHA = 0.85  # F-mean: P R / (ALPHA P + (1 - ALPHA) R)
CONTENT, FUNCTION = 0.75, 0.25  # what a matched word counts
# the words that count as function words (each found in the model's vocabulary or skipped)
FUNCTION_WORDS = (
    "a an the of in on at with and is are to its it his her their two one some while for by from "
    "as other another there this that up down into front near next"
).split()
# the words no caption ends on (a preposition, an article, a conjunction, a possessive, a verb
# left without its complement): "... in front", "... with a", "... is"
DANGLING_WORDS = (
    "a an the of in on at with and to for by from as into near next front while its his her their is are"
).split()


class Consensus:
    """The consensus choice over a model's vocabulary (``function_ids``: the ids of its
    function words, ``edgecap.objects.ObjectClasses.function_ids``; ``dangling_ids``: of its
    ``DANGLING_WORDS``, ``ObjectClasses.dangling_ids``); the weights of the readability terms
    as given (0: off)."""

    def __init__(
        self,
        function_ids: Collection[int],
        dangling_ids: Collection[int] = (),
        repeat_weight: float = REPEAT_WEIGHT,
        dangling_weight: float = DANGLING_WEIGHT,
    ):
        self.function_ids = frozenset(function_ids)
        self.dangling_ids = frozenset(dangling_ids)
        self.repeat_weight = repeat_weight
        self.dangling_weight = dangling_weight

    def weight(self, word: int) -> float:
        return FUNCTION if word in self.function_ids else CONTENT

    def agreement(self, h: Sequence[int], r: Sequence[int]) -> float:
        """F(h, r): the recall-weighted F-mean of the weighted unigram matches of ``h`` in ``r``."""
        return float(self._f_means([h, r])[0, 1])

    def repeats(self, words: Sequence[int]) -> int:
        """How many times ``words`` say a content word again (each time after its first)."""
        content = [w for w in words if w not in self.function_ids]
        return len(content) - len(set(content))

    def dangles(self, words: Sequence[int]) -> bool:
        """Whether ``words`` end on one of the ``DANGLING_WORDS``."""
        return bool(words) and words[-1] in self.dangling_ids

    def order(self, hyps: Sequence[Hypothesis], tag_words: Collection[int] = ()) -> list[Hypothesis]:
        """``hyps`` (finished captions), best first: by expected agreement plus the tag term,
        less the readability terms, ties in the order given. The agreements of all pairs at
        once: each candidate's weighted word counts a row of one matrix (``_f_means``)."""
        n = len(hyps)
        if n < 2:
            return list(hyps)
        scores = [h.score if h.rank_score is None else h.rank_score for h in hyps]
        top = max(scores)
        w = np.array([math.exp((s - top) / TEMPERATURE) for s in scores])
        # the weighted sums left to right (np.add.accumulate), as Python 3.11's sum() adds; 3.12's
        # compensates its rounding: the same choice on every Python, near-ties included
        total = np.add.accumulate(w)[-1]
        expected = np.add.accumulate(w * self._f_means([h.tokens for h in hyps]), axis=1)[:, -1] / total
        tags = set(tag_words)
        value = [
            e
            + TAG_WEIGHT * len(set(h.tokens) & tags)
            - self.repeat_weight * self.repeats(h.tokens)
            - self.dangling_weight * self.dangles(h.tokens)
            for e, h in zip(expected.tolist(), hyps)
        ]
        return [hyps[i] for i in sorted(range(n), key=lambda i: -value[i])]

    def _f_means(self, captions: Sequence[Sequence[int]]) -> np.ndarray:
        """F(h_i, h_j) of every pair (n, n): each caption's words weighted and counted, a row of
        a matrix (multiples of 1/4, so each sum below is exact in any order); a word matches
        min(its counts) times."""
        column: dict[int, int] = {}
        rows, cols, weights = [], [], []
        for i, words in enumerate(captions):
            for word in words:
                rows.append(i)
                cols.append(column.setdefault(word, len(column)))
                weights.append(self.weight(word))
        n, u = len(captions), max(len(column), 1)
        cells = np.array(rows, np.intp) * u + np.array(cols, np.intp)
        bags = np.bincount(cells, np.array(weights, np.float64), minlength=n * u).reshape(n, u)
        # the pairwise minima a block of rows at a time (at most _CELLS cells): thousands of
        # endings of many words would otherwise take gigabytes at once
        block = max(1, _CELLS // (n * u))
        matched = np.concatenate(
            [np.minimum(bags[i : i + block, None], bags[None]).sum(axis=2) for i in range(0, n, block)]
        )
        some = matched > 0  # then both captions have words
        totals = bags.sum(axis=1)
        totals[totals == 0] = 1.0
        precision, recall = matched / totals[:, None], matched / totals[None, :]
        denominator = np.where(some, ALPHA * precision + (1 - ALPHA) * recall, 1.0)
        return np.where(some, precision * recall / denominator, 0.0)
