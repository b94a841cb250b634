"""``edgecap.training.records``: the checked reading of training's own files (checkpoint and
cache records, safetensors headers) at the edges of each check, on files written by hand."""

from __future__ import annotations

import json
import struct

import pytest

from edgecap.errors import ModelError
from edgecap.training.records import check_file, read_record, safetensors_shapes


def _record(tmp_path, data):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return read_record(path)


def test_record_integers_take_their_bounds_and_refuse_booleans_and_beyond(tmp_path):
    """``int(key, low, high)``: low and high themselves are in; one past either is refused
    naming the key and the range; JSON true is not the integer 1."""
    record = _record(tmp_path, {"lo": 1, "hi": 8, "over": 9, "under": 0, "flag": True})
    assert record.int("lo", 1, 8) == 1 and record.int("hi", 1, 8) == 8
    with pytest.raises(ModelError, match=r"r.json: 'over' is 9, outside 1..8"):
        record.int("over", 1, 8)
    with pytest.raises(ModelError, match=r"'under' is 0, outside 1..8"):
        record.int("under", 1, 8)
    with pytest.raises(ModelError, match=r"'flag' is not an integer"):
        record.int("flag", 0, 8)


def test_record_lists_are_checked_element_by_element(tmp_path):
    """``strings``: every element a string; ``ints(key, low, high)``: every element an
    integer (not a boolean) in low..high, the bounds included."""
    record = _record(
        tmp_path,
        {"names": ["a", "b"], "mixed": ["a", 1], "shape": [1, 8], "big": [1, 9], "bools": [1, True]},
    )
    assert record.strings("names") == ["a", "b"] and record.ints("shape", 1, 8) == [1, 8]
    with pytest.raises(ModelError, match=r"'mixed' holds something other than strings"):
        record.strings("mixed")
    with pytest.raises(ModelError, match=r"'big' holds something other than integers in 1..8"):
        record.ints("big", 1, 8)
    with pytest.raises(ModelError, match=r"'bools' holds something other than integers in 0..8"):
        record.ints("bools", 0, 8)


def test_check_file_takes_a_file_of_exactly_the_limit(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 100)
    assert check_file(path, max_bytes=100) == 100
    with pytest.raises(ModelError, match=r"w.bin: 100 bytes, over the limit of 99"):
        check_file(path, max_bytes=99)


def _safetensors(path, header: dict, data: bytes = b"", n: int | None = None):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if n is None else n) + head + data)


def test_safetensors_shapes_reads_the_header_and_refuses_a_lying_one(tmp_path):
    """The shapes come from the header (``__metadata__`` skipped); a header length past the
    end of the file, or a negative dimension, is refused naming the file."""
    path = tmp_path / "m.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [], "data_offsets": [24, 28]},
    }
    _safetensors(path, header, bytes(28))
    assert safetensors_shapes(path) == {"w": (2, 3), "b": ()}
    head = len(json.dumps(header).encode())
    _safetensors(path, header, bytes(28), n=head + 29)  # 1 byte more than the file holds
    size = 8 + head + 28
    lying = rf"m.safetensors: not a safetensors file \(a header of {head + 29:,} bytes in a file of {size:,}"
    with pytest.raises(ModelError, match=lying):
        safetensors_shapes(path)
    _safetensors(path, {"w": {"dtype": "F32", "shape": [-1, 3], "data_offsets": [0, 0]}})
    with pytest.raises(ModelError, match=r"m.safetensors: tensor 'w' has no valid shape"):
        safetensors_shapes(path)
