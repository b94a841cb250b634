"""Files against in-memory frames: captions/s of ``Captioner.caption_batch`` over JPEG files and
over the same photos already decoded in memory, at several batch sizes, with and without
decoding workers (``Captioner(decode_workers=N)``, ``edgecap caption --decode-workers N``).

    python benchmarks/file_rate.py --out /tmp/rate                  # onnxruntime on the CPU
    python benchmarks/file_rate.py --workers 0,1,2 --batches 1,8,64 --n 128 --rounds 3
    python benchmarks/file_rate.py --backend torch --device cuda --workers 0,default

For each batch size and worker count: ``files`` captions JPEG paths (read, decode, preprocess,
encoder, search), ``memory`` the decoded RGB frames of the same photos (preprocess, encoder,
search); files / memory is what reading and decoding the files costs on top. One Captioner;
the batch sizes and worker counts are set on shallow copies of it. Rounds are interleaved over
every setting; captions/s is photos / the median call. "same captions" compares each setting's
captions with the first worker count's at the same batch and input: the workers change when a
photo is decoded, never its caption (files and memory may differ: a large JPEG file is decoded
at a reduced scale, its in-memory frame is not).

Default photos: the full-resolution Flickr8k dev photos (``../shared/data/flickr8k-fullres-dev``,
only read), else the package's example photos written as JPEG (quality 90) into a temporary
folder, repeated to ``--n``. ``measure`` is also what ``gpu_check.py`` runs on a GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (str(REPO), str(BENCH_DIR)):  # a plain checkout, no pip install
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

FULLRES = C.REPO.parent / "shared" / "data" / "flickr8k-fullres-dev"


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--backend", type=C.backend_name, default="onnxruntime", help="Captioner backend")
    p.add_argument(
        "--device", type=C.device_name, default=None, help="cpu or cuda (default: the backend's own)"
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of .jpg / .png photos, repeated to --n (default: the full-resolution Flickr8k dev "
        "photos in ../shared/data/flickr8k-fullres-dev, else the example photos as JPEG)",
    )
    p.add_argument("--n", type=C.positive_int, default=128, help="photos per timed call")
    p.add_argument("--batches", type=C.batch_sizes, default="1,8,64", help="batch sizes, comma-separated")
    p.add_argument(
        "--workers",
        default="0,1,2",
        help="decode_workers counts, comma-separated; 'default': the Captioner's own choice",
    )
    p.add_argument("--beam", type=C.positive_int, default=3, help="beam size")
    p.add_argument("--rounds", type=C.positive_int, default=3, help="timed calls per setting, interleaved")
    C.add_out_argument(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    workers = [w.strip() for w in args.workers.split(",")]
    bad = [w for w in workers if w != "default" and not w.isdigit()]
    if bad:
        parser.error(
            f"argument --workers: takes default or counts of 0 or more, comma-separated; got {bad[0]!r}"
        )
    args.workers = [None if w == "default" else int(w) for w in workers]
    return args


def photo_files(folder: Path | None, n: int, scratch: Path) -> tuple[list[Path], str]:
    """``n`` JPEG paths (repeated when the folder has fewer) -> (paths, where they came from)."""
    from PIL import Image

    if folder is None and FULLRES.is_dir():
        folder = FULLRES
    if folder is not None:
        files = C.image_files(folder, None)
        where = f"{len(files)} photos of {folder}"
    else:
        files = []
        for i, frame in enumerate(C.example_frames()):
            files.append(scratch / f"example{i}.jpg")
            Image.fromarray(frame).save(files[-1], quality=90)
        where = f"the {len(files)} example photos as JPEG (quality 90)"
    if not files:
        sys.exit(f"{folder}: no .jpg / .png photos")
    return [files[i % len(files)] for i in range(n)], f"{where}, repeated to {n}"


def decoded(paths: list[Path]) -> list[np.ndarray]:
    """Each file decoded once to an RGB array (H, W, 3), as a camera frame would arrive."""
    from edgecap.images import load_rgb

    frames = {p: np.asarray(load_rgb(p)) for p in set(paths)}
    return [frames[p] for p in paths]


def measure(
    cap,
    workers: list[int | None],
    paths: list[Path],
    frames: list[np.ndarray],
    batches: list[int],
    rounds: int,
    beam: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> list[dict]:
    """captions/s of files and of in-memory frames by ``cap`` (a Captioner) for each batch size
    and each number of decoding workers (None: ``cap``'s own), interleaved over ``rounds``;
    ``sync`` brackets each timed call (``torch.cuda.synchronize`` on a GPU). ``same``: the
    share of a setting's captions identical to those of the first worker count at the same
    batch size and input (the workers change when a photo is decoded, never its caption)."""
    settings = []
    for batch in batches:
        for n in workers:
            # shares the model: only the options and workers differ
            runner = C.reuse_captioner(cap, beam_size=beam, batch_size=batch)
            runner.decode_workers = cap.decode_workers if n is None else n
            label = f"{runner.decode_workers}" + (" (default)" if n is None else "")
            for what, inputs in (("files", paths), ("memory", frames)):
                settings.append(
                    {
                        "batch": batch,
                        "workers": label,
                        "input": what,
                        "runner": runner,
                        "inputs": inputs,
                        "seconds": [],
                        "preprocess_ms": [],
                        "same": [],
                    }
                )
    expected: dict[tuple[int, str], list[str]] = {}
    for s in settings:  # warm-up: each setting's first batch (buffers, pools)
        s["runner"].caption_batch(s["inputs"][: s["batch"]])
    for _ in range(rounds):
        for s in settings:
            sync()
            t0 = time.perf_counter()
            captions = s["runner"].caption_batch(s["inputs"])
            sync()
            s["seconds"].append(time.perf_counter() - t0)
            s["preprocess_ms"].append(sum(c.timings["preprocess_ms"] for c in captions) / len(captions))
            texts = [c.text for c in captions]
            first = expected.setdefault((s["batch"], s["input"]), texts)
            s["same"].append(sum(a == b for a, b in zip(texts, first)) / len(texts))
    rows = []
    for s in settings:
        median = float(np.median(s["seconds"]))
        rows.append(
            {
                "batch": s["batch"],
                "workers": s["workers"],
                "input": s["input"],
                "photos": len(s["inputs"]),
                "calls": len(s["seconds"]),
                "median_s": median,
                "captions_per_s": len(s["inputs"]) / median,
                "preprocess_ms_per_photo": float(np.median(s["preprocess_ms"])),
                "same": min(s["same"]),
            }
        )
    memory = {(r["batch"], r["workers"]): r["captions_per_s"] for r in rows if r["input"] == "memory"}
    for r in rows:
        r["of_memory"] = r["captions_per_s"] / memory[(r["batch"], r["workers"])]
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per batch and workers, files and memory side by side."""
    by = {(r["batch"], r["workers"], r["input"]): r for r in rows}
    lines = []
    for (batch, workers, what), r in by.items():
        if what != "files":
            continue
        m = by[(batch, workers, "memory")]
        lines.append(
            [
                batch,
                workers,
                r["captions_per_s"],
                m["captions_per_s"],
                f"{r['of_memory']:.2f}",
                r["preprocess_ms_per_photo"],
                m["preprocess_ms_per_photo"],
                f"{min(r['same'], m['same']):.0%}",
            ]
        )
    return C.markdown_table(
        [
            "batch",
            "decode workers",
            "files captions/s",
            "memory captions/s",
            "files / memory",
            "files: load+preprocess ms/photo",
            "memory: preprocess ms/photo",
            "same captions",
        ],
        lines,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    from edgecap import Captioner

    model = C.model_dir(args.model)
    load_before = C.load_average()
    with tempfile.TemporaryDirectory() as scratch:
        paths, where = photo_files(args.images, args.n, Path(scratch))
        frames = decoded(paths)
        cap = Captioner(model, backend=args.backend, device=args.device)
        describe = cap.backend.describe()
        rows = measure(cap, args.workers, paths, frames, args.batches, args.rounds, args.beam)
    data = {
        "photos": where,
        "backend": describe,
        "beam": args.beam,
        "rounds": args.rounds,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [load_before, C.load_average()],
        "results": rows,
    }
    text = (
        f"{where}; {describe}; beam {args.beam}; median of {args.rounds} calls per setting, "
        f"rounds interleaved; load average before/after {load_before} / "
        f"{data['load_average'][1]}.\n\n{table(rows)}\n\nfiles: `caption_batch(paths)`; "
        "memory: `caption_batch(frames)` of the same photos decoded beforehand; ms/photo: "
        "the captions' preprocess_ms (in a worker's own time when workers decode); same captions: "
        "the share identical to the first worker setting's at that batch and input."
    )
    C.write_results("file_rate", data, text, argv, out=args.out)


if __name__ == "__main__":
    C.run_main(main)
