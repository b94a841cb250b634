"""Tags as a decoder input (``DecoderConfig.tag_rank``, ``edgecap train --tag-rank``): the
encoder's class probabilities, projected and added to every region's features inside the
encoder graph, so every backend runs it with the model contract unchanged."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from helpers import tiny_train_config  # noqa: E402
from test_train import tiny_dataset  # noqa: E402, F401  (the fixture)


def _tiny_decoder(**sizes):
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig

    torch.manual_seed(0)
    base = {"vocab_size": 40, "feature_dim": 16, "attention_dim": 8, "embed_dim": 8, "hidden_dim": 12}
    return CaptionDecoder(DecoderConfig(**{**base, **sizes})).eval()


def test_a_decoder_given_tags_says_what_it_said_until_trained_then_hears_them():
    from edgecap.training.grow import add_tag_input

    plain = _tiny_decoder()
    tagged = add_tag_input(plain, 4, 30, torch.Generator().manual_seed(1)).eval()
    fmap = torch.randn(2, 5, 1280)
    probs = torch.softmax(torch.randn(2, 30), 1)
    with torch.no_grad():
        # every old weight kept and the new input starting at zero: the same state, any tags
        for a, b in zip(plain.init_state(fmap), tagged.init_state(fmap, probs)):
            assert torch.equal(a, b)
        # once the up projection has moved, other tags give other features
        tagged.tag_up.weight.normal_()
        other = torch.softmax(torch.randn(2, 30), 1)
        assert not torch.allclose(tagged.init_state(fmap, probs)[0], tagged.init_state(fmap, other)[0])
    with pytest.raises(ValueError, match="class probabilities"):
        tagged.init_state(fmap)  # no silent run without its input
    # the down projection starts as nn.Linear would (uniform in +-1/sqrt(30), about 0.18):
    # within the bound and spread across it, not of another scale
    down = tagged.tag_down.weight
    assert down.shape == (4, 30) and down.abs().max() <= 30**-0.5 and down.abs().max() > 0.15


def test_a_decoder_without_tag_input_keeps_its_sizes_record_unchanged():
    """Models made before the tag input existed are re-exported byte for byte: their sizes
    record (manifest decoder_config, checkpoint.json) gains no key."""
    assert set(_tiny_decoder().cfg.to_dict()) == {
        "vocab_size",
        "encoder_dim",
        "feature_dim",
        "attention_dim",
        "embed_dim",
        "hidden_dim",
        "dropout",
        "attention",
        "top_k",
    }
    assert _tiny_decoder(tag_rank=3, n_classes=7).cfg.to_dict()["tag_rank"] == 3


def test_text_tags_name_a_class_of_the_captions_own_words():
    from edgecap.training.text_mix import TextTags

    # classes 0 and 1 are named by word 5, class 3 by word 7, class 2 by none
    tags = TextTags(((5,), (5, 6), (), (7,)), torch.full((4,), 0.25), "seed")
    caps = torch.tensor([[1, 7, 9, 2], [1, 9, 9, 2], [1, 5, 9, 2]])
    rows = [tags(caps) for _ in range(40)]
    for probs in rows:
        assert torch.allclose(probs.sum(1), torch.ones(3))
        low, high = TextTags.MASS
        assert 0.25 * (1 - low) + low - 1e-6 <= probs[0, 3] <= 0.25 * (1 - high) + high + 1e-6
        assert torch.equal(probs[1], torch.full((4,), 0.25))  # no class word: the background
        assert int(probs[2].argmax()) in (0, 1) and probs[2, 2] < 0.25  # word 5 names 0 or 1
    # the named class's share m, drawn from 0.3-0.95 (docs/everyday-photos.md): its probability
    # is 0.25 (1 - m) + m, so m = (p - 0.25) / 0.75; 40 draws spread over that range
    masses = [(float(probs[0, 3]) - 0.25) / 0.75 for probs in rows]
    assert 0.3 - 1e-6 <= min(masses) < 0.45 and 0.8 < max(masses) <= 0.95 + 1e-6
    assert {int(p[2].argmax()) for p in rows} == {0, 1}  # either of the word's classes


def test_the_text_tags_background_is_the_train_photos_mean_class_probabilities():
    """A text caption gets the train photos' mean class probabilities as its background (the
    rest of its tags): a distribution over the classes, as a photo's tags are, of the photos
    the run trains on (rows 3, 0 and 2 of the cache here, not row 1)."""
    from edgecap.training.train import _text_tags
    from edgecap.vocab import Vocabulary

    class Classifier:  # a photo's class probabilities: its one region's values
        _fc = torch.nn.Linear(1, 1000)

        def region_class_probs(self, fmap):
            return fmap[:, 0]

    maps = np.zeros((4, 1, 1000), np.float32)
    for row, cls in enumerate((7, 5, 3, 9)):
        maps[row, 0, cls] = 1.0
    vocab = Vocabulary.build(["a dog"], 1)
    tags = _text_tags(Classifier(), maps, [3, 0, 2], vocab, "cpu", seed=0)
    expected = torch.zeros(1000)
    expected[[9, 7, 3]] = 1 / 3
    torch.testing.assert_close(tags.background, expected)


def test_the_tags_ride_inside_the_exported_encoder_graph_on_every_backend(tmp_path, example_images):
    """An exported decoder with tag input keeps the model contract (the same graph inputs and
    outputs): the ONNX encoder graph adds the projected tags (its features move when the up
    projection does), and the onnxruntime and PyTorch backends caption alike."""
    from edgecap import Captioner
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend
    from edgecap.build.export import export_modules
    from edgecap.images import load_rgb
    from edgecap.manifest import load_manifest
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.preprocess import Preprocessing, to_model_input
    from edgecap.training.grow import add_tag_input
    from edgecap.vocab import Vocabulary
    from helpers import TINY_CAPTIONS

    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    plain = _tiny_decoder(vocab_size=len(vocab))
    tagged = add_tag_input(plain, 8, 1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        tagged.tag_up.weight.normal_(0, 2.0)
    encoder = load_pretrained()
    model = tmp_path / "tagged"
    export_modules(encoder, tagged, vocab, Preprocessing(), model, {"name": "tagged"})
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["decoder_config"]["tag_rank"] == 8
    assert set(manifest["dims"]) == {  # the contract's sizes: no new graph input or output
        "regions",
        "feature_dim",
        "attention_dim",
        "hidden_dim",
        "vocab_size",
        "top_k",
        "n_classes",
        "encoder_dim",
        "embed_dim",
    }

    image = np.stack([to_model_input(load_rgb(example_images[0]), Preprocessing())])
    encoded = OnnxRuntimeBackend(load_manifest(model)).encode(image)
    # each region's features are the plain decoder's, moved by the projection of this photo's
    # class probabilities
    with torch.no_grad():
        regions = encoder.regions(torch.from_numpy(image))
        plain_features = plain.init_state(regions)[0].numpy()
        moved = tagged.tag_up(tagged.tag_down(torch.from_numpy(encoded.class_probs))).numpy()
    assert np.abs(moved).max() > 0.05
    np.testing.assert_allclose(encoded.tensors["features"], plain_features + moved[:, None, :], atol=1e-4)

    photos = [str(p) for p in example_images]
    ort = [c.text for c in Captioner(model, backend="onnxruntime").caption_batch(photos)]
    pt = [c.text for c in Captioner(model, backend="torch").caption_batch(photos)]
    assert ort == pt


def test_train_with_tag_rank_gives_the_decoder_tags_and_the_text_its_own(tiny_dataset, tmp_path):  # noqa: F811
    """``--tag-rank`` on a model without tag input adds it (the run's log says so), trains it
    from zero on the photos' tags and the text batches' tags, and the checkpoint exports."""
    from edgecap import Captioner
    from edgecap.build.export import export_model
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    first = train(tiny_train_config(tiny_dataset, tmp_path / "a", epochs=1), log=lambda *_: None)
    text = tmp_path / "captions.txt"
    text.write_text("a cat on a mat\n" * 6 + "a cup of coffee\n" * 6)
    logs: list[str] = []
    cfg = tiny_train_config(
        tiny_dataset, tmp_path / "b", epochs=2, lr=1e-2, text=str(text), text_share=0.5, tag_rank=4
    )
    cfg = dataclasses.replace(cfg, init_from=str(first))
    best = train(cfg, log=logs.append)
    assert "tags as an input: the encoder's 1000 class probabilities at rank 4" in logs
    _, decoder, _, _, _ = load_checkpoint(best)
    assert decoder.cfg.tag_rank == 4 and decoder.tag_up.weight.abs().max() > 0
    manifest = export_model(best, tmp_path / "model")
    assert manifest.info["decoder_config"]["tag_rank"] == 4
    caption = Captioner(tmp_path / "model", backend="onnxruntime").caption(
        str(tiny_dataset / "images" / "chelsea.png")
    )
    assert caption.text

    # a decoder that has tags at one rank is not silently given another
    from edgecap.errors import ModelError

    with pytest.raises(ModelError, match="rank 4, not --tag-rank 8"):
        again = tiny_train_config(tiny_dataset, tmp_path / "c", epochs=1, tag_rank=8)
        train(dataclasses.replace(again, init_from=str(best)), log=lambda *_: None)


def test_tag_rank_with_scst_from_is_refused(monkeypatch, capsys):
    """SCST trains the checkpoint's decoder as it is: --tag-rank with --scst-from is an error
    (exit 2, before any training), not a run that quietly leaves the tags out."""
    from edgecap.cli import main
    from edgecap.training import scst

    called = []
    monkeypatch.setattr(scst, "train_scst", lambda cfg, **_: called.append(cfg))
    argv = ["train", "--data", "DATA", "--out", "RUN", "--scst-from", "CK", "--tag-rank", "8"]
    assert main([*argv, "--no-progress"]) == 2
    assert called == []
    assert "--tag-rank" in capsys.readouterr().err


def test_text_tags_with_a_fine_tuned_encoder(tiny_dataset, tmp_path):  # noqa: F811
    """--tag-rank and --text with --finetune-encoder: the text tags' background comes from the
    photos' regions (the cached maps go through the tuned blocks first), and the run trains."""
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    text = tmp_path / "captions.txt"
    text.write_text("a cat on a mat\n" * 6 + "a cup of coffee\n" * 6)
    cfg = tiny_train_config(
        tiny_dataset, tmp_path / "run", epochs=1, lr=1e-2, text=str(text), text_share=0.5, tag_rank=4
    )
    best = train(dataclasses.replace(cfg, finetune_encoder=True, finetune_blocks=1), log=lambda *_: None)
    _, decoder, _, _, _ = load_checkpoint(best)
    assert decoder.cfg.tag_rank == 4 and decoder.tag_up.weight.abs().max() > 0


def test_a_resumed_tagged_text_run_draws_each_epochs_text_tags_again(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    """The text batches' tags of an epoch depend on the seed and the epoch alone, as the rest of
    its randomness does: a run resumed after epoch 1 gives epoch 2's text the tags that a run
    without the stop gave it."""
    from edgecap.training import train as train_module

    text = tmp_path / "captions.txt"
    text.write_text("a cat on a mat\n" * 6 + "a cup of coffee\n" * 6)
    real = train_module.text_loss
    seen: list[torch.Tensor] = []

    def recorded(decoder, no_image, caps, label_smoothing, class_probs=None):
        seen.append(class_probs.detach().cpu().clone())
        return real(decoder, no_image, caps, label_smoothing, class_probs)

    monkeypatch.setattr(train_module, "text_loss", recorded)

    def run(out, epochs):
        cfg = tiny_train_config(
            tiny_dataset, out, epochs=epochs, lr=1e-2, text=str(text), text_share=0.5, tag_rank=4
        )
        train_module.train(cfg, log=lambda *_: None)

    run(tmp_path / "whole", 2)
    whole, seen[:] = list(seen), []
    run(tmp_path / "stopped", 1)
    first, seen[:] = list(seen), []
    run(tmp_path / "stopped", 2)  # resumed from its OUT/last
    assert len(first) + len(seen) == len(whole) and len(seen) > 0
    # not the background alone: a caption that names a class gets a tag of its own
    assert any(not torch.equal(probs, probs[:1].expand_as(probs)) for probs in seen)
    for got, want in zip(first + seen, whole):
        torch.testing.assert_close(got, want)


def test_the_tag_projections_learn_faster_than_the_decoder(tiny_dataset, tmp_path):  # noqa: F811
    """docs/training.md: the projections learn TAG_LR_SCALE (10) times faster than the rest of
    the decoder. Adam moves a weight by about the learning rate a step at the most, so after
    a few steps at the decoder's own rate the up projection (zero at first) would be within
    about steps x lr of zero; it is well past that."""
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    lr = 1e-3
    train(tiny_train_config(tiny_dataset, tmp_path / "run", epochs=1, lr=lr, tag_rank=4), log=lambda *_: None)
    steps = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    _, decoder, _, _, _ = load_checkpoint(tmp_path / "run" / "last")
    assert float(decoder.tag_up.weight.abs().max()) > 3 * len(steps) * lr


def test_the_tag_input_is_asked_for_by_tag_rank_alone(tmp_path):
    """``TrainConfig(decoder={"tag_rank": ...})`` is refused when made (it crashed the run's
    start with a duplicate keyword); ``tag_rank`` is the one way to ask for the input."""
    from edgecap.training.config import TrainConfig

    with pytest.raises(ValueError, match="set by tag_rank"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), decoder={"tag_rank": 4})
    assert TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), tag_rank=4).tag_rank == 4


def test_a_start_with_tags_at_another_rank_is_refused(tmp_path):
    """--tag-rank gives tags to a starting model without them; a start that has them at another
    rank is refused, saying how to keep its own (not a ValueError from the start's copy of its
    decoder); the same rank, or none given, keeps them."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.errors import ModelError
    from edgecap.models.checkpoint import save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.preprocess import Preprocessing
    from edgecap.training.start import initial_model
    from edgecap.training.train import TrainConfig
    from edgecap.vocab import Vocabulary

    captions = ["a cat sat on the mat", "a dog ran in the park today"]
    vocab = Vocabulary.build(captions, min_count=1)
    sizes = {"hidden_dim": 16, "feature_dim": 16, "embed_dim": 8, "attention_dim": 8}
    tagged = CaptionDecoder(DecoderConfig(len(vocab), **sizes, tag_rank=4, n_classes=1000))
    start = tmp_path / "start" / "best"
    save_checkpoint(start, tagged, vocab, Preprocessing(), {})
    items = [CaptionedImage("a.png", captions[:1]), CaptionedImage("b.png", captions[1:])]
    last = tmp_path / "run" / "last"
    for rank in (8, 4, 0):
        cfg = TrainConfig(
            data=str(tmp_path),
            out=str(tmp_path / "run"),
            dataset="folder",
            init_from=str(start),
            min_word_count=1,
            tag_rank=rank,
        )
        if rank == 8:
            with pytest.raises(
                ModelError, match="takes tags at rank 4, not --tag-rank 8; leave --tag-rank out"
            ):
                initial_model(cfg, items, last, log=lambda _: None)
        else:
            assert initial_model(cfg, items, last, log=lambda _: None).decoder.cfg.tag_rank == 4


def test_a_run_begun_without_tags_is_not_resumed_with_them(tiny_dataset, tmp_path):  # noqa: F811
    """Adding --tag-rank to a resumed run is refused with what to do instead (its optimizer state
    has no tag input's; it failed at the optimizer restore, blaming the optimizer files)."""
    from edgecap.errors import ModelError
    from edgecap.training.train import train

    train(tiny_train_config(tiny_dataset, tmp_path / "run", epochs=1), log=lambda *_: None)
    with pytest.raises(ModelError, match="cannot add; start another --out from it"):
        train(tiny_train_config(tiny_dataset, tmp_path / "run", epochs=2, tag_rank=4), log=lambda *_: None)
