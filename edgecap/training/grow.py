"""Growing a trained model's vocabulary for fine-tuning on new captions.

The new words (seen at least ``min_count`` times in the new training captions, not yet in the
vocabulary) are appended after the old ones, most frequent first: every old word keeps its id,
its embedding row and its output row, so the grown decoder gives every old word the same logit
as before and its log-probabilities differ only by the softmax's normalisation over the longer
vocabulary. A new word's embedding and output rows start at the mean of the old words' rows plus
a little noise (``NOISE`` of their per-dimension spread), and its output bias at a low quantile of
the old words' biases (``NEW_BIAS_QUANTILE``): a new word starts as a rare word that is never
among the step's top words, so the grown model's captions are the old model's until training
moves the new rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

import torch

from edgecap.models.decoder import CaptionDecoder
from edgecap.vocab import SPECIALS, Vocabulary, tokenize

NOISE = 0.1
NEW_BIAS_QUANTILE = 0.05


def new_words(vocab: Vocabulary, captions: Iterable[str], min_count: int) -> list[str]:
    """The words of ``captions`` seen at least ``min_count`` times that ``vocab`` lacks, most
    frequent first (ties alphabetical, as ``Vocabulary.build`` orders them)."""
    counts = Counter(w for c in captions for w in tokenize(c) if w not in vocab.index)
    return sorted((w for w, n in counts.items() if n >= max(1, min_count)), key=lambda w: (-counts[w], w))


def grow_vocabulary(vocab: Vocabulary, captions: Iterable[str], min_count: int) -> Vocabulary:
    """``vocab`` with the new words of ``captions`` appended (old ids unchanged)."""
    return Vocabulary(vocab.words + new_words(vocab, captions, min_count))


@torch.no_grad()
def grow_decoder(
    decoder: CaptionDecoder, vocab_size: int, generator: torch.Generator | None = None
) -> CaptionDecoder:
    """A copy of ``decoder`` for a vocabulary of ``vocab_size`` words whose first
    ``decoder.cfg.vocab_size`` are the old ones (see the module doc for the new rows)."""
    old = decoder.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"a grown vocabulary cannot be smaller: {vocab_size} < {old}")
    state = decoder.state_dict()
    n_new = vocab_size - old
    words = slice(len(SPECIALS), None)  # the mean of real words, never of <pad> / <start>
    new_rows = {}
    for key in ("embed.weight", "out_vocab.weight"):
        rows = state[key][words]
        noise = torch.randn(n_new, rows.shape[1], generator=generator, dtype=rows.dtype)
        new_rows[key] = rows.mean(0) + NOISE * rows.std(0) * noise
    bias = state["out_vocab.bias"]
    low = torch.quantile(bias[words].float(), NEW_BIAS_QUANTILE).to(bias.dtype)
    new_rows["out_vocab.bias"] = low.expand(n_new)
    return _appended(decoder, new_rows)


def _appended(decoder: CaptionDecoder, new_rows: dict[str, torch.Tensor]) -> CaptionDecoder:
    """A copy of ``decoder`` whose per-word weights (embedding, output rows and bias) get
    ``new_rows`` appended after the old words' rows, which stay as they are."""
    n_new = len(new_rows["out_vocab.bias"])
    grown = CaptionDecoder(replace(decoder.cfg, vocab_size=decoder.cfg.vocab_size + n_new))
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    for key, rows in new_rows.items():
        state[key] = torch.cat([state[key], rows])
    grown.load_state_dict(state)
    return grown.train(decoder.training)


@torch.no_grad()
def transfer_decoder(decoder: CaptionDecoder, sources: list[int], delta: float) -> CaptionDecoder:
    """A copy of ``decoder`` with one new word per entry of ``sources`` appended to its
    vocabulary, each a copy of its source word (direct transfer, Hendricks et al., "Deep
    Compositional Captioning", CVPR 2016): the new word's embedding row is its source's (the
    caption goes on after "zebras" as after "horses"), its output row too, and its output bias
    is the source's plus ``delta``, so that its logit is always the source's plus ``delta``.
    Every old word keeps its id and rows (see the module doc)."""
    old = decoder.cfg.vocab_size
    if any(not 0 <= s < old for s in sources):
        raise ValueError(f"source ids must be words of the vocabulary of {old}")
    state = decoder.state_dict()
    rows = torch.tensor(sources, dtype=torch.long)
    return _appended(
        decoder,
        {
            "embed.weight": state["embed.weight"][rows],
            "out_vocab.weight": state["out_vocab.weight"][rows],
            "out_vocab.bias": state["out_vocab.bias"][rows] + delta,
        },
    )


@torch.no_grad()
def add_tag_input(
    decoder: CaptionDecoder, rank: int, n_classes: int, generator: torch.Generator | None = None
) -> CaptionDecoder:
    """A copy of ``decoder`` that takes the encoder's class probabilities as an input
    (``DecoderConfig.tag_rank``): every old weight kept, the down projection random (uniform in
    +-1 / sqrt(n_classes), as ``nn.Linear`` starts), the up projection zero, so the copy says
    what ``decoder`` says until training moves it."""
    if decoder.cfg.tag_rank:
        raise ValueError(f"the decoder takes tags already (rank {decoder.cfg.tag_rank})")
    tagged = CaptionDecoder(replace(decoder.cfg, tag_rank=rank, n_classes=n_classes))
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    bound = n_classes**-0.5
    state["tag_down.weight"] = torch.rand(rank, n_classes, generator=generator) * (2 * bound) - bound
    state["tag_up.weight"] = torch.zeros(tagged.cfg.feature_dim, rank)
    tagged.load_state_dict(state)
    return tagged.train(decoder.training)
