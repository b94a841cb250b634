"""The smaller hostile cases of issue 16 (class 7): --batch-size bound, --attention over its own
input, --device cuda without CUDA, Ctrl-C at start-up, onnxruntime telemetry from the library.
(Pillow's guard set to None before importing edgecap: tests/test_hostile_files.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap.search import MAX_BATCH_SIZE, CaptionOptions

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}


def cli(*args, model=None, env=ENV):
    model_args = ["--model", str(model)] if model else []
    return subprocess.run([sys.executable, "-m", "edgecap", "caption", *map(str, args),
                           *model_args, "--max-length", "4"],
                          capture_output=True, text=True, env=env)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(path)
    return path


def test_batch_size_has_an_upper_bound(any_model_dir, photo):
    with pytest.raises(ValueError, match=f"between 1 and {MAX_BATCH_SIZE}"):
        CaptionOptions(batch_size=MAX_BATCH_SIZE + 1).validate(top_k=5)
    CaptionOptions(batch_size=MAX_BATCH_SIZE).validate(top_k=5)
    out = cli(photo, "--batch-size", "100000", model=any_model_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"edgecap caption: error: batch_size must be between 1 and {MAX_BATCH_SIZE}, got 100000 "
        "(each image of a batch holds its activations and beams in memory until the batch is "
        "done)"]


@pytest.mark.parametrize("how", ["same", "link"])
def test_attention_never_overwrites_its_input(any_model_dir, photo, tmp_path, how):
    before = photo.read_bytes()
    out_path = photo
    if how == "link":
        out_path = tmp_path / "figure.png"
        os.link(photo, out_path)
    out = cli(photo, "--attention", out_path, model=any_model_dir)
    assert out.returncode == 2
    assert "is the input photo itself" in out.stderr and len(out.stderr.splitlines()) == 1
    assert photo.read_bytes() == before


def test_device_cuda_without_cuda_is_exit_2(any_model_dir, photo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = cli(photo, "--device", "cuda", "--backend", "onnxruntime", model=any_model_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    assert "device='cuda' but this onnxruntime has no CUDA provider" in out.stderr
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr


@pytest.mark.skipif(os.name != "posix", reason="SIGINT")
def test_ctrl_c_at_start_up_is_no_traceback(any_model_dir, photo):
    for delay in (0.05, 0.15, 0.3, 0.6, 1.0):
        proc = subprocess.Popen([sys.executable, "-m", "edgecap", "caption", str(photo),
                                 "--model", str(any_model_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        # 130: edgecap's handler; -SIGINT: Python had not installed its own yet; 0: done first
        assert proc.returncode in (130, -signal.SIGINT, 0), (delay, proc.returncode, err)
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, (delay, err)


def test_library_does_not_write_telemetry(any_model_dir, photo, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    code = ("import os\nfrom edgecap import Captioner\n"
            f"c = Captioner({str(any_model_dir)!r}, backend='onnxruntime', max_length=3)\n"
            f"print(c.caption({str(photo)!r}).text)\n"
            "print(os.environ['ORT_DISABLE_TELEMETRY'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "1"
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
