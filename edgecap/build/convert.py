"""Precision conversion of a model directory: FP32 ONNX -> FP16 (or int8) ONNX, without torch.

FP16 keeps the numerically delicate parts in FP32: the encoder CNN's stem and first 4 blocks
(24% of its multiply-adds; see ``ENCODER_FP32_BLOCKS``), every Softmax, LogSoftmax and TopK, the
attention logits (the nodes computing the Softmax input, up to and including the projection that
produces them; the same rule keeps the image classifier in FP32), the word logits (the projection
feeding the LogSoftmax, through the never-generated mask), and what reads the step's log-
probabilities (the word bias ``Add``, the ``GatherElements`` of the top K). Graph inputs and
outputs stay float32 / int32, so the backend contract in ``edgecap.contract`` holds for a
converted directory and every backend runs it unchanged.

The FP16 ONNX is also what a strongly typed TensorRT network is built from (TensorRT >= 10.12,
where ``BuilderFlag.FP16`` is deprecated, and 11, where it is gone).

int8: the decoder step gets dynamic quantization of its MatMul / Gemm weights; the encoder gets
static quantization (BatchNorms folded first; QOperator form, uint8 activations, per-channel
7-bit int8 weights (``REDUCE_RANGE``), 99.999th-percentile activation ranges) calibrated on a
folder of photos when one is given, and stays FP32 otherwise. The statically quantised encoder
keeps its stem, first 2 blocks and everything after the CNN in FP32 (see
``INT8_ENCODER_FP32_BLOCKS``).

Needs ``onnx`` (which brings ``ml_dtypes``) and ``onnxruntime`` (its ``transformers.float16``
converter, which imports ``packaging``; ``onnxconverter-common`` is used when that module is
missing). int8 also uses ``onnxruntime.quantization`` (imports ``ml_dtypes``), and the static
encoder quantization (``calibration``) runs ``quant_pre_process``, whose symbolic shape
inference needs ``sympy``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgecap.contract import CLASSES, ENCODER_OUTPUTS, FILE_ROLES, ROLES, STEP_OUTPUTS, VOCAB
from edgecap.errors import BackendError, ModelError
from edgecap.extras import install_hint
from edgecap.files import same_file, short_name
from edgecap.manifest import MANIFEST, Manifest, file_sha256, graph_source, load_manifest, verify_files
from edgecap.models.config import ENCODER_FP32_BLOCKS, INT8_ENCODER_FP32_BLOCKS

PRECISIONS = ("fp16", "int8")

# The static encoder's int8 weights are quantised to 7 bits (onnxruntime's ``reduce_range``).
# The uint8 x int8 kernels of x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add pairs of
# products in 16 bits, which saturates with 8-bit weights (2 * 255 * 127 > 32767) but not with
# 7-bit ones (2 * 255 * 63).
# A model file moves between machines, so the one format that is right on all of them is written.
# Measured on the shipped encoder (2-core AMD EPYC, AVX2, no VNNI; calibrated on 2 example
# photos, 28 photos checked): 8-bit weights gave feature error 0.43 on onnxruntime where the exact
# integer arithmetic of onnx's reference evaluator gives 0.154 for the same file; 7-bit: 0.241 on
# onnxruntime, 0.242 exact. int8 x int8 activations (no saturation either) ran 4x slower than
# FP32 there (no fast kernel), so they are not used. The decoder step's dynamic int8 keeps 8-bit
# weights: there the two agree (the step's log-probabilities within 0.056 of FP32 with 8 bits,
# 0.050 with 7, its h 0.042 vs 0.079; best words identical on both), so 7 bits would only lose.
REDUCE_RANGE = True

# Kept in FP32 wherever they occur: reductions over a whole row, where FP16 loses the most.
FP32_OP_TYPES = ("Softmax", "LogSoftmax", "TopK")
# Ops that only move data; walked through when looking for what computes a Softmax's input.
_VIEW_OPS = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Identity", "Cast"}
_PROJECTION_OPS = {"MatMul", "Gemm"}
_CONSTANT_OPS = {"Constant", "ConstantOfShape", "Expand"}


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise BackendError(f"converting a model needs onnx: {install_hint('convert')}") from exc
    return onnx


def _float16_converter():
    """The FP32 -> FP16 graph converter: onnxruntime's copy, else onnxconverter-common's."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        try:
            from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        except ImportError as exc:
            raise BackendError(
                "FP16 conversion needs onnxruntime (pip install onnxruntime) or "
                "onnxconverter-common (pip install onnxconverter-common)"
            ) from exc
    return convert_float_to_float16, list(DEFAULT_OP_BLOCK_LIST)


def name_nodes(graph) -> None:
    """Give every unnamed node a unique name (block lists refer to nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def fp32_nodes(graph, word_logits: bool = True) -> list[str]:
    """Names of the nodes to keep in FP32: every Softmax / LogSoftmax / TopK, and for each
    Softmax the chain computing its input (the attention logits): view ops, then the first
    compute node, and when that is a bias ``Add`` fed by a MatMul / Gemm, that projection too;
    for each LogSoftmax the word logits' chain: view ops, the mask's ``Where``, and the
    projection (a Gemm, or a bias ``Add`` and the MatMul feeding it); the word bias ``Add`` and
    ``GatherElements`` reading the log-probabilities; and in the encoder, its stem and first
    ``ENCODER_FP32_BLOCKS`` blocks. ``word_logits=False``: without the word logits' chain (the
    int8 step's rule, measured with that projection quantised)."""
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    keep: list[str] = []

    def add(node) -> None:
        if node.name not in keep:
            keep.append(node.name)

    def views_from(name: str):
        """The first node computing ``name`` that is not a view op, the view ops kept."""
        src = producer.get(name)
        while src is not None and src.op_type in _VIEW_OPS:
            add(src)
            src = producer.get(src.input[0])
        return src

    def projections_into(add_node) -> list:
        return [
            feeder
            for feeder in (producer.get(name) for name in add_node.input)
            if feeder is not None and feeder.op_type in _PROJECTION_OPS
        ]

    for node in _encoder_stem_and_first_blocks(graph, ENCODER_FP32_BLOCKS):
        add(node)
    log_softmax_outputs = {o for n in graph.node if n.op_type == "LogSoftmax" for o in n.output}
    for node in graph.node:
        if node.op_type in ("Add", "GatherElements") and log_softmax_outputs & set(node.input):
            add(node)  # the step's word bias and the gathered log-probabilities stay exact
            for name in node.input:  # and so does the bias on its way in (the export's Cast)
                src = producer.get(name)
                while src is not None and src.op_type in _VIEW_OPS:
                    add(src)
                    src = producer.get(src.input[0])
        if node.op_type not in FP32_OP_TYPES:
            continue
        add(node)
        if node.op_type == "Softmax":
            src = views_from(node.input[0])
            if src is None:
                continue
            add(src)
            if src.op_type == "Add":
                for feeder in projections_into(src):
                    add(feeder)
        elif node.op_type == "LogSoftmax" and word_logits:
            # the word logits: through the never-generated mask's Where to their projection
            src = views_from(node.input[0])
            while src is not None and src.op_type == "Where":
                add(src)
                src = views_from(_varying_input(src, producer, initializers))
            if src is not None and src.op_type in _PROJECTION_OPS:
                add(src)
            elif src is not None and src.op_type == "Add" and projections_into(src):
                add(src)
                for feeder in projections_into(src):
                    add(feeder)
    return keep


def _varying_input(where, producer: dict, initializers: set) -> str:
    """The value input of a ``Where`` (X or Y) that is not a constant: the tensor it masks."""
    for name in where.input[1:]:
        src = producer.get(name)
        if name not in initializers and (src is None or src.op_type not in _CONSTANT_OPS):
            return name
    return where.input[2]


def _encoder_stem_and_first_blocks(graph, n_blocks: int) -> list:
    """The EfficientNet encoder graph's nodes before its block ``n_blocks`` (the exporter names
    them after the PyTorch modules: ``/_conv_stem/Conv`` ... ``/_blocks.4/...``); none for any
    other graph. The graph is a chain in topological order, so "before" is list order."""
    if not any(node.name == "/_conv_stem/Conv" for node in graph.node):
        return []
    first: list = []
    for node in graph.node:
        if node.name.startswith(f"/_blocks.{n_blocks}/"):
            return first
        first.append(node)
    return []  # no such block: not the encoder this rule was measured on


def to_fp16(model):
    """An FP32 ``onnx.ModelProto`` -> a mixed FP16 one with float32 graph I/O (see module doc)."""
    onnx = _import_onnx()
    convert, op_block_list = _float16_converter()
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    name_nodes(model.graph)
    keep = fp32_nodes(model.graph)
    converted = convert(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(op_block_list) | set(FP32_OP_TYPES)),
        node_block_list=keep,
    )
    drop_cast_round_trips(converted.graph)
    # The converter appends its Cast nodes at the end; onnx's checker and TensorRT's parser
    # want the nodes in topological order.
    sort_nodes(converted.graph)
    onnx.checker.check_model(converted)
    return converted


def drop_cast_round_trips(graph) -> None:
    """Remove the FP32 -> FP16 -> FP32 cast pairs the converter puts between two FP32 nodes
    (e.g. LogSoftmax -> TopK, or TopK -> a float32 graph output): they would round the very
    values that were kept in FP32. The second cast then reads the FP32 tensor directly."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is not None and cast_to(first) == TensorProto.FLOAT16:
            node.input[0] = first.input[0]
    consumed = {name for node in graph.node for name in node.input}
    outputs = {o.name for o in graph.output}
    dead = [
        n
        for n in graph.node
        if cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in consumed and n.output[0] not in outputs
    ]
    for node in dead:
        graph.node.remove(node)


def fold_constants(model):
    """``model`` (an ``onnx.ModelProto``, changed in place and returned) with every node whose
    inputs are all constants (initializers, Constant nodes, or outputs of nodes folded before)
    replaced by initializers holding its outputs, evaluated with onnx's reference runtime.

    The exporter writes no constant folding (so the initializers keep the PyTorch names), which
    leaves small constant chains such as ``Unsqueeze(Constant)`` feeding a Slice's axes or a
    ``Reshape(Constant)`` feeding TopK's K. TensorRT's ONNX parser wants those as stored
    constants (8.5 to 10.x reject a Slice whose axes are computed); onnxruntime folds them
    itself, so the engines are built from a folded copy (``edgecap.trt.engines``)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, folded = [], []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (
            node.domain not in ("", "ai.onnx")
            or not set(node.output).isdisjoint(outputs)
            or not all(name in values for name in inputs)
        ):
            kept.append(node)
            continue
        results = ReferenceEvaluator(node).run(None, {name: values[name] for name in inputs})
        for name, value in zip(node.output, results):
            values[name] = np.asarray(value)
            folded.append(numpy_helper.from_array(np.asarray(value), name))
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(folded)
        used = {name for node in graph.node for name in node.input} | outputs
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)
    return model


def sort_nodes(graph) -> None:
    """Reorder ``graph.node`` topologically (stable: keeps the given order where it is valid)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            names = ", ".join(n.name for n in rest[:5])
            raise ModelError(f"graph {graph.name!r} has a cycle or a missing input at: {names}")
        pending = rest
    copies = [type(n).FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _check_graph_io(original, converted, path: Path) -> None:
    """The converted graph must keep the contract's names and element types."""

    def io(model):
        return {
            v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)
        }

    if io(original) != io(converted):
        raise ModelError(
            f"{path}: conversion changed the graph inputs/outputs "
            f"({io(original)} -> {io(converted)}); please report this"
        )


def _prepare_out_dir(source: Manifest, out: Path, force: bool) -> None:
    if out.resolve() == source.directory.resolve():
        raise ModelError(f"{out}: the output directory must differ from the model directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ModelError(
            f"{out}: directory exists and is not empty; choose another --out or pass --force to overwrite"
        )
    kept = decoding_files(source)  # a broken one is refused before anything is written
    _refuse_links_into_the_source(source, out, [*source.files.values(), *kept, MANIFEST])
    out.mkdir(parents=True, exist_ok=True)


def _refuse_links_into_the_source(source: Manifest, out: Path, names: Iterable[str]) -> None:
    """A file of OUT_DIR that is one of the source's (``cp -rs`` or ``cp -al`` of the model made
    the folder, then --force): refused before anything is written, naming both. Each output file
    replaces the one there (``_write_file``), but a folder of OUT_DIR linked to the source's
    would still take it, and what was asked for would leave a model beside its own links."""
    sources = [source.directory / name for name in names]
    for name in names:
        for original in sources:
            if same_file(out / name, original):
                raise ModelError(
                    f"{out / name}: the same file as {original} (a link into the model "
                    "directory): converting into it would change the model itself; choose "
                    "another --out, or remove the links from it"
                )


def _write_file(target: Path, write: Callable[[Path], object]) -> None:
    """Make ``target``, a file of OUT_DIR: ``write(path)`` writes it under its name in a hidden
    folder beside it, which is then renamed over it. A link there (a copy made with ``cp -rs``
    or ``cp -al``) is replaced, never written through into the file it points at; an OSError of
    the hidden file names ``target``. A file the manifest names in a subfolder (``graphs/``) gets
    that subfolder in OUT_DIR."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        hidden = Path(tempfile.mkdtemp(prefix=f".{short_name(target.name)}.convert-", dir=target.parent))
    except OSError as exc:  # a read-only OUT_DIR: named as the file asked for, not the hidden one
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    try:
        partial = hidden / target.name
        try:
            write(partial)
            os.replace(partial, target)
        except OSError as exc:
            if exc.filename is not None and str(hidden) in str(exc.filename):
                raise OSError(exc.errno, exc.strerror, str(target)) from exc
            raise
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def _copy_file(source: Path, target: Path) -> None:
    _write_file(target, lambda path: shutil.copy2(source, path))


def _unmake_earlier_model(out: Path) -> None:
    """Remove the manifest of the model a --force conversion replaces, just before the first of
    the new model's graphs takes its file's name: a conversion stopped from then on (Ctrl-C, a
    SIGTERM, a full disk) leaves a folder that is no model, not the new graph beside the earlier
    one's under the earlier manifest, which loaded and captioned silently (a graph's checksum is
    compared only when it fails to load). The new manifest is written last."""
    (out / MANIFEST).unlink(missing_ok=True)


def _write_manifest(source: Manifest, out: Path, precision: str, note: dict) -> Manifest:
    from edgecap.confidence import CONFIDENCE_FILE
    from edgecap.decoding.fusion import remove_fusion

    for role in (VOCAB, CLASSES):  # the JSON files come along unchanged
        _copy_file(source.path(role), out / source.files[role])
    kept = decoding_files(source)
    # --force: an earlier model's would be loaded with this one (its language models' files:
    # left behind). Removed only now, the new graphs written: a conversion stopped before then
    # (Ctrl-C, a refused graph) leaves the earlier model whole, not silently without them.
    remove_fusion(out)  # the source's, when it has one, are copied in after
    if CONFIDENCE_FILE not in kept:
        (out / CONFIDENCE_FILE).unlink(missing_ok=True)
    for name in kept:
        _copy_file(Path(source.directory) / name, out / name)
    sha = {role: file_sha256(out / source.files[role]) for role in FILE_ROLES}
    info = dict(source.info)
    info["converted_from"] = {
        "precision": source.precision,
        "sha256": dict(source.sha256),
        "tool": "edgecap convert",
        **note,
    }
    manifest = replace(source, directory=out, precision=precision, sha256=sha, info=info)
    manifest = manifest.with_optional_files()  # naming the optional files copied, and only those
    manifest.save()
    return manifest


def decoding_files(source: Manifest) -> list[str]:
    """The files of the model's decoding that no precision changes, which a converted model
    keeps: the fused caption language models (``fusion.json`` and the two weight files it names
    and checksums) and the confidence model (``confidence.json``); without them a converted model
    would caption without the everyday language and give no confidence. Each is loaded here, so
    a broken one is a ``ModelError`` naming it."""
    from edgecap.confidence import CONFIDENCE_FILE, ConfidenceModel
    from edgecap.decoding.fusion import FUSION_FILE, Fusion

    names = []
    fusion = Fusion.load(source.directory, source.dims.vocab_size, source.dims.n_classes)
    if fusion is not None:
        names += [FUSION_FILE, fusion.info["everyday"]["file"], fusion.info["in_domain"]["file"]]
    if ConfidenceModel.load(source.directory) is not None:
        names.append(CONFIDENCE_FILE)
    return names


def convert_fp16(source: Manifest, out: str | Path, force: bool = False) -> Manifest:
    """Write an FP16 copy of the FP32 model directory ``source`` to ``out``; return its manifest."""
    onnx = _import_onnx()
    out = Path(out)
    _require_fp32(source)
    _prepare_out_dir(source, out, force)
    for role in ROLES:
        original = onnx.load(str(source.path(role)))
        converted = to_fp16(original)
        _check_graph_io(original, converted, source.path(role))
        _unmake_earlier_model(out)
        _write_file(out / source.files[role], functools.partial(onnx.save, converted))
    islands = list(FP32_OP_TYPES) + ["attention logits", "word logits"]
    return _write_manifest(source, out, "fp16", {"fp32_ops": islands})


def _check_source_graphs(source: Manifest) -> None:
    """The source's graphs against its manifest, as a backend checks them on loading: a manifest
    that is not the graphs' (an edited size) makes a converted model no backend loads."""
    from edgecap.backends._checks import check_declared_io, load_failure

    onnx = _import_onnx()
    for role in ROLES:
        try:
            graph = onnx.load(str(source.path(role)), load_external_data=False).graph
        except Exception as exc:  # protobuf's DecodeError and friends
            raise load_failure(source, role, exc) from exc
        check_declared_io(source, role, graph)


def _require_fp32(source: Manifest) -> None:
    if source.precision != "fp32":
        raise ModelError(
            f"{source.directory}: precision is {source.precision!r}; convert "
            "from the FP32 model directory that `edgecap export` wrote"
        )


def int8_fp32_nodes(graph) -> list[str]:
    """The encoder's nodes that static int8 leaves in FP32: the stem and the first
    ``INT8_ENCODER_FP32_BLOCKS`` blocks, and every node after the CNN's head (its ReLU6 is the
    last CNN node: the classifier and the decoder-side projections follow)."""
    keep = [n.name for n in _encoder_stem_and_first_blocks(graph, INT8_ENCODER_FP32_BLOCKS)]
    names = [n.name for n in graph.node]
    if "/_conv_head/Conv" in names:
        keep += names[names.index("/_conv_head/Conv") + 2 :]
    return keep


# -- int8 --------------------------------------------------------------------------------------


def calibration_images(directory: str | Path, limit: int = 64) -> list[Path]:
    """Up to ``limit`` photos from ``directory`` (sorted, so calibration is repeatable): the
    image files below it that ``edgecap caption`` would caption in it (``edgecap.paths``: its
    extensions, hidden files and folders left out, such as the ``._IMG.JPG`` macOS writes)."""
    from edgecap.paths import hidden, image_extensions

    directory = Path(directory)
    if not directory.is_dir():  # (a photo named instead of its folder is there: not "not found")
        missing = not directory.exists()
        raise ModelError(
            f"calibration directory {'not found' if missing else 'is not a folder'}: {directory}"
        )
    extensions = image_extensions()
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in extensions and not hidden(p.relative_to(directory).parts)
    )
    if not files:
        raise ModelError(f"{directory}: no images (.jpg, .png, ...) to calibrate with")
    return files[:limit]


class _ImageReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over preprocessed photos."""

    def __init__(self, paths: Iterable[Path], manifest: Manifest):
        from edgecap.images import load_rgb
        from edgecap.preprocess import to_model_input

        self._batches = iter(
            [{"image": to_model_input(load_rgb(p), manifest.preprocessing)[None]} for p in paths]
        )

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # pragma: no cover - only called by some calibrators
        raise NotImplementedError


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs its warnings on the root logger: hold them back."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert_int8(
    source: Manifest, out: str | Path, calibration: str | Path | None = None, force: bool = False
) -> Manifest:
    """int8 copy of ``source``: dynamic int8 MatMul/Gemm weights in the decoder step (the
    attention-logit projection stays FP32); the encoder is statically quantized (QOperator, per
    channel) on ``calibration`` photos when given, else copied unchanged in FP32."""
    onnx = _import_onnx()
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        missing = (exc.name or "onnxruntime").split(".")[0]
        raise BackendError(
            f"int8 conversion needs {missing}, which is not installed: "
            f"pip install {missing} (onnxruntime is in edgecap's cpu and gpu extras; the rest: "
            f"{install_hint('convert')})"
        ) from exc
    paths: list[Path] = []
    reader = None
    if calibration is not None:
        try:  # quant_pre_process imports it only once it runs: fail before any work is done
            import sympy  # noqa: F401
        except ImportError as exc:
            raise BackendError(
                "static int8 quantization of the encoder (--calibration) needs "
                "sympy for onnxruntime's symbolic shape inference: pip install "
                f"sympy (or {install_hint('convert')})"
            ) from exc
        # a bad folder or an unreadable photo: refused before anything is written
        paths = calibration_images(calibration)
        reader = _ImageReader(paths, source)
    out = Path(out)
    _require_fp32(source)
    _prepare_out_dir(source, out, force)

    # onnxruntime's quantizer hands the paths it is given to onnx's C++ shape inference, which
    # refuses a name that is not UTF-8 (an OUT_DIR named in another encoding: a TypeError): its
    # files are written in a temporary folder of plain names and copied into OUT_DIR from there.
    with tempfile.TemporaryDirectory(prefix="edgecap-int8-") as work_dir:
        work = Path(work_dir)
        step_model = onnx.load(str(source.path("decoder_step")))
        name_nodes(step_model.graph)
        named_step, quantized_step = work / "decoder_step.named.onnx", work / "decoder_step.int8.onnx"
        onnx.save(step_model, str(named_step))
        with _quiet_root_logger():
            quantize_dynamic(
                str(named_step),
                str(quantized_step),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                nodes_to_exclude=fp32_nodes(step_model.graph, word_logits=False),
            )
        _unmake_earlier_model(out)
        _copy_file(quantized_step, out / source.files["decoder_step"])

        encoder_out = out / source.files["encoder"]
        if reader is None:
            _copy_file(source.path("encoder"), encoder_out)
            encoder_note = "fp32 (no --calibration given)"
        else:
            # Fold the BatchNorms into the convolutions first (the export keeps them apart), so
            # each Conv + ReLU6 becomes one QLinearConv; unfolded, the BatchNorms stay FP32
            # between quantize / dequantize pairs and the int8 encoder is slower than the FP32
            # one. QOperator with uint8 activations runs as QLinearConv chains: ~2x FP32 on our
            # AVX-512 VNNI CPU. The QDQ form measured 1.65x with uint8 activations and no gain
            # with int8 ones.
            prepared, quantized_encoder = work / "encoder.prepared.onnx", work / "encoder.int8.onnx"
            # Both print a warning for each int64 shape tensor of the "same" padding (not
            # quantizable, and rightly left alone): hundreds of lines of noise.
            with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
                quant_pre_process(str(source.path("encoder")), str(prepared))
                # Percentile (99.999, onnxruntime's default) ranges: feature error 0.218 vs 0.237
                # for min-max with everything int8 (the entropy calibrator, given 2048 bins,
                # clipped far too much: 0.81).
                quantize_static(
                    str(prepared),
                    str(quantized_encoder),
                    reader,
                    quant_format=QuantFormat.QOperator,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=REDUCE_RANGE,
                    calibrate_method=CalibrationMethod.Percentile,
                    nodes_to_exclude=int8_fp32_nodes(onnx.load(str(prepared)).graph),
                )
            _copy_file(quantized_encoder, encoder_out)
            encoder_note = (
                f"int8 static (QOperator, uint8 activations, per-channel 7-bit int8 weights, "
                f"percentile ranges; stem, first {INT8_ENCODER_FP32_BLOCKS} blocks and "
                f"the layers after the CNN in FP32), "
                f"calibrated on {len(paths)} images"
            )
    return _write_manifest(
        source, out, "int8", {"encoder": encoder_note, "decoder_step": "int8 dynamic (MatMul/Gemm weights)"}
    )


def convert_model_dir(
    model_dir: str | Path,
    out: str | Path,
    precision: str,
    calibration: str | Path | None = None,
    force: bool = False,
) -> Manifest:
    """``edgecap convert``: read and verify ``model_dir``, write the converted copy to ``out``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if calibration is not None and precision != "int8":
        raise ValueError("--calibration only applies to --precision int8")
    from edgecap.api import load_words

    source = load_manifest(model_dir)
    verify_files(source)
    load_words(source)  # what caption refuses (token ids, class list) is refused now, in its words
    _check_source_graphs(source)
    out = Path(out)
    made = not os.path.lexists(out)  # OUT_DIR is made here
    empty = not made and out.is_dir() and not any(out.iterdir())
    try:
        if precision == "fp16":
            return convert_fp16(source, out, force=force)
        return convert_int8(source, out, calibration=calibration, force=force)
    except BaseException:  # a full disk, a refused graph, Ctrl-C: no half-written OUT_DIR left,
        # which would make the corrected command fail with "directory exists and is not empty"
        if made:
            shutil.rmtree(out, ignore_errors=True)
        elif empty:
            for path in out.iterdir():
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise


# -- checking a converted model against its source, stage by stage ----------------------------


def compare_stages(
    reference: Manifest, candidate: Manifest, n_images: int = 2, n_beams: int = 3, seed: int = 0
) -> dict[str, float]:
    """Run both models on onnxruntime CPU with the same random inputs and return the largest
    absolute difference of each output: the encoder's four, then one decoder step (fed the
    reference encoder outputs so the two stages are judged apart). Also
    ``topk_ids_agree``: the fraction of rows whose best word is the same."""
    import onnxruntime as ort

    from edgecap.api import load_vocabulary

    start = load_vocabulary(reference).start  # as caption takes it: "tokens" may leave it out
    rng = np.random.default_rng(seed)
    h, w = reference.preprocessing.size
    images = rng.uniform(-1, 1, (n_images, 3, h, w)).astype(np.float32)

    def session(manifest: Manifest, role: str):
        return ort.InferenceSession(graph_source(manifest.path(role)), providers=["CPUExecutionProvider"])

    names = ENCODER_OUTPUTS
    ref_enc = dict(zip(names, session(reference, "encoder").run(list(names), {"image": images})))
    cand_enc = dict(zip(names, session(candidate, "encoder").run(list(names), {"image": images})))
    diffs = {k: float(np.abs(ref_enc[k] - cand_enc[k]).max()) for k in names}

    image_index = np.repeat(np.arange(n_images, dtype=np.int32), n_beams)
    rows = len(image_index)
    feeds = {
        "tokens": np.full(rows, start, np.int32),
        "h": ref_enc["h0"],
        "c": ref_enc["c0"],
        "source_rows": image_index.copy(),
        "features": ref_enc["features"],
        "att_proj": ref_enc["att_proj"],
        "image_index": image_index,
        "word_bias": np.zeros((rows, reference.dims.vocab_size), np.float32),
    }
    outs = STEP_OUTPUTS
    ref_step = dict(zip(outs, session(reference, "decoder_step").run(list(outs), feeds)))
    cand_step = dict(zip(outs, session(candidate, "decoder_step").run(list(outs), feeds)))
    for k in ("topk_logprobs", "h_out", "c_out", "alpha"):
        diffs[k] = float(np.abs(ref_step[k] - cand_step[k]).max())
    diffs["topk_ids_agree"] = float(np.mean(ref_step["topk_ids"][:, 0] == cand_step["topk_ids"][:, 0]))
    return diffs


__all__ = [
    "PRECISIONS",
    "FP32_OP_TYPES",
    "convert_model_dir",
    "convert_fp16",
    "convert_int8",
    "to_fp16",
    "fp32_nodes",
    "int8_fp32_nodes",
    "compare_stages",
    "calibration_images",
]
