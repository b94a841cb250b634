"""The encoder / decoder-step interface every backend implements, and the one the search uses.

The graphs a backend runs and their tensors are ``edgecap.contract``'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecap.errors import BackendError


@dataclass
class Encoded:
    """A batch of encoded images. ``tensors`` is backend-owned (numpy arrays, torch tensors or
    device buffers); the search reads ``n_images``, the caller ``class_probs``."""

    n_images: int
    tensors: Any
    class_probs: np.ndarray | None = None  # float32 (N, C) on the host: the image classes


@dataclass
class StepResult:
    topk_logprobs: np.ndarray  # float32 (R, K), sorted best first
    topk_ids: np.ndarray  # int32 (R, K)
    alpha: np.ndarray | None  # float32 (R, L) attention weights, when asked for


class DecoderSession(ABC):
    """The decoding state of one batch: created by ``Backend.start``, advanced by ``step``.

    ``step`` is the one place the ``word_bias`` contract is checked and "no bias" decided;
    each backend implements ``_step``, which gets either None or a checked array."""

    def step(
        self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None = None
    ) -> StepResult:
        """Feed ``tokens`` (R,) int32 to the rows whose previous state is ``source_rows`` (R,).
        ``word_bias`` float32 (R, V): added to the log-probabilities when choosing the top K;
        None: no bias (zeros). The returned log-probabilities never include it."""
        return self._step(tokens, source_rows, checked_word_bias(word_bias, len(tokens)))

    @abstractmethod
    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        """``step`` with ``word_bias`` None or float32 C-contiguous (R, V), finite."""


def checked_word_bias(word_bias, rows: int) -> np.ndarray | None:
    """The ``word_bias`` contract of every backend: None (no bias), or an (R, V) array of finite
    numbers, returned as float32 C-contiguous; anything else is a ``BackendError``."""
    if word_bias is None:
        return None
    bias = np.ascontiguousarray(word_bias, dtype=np.float32)
    if bias.ndim != 2 or bias.shape[0] != rows:
        raise BackendError(f"word_bias must have shape ({rows}, vocabulary size), got {bias.shape}")
    if not np.isfinite(bias).all():
        raise BackendError("word_bias holds a non-finite value (inf or NaN)")
    return bias


class Backend(ABC):
    """Runs the two graphs. Implementations: onnxruntime, torch, tensorrt.

    A backend is safe to share between threads when its ``encode`` and ``start`` are: the
    per-batch decoding state lives in the ``DecoderSession``, never in the backend. One that
    keeps a batch in shared buffers (TensorRT) says ``thread_safe = False``.
    """

    name: str = "?"
    thread_safe: bool = True  # False: Captioner runs one batch at a time (shared device buffers)
    top_k: int = 10  # K: the step graph returns this many best words per row

    # True: ``encode_frames`` takes decoded frames and preprocesses them itself (the torch
    # backend's ``preprocess="device"``); the Captioner then hands it frames, not model inputs
    prepares_frames: bool = False

    @abstractmethod
    def encode(self, images: np.ndarray) -> Encoded:
        """images float32 (N, 3, H, W), preprocessed as the manifest says."""

    def batch_input(self, images: list[np.ndarray]) -> Any:
        """A batch's model inputs (float32 (3, H, W) each) -> what ``encode`` takes of them:
        here one array (``np.stack``); the torch backend on CUDA stacks them into a kept
        page-locked buffer and starts their copy to the GPU (``edgecap.backends.staging``)."""
        return np.stack(images)

    def encode_frames(
        self, frames: list[np.ndarray], run_size: int | None = None, brighten: bool = False
    ) -> tuple[Encoded, np.ndarray, np.ndarray]:
        """RGB uint8 frames (H, W, 3), any sizes -> (``encode`` of their model inputs, whether
        each holds anything to caption: ``edgecap.preprocess.recognisable``, (N,) bool, and how
        blurred each looks: ``edgecap.preprocess.blurriness``, (N,) float), for a backend that
        ``prepares_frames``. ``run_size`` (``run_size``'s, at least N): the model
        inputs padded to that many with copies of the last, encoded with the frames.
        ``brighten``: dark frames brightened first (``edgecap.preprocess.exposure_gain``)."""
        raise NotImplementedError(
            f"the {self.name} backend preprocesses on the host (prepares_frames is False)"
        )

    @abstractmethod
    def start(
        self, encoded: Encoded, image_index: np.ndarray, return_attention: bool = False
    ) -> DecoderSession:
        """A decoding session for rows mapped to images by ``image_index`` (R,) int32."""

    def describe(self) -> str:
        """One line naming the backend and where it runs (e.g. its execution provider)."""
        return self.name

    def keeps_sizes(self) -> bool:
        """Whether it captures or compiles per batch size (and so runs a batch padded to one of
        a few sizes: ``run_size``). Here not."""
        return False

    def warms_search(self, n_images: int, options) -> bool:
        """Whether a batch of ``n_images`` (its run size) searches through graphs captured per
        plan, which ``warm_search`` can capture before they are met (``Captioner.warm_up``).
        Here never."""
        return False

    def warm_search(
        self, encoded: Encoded, options, start_id: int, end_id: int, fusion, tag_word: int | None
    ) -> int:
        """Capture now the graphs of every plan the search of a batch like ``encoded`` could meet
        (where ``warms_search``): -> how many this call captured. Here none."""
        return 0

    def dropped_graphs(self) -> int:
        """How many graphs captured per plan were dropped (kept: the most recently used few).
        Here none."""
        return 0

    def step_shapes_kept(self) -> int | None:
        """How many shapes of the host search's step graphs it keeps (one a batch size searched
        on the host, one a batch size whose previous captions are scored); None: it captures
        none."""
        return None

    def run_size(self, n_images: int, largest: int) -> int:
        """The batch size a batch of ``n_images`` runs at (``largest``: the most images a batch
        of the caller's has held, at least ``n_images``): ``n_images``, but for a backend that
        captures graphs or compiles per shape (the torch backend's), which pads it up to one of a
        few sizes."""
        return n_images
