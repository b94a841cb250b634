"""``edgecap caption`` end to end, in a subprocess (``python -m edgecap caption ...``).

Needs the ``tiny_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import edgecap

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
# The subprocess imports the edgecap under test, installed or not.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}


def edgecap_caption(*args, model=None) -> subprocess.CompletedProcess:
    model_args = ["--model", str(model)] if model is not None else []
    return subprocess.run([sys.executable, "-m", "edgecap", "caption", *map(str, args),
                           *model_args, "--max-length", "6"],
                          capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """photos/a.png, photos/nested/b.jpg, photos/notes.txt (ignored), photos/broken.jpg."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copy(EXAMPLES / "chelsea.png", root / "a.png")
    (root / "nested").mkdir()
    Image.open(EXAMPLES / "coffee.png").convert("RGB").save(root / "nested" / "b.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _plain_lines(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines())


def test_one_file(tiny_model_dir):
    path = EXAMPLES / "chelsea.png"
    out = edgecap_caption(path, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    lines = _plain_lines(out.stdout)
    assert list(lines) == [str(path)] and lines[str(path)].strip()


def test_directory_recursive_sorted(tiny_model_dir, photo_dir):
    out = edgecap_caption(photo_dir, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert list(_plain_lines(out.stdout)) == [str(photo_dir / "a.png"),
                                              str(photo_dir / "nested" / "b.jpg")]


def test_glob(tiny_model_dir, photo_dir):
    out = edgecap_caption(f"{photo_dir}/**/*.jpg", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert list(_plain_lines(out.stdout)) == [str(photo_dir / "nested" / "b.jpg")]


def test_json_and_failures(tiny_model_dir, photo_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    missing = tmp_path / "missing.png"
    out = edgecap_caption(broken, photo_dir / "a.png", missing, "--json", model=tiny_model_dir)
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(broken), str(photo_dir / "a.png"), str(missing)]
    assert records[0]["caption"] is None and records[0]["error"]
    assert isinstance(records[1]["caption"], str) and isinstance(records[1]["score"], float)
    assert "error" not in records[1]
    assert records[2]["caption"] is None and "no such file" in records[2]["error"]
    errors = out.stderr.splitlines()
    assert errors[0].startswith(f"edgecap: {broken}: ")
    assert errors[1] == f"edgecap: {missing}: no such file"
    assert "Traceback" not in out.stderr


def test_empty_directory_and_unmatched_glob(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = edgecap_caption(empty, f"{tmp_path}/*.webp", EXAMPLES / "chelsea.png",
                          model=tiny_model_dir)
    assert out.returncode == 1
    assert "no image files" in out.stderr and str(empty) in out.stderr
    assert f"{tmp_path}/*.webp" in out.stderr
    assert list(_plain_lines(out.stdout)) == [str(EXAMPLES / "chelsea.png")]


def test_bad_model_dir_is_a_clean_error(tmp_path):
    out = edgecap_caption(EXAMPLES / "chelsea.png", model=tmp_path / "nowhere")
    assert out.returncode == 2
    assert "model directory not found" in out.stderr and "Traceback" not in out.stderr


def test_bad_option_is_a_clean_error(tiny_model_dir):
    out = edgecap_caption(EXAMPLES / "chelsea.png", "--beam-size", "0", model=tiny_model_dir)
    assert out.returncode == 2
    assert "beam_size" in out.stderr and "Traceback" not in out.stderr
