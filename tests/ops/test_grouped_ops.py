"""The grouped-GEMM experts path (backend "grouped", the CPU default) against the reference oracle.

Values and every gradient (x, both weights, routing weights), with and without the DES-MoE masks, on odd shapes
(T=1, prime T and E, K=E, empty experts, every token on one expert, widths that are not 16-byte aligned so the
per-expert fallback runs), float32/float64 tight and bf16 within the DESIGN.md tolerance rule.
"""
import pytest
import torch

from desmoe import ops
from desmoe.ops import grouped, reference as ref

SHAPES = [  # T, E, K, D, I
    (1, 4, 2, 16, 8),
    (13, 7, 3, 8, 6),      # prime T and E, unaligned widths: the per-expert fallback
    (16, 8, 8, 16, 8),     # K = E
    (31, 16, 4, 32, 16),
]


def _inputs(T, E, K, D, I, dtype, seed, one_expert=False, empty=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(dtype)
    pool = E if empty is None else E - 1  # expert E-1 gets nothing
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])
    if one_expert:
        ids = torch.stack([torch.arange(K)] * T)  # every token on the same K experts
    w = torch.rand(T, K, generator=g).to(dtype)
    return x, w1, w2, ids, w


def _run(backend, x, w1, w2, ids, w, **masks):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, w)]
    out = ops.moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend=backend, **masks)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)  # all pairs frozen: no dW
    return (out,) + tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_matches_reference(shape, dtype, masked):
    T, E, K, D, I = shape
    x, w1, w2, ids, w = _inputs(T, E, K, D, I, dtype, seed=T + E, empty=True if E > K else None)
    masks = {}
    if masked:
        g = torch.Generator().manual_seed(3)
        masks = dict(expert_trainable_E=torch.rand(E, generator=g) > 0.4,
                     pair_trainable_TK=torch.rand(T, K, generator=g) > 0.3)
    got = _run("grouped", x, w1, w2, ids, w, **masks)
    want = _run("reference", x, w1, w2, ids, w, **masks)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("out", "dx", "dw_gate_up", "dw_down", "dweights"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    if masked:  # frozen experts get exactly zero weight gradient
        frozen = ~masks["expert_trainable_E"]
        assert got[2][frozen].abs().max() == 0 and got[3][frozen].abs().max() == 0


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_grouped_every_activation_and_one_hot_expert(activation):
    x, w1, w2, ids, w = _inputs(12, 8, 2, 16, 8, torch.float64, seed=5, one_expert=True)
    got = _run("grouped", x, w1, w2, ids, w, activation=activation)
    want = _run("reference", x, w1, w2, ids, w, activation=activation)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[2][2:].abs().max() == 0  # experts nobody routed to: zero gradient, not garbage


def test_grouped_bf16_within_tolerance_rule():
    # ‖grouped_bf16 − oracle‖ ≤ 2·‖reference_bf16 − oracle‖ + eps, oracle = float64 dense
    x, w1, w2, ids, w = _inputs(64, 8, 2, 64, 32, torch.bfloat16, seed=11)
    oracle = ref.moe_experts_dense_reference(x, w1, w2, ids, w)
    ours = ops.moe_experts(x, w1, w2, ids, w, backend="grouped").double()
    theirs = ref.moe_experts_reference(x, w1, w2, ids, w).double()
    assert (ours - oracle).norm() <= 2 * (theirs - oracle).norm() + 1e-6


def test_grouped_mm_kernel_rejection_is_detected():
    # the kernel wants 16-byte strides; the fallback must take over, not raise
    a = torch.randn(10, 6)
    assert not grouped._grouped_mm_ok(a)
    assert grouped._grouped_mm_ok(torch.randn(10, 8))
    assert not grouped._grouped_mm_ok(torch.randn(10, 8, dtype=torch.float64))
    # off CPU only bfloat16 goes to the kernel (float32 grouped GEMMs are not on every GPU architecture)
    assert not grouped._grouped_mm_ok(torch.empty(10, 8, device="meta"))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True)])
def test_grouped_backward_computes_only_what_is_needed(needs):
    # frozen weights (the method freezes all but some experts' params) or constant inputs: the backward skips
    # those gradients and the rest still match the reference
    x, w1, w2, ids, w = _inputs(9, 6, 2, 16, 8, torch.float64, seed=2)
    leaves = [x.clone(), w1.clone(), w2.clone(), w.clone()]
    want_x, want_w, want_r = needs
    for t, flag in zip(leaves, (want_x, want_w, want_w, want_r)):
        t.requires_grad_(flag)
    out = ops.moe_experts(*leaves[:3], ids, leaves[3], backend="grouped")
    out.square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, w)]
    ref.moe_experts_reference(*ref_leaves[:3], ids, ref_leaves[3]).square().sum().backward()
    for t, r in zip(leaves, ref_leaves):
        if t.requires_grad:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-10, atol=1e-10)
        else:
            assert t.grad is None
