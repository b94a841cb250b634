"""Decoding cost of two model directories side by side: median ms of one decoder step.

    python benchmarks/step_compare.py edgecap/assets/default runs/models/other
    python benchmarks/step_compare.py A B --rounds 2 --per-round 10   # a quick try, not a figure

One decoder step for 3 rows (one photo x beam 3) and one encoder pass per model, onnxruntime CPU
with 1 intra-op thread (``--threads``), each model in its own worker process (the isolated
harness, ``benchmarks/_isolated.py``): rounds interleaved across the two models with one worker
running at a time, then each model alone; a model whose interleaved median is more than 15% off
its alone median is flagged. Prints the medians and the step-time ratio B / A (from the
interleaved medians) and writes them with every timed call to step_compare.json / .md in
``--out DIR`` (default: a new folder under benchmarks/runs/, which git ignores). Use it to see
what a bigger decoder costs per word before training one to the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import _common as C
import _isolated as I


class StepTask:
    """In the worker: the two sessions and their feeds; measures ``step`` and ``encoder``."""

    def __init__(self, model: str, threads: int):
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        cpu = ["CPUExecutionProvider"]
        model = Path(model)
        encoder = ort.InferenceSession(str(model / "encoder.onnx"), options, providers=cpu)
        step = ort.InferenceSession(str(model / "decoder_step.onnx"), options, providers=cpu)
        image = {encoder.get_inputs()[0].name: rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)}
        out = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, image)))
        rows = 3
        vocab = next((i.shape[1] for i in step.get_inputs() if i.name == "word_bias"), 1)
        feed = {
            "tokens": np.full(rows, 1, np.int32),
            "h": np.repeat(out["h0"], rows, 0),
            "c": np.repeat(out["c0"], rows, 0),
            "source_rows": np.zeros(rows, np.int32),
            "features": out["features"],
            "att_proj": out["att_proj"],
            "image_index": np.zeros(rows, np.int32),
            "word_bias": np.zeros((rows, vocab), np.float32),
        }
        feed = {i.name: feed[i.name] for i in step.get_inputs()}
        self.info = {"model": str(model), "threads": threads}
        self.measures = {"step": lambda: step.run(None, feed), "encoder": lambda: encoder.run(None, image)}


def make_task(**kwargs) -> StepTask:
    return StepTask(**kwargs)


def model_folder(text: str) -> Path:
    """A model directory as the argument is read: a folder holding the ``encoder.onnx`` and
    ``decoder_step.onnx`` each worker loads (one that is not there had been onnxruntime's
    34-line traceback from the worker, after the other model's worker had started)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    missing = [n for n in ("encoder.onnx", "decoder_step.onnx") if not (path / n).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text}: no {' or '.join(missing)} (a model directory written by `edgecap export`)"
        )
    return path


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("a", type=model_folder, help="model directory A (the baseline)")
    p.add_argument("b", type=model_folder, help="model directory B")
    p.add_argument(
        "--threads", type=C.positive_int, default=1, help="onnxruntime intra-op threads of each session"
    )
    # --rounds, --per-round (steps and encoder passes per model and round), --warmup (per
    # worker, before its timed ones), --no-alone, --settle and --out
    C.add_harness_arguments(p, rounds=10, per_round=30, warmup=20)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    specs = [
        I.Spec(label, "step_compare:make_task", {"model": str(d.resolve()), "threads": args.threads})
        for label, d in (("A", args.a), ("B", args.b))
    ]
    result = C.run_harness(specs, ["step", "encoder"], args)
    lines = []
    for label, d in (("A", args.a), ("B", args.b)):
        step = result["measures"]["step"][label]
        encoder = result["measures"]["encoder"][label]
        alone = {
            n: e.get("alone", {}).get("median_ms", float("nan"))
            for n, e in (("step", step), ("encoder", encoder))
        }
        lines.append(
            f"{label} {d}: step {step['interleaved']['median_ms']:.3f} ms "
            f"(alone {alone['step']:.3f}), encoder "
            f"{encoder['interleaved']['median_ms']:.2f} ms "
            f"(alone {alone['encoder']:.2f})"
        )
    ratio = 1 / result["ratios"]["step"]["B"]
    lines.append(f"step ratio B / A: {ratio:.2f} (interleaved medians, separate processes)")
    data = {
        "models": {"A": str(args.a), "B": str(args.b)},
        "threads": args.threads,
        "step_ratio_b_over_a": ratio,
        **result,
    }
    C.write_results(
        "step_compare", data, "\n\n".join(lines) + "\n\n" + I.report_markdown(result), argv, out=args.out
    )
    for flag in result["flags"]:
        print(f"FLAG {flag}", file=sys.stderr)


if __name__ == "__main__":
    main()
