"""``edgecap caption PATH...``: caption image files, folders (searched recursively) and globs.

Prints ``PATH<TAB>caption`` per image, or with ``--json`` one JSON object per line (``path``,
``caption``, ``score``; ``error`` and a null caption for an input that failed). A failed input is
reported on stderr as ``edgecap: PATH: problem`` and the others are still captioned; the exit
code is then 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or quoted globs")
    p.add_argument("--model", help="model directory (default: the model shipped with edgecap)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: onnxruntime if installed, else torch")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where the backend runs")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20, help="most words per caption")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder run")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def expand(arg: str) -> Iterator[tuple[str, object]]:
    """One command-line PATH -> (name, input) pairs: a file (even a missing one: the captioner
    reports it), a folder's image files, or a glob's image files, sorted. A folder or glob with no
    images gives one (arg, InputError) pair."""
    from edgecap.errors import InputError

    path = Path(arg)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if _is_image_file(f))
        if not files:
            yield arg, InputError(arg, "folder holds no image files "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:
            yield str(f), str(f)
    elif path.exists() or not glob.has_magic(arg):
        yield arg, arg
    else:
        files = sorted(Path(m) for m in glob.glob(arg, recursive=True) if _is_image_file(Path(m)))
        if not files:
            yield arg, InputError(arg, "the pattern matches no image files")
        for f in files:
            yield str(f), str(f)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def run(args: argparse.Namespace) -> int:
    from edgecap.api import Captioner
    from edgecap.errors import InputError
    from PIL import Image

    # The command owns its process: Pillow's bomb warning would only repeat the InputError.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        captioner = Captioner(model=args.model, backend=args.backend, beam_size=args.beam_size,
                              max_length=args.max_length, batch_size=args.batch_size,
                              device=args.device)
    except ValueError as exc:  # a bad option value: report it like argparse would
        print(f"edgecap caption: error: {exc}", file=sys.stderr)
        return 2
    inputs = [pair for arg in args.paths for pair in expand(arg)]
    failed = 0
    for start in range(0, len(inputs), args.batch_size):
        chunk = inputs[start:start + args.batch_size]
        todo = [item for _, item in chunk if not isinstance(item, InputError)]
        captions = iter(captioner.caption_batch(todo, on_error="return"))
        for name, item in chunk:
            result = item if isinstance(item, InputError) else next(captions)
            failed += isinstance(result, InputError)
            _print(name, result, args.json)
    return 1 if failed else 0


def _print(name: str, result, as_json: bool) -> None:
    from edgecap.errors import InputError

    if isinstance(result, InputError):
        print(f"edgecap: {name}: {result.problem}", file=sys.stderr, flush=True)
        if as_json:
            line = {"path": name, "caption": None, "score": None, "error": result.problem}
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return
    if as_json:
        line = {"path": name, "caption": result.text, "score": round(result.score, 4)}
        print(json.dumps(line, ensure_ascii=False), flush=True)
    else:
        print(f"{name}\t{result.text}", flush=True)
