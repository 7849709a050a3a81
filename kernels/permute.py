"""O(S) routing metadata: expert-major permutation, expert offsets and the GEMM tile schedule.

Four deterministic passes over the S = T*K (token, slot) pairs, no atomics in global memory, no host sync (grids
are sized from shapes alone, so the sequence is CUDA-graph safe):

- ``histogram_kernel``: program ``b`` counts its ``BLOCK`` pairs per expert (``tl.histogram``) -> ``hist [NB, E]``.
  BLOCK is small (512 on GPU), so there are many programs: NB = 512 at T = 32768, K = 8.
- ``block_scan_kernel``: one program per ``ECOLS`` experts turns its columns of ``hist`` into, per (block, expert),
  the number of earlier pairs of that expert (in place) and writes each expert's total to ``counts [E]``.
- ``schedule_kernel``: one program per ``SLOTS`` slots of the row-tile GEMMs' schedule: every program derives the
  expert offsets from ``counts`` (an E-wide prefix sum in registers), program 0 writes ``offsets [E+1]`` and the
  dW row bounds ``[E, 2]``, and each writes its slots' expert (E for an unused slot) and first sorted row.
- ``scatter_kernel``: program ``b`` sorts its pairs' ``(expert, index)`` keys (``tl.sort``: a stable order, as the
  index breaks ties); a pair's rank among the block's pairs of its expert is its sorted position minus the
  block's exclusive prefix of expert counts, and it lands at ``offsets[e] + hist[b, e] + rank`` (one gather of an
  E-wide vector). It also writes the token of every sorted row (``pair // K``) that the dW kernels gather through.

With a pair mask (DES-MoE's per-token masks, known at the forward) the passes run over 2E buckets, ``2*expert +
(pair masked)``: each expert's rows are its kept pairs then its masked ones, and the dW GEMMs stop at the kept
rows' end (``bounds[e] = [start, start + kept]``), so masked pairs cost no dW work; dX and the forward read every
row as before.

Work per pair is O(log² BLOCK) (the block sort) plus O(1) elsewhere; the scan is O(NB·E) and the schedule
O(max_tiles·E / lanes), both spread over many programs. The former kernels did O(E) one-hot compares per pair in
64 programs and built the schedule in one program.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _buckets(ids_ptr, keep_ptr, offs, valid, other, HAS_KEEP: tl.constexpr):
    """The bucket of each pair: its expert, or with HAS_KEEP ``2*expert + (pair not kept)``, so an expert's kept
    (trainable) pairs sort before its masked ones; ``other`` for padding."""
    ids = tl.load(ids_ptr + offs, mask=valid, other=other).to(tl.int32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offs, mask=valid, other=1)
        ids = tl.where(valid, 2 * ids + (keep == 0).to(tl.int32), other)
    return ids


@triton.jit(do_not_specialize=["S"])
def histogram_kernel(ids_ptr, keep_ptr, hist_ptr, S, NB_COLS, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
                     HAS_KEEP: tl.constexpr):
    """Program ``b`` counts pairs [b*BLOCK, (b+1)*BLOCK) per bucket (``NB_COLS`` of them, ``_buckets``)."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    ids = _buckets(ids_ptr, keep_ptr, offs, valid, 0, HAS_KEEP)
    counts = tl.histogram(ids, E_PAD, mask=valid)
    cols = tl.arange(0, E_PAD)
    tl.store(hist_ptr + b.to(tl.int64) * NB_COLS + cols, counts, mask=cols < NB_COLS)


@triton.jit(do_not_specialize=["NB"])
def block_scan_kernel(hist_ptr, counts_ptr, NB, E, ROWS: tl.constexpr, ECOLS: tl.constexpr):
    """Column-wise exclusive prefix over blocks for experts [pid*ECOLS, (pid+1)*ECOLS): ``hist[b, e]`` <- pairs of
    expert e in blocks before b; ``counts[e]`` <- all of expert e's pairs."""
    cols = tl.program_id(0) * ECOLS + tl.arange(0, ECOLS)
    cmask = cols < E
    carry = tl.zeros([ECOLS], tl.int32)
    r = tl.arange(0, ROWS)
    for b0 in range(0, NB, ROWS):
        rb = b0 + r
        m = (rb < NB)[:, None] & cmask[None, :]
        ptrs = hist_ptr + rb[:, None].to(tl.int64) * E + cols[None, :]
        h = tl.load(ptrs, mask=m, other=0)
        incl = tl.cumsum(h, axis=0)
        tl.store(ptrs, carry[None, :] + incl - h, mask=m)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + cols, carry, mask=cmask)


@triton.jit
def _expert_starts(counts_ptr, cols, cmask):
    """(first sorted row, pair count) of every bucket, from ``counts``: an exclusive prefix over buckets."""
    counts = tl.load(counts_ptr + cols, mask=cmask, other=0)
    return tl.cumsum(counts, axis=0) - counts, counts


@triton.jit(do_not_specialize=["MAX_TILES"])
def schedule_kernel(counts_ptr, offsets_ptr, bounds_ptr, tile_expert_ptr, tile_row_ptr, E, MAX_TILES,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, SLOTS: tl.constexpr, PAIRED: tl.constexpr):
    """Slots [pid*SLOTS, (pid+1)*SLOTS) of the row-tile schedule: expert e owns ceil(count_e / BLOCK_M)
    consecutive slots. Program 0 also writes the expert offsets and the dW row bounds ``[start_e, start_e +
    kept_e]`` per expert (PAIRED: ``counts`` holds (kept, masked) bucket pairs per expert; else kept = all)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    if PAIRED:
        kept = tl.load(counts_ptr + 2 * cols, mask=cmask, other=0)
        counts = kept + tl.load(counts_ptr + 2 * cols + 1, mask=cmask, other=0)
    else:
        counts = tl.load(counts_ptr + cols, mask=cmask, other=0)
        kept = counts
    starts = tl.cumsum(counts, axis=0) - counts  # exclusive prefix over experts
    if pid == 0:
        tl.store(offsets_ptr + cols, starts, mask=cmask)
        tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
        tl.store(bounds_ptr + 2 * cols, starts, mask=cmask)
        tl.store(bounds_ptr + 2 * cols + 1, starts + kept, mask=cmask)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    tile_start = tile_end - tiles
    slot = pid * SLOTS + tl.arange(0, SLOTS)
    # expert of the slot: number of experts whose tiles end at or before it (E: an unused slot)
    ex = tl.sum(((tile_end[None, :] <= slot[:, None]) & cmask[None, :]).to(tl.int32), axis=1)
    hit = cols[None, :] == ex[:, None]
    row = tl.sum(tl.where(hit, starts[None, :] + (slot[:, None] - tile_start[None, :]) * BLOCK_M, 0), axis=1)
    smask = slot < MAX_TILES
    tl.store(tile_expert_ptr + slot, ex, mask=smask)
    tl.store(tile_row_ptr + slot, row, mask=smask)


@triton.jit(do_not_specialize=["S"])
def scatter_kernel(ids_ptr, keep_ptr, hist_ptr, counts_ptr, sorted_pairs_ptr, sorted_tok_ptr, S, NB_COLS, TOP_K,
                   BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, E_PAD: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Program ``b`` writes its pairs at ``offsets[c] + hist[b, c] + rank`` for bucket c (``_buckets``; rank:
    stable, by pair index)."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    offs = b * BLOCK + i
    valid = offs < S
    ids = _buckets(ids_ptr, keep_ptr, offs, valid, E_PAD, HAS_KEEP)  # padding sorts after every bucket
    keys = tl.sort((ids << LOG_BLOCK) | i)
    e_sorted = keys >> LOG_BLOCK
    pair = b * BLOCK + (keys & (BLOCK - 1))
    cols = tl.arange(0, E_PAD)
    cmask = cols < NB_COLS
    local = tl.histogram(ids, E_PAD, mask=valid)
    starts, _counts = _expert_starts(counts_ptr, cols, cmask)
    # sorted position i of bucket c's pair -> offsets[c] + (its bucket's pairs in earlier blocks) + (i - the
    # block's pairs of lower buckets)
    base = starts + tl.load(hist_ptr + b.to(tl.int64) * NB_COLS + cols, mask=cmask, other=0)
    base -= tl.cumsum(local, 0) - local
    dest = tl.gather(base, tl.minimum(e_sorted, E_PAD - 1), 0) + i
    ok = pair < S
    tl.store(sorted_pairs_ptr + dest, pair, mask=ok)
    tl.store(sorted_tok_ptr + dest, pair // TOP_K, mask=ok)
