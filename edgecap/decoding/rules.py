"""The rules the beam loop (``edgecap.decoding.beam``) applies at each step, as small parts.

Two kinds, each knowing nothing of the loop's internals:

- a **filter** says whether a candidate word may follow a row's words (``blocks``): the words a
  caption never starts with, repeated n-grams;
- a **scorer** adds to the log-probabilities of a step (``bias``, float32 (R, V)): the bias goes
  into the decoder step's ``word_bias`` (so a word outside the plain top K can be chosen) and into
  each candidate's ranking score, never into the caption's own ``log_prob`` / ``score``. After the
  loop has chosen the rows' words it calls ``update`` with them; a scorer with per-row state
  (which rows still get a tag bonus, a language model's LSTM state) reorders it there.

Adding a rule is adding one such part: the loop stays as it is.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np


class Filter:
    """A rule that removes candidates. ``blocks`` is asked at most once per candidate."""

    def begin_step(self, t: int) -> None:
        """Step ``t`` (0-based) begins: drop what was cached for the last one."""

    def blocks(self, t: int, words: list[int], word: int, row: int) -> bool:
        """Would ``word`` after ``words`` (row ``row``'s caption so far) break the rule?"""
        raise NotImplementedError


class Scorer:
    """A rule that adds to a step's log-probabilities (see the module doc)."""

    def bias(self, t: int, tokens: np.ndarray, source_rows: np.ndarray) -> np.ndarray | None:
        """float32 (R, V) to add at step ``t``, whose decoder inputs are ``tokens`` and
        ``source_rows`` (as the step's); None: nothing this step."""
        raise NotImplementedError

    def update(self, source_rows: np.ndarray, words: np.ndarray, live: np.ndarray) -> None:
        """The loop chose ``words`` (R,) for the rows, continuing rows ``source_rows`` (R,);
        ``live`` (R,) bool: the rows that hold a beam (the others are masked)."""


class NeverFirst(Filter):
    """No caption starts with these words (``<end>``: never an empty caption)."""

    def __init__(self, word_ids: Collection[int]):
        self.word_ids = frozenset(word_ids)

    def blocks(self, t: int, words: list[int], word: int, row: int) -> bool:
        return t == 0 and word in self.word_ids


class NoRepeatNgram(Filter):
    """No caption holds the same n-gram twice (``<end>`` is never blocked)."""

    def __init__(self, n: int, end_id: int):
        self.n, self.end_id = n, end_id
        self._grams: dict[int, set] = {}

    def begin_step(self, t: int) -> None:
        self._grams = {}

    def blocks(self, t: int, words: list[int], word: int, row: int) -> bool:
        n = self.n
        if word == self.end_id or n <= 0 or len(words) < n:
            return False
        grams = self._grams.get(row)
        if grams is None:  # each row's n-grams once per step
            grams = self._grams[row] = set(zip(*(words[i:] for i in range(n))))
        return (*words[len(words) - n + 1 :], word) in grams


def tag_bias(words: tuple[frozenset[int], ...], vocab_size: int, value: float) -> np.ndarray:
    """Per image, ``value`` on its tag words: float32 (N, V)."""
    bias = np.zeros((len(words), vocab_size), np.float32)
    for image, ids in enumerate(words):
        bias[image, list(ids)] = value
    return bias


class TagBonus(Scorer):
    """Object guidance: ``bonus`` on the log-probability of an image's tag words, on each beam
    until it has said one of them; then the beam goes on unsteered (a bonus that stayed on made
    doubled words such as "a bus bus")."""

    def __init__(
        self, words: tuple[frozenset[int], ...], vocab_size: int, bonus: float, image_index: np.ndarray
    ):
        self.words = words
        self.image_index = image_index
        self.row_bias = tag_bias(words, vocab_size, bonus)[image_index]  # (R, V), once
        self.steered = np.array([bool(words[image]) for image in image_index.tolist()])

    def bias(self, t: int, tokens: np.ndarray, source_rows: np.ndarray) -> np.ndarray | None:
        if not self.steered.any():
            return None
        return self.row_bias * self.steered[:, None]

    def update(self, source_rows: np.ndarray, words: np.ndarray, live: np.ndarray) -> None:
        steered = self.steered[source_rows] & live
        for row in np.flatnonzero(steered).tolist():
            if int(words[row]) in self.words[int(self.image_index[row])]:
                steered[row] = False
        self.steered = steered
