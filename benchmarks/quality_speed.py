"""Caption quality next to speed, per variant: dev-split CIDEr-D, BLEU-4 and METEOR (coco-caption,
as `edgecap eval` scores them) beside milliseconds per image, on the same photos.

    python benchmarks/quality_speed.py                          # shipped model, 200 dev photos
    python benchmarks/quality_speed.py --limit 1000             # the whole Flickr8k dev split
    python benchmarks/quality_speed.py --model runs/m --variants ort-fp32,ort-int8
    python benchmarks/quality_speed.py --model-dir mine=scratch/int8   # a model made by hand too

The first ``--limit`` photos of Flickr8k's dev split (Flickr_8k.devImages.txt order), beam 3,
batch 8. Speed: each variant in its own worker process (the isolated harness,
``_isolated.py``), one call captioning all the photos (decoding the JPEGs included), rounds
interleaved across the variants with one worker running at a time, then each variant alone in a
fresh worker; ms per image = the interleaved median call / the photo count, and a variant whose
interleaved median is more than 15% off its alone median is flagged. Quality: the captions of
the same model directories with the same options, made in this process after the workers have
ended (quality does not depend on what runs beside it), scored against the references; also the
share of captions identical to ort-fp32's, word for word. METEOR needs Java (left out, with a
note, where there is none). A CIDEr over a subset is comparable between the variants here, not
with a full-split figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common as C


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_model_arguments(p)
    C.add_harness_arguments(p, rounds=2, per_round=1, warmup=1)
    p.add_argument(
        "--data",
        type=Path,
        default=C.FLICKR8K,
        help="Flickr8k folder (images/, Flickr8k.token.txt, Flickr_8k.devImages.txt)",
    )
    p.add_argument("--limit", type=int, default=200, help="the first N dev photos (0: all 1,000)")
    p.add_argument("--beam", type=int, default=3, help="beam size")
    p.add_argument("--batch", type=int, default=8, help="photos per encoder pass and search (batch size)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# -- in the worker ---------------------------------------------------------------------------------


class CaptionSplitTask:
    """One variant's Captioner; measure ``split``: caption every listed photo once."""

    def __init__(self, variant: dict, data: str, limit: int, beam: int, batch: int):
        from edgecap.evaluation.evaluate import caption_split

        v = C.Variant.from_json(variant)
        captioner = v.captioner(beam_size=beam, batch_size=batch)
        items, root = dev_items(Path(data), limit)
        self.measures = {"split": lambda: caption_split(captioner, items, root)}
        self.info = {"describe": captioner.backend.describe(), "model": str(v.model)}


def make_task(**kwargs) -> CaptionSplitTask:
    return CaptionSplitTask(**kwargs)


def dev_items(data: Path, limit: int) -> tuple[list, Path]:
    """The first ``limit`` dev items with their references (all where 0), and the photos' folder."""
    from edgecap.evaluation.evaluate import check_images, load_references

    items = load_references(captions=data / "Flickr8k.token.txt", split=data / "Flickr_8k.devImages.txt")
    if limit:
        items = items[:limit]
    check_images(items, data / "images")
    return items, data / "images"


# -- in the parent ---------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    from edgecap.evaluation import metrics
    from edgecap.evaluation.evaluate import caption_split

    items, images_root = dev_items(args.data, args.limit)
    refs = {item.image_id: item.captions for item in items}
    variants, notes = C.resolve_variants(args)
    if not variants:
        sys.exit("no variant can run here: " + "; ".join(notes))

    # speed: each variant in its own worker
    specs = [
        v.spec(
            "quality_speed:make_task",
            data=str(args.data.resolve()),
            limit=args.limit,
            beam=args.beam,
            batch=args.batch,
        )
        for v in variants
    ]
    load_before = C.load_average()
    harness = C.run_harness(specs, ["split"], args)
    load_after = C.load_average()

    # quality: the same model directories and options, here, one variant at a time
    java = metrics.java_available()
    tokenizer = "ptb" if java else "simple"  # the tokenizer `edgecap eval` would use
    wanted = ("BLEU-4", "METEOR", "CIDEr") if java else ("BLEU-4", "CIDEr")
    if not java:
        notes.append("METEOR left out: it needs Java, which is not installed here")
    results, captions = [], {}
    for v in variants:
        captioner = v.captioner(beam_size=args.beam, batch_size=args.batch)
        captions[v.name] = caption_split(captioner, items, images_root)
        del captioner
        entry = harness["measures"]["split"][v.name]
        scores = metrics.score(refs, captions[v.name], tokenizer=tokenizer, metrics=wanted)
        results.append(
            {
                "variant": v.name,
                "images": len(items),
                "ms_per_image": entry["interleaved"]["median_ms"] / len(items),
                "ms_per_image_alone": entry.get("alone", {}).get("median_ms", float("nan")) / len(items),
                "interleaved_vs_alone": entry.get("interleaved_vs_alone"),
                "flagged": bool(entry.get("flagged")),
                **scores,
            }
        )
        print(f"[quality] {v.name}: CIDEr {scores['CIDEr']:.3f}", file=sys.stderr)
    reference = next((k for k in captions if k.split("/")[0] == "ort-fp32"), None)
    for r in results:
        if reference is not None:
            same = sum(captions[r["variant"]][k] == captions[reference][k] for k in refs)
            r["identical_to_ort_fp32"] = same / len(refs)
            r["captions_differing_from_ort_fp32"] = len(refs) - same
            r["cider_vs_ort_fp32"] = r["CIDEr"] - next(
                x["CIDEr"] for x in results if x["variant"] == reference
            )
    data = {
        "images": len(items),
        "split": "Flickr8k dev",
        "beam": args.beam,
        "batch": args.batch,
        "tokenizer": tokenizer,
        "load_average": [load_before, load_after],
        "skipped": notes,
        "settings": harness["settings"],
        "variants": harness["variants"],
        "flags": harness["flags"],
        "results": results,
        "captions": {k: {str(i): c for i, c in v.items()} for k, v in captions.items()},
    }
    C.write_results("quality_speed", data, report(data), argv, out=args.out)
    if data["flags"]:
        print("FLAGGED: " + "; ".join(data["flags"]), file=sys.stderr)


def report(data: dict) -> str:
    headers = [
        "variant",
        "CIDEr-D",
        "vs ort-fp32",
        "BLEU-4",
        "METEOR",
        "ms / image",
        *C.HARNESS_HEADERS,
        "identical to ort-fp32",
    ]
    rows = [
        [
            r["variant"],
            r["CIDEr"],
            f"{r['cider_vs_ort_fp32']:+.3f}" if "cider_vs_ort_fp32" in r else "-",
            r["BLEU-4"],
            r.get("METEOR", float("nan")),
            r["ms_per_image"],
            *C.harness_cells(
                {
                    "alone": {"median_ms": r["ms_per_image_alone"]},
                    "interleaved_vs_alone": r["interleaved_vs_alone"],
                    "flagged": r["flagged"],
                }
            ),
            f"{100 * r['identical_to_ort_fp32']:.1f}%" if "identical_to_ort_fp32" in r else "-",
        ]
        for r in data["results"]
    ]
    lines = [
        f"First {data['images']} photos of the Flickr8k dev split, beam {data['beam']}, "
        f"batch {data['batch']}; coco-caption scores with the {data['tokenizer']} tokenizer; "
        f"load average before/after the timing {data['load_average'][0]} / "
        f"{data['load_average'][1]}.",
        "",
    ]
    lines += [
        f"- {name}: {v['info'].get('describe')}; model {v['info'].get('model')}"
        for name, v in data["variants"].items()
    ]
    lines += [f"- {n}" for n in data["skipped"]]
    lines += [
        "",
        C.markdown_table(headers, rows),
        "",
        "ms / image: the interleaved median of a call captioning all the photos (JPEG "
        "decoding included) / the photo count; alone p50 likewise per image.",
        "",
        C.isolation_markdown(data),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    C.run_main(main)
