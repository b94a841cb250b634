"""Your own photos: a folder of images with a ``captions.csv`` or ``captions.jsonl``.

``captions.csv`` has a header line naming the columns ``file`` and ``caption`` (in any order,
other columns ignored) and optionally ``split`` (``train`` or ``dev``); ``captions.jsonl`` has one
JSON object a line with the same keys. A photo may have several rows, one per caption. ``file``
is the photo's path relative to the folder (or to ``images``): photos of one name in two
subfolders (two recordings' ``frame_0001.jpg``) are two photos, two spellings of one file
(``./a.png``, a link to it) one.

Without a split column the photos (never the captions: all captions of a photo go the same way)
are split by a seeded hash of their file names: the same files and seed always give the same
split, whatever the row order.

A captions file that cannot be read as a whole (the wrong columns, not UTF-8) is a ``DataError``.
A bad row (an empty caption, no file name, an unknown split, more cells than the header names, a
JSON value that is not text) or a bad photo (missing, unreadable, not an image) is reported,
naming the file and line, and left out; the rest is used. The reports escape names as
``edgecap caption`` does (a newline in a file name cannot forge a report line); after the first
``MAX_REPORTED`` the rest are only counted, in one closing line.

Photos must lie inside the images folder: a row naming an absolute path, a path through ``..``
or a symbolic link that leads out of the folder is left out (reported) unless
``allow_outside=True`` (``edgecap train --allow-outside-data``): a captions file someone else
wrote must not make the run read, and train on, files elsewhere on the machine.

``captions.jsonl`` lines end at a newline only: a caption may hold U+2028, U+2029 or U+0085,
which ``str.splitlines`` would split at (a control character, a form feed too, JSON has escaped).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from edgecap.commands.output import escape_field
from edgecap.data.readers import CaptionedImage
from edgecap.errors import DataError, InputError, counted
from edgecap.files import FileProblem, read_regular
from edgecap.paths import IMAGE_EXTENSIONS
from edgecap.vocab import tokenize

CAPTION_FILES = ("captions.csv", "captions.jsonl")
DEFAULT_DEV_FRACTION = 0.2
SPLIT_NAMES = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev"}
MAX_CAPTIONS_BYTES = 256 << 20
COLUMNS = ("file", "caption")
MAX_REPORTED = 200  # problem lines shown one by one; the rest are counted
JSON_KINDS = {list: "array", dict: "object", bool: "boolean"}  # else a number


def caption_file(root: str | Path) -> Path | None:
    """The folder's ``captions.csv`` or ``captions.jsonl``; None when it has neither. Any entry
    of that name counts (a pipe or a broken link too: reading it then says what it is)."""
    found = [Path(root) / name for name in CAPTION_FILES if os.path.lexists(Path(root) / name)]
    if len(found) > 1:
        raise DataError(f"{escape_field(str(root))}: has both {' and '.join(CAPTION_FILES)}; keep one")
    return found[0] if found else None


def detect_dataset(root: str | Path) -> str:
    """``folder`` when ``root`` holds a captions file of this layout, else ``flickr8k``."""
    return "folder" if caption_file(root) is not None else "flickr8k"


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the captions file where the row starts
    file: str
    caption: str
    split: str | None  # train | dev | None (no split column)


@dataclass
class FolderData:
    source: Path  # the captions file
    train: list[CaptionedImage]
    dev: list[CaptionedImage]
    lines: dict[str, int] = field(default_factory=dict)  # photo -> line of its first row
    problems: list[str] = field(default_factory=list)  # the first MAX_REPORTED problems
    n_problems: int = 0  # rows and photos left out, in all


def report_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Problems:
    """Problem lines passed to ``report`` one by one up to ``limit``, then only counted;
    ``close()`` reports the count of those not shown (one line). A problem may be given as a
    function that makes its line, called only when the line is shown (a million bad rows cost
    no million escaped lines)."""

    def __init__(self, report: Callable[[str], None], limit: int = MAX_REPORTED):
        self.report, self.limit = report, limit
        self.shown: list[str] = []
        self.count = 0

    def __call__(self, message: str | Callable[[], str]) -> None:
        self.count += 1
        if self.count <= self.limit:
            line = message() if callable(message) else message
            self.shown.append(line)
            self.report(line)

    def close(self, what: str) -> None:
        hidden = self.count - len(self.shown)
        if hidden:
            self.report(f"{what}: {hidden:,} more problems not listed ({self.count:,} in all)")


def outside_problem(root: Path, name: str) -> str | None:
    """Why the photo ``name`` (relative to the images folder ``root``, resolved) is not inside
    that folder: an absolute path, a ``..`` component or a symbolic link leading out (None: it
    is inside, or does not exist, which the photo check reports)."""
    path = Path(name)
    if path.is_absolute():
        return "an absolute path, outside the images folder"
    if ".." in path.parts:
        return "a path through '..', outside the images folder"
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name the OS refuses
        return None
    if resolved != root and not resolved.is_relative_to(root):
        return "a symbolic link that leads out of the images folder"
    return None


OUTSIDE_HINT = "pass --allow-outside-data to train on it"


def read_folder(
    root: str | Path,
    images: str | Path | None = None,
    dev_fraction: float | None = None,
    seed: int = 0,
    check_images: bool = True,
    report: Callable[[str], None] = report_stderr,
    allow_outside: bool = False,
) -> FolderData:
    """Read the folder's captions file into train and dev ``CaptionedImage`` lists.

    ``images``: the photos' root (default ``root``). ``dev_fraction``: the share of photos in
    dev when the file has no split column (default ``DEFAULT_DEV_FRACTION``; an error with a
    split column). ``check_images``: decode every photo once (``edgecap.images.load_rgb``) and
    leave out those that fail. Each row or photo left out is passed to ``report`` (one line:
    ``FILE:LINE: photo: problem; ... skipped``; after ``MAX_REPORTED`` of them, one line with
    the count of the rest). ``allow_outside``: also use photos outside the images folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{escape_field(str(root))}: "
            + ("not a folder" if root.exists() else "no such folder")
            + "; --data names the folder that holds the captions"
        )
    source = caption_file(root)
    if source is None:
        raise DataError(f"{escape_field(str(root))}: no {' or '.join(CAPTION_FILES)}")
    images = Path(images) if images is not None else root
    problems = Problems(report)
    try:
        return _read_folder(source, images, dev_fraction, seed, check_images, problems, allow_outside)
    finally:
        problems.close(escape_field(str(source)))


def _identity(images: Path, file: str) -> str:
    """Which photo a row names: its resolved path (photos of one name in two subfolders are two
    photos; two spellings of one file, or a link and its target, are one)."""
    path = os.path.join(images, file)
    try:
        return os.path.realpath(path)  # Path.resolve's answer in half its time (100k rows: ~2 s)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL: its reading reports it
        return os.path.normpath(path)


def _read_folder(
    source: Path,
    images: Path,
    dev_fraction: float | None,
    seed: int,
    check_images: bool,
    problems: Problems,
    allow_outside: bool,
) -> FolderData:
    rows, has_split = read_rows(source, problems)
    shown_source = escape_field(str(source))
    if has_split and dev_fraction is not None:
        raise DataError(
            f"{shown_source}: has a split column; leave out --dev-fraction (or drop "
            "the column to split by a fraction of the photos)"
        )
    inside = None if allow_outside else images.resolve()

    photos: dict[str, CaptionedImage] = {}
    lines: dict[str, int] = {}
    splits: dict[str, str | None] = {}
    first: dict[str, str] = {}  # a photo's identity -> the spelling its first row gave
    spelled: dict[str, str] = {}  # a row's spelling -> the photo's first spelling

    def skip(line: int, file: str, why: str, what: str = "row") -> None:
        problems(lambda: f"{shown_source}:{line}: {escape_field(file)}: {why}; {what} skipped")

    for row in rows:
        file = spelled.get(row.file)
        if file is None:
            outside = inside is not None and outside_problem(inside, row.file)
            if outside:
                skip(row.line, row.file, f"{outside}; {OUTSIDE_HINT}")
                continue
            # one photo however it is spelled (./a.png, a//a.png, a link to it): its captions
            # go together, never one spelling to train and another to dev
            file = spelled[row.file] = first.setdefault(_identity(images, row.file), row.file)
            if file not in photos:
                photos[file] = CaptionedImage(file, [], image_id=len(photos))
                lines[file], splits[file] = row.line, row.split
        if row.split != splits[file]:
            alias = f" (as {escape_field(file)})" if file != row.file else ""
            skip(
                row.line,
                row.file,
                f"split {row.split!r}, but line {lines[file]} put this photo{alias} in {splits[file]!r}",
            )
            continue
        photos[file].captions.append(row.caption)

    if check_images:
        from edgecap.images import load_rgb

        for name in list(photos):
            try:
                load_rgb(images / name)
            except InputError as exc:
                n = len(photos[name].captions)
                skip(
                    lines[name],
                    name,
                    escape_field(exc.problem),
                    f"photo and its {counted(n, 'caption')}",
                )
                del photos[name]
    if not photos:
        raise DataError(
            f"{shown_source}: no usable photo (see the problems above)"
            if problems.count
            else f"{shown_source}: no rows"
        )
    if has_split:
        dev_names = {n for n in photos if splits[n] == "dev"}
        for split, names in (("dev", dev_names), ("train", set(photos) - dev_names)):
            if not names:
                raise DataError(
                    f"{shown_source}: no usable photo has split {split}; the run needs train and dev photos"
                )
    else:
        if len(photos) < 2:
            raise DataError(f"{shown_source}: one usable photo; a train and a dev split need two")
        dev_names = dev_photos(
            list(photos), DEFAULT_DEV_FRACTION if dev_fraction is None else dev_fraction, seed
        )
    return FolderData(
        source,
        [p for n, p in photos.items() if n not in dev_names],
        [p for n, p in photos.items() if n in dev_names],
        {n: lines[n] for n in photos},
        problems.shown,
        problems.count,
    )


def dev_photos(names: list[str], fraction: float, seed: int) -> set[str]:
    """The dev photos: ``round(fraction * n)`` of them (at least 1, at most n - 1), those whose
    seeded hash of the file name is smallest (independent of the order of ``names``). The name
    is hashed as ``os.path.normpath`` writes it: a photo named ``./a.png`` in its first row and
    ``a.png`` in others goes the same way whichever row comes first."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be between 0 and 1, got {fraction}")
    n_dev = min(len(names) - 1, max(1, round(fraction * len(names))))
    ranked = sorted(
        set(names), key=lambda n: hashlib.sha256(f"{seed}\0{os.path.normpath(n)}".encode()).digest()
    )
    return set(ranked[:n_dev])


def read_rows(path: Path, report: Callable[[str | Callable[[], str]], None]) -> tuple[list[Row], bool]:
    """-> (the usable rows, whether the file has a split column); each row left out is passed
    to ``report`` (its line, or a function that makes it: ``Problems``)."""
    shown = escape_field(str(path))
    try:
        data = read_regular(path, MAX_CAPTIONS_BYTES, "captions file")
    except FileProblem as exc:
        raise DataError(f"{shown}: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    records = _jsonl_records(path, text) if path.suffix == ".jsonl" else _csv_records(path, text)
    has_split = next(records)
    rows = []
    for line, fields in records:
        if isinstance(fields, str):  # a row that could not be read at all
            report(partial(_row_line, shown, line, None, fields))
            continue
        # a JSON array of captions, a number, an object: no text (str() would make it a caption)
        wrong = next((k for k in (*COLUMNS, "split") if not isinstance(fields.get(k), str | None)), None)
        if wrong:
            name, kind = fields.get("file"), JSON_KINDS.get(type(fields[wrong]), "number")
            why = f"{wrong} is a JSON {kind}, not text"
            report(partial(_row_line, shown, line, name.strip() if isinstance(name, str) else "", why))
            continue
        file, caption = (str(fields.get(k) or "").strip() for k in COLUMNS)
        split = str(fields.get("split") or "").strip().lower() if has_split else None
        problem = None
        if not file:
            problem = "no file name"
        elif not caption:
            problem = "empty caption"
        elif not tokenize(caption):
            problem = "caption '{}' has no words"
        elif has_split and split not in SPLIT_NAMES:
            problem = (
                "split '{}' is not one of " + ", ".join(SPLIT_NAMES)
                if split
                else "no split (the file has a split column)"
            )
        if problem:
            value = caption if problem.startswith("caption") else split or ""
            report(partial(_row_line, shown, line, file, problem, value))
            continue
        rows.append(Row(line, file, caption, SPLIT_NAMES[split] if has_split and split else None))
    return rows, has_split


def _row_line(source: str, line: int, file: str | None, problem: str, value: str = "") -> str:
    """A left-out row's report line; ``value`` (escaped) fills the ``{}`` of ``problem``;
    ``file`` None: a row that could not be read (its problem, escaped, is the whole message)."""
    if file is None:
        return f"{source}:{line}: {escape_field(problem)}; row skipped"
    return (
        f"{source}:{line}: {escape_field(file) or '(no file)'}: "
        f"{problem.format(escape_field(value))}; row skipped"
    )


def _csv_records(path: Path, text: str):
    """Yields whether there is a split column, then (line, {column: value}) per record (its
    problem, a string, for a record with more cells than the header names)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(
                f"{escape_field(str(path))}: empty; the first line must name the columns file,caption"
            )
        names = [h.strip().lower() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            found = ",".join(header)
            hint = (
                "; separate the columns with commas"
                if len(header) == 1 and any(d in found for d in ";\t")
                else ""
            )
            raise DataError(
                f"{escape_field(str(path))}:1: the header line must name the "
                "columns file and caption (optionally split); missing "
                f"{', '.join(missing)}, found "
                f"{escape_field(found) or 'an empty line'}{hint}"
            )
        yield "split" in names
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            swallowed = end > start and _rows_inside(record)
            if swallowed:  # a quoted cell over lines that are rows: a quote left open
                yield (
                    start,
                    f"the row runs on to line {end}, taking in the rows from line {start + swallowed} "
                    "(a double quote opened and not closed)",
                )
            elif any(v.strip() for v in record[len(names) :]):  # an unquoted comma, most likely
                yield (
                    start,
                    (
                        f"{len(record)} cells for the header's {len(names)} columns; "
                        "put a caption that holds a comma in double quotes"
                    ),
                )
            elif any(v.strip() for v in record):
                yield start, dict(zip(names, record))
    except csv.Error as exc:
        raise DataError(f"{escape_field(str(path))}:{reader.line_num}: not CSV ({exc})") from None


# a line that begins as a row of captions.csv does: a photo's file name, then a comma
_ROW_START = re.compile(
    r'\s*"?[^",\n]*(' + "|".join(re.escape(e) for e in IMAGE_EXTENSIONS) + r')"?\s*,', re.IGNORECASE
)


def _rows_inside(record: list[str]) -> int:
    """How many lines into a record spanning several its first line inside a cell that begins
    as a row does (a quote left open took it in), or 0: none does (a caption over two lines is
    a caption, and a file name with a line break a file name)."""
    offset = 0
    for cell in record:
        lines = cell.split("\n")
        found = next((i for i, line in enumerate(lines) if i and _ROW_START.match(line)), 0)
        if found:
            return offset + found
        offset += len(lines) - 1
    return 0


def _jsonl_records(path: Path, text: str):
    """Like ``_csv_records``; a line that is not a JSON object is a string (its problem)."""
    records: list[tuple[int, dict | str]] = []
    # JSON Lines end at "\n" (and "\r\n"); str.splitlines would also split inside a caption at
    # U+2028, U+2029 and U+0085, which JSON allows unescaped in strings (a form feed it does not).
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            records.append((line, f"not JSON ({exc})"))
            continue
        if not isinstance(value, dict):
            records.append((line, f"not a JSON object ({type(value).__name__})"))
        elif any(k not in value for k in COLUMNS):
            records.append((line, 'needs the keys "file" and "caption"'))
        else:
            records.append((line, value))
    if records and not any(isinstance(r, dict) for _, r in records):
        raise DataError(
            f"{escape_field(str(path))}: no line is a JSON object with the keys "
            f'"file" and "caption" (line {records[0][0]}: {records[0][1]})'
        )
    # a split column: a row that gives a split (not the key left out, null or blank, as a table
    # without one writes it: pandas' to_json writes a column of NaN as null in every row)
    yield any(isinstance(r, dict) and _gives_split(r.get("split")) for _, r in records)
    yield from records


def _gives_split(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
