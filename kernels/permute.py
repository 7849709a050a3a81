"""O(S) routing metadata: expert-major permutation, expert offsets and the GEMM tile schedule.

Three deterministic passes over the S = T*K (token, slot) pairs, no atomics, no host sync (grids are sized from
shapes alone, so the sequence is CUDA-graph safe):

- ``histogram_kernel``: program ``b`` counts its ``BLOCK`` pairs per expert -> ``hist [NB, E]`` (BLOCK is large,
  4096 on GPU, so the single-program scan below has few rows: NB = 64 at S = 262144).
- ``scan_kernel``: one program turns the counts into, per (block, expert), the number of earlier pairs of that
  expert (in place), the expert offsets ``offsets [E+1]``, and the tile schedule of the row-tile GEMMs (for
  every slot of the statically sized schedule: its expert, E for an unused slot, and its first sorted row).
- ``scatter_kernel``: program ``b`` ranks each of its pairs among the block's pairs of the same expert and
  writes it to ``offsets[e] + hist[b, e] + rank``: a stable, expert-major order, plus the token of every sorted
  row (``pair // K``) that the dW kernels gather through.

Work is O(S·E_PAD / lanes) in registers (one-hot compares over ``SUB``-pair chunks) plus O(NB·E) for the scan,
against the former one-program-per-expert scan of all S pairs (O(E·S) reads).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["S"])
def histogram_kernel(ids_ptr, hist_ptr, S, E, BLOCK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Program ``b`` counts pairs [b*BLOCK, (b+1)*BLOCK) per expert, SUB pairs (a [SUB, E_PAD] one-hot) at a time."""
    b = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for s0 in range(0, BLOCK, SUB):
        offs = b * BLOCK + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=E_PAD).to(tl.int32)  # padding matches no expert
        counts += tl.sum((ids[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + b.to(tl.int64) * E + cols, counts, mask=cols < E)


@triton.jit(do_not_specialize=["NB", "MAX_TILES"])
def scan_kernel(hist_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, NB, E, MAX_TILES,
                BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr, SLOTS: tl.constexpr,
                FROM_OFFSETS: tl.constexpr):
    """With FROM_OFFSETS the counts come from existing offsets and only the tile schedule is written (backward
    rebuilds its schedule from the forward's offsets this way)."""
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    if FROM_OFFSETS:
        starts = tl.load(offsets_ptr + cols, mask=cmask, other=0)
        counts = tl.load(offsets_ptr + cols + 1, mask=cmask, other=0) - starts
    else:
        # column-wise exclusive prefix over blocks: hist[b, e] <- pairs of expert e in blocks before b
        carry = tl.zeros([E_PAD], tl.int32)
        r = tl.arange(0, ROWS)
        for b0 in range(0, NB, ROWS):
            rb = b0 + r
            m = (rb < NB)[:, None] & cmask[None, :]
            ptrs = hist_ptr + rb[:, None].to(tl.int64) * E + cols[None, :]
            h = tl.load(ptrs, mask=m, other=0)
            incl = tl.cumsum(h, axis=0)
            tl.store(ptrs, carry[None, :] + incl - h, mask=m)
            carry += tl.sum(h, axis=0)
        counts = carry
        starts = tl.cumsum(counts, axis=0) - counts  # exclusive prefix over experts
        tl.store(offsets_ptr + cols, starts, mask=cmask)
        tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    # tile schedule: expert e owns ceil(count_e / BLOCK_M) consecutive slots
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    tile_start = tile_end - tiles
    s = tl.arange(0, SLOTS)
    for p0 in range(0, MAX_TILES, SLOTS):
        slot = p0 + s
        # expert of the slot: number of experts whose tiles end at or before it (E: an unused slot)
        ex = tl.sum(((tile_end[None, :] <= slot[:, None]) & cmask[None, :]).to(tl.int32), axis=1)
        hit = cols[None, :] == ex[:, None]
        row = tl.sum(tl.where(hit, starts[None, :] + (slot[:, None] - tile_start[None, :]) * BLOCK_M, 0), axis=1)
        smask = slot < MAX_TILES
        tl.store(tile_expert_ptr + slot, ex, mask=smask)
        tl.store(tile_row_ptr + slot, row, mask=smask)


@triton.jit(do_not_specialize=["S"])
def scatter_kernel(ids_ptr, hist_ptr, offsets_ptr, sorted_pairs_ptr, sorted_tok_ptr, S, E, TOP_K,
                   BLOCK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Program ``b`` places its pairs at ``offsets[e] + hist[b, e] + rank``, SUB pairs at a time, the rank among
    the block's earlier pairs of the same expert carried across sub-chunks (stable)."""
    b = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    base = tl.load(hist_ptr + b.to(tl.int64) * E + cols, mask=cols < E, other=0)
    base += tl.load(offsets_ptr + cols, mask=cols < E, other=0)
    for s0 in range(0, BLOCK, SUB):
        offs = b * BLOCK + s0 + tl.arange(0, SUB)
        valid = offs < S
        ids = tl.load(ids_ptr + offs, mask=valid, other=E_PAD).to(tl.int32)
        onehot = (ids[:, None] == cols[None, :]).to(tl.int32)
        rank = tl.sum(tl.where(onehot != 0, tl.cumsum(onehot, axis=0) - 1, 0), axis=1)
        dest = tl.sum(onehot * base[None, :], axis=1) + rank
        tl.store(sorted_pairs_ptr + dest, offs, mask=valid)
        tl.store(sorted_tok_ptr + dest, offs // TOP_K, mask=valid)
        base += tl.sum(onehot, axis=0)
