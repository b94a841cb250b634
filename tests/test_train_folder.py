"""Training on your own photos: a folder with captions.csv / captions.jsonl, the photo-level dev
split, bad rows and photos reported and skipped, vocabulary growth from a trained model, and a
tiny end-to-end run (train, export, caption). Photos and captions are made here."""

from __future__ import annotations

import csv
import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from edgecap.data.folder import MAX_REPORTED, detect_dataset, dev_photos, read_folder
from edgecap.errors import DataError


def photo(path, seed: int, size=(48, 36)) -> None:
    """A small noisy synthetic photo (PNG or JPEG by the suffix)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def folder(root, rows, header=("file", "caption"), photos=None, kind="csv"):
    """``root`` with synthetic photos (every file named in ``rows`` unless ``photos`` says
    which) and ``captions.csv`` (rows: tuples in ``header`` order) or ``captions.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    names = photos if photos is not None else sorted({r[0] for r in rows if r[0]})
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        photo(root / name, i)
    if kind == "csv":
        with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    else:
        (root / "captions.jsonl").write_text(
            "".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8"
        )
    return root


ROWS = [
    ("a.png", "a red ball on the grass"),
    ("b.jpg", "a dog runs"),
    ("a.png", "a ball, red and round"),
    ("sub/c.png", "a cat sleeps"),
    ("b.jpg", "a brown dog runs on sand"),
    ("d.png", "two birds"),
]


def names(items):
    return [it.file_name for it in items]


def by_photo(data):
    return {it.file_name: it.captions for it in data.train + data.dev}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_reads_captions_grouped_by_photo(tmp_path, kind):
    root = folder(tmp_path / "f", ROWS, kind=kind)
    data = read_folder(root, dev_fraction=0.25, report=pytest.fail)
    assert by_photo(data) == {
        "a.png": ["a red ball on the grass", "a ball, red and round"],
        "b.jpg": ["a dog runs", "a brown dog runs on sand"],
        "sub/c.png": ["a cat sleeps"],
        "d.png": ["two birds"],
    }
    assert len(data.dev) == 1 and len(data.train) == 3
    header = 1 if kind == "csv" else 0  # a JSONL file has no header line
    assert data.lines == {
        "a.png": 1 + header,
        "b.jpg": 2 + header,
        "sub/c.png": 4 + header,
        "d.png": 6 + header,
    }
    assert detect_dataset(root) == "folder" and detect_dataset(tmp_path) == "flickr8k"


def test_csv_header_order_case_extra_columns_bom_and_multiline_captions(tmp_path):
    root = tmp_path / "f"
    folder(root, [], photos=["x.png", "y.png"])
    (root / "captions.csv").write_text(
        '\ufeffNote, Caption ,FILE\nmine,"a long caption\nover two lines",x.png\n\n,a small cup,y.png\n',
        encoding="utf-8",
    )
    data = read_folder(root, report=pytest.fail)
    assert by_photo(data) == {"x.png": ["a long caption\nover two lines"], "y.png": ["a small cup"]}
    assert data.lines == {"x.png": 2, "y.png": 5}  # the line each row starts on


def test_split_column(tmp_path):
    rows = [
        ("a.png", "a ball", "train"),
        ("b.png", "a dog", "dev"),
        ("a.png", "a red ball", "TRAIN"),
        ("c.png", "a cat", "val"),
        ("d.png", "a cup", "train"),
    ]
    root = folder(tmp_path / "f", rows, header=("file", "caption", "split"))
    data = read_folder(root, report=pytest.fail)
    assert names(data.train) == ["a.png", "d.png"] and names(data.dev) == ["b.png", "c.png"]
    assert data.train[0].captions == ["a ball", "a red ball"]
    with pytest.raises(DataError, match="has a split column; leave out --dev-fraction"):
        read_folder(root, dev_fraction=0.5)
    only_train = folder(
        tmp_path / "g", [r for r in rows if r[2].lower() == "train"], header=("file", "caption", "split")
    )
    with pytest.raises(DataError, match="no usable photo has split dev"):
        read_folder(only_train)


def test_dev_fraction_splits_photos_not_captions_deterministically(tmp_path):
    photos = [f"p{i:02d}.png" for i in range(20)]
    rows = [(p, f"caption {k} of photo {i}") for i, p in enumerate(photos) for k in range(3)]
    root = folder(tmp_path / "f", rows)
    first = read_folder(root, dev_fraction=0.25, seed=3, check_images=False)
    assert len(first.dev) == 5 and len(first.train) == 15
    # Every caption of a photo goes where the photo goes.
    assert all(len(it.captions) == 3 for it in first.train + first.dev)
    assert not set(names(first.train)) & set(names(first.dev))
    # The same photos and seed give the same split whatever the row order ...
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again = folder(tmp_path / "g", shuffled, photos=photos)
    assert set(names(read_folder(again, dev_fraction=0.25, seed=3, check_images=False).dev)) == set(
        names(first.dev)
    )
    # ... and another seed another split, of the same size.
    other = read_folder(root, dev_fraction=0.25, seed=4, check_images=False)
    assert len(other.dev) == 5 and set(names(other.dev)) != set(names(first.dev))
    assert dev_photos(photos, 0.25, 3) == set(names(first.dev))
    assert len(dev_photos(photos[:2], 0.01, 0)) == 1 and len(dev_photos(photos[:2], 0.99, 0)) == 1


def test_the_split_does_not_depend_on_which_spelling_of_a_photo_comes_first(tmp_path):
    """docs/training.md: 'the same files and seed always give the same split, whatever the row
    order'. A photo named ./p1.png in one row and p1.png in another is one photo, known by the
    spelling of its first row; the split hashed that spelling, so moving a ./ row first moved
    photos between train and dev (found: 10 photos, each with a row 'pN.png' and one
    './pN.png': dev p1, p6 with the plain rows first, p3, p9 with the ./ rows first)."""
    photos = [f"p{i}.png" for i in range(1, 11)]
    plain = [(p, "a cat on a wall") for p in photos]
    dotted = [(f"./{p}", "a cat by a wall") for p in photos]
    splits = []
    for name, rows in (("plain-first", plain + dotted), ("dotted-first", dotted + plain), ("plain", plain)):
        root = folder(tmp_path / name, rows, photos=photos)
        data = read_folder(root, check_images=False, report=pytest.fail)
        per_photo = 1 if name == "plain" else 2
        assert len(data.dev) == 2 and all(len(it.captions) == per_photo for it in data.dev)
        splits.append({n.removeprefix("./") for n in names(data.dev)})
    assert splits[0] == splits[1] == splits[2] == dev_photos(photos, 0.2, 0)


def test_without_a_split_column_a_fifth_of_the_photos_rounded_is_dev(tmp_path):
    """The documented split (``dev_photos``): ``round(fraction * n)`` photos in dev, the
    fraction 0.2 by default: 8 photos -> round(1.6) = 2, and 0.3 of 5 -> round(1.5) = 2."""
    photos = [f"p{i}.png" for i in range(8)]
    root = folder(tmp_path / "f", [(p, f"photo {i}") for i, p in enumerate(photos)])
    data = read_folder(root, check_images=False, report=pytest.fail)
    assert (len(data.dev), len(data.train)) == (2, 6)
    assert len(dev_photos(photos[:5], 0.3, 0)) == 2


def test_blank_rows_of_a_spreadsheet_export_are_not_problems(tmp_path):
    """Rows of empty cells (",,", " , ", what a spreadsheet writes below its data) are blank
    lines, not rows without a file name: nothing reported."""
    root = folder(tmp_path / "f", [], photos=["x.png", "y.png"])
    (root / "captions.csv").write_text("file,caption\nx.png,a red ball\n,\n , \ny.png,a dog\n,,\n")
    data = read_folder(root, report=pytest.fail)
    assert by_photo(data) == {"x.png": ["a red ball"], "y.png": ["a dog"]}


def test_a_jsonl_split_key_counts_when_the_first_line_is_bad(tmp_path):
    """The split column of a captions.jsonl is there when its rows have the key, whatever the
    first line is (here not JSON: reported and skipped)."""
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png", "c.png"], kind="jsonl")
    rows = [("a.png", "a ball", "train"), ("b.png", "a dog", "dev"), ("c.png", "a cat", "dev")]
    lines = [json.dumps(dict(zip(("file", "caption", "split"), r))) for r in rows]
    (root / "captions.jsonl").write_text("# photos of the garden\n" + "\n".join(lines) + "\n")
    reports: list[str] = []
    data = read_folder(root, report=reports.append)
    assert names(data.train) == ["a.png"] and names(data.dev) == ["b.png", "c.png"]
    assert len(reports) == 1 and reports[0].startswith(f"{root / 'captions.jsonl'}:1: not JSON")
    with pytest.raises(DataError, match="has a split column"):
        read_folder(root, dev_fraction=0.5, report=lambda _: None)


BAD_ROWS = [
    # (rows, what to do to the folder, the problem reported, the row's line)
    (
        [("gone.png", "a missing photo")],
        "missing",
        "gone.png: no such file; photo and its 1 caption skipped",
        2,
    ),
    ([("bad.png", "not a photo")], "garbage", "bad.png: not an image in an accepted format", 2),
    ([("cut.png", "a cut photo")], "truncated", "cut.png: ", 2),
    ([("a.png", "  ")], None, "a.png: empty caption; row skipped", 2),
    ([("a.png", "?!")], None, "a.png: caption '?!' has no words; row skipped", 2),
    ([("", "no file")], None, "(no file): no file name; row skipped", 2),
    (
        [("a.png", "a ball", "test")],
        "split",
        "a.png: split 'test' is not one of train, dev, val, validation; row skipped",
        2,
    ),
    (
        [("a.png", "a ball", "dev")],
        "split",
        "a.png: split 'dev', but line 2 put this photo in 'train'; row skipped",
        5,
    ),
    (
        [("./b.png", "a dog again", "train")],
        "split",
        "./b.png: split 'train', but line 3 put this photo (as b.png) in 'dev'; row skipped",
        5,
    ),
    ([("a.png", "a ball", " ")], "split", "a.png: no split (the file has a split column); row skipped", 2),
]


@pytest.mark.parametrize("bad, prepare, problem, line", BAD_ROWS)
def test_a_bad_row_or_photo_is_reported_and_skipped(tmp_path, bad, prepare, problem, line):
    good = [("a.png", "a red ball", "train"), ("b.png", "a dog", "dev"), ("c.png", "a cat", "train")]
    header = ("file", "caption", "split")
    if prepare != "split":
        good, bad, header = [r[:2] for r in good], [r[:2] for r in bad], header[:2]
    rows = bad + good if line == 2 else good + bad  # the bad row on line 2 or 5
    root = folder(
        tmp_path / "f",
        rows,
        header=header,
        photos=["a.png", "b.png", "c.png"],
    )
    if prepare == "garbage":
        (root / "bad.png").write_bytes(b"this is not an image")
    elif prepare == "truncated":
        photo(root / "cut.png", 9, size=(200, 150))
        data = (root / "cut.png").read_bytes()
        (root / "cut.png").write_bytes(data[: len(data) // 2])
    reports = []
    data = read_folder(root, dev_fraction=None if header[-1] == "split" else 0.3, report=reports.append)
    assert len(reports) == 1 and data.problems == reports
    assert reports[0].startswith(f"{root / 'captions.csv'}:{line}: {problem}"), reports[0]
    assert set(by_photo(data)) == {"a.png", "b.png", "c.png"}  # the good photos stay, no other
    assert by_photo(data)["a.png"] == ["a red ball"]


def test_photos_of_one_name_in_two_subfolders_are_two_photos_and_two_spellings_one(tmp_path):
    """Two recordings' frame_0001.png are both trained on, each with its own captions; a row
    naming a photo another way (./, a link to it) adds its caption to that photo."""
    root = folder(
        tmp_path / "f",
        [
            ("run1/frame_0001.png", "a cup on a desk"),
            ("run2/frame_0001.png", "a bus in the street"),
            ("./run1/frame_0001.png", "a mug on a table"),
            ("run1/./frame_0001.png", "a cup beside a keyboard"),
            ("latest.png", "a red bus"),
            ("c.png", "a cat"),
        ],
        photos=["run1/frame_0001.png", "run2/frame_0001.png", "c.png"],
    )
    (root / "latest.png").symlink_to("run2/frame_0001.png")
    reports = []
    data = read_folder(root, dev_fraction=0.3, report=reports.append)
    assert reports == []
    assert by_photo(data) == {
        "run1/frame_0001.png": ["a cup on a desk", "a mug on a table", "a cup beside a keyboard"],
        "run2/frame_0001.png": ["a bus in the street", "a red bus"],
        "c.png": ["a cat"],
    }


def test_nothing_usable_is_one_error(tmp_path):
    root = folder(tmp_path / "f", [("a.png", ""), ("b.png", "")], photos=["a.png", "b.png"])
    with pytest.raises(DataError, match="no usable photo"):
        read_folder(root, report=lambda _: None)
    (root / "captions.jsonl").write_text('[1, 2]\n{"image": "a.png"}\n')
    with pytest.raises(DataError, match="has both captions.csv and captions.jsonl"):
        read_folder(root)
    (root / "captions.csv").unlink()
    with pytest.raises(
        DataError,
        match=r"captions.jsonl: no line is a JSON object with the keys "
        r"\"file\" and \"caption\" \(line 1: not a JSON object",
    ):
        read_folder(root)


@pytest.mark.parametrize(
    "header, missing",
    [
        ("image,text", "missing file, caption, found image,text"),
        ("file,captions", "missing caption, found file,captions"),
        ("", "missing file, caption, found an empty line"),
        ("file;caption", "missing file, caption, found file;caption; separate the columns with commas"),
    ],
)
def test_wrong_columns_stop_the_command_with_one_line(tmp_path, capsys, header, missing):
    pytest.importorskip("torch")  # the run reads the captions file once training is imported
    from edgecap.cli import main

    root = folder(tmp_path / "f", [], photos=["a.png"])
    (root / "captions.csv").write_text(f"{header}\na.png,a ball\n")
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"edgecap train: error: {root / 'captions.csv'}:1: the header line must name "
        f"the columns file and caption (optionally split); {missing}\n"
    )
    assert not (tmp_path / "run" / "last").exists()


def test_a_captions_file_that_is_not_utf8_names_its_line(tmp_path):
    root = folder(tmp_path / "f", [], photos=["a.png"])
    (root / "captions.csv").write_bytes(b"file,caption\na.png,a ball\na.png,un caf\xe9\n")
    with pytest.raises(DataError, match=r"captions.csv:3: not UTF-8 text .*; save the file as UTF-8"):
        read_folder(root)


def test_command_detects_the_folder_and_checks_dev_fraction(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from edgecap.cli import main
    from edgecap.training import train as training

    given = []
    monkeypatch.setattr(training, "train", lambda cfg, **_: given.append(cfg) or tmp_path / "best")
    root = folder(tmp_path / "f", ROWS)
    assert main(["train", "--data", str(root), "--out", "RUN", "--dev-fraction", "0.3"]) == 0
    assert given[-1].dataset == "folder" and given[-1].dev_fraction == 0.3
    assert given[-1].init_from is None  # the run starts from the shipped model (start.py)
    # a --dataset given is the one read, whatever files DATA holds
    assert main(["train", "--data", str(root), "--out", "RUN", "--dataset", "coco"]) == 0
    assert given[-1].dataset == "coco"
    assert main(["train", "--data", str(tmp_path), "--out", "RUN"]) == 0
    assert given[-1].dataset == "flickr8k"
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path), "--out", "RUN", "--dev-fraction", "0.3"]) == 2
    assert "error: --dev-fraction is for a folder of photos" in capsys.readouterr().err
    assert main(["train", "--data", str(root), "--out", "RUN", "--dev-fraction", "1.5"]) == 2
    assert "--dev-fraction must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert main(["train", "--data", str(root), "--out", "RUN", "--scst-from", "CK"]) == 2
    assert "error: --scst-from does not read a folder of photos" in capsys.readouterr().err


def test_a_relative_data_folder_reads_its_photos(tmp_path, monkeypatch):
    """``--data photos`` (a path relative to the working folder) reads the photos inside it:
    none of them is taken for one outside the images folder."""
    folder(tmp_path / "f", [("a.png", "a red ball"), ("sub/b.png", "a dog"), ("c.png", "a cat")])
    monkeypatch.chdir(tmp_path)
    data = read_folder("f", dev_fraction=0.3, report=pytest.fail)
    assert sorted(by_photo(data)) == ["a.png", "c.png", "sub/b.png"]
    assert (len(data.train), len(data.dev)) == (2, 1)  # round(0.3 * 3) = 1 in dev


def test_dev_photos_refuses_a_fraction_of_0_or_1():
    """A dev share of 0 or 1 leaves no train or no dev photos: an error, not 1 photo in dev
    (or all but one) without a word."""
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"dev fraction must be between 0 and 1, got {fraction}"):
            dev_photos(["a.png", "b.png", "c.png"], fraction, 0)


def test_one_usable_photo_without_a_split_column_is_an_error(tmp_path):
    """Two captions of one photo cannot be split into train and dev photos."""
    root = folder(tmp_path / "f", [("a.png", "a ball"), ("a.png", "a red ball")])
    with pytest.raises(DataError, match="captions.csv: one usable photo; a train and a dev split need two"):
        read_folder(root, report=pytest.fail)


@pytest.mark.parametrize("kind, text", [("jsonl", ""), ("jsonl", "\n \n"), ("csv", "")])
def test_an_empty_captions_file_is_one_data_error(tmp_path, kind, text):
    """A captions file just made (empty, or blank lines only) is a DataError naming the file,
    never a crash."""
    root = folder(tmp_path / "f", [], photos=["a.png"], kind=kind)
    (root / f"captions.{kind}").write_text(text)
    problem = "no rows" if kind == "jsonl" else "empty; the first line must name the columns file,caption"
    with pytest.raises(DataError) as info:
        read_folder(root, report=pytest.fail)
    assert str(info.value) == f"{root / f'captions.{kind}'}: {problem}"


def test_a_tab_separated_header_gets_the_comma_hint(tmp_path):
    """A TSV saved as captions.csv: the header error says to separate the columns with commas."""
    root = folder(tmp_path / "f", [], photos=["a.png"])
    (root / "captions.csv").write_text("file\tcaption\na.png\ta ball\n")
    with pytest.raises(DataError, match=r"found file\\tcaption; separate the columns with commas$"):
        read_folder(root, report=pytest.fail)


def test_a_missing_photo_with_two_captions_reports_both_captions_skipped(tmp_path):
    root = folder(
        tmp_path / "f",
        [("gone.png", "a ball"), ("a.png", "a cat"), ("gone.png", "a red ball"), ("b.png", "a dog")],
        photos=["a.png", "b.png"],
    )
    reports: list[str] = []
    read_folder(root, dev_fraction=0.5, report=reports.append)
    assert reports == [f"{root / 'captions.csv'}:2: gone.png: no such file; photo and its 2 captions skipped"]


def test_the_count_of_problems_not_listed_is_reported_when_nothing_is_usable(tmp_path):
    """Every row bad: the first MAX_REPORTED are listed, then the count of the rest, and only
    then the error (the closing line is not lost with the run)."""
    n_bad = MAX_REPORTED + 5
    root = folder(tmp_path / "f", [("a.png", "?!")] * n_bad)
    reports: list[str] = []
    with pytest.raises(DataError, match="no usable photo"):
        read_folder(root, report=reports.append)
    assert len(reports) == MAX_REPORTED + 1
    assert reports[-1] == f"{root / 'captions.csv'}: 5 more problems not listed ({n_bad} in all)"


def test_names_and_header_cells_are_trimmed_and_split_may_be_capitalised(tmp_path):
    """`` a.png `` names a.png; a ``Split`` column (as ``File`` and ``Caption``) is the split
    column: its train / dev are used (two of three photos in dev), not a fifth by fraction."""
    root = folder(
        tmp_path / "f",
        [(" a.png ", "a ball", "train"), ("b.png", "a dog", "dev"), ("c.png ", "a cat", "dev")],
        header=("File", "Caption", "Split"),
        photos=["a.png", "b.png", "c.png"],
    )
    data = read_folder(root, report=pytest.fail)
    assert names(data.train) == ["a.png"] and names(data.dev) == ["b.png", "c.png"]


def test_photos_may_live_in_another_folder_than_the_captions(tmp_path):
    """``images``: the photos' root when it is not the folder of the captions file."""
    rows = [("a.png", "a red ball"), ("sub/b.png", "a dog"), ("c.png", "a cat")]
    photos = folder(tmp_path / "photos", rows)
    (tmp_path / "notes").mkdir()
    (photos / "captions.csv").rename(tmp_path / "notes" / "captions.csv")
    data = read_folder(tmp_path / "notes", photos, dev_fraction=0.3, report=pytest.fail)
    assert sorted(by_photo(data)) == ["a.png", "c.png", "sub/b.png"]


def test_a_broken_link_named_captions_csv_is_the_folder_layout_and_an_error(tmp_path):
    """A captions.csv that is a dangling link still marks the folder layout (not Flickr8k), and
    reading it says what is wrong with that file."""
    root = tmp_path / "f"
    root.mkdir()
    (root / "captions.csv").symlink_to("moved-away.csv")
    assert detect_dataset(root) == "folder"
    with pytest.raises(DataError) as info:
        read_folder(root)
    assert str(info.value) == f"{root / 'captions.csv'}: no such file"


def test_a_jsonl_line_without_a_caption_key_is_reported_as_such(tmp_path):
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png"], kind="jsonl")
    (root / "captions.jsonl").write_text(
        '{"file": "a.png", "caption": "a ball"}\n{"file": "b.png"}\n{"file": "b.png", "caption": "a dog"}\n'
    )
    reports: list[str] = []
    data = read_folder(root, dev_fraction=0.5, report=reports.append)
    assert reports == [f'{root / "captions.jsonl"}:2: needs the keys "file" and "caption"; row skipped']
    assert by_photo(data) == {"a.png": ["a ball"], "b.png": ["a dog"]}


def test_a_jsonl_value_that_is_not_text_is_reported_not_turned_into_a_caption(tmp_path):
    """A JSON array of captions (or a number, an object) is no caption: the row is reported and
    left out, never trained on as the caption "['a dog runs', 'a brown dog']" or "nan"."""
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png"], kind="jsonl")
    (root / "captions.jsonl").write_text(
        '{"file": "a.png", "caption": ["a dog runs", "a brown dog"]}\n'
        '{"file": "a.png", "caption": "a dog runs"}\n'
        '{"file": "b.png", "caption": NaN}\n'
        '{"file": "b.png", "caption": {"en": "a cat"}}\n'
        '{"file": ["b.png"], "caption": "a cat"}\n'
        '{"file": "b.png", "caption": "a cat"}\n'
    )
    reports: list[str] = []
    data = read_folder(root, dev_fraction=0.5, report=reports.append)
    source = root / "captions.jsonl"
    assert reports == [
        f"{source}:1: a.png: caption is a JSON array, not text; row skipped",
        f"{source}:3: b.png: caption is a JSON number, not text; row skipped",
        f"{source}:4: b.png: caption is a JSON object, not text; row skipped",
        f"{source}:5: (no file): file is a JSON array, not text; row skipped",
    ]
    assert by_photo(data) == {"a.png": ["a dog runs"], "b.png": ["a cat"]}


def test_a_jsonl_null_is_an_empty_value_and_a_split_of_true_is_not_text(tmp_path):
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png"], kind="jsonl")
    (root / "captions.jsonl").write_text(
        '{"file": "a.png", "caption": null, "split": "train"}\n'
        '{"file": "a.png", "caption": "a ball", "split": true}\n'
        '{"file": "a.png", "caption": "a red ball", "split": "train"}\n'
        '{"file": "b.png", "caption": "a dog", "split": "dev"}\n'
    )
    reports: list[str] = []
    data = read_folder(root, report=reports.append)
    assert reports == [
        f"{root / 'captions.jsonl'}:1: a.png: empty caption; row skipped",
        f"{root / 'captions.jsonl'}:2: a.png: split is a JSON boolean, not text; row skipped",
    ]
    assert by_photo(data) == {"a.png": ["a red ball"], "b.png": ["a dog"]}


def test_a_jsonl_split_null_or_blank_in_every_row_is_no_split_column(tmp_path):
    """pandas' ``to_json(orient="records", lines=True)`` of a table whose split column is empty
    writes ``"split": null`` in every row: that is no split column, so --dev-fraction chooses the
    dev photos (every row had been skipped, "no split (the file has a split column)", and
    --dev-fraction refused: the file could not be trained on). A row that gives a split makes
    it a split column, as before: the rows without one are then reported."""
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png", "c.png", "d.png"], kind="jsonl")
    rows = [
        ("a.png", "a ball", None),
        ("b.png", "a dog", " "),
        ("c.png", "a cat", None),
        ("d.png", "a car", None),
    ]
    lines = [json.dumps(dict(zip(("file", "caption", "split"), r))) for r in rows]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    reports: list[str] = []
    data = read_folder(root, dev_fraction=0.5, report=reports.append)
    assert reports == [] and sorted(names(data.train) + names(data.dev)) == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
    ]
    assert len(data.dev) == 2
    lines[0] = json.dumps({"file": "a.png", "caption": "a ball", "split": "dev"})
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="has a split column"):
        read_folder(root, dev_fraction=0.5, report=lambda _: None)


def test_a_csv_row_with_more_cells_than_the_header_is_reported_not_cut(tmp_path):
    """An unquoted comma in a caption makes a third cell: the row is reported and left out,
    never trained on as the caption cut at the comma ("a red ball"). Empty cells after the last
    column (a spreadsheet's trailing comma) are fine."""
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png"])
    (root / "captions.csv").write_text(
        "file,caption\na.png,a red ball, round and shiny\n"
        'a.png,"a ball, red"\nb.png,a dog,\nb.png,a brown dog, ,\n'
    )
    reports: list[str] = []
    data = read_folder(root, dev_fraction=0.5, report=reports.append)
    assert reports == [
        f"{root / 'captions.csv'}:2: 3 cells for the header's 2 columns; "
        "put a caption that holds a comma in double quotes; row skipped"
    ]
    assert by_photo(data) == {"a.png": ["a ball, red"], "b.png": ["a dog", "a brown dog"]}


def test_a_csv_quote_left_open_is_reported_not_trained_on_as_the_rows_after_it(tmp_path):
    """``a.png,"a red ball`` (its quote never closed) makes CSV read every line after it into
    that one caption, file names and line breaks included: the row is reported with the lines
    it swallowed, not trained on silently as one long caption; the rows before it are kept.
    A caption over two lines whose second does not begin as a row is a caption (the test
    above)."""
    root = folder(tmp_path / "f", [], photos=["a.png", "b.png"])
    (root / "captions.csv").write_text(
        'file,caption\nb.png,"a dog, running"\na.png,a ball\n'
        'a.png,"a red ball\nb.png,a brown dog\nb.png,a dog\n'
    )
    reports: list[str] = []
    data = read_folder(root, dev_fraction=0.5, report=reports.append)
    assert reports == [
        f"{root / 'captions.csv'}:4: the row runs on to line 6, taking in the rows from line 5 "
        "(a double quote opened and not closed); row skipped"
    ]
    assert by_photo(data) == {"a.png": ["a ball"], "b.png": ["a dog, running"]}


# -- vocabulary growth ---------------------------------------------------------------------------

torch_needed = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("torch") is None, reason="needs torch"
)


@torch_needed
def test_new_words_are_appended_after_the_old_ones():
    from edgecap.training.grow import grow_vocabulary
    from edgecap.vocab import Vocabulary

    old = Vocabulary.build(["a dog runs", "a dog sits", "the cat"], min_count=1)
    grown = grow_vocabulary(old, ["a pizza oven", "a pizza", "the oven", "one zebra", "a pizza"], min_count=2)
    assert grown.words == old.words + ["pizza", "oven"]  # most frequent first; zebra seen once
    assert all(grown.index[w] == i for i, w in enumerate(old.words))


@torch_needed
def test_new_words_seen_equally_often_are_appended_alphabetically():
    """Ties in count are ordered alphabetically (as ``Vocabulary.build`` orders them), not by
    first appearance, so the same captions in any order grow the same vocabulary (the same ids
    for a checkpoint's rows): "zebra" and "apple" twice each, "kite" three times."""
    from edgecap.training.grow import grow_vocabulary
    from edgecap.vocab import Vocabulary

    old = Vocabulary.build(["a dog runs"], min_count=1)
    captions = ["a zebra", "a zebra and a kite", "an apple", "an apple kite", "kite"]
    grown = grow_vocabulary(old, captions, min_count=2)
    assert grown.words == old.words + ["kite", "an", "apple", "zebra"]
    assert grow_vocabulary(old, captions[::-1], min_count=2).words == grown.words


def _logprobs(decoder, fmap, tokens):
    """Log-probabilities (T, N, V) of a teacher-forced word sequence (the step's masked
    log-softmax)."""
    import torch

    from edgecap.models.decoder import mask_logits

    with torch.no_grad():
        features, att_proj, h, c = decoder.init_state(fmap)
        out = []
        for t in tokens:
            logits, h, c, _ = decoder.logits(t.expand(len(fmap)), h, c, features, att_proj)
            out.append(torch.log_softmax(mask_logits(logits), dim=1))
        return torch.stack(out)


@torch_needed
def test_grown_decoder_keeps_old_rows_and_old_words_logprobs():
    import torch

    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.training.grow import grow_decoder

    torch.manual_seed(0)
    old = CaptionDecoder(
        DecoderConfig(vocab_size=30, hidden_dim=32, feature_dim=32, embed_dim=16, attention_dim=16)
    ).eval()
    with torch.no_grad():  # distinct biases, so that their quantile means something
        old.out_vocab.bias.normal_(0, 1)
    # a copy in the mode of the one grown (an eval-mode decoder captions without dropout)
    assert not grow_decoder(old, 36).training and grow_decoder(old.train(), 31).training
    old.eval()
    grown = grow_decoder(old, 36, torch.Generator().manual_seed(1)).eval()
    assert grown.cfg == dataclasses.replace(old.cfg, vocab_size=36)
    before, after = old.state_dict(), grown.state_dict()
    for key, value in before.items():
        if key in ("embed.weight", "out_vocab.weight", "out_vocab.bias"):
            assert after[key].shape[0] == 36
            assert torch.equal(after[key][:30], value), key  # old rows, exactly, in order
        else:
            assert torch.equal(after[key], value), key
    # New rows: near the old words' mean, not copies of one another; low bias.
    new_embed = after["embed.weight"][30:]
    assert not torch.equal(new_embed[0], new_embed[1])
    assert torch.allclose(new_embed.mean(0), before["embed.weight"][4:].mean(0), atol=0.2)
    assert (after["out_vocab.bias"][30:] < before["out_vocab.bias"][4:].median()).all()

    fmap = torch.randn(3, 49, 1280)
    tokens = torch.tensor([1, 7, 12, 29, 5])  # <start> then old words
    lp_old, lp_new = _logprobs(old, fmap, tokens), _logprobs(grown, fmap, tokens)
    # Old words: the same log-probabilities but for one normalising constant per row and step
    # (the new words' share of the softmax), so the same ranking of the old words.
    shift = lp_new[..., :30] - lp_old
    real = torch.ones(30, dtype=torch.bool)
    real[[0, 1, 3]] = False  # <pad>, <start>, <unk>: floored, never generated
    real_shift = shift[..., real]
    assert torch.allclose(real_shift, real_shift[..., :1].expand_as(real_shift), atol=1e-5)
    assert (real_shift < 0).all() and (real_shift > -0.5).all()
    # A new word is no better than the old words' median at the start.
    assert (lp_new[..., 30:].amax(-1) < lp_new[..., 4:30].median(-1).values).all()


@torch_needed
def test_the_grown_default_model_captions_as_before(example_images):
    import torch

    from edgecap.api import default_model_dir
    from edgecap.backends.torch import TorchBackend
    from edgecap.images import load_rgb
    from edgecap.manifest import load_manifest
    from edgecap.preprocess import to_model_input
    from edgecap.decoding import CaptionOptions
    from helpers import plain_search as beam_search
    from edgecap.training.grow import grow_decoder
    from edgecap.training.start import load_start

    encoder, decoder, vocab, _ = load_start(default_model_dir())
    grown = grow_decoder(decoder, len(vocab) + 25, torch.Generator().manual_seed(0)).eval()
    pre = load_manifest(default_model_dir()).preprocessing
    x = np.stack([to_model_input(load_rgb(p), pre) for p in example_images])

    def captions(dec):
        backend = TorchBackend.from_modules(encoder, dec)
        hyps = beam_search(backend, backend.encode(x), CaptionOptions(beam_size=3), vocab.start, vocab.end)
        return [h[0].tokens for h in hyps], np.array([h[0].score for h in hyps])

    old, old_scores = captions(decoder)
    new, new_scores = captions(grown)
    assert new == old and all(len(tokens) > 3 for tokens in old)
    # The scores move only by the new words' small share of each step's softmax.
    assert np.all(new_scores <= old_scores) and np.allclose(new_scores, old_scores, atol=0.01)


# -- end to end ------------------------------------------------------------------------------------


def _tiny_config(data, out, **kw):
    from edgecap.training.train import TrainConfig

    return TrainConfig(
        **{
            "data": str(data),
            "out": str(out),
            "dataset": "folder",
            "epochs": 1,
            "batch_size": 6,
            "min_word_count": 2,
            "progress": False,
            "threads": 1,
            "cache_dir": str(out.parent / "cache"),
            **kw,
        }
    )


SYNTHETIC = {
    "red1.png": ["a red square on a table", "a red tile"],
    "red2.png": ["a red tile on a table", "a red square"],
    "blue1.jpg": ["a blue zorbl near a wall", "a blue zorbl"],
    "blue2.jpg": ["a blue zorbl on the floor", "a small blue zorbl"],
    "green1.png": ["a green quokka in a field", "a green quokka"],
    "green2.png": ["a green quokka sits", "a quokka in green"],
}


@torch_needed
def test_fine_tune_a_model_on_a_folder_export_and_caption(tmp_path, tiny_model_dir, capsys):
    from edgecap import Captioner
    from edgecap.api import load_vocabulary
    from edgecap.build.export import export_model
    from edgecap.manifest import load_manifest
    from edgecap.models.checkpoint import load_checkpoint
    from edgecap.training.train import train

    rows = [(f, c) for f, caps in SYNTHETIC.items() for c in caps] + [("broken.png", "a ruin")]
    root = folder(tmp_path / "mine", rows, photos=list(SYNTHETIC) + ["broken.png"])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    logs = []
    out = tmp_path / "runs" / "mine"
    best = train(_tiny_config(root, out, init_from=str(tiny_model_dir), dev_fraction=0.34), log=logs.append)
    # The broken photo is reported (stderr, naming the row) and the run goes on without it.
    err = capsys.readouterr().err
    assert f"{root / 'captions.csv'}:14: broken.png: " in err and "photo and its 1 caption skipped" in err
    assert any("train 4 images, dev 2 images" in line for line in logs)
    assert any(line.endswith(": 1 row or photo left out (listed on stderr)") for line in logs), logs
    assert any(f"initialised from {tiny_model_dir}" in line for line in logs)

    _, _, vocab, _, meta = load_checkpoint(best)
    tiny_words = load_vocabulary(load_manifest(tiny_model_dir)).words
    assert vocab.words[: len(tiny_words)] == tiny_words
    added = vocab.words[len(tiny_words) :]
    assert added and set(added) <= {w for caps in SYNTHETIC.values() for c in caps for w in c.split()}
    assert "sits" not in added  # seen once: under --min-word-count 2
    assert meta["train_config"]["dataset"] == "folder"

    # Resuming keeps the grown vocabulary (it does not grow again).
    logs.clear()
    train(
        _tiny_config(root, out, init_from=str(tiny_model_dir), dev_fraction=0.34, epochs=2), log=logs.append
    )
    assert any("resumed" in line for line in logs)
    assert load_checkpoint(out / "last")[2].words == vocab.words

    model = tmp_path / "model"
    manifest = export_model(best, model)
    assert manifest.dims.vocab_size == len(vocab)
    captions = {}
    for backend in ("onnxruntime", "torch"):
        cap = Captioner(model, backend=backend).caption(str(root / "blue1.jpg"))
        assert cap.text and all(w in vocab.index for w in cap.tokens)
        assert cap.objects  # the class list still loads with the grown vocabulary
        captions[backend] = cap.text
    assert captions["onnxruntime"] == captions["torch"]


@torch_needed
def test_one_dev_photo_is_warned_of_its_cider_of_0(tmp_path, tiny_model_dir):
    """CIDEr-D weighs a word by log(photos / photos whose references hold it): with one dev photo
    every weight is 0, so the dev check scores 0.0 every epoch, the first stays the best
    checkpoint and --patience stops the run (found: 5 photos, the default --dev-fraction 0.2
    gave one dev photo; 7 epochs at lr 1e-3, training cross-entropy 5.43 -> 2.60, CIDEr 0.0 each
    time, best = epoch 1, 'no better dev CIDEr for 6 epochs: stopping', no word of why). The run
    goes on, warned; two dev photos are not warned of."""
    from edgecap.training.train import train

    rows = [(f, c) for f, caps in SYNTHETIC.items() for c in caps]
    root = folder(tmp_path / "mine", rows)
    logs: list[str] = []
    with pytest.warns(UserWarning, match=r"mine: one dev photo \(\S+\): its CIDEr is 0 whatever"):
        train(_tiny_config(root, tmp_path / "one", init_from=str(tiny_model_dir)), log=logs.append)
    assert any(line.startswith("train 5 images, dev 1 image, vocabulary ") for line in logs), logs
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(
            _tiny_config(root, tmp_path / "two", init_from=str(tiny_model_dir), dev_fraction=0.34),
            log=lambda *a: None,
        )
    assert not [w for w in caught if "dev photo" in str(w.message)]


@torch_needed
def test_init_from_default_is_the_folder_default(tmp_path):
    from edgecap.api import default_model_dir
    from edgecap.errors import ModelError
    from edgecap.training.start import init_source, load_start

    root = tmp_path / "f"
    assert init_source(_tiny_config(root, tmp_path / "r")) == default_model_dir()
    assert init_source(_tiny_config(root, tmp_path / "r", init_from="none")) is None
    flickr = dataclasses.replace(_tiny_config(root, tmp_path / "r"), dataset="flickr8k")
    assert init_source(flickr) is None
    with pytest.raises(ModelError, match="no such directory; start from a checkpoint"):
        load_start(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()  # neither a checkpoint nor a model directory: said as a checkpoint
    with pytest.raises(ModelError, match=r"empty: not a checkpoint directory \(no checkpoint.json\)"):
        load_start(tmp_path / "empty")


@torch_needed
def test_a_run_resumed_with_the_start_it_had_is_resumed_however_the_start_is_spelled(tmp_path, monkeypatch):
    """A resumed run checks --init-from against the start its checkpoint records: a folder run
    given none started from 'default' (a Flickr8k run from 'none'), and a path is one start
    however it is spelled (runs/a/best, ./runs/a/best); another start is refused."""
    from edgecap.errors import ModelError
    from edgecap.training.start import _check_resumed

    monkeypatch.chdir(tmp_path)
    last = tmp_path / "run" / "last"
    for dataset, started, same, other in (
        ("folder", None, "default", "none"),
        ("flickr8k", None, "none", "default"),
        ("folder", "runs/a/best", "./runs/a/best", "runs/b/best"),
    ):
        meta = {"preprocessing": {"size": [224, 224]}, "train_config": {"init_from": started}}
        _check_resumed(_tiny_config(tmp_path, tmp_path / "run", dataset=dataset, init_from=same), meta, last)
        cfg = _tiny_config(tmp_path, tmp_path / "run", dataset=dataset, init_from=other)
        with pytest.raises(ModelError, match=f"holds a run started from '{started or same}'"):
            _check_resumed(cfg, meta, last)


@torch_needed
def test_init_from_a_file_says_it_is_a_file_not_a_folder(tmp_path):
    """--init-from given one of a model's files (its encoder.onnx): it said "no such directory",
    of a file that is there. Now, as --model says of the same mistake, that it is not a folder
    and what to give instead."""
    from edgecap.errors import ModelError
    from edgecap.training.start import load_start

    graph = tmp_path / "encoder.onnx"
    graph.write_bytes(b"a graph")
    with pytest.raises(ModelError) as caught:
        load_start(graph)
    assert str(caught.value) == (
        f"{graph}: not a folder; give the checkpoint (OUT/best) or model directory that holds "
        "it, 'default' (the shipped model) or 'none'"
    )


@torch_needed
@pytest.mark.parametrize(
    "change, problem",
    [
        ({"precision": "fp16"}, "a fp16 model directory; start from the FP32 one it was converted from"),
        (
            {
                "preprocessing": {
                    "size": [224, 224],
                    "mean": [0.5] * 3,
                    "std": [127.5] * 3,
                    "resample": "bilinear",
                }
            },
            "its preprocessing .* is not the one training uses",
        ),
    ],
)
def test_init_from_refuses_a_converted_model_or_one_of_other_preprocessing(tmp_path, change, problem):
    """docs/training.md: --init-from takes an FP32 export directory with the training's
    normalisation (any input size): the shipped model's files (linked) under a manifest that
    says FP16, or a mean of 0.5 instead of training's 127.5, are refused."""
    from edgecap.api import default_model_dir
    from edgecap.errors import ModelError
    from edgecap.training.start import load_start

    source = default_model_dir()
    model = tmp_path / "model"
    model.mkdir()
    for file in source.iterdir():
        if file.name != "manifest.json":
            (model / file.name).symlink_to(file.resolve())
    manifest = json.loads((source / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(ModelError, match=problem):
        load_start(model)


@torch_needed
def test_a_model_directory_with_a_tuned_encoder_needs_finetune_encoder(tiny_model_dir, monkeypatch):
    import torch

    from edgecap.backends.torch import TorchBackend
    from edgecap.errors import ModelError
    from edgecap.training.start import load_start

    build = TorchBackend._build

    def tuned(manifest):
        encoder, decoder = build(manifest)
        with torch.no_grad():
            encoder._conv_head.weight.add_(0.01)
        return encoder, decoder

    encoder, decoder, vocab, meta = load_start(tiny_model_dir)
    assert meta == {} and len(vocab) == decoder.cfg.vocab_size
    monkeypatch.setattr(TorchBackend, "_build", staticmethod(tuned))
    with pytest.raises(ModelError, match="its encoder was fine-tuned.*add --finetune-encoder"):
        load_start(tiny_model_dir)
    tuned_encoder, _, _, _ = load_start(tiny_model_dir, finetune_encoder=True)
    assert torch.allclose(tuned_encoder._conv_head.weight, encoder._conv_head.weight + 0.01)


def test_the_vocabulary_growth_line_lists_the_new_words_or_says_there_is_none():
    from edgecap.training.start import growth_line

    none = growth_line(100, "default", [], 2)
    assert none == "vocabulary: the 100 words of default; no new word seen 2+ times"
    assert growth_line(100, "default", ["zorbl", "quokka"], 2) == (
        "vocabulary: 100 words of default + 2 new (seen 2+ times): zorbl quokka"
    )
    many = [f"w{i}" for i in range(25)]
    line = growth_line(100, "m", many, 3)
    assert line.endswith("w18 w19 ...") and "w20" not in line and "+ 25 new" in line
    assert growth_line(100, "m", many[:20], 3).endswith(": " + " ".join(many[:20]))  # all of them
