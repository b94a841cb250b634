"""Holding a caption: the caption said last kept for a new frame of the same scene when the
model finds it about as good a caption of the new frame as its own choice.

Two frames of a still scene differ in sensor noise, exposure, a pixel's shift; the caption
model's best words are often near ties (``benchmarks/flicker.py``: two frames with other noise
get different captions for 38% of the dev photos), so a camera's captions flicker between
equally good wordings. Here the previous caption is scored on the new frame as the search scores
an ending (``given_hypotheses``: the words fed one by one, each step's log-probability of the
next given word, plus the bonuses of the scorers the search ran with: the tag bonus, the fused
language models; the search's own caption scored so gets the search's scores to the last bit,
with an FP32 or FP16 step: an int8 step, whose inputs are quantised with one scale over the rows
run together, differs by a few thousandths a word, and a step-graph search on a GPU, which
steps the language models there, may differ in the last bits), and it is kept when its ranking score (per
word) is within ``margin`` of the caption the search chose (``holds``). A different scene makes
the previous caption improbable and it gives way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgecap.backends.base import Backend, Encoded
from edgecap.decoding.beam import Hypothesis, checked_step, length_normalised
from edgecap.decoding.options import CaptionOptions
from edgecap.decoding.rules import Filter, Scorer

# What the decoder step's ``word_bias`` adds to the given word so that it is the step's best:
# more than any log-probability is below zero (the words a caption never holds are floored at
# about -1e4: edgecap.models.decoder.LOGIT_FLOOR), and finite in FP16 (at most 65,504).
FORCE = 3.0e4


def given_hypotheses(
    backend: Backend,
    encoded: Encoded,
    image_of: Sequence[int],
    captions: Sequence[Sequence[int]],
    options: CaptionOptions,
    start_id: int,
    end_id: int,
    vocab_size: int,
    scorers: Sequence[Callable[[np.ndarray], Scorer]] = (),
    filters: Sequence[Filter] = (),
) -> list[Hypothesis | None]:
    """Each caption (word ids without ``<start>`` / ``<end>``) scored on the image ``image_of``
    names, as the search would score it had it ended there: a finished ``Hypothesis`` whose
    ``log_prob`` and ``score`` are the model's own (``<end>`` included) and ``rank_score``
    adds the scorers' bonuses (the scorers as ``beam_search`` takes them: factories of the rows'
    image index), with ``options``' length penalty. None for a caption the search could not
    have ended: empty, longer than ``options.max_length`` allows, with a word the step cannot
    give (outside its top K even when forced), or one that ``filters`` (the search's rules:
    ``edgecap.decoding.filters_for``) block where it stands: a repeated n-gram."""
    rows = len(captions)
    if rows == 0:
        return []
    image_index = np.asarray(image_of, dtype=np.int32)
    sayable = [0 < len(words) < options.max_length for words in captions]
    if filters:
        sayable = _unblocked(captions, sayable, filters, end_id)
    # each row's words and its <end>; a row that has ended (or cannot be said) is fed <end>
    steps = max((len(w) + 1 for w, ok in zip(captions, sayable) if ok), default=0)
    if steps == 0:
        return [None] * rows
    wanted = np.full((rows, steps), end_id, dtype=np.int64)
    for row, (words, ok) in enumerate(zip(captions, sayable)):
        if ok:
            wanted[row, : len(words)] = words
    session = backend.start(encoded, image_index)
    active = [make(image_index) for make in scorers]
    tokens = np.full(rows, start_id, dtype=np.int32)
    source_rows = image_index.copy()
    model_lp = np.zeros(rows)
    rank_lp = np.zeros(rows)
    every = np.arange(rows)
    force = np.zeros((rows, vocab_size), np.float32)  # each row's given word at FORCE
    for t in range(steps):
        biases = [b for b in (s.bias(t, tokens, source_rows) for s in active) if b is not None]
        bonus = sum(biases[1:], biases[0]) if biases else None
        word = wanted[:, t]
        if t > 0:
            force[every, wanted[:, t - 1]] = 0.0
        force[every, word] = FORCE
        result = session.step(tokens, source_rows, force)
        lp = result.topk_logprobs.astype(np.float64)
        checked_step(lp, result, t, backend, None, False)
        ids = result.topk_ids.astype(np.int64)
        found = ids == word[:, None]
        said = found.any(axis=1)
        live = np.array([ok and t <= len(w) for w, ok in zip(captions, sayable)])
        for row in np.flatnonzero(live & ~said).tolist():
            sayable[row] = False  # a word the step cannot give
        word_lp = np.where(said, lp[every, found.argmax(axis=1)], 0.0)
        model_lp += np.where(live & said, word_lp, 0.0)
        gained = 0.0 if bonus is None else bonus[every, word].astype(np.float64)
        rank_lp += np.where(live & said, word_lp + gained, 0.0)
        for scorer in active:
            scorer.update(every, word, live)
        tokens, source_rows = word.astype(np.int32), every.astype(np.int32)
    penalty = options.length_penalty
    out: list[Hypothesis | None] = []
    for row, (words, ok) in enumerate(zip(captions, sayable)):
        if not ok:
            out.append(None)
            continue
        length = len(words) + 1
        out.append(
            Hypothesis(
                [int(w) for w in words],
                float(model_lp[row]),
                length_normalised(float(model_lp[row]), length, penalty),
                True,
                rank_score=length_normalised(float(rank_lp[row]), length, penalty),
            )
        )
    return out


def _unblocked(
    captions: Sequence[Sequence[int]], sayable: list[bool], filters: Sequence[Filter], end_id: int
) -> list[bool]:
    """``sayable`` with the captions whose words (or whose ``<end>``) a filter blocks where they
    stand turned False: the search never says them. The filters are asked as the beam loop asks
    them, step by step (``begin_step``), each row by its index."""
    out = list(sayable)
    steps = max((len(words) + 1 for words, ok in zip(captions, out) if ok), default=0)
    for t in range(steps):
        for rule in filters:
            rule.begin_step(t)
        for row, words in enumerate(captions):
            if not out[row] or t > len(words):
                continue
            word = int(words[t]) if t < len(words) else end_id
            before = [int(w) for w in words[:t]]
            if any(rule.blocks(t, before, word, row) for rule in filters):
                out[row] = False
    return out


def holds(previous: Hypothesis | None, new: Hypothesis | None, margin: float) -> bool:
    """Whether the previous caption is kept: it could have ended here and its ranking score per
    word (``given_hypotheses``') is no more than ``margin`` below the new caption's (as the
    search ranked it)."""
    if previous is None or new is None:
        return False
    return ranking(previous) >= ranking(new) - margin


def ranking(hyp: Hypothesis) -> float:
    """What ranks a hypothesis: its score with the scorers' bonuses, else its score."""
    return hyp.score if hyp.rank_score is None else hyp.rank_score
