"""Triton backend: launchers for ``desmoe.kernels`` wrapped as ``torch.library`` custom ops.

Ops (namespace ``desmoe``), each with a fake (meta) impl and, where differentiable, ``register_autograd``, so
they trace under ``torch.compile(fullgraph=True)`` as single opaque nodes:

    desmoe::topk_route_fwd   logits [T,E] -> weights [T,K] f32, ids [T,K] i64
    desmoe::topk_route_bwd   d weights -> d logits
    desmoe::moe_permute      ids [T,K] -> sorted_pairs [S] i32, offsets [E+1] i32
    desmoe::moe_experts_fwd  x, W_gate_up, W_down, ids, weights (+ masks, saved for backward) -> out [T,D], and
                             what backward needs: the gate|up pre-activation [S,2I] (sorted-pair rows; the
                             only activation kept), sorted_pairs, offsets
    desmoe::moe_experts_bwd  -> dx, dW_gate_up, dW_down, d weights (masks applied to the dW only)

Nothing here syncs with the host: the permutation and the GEMM tile schedule are built on the device and
grids are sized from shapes alone. Inputs are validated by :mod:`desmoe.ops` before they arrive here.

Debugging aid: with ``DESMOE_POISON_OUTPUTS=1`` every buffer a launcher allocates is filled with NaN (ints with
-1) first, so an element a kernel forgets to write shows up in the tests.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton

from ..kernels import moe as _mk
from ..kernels import permute as _pk
from ..kernels import routing as _rk
from . import _autocast, dispatch, reference

Tensor = torch.Tensor
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _poison() -> bool:
    return os.environ.get("DESMOE_POISON_OUTPUTS") == "1"


def _empty(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison():
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


# --- routing --------------------------------------------------------------------------------------------------

def _route_block_t(E_PAD: int) -> int:
    # ~4K scores in registers per program; rows are independent so any power of two works
    return max(1, min(64, 4096 // E_PAD))


@torch.library.custom_op("desmoe::topk_route_fwd", mutates_args=())
def topk_route_fwd(
    logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, scoring: str, renormalize: bool, n_group: int,
    topk_group: int, group_score: str, scaling: float, renorm_eps: float, masked_value: Optional[float],
) -> tuple[Tensor, Tensor]:
    T, E = logits_TE.shape
    weights_TK = _empty((T, top_k), torch.float32, logits_TE.device)
    ids_TK = _empty((T, top_k), torch.int64, logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    E_PAD = _pow2(E)
    BLOCK_T = _route_block_t(E_PAD)
    grouped = n_group > 1 and topk_group < n_group
    bias = bias_E.contiguous() if bias_E is not None else logits_TE
    with _on_device(logits_TE):
        _rk.topk_route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits_TE, bias, weights_TK, ids_TK, T, E, logits_TE.stride(0), logits_TE.stride(1),
            float(scaling), float(renorm_eps), float("-inf") if masked_value is None else float(masked_value),
            TOP_K=top_k, K_PAD=_pow2(top_k), E_PAD=E_PAD, BLOCK_T=BLOCK_T,
            SCORING_SIGMOID=scoring == "sigmoid", HAS_BIAS=bias_E is not None, RENORM=bool(renormalize),
            GROUPED=grouped, N_GROUP=n_group, GROUP_SIZE=E // n_group, TOPK_GROUP=topk_group,
            G_PAD=_pow2(n_group), GROUP_TOP2SUM=group_score == "top2sum",
        )
    return weights_TK, ids_TK


@topk_route_fwd.register_fake
def _(logits_TE, bias_E, top_k, scoring, renormalize, n_group, topk_group, group_score, scaling, renorm_eps,
      masked_value):
    T = logits_TE.shape[0]
    return (logits_TE.new_empty((T, top_k), dtype=torch.float32), logits_TE.new_empty((T, top_k), dtype=torch.int64))


@torch.library.custom_op("desmoe::topk_route_bwd", mutates_args=())
def topk_route_bwd(
    dweights_TK: Tensor, logits_TE: Tensor, ids_TK: Tensor, scoring: str, renormalize: bool, scaling: float,
    renorm_eps: float,
) -> Tensor:
    T, E = logits_TE.shape
    K = ids_TK.shape[1]
    dlogits_TE = _empty((T, E), logits_TE.dtype, logits_TE.device)
    if T == 0:
        return dlogits_TE
    E_PAD = _pow2(E)
    BLOCK_T = _route_block_t(E_PAD)
    with _on_device(logits_TE):
        _rk.topk_route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            dweights_TK.contiguous(), logits_TE, ids_TK.contiguous(), dlogits_TE, T, E,
            logits_TE.stride(0), logits_TE.stride(1), dlogits_TE.stride(0), dlogits_TE.stride(1),
            float(scaling), float(renorm_eps),
            TOP_K=K, K_PAD=_pow2(K), E_PAD=E_PAD, BLOCK_T=BLOCK_T, SCORING_SIGMOID=scoring == "sigmoid",
            RENORM=bool(renormalize),
        )
    return dlogits_TE


@topk_route_bwd.register_fake
def _(dweights_TK, logits_TE, ids_TK, scoring, renormalize, scaling, renorm_eps):
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    logits_TE, _bias, _k, scoring, renormalize, _ng, _tg, _gs, scaling, renorm_eps, _mv = inputs
    ctx.save_for_backward(logits_TE, output[1])
    ctx.args = (scoring, bool(renormalize), float(scaling), float(renorm_eps))


def _route_backward(ctx, dweights_TK, _dids):
    logits_TE, ids_TK = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0] and dweights_TK is not None:
        dlogits = topk_route_bwd(dweights_TK.float(), logits_TE, ids_TK, *ctx.args)
    return dlogits, None, None, None, None, None, None, None, None, None, None


topk_route_fwd.register_autograd(_route_backward, setup_context=_route_setup_context)
# under torch.autocast, scores in fp32 (autocast's softmax policy, as every HF router scores): logits upcast
_autocast.register("desmoe::topk_route_fwd", ("logits_TE", "bias_E"), policy="float32")


def topk_route(
    logits_TE: Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
    bias_E: Tensor | None = None, n_group: int = 1, topk_group: int = 1, group_score: str = "max",
    scaling: float = 1.0, renorm_eps: float = 0.0, masked_value: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused top-k routing; same contract as :func:`desmoe.ops.reference.topk_route_reference`.

    Returns ``(weights_TK float32, ids_TK int64)``; ``weights_TK`` is differentiable w.r.t. ``logits_TE``
    (``bias_E`` only steers the selection and gets no gradient).
    """
    return topk_route_fwd(
        logits_TE, bias_E, int(top_k), scoring, bool(renormalize), int(n_group), int(topk_group), group_score,
        float(scaling), float(renorm_eps), None if masked_value is None else float(masked_value),
    )


# --- permutation ----------------------------------------------------------------------------------------------

def _permute_blocks(E: int) -> tuple[int, int]:
    """(pairs per histogram/scatter program, pairs per one-hot sub-chunk): a [SUB, E_PAD] one-hot of ~16K int32
    in registers at a time; BLOCK large so the one-program scan has few rows (interpreter: small, loops run)."""
    if _INTERPRET:
        return 32, 16
    sub = max(16, min(1024, 16384 // _pow2(E)))
    return max(4096, sub), sub


def _schedule_len(S: int, E: int, BM: int) -> int:
    return triton.cdiv(S, BM) + min(E, S)  # static upper bound on sum(ceil(count_e / BM))


def _scan_launch(hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, BM, from_offsets):
    E_PAD = _pow2(E)
    chunk = 4 if _INTERPRET else max(1, min(64, 8192 // E_PAD))  # interpreter: small, so the tests run the loops
    _pk.scan_kernel[(1,)](
        hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, BLOCK_M=BM, E_PAD=E_PAD,
        ROWS=chunk, SLOTS=chunk, FROM_OFFSETS=from_offsets,
        num_warps=1 if _INTERPRET else 8,
    )


def _routing_metadata(topk_ids_TK: Tensor, E: int, BM: int):
    """O(S) permutation metadata (``desmoe.kernels.permute``): histogram -> scan -> stable scatter, no sync.

    Returns ``sorted_pairs_S`` (i32), ``offsets_E1`` (i32), ``sorted_tok_S`` (i32: token of each sorted row),
    ``tile_expert``, ``tile_row`` (i32, the row-tile GEMMs' schedule for ``BLOCK_M = BM``) and its length."""
    dev = topk_ids_TK.device
    K = topk_ids_TK.shape[1] if topk_ids_TK.dim() == 2 else 1
    S = topk_ids_TK.numel()
    max_tiles = _schedule_len(S, E, BM) if BM else 0
    sorted_pairs_S = _empty((S,), torch.int32, dev)
    sorted_tok_S = _empty((S,), torch.int32, dev)
    offsets_E1 = _empty((E + 1,), torch.int32, dev)
    tile_expert = _empty((max_tiles,), torch.int32, dev)
    tile_row = _empty((max_tiles,), torch.int32, dev)
    if S == 0:
        offsets_E1.zero_()
        return sorted_pairs_S, offsets_E1, sorted_tok_S, tile_expert.fill_(E), tile_row.zero_(), max_tiles
    ids_S = topk_ids_TK.reshape(-1)
    block, sub = _permute_blocks(E)
    NB = triton.cdiv(S, block)
    hist = _empty((NB, E), torch.int32, dev)
    nw = 1 if _INTERPRET else 8
    with _on_device(topk_ids_TK):
        _pk.histogram_kernel[(NB,)](ids_S, hist, S, E, BLOCK=block, SUB=sub, E_PAD=_pow2(E), num_warps=nw)
        _scan_launch(hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, max(BM, 1), False)
        _pk.scatter_kernel[(NB,)](ids_S, hist, offsets_E1, sorted_pairs_S, sorted_tok_S, S, E, K, BLOCK=block,
                                  SUB=sub, E_PAD=_pow2(E), num_warps=nw)
    return sorted_pairs_S, offsets_E1, sorted_tok_S, tile_expert, tile_row, max_tiles


def _tile_schedule(offsets_E1: Tensor, S: int, E: int, BM: int):
    """The row-tile schedule rebuilt from existing offsets (backward): one small kernel, no sync."""
    max_tiles = _schedule_len(S, E, BM)
    tile_expert = _empty((max_tiles,), torch.int32, offsets_E1.device)
    tile_row = _empty((max_tiles,), torch.int32, offsets_E1.device)
    with _on_device(offsets_E1):
        _scan_launch(offsets_E1, offsets_E1, tile_expert, tile_row, 0, E, max_tiles, BM, True)
    return tile_expert, tile_row, max_tiles


@torch.library.custom_op("desmoe::moe_permute", mutates_args=())
def moe_permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    sorted_pairs_S, offsets_E1, *_ = _routing_metadata(topk_ids_TK, num_experts, 0)
    return sorted_pairs_S, offsets_E1


@moe_permute.register_fake
def _(topk_ids_TK, num_experts):
    S = topk_ids_TK.numel()
    return (topk_ids_TK.new_empty((S,), dtype=torch.int32),
            topk_ids_TK.new_empty((num_experts + 1,), dtype=torch.int32))


def permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert-major, stable pair order (int64, as the reference) and ``offsets_E1`` (int32); no host sync."""
    sorted_pairs_S, offsets_E1 = moe_permute(topk_ids_TK, int(num_experts))
    return sorted_pairs_S.long(), offsets_E1


def route_and_permute(logits_TE: Tensor, top_k: int, **route_kwargs):
    """Routing plus everything the expert kernels consume, without a host sync.

    Returns ``(weights_TK, ids_TK, counts_E int32, offsets_E1 int32, sorted_pairs_S int64)``.
    """
    weights_TK, ids_TK = topk_route(logits_TE, top_k, **route_kwargs)
    sorted_pairs_S, offsets_E1 = moe_permute(ids_TK, logits_TE.shape[1])
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    return weights_TK, ids_TK, counts_E, offsets_E1, sorted_pairs_S.long()


# --- experts --------------------------------------------------------------------------------------------------

def _block_m(S: int, E: int) -> int:
    if _INTERPRET:
        return 16
    return 128 if S >= 256 * E else 64


def _rows_bucket(S: int, E: int) -> int:
    # autotune key: pairs per expert rounded to a power of two (the raw token count stays out of the key)
    return min(_pow2(S // max(E, 1)), 1 << 16)


def _max_programs(device: torch.device) -> int:
    """Grid cap of the persistent row-tile kernels: a few programs per SM (3 in the interpreter, so the tests
    exercise the work loop)."""
    if device.type != "cuda":
        return 3
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _row_grid(max_tiles, N, device):
    cap = _max_programs(device)
    return lambda meta: (max(1, min(max_tiles * triton.cdiv(N, meta["BLOCK_N"]), cap)),)


def _mask_u8(mask: Optional[Tensor], like: Tensor) -> Tensor:
    return mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else like


def _dims(x_TD: Tensor, w_gate_up_E2ID: Tensor, pairs_TK: Tensor) -> tuple[int, int, int, int, int, int]:
    """``T, D, E, I, K, S`` (S = T·K pairs) of an experts call."""
    T, D = x_TD.shape
    E, I2, _ = w_gate_up_E2ID.shape
    K = pairs_TK.shape[1]
    return T, D, E, I2 // 2, K, T * K


@torch.library.custom_op("desmoe::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor,
    expert_trainable_E: Optional[Tensor], pair_trainable_TK: Optional[Tensor], save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_E2ID, topk_ids_TK)
    I2 = 2 * I
    dev, dt = x_TD.device, x_TD.dtype
    BM = _block_m(S, E)
    sorted_pairs_S, offsets_E1, _tok, tile_expert, tile_row, max_tiles = _routing_metadata(topk_ids_TK, E, BM)
    gate_up_S2I = _empty((S, I2) if save_for_backward else (0, I2), dt, dev)
    out_TD = _empty((T, D), dt, dev)
    if S == 0:
        out_TD.zero_()
        return out_TD, gate_up_S2I, sorted_pairs_S, offsets_E1
    # transient: h (sorted rows) and the unweighted expert outputs y (pair rows); neither is kept for backward
    h_SI = _empty((S, I), dt, dev)
    y_SD = _empty((S, D), dt, dev)
    w_TK = topk_weights_TK.contiguous()
    bucket = _rows_bucket(S, E)
    ieee = dt == torch.float32 or _INTERPRET
    with _on_device(x_TD):
        _mk.up_swiglu_kernel[_row_grid(max_tiles, I, dev)](
            x_TD, w_gate_up_E2ID, gate_up_S2I if save_for_backward else h_SI, h_SI,
            tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, I, D, K,
            x_TD.stride(0), x_TD.stride(1), *w_gate_up_E2ID.stride(),
            bucket, STORE_GATE_UP=save_for_backward, IEEE=ieee, BLOCK_M=BM,
        )
        _mk.down_kernel[_row_grid(max_tiles, D, dev)](
            h_SI, w_down_EDI, y_SD, tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, D, I, *w_down_EDI.stride(), bucket, IEEE=ieee, BLOCK_M=BM,
        )
        BD = min(1024, _pow2(D))
        _mk.combine_kernel[(T, triton.cdiv(D, BD))](y_SD, w_TK, out_TD, T, D, K, HAS_W=True, BLOCK_D=BD)
    return out_TD, gate_up_S2I, sorted_pairs_S, offsets_E1


@moe_experts_fwd.register_fake
def _(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, expert_trainable_E, pair_trainable_TK,
      save_for_backward):
    T, D = x_TD.shape
    E, I2, _ = w_gate_up_E2ID.shape
    S = T * topk_ids_TK.shape[1]
    return (
        x_TD.new_empty((T, D)),
        x_TD.new_empty((S, I2) if save_for_backward else (0, I2)),
        x_TD.new_empty((S,), dtype=torch.int32),
        x_TD.new_empty((E + 1,), dtype=torch.int32),
    )


@torch.library.custom_op("desmoe::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(
    dout_TD: Tensor, x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_weights_TK: Tensor,
    gate_up_S2I: Tensor, sorted_pairs_S: Tensor, offsets_E1: Tensor,
    expert_trainable_E: Optional[Tensor], pair_trainable_TK: Optional[Tensor],
    need_dx: bool, need_dw: bool, need_dweights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_E2ID, topk_weights_TK)
    I2 = 2 * I
    dev, dt = x_TD.device, x_TD.dtype
    wdt = w_gate_up_E2ID.dtype
    dx_TD = _empty((T, D) if need_dx else (0,), dt, dev)
    dw1 = _empty(tuple(w_gate_up_E2ID.shape) if need_dw else (0,), wdt, dev)
    dw2 = _empty(tuple(w_down_EDI.shape) if need_dw else (0,), wdt, dev)
    dweights_TK = _empty((T, K) if need_dweights else (0,), topk_weights_TK.dtype, dev)
    if S == 0 or not (need_dx or need_dw or need_dweights):
        for t in (dx_TD, dw1, dw2, dweights_TK):
            t.zero_()
        return dx_TD, dw1, dw2, dweights_TK
    w_TK = topk_weights_TK.contiguous()
    BM = _block_m(S, E)
    bucket = _rows_bucket(S, E)
    ieee = dt == torch.float32 or _INTERPRET
    sd_t, sd_d = dout_TD.stride()
    tile_expert, tile_row, max_tiles = _tile_schedule(offsets_E1, S, E, BM)
    need_dgu = need_dx or need_dw
    dgate_up_S2I = _empty((S, I2), dt, dev) if need_dgu else gate_up_S2I
    hw_SI = _empty((S, I), dt, dev) if need_dw else gate_up_S2I
    # d w[p] = <dout[t], h_p W_down[e]^T> = <dout[t] W_down[e], h_p>: partial dots per DWP_COLS columns of the
    # dh GEMM, written in full by every autotune config (so the first call is right), summed in a fixed order:
    # deterministic, and y is never kept
    ndwp = triton.cdiv(I, _mk.DWP_COLS) if need_dweights else 1
    dwp_NS = _empty((ndwp, S) if need_dweights else (1, 1), torch.float32, dev)
    em = _mask_u8(expert_trainable_E, offsets_E1)
    pm = _mask_u8(pair_trainable_TK, offsets_E1)
    has_em, has_pm = expert_trainable_E is not None, pair_trainable_TK is not None
    with _on_device(x_TD):
        _mk.dh_swiglu_kernel[_row_grid(max_tiles, I, dev)](
            dout_TD, w_down_EDI, w_TK, gate_up_S2I, dgate_up_S2I, hw_SI, dwp_NS, pm,
            tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, I, D, K, S, ndwp, sd_t, sd_d, *w_down_EDI.stride(), bucket,
            STORE_DGU=need_dgu, STORE_HW=need_dw, STORE_DWP=need_dweights, HAS_PAIR_MASK=has_pm, IEEE=ieee,
            DWP_COLS=_mk.DWP_COLS, BLOCK_M=BM,
        )
        if need_dweights:
            dweights_TK.copy_(dwp_NS.sum(0).view(T, K))
        if need_dx:
            dxp_SD = _empty((S, D), dt, dev)
            _mk.dx_kernel[_row_grid(max_tiles, D, dev)](
                dgate_up_S2I, w_gate_up_E2ID, dxp_SD, tile_expert, tile_row, offsets_E1, sorted_pairs_S,
                E, max_tiles, D, I2, *w_gate_up_E2ID.stride(), bucket, IEEE=ieee, BLOCK_M=BM,
            )
            BD = min(1024, _pow2(D))
            _mk.combine_kernel[(T, triton.cdiv(D, BD))](dxp_SD, dxp_SD, dx_TD, T, D, K, HAS_W=False, BLOCK_D=BD)
        if need_dw:
            # token of every sorted row; -1 for pairs masked by pair_trainable (zero rows in both dW GEMMs)
            tok_S = (sorted_pairs_S // K).to(torch.int32)
            if has_pm:
                keep = pair_trainable_TK.reshape(-1)[sorted_pairs_S.long()].bool()
                tok_S = torch.where(keep, tok_S, torch.full_like(tok_S, -1))

            def grid(a, b):  # expert-major: all output tiles of expert 0, then expert 1, ...
                return lambda meta: (E * triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"]),)

            _mk.dw_gate_up_kernel[grid(I2, D)](
                dgate_up_S2I, x_TD, dw1, offsets_E1, tok_S, em, I2, D, x_TD.stride(0), x_TD.stride(1),
                bucket, HAS_EXPERT_MASK=has_em, IEEE=ieee,
            )
            _mk.dw_down_kernel[grid(D, I)](
                dout_TD, hw_SI, dw2, offsets_E1, tok_S, em, D, I, sd_t, sd_d,
                bucket, HAS_EXPERT_MASK=has_em, IEEE=ieee,
            )
    return dx_TD, dw1, dw2, dweights_TK


@moe_experts_bwd.register_fake
def _(dout_TD, x_TD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK, gate_up_S2I, sorted_pairs_S, offsets_E1,
      expert_trainable_E, pair_trainable_TK, need_dx, need_dw, need_dweights):
    T, D = x_TD.shape
    return (
        x_TD.new_empty((T, D) if need_dx else (0,)),
        w_gate_up_E2ID.new_empty(tuple(w_gate_up_E2ID.shape) if need_dw else (0,)),
        w_down_EDI.new_empty(tuple(w_down_EDI.shape) if need_dw else (0,)),
        topk_weights_TK.new_empty(tuple(topk_weights_TK.shape) if need_dweights else (0,)),
    )


def _experts_setup_context(ctx, inputs, output):
    x_TD, w1, w2, _ids, w_TK, em, pm, save = inputs
    _out, gate_up, sorted_pairs, offsets = output
    ctx.save_for_backward(x_TD, w1, w2, w_TK, gate_up, sorted_pairs, offsets, em, pm)
    ctx.saved_activations = bool(save)


def _experts_backward(ctx, dout_TD, *_unused):
    x_TD, w1, w2, w_TK, gate_up, sorted_pairs, offsets, em, pm = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_dweights = ctx.needs_input_grad[4]
    if dout_TD is None or not (need_dx or need_dw or need_dweights):
        return (None,) * 8
    if not ctx.saved_activations:
        raise RuntimeError("desmoe::moe_experts_fwd ran without saving activations (save_for_backward=False) "
                           "but a gradient was requested")
    dx, dw1, dw2, dweights = moe_experts_bwd(
        dout_TD, x_TD, w1, w2, w_TK, gate_up, sorted_pairs, offsets, em, pm, need_dx, need_dw, need_dweights
    )
    return (
        dx if need_dx else None,
        dw1 if ctx.needs_input_grad[1] else None,
        dw2 if ctx.needs_input_grad[2] else None,
        None,
        dweights if need_dweights else None,
        None, None, None,
    )


moe_experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup_context)
# bf16 compute under torch.autocast over fp32 masters: the GEMM operands take the region's dtype (so the kernels
# never take the IEEE-fp32 path in an autocast run); routing weights stay as given
_autocast.register("desmoe::moe_experts_fwd", ("x_TD", "w_gate_up_E2ID", "w_down_EDI"))


# --- coarse shapes: torch._grouped_mm GEMMs inside desmoe's metadata, gather/scatter, combine and masks --------

def _combine(y_SD: Tensor, w_TK: Optional[Tensor], T: int, K: int) -> Tensor:
    D = y_SD.shape[1]
    out_TD = _empty((T, D), y_SD.dtype, y_SD.device)
    BD = min(1024, _pow2(D))
    with _on_device(y_SD):
        _mk.combine_kernel[(T, triton.cdiv(D, BD))](y_SD, y_SD if w_TK is None else w_TK, out_TD, T, D, K,
                                                     HAS_W=w_TK is not None, BLOCK_D=BD)
    return out_TD


def _to_pair_rows(v_sorted: Tensor, sorted_pairs: Tensor) -> Tensor:
    out = torch.empty_like(v_sorted)
    out[sorted_pairs] = v_sorted
    return out


class _GroupedMMExperts(torch.autograd.Function):
    """SwiGLU experts with the four GEMMs (and both dW) on ``torch._grouped_mm``; same contract and masks as
    :func:`moe_experts`. Saves x, the weights, the routing metadata and the gate|up pre-activation."""

    @staticmethod
    def forward(ctx, x_TD, w1, w2, ids_TK, w_TK, em, pm):
        T, D = x_TD.shape
        E, I2, _ = w1.shape
        I = I2 // 2
        K = ids_TK.shape[1]
        sp, off, tok, *_ = _routing_metadata(ids_TK, E, 0)
        sp, tok, ends = sp.long(), tok.long(), off[1:]
        gu = torch._grouped_mm(x_TD[tok], w1.transpose(1, 2), offs=ends)  # [S, 2I], sorted rows
        g, u = gu[:, :I].float(), gu[:, I:].float()
        h = (g * torch.sigmoid(g) * u).to(x_TD.dtype)
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=ends)  # [S, D]
        out = _combine(_to_pair_rows(y, sp), w_TK.contiguous(), T, K)
        ctx.save_for_backward(x_TD, w1, w2, w_TK, sp, off, tok, gu, em, pm)
        return out

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w1, w2, w_TK, sp, off, tok, gu, em, pm = ctx.saved_tensors
        T, D = x_TD.shape
        E, I2, _ = w1.shape
        I, K = I2 // 2, w_TK.shape[1]
        ends, dt = off[1:], x_TD.dtype
        dout_s = dout_TD.contiguous()[tok]
        dh_u = torch._grouped_mm(dout_s, w2, offs=ends).float()  # dout[t] @ W_down[e], [S, I]
        g, u = gu[:, :I].float(), gu[:, I:].float()
        sig = torch.sigmoid(g)
        h = g * sig * u
        w_s = w_TK.reshape(-1)[sp].float()
        dweights = torch.empty(T * K, dtype=torch.float32, device=x_TD.device)
        dweights[sp] = (dh_u * h).sum(-1)
        dh = dh_u * w_s[:, None]
        dgu = torch.cat([dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig], dim=1).to(dt)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _combine(_to_pair_rows(torch._grouped_mm(dgu, w1, offs=ends), sp), None, T, K)
        dw1 = dw2 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            scale = w_s if pm is None else w_s * pm.reshape(-1)[sp].float()
            dgu_w = dgu if pm is None else dgu * pm.reshape(-1)[sp].to(dt)[:, None]
            dw1 = torch._grouped_mm(dgu_w.t(), x_TD[tok], offs=ends)  # [E, 2I, D]
            dw2 = torch._grouped_mm(dout_s.t(), (h * scale[:, None]).to(dt), offs=ends)  # [E, D, I]
            keep = (off[1:] > off[:-1]) if em is None else (off[1:] > off[:-1]) & em.bool()
            zero = torch.zeros((), dtype=dw1.dtype, device=dw1.device)
            dw1 = torch.where(keep[:, None, None], dw1, zero)
            dw2 = torch.where(keep[:, None, None], dw2, zero)
        dwts = dweights.view(T, K).to(w_TK.dtype) if ctx.needs_input_grad[4] else None
        return dx, dw1, dw2, None, dwts, None, None


def moe_experts_grouped_mm(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    expert_trainable_E: Tensor | None = None, pair_trainable_TK: Tensor | None = None,
) -> Tensor:
    """:func:`moe_experts` with ``torch._grouped_mm`` GEMMs (the coarse-shape engine of
    :mod:`desmoe.ops.dispatch`); desmoe's O(S) metadata, gather/scatter, deterministic combine and masks."""
    if not dispatch.grouped_mm_available():
        raise RuntimeError(f"torch._grouped_mm is not available in torch {torch.__version__}")
    if x_TD.shape[0] == 0:
        return reference.moe_experts_reference(
            x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, activation="silu",
            expert_trainable_E=expert_trainable_E, pair_trainable_TK=pair_trainable_TK,
        )
    # an autograd.Function has no Autocast kernel: the same rule as the custom ops, applied at its entry (the casts
    # are autograd ops, so the fp32 masters get fp32 gradients)
    x_TD, w_gate_up_E2ID, w_down_EDI = _autocast.cast_operands(x_TD, w_gate_up_E2ID, w_down_EDI)
    return _GroupedMMExperts.apply(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK,
                                   expert_trainable_E, pair_trainable_TK)


def moe_experts(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    expert_trainable_E: Tensor | None = None, pair_trainable_TK: Tensor | None = None,
) -> Tensor:
    """SwiGLU expert MLP with weighted combine on the Triton kernels: ``x [T, D] -> out [T, D]``.

    Same contract as :func:`desmoe.ops.reference.moe_experts_reference` with ``activation="silu"``. The GEMM
    engine (these kernels, or ``torch._grouped_mm`` for coarse shapes) is :mod:`desmoe.ops.dispatch`'s. Runs on
    x / weights of one dtype among float32, float16, bfloat16; anything else (float64, mixed dtypes) takes
    the reference path.
    """
    # the dtypes the op computes in: the autocast region's where one is active (its Autocast kernel casts)
    dt, dt_gu, dt_dn = (_autocast.compute_dtype(t) for t in (x_TD, w_gate_up_E2ID, w_down_EDI))
    if dt not in _KERNEL_DTYPES or dt_gu != dt or dt_dn != dt:
        return reference.moe_experts_reference(
            x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, activation="silu",
            expert_trainable_E=expert_trainable_E, pair_trainable_TK=pair_trainable_TK,
        )
    T, D = x_TD.shape
    E, I2, _ = w_gate_up_E2ID.shape
    engine = dispatch.experts_gemm_engine(T, E, topk_ids_TK.shape[1], D, I2 // 2, x_TD.device, dt)
    if engine == "grouped_mm":
        return moe_experts_grouped_mm(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK,
                                      expert_trainable_E=expert_trainable_E, pair_trainable_TK=pair_trainable_TK)
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK)
    )
    out_TD = moe_experts_fwd(
        x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, expert_trainable_E, pair_trainable_TK, save
    )[0]
    return out_TD


__all__ = ["topk_route", "permute", "route_and_permute", "moe_experts", "topk_route_fwd", "topk_route_bwd",
           "moe_permute", "moe_experts_fwd", "moe_experts_bwd", "moe_experts_grouped_mm"]
