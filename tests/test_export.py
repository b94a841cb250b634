"""The export's PyTorch-vs-onnxruntime check (``edgecap.build.export.check_export``) with its own
tolerances: it passes a faithful export and fails one whose graphs really compute something
else (one weight moved by 0.01, 100 times the tolerance of the output it reaches).

A small model (64 x 64 images, the pretrained encoder, a random 16-wide decoder) keeps the export
to a few seconds.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from edgecap.errors import ModelError  # noqa: E402
from edgecap.build.export import check_export, export_modules  # noqa: E402
from edgecap.models.decoder import CaptionDecoder, DecoderConfig  # noqa: E402
from edgecap.models.efficientnet_lite import EfficientNetLite  # noqa: E402
from edgecap.preprocess import Preprocessing  # noqa: E402
from helpers import unwritable_output_cases  # noqa: E402
from edgecap.vocab import Vocabulary  # noqa: E402

PRE = Preprocessing(size=(64, 64))
EXAMPLES = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "examples"
NUDGE = 0.01  # tolerances: 1e-3 (features, att_proj, topk_logprobs), 1e-4 (h0, c0, h_out, c_out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(encoder, decoder, model dir): modules and their export, which passed the check. The
    encoder is the pretrained EfficientNet-Lite0: a randomly initialised one maps every image to
    nearly the same features (about 1e-8 apart at 64 x 64), so a graph that mixed up a batch's
    images would pass a check on it."""
    from edgecap.models.efficientnet_lite import load_pretrained

    torch.manual_seed(0)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    encoder = load_pretrained()
    out = tmp_path_factory.mktemp("export-check") / "model"
    manifest = export_modules(encoder, decoder, vocab, PRE, out)  # raises if the check fails
    assert "export_check" in manifest.info
    return encoder, decoder, out


def test_a_faithful_export_passes_with_the_default_tolerance(exported):
    encoder, decoder, out = exported
    report = check_export(encoder, decoder, out, PRE)
    diffs, tolerance = report["max_abs_diff"], report["tolerance"]
    assert set(tolerance) <= set(diffs)
    assert all(diffs[k] <= tolerance[k] for k in tolerance)
    assert diffs["topk_ids_agree"] == 1.0


def test_the_manifest_and_graphs_record_what_the_export_was_given(exported):
    """64 x 64 images: a 2 x 2 map (4 regions); the decoder's sizes; the vocabulary's special
    tokens; the graph outputs' dimensions after the rows declared as those numbers."""
    from edgecap.manifest import load_manifest

    encoder, decoder, out = exported
    manifest = load_manifest(out)
    cfg = decoder.cfg
    assert manifest.preprocessing == PRE
    assert manifest.precision == "fp32"
    assert manifest.tokens == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    dims = manifest.dims
    assert (dims.regions, dims.n_classes, dims.top_k) == (4, 1000, cfg.top_k)
    assert (dims.feature_dim, dims.attention_dim, dims.hidden_dim) == (16, 8, 16)
    assert dims.vocab_size == cfg.vocab_size
    graph = onnx.load(str(out / "encoder.onnx")).graph
    declared = {
        o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output
    }
    assert declared == {
        "features": ["n", 4, 16],
        "att_proj": ["n", 4, 8],
        "h0": ["n", 16],
        "c0": ["n", 16],
        "class_probs": ["n", 1000],
    }


def _nudged(module: torch.nn.Module, name: str, amount: float = NUDGE) -> torch.nn.Module:
    """A copy of ``module`` with the first element of parameter ``name`` moved by ``amount``."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        dict(module.named_parameters())[name].view(-1)[0] += amount
    return module


# Each weight reaches only some outputs, so every part of the comparison is exercised:
#   decoder init_h.bias    -> h0 (encoder graph), by exactly 0.01
#   decoder lstm.bias_hh   -> h_out, c_out (step graph), by ~0.01 * the gate's slope
#   decoder att_feat.bias  -> att_proj (encoder graph), by exactly 0.01 (att_proj is
#                             projected from features; the step's inputs are its own, random)
#   encoder's last BN bias -> features and everything after them in the encoder graph
#                             (in a randomly initialised EfficientNet a single conv weight
#                             often changes nothing: the activations saturate)
@pytest.mark.parametrize(
    "which, name",
    [
        ("decoder", "init_h.bias"),
        ("decoder", "lstm.bias_hh"),
        ("decoder", "att_feat.bias"),
        ("encoder", None),
    ],
)
def test_pytorch_changed_after_export_fails_the_check(exported, which, name):
    encoder, decoder, out = exported
    if which == "decoder":
        decoder = _nudged(decoder, name)
    else:
        # the last parameter the features use (the classifier _fc is not part of the graph)
        last = [n for n, _ in encoder.named_parameters() if not n.startswith("_fc.")][-1]
        encoder = _nudged(encoder, last)
    with pytest.raises(ModelError, match="export check failed"):
        check_export(encoder, decoder, out, PRE)


def test_a_nan_in_pytorch_fails_the_check(exported):
    """A NaN where onnxruntime has a number (a weight gone NaN, as in a diverged training's
    checkpoint) is a difference past any tolerance, not one that compares as none: the check
    fails. The NaN reaches h0 only (the step's inputs are its own), so nothing else fails it."""
    encoder, decoder, out = exported
    with pytest.raises(ModelError, match="export check failed"):
        check_export(encoder, _nudged(decoder, "init_h.bias", float("nan")), out, PRE)


def test_a_change_far_below_the_tolerance_passes(exported):
    encoder, decoder, out = exported
    check_export(encoder, _nudged(decoder, "init_h.bias", 1e-6), out, PRE)


@pytest.mark.parametrize(
    "graph, initializer",
    [
        ("encoder.onnx", "decoder.init_c.bias"),  # c0
        ("decoder_step.onnx", "decoder.out_hidden.bias"),  # topk_logprobs
    ],
)
def test_an_onnx_initializer_changed_after_export_fails_the_check(exported, tmp_path, graph, initializer):
    encoder, decoder, out = exported
    model_dir = tmp_path / "model"
    shutil.copytree(out, model_dir)
    model = onnx.load(str(model_dir / graph))
    (init,) = [i for i in model.graph.initializer if i.name == initializer]
    value = numpy_helper.to_array(init).copy()
    value.flat[0] += 0.02
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), initializer))
    onnx.save(model, str(model_dir / graph))
    with pytest.raises(ModelError, match="export check failed"):
        check_export(encoder, decoder, model_dir, PRE)
    check_export(encoder, decoder, out, PRE)  # the untouched copy still passes


def test_the_encoder_graph_has_no_shape_arithmetic(tiny_model_dir):
    """The "same" padding is folded into the convolutions at export: the graph computes no
    shapes (onnxruntime could not fold them while the batch is dynamic) and has no Pad."""
    import collections

    graph = onnx.load(str(tiny_model_dir / "encoder.onnx")).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert not {"Shape", "Pad", "ConstantOfShape", "Gather", "Slice", "Concat"} & set(ops), ops
    assert ops["Conv"] == 49


def test_the_folded_padding_matches_pytorch_on_a_photo(tiny_model_dir):
    """A one-pixel error in the folded padding shifts every feature map: a real photo through
    the pretrained encoder shows it where random inputs may not."""
    import onnxruntime as ort

    from edgecap.backends.torch import TorchBackend
    from edgecap.images import load_rgb, preprocess
    from edgecap.manifest import load_manifest

    manifest = load_manifest(tiny_model_dir)
    x = preprocess([load_rgb(EXAMPLES / "chelsea.png")], manifest.preprocessing)
    session = ort.InferenceSession(str(manifest.path("encoder")), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"image": x})
    reference = TorchBackend(manifest).encode(x).tensors["features"].numpy()
    assert np.abs(features - reference).max() < 1e-3


def test_folding_the_padding_keeps_what_each_pad_computes(tmp_path):
    """``_fold_static_padding`` on a hand-built graph: a zero spatial Pad goes into the Conv it
    feeds, added to the Conv's own pads; a Pad that also pads the channels, one that fills with
    1, and one that two Convs read are kept (as constants). Every output is the same before and
    after, on a batch of 2 (the graph's batch is dynamic) of 3-channel images."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgecap.build.export import _fold_static_padding

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, values, dtype):
        nodes.append(
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype)))
        )
        return name

    def pad(name, pads, fill=None):
        inputs = ["image", const(f"{name}_amounts", pads, np.int64)]
        if fill is not None:
            inputs.append(const(f"{name}_fill", fill, np.float32))
        nodes.append(helper.make_node("Pad", inputs, [name], name=name, mode="constant"))
        return name

    def conv(x, out, channels, **attributes):
        weight = f"{out}_w"
        inits.append(
            numpy_helper.from_array(rng.standard_normal((3, channels, 3, 3)).astype(np.float32), weight)
        )
        nodes.append(helper.make_node("Conv", [x, weight], [out], name=out, **attributes))
        return out

    spatial = [0, 0, 1, 2, 0, 0, 2, 1]
    outputs = [
        conv(pad("zeros", spatial), "y_folded", 3, pads=[1, 0, 0, 1]),
        conv(pad("channels", [0, 1, 1, 1, 0, 0, 1, 1]), "y_channels", 4),
        conv(pad("ones", spatial, fill=1.0), "y_ones", 3),
        conv(pad("shared", spatial), "y_first", 3),
        conv("shared", "y_second", 3, strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "padding",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    path = tmp_path / "padding.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)

    def run():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(outputs, {"image": x})

    before = run()
    _fold_static_padding(path, (6, 6))
    after = run()
    for name, b, a in zip(outputs, before, after):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    kept = sorted(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Pad")
    assert kept == ["channels", "ones", "shared"]


@pytest.mark.parametrize("role", ["encoder", "decoder_step"])
def test_constant_folding_for_tensorrt_keeps_the_outputs(tiny_model_dir, role):
    """The copy TensorRT parses (``fold_constants``): no node left whose inputs are all
    constants (the parser rejects e.g. a Slice whose axes are computed), the same outputs."""
    import onnxruntime as ort

    from edgecap.build.convert import fold_constants
    from edgecap.build.export import example_step_inputs
    from edgecap.manifest import load_manifest

    manifest = load_manifest(tiny_model_dir)
    original = onnx.load(str(manifest.path(role)))
    folded = fold_constants(onnx.load(str(manifest.path(role))))
    onnx.checker.check_model(folded)
    constants = {t.name for t in folded.graph.initializer}
    assert all(any(name not in constants for name in node.input if name) for node in folded.graph.node), (
        "a node with only constant inputs is left"
    )
    assert not any(node.op_type == "Constant" for node in folded.graph.node)
    assert len(folded.graph.node) < len(original.graph.node)  # there was something to fold
    if role == "encoder":
        feeds = {"image": np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)}
    else:
        from edgecap.backends.torch import TorchBackend
        from edgecap.contract import STEP_INPUTS

        decoder = TorchBackend(manifest).decoder
        feeds = {
            name: value.numpy()
            for name, value in zip(STEP_INPUTS, example_step_inputs(decoder, manifest.dims.regions))
        }
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for m in (original, folded)
    ]
    for before, after in zip(*run):
        np.testing.assert_array_equal(before, after)


def test_fp16_keeps_the_encoders_stem_and_first_blocks_in_fp32(tiny_model_dir, tmp_path):
    """What moved the FP16 captions was the encoder's early layers (README, FP16 section)."""
    from edgecap.build.convert import ENCODER_FP32_BLOCKS, convert_model_dir, fp32_nodes

    graph = onnx.load(str(tiny_model_dir / "encoder.onnx")).graph
    kept = set(fp32_nodes(graph))
    assert "/_conv_stem/Conv" in kept
    early = [n.name for n in graph.node if n.name.startswith(("/_blocks.0/", "/_blocks.3/"))]
    late = [n.name for n in graph.node if n.name.startswith(f"/_blocks.{ENCODER_FP32_BLOCKS}/")]
    assert early and set(early) <= kept and late and not set(late) & kept
    fp16 = convert_model_dir(tiny_model_dir, tmp_path / "fp16", "fp16")
    weights = {t.name: t.data_type for t in onnx.load(str(fp16.path("encoder"))).graph.initializer}
    stem = next(n for n in onnx.load(str(fp16.path("encoder"))).graph.node if n.name == "/_conv_stem/Conv")
    late_conv = next(
        n
        for n in onnx.load(str(fp16.path("encoder"))).graph.node
        if n.name == f"/_blocks.{ENCODER_FP32_BLOCKS}/_expand_conv/Conv"
    )
    assert weights[stem.input[1]] == onnx.TensorProto.FLOAT
    assert weights[late_conv.input[1]] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("size, regions", [((224, 224), 49), ((64, 64), 4), ((100, 70), 12), ((33, 32), 2)])
def test_attention_regions_are_the_encoders_map_at_stride_32(size, regions):
    """EfficientNet's "same" padding gives a map of ceil(H / 32) x ceil(W / 32): 100 x 70 pixels,
    4 x 3 regions. The manifest's ``dims.regions`` is that count."""
    from edgecap.build.export import regions_of

    assert regions_of(Preprocessing(size=size)) == regions


def test_the_encoders_map_has_the_regions_counted_for_a_size_not_a_multiple_of_32():
    from edgecap.build.export import regions_of

    with torch.no_grad():
        fmap = EfficientNetLite().eval().features(torch.zeros(1, 3, 100, 70))
    assert fmap.shape[2:] == (4, 3)
    assert fmap.shape[2] * fmap.shape[3] == regions_of(Preprocessing(size=(100, 70)))


def test_a_vocabulary_the_decoder_was_not_built_for_is_refused_before_anything_is_written(tmp_path):
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab) + 1, hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    with pytest.raises(
        ModelError, match=f"vocabulary has {len(vocab)} words but the decoder {len(vocab) + 1}"
    ):
        export_modules(EfficientNetLite(), decoder, vocab, PRE, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # no model directory, no temporary one left


# -- graphs that compute something else in one way only: the check must see each ---------------


def _edited_copy(out: Path, model_dir: Path, role: str, edit) -> Path:
    """A copy of the export ``out`` whose ``role`` graph ``edit(graph)`` changed."""
    shutil.copytree(out, model_dir)
    path = model_dir / f"{role}.onnx"
    model = onnx.load(str(path))
    edit(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model_dir


def _feed_through(graph, name: str, nodes, new_name: str) -> None:
    """Every node reading ``name`` reads ``new_name`` instead, which ``nodes`` (put first) make
    from ``name`` and constants."""
    for node in graph.node:
        node.input[:] = [new_name if i == name else i for i in node.input]
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])


def _constant(graph, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _ignore_source_rows(graph):
    """h and c taken as they come: the gather by the beams' back-pointers gone."""
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] == "source_rows":
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]


def _image_zero_for_every_row(graph):
    """Every row reads the first image's features and projections."""
    from onnx import helper

    zero = _constant(graph, "test/zero_i32", np.int32(0))
    node = helper.make_node("Mul", ["image_index", zero], ["test/image_index"])
    _feed_through(graph, "image_index", [node], "test/image_index")


def _ignore_word_bias(graph):
    from onnx import helper

    zero = _constant(graph, "test/zero_f", np.float32(0.0))
    node = helper.make_node("Mul", ["word_bias", zero], ["test/word_bias"])
    _feed_through(graph, "word_bias", [node], "test/word_bias")


def _ids_off_by_one(graph):
    """Each top-K word id one past the word scored (mod V): the log-probabilities unchanged,
    the words wrong, as with an output layer shifted against the vocabulary."""
    from onnx import helper

    (bias,) = [i for i in graph.initializer if i.name == "decoder.out_vocab.bias"]
    for node in graph.node:
        node.output[:] = ["test/ids" if o == "topk_ids" else o for o in node.output]
    one = _constant(graph, "test/one", np.int32(1))
    size = _constant(graph, "test/vocab_size", np.int32(bias.dims[0]))
    graph.node.extend(
        [
            helper.make_node("Add", ["test/ids", one], ["test/ids_next"]),
            helper.make_node("Mod", ["test/ids_next", size], ["topk_ids"]),
        ]
    )


def _every_image_the_first(graph):
    """A batch's every image replaced by its first (image 0 + 0 x image): right for one image,
    wrong for the others, as a graph whose batch size was traced in."""
    from onnx import helper

    nodes = [
        helper.make_node(
            "Slice",
            ["image", _constant(graph, "test/s0", [0]), _constant(graph, "test/s1", [1]), "test/s0"],
            ["test/first"],
        ),
        helper.make_node("Mul", ["image", _constant(graph, "test/zero_f", np.float32(0.0))], ["test/zeros"]),
        helper.make_node("Add", ["test/zeros", "test/first"], ["test/image"]),
    ]
    _feed_through(graph, "image", nodes, "test/image")


@pytest.mark.parametrize(
    "role, edit",
    [
        ("decoder_step", _ignore_source_rows),
        ("decoder_step", _image_zero_for_every_row),
        ("decoder_step", _ignore_word_bias),
        ("decoder_step", _ids_off_by_one),
        ("encoder", _every_image_the_first),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"),
)
def test_a_graph_wrong_in_one_input_or_output_fails_the_check(exported, tmp_path, role, edit):
    """Each edit breaks what a user's search relies on while leaving the rest exact: the beams'
    back-pointers (``source_rows``), each row's image (``image_index``), the host's word rules
    (``word_bias``), the words of the top K (their log-probabilities unchanged), a batch's images
    after the first. The check's inputs must reach each: rows of several source rows, several
    images, a word bias, a batch of more than one image, and the ids compared."""
    encoder, decoder, out = exported
    model_dir = _edited_copy(out, tmp_path / "model", role, edit)
    with pytest.raises(ModelError, match="export check failed"):
        check_export(encoder, decoder, model_dir, PRE)


def _shifted_output(out: Path, model_dir: Path, role: str, output: str, amount: float) -> Path:
    """A copy of ``out`` whose ``role`` graph adds ``amount`` to column 1 of ``output``."""
    from onnx import helper

    def edit(graph):
        (value,) = [o for o in graph.output if o.name == output]
        width = value.type.tensor_type.shape.dim[-1].dim_value
        for node in graph.node:
            node.output[:] = ["test/raw" if o == output else o for o in node.output]
            node.input[:] = ["test/raw" if i == output else i for i in node.input]
        shift = np.zeros(width, np.float32)
        shift[1] = amount
        shift_name = _constant(graph, "test/shift", shift)
        graph.node.append(helper.make_node("Add", ["test/raw", shift_name], [output]))

    return _edited_copy(out, model_dir, role, edit)


@pytest.mark.parametrize(
    "role, output",
    [
        ("encoder", "features"),
        ("encoder", "att_proj"),
        ("encoder", "h0"),
        ("encoder", "class_probs"),
        ("decoder_step", "topk_logprobs"),
        ("decoder_step", "h_out"),
        ("decoder_step", "alpha"),
    ],
)
def test_one_column_off_by_twice_its_tolerance_fails_the_check(exported, tmp_path, role, output):
    """The check takes each output's largest difference, not its mean: one column of 4 to 1000
    moved by twice the output's tolerance (2e-3 or 2e-4; its mean difference under the
    tolerance) fails it."""
    from edgecap.build.export import TOLERANCE

    encoder, decoder, out = exported
    model_dir = _shifted_output(out, tmp_path / "model", role, output, 2 * TOLERANCE[output])
    with pytest.raises(ModelError, match="export check failed"):
        check_export(encoder, decoder, model_dir, PRE)


def test_export_model_records_the_run_it_came_from(tmp_path):
    """``edgecap export RUN/best`` (``export_model``): the manifest's info names the model after
    the run's folder (RUN, not "best") unless a name is given, and keeps the checkpoint's
    training record (its data, its config, the epochs trained and the best one) and dev metric
    as the checkpoint wrote them, plus the command's extra fields."""
    from edgecap.build.export import export_model
    from edgecap.manifest import load_manifest
    from edgecap.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    record = {
        "training_data": {"n_images": 3, "source": "folder"},
        "train_config": {"lr": 0.0004, "epochs": 9},
        "train_state": {"epoch": 5, "best_epoch": 3},
        "dev_metrics_greedy": {"CIDEr": 0.41},
    }
    best = tmp_path / "run-7" / "best"
    save_checkpoint(best, decoder, vocab, PRE, record)
    export_model(best, tmp_path / "model", extra_info={"dev_metrics": {"CIDEr": 0.52}})
    info = load_manifest(tmp_path / "model").info
    assert info["name"] == "run-7"
    assert info["training"] == {
        "data": {"n_images": 3, "source": "folder"},
        "config": {"lr": 0.0004, "epochs": 9},
        "epochs": 5,
        "best_epoch": 3,
    }
    assert info["metrics"] == {"dev_greedy_simple_tokenizer": {"CIDEr": 0.41}}
    assert info["dev_metrics"] == {"CIDEr": 0.52}


def test_an_export_at_a_size_not_square_nor_a_multiple_of_32_passes_its_check(tmp_path):
    """Preprocessing(size=(100, 70)) is (height, width): the "same" paddings, read from one
    run of the traced encoder on a (1, 3, 100, 70) image and folded into its convolutions, differ
    between the two sides (70 -> 35 pixels pads 2 at a stride-2 3 x 3 convolution where
    100 -> 50 pads 1). The export runs (a transposed probe image is refused by the traced
    graph), its own check (pretrained encoder) passes, and the manifest's 12 regions are the
    graph's (4 x 3)."""
    from edgecap.manifest import load_manifest
    from edgecap.models.efficientnet_lite import load_pretrained

    torch.manual_seed(0)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    pre = Preprocessing(size=(100, 70))
    export_modules(load_pretrained(), decoder, vocab, pre, tmp_path / "model")
    manifest = load_manifest(tmp_path / "model")
    assert manifest.preprocessing.size == (100, 70) and manifest.dims.regions == 12
    graph = onnx.load(str(tmp_path / "model" / "encoder.onnx")).graph
    (features,) = [o for o in graph.output if o.name == "features"]
    assert [d.dim_value or d.dim_param for d in features.type.tensor_type.shape.dim] == ["n", 12, 16]


def test_an_export_near_the_name_limit_and_a_forced_one_stopped_between_its_moves(tmp_path, monkeypatch):
    """An --out whose name is near the file system's 255 bytes is exported (its hidden work
    folder, named after it, had no room: "File name too long"); a --force export stopped
    between moving its files in leaves no manifest vouching for the earlier model's graphs
    beside the new ones (the earlier manifest goes first, the new one last), nor the earlier
    model's confidence.json (removed before the moves, not after)."""
    import edgecap.build.export as export_module
    from edgecap.cli import main
    from edgecap.manifest import load_manifest
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        decoder = CaptionDecoder(
            DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
        )
        runs.append(tmp_path / f"run-{seed}" / "best")
        save_checkpoint(runs[-1], decoder, vocab, PRE, {})
    model = tmp_path / ("m" * 250)
    assert main(["export", str(runs[0]), "--out", str(model)]) == 0
    assert load_manifest(model).directory == model
    moved = []
    real = os.replace

    def stopped(source, target):
        if Path(target).parent == model:  # a move into the model folder: Ctrl-C at the second
            if len(moved) == 1:
                raise KeyboardInterrupt
            moved.append(target)
        real(source, target)

    (model / "confidence.json").write_text('{"fitted": "to run-0"}')  # gone before the moves
    monkeypatch.setattr(export_module.os, "replace", stopped)
    assert main(["export", str(runs[1]), "--out", str(model), "--force"]) == 130
    assert len(moved) == 1 and not (model / "manifest.json").exists()
    assert not (model / "confidence.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder left


def test_an_export_over_a_model_needs_force_and_drops_what_was_fitted_to_it(tmp_path, capsys):
    """``edgecap export --out DIR`` into a folder that holds something is refused (exit 2, one
    line, the folder untouched); with --force the model is replaced, and the fusion.json and
    confidence.json fitted to the model it replaces are removed when the new model's files
    differ (another checkpoint), kept when they are the same (the same checkpoint again, with
    --metrics: the export is deterministic)."""
    from edgecap.cli import main
    from edgecap.manifest import load_manifest
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    runs = []
    for seed in (0, 1):  # two checkpoints: two models
        torch.manual_seed(seed)
        decoder = CaptionDecoder(
            DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
        )
        runs.append(tmp_path / f"run-{seed}" / "best")
        save_checkpoint(runs[-1], decoder, vocab, PRE, {})
    model = tmp_path / "model"
    assert main(["export", str(runs[0]), "--out", str(model)]) == 0
    first = load_manifest(model).sha256
    lms = {"everyday": {"file": "lm_everyday.npz"}, "in_domain": {"file": "lm_in_domain.npz"}}
    fitted = {
        "fusion.json": json.dumps(lms).encode(),  # the files it names go with it
        "lm_everyday.npz": b"fitted to run-0",
        "lm_in_domain.npz": b"fitted to run-0",
        "confidence.json": b'{"fitted": "to run-0"}',
    }
    for name, data in fitted.items():
        (model / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    capsys.readouterr()

    assert main(["export", str(runs[1]), "--out", str(model)]) == 2  # no --force: refused
    err = capsys.readouterr().err
    assert "directory exists and is not empty; choose another --out or pass --force" in err
    assert err.count("\n") == 1 and {p.name: p.read_bytes() for p in model.iterdir()} == before

    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"CIDEr": 0.5}')
    argv = ["export", str(runs[0]), "--out", str(model), "--force", "--metrics", str(metrics)]
    assert main(argv) == 0  # the same model again: what was fitted to it stays
    assert load_manifest(model).sha256 == first and load_manifest(model).info["dev_metrics"] == {"CIDEr": 0.5}
    assert all((model / name).read_bytes() == data for name, data in fitted.items())
    core = {"encoder", "decoder_step", "vocab", "classes"}
    files = json.loads((model / "manifest.json").read_text())["files"]  # it names what it kept
    assert set(files) == core | {"fusion", "confidence"} and files["fusion"] == "fusion.json"

    assert main(["export", str(runs[1]), "--out", str(model), "--force"]) == 0  # another model
    assert load_manifest(model).sha256 != first
    assert not any((model / name).exists() for name in fitted)
    assert set(json.loads((model / "manifest.json").read_text())["files"]) == core  # nor names them

    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(runs[0]), "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file: not a directory" in capsys.readouterr().err


def test_an_export_again_over_its_model_without_its_confidence_keeps_its_language_models(tmp_path, capsys):
    """``edgecap export --force`` of the same checkpoint over its model whose confidence.json
    was removed (the manifest still naming it: that folder is refused for captioning) replaces
    the same model: its fusion.json and language models stay, named, and the manifest no longer
    names the confidence.json that is gone. Taken for another model, they had been deleted."""
    from edgecap.cli import main
    from edgecap.manifest import load_manifest
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    torch.manual_seed(0)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    run = tmp_path / "run" / "best"
    save_checkpoint(run, decoder, vocab, PRE, {})
    model = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model)]) == 0
    lms = {"everyday": {"file": "lm_everyday.npz"}, "in_domain": {"file": "lm_in_domain.npz"}}
    fitted = {
        "fusion.json": json.dumps(lms).encode(),
        "lm_everyday.npz": b"fitted to run",
        "lm_in_domain.npz": b"fitted to run",
    }
    for name, data in {**fitted, "confidence.json": b"{}"}.items():
        (model / name).write_bytes(data)
    assert main(["export", str(run), "--out", str(model), "--force"]) == 0  # names them
    assert {"fusion", "confidence"} <= set(json.loads((model / "manifest.json").read_text())["files"])
    (model / "confidence.json").unlink()
    with pytest.raises(ModelError, match="confidence.json is missing"):
        load_manifest(model)
    capsys.readouterr()

    assert main(["export", str(run), "--out", str(model), "--force"]) == 0  # the same model again
    assert all((model / name).read_bytes() == data for name, data in fitted.items())
    files = load_manifest(model).files
    assert files["fusion"] == "fusion.json" and "confidence" not in files


def test_an_export_out_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """docs/cli.md / README: usage and output errors exit 2 with one line, never a traceback (as
    ``edgecap convert --out``). An --out below a file cannot be made a folder: refused naming
    both, before anything is read; a folder that cannot be written (no permission, a full disk:
    here the temporary folder beside --out refused) names --out and the system's reason (until
    2026-12-05 the hidden working folder beside it, ./.model.export-x, which no one asked for).
    Nothing is left behind, the file untouched. Before the fix: tracebacks of FileExistsError
    and PermissionError, exit 1."""

    import edgecap.build.export as export
    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    run = tmp_path / "run" / "best"
    save_checkpoint(run, decoder, vocab, PRE, {})
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for out in (a_file / "model", a_file / "models" / "mine"):
        assert main(["export", str(run), "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert printed.out == ""
        reason = f"not a directory ({a_file} is not a directory); choose another --out"
        assert printed.err == f"edgecap export: error: {out}: {reason}\n"
    assert a_file.read_text() == "not a folder"

    def refused(prefix, dir):
        path = str(Path(dir) / f"{prefix}x")
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(export.tempfile, "mkdtemp", refused)
    out = tmp_path / "locked" / "model"
    assert main(["export", str(run), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == (
        "",
        f"edgecap export: error: {out}: Permission denied\n",  # the --out asked for, not the hidden folder
    )
    assert not out.exists()


def _folder_in_another_encoding(tmp_path) -> bytes:
    """A folder named with a byte that is not UTF-8 (a Latin-1 "modèl"), made in ``tmp_path``;
    the test is skipped on a file system that takes UTF-8 names only."""
    import os

    named = os.path.join(os.fsencode(tmp_path), b"mod\xe9l")
    try:
        os.mkdir(named)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    return named


def test_an_export_into_a_folder_named_in_another_encoding(exported, tmp_path):
    """A folder name that is not UTF-8 (a Latin-1 "modèl"): PyTorch's exporter and onnxruntime
    take only names they can encode, and the export had ended in a TypeError's traceback."""
    import os

    from edgecap.manifest import load_manifest

    encoder, decoder, _ = exported
    named = _folder_in_another_encoding(tmp_path)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    out = Path(os.fsdecode(named)) / "model"
    export_modules(encoder, decoder, vocab, PRE, out)  # raises if the check fails
    assert "export_check" in load_manifest(out).info


def test_edgecap_export_names_a_folder_in_another_encoding_in_strict_json(tmp_path, capsys):
    """The command's line on stdout names the model folder as caption names paths: U+FFFD for
    each byte that is not UTF-8 and the exact bytes in model_base64 (it had been a lone
    surrogate escape, "\\udce9", which strict JSON readers refuse)."""
    import base64
    import os

    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint

    named = _folder_in_another_encoding(tmp_path)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "run" / "best", decoder, vocab, PRE, {})
    out = os.path.join(named, b"model")
    assert main(["export", str(tmp_path / "run" / "best"), "--out", os.fsdecode(out)]) == 0
    line = capsys.readouterr().out
    assert "\\ud" not in line
    record = json.loads(line)
    assert record["model"] == out.decode("utf-8", "replace")
    assert base64.b64decode(record["model_base64"]) == out


@pytest.mark.parametrize("error, expected", unwritable_output_cases("export"))
def test_edgecap_export_line_that_cannot_be_written_is_not_a_traceback(
    error, expected, tmp_path, monkeypatch, capsys
):
    """docs/cli.md: output that cannot be written is exit 2 in one line (a full disk), a reader
    gone away (| head) 141, quietly; the model is written either way. It had been a traceback of
    the OSError and exit 1."""
    import sys

    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint
    from helpers import UnwritableStdout

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "run" / "best", decoder, vocab, PRE, {})
    monkeypatch.setattr(sys, "stdout", UnwritableStdout(error))
    rc = main(["export", str(tmp_path / "run" / "best"), "--out", str(tmp_path / "model")])
    said = "".join(line for line in capsys.readouterr().err.splitlines(True) if ": warning: " not in line)
    assert (rc, said) == expected  # (torch's warnings about its exporter aside)
    from edgecap.manifest import load_manifest

    assert "export_check" in load_manifest(tmp_path / "model").info


def test_edgecap_export_with_stdout_closed_is_refused_before_exporting(tmp_path, monkeypatch, capsys):
    """docs/cli.md: started with stdout closed (``>&-``, where Python's sys.stdout is None), export
    says so in one line, exit 2, before anything is written, as caption and eval do. The model
    had been exported, its line dropped and then an AttributeError traceback, exit 1."""
    import sys

    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "run" / "best", decoder, vocab, PRE, {})
    monkeypatch.setattr(sys, "stdout", None)
    rc = main(["export", str(tmp_path / "run" / "best"), "--out", str(tmp_path / "model")])
    said = "".join(line for line in capsys.readouterr().err.splitlines(True) if ": warning: " not in line)
    assert (rc, said) == (2, "edgecap export: error: cannot write the output: standard output is closed\n")
    assert not (tmp_path / "model").exists()


def test_edgecap_export_names_a_folder_that_is_not_ascii_on_a_stdout_that_is_not_utf8(tmp_path, monkeypatch):
    """As caption: the line is UTF-8 whatever stdout's encoding (PYTHONIOENCODING=ascii, a
    Latin-1 locale); it had been a UnicodeEncodeError after the model was written."""
    import io
    import sys

    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "run" / "best", decoder, vocab, PRE, {})
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    out = tmp_path / "modèl"
    assert main(["export", str(tmp_path / "run" / "best"), "--out", str(out)]) == 0
    sys.stdout.flush()
    assert json.loads(raw.getvalue().decode("utf-8"))["model"] == str(out)
