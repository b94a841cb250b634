"""Where a training run starts: its photos and captions, its first weights and its vocabulary.

Data: the dataset readers (``edgecap.data.readers``), or a folder of your own photos
(``--dataset folder``, ``edgecap.data.folder``), whose bad rows and photos are reported on
stderr and left out before any feature is computed.

Weights (``init_from``): fresh ones, a training checkpoint (``checkpoint.json``), a model
directory made by ``edgecap export`` (its PyTorch modules rebuilt from the ONNX initializers, as
the torch backend does) or ``default``, the shipped model. A folder run starts from ``default``
unless told otherwise (``none``: fresh weights). For a folder the starting model's vocabulary
grows by the folder's new training words (``edgecap.training.grow``); for the other datasets the
vocabulary is rebuilt from the training captions and must be the starting model's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgecap.commands.output import escape_field
from edgecap.data.readers import CaptionedImage, read_dataset
from edgecap.errors import DataError, ModelError, counted
from edgecap.models.checkpoint import load_checkpoint
from edgecap.models.decoder import CaptionDecoder, DecoderConfig
from edgecap.models.efficientnet_lite import N_CLASSES, EfficientNetLite, load_pretrained
from edgecap.preprocess import Preprocessing
from edgecap.training.config import TrainConfig
from edgecap.training.grow import add_tag_input, grow_decoder, grow_vocabulary
from edgecap.training.records import shown
from edgecap.vocab import Vocabulary

DEFAULT = "default"  # init_from: the shipped model
NONE = "none"  # init_from: fresh weights (a folder run's default is DEFAULT)


def training_items(
    cfg: TrainConfig, data: Path, images: Path, log=print
) -> tuple[list[CaptionedImage], list[CaptionedImage], int]:
    """The train and dev photos of ``cfg.dataset`` (a folder's bad rows reported on stderr), and
    how many rows or photos were left out (reported; ``edgecap train`` then exits 1).
    Photos outside ``images`` (absolute paths, ``..``, links leading out) are left out and
    reported unless ``cfg.allow_outside_data``. A ``data`` that is no folder is a ``DataError``
    (the readers')."""
    if cfg.dataset != "folder":
        return dataset_items(cfg.dataset, data, images, cfg.allow_outside_data)
    from edgecap.data.folder import read_folder

    folder = read_folder(data, images, cfg.dev_fraction, cfg.seed, allow_outside=cfg.allow_outside_data)
    if folder.n_problems:
        left_out = counted(folder.n_problems, "row or photo", "rows or photos")
        log(f"{shown(folder.source)}: {left_out} left out (listed on stderr)")
    return folder.train, folder.dev, folder.n_problems


def dataset_items(
    kind: str, data: Path, images: Path, allow_outside: bool = False, report=None
) -> tuple[list[CaptionedImage], list[CaptionedImage], int]:
    """The train and dev photos of a Flickr8k / COCO / Karpathy dataset, and how many were left
    out: those outside ``images`` are reported (one line each, then a count) and left out
    unless ``allow_outside``."""
    from edgecap.data.folder import (
        OUTSIDE_HINT,
        Problems,
        outside_problem,
        report_stderr,
    )

    splits = read_dataset(kind, data, "train"), read_dataset(kind, data, "dev")
    if allow_outside:
        return splits[0], splits[1], 0
    root = images.resolve()
    problems = Problems(report or report_stderr)
    kept: tuple[list[CaptionedImage], list[CaptionedImage]] = ([], [])
    for split, items in zip(kept, splits):
        for item in items:
            problem = outside_problem(root, item.file_name)
            if problem:
                problems(
                    f"{shown(data)}: {escape_field(item.file_name)}: {problem}; {OUTSIDE_HINT}; photo skipped"
                )
            else:
                split.append(item)
    problems.close(shown(data))
    for name, split in zip(("train", "dev"), kept):
        if not split:
            raise DataError(f"{shown(data)}: no usable {name} photo")
    return kept[0], kept[1], problems.count


@dataclass
class Start:
    encoder: EfficientNetLite | None  # the encoder to fine-tune (None: frozen, features cached)
    decoder: CaptionDecoder
    vocab: Vocabulary
    meta: dict  # the checkpoint's metadata when resuming, else {}
    resuming: bool


def initial_model(cfg: TrainConfig, train_items: list[CaptionedImage], last: Path, log=print) -> Start:
    """The run's first weights: ``last`` when it holds a checkpoint (resuming), else
    ``cfg.init_from`` (see the module doc)."""
    captions = [c for it in train_items for c in it.captions]
    resuming = (last / "checkpoint.json").exists()
    source = last if resuming else init_source(cfg)
    if source is None:
        vocab = Vocabulary.build(captions, cfg.min_word_count)
        try:
            decoder = CaptionDecoder(
                DecoderConfig(
                    vocab_size=len(vocab), **cfg.decoder, tag_rank=cfg.tag_rank, n_classes=N_CLASSES
                )
            )
        except ValueError as exc:  # a vocabulary smaller than the step's top words
            raise DataError(
                f"{shown(cfg.data)}: the training captions give {len(vocab)} "
                f"words with --min-word-count {cfg.min_word_count} ({exc}); add "
                "captions, lower --min-word-count or start from a trained model "
                "(--init-from)"
            ) from None
        encoder = load_pretrained(cfg.encoder) if cfg.finetune_encoder else None
        return Start(encoder, decoder, vocab, {}, False)
    # The starting model's decoder sizes are kept (a different one given is refused below);
    # the dropout given is trained with.
    encoder, decoder, vocab, meta = load_start(source, cfg.finetune_encoder, cfg.finetune_blocks)
    dropout = cfg.decoder.get("dropout", decoder.cfg.dropout)  # a training setting, not a size
    if dropout != decoder.cfg.dropout:
        decoder.cfg = replace(decoder.cfg, dropout=dropout)
        decoder.dropout.p = dropout
    asked = {name: value for name, value in cfg.decoder.items() if name != "dropout"}
    if any(getattr(decoder.cfg, name) != value for name, value in asked.items()):  # else ignored
        raise ModelError(
            f"{source}: its decoder ({_sizes(decoder.cfg.to_dict(), asked)}) is not the one asked "
            f"for ({_sizes(asked, asked)}): a run keeps its starting model's decoder sizes; "
            f"leave out {' / '.join(_SIZE_FLAGS[name] for name in asked)}, or start from fresh "
            "weights (--init-from none)"
        )
    if resuming:  # the same command resumes; one that asks for another run is refused
        _check_resumed(cfg, meta, last)
    if encoder.variant != cfg.encoder:
        raise ModelError(
            f"{source}: its decoder was trained on {encoder.variant}'s features, not "
            f"{cfg.encoder}'s; start from a model of that encoder or from 'none'"
        )
    if cfg.dataset == "folder":
        if not resuming:  # a resumed run's vocabulary has grown already
            grown = grow_vocabulary(vocab, captions, cfg.min_word_count)
            added, vocab = grown.words[len(vocab) :], grown
            decoder = grow_decoder(decoder, len(vocab), torch.Generator().manual_seed(cfg.seed))
            log(growth_line(len(vocab) - len(added), source, added, cfg.min_word_count))
    elif vocab.words != Vocabulary.build(captions, cfg.min_word_count).words:
        raise ModelError(
            f"{source}: its vocabulary differs from the one built from this "
            "training data (another dataset or --min-word-count?)"
        )
    if cfg.tag_rank and decoder.cfg.tag_rank != cfg.tag_rank:
        if decoder.cfg.tag_rank:
            raise ModelError(
                f"{source}: its decoder takes tags at rank {decoder.cfg.tag_rank}, not "
                f"--tag-rank {cfg.tag_rank}; leave --tag-rank out to keep it"
            )
        if resuming:  # its optimizer state holds no tag input's
            raise ModelError(
                f"{source}: this run was started without the tag input, which a resumed run "
                f"cannot add; start another --out from it (--init-from {source} --tag-rank {cfg.tag_rank})"
            )
        decoder = add_tag_input(decoder, cfg.tag_rank, N_CLASSES, torch.Generator().manual_seed(cfg.seed))
        log(f"tags as an input: the encoder's {N_CLASSES} class probabilities at rank {cfg.tag_rank}")
    if not resuming:
        log(f"initialised from {source}")
    return Start(encoder if cfg.finetune_encoder else None, decoder, vocab, meta, resuming)


def growth_line(kept: int, source: object, added: list[str], min_count: int) -> str:
    """The log line of a vocabulary grown by a folder's words: the first 20 new words, or that
    there is none (it had ended in an empty list after a colon)."""
    if not added:
        return f"vocabulary: the {kept} words of {source}; no new word seen {min_count}+ times"
    words = " ".join(added[:20]) + (" ..." if len(added) > 20 else "")
    return f"vocabulary: {kept} words of {source} + {len(added)} new (seen {min_count}+ times): {words}"


def _check_resumed(cfg: TrainConfig, meta: dict, last: Path) -> None:
    """``ModelError`` when the run in ``last`` (its checkpoint's ``meta``) is not the one ``cfg``
    asks for: another ``--init-from`` (it would not be used); another ``--image-size`` (its
    features and checkpoints are at its own); other data, or (a folder) another dev split: a
    resumed run keeps its vocabulary, its best dev CIDEr and its epochs, so other data would be
    trained on with them unsaid, or (its epochs all done) not at all, its old best given back as
    this command's; or with(out) ``--text``, which its optimizer's state was saved without
    (with). A record without the settings (an older checkpoint) is not checked for them."""
    was = meta.get("train_config") if isinstance(meta, dict) else None
    if cfg.init_from is not None:
        started = was.get("init_from") if isinstance(was, dict) else None
        if cfg.init_from != started and _start_name(cfg.init_from, cfg) != _start_name(started, cfg):
            raise ModelError(
                f"{last.parent}: holds a run started from {started or _start_name(None, cfg)!r}, which this "
                f"command resumes ({last}); --init-from {cfg.init_from} would not be used: give "
                "another --out to start from it, or leave out --init-from to resume"
            )
    size = meta["preprocessing"]["size"][0]  # square; checked by load_checkpoint
    if size != cfg.image_size:
        raise ModelError(
            f"{last.parent}: holds a run at --image-size {size}, which this command resumes "
            f"({last}); it would go on at {cfg.image_size}: give --image-size {size} to "
            f"resume, or another --out to start at {cfg.image_size}"
        )
    if not isinstance(was, dict):
        return
    # --min-word-count made the run's vocabulary, which a resumed run keeps (it was ignored)
    flags = [("--data", "data"), ("--dataset", "dataset"), ("--min-word-count", "min_word_count")]
    if cfg.dataset == "folder" and was.get("dataset") == "folder":  # these choose its dev photos
        flags += [("--dev-fraction", "dev_fraction"), ("--seed", "seed")]
    for flag, name in flags:
        old, new = was.get(name, getattr(cfg, name)), getattr(cfg, name)
        if name == "data" and isinstance(old, str):
            if not (Path(old).is_absolute() or Path(old).is_dir()):
                continue  # relative to the folder the run was started in, not this one
            old, new = os.path.realpath(old), os.path.realpath(new)
        elif name == "dev_fraction":  # not given: the default
            from edgecap.data.folder import DEFAULT_DEV_FRACTION

            old, new = (DEFAULT_DEV_FRACTION if v is None else v for v in (old, new))
        if old != new:
            raise ModelError(
                f"{last.parent}: holds a run with {flag} {shown(old) if name == 'data' else old}, which "
                f"this command resumes ({last}), not {flag} {shown(new) if name == 'data' else new}: "
                "give another --out for a new run, or the run's own options to resume it"
            )
    if "text" in was and bool(was["text"]) != bool(cfg.text):  # its optimizer has that many groups
        how, other = ("with", "without") if was["text"] else ("without", "with")
        raise ModelError(
            f"{last.parent}: holds a run trained {how} --text, which this command resumes ({last}) "
            f"{other} it: resume it {how} --text, or give another --out for a new run"
        )


_SIZE_FLAGS = {
    "hidden_dim": "--hidden-dim",
    "feature_dim": "--feature-dim",
    "embed_dim": "--embed-dim",
    "attention_dim": "--attention-dim",
    "attention": "--no-attention",
}


def _sizes(sizes: dict, names: dict) -> str:
    """The decoder sizes ``names`` of ``sizes`` in words: 'hidden_dim 512, no attention'."""
    words = {True: "attention", False: "no attention"}
    return ", ".join(words[sizes[n]] if n == "attention" else f"{n} {sizes[n]}" for n in names)


def _start_name(init_from: str | None, cfg: TrainConfig) -> str:
    """What a run given ``init_from`` starts from, by name (None: the dataset's default; a
    path as an absolute one, so that ``runs/a/best`` and ``./runs/a/best`` are one start)."""
    name = init_from if init_from is not None else DEFAULT if cfg.dataset == "folder" else NONE
    return name if name in (DEFAULT, NONE) else str(Path(name).absolute())


def init_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint or model directory ``cfg.init_from`` names; None for fresh weights."""
    name = cfg.init_from
    if name is None:
        name = DEFAULT if cfg.dataset == "folder" else NONE
    if name == NONE:
        return None
    if name == DEFAULT:
        from edgecap.api import default_model_dir

        return Path(default_model_dir())
    return Path(name)


def load_start(source: Path, finetune_encoder: bool = False, finetune_blocks: int | None = None):
    """A checkpoint or a model directory -> (encoder, decoder, vocab, checkpoint meta or {}),
    the modules in eval mode on the CPU. The encoder's weights that the run keeps frozen must be
    the pretrained encoder's, whose features (or activations) the run computes and caches: all
    of them without ``finetune_encoder``, those before the last ``finetune_blocks`` blocks with
    it (None: not checked); ``ModelError`` otherwise."""
    if not source.is_dir():
        if os.path.exists(source):  # one of a model's files (its encoder.onnx): there, no folder
            raise ModelError(
                f"{source}: not a folder; give the checkpoint (OUT/best) or model directory "
                f"that holds it, {DEFAULT!r} (the shipped model) or {NONE!r}"
            )
        raise ModelError(
            f"{source}: no such directory; start from a checkpoint (OUT/best), a "
            f"model directory, {DEFAULT!r} (the shipped model) or {NONE!r}"
        )
    if (source / "checkpoint.json").exists() or not (source / "manifest.json").exists():
        encoder, decoder, vocab, _, meta = load_checkpoint(source)  # says what a checkpoint is
        _check_frozen(source, encoder, finetune_encoder, finetune_blocks)
        return encoder, decoder, vocab, meta
    from edgecap.api import load_vocabulary
    from edgecap.backends.torch import TorchBackend
    from edgecap.manifest import load_manifest

    manifest = load_manifest(source)
    if manifest.precision != "fp32":
        raise ModelError(
            f"{source}: a {manifest.precision} model directory; start from the FP32 one it was converted from"
        )
    # The input size may differ (--image-size): the decoder attends over any number of regions.
    if replace(manifest.preprocessing, size=Preprocessing().size) != Preprocessing():
        raise ModelError(
            f"{source}: its preprocessing {manifest.preprocessing.to_dict()} is not the one training uses"
        )
    encoder, decoder = TorchBackend._build(manifest)
    _check_frozen(source, encoder, finetune_encoder, finetune_blocks)
    return encoder, decoder, load_vocabulary(manifest), {}


def _check_frozen(source: Path, encoder: EfficientNetLite, finetune: bool, blocks: int | None) -> None:
    """``ModelError`` unless the weights of ``encoder`` that the run keeps frozen are the
    pretrained encoder's (``load_start``): the run trains on the pretrained encoder's cached
    features (or, fine-tuning, its cached activations before the tuned blocks, and the dev check
    always on those), while the model it writes computes them with ``encoder``'s own weights."""
    if finetune and blocks is None:
        return
    n_blocks = len(encoder._blocks)
    tuned: tuple[str, ...] = ()
    if finetune and blocks is not None:
        tuned = ("_conv_head.", "_bn1.") + tuple(f"_blocks.{i}." for i in range(n_blocks - blocks, n_blocks))
    pretrained = load_pretrained(encoder.variant).state_dict()
    moved = [
        k
        for k, v in encoder.state_dict().items()
        if not k.startswith(tuned) and not torch.equal(v, pretrained[k])
    ]
    if not moved:
        return
    if not finetune:
        raise ModelError(
            f"{source}: its encoder was fine-tuned, but the decoder would train "
            "on the pretrained encoder's features; add --finetune-encoder"
        )
    first = min((int(k.split(".")[1]) for k in moved if k.startswith("_blocks.")), default=-1)
    hint = (
        f"--finetune-blocks {n_blocks - first} or more"
        if first >= 0 and not any(k.startswith(("_conv_stem.", "_bn0.")) for k in moved)
        else "another starting model"
    )
    raise ModelError(
        f"{source}: its encoder was fine-tuned before its last {blocks} blocks ({moved[0]}), "
        "but the run reads the pretrained blocks' cached activations in their place (the dev "
        f"check, and the training with --finetune-cached); use {hint}"
    )
