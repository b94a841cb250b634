"""The runtime stays light: ``import edgecap`` and ``edgecap caption`` on onnxruntime never
import torch (checked in fresh interpreters through ``sys.modules``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import edgecap

EXAMPLE = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
HEAVY = ("torch", "onnx", "tensorrt", "pycuda", "cv2")


def _loaded_after(code: str) -> dict:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_import_edgecap_is_light():
    loaded = _loaded_after(
        "import edgecap\nfrom edgecap import Captioner, Caption, InputError\n"
        "import sys; assert 'onnxruntime' not in sys.modules"
    )
    assert loaded == []


def test_cli_parser_is_light():
    assert _loaded_after("from edgecap.cli import build_parser\nbuild_parser()") == []


def test_caption_on_onnxruntime_does_not_import_torch(tiny_model_dir):
    code = (
        "import sys\nfrom edgecap.cli import main\n"
        f"rc = main(['caption', {str(EXAMPLE)!r}, '--model', {str(tiny_model_dir)!r}, "
        "'--backend', 'onnxruntime', '--max-length', '3'])\n"
        "assert rc == 0, rc\nassert 'onnxruntime' in sys.modules"
    )
    assert _loaded_after(code) == []
