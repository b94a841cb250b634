"""Model directories (``edgecap.manifest``, the vocabulary and classes checks in ``edgecap.api``,
the graph checks of the backends): a missing, truncated, swapped or inconsistent file is a
``ModelError`` that says what to do, never a traceback.

Uses the ``tiny_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecap import Captioner, ModelError
from edgecap.manifest import load_manifest, name_optional_file, verify_files
from edgecap.preprocess import Preprocessing
from helpers import contract_model_dir, copy_model, edit_manifest, set_field


@pytest.mark.parametrize(
    "edit, words",
    [
        (set_field(["format"], "edgecap-model/9"), "unknown manifest format 'edgecap-model/9'.*Upgrade"),
        (
            set_field(["format"], "edgecap-model/1"),
            r"unknown manifest format 'edgecap-model/1' \(an older edgecap's.*export/upgrade_model\.py",
        ),
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


def test_an_install_without_the_default_model_says_to_pass_one(tmp_path, monkeypatch):
    """edgecap/assets/default without its manifest (an install that left the model out):
    Captioner() says so and how to go on, not a missing-manifest error about a package folder."""
    from edgecap import api

    (tmp_path / "assets" / "default").mkdir(parents=True)

    class Files:
        @staticmethod
        def files(package):
            return tmp_path

    monkeypatch.setattr(api, "resources", Files)
    with pytest.raises(
        ModelError, match=r"^this edgecap install has no default model .*pass model=DIRECTORY"
    ):
        Captioner()


def test_missing_model_file(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "decoder_step.onnx").unlink()
    with pytest.raises(ModelError, match="decoder_step.onnx: missing.*copy the whole directory"):
        Captioner(model)


def test_a_copy_of_the_manifests_core_files_only_is_refused_naming_what_it_left_behind(
    default_model_dir, tmp_path, capsys
):
    """docs/model.md: a model is moved by copying its whole folder. A copy of the files the
    manifest named (manifest.json, encoder.onnx, decoder_step.onnx, vocab.json, classes.json)
    left the shipped model's fusion.json (with the lm_*.npz files it names) and confidence.json
    behind and captioned coffee.png otherwise without a word ("... with a stick", README: "...
    with a cup") and with no confidence. Its manifest names both: such a copy is refused,
    naming the folder and the file it lacks (exit 2 on the command line, one line). A manifest
    that names neither (an older edgecap's, a model made without them) loads as before."""
    import shutil

    from edgecap.cli import main

    model = tmp_path / "copy"
    model.mkdir()
    for name in ("manifest.json", "encoder.onnx", "decoder_step.onnx", "vocab.json", "classes.json"):
        shutil.copy2(default_model_dir / name, model / name)
    with pytest.raises(ModelError) as raised:
        Captioner(model)
    assert str(raised.value) == (
        f"{model}: fusion.json is missing: the language models its captions are fused with (and "
        "the lm_*.npz files it names), which its manifest.json names; copy the whole model "
        'directory, not only some of its files (to use the model without it, take "fusion" out of '
        "the files manifest.json names)"
    )
    photo = "edgecap/assets/examples/coffee.png"
    assert main(["caption", "--model", str(model), photo]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == f"edgecap caption: error: {raised.value}\n"
    for name in ("fusion.json", "lm_everyday.npz", "lm_in_domain.npz"):
        shutil.copy2(default_model_dir / name, model / name)
    with pytest.raises(ModelError, match=r"confidence.json is missing: the confidence model .*the whole"):
        Captioner(model)
    (model / "confidence.json").mkdir()  # not a file: refused too
    with pytest.raises(ModelError, match=r"confidence.json: the confidence file is a directory, not a"):
        Captioner(model)
    (model / "confidence.json").rmdir()
    (model / "confidence.json").symlink_to(tmp_path / "gone.json")  # a link to nothing: missing
    with pytest.raises(
        ModelError, match=r"confidence.json is missing: the confidence model .*take \"confidence\" out"
    ):
        Captioner(model)
    (model / "confidence.json").unlink()
    shutil.copy2(default_model_dir / "confidence.json", model / "confidence.json")
    whole = Captioner(model).caption(photo)
    assert whole.text == "a small child is sitting on a wooden floor with a cup"  # README
    assert whole.confidence is not None

    def older(data):  # a manifest naming none of them: what is there is used, as before
        del data["files"]["fusion"], data["files"]["confidence"]

    edit_manifest(model, older)
    assert Captioner(model).caption(photo).text == whole.text
    for name in ("fusion.json", "lm_everyday.npz", "lm_in_domain.npz", "confidence.json"):
        (model / name).unlink()
    alone = Captioner(model).caption(photo)
    assert (alone.text, alone.confidence) == ("a small child is sitting on a wooden floor with a stick", None)


@pytest.mark.parametrize("left_behind", ["lm_everyday.npz", "lm_in_domain.npz"])
def test_a_copy_without_one_of_its_language_models_is_refused_saying_to_copy_the_whole_folder(
    left_behind, default_model_dir, tmp_path, capsys
):
    """A copy of the shipped model that left one of the lm_*.npz files its fusion.json names
    behind (or has a link to nothing there): refused as a copy without fusion.json is, in one
    line naming the folder and the file, with what to do, exit 2 on the command line (was:
    ``MODEL/lm_in_domain.npz: no such file``, with no word of a partial copy)."""
    from edgecap.cli import main

    model = copy_model(default_model_dir, tmp_path / "copy")
    (model / left_behind).unlink()
    what = {"lm_everyday.npz": "everyday", "lm_in_domain.npz": "in-domain"}[left_behind]
    expected = (
        f"{model}: {left_behind} is missing: the {what} language model, which its fusion.json "
        "names; copy the whole model directory, not only some of its files (to use the model "
        'without its language models, remove fusion.json and take "fusion" out of the files '
        "manifest.json names)"
    )
    with pytest.raises(ModelError) as raised:
        Captioner(model)
    assert str(raised.value) == expected
    photo = "edgecap/assets/examples/coffee.png"
    assert main(["caption", "--model", str(model), photo]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == f"edgecap caption: error: {expected}\n"
    (model / left_behind).symlink_to(tmp_path / "gone.npz")  # a link to nothing: missing too
    with pytest.raises(ModelError) as raised:
        Captioner(model)
    assert str(raised.value) == expected


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


def test_a_folder_that_cannot_be_looked_into_is_not_called_a_folder_without_a_model(small_model, monkeypatch):
    """A model folder without read or search permission (chmod 700 by another user): its
    manifest cannot be seen, not missing; it had been "not an edgecap model directory (no
    manifest.json); create one with `edgecap export`". (os.lstat refuses as the kernel does,
    so that it shows as root too.)"""
    import errno
    import os

    manifest, lstat = small_model / "manifest.json", os.lstat

    def refused(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(manifest):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", refused)
    with pytest.raises(ModelError, match=r"small: cannot look into the folder \(Permission denied\)"):
        load_manifest(small_model)


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


def test_the_torch_backend_checks_the_graphs_against_the_manifest(tiny_model_dir, tmp_path):
    """The torch modules take any image size: a manifest whose preprocessing size is not the
    graphs' had captioned at that size (a wrong caption, or a process killed for memory at a
    huge one); it is refused as onnxruntime refuses it."""
    pytest.importorskip("torch")
    model = copy_model(tiny_model_dir, tmp_path / "m")
    height, width = load_manifest(model).preprocessing.size
    edit_manifest(model, set_field(["preprocessing", "size"], [height + 32, width + 32]))
    with pytest.raises(ModelError, match=r"encoder.onnx: tensor 'image' has shape .* but the manifest says"):
        Captioner(model, backend="torch")


@pytest.mark.parametrize("encoder", ["efficientnet-lite9", ["efficientnet-lite0"], {}])
def test_an_encoder_the_torch_backend_does_not_know_is_named(tiny_model_dir, tmp_path, encoder):
    """The manifest's "encoder" names the CNN the torch backend rebuilds; a list or an object
    there had been a TypeError's traceback (unhashable type)."""
    pytest.importorskip("torch")
    model = copy_model(tiny_model_dir, tmp_path / "m")
    edit_manifest(model, set_field(["encoder"], encoder))
    with pytest.raises(ModelError, match=r"manifest.json: unknown encoder .*upgrade edgecap"):
        Captioner(model, backend="torch")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("decoder_config"), "manifest.json has no decoder_config.*`edgecap export`"),
        (set_field(["decoder_config", "depth"], 2), "decoder_config does not fit this edgecap.*'depth'"),
        (
            set_field(["decoder_config", "hidden_dim"], -1),
            "decoder_config: hidden_dim must be at least 1, got -1",
        ),
        (
            set_field(["decoder_config", "attention_dim"], 0),
            "decoder_config: attention_dim must be at least 1",
        ),
        (set_field(["decoder_config", "embed_dim"], "256"), "decoder_config: embed_dim must be an integer"),
        (set_field(["decoder_config", "top_k"], 1), "decoder_config: top_k must be 2 or more, got 1"),
    ],
)
def test_decoder_sizes_the_torch_backend_cannot_build_are_named(tiny_model_dir, tmp_path, edit, words):
    """The torch backend rebuilds the decoder from the manifest's decoder_config: one missing, a
    setting this edgecap does not know, or a size out of range (a hand-edited manifest) is a
    ModelError naming the manifest's field, before any module is made (a negative size had
    been torch's RuntimeError traceback from inside ``nn.Linear``)."""
    pytest.importorskip("torch")
    model = copy_model(tiny_model_dir, tmp_path / "m")
    edit_manifest(model, edit)
    with pytest.raises(ModelError, match=words):
        Captioner(model, backend="torch")


def test_a_model_dir_that_cannot_be_reached_is_one_error(tmp_path):
    """A name too long for the file system (as a folder above it that this user may not search,
    EACCES): is_dir() raises for those, and the command had ended in an OSError's traceback."""
    with pytest.raises(ModelError, match=r"cannot reach the model directory \(File name too long\)"):
        Captioner(tmp_path / ("x" * 5000))


def test_a_model_file_that_cannot_be_reached_is_one_error(small_model):
    """A file name too long (as a subfolder this user may not search, EACCES): exists() raises
    for those, and the command had ended in an OSError's traceback."""
    edit_manifest(small_model, set_field(["files", "encoder"], "x" * 300 + ".onnx"))
    with pytest.raises(ModelError, match=r"x\.onnx: cannot reach the encoder file \(File name too long\)"):
        load_manifest(small_model)


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


def test_a_graph_that_does_not_load_says_the_runtimes_reason(small_model):
    """No checksums to blame: the message names the file, carries onnxruntime's own words (in
    parentheses: a newer opset, a truncated protobuf ...) and says what to do."""
    edit_manifest(small_model, set_field(["sha256"], {}))
    (small_model / "encoder.onnx").write_bytes(b"\x08garbage" * 100)
    with pytest.raises(ModelError) as caught:
        Captioner(small_model, backend="onnxruntime")
    message = str(caught.value)
    assert message.startswith(str(small_model / "encoder.onnx") + ": cannot load the graph (")
    reason = message.split("cannot load the graph (", 1)[1].split("); the file may be corrupt", 1)[0]
    assert len(reason) > 10 and "re-copy the model directory or re-export it" in message


def test_a_graph_of_a_newer_opset_is_one_line_saying_so(small_model):
    """onnxruntime's reason for a graph stamped with an opset newer than it supports ends in a
    newline ("... Current official support for domain ai.onnx.ml is till opset 5.\n", with
    onnxruntime 1.32; met with an int8 model converted by onnxruntime 1.32 and loaded by
    1.16.3): the ModelError, which edgecap caption prints, is one line all the same."""
    import onnx

    edit_manifest(small_model, set_field(["sha256"], {}))
    path = small_model / "encoder.onnx"
    model = onnx.load(str(path))
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 99))
    onnx.save(model, str(path))
    with pytest.raises(ModelError) as caught:
        Captioner(small_model, backend="onnxruntime")
    message = str(caught.value)
    assert message.startswith(str(path) + ": cannot load the graph (") and "Opset 99" in message
    assert "\n" not in message and "till opset" in message and message.endswith("or re-export it")


def test_vocab_mismatch(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    (model / "vocab.json").write_text(json.dumps({"words": words[:-1]}))
    with pytest.raises(ModelError, match="vocab.json"):
        Captioner(model)


def test_a_vocabulary_of_another_size_says_both_sizes(tiny_model_dir, tmp_path):
    """Checked before the checksum: the message says what differs."""
    model = copy_model(tiny_model_dir, tmp_path / "m")
    n = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    words = json.loads((model / "vocab.json").read_text())["words"]
    (model / "vocab.json").write_text(json.dumps({"words": words[:-1]}))
    with pytest.raises(ModelError, match=rf"vocab.json: {n - 1} words, but the manifest's decoder has {n};"):
        Captioner(model)


def test_special_token_ids_that_differ_from_the_manifests(tiny_model_dir, tmp_path):
    """The vocabulary's <end> is not the id the manifest (and the exported decoder) says."""
    model = copy_model(tiny_model_dir, tmp_path / "m")
    tokens = json.loads((model / "manifest.json").read_text())["tokens"]
    edit_manifest(model, set_field(["tokens", "end"], tokens["end"] + 1))
    with pytest.raises(
        ModelError, match="vocab.json: special token ids .* differ from the manifest's .*re-export"
    ):
        Captioner(model)


def test_dims_mismatch(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["dims"]["hidden_dim"] += 1
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="'h"):
        Captioner(model, backend="onnxruntime")


# -- the manifest alone, on a contract-shaped model built with onnx helpers (quick) ----------


@pytest.fixture
def small_model(tmp_path):
    pytest.importorskip("onnx")
    return contract_model_dir(tmp_path / "small")


def test_the_manifest_gives_the_recorded_preprocessing_dims_and_tokens(small_model):
    """What ``helpers.contract_model_dir`` writes: 16 x 16 images, 4 regions, 20 words, K = 5."""
    manifest = load_manifest(small_model)
    assert manifest.preprocessing == Preprocessing(size=(16, 16), mean=(127.5,) * 3, std=(127.5,) * 3)
    assert (manifest.dims.regions, manifest.dims.vocab_size, manifest.dims.top_k) == (4, 20, 5)
    assert manifest.tokens == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    assert manifest.precision == "fp32"


def test_a_saved_manifest_reads_back_as_written(small_model):
    """What a conversion does: the same directory's manifest with another precision and other
    checksums, saved and read again."""
    from dataclasses import replace

    manifest = load_manifest(small_model)
    sha = {role: "0" * 64 for role in manifest.sha256}
    pre = Preprocessing(size=(32, 24), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), resample="bicubic")
    replace(manifest, precision="int8", sha256=sha, preprocessing=pre, info={"note": 1}).save()
    again = load_manifest(small_model)
    assert again.precision == "int8"
    assert again.sha256 == sha
    assert again.preprocessing == pre
    assert again.dims == manifest.dims and again.tokens == manifest.tokens
    assert again.info == {"note": 1}


@pytest.mark.parametrize(
    "edit, words",
    [
        (set_field(["preprocessing", "size"], [0, 16]), r"preprocessing.size must be \[height, width\]"),
        (set_field(["preprocessing", "size"], [16, -16]), r"preprocessing.size must be \[height, width\]"),
        (set_field(["preprocessing", "mean"], [127.5, 127.5]), "mean and .std must be 3 numbers"),
        (set_field(["preprocessing", "std"], [1, 1, 1, 1]), "mean and .std must be 3 numbers"),
        (set_field(["preprocessing", "mean"], [1, "2", 3]), "mean and .std must be 3 numbers"),
        # JSON's true is 1 to Python; its json reads NaN and Infinity (a NaN image: no caption)
        (set_field(["preprocessing", "size"], [True, True]), r"preprocessing.size must be \[height, width\]"),
        (set_field(["preprocessing", "mean"], [True, 1, 1]), "mean and .std must be 3 numbers"),
        (set_field(["preprocessing", "mean"], [float("nan")] * 3), r"mean and .std must be 3 numbers.*\[nan"),
        (set_field(["preprocessing", "std"], [float("inf")] * 3), r"mean and .std must be 3 numbers.*\[inf"),
        (set_field(["dims", "hidden_dim"], 0), "dims.hidden_dim must be a positive integer"),
        (set_field(["files", "vocab"], "sub/../../vocab.json"), "not a file name inside the model directory"),
        (set_field(["files", "vocab"], "/etc/hostname"), "not a file name inside the model directory"),
        (lambda d: d["files"].pop("classes"), "names no classes file"),
        (set_field(["precision"], "int4"), "precision must be one of fp32, fp16, int8, got 'int4'"),
        (set_field(["precision"], "FP16"), "precision must be one of fp32, fp16, int8, got 'FP16'"),
        (set_field(["precision"], None), "precision must be one of fp32, fp16, int8, got None"),
        (set_field(["preprocessing", "std"], [1, 0, 1]), r"std > 0\), got .* and \[1, 0, 1\]"),
        (set_field(["preprocessing", "std"], [1, 1, -0.5]), r"std > 0\), got .* and \[1, 1, -0.5\]"),
        (
            set_field(["preprocessing", "resample"], 2),
            "resample must name a Pillow filter such as 'bilinear', got 2",
        ),
        (set_field(["preprocessing", "resample"], None), "resample must name a Pillow filter"),
    ],
)
def test_a_bad_manifest_field_is_refused_on_reading(small_model, edit, words):
    edit_manifest(small_model, edit)
    with pytest.raises(ModelError, match=words):
        load_manifest(small_model)


@pytest.mark.parametrize("data", [["not", "a", "manifest"], {"files": ["vocab.json"]}, {"format": 1}])
def test_naming_a_file_in_a_manifest_that_names_none_is_one_error(tmp_path, data):
    """``name_optional_file`` (the confidence fit or the language model's training writing
    into a model folder) on a manifest.json that is no manifest: a ModelError naming it, not a
    traceback, and the file left as it was."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"manifest.json: cannot name .* in it \(it names no files\)"):
        name_optional_file(tmp_path, "confidence")
    assert json.loads(path.read_text()) == data


def test_the_least_preprocessing_values_a_manifest_may_give_are_read(small_model):
    """The edges of what ``_field_problem`` accepts: a size of 1 x 1 pixels and a std just over
    0 (a model normalising to large values) are the model's to choose, not damage."""
    edit_manifest(small_model, set_field(["preprocessing", "size"], [1, 1]))
    edit_manifest(small_model, set_field(["preprocessing", "std"], [0.5, 1e-3, 1]))
    pre = load_manifest(small_model).preprocessing
    assert (pre.size, pre.std) == ((1, 1), (0.5, 1e-3, 1))


@pytest.mark.parametrize("role", ["encoder", "decoder_step", "vocab", "classes"])
def test_a_missing_file_is_named_on_reading(small_model, role):
    name = load_manifest(small_model).files[role]
    (small_model / name).unlink()
    with pytest.raises(ModelError, match=f"{name}: missing from the model directory"):
        load_manifest(small_model)


@pytest.mark.parametrize("role", ["encoder", "decoder_step", "vocab", "classes"])
def test_a_changed_file_fails_its_checksum(small_model, role):
    manifest = load_manifest(small_model)
    verify_files(manifest)
    with manifest.path(role).open("ab") as f:
        f.write(b" ")
    with pytest.raises(ModelError, match=f"{manifest.files[role]}: checksum mismatch"):
        verify_files(manifest)


def test_a_files_checksum_covers_all_of_it(tmp_path):
    """A model file is hashed to its last byte (it is read in 1 MiB pieces): a change 2.5 MiB in
    is a different SHA-256, the one hashlib gives for the whole file."""
    import hashlib

    from edgecap.manifest import file_sha256

    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    path = tmp_path / "big.onnx"
    path.write_bytes(data)
    before = file_sha256(path)
    assert before == hashlib.sha256(data).hexdigest()
    data[5 << 19] ^= 1
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest() != before


def test_a_manifest_dimension_only_a_graph_output_shows_is_checked(small_model):
    """K appears in no graph input (the step returns its top K): the outputs are checked too."""
    edit_manifest(small_model, set_field(["dims", "top_k"], 4))
    with pytest.raises(ModelError, match=r"tensor 'topk_logprobs' has shape \[.*, 5\] but the manifest says"):
        Captioner(small_model, backend="onnxruntime")


def _edit_step_graph(model, edit) -> None:
    """decoder_step.onnx of ``model`` changed by ``edit(graph)``, its checksum updated (what an
    exporter other than this edgecap's would have written)."""
    import onnx

    from edgecap.manifest import file_sha256

    path = load_manifest(model).path("decoder_step")
    graph_model = onnx.load(path)
    edit(graph_model.graph)
    onnx.save(graph_model, path)
    edit_manifest(model, set_field(["sha256", "decoder_step"], file_sha256(path)))


def _value(values, name):
    return next(v for v in values if v.name == name)


def test_a_step_graph_lacking_a_contract_output_is_named(small_model):
    """No 'alpha' among the step graph's outputs: one ModelError naming it (not a KeyError)."""
    _edit_step_graph(small_model, lambda g: g.output.remove(_value(g.output, "alpha")))
    with pytest.raises(
        ModelError, match=r"decoder_step.onnx: the graph lacks the outputs \['alpha'\].*re-export"
    ):
        Captioner(small_model, backend="onnxruntime")


def test_a_symbolic_dimension_where_the_manifest_has_a_number_is_refused(small_model):
    """word_bias declared (R, V) with V symbolic: the manifest's 20 words cannot be checked
    against it (only the row dimension may be dynamic, edgecap.contract)."""

    def symbolic_v(graph):
        _value(graph.input, "word_bias").type.tensor_type.shape.dim[1].dim_param = "V"

    _edit_step_graph(small_model, symbolic_v)
    with pytest.raises(
        ModelError, match=r"tensor 'word_bias' has shape \[.*'V'\] but the manifest says \['\?', 20\]"
    ):
        Captioner(small_model, backend="onnxruntime")


def test_a_tensor_of_another_rank_is_refused(small_model):
    """word_bias declared (R, V, 1) where the contract has (R, V): the dimensions it shares with
    the manifest's agree, its rank does not. (A graph output's declared shape is not what
    onnxruntime reports: it reports the inferred one.)"""

    def extra_dim(graph):
        _value(graph.input, "word_bias").type.tensor_type.shape.dim.add().dim_value = 1

    _edit_step_graph(small_model, extra_dim)
    with pytest.raises(
        ModelError, match=r"tensor 'word_bias' has shape \[.*, 20, 1\] but the manifest says \['\?', 20\]"
    ):
        Captioner(small_model, backend="onnxruntime")


def _fix_rows(model, role: str, name: str, rows: int) -> None:
    """``model``'s ``role`` graph with its input ``name``'s first dimension fixed to ``rows``,
    as a tool that fixes the batch size leaves it, and its manifest's checksum to match."""
    import onnx

    from edgecap.manifest import file_sha256

    path = load_manifest(model).path(role)
    graph_model = onnx.load(path)
    _value(graph_model.graph.input, name).type.tensor_type.shape.dim[0].dim_value = rows
    onnx.save(graph_model, path)
    edit_manifest(model, set_field(["sha256", role], file_sha256(path)))


@pytest.mark.parametrize("role, name", [("decoder_step", "tokens"), ("encoder", "image")])
def test_a_graph_with_a_fixed_row_dimension_is_refused_on_loading(small_model, role, name):
    """A graph whose batch a tool fixed (1 image, 3 rows): it loaded, and then every batch of
    another size ended in onnxruntime's INVALID_ARGUMENT traceback, the other photos' captions
    lost with it."""
    _fix_rows(small_model, role, name, 3)
    with pytest.raises(ModelError, match=rf"{role}.onnx: input '{name}' has a fixed first dimension \(3\)"):
        Captioner(small_model, backend="onnxruntime")


def test_the_torch_backend_takes_a_graph_with_a_fixed_row_dimension(tiny_model_dir, tmp_path):
    """The torch backend runs its own modules, not the graphs (it reads their weights): the
    same batch-fixed encoder (3 images) that onnxruntime refuses captions 1 and 2 photos there,
    as the unedited model does."""
    from edgecap import CaptionOptions

    model = copy_model(tiny_model_dir, tmp_path / "fixed")
    _fix_rows(model, "encoder", "image", 3)
    with pytest.raises(ModelError, match=r"input 'image' has a fixed first dimension \(3\)"):
        Captioner(model, backend="onnxruntime")
    rng = np.random.default_rng(3)
    photos = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    options = CaptionOptions(max_length=4)
    with Captioner(model, backend="torch", options=options) as fixed:
        with Captioner(tiny_model_dir, backend="torch", options=options) as plain:
            for batch in (photos[:1], photos):
                want = [c.text for c in plain.caption_batch(batch)]
                assert [c.text for c in fixed.caption_batch(batch)] == want
