#!/usr/bin/env python3
"""Build edgecap's TensorRT engines on this device: the same as ``edgecap build``.

    python3 engines/build_engines.py --model path/to/model --precision fp16 --max-batch 8 --max-beam 5

See engines/README.md. Not yet run on real TensorRT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import edgecap  # noqa: F401
except ImportError:  # run from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from edgecap.commands import build
    from edgecap.errors import EdgecapError

    parser = argparse.ArgumentParser(prog="build_engines.py", description=build.__doc__)
    build.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return build.run(args)
    except EdgecapError as exc:
        print(f"build_engines.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
