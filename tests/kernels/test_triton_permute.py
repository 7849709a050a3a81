"""O(S) routing metadata (desmoe.kernels.permute) under the interpreter against the reference permutation."""
import pytest
import torch

from desmoe.ops import reference as ref

triton_permute = pytest.importorskip("desmoe.ops.triton_permute")


@pytest.mark.parametrize("T,E,K,skew", [(1, 3, 1, False), (97, 5, 3, False), (70, 16, 4, True), (40, 7, 7, False),
                                         (4, 64, 8, False), (61, 128, 8, True), (33, 60, 6, False)])
def test_routing_metadata_matches_reference(T, E, K, skew):
    """The O(S) histogram -> scan -> schedule -> block-sort scatter metadata: the reference's stable expert-major
    order and offsets, the token of every sorted row, and a tile schedule that covers every row of every expert
    exactly once (several histogram blocks of 32 pairs, a partial last block, an exact one, E up to 128)."""
    if skew:  # most pairs on expert 0, some experts empty
        ids = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(E - 1)[: K - 1] + 1]) for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    BM = 16
    plan = triton_permute.routing_metadata(ids, E, BM)
    sp, off, tok, te, tr, n = (plan.sorted_pairs_S, plan.offsets_E1, plan.sorted_tok_S, plan.tile_expert,
                               plan.tile_row, plan.max_tiles)
    assert plan.buf.numel() == triton_permute.plan_len(T * K, E, BM)
    assert all(t.untyped_storage().data_ptr() == plan.buf.untyped_storage().data_ptr() for t in (sp, tok, off, te, tr))
    assert all(t.data_ptr() % 16 == 0 for t in (sp, tok, off, te, tr))  # 16-byte aligned (what Triton specializes on)
    rs, ro = ref.permute_reference(ids, E)
    assert torch.equal(sp.long(), rs) and torch.equal(off.long(), ro.long())
    assert torch.equal(tok.long(), rs // K)
    covered = torch.zeros(T * K, dtype=torch.int64)
    for slot in range(n):
        e = int(te[slot])
        if e == E:
            continue
        lo, hi = int(tr[slot]), min(int(tr[slot]) + BM, int(off[e + 1]))
        assert int(off[e]) <= lo < hi
        covered[lo:hi] += 1
    assert torch.equal(covered, torch.ones_like(covered))
