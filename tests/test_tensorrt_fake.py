"""TensorRT backend and engine building, tested against FAKES (fake-based tests).

No TensorRT or GPU here: ``FakeTRT`` implements exactly the calls edgecap makes (builder, network
flags, parser, profile, timing cache, runtime, engine, execution context), with the attributes
that differ between TensorRT 8.6, 10.3, 10.12 and 11 (8.5 and older are refused). Its "engine"
executes the parsed ONNX with onnxruntime CPU, reading and writing a fake device memory at the
addresses the backend set, so buffer bookkeeping, ping-pong state and the step loop are checked
against plain onnxruntime. None of this proves the code runs on real TensorRT.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import json
import os
import shutil
import sys
import threading
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgecap.backends.tensorrt import TensorRTBackend  # noqa: E402
from edgecap.errors import BackendError  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402
from helpers import needs_onnxruntime_for_opset_18  # noqa: E402
from edgecap.trt import check_version, import_tensorrt, parse_version  # noqa: E402
from edgecap.trt.cuda import CudaDevice, CudaPythonDevice  # noqa: E402
from edgecap.contract import Limits  # noqa: E402
from edgecap.trt.engines import (  # noqa: E402
    BUILD_RECIPE,
    EngineCache,
    Target,
    build_all,
    engine_filename,
    fp32_islands,
    profile_shapes,
    role_precisions,
)

MAGIC = b"FAKE-TRT-ENGINE\n"


# -- fakes --------------------------------------------------------------------------------------


class FakeDevice(CudaDevice):
    """Device memory as numpy byte arrays keyed by fake addresses; counts every call. Like a
    CUDA context, the device is usable only in a thread where it is current: every call (and
    the fake engines' reads and writes) fails outside ``with device.active():`` in that thread."""

    def __init__(self, name="Orin", cc=(8, 7)):
        self.name, self.compute_capability = name, cc
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: list[int] = []
        self.streams: list[str] = []
        self.calls = {"htod": 0, "dtoh": 0, "sync": 0}
        self._next = 0x10000
        self.closed = False
        self._current = threading.local()  # .depth: nested active() blocks in this thread
        self.active_threads: set[str] = set()  # the threads that made it current

    @contextlib.contextmanager
    def active(self):
        self._current.depth = getattr(self._current, "depth", 0) + 1
        self.active_threads.add(threading.current_thread().name)
        try:
            yield
        finally:
            self._current.depth -= 1

    def _check_current(self):
        assert getattr(self._current, "depth", 0) > 0, (
            f"the device used in thread {threading.current_thread().name!r} without its context current"
        )

    def alloc(self, nbytes):
        self._check_current()
        ptr = self._next
        self._next += (nbytes + 0xFFF) // 0x1000 * 0x1000 + 0x1000
        self.memory[ptr] = np.full(nbytes, 0xCD, np.uint8)  # garbage, like cudaMalloc
        return ptr

    def free(self, ptr):
        self._check_current()
        del self.memory[ptr]  # KeyError on a double free

    def host_array(self, shape, dtype):
        self._check_current()
        array = np.zeros(shape, dtype)
        self.pinned.append(id(array))
        return array

    def free_host(self, array):
        self._check_current()
        self.pinned.remove(id(array))

    def create_stream(self):
        self._check_current()
        self.streams.append("stream")
        return "stream"

    def stream_handle(self, stream):
        return 1234

    def destroy_stream(self, stream):
        self._check_current()
        self.streams.remove(stream)

    def copy_to_device(self, dst, src, stream):
        self._check_current()
        assert src.flags.c_contiguous
        raw = src.view(np.uint8).ravel()
        assert raw.size <= self.memory[dst].size, "copy past the end of a device buffer"
        self.memory[dst][: raw.size] = raw
        self.calls["htod"] += 1

    def copy_to_host(self, dst, src, stream):
        self._check_current()
        n = dst.nbytes
        assert n <= self.memory[src].size
        dst[...] = self.memory[src][:n].view(dst.dtype).reshape(dst.shape)
        self.calls["dtoh"] += 1

    def synchronize(self, stream):
        self._check_current()
        self.calls["sync"] += 1

    def close(self):
        self.closed = True

    # for the fake engine
    def read(self, ptr, shape, dtype):
        self._check_current()  # TensorRT runs in the caller's current context
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.memory[ptr][:n].view(dtype).reshape(shape).copy()

    def write(self, ptr, array):
        self._check_current()
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        assert raw.size <= self.memory[ptr].size, "engine wrote past a buffer"
        self.memory[ptr][: raw.size] = raw


_ONNX_TO_NP = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16}


def _runs_at(onnx_bytes: bytes, model, shapes: dict) -> bool:
    """Whether the graph runs with its inputs at ``shapes`` (zeros: valid indices, as TensorRT
    checks shapes, not values). TensorRT's builder checks the network's shape constraints at the
    profile's opt shapes and fails the build when one breaks ("kOPT values for profile 0 violate
    shape constraints: IShuffleLayer ...: reshape would change volume", NVIDIA/TensorRT issues
    3405 and 3916; min and max that break one only warn, issue 1947)."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    feeds = {name: np.zeros(shape, _ONNX_TO_NP[elem[name]]) for name, shape in shapes.items()}
    try:
        session.run(None, feeds)
    except Exception:  # noqa: BLE001 - onnxruntime's errors have no common public base
        return False
    return True


def make_fake_trt(version: str, device: FakeDevice):
    """A ``tensorrt`` module with the attributes of ``version`` and the calls edgecap uses."""
    v = parse_version(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.stats = {"builds": [], "deserialized": 0, "executions": []}

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    flags = {}
    if v < (11, 0):
        flags["EXPLICIT_BATCH"] = 0
    if v >= (10, 0):
        flags["STRONGLY_TYPED"] = 5
    builder_flags = {"PREFER_PRECISION_CONSTRAINTS": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "TF32": 7}
    if v < (11, 0):
        builder_flags["FP16"] = 0
    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.BuilderFlag = types.SimpleNamespace(**builder_flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.LayerType = types.SimpleNamespace(
        SOFTMAX="softmax", TOPK="topk", UNARY="unary", SHUFFLE="shuffle", OTHER="other"
    )
    trt.float32, trt.float16, trt.int32, trt.int64, trt.bool = 1, 10, 6, 7, 9
    trt.nptype = lambda dt: _ONNX_TO_NP[dt]

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype

    class Layer:
        """A parsed layer with named, typed inputs and outputs (their ONNX types; INT64 as
        INT32 and TopK's indices INT32, as TensorRT's ONNX parser makes them). A float
        precision on a layer whose tensors are all integer or bool is refused (NvInfer.h,
        ILayer::setPrecision: such a layer's precision must be its input or output type)."""

        def __init__(self, kind, inputs=(), outputs=()):
            self.type, self._precision, self.output_types = kind, None, {}
            self.inputs = [Tensor(name, dtype) for name, dtype in inputs]
            self.outputs = [Tensor(name, dtype) for name, dtype in outputs]

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, dtype):
            floats = (trt.float32, trt.float16)
            assert any(t.dtype in floats for t in (*self.inputs, *self.outputs)) or dtype not in floats, (
                f"precision {dtype} on a {self.type} layer of integer / bool tensors "
                f"{[t.name for t in (*self.inputs, *self.outputs)]}"
            )
            self._precision = dtype

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dtype):
            # retyping TopK's INT32 indices (or any integer tensor) to a float is a bug
            assert self.outputs[i].dtype in (trt.float32, trt.float16), (
                f"set_output_type({i}, {dtype}) on an {self.outputs[i].dtype} output"
            )
            self.output_types[i] = dtype

    class Network:
        def __init__(self, flags):
            valid = sum(1 << f for f in flags_values)
            assert flags & ~valid == 0, "unknown network flag"
            self.flags, self.inputs, self.layers, self.onnx = flags, [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    flags_values = list(flags.values())
    shuffles = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose"}

    onnx_types = {1: trt.float32, 10: trt.float16, 6: trt.int32, 7: trt.int32, 9: trt.bool}

    def fake_layers(node, typed):
        """The layers TensorRT's ONNX parser makes of one node (LogSoftmax: Softmax + Log);
        ``typed``: a tensor name -> (name, its type)."""
        if node.op_type == "LogSoftmax":
            mid = (node.output[0] + "/softmax", trt.float32)
            return [
                Layer("softmax", [typed(node.input[0])], [mid]),
                Layer("unary", [mid], [typed(node.output[0])]),
            ]
        if node.op_type == "Gemm":  # a matrix product, then the bias added (C, when given)
            product = (f"(Unnamed Layer* {id(node)}) [Matrix Multiply]_output", trt.float32)
            return [
                Layer("matmul", [typed(i) for i in node.input[:2]], [product]),
                Layer("other", [product, *(typed(i) for i in node.input[2:] if i)], [typed(node.output[0])]),
            ]
        if node.op_type == "TopK":
            return [
                Layer("topk", [typed(node.input[0])], [typed(node.output[0]), (node.output[1], trt.int32)])
            ]
        kind = {"Softmax": "softmax"}.get(node.op_type, "shuffle" if node.op_type in shuffles else "other")
        return [Layer(kind, [typed(i) for i in node.input if i], [typed(o) for o in node.output])]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse(self, data):
            try:
                model = onnx.load_from_string(data)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(str(exc))
                return False
            # TensorRT 8.6 to 10.x refuse a Slice whose axes are computed, even from constants
            # (onnx-tensorrt's importSlice: axes.allValuesKnown(); engines/README.md)
            stored = {t.name for t in model.graph.initializer}
            stored |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
            for i, n in enumerate(model.graph.node):
                if n.op_type == "Slice" and len(n.input) > 3 and n.input[3] and n.input[3] not in stored:
                    self.errors.append(
                        f"In node {i} with name: {n.name} and operator: Slice (importSlice): "
                        "UNSUPPORTED_NODE: Assertion failed: axes.allValuesKnown()"
                    )
                    return False
            self.network.onnx = data
            for vi in model.graph.input:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim
                )
                self.network.inputs.append(types.SimpleNamespace(name=vi.name, shape=dims))
            graph = onnx.shape_inference.infer_shapes(model).graph
            elem = {
                v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)
            }
            elem.update({t.name: t.data_type for t in graph.initializer})

            def typed(name):
                return name, onnx_types.get(elem.get(name), trt.float32)

            self.network.layers = []
            for n in model.graph.node:
                self.network.layers.extend(fake_layers(n, typed))
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"t"

    class Config:
        def __init__(self):
            # TF32 on by default, as in TensorRT (BuilderFlag.TF32: "Enabled by default")
            self.flags, self.profiles, self.pool, self.cache = {trt.BuilderFlag.TF32}, [], {}, None

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            # None for bytes that are not a timing cache (NvInfer.h returns a null pointer)
            return None if bytes(data).startswith(b"garbage") else TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            # a cache from another GPU is refused unless the mismatch is ignored
            if cache.data.startswith(b"other-gpu") and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):  # as pybind's checks raise
                raise RuntimeError("min <= opt <= max does not hold")
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert len(config.profiles) == 1
            model = onnx.load_from_string(network.onnx)
            opt = {name: shapes[1] for name, shapes in config.profiles[0].shapes.items()}
            if not _runs_at(network.onnx, model, opt):
                return None  # TensorRT logs the violated constraint and returns no engine
            # a weakly typed network's layer precisions and output types bind TensorRT only
            # under PREFER_ or OBEY_PRECISION_CONSTRAINTS; without either it takes them only
            # where they make the engine faster (its guide, "Layer-Level Control of Precision")
            flags = trt.BuilderFlag
            bound = {flags.PREFER_PRECISION_CONSTRAINTS, flags.OBEY_PRECISION_CONSTRAINTS} & config.flags
            constrained = network.layers if bound else []
            record = {
                "version": version,
                "network_flags": network.flags,
                "builder_flags": sorted(config.flags),
                "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                "fp16_weights": any(t.data_type == 10 for t in model.graph.initializer),
                "pinned": [layer.type for layer in constrained if layer.precision == 1],
                "pinned_outputs": sorted(
                    t.name for layer in constrained if layer.precision == 1 for t in layer.outputs
                ),
                "retyped": [
                    [layer.type, j, t] for layer in constrained for j, t in sorted(layer.output_types.items())
                ],
                "timing_cache_in": config.cache.data.decode() if config.cache else None,
            }
            trt.stats["builds"].append({**record, "onnx": network.onnx})
            # the engine: MAGIC, the record's length (8 bytes) and JSON, then the ONNX bytes as
            # they are (no base64 inside the JSON: the encoder's megabytes, built many times)
            header = json.dumps(record).encode()
            return MAGIC + len(header).to_bytes(8, "little") + header + network.onnx

    class Engine:
        def __init__(self, record, onnx_bytes):
            self.record = record
            model = onnx.load_from_string(onnx_bytes)
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.io = {}
            for vi, mode in [(x, "input") for x in model.graph.input] + [
                (x, "output") for x in model.graph.output
            ]:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim
                )
                self.io[vi.name] = (mode, vi.type.tensor_type.elem_type, dims)
            self.names = list(self.io)

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def get_tensor_shape(self, name):
            return self.io[name][2]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.record["profile"][name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            assert name in self.engine.io
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            assert stream_handle == 1234
            feeds = {}
            for name, (mode, dtype, _) in self.engine.io.items():
                if mode == "input":
                    feeds[name] = device.read(self.addresses[name], self.shapes[name], _ONNX_TO_NP[dtype])
            outputs = [n for n, (m, _, _) in self.engine.io.items() if m == "output"]
            for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
                device.write(self.addresses[name], value)
            trt.stats["executions"].append(dict(self.addresses))
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            if not data.startswith(MAGIC):
                return None
            length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
            start = len(MAGIC) + 8
            record = json.loads(data[start : start + length])
            if record["version"] != version:
                return None
            trt.stats["deserialized"] += 1
            return Engine(record, bytes(data[start + length :]))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(any_model_dir) -> Path:
    return any_model_dir


@pytest.fixture
def device():
    return FakeDevice()


def install(monkeypatch, version, device):
    trt = make_fake_trt(version, device)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def reference_run(manifest, images, image_index, steps):
    """Plain onnxruntime: the numbers the TensorRT backend must reproduce."""
    enc = ort.InferenceSession(str(manifest.path("encoder")), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(manifest.path("decoder_step")), providers=["CPUExecutionProvider"])
    features, att_proj, h, c, _ = enc.run(None, {"image": images})
    results = []
    for tokens, source_rows, bias in steps:
        if bias is None:
            bias = np.zeros((len(tokens), manifest.dims.vocab_size), np.float32)
        lp, ids, h, c, alpha = step.run(
            None,
            {
                "tokens": tokens,
                "h": h,
                "c": c,
                "source_rows": source_rows,
                "features": features,
                "att_proj": att_proj,
                "image_index": image_index,
                "word_bias": bias,
            },
        )
        results.append((lp, ids, alpha))
    return results


def class_probs(manifest, images):
    enc = ort.InferenceSession(str(manifest.path("encoder")), providers=["CPUExecutionProvider"])
    return enc.run(["class_probs"], {"image": images})[0]


def some_steps(manifest, rows, n_steps=4, seed=0):
    """(tokens, source_rows, word_bias) per step; the third step steers every row to the last
    word of the vocabulary, the others have no bias."""
    rng = np.random.default_rng(seed)
    V = manifest.dims.vocab_size
    image_index = np.repeat(np.arange(rows // 3, dtype=np.int32), 3)
    steps = [(np.full(rows, manifest.tokens["start"], np.int32), image_index.copy(), None)]
    for i in range(n_steps - 1):
        tokens = rng.integers(0, V, rows).astype(np.int32)
        # reorder beams within each image, as the search does (integer source rows)
        source = np.concatenate([3 * i + rng.permutation(3) for i in range(rows // 3)])
        bias = None
        if i == 1:
            bias = np.zeros((rows, V), np.float32)
            bias[:, V - 1] = 50.0
        steps.append((tokens, source.astype(np.int32), bias))
    return image_index, steps


# -- version handling ---------------------------------------------------------------------------


def test_fake_tensorrt_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"pip install .*'\.\[tensorrt\]'.*python3-libnvinfer"):
        import_tensorrt()


def test_tensorrt_stubs_alone_are_not_tensorrt(monkeypatch):
    """pip install tensorrt-stubs (CI installs it for the type check) makes ``import tensorrt``
    find a namespace package of .pyi files: no __version__, no API."""
    from edgecap.trt import tensorrt_importable

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendError, match=r"type stubs, not the library.*'\.\[tensorrt\]'"):
        import_tensorrt()
    assert not tensorrt_importable()


@pytest.mark.parametrize("version", ["8.5.2.2", "8.2.1.8", "7.1.3"])
def test_fake_tensorrt_too_old(version):
    with pytest.raises(BackendError, match="8.6 or newer.*JetPack 5 .TensorRT 8.5.*JetPack 4.6"):
        check_version(version)


@pytest.mark.parametrize(
    "version,explicit_batch,strongly_typed,fp16_flag,fp16_onnx",
    [
        ("8.6.2.3", True, False, True, False),  # JetPack 6.0
        ("10.3.0.30", False, False, True, False),  # JetPack 6.1 / 6.2
        ("10.12.0.36", False, True, False, True),  # FP16 flag deprecated: strongly typed FP16 ONNX
        ("11.0.0.1", False, True, False, True),  # no FP16 flag, no explicit-batch flag
    ],
)
def test_fake_build_version_branches(
    monkeypatch, tmp_path, model_dir, device, version, explicit_batch, strongly_typed, fp16_flag, fp16_onnx
):
    if fp16_onnx:  # the fake's shape check runs the FP16 graph on onnxruntime
        needs_onnxruntime_for_opset_18(model_dir, "running an FP16 LayerNormalization")
    trt = install(monkeypatch, version, device)
    manifest = load_manifest(model_dir)
    paths = build_all(
        manifest, "fp16", Limits(4, 3), tmp_path, device=device, log=io.StringIO(), fp32_encoder=False
    )
    assert [p.exists() for p in paths] == [True, True]
    for record in trt.stats["builds"]:  # both graphs FP16
        flags = record["network_flags"]
        assert bool(flags & 1) == explicit_batch  # EXPLICIT_BATCH = bit 0
        assert bool(flags & (1 << 5)) == strongly_typed  # STRONGLY_TYPED = bit 5
        assert (0 in record["builder_flags"]) == fp16_flag  # BuilderFlag.FP16 = 0
        assert 7 not in record["builder_flags"]  # TF32 (on by default) cleared: FP32 layers are FP32
        assert record["fp16_weights"] == fp16_onnx
    step = trt.stats["builds"][1]
    if fp16_flag:  # weakly typed FP16: the FP16 ONNX's FP32 islands pinned to FP32
        assert {"softmax", "topk", "unary"} <= set(step["pinned"])
        # only float outputs retyped: TopK's values (output 0), never its INT32 indices
        assert [[t, j] for t, j, _ in step["retyped"] if t == "topk"] == [["topk", 0]]
        assert all(dtype == trt.float32 for _, _, dtype in step["retyped"])
    else:
        assert step["pinned"] == [] and step["retyped"] == []
    assert not device.memory  # building allocates nothing on the device
    if fp16_flag:
        # The islands are named nodes (fp32_islands): the exporter names them after the PyTorch
        # modules; the stand-in built with onnx helpers, without torch, names none.
        if importlib.util.find_spec("torch") is None:
            pytest.skip("the islands need the model exported from PyTorch (torch is not installed)")
        assert "matmul" in step["pinned"]  # the word logits' Gemm: its product too, not only the bias
        for record, path in zip(trt.stats["builds"], paths):
            role = path.name.split("-")[0]
            islands = fp32_islands(next(tmp_path.glob(f"{role}-*-folded.onnx")))
            pinned = set(record["pinned_outputs"])
            assert islands.tensors <= pinned, role  # every island tensor is computed in FP32
            # and nothing else but the parser's own tensors inside an island's node (a Gemm's
            # product, a LogSoftmax's softmax): no other ONNX tensor
            assert pinned & islands.named == islands.tensors, role


def test_fake_fp16_engines_run_the_step_in_fp16_behind_an_fp32_encoder(
    monkeypatch, tmp_path, model_dir, device
):
    """FP16 engines of an FP32 model directory: the decoder step FP16, the encoder FP32 (the FP16
    that keeps the captions: 98.6-99.4% of FP32's in torch's FP16 emulation, 92% with the encoder in
    FP16 too; docs/gpu-search.md). ``edgecap build``'s engines are the ones the backend loads;
    ``fp32_encoder=False`` builds the encoder FP16 too; an FP16 model directory has FP16 engines
    only, and asking it for an FP32 encoder is refused before anything is built."""
    import dataclasses

    from edgecap.errors import ModelError

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    paths = build_all(manifest, "fp16", Limits(1, 3), tmp_path, device=device, log=io.StringIO())
    assert [p.name.split("-")[0] for p in paths] == ["encoder", "decoder_step"]
    assert "-fp32-" in paths[0].name and "-fp16-" in paths[1].name
    encoder, step = trt.stats["builds"]
    assert 0 not in encoder["builder_flags"] and encoder["pinned"] == []  # BuilderFlag.FP16 = 0
    assert 0 in step["builder_flags"]
    with TensorRTBackend(
        manifest, "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=io.StringIO()
    ) as b:
        assert len(trt.stats["builds"]) == 2  # build's engines, none built again
        assert b.precisions == {"encoder": "fp32", "decoder_step": "fp16"}

    log = io.StringIO()
    with TensorRTBackend(
        manifest, "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=log, fp32_encoder=False
    ) as b:
        assert len(trt.stats["builds"]) == 3 and 0 in trt.stats["builds"][2]["builder_flags"]
        assert "fp16 encoder engine" in log.getvalue()
        assert "tensorrt 10.3.0.30 fp16 on Orin" in b.describe()

    half = dataclasses.replace(manifest, precision="fp16")
    assert role_precisions(half, "fp16") == {"encoder": "fp16", "decoder_step": "fp16"}
    assert role_precisions(manifest, "fp32") == {"encoder": "fp32", "decoder_step": "fp32"}
    # asked for in so many words: an FP32 encoder from the fp32 model, an FP16 one from either
    assert role_precisions(manifest, "fp16", fp32_encoder=True) == {"encoder": "fp32", "decoder_step": "fp16"}
    assert role_precisions(half, "fp16", fp32_encoder=False) == {"encoder": "fp16", "decoder_step": "fp16"}
    with pytest.raises(ModelError, match="is fp16: an FP32 encoder engine is built from the fp32 model"):
        TensorRTBackend(half, "fp16", Limits(1, 3), tmp_path, cuda_device=device, fp32_encoder=True)
    with pytest.raises(ValueError, match="fp32_encoder=True goes with fp16 engines"):
        build_all(manifest, "fp32", Limits(1, 3), tmp_path, device=device, fp32_encoder=True)
    assert len(trt.stats["builds"]) == 3 and not device.memory


def test_fake_int8_model_directory_is_refused_for_what_it_is_whatever_the_encoder(
    monkeypatch, tmp_path, model_dir, device
):
    """An int8 model directory gives no TensorRT engines (engines/README.md: FP16 or FP32, from an
    fp32 or fp16 model directory), whichever encoder precision is asked for: the refusal names
    int8 and does not send the user to ``fp32_encoder=False`` (refused in turn for the same
    reason); it comes before the engine cache is searched, and nothing is built."""
    import dataclasses

    from edgecap.errors import ModelError

    trt = install(monkeypatch, "10.3.0.30", device)
    int8 = dataclasses.replace(load_manifest(model_dir), precision="int8")
    for fp32_encoder in (None, True, False):
        log = io.StringIO()
        with pytest.raises(ModelError, match="not int8") as refused:
            TensorRTBackend(
                int8, "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=log, fp32_encoder=fp32_encoder
            )
        assert "fp32_encoder=False" not in str(refused.value), fp32_encoder
        assert log.getvalue() == "", fp32_encoder  # refused before looking for engines
    with pytest.raises(ModelError, match="not int8"):
        build_all(int8, "fp16", Limits(1, 3), tmp_path, device=device, fp32_encoder=True)
    assert trt.stats["builds"] == [] and list(tmp_path.glob("*.engine")) == [] and not device.memory


def test_fake_build_fp32_on_11_is_strongly_typed_without_fp16(monkeypatch, tmp_path, model_dir, device):
    trt = install(monkeypatch, "11.0.0.1", device)
    build_all(load_manifest(model_dir), "fp32", Limits(2, 2), tmp_path, device=device, log=io.StringIO())
    assert all(not r["fp16_weights"] and r["builder_flags"] == [] for r in trt.stats["builds"])
    # every TensorRT 11 network is strongly typed: STRONGLY_TYPED (bit 5), no EXPLICIT_BATCH
    assert [r["network_flags"] for r in trt.stats["builds"]] == [1 << 5, 1 << 5]


# -- profile shapes and cache keys --------------------------------------------------------------


def test_fake_profile_shapes_cover_rows_images_and_state():
    limits = Limits(max_batch=8, max_beam=5)
    step = profile_shapes(
        "decoder_step",
        {
            "tokens": (-1,),
            "h": (-1, 512),
            "c": (-1, 512),
            "source_rows": (-1,),
            "features": (-1, 49, 512),
            "att_proj": (-1, 49, 256),
            "image_index": (-1,),
            "word_bias": (-1, 2538),
        },
        limits,
    )
    assert step["tokens"] == ((1,), (5,), (40,))
    assert step["word_bias"] == ((1, 2538), (5, 2538), (40, 2538))
    assert step["h"] == ((1, 512), (5, 512), (40, 512))  # S: N on the first step, R after
    assert step["features"] == ((1, 49, 512), (1, 49, 512), (8, 49, 512))
    enc = profile_shapes("encoder", {"image": (-1, 3, 224, 224)}, limits)
    assert enc["image"] == ((1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))
    from edgecap.errors import ModelError

    with pytest.raises(ModelError, match="only the first"):
        profile_shapes("encoder", {"image": (-1, 3, -1, -1)}, limits)
    with pytest.raises(ModelError, match="contract"):
        profile_shapes("encoder", {"pixels": (-1, 3, 8, 8)}, limits)
    with pytest.raises(ValueError):
        Limits(0, 5)


def test_fake_engine_filename_encodes_everything():
    target = Target("NVIDIA GeForce RTX 4090", (8, 9), "10.3.0.26")
    name = engine_filename("decoder_step", "ab" * 32, target, "fp16", Limits(8, 5))
    assert name == (
        f"decoder_step-abababababababab-nvidia-geforce-rtx-4090-sm89-trt10.3.0.26-fp16-r{BUILD_RECIPE}-b8k5.engine"
    )
    names = {
        engine_filename(r, h, t, p, lim)
        for r in ("encoder", "decoder_step")
        for h in ("a" * 64, "b" * 64)
        for t in (target, Target("Orin", (8, 7), "10.3.0.26"), Target("Orin", (8, 7), "8.6.2"))
        for p in ("fp16", "fp32")
        for lim in (Limits(8, 5), Limits(8, 3), Limits(4, 5))
    }
    # encoder names ignore max_beam (the encoder engine does not depend on it)
    assert len(names) == 2 * 3 * 2 * (3 + 2)


def test_fake_engine_cache_reuse_rebuild_and_timing_cache(monkeypatch, tmp_path, model_dir, device):
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = EngineCache(trt, Target(device.name, device.compute_capability, trt.__version__), tmp_path, log)
    limits = Limits(2, 3)
    cache.load(manifest, "encoder", "fp16", limits)
    assert len(trt.stats["builds"]) == 1 and "no cached TensorRT engine" in log.getvalue()
    timing = list(tmp_path.glob("timing-orin-sm87-trt10.3.0.30.cache"))
    assert timing and timing[0].read_bytes() == b"t"

    cache.load(manifest, "encoder", "fp16", limits)  # from the cache: no build
    assert len(trt.stats["builds"]) == 1

    cache.load(manifest, "decoder_step", "fp16", limits)  # the timing cache is reused
    assert trt.stats["builds"][-1]["timing_cache_in"] == "t"

    engine_path = cache.path(manifest, "encoder", "fp16", limits)
    engine_path.write_bytes(b"truncated")  # fails to deserialize: rebuilt
    cache.load(manifest, "encoder", "fp16", limits)
    assert len(trt.stats["builds"]) == 3 and "rebuilding" in log.getvalue()
    assert engine_path.read_bytes().startswith(MAGIC)

    # an engine from another TensorRT version does not load there: rebuilt under a new name
    trt11 = install(monkeypatch, "11.0.0.1", device)
    other = EngineCache(trt11, Target(device.name, device.compute_capability, "11.0.0.1"), tmp_path, log)
    assert other.path(manifest, "encoder", "fp16", limits) != engine_path


def test_fake_timing_cache_unreadable_or_refused_never_fails_the_build(
    monkeypatch, tmp_path, model_dir, device
):
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = EngineCache(trt, Target(device.name, device.compute_capability, trt.__version__), tmp_path, log)
    timing = tmp_path / "timing-orin-sm87-trt10.3.0.30.cache"
    timing.write_bytes(b"garbage: not a timing cache")  # a file cut short, another program's
    cache.build(manifest, "encoder", "fp32", Limits(1, 1))
    assert "could not be read; starting a new one" in log.getvalue()
    assert trt.stats["builds"][-1]["timing_cache_in"] == "" and timing.read_bytes() == b"t"  # replaced

    timing.write_bytes(b"other-gpu")  # TensorRT refuses a cache made on another GPU
    cache.build(manifest, "decoder_step", "fp32", Limits(1, 1))
    assert "refused the timing cache" in log.getvalue()
    assert trt.stats["builds"][-1]["timing_cache_in"] is None and timing.read_bytes() == b"other-gpu"


def test_fake_engine_cache_files_reach_the_disk_before_their_names(monkeypatch, tmp_path, model_dir, device):
    """Every file the engine cache writes (the engine, the timing cache) is flushed to the disk
    (fsync of the file holding the whole data) before the rename gives it its name, so that a
    power cut cannot leave an engine's name on data that never reached the disk."""
    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name, Path(src).stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(engines.os, "fsync", fsync)
    monkeypatch.setattr(engines.os, "replace", replace)
    _cache(trt, device, tmp_path, io.StringIO()).build(
        load_manifest(model_dir), "encoder", "fp32", Limits(1, 1)
    )
    renamed = [e for e in events if e[0] == "replace"]
    assert {name.rsplit(".", 1)[-1] for _, name, _ in renamed} >= {"engine", "cache"}
    for i, event in enumerate(events):
        if event[0] == "replace":
            assert i > 0 and events[i - 1] == ("fsync", event[2]), events


@pytest.mark.skipif(os.name != "posix", reason="orphans are found by pid on POSIX only")
def test_fake_engine_cache_removes_what_dead_writers_left(monkeypatch, tmp_path, model_dir, device):
    """A build killed mid-write (a power cut) leaves its temporary file, named for its process:
    the next write of that file removes it when that process no longer runs, and keeps a running
    process's (another build writing the same engine now) and files of other names."""
    import subprocess

    trt = install(monkeypatch, "10.3.0.30", device)
    cache = _cache(trt, device, tmp_path, io.StringIO())
    manifest = load_manifest(model_dir)
    cache.build(manifest, "encoder", "fp32", Limits(1, 1))
    (engine,) = tmp_path.glob("encoder-*.engine")
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)  # a process that has ended
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    running = writer.pid  # a build writing the same engine now: asked whether it runs, not signalled
    names = {
        "dead": f".{engine.name}.{dead}.tmp",
        "dead, named as now": f".{engine.name}.{dead}.0a1b2c3d.tmp",
        "this pid's, from before": f".{engine.name}.{os.getpid()}.tmp",
        "running": f".{engine.name}.{running}.tmp",
        "other file": f".timing-other.cache.{dead}.tmp",
        "not a pid": f".{engine.name}.x1.tmp",
    }
    an_hour_ago = time.time() - 3600
    for name in names.values():
        (tmp_path / name).write_bytes(b"half an engine")
        os.utime(tmp_path / name, (an_hour_ago, an_hour_ago))
    # written to a moment ago: maybe a build in another container (its pid not seen here)
    (tmp_path / f".{engine.name}.{dead}.ffffffff.tmp").write_bytes(b"being written")
    engine.unlink()  # built again: written again
    try:
        cache.build(manifest, "encoder", "fp32", Limits(1, 1))
        assert writer.poll() is None  # still running (os.kill with signal 0 sends nothing)
    finally:
        writer.kill()
        writer.wait()
    assert engine.exists()
    assert {kind for kind, name in names.items() if (tmp_path / name).exists()} == {
        "running",
        "other file",
        "not a pid",
    }
    assert (tmp_path / f".{engine.name}.{dead}.ffffffff.tmp").exists()


def test_fake_engine_cache_two_writers_of_one_engine_both_save_it(tmp_path):
    """Two threads of one process (or two containers' processes of one pid, sharing a mounted
    cache) writing the same engine at once: each through a temporary file of its own. With the
    pid alone in its name the second's rename found it gone (FileNotFoundError, "cannot save
    TensorRT engines ... choose a writable cache folder") or named the first's half-written file."""
    from edgecap.trt.engines import _atomic_write

    path = tmp_path / "encoder-x.engine"
    payloads = [bytes([65 + i]) * (16 << 20) for i in range(2)]
    errors: list = []
    start = threading.Barrier(2)

    def write(i):
        start.wait()
        try:
            _atomic_write(path, payloads[i])
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and path.read_bytes() in payloads
    assert list(tmp_path.glob("*.tmp")) == []


def test_fake_build_refused_shapes_are_a_backend_error(monkeypatch, tmp_path, model_dir, device):
    import edgecap.trt.engines as engines

    install(monkeypatch, "10.3.0.30", device)
    monkeypatch.setattr(
        engines,
        "profile_shapes",
        lambda *a: {"image": ((2, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))},
    )
    with pytest.raises(BackendError, match="refused the encoder engine's shapes for 'image'"):
        build_all(load_manifest(model_dir), "fp32", Limits(2, 2), tmp_path, device=device, log=io.StringIO())


def _cache(trt, device, tmp_path, log):
    return EngineCache(trt, Target(device.name, device.compute_capability, trt.__version__), tmp_path, log)


def test_fake_engine_cache_reuses_any_covering_engine(monkeypatch, tmp_path, model_dir, device):
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = _cache(trt, device, tmp_path, log)
    for role in ("encoder", "decoder_step"):
        cache.build(manifest, role, "fp16", Limits(8, 5))  # what `edgecap build` makes
    assert len(trt.stats["builds"]) == 2
    log.seek(0)
    log.truncate()

    def profile_max(engine, name):
        return engine.record["profile"][name][2][0]

    # smaller requests are served by the 8 x 5 engines: no build
    for limits in (Limits(4, 3), Limits(8, 5), Limits(1, 1), Limits(8, 2)):
        enc = cache.load(manifest, "encoder", "fp16", limits)
        step = cache.load(manifest, "decoder_step", "fp16", limits)
        assert profile_max(enc, "image") == 8 and profile_max(step, "tokens") == 40
    assert len(trt.stats["builds"]) == 2 and log.getvalue() == ""

    # not covered: more images, or more beams (the encoder ignores beams)
    cache.load(manifest, "decoder_step", "fp16", Limits(8, 6))
    assert len(trt.stats["builds"]) == 3
    assert cache.load(manifest, "encoder", "fp16", Limits(8, 6)) and len(trt.stats["builds"]) == 3
    cache.load(manifest, "decoder_step", "fp16", Limits(16, 5))
    assert len(trt.stats["builds"]) == 4
    # another precision never matches
    cache.load(manifest, "encoder", "fp32", Limits(2, 2))
    assert len(trt.stats["builds"]) == 5
    # the narrowest covering engine wins: b8k5 (40 rows) over b8k6 and b16k5
    assert profile_max(cache.load(manifest, "decoder_step", "fp16", Limits(2, 2)), "tokens") == 40
    # a covering engine that does not load is skipped; an exact one is built
    builds = len(trt.stats["builds"])
    for path in cache.covering(manifest, "decoder_step", "fp16", Limits(7, 5)):
        path.write_bytes(b"truncated")
    step = cache.load(manifest, "decoder_step", "fp16", Limits(7, 5))
    assert len(trt.stats["builds"]) == builds + 1 and "skipping it" in log.getvalue()
    assert profile_max(step, "tokens") == 35
    # other models' engines and unrelated files are never candidates
    (tmp_path / "decoder_step-0000000000000000-orin-sm87-trt10.3.0.30-fp16-b9k9.engine").write_bytes(b"x")
    wide = cache.path(manifest, "decoder_step", "fp16", Limits(9, 9)).name
    (tmp_path / wide.replace("b9k9", "bXkY")).write_bytes(b"x")
    # ... nor are the engines an edgecap of another build recipe (or of none, before it) made
    for older in (
        wide.replace(f"-r{BUILD_RECIPE}-", f"-r{BUILD_RECIPE - 1}-"),
        wide.replace(f"-r{BUILD_RECIPE}", ""),
    ):
        (tmp_path / older).write_bytes(b"x")
    assert all(
        "b9k9" not in p.name and "bXkY" not in p.name
        for p in cache.covering(manifest, "decoder_step", "fp16", Limits(1, 1))
    )


def test_fake_covering_engines_hold_every_image_and_come_fewest_rows_first(
    monkeypatch, tmp_path, model_dir, device
):
    """engines/README.md, "Which engines get used": a cached engine is used when its limits
    cover the request (at least as many images and beams), the narrowest when several do. The
    limits are read from the file names, so empty files stand for three cached step engines:
    b8k3 (8 x 3 = 24 rows), b4k10 (40 rows), b2k5 (10 rows). Nothing is built or loaded."""
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())

    def cached(batch, beam):
        path = cache.path(manifest, "decoder_step", "fp16", Limits(batch, beam))
        path.write_bytes(b"")
        return path

    b8k3, b4k10, b2k5 = cached(8, 3), cached(4, 10), cached(2, 5)

    def covering(batch, beam):
        return cache.covering(manifest, "decoder_step", "fp16", Limits(batch, beam))

    assert covering(2, 2) == [b2k5, b8k3, b4k10]  # 10, 24, 40 rows (not 2, 4, 8 images first)
    assert covering(3, 3) == [b8k3, b4k10]  # b2k5 holds 2 images, not 3
    assert covering(8, 3) == [b8k3]  # the cached limits exactly
    assert covering(9, 3) == []  # one image more than any holds
    assert covering(4, 4) == [b4k10]
    assert trt.stats["builds"] == [] and trt.stats["deserialized"] == 0


def test_fake_fp32_and_fp16_engines_in_one_cache_get_their_own_graphs(
    monkeypatch, tmp_path, model_dir, device
):
    """TensorRT >= 10.12 builds FP16 engines from an FP16 copy of an FP32 model, kept in the
    engine cache (engines/README.md); an fp32 engine built in the same cache afterwards is built
    from the FP32 graph ("--precision fp32 builds full-precision engines"), and an fp16 one
    after it from the FP16 copy again."""
    needs_onnxruntime_for_opset_18(model_dir, "running an FP16 LayerNormalization")
    trt = install(monkeypatch, "10.12.0.36", device)
    manifest = load_manifest(model_dir)
    assert manifest.precision == "fp32"
    cache = _cache(trt, device, tmp_path, io.StringIO())
    for precision in ("fp16", "fp32", "fp16"):
        cache.build(manifest, "encoder", precision, Limits(1, 1))
    assert [build["fp16_weights"] for build in trt.stats["builds"]] == [True, False, True]


def test_fake_an_engine_write_cut_short_leaves_nothing_behind(monkeypatch, tmp_path, model_dir, device):
    """engines/README.md: "Files are written to a temporary name and then renamed, so an
    interrupted build never leaves a half-written engine behind." A disk that fills up halfway
    through the engine (the folded ONNX copy and the timing cache are written whole): while it
    is being written no engine is in the cache (a power cut there leaves none to load), the
    build fails saying so, no engine file and no partly written temporary file are left, and
    the next load builds the engine anew."""
    import builtins

    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = _cache(trt, device, tmp_path, log)
    limits = Limits(1, 1)
    real_open = builtins.open
    mid_write = []  # the cache's engines while half the engine is written

    class FillsUp:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if bytes(data[: len(MAGIC)]) == MAGIC:  # the engine
                self.file.write(data[: len(data) // 2])
                mid_write.append(cache.covering(manifest, "encoder", "fp32", limits))
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def flush(self):
            self.file.flush()

        def fileno(self):
            return self.file.fileno()

    monkeypatch.setattr(engines, "open", FillsUp, raising=False)
    with pytest.raises(BackendError, match="cannot save TensorRT engines.*No space left on device"):
        cache.build(manifest, "encoder", "fp32", limits)
    monkeypatch.delattr(engines, "open")
    assert mid_write == [[]]  # a power cut there would leave no engine to load
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [p for p in left if p.endswith("-folded.onnx") or p.startswith("timing-")], left
    assert cache.covering(manifest, "encoder", "fp32", limits) == []
    assert cache.load(manifest, "encoder", "fp32", limits) is not None
    assert len(trt.stats["builds"]) == 2 and "no cached TensorRT engine" in log.getvalue()


def test_fake_a_truncated_engine_that_tensorrt_raises_on_is_rebuilt(monkeypatch, tmp_path, model_dir, device):
    """A cached engine cut short inside its header: this fake runtime raises on it, as TensorRT
    does for some faults (others return None). The module docstring and engines/README.md: a
    cached engine that fails to load is skipped and one for the requested limits is built."""
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = _cache(trt, device, tmp_path, log)
    limits = Limits(1, 1)
    path = cache.build(manifest, "encoder", "fp32", limits)
    path.write_bytes(path.read_bytes()[: len(MAGIC) + 8 + 10])
    with pytest.raises(ValueError):  # the fake's JSON header, cut short
        trt.Runtime(None).deserialize_cuda_engine(path.read_bytes())
    assert cache.load(manifest, "encoder", "fp32", limits) is not None
    assert (
        "does not load with this TensorRT/GPU (another TensorRT build's, cut short, or too little "
        "free GPU memory to load it); rebuilding it" in log.getvalue()
    )
    assert len(trt.stats["builds"]) == 2 and path.read_bytes().startswith(MAGIC)


def test_fake_an_unloadable_exact_engine_is_skipped_not_rebuilt_when_a_wider_one_loads(
    monkeypatch, tmp_path, model_dir, device
):
    """The exact engine that does not load, with a wider cached one that does: the wider one is
    used and nothing is built, so the log must not promise a rebuild."""
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    log = io.StringIO()
    cache = _cache(trt, device, tmp_path, log)
    exact = cache.build(manifest, "encoder", "fp32", Limits(8, 5))
    cache.build(manifest, "encoder", "fp32", Limits(16, 5))
    exact.write_bytes(b"truncated")
    builds = len(trt.stats["builds"])
    log.seek(0)
    log.truncate()
    engine = cache.load(manifest, "encoder", "fp32", Limits(8, 5))
    assert engine.record["profile"]["image"][2][0] == 16 and len(trt.stats["builds"]) == builds
    assert f"{exact.name} does not load with this TensorRT/GPU (" in log.getvalue()
    assert "memory to load it); skipping it" in log.getvalue()
    assert "rebuilding" not in log.getvalue()


def test_fake_parse_and_build_failures_are_backend_errors_saying_why(
    monkeypatch, tmp_path, model_dir, device
):
    """TensorRT's ONNX parser may refuse a graph (engines/README.md: "expected to fail" rows,
    e.g. Slice's axes): the error names the file and the parser's own errors, not the inputs it
    then failed to find. A build that returns None (TensorRT's way to fail) is a BackendError,
    and neither failure leaves an engine in the cache."""
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())
    refused = "In node 12 (importSlice): UNSUPPORTED_NODE: Assertion failed: axes.allValuesKnown()"
    with monkeypatch.context() as patch:
        patch.setattr(trt.OnnxParser, "parse", lambda self, data: self.errors.append(refused) or False)
        parse_error = r"could not parse .*-folded\.onnx: In node 12 .*allValuesKnown"
        with pytest.raises(BackendError, match=parse_error):
            cache.build(manifest, "encoder", "fp32", Limits(1, 1))
    with monkeypatch.context() as patch:
        patch.setattr(trt.Builder, "build_serialized_network", lambda self, network, config: None)
        with pytest.raises(BackendError, match="failed to build the encoder engine"):
            cache.build(manifest, "encoder", "fp32", Limits(1, 1))
    assert list(tmp_path.glob("*.engine")) == []


def test_fake_the_step_graph_as_exported_does_not_parse_and_its_folded_copy_does(model_dir):
    """engines/README.md's table: TensorRT's ONNX parser (8.6 to 10.x) refuses the decoder step
    as exported, whose Slice takes its axes from an Unsqueeze (``axes.allValuesKnown()``), and
    parses the copy an engine is built from, with every constant chain folded
    (``onnx_for_build``). The fake parser refuses it too, so a build that parsed the graph as
    exported fails here as it would there."""
    from edgecap.build.convert import fold_constants

    trt = make_fake_trt("10.3.0.30", FakeDevice())
    step = onnx.load(str(load_manifest(model_dir).path("decoder_step")))
    if not [n for n in step.graph.node if n.op_type == "Slice" and n.input[3:4] != [""]]:
        pytest.skip("a step graph without the exporter's Slice (the stand-in built without torch)")
    parser = trt.OnnxParser(trt.Builder(None).create_network(0), None)
    assert not parser.parse(step.SerializeToString())
    assert (
        "Slice (importSlice): UNSUPPORTED_NODE: Assertion failed: axes.allValuesKnown()"
        in parser.get_error(0)
    )
    folded = trt.OnnxParser(trt.Builder(None).create_network(0), None)
    assert folded.parse(fold_constants(step).SerializeToString()) and folded.num_errors == 0


def test_fake_a_cached_engine_missing_an_output_is_refused(monkeypatch, tmp_path, model_dir, device):
    """A cached encoder engine whose outputs lack one the contract has (class_probs, e.g. an
    engine from a model exported before it existed) is a ModelError saying to re-export, not
    an engine the backend then fails on. A stand-in engine object: only its I/O is read."""
    import edgecap.trt.engines as engines
    from edgecap.errors import ModelError

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())
    cache.path(manifest, "encoder", "fp32", Limits(1, 1)).write_bytes(b"")
    io_modes = {"image": "input", "features": "output", "att_proj": "output", "h0": "output", "c0": "output"}
    engine = types.SimpleNamespace(
        num_io_tensors=len(io_modes),
        get_tensor_name=lambda i: list(io_modes)[i],
        get_tensor_mode=lambda name: io_modes[name],
    )
    monkeypatch.setattr(engines, "deserialize", lambda trt, runtime, path: engine)
    with pytest.raises(ModelError, match="contract expects inputs.*'class_probs'.*Re-export"):
        cache.load(manifest, "encoder", "fp32", Limits(1, 1))


def test_fake_a_cached_engine_missing_an_input_is_refused(monkeypatch, tmp_path, model_dir, device):
    """A decoder-step engine without one of the contract's inputs (word_bias: an engine of a
    model exported before it existed), and a beam-step engine that has the plain step's I/O,
    without the beam inputs it is run with (``edgecap.build.beam_step``): each a ModelError
    saying to re-export, not an engine the backend binds buffers to. Stand-in engine objects."""
    import edgecap.trt.engines as engines
    from edgecap.build.beam_step import BEAM_INPUTS
    from edgecap.contract import STEP_INPUTS, STEP_OUTPUTS
    from edgecap.errors import ModelError

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())

    def stand_in(inputs, outputs):
        io_modes = {**dict.fromkeys(inputs, "input"), **dict.fromkeys(outputs, "output")}
        return types.SimpleNamespace(
            num_io_tensors=len(io_modes),
            get_tensor_name=lambda i: list(io_modes)[i],
            get_tensor_mode=lambda name: io_modes[name],
        )

    no_bias = stand_in([name for name in STEP_INPUTS if name != "word_bias"], STEP_OUTPUTS)
    cache.path(manifest, "decoder_step", "fp32", Limits(1, 1)).write_bytes(b"")
    monkeypatch.setattr(engines, "deserialize", lambda trt, runtime, path: no_bias)
    with pytest.raises(ModelError, match=r"decoder_step engine has I/O .*'word_bias'.*Re-export"):
        cache.load(manifest, "decoder_step", "fp32", Limits(1, 1))

    assert {"scores", "blocked_words"} <= set(BEAM_INPUTS) - set(STEP_INPUTS)
    plain_step = stand_in(STEP_INPUTS, STEP_OUTPUTS)
    monkeypatch.setattr(engines, "deserialize", lambda trt, runtime, path: plain_step)
    with pytest.raises(ModelError, match=r"beam_step2-.* engine has I/O .*'scores'.*Re-export"):
        cache.load_beam(manifest, 2, manifest.tokens["end"], "fp32", Limits(1, 2))


def test_fake_a_freshly_built_engine_that_does_not_load_is_a_backend_error(
    monkeypatch, tmp_path, model_dir, device
):
    """An engine just built that the runtime cannot load (a TensorRT fault: its log says why) is
    a BackendError naming the file, not an AttributeError on None later."""
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())
    monkeypatch.setattr(cache.runtime, "deserialize_cuda_engine", lambda data: None)
    with pytest.raises(BackendError, match=r"freshly built engine .*-b1\.engine does not deserialize"):
        cache.load(manifest, "encoder", "fp32", Limits(1, 1))
    assert len(trt.stats["builds"]) == 1


def _stand_in_network(trt, specs):
    """A network of named, typed layers for ``_pin_fp32_layers``, and its layers: one per
    ``(kind, inputs, outputs)`` or ``(kind, inputs, outputs, dtypes)`` (``dtypes``: a type for
    every tensor of the layer, or a tensor name -> type; FP32 when not given; an input None: an
    optional one not set, for which TensorRT's ``get_input`` gives None), each recording its
    precision and retyped outputs."""

    def layer(kind, inputs, outputs, dtypes=trt.float32):
        def dtype(name):
            return dtypes.get(name, trt.float32) if isinstance(dtypes, dict) else dtypes

        tensors = {
            name: types.SimpleNamespace(name=name, dtype=dtype(name)) if name is not None else None
            for name in (*inputs, *outputs)
        }
        made = types.SimpleNamespace(
            type=kind,
            precision=None,
            retyped={},
            num_inputs=len(inputs),
            num_outputs=len(outputs),
            get_input=lambda j: tensors[inputs[j]],
            get_output=lambda j: tensors[outputs[j]],
        )
        made.set_output_type = lambda j, dtype: made.retyped.__setitem__(j, dtype)
        return made

    layers = [layer(*spec) for spec in specs]
    return types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i]), layers


def test_fake_fp16_pins_the_log_after_a_reshaped_softmax():
    """TensorRT < 10.12, FP16 flag: the Log of a LogSoftmax stays FP32 also when the parser puts
    a reshape (shuffle) between the Softmax and the Log (engines.py, _pin_fp32_layers:
    "tensors holding a Softmax's result (maybe reshaped)"); a Log of anything else and the
    reshape itself are left to TensorRT. A stand-in network of named, typed layers."""
    from edgecap.trt.engines import _pin_fp32_layers

    trt = make_fake_trt("10.3.0.30", FakeDevice())
    network, layers = _stand_in_network(
        trt,
        [
            ("softmax", ["logits2d"], ["probs2d"]),
            ("shuffle", ["probs2d"], ["probs"]),
            ("unary", ["probs"], ["logprobs"]),  # the Log of the LogSoftmax
            ("unary", ["h"], ["tanh_h"]),  # another unary layer
            ("shuffle", ["h"], ["h2d"]),
        ],
    )
    _pin_fp32_layers(trt, network)
    assert [lay.precision for lay in layers] == [trt.float32, None, trt.float32, None, None]
    assert [lay.retyped for lay in layers] == [{0: trt.float32}, {}, {0: trt.float32}, {}, {}]


def test_fake_fp16_pins_every_layer_of_an_island_node_and_nothing_around_it():
    """TensorRT < 10.12, FP16 flag: an island node that the parser makes into several layers (a
    Gemm: its matrix product into a tensor of the parser's own, then the bias added into the
    node's output) is pinned whole, weights included; the layers before the node's ONNX inputs
    (the LSTM writing ``h``) and after its output (an FP16 Tanh reading the logits) are not,
    nor a layer of integer tensors, nor the shape layer that reads the logits' shape for the
    parser's reshape back (an island's layer, but an INT32 output: NVIDIA/TensorRT#3177, a layer
    forced to INT32 is warned of). A stand-in network of named, typed layers."""
    from edgecap.trt.engines import Islands, _pin_fp32_layers

    trt = make_fake_trt("10.3.0.30", FakeDevice())
    weights, bias = "(Unnamed Layer* 1) [Constant]_output", "(Unnamed Layer* 3) [Constant]_output"
    product = "(Unnamed Layer* 2) [Matrix Multiply]_output"
    shape = "(Unnamed Layer* 10) [Shape]_output"
    network, layers = _stand_in_network(
        trt,
        [
            ("other", ["x", "h_prev"], ["h"]),  # the LSTM
            ("constant", [], [weights]),  # the projection's weights
            ("matmul", ["h", weights], [product]),
            ("constant", [], [bias]),
            ("other", [product, bias], ["logits"]),
            ("unary", ["logits"], ["tanh_logits"]),  # after the island
            ("other", ["ids"], ["ids_plus_one"], trt.int32),  # integer tensors only
            # a LogSoftmax as the parser makes it: the softmax and log on the logits, then the
            # result reshaped back to the logits' shape, read by a shape layer
            ("softmax", ["logits"], ["(Unnamed Layer* 8) [Softmax]_output"]),
            ("unary", ["(Unnamed Layer* 8) [Softmax]_output"], ["(Unnamed Layer* 9) [Unary]_output"]),
            ("shape", ["logits"], [shape], {shape: trt.int32}),
            ("shuffle", ["(Unnamed Layer* 9) [Unary]_output", shape], ["logprobs"], {shape: trt.int32}),
        ],
    )
    islands = Islands(
        tensors=frozenset({"logits", "ids_plus_one", "logprobs"}),
        named=frozenset({"x", "h_prev", "h", "logits", "tanh_logits", "ids", "ids_plus_one", "logprobs"}),
    )
    _pin_fp32_layers(trt, network, islands)
    f32, pinned = trt.float32, {0: trt.float32}
    assert [lay.precision for lay in layers] == [None, f32, f32, f32, f32, None, None, f32, f32, None, f32]
    assert [lay.retyped for lay in layers] == [
        *([{}] + [pinned] * 4 + [{}, {}]),
        *(pinned, pinned, {}, pinned),  # the shape layer neither pinned nor retyped
    ]


def test_fake_fp16_pinning_passes_over_optional_inputs_that_are_not_set():
    """TensorRT's ``get_input`` gives None for an optional input a layer was made without
    (NvInfer.h, ILayer::getInput: "nullptr if ... the tensor is optional", e.g. a slice layer's
    stride or axes): a layer with one is pinned like any other, by what its other tensors are,
    and walked through when it computes an island's tensor. A stand-in network."""
    from edgecap.trt.engines import Islands, _pin_fp32_layers

    trt = make_fake_trt("10.3.0.30", FakeDevice())
    network, layers = _stand_in_network(
        trt,
        [
            ("other", ["x"], ["logits"]),
            ("slice", ["logits", None, "size"], ["logits_window"]),  # an island: FP32
            ("slice", ["beam/scores", "start", None], ["beam/best"]),  # the beam bookkeeping
            ("slice", ["beam/ids", None], ["beam/ids_window"], trt.int32),  # integers: left alone
        ],
    )
    islands = Islands(tensors=frozenset({"logits_window"}), named=frozenset({"x", "logits", "logits_window"}))
    _pin_fp32_layers(trt, network, islands)
    f32 = trt.float32
    assert [lay.precision for lay in layers] == [None, f32, f32, None]
    assert [lay.retyped for lay in layers] == [{}, {0: f32}, {0: f32}, {}]


def test_fake_engines_are_built_only_at_a_known_precision_from_a_matching_model(
    monkeypatch, tmp_path, model_dir, device
):
    """A misspelt precision is a ValueError, not an FP32 engine filed under "FP16"; fp32
    engines come from an fp32 model directory only (an FP16 one would give FP16 weights under
    the name fp32), and int8 model directories are refused (engines/README.md: engines are
    FP16 or FP32). Nothing is built."""
    import dataclasses

    from edgecap.errors import ModelError

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    cache = _cache(trt, device, tmp_path, io.StringIO())
    with pytest.raises(ValueError, match="precision must be one of"):
        cache.build(manifest, "encoder", "FP16", Limits(1, 1))
    half = dataclasses.replace(manifest, precision="fp16")
    with pytest.raises(ModelError, match="is fp16; build fp32 engines from the fp32 model directory"):
        cache.build(half, "encoder", "fp32", Limits(1, 1))
    int8 = dataclasses.replace(manifest, precision="int8")
    with pytest.raises(ModelError, match="not int8"):
        cache.build(int8, "encoder", "fp16", Limits(1, 1))
    assert trt.stats["builds"] == [] and list(tmp_path.glob("*.engine")) == []


def test_fake_backend_runs_on_a_larger_cached_engine(monkeypatch, tmp_path, model_dir, device):
    trt = install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    build_all(manifest, "fp32", Limits(4, 3), tmp_path, device=device, log=io.StringIO())
    builds = len(trt.stats["builds"])
    h, w = manifest.preprocessing.size
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    image_index, steps = some_steps(manifest, rows=6)
    err = io.StringIO()
    with TensorRTBackend(manifest, "fp32", Limits(2, 3), tmp_path, cuda_device=device, log=err) as backend:
        assert len(trt.stats["builds"]) == builds and err.getvalue() == ""
        session = backend.start(backend.encode(images), image_index, return_attention=True)
        got = [session.step(t, r, b) for t, r, b in steps]
    for (lp, ids, _), r in zip(reference_run(manifest, images, image_index, steps), got):
        np.testing.assert_allclose(r.topk_logprobs, lp, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(r.topk_ids, ids)


def test_fake_build_defaults_match_what_caption_asks_for():
    """`edgecap build` with no limits makes exactly the engines `edgecap caption --backend
    tensorrt` (default batch and beam sizes) looks for, so they are reused, not rebuilt."""
    import argparse

    from edgecap.api import CaptionOptions
    from edgecap.commands import build as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([])
    options = CaptionOptions()
    wanted = Limits(options.batch_size, options.beam_size).covering_default()
    assert Limits(args.max_batch, args.max_beam) == wanted == Limits()
    assert TensorRTBackend.thread_safe is False


def test_fake_build_command_uses_the_api_default_model(monkeypatch, tmp_path, model_dir, device):
    import argparse

    import edgecap.api
    from edgecap.commands import build as command

    install(monkeypatch, "10.3.0.30", device)
    monkeypatch.setattr(edgecap.api, "default_model_dir", lambda: model_dir)
    monkeypatch.setattr("edgecap.trt.cuda.open_device", lambda: device)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--out", str(tmp_path)])) == 0
    names = sorted(p.name for p in tmp_path.glob("*.engine"))
    assert [n.rsplit("-", 1)[1] for n in names] == ["b8k5.engine", "b8.engine"]
    assert not hasattr(command, "default_model_dir")


# -- the backend: buffers, ping-pong state, the step loop ---------------------------------------


@pytest.mark.parametrize("version,precision", [("8.6.2.3", "fp32"), ("10.12.0.36", "fp16")])
def test_fake_backend_matches_onnxruntime(monkeypatch, tmp_path, model_dir, device, version, precision):
    trt = install(monkeypatch, version, device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    image_index, steps = some_steps(manifest, rows=6)
    err = io.StringIO()
    backend = TensorRTBackend(
        manifest, precision=precision, limits=Limits(2, 3), cache_dir=tmp_path, cuda_device=device, log=err
    )
    assert "building the TensorRT" in err.getvalue()
    assert backend.top_k == manifest.dims.top_k
    allocated = set(device.memory)

    encoded = backend.encode(images)
    # fp16: the whole FP16 encoder's features feed the (FP32) classifier
    np.testing.assert_allclose(
        encoded.class_probs, class_probs(manifest, images), atol=1e-6 if precision == "fp32" else 0.02
    )
    session = backend.start(encoded, image_index, return_attention=True)
    got = []
    uploads = []
    for tokens, source_rows, bias in steps:
        before = dict(device.calls)
        got.append(session.step(tokens, source_rows, bias))
        assert device.calls["sync"] - before["sync"] == 1  # one sync per step
        assert device.calls["dtoh"] - before["dtoh"] == 3  # logprobs, ids, alpha only
        uploads.append(device.calls["htod"] - before["htod"])
    # tokens and source_rows; the word bias when given, and zeros once after it (and before
    # the first step: fresh buffers are not known to hold zeros)
    assert uploads == [3, 2, 3, 3]
    assert (got[2].topk_ids[:, 0] == manifest.dims.vocab_size - 1).all()  # the bias steered
    assert set(device.memory) == allocated  # nothing allocated per step

    if precision == "fp32":  # the fake engine ran the same ONNX: identical numbers
        for (lp, ids, alpha), r in zip(reference_run(manifest, images, image_index, steps), got):
            np.testing.assert_allclose(r.topk_logprobs, lp, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(r.topk_ids, ids)
            np.testing.assert_allclose(r.alpha, alpha, rtol=1e-6, atol=1e-6)
            assert r.topk_ids.dtype == np.int32 and r.topk_logprobs.dtype == np.float32
    else:
        ref = reference_run(manifest, images, image_index, steps)
        for (lp, _, _), r in zip(ref, got):
            np.testing.assert_allclose(r.topk_logprobs, lp, atol=0.05)

    # ping-pong: h0 first, then the two state buffers alternate; never read and write one buffer
    step_runs = [e for e in trt.stats["executions"] if "h_out" in e]
    assert step_runs[0]["h"] != step_runs[0]["h_out"]
    assert [e["h"] for e in step_runs[1:]] == [e["h_out"] for e in step_runs[:-1]]
    assert step_runs[2]["h_out"] == step_runs[0]["h_out"] != step_runs[1]["h_out"]
    assert len({e["h_out"] for e in step_runs}) == 2
    assert all(e["h"] != e["h_out"] and e["c"] != e["c_out"] for e in step_runs)
    # the step reads the image tensors where the encoder wrote them
    enc_run = trt.stats["executions"][0]
    assert step_runs[0]["features"] == enc_run["features"]
    assert step_runs[0]["h"] == enc_run["h0"]

    backend.close()
    assert device.memory == {} and device.pinned == [] and device.streams == []
    backend.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        backend.encode(images)


def test_fake_backend_skips_attention_copy_and_reuses_engines(monkeypatch, tmp_path, model_dir, device):
    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    images = np.zeros((1, 3, h, w), np.float32)
    with TensorRTBackend(
        manifest, "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=io.StringIO()
    ) as backend:
        session = backend.start(backend.encode(images), np.zeros(3, np.int32))
        before = device.calls["dtoh"]
        result = session.step(np.ones(3, np.int32), np.zeros(3, np.int32))
        assert device.calls["dtoh"] - before == 2 and result.alpha is None
        assert "tensorrt 10.3.0.30 fp16 decoder, fp32 encoder on Orin (sm87)" in backend.describe()
    assert device.memory == {}
    builds = len(trt.stats["builds"])
    err = io.StringIO()
    with TensorRTBackend(manifest, "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=err):
        pass
    assert len(trt.stats["builds"]) == builds and err.getvalue() == ""  # loaded from cache


def test_fake_backend_rejects_stale_and_oversized_use(monkeypatch, tmp_path, model_dir, device):
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    images = np.zeros((2, 3, h, w), np.float32)
    with TensorRTBackend(
        manifest, "fp16", Limits(2, 2), tmp_path, cuda_device=device, log=io.StringIO()
    ) as backend:
        with pytest.raises(BackendError, match="1 to 2"):
            backend.encode(np.zeros((3, 3, h, w), np.float32))
        with pytest.raises(BackendError, match="images must be"):
            backend.encode(np.zeros((1, 3, h + 1, w), np.float32))
        first = backend.encode(images)
        old = backend.start(first, np.array([0, 0, 1, 1], np.int32))
        with pytest.raises(BackendError, match=r"\[0, 2\)"):
            old.step(np.ones(4, np.int32), np.array([0, 1, 2, 3], np.int32))  # S = N = 2
        new = backend.start(first, np.array([0, 1], np.int32))
        with pytest.raises(BackendError, match="later start"):
            old.step(np.ones(4, np.int32), np.zeros(4, np.int32))
        with pytest.raises(BackendError, match="shape"):
            new.step(np.ones(3, np.int32), np.zeros(3, np.int32))
        new.step(np.ones(2, np.int32), np.array([0, 1], np.int32))
        backend.encode(images)
        # the session's features / att_proj were overwritten by that encode: stale
        with pytest.raises(BackendError, match="later encode"):
            new.step(np.ones(2, np.int32), np.array([0, 1], np.int32))
        with pytest.raises(BackendError, match="overwritten"):
            backend.start(first, np.zeros(2, np.int32))
        with pytest.raises(BackendError, match="rows"):
            backend.start(backend.encode(images), np.zeros(5, np.int32))


def _fp32_backend(manifest, tmp_path, device) -> TensorRTBackend:
    """An FP32 backend for 2 images x 2 beams on the fake TensorRT (use it in a ``with``)."""
    return TensorRTBackend(manifest, "fp32", Limits(2, 2), tmp_path, cuda_device=device, log=io.StringIO())


def test_fake_a_shape_tensorrt_refuses_names_the_limits_and_the_fix(monkeypatch, tmp_path, model_dir, device):
    """An input shape the engine's profile does not take is a BackendError naming the shape, the
    engine's limits and the way out (rebuild with larger --max-batch / --max-beam), not
    TensorRT's False."""
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    with _fp32_backend(manifest, tmp_path, device) as backend:
        backend._contexts["encoder"].set_input_shape = lambda name, shape: False
        with pytest.raises(
            BackendError,
            match=rf"TensorRT refused shape \(1, 3, {h}, {w}\) for encoder input 'image' "
            r"\(engine limits: .*max_batch=2.*\); rebuild with larger --max-batch / --max-beam",
        ):
            backend.encode(np.zeros((1, 3, h, w), np.float32))


def test_fake_an_engine_run_or_an_address_tensorrt_refuses_is_a_backend_error(
    monkeypatch, tmp_path, model_dir, device
):
    """TensorRT says False when it cannot enqueue an engine (``execute_async_v3``) or take a
    tensor's address (``set_tensor_address``: one it cannot use, e.g. misaligned): each is a
    BackendError naming the engine or the tensor, not the pinned buffers' older contents (an
    earlier batch's class probabilities, an earlier step's words) handed back as this call's."""
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    images = np.zeros((1, 3, h, w), np.float32)
    with _fp32_backend(manifest, tmp_path, device) as backend:
        backend.encode(images)
        backend._contexts["encoder"].execute_async_v3 = lambda stream: False
        with pytest.raises(BackendError, match="TensorRT failed to run the encoder engine"):
            backend.encode(images)
    with _fp32_backend(manifest, tmp_path, device) as backend:
        session = backend.start(backend.encode(images), np.zeros(2, np.int32))
        session.step(np.ones(2, np.int32), np.zeros(2, np.int32))
        backend._contexts["decoder_step"].execute_async_v3 = lambda stream: False
        with pytest.raises(BackendError, match="TensorRT failed to run the decoder_step engine"):
            session.step(np.ones(2, np.int32), np.zeros(2, np.int32))
    with _fp32_backend(manifest, tmp_path, device) as backend:
        session = backend.start(backend.encode(images), np.zeros(2, np.int32))
        backend._contexts["decoder_step"].set_tensor_address = lambda name, ptr: name != "h_out"
        with pytest.raises(BackendError, match="TensorRT refused the address of tensor 'h_out'"):
            session.step(np.ones(2, np.int32), np.zeros(2, np.int32))


def test_fake_backend_closes_only_the_device_it_opened(monkeypatch, tmp_path, model_dir, device):
    """``cuda_device``: a device the caller opened stays open after the backend closes (the
    caller may run other backends or copies on it); the device the backend opens itself (GPU 0,
    no ``cuda_device``) is closed with it."""
    import edgecap.trt.cuda

    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    with TensorRTBackend(manifest, "fp32", Limits(1, 1), tmp_path, cuda_device=device, log=io.StringIO()):
        pass
    assert device.memory == {} and not device.closed
    own = FakeDevice()
    install(monkeypatch, "8.6.2.3", own)
    monkeypatch.setattr(edgecap.trt.cuda, "open_device", lambda index=0: own)
    with TensorRTBackend(manifest, "fp32", Limits(1, 1), tmp_path, log=io.StringIO()):
        assert not own.closed
    assert own.memory == {} and own.closed


def test_fake_build_all_closes_only_the_device_it_opened(monkeypatch, tmp_path, model_dir, device):
    """``build_all(device=...)`` (edgecap build's engines on a device the caller opened) leaves
    that device open for the caller's other work; without one it opens GPU 0 itself and closes
    it when the engines are built (pycuda: the primary context's reference let go)."""
    import edgecap.trt.cuda

    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    build_all(manifest, "fp32", Limits(1, 1), tmp_path, device=device, log=io.StringIO())
    assert not device.closed
    own = FakeDevice()
    monkeypatch.setattr(edgecap.trt.cuda, "open_device", lambda index=0: own)
    paths = build_all(manifest, "fp32", Limits(1, 1), tmp_path / "own", log=io.StringIO())
    assert [p.exists() for p in paths] == [True, True] and own.closed and not device.closed


@pytest.mark.parametrize("failing", ["alloc", "host_array"])
def test_fake_a_backend_out_of_gpu_memory_frees_what_it_had_allocated(
    monkeypatch, tmp_path, model_dir, failing
):
    """GPU or pinned memory running out partway through the backend's buffers (a GPU shared
    with other programs) is the device's BackendError, and the buffers, pinned arrays and the
    stream made before it are freed: a server that retries, or falls back to another backend,
    does not lose GPU memory with every try."""

    class RunsOut(FakeDevice):
        made = 0

        def _runs_out(self):
            self.made += 1
            if self.made == 4:
                raise BackendError(f"CUDA error while {failing}: out of memory")

        def alloc(self, nbytes):
            if failing == "alloc":
                self._runs_out()
            return super().alloc(nbytes)

        def host_array(self, shape, dtype):
            if failing == "host_array":
                self._runs_out()
            return super().host_array(shape, dtype)

    device = RunsOut()
    install(monkeypatch, "8.6.2.3", device)
    with pytest.raises(BackendError, match="out of memory"):
        _fp32_backend(load_manifest(model_dir), tmp_path, device)
    assert device.made == 4
    assert device.memory == {} and device.pinned == [] and device.streams == []


def test_fake_an_engine_tensor_of_another_type_than_the_contract_is_refused(
    monkeypatch, tmp_path, model_dir, device
):
    """An engine whose float tensors are float16 (an engine built elsewhere with FP16 I/O) does
    not get float32 buffers: a BackendError naming the tensor, both types and the fix, before
    any image is encoded."""
    trt = install(monkeypatch, "8.6.2.3", device)
    monkeypatch.setattr(trt, "nptype", lambda dt: np.float16 if dt == 1 else _ONNX_TO_NP[dt])
    manifest = load_manifest(model_dir)
    with pytest.raises(
        BackendError,
        match=r"encoder engine tensor 'image' is float16, the contract says float32; "
        "rebuild the engines from an edgecap model",
    ):
        TensorRTBackend(manifest, "fp32", Limits(1, 1), tmp_path, cuda_device=device, log=io.StringIO())
    assert device.memory == {}


def test_fake_an_engine_tensor_of_another_shape_than_the_manifest_is_refused(
    monkeypatch, tmp_path, model_dir, device
):
    """The backend sizes its buffers by the manifest's dimensions: an engine that disagrees (a
    manifest whose hidden size is not its graphs', or an engine whose tensor has an axis more)
    is a BackendError naming the tensor and both shapes before any buffer is made, not buffers
    of the wrong size for what the engine reads and writes."""
    import dataclasses

    trt = install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    dims = manifest.dims
    hidden = dims.hidden_dim
    wider = dataclasses.replace(manifest, dims=dataclasses.replace(dims, hidden_dim=hidden + 1))
    with pytest.raises(
        BackendError,
        match=rf"encoder engine tensor 'h0' has inner shape \({hidden},\); "
        rf"the manifest says \({hidden + 1},\)",
    ):
        TensorRTBackend(wider, "fp32", Limits(1, 1), tmp_path, cuda_device=device, log=io.StringIO())
    assert device.memory == {}

    real = trt.Runtime.deserialize_cuda_engine

    def with_an_axis_more(self, data):
        engine = real(self, data)
        mode, dtype, shape = engine.io["features"]
        engine.io["features"] = (mode, dtype, (*shape, 1))
        return engine

    monkeypatch.setattr(trt.Runtime, "deserialize_cuda_engine", with_an_axis_more)
    L, F = dims.regions, dims.feature_dim
    with pytest.raises(
        BackendError,
        match=rf"encoder engine tensor 'features' has inner shape \({L}, {F}, 1\); "
        rf"the manifest says \({L}, {F}\)",
    ):
        TensorRTBackend(manifest, "fp32", Limits(1, 1), tmp_path, cuda_device=device, log=io.StringIO())
    assert device.memory == {}


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_fake_backend_threads_are_checked_like_the_other_backends(model_dir, threads):
    """``threads`` has nothing to set on the TensorRT backend, and is still checked as the other
    backends check it: a value none of them takes is a ValueError naming it, before TensorRT is
    touched, not silently ignored here and refused on switching backends."""
    with pytest.raises(ValueError, match=f"threads must be a positive integer .*got {threads!r}"):
        TensorRTBackend(load_manifest(model_dir), threads=threads)


def test_fake_backend_search_must_be_host_or_graph(model_dir):
    """``search`` takes "host" or "graph" (the other backends' "device" is not one of the
    TensorRT backend's): anything else is a ValueError naming both, before TensorRT is touched,
    not a silent host search."""
    with pytest.raises(ValueError, match="search must be one of host, graph, got 'device'"):
        TensorRTBackend(load_manifest(model_dir), search="device")


class StreamOrderedDevice(FakeDevice):
    """A FakeDevice whose copies to the host land when the stream is synchronised, as
    ``cudaMemcpyAsync`` into pinned memory does: a pinned buffer read before ``synchronize``
    still holds what it held before the copy was queued."""

    def __init__(self):
        super().__init__()
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def copy_to_host(self, dst, src, stream):
        self._check_current()
        # the device side is read in stream order (after the kernels queued before the copy)
        self.pending.append((dst, self.memory[src][: dst.nbytes].copy()))
        self.calls["dtoh"] += 1

    def synchronize(self, stream):
        super().synchronize(stream)
        for dst, raw in self.pending:
            dst[...] = raw.view(dst.dtype).reshape(dst.shape)
        self.pending.clear()


def test_fake_backend_results_are_read_after_the_sync_and_outlive_the_next_batch(
    monkeypatch, tmp_path, model_dir
):
    """Every result the backend hands back (class_probs, top-k, attention) is copied out of its
    pinned buffer after the stream is synchronised, and is the caller's own: the next batch,
    which reuses the pinned buffers, leaves it as it was. Expected values: plain onnxruntime
    on the same ONNX (fp32 engines run it unchanged)."""
    device = StreamOrderedDevice()
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    rng = np.random.default_rng(7)
    first, second = (rng.uniform(-1, 1, (2, 3, h, w)).astype(np.float32) for _ in range(2))
    image_index, steps = some_steps(manifest, rows=6)
    with TensorRTBackend(
        manifest, "fp32", Limits(2, 3), tmp_path, cuda_device=device, log=io.StringIO()
    ) as backend:
        encoded_first = backend.encode(first)
        encoded = backend.encode(second)
        session = backend.start(encoded, image_index, return_attention=True)
        got = [session.step(t, r, b) for t, r, b in steps]
    np.testing.assert_allclose(encoded_first.class_probs, class_probs(manifest, first), atol=1e-6)
    np.testing.assert_allclose(encoded.class_probs, class_probs(manifest, second), atol=1e-6)
    for (lp, ids, alpha), r in zip(reference_run(manifest, second, image_index, steps), got):
        np.testing.assert_allclose(r.topk_logprobs, lp, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(r.topk_ids, ids)
        np.testing.assert_allclose(r.alpha, alpha, rtol=1e-6, atol=1e-6)


def test_fake_backend_refuses_an_index_one_past_the_last_row(monkeypatch, tmp_path, model_dir, device):
    """``image_index`` indexes the N encoded images and ``source_rows`` the rows of the state a
    step reads (the N images' h0 at the first step, then the R rows of the previous step): N
    and R themselves are out of range (the device rows past them hold another batch's state or
    garbage), and an empty batch is refused as such."""
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    with _fp32_backend(manifest, tmp_path, device) as backend:
        with pytest.raises(BackendError, match="0 images in one batch; these engines take 1 to 2"):
            backend.encode(np.zeros((0, 3, h, w), np.float32))
        encoded = backend.encode(np.zeros((2, 3, h, w), np.float32))
        with pytest.raises(BackendError, match=r"image_index must lie in \[0, 2\)"):
            backend.start(encoded, np.array([0, 2], np.int32))
        session = backend.start(encoded, np.array([0, 0, 1], np.int32))
        tokens = np.ones(3, np.int32)
        with pytest.raises(BackendError, match=r"source_rows must lie in \[0, 2\)"):
            session.step(tokens, np.array([0, 1, 2], np.int32))
        session.step(tokens, np.array([0, 0, 1], np.int32))
        with pytest.raises(BackendError, match=r"source_rows must lie in \[0, 3\)"):
            session.step(tokens, np.array([0, 1, 3], np.int32))
        session.step(tokens, np.array([2, 1, 0], np.int32))


def test_fake_backend_refuses_a_negative_index_and_rows_of_no_batch(monkeypatch, tmp_path, model_dir, device):
    """-1 is no image and no row either (the engine's Gather would read it as the last one, or
    the device memory before the buffer): refused as out of range in ``image_index`` and in
    ``source_rows``, at the first step and after it. No rows at all, or an index that is not
    one row each (2-D), is no batch: refused as the backend's error, not numpy's."""
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    with _fp32_backend(manifest, tmp_path, device) as backend:
        encoded = backend.encode(np.zeros((2, 3, h, w), np.float32))
        with pytest.raises(BackendError, match=r"image_index must lie in \[0, 2\)"):
            backend.start(encoded, np.array([0, -1], np.int32))
        for no_batch in (np.zeros(0, np.int32), np.zeros((2, 1), np.int32)):
            with pytest.raises(BackendError, match="rows; these engines take 1 to 4"):
                backend.start(encoded, no_batch)
        session = backend.start(encoded, np.array([0, 1], np.int32))
        tokens = np.ones(2, np.int32)
        with pytest.raises(BackendError, match=r"source_rows must lie in \[0, 2\)"):
            session.step(tokens, np.array([-1, 1], np.int32))
        session.step(tokens, np.array([0, 1], np.int32))
        with pytest.raises(BackendError, match=r"source_rows must lie in \[0, 2\)"):
            session.step(tokens, np.array([1, -2], np.int32))


def test_fake_backend_a_word_bias_never_steers_a_later_batch(monkeypatch, tmp_path, model_dir, device):
    """The word bias stays on the device between steps; a batch with fewer rows that resets
    it to zeros resets only its own rows, so a later, larger batch without a bias must not
    find the rows past them still holding an earlier batch's bias. Expected: plain onnxruntime
    with no bias."""
    install(monkeypatch, "8.6.2.3", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    V = manifest.dims.vocab_size
    images = np.random.default_rng(5).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    four, three = np.array([0, 0, 1, 1], np.int32), np.array([0, 0, 1], np.int32)
    start = manifest.tokens["start"]
    with _fp32_backend(manifest, tmp_path, device) as backend:
        encoded = backend.encode(images)
        bias = np.zeros((4, V), np.float32)
        bias[:, V - 1] = 50.0
        steered = backend.start(encoded, four).step(np.full(4, start, np.int32), four, bias)
        assert (steered.topk_ids[:, 0] == V - 1).all()
        # zeros in 3 rows: only the last row still holds the bias
        backend.start(encoded, three).step(np.full(3, start, np.int32), three)
        got = backend.start(encoded, four).step(np.full(4, start, np.int32), four)
    ((lp, ids, _),) = reference_run(manifest, images, four, [(np.full(4, start, np.int32), four, None)])
    assert (ids[:, 0] != V - 1).all()  # unsteered, the last word is not the first choice
    np.testing.assert_array_equal(got.topk_ids, ids)
    np.testing.assert_allclose(got.topk_logprobs, lp, rtol=1e-6, atol=1e-6)


# -- cuda-python device: every call checked -----------------------------------------------------


def make_fake_cudart(fail: str | None = None):
    rt = types.SimpleNamespace()
    rt.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    rt.host = {}
    rt.calls = []

    def call(name, *values):
        def fn(*args):
            rt.calls.append((name, args))
            return (2, *values) if name == fail else (0, *values)

        return fn

    def malloc_host(n):
        buf = ctypes.create_string_buffer(n)
        rt.host[ctypes.addressof(buf)] = buf
        rt.calls.append(("cudaMallocHost", (n,)))
        return (0, ctypes.addressof(buf))

    rt.cudaSetDevice = call("cudaSetDevice")
    rt.cudaGetDevice = call("cudaGetDevice", 0)  # the calling thread's device: GPU 0
    rt.cudaGetDeviceProperties = call(
        "cudaGetDeviceProperties", types.SimpleNamespace(name=b"Orin\0\0\0", major=8, minor=7)
    )
    rt.cudaMalloc = call("cudaMalloc", 0xABC000)
    rt.cudaFree = call("cudaFree")
    rt.cudaMallocHost = malloc_host
    rt.cudaFreeHost = call("cudaFreeHost")
    rt.cudaStreamCreate = call("cudaStreamCreate", 77)
    rt.cudaStreamDestroy = call("cudaStreamDestroy")
    rt.cudaStreamSynchronize = call("cudaStreamSynchronize")
    rt.cudaMemcpyAsync = call("cudaMemcpyAsync")
    rt.cudaGetErrorString = lambda err: (0, b"out of memory")
    return rt


def test_fake_cuda_python_device_calls_and_checks():
    rt = make_fake_cudart()
    dev = CudaPythonDevice(0, cudart=rt)
    assert dev.name == "Orin" and dev.compute_capability == (8, 7)
    assert dev.alloc(100) == 0xABC000
    host = dev.host_array((4, 5), np.float32)
    host[...] = 3.0  # real (fake-pinned) memory behind the numpy view
    assert host.shape == (4, 5) and host.dtype == np.float32 and host.sum() == 60
    stream = dev.create_stream()
    assert dev.stream_handle(stream) == 77
    dev.copy_to_device(0xABC000, host, stream)
    name, args = rt.calls[-1]
    assert args[0] == 0xABC000 and args[1] == host.ctypes.data and args[2] == 80 and args[3] == 1
    dev.copy_to_host(host[:2], 0xABC000, stream)
    assert rt.calls[-1][1][2] == 40 and rt.calls[-1][1][3] == 2
    dev.free_host(host)
    assert rt.calls[-1][0] == "cudaFreeHost"

    # GPU 1 current for the block only: the thread's own device (0) again after it
    on_1 = CudaPythonDevice(1, cudart=rt)
    del rt.calls[:]
    with on_1.active():
        on_1.alloc(8)
    assert [(name, args) for name, args in rt.calls if name.startswith("cudaSetDevice")] == [
        ("cudaSetDevice", (1,)),
        ("cudaSetDevice", (0,)),
    ]
    assert [name for name, _ in rt.calls] == ["cudaGetDevice", "cudaSetDevice", "cudaMalloc", "cudaSetDevice"]

    failing = CudaPythonDevice(0, cudart=make_fake_cudart(fail="cudaMalloc"))
    with pytest.raises(BackendError, match="allocating 100 bytes.*out of memory"):
        failing.alloc(100)


# -- the engine cache across TensorRT versions and GPUs -------------------------------------


def test_engine_from_another_tensorrt_or_gpu_is_rebuilt(monkeypatch, tmp_path, tiny_model_dir):
    """FAKE TensorRT (tests/test_tensorrt_fake.py): an engine file that another TensorRT
    version / GPU wrote under this cache name does not deserialize, so it is rebuilt, once."""
    pytest.importorskip("onnx")
    from test_tensorrt_fake import FakeDevice, install

    from edgecap.contract import Limits
    from edgecap.trt.engines import EngineCache, Target

    device, log, limits = FakeDevice(), io.StringIO(), Limits(2, 3)
    manifest = load_manifest(tiny_model_dir)
    old_trt = install(monkeypatch, "8.6.2.3", device)
    old = EngineCache(old_trt, Target("Xavier", (7, 2), old_trt.__version__), tmp_path / "old", log)
    old_engine = old.build(manifest, "encoder", "fp32", limits)

    trt = install(monkeypatch, "10.3.0.30", device)
    cache = EngineCache(
        trt, Target(device.name, device.compute_capability, trt.__version__), tmp_path / "new", log
    )
    path = cache.path(manifest, "encoder", "fp32", limits)
    path.parent.mkdir()
    shutil.copy(old_engine, path)  # e.g. a cache folder copied from another device
    assert cache.load(manifest, "encoder", "fp32", limits) is not None
    assert (
        "does not load with this TensorRT/GPU (another TensorRT build's, cut short, or too little "
        "free GPU memory to load it); rebuilding it" in log.getvalue()
    )
    assert len(trt.stats["builds"]) == 1
    cache.load(manifest, "encoder", "fp32", limits)  # the rebuilt engine is reused
    assert len(trt.stats["builds"]) == 1


def test_unwritable_engine_cache_fails_before_building(monkeypatch, tmp_path, tiny_model_dir):
    """FAKE TensorRT, as above."""
    pytest.importorskip("onnx")
    from test_tensorrt_fake import FakeDevice, install

    from edgecap.contract import Limits
    from edgecap.trt.engines import EngineCache, Target

    device = FakeDevice()
    trt = install(monkeypatch, "10.3.0.30", device)
    (tmp_path / "a-file").write_text("")
    cache = EngineCache(
        trt,
        Target(device.name, device.compute_capability, trt.__version__),
        tmp_path / "a-file" / "engines",
        io.StringIO(),
    )
    with pytest.raises(BackendError, match="cannot save TensorRT engines.*EDGECAP_CACHE"):
        cache.load(load_manifest(tiny_model_dir), "encoder", "fp32", Limits(2, 3))
    assert trt.stats["builds"] == []


# -- the device's CUDA context in the thread that uses it ----------------------------------------


def test_fake_backend_made_in_one_thread_captions_in_another(monkeypatch, tmp_path, model_dir, device):
    """``edgecap serve`` makes the Captioner in the main thread and captions in a worker: every
    use of the device there (copies, engine runs, frees) has the context current, then let go."""
    install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    h, w = manifest.preprocessing.size
    images = np.zeros((2, 3, h, w), np.float32)
    image_index, steps = some_steps(manifest, rows=6)
    backend = TensorRTBackend(manifest, "fp16", Limits(2, 3), tmp_path, cuda_device=device, log=io.StringIO())
    results, errors, depth_after = [], [], []

    def worker():
        try:
            encoded = backend.encode(images)
            session = backend.start(encoded, image_index)
            results.extend(session.step(tokens, rows, bias) for tokens, rows, bias in steps)
            backend.close()
            depth_after.append(device._current.__dict__.get("depth", 0))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=worker, name="edgecap-serve-model")
    thread.start()
    thread.join()
    assert not errors, errors
    assert len(results) == len(steps) and "edgecap-serve-model" in device.active_threads
    assert depth_after == [0]  # the context let go of the worker thread after each call
    assert device.memory == {} and device.pinned == [] and device.streams == []


class FakePycuda:
    """``pycuda.driver`` as far as ``PycudaDevice`` uses it, with CUDA's rule that a copy or an
    allocation runs in the context current in the calling thread (a per-thread stack)."""

    class Error(Exception):
        pass

    def __init__(self):
        self.stacks = threading.local()
        self.events: list[tuple[str, str]] = []  # (call, thread)
        self.copies: list[tuple] = []  # (call, dst, src, stream)
        self.freed: list[int] = []  # device addresses freed, by free() or by the garbage collector
        self._next = 0x7000
        driver = self

        class Context:
            def __init__(self):
                self.detached = False

            def push(self):
                driver._stack().append(self)
                driver.events.append(("push", threading.current_thread().name))

            @staticmethod
            def pop():
                if not driver._stack():
                    raise driver.Error("cannot pop non-current context")
                driver._stack().pop()
                driver.events.append(("pop", threading.current_thread().name))

            def detach(self):
                self.detached = True

        class Device:
            def __init__(self, index):
                self.index = index

            def retain_primary_context(self):
                driver.context = Context()
                return driver.context

            def name(self):
                return "Orin"

            def compute_capability(self):
                return (8, 7)

        class Allocation:
            """pycuda's DeviceAllocation: freed by free() or when garbage collected."""

            def __init__(self, ptr):
                self.ptr = ptr
                self.free = weakref.finalize(self, driver.freed.append, ptr)

            def __int__(self):
                return self.ptr

        class Stream:
            def __init__(self):
                self.handle, self.synchronized = 0x5151, 0

            def synchronize(self):
                self.synchronized += 1

        self.Context, self.Device, self.Allocation, self.Stream = Context, Device, Allocation, Stream

    def _stack(self) -> list:
        if not hasattr(self.stacks, "items"):
            self.stacks.items = []
        return self.stacks.items

    def _need_context(self, what):
        if not self._stack() or self._stack()[-1] is not self.context:
            raise self.Error(f"{what}: invalid device context")
        self.events.append((what, threading.current_thread().name))

    def init(self):
        pass

    def memcpy_htod_async(self, dst, src, stream):
        self._need_context("memcpy_htod_async")
        self.copies.append(("memcpy_htod_async", dst, src, stream))

    def memcpy_dtoh_async(self, dst, src, stream):
        self._need_context("memcpy_dtoh_async")
        self.copies.append(("memcpy_dtoh_async", dst, src, stream))

    def mem_alloc(self, nbytes):
        self._need_context("mem_alloc")
        self._next += 0x1000
        return self.Allocation(self._next)


def test_pycuda_device_makes_its_context_current_in_each_calling_thread(monkeypatch):
    driver, device = _pycuda_device(monkeypatch)
    assert device.name == "Orin" and device.compute_capability == (8, 7)
    assert driver._stack() == []  # the constructing thread is not left holding the context
    with pytest.raises(BackendError, match="invalid device context"):
        device.copy_to_device(0x5000, np.zeros(3, np.float32), None)  # outside active(): CUDA refuses

    errors = []

    def worker():
        try:
            with device.active():
                device.copy_to_device(0x5000, np.zeros(3, np.float32), None)
            assert driver._stack() == []
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker, name="worker")
    thread.start()
    thread.join()
    assert not errors, errors
    assert [e for e in driver.events if e[1] == "worker"] == [
        ("push", "worker"),
        ("memcpy_htod_async", "worker"),
        ("pop", "worker"),
    ]
    device.close()
    assert driver.context.detached and driver._stack() == []


def _pycuda_device(monkeypatch):
    from edgecap.trt.cuda import PycudaDevice

    driver = FakePycuda()
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return driver, PycudaDevice(0)


def test_pycuda_device_copies_on_its_stream_and_keeps_its_allocations(monkeypatch):
    """The backend uploads, runs the engine and downloads on one stream, then synchronises that
    stream once (engines/README.md, "Runtime behaviour"): both copies must be queued on that
    stream (pycuda's stream None is the default stream, which a synchronize of ours does not
    wait for), and synchronize must wait for it. pycuda frees a DeviceAllocation when it is
    garbage collected, so the device keeps each one until free()."""
    import gc

    driver, device = _pycuda_device(monkeypatch)
    host = np.arange(16, dtype=np.float32)
    with device.active():
        stream = device.create_stream()
        ptr = device.alloc(64)
        gc.collect()
        assert driver.freed == []  # still allocated: the engine will write there
        device.copy_to_device(ptr, host, stream)
        device.copy_to_host(host, ptr, stream)
        device.synchronize(stream)
        device.free(ptr)
    assert [(call, dst, src) for call, dst, src, _ in driver.copies] == [
        ("memcpy_htod_async", ptr, host),
        ("memcpy_dtoh_async", host, ptr),
    ]
    assert all(copy[3] is stream for copy in driver.copies)
    assert stream.synchronized == 1 and device.stream_handle(stream) == 0x5151
    assert driver.freed == [ptr]


def test_pycuda_device_lets_go_of_the_context_and_the_error_when_a_call_fails(monkeypatch):
    """A failure inside ``with device.active():`` (a step that raises) still pops the context
    from the thread (cuda.py: current "for its duration"), and an exception that is not a CUDA
    error (here a TypeError from pycuda) reaches the caller as it is, not swallowed."""
    driver, device = _pycuda_device(monkeypatch)
    with pytest.raises(KeyError, match="a step failed"):
        with device.active():
            raise KeyError("a step failed")
    assert driver._stack() == []

    def refuse(dst, src, stream):
        raise TypeError("expected a contiguous buffer")

    monkeypatch.setattr(driver, "memcpy_htod_async", refuse)
    with device.active(), pytest.raises(TypeError, match="contiguous"):
        device.copy_to_device(0x8000, np.zeros(3, np.float32), None)


def test_cuda_python_device_copies_and_waits_on_its_stream_and_gives_the_gpu_back():
    """cuda-python: both copies go on the device's stream (77, what the fake cudaStreamCreate
    returns), synchronize and destroy_stream act on it, and the thread's own GPU (0) is current
    again after ``with device.active():`` on GPU 1 also when the block raises."""
    rt = make_fake_cudart()
    dev = CudaPythonDevice(1, cudart=rt)
    with dev.active():
        stream = dev.create_stream()
        host = dev.host_array((2, 3), np.float32)
        dev.copy_to_device(0xABC000, host, stream)
        dev.copy_to_host(host, 0xABC000, stream)
        dev.synchronize(stream)
        dev.destroy_stream(stream)
        dev.free_host(host)
    assert [args[3:] for name, args in rt.calls if name == "cudaMemcpyAsync"] == [(1, 77), (2, 77)]
    assert ("cudaStreamSynchronize", (77,)) in rt.calls and ("cudaStreamDestroy", (77,)) in rt.calls
    del rt.calls[:]
    with pytest.raises(BackendError, match="a step failed"):
        with dev.active():
            raise BackendError("a step failed")
    assert [args for name, args in rt.calls if name == "cudaSetDevice"] == [(1,), (0,)]


def test_open_device_takes_pycuda_when_both_are_installed(monkeypatch):
    """cuda.py: "pycuda when installed, else cuda-python" (engines/README.md: cuda-python is
    what edgecap uses when pycuda is missing)."""
    from edgecap.trt.cuda import PycudaDevice, open_device

    rt = make_fake_cudart()
    cuda = types.ModuleType("cuda")
    cuda.bindings = types.ModuleType("cuda.bindings")
    cuda.bindings.runtime = rt
    for name, module in (("cuda", cuda), ("cuda.bindings", cuda.bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, module)
    _pycuda_device(monkeypatch)
    assert type(open_device()) is PycudaDevice
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert type(open_device()) is CudaPythonDevice


def test_an_engine_without_an_execution_context_is_a_clear_error():
    from edgecap.backends.tensorrt import execution_context

    out_of_memory = types.SimpleNamespace(create_execution_context=lambda: None)  # what TensorRT returns
    with pytest.raises(BackendError, match="execution context for the encoder engine .out of GPU memory"):
        execution_context(out_of_memory, "the encoder engine")


def test_close_drops_contexts_and_engines_even_when_the_context_cannot_be_made_current(
    monkeypatch, tmp_path, model_dir, device
):
    install(monkeypatch, "10.3.0.30", device)
    backend = TensorRTBackend(
        load_manifest(model_dir), "fp16", Limits(1, 3), tmp_path, cuda_device=device, log=io.StringIO()
    )

    @contextlib.contextmanager
    def broken():
        raise BackendError("CUDA error while making the GPU's CUDA context current: context is destroyed")
        yield

    monkeypatch.setattr(device, "active", broken)
    with pytest.raises(BackendError, match="context is destroyed"):
        backend.close()
    # TensorRT's objects are released before the device, not left to the garbage collector
    assert "_contexts" not in backend.__dict__ and "_engines" not in backend.__dict__


def test_close_releases_the_execution_contexts_and_engines_while_the_backend_lives(
    monkeypatch, tmp_path, model_dir, device
):
    """close() frees the engines' GPU memory (the contexts' activation memory, the engines'
    weights) then, not when the backend object is garbage collected: a closed backend kept in a
    variable (``with TensorRTBackend(...) as backend:``) or by a server must not hold them. The
    device buffers kept the contexts' dict, so only the backend's own name went (real TensorRT:
    a context keeps its engine alive, pyCore.cpp's keep_alive)."""
    import gc

    install(monkeypatch, "10.3.0.30", device)
    with TensorRTBackend(
        load_manifest(model_dir), "fp32", Limits(1, 2), tmp_path, cuda_device=device, log=io.StringIO()
    ) as backend:
        held = [weakref.ref(x) for x in (*backend._contexts.values(), *backend._engines.values())]
    gc.collect()
    assert len(held) == 4 and [ref() for ref in held] == [None] * 4


def test_beam_step_engine_sees_each_steps_blocked_words_or_none():
    """search="graph" uploads blocked_words (R, MAX_BLOCKED ids) only when the rules set some
    and -1s (no word) when they set none: the engine must never run on the blocks of an earlier
    step or an earlier search (it would forbid words the rules allow). FAKE engine and buffers:
    the engine's device blocked_words is a numpy array that ``upload`` writes."""
    from edgecap.backends.tensorrt_beam import RESULTS, TensorRTBeamSession
    from edgecap.build.beam_step import MAX_BLOCKED
    from edgecap.decoding.graph_search import GraphRules

    rows, vocab = 2, 6
    seen = []

    class Engine:
        rows_none_blocked = 0
        results = RESULTS
        fixed, carried = {"tag_bias": (rows, vocab)}, {"steered": (rows,)}
        sets = [{"steered": 0}, {"steered": 0}]
        ptr = dict.fromkeys(("scores", "blocked_words", "tag_bias", *RESULTS), 0)

        def upload_to(self, ptr, name, values, stream):
            pass

        device_block = np.full((rows, MAX_BLOCKED), 12345, np.int32)  # never written yet

        def upload(self, name, values, stream):
            if name == "blocked_words":
                assert values.dtype == np.int32 and values.shape[1] == MAX_BLOCKED
                self.device_block[: len(values)] = values

        def set_shape(self, name, shape):
            if name == "blocked_words":
                assert shape[1:] == (MAX_BLOCKED,)

        def bind(self, name, ptr):
            pass

        def live_context(self):
            return types.SimpleNamespace(
                execute_async_v3=lambda stream: seen.append(self.device_block.copy()) or True
            )

        def download(self, name, n, stream):
            return np.zeros(
                n,
                np.int32
                if name in ("next_tokens", "back_pointers", "choices", "end_positions")
                else np.float32,
            )

    tensor = types.SimpleNamespace(ptr=0, tail=(vocab,))
    buffers = types.SimpleNamespace(
        stream=None,
        tensor=lambda name: tensor,
        state=lambda i: (tensor, tensor),
        upload=lambda name, values: None,
        upload_bias=lambda bias, n: None,
        synchronize=lambda: None,
    )
    backend = types.SimpleNamespace(
        check_session=lambda *a: buffers, _device=types.SimpleNamespace(stream_handle=lambda s: 0)
    )
    engine = Engine()
    none = np.full((rows, MAX_BLOCKED), -1, np.int32)
    first, later = none.copy(), none.copy()
    first[:, 0] = 3  # a word a caption never starts with
    later[1, 0] = 4  # a word that would repeat an n-gram of row 1
    # (rows, each step's blocks): searches in turn on the same engine, the last with more rows
    # than the one before (whose no-block -1s covered its one row only, the second still
    # holding the second search's block)
    searches = [(2, [first, None, later, None]), (2, [first]), (1, [None]), (2, [None])]
    for r, blocks in searches:
        session = TensorRTBeamSession(backend, engine, 1, 1, 1, r)
        session.rules = GraphRules({"tag_bias": np.zeros((r, vocab))}, {"steered": np.zeros(r)}, None, None)
        for block in blocks:
            result = session.step(
                np.zeros(r), np.zeros(r), np.zeros(r), None, None if block is None else block[:r]
            )
            assert set(vars(result)) == set(RESULTS)
    want = [(r, none if b is None else b) for r, blocks in searches for b in blocks]
    assert len(seen) == len(want)
    for got, (r, block) in zip(seen, want):
        np.testing.assert_array_equal(got[:r], block[:r])


def test_fake_build_command_line_flags_reach_the_engines(monkeypatch, tmp_path, model_dir, device, capsys):
    """``edgecap build`` as typed: --precision names the engines' precision (fp16 without it,
    as its --help says), --max-beam up to 2 x top_k is built (a constrained search of top_k
    beams takes 2 x top_k rows) and one more refused; a bad --max-batch or a model whose file
    fails its checksum is exit 2, one line, before any engine is built."""
    from edgecap.cli import main

    install(monkeypatch, "10.3.0.30", device)
    monkeypatch.setattr("edgecap.trt.cuda.open_device", lambda: device)
    top_k = load_manifest(model_dir).dims.top_k

    def build(out, *flags):
        code = main(["build", "--model", str(model_dir), "--out", str(tmp_path / out), *flags])
        captured = capsys.readouterr()
        built = sorted(p.name for p in (tmp_path / out).glob("*.engine"))
        return code, captured.err, built

    # fp16: the decoder step FP16 behind the FP32 encoder, the engines caption loads
    for flags, step, encoder in (
        ((), "fp16", "fp32"),
        (("--precision", "fp32"), "fp32", "fp32"),
        (("--precision", "fp16"), "fp16", "fp32"),
    ):
        code, err, built = build(f"p-{step}-{len(flags)}", *flags, "--max-beam", "3")
        assert code == 0, err
        assert [name.split("-")[0] for name in built] == ["decoder_step", "encoder"], built
        assert f"-{step}-" in built[0] and f"-{encoder}-" in built[1], built

    code, err, built = build("widest", "--max-beam", str(2 * top_k), "--max-batch", "1")
    assert code == 0, err
    assert sorted(n.rsplit("-", 1)[1] for n in built) == ["b1.engine", f"b1k{2 * top_k}.engine"]

    for flags, words in (
        (("--max-beam", str(2 * top_k + 1)), f"--max-beam {2 * top_k + 1}: this model searches at most"),
        (("--max-batch", "0"), "--max-batch must be a positive integer, got 0"),  # as serve says it
        (("--max-beam", "0"), "--max-beam must be a positive integer, got 0"),
    ):
        code, err, built = build("refused", *flags)
        assert (code, built) == (2, []), err
        assert err.startswith("edgecap build: error: ") and words in err and err.count("\n") == 1

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "encoder.onnx").write_bytes((broken / "encoder.onnx").read_bytes()[:-10])
    assert main(["build", "--model", str(broken), "--out", str(tmp_path / "from-broken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecap build: error: ") and "checksum" in err and err.count("\n") == 1
    assert not list((tmp_path / "from-broken").glob("*.engine"))


def test_fake_build_refuses_a_batch_no_command_runs_before_any_work(
    monkeypatch, tmp_path, model_dir, device, capsys
):
    """``edgecap build --max-batch N`` above 64, edgecap caption's largest --batch-size (its
    --help: "1 to 64"; no command runs a larger batch), is exit 2 and one line naming the flag
    and its range, as caption says it for --batch-size, with nothing written to the engine
    cache (the graphs were prepared there and engines of 10**12 images asked of TensorRT);
    64 itself is built, and --help states the range."""
    import re

    from edgecap.cli import main

    install(monkeypatch, "10.3.0.30", device)
    monkeypatch.setattr("edgecap.trt.cuda.open_device", lambda: device)
    for n in ("65", str(10**12)):
        out = tmp_path / n
        assert main(["build", "--model", str(model_dir), "--out", str(out), "--max-batch", n]) == 2
        assert capsys.readouterr().err == (
            "edgecap build: error: --max-batch must be between 1 and 64 (edgecap caption's largest "
            f"--batch-size), got {n}\n"
        )
        assert not out.exists()
    out = tmp_path / "64"
    assert (
        main(["build", "--model", str(model_dir), "--out", str(out), "--max-batch", "64", "--max-beam", "1"])
        == 0
    )
    assert sorted(p.name.rsplit("-", 1)[1] for p in out.glob("*.engine")) == ["b64.engine", "b64k1.engine"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--max-batch N most images per batch the engines accept, 1 to 64\b", usage), usage


def test_fp32_engines_of_an_fp16_model_directory_are_refused_before_tensorrt_is_looked_for(
    monkeypatch, model_dir
):
    """``edgecap build --precision fp32`` on an FP16 model directory: the model's problem is said
    first, on a machine without TensorRT too (before: "TensorRT is not installed", and once it
    was installed, the refusal of the model)."""
    import dataclasses

    import edgecap.trt as trt_package
    from edgecap.errors import ModelError

    def no_tensorrt():
        raise AssertionError("TensorRT looked for before the model was checked")

    monkeypatch.setattr(trt_package, "import_tensorrt", no_tensorrt)
    half = dataclasses.replace(load_manifest(model_dir), precision="fp16")
    with pytest.raises(ModelError, match="is fp16; build fp32 engines from the fp32 model directory"):
        build_all(half, "fp32", Limits(1, 3))


@pytest.mark.parametrize("precision", ["int8", "FP16", "fp8"])
def test_a_precision_without_tensorrt_engines_is_refused_before_tensorrt_is_looked_for(
    monkeypatch, model_dir, precision
):
    """TensorRT engines are fp16 or fp32 (engines/README.md): any other precision given to the
    backend or to ``build_all`` is a ValueError naming the two, before TensorRT is looked for,
    not engines of the default FP16 built and loaded under it."""
    import edgecap.trt as trt_package

    def no_tensorrt():
        raise AssertionError("TensorRT looked for before the precision was checked")

    monkeypatch.setattr(trt_package, "import_tensorrt", no_tensorrt)
    manifest = load_manifest(model_dir)
    refused = rf"precision must be one of \('fp16', 'fp32'\), not '{precision}'"
    with pytest.raises(ValueError, match=refused):
        TensorRTBackend(manifest, precision, Limits(1, 1))
    with pytest.raises(ValueError, match=refused):
        build_all(manifest, precision, Limits(1, 1))


def test_fake_engine_cache_a_new_build_recipe_prepares_its_graph_anew(
    monkeypatch, tmp_path, model_dir, device
):
    """``BUILD_RECIPE`` covers "the graph it hands TensorRT after folding": raised, the engines
    get new names and are built again, and so must the folded graph they are built from (the
    engines had been rebuilt from the folded copy an older recipe left in the cache)."""
    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)
    manifest = load_manifest(model_dir)
    _cache(trt, device, tmp_path, io.StringIO()).build(manifest, "encoder", "fp32", Limits(1, 1))
    before = set(tmp_path.glob("encoder-*-folded.onnx"))
    monkeypatch.setattr(engines, "BUILD_RECIPE", engines.BUILD_RECIPE + 1)
    _cache(trt, device, tmp_path, io.StringIO()).build(manifest, "encoder", "fp32", Limits(1, 1))
    after = set(tmp_path.glob("encoder-*-folded.onnx"))
    assert len(before) == 1 and len(after) == 2
    (new,) = after - before
    assert trt.stats["builds"][-1]["onnx"] == new.read_bytes()  # the engine built from it


def test_fake_engine_cache_a_full_disk_at_the_timing_cache_keeps_the_engine(
    monkeypatch, tmp_path, model_dir, device
):
    """The timing cache only speeds up later builds: a disk too full to save it (an engine of
    hundreds of MB just written on a Jetson's small disk) is a note, and the engine, minutes of
    building, is saved. It had been a raw OSError, the engine lost."""
    import errno

    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)
    real = engines._atomic_write

    def full_disk_for_the_timing_cache(path, data):
        if path.name.startswith("timing-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(engines, "_atomic_write", full_disk_for_the_timing_cache)
    log = io.StringIO()
    path = _cache(trt, device, tmp_path, log).build(load_manifest(model_dir), "encoder", "fp32", Limits(1, 1))
    assert path.exists()
    assert "could not save the TensorRT timing cache" in log.getvalue() and "No space left" in log.getvalue()


def test_fake_engine_cache_a_full_disk_at_the_prepared_graph_is_one_error(
    monkeypatch, tmp_path, model_dir, device
):
    """The folded graph an engine is built from cannot be saved (a full disk: the write names no
    file): the engine cache's error that names the folder and how to choose another, not a raw
    OSError."""
    import errno

    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engines, "_atomic_write", full_disk)
    with pytest.raises(BackendError, match=r"cannot save TensorRT engines in .*No space left.*EDGECAP_CACHE"):
        _cache(trt, device, tmp_path, io.StringIO()).build(
            load_manifest(model_dir), "encoder", "fp32", Limits(1, 1)
        )


def test_fake_engine_cache_an_error_on_the_model_is_not_blamed_on_the_cache(
    monkeypatch, tmp_path, model_dir, device
):
    """Preparing the graph to build from reads the model's file and writes the cache's: a model
    graph gone from its folder after the model was loaded is the OSError naming that file, not
    "cannot save TensorRT engines in <cache>" (whose advice, another cache folder, would not
    help); a cache file that cannot be created (a read-only mount: the error names the
    temporary file) is that cache error, naming the folder and how to choose another."""
    import builtins
    import errno

    import edgecap.trt.engines as engines

    trt = install(monkeypatch, "10.3.0.30", device)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = load_manifest(copy)
    graph = manifest.path("encoder")
    graph.unlink()
    with pytest.raises(FileNotFoundError) as gone:
        _cache(trt, device, tmp_path / "engines", io.StringIO()).build(
            manifest, "encoder", "fp32", Limits(1, 1)
        )
    assert Path(gone.value.filename) == graph

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(engines, "open", read_only, raising=False)
    cache_dir = tmp_path / "read-only"
    with pytest.raises(
        BackendError,
        match=r"cannot save TensorRT engines in .*read-only .*Read-only file system.*EDGECAP_CACHE",
    ):
        _cache(trt, device, cache_dir, io.StringIO()).build(
            load_manifest(model_dir), "encoder", "fp32", Limits(1, 1)
        )
    assert trt.stats["builds"] == []


def test_every_tensor_the_beam_step_appends_is_kept_in_fp32_by_its_name():
    """The beam-step graph's bookkeeping pinned to FP32 in a weakly typed FP16 build: a layer
    is its when it writes a tensor named under the bookkeeping's prefix, or one of the graph's
    outputs the bookkeeping adds (``BEAM_OUTPUTS``: scores, back-pointers, ...) or the fused
    language models' (``LM_OUTPUTS``), each kind on its own; the decoder step's own are not."""
    from edgecap.build.beam_step import BEAM_OUTPUTS, LM_OUTPUTS, PREFIX
    from edgecap.trt.engines import _beam_tensor

    assert _beam_tensor(PREFIX + "scores") and _beam_tensor(PREFIX + "anything")
    assert all(_beam_tensor(name) for name in BEAM_OUTPUTS if not name.startswith(PREFIX))
    assert LM_OUTPUTS and all(_beam_tensor(name) for name in LM_OUTPUTS)
    assert not any(_beam_tensor(name) for name in ("logits", "h_out", "topk_logprobs", "alpha"))
