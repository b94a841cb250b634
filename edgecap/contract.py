"""The model contract: what an exported model directory holds and what every backend runs.

Written once here and read by the manifest, the exporter, the converter, the backends and the
TensorRT engine builder.

Graphs (names are the ONNX tensor names):

encoder: ``image`` float32 (N, 3, H, W)
    -> ``features`` (N, L, F), ``att_proj`` (N, L, A), ``h0`` (N, Hd), ``c0`` (N, Hd),
       ``class_probs`` (N, C), all float32
decoder step: ``tokens`` int32 (R,), ``h`` (S, Hd), ``c`` (S, Hd), ``source_rows`` int32 (R,),
    ``features`` (N, L, F), ``att_proj`` (N, L, A), ``image_index`` int32 (R,),
    ``word_bias`` float32 (R, V)
    -> ``topk_logprobs`` float32 (R, K), ``topk_ids`` int32 (R, K), ``h_out`` (R, Hd),
       ``c_out`` (R, Hd), ``alpha`` float32 (R, L)

Rows R are (image x beam) flattened, image-major. The step first gathers the previous state
by ``source_rows`` (beam reordering happens inside the graph, so a GPU backend keeps the state
on the device), and each row's image tensors by ``image_index`` (the image features are passed
once per batch, never copied per beam). On the first step ``h``/``c`` are the encoder's
per-image ``h0``/``c0`` (S = N) and ``source_rows`` equals ``image_index``; afterwards S = R.
Indices are int32 because TensorRT does not take int64 I/O on older versions.

``class_probs`` are the encoder CNN's own ImageNet class probabilities (its pooled feature map
and classifier, in the same pass): object tags that come free with every caption.
``topk_ids`` are the K best words by log-probability plus ``word_bias`` (zeros: plain
log-probability); ``topk_logprobs`` are their log-probabilities without the bias. The bias
lets a search steer toward words (the object tags' words) that would not be in the plain top K.

Only the first (row) dimension of a tensor is dynamic; ``ModelDimensions.tails`` gives the
rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

ENCODER, DECODER_STEP, VOCAB, CLASSES = "encoder", "decoder_step", "vocab", "classes"
ROLES = (ENCODER, DECODER_STEP)  # the graphs
FILE_ROLES = (*ROLES, VOCAB, CLASSES)  # the files a manifest names (classes: edgecap.objects)
FUSION, CONFIDENCE = "fusion", "confidence"
# the files a model may have beside those, each under its one name: the fused caption language
# models (edgecap.decoding.fusion: fusion.json, and the .npz files it names and checksums) and the
# confidence model (edgecap.confidence). A manifest that names one says the model has it: a copy
# of the folder without it is refused (edgecap.manifest); one that names none loads it if present.
OPTIONAL_FILES = {FUSION: "fusion.json", CONFIDENCE: "confidence.json"}

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("features", "att_proj", "h0", "c0", "class_probs")
STEP_INPUTS = ("tokens", "h", "c", "source_rows", "features", "att_proj", "image_index", "word_bias")
STEP_OUTPUTS = ("topk_logprobs", "topk_ids", "h_out", "c_out", "alpha")
IO = {ENCODER: (ENCODER_INPUTS, ENCODER_OUTPUTS), DECODER_STEP: (STEP_INPUTS, STEP_OUTPUTS)}

INT32_TENSORS = frozenset({"tokens", "source_rows", "image_index", "topk_ids"})


def tensor_dtype(name: str) -> np.dtype:
    """The contract's dtype of a graph tensor (int32 indices, float32 everything else)."""
    return np.dtype(np.int32 if name in INT32_TENSORS else np.float32)


@dataclass(frozen=True)
class ModelDimensions:
    """The sizes of a model's tensors, as its ``manifest.json`` records them (``dims``)."""

    regions: int  # L: attention regions (7 x 7 = 49 for a 224-pixel input)
    feature_dim: int  # F: image features after the projection
    attention_dim: int  # A
    hidden_dim: int  # Hd: LSTM state
    vocab_size: int  # V
    top_k: int  # K: best words per row that the step graph returns
    n_classes: int  # C: the encoder's image classes (ImageNet-1k: 1000)
    encoder_dim: int | None = None  # channels of the CNN's feature map (informative)
    embed_dim: int | None = None  # word embedding (informative)

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelDimensions:
        """Read ``manifest.json``'s ``dims``; raises ``ValueError`` naming the first bad field.
        Unknown keys are ignored (a newer exporter may record more)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"dims must be an object, got {data!r}")
        values = {}
        for f in fields(cls):
            value = data.get(f.name)
            required = f.default is not None
            if value is None and not required:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"dims.{f.name} must be a positive integer, got {value!r}")
            values[f.name] = value
        if values["top_k"] < 2:  # beam 1 keeps min(beam + 1, K) words a step: <end> and one more
            raise ValueError(
                f"dims.top_k must be 2 or more, got {values['top_k']}: with one word a step the "
                "search could not go on past a first word <end> (which never starts a caption)"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def tails(self, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Every graph tensor's shape after its row dimension; ``image_size`` is (H, W)."""
        height, width = image_size
        L, Hd = self.regions, self.hidden_dim
        state = (Hd,)
        return {
            "image": (3, height, width),
            "features": (L, self.feature_dim),
            "att_proj": (L, self.attention_dim),
            "h0": state,
            "c0": state,
            "class_probs": (self.n_classes,),
            "tokens": (),
            "h": state,
            "c": state,
            "source_rows": (),
            "image_index": (),
            "word_bias": (self.vocab_size,),
            "topk_logprobs": (self.top_k,),
            "topk_ids": (self.top_k,),
            "h_out": state,
            "c_out": state,
            "alpha": (L,),
        }

    def shapes(self, image_size: tuple[int, int]) -> dict[str, dict[str, tuple]]:
        """role -> tensor name -> shape, with None for the dynamic row dimension."""
        tails = self.tails(image_size)
        return {
            role: {name: (None, *tails[name]) for name in (*inputs, *outputs)}
            for role, (inputs, outputs) in IO.items()
        }


@dataclass(frozen=True)
class Limits:
    """The largest batch a backend with fixed-size engines or buffers is built for: images per
    batch and beams per image (TensorRT engines' optimisation profiles, onnxruntime's TensorRT
    execution provider)."""

    max_batch: int = 8
    max_beam: int = 5

    def __post_init__(self):
        for name in ("max_batch", "max_beam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def max_rows(self) -> int:
        return self.max_batch * self.max_beam

    def covering_default(self) -> Limits:
        """These limits, raised to at least the default engine's (8 images x 5 beams) so that
        the engines ``edgecap build`` makes by default are reused by smaller requests."""
        default = Limits()
        return Limits(max(self.max_batch, default.max_batch), max(self.max_beam, default.max_beam))

    def row_ranges(self, role: str) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each input's first dimension. Images: N; step rows: R, optimised
        for one image with a full beam; ``h``/``c`` have S rows (N on the first step, R after)."""
        images = (1, 1, self.max_batch)
        if role == ENCODER:
            return {"image": images}
        rows = (1, min(self.max_beam, self.max_rows), self.max_rows)
        return {
            "tokens": rows,
            "source_rows": rows,
            "image_index": rows,
            "h": rows,
            "c": rows,
            "word_bias": rows,
            "features": images,
            "att_proj": images,
        }

    def tag(self, role: str) -> str:
        return f"b{self.max_batch}" if role == ENCODER else f"b{self.max_batch}k{self.max_beam}"
