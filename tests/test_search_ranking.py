"""The ranking of finished captions and the API's search defaults, against values worked out by
hand (the arithmetic is in the comments), never by calling the scoring code under test.

The decoder is ``helpers.TableBackend``: a hand-written table of log-probabilities per prefix.
Vocabulary: 0 <pad>, 1 <start>, 2 <end>, 3 a, 4 dog, 5 cat, 6 runs, 7 fast.

Default ranking: score = total log-prob / (words + 1 for <end>), i.e. the mean log-prob per word
counting <end>; ties broken by the higher total. ``length_penalty=a``: score = total /
((5 + length) / 6) ** a, length counting <end> as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgecap
from edgecap import Captioner
from edgecap.decoding import CaptionOptions
from helpers import TableBackend, solid
from helpers import plain_search as beam_search


def SearchOptions(**fields) -> CaptionOptions:  # noqa: N802 - the search's options, no n-gram rule
    """The search's options as these tests were written for: no n-gram block unless asked for,
    no object guidance."""
    return CaptionOptions(**{"no_repeat_ngram": 0, **fields})


WORDS = ["<pad>", "<start>", "<end>", "a", "dog", "cat", "runs", "fast"]
START, END = 1, 2
DEFAULT_VOCAB = Path(edgecap.__file__).parent / "assets" / "default" / "vocab.json"


def table(rows: dict[tuple[str, ...], dict[str, float]]):
    """A rule from explicit prefixes; any other prefix (the filler beams) continues with words
    far less likely than the captions of interest and cannot end within the candidates the
    search looks at (beam 2: 3 per row): fast -5, runs -6, a -7, <end> -30."""
    default = {"fast": -5.0, "runs": -6.0, "a": -7.0}
    return lambda prefix: rows.get(prefix, default)


def two_captions(dog, cat, dog_end, cat_runs, runs_fast, fast_end):
    """The table of the three cases below: S = "dog <end>" against L = "cat runs fast <end>",
    with the log-probability of each of their words; every other word far less likely."""
    return {
        (): {"dog": dog, "cat": cat, "a": -4.0},
        ("dog",): {"<end>": dog_end, "a": -5.0, "runs": -6.0},
        ("cat",): {"runs": cat_runs, "a": -5.0, "fast": -6.0},
        ("cat", "runs"): {"fast": runs_fast, "a": -5.0, "dog": -6.0},
        ("cat", "runs", "fast"): {"<end>": fast_end, "a": -5.0, "dog": -6.0},
    }


def search(rows, **options) -> list:
    backend = TableBackend(WORDS, table(rows), top_k=4)
    opts = SearchOptions(**{"beam_size": 2, "n_best": 2, "max_length": 10, **options})
    (hyps,) = beam_search(backend, backend.encode(np.zeros((1, 3, 2, 2), np.float32)), opts, START, END)
    return [(" ".join(WORDS[t] for t in h.tokens), h.score, h.log_prob, h.finished) for h in hyps]


# Case A: the short caption has the higher total but the lower mean.
#   S = "dog <end>":            -1.0 - 0.6               = -1.6 over 2 tokens -> mean -0.8
#   L = "cat runs fast <end>":  -1.1 - 0.3 - 0.3 - 0.3   = -2.0 over 4 tokens -> mean -0.5
# Ranking by total would pick S (-1.6 > -2.0); by mean (the default) L (-0.5 > -0.8).
# The search (beam 2, 3 candidates a row):
#   word 1: dog -1.0, cat -1.1 live (a -4.0 third)
#   word 2: cat runs -1.4 live; dog <end> -1.6 finished (S); dog a -6.0 live (filler)
#   word 3: cat runs fast -1.7 live; cat runs a -6.4 live (filler -6.0 -5 = -11.0 is out)
#   word 4: cat runs fast <end> -2.0 finished (L): two finished = beam, the search stops.
CASE_A = two_captions(dog=-1.0, cat=-1.1, dog_end=-0.6, cat_runs=-0.3, runs_fast=-0.3, fast_end=-0.3)

# Case B: counting <end> in the length decides.
#   S = "dog <end>":           -0.4 - 0.6             = -1.0; /2 = -0.5; without <end> /1 = -1.0
#   L = "cat runs fast <end>": -0.5 - 0.6 - 0.6 - 0.7 = -2.4; /4 = -0.6; without <end> /3 = -0.8
# Counting <end> (the default): S wins (-0.5 > -0.6); not counting it, L would (-0.8 > -1.0).
# Search: word 1 dog -0.4, cat -0.5; word 2 dog <end> -1.0 finished, cat runs -1.1, dog a -5.4;
# word 3 cat runs fast -1.7, cat runs a -6.1; word 4 cat runs fast <end> -2.4 finished.
CASE_B = two_captions(dog=-0.4, cat=-0.5, dog_end=-0.6, cat_runs=-0.6, runs_fast=-0.6, fast_end=-0.7)

# Case C: a tie on the mean, broken by the higher total.
#   S = "dog <end>": -0.5 * 2 = -1.0 ; mean -0.5
#   L = "cat runs fast <end>": -0.5 * 4 = -2.0 ; mean -0.5   (all exact in binary floating point)
# Tie on the score -> the higher total (S, -1.0) first.
CASE_C = two_captions(dog=-0.5, cat=-0.5, dog_end=-0.5, cat_runs=-0.5, runs_fast=-0.5, fast_end=-0.5)

APPROX = dict(abs=1e-6)  # the table's values pass through float32


def test_default_ranks_by_mean_log_prob_not_total():
    ranked = search(CASE_A)
    assert [r[0] for r in ranked] == ["cat runs fast", "dog"]
    (text_l, score_l, lp_l, fin_l), (text_s, score_s, lp_s, fin_s) = ranked
    assert score_l == pytest.approx(-0.5, **APPROX) and lp_l == pytest.approx(-2.0, **APPROX)
    assert score_s == pytest.approx(-0.8, **APPROX) and lp_s == pytest.approx(-1.6, **APPROX)
    assert fin_l and fin_s


def test_default_length_counts_end():
    ranked = search(CASE_B)
    assert [r[0] for r in ranked] == ["dog", "cat runs fast"]
    assert [r[1] for r in ranked] == pytest.approx([-0.5, -0.6], **APPROX)
    assert [r[2] for r in ranked] == pytest.approx([-1.0, -2.4], **APPROX)


def test_ties_on_the_score_go_to_the_higher_total():
    ranked = search(CASE_C)
    assert [r[0] for r in ranked] == ["dog", "cat runs fast"]
    assert [r[1] for r in ranked] == [-0.5, -0.5]
    assert [r[2] for r in ranked] == [-1.0, -2.0]


# GNMT, case A: lengths (with <end>) 2 and 4; lp(n) = ((5 + n) / 6) ** a
#   a = 0.5: lp(2) = (7/6)^0.5 = 1.0801234; lp(4) = (9/6)^0.5 = 1.2247449
#            S = -1.6 / 1.0801234 = -1.4813127 ; L = -2.0 / 1.2247449 = -1.6329932 -> S first
#   a = 1.0: S = -1.6 / (7/6) = -1.3714286     ; L = -2.0 / 1.5       = -1.3333333 -> L first
# GNMT, case B, a = 1.0: S = -1.0 / (7/6) = -0.8571429 ; L = -2.4 / 1.5 = -1.6 -> S first
@pytest.mark.parametrize(
    "rows, penalty, order, scores",
    [
        (CASE_A, 0.5, ["dog", "cat runs fast"], [-1.4813127, -1.6329932]),
        (CASE_A, 1.0, ["cat runs fast", "dog"], [-1.3333333, -1.3714286]),
        (CASE_B, 1.0, ["dog", "cat runs fast"], [-0.8571429, -1.6]),
    ],
)
def test_gnmt_length_penalty(rows, penalty, order, scores):
    ranked = search(rows, length_penalty=penalty)
    assert [r[0] for r in ranked] == order
    assert [r[1] for r in ranked] == pytest.approx(scores, abs=1e-6)


def test_n_best_one_keeps_the_winner():
    assert [r[0] for r in search(CASE_A, n_best=1)] == ["cat runs fast"]
    assert [r[0] for r in search(CASE_A, n_best=1, length_penalty=0.5)] == ["dog"]


# -- an unfinished caption: length = its words (no <end>) ---------------------------------------
def test_caption_cut_at_max_length_is_scored_over_its_words():
    # Only "dog" ever leads, <end> is never among the candidates:
    #   beam 1, max_length 3: "dog dog dog", -0.2 * 3 = -0.6 over 3 words -> -0.2
    rule = lambda prefix: {"dog": -0.2, "cat": -3.0}  # noqa: E731
    backend = TableBackend(WORDS, rule, top_k=4)
    ((hyp,),) = beam_search(
        backend,
        backend.encode(np.zeros((1, 3, 2, 2), np.float32)),
        SearchOptions(beam_size=1, max_length=3),
        START,
        END,
    )
    assert [WORDS[t] for t in hyp.tokens] == ["dog", "dog", "dog"] and not hyp.finished
    assert hyp.score == pytest.approx(-0.2, **APPROX)
    assert hyp.log_prob == pytest.approx(-0.6, **APPROX)


# -- the API's default no_repeat_ngram (3) reaches the search ----------------------------------
def cycle(prefix: tuple[str, ...]) -> dict[str, float]:
    """Next word by the last word: a -> dog -> a -> dog ...; only after "runs" is <end> likely."""
    last = prefix[-1] if prefix else None
    return {
        None: {"a": -0.1, "dog": -2.0, "runs": -3.0},
        "a": {"dog": -0.1, "runs": -2.0, "<end>": -4.0},
        "dog": {"a": -0.1, "runs": -2.0, "<end>": -3.0},
        "runs": {"<end>": -0.1, "a": -2.0, "dog": -3.0},
    }.get(last, {"<end>": -0.1})


@pytest.fixture
def fake_captioner(monkeypatch):
    """make(rule=cycle, **kwargs): Captioner(**kwargs) on the shipped model's manifest and
    vocabulary, its backend replaced by a ``TableBackend`` over ``rule`` (ids: the shipped
    vocabulary's), through ``edgecap.api.load_backend``."""
    words = json.loads(DEFAULT_VOCAB.read_text())["words"]
    made, rules = [], [cycle]

    def load_backend(name, manifest, **options):
        made.append(TableBackend(words, rules[-1], top_k=10))
        return made[-1]

    monkeypatch.setattr(edgecap.api, "load_backend", load_backend)

    def make(rule=cycle, **kwargs):
        rules.append(rule)
        # the fake's frames are one colour: caption them anyway (no blank check)
        captioner = Captioner(backend="onnxruntime", **{"blank_check": False, **kwargs})
        assert captioner.backend is made[-1]
        return captioner

    return make


IMAGE = solid((10, 20, 30))

# Greedy (beam 1: 2 candidates a row), no_repeat_ngram 3:
#   a (-0.1) dog (-0.1) a (-0.1) dog (-0.1)  [(dog, a, dog) is new]
#   next "a" would repeat (a, dog, a): blocked; the other candidate, runs (-2.0), is taken
#   after runs: <end> (-0.1)
#   total = -0.1 * 4 - 2.0 - 0.1 = -2.5 over 5 words + <end> = 6 -> score -0.4166667
# Without the block: "a dog" x 10 fills max_length (20 words) and no beam ever ends, so the
# caption is the best place it could have ended (<end> is in every row's top K): after "a dog"
# x k, -0.2 k - 3.0 over 2k + 1; after "a dog" x k + "a", -0.2 k - 0.1 - 4.0 over 2k + 2. The
# best is k = 9 (18 words): -4.8 / 19 = -0.2526316, not a caption cut mid-phrase.
BLOCKED = ("a dog a dog runs", -0.4166667, -2.5)
UNBLOCKED = (" ".join(["a", "dog"] * 9), -4.8 / 19, -4.8)


def test_api_blocks_repeated_trigrams_by_default(fake_captioner):
    cap = fake_captioner(beam_size=1).caption(IMAGE)  # no_repeat_ngram not given: the default
    assert cap.text == BLOCKED[0]
    assert (cap.score, cap.log_prob) == pytest.approx(BLOCKED[1:], abs=1e-6)


def test_api_no_repeat_ngram_zero_turns_the_block_off(fake_captioner):
    # the consensus choice off: its readability term would choose the ending with the fewest
    # "dog"s said again (tests/test_consensus.py), not the search's best place to end
    cap = fake_captioner(beam_size=1, no_repeat_ngram=0, consensus=False).caption(IMAGE)
    assert cap.text == UNBLOCKED[0]
    assert (cap.score, cap.log_prob) == pytest.approx(UNBLOCKED[1:], abs=1e-6)


def ends_after_a_repeat(prefix: tuple[str, ...]) -> dict[str, float]:
    """As ``cycle``, but <end> is likely only after "a dog a dog a" (a repeated trigram), and
    never among the candidates of a 3-beam search (4 a row) anywhere else."""
    if prefix == ("a", "dog", "a", "dog", "a"):
        return {"<end>": -0.05, "dog": -0.1, "runs": -2.0}
    last = prefix[-1] if prefix else None
    return {
        None: {"a": -0.1, "dog": -2.0, "runs": -3.0, "cat": -4.0},
        "a": {"dog": -0.1, "runs": -2.0, "cat": -3.0, "fast": -4.0},
        "dog": {"a": -0.1, "runs": -2.0, "cat": -3.0, "fast": -4.0},
    }.get(last, {"a": -0.5, "dog": -1.0, "cat": -2.0, "fast": -3.0})


def test_default_captioner_searches_with_trigram_block(fake_captioner):
    """All defaults (beam 3): the caption has no repeated trigram, and (the consensus choice
    off) it is what the search gives with no_repeat_ngram=3 (and not what it gives without the
    block, which ends after the repeated "a dog a dog a")."""
    default = fake_captioner(rule=ends_after_a_repeat).caption(IMAGE).text.split()
    assert len(set(zip(default, default[1:], default[2:]))) == len(default) - 2, default
    captioner = fake_captioner(rule=ends_after_a_repeat, consensus=False)
    cap = captioner.caption(IMAGE)
    words = cap.text.split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    assert len(trigrams) == len(set(trigrams)), cap.text
    backend, encoded = captioner.backend, captioner.backend.encode(IMAGE[None])
    ids = {w: i for i, w in enumerate(backend.words)}

    def best(no_repeat):
        ((hyp, *_),) = beam_search(
            backend, encoded, SearchOptions(no_repeat_ngram=no_repeat), ids["<start>"], ids["<end>"]
        )
        return " ".join(backend.words[t] for t in hyp.tokens)

    assert best(0) == "a dog a dog a"
    assert cap.text == best(3) != best(0)


def test_cli_blocks_repeated_trigrams_by_default(fake_captioner, tmp_path, capsys):
    from PIL import Image

    from edgecap.cli import main

    path = tmp_path / "solid.png"
    Image.fromarray(IMAGE).save(path)
    assert main(["caption", str(path), "--beam-size", "1", "--no-blank-check"]) == 0
    assert capsys.readouterr().out.strip().split("\t")[-1] == BLOCKED[0]
