"""How far to trust ``Caption.confidence`` on degraded frames: night, blur, a thumbnail, JPEG.

    python benchmarks/confidence_degraded.py --data ../shared/data [--flickr8k-limit N] [--out DIR]

The confidence model (``confidence.json``) was fitted on dev photos as taken. A robot's camera
gives it frames darker, blurrier, noisier and more compressed than those. Each of the everyday
dev photos (coco-ood-dev + coco-ood-dev-b, 160) and the Flickr8k dev photos (research data, read
from ``--data``: never a fixture or a shipped file) is captioned as taken and as each of
``DEGRADATIONS`` makes it (the shipped model, default options: dark frames brightened, bars
cropped, the blank check on). A caption is right when its per-photo CIDEr-D (coco-caption,
against that photo's references, within its set) is at least ``--threshold``.

The first table: per set and degradation, the share of right captions, the mean confidence
(calibrated: the two agree), its AUROC within the frames, and what ``--min-confidence 0.3``
keeps (how many, the share right), and the frames' median sharpness (the blank check's detail
over its spread). The shipped model was fitted on the photos as taken, so
their row is in sample.

The second: could a confidence model fitted on degraded frames too do better? Five folds over
the photos (a photo's every version in one fold; each everyday fold's model fitted on the other
everyday folds and all the Flickr8k frames, and the other way round, as ``confidence_fit.py``
does), three models: the shipped signals fitted on the photos as taken (the shipped way), the
same fitted on every frame, and those with two measures of the frame added, fitted on every
frame: its sharpness (the log of the blank check's detail over its spread,
``edgecap.preprocess.frame_statistics``: a blurred or upscaled frame has little detail for its
contrast) and the log of the gain it was brightened by. Their AUROC on the photos as taken and
on every frame, their log-loss, and the gap between mean confidence and the share right on the
degraded frames.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

AS_TAKEN = "as taken"
KEEP_FROM = 0.3  # the --min-confidence whose kept captions the first table counts
FOLDS = 5
EVERYDAY = ("coco-ood-dev", "coco-ood-dev-b")
FLICKR8K = "flickr8k-dev"


def night(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """6% of the light, with three lamps (level 250) over 2% of the frame."""
    out = np.round(photo.astype(np.float32) * 0.06)
    h, w = photo.shape[:2]
    radius = np.sqrt(0.02 * h * w / 3 / np.pi)
    rows, cols = np.mgrid[:h, :w]
    for _ in range(3):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        out[(rows - y) ** 2 + (cols - x) ** 2 <= radius**2] = 250
    return out.astype(np.uint8)


def dim(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """15% of the light, no lamps."""
    return np.round(photo.astype(np.float32) * 0.15).astype(np.uint8)


def thumbnail(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shrunk to 32 px on its longer side and scaled back up (bilinear)."""
    from PIL import Image

    image = Image.fromarray(photo)
    scale = 32 / max(image.size)
    small = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.BILINEAR
    return np.asarray(image.resize(small, resample).resize(image.size, resample))


def blur(photo: np.ndarray, rng: np.random.Generator, length: int = 25) -> np.ndarray:
    """Horizontal motion blur: the mean of ``length`` pixels along each row (edges repeated)."""
    padded = np.pad(photo.astype(np.float32), ((0, 0), (length // 2 + 1, length // 2), (0, 0)), mode="edge")
    sums = np.cumsum(padded, axis=1)
    return np.round((sums[:, length:] - sums[:, :-length]) / length).astype(np.uint8)


def jpeg5(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Through JPEG at quality 5."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=5)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def haze(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blended 80% toward level 200 (fog, a dirty lens)."""
    return np.round(photo.astype(np.float32) * 0.2 + 0.8 * 200).astype(np.uint8)


def noise(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian sensor noise, standard deviation 30 levels."""
    return np.clip(photo + rng.normal(0, 30, photo.shape), 0, 255).astype(np.uint8)


# name -> what is done to a photo (each photo's own random generator, seeded by its index)
DEGRADATIONS = {
    "night, lamps over 2%": night,
    "dim, x0.15": dim,
    "32 px thumbnail, scaled up": thumbnail,
    "motion blur, 25 px": blur,
    "JPEG quality 5": jpeg5,
    "haze, 80%": haze,
    "noise, sd 30": noise,
}


def build_parser():
    from decoding_choice import add_data_argument

    p = C.argument_parser(__doc__)
    add_data_argument(p)
    p.add_argument("--flickr8k-limit", type=C.positive_int, help="only the first N Flickr8k dev photos")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="per-photo CIDEr from which a caption is right (default: %(default)s)",
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    C.add_out_argument(p)
    return p


def frame_measures(frame: np.ndarray, pre) -> tuple[float, float]:
    """(log sharpness: the blank check's detail over its spread, log of the brightening gain) of a
    frame as the model sees it."""
    from PIL import Image

    from edgecap.preprocess import frame_statistics, model_input

    x, gain = model_input(Image.fromarray(frame), pre, brighten=True)
    spread, detail = frame_statistics(x, pre)
    return float(np.log(max(detail, 1e-3) / max(spread, 1e-3))), float(np.log(gain))


def caption_set(captioner, photos, references, threshold: float) -> dict[str, dict[str, np.ndarray]]:
    """Each version of the photos -> its captions' signals, confidences, right or wrong, and
    frame measures (rows in the photos' order)."""
    from edgecap.confidence import SIGNALS
    from edgecap.evaluation.metrics import per_image_cider

    versions = {AS_TAKEN: lambda photo, rng: photo, **DEGRADATIONS}
    out = {}
    for name, change in versions.items():
        frames = [change(p, np.random.default_rng(i)) for i, p in enumerate(photos)]
        captions = captioner.caption_batch(frames)
        cider = per_image_cider(references, {i: c.text for i, c in enumerate(captions)})
        out[name] = {
            # a frame with nothing recognisable has no signals: left out of the fits
            "signals": np.array(
                [np.full(len(SIGNALS), np.nan) if c.signals is None else c.signals for c in captions]
            ),
            "confidence": np.array([np.nan if c.confidence is None else c.confidence for c in captions]),
            "right": np.array([cider[i] >= threshold for i in range(len(frames))]),
            "cider": np.array([cider[i] for i in range(len(frames))]),
            "measures": np.array([frame_measures(f, captioner.manifest.preprocessing) for f in frames]),
        }
        print(
            f"{len(frames)} photos, {name}: right {out[name]['right'].mean():.3f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def shipped_rows(label: str, versions: dict) -> list[list]:
    from edgecap.confidence import auroc

    rows = []
    for name, v in versions.items():
        rated = ~np.isnan(v["confidence"])
        conf, right = v["confidence"][rated], v["right"][rated]
        kept = conf >= KEEP_FROM
        rows.append(
            [
                label,
                name,
                f"{v['cider'].mean():.3f}",
                f"{right.mean():.2f}",
                f"{conf.mean():.2f}",
                f"{auroc(conf, right):.3f}",
                f"{kept.sum()}, {right[kept].mean():.2f}" if kept.any() else "0",
                f"{np.exp(np.median(v['measures'][:, 0])):.2f}",
            ]
        )
    return rows


MODELS = (
    ("the shipped signals, fitted on photos as taken", False, False),
    ("the shipped signals, fitted on every frame", True, False),
    ("+ sharpness and brightening gain, fitted on every frame", True, True),
)


def stacked(versions: dict, measures: bool):
    """-> (x, right, photo index, version name) over every version, rows with signals only."""
    xs, ys, photos, names = [], [], [], []
    for name, v in versions.items():
        x = np.hstack([v["signals"], v["measures"]]) if measures else v["signals"]
        xs.append(x)
        ys.append(v["right"])
        photos.append(np.arange(len(x)))
        names += [name] * len(x)
    x, y, photo, name = np.vstack(xs), np.concatenate(ys), np.concatenate(photos), np.array(names)
    keep = np.isfinite(x).all(1)
    return x[keep], y[keep], photo[keep], name[keep]


def cross_validated(target: dict, other: dict, every_frame: bool, measures: bool, seed: int = 0):
    """Five folds over ``target``'s photos, each predicted by a model fitted on its other folds and
    all of ``other`` (only the photos as taken unless ``every_frame``)."""
    from edgecap.confidence import fit

    x, y, photo, name = stacked(target, measures)
    ox, oy, _, oname = stacked(other, measures)
    fitted = np.ones(len(x), bool) if every_frame else name == AS_TAKEN
    ofitted = np.ones(len(ox), bool) if every_frame else oname == AS_TAKEN
    folds = np.random.default_rng(seed).permutation(photo.max() + 1) % FOLDS
    predicted = np.zeros(len(x))
    for k in range(FOLDS):
        train = (folds[photo] != k) & fitted
        mean, std, w, b = fit(np.vstack([x[train], ox[ofitted]]), np.concatenate([y[train], oy[ofitted]]))
        test = folds[photo] == k
        predicted[test] = 1 / (1 + np.exp(-np.clip(((x[test] - mean) / std) @ w + b, -50, 50)))
    return predicted, y, name


def refit_rows(label: str, target: dict, other: dict) -> tuple[list[list], list[dict]]:
    from edgecap.confidence import auroc

    rows, data = [], []
    for model, every_frame, measures in MODELS:
        p, y, name = cross_validated(target, other, every_frame, measures)
        taken, degraded = name == AS_TAKEN, name != AS_TAKEN
        clipped = np.clip(p, 1e-6, 1 - 1e-6)
        entry = {
            "set": label,
            "model": model,
            "auroc_as_taken": auroc(p[taken], y[taken]),
            "auroc_every_frame": auroc(p, y),
            "log_loss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))),
            "mean_confidence_as_taken": float(p[taken].mean()),
            "right_as_taken": float(y[taken].mean()),
            "mean_confidence_degraded": float(p[degraded].mean()),
            "right_degraded": float(y[degraded].mean()),
        }
        data.append(entry)
        rows.append(
            [
                label,
                model,
                f"{entry['auroc_as_taken']:.3f}",
                f"{entry['auroc_every_frame']:.3f}",
                f"{entry['log_loss']:.4f}",
                f"{entry['mean_confidence_as_taken']:.2f} ({entry['right_as_taken']:.2f})",
                f"{entry['mean_confidence_degraded']:.2f} ({entry['right_degraded']:.2f})",
            ]
        )
    return rows, data


def load_photos(items, root: Path) -> list[np.ndarray]:
    from PIL import Image

    photos = []
    for item in items:
        with Image.open(root / item.file_name) as image:
            photos.append(np.asarray(image.convert("RGB")))
    return photos


def references(items) -> dict[int, list[str]]:
    """The photos' reference captions by their index."""
    return {i: item.captions for i, item in enumerate(items)}


def main(argv=None) -> int:
    from decoding_choice import load_sets

    from edgecap import Captioner

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    captioner = Captioner(model)
    sets = load_sets(args.data, args.flickr8k_limit)
    results = {}
    for label, names in (("everyday", EVERYDAY), ("Flickr8k dev", (FLICKR8K,))):
        # CIDEr-D within each folder, as confidence_fit.py computes it
        parts = [
            caption_set(captioner, load_photos(*sets[n]), references(sets[n][0]), args.threshold)
            for n in names
        ]
        results[label] = {
            v: {k: np.concatenate([p[v][k] for p in parts]) for k in parts[0][v]} for v in parts[0]
        }
    shipped = [row for label, versions in results.items() for row in shipped_rows(label, versions)]
    refit, refit_data = [], []
    for label, other in (("everyday", "Flickr8k dev"), ("Flickr8k dev", "everyday")):
        rows, data = refit_rows(label, results[label], results[other])
        refit += rows
        refit_data += data
    counts = ", ".join(f"{len(v[AS_TAKEN]['right'])} {k}" for k, v in results.items())
    markdown = "\n\n".join(
        [
            f"Model: {model.name}; photos: {counts}; right: per-photo CIDEr-D >= {args.threshold}; "
            "default options (dark frames brightened, the blank check on).",
            "The shipped confidence (fitted on the photos as taken: their rows are in sample):",
            C.markdown_table(
                [
                    "photos",
                    "frames",
                    "CIDEr",
                    "right",
                    "mean confidence",
                    "AUROC",
                    f"kept at --min-confidence {KEEP_FROM}, right",
                    "sharpness (median)",
                ],
                shipped,
            ),
            f"Refitted, cross-validated ({FOLDS} folds over the photos; in brackets, the share right):",
            C.markdown_table(
                [
                    "photos",
                    "model",
                    "AUROC as taken",
                    "AUROC every frame",
                    "log-loss",
                    "mean confidence as taken",
                    "degraded",
                ],
                refit,
            ),
        ]
    )
    data = {
        "model": str(model),
        "threshold": args.threshold,
        "shipped": [
            dict(zip(("photos", "frames", "cider", "right", "confidence", "auroc", "kept", "sharpness"), r))
            for r in shipped
        ],
        "refitted": refit_data,
    }
    C.write_results("confidence_degraded", data, markdown + "\n", argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
