"""Constrained beam search (``edgecap.decoding``): the caption says one of the image's tag
words when any caption can; without tags it is the plain beam search, exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, search_with_tags
from fakes import END, START, PrefixHashBackend
from helpers import EXAMPLES, TableBackend, run_edgecap
from helpers import plain_search as beam_search
from helpers import vocab_size_of


def constrained_beam_search(
    backend, encoded, options, start_id, end_id, words, return_attention=False, fusion=None
):
    """The decoding layer's constrained search with per image ``words`` (its tag-word ids)."""
    from dataclasses import replace

    return search_with_tags(
        backend,
        encoded,
        replace(options, constrained=True),
        start_id,
        end_id,
        vocab_size_of(backend),
        tuple(frozenset(ids) for ids in words),
        fusion=fusion,
        return_attention=return_attention,
    )


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits", "on", "mat"]


def _table(prefix):
    """A model that would rather say "a dog runs" and rarely "cat" (log-prob -4 anywhere)."""
    if not prefix:
        return {"a": -0.1, "cat": -4.0}
    if prefix[-1] == "a":
        return {"dog": -0.2, "cat": -4.0}
    if prefix[-1] in ("dog", "cat"):
        return {"runs": -0.3, "sits": -1.0, "cat": -4.0}
    return {"<end>": -0.05, "cat": -4.0}


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
@pytest.mark.parametrize("end_bias", [-1.0, 1.5])
def test_without_tags_it_is_the_plain_beam_search(beam, end_bias):
    backend = PrefixHashBackend(vocab_size=12, top_k=8, end_bias=end_bias)
    seeds = np.array([3, 11, 42, 7])
    opts = CaptionOptions(beam_size=beam, max_length=8, n_best=beam, no_repeat_ngram=2)
    plain = beam_search(backend, backend.encode(seeds), opts, START, END)
    free = constrained_beam_search(backend, backend.encode(seeds), opts, START, END, [set()] * len(seeds))
    for a, b in zip(plain, free):
        assert [(h.tokens, h.finished) for h in a] == [(h.tokens, h.finished) for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-9)


def test_the_tag_words_are_surfaced_on_the_rows_that_have_not_said_one():
    """``TagConstraint``: an image's rows are its beams of state 0 (not yet said a tag word),
    then those of state 1; the surfacing bias (``SURFACE``) is on state 0's rows' tag words
    only, none on state 1's nor on an image without tag words, whose goal is state 0 (searched
    as without the constraint); an image with tag words has state 1 as its goal."""
    from edgecap.decoding.constraint import SURFACE, TagConstraint

    beam, vocab = 2, 7
    constraint = TagConstraint((frozenset({4, 5}), frozenset(), frozenset({6})), vocab)
    image_index = np.repeat(np.arange(3), 2 * beam)  # 2 states x beam rows an image
    bias = constraint.surfacing_bias(image_index, beam)
    want = np.zeros((12, vocab), np.float32)
    want[0:2, [4, 5]] = SURFACE  # image 0, state 0
    want[8:10, 6] = SURFACE  # image 2, state 0
    assert np.array_equal(bias, want)
    assert [constraint.goal(image) for image in range(3)] == [1, 0, 1]


def test_the_caption_says_a_tag_word_the_model_ranks_low():
    backend = TableBackend(WORDS, _table, top_k=4)
    cat = WORDS.index("cat")
    encoded = backend.encode(np.zeros((2, 3, 4, 4), np.float32))
    opts = CaptionOptions(beam_size=2, max_length=6, n_best=2)
    hyps = constrained_beam_search(
        backend, encoded, opts, WORDS.index("<start>"), WORDS.index("<end>"), [{cat}, set()]
    )
    said = [" ".join(WORDS[w] for w in h.tokens) for h in hyps[0]]
    # Hand-computed from the table, beam 2 in the said-"cat" state: after 2 words it holds "a
    # cat" (-4.1) and "cat runs" (-4.3); "cat runs <end>" (-4.35) and then "a cat runs <end>"
    # (-4.45) finish first, so the state is full before "a cat sits" (-5.15) can. Per token
    # with <end>: -4.45/4 = -1.11 ranks above -4.35/3 = -1.45.
    assert said == ["a cat runs", "cat runs"]
    assert hyps[0][0].log_prob == pytest.approx(-0.1 - 4.0 - 0.3 - 0.05)
    assert hyps[0][0].score == pytest.approx(hyps[0][0].log_prob / 4)  # the model's own: no bonus
    # The image without tags gets the model's favourite caption.
    assert [WORDS[w] for w in hyps[1][0].tokens] == ["a", "dog", "runs"]


def _late_cat(prefix):
    """The plain caption "a <end>" ends at word 2; "a dog runs" would then say "cat" (-0.1 each
    word): a tag word only a plain beam that went on after the plain state was full reaches.
    The caption that starts with "cat" is long and unlikely. Any other prefix: every word -30."""
    return {
        (): {"a": -0.1, "cat": -5.0},
        ("a",): {"<end>": -0.1, "dog": -0.2},
        ("a", "dog"): {"runs": -0.1},
        ("a", "dog", "runs"): {"cat": -0.1},
        ("a", "dog", "runs", "cat"): {"<end>": -0.1},
        ("cat",): {"sits": -3.0},
        ("cat", "sits"): {"on": -3.0},
        ("cat", "sits", "on"): {"mat": -3.0},
        ("cat", "sits", "on", "mat"): {"<end>": -3.0},
    }.get(prefix, {})


def test_a_state_with_enough_captions_stops_its_beams():
    """Beam 1, tag "cat". Word 1: plain "a" (-0.1), said "cat" (-5). Word 2: "a <end>" (-0.2)
    fills the plain state (1 = beam); its beam goes on once more, "a dog" (-0.3), against
    "cat sits" (-8) in the said state. Word 3: the plain state has enough captions, so its
    beam stops ("a dog runs" is not kept); the said state takes "cat sits on" (-11) over
    "a dog cat" (-30.3). Words 4-5: "cat sits on mat <end>" (-17): the caption, over 5
    tokens; "a dog runs cat" (-0.5 after word 4) is never reached."""
    backend = TableBackend(WORDS, _late_cat, top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    opts = CaptionOptions(beam_size=1, max_length=8, no_repeat_ngram=0)
    [[best]] = constrained_beam_search(backend, encoded, opts, START, END, [{WORDS.index("cat")}])
    assert [WORDS[w] for w in best.tokens] == ["cat", "sits", "on", "mat"] and best.finished
    assert best.log_prob == pytest.approx(-17.0) and best.score == pytest.approx(-17.0 / 5)


def test_cut_at_max_length_each_image_keeps_its_own_live_beam_of_the_said_state():
    """No caption ends within two words (max_length 2): each image's caption is the live beam of
    its said-a-tag-word state, unfinished. The photo tagged "cat": "a cat" (-0.1 - 4.0) over
    "cat runs" (-4.3); the one tagged "dog": "a dog" (-0.3), its own rows, not the other
    image's."""
    backend = TableBackend(WORDS, _table, top_k=4)
    encoded = backend.encode(np.zeros((2, 3, 4, 4), np.float32))
    opts = CaptionOptions(beam_size=1, max_length=2, no_repeat_ngram=0)
    tags = [{WORDS.index("cat")}, {WORDS.index("dog")}]
    [[cat], [dog]] = constrained_beam_search(backend, encoded, opts, START, END, tags)
    assert [WORDS[w] for w in cat.tokens] == ["a", "cat"] and not cat.finished
    assert cat.log_prob == pytest.approx(-4.1) and cat.score == pytest.approx(-4.1 / 2)
    assert [WORDS[w] for w in dog.tokens] == ["a", "dog"] and not dog.finished
    assert dog.log_prob == pytest.approx(-0.3)


def test_a_surfaced_tag_word_takes_no_place_from_the_plain_continuations():
    """Beam 1 (two candidates a row), tag "cat". Word 1: plain "a" (-0.1), said "cat" (-5).
    Word 2: the plain row's top K is "cat" (surfaced: it moves the beam to the said state),
    "<end>", "dog": its two plain candidates are "<end>" and "dog", so "a <end>" (-0.2)
    finishes and "a dog" (-0.3) goes on; the said state takes "cat sits" (-8). Word 3: "a dog
    cat" (-0.4) beats "cat sits <end>" (-11, after the beam's continuation: not taken).
    Word 4: "a dog cat <end>" (-0.5), the caption."""
    rows = {
        (): {"a": -0.1, "cat": -5.0},
        ("a",): {"<end>": -0.1, "dog": -0.2},
        ("a", "dog"): {"cat": -0.1},
        ("a", "dog", "cat"): {"<end>": -0.1},
        ("cat",): {"sits": -3.0},
        ("cat", "sits"): {"<end>": -3.0},
    }
    backend = TableBackend(WORDS, lambda prefix: rows.get(prefix, {}), top_k=4)
    encoded = backend.encode(np.zeros((1, 3, 4, 4), np.float32))
    opts = CaptionOptions(beam_size=1, max_length=8, no_repeat_ngram=0)
    [[best]] = constrained_beam_search(backend, encoded, opts, START, END, [{WORDS.index("cat")}])
    assert [WORDS[w] for w in best.tokens] == ["a", "dog", "cat"] and best.finished
    assert best.log_prob == pytest.approx(-0.5)


def test_no_tags_at_all_gives_the_unguided_captions_on_the_shipped_model():
    from edgecap import Captioner

    photos = [str(EXAMPLES / n) for n in ("chelsea.png", "coffee.png", "rocket.jpg")]
    # (the constrained search takes no consensus choice: the plain one without it)
    plain = Captioner(options=CaptionOptions(guidance_bonus=0, consensus=False)).caption_batch(photos)
    # A threshold no tag reaches: every image unconstrained.
    free = Captioner(options=CaptionOptions(constrained=True, constraint_min_prob=1.0))
    assert [c.text for c in free.caption_batch(photos)] == [c.text for c in plain]


def test_options_are_checked():
    with pytest.raises(ValueError, match="constrained must be True or False"):
        CaptionOptions(constrained="yes").validate(10)
    with pytest.raises(ValueError, match="constraint_min_prob"):
        CaptionOptions(constraint_min_prob=1.5).validate(10)


def test_the_command_line_flag_makes_the_caption_name_the_coffee(capfd):
    """coffee.png: the classifier's top class is espresso (0.90, see test_objects), whose caption
    words are coffee and cup; the shipped model's unguided caption says neither."""
    run = run_edgecap(capfd, "caption", "--constrained", "--json", EXAMPLES / "coffee.png")
    assert run.returncode == 0, run.stderr
    caption = json.loads(run.stdout)["caption"].split()
    assert "cup" in caption or "coffee" in caption


def test_fixed_size_engines_are_asked_for_a_beam_per_state(monkeypatch):
    """A TensorRT engine is built for a number of rows: constrained, an image takes 2 x beam."""
    from edgecap import api
    from edgecap.contract import Limits

    asked = []

    def record(name, manifest, device=None, limits=None, **options):
        asked.append(limits)
        raise RuntimeError("recorded")

    monkeypatch.setattr(api, "load_backend", record)
    for constrained in (False, True):
        with pytest.raises(RuntimeError, match="recorded"):
            api.Captioner(options=CaptionOptions(batch_size=8, beam_size=5, constrained=constrained))
    assert asked == [Limits(8, 5), Limits(8, 10)]


def test_attention_follows_the_constrained_caption():
    from edgecap import Captioner

    caption = Captioner(constrained=True, fusion_weight=0.0).caption(
        str(EXAMPLES / "coffee.png"), return_attention=True
    )
    assert caption.attention.shape == (len(caption.tokens), 7, 7)
    np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    plain = Captioner(fusion_weight=0.0).caption(str(EXAMPLES / "coffee.png"), return_attention=True)
    assert caption.tokens != plain.tokens  # a different caption, its own maps
    assert plain.attention.shape == (len(plain.tokens), 7, 7)


def test_without_tags_the_attention_maps_are_the_plain_searchs():
    """On the shipped model (a batch without tags is searched plainly by the Captioner, so the
    constrained search is called here directly)."""
    from edgecap import Captioner
    from edgecap.images import load_rgb
    from edgecap.preprocess import to_model_input

    captioner = Captioner(guidance_bonus=0)
    photos = [load_rgb(EXAMPLES / n) for n in ("chelsea.png", "rocket.jpg")]
    encoded = captioner.backend.encode(
        np.stack([to_model_input(p, captioner.manifest.preprocessing) for p in photos])
    )
    vocab = captioner.vocab
    opts = captioner.options
    plain = beam_search(captioner.backend, encoded, opts, vocab.start, vocab.end, True)
    free = constrained_beam_search(
        captioner.backend, encoded, opts, vocab.start, vocab.end, [set(), set()], True
    )
    for [a], [b] in zip(plain, free):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.attention, b.attention)


def test_the_captioner_runs_the_constrained_search_on_the_tags_it_asks_for():
    """The Captioner's constrained captions are this module's search over its photo's tags
    (top 3 of p >= 0.3: coffee.png's espresso), not a steered plain search."""
    from edgecap import Captioner
    from edgecap.images import load_rgb
    from edgecap.preprocess import to_model_input

    captioner = Captioner(constrained=True, n_best=3)
    photo = load_rgb(EXAMPLES / "coffee.png")
    encoded = captioner.backend.encode(to_model_input(photo, captioner.manifest.preprocessing)[None])
    guidance = captioner.classes.tag_words(encoded.class_probs, 3, 0.3)
    [expected] = constrained_beam_search(
        captioner.backend,
        encoded,
        captioner.options,
        captioner.vocab.start,
        captioner.vocab.end,
        guidance,
        fusion=captioner.fusion,
    )
    got = captioner.caption(photo)
    words = captioner.vocab.words
    assert [got.tokens] + [a.tokens for a in got.alternatives] == [
        [words[w] for w in h.tokens] for h in expected
    ]
