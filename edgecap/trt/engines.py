"""Building TensorRT engines from a model directory, and the engine cache.

An engine is tied to its GPU and TensorRT version, so its file name encodes everything it
depends on: the role, the ONNX file's SHA-256, GPU name and compute capability, TensorRT version,
precision, edgecap's build recipe (``BUILD_RECIPE``) and the profile limits, e.g.::

    decoder_step-3f2a9c0d1e2b4a5c-orin-sm87-trt10.3-fp16-r1-b8k5.engine

Lookup reuses any cached engine of the same model, GPU, TensorRT version and precision whose
limits cover the request (``EngineCache.covering``), so the 8-image x 5-beam engines that
``edgecap build`` makes by default serve ``edgecap caption --backend tensorrt`` with any batch size
up to 8 and beam size up to 5. Cached files that fail to deserialize (another TensorRT build, a
truncated write) are skipped for the next covering one, and when none loads an engine for
exactly the requested limits is built. Builds
share one timing cache per GPU and TensorRT version (``timing-<gpu>-sm<cc>-trt<ver>.cache``).

Precision: FP16 uses ``BuilderFlag.FP16`` on TensorRT < 10.12 (Softmax, the Log of a
LogSoftmax, TopK and the other parts the FP16 ONNX keeps in FP32 pinned to FP32), and from
10.12 (11 has no such flag) a strongly typed network built from the FP16 ONNX that ``edgecap
convert`` writes (converted on the fly into the cache when the model is FP32). FP16 engines of
an FP32 model directory run the decoder step in FP16 behind an FP32 encoder engine by default
(``role_precisions``): the FP16 that keeps the captions, as the torch backend's ``fp16=True`` is.

Not yet run on real TensorRT: tested with fakes of the calls below (tests/test_tensorrt_fake.py).
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgecap.cache import cache_root
from edgecap.contract import DECODER_STEP, ENCODER, IO, ROLES, Limits
from edgecap.errors import BackendError, ModelError
from edgecap.extras import install_hint
from edgecap.manifest import Manifest, file_sha256
from edgecap.trt import STRONGLY_TYPED_FP16_FROM, parse_version

if TYPE_CHECKING:  # the TensorRT API's types (tensorrt-stubs); never imported at run time
    import tensorrt

    from edgecap.trt import TensorRTModule

PRECISIONS = ("fp16", "fp32")
WORKSPACE_BYTES = 1 << 30  # the builder's scratch space; 1 GiB fits the smallest Orin Nano
# How edgecap builds an engine (the graph it hands TensorRT after folding, the builder flags, the
# layers kept in FP32, TF32 off), part of every engine's file name: bump it on any change of
# that, so that engines an older edgecap built and cached are built again, not reused.
BUILD_RECIPE = 1


def role_precisions(manifest: Manifest, precision: str, fp32_encoder: bool | None = None) -> dict[str, str]:
    """Each graph's engine precision for engines of ``precision``. FP16 engines run the decoder
    step in FP16 behind an FP32 encoder engine (``fp32_encoder``; None: when the model directory
    is FP32, the only one an FP32 engine is built from): the FP16 that keeps the captions, 98.6-99.4%
    of FP32's in torch's emulation of FP16 against 92% with the encoder in FP16 too
    (docs/gpu-search.md). ``fp32_encoder=False``: the encoder in FP16 as well, for speed."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    check_buildable(manifest, precision)  # before TensorRT is looked for
    if precision == "fp32":
        if fp32_encoder:
            raise ValueError(
                "fp32_encoder=True goes with fp16 engines (an FP16 decoder step behind an FP32 "
                "encoder); fp32 engines are FP32 already"
            )
        return {role: "fp32" for role in ROLES}
    if fp32_encoder is None:
        fp32_encoder = manifest.precision == "fp32"
    elif fp32_encoder and manifest.precision != "fp32":
        raise ModelError(
            f"{manifest.directory} is {manifest.precision}: an FP32 encoder engine is built from "
            "the fp32 model directory; build from that one, or set fp32_encoder=False"
        )
    return {ENCODER: "fp32" if fp32_encoder else "fp16", DECODER_STEP: "fp16"}


def check_buildable(manifest: Manifest, precision: str) -> None:
    """A ``ModelError`` for a model directory no engine of ``precision`` is built from: an int8
    one (whatever the encoder), and for fp32 engines one that is not FP32 (its FP16 weights would
    be filed under fp32)."""
    if manifest.precision == "int8":
        raise ModelError(
            f"{manifest.directory}: TensorRT engines are built from an fp32 or fp16 model directory, not int8"
        )
    if precision == "fp32" and manifest.precision != "fp32":
        raise ModelError(
            f"{manifest.directory} is {manifest.precision}; build fp32 engines from the fp32 model directory"
        )


def precision_label(precisions: dict[str, str]) -> str:
    """The engines' precision in words: "fp16", "fp32", or "fp16 decoder, fp32 encoder"."""
    if precisions[ENCODER] == precisions[DECODER_STEP]:
        return precisions[ENCODER]
    return f"{precisions[DECODER_STEP]} decoder, {precisions[ENCODER]} encoder"


def profile_shapes(
    role: str,
    input_shapes: dict[str, tuple[int, ...]],
    limits: Limits,
    ranges: dict[str, tuple[int, int, int]] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes per network input: the row dimension from ``limits`` (or
    ``ranges``: input -> (min, opt, max) rows), the others must be static in the ONNX."""
    ranges = ranges or limits.row_ranges(role)
    if set(input_shapes) != set(ranges):
        raise ModelError(
            f"{role}: the ONNX inputs are {sorted(input_shapes)}, the contract "
            f"expects {sorted(ranges)}; re-export the model"
        )
    shapes = {}
    for name, shape in input_shapes.items():
        tail = tuple(int(d) for d in shape[1:])
        if any(d < 0 for d in tail):
            raise ModelError(
                f"{role}: input {name!r} has shape {tuple(shape)}; only the first "
                "(row) dimension may be dynamic. Re-export the model"
            )
        lo, opt, hi = ranges[name]
        shapes[name] = ((lo, *tail), (opt, *tail), (hi, *tail))
    return shapes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


@dataclass(frozen=True)
class Target:
    """What an engine is tied to."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def trt(self) -> tuple[int, int]:
        return parse_version(self.trt_version)

    def tag(self) -> str:
        major, minor = self.compute_capability
        return f"{_slug(self.gpu_name)}-sm{major}{minor}-trt{self.trt_version}"


def parse_tag(role: str, tag: str) -> tuple[int, int | None] | None:
    """``Limits.tag`` read back: 'b8k5' -> (8, 5) for the step, 'b8' -> (8, None) for the
    encoder; None for anything else."""
    pattern = r"b([1-9][0-9]*)" if role == "encoder" else r"b([1-9][0-9]*)k([1-9][0-9]*)"
    match = re.fullmatch(pattern, tag)
    if match is None:
        return None
    return int(match.group(1)), (int(match.group(2)) if role != "encoder" else None)


def engine_filename(role: str, model_sha256: str, target: Target, precision: str, limits: Limits) -> str:
    return f"{role}-{model_sha256[:16]}-{target.tag()}-{precision}-r{BUILD_RECIPE}-{limits.tag(role)}.engine"


def timing_cache_path(cache_dir: Path, target: Target) -> Path:
    return cache_dir / f"timing-{target.tag()}.cache"


def default_cache_dir() -> Path:
    """``$EDGECAP_CACHE/engines``, else ``$XDG_CACHE_HOME/edgecap/engines``, else
    ``~/.cache/edgecap/engines``."""
    return cache_root() / "engines"


def fp16_mode(trt: TensorRTModule, version: tuple[int, int]) -> str:
    """'flag' (BuilderFlag.FP16 on an FP32 network) or 'strongly_typed' (FP16 ONNX)."""
    if version >= STRONGLY_TYPED_FP16_FROM or not hasattr(trt.BuilderFlag, "FP16"):
        return "strongly_typed"
    return "flag"


def network_flags(trt: TensorRTModule, version: tuple[int, int], strongly_typed: bool) -> int:
    flags = 0
    kinds = trt.NetworkDefinitionCreationFlag
    if version < (10, 0):  # explicit batch: required on 8.x, the only mode (deprecated) later
        flags |= 1 << int(kinds.EXPLICIT_BATCH)
    if strongly_typed:
        if not hasattr(kinds, "STRONGLY_TYPED"):
            raise BackendError(
                f"this TensorRT ({trt.__version__}) has neither BuilderFlag.FP16 "
                "nor strongly typed networks; build with --precision fp32"
            )
        flags |= 1 << int(kinds.STRONGLY_TYPED)
    return flags


def model_hash(manifest: Manifest, role: str) -> str:
    return manifest.sha256.get(role) or file_sha256(manifest.path(role))


def onnx_for_build(
    manifest: Manifest, role: str, precision: str, mode: str, cache_dir: Path, log=sys.stderr
) -> Path:
    """The ONNX file to parse, made once and kept in the cache: the model's graph with its
    constant chains folded (``edgecap.build.convert.fold_constants``: TensorRT's parser wants
    stored constants where the exporter left small computations), converted to FP16 first for a
    strongly typed FP16 build of an FP32 model."""
    check_buildable(manifest, precision)
    to_half = precision == "fp16" and manifest.precision == "fp32" and mode != "flag"
    kind = "fp16" if to_half else manifest.precision
    # the recipe in the name too: a recipe that folds otherwise must not reuse an older graph
    prepared = cache_dir / f"{role}-{model_hash(manifest, role)[:16]}-{kind}-r{BUILD_RECIPE}-folded.onnx"
    if not prepared.exists():
        what = "converting to FP16 and folding" if to_half else "folding the constants of"
        print(f"edgecap: {what} {manifest.path(role).name} for TensorRT -> {prepared}", file=log)
        onnx = _onnx_to_prepare_graphs()
        from edgecap.build.convert import fold_constants, to_fp16

        model = onnx.load(str(manifest.path(role)))
        if to_half:
            model = to_fp16(model)
        _atomic_write(prepared, fold_constants(model).SerializeToString())
    return prepared


def _onnx_to_prepare_graphs():
    """The onnx package, which preparing a graph for a TensorRT build needs (a ``BackendError``
    saying how to install it when it is missing)."""
    try:
        import onnx
    except ImportError as exc:
        raise BackendError(
            "building TensorRT engines needs onnx to prepare the graphs: pip install onnx "
            f"(or {install_hint('tensorrt')})"
        ) from exc
    return onnx


def beam_step_onnx(
    manifest: Manifest,
    beam: int,
    end_id: int,
    precision: str,
    mode: str,
    cache_dir: Path,
    log=sys.stderr,
    lms=None,
) -> Path:
    """The beam-step graph to parse, made once and kept in the cache: the step graph as
    ``onnx_for_build`` prepares it (folded; FP16 for a strongly typed FP16 build), then the beam
    bookkeeping appended, in FP32, on its float32 outputs (``edgecap.build.beam_step``); with
    ``lms`` (everyday, in-domain) the fused language models' step too, in FP32."""
    from edgecap.build.beam_step import BEAM_STEP_VERSION, lm_suffix

    step = onnx_for_build(manifest, DECODER_STEP, precision, mode, cache_dir, log)
    prepared = step.with_name(f"beam{beam}-end{end_id}-v{BEAM_STEP_VERSION}{lm_suffix(lms)}-{step.name}")
    if not prepared.exists():
        onnx = _onnx_to_prepare_graphs()
        from edgecap.build.beam_step import beam_step_model

        dims = manifest.dims
        model = beam_step_model(
            onnx.load(str(step)), beam, end_id, dims.top_k, dims.hidden_dim, dims.vocab_size, lms
        )
        _atomic_write(prepared, model.SerializeToString())
    return prepared


def _atomic_write(path: Path, data) -> None:
    """``data`` to ``path`` through a temporary file, on the disk before the rename (an engine
    takes minutes to build on a Jetson, whose power may be cut at any time: the rename must not
    put the engine's name on data still in the page cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    # a name of this writer's own: the process id alone is shared by two threads building one
    # engine, and by two containers' processes (each often pid 1) sharing a mounted cache; the
    # second's rename then found the file gone (FileNotFoundError: "cannot save TensorRT
    # engines ... choose a writable cache folder"), or renamed the first's half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no partly written file is left behind
        tmp.unlink(missing_ok=True)
        raise


ORPHAN_AGE_S = 600  # a temporary file written to more recently may still be being written


def _remove_orphans(path: Path) -> None:
    """Remove the temporary files of ``path`` left by a process that no longer runs (a power
    cut or a kill mid-write: an engine's hundreds of MB on a Jetson's small disk) and not
    written to for ``ORPHAN_AGE_S``: a process of another container sharing the cache is not
    seen by ``os.kill`` here, and its write may be under way. POSIX only (``os.kill(pid, 0)``
    asks whether a process exists; on Windows it would signal it)."""
    if os.name != "posix":
        return
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        pid = orphan.name[len(path.name) + 2 : -len(".tmp")].split(".")[0]
        if not pid.isdigit():
            continue
        try:
            if time.time() - orphan.stat().st_mtime < ORPHAN_AGE_S:
                continue
        except OSError:  # gone already
            continue
        if int(pid) == os.getpid():  # an earlier process of this pid (a container's pid 1, after a power cut)
            orphan.unlink(missing_ok=True)
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: its write will never finish
            orphan.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # another user's process, or no pid at all
            continue


def _is_float(trt: TensorRTModule, dtype: tensorrt.DataType) -> bool:
    return dtype in (trt.float32, trt.float16)


@dataclass(frozen=True)
class Islands:
    """The FP32 islands of an ONNX graph for a weakly typed FP16 build: ``tensors``, the outputs
    of the nodes that the FP16 ONNX keeps in FP32 (``edgecap.build.convert.fp32_nodes``: the
    attention and word logits' projections, the mask's ``Where``, the word bias, the encoder's
    stem and first blocks, ...); ``named``, every tensor name of the graph, so that the layers
    TensorRT's parser makes of one node (a Gemm: a matrix product, then the bias added) are told
    apart from the next node's by the unnamed tensors between them."""

    tensors: frozenset[str] = frozenset()
    named: frozenset[str] = frozenset()


def fp32_islands(onnx_path: Path) -> Islands:
    """The ``Islands`` of the graph at ``onnx_path`` (the folded FP32 graph a flag build parses)."""
    onnx = _onnx_to_prepare_graphs()
    from edgecap.build.convert import fp32_nodes

    graph = onnx.load(str(onnx_path)).graph
    keep = {name for name in fp32_nodes(graph) if name}  # an unnamed node is no island's
    tensors = {out for node in graph.node if node.name in keep for out in node.output if out}
    named = {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    named |= {t for node in graph.node for t in (*node.input, *node.output) if t}
    return Islands(frozenset(tensors), frozenset(named))


def _island_layers(network: tensorrt.INetworkDefinition, islands: Islands) -> set[int]:
    """The indices of the layers that compute an island's tensors: each layer writing one, and
    back from it through the tensors that are no ONNX tensor's (the parser's own, between the
    layers it made of that node) to the layers writing those."""
    producer: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = i
    todo = [producer[name] for name in islands.tensors if name in producer]
    found: set[int] = set()
    while todo:
        i = todo.pop()
        if i in found:
            continue
        found.add(i)
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None and tensor.name not in islands.named and tensor.name in producer:
                todo.append(producer[tensor.name])
    return found


def _pin_fp32_layers(
    trt: TensorRTModule, network: tensorrt.INetworkDefinition, islands: Islands = Islands()
) -> None:
    """Weakly typed FP16 builds: keep Softmax and TopK layers, the Log (a unary layer) that
    TensorRT's ONNX parser puts after the Softmax of a LogSoftmax, the layers of ``islands``
    (the parts the FP16 ONNX keeps in FP32, among them the attention and word logits) and the
    beam-step graph's bookkeeping (scores, comparisons, its top-k) in FP32. Preferred rather
    than obeyed (``PREFER_PRECISION_CONSTRAINTS``), so a build never fails over it. Only layers
    that read or write a float are pinned (the bookkeeping's integer and bool layers, its index
    casts and comparisons of word ids, keep their own types: a layer of integer tensors may only
    take its input or output type as its precision), and only float outputs are retyped: TopK's
    second output (the indices) is INT32 and stays so."""
    in_islands = _island_layers(network, islands)
    kinds = trt.LayerType
    pinned = {getattr(kinds, name) for name in ("SOFTMAX", "TOPK") if hasattr(kinds, name)}
    unary = getattr(kinds, "UNARY", None)
    shuffle = getattr(kinds, "SHUFFLE", None)
    softmax_out: set[str] = set()  # tensors holding a Softmax's result (maybe reshaped)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in pinned
        if layer.type in (unary, shuffle) and layer.num_inputs > 0:
            source = layer.get_input(0)
            from_softmax = source is not None and source.name in softmax_out
            if from_softmax and layer.type == shuffle:
                softmax_out.update(layer.get_output(j).name for j in range(layer.num_outputs))
            pin = pin or (from_softmax and layer.type == unary)
        # the beam-step graph's scores and comparisons (edgecap.build.beam_step)
        pin = pin or any(_beam_tensor(layer.get_output(j).name) for j in range(layer.num_outputs))
        # an island's layers that write a float (not the shape layers the parser reads a
        # float tensor's shape with: pinned, TensorRT warns of a layer forced to INT32)
        pin = pin or (i in in_islands and _writes_float(trt, layer))
        if layer.type == getattr(kinds, "SOFTMAX", None):
            softmax_out.update(layer.get_output(j).name for j in range(layer.num_outputs))
        if not pin or not _touches_float(trt, layer):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if _is_float(trt, layer.get_output(j).dtype):
                layer.set_output_type(j, trt.float32)


def _writes_float(trt: TensorRTModule, layer: tensorrt.ILayer) -> bool:
    return any(_is_float(trt, layer.get_output(j).dtype) for j in range(layer.num_outputs))


def _touches_float(trt: TensorRTModule, layer: tensorrt.ILayer) -> bool:
    """Whether ``layer`` reads or writes a float tensor (optional inputs absent are None)."""
    tensors = [layer.get_input(j) for j in range(layer.num_inputs)]
    tensors += [layer.get_output(j) for j in range(layer.num_outputs)]
    return any(t is not None and _is_float(trt, t.dtype) for t in tensors)


def _beam_tensor(name: str) -> bool:
    """A tensor of the beam bookkeeping that ``edgecap.build.beam_step`` appends."""
    from edgecap.build.beam_step import BEAM_OUTPUTS, LM_OUTPUTS, PREFIX

    return name.startswith(PREFIX) or name in BEAM_OUTPUTS or name in LM_OUTPUTS


def _dims(shape: tensorrt.Dims) -> tuple[int, ...]:
    """A ``Dims`` as a tuple (``Dims`` is indexable and sized; its stub declares no __iter__)."""
    return tuple(int(shape[j]) for j in range(len(shape)))


def build_engine(
    trt: TensorRTModule,
    logger: tensorrt.ILogger,
    onnx_path: Path,
    role: str,
    limits: Limits,
    precision: str,
    target: Target,
    timing_cache: Path | None,
    ranges: dict[str, tuple[int, int, int]] | None = None,
    log=sys.stderr,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with one optimisation profile
    (``ranges``: its inputs' rows, when not the role's ``Limits.row_ranges``); ``log``: edgecap's
    own notes (TensorRT's go to its logger)."""
    version = target.trt
    mode = fp16_mode(trt, version) if precision == "fp16" else None
    strongly_typed = mode == "strongly_typed" or (
        version >= (11, 0) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    )
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, version, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")

    inputs = {network.get_input(i).name: _dims(network.get_input(i).shape) for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default (Ampere and later: Orin, A100, H100): FP32 convolutions and
        # matrix products would round their inputs to 10-bit mantissas. An "fp32" engine is FP32,
        # and an FP16 engine's FP32 layers (the encoder's stem and first blocks, the softmaxes,
        # the beam bookkeeping) are kept for their precision, measured in FP32
        config.clear_flag(trt.BuilderFlag.TF32)
    if mode == "flag":
        config.set_flag(trt.BuilderFlag.FP16)
        if hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS"):
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            _pin_fp32_layers(trt, network, fp32_islands(Path(onnx_path)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(role, inputs, limits, ranges).items():
        try:
            # tuples for Dims: TensorRT's bindings convert any int sequence (8.5 through 10.13;
            # the stubs say so in Dims' docstring but type the parameters as Dims only)
            profile.set_shape(name, lo, opt, hi)  # type: ignore[arg-type]
        except (RuntimeError, TypeError, ValueError) as exc:
            raise BackendError(
                f"TensorRT refused the {role} engine's shapes for {name!r} "
                f"(min {lo}, opt {opt}, max {hi}): {exc}"
            ) from exc
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"TensorRT refused the {role} engine's optimisation profile (see its log above)")

    use_timing_cache = timing_cache is not None and _set_timing_cache(config, timing_cache, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(
            f"TensorRT failed to build the {role} engine from {onnx_path} (its log above says why)"
        )
    if use_timing_cache and timing_cache is not None:
        try:
            _atomic_write(timing_cache, config.get_timing_cache().serialize())
        except OSError as exc:  # a full disk: the engine built is kept, the next build times afresh
            print(
                f"edgecap: could not save the TensorRT timing cache {timing_cache} "
                f"({exc.strerror or exc}); the engine is kept",
                file=log,
            )
    return bytes(serialized)


def _set_timing_cache(config: tensorrt.IBuilderConfig, path: Path, log) -> bool:
    """The builder's timing cache from ``path`` (a new one when there is none, or when the file
    cannot be read as one); False, with a note in ``log``, when TensorRT refuses it (the build
    then times its layers afresh and the file is left as it is). The cache's file name holds the
    GPU and the TensorRT version (``EngineCache``), so a mismatch is refused, not ignored."""
    blob = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(blob)
    if cache is None and blob:
        print(f"edgecap: the TensorRT timing cache {path} could not be read; starting a new one", file=log)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"edgecap: TensorRT refused the timing cache {path}; building without it", file=log)
        return False
    return True


def deserialize(trt: TensorRTModule, runtime: tensorrt.Runtime, path: Path) -> tensorrt.ICudaEngine | None:
    """The engine in ``path``, or None when it cannot be loaded (another TensorRT or GPU,
    a truncated file)."""
    try:
        return runtime.deserialize_cuda_engine(path.read_bytes())
    except Exception:  # TensorRT raises or returns None depending on version and fault
        return None


class EngineCache:
    """Loads engines from ``cache_dir``, building (and saving) the ones missing or unloadable."""

    def __init__(
        self, trt: TensorRTModule, target: Target, cache_dir: str | Path | None = None, log=sys.stderr
    ):
        self.trt = trt
        self.target = target
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.log = log
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)

    def path(self, manifest: Manifest, role: str, precision: str, limits: Limits) -> Path:
        return self.cache_dir / engine_filename(
            role, model_hash(manifest, role), self.target, precision, limits
        )

    def build(self, manifest: Manifest, role: str, precision: str, limits: Limits) -> Path:
        """Build and save one engine (replacing any cached one); returns its path."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        path = self.path(manifest, role, precision, limits)
        self._check_writable()
        mode = fp16_mode(self.trt, self.target.trt) if precision == "fp16" else "fp32"
        try:
            source = onnx_for_build(manifest, role, precision, mode, self.cache_dir, self.log)
        except OSError as exc:  # the prepared graph not saved in the cache: a full disk
            raise self._unsaved(exc) from exc
        print(
            f"edgecap: building the TensorRT {precision} {role} engine for "
            f"{self.target.gpu_name} (TensorRT {self.target.trt_version}); this takes a "
            f"while, once -> {path}",
            file=self.log,
        )
        self._build_into(path, source, role, limits, precision)
        return path

    def _build_into(
        self,
        path: Path,
        source: Path,
        role: str,
        limits: Limits,
        precision: str,
        ranges: dict[str, tuple[int, int, int]] | None = None,
    ) -> None:
        """Build the engine of ``source`` and write it to ``path`` (atomically)."""
        data = build_engine(
            self.trt,
            self.logger,
            source,
            role,
            limits,
            precision,
            self.target,
            timing_cache_path(self.cache_dir, self.target),
            ranges=ranges,
            log=self.log,
        )
        try:
            _atomic_write(path, data)
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _fresh(self, path: Path) -> tensorrt.ICudaEngine:
        """The engine just built at ``path``; one that does not deserialize is an error."""
        engine = deserialize(self.trt, self.runtime, path)
        if engine is None:
            raise BackendError(
                f"the freshly built engine {path} does not deserialize; see TensorRT's log above"
            )
        return engine

    def _check_writable(self) -> None:
        """Fail before a long build, not after it, when the cache cannot take the engine."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.cache_dir, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _unsaved(self, exc: OSError) -> OSError | BackendError:
        """``_unwritable`` for an error writing a file of the cache (its temporary file named, or
        no file: a write or fsync on a full disk); ``exc`` itself for another file's (the model's)."""
        if exc.filename is not None and Path(exc.filename).parent != self.cache_dir:
            return exc
        return self._unwritable(exc)

    def _unwritable(self, exc: OSError) -> BackendError:
        return BackendError(
            f"cannot save TensorRT engines in {self.cache_dir} ({exc}); choose "
            "a writable cache folder: cache_dir=DIR, `edgecap build --out DIR` "
            "or EDGECAP_CACHE=DIR"
        )

    def covering(self, manifest: Manifest, role: str, precision: str, limits: Limits) -> list[Path]:
        """Cached engines for this model, GPU, TensorRT version and precision whose profile
        covers ``limits`` (at least as many images, and for the step at least as many beams),
        narrowest first: an engine built for 8 images x 5 beams serves a request for 4 x 3."""
        prefix = f"{role}-{model_hash(manifest, role)[:16]}-{self.target.tag()}-{precision}-r{BUILD_RECIPE}-"
        found = []
        for path in self.cache_dir.glob(glob.escape(prefix) + "b*.engine"):
            cached = parse_tag(role, path.name[len(prefix) : -len(".engine")])
            if cached is None:
                continue
            batch, beam = cached
            if batch >= limits.max_batch and (beam is None or beam >= limits.max_beam):
                found.append(((batch * (beam or 1), batch, beam or 0), path))
        return [path for _, path in sorted(found)]

    def load(self, manifest: Manifest, role: str, precision: str, limits: Limits) -> tensorrt.ICudaEngine:
        """The deserialized engine: the narrowest cached one that covers ``limits``, else one
        built now for exactly ``limits`` (also when no cached one loads)."""
        candidates = self.covering(manifest, role, precision, limits)
        exact = self.path(manifest, role, precision, limits)
        for i, path in enumerate(candidates):
            engine = deserialize(self.trt, self.runtime, path)
            if engine is not None:
                return self._checked(engine, role)
            # the exact engine comes first (the narrowest): it is rebuilt only when no wider
            # cached engine loads after it
            rebuilt = path == exact and i == len(candidates) - 1
            print(
                f"edgecap: cached engine {path.name} does not load with this TensorRT/GPU (another "
                "TensorRT build's, cut short, or too little free GPU memory to load it); "
                + ("rebuilding it" if rebuilt else "skipping it"),
                file=self.log,
            )
        if not candidates:
            print(
                f"edgecap: no cached TensorRT engine for {manifest.path(role).name} "
                f"({precision}, {limits.tag(role)} or larger) in {self.cache_dir}",
                file=self.log,
            )
        return self._checked(self._fresh(self.build(manifest, role, precision, limits)), role)

    def load_beam(
        self, manifest: Manifest, beam: int, end_id: int, precision: str, limits: Limits, lms=None
    ) -> tensorrt.ICudaEngine:
        """The beam-step engine (``edgecap.build.beam_step``) for ``beam`` beams per image and
        exactly ``limits``: the cached one, else one built now from the step graph as the step
        engine's build prepares it, with the bookkeeping appended (and with ``lms``, the
        language models (everyday, in-domain) the engine steps too)."""
        from edgecap.build.beam_step import BEAM_STEP_VERSION, beam_io, lm_suffix, row_ranges

        # the graph's version in the name: an edgecap that appends another graph builds anew;
        # the language models' digest: other models, another engine
        role = f"beam_step{beam}-end{end_id}-v{BEAM_STEP_VERSION}{lm_suffix(lms)}"
        path = self.cache_dir / engine_filename(
            role, model_hash(manifest, DECODER_STEP), self.target, precision, limits
        )
        engine = deserialize(self.trt, self.runtime, path) if path.exists() else None
        if engine is None:
            self._check_writable()
            mode = fp16_mode(self.trt, self.target.trt) if precision == "fp16" else "fp32"
            try:
                source = beam_step_onnx(
                    manifest, beam, end_id, precision, mode, self.cache_dir, self.log, lms
                )
            except OSError as exc:  # the prepared graph not saved in the cache: a full disk
                raise self._unsaved(exc) from exc
            fused = "" if lms is None else ", the language models in it"
            print(
                f"edgecap: building the TensorRT {precision} beam-step engine ({beam} beams{fused}) "
                f"for {self.target.gpu_name}; this takes a while, once -> {path}",
                file=self.log,
            )
            ranges = row_ranges(limits, beam, lms is not None)
            self._build_into(path, source, role, limits, precision, ranges=ranges)
            engine = self._fresh(path)
        return self._checked(engine, role, beam_io(lms is not None))

    def _checked(
        self,
        engine: tensorrt.ICudaEngine,
        role: str,
        io: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> tensorrt.ICudaEngine:
        inputs, outputs = io or IO[role]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        found_in = {n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT}
        if found_in != set(inputs) or set(names) - found_in != set(outputs):
            raise ModelError(
                f"{role} engine has I/O {sorted(names)}; the contract expects "
                f"inputs {list(inputs)} and outputs {list(outputs)}. "
                "Re-export the model"
            )
        return engine


def build_all(
    manifest: Manifest,
    precision: str = "fp16",
    limits: Limits = Limits(),
    cache_dir: Path | None = None,
    device=None,
    log=sys.stderr,
    fp32_encoder: bool | None = None,
) -> list[Path]:
    """``edgecap build``: build (or rebuild) both engines for this GPU, each at its precision
    (``role_precisions``: the ones ``TensorRTBackend`` of the same arguments loads); returns
    their paths."""
    from edgecap.trt import import_tensorrt
    from edgecap.trt.cuda import open_device

    precisions = role_precisions(manifest, precision, fp32_encoder)
    trt = import_tensorrt()
    owned = device is None
    device = device or open_device()
    try:
        target = Target(device.name, tuple(device.compute_capability), trt.__version__)
        cache = EngineCache(trt, target, cache_dir, log)
        return [cache.build(manifest, role, precisions[role], limits) for role in ROLES]
    finally:
        if owned:
            device.close()
