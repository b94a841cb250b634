"""How far a caption can be trusted: ``Caption.confidence``, a probability in [0, 1] that the
caption is right, from what the model already knows about it.

Signals (``signals``): the caption's mean log-probability per word (its score), the encoder's
most probable class and the entropy of its class distribution (a photo the classifier knows
well, or one it cannot place), whether the caption names one of the photo's confident tags and
the probability of the most probable class it names (``named_tag_prob``: 0 when it names none),
how many of its object words no tag supports (the Flickr8k model invents dogs and people), its
length, the score the search ranked it by, how like the training photos the photo looks (the
fusion gate's typicality, where the model has one: ``edgecap.decoding.fusion``) and ``typical``,
1 minus the gate's share of the fusion weight (1: a photo like the training photos, 0: one the
everyday language model fully steers; 1 without a gate), and the products of ``typical`` with
the score and with ``named_tag_prob``. The products let one logistic model weigh the signals
differently on the two kinds of photo: on photos like Flickr8k's the caption model's own score
tracks whether the caption is right, on everyday photos it does not (its AUROC there is 0.475)
while the tag the caption names does.

A logistic model over some of the signals, fitted on dev photos (``benchmarks/confidence_fit.py``),
ships with a model directory as ``confidence.json``, naming the signals it uses; without one
``confidence`` is None. The shipped one uses all of them (docs/confidence.md has why, and what
was tried).

Blurred frames: the signals come from the search, which is as sure of itself on a frame blurred
by motion as on a sharp one, while its captions are right far less often (Flickr8k dev, 25 px:
9% right for a mean confidence of 0.28 from the signals alone). A model may carry a blur
penalty (``blur_penalty`` in its file: ``below``, ``weight``): a frame whose
``edgecap.preprocess.blurriness`` is under ``below`` has ``weight`` times the shortfall taken off
its logit, and a frame over it nothing, so the signals' fit on photos as taken stands for them
(``benchmarks/confidence_degraded.py`` fits and measures it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecap.contract import CONFIDENCE, OPTIONAL_FILES
from edgecap.decoding.options import RANGES
from edgecap.errors import ModelError
from edgecap.objects import top_classes

CONFIDENCE_FILE = OPTIONAL_FILES[CONFIDENCE]  # confidence.json
# the fusion weight of the captions a confidence model was fitted on (its file's key; absent: the
# model's own weight, from its fusion.json)
FITTED_FUSION_WEIGHT = "fusion_weight"
FORMAT = "edgecap-confidence/1"
BLUR_PENALTY = "blur_penalty"  # its file's key: {"below": blurriness, "weight": per unit under it}
SIGNALS = (
    "score",
    "rank_score",
    "top_class_prob",
    "class_entropy",
    "names_a_tag",
    "unsupported_words",
    "n_words",
    "typicality",
    "named_tag_prob",
    "typical",
    "score_if_typical",
    "named_tag_prob_if_typical",
)
TAG_MIN_PROB = 0.1  # a tag is "confident" from this probability (the guidance threshold)
SUPPORT_TAGS = 5  # the tags whose words count as support for an object word


def signals(
    tokens: list[int],
    score: float,
    probs: np.ndarray,
    word_ids,
    rank_score: float | None = None,
    typicality: float = 0.0,
    objects: Mapping[int, Sequence[int]] | None = None,
    fusion_share: float = 0.0,
    best=None,
) -> np.ndarray:
    """One caption's signals, float64 (len(SIGNALS),). ``tokens``: its word ids; ``score``:
    its mean log-probability; ``rank_score``: what the search ranked it by (with the tag bonus
    and the fused language models; None: ``score``); ``probs`` (C,): the photo's class
    probabilities; ``word_ids``: per class, its caption word ids (``ObjectClasses.word_ids``);
    ``typicality``: how like the training photos the photo looks (``fusion.Gate.typicality``; 0
    without a gate); ``objects``: ``object_words(word_ids)`` (computed here when None: a
    caller with many captions computes it once);
    ``fusion_share``: the gate's share of the fusion weight for the photo (``fusion.Gate``; 0
    without a gate); ``best``: ``top_classes(probs, k)`` for some k >= ``SUPPORT_TAGS``, already
    computed (a caller with a batch computes them at once: ``top_classes_rows``), or None."""
    # the most probable classes, best first (of the probabilities as given: float64 keeps
    # float32's order and ties)
    first = (top_classes(probs, SUPPORT_TAGS) if best is None else np.asarray(best)[:SUPPORT_TAGS]).tolist()
    probs = np.asarray(probs, np.float64)
    top = probs[first].tolist()
    confident = {w for c, p in zip(first[:3], top) if p >= TAG_MIN_PROB for w in word_ids[c]}
    supported = {w for c in first for w in word_ids[c]}
    if objects is None:
        objects = object_words(word_ids)
    said = set(tokens)
    said_objects = said.intersection(objects)
    entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum())
    # the most probable class whose words the caption says (ties: the first class; NaN last)
    named = 0.0
    if said_objects:
        # fmax passes over NaN, as the order puts it last; NaN only when all are
        named = float(np.fmax.reduce(probs[[c for w in said_objects for c in objects[w]]]))
    typical = 1.0 - float(fusion_share)
    return np.array(
        [
            score,
            score if rank_score is None else rank_score,
            top[0],
            entropy,
            float(bool(said & confident)),
            float(len(said_objects - supported)),
            float(len(tokens)),
            typicality,
            named,
            typical,
            score * typical,
            named * typical,
        ]
    )


def object_words(word_ids) -> dict[int, tuple[int, ...]]:
    """Every word that names some class (``word_ids``: per class, its caption word ids), the
    caption's object words, each with the classes it names (in class order). Computed once per
    model by its caller."""
    classes: dict[int, list[int]] = {}
    for c, ids in enumerate(word_ids):
        for w in dict.fromkeys(ids):
            classes.setdefault(w, []).append(c)
    return {w: tuple(cs) for w, cs in classes.items()}


@dataclass(frozen=True)
class ConfidenceModel:
    """A logistic model over standardised signals: ``names``, some of ``SIGNALS`` (all of them
    by default), in the order of ``mean``, ``std`` and ``weights``; ``blur``: its blur penalty
    (below, weight), or None (see the module docstring)."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    info: dict
    names: tuple[str, ...] = SIGNALS
    blur: tuple[float, float] | None = None

    def predict(self, x: np.ndarray, blurriness: float | None = None) -> float:
        """``x``: the model's own signals (``names``), in its order; ``blurriness``: the frame's
        (``edgecap.preprocess.blurriness``), for the blur penalty (None: none taken). A signal
        that is not a number (class probabilities with NaN in them, from an encoder out of range)
        gives 0: nothing the model was fitted on, and no reason to trust the caption."""
        z = float(((np.asarray(x) - self.mean) / self.std) @ self.weights + self.bias)
        z += self.penalty(blurriness)
        if math.isnan(z):  # min(50.0, nan) is 50.0: it would read as certainty
            return 0.0
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def penalty(self, blurriness: float | None) -> float:
        """What the blur penalty takes off the logit of a frame of ``blurriness`` (<= 0; 0 for a
        model without one, or no blurriness)."""
        if self.blur is None or blurriness is None:
            return 0.0
        below, weight = self.blur
        return weight * min(float(blurriness) - below, 0.0)

    def select(self, x: np.ndarray) -> np.ndarray:
        """All the ``SIGNALS`` of a caption (``Caption.signals``) -> the model's own."""
        return np.asarray(x)[..., [SIGNALS.index(name) for name in self.names]]

    def unrated(self, weight: float, own_weight: float) -> str | None:
        """Why captions searched at fusion weight ``weight`` are not rated (None: they are).
        The model rates captions of fusion weights up to the one it was fitted at
        (``fusion_weight`` in its file; a file without it: the model's own, ``own_weight``).
        Above it the language models' share of the ranking score, a signal here, grows past
        anything fitted, and the captions it wins are worse: at twice the shipped model's weight
        the confidence ranked wrong captions above right ones (docs/confidence.md)."""
        fitted = self.info.get(FITTED_FUSION_WEIGHT, own_weight)
        if weight <= fitted + 1e-9:
            return None
        return (
            f"its confidence model (confidence.json) rates captions of fusion weight {fitted:g} or "
            f"less, not {weight:g}"
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "signals": list(self.names),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
            **({} if self.blur is None else {BLUR_PENALTY: {"below": self.blur[0], "weight": self.blur[1]}}),
            **self.info,
        }

    @classmethod
    def load(cls, directory: Path) -> ConfidenceModel | None:
        """The model directory's confidence model, or None when it has none."""
        from edgecap.files import MAX_VOCAB_BYTES, FileProblem, newer_format, read_json

        path = Path(directory) / CONFIDENCE_FILE
        if not path.exists():
            return None
        try:
            spec = read_json(path, MAX_VOCAB_BYTES)
            newer = newer_format(spec, FORMAT)
            if newer:
                raise ModelError(f"{path}: {newer}")
            if spec.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            names = spec.get("signals")
            if (
                not isinstance(names, list)
                or not names
                or len(set(map(str, names))) != len(names)
                or not set(names) <= set(SIGNALS)
            ):
                raise ValueError(f"signals must be some of {list(SIGNALS)}, each once")
            n = len(names)
            arrays = [np.asarray(spec[k], np.float64) for k in ("mean", "std", "weights")]
            if any(a.shape != (n,) or not np.isfinite(a).all() for a in arrays):
                raise ValueError(f"mean, std and weights must be {n} numbers each (one per signal)")
            if (arrays[1] <= 0).any():
                raise ValueError("std must be positive")
            bias = float(spec["bias"])
            if not math.isfinite(bias):
                raise ValueError("bias must be a number")
            fitted = spec.get(FITTED_FUSION_WEIGHT, 0.0)
            low, high = RANGES["fusion_weight"]
            if isinstance(fitted, bool) or not isinstance(fitted, (int, float)) or not low <= fitted <= high:
                raise ValueError(f"{FITTED_FUSION_WEIGHT} must be a number in [{low}, {high}]")
            blur = _blur_penalty(spec.get(BLUR_PENALTY))
        except FileProblem as exc:
            raise ModelError(f"{path}: {exc}") from None
        # OverflowError: an integer past a float's range (JSON has them, and Python reads them)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ModelError(f"{path}: malformed confidence model ({exc})") from None
        info = {
            k: v
            for k, v in spec.items()
            if k not in ("format", "signals", "mean", "std", "weights", "bias", BLUR_PENALTY)
        }
        mean, std, weights = arrays
        return cls(mean, std, weights, bias, info, tuple(names), blur)


def _blur_penalty(spec: object) -> tuple[float, float] | None:
    """A confidence file's ``blur_penalty`` (absent: None) -> (below, weight); ``ValueError``
    for one that is not {"below": a number, "weight": a number >= 0}."""
    if spec is None:
        return None
    problem = f'{BLUR_PENALTY} must be {{"below": a number, "weight": a number >= 0}}'
    if not isinstance(spec, dict) or set(spec) != {"below", "weight"}:
        raise ValueError(problem)
    values = [spec["below"], spec["weight"]]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError(problem)
    below, weight = map(float, values)
    if weight < 0:
        raise ValueError(problem)
    return below, weight


def pin_fusion_weight(directory: Path, weight: float) -> None:
    """Write ``weight``, the model's own fusion weight so far, into the directory's
    confidence.json where it names none (it was fitted at that weight): before language models
    of another weight are installed, which would otherwise become the weight it is taken to be
    fitted at, its captions at that weight rated. Nothing without a confidence.json, or one
    that is not a JSON object (the Captioner says what is wrong with it)."""
    from edgecap.files import FileProblem, MAX_VOCAB_BYTES, read_json, write_whole

    path = Path(directory) / CONFIDENCE_FILE
    if not path.exists():
        return
    try:
        spec = read_json(path, MAX_VOCAB_BYTES)
    except FileProblem:
        return
    if isinstance(spec, dict) and FITTED_FUSION_WEIGHT not in spec:
        text = json.dumps({**spec, FITTED_FUSION_WEIGHT: float(weight)}, indent=1) + "\n"
        # a link (a folder of links to another model's files) replaced, not written through
        write_whole(path, lambda f: f.write(text.encode("utf-8")), replace_link=True)


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple:
    """Logistic regression by Newton's method on standardised ``x`` (N, S) with an L2 penalty
    ``l2`` on the weights: -> (mean, std, weights, bias)."""
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0  # not on the bias
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        w -= np.linalg.solve(hess, grad)
    return mean, std, w[:-1], float(w[-1])


def auroc(scores, labels) -> float:
    """Area under the ROC curve (ties count half): the chance that a right caption is scored
    above a wrong one."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs both right and wrong captions")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def write(directory: Path, model: ConfidenceModel) -> Path:
    """Write ``model`` as ``directory``'s confidence.json (whole, and where a link is there, in
    place of the link: the file it leads to, another model's, is left as it was), named in its
    manifest (where it has one): a copy of the model folder without it is refused, not captioned
    without confidence."""
    from edgecap.files import write_whole
    from edgecap.manifest import name_optional_file

    path = Path(directory) / CONFIDENCE_FILE
    text = json.dumps(model.to_json(), indent=1) + "\n"
    # a link (a folder of links to another model's files) replaced, not written through
    write_whole(path, lambda f: f.write(text.encode("utf-8")), replace_link=True)
    name_optional_file(directory, CONFIDENCE)
    return path
