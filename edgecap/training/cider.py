"""CIDEr-D (Vedantam et al. 2015) with document frequencies from a fixed reference corpus.

The reward of self-critical training: coco-caption's CIDEr-D (n = 1..4, tf-idf, clipped
counts, a Gaussian length penalty with sigma 6, x10), with the idf taken once from the training
references instead of from each batch. Inputs are pre-tokenised word lists.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

N = 4
SIGMA = 6.0


def _ngrams(words: list[str]) -> list[Counter]:
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, N + 1)]


class CiderD:
    def __init__(self, corpus_refs: list[list[list[str]]]):
        """corpus_refs: for each image, its reference captions as word lists."""
        df: dict[tuple, int] = defaultdict(int)
        for refs in corpus_refs:
            for gram in set(g for ref in refs for counts in _ngrams(ref) for g in counts):
                df[gram] += 1
        self.df = df
        self.log_n = math.log(float(len(corpus_refs)))
        self._ref_cache: dict[int, list] = {}

    def _vec(self, words: list[str]):
        vecs, norms = [], []
        for counts in _ngrams(words):
            v = {g: tf * (self.log_n - math.log(max(1.0, self.df.get(g, 0.0)))) for g, tf in counts.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, len(words)

    def _sim(self, hyp, ref) -> float:
        (hv, hn, hl), (rv, rn, rl) = hyp, ref
        delta = hl - rl
        total = 0.0
        for n in range(N):
            dot = sum(min(x, rv[n][g]) * rv[n][g] for g, x in hv[n].items() if g in rv[n])
            if hn[n] and rn[n]:
                total += dot / (hn[n] * rn[n])
        return total / N * math.exp(-(delta**2) / (2 * SIGMA**2))

    def score(self, hyp: list[str], refs: list[list[str]], key: int | None = None) -> float:
        if key is not None and key in self._ref_cache:
            ref_vecs = self._ref_cache[key]
        else:
            ref_vecs = [self._vec(r) for r in refs]
            if key is not None:
                self._ref_cache[key] = ref_vecs
        h = self._vec(hyp)
        return 10.0 * sum(self._sim(h, r) for r in ref_vecs) / len(ref_vecs)
