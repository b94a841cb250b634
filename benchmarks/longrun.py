"""Long run: caption a few thousand images in one process and watch resident memory (RSS) and open
file descriptors; after a warm-up both should stay flat.

    python benchmarks/longrun.py --model runs/m                  # 3000 images, batches of 8
    python benchmarks/longrun.py --model runs/m --n-images 200   # a quick check

Images are made on the fly from the package's example photos (random crops, flips, sizes) and fed
in turn as a file path (written to a temporary folder and deleted after its batch), encoded
bytes and a numpy array, so file handling, decoding and array input are all exercised. Every
``--sample-every`` images the script records ``VmRSS`` (/proc/self/status) and the number of open
descriptors (/proc/self/fd). Growth is measured from the first sample at or after ``--warmup``
images: RSS growth in percent and as a least-squares slope (KiB per 1000 images), descriptors as
a count. A reference image is captioned at the start and the end: the captions must match.

Writes ``longrun.json`` and ``longrun.md`` into ``--out DIR`` (default: a new folder under
benchmarks/runs/). Exit status 1 when RSS grew more than ``--max-growth`` percent, descriptors
leaked, the reference caption changed or an input failed. Linux only (reads /proc).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _common as C
from _machine import machine_markdown


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def example_photos() -> list[Image.Image]:
    photos = []
    for path in sorted(C.EXAMPLES.iterdir()):
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as im:
                photos.append(im.convert("RGB"))
    return photos


def variant(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100% of each side), maybe mirrored, resized to 64-640 pixels a side."""
    im = photos[int(rng.integers(len(photos)))]
    w, h = im.size
    cw, ch = (int(s * rng.uniform(0.3, 1.0)) for s in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im.resize((int(rng.integers(64, 641)), int(rng.integers(64, 641))))


def make_batch(photos, rng, start: int, size: int, folder: Path) -> list:
    """``size`` inputs, cycling through a file path, encoded bytes and a numpy array."""
    batch = []
    for i in range(start, start + size):
        im = variant(photos, rng)
        kind = i % 3
        if kind == 0:
            path = folder / f"img{i:06d}.{'jpg' if i % 2 else 'png'}"
            im.save(path)
            batch.append(str(path))
        elif kind == 1:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            batch.append(buf.getvalue())
        else:
            batch.append(np.asarray(im))
    return batch


def slope_kib_per_1000(samples: list[dict]) -> float:
    if len(samples) < 2:
        return 0.0
    x = np.array([s["images"] for s in samples], np.float64)
    y = np.array([s["rss_kib"] for s in samples], np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def summarise(samples: list[dict], warmup: int) -> dict:
    after = [s for s in samples if s["images"] >= warmup] or samples[-1:]
    base, last = after[0], samples[-1]
    return {
        "warmup_images": warmup,
        "baseline_at_images": base["images"],
        "rss_baseline_mib": round(base["rss_kib"] / 1024, 1),
        "rss_final_mib": round(last["rss_kib"] / 1024, 1),
        "rss_peak_mib": round(max(s["rss_kib"] for s in samples) / 1024, 1),
        "rss_growth_pct": round(100 * (last["rss_kib"] - base["rss_kib"]) / base["rss_kib"], 2),
        "rss_slope_kib_per_1000_images": round(slope_kib_per_1000(after), 1),
        "fds_baseline": base["fds"],
        "fds_final": last["fds"],
        "fds_growth": last["fds"] - base["fds"],
    }


def markdown(settings: dict, summary: dict, samples: list[dict], verdict: str) -> str:
    rows = [
        "| images | elapsed s | images/s (since last) | RSS MiB | open fds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        rows.append(
            f"| {s['images']} | {s['elapsed_s']:.1f} | {s['images_per_s']:.1f} | "
            f"{s['rss_kib'] / 1024:.1f} | {s['fds']} |"
        )
    return "\n".join(
        [
            f"{settings['n_images']} images, batches of {settings['batch_size']}, beam "
            f"{settings['beam_size']}, backend {settings['backend']}, model `{settings['model']}`; "
            f"load average at start {settings['load_average']}.",
            "",
            f"**{verdict}**: after the first {summary['warmup_images']} images (baseline at "
            f"{summary['baseline_at_images']}), RSS {summary['rss_baseline_mib']} -> "
            f"{summary['rss_final_mib']} MiB ({summary['rss_growth_pct']:+.2f}%, slope "
            f"{summary['rss_slope_kib_per_1000_images']:+.1f} KiB per 1000 images), open file "
            f"descriptors {summary['fds_baseline']} -> {summary['fds_final']}; peak RSS "
            f"{summary['rss_peak_mib']} MiB. Reference caption unchanged: "
            f"{'yes' if settings['reference_unchanged'] else 'NO'}. Failed inputs: "
            f"{settings['failed_inputs']}.",
            "",
            *rows,
        ]
    )


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument("--backend", default="onnxruntime", help="Captioner backend")
    p.add_argument("--n-images", type=int, default=3000, help="images captioned in all")
    p.add_argument("--batch-size", type=int, default=8, help="images per caption_batch call")
    p.add_argument("--beam-size", type=int, default=3, help="beam size")
    p.add_argument(
        "--sample-every",
        type=int,
        default=None,
        metavar="N",
        help="images between samples (default: n-images / 30, at least one batch)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        metavar="N",
        help="images before growth is measured (default: 10%% of n-images)",
    )
    p.add_argument(
        "--max-growth",
        type=float,
        default=5.0,
        metavar="PCT",
        help="RSS growth (percent) after warm-up above which the run fails",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the images' random crops, flips and sizes")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the library's)"
    )
    C.add_out_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.n_images < 1 or args.batch_size < 1:
        p.error("--n-images and --batch-size must be at least 1")
    every = args.sample_every or max(args.batch_size, args.n_images // 30)
    warmup = args.warmup if args.warmup is not None else args.n_images // 10

    from edgecap import Captioner, InputError

    print(machine_markdown(), flush=True)
    model = C.model_dir(args.model)
    options = {"threads": args.threads} if args.threads and args.backend == "onnxruntime" else {}
    captioner = Captioner(
        model, backend=args.backend, batch_size=args.batch_size, beam_size=args.beam_size, **options
    )
    photos = example_photos()
    reference = np.asarray(photos[0])
    first = captioner.caption(reference)
    load = C.load_average()
    rng = np.random.default_rng(args.seed)

    samples: list[dict] = []
    failed = 0
    t0 = last_t = time.perf_counter()
    last_n = 0
    next_sample = 0
    with tempfile.TemporaryDirectory(prefix="edgecap-longrun-") as tmp:
        folder = Path(tmp)
        done = 0
        while done < args.n_images:
            size = min(args.batch_size, args.n_images - done)
            batch = make_batch(photos, rng, done, size, folder)
            results = captioner.caption_batch(batch, on_error="return")
            failed += sum(isinstance(r, InputError) for r in results)
            for item in batch:
                if isinstance(item, str):
                    os.remove(item)
            done += size
            if done >= next_sample or done == args.n_images:
                now = time.perf_counter()
                samples.append(
                    {
                        "images": done,
                        "elapsed_s": round(now - t0, 2),
                        "images_per_s": round((done - last_n) / max(now - last_t, 1e-9), 2),
                        "rss_kib": rss_kib(),
                        "fds": open_fds(),
                    }
                )
                print(
                    f"{done:>6} images  {samples[-1]['rss_kib'] / 1024:8.1f} MiB  "
                    f"{samples[-1]['fds']:4d} fds  {samples[-1]['images_per_s']:6.1f} img/s",
                    flush=True,
                )
                last_t, last_n = now, done
                next_sample = done + every
    last = captioner.caption(reference)

    summary = summarise(samples, warmup)
    leaked = summary["fds_growth"] > 0
    grew = summary["rss_growth_pct"] > args.max_growth
    unchanged = last.text == first.text and abs(last.score - first.score) < 1e-4
    verdict = (
        "flat"
        if not (leaked or grew)
        else "RSS grew"
        if grew and not leaked
        else "descriptors leaked"
        if leaked and not grew
        else "RSS grew and descriptors leaked"
    )
    if not unchanged:
        verdict += "; the reference caption changed"
    settings = {
        "model": str(model),
        "backend": captioner.backend.describe(),
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "beam_size": args.beam_size,
        "sample_every": every,
        "seed": args.seed,
        "max_growth_pct": args.max_growth,
        "load_average": load,
        "reference_caption": first.text,
        "reference_unchanged": unchanged,
        "failed_inputs": failed,
    }
    C.write_results(
        "longrun",
        {"settings": settings, "summary": summary, "verdict": verdict, "samples": samples},
        markdown(settings, summary, samples, verdict),
        argv,
        out=args.out,
    )
    return 0 if verdict == "flat" and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
