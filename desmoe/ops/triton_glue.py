"""Launchers of :mod:`desmoe.kernels.glue`: the ``grouped_mm`` engine's SwiGLU forward, its backward epilogue and
the zeroing of dW slices, one pass each (the eager PyTorch they replace stays in :mod:`desmoe.ops.reference`, the
oracle of their tests). They only launch: shapes and dtypes are the engine's (``desmoe.ops.grouped``)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels import glue as _gk
from .triton_common import INTERPRET, Tensor, empty, on_device, pow2

# (BLOCK_S, BLOCK_N) of the two SwiGLU kernels: 8 KB-ish tiles on a GPU, small in the interpreter (tests pass their
# own to cover more than one chunking of N, the only thing a result could depend on: the routing-weight dot's order)
SWIGLU_BLOCKS = (16, 32) if INTERPRET else (32, 128)


def swiglu_forward(gu_SN2: Tensor, blocks: Optional[tuple[int, int]] = None) -> Tensor:
    """``h[s] = silu(g[s]) * u[s]`` for ``gu = [g | u]`` rows ([S, 2N], contiguous) -> [S, N] in gu's dtype."""
    S, N = gu_SN2.shape[0], gu_SN2.shape[1] // 2
    bs, bn = blocks or SWIGLU_BLOCKS
    bn = min(bn, pow2(N))
    h = empty((S, N), gu_SN2.dtype, gu_SN2.device)
    if S:
        with on_device(gu_SN2):
            _gk.swiglu_fwd_kernel[(triton.cdiv(S, bs), triton.cdiv(N, bn))](gu_SN2, h, S, N, BLOCK_S=bs, BLOCK_N=bn)
    return h


def swiglu_backward(dhu_SN: Tensor, gu_SN2: Tensor, sorted_pairs_S: Tensor, weights_P: Tensor,
                    pair_mask_P: Optional[Tensor], blocks: Optional[tuple[int, int]] = None):
    """The dh epilogue on sorted pair rows. ``dhu_SN``: ``dout[tok] @ W_down[e]`` ([S, N]); ``gu_SN2`` the saved
    gate|up; ``sorted_pairs_S`` int32 pair index of each row; ``weights_P`` float32 routing weights [T*K];
    ``pair_mask_P`` uint8 [T*K] or None. Returns ``(dgu [S, 2N], hw [S, N])`` in gu's dtype and ``dweights``
    float32 [T*K] (every pair row is some sorted row, so every element is written)."""
    S, N = dhu_SN.shape
    bs, bn = blocks or SWIGLU_BLOCKS
    bn = min(bn, pow2(N))
    dt, dev = gu_SN2.dtype, gu_SN2.device
    dgu, hw = empty((S, 2 * N), dt, dev), empty((S, N), dt, dev)
    dwp = empty((weights_P.numel(),), weights_P.dtype, dev)
    if S:
        with on_device(gu_SN2):
            _gk.swiglu_bwd_kernel[(triton.cdiv(S, bs),)](
                dhu_SN, gu_SN2, sorted_pairs_S, weights_P, weights_P if pair_mask_P is None else pair_mask_P,
                dgu, hw, dwp, S, N, HAS_PAIR_MASK=pair_mask_P is not None, BLOCK_S=bs, BLOCK_N=bn)
    return dgu, hw, dwp


def zero_experts_(dw_E: Tensor, keep_E: Tensor, block: int = 4096) -> Tensor:
    """``dw_E[e] = 0`` in place where ``keep_E[e]`` (uint8/bool, [E]) is 0; only those slices are written."""
    E = dw_E.shape[0]
    numel = dw_E[0].numel() if E else 0
    if numel:
        block = min(block, pow2(numel))
        programs = max(1, min(triton.cdiv(numel, block), 3 if INTERPRET else 256))
        with on_device(dw_E):
            _gk.zero_experts_kernel[(E, programs)](dw_E, keep_E.contiguous().view(torch.uint8), numel, programs,
                                                   BLOCK=block)
    return dw_E
