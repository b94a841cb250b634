"""The PyTorch modules' rules that every exported model carries (``edgecap.models``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

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


def test_a_decoder_of_one_word_a_step_is_refused():
    """As a manifest's dims (tests/test_contract.py): the search needs <end> and another word."""
    with pytest.raises(ValueError, match="top_k must be 2 or more, got 1"):
        DecoderConfig(vocab_size=14, top_k=1)
    assert DecoderConfig(vocab_size=14, top_k=2).top_k == 2


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


# -- the decoder's equations, written out here ----------------------------------------------
V, H_DIM, F_DIM, E_DIM, A_DIM, C_DIM = 30, 16, 8, 8, 6, 12


def _tiny_decoder(**sizes) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=V,
        encoder_dim=C_DIM,
        hidden_dim=H_DIM,
        feature_dim=F_DIM,
        embed_dim=E_DIM,
        attention_dim=A_DIM,
        top_k=5,
        **sizes,
    )
    return CaptionDecoder(cfg).eval()


def _linear(layer, x):
    return layer.weight @ x + layer.bias


def _lstm_cell(cell, x, h, c):
    """torch.nn.LSTMCell's documented equations, gates in the order i, f, g, o."""
    i, f, g, o = (cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_one_step_is_show_attend_and_tells_equations():
    """``logits`` against Show, Attend and Tell (Xu et al. 2015) written out row by row: scores
    e_i = w . tanh(W_a a_i + W_h h) (W_a a_i is att_proj), alpha = softmax of e over the row's L
    regions, context z = sigmoid(W_beta h) * sum_i alpha_i a_i (the gating scalar, per channel),
    the LSTM on [E y, z], and the deep output L_o tanh(E y + L_h h' + L_z z)."""
    d = _tiny_decoder()
    rows, regions = 3, 5
    features = torch.randn(rows, regions, F_DIM)
    tokens = torch.tensor([4, 7, 9])
    h, c = torch.randn(rows, H_DIM), torch.randn(rows, H_DIM)
    with torch.no_grad():
        att_proj = d.att_feat(features)
        logits, h_out, c_out, alpha = d.logits(tokens, h, c, features, att_proj)
        for r in range(rows):
            hidden = _linear(d.att_hidden, h[r])
            e = torch.stack(
                [_linear(d.att_score, torch.tanh(att_proj[r, i] + hidden))[0] for i in range(regions)]
            )
            a = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
            z = torch.sigmoid(_linear(d.gate, h[r])) * (a[:, None] * features[r]).sum(0)
            y = d.embed.weight[tokens[r]]
            h1, c1 = _lstm_cell(d.lstm, torch.cat([y, z]), h[r], c[r])
            expected = _linear(
                d.out_vocab, torch.tanh(y + _linear(d.out_hidden, h1) + _linear(d.out_context, z))
            )
            torch.testing.assert_close(alpha[r], a)
            torch.testing.assert_close(h_out[r], h1)
            torch.testing.assert_close(c_out[r], c1)
            torch.testing.assert_close(logits[r], expected)


def test_the_initial_state_is_the_mean_features_projections():
    """features = LayerNorm(relu(W fmap)) per region; h0 = tanh(W_h mean), c0 = tanh(W_c mean)
    over the regions' features (each with its own weights); att_proj = W_a features."""
    d = _tiny_decoder()
    fmap = torch.randn(2, 5, C_DIM)
    with torch.no_grad():
        features, att_proj, h0, c0 = d.init_state(fmap)
        x = torch.relu(fmap @ d.feature_proj.weight.T + d.feature_proj.bias)
        mu, var = x.mean(2, keepdim=True), x.var(2, unbiased=False, keepdim=True)
        expected = (x - mu) / torch.sqrt(
            var + d.feature_norm.eps
        ) * d.feature_norm.weight + d.feature_norm.bias
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(att_proj, expected @ d.att_feat.weight.T + d.att_feat.bias)
        mean = expected.mean(1)
        torch.testing.assert_close(h0, torch.tanh(mean @ d.init_h.weight.T + d.init_h.bias))
        torch.testing.assert_close(c0, torch.tanh(mean @ d.init_c.weight.T + d.init_c.bias))


def test_teacher_forcing_is_each_caption_decoded_on_its_own():
    """Three captions of 1, 3 and 2 words to predict (<pad> after), one per image, in that
    order: the summed cross-entropy of the packed logits against their targets and the attention
    maps (in the captions' order, zero past each caption's end) are those of each caption run
    alone, a word at a time through ``logits``."""
    d = _tiny_decoder()
    fmap = torch.randn(3, 5, C_DIM)
    captions = torch.tensor([[1, 2, 0, 0], [1, 5, 6, 2], [1, 7, 2, 0]])
    with torch.no_grad():
        logits, targets, alphas = d(fmap, captions)
        features, att_proj, h0, c0 = d.init_state(fmap)
        loss, expected_alphas = 0.0, torch.zeros(3, 3, 5)
        for r, n in enumerate((1, 3, 2)):
            h, c = h0[r : r + 1], c0[r : r + 1]
            for t in range(n):
                step, h, c, alpha = d.logits(
                    captions[r : r + 1, t], h, c, features[r : r + 1], att_proj[r : r + 1]
                )
                loss += float(F.cross_entropy(step, captions[r : r + 1, t + 1], reduction="sum"))
                expected_alphas[r, t] = alpha[0]
    assert logits.shape == (6, V) and sorted(targets.tolist()) == [2, 2, 2, 5, 6, 7]
    assert float(F.cross_entropy(logits, targets, reduction="sum")) == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(alphas, expected_alphas)


def test_scheduled_sampling_at_probability_1_feeds_the_models_own_words():
    """sample_prob=1: every word after <start> fed back is the model's greedy choice of the
    step before, whatever the caption says: the logits of a greedy decode of 4 words."""
    d = _tiny_decoder()
    fmap = torch.randn(1, 5, C_DIM)
    with torch.no_grad():
        features, att_proj, h, c = d.init_state(fmap)
        token, expected = torch.tensor([1]), []
        for _ in range(4):
            step, h, c, _ = d.logits(token, h, c, features, att_proj)
            expected.append(step)
            token = step.argmax(1)
        greedy = [int(s.argmax(1)) for s in expected[:3]]
        caption = torch.tensor([[1, *[(w + 1) % (V - 4) + 4 for w in greedy], 2]])  # other words
        assert caption[0, 1:4].tolist() != greedy
        logits, _, _ = d(fmap, caption, sample_prob=1.0)
    torch.testing.assert_close(logits, torch.cat(expected))


def test_the_step_graph_chains_the_decoders_steps_through_source_rows():
    """``StepGraph`` (the exported step) over three words for 4 rows of 2 images: each row
    starts from the state of the row ``source_rows`` names (the images' h0 / c0 at the first
    word, then the rows of the word before, reordered as a beam search does) and takes the
    decoder's step (``logits``, checked against the paper's equations above) on its image's
    features; it returns the top K of the masked log-softmax, their ids as int32, h_out, c_out
    and alpha, in the contract's order."""
    d = _tiny_decoder()
    graph = StepGraph(d)
    torch.manual_seed(3)
    features = torch.randn(2, 5, F_DIM)
    image_index = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    steps = [([START] * 4, [0, 0, 1, 1]), ([4, 7, 9, 5], [1, 0, 3, 2]), ([6, 6, 8, 4], [0, 0, 2, 3])]
    with torch.no_grad():
        att_proj = d.att_feat(features)
        h, c = torch.randn(2, H_DIM), torch.randn(2, H_DIM)
        want_h, want_c = h, c
        for words, source in steps:
            tokens = torch.tensor(words, dtype=torch.int32)
            rows = torch.tensor(source, dtype=torch.int32)
            values, ids, h, c, alpha = graph(
                tokens, h, c, rows, features, att_proj, image_index, torch.zeros(4, V)
            )
            per_row = image_index.long()
            logits, want_h, want_c, want_alpha = d.logits(
                tokens.long(),
                want_h[rows.long()],
                want_c[rows.long()],
                features[per_row],
                att_proj[per_row],
            )
            top = torch.log_softmax(mask_logits(logits), dim=1).topk(5, dim=1)
            assert ids.dtype == torch.int32
            torch.testing.assert_close(ids, top.indices.int())
            torch.testing.assert_close(values, top.values)
            torch.testing.assert_close(h, want_h)
            torch.testing.assert_close(c, want_c)
            torch.testing.assert_close(alpha, want_alpha)


def test_a_new_decoder_with_tag_input_starts_out_deaf_to_the_tags():
    """The tags' projection starts at zero (the module's doc: "a decoder given this input
    starts out saying what it said without it"): any class probabilities give the state of the
    features alone."""
    d = _tiny_decoder(tag_rank=3, n_classes=7)
    fmap = torch.randn(2, 5, C_DIM)
    with torch.no_grad():
        plain = d.state_from(d.feature_norm(torch.relu(d.feature_proj(fmap))))
        for probs in (torch.softmax(torch.randn(2, 7), 1), torch.eye(7)[:2]):
            for a, b in zip(d.init_state(fmap, probs), plain):
                torch.testing.assert_close(a, b)


def test_show_and_tell_feeds_the_image_to_the_lstm_first():
    """attention=False (Vinyals et al. 2015): the mean image feature, embedded like a word, is
    the LSTM's first input from a zero state (h0, c0); then each word alone is its input, the
    attention map is uniform (1 / L) and the output L_o tanh(E y + L_h h')."""
    d = _tiny_decoder(attention=False)
    fmap = torch.randn(2, 5, C_DIM)
    zeros = torch.zeros(H_DIM)
    with torch.no_grad():
        features, att_proj, h0, c0 = d.init_state(fmap)
        tokens = torch.tensor([4, 9])
        logits, h1, c1, alpha = d.logits(tokens, h0, c0, features, att_proj)
        for r in range(2):
            image = _linear(d.image_embed, features[r].mean(0))
            h, c = _lstm_cell(d.lstm, image, zeros, zeros)
            torch.testing.assert_close(h0[r], h)
            torch.testing.assert_close(c0[r], c)
            y = d.embed.weight[tokens[r]]
            h, c = _lstm_cell(d.lstm, y, h, c)
            torch.testing.assert_close(h1[r], h)
            torch.testing.assert_close(
                logits[r], _linear(d.out_vocab, torch.tanh(y + _linear(d.out_hidden, h)))
            )
    torch.testing.assert_close(alpha, torch.full((2, 5), 0.2))
    # uniform whatever the regions hold (a trained feature norm's bias: rows that do not sum to 0)
    with torch.no_grad():
        *_, alpha = d.logits(tokens, h0, c0, torch.randn(2, 5, F_DIM) + 1, torch.zeros(2, 5, A_DIM))
    torch.testing.assert_close(alpha, torch.full((2, 5), 0.2))


def test_same_padding_puts_a_stride_2_convolutions_extra_pixel_at_the_bottom_right():
    """TensorFlow "same" padding, as the ImageNet weights were trained with: a 3x3, stride-2
    convolution of an 8x8 map pads 1 pixel in all (out 4 = ceil(8 / 2); (4 - 1) * 2 + 3 - 8 = 1),
    after the last row and column, none before. A kernel that reads its top-left tap then gives
    every other pixel from the first: x[0::2, 0::2]."""
    from edgecap.models.efficientnet_lite import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    with torch.no_grad():
        y = conv(x)
    assert torch.equal(y[0, 0], x[0, 0, 0::2, 0::2])
    # a kernel's bottom-right tap reads the padding (zero) past the last row and column
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 2, 2] = 1.0
        y = conv(x)
    assert y[0, 0, -1].tolist() == [0.0] * 4 and y[0, 0, :, -1].tolist() == [0.0] * 4
    assert y[0, 0, 0, 0] == x[0, 0, 2, 2]


def test_an_mbconv_block_clips_its_activations_at_6():
    """EfficientNet-Lite replaces swish with ReLU6 (Tan & Le 2019; the "lite" variant): with
    identity-like weights (1x1 convs, a depthwise kernel of one centre tap, batch norms at the
    identity), an input of 10 is clipped to 6 after the expansion, halved by the depthwise tap (3);
    the projection has no activation and the residual adds the input: 3 + 10."""
    from edgecap.models.efficientnet_lite import MBConvBlock

    block = MBConvBlock(kernel=3, stride=1, expand=2, c_in=1, c_out=1).eval()
    with torch.no_grad():
        for bn in (block._bn0, block._bn1, block._bn2):  # identity: y = (x - 0) / sqrt(1 + eps)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        block._expand_conv.weight.fill_(1.0)  # 1 -> 2 channels, each the input
        block._depthwise_conv.weight.zero_()
        block._depthwise_conv.weight[:, :, 1, 1] = 0.5
        block._project_conv.weight.fill_(0.5)  # 2 -> 1: their mean
        x = torch.full((1, 1, 3, 3), 10.0)
        assert torch.allclose(block(x), torch.full_like(x, 13.0))
        # the depthwise conv's own clip: expansion 5 (below 6), the depthwise tap doubles it
        block._expand_conv.weight.fill_(0.5)
        block._depthwise_conv.weight[:, :, 1, 1] = 2.0
        assert torch.allclose(block(x), torch.full_like(x, 16.0))


def test_the_encoders_batch_norms_are_tensorflows():
    """The ImageNet weights were trained in TensorFlow with batch_norm_epsilon 1e-3 and momentum
    0.99 (PyTorch's momentum 0.01: the weight of the new batch); PyTorch's defaults (1e-5, 0.1)
    would shift every normalised activation of the pretrained encoder."""
    from edgecap.models.efficientnet_lite import EfficientNetLite

    norms = [m for m in EfficientNetLite().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) > 40
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}


def _operations(module, x) -> dict[str, int]:
    """The torch operations ``module.features(x)`` calls, by name (each a kernel on a GPU)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counted(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Counted() as counted:
        module.features(x)
    return dict(counted.calls)


@pytest.mark.parametrize("size", [(224, 224), (97, 131)])
def test_the_encoder_with_its_batch_norms_folded_computes_the_same_in_fewer_operations(size):
    """``fold_batch_norms``: the features of the encoder as trained (its BatchNorms with
    statistics and affine weights far from the identity) within float rounding, at the model's
    size and at an odd one (where each stride-2 convolution's "same" padding is uneven); the
    encoder given is left as it was. Lite0's 49 BatchNorms go, and the pads but the five before
    its stride-2 convolutions (the stem and the first block of four of its seven stages: the
    architecture's table), so 157 operations become 96."""
    from edgecap.models.efficientnet_lite import EfficientNetLite, fold_batch_norms

    torch.manual_seed(0)
    encoder = EfficientNetLite().eval()
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.2, 2.0)
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    folded = fold_batch_norms(encoder)
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.inference_mode():
        want, got = encoder.features(x), folded.features(x)
    assert got.shape == want.shape
    assert want.abs().max() > 1.0 and (want == 0).float().mean() < 0.9  # not all clipped away
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    plain, fewer = _operations(encoder, x[:1]), _operations(folded, x[:1])
    assert (plain["batch_norm"], plain["pad"], sum(plain.values())) == (49, 17, 157)
    assert ("batch_norm" not in fewer, fewer["pad"], sum(fewer.values())) == (True, 5, 96)


def test_regions_are_the_feature_maps_positions_row_by_row():
    """Region k of an h x w map is its position (row k // w, column k % w), holding that
    position's channels: the attention weights map back onto the photo this way."""
    from edgecap.models.efficientnet_lite import as_regions

    fmap = torch.zeros(1, 3, 2, 3)  # channels 3, height 2, width 3
    for c in range(3):
        for i in range(2):
            for j in range(3):
                fmap[0, c, i, j] = 100 * c + 10 * i + j
    regions = as_regions(fmap)
    assert regions.shape == (1, 6, 3)
    assert regions[0, 4].tolist() == [11.0, 111.0, 211.0]  # k = 4: row 1, column 1
    assert regions[0, :, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]


def test_the_classes_from_cached_regions_are_the_exported_encoders():
    """Training with tag input reads the image classes off its cached regions
    (``region_class_probs``); the exported encoder computes them from the feature map
    (``class_probs``): the same probabilities, each image's its own, summing to 1, else a
    decoder trained on the one would be fed other tags by the other."""
    from edgecap.models.efficientnet_lite import EfficientNetLite, as_regions

    torch.manual_seed(0)
    encoder = EfficientNetLite().eval()
    fmap = torch.rand(2, 1280, 7, 7) * 6  # two images' maps, after the head's ReLU6
    with torch.no_grad():
        from_map, from_regions = encoder.class_probs(fmap), encoder.region_class_probs(as_regions(fmap))
    assert from_map.shape == (2, 1000)
    torch.testing.assert_close(from_regions, from_map)
    torch.testing.assert_close(from_map.sum(1), torch.ones(2))
    assert not torch.allclose(from_map[0], from_map[1])
