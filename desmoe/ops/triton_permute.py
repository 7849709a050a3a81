"""Triton expert-major permutation: launchers for ``desmoe.kernels.permute`` and the ``desmoe::moe_permute`` op.

    desmoe::moe_permute   ids [T,K] -> sorted_pairs [S] i32, offsets [E+1] i32

:func:`routing_metadata` (histogram -> scan -> stable scatter, plus the experts kernels' row-tile schedule) is what
the experts launchers (:mod:`desmoe.ops.triton_experts`, :mod:`desmoe.ops.triton_gpt_oss`) and the ``grouped_mm``
engine (:mod:`desmoe.ops.grouped`) build their pair order from; :func:`tile_schedule` rebuilds the schedule from
existing offsets (backward). Nothing syncs with the host.
"""
from __future__ import annotations

import torch
import triton

from ..kernels import permute as _pk
from .triton_common import INTERPRET, empty, on_device, pow2

Tensor = torch.Tensor


def _permute_blocks(E: int) -> tuple[int, int]:
    """(pairs per histogram/scatter program, pairs per one-hot sub-chunk): a [SUB, E_PAD] one-hot of ~16K int32
    in registers at a time; BLOCK large so the one-program scan has few rows (interpreter: small, loops run)."""
    if INTERPRET:
        return 32, 16
    sub = max(16, min(1024, 16384 // pow2(E)))
    return max(4096, sub), sub


def _schedule_len(S: int, E: int, BM: int) -> int:
    return triton.cdiv(S, BM) + min(E, S)  # static upper bound on sum(ceil(count_e / BM))


def _scan_launch(hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, BM, from_offsets):
    E_PAD = pow2(E)
    chunk = 4 if INTERPRET else max(1, min(64, 8192 // E_PAD))  # interpreter: small, so the tests run the loops
    _pk.scan_kernel[(1,)](
        hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, BLOCK_M=BM, E_PAD=E_PAD,
        ROWS=chunk, SLOTS=chunk, FROM_OFFSETS=from_offsets,
        num_warps=1 if INTERPRET else 8,
    )


def routing_metadata(topk_ids_TK: Tensor, E: int, BM: int):
    """O(S) permutation metadata (``desmoe.kernels.permute``): histogram -> scan -> stable scatter, no sync.

    Returns ``sorted_pairs_S`` (i32), ``offsets_E1`` (i32), ``sorted_tok_S`` (i32: token of each sorted row),
    ``tile_expert``, ``tile_row`` (i32, the row-tile GEMMs' schedule for ``BLOCK_M = BM``) and its length."""
    dev = topk_ids_TK.device
    K = topk_ids_TK.shape[1] if topk_ids_TK.dim() == 2 else 1
    S = topk_ids_TK.numel()
    max_tiles = _schedule_len(S, E, BM) if BM else 0
    sorted_pairs_S = empty((S,), torch.int32, dev)
    sorted_tok_S = empty((S,), torch.int32, dev)
    offsets_E1 = empty((E + 1,), torch.int32, dev)
    tile_expert = empty((max_tiles,), torch.int32, dev)
    tile_row = empty((max_tiles,), torch.int32, dev)
    if S == 0:
        offsets_E1.zero_()
        return sorted_pairs_S, offsets_E1, sorted_tok_S, tile_expert.fill_(E), tile_row.zero_(), max_tiles
    ids_S = topk_ids_TK.reshape(-1)
    block, sub = _permute_blocks(E)
    NB = triton.cdiv(S, block)
    hist = empty((NB, E), torch.int32, dev)
    nw = 1 if INTERPRET else 8
    with on_device(topk_ids_TK):
        _pk.histogram_kernel[(NB,)](ids_S, hist, S, E, BLOCK=block, SUB=sub, E_PAD=pow2(E), num_warps=nw)
        _scan_launch(hist, offsets_E1, tile_expert, tile_row, NB, E, max_tiles, max(BM, 1), False)
        _pk.scatter_kernel[(NB,)](ids_S, hist, offsets_E1, sorted_pairs_S, sorted_tok_S, S, E, K, BLOCK=block,
                                  SUB=sub, E_PAD=pow2(E), num_warps=nw)
    return sorted_pairs_S, offsets_E1, sorted_tok_S, tile_expert, tile_row, max_tiles


def tile_schedule(offsets_E1: Tensor, S: int, E: int, BM: int):
    """The row-tile schedule rebuilt from existing offsets (backward): one small kernel, no sync."""
    max_tiles = _schedule_len(S, E, BM)
    tile_expert = empty((max_tiles,), torch.int32, offsets_E1.device)
    tile_row = empty((max_tiles,), torch.int32, offsets_E1.device)
    with on_device(offsets_E1):
        _scan_launch(offsets_E1, offsets_E1, tile_expert, tile_row, 0, E, max_tiles, BM, True)
    return tile_expert, tile_row, max_tiles


@torch.library.custom_op("desmoe::moe_permute", mutates_args=())
def moe_permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    sorted_pairs_S, offsets_E1, *_ = routing_metadata(topk_ids_TK, num_experts, 0)
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


__all__ = ["moe_permute", "permute", "routing_metadata", "tile_schedule"]
