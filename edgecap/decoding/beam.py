"""The beam loop, in numpy, over the encoder / decoder-step interface (``edgecap.backends.base``).

All beams of all images are flat rows whose count never changes: image-major, and within an image
one block of ``beam_size`` rows per state of the partition (``edgecap.decoding.constraint``; one
state for the plain search). A beam that finishes leaves the live set (its hypothesis is kept) and
the next best candidate takes its row; an image that is done, or a row with no live candidate, is
masked with a score of -inf so the step graph always sees the same shape. Beam indices are
integers (``//``). The rules (``edgecap.decoding.rules``) filter candidates and add to their
scores; the length penalty is applied only when ranking finished hypotheses, and every image gets
at least one non-empty hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from edgecap.backends.base import Backend, Encoded
from edgecap.decoding.constraint import Unconstrained
from edgecap.decoding.options import CaptionOptions
from edgecap.decoding.rules import Filter, Scorer
from edgecap.errors import BackendError

NEG_INF = -np.inf


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> / <end>
    log_prob: float  # sum of the log-probabilities (with <end> when finished)
    score: float  # length-normalised log-prob
    finished: bool  # ended with <end> (False: cut at max_length)
    attention: np.ndarray | None = None  # (n_words, L)
    rank_score: float | None = None  # what ranks it: ``score`` with the scorers' bonuses (if any)
    held: bool = False  # the caption said last, kept for this image (``edgecap.decoding.hold``)


Scores = TypeVar("Scores", float, np.ndarray)


def length_normalised(log_prob: Scores, length: int, penalty: float | None) -> Scores:
    """``log_prob`` over the caption's length (``penalty`` None) or its GNMT length penalty;
    for an array, each element as the float alone would give (numpy divides as Python does)."""
    if penalty is None:
        return log_prob / length
    return log_prob / (((5.0 + length) / 6.0) ** penalty)


def beam_search(
    backend: Backend,
    encoded: Encoded,
    options: CaptionOptions,
    start_id: int,
    end_id: int,
    *,
    filters: Sequence[Filter] = (),
    scorers: Sequence[Callable[[np.ndarray], Scorer]] = (),
    partition=None,
    return_attention: bool = False,
    endings: bool = False,
) -> list[list[Hypothesis]]:
    """-> for each image, up to ``n_best`` hypotheses, best first (never none); each with its
    attention (n_words, L) when ``return_attention``. The goal state's hypotheses come before the
    others. ``endings`` (one state only): instead, every place the search could have ended
    (``<end>`` in a live row's top K, after the first word), ranked, then any caption cut at
    ``max_length``, none left out: what ``edgecap.decoding.consensus`` chooses among.
    ``filters`` and ``scorers`` are the rules (``edgecap.decoding.rules``); a scorer is given
    as a factory called with the rows' image index (R,) int32. ``partition``: the beam states
    (``edgecap.decoding.constraint``; None: one). Raises ``BackendError`` when the step returns
    non-finite log-probabilities."""
    options.validate(backend.top_k)
    partition = partition or Unconstrained()
    n_states = partition.n_states
    n_images, beam = encoded.n_images, options.beam_size
    group = n_states * beam  # rows per image
    rows = n_images * group
    # One candidate more than the beam per row, so a beam keeps ``beam`` live continuations
    # even when one of its best words is <end>.
    width = min(beam + 1, backend.top_k)
    image_index = np.repeat(np.arange(n_images, dtype=np.int32), group)
    session = backend.start(encoded, image_index, return_attention=return_attention)
    active = [make(image_index) for make in scorers]
    surfacing = partition.surfacing_bias(image_index, beam)

    tokens = np.full(rows, start_id, dtype=np.int32)
    source_rows = image_index.copy()  # first step: h0/c0 are per image
    sum_lp = np.full(rows, NEG_INF)  # what the search ranks by (with any bonus)
    sum_lp[::group] = 0.0  # one live beam per image at the start
    true_lp = np.zeros(rows)  # the model's own log-probability
    seqs: list[list[int]] = [[] for _ in range(rows)]  # words so far, per row
    alphas = None
    # finished[image][state]: the hypotheses that ended in that state
    finished: list[list[list[Hypothesis]]] = [[[] for _ in range(n_states)] for _ in range(n_images)]
    done = np.zeros(n_images, dtype=bool)
    goals = [partition.goal(image) for image in range(n_images)]
    # Per image, the best place any beam could have ended (<end> in its top K but not taken):
    # the caption when no hypothesis finishes before max_length, instead of one cut mid-phrase.
    could_end: list[tuple[Hypothesis, int] | None] = [None] * n_images  # (it, its state)
    if endings and n_states != 1:
        raise ValueError("endings: a search of one beam state only")
    ended: list[list[Hypothesis]] = [[] for _ in range(n_images)]  # with ``endings``

    for t in range(options.max_length):
        biases = [b for b in (s.bias(t, tokens, source_rows) for s in active) if b is not None]
        bonus = sum(biases[1:], biases[0]) if biases else None
        word_bias = bonus if surfacing is None else (surfacing if bonus is None else bonus + surfacing)
        result = session.step(tokens, source_rows, word_bias)
        lp = result.topk_logprobs.astype(np.float64)
        ids = result.topk_ids
        alphas = checked_step(lp, result, t, backend, alphas, return_attention)
        true_cand = (true_lp[:, None] + lp).tolist()
        if bonus is not None:
            lp = lp + np.take_along_axis(bonus, ids.astype(np.int64), axis=1)
        # Python lists: the candidate loop below reads single values, which is several times
        # cheaper from a list than from a numpy array.
        cand_l, ids_l = (sum_lp[:, None] + lp).tolist(), ids.tolist()
        live_l = (sum_lp != NEG_INF).tolist()
        new_source = np.empty(rows, dtype=np.int64)
        new_tokens = np.full(rows, end_id, dtype=np.int32)
        new_lp = np.full(rows, NEG_INF)
        new_true = np.zeros(rows)
        for rule in filters:
            rule.begin_step(t)
        for img in range(n_images):
            base = img * group
            if done[img]:
                new_source[base : base + group] = base
                continue
            into = _candidates(partition, img, base, beam, width, live_l, cand_l, true_cand, ids_l)
            if endings and t > 0:  # the best place to end is among them
                _endings(
                    ended[img], base, group, end_id, live_l, cand_l, true_cand, ids_l, seqs, alphas, options
                )
            elif t > 0 and not any(finished[img]):
                could_end[img] = _best_ending(
                    could_end[img],
                    base,
                    beam,
                    group,
                    end_id,
                    live_l,
                    cand_l,
                    true_cand,
                    ids_l,
                    seqs,
                    alphas,
                    options,
                )
            live = False
            for state in range(n_states):
                hyps = finished[img][state]
                first = base + state * beam
                filled = 0
                if state != goals[img] and len(hyps) >= beam:
                    into[state].clear()  # enough captions of this state to fall back on
                for score, model_lp, src, word in sorted(into[state], key=lambda c: -c[0]):
                    if filled == beam:
                        break
                    if any(rule.blocks(t, seqs[src], word, src) for rule in filters):
                        continue
                    if word == end_id:
                        if len(hyps) < beam:
                            hyps.append(
                                _hypothesis(
                                    seqs[src], score, model_lp, True, alphas, src, options.length_penalty
                                )
                            )
                        continue
                    row = first + filled
                    new_source[row], new_tokens[row] = src, word
                    new_lp[row], new_true[row] = score, model_lp
                    filled += 1
                # Masked rows keep a valid source row so the step's gather stays in range.
                new_source[first + filled : first + beam] = base
                live = live or filled > 0
            if len(finished[img][goals[img]]) >= beam or not live:
                if not live and not any(finished[img]):
                    # Every continuation was blocked (repeats) and none could end: keep what
                    # the live beams have so far rather than return nothing.
                    _keep_live(finished[img], base, beam, seqs, sum_lp, true_lp, alphas, options)
                done[img] = True
                new_lp[base : base + group] = NEG_INF
        if done.all():
            break
        live_rows = new_lp != NEG_INF
        for scorer in active:
            scorer.update(new_source, new_tokens, live_rows)
        seqs = [seqs[src] + [word] for src, word in zip(new_source.tolist(), new_tokens.tolist())]
        if alphas is not None:
            alphas = alphas[new_source]
        tokens, sum_lp, true_lp = new_tokens, new_lp, new_true
        source_rows = new_source.astype(np.int32)
    else:
        # Out of words: the live beams of unfinished images become (unfinished) hypotheses.
        for img in range(n_images):
            if not done[img]:
                _keep_live(finished[img], img * group, beam, seqs, sum_lp, true_lp, alphas, options)
    for img, ending in enumerate(could_end):
        if ending is not None and not any(h.finished for state in finished[img] for h in state):
            hyp, state = ending
            finished[img][state].append(hyp)
    if endings:
        return [
            ranked(ended[img]) + [h for h in _rank(finished[img], 0, None) if not h.finished]
            for img in range(n_images)
        ]
    return [_rank(finished[img], goals[img], options) for img in range(n_images)]


def _endings(out, base, group, end_id, live_l, cand_l, true_l, ids_l, seqs, alphas, options) -> None:
    """Append to ``out`` each live row's caption so far ended where ``<end>`` is in its top K
    (``<end>`` is never blocked after the first word)."""
    for src in range(base, base + group):
        if live_l[src] and end_id in ids_l[src]:
            k = ids_l[src].index(end_id)
            out.append(
                _hypothesis(
                    seqs[src], cand_l[src][k], true_l[src][k], True, alphas, src, options.length_penalty
                )
            )


def _best_ending(
    best, base, beam, group, end_id, live_l, cand_l, true_l, ids_l, seqs, alphas, options
) -> tuple[Hypothesis, int] | None:
    """``best`` or, if better ranked, the best ending (<end> among the top K) of an image's
    live rows at this step, with the state of its row."""
    for src in range(base, base + group):
        if not live_l[src] or end_id not in ids_l[src]:
            continue
        k = ids_l[src].index(end_id)
        # ranked as _hypothesis would rank it; the hypothesis (and its attention copy) is made
        # only for a better ending
        rank = (length_normalised(cand_l[src][k], len(seqs[src]) + 1, options.length_penalty), true_l[src][k])
        if best is None or rank > (best[0].rank_score, best[0].log_prob):
            best = (
                _hypothesis(
                    seqs[src], cand_l[src][k], true_l[src][k], True, alphas, src, options.length_penalty
                ),
                (src - base) // beam,
            )
    return best


def _candidates(partition, img, base, beam, width, live_l, cand_l, true_l, ids_l) -> list[list]:
    """Image ``img``'s candidates (score, model log-prob, source row, word) per target state,
    in row order: from each live row, its ``width`` best words that keep its state, and every
    word of its top K before those that moves it to another state."""
    into: list[list] = [[] for _ in range(partition.n_states)]
    for state in range(partition.n_states):
        for src in range(base + state * beam, base + state * beam + beam):
            if not live_l[src]:
                continue
            kept = 0
            for k, word in enumerate(ids_l[src]):
                target = partition.next_state(state, word, img)
                if target != state:
                    into[target].append((cand_l[src][k], true_l[src][k], src, word))
                elif kept < width:
                    kept += 1
                    into[state].append((cand_l[src][k], true_l[src][k], src, word))
                else:
                    break
    return into


def checked_step(
    lp: np.ndarray, result, t: int, backend: Backend, alphas: np.ndarray | None, return_attention: bool
) -> np.ndarray | None:
    """Raise ``BackendError`` when step ``t``'s log-probabilities ``lp`` are not finite; -> the
    attention so far (rows, words, L) with this step's appended (None without attention)."""
    if not np.isfinite(lp).all():
        # NaN or overflow in the step (e.g. an FP16 engine out of range): fail loudly rather
        # than return a caption built on garbage.
        raise BackendError(
            f"the decoder step returned non-finite log-probabilities at word {t + 1} ({backend.describe()})"
        )
    if not return_attention:
        return alphas
    step_alpha = result.alpha[:, None, :]
    return step_alpha if alphas is None else np.concatenate([alphas, step_alpha], 1)


def _hypothesis(seq, rank_lp, log_prob, finished, alphas, row, penalty) -> Hypothesis:
    words = [int(w) for w in seq]
    length = max(len(words) + (1 if finished else 0), 1)
    attention = None if alphas is None else np.array(alphas[row, : len(words)])
    return Hypothesis(
        words,
        float(log_prob),
        length_normalised(float(log_prob), length, penalty),
        finished,
        attention,
        rank_score=length_normalised(float(rank_lp), length, penalty),
    )


def _keep_live(by_state, base, beam, seqs, sum_lp, true_lp, alphas, options) -> None:
    """An image's live beams become unfinished hypotheses of their state, up to ``beam`` per
    state; the image's rows start at ``base``, one block of ``beam`` per state."""
    for state, hyps in enumerate(by_state):
        for row in range(base + state * beam, base + state * beam + beam):
            if sum_lp[row] != NEG_INF and len(hyps) < beam:
                hyps.append(
                    _hypothesis(
                        seqs[row], sum_lp[row], true_lp[row], False, alphas, row, options.length_penalty
                    )
                )


def ranked(hyps: list[Hypothesis]) -> list[Hypothesis]:
    """Best first: by the ranking score (the model's score plus any bonus), then log-prob."""
    return sorted(hyps, key=lambda h: (-(h.score if h.rank_score is None else h.rank_score), -h.log_prob))


def _rank(by_state: list[list[Hypothesis]], goal: int, options: CaptionOptions | None) -> list[Hypothesis]:
    """Finished captions before captions cut at ``max_length`` (a sentence cut mid-phrase is
    never chosen over one that ended); within each, the goal state's hypotheses best first,
    then the other states', from the goal down; ``options.n_best`` of them (None: all)."""
    out = [h for state in range(goal, -1, -1) for h in ranked(by_state[state])]
    out.sort(key=lambda h: not h.finished)  # stable: the order above within each
    if not out:  # pragma: no cover - with finite scores a live beam survives to max_length
        raise BackendError("beam search produced no hypothesis")
    return out if options is None else out[: options.n_best]
