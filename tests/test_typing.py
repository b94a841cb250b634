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
