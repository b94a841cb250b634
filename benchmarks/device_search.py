"""The beam search on the device (``edgecap.decoding.device``) against the numpy loop, on torch
CPU tensors: the same captions on Flickr8k dev photos, and what each costs per caption.

    python benchmarks/device_search.py check --n 200       # captions and scores, 200 dev photos
    python benchmarks/device_search.py check --fused       # ... and the fused search (Triton)
    python benchmarks/device_search.py time                # search ms per caption, beam 3, b 1/8

``check``: the shipped model's torch backend (CPU, FP32) encodes the first ``--n`` Flickr8k dev
photos in batches of ``--batch``; each batch's encoder outputs go to both searches, so any
difference is the search's. Default options (tag bonus, fused language models with the gate),
and ``--options`` more sets; ``--also DIR``: the photos of DIR/images too (the everyday COCO
dev sets, whose photos the fusion gate gives the language models more often); ``--fp16``: the
backend in FP16 (its FP32 islands; the encoder FP32, as ``fp16=True`` runs on CUDA). ``--fused``:
the fused device search (``fused_search=True``: its Triton kernels in Triton's interpreter on
the CPU, ``TRITON_INTERPRET=1``, slow) against the eager device search, whose hypotheses and
float64 scores it should give to the last bit. Flickr8k and COCO are research data: read
here, never a test fixture.

``time``: each variant (search host / device x batch) in its own worker process
(``benchmarks/_isolated.py``), interleaved rounds then alone; the measure is the search of one
pre-encoded batch of the example photos (the encoder is the same for both and not timed),
reported per caption (median / batch). On the CPU only: no GPU figure comes from here.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (str(REPO), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import _isolated as I  # noqa: E402

OPTION_SETS = {
    "default": {},
    "no-fusion": {"fusion_weight": 0.0},
    "n-best-3": {"n_best": 3},
    "beam-5": {"beam_size": 5},
    "penalty-0.7": {"length_penalty": 0.7},
}


def _search(captioner, encoded, options, on_device: bool):
    from edgecap.decoding import search

    backend = captioner.backend
    backend.on_device = on_device
    return search(
        backend,
        encoded,
        options,
        captioner.vocab.start,
        captioner.vocab.end,
        len(captioner.vocab),
        captioner.classes,
        captioner.fusion,
    )


def _load_device_captioner(model: Path, fp16: bool = False, **options):
    from edgecap import Captioner

    if fp16:  # as fp16=True on CUDA: the FP16 decoder behind the FP32 encoder
        from fp16_emulation import fp16_captioner

        return fp16_captioner(model, {"fp32_encoder": True})
    return Captioner(model, backend="torch", device="cpu", search="device", **options)


def _same_bits(a, b) -> bool:
    """Two searches' hypotheses of one photo: the same tokens, finished flags and float64
    scores, to the last bit."""
    return [(h.tokens, h.finished, h.log_prob, h.score, h.rank_score) for h in a] == [
        (h.tokens, h.finished, h.log_prob, h.score, h.rank_score) for h in b
    ]


# -- check -----------------------------------------------------------------------------------------


def check(args) -> None:
    if args.fused:  # the fused search's kernels on CPU tensors: Triton's interpreter, set before
        os.environ.setdefault("TRITON_INTERPRET", "1")  # triton is first imported
    import torch

    from edgecap import CaptionOptions
    from edgecap.images import load_rgb, preprocess

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = C.model_dir(args.model)
    names_file = args.flickr8k / "Flickr_8k.devImages.txt"
    if not names_file.is_file():
        sys.exit(f"{names_file} is absent: the check needs the Flickr8k dev photos (--flickr8k DIR)")
    names = [x.strip() for x in names_file.read_text().splitlines() if x.strip()][: args.n]
    paths = [args.flickr8k / "images" / n for n in names]
    for folder in args.also:
        if not (folder / "images").is_dir():
            sys.exit(f"{folder / 'images'} is absent (--also DIR: a folder with images/)")
        found = C.image_files(folder / "images", None)
        paths += found
        names += [f"{folder.name}/{p.name}" for p in found]
    captioner = _load_device_captioner(model, fp16=args.fp16)
    fused = None
    if args.fused:
        from edgecap.backends.torch_search import TorchDeviceSearch

        fused = TorchDeviceSearch(captioner.backend, fused=True)
    sets = [s.strip() for s in args.options.split(",") if s.strip()]
    unknown = [s for s in sets if s not in OPTION_SETS]
    if unknown:
        sys.exit(f"unknown option sets {unknown}; choose from {', '.join(OPTION_SETS)}")
    rows, examples = [], []
    stats = {
        s: {
            "n": 0,
            "same_tokens": 0,
            "same_all": 0,
            "max_score_diff": 0.0,
            "host_s": 0.0,
            "device_s": 0.0,
            "fused_images": 0,
            "fused_same_bits": 0,
        }
        for s in sets
    }
    for start in range(0, len(names), args.batch):
        chunk = names[start : start + args.batch]
        batch = np.stack(
            [
                preprocess([load_rgb(str(path))], captioner.manifest.preprocessing)[0]
                for path in paths[start : start + args.batch]
            ]
        )
        encoded = captioner.backend.encode(batch)
        gate = (
            None
            if captioner.fusion is None or captioner.fusion.gate is None
            else captioner.fusion.gate(encoded.class_probs)
        )
        for name in sets:
            options = replace(CaptionOptions(), **OPTION_SETS[name])
            s = stats[name]
            t0 = time.perf_counter()
            host = _search(captioner, encoded, options, on_device=False)
            t1 = time.perf_counter()
            with torch.inference_mode():
                device = _search(captioner, encoded, options, on_device=True)
            t2 = time.perf_counter()
            s["host_s"] += t1 - t0
            s["device_s"] += t2 - t1
            if fused is not None:
                eager_search, captioner.backend.device_search = captioner.backend.device_search, fused
                try:
                    with torch.inference_mode():
                        by_kernels = _search(captioner, encoded, options, on_device=True)
                finally:
                    captioner.backend.device_search = eager_search
                s["fused_same_bits"] += sum(map(_same_bits, device, by_kernels))
            if gate is not None and options.fusion_weight != 0:
                s["fused_images"] += int((gate > 0).sum())
            for photo, a, b in zip(chunk, host, device):
                s["n"] += 1
                tokens = [h.tokens for h in a] == [h.tokens for h in b]
                s["same_tokens"] += tokens
                s["same_all"] += tokens and [h.finished for h in a] == [h.finished for h in b]
                if tokens:
                    s["max_score_diff"] = max(
                        s["max_score_diff"],
                        *(abs(x.score - y.score) for x, y in zip(a, b)),
                        *(abs(x.rank_score - y.rank_score) for x, y in zip(a, b)),
                    )
                elif len(examples) < 10:
                    examples.append(
                        {
                            "set": name,
                            "photo": photo,
                            "host": captioner.vocab.decode(a[0].tokens),
                            "device": captioner.vocab.decode(b[0].tokens),
                        }
                    )
        print(f"{start + len(chunk)}/{len(names)}", file=sys.stderr, flush=True)
    for name in sets:
        s = stats[name]
        rows.append(
            [
                name,
                s["n"],
                f"{s['same_tokens']}/{s['n']}",
                f"{s['same_all']}/{s['n']}",
                f"{s['max_score_diff']:.2e}",
                s["fused_images"],
                1e3 * s["host_s"] / s["n"],
                1e3 * s["device_s"] / s["n"],
                *([f"{s['fused_same_bits']}/{s['n']}"] if fused is not None else []),
            ]
        )
    photos = f"The first {args.n} Flickr8k dev photos ({args.flickr8k})" + "".join(
        f", the photos of {folder / 'images'}" for folder in args.also
    )
    text = (
        f"{photos}, {len(names)} in all; the shipped model "
        f"(`{model}`), torch backend on the CPU, "
        f"{'FP16 (the FP32 encoder, the FP16 decoder with its FP32 islands)' if args.fp16 else 'FP32'}; "
        f"batches of {args.batch}; each batch's "
        "encoder outputs searched by the numpy loop (host) and by the device search on "
        "torch CPU tensors. `same hypotheses`: every hypothesis' tokens (n_best of them) "
        "equal; `+ finished`: and their finished flags; `max |score diff|`: over score and "
        "rank score of equal hypotheses; `fused photos`: photos the gate gave fusion weight "
        "(the LM path ran). ms per caption: the search alone, one process, host and device "
        "one after the other per batch (a rough figure; `time` measures it properly)."
        + (
            " `fused = eager, bit for bit`: photos whose fused device search (`fused_search=True`, "
            "its Triton kernels run by Triton's interpreter on the CPU) gave the eager device "
            "search's hypotheses: tokens, finished flags and float64 scores to the last bit."
            if fused is not None
            else ""
        )
        + "\n\n"
        + C.markdown_table(
            [
                "options",
                "photos",
                "same hypotheses",
                "+ finished",
                "max |score diff|",
                "fused photos",
                "host ms/caption",
                "device ms/caption",
                *(["fused = eager, bit for bit"] if fused is not None else []),
            ],
            rows,
        )
    )
    if examples:
        text += "\n\nDiffering:\n\n" + "\n".join(
            f'- {e["set"]} {e["photo"]}: host "{e["host"]}" / device "{e["device"]}"' for e in examples
        )
    C.write_results(
        args.name or "device_search_check",
        {"stats": stats, "differing": examples},
        text,
        out=args.out,
        script="device_search",
    )


# -- time (in the worker) --------------------------------------------------------------------------


class SearchTask:
    """One search mode's Captioner and pre-encoded batches of the example photos; the measure
    ``search`` is one batch's search."""

    def __init__(self, model: str, mode: str, batch: int, beam: int, max_length: int):
        import torch

        from edgecap.images import load_rgb, preprocess

        self.torch = torch
        self.captioner = _load_device_captioner(
            Path(model), beam_size=beam, batch_size=batch, max_length=max_length
        )
        self.on_device = mode == "device"
        frames = C.example_frames()
        pre = [preprocess([load_rgb(f, "rgb")], self.captioner.manifest.preprocessing)[0] for f in frames]
        # as many distinct batches as photos: batch i starts at photo i
        self.encoded = [
            self.captioner.backend.encode(np.stack([pre[(i + j) % len(pre)] for j in range(batch)]))
            for i in range(len(pre))
        ]
        self._next = itertools.cycle(range(len(self.encoded)))
        first = self.search()
        self.info = {
            "describe": self.captioner.backend.describe(),
            "mode": mode,
            "first_caption": self.captioner.vocab.decode(first[0][0].tokens),
            "options": repr(self.captioner.options),
        }
        self.measures = {"search": self.search}

    def search(self):
        with self.torch.inference_mode():
            return _search(
                self.captioner, self.encoded[next(self._next)], self.captioner.options, self.on_device
            )


def make_task(**kwargs) -> SearchTask:
    return SearchTask(**kwargs)


def time_searches(args) -> None:
    model = str(C.model_dir(args.model))
    batches = [int(b) for b in args.batches.split(",")]
    specs = [
        I.Spec(
            f"{mode}-b{batch}",
            "device_search:make_task",
            {"model": model, "mode": mode, "batch": batch, "beam": args.beam, "max_length": args.max_length},
        )
        for batch in batches
        for mode in ("host", "device")
    ]
    load_before = C.load_average()
    result = C.run_harness(specs, ["search"], args)
    data = {
        "settings": {
            "beam": args.beam,
            "batches": batches,
            "max_length": args.max_length,
            "load_average": [load_before, C.load_average()],
            **result.pop("settings"),
        },
        **result,
    }
    rows, per = [], data["measures"]["search"]
    for label, entry in per.items():
        batch = int(label.rpartition("-b")[2])
        rows.append(
            [
                label,
                batch,
                entry["interleaved"]["median_ms"] / batch,
                entry["interleaved"]["p95_ms"] / batch,
                *C.harness_cells(entry, 1.0 / batch),
            ]
        )
    ratios = []
    for batch in batches:
        host = per[f"host-b{batch}"]["interleaved"]["median_ms"]
        device = per[f"device-b{batch}"]["interleaved"]["median_ms"]
        ratios.append([batch, host / batch, device / batch, device / host])
    text = (
        f"The search alone (`edgecap.decoding.search` on a pre-encoded batch of the example "
        f"photos, default options: tag bonus, fused language models where the gate gives "
        f"weight), torch backend on the CPU, FP32, beam {args.beam}, max "
        f"{args.max_length} words. host: the numpy loop over the torch step; device: the "
        "device search on torch CPU tensors (early exit). ms per caption = a call's ms / "
        f"batch. Load average before/after: {data['settings']['load_average'][0]} / "
        f"{data['settings']['load_average'][1]}.\n\n"
        + C.markdown_table(["variant", "batch", "p50 ms/caption", "p95 ms/caption", *C.HARNESS_HEADERS], rows)
        + "\n\n"
        + C.markdown_table(["batch", "host ms/caption", "device ms/caption", "device / host"], ratios)
        + "\n\n"
        + C.isolation_markdown(data)
    )
    C.write_results(args.name or "device_search_time", data, text, out=args.out, script="device_search")


def build_parser():
    p = C.argument_parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "check",
        help="captions of Flickr8k dev photos: device vs host search",
        description="Captions of Flickr8k dev photos: the device search against the host's.",
        formatter_class=C.HelpFormatter,
    )
    c.add_argument("--n", type=int, default=200, help="the first N Flickr8k dev photos")
    c.add_argument(
        "--batch", type=int, default=8, help="photos per encoder pass; both searches take its outputs"
    )
    c.add_argument(
        "--options", default="default,no-fusion", help=f"comma list of option sets: {', '.join(OPTION_SETS)}"
    )
    c.add_argument(
        "--flickr8k",
        type=Path,
        default=C.FLICKR8K,
        help="Flickr8k folder (Flickr_8k.devImages.txt and images/)",
    )
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    c.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="a folder whose images/ are searched too (repeatable; e.g. the COCO everyday dev sets)",
    )
    c.add_argument("--fp16", action="store_true", help="the backend in FP16 (FP32 encoder), as on CUDA")
    c.add_argument(
        "--fused",
        action="store_true",
        help="also the fused device search (Triton's interpreter: slow), against the eager one bit for bit",
    )
    t = sub.add_parser(
        "time",
        help="search ms per caption, each variant in its own process",
        description="Search ms per caption, host and device, each variant in its own process.",
        formatter_class=C.HelpFormatter,
    )
    t.add_argument("--beam", type=int, default=3, help="beam size")
    t.add_argument(
        "--batches",
        default="1,8",
        help="batch sizes (photos per search), comma-separated: host and device at each",
    )
    t.add_argument("--max-length", type=int, default=20, help="most words per caption")
    C.add_harness_arguments(t, rounds=8, per_round=4, warmup=3)
    for q, name in ((c, "device_search_check"), (t, "device_search_time")):
        q.add_argument(
            "--model", type=Path, default=None, help="model directory (default: the shipped model)"
        )
        q.add_argument("--name", default=None, help=f"results file name without suffix (default: {name})")
        if q is c:
            C.add_out_argument(q)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    (check if args.command == "check" else time_searches)(args)


if __name__ == "__main__":
    main()
