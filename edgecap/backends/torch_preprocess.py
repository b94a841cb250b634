"""The preprocessing on the torch backend's device (``TorchBackend(preprocess="device")``):
decoded RGB frames (uint8 (H, W, 3), any sizes) -> the encoder input (N, 3, H, W) float32 and
the blank-frame check, computed where the model runs. The encoder input is the host's
(``edgecap.preprocess``: Pillow's resize, then the multiply-add) bit for bit, so the captions are
the host path's; the host only stacks the frames of each size and uploads them as uint8.

Pillow resizes an 8-bit image in two passes, horizontal and vertical, in an order that depends
on the shapes and on Pillow's version (``vertical_first``). Each output pixel of a pass is a
weighted sum of input pixels in fixed point: the weights computed in float64 (the filter
stretched by the scale when shrinking, normalised to sum 1), rounded to multiples of 2^-22, the
sum rounded back to 8 bits and clipped before the next pass. ``bilinear_taps`` computes those
weights as Pillow does (its ``Resample.c``: the same formulas, the same order of float64
operations, so the same doubles), and the passes here add them up in int32, exactly as Pillow's
integers do (checked against Pillow 13.0, 12.3 and 12.1; not Pillow-SIMD, a fork that installs
as ``PIL`` with arithmetic of its own). Only Pillow's bilinear filter is
implemented (every shipped manifest's ``resample``). A Pillow built to contract a multiply-add
into one instruction (a compiler's choice, common on ARM) may round a weight 2^-22 apart from
this module's, a pixel then 1 level apart; not checked on a Jetson.

The blank-frame check (``edgecap.preprocess.recognisable``) is computed on the device too, from
the same encoder input, with float32 reductions in another order than numpy's: a frame within
float32 rounding of a threshold may be judged the other way (real photos sit far from them).
Written for CUDA, where the host's preprocessing of frames was the limit of captions/s (the H200
runs, ``benchmarks/results/gpu.md``); it runs on any torch device, and on the CPU the tests hold
it to the host's result. Not yet run on a GPU.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from edgecap.backends.staging import Staging
from edgecap.preprocess import (
    BLOCK,
    SCENE_SHARE,
    TOP_SHARE,
    WIDE_SHARE,
    Preprocessing,
    blurriness,
    judged_recognisable,
    metered_gain,
    model_input,
    percentile_rank,
)
from edgecap.trt import parse_version

# torch.OutOfMemoryError since torch 2.5 (the same class); torch.cuda's name since 1.13
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError
PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (32 - 8 - 2 bits)
SUPPORTED_RESAMPLE = ("bilinear",)
# the device's taps kept per (input size, output size), least recently used dropped beyond this
# (a service meets photos of ever new sizes; a camera, one)
TAPS_KEPT = 64


@functools.lru_cache(maxsize=64)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear resampling of one axis from ``in_size`` to ``out_size`` pixels, as
    taps: (index (out_size, K) int64, weight (out_size, K) int32), output pixel ``i`` being
    ``clip(sum_k in[index[i, k]] * weight[i, k] + 2^21 >> 22)``. K is Pillow's tap count for the
    scale; the taps past an output's own count read the last pixel with weight 0."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be at least 1, got {in_size} -> {out_size}")
    # Pillow: scale = (double)(in1 - in0) / outSize, the box (in0, in1) = (0, in_size) in float32
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # (int) in C truncates toward zero, as astype does
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < count[:, None]
    distance = np.abs(
        ((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    )
    weight = np.where(used & (distance < 1.0), 1.0 - distance, 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # Pillow's summation order
        total += weight[:, k]
    weight = np.divide(weight, total[:, None], out=weight, where=total[:, None] != 0.0)
    # the weights are never negative: (int)(0.5 + w * 2^22), truncated
    fixed = (0.5 + weight * float(1 << PRECISION_BITS)).astype(np.int64)
    index = np.minimum(taps[None, :] + xmin[:, None], in_size - 1)
    index.setflags(write=False)
    fixed = fixed.astype(np.int32)
    fixed.setflags(write=False)
    return index, fixed


def _pillow_version() -> tuple[int, int]:
    import PIL

    return parse_version(PIL.__version__)


PILLOW = _pillow_version()


def vertical_first(
    size: tuple[int, int], out_size: tuple[int, int], pillow: tuple[int, int] = PILLOW
) -> bool:
    """Whether Pillow ``pillow`` resizes (H, W) ``size`` to ``out_size`` vertical pass first (the
    order changes the pixels: each pass rounds to 8 bits). Pillow 13 does when the height shrinks
    by more than twice as many pixels as the width (its ``Resample.c``); 12.2 and 12.3 only for an
    image over 100 times taller than wide whose height shrinks (two calls, in ``Image.resize``);
    before 12.2, never."""
    (in_h, in_w), (out_h, out_w) = size, out_size
    if pillow >= (13, 0):
        return in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2
    if pillow >= (12, 2):
        return in_h > in_w * 100 and out_h < in_h
    return False


class FramePreprocess:
    """``Preprocessing`` on ``device``: ``__call__(frames, brighten) -> (encoder input (N, 3,
    H, W) float32, recognisable (N,) bool)``, both on the device (``brighten``: dark frames
    brightened first, as ``edgecap.preprocess.exposure_gain`` says)."""

    def __init__(self, pre: Preprocessing, device: torch.device, staging: Staging | None = None):
        if pre.resample not in SUPPORTED_RESAMPLE:
            raise ValueError(
                f"preprocess='device' implements Pillow's bilinear resize only; this model's "
                f"preprocessing.resample is {pre.resample!r} (use preprocess='host')"
            )
        self.pre, self.device = pre, device
        self.staging = staging  # None: each group stacked by np.stack and copied from there
        scale = 1.0 / np.asarray(pre.std, np.float32)
        offset = -np.asarray(pre.mean, np.float32) * scale
        self.scale = torch.from_numpy(scale).to(device).view(1, 3, 1, 1)
        self.offset = torch.from_numpy(offset).to(device).view(1, 3, 1, 1)
        self.std = torch.from_numpy(np.asarray(pre.std, np.float32)).to(device).view(1, 3, 1, 1)
        self._taps: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._taps_lock = threading.Lock()  # thread_safe backends: calls in several threads

    @torch.inference_mode()
    def __call__(
        self, frames: Sequence[np.ndarray], brighten: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.pre.size
        for i, frame in enumerate(frames):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame {i}: RGB uint8 (H, W, 3) expected, got {frame.dtype} {frame.shape}")
        out = torch.empty((len(frames), 3, h, w), dtype=torch.float32, device=self.device)
        gains = torch.ones(len(frames), dtype=torch.float32, device=self.device)
        by_shape: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(i)
        for members in by_shape.values():
            x, gain = self._inputs([frames[i] for i in members], brighten)
            if len(by_shape) == 1:  # frames of one size (a camera's): in order already
                out, gains = x.contiguous(), gain
            else:
                index = torch.from_numpy(np.asarray(members)).to(self.device)
                out.index_copy_(0, index, x)
                gains.index_copy_(0, index, gain)
        return out, self.recognisable(out, gains > 1)

    def _inputs(self, group: list[np.ndarray], brighten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames of one size -> (their encoder inputs (n, 3, h, w), their exposure gains (n,))
        on the device. Where the device runs out of memory for them (a batch of large frames on
        a small GPU), frame by frame; a frame it has no room for alone is preprocessed on the
        host (``edgecap.preprocess``, whose pixels these are): every frame gets its input, none
        fails the others."""
        try:  # no name here for the upload: it must not outlive a failed attempt (below)
            return self.normalised(self._upload(group), brighten)
        except OUT_OF_MEMORY:
            pass  # retried below: the error's traceback holds the failed attempt's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed attempt's blocks, for the smaller ones
        if len(group) > 1:
            xs, gains = zip(*(self._inputs([frame], brighten) for frame in group))
            return torch.cat(xs), torch.cat(gains)
        host, gain = model_input(Image.fromarray(group[0]), self.pre, brighten)
        return torch.from_numpy(host[None]).to(self.device), torch.full((1,), float(gain), device=self.device)

    def _upload(self, group: list[np.ndarray]) -> torch.Tensor:
        """Frames of one size -> uint8 (n, H, W, 3) on the device: through the kept buffers of
        ``staging`` (on CUDA), else stacked by ``np.stack`` and copied from there."""
        if self.staging is None:
            return torch.from_numpy(np.stack(group)).to(self.device)
        return self.staging.upload(self.staging.stack(group))

    def normalised(self, pixels: torch.Tensor, brighten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (n, H, W, 3) -> (the encoder input (n, 3, h, w) float32, resized and with the
        host's two roundings: the product, then the sum (``edgecap.preprocess``); each frame's
        exposure gain (n,), 1 unless brightened). ``brighten``: each dark frame's levels
        multiplied by its gain and capped at 255 first, as the host does (a gain of 1 changes
        no level)."""
        resized = self.resized(pixels)
        x = resized.permute(0, 3, 1, 2).to(torch.float32)
        gains = torch.ones(len(x), dtype=torch.float32, device=x.device)
        if brighten:
            gains = self.exposure_gains(resized)
            x.mul_(gains.view(-1, 1, 1, 1)).clamp_(max=255.0)
        return x.mul_(self.scale).add_(self.offset), gains

    def exposure_gains(self, resized: torch.Tensor) -> torch.Tensor:
        """uint8 (n, h, w, 3) at the model's size -> each frame's ``exposure_gain`` (n,) float32:
        the same levels (order statistics of integers) and the host's expression
        (``edgecap.preprocess.metered_gain``), so the same float32 gain."""
        bright = resized.amax(dim=3).reshape(len(resized), -1).to(torch.float32)
        n = bright.shape[1]
        # kthvalue's k counts from 1
        shares = (TOP_SHARE, SCENE_SHARE, WIDE_SHARE)
        levels = (bright.kthvalue(percentile_rank(n, share) + 1, dim=1).values for share in shares)
        return metered_gain(*levels)  # the host's rule, in float32

    def resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, H, W, 3) -> the model's size (n, h, w, 3), Pillow's pixels (uint8). Each
        pass reads 8-bit pixels and adds in int32 only the ones its taps select, so the device
        holds the frames as uploaded and int32 sums of the pass's output size, no more."""
        h, w = self.pre.size
        x = pixels
        passes = [(2, w), (1, h)]
        if vertical_first((x.shape[1], x.shape[2]), (h, w)):
            passes.reverse()
        for dim, size in passes:
            if x.shape[dim] != size:
                x = self._pass(x, dim, x.shape[dim], size)
        return x

    def _pass(self, x: torch.Tensor, dim: int, size: int, out_size: int) -> torch.Tensor:
        index, weight = self._device_taps(size, out_size)
        shape = [1] * x.dim()
        shape[dim] = out_size
        total = None
        for k in range(index.shape[1]):
            term = x.index_select(dim, index[:, k]).to(torch.int32).mul_(weight[:, k].view(shape))
            total = term if total is None else total.add_(term)
        assert total is not None  # at least 3 taps
        total = total.add_(1 << (PRECISION_BITS - 1)).bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)
        return total.to(torch.uint8)  # Pillow's 8 bits between the passes

    def _device_taps(self, size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (size, out_size)
        with self._taps_lock:
            taps = self._taps.get(key)
            if taps is not None:
                self._taps.move_to_end(key)
                return taps
        index, weight = bilinear_taps(size, out_size)
        taps = (
            torch.from_numpy(index.copy()).to(self.device),
            torch.from_numpy(weight.copy()).to(self.device),
        )
        with self._taps_lock:
            self._taps[key] = taps
            while len(self._taps) > TAPS_KEPT:
                self._taps.popitem(last=False)
        return taps

    def blurriness(self, x: torch.Tensor) -> torch.Tensor:
        """``edgecap.preprocess.blurriness`` of each encoder input in ``x`` (N, 3, H, W): (N,)
        float32, the host's expression on the device."""
        with torch.inference_mode():
            return blurriness((x * self.std).mean(1), torch)

    def recognisable(self, x: torch.Tensor, brightened: torch.Tensor) -> torch.Tensor:
        """``edgecap.preprocess.recognisable`` of each encoder input in ``x`` (N, 3, H, W);
        ``brightened`` (N,) bool: which were brightened (judged as such)."""
        grey = (x * self.std).mean(1)
        n, h, w = grey.shape[0], grey.shape[1] // BLOCK * BLOCK, grey.shape[2] // BLOCK * BLOCK
        grey = grey[:, :h, :w].reshape(n, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean((2, 4))
        spread = grey.reshape(n, -1).std(1, correction=0)
        laplacian = (
            4 * grey[:, 1:-1, 1:-1]
            - grey[:, :-2, 1:-1]
            - grey[:, 2:, 1:-1]
            - grey[:, 1:-1, :-2]
            - grey[:, 1:-1, 2:]
        )
        detail = laplacian.abs().reshape(n, -1).mean(1)
        return judged_recognisable(spread, detail, brightened)  # the host's rule, in float32
