"""The torch backend's ``channels_last=True``: the encoder's convolutions in channels-last (NHWC)
memory, the same features within float rounding and the same captions."""

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
    np.testing.assert_allclose(got.class_probs, want.class_probs, atol=1e-6)


def test_a_channels_last_captioner_captions_as_the_default(default_model_dir, example_images):
    photos = [str(p) for p in example_images]
    want = Captioner(default_model_dir, backend="torch", device="cpu").caption_batch(photos)
    got = Captioner(default_model_dir, backend="torch", device="cpu", channels_last=True).caption_batch(
        photos
    )
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)
