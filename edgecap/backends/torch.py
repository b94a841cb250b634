"""The PyTorch reference backend (needs ``edgecap[train]`` for torch and ``onnx`` to read the
weights; runs on the CPU or, with ``device="cuda"``, on a GPU, optionally in FP16).

It rebuilds ``EfficientNetLite0`` and ``CaptionDecoder`` from the manifest and loads their weights
from the ONNX files' initializers, which the exporter names by the PyTorch state-dict keys
(``encoder.<key>`` in ``encoder.onnx``; ``decoder.<key>`` split between both graphs). So a model
directory needs no second copy of its weights, and this backend checks the exported graphs
against the PyTorch modules they came from.

The modules are shared read-only between threads (inference only); each ``TorchDecoderSession``
holds its own h/c, so one backend serves several threads.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgecap.backends._checks import load_failure
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.errors import BackendError, ModelError
from edgecap.manifest import Manifest
from edgecap.models.decoder import CaptionDecoder, DecoderConfig
from edgecap.models.efficientnet_lite import EfficientNetLite0

# State-dict keys the encoder graph does not need, so its ONNX file does not hold them.
ENCODER_UNUSED = ("_fc.",)
UNUSED_SUFFIXES = (".num_batches_tracked",)


def read_initializers(manifest: Manifest) -> dict[str, np.ndarray]:
    """All initializers of both graphs, by name (float16 files come back as float16)."""
    weights: dict[str, np.ndarray] = {}
    for role in ("encoder", "decoder_step"):
        path = manifest.path(role)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise load_failure(manifest, role, exc) from exc
        for init in model.graph.initializer:
            weights.setdefault(init.name, numpy_helper.to_array(init))
    return weights


def _load(module: torch.nn.Module, weights: dict[str, np.ndarray], prefix: str,
          unused: tuple[str, ...], manifest: Manifest) -> None:
    """Load ``prefix``-named initializers into ``module``, as strictly as the graphs allow: every
    key the graphs use must be present with its shape, and nothing else may be left over."""
    state = {name[len(prefix):]: torch.from_numpy(np.array(value, dtype=np.float32
                                                           if value.dtype == np.float16 else None))
             for name, value in weights.items() if name.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in state
               and not k.startswith(unused) and not k.endswith(UNUSED_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f"{what} {[prefix + k for k in keys[:5]]}" + (" ..." if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("wrong shape", wrong)) if keys]
    if problems:
        raise ModelError(f"{manifest.directory}: the ONNX initializers do not match the PyTorch "
                         f"{type(module).__name__} ({'; '.join(problems)}); the torch backend "
                         "needs a model exported by this edgecap with `edgecap export`")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    module.load_state_dict(own, strict=True)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: Manifest, device: str | None = "cpu", fp16: bool = False):
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("device='cuda' but this torch has no usable CUDA GPU; use "
                               "device='cpu' or install a CUDA build of torch")
        if fp16 and not device.startswith("cuda"):
            raise ValueError("fp16=True needs device='cuda' (FP16 on the CPU is slow and inexact)")
        self.manifest = manifest
        self.device = torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.top_k = int(manifest.dims["top_k"])
        self.n_regions = int(manifest.dims["regions"])
        self.encoder, self.decoder = self._build(manifest)

    def _build(self, manifest: Manifest) -> tuple[EfficientNetLite0, CaptionDecoder]:
        config = manifest.info.get("decoder_config")
        if not isinstance(config, dict):
            raise ModelError(f"{manifest.directory}: manifest.json has no decoder_config; the "
                             "torch backend needs a model exported by `edgecap export`")
        try:
            decoder = CaptionDecoder(DecoderConfig(**config))
        except TypeError as exc:  # a key this edgecap's DecoderConfig does not know
            raise ModelError(f"{manifest.directory}: manifest.json's decoder_config does not fit "
                             f"this edgecap ({exc}); upgrade edgecap or re-export the model") from exc
        encoder = EfficientNetLite0()
        weights = read_initializers(manifest)
        _load(encoder, weights, "encoder.", ENCODER_UNUSED, manifest)
        _load(decoder, weights, "decoder.", (), manifest)
        return (encoder.to(self.device, self.dtype).eval(),
                decoder.to(self.device, self.dtype).eval())

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        return f"torch {torch.__version__} ({where}, {precision})"

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> Encoded:
        """images float32 (N, 3, H, W) -> Encoded with torch tensors on the device: features
        (N, L, F), att_proj (N, L, A), h0, c0 (N, H)."""
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device, self.dtype)
        fmap = self.encoder.features(x).flatten(2).transpose(1, 2)  # (N, L, 1280)
        features, att_proj, h0, c0 = self.decoder.init_state(fmap)
        return Encoded(n_images=int(images.shape[0]),
                       tensors={"features": features, "att_proj": att_proj, "h0": h0, "c0": c0})

    def start(self, encoded: Encoded, image_index: np.ndarray,
              return_attention: bool = False) -> "TorchDecoderSession":
        return TorchDecoderSession(self, encoded.tensors, image_index, return_attention)


class TorchDecoderSession(DecoderSession):
    """One batch's decoding state: h/c (S, H) on the device between steps."""

    def __init__(self, backend: TorchBackend, tensors: dict, image_index: np.ndarray,
                 return_attention: bool):
        self.decoder = backend.decoder
        self.device = backend.device
        self.return_attention = return_attention
        self.h, self.c = tensors["h0"], tensors["c0"]
        self.features, self.att_proj = tensors["features"], tensors["att_proj"]
        self.image_index = self._rows(image_index)

    def _rows(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.int64)).to(self.device)

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, source_rows: np.ndarray) -> StepResult:
        # The exported step's semantics: gather the previous state by source_rows, then one word.
        h = self.h.index_select(0, self._rows(source_rows))
        c = self.c.index_select(0, self._rows(source_rows))
        values, ids, self.h, self.c, alpha = self.decoder.step(
            self._rows(tokens), h, c, self.features, self.att_proj, self.image_index)
        return StepResult(topk_logprobs=values.float().cpu().numpy(),  # log-softmax ran in fp32
                          topk_ids=ids.to(torch.int32).cpu().numpy(),
                          alpha=alpha.float().cpu().numpy() if self.return_attention else None)
