"""Checks shared by the backends: graph I/O against the contract and the manifest's dimensions."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence

from edgecap.contract import IO
from edgecap.errors import ModelError, out_of_memory, reason
from edgecap.manifest import Manifest, verify_files

Shape = Sequence[object]  # ints for fixed dimensions, strings / None for dynamic ones


def check_graph_io(
    manifest: Manifest,
    role: str,
    inputs: Mapping[str, Shape],
    outputs: Mapping[str, Shape],
    runs_graph: bool = True,
) -> None:
    """Raise ModelError when a graph's tensor names or fixed dimensions contradict the contract
    (``edgecap.contract``) or the manifest's dims. ``runs_graph``: the graph itself is run, so
    its inputs' row dimension must be dynamic too (the torch backend runs its own modules)."""
    path = manifest.path(role)
    want_in, want_out = IO[role]
    for kind, want, have in (("inputs", want_in, inputs), ("outputs", want_out, outputs)):
        missing = [name for name in want if name not in have]
        if missing:
            raise ModelError(
                f"{path}: the graph lacks the {kind} {missing} (it has "
                f"{sorted(have)}); it was not exported by this edgecap: re-export "
                "the model with `edgecap export`"
            )
    shapes = {**inputs, **outputs}
    for name, expected in manifest.dims.shapes(manifest.preprocessing.size)[role].items():
        actual = tuple(shapes[name])
        # Only the row dimension may be dynamic (the contract): a symbolic size where the
        # manifest has a number (the vocabulary's V, the classes' C) could not be checked.
        if len(actual) != len(expected) or any(
            e is not None and (not isinstance(a, int) or a != e) for a, e in zip(actual, expected)
        ):
            raise ModelError(
                f"{path}: tensor {name!r} has shape {list(actual)} but the manifest "
                f"says {[e if e is not None else '?' for e in expected]}; the ONNX "
                "files and manifest.json do not belong together: re-export the "
                "model or copy the whole directory again"
            )
    for name in want_in if runs_graph else ():  # the rows: images, or their beams
        rows = tuple(inputs[name])[:1]
        if rows and isinstance(rows[0], int):
            raise ModelError(
                f"{path}: input {name!r} has a fixed first dimension ({rows[0]}), where edgecap "
                "feeds any number of rows (images, or their beams); a tool that fixed the batch "
                "size made it: re-export the model with `edgecap export`"
            )


def check_declared_io(manifest: Manifest, role: str, graph, runs_graph: bool = True) -> None:
    """``check_graph_io`` of an ONNX graph (``onnx.GraphProto``) as its file declares it, for
    what reads a graph without onnxruntime (the torch backend, whose modules run at the
    manifest's preprocessing size whatever the graphs say; ``edgecap convert``). An output size
    the file leaves unnamed or symbolic (an older export) is not checked: onnxruntime infers it."""

    def declared(value) -> list:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim
        ]

    expected = manifest.dims.shapes(manifest.preprocessing.size)[role]
    outputs = {}
    for value in graph.output:
        shape = declared(value)
        known = bool(shape) and all(isinstance(d, int) for d in shape[1:])
        outputs[value.name] = shape if known or value.name not in expected else expected[value.name]
    inputs = {value.name: declared(value) for value in graph.input}
    check_graph_io(manifest, role, inputs, outputs, runs_graph)


def load_failure(manifest: Manifest, role: str, exc: BaseException) -> ModelError:
    """A ModelError for a graph file that failed to load, naming the likely cause."""
    lack = out_of_memory(exc)
    if lack is not None:  # not the file's fault: re-copying it would not help
        return ModelError(
            f"{manifest.path(role)}: cannot load the graph: out of memory ({lack}): allow it more "
            "memory (ulimit -v, the container's limit)"
        )
    try:
        verify_files(manifest)
    except ModelError as checksum_error:
        return checksum_error
    return ModelError(
        f"{manifest.path(role)}: cannot load the graph ({reason(exc)}); the file may be "
        "corrupt or truncated, or need a newer runtime: re-copy the model directory "
        "or re-export it"
    )


def max_threads() -> int:
    """The most CPU threads a backend may be given: 64, or this machine's cores where there are
    more. Past the cores a thread only waits for one; a typo (10000) took minutes and gigabytes
    to start its pool."""
    return max(64, os.cpu_count() or 1)


def check_threads(threads: object) -> int | None:
    """A backend's ``threads`` argument: None (the backend's default) or a whole number from 1
    to ``max_threads()`` (a numpy integer too) -> it as an int; anything else raises
    ``ValueError`` naming the value."""
    if threads is None:
        return None
    limit = max_threads()
    problem = f"threads must be a positive integer (at most {limit}) or None, got {threads!r}"
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise ValueError(problem)
    value = int(threads)
    if not 1 <= value <= limit:
        raise ValueError(problem)
    return value
