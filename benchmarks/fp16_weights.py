"""What storing a model's weights in fp16 would do to its captions: a copy of the model directory
whose ONNX graphs have every float32 weight rounded to float16 and back.

    python benchmarks/fp16_weights.py --roles decoder_step --out OUT
    python benchmarks/decoding_choice.py --data ../shared/data --out OUT/quality \\
        --model OUT/model --variant default=

Why: the shipped model directory is at its size cap, and a float16 copy of a weight cast back to
float32 when the graph loads (``Cast`` on an fp16 initializer) halves a graph's size; the
rounding is all that changes what the graph computes, so rounding the float32 weights in place
gives exactly the captions fp16 storage would give, with no other change to the files.

Writes ``OUT/model`` (the copy; the manifest's checksums of the rounded graphs updated, so it
loads like any model directory) and ``OUT/fp16_weights.json`` / ``.md``: per graph, the float32
initializers and weights rounded, the megabytes they take as float32 and would take as float16,
the largest relative rounding error of the weights in float16's normal range and how many
nonzero weights fall below it (rounded to float16's subnormals or to 0). ``--roles``: the
manifest's graph roles to round (``encoder``, ``decoder_step``). Needs the ``onnx`` package
(``edgecap[dev]`` or ``[export]``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ROLES = ("encoder", "decoder_step")


def round_graph(path: Path) -> dict:
    """Round every float32 initializer of the ONNX graph at ``path`` to float16 and back, in
    place; -> what was rounded."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    count = weights = tiny = 0
    worst = 0.0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32:
            continue
        rounded = array.astype(np.float16).astype(np.float32)
        if not np.isfinite(rounded).all():  # beyond float16's range: stored as float32 then
            continue
        normal = np.abs(array) >= np.finfo(np.float16).tiny  # below: float16's subnormals, or 0
        tiny += int(np.count_nonzero((array != 0) & ~normal))
        if normal.any():
            error = np.abs(rounded[normal] - array[normal]) / np.abs(array[normal])
            worst = max(worst, float(error.max()))
        init.CopyFrom(numpy_helper.from_array(rounded, init.name))
        count += 1
        weights += array.size
    onnx.save(model, str(path))
    return {
        "initializers": count,
        "weights": weights,
        "float32_mb": round(4 * weights / 1e6, 2),
        "float16_mb": round(2 * weights / 1e6, 2),
        "max_relative_error": worst,  # of the weights in float16's normal range
        "below_normal": tiny,  # nonzero weights under float16's smallest normal (6.1e-5)
    }


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--roles",
        default="encoder,decoder_step",
        help="the graphs to round, comma-separated manifest roles (default: %(default)s)",
    )
    C.add_out_argument(p)
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        p.error(f"--roles: choose among {', '.join(ROLES)} (got {args.roles!r})")
    from edgecap.manifest import file_sha256

    source = C.model_dir(args.model)
    out = C.output_dir(args.out)
    copy = out / "model"
    if copy.exists():
        p.error(f"{copy} exists: give another --out")
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    graphs = {}
    for role in roles:
        path = copy / manifest["files"][role]
        graphs[role] = round_graph(path)
        manifest["sha256"][role] = file_sha256(path)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    result = {"model": str(source), "roles": roles, "copy": str(copy), "graphs": graphs}
    (out / "fp16_weights.json").write_text(json.dumps(result, indent=1))
    headers = [
        "graph",
        "initializers",
        "weights",
        "MB as float32",
        "MB as float16",
        "largest relative error (float16's normal range)",
        "nonzero weights below it",
    ]
    rows = [
        [role, g["initializers"], g["weights"], g["float32_mb"], g["float16_mb"]]
        + [f"{g['max_relative_error']:.1e}", g["below_normal"]]
        for role, g in graphs.items()
    ]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"# fp16_weights\n\n`python benchmarks/fp16_weights.py {command}`"
        f"\n\nModel {source}; its copy with the weights below rounded to float16 and back: {copy}.\n\n"
        + C.markdown_table(headers, rows)
        + "\n"
    )
    (out / "fp16_weights.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
