"""Hostile training inputs (issue 25; issue 23's ``train --data`` item): training's own files
(checkpoints, optimizer state, feature shards and their records, the cache plan, the fine-tune
cache) read with the discipline of ``edgecap.files``, photos outside the data folder, a warm
cache after photos are removed, options out of range, problem reports that cannot be forged,
JSON Lines with unusual line separators, and a flood of bad rows. Videos and cameras:
``test_hostile_video.py``.

Every hostile file is built here, in tmp_path; photos are generated.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecap.data.folder import MAX_REPORTED, read_folder
from edgecap.errors import DataError, ModelError

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")
torch_needed = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("torch") is None, reason="needs torch"
)


def photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (36, 48, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def captions_csv(root: Path, rows, photos=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(photos if photos is not None else sorted({r[0] for r in rows})):
        photo(root / name, i)
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "caption"))
        writer.writerows(rows)
    return root


GOOD = [("a.png", "a red ball"), ("b.png", "a brown dog"), ("c.png", "a cat sleeps")]


def special(path: Path, kind: str) -> None:
    """Replace ``path`` by a named pipe, a link to /dev/zero or a huge sparse file."""
    if os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # read whole, it never ends
    else:
        with open(path, "wb") as f:
            f.truncate(300 << 20)  # sparse: 300 MB that must never be read


# -- class 1: training's own files -------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A real (tiny) checkpoint: safetensors + vocab.json + checkpoint.json."""
    pytest.importorskip("torch")
    from helpers import TINY_CAPTIONS

    from edgecap.models.checkpoint import save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.preprocess import Preprocessing
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=len(vocab), hidden_dim=16, feature_dim=16, embed_dim=8, attention_dim=8)
    )
    save_checkpoint(tmp_path / "ck", decoder, vocab, Preprocessing(), {"train_state": {}})
    return tmp_path / "ck"


def _meta(checkpoint: Path, **changes) -> None:
    path = checkpoint / "checkpoint.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@torch_needed
def test_the_tiny_checkpoint_loads(checkpoint):
    from edgecap.models.checkpoint import load_checkpoint

    _, decoder, vocab, pre, _ = load_checkpoint(checkpoint)
    assert decoder.cfg.hidden_dim == 16 and len(vocab) == decoder.cfg.vocab_size
    assert pre.size == (224, 224)


@POSIX
@torch_needed
@pytest.mark.parametrize("name", ["checkpoint.json", "model.safetensors", "vocab.json"])
@pytest.mark.parametrize(
    "kind, problem", [("fifo", "named pipe"), ("device", "character device"), ("huge", "over the limit")]
)
def test_checkpoint_files_that_are_special_or_huge_are_refused(checkpoint, name, kind, problem):
    from edgecap.models.checkpoint import load_checkpoint

    if kind == "huge" and name == "model.safetensors":
        with open(checkpoint / name, "r+b") as f:
            f.truncate(5 << 30)  # sparse 5 GB: over the weights' ceiling, never read
        problem = "5,368,709,120 bytes, over the limit"
    else:
        special(checkpoint / name, kind)
    with pytest.raises(ModelError) as info:
        load_checkpoint(checkpoint)
    message = str(info.value)
    assert name in message and problem in message and "\n" not in message


@torch_needed
@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1, 2]", "not a JSON object (list)"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested 5001 deep"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_checkpoint_json_is_one_model_error(checkpoint, text, problem):
    from edgecap.models.checkpoint import load_checkpoint

    (checkpoint / "checkpoint.json").write_text(text)
    with pytest.raises(
        ModelError, match="checkpoint.json: .*" + problem.replace("(", r"\(").replace(")", r"\)")
    ):
        load_checkpoint(checkpoint)


@torch_needed
@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"decoder": None}, "'decoder' is not an object"),
        ({"decoder": {"hidden_dim": "wide"}}, "hidden_dim must be an integer"),
        ({"decoder": {"hidden_dim": 100_000}}, "hidden_dim must be at most 8192"),
        ({"decoder": {"dropout": 7}}, "dropout must be less than 1"),
        ({"decoder": {"colour": 1}}, "unknown decoder setting 'colour'"),
        ({"decoder": {"hidden_dim": True}}, "hidden_dim must be an integer, got True"),
        ({"decoder": {"attention": "no"}}, "attention must be true or false, got 'no'"),
        ({"preprocessing": {"size": [224, 224, 224]}}, r"size must be \[height, width\]"),
        ({"preprocessing": {"mean": [0.5, 0.5]}}, "mean must be 3 numbers, got 2"),
        ({"preprocessing": {"resample": "spline"}}, "unknown resampling 'spline'"),
        ({"preprocessing": {"size": [100_000, 100_000]}}, "size must be at most 1024"),
        ({"preprocessing": {"std": [0, 1, 1]}}, "std must be more than 0"),
        ({"preprocessing": {"mean": None}}, "preprocessing"),
    ],
)
def test_sizes_in_checkpoint_json_are_checked(checkpoint, changes, problem):
    from edgecap.models.checkpoint import load_checkpoint

    _meta(checkpoint, **changes)
    with pytest.raises(ModelError, match=problem):
        load_checkpoint(checkpoint)


@torch_needed
def test_sizes_that_disagree_with_the_weights_allocate_nothing(checkpoint, monkeypatch):
    """A hidden size of thousands in checkpoint.json (the weights are 16 wide): refused from the
    weights' header, before any tensor is read or any decoder built."""
    from edgecap.models import checkpoint as module

    def never(*args, **kwargs):
        raise AssertionError("weights read / decoder built before the shapes were checked")

    monkeypatch.setattr(module, "load_file", never)
    monkeypatch.setattr(module, "load_pretrained", never)
    _meta(checkpoint, decoder={"hidden_dim": 8000})
    with pytest.raises(
        ModelError,
        match=r"model.safetensors: decoder.init_h.weight is "
        r"\(16, 16\), checkpoint.json's decoder sizes need "
        r"\(8000, 16\)",
    ):
        module.load_checkpoint(checkpoint)


@torch_needed
def test_a_weights_file_whose_header_lies_is_refused(checkpoint):
    from edgecap.models.checkpoint import load_checkpoint

    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((10**12).to_bytes(8, "little") + data[8:])  # a 1 TB header
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_checkpoint(checkpoint)


@torch_needed
@pytest.mark.parametrize("fmt", ["edgecap-checkpoint/2", None])
def test_a_checkpoint_of_another_format_is_refused(checkpoint, fmt):
    """checkpoint.json of another format version (or with none) is refused before anything is
    read from it: its layout cannot be trusted to mean what this one's does."""
    from edgecap.models.checkpoint import load_checkpoint

    _meta(checkpoint, format=fmt)
    with pytest.raises(
        ModelError, match=f"unknown checkpoint format '?{fmt}'?, expected edgecap-checkpoint/1"
    ):
        load_checkpoint(checkpoint)


def _light_encoder(monkeypatch):
    """load_checkpoint's pretrained encoder built with random weights (no weights file read)."""
    from edgecap.models import checkpoint as module
    from edgecap.models.efficientnet_lite import EfficientNetLite

    monkeypatch.setattr(module, "load_pretrained", lambda variant: EfficientNetLite(variant))


@torch_needed
def test_a_vocabulary_of_another_size_than_the_decoders_is_refused(checkpoint, monkeypatch):
    """vocab.json with one word more than the decoder's vocab_size: every word id past the
    decoder's would be a wrong word, so the checkpoint is refused, naming both sizes."""
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.load(checkpoint / "vocab.json")
    n = len(vocab)
    Vocabulary([*vocab.words, "zzextra"]).save(checkpoint / "vocab.json")
    _light_encoder(monkeypatch)
    with pytest.raises(ModelError, match=f"vocab.json has {n + 1} words, the decoder {n}"):
        load_checkpoint(checkpoint)


@torch_needed
def test_a_weights_file_missing_a_decoder_tensor_is_refused_before_allocating(checkpoint, monkeypatch):
    """model.safetensors without decoder.init_h.weight: refused from its header, naming the
    tensor, before any tensor is read or any decoder built."""
    from safetensors.torch import load_file, save_file

    from edgecap.models import checkpoint as module

    weights = checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["decoder.init_h.weight"]
    save_file(tensors, str(weights))

    def never(*args, **kwargs):
        raise AssertionError("weights read / decoder built before the shapes were checked")

    monkeypatch.setattr(module, "load_file", never)
    monkeypatch.setattr(module, "load_pretrained", never)
    with pytest.raises(ModelError, match=r"model.safetensors: decoder.init_h.weight is missing"):
        module.load_checkpoint(checkpoint)


@torch_needed
@pytest.mark.parametrize("change", ["encoder tensor missing", "decoder tensor unknown"])
def test_a_fine_tuned_checkpoint_with_a_tensor_missing_or_unknown_is_refused(checkpoint, change, monkeypatch):
    """A fine-tuned checkpoint (encoder weights saved) whose weights file lacks one of the
    encoder's tensors, or holds a decoder tensor the decoder does not have: refused (not
    loaded with the pretrained value in its place, or the stray tensor ignored)."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgecap.models.checkpoint import load_checkpoint, save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.models.efficientnet_lite import EfficientNetLite
    from edgecap.preprocess import Preprocessing
    from edgecap.vocab import Vocabulary

    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    decoder = CaptionDecoder(DecoderConfig(**meta["decoder"]))
    vocab = Vocabulary.load(checkpoint / "vocab.json")
    save_checkpoint(checkpoint, decoder, vocab, Preprocessing(), {}, encoder=EfficientNetLite())
    _light_encoder(monkeypatch)
    load_checkpoint(checkpoint)  # whole, it loads
    weights = checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    if change == "encoder tensor missing":
        del tensors["encoder._conv_stem.weight"]
    else:
        tensors["decoder.stray.weight"] = torch.zeros(2)
    save_file(tensors, str(weights))
    with pytest.raises(ModelError, match="cannot load the checkpoint"):
        load_checkpoint(checkpoint)


@torch_needed
def test_export_refuses_a_checkpoint_pipe_and_a_metrics_pipe_in_one_line(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx")
    from edgecap.cli import main

    metrics = tmp_path / "metrics.json"
    os.mkfifo(metrics)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m"), "--metrics", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json" in err and "named pipe" in err
    special(checkpoint / "checkpoint.json", "fifo")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.json" in err and "named pipe" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"CIDEr": "high"}', 'CIDEr is "high", not a number'),
        ('{"BLEU-4": 1e999}', "BLEU-4 is inf, not a score from 0 to 10"),
        ('{"CIDEr": -0.1}', "CIDEr is -0.1, not a score from 0 to 10"),
        ('{"METEOR": true}', "METEOR is true, not a number"),
        ('{"CIDEr": 0.5, "model": {"seconds": NaN}}', "model.seconds is nan, not a finite number"),
        ('{"CIDEr": 0.5, "runs": [1, -Infinity]}', "runs[1] is -inf, not a finite number"),
        ("[0.5]", "a JSON object of metrics (edgecap eval --json), not a list"),
    ],
)
def test_export_refuses_metrics_that_are_no_scores_before_writing_anything(
    checkpoint, tmp_path, capsys, text, problem
):
    """``--metrics``: a metric that is not a number from 0 to 10 (or null), or any number that
    is not finite (Python's JSON reads Infinity, NaN and 1e999; the manifest would then hold
    JSON other readers refuse), is one line naming the value, exit 2, and no model written."""
    from edgecap.cli import main

    metrics = tmp_path / "metrics.json"
    metrics.write_text(text)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m"), "--metrics", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--metrics {metrics}: {problem}" in err
    assert not (tmp_path / "m").exists()


@torch_needed
def test_an_optimizer_state_file_lost_beside_its_record_is_an_error_not_a_fresh_start(tmp_path):
    """Resuming: ``optimizer.safetensors`` and ``optimizer.json`` both there: the state loaded;
    the tensors lost and the record left: a ``ModelError`` saying what to do (it had resumed
    silently with a fresh optimizer); both gone (how to ask for a fresh optimizer): one log
    line, the optimizer as it is."""
    import torch

    from edgecap.training.train import _resume_optimizer, _save_optimizer

    small = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(small.parameters())
    small(torch.ones(1, 3)).sum().backward()
    opt.step()
    _save_optimizer(opt, tmp_path / "optimizer.safetensors", tmp_path / "optimizer.json")
    lines: list[str] = []
    resumed = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    _resume_optimizer(resumed, tmp_path, lines.append)
    assert resumed.state_dict()["state"][0]["step"] == 1 and lines == []
    (tmp_path / "optimizer.safetensors").unlink()
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ModelError, match="optimizer.safetensors: missing beside optimizer.json .* delete"):
        _resume_optimizer(fresh, tmp_path, lines.append)
    (tmp_path / "optimizer.json").unlink()
    _resume_optimizer(fresh, tmp_path, lines.append)
    assert fresh.state_dict()["state"] == {} and lines == [
        f"{tmp_path}: no optimizer state " + ("(optimizer.safetensors, optimizer.json): a fresh optimizer")
    ]


def test_optimizer_state_of_other_shapes_is_a_model_error(tmp_path):
    import torch

    from edgecap.training.train import _load_optimizer, _save_optimizer

    small = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(small.parameters())
    small(torch.ones(1, 3)).sum().backward()
    opt.step()
    _save_optimizer(opt, tmp_path / "o.safetensors", tmp_path / "o.json")
    same = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    _load_optimizer(same, tmp_path / "o.safetensors", tmp_path / "o.json")  # the good case
    assert same.state_dict()["state"][0]["exp_avg"].shape == (2, 3)
    wide = torch.optim.Adam(torch.nn.Linear(3, 4000).parameters())
    with pytest.raises(ModelError, match=r"o.safetensors: 0.exp_avg is \(2, 3\), not the state"):
        _load_optimizer(wide, tmp_path / "o.safetensors", tmp_path / "o.json")
    (tmp_path / "o.json").write_text('{"scalars": []}')
    with pytest.raises(ModelError, match="o.json: 'scalars' is not an object"):
        _load_optimizer(same, tmp_path / "o.safetensors", tmp_path / "o.json")


@torch_needed
def test_resumed_train_state_and_step_log_are_checked(tmp_path):
    from edgecap.training.train import _keep_steps, _train_state

    good = {"epoch": 2, "best_epoch": 1, "best_cider": 0.5, "history": []}
    assert _train_state({"train_state": good}, tmp_path / "c.json") == good
    for bad, problem in (
        ({**good, "epoch": "2"}, "'epoch' is not an integer"),
        ({**good, "best_cider": float("nan")}, "'best_cider' is not a finite"),
        ({k: v for k, v in good.items() if k != "history"}, "no 'history'"),
    ):
        with pytest.raises(ModelError, match=problem):
            _train_state({"train_state": bad}, tmp_path / "c.json")
    log = tmp_path / "steps.jsonl"
    log.write_text('{"epoch": 1, "step": 1}\n[[[\n{"epoch": "x"}\n{"epoch": 3}\n7\n')
    _keep_steps(log, 2)
    assert log.read_text() == '{"epoch": 1, "step": 1}\n'
    special(log, "fifo")
    with pytest.raises(ModelError, match="steps.jsonl: is a named pipe"):
        _keep_steps(log, 2)


def _fake_features(path):
    """A feature row per 'photo': a text file holding a number."""
    return np.full((2, 3), float(Path(path).read_text()), np.float32)


def _shards(paths, directory, log=None, shard_size=2):
    from edgecap.training.shards import extract_shards

    logs = [] if log is None else log
    return extract_shards(
        paths, directory, _fake_features, lambda x: x, shard_size=shard_size, log=logs.append
    )


def _numbers(tmp_path, values) -> list[Path]:
    paths = []
    for v in values:
        (tmp_path / f"p{v}.txt").write_text(str(v))
        paths.append(tmp_path / f"p{v}.txt")
    return paths


def _rows(features, paths):
    from edgecap.training.shards import cache_name

    return features.read([features.names[cache_name(p)] for p in paths])[:, 0, 0].tolist()


@POSIX
@pytest.mark.parametrize("name", ["plan.json", "shard-00000.json", "shard-00000.npy"])
@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_broken_plan_or_shard_is_redone(tmp_path, name, kind):
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    special(cache / name, kind)
    logs = []
    features = _shards(paths, cache, logs)
    assert _rows(features, paths) == [1, 2, 3]
    assert any(name.split(".")[0] in line for line in logs), logs


@pytest.mark.parametrize(
    "name, change",
    [
        ("plan.json", {"shard_size": 0}),
        ("plan.json", {"names": {"a": 1}}),
        ("plan.json", {"paths": []}),
        ("shard-00000.json", {"rows": "2"}),
        ("shard-00000.json", {"shape": [10**9, 10**9]}),
        ("shard-00000.json", {"absent": [5]}),
        ("shard-00000.json", {"absent": [2]}),  # rows 0 and 1 only
    ],
)
def test_malformed_plan_or_record_is_redone_not_a_traceback(tmp_path, name, change):
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    record = json.loads((cache / name).read_text())
    (cache / name).write_text(json.dumps({**record, **change}))
    assert _rows(_shards(paths, cache), paths) == [1, 2, 3]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"shard_size": 0}, "'shard_size' is 0, outside 1..65536"),
        ({"shape": [0]}, "'shape' holds something other than integers in 1..65536"),
        ({"names": "p1"}, "'names' is not a list"),
        ({"shards": []}, "0 shards for 3 images of 2;"),
        ({"shards": [{}]}, "1 shard for 3 images of 2;"),  # counted in the singular: not "1 shards"
        ({"names": ["p1"], "shards": [{}, {}]}, "2 shards for 1 image of 2;"),
        ({"shards": [1, 2]}, "a shard record is not an object"),
    ],
)
def test_a_malformed_index_is_one_cache_error(tmp_path, change, problem):
    from edgecap.training.shards import FeatureCacheError, ShardedFeatures

    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({**index, **change}))
    with pytest.raises(FeatureCacheError, match="index.json: " + problem):
        ShardedFeatures(cache)
    special(cache / "index.json", "fifo")
    with pytest.raises(FeatureCacheError, match="index.json: is a named pipe"):
        ShardedFeatures(cache)


def test_a_plan_whose_names_and_paths_differ_in_length_is_a_new_plan(tmp_path):
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    plan = json.loads((cache / "plan.json").read_text())
    (cache / "plan.json").write_text(json.dumps({**plan, "paths": plan["paths"][:2]}))
    (cache / "shard-00001.json").unlink()  # shard 1 (p3) is to be redone, from the plan's paths
    logs = []
    assert _rows(_shards(paths, cache, logs), paths) == [1, 2, 3]
    assert any("'names' and 'paths' differ in length: starting a new plan" in line for line in logs), logs


def test_a_plan_of_the_older_format_is_a_new_plan_not_extended(tmp_path):
    # edgecap-feature-shards/1 named photos by path alone; kept, its names would stay in the
    # cache beside the new ones and every photo would be extracted twice.
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    plan = json.loads((cache / "plan.json").read_text())
    old = {**plan, "format": "edgecap-feature-shards/1", "names": plan["paths"]}
    (cache / "plan.json").write_text(json.dumps(old))
    logs = []
    features = _shards(paths, cache, logs)
    assert len(features) == 3 and _rows(features, paths) == [1, 2, 3]
    assert len(json.loads((cache / "plan.json").read_text())["names"]) == 3
    assert any("format 'edgecap-feature-shards/1'" in line for line in logs), logs


# -- class 5: a warm cache after photos are removed; an overwritten fine-tune cache -------------
def test_a_warm_shard_cache_survives_a_removed_photo(tmp_path):
    paths = _numbers(tmp_path, [1, 2, 3, 4, 5])
    cache = tmp_path / "cache"
    _shards(paths, cache)
    # p5 (in the last, partly filled shard) leaves the data and the disk; p6 arrives and
    # lands in that shard, which must be recomputed without p5
    mtime = paths[-1].stat().st_mtime_ns
    paths[-1].unlink()
    now = paths[:-1] + _numbers(tmp_path, [6])
    assert _rows(_shards(now, cache), now) == [1, 2, 3, 4, 6]
    # p5 is back, as it was (restored with its modification time): its shard is recomputed
    # with it
    again = now + _numbers(tmp_path, [5])
    os.utime(again[-1], ns=(mtime, mtime))
    logs = []
    assert _rows(_shards(again, cache, logs), again) == [1, 2, 3, 4, 6, 5]
    assert any("photos it lacked are wanted again" in line for line in logs)


def test_a_shard_to_redo_whose_photos_are_all_gone_is_one_data_error(tmp_path):
    paths = _numbers(tmp_path, [1, 2, 3, 4, 5, 6])
    cache = tmp_path / "cache"
    _shards(paths, cache)  # 2 photos a shard: shard 2 holds p5 and p6
    paths[4].unlink()
    paths[5].unlink()
    shard = cache / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # damaged: it must be recomputed, and none of its photos can be read
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"p5\.txt: no photo of feature shard 2 can be read any more; delete"):
        _shards(paths[:4], cache)


def test_a_photo_replaced_under_its_old_name_is_encoded_again(tmp_path):
    """A new recording's frame_0001.jpg over the old one's: the shard cache must not hand the
    old photo's features to the new photo."""
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    assert _rows(_shards(paths, cache), paths) == [1, 2, 3]
    before = paths[1].stat().st_mtime_ns
    paths[1].write_text("9")  # same size, same name, other content
    os.utime(paths[1], ns=(before + 10**9, before + 10**9))  # written a second later
    assert _rows(_shards(paths, cache), paths) == [1, 9, 3]


@torch_needed
def test_a_photo_replaced_under_its_old_name_is_encoded_again_by_the_single_file_cache(tmp_path, monkeypatch):
    """The fine-tuning cache (``compute_features``) likewise, with a stand-in encoder whose
    features are each photo's mean pixel value."""
    from PIL import Image

    from edgecap.models import efficientnet_lite
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import cache_name, compute_features

    class MeanEncoder:
        def regions(self, x):
            return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 2, 3)

    monkeypatch.setattr(efficientnet_lite, "load_pretrained", lambda *_: MeanEncoder())
    pre = Preprocessing(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, value in zip(paths, (10, 200)):
        Image.new("RGB", (32, 32), (value,) * 3).save(path)

    def means():
        maps, index = compute_features(paths, tmp_path / "cache", pre, progress=False)
        return [round(float(maps[index[cache_name(p)]][0, 0])) for p in paths]

    assert means() == [10, 200]
    before = paths[1].stat().st_mtime_ns
    Image.new("RGB", (32, 32), (60,) * 3).save(paths[1])  # same size on disk, other pixels
    os.utime(paths[1], ns=(before + 10**9, before + 10**9))
    assert means() == [10, 60]


def test_a_photo_replaced_by_one_of_another_size_and_the_same_time_is_encoded_again(tmp_path):
    """A copy that keeps modification times (cp -p, rsync -a, an archive unpacked) can put
    another photo under the old name with the old time: its size tells it apart."""
    paths = _numbers(tmp_path, [1, 2, 3])
    cache = tmp_path / "cache"
    assert _rows(_shards(paths, cache), paths) == [1, 2, 3]
    before = paths[1].stat().st_mtime_ns
    paths[1].write_text("29")  # one byte longer, then given the old time back
    os.utime(paths[1], ns=(before, before))
    assert _rows(_shards(paths, cache), paths) == [1, 29, 3]


class _MeanEncoder:
    """A stand-in encoder: every feature of a photo is its mean model input (its pixel level,
    with the identity normalisation); after k blocks every activation is k."""

    def regions(self, x):
        return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 2, 3)

    def prefix(self, x, k):
        import torch

        return torch.full((len(x), 2, 2, 2), float(k))


def _single_file_cache(tmp_path, monkeypatch, paths, split_at=None) -> list:
    """``compute_features`` of ``paths`` with ``_MeanEncoder``: each photo's distinct values."""
    from edgecap.models import efficientnet_lite
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import cache_name, compute_features

    monkeypatch.setattr(efficientnet_lite, "load_pretrained", lambda *_: _MeanEncoder())
    pre = Preprocessing(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    maps, index = compute_features(paths, tmp_path / "cache", pre, progress=False, split_at=split_at)
    return [np.unique(np.asarray(maps[index[cache_name(p)]], np.float32)).round().tolist() for p in paths]


def _grey_photos(tmp_path, levels, side=32) -> list[Path]:
    paths = [tmp_path / f"{chr(ord('a') + i)}.png" for i in range(len(levels))]
    for path, level in zip(paths, levels):
        Image.new("RGB", (side, side), (level,) * 3).save(path)
    return paths


@torch_needed
def test_the_single_file_cache_encodes_a_photo_of_another_size_and_the_same_time_again(tmp_path, monkeypatch):
    """The fine-tuning cache likewise: b.png replaced by a 64x64 photo of level 60 (another file
    size) with b.png's old modification time."""
    paths = _grey_photos(tmp_path, (10, 200))
    assert _single_file_cache(tmp_path, monkeypatch, paths) == [[10.0], [200.0]]
    before, size = paths[1].stat().st_mtime_ns, paths[1].stat().st_size
    Image.new("RGB", (64, 64), (60,) * 3).save(paths[1])
    os.utime(paths[1], ns=(before, before))
    assert paths[1].stat().st_size != size
    assert _single_file_cache(tmp_path, monkeypatch, paths) == [[10.0], [60.0]]


@torch_needed
def test_the_single_file_cache_keeps_each_block_counts_activations_apart(tmp_path, monkeypatch):
    """Fine-tuning 5 blocks, then 3, on one --cache-dir: the activations after 11 blocks are
    never served for 14, nor for the encoder's features (split_at None)."""
    paths = _grey_photos(tmp_path, (10, 200))
    for split_at, expected in ((11, 11.0), (14, 14.0), (None, None), (11, 11.0)):
        got = _single_file_cache(tmp_path, monkeypatch, paths, split_at)
        assert got == ([[10.0], [200.0]] if expected is None else [[expected]] * 2), split_at


@torch_needed
def test_an_index_naming_a_row_outside_the_array_is_recomputed(tmp_path, monkeypatch, capsys):
    """An index whose row for a photo is -1 (numpy would read the last photo's) or past the
    last row is not used: the cache is computed again, and said so."""
    import json

    from edgecap.training.features import cache_name

    paths = _grey_photos(tmp_path, (10, 200))
    assert _single_file_cache(tmp_path, monkeypatch, paths) == [[10.0], [200.0]]
    (index_path,) = (tmp_path / "cache").glob("features-*.json")
    for row in (-1, 2):
        record = json.loads(index_path.read_text())
        record["names"][cache_name(paths[0])] = row
        index_path.write_text(json.dumps(record))
        assert _single_file_cache(tmp_path, monkeypatch, paths) == [[10.0], [200.0]], row
        err = capsys.readouterr().err
        assert "'names' holds rows outside the array: recomputing the feature cache" in err, row


def test_a_photo_the_run_needs_that_is_gone_is_one_data_error(tmp_path):
    from edgecap.training.shards import missing_photos

    paths = _numbers(tmp_path, [1, 2])
    paths[1].unlink()
    with pytest.raises(DataError, match=r"^1 photo is missing, e\.g\. .*p2\.txt$"):
        missing_photos(paths)
    paths[0].unlink()
    with pytest.raises(DataError, match=r"^2 photos are missing, e\.g\. .*p1\.txt, .*p2\.txt$"):
        missing_photos(paths)


@torch_needed
def test_overwritten_values_in_the_finetune_cache_are_recomputed(tmp_path, example_images, capsys):
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import cache_name, compute_features

    pre = Preprocessing()
    paths = example_images[:2]
    first, index = compute_features(paths, tmp_path, pre, progress=False, split_at=14)
    first = np.array(first, dtype=np.float32)
    array = next(tmp_path.glob("features-*.npy"))
    cached = np.load(array, mmap_mode="r+")
    cached[index[cache_name(paths[0])]] = 7.0  # overwritten in place: same size, same header
    cached.flush()
    del cached
    again, _ = compute_features(paths, tmp_path, pre, progress=False, split_at=14)
    assert np.array_equal(np.asarray(again, dtype=np.float32), first)
    assert "changed since it was written (checksum): recomputing" in capsys.readouterr().err


# -- class 2: photos outside the data folder ---------------------------------------------------
@POSIX
def test_photos_outside_the_folder_are_refused_unless_allowed(tmp_path):
    outside = photo(tmp_path / "private" / "secret.png", 7)
    root = captions_csv(
        tmp_path / "data",
        GOOD
        + [
            ("../private/secret.png", "a secret"),
            (str(outside), "the same secret"),
            ("link.png", "a secret through a link"),
            ("inner/ok.png", "a photo in a subfolder"),
        ],
        photos=["a.png", "b.png", "c.png", "inner/ok.png"],
    )
    (root / "link.png").symlink_to(outside)
    (root / "inner" / "up.png").symlink_to("../a.png")  # a link that stays inside: fine
    with open(root / "captions.csv", "a", newline="") as f:
        csv.writer(f).writerow(("inner/up.png", "a red ball again"))
    reports = []
    data = read_folder(root, dev_fraction=0.3, report=reports.append)
    used = {it.file_name for it in data.train + data.dev}
    assert used == {"a.png", "b.png", "c.png", "inner/ok.png"}  # inner/up.png: a.png's caption
    assert [r.split(": ", 2)[1:] for r in reports] == [
        [
            "../private/secret.png",
            "a path through '..', outside the images folder; pass "
            "--allow-outside-data to train on it; row skipped",
        ],
        [
            str(outside),
            "an absolute path, outside the images folder; pass "
            "--allow-outside-data to train on it; row skipped",
        ],
        [
            "link.png",
            "a symbolic link that leads out of the images folder; pass "
            "--allow-outside-data to train on it; row skipped",
        ],
    ]
    reports.clear()
    allowed = read_folder(root, dev_fraction=0.3, report=reports.append, allow_outside=True)
    assert reports == []
    # the absolute path and the link are secret.png under other names, inner/up.png is a.png:
    # their captions join those photos'
    captions = {it.file_name: it.captions for it in allowed.train + allowed.dev}
    assert sorted(captions["../private/secret.png"]) == [
        "a secret",
        "a secret through a link",
        "the same secret",
    ]
    assert "inner/up.png" not in captions and "a red ball again" in captions["a.png"]
    assert len(captions) == 5


@POSIX
def test_a_link_to_a_sibling_folder_and_a_dotdot_mid_path_are_outside(tmp_path):
    """``data-private`` beside ``data`` is outside ``data`` though its path starts with that of
    ``data``; ``inner/../../...`` goes through '..' (said so, not called a link)."""
    secret = photo(tmp_path / "data-private" / "secret.png", 7)
    root = captions_csv(
        tmp_path / "data",
        GOOD + [("peek.png", "a secret through a link"), ("inner/../../data-private/secret.png", "a secret")],
        photos=["a.png", "b.png", "c.png"],
    )
    (root / "peek.png").symlink_to(secret)
    reports = []
    data = read_folder(root, dev_fraction=0.3, report=reports.append)
    assert {it.file_name for it in data.train + data.dev} == {"a.png", "b.png", "c.png"}
    assert [r.split(": ", 2)[1:] for r in reports] == [
        [
            "peek.png",
            "a symbolic link that leads out of the images folder; pass "
            "--allow-outside-data to train on it; row skipped",
        ],
        [
            "inner/../../data-private/secret.png",
            "a path through '..', outside the images folder; pass "
            "--allow-outside-data to train on it; row skipped",
        ],
    ]


@torch_needed
def test_flickr_layout_rows_outside_the_images_folder_are_refused(tmp_path):
    from edgecap.training.start import dataset_items

    root = tmp_path / "flickr"
    for i, name in enumerate(["a.jpg", "b.jpg"]):
        photo(root / "images" / name, i)
    photo(tmp_path / "elsewhere.jpg", 3)
    names = ["a.jpg", "../../elsewhere.jpg", "b.jpg"]
    (root / "Flickr8k.token.txt").write_text("".join(f"{n}#0\tcaption {i}\n" for i, n in enumerate(names)))
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\n../../elsewhere.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    reports = []
    train, dev, left_out = dataset_items("flickr8k", root, root / "images", report=reports.append)
    assert [it.file_name for it in train] == ["a.jpg"] and [it.file_name for it in dev] == ["b.jpg"]
    assert len(reports) == 1 and "../../elsewhere.jpg: a path through '..'" in reports[0]
    assert left_out == 1
    train, _, none_left = dataset_items("flickr8k", root, root / "images", allow_outside=True)
    assert len(train) == 2 and none_left == 0


def test_train_without_pytorch_is_one_line_naming_the_train_extra(tmp_path, monkeypatch, capsys):
    """An install without PyTorch (the base package captions on onnxruntime): exit 2, one line
    saying training needs PyTorch and how to install the train extra (the hint edgecap.extras
    gives), no traceback, nothing written."""
    import sys

    from edgecap.cli import main
    from edgecap.extras import install_hint

    monkeypatch.setitem(sys.modules, "edgecap.training.train", None)  # import fails: ImportError
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgecap train: error: training needs PyTorch: {install_hint('train')} (")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_train_help_names_the_rule_and_the_option(capsys):
    from edgecap.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-outside-data" in text and "symbolic link that leads out" in text


# -- class 6 and issue 23: options and --data in one line, no empty output folder -----------------
@pytest.fixture
def folder_data(tmp_path) -> Path:
    return captions_csv(tmp_path / "data", GOOD)


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--image-size", "100000"], "--image-size must be at most 1024, got 100000"),
        (["--max-dev-images", "-1"], "--max-dev-images must be at least 0, got -1"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be less than 1, got 1.5"),
        (["--label-smoothing", "nan"], "--label-smoothing must be a number, got nan"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--lr-decay-epochs", "0"], "--lr-decay-epochs must be at least 1, got 0"),
        (["--hidden-dim", "100000"], "--hidden-dim must be at most 8192, got 100000"),
        (["--dropout", "1"], "--dropout must be less than 1, got 1.0"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--threads", "-2"], "--threads must be at least 0, got -2"),
        (["--lr", "-1"], "--lr must be at least 0, got -1.0"),
        (["--patience", "0"], "--patience must be at least 1, got 0"),
        (["--scheduled-sampling", "2"], "--scheduled-sampling must be at most 1, got 2.0"),
        (["--dev-fraction", "0"], "--dev-fraction must be between 0 and 1, got 0.0"),
        (["--threads", "1025"], "--threads must be at most 1024, got 1025"),
        (["--seed", str(2**32)], f"--seed must be at most {2**32 - 1}, got {2**32}"),
        (["--shard-size", "65537"], "--shard-size must be at most 65536, got 65537"),
        (["--min-word-count", "-1"], "--min-word-count must be at least 0, got -1"),
        (["--alpha-c", "-1"], "--alpha-c must be at least 0, got -1.0"),
        (["--finetune-encoder", "--encoder-lr", "-1"], "--encoder-lr must be at least 0, got -1.0"),
        (["--tag-rank", "-1"], "--tag-rank must be at least 0, got -1"),
        (["--text-pretrain", "-1"], "--text-pretrain must be at least 0, got -1"),
        # 1: every batch text-only, none of photos (text_mix.text_steps would divide by 0)
        (["--text", __file__, "--text-share", "1"], "--text-share must be between 0 and 1, got 1.0"),
        # one line about --images, not one "no such file" line a photo
        (["--images", "nowhere"], "--images nowhere: no such folder (the folder the captions' file names"),
        (["--images", __file__], f"--images {__file__}: not a folder (the folder the captions' file names"),
        # said before the photos are encoded (it had come once they all were)
        (["--text", "nowhere.txt"], "--text nowhere.txt: no such file (caption text, one a line)"),
        (["--text", str(Path(__file__).parent)], f"--text {Path(__file__).parent}: not a file (caption text"),
    ],
)
def test_out_of_range_options_are_one_line(tmp_path, folder_data, capsys, flags, problem):
    from edgecap.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(folder_data), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecap train: error: ") and err.count("\n") == 1, err
    assert problem in err
    assert not out.exists()


@torch_needed
@pytest.mark.parametrize(
    "flags, needs",
    [
        (["--text-share", "0.3"], "--text"),
        (["--scst-samples", "3"], "--scst-from"),
        (["--finetune-blocks", "2"], "--finetune-encoder"),
        (["--encoder-lr", "5e-05"], "--finetune-encoder"),
    ],
)
def test_an_option_of_another_kind_of_run_is_refused_not_ignored(
    tmp_path, folder_data, capsys, monkeypatch, flags, needs
):
    """--text-share, --scst-samples and --finetune-blocks each say "with --text:", "with
    --scst-from:", "with --finetune-encoder:" in their help; given without it they would change
    nothing, so the run is refused in one line (exit 2, nothing trained), as --text-pretrain
    without --text and --finetune-cached without --finetune-encoder are. With it they reach the
    run. Before the fix each was ignored without a word."""
    from edgecap.cli import main

    configs = _no_training(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder_data), "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"edgecap train: error: {flags[0]} goes with {needs}\n"
    assert configs == [] and not out.exists()
    if needs == "--text":
        text = tmp_path / "text.txt"
        text.write_text("a red ball\n")
        assert (
            main(["train", "--data", str(folder_data), "--out", str(out), *flags, "--text", str(text)]) == 0
        )
        assert configs[-1].text_share == 0.3
    if needs == "--finetune-encoder":
        assert main(["train", "--data", str(folder_data), "--out", str(out), *flags, needs]) == 0
        field = flags[0][2:].replace("-", "_")  # finetune_blocks, encoder_lr
        assert getattr(configs[-1], field) == float(flags[1])


@torch_needed
def test_decoder_sizes_a_run_from_a_model_would_not_use_are_refused(tmp_path, folder_data, capsys):
    """A run from a model keeps that model's decoder sizes (--init-from's help), and a folder
    starts from the shipped one (attention, hidden 512, features 512, embeddings 256,
    attention 256: docs/model.md). --no-attention or a --hidden-dim other than its own would
    change nothing while the checkpoint's train_config recorded them: refused in one line,
    exit 2, nothing trained (test_train: the start's own sizes are taken). Before the fix: a
    run with attention and 512 units, recorded as a Show-and-Tell baseline of 64."""
    from edgecap.cli import main

    out = tmp_path / "run"
    argv = ["train", "--data", str(folder_data), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main([*argv, "--no-attention", "--hidden-dim", "64"]) == 2
    assert capsys.readouterr().err.endswith(
        "default: its decoder (attention, hidden_dim 512) is not the one asked for (no attention, "
        "hidden_dim 64): a run keeps its starting model's decoder sizes; leave out --no-attention / "
        "--hidden-dim, or start from fresh weights (--init-from none)\n"
    )
    assert not out.exists()


def test_out_or_cache_dir_that_is_a_file_is_one_line(tmp_path, folder_data, capsys):
    from edgecap.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["train", "--data", str(folder_data), "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == (f"edgecap train: error: --out {a_file}: is a file, not a folder\n")
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(folder_data), "--out", str(out), "--cache-dir", str(a_file / "cache")])
        == 2
    )
    assert capsys.readouterr().err == (
        f"edgecap train: error: --cache-dir {a_file / 'cache'}: {a_file} is a file, not a folder\n"
    )
    assert not out.exists()


def test_a_path_named_like_a_setting_is_said_as_given(tmp_path, folder_data, capsys):
    """The config's errors name its settings (finetune_blocks), which are said as the flags
    (--finetune-blocks); a path in an error about --out, --cache-dir or --images is the user's
    own and is said as given, also where a folder is named like a setting (it was said as
    '--out .../--cache-dir/run: .../--cache-dir is a file', a path that is nowhere)."""
    from edgecap.cli import main

    cache_dir = tmp_path / "cache_dir"
    cache_dir.write_text("x")
    assert main(["train", "--data", str(folder_data), "--out", str(cache_dir / "run")]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: --out {cache_dir / 'run'}: {cache_dir} is a file, not a folder\n"
    )
    images = tmp_path / "image_size"
    argv = ["train", "--data", str(folder_data), "--out", str(tmp_path / "run"), "--images", str(images)]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"edgecap train: error: --images {images}: no such folder")
    assert not (tmp_path / "run").exists()


def test_out_or_cache_dir_that_cannot_be_written_is_one_line_before_any_photo(
    tmp_path, folder_data, capsys, monkeypatch
):
    """An --out (or --cache-dir) in a folder that cannot be written (a read-only disk, another
    user's folder) is refused before the photos are decoded and encoded: the run makes --out
    only once the features are ready, which for a folder of thousands of photos is many minutes
    on (found: a read-only --out said 'Read-only file system' after every photo was decoded and
    encoded into the cache). os.access is what says so (root passes any permission check, so
    the test tells it which folders cannot be written: one that can be read, not written)."""
    import edgecap.data.folder as folder
    import edgecap.training.config as config
    from edgecap.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        config.os,
        "access",
        lambda path, mode: real_access(path, mode) and not (Path(path) == locked and mode & os.W_OK),
    )
    monkeypatch.setattr(folder, "_read_folder", lambda *a: pytest.fail("photos read first"))
    argv = ["train", "--data", str(folder_data), "--no-progress", "--threads", "1"]
    assert main([*argv, "--out", str(locked / "run")]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: --out {locked / 'run'}: cannot be made in {locked}, not writable\n"
    )
    assert main([*argv, "--out", str(locked)]) == 2
    assert capsys.readouterr().err == f"edgecap train: error: --out {locked}: not writable\n"
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), "--cache-dir", str(locked / "cache")]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: --cache-dir {locked / 'cache'}: cannot be made in {locked}, not writable\n"
    )
    assert not out.exists()


def test_without_pytorch_a_bad_option_is_named_before_the_install_hint(
    tmp_path, folder_data, monkeypatch, capsys
):
    """The options are checked before training imports torch: in an install without PyTorch
    (the base package captions on onnxruntime), --epochs 0 or an --out that is a file is its
    own one-line error (exit 2), not 'training needs PyTorch', which would have the user
    install PyTorch only to be told the option is wrong. Good options then get the install
    hint, for a cross-entropy run and for --scst-from. Before the fix every run without
    PyTorch was told to install it, whatever its options."""
    import sys

    from edgecap.cli import main
    from edgecap.extras import install_hint

    for name in ("torch", "edgecap.training.train", "edgecap.training.scst"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails: ImportError
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder_data), "--out", str(out)]
    assert main([*argv, "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "edgecap train: error: --epochs must be at least 1, got 0\n"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["train", "--data", str(folder_data), "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == f"edgecap train: error: --out {a_file}: is a file, not a folder\n"
    hint = f"edgecap train: error: training needs PyTorch: {install_hint('train')} ("
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(hint)
    scst = ["--dataset", "flickr8k", "--scst-from", str(tmp_path / "ck")]
    assert main([*argv, *scst]) == 2
    err = capsys.readouterr().err
    assert err.startswith(hint) and err.count("\n") == 1, err
    assert not out.exists()


@torch_needed
def test_a_feature_cache_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, folder_data, capsys):
    """docs/cli.md: output that cannot be written is exit 2 with one line, never a traceback. A
    --cache-dir whose name is longer than a file name may be (255 bytes, as a folder that
    cannot be made: no permission, a read-only or full disk) passes the checks before the run
    (nothing in its way) and fails when the run makes it: one line naming the folder and the
    system's reason, nothing trained. Before the fix: an OSError traceback, exit 1."""
    from edgecap.cli import main

    cache = tmp_path / ("c" * 300)
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder_data), "--out", str(out), "--cache-dir", str(cache)]
    assert main([*argv, "--epochs", "1", "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"edgecap train: error: {cache}/shards-")
    assert err[-1].endswith(": File name too long")
    assert not any(line.startswith("Traceback") for line in err)
    assert not out.exists()


@torch_needed
def test_a_full_disk_error_that_names_no_file_does_not_blame_out(tmp_path, folder_data, capsys, monkeypatch):
    """A full disk met while writing to an open file is an OSError with no file name (what
    Path.write_text raised for the feature cache's JSON on a full 64 KiB tmpfs): the one line
    says the system's reason and both folders the run writes to (--out, and the feature cache:
    --cache-dir, else OUT/../.feature-cache), not '--out: No space left on device' when --out
    was on another disk with room (it had not even been made). An error that names its file
    still names it."""
    import errno

    import edgecap.training.train as training
    from edgecap.cli import main

    error = OSError(errno.ENOSPC, "No space left on device")

    def full_disk(cfg, *args, **kwargs):
        raise error

    monkeypatch.setattr(training, "train", full_disk)
    out, cache = tmp_path / "run", tmp_path / "full" / "cache"
    argv = ["train", "--data", str(folder_data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err == (
        "edgecap train: error: No space left on device (the error names no file; the run writes "
        f"to --out {out} and the feature cache {cache})\n"
    )
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith(f"and the feature cache {tmp_path / '.feature-cache'})\n")
    error.filename = str(cache / "plan.json.tmp")
    assert main(argv) == 2
    assert (
        capsys.readouterr().err
        == f"edgecap train: error: {cache / 'plan.json.tmp'}: No space left on device\n"
    )


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Files of this process limited to ``limit`` bytes (RLIMIT_FSIZE): a write past it fails
    with EFBIG ('File too large'), a real I/O error of a write to an open file, as a full disk
    gives one (SIGXFSZ ignored meanwhile, as it would end the process)."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@torch_needed
def test_a_checkpoint_write_that_fails_is_an_os_error_naming_the_file(
    tmp_path, folder_data, capsys, monkeypatch
):
    """A checkpoint's tensors that cannot be written (a full disk; here a write past the file
    size limit, which fails as a full disk does) are an OSError naming the file, which edgecap
    train reports in one line: safetensors' own save_file raised its SafetensorError ('Error
    while serializing: I/O error: No space left on device (os error 28)', on a full 64 KiB
    tmpfs), which the command let through as a traceback."""
    import errno

    import torch

    import edgecap.training.train as training
    from edgecap.cli import main
    from edgecap.models.checkpoint import save_tensors

    target = tmp_path / "model.safetensors"
    with _file_size_limit(4096), pytest.raises(OSError) as raised:
        save_tensors({"w": torch.zeros(10_000)}, target)  # 40 kB of float32
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(target))

    def train_then_save(cfg, *args, **kwargs):
        folder = Path(cfg.out) / "last"
        folder.mkdir(parents=True)
        with _file_size_limit(4096):
            save_tensors({"w": torch.zeros(10_000)}, folder / "model.safetensors")

    monkeypatch.setattr(training, "train", train_then_save)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder_data), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: {out / 'last' / 'model.safetensors'}: File too large\n"
    )


@torch_needed
def test_a_checkpoint_and_its_optimizer_state_that_cannot_be_written_are_os_errors_naming_the_file(tmp_path):
    """What edgecap train writes at each epoch goes through ``save_tensors``: the checkpoint's
    weights (``save_checkpoint``, into the ``.new`` folder that replaces the checkpoint) and the
    optimizer's state (``_save_optimizer``, last's training-only file). A write that fails (past
    the file size limit, as on a full disk) is an OSError naming the file, which the command
    reports in one line; safetensors' save_file raised its SafetensorError, a traceback. No
    half-written checkpoint takes the checkpoint's name."""
    import errno

    import torch

    from edgecap.models.checkpoint import save_checkpoint
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.preprocess import Preprocessing
    from edgecap.training.train import _save_optimizer
    from edgecap.vocab import Vocabulary

    vocab = Vocabulary.build(["a dog runs on the grass", "a cat sits on a red mat"], min_count=1)
    decoder = CaptionDecoder(  # weights of about 150 kB of float32, past the 4 kB limit
        DecoderConfig(vocab_size=len(vocab), hidden_dim=64, feature_dim=64, embed_dim=32, attention_dim=32)
    )
    checkpoint = tmp_path / "last"
    with _file_size_limit(4096), pytest.raises(OSError) as raised:
        save_checkpoint(checkpoint, decoder, vocab, Preprocessing(size=(224, 224)), {})
    written = checkpoint.with_name("last.new") / "model.safetensors"
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(written))
    assert not checkpoint.exists()

    optimizer = torch.optim.Adam(decoder.parameters())
    sum(p.sum() for p in decoder.parameters()).backward()
    optimizer.step()  # its state: two moments per weight
    state = tmp_path / "optimizer.safetensors"
    with _file_size_limit(4096), pytest.raises(OSError) as raised:
        _save_optimizer(optimizer, state, tmp_path / "optimizer.json")
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(state))


def _no_training(monkeypatch) -> list:
    """``edgecap train`` with its training replaced: the configs it would have run with."""
    import edgecap.training.train as training

    configs: list = []
    monkeypatch.setattr(training, "train", lambda cfg, *_, **__: configs.append(cfg) or Path("nowhere"))
    return configs


@torch_needed
def test_a_default_feature_cache_or_an_out_that_cannot_be_a_folder_is_one_line(
    tmp_path, folder_data, capsys, monkeypatch
):
    """The feature cache defaults to OUT/../.feature-cache (``--cache-dir``'s help): a file
    there stops the command in one line before anything is trained, as does an --out that is
    a symbolic link to nothing (mkdir would fail on it)."""
    from edgecap.cli import main

    configs = _no_training(monkeypatch)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".feature-cache").write_text("x")
    assert main(["train", "--data", str(folder_data), "--out", str(runs / "first")]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: --cache-dir {runs / '.feature-cache'}: is a file, not a folder\n"
    )
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    assert main(["train", "--data", str(folder_data), "--out", str(link), "--cache-dir", str(runs)]) == 2
    assert capsys.readouterr().err == f"edgecap train: error: --out {link}: is a broken link, not a folder\n"
    assert configs == []


@torch_needed
def test_train_option_defaults_are_the_documented_ones(tmp_path, folder_data, monkeypatch, capsys):
    """docs/training.md: --min-word-count (default 5), --text-share X (default 0.5),
    --shard-size (default 1024); a folder starts from the shipped model (--init-from default)."""
    from edgecap.cli import main
    from edgecap.training.start import init_source

    configs = _no_training(monkeypatch)
    assert main(["train", "--data", str(folder_data), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    (cfg,) = configs
    assert (cfg.min_word_count, cfg.text_share, cfg.shard_size) == (5, 0.5, 1024)
    assert cfg.dataset == "folder" and init_source(cfg).name == "default"


def test_self_critical_training_needs_two_samples_an_image():
    """Each sample's baseline is the mean reward of the image's other samples (a leave-one-out
    baseline): one sample has none, so --scst-samples 1 is refused; 2 is the least."""
    from edgecap.training.config import ScstConfig

    with pytest.raises(ValueError, match="n_samples must be at least 2"):
        ScstConfig(checkpoint="best", data="data", out="run", n_samples=1)
    assert ScstConfig(checkpoint="best", data="data", out="run", n_samples=2).n_samples == 2


@pytest.mark.parametrize(
    "kind, given, problem",
    [
        ("train", {"max_caption_words": 0}, "max_caption_words must be at least 1, got 0"),
        # 0 would clip every gradient to nothing: a run that never learns
        ("train", {"grad_clip": 0}, "grad_clip must be more than 0, got 0"),
        ("train", {"precision": "fp64"}, "precision must be one of fp32, bf16, fp16, got fp64"),
        ("scst", {"images_per_batch": 0}, "images_per_batch must be at least 1, got 0"),
        ("scst", {"max_length": 0}, "max_length must be at least 1, got 0"),
    ],
)
def test_settings_without_a_flag_are_checked_when_the_config_is_made(kind, given, problem):
    """The Python API's TrainConfig and ScstConfig check the settings that `edgecap train` has
    no flag for (or only a choice of) as they check the others: a ValueError naming the
    setting when the config is made, not a run that fails or learns nothing later."""
    from edgecap.training.config import ScstConfig, TrainConfig

    with pytest.raises(ValueError, match=f"^{problem}$"):
        if kind == "train":
            TrainConfig(data="data", out="run", **given)
        else:
            ScstConfig(checkpoint="best", data="data", out="run", **given)


@torch_needed
@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda tmp: tmp / "mistyped", "mistyped: no such folder; --data names the folder"),
        (
            lambda tmp: photo(tmp / "photos" / "a.png", 1).parent,
            "photos: no captions.csv or captions.jsonl (a folder of your photos) and no "
            "Flickr8k.token.txt (Flickr8k)",
        ),
        (lambda tmp: photo(tmp / "one.png", 1), "one.png: not a folder"),
    ],
)
def test_train_data_that_is_not_a_dataset_is_one_line_and_leaves_no_folder(tmp_path, capsys, make, problem):
    from edgecap.cli import main

    data = make(tmp_path)
    out = tmp_path / "runs" / "first"
    assert main(["train", "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecap train: error: ") and err.count("\n") == 1, err
    assert problem in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@torch_needed
def test_a_folder_dataset_that_is_missing_is_one_line(tmp_path, capsys):
    from edgecap.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--dataset", "folder", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"edgecap train: error: {tmp_path / 'nowhere'}: no such "
        "folder; --data names the folder that holds the "
        "captions\n"
    )
    assert not out.exists()


@torch_needed
def test_too_few_words_for_fresh_weights_is_a_data_error(tmp_path):
    from edgecap.data.readers import CaptionedImage
    from edgecap.training.start import initial_model
    from edgecap.training.train import TrainConfig

    cfg = TrainConfig(
        data=str(tmp_path), out=str(tmp_path / "run"), dataset="folder", init_from="none", min_word_count=1
    )
    items = [CaptionedImage("a.png", ["a red ball"]), CaptionedImage("b.png", ["a dog"])]
    with pytest.raises(
        DataError,
        match=r"the training captions give 8 words with "
        r"--min-word-count 1 .*add captions",
    ):
        initial_model(cfg, items, tmp_path / "run" / "last")


@torch_needed
def test_a_resumed_folder_run_keeps_its_vocabulary_when_the_captions_gained_words(checkpoint, tmp_path):
    """docs/training.md: a folder run appends its new training words to the starting model's
    vocabulary; a resumed run (OUT/last holds a checkpoint) goes on with the vocabulary it
    saved, whose rows its weights and optimizer state have: words added to the captions since
    (zorbl, quokka) are not appended again."""
    import shutil

    from edgecap.data.readers import CaptionedImage
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.start import initial_model
    from edgecap.training.train import TrainConfig

    last = tmp_path / "run" / "last"
    shutil.copytree(checkpoint, last)
    saved = load_checkpoint(last)[2].words
    assert "zorbl" not in saved and "quokka" not in saved
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), dataset="folder", min_word_count=1)
    items = [CaptionedImage("a.png", ["a zorbl and a quokka"]), CaptionedImage("b.png", ["a zorbl"])]
    start = initial_model(cfg, items, last, log=lambda *_: None)
    assert start.resuming and start.vocab.words == saved
    assert start.decoder.cfg.vocab_size == len(saved)


@torch_needed
def test_a_dataset_whose_dev_photos_are_all_outside_is_one_error(tmp_path):
    """Each split needs a usable photo: a Flickr8k layout whose only dev photo is outside the
    images folder is a DataError naming the data folder, not a run scored on no photo."""
    from edgecap.training.start import dataset_items

    root = tmp_path / "flickr"
    photo(root / "images" / "a.jpg", 1)
    photo(tmp_path / "elsewhere.jpg", 2)
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\ta cat\n../../elsewhere.jpg#0\ta dog\n")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("../../elsewhere.jpg\n")
    with pytest.raises(DataError, match=f"{root}: no usable dev photo"):
        dataset_items("flickr8k", root, root / "images", report=lambda _: None)


@torch_needed
def test_a_run_that_trains_no_epoch_is_an_error_not_a_missing_checkpoint(tmp_path):
    import shutil

    from edgecap.training.train import TrainConfig, train

    words = "red green blue dog cat ball mat grass sky tree car house boat bird man woman".split()
    rows = [(f"p{i}.png", f"a {words[i]} and a {words[i + 1]} near the {words[i + 2]}") for i in range(6)]
    root = captions_csv(tmp_path / "data", rows)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(root),
        out=str(out),
        dataset="folder",
        init_from="none",
        epochs=1,
        batch_size=6,
        min_word_count=1,
        progress=False,
        threads=1,
        cache_dir=str(tmp_path / "cache"),
        decoder={"hidden_dim": 16, "feature_dim": 16, "embed_dim": 8, "attention_dim": 8},
    )
    assert train(cfg, log=lambda *_: None) == out / "best"
    shutil.rmtree(out / "best")  # last/ says epoch 1 is done: --epochs 1 trains nothing more
    with pytest.raises(
        ModelError,
        match=r"run/best: no best checkpoint \(the run in .* had "
        r"finished 1 epoch of --epochs 1\)",
    ):
        train(cfg, log=lambda *_: None)


@POSIX
@pytest.mark.parametrize(
    "kind, problem",
    [
        ("fifo", "is a named pipe (FIFO), not a regular file"),
        ("huge", "captions file is 314,572,800 bytes, over the limit of 268,435,456"),
    ],
)
def test_a_captions_file_that_is_a_pipe_or_huge_is_one_error(tmp_path, kind, problem):
    root = captions_csv(tmp_path / "data", GOOD)
    special(root / "captions.csv", kind)
    with pytest.raises(DataError) as info:
        read_folder(root)
    assert str(info.value) == f"{root / 'captions.csv'}: {problem}"


# -- class 7: problem reports cannot be forged ----------------------------------------------------
def test_problem_reports_escape_names_as_caption_output_does(tmp_path):
    from edgecap.commands.output import escape_field

    forged = "x.png: fine; row skipped\n/etc/passwd:1: z.png"
    escape = "\x1b[2J\x1b[31mred.png"
    root = captions_csv(
        tmp_path / "data",
        GOOD + [(forged, "a photo"), (escape, "a photo"), ("d.png", "\x1b\x07!")],
        photos=["a.png", "b.png", "c.png"],
    )
    reports = []
    read_folder(root, dev_fraction=0.3, report=reports.append)
    assert len(reports) == 3
    for line in reports:
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line
    by_line = {int(r.split(":")[1]): r for r in reports}  # the rows' lines in captions.csv
    assert escape_field(forged) in by_line[5] and "\\n/etc/passwd" in by_line[5]
    assert by_line[7].split(": ")[1] == "\\x1b[2J\\x1b[31mred.png"
    assert "caption '\\x1b\\x07!' has no words" in by_line[8]


# -- class 8: JSON Lines split at newlines only ---------------------------------------------------
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x1c", "\x1e"])
def test_jsonl_captions_with_unusual_line_separators_are_read(tmp_path, separator):
    root = tmp_path / "data"
    for i, (name, _) in enumerate(GOOD):
        photo(root / name, i)
    lines = [
        json.dumps({"file": n, "caption": f"{c}{separator}and more"}, ensure_ascii=False) for n, c in GOOD
    ]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\r\n", encoding="utf-8")
    data = read_folder(root, dev_fraction=0.3, report=pytest.fail)
    assert sorted(c for it in data.train + data.dev for c in it.captions) == sorted(
        f"{c}{separator}and more" for _, c in GOOD
    )


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x1c", "\x0b"])
def test_jsonl_output_stays_one_line_for_every_line_splitter(separator):
    from edgecap.commands.output import json_line

    record = {"path": f"a{separator}b.png", "caption": f"a cat{separator}sits"}
    line = json_line(record)
    assert line.splitlines() == [line] and len(line.split("\n")) == 1
    assert json.loads(line) == record


# -- class 9: a flood of bad rows is summarised ---------------------------------------------------
def test_thousands_of_bad_rows_are_summarised_with_their_count(tmp_path):
    n_bad = 5000
    root = captions_csv(
        tmp_path / "data",
        GOOD + [(f"gone{i}.png", "?!") for i in range(n_bad)],
        photos=["a.png", "b.png", "c.png"],
    )
    reports = []
    data = read_folder(root, dev_fraction=0.3, report=reports.append)
    assert len(reports) == MAX_REPORTED + 1
    assert reports[-1] == (
        f"{root / 'captions.csv'}: {n_bad - MAX_REPORTED:,} more problems not listed ({n_bad:,} in all)"
    )
    assert data.n_problems == n_bad and len(data.problems) == MAX_REPORTED
    assert len(data.train + data.dev) == 3


def test_the_closing_count_line_escapes_the_captions_file_name(tmp_path):
    """The line counting the problems not listed names the captions file escaped, as every
    other report line does: a newline in the folder's name cannot forge a line."""
    from edgecap.commands.output import escape_field

    n_bad = MAX_REPORTED + 1
    root = captions_csv(
        tmp_path / "data\n/etc/passwd:1: z.png",
        GOOD + [(f"gone{i}.png", "?!") for i in range(n_bad)],
        photos=["a.png", "b.png", "c.png"],
    )
    reports = []
    read_folder(root, dev_fraction=0.3, report=reports.append)
    assert all("\n" not in line for line in reports)
    assert (
        reports[-1]
        == f"{escape_field(str(root / 'captions.csv'))}: 1 more problems not listed ({n_bad} in all)"
    )


@torch_needed
def test_an_out_that_holds_a_run_on_other_data_or_another_dev_split_is_refused(tmp_path, capsys):
    """The same command resumes the run in --out; one with another --data (or, for a folder,
    another --dev-fraction or --seed: another dev split, its former dev photos trained on) is
    refused, exit 2, one line, before any feature is computed; so is one with(out) --text, which
    the optimizer's state was saved without (with). Before: --out runs/mine reused
    for a new folder with the same --epochs 'resumed from runs/mine/last after epoch 2',
    trained nothing and gave back the old run's best as this command's, exit 0; with more
    --epochs it went on with the old folder's vocabulary and best dev CIDEr, and recorded the
    new folder as the checkpoint's training data."""
    from edgecap.cli import main

    words = "red green blue dog cat ball mat grass sky tree car house boat bird man woman".split()
    rows = [(f"p{i}.png", f"a {words[i]} and a {words[i + 1]} near the {words[i + 2]}") for i in range(6)]
    first = captions_csv(tmp_path / "first", rows)
    other = captions_csv(tmp_path / "other", rows[::-1])
    text = tmp_path / "text.txt"
    text.write_text("a red and a green near the blue\n")
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = ["--init-from", "none", "--epochs", "1", "--batch-size", "6", "--min-word-count", "1"]
    flags += ["--no-progress", "--threads", "1", "--cache-dir", str(cache), "--hidden-dim", "16"]
    flags += ["--feature-dim", "16", "--embed-dim", "8", "--attention-dim", "8"]
    assert main(["train", "--data", str(first), "--out", str(out), *flags]) == 0
    capsys.readouterr()
    last = json.loads((out / "last" / "checkpoint.json").read_text())
    last_dir = out / "last"
    cached = sorted(p.name for p in cache.rglob("*"))
    for data, more, problem in (
        (other, [], f"with --data {first}, which this command resumes ({out / 'last'}), not --data {other}"),
        (first, ["--seed", "1"], "with --seed 0, which this command resumes"),
        (first, ["--dev-fraction", "0.5"], "with --dev-fraction 0.2, which this command resumes"),
        # its vocabulary was made with --min-word-count 1, and a resumed run keeps it (ignored before)
        (first, ["--min-word-count", "2"], "with --min-word-count 1, which this command resumes"),
        # its optimizer state has no group for --text's input ('cannot restore the optimizer
        # (... a different number of parameter groups); delete it ...' before)
        (first, ["--text", str(text)], f"without --text, which this command resumes ({last_dir}) with it"),
    ):
        assert main(["train", "--data", str(data), "--out", str(out), *flags, *more]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"edgecap train: error: {out}: holds a run ") and err.count("\n") == 1, err
        assert problem in err
    assert json.loads((out / "last" / "checkpoint.json").read_text()) == last
    assert sorted(p.name for p in cache.rglob("*")) == cached  # nothing of the other folder encoded
    # the same data, spelled otherwise, with the default split given: resumed
    again = ["train", "--data", f"{first}/.", "--out", str(out), *flags, "--dev-fraction", "0.2"]
    assert main([*again, "--epochs", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out


@torch_needed
def test_a_run_with_rows_left_out_trains_on_the_rest_and_exits_1(tmp_path, capsys):
    """As caption does when some inputs were skipped: the run is made, each left-out row was
    reported, the exit status is 1 and the checkpoints record how many were left out; the
    status and count are this run's, not those of an earlier run's best checkpoint."""
    from edgecap.cli import main

    words = "red green blue dog cat ball mat grass sky tree car house boat bird man woman".split()
    rows = [(f"p{i}.png", f"a {words[i]} and a {words[i + 1]} near the {words[i + 2]}") for i in range(6)]
    root = captions_csv(tmp_path / "data", rows + [("../outside.png", "a secret")])
    photo(tmp_path / "outside.png", 9)
    out = tmp_path / "run"
    flags = [
        "--init-from",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--min-word-count",
        "1",
        "--no-progress",
        "--threads",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--hidden-dim",
        "16",
        "--feature-dim",
        "16",
        "--embed-dim",
        "8",
        "--attention-dim",
        "8",
    ]
    assert main(["train", "--data", str(root), "--out", str(out), *flags]) == 1
    captured = capsys.readouterr()
    assert "../outside.png" in captured.err and "row skipped" in captured.err
    assert json.loads(captured.out.splitlines()[-1]) == {"best_checkpoint": str(out / "best"), "left_out": 1}
    meta = json.loads((out / "best" / "checkpoint.json").read_text())
    assert meta["training_data"]["left_out"] == 1
    # run again with no epoch left to train (its checkpoints keep the first run's record of 1):
    # on the data without the bad row nothing is left out, exit 0; on the data with it, the row
    # is reported and counted, exit 1 (the count and status had been the checkpoints' both ways)
    for data_rows, code, said in (
        (rows, 0, {}),
        (rows + [("../outside.png", "a secret")], 1, {"left_out": 1}),
    ):
        data = captions_csv(root, data_rows)
        assert main(["train", "--data", str(data), "--out", str(out), *flags]) == code
        captured = capsys.readouterr()
        assert ("row skipped" in captured.err) == bool(said)
        assert json.loads(captured.out.splitlines()[-1]) == {"best_checkpoint": str(out / "best"), **said}
    # resumed for a second epoch on the data without the bad row (at learning rate 0: epoch 2
    # scores as epoch 1 and best stays epoch 1, whose record says 1): this run left nothing
    # out, so exit 0 and no "left_out", whatever an earlier run's best recorded (the same
    # folder, its captions file rewritten: a run is resumed on its own --data)
    clean = captions_csv(root, rows)
    assert main(["train", "--data", str(clean), "--out", str(out), *flags, "--epochs", "2", "--lr", "0"]) == 0
    captured = capsys.readouterr()
    assert "row skipped" not in captured.err
    assert json.loads(captured.out.splitlines()[-1]) == {"best_checkpoint": str(out / "best")}
    assert json.loads((out / "best" / "checkpoint.json").read_text())["train_state"]["best_epoch"] == 1
    # the same --out with another --init-from: resuming would ignore it, so it is refused
    argv = ["train", "--data", str(clean), "--out", str(out), *flags, "--epochs", "3"]
    assert main([*argv, "--init-from", "default"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds a run started from 'none', which this command resumes" in err
    assert "--init-from default would not be used: give another --out" in err
    # ... and so is another input size: the run's features and checkpoints are at 224 px
    assert main([*argv, "--image-size", "256"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds a run at --image-size 224, which this command resumes" in err
    assert "it would go on at 256: give --image-size 224 to resume, or another --out" in err
    assert json.loads((out / "last" / "checkpoint.json").read_text())["train_state"]["epoch"] == 2


def test_a_run_folder_another_run_holds_is_refused_and_released_at_its_end(tmp_path):
    """Two runs into one --out at once had both written best/, last/ and steps.jsonl: the lock
    a run holds on its folder refuses a second holder, naming the folder, and is free again
    once the first lets go (as the system frees it when a process ends)."""
    from edgecap.errors import EdgecapError
    from edgecap.training.records import RunLock

    out = tmp_path / "run"
    RunLock().take(out)  # no folder yet: nothing to lock (a new run's is made later)
    assert not out.exists()
    out.mkdir()
    with RunLock() as first:
        first.take(out)
        with pytest.raises(EdgecapError, match="another training run is writing this folder now") as info:
            RunLock().take(out)
        assert str(out) in str(info.value)
    second = RunLock()
    second.take(out)
    second.release()


@torch_needed
def test_edgecap_train_into_a_folder_a_running_run_holds_is_one_line_and_writes_nothing(
    tmp_path, folder_data, capsys
):
    from edgecap.cli import main
    from edgecap.training.records import RunLock

    out = tmp_path / "run"
    out.mkdir()
    with RunLock() as running:
        running.take(out)
        assert main(["train", "--data", str(folder_data), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgecap train: error: {out}: another training run is writing this folder now")
    assert sorted(p.name for p in out.iterdir()) == [".edgecap-train.lock"]
