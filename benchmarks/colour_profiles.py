"""Colour profiles: the everyday dev photos captioned with their embedded profiles applied and not.

    python benchmarks/colour_profiles.py --data ../shared/data [--out DIR]

The 160 everyday dev photos (coco-ood-dev and coco-ood-dev-b, read from ``--data``: research
data, read here, never a fixture or a shipped file) are captioned from their files twice with
the default options: as the Captioner reads them (an embedded RGB profile other than sRGB
converted to sRGB, ``edgecap.images``) and with the pixels as stored (the conversion turned off
in this process). Reported: the photos' profiles by name, the captions that differ, CIDEr-D
against the five references with the difference as a paired bootstrap over the photos
(``_stats.paired_bootstrap``), on all 160 and on the converted photos alone, and the decoding
time of a converted photo with and without the conversion (``edgecap.images.load_rgb``,
median of ``--repeats`` interleaved rounds). docs/reliability.md quotes the results.
"""

from __future__ import annotations

import io
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

SETS = ("coco-ood-dev", "coco-ood-dev-b")


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data", type=Path, required=True, help="folder holding coco-ood-dev/ and coco-ood-dev-b/"
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    p.add_argument(
        "--repeats", type=int, default=20, help="timed decodings of each converted photo (default: 20)"
    )
    C.add_out_argument(p)
    return p


def photos_and_references(data: Path) -> tuple[list[Path], dict[int, list[str]]]:
    from edgecap.evaluation.evaluate import load_references

    paths, references = [], {}
    for name in SETS:
        folder = data / name
        if not folder.is_dir():
            raise SystemExit(f"colour_profiles: no such folder: {folder}")
        for item in load_references(references=folder / "captions_cocofmt.json"):
            references[len(paths)] = item.captions
            paths.append(folder / "images" / item.file_name)
    return paths, references


def profile_name(path: Path) -> str:
    from PIL import Image, ImageCms

    with Image.open(path) as im:
        profile = im.info.get("icc_profile")
    if not profile:
        return "none"
    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile))).strip()
    except Exception as exc:  # noqa: BLE001
        return f"unreadable ({type(exc).__name__})"


def main(argv=None) -> int:
    from edgecap import Captioner, images
    from edgecap.evaluation.metrics import per_image_cider

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    paths, references = photos_and_references(args.data)
    names = [profile_name(p) for p in paths]
    applied = images._srgb_transform

    def stored(profile: bytes) -> None:
        return None

    def converted(path: Path) -> bool:
        from PIL import Image

        with Image.open(path) as im:
            profile = im.info.get("icc_profile")
            return im.mode in images._COLOUR_MODES and bool(profile) and applied(profile) is not None

    changed_paths = [i for i, p in enumerate(paths) if converted(p)]
    captioner = Captioner(model)
    texts, cider = {}, {}
    for label, transform in (("converted", applied), ("as stored", stored)):
        images._srgb_transform = transform
        try:
            captions = captioner.caption_batch(paths)
        finally:
            images._srgb_transform = applied
        texts[label] = [c.text for c in captions]
        per_photo = per_image_cider(references, dict(enumerate(texts[label])))
        cider[label] = [per_photo[i] for i in range(len(paths))]
        print(f"{label}: CIDEr {np.mean(cider[label]):.4f}", file=sys.stderr)
    differ = [i for i in range(len(paths)) if texts["converted"][i] != texts["as stored"][i]]
    whole = paired_bootstrap(cider["as stored"], cider["converted"])
    subset = (
        paired_bootstrap(
            [cider["as stored"][i] for i in changed_paths], [cider["converted"][i] for i in changed_paths]
        )
        if changed_paths
        else None
    )
    timings: dict[str, list[float]] = {"converted": [], "as stored": []}
    for _ in range(args.repeats):
        for label, transform in (("converted", applied), ("as stored", stored)):
            images._srgb_transform = transform
            try:
                for i in changed_paths:
                    start = time.perf_counter()
                    images.load_rgb(paths[i])
                    timings[label].append((time.perf_counter() - start) * 1e3)
            finally:
                images._srgb_transform = applied
    decode = {k: C.median(v) for k, v in timings.items() if v}

    def interval(d) -> str:
        return f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    profiles = Counter(names)
    rows = [
        [
            f"all {len(paths)}",
            f"{np.mean(cider['converted']):.4f}",
            f"{np.mean(cider['as stored']):.4f}",
            interval(whole),
        ]
    ]
    if subset:
        rows.append(
            [
                f"the {len(changed_paths)} converted",
                f"{np.mean([cider['converted'][i] for i in changed_paths]):.4f}",
                f"{np.mean([cider['as stored'][i] for i in changed_paths]):.4f}",
                interval(subset),
            ]
        )
    table = C.markdown_table(["photos", "CIDEr, converted", "as stored", "difference [95%]"], rows)
    lines = [
        f"Model: {model.name}; the {len(paths)} photos of {' and '.join(SETS)} captioned from their files, "
        "default options (beam 3).",
        "",
        "Embedded profiles: " + ", ".join(f"{name} {n}" for name, n in profiles.most_common()) + ".",
        f"Converted to sRGB: {len(changed_paths)} photos; captions that differ: {len(differ)}.",
        "",
        table,
        "",
    ]
    if decode:
        lines.append(
            f"Decoding a converted photo (`load_rgb`, median of {len(timings['converted'])}): "
            f"{decode['converted']:.2f} ms converted, {decode['as stored']:.2f} ms as stored."
        )
        lines.append("")
    if differ:
        lines.append("| photo | profile | converted | as stored |")
        lines.append("|---|---|---|---|")
        for i in differ:
            lines.append(
                f"| {paths[i].name} | {names[i]} | {texts['converted'][i]} | {texts['as stored'][i]} |"
            )
    data = {
        "model": str(model),
        "profiles": dict(profiles),
        "converted": [paths[i].name for i in changed_paths],
        "differ": [
            {
                "photo": paths[i].name,
                "profile": names[i],
                "converted": texts["converted"][i],
                "as_stored": texts["as stored"][i],
            }
            for i in differ
        ],
        "cider": {k: float(np.mean(v)) for k, v in cider.items()},
        "difference_all": whole,
        "difference_converted": subset,
        "decode_ms": decode,
    }
    C.write_results("colour_profiles", data, "\n".join(lines), argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
