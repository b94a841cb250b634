"""A fake backend whose next-word distribution depends on the whole prefix of a row.

The state ``h`` is a hash of the row's prefix, so a beam search that reorders rows wrongly (wrong
``source_rows``, float indices, a shrinking beam) produces different captions than the reference.
Used to test the search apart from any model; not a model.
"""

from __future__ import annotations

import numpy as np

from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult

START, END = 1, 2
P = 1_000_003


class PrefixHashBackend(Backend):
    name = "fake-prefix-hash"

    def __init__(self, vocab_size: int = 8, top_k: int = 5, end_bias: float = 0.0, seed: int = 0):
        self.vocab_size, self.top_k, self.end_bias, self.seed = vocab_size, top_k, end_bias, seed
        self.n_regions = 4
        self.steps = 0
        self.biases: list = []  # the word_bias of every step (None: none)

    def encode(self, images: np.ndarray) -> Encoded:
        # Each "image" is a seed: its first pixel value.
        return Encoded(len(images), np.asarray(images, dtype=np.int64).reshape(len(images), -1)[:, 0])

    def start(self, encoded, image_index, return_attention=False):
        return _Session(self, encoded.tensors, image_index, return_attention)

    def logprobs(self, state: int) -> np.ndarray:
        """The full next-word log-distribution after a prefix hashed to ``state``."""
        rng = np.random.default_rng([self.seed, state])
        logits = rng.normal(size=self.vocab_size) * 2.0
        logits[0] = logits[START] = -1e9  # <pad> and <start> are never generated
        logits[END] += self.end_bias
        return logits - np.logaddexp.reduce(logits)

    @staticmethod
    def next_state(state: int, token: int) -> int:
        return (state * 31 + token + 7) % P


class _Session(DecoderSession):
    def __init__(self, backend, seeds, image_index, return_attention):
        self.backend = backend
        self.h = seeds.copy()  # first step: one state per image (S = N)
        self.image_index = image_index
        self.return_attention = return_attention

    def _step(self, tokens, source_rows, word_bias=None):
        assert source_rows.dtype == np.int32 and tokens.dtype == np.int32
        self.backend.steps += 1
        self.backend.biases.append(None if word_bias is None else np.array(word_bias))
        h = np.array(
            [PrefixHashBackend.next_state(int(s), int(t)) for s, t in zip(self.h[source_rows], tokens)]
        )
        lp = np.stack([self.backend.logprobs(int(s)) for s in h])
        # the contract: the top K by log-probability + bias, their log-probabilities unbiased
        ranked = lp if word_bias is None else lp + word_bias
        ids = np.argsort(-ranked, axis=1, kind="stable")[:, : self.backend.top_k]
        self.h = h
        alpha = None
        if self.return_attention:
            alpha = np.full((len(h), self.backend.n_regions), 1.0 / self.backend.n_regions, np.float32)
            alpha[:, 0] += (h % 7) / 100.0  # row-specific, so reordering errors show
        return StepResult(np.take_along_axis(lp, ids, 1).astype(np.float32), ids.astype(np.int32), alpha)
