"""The torch backend's forms of the encoder: ``channels_last=True`` (its convolutions in
channels-last (NHWC) memory) and ``fold_batch_norms`` (the default: its BatchNorms folded into
its convolutions), each the same features within float rounding and the same captions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.torch import TorchBackend  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from edgecap.images import load_rgb, preprocess  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402

NHWC = torch.channels_last


@pytest.mark.parametrize("graphs", [False, True])
def test_a_channels_last_encoder_gives_the_encoder_outputs_of_the_default(
    default_model_dir, example_images, graphs
):
    """The layout reaches the convolutions (the stem's weight, and the image every
    convolution of the first block reads, are NHWC), eager and through graphs (the CPU
    stand-in); the outputs are the default layout's within float rounding."""
    manifest = load_manifest(default_model_dir)
    factory = EagerGraph if graphs else None
    plain = TorchBackend(manifest, device="cpu", graph_factory=factory)
    nhwc = TorchBackend(manifest, device="cpu", graph_factory=factory, channels_last=True)
    assert nhwc.channels_last and "channels-last encoder" in nhwc.describe()
    assert nhwc.encoder._conv_stem.weight.is_contiguous(memory_format=NHWC)
    layouts = []
    for conv in (nhwc.encoder._conv_stem, *nhwc.encoder._blocks[0].modules()):
        if isinstance(conv, torch.nn.Conv2d):
            conv.register_forward_pre_hook(
                lambda _m, a: layouts.append(a[0].is_contiguous(memory_format=NHWC))
            )
    batch = preprocess([load_rgb(str(p)) for p in example_images], manifest.preprocessing)
    want, got = plain.encode(batch), nhwc.encode(batch)
    assert layouts and all(layouts)
    for name, tensor in want.tensors.items():
        torch.testing.assert_close(got.tensors[name], tensor, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(got.class_probs, want.class_probs, atol=5e-6)


def test_a_channels_last_captioner_captions_as_the_default(default_model_dir, example_images):
    photos = [str(p) for p in example_images]
    want = Captioner(default_model_dir, backend="torch", device="cpu").caption_batch(photos)
    got = Captioner(default_model_dir, backend="torch", device="cpu", channels_last=True).caption_batch(
        photos
    )
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)


def _batch_norms(module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize("graphs", [False, True])
def test_the_default_encoder_runs_with_its_batch_norms_folded(default_model_dir, example_images, graphs):
    """By default the FP32 encoder the backend runs has no BatchNorm left (49 in the shipped
    Lite0), eager and through graphs, also channels-last; its outputs are those of the encoder
    as exported (``fold_batch_norms=False``) within float rounding."""
    manifest = load_manifest(default_model_dir)
    factory = EagerGraph if graphs else None
    unfolded = TorchBackend(manifest, device="cpu", graph_factory=factory, fold_batch_norms=False)
    assert not unfolded.batch_norms_folded and _batch_norms(unfolded.encoder) == 49
    assert "encoder BatchNorms apart" in unfolded.describe()
    batch = preprocess([load_rgb(str(p)) for p in example_images], manifest.preprocessing)
    want = unfolded.encode(batch)
    for layout in ({}, {"channels_last": True}):
        folded = TorchBackend(manifest, device="cpu", graph_factory=factory, **layout)
        assert folded.batch_norms_folded and _batch_norms(folded.encoder) == 0
        assert "BatchNorms" not in folded.describe()
        got = folded.encode(batch)
        for name, tensor in want.tensors.items():
            torch.testing.assert_close(got.tensors[name], tensor, rtol=1e-3, atol=2e-4)
        np.testing.assert_allclose(got.class_probs, want.class_probs, atol=5e-6)


@pytest.mark.parametrize(
    "fp32_encoder, fold, folded",
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_an_fp16_decoder_folds_only_an_fp32_encoder(default_model_dir, fp32_encoder, fold, folded):
    """With FP16 (built as the FP16 emulation builds it: the backend refuses FP16 on the CPU)
    the FP32 encoder behind the FP16 decoder is folded, the whole model in FP16 keeps its
    BatchNorms (its FP16 rounding as measured), and ``fold_batch_norms=False`` folds none."""
    backend = TorchBackend(load_manifest(default_model_dir), device="cpu")
    backend._setup(
        *TorchBackend._build(backend.manifest),
        "cpu",
        fp16=True,
        fp32_encoder=fp32_encoder,
        fold_batch_norms=fold,
    )
    assert backend.batch_norms_folded is folded
    assert _batch_norms(backend.encoder) == (0 if folded else 49)
    assert backend.encoder._conv_head.weight.dtype == (torch.float32 if fp32_encoder else torch.float16)


def test_a_folded_captioner_captions_as_the_encoder_as_exported(default_model_dir, example_images):
    photos = [str(p) for p in example_images]
    want = Captioner(default_model_dir, backend="torch", device="cpu", fold_batch_norms=False).caption_batch(
        photos
    )
    got = Captioner(default_model_dir, backend="torch", device="cpu").caption_batch(photos)
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)


def test_a_backend_from_modules_uses_the_encoder_it_is_given(default_model_dir):
    """``TorchBackend.from_modules`` (training's dev check) runs the modules in memory as they
    are: the encoder being trained, its BatchNorms and all, not a folded copy of it."""
    encoder, decoder = TorchBackend._build(load_manifest(default_model_dir))
    backend = TorchBackend.from_modules(encoder, decoder)
    assert backend.encoder is encoder and _batch_norms(encoder) == 49
    assert not backend.batch_norms_folded
