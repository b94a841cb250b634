"""Options shared by the commands that caption (caption, eval)."""

from __future__ import annotations

import argparse

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --backend, --device, --beam-size, --max-length, --no-repeat-ngram."""
    p.add_argument("--model", help="model directory (default: the model shipped with edgecap)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: onnxruntime if installed, else tensorrt, else torch")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where the backend runs")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20, help="most words per caption")
    p.add_argument("--no-repeat-ngram", type=int, default=3, metavar="N",
                   help="never repeat a phrase of N words within a caption (default 3; 0: off)")
