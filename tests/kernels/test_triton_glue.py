"""The grouped_mm engine's glue kernels (desmoe.kernels.glue) against their PyTorch references, in the Triton
interpreter: odd sizes (tails in both dimensions), bf16 and float32, with and without a pair mask, more than one
chunking of N (the routing-weight dot's summation order is the only thing a block size could change)."""
import pytest
import torch

from desmoe.ops import reference as ref

pytest.importorskip("desmoe.ops.triton_experts")
from desmoe.ops import triton_glue  # noqa: E402

BLOCKS = [(16, 32), (8, 16), (32, 128)]


def _rows(S, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(S, 2 * N, generator=g) * 2).to(dtype)
    dhu = torch.randn(S, N, generator=g).to(dtype)
    K = 3
    T = S // K
    sp = torch.randperm(T * K, generator=g).to(torch.int32)  # row s holds pair sp[s]
    wts = torch.rand(T * K, generator=g) + 0.1
    pm = torch.rand(T * K, generator=g) > 0.4
    pm[0], pm[-1] = False, True  # at least one pair out and one in
    return gu, dhu, sp, wts, pm


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,N", [(45, 40), (3, 7), (96, 64)])
def test_swiglu_forward(blocks, dtype, S, N):
    gu, *_ = _rows(S, N, dtype)
    got = triton_glue.swiglu_forward(gu, blocks)
    want = ref.swiglu_glue_forward_reference(gu)
    assert got.dtype == dtype and got.shape == (S, N)
    tol = {} if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("S,N", [(45, 40), (3, 7), (96, 64)])
def test_swiglu_backward(blocks, dtype, masked, S, N):
    gu, dhu, sp, wts, pm = _rows(S, N, dtype, seed=S + N)
    pm_u8 = pm.view(torch.uint8) if masked else None
    dgu, hw, dwp = triton_glue.swiglu_backward(dhu, gu, sp, wts, pm_u8, blocks)
    w_dgu, w_hw, w_dwp = ref.swiglu_glue_backward_reference(dhu, gu, sp, wts, pm if masked else None)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dgu, w_dgu, **tol)
    torch.testing.assert_close(hw, w_hw, **tol)
    torch.testing.assert_close(dwp, w_dwp, atol=1e-4, rtol=1e-5)  # float32 in both; order of the row sum differs
    assert dwp.dtype == torch.float32 and dgu.dtype == dtype and hw.dtype == dtype
    if masked:  # a masked pair's hw row is exactly zero; its dgu row is not (dx still needs it)
        off = ~pm[sp.long()]
        assert off.any() and (hw[off] == 0).all() and (dgu[off] != 0).any()


def test_swiglu_backward_writes_every_pair(monkeypatch):
    monkeypatch.setenv("DESMOE_POISON_OUTPUTS", "1")  # unwritten elements would stay NaN
    gu, dhu, sp, wts, pm = _rows(45, 40, torch.float32)
    for out in triton_glue.swiglu_backward(dhu, gu, sp, wts, pm.view(torch.uint8), (16, 16)):
        assert not out.isnan().any()
    assert not triton_glue.swiglu_forward(gu, (16, 16)).isnan().any()


@pytest.mark.parametrize("block", [64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_experts_touches_only_the_dropped_experts(block, dtype):
    dw = torch.randn(5, 7, 33).to(dtype)
    before = dw.clone()
    keep = torch.tensor([True, False, True, False, False])
    out = triton_glue.zero_experts_(dw, keep, block=block)
    assert out is dw
    assert (dw[~keep] == 0).all()
    assert torch.equal(dw[keep], before[keep])  # kept experts bit-identical


def test_empty_inputs():
    gu = torch.empty(0, 8)
    assert triton_glue.swiglu_forward(gu).shape == (0, 4)
    dgu, hw, dwp = triton_glue.swiglu_backward(torch.empty(0, 4), gu, torch.empty(0, dtype=torch.int32),
                                               torch.empty(0), None)
    assert dgu.shape == (0, 8) and hw.shape == (0, 4) and dwp.shape == (0,)
    triton_glue.zero_experts_(torch.empty(0, 3, 3), torch.empty(0, dtype=torch.bool))
