"""Group-limited selection when top_k exceeds the eligible experts, on every routing backend.

The stock DeepSeek-V3-style routers accept such configs (transformers' own tests use 8 of 8 experts with one of
two groups eligible): ``torch.topk`` then picks the rest among the masked experts, tied at the fill value. The
Triton kernel must pick each expert at most once, all eligible ones first, and — where no ties are involved
(K = E, or ties only among masked experts with distinct weights) — the same set as the reference.
"""
import pytest
import torch

from desmoe import ops
from desmoe.ops import reference as ref

pytest.importorskip("desmoe.ops.triton_routing")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # T, E, K, spec fields
    (7, 8, 8, dict(scoring="sigmoid", n_group=2, topk_group=1, group_score="top2sum", renorm_eps=1e-20)),
    (9, 8, 6, dict(scoring="sigmoid", n_group=4, topk_group=1, group_score="top2sum", renorm_eps=1e-20)),
    (5, 12, 7, dict(scoring="sigmoid", n_group=3, topk_group=1, group_score="top2sum", scaling=2.5)),
    (6, 8, 5, dict(n_group=4, topk_group=2, group_score="max", masked_value=0.0, renormalize=False)),
]


@pytest.mark.parametrize("T,E,K,fields", CASES)
def test_triton_selection_with_k_over_eligible(T, E, K, fields):
    g = torch.Generator().manual_seed(T * E + K)
    logits = (torch.randn(T, E, generator=g) * 2).to(DEV)
    bias = (torch.rand(E, generator=g) * 0.1 - 1.5).to(DEV) if fields.get("scoring") == "sigmoid" else None
    spec = ops.RouterSpec(top_k=K, num_experts=E, **fields)
    assert spec.num_eligible < K
    w, ids = ops.topk_route(logits, spec, bias_E=bias, backend="triton")
    rw, rids = ref.topk_route_reference(logits, spec, bias_E=bias)
    assert all(len(set(r.tolist())) == K for r in ids.cpu()), "an expert picked twice"
    # every eligible expert (the reference's first picks, all finite choices) is among the kernel's
    eligible = spec.num_eligible
    for r in range(T):
        assert set(rids[r, :eligible].tolist()) <= set(ids[r].tolist())
    if K == E:  # no choice left: the same set, the same weights
        torch.testing.assert_close(ids.sort(-1).values.cpu(), rids.sort(-1).values)
        order_k, order_r = ids.argsort(-1), rids.argsort(-1)
        torch.testing.assert_close(w.gather(1, order_k).cpu(), rw.gather(1, order_r), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(w).all()
