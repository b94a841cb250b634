"""``edgecap export``: a training checkpoint -> an ONNX model directory, checked against PyTorch."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (edgecap train's OUT/best)")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the model in a --out that is not empty; its fusion.json (with the "
        "language models' files it names) and confidence.json, fitted to that model, are "
        "removed unless the new model is the same (the same files: an export again, e.g. with "
        "--metrics); without it a non-empty --out is refused",
    )
    p.add_argument(
        "--name",
        help="model name recorded in the manifest (default: the name of the folder holding the checkpoint)",
    )
    p.add_argument(
        "--metrics",
        metavar="FILE.json",
        help="JSON file of dev metrics to record in the manifest (as written by edgecap eval --json)",
    )


def run(args: argparse.Namespace) -> int:
    from edgecap.commands.output import stdout_closed

    if stdout_closed("export"):  # started with stdout closed (>&-): as caption, before the work
        return 2
    try:
        from edgecap.build.export import export_model
    except ImportError as exc:
        from edgecap.errors import BackendError

        from edgecap.extras import install_hint

        raise BackendError(f"export needs PyTorch and onnx: {install_hint('export')} ({exc})") from exc
    try:  # imported late by the export itself: said now, not as a traceback after the work
        import onnx  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as exc:
        from edgecap.errors import BackendError

        from edgecap.extras import install_hint

        raise BackendError(f"export needs onnx and safetensors: {install_hint('export')} ({exc})") from exc
    if importlib.util.find_spec("onnxruntime") is None:  # the exported graphs are checked on it
        from edgecap.backends import missing_package_hint
        from edgecap.errors import BackendError

        raise BackendError(
            "export checks the exported graphs on onnxruntime, which is not installed: "
            + missing_package_hint("onnxruntime")
        )
    from edgecap.errors import ModelError
    from edgecap.files import FileProblem, read_json, write_problem

    extra = {}
    if args.metrics:  # a regular file under a ceiling (a pipe would hang the export)
        from edgecap.training.records import MAX_SMALL_BYTES, shown

        try:
            extra["dev_metrics"] = _checked_metrics(read_json(args.metrics, MAX_SMALL_BYTES))
        except FileProblem as exc:
            raise ModelError(f"--metrics {shown(args.metrics)}: cannot read it as JSON ({exc})") from None
        except ValueError as exc:
            raise ModelError(f"--metrics {shown(args.metrics)}: {exc}") from None
    try:
        manifest = export_model(args.checkpoint, args.out, name=args.name, extra_info=extra, force=args.force)
    except OSError as exc:  # --out cannot be made or written: no permission, a full disk
        print(f"edgecap export: error: {write_problem(exc, args.out)}", file=sys.stderr)
        return 2
    from edgecap.commands.output import json_line, output_failed, utf8_output

    utf8_output()  # as caption: a folder's name that is not ASCII on a stdout that is not UTF-8

    # the folder's name as caption's paths: a name that is not UTF-8 had been a lone surrogate
    # escape, which strict JSON readers refuse
    check = manifest.info.get("export_check", {}).get("max_abs_diff")
    try:  # the model is written: a line that cannot be is exit 2 in one line, not a traceback
        print(json_line({"model": str(manifest.directory), "export_check": check}))
        sys.stdout.flush()
    except OSError as exc:
        return output_failed("export", exc)
    return 0


def _checked_metrics(data):
    """``edgecap eval --json``'s summary as the manifest records it: a JSON object whose
    metrics (``METRIC_KEYS``) are numbers in [0, 10] or null (not computed: METEOR without
    Java) and whose numbers are all finite (Python's JSON reads Infinity and NaN, and 1e999 as
    infinity, which the manifest would then hold as JSON that other readers refuse);
    ``ValueError`` saying which value is wrong."""
    import math

    from edgecap.evaluation.metrics import METRIC_KEYS

    if not isinstance(data, dict):
        raise ValueError(f"a JSON object of metrics (edgecap eval --json), not a {type(data).__name__}")
    for key in METRIC_KEYS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} is {json.dumps(value)}, not a number")
        if value is not None and not 0 <= value <= 10:
            raise ValueError(f"{key} is {value}, not a score from 0 to 10")
    stack = [("", data)]
    while stack:  # every number finite, at any depth (no recursion: the depth is checked already)
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where or 'a value'} is {value}, not a finite number")
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return data
