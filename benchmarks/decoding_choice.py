"""Choose the default decoding: caption the everyday dev photos (coco-ood-dev and coco-ood-dev-b,
80 + 80) and Flickr8k dev with several decoding settings, and compare each with the first.

    python benchmarks/decoding_choice.py --data ../shared/data --out results-dir \\
        [--model DIR] [--variant NAME=OPTION=VALUE,OPTION=VALUE ...] [--flickr8k-limit N]

Each variant is ``CaptionOptions`` overrides (``fused=fusion_weight=0.35``,
``plain=guidance_bonus=0,fusion_weight=0``), and may name another model directory than
``--model``'s (``grown=model=DIR`` or ``grown=model=DIR,fusion_weight=0.35``: two models compared
photo by photo). Prints, and writes to ``OUT/decoding_choice.md`` /
``.json``, each set's CIDEr-D, METEOR and BLEU-4 (coco-caption, PTB tokenizer with Java), and
for every variant after the first its per-photo CIDEr and METEOR differences with 95%
paired-bootstrap intervals on each set and on the 160 everyday photos together (per-photo
scores computed within each folder, then pooled; the 160 photos' METEOR is also scored as one
corpus). Also writes each variant's captions (``OUT/captions-NAME.json``: the
caption, its score and object tags per photo) for later analysis. Nothing is written anywhere
else.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SETS = (("coco-ood-dev", "everyday"), ("coco-ood-dev-b", "everyday"), ("flickr8k-dev", "in domain"))


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    options = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key == "model":  # another model directory for this variant (a path, kept as text)
            options[key] = value
            continue
        options[key] = (
            None
            if value == "None"
            else (
                value == "True"
                if value in ("True", "False")
                else float(value)
                if "." in value
                else int(value)
            )
        )
    return name, options


def add_data_argument(parser) -> None:
    """``--data DIR``: the folder ``load_sets`` reads the three sets from."""
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder holding the data sets: coco-ood-dev/, coco-ood-dev-b/ and flickr8k/",
    )


def load_sets(data: Path, flickr8k_limit: int | None):
    from edgecap.evaluation.evaluate import load_references

    sets = {}
    for name, _ in SETS:
        if name == "flickr8k-dev":
            items = load_references(
                captions=data / "flickr8k" / "Flickr8k.token.txt",
                split=data / "flickr8k" / "Flickr_8k.devImages.txt",
            )
            sets[name] = (items[:flickr8k_limit], data / "flickr8k" / "images")
        else:
            items = load_references(references=data / name / "captions_cocofmt.json")
            sets[name] = (items, data / name / "images")
    return sets


def caption_all(captioner, items, root: Path) -> dict:
    out = {}
    paths = [root / item.file_name for item in items]
    for item, caption in zip(items, captioner.iter_captions(paths, on_error="raise")):
        out[item.image_id] = {
            "caption": caption.text,
            "score": round(caption.score, 5),
            "confidence": caption.confidence,
            "objects": [[n, p] for n, p in caption.objects],
        }
    return out


def build_parser():
    p = C.argument_parser(__doc__)
    add_data_argument(p)
    C.add_out_argument(p)
    p.add_argument("--model", help="model directory (default: the shipped one)")
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=OPT=V,...",
        help="a decoding to measure; the first is the baseline",
    )
    p.add_argument("--flickr8k-limit", type=int, help="only the first N Flickr8k dev photos")
    p.add_argument(
        "--resamples",
        type=int,
        default=10000,
        help="bootstrap resamples of the photos, for the 95%% intervals",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.out = C.output_dir(args.out)

    from _stats import paired_bootstrap

    from edgecap import Captioner
    from edgecap.evaluation.metrics import java_available, score, scores

    if not java_available():  # the per-photo METEOR intervals need coco-caption's METEOR
        sys.exit("decoding_choice: METEOR needs Java (apt-get install default-jre-headless)")

    args.out.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in args.variant]
    sets = load_sets(args.data, args.flickr8k_limit)
    results: dict = {"variants": dict(variants), "sets": {}}
    per_image: dict = {}
    per_image_m: dict = {}
    everyday_text: dict = {}
    for name, options in variants:
        options = dict(options)
        captioner = Captioner(options.pop("model", args.model), **options)
        captions = {}
        for set_name, (items, root) in sets.items():
            t0 = time.perf_counter()
            hyps = caption_all(captioner, items, root)
            seconds = time.perf_counter() - t0
            refs = {item.image_id: item.captions for item in items}
            text = {k: v["caption"] for k, v in hyps.items()}
            metrics, each = scores(refs, text, metrics=("BLEU-4", "METEOR", "CIDEr"))
            per_image[(name, set_name)] = each["CIDEr"]
            per_image_m[(name, set_name)] = each["METEOR"]
            if dict(SETS)[set_name] == "everyday":
                everyday_text.setdefault(name, ({}, {}))
                everyday_text[name][0].update({(set_name, k): v for k, v in refs.items()})
                everyday_text[name][1].update({(set_name, k): v for k, v in text.items()})
            results["sets"].setdefault(set_name, {})[name] = {
                **{k: round(v, 4) for k, v in metrics.items()},
                "seconds": round(seconds, 1),
            }
            captions[set_name] = {str(k): v for k, v in hyps.items()}
            print(json.dumps({"variant": name, "set": set_name, **metrics}), flush=True)
        (args.out / f"captions-{name}.json").write_text(json.dumps(captions) + "\n")
        refs_e, text_e = everyday_text[name]
        keys = {key: f"{key[0]}/{key[1]}" for key in refs_e}
        results["sets"].setdefault("everyday (160)", {})[name] = {
            "METEOR": round(
                score(
                    {keys[k]: v for k, v in refs_e.items()},
                    {keys[k]: v for k, v in text_e.items()},
                    metrics=("METEOR",),
                )["METEOR"],
                4,
            )
        }

    base = variants[0][0]
    comparisons = {}
    for name, _ in variants[1:]:
        row = {}
        for set_name in [s for s, _ in SETS] + ["everyday (160)"]:
            parts = (
                [s for s, kind in SETS if kind == "everyday"] if set_name == "everyday (160)" else [set_name]
            )
            a = [v for s in parts for _, v in sorted(per_image[(base, s)].items())]
            b = [v for s in parts for _, v in sorted(per_image[(name, s)].items())]
            row[set_name] = {k: round(v, 4) for k, v in paired_bootstrap(a, b, args.resamples).items()}
            row[set_name]["CIDEr"] = round(sum(b) / len(b), 4)
            a = [v for s in parts for _, v in sorted(per_image_m[(base, s)].items())]
            b = [v for s in parts for _, v in sorted(per_image_m[(name, s)].items())]
            row[set_name]["METEOR"] = {
                k: round(v, 4) for k, v in paired_bootstrap(a, b, args.resamples).items()
            }
        comparisons[name] = row
    results["vs_" + base] = comparisons
    (args.out / "decoding_choice.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"| variant | set | BLEU-4 | METEOR | CIDEr | CIDEr vs {base} [95%] "
        f"| per-photo METEOR vs {base} [95%] |",
        "|---|---|---|---|---|---|---|",
    ]

    def interval(d) -> str:
        return f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    for name, _ in variants:
        for set_name, _ in SETS:
            m = results["sets"][set_name][name]
            diff = comparisons.get(name, {}).get(set_name)
            cell = (
                ""
                if diff is None
                else (f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]")
            )
            m_cell = "" if diff is None else interval(diff["METEOR"])
            lines.append(
                f"| {name} | {set_name} | {m['BLEU-4']:.3f} | {m['METEOR']:.4f} | {m['CIDEr']:.3f} | {cell} "
                f"| {m_cell} |"
            )
        diff = comparisons.get(name, {}).get("everyday (160)")
        meteor = results["sets"]["everyday (160)"][name]["METEOR"]
        if diff is not None:
            lines.append(
                f"| {name} | everyday (160) | | {meteor:.4f} | {diff['CIDEr']:.3f} | "
                f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] "
                f"| {interval(diff['METEOR'])} |"
            )
        else:
            lines.append(f"| {name} | everyday (160) | | {meteor:.4f} | | | |")
    table = "\n".join(lines)
    (args.out / "decoding_choice.md").write_text(
        f"`python benchmarks/decoding_choice.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f"\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    C.run_main(main)
