"""mypy over the TensorRT and CUDA code against the TensorRT 10.13 API stubs (tensorrt-stubs).

Every TensorRT name, argument and enum member the code uses is checked against the real API's
stubs (engines/check_types.py, ``[tool.mypy]`` in pyproject.toml). Skipped, saying why, where
mypy or tensorrt-stubs is not installed (.ci/run installs both). The whole package is checked by
``.ci/run`` (``python engines/check_types.py``); this test checks the TensorRT code alone (the
modules it imports are read for their types, not reported on).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "engines"))

import check_types  # noqa: E402

TENSORRT_CODE = ["edgecap/trt", "edgecap/backends/tensorrt.py"]


def test_tensorrt_code_type_checks_against_the_stubs():
    why = check_types.missing()
    if why:
        pytest.skip(f"type check not run: {why}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "engines" / "check_types.py"), "--follow-imports=silent", *TENSORRT_CODE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_stub_repairs_make_valid_python():
    """The two kinds of invalid Python in the generated stubs, repaired (see check_types)."""
    import ast

    lines = [
        "    def f(self, in: list[int], out: list[int]) -> bool:",
        "    def g(self, a: int, b: int = None, c: int) -> int:",
    ]
    fixed = check_types.repair("\n".join(["class A:"] + [f"{x}\n        ..." for x in lines]))
    ast.parse(fixed)
    assert "in_: list[int]" in fixed and "-> builtins.bool" in fixed
    assert "c: int = ..." in fixed


def test_the_package_s_own_names_have_their_types_for_a_type_checker(tmp_path):
    """``from edgecap import Captioner`` (the documented import; ``edgecap.__getattr__`` makes it
    at run time) is the class to a type checker too, not ``Any``: py.typed's promise; and an
    object with ``__array__`` (a torch tensor on the CPU), which the docs say is an image, is one
    to it too."""
    api = pytest.importorskip("mypy.api")
    user = tmp_path / "user.py"
    user.write_text(
        "from edgecap import Caption, CaptionOptions, Captioner\n"
        "reveal_type(Captioner().caption('photo.jpg'))\n"
        "reveal_type(CaptionOptions().beam_size)\n"
        "caption: Caption = Captioner().caption('photo.jpg')\n"
        "caption.no_such_field\n"
        # another library's array (a torch tensor, a JAX array): an image, as the docs say
        "import numpy as np\n"
        "class Tensor:\n"
        "    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:\n"
        "        return np.zeros((2, 2, 3), np.uint8)\n"
        "Captioner().caption(Tensor())\n",
        encoding="utf-8",
    )
    out, err, status = api.run(
        ["--no-incremental", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), str(user)]
    )
    assert 'Revealed type is "edgecap.api.Caption"' in out, out + err
    assert 'Revealed type is "builtins.int"' in out or 'Revealed type is "int"' in out, out + err
    assert '"Caption" has no attribute "no_such_field"' in out, out + err
    assert "Found 1 error" in out, out + err  # that one: the tensor is an image


def _mypy_strict(tmp_path, code: str) -> str:
    """mypy --strict's report on ``code``, a user's script, with edgecap checked as an installed
    package is (its own modules read for their types, not reported on)."""
    api = pytest.importorskip("mypy.api")
    user = tmp_path / "user.py"
    user.write_text(code, encoding="utf-8")
    out, err, _ = api.run(
        [
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(user),
        ]
    )
    return out + err


def test_the_documented_examples_type_check_in_strict_mode(tmp_path):
    """The docs' examples as a user's type checker sees them: with on_error "raise" (the default)
    every result and every stream event's caption is a ``Caption`` (``caption.text`` had been an
    error: ``Item "InputError" of "Caption | InputError" has no attribute "text"``, in
    docs/cameras.md's loop and examples/robot_loop.py too); with "return" a result may be an
    ``InputError``; OpenCV's ``imread`` (an array or None) is an image of a batch."""
    report = _mypy_strict(
        tmp_path,
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from edgecap import Captioner\n"
        "from edgecap.stream import StreamEvent, camera_frames, caption_stream\n"
        "captioner = Captioner()\n"
        "paths = [Path('a.png')]\n"
        "for caption in captioner.iter_captions(paths):\n"
        "    print(caption.text)\n"
        "print(captioner.caption_batch(paths)[0].text)\n"
        "frames: list[np.ndarray | None] = [None]\n"
        "reveal_type(captioner.caption_batch(frames, color='bgr', on_error='return'))\n"
        "reveal_type(captioner.iter_captions(paths, on_error='return'))\n"
        "for event in caption_stream(captioner, camera_frames(0), every=0.5):\n"
        "    print(event.caption.text, event.caption.timings['encode_ms'])\n"
        "for failed in caption_stream(captioner, frames, on_error='return'):\n"
        "    reveal_type(failed.caption)\n"
        "def handle(event: StreamEvent) -> None:\n"  # unparameterised: either
        "    reveal_type(event.caption)\n"
        "for event in caption_stream(captioner, frames):\n"
        "    handle(event)\n",
    )
    revealed = [
        line.split("Revealed type is ", 1)[1].replace("builtins.", "").replace("typing.", "")
        for line in report.splitlines()
        if "Revealed type is" in line
    ]
    either = "edgecap.api.Caption | edgecap.errors.InputError"
    assert revealed == [f'"list[{either}]"', f'"Iterator[{either}]"', f'"{either}"', f'"{either}"'], report
    assert "Success: no issues found" in report, report


def test_a_misspelt_name_is_an_error_to_a_type_checker(tmp_path):
    """``edgecap.__getattr__`` (the lazy import of ``Captioner``) is hidden from type checkers:
    with it, every name was one to them (``from edgecap import Captionr`` passed as ``Any``)."""
    report = _mypy_strict(
        tmp_path, "from edgecap import Captioner, Captionr\nimport edgecap\nedgecap.Captioner()\n"
    )
    assert 'Module "edgecap" has no attribute "Captionr"' in report, report
    assert "Found 1 error" in report, report


def test_public_annotations_name_the_path_type():
    """``os.PathLike`` with its argument in what the public functions take: a bare one is
    ``PathLike[Unknown]`` to pyright, whose strict mode reported every ``caption()`` call as
    partially unknown."""
    import os
    import typing

    from edgecap import Caption, Captioner
    from edgecap.stream import video_frames
    from edgecap.viz import attention_figure, save_attention

    def bare(hint: object) -> bool:
        return hint is os.PathLike or any(bare(arg) for arg in typing.get_args(hint))

    for function in (
        Captioner.__init__,
        Captioner.caption,
        Captioner.caption_batch,
        Captioner.iter_captions,
        video_frames,
        attention_figure,
        save_attention,
    ):
        hints = typing.get_type_hints(function, localns={"Caption": Caption})
        assert not any(bare(hint) for hint in hints.values()), (function.__qualname__, hints)


def test_the_robot_loop_example_type_checks_in_strict_mode(tmp_path):
    """examples/robot_loop.py, as a user's copy of it: ``event.caption.timings`` of a stream with
    on_error "raise" is a ``Caption``'s (it had been two errors, ``Item "InputError" of "Caption |
    InputError" has no attribute ...``)."""
    report = _mypy_strict(tmp_path, (ROOT / "examples" / "robot_loop.py").read_text(encoding="utf-8"))
    assert "Success: no issues found" in report, report
