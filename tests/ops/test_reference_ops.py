"""Reference ops (desmoe.ops.reference) and the validated dispatch layer (desmoe.ops), on CPU.

The reference is the oracle for every fast path, so it is itself checked against independent formulations:
a float64 dense per-pair computation for the experts, a per-row loop for routing.
"""
import pytest
import torch

from desmoe import ops
from desmoe.ops import reference as ref


def _rand_experts(T, D, I, E, K, *, dtype=torch.float64, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    w1 = torch.randn(E, 2 * I, D, generator=g, dtype=dtype) * 0.3
    w2 = torch.randn(E, D, I, generator=g, dtype=dtype) * 0.3
    if ids is None:
        ids = (torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T
               else torch.empty(0, K, dtype=torch.long))
    w = torch.rand(T, K, generator=g, dtype=dtype) + 0.1
    return x, w1, w2, ids.long(), w


def _dense_masked(x, w1, w2, ids, w, trainable_TK):
    """float64 dense oracle where a pair with trainable False sees detached expert weights."""
    T, K = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            a, b = (w1[e], w2[e]) if trainable_TK[t, k] else (w1[e].detach(), w2[e].detach())
            h = a @ x[t]
            gate, up = h.chunk(2)
            out[t] = out[t] + w[t, k] * (b @ (torch.nn.functional.silu(gate) * up))
    return out


# --- routing -------------------------------------------------------------------------------------------

def _route_loop(logits, k, scoring, renorm, bias=None):
    """Per-row reference of plain (non-grouped) top-k routing."""
    W, I = [], []
    for row in logits.double():
        s = row.softmax(-1) if scoring == "softmax" else row.sigmoid()
        choice = s if bias is None else s + bias.double()
        idx = sorted(range(len(row)), key=lambda e: -float(choice[e]))[:k]
        ws = s[idx]
        if renorm:
            ws = ws / ws.sum()
        W.append(ws)
        I.append(torch.tensor(idx))
    return torch.stack(W), torch.stack(I)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (13, 7, 3), (9, 5, 5), (32, 16, 4)])
def test_topk_route_matches_row_loop(scoring, renorm, T, E, K):
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1 if scoring == "sigmoid" else None
    w, i = ops.topk_route(logits, K, scoring=scoring, renormalize=renorm, bias_E=bias, backend="reference")
    w_ref, i_ref = _route_loop(logits, K, scoring, renorm, bias)
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and w.shape == (T, K)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-6, atol=1e-7)
    if renorm:
        torch.testing.assert_close(w.sum(-1), torch.ones(T))
    # ids are distinct per token
    assert all(len(set(r.tolist())) == K for r in i)


@pytest.mark.parametrize("group_score", ["max", "top2sum"])
def test_group_limited_routing_selects_only_from_best_groups(group_score):
    T, E, n_group, topk_group, K = 50, 16, 4, 2, 4
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.2
    w, ids = ops.topk_route(logits, K, scoring="sigmoid", bias_E=bias, n_group=n_group, topk_group=topk_group,
                            group_score=group_score, scaling=2.5, renorm_eps=1e-20, backend="reference")
    choice = logits.sigmoid() + bias
    grouped = choice.view(T, n_group, E // n_group)
    gs = grouped.max(-1).values if group_score == "max" else grouped.topk(2, -1).values.sum(-1)
    best = gs.topk(topk_group, -1).indices
    for t in range(T):
        groups_used = set((ids[t] // (E // n_group)).tolist())
        assert groups_used <= set(best[t].tolist())
    # weights are the *unbiased* scores, renormalised, then scaled
    raw = logits.sigmoid().gather(1, ids)
    torch.testing.assert_close(w, raw / raw.sum(-1, keepdim=True) * 2.5)


def test_routing_masked_value_zero_matches_deepseek_v2_semantics():
    # DeepSeek-V2 fills ineligible softmax scores with 0.0; with K larger than the eligible count's positive
    # scores this still only picks eligible experts because every softmax score is > 0.
    logits = torch.randn(20, 8)
    w, ids = ops.topk_route(logits, 2, renormalize=False, n_group=4, topk_group=1, masked_value=0.0,
                            backend="reference")
    assert ((ids // 2)[:, 0] == (ids // 2)[:, 1]).all()


def test_routing_gradient_flows_to_logits():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w, ids = ref.topk_route_reference(logits, 2)
    (w * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # scoring runs in float32 by design, so compare with a float64 formula on the same selection
    lg64 = logits.detach().clone().requires_grad_()
    s = lg64.softmax(-1).gather(1, ids)
    (s / s.sum(-1, keepdim=True) * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(logits.grad, lg64.grad, rtol=1e-5, atol=1e-6)


def test_counts_and_permutation_invariants():
    T, E, K = 37, 11, 3  # prime T and E
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    counts = ops.expert_counts(ids, E)
    assert counts.dtype == torch.int32 and counts.sum() == T * K
    assert torch.equal(counts.long(), torch.bincount(ids.flatten(), minlength=E))
    order, offsets = ops.permute(ids, E)
    assert offsets[0] == 0 and offsets[-1] == T * K
    assert torch.equal(torch.sort(order).values, torch.arange(T * K))
    flat = ids.flatten()
    for e in range(E):
        seg = order[offsets[e]:offsets[e + 1]]
        assert (flat[seg] == e).all()
        assert torch.equal(seg, torch.sort(seg).values)  # stable within an expert


def test_counts_with_empty_experts_and_all_to_one():
    ids = torch.full((10, 1), 3)
    counts = ops.expert_counts(ids, 6)
    assert counts.tolist() == [0, 0, 0, 10, 0, 0]
    order, offsets = ops.permute(ids, 6)
    assert offsets.tolist() == [0, 0, 0, 0, 10, 10, 10]


# --- experts -------------------------------------------------------------------------------------------

CASES = [
    dict(T=1, D=8, I=4, E=4, K=2),            # single token
    dict(T=13, D=6, I=5, E=7, K=3),           # prime everything
    dict(T=9, D=8, I=4, E=5, K=5),            # K == E
    dict(T=20, D=16, I=8, E=8, K=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{T}D{D}I{I}E{E}K{K}".format(**c))
def test_experts_match_dense_oracle_values_and_grads(case):
    x, w1, w2, ids, w = _rand_experts(**case)
    leaves = [t.requires_grad_() for t in (x, w1, w2, w)]
    out = ops.moe_experts(x, w1, w2, ids, w, backend="reference")
    dense = ref.moe_experts_dense_reference(x, w1, w2, ids, w)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    g_fast = torch.autograd.grad(out, leaves, go)
    g_ref = torch.autograd.grad(dense, leaves, go)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_experts_empty_experts_and_all_tokens_on_one_expert():
    for ids in (torch.full((7, 1), 2), torch.tensor([[0, 5]] * 6)):
        T, K = ids.shape
        x, w1, w2, _, w = _rand_experts(T, 8, 4, 6, K, ids=ids)
        w1.requires_grad_()
        out = ops.moe_experts(x, w1, w2, ids, w, backend="reference")
        torch.testing.assert_close(out, ref.moe_experts_dense_reference(x, w1, w2, ids, w))
        out.sum().backward()
        used = set(ids.flatten().tolist())
        for e in range(6):
            assert (w1.grad[e].abs().sum() > 0) == (e in used)


def test_experts_zero_tokens():
    x, w1, w2, ids, w = _rand_experts(0, 8, 4, 4, 2)
    out = ops.moe_experts(x, w1, w2, ids, w, backend="reference")
    assert out.shape == (0, 8)


def test_experts_float32_output_dtype_and_low_precision():
    x, w1, w2, ids, w = _rand_experts(16, 16, 8, 4, 2, dtype=torch.float32)
    for dt in (torch.bfloat16, torch.float16):
        out = ops.moe_experts(x.to(dt), w1.to(dt), w2.to(dt), ids, w, backend="reference")
        assert out.dtype == dt
        oracle = ref.moe_experts_dense_reference(x, w1, w2, ids, w)
        # tolerance rule (DESIGN.md): within 2x PyTorch's own low-precision error + eps
        torch_lp = ref.moe_experts_dense_reference(x.to(dt), w1.to(dt), w2.to(dt), ids, w.to(dt)).to(dt).double()
        assert (out.double() - oracle).norm() <= 2 * (torch_lp - oracle).norm() + 1e-3


def test_expert_trainable_mask_zero_grads_for_frozen_unchanged_elsewhere():
    x, w1, w2, ids, w = _rand_experts(24, 8, 4, 6, 2, dtype=torch.float32)
    mask = torch.tensor([True, False, True, False, True, True])
    grads = []
    for m in (None, mask):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, w)]
        out = ops.moe_experts(*leaves[:3], ids, leaves[3], expert_trainable_E=m, backend="reference")
        out.pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    (dx0, dw1_0, dw2_0, dw0), (dx1, dw1_1, dw2_1, dw1) = grads
    assert (dw1_1[~mask] == 0).all() and (dw2_1[~mask] == 0).all()
    assert dw1_0[~mask].abs().sum() > 0
    assert torch.equal(dw1_1[mask], dw1_0[mask]) and torch.equal(dw2_1[mask], dw2_0[mask])
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=1e-6)  # frozen experts still pass dX
    torch.testing.assert_close(dw1, dw0, rtol=0, atol=1e-6)


def test_pair_trainable_mask_matches_dense_oracle():
    x, w1, w2, ids, w = _rand_experts(15, 8, 4, 5, 2)
    pair = torch.rand(15, 2) > 0.5
    leaves = [t.requires_grad_() for t in (x, w1, w2, w)]
    out = ops.moe_experts(x, w1, w2, ids, w, pair_trainable_TK=pair, backend="reference")
    dense = _dense_masked(x, w1, w2, ids, w, pair)
    torch.testing.assert_close(out, dense)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(dense, leaves, go)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_pair_and_expert_masks_combine():
    x, w1, w2, ids, w = _rand_experts(15, 8, 4, 5, 2)
    pair = torch.rand(15, 2) > 0.3
    emask = torch.tensor([True, True, False, True, False])
    w1.requires_grad_()
    ops.moe_experts(x, w1, w2, ids, w, pair_trainable_TK=pair, expert_trainable_E=emask,
                    backend="reference").sum().backward()
    w1b = w1.detach().clone().requires_grad_()
    _dense_masked(x, w1b, w2, ids, w, pair & emask[ids]).sum().backward()
    torch.testing.assert_close(w1.grad, w1b.grad)


def test_pair_mask_reference():
    doms = torch.tensor([0, 1, -1, 1])
    ids = torch.tensor([[0, 1], [1, 2], [0, 2], [0, 3]])
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    out = ref.pair_mask_reference(doms, ids, mask)
    assert out.tolist() == [[True, True], [False, True], [False, False], [False, True]]


# --- validation ----------------------------------------------------------------------------------------

def test_routing_bad_inputs_raise_clear_errors():
    lg = torch.randn(4, 6)
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_route(lg, 7)
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_route(lg, 0)
    with pytest.raises(TypeError, match="top_k"):
        ops.topk_route(lg, 2.0)
    with pytest.raises(ValueError, match="logits_TE"):
        ops.topk_route(torch.randn(4), 1)
    with pytest.raises(TypeError, match="logits_TE"):
        ops.topk_route(torch.randint(0, 3, (4, 6)), 1)
    with pytest.raises(ValueError, match="scoring"):
        ops.topk_route(lg, 2, scoring="relu")
    with pytest.raises(ValueError, match="bias_E"):
        ops.topk_route(lg, 2, bias_E=torch.zeros(5))
    with pytest.raises(ValueError, match="n_group"):
        ops.topk_route(lg, 2, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        ops.topk_route(lg, 2, n_group=3, topk_group=4)
    with pytest.raises(TypeError, match="RouterSpec, not as keywords"):
        ops.topk_route(lg, ops.RouterSpec(top_k=2, num_experts=6), scoring="sigmoid")
    with pytest.raises(ValueError, match="num_experts=5"):
        ops.topk_route(lg, ops.RouterSpec(top_k=2, num_experts=5))
    with pytest.raises(ValueError, match="logits_dtype"):
        ops.RouterSpec(top_k=2, num_experts=6, logits_dtype="half")
    with pytest.raises(ValueError, match="bias_E is on meta"):
        ops.topk_route(lg, 2, bias_E=torch.zeros(6, device="meta"))


def test_experts_bad_inputs_raise_clear_errors():
    x, w1, w2, ids, w = _rand_experts(5, 8, 4, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="w_gate_up_E2ID"):
        ops.moe_experts(x, w1[:, :, :7], w2, ids, w)
    with pytest.raises(ValueError, match="w_down_EDI"):
        ops.moe_experts(x, w1, w2[:, :, :3], ids, w)
    with pytest.raises(ValueError, match="topk_ids_TK must lie"):
        ops.moe_experts(x, w1, w2, ids + 3, w)
    with pytest.raises(ValueError, match="topk_ids_TK must have T=5"):
        ops.moe_experts(x, w1, w2, ids[:3], w[:3])
    with pytest.raises(TypeError, match="topk_ids_TK"):
        ops.moe_experts(x, w1, w2, ids.float(), w)
    with pytest.raises(ValueError, match="topk_weights_TK"):
        ops.moe_experts(x, w1, w2, ids, w[:, :1])
    with pytest.raises(TypeError, match="differ in dtype"):
        ops.moe_experts(x, w1, w2.double(), ids, w)
    with pytest.raises(TypeError, match="x_TD"):
        ops.moe_experts(x.int(), w1, w2, ids, w)
    with pytest.raises(ValueError, match="w_down_EDI is on meta"):
        ops.moe_experts(x, w1, w2.to("meta"), ids, w)
    with pytest.raises(TypeError, match="expert_trainable_E"):
        ops.moe_experts(x, w1, w2, ids, w, expert_trainable_E=torch.ones(4))
    with pytest.raises(ValueError, match="expert_trainable_E"):
        ops.moe_experts(x, w1, w2, ids, w, expert_trainable_E=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pair_trainable_TK"):
        ops.moe_experts(x, w1, w2, ids, w, pair_trainable_TK=torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="activation"):
        ops.moe_experts(x, w1, w2, ids, w, activation="tanh")
    big = torch.arange(5).repeat(5, 1)  # K=5 > E=4
    with pytest.raises(ValueError):
        ops.moe_experts(x, w1, w2, big, torch.rand(5, 5))


def test_backend_selection(monkeypatch):
    assert ops.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("DESMOE_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend(None, torch.device("cpu"))
    monkeypatch.setenv("DESMOE_BACKEND", "reference")
    assert ops.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.delenv("DESMOE_BACKEND")
    # auto on CPU tensors is the grouped-GEMM path (Triton needs CUDA outside the interpreter)
    assert ops.resolve_backend(None, torch.device("cpu")) == "grouped"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if ops.triton_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            ops.resolve_backend("triton", torch.device("cpu"))
