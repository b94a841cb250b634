"""What ``Captioner(overlap=True)`` buys a GPU's host, with the GPU stood in for by a wait:
``caption_batch`` over several batches, each batch's host work after its search (the real code:
the device search's result unpacked, the consensus choice, the tags, the confidence, the
``Caption`` objects) done in a second thread while the next batch is "searched".

    python benchmarks/overlap.py [--out DIR] [--batch 64] [--batches 8] [--device-ms 12.8]
                                 [--search-host-ms 3.0] [--rounds 5]

The shipped model's torch backend runs the device search on the CPU (as on a GPU: its result
packed, unpacked on the host) for the example photos and their mirror images once; then every
batch's search is replaced by a stand-in that holds the interpreter's lock for
``--search-host-ms`` (Python work, as the host's part of the search before the device's: the
batch's stack into the kept buffer takes 3.0 ms for 64 images on a 2-core Intel Xeon,
``benchmarks/results/host_share.md``; 7.3 ms for 64 VGA frames) and then waits ``--device-ms``
with it released, as a CUDA synchronisation does (12.8 ms is 5,000 captions/s at batch 64, issue
24's target), and returns the recorded result, whose unpacking and consensus are left to the
host work after it as the overlap leaves them. The photos' preprocessing is recorded too (on a
GPU ``preprocess="device"`` does it there). What is timed: the calls' wall time, overlap off and
on alternately, medians; the captions of both are checked equal. What it does not show: the
GPU's own time, and how the H200 host's cores compare with this one's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--batch", type=int, default=64, help="images a batch (batch_size)")
    p.add_argument("--batches", type=int, default=8, help="batches a caption_batch call")
    p.add_argument("--device-ms", type=float, default=12.8, help="the stand-in GPU's wait a batch")
    p.add_argument(
        "--search-host-ms",
        type=float,
        default=3.0,
        help="the stand-in search's host work a batch (the lock held)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed calls per setting")
    C.add_out_argument(p)
    return p


def _busy(ms: float) -> None:
    """Python work holding the interpreter's lock for ``ms``."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def standing_in(captioner, frames: list, device_ms: float, search_host_ms: float) -> dict:
    """Replace the captioner's preprocessing and search by the recorded ones (the search after
    its stand-in work); -> the finishing time per batch, measured (ms, median)."""
    prepared = {id(f): captioner._prepare(f, "rgb") for f in frames}
    # the hypotheses deferred: a function unpacking the recorded result, called by _finished
    first = [prepared[id(f)].x for f in frames[: captioner.options.batch_size]]
    searched = captioner._search(first, False, True)

    def search(batch, return_attention, deferred=False, options=None, held=None):
        _busy(search_host_ms)
        time.sleep(device_ms / 1e3)  # the GIL released, as in a CUDA synchronisation
        return searched

    captioner._prepare = lambda image, color, options=None: prepared[id(image)]
    captioner._search = search
    part = [prepared[id(f)] for f in frames[: captioner.options.batch_size]]
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        captioner._finished(part, searched)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"finishing_ms": C.median(times)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    from edgecap import Captioner
    from edgecap.images import load_rgb

    examples = sorted(p for p in C.EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    photos = [np.asarray(load_rgb(str(p))) for p in examples]
    photos += [np.ascontiguousarray(p[:, ::-1]) for p in photos]
    # every batch the same photos in the same order, the recorded search's result fits each
    one = [photos[i % len(photos)] for i in range(args.batch)]
    frames = one * args.batches
    captioner = Captioner(backend="torch", search="device", batch_size=args.batch, decode_workers=0)
    figures = standing_in(captioner, one, args.device_ms, args.search_host_ms)
    walls: dict[bool, list[float]] = {False: [], True: []}
    texts = {}
    for _ in range(args.rounds):
        for overlap in (False, True):
            captioner.overlap = overlap
            t0 = time.perf_counter()
            captions = captioner.caption_batch(frames)
            walls[overlap].append(time.perf_counter() - t0)
            texts[overlap] = [c.text for c in captions]
    if texts[False] != texts[True]:
        raise SystemExit("overlap: the captions with and without the overlap differ")
    n = len(frames)
    per_batch = args.search_host_ms + args.device_ms
    row = {
        "batch": args.batch,
        "batches": args.batches,
        "device_ms": args.device_ms,
        "search_host_ms": args.search_host_ms,
        **figures,
        "off_captions_per_s": n / C.median(walls[False]),
        "on_captions_per_s": n / C.median(walls[True]),
        "off_ms_per_batch": C.median(walls[False]) * 1e3 / args.batches,
        "on_ms_per_batch": C.median(walls[True]) * 1e3 / args.batches,
        # nothing overlapped: search + finishing a batch; all of it: the longer of the two
        "serial_ms_per_batch": per_batch + figures["finishing_ms"],
        "ideal_ms_per_batch": max(per_batch, figures["finishing_ms"]),
    }
    row["speedup"] = row["on_captions_per_s"] / row["off_captions_per_s"]
    print(
        f"batch {args.batch} x {args.batches}: off {row['off_captions_per_s']:.0f}/s, on "
        f"{row['on_captions_per_s']:.0f}/s ({row['speedup']:.2f}x); finishing "
        f"{figures['finishing_ms']:.2f} ms a batch",
        file=sys.stderr,
    )
    table = C.markdown_table(
        [
            "batch x batches",
            "stand-in search: host + device ms",
            "captions built, ms a batch",
            "overlap off: ms a batch (captions/s)",
            "on",
            "on / off",
            "serial / ideal ms a batch",
        ],
        [
            [
                f"{args.batch} x {args.batches}",
                f"{args.search_host_ms} + {args.device_ms}",
                f"{figures['finishing_ms']:.2f}",
                f"{row['off_ms_per_batch']:.2f} ({row['off_captions_per_s']:.0f})",
                f"{row['on_ms_per_batch']:.2f} ({row['on_captions_per_s']:.0f})",
                f"{row['speedup']:.2f}x",
                f"{row['serial_ms_per_batch']:.2f} / {row['ideal_ms_per_batch']:.2f}",
            ]
        ],
    )
    intro = (
        "caption_batch of the batches, overlap off and on alternately (wall time, median); "
        "the search stood in for by its host work (the lock held) and a wait (released) "
        "returning a recorded result; captions built: Captioner._finished of one batch."
    )
    C.write_results("overlap", {"rows": [row]}, intro + "\n\n" + table, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
