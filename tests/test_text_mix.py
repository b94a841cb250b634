"""Caption text without photos (``edgecap.training.text_mix``) piece by piece, on a five-word
vocabulary worked by hand: which lines of a text file become captions, how text batches are
drawn and spread among the photo batches, and the text batches' loss."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch")  # edgecap.training.text_mix imports it

from edgecap.errors import DataError  # noqa: E402
from edgecap.training.text_mix import read_text, text_batches, text_steps  # noqa: E402
from edgecap.vocab import SPECIALS, Vocabulary  # noqa: E402

# <pad> 0, <start> 1, <end> 2, <unk> 3, then a 4, dog 5, on 6, the 7, grass 8
VOCAB = Vocabulary(list(SPECIALS) + ["a", "dog", "on", "the", "grass"])


def test_text_lines_with_one_unknown_word_are_kept_two_dropped_long_ones_cut(tmp_path):
    """At most one word outside the vocabulary (it becomes <unk>); two or more: the line is
    dropped and counted; an empty line is no caption and not counted; a line over
    ``max_words`` (5) keeps its first 5 words and still ends in <end>."""
    text = tmp_path / "captions.txt"
    text.write_text(
        "A dog on the grass.\na cat on the grass\na cat on the sofa\n\nthe dog on the grass on the grass\n",
        encoding="utf-8",
    )
    kept, dropped = read_text(text, VOCAB, max_words=5)
    assert kept == [[1, 4, 5, 6, 7, 8, 2], [1, 4, 3, 6, 7, 8, 2], [1, 7, 5, 6, 7, 8, 2]]
    assert dropped == 1
    text.write_text("a cat on the sofa\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"captions.txt: no caption with at most 1 word.*\(1 dropped\)"):
        read_text(text, VOCAB, max_words=5)


def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """A byte that is not UTF-8 (a Latin-1 "caf\\xe9" on line 3): the file and its line are said,
    as a captions.csv problem is; it had been the codec's words with a position in the file."""
    text = tmp_path / "captions.txt"
    text.write_bytes(b"a dog on the grass\na dog\na caf\xe9 on the grass\n")
    with pytest.raises(DataError) as caught:
        read_text(text, VOCAB, max_words=5)
    assert str(caught.value) == f"{text}:3: not UTF-8 text (invalid continuation byte, byte 30)"  # 19 + 6 + 5


def test_text_batches_cover_every_caption_once_a_pass_reshuffled_each_pass():
    """Six captions of 1..6 words in batches of 4: each pass is a batch of 4 and one of 2,
    together every caption once, each batch padded with <pad> (0) to its longest caption;
    the passes come in different orders (reshuffled every pass, not once)."""
    captions = [[1] + [4] * n + [2] for n in range(1, 7)]
    batches = text_batches(captions, 4, 0, random.Random(0))
    passes = []
    for _ in range(6):
        rows = []
        for size in (4, 2):
            batch = next(batches).tolist()
            kept = [[t for t in row if t] for row in batch]
            width = max(len(r) for r in kept)
            assert [r + [0] * (width - len(r)) for r in kept] == batch and len(batch) == size
            rows += kept
        assert sorted(rows) == sorted(captions)
        passes.append(rows)
    assert len({tuple(map(tuple, p)) for p in passes}) > 1


def test_text_steps_spread_the_share_of_text_batches_evenly():
    """share s: s / (1 - s) text batches per photo batch, the fractions carried over: 0.75 is 3
    after every photo batch, 0.5 one, 0.25 one after every third, 0.3 three in seven, 0.6
    three in every two (1.5 each, though 0.6 / 0.4 is 1.4999999999999998 in floating point)."""
    assert [text_steps(k, 0.75) for k in range(1, 4)] == [3, 3, 3]
    assert [text_steps(k, 0.5) for k in range(1, 4)] == [1, 1, 1]
    assert [text_steps(k, 0.25) for k in range(1, 7)] == [0, 0, 1, 0, 0, 1]
    assert sum(text_steps(k, 0.3) for k in range(1, 8)) == 3
    assert [text_steps(k, 0.6) for k in range(1, 5)] == [1, 2, 1, 2]


def test_text_loss_applies_label_smoothing():
    """The text batches' loss is the label-smoothed cross-entropy (eps 0.2):
    (1 - eps) * (-log p(target)) + eps * the mean over the vocabulary of -log p, averaged
    over the words, from the decoder's logits fed the "no image" input."""
    torch = pytest.importorskip("torch")
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.training.text_mix import NoImage, text_loss

    torch.manual_seed(0)
    decoder = CaptionDecoder(
        DecoderConfig(
            vocab_size=20, encoder_dim=8, hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8
        )
    ).eval()
    no_image = NoImage(16)
    # it starts as no information at all: one region of zero features (module doc)
    assert no_image.features.shape == (1, 1, 16) and not no_image.features.any()
    with torch.no_grad():
        no_image.features.normal_()
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0]])
    with torch.no_grad():
        logits, targets, _ = decoder.teacher_forced(no_image.state(decoder, 2), caps)
        logp = torch.log_softmax(logits, 1)
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
        expected = (0.8 * nll + 0.2 * -logp.mean(1)).mean()
        got = text_loss(decoder, no_image, caps, 0.2)
    assert len(targets) == 7  # 4 + 3 words predicted, <pad> none
    assert float(got) == pytest.approx(float(expected), abs=1e-5)
    assert float(got) != pytest.approx(float(nll.mean()), abs=1e-3)


def test_the_language_model_trainer_reads_the_same_captions_from_a_text_file(tmp_path):
    """One caption a line for both readers of caption text (``edgecap train --text-mix`` and the
    language-model trainer's ``--text``): Windows line ends, a form feed and U+2028 between
    captions (str.splitlines' line boundaries) give the same four captions to both."""
    import argparse

    from edgecap.training.language_model import read_captions

    text = tmp_path / "captions.txt"
    text.write_text("a dog on the grass\r\nthe dog\x0ca dog on the grass\u2028the grass\n", encoding="utf-8")
    lines = read_captions(argparse.Namespace(text=str(text)))
    assert lines == ["a dog on the grass", "the dog", "a dog on the grass", "the grass"]
    kept, _ = read_text(text, VOCAB, max_words=8)
    assert kept == [VOCAB.encode(line) for line in lines]
