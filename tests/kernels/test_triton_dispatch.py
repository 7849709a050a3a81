"""The expert-MLP GEMM engine rule (desmoe.ops.dispatch) and the torch._grouped_mm engine's numerics on CPU."""
import pytest
import torch

from desmoe.ops import dispatch
from desmoe.ops import reference as ref

pytest.importorskip("desmoe.ops.triton_experts")
from desmoe import ops  # noqa: E402
from desmoe.ops import grouped  # noqa: E402

CUDA, CPU, BF16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16


@pytest.mark.parametrize("T,E,K,D,I,device,dtype,expect", [
    (16384, 8, 2, 4096, 14336, CUDA, BF16, "grouped_mm"),   # Mixtral: few experts x many rows
    (32768, 128, 8, 2048, 768, CUDA, BF16, "triton"),       # Qwen3-30B-A3B: fine-grained
    (32768, 64, 8, 2048, 1024, CUDA, BF16, "triton"),       # OLMoE
    (256, 8, 2, 4096, 14336, CUDA, BF16, "triton"),         # Mixtral shape, few rows per expert
    (16384, 8, 2, 4096, 14336, CUDA, torch.float32, "triton"),
    (16384, 8, 2, 4096, 14336, CPU, BF16, "triton"),
    (16384, 8, 2, 4100, 14336, CUDA, BF16, "triton"),       # unaligned rows
])
def test_engine_rule(monkeypatch, T, E, K, D, I, device, dtype, expect):
    monkeypatch.delenv("DESMOE_EXPERTS_GEMM", raising=False)
    assert dispatch.experts_gemm_engine(T, E, K, D, I, device, dtype) == expect


def test_engine_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("DESMOE_EXPERTS_GEMM", "grouped_mm")
    assert dispatch.experts_gemm_engine(32768, 128, 8, 2048, 768, CUDA, BF16) == "grouped_mm"
    assert dispatch.experts_gemm_engine(32768, 128, 8, 2048, 768, CUDA, BF16, engine="triton") == "triton"
    monkeypatch.setenv("DESMOE_EXPERTS_GEMM", "cublas")
    with pytest.raises(ValueError, match="DESMOE_EXPERTS_GEMM.*'cublas'"):
        dispatch.experts_gemm_engine(8, 2, 1, 16, 16, CPU, BF16)


def _case(masks):
    T, E, K, D, I = 19, 5, 2, 16, 24
    x = torch.randn(T, D)
    w1 = torch.randn(E, 2 * I, D) * 0.2
    w2 = torch.randn(E, D, I) * 0.2
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 gets no rows
    wts = torch.rand(T, K) + 0.1
    em = torch.tensor([True, False, True, True, True]) if masks else None
    pm = (torch.rand(T, K) > 0.3) if masks else None
    return x, w1, w2, ids, wts, em, pm


@pytest.mark.skipif(not dispatch.grouped_mm_available(), reason="torch._grouped_mm missing")
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("via_dispatch", [False, True])
def test_grouped_mm_engine_matches_reference(monkeypatch, masks, via_dispatch):
    x, w1, w2, ids, wts, em, pm = _case(masks)
    dout = torch.randn_like(x)
    calls = []
    if via_dispatch:  # the Triton backend's entry point routes to the grouped_mm engine when the rule says so
        monkeypatch.setenv("DESMOE_EXPERTS_GEMM", "grouped_mm")
        real = grouped.moe_experts_grouped_mm
        monkeypatch.setattr(grouped, "moe_experts_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))

        def fn(*a, **k):
            return ops.moe_experts(*a, backend="triton", **k)
    else:
        fn = grouped.moe_experts_grouped_mm

    def run(f, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, wts)]
        out = f(leaves[0], leaves[1], leaves[2], ids, leaves[3], expert_trainable_E=em, pair_trainable_TK=pm, **kw)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    got = run(fn)
    want = run(ref.moe_experts_reference, activation="silu")
    assert calls or not via_dispatch
    for name, a, b in zip(["out", "dx", "dW_gate_up", "dW_down", "d weights"], got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not dispatch.grouped_mm_available(), reason="torch._grouped_mm missing")
@pytest.mark.parametrize("frozen,pairs", [(True, False), (False, True), (True, True)])
def test_grouped_mm_engine_dw_gemms_see_only_trainable_rows(monkeypatch, frozen, pairs):
    """Under masks the dW grouped GEMMs take only the trainable rows (pair kept, expert not frozen), so frozen
    experts' groups are empty and masked pairs cost no dW FLOPs; the gradients still equal the reference's."""
    x, w1, w2, ids, wts, em, pm = _case(True)
    em, pm = (em if frozen else None), (pm if pairs else None)
    real, offs_seen = torch._grouped_mm, []

    def spy(a, b, *args, offs=None, **kw):
        if a.dim() == 2 and b.dim() == 2:  # the dW GEMMs (2D x 2D, groups along the rows)
            offs_seen.append(offs.clone())
        return real(a, b, *args, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, wts)]
    out = grouped.moe_experts_grouped_mm(leaves[0], leaves[1], leaves[2], ids, leaves[3], expert_trainable_E=em,
                                         pair_trainable_TK=pm)
    dout = torch.randn_like(x)
    got = torch.autograd.grad(out, leaves, dout)
    lr = [t.clone().requires_grad_(True) for t in (x, w1, w2, wts)]
    want = torch.autograd.grad(ref.moe_experts_reference(lr[0], lr[1], lr[2], ids, lr[3], activation="silu",
                                                         expert_trainable_E=em, pair_trainable_TK=pm), lr, dout)
    for name, a, b in zip(["dx", "dW_gate_up", "dW_down", "d weights"], got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    E = w1.shape[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    if pm is not None:
        keep &= pm
    if em is not None:
        keep &= em[ids]
    want_ends = torch.bincount(ids[keep], minlength=E).cumsum(0).to(torch.int32)
    assert len(offs_seen) == 2 and all(torch.equal(o, want_ends) for o in offs_seen), (offs_seen, want_ends)
    if em is not None:  # a frozen expert's group is empty
        frozen_e = int((~em).nonzero()[0])
        assert all(int(o[frozen_e]) == int(o[frozen_e - 1]) for o in offs_seen)
