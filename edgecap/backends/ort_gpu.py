"""onnxruntime on a GPU: provider selection, and device-resident decoding with I/O binding.

Providers. ``select_providers`` turns a request into onnxruntime's ``providers=`` list, keeping
only the providers this onnxruntime build offers, CPU always last as the fallback:

- no request (or "auto"): CUDA, then CPU. The TensorRT execution provider is **not** used unless
  asked for: it builds an engine per graph on first use (minutes on a Jetson) and edgecap has a
  native TensorRT backend (``--backend tensorrt``) for that job.
- ``providers=["tensorrt"]`` (or "trt", or ``"TensorrtExecutionProvider"``, or a
  ``(name, options)`` pair): the TensorRT EP with FP16, engine and timing caches, and an explicit
  optimisation profile per graph (``trt_profile_min/opt/max_shapes``: rows 1 to
  ``max_batch`` x ``max_beam``, including the S rows of the step's ``h``/``c``), followed by CUDA
  (for the nodes TensorRT does not take) when the request does not place CUDA itself.
- a user's ``(name, options)`` pair keeps its options; they win over edgecap's defaults.

onnxruntime falls back to the next provider silently when one fails to load (missing CUDA /
TensorRT libraries), so ``warn_if_fallback`` says which one really runs the graph.

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
KNOWN = (TENSORRT, CUDA, CPU)
DEFAULT = (CUDA, CPU)  # the TensorRT EP only when asked for (see the module doc)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}
PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def provider_entries(requested: str | list | tuple | None) -> list[tuple[str, dict]]:
    """Normalise a request to (full provider name, user options) pairs: None / 'auto' -> the
    default order; aliases ('cuda', 'tensorrt', 'cpu'), full provider names, a comma-separated
    string, or a list of names and ``(name, options)`` pairs."""
    if requested is None or requested == "auto":
        return [(name, {}) for name in DEFAULT]
    if isinstance(requested, str):
        items: list = requested.split(",")
    elif isinstance(requested, tuple) and len(requested) == 2 and isinstance(requested[1], dict):
        items = [requested]  # a single (name, options) pair
    else:
        items = list(requested)
    entries: list[tuple[str, dict]] = []
    for item in items:
        options: dict = {}
        if isinstance(item, (tuple, list)):
            if len(item) != 2 or not isinstance(item[1], dict):
                raise ValueError(f"a provider with options is a (name, dict) pair, got {item!r}")
            item, options = item
        key = str(item).strip()
        name = ALIASES.get(key.lower(), key)
        if name not in KNOWN and not name.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {key!r}; use one of "
                             f"{', '.join(sorted(ALIASES))} or a full provider name")
        if name in [n for n, _ in entries]:
            continue
        entries.append((name, dict(options)))
    return entries


def provider_names(requested: str | list | tuple | None) -> list[str]:
    """The full provider names of a request (see ``provider_entries``)."""
    return [name for name, _ in provider_entries(requested)]


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
    (default: CUDA, CPU) that ``available`` offers, with their options (edgecap's defaults
    updated by the user's own), CPU last as the fallback. Warns when an explicitly requested
    provider is not available. The TensorRT EP's profile shapes depend on the graph: see
    ``providers_for_role``."""
    entries = provider_entries(requested)
    explicit = requested is not None and requested != "auto"
    names = [name for name, _ in entries]
    implicit: set[str] = set()
    if TENSORRT in names and CUDA not in names:
        # nodes the TensorRT EP does not take run on CUDA rather than on the CPU
        entries.insert(names.index(TENSORRT) + 1, (CUDA, {}))
        implicit.add(CUDA)
    providers: list = []
    for name, options in entries:
        if name not in available:
            if explicit and name not in implicit:
                warnings.warn(f"{name} is not available in this onnxruntime "
                              f"(available: {', '.join(available)}); "
                              + ("install onnxruntime-gpu (pip install 'edgecap[gpu]') in an "
                                 "environment without onnxruntime" if name in (CUDA, TENSORRT)
                                 else "falling back"), RuntimeWarning, stacklevel=2)
            continue
        if name == TENSORRT:
            providers.append((name, {**tensorrt_options(cache_dir, fp16, device_id,
                                                        tensorrt_extra), **options}))
        elif name == CUDA:
            providers.append((name, {"device_id": device_id, **options}))
        else:
            providers.append((name, options) if options else name)
    if CPU not in [provider_name(p) for p in providers] and CPU in available:
        providers.append(CPU)
    return providers


def provider_name(provider) -> str:
    """The name of a ``providers=`` entry (a name or a (name, options) pair)."""
    return provider[0] if isinstance(provider, (tuple, list)) else provider


def trt_profile_options(manifest, role: str, max_batch: int = 8, max_beam: int = 5) -> dict:
    """Explicit optimisation profile for the TensorRT provider (one engine over all row counts
    instead of a rebuild each time a larger batch appears), from the manifest's dimensions:
    the same ranges as the native TensorRT backend's engines (``edgecap.trt.engines.Limits``)."""
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
    return {key: ",".join(p) for key, p in zip(PROFILE_KEYS, parts)}


def providers_for_role(providers: list, manifest, role: str, max_batch: int = 8,
                       max_beam: int = 5) -> list:
    """``providers`` with the TensorRT EP's entry given ``role``'s profile shapes (each graph has
    its own inputs), unless the user set profile shapes of their own."""
    out = []
    for provider in providers:
        if provider_name(provider) == TENSORRT and isinstance(provider, (tuple, list)):
            name, options = provider
            if not any(key in options for key in PROFILE_KEYS):
                options = {**options,
                           **trt_profile_options(manifest, role, max_batch, max_beam)}
            provider = (name, options)
        out.append(provider)
    return out


def attached_provider(session) -> str:
    """The provider that runs the session's graph (the first one that attached)."""
    return session.get_providers()[0]


def warn_if_fallback(session, providers: list, what: str = "") -> str:
    """Warn when the first provider asked for did not attach to ``session`` (``what`` names the
    graph in the message); return the attached one."""
    attached = attached_provider(session)
    if providers:
        first = provider_name(providers[0])
        if attached != first:
            graph = f" for the {what} graph" if what else ""
            warnings.warn(f"onnxruntime could not use {first}{graph} and runs on {attached} "
                          "instead (check the CUDA / TensorRT libraries onnxruntime-gpu needs; "
                          "its log above says which one failed to load)", RuntimeWarning,
                          stacklevel=3)
    return attached


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
