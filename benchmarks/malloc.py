"""glibc's malloc returning big blocks to the system, against keeping them: time per call and
minor page faults per call of ``Captioner.caption_batch`` on the CPU.

    python benchmarks/malloc.py [--out DIR] [--cases torch:8,torch:64,onnxruntime:64] [--rounds 3]

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MB on 64-bit) with
fresh pages from the system and gives them back on free, so a buffer that large, made and freed
in every call, is faulted in (zeroed by the kernel) page by page in every call. The torch
backend on the CPU makes such buffers for its activations from batch 8 on (64 x 32 x 112 x 112
float32 is 103 MB); onnxruntime keeps its own arena. ``GLIBC_TUNABLES`` set before the process
starts (``glibc.malloc.mmap_threshold`` and ``glibc.malloc.trim_threshold`` at 4 GiB: served
from the heap and kept there) removes the faults, at the price of the process keeping its peak
memory.

The same from inside the process (``edgecap.allocator.keep_freed_memory``: glibc's ``mallopt``,
what the command line does for ``--backend torch`` on the CPU) is the third variant, *kept*.

``train:N`` times one decoder training step of N captions (the shipped decoder's size, random
features) instead of a ``caption_batch`` call: what ``edgecap train`` does on the CPU.

Each case runs in its own process per variant (default / tuned / kept), the variants interleaved for
``--rounds`` rounds, each process one warm call then ``--calls`` timed ones of the example
photos repeated to the batch; reported: the median over rounds of each process's median
seconds a call, and its median minor page faults a call (``getrusage``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TUNED = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
# default: glibc as it comes; tuned: GLIBC_TUNABLES at the process's start; kept: the process
# calls edgecap.allocator.keep_freed_memory() first, as the command line does for torch on the CPU
VARIANTS = ("default", "tuned", "kept")


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_out_argument(p)
    p.add_argument(
        "--cases",
        default="torch:8,torch:64,onnxruntime:64",
        help="backend:batch pairs, comma-separated; train:N is one decoder training step of N "
        "captions instead of a caption_batch call (default: torch:8,torch:64,onnxruntime:64)",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--calls", type=int, default=3, help="timed calls per process (default: 3)")
    return p


def child(spec: str) -> int:
    """One process's measure: ``spec`` is BACKEND:BATCH:CALLS:VARIANT; prints a JSON line."""
    from edgecap import Captioner, CaptionOptions

    backend, batch, calls, variant = spec.split(":")
    if variant == "kept":
        from edgecap.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory: not glibc, nothing set")
    n = int(batch)
    if backend == "train":
        return _train_child(n, int(calls))
    frames = C.example_frames()
    frames = [frames[i % len(frames)] for i in range(n)]
    extra = {"device": "cpu"} if backend == "torch" else {}
    cap = Captioner(backend=backend, options=CaptionOptions(batch_size=n), **extra)
    cap.caption_batch(frames)
    return _timed(lambda: cap.caption_batch(frames), int(calls))


def _timed(call, calls: int) -> int:
    """``call`` ``calls`` times (after the caller's warm-up): prints the median seconds and
    minor page faults (``getrusage``) a call as one JSON line."""
    import resource
    import time

    seconds, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"s": C.median(seconds), "faults": C.median(faults)}))
    return 0


def _train_child(captions: int, calls: int) -> int:
    """``train:N``: one decoder training step (teacher forcing, cross-entropy, backward, Adam) of
    the shipped decoder's size, N captions of 20 words, five an image, on random features."""
    import torch
    import torch.nn.functional as F

    from edgecap.api import default_model_dir
    from edgecap.backends.torch import TorchBackend
    from edgecap.manifest import load_manifest

    decoder = TorchBackend(load_manifest(default_model_dir()), device="cpu").decoder.float().train()
    optimizer = torch.optim.Adam(decoder.parameters(), 1e-4)
    generator = torch.Generator().manual_seed(0)
    images = max(1, captions // 5)
    image_index = torch.arange(captions) % images

    def step() -> None:
        fmap = torch.randn(images, 49, decoder.cfg.encoder_dim, generator=generator)
        caps = torch.randint(4, decoder.cfg.vocab_size, (captions, 20), generator=generator)
        caps[:, 0] = 1
        logits, targets, _ = decoder(fmap, caps, image_index)
        optimizer.zero_grad()
        F.cross_entropy(logits, targets).backward()
        optimizer.step()

    for _ in range(3):
        step()
    return _timed(step, calls)


def measure(backend: str, batch: int, variant: str, calls: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if variant == "tuned":
        env["GLIBC_TUNABLES"] = TUNED
    done = subprocess.run(
        [sys.executable, __file__, "--child", f"{backend}:{batch}:{calls}:{variant}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_cases(spec: str) -> list[tuple[str, int]]:
    """``--cases``: BACKEND:BATCH pairs, comma-separated -> [(backend, batch)]; anything else
    is refused in one line."""
    cases = []
    for item in spec.split(","):
        backend, _, batch = item.strip().partition(":")
        if not backend or not batch.isdigit() or int(batch) < 1:
            sys.exit(f"--cases takes BACKEND:BATCH pairs, comma-separated (torch:8,train:64), got {item!r}")
        cases.append((backend, int(batch)))
    return cases


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":  # one measure, in a process of its own (measure)
        return child(argv[1])
    args = build_parser().parse_args(argv)
    cases = parse_cases(args.cases)
    got: dict = {(b, n, v): [] for b, n in cases for v in VARIANTS}
    for r in range(args.rounds):
        for backend, batch in cases:
            for variant in VARIANTS:
                m = measure(backend, batch, variant, args.calls)
                got[(backend, batch, variant)].append(m)
                print(
                    f"round {r + 1}: {backend} batch {batch} {variant}: {m['s']:.3f} s, "
                    f"{m['faults']:.0f} faults",
                    file=sys.stderr,
                )
    rows = []
    for backend, batch in cases:
        row: dict = {"backend": backend, "batch": batch}
        for variant in VARIANTS:
            runs = got[(backend, batch, variant)]
            row[variant] = {
                "s": C.median([m["s"] for m in runs]),
                "faults": C.median([m["faults"] for m in runs]),
                "runs": runs,
            }
        row["speedup"] = row["default"]["s"] / row["tuned"]["s"]
        row["speedup_kept"] = row["default"]["s"] / row["kept"]["s"]
        rows.append(row)
    table = C.markdown_table(
        [
            "backend",
            "batch",
            "s a call",
            "page faults a call",
            "tuned: s a call",
            "page faults",
            "speed-up",
            "kept: s a call",
            "page faults",
            "speed-up",
        ],
        [
            [
                r["backend"],
                r["batch"],
                r["default"]["s"],
                r["default"]["faults"],
                r["tuned"]["s"],
                r["tuned"]["faults"],
                f"{r['speedup']:.2f}x",
                r["kept"]["s"],
                r["kept"]["faults"],
                f"{r['speedup_kept']:.2f}x",
            ]
            for r in rows
        ],
    )
    markdown = (
        f"`caption_batch` of the example photos repeated to the batch, on the CPU; each case and "
        f"variant in its own process, {args.rounds} interleaved rounds, the median of each "
        f"process's median of {args.calls} calls. tuned: `GLIBC_TUNABLES={TUNED}`; kept: "
        "`edgecap.allocator.keep_freed_memory()` first (what the command line does for the torch "
        "backend on the CPU).\n\n"
        f"Load average: {C.load_average()}.\n\n" + table + "\n"
    )
    C.write_results("malloc", {"rows": rows, "tunables": TUNED}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
