"""Triton kernels for gpt-oss's expert MLP: biases, the stored ``[E, D, 2I]`` interleaved / ``[E, I, D]`` layout
read in place, and the clamped SwiGLU (a constexpr-selected activation; ``alpha``/``limit`` are runtime args).

Layout (transformers' ``GptOssExperts``, no weight copies): ``w_gate_up [E, D, 2I]`` with the gate in the even and
the up projection in the odd columns, ``w_down [E, I, D]``, ``b_gate_up [E, 2I]`` (same interleaving),
``b_down [E, D]``. The row-tile schedule, the sorted pairs and the persistent walk are those of
:mod:`desmoe.kernels.moe`; so are several of its kernels, which read this layout through their stride arguments:

Forward:  ``up_gpt_oss_kernel``   gather x rows (A loads) @ a contiguous ``[BLOCK_K, 2*BLOCK_N]`` tile of the
                                  interleaved W_gate_up (one GEMM, no strided loads); epilogue: + b_gate_up, the
                                  pre-activation stored interleaved as is (kept for backward), then a register
                                  split into gate/up and the activation ``h [S, I]`` (quarter-width passes)
          ``down_gpt_oss_kernel`` h @ W_down[e] (+ b_down[e]) to the pair's own row; ``moe.combine_kernel`` sums
Backward: ``dh_gpt_oss_kernel``   dh = dout[t] @ W_down[e]^T; epilogue reloads the interleaved pre-activation,
                                  the activation's backward (clamp edges as autograd's ``clamp``: the gradient
                                  passes where the input lies in the closed interval), d(gate|up) stored
                                  interleaved, ``hw = w * h`` for dW_down (trainable rows), the routing-weight
                                  partial dots
          ``moe.dx_kernel``       d(gate|up) [S, 2I] @ W_gate_up[e]^T: W's strides passed swapped
          ``moe.dw_down_kernel``  dW_gate_up[e] [D, 2I] = x[tok]^T d(gate|up)  (A gathered by token, B sorted rows)
          ``moe.dw_gate_up_kernel`` dW_down[e] [I, D] = hw^T dout[tok]  (A sorted rows, B gathered by token)
          ``bias_grad_kernel``    per-expert column sums: db_gate_up[e] = sum of e's kept d(gate|up) rows,
                                  db_down[e] = sum of e's kept w * dout[tok] rows; a frozen expert sums nothing.
                                  Deterministic (fixed order, no atomics).
The routing-weight gradient's bias term ``<dout[t], b_down[e]>`` is one small GEMM in the launcher.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .moe import (_ROW_KEY, EPI_ELEMS, ROW_DNS, _chunk, _grouped_pid, _halves, _mainloop, _pair_scales, _pruner,
                  _tile_rows, configs_for)


@triton.jit
def _gated(g, u, alpha, limit, CLAMPED: tl.constexpr):
    """The activation h of gate g and up u (float32): gpt-oss's clamped SwiGLU, or SiLU SwiGLU."""
    if CLAMPED:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        return (uc + 1.0) * (gc * tl.sigmoid(alpha * gc))
    return g * tl.sigmoid(g) * u


@triton.jit
def _up_epilogue(sub, b_ptr, gate_up_ptr, h_ptr, e, rows, rmask, c_start, N, alpha, limit, HAS_BIAS: tl.constexpr,
                 STORE_GATE_UP: tl.constexpr, CLAMPED: tl.constexpr, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """HALF columns of I from their 2*HALF interleaved pre-activation columns ``sub``: + bias, the pre-activation
    stored, gate/up split in registers, h stored."""
    c2 = 2 * c_start + tl.arange(0, 2 * HALF)
    m2 = c2 < 2 * N
    dt = h_ptr.dtype.element_ty
    if HAS_BIAS:
        sub += tl.load(b_ptr + e + c2, mask=m2, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        # the clamps act on the pre-activation as stored (rounded to the compute dtype): the backward, which
        # reloads it, then takes the same side of every clamp edge as this forward
        sub = sub.to(dt).to(tl.float32)
    if STORE_GATE_UP:
        tl.store(gate_up_ptr + rows[:, None] * (2 * N) + c2[None, :], sub.to(dt), mask=rmask[:, None] & m2[None, :])
    g, u = tl.split(tl.reshape(sub, [BLOCK_M, HALF, 2]))
    cols = c_start + tl.arange(0, HALF)
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], _gated(g, u, alpha, limit, CLAMPED).to(dt),
             mask=rmask[:, None] & (cols < N)[None, :])


@triton.autotune(configs=configs_for("up_gpt_oss_kernel"),
                 key=_ROW_KEY + ["STORE_GATE_UP", "HAS_BIAS", "CLAMPED"],
                 prune_configs_by=_pruner("up_gpt_oss_kernel", 2, "x_ptr"))
@triton.jit(do_not_specialize=ROW_DNS)
def up_gpt_oss_kernel(
    x_ptr, w_ptr, b_ptr, gate_up_ptr, h_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K, alpha, limit,
    sx_t, sx_d, sw_e, sw_d, sw_j, sb_e,
    ROWS_BUCKET, STORE_GATE_UP: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. A tile covers BLOCK_N outputs of I: the 2*BLOCK_N interleaved columns [2c0, 2c0 + 2BN) of
    W_gate_up [E, D, 2I]. gate_up [S, 2I] (interleaved, bias included) and h [S, I] rows are sorted-pair rows."""
    num_n = tl.cdiv(N, BLOCK_N)
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:  # unused slots of the statically sized schedule (e == E) do nothing
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            tok = pairs // TOP_K
            cols2 = pid_n * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
            nmask2 = cols2 < 2 * N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tok[:, None] * sx_t + kk[None, :] * sx_d
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + kk[:, None].to(tl.int64) * sw_d + cols2[None, :] * sw_j
            acc = _mainloop(a_ptrs, BLOCK_K * sx_d, b_ptrs, BLOCK_K * sw_d, rmask, nmask2, KDIM,
                            tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32), IEEE, BLOCK_K)
            # sub-tiled epilogue: four quarter-width passes, each a contiguous run of interleaved columns (the
            # accumulator is as wide as the SwiGLU kernel's two together; finer passes keep it within registers)
            a0, a1 = _halves(acc, BLOCK_M, 2 * BLOCK_N)
            c0 = pid_n * BLOCK_N
            eb = e.to(tl.int64) * sb_e
            Q: tl.constexpr = BLOCK_N // 4
            for h in tl.static_range(2):
                q0, q1 = _halves(a0 if h == 0 else a1, BLOCK_M, BLOCK_N)
                _up_epilogue(q0, b_ptr, gate_up_ptr, h_ptr, eb, rows, rmask, c0 + 2 * h * Q, N, alpha, limit,
                             HAS_BIAS, STORE_GATE_UP, CLAMPED, BLOCK_M, Q)
                _up_epilogue(q1, b_ptr, gate_up_ptr, h_ptr, eb, rows, rmask, c0 + (2 * h + 1) * Q, N, alpha, limit,
                             HAS_BIAS, STORE_GATE_UP, CLAMPED, BLOCK_M, Q)


@triton.autotune(configs=configs_for("down_gpt_oss_kernel"), key=_ROW_KEY + ["HAS_BIAS"],
                 prune_configs_by=_pruner("down_gpt_oss_kernel", 1, "h_ptr"))
@triton.jit(do_not_specialize=ROW_DNS)
def down_gpt_oss_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM,
    sw_e, sw_i, sw_d, sb_e,
    ROWS_BUCKET, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = D, KDIM = I. y[p, :] = h[row] @ W_down[e] + b_down[e] (W_down [E, I, D]), at the pair's own row."""
    num_n = tl.cdiv(N, BLOCK_N)
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = h_ptr + rows[:, None] * KDIM + kk[None, :]
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + kk[:, None].to(tl.int64) * sw_i + cols[None, :] * sw_d
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc = _mainloop(a_ptrs, BLOCK_K, b_ptrs, BLOCK_K * sw_i, rmask, nmask, KDIM, acc, IEEE, BLOCK_K)
            if HAS_BIAS:
                acc += tl.load(b_ptr + e.to(tl.int64) * sb_e + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + pairs[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _dh_epilogue(acc, wgt, gate_up_ptr, dgate_up_ptr, hw_ptr, rows, rmask, hw_rmask, c_start, N, alpha, limit,
                 CLAMPED: tl.constexpr, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr, STORE_DWP: tl.constexpr,
                 BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """One sub-tile (HALF columns of I, 2*HALF interleaved gate|up columns: half or quarter of the tile); returns
    its share of the routing-weight dot. ``hw_rmask``: the rows whose hw is stored (``moe._pair_scales``)."""
    cols = c_start + tl.arange(0, HALF)
    c2 = 2 * c_start + tl.arange(0, 2 * HALF)  # their interleaved gate|up columns
    smask2 = rmask[:, None] & (c2 < 2 * N)[None, :]
    gu = gate_up_ptr + rows[:, None] * (2 * N) + c2[None, :]
    g, u = tl.split(tl.reshape(tl.load(gu, mask=smask2, other=0.0).to(tl.float32), [BLOCK_M, HALF, 2]))
    if CLAMPED:
        gc = tl.minimum(g, limit)
        sig = tl.sigmoid(alpha * gc)
        act = gc * sig
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        h = (uc + 1.0) * act
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        h = act * u
    part = tl.zeros([BLOCK_M], tl.float32)
    if STORE_DWP:
        part = tl.sum(acc * h, axis=1)
    if STORE_DGU:
        dh = acc * wgt[:, None]
        if CLAMPED:
            # as autograd's clamp: the gradient passes where the input lies inside the closed interval
            dg = tl.where(g <= limit, dh * (uc + 1.0) * (sig + alpha * gc * sig * (1.0 - sig)), 0.0)
            du = tl.where((u >= -limit) & (u <= limit), dh * act, 0.0)
        else:
            dg = dh * u * sig * (1.0 + g * (1.0 - sig))
            du = dh * act
        dgu = tl.reshape(tl.join(dg, du), [BLOCK_M, 2 * HALF])
        tl.store(dgate_up_ptr + rows[:, None] * (2 * N) + c2[None, :], dgu.to(dgate_up_ptr.dtype.element_ty),
                 mask=smask2)
    if STORE_HW:
        tl.store(hw_ptr + rows[:, None] * N + cols[None, :], (h * wgt[:, None]).to(hw_ptr.dtype.element_ty),
                 mask=hw_rmask[:, None] & (cols < N)[None, :])
    return part


@triton.autotune(configs=configs_for("dh_gpt_oss_kernel"),
                 key=_ROW_KEY + ["STORE_DGU", "STORE_HW", "STORE_DWP", "HAS_PAIR_MASK", "HAS_EXPERT_MASK", "CLAMPED"],
                 prune_configs_by=_pruner("dh_gpt_oss_kernel", 1, "dout_ptr"))
@triton.jit(do_not_specialize=ROW_DNS + ["S"])
def dh_gpt_oss_kernel(
    dout_ptr, w_ptr, weights_ptr, gate_up_ptr, dgate_up_ptr, hw_ptr, dwp_ptr, pair_mask_ptr, expert_mask_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K, S, NDWP, alpha, limit,
    sd_t, sd_d, sw_e, sw_i, sw_d,
    ROWS_BUCKET, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr, STORE_DWP: tl.constexpr,
    HAS_PAIR_MASK: tl.constexpr, HAS_EXPERT_MASK: tl.constexpr, CLAMPED: tl.constexpr, IEEE: tl.constexpr,
    DWP_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. dh = dout[t] @ W_down[e]^T (W_down [E, I, D]); d(gate|up) from the stored interleaved
    pre-activation; outputs and the ``dwp [NDWP, S]`` partial-dot layout as ``moe.dh_swiglu_kernel``'s (every
    config writes every row, so the buffer never depends on which configs the autotuner ran)."""
    num_n = tl.cdiv(N, BLOCK_N)
    R: tl.constexpr = BLOCK_N // DWP_COLS
    CHUNKS: tl.constexpr = 4 if BLOCK_M * (BLOCK_N // 2) > EPI_ELEMS else 2  # as moe.dh_swiglu_kernel's
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            tok = pairs // TOP_K
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = dout_ptr + tok[:, None] * sd_t + kk[None, :] * sd_d
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + kk[:, None].to(tl.int64) * sw_d + cols[None, :] * sw_i
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc = _mainloop(a_ptrs, BLOCK_K * sd_d, b_ptrs, BLOCK_K * sw_d, rmask, nmask, KDIM, acc, IEEE, BLOCK_K)
            wgt, hw_rmask = _pair_scales(weights_ptr, pair_mask_ptr, expert_mask_ptr, pairs, rmask, e,
                                         HAS_PAIR_MASK, HAS_EXPERT_MASK)
            # sub-tiled epilogue: two half-width passes, or four quarter-width ones for wide tiles
            part = tl.zeros([BLOCK_M], tl.float32)
            for i in tl.static_range(CHUNKS):
                part += _dh_epilogue(_chunk(acc, i, CHUNKS, BLOCK_M, BLOCK_N), wgt, gate_up_ptr, dgate_up_ptr,
                                     hw_ptr, rows, rmask, hw_rmask, pid_n * BLOCK_N + i * (BLOCK_N // CHUNKS), N,
                                     alpha, limit, CLAMPED, STORE_DGU, STORE_HW, STORE_DWP, BLOCK_M,
                                     BLOCK_N // CHUNKS)
            if STORE_DWP:
                j = tl.arange(0, R)
                r = pid_n * R + j
                vals = tl.where(j[None, :] == 0, part[:, None], 0.0)
                tl.store(dwp_ptr + r[None, :].to(tl.int64) * S + pairs[:, None], vals,
                         mask=rmask[:, None] & (r < NDWP)[None, :])


@triton.jit
def bias_grad_kernel(
    src_ptr, scale_ptr, tok_ptr, bounds_ptr, expert_mask_ptr, out_ptr,
    N, s_row, s_col,
    GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXPERT_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[e, n] (float32) = sum over e's trainable sorted rows r in ``bounds[e]`` (pairs masked by
    pair_trainable lie outside them) of scale[r] * src[row, n], row = tok[r] (GATHER) or r. Grid (E, cdiv(N,
    BLOCK_N)); a frozen expert (expert_mask 0) sums nothing. Fixed summation order: deterministic."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    lo = tl.load(bounds_ptr + 2 * e)
    hi = tl.load(bounds_ptr + 2 * e + 1)
    if HAS_EXPERT_MASK:
        hi = tl.where(tl.load(expert_mask_ptr + e) != 0, hi, lo)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        tok = tl.load(tok_ptr + r, mask=r < hi, other=-1)
        src_row = tok if GATHER else r
        v = tl.load(src_ptr + src_row[:, None].to(tl.int64) * s_row + cols[None, :] * s_col,
                    mask=(tok >= 0)[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + r, mask=r < hi, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + e.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=nmask)


AUTOTUNED = (up_gpt_oss_kernel, down_gpt_oss_kernel, dh_gpt_oss_kernel)
