"""Fusion with caption language models: everyday language from caption text, at decoding time.

The density-ratio method (McDermott et al., "A Density Ratio Approach to Language Model Fusion
in End-to-End Automatic Speech Recognition", 2019): each step's log-probabilities get

    weight * (log p_everyday(word | words so far) - log p_in_domain(word | words so far))

where ``p_everyday`` is a caption language model trained on everyday caption text (COCO's) and
``p_in_domain`` one trained on the caption model's own training captions (Flickr8k's): the
caption model's language prior is swapped for the everyday one, while what it sees in the photo
stays. Both are small word-level LSTMs over the caption model's vocabulary, run on the host,
so fusion works on every backend (it reaches the step through ``word_bias``, as the tag bonus
does): both steps and their ratio in one onnxruntime run where onnxruntime is installed
(``edgecap.decoding.fusion_graph``), else in numpy. Trained by
``edgecap.training.language_model``.

A model directory carries them as ``fusion.json`` (``edgecap-fusion/1``: the two ``.npz`` files,
their SHA-256, the weight chosen for the model, and the gate below) beside the two weight files.

The gate: the caption model's own prior is right for photos like its training photos, so the
fusion weight of each photo shrinks with how typical the photo is of the training photos. A
photo's typicality is ``sum_c p(c) log(C q(c))``, ``p`` its encoder class probabilities over
the C classes and ``q`` the mean class probabilities of the training photos; its weight is the
full weight below ``full_below`` (a typicality lower than 95% of the training photos'), none
above ``none_above`` (lower than 85% of theirs), linear between. Both bounds are percentiles of
the training photos; which percentiles (5 and 15, against 5 and 25 or 50) was chosen on the dev
photos (benchmarks/results/decoding_choice*.md).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecap.contract import FUSION, OPTIONAL_FILES
from edgecap.decoding.options import RANGES
from edgecap.decoding.rules import Scorer
from edgecap.errors import ModelError

if TYPE_CHECKING:
    from edgecap.decoding.fusion_graph import OnnxPairStep

FUSION_FILE = OPTIONAL_FILES[FUSION]  # fusion.json
FORMAT = "edgecap-fusion/1"
MAX_LM_BYTES = 64 << 20  # a caption LM of the supported sizes is a few MB
ARRAYS = ("embed", "w_ih", "w_hh", "bias", "out_w", "out_b")


def remove_fusion(directory: Path) -> None:
    """Remove a model directory's ``fusion.json`` and the language models' ``.npz`` files it
    names (fitted to a model being replaced: left behind, they would only take room). A file it
    names that is not a plain ``.npz`` name in the directory (or not a file) is left alone, and
    an unreadable ``fusion.json`` is removed by itself."""
    from edgecap.files import MAX_VOCAB_BYTES, FileProblem, read_json

    path = Path(directory) / FUSION_FILE
    if not path.exists() and not path.is_symlink():  # a dangling link goes too (no copy through it)
        return
    names = []
    try:
        spec = read_json(path, MAX_VOCAB_BYTES)
        for role in ("everyday", "in_domain"):
            name = spec[role]["file"]
            if isinstance(name, str) and Path(name).name == name and name.endswith(".npz"):
                names.append(name)
    except (FileProblem, KeyError, TypeError, AttributeError):
        pass
    path.unlink()
    for name in names:
        try:
            (Path(directory) / name).unlink(missing_ok=True)
        except (OSError, ValueError):  # no file by that name: a folder, a NUL, a name too long
            pass


def _check_present(directory: Path, name: str, role: str) -> None:
    """A language model that ``fusion.json`` names must be there (a link to nothing is missing
    too): a copy of the folder that left it behind is refused as one without ``fusion.json`` is,
    saying what to do (``manifest._check_optional_file``), not with a bare "no such file"."""
    from edgecap.manifest import MANIFEST, WHOLE_COPY

    try:
        present = os.path.exists(directory / name)
    except (OSError, ValueError):  # a NUL in the name: CaptionLM.load says so
        return
    if not present:
        what = role.replace("_", "-")  # in_domain: the in-domain language model
        raise ModelError(
            f"{directory}: {name} is missing: the {what} language model, which its {FUSION_FILE} "
            f"names; {WHOLE_COPY} (to use the model without its language models, remove "
            f'{FUSION_FILE} and take "{FUSION}" out of the files {MANIFEST} names)'
        )


class CaptionLM:
    """A word-level LSTM language model over a caption vocabulary (numpy).

    Arrays (torch's LSTM layout, gates i, f, g, o): ``embed`` (V, E), ``w_ih`` (4H, E), ``w_hh``
    (4H, H), ``bias`` (4H,), ``out_w`` (V, H), ``out_b`` (V,), kept as ``arrays`` (float32,
    contiguous). The numpy step computes the input projection of every word once (``_input``,
    (V, 4H)), so its step is a row gather and two matrix products; the onnxruntime step
    (``edgecap.decoding.fusion_graph``) takes ``arrays`` as they are, a smaller graph (4.7
    against 13.5 MB for the shipped pair with ``_input``; built in 15-45 ms against 60-150)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        V, E = arrays["embed"].shape
        H = arrays["w_hh"].shape[1]
        shapes = {"w_ih": (4 * H, E), "w_hh": (4 * H, H), "bias": (4 * H,), "out_w": (V, H), "out_b": (V,)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape}")
        self.vocab_size, self.hidden = V, H
        self.arrays = {name: np.ascontiguousarray(arrays[name], np.float32) for name in ARRAYS}

    @cached_property
    def _input(self) -> np.ndarray:
        """(V, 4H): every word's embedding @ w_ih.T + bias, made on first use (the numpy step,
        the torch device search): 5.2 MB for a shipped model the onnxruntime step never needs."""
        a = self.arrays
        return (a["embed"] @ a["w_ih"].T + a["bias"]).astype(np.float32)

    @classmethod
    def load(cls, path: Path, vocab_size: int, sha256: str | None = None) -> CaptionLM:
        import hashlib
        import io

        from edgecap.files import FileProblem, read_regular

        try:  # a regular file of a sane size, read once: what is hashed is what is loaded
            raw = read_regular(path, MAX_LM_BYTES, "caption language model")
        except FileProblem as exc:
            raise ModelError(f"{path}: {exc}") from None
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
            raise ModelError(
                f"{path}: checksum mismatch: not the language model this model "
                "directory was made with; copy the whole directory again"
            )
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                arrays = {name: np.asarray(data[name], np.float32) for name in ARRAYS}
            lm = cls(arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated: BadZipFile
            raise ModelError(f"{path}: unreadable caption language model ({exc})") from exc
        if lm.vocab_size != vocab_size:
            raise ModelError(
                f"{path}: a language model of {lm.vocab_size} words, but the "
                f"caption model has {vocab_size}; it belongs to another model"
            )
        return lm

    def zero_state(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros((rows, self.hidden), np.float32), np.zeros((rows, self.hidden), np.float32))

    def step_logits(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        """tokens (R,) -> (logits of the next word (R, V) float32, their log-normaliser (R, 1),
        h, c): the log-probabilities are ``logits - normaliser``."""
        gates = self._input[tokens] + _product(h, self.arrays["w_hh"])
        H = self.hidden
        i, f = _sigmoid(gates[:, :H]), _sigmoid(gates[:, H : 2 * H])
        g, o = np.tanh(gates[:, 2 * H : 3 * H]), _sigmoid(gates[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        logits = _product(h, self.arrays["out_w"])
        logits += self.arrays["out_b"]
        top = logits.max(axis=1, keepdims=True)
        norm = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        return logits, norm, h, c

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        """tokens (R,) -> (log-probabilities of the next word (R, V) float32, h, c)."""
        logits, norm, h, c = self.step_logits(tokens, h, c)
        return logits - norm, h, c


# Products at most this many multiply-adds each, which numpy's OpenBLAS runs on one thread: on
# more it starts its thread pool, whose threads then spin for ~100 ms after each call and take
# the CPU from the decoder step (measured, 2-core AMD EPYC: (3, 128) x (128, 2538) in one call
# 0.12 ms on 2 threads, then 100 ms of a spinning core; in 512-row blocks 0.17 ms, no spinning).
_ONE_THREAD_MACS = 196_608
# Up to this many rows (a beam of 3 for one photo) a matrix-vector product per row costs less
# CPU than a blocked matrix product, which copies (packs) the whole weight on every call
# (measured, (R, 128) x (128, 2538): R=3 175 vs 290 us, R=6 358 vs 367, R=12 527 vs 375).
_GEMV_ROWS = 4


def _product(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (R, H) @ weight.T for ``weight`` (N, H), float32 (R, N) C-contiguous, in blocks of
    ``weight``'s rows small enough to stay on one BLAS thread. C-contiguous because numpy's
    reductions along the rows of the transposed (column-major) result are ~60x slower (measured:
    the max of a (3, 2538) result 156 us transposed, 2.5 us contiguous; copying costs ~5 us)."""
    rows, hidden = x.shape
    if rows <= _GEMV_ROWS:  # one matrix-vector product per row: no packing of ``weight``
        out_rows = np.empty((rows, weight.shape[0]), np.float32)
        for row in range(rows):
            np.matmul(weight, x[row], out=out_rows[row])
        return out_rows
    block = max(8, _ONE_THREAD_MACS // max(1, rows * hidden))
    out = np.empty((weight.shape[0], rows), np.float32)
    x_t = np.ascontiguousarray(x.T)
    for start in range(0, weight.shape[0], block):
        np.matmul(weight[start : start + block], x_t, out=out[start : start + block])
    return np.ascontiguousarray(out.T)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warning for large |x|


class NumpyPairStep:
    """Both language models' step and their weighted density ratio in numpy: where onnxruntime
    is not installed (``edgecap.decoding.fusion_graph.OnnxPairStep`` is the same step in one
    onnxruntime run)."""

    def __init__(self, everyday: CaptionLM, in_domain: CaptionLM):
        self.models = (everyday, in_domain)

    def __call__(self, tokens: np.ndarray, states: list, weights: np.ndarray):
        """tokens (R,), states [(h, c) everyday, (h, c) in-domain], weights (R, 1) -> (bias
        (R, V), the new states)."""
        logits, norms, new_states = [], [], []
        for lm, (h, c) in zip(self.models, states):
            row_logits, norm, h, c = lm.step_logits(tokens, h, c)
            new_states.append((h, c))
            logits.append(row_logits)
            norms.append(norm)
        # log p_everyday - log p_in_domain, normalisers apart: two passes over (R, V) fewer
        ratio = logits[0] - logits[1]
        ratio -= norms[0] - norms[1]
        ratio *= weights
        return ratio, new_states


@dataclass(frozen=True)
class Fusion:
    """A model directory's two caption language models and its chosen weight."""

    everyday: CaptionLM
    in_domain: CaptionLM
    weight: float  # the weight chosen for this model (``CaptionOptions.fusion_weight`` default)
    info: dict
    gate: Gate | None = None

    @cached_property
    def step(self) -> NumpyPairStep | OnnxPairStep:
        """One step of both models with their weighted density ratio: in one onnxruntime run
        where onnxruntime is installed (``edgecap.decoding.fusion_graph``: the fusion's cost at
        beam 3 1.10-1.16x the decode without it, interleaved, 1.21-1.29x alone; numpy's
        1.27-1.32x and 1.19-1.37x), else in numpy."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return NumpyPairStep(self.everyday, self.in_domain)
        from edgecap.decoding.fusion_graph import OnnxPairStep

        try:
            return OnnxPairStep(self.everyday, self.in_domain)
        except Exception as exc:  # an onnxruntime too old for opset 17, out of memory, ...: same captions
            import warnings

            cause = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc).strip() else "")
            warnings.warn(
                f"the caption language models run in numpy (slower): onnxruntime could not load "
                f"their step ({cause})",
                RuntimeWarning,
                stacklevel=4,  # the Captioner's caller, where it is made (step <- cached_property <- api)
            )
            return NumpyPairStep(self.everyday, self.in_domain)

    @classmethod
    def load(cls, directory: Path, vocab_size: int, n_classes: int | None = None) -> Fusion | None:
        """The model directory's fusion (``fusion.json``), or None when it has none.
        ``n_classes``: the encoder's classes, which the gate's prior must match."""
        from edgecap.files import MAX_VOCAB_BYTES, FileProblem, newer_format, read_json

        path = Path(directory) / FUSION_FILE
        if not path.exists():
            return None
        try:
            spec = read_json(path, MAX_VOCAB_BYTES)
        except FileProblem as exc:
            raise ModelError(f"{path}: {exc}") from None
        newer = newer_format(spec, FORMAT)
        if newer:
            raise ModelError(f"{path}: {newer}")
        try:
            if spec.get("format") != FORMAT:
                raise ValueError(f"format is {spec.get('format')!r}, expected {FORMAT!r}")
            models = {}
            for role in ("everyday", "in_domain"):
                entry = spec[role]
                name = entry["file"]
                if not isinstance(name, str) or Path(name).name != name:
                    raise ValueError(f"{role}.file must be a file name in the model directory")
                _check_present(Path(directory), name, role)
                models[role] = CaptionLM.load(Path(directory) / name, vocab_size, entry.get("sha256"))
            weight = float(spec["weight"])
            low, high = RANGES["fusion_weight"]  # what CaptionOptions(fusion_weight=...) takes
            if not low <= weight <= high:
                raise ValueError(f"weight must be in [{low}, {high}], got {weight}")
            gate = None if spec.get("gate") is None else Gate.from_json(spec["gate"])
            if gate is not None and n_classes is not None and len(gate.class_log_prior) != n_classes:
                raise ValueError(
                    f"the gate's prior has {len(gate.class_log_prior)} classes, the encoder {n_classes}"
                )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{path}: malformed fusion file ({exc}); re-make it") from None
        info = {k: v for k, v in spec.items() if k != "gate"}
        return cls(models["everyday"], models["in_domain"], weight, info, gate)

    def scorer(
        self, weight: float, image_index: np.ndarray, class_probs: np.ndarray | None = None
    ) -> FusionScorer:
        """A search's scorer; with a gate, each image's weight is ``weight`` times its gate's
        share from the images' ``class_probs`` (N, C); without class probabilities (a backend
        that gives none) a gated fusion cannot tell the photos apart and adds nothing."""
        weights = np.full(len(image_index), weight, np.float32)
        if self.gate is not None:
            weights *= 0.0 if class_probs is None else self.gate(class_probs)[image_index]
        return FusionScorer(self, weights)


@dataclass(frozen=True)
class Gate:
    """Per photo, the share of the fusion weight it gets (see the module doc)."""

    class_log_prior: np.ndarray  # (C,): log(C q(c)), q the training photos' mean class probs
    full_below: float
    none_above: float

    @classmethod
    def from_json(cls, spec: dict) -> Gate:
        prior = np.asarray(spec["class_log_prior"], np.float64)
        low, high = float(spec["full_below"]), float(spec["none_above"])
        if prior.ndim != 1 or not np.isfinite(prior).all() or not low < high:
            raise ValueError("gate: class_log_prior must be finite numbers and full_below < none_above")
        return cls(prior, low, high)

    @classmethod
    def fit(cls, train_class_probs: np.ndarray, full_below: float = 5.0, none_above: float = 15.0) -> Gate:
        """From the training photos' class probabilities (N, C): full weight below the
        ``full_below`` percentile of their typicality, none above the ``none_above`` one."""
        prior = np.log(train_class_probs.mean(0) * train_class_probs.shape[1] + 1e-9)
        typical = train_class_probs @ prior
        return cls(
            prior, float(np.percentile(typical, full_below)), float(np.percentile(typical, none_above))
        )

    def to_json(self) -> dict:
        return {
            "class_log_prior": [round(float(v), 5) for v in self.class_log_prior],
            "full_below": self.full_below,
            "none_above": self.none_above,
        }

    def typicality(self, class_probs: np.ndarray) -> np.ndarray:
        return np.asarray(class_probs, np.float64) @ self.class_log_prior

    def __call__(self, class_probs: np.ndarray) -> np.ndarray:
        """(N, C) -> (N,) in [0, 1]."""
        share = (self.none_above - self.typicality(class_probs)) / (self.none_above - self.full_below)
        return np.clip(share, 0.0, 1.0).astype(np.float32)


class FusionScorer(Scorer):
    """One search's fusion: both language models' states per row, reordered with the rows.
    When no row has a weight (every photo typical of the training photos) it costs nothing."""

    def __init__(self, fusion: Fusion, weights: np.ndarray):
        """``weights`` (R,): each row's fusion weight."""
        rows = len(weights)
        self.fusion, self.weights = fusion, np.asarray(weights, np.float32)[:, None]
        self.active = bool(self.weights.any())
        self.states = [fusion.everyday.zero_state(rows), fusion.in_domain.zero_state(rows)]

    def bias(self, t: int, tokens: np.ndarray, source_rows: np.ndarray) -> np.ndarray | None:
        if not self.active:
            return None
        states = self.states
        if t > 0:  # the first step's source rows are images, and every state is zero
            states = [(h[source_rows], c[source_rows]) for h, c in states]
        ratio, self.states = self.fusion.step(tokens, states, self.weights)
        return ratio
