"""How captions are searched for: ``CaptionOptions``, the one place their defaults are written."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

MAX_BATCH_SIZE = 64  # the shipped model, CPU: a 64-image batch peaks at about 0.8 GB
MAX_LENGTH = 200  # words of a caption
MAX_NO_REPEAT_NGRAM = 10
# the ranges of the float options: name -> (lowest, highest)
RANGES = {
    "guidance_bonus": (0, 10),
    "guidance_min_prob": (0, 1),
    "constraint_min_prob": (0, 1),
    "fusion_weight": (0, 2),
    "hold_margin": (0, 10),
}
LENGTH_PENALTY_RANGE = (0, 2)  # None (the mean log-prob per word) or a number in this range


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are searched for and batched: the defaults of ``Captioner`` and of the
    ``edgecap`` commands, written only here. A bad value is a ``ValueError`` naming the option
    when the options are made (or ``dataclasses.replace``d); ``validate`` also checks them
    against a model."""

    beam_size: int = 3
    max_length: int = 20  # the search's steps, <end> among them: a finished caption has at most 19 words
    batch_size: int = 8  # images per encoder run and per search
    length_penalty: float | None = None  # None: rank by mean log-prob per word; a: GNMT ((5+n)/6)^a
    n_best: int = 1  # hypotheses kept per image (the best + alternatives)
    no_repeat_ngram: int = 3  # > 0: no caption repeats an n-gram of this size (0: off)
    objects: int = 5  # object tags per caption (Caption.objects); 0: none
    # Object guidance: the words of the image's ``guidance_tags`` most probable classes of at
    # least ``guidance_min_prob`` get ``guidance_bonus`` added to their log-probability until a
    # beam has said one (0: off). Chosen on Flickr8k dev and coco-ood-dev (docs/everyday-photos.md).
    guidance_bonus: float = 2.0
    guidance_tags: int = 3
    guidance_min_prob: float = 0.1
    # Constrained beam search instead (``edgecap.decoding.constraint``): the caption must say a
    # word of one of the image's ``guidance_tags`` most probable classes of at least
    # ``constraint_min_prob`` (another threshold: a forced word costs more than a bonus).
    constrained: bool = False
    constraint_min_prob: float = 0.3
    # Fusion with the model's caption language models (``edgecap.decoding.fusion``): each step's
    # scores get fusion_weight * (log p_everyday - log p_in-domain). None: the weight chosen for
    # the model (its fusion.json); 0: off. A model without language models has no fusion.
    fusion_weight: float | None = None
    # Consensus choice (``edgecap.decoding.consensus``): the caption is chosen among every place
    # the search could have ended by its expected agreement with the others (plus the tag
    # words it says, less a content word said again or a dangling last word), not by its own
    # score alone. Not with ``constrained``.
    consensus: bool = True
    # A frame with nothing to recognise (uniform, blurred past any detail, a dark frame's noise) gets the text
    # "nothing recognisable" instead of an invented scene (``edgecap.preprocess.recognisable``).
    blank_check: bool = True
    # A dark frame (its brightest 1% of pixels below level 128 of 255; with lights in view, its
    # brightest 5%) is brightened before it is captioned and checked, by up to 8x, as a camera's
    # auto-exposure would (``edgecap.preprocess.exposure_gain``); frames that are not dark are
    # untouched.
    brighten: bool = True
    # Letterbox and pillarbox bars (a 16:9 picture in a 4:3 frame, or 4:3 in 16:9: dark, flat
    # lines at two opposite edges) are cropped before the frame is captioned and checked
    # (``edgecap.preprocess.bars``); the caption's ``crop`` says which part was captioned.
    crop_bars: bool = True
    # Holding a caption (``Captioner.caption(image, previous=...)``, ``caption_stream(...,
    # hold=True)``): the caption said last is kept for the new frame when its ranking score on
    # that frame, per word, is within ``hold_margin`` (nats) of the new caption's
    # (``edgecap.decoding.hold``); 0: only when it scores as well. Chosen with benchmarks/hold.py
    # (docs/cameras.md).
    hold_margin: float = 0.1

    @property
    def rows_per_image(self) -> int:
        """Decoder-step rows an image takes: its beams (twice that, constrained: a beam per
        state), what a backend with fixed-size engines is built for."""
        return self.beam_size * (2 if self.constrained else 1)

    def __post_init__(self) -> None:
        for field in fields(self):  # numpy numbers (read from an array or a config) as Python's
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, field.name, value.item())
        self._check()

    def validate(self, top_k: int) -> None:
        """Raise ``ValueError`` when the beam is wider than the model's step graph K (``top_k``);
        every other option was checked when the (frozen) options were made."""
        if not 1 <= self.beam_size <= top_k:
            raise ValueError(
                f"beam_size must be between 1 and {top_k} (the model's top_k: its "
                f"step graph returns {top_k} best words per row), got {self.beam_size}"
            )

    def _check(self) -> None:
        """Every check that does not depend on the model: ``ValueError`` naming the first bad
        option."""
        for name in (
            "beam_size",
            "max_length",
            "batch_size",
            "n_best",
            "no_repeat_ngram",
            "objects",
            "guidance_tags",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("constrained", "blank_check", "consensus", "brighten", "crop_bars"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if name == "fusion_weight" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if not 0 <= self.objects <= 100:
            raise ValueError(f"objects must be between 0 and 100, got {self.objects}")
        if not 1 <= self.guidance_tags <= 20:
            raise ValueError(f"guidance_tags must be between 1 and 20, got {self.guidance_tags}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got "
                f"{self.batch_size} (each image of a batch holds its activations "
                "and beams in memory until the batch is done)"
            )
        penalty, (low, high) = self.length_penalty, LENGTH_PENALTY_RANGE
        if penalty is not None and (
            isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not low <= penalty <= high
        ):
            raise ValueError(f"length_penalty must be None or a number in [{low}, {high}], got {penalty!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be 1 or more, got {self.beam_size}")
        if not 1 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be between 1 and {MAX_LENGTH} words, got {self.max_length}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({self.beam_size}), got {self.n_best}")
        if not 0 <= self.no_repeat_ngram <= MAX_NO_REPEAT_NGRAM:
            raise ValueError(
                f"no_repeat_ngram must be between 0 (off) and {MAX_NO_REPEAT_NGRAM}, "
                f"got {self.no_repeat_ngram}"
            )
