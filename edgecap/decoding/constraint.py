"""Beam-state partitions: what the beam loop keeps apart (``edgecap.decoding.beam``).

A partition splits each image's beams into states, ``beam_size`` rows each; a candidate word moves
a beam from its state to another (``next_state``) or keeps it there. The loop keeps the states'
rows and finished hypotheses apart and an image is done when its ``goal`` state has ``beam_size``
finished captions. ``Unconstrained`` is one state: the plain beam search.

``TagConstraint``: constrained beam search (Anderson et al., "Guided Open Vocabulary Image
Captioning with Constrained Beam Search", EMNLP 2017), one disjunctive constraint per image: the
caption must say one of the image's tag words. State 0: the captions that have not said one yet;
state 1: those that have. The caption is the best finished state-1 hypothesis, or, when none
finished, the best of state 0 (the plain caption), so a constraint never leaves an image without a
caption. An image with no tag word has state 0 as its goal: it is searched as without the
constraint. The tag words reach the step's top K through ``word_bias`` on the state-0 rows
(``surfacing_bias``; the returned log-probabilities never include it and the ranking does not
either).
"""

from __future__ import annotations

import numpy as np

from edgecap.decoding.rules import tag_bias

SURFACE = 100.0  # the word_bias that puts a state-0 row's tag words first in its top K


class Unconstrained:
    """One state: every beam of an image competes with every other."""

    n_states = 1

    def next_state(self, state: int, word: int, image: int) -> int:
        return state

    def goal(self, image: int) -> int:
        return 0

    def surfacing_bias(self, image_index: np.ndarray, beam: int) -> np.ndarray | None:
        return None


class TagConstraint:
    """The caption says one of its image's tag words (``words[image]``; see the module doc)."""

    n_states = 2

    def __init__(self, words: tuple[frozenset[int], ...], vocab_size: int):
        self.words = words
        self.vocab_size = vocab_size

    def next_state(self, state: int, word: int, image: int) -> int:
        return 1 if state == 0 and word in self.words[image] else state

    def goal(self, image: int) -> int:
        return 1 if self.words[image] else 0

    def surfacing_bias(self, image_index: np.ndarray, beam: int) -> np.ndarray | None:
        """float32 (R, V): ``SURFACE`` on each state-0 row's tag words (rows keep their state,
        so the bias is the same at every step)."""
        state0 = np.arange(len(image_index)) % (self.n_states * beam) < beam
        return tag_bias(self.words, self.vocab_size, SURFACE)[image_index] * state0[:, None]
