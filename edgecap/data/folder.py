"""Your own photos: a folder of images with a ``captions.csv`` or ``captions.jsonl``.

``captions.csv`` has a header line naming the columns ``file`` and ``caption`` (in any order,
other columns ignored) and optionally ``split`` (``train`` or ``dev``); ``captions.jsonl`` has one
JSON object a line with the same keys. A photo may have several rows, one per caption. ``file``
is the photo's path relative to the folder (or to ``images``).

Without a split column the photos (never the captions: all captions of a photo go the same way)
are split by a seeded hash of their file names: the same files and seed always give the same
split, whatever the row order.

A captions file that cannot be read as a whole (the wrong columns, not UTF-8) is a ``DataError``.
A bad row (an empty caption, no file name, an unknown split) or a bad photo (missing, unreadable,
not an image) is reported, naming the file and line, and left out; the rest is used.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgecap.data.readers import CaptionedImage
from edgecap.errors import DataError, InputError
from edgecap.files import FileProblem, read_regular
from edgecap.vocab import tokenize

CAPTION_FILES = ("captions.csv", "captions.jsonl")
DEFAULT_DEV_FRACTION = 0.2
SPLIT_NAMES = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev"}
MAX_CAPTIONS_BYTES = 256 << 20
COLUMNS = ("file", "caption")


def caption_file(root: str | Path) -> Path | None:
    """The folder's ``captions.csv`` or ``captions.jsonl``; None when it has neither."""
    found = [Path(root) / name for name in CAPTION_FILES if (Path(root) / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{root}: has both {' and '.join(CAPTION_FILES)}; keep one")
    return found[0] if found else None


def detect_dataset(root: str | Path) -> str:
    """``folder`` when ``root`` holds a captions file of this layout, else ``flickr8k``."""
    return "folder" if caption_file(root) is not None else "flickr8k"


@dataclass(frozen=True)
class Row:
    line: int          # 1-based line of the captions file where the row starts
    file: str
    caption: str
    split: str | None  # train | dev | None (no split column)


@dataclass
class FolderData:
    source: Path                                           # the captions file
    train: list[CaptionedImage]
    dev: list[CaptionedImage]
    lines: dict[str, int] = field(default_factory=dict)   # photo -> line of its first row
    problems: list[str] = field(default_factory=list)     # one line per row / photo left out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_folder(root: str | Path, images: str | Path | None = None,
                dev_fraction: float | None = None, seed: int = 0, check_images: bool = True,
                report: Callable[[str], None] = _stderr) -> FolderData:
    """Read the folder's captions file into train and dev ``CaptionedImage`` lists.

    ``images``: the photos' root (default ``root``). ``dev_fraction``: the share of photos in
    dev when the file has no split column (default ``DEFAULT_DEV_FRACTION``; an error with a
    split column). ``check_images``: decode every photo once (``edgecap.images.load_rgb``) and
    leave out those that fail. Each row or photo left out is passed to ``report`` (one line:
    ``FILE:LINE: photo: problem; ... skipped``)."""
    root = Path(root)
    source = caption_file(root)
    if source is None:
        raise DataError(f"{root}: no {' or '.join(CAPTION_FILES)}")
    images = Path(images) if images is not None else root
    rows, has_split, problems = read_rows(source)
    for problem in problems:
        report(problem)
    if has_split and dev_fraction is not None:
        raise DataError(f"{source}: has a split column; leave out --dev-fraction (or drop the "
                        "column to split by a fraction of the photos)")

    photos: dict[str, CaptionedImage] = {}
    lines: dict[str, int] = {}
    splits: dict[str, str | None] = {}
    by_name: dict[str, str] = {}

    def skip(line: int, file: str, why: str, what: str = "row") -> None:
        message = f"{source}:{line}: {file}: {why}; {what} skipped"
        problems.append(message)
        report(message)

    for row in rows:
        if row.file not in photos:
            other = by_name.get(Path(row.file).name)
            if other is not None:
                # the feature cache (edgecap.training.features) keys photos by file name
                skip(row.line, row.file, f"same file name as {other} (line {lines[other]}); "
                                         "photos need distinct file names")
                continue
            by_name[Path(row.file).name] = row.file
            photos[row.file] = CaptionedImage(row.file, [], image_id=len(photos))
            lines[row.file], splits[row.file] = row.line, row.split
        elif row.split != splits[row.file]:
            skip(row.line, row.file, f"split {row.split!r}, but line {lines[row.file]} put this "
                                     f"photo in {splits[row.file]!r}")
            continue
        photos[row.file].captions.append(row.caption)

    if check_images:
        from edgecap.images import load_rgb

        for name in list(photos):
            try:
                load_rgb(images / name)
            except InputError as exc:
                n = len(photos[name].captions)
                skip(lines[name], name, exc.problem,
                     f"photo and its {n} caption{'s' if n > 1 else ''}")
                del photos[name]
    if not photos:
        raise DataError(f"{source}: no usable photo (see the problems above)" if problems
                        else f"{source}: no rows")
    if has_split:
        dev_names = {n for n in photos if splits[n] == "dev"}
        for split, names in (("dev", dev_names), ("train", set(photos) - dev_names)):
            if not names:
                raise DataError(f"{source}: no usable photo has split {split}; the run needs "
                                "train and dev photos")
    else:
        if len(photos) < 2:
            raise DataError(f"{source}: one usable photo; a train and a dev split need two")
        dev_names = dev_photos(list(photos), DEFAULT_DEV_FRACTION if dev_fraction is None
                               else dev_fraction, seed)
    return FolderData(source, [p for n, p in photos.items() if n not in dev_names],
                      [p for n, p in photos.items() if n in dev_names],
                      {n: lines[n] for n in photos}, problems)


def dev_photos(names: list[str], fraction: float, seed: int) -> set[str]:
    """The dev photos: ``round(fraction * n)`` of them (at least 1, at most n - 1), those whose
    seeded hash of the file name is smallest (independent of the order of ``names``)."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be between 0 and 1, got {fraction}")
    n_dev = min(len(names) - 1, max(1, round(fraction * len(names))))
    ranked = sorted(set(names), key=lambda n: hashlib.sha256(f"{seed}\0{n}".encode()).digest())
    return set(ranked[:n_dev])


def read_rows(path: Path) -> tuple[list[Row], bool, list[str]]:
    """-> (the usable rows, whether the file has a split column, one line per row left out)."""
    try:
        data = read_regular(path, MAX_CAPTIONS_BYTES, "captions file")
    except FileProblem as exc:
        raise DataError(f"{path}: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as "
                        "UTF-8") from None
    records = _jsonl_records(path, text) if path.suffix == ".jsonl" else _csv_records(path, text)
    has_split, records = next(records), list(records)
    rows, problems = [], []
    for line, fields in records:
        if isinstance(fields, str):  # a row that could not be read at all
            problems.append(f"{path}:{line}: {fields}; row skipped")
            continue
        file, caption = (str(fields.get(k) or "").strip() for k in COLUMNS)
        split = str(fields.get("split") or "").strip().lower() if has_split else None
        problem = None
        if not file:
            problem = "no file name"
        elif not caption:
            problem = "empty caption"
        elif not tokenize(caption):
            problem = f"caption {caption!r} has no words"
        elif has_split and split not in SPLIT_NAMES:
            problem = (f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}" if split
                       else "no split (the file has a split column)")
        if problem:
            problems.append(f"{path}:{line}: {file or '(no file)'}: {problem}; row skipped")
            continue
        rows.append(Row(line, file, caption, SPLIT_NAMES[split] if has_split else None))
    return rows, has_split, problems


def _csv_records(path: Path, text: str):
    """Yields whether there is a split column, then (line, {column: value}) per record."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty; the first line must name the columns file,caption")
        names = [h.strip().lower() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            found = ",".join(header)
            hint = ("; separate the columns with commas" if len(header) == 1
                    and any(d in found for d in ";\t") else "")
            raise DataError(f"{path}:1: the header line must name the columns file and caption "
                            f"(optionally split); missing {', '.join(missing)}, found "
                            f"{found or 'an empty line'}{hint}")
        yield "split" in names
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if any(v.strip() for v in record):
                yield start, dict(zip(names, record))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not CSV ({exc})") from None


def _jsonl_records(path: Path, text: str):
    """Like ``_csv_records``; a line that is not a JSON object is a string (its problem)."""
    records: list[tuple[int, dict | str]] = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as exc:
            records.append((line, f"not JSON ({exc})"))
            continue
        if not isinstance(value, dict):
            records.append((line, f"not a JSON object ({type(value).__name__})"))
        elif any(k not in value for k in COLUMNS):
            records.append((line, "needs the keys \"file\" and \"caption\""))
        else:
            records.append((line, value))
    if records and not any(isinstance(r, dict) for _, r in records):
        raise DataError(f"{path}: no line is a JSON object with the keys \"file\" and "
                        f"\"caption\" (line {records[0][0]}: {records[0][1]})")
    yield any(isinstance(r, dict) and "split" in r for _, r in records)
    yield from records
