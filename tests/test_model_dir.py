"""Model directories (``edgecap.manifest``, the vocabulary and classes checks in ``edgecap.api``,
the graph checks of the backends): a missing, truncated, swapped or inconsistent file is a
``ModelError`` that says what to do, never a traceback.

Uses the ``tiny_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest

from edgecap import Captioner, ModelError
from helpers import copy_model, edit_manifest, set_field


@pytest.mark.parametrize(
    "edit, words",
    [
        (set_field(["format"], "edgecap-model/9"), "unknown manifest format 'edgecap-model/9'.*Upgrade"),
        (set_field(["format"], "edgecap-model/1"), "unknown manifest format 'edgecap-model/1'.*re-export"),
        (set_field(["format"], None), "unknown manifest format None"),
        (lambda d: d["dims"].pop("top_k"), "dims.top_k must be a positive integer.*re-export"),
        (set_field(["dims", "regions"], "49"), "dims.regions must be a positive integer"),
        (set_field(["dims", "top_k"], True), "dims.top_k must be a positive integer"),
        (lambda d: d["dims"].pop("n_classes"), "dims.n_classes must be a positive integer"),
        (set_field(["preprocessing", "size"], [224]), r"preprocessing.size must be \[height, width\]"),
        (set_field(["preprocessing", "std"], [0, 1, 1]), "std > 0"),
        (set_field(["preprocessing", "resample"], "smooth"), "resample must name a Pillow filter"),
        (lambda d: d.pop("tokens"), "incomplete manifest.*re-export"),
        (set_field(["files", "encoder"], "../encoder.onnx"), "not a file name inside the model directory"),
        (set_field(["files", "encoder"], "/etc/hostname"), "not a file name inside the model directory"),
    ],
)
def test_bad_manifest_says_what_to_do(tiny_model_dir, tmp_path, edit, words):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    edit_manifest(model, edit)
    with pytest.raises(ModelError, match=words):
        Captioner(model, backend="onnxruntime")


def test_missing_model_file(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "decoder_step.onnx").unlink()
    with pytest.raises(ModelError, match="decoder_step.onnx: missing.*copy the whole directory"):
        Captioner(model)


def test_model_file_that_is_a_directory(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "encoder.onnx").unlink()
    (model / "encoder.onnx").mkdir()
    with pytest.raises(ModelError, match="encoder.onnx.*re-copy the model directory"):
        Captioner(model, backend="onnxruntime")


def test_unreadable_manifest(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "manifest.json").unlink()
    (model / "manifest.json").mkdir()
    with pytest.raises(ModelError, match="manifest.json: cannot read it"):
        Captioner(model)


def test_vocabulary_of_the_right_size_from_another_model(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    shuffled = words[:4] + words[4:][::-1]
    (model / "vocab.json").write_text(json.dumps({"words": shuffled}))
    with pytest.raises(ModelError, match="vocab.json: checksum mismatch.*re-export"):
        Captioner(model)


@pytest.mark.parametrize("text", ["{not json", '{"words": 3}', '["<pad>"]', ""])
def test_unreadable_vocabulary(tiny_model_dir, tmp_path, text):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "vocab.json").write_text(text)
    with pytest.raises(ModelError, match="vocab.json: unreadable vocabulary.*re-export"):
        Captioner(model)


def test_truncated_model_with_the_torch_backend(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    model = copy_model(tiny_model_dir, tmp_path / "m")
    encoder = model / "encoder.onnx"
    encoder.write_bytes(encoder.read_bytes()[:5000])
    with pytest.raises(ModelError, match="encoder.onnx: checksum mismatch.*re-copy"):
        Captioner(model, backend="torch")


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Captioner(tmp_path / "nowhere")


def test_truncated_onnx(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    step = model / "decoder_step.onnx"
    step.write_bytes(step.read_bytes()[:1000])
    with pytest.raises(ModelError, match="decoder_step.onnx"):
        Captioner(model, backend="onnxruntime")


def test_corrupt_onnx_without_checksums(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["sha256"] = {}
    (model / "manifest.json").write_text(json.dumps(manifest))
    (model / "encoder.onnx").write_bytes(b"\x08garbage" * 100)
    with pytest.raises(ModelError, match="encoder.onnx.*re-export"):
        Captioner(model, backend="onnxruntime")


def test_vocab_mismatch(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    (model / "vocab.json").write_text(json.dumps({"words": words[:-1]}))
    with pytest.raises(ModelError, match="vocab.json"):
        Captioner(model)


def test_dims_mismatch(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["dims"]["hidden_dim"] += 1
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="'h"):
        Captioner(model, backend="onnxruntime")
