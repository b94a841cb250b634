#!/usr/bin/env python3
"""Type-check edgecap (mypy), its TensorRT and CUDA code against the TensorRT Python API's stubs.

    pip install mypy && pip install --no-deps tensorrt-stubs   # the stubs pin tensorrt itself
    python engines/check_types.py                              # exit status 0: clean

What is checked and how is set in ``[tool.mypy]`` of pyproject.toml (the files: the whole edgecap
package; tests/test_typing.py passes edgecap/trt and edgecap/backends/tensorrt.py alone). The
tensorrt-stubs wheel (10.13.0.35.x: the TensorRT 10.13 API) installs ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/*.pyi`` without a ``py.typed`` marker, so mypy would skip them as an untyped
installed package; this script copies them into a temporary stub folder on MYPYPATH, repairing on
the way the two kinds of invalid Python that the 10.13.0.35.1 stubs contain (mypy stops at a syntax
error): parameters named ``in`` (plugin methods; renamed ``in_``) and a parameter without a default
after ones with defaults (``add_scale_nd``'s ``channel_axis``; given ``= ...``). Neither touches a
call edgecap makes. The stubs also declare the module constant ``bool`` (the ``DataType.BOOL``
alias), which shadows the builtin in every ``-> bool`` of the stubs; those annotations are
rewritten to ``builtins.bool`` so that return types like ``execute_async_v3``'s are checked rather
than unknown. Remaining complaints inside the stubs are silenced in pyproject.toml
(``ignore_errors`` for tensorrt and tensorrt_bindings).
Extra arguments go to mypy (e.g. a scratch copy's path instead of the configured files).
Exit status 2 with a message when mypy or the stubs are missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")


def stubs_version() -> str | None:
    try:
        return metadata.version("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        return None


def _repair_def(line: str) -> str:
    """One ``def`` line of the generated stubs made valid Python (see the module docstring)."""
    line = re.sub(r"([(,] ?)in:", r"\1in_:", line)
    line = re.sub(r"(: |-> |\[|, )bool\b", r"\1builtins.bool", line)
    head, sep, rest = line.partition("(")
    if not sep or not head.lstrip().startswith("def ") or ")" not in rest:
        return line
    params, close, tail = rest.rpartition(")")
    parts = params.split(", ")
    if any("[" in part and "]" not in part for part in parts):
        return line  # a subscript with commas: leave alone (none needs repair today)
    seen_default = False
    for i, part in enumerate(parts):
        if "=" in part:
            seen_default = True
        elif seen_default and ":" in part and not part.lstrip().startswith("*"):
            parts[i] = part + " = ..."
    return head + sep + ", ".join(parts) + close + tail


def repair(text: str) -> str:
    lines = [_repair_def(line) if line.lstrip().startswith("def ") else line for line in text.split("\n")]
    at = 1 if lines and lines[0].startswith("from __future__") else 0
    return "\n".join(lines[:at] + ["import builtins"] + lines[at:])


def copy_stubs(dest: Path) -> None:
    """The .pyi files of tensorrt-stubs, as a stub-only tree under ``dest``."""
    dist = metadata.distribution("tensorrt-stubs")
    found = 0
    for file in dist.files or ():
        if file.suffix == ".pyi" and file.parts[0] in STUB_PACKAGES:
            target = dest.joinpath(*file.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(repair(Path(str(file.locate())).read_text(encoding="utf-8")), encoding="utf-8")
            found += 1
    if not found:
        raise SystemExit("tensorrt-stubs is installed but has no tensorrt/*.pyi files")


def missing() -> str | None:
    """Why the check cannot run here, or None."""
    try:
        import mypy  # noqa: F401
    except ImportError:
        return "mypy is not installed (pip install mypy)"
    if stubs_version() is None:
        return "tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)"
    return None


def main(argv: list[str]) -> int:
    why = missing()
    if why:
        print(f"check_types: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgecap-trt-stubs-") as tmp:
        copy_stubs(Path(tmp))
        env = dict(os.environ, MYPYPATH=tmp)
        print(f"check_types: mypy against tensorrt-stubs {stubs_version()}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-incremental",
            *argv,
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
