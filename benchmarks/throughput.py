"""Images per second captioning a folder (beam 3, batch 8, decoding in a prefetch thread), each
variant in its own process, with the time split into image decoding / resizing, encoder, decoder
steps and the search's own work, and set against this machine's floor.

    python benchmarks/throughput.py           # 96 dev photos: ort-fp32 and the int8 variants
    python benchmarks/throughput.py --images DIR --limit 200 --variants ort-fp32,ort-int8
    python benchmarks/throughput.py --model-dir mine=scratch/int8   # and a model made by hand
    python benchmarks/throughput.py --rounds 1 --warmup 0 --limit 8  # a quick try, not a figure

Modes (``--modes``, each a measure of the harness; one call captions every photo once):
    prefetch-N   N worker threads read, decode and resize photos (Pillow releases the GIL) while
                 the main thread runs the model on the previous batch (default: prefetch-1)
    sequential   ``Captioner.caption_batch(paths)``: decode, then encode and search, batch by batch

Each variant runs in its own worker process (the isolated harness, ``_isolated.py``): rounds
interleaved across the variants with one worker running at a time, then each variant alone in a
fresh worker; a variant whose interleaved median is more than 15% off its alone median is
flagged. images/s come from the interleaved medians.

The floor: ``floor.py``'s floor (FLOPs / this machine's matmul peak, weight bytes / copy
bandwidth, whichever is longer) of one encoder pass at the batch and of one decoder step at
batch x beam rows, computed with floor.py's code for the source (FP32) model in a worker
process of its own after the variants' workers have ended. A variant's floor per image is
(encoder floor + its measured steps per batch x step floor) / batch; reported: the floor's
images/s and the measured images/s as a share of it.

Default photos: the first ``--limit`` (96) of Flickr8k's dev list (``Flickr_8k.devImages.txt``
order) that ``../shared/data/flickr8k-fullres-dev`` holds at full resolution (decoding them costs
what a user's camera photos cost; it holds 113 of the split's photos), else the first of the
224 x 224 Flickr8k copies, else the package's examples.
The photos are only read.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as C
import _isolated as I
import floor

FULLRES = C.REPO.parent / "shared" / "data" / "flickr8k-fullres-dev"
DEV_LIST = C.FLICKR8K / "Flickr_8k.devImages.txt"


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_model_arguments(p, variants=("ort-fp32", "ort-int8", "ort-int8-static"))
    C.add_harness_arguments(p, rounds=3, per_round=1, warmup=1)
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of .jpg / .png photos, the first --limit in name order (default: the first "
        "--limit Flickr8k dev photos at full resolution from ../shared/data/flickr8k-fullres-dev, "
        "else the 224 x 224 copies, else the package's example photos)",
    )
    p.add_argument(
        "--limit",
        type=C.non_negative_int,
        default=96,
        help="photos captioned per call (0: every photo there)",
    )
    p.add_argument("--beam", type=C.positive_int, default=3, help="beam size")
    p.add_argument(
        "--batch", type=C.batch_size, default=8, help="photos per encoder pass and search (batch size)"
    )
    p.add_argument(
        "--modes",
        default="prefetch-1",
        help="comma-separated: prefetch-N (N threads decode the next batch while the model runs), "
        "sequential (caption_batch(paths))",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the floor (needs onnx)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def default_photos(limit: int, fullres: Path | None = None) -> tuple[list[Path], str]:
    """The first ``limit`` dev photos (0: all of them) in the dev list's order: at full
    resolution, of those ``fullres`` holds, where it holds ``limit`` of them (it need not hold
    the whole split: 113 of its 1,000 photos), else the 224 x 224 copies -> (paths, where).
    ``fullres``: that folder (None: ``FULLRES``)."""
    fullres = FULLRES if fullres is None else fullres
    if DEV_LIST.is_file():
        names = [n.strip() for n in DEV_LIST.read_text().splitlines() if n.strip()]
        held = [fullres / n for n in names if (fullres / n).is_file()]
        if held and (not limit or len(held) >= limit):
            held = held[: limit or None]
            return held, f"the first {len(held)} Flickr8k dev photos held at full resolution ({fullres})"
        small = [C.FLICKR8K / "images" / n for n in names[: limit or None]]
        if all(p.is_file() for p in small):
            return small, f"the first {len(small)} Flickr8k dev photos (224 x 224, {C.FLICKR8K / 'images'})"
    return C.image_files(C.EXAMPLES, limit), f"the example photos ({C.EXAMPLES})"


def parse_modes(spec: str) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    for mode in modes:
        n = mode.removeprefix("prefetch-")
        if mode != "sequential" and not (mode.startswith("prefetch-") and n.isdigit() and int(n) > 0):
            sys.exit(f"--modes: {mode!r} is neither sequential nor prefetch-N (N >= 1)")
    return modes


# -- in the worker ---------------------------------------------------------------------------------


def run_sequential(captioner, timed: C.TimedBackend, paths: list[Path]) -> I.Fields:
    timed.reset()
    t0 = time.perf_counter()
    captions = captioner.caption_batch(paths)
    wall = time.perf_counter() - t0
    decode = sum(c.timings["preprocess_ms"] for c in captions) / 1e3
    return _split(wall, timed, decode, decode_overlapped=False, batches=_batches(captioner, paths))


def run_prefetch(captioner, timed: C.TimedBackend, paths: list[Path], workers: int) -> I.Fields:
    """Workers load and resize each batch ahead; the main thread captions the resized images.
    The pool is shut down (its threads joined) before the call returns."""
    from PIL import Image

    from edgecap.images import load_rgb

    h, w = captioner.manifest.preprocessing.size
    resample = getattr(Image.Resampling, captioner.manifest.preprocessing.resample.upper())

    def load(path):
        t0 = time.perf_counter()
        image = load_rgb(path).resize((w, h), resample)
        return image, time.perf_counter() - t0

    batch = captioner.options.batch_size
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
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
    fields = _split(wall, timed, worker_s, decode_overlapped=True, batches=len(chunks))
    fields["waiting_for_decode_s"] = waited
    return fields


def _batches(captioner, paths) -> int:
    return -(-len(paths) // captioner.options.batch_size)


def _split(
    wall: float, timed: C.TimedBackend, decode_s: float, decode_overlapped: bool, batches: int
) -> I.Fields:
    encoder, steps = timed.encode_s, sum(timed.step_times)
    main_thread_decode = 0.0 if decode_overlapped else decode_s
    return I.Fields(
        wall_s=wall,
        decode_resize_s=decode_s,
        encoder_s=encoder,
        decoder_s=steps,
        search_other_s=wall - main_thread_decode - encoder - steps,
        steps_per_batch=len(timed.step_times) / max(batches, 1),
    )


class ThroughputTask:
    """One variant's Captioner (beam, batch) and one measure per mode, each captioning every
    photo once."""

    def __init__(self, variant: dict, paths: list[str], beam: int, batch: int, modes: list[str]):
        v = C.Variant.from_json(variant)
        captioner, timed = v.timed_captioner(beam_size=beam, batch_size=batch)
        photos = [Path(p) for p in paths]
        self.measures = {}
        for mode in modes:
            if mode == "sequential":
                self.measures[mode] = lambda: run_sequential(captioner, timed, photos)
            else:
                n = int(mode.removeprefix("prefetch-"))
                self.measures[mode] = lambda n=n: run_prefetch(captioner, timed, photos, n)
        self.info = {"describe": timed.describe(), "model": str(v.model), "session_config": v.session_config}


def make_task(**kwargs) -> ThroughputTask:
    return ThroughputTask(**kwargs)


# -- in the parent ---------------------------------------------------------------------------------


class FloorTask:
    """floor.py's floor, computed in a worker of its own (``info``); nothing to time."""

    def __init__(self, model: str, beam: int, batch: int, threads: int | None):
        self.info = floor.stage_floors(Path(model), beam, batch, threads)
        self.measures: dict = {}


def make_floor_task(**kwargs) -> FloorTask:
    return FloorTask(**kwargs)


def floors(args) -> tuple[dict | None, str]:
    """floor.py's floor of the source model at this beam / batch, measured in a worker process
    of its own after the variants' workers have ended -> (floors, note)."""
    if args.no_floor:
        return None, "floor skipped (--no-floor)"
    if importlib.util.find_spec("onnx") is None:
        return None, "floor skipped: counting the graphs' FLOPs needs onnx"
    threads = C._threads(args.threads)[0]
    worker = I.Worker(
        I.Spec(
            "floor",
            "throughput:make_floor_task",
            {
                "model": str(C.model_dir(args.model).resolve()),
                "beam": args.beam,
                "batch": args.batch,
                "threads": threads,
            },
        )
    )
    try:
        return worker.info, ""
    finally:
        worker.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.images:
        paths, where = C.image_files(args.images, args.limit), str(args.images)
    else:
        paths, where = default_photos(args.limit)
    if not paths:
        sys.exit(f"{where}: no .jpg / .png photos")
    modes = parse_modes(args.modes)
    variants, notes = C.resolve_variants(args)
    if not variants:
        sys.exit("no variant can run here: " + "; ".join(notes))
    specs = [
        v.spec(
            "throughput:make_task",
            paths=[str(p) for p in paths],
            beam=args.beam,
            batch=args.batch,
            modes=modes,
        )
        for v in variants
    ]
    load_before = C.load_average()
    harness = C.run_harness(specs, modes, args)
    floor_data, floor_note = floors(args)  # after the workers: nothing else of ours runs
    n = len(paths)
    results = []
    for mode in modes:
        for v in variants:
            entry = harness["measures"][mode][v.name]
            inter = entry["interleaved"]
            r = {
                "variant": v.name,
                "mode": mode,
                "images": n,
                "images_per_s": n / (inter["median_ms"] / 1e3),
                "images_per_s_alone": n / (entry.get("alone", {}).get("median_ms", float("nan")) / 1e3),
                "interleaved_vs_alone": entry.get("interleaved_vs_alone"),
                "flagged": bool(entry.get("flagged")),
                **{k: I.field_median(inter, k) for k in inter.get("fields", {})},
            }
            if floor_data:
                per_image = floor.floor_ms_per_image(floor_data, r["steps_per_batch"], args.batch)
                r["floor_images_per_s"] = 1e3 / per_image
                r["share_of_floor"] = r["images_per_s"] / r["floor_images_per_s"]
            results.append(r)
    data = {
        "photos": where,
        "beam": args.beam,
        "batch": args.batch,
        "modes": modes,
        "skipped": notes,
        "load_average": [load_before, C.load_average()],
        "settings": harness["settings"],
        "variants": harness["variants"],
        "flags": harness["flags"],
        "floor": floor_data,
        "results": results,
    }
    C.write_results("throughput", data, report(data, floor_note), argv, out=args.out)
    if data["flags"]:
        print("FLAGGED: " + "; ".join(data["flags"]), file=sys.stderr)


def report(data: dict, floor_note: str) -> str:
    headers = [
        "variant",
        "mode",
        "images",
        "images/s",
        "images/s alone",
        "vs alone",
        "flag",
        "decode+resize s",
        "encoder s",
        "decoder s",
        "search/other s",
        "steps/batch",
        "floor images/s",
        "share of floor",
    ]
    rows = []
    for r in data["results"]:
        cells = C.harness_cells({"interleaved_vs_alone": r["interleaved_vs_alone"], "flagged": r["flagged"]})[
            1:
        ]
        overlapped = " (overlapped)" if r["mode"] != "sequential" else ""
        rows.append(
            [
                r["variant"],
                r["mode"],
                r["images"],
                r["images_per_s"],
                r["images_per_s_alone"],
                *cells,
                f"{r['decode_resize_s']:.2f}{overlapped}",
                r["encoder_s"],
                r["decoder_s"],
                r["search_other_s"],
                r["steps_per_batch"],
                r.get("floor_images_per_s", float("nan")),
                f"{100 * r['share_of_floor']:.1f}%" if "share_of_floor" in r else "-",
            ]
        )
    lines = [
        f"{data['results'][0]['images']} photos: {data['photos']}; beam {data['beam']}, "
        f"batch {data['batch']}; load average before/after {data['load_average'][0]} / "
        f"{data['load_average'][1]}.",
        "",
    ]
    for name, v in data["variants"].items():
        lines.append(f"- {name}: {v['info'].get('describe')}; model {v['info'].get('model')}")
    lines += [f"- {n}" for n in data["skipped"]]
    lines += [
        "",
        C.markdown_table(headers, rows),
        "",
        "images/s: photos / the interleaved median of a call captioning all of them; the "
        "stage columns are medians over the calls of the main thread's time; "
        "search/other = wall minus the main thread's decoding, encoder and decoder steps "
        "(the search's numpy work, copies, and in prefetch modes waiting for a decoded "
        "batch).",
    ]
    f = data["floor"]
    if f:
        s = f["stages"]
        lines += [
            "",
            f"Floor (benchmarks/floor.py's, FP32 source model, onnxruntime MatMul "
            f"peak {f['ort_matmul_gflops']:.1f} GFLOP/s measured after the workers "
            f"ended): encoder at batch {data['batch']} {s['encoder']['floor_ms']:.2f} ms "
            f"({s['encoder']['bound']}-bound), decoder step at "
            f"{data['batch'] * data['beam']} rows {s['decoder step']['floor_ms']:.3f} ms "
            f"({s['decoder step']['bound']}-bound); floor per image = (encoder + steps/batch"
            " x step) / batch; share of floor = measured images/s / the floor's.",
        ]
    else:
        lines += ["", floor_note]
    lines += ["", C.isolation_markdown(data)]
    return "\n".join(lines)


if __name__ == "__main__":
    C.run_main(main)
