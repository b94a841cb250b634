"""Decoding cost of two model directories side by side: median ms of one decoder step.

    python benchmarks/step_compare.py edgecap/assets/default runs/models/other

One decoder step for 3 rows (one photo x beam 3) and one encoder pass per model, onnxruntime CPU
with 1 intra-op thread, the models interleaved in one process (300 steps and 30 encoder passes
each, the first 20 / 2 not counted); prints the medians and the step-time ratio B / A. Writes
nothing. Use it to see what a bigger decoder costs per word before training one to the end.
"""
import sys, time, json
import numpy as np, onnxruntime as ort
from pathlib import Path

def sessions(d):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    m = json.load(open(Path(d) / "manifest.json"))
    enc = ort.InferenceSession(str(Path(d) / "encoder.onnx"), so, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(Path(d) / "decoder_step.onnx"), so, providers=["CPUExecutionProvider"])
    x = np.random.rand(1, 3, 224, 224).astype(np.float32) * 2 - 1
    feats, att, h0, c0 = enc.run(None, {enc.get_inputs()[0].name: x})
    R = 3
    feed = {"tokens": np.full(R, 1, np.int32), "h": np.repeat(h0, R, 0), "c": np.repeat(c0, R, 0),
            "source_rows": np.zeros(R, np.int32), "features": feats, "att_proj": att,
            "image_index": np.zeros(R, np.int32)}
    feed = {i.name: feed[i.name] for i in step.get_inputs()}
    return enc, {enc.get_inputs()[0].name: x}, step, feed

models = [sessions(d) for d in sys.argv[1:]]
enc_t = [[] for _ in models]; step_t = [[] for _ in models]
for rep in range(300):
    for k, (enc, ef, step, sf) in enumerate(models):
        t = time.perf_counter(); step.run(None, sf); step_t[k].append(time.perf_counter() - t)
        if rep % 10 == 0:
            t = time.perf_counter(); enc.run(None, ef); enc_t[k].append(time.perf_counter() - t)
for d, e, s in zip(sys.argv[1:], enc_t, step_t):
    print(d, "step ms %.3f" % (1000 * np.median(s[20:])), "encoder ms %.2f" % (1000 * np.median(e[2:])))
print("step ratio %.2f" % (np.median(step_t[1][20:]) / np.median(step_t[0][20:])))
