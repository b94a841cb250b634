"""Caption text without photos mixed into the decoder's training (``edgecap train --text FILE``).

A text-only batch runs the decoder as a caption language model: a learned "no image" input, one
region of projected features (``NoImage``), stands in for the photo's regions, so the attention
context and the initial LSTM state are computed from it by the decoder's own layers
(``CaptionDecoder.state_from``); the loss is the photo batches' cross-entropy (no attention
regularisation: there is nothing to attend over). After every ``1 - share`` photo batches come
``share`` text batches on average (``text_steps``), so the decoder learns the text's language
without forgetting the photos. The "no image" input is training-only: checkpoints, exported graphs
and the model's size do not change (a run keeps it in ``OUT/last/no_image.safetensors`` to resume).

The text is one caption a line (UTF-8), encoded with the run's vocabulary (never grown by it):
words outside it become <unk>, and a caption with more than ``MAX_UNKNOWN`` of them is dropped.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgecap.errors import DataError
from edgecap.files import FileProblem, read_regular
from edgecap.training.records import shown
from edgecap.vocab import Vocabulary

MAX_UNKNOWN = 1  # unknown words a text caption may hold (more: dropped)
MAX_TEXT_BYTES = 1 << 30


def clipped(ids: list[int], max_words: int, end: int) -> list[int]:
    """Caption ids (with <start> and <end>) cut to ``max_words`` words, still ending in <end>."""
    return ids[: max_words + 1] + [end] if len(ids) > max_words + 2 else ids


class NoImage(nn.Module):
    """The learned "no image" input: one region of projected features (1, 1, F), zero at first."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.features = nn.Parameter(torch.zeros(1, 1, feature_dim))

    def state(self, decoder, rows: int, class_probs: torch.Tensor | None = None):
        """The decoder's per-image state (features, att_proj, h0, c0) of ``rows`` text rows;
        ``class_probs`` (rows, classes): their tags, for a decoder with tag input."""
        return decoder.state_from(decoder.with_tags(self.features.expand(rows, -1, -1), class_probs))


def read_text(path: str | Path, vocab: Vocabulary, max_words: int) -> tuple[list[list[int]], int]:
    """The captions of ``path`` as ids, and how many were dropped (more than ``MAX_UNKNOWN``
    unknown words); ``DataError`` naming the file when it cannot be read or keeps no caption."""
    try:
        raw = read_regular(path, MAX_TEXT_BYTES, "caption text")
    except FileProblem as exc:
        raise DataError(f"{shown(Path(path))}: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # where, as captions.csv's problems are said
        at = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{shown(Path(path))}:{at}: not UTF-8 text ({exc.reason}, byte {exc.start})"
        ) from None
    kept, dropped = [], 0
    for line in text.splitlines():
        ids = vocab.encode(line)
        if len(ids) <= 2:
            continue
        if ids.count(vocab.unk) > MAX_UNKNOWN:
            dropped += 1
            continue
        kept.append(clipped(ids, max_words, vocab.end))
    if not kept:
        raise DataError(
            f"{shown(Path(path))}: no caption with at most {MAX_UNKNOWN} word(s) outside the "
            f"vocabulary ({dropped} dropped)"
        )
    return kept, dropped


def text_steps(step: int, share: float) -> int:
    """Text batches to run after photo batch ``step`` (1, 2, ...): spread evenly, so that text
    batches are ``share`` of all batches."""
    ratio = share / (1.0 - share)
    return math.floor(step * ratio + 1e-9) - math.floor((step - 1) * ratio + 1e-9)


def text_batches(captions: list[list[int]], batch_size: int, pad: int, rng: random.Random):
    """Endless (rows, T) id tensors of ``batch_size`` captions, reshuffled on every pass."""
    order = list(range(len(captions)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [captions[i] for i in order[start : start + batch_size]]
            caps = np.full((len(chunk), max(len(c) for c in chunk)), pad, dtype=np.int64)
            for k, ids in enumerate(chunk):
                caps[k, : len(ids)] = ids
            yield torch.from_numpy(caps)


def text_loss(
    decoder,
    no_image: NoImage,
    caps: torch.Tensor,
    label_smoothing: float,
    class_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy per word of a text-only batch, the decoder fed the "no image" input
    (and ``class_probs``, the captions' tags, for a decoder with tag input)."""
    logits, targets, _ = decoder.teacher_forced(no_image.state(decoder, len(caps), class_probs), caps)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class TextTags:
    """Tags for the text-only batches of a decoder with tag input, taken from each caption's own
    words: one word of the caption that names a class (``ObjectClasses.word_ids``) is picked at
    random, and one of its classes gets a share ``m`` of the probability, drawn uniformly from
    ``MASS``, the rest being ``background`` (the train photos' mean class probabilities, a flat
    and realistic prior) scaled by ``1 - m``; a caption that names no class gets the background
    alone. The decoder so learns to say the class's word where the tag is strong, in the text's
    sentences."""

    MASS = (0.3, 0.95)

    def __init__(self, word_ids: tuple[tuple[int, ...], ...], background: torch.Tensor, seed: str):
        self.background = background.float()
        self.word_classes: dict[int, list[int]] = {}
        for cls, ids in enumerate(word_ids):
            for w in ids:
                self.word_classes.setdefault(w, []).append(cls)
        self.rng = random.Random(seed)

    def __call__(self, caps: torch.Tensor) -> torch.Tensor:
        """caps (R, T) ids -> class probabilities (R, classes)."""
        probs = self.background.expand(len(caps), -1).clone()
        for row, ids in enumerate(caps.tolist()):
            named = [w for w in ids if w in self.word_classes]
            if named:
                cls = self.rng.choice(self.word_classes[self.rng.choice(named)])
                mass = self.rng.uniform(*self.MASS)
                probs[row] *= 1.0 - mass
                probs[row, cls] += mass
        return probs
