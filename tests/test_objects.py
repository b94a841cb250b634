"""Object tags (``Caption.objects``, ``edgecap.objects``) and object guidance in the search.

Expected tags come from outside this code: the pretrained EfficientNet-Lite0 classifier was run
on scikit-image's photos by itself (PyTorch, the package's ImageNet weights) while the class list
was checked: chelsea.png -> Egyptian cat 0.794, coffee.png -> espresso 0.902.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from edgecap import Captioner
from edgecap.cli import main as cli_main
from edgecap.decoding import CaptionOptions, TagBonus, beam_search
from edgecap.decoding.rules import NeverFirst, tag_bias
from edgecap.objects import IMAGENET_CLASSES, ObjectClasses, top_classes, top_classes_rows
from edgecap.vocab import NEVER_FIRST_IDS
from fakes import END, START, PrefixHashBackend

EXAMPLES = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "examples"
DEFAULT_MODEL = EXAMPLES.parent / "default"


@pytest.fixture(scope="module")
def default_captioner():
    return Captioner(backend="onnxruntime")


# -- tags ------------------------------------------------------------------------------------------


def test_tags_of_the_example_photos(default_captioner):
    cat = default_captioner.caption(EXAMPLES / "chelsea.png")
    coffee = default_captioner.caption(EXAMPLES / "coffee.png")
    assert cat.objects[0][0] == "Egyptian Mau" and cat.objects[0][1] == pytest.approx(0.794, abs=0.01)
    assert {"tiger cat", "tabby cat"} <= {name for name, _ in cat.objects[:3]}
    assert coffee.objects[0][0] == "espresso" and coffee.objects[0][1] == pytest.approx(0.902, abs=0.01)
    assert len(cat.objects) == CaptionOptions().objects == 5
    assert [p for _, p in cat.objects] == sorted((p for _, p in cat.objects), reverse=True)


def test_number_of_tags_is_an_option(default_captioner):
    photo = EXAMPLES / "coffee.png"
    assert Captioner(objects=2).caption(photo).objects == default_captioner.caption(photo).objects[:2]
    assert Captioner(objects=0).caption(photo).objects == ()


def test_how_many_objects_are_asked_for_changes_no_caption_or_confidence(default_captioner):
    """``objects`` is how many classes a caption lists (docs/python-api.md), nothing else: the
    captions, their confidence and its signals are the same for 0, 1 and 10 (the confidence's
    tag signals look at the five most probable classes whatever is listed), and 10 are listed."""
    photos = [EXAMPLES / name for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    want = default_captioner.caption_batch(photos)
    for n in (0, 1, 10):
        got = Captioner(objects=n).caption_batch(photos)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.confidence for c in got] == [c.confidence for c in want]
        for mine, theirs in zip(got, want):
            assert np.array_equal(mine.signals, theirs.signals)
            assert len(mine.objects) == n and mine.objects[:5] == theirs.objects[:n]


def test_shipped_class_list():
    table = json.loads(IMAGENET_CLASSES.read_text())
    assert "imagenet-classes" in table["about"] and "WordNet" in table["licence"]
    names = [c["name"] for c in table["classes"]]
    assert len(names) == 1000
    # ImageNet's class order (indices from the ILSVRC-2012 synset list)
    assert (names[0], names[285], names[874], names[967]) == (
        "tench",
        "Egyptian Mau",
        "trolleybus",
        "espresso",
    )
    words = {c["name"]: c["words"] for c in table["classes"]}
    assert words["trolleybus"] == ["bus"] and words["tiger cat"] == ["cat"]
    assert "bear" in words["giant panda"]  # not in the vocabulary: its nearest word that is


@pytest.mark.parametrize(
    "table", [IMAGENET_CLASSES, DEFAULT_MODEL / "classes.json"], ids=["package", "shipped model"]
)
def test_every_class_has_its_own_name(table):
    """A tag's name is its key: ``dict(caption.objects)`` and readers of the ``--json`` objects
    keep one probability per name. imagenet-classes named two classes 'sunglasses'; the first
    (ILSVRC-2012 index 836, WordNet 3.0's n04355933 'sunglass': a convex lens that focuses the
    rays of the sun) is a burning glass; 837 (n04356056) is the sunglasses."""
    names = [c["name"] for c in json.loads(table.read_text(encoding="utf-8"))["classes"]]
    assert len(set(names)) == len(names) == 1000
    assert (names[836], names[837]) == ("burning glass", "sunglasses")


def test_class_list_must_match_the_encoder(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": [{"name": "a", "words": ["dog", "zebra"]}]}))
    classes = ObjectClasses.load(path, {"dog": 7}, n_classes=1)
    assert classes.names == ("a",) and classes.word_ids == ((7,),)  # unknown words left out
    from edgecap.errors import ModelError

    with pytest.raises(ModelError, match="1 classes, but the encoder has 1000"):
        ObjectClasses.load(path, {"dog": 7}, n_classes=1000)


@pytest.mark.parametrize(
    "table, problem",
    [
        ({"klasses": [{"name": "a", "words": ["dog"]}]}, "'classes'"),
        # "words" one string: not read letter by letter ("d", "o", "g" are words too)
        ({"classes": [{"name": "a", "words": "dog"}]}, "classes must be a list of {name: text, words"),
        ({"classes": [{"name": 7, "words": ["dog"]}]}, "classes must be a list of {name: text, words"),
    ],
    ids=["no-classes-key", "words-a-string", "name-a-number"],
)
def test_a_malformed_class_list_is_one_model_error(tmp_path, table, problem):
    """A hand-edited classes.json is a ModelError naming the file and what to do, not a
    KeyError traceback or tags made of the wrong words."""
    from edgecap.errors import ModelError

    path = tmp_path / "classes.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ModelError) as info:
        ObjectClasses.load(path, {"d": 1, "o": 2, "g": 3, "dog": 7}, n_classes=1)
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable class list (") and message.endswith("re-export the model")
    assert problem in message


def test_tag_words_and_their_bias_from_class_probabilities():
    classes = ObjectClasses(("bus", "cat", "cup"), ((5,), (6, 7), ()))
    probs = np.array([[0.6, 0.3, 0.1], [0.05, 0.05, 0.9], [0.5, 0.08, 0.42]], np.float32)
    words = classes.tag_words(probs, n_tags=2, min_prob=0.1)
    assert words == (frozenset({5, 6, 7}), frozenset(), frozenset({5}))
    expected = np.zeros((3, 9), np.float32)
    expected[0, [5, 6, 7]] = 2.0
    expected[2, 5] = 2.0
    np.testing.assert_array_equal(tag_bias(words, 9, 2.0), expected)
    assert not any(classes.tag_words(probs[1:2], 2, 0.1))  # no tag names a word
    assert classes.tag_words(probs[:1], 2, 0.35) == (frozenset({5}),)  # cat's 0.3 is below


def test_tags_are_the_n_most_probable_classes_best_first():
    """``Caption.objects``: the ``n`` most probable classes, best first, with their
    probabilities; on made-up probabilities (the quick subset; the shipped model's are pinned
    in test_tags_of_the_example_photos)."""
    classes = ObjectClasses(("bus", "cat", "cup", "dog"), ((5,), (6,), (), (7,)))
    probs = np.array([0.1, 0.5, 0.05, 0.35], np.float32)
    assert classes.tags(probs, 2) == (("cat", 0.5), ("dog", 0.35))
    assert classes.tags(probs, 4) == (("cat", 0.5), ("dog", 0.35), ("bus", 0.1), ("cup", 0.05))
    assert classes.tags(probs, 0) == ()


def test_tags_of_equal_probability_come_in_class_order_and_nan_last():
    """The tags are the classes sorted by probability with ties in class order, whatever the
    shortcut that finds them (``top_classes`` sorts only the few at or above the n-th)."""
    classes = ObjectClasses(("bus", "cat", "cup", "dog", "elk"), ((), (), (), (), ()))
    probs = np.array([0.2, 0.3, 0.2, 0.3, 0.0], np.float32)
    assert [name for name, _ in classes.tags(probs, 3)] == ["cat", "dog", "bus"]
    assert [name for name, _ in classes.tags(probs, 1)] == ["cat"]
    with_nan = np.array([np.nan, 0.1, np.nan, 0.4, 0.2], np.float32)
    assert [name for name, _ in classes.tags(with_nan, 3)] == ["dog", "elk", "cat"]
    # the NaN classes last, and named by no tag (test_a_probability_that_is_not_a_number_...)
    assert [name for name, _ in classes.tags(with_nan, 5)] == ["dog", "elk", "cat"]


@pytest.mark.parametrize("seed", range(3))
def test_top_classes_is_the_stable_descending_sort_s_head(seed):
    """Against numpy's stable argsort of the negated probabilities, on 1,000 classes with many
    ties (probabilities in steps of 1/64), NaN and infinities among them, for every head."""
    rng = np.random.default_rng(seed)
    probs = np.floor(rng.random(1000) * 64) / 64
    probs[rng.integers(0, 1000, 20)] = np.nan
    probs[rng.integers(0, 1000, 3)] = np.inf
    probs[rng.integers(0, 1000, 3)] = -np.inf
    for dtype in (np.float64, np.float32):
        p = probs.astype(dtype)
        order = np.argsort(-p, kind="stable")
        for n in (1, 2, 5, 17, 64, 500, 975, 980, 999, 1000, 1001):
            assert top_classes(p, n).tolist() == order[:n].tolist(), (dtype, n)
    assert top_classes(probs, 0).tolist() == []


@pytest.mark.parametrize("seed", range(3))
def test_top_classes_of_a_batch_are_each_rows_stable_sorts_head(seed):
    """``top_classes_rows``, a batch at once: each row's head of numpy's stable argsort of the
    negated probabilities (ties in class order), rows with many ties (steps of 1/8), a row of
    one value, rows with NaN among the head and elsewhere, infinities; every head length, none
    and more than the classes; an empty batch."""
    rng = np.random.default_rng(seed)
    probs = np.floor(rng.random((12, 40)) * 8) / 8
    probs[3] = 0.25
    probs[5, [2, 30]] = np.nan  # ties at the head: NaN is the least
    probs[6, :] = np.nan
    probs[6, 7] = 0.5
    probs[7, rng.integers(0, 40, 3)] = np.inf
    probs[8, rng.integers(0, 40, 3)] = -np.inf
    probs[11, :] = np.nan  # the last row: fewer than n numbers (no row after it to read from)
    probs[11, [4, 9]] = 0.75
    for dtype in (np.float64, np.float32):
        p = probs.astype(dtype)
        order = np.argsort(-p, axis=1, kind="stable")
        for n in (-1, 0, 1, 2, 5, 9, 39, 40, 41):
            got = top_classes_rows(p, n)
            assert got.shape == (12, min(max(n, 0), 40)), (dtype, n)
            assert got.tolist() == order[:, : max(n, 0)].tolist(), (dtype, n)
    assert top_classes_rows(np.zeros((0, 40), np.float32), 5).shape == (0, 5)
    nothing = np.full((2, 6), np.nan)  # every row NaN
    assert top_classes_rows(nothing, 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_loaded_class_list_knows_the_vocabulary_s_function_words(tmp_path):
    """The consensus choice weighs function words ("a", "the", "of" ...) at 0.25: the loaded
    class list carries the ids of those the vocabulary has ("dog" and "zebra" are content
    words; "of" is not in this vocabulary)."""
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": [{"name": "a", "words": ["dog"]}]}))
    vocab = {"a": 4, "the": 5, "dog": 7, "in": 8, "zebra": 9, "two": 10, "is": 11}
    classes = ObjectClasses.load(path, vocab, n_classes=1)
    assert classes.function_ids == frozenset({4, 5, 8, 10, 11})
    # and of those no caption ends on: all but "two" ("... playing with two")
    assert classes.dangling_ids == frozenset({4, 5, 8, 11})


def test_tag_probabilities_have_four_decimals():
    """``Caption.objects`` rounded to 4 decimals, as docs/service.md shows them (["drilling rig",
    0.2747])."""
    classes = ObjectClasses(("drilling rig", "missile"), ((), ()))
    assert classes.tags(np.array([0.41753, 0.11984], np.float32), 2) == (
        ("drilling rig", 0.4175),
        ("missile", 0.1198),
    )


def test_tag_words_keep_n_tags_classes_of_at_least_min_prob():
    """A class of exactly ``min_prob`` is a tag ("at least"); a class past ``n_tags`` is not,
    however probable (0.25 and 0.5 are exact in float32)."""
    classes = ObjectClasses(("bus", "cat", "cup"), ((5,), (6,), (7,)))
    probs = np.array([[0.5, 0.25, 0.25]], np.float32)
    assert classes.tag_words(probs, n_tags=2, min_prob=0.25) == (frozenset({5, 6}),)
    assert classes.tag_words(probs, n_tags=3, min_prob=0.25) == (frozenset({5, 6, 7}),)
    assert classes.tag_words(probs, n_tags=3, min_prob=0.3) == (frozenset({5}),)


# -- guidance in the search ------------------------------------------------------------------------


def _search(backend, seed, tag_word=None, bonus=8.0, **options):
    """One image's best hypothesis; with ``tag_word``, the tag bonus on it (the search's own
    rule, at a bonus the options would refuse: the fake's distributions are not a model's)."""
    encoded = backend.encode(np.array([seed]))
    opts = CaptionOptions(**{"no_repeat_ngram": 0, **options})
    scorers = (
        [] if tag_word is None else [partial(TagBonus, (frozenset({tag_word}),), backend.vocab_size, bonus)]
    )
    return beam_search(
        backend, encoded, opts, START, END, filters=[NeverFirst(NEVER_FIRST_IDS)], scorers=scorers
    )[0][0]


def _word_outside_top_k(backend, seed):
    """A word the plain search never says for this image."""
    plain = _search(backend, seed)
    said = set(plain.tokens)
    return next(w for w in range(backend.vocab_size - 1, 3, -1) if w not in said), plain


def test_guidance_steers_to_a_word_outside_the_plain_top_k():
    backend = PrefixHashBackend(vocab_size=40, top_k=5, end_bias=1.0)
    word, plain = _word_outside_top_k(backend, 11)
    backend.biases.clear()
    steered = _search(backend, 11, word)
    assert word in steered.tokens and word not in plain.tokens
    assert backend.biases[0][:, word].max() == 8.0  # the step got it, to reach past its top K


def test_guidance_stops_once_a_beam_has_said_a_tag_word():
    """A bonus that stayed on would make the word repeat ("a bus bus"); it must switch off."""
    backend = PrefixHashBackend(vocab_size=40, top_k=5, end_bias=-3.0)
    word, _ = _word_outside_top_k(backend, 5)
    backend.biases.clear()
    # overwhelming: with the bonus on, every word would be this one
    steered = _search(backend, 5, word, bonus=30.0, beam_size=1, max_length=8)
    assert steered.tokens.count(word) == 1
    first = steered.tokens.index(word)
    assert all(b is not None for b in backend.biases[: first + 1])
    assert all(b is None for b in backend.biases[first + 1 :])  # steering off: no bias sent


def test_guided_hypothesis_reports_the_models_own_log_probability():
    backend = PrefixHashBackend(vocab_size=40, top_k=5, end_bias=1.0)
    word, _ = _word_outside_top_k(backend, 3)
    hyp = _search(backend, 3, word, beam_size=1)
    # the caption's log-probability, recomputed from the fake's own distributions
    state, total, prev = 3, 0.0, START
    for token in [*hyp.tokens, END]:
        state = PrefixHashBackend.next_state(state, prev)
        total += float(backend.logprobs(state)[token])
        prev = token
    assert hyp.log_prob == pytest.approx(total, abs=1e-4)
    assert hyp.score == pytest.approx(total / (len(hyp.tokens) + 1), abs=1e-4)
    assert hyp.rank_score == pytest.approx((total + 8.0) / (len(hyp.tokens) + 1), abs=1e-4)


def test_no_guidance_sends_no_bias():
    backend = PrefixHashBackend(vocab_size=12, top_k=5)
    backend.biases.clear()
    _search(backend, 2)
    assert backend.biases and all(b is None for b in backend.biases)


# -- the shipped model and the command line --------------------------------------------------------


def test_guidance_is_on_by_default_and_can_be_turned_off(default_captioner, tmp_path):
    """The default steers (the coffee photo's espresso tag names 'coffee' / 'cup'); with the
    bonus at 0 the captions are the caption model's alone (the language-model fusion, which
    has its own switch, off in both)."""
    assert default_captioner.options.guidance_bonus == 2.0
    off = Captioner(guidance_bonus=0.0, fusion_weight=0.0)
    strong = Captioner(guidance_bonus=5.0, fusion_weight=0.0)
    photo = EXAMPLES / "chelsea.png"
    assert "cat" not in off.caption(photo).tokens
    assert "cat" in strong.caption(photo).tokens


def test_cli_objects_and_no_guidance_flag(capsys):
    photo = str(EXAMPLES / "coffee.png")
    assert cli_main(["caption", "--json", photo]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["objects"][0][0] == "espresso" and len(line["objects"]) == 5
    assert cli_main(["caption", "--objects", photo]) == 0
    path, caption, tags = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == photo and tags.startswith("espresso 0.90, ")
    assert cli_main(["caption", "--no-objects-guidance", "--json", photo]) == 0
    unguided = json.loads(capsys.readouterr().out)
    assert unguided["caption"] == Captioner(guidance_bonus=0).caption(photo).text


@pytest.mark.parametrize(
    "field, value",
    [
        ("guidance_bonus", -1.0),
        ("guidance_bonus", 11),
        ("guidance_min_prob", 1.5),
        ("guidance_tags", 0),
        ("objects", -1),
        ("objects", 2.5),
    ],
)
def test_guidance_options_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        CaptionOptions(**{field: value}).validate(top_k=10)


def test_guided_hypotheses_are_ranked_with_the_bonus():
    """Ranked by the steered score: a caption naming the tag comes first even where the model
    alone prefers another (its own ``score`` is lower)."""
    backend = PrefixHashBackend(vocab_size=40, top_k=5, end_bias=1.0)
    for seed in range(20):
        word, plain = _word_outside_top_k(backend, seed)
        encoded = backend.encode(np.array([seed]))
        hyps = beam_search(
            backend,
            encoded,
            CaptionOptions(no_repeat_ngram=0, n_best=3),
            START,
            END,
            scorers=[partial(TagBonus, (frozenset({word}),), 40, 8.0)],
        )[0]
        assert [h.rank_score for h in hyps] == sorted((h.rank_score for h in hyps), reverse=True)
        if word in hyps[0].tokens and hyps[0].score < max(h.score for h in hyps[1:]):
            return  # found the case that tells the two rankings apart
    pytest.fail("no seed where the bonus changes the ranking")


def test_a_probability_that_is_not_a_number_names_no_tag():
    """Class probabilities with NaN or infinity in them (an encoder out of range) give no tag
    for those classes: ``--json`` and serve had written them as NaN, which strict JSON readers
    (C++, Rust, JavaScript) refuse."""
    classes = ObjectClasses(("drilling rig", "missile", "projectile"), ((), (), ()))
    probs = np.array([np.nan, 0.3, np.inf], np.float32)
    assert classes.tags(probs, 3) == (("missile", 0.3),)
    assert classes.tags(np.full(3, np.nan, np.float32), 2) == ()
