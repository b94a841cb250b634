"""The public API: ``Captioner(...).caption(image) -> Caption``.

    from edgecap import Captioner
    captioner = Captioner()                       # the shipped model, onnxruntime on the CPU
    print(captioner.caption("photo.jpg").text)
    captions = captioner.caption_batch(frames, color="bgr", on_error="return")
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from edgecap.backends import load_backend
from edgecap.backends import resolve as resolve_backend
from edgecap.backends.base import Backend
from edgecap.contract import Limits
from edgecap.errors import InputError, ModelError
from edgecap.images import ImageInput, load_rgb, max_pixels, preprocess
from edgecap.manifest import Manifest, file_sha256, load_manifest
from edgecap.search import Hypothesis, SearchOptions, beam_search
from edgecap.vocab import Vocabulary

ON_ERROR = ("raise", "return")


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are searched for; checked by ``validate_options``."""

    beam_size: int = 3
    max_length: int = 20                 # words, not counting <end>
    batch_size: int = 8                  # images per encoder run and per search
    length_penalty: float | None = None  # None: rank by mean log-prob per word; a: GNMT ((5+n)/6)^a
    n_best: int = 1                      # hypotheses kept per image (the best + alternatives)
    no_repeat_ngram: int = 3             # > 0: no caption repeats an n-gram of this size (0: off)


def validate_options(options: CaptionOptions, top_k: int) -> None:
    """Raise ``ValueError`` naming the first bad option. ``top_k``: the model's step graph K.
    The search's own rules live in ``SearchOptions.validate``; this adds types and batching."""
    for name in ("beam_size", "max_length", "batch_size", "n_best", "no_repeat_ngram"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {options.batch_size}")
    penalty = options.length_penalty
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))):
        raise ValueError(f"length_penalty must be None or a number in [0, 2], got {penalty!r}")
    search_options(options).validate(top_k)


def search_options(options: CaptionOptions, return_attention: bool = False) -> SearchOptions:
    return SearchOptions(beam_size=options.beam_size, max_length=options.max_length,
                         length_penalty=options.length_penalty, n_best=options.n_best,
                         return_attention=return_attention,
                         no_repeat_ngram=options.no_repeat_ngram)


@dataclass(frozen=True)
class Caption:
    """One image's caption.

    ``score`` is the length-normalised log-probability used to rank hypotheses (higher is better),
    ``log_prob`` the plain sum. ``alternatives``: the next best captions when ``n_best`` > 1.
    ``timings`` (milliseconds): ``preprocess_ms`` for this image; ``encode_ms`` and ``decode_ms``
    its share of its batch's encoder run and search. ``attention``: float32 (n_words, 7, 7), the
    attention over the image's regions for each word, when asked for.
    """

    text: str
    score: float
    tokens: list[str]
    log_prob: float
    alternatives: tuple["Caption", ...] = ()
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)


def default_model_dir() -> Path:
    """The model shipped in the package (``edgecap/assets/default``)."""
    directory = resources.files("edgecap").joinpath("assets", "default")
    if not isinstance(directory, Path) or not directory.joinpath("manifest.json").is_file():
        raise ModelError("this edgecap install has no default model (edgecap/assets/default); "
                         "pass model=DIRECTORY, a directory made by `edgecap export`")
    return directory


def load_vocabulary(manifest: Manifest) -> Vocabulary:
    """The model's vocabulary, checked against the manifest."""
    path = manifest.path("vocab")
    try:
        vocab = Vocabulary.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable vocabulary ({exc}); re-export the model") from exc
    if len(vocab) != manifest.dims.vocab_size:
        raise ModelError(f"{path}: {len(vocab)} words, but the manifest's decoder has "
                         f"{manifest.dims.vocab_size}; the vocabulary belongs to another model: "
                         "copy the whole model directory again or re-export it")
    ids = {"pad": vocab.pad, "start": vocab.start, "end": vocab.end, "unk": vocab.unk}
    if any(manifest.tokens.get(k, v) != v for k, v in ids.items()):
        raise ModelError(f"{path}: special token ids {ids} differ from the manifest's "
                         f"{manifest.tokens}; re-export the model")
    # A vocabulary of the right size from another model gives fluent nonsense; its checksum
    # (a small file, cheap to hash) tells it apart.
    expected = manifest.sha256.get("vocab")
    if expected and file_sha256(path) != expected:
        raise ModelError(f"{path}: checksum mismatch: this is not the vocabulary the model was "
                         "exported with; copy the whole model directory again or re-export it")
    return vocab


class Captioner:
    """Captions images with one model and one backend.

    Thread safety: one Captioner may be used from several threads at once and gives the same
    captions as sequential use. Shared, read-only: the manifest, vocabulary, options and the
    backend (onnxruntime sessions or torch modules, whose runs are thread-safe). Per call: the
    decoded images, the decoder state (h/c) and the search. A TensorRT backend documents its own
    rules in ``edgecap.backends.tensorrt``.

    Args:
        model: a model directory (``edgecap export``); None: the shipped default model.
        backend: "onnxruntime", "torch", "tensorrt" or "auto" (onnxruntime if installed,
            else tensorrt, else torch).
        beam_size, max_length, batch_size, length_penalty, n_best, no_repeat_ngram: see
            ``CaptionOptions``.
        device: "cpu" or "cuda", passed to the backend (None: the backend's default).
        **backend_options: passed to the backend class (e.g. ``threads=2``, ``fp16=True``).
    """

    def __init__(self, model: str | os.PathLike | None = None, backend: str = "auto",
                 beam_size: int = 3, max_length: int = 20, batch_size: int = 8,
                 length_penalty: float | None = None, device: str | None = None,
                 n_best: int = 1, no_repeat_ngram: int = 3, **backend_options):
        max_pixels()  # a malformed $EDGECAP_MAX_PIXELS is a ValueError now, not on every image
        self.manifest = load_manifest(default_model_dir() if model is None else model)
        height, width = self.manifest.preprocessing.size
        self._draft_size = (width, height)  # big JPEGs are decoded at a reduced scale
        self.options = CaptionOptions(beam_size=beam_size, max_length=max_length,
                                      batch_size=batch_size, length_penalty=length_penalty,
                                      n_best=n_best, no_repeat_ngram=no_repeat_ngram)
        validate_options(self.options, self.manifest.dims.top_k)
        self.vocab = load_vocabulary(self.manifest)
        self.backend: Backend = load_backend(
            resolve_backend(backend), self.manifest, device=device,
            limits=Limits(self.options.batch_size, self.options.beam_size), **backend_options)
        self._backend_lock = None if self.backend.thread_safe else threading.Lock()

    def __repr__(self) -> str:
        return (f"Captioner(model={str(self.manifest.directory)!r}, "
                f"backend={self.backend.describe()!r}, options={self.options})")

    def caption(self, image: ImageInput, color: str = "rgb",
                return_attention: bool = False) -> Caption:
        """Caption one image: a path, encoded bytes, a PIL image or a numpy array (H, W, 3) uint8
        (``color="bgr"`` for OpenCV frames). Raises ``InputError`` for an unusable image."""
        return self.caption_batch([image], color, return_attention, on_error="raise")[0]

    def caption_batch(self, images: Iterable[ImageInput], color: str = "rgb",
                      return_attention: bool = False,
                      on_error: str = "raise") -> list[Caption | InputError]:
        """Caption several images, ``batch_size`` at a time; results in the input order.

        ``on_error="raise"``: the first unusable image raises its ``InputError``.
        ``on_error="return"``: its slot holds the ``InputError`` instead and the other images are
        captioned as if it were not there.
        """
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
                isinstance(images, np.ndarray) and images.ndim != 4):
            raise TypeError("caption_batch takes a list of images; use caption() for one image")
        images = list(images)
        results: list[Caption | InputError] = []
        for start in range(0, len(images), self.options.batch_size):
            chunk = images[start:start + self.options.batch_size]
            results.extend(self._caption_chunk(chunk, color, return_attention, on_error))
        return results

    def _caption_chunk(self, images: list, color: str, return_attention: bool,
                       on_error: str) -> list[Caption | InputError]:
        """Load, encode and search one batch of at most ``batch_size`` images."""
        loaded, results, prep_ms = [], [], []
        for image in images:
            t0 = time.perf_counter()
            try:
                rgb = load_rgb(image, color, draft_size=self._draft_size)
            except InputError as exc:
                if on_error == "raise":
                    raise
                results.append(exc)
                continue
            loaded.append(preprocess([rgb], self.manifest.preprocessing)[0])
            prep_ms.append((time.perf_counter() - t0) * 1e3)
            results.append(None)  # filled below, in order
        if not loaded:
            return results
        hypotheses, encode_ms, decode_ms = self._search(np.stack(loaded), return_attention)
        shares = {"encode_ms": encode_ms / len(loaded), "decode_ms": decode_ms / len(loaded)}
        good = iter(zip(hypotheses, prep_ms))
        for i, slot in enumerate(results):
            if slot is None:
                hyps, ms = next(good)
                results[i] = self._to_caption(hyps, {"preprocess_ms": ms, **shares})
        return results

    def _search(self, batch: np.ndarray, return_attention: bool):
        """batch float32 (N, 3, H, W) -> (hypotheses per image, encode ms, decode ms)."""
        options = search_options(self.options, return_attention)
        # A backend with one set of device buffers (TensorRT) runs one batch at a time.
        with self._backend_lock or contextlib.nullcontext():
            t0 = time.perf_counter()
            encoded = self.backend.encode(batch)
            t1 = time.perf_counter()
            hypotheses = beam_search(self.backend, encoded, options, self.vocab.start,
                                     self.vocab.end)
            t2 = time.perf_counter()
        return hypotheses, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _to_caption(self, hyps: list[Hypothesis], timings: dict[str, float]) -> Caption:
        best, *rest = hyps
        alternatives = tuple(self._hypothesis_caption(h, {}) for h in rest)
        return self._hypothesis_caption(best, timings, alternatives)

    def _hypothesis_caption(self, hyp: Hypothesis, timings: dict[str, float],
                            alternatives: tuple[Caption, ...] = ()) -> Caption:
        words = [self.vocab.words[i] for i in hyp.tokens]
        return Caption(text=" ".join(words), score=float(hyp.score), tokens=words,
                       log_prob=float(hyp.log_prob), alternatives=alternatives, timings=timings,
                       attention=_attention_maps(hyp.attention))


def _attention_maps(attention: np.ndarray | None) -> np.ndarray | None:
    """(n_words, L) -> float32 (n_words, s, s) when L = s * s (49 -> 7x7), else unchanged."""
    if attention is None:
        return None
    attention = np.asarray(attention, dtype=np.float32)
    side = math.isqrt(attention.shape[1])
    if side * side == attention.shape[1]:
        return attention.reshape(attention.shape[0], side, side)
    return attention
