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
