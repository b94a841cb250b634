"""The PyTorch reference backend (needs ``edgecap[train]`` for torch and ``onnx`` to read the
weights; runs on the CPU or, with ``device="cuda"``, on a GPU, optionally in FP16).

On CUDA, ``cuda_graphs=True`` captures the encoder per batch size and the decoder step per rows
shape in CUDA graphs over static buffers, with one device-to-host copy and one synchronisation
per step (``edgecap.backends.torch_graphs``). ``fp16=True`` runs the decoder's weights and
activations in FP16 behind the FP32 encoder (``fp32_encoder``), and ``fp16=True,
fp32_encoder=False`` the encoder too; FP16 keeps the FP32 islands of ``edgecap convert
--precision fp16``: the attention-score projection and softmax, the image classifier and its
softmax, the word-logit projection, the log-softmax, the word bias and the top K. Both have run
on an NVIDIA H200 (the ``gpu`` tests and ``benchmarks/gpu_check.py``:
``benchmarks/results/gpu.md``; the word-logit island and the FP32 encoder by default since, on
the CPU only); the graph bookkeeping is also tested on the CPU with a stand-in graph.

It rebuilds ``EfficientNetLite`` and ``CaptionDecoder`` from the manifest and loads their weights
from the ONNX files' initializers, which the exporter names by the PyTorch state-dict keys
(``encoder.<key>`` in ``encoder.onnx``; ``decoder.<key>`` split between both graphs). So a model
directory needs no second copy of its weights, and this backend checks the exported graphs
against the PyTorch modules they came from.

The modules are shared read-only between threads (inference only); each ``TorchDecoderSession``
holds its own h/c, so one backend serves several threads.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgecap.backends._checks import check_declared_io, check_threads, load_failure
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.backends.staging import Staging
from edgecap.backends.torch_preprocess import FramePreprocess
from edgecap.backends.torch_search import AUTO_DEVICE_ROWS, TorchDeviceSearch, checked_search, use_device
from edgecap.backends.torch_graphs import (
    CudaGraphs,
    EncoderGraphs,
    GraphedSession,
    GraphFactory,
    StepGraphs,
    graph_batch_size,
    ieee_fp32,
    keep_fp32,
    keep_fp32_span,
)
from edgecap.contract import ENCODER_OUTPUTS, ROLES, Limits
from edgecap.decoding.device import compile_available, fused_available
from edgecap.errors import BackendError, ModelError
from edgecap.manifest import Manifest
from edgecap.models.config import DEFAULT_ENCODER, ENCODER_FP32_BLOCKS
from edgecap.models.decoder import CaptionDecoder, DecoderConfig
from edgecap.models.efficientnet_lite import (
    EfficientNetLite,
    fold_batch_norms as fold_efficientnet_batch_norms,
)
from edgecap.models.graphs import EncoderGraph, StepGraph
from edgecap.training.config import check_decoder

UNUSED_SUFFIXES = (".num_batches_tracked",)
PREPROCESS = ("host", "device")


def read_initializers(manifest: Manifest) -> dict[str, np.ndarray]:
    """All initializers of both graphs, by name (float16 files come back as float16). Each
    graph's declared inputs and outputs are checked against the manifest, as onnxruntime's
    backend does: the modules run at the manifest's preprocessing size whatever the graphs say."""
    weights: dict[str, np.ndarray] = {}
    for role in ROLES:
        path = manifest.path(role)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise load_failure(manifest, role, exc) from exc
        check_declared_io(manifest, role, model.graph, runs_graph=False)  # its modules take any rows
        for init in model.graph.initializer:
            weights.setdefault(init.name, numpy_helper.to_array(init))
    return weights


def _load(
    module: torch.nn.Module,
    weights: dict[str, np.ndarray],
    prefix: str,
    unused: tuple[str, ...],
    manifest: Manifest,
) -> None:
    """Load ``prefix``-named initializers into ``module``, as strictly as the graphs allow: every
    key the graphs use must be present with its shape, and nothing else may be left over."""
    state = {
        name[len(prefix) :]: torch.from_numpy(
            np.array(value, dtype=np.float32 if value.dtype == np.float16 else None)
        )
        for name, value in weights.items()
        if name.startswith(prefix)
    }
    own = module.state_dict()
    missing = [
        k for k in own if k not in state and not k.startswith(unused) and not k.endswith(UNUSED_SUFFIXES)
    ]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = [
        f"{what} {[prefix + k for k in keys[:5]]}" + (" ..." if len(keys) > 5 else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise ModelError(
            f"{manifest.directory}: the ONNX initializers do not match the PyTorch "
            f"{type(module).__name__} ({'; '.join(problems)}); the torch backend "
            "needs a model exported by this edgecap with `edgecap export`"
        )
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    module.load_state_dict(own, strict=True)


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the GPU it means now (``cuda:N``, N the current device of the thread that
    makes the backend): a graph captured later, in another thread, stays on that GPU."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _checked_device(
    device: str | None, fp16: bool, cuda_graphs: bool = False, graph_factory: GraphFactory | None = None
) -> str:
    device = "cpu" if device is None else device
    # torch's own words for another device are no help here ("Torch not compiled with XPU
    # enabled", "Expected one of cpu, cuda, ipu, xpu, ..."; a "meta" model fails only once run)
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' for the torch backend, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(
            "device='cuda' but this torch has no usable CUDA GPU; use "
            "device='cpu' or install a CUDA build of torch"
        )
    if fp16 and not device.startswith("cuda"):
        raise ValueError("fp16=True needs device='cuda' (FP16 on the CPU is slow and inexact)")
    if cuda_graphs and graph_factory is None and not device.startswith("cuda"):
        raise ValueError("cuda_graphs=True needs device='cuda'")
    return device


class TorchBackend(Backend):
    """Args: ``device`` ("cpu", "cuda" or "cuda:N"; None: the CPU), ``fp16`` (on CUDA only),
    ``cuda_graphs`` (on CUDA only; see the module doc), ``threads`` (torch's intra-op threads,
    set with ``torch.set_num_threads``: that setting is process-wide, so it also changes every
    other torch computation in this process; None leaves torch's setting as it is). ``limits`` is
    accepted for the common backend signature and unused: graphs are captured for the shapes
    met. ``graph_factory`` replaces ``CudaGraphs(device)`` with another ``capture(fn) -> graph`` (the
    tests' ``EagerGraph``, on any device) and implies ``cuda_graphs``. ``search``: where the
    beam search runs, "device" (torch tensors on the backend's device, no host round trip per
    word), "host" (the numpy loop) or "auto" (on CUDA the device search for batches of at least
    12 beam rows, the numpy loop for smaller ones and on the CPU: what measured faster); see
    ``edgecap.backends.torch_search`` and docs/gpu-search.md. ``fp32_encoder`` (with ``fp16``):
    the whole encoder in FP32 and only the decoder in FP16, the FP16 that keeps the captions
    (98.6-99.4% of FP32's on the CPU emulation against 92% with the encoder in FP16 too,
    docs/gpu-search.md); None (the default): True with ``fp16``, so ``fp16=True`` alone is
    that FP16, as ``--precision fp16`` is; ``fp16=True, fp32_encoder=False``: the whole model
    in FP16. ``compile_search`` (with ``search="device"``):
    the device search's step through ``torch.compile`` (``edgecap.decoding.device``: the
    search's small operations fused into few kernels); each new shape (batch size, beam)
    compiles first, once per process (25 s cold on a 2-core CPU): for a loop that captions at
    one shape. Experimental: not yet timed on a GPU. ``preprocess="device"``: frames are
    resized, normalised and checked for blankness on the device (``encode_frames``,
    ``edgecap.backends.torch_preprocess``: Pillow's pixels bit for bit, so the same captions),
    the host only decoding and uploading them; for a GPU whose host cannot keep up with it.
    Not yet timed on a GPU. ``channels_last=True``: the encoder's weights and input in
    channels-last (NHWC) memory, for the convolution kernels of that layout (the same
    arithmetic in another order: features within float rounding). Not yet timed on a GPU.
    ``fused_search`` (with ``search="device"``): the device search's bookkeeping after the
    decoder's step (about 100 small operations a step) in one Triton kernel a step
    (``edgecap.decoding.device_kernel``) and the fused language models' element-wise work in
    four (``edgecap.decoding.lm_kernels``), the same hypotheses bit for bit; needs triton and a
    CUDA device. Experimental: not yet run on a GPU. ``compile_search`` and ``fused_search`` (on a
    GPU) write what they compile: each needs a writable temporary folder and cache folder, else
    the backend is refused when made (docs/reliability.md). ``fold_batch_norms`` (the default):
    an FP32 encoder runs with its BatchNorms folded into its convolutions and its stride-1
    convolutions padding their input themselves (``efficientnet_lite.fold_batch_norms``, as
    onnxruntime and TensorRT fold the exported graph): 96 operations instead of 157 (on CUDA
    about 134 kernels instead of 174, cuDNN adding a bias apart; not yet counted on a GPU); the
    features within float rounding of the unfolded encoder's. The whole model in FP16
    (``fp32_encoder=False``) keeps its BatchNorms.

    With graphs the backend holds one set of buffers per shape, so it serves one search at a
    time (``thread_safe`` is False and ``Captioner`` serialises its batches)."""

    name = "torch"
    on_device = False  # the beam search may run on the device (``search``)
    search_mode = "host"  # ``search``: "device", or "auto" (by batch; ``use_device``)
    compile_search = False  # ... through torch.compile
    fused_search = False  # ... its bookkeeping in one Triton kernel a step
    frame_preprocess: FramePreprocess | None = None  # preprocess="device"
    staging: Staging | None = None  # on CUDA: the batches' kept page-locked host buffers
    channels_last = False  # the encoder's convolutions in NHWC (``channels_last``)
    batch_norms_folded = False  # the encoder's BatchNorms in its convolutions (``fold_batch_norms``)
    manifest: Manifest | None  # None: made from modules in memory (from_modules)
    graph_factory: GraphFactory | None
    encoder_graph: EncoderGraph | MixedEncoderGraph | ChannelsLast | None

    def __init__(
        self,
        manifest: Manifest,
        device: str | None = "cpu",
        fp16: bool = False,
        limits: Limits | None = None,
        cuda_graphs: bool = False,
        graph_factory: GraphFactory | None = None,
        threads: int | None = None,
        search: str = "auto",
        fp32_encoder: bool | None = None,
        compile_search: bool = False,
        preprocess: str = "host",
        channels_last: bool = False,
        fused_search: bool = False,
        fold_batch_norms: bool = True,
    ):
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        device = _checked_device(device, fp16, cuda_graphs, graph_factory)
        on_device = checked_search(search, torch.device(device))
        if compile_search and search != "device":
            raise ValueError(
                f"compile_search=True compiles the beam search on the device: it goes with "
                f"search='device', got search={search!r}"
            )
        if fused_search and search != "device":
            raise ValueError(
                f"fused_search=True runs the beam search on the device with its bookkeeping in "
                f"one Triton kernel a step: it goes with search='device', got search={search!r}"
            )
        if fused_search and compile_search:
            raise ValueError("fused_search=True and compile_search=True: one or the other")
        if fused_search:
            fused_available(torch.device(device))
        if compile_search:
            compile_available()  # before loading the model, not on the first caption
        n_threads = check_threads(threads)
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        encoder, decoder = self._build(manifest)
        if fp32_encoder and not fp16:
            raise ValueError(
                "fp32_encoder=True goes with fp16=True (an FP16 decoder behind an "
                "FP32 encoder); without fp16 everything is FP32 already"
            )
        self._setup(
            encoder,
            decoder,
            device,
            fp16,
            fp16 if fp32_encoder is None else fp32_encoder,
            fold_batch_norms=fold_batch_norms,
        )
        self.manifest = manifest
        # on CUDA a batch is stacked into kept page-locked buffers and copied without blocking
        self.staging = Staging(_indexed(self.device)) if self.device.type == "cuda" else None
        if preprocess == "device":
            # the GPU the graphs use (cuda:N), whichever thread calls later
            self.frame_preprocess = FramePreprocess(
                manifest.preprocessing, _indexed(self.device), staging=self.staging
            )
            self.prepares_frames = True
        if channels_last and self.encoder is not None and self.encoder_graph is not None:
            self.encoder.to(memory_format=torch.channels_last)
            self.encoder_graph = ChannelsLast(self.encoder_graph)
            self.channels_last = True
        self.on_device = on_device
        self.search_mode = search
        self.compile_search = compile_search
        self.fused_search = fused_search
        if cuda_graphs or graph_factory is not None:
            self.enable_graphs(graph_factory or CudaGraphs(_indexed(self.device)))
        elif self.on_device:
            self.device_search = TorchDeviceSearch(self, compiled=compile_search, fused=fused_search)

    def enable_graphs(self, capture: GraphFactory) -> None:
        """Run the encoder and the decoder step through graphs made by ``capture``
        (``CudaGraphs(device)``: real CUDA graphs)."""
        self.thread_safe = False
        self.graph_factory = capture
        self.encoder_graphs = (
            None
            if self.encoder_graph is None
            else EncoderGraphs(self.encoder_graph, self.device, self.image_dtype, capture, self.staging)
        )
        self.step_graphs = StepGraphs(
            self.step_graph, self.decoder.cfg.vocab_size, self.top_k, self.device, self.dtype, capture
        )
        if self.on_device:  # the whole decode as one graph per shape
            self.device_search = TorchDeviceSearch(
                self, capture, compiled=self.compile_search, fused=self.fused_search
            )

    @classmethod
    def from_modules(
        cls, encoder: EfficientNetLite | None, decoder: CaptionDecoder, device: str | None = "cpu"
    ) -> TorchBackend:
        """A backend over modules in memory (training's dev check); ``encoder`` may be None when
        only ``encode_regions`` is used. The modules are used as they are (no copy)."""
        backend = cls.__new__(cls)
        backend._setup(encoder, decoder, _checked_device(device, False), fp16=False, fold_batch_norms=False)
        backend.manifest = None
        return backend

    def _setup(
        self,
        encoder,
        decoder,
        device: str,
        fp16: bool,
        fp32_encoder: bool = False,
        fp32_logits: bool = True,
        fold_batch_norms: bool = True,
    ) -> None:
        """``fp32_logits=False`` (with ``fp16``): the word logits in FP16 too, the FP16 of
        before the island (``benchmarks/fp16_emulation.py`` compares the two).
        ``fold_batch_norms`` (as the backend runs by default): an FP32 encoder replaced by its
        folded copy; False: the modules given used as they are (``from_modules``)."""
        self.batch_norms_folded = fold_batch_norms and encoder is not None and (fp32_encoder or not fp16)
        if self.batch_norms_folded:
            encoder = fold_efficientnet_batch_norms(encoder)
        self.device = torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.fp32_encoder = fp32_encoder
        self.image_dtype = torch.float32 if fp32_encoder else self.dtype  # the encoder's input
        self.top_k = decoder.cfg.top_k
        # with fp32_encoder, the encoder graph (the CNN and the decoder's once-per-image
        # init_state) runs on an FP32 copy of the modules and hands FP16 tensors to the decoder
        init = copy.deepcopy(decoder).to(self.device) if fp32_encoder else None
        self.decoder = decoder.to(self.device, self.dtype)
        self.encoder = (
            None
            if encoder is None
            else encoder.to(self.device, torch.float32 if fp32_encoder else self.dtype)
        )
        if init is not None:  # fp32_encoder
            self.encoder_graph = (
                None
                if self.encoder is None
                else MixedEncoderGraph(EncoderGraph(self.encoder, init), self.dtype)
            )
        if fp16:  # the FP32 islands of the FP16 ONNX (edgecap.build.convert.fp32_nodes)
            if self.decoder.cfg.attention:
                keep_fp32(self.decoder.att_score)
            # the word logits: near 10, FP16 rounds them 2^-7 apart, the size of the score gaps
            # that decide a beam (benchmarks/results/fp16_emulation.md: 6 of 360 captions)
            if fp32_logits:
                keep_fp32(self.decoder.out_vocab)
            if self.encoder is not None and not fp32_encoder:
                keep_fp32(self.encoder._fc)
                # the encoder's stem and first blocks, as the FP16 ONNX keeps them
                keep_fp32_span(
                    [self.encoder._conv_stem, self.encoder._bn0, *self.encoder._blocks[:ENCODER_FP32_BLOCKS]],
                    self.dtype,
                )
        if not fp32_encoder:
            self.encoder_graph = None if self.encoder is None else EncoderGraph(self.encoder, self.decoder)
        self.step_graph = StepGraph(self.decoder)
        self.graph_factory = None

    @staticmethod
    def _build(manifest: Manifest) -> tuple[EfficientNetLite, CaptionDecoder]:
        if manifest.precision == "int8":  # quantised weights: no PyTorch module to load them into
            raise ModelError(
                f"{manifest.directory}: an int8 model directory (edgecap convert), which the torch "
                "backend cannot run: its modules are rebuilt from FP32 or FP16 weights; use "
                "--backend onnxruntime, or the FP32 model it was converted from"
            )
        config = manifest.info.get("decoder_config")
        if not isinstance(config, dict):
            raise ModelError(
                f"{manifest.directory}: manifest.json has no decoder_config; the "
                "torch backend needs a model exported by `edgecap export`"
            )
        try:
            sizes = DecoderConfig(**config)
            check_decoder(config)  # each size in range, before any weight is allocated
        except TypeError as exc:  # a key this edgecap's DecoderConfig does not know
            raise ModelError(
                f"{manifest.directory}: manifest.json's decoder_config does not fit "
                f"this edgecap ({exc}); upgrade edgecap or re-export the model"
            ) from exc
        except ValueError as exc:  # a size out of range (a hand-edited manifest)
            raise ModelError(f"{manifest.directory}: manifest.json's decoder_config: {exc}") from None
        decoder = CaptionDecoder(sizes)
        variant = manifest.info.get("encoder", DEFAULT_ENCODER)
        try:
            encoder = EfficientNetLite(variant)
        except ValueError as exc:  # an encoder this edgecap does not know
            raise ModelError(f"{manifest.directory}: manifest.json: {exc}; upgrade edgecap") from exc
        weights = read_initializers(manifest)
        _load(encoder, weights, "encoder.", (), manifest)
        _load(decoder, weights, "decoder.", (), manifest)
        return encoder.eval(), decoder.eval()

    def keeps_sizes(self) -> bool:
        """With graphs or a compiled search: a capture or a compile per batch size."""
        return self.graph_factory is not None or self.compile_search

    def run_size(self, n_images: int, largest: int) -> int:
        """With graphs or a compiled search (``keeps_sizes``), ``n_images`` padded to one of a
        few sizes (``graph_batch_size``)."""
        if not self.keeps_sizes():
            return n_images
        return graph_batch_size(n_images, largest)

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        if precision == "fp16" and self.fp32_encoder:
            precision = "fp16 decoder, fp32 encoder"
        mode = ""
        if self.graph_factory is not None:
            mode = (
                ", CUDA graphs"
                if isinstance(self.graph_factory, CudaGraphs)
                else f", graphs: {getattr(self.graph_factory, '__name__', 'custom')}"
            )
        if self.on_device:
            mode += ", beam search on the device" + (
                " (compiled)" if self.compile_search else " (fused)" if self.fused_search else ""
            )
            if self.search_mode == "auto":
                mode += f" from {AUTO_DEVICE_ROWS} beam rows a batch"
        if self.frame_preprocess is not None:
            mode += ", preprocessing on the device"
        if self.channels_last:
            mode += ", channels-last encoder"
        if self.encoder is not None and self.image_dtype == torch.float32 and not self.batch_norms_folded:
            mode += ", encoder BatchNorms apart"  # fold_batch_norms=False (or from_modules)
        return (
            f"torch {torch.__version__} ({where}, {precision}{mode}; intra-op threads: "
            f"{torch.get_num_threads()}, process-wide)"
        )

    def batch_input(self, images: list[np.ndarray]) -> np.ndarray | torch.Tensor:
        """``Backend.batch_input``: on CUDA (``staging``) the batch stacked into this thread's
        kept page-locked buffer and on its way to the GPU, a tensor there; else one array."""
        if self.staging is None:
            return np.stack(images)
        return self.staging.upload(self.staging.stack(images))

    def encode(self, images: np.ndarray | torch.Tensor) -> Encoded:
        """images float32 (N, 3, H, W), on the host or (``encode_frames``) already on the
        device -> Encoded with the encoder graph's outputs as torch tensors on the device."""
        if self.graph_factory is not None and self.encoder_graphs is not None:
            return self._encoded(self.encoder_graphs.run(images))
        return self._encode_eager(images)

    def encode_frames(
        self, frames: list[np.ndarray], run_size: int | None = None, brighten: bool = False
    ) -> tuple[Encoded, np.ndarray, np.ndarray]:
        """With ``preprocess="device"``: RGB uint8 frames -> (Encoded, recognisable (N,) bool,
        blurriness (N,) float), resized, normalised and checked on the device
        (``torch_preprocess``), as ``encode`` of the host's model inputs would give them; padded
        to ``run_size`` images on the device."""
        if self.frame_preprocess is None:
            return super().encode_frames(frames, run_size, brighten)
        images, visible = self.frame_preprocess(frames, brighten)
        blurry = self.frame_preprocess.blurriness(images)
        if run_size is not None and run_size > len(frames):
            images = torch.cat([images, images[-1:].expand(run_size - len(frames), *images.shape[1:])])
        encoded = self.encode(images)
        return encoded, visible.cpu().numpy(), blurry.cpu().numpy()

    @torch.inference_mode()
    def _encode_eager(self, images: np.ndarray | torch.Tensor) -> Encoded:
        if self.encoder_graph is None:
            raise BackendError(
                "this torch backend has no encoder (made from a decoder alone: use encode_regions)"
            )
        if isinstance(images, torch.Tensor):
            x = images.to(self.device, self.image_dtype)
        else:
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device, self.image_dtype)
        with ieee_fp32(self.device):  # FP32 convolutions, not TF32 (PyTorch's CUDA default)
            return self._encoded(self.encoder_graph(x))

    @torch.inference_mode()
    def encode_regions(self, regions: torch.Tensor, class_probs: torch.Tensor | None = None) -> Encoded:
        """The encoder graph from its CNN's regions (N, L, C) on (training's cached features);
        ``class_probs`` (N, classes) for a decoder with tag input."""
        if class_probs is not None:
            class_probs = class_probs.to(self.device, self.dtype)
        return self._encoded(self.decoder.init_state(regions.to(self.device, self.dtype), class_probs))

    @staticmethod
    def _encoded(outputs) -> Encoded:
        tensors = dict(zip(ENCODER_OUTPUTS, outputs))  # no class_probs from regions
        probs = tensors.get("class_probs")
        return Encoded(
            n_images=int(tensors["h0"].shape[0]),
            tensors=tensors,
            class_probs=None if probs is None else probs.float().cpu().numpy(),
        )

    defers_unpacking = True  # search_on_device(deferred=True): see there

    def search_on_device(
        self, encoded: Encoded, options, start_id: int, end_id: int, tag_words, fusion, deferred: bool = False
    ):
        """The hook of ``edgecap.decoding.search_with_tags``: each image's hypotheses from the
        beam search on the device (``edgecap.backends.torch_search``), or None where this
        backend searches on the host (``search="host"``; ``"auto"`` on the CPU, or on CUDA for a
        batch of fewer than ``AUTO_DEVICE_ROWS`` beam rows). ``deferred``: a function of no
        arguments that unpacks them from the search's result (on the host by then) instead."""
        if not self.on_device or not use_device(self.search_mode, encoded.n_images * options.beam_size):
            return None
        return self.device_search(encoded, options, start_id, end_id, tag_words, fusion, deferred)

    def warms_search(self, n_images: int, options) -> bool:
        """With the whole decode in graphs: when the batch searches on the device (``search``,
        its beam rows)."""
        return (
            self.on_device
            and self.device_search.graphs is not None
            and use_device(self.search_mode, n_images * options.beam_size)
        )

    def warm_search(
        self, encoded: Encoded, options, start_id: int, end_id: int, fusion, tag_word: int | None
    ) -> int:
        """``TorchDeviceSearch.warm``, where ``warms_search``; else nothing (0)."""
        if not self.warms_search(encoded.n_images, options):
            return 0
        return self.device_search.warm(encoded, options, start_id, end_id, fusion, tag_word)

    def dropped_graphs(self) -> int:
        graphs = self.device_search.graphs if self.on_device else None
        return 0 if graphs is None else graphs.graphs.dropped

    def step_shapes_kept(self) -> int | None:
        return None if self.graph_factory is None else self.step_graphs.keys.limit

    def start(
        self, encoded: Encoded, image_index: np.ndarray, return_attention: bool = False
    ) -> DecoderSession:
        if self.graph_factory is not None:
            return GraphedSession(self.step_graphs, encoded.tensors, image_index, return_attention)
        return TorchDecoderSession(self, encoded.tensors, image_index, return_attention)


class MixedEncoderGraph(torch.nn.Module):
    """An FP32 encoder graph in front of an FP16 decoder: the image in FP32, the decoder's
    tensors (features, att_proj, h0, c0) out in ``dtype``, the class probabilities FP32."""

    def __init__(self, graph: EncoderGraph, dtype: torch.dtype):
        super().__init__()
        self.graph, self.dtype = graph, dtype

    def forward(self, image):
        *state, probs = self.graph(image.float())
        return (*(t.to(self.dtype) for t in state), probs)


class ChannelsLast(torch.nn.Module):
    """An encoder graph whose CNN (its weights converted by the backend) takes the image in
    channels-last (NHWC) memory: the same values, convolution kernels for that layout."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, image):
        return self.graph(image.contiguous(memory_format=torch.channels_last))


class TorchDecoderSession(DecoderSession):
    """One batch's decoding state: h/c (S, H) on the device between steps."""

    def __init__(self, backend: TorchBackend, tensors: dict, image_index: np.ndarray, return_attention: bool):
        self.step_graph = backend.step_graph
        self.device = backend.device
        self.return_attention = return_attention
        self.h, self.c = tensors["h0"], tensors["c0"]
        self.features, self.att_proj = tensors["features"], tensors["att_proj"]
        self.image_index = self._rows(image_index)

    def _rows(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.int32)).to(self.device)

    @torch.inference_mode()
    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        bias = (
            None
            if word_bias is None  # the step's plain top K
            else torch.from_numpy(word_bias).to(self.device)
        )
        values, ids, self.h, self.c, alpha = self.step_graph(
            self._rows(tokens),
            self.h,
            self.c,
            self._rows(source_rows),
            self.features,
            self.att_proj,
            self.image_index,
            bias,
        )
        return StepResult(
            topk_logprobs=values.float().cpu().numpy(),  # log-softmax ran in fp32
            topk_ids=ids.cpu().numpy(),
            alpha=alpha.float().cpu().numpy() if self.return_attention else None,
        )
