"""The vocabulary (``edgecap.vocab``): tokenising, which words a training run keeps, and the
ids <-> text mapping every caption goes through. Expected values are worked by hand from the
documented rules."""

from __future__ import annotations

import pytest

from edgecap.vocab import END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID, Vocabulary, tokenize


def test_tokenize_lower_cases_keeps_digits_and_possessives_and_drops_punctuation():
    assert tokenize("A dog's toy.") == ["a", "dog's", "toy"]  # the docstring's example
    assert tokenize("Two DOGS, 3 cats; and 10 birds!") == ["two", "dogs", "3", "cats", "and", "10", "birds"]


def test_tokenize_keeps_accented_words_whole_and_reads_a_typographic_apostrophe():
    """A user's own captions (``edgecap train --data FOLDER``), typed on a phone: "café" is
    one word ("caf" before the fix), composed or decomposed alike, and "dog’s" (U+2019) is
    "dog's" (it was "dog" and a word "s")."""
    assert tokenize("Un café près du Mädchen") == ["un", "café", "près", "du", "mädchen"]
    assert tokenize("cafe\u0301") == ["café"]
    assert tokenize("The dog\u2019s ball") == ["the", "dog's", "ball"]
    assert tokenize("snake_case") == ["snake", "case"]  # "_" separates, as before


def test_every_typographic_apostrophe_is_one_and_only_letters_follow_it():
    """A left quote used as an apostrophe (U+2018) and the modifier letter apostrophe (U+02BC)
    are read as "'" like U+2019; after an apostrophe only letters join the word (the rule the
    shipped vocabulary was built with): "summer'19" is "summer" and "19"."""
    assert tokenize("The dog\u2018s ball") == ["the", "dog's", "ball"]
    assert tokenize("The dog\u02bcs ball") == ["the", "dog's", "ball"]
    assert tokenize("summer'19 photos") == ["summer", "19", "photos"]


def test_build_keeps_words_seen_at_least_min_count_times_most_frequent_first():
    captions = ["the dog runs", "The dog sits.", "the cat runs", "the cat"]
    # counts: the 4, dog 2, runs 2, cat 2, sits 1
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == [*SPECIALS, "the", "cat", "dog", "runs"]  # ties alphabetical
    assert Vocabulary.build(captions, min_count=4).words == [*SPECIALS, "the"]
    assert Vocabulary.build(captions, min_count=1).words[-2:] == ["runs", "sits"]


def test_encode_and_decode():
    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs"])
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (PAD_ID, START_ID, END_ID, UNK_ID)
    # <start>, the words (an unknown one as <unk>, never dropped), <end>
    assert vocab.encode("A dog swims, runs.") == [START_ID, 4, 5, UNK_ID, 6, END_ID]
    # decode stops at <end> and leaves out <pad> and <start>
    assert vocab.decode([START_ID, 4, PAD_ID, 5, 6, END_ID, 4, 5]) == "a dog runs"
    assert vocab.decode([4, 5]) == "a dog"


@pytest.mark.parametrize(
    "words, problem",
    [
        (["a", *SPECIALS], "must start with"),
        ([*SPECIALS, "a", "dog", "a"], "duplicate"),
        ([*SPECIALS, ""], "non-empty strings"),
    ],
)
def test_a_vocabulary_that_breaks_the_fixed_ids_is_refused(words, problem):
    with pytest.raises(ValueError, match=problem):
        Vocabulary(words)


@pytest.mark.parametrize(
    "words, kind",
    [
        # a word -> id mapping (how other tokenisers store a vocabulary), a string, nothing
        ({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4}, "dict"),
        ("<pad> <start> <end> <unk> a", "str"),
        (None, "NoneType"),
    ],
)
def test_a_vocabulary_that_is_not_a_list_is_refused_naming_what_it_is(words, kind):
    """vocab.json's "words" of another shape is one ValueError that says what it got (what
    ``Captioner`` shows in its ModelError), not a TypeError from slicing a dict."""
    with pytest.raises(ValueError, match=f"vocabulary must be a list of words, got {kind}$"):
        Vocabulary(words)
