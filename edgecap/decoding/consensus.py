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

if TYPE_CHECKING:
    from edgecap.decoding.beam import Hypothesis

TEMPERATURE = 0.2  # of the softmax over the candidates' rank scores (mean log-prob per word)
TAG_WEIGHT = 0.05  # per tag word the candidate says
REPEAT_WEIGHT = 0.1  # per content word said again (each time after its first)
DANGLING_WEIGHT = 0.1  # a candidate whose last word is one of DANGLING_WORDS
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
        return _f_mean(self._bag(h), self._bag(r))

    def _bag(self, words: Sequence[int]) -> tuple[dict[int, float], float]:
        """Each word's weight x its count, and their sum."""
        bag: dict[int, float] = {}
        for w in words:
            bag[w] = bag.get(w, 0.0) + self.weight(w)
        return bag, sum(bag.values())

    def repeats(self, words: Sequence[int]) -> int:
        """How many times ``words`` say a content word again (each time after its first)."""
        content = [w for w in words if w not in self.function_ids]
        return len(content) - len(set(content))

    def dangles(self, words: Sequence[int]) -> bool:
        """Whether ``words`` end on one of the ``DANGLING_WORDS``."""
        return bool(words) and words[-1] in self.dangling_ids

    def order(self, hyps: Sequence[Hypothesis], tag_words: Collection[int] = ()) -> list[Hypothesis]:
        """``hyps`` (finished captions), best first: by expected agreement plus the tag term,
        less the readability terms, ties in the order given."""
        if len(hyps) < 2:
            return list(hyps)
        scores = [h.score if h.rank_score is None else h.rank_score for h in hyps]
        top = max(scores)
        w = [math.exp((s - top) / TEMPERATURE) for s in scores]
        total = sum(w)
        bags = [self._bag(h.tokens) for h in hyps]
        tags = set(tag_words)
        value = []
        for h, bag in zip(hyps, bags):
            expected = sum(wj * _f_mean(bag, other) for wj, other in zip(w, bags)) / total
            value.append(
                expected
                + TAG_WEIGHT * len(set(h.tokens) & tags)
                - self.repeat_weight * self.repeats(h.tokens)
                - self.dangling_weight * self.dangles(h.tokens)
            )
        return [hyps[i] for i in sorted(range(len(hyps)), key=lambda i: -value[i])]


def _f_mean(h: tuple[dict[int, float], float], r: tuple[dict[int, float], float]) -> float:
    """F(h, r) from the two bags (``Consensus._bag``): a word matches min(its counts) times."""
    (hb, h_total), (rb, r_total) = h, r
    matched = sum(min(x, rb[w]) for w, x in hb.items() if w in rb)
    if matched == 0:
        return 0.0
    precision, recall = matched / h_total, matched / r_total
    return precision * recall / (ALPHA * precision + (1 - ALPHA) * recall)
