"""Readers that turn the common caption dataset layouts into one list of ``CaptionedImage``.

- Flickr8k: ``Flickr8k.token.txt`` (``file.jpg#k<TAB>caption``) and split files (one name a line).
- COCO caption JSON: ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
- Karpathy ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` / ``dataset_coco.json``:
  ``images`` with ``filename``, optional ``filepath``, ``split`` and ``sentences[].raw``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaptionedImage:
    file_name: str                 # relative to the images root
    captions: list[str] = field(default_factory=list)
    image_id: int | str | None = None


def read_flickr8k(token_file: Path, split_file: Path | None = None) -> list[CaptionedImage]:
    """Images of ``split_file`` (all captioned images if None), in the split file's order."""
    captions: dict[str, list[str]] = defaultdict(list)
    for line_no, line in enumerate(Path(token_file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_sep, _ = key.rpartition("#")
        if not sep or not hash_sep:
            raise ValueError(f"{token_file}:{line_no}: expected 'file.jpg#N<TAB>caption'")
        captions[name].append(caption.strip())
    if split_file is None:
        names = sorted(captions)
    else:
        names = [n.strip() for n in Path(split_file).read_text().splitlines() if n.strip()]
    missing = [n for n in names if n not in captions]
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} images have no captions in {token_file}, "
                         f"e.g. {missing[:3]}")
    return [CaptionedImage(n, captions[n], image_id=i) for i, n in enumerate(names)]


def read_coco(json_file: Path) -> list[CaptionedImage]:
    """COCO caption JSON (``captions_*.json``), in the order of its ``images`` list."""
    data = json.loads(Path(json_file).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{json_file}: not COCO caption JSON (needs 'images' and 'annotations')")
    by_id = {img["id"]: CaptionedImage(img["file_name"], [], img["id"]) for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_id:
            raise ValueError(f"{json_file}: annotation {ann.get('id')} names unknown image_id "
                             f"{ann['image_id']!r}")
        by_id[ann["image_id"]].captions.append(ann["caption"].strip())
    return list(by_id.values())


def read_karpathy(json_file: Path, split: str) -> list[CaptionedImage]:
    """Karpathy split JSON; ``split`` is train / val / test (``restval`` counts as train)."""
    data = json.loads(Path(json_file).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{json_file}: not a Karpathy dataset JSON (needs 'images')")
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    out = []
    for img in data["images"]:
        if img.get("split") not in wanted:
            continue
        name = img["filename"]
        if img.get("filepath"):
            name = f"{img['filepath']}/{name}"
        out.append(CaptionedImage(name, [s["raw"].strip() for s in img["sentences"]],
                                  img.get("cocoid", img.get("imgid"))))
    return out


def read_dataset(kind: str, root: Path, split: str) -> list[CaptionedImage]:
    """One entry point for training: ``kind`` is flickr8k, coco or karpathy.

    flickr8k: ``root`` holds Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt.
    coco: ``root`` holds ``captions_{split}.json``. karpathy: ``root`` holds ``dataset_*.json``.
    """
    root = Path(root)
    if kind == "flickr8k":
        split_name = {"train": "train", "dev": "dev", "val": "dev", "test": "test"}[split]
        return read_flickr8k(root / "Flickr8k.token.txt", root / f"Flickr_8k.{split_name}Images.txt")
    if kind == "coco":
        return read_coco(root / f"captions_{split}.json")
    if kind == "karpathy":
        files = sorted(root.glob("dataset_*.json"))
        if not files:
            raise FileNotFoundError(f"{root}: no dataset_*.json")
        return read_karpathy(files[0], {"dev": "val"}.get(split, split))
    raise ValueError(f"unknown dataset kind {kind!r}: use flickr8k, coco or karpathy")
