"""What ``edgecap train`` runs, as dataclasses (no torch: the command line reads its defaults
here). Each rule about the values is checked once, in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgecap.models.config import DEFAULT_ENCODER, ENCODERS, encoder_spec

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    data: str                       # dataset root
    out: str                        # checkpoint directory
    images: str | None = None       # images root (default: DATA/images; a folder: DATA)
    dataset: str = "flickr8k"       # flickr8k | coco | karpathy | folder (captions.csv/jsonl)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    lr_decay_epochs: int = 8        # halve the learning rate every N epochs
    min_word_count: int = 5
    max_caption_words: int = 22     # longer training captions are cut
    encoder: str = DEFAULT_ENCODER  # efficientnet-lite0 | efficientnet-lite2 (config.ENCODERS)
    image_size: int | None = None   # encoder input (square; None: the encoder's own, 224 / 260);
                                    # the attention map is ceil(size / 32) a side
    alpha_c: float = 1.0            # doubly stochastic attention regularisation weight
    label_smoothing: float = 0.0
    scheduled_sampling: float = 0.0  # final probability of feeding the model's own word
    grad_clip: float = 5.0
    patience: int = 6               # stop after this many epochs without a better dev CIDEr
    finetune_encoder: bool = False
    finetune_blocks: int = 3        # last N encoder blocks (+ head) trained when fine-tuning
    encoder_lr: float = 1e-4
    finetune_cached: bool = False   # fine-tune on cached activations of the frozen blocks
    init_from: str | None = None    # start from this checkpoint's / model directory's weights
                                    # (not its optimizer); "default": the shipped model, "none":
                                    # fresh weights; None: "default" for a folder, else "none"
    cache_dir: str | None = None    # feature cache (default: OUT/../.feature-cache)
    shard_size: int = 1024          # images per shard of the disk feature cache
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast; CUDA only)
    seed: int = 0
    threads: int = 0                # torch threads (0: torch's default)
    progress: bool = True
    max_dev_images: int = 0         # 0: the whole dev split
    decoder: dict = field(default_factory=dict)  # DecoderConfig overrides (hidden_dim, ...)
    dev_fraction: float | None = None  # folder without a split column: share of dev photos

    def __post_init__(self):
        # Field names in the messages: `edgecap train` shows them as its flags.
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder}")
        if self.image_size is None:  # frozen: set once, here
            object.__setattr__(self, "image_size", encoder_spec(self.encoder).image_size)
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the encoder's stride), "
                             f"got {self.image_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.dev_fraction is not None:
            if self.dataset != "folder":
                raise ValueError("dev_fraction is for a folder of photos with a captions.csv "
                                 "or captions.jsonl (dataset folder)")
            if not 0 < self.dev_fraction < 1:
                raise ValueError(f"dev_fraction must be between 0 and 1, got {self.dev_fraction}")
        if self.finetune_cached and not self.finetune_encoder:
            raise ValueError("finetune_cached needs finetune_encoder")
        n_blocks = encoder_spec(self.encoder).n_blocks
        if self.finetune_encoder and not 1 <= self.finetune_blocks <= n_blocks:
            raise ValueError(f"finetune_blocks must be 1..{n_blocks} ({self.encoder} has "
                             f"{n_blocks} blocks), got {self.finetune_blocks}")


@dataclass(frozen=True)
class ScstConfig:
    checkpoint: str                 # cross-entropy checkpoint to start from (OUT/best)
    data: str
    out: str
    images: str | None = None
    dataset: str = "flickr8k"
    epochs: int = 5
    images_per_batch: int = 25
    n_samples: int = 5
    lr: float = 2e-5
    max_length: int = 16
    cache_dir: str | None = None
    seed: int = 0
    threads: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be at least 2 (each sample's baseline is the mean "
                             f"reward of the image's other samples), got {self.n_samples}")
