"""A latency-breakdown chart drawn with Pillow alone (no matplotlib).

    python benchmarks/chart.py                          # results/latency.json -> runs/.../latency.png
    python benchmarks/chart.py --out benchmarks/results  # redraw the committed chart
    python benchmarks/chart.py --json runs/X/latency.json --out runs/X

One horizontal stacked bar per variant at one beam / batch setting: preprocessing, encoder,
decoder steps, and the search's own Python work, in milliseconds per call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = (
    ("preprocess_ms", "preprocess", (120, 170, 220)),
    ("encoder_ms", "encoder", (40, 100, 170)),
    ("decode_ms", "decoder steps", (230, 140, 40)),
    ("search_python_ms", "search (Python)", (150, 150, 150)),
)


def latency_chart(
    data: dict, beam: int | None = None, batch: int | None = None, out: Path | None = None
) -> Path:
    beam = data["targets"]["beam"] if beam is None else beam
    batch = data["targets"]["batch"] if batch is None else batch
    rows = [r for r in data["results"] if r["beam"] == beam and r["batch"] == batch]
    out = Path(out) if out is not None else RESULTS / "latency.png"
    font = ImageFont.load_default()
    label_w, bar_h, gap, width, top = 170, 22, 10, 900, 50
    height = top + len(rows) * (bar_h + gap) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10), f"latency per call, beam {beam}, batch {batch} (ms; median parts)", fill="black", font=font
    )
    longest = max((sum(max(r[k], 0.0) for k, _, _ in PARTS) for r in rows), default=1.0)
    scale = (width - label_w - 90) / longest
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((10, y + 5), r["variant"], fill="black", font=font)
        x = float(label_w)
        for key, _, color in PARTS:
            w = max(r[key], 0.0) * scale
            draw.rectangle([x, y, x + w, y + bar_h], fill=color)
            x += w
        draw.text((x + 6, y + 5), f"{r['e2e_p50_ms']:.1f}", fill="black", font=font)
    x, y = 10, height - 35
    for _, name, color in PARTS:
        draw.rectangle([x, y, x + 14, y + 14], fill=color)
        draw.text((x + 20, y + 2), name, fill="black", font=font)
        x += 40 + int(draw.textlength(name, font=font))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def build_parser():
    import _common as C

    p = C.argument_parser(__doc__)
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="latency.py's results (default: the committed results/latency.json)",
    )
    C.add_out_argument(p)
    return p


def main(argv=None) -> None:
    import _common as C

    args = build_parser().parse_args(argv)
    args.json = args.json or C.RESULTS_DIR / "latency.json"
    if not args.json.is_file():
        sys.exit(f"{args.json} not found: run python benchmarks/latency.py first")
    try:
        data = json.loads(args.json.read_text())
    except ValueError as exc:
        sys.exit(f"{args.json}: not JSON ({exc})")
    # another script's results (or another file) had been a KeyError 'targets' traceback
    if not (isinstance(data, dict) and isinstance(data.get("targets"), dict) and "results" in data):
        sys.exit(f"{args.json}: not latency.py's results (no targets and results)")
    print(latency_chart(data, out=C.output_dir(args.out) / "latency.png"))


if __name__ == "__main__":
    main()
