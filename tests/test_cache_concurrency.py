"""Two processes filling one feature cache at once: runs of a sweep started side by side share
the default cache OUT/../.feature-cache (``training.config.feature_cache``), or one --cache-dir.
Each process must finish with its own photos' features; the second waits for the first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# argv: cache folder, photo folder, the go file both wait for. Each photo's feature is a number
# from its folder and name; the encoder is slow, so that the two extractions overlap.
_SHARDS = """
import os, sys, time, zlib
from pathlib import Path
import numpy as np
from edgecap.training.shards import extract_shards, cache_name

cache, folder, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
paths = [folder / f"{i}.png" for i in range(6)]
def value(p):
    return float(zlib.crc32(str(Path(p).resolve()).encode()) % 1000)
def load(p):
    return np.full((3,), value(p), np.float32)
def encode(x):
    time.sleep(0.2)
    return np.repeat(x[:, None, :], 2, axis=1)
(go.parent / f"ready-{os.getpid()}").write_text("")
while not go.exists():
    time.sleep(0.005)
features = extract_shards(paths, cache, load, encode, shard_size=4, batch_size=2, log=lambda m: None)
got = features.read([features.names[cache_name(p)] for p in paths])[:, 0, 0]
want = np.array([value(p) for p in paths], np.float16)
print("OK" if np.array_equal(got, want) else f"WRONG {got.tolist()} {want.tolist()}")
"""

_SINGLE_FILE = """
import os, sys, time
from pathlib import Path
import numpy as np
from edgecap.models import efficientnet_lite
from edgecap.preprocess import Preprocessing
from edgecap.training.features import cache_name, compute_features

class Slow:  # every feature of a photo is its mean input (its grey level)
    def regions(self, x):
        time.sleep(0.2)
        return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 2, 3)

efficientnet_lite.load_pretrained = lambda *_: Slow()
cache, folder, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
paths = sorted(folder.glob("*.png"))
pre = Preprocessing(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
(go.parent / f"ready-{os.getpid()}").write_text("")
while not go.exists():
    time.sleep(0.005)
maps, index = compute_features(paths, cache, pre, batch_size=1, progress=False)
got = [round(float(maps[index[cache_name(p)]][0, 0])) for p in paths]
want = [int(p.stem) for p in paths]
print("OK" if got == want else f"WRONG {got} {want}")
"""


def _two_at_once(tmp_path: Path, source: str, folders: list[Path]) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "fill.py"
    script.write_text(source)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(folder), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for folder in folders
    ]
    deadline = time.monotonic() + 120  # both ready (imports done) before they are let go together
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_runs_filling_one_shard_cache_at_once_each_get_their_own_features(tmp_path):
    """Two folders' photos into one shard cache at the same moment. Both wrote
    shard-00000.partial.npy: the second's rename raised FileNotFoundError (a traceback, its run
    lost), and the plan's read-modify-write could lose the other's photos."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
        for i in range(6):
            (folder / f"{i}.png").write_bytes(b"x")
    for done in _two_at_once(tmp_path, _SHARDS, folders):
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "OK"


def test_two_runs_filling_one_fine_tuning_cache_at_once_each_get_their_own_features(tmp_path):
    """The single-file cache (``compute_features``) likewise: both wrote features-KEY.partial.npy."""
    pytest.importorskip("torch")
    from PIL import Image

    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, levels in zip(folders, ((10, 20, 30), (40, 50, 60, 70))):
        folder.mkdir()
        for level in levels:
            Image.new("RGB", (32, 32), (level,) * 3).save(folder / f"{level}.png")
    for done in _two_at_once(tmp_path, _SINGLE_FILE, folders):
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "OK"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes: POSIX")
def test_a_pipe_in_place_of_the_lock_file_is_passed_over_not_waited_on(tmp_path):
    """docs/hostile-inputs.md: the lock file is opened without waiting (opening a FIFO for
    writing blocks until a reader comes), and one that is not a regular file is passed over."""
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / ".lock")
    folder = tmp_path / "a"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(b"x")
    (tmp_path / "go").write_text("")
    script = tmp_path / "fill.py"
    script.write_text(_SHARDS)
    done = subprocess.run(
        [sys.executable, str(script), str(cache), str(folder), str(tmp_path / "go")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-2000:]


def test_a_file_system_that_refuses_locks_fills_the_cache_unlocked(tmp_path, monkeypatch):
    """Where the file system refuses locks (ENOLCK: an NFS mount without a lock service) the
    cache is filled unlocked, as before there was a lock, not waited on or failed."""
    import errno
    import fcntl

    from edgecap.training.shards import cache_lock

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    said, ran = [], []
    with cache_lock(tmp_path / ".lock", said.append):
        ran.append(True)
    assert ran == [True] and said == []
