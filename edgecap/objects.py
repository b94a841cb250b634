"""Object tags: the encoder CNN's own image classes, read from the same encoder pass as the
caption, and the caption words that name them.

A model directory's ``classes.json`` (manifest role ``classes``) lists the classes of the
encoder's ``class_probs`` in order, each with a readable name and the caption words that name it
(``trolleybus``: ``bus``; ``Egyptian Mau``: ``cat``; ``giant panda``: ``bear``, the nearest word the
caption vocabulary has). ``ObjectClasses`` turns a batch's class probabilities into tags and into
the tag words the search steers toward (``edgecap.decoding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecap.errors import ModelError

# The readable class list a new model directory gets (``edgecap export``).
IMAGENET_CLASSES = Path(__file__).parent / "assets" / "imagenet_classes.json"


@dataclass(frozen=True)
class ObjectClasses:
    names: tuple[str, ...]  # readable class names, in class_probs order
    word_ids: tuple[tuple[int, ...], ...]  # per class: the vocabulary ids of its words
    # the vocabulary ids of the words the consensus choice counts as function words
    # (``edgecap.decoding.consensus.FUNCTION_WORDS``)
    function_ids: frozenset[int] = frozenset()
    # of the words no caption ends on (``edgecap.decoding.consensus.DANGLING_WORDS``)
    dangling_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, path: Path, vocab_index: dict[str, int], n_classes: int) -> ObjectClasses:
        """Read ``classes.json``; words the vocabulary lacks are left out (a model with its own
        vocabulary still gets every tag, and guidance where the words exist)."""
        from edgecap.files import MAX_VOCAB_BYTES, FileProblem, read_json

        try:
            try:
                entries = read_json(path, MAX_VOCAB_BYTES)["classes"]
            except FileProblem as exc:
                raise ValueError(str(exc)) from None
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("words"), list)
                for e in entries
            ):
                raise ValueError("classes must be a list of {name: text, words: [...]}")
            names = tuple(e["name"] for e in entries)
            words = tuple(tuple(vocab_index[w] for w in e["words"] if w in vocab_index) for e in entries)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: unreadable class list ({exc}); re-export the model") from exc
        if len(names) != n_classes:
            raise ModelError(
                f"{path}: {len(names)} classes, but the encoder has {n_classes}; "
                "copy the whole model directory again or re-export it"
            )
        from edgecap.decoding.consensus import DANGLING_WORDS, FUNCTION_WORDS

        def ids(listed: list[str]) -> frozenset[int]:
            return frozenset(vocab_index[w] for w in listed if w in vocab_index)

        return cls(names, words, ids(FUNCTION_WORDS), ids(DANGLING_WORDS))

    def tags(self, probs: np.ndarray, n: int, best=None) -> tuple[tuple[str, float], ...]:
        """probs (C,) -> the ``n`` most probable classes as (name, probability), best first;
        ``best``: ``top_classes(probs, k)`` for some k >= n, already computed (or None)."""
        if n <= 0:
            return ()
        best = top_classes(probs, n) if best is None else best[:n]
        # a probability that is not a number (an encoder out of range) names no tag: it had
        # reached --json and serve as NaN, which strict JSON readers refuse
        kept = [i for i in np.asarray(best).tolist() if np.isfinite(probs[i])]
        return tuple((self.names[i], round(float(probs[i]), 4)) for i in kept)

    def tag_words(self, probs: np.ndarray, n_tags: int, min_prob: float) -> tuple[frozenset[int], ...]:
        """probs (N, C) -> per image, the word ids of its ``n_tags`` most probable classes of
        at least ``min_prob``."""
        words = []
        for image_probs in probs:
            best = top_classes(image_probs, n_tags)
            kept = best[image_probs[best] >= min_prob].tolist()
            words.append(frozenset(w for c in kept for w in self.word_ids[c]))
        return tuple(words)


def top_classes_rows(probs: np.ndarray, n: int) -> np.ndarray:
    """probs (N, C) -> (N, min(max(n, 0), C)): each row's ``top_classes`` at once (one partition
    and one sort for the batch, not a call a row; the same indices, ties in index order)."""
    probs = np.asarray(probs)
    rows, classes = probs.shape
    if not 0 < n < classes or rows == 0:
        return np.array([top_classes(p, n) for p in probs], np.intp).reshape(rows, min(max(n, 0), classes))
    negated = -probs
    nth = np.partition(negated, n - 1, axis=1)[:, n - 1]
    best = np.empty((rows, n), np.intp)
    plain = nth == nth  # else NaN among a row's n smallest: that row as top_classes does it
    if plain.any():
        values, limits = negated[plain], nth[plain]
        # every value tied with its row's n-th too, row by row in index order (n or more a row)
        row, col = np.nonzero(values <= limits[:, None])
        order = np.lexsort((values[row, col], row))  # by row, then value; ties keep index order
        starts = np.searchsorted(row[order], np.arange(len(limits)))
        best[plain] = col[order][starts[:, None] + np.arange(n)]
    for r in np.flatnonzero(~plain):
        best[r] = top_classes(probs[r], n)
    return best


def top_classes(probs: np.ndarray, n: int) -> np.ndarray:
    """probs (C,) -> the indices of its ``n`` largest values, largest first, ties in index
    order: ``np.argsort(-probs, kind="stable")[:n]`` without sorting all C (a partition, then
    a sort of the few at or above the n-th value; NaN, which that sort puts last, falls back
    to it)."""
    probs = np.asarray(probs)
    if not 0 < n < probs.shape[0]:
        return np.argsort(-probs, kind="stable")[: max(n, 0)]
    negated = -probs
    nth = np.partition(negated, n - 1)[n - 1]
    if nth != nth:  # NaN among the n smallest: fewer than n numbers
        return np.argsort(negated, kind="stable")[:n]
    kept = np.flatnonzero(negated <= nth)  # every value tied with the n-th too, in index order
    return kept[np.argsort(negated[kept], kind="stable")[:n]]
