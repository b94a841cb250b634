"""onnxruntime on a GPU: provider selection, and device-resident decoding with I/O binding.

``select_providers`` asks for the TensorRT execution provider (FP16, with an engine cache), then
CUDA, then CPU, keeping only those this onnxruntime build offers. onnxruntime falls back to the
next provider silently when one fails to load (missing CUDA / TensorRT libraries), so
``attached_provider`` / ``warn_if_fallback`` tell which one really runs the graph.

``IOBindingDecoder`` keeps the image tensors and the decoder state on the device between steps
(the CUDA provider's ``OrtValue`` on 'cuda'): per step only ``tokens`` / ``source_rows`` go up and
``topk_logprobs`` / ``topk_ids`` (and ``alpha`` when asked) come back. The same code runs with
``device="cpu"`` on the CPU provider, which is how it is tested here; the 'cuda' path has not yet
run (no onnxruntime-gpu on our machines).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from edgecap.backends.base import ENCODER_OUTPUTS, DecoderSession, StepResult

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}


def provider_names(requested: str | list | tuple | None) -> list[str]:
    """Normalise a request: None / 'auto' -> the preference order; 'cuda', 'tensorrt', 'cpu',
    full provider names, a comma-separated string or a list of those."""
    if requested is None or requested == "auto":
        return list(PREFERENCE)
    items = requested.split(",") if isinstance(requested, str) else list(requested)
    names = []
    for item in items:
        if isinstance(item, tuple):  # already (name, options)
            item = item[0]
        key = str(item).strip()
        name = ALIASES.get(key.lower(), key)
        if name not in PREFERENCE and not name.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {key!r}; use one of "
                             f"{', '.join(sorted(ALIASES))} or a full provider name")
        if name not in names:
            names.append(name)
    return names


def _default_cache_dir() -> Path:
    from edgecap.trt.engines import default_cache_dir

    return default_cache_dir() / "onnxruntime-tensorrt"


def tensorrt_options(cache_dir: str | Path | None, fp16: bool = True, device_id: int = 0,
                     extra: dict | None = None) -> dict:
    """TensorRT execution provider options: FP16, engine and timing caches in ``cache_dir``."""
    cache = str(Path(cache_dir) if cache_dir is not None else _default_cache_dir())
    options = {"device_id": device_id, "trt_fp16_enable": bool(fp16),
               "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
               "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
               "trt_max_workspace_size": 1 << 30}
    options.update(extra or {})
    return options


def select_providers(requested: str | list | None, available: list[str],
                     cache_dir: str | Path | None, *, fp16: bool = True, device_id: int = 0,
                     tensorrt_extra: dict | None = None) -> list:
    """The ``providers=`` list for ``onnxruntime.InferenceSession``: the requested providers
    (default: TensorRT, CUDA, CPU) that ``available`` offers, with their options, CPU last as
    the fallback. Warns when an explicitly requested provider is not available."""
    wanted = provider_names(requested)
    explicit = requested is not None and requested != "auto"
    providers: list = []
    for name in wanted:
        if name not in available:
            if explicit:
                warnings.warn(f"{name} is not available in this onnxruntime "
                              f"(available: {', '.join(available)}); "
                              + ("install onnxruntime-gpu (pip install 'edgecap[gpu]') in an "
                                 "environment without onnxruntime" if name in (CUDA, TENSORRT)
                                 else "falling back"), RuntimeWarning, stacklevel=2)
            continue
        if name == TENSORRT:
            providers.append((name, tensorrt_options(cache_dir, fp16, device_id, tensorrt_extra)))
        elif name == CUDA:
            providers.append((name, {"device_id": device_id}))
        else:
            providers.append(name)
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    if CPU not in names and CPU in available:
        providers.append(CPU)
    return providers


def attached_provider(session) -> str:
    """The provider that runs the session's graph (the first one that attached)."""
    return session.get_providers()[0]


def warn_if_fallback(session, providers: list) -> str:
    """Warn when the first provider asked for did not attach; return the attached one."""
    attached = attached_provider(session)
    if providers:
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if attached != first:
            warnings.warn(f"onnxruntime could not use {first} and runs on {attached} instead "
                          "(check the CUDA / TensorRT libraries onnxruntime-gpu needs; its log "
                          "above says which one failed to load)", RuntimeWarning, stacklevel=2)
    return attached


def trt_profile_options(manifest, role: str, max_batch: int = 8, max_beam: int = 5) -> dict:
    """Explicit optimisation profile for the TensorRT provider (one engine over all row counts
    instead of a rebuild each time a larger batch appears), from the manifest's dimensions."""
    from edgecap.trt.engines import Limits

    d = manifest.dims
    h, w = manifest.preprocessing.size
    tails = {"image": (3, h, w), "features": (d["regions"], d["feature_dim"]),
             "att_proj": (d["regions"], d["attention_dim"]), "h": (d["hidden_dim"],),
             "c": (d["hidden_dim"],), "tokens": (), "source_rows": (), "image_index": ()}
    ranges = Limits(max_batch, max_beam).row_ranges(role)
    parts: list[list[str]] = [[], [], []]
    for name, rows in ranges.items():
        for i, n in enumerate(rows):
            parts[i].append(f"{name}:" + "x".join(str(v) for v in (n, *tails[name])))
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(p) for key, p in zip(keys, parts)}


class IOBindingDecoder:
    """Encoder and decoder step on one device with the state kept there between steps."""

    def __init__(self, encoder_session, step_session, device: str = "cuda", device_id: int = 0):
        import onnxruntime as ort

        self._ort = ort
        self.encoder, self.step_session = encoder_session, step_session
        self.device, self.device_id = device, device_id

    def encode(self, images: np.ndarray) -> dict:
        """images float32 (N, 3, H, W) -> the encoder's outputs as OrtValues on the device."""
        io = self.encoder.io_binding()
        io.bind_cpu_input("image", np.ascontiguousarray(images, dtype=np.float32))
        for name in ENCODER_OUTPUTS:
            io.bind_output(name, self.device, self.device_id)
        self.encoder.run_with_iobinding(io)
        return dict(zip(ENCODER_OUTPUTS, io.get_outputs()))

    def start(self, encoded: dict, image_index: np.ndarray,
              return_attention: bool = False) -> "IOBindingSession":
        return IOBindingSession(self, encoded, np.asarray(image_index, dtype=np.int32),
                                return_attention)


class IOBindingSession(DecoderSession):
    """Ping-pong state: each step reads one pair of (R, H) device tensors and writes the other."""

    def __init__(self, owner: IOBindingDecoder, encoded: dict, image_index: np.ndarray,
                 return_attention: bool):
        ort, dev, idx = owner._ort, owner.device, owner.device_id
        self._session = owner.step_session
        self._owner = owner
        self._return_attention = return_attention
        self._rows = len(image_index)
        h0 = encoded["h0"]
        hidden = h0.shape()[1]
        self._io = self._session.io_binding()
        self._io.bind_ortvalue_input("features", encoded["features"])
        self._io.bind_ortvalue_input("att_proj", encoded["att_proj"])
        self._io.bind_ortvalue_input("image_index",
                                     ort.OrtValue.ortvalue_from_numpy(image_index, dev, idx))
        self._state = [tuple(ort.OrtValue.ortvalue_from_shape_and_type(
            (self._rows, hidden), np.float32, dev, idx) for _ in range(2)) for _ in range(2)]
        self._current = (h0, encoded["c0"])
        self._next = 0

    def step(self, tokens: np.ndarray, source_rows: np.ndarray) -> StepResult:
        io, dev, idx = self._io, self._owner.device, self._owner.device_id
        io.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int32))
        io.bind_cpu_input("source_rows", np.ascontiguousarray(source_rows, dtype=np.int32))
        h, c = self._current
        io.bind_ortvalue_input("h", h)
        io.bind_ortvalue_input("c", c)
        h_out, c_out = self._state[self._next]
        io.bind_ortvalue_output("h_out", h_out)
        io.bind_ortvalue_output("c_out", c_out)
        io.bind_output("topk_logprobs", "cpu")
        io.bind_output("topk_ids", "cpu")
        # alpha stays on the device unless asked for
        io.bind_output("alpha", "cpu" if self._return_attention else dev,
                       0 if self._return_attention else idx)
        self._session.run_with_iobinding(io)
        # get_outputs() follows the order of the bind calls above
        outputs = dict(zip(("h_out", "c_out", "topk_logprobs", "topk_ids", "alpha"),
                           io.get_outputs()))
        io.clear_binding_outputs()
        self._current = (h_out, c_out)
        self._next = 1 - self._next
        return StepResult(topk_logprobs=outputs["topk_logprobs"].numpy(),
                          topk_ids=outputs["topk_ids"].numpy(),
                          alpha=outputs["alpha"].numpy() if self._return_attention else None)
