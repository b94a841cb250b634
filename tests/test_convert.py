"""FP16 / int8 conversion of a model directory, checked on onnxruntime CPU against the FP32 model.

Uses the session fixture ``tiny_model_dir`` (tests/conftest.py: a small randomly initialised
exported model) when it exists; otherwise a contract-shaped model built with onnx helpers
(``helpers.contract_model_dir``: same I/O names and dtypes, same op types at the places the
converter cares about).
"""

from __future__ import annotations

import errno
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgecap.build.convert import compare_stages, convert_model_dir, fp32_nodes  # noqa: E402
from edgecap.errors import InputError, ModelError  # noqa: E402
from edgecap.manifest import load_manifest, verify_files  # noqa: E402
from helpers import unwritable_output_cases, needs_onnxruntime_for_opset_18  # noqa: E402

STAND_IN = (
    "the rest needs the model exported from PyTorch (torch is not installed): the stand-in "
    "built with onnx helpers names no node after a PyTorch module"
)


@pytest.fixture(scope="module")
def fp32_dir(any_model_dir) -> Path:
    return any_model_dir


@pytest.fixture(scope="module")
def fp16_dir(fp32_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "model"
    convert_model_dir(fp32_dir, out, "fp16")
    return out


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, example_images, tmp_path_factory) -> Path:
    """The model converted to int8, its encoder calibrated on the first two example photos (the
    other two are left for checking it): a static int8 conversion takes seconds, one serves the
    tests below."""
    needs_onnxruntime_for_opset_18(fp32_dir, "int8 calibration")
    calib = tmp_path_factory.mktemp("calib")
    for p in sorted(example_images)[:2]:
        shutil.copy(p, calib / p.name)
    out = tmp_path_factory.mktemp("int8") / "model"
    convert_model_dir(fp32_dir, out, "int8", calibration=calib)
    return out


# -- tests --------------------------------------------------------------------------------------


def test_fp16_manifest_hashes_and_vocab(fp32_dir, fp16_dir):
    src, m = load_manifest(fp32_dir), load_manifest(fp16_dir)
    verify_files(m)  # the new sha256s match the written files
    assert m.precision == "fp16"
    assert m.dims == src.dims and m.tokens == src.tokens
    assert m.info["converted_from"]["sha256"] == src.sha256
    assert m.sha256["encoder"] != src.sha256["encoder"]
    assert (fp16_dir / m.files["vocab"]).read_bytes() == src.path("vocab").read_bytes()


def test_fp16_keeps_contract_io_and_fp32_islands(fp32_dir, fp16_dir):
    m = load_manifest(fp16_dir)
    for role in ("encoder", "decoder_step"):
        before = onnx.load(str(load_manifest(fp32_dir).path(role)))
        after = onnx.load(str(m.path(role)))

        def io(g):
            return {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}

        assert io(after.graph) == io(before.graph)
        # the weights really are FP16 (most of the bytes)
        dtypes = [t.data_type for t in after.graph.initializer if len(t.dims) >= 2]
        assert dtypes.count(onnx.TensorProto.FLOAT16) > dtypes.count(onnx.TensorProto.FLOAT)

    step = onnx.load(str(m.path("decoder_step")))
    onnx.shape_inference.infer_shapes(step)
    typed = {
        v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(step).graph.value_info
    }
    typed.update({v.name: v.type.tensor_type.elem_type for v in step.graph.output})
    for node in step.graph.node:
        if node.op_type in ("Softmax", "LogSoftmax", "TopK"):
            assert typed.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
    # the attention logits are computed in FP32: the Softmax input chain, down to the
    # projection (MatMul / Gemm) producing the logits, reads and writes float32 in the
    # converted graph (the block list; without it these would be FP16)
    original = onnx.load(str(load_manifest(fp32_dir).path("decoder_step")))
    from edgecap.build.convert import name_nodes

    name_nodes(original.graph)
    kept = set(fp32_nodes(original.graph))
    projections = [
        nd.name for nd in original.graph.node if nd.name in kept and nd.op_type in ("MatMul", "Gemm")
    ]
    assert projections, "no attention-logit projection found before the Softmax"
    types = _tensor_types(step)
    converted = {nd.name: nd for nd in step.graph.node}
    for name in kept:
        node = converted[name]  # the converter keeps node names
        tensors = [t for t in list(node.input) + list(node.output) if t]
        assert onnx.TensorProto.FLOAT16 not in [types.get(t) for t in tensors], (name, tensors)
        if node.op_type in ("MatMul", "Gemm", "Add", "Softmax", "LogSoftmax"):
            # no int operands (axes, k, indices) here: every one of them must be float32
            assert all(types.get(t) == onnx.TensorProto.FLOAT for t in tensors), (name, tensors)
    for name in projections:
        assert converted[name].op_type in ("MatMul", "Gemm")
    # The word bias is added in FP32, found from the graph itself (not from the block list):
    # from the ``word_bias`` input, only casts to float32 lead to an Add on float32 tensors
    # (a cast to FP16 on the way would round a fused language model's bias to 3 digits).
    tensor, adds = "word_bias", []
    while not adds:
        readers = [nd for nd in step.graph.node if tensor in nd.input]
        assert len(readers) == 1, readers
        (reader,) = readers
        if reader.op_type == "Add":
            adds.append(reader)
            break
        assert reader.op_type == "Cast", reader
        assert [a.i for a in reader.attribute if a.name == "to"] == [onnx.TensorProto.FLOAT]
        tensor = reader.output[0]
    assert all(types.get(t) == onnx.TensorProto.FLOAT for t in [*adds[0].input, *adds[0].output]), adds[0]
    # and the word logits: the exporter names nodes after the PyTorch modules, and the decoder's
    # out_vocab projection (through the never-generated mask) feeds the LogSoftmax
    if importlib.util.find_spec("torch") is None:
        pytest.skip(STAND_IN)
    assert [nd for nd in original.graph.node if nd.name.startswith("/out_vocab/") and nd.name in kept]


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor in ``model``: graph I/O, initializers, inferred values."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def test_fp16_convert_needs_sympy_only_for_static_int8(fp32_dir, tmp_path, monkeypatch):
    import sys

    from edgecap.errors import BackendError

    monkeypatch.setitem(sys.modules, "sympy", None)
    with pytest.raises(BackendError, match="sympy"):
        convert_model_dir(fp32_dir, tmp_path / "int8", "int8", calibration=tmp_path)
    assert not (tmp_path / "int8").exists()  # refused before writing anything


def test_int8_without_onnxruntime_names_what_to_install(fp32_dir, tmp_path, monkeypatch):
    """FP16 needs onnx alone; int8 needs onnxruntime's quantizer: without onnxruntime, one
    BackendError saying so and how to install it, before anything is written."""
    import sys

    from edgecap.errors import BackendError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(BackendError) as refused:
        convert_model_dir(fp32_dir, tmp_path / "int8", "int8")
    assert str(refused.value).startswith(
        "int8 conversion needs onnxruntime, which is not installed: pip install onnxruntime "
    )
    assert not (tmp_path / "int8").exists()


def test_int8_without_a_module_the_quantizer_imports_names_that_module(fp32_dir, tmp_path, monkeypatch):
    """onnxruntime installed but a module its quantizer imports missing (``ml_dtypes``, which
    onnxruntime.quantization imports; a trimmed install): the BackendError names that module
    and how to install it, not onnxruntime, which is there."""
    import builtins

    from edgecap.errors import BackendError

    real_import = builtins.__import__

    def without_ml_dtypes(name, *args, **kwargs):
        if name.startswith("onnxruntime.quantization"):
            raise ModuleNotFoundError("No module named 'ml_dtypes'", name="ml_dtypes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_ml_dtypes)
    with pytest.raises(BackendError) as refused:
        convert_model_dir(fp32_dir, tmp_path / "int8", "int8")
    assert str(refused.value).startswith(
        "int8 conversion needs ml_dtypes, which is not installed: pip install ml_dtypes "
        "(onnxruntime is in edgecap's cpu and gpu extras; the rest: "
    )
    assert not (tmp_path / "int8").exists()


def test_fp16_agrees_with_fp32_stage_by_stage(fp32_dir, fp16_dir):
    needs_onnxruntime_for_opset_18(fp32_dir, "running an FP16 LayerNormalization")
    diffs = compare_stages(load_manifest(fp32_dir), load_manifest(fp16_dir), n_images=3)
    # Stated tolerances (largest absolute difference, random-noise images): the encoder's
    # outputs are O(1) and pass through ~50 FP16 convolutions (measured on the tiny exported
    # model: features 0.2 at most, ~1% mean on real photos); the decoder step is fed the FP32
    # encoder outputs, so it is judged on its own: ~3 significant digits.
    for name in ("features", "att_proj", "h0", "c0"):
        assert diffs[name] < 0.3, (name, diffs)
    for name in ("h_out", "c_out", "alpha"):
        assert diffs[name] < 1e-2, (name, diffs)
    assert diffs["topk_logprobs"] < 2e-2, diffs
    assert diffs["topk_ids_agree"] >= 0.5, diffs


def test_fp16_steps_chain_on_onnxruntime_cpu(fp32_dir, fp16_dir):
    """Several steps with beam reordering: same top words as FP32 where they are not near-ties."""
    needs_onnxruntime_for_opset_18(fp32_dir, "running an FP16 LayerNormalization")

    def run(directory):
        m = load_manifest(directory)
        enc = ort.InferenceSession(str(m.path("encoder")), providers=["CPUExecutionProvider"])
        step = ort.InferenceSession(str(m.path("decoder_step")), providers=["CPUExecutionProvider"])
        h, w = m.preprocessing.size
        images = np.random.default_rng(3).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
        features, att_proj, hs, cs, _probs = enc.run(None, {"image": images})
        image_index = np.array([0, 0, 1, 1], np.int32)
        source_rows, tokens = image_index.copy(), np.full(4, m.tokens["start"], np.int32)
        bias = np.zeros((4, m.dims.vocab_size), np.float32)
        bias[:, -1] = 5.0  # the word bias is added in FP32 too
        out = []
        for _ in range(4):
            lp, ids, hs, cs, _alpha = step.run(
                None,
                {
                    "tokens": tokens,
                    "h": hs,
                    "c": cs,
                    "source_rows": source_rows,
                    "features": features,
                    "att_proj": att_proj,
                    "image_index": image_index,
                    "word_bias": bias,
                },
            )
            out.append(lp)
            tokens = ids[:, 0].astype(np.int32)
            source_rows = np.array([1, 0, 3, 2], np.int32)
        return np.stack(out)

    np.testing.assert_allclose(run(fp16_dir), run(fp32_dir), atol=0.1)


def test_convert_refuses_bad_targets(fp32_dir, fp16_dir, tmp_path):
    with pytest.raises(ModelError, match="must differ"):
        convert_model_dir(fp32_dir, fp32_dir, "fp16")
    with pytest.raises(ModelError, match="not empty"):
        convert_model_dir(fp32_dir, fp16_dir, "fp16")
    with pytest.raises(ModelError, match="precision is 'fp16'"):
        convert_model_dir(fp16_dir, tmp_path / "again", "fp16")
    with pytest.raises(ValueError, match="precision"):
        convert_model_dir(fp32_dir, tmp_path / "x", "fp8")
    with pytest.raises(ValueError, match="calibration"):
        convert_model_dir(fp32_dir, tmp_path / "y", "fp16", calibration=tmp_path)
    # the Python API's own converters refuse a converted model's folder too, unless forced
    from edgecap.build.convert import convert_fp16, convert_int8

    for convert in (convert_fp16, convert_int8):
        with pytest.raises(ModelError, match="not empty"):
            convert(load_manifest(fp32_dir), fp16_dir)
    assert load_manifest(fp16_dir).precision == "fp16"


def test_convert_makes_an_out_dir_whose_parent_is_not_there_yet(small_model, tmp_path):
    """``--out models/fp16`` where models/ is not there: made, as ``mkdir -p`` would."""
    out = tmp_path / "models" / "fp16"
    convert_model_dir(small_model, out, "fp16")
    assert load_manifest(out).precision == "fp16"


def test_convert_detects_corrupt_source(fp32_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_dir, copy)
    data = (copy / "encoder.onnx").read_bytes()
    (copy / "encoder.onnx").write_bytes(data[:-10])
    with pytest.raises(ModelError, match="checksum"):
        convert_model_dir(copy, tmp_path / "out", "fp16")


def test_convert_detects_a_source_graph_changed_but_still_loadable(small_model, tmp_path):
    """A graph whose bytes changed but still load (a weight flipped on an SD card, another
    model's graph copied over it) fails its checksum: refused before anything is written, not
    converted into a model of wrong weights that vouches for the source's checksums."""
    from onnx import numpy_helper

    graph = small_model / "encoder.onnx"
    model = onnx.load(str(graph))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 1.0, weight.name))
    onnx.save(model, str(graph))
    onnx.checker.check_model(onnx.load(str(graph)))  # still a valid graph
    with pytest.raises(ModelError, match="checksum"):
        convert_model_dir(small_model, tmp_path / "out", "fp16")
    assert not (tmp_path / "out").exists()


def test_int8_dynamic_step_and_static_encoder(fp32_dir, int8_dir):
    m = load_manifest(int8_dir)
    verify_files(m)
    assert m.precision == "int8"
    assert "calibrated on 2 images" in m.info["converted_from"]["encoder"]
    step_ops = {nd.op_type for nd in onnx.load(str(m.path("decoder_step"))).graph.node}
    assert step_ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    enc_ops = {nd.op_type for nd in onnx.load(str(m.path("encoder"))).graph.node}
    assert "QuantizeLinear" in enc_ops
    diffs = compare_stages(load_manifest(fp32_dir), m)
    assert all(np.isfinite(v) for v in diffs.values())


def test_an_fp32_batch_steps_in_one_run_and_an_int8_batch_a_run_per_photo(fp32_dir, int8_dir):
    """What a batch costs: an FP32 (or FP16) step runs all of a batch's rows in one onnxruntime
    run, which is what makes batches faster; an int8 step one run per photo (its rows kept
    apart, so that the other photos do not move its caption), and a photo alone one run."""
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    def runs_a_step(model_dir, n_images: int) -> int:
        backend = OnnxRuntimeBackend(load_manifest(model_dir), device="cpu", threads=1)
        h, w = backend.manifest.preprocessing.size
        images = np.random.default_rng(0).uniform(-1, 1, (n_images, 3, h, w)).astype(np.float32)
        index = np.repeat(np.arange(n_images, dtype=np.int32), 3)
        session = backend.start(backend.encode(images), index)
        calls, real = [], session._run
        session._run = lambda *args: calls.append(1) or real(*args)
        tokens = np.full(len(index), backend.manifest.tokens["start"], np.int32)
        session.step(tokens, index.copy(), None)  # the first step: h/c per image
        session.step(tokens, np.arange(len(index), dtype=np.int32), None)
        return len(calls)

    assert [runs_a_step(fp32_dir, n) for n in (1, 3)] == [2, 2]
    assert [runs_a_step(int8_dir, n) for n in (1, 3)] == [2, 6]


@pytest.mark.parametrize("beam", [1, 3])
def test_an_int8_images_step_is_the_same_in_a_batch_as_alone(int8_dir, beam):
    """The int8 step quantises its inputs dynamically, one scale over all the rows of a run: the
    onnxruntime backend runs each image's rows apart, so that the other photos of a batch do
    not move a photo's words or scores (they had: 22 of 240 captions changed in batches of 8)."""
    from edgecap.backends.base import Encoded
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    manifest = load_manifest(int8_dir)
    backend = OnnxRuntimeBackend(manifest)
    images = np.random.default_rng(0).standard_normal((2, 3, *manifest.preprocessing.size))
    images[1] *= 8  # the other photo: a wider range of values
    encoded = backend.encode(images.astype(np.float32))
    # the batch's own tensors for the first image: the step compared, not the encoder
    alone = Encoded(1, {k: v[:1] for k, v in encoded.tensors.items()}, encoded.class_probs[:1])
    sessions = {
        "alone": (backend.start(alone, np.zeros(beam, np.int32)), beam),
        "batch": (backend.start(encoded, np.repeat(np.arange(2, dtype=np.int32), beam)), 2 * beam),
    }
    start = manifest.tokens.get("start", 1)
    results = {}
    for name, (session, rows) in sessions.items():
        tokens = np.full(rows, start, np.int32)
        source = np.repeat(np.arange(rows // beam, dtype=np.int32), beam)  # h0 / c0: per image
        steps = []
        for _ in range(3):
            result = session.step(tokens, source)
            steps.append((result.topk_logprobs[:beam], result.topk_ids[:beam]))
            tokens, source = result.topk_ids[:, 0].astype(np.int32), np.arange(rows, dtype=np.int32)
        results[name] = steps
    for (lp_alone, ids_alone), (lp_batch, ids_batch) in zip(results["alone"], results["batch"]):
        np.testing.assert_array_equal(ids_batch, ids_alone)
        np.testing.assert_array_equal(lp_batch, lp_alone)


def test_an_int8_row_that_reads_another_images_state_is_stepped_with_the_whole_batch(small_model, tmp_path):
    """The int8 step's rows run image by image only while each row continues its own image's
    state: a row that reads another image's (possible through the backend API, never in the
    beam loop) makes the step one run over all the rows, as it is for FP32 models, not a run
    of one image's rows reading a state that run does not have."""
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    manifest = convert_model_dir(small_model, tmp_path / "int8", "int8")
    backend = OnnxRuntimeBackend(manifest, device="cpu")
    images = np.random.default_rng(0).standard_normal((2, 3, *manifest.preprocessing.size))
    encoded = backend.encode(images.astype(np.float32))
    index = np.array([0, 0, 1, 1], np.int32)
    crossing = np.array([1, 0, 1, 1], np.int32)  # row 0, of image 0, starts from image 1's h0
    tokens = np.full(4, manifest.tokens["start"], np.int32)
    session = backend.start(encoded, index)
    assert session.per_image  # an int8 model's batch of 2 runs image by image
    got = session.step(tokens, crossing)
    whole = backend.start(encoded, index)
    whole.per_image = False  # one run for all the rows
    want = whole.step(tokens, crossing)
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs)


def test_static_int8_encoder_keeps_its_sensitive_layers_fp32_and_its_features_close(
    tiny_model_dir, fp32_dir, int8_dir, example_images
):
    assert fp32_dir == tiny_model_dir  # int8_dir is the tiny model's (the real encoder's layers)
    photos = sorted(example_images)  # int8_dir calibrated on photos[:2]
    m = load_manifest(int8_dir)
    model = onnx.load(str(m.path("encoder")))
    ops = {n.name: n.op_type for n in model.graph.node}
    # the stem, blocks 0-1 and the classifier stay float; block 2 on is int8 (QLinearConv)
    assert ops["/_conv_stem/Conv"] == "Conv"
    assert ops["/_blocks.1/_project_conv/Conv"] == "Conv"
    assert ops["/_fc/Gemm"] == "Gemm"
    assert "QLinearConv" in ops.values()
    assert not any(name.startswith("/_blocks.2/") and op == "Conv" for name, op in ops.items())
    assert ops.get("/_conv_head/Conv") != "Conv"  # the CNN's last convolution is int8 too
    images = _uncalibrated_inputs(photos, m)
    ref, got = _encoder_features(tiny_model_dir, images), _encoder_features(int8_dir, images)
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64  # 7 bits
    # stated tolerance: the decoder's features within 30% (relative L2) of FP32 on photos not
    # calibrated on, after calibrating on two photos (measured on this tiny model: 0.27; the
    # shipped model calibrated on 64 train photos: 0.13 with 8-bit weights on a VNNI CPU)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.3


def _uncalibrated_inputs(photos, manifest) -> np.ndarray:
    """The encoder's inputs for the example photos int8_dir was not calibrated on."""
    from edgecap.images import load_rgb
    from edgecap.preprocess import to_model_input

    return np.stack([to_model_input(load_rgb(p), manifest.preprocessing) for p in photos[2:]])


def _encoder_features(model_dir: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(load_manifest(model_dir).path("encoder")), providers=["CPUExecutionProvider"]
    )
    return session.run(["features"], {"image": images})[0]


def test_static_int8_encoder_is_computed_as_exact_integer_arithmetic(int8_dir, example_images):
    """The file is computed the same on every CPU: onnxruntime's kernels agree with the exact
    integer arithmetic of onnx's reference evaluator, up to where each rounds when it
    requantises (measured on a 2-core AMD EPYC without VNNI, shipped encoder: 0.07 with 7-bit
    weights and with int8 x int8; with 8-bit weights its uint8 x int8 kernels saturate: 0.42)."""
    # the reference's QLinearConv takes a weight scale per output channel (what the quantiser
    # writes) from onnx 1.18; 1.17, which edgecap[convert] allows, fails there
    pytest.importorskip("onnx", minversion="1.18")
    if importlib.util.find_spec("torch") is None:
        # the stand-in names no node after a PyTorch module, so its layers after the CNN are
        # quantised too: QGemm and QLinearSoftmax, onnxruntime-domain ops the reference lacks
        pytest.skip(STAND_IN)
    m = load_manifest(int8_dir)
    model = onnx.load(str(m.path("encoder")))
    images = _uncalibrated_inputs(sorted(example_images), m)
    exact = _exact_int8_run(model, images)
    got = _encoder_features(int8_dir, images)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.15


def _exact_int8_run(model, images: np.ndarray) -> np.ndarray:
    """The encoder's ``features`` computed by onnx's reference evaluator (numpy, exact integer
    arithmetic), with the two onnxruntime-domain ops the quantiser writes."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    def requantize(value, scale, zero_point):
        info = np.iinfo(zero_point.dtype)
        return np.clip(np.rint(value / scale) + zero_point, info.min, info.max).astype(zero_point.dtype)

    class QLinearAdd(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, a_scale, a_zero, b, b_scale, b_zero, c_scale, c_zero):
            value = (a.astype(np.float32) - a_zero) * a_scale + (b.astype(np.float32) - b_zero) * b_scale
            return (requantize(value, c_scale, c_zero),)

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)  # the reference's Quantize/DequantizeLinear
    evaluator = ReferenceEvaluator(model, new_ops=[QLinearAdd])
    return np.concatenate([evaluator.run(["features"], {"image": image[None]})[0] for image in images])


def test_cli_convert(fp32_dir, tmp_path, capsys):
    needs_onnxruntime_for_opset_18(fp32_dir, "checking an FP16 LayerNormalization")
    import argparse

    from edgecap.commands import convert as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(fp32_dir), "--precision", "fp16", "--out", str(tmp_path / "o")])
    rc = command.run(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "wrote fp16 model" in out and "best word agrees" in out


class _ReaderGone:
    """A standard output whose reader has gone (``| head -1``): each write a broken pipe."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_cli_convert_to_a_reader_gone_away_stops_quietly_with_its_model_checked(
    small_model, tmp_path, monkeypatch, capsys
):
    """``edgecap convert ... | head -1``: as caption and eval, a closed pipe is exit 141 with
    nothing on stderr (it was a BrokenPipeError traceback, exit 1), and the converted model is
    still checked (its manifest is removed when the check fails, as without the pipe)."""
    from edgecap.build import convert as module
    from edgecap.cli import main

    needs_onnxruntime_for_opset_18(small_model, "checking an FP16 LayerNormalization")
    checked = []
    real = module.compare_stages
    monkeypatch.setattr(module, "compare_stages", lambda *a, **k: checked.append(1) or real(*a, **k))
    monkeypatch.setattr("sys.stdout", _ReaderGone())
    code = main(["convert", str(small_model), "--out", str(tmp_path / "o")])
    assert code == 141 and capsys.readouterr().err == ""
    assert checked and load_manifest(tmp_path / "o").precision == "fp16"


def test_cli_convert_flags_as_typed(fp32_dir, tmp_path, capsys):
    """``edgecap convert`` through the command line: without --precision an FP16 copy (its
    --help's default); --no-check prints no comparison; a non-empty OUT_DIR is refused (exit 2,
    one line naming it) unless --force; --calibration with fp16 is a usage error (exit 2); with
    int8 the calibration folder is used (an empty one is refused, naming it)."""
    from edgecap.cli import main

    def convert(*args):
        code = main(["convert", str(fp32_dir), *map(str, args)])
        return code, capsys.readouterr()

    out = tmp_path / "o"
    code, printed = convert("--out", out, "--no-check")
    assert code == 0, printed.err
    assert load_manifest(out).precision == "fp16"
    assert printed.out.startswith(f"wrote fp16 model to {out}")
    assert "largest difference" not in printed.out and "best word agrees" not in printed.out

    code, printed = convert("--out", out, "--no-check")
    assert (code, printed.out) == (2, "")
    assert printed.err.startswith("edgecap convert: error: ") and printed.err.count("\n") == 1
    assert str(out) in printed.err and "not empty" in printed.err
    code, printed = convert("--out", out, "--no-check", "--force")
    assert code == 0, printed.err

    photos = tmp_path / "photos"
    photos.mkdir()
    code, printed = convert("--out", tmp_path / "f", "--calibration", photos)
    assert (code, printed.out) == (2, "")
    assert printed.err == "edgecap convert: error: --calibration only applies to --precision int8\n"

    code, printed = convert(
        "--out", tmp_path / "i", "--precision", "int8", "--calibration", photos, "--no-check"
    )
    assert (code, printed.out) == (2, ""), printed.err
    assert printed.err.startswith("edgecap convert: error: ") and printed.err.count("\n") == 1
    # (where sympy is missing, static calibration is refused for that first)
    assert f"{photos}: no images (.jpg, .png, ...) to calibrate with" in printed.err or "sympy" in printed.err


@pytest.mark.parametrize("error, expected", unwritable_output_cases("convert"))
def test_cli_convert_report_that_cannot_be_written_is_not_a_traceback(
    error, expected, small_model, tmp_path, monkeypatch, capsys
):
    """docs/cli.md: output that cannot be written is exit 2 in one line (a full disk), a reader
    gone away (| head) 141, quietly; the converted model is written either way. It had been a
    traceback of the OSError and exit 1."""
    import sys

    from edgecap.cli import main
    from helpers import UnwritableStdout

    monkeypatch.setattr(sys, "stdout", UnwritableStdout(error))
    rc = main(["convert", str(small_model), "--out", str(tmp_path / "o"), "--no-check"])
    assert (rc, capsys.readouterr().err) == expected
    assert load_manifest(tmp_path / "o").precision == "fp16"


def _with_other_encoder_weights(model: Path, copy: Path) -> Path:
    """A copy of ``model`` whose encoder's weights are halved (its manifest's checksum updated):
    another model of the same shapes."""
    from dataclasses import replace

    from onnx import numpy_helper

    from edgecap.manifest import file_sha256

    shutil.copytree(model, copy)
    graph = onnx.load(str(copy / "encoder.onnx"))
    for tensor in graph.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32:
            tensor.CopyFrom(numpy_helper.from_array(values * 0.5, tensor.name))
    onnx.save(graph, str(copy / "encoder.onnx"))
    manifest = load_manifest(copy)
    replace(manifest, sha256={**manifest.sha256, "encoder": file_sha256(copy / "encoder.onnx")}).save()
    return copy


@pytest.mark.parametrize("stopped", ["before any graph is written", "after the encoder is written"])
def test_a_forced_conversion_stopped_midway_leaves_no_manifest_over_a_mix(
    stopped, small_model, tmp_path, monkeypatch
):
    """--force over an earlier model: a conversion stopped (Ctrl-C, a full disk, a refused graph)
    after its first graph was written had left the earlier model's manifest beside the new
    encoder and the earlier decoder step: a mix of two models that loaded and captioned without a
    word (the checksums are compared only when a file fails to load). Its manifest is removed
    then; stopped before anything was written, the earlier model is left whole."""
    import edgecap.build.convert as convert

    out = tmp_path / "o"
    convert_model_dir(small_model, out, "fp16")
    other = _with_other_encoder_weights(small_model, tmp_path / "other")
    real, calls = convert.to_fp16, []

    def stopping(model):
        calls.append(model)
        if len(calls) == (1 if stopped == "before any graph is written" else 2):
            raise KeyboardInterrupt
        return real(model)

    monkeypatch.setattr(convert, "to_fp16", stopping)
    with pytest.raises(KeyboardInterrupt):
        convert_model_dir(other, out, "fp16", force=True)
    if stopped == "before any graph is written":
        verify_files(load_manifest(out))  # the earlier model, whole
    else:
        with pytest.raises(ModelError, match="no manifest.json"):
            load_manifest(out)


def test_cli_convert_out_that_cannot_be_a_folder_is_one_line_and_exit_2(
    default_model_dir, tmp_path, capsys, monkeypatch
):
    """docs/cli.md: a usage error is exit 2, never a traceback. An --out that is a file, or lies
    below one, cannot be made a folder: one line naming it and what is wrong (the system's
    "Not a directory"), exit 2, nothing printed on stdout. Before the fix: a traceback of
    NotADirectoryError and exit 1."""
    from edgecap.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "model"):
        code = main(["convert", str(default_model_dir), "--out", str(out), "--no-check"])
        printed = capsys.readouterr()
        assert (code, printed.out) == (2, "")
        assert printed.err == f"edgecap convert: error: {out}: Not a directory\n"
    assert a_file.read_text() == "not a folder"
    # also where no temporary folder can be written (a read-only root file system; tempfile as
    # CPython has it there): the error names --out, so --out it is, not the temporary folder
    import tempfile

    def none_usable():
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "gettempdir", none_usable)
    assert main(["convert", str(default_model_dir), "--out", str(a_file), "--no-check"]) == 2
    assert capsys.readouterr().err == f"edgecap convert: error: {a_file}: Not a directory\n"


def _with_decoding_files(fp32_dir, model: Path) -> Path:
    """A copy of the FP32 model directory with fused caption LMs (random, over its vocabulary)
    and the shipped model's confidence model."""
    import hashlib
    import json

    shutil.copytree(fp32_dir, model)
    vocab_size = load_manifest(model).dims.vocab_size
    spec: dict = {"format": "edgecap-fusion/1", "weight": 0.6}
    for role, seed in (("everyday", 5), ("in_domain", 6)):
        rng = np.random.default_rng(seed)
        np.savez(
            model / f"lm_{role}.npz",
            embed=rng.normal(size=(vocab_size, 4)),
            w_ih=rng.normal(size=(12, 4)),
            w_hh=rng.normal(size=(12, 3)),
            bias=np.zeros(12),
            out_w=rng.normal(size=(vocab_size, 3)),
            out_b=np.zeros(vocab_size),
        )
        digest = hashlib.sha256((model / f"lm_{role}.npz").read_bytes()).hexdigest()
        spec[role] = {"file": f"lm_{role}.npz", "sha256": digest}
    (model / "fusion.json").write_text(json.dumps(spec))
    shutil.copy2(Path("edgecap/assets/default/confidence.json"), model / "confidence.json")
    return model


DECODING_FILES = ("fusion.json", "lm_everyday.npz", "lm_in_domain.npz", "confidence.json")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_converted_model_keeps_its_fused_language_models_and_confidence(fp32_dir, tmp_path, precision):
    """The everyday language and the confidence are the model's decoding, not its precision: a
    converted directory captions with them as the FP32 one does."""
    from edgecap import Captioner

    if precision == "fp16":
        needs_onnxruntime_for_opset_18(fp32_dir, "captioning with an FP16 LayerNormalization")
    source = _with_decoding_files(fp32_dir, tmp_path / "fp32")
    out = tmp_path / precision
    convert_model_dir(source, out, precision)
    for name in DECODING_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # named in its manifest (the source's names none): a copy without them is refused
    files = load_manifest(out).files
    assert (files["fusion"], files["confidence"]) == ("fusion.json", "confidence.json")
    converted = Captioner(out)
    assert converted.fusion is not None and converted.fusion.weight == 0.6
    assert converted.caption("edgecap/assets/examples/coffee.png").confidence is not None


def test_a_broken_language_model_is_refused_before_anything_is_written(fp32_dir, tmp_path):
    source = _with_decoding_files(fp32_dir, tmp_path / "fp32")
    with (source / "lm_in_domain.npz").open("ab") as f:
        f.write(b"\0")  # no longer the file fusion.json checksums
    with pytest.raises(ModelError, match="lm_in_domain.npz"):
        convert_model_dir(source, tmp_path / "out", "fp16")
    assert not (tmp_path / "out").exists()


def test_force_over_a_converted_model_leaves_none_of_its_decoding_files(fp32_dir, tmp_path):
    """--force over a folder that holds a converted model with fused LMs and a confidence model:
    converting a model without them must not leave the old ones to be loaded with the new one."""
    from edgecap import Captioner

    needs_onnxruntime_for_opset_18(fp32_dir, "captioning with an FP16 LayerNormalization")
    out = tmp_path / "out"
    convert_model_dir(_with_decoding_files(fp32_dir, tmp_path / "with"), out, "fp16")
    assert Captioner(out).fusion is not None
    convert_model_dir(fp32_dir, out, "fp16", force=True)  # the tiny model: no decoding files
    converted = Captioner(out)
    assert converted.fusion is None
    assert converted.caption("edgecap/assets/examples/coffee.png").confidence is None
    assert not (out / "fusion.json").exists() and not (out / "confidence.json").exists()
    assert not list(out.glob("*.npz"))  # nor the language models' files the fusion.json named
    assert set(load_manifest(out).files) == {"encoder", "decoder_step", "vocab", "classes"}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_force_stopped_before_the_new_graphs_are_written_leaves_the_earlier_model_whole(
    small_model, tmp_path, monkeypatch, precision
):
    """--force over a folder holding a converted model with fused LMs and a confidence model,
    stopped (Ctrl-C) before any of the new model's graphs is written: the folder is the earlier
    model byte for byte. Its graphs and manifest untouched, it still loads; without its
    fusion.json, .npz files and confidence.json it captioned silently without the everyday
    language (docs/precision.md: everyday CIDEr 0.42 -> 0.30) and gave no confidence."""
    from edgecap.build import convert

    out = tmp_path / "out"
    convert_model_dir(_with_decoding_files(small_model, tmp_path / "with"), out, "fp16")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"fusion.json", "lm_everyday.npz", "lm_in_domain.npz", "confidence.json"} <= set(before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # the first graph's conversion: fp16's converter, int8's dynamic quantisation of the step
    if precision == "fp16":
        monkeypatch.setattr(convert, "to_fp16", interrupted)
    else:
        monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_model_dir(small_model, out, precision, force=True)  # a model without them
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_force_stopped_once_a_new_graph_is_written_leaves_no_model_that_loads(
    small_model, tmp_path, monkeypatch, precision
):
    """--force over a folder holding a model of the other precision, stopped (Ctrl-C; a SIGTERM,
    which runs no cleanup, alike) once the first of the new model's graphs is in it and before
    the second is: the folder must not load as a model. It held the new encoder (fp16) or decoder
    step (int8) beside the earlier model's other graph under the earlier model's manifest, and
    loaded and captioned silently (a graph's checksum is compared only when it fails to load)."""
    import onnx as onnx_module

    from edgecap.build import convert

    out = tmp_path / "out"
    convert_model_dir(small_model, out, "int8" if precision == "fp16" else "fp16")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if precision == "fp16":  # the second graph's save (the decoder step's)
        real_save = onnx_module.save

        def save(model, path, *args, **kwargs):
            if Path(path).name == "decoder_step.onnx":
                raise KeyboardInterrupt
            return real_save(model, path, *args, **kwargs)

        monkeypatch.setattr(onnx_module, "save", save)
    else:  # the encoder's copy, after the decoder step's quantisation
        real_copy = shutil.copy2

        def copy(source, *args, **kwargs):
            if Path(source).name == "encoder.onnx":
                raise KeyboardInterrupt
            return real_copy(source, *args, **kwargs)

        monkeypatch.setattr(convert.shutil, "copy2", copy)
    with pytest.raises(KeyboardInterrupt):
        convert_model_dir(small_model, out, precision, force=True)
    changed = "encoder.onnx" if precision == "fp16" else "decoder_step.onnx"
    assert (out / changed).read_bytes() != before[changed]  # the new graph is in
    with pytest.raises(ModelError, match="manifest"):
        load_manifest(out)


# -- quick checks on a contract-shaped model built with onnx helpers -------------------------


@pytest.fixture
def small_model(tmp_path) -> Path:
    from helpers import contract_model_dir

    return contract_model_dir(tmp_path / "small")


def _solid_png(path: Path, rgb: tuple[int, int, int], size=(20, 10)) -> Path:
    from PIL import Image

    Image.new("RGB", size, rgb).save(path)
    return path


def test_a_bad_calibration_folder_is_refused_before_anything_is_written(fp32_dir, tmp_path):
    """A missing or photo-less --calibration folder, a photo named instead of its folder (said
    to be no folder: it had been "calibration directory not found"), or a folder holding a photo
    that does not decode, is refused naming it, and OUT_DIR is not made: a half-written one (the
    int8 decoder step alone) would make the corrected command fail again with 'directory exists
    and is not empty'."""
    pytest.importorskip("sympy")
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    photo = _solid_png(tmp_path / "chelsea.png", (10, 200, 30))
    for folder, problem in (
        (empty, f"{empty}: no images (.jpg, .png, ...) to calibrate with"),
        (tmp_path / "nowhere", f"calibration directory not found: {tmp_path / 'nowhere'}"),
        (photo, f"calibration directory is not a folder: {photo}"),
    ):
        out = tmp_path / f"int8-{folder.name}"
        with pytest.raises(ModelError) as refused:
            convert_model_dir(fp32_dir, out, "int8", calibration=folder)
        assert str(refused.value) == problem
        assert not out.exists()
    # a photo that does not decode: refused naming it, before OUT_DIR is made
    broken = tmp_path / "broken"
    broken.mkdir()
    _solid_png(broken / "a.png", (10, 200, 30))
    (broken / "b.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "int8-broken"
    with pytest.raises(InputError, match=r"b\.jpg: not an image in an accepted format"):
        convert_model_dir(fp32_dir, out, "int8", calibration=broken)
    assert not out.exists()


def test_calibration_photos_are_every_image_below_the_folder_sorted_up_to_the_limit(tmp_path):
    from edgecap.build.convert import calibration_images

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    for name in (".thumbs/x.png", "h.jfif", "g.gif", "sub/e.webp", "d.TIFF", "c.jpeg", "b.JPG", "a.png"):
        _solid_png(folder / "a.png", (0, 0, 0)).rename(folder / name)  # made in reverse order
    (folder / "notes.txt").write_text("not a photo")
    (folder / "f.onnx").write_bytes(b"")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's, on another disk
    # as edgecap caption takes a folder's photos: hidden ones left out, .gif and .jfif in
    names = ["a.png", "b.JPG", "c.jpeg", "d.TIFF", "g.gif", "h.jfif", "sub/e.webp"]
    assert calibration_images(folder) == [folder / n for n in names]
    assert calibration_images(folder, limit=2) == [folder / "a.png", folder / "b.JPG"]
    for i in range(60):  # 67 photos: up to 64 are used (edgecap convert --help)
        _solid_png(folder / "sub" / f"p{i:02d}.png", (i, 0, 0), size=(2, 2))
    assert (
        calibration_images(folder)
        == sorted([folder / n for n in names] + [folder / "sub" / f"p{i:02d}.png" for i in range(60)])[:64]
    )
    with pytest.raises(ModelError, match="no images"):
        calibration_images(_empty(tmp_path))
    with pytest.raises(ModelError, match="calibration directory not found"):
        calibration_images(tmp_path / "nowhere")


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("")
    return tmp_path / "empty"


def test_calibration_feeds_each_photo_preprocessed_as_the_manifest_says(small_model, tmp_path):
    """The static int8 encoder's ranges come from the photos as the encoder will see them: each
    photo once, resized to the manifest's 16 x 16 and normalised by its mean and std (127.5):
    a solid (255, 0, 51) photo is (1, -1, -0.6) in every pixel."""
    from edgecap.build.convert import _ImageReader

    photos = [_solid_png(tmp_path / "a.png", (255, 0, 51)), _solid_png(tmp_path / "b.png", (51, 255, 0))]
    reader = _ImageReader(photos, load_manifest(small_model))
    for want in ((1.0, -1.0, -0.6), (-0.6, 1.0, -1.0)):
        batch = reader.get_next()
        assert list(batch) == ["image"] and batch["image"].shape == (1, 3, 16, 16)
        assert batch["image"].dtype == np.float32
        np.testing.assert_allclose(
            batch["image"][0], np.broadcast_to(np.array(want)[:, None, None], (3, 16, 16))
        )
    assert reader.get_next() is None


def test_int8_is_made_only_from_the_fp32_model(small_model, tmp_path):
    from helpers import edit_manifest, set_field

    edit_manifest(small_model, set_field(["precision"], "fp16"))
    with pytest.raises(ModelError, match="precision is 'fp16'"):
        convert_model_dir(small_model, tmp_path / "int8", "int8")
    assert not (tmp_path / "int8").exists()


def test_an_int8_conversion_gives_the_root_logger_its_level_back(small_model, tmp_path):
    """onnxruntime.quantization's warnings (logged on the root logger) are held back while it
    runs, and the program's own level is back afterwards: a program that converts models (the
    Python API) keeps its INFO logs."""
    import logging

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        convert_model_dir(small_model, tmp_path / "int8", "int8")
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)


def test_a_converted_model_records_what_it_was_converted_from(small_model, tmp_path):
    source = load_manifest(small_model)
    converted = convert_model_dir(small_model, tmp_path / "fp16", "fp16")
    assert converted.precision == "fp16"
    assert converted.info["converted_from"]["precision"] == "fp32"
    assert converted.info["converted_from"]["sha256"] == source.sha256
    assert load_manifest(tmp_path / "fp16").info["converted_from"] == converted.info["converted_from"]


def test_a_conversion_that_changes_the_graph_io_is_refused(small_model, tmp_path, monkeypatch):
    from edgecap.build import convert

    real = convert.to_fp16

    def renaming(model):
        converted = real(model)
        converted.graph.output[0].name = converted.graph.output[0].name + "_renamed"
        return converted

    monkeypatch.setattr(convert, "to_fp16", renaming)
    with pytest.raises(ModelError, match="conversion changed the graph inputs/outputs"):
        convert_model_dir(small_model, tmp_path / "fp16", "fp16")


def _nudged_copy(model: Path, out: Path, role: str, initializer: str, index, amount: float) -> Path:
    """A copy of ``model`` with the elements ``index`` of one initializer moved by ``amount``."""
    from onnx import numpy_helper

    shutil.copytree(model, out)
    path = out / f"{role}.onnx"
    graph = onnx.load(str(path))
    (init,) = [i for i in graph.graph.initializer if i.name == initializer]
    value = numpy_helper.to_array(init).copy()
    value.flat[index] += amount
    init.CopyFrom(numpy_helper.from_array(value, initializer))
    onnx.save(graph, str(path))
    return out


def test_compare_stages_judges_the_encoder_and_the_step_apart(small_model, tmp_path):
    """att_proj = features @ W + b: moving b[0] by 0.25 moves att_proj by 0.25 and nothing else
    of the encoder; the step is fed the reference's encoder outputs, so it shows no change."""
    reference = load_manifest(small_model)
    assert set(compare_stages(reference, reference).values()) <= {0.0, 1.0}
    nudged = load_manifest(_nudged_copy(small_model, tmp_path / "nudged", "encoder", "att_feat.b", 0, 0.25))
    diffs = compare_stages(reference, nudged)
    assert diffs["att_proj"] == pytest.approx(0.25, abs=1e-6)
    assert diffs["features"] == diffs["h0"] == diffs["c0"] == diffs["class_probs"] == 0.0
    assert diffs["topk_logprobs"] == diffs["h_out"] == diffs["c_out"] == diffs["alpha"] == 0.0
    assert diffs["topk_ids_agree"] == 1.0


def test_compare_stages_counts_the_rows_whose_best_word_agrees(small_model, tmp_path):
    """A candidate whose output bias favours the even words by 100 (their order among themselves
    unchanged) picks as best word the reference's best even word, so it agrees with the reference
    on the rows whose best word is even; favouring the odd words, on the others: the two
    fractions add up to exactly 1."""
    reference = load_manifest(small_model)
    agree = []
    for parity in (0, 1):
        words = list(range(parity, reference.dims.vocab_size, 2))
        out = tmp_path / f"p{parity}"
        candidate = load_manifest(_nudged_copy(small_model, out, "decoder_step", "out_vocab.b", words, 100.0))
        diffs = compare_stages(reference, candidate, n_images=2, n_beams=2)
        assert diffs["h_out"] == diffs["c_out"] == diffs["alpha"] == 0.0  # before the output layer
        assert diffs["topk_logprobs"] > 0
        agree.append(diffs["topk_ids_agree"])
    assert sum(agree) == 1.0
    assert set(agree) <= {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 rows


def _shifted_output(model: Path, out: Path, role: str, output: str, column: int, amount: float) -> Path:
    """A copy of ``model`` whose graph adds ``amount`` to one column of one output, on every row."""
    from onnx import helper, numpy_helper

    shutil.copytree(model, out)
    path = out / f"{role}.onnx"
    graph = onnx.load(str(path))
    width = load_manifest(model).dims.tails(load_manifest(model).preprocessing.size)[output][-1]
    for node in graph.graph.node:
        node.output[:] = [f"{name}_raw" if name == output else name for name in node.output]
        node.input[:] = [f"{name}_raw" if name == output else name for name in node.input]
    shift = np.zeros(width, np.float32)
    shift[column] = amount
    graph.graph.initializer.append(numpy_helper.from_array(shift, f"{output}_shift"))
    graph.graph.node.append(helper.make_node("Add", [f"{output}_raw", f"{output}_shift"], [output]))
    onnx.save(graph, str(path))
    return out


@pytest.mark.parametrize(
    "role, output",
    [
        ("encoder", "h0"),
        ("encoder", "class_probs"),
        ("decoder_step", "topk_logprobs"),
        ("decoder_step", "h_out"),
        ("decoder_step", "c_out"),
        ("decoder_step", "alpha"),
    ],
)
def test_compare_stages_reports_the_largest_difference_of_each_output(small_model, tmp_path, role, output):
    """One column of one output moved by 0.5 on every row: that output differs by 0.5 at most
    (not on average), every other by nothing; the step is judged on the reference's encoder
    outputs, so a changed encoder leaves it equal."""
    reference = load_manifest(small_model)
    candidate = load_manifest(_shifted_output(small_model, tmp_path / "c", role, output, 1, 0.5))
    diffs = compare_stages(reference, candidate)
    assert diffs.pop(output) == pytest.approx(0.5, abs=1e-6)
    assert diffs.pop("topk_ids_agree") == 1.0
    assert set(diffs.values()) == {0.0}, diffs


def test_int8_keeps_the_attention_logit_projection_of_the_step_in_fp32(small_model, tmp_path):
    """The step's MatMul weights become int8, except the projection that computes the attention
    logits (the Softmax's input): the contract model's ``att_score`` MatMul keeps its float32
    weights; its ``lstm`` one does not."""
    from edgecap.build.convert import name_nodes

    original = onnx.load(str(small_model / "decoder_step.onnx"))
    name_nodes(original.graph)
    by_weight = {n.input[1]: n.name for n in original.graph.node if n.op_type == "MatMul"}
    kept, quantised = by_weight["att_score.w"], by_weight["lstm.w"]
    converted = convert_model_dir(small_model, tmp_path / "int8", "int8")
    step = onnx.load(str(converted.path("decoder_step")))
    nodes = {n.name: n for n in step.graph.node}
    weights = {t.name: t.data_type for t in step.graph.initializer}
    assert nodes[kept].op_type == "MatMul" and weights[nodes[kept].input[1]] == onnx.TensorProto.FLOAT
    # the word logits' projection is int8 as when int8's figures were measured (FP16 keeps it)
    for name in (quantised, by_weight["out_vocab.w"]):
        assert name not in nodes or nodes[name].op_type != "MatMul"
    assert onnx.TensorProto.INT8 in weights.values()
    assert "fp32 (no --calibration given)" in converted.info["converted_from"]["encoder"]
    assert (tmp_path / "int8" / "encoder.onnx").read_bytes() == (small_model / "encoder.onnx").read_bytes()


def test_sort_nodes_puts_producers_first_and_names_a_node_whose_input_is_never_made():
    from onnx import TensorProto, helper

    from edgecap.build.convert import sort_nodes

    def graph(*nodes):
        vi = helper.make_tensor_value_info
        one = onnx.numpy_helper.from_array(np.ones(2, np.float32), "one")
        x, y = vi("x", TensorProto.FLOAT, [2]), vi("y", TensorProto.FLOAT, [2])
        return helper.make_graph(list(nodes), "g", [x], [y], [one])

    add = helper.make_node("Add", ["b", "one"], ["y"], name="add")
    relu = helper.make_node("Relu", ["x"], ["b"], name="relu")
    ordered = graph(add, relu)
    sort_nodes(ordered)
    assert [n.name for n in ordered.node] == ["relu", "add"]
    orphan = graph(helper.make_node("Add", ["ghost", "one"], ["y"], name="add"), relu)
    with pytest.raises(ModelError, match="graph 'g' has a cycle or a missing input at: add"):
        sort_nodes(orphan)


def test_fp16_keeps_the_word_logit_projection_and_its_bias_in_fp32(small_model, tmp_path):
    """The contract model's word logits are a MatMul and a bias Add straight into the
    LogSoftmax (no mask): both stay FP32 in the FP16 conversion, weights included, while the
    LSTM's weights become FP16; the manifest names the islands."""
    converted = convert_model_dir(small_model, tmp_path / "fp16", "fp16")
    step = onnx.load(str(converted.path("decoder_step")))
    weights = {t.name: t.data_type for t in step.graph.initializer}
    assert weights["out_vocab.w"] == weights["out_vocab.b"] == onnx.TensorProto.FLOAT
    assert weights["lstm.w"] == onnx.TensorProto.FLOAT16
    types = _tensor_types(step)
    (soft,) = [n for n in step.graph.node if n.op_type == "LogSoftmax"]
    assert types[soft.input[0]] == onnx.TensorProto.FLOAT
    assert "word logits" in converted.info["converted_from"]["fp32_ops"]


def test_the_word_logit_island_follows_any_mask_to_the_projection():
    """A hand-built step whose word logits reach the LogSoftmax through a Cast and two masks
    written either way round (``torch.where(allowed, logits, -inf)``: the logits are X, the
    constant an initializer; then ``Where(banned, -inf, ...)``: the constant is X): every node
    from the projection (MatMul, bias Add) to the LogSoftmax stays FP32, and so does the
    GatherElements reading the log-probabilities (the beam's scores). ``word_logits=False``
    (int8's rule): the LogSoftmax and the gather only."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["h", "w"], ["p"], name="proj"),
        helper.make_node("Add", ["p", "b"], ["logits"], name="bias"),
        helper.make_node("Cast", ["logits"], ["logits32"], name="cast", to=f32),
        helper.make_node("Where", ["allowed", "logits32", "neg"], ["m1"], name="allowed_mask"),
        helper.make_node("Where", ["banned", "neg", "m1"], ["m2"], name="banned_mask"),
        helper.make_node("LogSoftmax", ["m2"], ["logp"], name="logsoftmax", axis=1),
        helper.make_node("GatherElements", ["logp", "idx"], ["scores"], name="gather", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "step",
        [
            helper.make_tensor_value_info("h", f32, [1, 4]),
            helper.make_tensor_value_info("allowed", TensorProto.BOOL, [1, 5]),
            helper.make_tensor_value_info("banned", TensorProto.BOOL, [1, 5]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2]),
        ],
        [helper.make_tensor_value_info("scores", f32, [1, 2])],
        [
            numpy_helper.from_array(np.ones((4, 5), np.float32), "w"),
            numpy_helper.from_array(np.zeros(5, np.float32), "b"),
            numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        ],
    )
    everything = ["proj", "bias", "cast", "allowed_mask", "banned_mask", "logsoftmax", "gather"]
    assert sorted(fp32_nodes(graph)) == sorted(everything)
    assert sorted(fp32_nodes(graph, word_logits=False)) == ["gather", "logsoftmax"]


def test_the_attention_logit_island_runs_from_the_softmax_to_the_projection():
    """Hand-built graphs: a Softmax's input chain stays FP32 down to the projection that makes
    the logits (module doc: "the nodes computing the Softmax input, up to and including the
    projection"): the view ops, the bias Add and the MatMul feeding it (the step's attention),
    or a Gemm (the encoder's classifier); a projection that feeds no Softmax is left to FP16."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT

    def graph(nodes, inits):
        x = helper.make_tensor_value_info("x", f32, [2, 4])
        out = helper.make_tensor_value_info("probs", f32, [2, 3])
        weights = [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in inits]
        return helper.make_graph(nodes, "g", [x], [out], weights)

    attention = graph(
        [
            helper.make_node("MatMul", ["x", "w_other"], ["other"], name="other_projection"),
            helper.make_node("MatMul", ["other", "w"], ["p"], name="score_projection"),
            helper.make_node("Add", ["p", "b"], ["scores"], name="score_bias"),
            helper.make_node("Unsqueeze", ["scores", "axes"], ["scores3"], name="unsqueeze"),
            helper.make_node("Squeeze", ["scores3", "axes"], ["scores2"], name="squeeze"),
            helper.make_node("Softmax", ["scores2"], ["probs"], name="softmax", axis=1),
        ],
        [("w_other", (4, 4)), ("w", (4, 3)), ("b", (3,))],
    )
    attention.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    assert sorted(fp32_nodes(attention)) == [
        "score_bias",
        "score_projection",
        "softmax",
        "squeeze",
        "unsqueeze",
    ]
    classifier = graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="classifier", transB=0),
            helper.make_node("Cast", ["logits"], ["logits32"], name="cast", to=f32),
            helper.make_node("Softmax", ["logits32"], ["probs"], name="softmax", axis=1),
        ],
        [("w", (4, 3)), ("b", (3,))],
    )
    assert sorted(fp32_nodes(classifier)) == ["cast", "classifier", "softmax"]


def test_name_nodes_names_every_unnamed_node_apart_from_the_named_ones():
    """The converters' block lists name nodes: every unnamed node gets a name, none taken twice,
    also where the name it would get (op type and position) is already a named node's."""
    from onnx import TensorProto, helper

    from edgecap.build.convert import name_nodes

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
        helper.make_node("Relu", ["b"], ["c"], name="Relu_2"),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, [1])], [vi("z", TensorProto.FLOAT, [1])]
    )
    name_nodes(graph)
    names = [n.name for n in graph.node]
    assert names[1:3] == ["Relu_0", "Relu_2"]  # named ones keep their names
    assert all(names) and len(set(names)) == len(names), names


@pytest.mark.parametrize("existing", [False, True])
def test_a_conversion_that_fails_half_way_leaves_no_half_written_out_dir(
    small_model, tmp_path, monkeypatch, capsys, existing
):
    """A conversion that stops after writing some of OUT_DIR (here the disk fills up while the
    second graph is saved; a graph refused by the I/O check or Ctrl-C stop it the same way)
    says so in one line, exit 2, and leaves OUT_DIR as it was: not made, or empty again. A
    half-written one (the encoder alone, no manifest) made the corrected command fail with
    'directory exists and is not empty' (as the calibration test above says), and with --force
    over an earlier model mixed its files with the new ones."""

    import onnx as onnx_module

    from edgecap.cli import main

    out = tmp_path / "fp16"
    if existing:
        out.mkdir()  # made empty beforehand: kept, and empty again
    real_save = onnx_module.save
    saved: list[str] = []

    def full_disk(model, path, *args, **kwargs):
        if saved:  # the second graph: part of it written, then no space left
            Path(path).write_bytes(b"\x08\x07")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(str(path))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx_module, "save", full_disk)
    code = main(["convert", str(small_model), "--out", str(out), "--no-check"])
    assert code == 2 and len(saved) == 1 and Path(saved[0]).parent.parent == out  # (a hidden folder)
    assert capsys.readouterr().err.endswith(": No space left on device\n")
    assert out.exists() == existing and (not existing or not any(out.iterdir()))
    monkeypatch.setattr(onnx_module, "save", real_save)
    assert main(["convert", str(small_model), "--out", str(out), "--no-check"]) == 0  # no --force needed
    assert load_manifest(out).precision == "fp16"


def test_the_torch_backend_refuses_an_int8_model_saying_so(int8_dir):
    """An int8 directory's quantised graphs have no PyTorch modules to load into (the torch
    backend rebuilds its modules from FP32 or FP16 weights; docs/backends.md: int8 runs on
    onnxruntime): ``--backend torch`` says that it is an int8 model and what to run instead.
    Before the fix it said that 'the ONNX initializers do not match the PyTorch
    EfficientNetLite (missing [...])' and that the model needs `edgecap export`, as if it were
    broken."""
    pytest.importorskip("torch")  # without it the torch backend says to install torch
    from edgecap import Captioner

    with pytest.raises(ModelError) as caught:
        Captioner(int8_dir, backend="torch")
    assert str(caught.value) == (
        f"{int8_dir}: an int8 model directory (edgecap convert), which the torch backend cannot "
        "run: its modules are rebuilt from FP32 or FP16 weights; use --backend onnxruntime, or the "
        "FP32 model it was converted from"
    )


def test_a_converted_model_whose_check_fails_is_not_left_as_a_model(fp32_dir, tmp_path, capsys, monkeypatch):
    """The check after writing (the converted graphs against the original on onnxruntime)
    that cannot run them (a model whose manifest says another precision than its graphs': it
    writes graphs onnxruntime refuses) is one line, exit 2, no traceback, and OUT_DIR no
    longer holds a manifest.json: a later command refuses it as no model rather than failing
    on it as a broken one. The check's failure is stood in for."""
    from edgecap import build
    from edgecap.cli import main
    from edgecap.errors import ModelError

    def refused(before, after):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Type 'tensor(float16)'\nof input")

    monkeypatch.setattr(build.convert, "compare_stages", refused)
    out = tmp_path / "o"
    assert main(["convert", str(fp32_dir), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err
    assert printed.err.startswith("edgecap convert: error: the converted model does not run on onnxruntime (")
    assert "INVALID_GRAPH" in printed.err and f"its manifest.json was removed from {out}" in printed.err
    assert not (out / "manifest.json").exists()
    with pytest.raises(ModelError, match="not an edgecap model directory"):
        load_manifest(out)


def test_compare_stages_reads_a_model_folder_named_in_another_encoding(small_model, tmp_path):
    """A folder name that is not UTF-8: the check after a conversion had failed with
    onnxruntime's TypeError ("the converted model does not run on onnxruntime") and removed
    the converted model's manifest."""
    import os

    named = os.path.join(os.fsencode(tmp_path), b"mod\xe9l")
    try:
        os.mkdir(named)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    copy = Path(shutil.copytree(small_model, Path(os.fsdecode(named)) / "m"))
    reference = load_manifest(small_model)
    assert set(compare_stages(reference, load_manifest(copy)).values()) <= {0.0, 1.0}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_source_whose_manifest_is_not_its_graphs_is_refused(small_model, tmp_path, precision):
    """dims.top_k edited to 4 where the step graph returns 5: no backend loads that model, and
    its conversion had succeeded all the same (one that no backend loads either), nothing written."""
    from helpers import edit_manifest, set_field

    edit_manifest(small_model, set_field(["dims", "top_k"], 4))
    with pytest.raises(ModelError, match=r"decoder_step.onnx: tensor 'topk_logprobs' has shape \[.*, 5\]"):
        convert_model_dir(small_model, tmp_path / "out", precision)
    assert not (tmp_path / "out").exists()


def _linked_copy(model: Path, copy: Path, link: str) -> Path:
    """``cp -rs`` (symbolic) or ``cp -al`` (hard) of a model directory: a cheap working copy."""
    import os

    copy.mkdir()
    for path in model.iterdir():
        if link == "symbolic":
            (copy / path.name).symlink_to(path)
        else:
            os.link(path, copy / path.name)
    return copy


@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_force_into_a_linked_copy_of_the_source_is_refused_and_the_source_left_whole(
    small_model, tmp_path, capsys, link, precision
):
    """``cp -rs MODEL COPY`` (or ``cp -al``), then ``edgecap convert MODEL --out COPY --force``:
    COPY's files are the source's. Refused in one line naming both, exit 2, before anything is
    written. Before the fix the FP16 graphs were written through the links into the source,
    which still said fp32, loaded and captioned with the FP16 graphs, and failed its checksum in
    every later conversion; the command then stopped on shutil's SameFileError."""
    from edgecap.cli import main

    before = {p.name: p.read_bytes() for p in small_model.iterdir()}
    copy = _linked_copy(small_model, tmp_path / "copy", link)
    code = main(["convert", str(small_model), "--precision", precision, "--out", str(copy), "--force"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"edgecap convert: error: {copy / 'encoder.onnx'}: the same file as "
        f"{small_model / 'encoder.onnx'} (a link into the model directory): converting into it "
        "would change the model itself; choose another --out, or remove the links from it\n"
    )
    assert {p.name: p.read_bytes() for p in small_model.iterdir()} == before
    verify_files(load_manifest(small_model))


@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_force_over_links_to_another_model_replaces_the_links_not_what_they_point_at(
    small_model, tmp_path, link, precision
):
    """OUT_DIR holding links to another model's files (``cp -rs OTHER OUT``, then converting a
    model into OUT with --force): each file is written under a new name and renamed over the
    link, so OUT ends up with the converted model's own files and the other model is left
    whole. Before the fix every graph, the vocabulary and the classes were written through the
    links into the other model."""
    other = Path(shutil.copytree(small_model, tmp_path / "other"))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    out = _linked_copy(other, tmp_path / "out", link)
    convert_model_dir(small_model, out, precision, force=True)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    verify_files(load_manifest(other))
    converted = load_manifest(out)
    verify_files(converted)
    assert converted.precision == precision
    for name in converted.files.values():
        assert not (out / name).is_symlink() and (out / name).stat().st_nlink == 1, name


@pytest.mark.parametrize("precision, calibrated", [("fp16", False), ("int8", False), ("int8", True)])
def test_a_model_whose_manifest_names_files_in_a_subfolder_converts_to_the_same_layout(
    small_model, tmp_path, precision, calibrated
):
    """load_manifest takes a file named by a relative path inside the folder (``graphs/encoder.onnx``),
    and such a model captions; converting it failed with 'OUT/graphs/encoder.onnx: No such file
    or directory' (int8: 'OUT/graphs/decoder_step.onnx.named.onnx'), a file the user never made.
    Now OUT_DIR gets the same subfolders and the converted model loads and matches its checksums."""
    from helpers import edit_manifest

    (small_model / "graphs").mkdir()
    for name in ("encoder.onnx", "decoder_step.onnx", "vocab.json"):
        (small_model / name).rename(small_model / "graphs" / name)

    def into_graphs(data):
        for role in ("encoder", "decoder_step", "vocab"):
            data["files"][role] = "graphs/" + data["files"][role]

    edit_manifest(small_model, into_graphs)
    verify_files(load_manifest(small_model))
    calibration = None
    if calibrated:
        calibration = tmp_path / "calib"
        calibration.mkdir()
        _solid_png(calibration / "grey.png", (120, 120, 120))
    out = tmp_path / "out"
    convert_model_dir(small_model, out, precision, calibration=calibration)
    converted = load_manifest(out)
    verify_files(converted)
    assert converted.precision == precision
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "classes.json",
        "graphs",
        "graphs/decoder_step.onnx",
        "graphs/encoder.onnx",
        "graphs/vocab.json",
        "manifest.json",
    ]


@pytest.mark.parametrize("calibrated", [False, True])
def test_int8_into_a_folder_named_in_another_encoding(small_model, tmp_path, capsys, calibrated):
    """An OUT_DIR whose name is not UTF-8 (``caf\\xe9_8``, a folder named on a Latin-1 system), as
    fp16 and caption take it: the int8 conversion had stopped with a traceback, exit 1
    (onnx's infer_shapes_path, called by onnxruntime's quantizer on the step saved in OUT_DIR,
    refuses such a name: a TypeError). Now the model is written, checked, and loads."""
    import os

    from edgecap.cli import main

    named = os.path.join(os.fsencode(tmp_path), b"caf\xe9_8")
    try:
        os.mkdir(named)
        os.rmdir(named)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    out = Path(os.fsdecode(named))
    argv = ["convert", str(small_model), "--precision", "int8", "--out", str(out)]
    if calibrated:
        (tmp_path / "calib").mkdir()
        argv += ["--calibration", str(_solid_png(tmp_path / "calib" / "grey.png", (120, 120, 120)).parent)]
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith(f"wrote int8 model to {tmp_path}/caf\\xe9_8\n")  # escaped
    assert "best word agrees" in printed.out
    converted = load_manifest(out)
    verify_files(converted)
    assert converted.precision == "int8"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in small_model.iterdir())


def test_a_manifest_without_a_start_token_converts_and_is_checked_as_caption_takes_it(
    small_model, tmp_path, capsys
):
    """A manifest whose "tokens" leave out "start" captions (the vocabulary's id is taken). Its
    conversion wrote the model, then its check stopped on KeyError: 'start' ("the converted
    model does not run on onnxruntime"), exit 2, and removed the manifest of a model that ran.
    Now the check takes the start id as caption does: exit 0, and the converted model captions."""
    from helpers import edit_manifest, set_field

    from edgecap import Captioner
    from edgecap.cli import main

    edit_manifest(small_model, set_field(["tokens"], {}))
    photo = "edgecap/assets/examples/chelsea.png"
    expected = Captioner(small_model, backend="onnxruntime").caption(photo).text
    out = tmp_path / "out"
    code = main(["convert", str(small_model), "--precision", "int8", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "best word agrees" in printed.out
    assert Captioner(out, backend="onnxruntime").caption(photo).text == expected


def _one_class_short(model: Path) -> None:
    """classes.json a class short of dims.n_classes, its checksum dropped from the manifest."""
    import json

    from helpers import edit_manifest

    data = json.loads((model / "classes.json").read_text())
    data["classes"] = data["classes"][:-1]
    (model / "classes.json").write_text(json.dumps(data))
    edit_manifest(model, lambda data: data["sha256"].pop("classes"))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("damage", ["start token", "class list"])
def test_a_model_that_caption_refuses_is_refused_by_convert_with_its_words_before_any_work(
    small_model, tmp_path, precision, damage
):
    """tokens.start set to the end token's id (or a classes.json a class short, without its
    checksum): caption refuses the model ("special token ids ... differ from the manifest's
    ...", "... classes ..."). convert had converted it all the same, checked it and written a
    model that nothing loads (exit 0). Now it is refused with caption's own message before
    anything is written."""
    from helpers import edit_manifest, set_field

    from edgecap import Captioner

    if damage == "start token":
        edit_manifest(small_model, set_field(["tokens", "start"], 2))
    else:
        _one_class_short(small_model)
    with pytest.raises(ModelError) as caption_said:
        Captioner(small_model, backend="onnxruntime")
    assert ("special token ids" if damage == "start token" else "classes.json") in str(caption_said.value)
    with pytest.raises(ModelError) as convert_said:
        convert_model_dir(small_model, tmp_path / "out", precision)
    assert str(convert_said.value) == str(caption_said.value)
    assert not (tmp_path / "out").exists()


def test_the_torch_backend_runs_an_fp16_directory_in_fp32_with_its_stored_weights(fp16_dir):
    """docs/backends.md and docs/precision.md: on the CPU the torch backend loads an FP16 model
    directory's weights as the graphs hold them (most rounded to FP16, the FP32 islands' kept)
    into FP32 modules and computes in FP32, so its captions there are FP32's, not onnxruntime's
    FP16 ones. (The encoder as loaded: ``fold_batch_norms=False``; folded, its convolutions'
    weights are scaled by its BatchNorms', ``tests/test_torch_layout.py``.)"""
    torch = pytest.importorskip("torch")
    from onnx import numpy_helper

    from edgecap import Captioner

    backend = Captioner(fp16_dir, backend="torch", fold_batch_norms=False).backend
    assert backend.dtype == backend.image_dtype == torch.float32
    loaded = {
        **{f"encoder.{k}": v for k, v in backend.encoder.state_dict().items()},
        **{f"decoder.{k}": v for k, v in backend.decoder.state_dict().items()},
    }
    manifest = load_manifest(fp16_dir)
    stored = {
        init.name: numpy_helper.to_array(init)
        for role in ("encoder", "decoder_step")
        for init in onnx.load(str(manifest.path(role))).graph.initializer
        if init.name in loaded
    }
    assert {a.dtype for a in stored.values()} == {np.dtype(np.float16), np.dtype(np.float32)}
    for name, array in stored.items():
        assert loaded[name].dtype == torch.float32, name
        np.testing.assert_array_equal(loaded[name].numpy(), array.astype(np.float32), err_msg=name)
