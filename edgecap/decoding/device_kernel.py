"""The device search's bookkeeping in one Triton kernel a step (``DeviceBeamSearch(fused=True)``).

A step of ``edgecap.decoding.device._step`` after the decoder's own step and the language models
is about 100 small torch operations (the candidates' scores, the no-repeat rule, the stable sort
of an image's candidates, the finished hypotheses, the best place to end, the reorder of every
per-row state): on a GPU each is a kernel of a microsecond or two, and a one-photo decode is
bound by their number (docs/gpu-search.md). ``bookkeeping`` does all of it in one kernel, one
program per image, with the same arithmetic in the same order (float64 sums, the same
comparisons), so the same hypotheses and scores bit for bit (``tests/test_device_search.py``,
against ``_step``; ``tests/test_device_kernel.py`` compiles it for NVIDIA GPUs without one):

- the sort is a rank: candidate c goes before c' when its score is higher, or equal and c comes
  first (the stable sort's order); a running count in that order is a count over the
  candidates ranked no later;
- every step, the first too (its rows are images: the words a caption never starts with are
  blocked, and no ending is recorded, as in ``_step``);
- the decoder's matrix products, LSTM cell, softmax and log-softmax stay torch operations (the
  products are cuBLAS's), and so do the fused language models' matrix products and
  transcendental functions; the decoder's gathers and joins are in three kernels of their own
  (``edgecap.decoding.step_kernels``), the language models' element-wise work in four
  (``edgecap.decoding.lm_kernels``).

Needs the ``triton`` package (PyTorch's CUDA wheels for Linux bring it). On a CUDA device the
kernel is compiled by Triton; on the CPU it runs only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported: numpy, slow; the tests run it so).
**Not yet run on a GPU.**
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import triton
import triton.language as tl


# An image's candidates are ranked pairwise in one program (beam x width squared), so the kernel
# takes beams up to 10 (at most 128 candidates, padded): compiled for sm_90, beam 3 keeps every
# value in registers in one warp, beam 7 in four; larger beams run ``_step`` (``supports``)
MAX_CANDIDATES = 128


def supports(plan) -> bool:
    """Whether the kernel serves ``plan`` (its beam x width within ``MAX_CANDIDATES``)."""
    return _next_pow2(plan.beam * plan.width) <= MAX_CANDIDATES


def _warps(candidates: int) -> int:
    """Warps a program: one per 16 candidates (padded), 1 to 8 (no register spills in the
    compile test for beams 1 to 7)."""
    return min(8, max(1, candidates // 16))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _bookkeeping(  # one kernel: every tensor of the step
    values_ptr,
    ids_ptr,
    bias_ptr,
    sv_r,
    sv_k,
    si_r,
    si_k,
    sb_r,
    sum_ptr,
    true_ptr,
    s_sum,
    s_true,
    hist_ptr,
    sh_r,
    sh_t,
    done_ptr,
    steer_ptr,
    s_steer,
    unsaid_ptr,
    su_r,
    number_ptr,
    den_ptr,
    out_tok_ptr,
    out_src_ptr,
    out_sum_ptr,
    out_true_ptr,
    out_hist_ptr,
    out_done_ptr,
    out_steer_ptr,
    p_tok_ptr,
    p_len_ptr,
    p_rank_ptr,
    p_lp_ptr,
    p_fin_ptr,
    p_count_ptr,
    e_tok_ptr,
    e_len_ptr,
    e_rank_lp_ptr,
    e_rank_ptr,
    e_lp_ptr,
    end_rank_lp_ptr,
    end_lp_ptr,
    end_words_ptr,
    step_ok_ptr,
    never_ptr,
    N,
    K,
    END,
    B: tl.constexpr,
    W: tl.constexpr,
    T: tl.constexpr,
    NGRAM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TAGS: tl.constexpr,
    ENDINGS: tl.constexpr,
    BEST: tl.constexpr,
    FIRST: tl.constexpr,
    GATHERED: tl.constexpr,
    BB: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(number_ptr)  # the step's number (int64), as ``_step`` reads it
    S = B + 2  # the pool's slots per image (the last one: the scratch slot, never written here)
    C = B * W
    first_row = i * B

    # -- every image done before this step: the numpy loop had stopped (``all_done``)
    n_ix = tl.arange(0, BN)
    done_all = tl.load(done_ptr + n_ix, mask=n_ix < N, other=1)
    all_done = tl.min(done_all.to(tl.int32), 0) != 0
    done_i = tl.load(done_ptr + i) != 0
    count0 = tl.load(p_count_ptr + i)

    # -- the rows' whole top K: finiteness, and where <end> stands
    b_ix = tl.arange(0, BB)
    k_ix = tl.arange(0, BK)
    b_ok = b_ix < B
    rows_b = first_row + b_ix
    bk_ok = b_ok[:, None] & (k_ix[None, :] < K)
    ids_k = tl.load(ids_ptr + rows_b[:, None] * si_r + k_ix[None, :] * si_k, mask=bk_ok, other=-1)
    # ``GATHERED``: ``values`` is the rows' whole log-probabilities (R, V), read at the ids
    col_k = ids_k.to(tl.int64) if GATHERED else k_ix[None, :]
    vals_k = tl.load(values_ptr + rows_b[:, None] * sv_r + col_k * sv_k, mask=bk_ok, other=0.0)
    finite_k = tl.abs(vals_k) < float("inf")
    bad = tl.sum((bk_ok & (finite_k == 0)).to(tl.int32), 1)
    bad = tl.sum(bad, 0) > 0
    tl.store(step_ok_ptr + t, 0, mask=bad & (all_done == 0))

    sum_b = tl.load(sum_ptr + rows_b * s_sum, mask=b_ok, other=float("-inf"))
    true_b = tl.load(true_ptr + rows_b * s_true, mask=b_ok, other=0.0)
    live_b = b_ok & (sum_b != float("-inf"))
    is_end_k = bk_ok & (ids_k == END)
    has_b = tl.sum(is_end_k.to(tl.int32), 1) > 0
    # the first <end> of the row's top K, or 0 (an argmax over no match)
    at_b = tl.min(tl.where(is_end_k, k_ix[None, :], BK), 1)
    at_b = tl.where(has_b, at_b, 0)
    end_id = tl.load(ids_ptr + rows_b * si_r + at_b * si_k, mask=b_ok, other=0)
    end_col = end_id.to(tl.int64) if GATHERED else at_b
    end_lp = tl.load(values_ptr + rows_b * sv_r + end_col * sv_k, mask=b_ok, other=0.0).to(tl.float64)
    if HAS_BIAS:
        end_bias = tl.load(bias_ptr + rows_b * sb_r + end_id, mask=b_ok, other=0.0).to(tl.float64)
        end_ranked = end_lp + end_bias
    else:
        end_ranked = end_lp
    end_cand = sum_b + end_ranked  # ``candidates`` at the <end>
    end_model = true_b + end_lp  # ``model_lp`` at the <end>

    t_ix = tl.arange(0, BT)
    t_ok = t_ix < T
    hist_b = tl.load(
        hist_ptr + rows_b[:, None] * sh_r + t_ix[None, :] * sh_t, mask=b_ok[:, None] & t_ok[None, :], other=0
    )

    if ENDINGS:
        # every place a row could end: its <end>'s rank sum (-inf: none), log-prob, words so far
        # (a dead row's <end> is none: as _step)
        tl.store(
            end_rank_lp_ptr + t * (N * B) + rows_b,
            tl.where(has_b & live_b, end_cand, float("-inf")),
            mask=b_ok,
        )
        tl.store(end_lp_ptr + t * (N * B) + rows_b, end_model, mask=b_ok)
        tl.store(
            end_words_ptr + (t * (N * B) + rows_b[:, None]) * T + t_ix[None, :],
            hist_b,
            mask=b_ok[:, None] & t_ok[None, :],
        )
    if BEST:
        # the best place to end while the image has no finished hypothesis (``_best_ending``)
        e_has = has_b & live_b
        den = tl.load(den_ptr + t + 1)
        e_rank = tl.where(e_has, end_cand / den, float("-inf"))
        e_model = tl.where(e_has, end_model, float("-inf"))
        best = tl.max(tl.where(b_ok, e_rank, float("-inf")), 0)
        best_model = tl.max(tl.where(b_ok & (e_rank == best), e_model, float("-inf")), 0)
        hit = e_has & (e_rank == best) & (e_model == best_model)
        pick = tl.min(tl.where(hit, b_ix, BB), 0)
        pick = tl.where(pick == BB, 0, pick)
        rank_i = tl.load(e_rank_ptr + i)
        lp_i = tl.load(e_lp_ptr + i)
        better = (count0 == 0) & (done_i == 0) & ((best > rank_i) | ((best == rank_i) & (best_model > lp_i)))
        pick_lp = tl.max(tl.where(b_ix == pick, end_cand, float("-inf")), 0)
        pick_hist = tl.load(hist_ptr + (first_row + pick) * sh_r + t_ix * sh_t, mask=t_ok, other=0)
        # a scalar condition joins a block as an int32 block (Triton's interpreter cannot
        # broadcast a scalar int1)
        tl.store(e_tok_ptr + i * T + t_ix, pick_hist, mask=t_ok & (t_ix * 0 + better.to(tl.int32) != 0))
        tl.store(e_len_ptr + i, t, mask=better)
        tl.store(e_rank_lp_ptr + i, pick_lp, mask=better)
        tl.store(e_rank_ptr + i, best, mask=better)
        tl.store(e_lp_ptr + i, best_model, mask=better)

    # -- the candidates: each row's first W words, c = row * W + word's place
    c_ix = tl.arange(0, BC)
    c_ok = c_ix < C
    cb = c_ix // W
    cw = c_ix % W
    rows_c = first_row + cb
    word = tl.load(ids_ptr + rows_c * si_r + cw * si_k, mask=c_ok, other=0).to(tl.int64)
    lp = tl.load(values_ptr + rows_c * sv_r + (word if GATHERED else cw) * sv_k, mask=c_ok, other=0.0)
    lp = lp.to(tl.float64)
    if HAS_BIAS:
        ranked = lp + tl.load(bias_ptr + rows_c * sb_r + word, mask=c_ok, other=0.0).to(tl.float64)
    else:
        ranked = lp
    sum_c = tl.load(sum_ptr + rows_c * s_sum, mask=c_ok, other=float("-inf"))
    true_c = tl.load(true_ptr + rows_c * s_true, mask=c_ok, other=0.0)
    cand = sum_c + ranked
    model = true_c + lp
    ok = c_ok & (tl.abs(cand) < float("inf"))
    if FIRST:
        # the words a caption never starts with (``NeverFirst``)
        ok = ok & (tl.load(never_ptr + word, mask=c_ok, other=0) == 0)
    if NGRAM > 0:
        # no repeated n-gram (``_repeats``): the n-grams that lie inside the t words so far
        j_ix = tl.arange(0, BT)
        j_ok = j_ix < T - NGRAM + 1
        match = (c_ok[:, None] & j_ok[None, :]) & (j_ix[None, :] < t - NGRAM + 1)
        for k in tl.static_range(NGRAM - 1):
            prefix = tl.load(
                hist_ptr + rows_c[:, None] * sh_r + (j_ix[None, :] + k) * sh_t,
                mask=c_ok[:, None] & j_ok[None, :],
                other=0,
            )
            last_at = tl.maximum(t - (NGRAM - 1) + k, 0)
            last = tl.load(hist_ptr + rows_c * sh_r + last_at * sh_t, mask=c_ok, other=0)
            match = match & (prefix == last[:, None])
        following = tl.load(
            hist_ptr + rows_c[:, None] * sh_r + (j_ix[None, :] + NGRAM - 1) * sh_t,
            mask=c_ok[:, None] & j_ok[None, :],
            other=0,
        )
        repeats = tl.sum((match & (following == word[:, None])).to(tl.int32), 1) > 0
        ok = ok & (repeats == 0)

    # -- the stable sort as a rank: c' no later than c (the sorted order's inclusive prefix)
    s_c = cand[:, None]
    s_o = cand[None, :]
    o_ix = c_ix[None, :]
    no_later = c_ok[None, :] & ((s_o > s_c) | ((s_o == s_c) & (o_ix <= c_ix[:, None])))
    is_end = word == END
    going = ok & (is_end == 0)
    going_before = tl.sum((no_later & going[None, :]).to(tl.int32), 1)
    taken = going & (going_before <= B)
    ending = ok & is_end & (going_before < B)
    pos = count0 + tl.sum((no_later & ending[None, :]).to(tl.int64), 1) - 1
    add = ending & (pos < B)
    # finished hypotheses: the <end>s ranked before the beam's last continuation, while room
    slot = i * S + pos
    hist_c = tl.load(
        hist_ptr + rows_c[:, None] * sh_r + t_ix[None, :] * sh_t, mask=add[:, None] & t_ok[None, :], other=0
    )
    tl.store(p_tok_ptr + slot[:, None] * T + t_ix[None, :], hist_c, mask=add[:, None] & t_ok[None, :])
    tl.store(p_len_ptr + slot, t + tl.zeros_like(slot), mask=add)
    tl.store(p_rank_ptr + slot, cand, mask=add)
    tl.store(p_lp_ptr + slot, model, mask=add)
    tl.store(p_fin_ptr + slot, tl.full((BC,), 1, tl.uint8), mask=add)
    count1 = count0 + tl.sum(add.to(tl.int64), 0)

    # every continuation blocked and nothing finished: the live beams become hypotheses
    image_live = tl.sum(going.to(tl.int32), 0) > 0
    keep = (count1 == 0) & ((done_i | image_live) == 0)
    keep_b = live_b & (b_ix * 0 + keep.to(tl.int32) != 0)
    keep_before = tl.sum(((b_ix[None, :] <= b_ix[:, None]) & keep_b[None, :]).to(tl.int64), 1)
    kpos = count1 + keep_before - 1
    kadd = keep_b & (kpos < B)
    kslot = i * S + kpos
    tl.store(p_tok_ptr + kslot[:, None] * T + t_ix[None, :], hist_b, mask=kadd[:, None] & t_ok[None, :])
    tl.store(p_len_ptr + kslot, t + tl.zeros_like(kslot), mask=kadd)
    tl.store(p_rank_ptr + kslot, sum_b, mask=kadd)
    tl.store(p_lp_ptr + kslot, true_b, mask=kadd)
    tl.store(p_fin_ptr + kslot, tl.zeros((BB,), tl.uint8), mask=kadd)
    count2 = count1 + tl.sum(kadd.to(tl.int64), 0)
    tl.store(p_count_ptr + i, count2)
    done_new = (count2 >= B) | done_i | (image_live == 0)
    tl.store(out_done_ptr + i, done_new.to(tl.uint8))

    # -- the new rows: the taken candidates in rank order; an unfilled one -inf, 0, <end>, the
    # image's first row
    fills = taken[None, :] & (going_before[None, :] == b_ix[:, None] + 1)  # (new row, candidate)
    filled = tl.sum(fills.to(tl.int32), 1) > 0
    new_sum = tl.max(tl.where(fills, cand[None, :], float("-inf")), 1)
    new_sum = tl.where(done_new, float("-inf"), new_sum)
    new_true = tl.where(filled, tl.max(tl.where(fills, model[None, :], float("-inf")), 1), 0.0)
    new_tok = tl.where(filled, tl.max(tl.where(fills, word[None, :], -1), 1), END)
    new_src = tl.where(filled, tl.max(tl.where(fills, rows_c[None, :], -1), 1), first_row)
    tl.store(out_sum_ptr + rows_b, new_sum, mask=b_ok)
    tl.store(out_true_ptr + rows_b, new_true, mask=b_ok)
    tl.store(out_tok_ptr + rows_b, new_tok, mask=b_ok)
    tl.store(out_src_ptr + rows_b, new_src, mask=b_ok)
    if HAS_TAGS:
        # steered until the row says one of its tag words
        steer = tl.load(steer_ptr + new_src * s_steer, mask=b_ok, other=0) != 0
        unsaid = tl.load(unsaid_ptr + rows_b * su_r + new_tok, mask=b_ok, other=0) != 0
        tl.store(out_steer_ptr + rows_b, (steer & unsaid).to(tl.uint8), mask=b_ok)
    # the words so far, reordered, and this step's word
    moved = tl.load(
        hist_ptr + new_src[:, None] * sh_r + t_ix[None, :] * sh_t, mask=b_ok[:, None] & t_ok[None, :], other=0
    )
    moved = tl.where(t_ix[None, :] == t, new_tok[:, None], moved)
    tl.store(out_hist_ptr + rows_b[:, None] * T + t_ix[None, :], moved, mask=b_ok[:, None] & t_ok[None, :])


@functools.cache
def _kernel() -> Any:
    """The kernel: compiled by Triton for a GPU, or, with ``TRITON_INTERPRET=1`` in the
    environment before triton is imported, run by its interpreter (CPU tensors: the tests)."""
    return triton.jit(_bookkeeping)


def on_device(device: torch.device):
    """A block whose Triton launches go to ``device``: Triton launches on the calling thread's
    current CUDA device and its current stream, which for a model on ``cuda:1`` called from a
    thread whose current device is 0 would be the wrong GPU (a CUDA graph's capture and
    replay set it; the plain search does not). On the CPU (the interpreter) nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _u8(x: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 (the same bytes), which Triton loads and stores as bytes."""
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def bookkeeping(
    loop,
    number: torch.Tensor,
    carry: tuple,
    values,
    ids,
    bias,
    state,
    lm_states,
    first: bool = False,
    gathered: bool = False,
) -> tuple:
    """The rest of ``_step`` in one kernel: ``values``, ``ids`` the step's top K (R, K) (with
    ``gathered``, ``values`` is the rows' whole log-probabilities (R, V), which the kernel
    reads at the ids: the gather ``step_rows`` makes for a step with a word bias, in the
    kernel), ``bias`` its word bias (R, V) or None; ``state``, ``lm_states`` the step's and the
    language models' new states (reordered by the next step, as there); ``first``: the first
    step (the words a caption never starts with are blocked, no ending is recorded). Writes the
    pool, the endings and ``step_ok`` in place; -> the next carry."""
    plan, pool = loop.plan, loop.pool
    N, B, T = plan.n_images, plan.beam, plan.max_length
    R = N * B
    _, _, _, sum_lp, true_lp, history, done, steered, _ = carry
    device = values.device
    for name in ("tokens", "length", "rank_lp", "log_prob", "finished", "count"):
        assert getattr(pool, name).is_contiguous(), name  # the kernel indexes them so
    # ... and a row's words of these by the word id alone
    assert bias is None or bias.stride(1) == 1
    assert loop.tag_rows is None or loop.tag_rows_unsaid.stride(1) == 1
    new_tokens = torch.empty(R, dtype=torch.int64, device=device)
    new_source = torch.empty(R, dtype=torch.int64, device=device)
    new_lp = torch.empty(R, dtype=torch.float64, device=device)
    new_true = torch.empty(R, dtype=torch.float64, device=device)
    new_history = torch.empty((R, T), dtype=torch.int64, device=device)
    new_done = torch.empty(N, dtype=torch.bool, device=device)
    has_tags = steered is not None and loop.tag_rows is not None
    new_steered = torch.empty(R, dtype=torch.bool, device=device) if has_tags else None
    n = plan.no_repeat_ngram if loop.repeat_tables is not None else 0
    K = ids.shape[1]
    assert not gathered or values.stride(1) == 1  # read at a word id alone
    dummy = new_lp  # a pointer for an argument a constexpr switches off
    with on_device(device):
        _kernel()[(N,)](
            values,
            ids,
            dummy if bias is None else bias,
            values.stride(0),
            values.stride(1),
            ids.stride(0),
            ids.stride(1),
            0 if bias is None else bias.stride(0),
            sum_lp,
            true_lp,
            sum_lp.stride(0),
            true_lp.stride(0),
            history,
            history.stride(0),
            history.stride(1),
            _u8(done),
            _u8(steered) if has_tags else dummy,
            steered.stride(0) if has_tags else 0,
            _u8(loop.tag_rows_unsaid) if has_tags else dummy,
            loop.tag_rows_unsaid.stride(0) if has_tags else 0,
            number,
            loop.denominators,
            new_tokens,
            new_source,
            new_lp,
            new_true,
            new_history,
            _u8(new_done),
            _u8(new_steered) if new_steered is not None else dummy,
            pool.tokens,
            pool.length,
            pool.rank_lp,
            pool.log_prob,
            _u8(pool.finished),
            pool.count,
            loop.ending_tokens,
            loop.ending_length,
            loop.ending_rank_lp,
            loop.ending_rank,
            loop.ending_lp,
            loop.end_rank_lp,
            loop.end_lp,
            loop.end_words,
            _u8(loop.step_ok),
            _u8(loop.never_first),
            N,
            K,
            plan.end_id,
            B=B,
            W=plan.width,
            T=T,
            NGRAM=n,
            HAS_BIAS=bias is not None,
            HAS_TAGS=has_tags,
            ENDINGS=plan.endings and not first,
            BEST=not plan.endings and not first,
            FIRST=first,
            GATHERED=gathered,
            BB=_next_pow2(B),
            BC=_next_pow2(B * plan.width),
            BK=_next_pow2(K),
            BT=_next_pow2(T),
            BN=_next_pow2(N),
            # gathered: each value's address from its id too, twice the warps (no spills)
            num_warps=_warps(_next_pow2(B * plan.width) * (2 if gathered else 1)),
            # no float multiplication to contract, but Triton 3.9 warns while the default is unset
            enable_fp_fusion=False,
        )
    return (new_tokens, new_source, state, new_lp, new_true, new_history, new_done, new_steered, lm_states)
