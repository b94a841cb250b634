"""How far each stage is from what this machine could do: FLOPs and weight bytes of one encoder
pass and one decoder step (from the ONNX graphs), this machine's FP32 matmul peak and memory
bandwidth (measured in the same run), and the measured stage times against that floor.

    python benchmarks/floor.py                         # shipped model, beam 3, batch 1
    python benchmarks/floor.py --model runs/m --beam 5 --batch 8

Counting: Conv, MatMul and Gemm, 2 FLOPs per multiply-add, with the shapes from onnx shape
inference at the given batch (the element-wise ops, softmax and gathers are left out: they are a
few percent of the FLOPs). Weight bytes: every initializer a node reads, except embedding tables
(a Gather from an initializer), of which only the rows looked up count.

The floor of a stage is max(FLOPs / matmul peak, weight bytes / bandwidth), with the peak measured
as onnxruntime's own large FP32 MatMul (the kernels the stages use) at the same thread count, and
the bandwidth as a numpy copy of a buffer the size of the stage's weights (so it is the cache's
bandwidth where the weights fit in cache, the memory's where they do not).
"""

from __future__ import annotations

import time

import numpy as np

import _common as C

MATMUL_OPS = {"MatMul", "Gemm", "FusedGemm"}


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--beam", type=int, default=3, help="beam size: the decoder step runs beam x batch rows")
    p.add_argument("--batch", type=int, default=1, help="images per encoder pass")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: the backend's default)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=50,
        help="timed decoder steps for the median (encoder passes: a third as many, at least 5)",
    )
    C.add_out_argument(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# -- counting ------------------------------------------------------------------------------------


def graph_cost(path, dims: dict[str, int]) -> dict:
    """FLOPs and weight bytes of one run of the ONNX graph at ``path`` with its symbolic input
    dimensions set to ``dims`` (e.g. {"n": 1, "r": 3, "s": 3})."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    shapes = tensor_shapes(model, dims)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, array in inits.items():
        shapes[name] = list(array.shape)
    flops, by_op, weight_bytes, counted = 0, {}, 0, set()
    for node in model.graph.node:
        f = _node_flops(node, shapes)
        flops += f
        by_op[node.op_type] = by_op.get(node.op_type, 0) + f
        for i, name in enumerate(node.input):
            if name not in inits or name in counted:
                continue
            counted.add(name)
            array = inits[name]
            if node.op_type == "Gather" and i == 0:  # an embedding table: only the rows read
                rows = int(np.prod(shapes.get(node.input[1]) or [1]))
                weight_bytes += rows * array.nbytes // max(array.shape[0], 1)
            else:
                weight_bytes += array.nbytes
    return {
        "flops": int(flops),
        "weight_bytes": int(weight_bytes),
        "flops_by_op": {k: int(v) for k, v in by_op.items() if v},
    }


def tensor_shapes(model, dims: dict[str, int]) -> dict[str, list[int]]:
    """The shape of every tensor in one run of ``model`` on zeros, from onnxruntime itself (onnx's
    shape inference stops at the encoder's computed "same" padding)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    listed = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in listed:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                listed.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep names
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    types = {
        "tensor(float)": np.float32,
        "tensor(int32)": np.int32,
        "tensor(int64)": np.int64,
        "tensor(float16)": np.float16,
    }
    feeds = {
        i.name: np.zeros([d if isinstance(d, int) else dims[d] for d in i.shape], types[i.type])
        for i in session.get_inputs()
    }
    names = [o.name for o in session.get_outputs()]
    return {name: list(value.shape) for name, value in zip(names, session.run(names, feeds))}


def _node_flops(node, shapes) -> int:
    if node.op_type == "Conv":
        w, y = shapes[node.input[1]], shapes[node.output[0]]
        # The weight is (out channels, in channels per group, *kernel): groups are accounted for.
        _, cin_per_group, *kernel = w
        return 2 * int(np.prod(y)) * cin_per_group * int(np.prod(kernel))
    if node.op_type in MATMUL_OPS:
        a, y = shapes[node.input[0]], shapes[node.output[0]]
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        k = a[-2] if (node.op_type != "MatMul" and trans_a) else a[-1]
        return 2 * int(np.prod(y)) * k
    return 0


# -- this machine ----------------------------------------------------------------------------------


def ort_matmul_peak(threads: int | None, size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of onnxruntime's FP32 MatMul, (size x size) @ (size x size), best of ``repeats``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecap.backends.onnxruntime import session_options

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [size, size])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's (ONNX 1.12): onnx stamps its newest, which onnxruntime 1.16 refuses
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )
    a = rng.standard_normal((size, size)).astype(np.float32)
    session.run(None, {"A": a})
    best = min(_timed(lambda: session.run(None, {"A": a})) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def numpy_matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def copy_bandwidth(n_bytes: int, repeats: int = 20) -> float:
    """GB/s of a numpy copy of ``n_bytes`` (bytes read + written), best of ``repeats``."""
    src = np.ones(max(n_bytes // 4, 1024), np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- the stages ------------------------------------------------------------------------------------


def measure_stages(model, beam: int, batch: int, threads: int | None, repeats: int) -> dict:
    """Median ms of one encoder run (``batch`` images) and one decoder step (batch x beam rows),
    through edgecap's onnxruntime backend (its session options)."""
    from edgecap.backends import load_backend
    from edgecap.manifest import load_manifest

    manifest = load_manifest(model)
    options = {"device": "cpu"} if threads is None else {"device": "cpu", "threads": threads}
    backend = load_backend("onnxruntime", manifest, **options)
    h, w = manifest.preprocessing.size
    images = np.random.default_rng(0).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
    for _ in range(3):
        encoded = backend.encode(images)
    encoder = [_timed(lambda: backend.encode(images)) for _ in range(max(repeats // 3, 5))]
    image_index = np.repeat(np.arange(batch, dtype=np.int32), beam)
    rows = np.arange(len(image_index), dtype=np.int32)
    session = backend.start(encoded, image_index)
    tokens = np.full(len(rows), manifest.tokens["start"], np.int32)
    session.step(tokens, image_index)
    for _ in range(5):
        session.step(tokens, rows)
    step = [_timed(lambda: session.step(tokens, rows)) for _ in range(repeats)]
    return {
        "encoder_ms": C.median(encoder) * 1e3,
        "step_ms": C.median(step) * 1e3,
        "describe": backend.describe(),
    }


def stage_floors(model, beam: int, batch: int, threads: int | None) -> dict:
    """This machine's floor for one encoder pass (``batch`` images) and one decoder step
    (``beam`` x ``batch`` rows) of ``model``: {"ort_matmul_gflops": the peak measured now,
    "stages": {stage: FLOPs, weight bytes, the copy bandwidth at that size, the compute and
    memory floors and ``floor_ms`` = their max, and which bounds it}}."""
    from edgecap.manifest import load_manifest

    manifest = load_manifest(model)
    rows = beam * batch
    costs = {
        "encoder": graph_cost(manifest.path("encoder"), {"n": batch}),
        "decoder step": graph_cost(manifest.path("decoder_step"), {"n": batch, "r": rows, "s": rows}),
    }
    peak = ort_matmul_peak(threads)
    stages = {}
    for stage, cost in costs.items():
        bandwidth = copy_bandwidth(cost["weight_bytes"])
        compute_ms = cost["flops"] / (peak * 1e9) * 1e3
        memory_ms = cost["weight_bytes"] / (bandwidth * 1e9) * 1e3
        stages[stage] = {
            **cost,
            "copy_bandwidth_gb_per_s": bandwidth,
            "compute_floor_ms": compute_ms,
            "memory_floor_ms": memory_ms,
            "floor_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "memory",
        }
    return {"ort_matmul_gflops": peak, "stages": stages}


def floor_ms_per_image(floors: dict, steps_per_batch: float, batch: int) -> float:
    """The floor of captioning one image when a batch of ``batch`` takes one encoder pass and
    ``steps_per_batch`` decoder steps (``floors``: ``stage_floors`` at that batch)."""
    s = floors["stages"]
    return (s["encoder"]["floor_ms"] + steps_per_batch * s["decoder step"]["floor_ms"]) / batch


def main(argv=None) -> None:
    args = parse_args(argv)
    model = C.model_dir(args.model)
    from edgecap.manifest import load_manifest

    manifest = load_manifest(model)
    rows = args.beam * args.batch
    floors = stage_floors(model, args.beam, args.batch, args.threads)
    peak_one = ort_matmul_peak(1)
    peak_numpy = numpy_matmul_peak()
    measured = measure_stages(model, args.beam, args.batch, args.threads, args.repeats)
    times = {"encoder": measured["encoder_ms"], "decoder step": measured["step_ms"]}
    stages = {}
    for stage, floor in floors["stages"].items():
        ms = times[stage]
        stages[stage] = {
            **floor,
            "measured_ms": ms,
            "achieved_gflops": floor["flops"] / ms / 1e6,
            "weights_gb_per_s": floor["weight_bytes"] / ms / 1e6,
            "measured_over_floor": ms / floor["floor_ms"],
        }
    dram = copy_bandwidth(512 * 2**20, repeats=5)
    data = {
        "model": str(model),
        "dims": manifest.dims.to_dict(),
        "beam": args.beam,
        "batch": args.batch,
        "rows": rows,
        "backend": measured["describe"],
        "load_average": C.load_average(),
        "peaks": {
            "ort_matmul_gflops": floors["ort_matmul_gflops"],
            "ort_matmul_gflops_1_thread": peak_one,
            "numpy_matmul_gflops": peak_numpy,
            "dram_copy_gb_per_s": dram,
        },
        "stages": stages,
    }
    C.write_results("floor", data, report(data), argv, out=args.out)


def report(data: dict) -> str:
    p = data["peaks"]
    lines = [
        f"Model {data['model']} (hidden {data['dims']['hidden_dim']}, vocab "
        f"{data['dims']['vocab_size']}); encoder at batch {data['batch']}, decoder step at "
        f"{data['rows']} rows (beam {data['beam']} x batch {data['batch']}); "
        f"{data['backend']}; load average {data['load_average']}.",
        "",
        f"This machine: onnxruntime FP32 MatMul peak {p['ort_matmul_gflops']:.1f} GFLOP/s "
        f"(1 thread: {p['ort_matmul_gflops_1_thread']:.1f}), numpy "
        f"{p['numpy_matmul_gflops']:.1f} GFLOP/s; 512 MiB copy "
        f"{p['dram_copy_gb_per_s']:.1f} GB/s.",
        "",
    ]
    headers = [
        "stage",
        "GFLOP",
        "weights MB",
        "measured ms",
        "achieved GFLOP/s",
        "weights GB/s",
        "copy GB/s at that size",
        "floor ms",
        "bound",
        "measured / floor",
    ]
    rows = [
        [
            stage,
            s["flops"] / 1e9,
            s["weight_bytes"] / 1e6,
            s["measured_ms"],
            s["achieved_gflops"],
            s["weights_gb_per_s"],
            s["copy_bandwidth_gb_per_s"],
            s["floor_ms"],
            s["bound"],
            s["measured_over_floor"],
        ]
        for stage, s in data["stages"].items()
    ]
    lines.append(C.markdown_table(headers, rows))
    for stage, s in data["stages"].items():
        top = sorted(s["flops_by_op"].items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"\n{stage} FLOPs by op: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in top))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
