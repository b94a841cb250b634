"""Options shared by the commands that caption (caption, eval). The defaults are
``CaptionOptions``' and the backend names the registry's: neither is written again here."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from edgecap.allocator import keep_freed_memory
from edgecap.backends import NAMES, resolve
from edgecap.backends._checks import max_threads
from edgecap.contract import Limits
from edgecap.decoding import CaptionOptions
from edgecap.errors import BackendError
from edgecap.decoding.options import (
    LENGTH_PENALTY_RANGE,
    MAX_BATCH_SIZE,
    MAX_LENGTH,
    MAX_NO_REPEAT_NGRAM,
    RANGES,
)
from edgecap.models.config import DecoderConfig
from edgecap.prefetch import DEFAULT_CPU_DECODE_WORKERS, MAX_DECODE_WORKERS, MAX_GPU_DECODE_WORKERS

DEFAULTS = {f.name: f.default for f in fields(CaptionOptions)}
PRECISIONS = ("fp32", "fp16")  # --precision
# the backends' messages name the Python API's arguments (device, search); the command line's
# errors say the flag instead, as typed
DEVICE_WORDS = {
    "device='cuda'": "--device cuda",
    "device='cpu'": "--device cpu",
    "search='graph'": "--search graph",
}


def _range(name: str) -> str:
    """'0 to 10': the range CaptionOptions accepts for a float option."""
    low, high = RANGES[name]
    return f"{low} to {high}"


# The most beams a search takes is the model's top_k (its step graph's K best words per row):
# the shipped model's and every `edgecap train` model's is DecoderConfig's default.
MAX_BEAM = DecoderConfig.__dataclass_fields__["top_k"].default
# What TensorRT engines are built for unless told otherwise (`edgecap build`'s defaults).
ENGINE = Limits()
ENGINE_BEYOND = (
    "with --backend tensorrt, a run that needs more rows than the cached engines "
    "take (more beams x images; constrained: 2 x beams) builds engines for "
    "exactly its own beam and batch on first use, which takes minutes, and keeps "
    "them in the engine cache"
)


def threads_value(text: str | None) -> int | None:
    """``--threads N`` -> N, a positive integer (None: not given); anything else is a
    ``ValueError`` in the command line's words (reported in one line, exit 2)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= max_threads():
        raise ValueError(
            f"--threads must be a positive integer (CPU threads, at most {max_threads()}), got {text!r}"
        )
    return value


def decode_workers_value(text: str | None) -> int | None:
    """``--decode-workers N`` -> N, a whole number >= 0 (None: not given); anything else is a
    ``ValueError`` in the command line's words."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_DECODE_WORKERS:
        raise ValueError(
            f"--decode-workers must be a whole number from 0 to {MAX_DECODE_WORKERS} (threads), got {text!r}"
        )
    return value


def add_model_arguments(p: argparse.ArgumentParser, overlaps: bool = True) -> None:
    """--model, --backend, --device, --precision, --cuda-graphs, --gpu-preprocess, --search, --threads,
    --decode-workers, --no-overlap, --beam-size, --max-length,
    --no-repeat-ngram, --length-penalty, --batch-size, --guidance-bonus / --no-objects-guidance,
    --fusion-weight / --no-fusion (each pair exclusive), --no-consensus, --no-blank-check,
    --no-brighten, --no-crop-bars, --constrained. ``overlaps``: the command captions more than one batch a
    call, so that --no-overlap changes something (not ``edgecap serve``, which takes it, to
    share the others' command lines, and says it changes nothing there)."""
    p.add_argument("--model", metavar="DIR", help="model directory (default: the model shipped with edgecap)")
    p.add_argument(
        "--backend",
        choices=sorted(NAMES, key=lambda name: name != "auto"),
        default="auto",
        help="auto: onnxruntime if installed, else tensorrt, else torch",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the backend runs (default: the backend's own: onnxruntime CUDA "
        "when it has it, else the CPU; torch the CPU; tensorrt the GPU)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the arithmetic (default: the backend's own: torch fp32, tensorrt fp16 engines, "
        "onnxruntime the model's). fp16 with --backend torch --device cuda: the decoder in FP16 "
        "behind the FP32 encoder (98.6-99.4%% of FP32's captions in a CPU emulation of FP16; on an "
        "NVIDIA H200 no faster than FP32: for GPUs with faster FP16); with --backend tensorrt: "
        "the engines' precision, fp16 likewise the decoder step's engine FP16 behind an FP32 "
        "encoder engine (both FP16 from an FP16 model directory); with onnxruntime it must be "
        "the model's own (an FP16 model: edgecap convert; see docs/precision.md)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="with --backend torch --device cuda: capture the encoder and the decode in CUDA "
        "graphs once per batch shape and replay them (3-5x faster end to end than without, "
        "beam 3, one photo, on an NVIDIA H200, the same captions; the beam search runs on "
        "the GPU from 12 beam rows a batch; see docs/gpu-search.md)",
    )
    p.add_argument(
        "--gpu-preprocess",
        action="store_true",
        help="with --backend torch --device cuda: resize, normalise and check the frames for "
        "blankness on the GPU (the same pixels as the host's), the host only decoding them; "
        "not yet timed on a GPU (see docs/gpu-search.md)",
    )
    p.add_argument(
        "--search",
        choices=SEARCHES,
        help="where the beam search's bookkeeping runs (default: the backend's own: onnxruntime "
        "and tensorrt host; torch on CUDA device from 12 beam rows a batch, else host): host, "
        "the numpy loop between the decoder's steps; device, with --backend torch: torch "
        "operations on the backend's device, with --cuda-graphs the whole decode in CUDA "
        "graphs; graph, with --backend onnxruntime or tensorrt: in the step graph or engine, a "
        "few values a row back each word (not yet run on TensorRT or onnxruntime-gpu). The same "
        "captions every way; --constrained and --attention search on the host whatever it says; "
        "see docs/gpu-search.md",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        help="CPU threads each onnxruntime or torch computation may use (intra-op; "
        "default: onnxruntime one per physical core, torch 1, the fastest "
        "measured on a busy 2-core machine; see docs/performance-options.md)",
    )
    p.add_argument(
        "--decode-workers",
        metavar="N",
        help="threads that read, decode and resize the next photos while the model "
        f"works on a batch; 0: none, at most {MAX_DECODE_WORKERS} (default: on a GPU one per CPU core less "
        f"one, at most {MAX_GPU_DECODE_WORKERS}; on the CPU "
        f"{DEFAULT_CPU_DECODE_WORKERS}, the fastest measured on a busy 2-core "
        "machine; see docs/performance-options.md)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="build each batch's captions (unpacking, consensus, tags) before the next batch "
        "is searched, not while it is in a second thread (default: while, on a GPU: the same "
        "captions, each batch's printed once the next one is searched; on the CPU before; "
        "see docs/performance-options.md)"
        if overlaps
        else "no effect here, taken for the other commands' sake: the service searches each "
        "batch of requests (at most --max-batch) as one batch, with nothing to overlap",
    )
    p.add_argument(
        "--beam-size",
        type=int,
        default=DEFAULTS["beam_size"],
        metavar="K",
        help=f"captions kept and extended at each word; 1 to the model's top_k "
        f"({MAX_BEAM} for the shipped model); wider is slower; "
        f"{ENGINE_BEYOND} (edgecap build makes them for "
        f"{ENGINE.max_beam} beams x {ENGINE.max_batch} images)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=DEFAULTS["max_length"],
        metavar="N",
        help=f"the search's most steps, a caption's end among them (as max_new_tokens in "
        f"other generators): a caption of N - 1 words can end, one still going at N words is cut; "
        f"1 to {MAX_LENGTH}",
    )
    p.add_argument(
        "--no-repeat-ngram",
        type=int,
        default=DEFAULTS["no_repeat_ngram"],
        metavar="N",
        help="never repeat a phrase of N words within a caption "
        f"(default: {DEFAULTS['no_repeat_ngram']}; 0: off; at most {MAX_NO_REPEAT_NGRAM})",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=DEFAULTS["length_penalty"],
        metavar="ALPHA",
        help="rank captions by log-probability / ((5 + words) / 6) ** ALPHA (GNMT's length "
        f"penalty, {LENGTH_PENALTY_RANGE[0]} to {LENGTH_PENALTY_RANGE[1]}; higher favours longer "
        "captions) instead of the mean log-probability per word (default)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        metavar="N",
        help=f"photos encoded and searched together, 1 to {MAX_BATCH_SIZE}: larger "
        "batches give more photos per second and more memory; results come "
        "a batch at a time",
    )
    guidance = p.add_mutually_exclusive_group()  # contradictory: refused, not last-one-wins
    guidance.add_argument(
        "--guidance-bonus",
        type=float,
        default=DEFAULTS["guidance_bonus"],
        metavar="X",
        help="steer the caption toward naming the photo's object tags: "
        "X is added to the log-probability of their words until a beam says one "
        f"(default: {DEFAULTS['guidance_bonus']}; {_range('guidance_bonus')})",
    )
    guidance.add_argument(
        "--no-objects-guidance",
        dest="guidance_bonus",
        action="store_const",
        const=0.0,
        help="no steering toward the object tags (--guidance-bonus 0; --constrained still makes "
        "the caption say a tag's word); the caption model alone is this with --no-fusion "
        "--no-consensus",
    )
    fusion = p.add_mutually_exclusive_group()
    fusion.add_argument(
        "--fusion-weight",
        type=float,
        default=DEFAULTS["fusion_weight"],
        metavar="X",
        help="weight of the everyday caption language model fused into the search "
        "(X * (log p_everyday - log p_in-domain) on each word; default: the "
        f"model's own, from its fusion.json; a model without one has none and refuses X > 0; "
        f"{_range('fusion_weight')})",
    )
    fusion.add_argument(
        "--no-fusion",
        dest="fusion_weight",
        action="store_const",
        const=0.0,
        help="no language-model fusion (--fusion-weight 0)",
    )
    p.add_argument(
        "--no-consensus",
        dest="consensus",
        action="store_false",
        help="the search's own best caption, not the consensus choice among the places "
        "it could have ended (see docs/everyday-photos.md; --constrained: always)",
    )
    p.add_argument(
        "--no-blank-check",
        dest="blank_check",
        action="store_false",
        help="caption every frame, even one with nothing to recognise (uniform, "
        "blurred past any detail, or a dark frame's noise), instead of saying 'nothing recognisable'",
    )
    p.add_argument(
        "--no-brighten",
        dest="brighten",
        action="store_false",
        help="caption dark frames as they are; by default a frame whose brightest 1%% of "
        "pixels (with lights in view, 5%%) are below level 128 of 255 is brightened first, by up "
        "to 8x, as a camera's auto-exposure would (see docs/cameras.md)",
    )
    p.add_argument(
        "--no-crop-bars",
        dest="crop_bars",
        action="store_false",
        help="caption frames with their letterbox or pillarbox bars; by default dark, flat bars "
        "at two opposite edges (a 16:9 picture in a 4:3 frame, or 4:3 in 16:9) are cropped first "
        "(see docs/cameras.md)",
    )
    p.add_argument(
        "--constrained",
        action="store_true",
        help="constrained beam search instead: the caption must say a word of one of "
        f"the photo's top {DEFAULTS['guidance_tags']} object tags of probability "
        f"{DEFAULTS['constraint_min_prob']} or more (2 x beam-size rows per "
        "photo; the search's own best caption, no consensus choice; see docs/everyday-photos.md)",
    )


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    """The command line's caption options; a field the command has no flag for keeps its
    default."""
    return CaptionOptions(**{name: getattr(args, name) for name in DEFAULTS if hasattr(args, name)})


def gpu_options(args: argparse.Namespace) -> dict:
    """The backend keywords of ``--precision``, ``--cuda-graphs``, ``--gpu-preprocess`` and
    ``--search`` for the backend ``--backend`` resolves to; a flag that backend or device
    cannot take is a ``ValueError`` in the command line's words (before the model is loaded)."""
    search = getattr(args, "search", None)
    keywords = {} if search is None else _search_option(resolve(args.backend), search, args.backend)
    return {**_gpu_options(args), **keywords}


# --search's choices, and which backends take each
SEARCHES = ("host", "device", "graph")
SEARCH_BACKENDS = {
    "host": ("onnxruntime", "tensorrt", "torch"),
    "device": ("torch",),
    "graph": ("onnxruntime", "tensorrt"),
}


def _search_option(backend: str, search: str, asked: str) -> dict:
    """``asked``: the --backend given (``auto`` named as what it chose)."""
    if backend not in SEARCH_BACKENDS[search]:
        takes = " or ".join(f"--backend {name}" for name in SEARCH_BACKENDS[search])
        chose = " (what --backend auto chose)" if asked == "auto" else ""
        raise ValueError(f"--search {search} is not the {backend} backend's{chose}: add {takes}")
    return {"search": search}


def _gpu_options(args: argparse.Namespace) -> dict:
    precision = getattr(args, "precision", None)
    graphs = getattr(args, "cuda_graphs", False)
    on_gpu = getattr(args, "gpu_preprocess", False)
    if precision is None and not graphs and not on_gpu:
        return {}
    backend = resolve(args.backend)
    torch_only = [flag for flag, given in (("--cuda-graphs", graphs), ("--gpu-preprocess", on_gpu)) if given]
    if torch_only and backend != "torch":
        raise ValueError(f"{torch_only[0]} is the torch backend's: add --backend torch --device cuda")
    if backend == "onnxruntime" and precision is not None:
        _check_model_precision(args.model, precision)
        return {}
    if backend == "tensorrt":
        return {} if precision is None else {"precision": precision}
    wanted = torch_only + (["--precision fp16"] if precision == "fp16" else [])
    if wanted and args.device != "cuda":
        raise ValueError(f"{wanted[0]} runs on a GPU: add --device cuda (torch runs on the CPU without it)")
    keywords: dict = {}
    if precision == "fp16":  # the FP16 that keeps the captions (docs/gpu-search.md)
        keywords.update(fp16=True, fp32_encoder=True)
    if graphs:
        keywords["cuda_graphs"] = True
    if on_gpu:
        keywords["preprocess"] = "device"
    return keywords


def _check_model_precision(model: str | None, precision: str) -> None:
    """onnxruntime runs the model's own precision: ``--precision`` must be the model's (read
    from its manifest), else a ``ValueError`` saying which model to pass instead."""
    from edgecap.api import default_model_dir
    from edgecap.manifest import load_manifest

    manifest = load_manifest(default_model_dir() if model is None else model)
    if manifest.precision == precision:
        return
    where = "the shipped model" if model is None else f"the model {model}"
    # convert takes FP32 models only: an int8 copy's FP16 copy is made from its FP32 source
    source = manifest.directory if manifest.precision == "fp32" else "FP32_DIR"
    instead = (
        f"make an FP16 copy with `edgecap convert {source} --precision fp16 --out DIR` "
        + ("" if source != "FP32_DIR" else "(FP32_DIR: the FP32 model it was converted from) ")
        + "and pass --model DIR"
        if precision == "fp16"
        else "pass an FP32 model with --model DIR (the shipped one, or `edgecap export`'s)"
    )
    raise ValueError(
        f"--precision {precision}: onnxruntime runs the model's own precision, and {where} is "
        f"{manifest.precision}: {instead}; or --backend torch or tensorrt, which choose it on a GPU"
    )


def load_captioner(args: argparse.Namespace):
    """The ``Captioner`` the arguments ask for. Raises ``ValueError`` for a bad option value."""
    from edgecap.api import Captioner

    threads = threads_value(args.threads)
    workers = decode_workers_value(getattr(args, "decode_workers", None))
    backend_options = gpu_options(args)
    if resolve(args.backend) == "torch" and (args.device or "cpu") == "cpu":
        # its activations from batch 8 on: kept, not faulted in again every call (the process
        # is the command's own; edgecap.allocator), set before any thread of the model starts
        keep_freed_memory()
    try:
        captioner = Captioner(
            model=args.model,
            backend=args.backend,
            device=args.device,
            threads=threads,
            decode_workers=workers,
            overlap=False if getattr(args, "no_overlap", False) else None,
            options=caption_options(args),
            **backend_options,
        )
    except ValueError as exc:
        raise ValueError(in_flag_words(str(exc), args)) from exc
    except BackendError as exc:  # "device='cuda' but ...": the backends' words for the API's
        message = str(exc)
        if not any(python in message for python in DEVICE_WORDS):
            raise  # as it is (a MissingPackageError stays one)
        for python, flag in DEVICE_WORDS.items():
            message = message.replace(python, flag)
        raise BackendError(message) from exc
    return captioner


def in_flag_words(message: str, args: argparse.Namespace) -> str:
    """A ``CaptionOptions`` message in the command line's words: each field the command has a
    flag for named as that flag (``beam_size must be ...`` -> ``--beam-size must be ...``)."""
    # one-word fields read as plain words ("objects"): only names with an underscore
    flags = {name: "--" + name.replace("_", "-") for name in DEFAULTS if "_" in name and hasattr(args, name)}
    return renamed(message, flags)


def renamed(message: str, flags: dict[str, str]) -> str:
    """``message`` with each Python name in ``flags`` replaced by its flag, and no None to type
    (``must be None or a number`` -> ``must be a number``: a command line cannot give None)."""
    for name, flag in flags.items():  # a word of its own, not a piece of a path or a longer name
        message = re.sub(rf"(?<![\w./-]){name}(?![\w/]|\.\w)", flag, message)
    return message.replace("must be None or a", "must be a")
