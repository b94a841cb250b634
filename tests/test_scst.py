"""Self-critical training's reward and sampling (``edgecap.training.cider``,
``edgecap.training.scst.sample_captions``): CIDEr-D with document frequencies from a fixed
corpus, worked by hand from its published definition (Vedantam et al. 2015, coco-caption's
CIDEr-D: n = 1..4, tf-idf with idf log(N / max(1, df)), clipped counts, a Gaussian length
penalty with sigma 6, x10) and equal to coco-caption's own scorer run on the same corpus; the
sampler's captions, log-probabilities and masks on a small random decoder."""

from __future__ import annotations

import math

import pytest

from edgecap.training.cider import CiderD
from edgecap.vocab import tokenize
from helpers import tiny_train_config
from test_train import tiny_dataset  # noqa: F401  (the fixture)


def words(text: str) -> list[str]:
    return text.split()


def test_cider_d_of_the_hand_worked_eval_example():
    """tests/test_eval.py's hand-worked example, scored by the training reward: two images that
    share no n-gram, so every idf is log 2; "a" is its own reference (every cosine 1: 10);
    "b" says 4 words against 5, unigram cosine 4/sqrt(20), bigram 1/sqrt(12), none longer,
    length penalty exp(-1/72)."""
    a, b = words("the cat sat on the mat"), words("a dog's ball is red")
    cider = CiderD([[a], [b]])
    assert cider.score(a, [a]) == pytest.approx(10.0, abs=1e-9)
    expected_b = 10 * (4 / math.sqrt(20) + 1 / math.sqrt(12)) / 4 * math.exp(-1 / 72)
    assert cider.score(words("a dog's red ball"), [b]) == pytest.approx(expected_b, abs=1e-9)


def test_cider_d_clips_a_repeated_word_at_its_reference_count():
    """ "dog dog dog" against "a dog" (corpus of 2 images, all idf log 2 = L; an n-gram no
    reference has gets the full idf too, as in coco-caption): unigram vectors {dog: 3L} and
    {a: L, dog: L}, the dot clipped to min(3L, L) * L = L^2, so the cosine is
    1 / (3 sqrt 2), not 1 / sqrt 2; no bigram shared; no reference trigram (no term);
    3 words against 2."""
    cider = CiderD([[words("a dog")], [words("the bird")]])
    expected = 10 * (1 / (3 * math.sqrt(2))) / 4 * math.exp(-1 / 72)
    assert cider.score(words("dog dog dog"), [words("a dog")]) == pytest.approx(expected, abs=1e-9)


def test_cider_d_document_frequency_counts_images_not_references_and_averages_the_references():
    """Image A's references "a dog" and "a cat" share "a": its document frequency is 1 (one
    image), so its idf is log 2 like every other n-gram's. "a dog" scores (1 + 1) / 4 against
    itself and (1/2) / 4 against "a cat" (unigram cosine L^2 / (sqrt2 L)^2); the mean of the
    two references, x10: 3.125. The idf comes from the corpus, not from the references
    passed: the same references scored in a corpus where every image says "a" give "a" no
    weight: 10 * (2/4 + 0) / 2 = 2.5."""
    refs = [words("a dog"), words("a cat")]
    cider = CiderD([refs, [words("the bird")]])
    assert cider.score(words("a dog"), refs) == pytest.approx(3.125, abs=1e-9)
    everywhere_a = CiderD([refs, [words("a bird")]])
    assert everywhere_a.score(words("a dog"), refs) == pytest.approx(2.5, abs=1e-9)


def test_cider_d_cached_references_are_those_of_their_own_key():
    """``key`` caches an image's reference vectors: scores with keys equal those without,
    whichever image was scored first."""
    corpus = [[words("a dog runs on grass")], [words("two kids in the snow")]]
    cider = CiderD(corpus)
    plain = [cider.score(words("a dog in the snow"), refs) for refs in corpus]
    keyed = CiderD(corpus)
    assert [keyed.score(words("a dog in the snow"), refs, key) for key, refs in enumerate(corpus)] == plain
    assert [keyed.score(words("a dog in the snow"), refs, key) for key, refs in enumerate(corpus)] == plain
    assert plain[0] != plain[1]


REFS = {
    1: ["A dog runs across the green grass.", "A brown dog is running outside.", "A dog on the grass."],
    2: ["Two children play in the snow.", "Kids playing in snow near a house."],
    3: ["A man rides a red bike down the street.", "A cyclist on a city road, a red bike."],
    4: ["A red red bike and a dog.", "A dog next to a bike."],
}
HYPS = {
    1: "a dog runs on the grass",
    2: "two kids play in the snow snow snow",
    3: "a man rides a red red red bike",
    4: "a dog",
}


def test_cider_d_equals_coco_captions_scorer_on_the_same_corpus():
    """With the corpus being the scored images' references, the reward is coco-caption's
    CIDEr-D (pycocoevalcap, the ``eval`` extra) image by image."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [" ".join(tokenize(c)) for c in v] for k, v in REFS.items()}
    res = {k: [" ".join(tokenize(HYPS[k]))] for k in REFS}
    _, expected = Cider().compute_score(gts, res)
    cider = CiderD([[r.split() for r in gts[k]] for k in REFS])
    got = [cider.score(res[k][0].split(), [r.split() for r in gts[k]], k) for k in REFS]
    assert got == pytest.approx(list(expected), abs=1e-9)
    assert len(set(got)) == len(got)


def _sampling_decoder():
    import torch

    from edgecap.models.decoder import CaptionDecoder, DecoderConfig

    torch.manual_seed(0)
    decoder = CaptionDecoder(
        DecoderConfig(
            vocab_size=20, encoder_dim=24, hidden_dim=32, feature_dim=32, embed_dim=16, attention_dim=16
        )
    ).eval()
    with torch.no_grad():  # <end> likely, so that captions end at different steps
        decoder.out_vocab.bias[END_ID] += 2.0
    return decoder


START_ID, END_ID = 1, 2


def test_sampled_captions_are_each_images_own_and_their_log_probs_stop_at_end():
    """``sample_captions`` gives ``n_samples`` rows per image, image by image; a row's tokens
    after its first <end> are <end>, its mask holds the steps up to and including that <end>,
    and its log-probability is the sum of the decoder's (masked) log-softmax of each sampled
    word up to that <end>, recomputed here by feeding the row's words back to the decoder with
    its own image's features (no <end> first, never <pad>/<start>/<unk>); it carries the
    gradient that self-critical training follows."""
    import torch

    from edgecap.models.decoder import mask_logits
    from edgecap.training.scst import sample_captions

    decoder = _sampling_decoder()
    fmap = torch.randn(3, 5, decoder.cfg.encoder_dim) * 3
    n = 4
    torch.manual_seed(1)
    tokens, logp, masks = sample_captions(decoder, fmap, n, 8, START_ID, END_ID)
    assert tokens.shape[0] == logp.shape[0] == masks.shape[0] == 3 * n
    assert tokens.shape == masks.shape and tokens.shape[1] <= 8
    assert logp.requires_grad
    ends = []
    for r, row in enumerate(tokens.tolist()):
        assert row[0] != END_ID and not {0, START_ID, 3} & set(row)
        end = row.index(END_ID) if END_ID in row else len(row) - 1
        ends.append(end)
        assert all(t == END_ID for t in row[end + 1 :])
        assert masks[r].tolist() == [t <= end for t in range(len(row))]
        with torch.no_grad():
            features, att_proj, h, c = decoder.init_state(fmap[r // n : r // n + 1])
            token, total = torch.tensor([START_ID]), 0.0
            for t, word in enumerate(row[: end + 1]):
                logits, h, c, _ = decoder.logits(token, h, c, features, att_proj)
                total += float(torch.log_softmax(mask_logits(logits, first_word=t == 0), 1)[0, word])
                token = torch.tensor([word])
        assert float(logp[r].detach()) == pytest.approx(total, abs=1e-4), r
    # captions of different lengths were checked, most of them ended
    assert len(set(ends)) > 1 and sum(END_ID in row for row in tokens.tolist()) > 2 * n


@pytest.fixture(scope="module")
def ce_checkpoint(tiny_dataset, tmp_path_factory):  # noqa: F811
    """A cross-entropy checkpoint of the tiny decoder (one epoch) to start SCST from."""
    from edgecap.training.train import train

    out = tmp_path_factory.mktemp("ce") / "run"
    return train(tiny_train_config(tiny_dataset, out, epochs=1), log=lambda *_: None)


def _scst_config(checkpoint, data, tmp_path, **given):
    from edgecap.training.config import ScstConfig

    fields = {"images_per_batch": 3, "n_samples": 6, "max_length": 6, "threads": 1, "progress": False}
    return ScstConfig(
        checkpoint=str(checkpoint),
        data=str(data),
        out=str(tmp_path / "scst"),
        cache_dir=str(tmp_path / "cache"),
        **{**fields, **given},
    )


def test_self_critical_training_makes_the_rewarded_word_likelier(
    tiny_dataset,  # noqa: F811
    ce_checkpoint,
    tmp_path,
    monkeypatch,
):
    """SCST follows the reward: with a reward (in place of CIDEr-D) of how often a caption says
    "flag", three epochs from a cross-entropy checkpoint raise the log-probability of "flag" as
    the first word; a reversed advantage (the baseline minus the reward) would lower it."""
    pytest.importorskip("pycocoevalcap")  # the dev CIDEr of each epoch
    import torch

    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.models.decoder import mask_logits
    from edgecap.training import scst

    class SaysFlag:
        def __init__(self, corpus_refs):
            pass

        def score(self, hyp, refs, key=None):
            return float(hyp.count("flag"))

    def first_word_flag(checkpoint):
        _, decoder, vocab, _, _ = load_checkpoint(checkpoint)
        decoder.eval()
        fmap = torch.randn(6, 49, decoder.cfg.encoder_dim, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            features, att_proj, h, c = decoder.init_state(fmap)
            logits, *_ = decoder.logits(torch.full((6,), vocab.start), h, c, features, att_proj)
            logp = torch.log_softmax(mask_logits(logits, first_word=True), 1)
        return float(logp[:, vocab.index["flag"]].mean())

    best = ce_checkpoint
    monkeypatch.setattr(scst, "CiderD", SaysFlag)
    cfg = _scst_config(best, tiny_dataset, tmp_path, epochs=3, lr=0.05)
    scst.train_scst(cfg, log=lambda *_: None)
    before, after = first_word_flag(best), first_word_flag(tmp_path / "scst" / "last")
    assert after > before + 0.3, (before, after)


def test_each_samples_advantage_is_its_reward_minus_the_mean_of_its_images_other_samples(
    tiny_dataset,  # noqa: F811
    ce_checkpoint,
    tmp_path,
    monkeypatch,
):
    """The policy gradient's weights (Rennie et al. 2017 with the baseline of Luo 2020): a
    sample's advantage is its reward minus the mean reward of the other samples of its image
    (not of all of them, not none), each reward scored against its own image's references.
    Read from the gradient the loss -mean(advantage * log p) leaves on the log-probabilities:
    -advantage / rows."""
    pytest.importorskip("pycocoevalcap")  # the dev CIDEr of each epoch
    import torch

    from edgecap.training import scst

    calls: list[tuple[int, float]] = []
    spied: list[torch.Tensor] = []

    class Length:  # a reward that differs between samples: words said, plus the image's key
        def __init__(self, corpus_refs):
            pass

        def score(self, hyp, refs, key=None):
            calls.append((key, len(hyp) + 10.0 * key))
            return calls[-1][1]

    real = scst.sample_captions

    def spy(*args, **kwargs):
        tokens, logp, masks = real(*args, **kwargs)
        spied.append(logp.detach().requires_grad_())
        return tokens, spied[-1], masks

    monkeypatch.setattr(scst, "CiderD", Length)
    monkeypatch.setattr(scst, "sample_captions", spy)
    scst.train_scst(_scst_config(ce_checkpoint, tiny_dataset, tmp_path, epochs=1), log=lambda *_: None)
    (logp,) = spied  # one batch: the 3 train photos, 6 samples each
    keys = [k for k, _ in calls]
    assert len(keys) == 18 and sorted(set(keys)) == [0, 1, 2]
    assert all(keys[r] == keys[6 * (r // 6)] for r in range(18))  # 6 rows of one image in a row
    rewards = [r for _, r in calls]
    expected = [
        rewards[r] - (sum(rewards[6 * (r // 6) : 6 * (r // 6) + 6]) - rewards[r]) / 5 for r in range(18)
    ]
    assert (-logp.grad * 18).tolist() == pytest.approx(expected, abs=1e-5)
    assert len({round(a, 6) for a in expected}) > 3


def test_a_first_run_that_extracts_the_features_samples_as_a_run_that_reads_them(
    tiny_dataset,  # noqa: F811
    ce_checkpoint,
    tmp_path,
):
    """The same --scst-from command gives the same model whether its feature cache was empty
    (the photos encoded first) or filled by an earlier run (the features read): the samples
    are drawn from --seed alone. Before the fix, encoding the photos drew from torch's
    generator between the seeding and the sampling, so a first run trained on other samples
    than every later one (on a tiny Flickr8k-like set: reward 0.396 against 0.248)."""
    pytest.importorskip("pycocoevalcap")  # the dev CIDEr of each epoch
    import dataclasses

    import torch

    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training import scst

    cfg = _scst_config(ce_checkpoint, tiny_dataset, tmp_path, epochs=1)  # its cache: empty
    samples = []
    for run in ("first", "second"):  # the first encodes the photos into the cache, the second reads them
        scst.train_scst(dataclasses.replace(cfg, out=str(tmp_path / run)), log=lambda *_: None)
        _, decoder, *_ = load_checkpoint(tmp_path / run / "last")
        samples.append(decoder.state_dict())
    first, second = samples
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "trained on other samples"


def test_a_checkpoint_with_a_fine_tuned_encoder_is_refused_in_one_line(tmp_path, capsys):
    """Self-critical training samples on the pretrained encoder's cached features, so it cannot
    start from a checkpoint whose encoder was fine-tuned (--finetune-encoder): `edgecap train
    --scst-from` says so in one line naming the checkpoint, exit 2 (docs/hostile-inputs.md: a
    run that cannot start, no traceback), nothing written. Before the fix: a ValueError
    traceback, exit 1."""
    from edgecap.cli import main
    from edgecap.models.checkpoint import save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.preprocess import Preprocessing
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    tuned = tmp_path / "tuned" / "best"
    save_checkpoint(tuned, decoder, vocab, Preprocessing(), {}, encoder=load_pretrained())
    out = tmp_path / "scst"
    assert main(["train", "--data", str(tmp_path), "--out", str(out), "--scst-from", str(tuned)]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: {tuned}: its encoder was fine-tuned; self-critical training runs on "
        "cached features of the pretrained encoder: start from a checkpoint with a frozen encoder\n"
    )
    assert not out.exists()


def test_a_new_runs_folder_is_locked_once_made_for_cross_entropy_and_self_critical_runs(
    tiny_dataset,  # noqa: F811
    ce_checkpoint,
    tmp_path,
):
    """docs/training.md: a second run into a --out that a run writes is refused. A new run's
    folder is made late (its features first) and locked then: for ``edgecap train`` and for
    --scst-from alike, every log line written once OUT is there finds the lock held."""
    pytest.importorskip("pycocoevalcap")  # the dev CIDEr of each epoch
    from edgecap.errors import EdgecapError
    from edgecap.training import scst
    from edgecap.training.records import RunLock
    from edgecap.training.train import train

    def probe(out, seen):
        def log(*_):
            if out.is_dir():
                other = RunLock()
                try:
                    other.take(out)
                    seen.append("free")
                except EdgecapError:
                    seen.append("held")
                finally:
                    other.release()

        return log

    ce_out = tmp_path / "ce"
    scst_cfg = _scst_config(ce_checkpoint, tiny_dataset, tmp_path, epochs=1)
    for out, run in (
        (ce_out, lambda log: train(tiny_train_config(tiny_dataset, ce_out, 1), log=log)),
        (tmp_path / "scst", lambda log: scst.train_scst(scst_cfg, log=log)),
    ):
        seen: list[str] = []
        run(probe(out, seen))
        assert seen and set(seen) == {"held"}, (out.name, seen)
        with RunLock() as again:
            again.take(out)  # free again once the run has returned
