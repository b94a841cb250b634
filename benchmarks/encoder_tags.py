"""Do an encoder's ImageNet classes name what the photos show? A check of the pretrained weights
that needs no ImageNet: the share of photos whose top-1 / top-5 classes map (through
``imagenet_classes.json``'s caption words) to a word of one of the photo's reference captions.

    python benchmarks/encoder_tags.py --images DATA/coco-ood-dev/images \\
        --references DATA/coco-ood-dev/captions_cocofmt.json \\
        --encoders efficientnet-lite0@224,efficientnet-lite2@260,efficientnet-lite2@224

Used to check the ported EfficientNet-Lite2 weights before trusting the paper's ImageNet figure
(no ImageNet validation set here). A class with no caption word never counts as a hit, so the
shares are lower bounds; on 80 photos one photo is 1.25 points. Needs torch and the weights
packages (``edgecap[train]``). Writes ``encoder_tags.md`` / ``.json`` into ``--out DIR`` (default: a
new folder under benchmarks/runs/).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import _common as C


def reference_words(references: Path) -> dict[str, set[str]]:
    """COCO caption JSON -> {file name: the words of its reference captions} (letters only:
    "dog's" counts as "dog")."""
    from edgecap.evaluation.evaluate import load_references

    return {
        item.file_name: {w for c in item.captions for w in re.findall(r"[a-z]+", c.lower())}
        for item in load_references(references=references)
    }


def hit_rate(
    probs: np.ndarray, files: list[str], words: dict[str, set[str]], class_words: list[set[str]], k: int
) -> float:
    """The share of photos with a caption word of one of their top-k classes in a reference."""
    hits = [any(class_words[c] & words[f] for c in np.argsort(-p)[:k]) for p, f in zip(probs, files)]
    return float(np.mean(hits))


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of the photos named in --references (others are left out)",
    )
    p.add_argument("--references", type=Path, required=True, help="COCO caption JSON of the photos")
    p.add_argument(
        "--encoders",
        default="efficientnet-lite0@224,efficientnet-lite2@260",
        help="comma-separated ENCODER@SIZE",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    C.add_out_argument(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    import torch

    from edgecap.images import load_rgb, preprocess
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.objects import IMAGENET_CLASSES
    from edgecap.preprocess import Preprocessing

    if args.threads:
        torch.set_num_threads(args.threads)
    classes = json.loads(IMAGENET_CLASSES.read_text())
    class_words = [set(c["words"]) for c in classes["classes"]]
    names = [c["name"] for c in classes["classes"]]
    words = reference_words(args.references)
    files = sorted(f for f in words if (args.images / f).is_file())
    frames = [load_rgb(args.images / f) for f in files]
    rows, data = [], {"images": str(args.images), "n": len(files), "encoders": {}}
    for item in args.encoders.split(","):
        encoder, size = item.split("@")
        model = load_pretrained(encoder)
        pre = Preprocessing(size=(int(size), int(size)))
        x = torch.from_numpy(preprocess(frames, pre))
        with torch.inference_mode():
            probs = model.class_probs(model.features(x)).numpy()
        entry = {
            "top1": hit_rate(probs, files, words, class_words, 1),
            "top5": hit_rate(probs, files, words, class_words, 5),
            "mean_top1_probability": float(probs.max(1).mean()),
            "top1_classes": {f: names[int(q.argmax())] for f, q in zip(files, probs)},
        }
        data["encoders"][item] = entry
        rows.append(
            [item, f"{entry['top1']:.3f}", f"{entry['top5']:.3f}", f"{entry['mean_top1_probability']:.3f}"]
        )
        print(
            f"{item}: top-1 {entry['top1']:.3f}, top-5 {entry['top5']:.3f}, "
            f"mean top-1 probability {entry['mean_top1_probability']:.3f}",
            flush=True,
        )
    md = (
        f"{len(files)} photos of `{args.images}`; a hit: "
        "a caption word of one of the top-k ImageNet classes is in a reference caption.\n\n"
        + C.markdown_table(["encoder@size", "top-1 hit", "top-5 hit", "mean top-1 probability"], rows)
    )
    C.write_results("encoder_tags", data, md, argv, out=args.out)


if __name__ == "__main__":
    C.run_main(main)
