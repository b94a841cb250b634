"""Could an int8 decoder step run a batch whole and still give each photo the caption it gets
alone? Two step graphs that would allow it, against the shipped int8 conversion.

    python benchmarks/int8_rows.py --data ../shared/data [--flickr8k-limit 1000] [--out DIR]

``edgecap convert --precision int8`` quantises the decoder step dynamically
(onnxruntime's ``quantize_dynamic``): a ``DynamicQuantizeLinear`` before each int8 matrix product
takes one scale and zero point over all the rows of a run, so a batch's other photos moved a
photo's caption, and the onnxruntime backend steps each image's rows in a run of their own
(``OnnxDecoderSession.per_image``), which costs batches their int8 speed. The variants here:

- ``int8`` (as shipped): the per-tensor step, each image's rows a run of their own;
- ``int8 rows``: each ``DynamicQuantizeLinear`` replaced by the same arithmetic row by row
  (``per_row_scales``: ONNX's formula over each row; onnxruntime's ``MatMulInteger`` takes one
  zero point for its first input, so each row's zero point is taken out after the product,
  ``(q - zp) @ W = q @ W - zp * colsum(W)``); a batch runs whole, and a row's result does not
  depend on the other rows;
- ``int8 static``: constant activation ranges (min and max of each quantised input over the
  beams of calibration photos, the FP32 step's values; ``static_ranges``), a batch whole.

Measured: captions identical to the FP32 model's and CIDEr on coco-ood-dev, coco-ood-dev-b and
the first ``--flickr8k-limit`` Flickr8k dev photos (beam 3, batch 8, the default decoding,
onnxruntime CPU), each with a 95% interval from resampling the photos; whether each variant's
captions at batch 8 are its captions at batch 1 (the property the per-image runs keep); and
``caption_batch`` of the example photos at batch 1 and 8, each variant in its own worker
process, interleaved (``_isolated``). Research data is read from ``--data`` only.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import _isolated as I  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402
from fp16_emulation import frames, interval  # noqa: E402

SETS = ("coco-ood-dev", "coco-ood-dev-b", "flickr8k-dev")
VARIANTS = ("fp32", "int8", "int8 rows", "int8 static")
BATCHES = (1, 8)
ALONE = 48  # Flickr8k dev photos also captioned one at a time


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--data", type=Path, required=True, help="folder holding coco-ood-dev/, coco-ood-dev-b/ and flickr8k/"
    )
    p.add_argument("--flickr8k-limit", type=int, default=1000, help="the first N Flickr8k dev photos")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="photos for int8 static's ranges (default: the first 64 Flickr8k training photos)",
    )
    C.add_harness_arguments(p, rounds=5, per_round=3, warmup=2)
    return p


# -- the step graphs -------------------------------------------------------------------------------


def per_row_scales(model) -> int:
    """Rewrite the ``onnx.ModelProto`` of a ``quantize_dynamic`` step in place: each
    ``DynamicQuantizeLinear`` computed row by row (over the last axis) and each ``MatMulInteger``
    it feeds given zero point 0, its rows' zero points taken out after its ``Cast``. Returns how
    many were rewritten; ``ValueError`` for a graph not shaped as ``quantize_dynamic`` writes it."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    added = [
        nh.from_array(np.array(0, np.uint8), "rows_zero_u8"),
        nh.from_array(np.array(0.0, np.float32), "rows_zero"),
        nh.from_array(np.array(255.0, np.float32), "rows_255"),
        nh.from_array(np.array(1e-30, np.float32), "rows_tiny"),  # an all-zero row: q = 0
    ]
    fixes: dict[str, tuple[str, str]] = {}  # a product's Cast output -> (-zero points, colsum)
    nodes: list = []

    def add(op: str, inputs: list[str], output: str, **attributes) -> None:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))

    rewritten = fixed = 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            if node.output and node.output[0] in fixes:  # + (-zp) * colsum(W), under its name
                neg_zp, colsum = fixes[node.output[0]]
                product = node.output[0]
                node.output[0] = f"{product}_with_zp"
                add("Mul", [neg_zp, colsum], f"{product}_zp")
                add("Add", [f"{product}_with_zp", f"{product}_zp"], product)
                fixed += 1
            continue
        rewritten += 1
        x = node.input[0]
        quantised, scale, zero_point = node.output
        p = f"{x}_rows"
        add("ReduceMin", [x], f"{p}_min", axes=[-1], keepdims=1)
        add("ReduceMax", [x], f"{p}_max", axes=[-1], keepdims=1)
        add("Min", [f"{p}_min", "rows_zero"], f"{p}_low")  # the range includes 0, as ONNX's
        add("Max", [f"{p}_max", "rows_zero"], f"{p}_high")
        add("Sub", [f"{p}_high", f"{p}_low"], f"{p}_range")
        add("Max", [f"{p}_range", "rows_tiny"], f"{p}_range1")
        add("Div", [f"{p}_range1", "rows_255"], scale)  # (S, 1), read by the scales' Mul as before
        add("Div", [f"{p}_low", scale], f"{p}_low_q")
        add("Round", [f"{p}_low_q"], f"{p}_neg_zp")
        add("Div", [x, scale], f"{p}_q")
        add("Round", [f"{p}_q"], f"{p}_qr")
        add("Sub", [f"{p}_qr", f"{p}_neg_zp"], f"{p}_qz")
        add("Clip", [f"{p}_qz", "rows_zero", "rows_255"], f"{p}_qc")
        add("Cast", [f"{p}_qc"], quantised, to=TensorProto.UINT8)
        for product in readers.get(quantised, []):
            weight = constants.get(product.input[1]) if product.op_type == "MatMulInteger" else None
            weight_zp = (
                constants.get(product.input[3]) if weight is not None and len(product.input) > 3 else None
            )
            casts = readers.get(product.output[0], [])
            if weight is None or product.input[0] != quantised or product.input[2] != zero_point:
                raise ValueError(
                    f"{quantised} is read by {product.op_type} {product.name!r}, not as a MatMulInteger's A"
                )
            if weight_zp is None or np.any(nh.to_array(weight_zp) != 0):
                raise ValueError(f"MatMulInteger {product.name!r}: its weight's zero point is not 0")
            if len(casts) != 1 or casts[0].op_type != "Cast":
                raise ValueError(f"MatMulInteger {product.name!r}: not followed by one Cast")
            product.input[2] = "rows_zero_u8"
            colsum = nh.to_array(weight).astype(np.int64).sum(axis=0).astype(np.float32)[None, :]
            added.append(nh.from_array(colsum, f"{product.output[0]}_colsum"))
            fixes[casts[0].output[0]] = (f"{p}_neg_zp", f"{product.output[0]}_colsum")
    if fixed != len(fixes):
        raise ValueError("a quantised product's Cast comes before its DynamicQuantizeLinear")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    return rewritten


def quantised_inputs(model) -> list[str]:
    """The tensors the step's ``DynamicQuantizeLinear`` nodes quantise."""
    return [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]


def static_ranges(fp32_step: Path, tensors: list[str], photos: list[np.ndarray], model: Path) -> dict:
    """{tensor: (min, max)} of the FP32 step's ``tensors`` over every step the FP32 model runs
    captioning ``photos`` (beam 3, batch 8): its feeds recorded, then run again with those
    tensors as outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgecap import Captioner

    captioner = Captioner(model, backend="onnxruntime", beam_size=3, batch_size=8)
    feeds = []
    run = captioner.backend.decoder.run

    def recording(outputs, feed):
        feeds.append({k: np.array(v) for k, v in feed.items()})
        return run(outputs, feed)

    captioner.backend.decoder.run = recording
    captioner.caption_batch(photos)
    graph = onnx.load(str(fp32_step))
    outputs = {o.name for o in graph.graph.output}
    graph.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in outputs
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    low = {t: np.inf for t in tensors}
    high = {t: -np.inf for t in tensors}
    for feed in feeds:
        for t, value in zip(tensors, session.run(tensors, feed)):
            low[t], high[t] = min(low[t], float(value.min())), max(high[t], float(value.max()))
    return {t: (low[t], high[t]) for t in tensors}


def static_scales(model, ranges: dict) -> None:
    """Each ``DynamicQuantizeLinear`` of ``model`` -> a ``QuantizeLinear`` with the constant
    scale and zero point of its input's range (taken to include 0, as ONNX's)."""
    from onnx import helper
    from onnx import numpy_helper as nh

    graph = model.graph
    nodes, added = [], []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        quantised, scale, zero_point = node.output
        low, high = min(ranges[node.input[0]][0], 0.0), max(ranges[node.input[0]][1], 0.0)
        s = np.float32(max(high - low, 1e-30) / 255.0)
        added += [
            nh.from_array(np.array(s, np.float32), scale),
            nh.from_array(np.array(np.clip(np.round(-low / s), 0, 255), np.uint8), zero_point),
        ]
        nodes.append(
            helper.make_node(
                "QuantizeLinear", [node.input[0], scale, zero_point], [quantised], name=quantised
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)


def variant_dir(int8: Path, name: str, rewrite) -> Path:
    """A copy of the int8 model directory ``int8`` whose step graph ``rewrite`` changed (its
    manifest's checksum updated), made afresh."""
    import onnx

    from edgecap.manifest import file_sha256, load_manifest

    out = int8.parent / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(int8, out)
    manifest = load_manifest(out)
    step = manifest.path("decoder_step")
    graph = onnx.load(str(step))
    rewrite(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(step))
    replace(manifest, sha256={**manifest.sha256, "decoder_step": file_sha256(step)}).save()
    return out


# -- captioning ------------------------------------------------------------------------------------


def captioner(model: Path, whole: bool, batch: int = 8):
    """An onnxruntime CPU Captioner of ``model`` (beam 3, the default decoding); ``whole``: an
    int8 step's batch run whole, not an image at a time."""
    from edgecap import Captioner

    cap = Captioner(model, backend="onnxruntime", beam_size=3, batch_size=batch)
    if whole:
        start = cap.backend.start

        def whole_batch(*args, **kwargs):
            session = start(*args, **kwargs)
            session.per_image = False
            return session

        cap.backend.start = whole_batch
    return cap


class CaptionTask:
    """The harness's task: ``caption_batch`` of the same photos every call, as ``latency.py``
    takes them (batch 1: astronaut.png, whose caption runs all 20 steps; batch 8: the four
    example photos twice), returning its steps and their median time as fields: a call's time
    also follows its captions' lengths, which may differ between variants."""

    def __init__(self, model: str, whole: bool, batch: int):
        self.captioner = captioner(Path(model), whole, batch)
        examples = C.example_frames()  # astronaut.png first
        self.frames = [examples[i % len(examples)] for i in range(batch)]
        self.timed = C.TimedBackend(self.captioner.backend)  # each step's wall time
        self.captioner.backend = self.timed
        first = self.captioner.caption_batch(self.frames[:1])[0].text
        self.info = {"model": model, "whole": whole, "first_caption": first}
        self.measures = {"e2e": self.e2e}

    def e2e(self):
        self.timed.reset()
        self.captioner.caption_batch(self.frames)
        steps = self.timed.step_times
        return I.Fields(steps=len(steps), step_ms=1e3 * C.median(steps))


def make_task(**kwargs) -> CaptionTask:
    return CaptionTask(**kwargs)


def references(data: Path, limit: int) -> dict[str, tuple[list[Path], dict]]:
    """{set: (photo paths, {index: reference captions})}."""
    from edgecap.evaluation.evaluate import load_references

    out = {}
    for name in SETS[:2]:
        items = load_references(references=data / name / "captions_cocofmt.json")
        out[name] = (
            [data / name / "images" / i.file_name for i in items],
            {k: i.captions for k, i in enumerate(items)},
        )
    f8k = data / "flickr8k"
    items = load_references(captions=f8k / "Flickr8k.token.txt", split=f8k / "Flickr_8k.devImages.txt")[
        :limit
    ]
    out["flickr8k-dev"] = (
        [f8k / "images" / i.file_name for i in items],
        {k: i.captions for k, i in enumerate(items)},
    )
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from edgecap.evaluation.metrics import per_image_cider

    model = C.model_dir(None)
    sets = references(args.data, args.flickr8k_limit)
    photos = {name: frames(paths) for name, (paths, _) in sets.items()}

    int8 = C.converted(model, "ort-int8", None)
    import onnx

    tensors = quantised_inputs(onnx.load(str(int8 / "decoder_step.onnx")))
    calibration = args.calibration or C.default_calibration()
    ranges = static_ranges(
        model / "decoder_step.onnx", tensors, frames(C.image_files(calibration, C.CALIBRATION_IMAGES)), model
    )
    dirs = {
        "fp32": (model, False),
        "int8": (int8, False),
        "int8 rows": (variant_dir(int8, "ort-int8-rows", per_row_scales), True),
        "int8 static": (
            variant_dir(int8, "ort-int8-static-ranges", lambda g: static_scales(g, ranges)),
            True,
        ),
    }

    texts: dict[str, dict[str, list[str]]] = {}
    alone: dict[str, list[str]] = {}  # flickr8k-dev's first ALONE photos, one at a time
    for name, (directory, whole) in dirs.items():
        cap = captioner(directory, whole)
        texts[name] = {s: [c.text for c in cap.caption_batch(fs)] for s, fs in photos.items()}
        single = captioner(directory, whole, batch=1)
        alone[name] = [single.caption_batch([f])[0].text for f in photos["flickr8k-dev"][:ALONE]]
        print(f"{name}: captioned", file=sys.stderr)

    rows, data = [], {"model": str(model), "ranges": ranges, "variants": {}}
    cider = {
        name: {s: per_image_cider(sets[s][1], dict(enumerate(texts[name][s]))) for s in SETS}
        for name in VARIANTS
    }
    for name in VARIANTS:
        same = np.array([a == b for s in SETS for a, b in zip(texts[name][s], texts["fp32"][s])], np.float64)
        scores = {s: float(np.mean(list(cider[name][s].values()))) for s in SETS}
        everyday = (scores["coco-ood-dev"] + scores["coco-ood-dev-b"]) / 2
        per_photo = [cider[name][s][k] for s in SETS for k in sorted(cider[name][s])]
        base = [cider["int8"][s][k] for s in SETS for k in sorted(cider["int8"][s])]
        vs_int8 = paired_bootstrap(base, per_photo) if name not in ("fp32", "int8") else None
        batch_same = sum(a == b for a, b in zip(alone[name], texts[name]["flickr8k-dev"]))
        low, high = interval(same)
        data["variants"][name] = {
            "identical": {
                s: int(sum(a == b for a, b in zip(texts[name][s], texts["fp32"][s]))) for s in SETS
            },
            "identical_all": int(same.sum()),
            "n": len(same),
            "interval": [low, high],
            "cider": scores,
            "cider_vs_int8": vs_int8,
            "batch8_as_alone": [int(batch_same), len(alone[name])],
        }
        rows.append(
            [
                name,
                "-" if name == "fp32" else f"{int(same.sum())}/{len(same)} ({100 * same.mean():.1f}%)",
                "-" if name == "fp32" else f"[{100 * low:.1f}, {100 * high:.1f}]",
                f"{everyday:.4f}",
                f"{scores['flickr8k-dev']:.4f}",
                "-"
                if vs_int8 is None
                else f"{vs_int8['difference']:+.4f} [{vs_int8['low']:+.4f}, {vs_int8['high']:+.4f}]",
                f"{batch_same}/{len(alone[name])}",
            ]
        )
    quality = C.markdown_table(
        [
            "variant",
            "captions identical to FP32",
            "95% interval (%)",
            "everyday CIDEr (mean of the two sets)",
            "Flickr8k dev CIDEr",
            "CIDEr per photo vs int8 (95% interval)",
            "batch 8 = alone",
        ],
        rows,
    )

    specs = [
        I.Spec(f"{name} b{batch}", "int8_rows:make_task", {"model": str(d), "whole": whole, "batch": batch})
        for batch in BATCHES
        for name, (d, whole) in dirs.items()
    ]
    timed = C.run_harness(specs, ["e2e"], args)
    t_rows = []
    e2e = timed["measures"]["e2e"]
    for batch in BATCHES:
        reference = e2e[f"int8 b{batch}"]["interleaved"]["median_ms"]
        fp32 = e2e[f"fp32 b{batch}"]["interleaved"]["median_ms"]
        for name in VARIANTS:
            entry = e2e[f"{name} b{batch}"]
            ms = entry["interleaved"]["median_ms"]
            steps, step_ms = (I.field_median(entry["interleaved"], k) for k in ("steps", "step_ms"))
            t_rows.append(
                [
                    name,
                    batch,
                    ms,
                    ms / batch,
                    fp32 / ms,
                    reference / ms,
                    steps,
                    step_ms,
                    *C.harness_cells(entry),
                ]
            )
    speed = C.markdown_table(
        [
            "variant",
            "batch",
            "call p50 ms",
            "ms per photo",
            "x FP32",
            "x int8",
            "steps a call",
            "step p50 ms",
            *C.HARNESS_HEADERS,
        ],
        t_rows,
    )
    data["timing"] = timed
    markdown = (
        f"Model: {model.name}; onnxruntime CPU, beam 3, the default decoding. Photos: "
        f"{', '.join(f'{s} ({len(sets[s][0])})' for s in SETS)}; captions at batch 8. "
        f"int8 static's ranges from {calibration} ({C.CALIBRATION_IMAGES} photos at most). "
        f"*batch 8 = alone*: of the first {ALONE} Flickr8k dev photos, how many get the same caption "
        "captioned one at a time.\n\n"
        f"{quality}\n\n"
        "`caption_batch` (e2e, beam 3) of astronaut.png at batch 1 and of the four example "
        "photos twice at batch 8, the same photos every call; steps: the decoder steps of a call "
        "(each image's own at a time for int8), step: one of them:\n\n"
        f"{speed}\n\n{C.isolation_markdown(timed)}\n"
    )
    C.write_results("int8_rows", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    C.run_main(main)
