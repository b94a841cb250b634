"""Disk feature cache in shards, for feature sets that do not fit in memory (COCO: 123k images x
49 x 1280 float16 = 15 GB).

``CACHE/shards-KEY/`` (KEY: the preprocessing + encoder tag + decoding, as ``features.cache_key``):

- ``plan.json``: the images and their order: image i is row ``i % shard_size`` of shard
  ``i // shard_size``. Written first; a later request for images it lacks appends them (and
  keeps the plan's shard size).
- ``shard-00000.npy``: float16 ``(rows, *feature shape)``, written as ``.partial.npy`` and
  renamed when complete; ``shard-00000.json`` beside it (rows, shape, names digest, bytes,
  sha256) is written last, so a shard without one is redone.
- ``index.json``: all shards' records and the shape, written by rank 0 once every shard is done.

Extraction is resumable: an interrupted run keeps its completed shards (their checksums are
verified on the rerun; a mismatch is recomputed) and redoes the partial one. A shard being
computed may hold photos of earlier runs that are gone from the disk since: their rows are left
empty and listed in the record (``absent``), and the shard is recomputed if a later run asks for
one of them again. Every file of the cache is read as ``edgecap.files`` reads files (a regular
file under a ceiling, types and sizes checked before use, ``training.records``): a broken plan
starts a new one, a broken shard record redoes its shard, a broken index is one error naming it.
Under torchrun each rank extracts the shards ``rank, rank + world, ...``. Training reads
batches with ``readinto`` grouped by shard and offset (runs of consecutive rows in one read), not
through a memory map: the pages of a map count as the process's resident memory, the page cache's do not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgecap.errors import DataError, ModelError, counted
from edgecap.files import FileProblem, check_regular, open_regular
from edgecap.manifest import file_sha256
from edgecap.models.config import DEFAULT_ENCODER
from edgecap.training.config import MAX_SHARD_SIZE
from edgecap.training.features import cache_key, cache_name, encoder_tag, progress_bar
from edgecap.training.records import MAX_RECORD_BYTES, Record, open_lock_file, read_record, shown

FORMAT = "edgecap-feature-shards/2"  # /1 named photos by path alone: a new plan
MAX_FEATURE_DIM = 1 << 16  # each dimension of a feature row (Lite0: 49 x 1280)


class FeatureCacheError(ModelError):
    """A shard cache that cannot be used as it is; the message names the file and the fix."""


def shard_dir(cache_dir: Path, preprocessing, tag: str | None = None) -> Path:
    """The shard cache's folder for these preprocessing and encoder (``features.encoder_tag``:
    its name and weights; None: the default encoder's, as ``edgecap train`` makes it)."""
    return Path(cache_dir) / f"shards-{cache_key(preprocessing, encoder_tag() if tag is None else tag)}"


def _shard_path(directory: Path, s: int, suffix: str = ".npy") -> Path:
    return directory / f"shard-{s:05d}{suffix}"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _names_digest(names: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def _header(path: Path) -> tuple[tuple, np.dtype, int]:
    """An .npy file's (shape, dtype, data offset); a regular file only (``ValueError``)."""
    try:
        f = open_regular(path, None, "feature shard")
    except FileProblem as exc:
        raise ValueError(str(exc)) from None
    with f:
        if np.lib.format.read_magic(f) == (1, 0):  # headers are literals, never pickles
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError("Fortran order")
        return shape, dtype, f.tell()


def shard_problem(path: Path, record: dict, checksum: bool) -> str | None:
    """What is wrong with a shard file against its record (None: nothing)."""
    if not os.path.lexists(path):
        return "missing"
    try:
        check_regular(path)
    except FileProblem as exc:
        return str(exc)
    try:
        shape, dtype, offset = _header(path)
    except (OSError, ValueError) as exc:
        return f"unreadable header ({exc})"
    expected = (record["rows"], *record["shape"])
    if tuple(shape) != expected or dtype != np.float16:
        return f"shape {tuple(shape)} {dtype}, expected {expected} float16"
    size = os.stat(path).st_size
    if size != record["bytes"] or size != offset + int(np.prod(expected)) * 2:
        return f"{size} bytes, expected {record['bytes']}"
    if checksum and file_sha256(path) != record["sha256"]:
        return "checksum mismatch"
    return None


class ShardedFeatures:
    """A complete shard cache, read a batch at a time: ``features[rows]`` -> float32 torch
    tensor (n, *shape); ``read(rows)`` -> float16 numpy. Only the batch is ever in memory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        index = read_record(index_path, FeatureCacheError, MAX_RECORD_BYTES)
        self.shard_size = index.int("shard_size", 1, MAX_SHARD_SIZE)
        self.shape = tuple(index.ints("shape", 1, MAX_FEATURE_DIM))
        names = index.strings("names")
        shards = index.get("shards", list, "a list")
        if len(shards) != -(-len(names) // self.shard_size):
            raise index.fail(
                f"{counted(len(shards), 'shard')} for {counted(len(names), 'image')} of {self.shard_size}; "
                "rerun the extraction"
            )
        if not all(isinstance(r, dict) for r in shards):
            raise index.fail("a shard record is not an object")
        self.records = [_record(Record(index_path, r, FeatureCacheError)) for r in shards]
        self.names = {n: i for i, n in enumerate(names)}
        self.row_bytes = int(np.prod(self.shape)) * 2
        self._offsets = []
        for s, record in enumerate(self.records):
            path = _shard_path(self.directory, s)
            problem = shard_problem(path, record, checksum=False)
            if problem is None and tuple(record["shape"]) != self.shape:
                problem = f"rows of {record['shape']}, the index says {list(self.shape)}"
            if problem:
                raise FeatureCacheError(
                    f"{shown(path)}: corrupt feature shard ({problem}); "
                    "rerun the extraction (it recomputes bad shards) or "
                    "delete it"
                )
            self._offsets.append(_header(path)[2])
        self._files: dict = {}  # shard -> its open file

    def __len__(self) -> int:
        return len(self.names)

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        buf = np.empty((len(rows), *self.shape), dtype=np.float16)
        flat = buf.reshape(len(rows), -1)
        start = 0
        while start < len(ordered):
            shard, row = divmod(int(ordered[start]), self.shard_size)
            end = start + 1  # a run: consecutive rows of one shard, one read
            while (
                end < len(ordered)
                and ordered[end] == ordered[end - 1] + 1
                and ordered[end] // self.shard_size == shard
            ):
                end += 1
            f = self._file(shard)
            f.seek(self._offsets[shard] + row * self.row_bytes)
            # numpy's stubs give ndarray the buffer protocol from Python 3.12 only
            view = memoryview(flat[start:end]).cast("B")  # type: ignore[arg-type]
            if f.readinto(view) != len(view):
                raise FeatureCacheError(f"{_shard_path(self.directory, shard)}: short read")
            start = end
        out = np.empty_like(buf)
        out[order] = buf
        return out

    def __getitem__(self, rows):
        import torch

        return torch.from_numpy(self.read(rows)).float()

    def _file(self, shard: int):
        f = self._files.get(shard)
        if f is None:
            path = _shard_path(self.directory, shard)
            try:  # checked at __init__; a regular file still (never a FIFO swapped in since)
                f = self._files[shard] = open_regular(path, None, "feature shard")
            except FileProblem as exc:
                raise FeatureCacheError(f"{shown(path)}: {exc}") from None
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def extract_shards(
    paths: Sequence[Path],
    directory: Path,
    load: Callable[[Path], np.ndarray],
    encode: Callable[[np.ndarray], np.ndarray],
    shard_size: int = 1024,
    batch_size: int = 64,
    progress: bool = False,
    log=print,
    dist=None,
    load_threads: int = 4,
) -> ShardedFeatures:
    """The shard cache of ``paths`` (keyed by ``cache_name``: two folders' ``IMG_0001.jpg``
    never share features, nor does a photo replaced under its old name) in ``directory``,
    extracting what is
    missing: ``load(path)`` -> one model input, ``encode(stacked inputs)`` -> features (n, ...).

    Every completed shard is checked against its record (size, shape, sha256) and recomputed
    when it does not match, so a cache is read in full once per call (split across the ranks).
    ``dist`` (``distributed.Dist``): this rank extracts its share; rank 0 writes the index."""
    directory = Path(directory)
    rank = dist.rank if dist is not None else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    # another run filling this cache (a sweep's runs beside one OUT share OUT/../.feature-cache)
    # waits for this one: two read-modify-writes of the plan lost one's photos, and two
    # extractions of one shard shared its .partial.npy (FileNotFoundError at the second's rename)
    with cache_lock(directory / LOCK_FILE if rank == 0 else None, log, dist):
        return _extract_locked(
            paths, directory, load, encode, shard_size, batch_size, progress, log, dist, load_threads
        )


def _extract_locked(
    paths, directory: Path, load, encode, shard_size, batch_size, progress, log, dist, load_threads
) -> ShardedFeatures:
    """``extract_shards``' work, rank 0 holding the cache's lock."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    barrier = dist.barrier if dist is not None else (lambda: None)
    names = [cache_name(p) for p in paths]
    index_path = directory / "index.json"
    plan_path = directory / "plan.json"
    wanted = dict(zip(names, paths))  # this run's photos, each by the path it was given
    if rank == 0:
        plan = _read_plan(plan_path, shard_size, log)
        known = set(plan["names"])
        for name, p in zip(names, paths):
            if name not in known:
                known.add(name)
                plan["names"].append(name)
                # where the photo is, whatever folder a later run works from (a relative path
                # read from there had put another folder's photo's features under this name)
                plan["paths"].append(os.path.realpath(p))
        _write_json(plan_path, plan)
        index_path.unlink(missing_ok=True)
    barrier()
    plan = _read_plan(plan_path, shard_size, log, strict=True)
    size = plan["shard_size"]
    n_shards = -(-len(plan["names"]) // size)
    mine = list(range(rank, n_shards, world))
    bar = progress_bar(len(mine), f"extracting shards (rank {rank})", progress, unit="shard")
    with ThreadPoolExecutor(load_threads) as pool:
        for s in mine:
            lo, hi = s * size, min((s + 1) * size, len(plan["names"]))
            meta_path = _shard_path(directory, s, ".json")
            if os.path.lexists(meta_path):
                problem = _stale(meta_path, _shard_path(directory, s), plan["names"][lo:hi], wanted)
                if problem is None:
                    bar.update(1)
                    continue
                log(f"{shown(_shard_path(directory, s))}: {problem}: recomputing it")
                meta_path.unlink()
            _extract_one(
                directory,
                s,
                plan["names"][lo:hi],
                plan["paths"][lo:hi],
                load,
                encode,
                batch_size,
                pool,
                wanted,
            )
            bar.update(1)
    bar.close()
    barrier()
    if rank == 0:
        records = [
            _record(read_record(_shard_path(directory, s, ".json"), FeatureCacheError))
            for s in range(n_shards)
        ]
        _write_json(
            index_path,
            {
                "format": FORMAT,
                "shard_size": size,
                "names": plan["names"],
                "shape": records[0]["shape"] if records else [],
                "shards": records,
            },
        )
    barrier()
    features = ShardedFeatures(directory)
    barrier()  # every rank has read the index before rank 0 lets another run rewrite it
    return features


LOCK_FILE = ".lock"
# under torchrun, how often the ranks hear whether rank 0 has the cache's lock yet (seconds)
LOCK_POLL_S = 10.0


@contextlib.contextmanager
def cache_lock(path: Path | None, log=print, dist=None):
    """An exclusive lock on the file ``path`` (made when missing; None: no lock) while the block
    runs: a second process filling the same feature cache waits, saying so, for the first to
    finish, then finds its work done. ``fcntl.flock``: POSIX only, and released by the system
    when a process dies (kill -9 leaves no stale lock); where there is no ``fcntl`` (Windows) or
    the file system refuses locks, the block runs unlocked, as before.

    ``dist`` (``distributed.Dist``, several ranks; ``path`` rank 0's alone): rank 0 tries the lock
    every ``LOCK_POLL_S`` seconds and tells the other ranks each time, so that no rank waits in
    one collective for as long as another run's extraction takes (the process group's timeout,
    10 or 30 minutes, would end the run)."""
    fd = None if path is None else open_lock_file(path)
    try:
        if dist is not None and dist.active:
            said = False
            while not dist.from_main(_try_lock(fd)):
                if not said and path is not None:
                    log(_waiting(path))
                said = True
                time.sleep(LOCK_POLL_S)
        elif fd is not None and path is not None and not _try_lock(fd):
            log(_waiting(path))
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _waiting(lock: Path) -> str:
    return f"{shown(lock.parent)}: another process is filling this feature cache; waiting for it"


def _try_lock(fd: int | None) -> bool:
    """Whether this process may go on: it holds the lock on ``fd`` now, or there is no lock to
    hold (no file, no ``fcntl``, a file system that refuses locks: unlocked, as before)."""
    if fd is None:
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no locks on this file system (ENOLCK)
        pass
    return True


def _read_plan(path: Path, shard_size: int, log=print, strict: bool = False) -> dict:
    """The plan in ``path``, its types checked; a new, empty one when there is none or it is
    broken (reported; ``strict``: a ``FeatureCacheError`` instead)."""
    if os.path.lexists(path) or strict:
        try:
            record = read_record(path, FeatureCacheError, MAX_RECORD_BYTES)
            if record.data.get("format") != FORMAT:
                raise record.fail(f"format {record.data.get('format')!r}, not {FORMAT}")
            plan: dict = {
                "format": FORMAT,
                "shard_size": record.int("shard_size", 1, MAX_SHARD_SIZE),
                "names": record.strings("names"),
                "paths": record.strings("paths"),
            }
            if len(plan["names"]) != len(plan["paths"]):
                raise record.fail("'names' and 'paths' differ in length")
            return plan
        except FeatureCacheError as exc:
            if strict:
                raise
            log(f"{exc}: starting a new plan (the shards are recomputed)")
    return {"format": FORMAT, "shard_size": shard_size, "names": [], "paths": []}


def _record(record: Record) -> dict:
    """A shard's record, its types checked (``FeatureCacheError`` naming the file)."""
    rows = record.int("rows", 1, MAX_SHARD_SIZE)
    return {
        "rows": rows,
        "shape": record.ints("shape", 1, MAX_FEATURE_DIM),
        "names": record.str("names"),
        "bytes": record.int("bytes", 0),
        "sha256": record.str("sha256"),
        "absent": record.ints("absent", 0, rows - 1) if "absent" in record.data else [],
    }


def _stale(meta_path: Path, path: Path, names: Sequence[str], wanted: Mapping[str, object]) -> str | None:
    """Why a completed shard must be recomputed (None: it is current): its record is broken
    or lists other images, a photo it lacks is wanted again, or its file does not match."""
    try:
        record = _record(read_record(meta_path, FeatureCacheError))
    except FeatureCacheError as exc:
        return f"its record is unusable ({exc})"
    if record["names"] != _names_digest(names):
        return "other images"
    if any(names[i] in wanted for i in record["absent"]):
        return "photos it lacked are wanted again"
    return shard_problem(path, record, checksum=True)


def _extract_one(
    directory: Path, s: int, names, paths, load, encode, batch_size, pool, wanted: Mapping[str, object]
) -> None:
    """Compute shard ``s``. A photo of an earlier run that this run does not ask for and that
    can no longer be read gets an empty row, listed as ``absent`` in the record."""
    absent: list[int] = []

    def load_row(i: int):
        if names[i] in wanted:  # read by this run's own path (its errors name the photo so)
            return load(wanted[names[i]])
        if cache_name(paths[i]) != names[i]:
            # not the photo the row is of: replaced since, or a relative path of a plan written
            # before paths were kept whole, which from this run's folder names another photo
            absent.append(i)
            return None
        try:
            return load(paths[i])
        except (OSError, ValueError):  # InputError is a ValueError: gone, or no photo now
            absent.append(i)
            return None

    partial = _shard_path(directory, s, ".partial.npy")
    out = None  # a new memory-mapped file: zeros until written, the absent rows stay so
    for start in range(0, len(paths), batch_size):
        rows = range(start, min(start + batch_size, len(paths)))
        loaded = list(pool.map(load_row, rows))
        present = [i for i, x in zip(rows, loaded) if x is not None]
        if not present:
            continue
        fmap = np.asarray(encode(np.stack([x for x in loaded if x is not None])))
        if out is None:
            out = np.lib.format.open_memmap(
                partial, mode="w+", dtype=np.float16, shape=(len(paths), *fmap.shape[1:])
            )
        out[present] = fmap.astype(np.float16)
    if out is None:  # no photo of this shard can be read, and none is wanted
        raise DataError(
            f"{shown(paths[0])}: no photo of feature shard {s} can be read any "
            "more; delete the feature cache (--cache-dir) and rerun"
        )
    out.flush()
    shape = list(out.shape[1:])
    del out
    final = _shard_path(directory, s)
    partial.replace(final)
    _write_json(
        _shard_path(directory, s, ".json"),
        {
            "rows": len(paths),
            "shape": shape,
            "names": _names_digest(names),
            "bytes": os.stat(final).st_size,
            "sha256": file_sha256(final),
            "absent": sorted(absent),
        },
    )


def image_encoder(device: str = "cpu", variant: str = DEFAULT_ENCODER):
    """The real extraction encoder: EfficientNet-Lite0's 49 x 1280 regions (or ``variant``'s L x
    1280), batched on ``device`` -> a function (n, 3, H, W) float32 numpy -> (n, L, 1280)."""
    import torch

    from edgecap.models.efficientnet_lite import load_pretrained

    with torch.random.fork_rng(devices=[]):  # whether the cache was complete must not change
        model = load_pretrained(variant).to(device).eval()  # the seeded draws that come after

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.regions(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return encode


def streamed_split(
    train_items,
    dev_items,
    images: Path,
    cache_dir: Path,
    preprocessing,
    progress: bool = True,
    shard_size: int = 1024,
    dist=None,
    log=print,
    encoder_name: str = DEFAULT_ENCODER,
):
    """``features.split_features`` over the shard cache: -> (train_rows, dev_fmaps float16
    (n_dev, 49, 1280) in memory, ShardedFeatures read a batch at a time)."""
    from edgecap.images import load_rgb
    from edgecap.preprocess import to_model_input

    paths = [images / it.file_name for it in train_items + dev_items]
    missing_photos(paths)
    device = str(dist.device) if dist is not None else "cpu"
    encoder: list = []  # loaded on first use: a complete cache needs none

    def encode(x):
        if not encoder:
            encoder.append(image_encoder(device, encoder_name))
        return encoder[0](x)

    features = extract_shards(
        paths,
        shard_dir(cache_dir, preprocessing, encoder_tag(encoder_name)),
        lambda p: to_model_input(load_rgb(p), preprocessing),
        encode,
        shard_size=shard_size,
        progress=progress,
        log=log,
        dist=dist,
        load_threads=min(8, os.cpu_count() or 1),
    )
    rows = [features.names[cache_name(p)] for p in paths]
    train_rows, dev_rows = rows[: len(train_items)], rows[len(train_items) :]
    dev_fmaps = features.read(dev_rows)
    return train_rows, dev_fmaps, features


def missing_photos(paths: Sequence[Path]) -> None:
    """``DataError`` (one line, the first few named) when any of ``paths`` does not exist."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"{counted(len(missing), 'photo is missing', 'photos are missing')}, "
            f"e.g. {', '.join(shown(p) for p in missing[:3])}"
        )
