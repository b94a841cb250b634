"""Training at scale (issue 15): the disk feature cache in shards, torchrun / DDP, resuming.

Everything here is synthetic: noise images and word-salad captions made by the tests, stand-in
encoders where the real one is not the point, tiny decoders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import tiny_train_config  # noqa: E402
from edgecap.training.shards import (  # noqa: E402
    cache_name,
    FeatureCacheError,
    ShardedFeatures,
    extract_shards,
    shard_dir,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red blue dog cat runs sits on in grass snow park near big small".split()
DECODER_FLAGS = ["--hidden-dim", "32", "--feature-dim", "32", "--embed-dim", "16", "--attention-dim", "16"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def noise_dataset(tmp_path_factory):
    """9 noise photos (7 train, 2 dev) in the Flickr8k layout, 2 to 4 captions of varied
    length each: ranks' shares of a batch differ in words and captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("noise-set")
    (root / "images").mkdir()
    rng = np.random.default_rng(7)
    names, lines = [], []
    for i in range(9):
        name = f"noise{i}.png"
        names.append(name)
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / name)
        for j in range(2 + i % 3):
            words = rng.choice(WORDS, size=3 + (i + j) % 6)
            lines.append(f"{name}#{j}\t{' '.join(words)}")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:7]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[7:]) + "\n")
    return root


def _train_args(data: Path, out: Path, cache: Path, epochs: int = 2) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--epochs",
        str(epochs),
        "--batch-size",
        "9",
        "--min-word-count",
        "1",
        "--dropout",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--shard-size",
        "3",
        "--lr",
        "0.01",
        *DECODER_FLAGS,
    ]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def test_two_processes_under_torchrun_train_like_one(noise_dataset, tmp_path):
    """Dropout 0: the rest of the run is deterministic, so 2 gloo processes splitting each
    global batch must give one process's per-step losses and final weights."""
    from edgecap.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    # The one-process run in this process (the command's own entry point; --threads 1, as
    # OMP_NUM_THREADS=1 sets for torchrun's): one interpreter and torch import fewer.
    threads = torch.get_num_threads()
    try:
        assert main(_train_args(noise_dataset, one, tmp_path / "cache1")) == 0
    finally:
        torch.set_num_threads(threads)
    # Each rank says when Python tears its interpreter down (atexit, from a sitecustomize):
    # ranks must end without it (edgecap.training.distributed says why).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'RANK' in os.environ:\n"
        "    atexit.register(print, 'teardown of rank', os.environ['RANK'], flush=True)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "edgecap",
            *_train_args(noise_dataset, two, tmp_path / "cache2"),
        ],
        env={**_env(), "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    # the ranks' own output too (torchrun's summary alone names only the signal)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-12000:]
    assert "teardown of rank" not in done.stdout + done.stderr
    assert done.stdout.count('"best_checkpoint"') == 2  # both ranks' output, flushed before the end
    # Each rank extracted its shards (3 shards of 3 images, rank 0: 0 and 2, rank 1: 1), the
    # same features as one process.
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import encoder_tag

    a = ShardedFeatures(shard_dir(tmp_path / "cache1", Preprocessing(), encoder_tag()))
    b = ShardedFeatures(shard_dir(tmp_path / "cache2", Preprocessing(), encoder_tag()))
    assert len(b.records) == 3 and a.names == b.names
    np.testing.assert_allclose(
        a.read(range(9)).astype(np.float32), b.read(range(9)).astype(np.float32), atol=2e-3
    )

    steps_one, steps_two = _steps(one), _steps(two)
    assert [(s["epoch"], s["step"]) for s in steps_one] == [(e, k) for e in (1, 2) for k in (1, 2, 3)]
    assert [(s["epoch"], s["step"]) for s in steps_two] == [(s["epoch"], s["step"]) for s in steps_one]
    for key in ("loss", "grad_norm"):  # Adam hides a wrongly scaled gradient; its norm does not
        np.testing.assert_allclose(
            [s[key] for s in steps_two], [s[key] for s in steps_one], rtol=1e-5, err_msg=key
        )
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        if name == "decoder.att_score.bias":
            # A constant added to every region's score: the softmax cancels it, so its gradient
            # is rounding noise, which Adam turns into full-size steps of either sign.
            continue
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=2e-5, msg=name)
    # The weights moved (a run that learnt nothing would pass the comparisons above too).
    assert max(float(s["loss"]) for s in steps_one) > min(float(s["loss"]) for s in steps_one)
    # Rank 0 alone wrote the checkpoints and the log.
    assert json.loads((two / "last" / "checkpoint.json").read_text())["train_state"]["epoch"] == 2


def test_a_resumed_run_ends_with_the_uninterrupted_weights(noise_dataset, tmp_path):
    """With dropout (0.5): its masks are seeded by seed and epoch, like the data order."""
    import dataclasses

    from edgecap.training.train import train

    def config(out, epochs):
        return tiny_train_config(
            noise_dataset,
            out,
            epochs,
            batch_size=9,
            cache_dir=tmp_path / "cache",
            shard_size=4,
            lr=0.01,
            decoder={"dropout": 0.5},
        )

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(config(whole, 3), log=lambda *_: None)
    train(config(halves, 1), log=lambda *_: None)
    logs = []
    train(dataclasses.replace(config(halves, 3)), log=logs.append)
    assert any("resumed" in line for line in logs)
    assert _steps(halves) == _steps(whole)
    w1, w2 = _weights(whole), _weights(halves)
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name


def test_a_run_stopped_while_writing_its_checkpoint_resumes_to_the_uninterrupted_weights(
    noise_dataset, tmp_path, monkeypatch
):
    """Stopped after epoch 2's weights and training state were written but before its optimizer
    was: ``last`` must still be epoch 1 whole (weights, state and Adam's moments together), so
    the resumed run trains epoch 2 again and ends as the run that was never stopped. Stale
    moments beside newer weights would end elsewhere."""
    from edgecap.training import train as training

    def config(out, epochs):
        return tiny_train_config(
            noise_dataset, out, epochs, batch_size=9, cache_dir=tmp_path / "cache", shard_size=4, lr=0.01
        )

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    training.train(config(whole, 3), log=lambda *_: None)
    real, calls = training._save_optimizer, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_save_optimizer", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        training.train(config(stopped, 3), log=lambda *_: None)
    monkeypatch.setattr(training, "_save_optimizer", real)
    assert json.loads((stopped / "last" / "checkpoint.json").read_text())["train_state"]["epoch"] == 1
    assert sorted(p.name for p in stopped.iterdir() if p.is_dir()) == ["best", "last"]  # no .new

    training.train(config(stopped, 3), log=lambda *_: None)
    w1, w2 = _weights(whole), _weights(stopped)
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name


def test_a_run_stopped_between_the_renames_of_its_last_checkpoint_resumes_from_it(noise_dataset, tmp_path):
    """``last`` renamed away and its complete replacement beside it: the next run resumes from
    the replacement rather than starting again from nothing."""
    import shutil

    from edgecap.training.train import train

    out = tmp_path / "run"
    cfg = tiny_train_config(noise_dataset, out, 1, batch_size=9, cache_dir=tmp_path / "cache")
    train(cfg, log=lambda *_: None)
    shutil.copytree(out / "last", out / "last.new")
    (out / "last").rename(out / "last.old")
    logs: list[str] = []
    train(
        tiny_train_config(noise_dataset, out, 2, batch_size=9, cache_dir=tmp_path / "cache"), log=logs.append
    )
    assert any("resumed" in line and "after epoch 1" in line for line in logs), logs
    assert json.loads((out / "last" / "checkpoint.json").read_text())["train_state"]["epoch"] == 2
    assert not (out / "last.new").exists() and not (out / "last.old").exists()


def test_a_checkpoint_stopped_between_its_renames_is_recovered_whole(tmp_path):
    """The two renames of ``replacing``: stopped after the old folder was renamed away, the
    new (complete) one is taken; a half-written new folder beside an intact one is dropped."""
    from edgecap.models.checkpoint import recover, replacing

    last = tmp_path / "last"
    with replacing(last) as folder:
        (folder / "a.txt").write_text("epoch 1")
    (tmp_path / "last.new").mkdir()  # epoch 2, written whole, then the stop after one rename
    (tmp_path / "last.new" / "a.txt").write_text("epoch 2")
    last.rename(tmp_path / "last.old")
    recover(last)
    assert (last / "a.txt").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    (tmp_path / "last.new").mkdir()  # epoch 3, stopped while being written
    (tmp_path / "last.new" / "a.txt").write_text("epo")
    recover(last)
    assert (last / "a.txt").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    with pytest.raises(OSError), replacing(last) as folder:
        (folder / "a.txt").write_text("epoch 3")
        raise OSError("disk full")
    assert (last / "a.txt").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_first_checkpoint_stopped_while_being_written_is_dropped(tmp_path):
    """No checkpoint yet, and a half-written ``last.new`` (the first save stopped while writing;
    a whole one only ever stands beside ``last.old``): it is removed, not taken as ``last``."""
    from edgecap.models.checkpoint import recover

    (tmp_path / "last.new").mkdir()
    (tmp_path / "last.new" / "a.txt").write_text("epo")
    recover(tmp_path / "last")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_renamed_away_with_no_replacement_beside_it_is_put_back(tmp_path):
    """``last.old`` alone (``last`` renamed away and its replacement gone, removed by hand): it
    is the only copy of the checkpoint, so ``recover`` gives it its name back, not removes it."""
    from edgecap.models.checkpoint import recover

    (tmp_path / "last.old").mkdir()
    (tmp_path / "last.old" / "a.txt").write_text("epoch 1")
    recover(tmp_path / "last")
    assert (tmp_path / "last" / "a.txt").read_text() == "epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_stop_between_the_renames_of_replacing_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    """``replacing`` stopped right after its first rename (``last`` -> ``last.old``), its second
    not made: ``recover`` takes the new folder, so the checkpoint is epoch 2's (the old one is
    removed only once the new one has its name, never before)."""
    from edgecap.models import checkpoint

    last = tmp_path / "last"
    with checkpoint.replacing(last) as folder:
        (folder / "a.txt").write_text("epoch 1")
    real, renames = os.replace, []

    def replace_once(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt), checkpoint.replacing(last) as folder:
        (folder / "a.txt").write_text("epoch 2")
    monkeypatch.undo()
    assert renames == [("last", "last.old"), ("last.new", "last")]
    checkpoint.recover(last)
    assert (last / "a.txt").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc")
def test_a_checkpoints_files_reach_the_disk_before_the_renames_name_it(tmp_path, monkeypatch):
    """A power cut after the renames must not leave ``last`` naming files whose data was still in
    the page cache: every file of the new folder, and the folder, are flushed before the first
    rename, and the parent (the renames) after the last."""
    from edgecap.models import checkpoint

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    tmp_path = Path(os.path.realpath(tmp_path))  # as /proc names the open files
    last = tmp_path / "last"
    with checkpoint.replacing(last) as folder:
        (folder / "model.safetensors").write_bytes(b"epoch 1")
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with checkpoint.replacing(last) as folder:
        (folder / "model.safetensors").write_bytes(b"epoch 2")
        (folder / "optimizer.json").write_text("{}")
    new = str(tmp_path / "last.new")
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [events[i][1:] for i in renames] == [(str(last), str(tmp_path / "last.old")), (new, str(last))]
    synced_before = {e[1] for e in events[: renames[0]] if e[0] == "fsync"}
    assert synced_before >= {f"{new}/model.safetensors", f"{new}/optimizer.json", new}
    assert ("fsync", str(tmp_path)) in events[renames[-1] :]
    assert (last / "model.safetensors").read_bytes() == b"epoch 2"


def test_a_failed_step_leaves_the_steps_before_it_on_disk(noise_dataset, tmp_path, monkeypatch):
    """The step log is written as the run goes, not left in a buffer that an error loses (a
    torchrun rank ends with os._exit, without Python's teardown)."""
    from edgecap.training import train as training

    calls = []
    real = training._optimizer_step

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a peer is gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_optimizer_step", failing)
    out = tmp_path / "run"
    cfg = tiny_train_config(noise_dataset, out, 1, batch_size=9, cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="a peer is gone") as failure:
        training.train(cfg, log=lambda *_: None)
    # read while the error's traceback (and with it the run's frame) is alive, as it is when a
    # rank prints it and ends
    assert [(s["epoch"], s["step"]) for s in _steps(out)] == [(1, 1), (1, 2)]
    assert failure.traceback


def _fake_features(n_rows: int, shape=(49, 1280)):
    """Stand-in load/encode: image i's features are all (i % 251)."""

    def load(path):
        return np.array([int(Path(path).stem.split("-")[1])], dtype=np.float32)

    def encode(x):
        return np.broadcast_to((x[:, 0] % 251)[:, None, None], (len(x), *shape)).astype(np.float32)

    names = [f"img-{i:06d}.jpg" for i in range(n_rows)]
    return names, load, encode


_STREAM = """
import resource, sys
import numpy as np
from edgecap.training.shards import ShardedFeatures
features = ShardedFeatures(sys.argv[1])
order = np.random.default_rng(0).permutation(len(features))
total = float(features[order[:32]].double().sum())  # warm-up: the allocator's first batch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = 0.0
for start in range(0, len(order), 32):
    total += float(features[order[start:start + 32]].double().sum())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, total)
"""


def test_the_shard_cache_streams_in_bounded_memory(tmp_path):
    n = 1200  # 1200 x 49 x 1280 float16: 150 MB on disk
    names, load, encode = _fake_features(n)
    cache = extract_shards(
        names, tmp_path / "shards", load, encode, shard_size=100, batch_size=50, log=lambda *_: None
    )
    size = sum(r["bytes"] for r in cache.records)
    assert size > 150e6
    # glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps a batch's
    # freed temporaries (float16, float32, float64 copies) in its heap: 8-56 MB more peak
    # resident memory, varying from run to run, that the reader does not hold. A fixed threshold
    # returns them at once, so the peak measures what the reader keeps.
    done = subprocess.run(
        [sys.executable, "-c", _STREAM, str(tmp_path / "shards")],
        env={**_env(), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    before_kb, after_kb, total = done.stdout.split()
    # Every row was read (the sum of all features), in a peak memory far below the cache's.
    assert float(total) == 49 * 1280 * sum(i % 251 for i in range(n))
    assert (int(after_kb) - int(before_kb)) * 1024 < size / 8


def test_extraction_resumes_after_an_interruption_and_recomputes_a_corrupt_shard(tmp_path):
    names, load, encode = _fake_features(10, shape=(49, 8))
    quiet = {"shard_size": 4, "batch_size": 2, "log": lambda *_: None}
    reference = extract_shards(names, tmp_path / "whole", load, encode, **quiet).read(range(10))

    calls = []

    def failing(x):
        if len(calls) == 3:  # shard 0 (2 batches) done, shard 1 half done
            raise RuntimeError("injected failure")
        calls.append(x[:, 0].astype(int).tolist())
        return encode(x)

    directory = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected"):
        extract_shards(names, directory, load, failing, **quiet)
    assert (directory / "shard-00000.json").exists() and not (directory / "index.json").exists()
    first = (directory / "shard-00000.npy").stat().st_mtime_ns

    encoded = []

    def counting(x):
        encoded.extend(x[:, 0].astype(int).tolist())
        return encode(x)

    cache = extract_shards(names, directory, load, counting, **quiet)
    assert encoded == list(range(4, 10))  # shard 0 kept, the partial shard 1 redone, then 2
    assert (directory / "shard-00000.npy").stat().st_mtime_ns == first
    np.testing.assert_array_equal(cache.read(range(10)), reference)
    np.testing.assert_array_equal(cache.read([9, 0, 5, 4]), reference[[9, 0, 5, 4]])
    cache.close()

    # A flipped byte (same size): the checksum catches it and only that shard is redone.
    shard = directory / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    encoded.clear()
    logs = []
    cache = extract_shards(names, directory, load, counting, **{**quiet, "log": logs.append})
    assert encoded == [4, 5, 6, 7] and any("checksum mismatch" in line for line in logs)
    np.testing.assert_array_equal(cache.read(range(10)), reference)
    cache.close()

    # A truncated shard: opening the cache says which file and what to do.
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.npy: corrupt feature shard .*rerun"):
        ShardedFeatures(directory)


def test_the_cache_is_keyed_by_the_preprocessing(tmp_path):
    from edgecap.preprocess import Preprocessing
    from edgecap.training.features import encoder_tag

    assert shard_dir(tmp_path, Preprocessing()) == shard_dir(tmp_path, Preprocessing())
    assert shard_dir(tmp_path, Preprocessing()) != shard_dir(tmp_path, Preprocessing(size=(192, 192)))
    assert shard_dir(tmp_path, Preprocessing()) != shard_dir(tmp_path, Preprocessing(), "another-encoder")
    # without a tag: the folder `edgecap train` fills, the default encoder's with its weights
    assert shard_dir(tmp_path, Preprocessing()) == shard_dir(tmp_path, Preprocessing(), encoder_tag())


def test_more_images_extend_the_cache_and_keep_its_full_shards(tmp_path):
    names, load, encode = _fake_features(10, shape=(49, 8))
    quiet = {"shard_size": 4, "batch_size": 4, "log": lambda *_: None}
    extract_shards(names[:6], tmp_path, load, encode, **quiet).close()
    encoded = []

    def counting(x):
        encoded.extend(x[:, 0].astype(int).tolist())
        return encode(x)

    cache = extract_shards(names, tmp_path, load, counting, **quiet)
    assert encoded == [4, 5, 6, 7, 8, 9]  # shard 0 kept; shard 1 had 2 images, now 4
    assert cache.names == {cache_name(n): i for i, n in enumerate(names)}


def test_photos_of_one_name_in_two_folders_keep_their_own_features(tmp_path):
    # Two photo folders trained with one cache directory (the default: OUT/../.feature-cache).
    def load(path):
        return np.array([1.0 if Path(path).parent.name == "b" else 0.0], dtype=np.float32)

    def encode(x):
        return np.broadcast_to(x[:, 0][:, None, None], (len(x), 2, 3)).astype(np.float32)

    quiet = {"shard_size": 4, "log": lambda *_: None}
    extract_shards([tmp_path / "a" / "x.jpg"], tmp_path / "cache", load, encode, **quiet).close()
    cache = extract_shards([tmp_path / "b" / "x.jpg"], tmp_path / "cache", load, encode, **quiet)
    rows = [cache.names[cache_name(tmp_path / d / "x.jpg")] for d in "ab"]
    assert cache.read(rows)[:, 0, 0].tolist() == [0.0, 1.0]


def _two_project_folders(tmp_path: Path):
    """Two working folders, each with its own ``ds/p.jpg`` (1 byte in the first, 2 in the
    second), and a photo ``new/q.jpg`` (3 bytes) in the second; load/encode make a photo's
    features its size in bytes; ``encoded``: the sizes encoded."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, size in ((first, 1), (second, 2)):
        (folder / "ds").mkdir(parents=True)
        (folder / "ds" / "p.jpg").write_bytes(b"x" * size)
    (second / "new").mkdir()
    (second / "new" / "q.jpg").write_bytes(b"xxx")
    encoded: list[int] = []

    def load(path):
        return np.array([len(Path(path).read_bytes())], dtype=np.float32)

    def encode(x):
        encoded.extend(x[:, 0].astype(int).tolist())
        return np.broadcast_to(x[:, 0][:, None, None], (len(x), 2, 3)).astype(np.float32)

    return first, second, load, encode, encoded


def test_a_cache_shared_by_runs_from_two_folders_keeps_each_photos_own_features(tmp_path, monkeypatch):
    """docs/training.md: photos are keyed by absolute path, size and time, so two folders can
    share a --cache-dir. Runs given relative paths (``--data ds``) from two working folders:
    the second run's photo joins the first's shard, which is recomputed, and the first run's
    photo in it is read where it is, not as ``ds/p.jpg`` from the second folder (whose own
    ds/p.jpg's features had been put under the first's name, and trained on by the first run
    again without a word); the first folder's run then finds its features as they were."""
    first, second, load, encode, encoded = _two_project_folders(tmp_path)
    quiet = {"shard_size": 4, "log": lambda *_: None}
    cache = tmp_path / "cache"
    monkeypatch.chdir(first)
    extract_shards([Path("ds/p.jpg")], cache, load, encode, **quiet).close()
    monkeypatch.chdir(second)
    extract_shards([Path("new/q.jpg")], cache, load, encode, **quiet).close()
    assert encoded == [1, 1, 3]  # the shard again: the first folder's photo (1 byte), the new one
    monkeypatch.chdir(first)
    features = extract_shards([Path("ds/p.jpg")], cache, load, encode, **quiet)
    assert encoded == [1, 1, 3]  # nothing to recompute
    assert features.read([features.names[cache_name(first / "ds" / "p.jpg")]])[0, 0, 0] == 1.0


def test_a_row_whose_stored_path_names_another_photo_now_is_left_empty_not_filled_with_it(
    tmp_path, monkeypatch
):
    """A plan written before paths were kept whole holds ``ds/p.jpg`` as given; recomputing its
    shard from another folder, that path names that folder's photo. Its row is left empty
    (absent), not filled with the other photo's features under the first's name; the first
    folder's run then encodes its photo again."""
    first, second, load, encode, encoded = _two_project_folders(tmp_path)
    quiet = {"shard_size": 4, "log": lambda *_: None}
    cache = tmp_path / "cache"
    monkeypatch.chdir(first)
    extract_shards([Path("ds/p.jpg")], cache, load, encode, **quiet).close()
    (plan_path,) = cache.glob("**/plan.json")
    plan = json.loads(plan_path.read_text())
    plan_path.write_text(json.dumps({**plan, "paths": ["ds/p.jpg"]}))  # as such a plan was
    monkeypatch.chdir(second)
    extract_shards([Path("new/q.jpg")], cache, load, encode, **quiet).close()
    assert encoded == [1, 3]  # the second folder's ds/p.jpg (2 bytes) was not read for it
    monkeypatch.chdir(first)
    features = extract_shards([Path("ds/p.jpg")], cache, load, encode, **quiet)
    assert encoded == [1, 3, 1, 3]  # wanted again: the shard recomputed with it
    assert features.read([features.names[cache_name(first / "ds" / "p.jpg")]])[0, 0, 0] == 1.0


def test_a_batch_of_scattered_rows_reads_exactly_those_rows(tmp_path):
    # A shuffled batch: rows with gaps between them in one shard, a repeat, rows of three
    # shards; the stand-in encoder makes image i's features all i.
    names, load, encode = _fake_features(10, shape=(2, 3))
    cache = extract_shards(names, tmp_path, load, encode, shard_size=4, log=lambda *_: None)
    rows = [2, 0, 7, 5, 9, 3, 3, 8]
    assert cache.read(rows)[:, 0, 0].tolist() == rows
    assert cache[[6, 4]][:, 1, 2].tolist() == [6.0, 4.0]
    cache.close()


def test_a_photo_the_run_asks_for_that_cannot_be_read_is_an_error_not_an_empty_row(tmp_path):
    # Only photos of earlier runs that this run does not ask for may be left empty ("absent").
    from edgecap.errors import InputError

    names, load, encode = _fake_features(6, shape=(2, 3))

    def load_or_fail(path):
        if path == names[4]:
            raise InputError(path, "not a photo")
        return load(path)

    with pytest.raises(InputError, match="img-000004.jpg: not a photo"):
        extract_shards(names, tmp_path, load_or_fail, encode, shard_size=4, log=lambda *_: None)
    assert not (tmp_path / "shard-00001.json").exists() and not (tmp_path / "index.json").exists()


def test_a_cache_keeps_the_shard_size_it_was_started_with(tmp_path):
    # docs/training.md: "a cache keeps the size it was started with" -- another --shard-size
    # on a later run re-encodes nothing that is cached.
    names, load, encode = _fake_features(10, shape=(2, 3))
    extract_shards(names[:6], tmp_path, load, encode, shard_size=4, log=lambda *_: None).close()
    encoded = []

    def counting(x):
        encoded.extend(x[:, 0].astype(int).tolist())
        return encode(x)

    cache = extract_shards(names, tmp_path, load, counting, shard_size=2, log=lambda *_: None)
    assert cache.shard_size == 4
    assert encoded == [4, 5, 6, 7, 8, 9]  # shard 0 kept; shard 1 had 2 images, now 4; shard 2
    assert sorted(p.name for p in tmp_path.glob("shard-*.npy")) == [f"shard-0000{s}.npy" for s in range(3)]
    assert cache.read(range(10))[:, 0, 0].tolist() == list(range(10))
    cache.close()


def test_under_torchrun_each_rank_encodes_its_own_shards(tmp_path):
    """Each rank extracts the shards rank, rank + world, ... (two threads stand in for two
    processes): 3 shards of 3 photos, rank 0 encodes shards 0 and 2, rank 1 shard 1 (not every
    shard on every rank, both writing each one's files); both read the whole cache."""
    import threading

    names, load, encode = _fake_features(9, shape=(2, 3))
    barrier = threading.Barrier(2)

    class Rank:  # what extract_shards uses of distributed.Dist
        def __init__(self, rank):
            self.rank, self.world, self.active = rank, 2, False

        def barrier(self):
            barrier.wait()

    encoded: dict[int, list[int]] = {0: [], 1: []}
    read = {}

    def extract(rank):
        def counting(x):
            encoded[rank].extend(x[:, 0].astype(int).tolist())
            return encode(x)

        try:
            cache = extract_shards(
                names, tmp_path, load, counting, shard_size=3, log=lambda *_: None, dist=Rank(rank)
            )
            read[rank] = cache.read(range(9))[:, 0, 0].tolist()
            cache.close()
        except BaseException:
            barrier.abort()  # the other rank stops waiting
            raise

    threads = [threading.Thread(target=extract, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(encoded[0]) == [0, 1, 2, 6, 7, 8] and sorted(encoded[1]) == [3, 4, 5]
    assert read == {0: list(range(9)), 1: list(range(9))}


def test_a_cold_feature_cache_leaves_the_seeded_draws_as_a_warm_one_does(tmp_path):
    """The weights a run draws once its features are ready (the "no image" input of --text) are
    the same whether it encoded its photos (loading the encoder, whose initialisation draws
    random numbers) or found them cached: the same command, run again, is the same run."""
    from PIL import Image

    from edgecap.data.readers import CaptionedImage
    from edgecap.preprocess import Preprocessing
    from edgecap.training.shards import streamed_split

    for k in range(2):
        Image.new("RGB", (8, 8), (10 * (k + 1), 0, 0)).save(tmp_path / f"p{k}.png")
    items = [CaptionedImage(f"p{k}.png", ["a caption"]) for k in range(2)]
    draws = []
    for _ in ("cold", "warm"):
        torch.manual_seed(0)
        _, _, features = streamed_split(
            items[:1], items[1:], tmp_path, tmp_path / "cache", Preprocessing(size=(64, 64)), False
        )
        features.close()
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("shape", [[3, 2], [2, 2]])  # the same bytes per row, fewer
def test_an_index_whose_shape_disagrees_with_its_shards_is_refused(tmp_path, shape):
    names, load, encode = _fake_features(6, shape=(2, 3))
    extract_shards(names, tmp_path, load, encode, shard_size=4, log=lambda *_: None).close()
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "shape": shape}))
    problem = rf"rows of \[2, 3\], the index says \[{shape[0]}, {shape[1]}\]"
    with pytest.raises(FeatureCacheError, match=rf"shard-00000\.npy: corrupt feature shard \({problem}\)"):
        ShardedFeatures(tmp_path)


@pytest.mark.parametrize(
    "rewrite, problem",
    [
        (lambda a: a.reshape(4, 3, 2), r"shape \(4, 3, 2\) float16, expected \(4, 2, 3\) float16"),
        (lambda a: a.view(np.int16), r"shape \(4, 2, 3\) int16, expected \(4, 2, 3\) float16"),
        (np.asfortranarray, r"unreadable header \(Fortran order\)"),
    ],
    ids=["shape", "dtype", "fortran"],
)
def test_a_shard_whose_header_no_longer_matches_its_record_is_refused_when_opened(tmp_path, rewrite, problem):
    # The same bytes of data under another header: read as the record says, they would be
    # features of other shapes or values.
    names, load, encode = _fake_features(8, shape=(2, 3))
    extract_shards(names, tmp_path, load, encode, shard_size=4, log=lambda *_: None).close()
    shard = tmp_path / "shard-00001.npy"
    size = shard.stat().st_size
    np.save(shard, rewrite(np.load(shard)))
    assert shard.stat().st_size == size
    with pytest.raises(FeatureCacheError, match=rf"shard-00001\.npy: corrupt feature shard \({problem}\)"):
        ShardedFeatures(tmp_path)


def test_a_shard_cut_short_while_the_cache_is_open_is_an_error_not_stale_memory(tmp_path):
    names, load, encode = _fake_features(8, shape=(2, 3))
    cache = extract_shards(names, tmp_path, load, encode, shard_size=4, log=lambda *_: None)
    shard = tmp_path / "shard-00001.npy"
    os.truncate(shard, shard.stat().st_size - 2 * 3 * 2)  # its last row (image 7) gone
    assert cache.read([4, 5, 6])[:, 0, 0].tolist() == [4, 5, 6]
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.npy: short read"):
        cache.read([6, 7])
    cache.close()


def test_streamed_split_gives_each_photo_its_own_features_in_either_split(tmp_path, monkeypatch):
    """What ``edgecap train`` trains and evaluates on: the train rows and the dev features are
    those of the split's own photos, also when a later run splits the cached photos otherwise."""
    from PIL import Image

    from edgecap.data.readers import CaptionedImage
    from edgecap.preprocess import Preprocessing
    from edgecap.training import shards

    for k in range(5):  # photo k: solid red of level 10 * (k + 1)
        Image.new("RGB", (8, 8), (10 * (k + 1), 0, 0)).save(tmp_path / f"p{k}.png")
    loaded = []

    def stand_in(device, variant):  # a photo's features: its red level, recovered
        loaded.append(variant)
        return lambda x: np.broadcast_to(
            np.rint(x[:, 0, 0, 0] * 127.5 + 127.5)[:, None, None], (len(x), 2, 3)
        ).astype(np.float32)

    monkeypatch.setattr(shards, "image_encoder", stand_in)
    items = [CaptionedImage(f"p{k}.png", ["a caption"]) for k in range(5)]
    quiet = {"progress": False, "shard_size": 2, "log": lambda *_: None}
    train_rows, dev_fmaps, features = shards.streamed_split(
        items[:3], items[3:], tmp_path, tmp_path / "cache", Preprocessing(), **quiet
    )
    assert features.read(train_rows)[:, 0, 0].tolist() == [10, 20, 30]
    assert dev_fmaps.shape == (2, 2, 3) and dev_fmaps[:, 1, 2].tolist() == [40, 50]
    features.close()
    train_rows, dev_fmaps, features = shards.streamed_split(
        items[3:] + items[:1], items[1:3], tmp_path, tmp_path / "cache", Preprocessing(), **quiet
    )
    assert features.read(train_rows)[:, 0, 0].tolist() == [40, 50, 10]
    assert dev_fmaps[:, 0, 0].tolist() == [20, 30]
    assert len(loaded) == 1  # the second run: all cached, no encoder loaded
    features.close()


@pytest.mark.parametrize("split", ["streamed_split", "split_features"])  # frozen, fine-tuned encoder
def test_photos_missing_from_the_images_folder_are_counted_before_any_photo_is_encoded(
    tmp_path, monkeypatch, split
):
    """A split file that names photos the images folder lacks stops the run in one line that
    counts them, before the cache is made or any photo read (not at the first one missing, after
    the photos before it are encoded)."""
    from PIL import Image

    from edgecap.data.readers import CaptionedImage
    from edgecap.errors import DataError
    from edgecap.models import efficientnet_lite
    from edgecap.preprocess import Preprocessing
    from edgecap.training import features, shards

    for k in range(2):
        Image.new("RGB", (8, 8), (10 * (k + 1), 0, 0)).save(tmp_path / f"p{k}.png")
    monkeypatch.setattr(shards, "image_encoder", lambda *a: pytest.fail("a photo encoded"))
    monkeypatch.setattr(efficientnet_lite, "load_pretrained", lambda *a: pytest.fail("a photo encoded"))
    items = [CaptionedImage(f"p{k}.png", ["a caption"]) for k in range(4)]  # p2, p3: missing
    function = getattr(shards if split == "streamed_split" else features, split)
    with pytest.raises(DataError, match=r"^2 photos are missing, e\.g\. .*p2\.png, .*p3\.png$"):
        function(items[:3], items[3:], tmp_path, tmp_path / "cache", Preprocessing(), progress=False)
    assert not (tmp_path / "cache").exists()


def test_each_rank_trains_on_a_disjoint_share_of_the_same_global_batches():
    from edgecap.training.train import _Batches
    from edgecap.vocab import Vocabulary

    class Item:
        def __init__(self, i):
            self.file_name, self.captions = f"{i}.jpg", ["a cat"] * (1 + i % 3)

    items = [Item(i) for i in range(11)]
    vocab = Vocabulary.build(["a cat"], min_count=1)
    batches = _Batches(items, list(range(100, 111)), vocab, 22)

    def shares(rank, world):
        import random

        return list(batches.shares(8, random.Random("0:1"), rank, world))

    whole = shares(0, 1)
    for world in (2, 4):  # 4: the last batch (3 images) leaves one rank at weight 0
        parts = [shares(r, world) for r in range(world)]
        assert all(len(p) == len(whole) for p in parts)
        for k, (rows, caps, _, totals, weight) in enumerate(whole):
            assert weight == 1.0
            mine = [p[k] for p in parts if p[k][4] > 0]
            assert sorted(r for m in mine for r in m[0]) == sorted(rows)  # disjoint, complete
            assert sum(len(m[1]) for m in mine) == len(caps)
            assert all(m[3] == totals and m[4] == world for m in mine)  # the global counts


def test_a_rank_takes_its_place_from_torchruns_global_variables(monkeypatch):
    """torchrun on 2 nodes of 2 processes: the second process of the second node has RANK 3,
    WORLD_SIZE 4, LOCAL_RANK 1 (LOCAL_WORLD_SIZE 2). Its rank and world are the global ones (its
    share of each batch, not rank 0's duty of writing checkpoints); LOCAL_RANK only picks its
    GPU. Without a GPU the group is gloo's, started once: a second ``train`` in the same process
    (a script's) finds it up and starts none."""
    from edgecap.training import distributed

    started = []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(distributed.torch_dist, "init_process_group", lambda backend: started.append(backend))
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.world_size(env) == 4
    dist = distributed.setup(env)
    assert (dist.rank, dist.world, dist.local_rank, dist.device) == (3, 4, 1, torch.device("cpu"))
    assert (dist.main, dist.active) == (False, True)
    assert started == ["gloo"]
    assert distributed.setup(env).rank == 3 and started == ["gloo"]  # not started twice
    # node 2's first process: local rank 0, but not the main process
    first = distributed.setup({**env, "RANK": "2", "LOCAL_RANK": "0"})
    assert (first.rank, first.main) == (2, False)
    # without torchrun: one process, no group
    started.clear()
    alone = distributed.setup({})
    assert (alone.rank, alone.world, alone.main, alone.active, started) == (0, 1, True, False, [])
    assert alone.all_sum([1.5, 2.0]) == [1.5, 2.0] and alone.from_main("x") == "x"


TWO_RANKS = """
import os
from edgecap.training.distributed import setup

dist = setup()
sums = dist.all_sum([dist.rank + 1.0, 0.5])
told = dist.from_main("stop" if dist.main else None)
dist.barrier()
print(dist.rank, sums, told, flush=True)
os._exit(0)  # no teardown of the gloo group (edgecap.training.distributed)
"""


@pytest.fixture
def two_ranks_env():
    """The environment of two gloo ranks as torchrun starts them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), less RANK: their rendezvous store served here, on a port this process
    has bound (port 0: the system's pick, held for the test), which both ranks join as clients
    (TORCHELASTIC_USE_AGENT_STORE, as torchrun's agent serves it). A port found free here and
    let go before rank 0 bound it could be taken meanwhile by another test's server or
    connection (xdist workers side by side): rank 0 could not serve, or rank 1 met a stranger."""
    import datetime

    from torch.distributed import TCPStore

    store = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=120)
    )
    yield {
        **_env(),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "CUDA_VISIBLE_DEVICES": "",
    }
    del store


def test_ranks_sum_their_values_and_all_hear_rank_0s_decision(two_ranks_env):
    """Two gloo processes, as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT): each gets
    the sum over the ranks (1 + 2, 0.5 + 0.5) and rank 0's word (its patience ran out: "stop"),
    so that every rank leaves the epoch loop together, not rank 1 waiting for a collective."""
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_RANKS],
            env={**two_ranks_env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting for a collective
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert [out for out, _ in outputs] == ["0 [3.0, 1.0] stop\n", "1 [3.0, 1.0] stop\n"]


WAIT_FOR_THE_CACHE = """
import datetime, os, sys
from pathlib import Path
import torch.distributed as torch_dist
from edgecap.training import distributed, shards

# a rank left waiting ends in 2 minutes, not torchrun's 10 or 30
torch_dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
shards.LOCK_POLL_S = 0.05
heard = []  # rank 0's word, as this rank got it, at each of rank 0's tries of the lock
told = distributed.Dist.from_main
distributed.Dist.from_main = lambda self, value: heard.append(told(self, value)) or heard[-1]
dist = distributed.setup()
lock = Path(sys.argv[1]) if dist.main else None
with shards.cache_lock(lock, lambda m: print(m, file=sys.stderr, flush=True), dist):
    dist.barrier()  # the extraction's first collective
print(dist.rank, heard, flush=True)
os._exit(0)  # no teardown of the gloo group (edgecap.training.distributed)
"""


def test_ranks_wait_together_for_a_feature_cache_another_run_is_filling(tmp_path, two_ranks_env):
    """Another run holds the feature cache's lock: rank 0 waits for the lock and rank 1 with
    it, hearing from rank 0 at every try (a collective each, shorter than the process group's
    timeout, torchrun's 10 or 30 minutes beside another run's whole extraction), instead of
    rank 1 waiting in the extraction's first collective while rank 0 waits on the lock, for
    as long as the lock is held, and timing out. The lock is let go once rank 0 has said that
    it waits (its first try failed), so both ranks hear "not yet" before "yes", whatever the
    machine's load (no timing)."""
    import ast
    import fcntl

    lock = tmp_path / ".lock"
    said = []  # rank 0's stderr until it says it waits
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", WAIT_FOR_THE_CACHE, str(lock)],
                env={**two_ranks_env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in (0, 1)
        ]
        # (a rank 0 that fails or times out first ends its stderr: no hang here)
        for line in iter(ranks[0].stderr.readline, ""):
            said.append(line)
            if "another process is filling this feature cache; waiting for it" in line:
                break
    try:
        outputs = [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting for a collective
            p.kill()
    outputs[0] = (outputs[0][0], "".join(said) + outputs[0][1])
    assert [p.returncode for p in ranks] == [0, 0], outputs
    # every try's answer reached rank 1: "not yet" (at least once: the lock was held) then "yes"
    heard = [out.split(" ", 1) for out, _ in outputs]
    assert [rank for rank, _ in heard] == ["0", "1"] and heard[0][1] == heard[1][1], outputs
    answers = ast.literal_eval(heard[0][1])
    assert len(answers) >= 2 and not any(answers[:-1]) and answers[-1] is True, answers
    assert "another process is filling this feature cache; waiting for it" in outputs[0][1]
    assert "waiting" not in outputs[1][1]  # said once, by rank 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_mixed_precision_without_cuda_is_refused_in_one_line(tmp_path, capsys):
    from edgecap.cli import main

    assert (
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--precision", "bf16"]) == 2
    )
    assert capsys.readouterr().err == (
        "edgecap train: error: --precision bf16 needs a CUDA device (mixed precision runs on GPUs only)\n"
    )


def test_under_torchrun_the_unsupported_modes_are_refused(tmp_path, monkeypatch, capsys):
    from edgecap.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        "edgecap.training.train.setup", lambda env=None: pytest.fail("must refuse before starting a group")
    )
    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    for flags in (["--scst-from", str(tmp_path)], ["--finetune-encoder"]):
        assert main([*base, *flags]) == 2
        assert "runs in one process" in capsys.readouterr().err


def test_a_run_reads_the_shard_cache_of_its_own_encoder(tmp_path, monkeypatch):
    """``streamed_split`` (what ``edgecap train`` calls) asks for the cache folder of the encoder
    it trains on: a Lite2 run never reads the features Lite0 wrote for the same photos."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.preprocess import Preprocessing
    from edgecap.training import shards
    from edgecap.training.features import encoder_tag

    (tmp_path / "photo.png").write_bytes(b"")  # only its existence is checked before the cache
    asked = []

    def fake_extract(paths, directory, *args, **kwargs):
        asked.append(Path(directory))
        raise RuntimeError("stop here")

    monkeypatch.setattr(shards, "extract_shards", fake_extract)
    item = CaptionedImage("photo.png", ["a caption"])
    for name in ("efficientnet-lite0", "efficientnet-lite2"):
        with pytest.raises(RuntimeError, match="stop here"):
            shards.streamed_split(
                [item], [], tmp_path, tmp_path / "cache", Preprocessing(), progress=False, encoder_name=name
            )
    assert asked == [
        shard_dir(tmp_path / "cache", Preprocessing(), encoder_tag(name))
        for name in ("efficientnet-lite0", "efficientnet-lite2")
    ]
    assert asked[0] != asked[1]


RANK_END = """
import atexit, sys
import torch.distributed as dist
from edgecap import cli

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
atexit.register(print, "teardown", flush=True)
fail = sys.argv[2]


class Command:  # every command's module: add_arguments, run
    def add_arguments(parser):
        pass

    def run(args):
        print("ran", flush=False)  # flushed by the end, not by the teardown
        if fail == "uncaught":
            raise RuntimeError("gloo peer gone")
        if fail == "exit-message":
            raise SystemExit("cannot go on")
        if fail == "exit-bare":
            sys.exit()
        if fail == "exit-code":
            sys.exit(3)
        if fail == "error":
            from edgecap.errors import DataError

            raise DataError("no such split")
        return 0


cli._load = lambda module: Command
sys.argv = ["edgecap", "train"]
cli.run_command()
"""


@pytest.mark.parametrize(
    ("fail", "code"),
    [("none", 0), ("error", 2), ("uncaught", 1), ("exit-message", 1), ("exit-bare", 0), ("exit-code", 3)],
)
def test_a_rank_ends_without_teardown_whatever_the_command_did(tmp_path, fail, code):
    """The edgecap command in a process with a process group (a torchrun rank) ends with
    os._exit after flushing its output, on success, on an error it reports and on an uncaught
    exception (its traceback printed): never through the interpreter's teardown, which gloo's
    threads do not survive safely (edgecap.training.distributed). A ``sys.exit`` ends it as
    Python would: a message printed, exit 1; no argument, exit 0; a number, that status, and
    nothing printed for either."""
    done = subprocess.run(
        [sys.executable, "-c", RANK_END, str(tmp_path / "store"), fail],
        env={k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"},  # output buffered
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == code, done.stderr
    assert done.stdout == "ran\n"  # no "teardown"
    assert ("RuntimeError: gloo peer gone" in done.stderr) == (fail == "uncaught")
    assert ("edgecap train: error: no such split" in done.stderr) == (fail == "error")
    assert ("cannot go on" in done.stderr) == (fail == "exit-message")
    if fail.startswith("exit-") or fail == "none":
        assert done.stderr == ("cannot go on\n" if fail == "exit-message" else "")


def test_the_edgecap_command_ends_like_python_m_edgecap():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "edgecap"]
    assert script.value == "edgecap.cli:run_command"
