"""One ``CaptionOptions``: what the Captioner, the search and the command line get from it, and
``Captioner.iter_captions``' batching. Runs the shipped model's manifest and vocabulary over a
fake backend (``CycleBackend``, not a model), except the CLI-vs-API check on the real model."""

from __future__ import annotations

import argparse
import ast
import json
import re
from dataclasses import FrozenInstanceError, fields, replace
from pathlib import Path

import numpy as np
import pytest

from edgecap import Caption, CaptionOptions, Captioner, InputError, ModelError
from edgecap import api
from edgecap.backends import NAMES
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.cli import build_parser, main
from helpers import has_repeated_ngram

CYCLE = (4, 5, 6)  # word ids: the fake's best path is 4 5 6 4 5 6 ...
OTHERS = (7, 8, 9, 10, 11, 12, 13, 14)
IMAGE = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # not blank


class CycleBackend(Backend):
    """Fake: after word w the best next word is the one after w in CYCLE; <end> is never among
    the step's top K (nowhere the caption could end), so every caption runs to max_length and,
    unblocked, repeats a trigram."""

    name = "fake-cycle"
    top_k = 10

    def encode(self, images):
        return Encoded(len(images), None)

    def start(self, encoded, image_index, return_attention=False):
        return _CycleSession()


class _CycleSession(DecoderSession):
    def _step(self, tokens, source_rows, word_bias=None):
        best = [CYCLE[(CYCLE.index(t) + 1) % 3] if t in CYCLE else CYCLE[0] for t in tokens.tolist()]
        ids = np.array([[b, *(w for w in OTHERS if w != b)][:9] + [15] for b in best], np.int32)
        logprobs = np.tile(np.array([-0.1, *np.linspace(-3, -4, 8), -50.0], np.float32), (len(tokens), 1))
        return StepResult(logprobs, ids, None)


@pytest.fixture
def backend_calls(monkeypatch) -> list[dict]:
    """Captioner(...) gets a CycleBackend; the list records the keywords each backend got."""
    calls = []

    def load_backend(name, manifest, **options):
        calls.append(options)
        return CycleBackend()

    monkeypatch.setattr(api, "load_backend", load_backend)
    return calls


# -- options -----------------------------------------------------------------------------------
def test_default_no_repeat_ngram_reaches_the_search(backend_calls):
    words = Captioner().caption(IMAGE).tokens
    assert len(words) == CaptionOptions().max_length
    assert not has_repeated_ngram(words, 3)
    # The fake does repeat itself when allowed to.
    assert has_repeated_ngram(Captioner(no_repeat_ngram=0).caption(IMAGE).tokens, 3)


@pytest.mark.parametrize("n", [1, 2])
def test_every_no_repeat_ngram_size_reaches_the_search(backend_calls, n):
    """Down to 1: no word said twice (the fake's cycle 4 5 6 would repeat at once)."""
    words = Captioner(no_repeat_ngram=n).caption(IMAGE).tokens
    assert words and not has_repeated_ngram(words, n)
    assert has_repeated_ngram(Captioner(no_repeat_ngram=0).caption(IMAGE).tokens, n)


def test_options_object_is_honoured_and_keywords_override_it(backend_calls):
    options = CaptionOptions(max_length=5, beam_size=2, n_best=2, no_repeat_ngram=0)
    captioner = Captioner(options=options)
    assert captioner.options == options
    caption = captioner.caption(IMAGE)
    assert len(caption.tokens) == 5 and len(caption.alternatives) == 1

    captioner = Captioner(options=options, max_length=7, threads=2)
    assert captioner.options == replace(options, max_length=7)
    caption = captioner.caption(IMAGE)
    assert len(caption.tokens) == 7 and len(caption.alternatives) == 1
    # Keywords that are not options go to the backend, and only those.
    assert backend_calls[-1]["threads"] == 2 and "max_length" not in backend_calls[-1]


def test_options_object_is_validated(backend_calls):
    with pytest.raises(ValueError, match="beam_size"):
        Captioner(options=CaptionOptions(beam_size=0))
    with pytest.raises(ValueError, match="n_best"):
        Captioner(options=CaptionOptions(beam_size=2), n_best=3)
    with pytest.raises(TypeError, match="CaptionOptions"):
        Captioner(options={"beam_size": 2})


@pytest.mark.parametrize(
    "field, value",
    [
        ("beam_size", 0),
        ("max_length", 0),
        ("batch_size", 65),
        ("batch_size", "8"),
        ("n_best", 4),  # more than the beams (3)
        ("no_repeat_ngram", -1),
        ("objects", 101),
        ("guidance_bonus", float("nan")),
        ("fusion_weight", 3),
        ("length_penalty", True),
        ("constrained", "yes"),
        ("beam_size", True),  # a bool is not a count (True == 1 to Python)
        ("guidance_tags", 21),  # at most 20
        ("guidance_bonus", None),  # None only for fusion_weight (the model's own)
        ("n_best", 0),
    ],
)
def test_a_bad_option_is_refused_where_the_options_are_made(field, value):
    """The mistake surfaces on the line that makes it, not later in a Captioner (or never, for
    options kept for a Captioner made elsewhere), as one ValueError naming the option."""
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        CaptionOptions(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        replace(CaptionOptions(), **{field: value})


@pytest.mark.parametrize(
    "field, low, high, step",
    [  # `edgecap caption --help`'s ranges (--max-length 1 to 200, --batch-size 1 to 64, ...); the
        # probabilities 0 to 1; hold_margin (no flag) 0 to 10; objects and guidance_tags as
        # their errors say
        ("guidance_bonus", 0, 10, 0.01),
        ("guidance_min_prob", 0, 1, 0.01),
        ("constraint_min_prob", 0, 1, 0.01),
        ("fusion_weight", 0, 2, 0.01),
        ("hold_margin", 0, 10, 0.01),
        ("length_penalty", 0, 2, 0.01),
        ("max_length", 1, 200, 1),
        ("batch_size", 1, 64, 1),
        ("objects", 0, 100, 1),
        ("guidance_tags", 1, 20, 1),
    ],
)
def test_an_option_takes_the_ends_of_its_range_and_nothing_beyond(field, low, high, step):
    for value in (low, high):
        assert getattr(CaptionOptions(**{field: value}), field) == value
    for value in (low - step, high + step):
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            CaptionOptions(**{field: value})


def test_options_cannot_be_changed_in_place():
    """A CaptionOptions is a value (a Captioner's, shared by its threads): a field is changed
    by making new options (``dataclasses.replace``), which checks it, not by assigning."""
    options = CaptionOptions()
    with pytest.raises(FrozenInstanceError):
        options.beam_size = 5  # type: ignore[misc]
    assert replace(options, beam_size=5).beam_size == 5 and options.beam_size == 3


def test_the_defaults_are_the_documented_ones():
    """docs/python-api.md writes every default of CaptionOptions(...) out; they are the
    options' own (the command line's come from these, test_cli_defaults_are_the_options_defaults)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    [written] = re.findall(r"`CaptionOptions\((beam_size=[^`]*)\)`", text)
    documented = {}
    for item in " ".join(written.split()).split(", "):
        name, value = item.split("=")
        documented[name] = ast.literal_eval(value)
    defaults = {f.name: f.default for f in fields(CaptionOptions)}
    assert documented == defaults
    assert [type(documented[name]) for name in defaults] == [type(v) for v in defaults.values()]


def test_numpy_numbers_are_taken_as_the_python_numbers_they_are():
    """Options read from a config or an array are numpy numbers: taken (they were refused with
    'beam_size must be an integer, got np.int64(3)') and kept as Python numbers, so the options
    print and serialise as any others."""
    options = CaptionOptions(beam_size=np.int64(2), guidance_min_prob=np.float32(0.5), constrained=np.True_)
    assert (options.beam_size, options.guidance_min_prob, options.constrained) == (2, 0.5, True)
    assert [type(v) for v in (options.beam_size, options.guidance_min_prob, options.constrained)] == [
        int,
        float,
        bool,
    ]
    json.dumps(options.__dict__)
    with pytest.raises(ValueError, match="^beam_size must be an integer, got 2.0"):
        CaptionOptions(beam_size=np.float64(2.0))  # a float is still not a beam count


def test_a_beam_wider_than_the_model_is_refused_by_the_captioner(backend_calls):
    """The widest beam is the model's (its step graph's top K, 10 for the shipped one): options
    of beam 11 can be made, a Captioner of that model refuses them."""
    options = CaptionOptions(beam_size=11)
    with pytest.raises(ValueError, match="beam_size must be between 1 and 10"):
        Captioner(options=options)


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(
    "argv, flagged",
    [
        (
            ["caption", "photo.jpg"],
            {
                "beam_size",
                "max_length",
                "no_repeat_ngram",
                "batch_size",
                "length_penalty",
                "guidance_bonus",
                "constrained",
                "fusion_weight",
                "consensus",
                "blank_check",
                "brighten",
                "crop_bars",
            },
        ),
        (
            ["eval", "--images", "photos"],
            {
                "beam_size",
                "max_length",
                "no_repeat_ngram",
                "batch_size",
                "length_penalty",
                "guidance_bonus",
                "constrained",
                "fusion_weight",
                "consensus",
                "blank_check",
                "brighten",
                "crop_bars",
            },
        ),
    ],
)
def test_cli_defaults_are_the_options_defaults(argv, flagged):
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {f.name: f.default for f in fields(CaptionOptions)}
    given = {name: getattr(args, name) for name in defaults if hasattr(args, name)}
    assert set(given) == flagged
    assert given == {name: defaults[name] for name in flagged}
    backend = next(a for a in _subcommand(parser, argv[0])._actions if a.dest == "backend")
    assert set(backend.choices) == set(NAMES) and backend.default == "auto"


def test_cli_flags_reach_the_captioner(backend_calls, tmp_path, capsys):
    from PIL import Image

    from edgecap.commands._options import caption_options

    photo = tmp_path / "photo.png"
    Image.fromarray(IMAGE).save(photo)
    for flags, repeats in [([], False), (["--no-repeat-ngram", "0"], True)]:
        assert main(["caption", "--json", "--max-length", "6", *flags, str(photo)]) == 0
        words = json.loads(capsys.readouterr().out)["caption"].split()
        assert len(words) == 6 and has_repeated_ngram(words, 3) == repeats
    assert main(["caption", "--beam-size", "0", str(photo)]) == 2
    assert "--beam-size must be" in capsys.readouterr().err  # the flag, not the field
    args = build_parser().parse_args(
        ["eval", "--images", "photos", "--length-penalty", "0.5", "--beam-size", "2", "--batch-size", "4"]
    )
    assert caption_options(args) == CaptionOptions(length_penalty=0.5, beam_size=2, batch_size=4)


class _WordsSession(DecoderSession):
    """Says ``words`` in order, then <end> (a fake decoder step's top-K ids, any ids it likes)."""

    words: tuple[int, ...] = (4,)

    def _step(self, tokens, source_rows, word_bias=None):
        end = 2  # <end> in the shipped vocab.json
        follows = {**dict(zip(self.words, self.words[1:])), self.words[-1]: end}
        ids = np.array([[follows.get(t, self.words[0]), *OTHERS, 15] for t in tokens.tolist()], np.int32)
        logprobs = np.tile(np.array([-0.1, *np.linspace(-3, -4, 8), -50.0], np.float32), (len(tokens), 1))
        return StepResult(logprobs, ids, None)


@pytest.mark.parametrize(("before", "beyond"), [((), 0), ((), 1), ((), None), ((4,), 0), ((4,), None)])
def test_a_word_id_past_the_vocabulary_is_a_model_error(monkeypatch, before, beyond):
    """A decoder step whose ids run past vocab.json (the graph and the vocabulary do not belong
    together) is a ModelError naming the ids, down to the first id past the end (len(vocab)),
    and a negative id too (None: -1, which would otherwise read the vocabulary's last word).
    The same check over every word of a caption, not only one: a good word (4) then an id past
    the end, or then -1, is the ModelError naming both ids."""
    words = len(json.loads((api.default_model_dir() / "vocab.json").read_text())["words"])
    word_id = -1 if beyond is None else words + beyond

    class Session(_WordsSession):
        words = (*before, word_id)

    class Backend_(CycleBackend):
        def start(self, encoded, image_index, return_attention=False):
            return Session()

    monkeypatch.setattr(api, "load_backend", lambda name, manifest, **options: Backend_())
    captioner = Captioner(guidance_bonus=0.0, fusion_weight=0.0, consensus=False)
    said = ", ".join(str(i) for i in (*before, word_id))
    with pytest.raises(ModelError, match=rf"word ids \[{said}\] beyond its {words}-word vocabulary"):
        captioner.caption(IMAGE)


def test_a_frame_with_nothing_recognisable_keeps_the_searchs_best_score(backend_calls):
    """Its text is "nothing recognisable", its score and log_prob those of the caption the
    search chose (the one blank_check=False gives), not of an alternative."""
    blank = np.zeros((8, 8, 3), np.uint8)
    nothing = Captioner(beam_size=3, n_best=3).caption(blank)
    captioned = Captioner(beam_size=3, n_best=3, blank_check=False).caption(blank)
    assert not nothing.recognisable and nothing.text == api.NOTHING_RECOGNISABLE
    assert len(captioned.alternatives) == 2 and captioned.alternatives[-1].score != captioned.score
    assert (nothing.score, nothing.log_prob) == (captioned.score, captioned.log_prob)


def test_attention_maps_are_square_for_a_square_grid_only():
    """(n_words, L) -> (n_words, s, s) when L is s * s, else as it came."""
    square = api._attention_maps(np.arange(8, dtype=np.float64).reshape(2, 4))
    assert square.dtype == np.float32 and square.tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert api._attention_maps(np.ones((3, 6), np.float32)).shape == (3, 6)  # a 2 x 3 grid
    assert api._attention_maps(None) is None


# -- iter_captions -----------------------------------------------------------------------------
def test_iter_captions_reads_one_batch_at_a_time(backend_calls):
    captioner = Captioner(batch_size=2)
    pulled = []

    def images():
        for i in range(5):
            pulled.append(i)
            yield IMAGE

    results = captioner.iter_captions(images())
    assert pulled == []
    assert isinstance(next(results), Caption) and pulled == [0, 1]
    next(results)
    assert pulled == [0, 1]
    next(results)
    assert pulled == [0, 1, 2, 3]
    assert len(list(results)) == 2 and pulled == [0, 1, 2, 3, 4]


def test_iter_captions_keeps_failed_slots(backend_calls):
    captioner = Captioner(batch_size=2)
    inputs = [IMAGE, b"", IMAGE, np.zeros((4, 4, 2), np.uint8), IMAGE]
    results = list(captioner.iter_captions(iter(inputs), on_error="return"))
    assert [type(r) for r in results] == [Caption, InputError, Caption, InputError, Caption]
    assert results[3].source == "<array (4, 4, 2) uint8>"
    again = captioner.caption_batch(inputs, on_error="return")
    assert [r if isinstance(r, Caption) else str(r) for r in again] == [
        r if isinstance(r, Caption) else str(r) for r in results
    ]


def test_iter_captions_raises_at_the_bad_input_after_earlier_batches(backend_calls):
    results = Captioner(batch_size=2).iter_captions([IMAGE, IMAGE, b""])
    assert isinstance(next(results), Caption) and isinstance(next(results), Caption)
    with pytest.raises(InputError, match="0 bytes"):
        next(results)
    # in the same batch: the images before the bad one still get their captions first
    results = Captioner(batch_size=8).iter_captions([IMAGE, IMAGE, IMAGE, b"", IMAGE])
    assert [type(next(results)) for _ in range(3)] == [Caption] * 3
    with pytest.raises(InputError, match="0 bytes"):
        next(results)
    with pytest.raises(InputError, match="0 bytes"):  # and a batch that starts with it
        next(Captioner(batch_size=8).iter_captions([b"", IMAGE]))


def test_caption_batch_with_raise_captions_nothing_it_would_throw_away(backend_calls):
    """It returns nothing when it raises: the photos before the bad one are not encoded for
    nothing (iter_captions, which hands them out, does encode them)."""
    captioner = Captioner(batch_size=8)
    encoded = []
    encode = captioner.backend.encode
    captioner.backend.encode = lambda x: (encoded.append(len(x)), encode(x))[1]
    with pytest.raises(InputError, match="0 bytes"):
        captioner.caption_batch([IMAGE, IMAGE, b""])
    assert encoded == []
    results = captioner.iter_captions([IMAGE, IMAGE, b""])
    assert [type(next(results)) for _ in range(2)] == [Caption, Caption] and encoded == [2]


def test_iter_captions_checks_its_arguments_when_called(backend_calls):
    captioner = Captioner()
    with pytest.raises(ValueError, match="on_error"):
        captioner.iter_captions([IMAGE], on_error="skip")
    with pytest.raises(TypeError, match="caption\\(\\)"):
        captioner.iter_captions(IMAGE)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_of_only_bad_images_keeps_their_slots(backend_calls, workers):
    """on_error="return": one result per input, in order, also where every image of a batch
    (here the first batch of two and the last, short one) is unusable."""
    captioner = Captioner(batch_size=2, decode_workers=workers)
    inputs = [b"", np.zeros((4, 4, 2), np.uint8), IMAGE, IMAGE, b""]
    expected = [InputError, InputError, Caption, Caption, InputError]
    assert [type(r) for r in captioner.caption_batch(inputs, on_error="return")] == expected
    assert [type(r) for r in captioner.iter_captions(iter(inputs), on_error="return")] == expected


def test_one_image_given_as_a_batch_is_a_type_error(backend_calls, tmp_path):
    """Encoded bytes, a PIL image, a path or one (H, W, 3) or (H, W) array are one image, not a list of
    them: caption_batch and iter_captions say to use caption(), which takes each."""
    import io

    from PIL import Image

    pil = Image.fromarray(IMAGE)
    png = io.BytesIO()
    pil.save(png, format="PNG")
    path = tmp_path / "one.png"
    path.write_bytes(png.getvalue())
    captioner = Captioner()
    for one in (png.getvalue(), pil, path, str(path), IMAGE, IMAGE[..., 0]):  # the last: grey (H, W)
        assert isinstance(captioner.caption(one), Caption)
        with pytest.raises(TypeError, match=r"take a list of images; use caption\(\) for one image"):
            captioner.caption_batch(one)
        with pytest.raises(TypeError, match=r"use caption\(\) for one image"):
            captioner.iter_captions(one)
    # a 4-dimensional array is a batch of (H, W, 3) images
    assert [type(r) for r in captioner.caption_batch(np.stack([IMAGE, IMAGE]))] == [Caption, Caption]
    # a 5-dimensional one is neither a batch nor one image: not told to use caption()
    five = np.stack([np.stack([IMAGE, IMAGE])] * 2)
    with pytest.raises(
        TypeError, match=r"a list of images or an \(N, H, W, C\) array, got an array of 5 dim"
    ):
        captioner.caption_batch(five)


def test_a_1d_array_of_paths_or_images_is_a_list_of_inputs(backend_calls, tmp_path):
    """``np.array(glob(...))`` or a DataFrame column's ``.values`` (a 1-D array of str, or of
    objects) is a list of inputs, each captioned as itself: it had been refused, "use caption()
    for one image". A 1-D array of numbers is neither a list of images nor one: said so."""
    from PIL import Image

    paths = []
    for i, image in enumerate((IMAGE, IMAGE[::-1])):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    captioner = Captioner()
    expected = [captioner.caption(p).text for p in paths]
    assert [c.text for c in captioner.caption_batch(np.array(paths))] == expected
    assert [c.text for c in captioner.iter_captions(np.array(paths, dtype=object))] == expected
    mixed = captioner.caption_batch(np.array([paths[0], None], dtype=object), on_error="return")
    assert mixed[0].text == expected[0] and isinstance(mixed[1], InputError)
    with pytest.raises(TypeError, match=r"an \(N, H, W, C\) array, got an array of shape \(5,\) float64$"):
        captioner.caption_batch(np.zeros(5))


def test_one_image_as_a_bytearray_or_memoryview_given_as_a_batch_is_a_type_error(backend_calls):
    """caption() takes encoded bytes as bytes, bytearray or memoryview (a buffer read from a socket
    or a ROS message): each is one image, so caption_batch and iter_captions say to use caption(),
    as for bytes, rather than iterating it as a list of ints (one "<int>: unsupported input type"
    error per byte: 268 of them for this PNG with on_error="return")."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(IMAGE).save(png, format="PNG")
    captioner = Captioner()
    for one in (bytearray(png.getvalue()), memoryview(png.getvalue())):
        assert isinstance(captioner.caption(one), Caption)
        with pytest.raises(TypeError, match=r"take a list of images; use caption\(\) for one image"):
            captioner.caption_batch(one, on_error="return")
        with pytest.raises(TypeError, match=r"use caption\(\) for one image"):
            captioner.iter_captions(one)


def test_a_closed_captioner_refuses_a_call_when_it_is_made(backend_calls):
    """Not lazily at the first batch, and also a call with no images."""
    captioner = Captioner()
    captioner.close()
    with pytest.raises(ValueError, match="this Captioner is closed"):
        captioner.caption_batch([])
    with pytest.raises(ValueError, match="this Captioner is closed"):
        captioner.iter_captions([IMAGE])  # when called, not when iterated
    with pytest.raises(ValueError, match="this Captioner is closed"):
        captioner.caption(IMAGE)


def test_a_batchs_encoder_and_search_times_are_shared_by_its_captioned_images(backend_calls):
    """timings: each caption's encode_ms and decode_ms are its share of its batch's encoder run
    and search; an unusable image in the batch took no part in them. Batch of four with one
    bad image: 30 ms encoding, 90 ms search -> 10 and 30 ms for each of the three."""
    captioner = Captioner(batch_size=4)
    run = captioner._run_batch

    def timed(batch, return_attention, options, deferred=False, held=None):
        hypotheses, probs, _, _, seen = run(batch, return_attention, options, deferred, held)
        return hypotheses, probs, 30.0, 90.0, seen

    captioner._run_batch = timed
    results = captioner.caption_batch([IMAGE, b"", IMAGE, IMAGE], on_error="return")
    assert isinstance(results[1], InputError)
    shares = [(r.timings["encode_ms"], r.timings["decode_ms"]) for r in (results[0], results[2], results[3])]
    assert shares == [(10.0, 30.0)] * 3


def test_timings_are_milliseconds_of_each_stage(backend_calls, monkeypatch):
    """A clock that moves 4 ms between readings: each image's preprocess_ms is 4.0, the batch's
    encoder run and search 4 ms each, shared by its two images (2.0)."""
    import types

    readings = iter(range(1000))
    clock = types.SimpleNamespace(perf_counter=lambda: next(readings) * 0.004)
    captioner = Captioner(batch_size=2, decode_workers=0)
    monkeypatch.setattr(api, "time", clock)
    results = captioner.caption_batch([IMAGE, IMAGE])
    expected = {"preprocess_ms": 4.0, "encode_ms": 2.0, "decode_ms": 2.0}
    assert [r.timings for r in results] == [pytest.approx(expected)] * 2


class FramesCycleBackend(CycleBackend):
    """CycleBackend that, as the torch backend with device preprocessing, takes the decoded RGB
    frames (``prepares_frames``) and finds them all recognisable."""

    prepares_frames = True

    def encode_frames(self, frames, run_size=None, brighten=False):
        return self.encode(frames), np.ones(len(frames), bool), np.zeros(len(frames))


@pytest.mark.parametrize("on_device", [False, True])
def test_each_timing_is_the_time_of_its_own_stage(backend_calls, monkeypatch, on_device):
    """A clock that moves only while a stage works: decoding a photo 10 ms, making its model
    input 2 ms (on the host; a backend that ``prepares_frames`` does it in its encoder run), the
    encoder run 30 ms, the search 50 ms. Hand-traced for a batch of two: each image's
    preprocess_ms is 10 + 2 = 12 ms (10 when the backend prepares the frames), encode_ms
    30 / 2 = 15, decode_ms 50 / 2 = 25 (a uniform clock, as in the test above, cannot tell the
    stages apart)."""
    import types

    now = [0.0]

    def taking(seconds, function):
        def timed(*args, **kwargs):
            now[0] += seconds
            return function(*args, **kwargs)

        return timed

    if on_device:
        monkeypatch.setattr(api, "load_backend", lambda name, manifest, **options: FramesCycleBackend())
    captioner = Captioner(batch_size=2, decode_workers=0)
    assert captioner.backend.prepares_frames == on_device
    monkeypatch.setattr(api, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(api, "load_rgb", taking(0.010, api.load_rgb))
    monkeypatch.setattr(api, "load_rgb_array", taking(0.010, api.load_rgb_array))
    monkeypatch.setattr(api, "model_input", taking(0.002, api.model_input))
    monkeypatch.setattr(api, "search", taking(0.050, api.search))
    monkeypatch.setattr(captioner.backend, "encode", taking(0.030, captioner.backend.encode))
    results = captioner.caption_batch([IMAGE, IMAGE])
    expected = {"preprocess_ms": 10.0 if on_device else 12.0, "encode_ms": 15.0, "decode_ms": 25.0}
    assert [r.timings for r in results] == [pytest.approx(expected)] * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_each_image_s_preprocess_ms_is_its_own(backend_calls, monkeypatch, workers):
    """timings["preprocess_ms"] is for this image (docs: its loading and preprocessing): in a
    batch of three whose photos take 10, 30 and 20 ms to decode (a clock that moves only while
    one decodes), the captions' preprocess_ms are 10, 30 and 20, with decoding workers too."""
    import threading
    import types

    now = threading.local()
    took = {0: 0.010, 1: 0.030, 2: 0.020}  # by the image's first pixel
    real = api.load_rgb

    def load_rgb(image, *args, **kwargs):
        now.t = getattr(now, "t", 0.0) + took[int(image[0, 0, 0])]
        return real(image, *args, **kwargs)

    images = [np.full((8, 8, 3), i, np.uint8) for i in range(3)]
    captioner = Captioner(batch_size=3, decode_workers=workers, blank_check=False)
    monkeypatch.setattr(api, "time", types.SimpleNamespace(perf_counter=lambda: getattr(now, "t", 0.0)))
    monkeypatch.setattr(api, "load_rgb", load_rgb)
    results = captioner.caption_batch(images)
    assert [r.timings["preprocess_ms"] for r in results] == pytest.approx([10.0, 30.0, 20.0])


def test_the_backend_is_built_for_the_rows_an_image_takes(backend_calls):
    """Limits(batch_size, rows per image): a constrained search takes two rows per beam."""
    from edgecap.contract import Limits

    Captioner(beam_size=3, batch_size=4)
    Captioner(beam_size=3, batch_size=4, constrained=True)
    assert [call["limits"] for call in backend_calls] == [Limits(4, 3), Limits(4, 6)]


def test_caption_command_prints_each_batch_before_reading_on(backend_calls):
    from edgecap.commands.caption import _captions

    captioner = Captioner(batch_size=2)
    empty = InputError("empty/", "folder holds no image files")
    inputs = [
        ("a", IMAGE),
        ("empty/", empty),
        ("b", IMAGE),
        ("c", IMAGE),
        ("bad", b""),
        ("none*", InputError("none*", "the pattern matches no image files")),
    ]
    pulled = []

    def pairs():
        for pair in inputs:
            pulled.append(pair[0])
            yield pair

    out = _captions(captioner, pairs())
    assert next(out)[0] == "a" and pulled == ["a", "empty/", "b"]
    assert next(out) == ("empty/", empty)
    rest = list(out)
    assert [name for name, _ in rest] == ["b", "c", "bad", "none*"]
    assert [type(r) for _, r in rest] == [Caption, Caption, InputError, InputError]


# -- the real model: the API's defaults are the command line's -----------------------------------
def test_api_defaults_give_the_cli_default_captions(example_images, capsys):
    expected = Captioner().caption_batch(example_images)
    assert main(["caption", "--json", str(example_images[0].parent)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in example_images]
    assert [line["caption"] for line in lines] == [c.text for c in expected]
    assert [line["score"] for line in lines] == [round(c.score, 4) for c in expected]


def test_no_brighten_reaches_the_options():
    """``--no-brighten`` (caption, eval and serve) captions dark frames as they are; without it
    they are brightened (the option's default)."""
    from edgecap.commands._options import caption_options

    parser = build_parser()
    for argv in (["caption", "photo.jpg"], ["eval", "--images", "photos"], ["serve"]):
        assert caption_options(parser.parse_args(argv)).brighten is True
        assert caption_options(parser.parse_args([*argv, "--no-brighten"])).brighten is False


@pytest.mark.parametrize("value", ["no", 0, None])
def test_brighten_takes_only_true_or_false(value):
    """``brighten`` is a switch: "no" (a config file's text, truthy) would otherwise brighten
    dark frames against the caller's wish, and 0 or None would pass for False unchecked; each
    is a ValueError naming the option, as for the other switches."""
    with pytest.raises(ValueError, match="brighten must be True or False, got"):
        CaptionOptions(brighten=value)
