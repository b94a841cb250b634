"""``edgecap convert MODEL_DIR --precision fp16 --out OUT_DIR``: a lower-precision model copy."""

from __future__ import annotations

import argparse
import sys


def precision_help() -> str:
    """What each precision converts and keeps in FP32, from the converter's own constants."""
    from edgecap.build.convert import ENCODER_FP32_BLOCKS, FP32_OP_TYPES, INT8_ENCODER_FP32_BLOCKS

    return (
        "fp16: half-precision weights and activations; kept in FP32: the encoder's stem and "
        f"first {ENCODER_FP32_BLOCKS} blocks, every {' / '.join(FP32_OP_TYPES)}, the "
        "projections computing a Softmax's input (the attention logits, the image "
        "classifier) or a LogSoftmax's (the word logits), and the word-bias Add and the "
        "gather that read the log-probabilities; "
        "inputs and outputs stay float32. int8: the decoder step's MatMul / Gemm weights "
        "quantised dynamically (its attention logits stay FP32); with --calibration also "
        "the encoder, statically, with its stem, first "
        f"{INT8_ENCODER_FP32_BLOCKS} blocks and every layer after the CNN in FP32; without "
        "--calibration the encoder stays FP32"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="an FP32 model directory (written by `edgecap export`)"
    )
    parser.add_argument("--precision", choices=("fp16", "int8"), default="fp16", help=precision_help())
    parser.add_argument(
        "--out", required=True, metavar="OUT_DIR", help="where to write the converted model directory"
    )
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        default=None,
        help="int8 only: a folder of photos to calibrate the encoder on "
        "(up to 64 are used); without it the encoder stays FP32",
    )
    parser.add_argument("--force", action="store_true", help="write into OUT_DIR even when it is not empty")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing the converted model with the original on onnxruntime CPU",
    )


def run(args: argparse.Namespace) -> int:
    from edgecap.build.convert import compare_stages, convert_model_dir
    from edgecap.commands.output import discard_stdout, escape_field, output_failed
    from edgecap.contract import ROLES
    from edgecap.errors import reason
    from edgecap.files import write_problem
    from edgecap.manifest import load_manifest

    try:
        manifest = convert_model_dir(
            args.model_dir, args.out, args.precision, calibration=args.calibration, force=args.force
        )
    except ValueError as exc:
        print(f"edgecap convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # OUT_DIR cannot be made or written: a file in the way, a full disk
        print(f"edgecap convert: error: {write_problem(exc, args.out)}", file=sys.stderr)
        return 2
    reader_gone: list[OSError] = []

    def say(line: str) -> None:
        # stdout that cannot be written (| head: its reader gone; a full disk) ends the lines,
        # not the check, which removes the manifest of a model that fails it
        if not reader_gone:
            try:
                print(line, flush=True)
            except OSError as exc:
                reader_gone.append(exc)
                discard_stdout()

    # (escaped: a folder named in another encoding is no text a UTF-8 terminal's stdout takes)
    say(f"wrote {args.precision} model to {escape_field(str(manifest.directory))}")
    for role in ROLES:
        say(f"  {escape_field(manifest.files[role])}: {manifest.path(role).stat().st_size / 1e6:.1f} MB")
    if not args.no_check:
        try:
            diffs = compare_stages(load_manifest(args.model_dir), manifest)
        except Exception as exc:  # noqa: BLE001 (onnxruntime's own types): no model is left for it
            # a model directory its check cannot run (the manifest's precision not its graphs',
            # a tampered manifest) is not left for a later command to take for a good one
            (manifest.directory / "manifest.json").unlink(missing_ok=True)
            print(
                f"edgecap convert: error: the converted model does not run on onnxruntime "
                f"({type(exc).__name__}: {reason(exc)}); its manifest.json was removed from "
                f"{manifest.directory}, so that nothing takes it for a model",
                file=sys.stderr,
            )
            return 2
        agree = diffs.pop("topk_ids_agree")
        say("largest difference from the FP32 model on random inputs (onnxruntime CPU):")
        for name, value in diffs.items():
            say(f"  {name:14s} {value:.2e}")
        say(f"  best word agrees on {agree:.0%} of rows")
    return output_failed("convert", reader_gone[0]) if reader_gone else 0
