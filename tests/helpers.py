"""Builders shared by several test modules (import them from here, never from another test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgecap import images
from edgecap.manifest import FORMAT, file_sha256


def rgb_array(image, color: str = "rgb") -> np.ndarray:
    """What the loader gives the preprocessing, as uint8 (H, W, 3) RGB."""
    return np.asarray(images.load_rgb(image, color))


def contract_model_dir(directory: Path) -> Path:
    """A model directory that fulfils the contract (``edgecap.contract``) with a few nodes of
    random weights, built with onnx helpers only (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    C, F, A, H, E, V, K, NC, size = 8, 8, 6, 10, 6, 20, 5, 7, 16
    L = (size // 8) ** 2
    inits = []

    def w(name, *shape, scale=0.5):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale)
                                             .astype(np.float32), name))
        return name

    def i64(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def linear(nodes, x, out, n_in, n_out, prefix):
        nodes.append(helper.make_node("MatMul", [x, w(prefix + ".w", n_in, n_out)],
                                      [prefix + ".mm"]))
        nodes.append(helper.make_node("Add", [prefix + ".mm", w(prefix + ".b", n_out)], [out]))

    n = helper.make_node
    enc = [n("Conv", ["image", w("conv.w", C, 3, 8, 8, scale=0.1)], ["conv"], strides=[8, 8]),
           n("Relu", ["conv"], ["relu"]),
           n("Reshape", ["relu", i64("shape_ncl", [0, C, -1])], ["ncl"]),
           n("Transpose", ["ncl"], ["fmap"], perm=[0, 2, 1])]
    linear(enc, "fmap", "fp", C, F, "feature_proj")
    enc += [n("Relu", ["fp"], ["fp_relu"]),
            n("LayerNormalization", ["fp_relu", w("ln.g", F), w("ln.b", F)], ["features"],
              axis=-1)]
    linear(enc, "features", "att_proj", F, A, "att_feat")
    enc.append(n("ReduceMean", ["features", i64("ax_l", [1])], ["mean"], keepdims=0))
    enc.append(n("ReduceMean", ["fmap", "ax_l"], ["pooled"], keepdims=0))
    linear(enc, "pooled", "class_logits", C, NC, "classifier")
    enc.append(n("Softmax", ["class_logits"], ["class_probs"], axis=1))
    for s in ("h", "c"):
        linear(enc, "mean", f"{s}0_pre", F, H, f"init_{s}")
        enc.append(n("Tanh", [f"{s}0_pre"], [f"{s}0"]))
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    vi = helper.make_tensor_value_info
    encoder = helper.make_graph(
        enc, "encoder", [vi("image", f32, ["N", 3, size, size])],
        [vi("features", f32, ["N", L, F]), vi("att_proj", f32, ["N", L, A]),
         vi("h0", f32, ["N", H]), vi("c0", f32, ["N", H]), vi("class_probs", f32, ["N", NC])],
        list(inits))

    inits.clear()
    st = [n("Gather", [w("embed", V, E), "tokens"], ["emb"]),
          n("Gather", ["h", "source_rows"], ["hp"]), n("Gather", ["c", "source_rows"], ["cp"]),
          n("Gather", ["features", "image_index"], ["f"]),
          n("Gather", ["att_proj", "image_index"], ["ap"])]
    linear(st, "hp", "ah", H, A, "att_hidden")
    st += [n("Unsqueeze", ["ah", i64("ax1", [1])], ["ah1"]), n("Add", ["ah1", "ap"], ["e"]),
           n("Tanh", ["e"], ["te"])]
    linear(st, "te", "score", A, 1, "att_score")
    st += [n("Squeeze", ["score", i64("ax2", [2])], ["scores"]),
           n("Softmax", ["scores"], ["alpha"], axis=1),
           n("Unsqueeze", ["alpha", "ax1"], ["alpha1"]), n("MatMul", ["alpha1", "f"], ["ctx1"]),
           n("Squeeze", ["ctx1", "ax1"], ["ctx"]),
           n("Concat", ["emb", "ctx", "hp"], ["x"], axis=1)]
    linear(st, "x", "gates", E + F + H, 4 * H, "lstm")
    st += [n("Split", ["gates"], ["gi", "gf", "gg", "go"], axis=1, num_outputs=4)]
    st += [n("Sigmoid", ["gi"], ["si"]), n("Sigmoid", ["gf"], ["sf"]),
           n("Tanh", ["gg"], ["tg"]), n("Sigmoid", ["go"], ["so"]),
           n("Mul", ["sf", "cp"], ["fc"]), n("Mul", ["si", "tg"], ["ig"]),
           n("Add", ["fc", "ig"], ["c_out"]), n("Tanh", ["c_out"], ["tc"]),
           n("Mul", ["so", "tc"], ["h_out"])]
    linear(st, "h_out", "deep", H, E, "out_hidden")
    st.append(n("Tanh", ["deep"], ["tdeep"]))
    linear(st, "tdeep", "logits", E, V, "out_vocab")
    st += [n("LogSoftmax", ["logits"], ["logprobs"], axis=1),
           n("Add", ["logprobs", "word_bias"], ["biased"]),
           n("TopK", ["biased", i64("k", [K])], ["topk_biased", "ids64"], axis=1),
           n("GatherElements", ["logprobs", "ids64"], ["topk_logprobs"], axis=1),
           n("Cast", ["ids64"], ["topk_ids"], to=i32)]
    step = helper.make_graph(
        st, "decoder_step",
        [vi("tokens", i32, ["R"]), vi("h", f32, ["S", H]), vi("c", f32, ["S", H]),
         vi("source_rows", i32, ["R"]), vi("features", f32, ["N", L, F]),
         vi("att_proj", f32, ["N", L, A]), vi("image_index", i32, ["R"]),
         vi("word_bias", f32, ["R", V])],
        [vi("topk_logprobs", f32, ["R", K]), vi("topk_ids", i32, ["R", K]),
         vi("h_out", f32, ["R", H]), vi("c_out", f32, ["R", H]), vi("alpha", f32, ["R", L])],
        list(inits))

    directory.mkdir(parents=True, exist_ok=True)
    for graph, name in ((encoder, "encoder.onnx"), (step, "decoder_step.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        onnx.save(model, str(directory / name))
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    (directory / "vocab.json").write_text(json.dumps({"words": words}))  # Vocabulary's format
    classes = [{"name": f"class {i}", "words": [f"w{i}"]} for i in range(NC)]
    (directory / "classes.json").write_text(json.dumps({"classes": classes}))  # edgecap.objects
    files = {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx",
             "vocab": "vocab.json", "classes": "classes.json"}
    manifest = {
        "format": FORMAT, "files": files,
        "dims": {"regions": L, "encoder_dim": C, "feature_dim": F, "attention_dim": A,
                 "hidden_dim": H, "embed_dim": E, "vocab_size": V, "top_k": K,
                 "n_classes": NC},
        "tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3},
        "preprocessing": {"size": [size, size], "mean": [127.5] * 3, "std": [127.5] * 3},
        "precision": "fp32", "attention": True,
        "sha256": {role: file_sha256(directory / f) for role, f in files.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory
