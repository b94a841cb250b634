"""Train a caption language model on text only, for fusion at decoding time
(``edgecap.decoding.fusion``).

A small word-level LSTM over a caption model's own vocabulary (words it lacks become ``<unk>``),
trained to predict each next word of a caption from ``<start>``. Its weights are written as a
``.npz`` of plain arrays (``edgecap.decoding.fusion.CaptionLM`` runs it in numpy; no pickle) with
a JSON sidecar holding its dimensions, the vocabulary's checksum and its training figures.

    python -m edgecap.training.language_model --text captions.txt --model MODEL_DIR \\
        --out coco_lm.npz [--epochs 6] [--hidden 256] [--embed 128]

``--text`` is one caption per line; ``--flickr8k TOKENS --split TRAIN_IMAGES`` reads the training
captions of a Flickr8k-style token file instead (the in-domain model of the density ratio).

Then put both into a model directory (``fusion.json`` and the two weight files), with the fusion
weight chosen for it:

    python -m edgecap.training.language_model install --model MODEL_DIR \
        --everyday coco_lm.npz --in-domain flickr8k_lm.npz --weight 0.35
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from edgecap.files import write_whole
from edgecap.manifest import file_sha256, load_manifest, name_optional_file
from edgecap.vocab import Vocabulary


MAX_TEXT_BYTES = 256 << 20  # caption text: COCO's 600k training captions are ~35 MB
MAX_META_BYTES = 1 << 20


def read_text(path: Path, what: str) -> str:
    """A regular UTF-8 text file of at most ``MAX_TEXT_BYTES`` (a one-line exit otherwise: not a
    pipe or a device that would hang or fill memory, not binary)."""
    from edgecap.files import FileProblem, read_regular
    from edgecap.training.records import shown

    try:
        return read_regular(path, MAX_TEXT_BYTES, what).decode("utf-8")
    except FileProblem as exc:
        raise SystemExit(f"{shown(path)}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(f"{shown(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_captions(args) -> list[str]:
    if args.text:
        return [
            # one caption a line, lines as edgecap train --text-mix reads them (str.splitlines)
            line.strip()
            for line in read_text(Path(args.text), "caption text").splitlines()
            if line.strip()
        ]
    from edgecap.data.readers import read_flickr8k

    return [c for item in read_flickr8k(Path(args.flickr8k), Path(args.split)) for c in item.captions]


def encode_all(captions: list[str], vocab: Vocabulary, max_words: int) -> list[list[int]]:
    """Captions -> id lists with <start> and <end>, at most ``max_words`` words."""
    out = []
    for caption in captions:
        ids = vocab.encode(caption)
        if len(ids) > 2:
            out.append(ids[: max_words + 1] + [vocab.end] if len(ids) > max_words + 2 else ids)
    return out


def train(args) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.model)
    vocab = Vocabulary.load(manifest.path("vocab"))
    data = encode_all(read_captions(args), vocab, args.max_words)
    random.shuffle(data)
    n_dev = max(1, int(len(data) * args.dev_fraction))
    dev, train_set = data[:n_dev], data[n_dev:]
    V = len(vocab)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, args.embed)
            self.lstm = nn.LSTM(args.embed, args.hidden, batch_first=True)
            self.drop = nn.Dropout(args.dropout)
            self.out = nn.Linear(args.hidden, V)

        def forward(self, x):
            h, _ = self.lstm(self.drop(self.embed(x)))
            return self.out(self.drop(h))

    model = LM()
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=vocab.pad, reduction="sum")

    def batches(rows, shuffle):
        order = list(range(len(rows)))
        if shuffle:
            random.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            chunk = [rows[j] for j in order[i : i + args.batch_size]]
            width = max(len(r) for r in chunk)
            x = torch.full((len(chunk), width), vocab.pad, dtype=torch.long)
            for k, r in enumerate(chunk):
                x[k, : len(r)] = torch.tensor(r)
            yield x[:, :-1], x[:, 1:]

    def dev_perplexity() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in batches(dev, False):
                total += float(loss_fn(model(x).reshape(-1, V), y.reshape(-1)))
                count += int((y != vocab.pad).sum())
        model.train()
        return math.exp(total / count)

    best, history = float("inf"), []
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        for x, y in batches(train_set, True):
            optimiser.zero_grad()
            loss = loss_fn(model(x).reshape(-1, V), y.reshape(-1)) / int((y != vocab.pad).sum())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
        ppl = dev_perplexity()
        history.append(
            {"epoch": epoch, "dev_perplexity": round(ppl, 3), "seconds": round(time.time() - t0, 1)}
        )
        print(json.dumps(history[-1]), flush=True)
        if ppl < best:
            best = ppl
            save(model, args, vocab, manifest, history, len(train_set), len(dev))
        for group in optimiser.param_groups:
            group["lr"] *= args.lr_decay
    return {"best_dev_perplexity": best}


def save(model, args, vocab, manifest, history, n_train, n_dev) -> None:
    """Write the ``.npz`` (float32 arrays, torch's gate order i, f, g, o) and its JSON."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        embed=sd["embed.weight"],
        w_ih=sd["lstm.weight_ih_l0"],
        w_hh=sd["lstm.weight_hh_l0"],
        bias=sd["lstm.bias_ih_l0"] + sd["lstm.bias_hh_l0"],
        out_w=sd["out.weight"],
        out_b=sd["out.bias"],
    )
    meta = {
        "format": "edgecap-caption-lm/1",
        "vocab_size": len(vocab),
        "embed": args.embed,
        "hidden": args.hidden,
        "vocab_sha256": file_sha256(manifest.path("vocab")),
        "weights_sha256": file_sha256(out),
        "trained_on": args.text or f"{args.flickr8k} ({args.split})",
        "captions": {"train": n_train, "dev": n_dev},
        "history": history,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", "utf-8")


def install(
    model_dir: Path, everyday: Path, in_domain: Path, weight: float, gate_photos: list[Path] | None = None
) -> Path:
    """Copy the two language models into ``model_dir`` and write its ``fusion.json``; both
    must have been trained on the model's vocabulary. ``gate_photos``: the caption model's
    training photos, whose class probabilities set the per-photo gate (None: no gate).
    -> the fusion file's path."""
    from edgecap.contract import FUSION
    from edgecap.decoding.fusion import FORMAT, FUSION_FILE, Fusion

    # a model whose fusion.json (named in its manifest) was removed is refused for captioning,
    # not for an install, which writes it again
    manifest = load_manifest(model_dir, optional_files=False)
    vocab_sha = file_sha256(manifest.path("vocab"))
    spec: dict = {
        "format": FORMAT,
        "weight": weight,
        "method": "density ratio: weight * (log p_everyday - log p_in_domain)",
    }
    # Everything is checked and read (and the gate fitted) before any file of the model
    # directory is replaced: a refused install leaves it as it was, not with LMs that its
    # fusion.json's checksums no longer match.
    checked = []
    for role, source in (("everyday", Path(everyday)), ("in_domain", Path(in_domain))):
        from edgecap.files import FileProblem, read_json
        from edgecap.training.records import shown

        try:
            meta = read_json(source.with_suffix(".json"), MAX_META_BYTES)
        except FileProblem as exc:
            raise SystemExit(f"{shown(source.with_suffix('.json'))}: {exc}") from None
        if not isinstance(meta, dict):
            raise SystemExit(f"{shown(source.with_suffix('.json'))}: not a JSON object")
        if meta.get("vocab_sha256") != vocab_sha:
            raise SystemExit(f"{source}: trained on another vocabulary than {model_dir}'s")
        try:  # the trainer's record of each epoch: the best dev perplexity is recorded
            best = min(float(e["dev_perplexity"]) for e in meta.get("history") or ())
        except (TypeError, KeyError, ValueError):
            raise SystemExit(
                f"{shown(source.with_suffix('.json'))}: no epochs with a dev_perplexity in its "
                "'history' (not the language-model trainer's record)"
            ) from None
        # stored as float16 (half the bytes of a model that ships in the package; the numpy
        # runtime computes in float32)
        with np.load(source, allow_pickle=False) as arrays:
            half = {k: arrays[k].astype(np.float16) for k in arrays.files}
        info = {
            "trained_on": meta.get("trained_on"),
            "captions": meta.get("captions"),
            "hidden": meta.get("hidden"),
            "embed": meta.get("embed"),
            "dev_perplexity": best,
        }
        checked.append((role, half, info))
    gate = gate_from_photos(model_dir, gate_photos) if gate_photos else None
    # the confidence model was fitted at the model's own weight so far: said in its file, so that
    # the new weight is not taken for it (captions at a weight it never saw, rated)
    from edgecap.confidence import pin_fusion_weight
    from edgecap.errors import ModelError

    try:
        earlier = Fusion.load(Path(model_dir), manifest.dims.vocab_size)
    except ModelError:  # a broken fusion.json: none that its captions could have had
        earlier = None
    pin_fusion_weight(Path(model_dir), 0.0 if earlier is None else earlier.weight)
    # each file written whole, and a link there (a folder of links to another model's files, ``cp
    # -rs``) replaced by it, not written through: that model keeps its language models
    for role, half, info in checked:
        name = f"lm_{role}.npz"
        write_whole(Path(model_dir) / name, partial(np.savez_compressed, **half), replace_link=True)
        spec[role] = {"file": name, "sha256": file_sha256(Path(model_dir) / name), **info}
    if gate is not None and gate_photos:
        spec["gate"] = {
            **gate.to_json(),
            "fitted_on": f"{len(gate_photos)} training photos of the caption model",
        }
    path = Path(model_dir) / FUSION_FILE
    text = json.dumps(spec, indent=1) + "\n"
    write_whole(path, lambda f: f.write(text.encode("utf-8")), replace_link=True)
    Fusion.load(Path(model_dir), manifest.dims.vocab_size)  # it loads as written
    # named in the manifest: a copy of the folder without it is refused, not captioned without it
    name_optional_file(model_dir, FUSION)
    return path


def gate_from_photos(model_dir: Path, photos: list[Path]):
    """The fusion gate fitted on ``photos`` (the caption model's training photos), by the
    model's encoder alone: not a ``Captioner``, which loads the directory's current fusion.json
    and confidence.json, so that an install mends a model whose fusion.json no longer matches
    its LMs (an install cut short between the files) instead of failing on it."""
    from edgecap.api import DEFAULT_THREADS
    from edgecap.backends import load_backend, resolve
    from edgecap.decoding.fusion import Gate
    from edgecap.images import load_rgb, preprocess

    manifest = load_manifest(model_dir, optional_files=False)
    name = resolve("auto")
    backend = load_backend(name, manifest, threads=DEFAULT_THREADS.get(name))
    probs = []
    for start in range(0, len(photos), 32):
        x = preprocess([load_rgb(p) for p in photos[start : start + 32]], manifest.preprocessing)
        class_probs = backend.encode(x).class_probs
        if class_probs is None:
            raise SystemExit(
                f"{model_dir}: its encoder gives no class probabilities; the fusion gate is fitted on them"
            )
        probs.append(class_probs)
    return Gate.fit(np.concatenate(probs))


PROG = "language_model"  # how its error lines begin, as argparse's do


def build_install_parser() -> argparse.ArgumentParser:
    """``python -m edgecap.training.language_model install``'s options."""
    from edgecap.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog=f"{PROG} install",
        description="put two caption LMs into a model directory",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model directory to install them into (fusion.json and the two weight files are written there)",
    )
    parser.add_argument(
        "--everyday",
        required=True,
        type=Path,
        help="the everyday language model's weights (.npz, its .json beside it), on --model's vocabulary",
    )
    parser.add_argument(
        "--in-domain",
        required=True,
        type=Path,
        help="the in-domain language model's weights (.npz, its .json beside it): the caption "
        "model's own training captions, on its vocabulary",
    )
    parser.add_argument(
        "--weight",
        required=True,
        type=float,
        help="fusion weight W: decoding adds W * (log p_everyday - log p_in_domain) to each word's score",
    )
    parser.add_argument(
        "--gate-images",
        type=Path,
        help="folder of the caption model's training photos (with "
        "--gate-list: the names to use) for the per-photo gate (default: no gate)",
    )
    parser.add_argument(
        "--gate-list",
        type=Path,
        help="file naming one photo of --gate-images per line (default: all of them)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """``python -m edgecap.training.language_model``'s options (training one model)."""
    from edgecap.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=(
            "To put two trained models (everyday and in-domain) into a model directory, where\n"
            "the caption search fuses them:\n"
            "  python -m edgecap.training.language_model install --model DIR ...\n"
            "(its own --help lists the options)."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one caption per line")
    source.add_argument("--flickr8k", help="a Flickr8k token file (with --split)")
    parser.add_argument("--split", help="the image list whose captions to train on")
    parser.add_argument("--model", required=True, help="model directory whose vocabulary to use")
    parser.add_argument("--out", required=True, help="weights file to write (.npz)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=6,
        help="passes over the captions; the best dev epoch's weights are kept",
    )
    parser.add_argument("--embed", type=int, default=128, help="word embedding size")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden size")
    parser.add_argument(
        "--dropout", type=float, default=0.2, help="dropout on the embeddings and the LSTM output"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--lr-decay", type=float, default=0.7, help="learning rate factor after each epoch")
    parser.add_argument("--batch-size", type=int, default=128, help="captions per training batch")
    parser.add_argument(
        "--max-words", type=int, default=30, help="longer captions are cut to this many words"
    )
    parser.add_argument(
        "--dev-fraction",
        type=float,
        default=0.02,
        help="share of the captions held out for the dev perplexity (at least one caption)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (the dev split, shuffling, initial weights)"
    )
    return parser


def main(argv=None) -> int:
    """The command line (``python -m edgecap.training.language_model [install] ...``); a model
    directory that cannot be used (missing, refused) is one line on stderr and exit 2, as
    ``edgecap``'s commands say it, not a traceback."""
    from edgecap.errors import ModelError

    try:
        return _main(argv)
    except ModelError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install"]:
        parser = build_install_parser()
        args = parser.parse_args(argv[1:])
        if args.gate_list and not args.gate_images:  # it names photos of that folder
            parser.error("--gate-list names photos of --gate-images: give --gate-images DIR too")
        photos = None
        if args.gate_images:
            names = (
                [n.strip() for n in read_text(args.gate_list, "photo list").split("\n") if n.strip()]
                if args.gate_list
                else sorted(p.name for p in args.gate_images.iterdir())
            )
            photos = [args.gate_images / n for n in names]
        print(install(args.model, args.everyday, args.in_domain, args.weight, photos))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.flickr8k and not args.split:
        parser.error("--flickr8k needs --split")
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
