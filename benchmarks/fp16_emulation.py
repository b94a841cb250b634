"""FP16 on a GPU, predicted on the CPU: the torch backend's FP16 variants run on torch's CPU FP16
kernels, and their captions compared with FP32's, photo by photo.

    python benchmarks/fp16_emulation.py --data ../shared/data [--flickr8k-limit 200] [--out DIR]

Each torch operation in FP16 rounds its output to FP16, on the CPU as on a GPU (both compute an
FP16 matrix product in FP32 and round the result), so the captions of the CPU's FP16 predict the
GPU's: on the first 200 Flickr8k dev photos this emulation gave the whole model in FP16 184/200
and the FP16 decoder behind the FP32 encoder 195/200 where the H200 gave 185 and 194
(``benchmarks/results/gpu.md``).
What it does not show: the GPU's own kernel choices (cuDNN's FP16 convolutions, cuBLAS's split
reductions), which only a GPU run measures (``benchmarks/gpu_check.py``).

Variants: the whole model in FP16 (``fp16=True, fp32_encoder=False``; labelled "fp16") and the FP16
decoder behind the FP32 encoder (``fp16=True``, the backend's default with FP16 since 2026-12-04,
which took ``fp32_encoder=True`` before; "fp16 + fp32_encoder"), with the backend's FP32 islands,
each also with the word logits left in FP16 (``fp32_logits=False``: the islands before the
word-logit projection joined them). The reference is the FP32 torch backend on the same photos,
with the same options (beam 3, batch 8, the default decoding). Photos: coco-ood-dev and
coco-ood-dev-b (160 everyday photos) and the first ``--flickr8k-limit`` Flickr8k dev photos, read
from ``--data`` (research data: read here, never a fixture or a shipped file). The share identical
comes with a 95% interval from resampling the photos, and each variant without the word-logit
island against the one with it as a paired bootstrap of the per-photo "identical" (10,000
resamples, ``_stats.paired_bootstrap``). The backend refuses FP16 on the CPU (slow and not what it
is for), so this script builds the FP16 backends through ``TorchBackend._setup``.

``--tf32``: instead, the encoder's convolutions as TF32 tensor cores compute them (the weights
and each input rounded to 10 mantissa bits, ties to even; the products summed in FP32), which
PyTorch allows cuDNN by default on Ampere and later GPUs and the torch backend turns off
(``torch_graphs.ieee_fp32``): would they keep the captions, for the encoder's speed? Variants
(``TF32_VARIANTS``): the FP32 model with its convolutions in TF32 but the depthwise ones (what
PyTorch does in NCHW: its depthwise FP32 convolutions run in a kernel of its own; cuDNN gets
them only in FP16 or channels-last), with the depthwise ones too, and the FP16 decoder behind
that encoder; written as ``tf32_emulation.json`` / ``.md``. A prediction as the FP16 one is:
how a GPU's kernels round TF32 (to nearest, or by dropping the low bits) is not documented, and
dropping them keeps fewer captions than rounding (319 of 360 against 341 in a one-off run on the
AMD EPYC, every convolution in TF32).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

# label -> TorchBackend._setup keywords
VARIANTS = {
    "fp16": {"fp32_encoder": False, "fp32_logits": True},
    "fp16, word logits FP16": {"fp32_encoder": False, "fp32_logits": False},
    "fp16 + fp32_encoder": {"fp32_encoder": True, "fp32_logits": True},
    "fp16 + fp32_encoder, word logits FP16": {"fp32_encoder": True, "fp32_logits": False},
}
# ``--tf32``: label -> (FP16 decoder behind the encoder?, which convolutions take TF32 inputs:
# "dense", every one but the depthwise ones, as PyTorch runs FP32 NCHW convolutions on CUDA (its
# depthwise ones in a kernel of its own, cuDNN's only for FP16 or channels-last); "all")
TF32_VARIANTS = {
    "tf32 convolutions, depthwise in FP32": (False, "dense"),
    "tf32 convolutions, depthwise too": (False, "all"),
    "fp16 + tf32 encoder (depthwise in FP32)": (True, "dense"),
}
SETS = ("coco-ood-dev", "coco-ood-dev-b", "flickr8k-dev")


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder holding coco-ood-dev/, coco-ood-dev-b/ and flickr8k/",
    )
    p.add_argument("--flickr8k-limit", type=int, default=200, help="the first N Flickr8k dev photos")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="the encoder's convolutions in TF32 instead (TF32_VARIANTS; tf32_emulation.json / .md)",
    )
    p.add_argument(
        "--batch-norms",
        choices=("folded", "apart"),
        default="folded",
        help="the FP32 encoders' BatchNorms folded into their convolutions, as the torch backend "
        "runs them by default, or apart, as exported and as it ran them until 2026-12-07 (default: folded)",
    )
    C.add_out_argument(p)
    return p


def photo_sets(data: Path, flickr8k_limit: int) -> dict[str, list[Path]]:
    """{set name: photo paths}, each set in a fixed order."""
    missing = [data / d for d in ("coco-ood-dev", "coco-ood-dev-b", "flickr8k") if not (data / d).is_dir()]
    if missing:
        raise SystemExit(f"fp16_emulation: no such folder: {', '.join(map(str, missing))}")
    sets = {name: C.image_files(data / name / "images", None) for name in SETS[:2]}
    dev = data / "flickr8k" / "Flickr_8k.devImages.txt"
    names = [x.strip() for x in dev.read_text().splitlines() if x.strip()][:flickr8k_limit]
    sets["flickr8k-dev"] = [data / "flickr8k" / "images" / name for name in names]
    return sets


def frames(paths: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def fp32_captioner(model: Path, fold: bool = True):
    """The reference: the FP32 torch backend on the CPU, the device search (as on CUDA), beam 3,
    batch 8, its encoder's BatchNorms folded (``fold``) or apart; the variants are made from it."""
    from edgecap import Captioner

    return Captioner(
        model,
        backend="torch",
        device="cpu",
        search="device",
        beam_size=3,
        batch_size=8,
        fold_batch_norms=fold,
    )


def fp16_captioner(model: Path, keywords: dict, fold: bool = True):
    """A CPU Captioner whose torch backend runs in FP16 (the device search, as on CUDA), an FP32
    encoder's BatchNorms folded as the backend folds them by default (``fold``) or apart."""
    from edgecap.backends.torch import TorchBackend
    from edgecap.backends.torch_search import TorchDeviceSearch

    captioner = fp32_captioner(model, fold)
    backend = captioner.backend
    backend._setup(
        *TorchBackend._build(backend.manifest), "cpu", fp16=True, fold_batch_norms=fold, **keywords
    )
    backend.device_search = TorchDeviceSearch(backend)
    return captioner


def to_tf32(x):
    """float32 tensor -> the same values rounded to TF32 (10 mantissa bits, round to nearest,
    ties to even), still float32: what a GPU's TF32 tensor cores take of an FP32 operand."""
    import torch

    bits = x.detach().contiguous().view(torch.int32)
    rounded = (bits + (0xFFF + ((bits >> 13) & 1))) & ~0x1FFF
    return rounded.view(torch.float32).reshape(x.shape)


def tf32_convolutions(encoder, depthwise: bool) -> int:
    """The encoder's convolutions as TF32 tensor cores compute them: their weights rounded to
    TF32 (in place) and their inputs rounded as they arrive, the products summed in FP32; the
    depthwise ones (a channel a group) too only where ``depthwise``. -> how many."""
    import types

    import torch

    from edgecap.models.efficientnet_lite import SameConv2d

    def rounded_input(self, x, forward=SameConv2d.forward):
        return forward(self, to_tf32(x))

    n = 0
    for module in encoder.modules():
        if isinstance(module, SameConv2d) and (depthwise or module.groups == 1):
            with torch.no_grad():
                module.weight.copy_(to_tf32(module.weight))
            module.forward = types.MethodType(rounded_input, module)
            n += 1
    return n


def tf32_captioner(model: Path, fp16: bool, which: str, fold: bool = True):
    """A CPU Captioner whose encoder's convolutions are TF32 (``tf32_convolutions``): the FP32
    torch backend, or (``fp16``) the FP16 decoder behind it."""
    if fp16:
        captioner = fp16_captioner(model, {"fp32_encoder": True, "fp32_logits": True}, fold)
    else:
        captioner = fp32_captioner(model, fold)
    assert tf32_convolutions(captioner.backend.encoder, depthwise=which == "all") > 0
    return captioner


def caption(captioner, photos: dict[str, list[np.ndarray]]) -> tuple[dict[str, list[str]], float]:
    t0 = time.perf_counter()
    texts = {name: [c.text for c in captioner.caption_batch(fs)] for name, fs in photos.items()}
    return texts, time.perf_counter() - t0


def interval(identical: np.ndarray, n_resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the share identical, resampling the photos."""
    rng = np.random.default_rng(seed)
    means = identical[rng.integers(0, len(identical), size=(n_resamples, len(identical)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help and a bad option need no torch

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = C.model_dir(args.model)
    sets = photo_sets(args.data, args.flickr8k_limit)
    photos = {name: frames(paths) for name, paths in sets.items()}
    names = {name: [p.name for p in paths] for name, paths in sets.items()}
    fold = args.batch_norms == "folded"
    fp32 = fp32_captioner(model, fold)
    reference, seconds = caption(fp32, photos)
    print(f"fp32: {seconds:.1f} s", file=sys.stderr)
    results: dict[str, dict] = {}
    variants = TF32_VARIANTS if args.tf32 else VARIANTS
    kind = "TF32" if args.tf32 else "FP16"  # what the variants change, as the report names it
    for label, keywords in variants.items():
        built = tf32_captioner(model, *keywords, fold) if args.tf32 else fp16_captioner(model, keywords, fold)
        texts, seconds = caption(built, photos)
        same = {name: [a == b for a, b in zip(texts[name], reference[name])] for name in SETS}
        every = np.array([x for name in SETS for x in same[name]], dtype=np.float64)
        results[label] = {
            "keywords": keywords
            if isinstance(keywords, dict)
            else {"fp16": keywords[0], "tf32": keywords[1]},
            "seconds": round(seconds, 1),
            "identical": {name: int(sum(same[name])) for name in SETS},
            "identical_all": int(every.sum()),
            "n": len(every),
            "interval": interval(every),
            "per_photo": every.tolist(),
            "differing": [
                {"set": name, "photo": photo, "fp32": b, kind.lower(): a}
                for name in SETS
                for photo, a, b in zip(names[name], texts[name], reference[name])
                if a != b
            ],
        }
        print(f"{label}: {int(every.sum())}/{len(every)} identical ({seconds:.1f} s)", file=sys.stderr)
    for label, r in results.items():
        island = label.removesuffix(", word logits FP16")
        if island != label:
            r["against_island"] = paired_bootstrap(results[island]["per_photo"], r["per_photo"])
    n = {name: len(v) for name, v in sets.items()}
    rows = []
    for label, r in results.items():
        low, high = r["interval"]
        diff = r.get("against_island")
        rows.append(
            [
                label,
                *[f"{r['identical'][name]}/{n[name]}" for name in SETS],
                f"{r['identical_all']}/{r['n']} ({100 * r['identical_all'] / r['n']:.1f}%)",
                f"[{100 * low:.1f}%, {100 * high:.1f}%]",
                "-"
                if diff is None
                else f"{100 * diff['difference']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]",
            ][: None if not args.tf32 else -1]  # the word-logit island: FP16's only
        )
    table = C.markdown_table(
        [
            f"{kind} variant (CPU emulation)",
            *[f"{name} identical" for name in SETS],
            "all",
            "95% interval",
            "vs word logits FP32 (points)",
        ][: None if not args.tf32 else -1],
        rows,
    )
    differing = "\n".join(
        f'- {label} / {d["set"]} {d["photo"]}: FP32 "{d["fp32"]}"; {kind} "{d[kind.lower()]}"'
        for label, r in results.items()
        for d in r["differing"]
    )
    markdown = (
        ("The encoder's convolutions with TF32 inputs (`--tf32`). " if args.tf32 else "")
        + f"Model: {model.name}; beam 3, batch 8, default decoding, the device search; captions "
        f"against the FP32 torch backend's on the same photos (torch {torch.__version__}, CPU); "
        f"FP32 encoders with their BatchNorms folded: {fp32.backend.batch_norms_folded}.\n\n"
        f"{table}\n\nCaptions that differ:\n\n{differing or '(none)'}\n"
    )
    for r in results.values():
        del r["per_photo"]
    data = {"model": str(model), "variants": results}
    name = "tf32_emulation" if args.tf32 else "fp16_emulation"
    C.write_results(name, data, markdown, argv, script="fp16_emulation", out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
