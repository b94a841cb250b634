"""The consensus choice's readability terms: the everyday dev photos and Flickr8k dev captioned
once, the caption chosen among the same endings under several weights of the terms.

    python benchmarks/consensus_rules.py --data ../shared/data [--out DIR] \\
        [--rule NAME=REPEAT,DANGLING ...] [--flickr8k-limit N]

The default Captioner (the shipped model unless ``--model``) captions coco-ood-dev,
coco-ood-dev-b (80 + 80 everyday photos) and Flickr8k dev (research data, read from ``--data``,
never a fixture or a shipped file), and every photo's endings (the candidates the consensus
choice chooses among, ``edgecap.decoding.consensus``) are kept. Each ``--rule`` then chooses
among them again with ``Consensus(repeat_weight=REPEAT, dangling_weight=DANGLING)`` (a content
word said again, a caption ending on a word no caption ends on): no search runs twice, so the
rules differ in the choice alone. The first rule is the baseline. For each: per-photo CIDEr-D
and METEOR (coco-caption, PTB tokenizer; Java), their means on each folder and on the 160
everyday photos pooled, the 160's METEOR as one corpus, the differences from the baseline with
95% paired-bootstrap intervals (``_stats.paired_bootstrap``), the captions that say a content
word again or end on a dangling word, and how many captions changed. The rule whose weights are
the defaults must give the Captioner's own captions (checked).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402
from decoding_choice import SETS, add_data_argument, load_sets  # noqa: E402

DEFAULT_RULES = (
    "before=0,0",
    "repeat=0.1,0",
    "dangling=0,0.1",
    "both=0.1,0.1",
    "both-0.05=0.05,0.05",
    "both-0.2=0.2,0.2",
)


def parse_rule(text: str) -> tuple[str, float, float]:
    name, _, weights = text.partition("=")
    try:
        repeat, dangling = (float(w) for w in weights.split(","))
    except ValueError:
        raise SystemExit(f"consensus_rules: --rule {text!r}: expected NAME=REPEAT,DANGLING") from None
    return name, repeat, dangling


def build_parser():
    p = C.argument_parser(__doc__)
    add_data_argument(p)
    C.add_out_argument(p)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    p.add_argument(
        "--rule",
        action="append",
        metavar="NAME=REPEAT,DANGLING",
        help="the readability terms' weights; the first is the baseline "
        f"(default: {' '.join(DEFAULT_RULES)})",
    )
    p.add_argument("--flickr8k-limit", type=int, help="only the first N Flickr8k dev photos")
    return p


def collect(captioner, sets) -> dict:
    """Per set: the photos' ids, references, the Captioner's captions, and each photo's
    endings with its tag words (the arguments of its one ``Consensus.order`` call)."""
    from edgecap.decoding import consensus

    calls: list = []
    order = consensus.Consensus.order

    def recorded(self, hyps, tag_words=()):
        calls.append((list(hyps), tuple(tag_words)))
        return order(self, hyps, tag_words)

    consensus.Consensus.order = recorded
    try:
        out = {}
        for name, (items, root) in sets.items():
            start = len(calls)
            captions = list(captioner.iter_captions([root / i.file_name for i in items], on_error="raise"))
            if len(calls) - start != len(items):
                raise SystemExit(f"consensus_rules: {len(calls) - start} choices for {len(items)} photos")
            out[name] = {
                "ids": [i.image_id for i in items],
                "refs": {i.image_id: i.captions for i in items},
                "captions": [c.text for c in captions],
                "endings": calls[start:],
            }
        return out
    finally:
        consensus.Consensus.order = order


def main(argv=None) -> int:
    from edgecap import Captioner
    from edgecap.decoding.consensus import DANGLING_WEIGHT, REPEAT_WEIGHT, Consensus
    from edgecap.evaluation.metrics import java_available, score, scores

    args = build_parser().parse_args(argv)
    if not java_available():
        sys.exit("consensus_rules: METEOR needs Java (apt-get install default-jre-headless)")
    rules = [parse_rule(r) for r in (args.rule or DEFAULT_RULES)]
    captioner = Captioner(C.model_dir(args.model))
    words, classes = captioner.vocab, captioner.classes
    collected = collect(captioner, load_sets(args.data, args.flickr8k_limit))
    everyday = [name for name, kind in SETS if kind == "everyday"]

    def text(tokens) -> str:
        return words.decode(tokens)

    chosen: dict = {}  # rule -> set -> image id -> the chosen caption's word ids
    per_image: dict = {}
    results: dict = {"rules": {}, "photos": {name: len(s["ids"]) for name, s in collected.items()}}
    for name, repeat, dangling in rules:
        consensus = Consensus(classes.function_ids, classes.dangling_ids, repeat, dangling)
        chosen[name] = {}
        for set_name, s in collected.items():
            tokens = {
                image_id: tuple(consensus.order(endings, tags)[0].tokens) if endings else ()
                for image_id, (endings, tags) in zip(s["ids"], s["endings"])
            }
            chosen[name][set_name] = tokens
            hyps = {image_id: text(t) for image_id, t in tokens.items()}
            if (repeat, dangling) == (REPEAT_WEIGHT, DANGLING_WEIGHT):
                differ = sum(hyps[i] != c for i, c in zip(s["ids"], s["captions"]) if hyps[i])
                if differ:
                    raise SystemExit(
                        f"consensus_rules: the default weights differ from the Captioner on {differ} photos"
                    )
            _, each = scores(s["refs"], hyps, metrics=("METEOR", "CIDEr"))
            per_image[(name, set_name)] = each
        refs = {(sn, k): v for sn in everyday for k, v in collected[sn]["refs"].items()}
        hyps = {(sn, k): text(v) for sn in everyday for k, v in chosen[name][sn].items()}
        keys = {key: f"{key[0]}/{key[1]}" for key in refs}
        corpus = score(
            {keys[k]: v for k, v in refs.items()}, {keys[k]: v for k, v in hyps.items()}, metrics=("METEOR",)
        )
        results["rules"][name] = {
            "repeat_weight": repeat,
            "dangling_weight": dangling,
            "everyday_corpus_meteor": round(corpus["METEOR"], 4),
        }
        print(f"{name}: everyday corpus METEOR {corpus['METEOR']:.4f}", file=sys.stderr, flush=True)

    def pooled(name, metric, parts):
        return [v for sn in parts for _, v in sorted(per_image[(name, sn)][metric].items())]

    judge = Consensus(classes.function_ids, classes.dangling_ids)
    base = rules[0][0]
    groups = [("everyday (160)", everyday)] + [(sn, [sn]) for sn, _ in SETS]
    rows = []
    for name, repeat, dangling in rules:
        entry = results["rules"][name]
        all_captions = [c for sn in chosen[name] for c in chosen[name][sn].values()]
        entry["said_again"] = sum(judge.repeats(c) > 0 for c in all_captions)
        entry["dangling"] = sum(judge.dangles(c) for c in all_captions)
        entry["changed"] = sum(
            chosen[name][sn][i] != chosen[base][sn][i] for sn in chosen[name] for i in chosen[name][sn]
        )
        cells = [name, f"{repeat:g} / {dangling:g}"]
        for label, parts in groups:
            for metric in ("CIDEr", "METEOR"):
                b = pooled(name, metric, parts)
                d = paired_bootstrap(pooled(base, metric, parts), b)
                entry.setdefault(label, {})[metric] = {
                    "mean": round(sum(b) / len(b), 4),
                    **{k: round(v, 4) for k, v in d.items()},
                }
                cells.append(
                    f"{sum(b) / len(b):.4f}"
                    + (
                        ""
                        if name == base
                        else f" ({d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}])"
                    )
                )
        cells += [
            f"{entry['everyday_corpus_meteor']:.4f}",
            entry["said_again"],
            entry["dangling"],
            entry["changed"],
        ]
        rows.append(cells)
    n_all = sum(results["photos"].values())
    headers = ["rule", "repeat / dangling"]
    for label, _ in groups:
        headers += [f"{label} CIDEr", f"{label} METEOR"]
    headers += [
        "everyday corpus METEOR",
        f"say a word again (of {n_all})",
        "end dangling",
        f"changed vs {base}",
    ]
    markdown = (
        f"Model: {Path(captioner.manifest.directory).name}; default options; per-photo CIDEr-D and METEOR "
        f"means (differences from `{base}` with 95% paired-bootstrap intervals); photos: "
        + ", ".join(f"{k} {v}" for k, v in results["photos"].items())
        + ".\n\n"
        + C.markdown_table(headers, rows)
        + "\n"
    )
    C.write_results("consensus_rules", results, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
