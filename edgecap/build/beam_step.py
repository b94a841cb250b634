"""The beam-step graph: the decoder step graph with the beam bookkeeping appended, for runtimes
that keep the decoder state on a device (TensorRT, onnxruntime with a GPU provider).

Derived from a model directory's ``decoder_step.onnx`` with onnx helpers (no torch, no
re-export), for one beam size; the step's weights are not copied into another file. After the
step's own nodes (gather h/c by ``source_rows``, one LSTM step, log-softmax, the top K by
log-probability + ``word_bias``) it does what ``edgecap.decoding.beam``'s loop does per word:

- candidates: each row's first ``width`` = min(beam + 1, K) words of its top K, scored
  ``scores[row] + (log-prob + word_bias)``; a candidate is dropped when its word is among its
  row's ``blocked_words`` (the words a caption never starts with, repeated n-grams: the host
  knows them before the step) and ``<end>`` never continues a beam;
- per image, a top-``beam`` over its beam x width candidates (TopK with a constant K, ties to
  the lower index: the numpy loop's stable sort) -> the words that continue, their source rows
  (the back-pointers), their scores and log-probabilities;
- ``h`` / ``c`` reordered by those back-pointers inside the graph, so the next step feeds them
  back unchanged (``source_rows`` is then the identity);
- per row, where ``<end>`` stands in its top K and its log-probability: the host decides which
  of them finish a hypothesis (a few values a row, not the K candidates).

Before the step's own nodes the rules' bias is summed (``_add_bias``): the host's ``word_bias``,
the tag bonus (``tag_bias`` on the rows still ``steered``: ``TagBonus``'s rule) and, in a graph
made with ``lms``, the fused caption language models' weighted density ratio; the step's top K
and the candidates' scores read that sum.

Inputs: the step graph's (``edgecap.contract``) plus ``scores`` float32 (R,) (each row's running
ranking score, -inf for a masked row: a finished beam or a done image), ``blocked_words`` int32 (R,
``MAX_BLOCKED``) (the ids of the words that may not follow that row, -1 past them), ``tag_bias``
float32 (R, V) (the tag bonus on each row's tag words) and ``steered`` float32 (R,) (1: the row is
still steered); with ``lms``, ``lm_weights`` (R, 1) and the language models' states (``LM_STATES``,
(R, H) each at its model's width). Outputs (all (R,), rows image-major, ``beam`` per image):
``next_tokens`` int32, ``back_pointers`` int32 (the source row of each chosen candidate),
``choices`` int32 (its position among its image's beam x width candidates, for ordering ties as the
numpy loop does), ``next_scores`` float32 (-inf: no candidate for that row), ``next_logprobs``
float32 (the word's log-probability, without the bias), ``end_logprobs`` float32 and
``end_positions`` int32 (``<end>``'s log-probability and place in the row's top K, K when absent),
``logprob_check`` float32 (0, or NaN when the row's log-probabilities are not finite),
``end_biases`` and ``next_biases`` float32 (the summed bias at the row's ``<end>`` and at its
chosen word); and, already reordered by the back-pointers, ``h_next``, ``c_next`` (R, Hd),
``steered_next`` and with ``lms`` the states' ``NAME_next``.

Everything appended works on the step's float32 outputs (an FP16 model directory's step graph
returns float32 too), so the scores, the candidate top-k and the comparisons are FP32, as the
TensorRT pitfalls ask (FP16 scores lose ties; TopK needs a constant K).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgecap.contract import STEP_INPUTS, Limits
from edgecap.decoding.options import MAX_LENGTH
from edgecap.errors import BackendError

if TYPE_CHECKING:
    from edgecap.decoding.fusion import CaptionLM

BEAM_INPUTS = (*STEP_INPUTS, "scores", "blocked_words", "tag_bias", "steered")
BEAM_OUTPUTS = (
    "next_tokens",
    "back_pointers",
    "choices",
    "next_scores",
    "next_logprobs",
    "end_logprobs",
    "end_positions",
    "logprob_check",
    "h_next",
    "c_next",
    "end_biases",
    "next_biases",
    "steered_next",
)
# the outputs of int32 ids and places (the others float32)
INT32_OUTPUTS = frozenset({"next_tokens", "back_pointers", "choices", "end_positions"})
# The caption language models in the graph (``lms``): their row weights and states go in, the
# states reordered by the back-pointers come out
LM_INPUTS = ("lm_weights", "everyday_h", "everyday_c", "in_domain_h", "in_domain_c")
LM_STATES = LM_INPUTS[1:]
LM_OUTPUTS = tuple(f"{name}_next" for name in LM_STATES)


def lm_state_widths(lms: tuple[CaptionLM, CaptionLM]) -> dict[str, int]:
    """Each language-model state's width: its own model's hidden units (the two may differ)."""
    return {
        name: lm.hidden
        for lm, role in zip(lms, ("everyday", "in_domain"))
        for name in (f"{role}_h", f"{role}_c")
    }


PREFIX = "beam/"  # names of the appended nodes and constants
MIN_OPSET = 13  # Unsqueeze, Slice and ReduceSum take their axes as inputs
# The version of the appended graph, part of the names of the cached beam-step ONNX files and
# TensorRT engines (edgecap.trt.engines): bump it on any change of what beam_step_model appends
# (its nodes, constants, inputs or outputs), so that caches made by an older edgecap are rebuilt.
BEAM_STEP_VERSION = 4  # 2: the finiteness check without x - x; 3: the tag bonus in the graph;
# 4: the words a row may not take as ids (blocked_words), not an (R, V) matrix
# ``blocked_words``' width: the most words a row may be barred from at one word (the words that
# follow its (n-1)-word tail earlier in its caption are fewer than its words, at most
# ``MAX_LENGTH``; the never-first words, at the first word, are one: ``<end>``)
MAX_BLOCKED = MAX_LENGTH


def lm_tag(lms: tuple[CaptionLM, CaptionLM]) -> str:
    """A short digest of the language models' weights, for the names of cached beam-step graphs
    and engines that hold them: models changed in place make other files, never a stale one."""
    import hashlib

    digest = hashlib.sha256()
    for lm in lms:
        for name in sorted(lm.arrays):
            array = lm.arrays[name]
            digest.update(f"{name}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:12]


def lm_suffix(lms: tuple[CaptionLM, CaptionLM] | None) -> str:
    """What the cached beam-step graph's and engine's names add for ``lms``: ``-lm<lm_tag>``,
    nothing without language models (one rule for both names, so they always agree)."""
    return "" if lms is None else f"-lm{lm_tag(lms)}"


def beam_io(lms: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The beam-step graph's inputs and outputs, with the language models in it or not."""
    if lms:
        return (*BEAM_INPUTS, *LM_INPUTS), (*BEAM_OUTPUTS, *LM_OUTPUTS)
    return BEAM_INPUTS, BEAM_OUTPUTS


def row_ranges(limits: Limits, beam: int, lms: bool = False) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) rows of each input, for a TensorRT optimisation profile of the graph for
    ``beam`` beams. A search has ``beam`` rows an image, and the graph reshapes its rows to
    (-1, beam): TensorRT fails the build when the opt shapes break such a reshape ("kOPT values
    for profile 0 violate shape constraints"), so the rows (the scores and blocked words too) run
    over one image to ``max_batch`` images, from ``beam`` to ``max_batch`` x ``beam``; ``h`` /
    ``c`` also take the first step's one row an image (the encoder's h0 / c0); ``lms``: the
    graph with the language models, whose inputs have a row a beam from the first step."""
    rows = (beam, beam, limits.max_batch * beam)
    per_row = (
        "tokens",
        "source_rows",
        "image_index",
        "word_bias",
        "scores",
        "blocked_words",
        "tag_bias",
        "steered",
    )
    ranges = dict.fromkeys(per_row + (LM_INPUTS if lms else ()), rows)
    images = (1, 1, limits.max_batch)
    return {**ranges, "h": (1, *rows[1:]), "c": (1, *rows[1:]), "features": images, "att_proj": images}


def onnx_opset(model) -> int:
    """The default (ai.onnx) domain's opset of an ``onnx.ModelProto``."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise BackendError("the step graph imports no ai.onnx opset")
    return max(versions)


def beam_width(beam: int, top_k: int) -> int:
    """Candidates a row offers: one more than the beam (so a beam keeps ``beam`` continuations
    when one of its best words is ``<end>``), at most the step's K."""
    return min(beam + 1, top_k)


def beam_step_model(
    step_model,
    beam: int,
    end_id: int,
    top_k: int,
    hidden_dim: int,
    vocab_size: int,
    lms: tuple[CaptionLM, CaptionLM] | None = None,
):
    """``decoder_step.onnx`` (an ``onnx.ModelProto``) -> the beam-step graph for ``beam`` beams
    per image (a new ModelProto; ``step_model`` is not changed). ``lms``: the fused caption
    language models (everyday, in-domain) stepped in the graph too (``_add_bias``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not 1 <= beam <= top_k:
        raise ValueError(f"beam must be between 1 and the model's top_k ({top_k}), got {beam}")
    opset = onnx_opset(step_model)
    if opset < MIN_OPSET:
        raise BackendError(
            f"the step graph's ONNX opset is {opset}; the beam-step graph needs opset {MIN_OPSET} "
            "or later (axes as inputs): re-export the model"
        )
    model = onnx.ModelProto()
    model.CopyFrom(step_model)
    graph = model.graph
    width = beam_width(beam, top_k)
    constants: dict[str, np.ndarray] = {
        "width": np.array([width], np.int64),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "two": np.array([2], np.int64),
        "beam_k": np.array([beam], np.int64),
        "candidates": np.array([-1, beam * width], np.int64),
        "images": np.array([-1, beam], np.int64),
        "flat": np.array([-1], np.int64),
        "width_scalar": np.array(width, np.int64),
        "beam_scalar": np.array(beam, np.int32),
        "end": np.array(end_id, np.int32),
        "neg_inf": np.array(-np.inf, np.float32),
        "half": np.array(0.5, np.float32),
        "flt_max": np.array(np.finfo(np.float32).max, np.float32),
        "nan": np.array(np.nan, np.float32),
        "zero_f": np.array(0.0, np.float32),
        "top_k": np.array(top_k, np.int32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, PREFIX + k) for k, v in constants.items())
    nodes = []

    def op(kind: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> list[str]:
        outputs = [PREFIX + name] if n_out == 1 else [f"{PREFIX}{name}_{i}" for i in range(n_out)]
        nodes.append(
            helper.make_node(
                kind,
                [i if i.startswith(PREFIX) or i in names else PREFIX + i for i in inputs],
                outputs,
                name=PREFIX + name,
                **attrs,
            )
        )
        return outputs

    def reduce_max(inputs: list[str], name: str, axis: int = 1) -> None:
        """ReduceMax over ``axis`` (1 or 2): its axes an input from opset 18 (the attribute is
        gone there), the attribute before (no such input)."""
        if opset >= 18:
            op("ReduceMax", [*inputs, {1: "one", 2: "two"}[axis]], name, keepdims=0)
        else:
            op("ReduceMax", inputs, name, axes=[axis], keepdims=0)

    names = {*BEAM_INPUTS, "topk_logprobs", "topk_ids", "h_out", "c_out"}
    # the words' bias: the host's, plus the tag bonus on the rows still steered, plus the
    # language models' density ratio when they are here
    bias = _add_bias(graph, lms, opset, onnx, helper)
    # every candidate of the top K: the ranking score, and where <end> stands
    op("Cast", ["topk_ids"], "ids64", to=TensorProto.INT64)
    op("GatherElements", [bias, "ids64"], "bias_k", axis=1)
    op("Add", ["topk_logprobs", "bias_k"], "ranked_k")
    op("Unsqueeze", ["scores", "one"], "scores_col")
    op("Add", ["scores_col", "ranked_k"], "cand_k")
    op("Equal", ["topk_ids", "end"], "is_end_k")
    op("Where", ["is_end_k", "topk_logprobs", "neg_inf"], "end_lp_k")
    reduce_max(["end_lp_k"], "end_logprobs")
    op("Cast", ["is_end_k"], "is_end_f", to=TensorProto.FLOAT)
    op("ArgMax", ["is_end_f"], "end_first", axis=1, keepdims=0)
    reduce_max(["is_end_f"], "has_end_f")
    op("Greater", ["has_end_f", "half"], "has_end")
    op("Cast", ["end_first"], "end_first32", to=TensorProto.INT32)
    op("Where", ["has_end", "end_first32", "top_k"], "end_positions")
    # one value a row says the step is sound: |x| < FLT_MAX is false for inf and NaN alone. Not
    # x - x (NaN for inf or NaN): TensorRT may fold x - x to 0 unless kSTRICT_NANS is set
    op("Abs", ["topk_logprobs"], "abs_k")
    op("Less", ["abs_k", "flt_max"], "finite_k")
    op("Not", ["finite_k"], "bad_k")
    op("Cast", ["bad_k"], "bad_f", to=TensorProto.FLOAT)
    reduce_max(["bad_f"], "bad_row")
    op("Greater", ["bad_row", "half"], "bad")
    op("Where", ["bad", "nan", "zero_f"], "logprob_check")
    # the row's first ``width`` candidates; <end> and blocked words never continue
    op("Slice", ["cand_k", "zero", "width", "one"], "cand")
    op("Slice", ["topk_ids", "zero", "width", "one"], "ids")
    op("Slice", ["topk_logprobs", "zero", "width", "one"], "lp")
    # a candidate is blocked when its word is among the row's blocked words (-1: none there)
    op("Unsqueeze", ["ids", "two"], "ids_col")
    op("Unsqueeze", ["blocked_words", "one"], "blocked_row")
    op("Equal", ["ids_col", "blocked_row"], "is_blocked")
    op("Cast", ["is_blocked"], "is_blocked_f", to=TensorProto.FLOAT)
    reduce_max(["is_blocked_f"], "block", axis=2)
    op("Greater", ["block", "half"], "blocked")
    op("Equal", ["ids", "end"], "is_end")
    op("Or", ["blocked", "is_end"], "dropped")
    op("Where", ["dropped", "neg_inf", "cand"], "going")
    # per image: the best ``beam`` of its beam x width candidates, in the loop's order
    op("Reshape", ["going", "candidates"], "going_image")
    op("TopK", ["going_image", "beam_k"], "top", n_out=2, axis=1, largest=1, sorted=1)
    op("Reshape", ["top_0", "flat"], "next_scores")
    op("Reshape", ["ids", "candidates"], "ids_image")
    op("Reshape", ["lp", "candidates"], "lp_image")
    op("GatherElements", ["ids_image", "top_1"], "words_image", axis=1)
    op("GatherElements", ["lp_image", "top_1"], "lp_chosen", axis=1)
    op("Reshape", ["words_image", "flat"], "next_tokens")
    op("Reshape", ["lp_chosen", "flat"], "next_logprobs")
    op("Cast", ["top_1"], "choice32", to=TensorProto.INT32)
    op("Reshape", ["choice32", "flat"], "choices")
    # back-pointers: the image's first row + the candidate's row within the image; the image
    # of each row from ``image_index`` (image-major, ``beam`` rows an image)
    op("Div", ["top_1", "width_scalar"], "row_in_image")
    op("Cast", ["row_in_image"], "row_in_image32", to=TensorProto.INT32)
    op("Reshape", ["image_index", "images"], "index_image")
    op("Mul", ["index_image", "beam_scalar"], "first_rows")
    op("Add", ["first_rows", "row_in_image32"], "pointers_image")
    op("Reshape", ["pointers_image", "flat"], "back_pointers")
    # the state follows its beam: reordered here, fed back unchanged next step
    op("Gather", ["h_out", "back_pointers"], "h_next", axis=0)
    op("Gather", ["c_out", "back_pointers"], "c_next", axis=0)
    # what the host sums in float64 from the bias: <end>'s and each chosen word's, per row
    op("Gather", [bias, "end"], "end_biases", axis=1)
    op("Slice", ["bias_k", "zero", "width", "one"], "bias_w")
    op("Reshape", ["bias_w", "candidates"], "bias_image")
    op("GatherElements", ["bias_image", "top_1"], "bias_chosen", axis=1)
    op("Reshape", ["bias_chosen", "flat"], "next_biases")
    # the tag bonus steers a row until it says one of its image's tag words (TagBonus.update):
    # a row goes on steered when its source row was, it continues and its word is no tag word
    op("Unsqueeze", ["next_tokens", "one"], "tokens_col")
    op("GatherElements", ["tag_bias", "tokens_col"], "tag_at_col", axis=1)
    op("Reshape", ["tag_at_col", "flat"], "tag_at")
    op("Greater", ["tag_at", "zero_f"], "said_tag")
    op("Not", ["said_tag"], "not_said")
    op("Gather", ["steered", "back_pointers"], "steered_source", axis=0)
    op("Greater", ["steered_source", "half"], "was_steered")
    op("Equal", ["next_scores", "neg_inf"], "no_candidate")
    op("Not", ["no_candidate"], "continues")
    op("And", ["was_steered", "continues"], "steered_on")
    op("And", ["steered_on", "not_said"], "keeps_steering")
    op("Cast", ["keeps_steering"], "steered_next", to=TensorProto.FLOAT)
    if lms is not None:
        # the language models' states follow their beams as h / c do
        for state in LM_STATES:
            op("Gather", [f"lm/{state}_next", "back_pointers"], f"{state}_next", axis=0)

    rows = "r"
    del graph.output[:]
    state_widths = {"h_next": hidden_dim, "c_next": hidden_dim}
    if lms is not None:
        state_widths.update({f"{state}_next": width for state, width in lm_state_widths(lms).items()})
    for name in beam_io(lms is not None)[1]:
        shape: list[str | int] = [rows, state_widths[name]] if name in state_widths else [rows]
        kind = TensorProto.INT32 if name in INT32_OUTPUTS else TensorProto.FLOAT
        out = helper.make_tensor_value_info(name, kind, shape)
        graph.output.append(out)
        # the graph names its results with the prefix: rename the last writer of each output
        for node in nodes:
            for i, produced in enumerate(node.output):
                if produced == PREFIX + name:
                    node.output[i] = name
        for node in nodes:
            for i, used in enumerate(node.input):
                if used == PREFIX + name:
                    node.input[i] = name
    graph.node.extend(nodes)  # copies: after the renaming
    graph.input.extend(
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [rows]),
            helper.make_tensor_value_info("blocked_words", TensorProto.INT32, [rows, MAX_BLOCKED]),
            helper.make_tensor_value_info("tag_bias", TensorProto.FLOAT, [rows, vocab_size]),
            helper.make_tensor_value_info("steered", TensorProto.FLOAT, [rows]),
        ]
    )
    if lms is not None:
        graph.input.append(helper.make_tensor_value_info("lm_weights", TensorProto.FLOAT, [rows, 1]))
        graph.input.extend(
            helper.make_tensor_value_info(state, TensorProto.FLOAT, [rows, width])
            for state, width in lm_state_widths(lms).items()
        )
    graph.name = f"{graph.name or 'decoder_step'}_beam{beam}"
    onnx.checker.check_model(model)
    return model


def _add_bias(graph, lms: tuple[CaptionLM, CaptionLM] | None, opset: int, onnx, helper) -> str:
    """Put the rules' bias in front of the step's nodes and make everything that read
    ``word_bias`` (the step's own top K, the candidates' scores) read it instead: ``word_bias``
    (the host's rules') + ``tag_bias`` on the rows still ``steered`` (the tag bonus,
    ``TagBonus``), + with ``lms`` the fused language models' step (``edgecap.decoding.
    fusion_graph``: both LSTMs on the row's last word, ``lm_weights * (log p_everyday - log
    p_in_domain)``), summed in the host scorers' order. The language models' nodes and weights
    are the host's language-model session's, on the step's int32 ``tokens``; every name takes
    ``PREFIX`` (theirs ``PREFIX + "lm/"``), so a weakly typed FP16 TensorRT build keeps them in
    FP32 with the rest of the bookkeeping. ``opset``: the step graph's, which the nodes take
    (from 18 a Split into equal parts names its number of parts). Returns the bias's name."""
    steered_col, tagged, summed = PREFIX + "steered_col", PREFIX + "tag_part", PREFIX + "bias"
    nodes = [
        helper.make_node("Unsqueeze", ["steered", PREFIX + "one"], [steered_col], name=steered_col),
        helper.make_node("Mul", ["tag_bias", steered_col], [tagged], name=tagged),
    ]
    if lms is None:
        nodes.append(helper.make_node("Add", ["word_bias", tagged], [summed], name=summed))
    else:
        with_tags = PREFIX + "with_tags"
        nodes.append(helper.make_node("Add", ["word_bias", tagged], [with_tags], name=with_tags))
        lm_nodes, weights, ratio = _language_models(lms, opset, onnx, helper)
        nodes += [*lm_nodes, helper.make_node("Add", [with_tags, ratio], [summed], name=summed)]
        graph.initializer.extend(weights)
    step = []
    for node in graph.node:  # the step's own nodes: its top K by log-probability + the bias
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        for i, used in enumerate(copied.input):
            if used == "word_bias":
                copied.input[i] = summed
        step.append(copied)
    del graph.node[:]
    graph.node.extend(nodes + step)  # in order: the bias before its readers
    return summed


def _lm_name(inner: str) -> str:
    """A name of the language models' graph in the beam-step graph: its inputs are the beam-step
    graph's (``tokens``, ``lm_weights`` and the states), the rest ``PREFIX + "lm/"`` + it."""
    from edgecap.decoding.fusion_graph import ROLES

    outer = {
        "tokens": "tokens",
        "weights": "lm_weights",
        **{f"{r}_{s}": f"{r}_{s}" for r in ROLES for s in "hc"},
    }
    return outer.get(inner, f"{PREFIX}lm/{inner}")


def _language_models(lms: tuple[CaptionLM, CaptionLM], opset: int, onnx, helper) -> tuple[list, list, str]:
    """The host's language-model step (``fusion_graph.pair_step_model``) renamed for the
    beam-step graph: (its nodes, its weights, the name of its weighted ratio)."""
    from edgecap.decoding.fusion_graph import pair_step_model

    part = onnx.load_model_from_string(pair_step_model(*lms)).graph
    nodes = []
    for node in part.node:
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        del copied.input[:], copied.output[:]
        copied.input.extend(_lm_name(i) for i in node.input)
        copied.output.extend(_lm_name(o) for o in node.output)
        copied.name = _lm_name(node.name or node.output[0])
        if node.op_type == "Split" and opset >= 18:
            copied.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
        nodes.append(copied)
    weights = list(part.initializer)
    for tensor in weights:
        tensor.name = _lm_name(tensor.name)
    return nodes, weights, _lm_name("bias")
