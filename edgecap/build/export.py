"""Checkpoint -> self-describing model directory (``encoder.onnx``, ``decoder_step.onnx``,
``vocab.json``, ``manifest.json``), checked against PyTorch with onnxruntime.

The ONNX initializers keep the PyTorch parameter names (``encoder.<...>`` for EfficientNet-Lite0,
``decoder.<...>`` for the caption decoder; no constant folding at export, onnxruntime and
TensorRT fold at load), so the PyTorch reference backend rebuilds the very same weights from the
ONNX files and a model directory needs no second copy of them.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecap.contract import (
    CLASSES,
    DECODER_STEP,
    ENCODER,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FILE_ROLES,
    ROLES,
    STEP_INPUTS,
    STEP_OUTPUTS,
    VOCAB,
    ModelDimensions,
)
from edgecap.errors import ModelError
from edgecap.files import nearest_existing, short_name
from edgecap.manifest import MANIFEST, Manifest, file_sha256, graph_source, load_manifest
from edgecap.models.decoder import CaptionDecoder
from edgecap.models.efficientnet_lite import EfficientNetLite
from edgecap.models.graphs import EncoderGraph, StepGraph
from edgecap.objects import IMAGENET_CLASSES
from edgecap.preprocess import Preprocessing
from edgecap.vocab import Vocabulary

OPSET = 17
# Export check tolerances (max abs difference, FP32 onnxruntime vs FP32 PyTorch on the CPU).
TOLERANCE = {
    "features": 1e-3,
    "att_proj": 1e-3,
    "h0": 1e-4,
    "c0": 1e-4,
    "class_probs": 1e-4,
    "topk_logprobs": 1e-3,
    "h_out": 1e-4,
    "c_out": 1e-4,
    "alpha": 1e-4,
}


def example_step_inputs(
    decoder: CaptionDecoder, regions: int, n_images: int = 2, n_beams: int = 3, seed: int = 0
):
    """Random but valid step inputs (torch tensors), after the first step (S = R), for images
    of ``regions`` attention regions; a word bias that moves some words into the top K."""
    g = torch.Generator().manual_seed(seed)
    cfg = decoder.cfg
    rows = n_images * n_beams
    return (
        torch.randint(0, cfg.vocab_size, (rows,), generator=g, dtype=torch.int32),
        torch.randn(rows, cfg.hidden_dim, generator=g) * 0.5,
        torch.randn(rows, cfg.hidden_dim, generator=g) * 0.5,
        torch.randint(0, rows, (rows,), generator=g, dtype=torch.int32),
        torch.randn(n_images, regions, cfg.feature_dim, generator=g),
        torch.randn(n_images, regions, cfg.attention_dim, generator=g),
        torch.arange(n_images, dtype=torch.int32).repeat_interleave(n_beams),
        (torch.rand(rows, cfg.vocab_size, generator=g) < 0.01).float() * 20.0,
    )


def regions_of(pre: Preprocessing) -> int:
    """Attention regions of the encoder's map for the input size (EfficientNet: stride 32)."""
    h, w = pre.size
    return math.ceil(h / 32) * math.ceil(w / 32)


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes) -> None:
    module.eval()
    with warnings.catch_warnings():
        # The "same" padding is traced as constants: fine, the input size is fixed by the manifest.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # into memory: the exporter's binding takes only a file name it can encode as UTF-8, and
        # a folder may be named in another encoding (a file object: the TorchScript exporter's
        # own, which its type hints leave out)
        graph = io.BytesIO()
        torch.onnx.export(
            module,
            args,
            graph,  # type: ignore[arg-type]
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=False,
            dynamo=False,
        )
    path.write_bytes(graph.getvalue())


def _set_output_dims(path: Path, dims: dict[str, list[int]]) -> None:
    """Declare the non-row dimensions of the graph outputs as the numbers they are.

    The tracer leaves some symbolic (the 49 regions after the LayerNorm); TensorRT profiles and
    the runtime's checks want them static.
    """
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        for d, value in zip(out.type.tensor_type.shape.dim[1:], dims.get(out.name, [])):
            d.Clear()
            d.dim_value = value
    onnx.save(model, str(path))


def _fold_static_padding(path: Path, image_size: tuple[int, int]) -> None:
    """Put the encoder's "same" padding into its convolutions.

    The tracer computes each padding from the input's runtime shape (Shape, Sub, Cast ... into a
    Pad node), which onnxruntime cannot fold while the batch dimension is dynamic. The input size
    is fixed by the manifest, so the paddings are constants: read them once (one run on a
    1-image batch), fold each zero ``Pad`` that feeds a ``Conv`` into the Conv's ``pads``, and
    drop the arithmetic that computed them.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    pads = [n for n in graph.node if n.op_type == "Pad"]
    if not pads:
        return
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    # a Pad's inputs: data, pads (int64), the fill value (the data's type: float here)
    types = {
        n.input[i]: t
        for n in pads
        for i, t in ((1, onnx.TensorProto.INT64), (2, onnx.TensorProto.FLOAT))
        if i < len(n.input) and n.input[i]
    }
    wanted = list(types)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, types[name], None) for name in wanted)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {graph.input[0].name: np.zeros((1, 3, *image_size), np.float32)}
    values = dict(zip(wanted, session.run(wanted, feed)))
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for pad in pads:
        amounts = values[pad.input[1]].astype(np.int64)
        rank = len(amounts) // 2
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        fill = values[pad.input[2]] if len(pad.input) > 2 and pad.input[2] else 0.0
        consumers = users.get(pad.output[0], [])
        spatial_only = not amounts[:2].any() and not amounts[rank : rank + 2].any()
        if (
            mode == b"constant"
            and float(np.asarray(fill)) == 0.0
            and spatial_only
            and len(consumers) == 1
            and consumers[0].op_type == "Conv"
        ):
            conv = consumers[0]
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), None)
            extra = [int(v) for v in (*amounts[2:rank], *amounts[rank + 2 :])]
            merged = [a + b for a, b in zip(old or [0] * len(extra), extra)]
            for attribute in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
                conv.attribute.remove(attribute)
            conv.attribute.append(helper.make_attribute("pads", merged))
            conv.input[0] = pad.input[0]
        else:  # keep the Pad, with its amounts as a constant
            constant = numpy_helper.from_array(amounts, f"{pad.name or pad.output[0]}_pads")
            graph.initializer.append(constant)
            pad.input[1] = constant.name
    _drop_dead_nodes(graph)
    onnx.save(model, str(path))


def _drop_dead_nodes(graph) -> None:
    """Remove the nodes no graph output depends on."""
    needed = {o.name for o in graph.output}
    live = set()
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if any(name in needed for name in node.output):
            live.add(index)
            needed.update(node.input)
    for index in range(len(graph.node) - 1, -1, -1):
        if index not in live:
            del graph.node[index]


def export_modules(
    encoder: EfficientNetLite,
    decoder: CaptionDecoder,
    vocab: Vocabulary,
    pre: Preprocessing,
    out_dir: Path,
    info: dict | None = None,
    check_images: list[np.ndarray] | None = None,
    check: bool = True,
    before_moving: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Write the model directory for these modules and check it; returns its manifest.

    The files are written to a temporary directory beside ``out_dir`` and moved in only when
    the check passes, so a failed export never leaves a half-written or unchecked model.
    ``before_moving(manifest)``: called with the checked model's manifest before its files are
    moved in (what in ``out_dir`` must not outlive the model there goes then).
    """
    final_dir = Path(out_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        # (the name cut short: a name near the file system's 255 bytes had no room for the rest)
        out_dir = Path(
            tempfile.mkdtemp(prefix=f".{short_name(final_dir.name)}.export-", dir=final_dir.parent)
        )
    except OSError as exc:  # a read-only folder: named as the --out asked for, not the hidden one
        raise OSError(exc.errno, exc.strerror, str(final_dir)) from exc
    try:
        manifest = _write_and_check(encoder, decoder, vocab, pre, out_dir, info, check_images, check)
        final_dir.mkdir(exist_ok=True)
        if before_moving is not None:
            before_moving(manifest)
        # the optional files (fusion.json, confidence.json) that stay in the folder (--force,
        # the same model again) are named in the new manifest, and only those
        manifest = manifest.with_optional_files(final_dir)
        manifest.save()
        # an earlier model's manifest goes first: a stop between the moves leaves no manifest
        # vouching for its graphs beside the new ones (the new manifest moves in last)
        (final_dir / MANIFEST).unlink(missing_ok=True)
        for name in (*(manifest.files[role] for role in FILE_ROLES), MANIFEST):
            os.replace(out_dir / name, final_dir / name)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return load_manifest(final_dir)


def _write_and_check(encoder, decoder, vocab, pre, out_dir, info, check_images, check) -> Manifest:
    encoder, decoder = encoder.eval(), decoder.eval()
    if len(vocab) != decoder.cfg.vocab_size:
        raise ModelError(f"vocabulary has {len(vocab)} words but the decoder {decoder.cfg.vocab_size}")
    h, w = pre.size
    cfg = decoder.cfg
    dims = ModelDimensions(
        regions=regions_of(pre),
        feature_dim=cfg.feature_dim,
        attention_dim=cfg.attention_dim,
        hidden_dim=cfg.hidden_dim,
        vocab_size=cfg.vocab_size,
        top_k=cfg.top_k,
        n_classes=encoder._fc.out_features,
        encoder_dim=cfg.encoder_dim,
        embed_dim=cfg.embed_dim,
    )
    files = {**{role: f"{role}.onnx" for role in ROLES}, VOCAB: "vocab.json", CLASSES: "classes.json"}
    paths = {role: out_dir / name for role, name in files.items()}
    with torch.no_grad():
        _export(
            EncoderGraph(encoder, decoder),
            (torch.zeros(1, 3, h, w),),
            paths[ENCODER],
            ENCODER_INPUTS,
            ENCODER_OUTPUTS,
            {"image": {0: "n"}, **{k: {0: "n"} for k in ENCODER_OUTPUTS}},
        )
        _fold_static_padding(paths[ENCODER], pre.size)
        tails = dims.tails(pre.size)
        _set_output_dims(paths[ENCODER], {name: list(tails[name]) for name in ENCODER_OUTPUTS})
        _export(
            StepGraph(decoder),
            example_step_inputs(decoder, dims.regions),
            paths[DECODER_STEP],
            STEP_INPUTS,
            STEP_OUTPUTS,
            {
                "tokens": {0: "r"},
                "h": {0: "s"},
                "c": {0: "s"},
                "source_rows": {0: "r"},
                "features": {0: "n"},
                "att_proj": {0: "n"},
                "image_index": {0: "r"},
                "word_bias": {0: "r"},
                **{k: {0: "r"} for k in STEP_OUTPUTS},
            },
        )
    vocab.save(paths[VOCAB])
    shutil.copyfile(IMAGENET_CLASSES, paths[CLASSES])
    manifest = Manifest(
        directory=out_dir,
        files=files,
        dims=dims,
        tokens={"pad": vocab.pad, "start": vocab.start, "end": vocab.end, "unk": vocab.unk},
        preprocessing=pre,
        precision="fp32",
        sha256={role: file_sha256(path) for role, path in paths.items()},
        info={
            "attention": cfg.attention,
            "decoder_config": cfg.to_dict(),
            "encoder": encoder.variant,
            "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(info or {}),
        },
    )
    manifest.save()
    if check:
        report = check_export(encoder, decoder, out_dir, pre, check_images)
        manifest = Manifest(**{**manifest.__dict__, "info": {**manifest.info, "export_check": report}})
        manifest.save()
    return manifest


def check_export(
    encoder, decoder, out_dir: Path, pre: Preprocessing, images: list[np.ndarray] | None = None
) -> dict:
    """Run PyTorch and onnxruntime on the same inputs; raise ModelError past ``TOLERANCE``."""
    import onnxruntime as ort

    h, w = pre.size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    if images:
        x = torch.cat([x, torch.from_numpy(np.stack(images))])
    opts = ort.SessionOptions()
    cpu = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(graph_source(out_dir / "encoder.onnx"), opts, providers=cpu)
    step = ort.InferenceSession(graph_source(out_dir / "decoder_step.onnx"), opts, providers=cpu)
    diffs = {}
    with torch.no_grad():
        ref = EncoderGraph(encoder, decoder)(x)
        got = enc.run(list(ENCODER_OUTPUTS), {"image": x.numpy()})
        for name, r, o in zip(ENCODER_OUTPUTS, ref, got):
            diffs[name] = float(np.abs(r.numpy() - o).max())
        args = example_step_inputs(decoder, regions_of(pre))
        ref = StepGraph(decoder)(*args)
        got = step.run(list(STEP_OUTPUTS), {k: v.numpy() for k, v in zip(STEP_INPUTS, args)})
        for name, r, o in zip(STEP_OUTPUTS, ref, got):
            if name == "topk_ids":
                # Ids may swap only between near-tied log-probabilities.
                same = r.numpy() == o
                diffs["topk_ids_agree"] = float(same.mean())
                continue
            diffs[name] = float(np.abs(r.numpy() - o).max())
    bad = {k: v for k, v in diffs.items() if k in TOLERANCE and not v <= TOLERANCE[k]}
    if bad or diffs["topk_ids_agree"] < 0.9:
        raise ModelError(
            f"export check failed: onnxruntime differs from PyTorch past the tolerance {TOLERANCE}: {diffs}"
        )
    return {"max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()}, "tolerance": TOLERANCE}


def export_model(
    checkpoint: Path,
    out_dir: Path,
    name: str | None = None,
    extra_info: dict | None = None,
    force: bool = False,
) -> Manifest:
    """Export a training checkpoint directory (``edgecap train``'s OUT/best) to ``out_dir``.

    ``out_dir`` must be new or empty (a ``ModelError`` otherwise, before anything is read);
    ``force``: a model there is replaced. If the new model's files differ from it (their
    checksums), its ``fusion.json`` and ``confidence.json`` are removed before the new model
    moves in: both were fitted to that model, and kept, the new one would load them and give the
    old model's confidences. The same model exported again (the export is deterministic; e.g.
    with ``--metrics`` added) keeps them."""
    from edgecap.confidence import CONFIDENCE_FILE
    from edgecap.decoding.fusion import remove_fusion
    from edgecap.models.checkpoint import load_checkpoint

    out = Path(out_dir)
    existing = nearest_existing(out)  # below a file, no folder can be made
    if os.path.lexists(existing) and not existing.is_dir():
        below = "" if existing == out else f" ({existing} is not a directory)"
        raise ModelError(f"{out}: not a directory{below}; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(
            f"{out}: directory exists and is not empty; choose another --out or pass --force to "
            "replace the model there (its fusion.json and confidence.json, fitted to that model, "
            "are removed)"
        )
    replaced = _model_checksums(out) if force else None
    encoder, decoder, vocab, pre, meta = load_checkpoint(Path(checkpoint))
    info = {
        "name": name or Path(checkpoint).resolve().parent.name,
        "training": {
            "data": meta.get("training_data"),
            "config": meta.get("train_config"),
            "epochs": meta.get("train_state", {}).get("epoch"),
            "best_epoch": meta.get("train_state", {}).get("best_epoch"),
        },
        "metrics": {"dev_greedy_simple_tokenizer": meta.get("dev_metrics_greedy")},
        **(extra_info or {}),
    }

    def fitted_to_another(manifest: Manifest) -> None:
        if replaced != manifest.sha256:  # another model's (or none): not fitted to this one
            remove_fusion(out)  # and its language models' files
            (out / CONFIDENCE_FILE).unlink(missing_ok=True)

    # gone before the new model moves in: a stop between the two had left the new model with
    # the earlier one's language models and confidence
    return export_modules(encoder, decoder, vocab, pre, out, info, before_moving=fitted_to_another)


def _model_checksums(directory: Path) -> dict[str, str] | None:
    """The files' checksums of the model in ``directory`` (None: none there, or unreadable).
    A model missing an optional file its manifest names (a confidence.json removed) is still
    that model: its language models stay when it is exported again."""
    try:
        return load_manifest(directory, optional_files=False).sha256
    except ModelError:
        return None
