"""``edgecap build``: build the TensorRT engines for this GPU (run it on the target device).

Engines are tied to the GPU and the TensorRT version, so they are built where they run and kept
in a cache (default ``~/.cache/edgecap/engines``); the TensorRT backend finds them there (any
cached engine whose limits cover what it needs), and builds them itself on first use when this
was not run. Not yet run on real TensorRT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecap.commands._options import ENGINE, ENGINE_BEYOND, MAX_BATCH_SIZE, MAX_BEAM, renamed
from edgecap.trt import STRONGLY_TYPED_FP16_FROM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="model directory (default: the model shipped with edgecap)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        default="fp16",
        help="engine precision. fp16: the decoder step's engine FP16 behind an FP32 encoder "
        "engine, the FP16 that keeps the captions (both FP16 from an FP16 model directory), "
        "the engines `edgecap caption --backend tensorrt` loads; on TensorRT "
        f"{'.'.join(map(str, STRONGLY_TYPED_FP16_FROM))} or later built from "
        "the graphs of `edgecap convert --precision fp16`, with the parts that "
        "lists in FP32 (see edgecap convert --help); on older TensorRT the "
        "layers of those same parts are asked to stay FP32",
    )
    # The defaults are the default engine's (edgecap.contract.Limits): what `edgecap caption
    # --backend tensorrt` asks for at least, so its engines are the ones built here; any
    # engine whose limits cover a request is reused.
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ENGINE.max_batch,
        metavar="N",
        help=f"most images per batch the engines accept, 1 to {MAX_BATCH_SIZE} (edgecap "
        "caption's --batch-size, which goes up to that)",
    )
    parser.add_argument(
        "--max-beam",
        type=int,
        default=ENGINE.max_beam,
        metavar="K",
        help="most beams per image the engines accept: edgecap caption's "
        f"--beam-size, which goes up to the model's top_k ({MAX_BEAM} for the "
        f"shipped model), or 2 x it with --constrained; {ENGINE_BEYOND}",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="engine cache directory (default: $EDGECAP_CACHE/engines, else "
        "$XDG_CACHE_HOME/edgecap/engines, else ~/.cache/edgecap/engines)",
    )


def run(args: argparse.Namespace) -> int:
    from edgecap.api import default_model_dir
    from edgecap.manifest import load_manifest, verify_files
    from edgecap.contract import Limits
    from edgecap.trt.engines import build_all, default_cache_dir

    manifest = load_manifest(args.model or default_model_dir())
    verify_files(manifest)
    try:
        limits = Limits(args.max_batch, args.max_beam)
    except ValueError as exc:
        flags = {"max_batch": "--max-batch", "max_beam": "--max-beam"}
        print(f"edgecap build: error: {renamed(str(exc), flags)}", file=sys.stderr)
        return 2
    # caption, eval, serve and Captioner run at most MAX_BATCH_SIZE images a batch (CaptionOptions
    # refuses a larger batch_size), so an engine for more is never needed; without this bound a
    # huge N reached TensorRT's builder as a profile, the graphs already prepared in the cache
    if args.max_batch > MAX_BATCH_SIZE:
        print(
            f"edgecap build: error: --max-batch must be between 1 and {MAX_BATCH_SIZE} (edgecap "
            f"caption's largest --batch-size), got {args.max_batch}",
            file=sys.stderr,
        )
        return 2
    top_k = manifest.dims.top_k
    if args.max_beam > 2 * top_k:  # a constrained search takes 2 x its beam (at most top_k)
        print(
            f"edgecap build: error: --max-beam {args.max_beam}: this model searches at most "
            f"{top_k} beams (its top_k; 2 x {top_k} rows constrained)",
            file=sys.stderr,
        )
        return 2
    cache_dir = Path(args.out) if args.out else default_cache_dir()
    paths = build_all(manifest, args.precision, limits, cache_dir)
    for path in paths:
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
