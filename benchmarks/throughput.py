"""Images per second captioning a folder (beam 3, batch 8), with the time split into image
decoding / resizing, encoder, decoder steps and the search's own work; and the same with the
JPEG decoding moved to a thread pool that runs ahead of the model.

    python benchmarks/throughput.py                      # shipped model, ort-fp32 and int8
    python benchmarks/throughput.py --images DIR --limit 200 --variants ort-fp32,ort-int8
    python benchmarks/throughput.py --threads 1,2        # onnxruntime intra-op threads

Modes:
    sequential   ``Captioner.caption_batch(paths)``: decode, then encode and search, batch by batch
    prefetch-N   N worker threads read, decode and resize photos (Pillow releases the GIL) while
                 the main thread runs the model on the previous batch

Default folder: the 113 full-resolution Flickr8k dev photos when present (decoding them costs what
a user's camera photos cost), else the Flickr8k photos, else the package's examples.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as C

FULLRES = C.REPO.parent / "shared" / "data" / "flickr8k-fullres-dev"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_model_arguments(p, variants=("ort-fp32", "ort-int8-static"))
    p.add_argument("--images", type=Path, default=None, help="folder of photos")
    p.add_argument("--limit", type=int, default=96, help="photos to caption per mode")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="decode threads for the prefetch modes")
    return p.parse_args(argv)


def default_folder() -> Path:
    for folder in (FULLRES, C.FLICKR8K / "images", C.EXAMPLES):
        if folder.is_dir():
            return folder
    raise SystemExit("no photos found: pass --images DIR")


def run_sequential(captioner, timed: C.TimedBackend, paths: list[Path]) -> dict:
    timed.reset()
    t0 = time.perf_counter()
    captions = captioner.caption_batch(paths)
    wall = time.perf_counter() - t0
    decode = sum(c.timings["preprocess_ms"] for c in captions) / 1e3
    return _split(len(paths), wall, timed, decode, decode_overlapped=False)


def run_prefetch(captioner, timed: C.TimedBackend, paths: list[Path], workers: int) -> dict:
    """Workers load and resize each batch ahead; the main thread captions the resized images."""
    from edgecap.images import load_rgb

    h, w = captioner.manifest.preprocessing.size
    resample = captioner.manifest.preprocessing.resample.upper()

    def load(path):
        t0 = time.perf_counter()
        from PIL import Image

        image = load_rgb(path).resize((w, h), getattr(Image.Resampling, resample))
        return image, time.perf_counter() - t0

    batch = captioner.options.batch_size
    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    timed.reset()
    worker_s, waited = 0.0, 0.0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        ahead = 2  # batches in flight: enough to hide decoding, bounded memory
        next_chunk = 0
        while next_chunk < len(chunks) and len(pending) < ahead:
            pending.append([pool.submit(load, p) for p in chunks[next_chunk]])
            next_chunk += 1
        while pending:
            futures = pending.popleft()
            tw = time.perf_counter()
            loaded = [f.result() for f in futures]
            waited += time.perf_counter() - tw
            if next_chunk < len(chunks):
                pending.append([pool.submit(load, p) for p in chunks[next_chunk]])
                next_chunk += 1
            worker_s += sum(s for _, s in loaded)
            captioner.caption_batch([image for image, _ in loaded])
    wall = time.perf_counter() - t0
    result = _split(len(paths), wall, timed, worker_s, decode_overlapped=True)
    result["waiting_for_decode_s"] = waited
    return result


def _split(n: int, wall: float, timed: C.TimedBackend, decode_s: float,
           decode_overlapped: bool) -> dict:
    encoder, steps = timed.encode_s, sum(timed.step_times)
    main_thread_decode = 0.0 if decode_overlapped else decode_s
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "decode_resize_s": decode_s,
            "encoder_s": encoder, "decoder_s": steps,
            "search_other_s": wall - main_thread_decode - encoder - steps,
            "decode_overlapped": decode_overlapped}


def main(argv=None) -> None:
    args = parse_args(argv)
    folder = args.images or default_folder()
    paths = C.image_files(folder, args.limit)
    if not paths:
        sys.exit(f"{folder}: no .jpg / .png photos")
    variants, notes = C.resolve_variants(args)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    results = []
    for v in variants:
        captioner = v.captioner(beam_size=args.beam, batch_size=args.batch)
        timed = C.TimedBackend(captioner.backend)
        captioner.backend = timed
        captioner.caption_batch(paths[:args.batch])  # warm-up: sessions, caches, page-in
        modes = [("sequential", lambda: run_sequential(captioner, timed, paths))]
        modes += [(f"prefetch-{n}", lambda n=n: run_prefetch(captioner, timed, paths, n))
                  for n in workers]
        for mode, run in modes:
            result = run()
            results.append({"variant": v.name, "mode": mode, **result})
            print(f"[throughput] {v.name} {mode}: {result['images_per_s']:.2f} images/s",
                  file=sys.stderr)
    data = {"folder": str(folder), "beam": args.beam, "batch": args.batch, "skipped": notes,
            "load_average": C.load_average(), "results": results}
    headers = ["variant", "mode", "images", "images/s", "wall s", "decode+resize s",
               "encoder s", "decoder s", "search/other s"]
    rows = [[r["variant"], r["mode"], r["images"], r["images_per_s"], r["wall_s"],
             f"{r['decode_resize_s']:.2f}" + (" (overlapped)" if r["decode_overlapped"] else ""),
             r["encoder_s"], r["decoder_s"], r["search_other_s"]] for r in results]
    text = (f"{len(paths)} photos from {folder}, beam {args.beam}, batch {args.batch}; load "
            f"average {data['load_average']}.\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
            + C.markdown_table(headers, rows)
            + "\n\nsearch/other = wall minus the main thread's decoding, encoder and decoder "
              "steps (the search's numpy work, copies, and in prefetch modes waiting for a "
              "decoded batch).")
    C.write_results("throughput", data, text, argv)


if __name__ == "__main__":
    main()
