"""Checks shared by the backends: graph I/O against the contract and the manifest's dimensions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgecap.backends.base import ENCODER_INPUTS, ENCODER_OUTPUTS, STEP_INPUTS, STEP_OUTPUTS
from edgecap.errors import ModelError
from edgecap.manifest import Manifest, verify_files

Shape = Sequence[object]  # ints for fixed dimensions, strings / None for dynamic ones


def expected_shapes(manifest: Manifest) -> dict[str, dict[str, tuple]]:
    """role -> tensor name -> expected shape (None for a dynamic dimension), from the manifest."""
    d = manifest.dims
    L, F, A, H, K = d["regions"], d["feature_dim"], d["attention_dim"], d["hidden_dim"], d["top_k"]
    height, width = manifest.preprocessing.size
    image_side = {"features": (None, L, F), "att_proj": (None, L, A), "h0": (None, H),
                  "c0": (None, H)}
    return {
        "encoder": {"image": (None, 3, height, width), **image_side},
        "decoder_step": {"tokens": (None,), "h": (None, H), "c": (None, H), "source_rows": (None,),
                         "features": (None, L, F), "att_proj": (None, L, A),
                         "image_index": (None,), "topk_logprobs": (None, K),
                         "topk_ids": (None, K), "h_out": (None, H), "c_out": (None, H),
                         "alpha": (None, L)},
    }


CONTRACT = {"encoder": (ENCODER_INPUTS, ENCODER_OUTPUTS),
            "decoder_step": (STEP_INPUTS, STEP_OUTPUTS)}


def check_graph_io(manifest: Manifest, role: str, inputs: Mapping[str, Shape],
                   outputs: Mapping[str, Shape]) -> None:
    """Raise ModelError when a graph's tensor names or fixed dimensions contradict the contract
    (``edgecap.backends.base``) or the manifest's dims."""
    path = manifest.path(role)
    want_in, want_out = CONTRACT[role]
    for kind, want, have in (("inputs", want_in, inputs), ("outputs", want_out, outputs)):
        missing = [name for name in want if name not in have]
        if missing:
            raise ModelError(f"{path}: the graph lacks the {kind} {missing} (it has "
                             f"{sorted(have)}); it was not exported by this edgecap: re-export "
                             "the model with `edgecap export`")
    shapes = {**inputs, **outputs}
    for name, expected in expected_shapes(manifest)[role].items():
        actual = tuple(shapes[name])
        if len(actual) != len(expected) or any(
                isinstance(a, int) and e is not None and a != e for a, e in zip(actual, expected)):
            raise ModelError(f"{path}: tensor {name!r} has shape {list(actual)} but the manifest "
                             f"says {[e if e is not None else '?' for e in expected]}; the ONNX "
                             "files and manifest.json do not belong together: re-export the "
                             "model or copy the whole directory again")


def load_failure(manifest: Manifest, role: str, exc: BaseException) -> ModelError:
    """A ModelError for a graph file that failed to load, naming the likely cause."""
    try:
        verify_files(manifest)
    except ModelError as checksum_error:
        return checksum_error
    return ModelError(f"{manifest.path(role)}: cannot load the graph ({exc}); the file may be "
                      "corrupt or truncated, or need a newer runtime: re-copy the model directory "
                      "or re-export it")
