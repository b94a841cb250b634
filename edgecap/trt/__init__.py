"""TensorRT support: engine building and caching (``engines``) and CUDA device memory (``cuda``).

Written against the TensorRT Python API that exists from 8.5 through 11 (named I/O tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); 8.6 or newer is required,
as 8.5's ONNX parser cannot read the encoder (LayerNormalization). Its logic is unit-tested
with fakes of exactly the calls it makes; it has not yet run on real TensorRT.

Typing: the ``tensorrt`` module is passed around as ``trt: TensorRTModule``, a protocol listing
the names edgecap takes from it, each typed by the real API's stubs (``tensorrt-stubs``, the
TensorRT 10.13 Python API), so mypy checks every TensorRT call, argument and enum member
(tests/test_typing.py, ``[tool.mypy]`` in pyproject.toml). At run time nothing here imports
tensorrt until ``import_tensorrt()`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

from edgecap import extras
from edgecap.errors import BackendError

if TYPE_CHECKING:
    import tensorrt

    class TensorRTAPI(Protocol):
        """What edgecap uses of the ``tensorrt`` module. ``import_tensorrt`` assigns the module
        to this type, so mypy checks that the real module (its stubs) has each name with this
        type; a name not listed here is an error wherever ``trt.NAME`` is used."""

        float16: tensorrt.DataType
        float32: tensorrt.DataType

        Builder: type[tensorrt.Builder]
        BuilderFlag: type[tensorrt.BuilderFlag]
        LayerType: type[tensorrt.LayerType]
        Logger: type[tensorrt.Logger]
        MemoryPoolType: type[tensorrt.MemoryPoolType]
        NetworkDefinitionCreationFlag: type[tensorrt.NetworkDefinitionCreationFlag]
        OnnxParser: type[tensorrt.OnnxParser]
        Runtime: type[tensorrt.Runtime]
        TensorIOMode: type[tensorrt.TensorIOMode]

        def nptype(self, trt_type: tensorrt.DataType) -> type: ...

    class TensorRTModule(TensorRTAPI, Protocol):
        """``TensorRTAPI`` and the version string (mypy does not match a module's dunder names
        against a protocol, so ``import_tensorrt`` checks this one at run time)."""

        __version__: str


MIN_VERSION = (8, 6)  # 8.5 (JetPack 5) cannot parse the encoder: no LayerNormalization
# From 10.12 ``BuilderFlag.FP16`` is deprecated (removed in 11, where every network is strongly
# typed): FP16 engines are then built from the FP16 ONNX as a strongly typed network.
STRONGLY_TYPED_FP16_FROM = (10, 12)


def install_hint() -> str:
    """How to install TensorRT, for the errors of a missing one."""
    return (
        f"on a desktop GPU, {extras.install_hint('tensorrt')}; on a Jetson, "
        "use JetPack 6's TensorRT (Python 3.10): sudo apt install python3-libnvinfer, "
        "a venv with --system-site-packages, then pip install pycuda "
        "(see engines/README.md)"
    )


def parse_version(text: str) -> tuple[int, int]:
    """'10.3.0.26' -> (10, 3)."""
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def import_tensorrt() -> TensorRTModule:
    """The ``tensorrt`` module, checked to be new enough; ``BackendError`` says what to do."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed: {install_hint()}") from exc
    # Type stubs alone (pip install tensorrt-stubs: a ``tensorrt`` folder of .pyi files) import
    # as an empty namespace package: no __version__, no API.
    if not isinstance(getattr(trt, "__version__", None), str):
        raise BackendError(
            "TensorRT is not installed (the `tensorrt` module found has no "
            f"__version__: type stubs, not the library): {install_hint()}"
        )
    check_version(trt.__version__)
    api: TensorRTAPI = trt  # mypy: the real module has every name edgecap uses, so typed
    return cast("TensorRTModule", api)


def tensorrt_importable() -> bool:
    """Whether ``import_tensorrt()`` would find a TensorRT library (any version): not just
    type stubs. Imports tensorrt when it is there."""
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or a wheel whose libraries are missing
        return False
    return isinstance(getattr(trt, "__version__", None), str)


def check_version(version: str) -> tuple[int, int]:
    parsed = parse_version(version)
    if parsed < MIN_VERSION:
        raise BackendError(
            f"TensorRT {version} is too old: edgecap needs TensorRT 8.6 or newer (on a Jetson: "
            "JetPack 6). JetPack 5 (TensorRT 8.5, whose ONNX parser cannot read the encoder's "
            "LayerNormalization) and JetPack 4.6 (TensorRT 8.2) are not supported; upgrade "
            "TensorRT or use the onnxruntime backend (--backend onnxruntime)"
        )
    return parsed
