"""Caption quality next to speed, per variant: dev-split CIDEr-D and BLEU-4 (coco-caption, as
`edgecap eval` scores them) beside milliseconds per image, on the same photos.

    python benchmarks/quality_speed.py                          # shipped model, 200 dev photos
    python benchmarks/quality_speed.py --limit 1000             # the whole Flickr8k dev split
    python benchmarks/quality_speed.py --model runs/m --variants ort-fp32,ort-int8

The first ``--limit`` photos of Flickr8k's dev split (Flickr_8k.devImages.txt order), beam 3,
batch 8. Every variant captions the same photos; time per image is the captioning wall time
(decoding the JPEGs included) over the photo count. Also reported: how many captions differ from
ort-fp32's, word for word. A CIDEr over a subset is comparable between the variants here, not
with a full-split figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_model_arguments(p)
    p.add_argument("--data", type=Path, default=C.FLICKR8K,
                   help="Flickr8k folder (images/, Flickr8k.token.txt, Flickr_8k.devImages.txt)")
    p.add_argument("--limit", type=int, default=200, help="dev photos (0: all 1,000)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from edgecap.evaluation import metrics
    from edgecap.evaluation.evaluate import caption_split, check_images, load_references

    items = load_references(captions=args.data / "Flickr8k.token.txt",
                            split=args.data / "Flickr_8k.devImages.txt")
    if args.limit:
        items = items[:args.limit]
    images_root = args.data / "images"
    check_images(items, images_root)
    refs = {item.image_id: item.captions for item in items}
    # The tokenizer `edgecap eval` would use; METEOR is left out (slow, and it needs Java).
    tokenizer = "ptb" if metrics.java_available() else "simple"
    variants, notes = C.resolve_variants(args)
    results, captions = [], {}
    for v in variants:
        captioner = v.captioner(beam_size=args.beam, batch_size=args.batch)
        caption_split(captioner, items[:args.batch], images_root)  # warm-up
        t0 = time.perf_counter()
        hyps = caption_split(captioner, items, images_root)
        seconds = time.perf_counter() - t0
        scores = metrics.score(refs, hyps, tokenizer=tokenizer, metrics=("BLEU-4", "CIDEr"))
        captions[v.name] = hyps
        results.append({"variant": v.name, "images": len(items), "seconds": seconds,
                        "ms_per_image": seconds / len(items) * 1e3, **scores})
        print(f"[quality] {v.name}: CIDEr {scores['CIDEr']:.3f}, "
              f"{seconds / len(items) * 1e3:.1f} ms/image", file=sys.stderr)
    reference = next((k for k in captions if k.split("/")[0] == "ort-fp32"), None)
    for r in results:
        if reference is not None:
            r["captions_differing_from_ort_fp32"] = sum(
                captions[r["variant"]][k] != captions[reference][k] for k in refs)
    data = {"images": len(items), "split": "Flickr8k dev", "beam": args.beam,
            "batch": args.batch, "tokenizer": tokenizer, "load_average": C.load_average(),
            "skipped": notes, "results": results,
            "captions": {k: {str(i): c for i, c in v.items()} for k, v in captions.items()}}
    headers = ["variant", "CIDEr-D", "BLEU-4", "ms / image", "captions != ort-fp32"]
    rows = [[r["variant"], r["CIDEr"], r["BLEU-4"], r["ms_per_image"],
             r.get("captions_differing_from_ort_fp32", "-")] for r in results]
    text = (f"First {len(items)} photos of the Flickr8k dev split, beam {args.beam}, batch "
            f"{args.batch}; coco-caption scores with the {tokenizer} tokenizer; load average "
            f"{data['load_average']}.\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
            + C.markdown_table(headers, rows))
    C.write_results("quality_speed", data, text, argv)


if __name__ == "__main__":
    main()
