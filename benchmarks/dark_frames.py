"""Dark frames: the everyday dev photos darkened, captioned with and without brightening.

    python benchmarks/dark_frames.py --data ../shared/data [--out DIR]

Each of the 160 everyday dev photos (coco-ood-dev and coco-ood-dev-b, read from ``--data``:
research data, read here, never a fixture or a shipped file) has its levels multiplied by
``--levels`` (rounded, at most 255), as a dimmer scene or a shorter exposure would give them, and
is captioned twice with the default options (blank check on): as the Captioner does by default
(a dark frame brightened first, ``edgecap.preprocess.exposure_gain``) and with
``brighten=False``. Each gets CIDEr-D against the photos' five references, the difference as a
paired bootstrap over the photos (``_stats.paired_bootstrap``), and the count of frames said to
be "nothing recognisable". The ``as taken`` row checks that frames that are not dark are left
alone (the same captions). docs/cameras.md ("Dark frames") quotes the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

SETS = ("coco-ood-dev", "coco-ood-dev-b")
LEVELS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data", type=Path, required=True, help="folder holding coco-ood-dev/ and coco-ood-dev-b/"
    )
    p.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=list(LEVELS),
        help=f"the factors the photos' levels are multiplied by (default: {' '.join(map(str, LEVELS))})",
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    C.add_out_argument(p)
    return p


def photos_and_references(data: Path) -> tuple[list[np.ndarray], dict[int, list[str]]]:
    """The photos as float32 RGB arrays and their reference captions, by index."""
    from PIL import Image

    from edgecap.evaluation.evaluate import load_references

    photos, references = [], {}
    for name in SETS:
        folder = data / name
        if not folder.is_dir():
            raise SystemExit(f"dark_frames: no such folder: {folder}")
        for item in load_references(references=folder / "captions_cocofmt.json"):
            references[len(photos)] = item.captions
            with Image.open(folder / "images" / item.file_name) as im:
                photos.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    return photos, references


def main(argv=None) -> int:
    from edgecap import Captioner
    from edgecap.evaluation.metrics import per_image_cider

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    photos, references = photos_and_references(args.data)
    captioners = {"brightened": Captioner(model), "as they are": Captioner(model, brighten=False)}
    rows, results = [], []
    for level in args.levels:
        frames = [np.minimum(np.round(p * level), 255).astype(np.uint8) for p in photos]
        cider, blank = {}, {}
        for label, captioner in captioners.items():
            captions = captioner.caption_batch(frames)
            per_photo = per_image_cider(references, {i: c.text for i, c in enumerate(captions)})
            cider[label] = [per_photo[i] for i in range(len(frames))]
            blank[label] = sum(not c.recognisable for c in captions)
        diff = paired_bootstrap(cider["as they are"], cider["brightened"])
        results.append(
            {
                "level": level,
                "cider": {k: float(np.mean(v)) for k, v in cider.items()},
                "difference": diff,
                "nothing_recognisable": blank,
            }
        )
        rows.append(
            [
                "as taken" if level == 1 else f"x {level:g}",
                f"{np.mean(cider['brightened']):.3f}",
                f"{np.mean(cider['as they are']):.3f}",
                f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]",
                f"{blank['brightened']} ({blank['as they are']})",
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr)
    table = C.markdown_table(
        [
            "photo levels",
            "CIDEr",
            "brighten=False",
            "difference [95%]",
            f"nothing recognisable (of {len(photos)}; brighten=False)",
        ],
        rows,
    )
    markdown = (
        f"Model: {model.name}; the {len(photos)} photos of {' and '.join(SETS)}, their levels "
        f"multiplied by each factor; default options (beam 3, blank check on).\n\n{table}\n"
    )
    C.write_results("dark_frames", {"model": str(model), "levels": results}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
