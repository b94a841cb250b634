"""benchmarks/gpu_check.py in its CPU-only form, so CI keeps the GPU check working until a
session with a GPU runs it (``--device cpu``: CUDA items skipped, each with its reason)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("## Machine", "## gpu-marked tests", "## Captions", "## Latency (ms)",
            "## Peak GPU memory", "## Targets", "## Skipped")


def test_gpu_check_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--n", "2",
                           "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "gpu-cpu.md").read_text()
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    for section in SECTIONS:
        assert section in text, section
    assert data["device"] == "cpu"
    # the gpu tests ran in a subprocess and skipped (no CUDA), none failed
    assert data["gpu_tests"]["counts"].get("failed", 0) == 0
    assert data["gpu_tests"]["counts"].get("skipped", 0) >= 1
    labels = [m["label"] for m in data["modes"]]
    assert labels == ["torch-cpu-fp32-eager", "torch-cpu-fp32-graphs-emulated"]
    for mode in data["modes"]:
        # the same model on the CPU: the captions are onnxruntime's
        assert mode["captions"]["n"] == 2 and mode["captions"]["identical"] == 1.0
        (row,) = mode["latency"]
        assert (row["beam"], row["batch"]) == (3, 1) and row["e2e_p50_ms"] > 0
        assert "peak_gpu_mib" not in mode
    assert all(t["met"] is None for t in data["targets"])
    skipped = {s["item"]: s["reason"] for s in data["skipped"]}
    assert "TensorRT and onnxruntime-gpu rows" in skipped
    assert "GPU, driver and CUDA versions" in skipped
    assert all(reason.strip() for reason in skipped.values())
    for item, reason in skipped.items():
        assert f"- {item}: {reason}" in text
        assert f"{item}: {reason}" in proc.stdout
