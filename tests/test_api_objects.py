"""The API's objects as a program handles them beyond captioning: what ``dir`` lists, captions in
sets, what a frame's repr and a too-long "path"'s error write."""

from __future__ import annotations

import base64
import copy
import os
from pathlib import Path

import numpy as np
import pytest

import edgecap
from edgecap import Caption, InputError, images
from edgecap.recordings import Frame as RecordedFrame
from edgecap.stream import Frame

EXAMPLE = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"


def test_dir_lists_the_lazy_names():
    assert {"Captioner", "Caption", "CaptionOptions", "InputError", "__version__"} <= set(dir(edgecap))


def test_captions_are_hashable_and_equal_ones_hash_alike():
    one = Caption(text="a cat", score=-1.0, tokens=["a", "cat"], log_prob=-3.0, timings={"encode_ms": 1.0})
    same = Caption(text="a cat", score=-1.0, tokens=["a", "cat"], log_prob=-3.0, timings={"encode_ms": 2.0})
    other = Caption(text="a dog", score=-1.0, tokens=["a", "dog"], log_prob=-3.0)
    assert one == same and hash(one) == hash(same)
    assert len({one, same, other}) == 2


def test_captions_compare_by_their_words_and_scores_not_by_what_was_measured_of_the_frame():
    """Two captions of the same words and scores are equal (and hash alike, one in a set) however
    the frames' objects, timings, attention maps, confidence, signals, crop and the held and
    recognisable flags differ: ``==`` on captions with attention arrays compares no array (which
    would raise, an array's truth being ambiguous), and the repr writes no array. A caption a
    program builds itself is recognisable, not held, and has no confidence, crop or objects."""
    words = {"text": "a cat", "score": -1.0, "tokens": ["a", "cat"], "log_prob": -3.0}
    plain = Caption(**words)
    assert (plain.recognisable, plain.held, plain.confidence, plain.crop, plain.objects) == (
        True,
        False,
        None,
        None,
        (),
    )
    measured = Caption(
        **words,
        objects=(("tabby", 0.8),),
        timings={"encode_ms": 2.0},
        attention=np.full((2, 7, 7), 0.5, np.float32),
        confidence=0.9,
        recognisable=False,
        signals=np.arange(600, dtype=np.float32),
        crop=(0.0, 0.1, 1.0, 0.9),
        held=True,
    )
    other_attention = Caption(
        **words, attention=np.zeros((2, 7, 7), np.float32), signals=np.ones(600, np.float32)
    )
    assert plain == measured == other_attention
    assert hash(plain) == hash(measured) == hash(other_attention)
    assert len({plain, measured, other_attention}) == 1
    assert "0.5" not in repr(measured) and "599" not in repr(measured) and len(repr(measured)) < 400
    assert plain != Caption(**{**words, "score": -1.5}) and plain != Caption(**{**words, "log_prob": -2.0})


def test_a_frames_repr_names_its_bytes_not_writes_them():
    data = b"\xff\xd8" + b"\x00" * 300_000
    for frame in (
        Frame(index=3, timestamp=0.5, image=data, color="bgr"),
        RecordedFrame(topic="/camera", time_ns=1, stamp_ns=1, index=3, image=data),
    ):
        text = repr(frame)
        assert len(text) < 200 and "<bytes (300002 bytes)>" in text and "index=3" in text
    array = Frame(index=0, timestamp=0.0, image=np.zeros((480, 640, 3), np.uint8))
    assert "<array (480, 640, 3) uint8>" in repr(array)
    error = Frame(index=0, timestamp=0.0, image=InputError("frame 0", "cut short"))
    assert "InputError('frame 0: cut short')" in repr(error)


def test_an_image_given_as_base64_text_is_named_by_its_start():
    text = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    with pytest.raises(InputError) as caught:
        images.load_rgb(text)
    message = str(caught.value)
    assert len(message) < 300, message[:300]
    assert caught.value.source.startswith("<str of ") and "data:image/png;base64," in caught.value.source
    assert "base64.b64decode" in message
    # a path of ordinary length is named as it is
    with pytest.raises(InputError, match=r"^missing\.jpg: no such file$"):
        images.load_rgb("missing.jpg")


def test_a_misspelt_overlap_is_told_its_name():
    with pytest.raises(TypeError, match=r"unknown option 'overlaps': .*; did you mean 'overlap'\?$"):
        edgecap.Captioner(overlaps=True)


def test_a_captioner_of_a_relative_model_folder_is_made_again_after_a_change_of_folder(monkeypatch, tmp_path):
    root = Path(edgecap.__file__).parent.parent
    monkeypatch.chdir(root)
    captioner = edgecap.Captioner(os.path.join("edgecap", "assets", "default"))
    monkeypatch.chdir(tmp_path)  # a daemon's chdir("/"), a pool's worker started elsewhere
    with captioner, copy.deepcopy(captioner) as again:
        assert again.manifest.directory.resolve() == (root / "edgecap" / "assets" / "default").resolve()
        assert again.caption(EXAMPLE).text == captioner.caption(EXAMPLE).text


@pytest.fixture(scope="module")
def captioner():
    with edgecap.Captioner() as made:
        yield made


@pytest.mark.parametrize("images", [None, 5])
def test_images_that_are_no_list_are_refused_when_iter_captions_is_called(captioner, images):
    # as its docstring says: "Bad arguments raise here", not at the first result
    with pytest.raises(TypeError, match=rf"take a list of images, got {type(images).__name__}$"):
        captioner.iter_captions(images)
    with pytest.raises(TypeError, match=rf"take a list of images, got {type(images).__name__}$"):
        captioner.caption_batch(images)


def test_a_closed_captioner_says_so_in_its_repr_and_when_deep_copied():
    """A closed Captioner's repr says it is closed, and deepcopy says it cannot be copied (it
    had said "cannot be sent to another process", the pickling message)."""
    from edgecap import Captioner

    captioner = Captioner()
    assert "closed" not in repr(captioner)
    captioner.close()
    assert repr(captioner).endswith(", closed)")
    with pytest.raises(TypeError, match="this Captioner is closed: it cannot be copied"):
        copy.deepcopy(captioner)


def test_a_relative_model_folder_through_a_link_and_dotdot_is_made_again_where_it_was_read(
    monkeypatch, tmp_path
):
    """A model folder named "link/../model" is read beside the link's target, as the OS reads
    it; made absolute by dropping "link/.." (os.path.abspath) it named another folder, and a deep
    copy or a spawn worker said "model directory not found" without any change of folder."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    try:
        (tmp_path / "real" / "model").symlink_to(Path(edgecap.__file__).parent / "assets" / "default")
        (tmp_path / "work" / "link").symlink_to(tmp_path / "real" / "sub")
    except OSError:
        pytest.skip("no symbolic links here")
    monkeypatch.chdir(tmp_path / "work")
    captioner = edgecap.Captioner(os.path.join("link", os.pardir, "model"))
    with captioner, copy.deepcopy(captioner) as again:
        assert again.manifest.directory.resolve() == captioner.manifest.directory.resolve()
