"""Triton grouped-GEMM kernels for the SwiGLU expert MLP, forward and backward, on the transformers v5 layout.

Weights are read in place through their strides: ``w_gate_up_E2ID [E, 2I, D]`` (rows [0, I) gate, [I, 2I) up)
and ``w_down_EDI [E, D, I]``. Pairs (token t, slot k) have the flat index ``p = t*K + k``; ``sorted_pairs_S``
lists them expert-major and ``offsets_E1`` bounds each expert's range (``routing.permute_kernel``).

Row tiles of ``BLOCK_M`` sorted pairs never straddle two experts: the launcher builds the tile schedule
``tile_expert_M`` / ``tile_row_M`` (expert and first sorted row of every tile; expert == E marks an unused slot
of the statically sized schedule) on the device, so nothing syncs with the host and the grid is CUDA-graph safe.
The four row-tile kernels are persistent: a grid of at most a few programs per SM walks the (row tile, column
tile) work items, grouped so that concurrently running programs share an expert's weight tiles in L2.

Forward:  ``up_swiglu_kernel``   gather x rows by token (fused into the A loads) @ W_gate_up[e]^T, stores the
                                 pre-activation gate|up (kept for backward) and h = silu(gate)*up (epilogue)
          ``down_kernel``        h @ W_down[e]^T, scattered to the pair's own row y[p] (token-major)
          ``combine_kernel``     out[t] = sum_k w[t,k] * y[t*K+k]: a deterministic per-token reduction
Backward: ``dh_swiglu_kernel``   dh = w * dout[t] @ W_down[e], SwiGLU backward with gate|up reloaded
                                 (the activation is recomputed, never stored); in the same epilogue the
                                 routing-weight gradient <dout[t] @ W_down[e], h> (so y is never kept) and
                                 w * h for dW_down
          ``dx_kernel``          d(gate|up) @ W_gate_up[e], scattered to pair rows; combine_kernel sums over k
          ``dw_gate_up_kernel``  grouped GEMM with variable inner size (the expert's pairs): d(gate|up)^T x
          ``dw_down_kernel``     dout^T (w * h), the scaled activation written by dh_swiglu_kernel
          For frozen experts (``expert_trainable_E``) both dW kernels run an empty pair range: no GEMM, a zero
          tile is stored. Pairs masked by ``pair_trainable_TK`` are zeroed rows, so they add nothing.

Autotune configs sit beside each kernel; keys hold the GEMM's static sizes and a power-of-two *bucket* of the
pairs per expert, never the raw token count, so a new batch size does not re-tune. Under ``TRITON_INTERPRET=1``
each kernel has one small config (tests stay quick).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfgs(full, small):
    if INTERPRET:
        return [triton.Config(small, num_warps=1, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in full]


# (meta-parameters, num_warps, num_stages) for H100-class GPUs; BLOCK_M is fixed by the tile schedule. Configs
# that exceed shared memory for a dtype are dropped by the autotuner (OutOfResources), never selected.
ROW_GEMM_GPU_CONFIGS = [
    ({"BLOCK_N": 128, "BLOCK_K": 64, "GROUP": 8}, 8, 4), ({"BLOCK_N": 128, "BLOCK_K": 64, "GROUP": 8}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 8}, 4, 4), ({"BLOCK_N": 256, "BLOCK_K": 64, "GROUP": 8}, 8, 3),
    ({"BLOCK_N": 128, "BLOCK_K": 128, "GROUP": 8}, 8, 3), ({"BLOCK_N": 64, "BLOCK_K": 128, "GROUP": 4}, 4, 3),
    # small-footprint fallback: always fits shared memory, also for float32 inputs with BLOCK_M = 128
    ({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP": 8}, 4, 2)]
DW_GPU_CONFIGS = [
    ({"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_K": 64}, 8, 4), ({"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_K": 32}, 8, 4),
    ({"BLOCK_A": 64, "BLOCK_B": 128, "BLOCK_K": 64}, 4, 4), ({"BLOCK_A": 128, "BLOCK_B": 64, "BLOCK_K": 64}, 4, 4),
    ({"BLOCK_A": 128, "BLOCK_B": 256, "BLOCK_K": 64}, 8, 3), ({"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_K": 64}, 4, 4),
    ({"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_K": 32}, 4, 2)]  # the last fits shared memory for float32 too
_ROW_GEMM_CONFIGS = _cfgs(ROW_GEMM_GPU_CONFIGS, {"BLOCK_N": 16, "BLOCK_K": 16, "GROUP": 2})
_DW_CONFIGS = _cfgs(DW_GPU_CONFIGS, {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_K": 16})
_ROW_KEY = ["N", "KDIM", "BLOCK_M", "ROWS_BUCKET"]
_SMEM_BUDGET = 220 * 1024  # H100: 227 KB per block, minus room for the epilogue


def _prune_row(n_b_tiles: int, a_arg: str):
    """Drop configs whose pipelined A/B tiles cannot fit shared memory (saves compiling them to fail)."""

    def prune(configs, named_args, **kwargs):
        bm = kwargs.get("BLOCK_M", 128)
        a = named_args.get(a_arg)
        es = a.element_size() if hasattr(a, "element_size") else 2
        fit = [c for c in configs if c.num_stages * es * c.kwargs["BLOCK_K"] * (bm + n_b_tiles * c.kwargs["BLOCK_N"])
               <= _SMEM_BUDGET]
        return fit or configs[-1:]

    return {"early_config_prune": prune}
_DW_KEY = ["A_DIM", "B_DIM", "ROWS_BUCKET"]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # IEEE: fp32 inputs (tests compare tightly) and the CPU interpreter, whose bf16 tl.dot is wrong
    # (Triton 3.9), so operands go up to fp32 there. Otherwise tensor cores with fp32 accumulation.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr, BLOCK_M: tl.constexpr):
    e = tl.load(tile_expert_ptr + pid_m)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=rmask, other=0)
    return e, rows.to(tl.int64), rmask, pairs.to(tl.int64)


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP: tl.constexpr):
    # group GROUP row tiles together so their weight tiles (same expert) stay in L2
    width = GROUP * num_n
    gid = pid // width
    first_m = gid * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.autotune(configs=_ROW_GEMM_CONFIGS, key=_ROW_KEY, prune_configs_by=_prune_row(2, "x_ptr"))
@triton.jit
def up_swiglu_kernel(
    x_ptr, w_ptr, gate_up_ptr, h_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K,
    sx_t, sx_d, sw_e, sw_r, sw_d,
    ROWS_BUCKET, STORE_GATE_UP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. gate_up [S, 2I] and h [S, I] rows are in sorted-pair order."""
    num_n = tl.cdiv(N, BLOCK_N)
    # persistent: each program walks work items (row tile, column tile) strided by the grid size
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:  # unused slots of the statically sized schedule (e == E) do nothing
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            tok = pairs // TOP_K
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tok[:, None] * sx_t + kk[None, :] * sx_d
            wbase = w_ptr + e.to(tl.int64) * sw_e
            g_ptrs = wbase + cols[None, :].to(tl.int64) * sw_r + kk[:, None] * sw_d
            u_ptrs = wbase + (cols[None, :] + N).to(tl.int64) * sw_r + kk[:, None] * sw_d
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, KDIM, BLOCK_K):
                kmask = (k0 + kk) < KDIM
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                wm = kmask[:, None] & nmask[None, :]
                acc_g = _dot(a, tl.load(g_ptrs, mask=wm, other=0.0), acc_g, IEEE)
                acc_u = _dot(a, tl.load(u_ptrs, mask=wm, other=0.0), acc_u, IEEE)
                a_ptrs += BLOCK_K * sx_d
                g_ptrs += BLOCK_K * sw_d
                u_ptrs += BLOCK_K * sw_d
            smask = rmask[:, None] & nmask[None, :]
            dt = h_ptr.dtype.element_ty
            if STORE_GATE_UP:
                gu = gate_up_ptr + rows[:, None] * (2 * N) + cols[None, :]
                tl.store(gu, acc_g.to(dt), mask=smask)
                tl.store(gu + N, acc_u.to(dt), mask=smask)
            h = acc_g * tl.sigmoid(acc_g) * acc_u
            tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(dt), mask=smask)


@triton.autotune(configs=_ROW_GEMM_CONFIGS, key=_ROW_KEY, prune_configs_by=_prune_row(1, "h_ptr"))
@triton.jit
def down_kernel(
    h_ptr, w_ptr, y_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM,
    sw_e, sw_d, sw_i,
    ROWS_BUCKET, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = D, KDIM = I. y[p, :] = h[row] @ W_down[e]^T, written at the pair's own (token-major) row."""
    num_n = tl.cdiv(N, BLOCK_N)
    # persistent: each program walks work items (row tile, column tile) strided by the grid size
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:  # unused slots of the statically sized schedule (e == E) do nothing
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = h_ptr + rows[:, None] * KDIM + kk[None, :]
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + cols[None, :].to(tl.int64) * sw_d + kk[:, None] * sw_i
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, KDIM, BLOCK_K):
                kmask = (k0 + kk) < KDIM
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * sw_i
            tl.store(y_ptr + pairs[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


@triton.jit
def combine_kernel(y_ptr, w_ptr, out_ptr, T, D, TOP_K, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, :] = sum_k w[t,k] * y[t*K+k, :] in float32 (w = 1 without HAS_W); fixed order: deterministic."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k in range(0, TOP_K):
        y = tl.load(y_ptr + (t * TOP_K + k) * D + cols, mask=dmask, other=0.0).to(tl.float32)
        if HAS_W:
            y = y * tl.load(w_ptr + t * TOP_K + k).to(tl.float32)
        acc += y
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.autotune(configs=_ROW_GEMM_CONFIGS, key=_ROW_KEY, prune_configs_by=_prune_row(1, "dout_ptr"))
@triton.jit
def dh_swiglu_kernel(
    dout_ptr, w_ptr, weights_ptr, gate_up_ptr, dgate_up_ptr, hw_ptr, dwp_ptr, pair_mask_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K, S,
    sd_t, sd_d, sw_e, sw_d, sw_i,
    ROWS_BUCKET, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr, STORE_DWP: tl.constexpr,
    HAS_PAIR_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. dh = w_p * dout[t] @ W_down[e]; d(gate|up) from the stored pre-activation.

    With STORE_HW it also writes ``hw = keep_p * w_p * silu(gate)*up`` (the recomputed activation, scaled by
    the routing weight and the pair mask) so dW_down is a plain grouped GEMM whose operands stream straight
    from memory into the tensor cores (no per-tile arithmetic in its inner loop).
    With STORE_DWP it writes this column tile's share of the routing-weight gradient,
    ``dwp[pid_n, p] = sum_i (dout[t] @ W_down[e])[i] * h[p, i]`` (= <dout[t], y_p> summed over tiles), so the
    expert outputs y never need to be kept from the forward."""
    num_n = tl.cdiv(N, BLOCK_N)
    # persistent: each program walks work items (row tile, column tile) strided by the grid size
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:  # unused slots of the statically sized schedule (e == E) do nothing
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            tok = pairs // TOP_K
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = dout_ptr + tok[:, None] * sd_t + kk[None, :] * sd_d
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + kk[:, None].to(tl.int64) * sw_d + cols[None, :] * sw_i
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, KDIM, BLOCK_K):
                kmask = (k0 + kk) < KDIM
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
                a_ptrs += BLOCK_K * sd_d
                b_ptrs += BLOCK_K * sw_d
            wgt = tl.load(weights_ptr + pairs, mask=rmask, other=0.0).to(tl.float32)
            smask = rmask[:, None] & nmask[None, :]
            gu = rows[:, None] * (2 * N) + cols[None, :]
            g = tl.load(gate_up_ptr + gu, mask=smask, other=0.0).to(tl.float32)
            u = tl.load(gate_up_ptr + gu + N, mask=smask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dt = dgate_up_ptr.dtype.element_ty
            if STORE_DWP:
                tl.store(dwp_ptr + pid_n * S + pairs, tl.sum(acc * (g * sig * u), axis=1), mask=rmask)
            if STORE_DGU:
                dh = acc * wgt[:, None]
                dg = dh * u * sig * (1.0 + g * (1.0 - sig))
                du = dh * g * sig
                tl.store(dgate_up_ptr + gu, dg.to(dt), mask=smask)
                tl.store(dgate_up_ptr + gu + N, du.to(dt), mask=smask)
            if STORE_HW:
                scale = wgt
                if HAS_PAIR_MASK:
                    scale = scale * tl.load(pair_mask_ptr + pairs, mask=rmask, other=0).to(tl.float32)
                hw = g * sig * u * scale[:, None]
                tl.store(hw_ptr + rows[:, None] * N + cols[None, :], hw.to(dt), mask=smask)


@triton.autotune(configs=_ROW_GEMM_CONFIGS, key=_ROW_KEY, prune_configs_by=_prune_row(1, "dgate_up_ptr"))
@triton.jit
def dx_kernel(
    dgate_up_ptr, w_ptr, dxp_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM,
    sw_e, sw_r, sw_d,
    ROWS_BUCKET, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = D, KDIM = 2I. dx_pair[p] = d(gate|up)[row] @ W_gate_up[e], at the pair's own row."""
    num_n = tl.cdiv(N, BLOCK_N)
    # persistent: each program walks work items (row tile, column tile) strided by the grid size
    for work in range(tl.program_id(0), num_tiles * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_pid(work, num_tiles, num_n, GROUP)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < E:  # unused slots of the statically sized schedule (e == E) do nothing
            e, rows, rmask, pairs = _tile_rows(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
                                               BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = cols < N
            kk = tl.arange(0, BLOCK_K)
            a_ptrs = dgate_up_ptr + rows[:, None] * KDIM + kk[None, :]
            b_ptrs = w_ptr + e.to(tl.int64) * sw_e + kk[:, None].to(tl.int64) * sw_r + cols[None, :] * sw_d
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, KDIM, BLOCK_K):
                kmask = (k0 + kk) < KDIM
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * sw_r
            tl.store(dxp_ptr + pairs[:, None] * N + cols[None, :], acc.to(dxp_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


@triton.autotune(configs=_DW_CONFIGS, key=_DW_KEY)
@triton.jit
def dw_gate_up_kernel(
    dgate_up_ptr, x_ptr, dw_ptr, offsets_ptr, sorted_pairs_ptr, expert_mask_ptr, pair_mask_ptr,
    A_DIM, B_DIM, TOP_K, sx_t, sx_d,
    ROWS_BUCKET, HAS_EXPERT_MASK: tl.constexpr, HAS_PAIR_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_gate_up[e] [2I, D] = sum over e's pairs of d(gate|up)[row]^T x[t]; A_DIM = 2I, B_DIM = D."""
    e = tl.program_id(0)
    ra = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    amask = ra < A_DIM
    bmask = rb < B_DIM
    out_ptrs = dw_ptr + e.to(tl.int64) * A_DIM * B_DIM + ra[:, None].to(tl.int64) * B_DIM + rb[None, :]
    omask = amask[:, None] & bmask[None, :]
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    if HAS_EXPERT_MASK:  # frozen expert: an empty pair range, so no GEMM at all, just a zero tile
        hi = tl.where(tl.load(expert_mask_ptr + e) != 0, hi, lo)
    if hi > lo:
        kk = tl.arange(0, BLOCK_K)
        for r0 in range(lo, hi, BLOCK_K):
            rows = r0 + kk
            rm = rows < hi
            pairs = tl.load(sorted_pairs_ptr + rows, mask=rm, other=0).to(tl.int64)
            tok = pairs // TOP_K
            a = tl.load(dgate_up_ptr + rows[None, :].to(tl.int64) * A_DIM + ra[:, None],
                        mask=amask[:, None] & rm[None, :], other=0.0)
            if HAS_PAIR_MASK:  # masked pairs add nothing (the unmasked path streams A straight to the MMA)
                keep = tl.load(pair_mask_ptr + pairs, mask=rm, other=0)
                a = tl.where(keep[None, :] != 0, a, tl.zeros_like(a))
            b = tl.load(x_ptr + tok[:, None] * sx_t + rb[None, :] * sx_d, mask=rm[:, None] & bmask[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
    tl.store(out_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=omask)


@triton.autotune(configs=_DW_CONFIGS, key=_DW_KEY)
@triton.jit
def dw_down_kernel(
    dout_ptr, hw_ptr, dw_ptr, offsets_ptr, sorted_pairs_ptr, expert_mask_ptr,
    A_DIM, B_DIM, TOP_K, sd_t, sd_d,
    ROWS_BUCKET, HAS_EXPERT_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_down[e] [D, I] = sum over e's pairs of dout[t]^T hw[row] (hw = keep * w * h from dh_swiglu_kernel).
    A_DIM = D, B_DIM = I."""
    e = tl.program_id(0)
    ra = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    amask = ra < A_DIM
    bmask = rb < B_DIM
    out_ptrs = dw_ptr + e.to(tl.int64) * A_DIM * B_DIM + ra[:, None].to(tl.int64) * B_DIM + rb[None, :]
    omask = amask[:, None] & bmask[None, :]
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    if HAS_EXPERT_MASK:  # frozen expert: an empty pair range, so no GEMM at all, just a zero tile
        hi = tl.where(tl.load(expert_mask_ptr + e) != 0, hi, lo)
    if hi > lo:
        kk = tl.arange(0, BLOCK_K)
        for r0 in range(lo, hi, BLOCK_K):
            rows = r0 + kk
            rm = rows < hi
            tok = tl.load(sorted_pairs_ptr + rows, mask=rm, other=0).to(tl.int64) // TOP_K
            a = tl.load(dout_ptr + tok[None, :] * sd_t + ra[:, None] * sd_d, mask=amask[:, None] & rm[None, :],
                        other=0.0)
            b = tl.load(hw_ptr + rows[:, None].to(tl.int64) * B_DIM + rb[None, :], mask=rm[:, None] & bmask[None, :],
                        other=0.0)
            acc = _dot(a, b, acc, IEEE)
    tl.store(out_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=omask)
