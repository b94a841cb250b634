"""Lights in view at night: dark frames with lamps over 2-20% of the frame, brightened by the
shipped rule and by the rule without its wide tier (lights over 5-25% of a night scene).

    python benchmarks/lights.py --data ../shared/data [--flickr8k-limit N] [--out DIR]
        [--wide-share 25] [--night-level 32]

A dark frame is brightened (``edgecap.preprocess.exposure_gain``) metered on its brightest 1%;
where those are lights (twice the level of its brightest 5%), on its brightest 5%; and where the
brightest 5% are lights too, twice the level of the brightest ``WIDE_SHARE`` percent, and that
level is under ``NIGHT_LEVEL`` (a night scene), on the brightest ``WIDE_SHARE`` percent: the
wide tier. Without it (``NIGHT_LEVEL`` 0), lights over more than 5% of a night frame were taken
for the scene, and the frame was not brightened.

Frames: the 273 dev photos (coco-ood-dev, coco-ood-dev-b, flickr8k-fullres-dev; research data,
read from ``--data``: never a fixture or a shipped file) at 6% of their light with three round
lamps (level 250) over 2%, 5%, 10% and 20% of the frame; the 160 everyday photos darkened (x0.7,
x0.5, x0.3, x0.2, x0.1, no lamps) and as taken; the Flickr8k dev photos as taken. Each captioned with the
default options under both rules (a frame whose gain is the same under both is captioned once:
the same frame, the same caption); CIDEr-D against the photo's references (document frequencies
from its set's), the paired difference with a bootstrap interval over the photos, and how many
frames the wide tier brightens otherwise. ``--wide-share`` and ``--night-level`` try other
values for the wide tier (the rule compared against stays the one without it).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

LIGHT = 0.06  # the night frames' share of the photo's light
LAMP_LEVEL = 250
LAMPS = 3
LAMP_SHARES = (0.02, 0.05, 0.10, 0.20)
DARKENED = (0.7, 0.5, 0.3, 0.2, 0.1)  # dark_frames.py's levels
SHIPPED = "shipped rule"
WITHOUT = "without the wide tier"


def with_lamps(photo: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``photo`` at ``LIGHT`` of its levels with ``LAMPS`` round lamps at ``LAMP_LEVEL`` over
    ``share`` of the frame in all (each wholly inside it; where they overlap, less)."""
    out = np.round(photo.astype(np.float32) * LIGHT)
    h, w = photo.shape[:2]
    radius = np.sqrt(share * h * w / LAMPS / np.pi)
    rows, cols = np.mgrid[:h, :w]
    for _ in range(LAMPS):
        y = rng.uniform(radius, h - radius) if h > 2 * radius else h / 2
        x = rng.uniform(radius, w - radius) if w > 2 * radius else w / 2
        out[(rows - y) ** 2 + (cols - x) ** 2 <= radius**2] = LAMP_LEVEL
    return out.astype(np.uint8)


def darkened(photo: np.ndarray, level: float) -> np.ndarray:
    return np.minimum(np.round(photo * np.float32(level)), 255).astype(np.uint8)


@contextlib.contextmanager
def rule(wide_share: int, night_level: int):
    """``edgecap.preprocess``'s wide tier set to these values for the block (night level 0: off)."""
    import edgecap.preprocess as P

    saved = P.WIDE_SHARE, P.NIGHT_LEVEL
    P.WIDE_SHARE, P.NIGHT_LEVEL = wide_share, night_level
    try:
        yield
    finally:
        P.WIDE_SHARE, P.NIGHT_LEVEL = saved


def gains(frames: list[np.ndarray], pre) -> np.ndarray:
    """Each frame's brightening gain under the rule in force."""
    from PIL import Image

    from edgecap.preprocess import model_input

    return np.array([float(model_input(Image.fromarray(f), pre, brighten=True)[1]) for f in frames])


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data", type=Path, required=True, help="folder holding coco-ood-dev/, coco-ood-dev-b/, flickr8k*/"
    )
    p.add_argument("--flickr8k-limit", type=C.positive_int, help="only the first N Flickr8k dev photos")
    p.add_argument("--wide-share", type=C.positive_int, default=None, help="the wide tier's share (percent)")
    p.add_argument("--night-level", type=C.positive_int, default=None, help="the wide tier's night level")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    C.add_out_argument(p)
    return p


def compare(captioner, frames, references, shipped, without) -> dict:
    """Caption ``frames`` under both rules (``shipped`` and ``without``: ``rule`` contexts'
    arguments) -> the row's figures."""
    from edgecap.evaluation.metrics import per_image_cider

    pre = captioner.manifest.preprocessing
    with rule(*without):
        before = gains(frames, pre)
        base = captioner.caption_batch(frames)
    with rule(*shipped):
        after = gains(frames, pre)
        changed = [i for i in range(len(frames)) if after[i] != before[i]]
        anew = captioner.caption_batch([frames[i] for i in changed]) if changed else []
    texts = {"without": [c.text for c in base]}
    texts["shipped"] = list(texts["without"])
    for i, caption in zip(changed, anew):
        texts["shipped"][i] = caption.text
    cider = {}
    for label, t in texts.items():
        per_photo = per_image_cider(references, dict(enumerate(t)))
        cider[label] = [per_photo[i] for i in range(len(frames))]
    diff = paired_bootstrap(cider["without"], cider["shipped"])
    return {
        "photos": len(frames),
        "brightened otherwise": len(changed),
        "brightened (shipped rule)": int((after > 1).sum()),
        "cider": {SHIPPED: float(np.mean(cider["shipped"])), WITHOUT: float(np.mean(cider["without"]))},
        "difference": diff,
        "captions changed": sum(a != b for a, b in zip(texts["shipped"], texts["without"])),
    }


def main(argv=None) -> int:
    from bars import SETS as EVERYDAY
    from bars import photos_and_references
    from decoding_choice import load_sets

    import edgecap.preprocess as P
    from edgecap import Captioner

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    captioner = Captioner(model)
    shipped = (args.wide_share or P.WIDE_SHARE, args.night_level or P.NIGHT_LEVEL)
    without = (P.WIDE_SHARE, 0)
    photos, references = photos_and_references(args.data)  # the everyday photos first
    sets = load_sets(args.data, args.flickr8k_limit)
    everyday = photos[: sum(len(sets[name][0]) for name in EVERYDAY)]
    everyday_refs = {i: references[i] for i in range(len(everyday))}
    items, root = sets["flickr8k-dev"]
    rows, results = [], []

    def add(name: str, frames, refs) -> None:
        r = {"frames": name, **compare(captioner, frames, refs, shipped, without)}
        results.append(r)
        d = r["difference"]
        rows.append(
            [
                name,
                str(r["photos"]),
                f"{r['cider'][SHIPPED]:.3f}",
                f"{r['cider'][WITHOUT]:.3f}",
                f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                str(r["brightened otherwise"]),
                str(r["captions changed"]),
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    for share in LAMP_SHARES:
        frames = [with_lamps(p, share, np.random.default_rng(i)) for i, p in enumerate(photos)]
        add(f"{LIGHT:.0%} of the light, lamps over {share:.0%}", frames, references)
    for level in DARKENED:
        add(f"everyday, x {level:g}", [darkened(p, level) for p in everyday], everyday_refs)
    add("everyday, as taken", everyday, everyday_refs)
    from PIL import Image

    flickr = []
    for item in items:
        with Image.open(root / item.file_name) as image:
            flickr.append(np.asarray(image.convert("RGB")))
    add("Flickr8k dev, as taken", flickr, {i: item.captions for i, item in enumerate(items)})
    table = C.markdown_table(
        [
            "frames",
            "photos",
            f"CIDEr, {SHIPPED}",
            WITHOUT,
            "difference [95%]",
            "brightened otherwise",
            "captions changed",
        ],
        rows,
    )
    markdown = (
        f"Model: {model.name}; default options. The wide tier: lights over 5-{shipped[0]}% of a frame whose "
        f"brightest {shipped[0]}% are under level {shipped[1]}, metered on those. Difference: the shipped "
        f"rule minus the rule without the wide tier, paired bootstrap over the photos; brightened "
        f"otherwise: frames whose gain differs.\n\n{table}\n"
    )
    data = {"model": str(model), "wide share": shipped[0], "night level": shipped[1], "frames": results}
    C.write_results("lights", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
