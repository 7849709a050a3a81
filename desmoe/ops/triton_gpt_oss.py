"""Triton backend for gpt-oss's experts: launchers for ``desmoe.kernels.moe_gpt_oss`` as ``torch.library`` ops.

    desmoe::moe_experts_gpt_oss_fwd  x, W_gate_up [E, D, 2I] (interleaved), W_down [E, I, D], ids, weights, biases
                                     (+ masks, saved for backward) -> out [T, D], the interleaved gate|up
                                     pre-activation [S, 2I] (sorted-pair rows, biases included; the only activation
                                     kept), sorted_pairs, offsets
    desmoe::moe_experts_gpt_oss_bwd  -> dx, dW_gate_up, dW_down, d weights, db_gate_up, db_down (masks on the
                                        weight and bias gradients only)

The stored layout is read in place (no weight copies, no transposes). The activation is gpt-oss's clamped SwiGLU
(``clamped=True``, ``alpha``/``limit``) or SiLU SwiGLU on the same layout. Routing metadata, the tile schedule and
the persistent grids are :mod:`desmoe.ops.triton_permute`'s and :mod:`desmoe.ops.triton_common`'s; nothing syncs
with the host. Inputs are validated by :mod:`desmoe.ops`, and whether a call runs here (variant, dtypes, GEMM
engine) is :mod:`desmoe.ops.dispatch`'s rule, before they arrive: :func:`moe_experts_gpt_oss` only launches.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels import moe as _mk
from ..kernels import moe_gpt_oss as _gk
from . import _autocast, reference
from .triton_common import INTERPRET, block_m, empty, on_device, pow2, row_grid, rows_bucket
from .triton_experts import dh_plan, dx_from_dgate_up, expert_major_grid, plan_fake, saved_plan
from .triton_permute import routing_metadata

Tensor = torch.Tensor
_BIAS_BLOCKS = (16, 16) if INTERPRET else (32, 128)  # bias_grad_kernel: (rows, columns) per step


def _dims(x_TD: Tensor, w_gate_up: Tensor, pairs_TK: Tensor) -> tuple[int, int, int, int, int, int]:
    T, D = x_TD.shape
    E, _, I2 = w_gate_up.shape
    K = pairs_TK.shape[1]
    return T, D, E, I2 // 2, K, T * K


@torch.library.custom_op("desmoe::moe_experts_gpt_oss_fwd", mutates_args=())
def moe_experts_gpt_oss_fwd(
    x_TD: Tensor, w_gate_up_ED2I: Tensor, w_down_EID: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor,
    b_gate_up_E2I: Optional[Tensor], b_down_ED: Optional[Tensor], expert_trainable_E: Optional[Tensor],
    pair_trainable_TK: Optional[Tensor], save_for_backward: bool, clamped: bool, alpha: float, limit: float,
) -> tuple[Tensor, Tensor, Tensor]:
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_ED2I, topk_ids_TK)
    dev, dt = x_TD.device, x_TD.dtype
    plan = routing_metadata(topk_ids_TK, E, block_m(S, E), pair_trainable_TK)
    tile_expert, tile_row, max_tiles = plan.tile_expert, plan.tile_row, plan.max_tiles
    sorted_pairs_S, offsets_E1, BM = plan.sorted_pairs_S, plan.offsets_E1, plan.BM
    gate_up_S2I = empty((S, 2 * I) if save_for_backward else (0, 2 * I), dt, dev)
    out_TD = empty((T, D), dt, dev)
    if S == 0:
        out_TD.zero_()
        return out_TD, gate_up_S2I, plan.buf
    h_SI = empty((S, I), dt, dev)  # transient: the activation (sorted rows)
    y_SD = empty((S, D), dt, dev)  # transient: unweighted expert outputs, bias included (pair rows)
    bucket = rows_bucket(S, E)
    ieee = dt == torch.float32 or INTERPRET
    b1 = b_gate_up_E2I if b_gate_up_E2I is not None else x_TD
    b2 = b_down_ED if b_down_ED is not None else x_TD
    with on_device(x_TD):
        _gk.up_gpt_oss_kernel[row_grid(_gk.up_gpt_oss_kernel, max_tiles, I, dev)](
            x_TD, w_gate_up_ED2I, b1, gate_up_S2I if save_for_backward else h_SI, h_SI,
            tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, I, D, K, float(alpha), float(limit),
            x_TD.stride(0), x_TD.stride(1), *w_gate_up_ED2I.stride(), b1.stride(0),
            bucket, STORE_GATE_UP=save_for_backward, HAS_BIAS=b_gate_up_E2I is not None, CLAMPED=bool(clamped),
            IEEE=ieee, BLOCK_M=BM,
        )
        _gk.down_gpt_oss_kernel[row_grid(_gk.down_gpt_oss_kernel, max_tiles, D, dev)](
            h_SI, w_down_EID, b2, y_SD, tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, D, I, *w_down_EID.stride(), b2.stride(0), bucket, HAS_BIAS=b_down_ED is not None,
            IEEE=ieee, BLOCK_M=BM,
        )
        BD = min(1024, pow2(D))
        _mk.combine_kernel[(T, triton.cdiv(D, BD))](y_SD, topk_weights_TK.contiguous(), out_TD, T, D, K, HAS_W=True,
                                                     BLOCK_D=BD)
    return out_TD, gate_up_S2I, plan.buf


@moe_experts_gpt_oss_fwd.register_fake
def _(x_TD, w_gate_up_ED2I, w_down_EID, topk_ids_TK, topk_weights_TK, b_gate_up_E2I, b_down_ED, expert_trainable_E,
      pair_trainable_TK, save_for_backward, clamped, alpha, limit):
    T, D = x_TD.shape
    E, _, I2 = w_gate_up_ED2I.shape
    S = T * topk_ids_TK.shape[1]
    return (x_TD.new_empty((T, D)), x_TD.new_empty((S, I2) if save_for_backward else (0, I2)), plan_fake(x_TD, S, E))


@torch.library.custom_op("desmoe::moe_experts_gpt_oss_bwd", mutates_args=())
def moe_experts_gpt_oss_bwd(
    dout_TD: Tensor, x_TD: Tensor, w_gate_up_ED2I: Tensor, w_down_EID: Tensor, topk_ids_TK: Tensor,
    topk_weights_TK: Tensor, b_down_ED: Optional[Tensor], gate_up_S2I: Tensor, plan_buf: Tensor,
    expert_trainable_E: Optional[Tensor], pair_trainable_TK: Optional[Tensor],
    need_dx: bool, need_dw: bool, need_db: bool, need_dweights: bool, clamped: bool, alpha: float, limit: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx_TD, dw_gate_up, dw_down, dweights_TK, db_gate_up (float32), db_down (float32))``; a gradient not
    asked for is an empty tensor."""
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_ED2I, topk_weights_TK)
    I2 = 2 * I
    dev, dt = x_TD.device, x_TD.dtype
    wdt = w_gate_up_ED2I.dtype
    dx_TD = empty((T, D) if need_dx else (0,), dt, dev)
    dw1 = empty(tuple(w_gate_up_ED2I.shape) if need_dw else (0,), wdt, dev)
    dw2 = empty(tuple(w_down_EID.shape) if need_dw else (0,), wdt, dev)
    dweights_TK = empty((T, K) if need_dweights else (0,), topk_weights_TK.dtype, dev)
    db1 = empty((E, I2) if need_db else (0,), torch.float32, dev)
    db2 = empty((E, D) if need_db else (0,), torch.float32, dev)
    outs = (dx_TD, dw1, dw2, dweights_TK, db1, db2)
    if S == 0 or not (need_dx or need_dw or need_db or need_dweights):
        for t in outs:
            t.zero_()
        return outs
    dout_TD = dout_TD.contiguous()
    w_TK = topk_weights_TK.contiguous()
    plan = saved_plan(plan_buf, S, E)
    sorted_pairs_S, offsets_E1 = plan.sorted_pairs_S, plan.offsets_E1
    p = dh_plan(dout_TD, gate_up_S2I, plan, E, I, need_dgu=need_dx or need_dw or need_db, need_dw=need_dw,
                need_dweights=need_dweights, expert_trainable_E=expert_trainable_E,
                pair_trainable_TK=pair_trainable_TK)
    with on_device(x_TD):
        _gk.dh_gpt_oss_kernel[row_grid(_gk.dh_gpt_oss_kernel, p.max_tiles, I, dev)](
            dout_TD, w_down_EID, w_TK, gate_up_S2I, p.dgate_up_S2I, p.hw_SI, p.dwp_NS, p.pm, p.em,
            p.tile_expert, p.tile_row, offsets_E1, sorted_pairs_S,
            E, p.max_tiles, I, D, K, S, p.ndwp, float(alpha), float(limit), p.sd_t, p.sd_d, *w_down_EID.stride(),
            p.bucket, STORE_DGU=need_dx or need_dw or need_db, STORE_HW=need_dw, STORE_DWP=need_dweights,
            HAS_PAIR_MASK=p.has_pm, HAS_EXPERT_MASK=p.has_em and need_dw,
            CLAMPED=bool(clamped), IEEE=p.ieee, DWP_COLS=_mk.DWP_COLS, BLOCK_M=p.BM,
        )
        if need_dweights:
            dweights = p.dwp_NS.sum(0).view(T, K)
            if b_down_ED is not None:  # the down bias is weighted too: d w[t, k] += <dout[t], b_down[ids[t, k]]>
                dweights = dweights + (dout_TD.float() @ b_down_ED.float().t()).gather(1, topk_ids_TK.long())
            dweights_TK.copy_(dweights)
        if need_dx:  # W_gate_up [E, D, 2I]: the GEMM's K (2I) runs along its columns
            se, sd, sj = w_gate_up_ED2I.stride()
            dx_from_dgate_up(p, (se, sj, sd), w_gate_up_ED2I, plan, dx_TD, E, K)
        tok_S, bounds = plan.sorted_tok_S, plan.bounds_E2  # masked pairs lie outside the bounds: no dW or db work
        if need_dw:
            # dW_gate_up[e] [D, 2I] = x[tok]^T d(gate|up): A gathered by token, B sorted rows (dw_down's shape)
            _mk.dw_down_kernel[expert_major_grid(E, D, I2)](
                x_TD, p.dgate_up_S2I, dw1, bounds, tok_S, p.em, D, I2, x_TD.stride(0), x_TD.stride(1),
                p.bucket, HAS_EXPERT_MASK=p.has_em, IEEE=p.ieee,
            )
            # dW_down[e] [I, D] = hw^T dout[tok]: A sorted rows, B gathered by token (dw_gate_up's shape)
            _mk.dw_gate_up_kernel[expert_major_grid(E, I, D)](
                p.hw_SI, dout_TD, dw2, bounds, tok_S, p.em, I, D, p.sd_t, p.sd_d,
                p.bucket, HAS_EXPERT_MASK=p.has_em, IEEE=p.ieee,
            )
        if need_db:
            BR, BN = _BIAS_BLOCKS
            w_sorted_S = w_TK.reshape(-1)[sorted_pairs_S.long()]
            _gk.bias_grad_kernel[(E, triton.cdiv(I2, BN))](
                p.dgate_up_S2I, p.dgate_up_S2I, tok_S, bounds, p.em, db1, I2, I2, 1,
                GATHER=False, HAS_SCALE=False, HAS_EXPERT_MASK=p.has_em, BLOCK_R=BR, BLOCK_N=BN,
            )
            _gk.bias_grad_kernel[(E, triton.cdiv(D, BN))](
                dout_TD, w_sorted_S, tok_S, bounds, p.em, db2, D, p.sd_t, p.sd_d,
                GATHER=True, HAS_SCALE=True, HAS_EXPERT_MASK=p.has_em, BLOCK_R=BR, BLOCK_N=BN,
            )
    return outs


@moe_experts_gpt_oss_bwd.register_fake
def _(dout_TD, x_TD, w_gate_up_ED2I, w_down_EID, topk_ids_TK, topk_weights_TK, b_down_ED, gate_up_S2I, plan_buf,
      expert_trainable_E, pair_trainable_TK, need_dx, need_dw, need_db, need_dweights,
      clamped, alpha, limit):
    T, D = x_TD.shape
    E, _, I2 = w_gate_up_ED2I.shape
    f32 = torch.float32
    return (
        x_TD.new_empty((T, D) if need_dx else (0,)),
        w_gate_up_ED2I.new_empty(tuple(w_gate_up_ED2I.shape) if need_dw else (0,)),
        w_down_EID.new_empty(tuple(w_down_EID.shape) if need_dw else (0,)),
        topk_weights_TK.new_empty(tuple(topk_weights_TK.shape) if need_dweights else (0,)),
        x_TD.new_empty((E, I2) if need_db else (0,), dtype=f32),
        x_TD.new_empty((E, D) if need_db else (0,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    x_TD, w1, w2, ids, w_TK, b1, b2, em, pm, save, clamped, alpha, limit = inputs
    _out, gate_up, plan_buf = output
    ctx.save_for_backward(x_TD, w1, w2, ids, w_TK, b2, gate_up, plan_buf, em, pm)
    ctx.saved_activations = bool(save)
    ctx.act = (bool(clamped), float(alpha), float(limit))
    ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)


def _backward(ctx, dout_TD, *_unused):
    x_TD, w1, w2, ids, w_TK, b2, gate_up, plan_buf, em, pm = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dweights = need[0], need[4]
    need_dw = need[1] or need[2]
    need_db = need[5] or need[6]
    if dout_TD is None or not (need_dx or need_dw or need_db or need_dweights):
        return (None,) * 13
    if not ctx.saved_activations:
        raise RuntimeError("desmoe::moe_experts_gpt_oss_fwd ran without saving activations (save_for_backward=False) "
                           "but a gradient was requested")
    dx, dw1, dw2, dweights, db1, db2 = moe_experts_gpt_oss_bwd(
        dout_TD, x_TD, w1, w2, ids, w_TK, b2, gate_up, plan_buf, em, pm,
        need_dx, need_dw, need_db, need_dweights, *ctx.act)
    dt1, dt2 = ctx.bias_dtypes
    return (dx if need_dx else None, dw1 if need[1] else None, dw2 if need[2] else None, None,
            dweights if need_dweights else None, db1.to(dt1) if need[5] else None, db2.to(dt2) if need[6] else None,
            None, None, None, None, None, None)


moe_experts_gpt_oss_fwd.register_autograd(_backward, setup_context=_setup_context)
# bf16 compute under torch.autocast over fp32 masters: the GEMM operands take the region's dtype; routing weights
# and the biases stay as given (the kernels add them in float32, as stock gpt-oss adds its fp32 biases)
_autocast.register("desmoe::moe_experts_gpt_oss_fwd", ("x_TD", "w_gate_up_ED2I", "w_down_EID"))


def moe_experts_gpt_oss(
    x_TD: Tensor, w_gate_up_ED2I: Tensor, w_down_EID: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    b_gate_up: Tensor | None = None, b_down: Tensor | None = None, activation: str = "clamped_swiglu",
    alpha: float = reference.SWIGLU_ALPHA, limit: float = reference.SWIGLU_LIMIT,
    expert_trainable_E: Tensor | None = None, pair_trainable_TK: Tensor | None = None,
) -> Tensor:
    """gpt-oss's expert MLP with weighted combine on the Triton kernels: ``x [T, D] -> out [T, D]``.

    Layout ``transposed=True, interleaved=True`` of :func:`desmoe.ops.reference.moe_experts_reference`
    (``w_gate_up [E, D, 2I]`` gate in the even / up in the odd columns, ``w_down [E, I, D]``, optional
    ``b_gate_up [E, 2I]`` / ``b_down [E, D]``), ``activation`` ``"clamped_swiglu"`` (``alpha``, ``limit``) or
    ``"silu"``; same masks. x and the weights in one dtype among float32, float16, bfloat16 (the autocast region's
    where one is active), as :func:`desmoe.ops.dispatch.experts_impl` picks this launcher for.
    """
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, w_gate_up_ED2I, w_down_EID, topk_weights_TK, b_gate_up,
                                                    b_down))
    return moe_experts_gpt_oss_fwd(
        x_TD, w_gate_up_ED2I, w_down_EID, topk_ids_TK, topk_weights_TK, b_gate_up, b_down, expert_trainable_E,
        pair_trainable_TK, save, activation == "clamped_swiglu", float(alpha), float(limit))[0]


__all__ = ["moe_experts_gpt_oss", "moe_experts_gpt_oss_fwd", "moe_experts_gpt_oss_bwd"]
