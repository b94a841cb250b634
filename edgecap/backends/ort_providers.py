"""onnxruntime execution providers: which to ask for, with which options, and which attached.

``select_providers`` turns a request into onnxruntime's ``providers=`` list, keeping only the
providers this onnxruntime build offers, CPU always last as the fallback:

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
"""

from __future__ import annotations

import warnings
from pathlib import Path

from edgecap.cache import cache_root
from edgecap.contract import Limits
from edgecap.extras import install_hint

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
            raise ValueError(
                f"unknown execution provider {key!r}; use one of "
                f"{', '.join(sorted(ALIASES))} or a full provider name"
            )
        if name in [n for n, _ in entries]:
            continue
        entries.append((name, dict(options)))
    return entries


def _default_cache_dir() -> Path:
    return cache_root() / "engines" / "onnxruntime-tensorrt"


def tensorrt_options(
    cache_dir: str | Path | None, fp16: bool = True, device_id: int = 0, extra: dict | None = None
) -> dict:
    """TensorRT execution provider options: FP16, the timing cache in ``cache_dir`` and the
    engine cache in its folder for the precision (``engine_cache_path``)."""
    cache = _cache(cache_dir)
    options = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": engine_cache_path(cache, fp16),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": 1 << 30,
    }
    options.update(extra or {})
    return options


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else _default_cache_dir()


def _enabled(value) -> bool:
    """An onnxruntime boolean option's value: True / False, or "1" / "true" as strings."""
    return value.strip().lower() in ("1", "true") if isinstance(value, str) else bool(value)


def _tensorrt_entry(defaults: dict, mine: dict, cache_dir: str | Path | None) -> dict:
    """The TensorRT EP's options: edgecap's ``defaults`` updated by the user's own (``mine``),
    the engine cache that of the precision the options settle on unless the user named one."""
    options = {**defaults, **mine}
    if "trt_engine_cache_path" not in mine:
        options["trt_engine_cache_path"] = engine_cache_path(
            _cache(cache_dir), _enabled(options["trt_fp16_enable"])
        )
    return options


def engine_cache_path(cache: Path, fp16: bool) -> str:
    """The TensorRT EP's engine cache for one precision: ``cache/fp16`` or ``cache/fp32``. The
    EP's docs warn that an engine is built for one precision and must be rebuilt when it
    changes, and its engine file names do not say the precision in every version: one folder
    each, so an FP32 session never loads an FP16 engine cached for the same graph."""
    return str(cache / ("fp16" if fp16 else "fp32"))


def with_fp32_encoder(providers: list, requested, cache_dir: str | Path | None) -> list:
    """``providers`` for the encoder graph behind an FP16 decoder step: the TensorRT EP's entry
    with FP16 off and its engine cache the FP32 one (the FP16 that keeps the captions, as the
    other backends run it), unless the user's own options for it (``requested``) set
    ``trt_fp16_enable`` or ``trt_engine_cache_path`` themselves."""
    mine: dict = {}
    for name, options in provider_entries(requested):
        if name == TENSORRT:
            mine = options
    out = []
    for provider in providers:
        if provider_name(provider) == TENSORRT and isinstance(provider, (tuple, list)):
            name, options = provider
            provider = (name, _tensorrt_entry({**options, "trt_fp16_enable": False}, mine, cache_dir))
        out.append(provider)
    return out


def select_providers(
    requested: str | list | None,
    available: list[str],
    cache_dir: str | Path | None,
    *,
    fp16: bool = True,
    device_id: int = 0,
    tensorrt_extra: dict | None = None,
) -> list:
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
                warnings.warn(
                    f"{name} is not available in this onnxruntime "
                    f"(available: {', '.join(available)}); "
                    + (
                        f"install onnxruntime-gpu ({install_hint('gpu')}) in an "
                        "environment without onnxruntime"
                        if name in (CUDA, TENSORRT)
                        else "falling back"
                    ),
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        if name == TENSORRT:
            defaults = tensorrt_options(cache_dir, fp16, device_id)
            providers.append(
                (name, _tensorrt_entry(defaults, {**(tensorrt_extra or {}), **options}, cache_dir))
            )
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


def trt_profile_options(manifest, role: str, limits: Limits = Limits()) -> dict:
    """Explicit optimisation profile for the TensorRT provider (one engine over all row counts
    instead of a rebuild each time a larger batch appears), from the manifest's dimensions:
    the same ranges as the native TensorRT backend's engines (``Limits.row_ranges``)."""
    tails = manifest.dims.tails(manifest.preprocessing.size)
    ranges = limits.row_ranges(role)
    parts: list[list[str]] = [[], [], []]
    for name, rows in ranges.items():
        for i, n in enumerate(rows):
            parts[i].append(f"{name}:" + "x".join(str(v) for v in (n, *tails[name])))
    return {key: ",".join(p) for key, p in zip(PROFILE_KEYS, parts)}


def providers_for_role(providers: list, manifest, role: str, limits: Limits = Limits()) -> list:
    """``providers`` with the TensorRT EP's entry given ``role``'s profile shapes (each graph has
    its own inputs), unless the user set profile shapes of their own."""
    out = []
    for provider in providers:
        if provider_name(provider) == TENSORRT and isinstance(provider, (tuple, list)):
            name, options = provider
            if not any(key in options for key in PROFILE_KEYS):
                options = {**options, **trt_profile_options(manifest, role, limits)}
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
            warnings.warn(
                f"onnxruntime could not use {first}{graph} and runs on {attached} "
                "instead (check the CUDA / TensorRT libraries onnxruntime-gpu needs; "
                "its log above says which one failed to load)",
                RuntimeWarning,
                stacklevel=3,
            )
    return attached
