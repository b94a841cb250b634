"""Beam search in numpy over the encoder / decoder-step interface (``edgecap.backends.base``).

All beams of all images are flat rows (image-major, ``n_images * beam_size``) whose count never
changes: a beam that finishes leaves the live set (its hypothesis is kept) and the next best
candidate takes its row; an image that is done, or a row with no live candidate, is masked with a
score of -inf so the step graph always sees the same shape. Beam indices are integers (``//``).
The length penalty is applied only when ranking finished hypotheses, and every image gets at
least one non-empty hypothesis.

Object guidance (``edgecap.objects``): a bonus is added to the log-probability of an image's tag
words, through the step's ``word_bias`` (so a tag word outside the plain top K can be chosen) and
in the beam's running score, until that beam has said one of them; then the beam goes on
unsteered, which keeps a tag word from being repeated. Hypotheses are ranked by the steered
score; their ``log_prob`` and ``score`` are the model's own, without the bonus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecap.backends.base import Backend, Encoded
from edgecap.errors import BackendError
from edgecap.objects import Guidance
from edgecap.vocab import NEVER_FIRST_IDS

NEG_INF = -np.inf


MAX_BATCH_SIZE = 64  # the shipped model, CPU: a 64-image batch peaks at about 0.8 GB


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are searched for and batched: the defaults of ``Captioner`` and of the
    ``edgecap`` commands, written only here. ``validate`` checks them against a model."""

    beam_size: int = 3
    max_length: int = 20                 # words, not counting <end>
    batch_size: int = 8                  # images per encoder run and per search
    length_penalty: float | None = None  # None: rank by mean log-prob per word; a: GNMT ((5+n)/6)^a
    n_best: int = 1                      # hypotheses kept per image (the best + alternatives)
    no_repeat_ngram: int = 3             # > 0: no caption repeats an n-gram of this size (0: off)
    objects: int = 5                     # object tags per caption (Caption.objects); 0: none
    # Object guidance: the words of the image's ``guidance_tags`` most probable classes of at
    # least ``guidance_min_prob`` get ``guidance_bonus`` added to their log-probability until a
    # beam has said one (0: off). Chosen on Flickr8k dev and coco-ood-dev (see the README).
    guidance_bonus: float = 2.0
    guidance_tags: int = 3
    guidance_min_prob: float = 0.1
    # Constrained beam search instead (``edgecap.constrained``): the caption must say a word of
    # one of the image's ``guidance_tags`` most probable classes of at least
    # ``constraint_min_prob`` (another threshold: a forced word costs more than a bonus).
    constrained: bool = False
    constraint_min_prob: float = 0.3

    @property
    def rows_per_image(self) -> int:
        """Decoder-step rows an image takes: its beams (twice that, constrained: a beam per
        state), what a backend with fixed-size engines is built for."""
        return self.beam_size * (2 if self.constrained else 1)

    def validate(self, top_k: int) -> None:
        """Raise ``ValueError`` naming the first bad option. ``top_k``: the model's step graph K."""
        for name in ("beam_size", "max_length", "batch_size", "n_best", "no_repeat_ngram",
                     "objects", "guidance_tags"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.constrained, bool):
            raise ValueError(f"constrained must be True or False, got {self.constrained!r}")
        for name, low, high in (("guidance_bonus", 0, 10), ("guidance_min_prob", 0, 1),
                                ("constraint_min_prob", 0, 1)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not low <= value <= high):
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if not 0 <= self.objects <= 100:
            raise ValueError(f"objects must be between 0 and 100, got {self.objects}")
        if not 1 <= self.guidance_tags <= 20:
            raise ValueError(f"guidance_tags must be between 1 and 20, got {self.guidance_tags}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got "
                             f"{self.batch_size} (each image of a batch holds its activations "
                             "and beams in memory until the batch is done)")
        penalty = self.length_penalty
        if penalty is not None and (isinstance(penalty, bool)
                                    or not isinstance(penalty, (int, float))):
            raise ValueError(f"length_penalty must be None or a number in [0, 2], got {penalty!r}")
        if not 1 <= self.beam_size <= top_k:
            raise ValueError(f"beam_size must be between 1 and {top_k} (the model's top_k: its "
                             f"step graph returns {top_k} best words per row), got {self.beam_size}")
        if not 1 <= self.max_length <= 200:
            raise ValueError(f"max_length must be between 1 and 200 words, got {self.max_length}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({self.beam_size}), "
                             f"got {self.n_best}")
        if not 0 <= self.no_repeat_ngram <= 10:
            raise ValueError(f"no_repeat_ngram must be between 0 (off) and 10, "
                             f"got {self.no_repeat_ngram}")
        if penalty is not None and not 0 <= penalty <= 2:
            raise ValueError(f"length_penalty must be None or in [0, 2], got {penalty}")


@dataclass
class Hypothesis:
    tokens: list[int]              # word ids, without <start> / <end>
    log_prob: float                # sum of the log-probabilities (with <end> when finished)
    score: float                   # length-normalised log-prob
    finished: bool                 # ended with <end> (False: cut at max_length)
    attention: np.ndarray | None = None  # (n_words, L)
    rank_score: float | None = None  # what ranks it: ``score`` with the guidance bonus (if any)


def length_normalised(log_prob: float, length: int, penalty: float | None) -> float:
    if penalty is None:
        return log_prob / length
    return log_prob / (((5.0 + length) / 6.0) ** penalty)


def beam_search(backend: Backend, encoded: Encoded, options: CaptionOptions, start_id: int,
                end_id: int, return_attention: bool = False,
                guidance: Guidance | None = None) -> list[list[Hypothesis]]:
    """-> for each image, up to ``n_best`` hypotheses, best first (never none, never an empty
    caption); each with its attention (n_words, L) when ``return_attention``. ``guidance``
    steers each image's beams toward its tag words (see the module doc). Raises
    ``BackendError`` when the step returns non-finite log-probabilities."""
    options.validate(backend.top_k)
    n_images, beam = encoded.n_images, options.beam_size
    rows = n_images * beam
    # One candidate more than the beam per row, so a beam keeps ``beam`` live continuations
    # even when one of its best words is <end>.
    width = min(beam + 1, backend.top_k)
    image_index = np.repeat(np.arange(n_images, dtype=np.int32), beam)
    session = backend.start(encoded, image_index, return_attention=return_attention)

    tokens = np.full(rows, start_id, dtype=np.int32)
    source_rows = image_index.copy()          # first step: h0/c0 are per image
    sum_lp = np.full(rows, NEG_INF)           # what the search ranks by (with any bonus)
    sum_lp[::beam] = 0.0                      # one live beam per image at the start
    true_lp = np.zeros(rows)                  # the model's own log-probability
    steered = np.zeros(rows, dtype=bool)      # rows whose tag-word bonus is still on
    if guidance is not None:
        steered[:] = [bool(guidance.words[img]) for img in image_index]
    seqs: list[list[int]] = [[] for _ in range(rows)]  # words so far, per row
    alphas = None
    finished: list[list[Hypothesis]] = [[] for _ in range(n_images)]
    done = np.zeros(n_images, dtype=bool)

    row_bias = None if guidance is None else guidance.bias[image_index]  # (R, V), once
    for t in range(options.max_length):
        word_bias = row_bias * steered[:, None] if steered.any() else None
        result = session.step(tokens, source_rows, word_bias)
        lp = result.topk_logprobs[:, :width].astype(np.float64)
        ids = result.topk_ids[:, :width]
        alphas = checked_step(lp, result, t, backend, alphas, return_attention)
        true_cand = true_lp[:, None] + lp
        if word_bias is not None:
            lp = lp + np.take_along_axis(word_bias, ids.astype(np.int64), axis=1)
        cand = (sum_lp[:, None] + lp).reshape(n_images, beam * width)
        if t == 0:
            # Never an empty caption (the step graph already never outputs NEVER_GENERATED_IDS).
            cand = np.where(np.isin(ids.reshape(n_images, beam * width), NEVER_FIRST_IDS),
                            NEG_INF, cand)
        # Python lists: the candidate loop below reads single values, which is several times
        # cheaper from a list than from a numpy array.
        order = np.argsort(-cand, axis=1, kind="stable").tolist()
        cand_l, ids_l, true_l = cand.tolist(), ids.tolist(), true_cand.tolist()
        steered_l = steered.tolist()
        new_source = np.empty(rows, dtype=np.int64)
        new_tokens = np.full(rows, end_id, dtype=np.int32)
        new_lp = np.full(rows, NEG_INF)
        new_true = np.zeros(rows)
        new_steered = np.zeros(rows, dtype=bool)
        seen_ngrams: dict[int, set] = {}
        for img in range(n_images):
            base = img * beam
            filled = 0
            if not done[img]:
                for flat in order[img]:
                    score = cand_l[img][flat]
                    if score == NEG_INF or filled == beam:
                        break
                    src = base + flat // width
                    word = ids_l[src][flat % width]
                    if word != end_id and _repeats(seqs[src], word, options.no_repeat_ngram,
                                                   seen_ngrams, src):
                        continue
                    model_lp = true_l[src][flat % width]
                    if word == end_id:
                        if len(finished[img]) < beam:
                            finished[img].append(_hypothesis(seqs[src], score, model_lp, True,
                                                             alphas, src, options.length_penalty))
                        continue
                    row = base + filled
                    new_source[row], new_tokens[row] = src, word
                    new_lp[row], new_true[row] = score, model_lp
                    new_steered[row] = steered_l[src] and word not in guidance.words[img]
                    filled += 1
                if filled == 0 and not finished[img]:
                    # Every continuation was blocked (repeats) and none could end: keep what the
                    # live beams have so far rather than return nothing.
                    _keep_live(finished[img], img, seqs, sum_lp, true_lp, alphas, beam, options)
                if len(finished[img]) >= beam or filled == 0:
                    done[img] = True
                    new_lp[base:base + beam] = NEG_INF
                    new_steered[base:base + beam] = False
            # Masked rows keep a valid source row so the step's gather stays in range.
            new_source[base + filled: base + beam] = base
        if done.all():
            break
        seqs = [seqs[src] + [word] for src, word in zip(new_source.tolist(), new_tokens.tolist())]
        if alphas is not None:
            alphas = alphas[new_source]
        tokens, sum_lp, true_lp, steered = new_tokens, new_lp, new_true, new_steered
        source_rows = new_source.astype(np.int32)

    else:
        # Out of words: the live beams of unfinished images become (unfinished) hypotheses.
        for img in range(n_images):
            if not done[img]:
                _keep_live(finished[img], img, seqs, sum_lp, true_lp, alphas, beam, options)
    return [_rank(finished[img], options) for img in range(n_images)]


def checked_step(lp: np.ndarray, result, t: int, backend: Backend, alphas: np.ndarray | None,
                 return_attention: bool) -> np.ndarray | None:
    """Raise ``BackendError`` when step ``t``'s log-probabilities ``lp`` are not finite; -> the
    attention so far (rows, words, L) with this step's appended (None without attention)."""
    if not np.isfinite(lp).all():
        # NaN or overflow in the step (e.g. an FP16 engine out of range): fail loudly rather
        # than return a caption built on garbage.
        raise BackendError(f"the decoder step returned non-finite log-probabilities at word "
                           f"{t + 1} ({backend.describe()})")
    if not return_attention:
        return alphas
    step_alpha = result.alpha[:, None, :]
    return step_alpha if alphas is None else np.concatenate([alphas, step_alpha], 1)


def _repeats(seq: list[int], word: int, n: int, cache: dict[int, set], row: int) -> bool:
    """Would ``word`` after ``seq`` complete an n-gram that ``seq`` already holds? ``cache``
    keeps each row's n-grams for the current step."""
    if n <= 0 or len(seq) < n:
        return False
    grams = cache.get(row)
    if grams is None:
        grams = cache[row] = set(zip(*(seq[i:] for i in range(n))))
    return (*seq[len(seq) - n + 1:], word) in grams


def _hypothesis(seq, rank_lp, log_prob, finished, alphas, row, penalty) -> Hypothesis:
    words = [int(w) for w in seq]
    length = max(len(words) + (1 if finished else 0), 1)
    attention = None if alphas is None else np.array(alphas[row, : len(words)])
    return Hypothesis(words, float(log_prob), length_normalised(float(log_prob), length, penalty),
                      finished, attention,
                      rank_score=length_normalised(float(rank_lp), length, penalty))


def _keep_live(hyps, img, seqs, sum_lp, true_lp, alphas, beam, options) -> None:
    """Image ``img``'s live beams become unfinished hypotheses, up to ``beam`` in all."""
    for row in range(img * beam, img * beam + beam):
        if sum_lp[row] != NEG_INF and len(hyps) < beam:
            hyps.append(_hypothesis(seqs[row], sum_lp[row], true_lp[row], False, alphas, row,
                                    options.length_penalty))


def _ranked(hyps: list[Hypothesis]) -> list[Hypothesis]:
    return sorted(hyps, key=lambda h: (-h.rank_score, -h.log_prob))


def _rank(hyps: list[Hypothesis], options: CaptionOptions) -> list[Hypothesis]:
    if not hyps:  # pragma: no cover - with finite scores a live beam survives to max_length
        raise BackendError("beam search produced no hypothesis")
    return _ranked(hyps)[: options.n_best]
