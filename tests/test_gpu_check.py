"""benchmarks/gpu_check.py in its CPU-only form, so CI keeps the GPU check working until a
session with a GPU runs it (``--device cpu``: CUDA items skipped, each with its reason)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
MODEL = SCRIPT.parents[1] / "edgecap" / "assets" / "default"
EXAMPLES = SCRIPT.parents[1] / "edgecap" / "assets" / "examples"
SECTIONS = (
    "## Machine",
    "## gpu-marked tests",
    "## Captions",
    "## Latency (ms)",
    "## Files against in-memory frames, beam 3",
    "## Command line",
    "## Peak GPU memory",
    "## Targets",
    "## Skipped",
)


def _quick_cpu_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``gpu_check.py --device cpu --quick`` on two photos, one timed call each, with ``extra``
    options, writing into ``tmp_path``."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--n", "2", "--repeats", "1", *extra]
        # the bundled example photos, as in a fresh clone: never the research data beside the
        # checkout (../shared/data/flickr8k), which would add CIDEr's Java tokenizer runs
        + ["--out", str(tmp_path), "--flickr8k", str(tmp_path / "no-flickr8k")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        # as on a GPU machine's stock Python: pytest without pytest-xdist, so the project's
        # `-n 2` (pyproject.toml's addopts) must not reach the gpu tests' pytest
        env={**os.environ, "PYTEST_ADDOPTS": "-p no:xdist"},
    )


def test_gpu_check_on_the_cpu(tmp_path):
    proc = _quick_cpu_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "gpu-cpu.md").read_text()
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    for section in SECTIONS:
        assert section in text, section
    assert data["device"] == "cpu" and data["partial"] is False and "Partial" not in text
    # the cores this process may run on (the decoding workers' rows depend on them)
    usable = f"{len(os.sched_getaffinity(0))} usable by this process"
    assert usable in data["environment"]["cores"] and f"{usable}); Python" in text
    # the gpu tests ran in a subprocess and skipped (no CUDA), none failed
    assert data["gpu_tests"]["counts"].get("failed", 0) == 0
    assert data["gpu_tests"]["counts"].get("skipped", 0) >= 1
    labels = [m["label"] for m in data["modes"]]
    assert labels == [
        "torch-cpu-fp32-eager",
        "torch-cpu-fp32-graphs-emulated",
        "torch-cpu-fp32-eager-device",
        "torch-cpu-fp32-graphs-emulated-device",
        "torch-cpu-fp32-graphs-emulated-device-prep",
    ]
    # the decode graphs' steps: the astronaut's caption (the first photo) runs to the last step
    assert data["modes"][3]["latency"][0]["steps_per_call"] == 20
    assert data["modes"][2]["latency"][0]["steps_per_call"] == 0  # no graphs: none to the host
    for mode in data["modes"]:
        # the same model on the CPU: the captions are onnxruntime's
        assert mode["captions"]["n"] == 2 and mode["captions"]["identical"] == 1.0
        (row,) = mode["latency"]
        assert (row["beam"], row["batch"]) == (3, 1) and row["e2e_p50_ms"] > 0
        assert "peak_gpu_mib" not in mode
    # files against in-memory frames: the first mode, batch 1, without and with 2 workers
    rates = data["modes"][0]["file_rate"]
    assert {(r["batch"], r["workers"], r["input"]) for r in rates} == {
        (1, w, what) for w in ("0", "2") for what in ("files", "memory")
    }
    assert all(r["photos"] == 2 and r["captions_per_s"] > 0 and r["same"] == 1.0 for r in rates)
    assert all("file_rate" not in mode for mode in data["modes"][1:])
    assert "| 1 | 2 |" in text
    # where a call's time goes: the first mode at batch 1, profiled once in a process of its
    # own (the torch operations' self times stand in for a GPU's kernels)
    (profile,) = data["modes"][0]["profile"]
    assert (profile["batch"], profile["calls"]) == (1, 1) and profile["kernels_per_call"] > 1000
    assert {"convolution", "matrix product"} <= {k["kind"] for k in profile["kinds"]}
    assert all("profile" not in mode for mode in data["modes"][1:])
    # the host's preprocessing in the calling thread and in two (8 VGA frames, once), with the
    # allocator as it comes and keeping freed memory, a process each
    threads = data["prep_threads"]
    assert [(r["memory"], r["threads"], r["frames"]) for r in threads] == [
        (memory, n, 8) for memory in ("default", "kept") for n in (0, 2)
    ]
    assert threads[0]["speedup"] == 1 and all(r["frames_per_s"] > 0 for r in threads)
    assert threads[3]["faults_per_frame"] is not None  # counted (Linux)
    assert "## Host preprocessing in threads" in text and "| kept | 2 | 8 |" in text
    assert "torch-cpu-fp32-eager, batch 1, 1 call: " in text
    assert all(t["met"] is None for t in data["targets"])
    # the command line, in its own process over the JPEG files: on the CPU the plain run only
    (run,) = data["command_line"]
    assert (run["flags"], run["exit"], run["captions"]) == ("plain", 0, 2) and "of" not in run
    assert run["command"].startswith("edgecap caption FOLDER --backend torch --device cpu --batch-size 64")
    # the wall time as the tables write numbers (3 significant digits under 10, one decimal
    # under 1000: a slow machine's 21.07 s is 21.1)
    shown = re.search(r"\| plain \| 0 \| ([0-9.]+) \| 2 \|", text)
    assert shown and float(shown.group(1)) == pytest.approx(run["seconds"], rel=5e-3)
    skipped = {s["item"]: s["reason"] for s in data["skipped"]}
    assert "TensorRT and onnxruntime-gpu rows" in skipped
    assert "GPU, driver and CUDA versions" in skipped
    assert all(reason.strip() for reason in skipped.values())
    for item, reason in skipped.items():
        assert f"- {item}: {reason}" in text
        assert f"{item}: {reason}" in proc.stdout


def test_the_budget_counts_from_each_runs_start(tmp_path, monkeypatch):
    """``--budget-s`` counts from ``main``'s start, not from the module's import: a run in a
    process that imported gpu_check long before (a second run, as these tests make) had found
    the time since spent already, and skipped every mode for the budget."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    monkeypatch.setattr(gpu_check, "T0", time.perf_counter() - 10_000.0)  # imported long ago
    started = time.perf_counter()
    with pytest.raises(SystemExit):  # stops once the modes are chosen (none matches)
        gpu_check.main(["--device", "cpu", "--modes", "torch-cuda-*", "--out", str(tmp_path)])
    assert started <= gpu_check.T0 <= time.perf_counter()
    assert not gpu_check.Report(300.0).over_budget("a mode")


def test_modes_runs_only_the_modes_named(tmp_path):
    """``--modes``: the modes a label or a pattern names, in the run's order, and no command
    line; a pattern naming no mode stops the run before any photo is read, listing the modes."""
    proc = _quick_cpu_run(tmp_path, "--skip-tests", "--modes", "*-device-prep, torch-cpu-fp32-eager-device")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert [m["label"] for m in data["modes"]] == [
        "torch-cpu-fp32-eager-device",
        "torch-cpu-fp32-graphs-emulated-device-prep",
    ]
    assert "command_line" not in data
    skipped = {s["item"]: s["reason"] for s in data["skipped"]}
    assert skipped["command line"] == "--modes: the modes named only"
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    with pytest.raises(SystemExit) as stop:
        gpu_check.main(
            ["--device", "cpu", "--modes", "torch-cpu-fp32-eager,torch-cuda-*", "--out", str(tmp_path)]
        )
    message = str(stop.value.code)
    assert message.startswith("--modes: no mode matches torch-cuda-*; the modes here: torch-cpu-fp32-eager, ")
    assert "torch-cpu-fp32-graphs-emulated-device-prep" in message


def test_gpu_report_formats_cuda_results():
    """The CUDA-only branches of the report (machine, memory, targets, speed-ups, FP16 against
    FP32, throughput), fed results shaped as a GPU run would give them: they cannot run here
    otherwise."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def latency(scale):
        return [
            {
                "beam": beam,
                "batch": batch,
                "calls": 3,
                "encoder_p50_ms": 0.9 * scale,
                "encoder_p95_ms": 1.0 * scale,
                "step_p50_ms": 0.08 * scale,
                "step_p95_ms": 0.1 * scale,
                "steps_per_call": 12.0,
                "preprocess_p50_ms": 0.5,
                "search_p50_ms": 1.0 * scale,
                "e2e_p50_ms": 2.0 * scale,
                "e2e_p95_ms": 3.0 * scale,
            }
            for beam in (1, 3)
            for batch in (1, 8)
        ]

    texts = [f"caption {i}" for i in range(200)]

    def mode(label, scale, ident, fp16_same=200, rate=None):
        out = {
            "label": label,
            "latency": latency(scale),
            "peak_gpu_mib": 120.0,
            "texts": texts[:fp16_same] + ["other"] * (200 - fp16_same),
            "captions": {
                "n": 200,
                "identical": ident,
                "identical_n": int(ident * 200),
                "cider": None,
                "images_per_s": 900.0,
            },
        }
        if rate is not None:
            out["throughput"] = [
                {"batch": 64, "input": "frames", "calls": 20, "p50_ms": 64e3 / rate, "captions_per_s": rate},
                {
                    "batch": 64,
                    "input": "tensors",
                    "calls": 20,
                    "p50_ms": 64e3 / (rate * 1.5),
                    "captions_per_s": rate * 1.5,
                },
            ]
        return out

    def file_rate(batch, workers, what, rate):
        return {
            "batch": batch,
            "workers": workers,
            "input": what,
            "photos": 200,
            "calls": 3,
            "median_s": 200 / rate,
            "captions_per_s": rate,
            "preprocess_ms_per_photo": 1.0,
            "same": 1.0,
            "of_memory": rate / 5000.0 if what == "files" else 1.0,
        }

    def report(fp16_same):
        modes = [
            mode("torch-cuda-fp32-graphs-host", 3.0, 0.99, rate=2000.0),
            mode("torch-cuda-fp32-graphs-device", 1.2, 0.99, rate=5200.0),
            mode("torch-cuda-fp16-graphs-device", 1.0, 0.95, fp16_same, rate=6000.0),
        ]
        data = {
            "device": "cuda",
            "command": "python benchmarks/gpu_check.py",
            "date": "now",
            "seconds": 100.0,
            "settings": {"max_length": 20, "warmup": 3, "repeats": 20},
            "environment": {
                "gpu": "NVIDIA H100 80GB HBM3",
                "capability": "9.0",
                "gpu_memory_gib": 79.2,
                "multiprocessors": 132,
                "driver": "580",
                "torch_cuda": "13.0",
                "cudnn": 91000,
                "cpu": "x86",
                "python": "3.12",
                "platform": "linux",
                "versions": {"torch": "2.11"},
                "onnxruntime_providers": ["CPUExecutionProvider"],
            },
            "gpu_tests": {
                "command": "python -m pytest -m gpu",
                "summary": "6 passed",
                "returncode": 0,
                "seconds": 20.0,
                "failures": [],
                "skip_reasons": [],
            },
            "photos": {"n": 200, "source": "examples"},
            "reference": {"describe": "ort"},
            "modes": modes,
            "skipped": [{"item": "TensorRT rows", "reason": "not installed"}],
        }
        modes[1]["file_rate"] = [
            file_rate(64, w, what, rate)
            for w, what, rate in (
                ("0", "files", 1500.0),
                ("0", "memory", 5000.0),
                ("7 (default)", "files", 4500.0),
                ("7 (default)", "memory", 5000.0),
            )
        ]
        modes[1]["decode_forms"] = {
            "conditional_error": None,
            "rows": [
                {
                    "batch": 1,
                    "calls": 20,
                    "parts_p50_ms": 3.0,
                    "one_graph_p50_ms": 2.5,
                    "parts_over_one_graph": 1.2,
                    "steps_parts": 13.4,
                    "steps_one_graph": 13.4,
                    "same_captions": True,
                }
            ],
        }
        modes[1]["profile"] = [
            {
                "batch": 64,
                "calls": 3,
                "wall_ms": 14.0,
                "wall_unprofiled_ms": 12.8,
                "kernels_per_call": 900.0,
                "kernel_ms_per_call": 10.0,
                "kinds": [
                    {"kind": "convolution", "kernels": 100.0, "ms": 6.0},
                    {"kind": "top-k / sort", "kernels": 40.0, "ms": 4.0},
                ],
                "top": [{"name": "gatherTopK<float>", "kernels": 20.0, "ms": 3.0, "mean_us": 150.0}],
            }
        ]
        data["speedups"] = gpu_check.speedups(modes)
        data["search_speedups"] = gpu_check.search_speedups(modes)
        data["fp16_identity"] = gpu_check.fp16_identity(modes)
        data["targets"] = gpu_check.targets(modes, "cuda", data["fp16_identity"])
        return data

    data = report(fp16_same=198)  # FP16 keeps 99% of FP32's captions: the faster one counts
    assert [t["met"] for t in data["targets"]] == [True, True, True]
    assert [t["value"] for t in data["targets"]] == [2.0, 6000.0, 0.99]
    assert data["search_speedups"][0]["e2e_p50_ms_x"] == pytest.approx(2.5)
    text = gpu_check.markdown(data)
    assert "NVIDIA H100 80GB HBM3" in text and "| torch-cuda-fp16-graphs-device | 120.0 |" in text
    assert "| torch-cuda-fp16-graphs-device | torch-cuda-fp32-graphs-device | 99.0% (198/200) |" in text
    assert "- TensorRT rows: not installed" in text and "## Throughput, batch 64" in text
    assert "torch-cuda-fp32-graphs-device:" in text
    assert "| 64 | 0 | 1500 | 5000 | 0.30 |" in text
    assert "| 64 | 7 (default) | 4500 | 5000 | 0.90 |" in text
    assert "## The whole decode: one graph with conditional nodes" in text
    assert "| 1 | 3 | 2.5 | 1.2 | 13.4 | 13.4 | yes |" in text
    assert "## Where one call's time goes (torch.profiler)" in text
    assert "torch-cuda-fp32-graphs-device, batch 64, 3 calls: 900 kernels and copies a call, 10 ms" in text
    assert "| convolution | 100.0 | 6 | 60% |" in text and "| top-k / sort | 40.0 | 4 | 40% |" in text
    assert "| `gatherTopK<float>` | 20.0 | 3 | 150.0 |" in text
    data = report(fp16_same=190)  # 95%: FP16 does not keep the captions, FP32's time counts
    assert [t["met"] for t in data["targets"]] == [True, True, False]
    assert data["targets"][0]["value"] == pytest.approx(2.4)
    assert "torch-cuda-fp32-graphs-device" in data["targets"][0]["target"]
    assert "**no**" in gpu_check.markdown(data)
    # any FP32 graphs mode whose captions stay >= 98% identical counts, the fastest wins: the
    # compiled search when it keeps them, never when it does not
    base = report(fp16_same=190)["modes"]
    for ident, ms, label in (
        (0.99, 1.0, "torch-cuda-fp32-graphs-device-compiled"),
        (0.95, 2.4, "torch-cuda-fp32-graphs-device"),
    ):
        modes = base + [mode("torch-cuda-fp32-graphs-device-compiled", 0.5, ident)]
        e2e = gpu_check.targets(modes, "cuda")[0]
        assert e2e["value"] == pytest.approx(ms) and e2e["target"].endswith(f"({label})")


def test_the_command_line_rows_on_a_gpu(monkeypatch, tmp_path):
    """On CUDA the three runs, each its own process with its flags: captions counted against
    the plain run's by path, a failed run kept as a row with its exit status and last stderr
    line (the processes stood in for: no GPU here)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    outputs = [
        ({"a.jpg": "a dog runs", "b.jpg": "a cat sits", "c.jpg": "a man"}, 0, ""),
        ({"a.jpg": "a dog runs", "b.jpg": "a cat lies", "c.jpg": "a man"}, 0, ""),
        ({}, 2, "edgecap caption: error: something\nedgecap caption: error: no GPU memory"),
    ]
    calls = []

    def run(argv, **kwargs):
        captions, code, err = outputs[len(calls)]
        calls.append(argv)
        lines = [json.dumps({"path": path, "caption": text}) for path, text in captions.items()]
        lines.append(json.dumps({"path": "bad.jpg", "caption": None, "error": "not an image"}))
        return subprocess.CompletedProcess(argv, code, "\n".join(lines) + "\n", err)

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    rows = gpu_check.command_line(tmp_path, "cuda", 20, gpu_check.Report(1e9))
    assert [c[c.index("--json") + 2 :] for c in calls] == [
        [],
        ["--cuda-graphs"],
        ["--cuda-graphs", "--precision", "fp16", "--gpu-preprocess"],
    ]
    assert all(c[3:5] == ["caption", str(tmp_path)] and "--device" in c for c in calls)
    assert [r["captions"] for r in rows] == [3, 3, 0]
    assert "of" not in rows[0] and (rows[1]["identical_to_plain"], rows[1]["of"]) == (2, 3)
    assert rows[2]["exit"] == 2 and rows[2]["stderr"] == "edgecap caption: error: no GPU memory"
    text = gpu_check.command_line_table(rows)
    assert "| --cuda-graphs | 0 |" in text and "| 2/3 |" in text
    assert "| **2**: edgecap caption: error: no GPU memory |" in text


def test_a_plain_run_that_timed_out_is_no_one_elses_reference(monkeypatch, tmp_path):
    """When the plain run does not finish in time, the flagged runs have no plain captions to be
    compared with ("-"), not the first flagged run's captions counted as "identical to plain"
    (the processes stood in for: the plain one times out, the two flagged ones differ on b.jpg)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    outputs = [None, {"a.jpg": "a dog", "b.jpg": "a cat"}, {"a.jpg": "a dog", "b.jpg": "a cow"}]
    calls = []

    def run(argv, **kwargs):
        captions = outputs[len(calls)]
        calls.append(argv)
        if captions is None:
            raise subprocess.TimeoutExpired(argv, kwargs["timeout"])
        lines = [json.dumps({"path": path, "caption": text}) for path, text in captions.items()]
        return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    report = gpu_check.Report(1e9)
    rows = gpu_check.command_line(tmp_path, "cuda", 20, report)
    assert [r["flags"] for r in rows] == ["--cuda-graphs", "--cuda-graphs --precision fp16 --gpu-preprocess"]
    assert all("of" not in r for r in rows)
    assert "identical_to_plain" not in rows[1]
    assert [s["item"] for s in report.data["skipped"]] == ["command line: plain"]
    assert "| 2 | " in gpu_check.command_line_table(rows) and "/2 |" not in gpu_check.command_line_table(rows)


def test_gpu_report_written_after_each_mode_says_partial(tmp_path):
    """The report is rewritten after each mode (a run stopped from outside keeps the modes it
    finished), flagged partial until the end."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    data = {
        "device": "cpu",
        "command": "python benchmarks/gpu_check.py",
        "date": "now",
        "settings": {"max_length": 20, "warmup": 1, "repeats": 1},
        "environment": {
            "cpu": "x86",
            "python": "3.11",
            "platform": "linux",
            "versions": {"torch": "2.13"},
            "onnxruntime_providers": ["CPUExecutionProvider"],
        },
        "photos": {"n": 2, "source": "examples"},
        "reference": {},
    }
    row = {"beam": 3, "batch": 1, "calls": 1, "steps_per_call": 12.0}
    for key in ("encoder", "step", "e2e"):
        row.update({f"{key}_p50_ms": 9.0, f"{key}_p95_ms": 9.5})
    row.update(preprocess_p50_ms=1.0, search_p50_ms=2.0)
    modes = [{"label": "torch-cpu-fp32-eager", "latency": [row]}]
    report = gpu_check.Report(300.0)
    gpu_check.write_report(data, modes, report, "cpu", tmp_path, "r", partial=True)
    text = (tmp_path / "r.md").read_text()
    assert "**Partial: written after 1 mode(s)" in text and "torch-cpu-fp32-eager" in text
    assert json.loads((tmp_path / "r.json").read_text())["partial"] is True
    gpu_check.write_report(data, modes, report, "cpu", tmp_path, "r", partial=False)
    assert "Partial" not in (tmp_path / "r.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["partial"] is False


def test_the_compiled_search_runs_only_with_compiled():
    """The compiled device search's cold compile outlasted a lease's call once: it is measured
    only when asked for (``--compiled``), last, at the target's latency setting alone."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    plain = [m["label"] for m in gpu_check.modes("cuda")]
    fused = 2 if importlib.util.find_spec("triton") is not None else 0  # the fused search's modes
    assert "torch-cuda-fp32-graphs-device-compiled" not in plain and len(plain) == 17 + fused
    assert gpu_check.modes("cuda")[plain.index("torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc")][
        "options"
    ] == {
        **gpu_check.modes("cuda")[plain.index("torch-cuda-fp16-fp32enc-graphs-device")]["options"],
        "preprocess": "device",
        "channels_last": True,
    }
    for precision in ("fp32", "fp16"):  # the frames on the GPU and the encoder channels-last
        nhwc = gpu_check.modes("cuda")[plain.index(f"torch-cuda-{precision}-graphs-device-prep-nhwc")]
        assert nhwc["options"] == {
            **gpu_check.modes("cuda")[plain.index(f"torch-cuda-{precision}-graphs-device")]["options"],
            "preprocess": "device",
            "channels_last": True,
        }
    if fused:  # the search's bookkeeping in one Triton kernel, the frames on the GPU
        for precision in ("fp32", "fp16-fp32enc"):
            options = gpu_check.modes("cuda")[plain.index(f"torch-cuda-{precision}-graphs-device-prep-fused")]
            assert options["options"] == {
                **gpu_check.modes("cuda")[plain.index(f"torch-cuda-{precision}-graphs-device")]["options"],
                "preprocess": "device",
                "fused_search": True,
            }
    prep = plain.index("torch-cuda-fp32-graphs-device-prep")
    assert plain[prep - 1] == "torch-cuda-fp32-graphs-device"  # the same mode, frames on the GPU
    assert gpu_check.modes("cuda")[prep]["options"] == {
        **gpu_check.modes("cuda")[prep - 1]["options"],
        "preprocess": "device",
    }
    compiled = gpu_check.modes("cuda", compiled=True)
    assert [m["label"] for m in compiled[:-1]] == plain
    last = compiled[-1]
    assert last["label"] == "torch-cuda-fp32-graphs-device-compiled"
    assert last["options"]["compile_search"] and (last["beams"], last["batches"]) == ((3,), (1,))
    assert gpu_check.parse_args(["--compiled"]).compiled and not gpu_check.parse_args([]).compiled


def test_the_latency_of_a_device_preprocessing_mode_hands_the_frames_to_the_device(default_model_dir):
    """gpu_check times a mode's latency through a ``SyncTimedBackend`` around its backend: a
    backend with ``preprocess="device"`` still gets the frames (``encode_frames``, once per
    call), so the ``-prep`` modes time the preprocessing on the device, not the host's, and the
    encoder time includes it."""
    import argparse

    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner

    cap = Captioner(default_model_dir, backend="torch", device="cpu", preprocess="device")
    calls = []
    inner = cap.backend.encode_frames
    cap.backend.encode_frames = lambda frames, *rest: calls.append(len(frames)) or inner(frames, *rest)
    timed = gpu_check.SyncTimedBackend(cap.backend)
    frames = list(np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8))
    args = argparse.Namespace(beams=[1], batches=[2], warmup=0, repeats=1, max_length=4)
    (row,) = gpu_check.latency(cap, timed, frames, args)
    assert calls == [2]
    assert row["encoder_p50_ms"] > 0


def test_each_command_line_run_is_limited_to_what_is_left_of_the_budget(monkeypatch, tmp_path):
    """100 s spent: with --budget-s 160 a run gets the 60 s left, with 110 the 30 s floor, with a
    budget to spare the 180 s cap (the processes stood in for, recording their timeouts)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import time

    import gpu_check

    timeouts = []

    def run(argv, **kwargs):
        timeouts.append(kwargs["timeout"])
        return subprocess.CompletedProcess(
            argv, 0, json.dumps({"path": "a.jpg", "caption": "a dog"}) + "\n", ""
        )

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    monkeypatch.setattr(gpu_check, "T0", time.perf_counter() - 100)
    for budget in (160, 110, 1e9):
        gpu_check.command_line(tmp_path, "cpu", 20, gpu_check.Report(budget))
    assert 55 < timeouts[0] <= 60 and timeouts[1:] == [30.0, 180]


def test_each_fp16_row_runs_the_precision_its_label_names():
    """A ``-fp16-`` row is the whole model in FP16 and a ``-fp16-fp32enc-`` row the FP16 decoder
    behind the FP32 encoder (the torch backend's ``fp16=True`` alone is the latter since it became
    the default, so the whole-FP16 rows say ``fp32_encoder=False``); FP32 rows ask for neither.
    The report compares each FP16 row with its FP32 twin by these labels."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    rows = {m["label"]: m["options"] for m in gpu_check.modes("cuda")}
    whole = [label for label in rows if "-fp16-" in label and "-fp32enc-" not in label]
    mixed = [label for label in rows if "-fp16-fp32enc-" in label]
    # whole: eager / graphs x host / device, + prep-nhwc; mixed (with graphs): host / device x
    # the frames on the host / the GPU, + prep-nhwc (+ prep-fused, with triton)
    fused = 1 if importlib.util.find_spec("triton") is not None else 0
    assert len(whole) == 5 and len(mixed) == 5 + fused
    for label in whole:
        assert rows[label]["fp16"] is True and rows[label]["fp32_encoder"] is False, label
    for label in mixed:
        assert rows[label]["fp16"] is True and rows[label]["fp32_encoder"] is True, label
    for label in rows:
        if "-fp32-" in label:
            assert "fp16" not in rows[label] and "fp32_encoder" not in rows[label], label


def test_issue_24s_target_modes_run_first():
    """On a GPU the modes that answer issue 24's targets run first, all of them before any
    extra (a run cut short by --budget-s or a device lease still has them): FP32, then the
    default FP16 (FP16 decoder, FP32 encoder) with the same settings, with CUDA graphs, the
    device search then the host's, the frames on the GPU and on the host, the fused search's
    last, right after its probe; then the gpu tests, the files against memory of
    torch-cuda-fp32-graphs-device and the profiles; then the other modes in their order, the
    compiled search last. On the CPU, where no mode answers a target, the order of before:
    the gpu tests, each mode, the first one's files against memory after it."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    cuda_modes = gpu_check.modes("cuda", compiled=True)
    steps = gpu_check.plan(cuda_modes, gpu_check.FILE_RATE_MODES, gpu_check.PROFILE_MODES)
    names = [(step, mode["label"] if mode else None) for step, mode in steps]
    # with triton installed, the fused search (its bookkeeping in one Triton kernel a step)
    fused = (
        ["torch-cuda-fp32-graphs-device-prep-fused", "torch-cuda-fp16-fp32enc-graphs-device-prep-fused"]
        if importlib.util.find_spec("triton") is not None
        else []
    )
    first = [
        "torch-cuda-fp32-graphs-device",
        "torch-cuda-fp16-fp32enc-graphs-device",
        "torch-cuda-fp32-graphs-device-prep-nhwc",
        "torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc",
        "torch-cuda-fp32-graphs-device-prep",
        "torch-cuda-fp16-fp32enc-graphs-device-prep",
        "torch-cuda-fp32-graphs-host-prep",
        "torch-cuda-fp16-fp32enc-graphs-host-prep",
        "torch-cuda-fp32-graphs-host",
        "torch-cuda-fp16-fp32enc-graphs-host",
    ]
    rest = [
        "torch-cuda-fp32-eager-host",
        "torch-cuda-fp32-eager-device",
        "torch-cuda-fp16-eager-host",
        "torch-cuda-fp16-eager-device",
        "torch-cuda-fp16-graphs-host",
        "torch-cuda-fp16-graphs-device",
        "torch-cuda-fp16-graphs-device-prep-nhwc",
        "torch-cuda-fp32-graphs-device-compiled",
    ]
    # every target mode before the extras: the fused search's probe (in a process of its own)
    # only right before its modes, which it guards; the gpu tests, the files against memory and
    # the profiles (plain and fused FP32 device search, in processes of their own) after them
    assert names == (
        [("mode", label) for label in first]
        + [("fused probe", None)] * bool(fused)
        + [("mode", label) for label in fused]
        + [("gpu tests", None), ("file rate", "torch-cuda-fp32-graphs-device")]
        + [("profile", "torch-cuda-fp32-graphs-device")]
        + [("profile", label) for label in fused[:1]]
        + [("mode", label) for label in rest]
    )
    # a mode after the target modes is profiled right after it
    later = gpu_check.plan(cuda_modes, (), ("torch-cuda-fp32-eager-host",))
    at = later.index(("mode", next(m for m in cuda_modes if m["label"] == "torch-cuda-fp32-eager-host")))
    assert [(step, mode["label"]) for step, mode in later[at : at + 2]] == [
        ("mode", "torch-cuda-fp32-eager-host"),
        ("profile", "torch-cuda-fp32-eager-host"),
    ]
    assert sum(step == "profile" for step, _ in later) == 1
    # the first ones are what their labels say: CUDA graphs, FP32 or the default FP16, the
    # search and where the frames are preprocessed, fused or not
    for mode in [m for step, m in steps if step == "mode" and m["label"] in first]:
        label, options = mode["label"], mode["options"]
        assert options["cuda_graphs"] is True and options["device"] == "cuda", label
        assert options.get("fused_search", False) == label.endswith("-fused"), label
        assert options["search"] == ("host" if "-host" in label else "device"), label
        assert options.get("preprocess", "host") == ("device" if "-prep" in label else "host"), label
        assert options.get("channels_last", False) == label.endswith("-nhwc"), label
        fp16 = "-fp16-fp32enc-" in label
        assert (options.get("fp16", False), options.get("fp32_encoder", False)) == (fp16, fp16), label
    # the rates at batch 64 of the best candidates, among the first modes
    assert {
        "torch-cuda-fp32-graphs-device-prep-nhwc",
        "torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc",
        "torch-cuda-fp32-graphs-device-prep",
        "torch-cuda-fp16-fp32enc-graphs-device-prep",
        *fused,
    } <= set(gpu_check.THROUGHPUT_MODES)
    # the overlap's rows in a few of those: the fused ones (the fastest candidates) and the
    # device search the H200 runs were made with
    assert set(gpu_check.OVERLAP_MODES) == {
        "torch-cuda-fp32-graphs-device-prep-fused",
        "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
        "torch-cuda-fp32-graphs-device",
    } and set(gpu_check.OVERLAP_MODES) <= set(gpu_check.THROUGHPUT_MODES)
    cpu = gpu_check.modes("cpu")
    names = [(step, mode["label"] if mode else None) for step, mode in gpu_check.plan(cpu, [cpu[0]["label"]])]
    assert names == [
        ("gpu tests", None),
        ("mode", "torch-cpu-fp32-eager"),
        ("file rate", "torch-cpu-fp32-eager"),
        ("mode", "torch-cpu-fp32-graphs-emulated"),
        ("mode", "torch-cpu-fp32-eager-device"),
        ("mode", "torch-cpu-fp32-graphs-emulated-device"),
        ("mode", "torch-cpu-fp32-graphs-emulated-device-prep"),
    ]


# benchmarks/README.md's estimates of a GPU run's parts, in seconds (from the 2026-12-04 H200
# timings and guesses: not measured): the start (torch, the photos, the reference captions and
# the conditional probe), a target mode (12 in about 2.5 minutes), another mode (about 1.5
# minutes for the rest), the encoder alone, the copies and the host's preprocessing after the
# gpu tests (seconds each), the files against memory, a profile, the command line
README_ESTIMATES = {
    "start": 20.0,
    "target mode": 150 / 12,
    "other mode": 90 / 12,
    "after the gpu tests": 20.0,
    "file rate": 50.0,
    "profile": 30.0,
    "command line": 60.0,
}


def _estimated_run(gpu_check, budget_s: float, tests_s: float, probe_s: float) -> tuple[list, float]:
    """``main``'s budget rule (a step starts only while no more than ``budget_s`` is spent) over
    the CUDA plan, each step taking README_ESTIMATES' time (the gpu tests ``tests_s``, or
    their time limit, the fused probe ``probe_s``) -> (the steps that start, as plan's names,
    the end in seconds)."""
    cuda_modes = gpu_check.modes("cuda")
    steps = gpu_check.plan(cuda_modes, gpu_check.FILE_RATE_MODES, gpu_check.PROFILE_MODES)
    steps = [(what, m["label"] if m else None) for what, m in steps] + [("command line", None)]
    t, started = README_ESTIMATES["start"], []
    for what, label in steps:
        if t > budget_s:
            continue
        started.append((what, label))
        if what == "mode":
            t += README_ESTIMATES["target mode" if label in gpu_check.TARGET_MODES else "other mode"]
        elif what == "gpu tests":  # cut at their time limit (``run_gpu_tests``)
            least, most = gpu_check.GPU_TESTS_SECONDS
            t += (
                min(tests_s, max(least, min(most, budget_s - t - 60)))
                + README_ESTIMATES["after the gpu tests"]
            )
        else:
            t += probe_s if what == "fused probe" else README_ESTIMATES[what]
    return started, t


@pytest.mark.parametrize("tests_s, probe_s", [(90.0, 30.0), (150.0, 60.0)])
def test_by_the_readmes_estimates_the_budgets_it_names_cover_what_it_says(tests_s, probe_s):
    """benchmarks/README.md's claims, from its own estimates of each part's time (not GPU
    measurements) and the run's order: at the default --budget-s 300 every target mode runs
    (the gpu tests and the fused probe quick or slow); at the 420 s it recommends in a 600 s
    call, the gpu tests and the files against memory too, and the run ends well inside the
    call. With the gpu tests after the first two target modes, 300 s ran 2 or 3 of them."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    targets = [("mode", m["label"]) for m in gpu_check.modes("cuda") if m["label"] in gpu_check.TARGET_MODES]
    assert len(targets) >= 10
    started, _ = _estimated_run(gpu_check, 300.0, tests_s, probe_s)
    assert set(targets) <= set(started)
    started, end = _estimated_run(gpu_check, 420.0, tests_s, probe_s)
    assert {("gpu tests", None), ("file rate", "torch-cuda-fp32-graphs-device")} <= set(started)
    assert end < 460
    readme = (SCRIPT.parent / "README.md").read_text()
    assert "--budget-s 420" in readme and "estimates, not GPU measurements" in readme


def _cuda_result(label, e2e_ms, identical=None, texts=None, frames=None, tensors=None):
    """A GPU mode's result as run_mode gives it, with only what the targets read: beam 3
    batch 1 end to end, the captions (identity to onnxruntime CPU FP32) and the batch-64 rates."""
    row = {"beam": 3, "batch": 1, "calls": 20, "steps_per_call": 12.0, "e2e_p50_ms": e2e_ms}
    row.update(dict.fromkeys(("encoder_p50_ms", "encoder_p95_ms", "step_p50_ms", "step_p95_ms"), 0.5))
    row.update(preprocess_p50_ms=0.1, search_p50_ms=1.0, e2e_p95_ms=e2e_ms + 0.1)
    out = {"label": label, "latency": [row]}
    if texts is not None:
        out["texts"] = texts
        out["captions"] = {"n": len(texts), "identical": identical}
    if frames is not None:
        out["throughput"] = [
            {"batch": 64, "input": what, "calls": 20, "p50_ms": 64e3 / rate, "captions_per_s": rate}
            for what, rate in (("frames", frames), ("tensors", tensors))
        ]
    return out


def test_the_targets_summary_heads_the_report():
    """The report opens with issue 24's three targets, each with the figure and met / not met,
    worked out by hand from these modes (200 captions each; the FP32 modes all keep onnxruntime's
    captions):

    - FP16 against its FP32 twin (same graphs, search, preprocessing): device 197/200 = 98.5%,
      device-prep-nhwc 199/200 = 99.5%, host-prep 196/200 = 98.0% (kept: >= 98%), the whole
      model in FP16 185/200 = 92.5% (not kept). The better FP16: 99.5%, met; the default FP16
      (device) named beside it with 98.5%.
    - beam 3 batch 1 end to end, among the modes that keep the captions: FP32 device 3.0,
      host-prep 2.4, device-prep-nhwc 2.8; FP16 device 2.6, host-prep 2.2, device-prep-nhwc 2.7;
      the whole-FP16 1.0 does not count: 2.2 ms (FP16 host search, frames on the GPU), met.
    - captions/s at batch 64 from frames, among the modes that keep the captions: 4000, 4500,
      4800, 4700; the whole-FP16 6000 does not count: 4800 (FP32 device-prep-nhwc; 9800 from
      tensors), not met."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    fp32 = [f"caption {i}" for i in range(200)]

    def fp16(same):
        return fp32[:same] + ["other"] * (200 - same)

    results = [
        _cuda_result("torch-cuda-fp32-graphs-device", 3.0, 1.0, fp32, 4000.0, 9000.0),
        _cuda_result("torch-cuda-fp16-fp32enc-graphs-device", 2.6, 0.985, fp16(197), 4500.0, 9500.0),
        _cuda_result("torch-cuda-fp32-graphs-device-prep-nhwc", 2.8, 1.0, fp32, 4800.0, 9800.0),
        _cuda_result("torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc", 2.7, 0.99, fp16(199), 4700.0, 9900.0),
        _cuda_result("torch-cuda-fp32-graphs-host-prep", 2.4, 0.99, fp32),
        _cuda_result("torch-cuda-fp16-fp32enc-graphs-host-prep", 2.2, 0.98, fp16(196)),
        _cuda_result("torch-cuda-fp16-graphs-device-prep-nhwc", 1.0, 0.925, fp16(185), 6000.0, 12000.0),
    ]
    e2e, rate, same = gpu_check.targets(results, "cuda")
    assert (e2e["value"], e2e["met"]) == (2.2, True)
    assert e2e["target"].endswith("(torch-cuda-fp16-fp32enc-graphs-host-prep)")
    assert (rate["value"], rate["met"]) == (4800.0, False)
    assert rate["target"].endswith("(torch-cuda-fp32-graphs-device-prep-nhwc)")
    assert rate["detail"] == "from tensors: 9800"
    assert (same["value"], same["met"]) == (0.995, True)
    assert same["target"].endswith("(torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc)")
    assert same["detail"] == (
        "199/200 captions; the default FP16 (torch-cuda-fp16-fp32enc-graphs-device): 98.5% (197/200)"
    )
    data = {
        "device": "cuda",
        "command": "python benchmarks/gpu_check.py",
        "date": "now",
        "seconds": 60.0,
        "partial": True,
        "settings": {"max_length": 20, "warmup": 3, "repeats": 20},
        "environment": {
            "gpu": "NVIDIA H200",
            "cpu": "x86",
            "python": "3.12",
            "platform": "linux",
            "versions": {"torch": "2.11"},
        },
        "photos": {"n": 200, "source": "Flickr8k dev"},
        "reference": {},
        "modes": results,
        "speedups": [],
        "fp16_identity": gpu_check.fp16_identity(results),
        "targets": [e2e, rate, same],
        "skipped": [],
    }
    text = gpu_check.markdown(data)
    assert text.index("## Targets") < text.index("## Machine") < text.index("## Captions")
    assert (
        "| end to end p50 (ms), beam 3 batch 1, CUDA graphs, the fastest mode whose captions stay "
        ">= 98% identical (torch-cuda-fp16-fp32enc-graphs-host-prep) | 2.5 | 2.2 (6 mode(s) that "
        "keep the captions timed) | yes |"
    ) in text
    assert "(torch-cuda-fp32-graphs-device-prep-nhwc) | 5000 | 4800 (from tensors: 9800) | **no** |" in text
    assert "| 98% | 99.5% (199/200 captions; the default FP16" in text
    # the gpu tests come after the target modes: a partial report has not run them yet
    assert "## gpu-marked tests\n\nnot run yet\n" in text


def test_the_rate_target_takes_the_best_in_memory_frames_input():
    """Frames one batch a call, or four with the overlap off and on: the target's figure is the
    best of them (here the overlap's 5,200 of a mode that keeps the captions: met), named in
    its detail beside the rate from tensors; from tensors alone is no figure from frames."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    fp32 = [f"caption {i}" for i in range(200)]
    kept = _cuda_result("torch-cuda-fp32-graphs-device", 3.0, 1.0, fp32, 4000.0, 9000.0)
    kept["throughput"] += [
        {"batch": 64, "input": what, "calls": 5, "p50_ms": 256e3 / r, "captions_per_s": r}
        for what, r in (("frames x4, overlap off", 4100.0), ("frames x4, overlap on", 5200.0))
    ]
    tensors_only = _cuda_result("torch-cuda-fp32-graphs-host", 2.0, 1.0, fp32, 1.0, 8000.0)
    tensors_only["throughput"] = tensors_only["throughput"][1:]
    _, rate, _ = gpu_check.targets([kept, tensors_only], "cuda")
    assert (rate["value"], rate["met"]) == (5200.0, True)
    assert rate["target"].endswith("(torch-cuda-fp32-graphs-device)")
    assert rate["detail"] == "frames x4, overlap on; from tensors: 9000"


def test_a_mode_cut_short_keeps_the_sections_it_finished(default_model_dir, tmp_path):
    """run_mode hands its result to ``checkpoint`` after the captions and after the latency,
    marked unfinished, and the report written there names the mode as begun: a run stopped
    within a mode (a device lease's limit) keeps that mode's captions."""
    import argparse
    import copy

    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    frames = list(np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8))
    args = argparse.Namespace(beams=[3], batches=[1], warmup=0, repeats=1, max_length=4)
    data = {
        "device": "cpu",
        "command": "python benchmarks/gpu_check.py",
        "date": "now",
        "settings": {"max_length": 4, "warmup": 0, "repeats": 1},
        "environment": {"cpu": "x86", "python": "3.11", "platform": "linux", "versions": {}},
        "photos": {"n": 2, "source": "noise"},
        "reference": {},
    }
    report = gpu_check.Report(1e9)
    saved = []

    def checkpoint(result):
        saved.append(copy.deepcopy(result))
        gpu_check.write_report(data, [result], report, "cpu", tmp_path, "r", partial=True)
        if len(saved) == 1:
            saved.append((tmp_path / "r.md").read_text())

    mode = {"label": "torch-cpu-fp32-eager", "options": {"device": "cpu"}}
    result = gpu_check.run_mode(
        mode, default_model_dir, frames, None, None, ["a", "b"], args, report, "cpu", checkpoint
    )
    after_captions, text, after_latency = saved
    assert after_captions["unfinished"] and after_captions["captions"]["n"] == 2
    assert "latency" not in after_captions
    assert "**Partial: written after 0 mode(s), within torch-cpu-fp32-eager;" in text
    assert "| torch-cpu-fp32-eager | - |" in text  # its captions' row
    assert after_latency["unfinished"] and [(r["beam"], r["batch"]) for r in after_latency["latency"]] == [
        (3, 1)
    ]
    assert "unfinished" not in result and result["latency"] == after_latency["latency"]


def test_the_gpu_tests_compile_the_search_only_with_compiled(monkeypatch):
    """``pytest -m gpu`` leaves the compiled search's test out unless --compiled: it compiles
    first (TorchInductor, a cold compile that once outlasted a lease's call), and a gpu-test
    run that outlasts its time limit (at most 150 s) loses every gpu test's result. The
    command's own selection, collected: every gpu test but that one; with --compiled, all."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "1 passed\n", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    report = gpu_check.Report(300.0)
    for compiled in (False, True):
        gpu_check.gpu_tests(report, timeout_s=60, compiled=compiled)
    monkeypatch.undo()  # the collections below run for real
    collected = []
    for command in commands:
        proc = subprocess.run(
            [*command, "--collect-only", "-q", "-q"],  # the command's -v, less two: node ids
            cwd=SCRIPT.parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
        collected.append({line for line in proc.stdout.splitlines() if "::test_" in line})
    plain, compiled_run = collected
    left_out = compiled_run - plain
    assert [t.split("::")[-1] for t in left_out] == [
        "test_the_compiled_search_on_the_gpu_captions_as_the_host_search"
    ]
    assert plain < compiled_run and len(plain) >= 8


def test_gpu_tests_past_their_time_limit_name_the_tests_they_finished(monkeypatch):
    """A ``pytest -m gpu`` run killed at its time limit (at most 150 s in a GPU check) keeps
    what it finished: the skip's reason names each test it ran, with its outcome, from the
    verbose lines pytest writes as each test ends. Those lines as the real command writes
    them (here every gpu test skips: no CUDA) and as a fake run killed midway wrote them."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    written = []
    real_run = subprocess.run  # gpu_check.subprocess is this module: patched below

    def run(command, **kwargs):
        proc = real_run(command, **kwargs)
        written.append(proc.stdout)
        return proc

    def killed(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=written[0].encode())

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    real = gpu_check.gpu_tests(gpu_check.Report(300.0), timeout_s=240)
    assert real is not None and real["returncode"] == 0 and real["counts"].get("skipped", 0) >= 8
    monkeypatch.setattr(gpu_check.subprocess, "run", killed)
    report = gpu_check.Report(300.0)
    assert gpu_check.gpu_tests(report, timeout_s=40) is None
    (skip,) = report.data["skipped"]
    assert skip["item"] == "pytest -m gpu" and skip["reason"].startswith(
        "did not finish in 40 s; finished before: "
    )
    assert "test_torch_cuda_fp16 SKIPPED" in skip["reason"]
    assert "test_cuda_graph_captions_on_the_gpu[True] SKIPPED" in skip["reason"]
    assert skip["reason"].count(" SKIPPED") == real["counts"]["skipped"]


def test_the_encoder_variants_run_each_variant_and_put_the_flags_back(monkeypatch):
    """The encoder alone (``encoder_variants``) on the CPU: IEEE FP32 and FP16 in NCHW and NHWC, the
    BatchNorms folded and apart (TF32 and cuDNN's benchmark are CUDA's), each timed, each measured
    against IEEE FP32 NCHW folded: channels-last and the BatchNorms apart are the same function in
    another order (features within float rounding), FP16 is not; torch's process-wide flags are as
    they were after; the report's section has a row per variant."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    import torch

    monkeypatch.setattr(gpu_check, "ENCODER_BATCHES", (1,))
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(EXAMPLES.glob("*.[jp][pn]g"))]
    conv = torch.backends.cudnn.conv
    before = (torch.backends.cudnn.benchmark, conv.fp32_precision)
    conv.fp32_precision = "tf32"  # not what a variant sets: it must come back
    try:
        rows = gpu_check.encoder_variants(MODEL, frames, "cpu", gpu_check.Report(1e9), repeats=1)
        assert (torch.backends.cudnn.benchmark, conv.fp32_precision) == (before[0], "tf32")
    finally:
        conv.fp32_precision = before[1]
    by = {(r["layout"], r["math"], r["form"]): r for r in rows}
    assert sorted(by) == [
        (layout, math, form)
        for layout in ("nchw", "nhwc")
        for math in ("fp16", "ieee")
        for form in ("apart", "folded")
    ]
    assert all(r["batch"] == 1 and not r["benchmark"] and r["p50_ms"] > 0 for r in rows)
    assert {r["form"]: r["batch_norms"] for r in rows} == {"folded": 0, "apart": 49}
    assert by[("nchw", "ieee", "folded")]["max_abs_diff"] == 0  # the reference
    assert 0 < by[("nchw", "ieee", "apart")]["relative_diff"] < 1e-4  # the same function, rounded apart
    assert by[("nhwc", "ieee", "folded")]["relative_diff"] < 1e-4  # 0 where oneDNN orders it alike
    assert 1e-4 < by[("nchw", "fp16", "folded")]["relative_diff"] < 0.1
    text = "\n".join(gpu_check.encoder_lines(rows))
    table = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 8 and sum("| folded |" in line for line in table) == 4
    assert gpu_check.encoder_lines([]) == []


def test_the_uploads_time_each_copy_and_check_the_kept_buffer_s_copy(monkeypatch):
    """The host-to-GPU copies (``uploads``) on the CPU: each batch size and input with the fresh
    and the kept stack, alone and with the copy, every one timed, and the report's section a
    row each; a kept buffer whose copy is not the fresh stack's is reported."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap.backends.staging import Staging

    monkeypatch.setattr(gpu_check, "UPLOAD_BATCHES", (1, 3))
    monkeypatch.setattr(gpu_check, "CAMERA_FRAME", (12, 16, 3))
    report = gpu_check.Report(1e9)
    rows = gpu_check.uploads("cpu", report, repeats=2)
    assert report.data["skipped"] == []
    variants = ["fresh stack only", "kept stack only", "fresh", "kept"]
    assert [(r["batch"], r["input"], r["variant"]) for r in rows] == [
        (b, what, v) for b in (1, 3) for what in ("preprocessed", "frames") for v in variants
    ]
    assert all(r["p50_ms"] > 0 for r in rows)
    # 3 x 224 x 224 float32 = 602,112 bytes an image; 12 x 16 x 3 bytes a frame
    assert {(r["batch"], r["input"]): r["mb"] for r in rows} == {
        (1, "preprocessed"): 0.6,
        (1, "frames"): 0.0,
        (3, "preprocessed"): 1.81,
        (3, "frames"): 0.0,
    }
    text = "\n".join(gpu_check.upload_lines(rows))
    assert "## Host-to-GPU copies" in text
    assert len([line for line in text.splitlines() if line.startswith(("| 1 |", "| 3 |"))]) == 16
    assert gpu_check.upload_lines([]) == []

    def upload_of_zeros(self, host):
        return host.clone().zero_()

    monkeypatch.setattr(Staging, "upload", upload_of_zeros)
    report = gpu_check.Report(1e9)
    gpu_check.uploads("cpu", report, repeats=1)
    assert [s["item"] for s in report.data["skipped"]] == [
        f"uploads {what} batch {b}" for b in (1, 3) for what in ("preprocessed", "frames")
    ]


def test_the_decode_forms_time_one_graph_against_the_parts(default_model_dir, monkeypatch):
    """``decode_forms`` on the CPU (a stand-in graph whose conditional node the host decides):
    per batch, the mode's Captioner (one graph, conditional nodes) and a second one of the same
    mode in parts, both captured and timed, the same captions and steps; the report's section a
    row per batch; where this PyTorch has no conditional nodes, skipped, saying so."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner
    from edgecap.backends import torch_graphs
    from edgecap.decoding.device import DecodeGraphs

    IfEagerGraph = _if_eager_graph()
    forms = []
    real = DecodeGraphs._capture_graphs

    def spy(self, plan, tensors, inputs, lms, conditional):
        forms.append((plan.n_images, conditional is not None))
        return real(self, plan, tensors, inputs, lms, conditional)

    monkeypatch.setattr(DecodeGraphs, "_capture_graphs", spy)
    monkeypatch.setattr(torch_graphs, "conditional_nodes", lambda: True)
    options = {"device": "cpu", "graph_factory": IfEagerGraph, "search": "device"}
    mode = {"label": "torch-cpu-graphs-device", "options": options}
    cap = Captioner(default_model_dir, backend="torch", beam_size=3, **options)
    frames = gpu_check.C.example_frames()
    args = argparse.Namespace(warmup=1, repeats=2, max_length=20)
    out = gpu_check.decode_forms(cap, default_model_dir, mode, frames, args, batches=(1, 2))
    assert out["conditional_error"] is None
    # the two forms at batch 1 and 2, then a fresh Captioner's warm_up at 1 and 8
    assert sorted(forms[:4]) == [(1, False), (1, True), (2, False), (2, True)]
    assert [(w["batch"], w["plans"]) for w in out["warm_up"]] == [(1, 3), (8, 3)]
    assert all(w["seconds"] > 0 for w in out["warm_up"])
    rows = out["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["calls"] == 2 and r["same_captions"]
        assert r["steps_parts"] == r["steps_one_graph"] <= 20
        assert r["parts_p50_ms"] > 0 and r["one_graph_p50_ms"] > 0
        assert r["parts_over_one_graph"] == pytest.approx(r["parts_p50_ms"] / r["one_graph_p50_ms"])
    text = "\n".join(gpu_check.decode_form_lines([{"label": mode["label"], "decode_forms": out}]))
    assert "## The whole decode: one graph with conditional nodes" in text
    assert "batch 1 " in text and "(3 plans beyond its caption's); batch 8 " in text
    assert len([line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]) == 2
    assert gpu_check.decode_form_lines([{"label": "x"}]) == []

    # conditional nodes turned off for the run (the probe failed): the graphs offer none
    plain_options = {**options, "graph_factory": torch_graphs.EagerGraph}
    plain = Captioner(default_model_dir, backend="torch", **plain_options)
    plain_mode = {**mode, "options": plain_options}
    off = gpu_check.decode_forms(plain, default_model_dir, plain_mode, frames, args, batches=(1,))
    assert "off in this run" in off["skipped"]
    monkeypatch.setattr(torch_graphs, "conditional_nodes", lambda: False)
    skipped = gpu_check.decode_forms(cap, default_model_dir, mode, frames, args, batches=(1,))
    assert "no CUDA graph conditional nodes" in skipped["skipped"]
    text = "\n".join(gpu_check.decode_form_lines([{"label": mode["label"], "decode_forms": skipped}]))
    assert "not timed: torch" in text


# kernel names as the CUDA profiler reports them (PyTorch's, cuBLAS's, cuDNN's, Triton's), and
# the kind each is: a GPU run's profile sorted into what could be fused or sped up
KERNEL_NAMES = (
    (
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(at::cuda::detail::T)",
        "top-k / sort",
    ),
    (
        "void at::native::bitonicSortKVInPlace<-2, -1, 16, 16, float, long, at::native::LTOp>(...)",
        "top-k / sort",
    ),
    ("sm90_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x128x32_warpgroupsize1x1x1", "matrix product"),
    (
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false>(...)",
        "matrix product",
    ),
    (
        "void cudnn::bn_fw_inf_1C11_kernel_NCHW<float, float, true, 1>(float, float, cudnnTensorStruct)",
        "batch norm",
    ),
    (
        "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, 0, int>(...)",
        "convolution",
    ),
    ("sm90_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nhwckrsc_nchw_tilesize64x32x64", "convolution"),
    (
        "void at::native::(anonymous namespace)::indexSelectSmallIndex<float, long, unsigned int, 2, 2, -2>",
        "index / gather / scatter",
    ),
    ("_bookkeeping", "Triton kernel"),
    ("_ratio", "Triton kernel"),
    ("_shift", "Triton kernel"),
    ("Memcpy HtoD (Pinned -> Device)", "copy / fill"),
    (
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>, int>>",
        "reduction / softmax",
    ),
    (
        "void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
        "reduction / softmax",
    ),
    (
        "void at::native::vectorized_elementwise_kernel<4, at::native::tanh_kernel_cuda(...)>",
        "element-wise / other",
    ),
)


def test_the_host_preprocessing_runs_keep_each_others_rows(monkeypatch):
    """``prep_threads``' two runs (a process each, the allocator as it comes and kept): a run
    that times out, fails or whose allocator refused to keep freed memory is skipped with its
    reason, and the other run's rows stay; rows are labelled by what the run did."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def fake(kept_answer=True, timeout=False, fail=False):
        def run(command, **kwargs):
            kept = "--keep-freed-memory" in command
            if kept and timeout:
                raise subprocess.TimeoutExpired(command, kwargs["timeout"])
            if kept and fail:
                return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nMemoryError")
            folder = Path(command[command.index("--out") + 1])
            row = {"threads": 0, "frames": 8, "call_ms": 1.0, "frames_per_s": 8e3, "speedup": 1.0}
            data = {
                "memory": "kept" if kept and kept_answer else "default",
                "kept_freed_memory": kept_answer if kept else None,
                "threads": [{**row, "faults_per_frame": None}],
            }
            (folder / "frame_prep.json").write_text(json.dumps(data))
            return subprocess.CompletedProcess(command, 0, "", "")

        return run

    for case, expected_skip in (
        ({}, None),
        ({"kept_answer": False}, "refused"),
        ({"timeout": True}, "did not end"),
        ({"fail": True}, "MemoryError"),
    ):
        monkeypatch.setattr(gpu_check.subprocess, "run", fake(**case))
        report = gpu_check.Report(1e9)
        rows = gpu_check.prep_threads(report, quick=True)
        kinds = [r["memory"] for r in rows]
        if expected_skip is None:
            assert kinds == ["default", "kept"] and report.data["skipped"] == []
        else:
            assert kinds == ["default"], case
            ((item, reason),) = [(s["item"], s["reason"]) for s in report.data["skipped"]]
            assert item == "host preprocessing in threads (kept)" and expected_skip in reason, case
    # faults not counted (Windows): a dash in the table, not "None"
    assert "| default | 0 | 8 | 1 | 8000 | 1 | - |" in "\n".join(gpu_check.prep_thread_lines(rows))


def test_each_kernel_is_sorted_into_its_kind():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    if importlib.util.find_spec("triton") is not None:  # the fused search's kernels need it
        from edgecap.decoding import lm_kernels, step_kernels

        # every kernel of the fused search's language models and decoder step is one of its
        # Triton kernels
        names = [*lm_kernels._kernels(), *step_kernels._kernels()]
        assert len(names) == 8 and {gpu_check.kernel_kind(name) for name in names} == {"Triton kernel"}

    assert [gpu_check.kernel_kind(name) for name, _ in KERNEL_NAMES] == [kind for _, kind in KERNEL_NAMES]


def test_the_cpu_profile_counts_the_operations_that_compute_not_views():
    """On the CPU the profile's stand-in for kernels: torch operations, less the views and
    allocations (no kernel on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    x = torch.randn(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x.t().unsqueeze(0).squeeze(0).view(8, 8).mm(x).tanh()
    names = {name for name, _ in gpu_check._profiled(prof, cuda=False)}
    assert {"aten::mm", "aten::tanh"} <= names
    assert not names & {"aten::t", "aten::transpose", "aten::as_strided", "aten::view", "aten::unsqueeze"}
    assert not names & {"aten::squeeze", "aten::empty", "aten::resolve_conj"}


def test_a_profile_that_fails_or_hangs_is_skipped_with_its_reason(default_model_dir, monkeypatch):
    """The profile runs in a process of its own: one that exits with an error or outlasts its
    time gives no rows, and the report's skips say which and why."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    report = gpu_check.Report(300.0)
    missing = {"label": "torch-cpu-no-such-mode"}
    assert gpu_check.profile_mode(missing, default_model_dir, "cpu", 20, report, (1,), 1) is None
    mode = gpu_check.modes("cpu")[0]
    assert gpu_check.profile_mode(mode, default_model_dir, "cpu", 20, report, (1,), 1, timeout_s=0.5) is None
    reasons = {s["item"]: s["reason"] for s in report.data["skipped"]}
    assert reasons["torch-cpu-no-such-mode profile"].startswith("the profile exited with 1: StopIteration")
    assert reasons[f"{mode['label']} profile"] == "it did not finish in 0 s"

    # its time: the default, or what is left of the budget, at least 30 s
    given = []

    def hangs(command, timeout, **kwargs):
        given.append(timeout)
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(gpu_check.subprocess, "run", hangs)
    for budget in (1e6, 0.0):
        report = gpu_check.Report(budget)
        assert gpu_check.profile_mode(mode, default_model_dir, "cpu", 20, report, (1,), 1) is None
    assert given == [120.0, 30.0]
    assert report.data["skipped"][-1]["reason"] == "it did not finish in 30 s"


def test_the_profile_says_where_a_calls_time_goes(default_model_dir):
    """``profile_calls`` on the CPU (the torch operations' self times stand in for the GPU's
    kernels): per batch, the operations of a call of the device search by kind and the longest,
    whose figures add up; the report's section a summary and two tables per batch."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner

    cap = Captioner(default_model_dir, backend="torch", device="cpu", search="device", beam_size=3)
    frames = gpu_check.C.example_frames()
    args = argparse.Namespace(max_length=20)
    rows = gpu_check.profile_calls(cap, frames, args, cuda=False, batches=(1, 2), calls=2)
    assert [(r["batch"], r["calls"]) for r in rows] == [(1, 2), (2, 2)]
    for r in rows:
        assert r["wall_ms"] > 0 and r["wall_unprofiled_ms"] > 0
        # a beam-3 caption of the shipped model: a hundred operations a step, over ten steps
        assert r["kernels_per_call"] > 1000
        kinds = {k["kind"]: k for k in r["kinds"]}
        assert sum(k["kernels"] for k in r["kinds"]) == pytest.approx(r["kernels_per_call"])
        assert sum(k["ms"] for k in r["kinds"]) == pytest.approx(r["kernel_ms_per_call"])
        # the encoder's convolutions, the steps' matrix products, top-k and gathers
        for kind in ("convolution", "matrix product", "top-k / sort", "index / gather / scatter"):
            assert kinds[kind]["kernels"] > 0 and kinds[kind]["ms"] > 0
        assert [k["ms"] for k in r["kinds"]] == sorted((k["ms"] for k in r["kinds"]), reverse=True)
        top = r["top"]
        assert len(top) == gpu_check.PROFILE_TOP
        assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
        assert all(t["name"].startswith("aten::") for t in top)
        for t in top:
            assert t["mean_us"] == pytest.approx(t["ms"] * 1e3 / t["kernels"])
        assert sum(t["ms"] for t in top) <= r["kernel_ms_per_call"] * (1 + 1e-9)
    # the device search's operations grow with its steps, not with the images of a batch
    assert rows[1]["kernels_per_call"] < 2 * rows[0]["kernels_per_call"]
    text = "\n".join(gpu_check.profile_lines([{"label": "torch-cpu", "profile": rows}, {"label": "x"}]))
    assert "## Where one call's time goes (torch.profiler)" in text
    assert "torch-cpu, batch 1, 2 calls: " in text and "torch-cpu, batch 2, 2 calls: " in text
    assert text.count("| kind | kernels a call |") == 2 and text.count("| longest kernels |") == 2
    assert gpu_check.profile_lines([{"label": "x"}]) == []


def test_the_conditional_probe_runs_its_script_and_turns_conditionals_off_unless_it_agrees(
    default_model_dir, monkeypatch, capsys
):
    """``probe_conditionals``: its script (run here in this process, on the CPU, a stand-in
    graph whose conditional node the host decides) captions the example photos with the one
    graph and with the parts and prints both; from its output the probe keeps conditional
    nodes on where the one graph was captured and agrees, and otherwise turns them off for the
    run (``EDGECAP_GRAPH_CONDITIONALS=0``) and says why: other captions, no one graph, a
    failed or hung process. No probe where PyTorch has no conditional nodes or the variable
    is already 0."""
    import json

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    import edgecap
    from edgecap.backends import torch_graphs

    IfEagerGraph = _if_eager_graph()

    real_captioner = edgecap.Captioner

    def on_the_cpu(model, **options):
        assert options == {"backend": "torch", "device": "cuda", "search": "device", "cuda_graphs": True}
        return real_captioner(
            model, backend="torch", device="cpu", search="device", graph_factory=IfEagerGraph
        )

    photos = sorted(str(p) for p in gpu_check.C.EXAMPLES.iterdir() if p.suffix in {".png", ".jpg"})
    monkeypatch.setattr(edgecap, "Captioner", on_the_cpu)
    forms = json.dumps([["one graph", {}, True], ["parts", {}, False]])
    monkeypatch.setattr(sys, "argv", ["probe", str(default_model_dir), forms, *photos])
    exec(gpu_check.PROBE, {"__name__": "__main__"})
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one, parts = printed["one graph"], printed["parts"]
    assert one["conditional"] and not parts["conditional"] and one["error"] is None
    assert one["texts"] == parts["texts"] and len(one["texts"]) == 2 and len(one["texts"][0]) == 4
    assert one["steps"] == parts["steps"] and one["made"] == parts["made"] == 1

    monkeypatch.setattr(torch_graphs, "conditional_nodes", lambda: True)
    variable = torch_graphs.CONDITIONALS_VARIABLE

    def probe(**kwargs):
        commands = _fake_probe_process(monkeypatch, gpu_check, **kwargs)
        report = gpu_check.Report(1e9)
        result = gpu_check.probe_conditionals(default_model_dir, report)
        assert commands[0][1:3] == ["-c", gpu_check.PROBE] and commands[0][4] == forms
        assert commands[0][5:] == photos
        return result, report.data["skipped"], os.environ.get(variable)

    agreeing = json.dumps(printed)
    result, skipped, env = probe(stdout=agreeing)
    assert result["ok"] and skipped == [] and env is None
    result, skipped, env = probe(stdout="a warning on stdout\n" + agreeing)  # the last line is the result
    assert result["ok"] and env is None
    other = {**printed, "parts": {**parts, "texts": [["x"] * 4] * 2}}
    not_captured = {**printed, "one graph": {**one, "conditional": False, "error": "RuntimeError: no"}}
    not_offered = {**printed, "one graph": {**one, "conditional": False, "error": None}}
    nothing_made = {**printed, "one graph": {**one, "made": 0}}
    for kwargs, why in (
        ({"stdout": json.dumps(other)}, "the one graph's captions differ from the parts'"),
        ({"stdout": json.dumps(not_captured)}, "the one graph could not be captured (RuntimeError: no)"),
        ({"returncode": 1, "stderr": "Traceback\nRuntimeError: CUDA error"}, "exited with 1: RuntimeError"),
        # its captions printed, then a crash (at the graphs' teardown, say)
        ({"stdout": agreeing, "returncode": -11, "stderr": "Segmentation fault"}, "exited with -11"),
        ({"stdout": json.dumps(not_offered)}, "the one graph could not be captured (None)"),
        ({"stdout": json.dumps(nothing_made)}, "the one graph could not be captured (None)"),
        ({"stdout": "Traceback\nRuntimeError"}, "the probe printed no result"),
        ({"stdout": ""}, "the probe printed no result"),
        ({"stdout": '{"parts": {}}'}, "the probe printed no result (KeyError"),
        ({"stdout": "{not json"}, "the probe printed no result (JSONDecodeError"),
        ({"hang": True}, "did not finish in 120 s"),
    ):
        result, skipped, env = probe(**kwargs)
        assert not result["ok"] and why in result["reason"] and env == "0"
        assert [s["item"] for s in skipped] == ["conditional nodes"] and why in skipped[0]["reason"]
        text = "\n".join(gpu_check.decode_form_lines([], result))
        assert "**failed**" in text and why in text
    monkeypatch.setenv(variable, "0")
    report = gpu_check.Report(1e9)
    assert gpu_check.probe_conditionals(default_model_dir, report) is None
    assert "EDGECAP_GRAPH_CONDITIONALS=0" in report.data["skipped"][0]["reason"]
    monkeypatch.setattr(torch_graphs, "conditional_nodes", lambda: False)
    assert gpu_check.probe_conditionals(default_model_dir, gpu_check.Report(1e9)) is None


def _fake_probe_process(monkeypatch, gpu_check, stdout="", returncode=0, stderr="", hang=False) -> list:
    """The probe's subprocess stood in for: it prints ``stdout`` (and ``stderr``) and exits with
    ``returncode``, or hangs past its timeout; conditional nodes on. -> the list each command
    run is appended to."""
    import subprocess
    import types

    from edgecap.backends import torch_graphs

    commands: list = []

    def run(command, **kwargs):
        commands.append(command)
        if hang:
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return types.SimpleNamespace(returncode=returncode, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    monkeypatch.delenv(torch_graphs.CONDITIONALS_VARIABLE, raising=False)
    return commands


def _if_eager_graph():
    """``EagerGraph`` with conditional nodes that the host decides at each run (a stand-in for
    ``CudaGraphs.conditional`` on the CPU)."""
    from edgecap.backends.torch_graphs import EagerGraph

    class IfEagerGraph(EagerGraph):
        @staticmethod
        def conditional(pred, body) -> None:
            if bool(pred):
                body()

    return IfEagerGraph


@pytest.mark.parametrize("spent, want", [(10.0, 150.0), (140.0, 100.0), (200.0, 90.0), (299.0, 90.0)])
def test_the_gpu_tests_get_90_to_150_s_whatever_the_modes_before_them_took(monkeypatch, spent, want):
    """On a GPU the tests get what is left of --budget-s (300 here) less a minute, at least 90 s
    and at most 150 s: 150 at the start, 100 with 140 s spent, 90 past 150 s (they had been cut
    to 30 s once the target modes before them took three minutes)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    given = []
    monkeypatch.setattr(
        gpu_check, "gpu_tests", lambda report, timeout_s, compiled=False: given.append(timeout_s)
    )
    monkeypatch.setattr(gpu_check, "T0", time.perf_counter() - spent)
    args = gpu_check.parse_args(["--out", "unused"])
    gpu_check.run_gpu_tests(args, gpu_check.Report(args.budget_s), "cuda")
    assert given == [pytest.approx(want, abs=1.0)]


def test_the_fused_probe_runs_the_fused_search_apart_and_skips_its_modes_where_it_fails(
    default_model_dir, monkeypatch
):
    """``probe_fused``: the fused search (its Triton kernels never run on a GPU before) in a
    process of its own, with the fused modes' options: the parts in FP32 and in the default
    FP16 first, then the FP32 one graph (kernels inside conditional nodes) where the plain
    probe kept them on. A precision whose parts give no captions (a crash there, a hang,
    nothing printed) has its fused modes skipped (``fused_skip_reason``) and conditional nodes
    stay as they were; where the parts captioned and only the one graph failed, disagreed or
    crashed, the modes run and conditional nodes are turned off for the run. Its captions are
    compared with the plain probe's parts, and the report says all of it."""
    import json

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap.backends import torch_graphs

    variable = torch_graphs.CONDITIONALS_VARIABLE
    texts = [["a cat", "a dog"]] * 2
    plain = {"one graph": {"texts": texts}, "parts": {"texts": texts}, "ok": True}
    form = {"texts": texts, "conditional": False, "made": 1, "error": None, "steps": 9}
    parts = {"parts": form, "fp16 parts": form}
    agreeing = {**parts, "one graph": {**form, "conditional": True}}
    commands: list = []

    def probe(plain_result, **kwargs):
        ran = _fake_probe_process(monkeypatch, gpu_check, **kwargs)
        report = gpu_check.Report(1e9)
        result = gpu_check.probe_fused(default_model_dir, report, plain_result)
        commands.extend(ran)
        text = "\n".join(gpu_check.fused_probe_lines(result))
        return result, [s["item"] for s in report.data["skipped"]], os.environ.get(variable), text

    fp32 = {"label": "fp32", "options": {"fused_search": True}}
    fp16 = {"label": "fp16", "options": {"fused_search": True, "fp16": True, "fp32_encoder": True}}
    plain_mode = {"label": "plain", "options": {"search": "device"}}

    def skipped_modes(result):
        return [m["label"] for m in (fp32, fp16, plain_mode) if gpu_check.fused_skip_reason(m, result)]

    result, skipped, env, text = probe(plain, stdout=json.dumps(agreeing))
    assert result["ok"] and result["same_as_plain"] and skipped == [] and env is None
    assert skipped_modes(result) == [] and gpu_check.fused_skip_reason(fp32, None) is None
    forms = json.loads(commands[-1][4])
    assert forms == [
        ["parts", {"preprocess": "device", "fused_search": True}, False],
        [
            "fp16 parts",
            {"preprocess": "device", "fused_search": True, "fp16": True, "fp32_encoder": True},
            False,
        ],
        ["one graph", {"preprocess": "device", "fused_search": True}, True],
    ]
    # the fused modes' options are what the probe runs (the modes' own device, search and graphs
    # are the probe's Captioner's)
    fused_modes = [m for m in gpu_check.modes("cuda") if m["options"].get("fused_search")]
    for m in fused_modes:
        precision = "fp16" if m["options"].get("fp16") else "fp32"
        given = {k: v for k, v in m["options"].items() if k not in ("device", "search", "cuda_graphs")}
        assert given == gpu_check.FUSED_PROBE_FORMS[precision][1], m["label"]
    assert "its parts (FP32) captioned; its fp16 parts (FP16) captioned; the one graph captioned" in text
    assert "Its captions are the plain device search's" in text
    # the plain probe turned conditional nodes off (or had none): the parts only
    other = {"parts": {**form, "texts": [["a cat", "a bird"]] * 2}, "fp16 parts": form}
    for plain_result in ({**plain, "ok": False}, None):
        result, skipped, env, _ = probe(plain_result, stdout=json.dumps(other))
        assert [f[0] for f in json.loads(commands[-1][4])] == ["parts", "fp16 parts"]
        assert result["ok"] and env is None and skipped == []
    assert result.get("same_as_plain") is None
    result, _, _, text = probe(plain, stdout=json.dumps({**agreeing, **other}))
    assert result["same_as_plain"] is False and "**are not**" in text
    # the one graph failed, disagreed or crashed after the parts: the modes run, conditional nodes off
    not_captured = {**agreeing, "one graph": {**form, "error": "CUDA error: illegal"}}
    for kwargs, why in (
        ({"stdout": json.dumps(not_captured)}, "the one graph could not be captured (CUDA error: illegal)"),
        (
            {"stdout": json.dumps({**agreeing, "one graph": {**form, "conditional": True, "texts": []}})},
            "differ",
        ),
        (
            {"stdout": json.dumps(parts), "returncode": -6, "stderr": "RuntimeError: CUDA error"},
            "exited with -6",
        ),
    ):
        result, skipped, env, text = probe(plain, **kwargs)
        assert skipped_modes(result) == [] and not result["ok"] and env == "0"
        assert skipped == ["conditional nodes"] and why in result["reason"]
        assert f"**the one graph failed**: {result['reason']}" in text
    # a crash in the FP16 parts: the FP32 fused mode runs, the FP16 one is skipped
    fp32_only = json.dumps({"parts": form})
    result, skipped, env, text = probe(plain, stdout=fp32_only, returncode=-11, stderr="Segmentation fault")
    assert skipped_modes(result) == ["fp16"] and env is None and skipped == []
    assert gpu_check.fused_skip_reason(fp16, result) == (
        "the fused probe's fp16 parts failed: the probe exited with -11: Segmentation fault"
    )
    assert "its parts (FP32) captioned; **its fp16 parts (FP16) failed**" in text
    # no captions at all: both skipped, conditional nodes left as they were
    for kwargs, why in (
        (
            {"returncode": -6, "stderr": "RuntimeError: CUDA error: an illegal memory access"},
            "exited with -6",
        ),
        ({"hang": True}, "did not finish in 180 s"),
        ({"stdout": ""}, "printed no result"),
        (
            {"stdout": json.dumps({"parts": {**form, "texts": []}, "fp16 parts": form}), "plain": None},
            "gave no",
        ),
    ):
        plain_result = kwargs.pop("plain", plain)
        result, skipped, env, text = probe(plain_result, **kwargs)
        assert "fp32" in skipped_modes(result) and env is None and skipped == []
        assert why in gpu_check.fused_skip_reason(fp32, result) and "**its parts (FP32) failed**" in text


def _with_a_fused_stand_in(monkeypatch):
    """gpu_check, its CPU modes ending with a stand-in fused mode (a run's fused probe runs
    before it) -> (gpu_check, that mode)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    fused = {
        "label": "torch-cpu-fp32-fused-stand-in",
        "options": {"device": "cpu", "search": "device", "fused_search": True},
    }
    real_modes = gpu_check.modes
    monkeypatch.setattr(
        gpu_check, "modes", lambda device, compiled=False: real_modes(device, compiled) + [fused]
    )
    return gpu_check, fused


def test_a_run_probes_the_fused_search_before_its_first_mode_and_skips_it_where_the_probe_failed(
    tmp_path, monkeypatch
):
    """``main``: where the run has a fused mode, the fused probe runs (once, before it) and a
    fused mode whose precision's parts failed there is skipped with the probe's reason, its
    other modes run; where the probe passed, the mode runs (here in Triton's interpreter, as
    the tests run it). Stand-ins: a fused mode among the CPU's, the probe's outcome."""
    gpu_check, fused = _with_a_fused_stand_in(monkeypatch)
    probes = []

    def probe_fused(model, report, plain, timeout_s=180.0):
        probes.append(plain)
        return outcome

    monkeypatch.setattr(gpu_check, "probe_fused", probe_fused)
    for outcome, why in (
        (
            {
                "usable": {"fp32": False, "fp16": True},
                "reasons": {"fp32": "the probe exited with -6: CUDA error"},
                "seconds": 1.0,
            },
            "the fused probe's parts failed: the probe exited with -6: CUDA error",
        ),
        ({"usable": {"fp32": True, "fp16": True}, "reasons": {}, "seconds": 1.0}, None),
    ):
        probes.clear()
        out = tmp_path / ("ran" if why is None else "skipped")
        argv = ["--device", "cpu", "--quick", "--n", "2", "--repeats", "1", "--skip-tests", "--out", str(out)]
        argv += ["--flickr8k", str(tmp_path / "none"), "--modes", "torch-cpu-fp32-eager,*stand-in"]
        argv += ["--budget-s", "1e9"]  # not the budget's test: no mode skipped on a busy machine
        assert gpu_check.main(argv) == 0
        data = json.loads((out / "gpu-cpu.json").read_text())
        assert probes == [None] and data["fused_probe"] == outcome
        skipped = {s["item"]: s["reason"] for s in data["skipped"]}
        if why is None:  # it ran
            assert [m["label"] for m in data["modes"]] == ["torch-cpu-fp32-eager", fused["label"]]
            assert fused["label"] not in skipped
        else:
            assert [m["label"] for m in data["modes"]] == ["torch-cpu-fp32-eager"]
            assert why in skipped[fused["label"]]
        assert "## The fused search's first run" in (out / "gpu-cpu.md").read_text()


def test_the_fused_probe_keeps_to_the_budget(tmp_path, monkeypatch):
    """The fused probe starts only within --budget-s, as every other section: past it, it is
    skipped for the budget (it had started anyway, with its fixed 180 s, for modes then all
    skipped for the budget); within it, it gets what is left, at least 30 s and at most 180 s.
    Stand-ins: a fused mode among the CPU's, the probe's subprocess (recording its timeout)."""
    gpu_check, fused = _with_a_fused_stand_in(monkeypatch)
    given = []

    def probe(model, forms, timeout_s):
        given.append(timeout_s)
        return {"parts": {"texts": [["a"]]}, "fp16 parts": {"texts": [["a"]]}, "seconds": 0.0}, None

    monkeypatch.setattr(gpu_check, "_probe", probe)
    argv = ["--device", "cpu", "--quick", "--n", "2", "--repeats", "1", "--skip-tests"]
    argv += ["--out", str(tmp_path), "--flickr8k", str(tmp_path / "none"), "--modes", "*stand-in"]
    assert gpu_check.main(argv + ["--budget-s", "0"]) == 0
    assert given == []  # never started
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    skipped = {s["item"]: s["reason"] for s in data["skipped"]}
    assert skipped["fused probe"].startswith("time budget: ") and "fused_probe" not in data
    # 100 s spent: with --budget-s 160 the 60 s left, with 110 the 30 s floor, with a budget to
    # spare its 180 s
    monkeypatch.setattr(gpu_check, "T0", time.perf_counter() - 100.0)
    for budget in (160.0, 110.0, 1e9):
        gpu_check.probe_fused(tmp_path, gpu_check.Report(budget), None)
    assert given == [pytest.approx(60.0, abs=1.0), 30.0, 180.0]


def test_the_latency_times_the_backends_own_way_with_a_batch(default_model_dir):
    """``latency`` times ``caption_batch`` through a ``SyncTimedBackend`` around the backend: a
    batch must take the backend's own way there, as in a user's call: its ``batch_input`` (the
    torch backend on CUDA stacks into a kept page-locked buffer and copies without blocking; a
    fresh ``np.stack`` and a blocking copy had been timed instead) and its device search's
    deferred unpacking (with the overlap on, as on a GPU). A CPU torch backend given a
    ``Staging``, as on CUDA."""
    import argparse

    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner
    from edgecap.backends.staging import Staging

    cap = Captioner(default_model_dir, backend="torch", device="cpu", search="device", overlap=True)
    backend = cap.backend
    backend.staging = Staging(torch.device("cpu"))
    seen = []
    encode, search = backend.encode, backend.search_on_device
    backend.encode = lambda images: seen.append(("encode", type(images).__name__)) or encode(images)
    backend.search_on_device = lambda *a, **k: seen.append(("search", k.get("deferred"))) or search(*a, **k)
    frames = list(np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8))
    cap.caption_batch(frames[:1])
    assert seen == [("encode", "Tensor"), ("search", True)]  # the user's call
    seen.clear()
    args = argparse.Namespace(beams=[3], batches=[1], warmup=0, repeats=1, max_length=20)
    (row,) = gpu_check.latency(cap, gpu_check.SyncTimedBackend(backend), frames, args)
    assert seen == [("encode", "Tensor"), ("search", True)] and row["encoder_p50_ms"] > 0


def test_the_latency_of_a_graph_search_times_the_step_graphs_runs(default_model_dir):
    """With the search's bookkeeping in the step graph (``search="graph"``, the TensorRT and
    onnxruntime-gpu ``-graph`` rows; here onnxruntime CPU), ``latency`` times each run of the
    beam-step graph as a step (they had reported no step time and 0 steps): as many steps as
    the graph ran, each timed; the sessions' step put back after."""
    import argparse
    from unittest import mock

    pytest.importorskip("onnx")
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner
    from edgecap.backends.ort_beam import OnnxBeamSession

    cap = Captioner(default_model_dir, backend="onnxruntime", search="graph")
    real = OnnxBeamSession.step
    runs = []
    with mock.patch.object(OnnxBeamSession, "step", lambda self, *a: runs.append(1) or real(self, *a)):
        frames = list(np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8))
        args = argparse.Namespace(beams=[3], batches=[2], warmup=0, repeats=2, max_length=20)
        (row,) = gpu_check.latency(cap, gpu_check.SyncTimedBackend(cap.backend), frames, args)
        assert OnnxBeamSession.step.__name__ == "<lambda>"  # (the patch, put back by latency)
    assert row["steps_per_call"] == len(runs) / 2 and len(runs) >= 4
    assert 0 < row["step_p50_ms"] <= row["step_p95_ms"]


class _Ended(BaseException):
    """A stand-in for the process ending within a mode (a CUDA or Triton fault's abort, or a
    hang until a lease's kill): no ``except Exception`` in gpu_check catches it."""


def test_a_run_that_ends_in_its_first_mode_leaves_a_partial_report(tmp_path, monkeypatch):
    """The report is written before the first mode runs (the machine, the run's plan, the
    reference captions), marked partial: on a GPU the run starts with a mode, and a run ended
    within it (a native crash, a hang) had left no gpu.md / gpu.json at all. A CPU mode made a
    target mode, so that it comes first as on a GPU, ends the run at its first caption."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    monkeypatch.setattr(gpu_check, "TARGET_MODES", ("torch-cpu-fp32-eager",))
    real = gpu_check.caption_all

    def caption_all(cap, frames):
        if cap.backend.name == "torch":  # the reference (onnxruntime) captions
            raise _Ended
        return real(cap, frames)

    monkeypatch.setattr(gpu_check, "caption_all", caption_all)
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--n",
        "2",
        "--repeats",
        "1",
        "--skip-tests",
        "--out",
        str(tmp_path),
    ]
    argv += ["--flickr8k", str(tmp_path / "none"), "--modes", "torch-cpu-fp32-eager", "--budget-s", "1e9"]
    with pytest.raises(_Ended):
        gpu_check.main(argv)
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    text = (tmp_path / "gpu-cpu.md").read_text()
    assert data["partial"] is True and data["modes"] == []
    assert data["plan"][0] == "mode torch-cpu-fp32-eager" and data["environment"]["cpu"]
    assert len(data["reference"]["texts"]) == 2
    assert "**Partial: written after 0 mode(s)" in text and "## Machine" in text
    assert "Plan: mode torch-cpu-fp32-eager; " in text


def test_hold_timing_times_captions_with_and_without_a_previous_one(default_model_dir):
    """``hold_timing`` on the CPU, the torch backend with graphs (an eager stand-in) and the
    search on the device: each frame captioned plain and with another frame's caption as the
    previous one, timed in turns, the held ones counted; what a held caption says is that
    previous caption. The report's section a row per mode that has it."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    from edgecap import Captioner

    options = {"device": "cpu", "graph_factory": _if_eager_graph(), "search": "device"}
    cap = Captioner(default_model_dir, backend="torch", beam_size=3, **options)
    frames = gpu_check.C.example_frames()
    args = argparse.Namespace(warmup=1, repeats=2, max_length=20)
    out = gpu_check.hold_timing(cap, frames, args, n=4)
    assert out["frames"] == 4  # the four example photos' captions all differ
    assert out["plain_p50_ms"] > 0 and out["with_previous_p50_ms"] > 0 and out["first_with_previous_ms"] > 0
    assert 0 <= out["held"] <= out["frames"]
    runner = gpu_check.C.reuse_captioner(cap, beam_size=3, batch_size=1, max_length=20)
    said = [runner.caption(f).text for f in frames]
    again = [runner.caption(f, previous=said[(i + 1) % 4]) for i, f in enumerate(frames)]
    assert sum(c.held for c in again) == out["held"]
    assert all(c.text == said[(i + 1) % 4] for i, c in enumerate(again) if c.held)
    text = "\n".join(
        gpu_check.hold_lines([{"label": "torch-cpu-graphs-device", "hold": out}, {"label": "x"}])
    )
    assert "## Holding a caption, beam 3, batch 1" in text
    assert len([line for line in text.splitlines() if line.startswith("| torch-cpu-graphs-device |")]) == 1
    assert gpu_check.hold_lines([{"label": "x"}]) == []


def test_tensorrt_and_onnxruntime_gpu_rows_run_both_searches(monkeypatch):
    """Where TensorRT and onnxruntime's CUDA provider import, each gets a row with the numpy
    search between its steps and a ``-graph`` row with the bookkeeping in the step graph or
    engine; every row's options are its backend class's own (a misspelt one would fail only on
    such a machine)."""
    import types

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    import onnxruntime

    from edgecap.backends import _check_options
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend
    from edgecap.backends.tensorrt import TensorRTBackend

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "tensorrt" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    rows = gpu_check.other_backends("cuda", gpu_check.Report(1e9))
    assert {r["label"]: r["options"]["search"] for r in rows} == {
        "onnxruntime-cuda-fp32": "host",
        "onnxruntime-cuda-fp32-graph": "graph",
        "tensorrt-fp16": "host",
        "tensorrt-fp16-graph": "graph",
    }
    classes = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend}
    for row in rows:
        _check_options(classes[row["backend"]], row["backend"], row["options"])
