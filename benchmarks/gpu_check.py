"""The GPU check in one command: one report, ``results/gpu.md`` + ``results/gpu.json``.

    python benchmarks/gpu_check.py --out benchmarks/results            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick --n 4 --out /tmp/r   # CPU-only (CI)

Run on an NVIDIA H200 (results/gpu.md; the device command is in benchmarks/README.md) and kept
working on CPU-only machines by tests/test_gpu_check.py, which runs the ``--device cpu`` form.

It needs only what the GPU machine's stock Python has (torch with CUDA, numpy, Pillow, onnx,
onnxruntime CPU): it puts the repository on ``sys.path`` itself and skips, naming the reason,
whatever it cannot do (CIDEr without pycocoevalcap, the gpu tests without pytest, TensorRT and
onnxruntime's CUDA provider where they are missing). The report holds, first, issue 24's
targets (8. below), then:

1. the machine: GPU, driver, CUDA, and the versions of torch / onnxruntime / onnx / numpy /
   Pillow;
2. ``pytest -m gpu`` run in a subprocess: passed / failed / skipped counts (the compiled
   search's test only with ``--compiled``: it compiles first), with ``TRITON_INTERPRET=0``
   (the fused search's kernel compiled by Triton); then, on a GPU, the encoder alone
   (``encoder_variants``: batch 1 and 64, NCHW / NHWC x IEEE FP32 / TF32 / FP16 x the
   BatchNorms folded / apart x cuDNN's heuristics / ``cudnn.benchmark``, a CUDA graph's p50
   and the features' distance from IEEE FP32's) and the host-to-GPU copy of a batch
   (``uploads``: batch 1 and 64, the preprocessed images and camera frames, stacked fresh and
   copied from pageable memory, and through the torch backend's kept page-locked buffers,
   ``edgecap.backends.staging``);
3. captions of ``--n`` photos (the Flickr8k dev photos where ``../shared/data/flickr8k`` exists,
   else the package's example photos repeated) by each torch mode (FP32 / FP16 x eager / CUDA
   graphs x the beam search on the host / on the device: ``TorchBackend(search=...)``, with
   graphs and the device search the whole decode is one CUDA graph; and that last mode with
   the frames preprocessed on the GPU, ``preprocess="device"``, then also with the encoder
   channels-last, ``channels_last=True``, FP32 and FP16; the default FP16, the FP16 decoder
   behind the FP32 encoder, with graphs, either search, the frames preprocessed on the host
   or the GPU, and channels-last; FP32 with graphs, the host search and the frames
   preprocessed on the GPU; with triton installed, FP32 and the default FP16 with the device
   search's bookkeeping in one Triton kernel a step, ``fused_search=True``, and the frames
   preprocessed on the GPU) against onnxruntime CPU
   FP32: the identical-caption rate, and CIDEr where references and pycocoevalcap exist; each
   FP16 mode against its FP32 twin;
4. latency, beam 1 and 3 x batch 1 and 8: encoder, one decoder step (host search only), the
   search, end to end (p50 / p95), each mode side by side, what the graphs buy over eager and
   what the device search buys over the host's; timed regions are bracketed by
   ``torch.cuda.synchronize()``; warm-up calls first; in ``DECODE_FORM_MODES`` the whole
   decode as one graph with conditional nodes against the parts with a host check between
   (``decode_forms``: batch 1, 8 and 64, the two alternating call by call);
5. throughput at batch 64, beam 3 (``THROUGHPUT_MODES``): captions/s from in-memory frames and
   from preprocessed tensors, and (``OVERLAP_MODES``) from frames four batches a call with
   ``Captioner.overlap`` off and on; and files against in-memory frames (``FILE_RATE_MODES``, beam 3,
   batch 1, 8 and 64, ``file_rate.measure``): captions/s of JPEG files (the photos written
   once at quality 90) and of the same photos decoded in memory, with no decoding workers and
   with the Captioner's default (the next photos decoded in threads while the GPU works); on
   the CPU with --quick, batch 1 of the first mode with 0 and 2 workers, to keep it working;
   and in ``PROFILE_MODES`` (FP32 with CUDA graphs and the device search, plain and fused with
   the frames on the GPU) where one call's time goes, beam 3, batch 1 and 64 (``profile_calls``,
   ``torch.profiler``, in a process of its own, on the example photos): the kernels and copies
   a call runs, their summed time by kind (``KERNEL_KINDS``: convolution, matrix product,
   top-k / sort, ...) and the longest by name, against the call's wall time: what to fuse or
   speed up next (on the CPU with --quick: the first mode at batch 1, once);
6. peak GPU memory per mode (``torch.cuda.max_memory_allocated``);
7. the same rows for the TensorRT backend and onnxruntime's CUDA provider where they run, each
   with the numpy search and with the bookkeeping in the step graph (``search="graph"``, ``-graph``);
8. issue 24's targets, each with the figure measured and met or not: beam 3 batch 1 end to
   end <= 2.5 ms in the faster precision that keeps >= 98% of the captions, >= 5,000
   captions/s at batch 64 from in-memory frames (in a mode that keeps them too), FP16 >= 98%
   identical to FP32;
9. the command line (``COMMAND_LINE``): ``edgecap caption`` over the JPEG files' folder with
   the torch backend, batch 64, plain and with its GPU flags (``--cuda-graphs``, then also
   ``--precision fp16 --gpu-preprocess``), each in its own process: exit status, wall time
   (start-up and model loading included), and the captions identical to the plain run's; on
   the CPU the plain run only;
10. what was skipped, and why.

``--compiled`` adds the device search compiled by ``torch.compile`` (``compile_search=True``),
last, at beam 3 batch 1 only: each shape compiles first (a step's compile: 25 s cold on a
2-core CPU; the whole-loop compile it replaced did not finish in 184 s on an H200 machine), so
leave it time.

The order (``plan``): on a GPU the probe of conditional nodes (in a process of its own:
``probe_conditionals``); the modes that answer issue 24's targets first (``TARGET_MODES``:
FP32 and the default FP16 with CUDA graphs, the device search then the host's, the frames on
the GPU and on the host, the fused search's last, right after its probe, ``probe_fused``, apart
too: its kernels' first run on the GPU; captions, latency and throughput each), all of them
before any extra; then ``pytest -m gpu`` with the encoder alone, the copies and the host's
preprocessing in threads, the files against memory and the profiles, then the other modes
(eager, the whole model in FP16, TensorRT and onnxruntime-gpu, the compiled search), then the
command line.
The report is written before the first mode (the machine, the plan, the reference captions,
the probe's outcome), then rewritten after each step and each section of a mode, marked
partial (and the mode in progress named, the plan listed) until the end: a run stopped from
outside (a device lease's limit), or ended by a crash or a hang in its first mode, keeps what
it measured.

``--modes`` runs only the modes named (labels or shell patterns, comma-separated), in the run's
order, without the command-line runs: a quick re-measure after a change, e.g.
``--modes 'torch-cuda-fp32-graphs-device*' --skip-tests``.

``--budget-s`` (default 300) bounds the run: a section that would start after it is skipped
with that reason, and a subprocess gets what is left of it (at least 30 s; the gpu tests at
least 90 s), so the whole check ends in a bounded time: at most the budget plus the gpu tests'
90 s. By benchmarks/README.md's estimates (not GPU measurements) every target mode is done by
about 230 s; in a 600 s call use ``--budget-s 420`` (the README says what each budget covers).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gc
import importlib
import importlib.util
import itertools
import os
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (str(REPO), str(BENCH_DIR)):  # a plain checkout, no pip install
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import file_rate  # noqa: E402
from _machine import cores_text  # noqa: E402

# issue 24's: beam 3 batch 1 end to end in the faster precision that keeps >= 98% of the
# captions; captions/s at batch 64 from in-memory frames; FP16 captions identical to FP32's
TARGETS = {"e2e_p50_ms": 2.5, "captions_per_s_b64": 5000.0, "fp16_identical": 0.98}
# the modes that can answer them, measured first and in this order, before every extra (the gpu
# tests, the encoder alone, the copies, the host's preprocessing in threads, the files against
# memory, the profiles), so that a run cut short (--budget-s, a device lease's limit) has them:
# FP32 and the default FP16 (the FP16 decoder behind the FP32 encoder, as ``--precision fp16``)
# with CUDA graphs, the search on the device and on the host, the frames preprocessed on the
# host and on the GPU (and the encoder channels-last); each FP32 mode before its FP16 twin,
# whose captions are compared with it. The first two answer the FP16 target; the device
# search's modes, the batch-64 rate; the host search's, beam 3 batch 1. The fused search's
# last: its probe (``probe_fused``, 30-60 s, a process of its own) comes right before them, so
# that the others do not wait for it
TARGET_MODES = (
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
    "torch-cuda-fp32-graphs-device-prep-fused",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
)
# the least and the most time the gpu tests get (what is left of --budget-s less a minute, in
# between): cut to 30 s, the fused search's tests were what a run lost
GPU_TESTS_SECONDS = (90.0, 150.0)
THROUGHPUT_MODES = (
    "torch-cuda-fp32-graphs-host",
    "torch-cuda-fp32-graphs-device",
    "torch-cuda-fp32-graphs-device-prep",
    "torch-cuda-fp32-graphs-device-prep-nhwc",
    "torch-cuda-fp16-graphs-device",
    "torch-cuda-fp16-graphs-device-prep-nhwc",
    "torch-cuda-fp16-fp32enc-graphs-device",
    "torch-cuda-fp16-fp32enc-graphs-device-prep",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc",
    "torch-cuda-fp32-graphs-device-compiled",
    "torch-cuda-fp32-graphs-device-prep-fused",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
)
# the whole decode as one graph with conditional nodes (the steps after every image is done
# skipped on the device) against the parts with a host check between (``DecodeGraphs``), timed
# side by side in these modes at these batch sizes, beam 3
DECODE_FORM_MODES = ("torch-cuda-fp32-graphs-device-prep-fused",)
DECODE_FORM_BATCHES = (1, 8, 64)
# where one call's time goes (``profile_calls``, torch.profiler over CUDA kernels and copies), in
# these modes at these batch sizes, beam 3: what to fuse or speed up next is read from it
PROFILE_MODES = ("torch-cuda-fp32-graphs-device", "torch-cuda-fp32-graphs-device-prep-fused")
PROFILE_BATCHES = (1, 64)
PROFILE_CALLS = 3
PROFILE_TOP = 12  # the longest kernels listed, by their summed time
# what a kernel (or, on the CPU, a torch operation) is, by its name in lower case: the first
# pattern that matches (cuDNN's convolutions before the matrix products they are made of, top-k
# and sort before the gathers inside their names)
KERNEL_KINDS = (
    ("batch norm", r"bn_fw|batch_norm|batchnorm"),
    ("convolution", r"conv|cudnn|winograd|depthwise|fprop|implicit_gemm"),
    ("top-k / sort", r"topk|sort|radix|bitonic"),
    ("matrix product", r"gemm|gemv|cublas|cutlass|xmma|::mm|addmm|bmm|linear|matmul"),
    # the fused search's own: the bookkeeping's, the language models' and the decoder step's
    # (edgecap.decoding: device_kernel, lm_kernels, step_kernels)
    ("Triton kernel", r"triton|bookkeeping|^_(cell|hidden|shift|ratio|tagged|rows|lstm_input|deep)$"),
    ("reduction / softmax", r"softmax|reduce|norm|::max|::sum|cumsum|scan|::all|::any"),
    ("index / gather / scatter", r"index|gather|scatter|embedding|::take|::where"),
    ("copy / fill", r"copy|memcpy|memset|fill|::cat|::stack|::clone|::contiguous"),
)
# files against in-memory frames (issue 24: the files-to-captions rate close to the in-memory
# rate), with and without decoding workers, at these batch sizes
FILE_RATE_MODES = ("torch-cuda-fp32-graphs-device",)
FILE_RATE_BATCHES = (1, 8, 64)
# the FP16 modes with CUDA graphs that the targets count: all FP16 but the islands (the search
# on the device), and an FP16 decoder behind an FP32 encoder (``fp32_encoder=True``, the
# default: with the word logits FP32, 355-358/360 captions of FP32's in the CPU emulation,
# benchmarks/fp16_emulation.py)
FP16_GRAPH_MODES = (
    "torch-cuda-fp16-graphs-device",
    "torch-cuda-fp16-fp32enc-graphs-device",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
    "torch-cuda-fp16-graphs-device-prep-nhwc",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-nhwc",
    "torch-cuda-fp16-fp32enc-graphs-device-prep",
    "torch-cuda-fp16-fp32enc-graphs-host",
    "torch-cuda-fp16-fp32enc-graphs-host-prep",
)
# ``edgecap caption``'s GPU flags, each run in its own process over the JPEG files (a user's
# command), against the plain torch run's captions
COMMAND_LINE = (
    ("plain", ()),
    ("--cuda-graphs", ("--cuda-graphs",)),
    (
        "--cuda-graphs --precision fp16 --gpu-preprocess",
        ("--cuda-graphs", "--precision", "fp16", "--gpu-preprocess"),
    ),
)
COMMAND_LINE_BATCH = 64
T0 = time.perf_counter()  # the run's start (``main`` sets it again: --budget-s counts from there)


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: cuda where torch sees a GPU, else cpu (CUDA items skipped)",
    )
    C.add_out_argument(p)
    p.add_argument(
        "--name", default=None, help="report file name without suffix (default: gpu, or gpu-cpu on the CPU)"
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--quick", action="store_true", help="fewer photos, repeats and settings (CPU: beam 3 x batch 1 only)"
    )
    p.add_argument("--n", type=int, default=None, help="photos captioned (default: 200; --quick: 48)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed calls per setting (default: 20; --quick: 5)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3; --quick: 1)")
    p.add_argument(
        "--beams",
        default=None,
        help="latency beam sizes, comma-separated (default: 1,3; --device cpu --quick: 3)",
    )
    p.add_argument(
        "--batches",
        default=None,
        help="latency batch sizes, comma-separated (default: 1,8; --device cpu --quick: 1)",
    )
    p.add_argument("--max-length", type=int, default=20, help="most words per caption")
    p.add_argument(
        "--flickr8k",
        type=Path,
        default=C.FLICKR8K,
        help="folder with images/, Flickr_8k.devImages.txt and Flickr8k.token.txt "
        "(absent: the example photos)",
    )
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    p.add_argument(
        "--modes",
        default=None,
        help="only these modes, comma-separated labels or shell patterns (torch-cuda-fp32-graphs-*), "
        "in the run's order, and no command-line runs: a quick re-measure after a change",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also the compiled device search (compile_search=True), last: it compiles per shape "
        "first (the whole-loop compile of before did not finish in 184 s on an H200 machine)",
    )
    p.add_argument(
        "--budget-s", type=float, default=300.0, help="skip sections that would start after this many seconds"
    )
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    cpu_quick = args.quick and args.device == "cpu"
    args.n = args.n if args.n is not None else (48 if args.quick else 200)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.beams = [int(b) for b in (args.beams or ("3" if cpu_quick else "1,3")).split(",")]
    args.batches = [int(b) for b in (args.batches or ("1" if cpu_quick else "1,8")).split(",")]
    return args


class Report:
    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.data: dict = {"skipped": []}

    def skip(self, item: str, reason: str) -> None:
        self.data["skipped"].append({"item": item, "reason": reason})
        log(f"skipped {item}: {reason}")

    def over_budget(self, item: str) -> bool:
        spent = time.perf_counter() - T0
        if spent > self.budget_s:
            self.skip(item, f"time budget: {spent:.0f} s spent of --budget-s {self.budget_s:.0f}")
            return True
        return False

    def timeout(self, most: float, least: float = 30.0) -> float:
        """A subprocess's time limit: what is left of the budget, at least ``least`` and at most
        ``most`` seconds (a section started just within the budget still gets ``least``)."""
        return min(most, max(least, self.budget_s - (time.perf_counter() - T0)))


# -- 1. the machine ------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as exc:  # missing, or broken
        return f"not importable ({type(exc).__name__})"


def environment(device: str, report: Report) -> dict:
    import torch

    machine = C.machine_info()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": machine["cpu"],
        # the decoding workers' rows depend on how many cores this process may run on
        "cores": cores_text(machine),
        "device": device,
        "versions": {m: _version(m) for m in ("torch", "onnxruntime", "onnx", "numpy", "PIL")},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:
        env["onnxruntime_providers"] = f"not importable ({exc})"
    if device != "cuda":
        report.skip("GPU, driver and CUDA versions", "no CUDA device (--device cpu, or torch sees no GPU)")
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(
        gpu=torch.cuda.get_device_name(0),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(),
    )
    smi = shutil.which("nvidia-smi")
    if smi is None:
        report.skip("driver version", "nvidia-smi is not on the PATH")
    else:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            env["nvidia_smi"] = out
            env["driver"] = out.split(",")[1].strip() if "," in out else out
        except Exception as exc:
            report.skip("driver version", f"nvidia-smi failed ({exc})")
    return env


# -- 2. the gpu tests ------------------------------------------------------------------------------

# The whole decode as one CUDA graph with conditional nodes, tried in a process of its own before
# any mode (``probe_conditionals``): the example photos, one graph against the parts, twice
PROBE = """
import json, sys
from edgecap import Captioner
model, forms, photos = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
out = {}
for label, options, conditional in forms:
    cap = Captioner(model, backend="torch", device="cuda", search="device", cuda_graphs=True, **options)
    graphs = cap.backend.device_search.graphs
    graphs.use_conditional(conditional)
    texts = [[c.text for c in cap.caption_batch(photos)] for _ in range(2)]
    out[label] = {"texts": texts, "steps": graphs.last_steps, "error": graphs.conditional_error,
                  "conditional": graphs.conditional is not None, "made": graphs.graphs.made}
    print(json.dumps(out), flush=True)  # after each form: a crash in the next keeps it
"""

# the fused modes' options (``modes``), as the fused probe runs them (``probe_fused``), by the
# precision of the modes each stands for
FUSED_PROBE_FORMS = {
    "fp32": ("parts", {"preprocess": "device", "fused_search": True}),
    "fp16": (
        "fp16 parts",
        {"preprocess": "device", "fused_search": True, "fp16": True, "fp32_encoder": True},
    ),
}


def probe_conditionals(model: Path, report: Report, timeout_s: float = 120.0) -> dict | None:
    """Where this PyTorch has CUDA graph conditional nodes: ``PROBE`` in a subprocess (a
    failure that leaves the GPU unusable, at capture or replay, must not take the run's other
    modes with it). Unless it captured the one graph and gave the parts' captions, conditional
    nodes are turned off for this run (``EDGECAP_GRAPH_CONDITIONALS=0``), and the skip says why."""
    from edgecap.backends import torch_graphs

    if not torch_graphs.conditional_nodes():
        return None
    if not torch_graphs.conditionals_wanted():
        report.skip("conditional nodes", f"{torch_graphs.CONDITIONALS_VARIABLE}=0 in the environment")
        return None
    log("probing CUDA graph conditional nodes in a subprocess")
    result, crash = _probe(model, [("one graph", {}, True), ("parts", {}, False)], timeout_s)
    reason = crash or _one_graph_problem(result)
    result["ok"] = reason is None
    if reason is not None:
        _conditionals_off(result, reason, report)
    return result


def _one_graph_problem(result: dict) -> str | None:
    """Why the probe's one graph does not stand for its parts (None: it does)."""
    try:
        one, parts = result["one graph"], result["parts"]
        if not one["conditional"] or not one["made"]:
            return f"the one graph could not be captured ({one['error']})"
        if one["texts"] != parts["texts"]:
            return "the one graph's captions differ from the parts'"
    except (KeyError, TypeError) as exc:
        return f"the probe printed no result ({type(exc).__name__}: {exc})"
    return None


def _conditionals_off(result: dict, reason: str, report: Report, whose: str = "") -> None:
    """Conditional nodes off for the run (``EDGECAP_GRAPH_CONDITIONALS=0``), ``reason`` kept in
    the probe's ``result`` and said in the report's skips (after ``whose``)."""
    from edgecap.backends import torch_graphs

    os.environ[torch_graphs.CONDITIONALS_VARIABLE] = "0"
    result["reason"] = reason
    report.skip("conditional nodes", f"{whose}{reason}: the run captures the whole decode in parts")


def _probe(model: Path, forms: list[tuple[str, dict, bool]], timeout_s: float) -> tuple[dict, str | None]:
    """``PROBE`` in a subprocess over ``forms`` ((label, Captioner options, conditional nodes
    or the parts), in turn) -> (what it printed last: each finished form's result by label,
    and ``seconds``; why the process failed, or None). A crash keeps the forms finished
    before it (the probe prints after each)."""
    photos = sorted(str(p) for p in C.EXAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg"})
    command = [sys.executable, "-c", PROBE, str(model), json.dumps(forms), *photos]
    t0 = time.perf_counter()
    crash = None
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        stdout = proc.stdout
        if proc.returncode != 0:  # its captions printed or not: a crash at exit counts
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            crash = f"the probe exited with {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired as exc:  # what it printed before: bytes, whatever text=
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        crash = f"the probe did not finish in {timeout_s:.0f} s"
    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(printed[-1]) if printed else {}
    except ValueError as exc:  # a line that is not JSON
        result = {}
        crash = crash or f"the probe printed no result ({type(exc).__name__}: {exc})"
    if not printed and crash is None:
        crash = "the probe printed no result"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result, crash


def probe_fused(model: Path, report: Report, plain: dict | None, timeout_s: float = 180.0) -> dict:
    """The fused search (its Triton kernels never run on a GPU before) through ``PROBE`` in a
    subprocess before this process runs it (``plan``'s "fused probe", before the first fused
    mode), where a kernel that faults would leave the GPU unusable for every later mode: the
    parts in FP32 and in the default FP16 (``FUSED_PROBE_FORMS``), then, where the plain probe
    (``plain``) kept conditional nodes on, the FP32 one graph with its kernels inside them.
    -> the result, with ``usable``: per precision, whether its parts captioned (else
    ``fused_skip_reason`` skips its fused modes, with ``reasons``' reason); ``ok``: all
    forms did; ``same_as_plain``: its FP32 parts' captions the plain probe's. Where only the
    one graph failed (not captured, other captions, or the crash came there), conditional
    nodes are turned off for the run. It is given ``timeout_s`` or what is left of the budget,
    at least 30 s (``main`` starts it only within the budget)."""
    forms = [(label, options, False) for label, options in FUSED_PROBE_FORMS.values()]
    if plain and plain.get("ok"):
        forms.append(("one graph", FUSED_PROBE_FORMS["fp32"][1], True))
    timeout_s = report.timeout(timeout_s)  # within what is left of --budget-s, at least 30 s
    log(f"probing the fused device search in a subprocess (at most {timeout_s:.0f} s)")
    result, crash = _probe(model, forms, timeout_s)
    usable, reasons = {}, {}
    for precision, (label, _) in FUSED_PROBE_FORMS.items():
        texts = result.get(label, {}).get("texts")
        usable[precision] = bool(texts) and all(texts)
        if not usable[precision]:
            reasons[precision] = crash or f"its {label} gave no captions"
    result["usable"], result["reasons"] = usable, reasons
    one_graph = any(label == "one graph" for label, _, _ in forms)
    problem = None
    if one_graph and all(usable.values()):  # the parts ran: the one graph, or the crash after them
        problem = crash or _one_graph_problem({**result, "parts": result.get("parts")})
        if problem is not None:
            _conditionals_off(result, problem, report, whose="the fused search: ")
    result["ok"] = all(usable.values()) and problem is None and crash is None
    if plain and "parts" in plain and "parts" in result:
        result["same_as_plain"] = result["parts"]["texts"] == plain["parts"]["texts"]
    return result


def fused_skip_reason(mode: dict, probe: dict | None) -> str | None:
    """Why a fused mode is not run in this process: its precision's parts gave no captions in
    the fused probe (``probe_fused``); None for another mode, or where the probe did not run."""
    if probe is None or not mode["options"].get("fused_search"):
        return None
    precision = "fp16" if mode["options"].get("fp16") else "fp32"
    if probe["usable"].get(precision, True):
        return None
    return f"the fused probe's {FUSED_PROBE_FORMS[precision][0]} failed: {probe['reasons'][precision]}"


def gpu_tests(report: Report, timeout_s: float, compiled: bool = False) -> dict | None:
    """``pytest -m gpu`` in a subprocess; without ``compiled`` (--compiled) the compiled
    search's test is left out: it compiles first (TorchInductor), which could outlast
    ``timeout_s``. Verbose, so that a run past ``timeout_s`` still names the tests it finished
    and their outcomes (in the skip's reason)."""
    if importlib.util.find_spec("pytest") is None:
        report.skip("pytest -m gpu", "pytest is not installed")
        return None
    # -o addopts=: not the project's options (pyproject.toml: -n 2, pytest-xdist's workers): the
    # few gpu tests run one after another on the one GPU, and a GPU machine's stock Python may
    # have pytest without pytest-xdist
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-o",
        "addopts=",
        "-m",
        "gpu",
        "-v",
        "-p",
        "no:cacheprovider",
        "-rfEs",
        "--tb=line",
        *(() if compiled else ("-k", "not compiled")),
        str(REPO / "tests"),
    ]
    log("running " + " ".join(command[1:]))
    t0 = time.perf_counter()
    # the fused search's kernel compiled by Triton, not run in its interpreter (tests/conftest.py
    # asks for the interpreter unless the environment says otherwise)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or b""  # bytes: what the killed run wrote
        text = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        done = re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text)
        report.skip(
            "pytest -m gpu",
            f"did not finish in {timeout_s:.0f} s"
            + (
                f"; finished before: {', '.join(f'{name} {outcome}' for name, outcome in done)}"
                if done
                else ""
            ),
        )
        return None
    output = proc.stdout + proc.stderr
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    counts = {
        word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", summary
        )
    }
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]
    skips = [line for line in lines if line.startswith("SKIPPED")][:10]
    return {
        "command": "python " + " ".join(command[1:]),
        "returncode": proc.returncode,
        "summary": summary,
        "counts": counts,
        "failures": failures,
        "skip_reasons": skips,
        "output_tail": lines[-40:] if proc.returncode else [],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- photos and references -------------------------------------------------------------------------


def photos(n: int, report: Report, flickr8k: Path) -> tuple[list[str], list[np.ndarray], dict | None, str]:
    """-> (ids, RGB frames, references {id: [captions]} or None, where they came from)."""
    from PIL import Image

    dev_list = flickr8k / "Flickr_8k.devImages.txt"
    token_file = flickr8k / "Flickr8k.token.txt"
    if dev_list.is_file() and (flickr8k / "images").is_dir():
        names = [x.strip() for x in dev_list.read_text().splitlines() if x.strip()][:n]
        # a photo the copy missed is left out (named), not the run's end before its first mode
        missing = [name for name in names if not (flickr8k / "images" / name).is_file()]
        if missing:
            report.skip(
                f"{len(missing)} of the first {len(names)} dev photos",
                f"not in {flickr8k / 'images'} (e.g. {missing[0]}): captioned without them",
            )
            names = [name for name in names if name not in set(missing)]
        if not names:
            sys.exit(f"--flickr8k {flickr8k}: none of its dev photos is in {flickr8k / 'images'}")
        paths = [flickr8k / "images" / name for name in names]
        source = f"Flickr8k dev, first {len(names)} ({flickr8k})"
        refs = _flickr_refs(token_file, set(names))
        if refs is None:
            report.skip("CIDEr", f"no references: {token_file} is absent")
    else:
        examples = [p for p in sorted(C.EXAMPLES.iterdir()) if p.suffix.lower() in {".png", ".jpg", ".jpeg"}]
        paths = [examples[i % len(examples)] for i in range(n)]
        names = [f"{p.name}#{i}" for i, p in enumerate(paths)]
        source = f"the {len(examples)} bundled example photos repeated to {n} ({flickr8k} is absent here)"
        refs = None
        report.skip("CIDEr", f"no references: {flickr8k} (Flickr8k dev) is absent here")
    frames = []
    for path in paths:
        with Image.open(path) as im:
            frames.append(np.asarray(im.convert("RGB")))
    return names, frames, refs, source


def _flickr_refs(token_file: Path, names: set) -> dict | None:
    if not token_file.is_file():
        return None
    refs: dict[str, list[str]] = {}
    for line in token_file.read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        name = key.rpartition("#")[0]
        if name in names:
            refs.setdefault(name, []).append(caption.strip())
    return refs


# -- the modes -----------------------------------------------------------------------------------


def modes(device: str, compiled: bool = False) -> list[dict]:
    """The torch modes measured: label, Captioner keywords. ``-host``: the numpy beam search
    between steps (one device-to-host copy and synchronisation per step); ``-device``: the
    beam search on the device (``edgecap.decoding.device``), with graphs the whole decode as
    one CUDA graph."""
    if device == "cuda":
        out = []
        for precision in ("fp32", "fp16"):
            for graphs in ("eager", "graphs"):
                for search in ("host", "device"):
                    options = {"device": "cuda", "search": search}
                    if precision == "fp16":  # the whole model in FP16 (-fp32enc: the encoder FP32)
                        options.update(fp16=True, fp32_encoder=False)
                    if graphs == "graphs":
                        options["cuda_graphs"] = True
                    out.append({"label": f"torch-cuda-{precision}-{graphs}-{search}", "options": options})
                    if (precision, graphs, search) == ("fp32", "graphs", "host"):
                        # the host search with the frames preprocessed on the GPU
                        out.append(
                            {
                                "label": "torch-cuda-fp32-graphs-host-prep",
                                "options": {**options, "preprocess": "device"},
                            }
                        )
                    if (graphs, search) == ("graphs", "device"):
                        # the frames resized, normalised and checked on the GPU too, and that
                        # with the encoder's convolutions channels-last
                        prep = {**options, "preprocess": "device"}
                        if precision == "fp32":
                            out.append({"label": "torch-cuda-fp32-graphs-device-prep", "options": prep})
                        out.append(
                            {
                                "label": f"torch-cuda-{precision}-graphs-device-prep-nhwc",
                                "options": {**prep, "channels_last": True},
                            }
                        )
        # the FP16 that keeps the captions (the default FP16, as --precision fp16), with CUDA
        # graphs: either search, the frames preprocessed on the host or on the GPU, and with
        # the search on the device the encoder channels-last too
        for search in ("host", "device"):
            options = {"device": "cuda", "search": search, "fp16": True, "fp32_encoder": True}
            options["cuda_graphs"] = True
            label = f"torch-cuda-fp16-fp32enc-graphs-{search}"
            prep = {**options, "preprocess": "device"}
            out += [{"label": label, "options": options}, {"label": f"{label}-prep", "options": prep}]
            if search == "device":
                out.append({"label": f"{label}-prep-nhwc", "options": {**prep, "channels_last": True}})
        # the device search's bookkeeping in one Triton kernel a step (``fused_search``), the
        # frames preprocessed on the GPU, FP32 and the default FP16: where triton is installed
        if importlib.util.find_spec("triton") is not None:
            for precision, extra in (("fp32", {}), ("fp16-fp32enc", {"fp16": True, "fp32_encoder": True})):
                options = {"device": "cuda", "search": "device", "cuda_graphs": True, "preprocess": "device"}
                out.append(
                    {
                        "label": f"torch-cuda-{precision}-graphs-device-prep-fused",
                        "options": {**options, **extra, "fused_search": True},
                    }
                )
        # with --compiled, the search compiled (torch.compile, ``compile_search``), last: each
        # shape compiles first, so only the target's latency setting (beam 3, batch 1), the
        # captions and the throughput
        if compiled:
            out.append(
                {
                    "label": "torch-cuda-fp32-graphs-device-compiled",
                    "options": {
                        "device": "cuda",
                        "search": "device",
                        "cuda_graphs": True,
                        "compile_search": True,
                    },
                    "beams": (3,),
                    "batches": (1,),
                }
            )
        return out
    from edgecap.backends.torch_graphs import EagerGraph

    return [
        {"label": "torch-cpu-fp32-eager", "options": {"device": "cpu"}},
        {
            "label": "torch-cpu-fp32-graphs-emulated",
            "options": {"device": "cpu", "graph_factory": EagerGraph},
        },
        {"label": "torch-cpu-fp32-eager-device", "options": {"device": "cpu", "search": "device"}},
        {
            "label": "torch-cpu-fp32-graphs-emulated-device",
            "options": {"device": "cpu", "graph_factory": EagerGraph, "search": "device"},
        },
        {
            "label": "torch-cpu-fp32-graphs-emulated-device-prep",
            "options": {
                "device": "cpu",
                "graph_factory": EagerGraph,
                "search": "device",
                "preprocess": "device",
            },
        },
    ]


# the searches the TensorRT and onnxruntime-gpu rows run: label suffix, ``search``
OTHER_SEARCHES = (("", "host"), ("-graph", "graph"))


def other_backends(device: str, report: Report) -> list[dict]:
    """TensorRT and onnxruntime's CUDA provider, where they can run: each with the numpy
    search between its steps and with the search's bookkeeping in the step graph or engine
    (``search="graph"``, the ``-graph`` rows)."""
    out = []
    if device != "cuda":
        report.skip("TensorRT and onnxruntime-gpu rows", "no CUDA device")
        return out
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" in providers:
            for suffix, search in OTHER_SEARCHES:
                out.append(
                    {
                        "label": f"onnxruntime-cuda-fp32{suffix}",
                        "backend": "onnxruntime",
                        "options": {"providers": "cuda", "fp16": False, "search": search},
                    }
                )
        else:
            report.skip(
                "onnxruntime CUDA provider rows",
                "this onnxruntime has no "
                f"CUDAExecutionProvider (it has {', '.join(providers)}): the CPU "
                "package, not onnxruntime-gpu",
            )
    except Exception as exc:
        report.skip("onnxruntime CUDA provider rows", f"onnxruntime does not import ({exc})")
    if importlib.util.find_spec("tensorrt") is None:
        report.skip("TensorRT rows", "tensorrt is not installed here")
    else:
        try:
            import tensorrt

            if not isinstance(getattr(tensorrt, "__version__", None), str):
                raise ImportError("only type stubs (tensorrt-stubs), not the library")
            # FP16 engines: the decoder step FP16 behind the FP32 encoder engine (role_precisions)
            for suffix, search in OTHER_SEARCHES:
                out.append(
                    {
                        "label": f"tensorrt-fp16{suffix}",
                        "backend": "tensorrt",
                        "options": {"precision": "fp16", "search": search},
                    }
                )
        except Exception as exc:
            report.skip("TensorRT rows", f"tensorrt does not import ({exc})")
    return out


ENCODER_BATCHES = (1, 64)


def encoder_variants(model: Path, frames: list, device: str, report: Report, repeats: int = 20) -> list[dict]:
    """The encoder's CNN alone (``EfficientNetLite.features``, the shipped model's weights, the
    photos preprocessed as the Captioner does) at batch 1 and 64, in each layout (NCHW, NHWC),
    math (IEEE FP32, TF32 convolutions, FP16), form (its BatchNorms folded into its
    convolutions, as the torch backend runs an FP32 encoder, or apart, as exported:
    ``fold_batch_norms``; ``batch_norms``: how many the variant has)
    and cuDNN's algorithm choice (its heuristics, or ``torch.backends.cudnn.benchmark``, which
    times the algorithms of each shape first; the BatchNorms apart only): p50 ms of a CUDA
    graph's replay, and how far its features are from the folded IEEE FP32 NCHW's (the largest
    absolute difference, and that over the largest absolute value). Where the encoder's time
    could go: it is the largest part of one photo's end to end and of a batch of 64. On the
    CPU (the tests) eager calls, IEEE and FP16 only, no benchmark. The flags are process-wide:
    each is put back after its variant."""
    import copy

    import torch
    from PIL import Image

    from edgecap.backends.torch import TorchBackend
    from edgecap.backends.torch_graphs import conv_fp32_flag
    from edgecap.images import preprocess
    from edgecap.manifest import load_manifest
    from edgecap.models.efficientnet_lite import fold_batch_norms

    manifest = load_manifest(model)
    apart = TorchBackend(manifest, device=device, fold_batch_norms=False).encoder
    assert apart is not None
    nets = {"folded": fold_batch_norms(apart), "apart": apart}
    cuda = device == "cuda"
    cudnn = torch.backends.cudnn
    flag, name, ieee, tf32 = conv_fp32_flag()
    rows: list[dict] = []
    for batch in ENCODER_BATCHES:
        images = [Image.fromarray(frames[i % len(frames)]) for i in range(batch)]
        x32 = torch.from_numpy(preprocess(images, manifest.preprocessing)).to(device)
        reference = None
        for layout, math, form, benchmark in itertools.product(
            ("nchw", "nhwc"), ("ieee", "tf32", "fp16"), ("folded", "apart"), (False, True)
        ):
            if not cuda and (math == "tf32" or benchmark) or (form == "folded" and benchmark):
                continue
            label = f"{layout}-{math}-{form}" + ("-benchmark" if benchmark else "")
            if report.over_budget(f"encoder {label} batch {batch}"):
                return rows
            before = (cudnn.benchmark, getattr(flag, name))
            try:
                cudnn.benchmark = benchmark
                setattr(flag, name, tf32 if math == "tf32" else ieee)
                variant = copy.deepcopy(nets[form])
                x = x32.clone()
                if math == "fp16":
                    variant, x = variant.half(), x.half()
                if layout == "nhwc":
                    variant = variant.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                times, y = _time_encoder(variant, x, cuda, repeats)
            except Exception as exc:  # one variant failing must not lose the others
                report.skip(f"encoder {label} batch {batch}", f"failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                cudnn.benchmark = before[0]
                setattr(flag, name, before[1])
            y = y.float()
            if reference is None:  # the first variant: IEEE FP32, NCHW, folded, heuristics
                reference = y
            diff = float((y - reference).abs().max())
            scale = float(reference.abs().max())
            rows.append(
                {
                    "batch": batch,
                    "layout": layout,
                    "math": math,
                    "form": form,
                    "batch_norms": sum(isinstance(m, torch.nn.BatchNorm2d) for m in variant.modules()),
                    "benchmark": benchmark,
                    "p50_ms": C.median(times),
                    "p95_ms": C.percentile(times, 95),
                    "max_abs_diff": diff,
                    "relative_diff": diff / scale if scale else 0.0,
                }
            )
            log(f"encoder batch {batch} {label}: {rows[-1]['p50_ms']:.3f} ms")
    return rows


UPLOAD_BATCHES = (1, 64)
CAMERA_FRAME = (480, 640, 3)  # a VGA camera's RGB frame, uint8
# the decoding workers' host preprocessing of in-memory frames in threads (``prep_threads``): on
# the H200 (2026-12-04) eight workers gave no more captions/s than none; these say whether the
# host's preprocessing itself scales there
PREP_THREADS = (0, 1, 2, 4, 8, 16)
PREP_FRAMES = 64


def prep_threads(report: Report, quick: bool = False, timeout_s: float = 120) -> list[dict]:
    """``frame_prep.py --threads-only``: ``Captioner._prepare`` (the shipped model's host
    preprocessing, what a decoding worker does for an in-memory frame) of 64 VGA frames in the
    calling thread and in 1-16 threads, at most the cores this process may use, with minor
    page faults a frame; in a process of its own twice: glibc's allocator as it comes, and
    keeping freed memory (``--keep-freed-memory``). On the CPU with --quick: 0 and 2 threads,
    8 frames, once."""
    from edgecap.prefetch import usable_cores  # what the decoding workers' default counts

    threads = [0, 2] if quick else [n for n in PREP_THREADS if n <= max(usable_cores(), 2)]
    command = [sys.executable, str(BENCH_DIR / "frame_prep.py"), "--threads-only"]
    command += ["--threads", ",".join(map(str, threads)), "--thread-batch", str(8 if quick else PREP_FRAMES)]
    command += ["--repeats", str(1 if quick else 5)]
    rows: list[dict] = []
    for memory, extra in (("default", []), ("kept", ["--keep-freed-memory"])):
        item = f"host preprocessing in threads ({memory})"
        if report.over_budget(item):
            break
        # each run on its own: one failing, timing out or refused keeps the other's rows
        with tempfile.TemporaryDirectory() as folder:
            try:
                run = subprocess.run(
                    command + extra + ["--out", folder], capture_output=True, text=True, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                report.skip(item, f"did not end within {timeout_s:.0f} s")
                continue
            if run.returncode != 0:
                report.skip(item, f"exit {run.returncode}: {run.stderr.strip()[-500:]}")
                continue
            try:
                data = json.loads((Path(folder) / "frame_prep.json").read_text())
            except (OSError, ValueError) as exc:
                report.skip(item, f"no results read back ({type(exc).__name__}: {exc})")
                continue
        if memory == "kept" and not data.get("kept_freed_memory"):
            report.skip(item, "the allocator refused (not glibc, or its thresholds set already)")
            continue
        for r in data["threads"]:
            rows.append({**r, "memory": data["memory"]})
            log(
                f"host preprocessing, {data['memory']}, {r['threads']} threads: "
                f"{r['frames_per_s']:.0f} frames/s (x{r['speedup']:.2f})"
            )
    return rows


def uploads(device: str, report: Report, repeats: int = 20, seed: int = 0) -> list[dict]:
    """A batch's host-to-GPU copy from separate arrays, as the torch backend makes it: the
    preprocessed images (float32 (3, 224, 224) each, ``TorchBackend.batch_input``) and camera
    frames (uint8 480 x 640 x 3 each, ``preprocess="device"``), at batch 1 and 64. *fresh*:
    ``np.stack`` into a new array, copied from that pageable memory (what the backend did
    until 2026-12-05); *kept*: ``edgecap.backends.staging`` (what it does on CUDA now): stacked
    into a kept page-locked buffer, copied without blocking. Each to the copy's end
    (synchronised), p50 / p95 ms of wall time, and the stack alone beside them; the copies
    checked equal. On the CPU (the tests) the kept buffer is pageable and the copy a clone."""
    import torch

    from edgecap.backends.staging import Staging

    cuda = device == "cuda"
    target = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(device)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for batch in UPLOAD_BATCHES:
        for what, items in C.batch_arrays(batch, rng, CAMERA_FRAME).items():
            if report.over_budget(f"uploads {what} batch {batch}"):
                return rows
            staging = Staging(target)
            variants = {
                "fresh stack only": functools.partial(np.stack, items),
                "kept stack only": functools.partial(staging.stack, items),
                "fresh": lambda items=items: torch.from_numpy(np.stack(items)).to(target),
                "kept": lambda items=items, staging=staging: staging.upload(staging.stack(items)),
            }
            copies = {}
            for label, call in variants.items():
                try:
                    times = []
                    for rep in range(3 + repeats):
                        _sync()
                        t0 = time.perf_counter()
                        out = call()
                        _sync()
                        if rep >= 3:
                            times.append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:  # one variant failing must not lose the others
                    report.skip(
                        f"uploads {what} batch {batch} {label}", f"failed: {type(exc).__name__}: {exc}"
                    )
                    continue
                if "only" not in label:
                    copies[label] = out
                rows.append(
                    {
                        "batch": batch,
                        "input": what,
                        "variant": label,
                        "mb": round(batch * items[0].nbytes / 1e6, 2),
                        "p50_ms": C.median(times),
                        "p95_ms": C.percentile(times, 95),
                    }
                )
                log(f"upload {what} batch {batch} {label}: {rows[-1]['p50_ms']:.3f} ms")
            if len(copies) == 2 and not torch.equal(copies["kept"], copies["fresh"]):
                report.skip(
                    f"uploads {what} batch {batch}", "the kept buffer's copy differs from the fresh one's"
                )
    return rows


def _time_encoder(net, x, cuda: bool, repeats: int):
    """(ms per call of ``net.features(x)``, its output): on CUDA a graph of it (warmed up
    first), its replays timed with events; on the CPU eager calls."""
    import torch

    with torch.inference_mode():
        if not cuda:
            y = net.features(x)
            times = []
            for _ in range(max(1, repeats // 4)):
                t0 = time.perf_counter()
                y = net.features(x)
                times.append((time.perf_counter() - t0) * 1e3)
            return times, y
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                net.features(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = net.features(x)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times, y.clone()


def select_modes(mode_list: list[dict], patterns: str | None) -> list[dict]:
    """The modes whose labels match one of ``patterns`` (comma-separated labels or shell
    patterns; None: every mode), in their order; a pattern that matches none stops the run,
    naming the labels there are."""
    if not patterns:
        return mode_list
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    labels = [m["label"] for m in mode_list]
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(label, p) for label in labels)]
    if unmatched or not wanted:
        named = ", ".join(unmatched) if unmatched else "(none named)"
        sys.exit(f"--modes: no mode matches {named}; the modes here: {', '.join(labels)}")
    return [m for m in mode_list if any(fnmatch.fnmatchcase(m["label"], p) for p in wanted)]


def plan(mode_list: list[dict], file_rate_labels, profile_labels=()) -> list[tuple[str, dict | None]]:
    """The run's order, as (what, mode) steps: issue 24's target modes first, in
    ``TARGET_MODES``' order, all of them before any extra (a run cut short by --budget-s still
    answers the targets); then the gpu tests (``("gpu tests", None)``, with the encoder alone,
    the copies and the host's preprocessing in threads), then the target modes' files against
    memory (``("file rate", mode)``, for the modes in ``file_rate_labels``) and profiles
    (``("profile", mode)``, ``profile_labels``); then the other modes in their order, each
    followed by its own. The fused search's probe (``("fused probe", None)``, ``probe_fused``)
    comes right before its first mode, which it guards; the command line after all of these
    (``main``)."""
    first = sorted(
        (m for m in mode_list if m["label"] in TARGET_MODES), key=lambda m: TARGET_MODES.index(m["label"])
    )
    extras = (("file rate", file_rate_labels), ("profile", profile_labels))
    steps: list[tuple[str, dict | None]] = [("mode", m) for m in first]
    steps.append(("gpu tests", None))
    steps += [(what, m) for m in first for what, labels in extras if m["label"] in labels]
    for m in (m for m in mode_list if m["label"] not in TARGET_MODES):
        steps.append(("mode", m))
        steps += [(what, m) for what, labels in extras if m["label"] in labels]
    fused = [
        i for i, (what, m) in enumerate(steps) if what == "mode" and m and m["options"].get("fused_search")
    ]
    if fused:
        steps.insert(fused[0], ("fused probe", None))
    return steps


def _sync():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class SyncTimedBackend(C.TimedBackend):
    """``TimedBackend`` whose encode is bracketed by ``torch.cuda.synchronize()`` (an eager CUDA
    encode returns before its kernels finish; each step ends with a device-to-host copy), and
    which passes the search on to the backend's device search where it has one (then no step
    is timed, there being no step on the host, but the step graph's runs where the search's
    bookkeeping is in the graph: ``_graph_steps_timed``), its result unpacked later where the
    backend's is (``defers_unpacking``: a call with the overlap on, as on a GPU, leaves the
    unpacking to the captions' building), so the timed call takes the backend's own way."""

    def __init__(self, inner):
        super().__init__(inner)
        # the beam-step sessions whose steps a graph search's words are (imported here, not
        # in a timed call)
        from edgecap.backends.ort_beam import IOBindingBeamSession, OnnxBeamSession
        from edgecap.backends.tensorrt_beam import TensorRTBeamSession

        self._step_sessions = (OnnxBeamSession, IOBindingBeamSession, TensorRTBeamSession)

    def search_on_device(self, *args, **kwargs):
        inner = getattr(self.inner, "search_on_device", None)
        if inner is None:
            return None
        with self._graph_steps_timed():
            return inner(*args, **kwargs)

    @contextlib.contextmanager
    def _graph_steps_timed(self):
        """Within: each word of a search with its bookkeeping in the step graph or engine
        (``search="graph"``: onnxruntime's beam-step sessions, TensorRT's) timed as a host
        search's step is, the graph's run and its results' way back to the host, into
        ``step_times`` (the session classes' step wrapped, and put back after)."""

        def timed(real):
            def step(session, *args):
                t0 = time.perf_counter()
                result = real(session, *args)
                self.step_times.append(time.perf_counter() - t0)
                return result

            return step

        with C.steps_wrapped(self._step_sessions, timed):
            yield

    @property
    def defers_unpacking(self) -> bool:
        return getattr(self.inner, "defers_unpacking", False)

    def _timed(self, encode, *args):
        _sync()
        t0 = time.perf_counter()
        encoded = encode(*args)
        _sync()
        self.encode_s += time.perf_counter() - t0
        return encoded


def captioner(model: Path, backend: str, options: dict, beam: int, batch: int, max_length: int):
    from edgecap import Captioner

    return Captioner(
        model, backend=backend, beam_size=beam, batch_size=batch, max_length=max_length, **options
    )


def caption_all(cap, frames: list) -> tuple[list[str], float]:
    _sync()
    t0 = time.perf_counter()
    texts = [c.text for c in cap.caption_batch(frames)]
    _sync()
    return texts, time.perf_counter() - t0


def latency(cap, timed: SyncTimedBackend, frames: list, args, mode: dict | None = None) -> list[dict]:
    """Per beam x batch (``args``', or the mode's own ``beams`` / ``batches``)."""
    mode = mode or {}
    rows = []
    for beam in mode.get("beams", args.beams):
        for batch in mode.get("batches", args.batches):
            runner = C.reuse_captioner(cap, beam_size=beam, batch_size=batch, max_length=args.max_length)
            runner.backend = timed
            images = [frames[i % len(frames)] for i in range(batch)]
            encoder, steps, e2e, pre, decode, device_steps = [], [], [], [], [], []
            graphs = getattr(getattr(timed.inner, "device_search", None), "graphs", None)
            for rep in range(args.warmup + args.repeats):
                timed.reset()
                _sync()
                t0 = time.perf_counter()
                captions = runner.caption_batch(images)
                _sync()
                ms = (time.perf_counter() - t0) * 1e3
                if rep < args.warmup:
                    continue
                e2e.append(ms)
                if graphs is not None and not timed.step_times:  # the decode graphs ran
                    device_steps.append(graphs.last_steps)
                encoder.append(timed.encode_s * 1e3)
                steps.extend(s * 1e3 for s in timed.step_times)
                pre.append(sum(c.timings["preprocess_ms"] for c in captions))
                decode.append(sum(c.timings["decode_ms"] for c in captions))
            rows.append(
                {
                    "beam": beam,
                    "batch": batch,
                    "calls": len(e2e),
                    "encoder_p50_ms": C.percentile(encoder, 50),
                    "encoder_p95_ms": C.percentile(encoder, 95),
                    "step_p50_ms": C.percentile(steps, 50),
                    "step_p95_ms": C.percentile(steps, 95),
                    # host steps, or the steps the decode graphs ran (they stop at the first
                    # check after every image is done)
                    "steps_per_call": (
                        sum(device_steps) / len(device_steps)
                        if device_steps
                        else len(steps) / max(len(e2e), 1)
                    ),
                    "preprocess_p50_ms": C.percentile(pre, 50),
                    "search_p50_ms": C.percentile(decode, 50),
                    "e2e_p50_ms": C.percentile(e2e, 50),
                    "e2e_p95_ms": C.percentile(e2e, 95),
                }
            )
    return rows


HOLD_FRAMES = 16  # frames timed with and without a previous caption (``hold_timing``)
# the modes it runs in: the FP32 device search with graphs, plain and fused, and the fused FP16
HOLD_MODES = (
    "torch-cuda-fp32-graphs-device",
    "torch-cuda-fp32-graphs-device-prep-fused",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
)


def hold_timing(cap, frames: list, args, n: int = HOLD_FRAMES) -> dict:
    """Holding a caption on this mode, beam 3, batch 1: ``caption(frame)`` against
    ``caption(frame, previous=...)`` with another frame's caption as the previous one (so the
    previous caption is scored on the frame: the decoder run once more over its words),
    taking turns, one round to warm up and one timed; the first call with a previous caption
    timed apart (on a graphed backend it captures the hold pass's step graphs, one shape per
    batch size, which ``warm_up(..., hold=True)`` would capture beforehand)."""
    runner = C.reuse_captioner(cap, beam_size=3, batch_size=1, max_length=args.max_length)
    images = [frames[i % len(frames)] for i in range(max(n, 2))]
    said = [c.text for c in runner.caption_batch(images)]
    others = [said[(i + 1) % len(images)] for i in range(len(images))]
    pairs = [(img, prev) for img, prev, own in zip(images, others, said) if prev != own] or [
        (images[0], "a dog")
    ]

    def timed(image, previous=None) -> tuple[float, object]:
        _sync()
        t0 = time.perf_counter()
        caption = runner.caption(image, previous=previous)
        _sync()
        return (time.perf_counter() - t0) * 1e3, caption

    first_ms, _ = timed(*pairs[0])
    plain, holding, held = [], [], 0
    for rep in range(2):
        for image, previous in pairs:
            ms_plain, _ = timed(image)
            ms_held, caption = timed(image, previous)
            if rep == 1:
                plain.append(ms_plain)
                holding.append(ms_held)
                held += bool(caption.held)
    return {
        "frames": len(pairs),
        "first_with_previous_ms": first_ms,
        "plain_p50_ms": C.percentile(plain, 50),
        "with_previous_p50_ms": C.percentile(holding, 50),
        "held": held,
    }


def hold_lines(results: list[dict]) -> list[str]:
    """The report's section on holding a caption (``hold_timing``), [] where no mode has it."""
    rows = [
        [
            r["label"],
            h["frames"],
            h["plain_p50_ms"],
            h["with_previous_p50_ms"],
            h["first_with_previous_ms"],
            h["held"],
        ]
        for r in results
        if (h := r.get("hold"))
    ]
    if not rows:
        return []
    return [
        "",
        "## Holding a caption, beam 3, batch 1",
        "",
        C.markdown_table(
            [
                "mode",
                "frames",
                "caption p50 (ms)",
                "with previous p50 (ms)",
                "first with previous (ms)",
                "held",
            ],
            rows,
        ),
        "",
        "`caption(frame)` against `caption(frame, previous=...)`, another frame's caption as the "
        "previous one (scored on the frame: the decoder run once more over its words), taking "
        "turns; the first call with a previous caption apart (a graphed backend may capture a "
        "step graph for its rows then).",
    ]


def run_mode(
    mode: dict,
    model: Path,
    frames: list,
    reference: list[str] | None,
    refs,
    ids,
    args,
    report: Report,
    device: str,
    checkpoint=None,
) -> dict:
    """One mode's captions, latency and throughput (where in ``THROUGHPUT_MODES``);
    ``checkpoint(result)`` after each (the report rewritten with what is measured so far: a run
    stopped within a mode keeps the mode's sections it finished, the mode marked unfinished)."""
    import torch

    label, backend = mode["label"], mode.get("backend", "torch")
    result: dict = {
        "label": label,
        "backend": backend,
        "options": {
            k: (getattr(v, "__name__", v) if k == "graph_factory" else v) for k, v in mode["options"].items()
        },
    }
    cuda = device == "cuda"
    save = checkpoint or (lambda result: None)
    if cuda:
        _release()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cap = captioner(model, backend, mode["options"], 3, 8, args.max_length)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    timed = SyncTimedBackend(cap.backend)
    result["describe"] = timed.describe()
    log(f"{label}: {result['describe']}")
    if not report.over_budget(f"{label} captions"):
        texts, seconds = caption_all(cap, frames)
        result["captions"] = {
            "n": len(texts),
            "seconds": round(seconds, 2),
            "images_per_s": len(texts) / seconds if seconds else None,
            "examples": texts[:3],
        }
        if reference is not None:
            same = sum(a == b for a, b in zip(texts, reference))
            result["captions"].update(
                identical=same / len(texts),
                identical_n=same,
                differing=[
                    {"id": i, "this": a, "ort_cpu_fp32": b}
                    for i, a, b in zip(ids, texts, reference)
                    if a != b
                ][:5],
            )
        result["captions"]["cider"] = cider(refs, ids, texts)
        result["texts"] = texts
    result["unfinished"] = True
    save(result)
    if not report.over_budget(f"{label} latency"):
        result["latency"] = latency(cap, timed, frames, args, mode)
        save(result)
    if cuda and label in DECODE_FORM_MODES and not report.over_budget(f"{label} decode forms"):
        result["decode_forms"] = decode_forms(cap, model, mode, frames, args)
        save(result)
    if cuda and mode["label"] in THROUGHPUT_MODES and not report.over_budget(f"{label} throughput"):
        result["throughput"] = throughput(cap, frames, args, overlap=mode["label"] in OVERLAP_MODES)
        save(result)
    if cuda and mode["label"] in HOLD_MODES and not report.over_budget(f"{label} hold"):
        result["hold"] = hold_timing(cap, frames, args)
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del result["unfinished"]
    return result


def _release() -> None:
    """Free the last mode's GPU memory: its backend (a cycle: backend -> its device search ->
    backend) is freed by the collector, not by reference counts: collect it, or its weights
    and graph pools count in the next mode's peak."""
    import torch

    _sync()
    gc.collect()
    torch.cuda.empty_cache()


def file_rate_step(mode: dict, result: dict | None, model: Path, files: list[Path], args, report, device):
    """Files against in-memory frames for ``mode``, whose ``result`` (from ``run_mode``) gets
    them as ``file_rate``: a Captioner of its own (the mode's ran earlier, and this one runs
    after the target modes and the gpu tests)."""
    label = mode["label"]
    if result is None:
        report.skip(f"{label} files against memory", "its mode did not run")
        return
    if report.over_budget(f"{label} files against memory"):
        return
    if device == "cuda":
        _release()
    cap = captioner(model, mode.get("backend", "torch"), mode["options"], 3, 8, args.max_length)
    result["file_rate"] = files_against_memory(cap, files, device == "cuda")


_CIDER_NOTE: dict = {}


def cider(refs: dict | None, ids: list[str], texts: list[str]) -> float | None:
    if refs is None:
        return None
    if "skip" in _CIDER_NOTE:
        return None
    try:
        from edgecap.evaluation.metrics import java_available, score

        tokenizer = "ptb" if java_available() else "simple"
        _CIDER_NOTE.setdefault("tokenizer", tokenizer)
        hyps = {i: t for i, t in zip(ids, texts) if i in refs}
        return score({i: refs[i] for i in hyps}, hyps, tokenizer=tokenizer, metrics=("CIDEr",))["CIDEr"]
    except ImportError as exc:
        _CIDER_NOTE["skip"] = f"pycocoevalcap does not import ({exc})"
        return None


# -- the report ----------------------------------------------------------------------------------


def fp16_identity(results: list[dict]) -> list[dict]:
    """Each FP16 mode's captions against the FP32 mode of the same graphs and search."""
    by = {r["label"]: r for r in results}
    out = []
    for label, r in by.items():
        twin = by.get(re.sub(r"-fp16(-fp32enc)?-", "-fp32-", label))
        if "-fp16-" not in label or twin is None or "texts" not in r or "texts" not in twin:
            continue
        same = sum(a == b for a, b in zip(r["texts"], twin["texts"]))
        out.append(
            {
                "fp16": label,
                "fp32": twin["label"],
                "n": len(r["texts"]),
                "identical_n": same,
                "identical": same / max(len(r["texts"]), 1),
            }
        )
    return out


def _row(result: dict | None, beam: int, batch: int) -> dict | None:
    if result is None:
        return None
    return next((x for x in result.get("latency", []) if x["beam"] == beam and x["batch"] == batch), None)


def targets(results: list[dict], device: str, identity: list[dict] | None = None) -> list[dict]:
    """Issue 24's targets: beam 3 batch 1 end to end in the faster precision whose captions
    stay >= 98% identical (FP32: to onnxruntime CPU FP32; FP16: to FP32), captions/s at batch
    64 from in-memory frames in a mode that keeps them too, FP16 identical to FP32 (the FP16
    modes with CUDA graphs, the better one). Each: ``value`` (None: not measured), ``met``,
    ``detail`` (what goes with the figure)."""
    by = {r["label"]: r for r in results}
    identity = identity if identity is not None else fp16_identity(results)
    fp16 = {i["fp16"]: i for i in identity if i["fp16"] in FP16_GRAPH_MODES}
    same = {label: i["identical"] for label, i in fp16.items()}
    fp16_best = max(((v, k) for k, v in same.items()), default=None)
    fp16_same = None if fp16_best is None else fp16_best[0]
    keeps = {  # the modes that keep the captions: FP32 with graphs, either search, compiled or not
        r["label"]
        for r in results
        if r["label"].startswith("torch-cuda-fp32-graphs")
        and r.get("captions", {}).get("identical", 0) >= TARGETS["fp16_identical"]
    } | {label for label, value in same.items() if value >= TARGETS["fp16_identical"]}
    kept = [(_row(by[label], 3, 1)["e2e_p50_ms"], label) for label in keeps if _row(by[label], 3, 1)]
    best = min(kept) if kept else None
    out = [
        {
            "target": "end to end p50 (ms), beam 3 batch 1, CUDA graphs, the fastest mode "
            "whose captions stay >= 98% identical" + ("" if best is None else f" ({best[1]})"),
            "limit": TARGETS["e2e_p50_ms"],
            "value": None if best is None else best[0],
            "met": None if best is None else best[0] <= TARGETS["e2e_p50_ms"],
            "detail": f"{len(kept)} mode(s) that keep the captions timed",
        }
    ]
    rates = {  # label -> {input: captions/s} at batch 64
        r["label"]: {t["input"]: t["captions_per_s"] for t in r.get("throughput", []) if t["batch"] == 64}
        for r in results
    }
    # in-memory frames: one batch a call, or several with or without the overlap (the best)
    framed = [
        (max(rate for what, rate in v.items() if what.startswith("frames")), label)
        for label, v in rates.items()
        if any(what.startswith("frames") for what in v)
    ]
    rate = max(((v, label) for v, label in framed if label in keeps), default=None)
    if rate is not None:
        best = max((r, what) for what, r in rates[rate[1]].items() if what.startswith("frames"))[1]
        detail = "; ".join(
            ([] if best == "frames" else [best])
            + ([f"from tensors: {rates[rate[1]]['tensors']:.0f}"] if "tensors" in rates[rate[1]] else [])
        )
    elif framed:  # measured, but in no mode that keeps the captions
        detail = "none of the modes that keep the captions; of any mode: {:.0f} ({})".format(*max(framed))
    else:
        detail = ""
    out.append(
        {
            "target": "captions/s at batch 64, in-memory frames, the fastest mode whose captions "
            "stay >= 98% identical" + ("" if rate is None else f" ({rate[1]})"),
            "limit": TARGETS["captions_per_s_b64"],
            "value": None if rate is None else rate[0],
            "met": None if rate is None else rate[0] >= TARGETS["captions_per_s_b64"],
            "detail": detail,
        }
    )
    detail = ""
    if fp16_best is not None:
        i = fp16[fp16_best[1]]
        detail = f"{i['identical_n']}/{i['n']} captions"
        default = fp16.get("torch-cuda-fp16-fp32enc-graphs-device")
        if default is not None and default["fp16"] != fp16_best[1]:
            detail += (
                f"; the default FP16 ({default['fp16']}): {default['identical']:.1%} "
                f"({default['identical_n']}/{default['n']})"
            )
    out.append(
        {
            "target": "FP16 captions identical to FP32 (CUDA graphs, the better FP16)"
            + ("" if fp16_best is None else f" ({fp16_best[1]})"),
            "limit": TARGETS["fp16_identical"],
            "value": fp16_same,
            "met": None if fp16_same is None else fp16_same >= TARGETS["fp16_identical"],
            "detail": detail,
        }
    )
    if device != "cuda":
        for t in out:
            t["note"] = "not measured on a GPU: no CUDA device"
    return out


OVERLAP_BATCHES = 4  # batches a call in the throughput's overlap rows
# the modes whose throughput has those rows (each adds about 10 calls of four batches: not
# every mode, so that the target modes fit the budget)
OVERLAP_MODES = (
    "torch-cuda-fp32-graphs-device",
    "torch-cuda-fp32-graphs-device-prep-fused",
    "torch-cuda-fp16-fp32enc-graphs-device-prep-fused",
)


def decode_forms(cap, model: Path, mode: dict, frames: list, args, batches=DECODE_FORM_BATCHES) -> dict:
    """The whole decode as one graph with conditional nodes (``cap``'s, where this PyTorch has
    them) against the parts with a host check between (a second Captioner of the same mode,
    ``DecodeGraphs.use_conditional(False)``): per batch, beam 3, ``caption_batch`` of in-memory
    frames end to end, the two alternating call by call (which goes first alternates too),
    p50 ms, the steps each ran and whether the captions are the same. Where ``cap`` captured
    the parts after all (``conditional_error``) both columns time the parts."""
    import torch

    from edgecap.backends.torch_graphs import conditional_nodes

    graphs = getattr(getattr(cap.backend, "device_search", None), "graphs", None)
    if graphs is None:
        return {"skipped": "this mode has no whole-decode graphs"}
    if not conditional_nodes():
        return {"skipped": f"torch {torch.__version__} has no CUDA graph conditional nodes"}
    if getattr(graphs.capture, "conditional", None) is None:
        return {"skipped": "conditional nodes are off in this run (EDGECAP_GRAPH_CONDITIONALS=0)"}
    other = captioner(model, mode.get("backend", "torch"), mode["options"], 3, 8, args.max_length)
    other.backend.device_search.graphs.use_conditional(False)
    forms = {"one graph": cap, "parts": other}
    rows = []
    for batch in batches:
        runners = {
            name: C.reuse_captioner(c, beam_size=3, batch_size=batch, max_length=args.max_length)
            for name, c in forms.items()
        }
        images = [frames[i % len(frames)] for i in range(batch)]
        times: dict = {name: [] for name in forms}
        steps: dict = {name: [] for name in forms}
        texts: dict = {}
        for rep in range(args.warmup + args.repeats):
            for name in list(forms)[:: 1 if rep % 2 else -1]:
                _sync()
                t0 = time.perf_counter()
                captions = runners[name].caption_batch(images)
                _sync()
                ms = (time.perf_counter() - t0) * 1e3
                texts[name] = [c.text for c in captions]
                if rep >= args.warmup:
                    times[name].append(ms)
                    steps[name].append(runners[name].backend.device_search.graphs.last_steps)
        one, parts = (C.percentile(times[name], 50) for name in ("one graph", "parts"))
        rows.append(
            {
                "batch": batch,
                "calls": len(times["parts"]),
                "parts_p50_ms": parts,
                "one_graph_p50_ms": one,
                "parts_over_one_graph": parts / one if one else None,
                "steps_parts": sum(steps["parts"]) / len(steps["parts"]),
                "steps_one_graph": sum(steps["one graph"]) / len(steps["one graph"]),
                "same_captions": texts["one graph"] == texts["parts"],
            }
        )
    del other, forms, runners
    _release()
    # what a camera loop's first frames would meet, met up front (``Captioner.warm_up``): a
    # fresh Captioner of this mode, batch 1 and 8, VGA frames
    fresh = captioner(model, mode.get("backend", "torch"), mode["options"], 3, 8, args.max_length)
    _sync()
    warmed = fresh.warm_up((1, 8), frame_size=(480, 640))
    _sync()
    warm_up = [{"batch": b, "seconds": r["seconds"], "plans": r["plans"]} for b, r in sorted(warmed.items())]
    del fresh
    _release()
    return {"rows": rows, "conditional_error": graphs.conditional_error, "warm_up": warm_up}


def kernel_kind(name: str) -> str:
    """``KERNEL_KINDS``' kind of a kernel or operation named ``name``; "element-wise / other"
    where none matches."""
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "element-wise / other"


def _short_name(name: str, width: int = 100) -> str:
    """A kernel's name for a table cell: "void " and the argument list dropped, whitespace
    collapsed, no "|" (a cell's edge), at most ``width`` characters."""
    name = re.sub(r"^void ", "", " ".join(name.split()))
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


# torch operations that return a view or only allocate: no kernel on a GPU (the profiler gives
# names only, so the views are named here beside _common's allocations)
_NO_KERNEL_CPU_OPS = C.NO_KERNEL_OPS | frozenset(
    "as_strided view reshape _reshape_alias _unsafe_view expand slice select unsqueeze squeeze "
    "transpose t permute alias detach lift_fresh unbind split narrow chunk resolve_conj "
    "resolve_neg result_type item".split()
)


def _profiled(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of each kernel and copy the GPU ran under the profiler ``prof``; on
    the CPU (the tests' stand-in) each torch operation that is not a view or an allocation, with
    its self time (an operation made of others counts too: more operations than a GPU's
    kernels)."""
    from torch.autograd import DeviceType

    events = prof.events()
    if cuda:
        cuda_type = DeviceType.CUDA
        return [(e.name, float(e.time_range.elapsed_us())) for e in events if e.device_type == cuda_type]
    return [
        (e.name, float(e.self_cpu_time_total))
        for e in events
        if e.device_type == DeviceType.CPU
        and e.name.startswith("aten::")
        and e.name.removeprefix("aten::") not in _NO_KERNEL_CPU_OPS
    ]


def _wall_ms(runner, images: list, calls: int) -> list[float]:
    """``calls`` calls of ``runner.caption_batch(images)``, each's wall ms (synchronised)."""
    walls = []
    for _ in range(calls):
        _sync()
        t0 = time.perf_counter()
        runner.caption_batch(images)
        _sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    return walls


# ``profile_calls`` in a process of its own (``profile_mode``): argv the benchmarks folder, the
# model, the mode's label, the device, max length, the batch sizes (comma-separated), the calls
PROFILE = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import gpu_check
model, label, device, max_length = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
batches, calls = [int(b) for b in sys.argv[6].split(",")], int(sys.argv[7])
mode = next(m for m in gpu_check.modes(device) if m["label"] == label)
cap = gpu_check.captioner(model, mode.get("backend", "torch"), mode["options"], 3, 8, max_length)
rows = gpu_check.profile_calls(cap, gpu_check.C.example_frames(), argparse.Namespace(max_length=max_length),
                               device == "cuda", batches, calls)
print(json.dumps(rows))
"""


def profile_mode(
    mode: dict,
    model: Path,
    device: str,
    max_length: int,
    report: Report,
    batches=PROFILE_BATCHES,
    calls: int = PROFILE_CALLS,
    timeout_s: float = 120.0,
) -> list[dict] | None:
    """``profile_calls`` for ``mode`` on the example photos, in a subprocess: the profiler
    inside CUDA graphs (conditional nodes, a Triton kernel) is the least tried part of the
    run, and a crash or a hang there must not take the rest of the report with it; it is given
    ``timeout_s`` or what is left of the budget, at least 30 s. None, and the skip says why,
    where it failed."""
    label = mode["label"]
    timeout_s = report.timeout(timeout_s)  # within what is left of --budget-s, at least 30 s
    command = [sys.executable, "-c", PROFILE, str(BENCH_DIR), str(model), label, device, str(max_length)]
    command += [",".join(map(str, batches)), str(calls)]
    log(f"{label}: profiling batch {', '.join(map(str, batches))} in a subprocess")
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        report.skip(f"{label} profile", f"it did not finish in {timeout_s:.0f} s")
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        report.skip(f"{label} profile", f"the profile exited with {proc.returncode}: {tail}")
        return None
    try:
        return json.loads(lines[-1])
    except ValueError as exc:
        report.skip(f"{label} profile", f"it printed no result ({exc})")
        return None


def profile_calls(
    cap, frames: list, args, cuda: bool, batches=PROFILE_BATCHES, calls: int = PROFILE_CALLS
) -> list[dict]:
    """Where one call's time goes: per batch, beam 3, ``calls`` calls of ``caption_batch`` on
    in-memory frames under ``torch.profiler`` (CPU and CUDA activity), after one call that
    captures whatever the batch needs and ``calls`` calls timed without the profiler: per call,
    the kernels and copies the GPU ran, their summed time (kernels on several streams may
    overlap), by kind (``KERNEL_KINDS``) and the ``PROFILE_TOP`` longest by name; the wall time
    with and without the profiler. A profile that records no kernel (the profiler blind to a
    CUDA graph's kernels) says so by its zero. On the CPU (the tests) the torch operations'
    self times stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    import torch

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    for batch in batches:
        runner = C.reuse_captioner(cap, beam_size=3, batch_size=batch, max_length=args.max_length)
        images = [frames[i % len(frames)] for i in range(batch)]
        runner.caption_batch(images)  # captures and first runs before any timing
        plain = _wall_ms(runner, images, calls)
        with torch.no_grad(), profile(activities=activities) as prof:
            walls = _wall_ms(runner, images, calls)
        events = _profiled(prof, cuda)
        kinds: dict[str, list] = {}
        names: dict[str, list] = {}
        for name, us in events:
            for table, key in ((kinds, kernel_kind(name)), (names, name)):
                entry = table.setdefault(key, [0, 0.0])
                entry[0] += 1
                entry[1] += us
        total_us = sum(us for _, us in events)
        top = sorted(names.items(), key=lambda item: -item[1][1])[:PROFILE_TOP]
        rows.append(
            {
                "batch": batch,
                "calls": calls,
                "wall_ms": C.median(walls),
                "wall_unprofiled_ms": C.median(plain),
                "kernels_per_call": len(events) / calls,
                "kernel_ms_per_call": total_us / calls / 1e3,
                "kinds": [
                    {"kind": kind, "kernels": n / calls, "ms": us / calls / 1e3}
                    for kind, (n, us) in sorted(kinds.items(), key=lambda item: -item[1][1])
                ],
                "top": [
                    {
                        "name": _short_name(name),
                        "kernels": n / calls,
                        "ms": us / calls / 1e3,
                        "mean_us": us / n,
                    }
                    for name, (n, us) in top
                ],
            }
        )
    return rows


def throughput(cap, frames: list, args, batch: int = 64, overlap: bool = True) -> list[dict]:
    """Captions/s at ``batch``, beam 3: from in-memory frames (``caption_batch``: preprocessing
    on the host, encoder, search), from preprocessed tensors (encoder and search only), and from
    frames ``OVERLAP_BATCHES`` batches a call with ``Captioner.overlap`` off and on (a batch's
    host work after its search done while the next is searched; at most 5 timed calls each),
    where ``overlap``."""
    from edgecap.decoding import search
    from edgecap.images import load_rgb, preprocess

    runner = C.reuse_captioner(cap, beam_size=3, batch_size=batch, max_length=args.max_length)
    images = [frames[i % len(frames)] for i in range(batch)]
    tensors = np.stack([preprocess([load_rgb(f, "rgb")], cap.manifest.preprocessing)[0] for f in images])

    def from_tensors():
        encoded = runner.backend.encode(tensors)
        search(
            runner.backend,
            encoded,
            runner.options,
            runner.vocab.start,
            runner.vocab.end,
            len(runner.vocab),
            runner.classes,
            runner.fusion,
        )

    several = images * OVERLAP_BATCHES

    def overlapped(on: bool):
        runner.overlap = on
        runner.caption_batch(several)

    out = []
    inputs = [
        ("frames", lambda: runner.caption_batch(images), batch, args.repeats),
        ("tensors", from_tensors, batch, args.repeats),
    ]
    if overlap:
        inputs += [
            (
                f"frames x{OVERLAP_BATCHES}, overlap {o}",
                functools.partial(overlapped, o == "on"),
                len(several),
                min(args.repeats, 5),
            )
            for o in ("off", "on")
        ]
    for what, call, n, repeats in inputs:
        times = []
        warm = args.warmup if n == batch else min(args.warmup, 1)  # the calls of 4 batches: fewer
        for rep in range(warm + repeats):
            _sync()
            t0 = time.perf_counter()
            call()
            _sync()
            if rep >= warm:
                times.append(time.perf_counter() - t0)
        median = float(np.median(times))
        out.append(
            {
                "batch": batch,
                "input": what,
                "calls": len(times),
                "p50_ms": median * 1e3,
                "captions_per_s": n / median,
            }
        )
    return out


def jpeg_files(frames: list, folder: Path) -> list[Path]:
    """The photos as JPEG files (quality 90), one per distinct frame, repeated as ``frames`` is."""
    from PIL import Image

    written: dict[int, Path] = {}
    for frame in frames:
        if id(frame) not in written:
            written[id(frame)] = folder / f"photo{len(written)}.jpg"
            Image.fromarray(frame).save(written[id(frame)], quality=90)
    return [written[id(frame)] for frame in frames]


def files_against_memory(cap, files: list[Path], cuda: bool) -> list[dict]:
    """``file_rate.measure``: captions/s of the JPEG files and of the same photos decoded in
    memory, beam 3, with no decoding workers and with the Captioner's default (on the CPU: 2,
    the CPU's default being none)."""
    if cuda:
        return file_rate.measure(
            cap,
            [0, None],
            files,
            file_rate.decoded(files),
            list(FILE_RATE_BATCHES),
            rounds=3,
            beam=3,
            sync=_sync,
        )
    return file_rate.measure(cap, [0, 2], files, file_rate.decoded(files), [1], rounds=1, beam=3)


def command_line(
    folder: Path, device: str, max_length: int, report: Report, timeout_s: float = 180
) -> list[dict]:
    """``edgecap caption FOLDER --backend torch --device DEVICE --batch-size 64 --json`` plain
    and with each of ``COMMAND_LINE``'s flags (on the CPU: plain only, the flags being the
    GPU's), each in its own process: exit status, wall seconds, captions/s over the wall time,
    and how many captions equal the plain run's. A run that fails is a row with its exit status
    and the last line it wrote on stderr."""
    rows: list[dict] = []
    plain: dict[str, str] | None = None
    for label, flags in COMMAND_LINE if device == "cuda" else COMMAND_LINE[:1]:
        if report.over_budget(f"command line: {label}"):
            break
        argv = [sys.executable, "-m", "edgecap", "caption", str(folder), "--backend", "torch"]
        argv += ["--device", device, "--batch-size", str(COMMAND_LINE_BATCH), "--max-length", str(max_length)]
        argv += ["--json", "--no-progress", *flags]
        started = time.perf_counter()
        # each run within what is left of --budget-s (at least 30 s), so the check ends in time
        limit = report.timeout(timeout_s)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=REPO)
        except subprocess.TimeoutExpired:
            report.skip(f"command line: {label}", f"did not finish in {limit:.0f} s")
            continue
        seconds = time.perf_counter() - started
        captions = {}
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if record.get("caption") is not None:
                captions[record["path"]] = record["caption"]
        row = {
            "flags": label,
            "command": "edgecap caption FOLDER " + " ".join(argv[5:]),
            "exit": proc.returncode,
            "seconds": round(seconds, 2),
            "captions": len(captions),
            "captions_per_s": round(len(captions) / seconds, 1),
        }
        if proc.returncode != 0:
            row["stderr"] = (proc.stderr.strip().splitlines() or [""])[-1][:300].replace("|", "/")
        if label == "plain":
            plain = captions
        elif plain is not None:  # None: the plain run did not finish, nothing to compare with
            row["identical_to_plain"] = sum(captions.get(path) == text for path, text in plain.items())
            row["of"] = len(plain)
        rows.append(row)
        log(f"command line {label}: exit {proc.returncode}, {len(captions)} captions in {seconds:.1f} s")
    return rows


def command_line_table(cli_rows: list[dict]) -> str:
    """The report's command-line section from ``command_line``'s rows."""
    return (
        C.markdown_table(
            ["flags", "exit", "wall s", "captions", "captions/s (wall)", "identical to plain"],
            [
                [
                    r["flags"],
                    r["exit"] if r["exit"] == 0 else f"**{r['exit']}**: {r.get('stderr', '')}",
                    r["seconds"],
                    r["captions"],
                    r["captions_per_s"],
                    f"{r['identical_to_plain']}/{r['of']}" if "of" in r else "-",
                ]
                for r in cli_rows
            ],
        )
        + f"\n\n`edgecap caption FOLDER --backend torch --device DEVICE --batch-size {COMMAND_LINE_BATCH} "
        "--json` over the JPEG files, each run in its own process: the wall time includes "
        "start-up and loading the model."
        if cli_rows
        else "not run"
    )


def speedups(results: list[dict]) -> list[dict]:
    """What the graphs buy: eager / graphs, per precision and setting."""
    by = {r["label"]: r for r in results}
    out = []
    for eager_label in [label for label in by if "-eager" in label]:
        graphs = by.get(eager_label.replace("-eager", "-graphs")) or by.get(
            eager_label.replace("-eager", "-graphs-emulated")
        )
        if graphs is None:
            continue
        for a, b in zip(by[eager_label].get("latency", []), graphs.get("latency", [])):
            out.append(
                {
                    "eager": eager_label,
                    "graphs": graphs["label"],
                    "beam": a["beam"],
                    "batch": a["batch"],
                    **{
                        f"{k}_x": a[k] / b[k] if b[k] else float("nan")
                        for k in ("encoder_p50_ms", "step_p50_ms", "e2e_p50_ms")
                    },
                }
            )
    return out


def search_speedups(results: list[dict]) -> list[dict]:
    """What the search on the device buys: host / device, per mode and setting."""
    by = {r["label"]: r for r in results}
    out = []
    for host_label in [label for label in by if "-host" in label]:  # -host, -host-prep
        device = by.get(host_label.replace("-host", "-device"))
        if device is None:
            continue
        for a, b in zip(by[host_label].get("latency", []), device.get("latency", [])):
            out.append(
                {
                    "host": host_label,
                    "device": device["label"],
                    "beam": a["beam"],
                    "batch": a["batch"],
                    "e2e_p50_ms_x": a["e2e_p50_ms"] / b["e2e_p50_ms"] if b["e2e_p50_ms"] else float("nan"),
                    "search_p50_ms_x": a["search_p50_ms"] / b["search_p50_ms"]
                    if b.get("search_p50_ms")
                    else float("nan"),
                }
            )
    return out


def _figure(target: dict) -> str:
    """A target's measured figure as the report writes it: a share (a limit under 1) in
    percent, ms and captions/s as the tables write numbers; its detail beside it."""
    v, detail = target["value"], target.get("detail")
    text = f"{v:.1%}" if target["limit"] < 1 else C.number_text(v)
    return text + (f" ({detail})" if detail else "")


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"# GPU check ({data['device']})",
        "",
        f"`{data['command']}` ({data['date']}; {data['seconds']:.0f} s)",
        "",
    ]
    if data.get("partial"):
        done = [r for r in data["modes"] if not r.get("unfinished")]
        within = [r["label"] for r in data["modes"] if r.get("unfinished")]
        lines += [
            f"**Partial: written after {len(done)} mode(s)"
            + "".join(f", within {label}" for label in within)
            + "; the run did not reach its end.**",
            "",
        ]
        if data.get("plan"):  # what it was to run, in its order
            lines += ["Plan: " + "; ".join(data["plan"]) + ".", ""]
    lines += [
        # first: what issue 24 asks, measured first (``TARGET_MODES``), met or not
        "## Targets",
        "",
        C.markdown_table(
            ["target", "limit", "measured", "met"],
            [
                [
                    t["target"],
                    f"{t['limit']:.0%}" if t["limit"] < 1 else t["limit"],  # a share in percent
                    "-" if t["value"] is None else _figure(t),
                    {True: "yes", False: "**no**", None: t.get("note", "not measured")}[t["met"]],
                ]
                for t in data["targets"]
            ],
        ),
        "",
        "## Machine",
        "",
    ]
    if data["device"] == "cuda":
        lines += [
            f"- GPU: {env.get('gpu')} (compute {env.get('capability')}, "
            f"{env.get('gpu_memory_gib')} GiB, {env.get('multiprocessors')} SMs)",
            f"- driver {env.get('driver', '?')}; torch CUDA {env.get('torch_cuda')}; "
            f"cuDNN {env.get('cudnn')}",
        ]
    else:
        lines += ["- no CUDA device: CUDA items skipped (see Skipped)"]
    lines += [
        f"- CPU: {env['cpu']} ({env.get('cores', 'cores not recorded')}); Python {env['python']}; "
        f"{env['platform']}",
        "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- onnxruntime providers: {env.get('onnxruntime_providers')}",
        "",
        "## gpu-marked tests",
        "",
    ]
    tests = data.get("gpu_tests")
    if tests:
        lines += [
            f"`{tests['command']}`: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s)",
            "",
        ]
        lines += [f"- {x}" for x in tests["failures"] + tests["skip_reasons"]]
    else:
        lines += ["not run yet" if data.get("partial") else "not run (see Skipped)"]
    lines += encoder_lines(data.get("encoder_variants"))
    lines += upload_lines(data.get("uploads"))
    lines += prep_thread_lines(data.get("prep_threads"))
    photos_info = data["photos"]
    lines += [
        "",
        "## Captions",
        "",
        f"{photos_info['n']} photos: {photos_info['source']}; beam 3, batch 8, "
        f"max length {data['settings']['max_length']}. Reference: onnxruntime CPU FP32 "
        f"({data['reference'].get('describe', '?')}).",
        "",
    ]
    rows = [
        [
            "onnxruntime-cpu-fp32 (reference)",
            "-",
            data["reference"].get("cider"),
            data["reference"].get("images_per_s"),
        ]
    ]
    for r in data["modes"]:
        c = r.get("captions", {})
        ident = c.get("identical")
        rows.append(
            [
                r["label"],
                "-" if ident is None else f"{ident:.1%} ({c.get('identical_n')}/{c.get('n')})",
                c.get("cider"),
                c.get("images_per_s"),
            ]
        )
    lines += [
        C.markdown_table(
            ["mode", "identical to ort CPU FP32", "CIDEr", "images/s"],
            [[x if x is not None else "-" for x in row] for row in rows],
        )
    ]
    lines += [
        "",
        "## Latency (ms)",
        "",
        f"Captioner.caption_batch on in-memory photos (end to end includes preprocessing); "
        f"{data['settings']['warmup']} warm-up calls, then {data['settings']['repeats']} "
        "timed; synchronised around timed regions. step: one decoder step, all steps of "
        "all calls pooled.",
        "",
    ]
    table = []
    for r in data["modes"]:
        for x in r.get("latency", []):
            table.append(
                [
                    r["label"],
                    x["beam"],
                    x["batch"],
                    x["encoder_p50_ms"],
                    x["encoder_p95_ms"],
                    x["step_p50_ms"],
                    x["step_p95_ms"],
                    x["steps_per_call"],
                    x["preprocess_p50_ms"],
                    x.get("search_p50_ms", float("nan")),
                    x["e2e_p50_ms"],
                    x["e2e_p95_ms"],
                ]
            )
    lines += [
        C.markdown_table(
            [
                "mode",
                "beam",
                "batch",
                "encoder p50",
                "p95",
                "step p50",
                "p95",
                "steps",
                "preprocess p50",
                "search p50",
                "e2e p50",
                "p95",
            ],
            table,
        )
    ]
    lines += [
        "",
        "steps: host steps per call (with the bookkeeping in the step graph or engine, the "
        "`-graph` rows: its runs, each timed with its results' way back); with the search on "
        "the device and CUDA graphs, the steps its graphs ran (they stop at the first check "
        "after every image is done; 0 without graphs: no step returns to the host); search: "
        "the whole beam search of a call (its captions' decode_ms).",
    ]
    if data["device"] != "cuda":
        lines += [
            "",
            "On the CPU these timings say nothing about a GPU: the graphs are emulated "
            "(EagerGraph replays by running the step eagerly), and a shared CPU is noisy.",
        ]
    if data["speedups"]:
        lines += [
            "",
            "### What the graphs buy (eager / graphs, p50)",
            "",
            C.markdown_table(
                ["eager", "graphs", "beam", "batch", "encoder x", "step x", "e2e x"],
                [
                    [
                        s["eager"],
                        s["graphs"],
                        s["beam"],
                        s["batch"],
                        s["encoder_p50_ms_x"],
                        s["step_p50_ms_x"],
                        s["e2e_p50_ms_x"],
                    ]
                    for s in data["speedups"]
                ],
            ),
        ]
    if data.get("search_speedups"):
        lines += [
            "",
            "### What the search on the device buys (host / device, p50)",
            "",
            C.markdown_table(
                ["host", "device", "beam", "batch", "search x", "e2e x"],
                [
                    [s["host"], s["device"], s["beam"], s["batch"], s["search_p50_ms_x"], s["e2e_p50_ms_x"]]
                    for s in data["search_speedups"]
                ],
            ),
        ]
    if data.get("fp16_identity"):
        lines += [
            "",
            "### FP16 captions against FP32's (same graphs, same search)",
            "",
            C.markdown_table(
                ["fp16", "fp32", "identical"],
                [
                    [i["fp16"], i["fp32"], f"{i['identical']:.1%} ({i['identical_n']}/{i['n']})"]
                    for i in data["fp16_identity"]
                ],
            ),
        ]
    rates = [
        [r["label"], t["input"], t["batch"], t["p50_ms"], t["captions_per_s"]]
        for r in data["modes"]
        for t in r.get("throughput", [])
    ]
    lines += fused_probe_lines(data.get("fused_probe"))
    lines += decode_form_lines(data["modes"], data.get("conditional_probe"))
    lines += profile_lines(data["modes"])
    lines += hold_lines(data["modes"])
    lines += ["", "## Throughput, batch 64, beam 3", ""]
    lines += [
        C.markdown_table(["mode", "input", "batch", "call p50 (ms)", "captions/s"], rates)
        + "\n\nframes: `caption_batch` of in-memory RGB frames (host preprocessing "
        "included); tensors: preprocessed, encoder + search only; frames x4: four batches a "
        "call, each batch's captions built while the next is searched (overlap on) or not."
        if rates
        else "not measured (no CUDA device)"
    ]
    file_rows = [r for r in data["modes"] if r.get("file_rate")]
    lines += ["", "## Files against in-memory frames, beam 3", ""]
    for r in file_rows:
        lines += [f"{r['label']}:", "", file_rate.table(r["file_rate"]), ""]
    lines += [
        "files: `caption_batch` of JPEG paths (the photos written at quality 90: read, "
        "decode, preprocess, encoder, search); memory: of the same photos decoded "
        "beforehand; decode workers 0: each batch decoded before it is captioned; the "
        "default: decoded in threads while the model works."
        if file_rows
        else "not measured"
    ]
    lines += ["", "## Command line", "", command_line_table(data.get("command_line") or [])]
    lines += ["", "## Peak GPU memory", ""]
    mem = [[r["label"], r["peak_gpu_mib"]] for r in data["modes"] if "peak_gpu_mib" in r]
    lines += [
        C.markdown_table(["mode", "max_memory_allocated (MiB)"], mem)
        if mem
        else "not measured (no CUDA device)"
    ]
    lines += ["", "## Skipped", ""]
    lines += [f"- {s['item']}: {s['reason']}" for s in data["skipped"]] or ["- nothing"]
    return "\n".join(lines) + "\n"


def encoder_lines(rows: list[dict] | None) -> list[str]:
    """The encoder variants' section of the report (none where they did not run)."""
    if not rows:
        return []
    return [
        "",
        "## The encoder alone",
        "",
        "`EfficientNetLite.features` with the shipped weights on the photos (preprocessed), a CUDA "
        "graph of it replayed (p50 of 20): each layout, convolution math, form (the BatchNorms "
        "folded into the convolutions, as the torch backend runs the encoder by default, or apart, "
        "as exported: `fold_batch_norms`) and cuDNN algorithm choice (heuristics, or "
        "`torch.backends.cudnn.benchmark`). diff: the features' largest absolute difference from "
        "IEEE FP32 NCHW folded with the heuristics (what the torch backend runs), and that over "
        "the features' largest absolute value.",
        "",
        C.markdown_table(
            ["batch", "layout", "math", "BatchNorms", "cuDNN", "p50 ms", "p95 ms", "max diff", "relative"],
            [
                [
                    r["batch"],
                    r["layout"].upper(),
                    {"ieee": "IEEE FP32", "tf32": "TF32", "fp16": "FP16"}[r["math"]],
                    r.get("form", "apart"),
                    "benchmark" if r["benchmark"] else "heuristics",
                    r["p50_ms"],
                    r["p95_ms"],
                    f"{r['max_abs_diff']:.2g}",
                    f"{r['relative_diff']:.2g}",
                ]
                for r in rows
            ],
        ),
    ]


def fused_probe_lines(probe: dict | None) -> list[str]:
    """The fused probe's outcome (``probe_fused``), where it ran."""
    if not probe:
        return []
    said = []
    for precision, (label, _) in FUSED_PROBE_FORMS.items():
        if probe["usable"][precision]:
            said.append(f"its {label} ({precision.upper()}) captioned")
        else:
            said.append(
                f"**its {label} ({precision.upper()}) failed**: {probe['reasons'][precision]}; "
                "its modes skipped"
            )
    if "reason" in probe:  # the parts ran, the one graph did not stand for them
        said.append(f"**the one graph failed**: {probe['reason']}; conditional nodes off for the run")
    elif "one graph" in probe:
        said.append("the one graph captioned as the parts")
    outcome = "; ".join(said) + "."
    same = probe.get("same_as_plain")
    if same is not None:
        outcome += f" Its captions {'are' if same else '**are not**'} the plain device search's."
    return [
        "",
        "## The fused search's first run",
        "",
        "`fused_search=True` with the frames preprocessed on the GPU (its Triton kernels' first run "
        f"on this GPU), the example photos in a process of its own ({probe['seconds']} s): {outcome}",
    ]


def decode_form_lines(results: list[dict], probe: dict | None = None) -> list[str]:
    """The section comparing the whole decode's two forms (none where no mode timed them and
    no probe ran), the probe's outcome first."""
    timed = [(r["label"], r["decode_forms"]) for r in results if r.get("decode_forms")]
    if not timed and not probe:
        return []
    lines = [
        "",
        "## The whole decode: one graph with conditional nodes, or parts with host checks",
        "",
        "`caption_batch` of in-memory frames end to end, beam 3, p50 ms, the two forms "
        "alternating call by call: one graph whose stretches of steps after "
        f"{', '.join(map(str, _decode_checks()))} run in conditional nodes only while some image "
        "is not done (no read-back until the result), against the parts (a graph per stretch, "
        'the host reading "every image done?" before each). steps: the steps each ran, mean.',
        "",
    ]
    if probe:
        lines += [
            f"Probe (the example photos in a process of its own, {probe['seconds']} s): "
            + (
                "the one graph captured, the parts' captions."
                if probe["ok"]
                else f"**failed**: {probe['reason']}; every mode captured the parts."
            ),
            "",
        ]
    for label, forms in timed:
        if "skipped" in forms:
            lines += [f"- {label}: not timed: {forms['skipped']}"]
            continue
        if forms.get("warm_up"):
            lines += [
                f"{label}, `Captioner.warm_up((1, 8), frame_size=(480, 640))` on a fresh Captioner "
                "(every stage's first run and capture at each size, and the decode graph of every "
                "plan): "
                + "; ".join(
                    f"batch {w['batch']} {w['seconds']:.2f} s ({w['plans']} plans beyond its caption's)"
                    for w in forms["warm_up"]
                ),
                "",
            ]
        if forms.get("conditional_error"):
            lines += [
                f"- {label}: the conditional form failed to capture ({forms['conditional_error']}): "
                "both columns are the parts",
                "",
            ]
        lines += [
            f"{label}:",
            "",
            C.markdown_table(
                [
                    "batch",
                    "parts p50",
                    "one graph p50",
                    "parts / one graph",
                    "steps: parts",
                    "one graph",
                    "same captions",
                ],
                [
                    [
                        r["batch"],
                        r["parts_p50_ms"],
                        r["one_graph_p50_ms"],
                        r["parts_over_one_graph"],
                        r["steps_parts"],
                        r["steps_one_graph"],
                        "yes" if r["same_captions"] else "**no**",
                    ]
                    for r in forms["rows"]
                ],
            ),
            "",
        ]
    return lines


def profile_lines(results: list[dict]) -> list[str]:
    """The section on where one call's time goes (none where no mode was profiled)."""
    profiled = [(r["label"], r["profile"]) for r in results if r.get("profile")]
    if not profiled:
        return []
    lines = [
        "",
        "## Where one call's time goes (torch.profiler)",
        "",
        "`caption_batch` of in-memory frames, beam 3, a few calls under `torch.profiler` "
        "(CPU and CUDA activity) after one that captures what the batch needs: per call, the "
        "kernels and copies the GPU ran and their summed time (kernels on several streams may "
        "overlap), by kind (a kernel's kind read from its name, `KERNEL_KINDS`) and the longest "
        "by name; wall: the call's time under the profiler and without it. Kernel time far "
        "under the wall time: the GPU waits (on the host, or launches); 0 kernels: the profiler "
        "did not see inside the CUDA graphs.",
        "",
    ]
    for label, rows in profiled:
        for r in rows:
            lines += [
                f"{label}, batch {r['batch']}, {r['calls']} call{'s' if r['calls'] != 1 else ''}: "
                f"{r['kernels_per_call']:.0f} kernels and copies a call, "
                f"{r['kernel_ms_per_call']:.3g} ms summed, wall {r['wall_ms']:.3g} ms "
                f"({r['wall_unprofiled_ms']:.3g} ms without the profiler).",
                "",
                C.markdown_table(
                    ["kind", "kernels a call", "ms a call", "share of kernel time"],
                    [
                        [
                            k["kind"],
                            k["kernels"],
                            k["ms"],
                            f"{100 * k['ms'] / total:.0f}%" if (total := r["kernel_ms_per_call"]) else "-",
                        ]
                        for k in r["kinds"]
                    ],
                ),
                "",
                C.markdown_table(
                    ["longest kernels", "a call", "ms a call", "mean us"],
                    [[f"`{t['name']}`", t["kernels"], t["ms"], t["mean_us"]] for t in r["top"]],
                ),
                "",
            ]
    return lines


def _decode_checks() -> tuple[int, ...]:
    from edgecap.decoding.device import DECODE_CHECKS

    return DECODE_CHECKS


def prep_thread_lines(rows: list[dict] | None) -> list[str]:
    """The host preprocessing's thread section of the report (none where it did not run)."""
    if not rows:
        return []
    return [
        "",
        "## Host preprocessing in threads",
        "",
        f"`Captioner._prepare` (the shipped model's host preprocessing: what a decoding worker does "
        f"for an in-memory frame) of {rows[0]['frames']} VGA frames a call, in the calling thread "
        "(0) or spread over a pool of N threads (`python benchmarks/frame_prep.py --threads-only`, "
        "a process each); medians of interleaved calls; speed-up over the calling thread's; "
        "minor page faults a frame. memory: glibc's allocator as it comes (default) or keeping "
        "freed memory (kept, `edgecap.allocator.keep_freed_memory`). A speed-up near 1 with more "
        "threads: something serialises the decoding workers here; fewer faults and a larger "
        "speed-up when kept: fresh pages were it.",
        "",
        C.markdown_table(
            ["memory", "threads", "frames a call", "call ms", "frames/s", "speed-up", "page faults a frame"],
            [
                [r["memory"], r["threads"], r["frames"], r["call_ms"], r["frames_per_s"], r["speedup"]]
                + ["-" if r["faults_per_frame"] is None else r["faults_per_frame"]]
                for r in rows
            ],
        ),
    ]


def upload_lines(rows: list[dict] | None) -> list[str]:
    """The uploads' section of the report (none where they did not run)."""
    if not rows:
        return []
    return [
        "",
        "## Host-to-GPU copies",
        "",
        "One batch from separate arrays (``uploads``): preprocessed images (float32 3 x 224 x 224) "
        "and camera frames (uint8 480 x 640 x 3). fresh: stacked into a new array and copied from "
        "that pageable memory (the torch backend until 2026-12-05); kept: stacked into a kept "
        "page-locked buffer and copied without blocking (``edgecap.backends.staging``, the torch "
        "backend on CUDA now). Wall time to the copy's end, p50 of 20; the stacks alone beside them.",
        "",
        C.markdown_table(
            ["batch", "input", "MB", "copy", "p50 ms", "p95 ms"],
            [[r["batch"], r["input"], r["mb"], r["variant"], r["p50_ms"], r["p95_ms"]] for r in rows],
        ),
    ]


def write_report(
    data: dict, results: list[dict], report: Report, device: str, out: Path, name: str, partial: bool
) -> str:
    """Write ``name``.json and .md into ``out`` from the modes measured so far; ``partial``:
    more modes were still to come (the report says so at its top). Returns the markdown."""
    data["partial"] = partial
    data["cider_tokenizer"] = _CIDER_NOTE.get("tokenizer")
    data["modes"] = results
    data["speedups"] = speedups(results)
    data["search_speedups"] = search_speedups(results)
    data["fp16_identity"] = fp16_identity(results)
    data["targets"] = targets(results, device, data["fp16_identity"])
    data["seconds"] = time.perf_counter() - T0
    data["skipped"] = list(report.data["skipped"])
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    text = markdown(data)
    (out / f"{name}.md").write_text(text)
    return text


def run_gpu_tests(args, report: Report, device: str) -> dict | None:
    """``pytest -m gpu`` unless --skip-tests or past --budget-s; on the CPU too, so CI keeps
    this path working (the gpu tests skip before their fixtures)."""
    if args.skip_tests:
        report.skip("pytest -m gpu", "--skip-tests")
        return None
    if report.over_budget("pytest -m gpu"):
        return None
    if device != "cuda":
        return gpu_tests(report, timeout_s=120, compiled=args.compiled)
    left = args.budget_s - (time.perf_counter() - T0)
    least, most = GPU_TESTS_SECONDS
    return gpu_tests(report, timeout_s=max(least, min(most, left - 60)), compiled=args.compiled)


def main(argv=None) -> int:
    global T0
    # --budget-s from this run's start, not from the module's import (a second run in the same
    # process, as the tests make, had found the first one's time spent already)
    T0 = time.perf_counter()
    args = parse_args(argv)
    report = Report(args.budget_s)
    log("importing torch")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    if device == "cuda":
        torch.cuda.init()
    name = args.name or ("gpu" if device == "cuda" else "gpu-cpu")
    model = C.model_dir(args.model)
    data: dict = {
        "device": device,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": str(model),
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k in ("n", "repeats", "warmup", "beams", "batches", "max_length", "quick", "budget_s")
        },
    }
    data["environment"] = environment(device, report)
    log(f"device {device}: {data['environment'].get('gpu', data['environment']['cpu'])}")
    # the modes to run, named before any photo is read (--modes: a bad pattern stops here)
    every = select_modes(modes(device, args.compiled) + other_backends(device, report), args.modes)

    ids, frames, refs, source = photos(args.n, report, args.flickr8k)
    data["photos"] = {"n": len(frames), "source": source, "references": refs is not None}
    log(f"{len(frames)} photos: {source}")
    scratch = tempfile.TemporaryDirectory()
    files = jpeg_files(frames, Path(scratch.name))
    file_rate_modes = (
        FILE_RATE_MODES if device == "cuda" else [modes(device)[0]["label"]] if args.quick else []
    )

    out = C.output_dir(args.out)
    # issue 24's target modes first, then the rest (``plan``); on the CPU with --quick: the
    # first mode profiled at batch 1, once, to keep the profile working
    profile_modes = PROFILE_MODES if device == "cuda" else [modes(device)[0]["label"]] if args.quick else []
    profile_sizes = {"batches": PROFILE_BATCHES} if device == "cuda" else {"batches": (1,), "calls": 1}
    steps = plan(every, file_rate_modes, profile_modes)
    data["plan"] = [what if mode is None else f"{what} {mode['label']}" for what, mode in steps]
    data["plan"] += [] if args.modes else ["command line"]
    reference: list[str] | None = None
    data["reference"] = {}
    results: list[dict] = []

    def save(partial: bool = True, unfinished: dict | None = None) -> str:
        """The report so far (``unfinished``: the mode in progress, with what it measured)."""
        mode_results = results if unfinished is None else results + [unfinished]
        return write_report(data, mode_results, report, device, out, name, partial)

    # before anything runs on the GPU: a run ended within its first step (a native crash, a
    # hang until the lease's kill) still leaves the machine, the plan and what it knew
    save()
    try:
        ort = captioner(model, "onnxruntime", {"device": "cpu"}, 3, 8, args.max_length)
        texts, seconds = caption_all(ort, frames)
        reference = texts
        data["reference"] = {
            "describe": ort.backend.describe(),
            "seconds": round(seconds, 2),
            "images_per_s": len(texts) / seconds,
            "texts": texts,
            "cider": cider(refs, ids, texts),
        }
        log(f"onnxruntime CPU FP32 reference: {seconds:.1f} s")
    except Exception as exc:
        report.skip("onnxruntime CPU FP32 reference captions", f"{type(exc).__name__}: {exc}")

    if device == "cuda":  # before any mode captures one (a few seconds, in its own process)
        data["conditional_probe"] = probe_conditionals(model, report)
    if device == "cuda" and not args.compiled:
        report.skip(
            "torch-cuda-fp32-graphs-device-compiled",
            "without --compiled (it compiles per shape first: leave it time)",
        )
    save()  # with the reference's captions and the probe's outcome, before the first mode

    def checkpoint(unfinished: dict) -> None:
        save(unfinished=unfinished)

    for step, mode in steps:
        if step == "fused probe":  # its kernels' first run on this GPU, in a process of its own
            if not report.over_budget("fused probe"):  # past it, its modes would be skipped too
                data["fused_probe"] = probe_fused(model, report, data.get("conditional_probe"))
        elif step == "gpu tests":
            data["gpu_tests"] = run_gpu_tests(args, report, device)
            if device == "cuda":  # where the encoder's time could go (a few seconds)
                try:
                    data["encoder_variants"] = encoder_variants(model, frames, device, report)
                except Exception as exc:  # failing, it must not lose the report
                    report.skip("encoder variants", f"failed: {type(exc).__name__}: {exc}")
                try:  # pageable against pinned host memory (under a second)
                    data["uploads"] = uploads(device, report)
                except Exception as exc:  # failing, it must not lose the report
                    report.skip("uploads", f"failed: {type(exc).__name__}: {exc}")
            try:  # whether the host's preprocessing scales with threads (a few seconds)
                data["prep_threads"] = prep_threads(report, quick=args.quick and device == "cpu")
            except Exception as exc:  # failing, it must not lose the report
                report.skip("host preprocessing in threads", f"failed: {type(exc).__name__}: {exc}")
        elif step == "file rate":
            assert mode is not None
            try:
                by = {r["label"]: r for r in results}
                file_rate_step(mode, by.get(mode["label"]), model, files, args, report, device)
            except Exception as exc:  # failing, it must not lose the report
                report.skip(f"{mode['label']} files against memory", f"failed: {type(exc).__name__}: {exc}")
        elif step == "profile":
            assert mode is not None
            ran = {r["label"]: r for r in results}.get(mode["label"])
            if ran is None:
                report.skip(f"{mode['label']} profile", "its mode did not run")
            elif not report.over_budget(f"{mode['label']} profile"):
                ran["profile"] = profile_mode(mode, model, device, args.max_length, report, **profile_sizes)
        else:
            assert mode is not None
            if report.over_budget(mode["label"]):
                continue
            why = fused_skip_reason(mode, data.get("fused_probe"))
            if why is not None:
                report.skip(mode["label"], why)
                continue
            try:
                results.append(
                    run_mode(mode, model, frames, reference, refs, ids, args, report, device, checkpoint)
                )
            except Exception as exc:  # one mode failing must not lose the report
                report.skip(mode["label"], f"failed: {type(exc).__name__}: {exc}")
        # the report so far, after each step: a run stopped from outside (a machine's time
        # limit) keeps what it finished
        save()
    if args.modes:
        report.skip("command line", "--modes: the modes named only")
    else:
        try:  # failing, it must not lose the report of the modes
            data["command_line"] = command_line(Path(scratch.name), device, args.max_length, report)
        except Exception as exc:
            report.skip("command line", f"failed: {type(exc).__name__}: {exc}")
    scratch.cleanup()
    if refs is not None and "skip" in _CIDER_NOTE:
        report.skip("CIDEr", _CIDER_NOTE["skip"])
    text = save(partial=False)
    print(text)
    print("skipped:" if data["skipped"] else "skipped: nothing")
    for s in data["skipped"]:
        print(f"  - {s['item']}: {s['reason']}")
    log(f"wrote {out / (name + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
