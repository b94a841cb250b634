"""The export's PyTorch-vs-onnxruntime check (``edgecap.build.export.check_export``) with its own
tolerances: it passes a faithful export and fails one whose graphs really compute something
else (one weight moved by 0.01, 100 times the tolerance of the output it reaches).

A small random model (64 x 64 images, a 16-wide decoder) keeps the export to a few seconds.
"""

from __future__ import annotations

import copy
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
from edgecap.vocab import Vocabulary  # noqa: E402

PRE = Preprocessing(size=(64, 64))
EXAMPLES = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "examples"
NUDGE = 0.01  # tolerances: 1e-3 (features, att_proj, topk_logprobs), 1e-4 (h0, c0, h_out, c_out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(encoder, decoder, model dir): modules and their export, which passed the check."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    encoder = EfficientNetLite()
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
