"""Captioning a scene again only when its view changed (``caption_stream(min_change=...)``).

    python benchmarks/changes_only.py --data ../shared/data [--limit N] [--out DIR]

A robot standing still films one scene: without ``min_change`` each frame is captioned, which
costs a caption's compute for nothing and, where the captions of two frames of one scene
differ, says a different thing about the same scene. With ``min_change=MIN_CHANGE`` a frame is
captioned when ``edgecap.stream.view_change`` says that much of its view changed since the
frame captioned last.

Frames: the 273 dev photos (coco-ood-dev, coco-ood-dev-b, flickr8k-fullres-dev; research data,
read from ``--data``: never a fixture or a shipped file), each with sensor noise (s.d. 2 levels)
as the frame captioned, against another frame of the same scene (other noise; more noise; the
exposure at 0.7 or 1.3, bright parts clipped; the view moved by 1 or 3 px; JPEG at quality 30)
and against a changed one (a patch of the next photo over 2-40% of the frame, at a random
place; the next photo itself). For each: ``view_change``'s median and largest, and how many
frames reach ``MIN_CHANGE`` (would be captioned). Then the captions (the shipped model, default
options): how many of the frames of the same scene (other noise, exposure 0.7, moved 1 px) are
captioned differently from the frame captioned (what a still camera says without
``min_change``), and of the patched frames, how many are captioned differently and how many of
those ``min_change`` would pass over. Last, what it costs: the cells of one frame (what the
stream computes for each frame it would caption), median of 200 calls on one core.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from bars import add_photos_arguments, jpeg, resized  # noqa: E402
from sharpest import median_ms  # noqa: E402

NOISE_SD = 2.0
PATCHES = (0.02, 0.05, 0.1, 0.2, 0.4)  # shares of the frame
CAPTIONED_SAME = ("noise", "exposure x 0.7", "moved 1 px")  # of the same scene, captioned
CAPTIONED_PATCHES = (0.05, 0.1, 0.2)


def noisy(frame: np.ndarray, rng: np.random.Generator, sd: float = NOISE_SD) -> np.ndarray:
    return np.clip(np.round(frame + rng.normal(0.0, sd, frame.shape)), 0, 255).astype(np.uint8)


def exposed(frame: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.round(frame.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def moved(frame: np.ndarray, px: int) -> np.ndarray:
    """``frame``'s view moved by ``px`` pixels down and right (its first rows and columns
    repeated at the edge)."""
    return np.pad(frame, ((px, 0), (px, 0), (0, 0)), mode="edge")[:-px, :-px]


def patched(frame: np.ndarray, other: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``frame`` with ``other``'s pixels over a rectangle of ``share`` of it (the frame's aspect),
    at a random place."""
    h, w = frame.shape[:2]
    ph, pw = int(h * np.sqrt(share)), int(w * np.sqrt(share))
    top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = frame.copy()
    out[top : top + ph, left : left + pw] = resized(other, w, h)[top : top + ph, left : left + pw]
    return out


def pairs(photo: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The frame captioned (``photo`` with noise) and, by name, the frames compared with it."""
    frame = noisy(photo, rng)
    out = {
        "noise": noisy(photo, rng),
        "noise s.d. 8": noisy(photo, rng, 8.0),
        "exposure x 0.7": noisy(exposed(photo, 0.7), rng),
        "exposure x 1.3": noisy(exposed(photo, 1.3), rng),
        "moved 1 px": noisy(moved(photo, 1), rng),
        "moved 3 px": noisy(moved(photo, 3), rng),
        "JPEG quality 30": jpeg(noisy(photo, rng), 30),
    }
    for share in PATCHES:
        out[f"patch {share:.0%}"] = noisy(patched(photo, other, share, rng), rng)
    out["another photo"] = noisy(resized(other, photo.shape[1], photo.shape[0]), rng)
    return frame, out


def per_frame_ms(repeats: int = 200) -> dict[str, float]:
    """Median milliseconds of one frame's cells (``edgecap.stream._layout``, what the stream
    computes for each frame it would caption) at three sizes, random pixels."""
    from edgecap.stream import _layout

    rng = np.random.default_rng(0)
    out = {}
    for name, (h, w) in (
        ("640 x 480", (480, 640)),
        ("1280 x 720", (720, 1280)),
        ("1920 x 1080", (1080, 1920)),
    ):
        out[name] = median_ms(repeats, _layout, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


def build_parser():
    p = C.argument_parser(__doc__)
    add_photos_arguments(p)
    C.add_out_argument(p)
    return p


def main(argv=None) -> int:
    from bars import photos_and_references

    from edgecap import Captioner
    from edgecap.stream import MIN_CHANGE, view_change

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    cost = per_frame_ms()  # before any runtime's threads exist (one left spinning would steal time)
    photos, _ = photos_and_references(args.data, args.limit)
    rng = np.random.default_rng(0)
    frames, compared = [], []
    for i, photo in enumerate(photos):
        frame, others = pairs(photo, photos[(i + 1) % len(photos)], rng)
        frames.append(frame)
        compared.append(others)
    names = list(compared[0])
    change = {name: np.array([view_change(f, o[name]) for f, o in zip(frames, compared)]) for name in names}
    rows = [
        [
            name,
            f"{np.median(v):.3f}",
            f"{v.max():.3f}",
            f"{int(np.sum(v >= MIN_CHANGE))} / {len(v)}",
        ]
        for name, v in change.items()
    ]
    table = C.markdown_table(
        ["frame against the one captioned", "view_change: median", "largest", f"captioned (>= {MIN_CHANGE})"],
        rows,
    )
    print(table, file=sys.stderr, flush=True)

    captioner = Captioner(model)
    texts = [c.text for c in captioner.caption_batch(frames)]
    caption_rows, captions = [], {}
    for name in CAPTIONED_SAME + tuple(f"patch {s:.0%}" for s in CAPTIONED_PATCHES):
        other = [c.text for c in captioner.caption_batch([o[name] for o in compared])]
        differ = np.array([a != b for a, b in zip(texts, other)])
        caught = change[name] >= MIN_CHANGE
        captions[name] = {
            "captioned differently": int(differ.sum()),
            "captioned differently, passed over": int(np.sum(differ & ~caught)),
            "captioned": int(caught.sum()),
        }
        caption_rows.append(
            [
                name,
                str(len(texts)),
                str(int(differ.sum())),
                str(int(caught.sum())),
                str(int(np.sum(differ & ~caught))),
            ]
        )
        print(" | ".join(caption_rows[-1]), file=sys.stderr, flush=True)
    caption_table = C.markdown_table(
        [
            "frame against the one captioned",
            "photos",
            "captioned differently",
            f"captioned with min_change={MIN_CHANGE}",
            "captioned differently but passed over",
        ],
        caption_rows,
    )
    cost_table = C.markdown_table(
        ["frame", "ms (median of 200, one core)"], [[k, f"{v:.3f}"] for k, v in cost.items()]
    )
    markdown = (
        f"Model: {model.name}; default options; MIN_CHANGE = {MIN_CHANGE}. Each photo with sensor noise "
        f"(s.d. {NOISE_SD:g}) is the frame captioned; each row's frame is compared with it "
        "(edgecap.stream.view_change; patches and 'another photo' from the next photo).\n\n"
        f"{table}\n\nCaptions of the frame captioned against the row's frame:\n\n{caption_table}\n\n"
        f"One frame's cells (what the stream computes for each frame it would caption):\n\n{cost_table}\n"
    )
    data = {
        "model": str(model),
        "min_change": MIN_CHANGE,
        "view_change": {
            name: {
                "median": float(np.median(v)),
                "largest": float(v.max()),
                "captioned": int(np.sum(v >= MIN_CHANGE)),
            }
            for name, v in change.items()
        },
        "captions": captions,
        "ms per frame": cost,
    }
    C.write_results("changes_only", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
