"""``Caption.confidence`` and ``recognisable``: a frame with nothing in it is said to be so, the
confidence model is read from the model directory and marks captions on the command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edgecap.confidence import SIGNALS, ConfidenceModel, auroc, fit, signals, write
from edgecap.errors import ModelError
from helpers import EXAMPLES, copy_model, hazy_and_blank_frames, run_edgecap, without_optional_files


@pytest.fixture(scope="module")
def captioner():
    from edgecap import Captioner

    return Captioner()


def _blurred(name: str, radius_at_224: float) -> np.ndarray:
    image = Image.open(EXAMPLES / name).convert("RGB")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius_at_224 * max(image.size) / 224)))


def test_blank_and_blurred_frames_are_nothing_recognisable(captioner):
    from edgecap.api import NOTHING_RECOGNISABLE

    rng = np.random.default_rng(0)
    frames = {
        "black": np.zeros((240, 320, 3), np.uint8),
        "white": np.full((240, 320, 3), 255, np.uint8),
        "one colour": np.broadcast_to(np.array([30, 90, 160], np.uint8), (200, 200, 3)),
        "faint noise": np.clip(128 + rng.normal(0, 3, (240, 320, 3)), 0, 255).astype(np.uint8),
        "badly blurred": _blurred("coffee.png", 16),
    }
    results = captioner.caption_batch(list(frames.values()) + [str(EXAMPLES / "chelsea.png")])
    for name, caption in zip(frames, results):
        assert not caption.recognisable and caption.text == NOTHING_RECOGNISABLE, name
        assert caption.tokens == [] and caption.confidence == 0.0
        assert caption.signals is None  # no caption to judge (docs/python-api.md)
    photo = results[-1]  # the photo in the same batch keeps its own caption
    assert photo.recognisable and photo.text == captioner.caption(str(EXAMPLES / "chelsea.png")).text


def test_real_photos_are_recognisable(captioner):
    for path in sorted(EXAMPLES.glob("*.*g")):
        assert captioner.caption(str(path)).recognisable, path
    # a photo blurred a little still is (radius 2 px at 224), and so is a small one scaled up
    assert captioner.caption(_blurred("astronaut.png", 2)).recognisable
    small = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((48, 32))
    assert captioner.caption(np.asarray(small)).recognisable


def test_a_hazy_photo_is_captioned_and_blank_frames_still_are_not(captioner):
    """Fog lowers a photo's contrast, not what is in it: the cat photo 80% and 85% of the way to
    a light grey (a review found foggy dev photos like it "nothing recognisable", captioned well
    with the blank check off) is captioned, a cat, as is the same fog at a fifth of the light.
    Uniform frames, with sensor noise, a gradient and a lens cap with hot pixels still are
    nothing recognisable (tests/helpers.py, ``hazy_and_blank_frames``)."""
    from edgecap.api import NOTHING_RECOGNISABLE

    frames = hazy_and_blank_frames()
    results = dict(zip(frames, captioner.caption_batch(list(frames.values()))))
    for name in ("fog 80%", "fog 85%", "dim, fog 80%"):
        caption = results.pop(name)
        assert caption.recognisable and "cat" in caption.text.split() and caption.confidence > 0, name
    for name, caption in results.items():
        assert not caption.recognisable and caption.text == NOTHING_RECOGNISABLE, name


def _darkened(name: str, factor: float) -> np.ndarray:
    photo = np.asarray(Image.open(EXAMPLES / name).convert("RGB"), dtype=np.float64)
    return np.minimum(np.round(photo * factor), 255).astype(np.uint8)


def test_a_dark_photo_is_brightened_and_captioned_not_flagged(captioner):
    """A dim scene (a photo at a fifth or a twentieth of its light) is brightened as a camera's
    auto-exposure would and captioned: the cat and the rocket launch at x0.05 are "nothing
    recognisable" with brighten=False (at x0.2 they were too, before the blank check's threshold
    for frames as taken came down from 6.4 to 1.5 levels); the astronaut at half its light gets
    the caption of the photo as taken. A lens cap's noise (level 2, 8 levels of standard
    deviation) is brightened too and stays nothing recognisable."""
    from edgecap import Captioner
    from edgecap.api import NOTHING_RECOGNISABLE

    darker = [_darkened("chelsea.png", 0.05), _darkened("rocket.jpg", 0.05)]
    dark = [_darkened("chelsea.png", 0.2), _darkened("rocket.jpg", 0.2), *darker]
    for caption in captioner.caption_batch(dark):
        assert caption.recognisable and caption.text != NOTHING_RECOGNISABLE and caption.confidence > 0
    as_they_are = Captioner(brighten=False)
    assert [c.text for c in as_they_are.caption_batch(darker)] == [NOTHING_RECOGNISABLE] * 2
    half = captioner.caption(_darkened("astronaut.png", 0.5)).text
    assert half == captioner.caption(str(EXAMPLES / "astronaut.png")).text
    rng = np.random.default_rng(1)
    # sensor noise, brightened 8x: at 640x480 the resize averages it; at 320x240 (one value for
    # the three channels) and 224x224 it is too strong for the spread and detail thresholds, and
    # only its ratio tells it from a scene (the review's reproducer: "a person is in the air
    # with a red umbrella" before that rule)
    caps = [
        np.clip(2 + rng.normal(0, 8, (480, 640, 3)), 0, 255),
        np.clip(2 + rng.normal(0, 8, (240, 320, 1)), 0, 255).repeat(3, 2),
        np.clip(2 + rng.normal(0, 4, (224, 224, 3)), 0, 255),
    ]
    for lens_cap in captioner.caption_batch([c.round().astype(np.uint8) for c in caps]):
        assert lens_cap.text == NOTHING_RECOGNISABLE


def test_fine_detail_in_good_light_is_captioned_and_in_a_dim_room_is_not(captioner):
    """The noise rule (mean |Laplacian| over 2.5 times the spread) judges brightened frames
    only (docs/cameras.md, Dark frames): a checkerboard of 4 px squares (ratio 8, as close-ups of
    tiles and text reach) at levels 100 / 180 is not dark, so it is captioned; the same pattern
    at 50 / 90 (brightest level 90, below 128) is brightened x255/90 and then judged as noise."""
    from edgecap.api import NOTHING_RECOGNISABLE

    squares = np.add.outer(np.arange(224) // 4, np.arange(224) // 4) % 2
    bright, dim = ((low + (high - low) * squares).astype(np.uint8) for low, high in ((100, 180), (50, 90)))
    lit, dark = captioner.caption_batch([bright, dim])
    assert lit.recognisable and lit.text != NOTHING_RECOGNISABLE
    assert not dark.recognisable and dark.text == NOTHING_RECOGNISABLE


def test_auroc_and_fit_on_known_cases():
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    # pairs: 0.9 over 0.6 and 0.1, 0.4 over 0.1 only: 3 of 4; two ties of two pairs, half each
    assert auroc([0.9, 0.4, 0.6, 0.1], [True, True, False, False]) == 0.75
    assert auroc([0.5, 0.5, 0.5], [True, True, False]) == 0.5
    for labels in ([True, True], [False, False]):  # no wrong (or no right) caption to rank
        with pytest.raises(ValueError, match="both right and wrong"):
            auroc([0.5, 0.7], labels)
    rng = np.random.default_rng(0)
    informative = rng.normal(size=400)
    noise = rng.normal(size=400)
    y = (informative + 0.3 * rng.normal(size=400)) > 0
    mean, std, w, b = fit(np.stack([noise, informative], 1), y.astype(float))
    assert w[1] > 2.0 and abs(w[0]) < 0.5  # the informative signal carries the model
    model = ConfidenceModel(mean, std, w, b, {})
    assert model.predict([0.0, 2.0]) > 0.95 and model.predict([0.0, -2.0]) < 0.05


def test_signals_from_the_classes_and_the_caption():
    word_ids = ((10,), (11, 12), (13,), ())
    probs = np.array([0.7, 0.2, 0.05, 0.05])
    x = signals([5, 10, 13], -1.25, probs, word_ids)
    got = dict(zip(SIGNALS, x))
    assert got["score"] == -1.25 and got["top_class_prob"] == pytest.approx(0.7)
    assert got["names_a_tag"] == 1.0  # word 10 names the top class (p 0.7 >= 0.1)
    assert got["unsupported_words"] == 0.0  # 13 names a class among the top 5
    assert got["n_words"] == 3.0
    expected_entropy = -sum(p * np.log(p) for p in probs)
    assert got["class_entropy"] == pytest.approx(expected_entropy)
    x = signals([5], -1.0, np.array([0.05, 0.05, 0.45, 0.45]), word_ids)
    assert dict(zip(SIGNALS, x))["names_a_tag"] == 0.0


def _signal(name: str, tokens: list[int], probs, word_ids) -> float:
    return dict(zip(SIGNALS, signals(tokens, -1.0, np.array(probs), word_ids)))[name]


def test_the_confident_tags_are_the_three_most_probable_classes_from_01():
    # the guidance's tags: the 3 most probable classes of at least 0.1 (0.1 itself counts)
    word_ids, probs = ((10,), (11,), (12,), (13,)), [0.5, 0.3, 0.1, 0.1]
    assert _signal("names_a_tag", [12], probs, word_ids) == 1.0  # third, at 0.1
    assert _signal("names_a_tag", [13], probs, word_ids) == 0.0  # fourth


def test_names_a_tag_is_whether_the_caption_names_a_confident_tag_not_how_many():
    # a yes/no signal (the fitted weights assume 0 or 1): a caption naming the words of two
    # confident classes (0.5 and 0.3), or both words of one class, names a tag: 1, not 2
    word_ids, probs = ((10,), (11, 12), (13,)), [0.5, 0.3, 0.2]
    assert _signal("names_a_tag", [10, 11], probs, word_ids) == 1.0
    assert _signal("names_a_tag", [11, 5, 12], probs, word_ids) == 1.0
    assert _signal("names_a_tag", [10, 11, 13], probs, word_ids) == 1.0


def test_an_object_word_is_supported_by_the_five_most_probable_classes():
    word_ids, probs = ((10,), (11,), (12,), (13,), (14,), (15,)), [0.3, 0.25, 0.2, 0.1, 0.1, 0.05]
    assert _signal("unsupported_words", [14], probs, word_ids) == 0.0  # fifth class
    assert _signal("unsupported_words", [14, 15], probs, word_ids) == 1.0  # 15: sixth


def test_a_confidence_is_a_probability_whatever_the_signals():
    # z = score: 1 / (1 + e^-z), z held within +-50 (e^1000 would overflow)
    model = ConfidenceModel(np.zeros(1), np.ones(1), np.ones(1), 0.0, {}, ("score",))
    assert model.predict([1000.0]) == 1.0
    assert model.predict([-1000.0]) == pytest.approx(1 / (1 + np.exp(50.0)))
    assert model.predict([0.0]) == 0.5


def test_fit_keeps_a_constant_signal_out_and_the_bias_unpenalised():
    # a signal the same for every caption carries nothing (weight 0, std taken as 1); the
    # unpenalised bias alone then gives the share of right captions: logit(0.9) = ln 9
    x = np.ones((400, 1))
    y = (np.arange(400) < 360).astype(float)
    mean, std, w, b = fit(x, y)
    assert mean.tolist() == [1.0] and std.tolist() == [1.0] and w.tolist() == [0.0]
    assert b == pytest.approx(np.log(9.0), abs=1e-6)


def test_class_entropy_counts_a_zero_probability_as_nothing():
    # 0 log 0 = 0: a class distribution with exact zeros (a float32 softmax underflows) has a
    # finite entropy: 0 for one sure class, ln 2 for two even ones
    word_ids = ((10,), (11,), (12,))
    assert _signal("class_entropy", [10], [1.0, 0.0, 0.0], word_ids) == 0.0
    assert _signal("class_entropy", [10], [0.5, 0.5, 0.0], word_ids) == pytest.approx(np.log(2.0))


def test_fit_standardises_by_the_mean_and_the_standard_deviation():
    # a signal that is 0 or 4, half and half: mean 2, standard deviation 2 (variance 4); a
    # confidence.json's "std" is what predict divides by
    x = np.array([[0.0], [4.0]] * 100)
    y = np.array([0.0, 1.0] * 100)
    mean, std, _, _ = fit(x, y)
    assert mean.tolist() == [2.0] and std.tolist() == [2.0]


@pytest.mark.parametrize("l2", [1.0, 5.0])
def test_fit_is_the_penalised_likelihood_s_maximum(l2):
    """Signals of other means and spreads (means 2 and -1, standard deviations 3 and 0.5): at
    the weights ``fit`` returns, the gradient of the penalised log-likelihood over the signals
    standardised here (numpy's mean and standard deviation) vanishes, ``l2`` on the weights
    and not on the bias; and ``predict`` is the logistic of that linear model."""
    rng = np.random.default_rng(1)
    x = np.stack([2 + 3 * rng.normal(size=300), -1 + 0.5 * rng.normal(size=300)], 1)
    y = (x[:, 0] / 3 - 2 * x[:, 1] + rng.normal(size=300) > 1).astype(float)
    mean, std, w, b = fit(x, y, l2=l2)
    z = (x - x.mean(0)) / x.std(0)
    p = 1 / (1 + np.exp(-(z @ w + b)))
    assert np.abs(z.T @ (p - y) + l2 * w).max() < 1e-8
    assert abs(np.sum(p - y)) < 1e-8
    model = ConfidenceModel(mean, std, w, b, {})
    assert [model.predict(row) for row in x[:5]] == pytest.approx(p[:5], rel=1e-9)


def test_the_named_tag_and_how_typical_the_photo_is():
    """``named_tag_prob``: the probability of the most probable class the caption names;
    ``typical``: 1 minus the fusion gate's share, and the score and named tag times it."""
    word_ids = ((10,), (11, 12), (13,), ())
    probs = np.array([0.1, 0.6, 0.25, 0.05])
    # says 13 (class 2, 0.25) and 10 (class 0, 0.1): the most probable class it names is class 2
    got = dict(zip(SIGNALS, signals([5, 13, 10], -2.0, probs, word_ids, fusion_share=0.25)))
    assert got["named_tag_prob"] == pytest.approx(0.25)
    assert got["typical"] == pytest.approx(0.75)
    assert got["score_if_typical"] == pytest.approx(-1.5)  # -2.0 * 0.75
    assert got["named_tag_prob_if_typical"] == pytest.approx(0.1875)  # 0.25 * 0.75
    # says 12, the second word of the most probable class (0.6)
    assert dict(zip(SIGNALS, signals([12], -1.0, probs, word_ids)))["named_tag_prob"] == pytest.approx(0.6)
    # names no class: 0; without a gate (share 0) the photo counts as typical
    got = dict(zip(SIGNALS, signals([5, 7], -1.0, probs, word_ids)))
    assert got["named_tag_prob"] == 0.0 and got["typical"] == 1.0 and got["score_if_typical"] == -1.0


def test_the_named_tag_is_found_however_far_down_the_order():
    """The most probable class the caption names, past the five most probable classes too; a
    class whose probability is NaN counts after every number (NaN only when all are)."""
    word_ids = tuple((100 + c,) for c in range(10)) + ((105, 42),)  # class 10 names 105 too
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.01])

    def named(tokens, p=probs):
        return dict(zip(SIGNALS, signals(tokens, -1.0, p, word_ids)))["named_tag_prob"]

    assert named([1, 108]) == 0.02  # class 8, the ninth most probable
    assert named([108, 109, 1]) == 0.02  # classes 8 and 9: the more probable
    assert named([42]) == 0.01  # class 10 alone
    assert named([105, 109]) == 0.06  # 105: classes 5 and 10; 109: class 9
    with_nan = probs.copy()
    with_nan[[5, 8]] = np.nan
    assert named([105, 108, 109], with_nan) == 0.01  # class 5 and 8 NaN: class 9 or 10
    assert np.isnan(named([108], with_nan))


def _model_with_confidence(tmp_path, default_model_dir, bias: float) -> str:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    n = len(SIGNALS)
    write(model, ConfidenceModel(np.zeros(n), np.ones(n), np.zeros(n), bias, {"right": "test"}))
    return str(model)


def test_the_model_directorys_confidence_marks_captions(tmp_path, default_model_dir, capfd):
    from edgecap import Captioner

    sure = _model_with_confidence(tmp_path / "a", default_model_dir, bias=3.0)
    assert Captioner(sure).caption(str(EXAMPLES / "chelsea.png")).confidence == pytest.approx(
        1 / (1 + np.exp(-3.0)), abs=1e-4
    )
    unsure = _model_with_confidence(tmp_path / "b", default_model_dir, bias=-3.0)
    photo = str(EXAMPLES / "chelsea.png")
    run = lambda model, *extra: run_edgecap(capfd, "caption", photo, "--model", model, *extra)  # noqa: E731
    out = run(unsure, "--json", "--min-confidence", "0.5")
    record = json.loads(out.stdout)
    assert record["confidence"] == pytest.approx(0.0474, abs=1e-4) and record["low_confidence"]
    plain = run(unsure, "--min-confidence", "0.5").stdout.rstrip("\n").split("\t")
    assert plain[-1] == "low confidence" and len(plain) == 3
    plain = run(sure, "--min-confidence", "0.5").stdout.rstrip("\n").split("\t")
    assert len(plain) == 2  # not marked


def test_min_confidence_takes_0_to_1_both_ends_and_refuses_outside(tmp_path, default_model_dir, capfd):
    """--min-confidence X marks a caption whose confidence (0-1) is below X: X = 1 marks a
    caption of confidence 0.9526 (bias 3: 1 / (1 + e^-3)), X = 0 marks none; outside 0-1 (nan
    too: it would mark nothing) is a usage error in one line, before anything is captioned."""
    sure = _model_with_confidence(tmp_path, default_model_dir, bias=3.0)
    photo = str(EXAMPLES / "chelsea.png")
    for x, marked in (("1", True), ("0", False)):
        out = run_edgecap(capfd, "caption", photo, "--model", sure, "--json", "--min-confidence", x)
        assert out.returncode == 0, out.stderr
        record = json.loads(out.stdout)
        assert record["confidence"] == pytest.approx(0.9526, abs=1e-4)
        assert record["low_confidence"] is marked, x
    for x in ("1.5", "-0.1", "nan"):
        out = run_edgecap(capfd, "caption", photo, "--model", sure, f"--min-confidence={x}")
        assert (out.returncode, out.stdout) == (2, "")
        assert out.stderr == f"edgecap caption: error: --min-confidence must be between 0 and 1, got {x}\n"


def test_a_confidence_model_over_some_signals_uses_those(tmp_path, default_model_dir):
    """confidence.json names its signals: a model over the caption's length alone gives
    1 / (1 + exp(-(n_words - 10) / 2)) for every caption."""
    from edgecap import Captioner

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    write(model, ConfidenceModel(np.array([10.0]), np.array([2.0]), np.array([1.0]), 0.0, {}, ("n_words",)))
    spec = json.loads((model / "confidence.json").read_text())
    assert spec["signals"] == ["n_words"]
    for caption in Captioner(model).caption_batch(
        [str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "coffee.png")]
    ):
        expected = 1 / (1 + np.exp(-(len(caption.tokens) - 10) / 2))
        assert caption.confidence == pytest.approx(expected, abs=1e-4)


def test_a_confidence_model_reads_its_signals_in_the_order_it_names_them(tmp_path, default_model_dir):
    """confidence.json's signals in an order other than ``SIGNALS``' (the length before the
    score): each weight goes with the signal it names, z = (n_words - 10) / 2 - (score + 1.5) / 0.5."""
    from edgecap import Captioner

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    spec = ConfidenceModel(
        np.array([10.0, -1.5]), np.array([2.0, 0.5]), np.array([1.0, -1.0]), 0.0, {}, ("n_words", "score")
    )
    write(model, spec)
    for caption in Captioner(model).caption_batch([str(EXAMPLES / n) for n in ("chelsea.png", "rocket.jpg")]):
        z = (len(caption.tokens) - 10) / 2 - (caption.score + 1.5) / 0.5
        assert caption.confidence == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-4)


def test_the_fusion_gate_reaches_the_shipped_confidence(captioner):
    """``typical`` is 1 minus the fusion gate's share for the photo: the astronaut looks like the
    training photos and gets no fusion (typical 1), the espresso cup is atypical and fully
    steered (0). The confidences are those the docs show (coffee 0.81 in docs/confidence.md,
    the rocket 0.0869 in docs/service.md: its smoke and sky look a little blurred, under the
    blur penalty's threshold, 0.0932 without the penalty)."""
    got = {}
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        caption = captioner.caption(str(EXAMPLES / name))
        got[name] = (dict(zip(SIGNALS, caption.signals))["typical"], caption.confidence)
    assert got["astronaut.png"][0] == 1.0 and got["coffee.png"][0] == 0.0
    assert got["coffee.png"][1] == pytest.approx(0.81, abs=0.005)
    assert got["rocket.jpg"][1] == pytest.approx(0.0869, abs=0.001)


def test_the_shipped_confidence_model_and_its_signals(captioner):
    """The shipped model reads the signals it names from each caption's full set."""
    model = captioner.confidence_model
    assert model is not None and set(model.names) <= set(SIGNALS)
    caption = captioner.caption(str(EXAMPLES / "coffee.png"))
    got = dict(zip(SIGNALS, caption.signals))
    assert 0.0 <= got["typical"] <= 1.0 and 0.0 <= got["named_tag_prob"] <= got["top_class_prob"]
    assert got["score_if_typical"] == pytest.approx(caption.score * got["typical"])
    expected = model.predict(np.array([got[name] for name in model.names]))
    assert caption.confidence == pytest.approx(expected, abs=1e-4)


def test_a_malformed_confidence_file_is_a_model_error(tmp_path):
    (tmp_path / "confidence.json").write_text(json.dumps({"format": "edgecap-confidence/1"}))
    with pytest.raises(ModelError, match="confidence.json: malformed"):
        ConfidenceModel.load(tmp_path)
    n = len(SIGNALS)
    spec = {
        "format": "edgecap-confidence/1",
        "signals": list(SIGNALS),
        "mean": [0] * n,
        "std": [0] * n,
        "weights": [0] * n,
        "bias": 0,
    }
    (tmp_path / "confidence.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="std must be positive"):
        ConfidenceModel.load(tmp_path)
    for signals_, match in (
        (["score", "no such signal"], "signals must be some of"),
        (["score"], "1 numbers each"),
    ):
        (tmp_path / "confidence.json").write_text(json.dumps({**spec, "signals": signals_, "std": [1] * n}))
        with pytest.raises(ModelError, match=match):
            ConfidenceModel.load(tmp_path)
    assert ConfidenceModel.load(tmp_path / "none") is None


@pytest.mark.parametrize(
    "change, match",
    [
        ({"signals": ["score", "score"]}, "each once"),
        ({"signals": [], "mean": [], "std": [], "weights": []}, "signals must be some of"),
        ({"weights": [float("nan"), 0.0]}, "2 numbers each"),
        ({"mean": [0.0, float("inf")]}, "2 numbers each"),
        ({"bias": float("nan")}, "bias must be a number"),
        ({"bias": float("-inf")}, "bias must be a number"),
        # one signal's std 0 among positive ones: predict would divide by 0
        ({"std": [1.0, 0.0]}, "std must be positive"),
        # another format (a file of something else, an older version) is not read as /1
        ({"format": "edgecap-confidence/0"}, r"not an edgecap-confidence/1 file"),
        ({"format": "edgecap-fusion/1"}, r"not an edgecap-confidence/1 file"),
        ({"format": None}, r"not an edgecap-confidence/1 file"),
        # the fusion weight its captions were searched at: a weight CaptionOptions takes (0-2)
        ({"fusion_weight": -0.5}, r"fusion_weight must be a number in \[0, 2\]"),
        ({"fusion_weight": 2.5}, r"fusion_weight must be a number in \[0, 2\]"),
        ({"fusion_weight": float("nan")}, r"fusion_weight must be a number"),
        ({"fusion_weight": "0.7"}, r"fusion_weight must be a number"),
        ({"fusion_weight": True}, r"fusion_weight must be a number"),
        # the blur penalty: a below and a weight >= 0, numbers, nothing else
        ({"blur_penalty": {"below": -3.0}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": -3.0, "weight": 1.0, "above": 0}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": -3.0, "weight": -1.0}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": float("nan"), "weight": 1.0}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": -3.0, "weight": float("inf")}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": True, "weight": 1.0}}, "blur_penalty must be"),
        ({"blur_penalty": {"below": "-3", "weight": 1.0}}, "blur_penalty must be"),
        ({"blur_penalty": [-3.0, 1.0]}, "blur_penalty must be"),
        # an integer past a float's range (JSON allows it; Python reads it whole): not an
        # OverflowError out of the load, but the file named as malformed
        ({"blur_penalty": {"below": -3.0, "weight": 10**400}}, "confidence.json: malformed"),
        ({"blur_penalty": {"below": -(10**400), "weight": 1.0}}, "confidence.json: malformed"),
        ({"bias": 10**400}, "confidence.json: malformed"),
        ({"mean": [0.0, 10**400]}, "confidence.json: malformed"),
    ],
)
def test_a_confidence_file_with_a_repeated_signal_a_bad_number_or_another_format_is_a_model_error(
    tmp_path, change, match
):
    # json.dumps writes NaN and Infinity, and json.loads reads them back: a number that is none
    spec = {
        "format": "edgecap-confidence/1",
        "signals": ["score", "n_words"],
        "mean": [0.0, 0.0],
        "std": [1.0, 1.0],
        "weights": [0.0, 0.0],
        "bias": 0.0,
    }
    (tmp_path / "confidence.json").write_text(json.dumps(spec))
    assert ConfidenceModel.load(tmp_path).names == ("score", "n_words")
    for weight in (0, 2):  # the ends of [0, 2] are fusion weights
        (tmp_path / "confidence.json").write_text(json.dumps({**spec, "fusion_weight": weight}))
        assert ConfidenceModel.load(tmp_path).unrated(weight, 0.7) is None
    (tmp_path / "confidence.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(ModelError, match=match):
        ConfidenceModel.load(tmp_path)


@pytest.mark.parametrize("version", ["2", "10"])
def test_a_confidence_file_of_a_newer_format_says_to_upgrade_edgecap(tmp_path, version):
    """A model folder from a newer edgecap, its confidence.json "edgecap-confidence/2": it was
    called a "malformed confidence model (not an edgecap-confidence/1 file)", which the user can
    neither mend nor re-make. Now it says that a newer edgecap made it, as the manifest does."""
    found = f"edgecap-confidence/{version}"
    (tmp_path / "confidence.json").write_text(json.dumps({"format": found, "signals": "changed"}))
    with pytest.raises(ModelError) as caught:
        ConfidenceModel.load(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'confidence.json'}: made by a newer edgecap (format {found!r}; this edgecap "
        "reads edgecap-confidence/1); upgrade edgecap"
    )


def test_min_confidence_on_a_model_without_confidence_is_a_usage_error(tmp_path, default_model_dir, capsys):
    """Marking nothing would let every caption through a filter that cannot work."""
    from edgecap.cli import main

    model = tmp_path / "model"
    without_optional_files(copy_model(default_model_dir, model), "confidence")
    photo = str(EXAMPLES / "chelsea.png")
    for x in ("0.5", "0"):  # 0 too: however low, a threshold on a confidence that is never there
        assert main(["caption", photo, "--model", str(model), "--min-confidence", x]) == 2
        err = capsys.readouterr().err
        assert "--min-confidence" in err and "confidence.json" in err and "Traceback" not in err
    assert main(["caption", photo, "--model", str(model), "--json"]) == 0  # without the flag: fine
    assert json.loads(capsys.readouterr().out)["confidence"] is None


@pytest.mark.parametrize("penalty", [0.6, 1.4])
def test_a_length_penalty_leaves_the_signals_per_word_and_the_confidence_of_a_caption(captioner, penalty):
    """The confidence model was fitted on mean log-probabilities per word (docs/confidence.md):
    with a GNMT length penalty the caption's ``score`` is ranked on another scale, but its
    signals are still per word, so the cat's caption ("a cat laying on a bed", six words and
    the end) has the confidence it has without the penalty (0.9223), not one from a score
    ((5 + 7) / 6) ** penalty / 7 times as large."""
    from edgecap import Captioner

    photo = str(EXAMPLES / "chelsea.png")
    plain = captioner.caption(photo)
    penalised = Captioner(length_penalty=penalty).caption(photo)
    assert penalised.text == plain.text == "a cat laying on a bed"
    got = dict(zip(SIGNALS, penalised.signals))
    assert got["score"] == pytest.approx(penalised.log_prob / 7)
    assert got["rank_score"] == pytest.approx(dict(zip(SIGNALS, plain.signals))["rank_score"])
    assert penalised.confidence == pytest.approx(plain.confidence, abs=1e-4)


def test_a_caption_the_length_cap_cut_has_no_confidence(default_model_dir):
    """--max-length 1 cuts the astronaut's caption to one word, which is no sentence."""
    from edgecap import Captioner

    photo = str(EXAMPLES / "astronaut.png")
    cut = Captioner(default_model_dir, max_length=1).caption(photo)
    assert len(cut.tokens) == 1 and cut.confidence == 0.0
    whole = Captioner(default_model_dir).caption(photo)
    assert len(whole.tokens) > 5 and 0 < whole.confidence < 1


def test_a_signal_that_is_not_a_number_gives_no_confidence_not_certainty():
    """min(50, nan) is 50 in Python: a NaN signal read as z = 50, confidence 1.0."""
    model = ConfidenceModel(np.zeros(2), np.ones(2), np.ones(2), 0.0, {}, ("score", "class_entropy"))
    assert model.predict([-1.0, float("nan")]) == 0.0
    assert model.predict([float("nan"), float("nan")]) == 0.0


def test_class_probabilities_with_nan_do_not_make_a_caption_certain(default_model_dir):
    """An encoder out of range (FP16) gives NaN class probabilities; without the everyday
    language model (whose gate would refuse them) the caption is still made, and its class
    entropy is NaN: its confidence was 1.0, the most a caption can have."""
    from edgecap import Captioner

    captioner = Captioner(default_model_dir, fusion_weight=0)
    encode = captioner.backend.encode

    def with_nan(images):
        encoded = encode(images)
        probs = encoded.class_probs.copy()
        probs[:, :3] = np.nan
        encoded.class_probs = probs
        return encoded

    captioner.backend.encode = with_nan
    caption = captioner.caption(str(EXAMPLES / "rocket.jpg"))
    assert np.isnan(dict(zip(SIGNALS, caption.signals))["class_entropy"])
    assert caption.confidence == 0.0


def test_the_score_is_the_models_own_mean_log_probability_the_end_counted(captioner):
    """docs/python-api.md: ``score`` is ``log_prob / (len(tokens) + 1)``, ``log_prob`` the sum of
    the step's own log-probabilities of the words and of the end, fed one at a time (the tag
    bonus and the language models steer the search, not these numbers). "cat" is not among the
    step's top K after "a" without a bias: a bias on the word alone brings it there."""
    photo = str(EXAMPLES / "chelsea.png")
    caption = captioner.caption(photo)
    vocab = captioner.vocab
    ids = [vocab.words.index(w) for w in caption.tokens] + [vocab.end]
    x = captioner._prepare(photo, "rgb").x
    session = captioner.backend.start(captioner.backend.encode(x[None]), np.zeros(1, np.int32))
    total, previous = 0.0, vocab.start
    for word in ids:
        bias = np.zeros((1, len(vocab)), np.float32)
        bias[0, word] = 100.0  # into the top K; the log-probabilities returned are unbiased
        step = session.step(np.array([previous], np.int32), np.zeros(1, np.int32), bias)
        (k,) = np.flatnonzero(step.topk_ids[0] == word)
        total += float(step.topk_logprobs[0, k])
        previous = word
    assert caption.log_prob == pytest.approx(total, abs=1e-4)
    assert caption.score == pytest.approx(total / (len(caption.tokens) + 1), abs=1e-5)


def test_a_model_without_confidence_gives_none_for_a_blank_frame_too(tmp_path, default_model_dir):
    """A model directory without confidence.json gives no confidence (None, JSON null) for
    every caption, a blank frame's "nothing recognisable" too: it had been 0.0 there, a number
    where the model has none; with confidence.json a blank frame's is 0."""
    from edgecap import Captioner

    model = tmp_path / "model"
    without_optional_files(copy_model(default_model_dir, model), "confidence")
    black = np.zeros((64, 64, 3), np.uint8)
    photo, blank = Captioner(model).caption_batch([str(EXAMPLES / "chelsea.png"), black])
    assert photo.recognisable and photo.confidence is None
    assert not blank.recognisable and blank.confidence is None
    assert Captioner(default_model_dir).caption(black).confidence == 0.0


def test_captions_of_a_fusion_weight_above_the_confidence_models_are_not_rated(tmp_path, default_model_dir):
    """The shipped confidence model was fitted on captions of the model's own fusion weight (0.7,
    fusion.json). Above it the confidence ranked wrong captions above right ones (weight 1.4:
    AUROC 0.415, mean confidence 0.68 against 0.26 right, on the 160 everyday dev photos;
    docs/confidence.md): no confidence (None) there, the signals still given, a blank frame's too;
    at that weight or below, rated. A confidence.json that names the weight its captions had is
    rated up to that weight."""
    from edgecap import Captioner

    photo, black = str(EXAMPLES / "chelsea.png"), np.zeros((64, 64, 3), np.uint8)
    for weight in (None, 0.0, 0.35, 0.7):
        captioner = Captioner(default_model_dir, fusion_weight=weight)
        caption, blank = captioner.caption_batch([photo, black])
        assert captioner.unrated is None and 0 < caption.confidence < 1 and blank.confidence == 0.0, weight
    captioner = Captioner(default_model_dir, fusion_weight=1.4)
    caption, blank = captioner.caption_batch([photo, black])
    assert caption.confidence is None and blank.confidence is None
    assert caption.signals is not None and len(caption.signals) == len(SIGNALS)
    assert captioner.unrated == (
        "its confidence model (confidence.json) rates captions of fusion weight 0.7 or less, not 1.4"
    )
    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    spec = json.loads((model / "confidence.json").read_text())
    (model / "confidence.json").write_text(json.dumps({**spec, "fusion_weight": 1.5}))
    assert Captioner(model, fusion_weight=1.4).caption(photo).confidence is not None
    assert Captioner(model, fusion_weight=1.6).caption(photo).confidence is None


def test_a_copy_given_another_fusion_weight_is_rated_by_that_weight(default_model_dir):
    """``copy.copy(captioner)`` with other options (docs/python-api.md: as the benchmarks run
    them): whether its captions are rated follows its own fusion weight. Decided once when the
    Captioner was made, a copy at weight 2 had rated its captions (the cat photo "a living room
    filled with furniture and a toilet", confidence 0.998), and a copy of one made at 2 brought
    back to the model's own had none."""
    import copy
    import dataclasses

    from edgecap import Captioner

    photo = str(EXAMPLES / "chelsea.png")
    own = Captioner(default_model_dir)
    above = copy.copy(own)
    above.options = dataclasses.replace(own.options, fusion_weight=2.0)
    assert above.caption(photo).confidence is None and above.confidence_model is None
    assert above.unrated == (
        "its confidence model (confidence.json) rates captions of fusion weight 0.7 or less, not 2"
    )
    assert own.unrated is None and own.caption(photo).confidence is not None
    back = copy.copy(Captioner(default_model_dir, fusion_weight=2.0))
    back.options = dataclasses.replace(back.options, fusion_weight=None)
    assert back.unrated is None and back.caption(photo).confidence is not None


def test_a_written_confidence_model_is_named_in_the_models_manifest(tmp_path, default_model_dir):
    """``write`` (``confidence_fit.py --write MODEL_DIR``) into a model without a confidence
    model: its manifest names confidence.json afterwards, the rest as it was, so that a copy of
    the folder without it is refused rather than giving no confidence without a word. A folder
    without a manifest gets the file alone."""
    from edgecap.manifest import load_manifest

    model = without_optional_files(copy_model(default_model_dir, tmp_path / "model"), "confidence")
    before = json.loads((model / "manifest.json").read_text())
    assert "confidence" not in before["files"]
    write(model, ConfidenceModel(np.zeros(1), np.ones(1), np.ones(1), 0.0, {}, ("n_words",)))
    after = json.loads((model / "manifest.json").read_text())
    assert after == {**before, "files": {**before["files"], "confidence": "confidence.json"}}
    (model / "confidence.json").unlink()
    with pytest.raises(ModelError, match=r"confidence.json is missing: .*copy the whole model directory"):
        load_manifest(model)
    bare = tmp_path / "bare"
    bare.mkdir()
    write(bare, ConfidenceModel(np.zeros(1), np.ones(1), np.ones(1), 0.0, {}, ("n_words",)))
    assert sorted(p.name for p in bare.iterdir()) == ["confidence.json"]


def test_a_confidence_model_written_into_a_folder_of_links_leaves_the_linked_model_as_it_was(
    tmp_path, default_model_dir
):
    """``write`` into a folder of links to another model's files (a model store, ``cp -rs``):
    that folder's manifest names confidence.json (a manifest of its own, the link replaced),
    and the linked model's manifest is left as it was: rewritten through the link, it had named
    a confidence.json its folder does not have, and that model was refused."""
    from edgecap.manifest import load_manifest

    store = without_optional_files(copy_model(default_model_dir, tmp_path / "store"), "confidence")
    before = (store / "manifest.json").read_bytes()
    links = tmp_path / "links"
    links.mkdir()
    for path in store.iterdir():
        (links / path.name).symlink_to(path)
    write(links, ConfidenceModel(np.zeros(1), np.ones(1), np.ones(1), 0.0, {}, ("n_words",)))
    assert (store / "manifest.json").read_bytes() == before
    assert "confidence" not in load_manifest(store).files  # the store's model loads as before
    assert not (links / "manifest.json").is_symlink()
    assert load_manifest(links).files["confidence"] == "confidence.json"
    names = sorted([*(p.name for p in store.iterdir()), "confidence.json"])
    assert sorted(p.name for p in links.iterdir()) == names  # nothing else left there


def test_a_confidence_model_written_into_a_folder_of_links_replaces_the_link_not_the_linked_file(
    tmp_path, default_model_dir
):
    """``write`` (``confidence_fit.py --write``) into a folder of links to another model's files
    where confidence.json is one of the links: the folder gets a confidence.json of its own (the
    link replaced by the file), and the linked model keeps its own, byte for byte (was: written
    through the link, the other model rated its captions with the new confidence model)."""
    store = copy_model(default_model_dir, tmp_path / "store")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    links = tmp_path / "links"
    links.mkdir()
    for path in store.iterdir():
        (links / path.name).symlink_to(path)
    new = ConfidenceModel(np.array([10.0]), np.array([2.0]), np.array([1.0]), 0.0, {}, ("n_words",))
    assert write(links, new) == links / "confidence.json"
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert not (links / "confidence.json").is_symlink()
    assert ConfidenceModel.load(links).names == ("n_words",)
    assert ConfidenceModel.load(store).names == tuple(json.loads(before["confidence.json"])["signals"])
    assert sorted(p.name for p in links.iterdir()) == sorted(before)  # nothing else left there
    assert sorted(p.name for p in links.iterdir() if not p.is_symlink()) == ["confidence.json"]


def test_a_written_confidence_model_keeps_the_fusion_weight_it_was_fitted_at(tmp_path):
    """``confidence_fit.py --write`` puts the captions' fusion weight in the model's ``info``:
    written and read back, the file still says it, so captions up to that weight are rated and
    above it are not (docs/confidence.md); lost, the file would read as fitted at the model's
    own weight."""
    names = ("score", "n_words")
    info = {"right": 0.35, "fusion_weight": 1.4}
    write(tmp_path, ConfidenceModel(np.zeros(2), np.ones(2), np.array([0.5, -0.25]), 0.125, info, names))
    assert json.loads((tmp_path / "confidence.json").read_text())["fusion_weight"] == 1.4
    loaded = ConfidenceModel.load(tmp_path)
    assert loaded.info == info and loaded.names == names and loaded.bias == 0.125
    assert loaded.unrated(1.4, own_weight=0.7) is None
    assert loaded.unrated(1.5, own_weight=0.7) == (
        "its confidence model (confidence.json) rates captions of fusion weight 1.4 or less, not 1.5"
    )


def test_pinning_the_fusion_weight_writes_it_only_where_the_file_names_none(tmp_path):
    """Installing language models writes the model's earlier fusion weight into a
    confidence.json that names none (``pin_fusion_weight``). A file that names its own weight
    (fitted with ``--decoding fusion_weight=X``) keeps it, byte for byte; a file that is not a
    JSON object is left to the Captioner to refuse, and a model without one gets none."""
    from edgecap.confidence import pin_fusion_weight

    path = tmp_path / "confidence.json"
    spec = {
        "format": "edgecap-confidence/1",
        "signals": ["score"],
        "mean": [0.0],
        "std": [1.0],
        "weights": [1.0],
        "bias": 0.0,
    }
    path.write_text(json.dumps({**spec, "fusion_weight": 0.35}))
    before = path.read_bytes()
    pin_fusion_weight(tmp_path, 0.7)
    assert path.read_bytes() == before
    assert ConfidenceModel.load(tmp_path).unrated(0.7, own_weight=0.7) is not None
    path.write_text(json.dumps(spec))
    pin_fusion_weight(tmp_path, 0.7)
    assert json.loads(path.read_text()) == {**spec, "fusion_weight": 0.7}
    for text in ("[1, 2]", '"fusion_weight"'):
        path.write_text(text)
        pin_fusion_weight(tmp_path, 0.7)
        assert path.read_text() == text
    path.unlink()
    pin_fusion_weight(tmp_path, 0.7)
    assert not path.exists()


def test_min_confidence_at_a_fusion_weight_the_confidence_does_not_rate_is_a_usage_error(
    default_model_dir, capsys
):
    from edgecap.cli import main

    photo = str(EXAMPLES / "chelsea.png")
    assert main(["caption", photo, "--fusion-weight", "1.4", "--min-confidence", "0.5"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"edgecap caption: error: --min-confidence: the model {default_model_dir}: its confidence "
        "model (confidence.json) rates captions of fusion weight 0.7 or less, not 1.4 "
        "(--fusion-weight), so its captions have no confidence to compare\n"
    )
    assert main(["caption", photo, "--fusion-weight", "0.7", "--min-confidence", "0.5", "--json"]) == 0
    assert "low_confidence" in json.loads(capsys.readouterr().out)


# -- the blur penalty: blurred frames' captions are right far less often than their signals say --
def test_blurriness_by_hand():
    """A ramp along the rows (level 2 x column, 8 x 8): central differences 4 along the rows, 0
    down the columns, so the structure tensor's axes are 16 and 0; its least directional detail
    is down the columns, 0; its spread that of 0, 2, ..., 14. A uniform frame: every term 0."""
    from edgecap.preprocess import BLUR_EPSILON, blurriness

    ramp = np.tile(np.arange(8.0) * 2, (8, 1))
    spread = np.std(np.arange(8.0) * 2)
    expected = np.log(BLUR_EPSILON / (16 + BLUR_EPSILON)) + np.log(BLUR_EPSILON / (spread + BLUR_EPSILON))
    assert blurriness(ramp) == pytest.approx(expected, rel=1e-12)
    assert blurriness(ramp.T) == pytest.approx(expected, rel=1e-12)  # the same ramp down the columns
    assert blurriness(np.full((8, 8), 100.0)) == pytest.approx(0.0, abs=1e-12)
    # a batch (..., H, W) gives one value each
    assert blurriness(np.stack([ramp, ramp.T])) == pytest.approx([expected, expected], rel=1e-12)


def test_blurriness_by_hand_where_a_diagonal_has_the_least_detail():
    """Levels 3 x column - 2 x row (8 x 8): differences 3 along the rows, 2 down the columns, 1
    along the diagonal (1 / sqrt 2 per pixel of distance) and 5 along the anti-diagonal (5 /
    sqrt 2): the least detail is the diagonal's. Central differences 6 and -4: the structure
    tensor's entries 36, 16 and -24, its axes 52 and 0. Levels 3 x column + 2 x row: the same
    with the diagonals swapped."""
    from edgecap.preprocess import BLUR_EPSILON, blurriness

    rows, columns = np.mgrid[0:8, 0:8].astype(np.float64)
    for grey in (3 * columns - 2 * rows, 3 * columns + 2 * rows):
        least = 1 / np.sqrt(2)
        expected = np.log(BLUR_EPSILON / (52 + BLUR_EPSILON)) + np.log(
            (least + BLUR_EPSILON) / (np.std(grey) + BLUR_EPSILON)
        )
        assert blurriness(grey) == pytest.approx(expected, rel=1e-12)


def test_a_fine_grating_at_an_angle_has_a_finite_blurriness_on_either_side():
    """A sinusoidal grating of full contrast (detail in one direction only, as motion blur leaves
    a frame, at its most): the structure tensor's weaker axis is 0, but in float32 its strong axis
    (about 2e4 levels squared) less the half-difference rounds to below -BLUR_EPSILON, and its log
    was NaN (numpy at these angles, torch at others), which made the caption's confidence 0
    however its signals stood. Each is finite, far under the shipped ``below``, on both sides."""
    from edgecap.preprocess import blurriness

    torch = pytest.importorskip("torch")
    rows, columns = np.mgrid[0:224, 0:224].astype(np.float64)
    for angle, frequency in ((2.7958, 2.4689), (1.0, 2.0), (np.pi / 3, 2.0), (np.pi / 6, 2.5)):
        phase = frequency * (np.cos(angle) * columns + np.sin(angle) * rows)
        grey = (127.5 + 127.5 * np.sin(phase)).astype(np.float32)
        on_host, on_device = float(blurriness(grey)), float(blurriness(torch.from_numpy(grey), torch))
        assert np.isfinite(on_host) and np.isfinite(on_device), (angle, on_host, on_device)
        # (the weak axis is rounding on either side, so they need not agree: both far under)
        assert on_host < -10 and on_device < -10


def _motion_blurred(image: np.ndarray, length: int, axis: int) -> np.ndarray:
    """``image`` (H, W, 3) blurred by ``length`` px of motion along ``axis`` (0: down the
    columns, 1: along the rows), edges repeated."""
    lines = np.moveaxis(image.astype(np.float64), axis, 1)
    pad = ((0, 0), (length // 2, length - 1 - length // 2), (0, 0))
    sums = np.cumsum(np.pad(lines, pad, mode="edge"), axis=1)
    sums = np.concatenate([np.zeros_like(sums[:, :1]), sums], axis=1)
    return np.round(np.moveaxis((sums[:, length:] - sums[:, :-length]) / length, 1, axis)).astype(np.uint8)


def test_a_frame_blurred_by_motion_looks_blurrier_than_itself_sharp(captioner):
    """The example photos at the encoder's size: 40 px of motion along the rows or down the
    columns takes ``frame_blurriness`` down by more than 0.5; the exposure halved moves it by
    under 0.05."""
    from edgecap.preprocess import frame_blurriness, model_input

    pre = captioner.manifest.preprocessing
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        photo = np.asarray(Image.open(EXAMPLES / name).convert("RGB"))

        def measured(frame):
            return frame_blurriness(model_input(Image.fromarray(frame), pre, False)[0], pre)

        sharp = measured(photo)
        for axis in (0, 1):
            assert measured(_motion_blurred(photo, 40, axis)) < sharp - 0.5, (name, axis)
        assert measured((photo // 2).astype(np.uint8)) == pytest.approx(sharp, abs=0.05)


def test_the_blur_penalty_takes_its_weight_times_the_shortfall_off_the_logit():
    """A model of bias 0 alone says 0.5 for every caption; with a penalty (below -3, weight 2) a
    frame of blurriness -4 loses 2 from its logit: 1 / (1 + e^2); one over -3, or not
    measured, nothing."""
    model = ConfidenceModel(np.zeros(1), np.ones(1), np.zeros(1), 0.0, {}, ("score",), blur=(-3.0, 2.0))
    assert model.predict(np.zeros(1), -4.0) == pytest.approx(1 / (1 + np.e**2), rel=1e-12)
    assert model.predict(np.zeros(1), -2.5) == 0.5
    assert model.predict(np.zeros(1)) == 0.5
    assert model.predict(np.zeros(1), -3.0) == 0.5
    assert (
        ConfidenceModel(np.zeros(1), np.ones(1), np.zeros(1), 0.0, {}, ("score",)).predict(np.zeros(1), -9)
        == 0.5
    )


def test_a_blur_penalty_is_written_and_read_back(tmp_path):
    model = ConfidenceModel(
        np.zeros(2), np.ones(2), np.ones(2), 0.5, {"right": "x"}, ("score", "n_words"), (-3.5, 0.7)
    )
    write(tmp_path, model)
    spec = json.loads((tmp_path / "confidence.json").read_text())
    assert spec["blur_penalty"] == {"below": -3.5, "weight": 0.7} and spec["right"] == "x"
    loaded = ConfidenceModel.load(tmp_path)
    assert loaded.blur == (-3.5, 0.7) and loaded.info == {"right": "x"}


def test_a_captioner_takes_its_models_blur_penalty(tmp_path, default_model_dir):
    """The shipped signals model with a penalty that every frame is under (below 10, weight 1):
    each caption's confidence is the one without, its logit less (10 - the frame's
    blurriness); weight 0 changes nothing. The photos as given, and one blurred by motion."""
    from edgecap import Captioner
    from edgecap.preprocess import frame_blurriness, model_input

    shipped = ConfidenceModel.load(default_model_dir)
    assert shipped is not None
    cat = np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))
    frames = [
        cat,
        _motion_blurred(cat, 30, 1),
        np.asarray(Image.open(EXAMPLES / "coffee.png").convert("RGB")),
    ]
    without = tmp_path / "without"  # the shipped model may have a penalty of its own
    shutil.copytree(default_model_dir, without)
    write(
        without, ConfidenceModel(shipped.mean, shipped.std, shipped.weights, shipped.bias, {}, shipped.names)
    )
    plain = Captioner(without).caption_batch(frames)
    for weight in (0.0, 1.0):
        model = tmp_path / f"weight{weight}"
        shutil.copytree(default_model_dir, model)
        write(
            model,
            ConfidenceModel(
                shipped.mean, shipped.std, shipped.weights, shipped.bias, {}, shipped.names, (10.0, weight)
            ),
        )
        captioner = Captioner(model)
        pre = captioner.manifest.preprocessing
        for frame, before, after in zip(frames, plain, captioner.caption_batch(frames)):
            assert after.text == before.text
            b = frame_blurriness(model_input(Image.fromarray(frame), pre, True)[0], pre)
            logit = np.log(before.confidence / (1 - before.confidence))
            expected = 1 / (1 + np.exp(-(logit + weight * (b - 10.0))))
            assert after.confidence == pytest.approx(expected, abs=2e-4)
            assert (after.confidence < before.confidence) == (weight > 0)
            for alt_before, alt_after in zip(before.alternatives, after.alternatives, strict=True):
                alt_logit = np.log(alt_before.confidence / (1 - alt_before.confidence))
                alt_expected = 1 / (1 + np.exp(-(alt_logit + weight * (b - 10.0))))
                assert alt_after.confidence == pytest.approx(alt_expected, abs=2e-4)
