"""The fused device search's Triton kernels (``edgecap.decoding.device_kernel``, the
bookkeeping; ``edgecap.decoding.lm_kernels``, the language models' element-wise work; and
``edgecap.decoding.step_kernels``, the decoder step's gathers and joins) compiled for NVIDIA
GPUs on this machine, which has none: Triton's own compiler (the same front end, MLIR passes and
LLVM as on a GPU machine) and the ``ptxas`` its wheel ships turn each kernel into a cubin for a
GPU architecture without a driver. What the interpreter the other tests run them in does not
check: that Triton compiles them at all (only constexpr globals, typed operations), for every set
of arguments the search launches them with, and that they keep their values in registers (no
local memory: spills); and where they are launched (the tensors' GPU). Their results are checked
in ``tests/test_device_search.py``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from edgecap.decoding import CaptionOptions  # noqa: E402
from edgecap.decoding import device_kernel, lm_kernels, step_kernels  # noqa: E402
from edgecap.decoding.device import DeviceBeamSearch, SessionStep, rules_for  # noqa: E402
from edgecap.decoding.fusion import Fusion  # noqa: E402
from fakes import END, START, PrefixHashBackend  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the launches are recorded in Triton's interpreter"
)

# the launch's compile options, not the kernel's arguments
LAUNCH_OPTIONS = ("num_warps", "enable_fp_fusion")
# H100 / H200, Jetson AGX Orin, Jetson AGX Xavier
ARCHITECTURES = (90, 87, 72)
# every kernel of the language models' and of the decoder step's, as the fused searches launch them
LM_KERNELS = {"_cell", "_hidden", "_shift", "_ratio", "_tagged"}
STEP_KERNELS = {"_rows", "_lstm_input", "_deep"}

COMPILE = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for launch in json.loads(sys.argv[1]):
    module = importlib.import_module(launch["module"])
    kernel = triton.jit(getattr(module, launch["kernel"]))
    for capability in json.loads(sys.argv[2]):
        source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(
            source, target=GPUTarget("cuda", capability, 32), options=launch["options"]
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        out.append({"kernel": launch["kernel"], "capability": capability, "usage": usage.stdout})
print(json.dumps(out))
"""


def _signature(value) -> str:
    if isinstance(value, torch.Tensor):
        from triton._utils import canonicalize_dtype

        return "*" + canonicalize_dtype(value.dtype)
    assert isinstance(value, int), value
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def _launches() -> list[dict]:
    """The kernels' launches (argument types and constexprs) in fused searches over fake models
    with and without each rule: the tag bonus, the language models, no-repeat n-grams, the
    endings, beams 1 to 7; the bookkeeping kernel's (``device_kernel``) and the language
    models' (``lm_kernels``), each named by its module and function; and in fused searches of
    the shipped model's torch backend (``_shipped_searches``), the decoder step's
    (``step_kernels``) too."""
    seen: dict[str, dict] = {}

    class Recorder:
        def __init__(self, real, module: str):
            self.real, self.module = real, module

        def __getitem__(self, grid):
            real = self.real

            def launch(*args, **kwargs):
                names = real.arg_names
                options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
                constexprs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
                signature = {
                    name: "constexpr" if name in constexprs else _signature(value)
                    for name, value in zip(names, args)
                }
                signature.update({name: "constexpr" for name in constexprs})
                entry = {
                    "module": self.module,
                    "kernel": real.fn.__name__,
                    "signature": signature,
                    "constexprs": constexprs,
                    "options": options,
                }
                seen.setdefault(json.dumps(entry, sort_keys=True), entry)
                return real[grid](*args, **kwargs)

            return launch

    bookkeeping = Recorder(device_kernel._kernel(), device_kernel.__name__)
    lms = {name: Recorder(kernel, lm_kernels.__name__) for name, kernel in lm_kernels._kernels().items()}
    steps = {
        name: Recorder(kernel, step_kernels.__name__) for name, kernel in step_kernels._kernels().items()
    }

    cases = [
        # the default max_length (20: 32 words a row in a program's blocks)
        CaptionOptions(beam_size=3, max_length=20, no_repeat_ngram=3, guidance_bonus=2.0, fusion_weight=0.6),
        CaptionOptions(beam_size=5, max_length=20, no_repeat_ngram=0, guidance_bonus=0.0, fusion_weight=0.0),
        CaptionOptions(beam_size=1, max_length=4, no_repeat_ngram=1, guidance_bonus=1.0, fusion_weight=0.0),
        # the language models without the tag bonus
        CaptionOptions(beam_size=3, max_length=6, no_repeat_ngram=0, guidance_bonus=0.0, fusion_weight=0.6),
        # 7 x 8 = 56 candidates, 64 padded: four warps a program
        CaptionOptions(beam_size=7, max_length=20, no_repeat_ngram=2, guidance_bonus=1.0, fusion_weight=0.6),
    ]
    with (
        mock.patch.object(device_kernel, "_kernel", lambda: bookkeeping),
        mock.patch.object(lm_kernels, "_kernels", lambda: lms),
        mock.patch.object(step_kernels, "_kernels", lambda: steps),
    ):
        _fused_searches(cases)
        _shipped_searches()
    return list(seen.values())


# the shipped model's rules: language models and tag bonus, the tag bonus alone, the models
# alone, neither (no word bias: the top K's own log-probabilities); with the endings (the
# consensus choice, the default) and without
SHIPPED_CASES = (
    {},
    {"fusion_weight": 0.0},
    {"guidance_bonus": 0.0},
    {"fusion_weight": 0.0, "guidance_bonus": 0.0},
    {"consensus": False},
    {"consensus": False, "fusion_weight": 0.0, "guidance_bonus": 0.0},
    {"beam_size": 7},
)


def _shipped_searches(cases=SHIPPED_CASES) -> None:
    """Fused searches of the shipped model's torch backend on CPU tensors (its decoder step
    through ``step_kernels``), the cat photo (its fusion gate gives it the language models and
    it has tag words), for each of ``cases`` (CaptionOptions fields); the decoder
    in FP32 and in FP16 (``fp16=True``: its kernels' FP16 arguments)."""
    from edgecap import Captioner
    from edgecap.backends.torch import TorchBackend
    from edgecap.backends.torch_search import TorchDeviceSearch
    from conftest import EXAMPLES

    photo = str(EXAMPLES / "chelsea.png")
    for fp16 in (False, True):
        captioner = Captioner(backend="torch", device="cpu", search="device", fused_search=True)
        if fp16:
            backend = captioner.backend
            backend._setup(*TorchBackend._build(backend.manifest), "cpu", fp16=True, fp32_encoder=True)
            backend.device_search = TorchDeviceSearch(backend, fused=True)
        for extra in cases:
            captioner.options = CaptionOptions(**extra)
            captioner.caption(photo)


def _fused_searches(cases: list) -> None:
    """A fused search over a fake model (20 words) with random language models for each of
    ``cases`` (CaptionOptions), without the endings and with them; two images, the first with
    tag words."""
    rng = np.random.default_rng(0)
    vocab, top_k = 20, 8
    backend = PrefixHashBackend(vocab_size=vocab, top_k=top_k, end_bias=-1.0, seed=3)
    from test_device_search import _lm  # the random language models of those tests

    fusion = Fusion(_lm(rng, vocab), _lm(rng, vocab), 0.5, {})
    for options in cases:
        for endings in (False, True):
            encoded = backend.encode(rng.integers(0, 1000, 2))
            tags = (frozenset({4, 5}), frozenset())
            rules = rules_for(options, encoded.n_images, tags, fusion, encoded.class_probs)
            DeviceBeamSearch(vocab, torch.device("cpu"), fused=True).search(
                lambda index, e=encoded: SessionStep(backend.start(e, index.numpy())),
                encoded.n_images,
                options,
                top_k,
                START,
                END,
                rules,
                fixed=True,
                endings=endings,
            )


def test_every_launch_goes_to_its_tensors_device(monkeypatch):
    """Triton launches on the calling thread's current CUDA device and stream: the fused
    search's kernels, the bookkeeping's and the language models', are launched inside
    ``on_device`` of their tensors' device (a model on cuda:1 searched from a thread whose
    current device is 0 would otherwise run them on GPU 0). ``on_device`` itself: CUDA's
    device block for a CUDA device, nothing for the CPU's."""
    assert isinstance(device_kernel.on_device(torch.device("cpu")), contextlib.nullcontext)
    block = device_kernel.on_device(torch.device("cuda", 1))
    assert isinstance(block, torch.cuda.device) and block.idx == 1

    inside: list = []
    blocks: list = []
    launches: list = []

    @contextlib.contextmanager
    def recording(device):
        blocks.append(device)
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    class Launch:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append((self.real.fn.__name__, list(inside), devices))
                return self.real[grid](*args, **kwargs)

            return launch

    bookkeeping = Launch(device_kernel._kernel())
    lms = {name: Launch(kernel) for name, kernel in lm_kernels._kernels().items()}
    steps = {name: Launch(kernel) for name, kernel in step_kernels._kernels().items()}
    monkeypatch.setattr(device_kernel, "on_device", recording)
    monkeypatch.setattr(device_kernel, "_kernel", lambda: bookkeeping)
    monkeypatch.setattr(lm_kernels, "_kernels", lambda: lms)
    monkeypatch.setattr(step_kernels, "_kernels", lambda: steps)
    options = CaptionOptions(beam_size=3, max_length=5, guidance_bonus=2.0, fusion_weight=0.6)
    _fused_searches([options])
    _shipped_searches(({}, {"fusion_weight": 0.0}))
    assert {name for name, _, _ in launches} == {"_bookkeeping"} | LM_KERNELS | STEP_KERNELS
    for name, within, devices in launches:
        assert within == list(devices), name  # inside one block, for the tensors' own device
    assert blocks and all(device == torch.device("cpu") for device in blocks)


def test_the_kernels_compile_for_nvidia_gpus_without_spilling():
    launches = _launches()
    kept = [launch for launch in launches if launch["kernel"] == "_bookkeeping"]
    # every rule on and off among them: the kernel's constexpr branches all compiled
    for flag in ("HAS_BIAS", "HAS_TAGS", "ENDINGS", "BEST", "FIRST"):
        assert {launch["constexprs"][flag] for launch in kept} == {True, False}, flag
    assert {launch["constexprs"]["NGRAM"] for launch in kept} == {0, 1, 2, 3}
    # beams 1 and 3, 5, 7; the top K's log-probabilities read at their ids, twice as many
    assert {launch["options"]["num_warps"] for launch in kept if not launch["constexprs"]["GATHERED"]} == {
        1,
        2,
        4,
    }
    assert {launch["options"]["num_warps"] for launch in kept if launch["constexprs"]["GATHERED"]} == {2, 8}
    # the language models' kernels, the first step's cell (no gather) and the later ones', the
    # ratio with and without the tag bonus; without fused multiply-adds, as the eager step
    lms = [launch for launch in launches if launch["module"] == lm_kernels.__name__]
    assert {launch["kernel"] for launch in lms} == LM_KERNELS
    assert {launch["constexprs"]["GATHER"] for launch in lms if launch["kernel"] == "_cell"} == {True, False}
    assert {launch["constexprs"]["HAS_TAGS"] for launch in lms if launch["kernel"] == "_ratio"} == {
        True,
        False,
    }
    assert {launch["constexprs"]["RANKED"] for launch in lms if launch["kernel"] == "_ratio"} == {True, False}
    for flag in ("ENDINGS", "BEST", "FIRST"):  # the top K's log-probabilities read at the ids
        assert {launch["constexprs"][flag] for launch in kept if launch["constexprs"]["GATHERED"]} == {
            True,
            False,
        }, flag
    # the decoder step's three, with and without the language models' states and input rows to
    # gather (the first step: the rows alone), the first step's int32 tokens and the later
    # ones' int64, FP32 and FP16
    steps = [launch for launch in launches if launch["module"] == step_kernels.__name__]
    assert {launch["kernel"] for launch in steps} == STEP_KERNELS
    rows = [launch for launch in steps if launch["kernel"] == "_rows"]
    assert {launch["constexprs"]["LM"] for launch in rows} == {True, False}
    assert {(launch["constexprs"]["LM"], launch["constexprs"]["LM_IN"]) for launch in rows} == {
        (True, True),
        (False, True),
        (False, False),
    }
    assert {launch["signature"]["tok_ptr"] for launch in rows} == {"*i32", "*i64"}
    assert {launch["signature"]["emb_ptr"] for launch in steps if launch["kernel"] == "_deep"} == {
        "*fp32",
        "*fp16",
    }
    assert all(launch["options"]["enable_fp_fusion"] is False for launch in launches)
    # the shipped model's row kernel gathers its language models' 512 gate values a row
    assert {launch["constexprs"]["BG"] for launch in rows if launch["constexprs"]["LM_IN"]} >= {512}
    # and each at the shipped model's sizes (hidden 128; a vocabulary past WORDS_AT_A_TIME: a
    # block of that many words), which the small fakes do not reach
    shipped = {"BH": 128, "BV": lm_kernels.WORDS_AT_A_TIME}
    resized = [
        {**launch, "constexprs": {k: shipped.get(k, v) for k, v in launch["constexprs"].items()}}
        for launch in lms
    ]
    launches += list({json.dumps(launch, sort_keys=True): launch for launch in resized}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(launches), json.dumps(ARCHITECTURES)],
        capture_output=True,
        text=True,
        env=env,
        # a hang guard only: 2 min alone with an empty Triton cache, past 10 min on a 2-core
        # machine with other test runs beside it
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.splitlines()[-1])
    assert len(compiled) == len(launches) * len(ARCHITECTURES)
    for entry in compiled:
        usage = entry["usage"]
        assert f"Function {entry['kernel']}:" in usage, usage
        # its values in registers: no local memory, no stack (a spill would be either)
        assert " LOCAL:0 " in usage and " STACK:0 " in usage, (entry["capability"], usage)
