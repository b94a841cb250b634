"""The fused language models' step as one onnxruntime graph (``edgecap.decoding.fusion``).

One step of both caption language models, with their density ratio, in one session run:

    inputs   tokens (R,) int64, h_everyday c_everyday h_in_domain c_in_domain (R, H) float32,
             weights (R, 1) float32
    outputs  bias = weights * (log p_everyday - log p_in_domain) (R, V), and the four new states

onnxruntime keeps the weights packed for its matrix products between runs and reads each
output matrix once per step, where numpy's matrix-vector products read it once per beam row, back
from memory after every decoder step has pushed it out of the caches. End to end at beam 3 the
fusion costs 1.16x / 1.10x the decode without it this way, against 1.29x / 1.27x in numpy (two
runs, interleaved medians, 2-core AMD EPYC: ``python benchmarks/e2e.py --model-b DIR_WITHOUT_LMS
--variants ort-fp32-b,ort-fp32-nofusion,ort-fp32-numpy-lm,ort-fp32``;
benchmarks/results/e2e_fusion_onnx_step*.md; docs/everyday-photos.md has the alone runs).

The graph is built here from the two models' arrays at load time, written directly in ONNX's
protobuf encoding (the eight message types it uses, field numbers from onnx.proto), so that
onnxruntime alone runs it: the ``onnx`` package is not needed to caption. The tests parse what
this writes with ``onnx`` and check it with ``onnx.checker``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgecap.decoding.fusion import CaptionLM

OPSET = 17  # Split into equal parts without a ``split`` input or attribute; LogSoftmax per axis
IR_VERSION = 8  # opset 17 at IR 8: onnxruntime >= 1.12 (edgecap[cpu] asks for >= 1.16)
FLOAT, INT64 = 1, 7  # TensorProto.DataType
ATTR_INT = 2  # AttributeProto.AttributeType
ROLES = ("everyday", "in_domain")


# -- protobuf encoding: varints and length-delimited fields (wire types 0 and 2) -----------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # an int64 below zero is its two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


# -- ONNX messages ----------------------------------------------------------------------------------


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims 1, data_type 2, name 8, raw_data 9 (little-endian)."""
    array = np.ascontiguousarray(array)
    kind = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}[array.dtype]
    dims = b"".join(_int(1, d) for d in array.shape)
    return (
        dims
        + _int(2, kind)
        + _str(8, name)
        + _bytes(9, array.astype(array.dtype.newbyteorder("<")).tobytes())
    )


def _value_info(name: str, elem_type: int, shape: tuple[int | str, ...]) -> bytes:
    """ValueInfoProto (name 1, type 2) of a tensor: TypeProto.tensor_type 1 -> elem_type 1,
    shape 2 -> TensorShapeProto.dim 1 -> dim_value 1 or dim_param 2."""
    dims = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, elem_type) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], **attributes: int) -> bytes:
    """NodeProto: input 1, output 2, name 3, op_type 4, attribute 5 (AttributeProto: name 1,
    i 3, type 20)."""
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    out += _str(3, f"{op}_{outputs[0]}") + _str(4, op)
    for key, value in attributes.items():
        out += _bytes(5, _str(1, key) + _int(3, value) + _int(20, ATTR_INT))
    return out


def _model(nodes: list[bytes], initializers: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """ModelProto: ir_version 1, producer_name 2, graph 7 (GraphProto: node 1, name 2,
    initializer 5, input 11, output 12), opset_import 8 (OperatorSetIdProto: domain 1, version 2)."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, "fused_language_models_step")
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    return (
        _int(1, IR_VERSION) + _str(2, "edgecap") + _bytes(7, graph) + _bytes(8, _str(1, "") + _int(2, OPSET))
    )


# -- the step ---------------------------------------------------------------------------------------


def pair_step_model(everyday: CaptionLM, in_domain: CaptionLM) -> bytes:
    """The serialized ONNX model of one fused step (see the module doc)."""
    nodes: list[bytes] = []
    initializers: list[bytes] = []
    inputs = [_value_info("tokens", INT64, ("rows",))]
    outputs = [_value_info("bias", FLOAT, ("rows", everyday.vocab_size))]
    for role, lm in zip(ROLES, (everyday, in_domain)):
        H = lm.hidden

        def name(part: str, role: str = role) -> str:
            return f"{role}_{part}"

        arrays = lm.arrays
        initializers += [
            _tensor(name("embed"), arrays["embed"]),  # (V, E)
            _tensor(name("w_ih_t"), np.ascontiguousarray(arrays["w_ih"].T)),  # (E, 4H)
            _tensor(name("bias"), arrays["bias"]),  # (4H,)
            _tensor(name("w_hh_t"), np.ascontiguousarray(arrays["w_hh"].T)),  # (H, 4H)
            _tensor(name("out_w_t"), np.ascontiguousarray(arrays["out_w"].T)),  # (H, V)
            _tensor(name("out_b"), arrays["out_b"]),
        ]
        inputs += [_value_info(name("h"), FLOAT, ("rows", H)), _value_info(name("c"), FLOAT, ("rows", H))]
        outputs += [
            _value_info(name("h_next"), FLOAT, ("rows", H)),
            _value_info(name("c_next"), FLOAT, ("rows", H)),
        ]
        nodes += [  # torch's LSTM cell, gates i, f, g, o
            _node("Gather", [name("embed"), "tokens"], [name("word")], axis=0),
            _node("MatMul", [name("word"), name("w_ih_t")], [name("from_word")]),
            _node("MatMul", [name("h"), name("w_hh_t")], [name("from_state")]),
            _node("Add", [name("from_word"), name("from_state")], [name("summed")]),
            _node("Add", [name("summed"), name("bias")], [name("gates")]),
            _node("Split", [name("gates")], [name("i"), name("f"), name("g"), name("o")], axis=1),
            _node("Sigmoid", [name("i")], [name("i_s")]),
            _node("Sigmoid", [name("f")], [name("f_s")]),
            _node("Tanh", [name("g")], [name("g_t")]),
            _node("Sigmoid", [name("o")], [name("o_s")]),
            _node("Mul", [name("f_s"), name("c")], [name("kept")]),
            _node("Mul", [name("i_s"), name("g_t")], [name("added")]),
            _node("Add", [name("kept"), name("added")], [name("c_next")]),
            _node("Tanh", [name("c_next")], [name("c_t")]),
            _node("Mul", [name("o_s"), name("c_t")], [name("h_next")]),
            _node("MatMul", [name("h_next"), name("out_w_t")], [name("logits_w")]),
            _node("Add", [name("logits_w"), name("out_b")], [name("logits")]),
            _node("LogSoftmax", [name("logits")], [name("log_p")], axis=1),
        ]
    inputs.append(_value_info("weights", FLOAT, ("rows", 1)))
    nodes += [
        _node("Sub", ["everyday_log_p", "in_domain_log_p"], ["ratio"]),
        _node("Mul", ["ratio", "weights"], ["bias"]),
    ]
    return _model(nodes, initializers, inputs, outputs)


class OnnxPairStep:
    """Both language models' step and their weighted density ratio in one onnxruntime session
    on one thread (the products are small; no thread pool to spin beside the decoder's)."""

    def __init__(self, everyday: CaptionLM, in_domain: CaptionLM):
        import onnxruntime as ort

        from edgecap.backends.onnxruntime import session_options

        self._session = ort.InferenceSession(
            pair_step_model(everyday, in_domain), session_options(1), providers=["CPUExecutionProvider"]
        )
        self._outputs = ["bias"] + [f"{role}_{s}_next" for role in ROLES for s in ("h", "c")]

    def __call__(self, tokens: np.ndarray, states: list, weights: np.ndarray):
        """tokens (R,), states [(h, c) everyday, (h, c) in-domain], weights (R, 1) -> (bias
        (R, V), the new states)."""
        feed = {"tokens": np.asarray(tokens, np.int64), "weights": weights}
        for role, (h, c) in zip(ROLES, states):
            feed[f"{role}_h"], feed[f"{role}_c"] = h, c
        bias, h0, c0, h1, c1 = self._session.run(self._outputs, feed)
        return bias, [(h0, c0), (h1, c1)]
