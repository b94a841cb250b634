"""``edgecap eval``: caption a split and score it as coco-caption does (BLEU-1..4, METEOR,
ROUGE-L, CIDEr; PyPI ``pycocoevalcap``, the ``eval`` extra).

    edgecap eval --images DIR --references captions_val.json
    edgecap eval --images DIR --captions Flickr8k.token.txt --split Flickr_8k.devImages.txt
    edgecap eval --images DIR --references dataset_flickr8k.json --karpathy-split test

Prints the metrics (fractions), the number of images, the model, the backend and the search
options; ``--json`` prints them as one JSON object instead. ``--output`` writes the captions in
coco-caption's results format. Without Java, METEOR is skipped (null in ``--json``) and the
simple tokenizer replaces PTB; stderr and the ``tokenizer`` field say so.

Exit codes: 0 scored; 2 nothing captioned (bad option, an --output that is a folder, whose
folder does not exist or that is a references file or a listed photo, unreadable references,
listed images missing, all named before captioning starts), nothing scored (a Java that starts but cannot
run coco-caption's tokenizer or METEOR: it needs Java 8 or newer; the tokenizer's temporary
file cannot be written: no writable temporary folder), or the scores printed but
--output could not be written (a full disk), or the scores could not be written to standard
output (a full disk, stdout closed; a reader gone away, | head: 141, quietly); 1 an image failed
to decode while captioning (the split is not scored: a metric over part of it would not be
comparable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

from edgecap.commands._options import add_model_arguments, load_captioner
from edgecap.commands.output import escape_field, json_line, output_failed, stdout_closed, utf8_output
from edgecap.commands.progress import add_progress_argument, open_progress, progress_enabled
from edgecap.extras import install_hint
from edgecap.files import same_file, write_whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images", required=True, metavar="DIR", help="folder the references' file names are relative to"
    )
    refs = p.add_argument_group("references (one of)")
    refs.add_argument(
        "--references",
        metavar="REFS.json",
        help="COCO caption JSON (images: id, file_name; annotations: image_id, "
        "caption), or a Karpathy dataset_*.json with --karpathy-split",
    )
    refs.add_argument("--captions", metavar="TOKENS.txt", help="Flickr8k.token.txt (with --split)")
    refs.add_argument(
        "--split",
        metavar="SPLIT.txt",
        help="Flickr8k split file, e.g. Flickr_8k.devImages.txt (image id = its 0-based line index)",
    )
    refs.add_argument(
        "--karpathy-split",
        choices=("train", "val", "test"),
        help="the split to score when --references is a Karpathy dataset JSON",
    )
    add_model_arguments(p)
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N images (default: all)")
    p.add_argument(
        "--output",
        metavar="RESULTS.json",
        help='write the captions as coco-caption results: [{"image_id": ..., "caption": ...}]',
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from edgecap.evaluation.evaluate import (
        ImageFailure,
        caption_split,
        check_images,
        load_references,
        results_json,
        score_split,
    )
    from edgecap.evaluation.metrics import JavaFailed

    problem = _check_arguments(args)
    if problem:
        return _fail(problem)
    if stdout_closed("eval"):  # started with stdout closed (>&-): the scores would be lost
        return 2
    if importlib.util.find_spec("pycocoevalcap") is None:  # before minutes of captioning
        return _fail(f"scoring needs pycocoevalcap: {install_hint('eval')}")
    try:
        items = load_references(args.references, args.captions, args.split, args.karpathy_split)
        photo = _photo_at(args.output, items, args.images) if args.output is not None else None
        if photo is not None:  # the photo, replaced by the captions' JSON
            return _fail(f"--output {args.output}: is the photo {photo} of the split; give another file")
        items = items[: args.limit] if args.limit else items
        check_images(items, args.images)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the InputError says it
    try:
        captioner = load_captioner(args)
    except ValueError as exc:  # a bad option value: report it like argparse would
        return _fail(str(exc))

    started = time.perf_counter()
    progress = open_progress(len(items), progress_enabled(args))
    try:
        with captioner:  # its decoding workers stopped, a TensorRT backend's buffers freed
            hyps = caption_split(captioner, items, args.images, on_progress=progress.update)
    except ImageFailure as exc:
        progress.close()
        print(f"edgecap eval: error: {exc.problem}", file=sys.stderr)
        return 1
    progress.close()
    seconds = time.perf_counter() - started

    unwritten = None
    if args.output:
        try:
            text = json.dumps(results_json(items, hyps), ensure_ascii=False, indent=1) + "\n"
            # whole or not at all: a write that failed part-way had truncated an earlier file there
            write_whole(args.output, lambda f: f.write(text.encode("utf-8")))
        except OSError as exc:  # a full disk, no permission: the scores are still printed
            unwritten = f"--output {args.output}: cannot write it ({exc.strerror or exc})"
    try:
        report = score_split(items, hyps)
    except JavaFailed as exc:  # a Java that starts but cannot run coco-caption's jars (too old)
        if unwritten is not None:  # both said: neither scores nor captions were kept
            _fail(unwritten)
        written = f"; the captions are in {args.output}" if args.output and unwritten is None else ""
        return _fail(f"{exc}{written}")  # it says when Java 8 or newer is needed
    summary = _summary(args, captioner, report, seconds)
    utf8_output()  # as caption: a name that is not ASCII on a stdout that is not UTF-8
    try:
        if args.json:  # UTF-8 whatever the file names (a byte of one that is not: a \u escape)
            print(json_line(summary))
        else:
            _print_table(summary)
        sys.stdout.flush()
    except OSError as exc:  # a full disk; a reader gone away (| head): quietly, as caption does
        if unwritten is not None:
            _fail(unwritten)
        return output_failed("eval", exc)
    return _fail(unwritten) if unwritten else 0


def _check_arguments(args: argparse.Namespace) -> str | None:
    """The first bad combination of reference options, or None."""
    if args.references is None and args.captions is None:
        return "give --references REFS.json, or --captions TOKENS.txt with --split SPLIT.txt"
    if args.references is not None and args.captions is not None:
        return "give --references REFS.json or --captions TOKENS.txt, not both"
    if args.captions is not None and args.split is None:
        return "--captions needs --split (e.g. Flickr_8k.devImages.txt)"
    if args.references is not None and args.split is not None:
        return "--split goes with --captions (for a Karpathy JSON use --karpathy-split)"
    if args.captions is not None and args.karpathy_split is not None:
        return "--karpathy-split goes with --references (a Karpathy dataset JSON)"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1, got {args.limit}"
    if args.output is not None:  # refused now, not after minutes of captioning
        output = Path(args.output)
        try:
            os.lstat(output)
        except (FileNotFoundError, NotADirectoryError):
            pass  # a new file, or one below a file: its folder is checked below
        except OSError as exc:  # a name too long, a part of it a file, a loop of links
            return f"--output {args.output}: {exc.strerror or exc}"
        if output.is_dir():
            return f"--output {args.output}: is a folder; give a file to write the captions to"
        if not output.parent.is_dir():
            what = "is not a folder" if output.parent.exists() else "does not exist"
            return f"--output {args.output}: {output.parent} {what}"
        for option, given in (
            ("--references", args.references),
            ("--captions", args.captions),
            ("--split", args.split),
        ):
            if given is not None and same_file(output, given):  # one's own captions, lost
                return f"--output {args.output}: is the {option} file; give another file for the captions"
    return None


def _photo_at(output: str, items, images: str) -> str | None:
    """The listed photo (its name, escaped) that ``output`` is, or None (a new file, another)."""
    if not os.path.lexists(output):
        return None
    root = Path(images)
    return next((escape_field(i.file_name) for i in items if same_file(output, root / i.file_name)), None)


def _fail(problem: str) -> int:
    print(f"edgecap eval: error: {problem}", file=sys.stderr)
    return 2


def _summary(args, captioner, report, seconds: float) -> dict:
    from edgecap.evaluation.metrics import METRIC_KEYS

    manifest = captioner.manifest
    return {
        **{key: report.scores.get(key) for key in METRIC_KEYS},  # None: skipped (no Java)
        "n_images": report.n_images,
        "tokenizer": report.tokenizer,
        "model": {
            "name": manifest.info.get("name"),
            "path": str(manifest.directory),
            "precision": manifest.precision,
        },
        "backend": captioner.backend.describe(),
        "beam_size": captioner.options.beam_size,
        "max_length": captioner.options.max_length,
        "length_penalty": captioner.options.length_penalty,
        "no_repeat_ngram": captioner.options.no_repeat_ngram,
        "decoding": _decoding(captioner),
        # what happens to a frame before it is captioned: told apart from a default run
        "frames": {
            "blank_check": captioner.options.blank_check,
            "brighten": captioner.options.brighten,
            "crop_bars": captioner.options.crop_bars,
        },
        "references": args.references or f"{args.captions} + {args.split}",
        "caption_seconds": round(seconds, 2),
    }


def _decoding(captioner) -> dict:
    """The decoding rules the captions were made with: the tag bonus (or the tag constraint), the
    fused language models' weight (0: none, or a model without them) and the consensus choice."""
    from edgecap.decoding import fusion_weight

    options = captioner.options
    return {
        "guidance_bonus": 0.0 if options.constrained else options.guidance_bonus,
        "constrained": options.constrained,
        "fusion_weight": fusion_weight(options, captioner.fusion),
        "consensus": options.consensus and not options.constrained,
    }


def _print_table(summary: dict) -> None:
    from edgecap.evaluation.metrics import METRIC_KEYS

    model = summary["model"]
    penalty = summary["length_penalty"]
    tokenizer = {"ptb": "ptb (coco-caption)", "simple": "simple (no usable Java: not coco-caption-exact)"}[
        summary["tokenizer"]
    ]
    print(f"references:  {escape_field(summary['references'])}")  # one line, whatever the names
    print(f"images:      {summary['n_images']} (captioned in {summary['caption_seconds']:.1f} s)")
    name = escape_field(model["name"]) if model["name"] else "(unnamed)"
    print(f"model:       {name} ({escape_field(model['path'])}, {model['precision']})")
    print(f"backend:     {summary['backend']}")
    print(
        f"search:      beam size {summary['beam_size']}, max length {summary['max_length']}, "
        f"length penalty {'none (mean log-prob)' if penalty is None else penalty}, "
        f"no-repeat n-gram {summary['no_repeat_ngram'] or 'off'}"
    )
    rules = summary["decoding"]
    tags = "tag constraint" if rules["constrained"] else f"tag bonus {rules['guidance_bonus']:g}"
    consensus = "on" if rules["consensus"] else "off"
    print(f"decoding:    {tags}, fusion weight {rules['fusion_weight']:g}, consensus choice {consensus}")
    frames = summary["frames"]
    print(
        f"frames:      blank check {'on' if frames['blank_check'] else 'off'}, dark frames "
        f"{'brightened' if frames['brighten'] else 'as they are'}, bars "
        f"{'cropped' if frames['crop_bars'] else 'kept'}"
    )
    print(f"tokenizer:   {tokenizer}")
    for key in METRIC_KEYS:
        value = summary[key]
        print(f"{key + ':':<12} {'skipped (needs Java)' if value is None else f'{value:.4f}'}")
