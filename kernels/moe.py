"""Triton grouped-GEMM kernels for the SwiGLU expert MLP, forward and backward, on the transformers v5 layout.

Weights are read in place through their strides: ``w_gate_up_E2ID [E, 2I, D]`` (rows [0, I) gate, [I, 2I) up)
and ``w_down_EDI [E, D, I]``. Pairs (token t, slot k) have the flat index ``p = t*K + k``; ``sorted_pairs_S``
lists them expert-major and ``offsets_E1`` bounds each expert's range (``desmoe.kernels.permute``).

Row tiles of ``BLOCK_M`` sorted pairs never straddle two experts: the routing metadata pass builds the tile
schedule ``tile_expert_M`` / ``tile_row_M`` (expert and first sorted row of every tile; expert == E marks an
unused slot of the statically sized schedule) on the device, so nothing syncs with the host and the grid is
CUDA-graph safe.
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
          ``dw_down_kernel``     dout^T (w * h), the scaled activation written by dh_swiglu_kernel (trainable rows)
          For frozen experts (``expert_trainable_E``) both dW kernels run an empty pair range: no GEMM, a zero
          tile is stored, and dh_swiglu_kernel stores no hw rows for them. Pairs masked by
          ``pair_trainable_TK`` sit after their expert's kept pairs in the routing plan, outside the dW row
          bounds: they cost no dW work (dX still reads them).

Autotune: configs sit beside the kernels (``GPU_CONFIGS``, :mod:`desmoe.kernels.moe_configs`): a small "default"
set per kernel (2 candidates after the shared-memory prune, so a first call compiles ~2 configs per kernel) and
the "full" sweep behind ``DESMOE_AUTOTUNE=full``. Keys hold the GEMM's static sizes, a power-of-two *bucket* of
the pairs per expert (never the raw token count, so a new batch size does not re-tune) and every constexpr that
changes the work (STORE_* / mask flags). Every output is written in full by every config (no partial buffers
whose content depends on which configs the autotuner ran), so the first call of a shape equals every later call
(tests/kernels/test_triton_first_call.py). Under ``TRITON_INTERPRET=1`` each kernel has one small config.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import moe_configs as _cfg
from .moe_configs import (  # noqa: F401  (GPU_CONFIGS, prune_configs, AUTOTUNE: the kernels' face for callers)
    AUTOTUNE, DW_DNS, DWP_COLS, GPU_CONFIGS, INTERPRET, ROW_DNS, _DW_KEY, _ROW_KEY, _pruner, configs_for,
    prune_configs,
)

# The dh epilogues run in half-width passes, or quarter-width ones where a half would exceed EPI_ELEMS accumulator
# elements: each pass reloads gate|up and keeps several float32 temporaries of its width live beside the rest of
# the accumulator (at 128x128, 8 warps, half-width passes spilled 96-104 B of stack; quarter-width ones do not).
EPI_ELEMS = tl.constexpr(_cfg.EPI_ELEMS)


def autotune_stats() -> dict:
    """Per autotuned kernel: ``tunings`` (new autotune keys seen), ``compiles`` (configs compiled and benchmarked
    by those tunings; a one-config prune compiles one and skips the benchmark) and the ``chosen`` config per
    key. The difference of two snapshots is what a call cost: ``sum(compiles)`` is a first call's compile count.
    """
    out = {}
    for k in AUTOTUNED:
        counts = getattr(k.early_config_prune, "compiles", [])
        out[k.fn.__name__] = {"tunings": len(counts), "compiles": sum(counts),
                              "chosen": {str(key): str(cfg) for key, cfg in k.cache.items()}}
    return out


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # IEEE: fp32 inputs (tests compare tightly) and the CPU interpreter, whose bf16 tl.dot is wrong
    # (Triton 3.9), so operands go up to fp32 there. Otherwise tensor cores with fp32 accumulation.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _weight_desc(w_ptr, E, R, C, sw_e, sw_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tensor descriptor (TMA on sm_90) of a weight ``W [E, R, C]`` whose C is contiguous, in ``[1, BLOCK_R,
    BLOCK_C]`` tiles: the expert dimension's block of 1 keeps a tile inside its expert (rows past R never come
    from the next expert), and rows past R / columns past C read as 0 (the K tails are zero-filled). Built once
    per program; each tile names its expert in the load's coordinates."""
    return tl.make_tensor_descriptor(w_ptr, [E, R, C], [sw_e, sw_r, 1], [1, BLOCK_R, BLOCK_C])


@triton.jit
def _tma_tile(b_desc, e, k0, n0, B_NK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` weight tile of K block ``k0`` as a TMA copy of expert ``e``'s tile through
    ``b_desc`` (``_weight_desc``) at ``(k0, n0)``; ``B_NK``: the weight is stored ``[N, K]`` (K contiguous), so
    the copy is ``[BLOCK_N, BLOCK_K]`` and the tile its transpose. (The pointer path's masked load stays inline
    at its call sites: the default path compiles as before, down to ptxas's scheduling.)"""
    if B_NK:
        b = tl.trans(tl.reshape(b_desc.load([e, n0, k0]), [BLOCK_N, BLOCK_K]))
    else:
        b = tl.reshape(b_desc.load([e, k0, n0]), [BLOCK_K, BLOCK_N])
    return b


@triton.jit
def _mainloop(a_ptrs, a_step, b_ptrs, b_step, rmask, nmask, KDIM, acc, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
              b_desc=0, e=0, n0=0, USE_TMA: tl.constexpr = False, B_NK: tl.constexpr = False,
              BLOCK_N: tl.constexpr = 0):
    """The GEMM loop every row-tile kernel runs: ``acc += A[rows, :KDIM] @ B[:KDIM, cols]`` with ``a_ptrs``
    ``[BLOCK_M, BLOCK_K]`` and ``b_ptrs`` ``[BLOCK_K, BLOCK_N]`` advanced by ``a_step`` / ``b_step`` per K block
    (rows outside ``rmask``, columns outside ``nmask`` and K past ``KDIM`` read as 0). With USE_TMA the B tiles
    come through ``b_desc`` instead (expert ``e``, first column ``n0``; ``_tma_tile``) and ``b_ptrs`` is unused
    (the trailing arguments default to the pointer path: gpt-oss's kernels call it without them)."""
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, KDIM, BLOCK_K):
        kmask = (k0 + kk) < KDIM
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if USE_TMA:
            b = _tma_tile(b_desc, e, k0, n0, B_NK, BLOCK_K, BLOCK_N)
        else:
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        a_ptrs += a_step
        if not USE_TMA:
            b_ptrs += b_step
    return acc


@triton.jit
def _pair_scales(weights_ptr, pair_mask_ptr, expert_mask_ptr, pairs, rmask, e, HAS_PAIR_MASK: tl.constexpr,
                 HAS_EXPERT_MASK: tl.constexpr):
    """The dh epilogues' per-row routing weight and the rows whose hw is stored: none of a frozen expert (its dW
    runs an empty pair range) or of a masked pair (its row lies outside its expert's dW bounds); only dW reads hw."""
    wgt = tl.load(weights_ptr + pairs, mask=rmask, other=0.0).to(tl.float32)
    hw_rmask = rmask
    if HAS_PAIR_MASK:
        hw_rmask = hw_rmask & (tl.load(pair_mask_ptr + pairs, mask=rmask, other=0) != 0)
    if HAS_EXPERT_MASK:
        hw_rmask = tl.where(tl.load(expert_mask_ptr + e) != 0, hw_rmask, False)
    return wgt, hw_rmask


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


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] -> its left and right [BLOCK_M, BLOCK_N // 2] halves: the epilogues work on one half
    at a time, so their temporaries (reloaded gate|up, SwiGLU terms) stay within the register budget."""
    return tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))


@triton.jit
def _chunk(acc, i: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column chunk ``i`` of ``CHUNKS`` (2 or 4) of a [BLOCK_M, BLOCK_N] accumulator, by halving (the same
    register splits for every chunk, shared by the compiler): the sub-tiled epilogues walk it with
    ``tl.static_range(CHUNKS)``."""
    a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
    sub = a0 if i < CHUNKS // 2 else a1
    if CHUNKS == 4:
        q0, q1 = _halves(sub, BLOCK_M, BLOCK_N // 2)
        sub = q0 if i % 2 == 0 else q1
    return sub


@triton.jit
def _up_epilogue(acc_g, acc_u, gate_up_ptr, h_ptr, rows, rmask, cols, N, STORE_GATE_UP: tl.constexpr):
    smask = rmask[:, None] & (cols < N)[None, :]
    dt = h_ptr.dtype.element_ty
    if STORE_GATE_UP:
        gu = gate_up_ptr + rows[:, None] * (2 * N) + cols[None, :]
        tl.store(gu, acc_g.to(dt), mask=smask)
        tl.store(gu + N, acc_u.to(dt), mask=smask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(dt), mask=smask)


@triton.autotune(configs=configs_for("up_swiglu_kernel"), key=_ROW_KEY + ["STORE_GATE_UP", "USE_TMA"],
                 prune_configs_by=_pruner("up_swiglu_kernel", 2, "x_ptr"))
@triton.jit(do_not_specialize=ROW_DNS)
def up_swiglu_kernel(
    x_ptr, w_ptr, gate_up_ptr, h_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K,
    sx_t, sx_d, sw_e, sw_r, sw_d,
    ROWS_BUCKET, STORE_GATE_UP: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. gate_up [S, 2I] and h [S, I] rows are in sorted-pair order. USE_TMA: the gate and up
    weight tiles through one descriptor each (gate rows [0, I), up rows [I, 2I): a gate tile never reads up rows)."""
    num_n = tl.cdiv(N, BLOCK_N)
    g_desc = w_ptr
    u_desc = w_ptr
    if USE_TMA:
        g_desc = _weight_desc(w_ptr, E, N, KDIM, sw_e, sw_r, BLOCK_N, BLOCK_K)
        u_desc = _weight_desc(w_ptr + N * sw_r, E, N, KDIM, sw_e, sw_r, BLOCK_N, BLOCK_K)
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
            n0 = pid_n * BLOCK_N
            for k0 in range(0, KDIM, BLOCK_K):
                kmask = (k0 + kk) < KDIM
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                if USE_TMA:
                    acc_g = _dot(a, _tma_tile(g_desc, e, k0, n0, True, BLOCK_K, BLOCK_N), acc_g, IEEE)
                    acc_u = _dot(a, _tma_tile(u_desc, e, k0, n0, True, BLOCK_K, BLOCK_N), acc_u, IEEE)
                else:
                    wm = kmask[:, None] & nmask[None, :]
                    acc_g = _dot(a, tl.load(g_ptrs, mask=wm, other=0.0), acc_g, IEEE)
                    acc_u = _dot(a, tl.load(u_ptrs, mask=wm, other=0.0), acc_u, IEEE)
                a_ptrs += BLOCK_K * sx_d
                if not USE_TMA:
                    g_ptrs += BLOCK_K * sw_d
                    u_ptrs += BLOCK_K * sw_d
            # sub-tiled epilogue: two half-width passes
            g0, g1 = _halves(acc_g, BLOCK_M, BLOCK_N)
            u0, u1 = _halves(acc_u, BLOCK_M, BLOCK_N)
            c0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            _up_epilogue(g0, u0, gate_up_ptr, h_ptr, rows, rmask, c0, N, STORE_GATE_UP)
            _up_epilogue(g1, u1, gate_up_ptr, h_ptr, rows, rmask, c0 + BLOCK_N // 2, N, STORE_GATE_UP)


@triton.autotune(configs=configs_for("down_kernel"), key=_ROW_KEY + ["USE_TMA"],
                 prune_configs_by=_pruner("down_kernel", 1, "h_ptr"))
@triton.jit(do_not_specialize=ROW_DNS)
def down_kernel(
    h_ptr, w_ptr, y_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM,
    sw_e, sw_d, sw_i,
    ROWS_BUCKET, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = D, KDIM = I. y[p, :] = h[row] @ W_down[e]^T, written at the pair's own (token-major) row."""
    num_n = tl.cdiv(N, BLOCK_N)
    b_desc = w_ptr
    if USE_TMA:
        b_desc = _weight_desc(w_ptr, E, N, KDIM, sw_e, sw_d, BLOCK_N, BLOCK_K)
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
            acc = _mainloop(a_ptrs, BLOCK_K, b_ptrs, BLOCK_K * sw_i, rmask, nmask, KDIM, acc, IEEE, BLOCK_K,
                            b_desc, e, pid_n * BLOCK_N, USE_TMA, True, BLOCK_N)
            tl.store(y_ptr + pairs[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["T"])
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


@triton.jit
def _dh_epilogue(acc, wgt, gate_up_ptr, dgate_up_ptr, hw_ptr, rows, rmask, hw_rmask, cols, N,
                 STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr, STORE_DWP: tl.constexpr):
    """One sub-tile (half or quarter width) of dh_swiglu_kernel's epilogue; returns its share of the
    routing-weight dot.
    ``hw_rmask``: the rows whose hw is stored (``_pair_scales``)."""
    smask = rmask[:, None] & (cols < N)[None, :]
    gu = rows[:, None] * (2 * N) + cols[None, :]
    g = tl.load(gate_up_ptr + gu, mask=smask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + gu + N, mask=smask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dt = dgate_up_ptr.dtype.element_ty
    part = tl.zeros([acc.shape[0]], tl.float32)
    if STORE_DWP:
        part = tl.sum(acc * (g * sig * u), axis=1)
    if STORE_DGU:
        dh = acc * wgt[:, None]
        tl.store(dgate_up_ptr + gu, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=smask)
        tl.store(dgate_up_ptr + gu + N, (dh * g * sig).to(dt), mask=smask)
    if STORE_HW:
        tl.store(hw_ptr + rows[:, None] * N + cols[None, :], (g * sig * u * wgt[:, None]).to(dt),
                 mask=hw_rmask[:, None] & (cols < N)[None, :])
    return part


@triton.autotune(configs=configs_for("dh_swiglu_kernel"),
                 key=_ROW_KEY + ["STORE_DGU", "STORE_HW", "STORE_DWP", "HAS_PAIR_MASK", "HAS_EXPERT_MASK", "USE_TMA"],
                 prune_configs_by=_pruner("dh_swiglu_kernel", 1, "dout_ptr"))
@triton.jit(do_not_specialize=ROW_DNS + ["S"])
def dh_swiglu_kernel(
    dout_ptr, w_ptr, weights_ptr, gate_up_ptr, dgate_up_ptr, hw_ptr, dwp_ptr, pair_mask_ptr, expert_mask_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM, TOP_K, S, NDWP,
    sd_t, sd_d, sw_e, sw_d, sw_i,
    ROWS_BUCKET, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr, STORE_DWP: tl.constexpr,
    HAS_PAIR_MASK: tl.constexpr, HAS_EXPERT_MASK: tl.constexpr, IEEE: tl.constexpr, DWP_COLS: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = I, KDIM = D. dh = w_p * dout[t] @ W_down[e]; d(gate|up) from the stored pre-activation.

    With STORE_HW it also writes ``hw = w_p * silu(gate)*up`` (the recomputed activation, scaled by the
    routing weight) so dW_down is a plain grouped GEMM whose operands stream straight from memory into the
    tensor cores (no per-tile arithmetic in its inner loop). A frozen expert's rows (HAS_EXPERT_MASK) and masked
    pairs' rows (HAS_PAIR_MASK) store no hw: dW_down never reads them (empty range / outside the dW bounds).
    With STORE_DWP it writes this column tile's share of the routing-weight gradient,
    ``sum_i (dout[t] @ W_down[e])[i] * h[p, i]`` (= <dout[t], y_p> summed over tiles), so the expert outputs y
    never need to be kept from the forward. Layout: ``dwp [NDWP, S]`` with one row per ``DWP_COLS`` columns of
    I; a tile writes its dot into its first row and zeros into the other rows it covers, so every config writes
    every row and the buffer's content never depends on which configs the autotuner ran (first call == every
    call, without ``reset_to_zero``)."""
    num_n = tl.cdiv(N, BLOCK_N)
    R: tl.constexpr = BLOCK_N // DWP_COLS
    # half-width epilogue passes, or quarter-width ones where a half would exceed EPI_ELEMS accumulator elements
    CHUNKS: tl.constexpr = 4 if BLOCK_M * (BLOCK_N // 2) > EPI_ELEMS else 2
    b_desc = w_ptr
    if USE_TMA:
        b_desc = _weight_desc(w_ptr, E, KDIM, N, sw_e, sw_d, BLOCK_K, BLOCK_N)
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
            acc = _mainloop(a_ptrs, BLOCK_K * sd_d, b_ptrs, BLOCK_K * sw_d, rmask, nmask, KDIM, acc, IEEE, BLOCK_K,
                            b_desc, e, pid_n * BLOCK_N, USE_TMA, False, BLOCK_N)
            wgt, hw_rmask = _pair_scales(weights_ptr, pair_mask_ptr, expert_mask_ptr, pairs, rmask, e,
                                         HAS_PAIR_MASK, HAS_EXPERT_MASK)
            # sub-tiled epilogue: two half-width passes, or four quarter-width ones for wide tiles
            part = tl.zeros([BLOCK_M], tl.float32)
            for i in tl.static_range(CHUNKS):
                c = pid_n * BLOCK_N + i * (BLOCK_N // CHUNKS) + tl.arange(0, BLOCK_N // CHUNKS)
                part += _dh_epilogue(_chunk(acc, i, CHUNKS, BLOCK_M, BLOCK_N), wgt, gate_up_ptr, dgate_up_ptr,
                                     hw_ptr, rows, rmask, hw_rmask, c, N, STORE_DGU, STORE_HW, STORE_DWP)
            if STORE_DWP:
                j = tl.arange(0, R)
                r = pid_n * R + j
                vals = tl.where(j[None, :] == 0, part[:, None], 0.0)
                tl.store(dwp_ptr + r[None, :].to(tl.int64) * S + pairs[:, None], vals,
                         mask=rmask[:, None] & (r < NDWP)[None, :])


@triton.autotune(configs=configs_for("dx_kernel"), key=_ROW_KEY + ["USE_TMA"],
                 prune_configs_by=_pruner("dx_kernel", 1, "dgate_up_ptr"))
@triton.jit(do_not_specialize=ROW_DNS)
def dx_kernel(
    dgate_up_ptr, w_ptr, dxp_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, sorted_pairs_ptr,
    E, num_tiles, N, KDIM,
    sw_e, sw_r, sw_d,
    ROWS_BUCKET, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """N = D, KDIM = 2I. dx_pair[p] = d(gate|up)[row] @ W_gate_up[e], at the pair's own row. USE_TMA needs the
    standard layout (D contiguous: ``sw_d`` = 1); gpt-oss's launcher runs it without."""
    num_n = tl.cdiv(N, BLOCK_N)
    b_desc = w_ptr
    if USE_TMA:
        b_desc = _weight_desc(w_ptr, E, KDIM, N, sw_e, sw_r, BLOCK_K, BLOCK_N)
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
            acc = _mainloop(a_ptrs, BLOCK_K, b_ptrs, BLOCK_K * sw_r, rmask, nmask, KDIM, acc, IEEE, BLOCK_K,
                            b_desc, e, pid_n * BLOCK_N, USE_TMA, False, BLOCK_N)
            tl.store(dxp_ptr + pairs[:, None] * N + cols[None, :], acc.to(dxp_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _dw_tile(pid, A_DIM, B_DIM, bounds_ptr, tok_ptr, expert_mask_ptr, HAS_EXPERT_MASK: tl.constexpr,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Expert-major, swizzled order: program ids run through all output tiles of expert 0, then expert 1, ...,
    grouped GROUP tiles deep inside an expert, so the expert's pair rows (the GEMM's long inner dimension) are
    read from HBM about once and re-served from L2 to its other output tiles. A frozen expert gets an empty pair
    range: no GEMM, a zero tile is stored. ``bounds [E, 2]``: each expert's first and past-the-last trainable
    sorted row (the routing plan puts an expert's masked pairs after its kept ones, outside this range)."""
    na = tl.cdiv(A_DIM, BLOCK_A)
    nb = tl.cdiv(B_DIM, BLOCK_B)
    e = pid // (na * nb)
    pid_a, pid_b = _grouped_pid(pid % (na * nb), na, nb, GROUP)
    lo = tl.load(bounds_ptr + 2 * e)
    hi = tl.load(bounds_ptr + 2 * e + 1)
    if HAS_EXPERT_MASK:
        hi = tl.where(tl.load(expert_mask_ptr + e) != 0, hi, lo)
    ra = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = lo + tl.arange(0, BLOCK_K)  # the first K step's sorted rows and their tokens (then loop-carried)
    tok = tl.load(tok_ptr + rows, mask=rows < hi, other=-1)
    return e, ra, rb, hi, rows, tok, tl.cdiv(hi - lo, BLOCK_K)


@triton.jit
def _dw_store(dw_ptr, acc, e, ra, rb, A_DIM, B_DIM):
    ptrs = dw_ptr + e.to(tl.int64) * A_DIM * B_DIM + ra[:, None].to(tl.int64) * B_DIM + rb[None, :]
    tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(ra < A_DIM)[:, None] & (rb < B_DIM)[None, :])


# The dW kernels' inner dimension is the expert's sorted pairs, gathered through a token index. The index of the
# NEXT step is loaded at the end of each step (loop-carried), so no load address inside the loop depends on a
# load of the same step and the pipeliner gives the data loads num_stages shared-memory buffers (an index loaded
# and used in the same step pins the loop at 2 buffers with a full wait before every MMA). tok_S (sorted rows ->
# token) comes with the routing plan; pairs masked by pair_trainable lie outside each expert's bounds (no dW work).
@triton.autotune(configs=configs_for("dw_gate_up_kernel"), key=_DW_KEY,
                 prune_configs_by=_pruner("dw_gate_up_kernel", 1, "x_ptr"))
@triton.jit(do_not_specialize=DW_DNS)
def dw_gate_up_kernel(
    dgate_up_ptr, x_ptr, dw_ptr, bounds_ptr, tok_ptr, expert_mask_ptr,
    A_DIM, B_DIM, sx_t, sx_d,
    ROWS_BUCKET, HAS_EXPERT_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dW_gate_up[e] [2I, D] = sum over e's pairs of d(gate|up)[row]^T x[tok]; A_DIM = 2I, B_DIM = D."""
    e, ra, rb, hi, rows, tok, steps = _dw_tile(tl.program_id(0), A_DIM, B_DIM, bounds_ptr, tok_ptr,
                                               expert_mask_ptr, HAS_EXPERT_MASK, BLOCK_A, BLOCK_B, BLOCK_K, GROUP)
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    a_ptrs = dgate_up_ptr + rows[None, :].to(tl.int64) * A_DIM + ra[:, None]
    for _ in range(0, steps):
        a = tl.load(a_ptrs, mask=(ra < A_DIM)[:, None] & (rows < hi)[None, :], other=0.0)
        b = tl.load(x_ptr + tok[:, None].to(tl.int64) * sx_t + rb[None, :] * sx_d,
                    mask=(tok >= 0)[:, None] & (rb < B_DIM)[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        rows += BLOCK_K
        a_ptrs += BLOCK_K * A_DIM
        tok = tl.load(tok_ptr + rows, mask=rows < hi, other=-1)
    _dw_store(dw_ptr, acc, e, ra, rb, A_DIM, B_DIM)


@triton.autotune(configs=configs_for("dw_down_kernel"), key=_DW_KEY,
                 prune_configs_by=_pruner("dw_down_kernel", 1, "hw_ptr"))
@triton.jit(do_not_specialize=DW_DNS)
def dw_down_kernel(
    dout_ptr, hw_ptr, dw_ptr, bounds_ptr, tok_ptr, expert_mask_ptr,
    A_DIM, B_DIM, sd_t, sd_d,
    ROWS_BUCKET, HAS_EXPERT_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dW_down[e] [D, I] = sum over e's pairs of dout[tok]^T hw[row] (hw = w * h from dh_swiglu_kernel).
    A_DIM = D, B_DIM = I."""
    e, ra, rb, hi, rows, tok, steps = _dw_tile(tl.program_id(0), A_DIM, B_DIM, bounds_ptr, tok_ptr,
                                               expert_mask_ptr, HAS_EXPERT_MASK, BLOCK_A, BLOCK_B, BLOCK_K, GROUP)
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    b_ptrs = hw_ptr + rows[:, None].to(tl.int64) * B_DIM + rb[None, :]
    for _ in range(0, steps):
        a = tl.load(dout_ptr + tok[None, :].to(tl.int64) * sd_t + ra[:, None] * sd_d,
                    mask=(ra < A_DIM)[:, None] & (tok >= 0)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(rows < hi)[:, None] & (rb < B_DIM)[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        rows += BLOCK_K
        b_ptrs += BLOCK_K * B_DIM
        tok = tl.load(tok_ptr + rows, mask=rows < hi, other=-1)
    _dw_store(dw_ptr, acc, e, ra, rb, A_DIM, B_DIM)


AUTOTUNED = (up_swiglu_kernel, down_kernel, dh_swiglu_kernel, dx_kernel, dw_gate_up_kernel, dw_down_kernel)
