"""Is model B's dev CIDEr really better than model A's? A paired bootstrap over the photos.

    edgecap eval ... --model A --output a.json ; edgecap eval ... --model B --output b.json
    python benchmarks/compare_results.py a.json b.json               # Flickr8k dev references
    python benchmarks/compare_results.py a.json b.json --references refs.json

Both files are ``edgecap eval --output`` results (``[{"image_id", "caption"}]``) of the same
photos. Prints each model's CIDEr-D, the difference B - A with a 95% interval from resampling the
photos (10,000 resamples; the document frequencies stay those of the whole split) and the share
of resamples where B is not better, as one JSON line on stdout; also compare_results.json / .md
in ``--out DIR`` (default: a new folder under benchmarks/runs/). On the 1,000-photo Flickr8k dev
split the interval of two close models is about +-0.016 CIDEr wide: a smaller gain is within
the noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import _common as C


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("a", type=Path, help="results of model A (the baseline): edgecap eval --output JSON")
    p.add_argument("b", type=Path, help="results of model B, of the same photos")
    p.add_argument(
        "--references", type=Path, help="COCO caption JSON (default: the Flickr8k dev references in --data)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=C.FLICKR8K,
        help="Flickr8k folder (Flickr8k.token.txt, Flickr_8k.devImages.txt), read without --references",
    )
    p.add_argument(
        "--resamples",
        type=C.positive_int,
        default=10000,
        help="bootstrap resamples of the photos, for the 95%% interval",
    )
    C.add_out_argument(p)
    return p


def read_results(path: Path) -> dict:
    """{image_id: caption} of an ``edgecap eval --output`` file; ``DataError`` naming the file
    where it is not such a list (a JSON object had been a TypeError traceback) or holds two
    captions of one photo (the last had silently been kept)."""
    from edgecap.errors import DataError

    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not JSON ({exc})") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"image_id", "caption"} <= set(r) for r in rows
    ):
        raise DataError(
            f'{path}: not edgecap eval --output results (a JSON list of {{"image_id", "caption"}})'
        )
    hyps: dict = {}
    for r in rows:
        if r["image_id"] in hyps:
            raise DataError(f"{path}: two captions of image_id {r['image_id']!r}")
        hyps[r["image_id"]] = r["caption"]
    return hyps


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    from edgecap.evaluation.evaluate import load_references
    from _stats import paired_bootstrap
    from edgecap.evaluation.metrics import per_image_cider

    if args.references:
        items = load_references(references=args.references)
    else:
        items = load_references(
            captions=args.data / "Flickr8k.token.txt", split=args.data / "Flickr_8k.devImages.txt"
        )
    refs = {item.image_id: item.captions for item in items}
    scores = {}
    for name, path in (("A", args.a), ("B", args.b)):
        hyps = read_results(path)
        missing = [k for k in refs if k not in hyps]
        if missing:
            raise SystemExit(f"{path}: no caption for {len(missing)} reference images, e.g. {missing[:3]}")
        scores[name] = per_image_cider(refs, hyps)
    ids = list(refs)
    a = [scores["A"][k] for k in ids]
    b = [scores["B"][k] for k in ids]
    result = paired_bootstrap(a, b, args.resamples)
    out = {
        "n_images": len(ids),
        "CIDEr A": round(sum(a) / len(a), 4),
        "CIDEr B": round(sum(b) / len(b), 4),
        **{k: round(v, 4) for k, v in result.items()},
    }
    print(json.dumps(out))
    table = C.markdown_table(list(out), [list(out.values())])
    C.write_results(
        "compare_results",
        {"a": str(args.a), "b": str(args.b), **out},
        f"Per-photo CIDEr-D of {args.a} (A) and {args.b} (B), paired bootstrap over "
        f"the photos ({args.resamples} resamples).\n\n{table}",
        argv,
        out=args.out,
        echo=False,
    )


if __name__ == "__main__":
    C.run_main(main)
