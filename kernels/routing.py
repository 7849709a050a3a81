"""Triton routing kernels: fused top-k routing (forward and backward) and the expert-major permutation.

Kernels (raw ``@triton.jit``; launchers live in ``desmoe.ops.triton_routing``):

- ``topk_route_fwd_kernel``: logits [T, E] -> weights [T, K] (float32), ids [T, K] (int64). One program owns
  ``BLOCK_T`` rows with the whole (padded) expert axis in registers: scoring, selection bias, group-limited
  selection, K arg-max passes over packed (value, expert) int64 keys (one reduction per pick), renormalisation and
  scaling, all in one pass over the logits.
- ``topk_route_bwd_kernel``: d weights [T, K] -> d logits [T, E] (recomputes the scores from the logits).

The expert-major permutation and the GEMM tile schedule are O(S) passes in :mod:`desmoe.kernels.permute`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _route_scores(logits_ptr, stride_t, stride_e, rows, cols, row_mask, E, SCORING_SIGMOID: tl.constexpr):
    col_mask = cols < E
    m2 = row_mask[:, None] & col_mask[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e, mask=m2,
                other=float("-inf")).to(tl.float32)
    if SCORING_SIGMOID:
        s = tl.sigmoid(x)
    else:
        x_max = tl.max(x, axis=1)
        x_max = tl.where(row_mask, x_max, 0.0)
        p = tl.exp(x - x_max[:, None])
        p = tl.where(m2, p, 0.0)
        denom = tl.sum(p, axis=1)
        s = p / tl.where(row_mask, denom, 1.0)[:, None]  # padding rows: avoid 0/0
    return tl.where(m2, s, 0.0)


@triton.jit(do_not_specialize=["T"])
def topk_route_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    T, E, stride_t, stride_e,
    scaling, renorm_eps, masked_value,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    GROUPED: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
    G_PAD: tl.constexpr, GROUP_TOP2SUM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    cols = tl.arange(0, E_PAD)
    col_mask = cols < E
    scores = _route_scores(logits_ptr, stride_t, stride_e, rows, cols, row_mask, E, SCORING_SIGMOID)
    NEG = float("-inf")
    choice = scores
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        choice = choice + b[None, :]
    # padding columns can never be chosen, not even over masked_value-filled ineligible experts
    choice = tl.where(col_mask[None, :], choice, NEG)

    if GROUPED:
        col_group = cols // GROUP_SIZE
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full([BLOCK_T, G_PAD], NEG, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (col_group == g) & col_mask
            v = tl.where(in_g[None, :], choice, NEG)
            m1 = tl.max(v, axis=1)
            if GROUP_TOP2SUM:
                if GROUP_SIZE > 1:
                    arg1 = tl.min(tl.where(v == m1[:, None], cols[None, :], E_PAD), axis=1)
                    m2 = tl.max(tl.where(cols[None, :] == arg1[:, None], NEG, v), axis=1)
                    m1 = m1 + m2
            gscore = tl.where(gcols[None, :] == g, m1[:, None], gscore)
        gscore = tl.where(gcols[None, :] < N_GROUP, gscore, NEG)
        eligible = tl.zeros([BLOCK_T, E_PAD], tl.int1)
        for _j in tl.static_range(TOPK_GROUP):
            gm = tl.max(gscore, axis=1)
            gi = tl.min(tl.where(gscore == gm[:, None], gcols[None, :], G_PAD), axis=1)
            eligible = eligible | (col_group[None, :] == gi[:, None])
            gscore = tl.where(gcols[None, :] == gi[:, None], NEG, gscore)
        choice = tl.where(eligible, choice, masked_value)
        choice = tl.where(col_mask[None, :], choice, NEG)

    kcols = tl.arange(0, K_PAD)
    # One int64 key per expert: the choice value's order-preserving int32 image above, E_PAD-1-expert below, so one
    # max is one arg-max (ties: lowest expert id; NaN above everything, as torch.topk). Padding columns hold the
    # smallest key; masked experts keep their real key (masked_value, possibly -inf): when K exceeds the eligible
    # experts the stock routers go on to pick masked ones. -0.0 is read as +0.0 (the float compare ties them).
    bits = tl.where(choice == 0.0, 0.0, choice).to(tl.int32, bitcast=True)
    okey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (okey.to(tl.int64) << 32) | (E_PAD - 1 - cols)[None, :].to(tl.int64)
    key = tl.where(col_mask[None, :], key, -9223372036854775807 - 1)
    # K passes of one reduction each (the winner's key is unique: it is retired); the weights are gathered once.
    # (tl.topk's partial bitonic sort compiles to ~14 % more sm_90 instructions here: docs/kernels.md.)
    id_tk = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for k in tl.static_range(TOP_K):
        m = tl.max(key, axis=1)
        id_tk = tl.where(kcols[None, :] == k, E_PAD - 1 - (m & (E_PAD - 1)).to(tl.int32)[:, None], id_tk)
        key = tl.where(key == m[:, None], -9223372036854775807 - 1, key)
    w_tk = tl.where(kcols[None, :] < TOP_K, tl.gather(scores, id_tk, axis=1), 0.0)  # K_PAD > K: no weight
    if RENORM:
        denom = tl.sum(w_tk, axis=1) + renorm_eps
        w_tk = w_tk / tl.where(row_mask, denom, 1.0)[:, None]
    w_tk = w_tk * scaling
    out_mask = row_mask[:, None] & (kcols[None, :] < TOP_K)
    offs = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    tl.store(weights_ptr + offs, w_tk, mask=out_mask)
    tl.store(ids_ptr + offs, id_tk.to(tl.int64), mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def topk_route_bwd_kernel(
    dweights_ptr, logits_ptr, ids_ptr, dlogits_ptr,
    T, E, stride_t, stride_e, stride_dt, stride_de,
    scaling, renorm_eps,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    """d logits of ``w = scaling * s_sel / (sum s_sel + eps)`` (or ``scaling * s_sel``), s = softmax|sigmoid."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    cols = tl.arange(0, E_PAD)
    col_mask = cols < E
    scores = _route_scores(logits_ptr, stride_t, stride_e, rows, cols, row_mask, E, SCORING_SIGMOID)
    kcols = tl.arange(0, K_PAD)
    kmask = row_mask[:, None] & (kcols[None, :] < TOP_K)
    offs = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    g_tk = tl.load(dweights_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
    id_tk = tl.load(ids_ptr + offs, mask=kmask, other=E_PAD).to(tl.int32)
    # selected scores, by matching each expert column against the K ids
    s_tk = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for k in tl.static_range(TOP_K):
        idk = tl.sum(tl.where(kcols[None, :] == k, id_tk, 0), axis=1)
        sk = tl.sum(tl.where(cols[None, :] == idk[:, None], scores, 0.0), axis=1)
        s_tk = tl.where(kcols[None, :] == k, sk[:, None], s_tk)
    if RENORM:
        denom = tl.sum(s_tk, axis=1) + renorm_eps
        denom = tl.where(row_mask, denom, 1.0)
        gs = tl.sum(g_tk * s_tk, axis=1)
        ds_tk = scaling * (g_tk / denom[:, None] - (gs / (denom * denom))[:, None])
    else:
        ds_tk = scaling * g_tk
    ds_te = tl.zeros([BLOCK_T, E_PAD], tl.float32)
    for k in tl.static_range(TOP_K):
        idk = tl.sum(tl.where(kcols[None, :] == k, id_tk, 0), axis=1)
        dk = tl.sum(tl.where(kcols[None, :] == k, ds_tk, 0.0), axis=1)
        ds_te = tl.where(cols[None, :] == idk[:, None], dk[:, None], ds_te)
    if SCORING_SIGMOID:
        dl = ds_te * scores * (1.0 - scores)
    else:
        dl = scores * (ds_te - tl.sum(ds_te * scores, axis=1)[:, None])
    m2 = row_mask[:, None] & col_mask[None, :]
    tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * stride_dt + cols[None, :] * stride_de,
             dl.to(dlogits_ptr.dtype.element_ty), mask=m2)
