"""How far to trust ``Caption.confidence`` on degraded frames: night, blur, a thumbnail, JPEG.

    python benchmarks/confidence_degraded.py --data ../shared/data [--flickr8k-limit N] [--out DIR]
        [--write-blur-penalty]

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

The third: the blur penalty (``ConfidenceModel.blur``): the shipped signals fitted on the photos
as taken, and a frame whose ``edgecap.preprocess.blurriness`` is under the 5th percentile of the
photos' as taken (``below``) has ``weight`` times the shortfall taken off its logit, ``weight``
fitted (the logits held) on the photos as taken and their 25 px horizontal motion blur alone, so
that the other blurs (25 px down the columns, 25 px along the diagonal, 10 px; "not fitted") and
the other degradations test it. Five folds over the photos as above, each fold's signals model,
``below`` and ``weight`` fitted on the other folds (and the other set): per version, the mean
confidence, the share right, the AUROC and what ``--min-confidence 0.3`` keeps, without and with
the penalty. Last, ``below`` and ``weight`` fitted on every photo against the model's own
signals model, which ``--write-blur-penalty`` writes into the model's confidence.json.
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


def blur_down(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vertical motion blur, 25 px (``blur`` along the columns)."""
    return np.ascontiguousarray(blur(photo.transpose(1, 0, 2), rng).transpose(1, 0, 2))


def blur_10(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal motion blur, 10 px."""
    return blur(photo, rng, length=10)


def blur_diagonal(photo: np.ndarray, rng: np.random.Generator, length: int = 25) -> np.ndarray:
    """Diagonal motion blur (down and right): the mean of ``length`` pixels along each diagonal
    (edges repeated)."""
    h, w = photo.shape[:2]
    half = length // 2
    padded = np.pad(photo.astype(np.float32), ((half, half), (half, half), (0, 0)), mode="edge")
    total = np.zeros(photo.shape, np.float32)
    for k in range(length):
        total += padded[k : k + h, k : k + w]
    return np.round(total / length).astype(np.uint8)


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
    "motion blur, 25 px down (not fitted)": blur_down,
    "motion blur, 25 px diagonal (not fitted)": blur_diagonal,
    "motion blur, 10 px (not fitted)": blur_10,
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
    p.add_argument(
        "--write-blur-penalty",
        action="store_true",
        help="write the blur penalty fitted on every photo into the model's confidence.json",
    )
    C.add_out_argument(p)
    return p


FITTED_BLUR = "motion blur, 25 px"  # the one blur the penalty's weight is fitted on
BLUR_PERCENTILE = 5  # the penalty's ``below``: this percentile of the photos' as taken


def frame_measures(frame: np.ndarray, pre) -> tuple[float, float, float]:
    """(log sharpness: the blank check's detail over its spread, log of the brightening gain,
    ``blurriness``) of a frame as the model sees it."""
    from PIL import Image

    from edgecap.preprocess import frame_blurriness, frame_statistics, model_input

    x, gain = model_input(Image.fromarray(frame), pre, brighten=True)
    spread, detail = frame_statistics(x, pre)
    sharp = float(np.log(max(detail, 1e-3) / max(spread, 1e-3)))
    return sharp, float(np.log(gain)), frame_blurriness(x, pre)


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
        }
        measures = np.array([frame_measures(f, captioner.manifest.preprocessing) for f in frames])
        out[name]["measures"], out[name]["blurriness"] = measures[:, :2], measures[:, 2]
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


def stacked(versions: dict, measures: bool, *keys: str):
    """-> (x, right, photo index, version name, then each of ``keys``' per-frame values) over
    every version, rows with signals only."""
    xs, ys, photos, names = [], [], [], []
    for name, v in versions.items():
        x = np.hstack([v["signals"], v["measures"]]) if measures else v["signals"]
        xs.append(x)
        ys.append(v["right"])
        photos.append(np.arange(len(x)))
        names += [name] * len(x)
    x, y, photo, name = np.vstack(xs), np.concatenate(ys), np.concatenate(photos), np.array(names)
    keep = np.isfinite(x).all(1)
    extra = [np.concatenate([v[key] for v in versions.values()])[keep] for key in keys]
    return (x[keep], y[keep], photo[keep], name[keep], *extra)


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


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -50, 50)))


def offset_weight(z: np.ndarray, shortfall: np.ndarray, y: np.ndarray, steps: int = 50) -> float:
    """The weight w >= 0 for which logits ``z`` plus ``w * shortfall`` (each <= 0) best fit
    ``y`` (the log-likelihood, by Newton's method; the logits held)."""
    w = 0.0
    for _ in range(steps):
        p = sigmoid(z + w * shortfall)
        curvature = float(np.sum(p * (1 - p) * shortfall**2))
        if curvature <= 0:
            break
        w = max(w - float(np.sum((p - y) * shortfall)) / curvature, 0.0)
    return w


def penalty_fit(
    z: np.ndarray, blurriness: np.ndarray, y: np.ndarray, name: np.ndarray
) -> tuple[float, float]:
    """The blur penalty (below, weight) from frames' logits, blurriness, rightness and versions:
    ``below`` the ``BLUR_PERCENTILE``th percentile of the photos' as taken, ``weight`` fitted on
    those and their ``FITTED_BLUR`` frames alone."""
    taken = name == AS_TAKEN
    below = float(np.percentile(blurriness[taken], BLUR_PERCENTILE))
    used = taken | (name == FITTED_BLUR)
    return below, offset_weight(z[used], np.minimum(blurriness[used] - below, 0.0), y[used].astype(float))


def penalty_cross_validated(target: dict, other: dict, seed: int = 0):
    """Five folds over ``target``'s photos (as ``cross_validated``): each predicted by the shipped
    signals fitted on its other folds' and ``other``'s photos as taken, without and with a blur
    penalty fitted on the same frames -> (confidence without, with, right, version names)."""
    from edgecap.confidence import fit

    x, y, photo, name, b = stacked(target, False, "blurriness")
    ox, oy, _, oname, ob = stacked(other, False, "blurriness")
    folds = np.random.default_rng(seed).permutation(photo.max() + 1) % FOLDS
    plain, penalised = np.zeros(len(x)), np.zeros(len(x))
    for k in range(FOLDS):
        train, test = folds[photo] != k, folds[photo] == k
        taken, otaken = train & (name == AS_TAKEN), oname == AS_TAKEN
        mean, std, w, bias = fit(np.vstack([x[taken], ox[otaken]]), np.concatenate([y[taken], oy[otaken]]))

        def logit(rows):
            return ((rows - mean) / std) @ w + bias  # noqa: B023 (called within this fold)

        below, weight = penalty_fit(
            np.concatenate([logit(x[train]), logit(ox)]),
            np.concatenate([b[train], ob]),
            np.concatenate([y[train], oy]),
            np.concatenate([name[train], oname]),
        )
        plain[test] = logit(x[test])
        penalised[test] = plain[test] + weight * np.minimum(b[test] - below, 0.0)
    return sigmoid(plain), sigmoid(penalised), y, name


def penalty_rows(label: str, target: dict, other: dict) -> tuple[list[list], list[dict]]:
    from edgecap.confidence import auroc

    plain, penalised, y, name = penalty_cross_validated(target, other)
    rows, data = [], []
    for version in target:
        here = name == version
        right = y[here]
        entry: dict = {"set": label, "frames": version, "right": float(right.mean())}
        cells = []
        for model, p in (("without", plain[here]), ("with", penalised[here])):
            kept = p >= KEEP_FROM
            entry[model] = {
                "mean_confidence": float(p.mean()),
                "auroc": auroc(p, right),
                "kept": int(kept.sum()),
                "kept_right": float(right[kept].mean()) if kept.any() else None,
            }
            cells.append(entry[model])
        data.append(entry)
        rows.append(
            [
                label,
                version,
                f"{entry['right']:.2f}",
                " / ".join(f"{c['mean_confidence']:.2f}" for c in cells),
                " / ".join(f"{c['auroc']:.3f}" for c in cells),
                " / ".join(f"{c['kept']}, {c['kept_right']:.2f}" if c["kept"] else "0" for c in cells),
            ]
        )
    return rows, data


def fitted_penalty(model_dir: Path, results: dict) -> tuple[float, float]:
    """The blur penalty fitted on every photo of every set, against the logits of the model's own
    signals model (its confidence.json, without a penalty)."""
    from edgecap.confidence import ConfidenceModel

    model = ConfidenceModel.load(model_dir)
    if model is None:
        raise SystemExit(f"confidence_degraded: {model_dir} has no confidence.json")
    zs, bs, ys, names = [], [], [], []
    for versions in results.values():
        x, y, _, name, b = stacked(versions, False, "blurriness")
        zs.append(((model.select(x) - model.mean) / model.std) @ model.weights + model.bias)
        bs.append(b)
        ys.append(y)
        names.append(name)
    return penalty_fit(np.concatenate(zs), np.concatenate(bs), np.concatenate(ys), np.concatenate(names))


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
    penalty, penalty_data = [], []
    for label, other in (("everyday", "Flickr8k dev"), ("Flickr8k dev", "everyday")):
        rows, data = penalty_rows(label, results[label], results[other])
        penalty += rows
        penalty_data += data
    below, weight = fitted_penalty(model, results)
    if args.write_blur_penalty:
        from dataclasses import replace

        from edgecap.confidence import ConfidenceModel, write

        shipped_model = ConfidenceModel.load(model)
        assert shipped_model is not None  # fitted_penalty has loaded it
        print(
            f"wrote {write(model, replace(shipped_model, blur=(round(below, 4), round(weight, 4))))}",
            file=sys.stderr,
        )
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
            f"The blur penalty, cross-validated ({FOLDS} folds over the photos; each cell without / with "
            f"it; the shipped signals fitted on the photos as taken; its weight fitted on those and "
            f"'{FITTED_BLUR}' alone):",
            C.markdown_table(
                [
                    "photos",
                    "frames",
                    "right",
                    "mean confidence",
                    "AUROC",
                    f"kept at --min-confidence {KEEP_FROM}, right",
                ],
                penalty,
            ),
            f"Fitted on every photo against the model's own signals model: below {below:.4f}, weight "
            f"{weight:.4f}" + (" (written into its confidence.json)." if args.write_blur_penalty else "."),
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
        "blur penalty": {"cross-validated": penalty_data, "below": below, "weight": weight},
    }
    C.write_results("confidence_degraded", data, markdown + "\n", argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
