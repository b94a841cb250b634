"""The host's work per image around the beam search on the device: what a GPU cannot take off
the CPU, and so a ceiling on captions/s per host core whatever the GPU (issue 24 asks 5,000
captions/s at batch 64: 0.2 ms an image in all).

    python benchmarks/host_share.py [--out DIR] [--batches 1,8,64] [--rounds 5]

The shipped model's torch backend on the CPU with ``search="device"`` (the search the GPU runs,
here on CPU tensors; one torch thread) captions the example photos and their mirror images,
repeated to each batch size, in memory. Timed per call, in the thread's CPU time
(``time.thread_time``: the host's own work, which another busy process on the machine slows
less than wall time) and wall time, per image:

- *unpack*: the search's one copied-back result into each image's hypotheses
  (``edgecap.decoding.device.unpack``);
- *consensus*: the choice of the caption among the endings (``Consensus.order``);
- *captions*: the object tags from the class probabilities and each ``Caption`` (words,
  confidence, alternatives: ``Captioner._finished``, the host's work after the search);
- *preprocess*: each frame to the encoder's input (``timings["preprocess_ms"]``, Pillow and
  numpy on the host; on a GPU ``preprocess="device"`` moves it there).

The encoder and the search's own steps run on the GPU there and are not counted. One host
core's ceiling: 1000 / (the three after the search + preprocess) captions/s.

*stack*: the batch's stack before the encoder (its preprocessed images, or camera frames for
``preprocess="device"``), by ``np.stack`` into a new array and into the kept buffer the torch
backend stages its batches in on CUDA (``edgecap.backends.staging``; pageable here), by one
thread and as the staging does it (a large batch shared between threads).

*warm*: each part's calls again on the same inputs right after the call, three times in a row,
the last one timed. Here the CPU encoder runs between calls on the same core and leaves the
host's caches cold for the parts after it (at batch 1 that is most of their time); on a GPU's
host the encoder does not, so the figure there lies between the two.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

PARTS = ("unpack", "consensus", "captions")


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_out_argument(p)
    p.add_argument("--batches", default="1,8,64", help="batch sizes, comma-separated (default: 1,8,64)")
    p.add_argument(
        "--rounds", type=int, default=5, help="timed calls per batch size, after one warm call (default: 5)"
    )
    return p


class Timers:
    """Wraps functions so that each call adds its thread CPU time and wall time to a part, and
    keeps the call (``calls``) to be run again warm (``warm``)."""

    def __init__(self):
        self.depth = 0
        self.reset()

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if self.depth:  # already inside a timed part: counted there
                return fn(*args, **kwargs)
            self.depth += 1
            self.calls.append((part, fn, args, kwargs))
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[part] += time.thread_time() - c0
                self.wall[part] += time.perf_counter() - w0
                self.depth -= 1

        return timed

    def warm(self, passes: int = 3) -> dict:
        """Each part's calls of the last ``caption_batch`` again, ``passes`` times in a row
        (the same inputs: the host's caches warm): the last pass's thread CPU time per part."""
        cpu = dict.fromkeys(PARTS, 0.0)
        self.depth = 1  # the calls inside are not counted again
        try:
            for part, fn, args, kwargs in self.calls:
                for _ in range(passes):
                    c0 = time.thread_time()
                    fn(*args, **kwargs)
                    spent = time.thread_time() - c0
                cpu[part] += spent
        finally:
            self.depth = 0
        return cpu

    def reset(self):
        self.cpu = dict.fromkeys(PARTS, 0.0)
        self.wall = dict.fromkeys(PARTS, 0.0)
        self.calls: list = []


def measure(captioner, frames: list, rounds: int, timers: Timers) -> dict:
    """Per image, the median over ``rounds`` calls of each part (ms, CPU and wall) and of
    the frames' preprocessing."""
    captioner.caption_batch(frames)  # warm
    cpu = {p: [] for p in PARTS}
    wall = {p: [] for p in PARTS}
    warm = {p: [] for p in PARTS}
    prep = []
    for _ in range(rounds):
        timers.reset()
        captions = captioner.caption_batch(frames)
        for p in PARTS:
            cpu[p].append(timers.cpu[p] * 1e3 / len(frames))
            wall[p].append(timers.wall[p] * 1e3 / len(frames))
        for p, spent in timers.warm().items():
            warm[p].append(spent * 1e3 / len(frames))
        prep.append(float(np.mean([c.timings["preprocess_ms"] for c in captions])))
    return {
        "cpu_ms": {p: C.median(v) for p, v in cpu.items()},
        "wall_ms": {p: C.median(v) for p, v in wall.items()},
        "warm_cpu_ms": {p: C.median(v) for p, v in warm.items()},
        "preprocess_ms": C.median(prep),
    }


STACKS = ("fresh", "kept", "kept_split")


def stacks(batch: int, rounds: int) -> dict:
    """The batch's stack before the encoder, ms an image (wall, median of ``rounds`` after one
    warm call): its preprocessed images (float32 3 x 224 x 224) or VGA camera frames (uint8
    480 x 640 x 3, ``preprocess="device"``), by ``np.stack`` into a new array (``fresh``) and
    into the kept buffer of ``edgecap.backends.staging`` by one thread (``kept``) and as it
    stacks (``kept_split``: a large batch shared between ``STACK_THREADS`` threads), what the
    torch backend does on CUDA, there page-locked. The variants take turns, round by round."""
    import torch

    from edgecap.backends import staging

    out = {}
    threads = staging.STACK_THREADS
    for what, items in C.batch_arrays(batch, np.random.default_rng(0)).items():
        kept = staging.Staging(torch.device("cpu"))

        def one_thread(arrays, kept=kept):
            staging.STACK_THREADS = 1
            try:
                return kept.stack(arrays)
            finally:
                staging.STACK_THREADS = threads

        calls = {"fresh": np.stack, "kept": one_thread, "kept_split": kept.stack}
        times: dict[str, list[float]] = {how: [] for how in calls}
        for call in calls.values():
            call(items)
        for _ in range(rounds):
            for how, call in calls.items():
                t0 = time.perf_counter()
                call(items)
                times[how].append((time.perf_counter() - t0) * 1e3 / batch)
        for how, spent in times.items():
            out[f"{what}_{how}"] = C.median(spent)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help needs no torch
    import torch

    import edgecap.api as api
    import edgecap.backends.torch_search as torch_search
    from edgecap.backends import staging
    from edgecap import Captioner, CaptionOptions
    from edgecap.decoding.consensus import Consensus
    from edgecap.images import load_rgb

    torch.set_num_threads(1)
    photos = [
        np.asarray(load_rgb(str(p))) for p in sorted(C.EXAMPLES.iterdir()) if p.suffix in (".png", ".jpg")
    ]
    photos += [np.ascontiguousarray(p[:, ::-1]) for p in photos]
    timers = Timers()
    kept = (torch_search.unpack, Consensus.order, api.Captioner._finished)
    torch_search.unpack = timers.wrap("unpack", kept[0])
    Consensus.order = timers.wrap("consensus", kept[1])
    api.Captioner._finished = timers.wrap("captions", kept[2])
    rows = []
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            frames = [photos[i % len(photos)] for i in range(batch)]
            captioner = Captioner(
                backend="torch", device="cpu", search="device", options=CaptionOptions(batch_size=batch)
            )
            figures = measure(captioner, frames, args.rounds, timers)
            figures["stack_ms"] = stacks(batch, max(args.rounds, 5))
            after = sum(figures["cpu_ms"].values())
            warm = sum(figures["warm_cpu_ms"].values())
            rows.append(
                {
                    "batch": batch,
                    **figures,
                    "after_search_cpu_ms": after,
                    "after_search_warm_cpu_ms": warm,
                    "ceiling_per_core": 1000.0 / (after + figures["preprocess_ms"]),
                    "ceiling_per_core_device_prep": 1000.0 / after,
                    "ceiling_per_core_device_prep_warm": 1000.0 / warm,
                }
            )
            print(
                f"batch {batch}: {after:.3f} ms an image after the search (CPU time; warm {warm:.3f})",
                file=sys.stderr,
            )
    finally:
        torch_search.unpack, Consensus.order, api.Captioner._finished = kept
    table = C.markdown_table(
        [
            "batch",
            "unpack",
            "consensus",
            "captions",
            "after the search",
            "warm",
            "preprocess (wall)",
            "captions/s per core",
            "with preprocess on the GPU",
            "the same, warm",
        ],
        [
            [
                r["batch"],
                r["cpu_ms"]["unpack"],
                r["cpu_ms"]["consensus"],
                r["cpu_ms"]["captions"],
                r["after_search_cpu_ms"],
                r["after_search_warm_cpu_ms"],
                r["preprocess_ms"],
                r["ceiling_per_core"],
                r["ceiling_per_core_device_prep"],
                r["ceiling_per_core_device_prep_warm"],
            ]
            for r in rows
        ],
    )
    stack_table = C.markdown_table(
        [
            "batch",
            "preprocessed images, fresh",
            "kept",
            "kept, split",
            "VGA frames, fresh",
            "kept",
            "kept, split",
        ],
        [
            [r["batch"], *(r["stack_ms"][f"{w}_{h}"] for w in ("preprocessed", "frames") for h in STACKS)]
            for r in rows
        ],
    )
    markdown = (
        "The host's work per image around the device search (ms an image, the thread's CPU time, "
        f"median of {args.rounds} calls; preprocess: wall time), the example photos and their "
        "mirror images repeated to each batch, beam 3, default options. One host core's ceiling: "
        "1000 / (after the search + preprocess) captions/s, and with the frames preprocessed "
        "on the GPU 1000 / (after the search). warm: the same calls again at once, three times, "
        "the last timed (the host's caches warm; here the encoder runs on the same CPU "
        "between calls and leaves them cold, on a GPU's host less so).\n\n" + table + "\n\n"
        "The batch's stack before the encoder, ms an image (wall, median): the preprocessed "
        "images (float32 3 x 224 x 224) or VGA frames (uint8 480 x 640 x 3, the device "
        "preprocessing's input) by `np.stack` into a new array (fresh) and into a kept buffer "
        "(`edgecap.backends.staging`, the torch backend's on CUDA, page-locked there) by one "
        "thread (kept) and as the staging stacks it (split: a batch of at least "
        f"{staging.SPLIT_AT_LEAST >> 20} MiB shared between {staging.STACK_THREADS} threads); "
        "the three take turns.\n\n" + stack_table + "\n"
    )
    C.write_results("host_share", {"rows": rows}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
