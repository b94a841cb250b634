"""Captioning the sharpest of a burst of frames instead of the newest (``pick="sharpest"``).

    python benchmarks/sharpest.py --data ../shared/data [--bursts 2,4] [--out DIR]

A camera on a moving robot gives some frames blurred by the motion. While one frame is captioned
a camera gives more (a 30 fps camera one more in the 36 ms a 2-core Xeon takes, three in 100 ms
on a slower board), and a live stream (``edgecap.stream.caption_stream``) captions one of those
that arrived: the newest (``pick="newest"``, the default) or the least blurred
(``pick="sharpest"``, by ``edgecap.stream.sharpness``).

Frames: the 273 dev photos (coco-ood-dev, coco-ood-dev-b, flickr8k-fullres-dev; research data,
read from ``--data``: never a fixture or a shipped file), each as a burst of 2 and of 4 frames of
the same scene, each frame blurred with probability p by motion 5-30 px long along its rows or its
columns (a robot turning, a bump), then given sensor noise (s.d. 2 levels), so no two frames are
the same. The pick is made by ``caption_stream`` itself (``live=False``, one ``every`` interval a
burst, the frames' pixels recorded by a stand-in captioner), then the picked frames are captioned
with the default options; a frame picked both ways is captioned once. CIDEr-D against the photo's
references (document frequencies from its set's), the paired difference with a bootstrap
interval over the photos, how many of the picked frames are blurred and how many frames older
than the newest the pick is on average. How far blur of 4, 8, 15 and 25 px moves ``sharpness``
(each photo blurred, against itself sharp) and how far sensor noise alone does. First, before the
captioner is made, ``sharpness``'s cost on one core: a VGA and a 1280 x 720 frame, and a 1080p
raw ROS message (bgr8, yuv422) measured on a view of its bytes against converted, median of 200
calls.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

BLUR_CHANCES = (0.0, 0.5, 1.0)
BLUR_LENGTHS = (5, 30)  # px, the least and the most
NOISE_SD = 2.0
FPS = 30.0


def motion_blur(photo: np.ndarray, length: int, axis: int) -> np.ndarray:
    """``photo`` (H, W, 3) blurred by motion ``length`` px along ``axis`` (0: its columns, 1:
    its rows): each pixel the mean of ``length`` pixels on that line, the edges repeated;
    float32."""
    lines = np.moveaxis(photo.astype(np.float64), axis, 1)  # each line along axis 1
    padded = np.pad(lines, ((0, 0), (length // 2, length - 1 - length // 2), (0, 0)), mode="edge")
    sums = np.concatenate([np.zeros_like(padded[:, :1]), padded.cumsum(axis=1)], axis=1)
    return np.moveaxis((sums[:, length:] - sums[:, :-length]) / length, 1, axis).astype(np.float32)


def burst(
    photo: np.ndarray, size: int, chance: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[bool]]:
    """``size`` frames of ``photo``: each blurred with probability ``chance`` (``motion_blur``,
    a random length in ``BLUR_LENGTHS`` along a random axis), all with sensor noise; and which
    were blurred."""
    frames, blurred = [], []
    for _ in range(size):
        frame = photo.astype(np.float32)
        blur = bool(rng.random() < chance)
        if blur:
            frame = motion_blur(
                photo, int(rng.integers(BLUR_LENGTHS[0], BLUR_LENGTHS[1] + 1)), int(rng.integers(0, 2))
            )
        noisy = frame + rng.normal(0.0, NOISE_SD, frame.shape).astype(np.float32)
        frames.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
        blurred.append(blur)
    return frames, blurred


class NoCaptions:
    """A stand-in captioner for ``caption_stream``: which frame it is given is what counts (the
    event names it); the frames are captioned in batches afterwards."""

    def caption(self, image, color="rgb", return_attention=False):
        from edgecap import Caption

        return Caption(text="", score=0.0, tokens=[], log_prob=0.0)


def picks(bursts: list[list[np.ndarray]], pick: str) -> list[int]:
    """The position in each burst of the frame ``caption_stream`` captions with ``pick``: each
    burst one ``every`` interval of a stream read in order (``live=False``). "newest": the last
    frame of the burst (what a live stream takes when the frames arrive while it is busy)."""
    from edgecap.stream import Frame, caption_stream

    if pick == "newest":
        return [len(frames) - 1 for frames in bursts]
    frames = [
        Frame(index=j * 1000 + i, timestamp=j + i / FPS, image=frame)
        for j, one in enumerate(bursts)
        for i, frame in enumerate(one)
    ]
    events = list(caption_stream(NoCaptions(), frames, every=1.0, live=False, pick=pick))
    if [e.frame_index // 1000 for e in events] != list(range(len(bursts))):
        raise SystemExit("sharpest: the stream did not give one event a burst")
    return [e.frame_index % 1000 for e in events]


def median_ms(repeats: int, call, *args) -> float:
    """Median milliseconds of ``repeats`` calls of ``call(*args)``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def raw_message(encoding: str, channels: int, size: tuple[int, int], rng: np.random.Generator):
    """A raw ``sensor_msgs/Image`` as rclpy gives one (its data an ``array.array`` of bytes) of
    random pixels, ``size`` (height, width)."""
    import array
    from types import SimpleNamespace

    height, width = size
    data = array.array("B", rng.integers(0, 256, height * width * channels, dtype=np.uint8).tobytes())
    stamp = SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id="camera")
    return SimpleNamespace(
        header=stamp,
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels,
        data=data,
    )


def sharpness_ms(repeats: int = 200) -> dict[str, float]:
    """Median milliseconds of one ``sharpness`` call on a VGA and on a 1280 x 720 frame; and on
    1080p raw ``sensor_msgs/Image`` messages (bgr8, yuv422), the ROS 2 node's way: measured on
    a view of the message's bytes (``raw_sharpness_view``) against converting it
    (``message_image``, what captioning one costs first)."""
    from edgecap.recordings import message_image, raw_sharpness_view
    from edgecap.stream import sharpness

    def measured(msg) -> float | None:
        return sharpness(raw_sharpness_view(msg))

    rng = np.random.default_rng(0)
    out = {}
    for name, (h, w) in (("640 x 480", (480, 640)), ("1280 x 720", (720, 1280))):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out[name] = median_ms(repeats, sharpness, frame)
    for encoding, channels in (("bgr8", 3), ("yuv422", 2)):
        msg = raw_message(encoding, channels, (1080, 1920), rng)
        out[f"1920 x 1080 {encoding} message, measured on its view"] = median_ms(repeats, measured, msg)
        out[f"1920 x 1080 {encoding} message, converted (message_image)"] = median_ms(
            repeats, message_image, msg, False, "frame"
        )
    return out


def row(r: dict) -> list[str]:
    """One row of the table from ``compare``'s figures."""
    d = r["difference"]
    return [
        str(r["burst"]),
        f"{r['chance of blur']:.0%}",
        str(r["photos"]),
        str(r["bursts with a sharp frame"]),
        f"{r['newest']['cider']:.3f}",
        f"{r['sharpest']['cider']:.3f}",
        f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
        f"{r['newest']['blurred picks']} / {r['sharpest']['blurred picks']}",
        f"{r['sharpest']['frames older than the newest']:.2f}",
        str(r["captions changed"]),
    ]


def blur_ratios(photos, lengths=(4, 8, 15, 25), seed: int = 0) -> dict:
    """How far blur moves ``sharpness``: each photo with sensor noise, blurred by each length
    along a random axis (then noise), as a share of the photo's sharpness sharp: the median and
    the largest share per length, and how many photos' blurred frame is at ``SHARPER_BY`` or more
    (one that would not give way to the frame sharp); and two noisy frames of the photo
    unblurred, the smaller over the larger: the smallest share (what noise alone moves it by)."""
    from edgecap.stream import sharpness

    rng = np.random.default_rng(seed)

    def noisy(frame):
        return np.clip(np.round(frame + rng.normal(0.0, NOISE_SD, frame.shape)), 0, 255).astype(np.uint8)

    shares: dict[int, list[float]] = {length: [] for length in lengths}
    still = []
    for photo in photos:
        sharp, again = sharpness(noisy(photo)), sharpness(noisy(photo))
        still.append(min(sharp, again) / max(sharp, again))
        for length in lengths:
            shares[length].append(
                sharpness(noisy(motion_blur(photo, length, int(rng.integers(0, 2))))) / sharp
            )
    from edgecap.stream import SHARPER_BY

    return {
        "blurred": {
            str(k): {
                "median": float(np.median(v)),
                "largest": float(np.max(v)),
                "not giving way": int(np.sum(np.asarray(v) >= SHARPER_BY)),
            }
            for k, v in shares.items()
        },
        "noise only, smallest": float(np.min(still)),
    }


def build_parser():
    from bars import add_photos_arguments

    p = C.argument_parser(__doc__)
    add_photos_arguments(p)
    p.add_argument(
        "--bursts",
        type=C.int_list(least=2),
        default=[2, 4],
        help="frames that compete for one caption, comma-separated",
    )
    C.add_out_argument(p)
    return p


def compare(captioner, photos, references, size: int, chance: float, seed: int) -> dict:
    """Bursts of ``photos`` at ``chance`` of blur; both picks captioned -> the row's figures."""
    from edgecap.evaluation.metrics import per_image_cider

    rng = np.random.default_rng(seed)
    bursts, blurred = zip(*(burst(photo, size, chance, rng) for photo in photos))
    chosen = {pick: picks(list(bursts), pick) for pick in ("newest", "sharpest")}
    # each distinct frame captioned once
    wanted = sorted({(j, i) for positions in chosen.values() for j, i in enumerate(positions)})
    captions = dict(zip(wanted, captioner.caption_batch([bursts[j][i] for j, i in wanted])))
    cider, row = {}, {"photos": len(photos), "chance of blur": chance, "burst": size}
    for pick, positions in chosen.items():
        texts = {j: captions[(j, i)].text for j, i in enumerate(positions)}
        per_photo = per_image_cider(references, texts)
        cider[pick] = [per_photo[j] for j in range(len(photos))]
        row[pick] = {
            "cider": float(np.mean(cider[pick])),
            "blurred picks": int(sum(blurred[j][i] for j, i in enumerate(positions))),
            "frames older than the newest": float(np.mean([size - 1 - i for i in positions])),
        }
    row["difference"] = paired_bootstrap(cider["newest"], cider["sharpest"])
    row["captions changed"] = sum(
        captions[(j, a)].text != captions[(j, b)].text
        for j, (a, b) in enumerate(zip(chosen["newest"], chosen["sharpest"]))
    )
    row["bursts with a sharp frame"] = int(sum(not all(b) for b in blurred))
    return row


def main(argv=None) -> int:
    from bars import photos_and_references

    from edgecap import Captioner

    args = build_parser().parse_args(argv)
    model = C.model_dir(args.model)
    cost = sharpness_ms()  # before any runtime's threads exist (one left spinning would steal time)
    captioner = Captioner(model)
    photos, references = photos_and_references(args.data, args.limit)
    ratios = blur_ratios(photos)
    rows, results = [], []
    for size in args.bursts:
        for n, chance in enumerate(BLUR_CHANCES):
            r = compare(captioner, photos, references, size, chance, seed=n)
            results.append(r)
            rows.append(row(r))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = C.markdown_table(
        [
            "burst",
            "frames blurred (chance)",
            "photos",
            "bursts with a sharp frame",
            "CIDEr, newest",
            "sharpest",
            "difference [95%]",
            "blurred picks, newest / sharpest",
            "sharpest: frames older than the newest (mean)",
            "captions changed",
        ],
        rows,
    )
    cost_table = C.markdown_table(
        ["frame", "ms (median of 200, one core)"], [[k, f"{v:.3f}"] for k, v in cost.items()]
    )
    ratio_table = C.markdown_table(
        ["motion blur", "sharpness of the frame blurred / sharp: median", "largest", "photos at 0.9 or more"],
        [
            [f"{k} px", f"{v['median']:.3f}", f"{v['largest']:.3f}", str(v["not giving way"])]
            for k, v in ratios["blurred"].items()
        ],
    )
    markdown = (
        f"Model: {model.name}; default options. Bursts of frames of one photo, each "
        f"blurred with the chance given by motion {BLUR_LENGTHS[0]}-{BLUR_LENGTHS[1]} px along its rows "
        f"or columns, all with "
        f"sensor noise (s.d. {NOISE_SD:g}); the newest frame of each burst captioned against the sharpest "
        f"(caption_stream's pick). Difference: sharpest minus newest, paired bootstrap over the photos.\n\n"
        f"{table}\n\n{cost_table}\n\n"
        f"Sharpness of each photo blurred against the photo sharp (both with the noise):\n\n{ratio_table}\n\n"
        f"Two frames of a photo differing only in the noise: the less sharp at least "
        f"{ratios['noise only, smallest']:.4f} of the other.\n"
    )
    data = {"model": str(model), "bursts": args.bursts, "rows": results, "sharpness ms": cost, "blur": ratios}
    C.write_results("sharpest", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
