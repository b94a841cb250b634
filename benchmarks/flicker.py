"""How often two frames of one still scene get different captions, per decoding setting.

    python benchmarks/flicker.py --data ../shared/data [--limit N] [--out DIR]

``benchmarks/changes_only.py`` found that a second frame of a still scene, differing only in
sensor noise, is captioned differently for 38% of the dev photos with the default options. This
says where that comes from: each of the 273 dev photos (coco-ood-dev, coco-ood-dev-b,
flickr8k-fullres-dev; research data, read from ``--data``: never a fixture or a shipped file)
as two frames with independent sensor noise (s.d. 2 levels), each captioned with the shipped
model under each setting: the default; without the consensus choice; without the everyday
language model (fusion); without the tag guidance; the caption model alone (all three off);
beam 1 and beam 5. Per setting: how many photos' two captions differ, how many of those by one
word (the same length, one word replaced), and the mean per-photo CIDEr-D of each frame's
captions (flicker is not an error: the captions that flip are as good as those they replace).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from bars import add_photos_arguments  # noqa: E402
from changes_only import NOISE_SD, noisy  # noqa: E402, F401 (NOISE_SD: the frames' noise, as changes_only's)

SETTINGS = {
    "default": {},
    "no consensus": {"consensus": False},
    "no fusion": {"fusion_weight": 0.0},
    "no guidance": {"guidance_bonus": 0.0},
    "the caption model alone": {"consensus": False, "fusion_weight": 0.0, "guidance_bonus": 0.0},
    "beam 1": {"beam_size": 1},
    "beam 5": {"beam_size": 5},
}


def one_word_apart(a: str, b: str) -> bool:
    """The same number of words, exactly one of them different."""
    x, y = a.split(), b.split()
    return len(x) == len(y) and sum(p != q for p, q in zip(x, y)) == 1


def build_parser():
    p = C.argument_parser(__doc__)
    add_photos_arguments(p)
    C.add_out_argument(p)
    return p


def main(argv=None) -> int:
    import copy
    from dataclasses import replace

    from bars import photos_and_references

    from edgecap import Captioner
    from edgecap.evaluation.metrics import per_image_cider

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    photos, references = photos_and_references(args.data, args.limit)
    rng = np.random.default_rng(0)
    first = [noisy(p, rng) for p in photos]
    second = [noisy(p, rng) for p in photos]
    base = Captioner(model)
    rows, data = [], {}
    for name, options in SETTINGS.items():
        captioner = copy.copy(base)
        captioner.options = replace(base.options, **options)
        a = [c.text for c in captioner.caption_batch(first)]
        b = [c.text for c in captioner.caption_batch(second)]
        differ = [x != y for x, y in zip(a, b)]
        one_word = sum(one_word_apart(x, y) for x, y, d in zip(a, b, differ) if d)
        cider = [per_image_cider(references, dict(enumerate(texts))) for texts in (a, b)]
        means = [float(np.mean([c[i] for i in range(len(photos))])) for c in cider]
        data[name] = {"options": options, "differ": int(sum(differ)), "one word": one_word, "cider": means}
        rows.append(
            [
                name,
                f"{sum(differ)} / {len(photos)} ({np.mean(differ):.0%})",
                str(one_word),
                f"{means[0]:.3f} / {means[1]:.3f}",
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = C.markdown_table(
        [
            "setting",
            "photos captioned differently",
            "of those, one word apart",
            "CIDEr-D, first / second frame",
        ],
        rows,
    )
    markdown = (
        f"Model: {model.name}. Each photo as two frames with independent sensor noise (s.d. {NOISE_SD:g}), "
        "each captioned under each setting (the others at their defaults).\n\n" + table + "\n"
    )
    C.write_results("flicker", {"model": str(model), "settings": data}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
