"""Score a model on a captioned split: the library side of ``edgecap eval``.

    items = load_references(references="captions_val.json")  # or captions=, split=
    check_images(items, images_root)                          # every listed file exists
    hyps = caption_split(captioner, items, images_root)       # {image_id: caption}
    report = score_split(items, hyps)                 # BLEU-1..4, METEOR, ROUGE-L, CIDEr

Metrics are coco-caption's (``pycocoevalcap``, via ``edgecap.evaluation.metrics.score``) with
its PTB tokenizer. Where Java is absent, METEOR is skipped and the text is tokenised by the simple
Python tokenizer instead; ``EvalReport.tokenizer`` says which one was used, because the numbers are then
not coco-caption-exact.

Failures are all-or-nothing: a metric over part of a split is not comparable with anything, so a
listed image that is missing (``check_images``, before any captioning) or fails to decode
(``caption_split``) raises instead of being skipped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgecap.evaluation import metrics
from edgecap.api import batched
from edgecap.commands.output import escape_field
from edgecap.data.readers import CaptionedImage, dataset_json, read_coco, read_flickr8k, read_karpathy
from edgecap.errors import DataError, InputError, counted
from edgecap.files import os_problem
from edgecap.vocab import tokenize

KARPATHY_SPLITS = ("train", "val", "test")
_SHOWN = 5  # missing or broken images named in an error message


def load_references(
    references: str | Path | None = None,
    captions: str | Path | None = None,
    split: str | Path | None = None,
    karpathy_split: str | None = None,
) -> list[CaptionedImage]:
    """Reference captions of one split, in the file's order.

    ``references``: COCO caption JSON (``images`` with ``id`` / ``file_name``, ``annotations``
    with ``image_id`` / ``caption``), or a Karpathy ``dataset_*.json`` together with
    ``karpathy_split``. ``captions`` + ``split``: Flickr8k's ``Flickr8k.token.txt`` and a split
    file such as ``Flickr_8k.devImages.txt`` (image id = 0-based line index in the split file).

    Raises ``DataError`` (a ``ValueError``, naming the file) for a missing, unreadable or
    malformed file, an image with no reference caption (or only empty ones) or an empty split.
    """
    if (references is None) == (captions is None):
        raise ValueError(
            "give either references (COCO caption JSON) or captions + split "
            "(Flickr8k token file and split file)"
        )
    if captions is not None:
        if split is None:
            raise ValueError("captions (Flickr8k.token.txt) needs a split file, e.g. Flickr_8k.devImages.txt")
        source = Path(captions)
        items = _read(source, lambda: read_flickr8k(source, Path(split)))
    else:
        assert references is not None  # exactly one of the two, checked above
        source = Path(references)
        items = _read(source, lambda: _read_json_references(source, karpathy_split))
    if not items:  # the split file's fault (Flickr8k), the references' own split's (COCO)
        empty = split if captions is not None else source
        raise ValueError(f"{escape_field(str(empty))}: the split lists no images")  # one line
    # one id for two photos (a Karpathy-style file of one's own: an image numbered by its place in
    # the file that is another's imgid or cocoid): scored by id, one photo's captions would be
    # given to the other without a word (COCO's reader refuses this itself; training never
    # scores by id)
    first: dict = {}
    for item in items:
        seen = first.setdefault(item.image_id, item)
        if seen is not item:
            raise ValueError(
                f"{source}: image id {item.image_id!r} is that of two files, "
                f"{escape_field(seen.file_name)} and {escape_field(item.file_name)}"
            )
    # one photo listed twice (a split file's line repeated, a COCO file with two ids for one
    # file): its caption would be scored twice, against one list of references or two, and weigh
    # twice in every metric
    listed = Path(split) if captions is not None and split is not None else source
    by_name: dict = {}
    for item in items:
        seen = by_name.setdefault(os.path.normpath(item.file_name), item)
        if seen is not item:
            raise ValueError(
                f"{listed}: {escape_field(item.file_name)} is listed twice (image ids "
                f"{seen.image_id!r} and {item.image_id!r}): its caption would be scored twice"
            )
    # a caption with no word ("", "...": a blank cell of a spreadsheet) is none: scored against
    # it alone, the image would count only as a zero in every metric
    uncaptioned = [item.file_name for item in items if not any(tokenize(c) for c in item.captions)]
    if uncaptioned:
        raise ValueError(
            f"{source}: {counted(len(uncaptioned), 'image has', 'images have')} no reference caption: "
            f"{_some(uncaptioned)}"
        )
    return items


def _read_json_references(path: Path, karpathy_split: str | None) -> list[CaptionedImage]:
    data = dataset_json(path)  # read once: a regular file under the limit (a named pipe would hang)
    images = data.get("images") if isinstance(data, dict) else None
    is_karpathy = (
        isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]
    )
    if is_karpathy:
        if karpathy_split not in KARPATHY_SPLITS:
            raise ValueError(
                f"{path} is a Karpathy dataset JSON: choose its split ({', '.join(KARPATHY_SPLITS)})"
            )
        return read_karpathy(path, karpathy_split, data)
    if karpathy_split is not None:
        raise ValueError(
            f"{path}: a Karpathy split was given, but this is not a Karpathy "
            "dataset JSON (no 'sentences' in its images)"
        )
    return read_coco(path, data)


def _read(source: Path, reader: Callable[[], list[CaptionedImage]]) -> list[CaptionedImage]:
    """Run a reader; turn the ways a malformed file fails into one ``ValueError`` naming it."""
    try:
        return reader()
    except OSError as exc:  # missing, a folder, unreadable: one line naming the file
        raise DataError(f"{exc.filename or source}: {os_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not a UTF-8 text file ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source}: unexpected layout ({exc!r} missing or of the wrong type)") from exc


def check_images(items: list[CaptionedImage], images_root: str | Path) -> None:
    """Raise ``FileNotFoundError`` naming the listed images (the first few) that are not files."""
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {escape_field(str(root))}")
    missing = [item.file_name for item in items if not (root / item.file_name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {counted(len(items), 'listed image')} not in {escape_field(str(root))}: "
            f"{_some(missing)}"
        )


class ImageFailure(InputError):
    """Listed images that could not be decoded; ``failures`` holds each one's ``InputError``."""

    def __init__(self, failures: list[InputError]):
        self.failures = failures
        # each one's own message: one line, its name escaped as edgecap caption escapes it
        detail = "; ".join(str(f) for f in failures[:_SHOWN])
        more = f" (and {len(failures) - _SHOWN} more)" if len(failures) > _SHOWN else ""
        problem = (
            f"{counted(len(failures), 'image')} could not be read, so the split cannot be "
            f"scored (a metric over part of it would mislead): {detail}{more}"
        )
        super().__init__(failures[0].source, problem)
        # the names as they are: InputError folds runs of whitespace, which named "a  b.png" "a b.png"
        folded, self.problem = self.problem, problem
        self.args = (self.args[0][: len(self.args[0]) - len(folded)] + problem,)

    def __reduce__(self):
        # made again from its failures (InputError's own is its source and problem, which this
        # __init__ does not take): a process pool's worker can raise it
        return type(self), (self.failures,)


def caption_split(
    captioner,
    items: list[CaptionedImage],
    images_root: str | Path,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Caption every listed image -> {image_id: caption text}, in the items' order.

    ``captioner``: an ``edgecap.Captioner``; images go to it ``batch_size`` at a time and
    ``on_progress(n)`` is called after each batch with the number of images it held. Raises
    ``ImageFailure`` after the first batch holding images that fail to decode (all of that
    batch's failures are named); nothing is scored then. With the Captioner's ``overlap`` (on
    a GPU by default; ``edgecap eval --no-overlap``): a batch's captions built while the next
    is searched.
    """
    root = Path(images_root)
    paths = (root / item.file_name for item in items)
    results = captioner.iter_captions(paths, on_error="return", overlap=None)
    hyps: dict = {}
    # iter_captions yields a batch's results together: regroup them to report batch by batch.
    for chunk in batched(zip(items, results), captioner.options.batch_size):
        failures = [result for _, result in chunk if isinstance(result, InputError)]
        if failures:
            raise ImageFailure(failures)
        hyps.update((item.image_id, caption.text) for item, caption in chunk)
        if on_progress is not None:
            on_progress(len(chunk))
    return hyps


@dataclass(frozen=True)
class EvalReport:
    """Metric values (fractions, coco-caption's keys ``metrics.METRIC_KEYS``) over ``n_images``.

    ``tokenizer``: "ptb" (coco-caption's, exact) or "simple" (the Java-free fallback).
    ``skipped``: metrics that could not be computed here (METEOR without Java).
    """

    scores: dict[str, float]
    n_images: int
    tokenizer: str
    skipped: tuple[str, ...] = ()


def score_split(items: list[CaptionedImage], hyps: dict) -> EvalReport:
    """Score ``hyps`` {image_id: caption} against the items' references with coco-caption.

    Uses the PTB tokenizer and METEOR where Java is installed; otherwise the simple tokenizer and
    no METEOR (a warning on stderr says so). BLEU, ROUGE-L and CIDEr never need Java.
    """
    refs = {item.image_id: item.captions for item in items}
    wanted: tuple[str, ...]
    skipped: tuple[str, ...]
    if metrics.java_available():
        tokenizer, wanted, skipped = "ptb", metrics.METRIC_KEYS, ()
    else:
        problem = metrics.java_problem() or "not found"
        remedy = "install a Java runtime" if problem == "not found" else "make it start"
        print(
            f"edgecap eval: warning: Java {problem}: METEOR skipped and the simple tokenizer used "
            "instead of coco-caption's PTB tokenizer (BLEU / ROUGE-L / CIDEr are then close to, "
            f"but not exactly, coco-caption's); {remedy} for exact numbers",
            file=sys.stderr,
        )
        tokenizer, skipped = "simple", ("METEOR",)
        wanted = tuple(k for k in metrics.METRIC_KEYS if k not in skipped)
    if len(refs) == 1:
        print(
            "edgecap eval: warning: one image: its CIDEr is 0 whatever its caption (CIDEr weighs "
            "each word by how few of the split's images' references hold it; with one image, "
            "none is rarer than another)",
            file=sys.stderr,
        )
    scores = metrics.score(refs, hyps, tokenizer=tokenizer, metrics=wanted)
    return EvalReport(scores=scores, n_images=len(refs), tokenizer=tokenizer, skipped=skipped)


def results_json(items: list[CaptionedImage], hyps: dict) -> list[dict]:
    """coco-caption's results format ``[{"image_id": ..., "caption": ...}]``, in items' order."""
    return [{"image_id": item.image_id, "caption": hyps[item.image_id]} for item in items]


def _some(names: list[str]) -> str:
    shown = ", ".join(escape_field(name) for name in names[:_SHOWN])  # one line, whatever the names
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
