"""Triton experts (the standard layout): launchers for ``desmoe.kernels.moe`` wrapped as ``torch.library`` ops.

    desmoe::moe_experts_fwd  x, W_gate_up, W_down, ids, weights (+ masks, saved for backward) -> out [T,D], and
                             what backward needs: the gate|up pre-activation [S,2I] (sorted-pair rows; the
                             only activation kept) and the routing plan (pair order, offsets, tile schedule)
    desmoe::moe_experts_bwd  -> dx, dW_gate_up, dW_down, d weights (masks applied to the dW only)

Each with a fake (meta) impl and ``register_autograd``, so they trace under ``torch.compile(fullgraph=True)`` as
single opaque nodes. Nothing here syncs with the host: the permutation and the GEMM tile schedule
(:mod:`desmoe.ops.triton_permute`) are built on the device and grids are sized from shapes alone. Inputs are
validated by :mod:`desmoe.ops`, and whether a call runs here (variant, dtypes, GEMM engine) is
:mod:`desmoe.ops.dispatch`'s rule, before they arrive: :func:`moe_experts` only launches.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ..kernels import moe as _mk
from . import _autocast
from .triton_common import INTERPRET, block_m, empty, mask_u8, on_device, pow2, row_grid, rows_bucket, use_tma
from .triton_permute import RoutingPlan, plan_len, routing_metadata, unpack_plan

Tensor = torch.Tensor


def _dims(x_TD: Tensor, w_gate_up_E2ID: Tensor, pairs_TK: Tensor) -> tuple[int, int, int, int, int, int]:
    """``T, D, E, I, K, S`` (S = T·K pairs) of an experts call."""
    T, D = x_TD.shape
    E, I2, _ = w_gate_up_E2ID.shape
    K = pairs_TK.shape[1]
    return T, D, E, I2 // 2, K, T * K


class DhPlan(NamedTuple):
    """What both experts backward launchers (standard and gpt-oss) set up around their dh kernel."""
    BM: int
    bucket: int
    ieee: bool
    sd_t: int
    sd_d: int
    tile_expert: Tensor
    tile_row: Tensor
    max_tiles: int
    dgate_up_S2I: Tensor
    hw_SI: Tensor
    ndwp: int
    dwp_NS: Tensor
    em: Tensor
    pm: Tensor
    has_em: bool
    has_pm: bool


def saved_plan(plan_buf: Tensor, S: int, E: int) -> RoutingPlan:
    """The forward's routing plan, as its backward reads it (the same row-tile height: one rule for both)."""
    return unpack_plan(plan_buf, S, E, block_m(S, E))


def plan_fake(x_TD: Tensor, S, E: int) -> Tensor:
    """The fake (meta) routing plan a forward op returns."""
    return x_TD.new_empty((plan_len(S, E, block_m(S, E)),), dtype=torch.int32)


def dh_plan(dout_TD: Tensor, gate_up_S2I: Tensor, plan: RoutingPlan, E: int, I: int, *, need_dgu: bool,
            need_dw: bool, need_dweights: bool, expert_trainable_E: Optional[Tensor],
            pair_trainable_TK: Optional[Tensor]) -> DhPlan:
    """Output buffers and mask views of the dh kernels (``dout_TD`` contiguous), on the forward's tile schedule."""
    S, I2 = gate_up_S2I.shape
    dt, dev = gate_up_S2I.dtype, gate_up_S2I.device
    offsets_E1 = plan.offsets_E1
    # d w[p] = <dout[t], h_p W_down[e]^T> = <dout[t] W_down[e], h_p>: partial dots per DWP_COLS columns of the
    # dh GEMM, written in full by every autotune config (so the first call is right), summed in a fixed order:
    # deterministic, and y is never kept
    ndwp = triton.cdiv(I, _mk.DWP_COLS) if need_dweights else 1
    return DhPlan(
        plan.BM, rows_bucket(S, E), dt == torch.float32 or INTERPRET, *dout_TD.stride(), plan.tile_expert,
        plan.tile_row, plan.max_tiles,
        empty((S, I2), dt, dev) if need_dgu else gate_up_S2I, empty((S, I), dt, dev) if need_dw else gate_up_S2I,
        ndwp, empty((ndwp, S) if need_dweights else (1, 1), torch.float32, dev),
        mask_u8(expert_trainable_E, offsets_E1), mask_u8(pair_trainable_TK, offsets_E1),
        expert_trainable_E is not None, pair_trainable_TK is not None)


def dx_from_dgate_up(p: DhPlan, w_strides: tuple[int, int, int], w: Tensor, plan: RoutingPlan, dx_TD: Tensor,
                     E: int, K: int) -> None:
    """``dx_TD = sum_k d(gate|up)[row] @ W_gate_up[e]`` (``w_strides``: expert, GEMM-K (2I) and D strides of
    ``w`` in the roles dx_kernel reads them), per pair and then combined in a fixed order."""
    (S, I2), (T, D) = p.dgate_up_S2I.shape, dx_TD.shape
    dxp_SD = empty((S, D), dx_TD.dtype, dx_TD.device)
    _mk.dx_kernel[row_grid(_mk.dx_kernel, p.max_tiles, D, dx_TD.device)](
        p.dgate_up_S2I, w, dxp_SD, p.tile_expert, p.tile_row, plan.offsets_E1, plan.sorted_pairs_S,
        E, p.max_tiles, D, I2, *w_strides, p.bucket, IEEE=p.ieee, USE_TMA=use_tma(w, w_strides), BLOCK_M=p.BM,
    )
    BD = min(1024, pow2(D))
    _mk.combine_kernel[(T, triton.cdiv(D, BD))](dxp_SD, dxp_SD, dx_TD, T, D, K, HAS_W=False, BLOCK_D=BD)


def expert_major_grid(E: int, a: int, b: int):
    """dW kernels' grid: all ``[a, b]`` output tiles of expert 0, then expert 1, ..."""
    return lambda meta: (E * triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"]),)


@torch.library.custom_op("desmoe::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor,
    expert_trainable_E: Optional[Tensor], pair_trainable_TK: Optional[Tensor], save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_E2ID, topk_ids_TK)
    I2 = 2 * I
    dev, dt = x_TD.device, x_TD.dtype
    plan = routing_metadata(topk_ids_TK, E, block_m(S, E), pair_trainable_TK)
    tile_expert, tile_row, max_tiles = plan.tile_expert, plan.tile_row, plan.max_tiles
    sorted_pairs_S, offsets_E1 = plan.sorted_pairs_S, plan.offsets_E1
    gate_up_S2I = empty((S, I2) if save_for_backward else (0, I2), dt, dev)
    out_TD = empty((T, D), dt, dev)
    if S == 0:
        out_TD.zero_()
        return out_TD, gate_up_S2I, plan.buf
    # transient: h (sorted rows) and the unweighted expert outputs y (pair rows); neither is kept for backward
    h_SI = empty((S, I), dt, dev)
    y_SD = empty((S, D), dt, dev)
    w_TK = topk_weights_TK.contiguous()
    bucket = rows_bucket(S, E)
    ieee = dt == torch.float32 or INTERPRET
    with on_device(x_TD):
        _mk.up_swiglu_kernel[row_grid(_mk.up_swiglu_kernel, max_tiles, I, dev)](
            x_TD, w_gate_up_E2ID, gate_up_S2I if save_for_backward else h_SI, h_SI,
            tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, I, D, K,
            x_TD.stride(0), x_TD.stride(1), *w_gate_up_E2ID.stride(),
            bucket, STORE_GATE_UP=save_for_backward, IEEE=ieee, USE_TMA=use_tma(w_gate_up_E2ID), BLOCK_M=plan.BM,
        )
        _mk.down_kernel[row_grid(_mk.down_kernel, max_tiles, D, dev)](
            h_SI, w_down_EDI, y_SD, tile_expert, tile_row, offsets_E1, sorted_pairs_S,
            E, max_tiles, D, I, *w_down_EDI.stride(), bucket, IEEE=ieee, USE_TMA=use_tma(w_down_EDI),
            BLOCK_M=plan.BM,
        )
        BD = min(1024, pow2(D))
        _mk.combine_kernel[(T, triton.cdiv(D, BD))](y_SD, w_TK, out_TD, T, D, K, HAS_W=True, BLOCK_D=BD)
    return out_TD, gate_up_S2I, plan.buf


@moe_experts_fwd.register_fake
def _(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, expert_trainable_E, pair_trainable_TK,
      save_for_backward):
    T, D = x_TD.shape
    E, I2, _ = w_gate_up_E2ID.shape
    S = T * topk_ids_TK.shape[1]
    return (
        x_TD.new_empty((T, D)),
        x_TD.new_empty((S, I2) if save_for_backward else (0, I2)),
        plan_fake(x_TD, S, E),
    )


@torch.library.custom_op("desmoe::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(
    dout_TD: Tensor, x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_weights_TK: Tensor,
    gate_up_S2I: Tensor, plan_buf: Tensor,
    expert_trainable_E: Optional[Tensor], pair_trainable_TK: Optional[Tensor],
    need_dx: bool, need_dw: bool, need_dweights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, D, E, I, K, S = _dims(x_TD, w_gate_up_E2ID, topk_weights_TK)
    I2 = 2 * I
    dev, dt = x_TD.device, x_TD.dtype
    wdt = w_gate_up_E2ID.dtype
    dx_TD = empty((T, D) if need_dx else (0,), dt, dev)
    dw1 = empty(tuple(w_gate_up_E2ID.shape) if need_dw else (0,), wdt, dev)
    dw2 = empty(tuple(w_down_EDI.shape) if need_dw else (0,), wdt, dev)
    dweights_TK = empty((T, K) if need_dweights else (0,), topk_weights_TK.dtype, dev)
    if S == 0 or not (need_dx or need_dw or need_dweights):
        for t in (dx_TD, dw1, dw2, dweights_TK):
            t.zero_()
        return dx_TD, dw1, dw2, dweights_TK
    w_TK = topk_weights_TK.contiguous()
    plan = saved_plan(plan_buf, S, E)
    sorted_pairs_S, offsets_E1 = plan.sorted_pairs_S, plan.offsets_E1
    p = dh_plan(dout_TD, gate_up_S2I, plan, E, I, need_dgu=need_dx or need_dw, need_dw=need_dw,
                need_dweights=need_dweights, expert_trainable_E=expert_trainable_E,
                pair_trainable_TK=pair_trainable_TK)
    with on_device(x_TD):
        _mk.dh_swiglu_kernel[row_grid(_mk.dh_swiglu_kernel, p.max_tiles, I, dev)](
            dout_TD, w_down_EDI, w_TK, gate_up_S2I, p.dgate_up_S2I, p.hw_SI, p.dwp_NS, p.pm, p.em,
            p.tile_expert, p.tile_row, offsets_E1, sorted_pairs_S,
            E, p.max_tiles, I, D, K, S, p.ndwp, p.sd_t, p.sd_d, *w_down_EDI.stride(), p.bucket,
            STORE_DGU=need_dx or need_dw, STORE_HW=need_dw, STORE_DWP=need_dweights, HAS_PAIR_MASK=p.has_pm,
            HAS_EXPERT_MASK=p.has_em and need_dw, IEEE=p.ieee,
            DWP_COLS=_mk.DWP_COLS, USE_TMA=use_tma(w_down_EDI), BLOCK_M=p.BM,
        )
        if need_dweights:
            dweights_TK.copy_(p.dwp_NS.sum(0).view(T, K))
        if need_dx:
            dx_from_dgate_up(p, w_gate_up_E2ID.stride(), w_gate_up_E2ID, plan, dx_TD, E, K)
        if need_dw:  # pairs masked by pair_trainable lie outside each expert's dW bounds: no dW work for them
            _mk.dw_gate_up_kernel[expert_major_grid(E, I2, D)](
                p.dgate_up_S2I, x_TD, dw1, plan.bounds_E2, plan.sorted_tok_S, p.em, I2, D, *x_TD.stride(),
                p.bucket, HAS_EXPERT_MASK=p.has_em, IEEE=p.ieee,
            )
            _mk.dw_down_kernel[expert_major_grid(E, D, I)](
                dout_TD, p.hw_SI, dw2, plan.bounds_E2, plan.sorted_tok_S, p.em, D, I, p.sd_t, p.sd_d,
                p.bucket, HAS_EXPERT_MASK=p.has_em, IEEE=p.ieee,
            )
    return dx_TD, dw1, dw2, dweights_TK


@moe_experts_bwd.register_fake
def _(dout_TD, x_TD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK, gate_up_S2I, plan_buf, expert_trainable_E,
      pair_trainable_TK, need_dx, need_dw, need_dweights):
    T, D = x_TD.shape
    return (
        x_TD.new_empty((T, D) if need_dx else (0,)),
        w_gate_up_E2ID.new_empty(tuple(w_gate_up_E2ID.shape) if need_dw else (0,)),
        w_down_EDI.new_empty(tuple(w_down_EDI.shape) if need_dw else (0,)),
        topk_weights_TK.new_empty(tuple(topk_weights_TK.shape) if need_dweights else (0,)),
    )


def _experts_setup_context(ctx, inputs, output):
    x_TD, w1, w2, _ids, w_TK, em, pm, save = inputs
    _out, gate_up, plan_buf = output
    ctx.save_for_backward(x_TD, w1, w2, w_TK, gate_up, plan_buf, em, pm)
    ctx.saved_activations = bool(save)


def _experts_backward(ctx, dout_TD, *_unused):
    x_TD, w1, w2, w_TK, gate_up, plan_buf, em, pm = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_dweights = ctx.needs_input_grad[4]
    if dout_TD is None or not (need_dx or need_dw or need_dweights):
        return (None,) * 8
    if not ctx.saved_activations:
        raise RuntimeError("desmoe::moe_experts_fwd ran without saving activations (save_for_backward=False) "
                           "but a gradient was requested")
    dx, dw1, dw2, dweights = moe_experts_bwd(
        dout_TD, x_TD, w1, w2, w_TK, gate_up, plan_buf, em, pm, need_dx, need_dw, need_dweights
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



def moe_experts(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    expert_trainable_E: Tensor | None = None, pair_trainable_TK: Tensor | None = None,
) -> Tensor:
    """SwiGLU expert MLP with weighted combine on the Triton kernels: ``x [T, D] -> out [T, D]``.

    Same contract as :func:`desmoe.ops.reference.moe_experts_reference` with ``activation="silu"``; x and the
    weights in one dtype among float32, float16, bfloat16 (the autocast region's where one is active), as
    :func:`desmoe.ops.dispatch.experts_impl` picks this launcher for. Activations are saved only when a gradient
    may be asked for.
    """
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK)
    )
    return moe_experts_fwd(
        x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, expert_trainable_E, pair_trainable_TK, save
    )[0]


__all__ = ["moe_experts", "moe_experts_fwd", "moe_experts_bwd"]
