"""Decoding cost of two model directories side by side: median ms of one decoder step.

    python benchmarks/step_compare.py edgecap/assets/default runs/models/other

One decoder step for 3 rows (one photo x beam 3) and one encoder pass per model, onnxruntime CPU
with 1 intra-op thread, the models interleaved in one process (300 steps and 30 encoder passes
each, the first 20 / 2 not counted); prints the medians and the step-time ratio B / A. Writes
nothing. Use it to see what a bigger decoder costs per word before training one to the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _sessions(model: Path, rng: np.random.Generator):
    """-> (encoder session, its feed, step session, a step feed for 1 photo x beam 3)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(model / "encoder.onnx"), options, providers=cpu)
    step = ort.InferenceSession(str(model / "decoder_step.onnx"), options, providers=cpu)
    image = {encoder.get_inputs()[0].name: rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)}
    features, att_proj, h0, c0 = encoder.run(None, image)
    rows = 3
    feed = {"tokens": np.full(rows, 1, np.int32), "h": np.repeat(h0, rows, 0),
            "c": np.repeat(c0, rows, 0), "source_rows": np.zeros(rows, np.int32),
            "features": features, "att_proj": att_proj, "image_index": np.zeros(rows, np.int32)}
    return encoder, image, step, {i.name: feed[i.name] for i in step.get_inputs()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="model directory A (the baseline)")
    p.add_argument("b", type=Path, help="model directory B")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    models = [_sessions(d, rng) for d in (args.a, args.b)]
    step_s = [[], []]
    encoder_s = [[], []]
    for rep in range(300):
        for k, (encoder, image, step, feed) in enumerate(models):
            t0 = time.perf_counter()
            step.run(None, feed)
            step_s[k].append(time.perf_counter() - t0)
            if rep % 10 == 0:
                t0 = time.perf_counter()
                encoder.run(None, image)
                encoder_s[k].append(time.perf_counter() - t0)
    for model, steps, encodes in zip((args.a, args.b), step_s, encoder_s):
        print(f"{model}: step {1000 * np.median(steps[20:]):.3f} ms, "
              f"encoder {1000 * np.median(encodes[2:]):.2f} ms")
    print(f"step ratio B / A: {np.median(step_s[1][20:]) / np.median(step_s[0][20:]):.2f}")


if __name__ == "__main__":
    main()
