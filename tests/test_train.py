"""Training, checkpoints and export on a tiny Flickr8k-layout dataset made from the example photos."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgecap.errors import ModelError  # noqa: E402
from helpers import unwritable_output_cases, UnwritableStdout, tiny_train_config  # noqa: E402

CAPTIONS = {
    "chelsea.png": ["a cat sits on a mat", "a brown cat looks up", "a cat on the floor"],
    "coffee.png": ["a cup of coffee on a table", "coffee in a white cup", "a cup on a saucer"],
    "astronaut.png": ["a woman in a space suit", "an astronaut smiles", "a woman with a flag"],
    "rocket.jpg": ["a rocket launches into the sky", "a rocket and smoke", "a launch at dusk"],
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, example_images):
    root = tmp_path_factory.mktemp("flickr-like")
    (root / "images").mkdir()
    for p in example_images:
        shutil.copy(p, root / "images" / p.name)
    lines = [f"{name}#{i}\t{cap}" for name, caps in CAPTIONS.items() for i, cap in enumerate(caps)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(list(CAPTIONS)[:3]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(list(CAPTIONS)[2:]) + "\n")
    return root


def test_train_resume_and_export(tiny_dataset, tmp_path):
    from edgecap import Captioner
    from edgecap.build.export import export_model
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    out = tmp_path / "run"
    best = train(tiny_train_config(tiny_dataset, out, epochs=1), log=lambda *_: None)
    meta = json.loads((out / "last" / "checkpoint.json").read_text())
    assert meta["train_state"]["epoch"] == 1
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))  # safetensors + JSON only

    # Resuming continues after epoch 1 instead of starting over.
    logs = []
    train(tiny_train_config(tiny_dataset, out, epochs=2), log=logs.append)
    assert any("resumed" in line and "epoch 1" in line for line in logs)
    meta = json.loads((out / "last" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["train_state"]["history"]] == [1, 2]

    # The vocabulary comes from the train split only: "rocket" is a dev-only word.
    _, _, vocab, _, _ = load_checkpoint(best)
    assert "cat" in vocab.index and "rocket" not in vocab.index

    model = tmp_path / "model"
    manifest = export_model(best, model)
    assert manifest.dims.vocab_size == len(vocab)
    assert manifest.info["training"]["data"]["n_images"] == 3
    assert set(manifest.info["export_check"]["max_abs_diff"]) >= {"features", "topk_logprobs"}
    caption = Captioner(model, backend="onnxruntime").caption(str(tiny_dataset / "images" / "chelsea.png"))
    assert caption.text and all(w in vocab.index for w in caption.tokens)


def test_the_same_command_run_again_after_an_early_stop_trains_no_more(tiny_dataset, tmp_path):
    """A script that runs its training command again (after a reboot, or in a loop) resumed a
    run that had stopped by --patience and trained one more epoch each time. At lr 0 no dev
    CIDEr beats epoch 1's (the weights do not move), so --patience 1 stops after epoch 2."""
    from edgecap.training.train import train

    out = tmp_path / "run"
    cfg = tiny_train_config(tiny_dataset, out, epochs=5, lr=0.0, patience=1)
    logs: list[str] = []
    train(cfg, log=logs.append)
    assert "no better dev CIDEr for 1 epoch: stopping" in logs  # not "1 epochs"

    def epochs():
        state = json.loads((out / "last" / "checkpoint.json").read_text())["train_state"]
        return [h["epoch"] for h in state["history"]]

    assert epochs() == [1, 2]
    logs = []
    assert train(cfg, log=logs.append) == out / "best"
    assert epochs() == [1, 2]
    assert "no better dev CIDEr for 1 epoch after epoch 1: stopped before" in logs
    logs.clear()
    train(dataclasses.replace(cfg, patience=2), log=logs.append)  # a longer patience goes on
    assert epochs() == [1, 2, 3]
    assert "no better dev CIDEr for 2 epochs: stopping" in logs


def test_image_size_sets_the_input_and_the_attention_map(tiny_dataset, tmp_path):
    from edgecap import Captioner
    from edgecap.build.export import export_model
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    best = train(
        tiny_train_config(tiny_dataset, tmp_path / "run", epochs=1, image_size=96), log=lambda *_: None
    )
    assert load_checkpoint(best)[3].size == (96, 96)
    manifest = export_model(best, tmp_path / "model")
    assert manifest.preprocessing.size == (96, 96)
    assert manifest.dims.regions == 9  # a 3 x 3 map: 96 / 32 a side
    caption = Captioner(tmp_path / "model", backend="onnxruntime").caption(
        str(tiny_dataset / "images" / "chelsea.png"), return_attention=True
    )
    assert caption.attention.shape[1:] == (3, 3)


def test_show_and_tell_baseline_trains_and_exports(tiny_dataset, tmp_path):
    from edgecap import Captioner
    from edgecap.build.export import export_model
    from edgecap.training.train import train

    out = tmp_path / "run"
    cfg = dataclasses.replace(
        tiny_train_config(tiny_dataset, out, epochs=1),
        decoder={
            "attention": False,
            "hidden_dim": 32,
            "feature_dim": 32,
            "embed_dim": 16,
            "attention_dim": 16,
        },
    )
    best = train(cfg, log=lambda *_: None)
    manifest = export_model(best, tmp_path / "model")
    assert manifest.info["attention"] is False
    cap = Captioner(tmp_path / "model", backend="onnxruntime").caption(
        str(tiny_dataset / "images" / "coffee.png"), return_attention=True
    )
    # Without attention every region weighs the same.
    assert np.allclose(cap.attention, 1.0 / 49, atol=1e-6)


def test_failed_export_check_leaves_no_model(tmp_path, monkeypatch):
    import edgecap.build.export as export
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.preprocess import Preprocessing
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(["a cat sat on the mat", "a dog ran in the park today"], min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    monkeypatch.setattr(export, "TOLERANCE", {k: -1.0 for k in export.TOLERANCE})
    with pytest.raises(ModelError, match="export check failed"):
        export.export_modules(load_pretrained(), decoder, vocab, Preprocessing(), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_finetune_encoder_trains_the_last_blocks_and_exports_them(tiny_dataset, tmp_path):
    from edgecap.build.export import export_model
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.training.train import train

    cfg = dataclasses.replace(
        tiny_train_config(tiny_dataset, tmp_path / "run", epochs=1), finetune_encoder=True, finetune_blocks=1
    )
    best = train(cfg, log=lambda *_: None)
    encoder, _, _, _, meta = load_checkpoint(best)
    assert meta["finetuned_encoder"] is True
    pretrained = load_pretrained().state_dict()
    tuned = encoder.state_dict()
    # The last block moved, the frozen stem did not.
    assert not torch.equal(
        tuned["_blocks.15._project_conv.weight"], pretrained["_blocks.15._project_conv.weight"]
    )
    assert torch.equal(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])
    manifest = export_model(best, tmp_path / "model")
    assert manifest.info["export_check"]["max_abs_diff"]["features"] <= 1e-3


def test_encoder_prefix_then_tail_is_the_whole_encoder():
    from edgecap.models.efficientnet_lite import load_pretrained

    encoder = load_pretrained()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        whole = encoder.features(x)
        for k in (0, 11, 16):
            assert torch.equal(encoder.tail(encoder.prefix(x, k), k), whole)
        assert encoder.prefix(x, 11).shape == (2, 112, 14, 14)


def test_finetune_on_cached_activations_trains_only_the_tail(tiny_dataset, tmp_path):
    from edgecap.build.export import export_model
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.training.train import train

    cfg = dataclasses.replace(
        tiny_train_config(tiny_dataset, tmp_path / "run", epochs=2),
        finetune_encoder=True,
        finetune_blocks=5,
        finetune_cached=True,
        encoder_lr=1e-3,
    )
    best = train(cfg, log=lambda *_: None)
    # The caches hold the frozen blocks' activations (112 x 14 x 14 after block 11) of the
    # photos and of their mirror images.
    caches = [np.load(p, mmap_mode="r") for p in (tmp_path / "cache").glob("features-*.npy")]
    assert sorted(c.shape for c in caches) == [(3, 112, 14, 14), (5, 112, 14, 14)]
    encoder, _, _, _, meta = load_checkpoint(tmp_path / "run" / "last")
    assert meta["finetuned_encoder"] is True
    pretrained = load_pretrained().state_dict()
    tuned = encoder.state_dict()
    for name in ("_blocks.11._expand_conv.weight", "_blocks.15._project_conv.weight", "_conv_head.weight"):
        assert not torch.equal(tuned[name], pretrained[name]), name
    for name in ("_conv_stem.weight", "_blocks.10._project_conv.weight"):
        assert torch.equal(tuned[name], pretrained[name]), name
    manifest = export_model(best, tmp_path / "model")
    assert manifest.info["export_check"]["max_abs_diff"]["features"] <= 1e-3


def test_init_from_starts_from_a_checkpoint(tiny_dataset, tmp_path):
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    first = train(tiny_train_config(tiny_dataset, tmp_path / "a", epochs=1), log=lambda *_: None)
    _, start, _, _, _ = load_checkpoint(first)
    # lr 0: the weights stay where they started, so they must be the checkpoint's.
    logs = []
    cfg = dataclasses.replace(
        tiny_train_config(tiny_dataset, tmp_path / "b", epochs=1, lr=0.0, seed=1), init_from=str(first)
    )
    _, after, _, _, _ = load_checkpoint(train(cfg, log=logs.append))
    assert any("initialised from" in line for line in logs)
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    # Without init_from the same run starts from fresh weights.
    cfg = tiny_train_config(tiny_dataset, tmp_path / "c", epochs=1, lr=0.0, seed=1)
    _, fresh, _, _, _ = load_checkpoint(train(cfg, log=lambda *_: None))
    assert not torch.equal(fresh.state_dict()["embed.weight"], start.state_dict()["embed.weight"])


def test_init_from_a_deeper_tuned_encoder_is_refused_where_the_run_would_use_pretrained_blocks(
    tiny_dataset, tmp_path
):
    """The run caches the pretrained encoder's activations before the tuned blocks (the dev
    check reads them, and --finetune-cached trains on them), while the model it writes computes
    them with the starting model's own blocks: a start tuned deeper than the run tunes would
    train and score on features the model never gives (max difference 6.0 at mean |feature|
    0.27 for a start tuned at 5 blocks and a run tuning 1)."""
    from edgecap.training.train import train

    tuned = dataclasses.replace(
        tiny_train_config(tiny_dataset, tmp_path / "a", epochs=1),
        finetune_encoder=True,
        finetune_blocks=2,
        finetune_cached=True,
        encoder_lr=1e-3,
    )
    first = train(tuned, log=lambda *_: None)  # blocks 14 and 15 of 16 move
    for blocks in (1, None):  # a shallower fine-tuning; no fine-tuning (frozen features)
        cfg = dataclasses.replace(
            tiny_train_config(tiny_dataset, tmp_path / f"b{blocks}", epochs=1),
            finetune_encoder=blocks is not None,
            finetune_blocks=blocks or 3,
            finetune_cached=blocks is not None,
            init_from=str(first),
        )
        hint = "use --finetune-blocks 2 or more" if blocks else "add --finetune-encoder"
        with pytest.raises(ModelError, match=f"its encoder was fine-tuned.*{hint}"):
            train(cfg, log=lambda *_: None)
    # As deep as the start, or deeper: its frozen blocks are the pretrained ones.
    cfg = dataclasses.replace(tuned, out=str(tmp_path / "c"), finetune_blocks=3, init_from=str(first))
    assert (train(cfg, log=lambda *_: None) / "checkpoint.json").exists()


def test_coco_training_reads_the_val_file_the_help_names_as_its_dev_split(tmp_path, capsys):
    from edgecap.cli import build_parser
    from edgecap.data.readers import read_dataset

    for split, name in (("train", "a.jpg"), ("val", "b.jpg")):
        data = {
            "images": [{"id": 1, "file_name": name}],
            "annotations": [{"image_id": 1, "caption": "a dog"}],
        }
        (tmp_path / f"captions_{split}.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "captions_{train,val}.json" in capsys.readouterr().out.replace("\n", " ")
    assert [it.file_name for it in read_dataset("coco", tmp_path, "train")] == ["a.jpg"]
    assert [it.file_name for it in read_dataset("coco", tmp_path, "dev")] == ["b.jpg"]


def test_karpathy_training_reads_the_val_split_as_its_dev_split(tmp_path):
    """Karpathy's dataset_*.json names its splits train / restval / val / test: a run's dev
    split is "val" (restval trains with train), the images written out by hand."""
    from edgecap.data.readers import read_dataset

    def image(name, split):
        return {"filename": name, "imgid": len(name), "split": split, "sentences": [{"raw": "a dog"}]}

    data = {
        "images": [
            image("a.jpg", "train"),
            image("bb.jpg", "val"),
            image("ccc.jpg", "test"),
            image("d.jpg", "restval"),
        ]
    }
    (tmp_path / "dataset_tiny.json").write_text(json.dumps(data))
    assert [it.file_name for it in read_dataset("karpathy", tmp_path, "train")] == ["a.jpg", "d.jpg"]
    assert [it.file_name for it in read_dataset("karpathy", tmp_path, "dev")] == ["bb.jpg"]


def test_init_from_refuses_a_checkpoint_with_another_vocabulary(tiny_dataset, tmp_path):
    from edgecap.training.train import train

    first = train(tiny_train_config(tiny_dataset, tmp_path / "a", epochs=1), log=lambda *_: None)
    cfg = dataclasses.replace(
        tiny_train_config(tiny_dataset, tmp_path / "b", epochs=1), min_word_count=2, init_from=str(first)
    )
    with pytest.raises(ModelError, match="vocabulary differs"):
        train(cfg, log=lambda *_: None)


def test_mirrored_activation_cache_is_the_mirrored_photos(example_images, tmp_path):
    from edgecap.images import load_rgb
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.preprocess import Preprocessing, to_model_input
    from edgecap.training.features import cache_name, compute_features

    pre = Preprocessing()
    paths = list(example_images)[:2]
    plain, _ = compute_features(paths, tmp_path, pre, progress=False, split_at=11)
    mirrored, index = compute_features(paths, tmp_path, pre, progress=False, split_at=11, mirrored=True)
    x = torch.from_numpy(np.stack([to_model_input(load_rgb(p), pre) for p in paths]))
    with torch.inference_mode():
        expected = load_pretrained().prefix(x.flip(3), 11).numpy()
    got = np.asarray(mirrored[[index[cache_name(p)] for p in paths]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=0.05, rtol=1e-2)  # float16 storage
    assert not np.allclose(np.asarray(plain, dtype=np.float32), got, atol=0.05)


def test_photos_of_one_name_in_two_folders_keep_their_own_activations(example_images, tmp_path):
    """The single-array cache (encoder fine-tuning, self-critical training) shared by two runs:
    each folder's IMG_0001.png gets its own photo's activations, not the first folder's."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.images import load_rgb
    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.preprocess import Preprocessing, to_model_input
    from edgecap.training.features import split_features

    pre = Preprocessing()
    items = [CaptionedImage("IMG_0001.png", ["x"]), CaptionedImage("IMG_0002.png", ["y"])]
    for k, folder in enumerate("ab"):
        for item, photo in zip(items, list(example_images)[2 * k : 2 * k + 2]):
            (tmp_path / folder).mkdir(exist_ok=True)
            shutil.copy(photo, tmp_path / folder / item.file_name)
        rows, dev, maps = split_features(
            items[:1], items[1:], tmp_path / folder, tmp_path / "cache", pre, False, split_at=15
        )
        x = np.stack([to_model_input(load_rgb(tmp_path / folder / it.file_name), pre) for it in items])
        with torch.inference_mode():
            expected = load_pretrained().prefix(torch.from_numpy(x), 15).numpy()
        np.testing.assert_allclose(maps[rows[0]].numpy(), expected[0], atol=0.05, rtol=1e-2)  # float16
        np.testing.assert_allclose(dev[0].astype(np.float32), expected[1], atol=0.05, rtol=1e-2)


def test_finetuning_on_cached_activations_takes_photos_in_subfolders(example_images, tmp_path):
    from edgecap.training.train import train

    rows = ["file,caption,split"]
    for k, photo in enumerate(example_images):
        (tmp_path / "data" / f"sub{k}").mkdir(parents=True)
        shutil.copy(photo, tmp_path / "data" / f"sub{k}" / photo.name)
        for caption in ("a photo of a red thing on the floor", "a blue thing in a small photo by a cat"):
            rows.append(f"sub{k}/{photo.name},{caption},{'dev' if k == 3 else 'train'}")
    (tmp_path / "data" / "captions.csv").write_text("\n".join(rows) + "\n")
    cfg = dataclasses.replace(
        tiny_train_config(tmp_path / "data", tmp_path / "run", epochs=1),
        dataset="folder",
        init_from="none",
        finetune_encoder=True,
        finetune_blocks=1,
        finetune_cached=True,
    )
    assert (train(cfg, log=lambda *_: None) / "checkpoint.json").exists()


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--finetune-cached"], "--finetune-cached needs --finetune-encoder"),
        (
            ["--finetune-encoder", "--finetune-blocks", "17"],
            "--finetune-blocks must be 1..16 (efficientnet-lite0 has 16 blocks), got 17",
        ),
        (
            ["--finetune-encoder", "--finetune-blocks", "0"],
            "--finetune-blocks must be 1..16 (efficientnet-lite0 has 16 blocks), got 0",
        ),
        (["--image-size", "16"], "--image-size must be at least 32 (the encoder's stride), got 16"),
    ],
)
def test_train_rejects_inconsistent_finetune_flags(tmp_path, capsys, flags, problem):
    from edgecap.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags]) == 2
    assert capsys.readouterr().err == f"edgecap train: error: {problem}\n"  # one line
    assert not (tmp_path / "run").exists()


def test_train_command_builds_the_config_from_its_flags(tmp_path, monkeypatch, capsys):
    from edgecap.cli import build_parser, main
    from edgecap.training import train as training
    from edgecap.training.train import TrainConfig

    given = []
    monkeypatch.setattr(training, "train", lambda cfg, **_: given.append(cfg) or tmp_path / "best")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "T").write_text("a caption\n")  # --text T: a file (a missing one is refused)
    base = ["train", "--data", "DATA", "--out", "RUN"]
    assert main(base) == 0
    # the defaults: the decoder sizes not given are left to the fresh decoder (DecoderConfig's
    # defaults) or the starting model (a size given otherwise is refused: start.py)
    assert given[-1] == TrainConfig(data="DATA", out="RUN", decoder={"dropout": 0.5})
    # Each flag named like a field reaches it; the others are the decoder's and --no-progress.
    args = build_parser().parse_args(base)
    flagged = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - flagged == {
        "max_caption_words",
        "grad_clip",
        "progress",
        "decoder",
    }
    assert (
        main(
            [
                *base,
                "--epochs",
                "3",
                "--lr",
                "0.01",
                "--finetune-encoder",
                "--finetune-blocks",
                "5",
                "--cache-dir",
                "C",
                "--max-dev-images",
                "9",
                "--text",
                "T",
                "--text-share",
                "0.3",
                "--no-progress",
                "--hidden-dim",
                "768",
                "--feature-dim",
                "96",
                "--embed-dim",
                "64",
                "--attention-dim",
                "48",
                "--dropout",
                "0.25",
                "--no-attention",
            ]
        )
        == 0
    )
    assert given[-1] == TrainConfig(
        data="DATA",
        out="RUN",
        epochs=3,
        lr=0.01,
        finetune_encoder=True,
        finetune_blocks=5,
        cache_dir="C",
        max_dev_images=9,
        text="T",
        text_share=0.3,
        progress=False,
        decoder={
            "attention": False,
            "hidden_dim": 768,
            "feature_dim": 96,
            "embed_dim": 64,
            "attention_dim": 48,
            "dropout": 0.25,
        },
    )
    assert "best_checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["best", "last"])
def test_train_refuses_an_out_whose_best_or_last_is_not_a_checkpoint(name, tmp_path, monkeypatch, capsys):
    """A run replaces OUT/best and OUT/last whole after an epoch: given an existing folder that
    holds a folder of that name of the user's (their best photos), the run had removed it and
    everything in it without a word. It is refused before anything is read or written."""
    from edgecap.cli import main
    from edgecap.training import train as training

    called = []
    monkeypatch.setattr(training, "train", lambda cfg, **_: called.append(cfg) or tmp_path / "best")
    out = tmp_path / "photos"
    (out / name).mkdir(parents=True)
    (out / name / "a.jpg").write_text("mine")
    assert main(["train", "--data", "DATA", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: --out {out}: {out / name} is not a checkpoint of edgecap train (no "
        "checkpoint.json), and a run would replace it with one; choose another --out\n"
    )
    assert called == [] and (out / name / "a.jpg").read_text() == "mine"


@pytest.mark.parametrize("when", ["a log line", "the last line"])
@pytest.mark.parametrize("error, expected", unwritable_output_cases("train"))
def test_train_output_that_cannot_be_written_is_said_as_the_output(
    when, error, expected, tmp_path, monkeypatch, capsys
):
    """docs/cli.md: output that cannot be written is exit 2 in one line, a reader gone away
    (| head) 141, quietly. A log line the run printed had been taken for a write to --out or the
    feature cache ("edgecap train: error: No space left on device (the error names no file; the
    run writes to --out ...)", a broken pipe alike), and the last line was a traceback."""
    import sys

    from edgecap.cli import main
    from edgecap.training import train as training

    def run(cfg, **_):
        if when == "a log line":
            print("train 8 images, dev 2 images, vocabulary 18 words")
        return tmp_path / "run" / "best"

    monkeypatch.setattr(training, "train", run)
    monkeypatch.setattr(sys, "stdout", UnwritableStdout(error))
    rc = main(["train", "--data", "DATA", "--out", str(tmp_path / "run")])
    assert (rc, capsys.readouterr().err) == expected


def test_train_with_stdout_closed_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """docs/cli.md: started with stdout closed (``>&-``, where Python's sys.stdout is None), train
    says so in one line, exit 2, before training, as caption and eval do. Each epoch's log line
    had been dropped without a word and, the training done, the last line an AttributeError
    traceback with exit 1, which train gives to a run that left rows out."""
    import sys

    from edgecap.cli import main
    from edgecap.training import train as training

    called = []
    monkeypatch.setattr(training, "train", lambda cfg, **_: called.append(cfg) or tmp_path / "run" / "best")
    monkeypatch.setattr(sys, "stdout", None)
    rc = main(["train", "--data", "DATA", "--out", str(tmp_path / "run")])
    closed = "edgecap train: error: cannot write the output: standard output is closed\n"
    assert (rc, called, capsys.readouterr().err) == (2, [], closed)


def test_train_names_a_best_checkpoint_that_is_not_ascii_on_a_stdout_that_is_not_utf8(tmp_path, monkeypatch):
    """As caption: the line is UTF-8 whatever stdout's encoding (PYTHONIOENCODING=ascii, a
    Latin-1 locale); it had been a UnicodeEncodeError once the training was done."""
    import io
    import sys

    from edgecap.cli import main
    from edgecap.training import train as training

    best = tmp_path / "modèl" / "best"
    monkeypatch.setattr(training, "train", lambda cfg, **_: best)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert main(["train", "--data", "DATA", "--out", str(tmp_path / "modèl")]) == 0
    sys.stdout.flush()
    assert json.loads(raw.getvalue().decode("utf-8")) == {"best_checkpoint": str(best)}


def test_scst_command_builds_its_config_from_the_flags(tmp_path, monkeypatch):
    from edgecap.cli import main
    from edgecap.training import scst
    from edgecap.training.scst import ScstConfig

    given = []
    monkeypatch.setattr(scst, "train_scst", lambda cfg, **_: given.append(cfg) or tmp_path / "best")
    assert (
        main(
            [
                "train",
                "--data",
                "DATA",
                "--out",
                "RUN",
                "--scst-from",
                "CK",
                "--seed",
                "4",
                "--scst-samples",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    # --epochs and --lr default to self-critical training's measured recipe (docs/quality.md:
    # "4 epochs, lr 5e-5"), not the cross-entropy training's 20 epochs at 4e-4 (8x the rate)
    assert given == [
        ScstConfig(
            checkpoint="CK", data="DATA", out="RUN", epochs=4, lr=5e-5, n_samples=3, seed=4, progress=False
        )
    ]
    assert (
        main(["train", "--data", "D", "--out", "R", "--scst-from", "CK", "--epochs", "2", "--lr", "1e-5"])
        == 0
    )
    assert (given[-1].epochs, given[-1].lr) == (2, 1e-5)  # given: used


@pytest.mark.parametrize("flag", [["--text", "T"], ["--text-pretrain", "2"]])
def test_scst_refuses_text_it_would_not_train_on(monkeypatch, capsys, tmp_path, flag):
    """SCST has no text-only batches: --text or --text-pretrain with --scst-from is an error,
    not a run without the text (exit 2, before any training)."""
    from edgecap.cli import main
    from edgecap.training import scst

    monkeypatch.chdir(tmp_path)
    (tmp_path / "T").write_text("a caption\n")  # a file: refused as SCST's, not as missing
    called = []
    monkeypatch.setattr(scst, "train_scst", lambda cfg, **_: called.append(cfg))
    argv = ["train", "--data", "DATA", "--out", "RUN", "--scst-from", "CK", *flag, "--no-progress"]
    assert main(argv) == 2
    assert called == []
    err = capsys.readouterr().err
    assert flag[0] in err and "scst" in err.lower(), err


def test_text_batches_teach_the_decoder_through_a_no_image_input_the_model_does_not_hold(
    tiny_dataset, tmp_path
):
    from safetensors.torch import load_file

    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.models.decoder import CaptionDecoder
    from edgecap.training.text_mix import NoImage
    from edgecap.training.train import train

    text = tmp_path / "captions.txt"  # the tiny photos' words, in a sentence none of their captions has
    text.write_text("a cup on the floor\n" * 12 + "a zebra near a giraffe\n\n")
    logs: list[str] = []
    cfg = tiny_train_config(
        tiny_dataset, tmp_path / "run", epochs=3, lr=1e-2, text=str(text), text_share=0.75
    )
    cfg = dataclasses.replace(cfg, decoder={**cfg.decoder, "dropout": 0.0})
    best = train(cfg, log=logs.append)
    # 2 unknown words (zebra, giraffe): dropped; the empty line is no caption.
    assert "text 12 captions (1 with more than one unknown word dropped), 75% of the batches" in logs
    # 2 photo batches an epoch (2 of the 3 photos each), 3 text batches after each.
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert sum("text_ce" in s for s in steps) == 3 * sum("ce" in s for s in steps) == 18
    history = json.loads((best / "checkpoint.json").read_text())["train_state"]["history"]
    assert history[-1]["text_ce"] < history[0]["text_ce"]
    # The checkpoint holds the decoder alone: the exported graphs are those of a plain run.
    _, decoder, vocab, _, _ = load_checkpoint(tmp_path / "run" / "last")
    assert set(decoder.state_dict()) == set(CaptionDecoder(decoder.cfg).state_dict())
    # The learned "no image" input, kept to resume, has moved from zero, and the decoder fed it
    # says the text's sentence (greedy), which no photo caption is.
    no_image = NoImage(decoder.cfg.feature_dim)
    no_image.load_state_dict(load_file(str(tmp_path / "run" / "last" / "no_image.safetensors")))
    assert no_image.features.abs().max() > 0
    decoder.eval()
    with torch.no_grad():
        features, att_proj, h, c = no_image.state(decoder, 1)
        token, words = torch.tensor([vocab.start]), []
        for _ in range(8):
            logits, h, c, _ = decoder.logits(token, h, c, features, att_proj)
            token = logits.argmax(1)
            if int(token) == vocab.end:
                break
            words.append(int(token))
    assert vocab.decode(words) == "a cup on the floor"


def test_a_resumed_text_run_goes_on_from_its_no_image_input(tiny_dataset, tmp_path, monkeypatch):
    """Resuming a --text run starts its text batches from the "no image" input the run kept in
    OUT/last (moved from zero by the first epoch), not from zero again."""
    from safetensors.torch import load_file

    from edgecap.training import train as train_module

    text = tmp_path / "captions.txt"
    text.write_text("a cup on the floor\n" * 12)
    out = tmp_path / "run"
    cfg = tiny_train_config(tiny_dataset, out, epochs=1, lr=1e-2, text=str(text), text_share=0.5)
    train_module.train(cfg, log=lambda *_: None)
    kept = load_file(str(out / "last" / train_module.NO_IMAGE_FILE))["features"]
    assert kept.abs().max() > 0
    seen = []
    real = train_module.text_loss

    def first_input(decoder, no_image, caps, label_smoothing, class_probs=None):
        seen.append(no_image.features.detach().cpu().clone())
        return real(decoder, no_image, caps, label_smoothing, class_probs)

    monkeypatch.setattr(train_module, "text_loss", first_input)
    train_module.train(dataclasses.replace(cfg, epochs=2), log=lambda *_: None)
    torch.testing.assert_close(seen[0], kept)


def test_text_pretraining_runs_before_the_photos_on_the_text_and_the_photos_captions(
    tiny_dataset, tmp_path, monkeypatch
):
    """--text-pretrain N: N epochs of text-only batches (the text and the train split's own
    captions, each once an epoch) before the first photo batch, their cross-entropy falling;
    a run resumed after a photo epoch does not pretrain again."""
    from edgecap.training import train as train_module
    from edgecap.vocab import Vocabulary

    text = tmp_path / "captions.txt"
    text.write_text("a cup on the floor\n" * 12)
    events: list[tuple[str, list[list[int]]]] = []
    real_text, real_caption = train_module.text_loss, train_module.caption_loss

    def text_loss(decoder, no_image, caps, label_smoothing, class_probs=None):
        events.append(("text", [[i for i in row.tolist() if i != 0] for row in caps]))  # 0: <pad>
        return real_text(decoder, no_image, caps, label_smoothing, class_probs)

    def caption_loss(*args, **kwargs):
        events.append(("photo", []))
        return real_caption(*args, **kwargs)

    monkeypatch.setattr(train_module, "text_loss", text_loss)
    monkeypatch.setattr(train_module, "caption_loss", caption_loss)
    out = tmp_path / "run"
    cfg = tiny_train_config(
        tiny_dataset, out, epochs=1, lr=1e-2, text=str(text), text_share=0.5, text_pretrain=2
    )
    logs: list[str] = []
    train_module.train(cfg, log=logs.append)
    pretrain = [json.loads(line) for line in logs if "text_pretrain_epoch" in line]
    # 12 text captions + the 3 train photos' 9 captions: 4 batches of up to 6 an epoch.
    assert [r["text_pretrain_epoch"] for r in pretrain] == [1, 2]
    assert [r["captions"] for r in pretrain] == [21, 21]
    assert pretrain[1]["text_ce"] < pretrain[0]["text_ce"]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    logged = [(s["text_pretrain_epoch"], s["step"]) for s in steps if "text_pretrain_epoch" in s]
    assert logged == [(e, k) for e in (1, 2) for k in (1, 2, 3, 4)] and steps[:8] == [
        s for s in steps if s["epoch"] == 0
    ]
    first_photo = next(i for i, (kind, _) in enumerate(events) if kind == "photo")
    assert first_photo == 8 and all(kind == "text" for kind, _ in events[:8])
    vocab = Vocabulary.load(out / "last" / "vocab.json")
    seen = sorted(row for _, caps in events[:4] for row in caps)  # the first epoch's captions
    train_photos = list(CAPTIONS)[:3]
    expected = ["a cup on the floor"] * 12 + [c for name in train_photos for c in CAPTIONS[name]]
    assert vocab.pad == 0 and seen == sorted(vocab.encode(c) for c in expected)
    # Resumed after its photo epoch: photo and mixed text batches only, no pretraining.
    events.clear()
    logs.clear()
    train_module.train(dataclasses.replace(cfg, epochs=2), log=logs.append)
    assert not [line for line in logs if "text_pretrain_epoch" in line]
    assert events[0][0] == "photo"
    again = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert again[:8] == steps[:8] and all(s["epoch"] > 0 for s in again[8:])  # the records kept


def test_text_pretraining_needs_the_text(monkeypatch, capsys):
    """--text-pretrain without --text is a usage error naming the flag (exit 2), not a run
    without the pretraining."""
    from edgecap.cli import main
    from edgecap.training import train as train_module

    called = []
    monkeypatch.setattr(train_module, "train", lambda cfg, **_: called.append(cfg))
    assert main(["train", "--data", "DATA", "--out", "RUN", "--text-pretrain", "2", "--no-progress"]) == 2
    assert called == []
    err = capsys.readouterr().err
    assert "--text-pretrain" in err and "--text FILE" in err


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fine_tuning_trains_with_the_dropout_given_not_the_starting_models(tmp_path, dropout):
    """--dropout is a training setting (its help: "dropout rate in the decoder (training only)"),
    not one of the decoder sizes that a starting model keeps (--init-from's help): a run from a
    checkpoint trained at 0.5 (a folder's default start, the shipped model, is one) trains at
    the rate given, and its checkpoint records that rate; the sizes are the start's. Before the
    fix the starting model's 0.5 was kept, so --dropout 0 (docs/training.md: what makes runs
    equal across world sizes) did nothing when fine-tuning, while train_config recorded 0."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.models.checkpoint import save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.preprocess import Preprocessing
    from edgecap.training.start import initial_model
    from edgecap.training.train import TrainConfig
    from edgecap.vocab import Vocabulary

    captions = ["a cat sat on the mat", "a dog ran in the park today"]
    vocab = Vocabulary.build(captions, min_count=1)
    sizes = {"hidden_dim": 16, "feature_dim": 16, "embed_dim": 8, "attention_dim": 8}
    start = tmp_path / "start" / "best"
    save_checkpoint(
        start, CaptionDecoder(DecoderConfig(len(vocab), **sizes, dropout=0.5)), vocab, Preprocessing(), {}
    )
    items = [CaptionedImage("a.png", captions[:1]), CaptionedImage("b.png", captions[1:])]
    for dataset, decoder_flags in (
        ("folder", {"dropout": dropout}),
        ("folder", {**sizes, "dropout": dropout}),  # the sizes: the start's
        ("flickr8k", {"dropout": dropout}),  # its vocabulary the start's: the decoder not grown
    ):
        cfg = TrainConfig(
            data=str(tmp_path),
            out=str(tmp_path / "run"),
            dataset=dataset,
            init_from=str(start),
            min_word_count=1,
            decoder=decoder_flags,
        )
        decoder = initial_model(cfg, items, tmp_path / "run" / "last", log=lambda _: None).decoder
        assert decoder.dropout.p == dropout and decoder.cfg.dropout == dropout
        assert decoder.cfg.hidden_dim == 16
