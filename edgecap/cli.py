"""The ``edgecap`` command line. Each subcommand lives in ``edgecap/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when chosen, so
``edgecap caption`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "caption": ("edgecap.commands.caption", "caption photos, folders, globs, a video or a camera"),
    "eval": ("edgecap.commands.eval", "score a model on a captioned split (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "train": ("edgecap.commands.train", "train a captioning model (needs edgecap[train])"),
    "export": ("edgecap.commands.export", "export a checkpoint to an ONNX model directory"),
    "convert": ("edgecap.commands.convert", "convert a model directory to FP16 or int8"),
    "build": ("edgecap.commands.build", "build TensorRT engines from a model directory"),
}


def build_parser() -> argparse.ArgumentParser:
    from edgecap import __version__

    parser = argparse.ArgumentParser(prog="edgecap", description="Fast image captioning.")
    parser.add_argument("--version", action="version", version=f"edgecap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C at any moment, the imports of the first fraction of a second included
        args = build_parser().parse_args(argv)
        from edgecap.errors import EdgecapError

        try:
            return int(_load(args._module).run(args) or 0)
        except EdgecapError as exc:
            if _interrupted(exc):
                return 130
            print(f"edgecap {args.command}: error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A C extension interrupted while it initialises (onnxruntime) raises ImportError
        # "initialization failed" from the KeyboardInterrupt: still a Ctrl-C.
        if _interrupted(exc):
            return 130
        raise


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was caused, directly or not, by a KeyboardInterrupt."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
