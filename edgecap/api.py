"""The public API: ``Captioner(...).caption(image) -> Caption``.

from edgecap import Captioner
captioner = Captioner()                       # the shipped model, onnxruntime on the CPU
print(captioner.caption("photo.jpg").text)
captions = captioner.caption_batch(frames, color="bgr", on_error="return")
for caption in captioner.iter_captions(many_paths):   # each batch as soon as it is done
    print(caption.text)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar, overload

import numpy as np
from PIL import Image

from edgecap.backends import load_backend
from edgecap.backends import ort_providers
from edgecap.backends import resolve as resolve_backend
from edgecap.backends._checks import check_threads
from edgecap.backends.base import Backend
from edgecap.confidence import SUPPORT_TAGS, ConfidenceModel, object_words, signals
from edgecap.contract import Limits
from edgecap.decoding import (
    CaptionOptions,
    Hypothesis,
    fusion_weight,
    given_captions,
    holds,
    length_normalised,
    search,
)
from edgecap.decoding.fusion import Fusion
from edgecap.errors import InputError, ModelError
from edgecap.images import (
    COLORS,
    MAX_SIDE,
    ImageInput,
    describe,
    first_unusable_unread,
    load_rgb,
    load_rgb_array,
    max_file_bytes,
    max_pixels,
    own_input,
)
from edgecap.manifest import Manifest, file_sha256, load_manifest
from edgecap.objects import ObjectClasses, top_classes_rows
from edgecap.prefetch import check_decode_workers, default_decode_workers, prefetched_batches, window
from edgecap.preprocess import bar_box, blurriness, frame_grey, grey_recognisable, model_input
from edgecap.vocab import SPECIALS, Vocabulary, tokenize

CLOSED_MID_CALL = "this Captioner is closed: the rest of the images are not captioned"
ON_ERROR = ("raise", "return")
# Intra-op threads when Captioner(threads=None), per backend; None: the backend's own default
# (onnxruntime: one per physical core). torch: 1, since its pool collapses when the cores are
# shared: on a loaded 2-core AMD EPYC one caption took 9.9 s with torch's default of 2 threads
# and 1.3 s with 1, beside a busy process 15.1 vs 1.8 s, while onnxruntime did best with its
# default (0.37 s; 1 thread 0.53 s). benchmarks/threads.py; docs/performance-options.md.
DEFAULT_THREADS = {"onnxruntime": None, "torch": 1, "tensorrt": None}


@dataclass(frozen=True)
class Caption:
    """One image's caption.

    ``score`` is the length-normalised log-probability (higher is better), ``log_prob`` the plain
    sum, both the caption model's own. ``alternatives``: the next best captions when ``n_best``
    > 1, in the order the caption was chosen in (captions that ended before any cut at
    ``max_length``; by the consensus choice, ``edgecap.decoding.consensus``, or with
    ``consensus=False`` by ``score`` plus the bonuses of the tag words and the fused language
    models that steered it).
    ``timings`` (milliseconds): ``preprocess_ms`` for this image; ``encode_ms`` and ``decode_ms``
    its share of its batch's encoder run and search. ``confidence``: the probability that the
    caption is right (``edgecap.confidence``; None for a model without a confidence model; 0 for
    a caption that ``max_length`` cut before any place where it could end).
    ``recognisable``: False for a frame with nothing to caption (uniform, or blurred past any
    detail: ``edgecap.preprocess.recognisable``); its ``text`` is then ``NOTHING_RECOGNISABLE``,
    ``tokens`` empty and ``confidence`` 0, None for a model without one (``score`` and
    ``log_prob`` stay those of the caption the search found and that is not shown: rank such
    captions by ``confidence``).
    ``signals``: every signal of ``edgecap.confidence.SIGNALS`` (``confidence`` is computed
    from those its model names, less its blur penalty for a frame that looks blurred: the
    frame's ``edgecap.preprocess.blurriness``, not among the signals), for fitting a confidence
    model; None for a frame with nothing recognisable (no caption to judge).
    ``attention``: float32 (n_words, 7, 7), the attention over the image's regions for each
    word, when asked for.
    ``objects``: the image's most probable object classes as (name, probability), best first,
    from the encoder's own classifier (ImageNet's 1000 classes), whatever the caption says.
    ``crop``: the part of the frame captioned when letterbox or pillarbox bars were cropped
    (``CaptionOptions.crop_bars``), as (left, top, right, bottom) fractions of its width and
    height; None: the whole frame.
    ``held``: True when this is the ``previous`` caption the call was given, kept because it
    still fits this frame about as well as the caption the search chose
    (``CaptionOptions.hold_margin``, ``edgecap.decoding.hold``); its score, log-probability,
    confidence and signals are then its own on this frame, and the search's caption is its
    first alternative when ``n_best`` > 1.
    """

    text: str
    score: float
    # not hashed (a list; ``text`` says the same words): hash(caption), a set of captions, had
    # been a TypeError for a frozen dataclass
    tokens: list[str] = field(hash=False)
    log_prob: float
    alternatives: tuple[Caption, ...] = ()
    objects: tuple[tuple[str, float], ...] = field(default=(), compare=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)
    confidence: float | None = field(default=None, compare=False)
    recognisable: bool = field(default=True, compare=False)
    signals: np.ndarray | None = field(default=None, compare=False, repr=False)
    crop: tuple[float, float, float, float] | None = field(default=None, compare=False)
    held: bool = field(default=False, compare=False)


NOTHING_RECOGNISABLE = "nothing recognisable"


def default_model_dir() -> Path:
    """The model shipped in the package (``edgecap/assets/default``)."""
    directory = resources.files("edgecap").joinpath("assets").joinpath("default")
    if not isinstance(directory, Path) or not directory.joinpath("manifest.json").is_file():
        raise ModelError(
            "this edgecap install has no default model (edgecap/assets/default); "
            "pass model=DIRECTORY, a directory made by `edgecap export`"
        )
    return directory


def load_vocabulary(manifest: Manifest) -> Vocabulary:
    """The model's vocabulary, checked against the manifest."""
    path = manifest.path("vocab")
    try:
        vocab = Vocabulary.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable vocabulary ({exc}); re-export the model") from exc
    if len(vocab) != manifest.dims.vocab_size:
        raise ModelError(
            f"{path}: {len(vocab)} words, but the manifest's decoder has "
            f"{manifest.dims.vocab_size}; the vocabulary belongs to another model: "
            "copy the whole model directory again or re-export it"
        )
    ids = {"pad": vocab.pad, "start": vocab.start, "end": vocab.end, "unk": vocab.unk}
    if any(manifest.tokens.get(k, v) != v for k, v in ids.items()):
        raise ModelError(
            f"{path}: special token ids {ids} differ from the manifest's "
            f"{manifest.tokens}; re-export the model"
        )
    # A vocabulary of the right size from another model gives fluent nonsense; its checksum
    # (a small file, cheap to hash) tells it apart.
    expected = manifest.sha256.get("vocab")
    if expected and file_sha256(path) != expected:
        raise ModelError(
            f"{path}: checksum mismatch: this is not the vocabulary the model was "
            "exported with; copy the whole model directory again or re-export it"
        )
    return vocab


def load_words(manifest: Manifest) -> tuple[Vocabulary, ObjectClasses]:
    """The model's vocabulary and object classes, each checked against the manifest: what a
    ``Captioner`` reads before its backend (``edgecap convert`` checks a model with it)."""
    vocab = load_vocabulary(manifest)
    return vocab, ObjectClasses.load(manifest.path("classes"), vocab.index, manifest.dims.n_classes)


class Captioner:
    """Captions images with one model and one backend.

    Thread safety: one Captioner may be used from several threads at once and gives the same
    captions as sequential use. Shared, read-only: the manifest, vocabulary, options and the
    backend (onnxruntime sessions or torch modules, whose runs are thread-safe). Per call: the
    decoded images, the decoder state (h/c) and the search. A backend with one set of device
    buffers (TensorRT, torch with CUDA graphs: ``thread_safe`` False) runs one batch at a time;
    TensorRT documents its rules in ``edgecap.backends.tensorrt``.

    Args:
        model: a model directory (``edgecap export``); None: the shipped default model.
        backend: "onnxruntime", "torch", "tensorrt" or "auto" (onnxruntime if installed,
            else tensorrt, else torch).
        options: a ``CaptionOptions`` (beam size, max length, batch size, length penalty, n-best,
            no-repeat n-gram); None: its defaults.
        device: "cpu" or "cuda", passed to the backend (None: the backend's default).
        decode_workers: threads that read, decode and preprocess the photos of the next batches
            while the backend works on the current one (0: each batch is decoded in the calling
            thread before it is captioned, nothing overlaps). The results are the same and come
            in the same order either way; at most ``batch_size + max(batch_size, 2 x
            decode_workers)`` photos are decoded ahead, whatever the input's length. None: on
            a GPU (device "cuda", the tensorrt backend, onnxruntime's CUDA or TensorRT
            provider) one per usable CPU core less one, at most 8; on the CPU
            ``edgecap.prefetch.DEFAULT_CPU_DECODE_WORKERS``. The attribute ``decode_workers``
            may be changed between calls. See docs/performance-options.md.
        overlap: ``caption_batch`` over more than one batch does each batch's host work after
            its search (the device search's result unpacked, the consensus choice, the tags,
            the confidence, the ``Caption`` objects) in a second thread while the backend works
            on the next batch, instead of between them; the results are the same and come
            in the same order. ``iter_captions`` only when asked (its ``overlap``: it yields
            each batch as soon as it is done otherwise; ``edgecap caption`` asks it to follow
            this attribute). None: on a GPU (as ``decode_workers``), where the device waits for
            the host between batches otherwise. The attribute ``overlap`` may be changed
            between calls. See docs/performance-options.md.
        threads: intra-op threads of the backend's CPU work (onnxruntime's sessions, torch's
            pool), a positive integer; None: ``DEFAULT_THREADS`` of the backend (onnxruntime:
            one per physical core; torch: 1). torch's setting is process-wide
            (``torch.set_num_threads``): a torch Captioner sets it for the whole process, also
            by default. The TensorRT backend has no CPU pool to set. See
            docs/performance-options.md.
        **keywords: a ``CaptionOptions`` field by name (``beam_size=5``) overrides that field of
            ``options`` (``dataclasses.replace``), so ``Captioner(options=opts, beam_size=5)`` is
            ``opts`` with beam 5. The other keywords go to the backend class (e.g.
            ``fp16=True``).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        *,
        options: CaptionOptions | None = None,
        device: str | None = None,
        threads: int | None = None,
        decode_workers: int | None = None,
        overlap: bool | None = None,
        **keywords,
    ):
        max_pixels()  # a malformed $EDGECAP_MAX_PIXELS is a ValueError now, not on every image
        max_file_bytes()  # and $EDGECAP_MAX_FILE_BYTES
        threads = check_threads(threads)  # before minutes of loading (a numpy integer: an int)
        check_decode_workers(decode_workers)
        _check_overlap(overlap)
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a model folder's path or None, got {type(model).__name__}")
        self.manifest = load_manifest(default_model_dir() if model is None else Path(model))
        height, width = self.manifest.preprocessing.size
        self._draft_size = (width, height)  # big JPEGs are decoded at a reduced scale
        chosen, backend_options = _split_options(options, keywords)
        chosen.validate(self.manifest.dims.top_k)  # before the vocabulary and language models load
        self.vocab, self.classes = load_words(self.manifest)
        self.fusion = Fusion.load(self.manifest.directory, len(self.vocab), self.manifest.dims.n_classes)
        self.options = chosen
        self._confidence_model = ConfidenceModel.load(self.manifest.directory)
        self._object_words = object_words(self.classes.word_ids)
        name = resolve_backend(backend)
        self.backend: Backend = load_backend(
            name,
            self.manifest,
            device=device,
            limits=Limits(self.options.batch_size, self.options.rows_per_image),
            threads=DEFAULT_THREADS.get(name) if threads is None else threads,
            **backend_options,
        )
        self._backend_lock = None if self.backend.thread_safe else threading.Lock()
        if (
            self.fusion is not None
            and fusion_weight(self.options, self.fusion) > 0
            and not getattr(self.backend, "on_device", False)  # the torch device search: its own LMs
        ):  # the language models' host step made now, not on the first caption (else when first used)
            _ = self.fusion.step
        self._no_pool()
        self._closed = False
        self._closing: int | None = None  # the thread of the first close()
        self._in_batch: int | None = None  # a one-batch-at-a-time backend: whose batch runs now
        self._release_after_batch = False
        self._largest_batch = 0  # the most images a batch has held (``_run_batch``'s padding)
        self._released = threading.Event()  # close() is done: workers stopped, backend released
        # the Captioners sharing this backend (this one and its copy.copy()s): the last to close
        # releases it
        self._backend_holders = [1]
        on_gpu = _on_gpu(name, device, self.backend)
        self._default_decode_workers = default_decode_workers(on_gpu)
        self.decode_workers = decode_workers
        self._default_overlap = on_gpu
        self.overlap = overlap
        _LIVE.add(self)  # for _after_fork
        # what makes this Captioner again in another process (``__reduce__``); the model folder
        # as an absolute path: a relative one was looked for from the current folder of that
        # time (a program that changed folder since: "model directory not found"); made absolute
        # as the OS reads it, not normalised: "link/../model" is beside the link's target
        folder = None if model is None else str(Path(model).absolute())
        self._made_with = (folder, backend, device, threads, decode_workers, backend_options)

    @property
    def unrated(self) -> str | None:
        """Why the captions get no confidence though the model has a confidence model (None:
        they get one, or it has none): a fusion weight above the one it was fitted at. It
        follows ``options`` (a copy given other options: ``copy.copy``, as the benchmarks run
        them; decided once when made, a copy at fusion weight 2 had rated its captions)."""
        return self._unrated(self.options)

    @property
    def confidence_model(self) -> ConfidenceModel | None:
        """What rates the captions (``Caption.confidence``); None where they get no confidence:
        the model has no confidence.json, or ``unrated`` says why."""
        return self._rater(self.options)

    def _unrated(self, options: CaptionOptions) -> str | None:
        """``unrated`` for captions searched with ``options``."""
        if self._confidence_model is None:
            return None
        own = 0.0 if self.fusion is None else self.fusion.weight
        return self._confidence_model.unrated(fusion_weight(options, self.fusion), own)

    def _rater(self, options: CaptionOptions) -> ConfidenceModel | None:
        """``confidence_model`` for captions searched with ``options``."""
        return None if self._unrated(options) is not None else self._confidence_model

    def __copy__(self) -> Captioner:
        """A shallow copy (sharing the model and backend, with decoding workers of its own; the
        benchmarks run rows of other options so), not a Captioner made again as ``__reduce__``
        would have ``copy.copy`` do."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        # its own decoding workers, made on first use: a pool the two shared was shut down
        # under one by the other (a new number of workers, or close()), whose next call then
        # failed ("cannot schedule new futures after shutdown")
        new._no_pool()
        # and its own closing: the backend they share is released by the last of them to close
        # (a copy's close() had released it under the original, a TensorRT one's buffers freed)
        new._closing, new._in_batch, new._release_after_batch = None, None, False
        new._released = threading.Event()
        with _HOLDERS_LOCK:
            if self._closed:  # a copy of a closed Captioner is closed: nothing of it to release
                new._released.set()
            else:
                self._backend_holders[0] += 1
        _LIVE.add(new)
        return new

    def __deepcopy__(self, memo: dict) -> Captioner:
        """A Captioner made again as ``__reduce__`` says, its own: not the one that unpickling
        shares in this process (two deep copies were one object, and closing one closed both)."""
        if self._closed:
            raise TypeError("this Captioner is closed: it cannot be copied")
        _, (made_with,) = self.__reduce__()
        return type(self)(**made_with)

    def __reduce__(self):
        """Pickled (sent to a ``multiprocessing`` worker of the spawn or forkserver start method:
        ``pool.map(captioner.caption, paths)``) as what made it: the receiving process makes its
        own, once (``_made_again``: one per process and set of arguments but the settings that
        may change between calls, however many tasks bring it), from the same model folder,
        backend, device, options and settings."""
        if self._closed:
            raise TypeError("this Captioner is closed: it cannot be sent to another process")
        model, backend, device, threads, _, backend_options = self._made_with
        made_with = dict(
            model=None if model is None else os.fspath(model),
            backend=backend,
            options=self.options,
            device=device,
            threads=threads,
            decode_workers=self.decode_workers,  # as set now (the setter), not only when made
            overlap=self.overlap,
            **backend_options,
        )
        return _made_again, (made_with,)

    def _no_pool(self) -> None:
        """No decoding workers yet: one pool at a time, made on first use for the current number
        (``_workers``); a replaced one is shut down once the calls using it are done."""
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_users: dict[ThreadPoolExecutor, int] = {}
        # re-entrant: close() from a signal handler in a thread that holds it (``_pools_held``)
        self._pool_lock = threading.RLock()
        self._pools_held_depth = 0  # the holder's ``_pools_held`` sections, one inside another
        self._stop_pools_after = False  # close() interrupted one: the pools stop at its end
        self._in_close = False  # close() holds the lock: a handler's close() there returns at once

    def _after_fork_in_child(self) -> None:
        """A fork's child has none of the parent's threads: the decoding workers' pool (whose
        idle count still says its threads wait, so work given it would never run: the child
        hung) is forgotten, to be made anew on first use, and the locks another thread may
        have held at the fork are fresh."""
        self._no_pool()
        if self._backend_lock is not None:
            self._backend_lock = threading.Lock()
        self._in_batch = None

    @property
    def options(self) -> CaptionOptions:
        """The decoding options (see the class); may be changed between calls (a copy given
        other options: ``copy.copy``, as the benchmarks run them), checked against the model as
        when the Captioner was made. A call keeps those it was made with to its end (an
        ``iter_captions`` those of its call): options set meanwhile take effect from the next."""
        return self._options

    @options.setter
    def options(self, options: CaptionOptions) -> None:
        if not isinstance(options, CaptionOptions):
            raise TypeError(f"options must be a CaptionOptions, got {type(options).__name__}")
        options.validate(self.manifest.dims.top_k)
        if options.fusion_weight and self.fusion is None:  # nothing would be fused: say so
            raise ValueError(
                f"fusion_weight {options.fusion_weight:g}: the model {self.manifest.directory} has no "
                "everyday caption language models (fusion.json) to fuse; leave fusion_weight out, or train "
                "them with `python -m edgecap.training.language_model` and add them with its `install` "
                "command (`python -m edgecap.training.language_model install --help`)"
            )
        self._options = options

    @property
    def decode_workers(self) -> int:
        """The decoding workers (see the class); may be changed between calls. None: the
        default for where the model runs."""
        return self._decode_workers

    @decode_workers.setter
    def decode_workers(self, workers: int | None) -> None:
        check_decode_workers(workers)
        self._decode_workers = self._default_decode_workers if workers is None else int(workers)

    @property
    def overlap(self) -> bool:
        """Whether ``caption_batch`` builds a batch's captions while the next one is searched
        (see the class); may be changed between calls. None: on a GPU."""
        return self._overlap

    @overlap.setter
    def overlap(self, overlap: bool | None) -> None:
        _check_overlap(overlap)
        self._overlap = self._default_overlap if overlap is None else bool(overlap)

    def close(self) -> None:
        """Stop the decoding workers (photos queued for them are not decoded; the ones being
        decoded finish first) and release the backend's resources where it has any (a TensorRT
        backend's device buffers, once the batch in it now, in another thread, is done).
        Idempotent: a second call, in another thread, returns once the first's work is done.
        The Captioner captions no more afterwards: a call in another thread, or an
        ``iter_captions`` begun before, raises ``ValueError("this Captioner is closed ...")`` at
        its next batch. A ``with Captioner(...) as captioner:`` block closes it at its end."""
        with self._pool_lock:
            if self._in_close:  # a signal handler that interrupted the first close() just here
                return
            self._in_close = True
            try:
                first = not self._closed
                self._closed = True
                if first:
                    self._closing = threading.get_ident()
                if self._pools_held_depth:
                    # a signal handler in a thread inside ``_pools_held`` (maybe inside a pool's
                    # submit, holding that pool's lock, which its shutdown takes: it waited for
                    # good): the pools are stopped at the end of that section
                    self._stop_pools_after = self._stop_pools_after or first
                    pools = set()
                else:
                    pools = self._pools_taken()
            finally:
                self._in_close = False
        inside_batch = self._backend_lock is not None and self._in_batch == threading.get_ident()
        if not first:
            # another close() (a shutdown hook racing a ``with`` block's end) does the work:
            # return once it is done, as the first does; not from inside the batch it waits
            # for, nor from inside the first close() (a signal handler in their thread), which
            # would wait forever
            if not inside_batch and self._closing != threading.get_ident():
                self._released.wait()
            return
        try:
            self._stop_pools(pools)
            if inside_batch:
                # called from inside this thread's own batch (a signal handler): waiting for
                # the batch would wait forever; the batch releases the backend when it ends
                self._release_after_batch = True
                return
            with self._backend_lock or contextlib.nullcontext():  # after the batch in it now
                self._release_backend()
        finally:
            if not self._release_after_batch and not self._stop_pools_after:
                self._released.set()

    def _pools_taken(self) -> set[ThreadPoolExecutor]:
        """The decoding pools to stop (the current one and those calls still use), forgotten;
        ``_pool_lock`` held."""
        pools = {*self._pool_users, *([self._pool] if self._pool is not None else [])}
        self._pool = None
        return pools

    @staticmethod
    def _stop_pools(pools: set[ThreadPoolExecutor]) -> None:
        """close()'s stop: the photos queued are not decoded, the ones being decoded finish."""
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    @contextlib.contextmanager
    def _pools_held(self) -> Iterator[None]:
        """``_pool_lock`` held for work on the pools (making, borrowing, handing back, submitting
        to one). A close() that comes inside (a signal handler in this thread) leaves the pools'
        shutdown to the end (``_stop_pools_after``): this thread may hold a pool's own lock."""
        pools: set[ThreadPoolExecutor] | None = None
        try:
            with self._pool_lock:
                self._pools_held_depth += 1
                try:
                    yield
                finally:
                    self._pools_held_depth -= 1
                    if not self._pools_held_depth and self._stop_pools_after:
                        self._stop_pools_after = False
                        pools = self._pools_taken()  # and any made after the close() came
        finally:
            if pools is not None:
                try:
                    self._stop_pools(pools)
                finally:
                    if not self._release_after_batch:
                        self._released.set()

    def _release_backend(self) -> None:
        with _HOLDERS_LOCK:
            self._backend_holders[0] -= 1
            if self._backend_holders[0] > 0:  # a copy (or the original) still uses it
                return
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return (
            f"Captioner(model={str(self.manifest.directory)!r}, "
            f"backend={self.backend.describe()!r}, options={self.options}{closed})"
        )

    def caption(
        self,
        image: ImageInput,
        color: str = "rgb",
        return_attention: bool = False,
        previous: Caption | str | None = None,
    ) -> Caption:
        """Caption one image: a path, encoded bytes, a PIL image or a numpy array (H, W, 3) uint8
        (``color="bgr"`` for OpenCV frames). Raises ``InputError`` for an unusable image.
        ``previous``: the caption said last for the same camera (a ``Caption`` or its text):
        kept (``Caption.held``) when it fits this image about as well as the caption the search
        chooses (``CaptionOptions.hold_margin``), so that a still scene keeps its words."""
        held = None if previous is None else [previous]
        return self.caption_batch([image], color, return_attention, on_error="raise", previous=held)[0]

    # For a type checker: with on_error "raise" (the default) every result is a ``Caption``; with
    # "return" a result may be an ``InputError``. A None among the images (OpenCV's ``imread`` of
    # a file it could not read) is that image's ``InputError``, as the docs' examples pass them.
    @overload
    def caption_batch(
        self,
        images: Iterable[ImageInput | None],
        color: str = ...,
        return_attention: bool = ...,
        on_error: Literal["raise"] = ...,
        previous: Sequence[Caption | str | None] | None = ...,
    ) -> list[Caption]: ...

    @overload
    def caption_batch(
        self,
        images: Iterable[ImageInput | None],
        color: str = ...,
        return_attention: bool = ...,
        on_error: str = ...,
        previous: Sequence[Caption | str | None] | None = ...,
    ) -> list[Caption | InputError]: ...

    def caption_batch(
        self,
        images: Iterable[ImageInput | None],
        color: str = "rgb",
        return_attention: bool = False,
        on_error: str = "raise",
        previous: Sequence[Caption | str | None] | None = None,
    ) -> list[Caption] | list[Caption | InputError]:
        """Caption several images, ``batch_size`` at a time; results in the input order.

        ``on_error="raise"``: the first unusable image raises its ``InputError``.
        ``on_error="return"``: its slot holds the ``InputError`` instead and the other images are
        captioned as if it were not there.
        ``previous``: one entry per image (a list as long as ``images``): the caption said last
        for the camera it came from, or None; each kept as ``caption()`` keeps it.
        """
        self._check_call(images, color, on_error)
        held = None if previous is None else self._previous_ids(images, previous)
        if held is not None and all(ids is None for ids in held):
            held = None  # nothing to hold: the call as without previous (overlap and all)
        options = self.options
        if on_error == "raise":
            self._raise_unsearched(images, color, options)
        # "raise": nothing is returned, so the images before a bad one are not captioned for nothing
        return list(
            self._results(
                images,
                color,
                return_attention,
                on_error,
                options,
                before_error=False,
                overlap=self.overlap and held is None,
                previous=held,
            )
        )

    def _previous_ids(self, images, previous) -> list[list[int] | None]:
        """``caption_batch``'s ``previous``, checked against its images, as word ids per image (a
        text read as captions are: ``edgecap.vocab.tokenize``): None where there is nothing to
        hold (None, a caption of nothing recognisable, an empty text, or a word the model's
        vocabulary does not hold)."""
        if isinstance(previous, (str, Caption)) or not isinstance(previous, Sequence):
            raise TypeError(
                f"previous must be a list with an entry per image (a Caption, a text or None), "
                f"got {type(previous).__name__}"
            )
        if not hasattr(images, "__len__") or len(images) != len(previous):
            count = f"{len(images)} images" if hasattr(images, "__len__") else "images that have no length"
            raise ValueError(f"previous must have an entry per image: {len(previous)} entries for {count}")
        out: list[list[int] | None] = []
        for position, entry in enumerate(previous):
            if entry is None or (isinstance(entry, Caption) and not entry.recognisable):
                out.append(None)
                continue
            if not isinstance(entry, (str, Caption)):
                raise TypeError(
                    f"previous[{position}] must be a Caption, a text or None, got {type(entry).__name__}"
                )
            # a text as captions are read (edgecap.vocab.tokenize): "A cat on a bed." is the caption
            # "a cat on a bed"
            words = entry.tokens if isinstance(entry, Caption) else tokenize(entry)
            said = [self.vocab.index.get(word, -1) for word in words]
            specials = {-1, self.vocab.pad, self.vocab.start, self.vocab.end}
            out.append(None if not said or any(i in specials for i in said) else said)
        return out

    def _raise_unsearched(
        self, images: Iterable[ImageInput | None], color: str, options: CaptionOptions
    ) -> None:
        """``caption_batch`` with "raise", which returns nothing once an image is unusable: in a
        list (a tuple, a 1-D array of paths) holding one seen to be unusable without reading it
        (``first_unusable_unread``: a missing file, an array of the wrong shape) past the first
        batch, the images up to it are read as captioning reads them but no batch is searched,
        and the first unusable one raises its error: the same error, without the searches of the
        batches before it, thrown away. Returns where there is no such image, or it has become
        usable by the time it is read (the call then captions as usual, reading those again)."""
        if not isinstance(images, (list, tuple, np.ndarray)):
            return  # read once (a generator): not read ahead
        if isinstance(images, np.ndarray) and images.ndim != 1:
            return  # an (N, H, W, C) array: all its images bad or none
        if len(images) <= options.batch_size:
            return
        bad = first_unusable_unread(images)
        if bad is None or bad < options.batch_size:  # the first batch: nothing is searched before it
            return
        for _ in self._results(
            images[: bad + 1], color, False, "raise", options, before_error=False, search=False
        ):
            pass

    @overload
    def iter_captions(
        self,
        images: Iterable[ImageInput | None],
        color: str = ...,
        return_attention: bool = ...,
        on_error: Literal["raise"] = ...,
        overlap: bool | None = ...,
    ) -> Iterator[Caption]: ...

    @overload
    def iter_captions(
        self,
        images: Iterable[ImageInput | None],
        color: str = ...,
        return_attention: bool = ...,
        on_error: str = ...,
        overlap: bool | None = ...,
    ) -> Iterator[Caption | InputError]: ...

    def iter_captions(
        self,
        images: Iterable[ImageInput | None],
        color: str = "rgb",
        return_attention: bool = False,
        on_error: str = "raise",
        overlap: bool | None = False,
    ) -> Iterator[Caption] | Iterator[Caption | InputError]:
        """``caption_batch``, lazily: yields one result per image, in the input order, as soon as
        its batch of ``batch_size`` images is captioned (``overlap=True``: each batch's host work
        after its search is done while the next batch is searched, as ``caption_batch`` does
        with the Captioner's ``overlap``, so its results come once the next batch's search is
        done too: for files, not for a live source; None: the Captioner's ``overlap``, as
        ``edgecap caption`` asks). ``images`` may be any iterable and is never
        read all at once: without decoding workers (``decode_workers=0``) a generator is read one
        batch at a time; with N workers it is read ahead, up to ``max(batch_size, 2 * N)`` images
        beyond the batch being captioned (``batch_size + max(batch_size, 2 * N)`` before the first
        result: 22 frames at batch 8 with 7 workers); with ``overlap``, one batch more (the one
        searched while the batch before it is built: 16 frames at batch 8 without workers, 30
        with 7). For a live source (a camera) use ``caption()`` per frame or ``decode_workers=0``.
        ``on_error`` as in ``caption_batch``. Bad arguments raise here; an unusable image (with
        "raise") while iterating, once the results of every image before it are yielded (its
        batch's earlier images included)."""
        self._check_call(images, color, on_error)
        _check_overlap(overlap)
        overlap = self.overlap if overlap is None else bool(overlap)
        return self._results(images, color, return_attention, on_error, self.options, overlap=overlap)

    def warm_up(
        self,
        batch_sizes: Iterable[int] = (1,),
        frame_size: tuple[int, int] = (480, 640),
        hold: bool = False,
    ) -> dict[int, dict[str, float]]:
        """Meet now, before a camera loop starts, what would make its first frames slow: per
        batch size (each 1 to ``batch_size``), a batch of synthetic frames of ``frame_size``
        (height, width: the camera's) captioned, which runs every stage once at that size (the
        runtime's first run; with CUDA graphs their capture for that batch size and, with
        ``preprocess="device"``, that frame size); and with the whole decode in CUDA graphs
        (the torch backend's device search), its graphs for every plan the search of that size
        can meet captured too (with and without tag words, with and without the language
        models, as the options allow: which one a batch needs depends on its photos, and a plan
        met for the first time costs two warm-up runs and a capture, mid-stream). -> per batch
        size, the seconds it took and the decode graphs captured beyond its caption's
        (``plans``). The largest size runs first: a backend that pads batches to a few sizes
        (``Backend.run_size``: up to the largest batch run so far) pads the smaller ones as it
        will later, and pads later batches up to it too. A backend keeps the whole-decode
        graphs of at most 8 plans (two batch sizes' worth): a warm-up that drops some of its own
        warns, saying so. ``hold=True`` (for a loop that passes ``previous``, as
        ``caption_stream(hold=True)`` does): with graphs, those of the pass that scores the
        previous captions are captured too, one shape per batch size."""
        if not isinstance(hold, bool):
            raise ValueError(f"warm_up: hold must be True or False, got {hold!r}")
        try:
            sizes = sorted({self._warm_size(size) for size in batch_sizes}, reverse=True)
        except TypeError:  # not iterable
            raise ValueError(
                f"warm_up: batch_sizes must be a list of batch sizes, got {batch_sizes!r}"
            ) from None
        if not sizes:
            raise ValueError("warm_up: batch_sizes is empty: give at least one batch size")
        frame = _warm_frame(frame_size)
        prepared = None  # the frame's encoder input, made once the first warm search needs it
        dropped = self.backend.dropped_graphs()
        out: dict[int, dict[str, float]] = {}
        for size in sizes:
            t0 = time.perf_counter()
            self.caption_batch([frame] * size)
            plans = 0
            # the caption ran the batch at its run size: so does the warm search
            if self.backend.warms_search(self.backend.run_size(size, self._largest_batch), self.options):
                prepared = prepared or self._prepare(frame, "rgb")
                plans = self._search([prepared.x] * size, False, warm=True)
            if hold and self.backend.keeps_sizes():
                # a one-word previous caption, which no search of the frame chooses: the hold pass
                # runs (its graphs captured: ``_hold_pass``'s one shape for this size)
                prepared = prepared or self._prepare(frame, "rgb")
                self._search([prepared.x] * size, False, held=[[self._warm_word()]] * size)
            out[size] = {"seconds": time.perf_counter() - t0, "plans": plans}
        if self.backend.dropped_graphs() > dropped:
            warnings.warn(
                f"warm_up: batch sizes {sorted(sizes)} need more graphs than the backend keeps "
                "(the whole decode's of 8 plans): the first ones were dropped, and will be "
                "captured again when a batch needs them; warm up fewer batch sizes",
                RuntimeWarning,
                stacklevel=2,
            )
        return dict(sorted(out.items()))

    def _warm_word(self) -> int:
        """A word for ``warm_up``'s searches to be given: one of the model's object words (the
        first), else the vocabulary's first word that is not a special token."""
        if self._object_words:
            return min(self._object_words)
        return len(SPECIALS)  # the specials are the first words

    def _warm_size(self, size: object) -> int:
        """One of ``warm_up``'s batch sizes, checked."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise ValueError(f"warm_up: batch sizes must be integers, got {size!r}")
        if not 1 <= size <= self.options.batch_size:
            raise ValueError(
                f"warm_up: batch size {size} is outside 1 to this Captioner's batch_size "
                f"({self.options.batch_size})"
            )
        return int(size)

    def _check_call(self, images, color: str, on_error: str) -> None:
        """The arguments of ``caption_batch`` / ``iter_captions``, checked when called."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        if self._closed:
            raise ValueError("this Captioner is closed")
        array = isinstance(images, np.ndarray) or hasattr(images, "__array__")
        ndim = getattr(images, "ndim", 4) if array else 4
        if array and ndim == 1 and getattr(getattr(images, "dtype", None), "kind", None) in ("U", "O"):
            # an array of paths or of images (np.array(glob(...)), a DataFrame column's values):
            # a list of inputs, each its own
            ndim = 4
        if array and isinstance(ndim, int) and ndim > 4:
            raise TypeError(
                f"caption_batch and iter_captions take a list of images or an (N, H, W, C) array, "
                f"got an array of {ndim} dimensions {tuple(getattr(images, 'shape', ()))}"
            )
        one = isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image))
        if one or ndim in (2, 3):
            # one image (H, W, C), a tensor's too, not a batch
            raise TypeError(
                "caption_batch and iter_captions take a list of images; use caption() for one image"
            )
        if ndim != 4:  # an array of numbers of 0 or 1 dimensions: no image, nor a list of them
            raise TypeError(
                f"caption_batch and iter_captions take a list of images or an (N, H, W, C) array, "
                f"got an array of shape {tuple(getattr(images, 'shape', ()))} "
                f"{getattr(images, 'dtype', '')}".rstrip()
            )
        if not (hasattr(type(images), "__iter__") or hasattr(type(images), "__getitem__")):
            # not iterable (None, a number): said now, and by name; iter_captions had said "'int'
            # object is not iterable" only when its first result was asked for
            raise TypeError(
                f"caption_batch and iter_captions take a list of images, got {type(images).__name__}"
            )

    def _results(
        self,
        images: Iterable[ImageInput | None],
        color: str,
        return_attention: bool,
        on_error: str,
        options: CaptionOptions,
        before_error: bool = True,
        overlap: bool = False,
        search: bool = True,
        previous: list[list[int] | None] | None = None,
    ) -> Iterator[Caption | InputError]:
        """The results in order, every step of every batch under ``options`` (the Captioner's when
        the call was made: another thread may set new ones meanwhile); ``before_error`` (with
        "raise"): the images before a bad one in its batch are captioned and yielded before its
        error is raised. ``overlap``: each batch's captions are built in a second thread while the
        next batch is searched (``_overlapped``). ``search`` False (with "raise"): the images are
        read and prepared, and the first unusable one raises its error, but no batch is searched
        and nothing is yielded. ``previous``: per image, the word ids of the caption to hold
        (``caption_batch``'s), not with ``overlap``."""
        # a source that fails (a camera unplugged) ends the images: those read before it are
        # captioned and yielded first, then its error is raised
        source = _Source(images)
        iterator: Iterator[ImageInput | None] = source
        # read once: another thread may set decode_workers (to 0) while this call starts
        workers = self.decode_workers
        if workers and source.one_shot:
            # a worker prepares an image after the source has been asked for the next ones, which
            # may refill its buffer (a camera's frame pool) or close it (a with Image.open block):
            # each is taken as it is read, as the calling thread would prepare it without workers
            # (a list's images are all there before the call: none is copied)
            iterator = map(own_input, source)
        # One photo (caption()) has nothing to overlap with: no hand-over to a worker.
        head = list(itertools.islice(iterator, 2)) if workers else []
        inputs = itertools.chain(head, iterator)
        batch = options.batch_size
        with contextlib.ExitStack() as stack:
            chunks: Generator[list, None, None] = (
                prefetched_batches(
                    stack.enter_context(self._borrowed_workers(workers)),
                    lambda image: self._prepare(image, color, options),
                    inputs,
                    batch,
                    window(batch, workers),
                    InputError,
                    # a pool shut down but not by close(): the interpreter is exiting (its main
                    # thread returned, another still captions), which shuts every pool down
                    inline=lambda: not self._closed,
                )
                if len(head) > 1
                else batched(self._prepared(inputs, color, options), batch)
            )
            # a consumer that stops early stops the workers too (closed before the pool is
            # handed back)
            stack.enter_context(contextlib.closing(chunks))
            parts = self._parts(self._until_closed(chunks), on_error, before_error)
            if not search:  # only the batch cut at an unusable image, with nothing to caption
                parts = (part for part in parts if part[1] is not None)
            if overlap:
                yield from self._overlapped(parts, return_attention, stack, options)
            else:
                at = 0  # the first image of the part
                for part, error in parts:
                    held = None if previous is None else previous[at : at + len(part)]
                    at += len(part)
                    searched = self._searched(part, return_attention, options, held=held)
                    yield from self._finished(part, searched)
                    if error is not None:
                        raise error
        if source.error is not None:
            raise source.error

    @staticmethod
    def _parts(
        chunks: Iterator[list], on_error: str, before_error: bool
    ) -> Iterator[tuple[list[_Prepared | InputError], InputError | None]]:
        """Each batch as (what to caption, the error to raise after its results or None). With
        "raise", a batch with an unusable image is cut before it: the images before it are
        captioned and yielded first (``before_error``; else none), the error costs no result
        that comes before it; no batch follows."""
        for chunk in chunks:
            if on_error == "raise":
                bad = next((i for i, p in enumerate(chunk) if isinstance(p, InputError)), None)
                if bad is not None:
                    yield (chunk[:bad] if before_error else []), chunk[bad]
                    return
            yield chunk, None

    def _overlapped(
        self, parts, return_attention: bool, stack: contextlib.ExitStack, options: CaptionOptions
    ) -> Iterator:
        """The parts' results in order, each batch's captions built in a second thread (made
        once a second batch comes) while this thread searches the next batch; the last batch's
        in this thread, as a call of one batch has all of it. The thread is joined before the
        call returns or raises (``stack``). What fails in this thread (the next batch's search,
        reading the next batch, Ctrl-C) costs no result of a batch searched before it: those
        are yielded first, as without the overlap. Where no thread can be had (work handed to
        threads after the interpreter began to exit) the captions are built here."""
        finisher: ThreadPoolExecutor | None = None
        pending = None  # the previous batch, searched, its captions not yet built
        parts = iter(parts)
        while True:
            try:
                part, error = next(parts)
            except StopIteration:
                break
            except BaseException:
                if pending is not None:
                    yield from self._finished(*pending)
                raise
            finishing = None
            if pending is not None:
                if finisher is None:
                    finisher = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="edgecap-finish"))
                try:
                    finishing = finisher.submit(self._finished, *pending)
                except RuntimeError:  # the interpreter is exiting: no new work for threads
                    yield from self._finished(*pending)
            try:
                # while the previous one is built; this one's unpacking and consensus choice left
                # to its turn there too
                searched = self._searched(part, return_attention, options, deferred=True)
            except BaseException:
                if finishing is not None:
                    yield from finishing.result()
                raise
            if finishing is not None:
                yield from finishing.result()
            pending = (part, searched)
            if error is not None:
                break
        if pending is not None:
            yield from self._finished(*pending)
            if error is not None:
                raise error

    def _until_closed(self, chunks: Iterator[list]) -> Iterator[list]:
        """``chunks``; the decoding workers shut down under the call by ``close()`` in another
        thread (a new decode refused, a queued one cancelled) are the closed error, as a batch's
        search after it is (``_search``)."""
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except (RuntimeError, CancelledError) as exc:  # the pool shut down, its queue cancelled
                if self._closed:
                    raise ValueError(CLOSED_MID_CALL) from exc
                raise
            yield chunk

    def _prepare(
        self, image: ImageInput | None, color: str, options: CaptionOptions | None = None
    ) -> _Prepared:
        """One input -> its encoder input (``InputError`` for an unusable one), brightened and
        checked as ``options`` (the call's; None: the Captioner's) say; runs in a decoding worker
        or in the calling thread."""
        options = self.options if options is None else options
        t0 = time.perf_counter()
        if self.backend.prepares_frames:  # resized and checked by the backend, on its device
            frame, crop = _without_bars(
                image, load_rgb_array(image, color, draft_size=self._draft_size), options
            )
            return _Prepared(frame, True, (time.perf_counter() - t0) * 1e3, crop)
        rgb, crop = _without_bars(image, load_rgb(image, color, draft_size=self._draft_size), options)
        try:
            x, gain = model_input(rgb, self.manifest.preprocessing, options.brighten)
        except MemoryError as exc:  # this input's failure, in its slot: the others are captioned
            raise InputError(
                describe(image), f"out of memory resizing it ({rgb.width}x{rgb.height}) for the model"
            ) from exc
        # the blank check and how blurred it looks (where the confidence model takes a blur
        # penalty: about 0.5 ms a frame) measure the same grey image, made once
        rater = self._confidence_model
        blur = rater is not None and rater.blur is not None
        visible, blurry = True, None
        if options.blank_check or blur:
            grey = frame_grey(x, self.manifest.preprocessing)
            visible = not options.blank_check or grey_recognisable(grey, bool(gain > 1))
            blurry = float(blurriness(grey)) if blur else None
        return _Prepared(x, visible, (time.perf_counter() - t0) * 1e3, crop, blurry)

    def _prepared(
        self, images: Iterable[ImageInput | None], color: str, options: CaptionOptions
    ) -> Iterator[_Prepared | InputError]:
        """Each input prepared in the calling thread (no decoding workers) as soon as it is read,
        before the next one is: a camera loop that refills one frame buffer gets each frame's
        caption, not its last frame's for the whole batch."""
        for image in images:
            try:
                yield self._prepare(image, color, options)
            except InputError as exc:
                yield exc

    def _workers(self) -> ThreadPoolExecutor:
        """The pool of ``decode_workers`` threads: the current one, or a new one when the number
        changed (the old one is shut down now, or by the last call still using it)."""
        with self._pools_held():
            return self._workers_locked()

    def _workers_locked(self, n: int | None = None) -> ThreadPoolExecutor:
        """The pool of ``n`` threads (None: ``decode_workers``), the current one or a new one."""
        if self._closed:
            raise ValueError("this Captioner is closed")
        n = self.decode_workers if n is None else n
        pool = self._pool  # this one, not self._pool again: a close() in between sets it to None
        if pool is None or self._pool_size != n:
            old, pool = pool, ThreadPoolExecutor(n, thread_name_prefix="edgecap-decode")
            self._pool, self._pool_size = pool, n
            if old is not None and old not in self._pool_users:
                old.shutdown(wait=False)
        return pool

    @contextlib.contextmanager
    def _borrowed_workers(self, n: int) -> Iterator[Executor]:
        """The pool of ``n`` workers for one call: not shut down under it when the number changes;
        its ``submit`` inside ``_pools_held`` (``_Submitting``)."""
        with self._pools_held():
            pool = self._workers_locked(n)
            self._pool_users[pool] = self._pool_users.get(pool, 0) + 1
        try:
            yield _Submitting(pool, self._pools_held)
        finally:
            with self._pools_held():
                self._pool_users[pool] -= 1
                if not self._pool_users[pool]:
                    del self._pool_users[pool]
                    if pool is not self._pool:  # replaced or closed meanwhile
                        pool.shutdown(wait=False)

    def _searched(
        self,
        prepared: list[_Prepared | InputError],
        return_attention: bool,
        options: CaptionOptions,
        deferred: bool = False,
        held: list[list[int] | None] | None = None,
    ):
        """Encode and search one batch of at most ``batch_size`` prepared images with ``options``:
        ``_search``'s result, None for a batch with no usable image. ``deferred``: its hypotheses
        a function that gives them (``edgecap.decoding.search``'s), called by ``_finished``.
        ``held``: per prepared image, the word ids of the caption to hold, or None (none for an
        image with nothing recognisable: its caption says so, with the search's scores)."""
        good = [p.x for p in prepared if isinstance(p, _Prepared)]
        if held is not None:  # nothing held for a frame with nothing recognisable (``_nothing``)
            held = [ids if p.visible else None for p, ids in zip(prepared, held) if isinstance(p, _Prepared)]
        return self._search(good, return_attention, deferred, options=options, held=held) if good else None

    def _finished(self, prepared: list[_Prepared | InputError], searched) -> list[Caption | InputError]:
        """One searched batch's results in its order: a ``Caption`` per usable image, its
        ``InputError`` per unusable one (``_searched``'s result: the host's work after the search),
        built with the options the batch was searched with, whatever the Captioner's are now."""
        if searched is None:
            return [p for p in prepared if isinstance(p, InputError)]  # all of them
        good = [p for p in prepared if isinstance(p, _Prepared)]
        n = len(good)
        hypotheses, probs, encode_ms, decode_ms, seen, options = searched
        if callable(hypotheses):  # deferred: the host's work after the search counts as its own
            t0 = time.perf_counter()
            hypotheses = hypotheses()
            decode_ms += (time.perf_counter() - t0) * 1e3
        if seen is not None:  # the backend's checks (on its device)
            visible, blurriness = seen
            good = [
                replace(p, visible=bool(v) or not options.blank_check, blurriness=float(b))
                for p, v, b in zip(good, visible, blurriness)
            ]
        shares = {"encode_ms": encode_ms / n, "decode_ms": decode_ms / n}
        # each photo's most probable classes at once, for its tags and its confidence signals
        objects = options.objects
        best = [None] * n if probs is None else top_classes_rows(probs, max(objects, SUPPORT_TAGS))
        tags = [()] * n if probs is None else [self.classes.tags(p, objects, b) for p, b in zip(probs, best)]
        class_probs = [None] * n if probs is None else list(probs)
        done = iter(zip(good, hypotheses, tags, class_probs, best))
        results: list[Caption | InputError] = []
        for slot in prepared:
            if isinstance(slot, InputError):
                results.append(slot)
                continue
            image, hyps, named, image_probs, image_best = next(done)
            timings = {"preprocess_ms": image.ms, **shares}
            caption = (
                self._to_caption(hyps, named, image_probs, timings, options, image_best, image.blurriness)
                if image.visible
                else self._nothing(hyps[0], named, timings, options)
            )
            if image.crop is not None:  # the alternatives were found in the same part
                alternatives = tuple(replace(a, crop=image.crop) for a in caption.alternatives)
                caption = replace(caption, crop=image.crop, alternatives=alternatives)
            results.append(caption)
        return results

    def _search(
        self,
        batch: list[np.ndarray],
        return_attention: bool,
        deferred: bool = False,
        warm: bool = False,
        options: CaptionOptions | None = None,
        held: list[list[int] | None] | None = None,
    ):
        """batch: model inputs float32 (3, H, W), or for a backend that ``prepares_frames`` RGB
        frames -> (hypotheses per image, class probabilities (N, C), encode ms, decode ms,
        whether each image holds anything to caption as the backend found (N,) or None, the
        options it was searched with: ``options``, None: the Captioner's); ``deferred``: the
        hypotheses a function that gives them; ``warm``: instead, the batch encoded and the
        backend's ``warm_search`` run on it (``warm_up``): its result. ``held``: per image, the
        word ids of the caption to hold or None (``_run_batch``)."""
        options = self.options if options is None else options
        # A backend with one set of device buffers (TensorRT) runs one batch at a time; close()
        # releases them under the same lock, so no batch runs on released buffers.
        with self._backend_lock or contextlib.nullcontext():
            if self._closed:
                raise ValueError(CLOSED_MID_CALL)
            self._in_batch = threading.get_ident()
            try:
                with _batch_running():  # not across a fork, nor into the interpreter's exit
                    if warm:
                        return self._warm_batch(batch, options)
                    return (*self._run_batch(batch, return_attention, options, deferred, held), options)
            finally:
                self._in_batch = None
                if self._release_after_batch:
                    self._release_after_batch = False
                    try:
                        self._release_backend()
                    finally:
                        self._released.set()

    def _run_batch(
        self,
        batch: list[np.ndarray],
        return_attention: bool,
        options: CaptionOptions,
        deferred: bool = False,
        held: list[list[int] | None] | None = None,
    ):
        """``_search``'s work, in the backend. A backend that captures graphs per batch size
        runs the batch padded with copies of its last image (``Backend.run_size``, up to the
        largest batch this Captioner has run), whose results are dropped. ``held``: per image,
        the word ids of the caption said last, kept instead of the search's where it fits the
        image about as well (``_held``; not ``deferred``)."""
        t0 = time.perf_counter()
        n = len(batch)
        encoded, seen, size = self._encoded(batch, options)
        t1 = time.perf_counter()
        hypotheses = search(
            self.backend,
            encoded,
            options,
            self.vocab.start,
            self.vocab.end,
            len(self.vocab),
            self.classes,
            self.fusion,
            return_attention=return_attention,
            deferred=deferred,
        )
        if held is not None and seen is not None and options.blank_check:
            # a frame the backend found nothing recognisable in keeps the search's own hypotheses,
            # as a frame the host checked does (``_searched``): its caption is ``_nothing``'s
            held = [ids if bool(v) else None for ids, v in zip(held, seen[0])]
        if held is not None and any(ids is not None for ids in held):
            assert not deferred
            hypotheses = self._held(encoded, hypotheses, held, options)
        t2 = time.perf_counter()
        probs = encoded.class_probs
        if size > n:
            if deferred:
                found = hypotheses
                hypotheses = lambda: found()[:n]  # noqa: E731
            else:
                hypotheses = hypotheses[:n]
            probs = None if probs is None else probs[:n]
            seen = None if seen is None else [checks[:n] for checks in seen]
        return hypotheses, probs, (t1 - t0) * 1e3, (t2 - t1) * 1e3, seen

    def _held(
        self,
        encoded,
        hypotheses: list[list[Hypothesis]],
        held: list[list[int] | None],
        options: CaptionOptions,
    ) -> list[list[Hypothesis]]:
        """The search's hypotheses with, for each image whose previous caption (``held``'s word
        ids) differs from the chosen one and scores within ``options.hold_margin`` of it on the
        image (scored as the search scored the chosen one: ``edgecap.decoding.given_captions``;
        with ``constrained``, never one without a tag word over one with), that caption first,
        marked held, the search's after it (up to ``n_best``; a held
        caption has no attention maps: its words were given, not searched)."""
        previous = {i: ids for i, ids in enumerate(held) if ids not in (None, hypotheses[i][0].tokens)}
        if not previous:
            return hypotheses
        given = self._hold_pass(encoded, previous, [hypotheses[i][0] for i in previous], options)
        out = list(hypotheses)
        for image, scored in zip(previous, given):
            if scored is not None and holds(scored, hypotheses[image][0], options.hold_margin):
                kept = replace(scored, held=True)
                rest = [h for h in hypotheses[image] if h.tokens != kept.tokens]
                out[image] = [kept, *rest][: options.n_best]
        return out

    def _hold_pass(
        self,
        encoded,
        previous: dict[int, list[int]],
        against: list[Hypothesis],
        options: CaptionOptions,
    ) -> list[Hypothesis | None]:
        """The previous captions (word ids by image of ``encoded``) scored on their images
        (``edgecap.decoding.given_captions``; ``against``: each image's chosen hypothesis). A
        backend that captures its step graphs per shape (``Backend.keeps_sizes``: the torch
        backend's CUDA graphs) runs them as one row per image of the batch's run size, the
        last one's copied into the rest and dropped: one shape per batch size, which
        ``warm_up(hold=True)`` captures, rather than one for each count of held captions, each
        captured mid-stream and crowding the search's own shapes out of the few kept."""
        images, captions = list(previous), list(previous.values())
        n = len(images)
        rows = encoded.n_images if self.backend.keeps_sizes() else n
        padding = rows - n
        given = given_captions(
            self.backend,
            encoded,
            options,
            self.vocab.start,
            self.vocab.end,
            len(self.vocab),
            images + images[-1:] * padding,
            captions + captions[-1:] * padding,
            self.classes,
            self.fusion,
            against=against + against[-1:] * padding,
        )
        return given[:n]

    def _encoded(self, batch: list[np.ndarray], options: CaptionOptions):
        """The batch encoded at its run size (``Backend.run_size``: padded with copies of its last
        image; frames the backend prepares brightened as ``options`` say) -> (``Encoded``, for
        frames the backend prepares [whether each holds anything to caption, how blurred each
        looks] or None, the run size)."""
        seen = None
        n = len(batch)
        # read once: a batch of another thread (a thread-safe backend) may record its own meanwhile
        largest = self._largest_batch = max(self._largest_batch, n)
        size = self.backend.run_size(n, largest)
        if self.backend.prepares_frames:  # padded after its preprocessing, on the device
            encoded, *seen = self.backend.encode_frames(batch, size, brighten=options.brighten)
        else:
            encoded = self.backend.encode(self.backend.batch_input(batch + [batch[-1]] * (size - n)))
        return encoded, seen, size

    def _warm_batch(self, batch: list[np.ndarray], options: CaptionOptions) -> int:
        """``warm_up``'s part in the backend: the batch encoded, then ``Backend.warm_search`` on it
        with one of the model's object words as every image's tag word (None: it has none)."""
        encoded, _, _ = self._encoded(batch, options)
        tag_word = min(self._object_words) if self._object_words else None
        return self.backend.warm_search(
            encoded, options, self.vocab.start, self.vocab.end, self.fusion, tag_word
        )

    def _to_caption(
        self,
        hyps: list[Hypothesis],
        objects: tuple,
        probs: np.ndarray | None,
        timings: dict[str, float],
        options: CaptionOptions,
        best: np.ndarray | None = None,
        blurriness: float | None = None,
    ) -> Caption:
        """``best``: the photo's most probable classes, best first (``top_classes``), or None;
        ``options``: those it was searched with; ``blurriness``: the photo's, for the confidence's
        blur penalty (None: none)."""
        first, *rest = hyps
        # the photo's typicality and the gate's share of the fusion weight (confidence signals)
        photo = (0.0, 0.0)
        if probs is not None and self.fusion is not None and self.fusion.gate is not None:
            gate = self.fusion.gate
            photo = (float(gate.typicality(probs[None])[0]), float(gate(probs[None])[0]))
        alternatives = tuple(
            self._hypothesis_caption(h, objects, probs, photo, {}, options, best=best, blurriness=blurriness)
            for h in rest
        )
        return self._hypothesis_caption(
            first, objects, probs, photo, timings, options, alternatives, best, blurriness
        )

    def _hypothesis_caption(
        self,
        hyp: Hypothesis,
        objects: tuple,
        probs: np.ndarray | None,
        photo: tuple[float, float],
        timings: dict[str, float],
        options: CaptionOptions,
        alternatives: tuple[Caption, ...] = (),
        best: np.ndarray | None = None,
        blurriness: float | None = None,
    ) -> Caption:
        """``photo``: its typicality and the fusion gate's share for it (0, 0 without a gate);
        ``best``: its most probable classes (``_to_caption``'s); ``options``: those it was
        searched with (its score's length penalty, whether its fusion weight is rated)."""
        if hyp.tokens and not (0 <= min(hyp.tokens) and max(hyp.tokens) < len(self.vocab)):
            raise ModelError(
                f"{self.manifest.directory}: the decoder step graph returned word "
                f"ids {list(hyp.tokens)} beyond its {len(self.vocab)}-word "
                "vocabulary; the graph and vocab.json do not belong together: "
                "re-export the model"
            )
        words = [self.vocab.words[i] for i in hyp.tokens]
        confidence, x = None, None
        if probs is not None:
            # the signals are per word, as the confidence model was fitted on them: a GNMT length
            # penalty's scores (``length_normalised``) are brought back to the mean per word
            length = max(len(hyp.tokens) + hyp.finished, 1)
            per_word = length_normalised(1.0, length, None) / length_normalised(
                1.0, length, options.length_penalty
            )
            x = signals(
                hyp.tokens,
                hyp.score * per_word,
                probs,
                self.classes.word_ids,
                None if hyp.rank_score is None else hyp.rank_score * per_word,
                photo[0],
                self._object_words,
                photo[1],
                best,
            )
            rater = self._rater(options)
            if rater is not None:
                # a caption the length cap cut before any place to end is no sentence: not a
                # caption the confidence model was fitted on, and not a right one
                confidence = round(rater.predict(rater.select(x), blurriness), 4) if hyp.finished else 0.0
        return Caption(
            text=" ".join(words),
            score=float(hyp.score),
            tokens=words,
            log_prob=float(hyp.log_prob),
            alternatives=alternatives,
            objects=objects,
            timings=timings,
            attention=_attention_maps(hyp.attention),
            confidence=confidence,
            signals=x,
            held=hyp.held,
        )

    def _nothing(
        self, hyp: Hypothesis, objects: tuple, timings: dict[str, float], options: CaptionOptions
    ) -> Caption:
        """A frame with nothing to caption: no invented scene (its search ran with the batch, with
        ``options``)."""
        return Caption(
            text=NOTHING_RECOGNISABLE,
            score=float(hyp.score),
            tokens=[],
            log_prob=float(hyp.log_prob),
            objects=objects,
            timings=timings,
            # 0: nothing to trust; None with a model that has no confidence (as its captions)
            confidence=None if self._rater(options) is None else 0.0,
            recognisable=False,
        )


@dataclass(frozen=True)
class _Prepared:
    """One photo ready for the encoder: its input (3, H, W) (for a backend that
    ``prepares_frames``, the decoded RGB frame (H, W, 3), checked there), whether it holds
    anything to caption (``recognisable``), the milliseconds it took to load and preprocess,
    the part of it captioned (``Caption.crop``), how blurred it looks
    (``edgecap.preprocess.blurriness``, for the confidence's blur penalty; None: not measured)."""

    x: np.ndarray
    visible: bool
    ms: float
    crop: tuple[float, float, float, float] | None = None
    blurriness: float | None = None


_Picture = TypeVar("_Picture", Image.Image, np.ndarray)


def _without_bars(
    image: ImageInput | None, picture: _Picture, options: CaptionOptions
) -> tuple[_Picture, tuple[float, float, float, float] | None]:
    """``picture`` (the decoded ``image``: an RGB PIL image or a uint8 (H, W, 3) array) between
    its letterbox or pillarbox bars (``edgecap.preprocess.bar_box``) where ``options.crop_bars``,
    and the part of it that is (``Caption.crop``; None: the whole). Memory run out is this
    input's ``InputError``, as for its resize: the other inputs are captioned."""
    if not options.crop_bars:
        return picture, None
    w, h = picture.size if isinstance(picture, Image.Image) else picture.shape[1::-1]
    try:
        box = bar_box(picture)
        if box is None:
            return picture, None
        left, top, right, bottom = box
        if isinstance(picture, Image.Image):
            inner = picture.crop(box)
        else:  # a frame of its own, contiguous, for the device's upload
            inner = picture[top:bottom, left:right].copy()
    except MemoryError as exc:
        raise InputError(describe(image), f"out of memory looking for its black bars ({w}x{h})") from exc
    return inner, (left / w, top / h, right / w, bottom / h)


# Every Captioner not yet collected, for ``_after_fork``: a robot app's multiprocessing pool
# forks (Linux's default start method before Python 3.14) a process that has captioned.
_LIVE: weakref.WeakSet[Captioner] = weakref.WeakSet()
_HOLDERS_LOCK = threading.Lock()  # Captioner._backend_holders


_MADE_AGAIN: dict[str, Captioner] = {}  # this process's Captioners made by unpickling, by arguments
_MADE_AGAIN_LOCK = threading.Lock()


def _warm_frame(frame_size: object) -> np.ndarray:
    """``warm_up``'s frame, (height, width, 3) uint8 with something in it (a blank frame is not
    searched like a photo): horizontal and vertical ramps and a checkerboard of 8-pixel squares.
    ``frame_size`` checked first, the image size limit too (``max_pixels``)."""
    if (
        not isinstance(frame_size, (tuple, list))
        or len(frame_size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in frame_size)
    ):
        raise ValueError(
            f"warm_up: frame_size must be (height, width), two positive integers, got {frame_size!r}"
        )
    height, width = (int(v) for v in frame_size)
    if height * width > max_pixels():
        raise ValueError(
            f"warm_up: frame_size {height} x {width} is over the {max_pixels():,} pixels edgecap decodes "
            "(edgecap.images.set_max_pixels)"
        )
    if max(height, width) > MAX_SIDE:
        raise ValueError(
            f"warm_up: frame_size {height} x {width} has a side over the {MAX_SIDE:,} pixels edgecap "
            "decodes (edgecap.images.MAX_SIDE)"
        )
    x = np.arange(width)
    y = np.arange(height)
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, :, 0] = (x * 255 // max(width - 1, 1)).astype(np.uint8)[None, :]
    frame[:, :, 1] = (y * 255 // max(height - 1, 1)).astype(np.uint8)[:, None]
    frame[:, :, 2] = ((y[:, None] // 8 % 2).astype(np.uint8) ^ (x[None, :] // 8 % 2).astype(np.uint8)) * 255
    return frame


def _check_overlap(overlap: object) -> None:
    if overlap is not None and not isinstance(overlap, (bool, np.bool_)):
        raise ValueError(f"overlap must be True, False or None, got {overlap!r}")


# What a Captioner's caller may change between calls: not a reason to load the model again
_SETTINGS = ("decode_workers", "overlap")


def _made_again(made_with: dict) -> Captioner:
    """The Captioner a pickled one stands for, made once in this process (``Captioner.__reduce__``)
    per model, backend, options and device; its settings (``_SETTINGS``) those of the last one
    sent. Keyed by them too, a sender that changed its ``decode_workers`` between tasks had each
    worker hold the whole model once more per value (70 MB and its runtime's threads each)."""
    key = repr(sorted((k, v) for k, v in made_with.items() if k not in _SETTINGS))
    with _MADE_AGAIN_LOCK:
        captioner = _MADE_AGAIN.get(key)
        if captioner is None or captioner._closed:
            captioner = _MADE_AGAIN[key] = Captioner(**made_with)
        for name in _SETTINGS:
            setattr(captioner, name, made_with[name])
        return captioner


# The batches running now in this process (thread id -> how many), so that no backend run is
# in flight across a fork or into the interpreter's exit. onnxruntime is inside its own mutexes
# while it runs: a fork's child inherited them held and hung on its first caption (os.fork while
# another thread captioned: 1 fork in 10 to 40, the shipped model, 2 cores); and a daemon thread
# whose run ends while the interpreter finalizes is ended by Python inside onnxruntime's frames,
# which aborts ('terminate called without an active exception', SIGABRT, exit code 134): a robot
# app's sys.exit with its captioning thread a daemon. A fork (its before hook) and the exit
# (atexit) wait for the other threads' batches to end, at most BATCHES_WAIT_S, and hold new
# ones: until the fork is done; at the exit, a daemon thread's next batch ends that thread
# instead (SystemExit: it had waited for good, so an app's atexit hook registered before ours,
# run after it, that joined the thread hung the exit), not the thread that exits (an atexit
# hook that captions).
BATCHES_WAIT_S = 10.0
# Without a lock a batch could wait on (a thread's batch takes no lock another thread holds):
# each thread writes only its own count, and says it runs before it looks for a fork or the
# exit, which say they are coming before they look for batches: one of the two sees the other.
_batches: dict[int, int] = {}
_forks = 0  # forks waiting or under way
_exiting = False
_no_fork = threading.Event()
_no_fork.set()
_FORKS_LOCK = threading.Lock()  # two threads forking at once


def _held() -> bool:
    return bool(_forks) or (_exiting and threading.current_thread().daemon)


def _count_batch(me: int, step: int) -> None:
    left = _batches.pop(me, 0) + step  # none in a fork's child made from inside a batch
    if left > 0:
        _batches[me] = left


@contextlib.contextmanager
def _batch_running() -> Iterator[None]:
    me = threading.get_ident()
    while True:
        _count_batch(me, 1)
        if not _held():
            break
        _count_batch(me, -1)
        if _exiting and threading.current_thread().daemon:
            # ended, not held: a thread ends on SystemExit quietly, its finally blocks run, and
            # whoever joins it goes on (an app's atexit hook run after ours; it waited forever)
            raise SystemExit("the interpreter is exiting: a daemon thread starts no new batch")
        _no_fork.wait()
    try:
        yield
    finally:
        _count_batch(me, -1)


def _others_batches_ended() -> None:
    """Wait (at most BATCHES_WAIT_S) until no thread but this one is inside a batch."""
    me = threading.get_ident()
    deadline = time.monotonic() + BATCHES_WAIT_S
    while any(thread != me for thread in list(_batches)) and time.monotonic() < deadline:
        time.sleep(0.002)


def _before_fork() -> None:
    global _forks
    with _FORKS_LOCK:
        _forks += 1
        _no_fork.clear()
    _others_batches_ended()


def _after_fork_in_parent() -> None:
    global _forks
    with _FORKS_LOCK:
        _forks -= 1
        if not _forks:
            _no_fork.set()


def _at_exit() -> None:
    global _exiting
    _exiting = True
    _others_batches_ended()


def _after_fork() -> None:
    global _MADE_AGAIN_LOCK, _FORKS_LOCK, _HOLDERS_LOCK, _batches, _forks, _no_fork
    _MADE_AGAIN_LOCK = threading.Lock()  # another thread may have held it at the fork
    _HOLDERS_LOCK = threading.Lock()
    # the child has this thread only: no other thread's batch, and fresh locks
    _FORKS_LOCK, _batches, _forks, _no_fork = threading.Lock(), {}, 0, threading.Event()
    _no_fork.set()
    for captioner in list(_LIVE):
        captioner._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork
    )
atexit.register(_at_exit)


def _on_gpu(name: str, device: str | None, backend: Backend) -> bool:
    """Whether the backend runs the model on a GPU: asked for (device "cuda"), TensorRT, or
    onnxruntime's default that found a CUDA / TensorRT provider."""
    if device is not None:
        return device.startswith("cuda")
    if name == "tensorrt":
        return True
    providers = getattr(backend, "providers", None) or [ort_providers.CPU]
    return providers[0] in (ort_providers.CUDA, ort_providers.TENSORRT)


class _Submitting(Executor):
    """``pool``'s ``submit`` inside ``held()`` (``Captioner._pools_held``): a close() from a signal
    handler that lands in it, where the pool's own lock is held, leaves the pool's shutdown
    (which takes that lock: it waited for good) to its end."""

    def __init__(self, pool: Executor, held: Callable[[], contextlib.AbstractContextManager]):
        self._pool, self._held = pool, held

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._held():
            return self._pool.submit(fn, *args, **kwargs)


class _Source(Iterator):
    """``iter(images)`` that ends at the first exception it raises, kept in ``error``."""

    def __init__(self, images: Iterable):
        self._images = iter(images)
        # an iterator (a generator, a camera), read once, not a collection of images (a list)
        self.one_shot = self._images is images
        self.error: Exception | None = None

    def __next__(self):
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._images)
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 (raised by _results once the images before it are out)
            self.error = exc
            raise StopIteration from None


def batched(items: Iterable, size: int) -> Generator[list, None, None]:
    """Consecutive lists of ``size`` items (the last may be shorter), reading ``items`` one list
    at a time (``itertools.batched`` of Python 3.12, as lists)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _split_options(options: CaptionOptions | None, keywords: dict) -> tuple[CaptionOptions, dict]:
    """-> (``options`` with the keywords that name its fields applied, the other keywords)."""
    if options is None:
        options = CaptionOptions()
    elif not isinstance(options, CaptionOptions):
        raise TypeError(f"options must be a CaptionOptions, got {type(options).__name__}")
    names = {f.name for f in fields(CaptionOptions)}
    overrides = {k: v for k, v in keywords.items() if k in names}
    return replace(options, **overrides), {k: v for k, v in keywords.items() if k not in names}


def _attention_maps(attention: np.ndarray | None) -> np.ndarray | None:
    """(n_words, L) -> float32 (n_words, s, s) when L = s * s (49 -> 7x7), else unchanged."""
    if attention is None:
        return None
    attention = np.asarray(attention, dtype=np.float32)
    side = math.isqrt(attention.shape[1])
    if side * side == attention.shape[1]:
        return attention.reshape(attention.shape[0], side, side)
    return attention
