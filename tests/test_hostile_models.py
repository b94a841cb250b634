"""Hostile model folders (issue 16, class 5): unknown roles are never opened, model files must
resolve to regular files, JSON is bounded, the vocabulary is checked at load; each a ModelError
(exit 2 in the CLI).

Every hostile folder is built here, in tmp_path, from a copy of the test model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgecap
from edgecap import Captioner, ModelError
from edgecap.manifest import file_sha256, load_manifest, verify_files
from helpers import copy_model, edit_manifest

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX links and pipes")


@POSIX
def test_unknown_roles_are_ignored_never_opened(any_model_dir, tmp_path):
    model = copy_model(any_model_dir, tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "pipe")  # opening it would block for ever

    def edit(data):
        data["files"]["extra"] = str(outside / "pipe")
        data["files"]["sneaky"] = "../outside/pipe"
        data["sha256"]["extra"] = "0" * 64

    edit_manifest(model, edit)
    manifest = load_manifest(model)
    assert set(manifest.files) == {"encoder", "decoder_step", "vocab", "classes"}
    verify_files(manifest)  # hashes the known files only
    with pytest.raises(KeyError, match="unknown model file role"):
        manifest.path("extra")


@POSIX
@pytest.mark.parametrize("target", ["fifo", "device", "folder"])
def test_model_file_linked_to_a_special_file_is_refused(any_model_dir, tmp_path, target):
    model = copy_model(any_model_dir, tmp_path / "m")
    special = tmp_path / "special"
    if target == "fifo":
        os.mkfifo(special)
    elif target == "folder":
        special.mkdir()
    else:
        special = Path("/dev/zero")
        if not special.exists():
            pytest.skip("needs /dev/zero")
    (model / "vocab.json").unlink()
    (model / "vocab.json").symlink_to(special)
    words = {"fifo": "named pipe", "device": "character device", "folder": "directory"}[target]
    with pytest.raises(ModelError, match=f"vocab.json: the vocab file is a {words}"):
        load_manifest(model)


@POSIX
def test_link_to_a_regular_file_elsewhere_is_used(any_model_dir, tmp_path):
    """The documented decision: a link inside the folder may lead to a regular file anywhere
    (a model store, a download cache)."""
    model = copy_model(any_model_dir, tmp_path / "m")
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(model / "encoder.onnx", store / "encoder.onnx")
    (model / "encoder.onnx").symlink_to(store / "encoder.onnx")
    verify_files(load_manifest(model))


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("where", ["manifest", "vocab", "classes"])
def test_deeply_nested_json_is_a_model_error(any_model_dir, tmp_path, where):
    model = copy_model(any_model_dir, tmp_path / "m")
    if where == "manifest":
        text = (model / "manifest.json").read_text().rstrip()[:-1] + f', "x": {_deep(100000)}}}'
        (model / "manifest.json").write_text(text)
        with pytest.raises(ModelError, match="manifest.json: .*nested 100001 deep"):
            load_manifest(model)
        return
    name = f"{where}.json"
    key = "words" if where == "vocab" else "classes"
    (model / name).write_text(f'{{"{key}": {_deep(100000)}}}')
    with pytest.raises(ModelError, match=f"{name}: .*nested 100001 deep, over the limit of 32"):
        Captioner(model, backend="onnxruntime")


@pytest.mark.parametrize("name", ["manifest.json", "vocab.json", "classes.json"])
def test_oversized_json_is_refused_before_reading(any_model_dir, tmp_path, name):
    model = copy_model(any_model_dir, tmp_path / "m")
    with open(model / name, "r+b") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB that are never read
    with pytest.raises(ModelError, match=f"{name}: .*209,715,200 bytes, over the limit"):
        Captioner(model, backend="onnxruntime")


def _rewrite_vocab(model: Path, words: list) -> None:
    (model / "vocab.json").write_text(json.dumps({"words": words}))

    def edit(data):
        data["dims"]["vocab_size"] = len(words)
        data["sha256"]["vocab"] = file_sha256(model / "vocab.json")

    edit_manifest(model, edit)


def test_vocabulary_with_non_string_entries(any_model_dir, tmp_path):
    model = copy_model(any_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    _rewrite_vocab(model, [*words[:-2], 7, None])
    with pytest.raises(ModelError, match="vocab.json: unreadable vocabulary .*non-empty strings"):
        Captioner(model, backend="onnxruntime")


def test_vocabulary_that_disagrees_with_the_graph(any_model_dir, tmp_path):
    """vocab.json and the manifest agree with each other, not with the step graph."""
    model = copy_model(any_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    _rewrite_vocab(model, words[:-1])
    with pytest.raises(ModelError, match="decoder_step.onnx: tensor 'word_bias' has shape"):
        Captioner(model, backend="onnxruntime")


def test_vocabulary_checked_against_a_graph_with_a_symbolic_size(any_model_dir, tmp_path):
    """A step graph whose vocabulary dimension is symbolic cannot be checked against vocab.json:
    only the row dimension may be dynamic, so it is refused at load, not an IndexError later."""
    onnx = pytest.importorskip("onnx")
    model = copy_model(any_model_dir, tmp_path / "m")
    graph = onnx.load(str(model / "decoder_step.onnx"))
    for value in graph.graph.input:
        if value.name == "word_bias":
            value.type.tensor_type.shape.dim[1].dim_param = "V"
    onnx.save(graph, str(model / "decoder_step.onnx"))
    edit_manifest(model, lambda data: data["sha256"].pop("decoder_step", None))
    words = json.loads((model / "vocab.json").read_text())["words"]
    _rewrite_vocab(model, words[:-1])
    with pytest.raises(ModelError, match="tensor 'word_bias' has shape .*'V'"):
        Captioner(model, backend="onnxruntime")


def test_cli_exit_2_one_line(any_model_dir, tmp_path):
    model = copy_model(any_model_dir, tmp_path / "m")
    (model / "vocab.json").write_text(f'{{"words": {_deep(50000)}}}')
    photo = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"
    out = subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", str(photo), "--model", str(model)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "nested 50001 deep" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@POSIX
def test_a_model_folder_named_in_another_encoding_loads_on_onnxruntime(any_model_dir, tmp_path):
    """A folder name that is not UTF-8 (a Latin-1 "modèl"): onnxruntime's binding takes only
    names it can encode, and had refused it with a multi-line TypeError blamed on the providers;
    the graphs are given to it as bytes."""
    pytest.importorskip("onnxruntime")
    named = os.path.join(os.fsencode(tmp_path), b"mod\xe9l")
    try:
        os.mkdir(named)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    model = copy_model(any_model_dir, Path(os.fsdecode(named)) / "m")
    photo = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"
    with Captioner(model, backend="onnxruntime", max_length=4) as captioner:
        assert captioner.caption(photo).text


@POSIX
def test_a_model_folder_named_with_a_newline_is_one_error_line(tmp_path, capsys):
    """The error names the folder as caption names its inputs (\\n, \\xHH for a byte that is
    not UTF-8): a newline in the name had split the line in two."""
    from edgecap.cli import main

    photo = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"
    for name, shown in (("nl\nmodel", "nl\\nmodel"), ("bad\udcffmodel", "bad\\xffmodel")):
        try:
            (tmp_path / name).mkdir()
        except (OSError, UnicodeError):
            pytest.skip("this file system does not take such names")
        assert main(["caption", "--model", str(tmp_path / name), str(photo)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{shown}: not an edgecap model directory" in err
