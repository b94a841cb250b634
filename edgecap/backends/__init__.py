"""Backend registry. Each backend lives in its own module, imported only when chosen, so
``import edgecap`` never imports onnxruntime, torch or tensorrt.

``load_backend(name, manifest, device=..., limits=..., **options)`` with ``name`` one of
``BACKENDS`` or ``"auto"`` (onnxruntime when it is installed, else tensorrt, else torch). Every
backend class takes ``device`` ("cpu" / "cuda" / None for its default) and ``limits`` (the largest
batch and beam it must serve; backends with fixed-size engines or buffers build for them, the
others ignore them), and maps them to its own settings.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from edgecap import extras
from edgecap.backends.base import Backend
from edgecap.contract import Limits
from edgecap.errors import BackendError
from edgecap.manifest import Manifest

# name -> (module, class)
BACKENDS = {
    "onnxruntime": ("edgecap.backends.onnxruntime", "OnnxRuntimeBackend"),
    "torch": ("edgecap.backends.torch", "TorchBackend"),
    "tensorrt": ("edgecap.backends.tensorrt", "TensorRTBackend"),
}
NAMES = (*BACKENDS, "auto")

# missing top-level package -> the extra that installs it
EXTRA_FOR = {
    "onnxruntime": "cpu",
    "torch": "train",
    "onnx": "export",
    "tensorrt": "tensorrt",
    "pycuda": "tensorrt",
    "cuda": "tensorrt",
}


def missing_package_hint(missing: str) -> str:
    """What to run to install the top-level package ``missing`` (a key of ``EXTRA_FOR``)."""
    if missing == "onnxruntime":  # two extras, which break each other
        return (
            f"for the CPU {extras.install_hint('cpu')}, or for CUDA {extras.install_hint('gpu')}, "
            "not both; on a Jetson use the TensorRT backend (engines/README.md)"
        )
    hint = extras.install_hint(EXTRA_FOR[missing])
    if missing == "tensorrt":
        return hint + "; on a Jetson, TensorRT comes with JetPack (engines/README.md)"
    return hint


def resolve(name: str) -> str:
    """``auto`` -> the backend that would be used; other names are checked and returned."""
    if name == "auto":
        # onnxruntime first (the light runtime); then TensorRT, the GPU path on a Jetson where
        # PyPI has no onnxruntime-gpu; the PyTorch reference last.
        for candidate in ("onnxruntime", "tensorrt", "torch"):
            spec = importlib.util.find_spec(candidate)
            # TensorRT's type stubs alone (tensorrt-stubs: .pyi files) are a namespace package,
            # which import_tensorrt says is not TensorRT
            if spec is not None and (candidate != "tensorrt" or spec.origin not in (None, "namespace")):
                return candidate
        raise BackendError("no backend is installed: " + missing_package_hint("onnxruntime"))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def backend_class(name: str) -> type[Backend]:
    """Import a backend's module (only now) and return its class."""
    module_name, class_name = BACKENDS[resolve(name)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise BackendError(
                f"the {resolve(name)} backend is not part of this edgecap install; upgrade edgecap"
            ) from exc
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRA_FOR:
            raise  # a bug or a broken install, not a missing extra: keep the traceback
        raise BackendError(
            f"the {resolve(name)} backend needs {missing}, which is not installed: "
            + missing_package_hint(missing)
        ) from exc
    return getattr(module, class_name)


def load_backend(
    name: str, manifest: Manifest, *, device: str | None = None, limits: Limits | None = None, **options
) -> Backend:
    """A ready backend for the model in ``manifest``.

    ``limits``: the largest batch and beam the caller will use; engines are built for at least
    the default engine's (``Limits.covering_default``), so that the engines of ``edgecap build``
    are reused. ``options`` go to the backend's class (onnxruntime: providers, threads,
    cache_dir, fp16, device_id; torch: fp16, cuda_graphs; tensorrt: precision, cache_dir).
    """
    limits = (limits or Limits()).covering_default()
    # each backend's constructor takes its own options (the base class declares none)
    make: Callable[..., Backend] = backend_class(name)
    _check_options(make, name, options)
    return make(manifest, device=device, limits=limits, **options)


def _check_options(make: Callable, name: str, options: dict) -> None:
    """A keyword the backend's class does not take is a TypeError naming it (and the nearest
    caption option or backend option), before the model is loaded."""
    import difflib
    import inspect
    from dataclasses import fields

    from edgecap.decoding import CaptionOptions

    parameters = inspect.signature(make).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    taken = [n for n in parameters if n not in ("self", "manifest", "device", "limits")]
    for key in options:
        if key not in parameters:
            # Captioner's own
            own = ["model", "options", "backend", "device", "threads", "decode_workers", "overlap"]
            known = [f.name for f in fields(CaptionOptions)] + own + taken
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(
                f"unknown option {key!r}: neither a caption option (CaptionOptions) nor an option "
                f"of the {resolve(name)} backend ({', '.join(taken)}){hint}"
            )
