"""What ``edgecap train`` runs, as dataclasses (no torch: the command line reads its defaults
here). Each rule about the values is checked once, in ``__post_init__``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgecap.files import nearest_existing
from edgecap.models.config import DEFAULT_ENCODER, ENCODERS, DecoderConfig, encoder_spec

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_IMAGE_SIZE = 1024  # 32x32 attention regions; the encoder's activations grow as size^2
MAX_SHARD_SIZE = 65536  # images per shard: 8 GB of Lite0 features at 224 px
MAX_DECODER_DIM = 8192  # hidden / feature / embedding / attention units (the shipped model: 512)
MAX_SEED = 2**32 - 1


def _check(name: str, value, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """``ValueError`` naming the field unless ``value`` is a number (an int when ``integer``)
    within the bounds (open ones exclusive)."""
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or (not integer and not math.isfinite(value))
    ):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'more than' if low_open else 'at least'} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'less than' if high_open else 'at most'} {high}, got {value}")


def _check_common(cfg) -> None:
    _check("epochs", cfg.epochs, 1, integer=True)
    _check("lr", cfg.lr, 0)
    _check("threads", cfg.threads, 0, 1024, integer=True)
    _check("seed", cfg.seed, 0, MAX_SEED, integer=True)


def feature_cache(out: str | Path, cache_dir: str | None) -> Path:
    """The feature cache's folder: ``cache_dir``, else OUT/../.feature-cache."""
    return Path(cache_dir) if cache_dir else Path(out).parent / ".feature-cache"


def check_folders(out: str, cache_dir: str | None, names: tuple[str, str] = ("out", "cache_dir")) -> None:
    """``ValueError`` unless ``out`` and the feature cache can be folders: each is a folder or
    does not exist yet, below a folder, and can be written or made (nothing is created here):
    the run writes --out only once every photo is decoded and encoded, minutes or hours on,
    and a folder that cannot be written (a read-only disk, another user's folder) is said now."""
    cache = feature_cache(out, cache_dir)
    for flag, path in zip(names, (Path(out), cache)):
        existing = nearest_existing(path)
        if existing.is_dir():
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ValueError(
                    f"{flag} {path}: "
                    + ("not writable" if existing == path else f"cannot be made in {existing}, not writable")
                )
            if flag == names[0]:
                _check_checkpoint_folders(flag, path)
            continue
        what = "a file" if existing.exists() else "a broken link"
        raise ValueError(
            f"{flag} {path}: "
            + (f"is {what}, not a folder" if existing == path else f"{existing} is {what}, not a folder")
        )


def _check_checkpoint_folders(flag: str, out: Path) -> None:
    """``ValueError`` when OUT/best or OUT/last is there but is not a checkpoint (no
    checkpoint.json): a run replaces each whole after an epoch, and a folder of the user's that
    happens to have one of those names (a --out given an existing folder, ``best`` photos in it)
    had been removed with everything in it, without a word."""
    for name in CHECKPOINT_FOLDERS:
        folder = out / name
        if os.path.lexists(folder) and not os.path.lexists(folder / "checkpoint.json"):
            raise ValueError(
                f"{flag} {out}: {folder} is not a checkpoint of edgecap train (no checkpoint.json), and a "
                "run would replace it with one; choose another --out"
            )


CHECKPOINT_FOLDERS = ("best", "last")  # what a run writes in OUT, each replaced whole


@dataclass(frozen=True)
class TrainConfig:
    data: str  # dataset root
    out: str  # checkpoint directory
    images: str | None = None  # images root (default: DATA/images; a folder: DATA)
    dataset: str = "flickr8k"  # flickr8k | coco | karpathy | folder (captions.csv/jsonl)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    lr_decay_epochs: int = 8  # halve the learning rate every N epochs
    min_word_count: int = 5
    max_caption_words: int = 22  # longer training captions are cut
    encoder: str = DEFAULT_ENCODER  # efficientnet-lite0 | efficientnet-lite2 (config.ENCODERS)
    image_size: int | None = None  # encoder input (square; None: the encoder's own, 224 / 260);
    # the attention map is ceil(size / 32) a side
    alpha_c: float = 1.0  # doubly stochastic attention regularisation weight
    label_smoothing: float = 0.0
    scheduled_sampling: float = 0.0  # final probability of feeding the model's own word
    grad_clip: float = 5.0
    patience: int = 6  # stop after this many epochs without a better dev CIDEr
    finetune_encoder: bool = False
    finetune_blocks: int = 3  # last N encoder blocks (+ head) trained when fine-tuning
    encoder_lr: float = 1e-4
    finetune_cached: bool = False  # fine-tune on cached activations of the frozen blocks
    init_from: str | None = None  # start from this checkpoint's / model directory's weights
    # (not its optimizer); "default": the shipped model, "none":
    # fresh weights; None: "default" for a folder, else "none"
    cache_dir: str | None = None  # feature cache (default: OUT/../.feature-cache)
    shard_size: int = 1024  # images per shard of the disk feature cache
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; CUDA only)
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    progress: bool = True
    max_dev_images: int = 0  # 0: the whole dev split
    decoder: dict = field(default_factory=dict)  # DecoderConfig overrides (hidden_dim, ...)
    dev_fraction: float | None = None  # folder without a split column: share of dev photos
    allow_outside_data: bool = False  # photos outside the images folder (../, absolute, links)
    text: str | None = None  # caption text (one a line) mixed in as text-only batches (text_mix.py)
    text_share: float = 0.5  # with text: the share of the batches that are text-only
    text_pretrain: int = 0  # with text: epochs of text alone (the text and the train split's own
    # captions) before the photo epochs: the decoder pretrained as a caption language model
    tag_rank: int = 0  # > 0: give the starting decoder tags as an input (DecoderConfig.tag_rank)

    def __post_init__(self):
        # Field names in the messages: `edgecap train` shows them as its flags.
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder}")
        if self.image_size is None:  # frozen: set once, here
            object.__setattr__(self, "image_size", encoder_spec(self.encoder).image_size)
        if isinstance(self.image_size, int) and self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the encoder's stride), got {self.image_size}")
        _check("image_size", self.image_size, 32, MAX_IMAGE_SIZE, integer=True)
        _check_common(self)
        _check("batch_size", self.batch_size, 1, 1 << 20, integer=True)
        _check("lr_decay_epochs", self.lr_decay_epochs, 1, integer=True)
        _check("min_word_count", self.min_word_count, 0, integer=True)
        _check("max_caption_words", self.max_caption_words, 1, 1000, integer=True)
        _check("alpha_c", self.alpha_c, 0)
        _check("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        _check("scheduled_sampling", self.scheduled_sampling, 0, 1)
        _check("grad_clip", self.grad_clip, 0, low_open=True)
        _check("patience", self.patience, 1, integer=True)
        _check("encoder_lr", self.encoder_lr, 0)
        _check("max_dev_images", self.max_dev_images, 0, integer=True)
        _check("shard_size", self.shard_size, 1, MAX_SHARD_SIZE, integer=True)
        check_decoder(self.decoder)
        if {"tag_rank", "n_classes"} & set(self.decoder):  # the input the encoder decides
            raise ValueError("the tag input is set by tag_rank, not by the decoder sizes")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision}")
        if self.dev_fraction is not None:
            if self.dataset != "folder":
                raise ValueError(
                    "dev_fraction is for a folder of photos with a captions.csv "
                    "or captions.jsonl (dataset folder)"
                )
            if not 0 < self.dev_fraction < 1:
                raise ValueError(f"dev_fraction must be between 0 and 1, got {self.dev_fraction}")
        _check("tag_rank", self.tag_rank, 0, MAX_DECODER_DIM, integer=True)
        if not 0 < self.text_share < 1:
            raise ValueError(f"text_share must be between 0 and 1, got {self.text_share}")
        _check("text_pretrain", self.text_pretrain, 0, 1000, integer=True)
        if self.text_pretrain and not self.text:
            raise ValueError("text_pretrain needs the caption text to pretrain on: give --text FILE")
        if self.finetune_cached and not self.finetune_encoder:
            raise ValueError("finetune_cached needs finetune_encoder")
        n_blocks = encoder_spec(self.encoder).n_blocks
        if self.finetune_encoder and not 1 <= self.finetune_blocks <= n_blocks:
            raise ValueError(
                f"finetune_blocks must be 1..{n_blocks} ({self.encoder} has "
                f"{n_blocks} blocks), got {self.finetune_blocks}"
            )


@dataclass(frozen=True)
class ScstConfig:
    checkpoint: str  # cross-entropy checkpoint to start from (OUT/best)
    data: str
    out: str
    images: str | None = None
    dataset: str = "flickr8k"
    epochs: int = 4  # epochs and lr: the one measured recipe (docs/quality.md)
    images_per_batch: int = 25
    n_samples: int = 5
    lr: float = 5e-5
    max_length: int = 16
    cache_dir: str | None = None
    seed: int = 0
    threads: int = 0
    progress: bool = True
    allow_outside_data: bool = False

    def __post_init__(self):
        _check_common(self)
        _check("images_per_batch", self.images_per_batch, 1, 1 << 20, integer=True)
        _check("max_length", self.max_length, 1, 1000, integer=True)
        if self.n_samples < 2:
            raise ValueError(
                f"n_samples must be at least 2 (each sample's baseline is the mean "
                f"reward of the image's other samples), got {self.n_samples}"
            )


def check_decoder(sizes: dict) -> None:
    """``ValueError`` unless ``sizes`` are ``DecoderConfig`` fields with sane values (the sizes
    a checkpoint or the command line gives, checked before any weight is allocated)."""
    if not isinstance(sizes, dict):
        raise ValueError(f"decoder sizes must be a mapping, got {type(sizes).__name__}")  # noqa: TRY004
    known = {f.name: f for f in fields(DecoderConfig)}
    for name, value in sizes.items():
        if name not in known:
            raise ValueError(f"unknown decoder setting {name!r}")
        if name == "dropout":
            _check("dropout", value, 0, 1, high_open=True)
        elif name == "attention":
            if not isinstance(value, bool):
                raise ValueError(f"attention must be true or false, got {value!r}")
        elif name == "vocab_size":
            _check(name, value, 1, 1 << 22, integer=True)
        elif name == "tag_rank":  # 0: no tag input
            _check(name, value, 0, MAX_DECODER_DIM, integer=True)
        else:
            _check(name, value, 1, MAX_DECODER_DIM, integer=True)


def check_preprocessing(d: dict):
    """A checkpoint's ``preprocessing`` record -> ``Preprocessing``; ``ValueError`` unless its
    size is two integers within 32..``MAX_IMAGE_SIZE``, its mean and std three finite numbers
    (std above 0) and its resampling one Pillow knows."""
    from edgecap.preprocess import Preprocessing

    pre = Preprocessing.from_dict(d)
    if len(pre.size) != 2:
        raise ValueError(f"size must be [height, width], got {list(pre.size)}")
    for side in pre.size:
        _check("size", side, 32, MAX_IMAGE_SIZE, integer=True)
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) != 3:
            raise ValueError(f"{name} must be 3 numbers, got {len(values)}")
        for v in values:
            _check(name, v, 0 if name == "std" else None, low_open=True)
    if pre.resample not in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"):
        raise ValueError(f"unknown resampling {pre.resample!r}")
    return pre
