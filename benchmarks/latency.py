"""Latency per backend / precision variant: encoder, decoder step, steps per caption, end to end.

    python benchmarks/latency.py                       # shipped model, every available variant
    python benchmarks/latency.py --model runs/m --variants ort-fp32,ort-int8 --repeats 10
    python benchmarks/latency.py --threads 1,2         # each onnxruntime variant at 1 and 2 threads

For each beam size (1, 3, 5) and batch (1, 8) every variant captions the same in-memory frames
(decoded RGB arrays of the package's example photos, like camera frames; ``--input jpeg`` feeds
JPEG bytes instead, so decoding counts too). The variants run interleaved, one call each in turn,
after ``--warmup`` calls each, so a change in machine load hits them alike. Reported: medians of
the encoder run and of one decoder step, steps per caption, the median and p95 of the end-to-end
call (``Captioner.caption_batch``), and the Python side of it: preprocessing and the search's own
work (all that is neither the encoder nor a decoder step).

Writes results/latency.json, results/latency.md and (with Pillow) results/latency.png.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time

import _common as C

BEAMS = (1, 3, 5)
BATCHES = (1, 8)
HEADLINE = (3, 1)  # (beam, batch) used for the targets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_model_arguments(p)
    p.add_argument("--beams", default=",".join(map(str, BEAMS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--repeats", type=int, default=15, help="measured calls per variant and setting")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured calls per variant and setting")
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--input", choices=("frame", "jpeg"), default="frame")
    p.add_argument("--no-chart", action="store_true", help="skip results/latency.png")
    return p.parse_args(argv)


def inputs(kind: str, batch: int) -> list:
    frames = C.example_frames()
    chosen = [frames[i % len(frames)] for i in range(batch)]
    if kind == "frame":
        return chosen
    from PIL import Image

    encoded = []
    for frame in chosen:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def measure_once(captioner, timed: C.TimedBackend, images: list) -> dict:
    timed.reset()
    t0 = time.perf_counter()
    captions = captioner.caption_batch(images)
    e2e = (time.perf_counter() - t0) * 1e3
    preprocess = sum(c.timings["preprocess_ms"] for c in captions)
    encoder = timed.encode_s * 1e3
    steps = [s * 1e3 for s in timed.step_times]
    decode = sum(steps)
    return {"e2e_ms": e2e, "preprocess_ms": preprocess, "encoder_ms": encoder,
            "decode_ms": decode, "steps": len(steps), "step_ms": C.median(steps),
            "search_python_ms": e2e - preprocess - encoder - decode}


def summarise(runs: list[dict], batch: int) -> dict:
    def med(key):
        return C.median([r[key] for r in runs])

    e2e = [r["e2e_ms"] for r in runs]
    summary = {k: med(k) for k in ("encoder_ms", "step_ms", "steps", "decode_ms",
                                   "preprocess_ms", "search_python_ms")}
    summary.update(e2e_p50_ms=C.median(e2e), e2e_p95_ms=C.percentile(e2e, 95),
                   per_image_ms=C.median(e2e) / batch,
                   python_share=C.median([(r["preprocess_ms"] + r["search_python_ms"])
                                          / r["e2e_ms"] for r in runs]),
                   steps_vs_encoder=(med("decode_ms") / batch) / (med("encoder_ms") / batch))
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    variants, notes = C.resolve_variants(args)
    if not variants:
        sys.exit("no variant can run here: " + "; ".join(notes))
    beams = [int(b) for b in args.beams.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    settings = list(itertools.product(beams, batches))
    images = {batch: inputs(args.input, batch) for batch in batches}

    # One Captioner per variant and setting (beam and batch are Captioner options); the
    # backend is loaded once per variant and shared.
    runners = {}
    for v in variants:
        base = v.captioner(beam_size=max(beams), max_length=args.max_length,
                           batch_size=max(batches))
        timed = C.TimedBackend(base.backend)
        for beam, batch in settings:
            runners[v.name, beam, batch] = (_reuse(base, timed, beam, batch, args.max_length),
                                            timed)
        print(f"[load] {v.name}: {timed.describe()} ({v.model})", file=sys.stderr)

    load_before = C.load_average()
    runs = {key: [] for key in runners}
    names = [v.name for v in variants]
    for beam, batch in settings:
        for name in names:
            runner, timed = runners[name, beam, batch]
            for _ in range(args.warmup):
                measure_once(runner, timed, images[batch])
    for rep in range(args.repeats):
        for beam, batch in settings:
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
            for name in order:
                runner, timed = runners[name, beam, batch]
                runs[name, beam, batch].append(measure_once(runner, timed, images[batch]))
        print(f"[run] repeat {rep + 1}/{args.repeats}", file=sys.stderr)

    results = []
    for (name, beam, batch), rs in runs.items():
        results.append({"variant": name, "beam": beam, "batch": batch, **summarise(rs, batch)})
    data = {"settings": {"beams": beams, "batches": batches, "repeats": args.repeats,
                         "warmup": args.warmup, "max_length": args.max_length,
                         "input": args.input, "load_average": [load_before, C.load_average()]},
            "variants": {v.name: {"backend": v.backend, "model": str(v.model),
                                  "options": v.options, "session_config": v.session_config,
                                  "describe": runners[v.name, beams[0], batches[0]][1].describe()}
                         for v in variants},
            "skipped": notes, "results": results, "targets": targets(results, beams, batches)}
    C.write_results("latency", data, report(data), argv)
    if not args.no_chart:
        try:
            import chart
            print(f"chart: {chart.latency_chart(data)}")
        except ImportError as exc:  # Pillow missing
            print(f"no chart: {exc}", file=sys.stderr)


def _reuse(base, timed, beam: int, batch: int, max_length: int):
    """A Captioner sharing ``base``'s model and (timed) backend, with its own options."""
    import copy
    from dataclasses import replace

    runner = copy.copy(base)
    runner.options = replace(base.options, beam_size=beam, batch_size=batch, max_length=max_length)
    runner.options.validate(base.manifest.dims.top_k)
    runner.backend = timed
    return runner


def targets(results: list[dict], beams, batches) -> dict:
    """The issue's targets, at beam 3 / batch 1 (or the nearest measured setting)."""
    beam = HEADLINE[0] if HEADLINE[0] in beams else beams[0]
    batch = HEADLINE[1] if HEADLINE[1] in batches else batches[0]
    at = {r["variant"]: r for r in results if r["beam"] == beam and r["batch"] == batch}
    out: dict = {"beam": beam, "batch": batch}
    fp32 = next((r for k, r in at.items() if k.split("/")[0] == "ort-fp32"), None)
    int8 = next((r for k, r in at.items() if k.split("/")[0] == "ort-int8"), None)
    if fp32 and "torch-eager" in at:
        out["ort_fp32_vs_torch_e2e"] = at["torch-eager"]["e2e_p50_ms"] / fp32["e2e_p50_ms"]
    if fp32:
        out["ort_fp32_decode_over_encoder"] = fp32["decode_ms"] / fp32["encoder_ms"]
    if fp32 and int8:
        out["ort_int8_vs_fp32_e2e"] = fp32["e2e_p50_ms"] / int8["e2e_p50_ms"]
        out["ort_int8_vs_fp32_step"] = fp32["step_ms"] / int8["step_ms"]
    static = next((r for k, r in at.items() if k.split("/")[0] == "ort-int8-static"), None)
    if fp32 and static:
        out["ort_int8_static_vs_fp32_encoder"] = fp32["encoder_ms"] / static["encoder_ms"]
        out["ort_int8_static_vs_fp32_e2e"] = fp32["e2e_p50_ms"] / static["e2e_p50_ms"]
    return out


def report(data: dict) -> str:
    s = data["settings"]
    lines = [f"Input: {s['input']}s of the example photos; {s['repeats']} measured calls per cell "
             f"after {s['warmup']} warm-up, variants interleaved; max {s['max_length']} words. "
             f"Load average before/after: {s['load_average'][0]} / {s['load_average'][1]} "
             "(a busy machine inflates and scatters every figure).", ""]
    for name, v in data["variants"].items():
        config = "".join(f"; {k}={val}" for k, val in v["session_config"].items())
        lines.append(f"- {name}: {v['describe']}{config}; model {v['model']}")
    lines += [f"- {note}" for note in data["skipped"]]
    headers = ["variant", "beam", "batch", "encoder ms", "step ms", "steps", "decode ms",
               "preproc ms", "search py ms", "e2e p50 ms", "e2e p95 ms", "ms/image",
               "python share", "decode/encoder"]
    rows = [[r["variant"], r["beam"], r["batch"], r["encoder_ms"], r["step_ms"], r["steps"],
             r["decode_ms"], r["preprocess_ms"], r["search_python_ms"], r["e2e_p50_ms"],
             r["e2e_p95_ms"], r["per_image_ms"], f"{100 * r['python_share']:.0f}%",
             r["steps_vs_encoder"]]
            for r in sorted(data["results"], key=lambda r: (r["beam"], r["batch"]))]
    lines += ["", C.markdown_table(headers, rows), "",
              "encoder / step / decode: medians; decode = all steps of one call; "
              "search py = end to end minus preprocessing, encoder and steps (the search's own "
              "numpy work); python share = (preprocessing + search py) / end to end.", ""]
    t = data["targets"]
    checks = [("onnxruntime FP32 vs PyTorch eager, end to end", "ort_fp32_vs_torch_e2e", ">= 5x",
               lambda x: x >= 5, "x"),
              ("onnxruntime FP32: all steps of one caption / one encoder pass",
               "ort_fp32_decode_over_encoder", "<= 1", lambda x: x <= 1, ""),
              ("int8 vs FP32, end to end", "ort_int8_vs_fp32_e2e", ">= 1.5x",
               lambda x: x >= 1.5, "x"),
              ("int8 vs FP32, one decoder step", "ort_int8_vs_fp32_step", "(for information)",
               None, "x"),
              ("static int8 encoder vs FP32 encoder", "ort_int8_static_vs_fp32_encoder",
               "(keep if > 1)", None, "x"),
              ("int8 (static encoder) vs FP32, end to end", "ort_int8_static_vs_fp32_e2e",
               "(for information)", None, "x")]
    rows = [[label, f"{t[key]:.2f}{unit}", goal,
             "" if ok is None else ("met" if ok(t[key]) else "NOT met")]
            for label, key, goal, ok, unit in checks if key in t]
    lines += [f"Targets at beam {t['beam']}, batch {t['batch']}:", "",
              C.markdown_table(["ratio", "measured", "target", ""], rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
