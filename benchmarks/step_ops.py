"""How many torch operations one step of the beam search on the device dispatches: on a GPU each
is a kernel (or a few), and the decode is bound by their number (docs/gpu-search.md).

    python benchmarks/step_ops.py [--out DIR] [--fused] [--compiled]

The shipped model's torch backend on CPU tensors (``search="device"``, default options, beam 3,
one torch thread) captions the example photos: batch 1 (each photo alone) and batch 8 (the four
and their mirror images), with the fused language models as the options give them and with
``fusion_weight=0``. A ``TorchDispatchMode`` (``_common.operation_counter``) counts every
operation ``_step`` dispatches; an operation that returns (a view of) its input and writes
nothing, or only allocates, launches no kernel and is counted apart. Reported per step number:
the medians over the searches of the kernel operations, and of the others. On CUDA an LSTM
cell is about 3 kernels and a stable sort several, so a GPU runs a few more kernels a step than
this counts.

``--fused`` adds the fused step (``fused_search=True``: every step with its
bookkeeping in one Triton kernel, ``edgecap.decoding.device_kernel``, the language models'
element-wise work in four, ``edgecap.decoding.lm_kernels``, and the decoder step's gathers and
joins in three, ``edgecap.decoding.step_kernels``, run here by Triton's interpreter on CPU
tensors): the torch operations a step that launch a kernel plus those kernels' launches,
against the eager step's.

``--compiled`` adds the compiled step (``compile_search=True``: every step after the first
through ``torch.compile(_step, fullgraph=True, dynamic=False)``), compiled by TorchInductor for
the CPU in a fresh inductor cache: batch 1 and batch 8 over the four photos and their mirror
images, with the fused language models as the options give them. Per graph compiled (one per
batch shape, and one more where a photo's fusion gate gives it no language-model work): the
kernels inductor generated (``torch._inductor.metrics.generated_kernel_count``: its fused loop
nests, on the CPU grouped into a few C++ functions called one after the other, on a GPU each
about one Triton kernel), the calls the compiled step's wrapper makes a step (those C++
functions, and the operations it leaves to ATen: matrix products, top-k, sort, cumsum, each
its own kernel), and the seconds the call that compiled it took. The GPU's Triton backend
fuses by similar but not the same rules (reductions, and the externs it leaves, differ), so
this is a proxy for the GPU's kernels, not a count of them. And whether the compiled search
gives the eager device search's captions, word for word, on those eight frames.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_out_argument(p)
    p.add_argument(
        "--fused",
        action="store_true",
        help="also the fused step (fused_search=True: the bookkeeping in one Triton kernel, run "
        "here by Triton's interpreter): its torch operations a step and the kernel",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also compile the step (compile_search=True, TorchInductor on the CPU): its generated "
        "kernels and calls a step, the compile times, and its captions against the eager search's",
    )
    return p


def count_steps(captioner, frames: list) -> dict[int, list[tuple[int, int]]]:
    """{step number: [(kernel operations, others) of that step in each search]}."""
    from edgecap.decoding import device

    steps: dict[int, list[tuple[int, int]]] = {}

    original = device._step

    def counted(loop, t, number, carry):
        with C.operation_counter() as count:
            result = original(loop, t, number, carry)
        steps.setdefault(int(number) if t is None else t, []).append((count.kernels, count.others))
        return result

    device._step = counted
    try:
        captioner.caption_batch(frames)
    finally:
        device._step = original
    return steps


def count_fused_steps(captioner, frames: list) -> dict[int, list[tuple[int, int]]]:
    """As ``count_steps`` for the fused search's steps (``_fused_step``): its torch operations
    plus its Triton kernels' launches, the bookkeeping's and the language models' (the
    interpreter's own work on the CPU is not counted: on a GPU a kernel is one launch)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from edgecap.decoding import device, device_kernel, lm_kernels, step_kernels

    steps: dict[int, list[tuple[int, int]]] = {}
    fused, bookkeeping = device._fused_step, device_kernel.bookkeeping
    lm_made, step_made = lm_kernels._kernels, step_kernels._kernels
    launched = [0]

    def outside(*args, **kwargs):
        launched[0] += 1
        with _disable_current_modes():
            return bookkeeping(*args, **kwargs)

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[0] += 1
                with _disable_current_modes():
                    return self.kernel[grid](*args, **kwargs)

            return launch

    kernels = {name: Launch(kernel) for name, kernel in lm_made().items()}
    decoder_kernels = {name: Launch(kernel) for name, kernel in step_made().items()}

    def counted(loop, t, number, carry):
        launched[0] = 0
        with C.operation_counter() as count:
            result = fused(loop, t, number, carry)
        steps.setdefault(int(number), []).append((count.kernels + launched[0], count.others))
        return result

    device._fused_step, device_kernel.bookkeeping = counted, outside
    lm_kernels._kernels, step_kernels._kernels = (lambda: kernels), (lambda: decoder_kernels)
    try:
        captioner.caption_batch(frames)
    finally:
        device._fused_step, device_kernel.bookkeeping = fused, bookkeeping
        lm_kernels._kernels, step_kernels._kernels = lm_made, step_made
    return steps


def fused_part(photos: list, mirrored: list, eager_ops: dict) -> tuple[list[dict], str]:
    """The fused step's operations a step (the first step, and the steps from the third on),
    against the eager step's."""
    from edgecap import Captioner, CaptionOptions

    rows = []
    for fusion in ("default", "off"):
        for batch, frames in ((1, photos), (8, mirrored)):
            extra = {} if fusion == "default" else {"fusion_weight": 0.0}
            options = CaptionOptions(batch_size=batch, **extra)
            captioner = Captioner(
                backend="torch", device="cpu", search="device", fused_search=True, options=options
            )
            captioner.caption_batch(frames[:1])
            steps = count_fused_steps(captioner, frames)
            for label, numbers in (("0", [0]), (">= 3", [t for t in steps if t >= 3])):
                counts = [c for t in numbers for c in steps.get(t, [])]
                kernels = float(np.median([k for k, _ in counts]))
                rows.append(
                    {
                        "fusion": fusion,
                        "batch": batch,
                        "steps": label,
                        "kernel_ops": kernels,
                        "max_kernel_ops": max(k for k, _ in counts),
                        "eager_kernel_ops": eager_ops[(fusion, batch, label)],
                        "searches": len(counts),
                    }
                )
            print(f"fused, fusion {fusion}, batch {batch}: {kernels:.0f} kernel ops a step", file=sys.stderr)
    table = C.markdown_table(
        [
            "language models",
            "batch",
            "steps",
            "kernel operations a step, the Triton kernels included (median)",
            "max",
            "eager (the table above)",
            "fewer",
        ],
        [
            [
                "fused (default)" if r["fusion"] == "default" else "off",
                r["batch"],
                r["steps"],
                r["kernel_ops"],
                r["max_kernel_ops"],
                r["eager_kernel_ops"],
                f"{r['eager_kernel_ops'] / r['kernel_ops']:.1f}x",
            ]
            for r in rows
        ],
    )
    markdown = (
        "## The fused step\n\n`--fused`: `fused_search=True`, every step with its "
        "bookkeeping in one Triton kernel (`edgecap.decoding.device_kernel`), the language "
        "models' element-wise work in four (`edgecap.decoding.lm_kernels`) and the decoder "
        "step's gathers and joins in three (`edgecap.decoding.step_kernels`), run here by "
        "Triton's interpreter on CPU tensors; the first step and the steps from the third on: the "
        "torch operations that launch a kernel (the language models' matrix products, tanh, exp, "
        "log and sum; the decoder's matrix products, LSTM cell, tanh, sigmoid, softmax, "
        "log-softmax; the top K) plus the Triton kernels, one launch each "
        "on a GPU. The same hypotheses as the eager step's, bit for bit "
        "(`tests/test_device_search.py`).\n\n" + table + "\n"
    )
    return rows, markdown


# a statement of the compiled wrapper's ``call``: a generated kernel (C++ on the CPU, Triton on a
# GPU), or an operation left to ATen (``extern_kernels.mm``, ``torch.ops.aten.topk.default``)
GENERATED_CALL = re.compile(r"^\s*(?:\w+\s*=\s*)?((?:cpp_fused|kernel_cpp)\w*|triton_\w+)(?:\.run)?\(")
EXTERN_CALL = re.compile(
    r"^\s*(?:\w+\s*=\s*)?(?:extern_kernels\.(\w+)|torch\.ops\.\w+\.(\w+)\.\w+|aten\.(\w+)\.\w+)\("
)


def wrapper_calls(code: str) -> tuple[int, dict[str, int]]:
    """The output code of one compiled graph -> (generated kernels its ``call`` runs, {ATen
    operation: calls}): what one run of the graph launches."""
    body = code[code.index("def call(") :]
    generated, extern = 0, {}
    for line in body.splitlines()[1:]:
        if re.match(r"^\s*def \w+\(", line) or re.match(r"^\S", line):
            break  # the next function, or the end of the wrapper
        if GENERATED_CALL.match(line):
            generated += 1
        elif m := EXTERN_CALL.match(line):
            name = next(g for g in m.groups() if g)
            extern[name] = extern.get(name, 0) + 1
    return generated, extern


def compiled_graphs(captioner, frames: list) -> tuple[list, list[dict]]:
    """Caption ``frames`` with a captioner whose device search is compiled; -> (its captions,
    one record per graph compiled meanwhile: batch, language models, generated kernels,
    wrapper calls a step, compile seconds, steps run through it)."""
    from torch._inductor import metrics
    from torch._inductor.graph import GraphLowering

    from edgecap.decoding import device

    codes: list[str] = []
    graphs: list[dict] = []
    real = device._compiled_step()

    def timed(loop, t, number, carry):
        made, kernels = len(codes), metrics.generated_kernel_count
        start = time.perf_counter()
        result = real(loop, t, number, carry)
        seconds = time.perf_counter() - start
        lms = carry[8] is not None
        if len(codes) > made:
            generated, extern = wrapper_calls(codes[-1])
            graphs.append(
                {
                    "batch": loop.plan.n_images,
                    "lms": lms,
                    "generated_kernels": metrics.generated_kernel_count - kernels,
                    "wrapper_generated_calls": generated,
                    "extern_calls": extern,
                    "compile_s": round(seconds, 1),
                    "steps": 0,
                }
            )
        for graph in graphs:
            if (graph["batch"], graph["lms"]) == (loop.plan.n_images, lms):
                graph["steps"] += 1
        return result

    original_save, original_made = GraphLowering.save_output_code, device._compiled_step
    GraphLowering.save_output_code = staticmethod(codes.append)
    device._compiled_step = lambda: timed
    try:
        captions = captioner.caption_batch(frames)
    finally:
        GraphLowering.save_output_code = original_save
        device._compiled_step = original_made
    return captions, graphs


def compiled_part(frames: list, eager_ops: dict[str, float]) -> tuple[list[dict], list[dict], str]:
    """The compiled step at batch 1 and 8 over ``frames`` (the photos and their mirror images),
    compiled in a fresh inductor cache: (graph rows, caption rows, markdown)."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    from edgecap import Captioner, CaptionOptions

    graphs, checks = [], []
    with tempfile.TemporaryDirectory(prefix="step_ops_inductor_") as cache:
        with temporary_cache_dir(cache):
            torch._dynamo.reset()
            for batch in (1, 8):
                options = CaptionOptions(batch_size=batch)
                eager = Captioner(backend="torch", device="cpu", search="device", options=options)
                compiled = Captioner(
                    backend="torch", device="cpu", search="device", compile_search=True, options=options
                )
                want = eager.caption_batch(frames)
                before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                got, made = compiled_graphs(compiled, frames)
                # every graph dynamo made is one of these: no recompile of a shape
                assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == len(made)
                graphs += made
                same = [a.text == b.text for a, b in zip(want, got, strict=True)]
                checks.append(
                    {
                        "batch": batch,
                        "frames": len(frames),
                        "same_captions": sum(same),
                        "differing": [
                            [i, a.text, b.text] for i, (a, b, s) in enumerate(zip(want, got, same)) if not s
                        ],
                        "max_score_difference": max(abs(a.score - b.score) for a, b in zip(want, got)),
                    }
                )
                print(
                    f"compiled, batch {batch}: {len(made)} graphs, {sum(same)}/{len(frames)} same",
                    file=sys.stderr,
                )
            torch._dynamo.reset()
    for graph in graphs:
        graph["extern_total"] = sum(graph["extern_calls"].values())
        graph["calls_per_step"] = graph["wrapper_generated_calls"] + graph["extern_total"]
        graph["gpu_kernels_estimate"] = graph["generated_kernels"] + graph["extern_total"]
        graph["eager_kernel_ops"] = eager_ops["default" if graph["lms"] else "off"]
    table = C.markdown_table(
        [
            "batch",
            "language models",
            "generated kernels",
            "C++ functions called a step",
            "ATen operations a step",
            "calls a step (CPU)",
            "generated + ATen (about a GPU's kernels)",
            "eager kernel operations a step",
            "compile, s",
            "compiled steps run",
        ],
        [
            [
                g["batch"],
                "fused" if g["lms"] else "none (gated off)",
                g["generated_kernels"],
                g["wrapper_generated_calls"],
                ", ".join(f"{name} {n}" for name, n in sorted(g["extern_calls"].items())),
                g["calls_per_step"],
                g["gpu_kernels_estimate"],
                f"{g['eager_kernel_ops']:.0f}",
                g["compile_s"],
                g["steps"],
            ]
            for g in graphs
        ],
    )
    captions = C.markdown_table(
        ["batch", "frames", "captions as the eager device search's", "largest score difference"],
        [[c["batch"], c["frames"], c["same_captions"], f"{c['max_score_difference']:.2g}"] for c in checks],
    )
    compile_times = [g["compile_s"] for g in graphs]
    markdown = (
        "## The compiled step\n\n"
        "`--compiled`: `compile_search=True` (every step after the first through "
        "`torch.compile(_step, fullgraph=True, dynamic=False)`), TorchInductor's CPU backend, a fresh "
        "inductor cache; the four photos and their mirror images at batch 1 and batch 8, the default "
        "options (the fused language models, beam 3), one torch thread. A graph per batch shape, and "
        "one more at batch 1 for the frames whose fusion gate gives them no language-model work. "
        "*Generated kernels*: `torch._inductor.metrics.generated_kernel_count`, inductor's fused loop "
        "nests, which on the CPU it groups into the few C++ functions the step calls, and which on a "
        "GPU would each be about one Triton kernel; *ATen operations*: what the compiled step leaves "
        "to ATen, each its own kernel (`addmm` the matrix products); *calls a step (CPU)*: the C++ "
        "functions and the ATen operations. A GPU would launch about generated kernels + ATen "
        "operations a step, against the eager step's kernel operations (the table above, steps "
        ">= 3). Triton fuses by similar but not the same rules as the C++ backend (reductions, and "
        "which operations it leaves to ATen, differ, and ATen's top-k and "
        "sort are several kernels on CUDA): a proxy, not a GPU's count. *Compile, s*: the call that "
        "compiled the graph, in the order compiled (the first in a cold process); median "
        f"{float(np.median(compile_times)):.1f} s.\n\n{table}\n\n"
        f"Captions of the compiled search against the eager device search's, word for word:\n\n{captions}\n"
    )
    return graphs, checks, markdown


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help needs no torch
    if args.fused:  # the kernel on CPU tensors: Triton's interpreter, chosen when triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from edgecap import Captioner, CaptionOptions
    from edgecap.images import load_rgb

    torch.set_num_threads(1)
    photos = [
        np.asarray(load_rgb(str(p))) for p in sorted(C.EXAMPLES.iterdir()) if p.suffix in (".png", ".jpg")
    ]
    mirrored = photos + [np.ascontiguousarray(p[:, ::-1]) for p in photos]
    rows = []
    for fusion in ("default", "off"):
        for batch, frames in ((1, photos), (8, mirrored)):
            extra = {} if fusion == "default" else {"fusion_weight": 0.0}
            options = CaptionOptions(batch_size=batch, **extra)
            captioner = Captioner(backend="torch", device="cpu", search="device", options=options)
            captioner.caption_batch(frames[:1])  # warm: the masks and tables made once
            steps = count_steps(captioner, frames)
            for label, numbers in (("0", [0]), ("1-2", [1, 2]), (">= 3", [t for t in steps if t >= 3])):
                counts = [c for t in numbers for c in steps.get(t, [])]
                rows.append(
                    {
                        "fusion": fusion,
                        "batch": batch,
                        "steps": label,
                        "kernel_ops": float(np.median([k for k, _ in counts])),
                        "max_kernel_ops": max(k for k, _ in counts),
                        "others": float(np.median([o for _, o in counts])),
                        "searches": len(counts),
                    }
                )
            print(
                f"fusion {fusion}, batch {batch}: {rows[-1]['kernel_ops']:.0f} kernel ops a step",
                file=sys.stderr,
            )
    table = C.markdown_table(
        ["language models", "batch", "steps", "kernel operations (median)", "max", "views and allocations"],
        [
            [
                "fused (default)" if r["fusion"] == "default" else "off",
                r["batch"],
                r["steps"],
                r["kernel_ops"],
                r["max_kernel_ops"],
                r["others"],
            ]
            for r in rows
        ],
    )
    markdown = (
        f"The device search on CPU tensors (torch {torch.__version__}), the example photos, beam 3. "
        f"The fusion gate gives one of the four photos no language-model work.\n\n{table}\n"
    )
    data: dict = {"rows": rows}
    if args.fused:
        eager = {(r["fusion"], r["batch"], r["steps"]): r["kernel_ops"] for r in rows}
        data["fused"], part = fused_part(photos, mirrored, eager)
        markdown += "\n" + part
    if args.compiled:
        eager_ops = {r["fusion"]: r["kernel_ops"] for r in rows if r["steps"] == ">= 3" and r["batch"] == 8}
        graphs, checks, part = compiled_part(mirrored, eager_ops)
        data.update(compiled_graphs=graphs, compiled_captions=checks)
        markdown += "\n" + part
    C.write_results("step_ops", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
