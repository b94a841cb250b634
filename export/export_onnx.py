#!/usr/bin/env python
"""Export stage entry point: checkpoint -> ONNX model directory (same as `edgecap export`).

    python export/export_onnx.py runs/sat/best --out models/my-model [--name NAME] [--metrics M.json]

The library code is edgecap/build/export.py; this script exists so the pipeline's stages are visible
at the top level (export/ here, engines/ for TensorRT).
"""

import sys

from edgecap.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
