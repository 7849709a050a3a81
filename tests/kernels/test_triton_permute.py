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


@pytest.mark.parametrize("T,E,K", [(40, 7, 3), (61, 128, 8), (5, 4, 4)])
def test_routing_metadata_puts_kept_pairs_first(T, E, K):
    """With a pair mask each expert's rows are its kept pairs (in pair order) then its masked ones, and the dW
    bounds end at the kept rows; offsets, tokens and the tile schedule are those of the same pairs."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    keep = torch.rand(T, K) > 0.4
    keep[0] = False  # a token with every pair masked
    BM = 16
    plan = triton_permute.routing_metadata(ids, E, BM, keep)
    flat, kf = ids.reshape(-1), keep.reshape(-1)
    _rs, ro = ref.permute_reference(ids, E)
    assert torch.equal(plan.offsets_E1.long(), ro.long())
    sp = plan.sorted_pairs_S.long()
    assert torch.equal(plan.sorted_tok_S.long(), sp // K)
    for e in range(E):
        lo, hi = int(ro[e]), int(ro[e + 1])
        pairs = torch.nonzero(flat == e).flatten()
        want = torch.cat([pairs[kf[pairs]], pairs[~kf[pairs]]])
        assert torch.equal(sp[lo:hi], want), e
        assert plan.bounds_E2[2 * e].item() == lo and plan.bounds_E2[2 * e + 1].item() == lo + int(kf[pairs].sum())
    covered = torch.zeros(T * K, dtype=torch.int64)
    for slot in range(plan.max_tiles):
        e = int(plan.tile_expert[slot])
        if e < E:
            lo = int(plan.tile_row[slot])
            covered[lo:min(lo + BM, int(ro[e + 1]))] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    unmasked = triton_permute.routing_metadata(ids, E, BM)  # no mask: every row of an expert is in its bounds
    assert torch.equal(unmasked.bounds_E2.view(E, 2), torch.stack([ro[:-1], ro[1:]], 1).to(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [False, True])
def test_gpu_routing_metadata_at_size(keep):
    """T = 32768, E = 128, K = 8 (Qwen3-30B-A3B's router) compiled on the GPU: the reference's offsets, every
    expert's rows in pair order (kept pairs first with a mask) and the dW bounds."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    T, E, K = 32768, 128, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.topk(torch.rand(T, E, device="cuda", generator=g), K, dim=1).indices
    kp = torch.rand(T, K, device="cuda", generator=g) > 0.4 if keep else None
    plan = triton_permute.routing_metadata(ids, E, 128, kp)
    rs, ro = ref.permute_reference(ids, E)
    assert torch.equal(plan.offsets_E1.long(), ro.long())
    sp = plan.sorted_pairs_S.long()
    assert torch.equal(plan.sorted_tok_S.long(), sp // K)
    if kp is None:
        assert torch.equal(sp, rs)
        want_kept = ro[1:] - ro[:-1]
    else:  # per expert: kept pairs in pair order, then masked ones in pair order
        kf = kp.reshape(-1)
        flag = (~kf[rs]).long()
        e_of = torch.repeat_interleave(torch.arange(E, device="cuda"), (ro[1:] - ro[:-1]).long())
        order = torch.argsort(e_of * 2 + flag, stable=True)
        assert torch.equal(sp, rs[order])
        want_kept = torch.zeros(E, dtype=torch.long, device="cuda").index_add_(0, e_of, 1 - flag)
    b = plan.bounds_E2.view(E, 2).long()
    assert torch.equal(b[:, 0], ro[:-1].long()) and torch.equal(b[:, 1] - b[:, 0], want_kept.long())
