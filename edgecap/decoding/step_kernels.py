"""The decoder step's gathers and element-wise joins in Triton kernels, for the fused device
search (``DeviceBeamSearch(fused=True)``, over the torch backend's ``StepGraph``).

``CaptionDecoder.step_rows`` after the search's gather of the rows' states is about 25 torch
operations a step; on a GPU each is a kernel of a microsecond or two, and a one-photo decode is
bound by their number (docs/gpu-search.md). ``fused_step`` runs the same step with six of them
in three kernels (the first gathers the language models' rows too), two more in kernels the
search runs anyway, and one folded into the word logits' projection:

- ``_rows``: the rows' previous h and c (by source row), their words' embeddings (by token)
  and, with the language models, those models' previous hidden states and their words' input
  rows: five gathers in one;
- ``_lstm_input``: the gate times the attention's context, beside the embedding (a product and
  a ``cat``);
- ``_deep``: the deep output's two sums;
- the word bias's kernel (``lm_kernels``: the language models' ``_ratio``, or ``_tagged`` for
  the tag bonus alone) also writes the log-probabilities plus the bias, what the step ranks by,
  so the decoder's log-probabilities come before the language models' step here;
- the bookkeeping kernel reads the top K's log-probabilities at their ids (``gathered``);
- the words a caption never holds get their floor from a copy of the word-logit projection
  (``KernelJoins.masked_projection``), not from a ``where`` after it.

The matrix products, the LSTM cell, ``tanh``, the softmax and log-softmax, and the top K stay
torch operations on the same tensors. The kernels only copy, add and multiply, compiled without
fused multiply-adds, in the tensors' own dtype (FP16 rounds each product and sum as torch's
FP16 operations do): the step's log-probabilities, states and search bit for bit the eager
device search's (``tests/test_device_search.py``). **Not yet run on a GPU.**
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from edgecap.decoding import device_kernel, lm_kernels
from edgecap.models.decoder import LOGIT_FLOOR, CaptionDecoder, StepJoins
from edgecap.vocab import NEVER_GENERATED_IDS


def _rows(
    tok_ptr,
    src_ptr,
    embed_ptr,
    h_ptr,
    c_ptr,
    lm_ptr,
    lm_in_ptr,
    emb_out,
    h_out,
    c_out,
    lm_out,
    lm_in_out,
    R,
    E,
    H,
    HL,
    V,
    s_h,
    s_c,
    s_lm_m,
    s_lm_r,
    LM: tl.constexpr,
    LM_IN: tl.constexpr,
    BE: tl.constexpr,
    BH: tl.constexpr,
    BHL: tl.constexpr,
    BG: tl.constexpr,
):
    """Program r: emb[r] = embed[tok[r]]; h[r], c[r] = h, c of row src[r]; with ``LM``, the
    language models' hidden states of row src[r] too; with ``LM_IN``, their input rows (2, V,
    4 HL) of word tok[r]."""
    r = tl.program_id(0).to(tl.int64)
    word = tl.load(tok_ptr + r).to(tl.int64)
    row = tl.load(src_ptr + r).to(tl.int64)
    e = tl.arange(0, BE)
    tl.store(emb_out + r * E + e, tl.load(embed_ptr + word * E + e, mask=e < E), mask=e < E)
    j = tl.arange(0, BH)
    tl.store(h_out + r * H + j, tl.load(h_ptr + row * s_h + j, mask=j < H), mask=j < H)
    tl.store(c_out + r * H + j, tl.load(c_ptr + row * s_c + j, mask=j < H), mask=j < H)
    if LM:
        k = tl.arange(0, BHL)
        for m in tl.static_range(2):
            kept = tl.load(lm_ptr + m * s_lm_m + row * s_lm_r + k, mask=k < HL)
            tl.store(lm_out + (m * R + r) * HL + k, kept, mask=k < HL)
    if LM_IN:
        g = tl.arange(0, BG)
        G = 4 * HL
        for m in tl.static_range(2):
            given = tl.load(lm_in_ptr + (m * V + word) * G + g, mask=g < G)
            tl.store(lm_in_out + (m * R + r) * G + g, given, mask=g < G)


def _lstm_input(emb_ptr, beta_ptr, ctx_ptr, x_out, gated_out, E, F, BE: tl.constexpr, BF: tl.constexpr):
    """Program r: gated[r] = beta[r] x context[r]; x[r] = (emb[r], gated[r])."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    tl.store(x_out + r * (E + F) + e, tl.load(emb_ptr + r * E + e, mask=e < E), mask=e < E)
    f = tl.arange(0, BF)
    gated = tl.load(beta_ptr + r * F + f, mask=f < F) * tl.load(ctx_ptr + r * F + f, mask=f < F)
    tl.store(gated_out + r * F + f, gated, mask=f < F)
    tl.store(x_out + r * (E + F) + E + f, gated, mask=f < F)


def _deep(emb_ptr, a_ptr, b_ptr, out_ptr, E, BE: tl.constexpr):
    """Program r: (emb[r] + a[r]) + b[r], each sum rounded to the dtype."""
    r = tl.program_id(0).to(tl.int64)
    e = r * E + tl.arange(0, BE)
    mask = tl.arange(0, BE) < E
    first = tl.load(emb_ptr + e, mask=mask) + tl.load(a_ptr + e, mask=mask)
    tl.store(out_ptr + e, first + tl.load(b_ptr + e, mask=mask), mask=mask)


@functools.cache
def _kernels() -> dict[str, Any]:
    """The three kernels: compiled by Triton for a GPU, or, with ``TRITON_INTERPRET=1`` in the
    environment before triton is imported, run by its interpreter (CPU tensors: the tests)."""
    return {f.__name__: triton.jit(f) for f in (_rows, _lstm_input, _deep)}


class KernelJoins(StepJoins):
    """``StepJoins`` in the kernels: the same values, bit for bit; and the word logits with the
    words a caption never holds floored by the projection itself (``masked_projection``)."""

    masks_words = True

    def __init__(self) -> None:
        self._masked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def word_logits(self, out_vocab: nn.Linear, x):
        return self.masked_projection(out_vocab)(x)

    def masked_projection(self, out_vocab: nn.Linear) -> nn.Linear:
        """A copy of the word-logit projection (its hooks too: an FP16 model's FP32 island) whose
        rows for the words a caption never holds (``NEVER_GENERATED_IDS``) have zero weights and
        ``LOGIT_FLOOR`` as their bias: their logits come out ``LOGIT_FLOOR`` exactly (a sum of
        zero products, plus the bias) and every other word's as the projection's own (the same
        shapes, so the same matrix product), which is ``mask_logits`` after the projection
        without its ``where``: one kernel a step fewer. Made once per projection, and again
        after its weights or bias change in place under autograd's version counter (a graph's
        warm-up makes it before a capture: it copies from the host); the copy holds V x E more
        weights on the device. A copy: changes it cannot see (writes through ``.data``, in
        inference mode, hooks added later) and graphs captured before a change keep the old
        weights, so a model whose weights change is searched through a new ``KernelJoins``
        (the captioner's never change)."""
        weight, bias = out_vocab.weight, out_vocab.bias
        key = (weight.data_ptr(), _version(weight), _version(bias), weight.dtype, weight.device)
        kept = self._masked.get(out_vocab)
        if kept is None or kept[0] != key:
            masked = copy.deepcopy(out_vocab)
            banned = torch.tensor(NEVER_GENERATED_IDS, device=weight.device)
            with torch.no_grad():
                masked.weight.index_fill_(0, banned, 0.0)
                masked.bias.index_fill_(0, banned, LOGIT_FLOOR)
            kept = self._masked[out_vocab] = (key, masked)
        return kept[1]

    def lstm_input(self, emb, beta, context):
        R, E = emb.shape
        F = context.shape[1]
        for tensor in (emb, beta, context):
            assert tensor.is_contiguous() and tensor.dtype == emb.dtype
        x = torch.empty((R, E + F), dtype=emb.dtype, device=emb.device)
        gated = torch.empty((R, F), dtype=emb.dtype, device=emb.device)
        with device_kernel.on_device(emb.device):
            _kernels()["_lstm_input"][(R,)](
                emb, beta, context, x, gated, E, F, BE=_pow2(E), BF=_pow2(F), **lm_kernels.OPTIONS
            )
        return x, gated

    def deep(self, emb, from_hidden, from_context):
        R, E = emb.shape
        for tensor in (emb, from_hidden, from_context):
            assert tensor.is_contiguous() and tensor.shape == (R, E) and tensor.dtype == emb.dtype
        out = torch.empty_like(emb)
        with device_kernel.on_device(emb.device):
            _kernels()["_deep"][(R,)](
                emb, from_hidden, from_context, out, E, BE=_pow2(E), **lm_kernels.OPTIONS
            )
        return out


KERNEL_JOINS = KernelJoins()


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version (an inference tensor has none: 0)."""
    try:
        return tensor._version
    except RuntimeError:
        return 0


_pow2 = device_kernel._next_pow2


def decoder_of(step) -> CaptionDecoder | None:
    """The decoder ``fused_step`` runs for a search's step: a ``TorchStep`` over a
    ``StepGraph`` (its image tensors gathered per row) of an attention decoder in eval mode;
    else None (``_fused_step`` runs the decoder's step as it is)."""
    decoder = getattr(step, "decoder", None)
    if isinstance(decoder, CaptionDecoder) and decoder.cfg.attention and not decoder.training:
        return decoder
    return None


def gather_rows(embed: torch.Tensor, tokens, source, h, c, lm_h=None, lm_input=None) -> tuple:
    """``_rows``: embed (V, E) the word embeddings, tokens and source (R,), h, c (S, H) the
    previous step's rows (or the images'), ``lm_h`` the language models' hidden states (2, S,
    HL) or None, ``lm_input`` their input rows (2, V, 4 HL) or None -> (embed[tokens],
    h[source], c[source], lm_h[:, source] or None, lm_input[:, tokens] or None)."""
    R, H, E = tokens.shape[0], h.shape[1], embed.shape[1]
    assert embed.is_contiguous() and h.stride(1) == 1 and c.stride(1) == 1
    assert tokens.stride(0) == 1 and source.stride(0) == 1 and c.shape[1] == H
    device = h.device
    emb = torch.empty((R, E), dtype=embed.dtype, device=device)
    h_rows = torch.empty((R, H), dtype=h.dtype, device=device)
    c_rows = torch.empty((R, H), dtype=c.dtype, device=device)
    lm_rows = lm_in = None
    if lm_h is not None:
        assert lm_h.shape[0] == 2 and lm_h.stride(2) == 1
        lm_rows = torch.empty((2, R, lm_h.shape[2]), dtype=lm_h.dtype, device=device)
    HL = lm_h.shape[2] if lm_h is not None else 1
    if lm_input is not None:
        HL = lm_input.shape[2] // 4
        assert lm_input.shape[0] == 2 and lm_input.shape[2] == 4 * HL and lm_input.is_contiguous()
        assert lm_h is None or lm_h.shape[2] == HL
        lm_in = torch.empty((2, R, 4 * HL), dtype=lm_input.dtype, device=device)
    with device_kernel.on_device(device):
        _kernels()["_rows"][(R,)](
            tokens,
            source,
            embed,
            h,
            c,
            h if lm_h is None else lm_h,
            h if lm_input is None else lm_input,
            emb,
            h_rows,
            c_rows,
            h_rows if lm_rows is None else lm_rows,
            h_rows if lm_in is None else lm_in,
            R,
            E,
            H,
            HL,
            0 if lm_input is None else lm_input.shape[1],
            h.stride(0),
            c.stride(0),
            0 if lm_h is None else lm_h.stride(0),
            0 if lm_h is None else lm_h.stride(1),
            LM=lm_h is not None,
            LM_IN=lm_input is not None,
            BE=_pow2(E),
            BH=_pow2(H),
            BHL=_pow2(HL),
            BG=_pow2(4 * HL),
            **lm_kernels.OPTIONS,
        )
    return emb, h_rows, c_rows, lm_rows, lm_in


def fused_step(loop, decoder: CaptionDecoder, t: int | None, number: torch.Tensor, carry: tuple) -> tuple:
    """``device._fused_step`` with ``decoder``'s step (``decoder_of(loop.step)``) in the kernels
    above: the same next carry and the same writes, bit for bit. ``t``: 0 for the first step,
    None for one after it."""
    tokens, source, (h, c), lm_states = carry[0], carry[1], carry[2], carry[8]
    # the first step's language-model states are all zero: nothing to gather
    lm_h = lm_states[0] if lm_states is not None and t != 0 else None
    lm_input = loop.lms.input if lm_states is not None else None  # the words' rows, every step
    emb, h, c, lm_rows, lm_in = gather_rows(decoder.embed.weight, tokens, source, h, c, lm_h, lm_input)
    features, att_proj = loop.step.rows  # gathered per row once a search (``TorchStep.prepare``)
    logprobs, h, c, _ = decoder.log_probs(tokens, h, c, features, att_proj, emb, KERNEL_JOINS)
    bias, lm_states, ranked = lm_kernels.ranked_bias(loop, t, carry, logprobs, lm_rows, lm_in)
    K = decoder.cfg.top_k
    if ranked is None:
        values, ids = logprobs.topk(K, dim=1)
    else:  # the bookkeeping reads the log-probabilities at the ids (``gathered``)
        values, ids = logprobs, ranked.topk(K, dim=1).indices
    return device_kernel.bookkeeping(
        loop, number, carry, values, ids, bias, (h, c), lm_states, first=t == 0, gathered=ranked is not None
    )
