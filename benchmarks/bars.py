"""Letterbox and pillarbox bars: dev photos framed with bars, captioned with and without cropping.

    python benchmarks/bars.py --data ../shared/data [--out DIR]

The 273 dev photos (coco-ood-dev, coco-ood-dev-b and the 113 Flickr8k dev photos at full
resolution, read from ``--data``: research data, read here, never a fixture or a shipped file)
are framed as a video player or a camera frames a picture of another shape: letterboxed (the
photo resized to 16:9 at its width, black bars above and below to make 4:3) and pillarboxed
(resized to 4:3 at its height, bars left and right to make 16:9), exactly and through JPEG at
quality 75 (the codec's ringing at the picture's edge), and letterboxed at a fifth of the light
(a dark scene, which the Captioner brightens). Each frame is captioned by the Captioner as it is
by default (``crop_bars``: the bars cropped, ``edgecap.preprocess.bars``) and with
``crop_bars=False``, and gets CIDEr-D against its photo's references, the difference a paired
bootstrap over the photos; the picture captioned alone (16:9 or 4:3, no bars; through JPEG for
the JPEG rows) is the ceiling.
The ``as taken`` rows check that photos without bars are left alone (the same captions), as
taken and at a tenth of their light (a night scene's dark edges).

Blank frames (a white, a grey and a blue wall, a dark one) with bars: how many are "nothing
recognisable". And the false alarms: of the 7,091 Flickr8k photos as taken and darkened to a
fifth, a tenth and a twentieth of their light, how many are found to have bars. And what the search for bars
costs a frame. docs/cameras.md ("Black bars") quotes the results.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

SETS = ("coco-ood-dev", "coco-ood-dev-b")
FULLRES = "flickr8k-fullres-dev"
JPEG_QUALITY = 75
DARK = 0.2
DARKEST = 0.1  # photos without bars this dark: the dark edges a night scene has
BLANKS = {
    "white wall": (235, 235, 230),
    "grey wall": (128, 128, 128),
    "blue": (40, 80, 200),
    "dark": (6, 6, 6),
}


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help=f"folder holding {', '.join(SETS)}, {FULLRES} and flickr8k",
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    C.add_out_argument(p)
    return p


def add_photos_arguments(p) -> None:
    """``--data``, ``--limit`` and ``--model`` of a script run on ``photos_and_references``'s
    photos."""
    p.add_argument(
        "--data", type=Path, required=True, help="folder holding coco-ood-dev/, coco-ood-dev-b/, flickr8k*/"
    )
    p.add_argument("--limit", type=C.positive_int, help="only the first N of the 273 photos")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")


def photos_and_references(
    data: Path, limit: int | None = None
) -> tuple[list[np.ndarray], dict[int, list[str]]]:
    """The 273 photos as uint8 RGB arrays and their reference captions, by index; ``limit``:
    only the first that many (the others not read)."""
    from PIL import Image

    from edgecap.evaluation.evaluate import load_references

    photos, references = [], {}

    def add(folder: Path, items) -> None:
        for item in items:
            if limit is not None and len(photos) >= limit:
                return
            references[len(photos)] = item.captions
            with Image.open(folder / item.file_name) as im:
                photos.append(np.asarray(im.convert("RGB")))

    for name in SETS:
        folder = data / name
        if not folder.is_dir():
            raise SystemExit(f"bars: no such folder: {folder}")
        add(folder / "images", load_references(references=folder / "captions_cocofmt.json"))
    fullres = data / FULLRES
    if not fullres.is_dir():
        raise SystemExit(f"bars: no such folder: {fullres}")
    names = {p.name for p in fullres.glob("*.jpg")}
    flickr = load_references(
        captions=data / "flickr8k" / "Flickr8k.token.txt", split=data / "flickr8k" / "Flickr_8k.devImages.txt"
    )
    add(fullres, sorted((i for i in flickr if Path(i.file_name).name in names), key=lambda i: i.file_name))
    return photos, references


def resized(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR))


def letterboxed(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the photo resized to 16:9 at its width, that picture with black bars making it 4:3)."""
    w = photo.shape[1]
    picture = resized(photo, w, round(w * 9 / 16))
    frame = np.zeros((round(w * 3 / 4), w, 3), np.uint8)
    top = (frame.shape[0] - picture.shape[0]) // 2
    frame[top : top + picture.shape[0]] = picture
    return picture, frame


def pillarboxed(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the photo resized to 4:3 at its height, that picture with black bars making it 16:9)."""
    h = photo.shape[0]
    picture = resized(photo, round(h * 4 / 3), h)
    frame = np.zeros((h, round(h * 16 / 9), 3), np.uint8)
    left = (frame.shape[1] - picture.shape[1]) // 2
    frame[:, left : left + picture.shape[1]] = picture
    return picture, frame


def jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """``frame`` through JPEG at ``quality`` and back to RGB."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("RGB"))


def darkened(frame: np.ndarray, level: float) -> np.ndarray:
    return np.minimum(np.round(frame * np.float32(level)), 255).astype(np.uint8)


def variants(photos: list[np.ndarray]) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """name -> (the frames, the pictures inside them alone)."""
    letter = [letterboxed(p) for p in photos]
    pillar = [pillarboxed(p) for p in photos]
    return {
        "as taken": (photos, photos),
        "letterboxed (16:9 in 4:3)": ([f for _, f in letter], [p for p, _ in letter]),
        f"letterboxed, JPEG {JPEG_QUALITY}": ([jpeg(f) for _, f in letter], [jpeg(p) for p, _ in letter]),
        "pillarboxed (4:3 in 16:9)": ([f for _, f in pillar], [p for p, _ in pillar]),
        f"pillarboxed, JPEG {JPEG_QUALITY}": ([jpeg(f) for _, f in pillar], [jpeg(p) for p, _ in pillar]),
        f"letterboxed, levels x {DARK:g}": (
            [darkened(f, DARK) for _, f in letter],
            [darkened(p, DARK) for p, _ in letter],
        ),
        f"as taken, levels x {DARKEST:g}": ([darkened(p, DARKEST) for p in photos],) * 2,
    }


def blank_frames() -> dict[str, np.ndarray]:
    frames = {}
    for name, colour in BLANKS.items():
        picture = np.empty((360, 640, 3), np.uint8)
        picture[:] = colour
        frames[f"{name}, letterboxed"] = letterboxed(picture)[1]
        frames[f"{name}, pillarboxed"] = pillarboxed(picture[:, :480])[1]
    return frames


def false_alarms(data: Path) -> list[dict]:
    """Of the Flickr8k photos as taken and darkened, how many are found to have bars."""
    from PIL import Image

    from edgecap.preprocess import bar_box

    files = sorted((data / "flickr8k" / "images").glob("*.jpg"))
    counts = {1.0: 0, 0.2: 0, 0.1: 0, 0.05: 0}
    for path in files:
        with Image.open(path) as im:
            photo = np.asarray(im.convert("RGB"))
        for level in counts:
            if bar_box(photo if level == 1 else darkened(photo, level)) is not None:
                counts[level] += 1
    return [{"level": level, "photos": len(files), "with bars": n} for level, n in counts.items()]


def search_cost(frames: dict[str, list[np.ndarray]], repeats: int = 5) -> list[dict]:
    """The milliseconds ``bar_box`` takes per frame, as an array and as a PIL image: for each
    kind of frame the median over its frames of each frame's best of ``repeats`` runs."""
    import time

    from PIL import Image

    from edgecap.preprocess import bar_box

    def best(frame) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            bar_box(frame)
            runs.append(time.perf_counter() - t0)
        return min(runs) * 1e3

    out = []
    for name, group in frames.items():
        images = [Image.fromarray(f) for f in group]
        out.append(
            {
                "frames": name,
                "array ms": float(np.median([best(f) for f in group])),
                "PIL ms": float(np.median([best(im) for im in images])),
                "median size": [
                    int(np.median([f.shape[1] for f in group])),
                    int(np.median([f.shape[0] for f in group])),
                ],
            }
        )
    return out


def main(argv=None) -> int:
    from edgecap import Captioner
    from edgecap.evaluation.metrics import per_image_cider

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    photos, references = photos_and_references(args.data)
    captioners = {"cropped": Captioner(model), "as framed": Captioner(model, crop_bars=False)}

    def scores(captions) -> list[float]:
        per_photo = per_image_cider(references, {i: c.text for i, c in enumerate(captions)})
        return [per_photo[i] for i in range(len(captions))]

    rows, results = [], []
    framed = variants(photos)
    for name, (frames, pictures) in framed.items():
        captions = {label: c.caption_batch(frames) for label, c in captioners.items()}
        cider = {label: scores(caps) for label, caps in captions.items()}
        alone = scores(captioners["as framed"].caption_batch(pictures))
        diff = paired_bootstrap(cider["as framed"], cider["cropped"])
        ceiling = paired_bootstrap(alone, cider["cropped"])
        cropped = sum(c.crop is not None for c in captions["cropped"])
        same = sum(a.text == b.text for a, b in zip(captions["cropped"], captions["as framed"]))
        results.append(
            {
                "frames": name,
                "cider": {k: float(np.mean(v)) for k, v in cider.items()},
                "picture alone": float(np.mean(alone)),
                "difference": diff,
                "cropped - picture alone": ceiling,
                "cropped": cropped,
                "same captions": same,
            }
        )
        rows.append(
            [
                name,
                f"{np.mean(cider['cropped']):.3f}",
                f"{np.mean(cider['as framed']):.3f}",
                f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]",
                f"{np.mean(alone):.3f}",
                f"{ceiling['difference']:+.3f} [{ceiling['low']:+.3f}, {ceiling['high']:+.3f}]",
                str(cropped),
                str(same),
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = C.markdown_table(
        [
            "frames",
            "CIDEr",
            "crop_bars=False",
            "difference [95%]",
            "the picture alone",
            "CIDEr - the picture alone's [95%]",
            f"cropped (of {len(photos)})",
            "same caption",
        ],
        rows,
    )

    blanks = blank_frames()
    blank_rows, blank_results = [], []
    for name, frame in blanks.items():
        seen = {label: c.caption(frame) for label, c in captioners.items()}
        blank_results.append({"frame": name, **{label: c.text for label, c in seen.items()}})
        blank_rows.append([name, seen["cropped"].text, seen["as framed"].text])
    blank_table = C.markdown_table(["blank frame", "caption", "crop_bars=False"], blank_rows)

    cost = search_cost(
        {
            name: framed[name][0]
            for name in ("as taken", "letterboxed (16:9 in 4:3)", "pillarboxed (4:3 in 16:9)")
        }
    )
    cost_table = C.markdown_table(
        ["frames", "median size", "ms per frame, array", "PIL image"],
        [
            [c["frames"], "x".join(map(str, c["median size"])), f"{c['array ms']:.3f}", f"{c['PIL ms']:.3f}"]
            for c in cost
        ],
    )
    alarms = false_alarms(args.data)
    alarm_table = C.markdown_table(
        ["Flickr8k photos", "found to have bars"],
        [
            [
                "as taken" if a["level"] == 1 else f"levels x {a['level']:g}",
                f"{a['with bars']} of {a['photos']}",
            ]
            for a in alarms
        ],
    )
    markdown = (
        f"Model: {model.name}; the {len(photos)} photos of {', '.join(SETS)} and {FULLRES}, "
        f"framed with black bars; default options (beam 3, blank check on, dark frames brightened). "
        f"CIDEr-D of each frame's caption against its photo's references; difference: cropped minus "
        f"crop_bars=False, paired bootstrap over the photos.\n\n{table}\n\n"
        f"Blank frames (640x360 or 480x360 of one colour) with bars:\n\n{blank_table}\n\n"
        f"False alarms:\n\n{alarm_table}\n\n"
        f"The search for bars (``edgecap.preprocess.bar_box``), each frame's best of 5 runs, the "
        f"median over the frames:\n\n{cost_table}\n"
    )
    C.write_results(
        "bars",
        {
            "model": str(model),
            "frames": results,
            "blank frames": blank_results,
            "false alarms": alarms,
            "search cost": cost,
        },
        markdown,
        argv,
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
