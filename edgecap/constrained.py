"""Constrained beam search (Anderson et al., "Guided Open Vocabulary Image Captioning with
Constrained Beam Search", EMNLP 2017): the caption must say one of the image's tag words.

One disjunctive constraint per image (any word of its confident tags) gives two beams per image:
state 0, the captions that have not said a tag word yet, and state 1, those that have. A state-0
beam that says a tag word moves to state 1; state 1 continues unsteered. The caption is the best
finished state-1 hypothesis, or, when none finished, the best of state 0 (the plain caption), so
a constraint never leaves an image without a caption. An image with no confident tag is searched
exactly as ``edgecap.search.beam_search`` searches it.

It runs over the same decoder-step interface as the plain search (``edgecap.backends.base``),
with fixed shapes: ``2 * beam_size`` rows per image, masked when empty. The tag words reach the
step's top K through ``word_bias`` on the state-0 rows (the returned log-probabilities never
include it), so a tag word the model ranks low can still be chosen. Ranking uses the model's own
log-probabilities: no bonus.
"""

from __future__ import annotations

import numpy as np

from edgecap.backends.base import Backend, Encoded
from edgecap.errors import BackendError
from edgecap.objects import Guidance
from edgecap.search import (NEG_INF, CaptionOptions, Hypothesis, _hypothesis, _keep_live,
                            _ranked, _repeats, checked_step)
from edgecap.vocab import NEVER_FIRST_IDS

SURFACE = 100.0  # the word_bias that puts a state-0 row's tag words first in its top K


def constrained_beam_search(backend: Backend, encoded: Encoded, options: CaptionOptions,
                            start_id: int, end_id: int, guidance: Guidance,
                            return_attention: bool = False) -> list[list[Hypothesis]]:
    """-> for each image, up to ``n_best`` hypotheses, best first; those that say one of
    ``guidance.words[image]`` come before those that do not (an empty set: no constraint).
    ``guidance.bias``: per image, ``SURFACE`` on its tag words (``ObjectClasses.guidance``).
    Raises ``BackendError`` on non-finite log-probabilities."""
    options.validate(backend.top_k)
    n_images, beam = encoded.n_images, options.beam_size
    group = 2 * beam                           # rows per image: beam in state 0, beam in state 1
    rows = n_images * group
    width = min(beam + 1, backend.top_k)       # the plain search's candidates per row
    image_index = np.repeat(np.arange(n_images, dtype=np.int32), group)
    session = backend.start(encoded, image_index, return_attention=return_attention)

    tokens = np.full(rows, start_id, dtype=np.int32)
    source_rows = image_index.copy()
    sum_lp = np.full(rows, NEG_INF)
    sum_lp[::group] = 0.0                      # one live state-0 beam per image at the start
    seqs: list[list[int]] = [[] for _ in range(rows)]
    alphas = None
    met: list[list[Hypothesis]] = [[] for _ in range(n_images)]    # said a tag word
    unmet: list[list[Hypothesis]] = [[] for _ in range(n_images)]  # did not
    done = np.zeros(n_images, dtype=bool)
    words = guidance.words
    state0 = np.arange(rows) % group < beam   # the first beam rows of each image
    word_bias = guidance.bias[image_index] * state0[:, None]  # constant: rows keep their state

    for t in range(options.max_length):
        result = session.step(tokens, source_rows, word_bias)
        lp = result.topk_logprobs.astype(np.float64)
        alphas = checked_step(lp, result, t, backend, alphas, return_attention)
        cand_l = (sum_lp[:, None] + lp).tolist()
        ids_l = result.topk_ids.tolist()
        live_l = (sum_lp != NEG_INF).tolist()
        new_source = np.empty(rows, dtype=np.int64)
        new_tokens = np.full(rows, end_id, dtype=np.int32)
        new_lp = np.full(rows, NEG_INF)
        seen_ngrams: dict[int, set] = {}
        for img in range(n_images):
            base = img * group
            if done[img]:
                new_source[base:base + group] = base
                continue
            tags = words[img]
            into: tuple[list, list] = ([], [])  # candidates (score, source row, word) per state
            live = False
            for state in (0, 1):
                for src in range(base + state * beam, base + state * beam + beam):
                    if not live_l[src]:
                        continue
                    plain = 0
                    for k, word in enumerate(ids_l[src]):
                        if t == 0 and word in NEVER_FIRST_IDS:
                            plain += 1  # as the plain search: a banned word still takes a place
                            continue
                        if state == 0 and word in tags:
                            into[1].append((cand_l[src][k], src, word))
                        elif plain < width:
                            plain += 1
                            into[state].append((cand_l[src][k], src, word))
                        else:  # tag words come first (SURFACE): nothing after is used
                            break
            for state in (0, 1):
                hyps = met[img] if state else unmet[img]
                filled = 0
                if state == 0 and len(hyps) >= beam:
                    into[0].clear()  # enough plain captions to fall back on
                for score, src, word in sorted(into[state], key=lambda c: -c[0]):
                    if filled == beam:
                        break
                    if word != end_id and _repeats(seqs[src], word, options.no_repeat_ngram,
                                                   seen_ngrams, src):
                        continue
                    if word == end_id:
                        if len(hyps) < beam:
                            hyps.append(_hypothesis(seqs[src], score, score, True, alphas, src,
                                                    options.length_penalty))
                        continue
                    row = base + state * beam + filled
                    new_source[row], new_tokens[row], new_lp[row] = src, word, score
                    filled += 1
                # Masked rows keep a valid source row so the step's gather stays in range.
                new_source[base + state * beam + filled: base + state * beam + beam] = base
                live = live or filled > 0
            if len(met[img]) >= beam or (not tags and len(unmet[img]) >= beam) or not live:
                if not live and not met[img] and not unmet[img]:
                    _keep(met[img], unmet[img], img, seqs, sum_lp, alphas, beam, options)
                done[img] = True
                new_lp[base:base + group] = NEG_INF
        if done.all():
            break
        seqs = [seqs[src] + [word] for src, word in zip(new_source.tolist(), new_tokens.tolist())]
        if alphas is not None:
            alphas = alphas[new_source]
        tokens, sum_lp = new_tokens, new_lp
        source_rows = new_source.astype(np.int32)
    else:
        for img in range(n_images):
            if not done[img]:
                _keep(met[img], unmet[img], img, seqs, sum_lp, alphas, beam, options)
    return [_best(met[img], unmet[img], options) for img in range(n_images)]


def _keep(met, unmet, img, seqs, sum_lp, alphas, beam, options) -> None:
    """Image ``img``'s live beams become unfinished hypotheses of their state: its rows are two
    blocks of ``beam``, state 0's then state 1's, as the plain search's images are."""
    _keep_live(unmet, 2 * img, seqs, sum_lp, sum_lp, alphas, beam, options)
    _keep_live(met, 2 * img + 1, seqs, sum_lp, sum_lp, alphas, beam, options)


def _best(met: list[Hypothesis], unmet: list[Hypothesis],
          options: CaptionOptions) -> list[Hypothesis]:
    """The hypotheses that say a tag word, best first, then the others (no bonus: ranked by
    the model's own score)."""
    out = (_ranked(met) + _ranked(unmet))[: options.n_best]
    if not out:  # pragma: no cover - with finite scores a live beam survives to max_length
        raise BackendError("beam search produced no hypothesis")
    return out
