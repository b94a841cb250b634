"""The epoch loop of ``edgecap train`` (edgecap/training/train.py) on stand-in features and a
scripted dev check: which epoch is kept as ``best``, the learning-rate schedule, the scheduled
sampling ramp, the dev photos checked and the data order. The feature cache and the dev
captioning are replaced (the tests of test_train.py run them for real); the decoder trains."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from edgecap.data.readers import CaptionedImage  # noqa: E402
from helpers import tiny_train_config  # noqa: E402

TRAIN = [
    CaptionedImage(f"t{i}.png", [f"a {w} dog runs", f"the {w} dog sits"])
    for i, w in enumerate("red blue green brown white black".split())
]
DEV = [CaptionedImage(f"d{i}.png", ["a dog runs"]) for i in range(3)]
REGIONS = 4  # a 2 x 2 map: the decoder takes any number of regions
ACTIVATIONS = (192, 7, 7)  # EfficientNet-Lite0's before its last block (fine-tuning 1 block)


class _Rows:
    """Stand-in train features: one random map per cache row (``shape``: a row's); records the
    rows of each read."""

    def __init__(self, n: int, shape=(REGIONS, 1280)):
        self.maps = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
        self.reads: list[list[int]] = []

    def __getitem__(self, rows):
        self.reads.append([int(r) for r in rows])
        return self.maps[torch.as_tensor(rows)]

    def __len__(self):
        return len(self.maps)


class Run:
    """``train`` with the data, the feature cache and the dev check replaced: the dev CIDEr of
    epoch k is ``ciders[k - 1]``. Records each epoch's learning rates, scheduled-sampling
    probability and dev photos. Fine-tuning (on cached activations): the activations before the
    last encoder block (192 x 7 x 7 of EfficientNet-Lite0) stand in."""

    def __init__(self, monkeypatch, ciders):
        from edgecap.training import train as training

        self.training = training
        self.ciders = list(ciders)
        self.rows = _Rows(len(TRAIN))
        self.dev_checked: list[list[str]] = []
        self.lrs: list[list[float]] = []  # each step's learning rates, by parameter group
        self.epoch_lrs: list[list[float]] = []  # each epoch's, by parameter group (at its dev check)
        self.sample_probs: list[float] = []  # each step's
        self.captions: list[torch.Tensor] = []  # each step's caption ids (R, T)
        self.fmaps: list[torch.Tensor] = []  # each step's features (images, regions, 1280)
        self.image_indexes: list[torch.Tensor] = []  # each step's caption -> its row of fmaps
        real_step, real_loss = training._optimizer_step, training.caption_loss

        def step(loss, optimizer, *args, **kwargs):
            self.optimizer = optimizer
            self.lrs.append([g["lr"] for g in optimizer.param_groups])
            return real_step(loss, optimizer, *args, **kwargs)

        def loss(decoder, fmap, caps, image_index, vocab, cfg, sample_prob, *args, **kwargs):
            self.sample_probs.append(sample_prob)
            self.captions.append(caps.cpu())
            self.fmaps.append(fmap.detach().cpu())
            self.image_indexes.append(image_index.cpu())
            return real_loss(decoder, fmap, caps, image_index, vocab, cfg, sample_prob, *args, **kwargs)

        def dev_check(decoder, dev_fmaps, dev_items, vocab, **kwargs):
            assert len(dev_fmaps) == len(dev_items)
            self.dev_checked.append([it.file_name for it in dev_items])
            self.epoch_lrs.append([g["lr"] for g in self.optimizer.param_groups])
            return {"BLEU-1": 0.5, "BLEU-4": 0.1, "CIDEr": self.ciders[len(self.dev_checked) - 1]}

        def split(train_items, dev_items, *args, **kwargs):
            dev_maps = torch.zeros(len(dev_items), REGIONS, 1280).numpy()
            return list(range(len(train_items))), dev_maps, self.rows

        def tuned_split(train_items, dev_items, *args, **kwargs):
            self.rows = _Rows(len(train_items), ACTIVATIONS)
            dev_maps = torch.zeros(len(dev_items), *ACTIVATIONS).numpy()
            return list(range(len(train_items))), dev_maps, self.rows

        def mirrored(paths, *args, **kwargs):
            from edgecap.training.features import cache_name

            # the mirror image of photo i (cache row i): all 100 + i, told apart from the photos'
            # (about -4 to 4), at row n - 1 - i of its own cache
            n = len(paths)
            maps = 100.0 + torch.arange(n - 1, -1, -1, dtype=torch.float32)[:, None, None, None]
            maps = maps.expand(n, *ACTIVATIONS).contiguous()
            return maps.numpy(), {cache_name(p): n - 1 - i for i, p in enumerate(paths)}

        monkeypatch.setattr(training, "training_items", lambda cfg, data, images, log: (TRAIN, DEV, 0))
        monkeypatch.setattr(training, "streamed_split", split)
        monkeypatch.setattr(training, "split_features", tuned_split)
        monkeypatch.setattr(training, "compute_features", mirrored)
        monkeypatch.setattr(training, "evaluate_dev", dev_check)
        monkeypatch.setattr(training, "_optimizer_step", step)
        monkeypatch.setattr(training, "caption_loss", loss)

    def __call__(self, out, epochs, **given):
        cfg = tiny_train_config(out.parent, out, epochs, batch_size=4, **given)
        self.steps_per_epoch = 3  # 6 photos of 2 captions, 2 photos a batch
        return self.training.train(cfg, log=lambda *_: None)

    def per_epoch(self, values):
        """One value of each epoch from a list of each step's."""
        k = self.steps_per_epoch
        epochs = [values[i : i + k] for i in range(0, len(values), k)]
        for e in epochs:
            assert all(v == e[0] for v in e), e  # constant within an epoch
        return [e[0] for e in epochs]


def _state(folder):
    return json.loads((folder / "checkpoint.json").read_text())["train_state"]


def test_best_holds_the_epoch_of_the_highest_dev_cider_not_the_latest(monkeypatch, tmp_path):
    """docs/training.md: the best epoch by dev CIDEr is kept in OUT/best. Of 0.20, 0.30, 0.30,
    0.10 epoch 2 is the best (epoch 3 only equals it): OUT/best is epoch 2's checkpoint, OUT/last
    epoch 4's."""
    run = Run(monkeypatch, [0.20, 0.30, 0.30, 0.10])
    out = tmp_path / "run"
    assert run(out, epochs=4) == out / "best"
    best = json.loads((out / "best" / "checkpoint.json").read_text())
    assert best["train_state"]["epoch"] == 2
    assert best["dev_metrics_greedy"]["CIDEr"] == 0.30
    assert _state(out / "last")["epoch"] == 4
    assert _state(out / "last")["best_epoch"] == 2


def test_the_learning_rate_halves_every_lr_decay_epochs(monkeypatch, tmp_path):
    """TrainConfig.lr_decay_epochs: "halve the learning rate every N epochs": with N = 2 epochs
    1-2 train at --lr, 3-4 at half of it, 5 at a quarter."""
    run = Run(monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5])
    run(tmp_path / "run", epochs=5, lr=0.01, lr_decay_epochs=2)
    assert run.per_epoch(run.lrs) == [[0.01], [0.01], [0.005], [0.005], [0.0025]]


def test_a_resumed_run_goes_on_with_the_decayed_learning_rate(monkeypatch, tmp_path):
    """Resumed after epoch 2 with lr_decay_epochs 1, epoch 3 trains at a quarter of --lr, as in
    a run never stopped."""
    run = Run(monkeypatch, [0.1, 0.2, 0.3])
    out = tmp_path / "run"
    run(out, epochs=2, lr=0.01, lr_decay_epochs=1)
    run(out, epochs=3, lr=0.01, lr_decay_epochs=1)
    assert run.per_epoch(run.lrs) == [[0.01], [0.005], [0.0025]]


def test_scheduled_sampling_rises_from_0_at_the_first_epoch_to_its_value_at_the_last(monkeypatch, tmp_path):
    """TrainConfig.scheduled_sampling: the final probability of feeding the model's own word;
    the first epoch is pure teacher forcing: 0, 0.25, 0.5 over 3 epochs at 0.5."""
    run = Run(monkeypatch, [0.1, 0.2, 0.3])
    run(tmp_path / "run", epochs=3, scheduled_sampling=0.5)
    assert run.per_epoch(run.sample_probs) == [0.0, 0.25, 0.5]


def test_max_dev_images_checks_the_first_n_dev_photos_and_0_all(monkeypatch, tmp_path):
    """TrainConfig.max_dev_images: "0: the whole dev split"."""
    run = Run(monkeypatch, [0.1, 0.2, 0.3])
    run(tmp_path / "one", epochs=1, max_dev_images=1)
    run(tmp_path / "two", epochs=1, max_dev_images=2)
    run(tmp_path / "all", epochs=1)
    assert run.dev_checked == [["d0.png"], ["d0.png", "d1.png"], ["d0.png", "d1.png", "d2.png"]]


def test_each_epoch_visits_every_train_photo_once_in_its_own_order(monkeypatch, tmp_path):
    """The data order is drawn from the seed and the epoch (docs/training.md): every epoch sees
    each photo once, and the two epochs do not repeat one order."""
    run = Run(monkeypatch, [0.1, 0.2])
    run(tmp_path / "run", epochs=2)
    orders = [sum(run.rows.reads[i : i + 3], []) for i in (0, 3)]
    assert [sorted(o) for o in orders] == [list(range(6))] * 2
    assert orders[0] != orders[1]


def test_under_torchrun_text_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """docs/training.md: --text runs in one process only (not under torchrun)."""
    from edgecap.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        "edgecap.training.train.setup", lambda env=None: pytest.fail("must refuse before starting a group")
    )
    (tmp_path / "text.txt").write_text("a dog runs\n")
    args = [
        "train",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--text",
        str(tmp_path / "text.txt"),
    ]
    assert main(args) == 2
    assert "--text runs in one process" in capsys.readouterr().err


def test_the_dev_check_captions_with_dropout_off(monkeypatch):
    """The per-epoch dev check scores the decoder as it will caption (dropout off), whatever
    mode training left it in: its captions are those of the decoder in eval mode, each photo its
    own (in batches of 4 of the 6 photos)."""
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.training import train as training
    from edgecap.vocab import Vocabulary
    from helpers import TINY_DECODER

    vocab = Vocabulary.build([c for it in TRAIN for c in it.captions], 1)
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), **TINY_DECODER, dropout=0.5))
    fmaps = torch.randn(len(TRAIN), REGIONS, 1280, generator=torch.Generator().manual_seed(1)).numpy()
    decoder.eval()
    expected = training.greedy_captions(decoder, torch.from_numpy(fmaps), vocab)
    said = []
    monkeypatch.setattr(training, "score", lambda refs, hyps, **kwargs: said.append(hyps) or {"CIDEr": 0.0})
    for seed in (2, 3):
        decoder.train()
        torch.manual_seed(seed)
        training.evaluate_dev(decoder, fmaps, TRAIN, vocab, batch_size=4)  # two batches
    assert said == [{it.file_name: cap for it, cap in zip(TRAIN, expected)}] * 2


def test_a_step_log_line_whose_epoch_is_true_is_dropped_on_resume(tmp_path):
    """A resumed run keeps the step records of the epochs done; a line whose "epoch" is not an
    integer (JSON true, which Python would count as 1) is not a step record."""
    from edgecap.training.train import _keep_steps

    log = tmp_path / "steps.jsonl"
    log.write_text('{"epoch": 1, "step": 1}\n{"epoch": true, "step": 2}\n{"epoch": 2, "step": 1}\n')
    _keep_steps(log, 1)
    assert log.read_text() == '{"epoch": 1, "step": 1}\n'


def test_the_no_image_input_and_the_tuned_encoder_blocks_follow_the_learning_rate_schedule(
    monkeypatch, tmp_path
):
    """Every parameter group halves every --lr-decay-epochs: the "no image" input of --text
    (trained at --lr) and the fine-tuned encoder blocks (at --encoder-lr) as the decoder."""
    (tmp_path / "text.txt").write_text("a red dog runs\nthe blue dog sits\n")
    run = Run(monkeypatch, [0.1, 0.2, 0.3, 0.4])
    run(tmp_path / "text", epochs=2, lr=0.01, lr_decay_epochs=1, text=str(tmp_path / "text.txt"))
    assert run.epoch_lrs == [[0.01, 0.01], [0.005, 0.005]]  # decoder, no image
    run.epoch_lrs.clear()
    tuned = dict(finetune_encoder=True, finetune_blocks=1, finetune_cached=True, encoder_lr=0.001)
    run(tmp_path / "tuned", epochs=2, lr=0.01, lr_decay_epochs=1, **tuned)
    assert run.epoch_lrs == [[0.01, 0.001], [0.005, 0.0005]]  # decoder, encoder


def test_training_captions_longer_than_max_caption_words_are_cut_and_still_end(monkeypatch, tmp_path):
    """TrainConfig.max_caption_words: longer training captions are cut. The 4-word captions at
    3: <start>, their first 3 words, <end>."""
    run = Run(monkeypatch, [0.1])
    run(tmp_path / "run", epochs=1, max_caption_words=3)
    from edgecap.models.checkpoint import load_checkpoint

    vocab = load_checkpoint(tmp_path / "run" / "last")[2]
    said = {vocab.decode(row.tolist()) for caps in run.captions for row in caps}
    colours = "red blue green brown white black".split()
    assert said == {f"{first} {w} dog" for first in ("a", "the") for w in colours}
    assert {caps.shape[1] for caps in run.captions} == {5}
    assert all(int(row[-1]) == vocab.end for caps in run.captions for row in caps)


def test_fine_tuning_on_cached_activations_trains_on_the_mirror_images_too(monkeypatch, tmp_path):
    """docs/training.md: --finetune-cached trains on cached activations of the photos and of
    their mirror images (mirroring is the only augmentation): over 2 epochs of 6 photos some
    steps take a photo's own activations, others its mirror image's (the one of that photo)."""
    from edgecap.models.efficientnet_lite import EfficientNetLite

    seen = []  # per training step: (cache row, mirrored?) of each photo
    real_tail = EfficientNetLite.tail

    def tail(self, x, split_at):
        if torch.is_grad_enabled():  # training, not the dev check
            rows = run.rows.reads[len(seen)]
            firsts = x[:, 0, 0, 0].tolist()
            seen.append([(r, v >= 100) for r, v in zip(rows, firsts)])
            for r, v in zip(rows, firsts):
                assert v < 50 or v == 100 + r  # the photo's own mirror image
        return real_tail(self, x, split_at)

    monkeypatch.setattr(EfficientNetLite, "tail", tail)
    run = Run(monkeypatch, [0.1, 0.2])
    tuned = dict(finetune_encoder=True, finetune_blocks=1, finetune_cached=True)
    run(tmp_path / "run", epochs=2, **tuned)
    flips = [m for step in seen for _, m in step]
    assert len(flips) == 12 and True in flips and False in flips


def test_a_run_with_no_epoch_done_starts_a_fresh_step_log(tmp_path):
    """docs/training.md: a run stopped before its first photo epoch ends begins the text
    pretraining again; the step log it left (pretraining records, epoch 0) goes with it."""
    from edgecap.training.train import _keep_steps

    log = tmp_path / "steps.jsonl"
    log.write_text(
        '{"epoch": 0, "text_pretrain_epoch": 1, "step": 1, "text_ce": 4.2}\n{"epoch": 1, "step": 1}\n'
    )
    _keep_steps(log, 0)
    assert log.read_text() == ""


def test_optimizer_state_of_more_parameters_than_the_run_has_is_a_model_error(tmp_path):
    """A resumed run whose saved Adam state names a parameter this run lacks: one ModelError
    naming the file, not an IndexError."""
    from edgecap.errors import ModelError
    from edgecap.training.train import _load_optimizer, _save_optimizer

    two = torch.nn.Linear(3, 2)  # weight and bias: parameters 0 and 1
    opt = torch.optim.Adam(two.parameters())
    two(torch.ones(1, 3)).sum().backward()
    opt.step()
    _save_optimizer(opt, tmp_path / "o.safetensors", tmp_path / "o.json")
    one = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2, 3))])
    with pytest.raises(ModelError, match=r"o.safetensors: 1\.\w+ is \(2,\), not the state"):
        _load_optimizer(one, tmp_path / "o.safetensors", tmp_path / "o.json")


def test_the_caption_loss_is_the_mean_word_cross_entropy_plus_the_attention_term(tmp_path):
    """caption_loss: the cross-entropy (with --label-smoothing) is a mean over the batch's words;
    the doubly stochastic term (--alpha-c) a mean over its captions and regions of
    (1 - the attention a region got over the caption)^2; with the global batch's totals
    (words, captions) the sums are divided by those instead."""
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.training.train import TrainConfig, caption_loss
    from edgecap.vocab import Vocabulary
    from helpers import TINY_DECODER

    vocab = Vocabulary.build([c for it in TRAIN for c in it.captions], 1)
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), **TINY_DECODER)).eval()
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), alpha_c=0.5, label_smoothing=0.1)
    fmap = torch.randn(2, REGIONS, 1280, generator=torch.Generator().manual_seed(1))
    caps = torch.tensor(
        [vocab.encode("a red dog runs"), vocab.encode("the red dog sits"), vocab.encode("a blue dog runs")]
    )
    image_index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        logits, targets, alphas = decoder(fmap, caps, image_index, sample_prob=0.0)
        loss, ce = caption_loss(decoder, fmap, caps, image_index, vocab, cfg, 0.0)
        expected_ce = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
        assert len(targets) == 3 * 5  # 4 words and <end> a caption
        torch.testing.assert_close(ce, expected_ce)
        attention = ((1.0 - alphas.sum(1)) ** 2).mean()  # over 3 captions x 4 regions
        torch.testing.assert_close(loss, expected_ce + 0.5 * attention)
        # a part of a global batch of 40 words and 8 captions
        loss, ce = caption_loss(decoder, fmap, caps, image_index, vocab, cfg, 0.0, totals=(40, 8))
        torch.testing.assert_close(ce, expected_ce * 15 / 40)
        torch.testing.assert_close(loss, expected_ce * 15 / 40 + 0.5 * attention * 3 / 8)


def test_a_resumed_best_cider_that_is_true_is_refused(tmp_path):
    """checkpoint.json's train_state: best_cider must be a number; JSON true is not one."""
    from edgecap.errors import ModelError
    from edgecap.training.train import _train_state

    state = {"epoch": 2, "best_epoch": 1, "best_cider": True, "history": []}
    with pytest.raises(ModelError, match="'best_cider' is not a finite number"):
        _train_state({"train_state": state}, tmp_path / "checkpoint.json")


def test_train_called_with_an_out_that_is_a_file_refuses_before_reading_the_data(monkeypatch, tmp_path):
    """The Python API checks --out as the command does (TrainConfig does not): a ValueError
    naming it, before the data is read and the features computed."""
    from edgecap.training import train as training

    monkeypatch.setattr(training, "training_items", lambda *a: pytest.fail("read the data"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="out .*notes.txt: is a file, not a folder"):
        training.train(tiny_train_config(tmp_path, a_file, 1), log=lambda *_: None)


def test_each_caption_trains_against_the_features_of_its_own_photo(monkeypatch, tmp_path):
    """A batch's features are read ahead while the step before it trains: every caption of
    every step is still trained against the features of its own photo (photo i's captions name
    colour i; cache row i holds its features)."""
    from edgecap.models.checkpoint import load_checkpoint

    run = Run(monkeypatch, [0.1, 0.2])
    run(tmp_path / "run", epochs=2)
    vocab = load_checkpoint(tmp_path / "run" / "last")[2]
    colours = "red blue green brown white black".split()
    assert len(run.fmaps) == 2 * run.steps_per_epoch
    for fmap, caps, image_index in zip(run.fmaps, run.captions, run.image_indexes):
        for ids, j in zip(caps, image_index):
            colour = vocab.decode(ids.tolist()).split()[1]  # "a red dog runs": red
            photos = [i for i in range(len(TRAIN)) if torch.equal(fmap[j], run.rows.maps[i])]
            assert photos == [colours.index(colour)]


def test_a_global_batch_divides_by_its_predicted_words_and_its_captions():
    """The cross-entropy is a mean over the words the decoder predicts: each caption's words
    and its <end>, not its <start> (test_the_caption_loss_is_...: 5 a caption of 4 words)."""
    import random

    from edgecap.training.train import _Batches
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build([c for it in TRAIN for c in it.captions], 1)
    batches = _Batches(TRAIN, list(range(len(TRAIN))), vocab, 22)
    shares = list(batches.shares(4, random.Random(0)))
    assert len(shares) == 3  # 2 photos of 2 captions of 4 words a batch
    for _, caps, _, totals, weight in shares:
        assert (totals, weight, len(caps)) == ((4 * 5, 4), 1.0, 4)


def test_each_step_follows_its_own_gradient_clipped_to_grad_clip(tmp_path):
    """TrainConfig.grad_clip: a step's gradient is scaled down to that norm (the norm logged is
    the one before clipping); and a step's gradient is its own batch's, not added to the one
    before it."""
    from edgecap.training.train import TrainConfig, _optimizer_step

    w = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([w], lr=1.0)
    params = [{"params": [w]}]  # the parameter groups, as train gives them
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), grad_clip=5.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32
    norm = _optimizer_step((w * torch.tensor([30.0, 40.0])).sum(), sgd, params, cfg, scaler)
    assert float(norm) == pytest.approx(50.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-3.0, -4.0]))  # 50 clipped to 5
    norm = _optimizer_step((w * torch.tensor([0.0, 1.0])).sum(), sgd, params, cfg, scaler)
    assert float(norm) == pytest.approx(1.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-3.0, -5.0]))


def test_an_epochs_train_ce_is_the_mean_of_its_steps_over_their_captions(monkeypatch, tmp_path):
    """checkpoint.json's history: an epoch's train_ce is the mean cross-entropy of its
    captions: of steps of 4 captions each, the mean of the steps' "ce" in steps.jsonl."""
    run = Run(monkeypatch, [0.1, 0.2])
    out = tmp_path / "run"
    run(out, epochs=2)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = _state(out / "last")["history"]
    for epoch in (1, 2):
        ces = [s["ce"] for s in steps if s["epoch"] == epoch]
        assert len(ces) == run.steps_per_epoch
        assert history[epoch - 1]["train_ce"] == pytest.approx(sum(ces) / len(ces), abs=1e-4)


def test_threads_sets_torchs_cpu_threads_and_0_leaves_its_default(monkeypatch, tmp_path):
    """TrainConfig.threads (--threads N): torch's CPU threads; 0: torch's default, untouched."""
    from edgecap.training import train as training

    said = []
    monkeypatch.setattr(training.torch, "set_num_threads", said.append)
    run = Run(monkeypatch, [0.1, 0.2])
    run(tmp_path / "three", epochs=1, threads=3)
    run(tmp_path / "default", epochs=1, threads=0)
    assert said == [3]


def test_a_resumed_run_logs_each_step_of_the_epoch_it_repeats_once(monkeypatch, tmp_path):
    """A run stopped during epoch 2 had logged its first step; resumed, it trains epoch 2 again
    from its start: steps.jsonl holds each step of each epoch once, the stopped one's dropped."""
    run = Run(monkeypatch, [0.1, 0.2])
    out = tmp_path / "run"
    run(out, epochs=1)
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 1, "loss": 9.0, "ce": 9.0, "grad_norm": 1.0}) + "\n")
    run(out, epochs=2)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(e, k) for e in (1, 2) for k in (1, 2, 3)]
    assert 9.0 not in [s["loss"] for s in steps]


def test_fine_tuning_keeps_the_encoders_batchnorm_statistics(monkeypatch, tmp_path):
    """docs/training.md: the tuned blocks' BatchNorm layers keep their ImageNet statistics
    (batches of a few photos would only add noise to them) while their weights learn."""
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.models.efficientnet_lite import load_pretrained

    run = Run(monkeypatch, [0.1])
    tuned = dict(finetune_encoder=True, finetune_blocks=1, finetune_cached=True, encoder_lr=0.01)
    run(tmp_path / "run", epochs=1, **tuned)
    encoder = load_checkpoint(tmp_path / "run" / "last")[0].state_dict()
    pretrained = load_pretrained().state_dict()
    statistics = [k for k in pretrained if k.startswith(("_blocks.15.", "_bn1.")) and "running_" in k]
    assert len(statistics) == 8  # the block's three BatchNorms and the head's, mean and variance
    for name in statistics:
        assert torch.equal(encoder[name], pretrained[name]), name
    for name in ("_blocks.15._project_conv.weight", "_conv_head.weight", "_bn1.weight"):
        assert not torch.equal(encoder[name], pretrained[name]), name


def test_a_new_run_holds_its_folder_once_it_is_made(monkeypatch, tmp_path):
    """A new run makes --out once its features are ready and holds it from then on
    (records.RunLock): a second run into it meanwhile is refused; at the end it is free."""
    from edgecap.errors import EdgecapError
    from edgecap.training.records import RunLock

    run = Run(monkeypatch, [0.1])
    out = tmp_path / "run"
    checked, refused = run.training.evaluate_dev, []

    def dev_check(*args, **kwargs):  # during epoch 1
        with pytest.raises(EdgecapError, match="another training run is writing this folder now"):
            RunLock().take(out)
        refused.append(out)
        return checked(*args, **kwargs)

    monkeypatch.setattr(run.training, "evaluate_dev", dev_check)
    run(out, epochs=1)
    assert refused == [out]
    with RunLock() as after:
        after.take(out)


def test_each_epoch_draws_its_own_text_batches(monkeypatch, tmp_path):
    """--text: an epoch's text-only batches are drawn from the seed and that epoch, as its
    photo order is: with more text than an epoch takes (24 captions, 3 batches of 4 an epoch),
    epoch 2 goes on to other captions, not epoch 1's first ones again."""
    from edgecap.training import train as training

    colours = "red blue green brown white black".split()
    lines = [f"{a} {c} dog {v}" for a in ("a", "the") for c in colours for v in ("runs", "sits")]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    seen: list[set] = []
    real = training.text_loss

    def text_loss(decoder, no_image, caps, *args):
        seen.append({tuple(row) for row in caps.tolist()})
        return real(decoder, no_image, caps, *args)

    monkeypatch.setattr(training, "text_loss", text_loss)
    run = Run(monkeypatch, [0.1, 0.2])
    run(tmp_path / "run", epochs=2, text=str(tmp_path / "text.txt"))
    assert [len(batch) for batch in seen] == [4] * 6  # text_share 0.5: a text batch a step
    first, second = set().union(*seen[:3]), set().union(*seen[3:])
    assert len(first) == len(second) == 12 and first != second
