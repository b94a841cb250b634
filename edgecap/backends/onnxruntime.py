"""The onnxruntime backend: the default CPU runtime (and CUDA with the ``gpu`` extra).

Two ``InferenceSession``s (encoder, decoder step) are created once and shared: onnxruntime's
``run`` is thread-safe, and each ``OnnxDecoderSession`` keeps its own h/c, so one backend serves
several threads.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort  # no telemetry: edgecap/__init__.py sets ORT_DISABLE_TELEMETRY

from edgecap.backends import missing_package_hint, ort_beam, ort_gpu, ort_providers
from edgecap.backends._checks import check_graph_io, check_threads, load_failure
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.contract import ENCODER_OUTPUTS, ROLES, Limits
from edgecap.errors import BackendError
from edgecap.extras import install_hint
from edgecap.manifest import Manifest, graph_source

if not hasattr(ort, "InferenceSession"):
    # onnxruntime and onnxruntime-gpu install the same files: uninstalling one after installing
    # both leaves a folder of the other's leftovers, which imports as an empty namespace package
    _where = getattr(ort, "__file__", None) or next(iter(getattr(ort, "__path__", [])), "?")
    raise BackendError(
        f"onnxruntime at {_where} is incomplete "
        "(no InferenceSession: onnxruntime and onnxruntime-gpu share their files, and uninstalling "
        "one removes the other's); pip uninstall -y onnxruntime onnxruntime-gpu, then "
        + missing_package_hint("onnxruntime")
    )

# device= -> providers
DEVICE_PROVIDERS = {"cpu": [ort_providers.CPU], "cuda": [ort_providers.CUDA, ort_providers.CPU]}
STEP_RESULT_OUTPUTS = ["topk_logprobs", "topk_ids", "h_out", "c_out"]

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


SPINNING = "session.intra_op.allow_spinning"


def session_options(threads: int | None) -> ort.SessionOptions:
    """Options for small-batch latency: all graph optimisations, one sequential executor."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # 0 lets onnxruntime use one thread per physical core: hyper-threads only add contention
    # for these compute-bound graphs.
    so.intra_op_num_threads = 0 if threads is None else threads
    so.inter_op_num_threads = 1  # the graphs are chains: nothing runs in parallel between ops
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise
    # No spin-waiting worker threads: after each run they burned ~70 ms of CPU in the next 200 ms
    # (a robot's other models lose those cores), and the spinning took the cores from the search
    # running between the step runs: end to end 27.0 vs 34.2 ms, encoder 6.9 vs 12.5 ms with
    # spinning off vs on (2-core CPU, each in its own process; benchmarks/results/spinning.md).
    so.add_session_config_entry(SPINNING, "0")
    return so


def select_providers(requested: str | list | None, device: str | None, **gpu_options) -> list:
    """The execution providers to ask for, best first, CPU last
    (``ort_providers.select_providers``).

    ``requested`` (provider names, aliases such as "cuda" / "tensorrt", or (name, options)
    pairs) wins over ``device`` ("cpu" or "cuda"); with neither, CUDA when this onnxruntime
    has it, then the CPU. The TensorRT execution provider is used only when requested.
    ``gpu_options``: ``cache_dir``, ``fp16``, ``device_id`` (see ``ort_providers``).
    """
    if device is not None and device not in DEVICE_PROVIDERS:
        raise ValueError(f"device must be one of {sorted(DEVICE_PROVIDERS)}, got {device!r}")
    if requested is None and device is not None:
        requested = DEVICE_PROVIDERS[device]
    return ort_providers.select_providers(
        requested,
        ort.get_available_providers(),
        gpu_options.get("cache_dir"),
        fp16=gpu_options.get("fp16", True),
        device_id=gpu_options.get("device_id", 0),
    )


class OnnxRuntimeBackend(Backend):
    """Args: ``providers`` (names, aliases "cpu" / "cuda" / "tensorrt", or (name, options)
    pairs; default CUDA when available, then CPU; the TensorRT execution provider only when
    listed), ``device`` ("cpu" / "cuda", used when ``providers`` is None), ``threads`` (intra-op
    threads; None: one per physical core), and for GPU providers ``cache_dir`` (TensorRT EP
    engine cache), ``fp16`` (TensorRT EP precision), ``fp32_encoder`` (with ``fp16``: the
    TensorRT EP runs the encoder graph in FP32 behind the FP16 decoder step, the FP16 that keeps
    the captions; None, the default: so with ``fp16``; False: the encoder FP16 too; the user's
    own ``trt_fp16_enable`` wins), ``device_id``, ``limits`` (the largest
    batch and beam the TensorRT EP's optimisation profile takes; default 8 x 5). ``search``:
    "host" (default: the numpy loop between steps) or "graph" (the beam bookkeeping inside a
    step graph derived from the model's, ``edgecap.backends.ort_beam``; needs the onnx
    package; docs/gpu-search.md).

    On a GPU provider the image tensors and h/c stay on the device between steps
    (``ort_gpu.IOBindingDecoder``); on the CPU they are numpy arrays fed to ``run``.
    """

    name = "onnxruntime"

    def __init__(
        self,
        manifest: Manifest,
        providers: str | list | None = None,
        threads: int | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
        fp16: bool = True,
        device_id: int = 0,
        limits: Limits | None = None,
        search: str = "host",
        fp32_encoder: bool | None = None,
    ):
        check_threads(threads)
        if fp32_encoder and not fp16:
            raise ValueError(
                "fp32_encoder=True goes with fp16=True (the TensorRT execution provider's FP16 "
                "decoder step behind an FP32 encoder); without fp16 everything is FP32 already"
            )
        if search not in ort_beam.SEARCH_MODES:
            raise ValueError(f"search must be one of {', '.join(ort_beam.SEARCH_MODES)}, got {search!r}")
        if search == "graph":
            ort_beam.import_onnx()  # a missing onnx package now, not at the first caption
        self.manifest = manifest
        self.top_k = manifest.dims.top_k
        self.threads = threads
        limits = limits or Limits()
        cuda_required = providers is None and device == "cuda"
        if cuda_required and ort_providers.CUDA not in ort.get_available_providers():
            raise BackendError(
                "device='cuda' but this onnxruntime has no CUDA provider (it has "
                f"{', '.join(ort.get_available_providers())}); install "
                f"onnxruntime-gpu ({install_hint('gpu')}) or use device='cpu'"
            )
        wanted = select_providers(providers, device, cache_dir=cache_dir, fp16=fp16, device_id=device_id)
        # the TensorRT EP (when listed) gets each graph's own optimisation profile
        per_role = {role: ort_providers.providers_for_role(wanted, manifest, role, limits) for role in ROLES}
        if fp16 and fp32_encoder is not False:  # the FP16 that keeps the captions
            per_role["encoder"] = ort_providers.with_fp32_encoder(per_role["encoder"], providers, cache_dir)
        self.encoder = self._session("encoder", per_role["encoder"], threads)
        self.decoder = self._session("decoder_step", per_role["decoder_step"], threads)
        self._input_types = {
            i.name: _NUMPY_TYPES.get(i.type, np.float32)
            for s in (self.encoder, self.decoder)
            for i in s.get_inputs()
        }
        for role, session in (("encoder", self.encoder), ("decoder_step", self.decoder)):
            if cuda_required and session.get_providers()[0] != ort_providers.CUDA:
                raise BackendError(
                    f"device='cuda' but onnxruntime could not use CUDA for the "
                    f"{role} graph (check the CUDA and cuDNN libraries "
                    "onnxruntime-gpu needs); use device='cpu' to run on the CPU"
                )
            ort_providers.warn_if_fallback(session, wanted, role)
        self._device_decoder = self._make_device_decoder(device_id)
        self._graph_search = ort_beam.OnnxGraphSearch(self) if search == "graph" else None

    def _make_device_decoder(self, device_id: int):
        """ort_gpu's I/O-binding decoder when a CUDA-memory provider (CUDA, TensorRT) runs the
        step graph, else None (numpy feeds)."""
        if self.providers[0] not in (ort_providers.CUDA, ort_providers.TENSORRT):
            return None
        return ort_gpu.IOBindingDecoder(
            self.encoder, self.decoder, self.manifest.dims.vocab_size, device="cuda", device_id=device_id
        )

    def _session(self, role: str, providers: list, threads: int | None) -> ort.InferenceSession:
        try:
            source = graph_source(self.manifest.path(role))  # a name that is not UTF-8: the bytes
            session = ort.InferenceSession(source, session_options(threads), providers=providers)
        except (ValueError, TypeError) as exc:
            raise BackendError(f"onnxruntime refused the providers {providers}: {exc}") from exc
        except Exception as exc:  # onnxruntime's own exception types are not importable stably
            raise load_failure(self.manifest, role, exc) from exc
        check_graph_io(
            self.manifest,
            role,
            {i.name: i.shape for i in session.get_inputs()},
            {o.name: o.shape for o in session.get_outputs()},
        )
        return session

    @property
    def providers(self) -> list[str]:
        """The execution providers that actually attached, best first."""
        return list(self.decoder.get_providers())

    def describe(self) -> str:
        threads = "physical cores" if self.threads is None else str(self.threads)
        graph = "; beam bookkeeping in the step graph" if getattr(self, "_graph_search", None) else ""
        return (
            f"onnxruntime {ort.__version__} ({', '.join(self.providers)}; intra-op threads: {threads}{graph})"
        )

    def encode(self, images: np.ndarray) -> Encoded:
        """images float32 (N, 3, H, W) -> Encoded with numpy features (N, L, F), att_proj
        (N, L, A), h0, c0 (N, H)."""
        if self._device_decoder is not None:
            tensors = self._device_decoder.encode(images)
            return Encoded(
                n_images=int(images.shape[0]), tensors=tensors, class_probs=tensors["class_probs"].numpy()
            )
        image = np.ascontiguousarray(images, dtype=self._input_types["image"])
        outputs = self.encoder.run(list(ENCODER_OUTPUTS), {"image": image})
        tensors = dict(zip(ENCODER_OUTPUTS, outputs))
        return Encoded(
            n_images=int(images.shape[0]),
            tensors=tensors,
            class_probs=tensors["class_probs"].astype(np.float32, copy=False),
        )

    def search_on_device(self, encoded: Encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """The hook of ``edgecap.decoding.search_with_tags``: each image's hypotheses from the
        beam-step graph (``search="graph"``), or None: the numpy loop searches."""
        if self._graph_search is None:
            return None
        return self._graph_search(encoded, options, start_id, end_id, tag_words, fusion)

    @property
    def images_apart(self) -> bool:
        """Whether a batch's images are stepped (and, ``search="graph"``, searched) apart: an
        int8 step quantises its inputs with one scale over all the rows of a run, so that a
        photo's caption would depend on its batch (``benchmarks/int8_rows.py``: the graphs that
        would keep rows apart in one run cost one photo's steps more than batches gain)."""
        return self.manifest.precision == "int8"

    def start(
        self, encoded: Encoded, image_index: np.ndarray, return_attention: bool = False
    ) -> DecoderSession:
        if self._device_decoder is not None:
            return self._device_decoder.start(encoded.tensors, image_index, return_attention)
        session = OnnxDecoderSession(self, encoded.tensors, image_index, return_attention)
        session.per_image = self.images_apart and encoded.n_images > 1
        return session


class OnnxDecoderSession(DecoderSession):
    """One batch's decoding state: h/c (S, H) between steps, the image tensors fed unchanged."""

    def __init__(
        self, backend: OnnxRuntimeBackend, tensors: dict, image_index: np.ndarray, return_attention: bool
    ):
        self._run = backend.decoder.run
        self._types = backend._input_types
        self._outputs = STEP_RESULT_OUTPUTS + (["alpha"] if return_attention else [])
        self.h, self.c = tensors["h0"], tensors["c0"]  # S = N until the first step
        self._fixed = {
            "features": tensors["features"],
            "att_proj": tensors["att_proj"],
            "image_index": np.ascontiguousarray(image_index, dtype=np.int32),
        }
        self._no_bias = np.zeros(
            (len(image_index), backend.manifest.dims.vocab_size), self._types["word_bias"]
        )

    per_image = False  # step each image's rows in a run of their own (``_per_image``)
    _images: list | None = None  # its per-image rows and tensors, made at its first step

    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        bias = self._no_bias if word_bias is None else word_bias
        outputs = self._per_image(tokens, source_rows, bias) if self.per_image else None
        if outputs is None:
            feed = self._feed(tokens, source_rows, bias, self.h, self.c, self._fixed)
            outputs = self._run(self._outputs, feed)
        logprobs, ids, self.h, self.c = outputs[:4]
        alpha = outputs[4].astype(np.float32, copy=False) if len(outputs) > 4 else None
        return StepResult(
            topk_logprobs=logprobs.astype(np.float32, copy=False),
            topk_ids=ids.astype(np.int32, copy=False),
            alpha=alpha,
        )

    def _feed(self, tokens, source_rows, bias, h, c, fixed) -> dict:
        return {
            "tokens": np.ascontiguousarray(tokens, dtype=self._types["tokens"]),
            "source_rows": np.ascontiguousarray(source_rows, dtype=self._types["source_rows"]),
            "h": h,
            "c": c,
            "word_bias": bias,
            **fixed,
        }

    def _per_image(self, tokens: np.ndarray, source_rows: np.ndarray, bias: np.ndarray) -> list | None:
        """The step's outputs with each image's rows run apart (an int8 step's dynamic
        quantisation takes one scale over the rows of a run: the other photos of a batch moved
        a photo's caption, 22 of 240 in batches of 8); None where a row continues another
        image's row (never in the beam loop): one run for all."""
        index = self._fixed["image_index"]
        first = len(self.h) != len(index)  # h/c are per image until the first step
        if self._images is None:  # each image's rows and tensors: the same at every step
            self._images = []
            for image in range(len(self._fixed["features"])):
                rows = np.flatnonzero(index == image)
                fixed = {
                    "features": self._fixed["features"][image : image + 1],
                    "att_proj": self._fixed["att_proj"][image : image + 1],
                    "image_index": np.zeros(len(rows), np.int32),
                }
                self._images.append((rows, fixed))
        parts = []
        for image, (rows, fixed) in enumerate(self._images):
            before = np.array([image]) if first else rows
            local = np.searchsorted(before, source_rows[rows])
            if not np.array_equal(before[np.minimum(local, len(before) - 1)], source_rows[rows]):
                return None
            feed = self._feed(tokens[rows], local, bias[rows], self.h[before], self.c[before], fixed)
            parts.append((rows, self._run(self._outputs, feed)))
        outputs = []
        for k, first_out in enumerate(parts[0][1]):
            whole = np.empty((len(index), *first_out.shape[1:]), first_out.dtype)
            for rows, out in parts:
                whole[rows] = out[k]
            outputs.append(whole)
        return outputs
