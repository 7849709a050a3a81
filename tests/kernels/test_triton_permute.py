"""O(S) routing metadata (desmoe.kernels.permute) under the interpreter against the reference permutation."""
import pytest
import torch

from desmoe.ops import reference as ref

triton_permute = pytest.importorskip("desmoe.ops.triton_permute")


@pytest.mark.parametrize("T,E,K,skew", [(1, 3, 1, False), (97, 5, 3, False), (70, 16, 4, True), (40, 7, 7, False)])
def test_routing_metadata_matches_reference(T, E, K, skew):
    """The O(S) histogram -> scan -> scatter metadata: the reference's stable expert-major order and offsets, the
    token of every sorted row, and a tile schedule that covers every row of every expert exactly once."""
    if skew:  # most pairs on expert 0, some experts empty
        ids = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(E - 1)[: K - 1] + 1]) for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    BM = 16
    sp, off, tok, te, tr, n = triton_permute.routing_metadata(ids, E, BM)
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
    te2, tr2, n2 = triton_permute.tile_schedule(off, T * K, E, BM)  # backward's rebuild from offsets
    assert n2 == n and torch.equal(te2, te) and torch.equal(tr2[te2 < E], tr[te < E])
