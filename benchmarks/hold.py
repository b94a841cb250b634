"""Holding a caption: a camera's previous caption kept for a new frame that it still fits.

    python benchmarks/hold.py --data ../shared/data [--limit N] [--out DIR] [--timing N]

``benchmarks/flicker.py`` found that two frames of a still scene (other sensor noise) get
different captions for 38% of the dev photos: the caption model's near ties. With
``Captioner.caption(frame, previous=caption)`` (``caption_stream(..., hold=True)``) the
previous caption is kept when its ranking score per word on the new frame is within
``CaptionOptions.hold_margin`` of the caption the search chooses (both scored alike:
``edgecap.decoding.hold``).

Frames: the 273 dev photos (coco-ood-dev, coco-ood-dev-b, flickr8k-fullres-dev; research data,
read from ``--data``: never a fixture or a shipped file), each with sensor noise (s.d. 2) as
the frame captioned first; then a second frame of the same scene (other noise; the exposure at
0.7; the view moved by 3 px), a changed scene (a patch of the next photo over 10%, 20% or 40% of
the frame) and another scene (the next photo). For each second frame and each margin: how many
second captions differ from the first (what a still camera flickers), how many are held, and
the mean CIDEr-D of the caption said for the second frame against its photo's references (the
next photo's for "another photo"; a held caption that no longer fits costs here), with a paired
bootstrap of held against not held on the 160 everyday photos and on the 113 Flickr8k ones.

The margins are compared from one pass: both captions' ranking scores on the second frame
(``edgecap.decoding.given_captions``), a caption held where the difference is within the
margin. The shipped margin is then checked through the API itself (``caption_batch(frames,
previous=...)``: the same captions, the same held flags). Then a slow pan: each photo as six
frames, each 80% of its width and 3% of it further right than the one before, then the next
photo's first frame (a cut), captioned in order by ``caption_stream`` without and with
``hold``: how often the words change within a pan, the CIDEr-D of the pans' captions (paired
bootstrap), and how many cuts get the caption they get without the hold. Last, what holding costs: a frame's
caption with and without ``previous`` at batch 1, taking turns (``--timing`` frames where the
two captions differ, so that the previous one is scored; median ms, one process).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402
from bars import add_photos_arguments, resized  # noqa: E402
from changes_only import exposed, moved, noisy, patched  # noqa: E402

MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
PAN_FRAMES = 6  # frames of a slow pan across each photo
PAN_STEP = 0.03  # of the photo's width, from one frame of the pan to the next
PAN_WIDTH = 0.8  # each frame's share of the photo's width
EVERYDAY = 160  # the first 160 photos: coco-ood-dev and coco-ood-dev-b; the rest Flickr8k's


def second_frames(photo: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The frame captioned first and, by name, the second frames (whether it is the same photo)."""
    frame = noisy(photo, rng)
    out = {
        "noise": noisy(photo, rng),
        "exposure x 0.7": noisy(exposed(photo, 0.7), rng),
        "moved 3 px": noisy(moved(photo, 3), rng),
    }
    for share in (0.1, 0.2, 0.4):
        out[f"patch {share:.0%}"] = noisy(patched(photo, other, share, rng), rng)
    out["another photo"] = noisy(resized(other, photo.shape[1], photo.shape[0]), rng)
    return frame, out


def panned(photo: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """A slow pan across ``photo``: ``PAN_FRAMES`` crops of ``PAN_WIDTH`` of its width (its full
    height), each ``PAN_STEP`` of the width further right than the one before, resized back to
    the photo's size, each with its own sensor noise."""
    h, w = photo.shape[:2]
    width = int(w * PAN_WIDTH)
    out = []
    for k in range(PAN_FRAMES):
        left = int(round(k * PAN_STEP * w))
        out.append(noisy(resized(photo[:, left : left + width], w, h), rng))
    return out


def pan_figures(captioner, photos, references, sets, rng) -> tuple[dict, str]:
    """Each photo's slow pan, then the next photo's first frame (a cut), captioned in order
    by ``caption_stream`` without and with ``hold``: how often the words change within a pan,
    how many cuts get their own caption, and the mean CIDEr-D of a pan's captions."""
    from edgecap.stream import caption_stream

    n = len(photos)
    pans = [panned(photo, rng) for photo in photos]
    said = {}
    for hold in (False, True):
        said[hold] = [
            [
                e.caption.text
                for e in caption_stream(captioner, [*pans[i], pans[(i + 1) % n][0]], live=False, hold=hold)
            ]
            for i in range(n)
        ]
    out: dict = {}
    cider = {}
    for hold, texts in said.items():
        changes = [sum(a != b for a, b in zip(t[:PAN_FRAMES], t[1:PAN_FRAMES])) for t in texts]
        per_frame = [cider_array(references, [texts[i][k] for i in range(n)]) for k in range(PAN_FRAMES)]
        cider[hold] = np.mean(per_frame, axis=0)
        out["hold" if hold else "no hold"] = {
            "word changes within the pans": int(sum(changes)),
            "pans whose words change": int(sum(c > 0 for c in changes)),
            "cider": float(cider[hold].mean()),
        }
    cuts = sum(said[True][i][PAN_FRAMES] == said[False][i][PAN_FRAMES] for i in range(n))
    out["hold"]["cuts captioned as without hold"] = int(cuts)
    intervals = {
        label: paired_bootstrap(cider[False][part], cider[True][part])
        for label, part in sets.items()
        if part.stop > part.start
    }
    out["hold"]["cider against no hold"] = intervals
    rows = [
        [
            name,
            f"{entry['word changes within the pans']} / {n * (PAN_FRAMES - 1)}",
            f"{entry['pans whose words change']} / {n}",
            f"{entry['cider']:.3f}",
        ]
        for name, entry in out.items()
    ]
    table = C.markdown_table(
        [
            "",
            "words changed between frames of a pan",
            "pans whose words change",
            "CIDEr-D of a pan's captions",
        ],
        rows,
    )
    interval_text = "; ".join(
        f"{label}: {iv['difference']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"
        for label, iv in intervals.items()
    )
    markdown = (
        f"\nA slow pan: each photo as {PAN_FRAMES} frames, each {PAN_WIDTH:.0%} of its width and "
        f"{PAN_STEP:.0%} of it further right than the one before (with sensor noise), then the next "
        "photo's first frame (a cut), captioned in order by caption_stream without and with hold:\n\n"
        f"{table}\n\nCIDEr-D, held - not held [95%]: {interval_text}. The cut to the next photo "
        f"captioned as without hold: {cuts} of {n}.\n"
    )
    return out, markdown


def ranking_gaps(captioner, frames, first_ids, second_ids) -> np.ndarray:
    """Per frame, the ranking score of its own caption less the first caption's, both given on
    that frame (inf where the first could not have ended there, NaN where the two are the same)."""
    from edgecap.decoding import given_captions

    options = captioner.options
    gaps = np.full(len(frames), np.nan)
    batch = options.batch_size
    for start in range(0, len(frames), batch):
        part = list(range(start, min(start + batch, len(frames))))
        inputs = [captioner._prepare(frames[i], "rgb", options).x for i in part]
        encoded = captioner.backend.encode(captioner.backend.batch_input(inputs))
        differ = [n for n, i in enumerate(part) if first_ids[i] != second_ids[i]]
        if not differ:
            continue
        given = given_captions(
            captioner.backend,
            encoded,
            options,
            captioner.vocab.start,
            captioner.vocab.end,
            len(captioner.vocab),
            [n for n in differ for _ in range(2)],
            [ids for n in differ for ids in (first_ids[part[n]], second_ids[part[n]])],
            captioner.classes,
            captioner.fusion,
        )
        for k, n in enumerate(differ):
            first, second = given[2 * k], given[2 * k + 1]
            gaps[part[n]] = np.inf if first is None else second.rank_score - first.rank_score
    return gaps


def cider_array(references: dict, texts: list[str]) -> np.ndarray:
    """Each photo's CIDEr-D (``references`` keyed 0..N-1, as ``texts``)."""
    from edgecap.evaluation.metrics import per_image_cider

    scores = per_image_cider(references, dict(enumerate(texts)))
    return np.array([scores[i] for i in range(len(texts))])


def ids_of(captioner, caption) -> list[int]:
    return [captioner.vocab.index[w] for w in caption.tokens]


def timing(captioner, frames, previous, repeats: int) -> dict[str, float]:
    """Median ms of ``caption(frame)`` and ``caption(frame, previous=...)``, taking turns."""
    plain, holding = [], []
    for _ in range(repeats):
        for frame, before in zip(frames, previous):
            t0 = time.perf_counter()
            captioner.caption(frame)
            t1 = time.perf_counter()
            captioner.caption(frame, previous=before)
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            holding.append(t2 - t1)
    return {
        "plain ms": float(np.median(plain) * 1e3),
        "with previous ms": float(np.median(holding) * 1e3),
        "calls": len(plain),
    }


def build_parser():
    p = C.argument_parser(__doc__)
    add_photos_arguments(p)
    p.add_argument(
        "--timing",
        type=C.non_negative_int,
        default=40,
        metavar="N",
        help="frames timed with and without previous (default: 40; 0: none)",
    )
    C.add_out_argument(p)
    return p


def main(argv=None) -> int:
    from bars import photos_and_references

    from edgecap import Captioner

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    photos, references = photos_and_references(args.data, args.limit)
    n = len(photos)
    rng = np.random.default_rng(0)
    firsts, seconds = [], []
    for i, photo in enumerate(photos):
        frame, others = second_frames(photo, photos[(i + 1) % n], rng)
        firsts.append(frame)
        seconds.append(others)
    captioner = Captioner(model)
    margin = captioner.options.hold_margin
    first = captioner.caption_batch(firsts)
    first_ids = [ids_of(captioner, c) for c in first]
    everyday = min(EVERYDAY, n)  # the sets' photos (fewer with --limit)
    sets = {f"everyday ({everyday})": slice(0, everyday), f"Flickr8k ({n - everyday})": slice(everyday, n)}
    rows, data, api_rows = [], {}, []
    next_refs = {i: references[(i + 1) % n] for i in range(n)}
    # the first captions said again: scored once against each photo's references and the next's
    first_texts = [c.text for c in first]
    first_cider = {False: cider_array(references, first_texts), True: cider_array(next_refs, first_texts)}
    for name in seconds[0]:
        frames = [s[name] for s in seconds]
        own = [c for c in captioner.caption_batch(frames)]
        own_ids = [ids_of(captioner, c) for c in own]
        gaps = ranking_gaps(captioner, frames, first_ids, own_ids)
        other = name == "another photo"
        plain_scores = cider_array(next_refs if other else references, [c.text for c in own])
        first_scores = first_cider[other]
        differ = np.array([a.text != b.text for a, b in zip(first, own)])
        entry = {
            "differ": int(differ.sum()),
            "gaps": [None if np.isnan(g) else round(float(g), 4) for g in gaps],
        }
        for m in (None, *MARGINS):
            held = np.zeros(n, bool) if m is None else (gaps <= m)  # NaN (the same) and inf: not held
            said = np.where(held, first_scores, plain_scores)
            changed = differ & ~held
            intervals = {}
            for label, part in sets.items():
                if part.stop > part.start and m is not None:
                    intervals[label] = paired_bootstrap(plain_scores[part], said[part])
            entry["no hold" if m is None else f"margin {m:g}"] = {
                "captioned differently": int(changed.sum()),
                "held": int(held.sum()),
                "cider": float(said.mean()),
                "cider against no hold": intervals,
            }
            if m is None or m in (0.05, 0.1, 0.2):
                cells = [
                    name,
                    "none" if m is None else f"{m:g}",
                    f"{int(changed.sum())} / {n}",
                    str(int(held.sum())),
                    f"{said.mean():.3f}",
                ]
                for label in sets:
                    iv = intervals.get(label)
                    cells.append(
                        "-"
                        if iv is None
                        else f"{iv['difference']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"
                    )
                rows.append(cells)
                print(" | ".join(cells), file=sys.stderr, flush=True)
        # the shipped margin through the API: the same captions and held flags
        api = captioner.caption_batch(frames, previous=first)
        expected = [f.text if h else o.text for f, o, h in zip(first, own, gaps <= margin)]
        agrees = [c.text for c in api] == expected and [c.held for c in api] == list(gaps <= margin)
        entry["api agrees"] = agrees
        api_rows.append([name, "yes" if agrees else "**no**"])
        data[name] = entry
    table = C.markdown_table(
        [
            "second frame",
            "margin",
            "captioned differently from the first",
            "held",
            "CIDEr-D of the caption said",
            *(f"{label}: held - not held [95%]" for label in sets),
        ],
        rows,
    )
    api_table = C.markdown_table(
        ["second frame", f"caption_batch(previous=...) at {margin:g}: the same"], api_rows
    )
    markdown = (
        f"Model: {model.name}; default options (hold_margin {margin:g}). Each photo with sensor noise "
        "(s.d. 2) is captioned first; each row's second frame is captioned with the first caption "
        "held where its ranking score per word on the second frame is within the margin of the "
        "second frame's own caption's. CIDEr-D: of the caption said for the second frame, against "
        "its photo's references (the next photo's for 'another photo'); the intervals: paired "
        "bootstrap, 10,000 resamples.\n\n"
        f"{table}\n\n{api_table}\n"
    )
    data["pan"], pan_markdown = pan_figures(captioner, photos, references, sets, np.random.default_rng(1))
    markdown += pan_markdown
    print(pan_markdown, file=sys.stderr, flush=True)
    if args.timing:
        same = data["noise"]
        pick = [i for i in range(n) if same["gaps"][i] is not None][: args.timing]
        frames = [seconds[i]["noise"] for i in pick]
        cost = timing(captioner, frames, [first[i] for i in pick], repeats=3)
        data["timing"] = cost
        markdown += (
            f"\nCost at batch 1 ({len(pick)} 'noise' frames whose two captions differ, 3 rounds, "
            f"taking turns, one process): caption(frame) {cost['plain ms']:.1f} ms, "
            f"caption(frame, previous=...) {cost['with previous ms']:.1f} ms (medians).\n"
        )
    C.write_results(
        "hold", {"model": str(model), "margin": margin, "frames": data}, markdown, argv, out=args.out
    )
    return 0


if __name__ == "__main__":
    C.run_main(main)
