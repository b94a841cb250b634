"""The beam search with its bookkeeping in the step graph (``edgecap.build.beam_step``): the host
side, for runtimes that keep the decoder state on a device (onnxruntime, TensorRT).

Per word the graph scores every candidate, takes each image's best ``beam`` continuations
(a constant-K top-k), and reorders h / c by their back-pointers; what comes back to the host is
a few values a row (``BeamStepResult``): the chosen words, back-pointers, positions, scores
and log-probabilities, and where ``<end>`` stood in each row's top K. The host keeps what is
cheap and per row: each row's words so far, the finished hypotheses, the float64 score sums
(recomputed from the returned float32 log-probabilities, as the numpy loop sums them), and the
inputs of the next step that depend on the words chosen:

- ``word_bias`` (R, V): the host scorers' bias, from the same ``Scorer`` objects the numpy loop
  uses; the graph adds the rules it applies itself (``GraphRules``: the tag bonus, and the fused
  caption language models with ``beam_step_model(lms=...)``) and returns the bias of each
  row's ``<end>`` and chosen word, so that nothing of theirs runs on the host or goes up per
  word; with both in the graph (the default options) no scorer is left on the host;
- ``blocked_words`` (R, ``MAX_BLOCKED``) int32: the ids of the words that may not follow each
  row, known before the step, -1 past them: the words a caption never starts with (first word)
  and those that would repeat an n-gram of the row (``NoRepeatNgram``'s rule); a few ids a row
  rather than an (R, V) matrix, so what goes up on a word that blocks one is R x 200 int32
  (R x V float32 until 2026-12-07: 1.9 MB a word at 64 photos, beam 3);
- ``scores`` (R,): the rows' running scores, -inf for masked rows (done images, rows with no
  beam).

So the same rules as ``edgecap.decoding.beam``'s loop for an unconstrained search, and the same
captions (``tests/test_graph_search.py``), except where two candidates' scores differ by less
than float32 can tell apart: the graph ranks in float32, the numpy loop in float64. Not here
(the caller runs the numpy loop): the tag constraint (its candidates are split between beam
states by rules the numpy loop applies word by word) and the attention maps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgecap.build.beam_step import MAX_BLOCKED, beam_width, lm_state_widths
from edgecap.decoding import fusion_weight, scorers_for
from edgecap.decoding.beam import Hypothesis, length_normalised, ranked
from edgecap.decoding.options import CaptionOptions
from edgecap.decoding.rules import Scorer, TagBonus
from edgecap.errors import BackendError
from edgecap.vocab import NEVER_FIRST_IDS

NEG_INF = -np.inf
_NO_ID = np.iinfo(np.int64).max  # past a row's blocked ids, while they are sorted


@dataclass
class BeamStepResult:
    """One beam step's results, each (R,) (``edgecap.build.beam_step``)."""

    next_tokens: np.ndarray  # int32
    back_pointers: np.ndarray  # int32: each chosen candidate's source row
    choices: np.ndarray  # int32: its position among its image's beam x width candidates
    next_scores: np.ndarray  # float32: -inf where the image had no candidate for the row
    next_logprobs: np.ndarray  # float32
    end_logprobs: np.ndarray  # float32
    end_positions: np.ndarray  # int32: <end>'s place in the row's top K (K: absent)
    logprob_check: np.ndarray  # float32: 0, or NaN when the row's log-probabilities are not
    # the bias the graph summed (the host's + the rules it applies) at each row's <end> and at
    # its chosen word, float32
    end_biases: np.ndarray
    next_biases: np.ndarray


class BeamStepSession(Protocol):
    """One batch on a beam-step graph: the decoder state stays with the session."""

    def step(
        self,
        tokens: np.ndarray,
        source_rows: np.ndarray,
        scores: np.ndarray,
        word_bias: np.ndarray | None,
        blocked_words: np.ndarray | None,
    ) -> BeamStepResult:
        """tokens, source_rows int32 (R,) (the first step: ``source_rows`` = the rows' image;
        then the identity: the graph reordered the state), scores float32 (R,), word_bias
        float32 (R, V) or None (zeros), blocked_words int32 (R, ``MAX_BLOCKED``) or None (no
        word blocked: -1 throughout)."""


@dataclass
class _Image:
    """One image's finished hypotheses and the best place a beam could have ended."""

    finished: list[Hypothesis]
    could_end: Hypothesis | None = None
    ended: list[Hypothesis] | None = None  # every place it could have ended (``endings``)


def graph_beam_search(
    session: BeamStepSession,
    n_images: int,
    options: CaptionOptions,
    top_k: int,
    width: int,
    start_id: int,
    end_id: int,
    *,
    never_first: Collection[int] = (),
    scorers: Sequence[Callable[[np.ndarray], Scorer]] = (),
    describe: Callable[[], str] = lambda: "beam-step graph",
    endings: bool = False,
) -> list[list[Hypothesis]]:
    """Each image's hypotheses, best first (``beam.beam_search`` without a partition or
    attention; ``endings`` as there). ``width``: candidates per row the graph was made with;
    ``scorers``: factories called with the rows' image index, as ``beam_search`` takes them.

    The host's work per word is numpy over all rows at once (the graph hands back every row's
    results together); Python loops only over the images where something is recorded: a beam
    that ends, a better place to end, every ending (``endings``), an image out of beams."""
    beam, penalty, n = options.beam_size, options.length_penalty, options.no_repeat_ngram
    rows = n_images * beam
    image_index = np.repeat(np.arange(n_images, dtype=np.int32), beam)
    first_row = np.repeat(np.arange(0, rows, beam, dtype=np.int64), beam)  # each row's image's
    slot = np.tile(np.arange(beam, dtype=np.int64), n_images)  # its place in the image's beam
    active = [make(image_index) for make in scorers]
    never = np.array(sorted(never_first), np.int64)
    tokens = np.full(rows, start_id, np.int32)
    source_rows = chosen = image_index.copy()
    identity = np.arange(rows, dtype=np.int32)
    sum_lp = np.full(rows, NEG_INF)
    sum_lp[::beam] = 0.0
    true_lp = np.zeros(rows)
    said = np.zeros((rows, options.max_length), np.int64)  # each row's words: said[:, :t]
    images = [_Image([], ended=[] if endings else None) for _ in range(n_images)]
    done = np.zeros(n_images, bool)
    any_done = False
    n_finished = np.zeros(n_images, np.int64)
    # the best place to end so far, while an image has no finished hypothesis: whether it has
    # one (``_Image.could_end``), its rank score and log-probability
    could = (np.zeros(n_images, bool), np.zeros(n_images), np.zeros(n_images))

    for t in range(options.max_length):
        # the scorers get the step's inputs as the numpy loop gives them: the back-pointers
        biases = [b for b in (s.bias(t, tokens, chosen) for s in active) if b is not None]
        bonus = sum(biases[1:], biases[0]) if biases else None
        live = sum_lp != NEG_INF  # (done images' rows are all masked)
        block = _blocked(t, said[:, :t], live, never, n)
        result = session.step(tokens, source_rows, sum_lp.astype(np.float32), bonus, block)
        if not np.isfinite(result.logprob_check).all():
            raise BackendError(
                f"the decoder step returned non-finite log-probabilities at word {t + 1} ({describe()})"
            )
        end_lp = result.end_logprobs.astype(np.float64)
        # the numpy loop's sums, in its order: score + (log-prob + bias), the bias the graph's
        # own sum (the rules it applies included)
        end_rank = sum_lp + (end_lp + result.end_biases.astype(np.float64))
        end_true = true_lp + end_lp
        lp = result.next_logprobs.astype(np.float64)
        src = result.back_pointers.astype(np.int64)
        cont_rank = sum_lp[src] + (lp + result.next_biases.astype(np.float64))
        cont_true = true_lp[src] + lp
        end_at = result.end_positions  # int32
        if t > 0:  # <end> is never blocked after the first word
            in_top = live & (end_at < top_k)  # the best place to end is among them
            if endings:
                rows_in = in_top.nonzero()[0]
                if len(rows_in):
                    found = _hypotheses(rows_in, said[:, :t], end_rank, end_true, True, penalty)
                    for row, hypothesis in zip(rows_in.tolist(), found):
                        images[row // beam].ended.append(hypothesis)
            else:
                candidates = in_top & (n_finished == 0)[image_index]
                _best_endings(images, candidates, t, end_rank, end_true, said, penalty, could)
        taken = result.next_scores != NEG_INF
        every_row = bool(taken.all())  # (the common case: the rest is simpler)
        count = None if every_row else taken.reshape(n_images, beam).sum(1)
        # an <end> among the row's first ``width`` words, unblocked, ranked before the image's
        # last continuation: the numpy loop meets it before the beam is full
        ends = live & (end_at < width)
        if block is not None:
            ends &= ~(block == end_id).any(axis=1)
        finishing = False  # whether a beam ended at this word
        if ends.any():
            at = slot * width + end_at
            last = first_row + (beam - 1)
            before_last = (end_rank > cont_rank[last]) | (
                (end_rank == cont_rank[last]) & (at < result.choices[last])
            )
            ends &= before_last if count is None else before_last | (count < beam)[image_index]
            ending_rows = ends.nonzero()[0]
            # each image's by rank, then place among its candidates
            by_rank = np.lexsort((at[ending_rows], -end_rank[ending_rows], ending_rows // beam))
            for row in ending_rows[by_rank].tolist():
                state = images[row // beam]
                if len(state.finished) < beam:
                    state.finished.append(
                        _hypothesis(said[row, :t], end_rank[row], end_true[row], True, penalty)
                    )
                    n_finished[row // beam] += 1
                    finishing = True
        # each image's continuations first, in the graph's order; masked rows keep a valid
        # source row (the image's first)
        ending: np.ndarray | None = None  # the images done at this word
        if every_row and not any_done:
            new_source, new_lp, new_true = src, cont_rank, cont_true
            new_tokens = result.next_tokens.astype(np.int32)
            if finishing:  # (each image has a continuation: no beam to keep)
                ending = n_finished >= beam
        else:
            taken &= ~done[image_index]
            order = first_row + np.argsort(~taken.reshape(n_images, beam), axis=1, kind="stable").reshape(-1)
            kept = taken[order]
            new_source = np.where(kept, src[order], first_row)
            new_tokens = np.where(kept, result.next_tokens[order], end_id).astype(np.int32)
            new_lp = np.where(kept, cont_rank[order], NEG_INF)
            new_true = np.where(kept, cont_true[order], 0.0)
            ending = ~done & ((n_finished >= beam) if count is None else (n_finished >= beam) | (count == 0))
            for img in (ending & (n_finished == 0)).nonzero()[0].tolist():
                # every continuation blocked and none could end: keep the live beams
                _keep_live(images[img], img, beam, live, said[:, :t], sum_lp, true_lp, penalty)
        if ending is not None and ending.any():
            done |= ending
            any_done = True
            new_lp = np.where(done[image_index], NEG_INF, new_lp)
            if done.all():
                break
        for scorer in active:
            scorer.update(new_source, new_tokens, new_lp != NEG_INF)
        said = said[new_source]
        said[:, t] = new_tokens
        tokens, sum_lp, true_lp = new_tokens, new_lp, new_true
        chosen = new_source.astype(np.int32)
        source_rows = identity  # the graph reordered its state by the back-pointers
    else:
        live = sum_lp != NEG_INF
        for img in (~done).nonzero()[0].tolist():  # out of words: the live beams of the others
            _keep_live(images[img], img, beam, live, said, sum_lp, true_lp, penalty)
    out = []
    for state in images:
        hyps = list(state.finished)
        if state.could_end is not None and not any(h.finished for h in hyps):
            hyps.append(state.could_end)
        best = ranked(hyps)
        best.sort(key=lambda h: not h.finished)  # stable: finished captions first
        if not best:  # pragma: no cover - with finite scores a live beam survives
            raise BackendError("beam search produced no hypothesis")
        if state.ended is not None:
            out.append(ranked(state.ended) + [h for h in best if not h.finished])
        else:
            out.append(best[: options.n_best])
    return out


def search_with_rules(
    session: BeamStepSession,
    n_images: int,
    options: CaptionOptions,
    dims,
    start_id: int,
    end_id: int,
    rules: GraphRules,
    class_probs,
    describe: Callable[[], str],
) -> list[list[Hypothesis]]:
    """``graph_beam_search`` over a beam-step graph made for ``options.beam_size`` (its width
    ``beam_width``), with the rules of an unconstrained search: the never-first words and the
    scorers ``edgecap.decoding.scorers_for`` makes, but those the graph applies (``rules``, the
    session's: the tag bonus, and the language models where it steps them); every ending with
    ``options.consensus`` (``edgecap.decoding.search_with_tags`` chooses among them). ``dims``:
    the model's ``ModelDimensions``."""
    return graph_beam_search(
        session,
        n_images,
        options,
        dims.top_k,
        beam_width(options.beam_size, dims.top_k),
        start_id,
        end_id,
        never_first=NEVER_FIRST_IDS,
        scorers=scorers_for(options, dims.vocab_size, None, rules.fusion, class_probs),
        describe=describe,
        endings=options.consensus,
    )


@dataclass
class GraphRules:
    """A search's rules as a beam-step graph takes them (``edgecap.build.beam_step``), besides
    the host's per-word inputs: ``fixed`` inputs, the same at every word (``tag_bias``; with the
    language models ``lm_weights``), and ``carried`` states with their first values, which the
    graph returns as ``NAME_next`` for the next word (``steered``; with the language models
    their states, zeros). ``lms``: the language models (everyday, in-domain) the graph steps, or
    None; ``fusion``: what the host's scorers get (None where the graph steps them)."""

    fixed: dict[str, np.ndarray]
    carried: dict[str, np.ndarray]
    lms: tuple | None
    fusion: object | None


def graph_rules(
    options: CaptionOptions,
    vocab_size: int,
    tag_words,
    fusion,
    image_index: np.ndarray,
    class_probs,
    lms_in_graph: bool = True,
) -> GraphRules:
    """The graph's side of the rules ``scorers_for`` would make for the host: the tag bonus
    (always in the graph: ``TagBonus``'s bias on each row's tag words and its rows still
    steered; zeros where the options or the photos give none, a bias of exactly 0) and, with
    ``lms_in_graph``, the fused language models where ``lm_row_weights`` gives them weights."""
    rows = len(image_index)
    tag_bias = np.zeros((rows, vocab_size), np.float32)
    steered = np.zeros(rows, np.float32)
    if tag_words is not None and any(tag_words) and options.guidance_bonus > 0:
        bonus = TagBonus(tag_words, vocab_size, options.guidance_bonus, image_index)
        tag_bias, steered = bonus.row_bias, bonus.steered.astype(np.float32)
    weights = lm_row_weights(options, fusion, image_index, class_probs) if lms_in_graph else None
    fixed, carried = {"tag_bias": tag_bias}, {"steered": steered}
    if weights is None:
        return GraphRules(fixed, carried, None, None if lms_in_graph else fusion)
    lms = (fusion.everyday, fusion.in_domain)
    carried.update(
        {name: np.zeros((rows, width), np.float32) for name, width in lm_state_widths(lms).items()}
    )
    return GraphRules({**fixed, "lm_weights": weights}, carried, lms, None)


def lm_row_weights(
    options: CaptionOptions, fusion, image_index: np.ndarray, class_probs
) -> np.ndarray | None:
    """float32 (R, 1): each row's weight of the fused language models, as the host's scorer
    weighs them (``fusion_weight``, times the gate's share of the row's photo); None when the
    search fuses none (no language models, or weight 0). A graph that steps them
    (``beam_step_model(lms=...)``) takes these as ``lm_weights``, a row of weight 0 getting a
    bias of exactly 0; where the gate gives no row a weight (photos typical of the training
    photos) None too: the host's search would step no language model for them either, and the
    graph without them is the cheaper."""
    weight = fusion_weight(options, fusion)
    if weight <= 0:
        return None
    scorer = fusion.scorer(weight, image_index, class_probs)
    return scorer.weights if scorer.active else None


def _blocked(t: int, said: np.ndarray, live: np.ndarray, never: np.ndarray, n: int) -> np.ndarray | None:
    """int32 (R, ``MAX_BLOCKED``): the ids of the words that may not follow each row (``said``:
    (R, t), its words so far), each once, ascending, -1 past them: ``NeverFirst`` at the first
    word, then ``NoRepeatNgram`` for the ``live`` rows (the word would repeat an n-gram of the
    row; ``<end>`` only at the first word); None when nothing is blocked."""
    rows = len(said)
    block = None
    if t == 0 and len(never):
        if len(never) > MAX_BLOCKED:
            raise ValueError(f"at most {MAX_BLOCKED} never-first words, got {len(never)}")
        block = np.full((rows, MAX_BLOCKED), -1, np.int32)
        block[:, : len(never)] = never
    if n <= 0 or t < n:
        return block
    # (a live row's words hold no <end>: a row that says it ends; so neither does this)
    following = said[:, n - 1 : t]  # the word after each earlier (n - 1)-gram, (R, t - n + 1)
    if n == 1:
        match = np.repeat(live[:, None], t, axis=1)
    else:  # those (n - 1)-grams that are the row's last n - 1 words
        match = said[:, : t - n + 1] == said[:, t - n + 1, None]
        for j in range(1, n - 1):
            match &= said[:, j : j + t - n + 1] == said[:, t - n + 1 + j, None]
        match &= live[:, None]
    if not match.any():
        return block
    # at most the row's words, fewer than max_length <= MAX_BLOCKED
    ids = np.sort(np.where(match, following, _NO_ID), axis=1)
    ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = _NO_ID  # each word once
    ids.sort(axis=1)
    if block is None:
        block = np.full((rows, MAX_BLOCKED), -1, np.int32)
    block[:, : ids.shape[1]] = np.where(ids == _NO_ID, -1, ids)
    return block


def _best_endings(images, candidates, t, end_rank, end_true, said, penalty, could) -> None:
    """Each image's best place to end (``beam._best_ending``: by rank score, then
    log-probability, the first one on ties; a later one must rank strictly better): its
    ``candidates`` rows' ``<end>`` after their ``t`` words against the one it has, if any
    (``could``: whether it has one, its rank score and log-probability; updated with it)."""
    if not candidates.any():
        return
    has, could_rank, could_true = could
    n_images = len(images)
    candidates = candidates.reshape(n_images, -1)
    rank = np.where(candidates, length_normalised(end_rank, t + 1, penalty).reshape(n_images, -1), NEG_INF)
    tied = candidates & (rank == rank.max(1, keepdims=True))
    true = np.where(tied, end_true.reshape(n_images, -1), NEG_INF)
    pick = (tied & (true == true.max(1, keepdims=True))).argmax(1)  # the first of the best
    places = np.arange(n_images)
    best_rank, best_true = rank[places, pick], true[places, pick]
    better = candidates.any(1) & (
        ~has | (best_rank > could_rank) | ((best_rank == could_rank) & (best_true > could_true))
    )
    for img in better.nonzero()[0].tolist():
        row = img * candidates.shape[1] + int(pick[img])
        images[img].could_end = _hypothesis(said[row, :t], end_rank[row], end_true[row], True, penalty)
    has |= better
    could_rank[better], could_true[better] = best_rank[better], best_true[better]


def _keep_live(state: _Image, img: int, beam: int, live, said, sum_lp, true_lp, penalty) -> None:
    """The image's live beams (rows with a score) as unfinished hypotheses, in row order, while
    it has fewer than ``beam``."""
    for row in range(img * beam, img * beam + beam):
        if live[row] and len(state.finished) < beam:
            state.finished.append(_hypothesis(said[row], sum_lp[row], true_lp[row], False, penalty))


def _hypothesis(seq, rank_lp, log_prob, finished: bool, penalty) -> Hypothesis:
    """As ``beam._hypothesis`` makes it (no attention)."""
    words = np.asarray(seq, np.int64).tolist()
    length = max(len(words) + (1 if finished else 0), 1)
    return Hypothesis(
        words,
        float(log_prob),
        length_normalised(float(log_prob), length, penalty),
        finished,
        None,
        rank_score=length_normalised(float(rank_lp), length, penalty),
    )


def _hypotheses(
    rows: np.ndarray, said: np.ndarray, rank_lp, log_prob, finished: bool, penalty
) -> list[Hypothesis]:
    """``_hypothesis`` for each of ``rows`` at once: ``said`` (R, t) the rows' words,
    ``rank_lp`` and ``log_prob`` (R,) float64 (the same floats: numpy divides as Python does)."""
    if len(rows) < 4:  # (numpy's own cost is the larger for a few)
        return [
            _hypothesis(said[row], rank_lp[row], log_prob[row], finished, penalty) for row in rows.tolist()
        ]
    length = max(said.shape[1] + (1 if finished else 0), 1)
    log_probs, rank_lps = log_prob[rows], rank_lp[rows]
    scores = length_normalised(log_probs, length, penalty).tolist()
    ranks = length_normalised(rank_lps, length, penalty).tolist()
    return [
        Hypothesis(words, value, score, finished, None, rank_score=rank)
        for words, value, score, rank in zip(said[rows].tolist(), log_probs.tolist(), scores, ranks)
    ]
