"""Grow a model directory's vocabulary by word transfer: new object words the photos never taught.

The caption model learned its words from Flickr8k; everyday photos show things it has no word
for (sink, zebra, broccoli, microwave), many of which its encoder's ImageNet classifier sees.
Each new word of the table is a copy of a known word of the same kind (direct transfer, after
Hendricks et al., "Deep Compositional Captioning", CVPR 2016: zebra <- horse, sink <- toilet):
its decoder embedding and output rows are its source word's, its output bias the source's plus
``--delta`` (-1 by default), so the decoder alone always prefers the source word by that margin.
The table also names the ImageNet classes whose tag the new word names; in those classes'
``classes.json`` entries the new word replaces its source word (if listed). The tag bonus
(+2 by default, ``edgecap.decoding``) then makes the new word win over its source exactly when the
photo's classifier sees that class (-1 + 2 > 0), and lose otherwise (-1 < 0): the word is said
when the photo shows it, in the place the source word would take.

The fusion language models get the new words too: the in-domain one (the caption model's own
prior) as copies of the source words (so the density ratio weighs the new word as the caption
model's prior for it, its source's, against the everyday model's), the everyday one either the
same copies or, with ``--everyday``, a model retrained on the grown vocabulary
(``python -m edgecap.training.language_model --text ... --model OUT``), which knows where the
new words go. The per-photo gate and the fusion weight are carried over.

    python export/transfer_words.py --model edgecap/assets/default --words export/transfer_words.tsv \\
        --out OUT [--everyday everyday.npz] [--delta -1]

The table (tab-separated, ``#`` comments): new word, source word, ImageNet class indices (comma
separated; may be empty). Needs ``edgecap[export]`` (torch, onnx). Every old word keeps its id,
so the old word ids of the captions are unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecap.build.export import export_modules
from edgecap.decoding.fusion import CaptionLM
from edgecap.errors import ModelError, reason
from edgecap.manifest import file_sha256, load_manifest
from edgecap.training.grow import transfer_decoder
from edgecap.training.start import load_start
from edgecap.vocab import Vocabulary, tokenize

LM_ROWS = ("embed", "out_w", "out_b")  # a caption LM's per-word arrays (edgecap.decoding.fusion)
# what the old manifest's information keeps; its figures were measured on the old model
CARRIED = ("name", "training")


class Problem(Exception):
    """A bad input of the script, said in one line (exit 2)."""


@dataclass(frozen=True)
class Transfer:
    word: str
    source: str
    classes: tuple[int, ...]


def read_table(path: Path, vocab: Vocabulary, n_classes: int) -> list[Transfer]:
    """The table's rows, checked: new words new, distinct and single caption words, sources known
    words, classes in range."""
    try:
        text = path.read_text("utf-8-sig")  # a byte-order mark is no part of the first word
    except UnicodeDecodeError as exc:
        raise Problem(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows: list[Transfer] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) not in (2, 3):
            raise Problem(f"{where}: expected NEW<TAB>SOURCE<TAB>CLASSES, got {line!r}")
        word, source = fields[0].strip(), fields[1].strip()
        try:
            classes = tuple(int(c) for c in fields[2].split(",") if c.strip()) if len(fields) == 3 else ()
        except ValueError:
            raise Problem(f"{where}: class indices must be integers: {fields[2]!r}") from None
        if tokenize(word) != [word]:
            raise Problem(f"{where}: {word!r} is not one lower-case caption word")
        if word in vocab.index or any(r.word == word for r in rows):
            raise Problem(f"{where}: {word!r} is already a word of the vocabulary or the table")
        if source not in vocab.index or source in vocab.words[:4]:
            raise Problem(f"{where}: source {source!r} is not a word of the vocabulary")
        if any(not 0 <= c < n_classes for c in classes):
            raise Problem(f"{where}: class indices must be in 0..{n_classes - 1}")
        rows.append(Transfer(word, source, classes))
    if not rows:
        raise Problem(f"{path}: no word to transfer")
    return rows


def everyday_lm(path: Path, vocab: Vocabulary) -> tuple[dict[str, np.ndarray], dict]:
    """An everyday LM trained on ``vocab`` (its ``.npz`` and the ``.json`` written beside it by
    ``edgecap.training.language_model``), checked before anything is written."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text("utf-8"))
    except FileNotFoundError:
        raise Problem(
            f"{path}: no {sidecar.name} beside it (python -m edgecap.training.language_model writes both)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(f"{sidecar}: not the JSON of a language model ({exc})") from None
    history = meta.get("history") if isinstance(meta, dict) else None
    if not isinstance(history, list) or not all(
        isinstance(e, dict) and isinstance(e.get("dev_perplexity"), (int, float)) for e in history or [None]
    ):
        raise Problem(f"{sidecar}: not the JSON of a language model (no training history)")
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(Path(tmp) / "vocab.json")
        grown_sha = file_sha256(Path(tmp) / "vocab.json")
    if meta.get("vocab_sha256") != grown_sha:
        raise Problem(
            f"{path}: trained on another vocabulary than the grown one (train it with --model on a "
            "directory grown without --everyday)"
        )
    try:
        with np.load(path, allow_pickle=False) as lm:
            arrays = {k: lm[k] for k in lm.files}
        CaptionLM(arrays)  # the arrays of one LSTM language model, their shapes consistent
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise Problem(f"{path}: not a caption language model's arrays ({reason(exc)})") from None
    if arrays["embed"].shape[0] != len(vocab):
        raise Problem(f"{path}: {arrays['embed'].shape[0]} words, but the grown vocabulary has {len(vocab)}")
    return arrays, meta


def grown_classes(classes: dict, rows: list[Transfer]) -> dict:
    """``classes.json`` with each row's word first among its classes' words, its source left out."""
    entries = [dict(e, words=list(e["words"])) for e in classes["classes"]]
    for row in rows:
        for c in row.classes:
            words = [w for w in entries[c]["words"] if w != row.source]
            entries[c]["words"] = [row.word, *(w for w in words if w != row.word)]
    # a class naming several new words names them in the table's order
    for c in {c for row in rows for c in row.classes}:
        new = [r.word for r in rows if c in r.classes]
        entries[c]["words"] = new + [w for w in entries[c]["words"] if w not in new]
    about = (
        classes.get("about", "")
        + " Words transferred to new vocabulary words (export/transfer_words.py): "
        + ", ".join(f"{r.word} <- {r.source}" for r in rows)
        + "."
    )
    return {**classes, "about": about, "classes": entries}


def transferred_lm(lm: CaptionLM, sources: list[int]) -> dict[str, np.ndarray]:
    """A caption LM's arrays with the source words' rows appended (the new words as copies)."""
    arrays = dict(lm.arrays)
    for key in LM_ROWS:
        arrays[key] = np.concatenate([arrays[key], arrays[key][sources]])
    return arrays


def save_lm(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write a model directory's LM file as ``install`` does (float16, compressed); -> its SHA-256."""
    np.savez_compressed(path, **{k: np.asarray(v).astype(np.float16) for k, v in arrays.items()})
    return file_sha256(path)


def transfer(model: Path, table: Path, out: Path, delta: float, everyday: Path | None) -> Path:
    """Write the grown model directory ``out`` (a new or empty folder, removed again if anything
    fails on the way)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Problem(f"{out}: exists and is not an empty folder; name a new one")
    made = not out.exists()
    try:
        return _transfer(model, table, out, delta, everyday)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():  # the user's empty folder stays, empty
            for path in out.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        raise


def _transfer(model: Path, table: Path, out: Path, delta: float, everyday: Path | None) -> Path:
    if not math.isfinite(delta):
        raise Problem(f"--delta must be a finite number, got {delta}")
    manifest = load_manifest(model)
    # nothing is trained here: a fine-tuned encoder is exported as it is
    encoder, decoder, vocab, _ = load_start(model, finetune_encoder=True)
    rows = read_table(table, vocab, manifest.dims.n_classes)
    for row in rows:
        if not row.classes:
            print(
                f"transfer_words: note: {row.word!r} names no class: no tag bonus makes it win over "
                f"{row.source!r}, so only a language model can have it said",
                file=sys.stderr,
            )
    sources = [vocab.index[r.source] for r in rows]
    grown = Vocabulary(vocab.words + [r.word for r in rows])
    retrained = None if everyday is None else everyday_lm(everyday, grown)
    info = {k: manifest.info[k] for k in CARRIED if k in manifest.info}
    info["transferred_words"] = {
        "from": {
            "name": manifest.info.get("name"),
            "sha256": manifest.sha256,
            "dev_metrics": manifest.info.get("dev_metrics"),
        },
        "delta": delta,
        "table": table.name,
        "words": {r.word: r.source for r in rows},
    }
    new = export_modules(
        encoder, transfer_decoder(decoder, sources, delta), grown, manifest.preprocessing, out, info
    )
    classes = json.loads(manifest.path("classes").read_text("utf-8"))
    new.path("classes").write_text(json.dumps(grown_classes(classes, rows), indent=0) + "\n", "utf-8")
    new.sha256["classes"] = file_sha256(new.path("classes"))
    new.save()
    for extra in ("confidence.json",):
        if (model / extra).exists():
            shutil.copyfile(model / extra, out / extra)
    fusion_path = model / "fusion.json"
    if fusion_path.exists():
        spec = json.loads(fusion_path.read_text("utf-8"))
        for role in ("everyday", "in_domain"):
            target = out / spec[role]["file"]
            if role == "everyday" and retrained is not None:
                arrays, meta = retrained
                spec[role].update(
                    trained_on=meta.get("trained_on"),
                    captions=meta.get("captions"),
                    hidden=meta.get("hidden"),
                    embed=meta.get("embed"),
                    dev_perplexity=min(e["dev_perplexity"] for e in meta["history"]),
                )
            else:
                source = CaptionLM.load(model / spec[role]["file"], len(vocab), spec[role].get("sha256"))
                arrays = transferred_lm(source, sources)
                spec[role]["transferred_words"] = "the new words' rows are copies of their source words'"
            spec[role]["sha256"] = save_lm(target, arrays)
        (out / "fusion.json").write_text(json.dumps(spec, indent=1) + "\n", "utf-8")
    new.with_optional_files().save()  # naming the files copied (or written) beside it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the FP32 model directory to grow")
    parser.add_argument("--words", type=Path, required=True, help="the table: NEW, SOURCE, CLASSES")
    parser.add_argument("--out", type=Path, required=True, help="the new model directory")
    parser.add_argument(
        "--delta",
        type=float,
        default=-1.0,
        help="a new word's logit minus its source's (default: %(default)s)",
    )
    parser.add_argument(
        "--everyday",
        type=Path,
        help="an everyday language model (.npz, with the .json written beside it) trained by "
        "python -m edgecap.training.language_model on a directory grown without this option "
        "(default: the source words' rows copied)",
    )
    args = parser.parse_args(argv)
    try:
        out = transfer(args.model, args.words, args.out, args.delta, args.everyday)
    except (Problem, ModelError, OSError) as exc:  # a bad input, in one line
        print(f"transfer_words: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
