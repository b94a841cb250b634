"""The encoder / decoder-step interface every backend implements, and the one the search uses.

The contract of the exported graphs (a model directory's ``encoder.onnx`` and
``decoder_step.onnx``; names are the ONNX tensor names):

encoder: ``image`` float32 (N, 3, H, W)
    -> ``features`` (N, L, F), ``att_proj`` (N, L, A), ``h0`` (N, H), ``c0`` (N, H), all float32
decoder step: ``tokens`` int32 (R,), ``h`` (S, H), ``c`` (S, H), ``source_rows`` int32 (R,),
    ``features`` (N, L, F), ``att_proj`` (N, L, A), ``image_index`` int32 (R,)
    -> ``topk_logprobs`` float32 (R, K), ``topk_ids`` int32 (R, K), ``h_out`` (R, H),
       ``c_out`` (R, H), ``alpha`` float32 (R, L)

Rows R are (image x beam) flattened, image-major. The step first gathers the previous state
by ``source_rows`` (beam reordering happens inside the graph, so a GPU backend keeps the state
on the device), and each row's image tensors by ``image_index`` (the image features are passed
once per batch, never copied per beam). On the first step ``h``/``c`` are the encoder's
per-image ``h0``/``c0`` (S = N) and ``source_rows`` equals ``image_index``; afterwards S = R.
Indices are int32 because TensorRT does not take int64 I/O on older versions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("features", "att_proj", "h0", "c0")
STEP_INPUTS = ("tokens", "h", "c", "source_rows", "features", "att_proj", "image_index")
STEP_OUTPUTS = ("topk_logprobs", "topk_ids", "h_out", "c_out", "alpha")


@dataclass
class Encoded:
    """A batch of encoded images. ``tensors`` is backend-owned (numpy arrays, torch tensors or
    device buffers); the search only reads ``n_images``."""

    n_images: int
    tensors: Any


@dataclass
class StepResult:
    topk_logprobs: np.ndarray  # float32 (R, K), sorted best first
    topk_ids: np.ndarray       # int32 (R, K)
    alpha: np.ndarray | None   # float32 (R, L) attention weights, when asked for


class DecoderSession(ABC):
    """The decoding state of one batch: created by ``Backend.start``, advanced by ``step``."""

    @abstractmethod
    def step(self, tokens: np.ndarray, source_rows: np.ndarray) -> StepResult:
        """Feed ``tokens`` (R,) int32 to the rows whose previous state is ``source_rows`` (R,)."""


class Backend(ABC):
    """Runs the two graphs. Implementations: onnxruntime, torch, tensorrt.

    A backend is safe to share between threads when its ``encode`` and ``start`` are: the
    per-batch decoding state lives in the ``DecoderSession``, never in the backend. One that
    keeps a batch in shared buffers (TensorRT) says ``thread_safe = False``.
    """

    name: str = "?"
    thread_safe: bool = True  # False: Captioner runs one batch at a time (shared device buffers)
    top_k: int = 10           # K: the step graph returns this many best words per row
    n_regions: int = 49       # L

    @abstractmethod
    def encode(self, images: np.ndarray) -> Encoded:
        """images float32 (N, 3, H, W), preprocessed as the manifest says."""

    @abstractmethod
    def start(self, encoded: Encoded, image_index: np.ndarray,
              return_attention: bool = False) -> DecoderSession:
        """A decoding session for rows mapped to images by ``image_index`` (R,) int32."""

    def describe(self) -> str:
        """One line naming the backend and where it runs (e.g. its execution provider)."""
        return self.name
