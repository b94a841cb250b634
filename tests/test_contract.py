"""The model contract (``edgecap.contract``): the manifest's dimensions, the shape of every graph
tensor, and the row ranges and names of the TensorRT engines' optimisation profiles. The
expected values are the module docstring's contract, worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgecap.contract import DECODER_STEP, ENCODER, Limits, ModelDimensions, tensor_dtype

DIMS = {
    "regions": 49,
    "feature_dim": 16,
    "attention_dim": 8,
    "hidden_dim": 12,
    "vocab_size": 30,
    "top_k": 5,
    "n_classes": 1000,
}


@pytest.mark.parametrize("name", [*DIMS, "encoder_dim", "embed_dim"])
def test_a_dimension_of_zero_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=f"dims.{name} must be a positive integer, got 0"):
        ModelDimensions.from_dict({**DIMS, name: 0})


def test_a_step_of_one_word_is_refused():
    """A model whose step returns one word a row (top_k 1): beam 1 keeps min(beam + 1, K) = 1
    candidate a step, so a photo whose likeliest first word is <end> (never a first word) had
    an empty caption scored 0.0, above every real one. Two words a step are the least."""
    with pytest.raises(ValueError, match="dims.top_k must be 2 or more, got 1"):
        ModelDimensions.from_dict({**DIMS, "top_k": 1})
    assert ModelDimensions.from_dict({**DIMS, "top_k": 2}).top_k == 2


def test_the_optional_dimensions_may_be_left_out():
    assert ModelDimensions.from_dict(DIMS).to_dict() == DIMS


def test_every_tensor_has_the_contracts_shape_after_its_rows():
    tails = ModelDimensions.from_dict(DIMS).tails((224, 200))  # (H, W)
    assert tails == {
        "image": (3, 224, 200),
        "features": (49, 16),
        "att_proj": (49, 8),
        "h0": (12,),
        "c0": (12,),
        "class_probs": (1000,),
        "tokens": (),
        "h": (12,),
        "c": (12,),
        "source_rows": (),
        "image_index": (),
        "word_bias": (30,),
        "topk_logprobs": (5,),
        "topk_ids": (5,),
        "h_out": (12,),
        "c_out": (12,),
        "alpha": (49,),
    }


def test_indices_are_int32_and_everything_else_float32():
    ints = {"tokens", "source_rows", "image_index", "topk_ids"}
    tails = ModelDimensions.from_dict(DIMS).tails((224, 224))
    for name in tails:
        assert tensor_dtype(name) == np.dtype(np.int32 if name in ints else np.float32), name


def test_row_ranges_reach_every_row_of_a_full_batch():
    """2 images x 3 beams: the encoder takes up to 2 images; every step input with a row per
    beam, h and c included (after the first step S = R), takes up to 6 rows, optimised for one
    image's full beam (3)."""
    limits = Limits(max_batch=2, max_beam=3)
    assert limits.row_ranges(ENCODER) == {"image": (1, 1, 2)}
    step = limits.row_ranges(DECODER_STEP)
    assert step == {
        "tokens": (1, 3, 6),
        "source_rows": (1, 3, 6),
        "image_index": (1, 3, 6),
        "h": (1, 3, 6),
        "c": (1, 3, 6),
        "word_bias": (1, 3, 6),
        "features": (1, 1, 2),
        "att_proj": (1, 1, 2),
    }


def test_engine_names_tell_apart_every_limit_they_are_built_for():
    """A step engine built for 4 beams must not be taken for one built for 5 (the cache is
    looked up by this tag); the encoder's rows do not depend on the beam."""
    assert Limits(8, 5).tag(DECODER_STEP) != Limits(8, 4).tag(DECODER_STEP)
    assert Limits(8, 5).tag(DECODER_STEP) != Limits(4, 5).tag(DECODER_STEP)
    assert Limits(8, 5).tag(ENCODER) == Limits(8, 4).tag(ENCODER) != Limits(4, 5).tag(ENCODER)


@pytest.mark.parametrize("limits", [(0, 5), (8, 0), (-1, 5), (True, 5), (8, 2.0)])
def test_limits_must_be_positive_integers(limits):
    with pytest.raises(ValueError, match="must be a positive integer"):
        Limits(*limits)


def test_shapes_give_every_input_and_output_of_each_graph_with_a_dynamic_row():
    shapes = ModelDimensions.from_dict(DIMS).shapes((224, 224))
    assert shapes[ENCODER] == {
        "image": (None, 3, 224, 224),
        "features": (None, 49, 16),
        "att_proj": (None, 49, 8),
        "h0": (None, 12),
        "c0": (None, 12),
        "class_probs": (None, 1000),
    }
    assert set(shapes[DECODER_STEP]) == {
        *("tokens", "h", "c", "source_rows", "features", "att_proj", "image_index", "word_bias"),
        *("topk_logprobs", "topk_ids", "h_out", "c_out", "alpha"),
    }
    assert shapes[DECODER_STEP]["topk_ids"] == (None, 5)
    assert shapes[DECODER_STEP]["alpha"] == (None, 49)
