"""TensorRT support: engine building and caching (``engines``) and CUDA device memory (``cuda``).

Written against the TensorRT Python API that exists from 8.5 through 11 (named I/O tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). Its logic is unit-tested
with fakes of exactly the calls it makes; it has not yet run on real TensorRT.
"""

from __future__ import annotations

from edgecap.errors import BackendError

MIN_VERSION = (8, 5)
# From 10.12 ``BuilderFlag.FP16`` is deprecated (removed in 11, where every network is strongly
# typed): FP16 engines are then built from the FP16 ONNX as a strongly typed network.
STRONGLY_TYPED_FP16_FROM = (10, 12)

INSTALL_HINT = ("install it with pip install 'edgecap[tensorrt]' (desktop GPUs), or on a Jetson "
                "use JetPack 6's TensorRT (Python 3.10): sudo apt install python3-libnvinfer, "
                "a venv with --system-site-packages, then pip install pycuda "
                "(see engines/README.md)")


def parse_version(text: str) -> tuple[int, int]:
    """'10.3.0.26' -> (10, 3)."""
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def import_tensorrt():
    """The ``tensorrt`` module, checked to be new enough; ``BackendError`` says what to do."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    check_version(trt.__version__)
    return trt


def check_version(version: str) -> tuple[int, int]:
    parsed = parse_version(version)
    if parsed < MIN_VERSION:
        raise BackendError(
            f"TensorRT {version} is too old: edgecap needs TensorRT 8.5 or newer (on a Jetson: "
            "JetPack 6). JetPack 4.6 (TensorRT 8.2) is not supported; upgrade TensorRT or use "
            "the onnxruntime backend (--backend onnxruntime)")
    return parsed
