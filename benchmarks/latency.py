"""Latency per backend / precision variant: encoder, decoder step, steps per caption, end to end.

    python benchmarks/latency.py                       # shipped model, every available variant
    python benchmarks/latency.py --model runs/m --variants ort-fp32,ort-int8 --rounds 3
    python benchmarks/latency.py --threads 1,2         # each onnxruntime variant at 1 and 2 threads

For each beam size (1, 3, 5) and batch (1, 8) every variant captions the same in-memory frames
(decoded RGB arrays of the package's example photos, like camera frames; ``--input jpeg`` feeds
JPEG bytes instead, so decoding counts too). Each variant runs in its own worker process (the
isolated harness, ``_isolated.py``; one measure per beam / batch setting): ``--rounds`` rounds
interleaved across the variants with only one worker running at a time, ``--per-round`` calls of
every setting per turn, then each variant alone in a fresh worker; a variant whose interleaved
end-to-end median is more than 15% off its alone median is flagged. Reported: medians of the
encoder run and of one decoder step, steps per caption, the median and p95 of the end-to-end
call (``Captioner.caption_batch``, timed by the harness), and the Python side of it:
preprocessing and the search's own work (all that is neither the encoder nor a decoder step);
the stage figures are measured inside each call and returned to the harness. The targets and
ratios use the interleaved medians.

Writes latency.json, latency.md and (with Pillow) latency.png into ``--out DIR`` (default: a new
folder under benchmarks/runs/).
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import time
from pathlib import Path

import _common as C
import _isolated as I

BEAMS = (1, 3, 5)
BATCHES = (1, 8)
HEADLINE = (3, 1)  # (beam, batch) used for the targets
INT8_TARGET = 1.8  # int8 vs FP32 end to end (issue 12), with dev CIDEr within 0.01
CIDER_TOLERANCE = 0.01
QUALITY = C.RESULTS_DIR / "quality_speed.json"  # quality_speed.py's committed figures
STAGES = ("encoder_ms", "step_ms", "steps", "decode_ms", "preprocess_ms", "search_python_ms")


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_model_arguments(p)
    p.add_argument(
        "--beams",
        type=C.int_list(1),
        default=",".join(map(str, BEAMS)),
        help="beam sizes to time, comma-separated",
    )
    p.add_argument(
        "--batches",
        type=C.batch_sizes,
        default=",".join(map(str, BATCHES)),
        help="batch sizes to time (images per caption_batch call), comma-separated",
    )
    C.add_harness_arguments(p, rounds=5, per_round=3, warmup=2)
    p.add_argument(
        "--max-length",
        type=C.positive_int,
        default=20,
        help="most words per caption (a random model runs to it)",
    )
    p.add_argument(
        "--input",
        choices=("frame", "jpeg"),
        default="frame",
        help="frame: decoded RGB arrays of the example photos; jpeg: the same as JPEG bytes, "
        "so decoding counts too",
    )
    p.add_argument("--no-chart", action="store_true", help="skip the chart (latency.png beside the results)")
    p.add_argument(
        "--quality",
        type=Path,
        default=None,
        help="quality_speed.py's JSON, for the dev CIDEr beside the int8 target (default: "
        "benchmarks/results/quality_speed.json where it is there and readable)",
    )
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quality is not None:
        try:  # read before the run: a file named that cannot be used is said now, not ignored
            quality(args.quality, named=True)
        except ValueError as exc:
            parser.error(f"argument --quality: {exc}")
    return args


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


def measure_once(captioner, timed: C.TimedBackend, images: list) -> I.Fields:
    """One ``caption_batch`` call, with its stages measured inside it."""
    timed.reset()
    t0 = time.perf_counter()
    captions = captioner.caption_batch(images)
    e2e = (time.perf_counter() - t0) * 1e3
    preprocess = sum(c.timings["preprocess_ms"] for c in captions)
    encoder = timed.encode_s * 1e3
    steps = [s * 1e3 for s in timed.step_times]
    decode = sum(steps)
    return I.Fields(
        e2e_ms=e2e,
        preprocess_ms=preprocess,
        encoder_ms=encoder,
        decode_ms=decode,
        steps=len(steps),
        step_ms=C.median(steps),
        search_python_ms=e2e - preprocess - encoder - decode,
    )


def setting_name(beam: int, batch: int) -> str:
    return f"beam{beam}-batch{batch}"


# -- in the worker ---------------------------------------------------------------------------------


class LatencyTask:
    """One variant's Captioner (loaded once) and one measure per beam / batch setting: a
    ``caption_batch`` call on that setting's inputs, returning its stage timings."""

    def __init__(self, variant: dict, beams: list[int], batches: list[int], max_length: int, input: str):
        v = C.Variant.from_json(variant)
        base, timed = v.timed_captioner(beam_size=max(beams), max_length=max_length, batch_size=max(batches))
        images = {batch: inputs(input, batch) for batch in batches}
        self.measures = {}
        for beam, batch in itertools.product(beams, batches):
            runner = _reuse(base, timed, beam, batch, max_length)
            self.measures[setting_name(beam, batch)] = lambda runner=runner, batch=batch: measure_once(
                runner, timed, images[batch]
            )
        self.info = {
            "describe": timed.describe(),
            "model": str(v.model),
            "backend": v.backend,
            "options": v.options,
            "session_config": v.session_config,
        }


def make_task(**kwargs) -> LatencyTask:
    return LatencyTask(**kwargs)


# -- in the parent ---------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    variants, notes = C.resolve_variants(args)
    if not variants:
        sys.exit("no variant can run here: " + "; ".join(notes))
    beams, batches = args.beams, args.batches
    settings = list(itertools.product(beams, batches))
    specs = [
        v.spec(
            "latency:make_task", beams=beams, batches=batches, max_length=args.max_length, input=args.input
        )
        for v in variants
    ]
    load_before = C.load_average()
    harness = C.run_harness(specs, [setting_name(b, n) for b, n in settings], args)
    results = [
        {
            "variant": v.name,
            "beam": beam,
            "batch": batch,
            **summarise(harness["measures"][setting_name(beam, batch)][v.name], batch),
        }
        for beam, batch in settings
        for v in variants
    ]
    data = {
        "settings": {
            "beams": beams,
            "batches": batches,
            "max_length": args.max_length,
            "input": args.input,
            "load_average": [load_before, C.load_average()],
            **harness["settings"],
        },
        "variants": {
            v.name: {
                "backend": v.backend,
                "model": str(v.model),
                "options": v.options,
                "session_config": v.session_config,
                **harness["variants"][v.name],
            }
            for v in variants
        },
        "skipped": notes,
        "results": results,
        "flags": harness["flags"],
        "targets": targets(results, beams, batches, quality(args.quality)),
    }
    data["variants"] = {
        n: {**v, "describe": v.get("info", {}).get("describe", "")} for n, v in data["variants"].items()
    }
    written = C.write_results("latency", data, report(data), argv, out=args.out)
    if not args.no_chart:
        try:
            import chart

            png = written.parent / "latency.png"
            print(f"chart: {chart.latency_chart(data, out=png)}")
        except ImportError as exc:  # Pillow missing
            print(f"no chart: {exc}", file=sys.stderr)
    if data["flags"]:
        print("FLAGGED: " + "; ".join(data["flags"]), file=sys.stderr)


def summarise(entry: dict, batch: int) -> dict:
    """One variant at one setting, from its ``run_isolated`` entry: end to end from the
    harness's times, the stages from the calls' fields (interleaved medians), and the alone
    median with the flag."""
    inter = entry["interleaved"]
    out = {k: I.field_median(inter, k) for k in STAGES}
    e2e = inter["median_ms"]
    fields = inter.get("fields", {})
    shares = [
        (p + s) / e
        for p, s, e in zip(
            fields.get("preprocess_ms", []), fields.get("search_python_ms", []), fields.get("e2e_ms", [])
        )
        if e > 0
    ]
    out.update(
        e2e_p50_ms=e2e,
        e2e_p95_ms=inter["p95_ms"],
        per_image_ms=e2e / batch,
        python_share=C.median(shares) if shares else float("nan"),
        steps_vs_encoder=out["decode_ms"] / out["encoder_ms"],
        e2e_alone_p50_ms=entry.get("alone", {}).get("median_ms", float("nan")),
        e2e_alone_p95_ms=entry.get("alone", {}).get("p95_ms", float("nan")),
        interleaved_vs_alone=entry.get("interleaved_vs_alone"),
        flagged=bool(entry.get("flagged")),
    )
    return out


def _reuse(base, timed, beam: int, batch: int, max_length: int):
    """A Captioner sharing ``base``'s model and (timed) backend, with its own options."""
    runner = C.reuse_captioner(base, beam_size=beam, batch_size=batch, max_length=max_length)
    runner.options.validate(base.manifest.dims.top_k)
    runner.backend = timed
    return runner


def quality(path: Path | None, named: bool = False) -> dict:
    """{variant: dev CIDEr} from quality_speed.py's JSON ``path`` (None: the committed one), with
    where it came from; {} when there is none or it cannot be read, unless ``named`` (the user
    named it with --quality): then ``ValueError`` saying what is wrong with it, in one line."""
    path = QUALITY if path is None else path
    try:
        data = json.loads(Path(path).read_text())
        return {
            "source": f"{path} ({data.get('date', '?')}, {data['images']} photos)",
            "cider": {r["variant"]: r["CIDEr"] for r in data["results"]},
        }
    except OSError as exc:
        problem = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        problem = f"not quality_speed.py's JSON ({type(exc).__name__}: {exc})".replace("\n", " ")
    if named:
        raise ValueError(f"{path}: {problem}")
    return {}


def _base(name: str) -> str:
    return name.split("/")[0]


def targets(results: list[dict], beams, batches, quality: dict | None = None) -> dict:
    """The issue's targets, at beam 3 / batch 1 (or the nearest measured setting), from the
    interleaved medians. int8: every int8 variant (ort-int8, ort-int8-static, and any
    ``--model-dir`` variant) against FP32, with its dev CIDEr from quality_speed.py's JSON."""
    beam = HEADLINE[0] if HEADLINE[0] in beams else beams[0]
    batch = HEADLINE[1] if HEADLINE[1] in batches else batches[0]
    at = {r["variant"]: r for r in results if r["beam"] == beam and r["batch"] == batch}
    out: dict = {"beam": beam, "batch": batch, "int8": {}}
    fp32_name = next((k for k in at if _base(k) == "ort-fp32"), None)
    fp32 = at.get(fp32_name)
    if fp32 and "torch-eager" in at:
        out["ort_fp32_vs_torch_e2e"] = at["torch-eager"]["e2e_p50_ms"] / fp32["e2e_p50_ms"]
    if fp32:
        out["ort_fp32_decode_over_encoder"] = fp32["decode_ms"] / fp32["encoder_ms"]
    if not fp32:
        return out
    builtin = set(C.VARIANTS)
    cider = (quality or {}).get("cider", {})
    for name, r in at.items():
        if _base(name) in ("ort-int8", "ort-int8-static") or _base(name) not in builtin:
            # against FP32 at the same split (--threads / --spinning: NAME/t2 against
            # ort-fp32/t2), where it ran; the dev CIDEr does not depend on the split
            twin = "ort-fp32" + name[len(_base(name)) :]
            against = twin if twin in at else fp32_name
            base = at[against]
            entry = {
                "against": against,
                "e2e": base["e2e_p50_ms"] / r["e2e_p50_ms"],
                "step": base["step_ms"] / r["step_ms"],
                "encoder": base["encoder_ms"] / r["encoder_ms"],
            }
            mine = name if name in cider else _base(name)
            theirs = against if against in cider else "ort-fp32"
            if mine in cider and theirs in cider:
                entry["cider_delta"] = cider[mine] - cider[theirs]
                entry["cider_source"] = quality["source"]
            out["int8"][name] = entry
    return out


def report(data: dict) -> str:
    s = data["settings"]
    lines = [
        f"Input: {s['input']}s of the example photos; max {s['max_length']} words. "
        f"Load average before/after: {s['load_average'][0]} / {s['load_average'][1]} "
        "(a busy machine inflates and scatters every figure).",
        "",
    ]
    for name, v in data["variants"].items():
        config = "".join(f"; {k}={val}" for k, val in v["session_config"].items())
        lines.append(f"- {name}: {v['describe']}{config}; model {v['model']}")
    lines += [f"- {note}" for note in data["skipped"]]
    headers = [
        "variant",
        "beam",
        "batch",
        "encoder ms",
        "step ms",
        "steps",
        "decode ms",
        "preproc ms",
        "search py ms",
        "e2e p50 ms",
        "e2e p95 ms",
        "ms/image",
        "python share",
        "decode/encoder",
        *("e2e " + h for h in C.HARNESS_HEADERS),
    ]
    rows = [
        [
            r["variant"],
            r["beam"],
            r["batch"],
            r["encoder_ms"],
            r["step_ms"],
            r["steps"],
            r["decode_ms"],
            r["preprocess_ms"],
            r["search_python_ms"],
            r["e2e_p50_ms"],
            r["e2e_p95_ms"],
            r["per_image_ms"],
            f"{100 * r['python_share']:.0f}%",
            r["steps_vs_encoder"],
            *C.harness_cells(
                {
                    "alone": {"median_ms": r["e2e_alone_p50_ms"]},
                    "interleaved_vs_alone": r["interleaved_vs_alone"],
                    "flagged": r["flagged"],
                }
            ),
        ]
        for r in sorted(data["results"], key=lambda r: (r["beam"], r["batch"]))
    ]
    lines += [
        "",
        C.markdown_table(headers, rows),
        "",
        "All interleaved medians except the alone column. encoder / step / decode: "
        "medians; decode = all steps of one call; search py = end to end minus "
        "preprocessing, encoder and steps (the search's own numpy work); python share = "
        "(preprocessing + search py) / end to end.",
        "",
        C.isolation_markdown({"settings": s, "flags": data["flags"], "variants": data["variants"]}),
        "",
    ]
    t = data["targets"]
    checks = [
        (
            "onnxruntime FP32 vs PyTorch eager, end to end",
            "ort_fp32_vs_torch_e2e",
            ">= 5x",
            lambda x: x >= 5,
            "x",
        ),
        (
            "onnxruntime FP32: all steps of one caption / one encoder pass",
            "ort_fp32_decode_over_encoder",
            "<= 1",
            lambda x: x <= 1,
            "",
        ),
    ]
    rows = [
        [label, f"{t[key]:.2f}{unit}", goal, "met" if ok(t[key]) else "NOT met"]
        for label, key, goal, ok, unit in checks
        if key in t
    ]
    for name, e in t.get("int8", {}).items():
        fp32 = "FP32" if e.get("against", "ort-fp32") == "ort-fp32" else e["against"]
        fast = e["e2e"] >= INT8_TARGET
        if "cider_delta" in e:
            kept = abs(e["cider_delta"]) <= CIDER_TOLERANCE
            verdict = "met" if fast and kept else "NOT met"
            cider = f"; dev CIDEr {e['cider_delta']:+.3f}"
        else:
            verdict = "speed met, CIDEr not measured" if fast else "NOT met"
            cider = "; dev CIDEr: no quality_speed.py figure"
        rows += [
            [
                f"{name} vs {fp32}, end to end",
                f"{e['e2e']:.2f}x{cider}",
                f">= {INT8_TARGET}x with dev CIDEr within {CIDER_TOLERANCE}",
                verdict,
            ],
            [f"{name} vs {fp32}, one decoder step", f"{e['step']:.2f}x", "(for information)", ""],
            [f"{name} vs {fp32}, encoder", f"{e['encoder']:.2f}x", "(for information)", ""],
        ]
    sources = sorted({e["cider_source"] for e in t.get("int8", {}).values() if "cider_source" in e})
    lines += [
        f"Targets at beam {t['beam']}, batch {t['batch']} (interleaved medians, each "
        "variant in its own process):",
        "",
        C.markdown_table(["ratio", "measured", "target", ""], rows),
    ]
    if sources:
        lines += [
            "",
            "dev CIDEr from " + "; ".join(sources) + " (run quality_speed.py with the "
            "same variants for a current figure).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
