"""How many torch operations one step of the beam search on the device dispatches: on a GPU each
is a kernel (or a few), and the decode is bound by their number (docs/gpu-search.md).

    python benchmarks/step_ops.py [--out DIR]

The shipped model's torch backend on CPU tensors (``search="device"``, default options, beam 3,
one torch thread) captions the example photos: batch 1 (each photo alone) and batch 8 (the four
and their mirror images), with the fused language models as the options give them and with
``fusion_weight=0``. A ``TorchDispatchMode`` (``_common.operation_counter``) counts every
operation ``_step`` dispatches; an operation that returns (a view of) its input and writes
nothing, or only allocates, launches no kernel and is counted apart. Reported per step number:
the medians over the searches of the kernel operations, and of the others. On CUDA an LSTM
cell is about 3 kernels and a stable sort several, so a GPU runs a few more kernels a step than
this counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_out_argument(p)
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


def main(argv=None) -> int:
    import torch

    from edgecap import Captioner, CaptionOptions
    from edgecap.images import load_rgb

    args = build_parser().parse_args(argv)
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
    C.write_results("step_ops", {"rows": rows}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
