"""Frozen-encoder feature cache: the 7x7x1280 EfficientNet-Lite0 map of every image, computed once.

The cache is one float16 ``.npy`` array (n_images, 49, 1280) plus a JSON index of file names,
keyed by the preprocessing so a change of input size or scaling never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgecap.images import load_rgb
from edgecap.preprocess import Preprocessing, to_model_input


def cache_key(preprocessing: Preprocessing, encoder_tag: str) -> str:
    blob = json.dumps({"pre": preprocessing.to_dict(), "encoder": encoder_tag}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def compute_features(image_paths: list[Path], cache_dir: Path, preprocessing: Preprocessing,
                     batch_size: int = 32, progress: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Return (features float16 (n, 49, 1280), {file name: row}) from the cache or the encoder."""
    import torch

    from edgecap.models.efficientnet_lite import load_pretrained

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(preprocessing, "efficientnet-lite0-imagenet")
    array_path = cache_dir / f"features-{key}.npy"
    index_path = cache_dir / f"features-{key}.json"
    names = [p.name for p in image_paths]
    if array_path.exists() and index_path.exists():
        index = json.loads(index_path.read_text())
        if all(n in index for n in names):
            return np.load(array_path, mmap_mode="r"), index

    model = load_pretrained()
    out = np.lib.format.open_memmap(array_path.with_suffix(".partial.npy"), mode="w+",
                                    dtype=np.float16, shape=(len(names), 49, 1280))
    bar = progress_bar(len(names), "encoding images", progress, unit="img")
    with torch.inference_mode():
        for start in range(0, len(names), batch_size):
            chunk = image_paths[start:start + batch_size]
            batch = np.stack([to_model_input(load_rgb(p), preprocessing) for p in chunk])
            fmap = model.features(torch.from_numpy(batch))  # (n, 1280, 7, 7)
            out[start:start + len(chunk)] = fmap.flatten(2).transpose(1, 2).numpy().astype(np.float16)
            bar.update(len(chunk))
    bar.close()
    out.flush()
    del out
    array_path.with_suffix(".partial.npy").replace(array_path)
    index = {n: i for i, n in enumerate(names)}
    index_path.write_text(json.dumps(index))
    return np.load(array_path, mmap_mode="r"), index


def split_features(train_items, dev_items, images: Path, cache_dir: Path,
                   preprocessing: Preprocessing, progress: bool = True):
    """The cached features of a train and a dev split (computed on first use).

    -> (train_rows: the cache row of each train item, dev_fmaps float16 (n_dev, 49, 1280),
        all_fmaps float32 tensor (n_cached, 49, 1280)). The float32 copy lives in memory: the
    per-batch fp16 -> fp32 conversion of a memmap is slower.
    """
    import torch

    paths = [images / it.file_name for it in train_items + dev_items]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing, e.g. {missing[:3]}")
    fmaps, index = compute_features(paths, cache_dir, preprocessing, progress=progress)
    train_rows = [index[p.name] for p in paths[: len(train_items)]]
    dev_fmaps = np.stack([np.asarray(fmaps[index[p.name]]) for p in paths[len(train_items):]])
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
        def update(self, n): pass
        def set_postfix(self, **kw): pass
        def close(self): pass
    return _Null()
