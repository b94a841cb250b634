"""``edgecap eval`` and ``edgecap.evaluation.evaluate``: reference readers, results format, metrics equal to
pycocoevalcap run directly, and the command end to end on the bundled example photos (never
Flickr8k photos) with the ``tiny_model_dir`` fixture (tests/conftest.py; its captions are
nonsense, so the references below are written around whatever it says).

Tests marked ``java`` run coco-caption's PTB tokenizer and METEOR (Java); they skip without it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import edgecap
from edgecap.evaluation import metrics
from edgecap.cli import main
from edgecap.data.readers import CaptionedImage, read_coco, read_flickr8k, read_karpathy
from edgecap.errors import DataError
from edgecap.evaluation.evaluate import check_images, load_references, results_json, score_split
from helpers import coco_json, run_edgecap

pytest.importorskip("pycocoevalcap")

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
needs_java = pytest.mark.skipif(not metrics.java_available(), reason="needs Java (PTB, METEOR)")

HUMAN = {
    "astronaut.png": [
        "A woman in a space suit stands in front of a flag.",
        "An astronaut smiles for the camera.",
    ],
    "chelsea.png": ["A tabby cat looks to the side.", "A cat sits on a wooden floor."],
    "coffee.png": ["A cup of coffee on a saucer.", "A white cup of espresso on a table."],
    "rocket.jpg": ["A rocket stands on the launch pad.", "A space shuttle before launch."],
}


def flickr_files(root: Path, split: list[str]) -> tuple[Path, Path]:
    tokens = root / "tokens.txt"
    tokens.write_text("".join(f"{name}#{k}\t{c}\n" for name, cs in HUMAN.items() for k, c in enumerate(cs)))
    split_file = root / "split.txt"
    split_file.write_text("\n".join(split) + "\n")
    return tokens, split_file


# -- reference readers --------------------------------------------------------------------------
def test_an_empty_split_file_is_named_as_the_one_listing_no_images(tmp_path):
    """The Flickr8k token file is fine; the split file lists nothing: that file is named (the
    message had named the token file)."""
    tokens, split = flickr_files(tmp_path, [])
    split.write_text("\n")
    with pytest.raises(ValueError) as caught:
        load_references(captions=tokens, split=split)
    assert str(caught.value) == f"{split}: the split lists no images"


def test_an_empty_split_file_and_a_folder_missing_photos_are_named_on_one_line(tmp_path):
    """A split file, and an images folder without the listed photos, named with a newline: each
    error stays one line, the newline written as \\n (they had been split in two)."""
    tokens, _ = flickr_files(tmp_path, [])
    split = tmp_path / "sp\nlit.txt"
    split.write_text("\n")
    with pytest.raises(ValueError) as caught:
        load_references(captions=tokens, split=split)
    assert str(caught.value) == f"{str(split).replace(chr(10), chr(92) + 'n')}: the split lists no images"
    folder = tmp_path / "im\nages"
    folder.mkdir()
    items = load_references(captions=tokens, split=flickr_files(tmp_path, ["coffee.png"])[1])
    with pytest.raises(FileNotFoundError) as caught:
        check_images(items, folder)
    assert "\n" not in str(caught.value)
    shown = str(folder).replace(chr(10), chr(92) + "n")
    assert f"1 of 1 listed image not in {shown}: coffee.png" in str(caught.value)


def test_read_coco_groups_captions_by_image_in_images_order(tmp_path):
    path = coco_json(
        tmp_path / "refs.json",
        {"b.jpg": [" Two dogs. ", "A dog."], "a.jpg": ["A cat."]},
        ids={"b.jpg": 7, "a.jpg": 3},
    )
    items = read_coco(path)
    assert [(i.image_id, i.file_name, i.captions) for i in items] == [
        (7, "b.jpg", ["Two dogs.", "A dog."]),
        (3, "a.jpg", ["A cat."]),
    ]


def test_read_flickr8k_ids_are_split_line_indices(tmp_path):
    tokens, split = flickr_files(tmp_path, ["coffee.png", "astronaut.png"])
    items = read_flickr8k(tokens, split)
    assert [(i.image_id, i.file_name) for i in items] == [(0, "coffee.png"), (1, "astronaut.png")]
    assert items[0].captions == HUMAN["coffee.png"]


def test_read_karpathy_keeps_one_split(tmp_path):
    data = {
        "images": [
            {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "A cat. "}]},
            {"filename": "b.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "A dog."}]},
            {
                "filename": "c.jpg",
                "filepath": "val2014",
                "cocoid": 9,
                "imgid": 2,
                "split": "restval",
                "sentences": [{"raw": "A bird."}, {"raw": "Birds."}],
            },
        ]
    }
    path = tmp_path / "dataset_tiny.json"
    path.write_text(json.dumps(data))
    assert [(i.image_id, i.file_name, i.captions) for i in read_karpathy(path, "test")] == [
        (1, "b.jpg", ["A dog."])
    ]
    assert [(i.image_id, i.file_name) for i in read_karpathy(path, "train")] == [
        (0, "a.jpg"),
        (9, "val2014/c.jpg"),
    ]
    # load_references recognises the Karpathy layout and insists on a split
    assert [i.file_name for i in load_references(path, karpathy_split="test")] == ["b.jpg"]
    with pytest.raises(ValueError, match="Karpathy"):
        load_references(path)


def test_read_karpathy_images_without_ids_are_numbered_by_their_place_in_the_file(tmp_path):
    """A Karpathy-style dataset JSON of one's own may leave out cocoid and imgid; each image is
    then its 0-based place in the file's images, as Karpathy's imgid is (0, 1, 2 in
    test_read_karpathy_keeps_one_split above). Before the fix every such image had the id None:
    edgecap eval scored the whole split as one image (images: 1) with the last photo's caption,
    and wrote every caption with "image_id": null."""
    sentences = [{"raw": "A photo."}]
    data = {
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": sentences},
            {"filename": "b.jpg", "split": "train", "sentences": sentences},
            {"filename": "c.jpg", "split": "test", "sentences": sentences},
            {"filename": "d.jpg", "imgid": 7, "split": "test", "sentences": sentences},
        ]
    }
    path = tmp_path / "dataset_own.json"
    path.write_text(json.dumps(data))
    items = load_references(path, karpathy_split="test")
    assert [(i.image_id, i.file_name) for i in items] == [(0, "a.jpg"), (2, "c.jpg"), (7, "d.jpg")]
    hyps = {0: "a cat", 2: "a dog", 7: "a bird"}
    assert results_json(items, hyps) == [
        {"image_id": 0, "caption": "a cat"},
        {"image_id": 2, "caption": "a dog"},
        {"image_id": 7, "caption": "a bird"},
    ]
    # a place in the file that is another image's id: refused, naming both files
    data["images"][3]["imgid"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"dataset_own\.json: image id 2 is that of two files, c\.jpg and d\.jpg"
    ):
        load_references(path, karpathy_split="test")


def test_a_photo_listed_twice_is_refused_not_scored_twice(tmp_path):
    """A split file with a line repeated, or a COCO file giving one file two image ids, would
    caption that photo twice and count it twice in every metric (with two lists of references,
    against each in turn): refused in one line naming the file that lists it, the photo and its
    two ids. Before the fix: accepted, the photo weighed double."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.jpg#0\tA cat.\nb.jpg#0\tA dog.\n")
    split = tmp_path / "split.txt"
    split.write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(ValueError, match=r"split\.txt: a\.jpg is listed twice \(image ids 0 and 2\)"):
        load_references(captions=tokens, split=split)
    split.write_text("a.jpg\nb.jpg\n")
    assert [i.file_name for i in load_references(captions=tokens, split=split)] == ["a.jpg", "b.jpg"]
    coco = {
        "images": [
            {"id": 5, "file_name": "photos/a.jpg"},
            {"id": 6, "file_name": "photos/b.jpg"},
            {"id": 7, "file_name": "photos/./a.jpg"},  # the same file, written another way
        ],
        "annotations": [{"image_id": i, "caption": "A photo."} for i in (5, 6, 7)],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(
        ValueError, match=r"captions\.json: photos/\./a\.jpg is listed twice \(image ids 5 and 7\)"
    ):
        load_references(path)
    coco["images"][2]["file_name"] = "photos/c.jpg"
    path.write_text(json.dumps(coco))
    assert [i.image_id for i in load_references(path)] == [5, 6, 7]


def test_read_flickr8k_windows_line_endings_and_a_hash_in_a_file_name(tmp_path):
    """A token file and a split file saved with CRLF line endings (a Windows editor) read as
    with LF: no caption keeps a \\r or a trailing space, every split name is found; the
    caption number follows the last '#' ('file.jpg#N<TAB>caption'), so a file name may hold
    one. Expected items written out by hand."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_bytes(b"a#1.jpg#0\tA cat sits. \r\na#1.jpg#1\tA cat.\r\nb.jpg#0\tA dog.\r\n")
    split = tmp_path / "split.txt"
    split.write_bytes(b"b.jpg\r\na#1.jpg\r\n")
    assert [(i.image_id, i.file_name, i.captions) for i in read_flickr8k(tokens, split)] == [
        (0, "b.jpg", ["A dog."]),
        (1, "a#1.jpg", ["A cat sits.", "A cat."]),
    ]


def test_read_flickr8k_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    """A token file and a split file saved as "UTF-8 with BOM" (Notepad, Excel) read as without
    it, as a folder's captions.csv is read (data/folder.py): before the fix the first photo's name
    began with U+FEFF, and edgecap eval said the split's chelsea.png had no captions."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_bytes(b"\xef\xbb\xbfchelsea.png#0\tA cat.\ncoffee.png#0\tA cup.\n")
    split = tmp_path / "split.txt"
    split.write_bytes(b"\xef\xbb\xbfcoffee.png\nchelsea.png\n")
    assert [(i.image_id, i.file_name, i.captions) for i in read_flickr8k(tokens, split)] == [
        (0, "coffee.png", ["A cup."]),
        (1, "chelsea.png", ["A cat."]),
    ]


def test_a_coco_references_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A references JSON saved as "UTF-8 with BOM" reads as without it, as the token and split
    files do: it was refused ("Unexpected UTF-8 BOM (decode using utf-8-sig)")."""
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."], "coffee.png": ["A cup."]})
    plain = [(i.image_id, i.file_name, i.captions) for i in read_coco(refs)]
    refs.write_bytes(b"\xef\xbb\xbf" + refs.read_bytes())
    assert [(i.image_id, i.file_name, i.captions) for i in read_coco(refs)] == plain
    assert [name for _, name, _ in plain] == ["chelsea.png", "coffee.png"]


def test_read_flickr8k_refuses_a_split_photo_without_captions_and_a_line_without_its_number(tmp_path):
    """A photo of the split that the token file never captions is an error naming it (not a
    photo trained on with no caption); a token line without '#N' is an error naming its line."""
    tokens, split = flickr_files(tmp_path, ["chelsea.png", "gone.jpg"])
    with pytest.raises(
        DataError, match=r"split\.txt: 1 image has no captions in .*tokens\.txt, e\.g\. gone\.jpg$"
    ):
        read_flickr8k(tokens, split)
    split.write_text("chelsea.png\ngone.jpg\nlost.jpg\n")
    with pytest.raises(DataError, match=r"split\.txt: 2 images have no captions in .*gone\.jpg, lost\.jpg$"):
        read_flickr8k(tokens, split)
    tokens.write_text("chelsea.png#0\tA cat.\nchelsea.png\tA tabby cat.\n")
    split.write_text("chelsea.png\n")
    with pytest.raises(DataError, match=r"tokens\.txt:2: expected 'file\.jpg#N<TAB>caption'"):
        read_flickr8k(tokens, split)

    # a '#' in the file name is not its number: the line is named, not its caption given to
    # "a" and the split's "a#1.jpg" then said to have no captions (before the fix); nor is a
    # number that is not one
    for line in ("a#1.jpg\tA cat.", "a#1.jpg#x\tA cat.", "a#1.jpg#\tA cat.", "a#1.jpg#\u0663\tA cat."):
        tokens.write_text(f"a#1.jpg#0 \tA cat sits.\n{line}\n")
        split.write_text("a#1.jpg\n")
        with pytest.raises(DataError, match=r"tokens\.txt:2: expected 'file\.jpg#N<TAB>caption'"):
            read_flickr8k(tokens, split)


def test_read_coco_refuses_a_caption_of_an_image_it_does_not_list(tmp_path):
    """An annotation whose image_id is in no image of ``images`` is an error naming both ids,
    not a caption dropped without a word."""
    path = coco_json(tmp_path / "refs.json", {"a.jpg": ["A cat."]}, ids={"a.jpg": 3})
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 77, "image_id": 4, "caption": "A dog."})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"refs\.json: annotation 77 names unknown image_id 4"):
        read_coco(path)


def test_read_coco_refuses_an_image_id_listed_for_two_files(tmp_path):
    """COCO caption JSON pairs captions with photos by image id: two ``images`` entries with one
    id and two file names (references of one's own, numbered by hand) are an error naming the id
    and both files. Before the fix the last entry silently won: the first photo was never
    scored and its captions were scored against the other one. The same entry listed twice is
    one image, as before."""
    path = coco_json(
        tmp_path / "refs.json", {"a.jpg": ["A cat."], "b.jpg": ["A cup."]}, ids={"a.jpg": 3, "b.jpg": 4}
    )
    data = json.loads(path.read_text())
    data["images"].append({"id": 3, "file_name": "a.jpg"})
    path.write_text(json.dumps(data))
    assert [(i.image_id, i.file_name, i.captions) for i in read_coco(path)] == [
        (3, "a.jpg", ["A cat."]),
        (4, "b.jpg", ["A cup."]),
    ]
    data["images"][1]["id"] = data["annotations"][1]["image_id"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"refs\.json: image id 3 is listed for two files, a\.jpg and b\.jpg$"
    ):
        read_coco(path)


def test_load_references_flickr8k_layout(tmp_path):
    tokens, split = flickr_files(tmp_path, ["rocket.jpg", "chelsea.png"])
    items = load_references(captions=tokens, split=split)
    assert [(i.image_id, i.file_name) for i in items] == [(0, "rocket.jpg"), (1, "chelsea.png")]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"images": [{"id": 1}], "annotations": []}), "unexpected layout"),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}),
            "no reference caption: a.jpg",
        ),
        (json.dumps({"images": [], "annotations": []}), "lists no images"),
        (  # a caption with no word is none (before the fix: scored, the image a zero throughout)
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                    "annotations": [
                        {"id": 1, "image_id": 1, "caption": " "},
                        {"id": 2, "image_id": 1, "caption": "..."},
                        {"id": 3, "image_id": 2, "caption": "A cat."},
                        {"id": 4, "image_id": 2, "caption": ""},
                    ],
                }
            ),
            "1 image has no reference caption: a.jpg$",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                    "annotations": [{"id": 1, "image_id": 1, "caption": ""}],
                }
            ),
            "2 images have no reference caption: a.jpg, b.jpg$",
        ),
    ],
)
def test_load_references_bad_files_name_the_file(tmp_path, content, problem):
    path = tmp_path / "refs.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as info:
        load_references(path)
    assert str(path) in str(info.value)


def test_check_images_names_every_missing_image(tmp_path):
    (tmp_path / "here.png").write_bytes(b"x")
    items = read_coco(
        coco_json(tmp_path / "r.json", {"here.png": ["x"], "gone1.png": ["x"], "gone2.jpg": ["x"]})
    )
    with pytest.raises(FileNotFoundError, match=r"2 of 3 listed images not in .*gone1\.png, gone2\.jpg"):
        check_images(items, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^1 of 1 listed image not in .*: gone1\.png$"):
        check_images(items[1:2], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^1 of 2 listed images not in .*: gone1\.png$"):
        check_images(items[:2], tmp_path)
    check_images(items[:1], tmp_path)  # all present: no error


def test_load_references_takes_exactly_one_source_and_no_karpathy_split_for_coco(tmp_path):
    """COCO JSON and a Flickr8k token file together, or neither, is a ValueError (not one of
    them chosen silently); a Karpathy split asked of a COCO JSON is refused, not ignored (which
    would score every image of the file instead of the split's)."""
    tokens, split = flickr_files(tmp_path, ["rocket.jpg"])
    coco = coco_json(tmp_path / "r.json", {"a.png": ["A cat."]})
    for given in ({"references": coco, "captions": tokens, "split": split}, {}):
        with pytest.raises(ValueError, match="give either references"):
            load_references(**given)
    with pytest.raises(ValueError, match=r"r\.json: a Karpathy split was given, but this is not a Karpathy"):
        load_references(coco, karpathy_split="test")


def test_check_images_counts_a_folder_as_missing_and_names_the_first_five(tmp_path):
    """A folder named like a listed image is not the image (refused before any captioning); six
    missing: the first five named and "(and 1 more)"; exactly five: all five, nothing more."""
    (tmp_path / "folder.png").mkdir()
    names = ["folder.png", "m1.png", "m2.png", "m3.png", "m4.png", "m5.png"]
    items = [CaptionedImage(name, ["x"], i) for i, name in enumerate(names)]
    shown = "folder.png, m1.png, m2.png, m3.png, m4.png"
    with pytest.raises(FileNotFoundError) as six:
        check_images(items, tmp_path)
    assert str(six.value) == f"6 of 6 listed images not in {tmp_path}: {shown} (and 1 more)"
    with pytest.raises(FileNotFoundError) as five:
        check_images(items[:5], tmp_path)
    assert str(five.value) == f"5 of 5 listed images not in {tmp_path}: {shown}"


def test_check_images_names_a_missing_image_on_one_line_whatever_its_name(tmp_path):
    """README: a bad input is reported in one line on stderr. A listed file name holding a
    newline or a TAB is escaped as edgecap caption escapes names (docs/cli.md: \\n, \\t),
    not written out raw: before the fix the error went over two lines."""
    items = [CaptionedImage("gone\nfile.png", ["x"], 1), CaptionedImage("tab\tname.png", ["x"], 2)]
    with pytest.raises(FileNotFoundError) as missing:
        check_images(items, tmp_path)
    assert str(missing.value) == f"2 of 2 listed images not in {tmp_path}: gone\\nfile.png, tab\\tname.png"


# -- results and metrics ------------------------------------------------------------------------
def test_results_json_is_coco_results_format(tmp_path):
    items = read_coco(
        coco_json(
            tmp_path / "r.json", {"a.png": ["A cat."], "b.png": ["A dog."]}, ids={"a.png": 5, "b.png": 2}
        )
    )
    assert results_json(items, {2: "a dog", 5: "a cat"}) == [
        {"image_id": 5, "caption": "a cat"},
        {"image_id": 2, "caption": "a dog"},
    ]


REFS = {
    1: ["A dog runs across the green grass.", "A brown dog is running outside."],
    2: ["Two children play in the snow.", "Kids playing in snow near a house."],
    3: ["A man rides a red bike down the street.", "A cyclist on a city road."],
}
HYPS = {1: "a dog runs on the grass", 2: "two kids play in the snow", 3: "a man rides a bike"}


@needs_java
def test_score_equals_pycocoevalcap_run_directly(one_meteor):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # One METEOR (a Java process whose start-up is most of this test's time) for both sides:
    # metrics.score is handed the session's (conftest.py) instead of starting one.
    expected = {
        **{f"BLEU-{i + 1}": b for i, b in enumerate(bleu)},
        "METEOR": one_meteor.process.compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }

    meteor_each = one_meteor.process.compute_score(gts, res)[1]
    got, per_image = metrics.scores(REFS, HYPS, tokenizer="ptb")
    assert one_meteor.closed == [one_meteor.process]  # it ends the METEOR it used
    assert per_image["METEOR"] == pytest.approx(dict(zip(gts, meteor_each)), abs=1e-9)
    assert per_image["CIDEr"] == pytest.approx(dict(zip(gts, Cider().compute_score(gts, res)[1])), abs=1e-9)
    assert list(got) == list(metrics.METRIC_KEYS)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0 < got["BLEU-4"] < got["BLEU-1"] < 1


def test_score_split_of_one_image_warns_that_its_cider_is_zero(monkeypatch, capsys):
    """CIDEr-D weighs an n-gram by log(images / images whose references hold it): with one image
    every weight is log(1/1) = 0, so even the reference itself scores 0 (coco-caption's own
    definition, worked by hand). A user scoring one photo is told so; two photos are not."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    from edgecap.data.readers import CaptionedImage

    one = [CaptionedImage("cat.png", ["a cat on a mat"], 1)]
    report = score_split(one, {1: "a cat on a mat"})
    assert report.scores["CIDEr"] == 0.0 and report.scores["BLEU-1"] == pytest.approx(1.0)
    assert "one image: its CIDEr is 0 whatever its caption" in capsys.readouterr().err
    two = [*one, CaptionedImage("dog.png", ["a dog runs"], 2)]
    report = score_split(two, {1: "a cat on a mat", 2: "a dog runs"})
    assert report.scores["CIDEr"] > 0
    assert "CIDEr is 0" not in capsys.readouterr().err


def test_score_split_without_java_skips_only_meteor(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    items = read_coco(
        coco_json(tmp_path / "r.json", {str(k): v for k, v in REFS.items()}, ids={str(k): k for k in REFS})
    )
    report = score_split(items, {**HYPS, 99: "a caption of no listed image"})
    assert report.tokenizer == "simple" and report.skipped == ("METEOR",)
    assert list(report.scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert report.n_images == 3
    assert report.scores == metrics.score(REFS, HYPS, tokenizer="simple", metrics=tuple(report.scores))
    assert "Java not found" in capsys.readouterr().err


class _NamingCaptioner:
    """A stand-in Captioner whose caption of a photo is its file name; ``broken`` names fail."""

    def __init__(self, batch_size, broken=()):
        from types import SimpleNamespace

        self.options, self.broken = SimpleNamespace(batch_size=batch_size), set(broken)

    def iter_captions(self, paths, on_error, overlap=False):
        from types import SimpleNamespace

        from edgecap.errors import InputError

        assert on_error == "return"
        for path in paths:
            name = Path(path).name
            yield InputError(name, "not an image") if name in self.broken else SimpleNamespace(text=name)


def test_caption_split_gives_each_image_its_own_caption_and_counts_every_batch(tmp_path):
    """{image_id: caption} with each caption that of its own photo, ``on_progress`` told each
    batch's size (5 photos, batches of 2: 2, 2, 1), and a photo that fails stops the split."""
    from edgecap.evaluation.evaluate import ImageFailure, caption_split

    items = read_coco(coco_json(tmp_path / "r.json", {f"p{i}.png": ["x"] for i in range(5)}))
    done: list[int] = []
    hyps = caption_split(_NamingCaptioner(2), items, tmp_path, on_progress=done.append)
    assert hyps == {10 + i: f"p{i}.png" for i in range(5)}
    assert done == [2, 2, 1]
    with pytest.raises(ImageFailure, match="p3.png: not an image"):
        caption_split(_NamingCaptioner(2, broken={"p3.png"}), items, tmp_path)


def test_caption_split_names_every_failure_of_the_batch_that_stops_it(tmp_path):
    """Batches of 2 (p0 p1, p2 p3, p4): p2 and p3 broken, both named and kept in ``failures``;
    p1 and p4 broken, the split stops after the first batch, naming p1 only."""
    from edgecap.evaluation.evaluate import ImageFailure, caption_split

    items = read_coco(coco_json(tmp_path / "r.json", {f"p{i}.png": ["x"] for i in range(5)}))
    with pytest.raises(ImageFailure) as both:
        caption_split(_NamingCaptioner(2, broken={"p2.png", "p3.png"}), items, tmp_path)
    assert [f.source for f in both.value.failures] == ["p2.png", "p3.png"]
    assert both.value.problem.startswith("2 images could not be read")
    assert both.value.problem.endswith(": p2.png: not an image; p3.png: not an image")
    with pytest.raises(ImageFailure) as first:
        caption_split(_NamingCaptioner(2, broken={"p1.png", "p4.png"}), items, tmp_path)
    assert [f.source for f in first.value.failures] == ["p1.png"]


def test_an_image_failure_names_each_file_as_edgecap_caption_does():
    """edgecap eval prints ImageFailure.problem as its one line: each broken photo is named as
    edgecap caption names it (docs/cli.md: a newline as \\n), its name as it is. Before the fix
    the whole message went through InputError's folding of whitespace: "two  spaces.png" was
    named "two spaces.png", a file that does not exist, and a newline became a space."""
    from edgecap.errors import InputError
    from edgecap.evaluation.evaluate import ImageFailure

    err = ImageFailure(
        [InputError("two  spaces.png", "not an image"), InputError("new\nline.png", "truncated")]
    )
    want = "two  spaces.png: not an image; new\\nline.png: truncated"
    why = "so the split cannot be scored (a metric over part of it would mislead)"
    assert err.problem == f"2 images could not be read, {why}: {want}"
    assert str(err) == f"two  spaces.png: {err.problem}"
    # one broken photo (edgecap eval's summary had said "1 images could not be read")
    one = ImageFailure([InputError("two  spaces.png", "not an image")])
    assert one.problem == f"1 image could not be read, {why}: two  spaces.png: not an image"


def test_an_image_failure_survives_a_process_pool():
    """caption_split's ImageFailure raised in a process pool's worker pickles: it comes back
    with its failures, source, problem and message, as InputError does (before the fix the
    pickle called ImageFailure(source, problem): a TypeError, a broken pool)."""
    import pickle

    from edgecap.errors import InputError
    from edgecap.evaluation.evaluate import ImageFailure

    err = ImageFailure([InputError("p2.png", "not an image"), InputError("p3.png", "truncated")])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ImageFailure
    assert [(f.source, f.problem) for f in back.failures] == [
        ("p2.png", "not an image"),
        ("p3.png", "truncated"),
    ]
    assert (back.source, back.problem, str(back)) == ("p2.png", err.problem, str(err))


def test_score_split_with_java_asks_for_every_metric_with_the_ptb_tokenizer(monkeypatch):
    asked = []
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "score", lambda refs, hyps, **kw: asked.append(kw) or {"CIDEr": 1.0})
    items = [CaptionedImage(f"{k}.png", v, k) for k, v in REFS.items()]
    report = score_split(items, HYPS)
    assert asked == [{"tokenizer": "ptb", "metrics": metrics.METRIC_KEYS}]
    assert report.tokenizer == "ptb" and report.skipped == () and report.n_images == 3


# -- the command --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_captions(tiny_model_dir) -> dict[str, str]:
    """What the tiny model says about each example photo (beam 2, max 6 words)."""
    from edgecap import Captioner

    captioner = Captioner(tiny_model_dir, backend="onnxruntime", beam_size=2, max_length=6)
    return {name: c.text for name, c in zip(PHOTOS, captioner.caption_batch([EXAMPLES / n for n in PHOTOS]))}


@needs_java
def test_cli_json_and_results_end_to_end(tiny_model_dir, tiny_captions, tmp_path, one_meteor, capfd):
    # Each image's references include the model's own caption, so BLEU-1 and ROUGE-L must be ~1
    # if (and only if) captions are matched with their own image's references. The command in
    # this process (helpers.run_edgecap: its stdout read at the file descriptor, Java's
    # included) with the session's METEOR, which loads its tables for seconds.
    refs = coco_json(tmp_path / "refs.json", {name: [tiny_captions[name], *HUMAN[name]] for name in PHOTOS})
    results = tmp_path / "results.json"
    out = run_edgecap(
        capfd,
        "eval",
        "--images",
        str(EXAMPLES),
        "--references",
        str(refs),
        "--model",
        str(tiny_model_dir),
        "--backend",
        "onnxruntime",
        "--beam-size",
        "2",
        "--max-length",
        "6",
        "--batch-size",
        "3",
        "--output",
        str(results),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1
    summary = json.loads(out.stdout)
    for key in metrics.METRIC_KEYS:
        assert isinstance(summary[key], float) and 0 <= summary[key] <= 10, key
    assert summary["BLEU-1"] > 0.99 and summary["ROUGE-L"] > 0.99
    assert summary["n_images"] == 4 and summary["tokenizer"] == "ptb"
    assert summary["beam_size"] == 2 and summary["backend"].startswith("onnxruntime")
    # the defaults; the tiny model has no language models to fuse
    assert summary["decoding"] == {
        "guidance_bonus": 2.0,
        "constrained": False,
        "fusion_weight": 0.0,
        "consensus": True,
    }
    assert summary["model"] == {"name": "tiny-random", "path": str(tiny_model_dir), "precision": "fp32"}
    assert json.loads(results.read_text()) == [
        {"image_id": 10 + i, "caption": tiny_captions[name]} for i, name in enumerate(PHOTOS)
    ]
    assert one_meteor.closed == [one_meteor.process]  # METEOR scored, and the command ended it


def test_cli_flickr8k_layout_text_without_java(tiny_model_dir, tiny_captions, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    tokens, split = flickr_files(tmp_path, ["rocket.jpg", "chelsea.png", "coffee.png"])
    results = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            "--images",
            str(EXAMPLES),
            "--captions",
            str(tokens),
            "--split",
            str(split),
            "--model",
            str(tiny_model_dir),
            "--backend",
            "onnxruntime",
            "--max-length",
            "6",
            "--beam-size",
            "2",
            "--limit",
            "2",
            "--output",
            str(results),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Java not found" in out.err
    lines = dict(line.split(":", 1) for line in out.out.splitlines())
    assert lines["images"].split()[0] == "2"
    assert lines["tokenizer"].strip() == "simple (no usable Java: not coco-caption-exact)"
    assert lines["METEOR"].strip().startswith("skipped")
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert 0 <= float(lines[key]) <= 10, key
    assert "tiny-random" in lines["model"] and str(tiny_model_dir) in lines["model"]
    assert lines["backend"].strip().startswith("onnxruntime")
    assert "beam size 2" in lines["search"]
    # both Flickr8k files named; no --length-penalty: the mean log-probability per word (--help)
    assert lines["references"].strip() == f"{tokens} + {split}"
    assert "length penalty none (mean log-prob)" in lines["search"]
    assert lines["decoding"].strip() == "tag bonus 2, fusion weight 0, consensus choice on"
    assert json.loads(results.read_text()) == [
        {"image_id": 0, "caption": tiny_captions["rocket.jpg"]},
        {"image_id": 1, "caption": tiny_captions["chelsea.png"]},
    ]


def test_cli_missing_images_fail_before_captioning(tiny_model_dir, tmp_path, capfd):
    refs = coco_json(
        tmp_path / "refs.json",
        {
            "chelsea.png": ["A cat."],
            "gone1.jpg": ["A dog."],
            "rocket.jpg": ["A rocket."],
            "gone2.png": ["Snow."],
        },
    )
    results = tmp_path / "results.json"
    out = run_edgecap(
        capfd,
        "eval",
        "--images",
        EXAMPLES,
        "--references",
        refs,
        "--model",
        tiny_model_dir,
        "--output",
        results,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert "2 of 4 listed images" in out.stderr and "gone1.jpg, gone2.png" in out.stderr
    assert not results.exists()


def test_cli_undecodable_image_fails_without_scoring(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    refs = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat."], "broken.jpg": ["A dog."]})
    results = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            "--images",
            str(tmp_path),
            "--references",
            str(refs),
            "--model",
            str(tiny_model_dir),
            "--max-length",
            "3",
            "--output",
            str(results),
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 1
    assert "broken.jpg" in out.err and "cannot be scored" in out.err
    assert out.out == "" and not results.exists()


@pytest.mark.parametrize(
    "args, problem",
    [
        ([], "give --references"),
        (["--references", "r.json", "--captions", "t.txt", "--split", "s.txt"], "not both"),
        (["--captions", "t.txt"], "--captions needs --split"),
        (["--references", "r.json", "--split", "s.txt"], "--split goes with --captions"),
        (["--references", "r.json", "--limit", "0"], "--limit must be at least 1"),
        (
            ["--captions", "t.txt", "--split", "s.txt", "--karpathy-split", "test"],
            "--karpathy-split goes with --references",
        ),
        (["--references", "nowhere.json"], "nowhere.json: no such file"),
    ],
)
def test_cli_bad_reference_options(args, problem, tmp_path, capsys):
    rc = main(["eval", "--images", str(tmp_path), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert problem in err and "Errno" not in err and len(err.splitlines()) == 1


# Worked by hand from the metrics' published definitions (BLEU: Papineni et al. 2002, corpus
# counts, clipped n-gram precisions, brevity penalty exp(1 - r/c); ROUGE-L: LCS F-measure with
# beta 1.2; CIDEr-D: Vedantam et al. 2015, tf-idf n-gram cosines, sigma 6, x10), tokenised by the
# simple tokenizer: lower case, punctuation gone, "dog's" one word. The two images share no
# n-gram, so every n-gram's idf is log 2: "a" is its own reference (every cosine 1, CIDEr-D 10);
# "b" says 4 words against 5: unigrams 4/4 match, bigrams 1/3, no trigram or 4-gram; unigram
# cosine 4/sqrt(4*5), bigram 1/sqrt(3*4), length penalty exp(-1/72); LCS 3 ("a dog's ball").
# Corpus BLEU: 10/10, 6/8, 4/6, 3/4 n-grams, 10 words against 11. The hypotheses are given in
# the other order than the references: each is scored against its own image's.
HAND_REFS = {"a": ["The cat sat on the mat."], "b": ["A dog's ball is red!"]}
HAND_HYPS = {"b": "A dog's red ball.", "a": "the cat sat on the mat"}
_BP = math.exp(1 - 11 / 10)
_CIDER_B = 10 * (4 / math.sqrt(20) + 1 / math.sqrt(12)) / 4 * math.exp(-1 / 72)
HAND_SCORES = {
    "BLEU-1": _BP,
    "BLEU-2": _BP * (1 * 6 / 8) ** (1 / 2),
    "BLEU-3": _BP * (1 * 6 / 8 * 4 / 6) ** (1 / 3),
    "BLEU-4": _BP * (1 * 6 / 8 * 4 / 6 * 3 / 4) ** (1 / 4),
    "ROUGE-L": (1 + (1 + 1.2**2) * (3 / 4) * (3 / 5) / (3 / 5 + 1.2**2 * 3 / 4)) / 2,
    "CIDEr": (10 + _CIDER_B) / 2,
}


def test_the_table_prints_each_metric_to_four_decimals(capsys):
    """The figures quoted from ``edgecap eval`` (README: METEOR 19.89, BLEU-4 19.5, CIDEr 0.490)
    are its fractions to four decimals: 0.1989 is 19.89 points; three would give 19.9."""
    from edgecap.commands.eval import _print_table

    summary = {
        "BLEU-1": 0.61234,
        "BLEU-2": 0.4,
        "BLEU-3": 0.3,
        "BLEU-4": 0.19512,
        "METEOR": 0.19894,
        "ROUGE-L": 0.45,
        "CIDEr": 0.48996,
        "n_images": 1000,
        "tokenizer": "ptb",
        "model": {"name": "m", "path": "/m", "precision": "fp32"},
        "backend": "onnxruntime (cpu)",
        "beam_size": 3,
        "max_length": 20,
        "length_penalty": None,
        "no_repeat_ngram": 3,
        "decoding": {"guidance_bonus": 2.0, "constrained": False, "fusion_weight": 0.7, "consensus": True},
        "frames": {"blank_check": True, "brighten": True, "crop_bars": True},
        "references": "refs.json",
        "caption_seconds": 12.5,
    }
    _print_table(summary)
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert [lines[k].strip() for k in ("BLEU-1", "BLEU-4", "METEOR", "CIDEr")] == [
        "0.6123",
        "0.1951",
        "0.1989",
        "0.4900",
    ]
    summary["METEOR"] = None
    _print_table(summary)
    assert "METEOR:      skipped (needs Java)" in capsys.readouterr().out


def test_simple_tokenizer_scores_are_the_metrics_worked_by_hand():
    wanted = tuple(HAND_SCORES)
    corpus, per_image = metrics.scores(HAND_REFS, HAND_HYPS, tokenizer="simple", metrics=wanted)
    assert list(corpus) == list(HAND_SCORES)
    assert corpus == pytest.approx(HAND_SCORES, abs=1e-6)
    assert per_image["CIDEr"] == pytest.approx({"a": 10.0, "b": _CIDER_B}, abs=1e-6)
    assert metrics.per_image_cider(HAND_REFS, HAND_HYPS, tokenizer="simple") == per_image["CIDEr"]
    # each image's value under its own id, whatever the references' order
    backwards = dict(reversed(HAND_REFS.items()))
    _, each = metrics.scores(backwards, HAND_HYPS, tokenizer="simple", metrics=("CIDEr",))
    assert each["CIDEr"] == pytest.approx({"a": 10.0, "b": _CIDER_B}, abs=1e-6)
    # every reference counts: "the cat sleeps" is all of the second one (3 of 3 words, 3 long;
    # its longest common subsequence with it 3 of 3: ROUGE-L 1)
    two = metrics.score(
        {"x": ["A dog runs.", "The cat sleeps."]}, {"x": "the cat sleeps"}, "simple", ("BLEU-1", "ROUGE-L")
    )
    assert (two["BLEU-1"], two["ROUGE-L"]) == pytest.approx((1.0, 1.0), abs=1e-6)
    with pytest.raises(ValueError, match=r"^1 image has references but no caption, e.g. \['b'\]$"):
        metrics.score(HAND_REFS, {"a": "a cat"}, tokenizer="simple", metrics=("CIDEr",))
    with pytest.raises(ValueError, match=r"^2 images have references but no caption, e.g. \['a', 'b'\]$"):
        metrics.score(HAND_REFS, {}, tokenizer="simple", metrics=("CIDEr",))
    # a misspelt metric is named, not silently left out of the scores
    with pytest.raises(ValueError, match=r"unknown metrics \['CIDEr-D', 'meteor'\]"):
        metrics.score(HAND_REFS, HAND_HYPS, tokenizer="simple", metrics=("CIDEr", "CIDEr-D", "meteor"))


def test_score_without_java_falls_back_to_the_simple_tokenizer_and_skips_meteor(monkeypatch):
    """A library caller asking for the default PTB tokenizer and METEOR where Java is absent gets
    the simple tokenizer's scores (the hand-worked ones above) and no METEOR, each with a
    warning, not a failure to start Java; and no references at all is an error naming it."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.warns(UserWarning) as warned:
        got = metrics.score(HAND_REFS, HAND_HYPS, metrics=("BLEU-4", "METEOR", "CIDEr"))
    assert got == pytest.approx(
        {k: HAND_SCORES[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr")}
    )
    messages = [str(w.message) for w in warned]
    assert any("Java not found: using the simple tokenizer instead of PTB" in m for m in messages)
    assert "Java not found: METEOR skipped" in messages
    with pytest.raises(ValueError, match="nothing to score: no references"):
        metrics.score({}, {}, tokenizer="simple", metrics=("BLEU-4", "CIDEr"))


def test_the_java_warnings_point_at_the_caller_and_nothing_is_printed(monkeypatch, capfd):
    """Each warning of a scoring function (no Java: the simple tokenizer, METEOR skipped) is the
    library caller's, as Python shows it: its file, not edgecap's own (``score``'s pointed into
    edgecap, passed on through ``scores``). The scorers print nothing (BLEU's report on stdout
    would be in the middle of ``edgecap eval --json``'s output)."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.warns(UserWarning) as by_score:
        metrics.score(HAND_REFS, HAND_HYPS)
    with pytest.warns(UserWarning) as by_scores:
        metrics.scores(HAND_REFS, HAND_HYPS)
    with pytest.warns(UserWarning) as by_per_image:
        metrics.per_image_cider(HAND_REFS, HAND_HYPS)
    for warned, n in ((by_score, 2), (by_scores, 2), (by_per_image, 1)):
        assert [Path(w.filename) for w in warned] == [Path(__file__)] * n
    assert capfd.readouterr() == ("", "")


def test_a_java_that_does_not_start_is_no_java(tmp_path, monkeypatch):
    """README: without Java, edgecap eval skips METEOR and tokenises in Python. A ``java`` on
    PATH that exits at once with an error (macOS's /usr/bin/java where no Java runtime is
    installed: "Unable to locate a Java Runtime", exit 1) is no Java; one that starts (exit 0
    for ``java -version``) is. Before the fix any ``java`` on PATH counted: the PTB tokenizer
    then gave no lines and BLEU came from the first image alone, then METEOR died of a broken
    pipe and the command hung at exit."""
    for name, status in (("stub", 1), ("works", 0)):
        (tmp_path / name).mkdir()
        java = tmp_path / name / "java"
        java.write_text(f"#!/bin/sh\necho 'Unable to locate a Java Runtime.' >&2\nexit {status}\n")
        java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "stub"))
    assert metrics.java_available() is False
    monkeypatch.setenv("PATH", str(tmp_path / "works"))
    assert metrics.java_available() is True
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert metrics.java_available() is False


def test_the_java_warning_says_install_only_where_there_is_no_java(tmp_path, monkeypatch, capsys):
    """edgecap eval without a usable Java: with no ``java`` on PATH the warning says 'Java not
    found' and to install a Java runtime; with one that does not start (macOS's stub: 'Unable to
    locate a Java Runtime.', exit 1; the JVM under a memory limit) it names that java, what it
    said (not the JVM's log lines, '[0.022s][warning]...') or why it could not be run, and to make
    it start."""
    items = read_coco(
        coco_json(tmp_path / "r.json", {str(k): v for k, v in REFS.items()}, ids={str(k): k for k in REFS})
    )
    stub = tmp_path / "stub" / "java"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'Unable to locate a Java Runtime.' >&2\nexit 1\n")
    stub.chmod(0o755)
    # the JVM under ulimit -v 1 GiB, as measured: its log lines and the cause on stdout
    vm = tmp_path / "vm" / "java"
    vm.parent.mkdir()
    log = '[0.022s][warning][os,thread] Failed to start thread "G1 Refine#0" - pthread_create failed'
    vm.write_text(
        f"#!/bin/sh\necho '{log}'\necho 'Error occurred during initialization of VM'\n"
        "echo 'Could not create G1ServiceThread'\n"
        "echo 'Error: Could not create the Java Virtual Machine.' >&2\nexit 1\n"
    )
    vm.chmod(0o755)
    # a java built for another machine (an x86 runtime copied to an arm robot): not executable here
    foreign = tmp_path / "foreign" / "java"
    foreign.parent.mkdir()
    foreign.write_bytes(b"\x7fELF" + b"\0" * 60)
    foreign.chmod(0o755)
    middle = (
        "METEOR skipped and the simple tokenizer used instead of coco-caption's PTB tokenizer "
        "(BLEU / ROUGE-L / CIDEr are then close to, but not exactly, coco-caption's); "
    )
    for path, said in (
        (tmp_path / "nothing-here", f"Java not found: {middle}install a Java runtime for exact numbers"),
        (
            stub.parent,
            f"Java {stub} does not start (java -version: exit 1; Unable to locate a Java Runtime.): "
            f"{middle}make it start for exact numbers",
        ),
        (
            vm.parent,
            f"Java {vm} does not start (java -version: exit 1; Error occurred during initialization "
            f"of VM; Could not create G1ServiceThread): {middle}make it start for exact numbers",
        ),
        (
            foreign.parent,
            f"Java {foreign} does not start (java -version: [Errno 8] Exec format error: "
            f"'{foreign}'): {middle}make it start for exact numbers",
        ),
    ):
        monkeypatch.setenv("PATH", str(path))
        metrics._java_starts.cache_clear()
        try:
            report = score_split(items, HYPS)
        finally:
            metrics._java_starts.cache_clear()
        assert report.tokenizer == "simple" and report.skipped == ("METEOR",)
        warned = [line for line in capsys.readouterr().err.splitlines() if "Java" in line]
        assert warned == [f"edgecap eval: warning: {said}"]


def test_a_library_caller_is_told_which_java_does_not_start(tmp_path, monkeypatch):
    """metrics.score's fallback warnings name a java that is installed but does not start (a macOS
    stub, a memory limit) and what it said, as edgecap eval's own warning does; they said 'Java
    not found' of it. A stand-in java on PATH; with none, 'Java not found' as before."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\necho 'Unable to locate a Java Runtime.' >&2\nexit 1\n")
    java.chmod(0o755)
    exact = "for coco-caption-exact numbers"
    for path, why, remedy in (
        (
            bin_dir,
            f"{java} does not start (java -version: exit 1; Unable to locate a Java Runtime.)",
            f"make it start {exact}",  # it is installed: installing one is not the remedy
        ),
        (tmp_path / "nothing-here", "not found", f"install a JRE {exact}"),
    ):
        monkeypatch.setenv("PATH", str(path))
        metrics._java_starts.cache_clear()
        try:
            with pytest.warns(UserWarning) as warned:
                metrics.score(HAND_REFS, HAND_HYPS, metrics=("BLEU-4", "METEOR"))
        finally:
            metrics._java_starts.cache_clear()
        messages = [str(w.message) for w in warned]
        assert f"Java {why}: using the simple tokenizer instead of PTB; {remedy}" in messages
        assert f"Java {why}: METEOR skipped" in messages


@needs_java
def test_eval_scores_with_java_from_a_working_folder_since_removed(tmp_path, monkeypatch, recwarn):
    """Java does not start in a working folder that has been removed (a script's folder deleted
    under it): ``java -version`` failed there, so edgecap eval said 'Java not found' and scored with
    the simple tokenizer, and the PTB tokenizer failed. Both run in a folder of their own: the
    hand-worked PTB BLEU-4 (test_ptb_tokenizer_scores_are_the_metrics_worked_by_hand) and METEOR."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    metrics._java_starts.cache_clear()  # asked again from here
    try:
        assert metrics.java_available()
        got = metrics.score(HAND_REFS, HAND_HYPS, tokenizer="ptb", metrics=("BLEU-4", "METEOR"))
    finally:
        metrics._java_starts.cache_clear()
    bp = math.exp(1 - 12 / 11)
    assert got["BLEU-4"] == pytest.approx(bp * (7 / 9 * 5 / 7 * 3 / 5) ** (1 / 4), abs=1e-6)
    assert 0 < got["METEOR"] <= 1
    assert not [w for w in recwarn if "Java" in str(w.message)]


def test_ending_meteor_closes_its_pipes():
    """``_close_meteor`` ends METEOR's Java and closes the three pipes to it (its output pipes
    were left open: 'ResourceWarning: unclosed file' under python -X dev after every eval), also
    keeping the lock free. A stand-in process for Java."""
    import threading
    from types import SimpleNamespace

    pipe = subprocess.PIPE
    java = subprocess.Popen(["sleep", "30"], stdin=pipe, stdout=pipe, stderr=pipe)
    meteor = SimpleNamespace(meteor_p=java, lock=threading.Lock())
    meteor.lock.acquire()  # as a failed compute_score leaves it
    metrics._close_meteor(meteor)
    assert java.returncode is not None and not meteor.lock.locked()
    assert (java.stdin.closed, java.stdout.closed, java.stderr.closed) == (True, True, True)


@needs_java
def test_ptb_tokenizer_scores_are_the_metrics_worked_by_hand(recwarn):
    """coco-caption's PTB tokenizer, as the papers scored: it splits "dog's" into "dog 's",
    which the simple tokenizer keeps whole. "b" is then 5 words against 6: unigrams 5/5,
    bigrams 2/4 ("a dog", "dog 's"), trigrams 1/3, 4-grams 0/2; the corpus 11 words against 12,
    n-grams 11/11, 7/9, 5/7, 3/5."""
    got = metrics.score(HAND_REFS, HAND_HYPS, tokenizer="ptb", metrics=("BLEU-4",))
    bp = math.exp(1 - 12 / 11)
    assert got == pytest.approx(
        {
            "BLEU-1": bp,
            "BLEU-2": bp * (7 / 9) ** (1 / 2),
            "BLEU-3": bp * (7 / 9 * 5 / 7) ** (1 / 3),
            "BLEU-4": bp * (7 / 9 * 5 / 7 * 3 / 5) ** (1 / 4),
        },
        abs=1e-6,
    )
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]


@needs_java
def test_ptb_tokenizer_keeps_each_caption_with_its_image_across_line_breaks(recwarn):
    """A reference caption of one's own may hold a carriage return (a caption edited on
    Windows), a vertical tab, a form feed or a Unicode line or paragraph separator; Java's
    PTBTokenizer ends a line at each of them, where pycocoevalcap replaces only "\n". Each is a
    space between two words, so every caption here is its hypothesis word for word: BLEU-1 and
    ROUGE-L 1. Before the fix "a cat" became image 0's reference, "sits on a mat" image 1's and
    so on down the list, every later image scored against another's caption."""
    breaks = ["\r", "\r\n", "\x0b", "\x0c", "\u2028", "\u2029"]
    refs = {i: [f"a cat{b}sits on a mat {i}"] for i, b in enumerate(breaks)}
    refs[len(breaks)] = ["the last dog runs"]
    hyps = {i: f"a cat sits on a mat {i}" for i in range(len(breaks))}
    hyps[0] = "a cat\u2028sits on a mat 0"  # a library caller's hypothesis likewise
    hyps[len(breaks)] = "the last dog runs"
    got = metrics.score(refs, hyps, tokenizer="ptb", metrics=("BLEU-1", "ROUGE-L"))
    assert (got["BLEU-1"], got["ROUGE-L"]) == pytest.approx((1.0, 1.0), abs=1e-6)


@needs_java
def test_ptb_hypotheses_without_a_word_score_zero_not_a_java_failure(recwarn):
    """A model that says nothing (every caption empty, or only punctuation, which the PTB
    tokenizer removes) is scored: 0 in every metric (an empty caption shares no word with its
    references), not ``JavaFailed``. Java's own failure with one caption gives back one empty
    line too; only captions that had a word and all came back empty are Java's fault."""
    refs = {1: ["a cat sits on a mat"], 2: ["a dog runs on the grass"]}
    for hyps in ({1: "", 2: ""}, {1: "...", 2: " . "}):
        got = metrics.score(refs, hyps, tokenizer="ptb", metrics=("BLEU-1", "ROUGE-L", "CIDEr"))
        assert (got["BLEU-1"], got["ROUGE-L"], got["CIDEr"]) == pytest.approx((0, 0, 0), abs=1e-9)


@needs_java
def test_ptb_scores_leave_out_a_caption_of_an_image_without_references(recwarn):
    """A results file may hold captions of more photos than the references list (a split scored
    with fewer references): as with the simple tokenizer, the scores are those of the listed
    images, not an error from coco-caption's scorers (which need the same images on both sides)."""
    refs = {1: ["a cat sits on a mat"], 2: ["a dog runs on the grass"]}
    hyps = {1: "a cat sits on a mat", 2: "a dog runs on grass"}
    wanted = ("BLEU-1", "ROUGE-L", "CIDEr")
    alone = metrics.score(refs, hyps, tokenizer="ptb", metrics=wanted)
    assert metrics.score(refs, {**hyps, 3: "a bird"}, tokenizer="ptb", metrics=wanted) == alone


@needs_java
def test_a_meteor_whose_java_dies_is_an_error_not_a_hang_at_exit():
    """pycocoevalcap's METEOR takes a lock to score and keeps it when it fails, and its
    ``__del__`` waits for that lock. A METEOR whose Java is gone (here its jar cannot be found,
    so Java exits at once: a broken pipe or an empty reply; likewise Ctrl-C while it scores)
    is an exception the caller sees, and the process then exits. Before the fix it hung at exit,
    forever (edgecap eval after its traceback: a second Ctrl-C needed). A fresh interpreter,
    because what is tested is its exit."""
    import subprocess
    import sys

    child = "\n".join(
        [
            "import pycocoevalcap.meteor.meteor as meteor_module",
            "meteor_module.METEOR_JAR = 'no-such-meteor.jar'",
            "from edgecap.evaluation import metrics",
            "try:",
            "    metrics.score({1: ['a cat']}, {1: 'a cat'}, tokenizer='simple', metrics=('METEOR',))",
            "except metrics.JavaFailed as exc:",
            "    print(type(exc.__cause__).__name__)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip() in ("BrokenPipeError", "ValueError")) == (0, True), done


def _java_exits(monkeypatch, code: int, stdout: bytes, stderr: bytes) -> None:
    """``metrics``' subprocess.run replaced by a Java that exits ``code`` with this output."""
    import subprocess as real_subprocess

    def run(command, **kwargs):
        return real_subprocess.CompletedProcess(command, code, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(metrics.subprocess, "run", run)


@pytest.mark.parametrize(
    "stderr, said",
    [(b"", "it wrote no error"), (b"java.io.IOException: Stream closed\n", "its errors are on stderr above")],
)
def test_a_ptb_tokenizer_that_gives_back_too_few_lines_is_an_error_naming_how_many(
    monkeypatch, capsys, stderr, said
):
    """Java ending well (exit 0) with fewer lines than captions (its output cut short): the
    captions would be paired with the wrong images' references, so it is JavaFailed saying how
    many came back, not scores; it points at Java's errors on stderr only where Java wrote any
    (passed on), and says it wrote none where it did not. (subprocess.run stands in for Java.)"""
    _java_exits(monkeypatch, 0, b"a cat sits\n", stderr)
    refs = {1: ["a cat sits", "a cat"], 2: ["a dog runs"]}
    with pytest.raises(metrics.JavaFailed) as failed:
        metrics._ptb(refs)
    assert str(failed.value) == (
        f"coco-caption's PTB tokenizer (Java) gave back 1 of 3 captions ({said}): "
        "coco-caption needs Java 8 or newer (java -version)"
    )
    assert capsys.readouterr().err == stderr.decode()


def test_a_ptb_tokenizer_failing_without_a_word_says_it_wrote_no_error(monkeypatch, capsys):
    """Java exiting 1 without writing anything (killed, a wrapper script failing quietly): the
    error says the exit status and that Java wrote no error, not that its errors are above."""
    _java_exits(monkeypatch, 1, b"", b"\n")
    with pytest.raises(metrics.JavaFailed) as failed:
        metrics._ptb({1: ["a cat sits"]})
    assert str(failed.value) == (
        "coco-caption's PTB tokenizer (Java) failed, exit 1 (it wrote no error): "
        "coco-caption needs Java 8 or newer (java -version)"
    )
    assert capsys.readouterr().err == ""


@needs_java
def test_a_ptb_tokenizer_that_java_cannot_run_is_an_error_not_scores(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A Java that starts but cannot run coco-caption's PTB tokenizer (too old for its jar; here
    the jar cannot be found, so Java prints its error and exits 1) gave no lines back, which
    pycocoevalcap does not check: the scorers then failed on empty input ('max() arg is an empty
    sequence', a traceback). It is JavaFailed naming the tokenizer and Java's exit status, Java's
    own error passed on to stderr, and edgecap eval says so in one line, exit 2, after writing
    --output."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    monkeypatch.setattr(ptb, "STANFORD_CORENLP_3_4_1_JAR", "no-such-corenlp.jar")
    with pytest.raises(
        metrics.JavaFailed, match=r"PTB tokenizer \(Java\) failed, exit 1 \(its errors are on"
    ):
        metrics.score({1: ["a cat sits", "a cat"], 2: ["a dog runs"]}, {1: "a cat", 2: "a dog"}, "ptb")
    assert "edu.stanford.nlp.process.PTBTokenizer" in capsys.readouterr().err  # Java's "could not load"
    with pytest.raises(metrics.JavaFailed, match=r"failed, exit 1"):
        metrics.score({1: ["a cat sits"]}, {1: "a cat"}, "ptb", metrics=("BLEU-1",))
    capsys.readouterr()
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    refs = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat."]})
    out = tmp_path / "captions.json"
    args = ["--images", str(tmp_path), "--references", str(refs), "--model", str(tiny_model_dir)]
    assert main(["eval", *args, "--max-length", "3", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "edgecap eval: error: coco-caption's PTB tokenizer (Java) failed, exit 1 (its errors are on "
        "stderr above): coco-caption needs Java 8 or newer (java -version); the "
        f"captions are in {out}"
    )
    written = json.loads(out.read_text())
    assert len(written) == 1 and written[0]["caption"].strip()  # the photo's caption kept
    # an --output that cannot be written (/proc takes no new file) is said too, before the Java line
    proc = "/proc/edgecap-eval-captions.json"
    assert main(["eval", *args, "--max-length", "3", "--output", proc, "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith(f"edgecap eval: error: --output {proc}: cannot write it (")
    assert err[-1].endswith("coco-caption needs Java 8 or newer (java -version)")


def test_a_blank_reference_beside_real_ones_is_no_reference():
    """A blank cell among an image's references ("", "..."): not scored as a reference. The
    scores are those without the blanks (a reviewer's captions equal to their references had
    scored CIDEr-D 7.5 with a blank beside each, 10 without)."""
    refs = {1: ["a cat on a mat", "a cat sits on a mat"], 2: ["a dog in the park", "a dog runs in a park"]}
    hyps = {1: "a cat on a mat", 2: "a dog in the park"}
    blank = {1: [*refs[1], ""], 2: [*refs[2], "..."]}
    plain = metrics.score(refs, hyps, "simple", metrics=("BLEU-4", "CIDEr"))
    assert metrics.score(blank, hyps, "simple", metrics=("BLEU-4", "CIDEr")) == plain


def test_meteor_s_java_running_out_of_memory_is_said_so_not_that_it_needs_java_8(monkeypatch):
    """METEOR's Java failing on a very long caption (its heap: java.lang.OutOfMemoryError, on
    its stderr, which pycocoevalcap never reads) is said so; it had been "coco-caption needs
    Java 8 or newer" where Java 17 ran. Another failure gives Java's last line; none, the Java
    hint as before. pycocoevalcap's Meteor is stood in for (no Java needed)."""
    import io
    import types

    from pycocoevalcap.meteor import meteor as meteor_module

    said = [b""]

    class FailingMeteor:
        def __init__(self):
            self.meteor_p = types.SimpleNamespace(
                wait=lambda timeout=None: 1, stderr=io.BytesIO(said[0]), kill=lambda: None
            )
            self.lock = __import__("threading").Lock()

        def compute_score(self, refs, hyps):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(meteor_module, "Meteor", FailingMeteor)
    monkeypatch.setattr(metrics, "_close_meteor", lambda meteor: None)
    cases = [
        (
            b'Exception in thread "main" java.lang.OutOfMemoryError: Java heap space\n\tat ...\n',
            "its Java ran out of memory (java.lang.OutOfMemoryError): a caption or reference too long",
        ),
        (b"Error: some other trouble\n", "its Java said: Error: some other trouble"),
        (b"", "coco-caption needs Java 8 or newer (java -version)"),
    ]
    for stderr, why in cases:
        said[0] = stderr
        with pytest.raises(metrics.JavaFailed) as failed:
            metrics.score({1: ["a cat sits"]}, {1: "a cat"}, "simple", metrics=("METEOR",))
        assert str(failed.value).startswith(
            "METEOR (Java) failed while scoring: BrokenPipeError(32, 'Broken pipe'): " + why
        )


def test_a_java_gone_before_the_ptb_tokenizer_runs_is_java_not_the_temporary_file(tmp_path, monkeypatch):
    """A ``java`` that was there when Java was checked and is gone when the PTB tokenizer starts
    (PATH without it here; Java's check stubbed) is Java's failure, named so, not the temporary
    file's ('cannot write its temporary file'): that file was written."""
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(metrics.JavaFailed) as failed:
        metrics.score({1: ["a cat sits"]}, {1: "a cat"}, "ptb", metrics=("BLEU-1",))
    assert str(failed.value) == (
        "coco-caption's PTB tokenizer (Java) failed: [Errno 2] No such file or directory: 'java': "
        "coco-caption needs Java 8 or newer (java -version)"
    )


def test_a_ptb_tokenizer_that_cannot_write_its_temporary_file_does_not_blame_java(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The PTB tokenizer's captions go to a file in the system's temporary folder; where that
    cannot be written (TMPDIR a folder since removed, a full disk) it is one line naming the
    folder and the system's reason, exit 2, not 'coco-caption needs Java 8 or newer (java
    -version)': Java never ran. Java's check is stubbed (no Java needed)."""
    import tempfile

    gone = tmp_path / "removed-tmp"
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(tempfile, "tempdir", str(gone))
    with pytest.raises(metrics.JavaFailed) as missing:
        metrics.score({1: ["a cat sits"]}, {1: "a cat"}, "ptb", metrics=("BLEU-1",))
    assert str(missing.value) == (
        f"coco-caption's PTB tokenizer cannot write its temporary file in {gone} (No such file or directory)"
    )
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    refs = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat."]})
    out = tmp_path / "captions.json"
    args = ["--images", str(tmp_path), "--references", str(refs), "--model", str(tiny_model_dir)]
    assert main(["eval", *args, "--max-length", "3", "--output", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"edgecap eval: error: coco-caption's PTB tokenizer cannot write its temporary file in {gone} "
        f"(No such file or directory); the captions are in {out}"
    )


def _read_only_run(folder: str, code: str, tmp_path: Path) -> subprocess.CompletedProcess | None:
    """``python -c code`` with ``folder`` mounted read-only for it alone (a private mount
    namespace: ``unshare -m``, a read-only bind mount); None where this machine does not allow
    that (not root, no ``unshare``, a container without the right)."""
    import shutil

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    mount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    command = ["unshare", "-m", "sh", "-c", mount, "sh"]
    tried = subprocess.run([*command, str(probe), "touch", str(probe / "f")], capture_output=True, timeout=60)
    if tried.returncode == 0 or b"Read-only file system" not in tried.stderr or (probe / "f").exists():
        return None  # the mount was not made, or not read-only
    return subprocess.run(
        [*command, folder, sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )


@needs_java
def test_the_ptb_tokenizer_runs_where_pycocoevalcap_is_read_only(tmp_path):
    """pycocoevalcap's own PTBTokenizer writes the captions to a file beside its jar, in the
    installed package's folder: where that is read-only (root installed it and another user runs
    edgecap eval, a container's user; a read-only image) it failed, every time ('cannot write its
    temporary file in .../pycocoevalcap/tokenizer (Read-only file system)'). Run here with that
    folder mounted read-only: the score is the PTB tokenization's worked by hand in
    test_ptb_tokenizer_scores_are_the_metrics_worked_by_hand."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    folder = os.path.dirname(os.path.abspath(ptb.__file__))
    score = f"metrics.score({HAND_REFS!r}, {HAND_HYPS!r}, tokenizer='ptb', metrics=('BLEU-4',))"
    child = "\n".join(
        [
            "import os, tempfile",
            "from edgecap.evaluation import metrics",
            f"try: tempfile.NamedTemporaryFile(dir={folder!r})",
            "except OSError as exc: print('read-only:', exc.strerror)",
            f"print({score}['BLEU-4'])",
        ]
    )
    done = _read_only_run(folder, child, tmp_path)
    if done is None:
        pytest.skip("this machine cannot mount a folder read-only for one process (unshare -m)")
    assert done.returncode == 0, done.stderr
    said, bleu4 = done.stdout.splitlines()
    assert said == "read-only: Read-only file system"
    bp = math.exp(
        1 - 12 / 11
    )  # as worked by hand in test_ptb_tokenizer_scores_are_the_metrics_worked_by_hand
    assert float(bleu4) == pytest.approx(bp * (7 / 9 * 5 / 7 * 3 / 5) ** (1 / 4), abs=1e-6)


@needs_java
def test_the_ptb_tokenizer_gives_coco_captions_tokens_and_keeps_stderr_for_problems(capfd):
    """The PTB tokenization is coco-caption's, token for token (pycocoevalcap's PTBTokenizer on
    the same captions: contractions, possessives, brackets, non-ASCII letters, an emoji, empty and
    punctuation-only captions), and its report when done ('PTBTokenizer tokenized 17 tokens at
    267.37 tokens per second.', twice an edgecap eval) no longer reaches stderr; what else Java
    says (here: that it cannot tokenize the emoji) does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {
        7: ["A dog's ball -- isn't it?", "café au lait… 10.5% “quoted” (paren) [bracket] {brace}"],
        "b": ["emoji 🐶 here", "tab\there", "  spaces around  ", "", "...", "U.S.A. e.g. Mr. Smith's"],
        3: ["ÅNGSTRÖM naïve 東京", "A man rides a red bike down the street."],
    }
    expected = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    capfd.readouterr()
    assert metrics._ptb(captions) == expected
    assert expected[7][0] == "a dog 's ball is n't it"  # what coco-caption's tokens look like
    err = capfd.readouterr().err
    assert "PTBTokenizer tokenized" not in err and "Untokenizable" in err
    metrics.score(REFS, HYPS, tokenizer="ptb", metrics=("BLEU-1",))
    assert capfd.readouterr().err == ""


@needs_java
def test_a_reference_with_half_an_emoji_is_tokenized_without_it(tiny_model_dir, tmp_path, capsys):
    """A reference caption cut in the middle of an emoji by a tool that counts UTF-16 units (a
    JavaScript slice: JSON.stringify writes the lone half as "\\ud83d", which Python's json reads
    as a lone surrogate) is not text UTF-8 can write: the PTB tokenizer's captions file failed
    with a traceback (UnicodeEncodeError), edgecap eval exit 1. Half a character has no word: the
    caption's tokens are those of the caption without it, as the simple tokenizer's are."""
    refs = {1: ["A cat \ud83d on a mat.", "A cat."], 2: ["A dog."]}
    assert metrics._ptb(refs) == {1: ["a cat on a mat", "a cat"], 2: ["a dog"]}
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    path = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat \ud83d on a mat."]})  # JSON's "\\ud83d"
    args = ["--images", str(tmp_path), "--references", str(path), "--model", str(tiny_model_dir)]
    assert main(["eval", *args, "--max-length", "3", "--no-progress"]) == 0, capsys.readouterr().err


@needs_java
def test_the_ptb_tokenizers_report_is_dropped_in_a_locale_with_decimal_commas(monkeypatch, capfd):
    """Java words its report in the user's locale: in German 'PTBTokenizer tokenized 4 tokens at
    78,91 tokens per second.' (a decimal comma; seen here with java 17). It is dropped as in
    English; Java's other words (here 'Picked up JAVA_TOOL_OPTIONS: ...', as Java says whenever
    that is set) still reach stderr."""
    options = "-Duser.language=de -Duser.country=DE"
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", options)
    capfd.readouterr()
    assert metrics._ptb({1: ["A cat sat on the mat."], 2: ["A dog."]}) == {
        1: ["a cat sat on the mat"],
        2: ["a dog"],
    }
    err = capfd.readouterr().err
    assert "tokens per second" not in err and f"Picked up JAVA_TOOL_OPTIONS: {options}" in err.splitlines()


@needs_java
def test_per_image_cider_is_scored_on_coco_captions_ptb_tokens_by_default(recwarn):
    """``per_image_cider`` (compare_results.py's and the benchmarks' per-photo CIDEr-D, behind
    the intervals in docs/quality.md) tokenises as ``edgecap eval`` does, with PTB where Java
    is. Worked by hand as for the simple tokenizer above, PTB splitting "dog's": "a dog 's red
    ball" against "a dog 's ball is red", unigrams 5 of 5 (against 6), bigrams 2 of 4 (against
    5), trigrams 1 of 3 (against 4), no 4-gram, length penalty exp(-1 / 72)."""
    cider_b = 10 * (5 / math.sqrt(30) + 2 / math.sqrt(20) + 1 / math.sqrt(12)) / 4 * math.exp(-1 / 72)
    got = metrics.per_image_cider(HAND_REFS, HAND_HYPS)
    assert got == pytest.approx({"a": 10.0, "b": cider_b}, abs=1e-6)


def test_per_image_cider_averages_to_the_corpus_cider():
    per_image = metrics.per_image_cider(REFS, HYPS, tokenizer="simple")
    assert set(per_image) == set(REFS)
    corpus = metrics.score(REFS, HYPS, tokenizer="simple", metrics=("CIDEr",))["CIDEr"]
    assert sum(per_image.values()) / len(per_image) == pytest.approx(corpus, abs=1e-9)
    # The exact caption of image 2 scores higher than the loose one of image 3.
    assert per_image[2] > per_image[3]


def test_cli_eval_leaves_no_decoding_worker_running(tiny_model_dir, tmp_path, capsys):
    """Like caption, eval closes its Captioner: no decoding worker outlives the command, also
    when a photo cannot be decoded and the command fails."""
    import threading

    def workers() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("edgecap-decode")}

    before = workers()
    for name in ("cat.png", "cat2.png", "cat3.png"):
        (tmp_path / name).write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    names = ["cat.png", "cat2.png", "cat3.png", "broken.jpg"]
    refs = coco_json(tmp_path / "refs.json", {name: ["A cat."] for name in names})
    args = ["--images", str(tmp_path), "--references", str(refs), "--model", str(tiny_model_dir)]
    rc = main(["eval", *args, "--max-length", "3", "--decode-workers", "2", "--json"])
    assert rc == 1 and "broken.jpg" in capsys.readouterr().err
    assert workers() <= before


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--no-consensus"], {"guidance_bonus": 2.0, "constrained": False, "consensus": False}),
        (["--constrained"], {"guidance_bonus": 0.0, "constrained": True, "consensus": False}),
        (["--guidance-bonus", "3"], {"guidance_bonus": 3.0, "constrained": False, "consensus": True}),
    ],
)
def test_cli_eval_summary_says_the_decoding_rules(flags, want, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A --no-consensus or --constrained evaluation is told apart from a default one by its
    summary."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    tokens, split = flickr_files(tmp_path, ["chelsea.png"])
    args = ["--images", str(EXAMPLES), "--captions", str(tokens), "--split", str(split)]
    rc = main(["eval", *args, "--model", str(tiny_model_dir), "--max-length", "4", "--json", *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["decoding"] == {**want, "fusion_weight": 0.0}


@pytest.mark.parametrize(
    "flags, want, line",
    [
        (
            [],
            {"blank_check": True, "brighten": True, "crop_bars": True},
            "blank check on, dark frames brightened, bars cropped",
        ),
        (
            ["--no-brighten"],
            {"blank_check": True, "brighten": False, "crop_bars": True},
            "blank check on, dark frames as they are, bars cropped",
        ),
        (
            ["--no-blank-check"],
            {"blank_check": False, "brighten": True, "crop_bars": True},
            "blank check off, dark frames brightened, bars cropped",
        ),
        (
            ["--no-crop-bars"],
            {"blank_check": True, "brighten": True, "crop_bars": False},
            "blank check on, dark frames brightened, bars kept",
        ),
    ],
)
def test_cli_eval_summary_says_what_happens_to_the_frames(
    flags, want, line, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A --no-brighten, --no-blank-check or --no-crop-bars evaluation is told apart from a
    default one: by its JSON summary's "frames" and the table's "frames:" line."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    tokens, split = flickr_files(tmp_path, ["chelsea.png"])
    args = ["--images", str(EXAMPLES), "--captions", str(tokens), "--split", str(split)]
    common = ["eval", *args, "--model", str(tiny_model_dir), "--max-length", "4", *flags]
    assert main([*common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == want
    assert main(common) == 0
    lines = dict(row.split(":", 1) for row in capsys.readouterr().out.splitlines() if ":" in row)
    assert lines["frames"].strip() == line


def test_cli_without_pycocoevalcap_names_the_extra_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """pycocoevalcap missing: exit 2, one line naming it and how to install the eval extra
    (the hint edgecap.extras gives), before any Captioner is made (not after minutes of
    captioning) and with no --output written."""
    import importlib.util

    from edgecap.commands import eval as eval_command
    from edgecap.extras import install_hint

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycocoevalcap" else real(name, *a)
    )
    built = []
    monkeypatch.setattr(eval_command, "load_captioner", lambda args: built.append(args))
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."]})
    results = tmp_path / "results.json"
    rc = main(["eval", "--images", str(EXAMPLES), "--references", str(refs), "--output", str(results)])
    out = capsys.readouterr()
    assert (rc, out.out, built) == (2, "", [])
    assert out.err == f"edgecap eval: error: scoring needs pycocoevalcap: {install_hint('eval')}\n"
    assert "'pycocoevalcap>=1.2'" in out.err  # pyproject.toml's eval extra
    assert not results.exists()


@pytest.mark.parametrize("where", ["a folder", "in a folder that does not exist", "below a file"])
def test_cli_an_output_that_cannot_be_a_file_is_refused_before_captioning(
    where, tmp_path, monkeypatch, capsys
):
    """docs/cli.md: a bad option is exit 2 in one line, never a traceback. An --output that is a
    folder, or whose folder does not exist or is a file, is refused before any Captioner is made
    (not after minutes of captioning: before the fix, an IsADirectoryError /
    FileNotFoundError traceback and exit 1 once the split was captioned, its scores lost)."""
    from edgecap.commands import eval as eval_command

    built = []
    monkeypatch.setattr(eval_command, "load_captioner", lambda args: built.append(args))
    (tmp_path / "a-file").write_text("")
    output, problem = {
        "a folder": (tmp_path, "is a folder"),
        "in a folder that does not exist": (
            tmp_path / "missing" / "r.json",
            f"{tmp_path / 'missing'} does not exist",
        ),
        "below a file": (tmp_path / "a-file" / "r.json", f"{tmp_path / 'a-file'} is not a folder"),
    }[where]
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."]})
    rc = main(["eval", "--images", str(EXAMPLES), "--references", str(refs), "--output", str(output)])
    out = capsys.readouterr()
    assert (rc, out.out, built) == (2, "", [])
    assert (
        out.err.startswith(f"edgecap eval: error: --output {output}: {problem}") and out.err.count("\n") == 1
    )


def test_cli_an_output_whose_name_is_too_long_is_refused_before_captioning(tmp_path, monkeypatch, capsys):
    """A name longer than the file system allows (255 bytes) is exit 2 in one line naming it,
    before any Captioner is made: Path.is_dir() raises ENAMETOOLONG rather than answering False,
    which had been a traceback and exit 1."""
    from edgecap.commands import eval as eval_command

    built = []
    monkeypatch.setattr(eval_command, "load_captioner", lambda args: built.append(args))
    output = tmp_path / ("r" * 300 + ".json")
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."]})
    rc = main(["eval", "--images", str(EXAMPLES), "--references", str(refs), "--output", str(output)])
    out = capsys.readouterr()
    assert (rc, out.out, built) == (2, "", [])
    assert out.err.startswith(f"edgecap eval: error: --output {output}: File name too long")
    assert out.err.count("\n") == 1


def test_cli_an_output_that_is_a_references_file_is_refused_before_captioning(tmp_path, monkeypatch, capsys):
    """--output names the file the captions are written to; given the references (a slip of
    tab completion: --references refs.json --output refs.json), the split's own captions,
    which one may have written by hand, were replaced by the model's without a word, exit 0.
    Now, like the other bad --output, one line naming the option, exit 2, before any Captioner is
    made, the file as it was; also through a symbolic link, and for a token or split file."""
    from edgecap.commands import eval as eval_command

    built = []
    monkeypatch.setattr(eval_command, "load_captioner", lambda args: built.append(args))
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."]})
    (tmp_path / "link.json").symlink_to(refs)
    tokens, split = flickr_files(tmp_path, ["chelsea.png"])
    coco = ["--references", str(refs)]
    flickr = ["--captions", str(tokens), "--split", str(split)]
    for given, output, option in (
        (coco, refs, "--references"),
        (coco, tmp_path / "link.json", "--references"),
        (flickr, tokens, "--captions"),
        (flickr, split, "--split"),
    ):
        before = output.read_bytes()
        rc = main(["eval", "--images", str(EXAMPLES), *given, "--output", str(output)])
        out = capsys.readouterr()
        assert (rc, out.out, built, output.read_bytes()) == (2, "", [], before)
        problem = f"--output {output}: is the {option} file; give another file for the captions"
        assert out.err == f"edgecap eval: error: {problem}\n"


def test_cli_an_output_that_is_a_photo_of_the_split_is_refused_before_captioning(
    tmp_path, monkeypatch, capsys
):
    """docs/cli.md: an --output that is one of the input files is exit 2, nothing captioned. A
    photo of the split is one (--output images/chelsea.png, a slip of tab completion): before
    the fix the photo was replaced by the captions' JSON, exit 0, and every later run of the
    split failed on it. Now one line naming it, before any Captioner is made, the photo as it
    was; also through a link, and for a photo past --limit (it is the data set's all the same)."""
    from edgecap.commands import eval as eval_command

    built = []
    monkeypatch.setattr(eval_command, "load_captioner", lambda args: built.append(args))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (images / name).write_bytes((EXAMPLES / name).read_bytes())
    (tmp_path / "link.png").symlink_to(images / "coffee.png")
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."], "coffee.png": ["A cup."]})
    for output, photo in (
        (images / "chelsea.png", "chelsea.png"),
        (tmp_path / "link.png", "coffee.png"),
        (images / "coffee.png", "coffee.png"),
    ):
        before = (images / photo).read_bytes()
        args = ["eval", "--images", str(images), "--references", str(refs), "--output", str(output)]
        rc = main([*args, "--limit", "1"])
        out = capsys.readouterr()
        assert (rc, out.out, built, (images / photo).read_bytes()) == (2, "", [], before)
        assert out.err == (
            f"edgecap eval: error: --output {output}: is the photo {photo} of the split; give another file\n"
        )


def full_disk_of_our_own(folder: Path) -> Path:
    """A file every write to fails with ENOSPC, as to a full disk: a device node of the test's
    own in ``folder`` with /dev/full's numbers (root may make one). A regression that renamed a
    file over an output then replaces this node, never the machine's /dev/full (a link to
    /dev/full would not do: its target, /dev/full itself, is the file an output replaces, and
    root may rename over it, as a figure once did over /dev/null). Not root: a link to /dev/full,
    which no regression of ours may replace where /dev cannot be written; else skipped."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a disk that is always full)")
    node = folder / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.stat("/dev/full").st_rdev)
        with open(node, "wb", buffering=0) as probe:
            probe.write(b"x")
    except PermissionError:  # not root, or a file system without device nodes (nodev)
        node.unlink(missing_ok=True)
        if os.access("/dev", os.W_OK):
            pytest.skip("no device node of our own, and /dev may be written: /dev/full at stake")
        node.symlink_to("/dev/full")
    except OSError:  # ENOSPC: the node is a full disk
        pass
    return node


def test_cli_an_output_that_cannot_be_written_still_prints_the_scores(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """An --output the split's captions cannot be written to (a full disk: a /dev/full of the
    test's own) is one line naming it and the system's reason, exit 2 (docs/cli.md: output that
    could not be written), and the scores of the captioned split are still printed; before the
    fix an OSError traceback and exit 1, the scores of a split that may have taken minutes lost.
    The output is written in place, the device node kept (not renamed over: root may)."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    tokens, split = flickr_files(tmp_path, ["chelsea.png"])
    full = full_disk_of_our_own(tmp_path)
    args = ["--images", str(EXAMPLES), "--captions", str(tokens), "--split", str(split), "--json"]
    rc = main(["eval", *args, "--model", str(tiny_model_dir), "--max-length", "4", "--output", str(full)])
    out = capsys.readouterr()
    assert rc == 2
    assert json.loads(out.out)["n_images"] == 1
    assert out.err.endswith(
        f"edgecap eval: error: --output {full}: cannot write it (No space left on device)\n"
    )
    assert stat.S_ISCHR(os.stat(full).st_mode)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE, and SIGXFSZ ignored by Python")
def test_cli_an_output_that_fails_part_way_keeps_the_earlier_file_whole(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The captions are written whole or not at all: a write that fails part-way (a file-size
    limit here, a full disk alike) is exit 2 in one line naming --output, the scores printed,
    and an earlier file there is kept as it was; it had been truncated, then cut off."""
    import resource

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    tokens, split = flickr_files(tmp_path, ["chelsea.png"])
    output = tmp_path / "captions.json"
    earlier = '[{"image_id": "chelsea.png", "caption": "an earlier caption"}]\n'
    output.write_text(earlier)
    args = ["--images", str(EXAMPLES), "--captions", str(tokens), "--split", str(split), "--json"]
    args += ["--model", str(tiny_model_dir), "--max-length", "4", "--output", str(output)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))  # a write past 16 bytes fails (EFBIG)
    try:
        rc = main(["eval", *args])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out = capsys.readouterr()
    assert rc == 2 and json.loads(out.out)["n_images"] == 1
    assert out.err.endswith(f"edgecap eval: error: --output {output}: cannot write it (File too large)\n")
    assert output.read_text() == earlier and [p.name for p in tmp_path.glob(".*")] == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_cli_references_that_are_a_pipe_or_over_the_limit_are_refused_in_one_line(tmp_path, capsys):
    """docs/hostile-inputs.md: dataset files (COCO and Karpathy JSON included) are regular files
    of at most 1 GB, a named pipe or a larger file refused before it is read. ``edgecap eval
    --references`` is such a file: a named pipe is one line naming it, exit 2, at once (before
    the fix it waited forever for a writer), and a 2 GB sparse file is refused without being
    read (before: read whole)."""
    import threading

    pipe = tmp_path / "refs-pipe.json"
    os.mkfifo(pipe)
    huge = tmp_path / "refs-huge.json"
    with open(huge, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GB that must never be read
    for refs, problem in ((pipe, "is a named pipe (FIFO), not a regular file"), (huge, "over the limit")):
        done: list = []
        args = ["eval", "--images", str(EXAMPLES), "--references", str(refs)]
        worker = threading.Thread(target=lambda a, d: d.append(main(a)), args=(args, done), daemon=True)
        worker.start()
        worker.join(30)
        if worker.is_alive():  # waiting on the pipe: let it go (a writer that closes at once)
            os.close(os.open(pipe, os.O_WRONLY))
            worker.join(30)
        out = capsys.readouterr()
        assert (done, out.out) == ([2], "")
        assert out.err.startswith(f"edgecap eval: error: {refs}: ") and out.err.count("\n") == 1
        assert problem in out.err


_EVAL_WITHOUT_JAVA = (
    "import sys\n"
    "from edgecap.evaluation import metrics\n"
    "metrics.java_available = lambda: False  # the simple tokenizer: no JVM started\n"
    "from edgecap.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.skipif(os.name != "posix", reason="POSIX pipes and /dev/full")
@pytest.mark.parametrize("stdout", ["a full disk", "a reader gone away", "closed"])
def test_cli_scores_that_cannot_be_printed_are_not_a_traceback(stdout, tiny_model_dir, tmp_path):
    """docs/cli.md: the scores that cannot be written to standard output are exit 2 in one line
    (a full disk; stdout closed, said before captioning), and a reader gone away (| head) stops
    quietly with 141, as edgecap caption does. Before the fix: an OSError / BrokenPipeError
    traceback and exit 1, which the page gives to a photo that could not be decoded, and with
    stdout closed exit 0, the scores lost without a word."""
    tokens, split = flickr_files(tmp_path, ["chelsea.png", "coffee.png"])
    args = ["eval", "--images", str(EXAMPLES), "--captions", str(tokens), "--split", str(split)]
    args += ["--model", str(tiny_model_dir), "--max-length", "4"]
    command = [sys.executable, "-c", _EVAL_WITHOUT_JAVA, *args]
    here = str(Path(edgecap.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    if stdout == "a full disk":
        if not Path("/dev/full").exists():
            pytest.skip("needs /dev/full (a disk that is always full)")
        with open("/dev/full", "wb") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, env=env, timeout=300)
        expected = (2, ["edgecap eval: error: cannot write the output (No space left on device)"])
    elif stdout == "a reader gone away":
        read_end, write_end = os.pipe()
        os.close(read_end)  # gone before the first line is written
        try:
            done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=300)
        finally:
            os.close(write_end)
        expected = (141, [])
    else:
        done = subprocess.run(
            command, stdout=None, stderr=subprocess.PIPE, env=env, timeout=300, preexec_fn=lambda: os.close(1)
        )
        expected = (2, ["edgecap eval: error: cannot write the output: standard output is closed"])
    said = [line for line in done.stderr.decode().splitlines() if ": warning: " not in line]
    assert (done.returncode, said) == expected, done.stderr.decode()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names")
def test_cli_json_is_utf8_whatever_the_references_file_is_named(tiny_model_dir, tmp_path):
    """--json is one JSON object in UTF-8 (RFC 8259) whatever the references file is named: a
    name that is not UTF-8 (a byte 0xff) has a \\u escape for that byte in "references", which
    Python reads back as the same name; before the fix the raw byte was written and
    json.loads of the output failed (invalid start byte)."""
    refs = coco_json(tmp_path / "refs.json", {"chelsea.png": ["A cat."], "coffee.png": ["A cup."]})
    named = os.path.join(os.fsencode(tmp_path), b"r\xffefs.json")
    try:
        os.rename(refs, named)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    here = str(Path(edgecap.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    args = ["eval", "--images", str(EXAMPLES), "--references", os.fsdecode(named), "--json"]
    args += ["--model", str(tiny_model_dir), "--max-length", "4"]
    done = subprocess.run(
        [sys.executable, "-c", _EVAL_WITHOUT_JAVA, *args], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode("utf-8"))  # strict UTF-8, no lone surrogate
    assert summary["references"] == os.fsdecode(named).replace("\udcff", "\ufffd")
    assert base64.b64decode(summary["references_base64"]) == named and summary["n_images"] == 2


def test_cli_table_and_missing_images_folder_keep_a_name_on_one_line(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A references file and an images folder named with a newline: the plain table's
    "references:" line and the missing-folder error each stay one line, the newline written as
    \\n (as every other name edgecap prints); they had been split in two."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    refs = coco_json(tmp_path / "r\nefs.json", {"chelsea.png": ["A cat."], "coffee.png": ["A cup."]})
    args = ["eval", "--references", str(refs), "--model", str(tiny_model_dir), "--max-length", "4"]
    assert main([*args, "--images", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"references:  {str(refs).replace(chr(10), chr(92) + 'n')}" in out
    missing = tmp_path / "no\nphotos"
    assert main([*args, "--images", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"images folder not found: {str(missing).replace(chr(10), chr(92) + 'n')}" in err
    )


def test_cli_json_names_a_references_file_that_is_not_ascii_on_a_stdout_that_is_not_utf8(
    tiny_model_dir, tmp_path, monkeypatch
):
    """As caption: the summary is UTF-8 whatever stdout's encoding (PYTHONIOENCODING=ascii, a
    Latin-1 locale); a references file named "réfs.json" had been a UnicodeEncodeError once the
    photos were captioned and scored."""
    import io

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    refs = coco_json(tmp_path / "réfs.json", {"chelsea.png": ["A cat."], "coffee.png": ["A cup."]})
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    args = ["eval", "--images", str(EXAMPLES), "--references", str(refs), "--json"]
    assert main([*args, "--model", str(tiny_model_dir), "--max-length", "4"]) == 0
    sys.stdout.flush()
    assert json.loads(raw.getvalue().decode("utf-8"))["references"] == str(refs)
