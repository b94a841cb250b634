"""Readers that turn the common caption dataset layouts into one list of ``CaptionedImage``.

- Flickr8k: ``Flickr8k.token.txt`` (``file.jpg#k<TAB>caption``) and split files (one name a line).
- COCO caption JSON: ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
- Karpathy ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` / ``dataset_coco.json``:
  ``images`` with ``filename``, optional ``filepath``, ``split`` and ``sentences[].raw``.

Every file is read as ``edgecap.files`` reads files it did not write (a regular file, under a
size ceiling); a file that is missing, too big or not in its layout is a ``DataError`` naming it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgecap.commands.output import escape_field
from edgecap.errors import DataError, counted
from edgecap.files import FileProblem, read_json, read_regular

MAX_DATASET_BYTES = 1 << 30  # COCO's captions_train2014.json is 66 MB, dataset_coco.json 144 MB


@dataclass
class CaptionedImage:
    file_name: str  # relative to the images root
    captions: list[str] = field(default_factory=list)
    image_id: int | str | None = None


def read_flickr8k(token_file: Path, split_file: Path | None = None) -> list[CaptionedImage]:
    """Images of ``split_file`` (all captioned images if None), in the split file's order."""
    captions: dict[str, list[str]] = defaultdict(list)
    for line_no, line in enumerate(_text(token_file).split("\n"), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_sep, number = key.rpartition("#")
        if not sep or not hash_sep or not (number.strip().isdecimal() and number.isascii()):
            raise DataError(f"{_shown(token_file)}:{line_no}: expected 'file.jpg#N<TAB>caption'")
        captions[name].append(caption.strip())
    if split_file is None:
        names = sorted(captions)
    else:
        names = [n.strip() for n in _text(split_file).split("\n") if n.strip()]
    missing = [n for n in names if n not in captions]
    if missing:
        raise DataError(
            f"{_shown(split_file)}: {counted(len(missing), 'image has', 'images have')} no captions in "
            f"{_shown(token_file)}, e.g. {escape_field(', '.join(missing[:3]))}"
        )
    return [CaptionedImage(n, captions[n], image_id=i) for i, n in enumerate(names)]


def read_coco(json_file: Path, data=None) -> list[CaptionedImage]:
    """COCO caption JSON (``captions_*.json``), in the order of its ``images`` list; ``data``:
    the file already parsed (``dataset_json``), not read again."""
    data = dataset_json(json_file) if data is None else data
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{_shown(json_file)}: not COCO caption JSON (needs 'images' and 'annotations')")
    try:
        by_id: dict = {}
        for img in data["images"]:
            name, seen = str(img["file_name"]), by_id.get(img["id"])
            if seen is not None and seen.file_name != name:  # not one photo's captions given to another
                raise DataError(
                    f"{_shown(json_file)}: image id {img['id']!r} is listed for two files, "
                    f"{escape_field(seen.file_name)} and {escape_field(name)}"
                )
            by_id.setdefault(img["id"], CaptionedImage(name, [], img["id"]))
        for ann in data["annotations"]:
            if ann["image_id"] not in by_id:
                raise DataError(
                    f"{_shown(json_file)}: annotation {ann.get('id')!r} names "
                    f"unknown image_id {ann['image_id']!r}"
                )
            by_id[ann["image_id"]].captions.append(ann["caption"].strip())
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{_shown(json_file)}: unexpected layout for COCO caption JSON ({_layout(exc)})"
        ) from None
    return list(by_id.values())


def read_karpathy(json_file: Path, split: str, data=None) -> list[CaptionedImage]:
    """Karpathy split JSON; ``split`` is train / val / test (``restval`` counts as train);
    ``data``: the file already parsed (``dataset_json``), not read again."""
    data = dataset_json(json_file) if data is None else data
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{_shown(json_file)}: not a Karpathy dataset JSON (needs 'images')")
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    out = []
    try:
        for index, img in enumerate(data["images"]):
            if img.get("split") not in wanted:
                continue
            name = str(img["filename"])
            if img.get("filepath"):
                name = f"{img['filepath']}/{name}"
            # without cocoid or imgid (a file of one's own), its place in the file, which is what
            # Karpathy's imgid is: not None for every image, which scored them all as one
            image_id = next((img[key] for key in ("cocoid", "imgid") if img.get(key) is not None), index)
            out.append(CaptionedImage(name, [s["raw"].strip() for s in img["sentences"]], image_id))
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{_shown(json_file)}: unexpected layout for a Karpathy dataset JSON ({_layout(exc)})"
        ) from None
    return out


def read_dataset(kind: str, root: Path, split: str) -> list[CaptionedImage]:
    """One entry point for training: ``kind`` is flickr8k, coco or karpathy.

    flickr8k: ``root`` holds Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt.
    coco: ``root`` holds ``captions_train.json`` and ``captions_val.json`` (the dev split), as
    ``edgecap train --help`` says. karpathy: ``root`` holds ``dataset_*.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{_shown(root)}: "
            + ("not a folder" if root.exists() else "no such folder")
            + "; --data names the folder "
            "that holds the captions"
        )
    if kind == "flickr8k":
        split_name = {"train": "train", "dev": "dev", "val": "dev", "test": "test"}[split]
        token = root / "Flickr8k.token.txt"
        if not token.exists():
            raise DataError(
                f"{_shown(root)}: no captions.csv or captions.jsonl (a folder of "
                "your photos) and no Flickr8k.token.txt (Flickr8k); name the "
                "folder that holds one, or give --dataset"
            )
        return read_flickr8k(token, root / f"Flickr_8k.{split_name}Images.txt")
    if kind == "coco":
        name = {"dev": "val"}.get(split, split)  # as the command's help names the files
        return read_coco(root / f"captions_{name}.json")
    if kind == "karpathy":
        files = sorted(root.glob("dataset_*.json"))
        if not files:
            raise DataError(f"{_shown(root)}: no dataset_*.json")
        return read_karpathy(files[0], {"dev": "val"}.get(split, split))
    raise ValueError(f"unknown dataset kind {kind!r}: use flickr8k, coco or karpathy")


def _shown(path) -> str:
    return escape_field(str(path))


def _layout(exc: BaseException) -> str:
    return f"missing key {exc}" if isinstance(exc, KeyError) else f"wrong type: {exc}"


def _text(path: Path) -> str:
    """A dataset text file (UTF-8, a regular file under ``MAX_DATASET_BYTES``; a leading byte
    order mark, as Windows editors write, is not part of its first line, as in captions.csv)."""
    try:
        return read_regular(path, MAX_DATASET_BYTES, "dataset file").decode("utf-8-sig")
    except FileProblem as exc:
        raise DataError(f"{_shown(path)}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{_shown(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def dataset_json(path: Path):
    """A dataset's JSON file, parsed: a regular file under ``MAX_DATASET_BYTES`` (a
    ``DataError`` naming it otherwise)."""
    try:
        return read_json(path, MAX_DATASET_BYTES)
    except FileProblem as exc:
        raise DataError(f"{_shown(path)}: {exc}") from None
