"""The PyTorch modules' rules that every exported model carries (``edgecap.models``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgecap.models import decoder as decoder_module  # noqa: E402
from edgecap.models.decoder import CaptionDecoder, mask_logits  # noqa: E402
from edgecap.models.config import DecoderConfig  # noqa: E402
from edgecap.models.graphs import StepGraph  # noqa: E402

PAD, START, END, UNK = 0, 1, 2, 3  # the Vocabulary's fixed special ids


def test_the_step_never_outputs_pad_start_or_unk():
    """Even where the model favours them most, <pad>, <start> and <unk> never reach the top K."""
    torch.manual_seed(0)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=30, hidden_dim=16, feature_dim=8, embed_dim=8, attention_dim=8, top_k=10)
    ).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[[PAD, START, UNK]] = 50.0  # the favourites, by far
        rows, regions = 4, 5
        args = (
            torch.randint(4, 30, (rows,), dtype=torch.int32),
            torch.randn(rows, 16),
            torch.randn(rows, 16),
            torch.arange(rows, dtype=torch.int32),
            torch.randn(2, regions, 8),
            torch.randn(2, regions, 8),
            torch.tensor([0, 0, 1, 1], dtype=torch.int32),
            torch.zeros(rows, 30),
        )
        values, ids, *_ = StepGraph(decoder)(*args)
    assert not set(ids.flatten().tolist()) & {PAD, START, UNK}
    assert torch.isfinite(values).all()


def test_mask_logits_bans_end_only_as_the_first_word():
    logits = torch.zeros(2, 8)
    later, first = mask_logits(logits), mask_logits(logits, first_word=True)
    assert later[:, [PAD, START, UNK]].max() < -1e3 and later[:, END].min() == 0
    assert first[:, [PAD, START, END, UNK]].max() < -1e3
    assert later[:, 4:].eq(0).all() and first[:, 4:].eq(0).all()  # every other word untouched


def test_mask_logits_backpropagates_after_a_step_under_inference_mode(monkeypatch):
    """Self-critical training samples with autograd after its dev check ran the backend's step
    under ``torch.inference_mode`` (which fills the kept masks): autograd saves the mask for
    backward, which it may not do with a tensor made in inference mode. Logits all 0 over 8
    words, 5 of them allowed: d log p(4) / d logit is 1 - 1/5 at word 4, -1/5 at the other
    allowed words (2, 5, 6, 7) and 0 at the floored ones (<pad>, <start>, <unk>)."""
    monkeypatch.setattr(decoder_module, "_MASKS", {})
    with torch.inference_mode():
        mask_logits(torch.zeros(2, 8))  # as the backend's step does first
    logits = torch.zeros(1, 8, requires_grad=True)
    torch.log_softmax(mask_logits(logits), dim=1)[0, 4].backward()
    expected = torch.tensor([[0.0, 0.0, -0.2, 0.0, 0.8, -0.2, -0.2, -0.2]])
    torch.testing.assert_close(logits.grad, expected)


def test_word_bias_picks_the_top_k_but_values_stay_unbiased():
    torch.manual_seed(1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=30, hidden_dim=16, feature_dim=8, embed_dim=8, attention_dim=8, top_k=5)
    ).eval()
    rows = 2
    tokens = torch.tensor([4, 5], dtype=torch.int32)
    h, c = torch.randn(rows, 16), torch.randn(rows, 16)
    features, att_proj = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    index = torch.zeros(rows, dtype=torch.int32)
    bias = torch.zeros(rows, 30)
    bias[:, 29] = 100.0  # steer both rows to word 29
    with torch.no_grad():
        plain, plain_ids, *_ = decoder.step(tokens, h, c, features, att_proj, index)
        values, ids, *_ = decoder.step(tokens, h, c, features, att_proj, index, bias)
        logits, *_ = decoder.logits(tokens, h, c, features[index], att_proj[index])
        logprobs = torch.log_softmax(mask_logits(logits), dim=1)
    assert (ids[:, 0] == 29).all() and not (plain_ids == 29).any()
    torch.testing.assert_close(values, logprobs.gather(1, ids))  # the model's own values
    torch.testing.assert_close(plain, logprobs.topk(5, dim=1).values)


def test_the_default_decoder_sizes_are_the_shipped_models():
    """``edgecap train``'s defaults (DecoderConfig's) build the shipped model's decoder: its
    manifest records feature 512, attention 256, embedding 256, LSTM 512, dropout 0.5, top 10
    (docs/model.md), on the EfficientNet-Lite0 encoder."""
    import json
    from pathlib import Path

    import edgecap
    from edgecap.models.config import DEFAULT_ENCODER

    manifest = json.loads(
        (Path(edgecap.__file__).parent / "assets" / "default" / "manifest.json").read_text()
    )
    recorded = manifest["decoder_config"]
    assert DecoderConfig(vocab_size=recorded["vocab_size"]).to_dict() == recorded
    assert DEFAULT_ENCODER == manifest["encoder"] == "efficientnet-lite0"


def test_a_vocabulary_too_small_for_the_top_k_is_refused():
    """The first word's top K must be real words with <pad>, <start>, <unk> and <end> all
    excluded (``edgecap.vocab``): K + 4 words at least."""
    from edgecap.vocab import NEVER_FIRST_IDS, NEVER_GENERATED_IDS

    assert len(NEVER_GENERATED_IDS + NEVER_FIRST_IDS) == 4
    assert DecoderConfig(vocab_size=14, top_k=10).vocab_size == 14
    for words in (13, 10, 5):
        with pytest.raises(ValueError, match=f"vocab_size {words} is too small for top_k 10"):
            DecoderConfig(vocab_size=words, top_k=10)


@pytest.mark.parametrize("tag_rank, n_classes", [(-1, 1000), (4, 0), (0, 0)])
def test_tag_sizes_out_of_range_are_refused(tag_rank, n_classes):
    """A tag rank below 0 or fewer than one class is a ValueError naming both, not a decoder
    with an empty tag projection."""
    with pytest.raises(ValueError, match=f"tag_rank {tag_rank} / n_classes {n_classes}: need >= 0 / >= 1"):
        DecoderConfig(vocab_size=30, tag_rank=tag_rank, n_classes=n_classes)
