"""The fused language models' element-wise work in four Triton kernels a step, for the fused
device search (``DeviceBeamSearch(fused=True)``).

``edgecap.decoding.device.TorchLMPair.step`` and ``_word_bias`` make the search's word bias from
the two caption language models in 26 torch operations a step (the tag bonus's two
included): gathers, the cell's products, the logits' bias, max and shift, the density ratio and
its weight. On a GPU each is a kernel of a microsecond or two, the most of any part of the
fused step (docs/gpu-search.md). ``word_bias`` makes the same bias in 13: the gather of the
words' input rows, the matrix products (cuBLAS's, a batched product for both models; the
recurrent one adds the input rows, ``baddbmm``), the ``tanh``, ``exp`` and ``log`` and the sum
over the vocabulary stay torch operations on the same tensors, and everything between them,
which only adds, subtracts, multiplies, takes a maximum or gathers, is in four kernels (the
fused decoder step gathers the input rows in its own row kernel, ``step_kernels._rows``: 11):

- ``_cell``: the new cell, ``0.5 (t_f + 1) c + 0.5 (t_i + 1) t_g`` (the sigmoid gates' weights
  are pre-scaled by 0.5, ``TorchLMPair``), the old cell gathered by source row;
- ``_hidden``: ``0.5 (t_o + 1) tanh(c)``;
- ``_shift``: each row's logits plus their bias, their maximum, and the logits less it (the
  ``exp``'s argument);
- ``_ratio``: the two models' log-probabilities' difference times the row's weight, plus the
  tag bonus of a steered row (and, for the fused decoder step, ``ranked_bias``: the decoder's
  log-probabilities plus that bias, what the step ranks by; ``_tagged`` does the same for the
  tag bonus alone).

IEEE float32 sums, differences, products and maxima round the same whoever computes them, and
the kernels are compiled without fused multiply-adds (``enable_fp_fusion=False``), so the bias
is ``_word_bias``'s bit for bit (``tests/test_device_search.py``, the fused search against the
eager one, in Triton's interpreter on CPU tensors; ``tests/test_device_kernel.py`` compiles
them for NVIDIA GPUs). The transcendental functions stay torch's because Triton's interpreter
cannot run the CUDA math library's (and ``tl.exp`` on a GPU is an approximation): a kernel
computing them would not be tested as it runs. **Not yet run on a GPU.**
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from edgecap.decoding.device import _word_bias
from edgecap.decoding import device_kernel


def _cell(t_ptr, c_ptr, src_ptr, out_ptr, R, H, G, GATHER: tl.constexpr, BH: tl.constexpr):
    """Program (m, r): the new cell from the gates' tanh ``t`` (i, f, g, o blocks of H) and the
    old cell of row ``src[r]`` (``GATHER``) or of row r."""
    pid = tl.program_id(0)
    m = pid // R
    r = pid % R
    j = tl.arange(0, BH)
    mask = j < H
    base = pid.to(tl.int64) * G
    t_i = tl.load(t_ptr + base + j, mask=mask)
    t_f = tl.load(t_ptr + base + H + j, mask=mask)
    t_g = tl.load(t_ptr + base + 2 * H + j, mask=mask)
    if GATHER:
        row = tl.load(src_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    c = tl.load(c_ptr + (m * R + row) * H + j, mask=mask)
    s_i = 0.5 * (t_i + 1.0)
    s_f = 0.5 * (t_f + 1.0)
    tl.store(out_ptr + pid.to(tl.int64) * H + j, s_f * c + s_i * t_g, mask=mask)


def _hidden(t_ptr, tc_ptr, out_ptr, H, G, BH: tl.constexpr):
    """Program (m, r): the new hidden state, the output gate times the new cell's tanh."""
    pid = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BH)
    mask = j < H
    t_o = tl.load(t_ptr + pid * G + 3 * H + j, mask=mask)
    tc = tl.load(tc_ptr + pid * H + j, mask=mask)
    tl.store(out_ptr + pid * H + j, (0.5 * (t_o + 1.0)) * tc, mask=mask)


def _shift(raw_ptr, s_model, b_ptr, d_ptr, top_ptr, R, V, BV: tl.constexpr):
    """Program (m, r): the row's logits plus their bias, l; top[m, r] = max l; d[m, r] = l - top
    (``BV`` words at a time: a maximum is the same in any order)."""
    pid = tl.program_id(0)
    m = pid // R
    r = pid % R
    raw_row = raw_ptr + m * s_model + r.to(tl.int64) * V
    most = tl.full((BV,), float("-inf"), tl.float32)
    for start in range(0, V, BV):
        v = start + tl.arange(0, BV)
        mask = v < V
        logits = tl.load(raw_row + v, mask=mask) + tl.load(b_ptr + m * V + v, mask=mask)
        most = tl.maximum(most, tl.where(mask, logits, float("-inf")))
    top = tl.max(most, axis=0)
    tl.store(top_ptr + pid, top)
    for start in range(0, V, BV):
        v = start + tl.arange(0, BV)
        mask = v < V
        logits = tl.load(raw_row + v, mask=mask) + tl.load(b_ptr + m * V + v, mask=mask)
        tl.store(d_ptr + pid.to(tl.int64) * V + v, logits - top, mask=mask)


def _ratio(
    raw_ptr,
    s_model,
    b_ptr,
    top_ptr,
    log_ptr,
    w_ptr,
    tag_ptr,
    steer_ptr,
    out_ptr,
    lp_ptr,
    ranked_ptr,
    R,
    V,
    HAS_TAGS: tl.constexpr,
    RANKED: tl.constexpr,
    BV: tl.constexpr,
):
    """Program (r, block of ``BV`` words): ((l0 - l1) - (norm0 - norm1)) w[r], plus tag[r] x
    steered[r] (``HAS_TAGS``); norm = top + log(sum exp(l - top)), the log made by torch.
    ``RANKED``: also the decoder's log-probabilities plus that bias, what the step ranks by."""
    r = tl.program_id(0)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask = v < V
    row = r.to(tl.int64) * V
    l0 = tl.load(raw_ptr + row + v, mask=mask) + tl.load(b_ptr + v, mask=mask)
    l1 = tl.load(raw_ptr + s_model + row + v, mask=mask) + tl.load(b_ptr + V + v, mask=mask)
    norm0 = tl.load(top_ptr + r) + tl.load(log_ptr + r)
    norm1 = tl.load(top_ptr + R + r) + tl.load(log_ptr + R + r)
    bias = ((l0 - l1) - (norm0 - norm1)) * tl.load(w_ptr + r)
    if HAS_TAGS:
        steered = tl.load(steer_ptr + r).to(tl.float32)
        bias = tl.load(tag_ptr + row + v, mask=mask) * steered + bias
    tl.store(out_ptr + row + v, bias, mask=mask)
    if RANKED:
        tl.store(ranked_ptr + row + v, tl.load(lp_ptr + row + v, mask=mask) + bias, mask=mask)


def _tagged(tag_ptr, steer_ptr, lp_ptr, out_ptr, ranked_ptr, V, BV: tl.constexpr):
    """Program (r, block of ``BV`` words): the tag bonus alone, tag[r] x steered[r], and the
    decoder's log-probabilities plus it."""
    r = tl.program_id(0)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask = v < V
    row = r.to(tl.int64) * V
    bias = tl.load(tag_ptr + row + v, mask=mask) * tl.load(steer_ptr + r).to(tl.float32)
    tl.store(out_ptr + row + v, bias, mask=mask)
    tl.store(ranked_ptr + row + v, tl.load(lp_ptr + row + v, mask=mask) + bias, mask=mask)


@functools.cache
def _kernels() -> dict[str, Any]:
    """The five kernels (four a step: ``_ratio`` or ``_tagged``): compiled by Triton for a GPU,
    or, with ``TRITON_INTERPRET=1`` in the environment before triton is imported, run by its
    interpreter (CPU tensors: the tests)."""
    return {f.__name__: triton.jit(f) for f in (_cell, _hidden, _shift, _ratio, _tagged)}


# the logits' kernels take a row's words this many at a time (a vocabulary grown past it loops,
# and a program's values stay in registers: tests/test_device_kernel.py)
WORDS_AT_A_TIME = 1024


def word_bias(loop, t: int | None, carry: tuple) -> tuple:
    """``device._word_bias`` with the language models' element-wise work in the four kernels:
    the same bias and new states bit for bit. ``t``: 0 for the first step (its rows' states are
    the images', all zero: no gather), None for one after it. Without the language models (the
    tag bonus alone: one product) it is ``_word_bias``."""
    tokens, source, steered, lm_states = carry[0], carry[1], carry[7], carry[8]
    if lm_states is None:
        return _word_bias(loop, t, carry)
    # the kernels index these by row alone
    assert tokens.stride(0) == 1 and source.stride(0) == 1 and (steered is None or steered.stride(0) == 1)
    with device_kernel.on_device(lm_states[0].device):
        return _language_models(loop, t != 0, tokens, source, steered, lm_states)[:2]


def ranked_bias(loop, t: int | None, carry: tuple, logprobs: torch.Tensor, lm_h, lm_in=None) -> tuple:
    """``word_bias`` after the decoder's step, for the fused decoder step
    (``edgecap.decoding.step_kernels``): -> (the bias or None, the language models' new
    states, ``logprobs`` (R, V) float32 plus the bias, what the step ranks by, or None without
    a bias), made in the bias's own kernel (the language models' ``_ratio``, or ``_tagged`` for
    the tag bonus alone). ``lm_h``: their hidden states already gathered by source row, or None
    (the first step: nothing to gather); ``lm_in``: their input rows (2, R, 4H) already gathered
    by token, or None (gathered here)."""
    tokens, source, steered, lm_states = carry[0], carry[1], carry[7], carry[8]
    tags = steered is not None and loop.tag_bias is not None
    if lm_states is None and not tags:
        return None, None, None
    assert tokens.stride(0) == 1 and source.stride(0) == 1 and (steered is None or steered.stride(0) == 1)
    assert logprobs.is_contiguous() and logprobs.dtype == torch.float32
    with device_kernel.on_device(logprobs.device):
        if lm_states is not None:
            return _language_models(loop, t != 0, tokens, source, steered, lm_states, lm_h, logprobs, lm_in)
        R, V = logprobs.shape
        assert loop.tag_bias.is_contiguous()
        bias, ranked = torch.empty_like(logprobs), torch.empty_like(logprobs)
        BV = min(device_kernel._next_pow2(V), WORDS_AT_A_TIME)
        _kernels()["_tagged"][(R, triton.cdiv(V, BV))](
            loop.tag_bias, steered.view(torch.uint8), logprobs, bias, ranked, V, BV=BV, **OPTIONS
        )
        return bias, None, ranked


# every kernel: exact sums and products, none contracted into a fused multiply-add
OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


def _language_models(
    loop, gather: bool, tokens, source, steered, lm_states, lm_h=None, logprobs=None, lm_in=None
) -> tuple:
    """``word_bias``' work with the language models: the bias (R, V), their new states, and
    with ``logprobs`` those plus the bias (else None); ``gather``: the states are the previous
    step's rows (by ``source``), not the images' (``lm_h``: the hidden ones already gathered);
    ``lm_in``: the words' input rows already gathered (else gathered here, as
    ``TorchLMPair.step`` does)."""
    k = _kernels()
    lms = loop.lms
    h, c = lm_states
    if lm_h is not None:
        h = lm_h
    elif gather:
        h = h.index_select(1, source)
    R, H = h.shape[1], lms.hidden
    V, G = lms.out_b.shape[2], 4 * H
    assert c.is_contiguous() and lms.out_b.is_contiguous()
    if lm_in is None:
        lm_in = lms.input.index_select(1, tokens)
    assert lm_in.shape == (2, R, G) and lm_in.is_contiguous()
    # the input rows plus the recurrent products, both models' in one batched product, as
    # TorchLMPair.step's (the same operation on the same values: the same bits)
    gates = torch.tanh(torch.baddbmm(lm_in, h, lms.w_hh_t))  # tanh(0.5 x) for i, f, o; tanh(x) for g
    assert gates.is_contiguous()
    options = OPTIONS
    BH = device_kernel._next_pow2(H)
    cell = torch.empty((2, R, H), dtype=h.dtype, device=h.device)
    k["_cell"][(2 * R,)](gates, c, source, cell, R, H, G, GATHER=gather, BH=BH, **options)
    hidden = torch.empty_like(cell)
    k["_hidden"][(2 * R,)](gates, torch.tanh(cell), hidden, H, G, BH=BH, **options)
    raw = torch.bmm(hidden, lms.out_w_t)  # the logits before their bias, as TorchLMPair.step's
    block = raw.stride(0)  # one model's (R, V) logits to the next's
    assert raw.is_contiguous()
    shifted = torch.empty((2, R, V), dtype=h.dtype, device=h.device)
    top = torch.empty((2, R), dtype=h.dtype, device=h.device)
    BV = min(device_kernel._next_pow2(V), WORDS_AT_A_TIME)
    k["_shift"][(2 * R,)](raw, block, lms.out_b, shifted, top, R, V, BV=BV, **options)
    log_sums = torch.log(torch.exp(shifted).sum(dim=2))
    bias = torch.empty((R, V), dtype=h.dtype, device=h.device)
    ranked = None if logprobs is None else torch.empty_like(bias)
    tags = steered is not None and loop.tag_bias is not None
    weights = loop.fusion_weights
    assert weights.is_contiguous() and (not tags or loop.tag_bias.is_contiguous())
    k["_ratio"][(R, triton.cdiv(V, BV))](
        raw,
        block,
        lms.out_b,
        top,
        log_sums,
        weights,
        loop.tag_bias if tags else bias,
        steered.view(torch.uint8) if tags else bias,
        bias,
        bias if logprobs is None else logprobs,
        bias if ranked is None else ranked,
        R,
        V,
        HAS_TAGS=tags,
        RANKED=ranked is not None,
        BV=BV,
        **options,
    )
    return bias, (hidden, cell), ranked
