"""Triton expert-major permutation: launchers for ``desmoe.kernels.permute`` and the ``desmoe::moe_permute`` op.

    desmoe::moe_permute   ids [T,K] -> sorted_pairs [S] i32, offsets [E+1] i32

:func:`routing_metadata` (histogram -> scan -> offsets and the experts kernels' row-tile schedule -> stable
scatter) is what the experts launchers (:mod:`desmoe.ops.triton_experts`, :mod:`desmoe.ops.triton_gpt_oss`) and the
``grouped_mm`` engine (:mod:`desmoe.ops.grouped`) build their pair order from. It returns a :class:`RoutingPlan`:
views into one int32 buffer that a forward op saves for its backward, so the plan is computed once per step (the
backward reuses its tile schedule: both passes run one row-tile height, :func:`desmoe.ops.triton_common.block_m`).
Nothing syncs with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ..kernels import permute as _pk
from .triton_common import INTERPRET, empty, on_device, pow2

Tensor = torch.Tensor


# pairs per histogram/scatter program: 512 on a GPU (512 programs at T = 32768, K = 8; a block sort of 512 keys in
# registers), 32 in the interpreter so the tests run several blocks
PERMUTE_BLOCK = 32 if INTERPRET else 512
PERMUTE_WARPS = 1 if INTERPRET else 4


def _schedule_len(S: int, E: int, BM: int) -> int:
    return triton.cdiv(S, BM) + min(E, S)  # static upper bound on sum(ceil(count_e / BM))


def _segments(S: int, E: int, BM: int) -> list:
    """Lengths of the plan's parts (sorted pairs, their tokens, offsets, dW bounds, tile experts, tile rows), each
    padded to a multiple of 32 entries: every part starts as aligned as the buffer (128 B) whatever S is, so the
    kernels never see a differently aligned pointer (Triton specializes pointers on 16-byte alignment: a new T
    would recompile)."""
    M = _schedule_len(S, E, BM) if BM else 0
    return [S, S, E + 1, 2 * E, M, M]


def _padded(n):
    return (n + 31) // 32 * 32


def plan_len(S: int, E: int, BM: int) -> int:
    """Length of the int32 routing plan buffer."""
    return sum(_padded(n) for n in _segments(S, E, BM))


class RoutingPlan(NamedTuple):
    """Views into one int32 buffer (``buf``), so a forward op hands the whole plan to its backward as one tensor:
    computed once per step, never rebuilt."""
    buf: Tensor
    sorted_pairs_S: Tensor
    sorted_tok_S: Tensor
    offsets_E1: Tensor
    bounds_E2: Tensor
    tile_expert: Tensor
    tile_row: Tensor
    max_tiles: int
    BM: int


def unpack_plan(buf: Tensor, S: int, E: int, BM: int) -> RoutingPlan:
    """The views of a plan buffer written by :func:`routing_metadata` with the same ``S, E, BM``."""
    if buf.numel() != plan_len(S, E, BM):
        raise ValueError(f"routing plan: {buf.numel()} entries, expected {plan_len(S, E, BM)} for S={S}, E={E}, "
                         f"BLOCK_M={BM}")
    seg = _segments(S, E, BM)
    parts = torch.split(buf, [_padded(n) for n in seg])
    sp, tok, off, bounds, te, tr = (p[:n] for p, n in zip(parts, seg))
    return RoutingPlan(buf, sp, tok, off, bounds, te, tr, seg[4], BM)


def routing_metadata(topk_ids_TK: Tensor, E: int, BM: int, keep_TK: Optional[Tensor] = None) -> RoutingPlan:
    """O(S) permutation metadata (``desmoe.kernels.permute``): histogram -> per-bucket scan over blocks -> offsets
    and row-tile schedule -> stable scatter; 4 launches, no sync.

    The plan holds ``sorted_pairs_S`` (i32), ``sorted_tok_S`` (i32: token of each sorted row), ``offsets_E1``
    (i32), ``bounds_E2`` (i32: each expert's rows the dW GEMMs read, ``[start, start + kept)``) and, for ``BM`` >
    0, the row-tile GEMMs' schedule for ``BLOCK_M = BM`` (``tile_expert``, ``tile_row``, ``max_tiles`` slots).
    ``keep_TK`` (bool, a pair mask): each expert's kept pairs come first (in pair order), then its masked ones;
    without it the order is the stable expert-major one and every row is kept."""
    dev = topk_ids_TK.device
    K = topk_ids_TK.shape[1] if topk_ids_TK.dim() == 2 else 1
    S = topk_ids_TK.numel()
    plan = unpack_plan(empty((plan_len(S, E, BM),), torch.int32, dev), S, E, BM)
    if S == 0:
        plan.offsets_E1.zero_()
        plan.bounds_E2.zero_()
        plan.tile_expert.fill_(E)
        plan.tile_row.zero_()
        return plan
    ids_S = topk_ids_TK.reshape(-1)
    keep_S = ids_S if keep_TK is None else keep_TK.reshape(-1).contiguous().view(torch.uint8)
    NC = E if keep_TK is None else 2 * E  # buckets: experts, or (expert, masked) pairs
    block = PERMUTE_BLOCK
    NB = triton.cdiv(S, block)
    E_PAD, NC_PAD = pow2(E), pow2(NC)
    hist = empty((NB, NC), torch.int32, dev)
    counts_C = empty((NC,), torch.int32, dev)
    nw = PERMUTE_WARPS
    ecols = 4 if INTERPRET else 16  # interpreter: small, so several programs of each kernel run
    slots = 4 if INTERPRET else max(16, min(256, 8192 // E_PAD))
    with on_device(topk_ids_TK):
        _pk.histogram_kernel[(NB,)](ids_S, keep_S, hist, S, NC, BLOCK=block, E_PAD=NC_PAD,
                                    HAS_KEEP=keep_TK is not None, num_warps=nw)
        _pk.block_scan_kernel[(triton.cdiv(NC, ecols),)](hist, counts_C, NB, NC, ROWS=4 if INTERPRET else 64,
                                                          ECOLS=ecols, num_warps=nw)
        _pk.schedule_kernel[(max(1, triton.cdiv(plan.max_tiles, slots)),)](
            counts_C, plan.offsets_E1, plan.bounds_E2, plan.tile_expert, plan.tile_row, E, plan.max_tiles,
            BLOCK_M=max(BM, 1), E_PAD=E_PAD, SLOTS=slots, PAIRED=keep_TK is not None, num_warps=nw)
        _pk.scatter_kernel[(NB,)](ids_S, keep_S, hist, counts_C, plan.sorted_pairs_S, plan.sorted_tok_S, S, NC, K,
                                  BLOCK=block, LOG_BLOCK=block.bit_length() - 1, E_PAD=NC_PAD,
                                  HAS_KEEP=keep_TK is not None, num_warps=nw)
    return plan


@torch.library.custom_op("desmoe::moe_permute", mutates_args=())
def moe_permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    plan = routing_metadata(topk_ids_TK, num_experts, 0)
    return plan.sorted_pairs_S, plan.offsets_E1.clone()  # outputs may not alias one another: E+1 ints copied


@moe_permute.register_fake
def _(topk_ids_TK, num_experts):
    S = topk_ids_TK.numel()
    return (topk_ids_TK.new_empty((S,), dtype=torch.int32),
            topk_ids_TK.new_empty((num_experts + 1,), dtype=torch.int32))


def permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert-major, stable pair order (int64, as the reference) and ``offsets_E1`` (int32); no host sync."""
    sorted_pairs_S, offsets_E1 = moe_permute(topk_ids_TK, int(num_experts))
    return sorted_pairs_S.long(), offsets_E1


__all__ = ["RoutingPlan", "moe_permute", "permute", "plan_len", "routing_metadata", "unpack_plan"]
