"""``edgecap export``: a training checkpoint -> an ONNX model directory, checked against PyTorch."""

from __future__ import annotations

import argparse
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
    p.add_argument("--name", help="model name recorded in the manifest")
    p.add_argument(
        "--metrics",
        metavar="FILE.json",
        help="JSON file of dev metrics to record in the manifest (as written by edgecap eval --json)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from edgecap.build.export import export_model
    except ImportError as exc:
        from edgecap.errors import BackendError

        from edgecap.extras import install_hint

        raise BackendError(f"export needs PyTorch and onnx: {install_hint('export')} ({exc})") from exc
    from edgecap.errors import ModelError
    from edgecap.files import FileProblem, read_json, write_problem

    extra = {}
    if args.metrics:  # a regular file under a ceiling (a pipe would hang the export)
        from edgecap.training.records import MAX_SMALL_BYTES, shown

        try:
            extra["dev_metrics"] = read_json(args.metrics, MAX_SMALL_BYTES)
        except FileProblem as exc:
            raise ModelError(f"--metrics {shown(args.metrics)}: cannot read it as JSON ({exc})") from None
    try:
        manifest = export_model(args.checkpoint, args.out, name=args.name, extra_info=extra, force=args.force)
    except OSError as exc:  # --out cannot be made or written: no permission, a full disk
        print(f"edgecap export: error: {write_problem(exc, args.out)}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "model": str(manifest.directory),
                "export_check": manifest.info.get("export_check", {}).get("max_abs_diff"),
            }
        )
    )
    return 0
