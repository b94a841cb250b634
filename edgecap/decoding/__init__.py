"""Decoding: from a batch of encoded images to ranked caption hypotheses.

- ``options``: ``CaptionOptions``, the one place the search's settings and defaults are written;
- ``beam``: the one beam loop over the encoder / decoder-step interface, and the ranking;
- ``rules``: what the loop applies at each step (never-first words, no repeated n-grams, the tag
  bonus, a fused caption language model: ``fusion``);
- ``constraint``: beam-state partitions (the tag constraint);
- ``consensus``: the choice of the caption among every place the search could have ended;
- ``hold``: a camera's previous caption kept for a new frame it still fits about as well.

``search`` turns the options into rules and runs the loop: the API asks it for captions and knows
no thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from edgecap.backends.base import Backend, Encoded
from edgecap.decoding.beam import Hypothesis, beam_search, length_normalised
from edgecap.decoding.consensus import Consensus
from edgecap.decoding.constraint import SURFACE, TagConstraint, Unconstrained
from edgecap.decoding.hold import given_hypotheses, holds
from edgecap.decoding.options import MAX_BATCH_SIZE, CaptionOptions
from edgecap.decoding.rules import Filter, NeverFirst, NoRepeatNgram, Scorer, TagBonus
from edgecap.vocab import NEVER_FIRST_IDS


def search(
    backend: Backend,
    encoded: Encoded,
    options: CaptionOptions,
    start_id: int,
    end_id: int,
    vocab_size: int,
    classes=None,
    fusion=None,
    return_attention: bool = False,
    deferred: bool = False,
):
    """Caption hypotheses for each image of ``encoded`` (best first, up to ``n_best``), with the
    rules ``options`` asks for. ``deferred``: a function of no arguments that returns them
    instead, the host's work after the search (the device search's result unpacked, the
    consensus choice) left to whoever calls it (another thread, while the next batch is
    searched: ``Captioner(overlap=True)``). ``classes`` (``edgecap.objects.ObjectClasses``): the image
    classes whose words the tag bonus or the tag constraint use, read from the encoder's class
    probabilities (None: neither, nor the consensus choice); ``fusion``
    (``edgecap.decoding.fusion.Fusion``): the model's caption language models, fused into each
    step's scores at ``options.fusion_weight`` (None: the model's own weight; 0: off)."""
    return search_with_tags(
        backend,
        encoded,
        options,
        start_id,
        end_id,
        vocab_size,
        _tag_words(options, classes, encoded.class_probs),
        fusion=fusion,
        return_attention=return_attention,
        consensus=None if classes is None else Consensus(classes.function_ids, classes.dangling_ids),
        deferred=deferred,
    )


def _tag_words(options: CaptionOptions, classes, probs) -> tuple[frozenset[int], ...] | None:
    """Each image's tag words, for the tag bonus or the tag constraint (None: neither)."""
    if classes is None or probs is None or not (options.constrained or options.guidance_bonus > 0):
        return None
    min_prob = options.constraint_min_prob if options.constrained else options.guidance_min_prob
    return classes.tag_words(probs, options.guidance_tags, min_prob)


def given_captions(
    backend: Backend,
    encoded: Encoded,
    options: CaptionOptions,
    start_id: int,
    end_id: int,
    vocab_size: int,
    image_of: list[int],
    captions: list[list[int]],
    classes=None,
    fusion=None,
    against: Sequence[Hypothesis] | None = None,
) -> list[Hypothesis | None]:
    """Given captions (word ids) scored on the images of ``encoded`` that ``image_of`` names, as
    ``search`` with these arguments would score them had it ended there, its tag bonus and
    fused language models included (``edgecap.decoding.hold.given_hypotheses``; None for a
    caption it could not have ended: one its rules block, a repeated n-gram, too). ``against``:
    per caption, the caption the search chose for its image; with ``options.constrained``, a
    given caption that says none of its image's tag words where that one says one is None too:
    the constrained search ranks every finished caption that says one above every caption
    that does not (``edgecap.decoding.constraint``), so it could not have chosen it over that
    one."""
    tag_words = _tag_words(options, classes, encoded.class_probs)
    scorers = scorers_for(
        options, vocab_size, None if options.constrained else tag_words, fusion, encoded.class_probs
    )
    scored = given_hypotheses(
        backend,
        encoded,
        image_of,
        captions,
        options,
        start_id,
        end_id,
        vocab_size,
        scorers,
        filters_for(options, end_id),
    )
    if options.constrained and tag_words is not None and against is not None:
        for k, (image, hyp, chosen) in enumerate(zip(image_of, scored, against)):
            words = tag_words[image]
            says = not words.isdisjoint(chosen.tokens)
            if hyp is not None and chosen.finished and says and words.isdisjoint(hyp.tokens):
                scored[k] = None
    return scored


def filters_for(options: CaptionOptions, end_id: int) -> list[Filter]:
    """The filters of every search of ``options``: the words a caption never starts with, and
    with ``options.no_repeat_ngram`` no repeated n-gram."""
    filters: list[Filter] = [NeverFirst(NEVER_FIRST_IDS)]
    if options.no_repeat_ngram > 0:
        filters.append(NoRepeatNgram(options.no_repeat_ngram, end_id))
    return filters


def search_with_tags(
    backend: Backend,
    encoded: Encoded,
    options: CaptionOptions,
    start_id: int,
    end_id: int,
    vocab_size: int,
    tag_words: tuple[frozenset[int], ...] | None,
    fusion=None,
    return_attention: bool = False,
    consensus: Consensus | None = None,
    deferred: bool = False,
):
    """``search`` with each image's tag words given (None or all empty: no tags): the caption
    must say one with ``options.constrained``, else they get ``options.guidance_bonus``. With
    ``options.consensus`` and ``consensus`` given (an unconstrained search), the searches
    return every place they could have ended and ``consensus`` chooses among them.
    ``deferred``: as ``search``'s."""
    choosing = returns_endings(options) and consensus is not None
    found = _search(
        backend,
        encoded,
        options if choosing == options.consensus else replace(options, consensus=False),
        start_id,
        end_id,
        vocab_size,
        tag_words,
        fusion,
        return_attention,
        deferred,
    )

    def chosen() -> list[list[Hypothesis]]:
        hypotheses = found() if callable(found) else found
        if not choosing:
            return hypotheses
        assert consensus is not None
        out = []
        for image, hyps in enumerate(hypotheses):
            words = () if tag_words is None else tag_words[image]
            ended = consensus.order([h for h in hyps if h.finished], words)
            out.append((ended + [h for h in hyps if not h.finished])[: options.n_best])
        return out

    return chosen if deferred else chosen()


def returns_endings(options: CaptionOptions) -> bool:
    """Whether a search of ``options`` returns every place it could have ended, for the
    consensus choice among them (given a ``Consensus``): with ``consensus``, unconstrained."""
    return options.consensus and not options.constrained


def _search(
    backend,
    encoded,
    options,
    start_id,
    end_id,
    vocab_size,
    tag_words,
    fusion,
    return_attention,
    deferred=False,
) -> list[list[Hypothesis]] | Callable[[], list[list[Hypothesis]]]:
    """The search's hypotheses; ``deferred``, from a backend that ``defers_unpacking``: a
    function that unpacks them from its device search's result when called."""
    filters = filters_for(options, end_id)
    partition = None
    if options.constrained and tag_words is not None and any(tag_words):
        partition = TagConstraint(tag_words, vocab_size)  # else searched plainly (the same captions)
    on_device = getattr(backend, "search_on_device", None)
    if on_device is not None and partition is None and not return_attention:
        # a backend that runs the same search over its own tensors (the torch backend on
        # CUDA: edgecap.decoding.device); None: it searches on the host after all
        later = {"deferred": True} if deferred and getattr(backend, "defers_unpacking", False) else {}
        found = on_device(encoded, options, start_id, end_id, tag_words, fusion, **later)
        if found is not None:
            return found
    scorers = scorers_for(
        options, vocab_size, None if options.constrained else tag_words, fusion, encoded.class_probs
    )
    return beam_search(
        backend,
        encoded,
        options,
        start_id,
        end_id,
        filters=filters,
        scorers=scorers,
        partition=partition,
        return_attention=return_attention,
        endings=options.consensus,
    )


def fusion_weight(options: CaptionOptions, fusion) -> float:
    """The fusion weight a search uses: the option's, or the model's own when the option is
    None; 0 without language models."""
    if fusion is None:
        return 0.0
    return fusion.weight if options.fusion_weight is None else options.fusion_weight


def scorers_for(
    options: CaptionOptions,
    vocab_size: int,
    tag_words: tuple[frozenset[int], ...] | None,
    fusion,
    class_probs,
) -> list:
    """The scorers of an unconstrained search, as factories of the rows' image index (what
    ``beam_search`` takes): the tag bonus when an image has tag words and the bonus is on, the
    fused language models when their weight (``fusion_weight``) is above 0. Every search that
    applies the rules (the numpy loop, the step-graph searches) takes them from here."""
    scorers: list = []
    if tag_words is not None and any(tag_words) and options.guidance_bonus > 0:
        scorers.append(partial(TagBonus, tag_words, vocab_size, options.guidance_bonus))
    weight = fusion_weight(options, fusion)
    if weight > 0:
        scorers.append(partial(fusion.scorer, weight, class_probs=class_probs))
    return scorers


__all__ = [
    "CaptionOptions",
    "Consensus",
    "Hypothesis",
    "MAX_BATCH_SIZE",
    "SURFACE",
    "Filter",
    "NeverFirst",
    "NoRepeatNgram",
    "Scorer",
    "TagBonus",
    "TagConstraint",
    "Unconstrained",
    "beam_search",
    "fusion_weight",
    "filters_for",
    "given_captions",
    "holds",
    "length_normalised",
    "scorers_for",
    "search",
    "search_with_tags",
]
