"""``DESMOE_TMA=1``: the row-tile GEMMs (up_swiglu, down, dh_swiglu, dx) read their weight operand through tensor
descriptors (TMA on sm_90; desmoe.kernels.moe ``_weight_desc`` / ``_tma_tile``). On CPU the kernels run under the
Triton interpreter, which executes ``tl.make_tensor_descriptor`` loads (bounds, zero fill, 16-byte alignment
checks); the sm_90 compile facts of the TMA variant are in tests/kernels/test_triton_compile.py.

The switch is read once at import (``moe_configs.TMA``) and by the launchers at call time, so these tests flip the
module attribute with monkeypatch.
"""
import contextvars
import os
import subprocess
import sys

import pytest
import torch

triton_experts = pytest.importorskip("desmoe.ops.triton_experts")
from test_triton_kernels import _check_experts, _close  # noqa: E402  (tests/kernels is on sys.path)

from desmoe import ops  # noqa: E402

from desmoe.kernels import moe_configs as mc  # noqa: E402
from desmoe.ops import reference as ref  # noqa: E402
from desmoe.ops import triton_common  # noqa: E402

TMA_KERNELS = ("up_swiglu_kernel", "down_kernel", "dh_swiglu_kernel", "dx_kernel")


class _Spy:
    """Records the USE_TMA each launch of a kernel got."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen.append(kwargs["USE_TMA"])
            return launch(*args, **kwargs)

        return call

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.fixture
def spies(monkeypatch):
    monkeypatch.setenv("DESMOE_POISON_OUTPUTS", "1")  # unwritten outputs are NaN
    out = {}
    for name in TMA_KERNELS:
        out[name] = _Spy(getattr(triton_experts._mk, name))
        monkeypatch.setattr(triton_experts._mk, name, out[name])
    return out


PAD = 4


def _grads(fn, x, buf1, buf2, ids, w, go, I, D, **masks):
    """Output and gradients of ``fn`` with the weights as views into ``buf1`` / ``buf2``, buffers PAD larger in
    their last two dims and NaN there: a descriptor tile that reads past a view's rows (into the next expert's)
    or columns (a K tail not zero-filled) brings NaN into the result, where the pointer path's masks never read
    them. The leaves are the buffers (a view's clone would be contiguous); their gradient's pad must be 0."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, buf1, buf2, w)]
    w1, w2 = leaves[1][:, :2 * I, :D], leaves[2][:, :D, :I]
    assert w1.stride(1) == D + PAD and w2.stride(1) == I + PAD
    out = fn(leaves[0], w1, w2, ids, leaves[3], **masks)
    g = torch.autograd.grad((out.float() * go).sum(), leaves, allow_unused=True)
    g = [torch.zeros_like(t) if d is None else d for d, t in zip(g, leaves)]
    for d in g[1:3]:  # the pad of each weight buffer gets no gradient
        assert not d[:, -PAD:].any() and not d[:, :, -PAD:].any()
    return [out, g[0], g[1][:, :2 * I, :D], g[2][:, :D, :I], g[3]]


# (T, E, K, D, I): D, I multiples of 4 (fp32 strides 16-byte aligned) but not of the interpreter's 16-wide tiles, so
# every kernel has K and N tails; several row tiles per expert
TMA_CASES = [(29, 5, 2, 20, 12), (40, 3, 2, 36, 28)]


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("T,E,K,D,I", TMA_CASES)
def test_tma_experts_values_and_grads(monkeypatch, spies, T, E, K, D, I, masks):
    monkeypatch.setattr(mc, "TMA", True)
    g = torch.Generator().manual_seed(T + D)
    x = torch.randn(T, D, generator=g)
    buf1 = torch.full((E, 2 * I + PAD, D + PAD), float("nan"))
    buf1[:, :2 * I, :D] = torch.randn(E, 2 * I, D, generator=g) * 0.3
    buf2 = torch.full((E, D + PAD, I + PAD), float("nan"))
    buf2[:, :D, :I] = torch.randn(E, D, I, generator=g) * 0.3
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    go = torch.randn(T, D, generator=g)
    kw = {}
    if masks:
        kw = {"expert_trainable_E": torch.arange(E) % 2 == 0, "pair_trainable_TK": torch.rand(T, K, generator=g) > 0.3}
    fast = _grads(lambda *a, **m: ops.moe_experts(*a, backend="triton", **m), x, buf1, buf2, ids, w, go, I, D, **kw)
    expect = _grads(ref.moe_experts_reference, x, buf1, buf2, ids, w, go, I, D, **kw)
    for name, a, b in zip(("out", "dx", "dW_gate_up", "dW_down", "d topk_weights"), fast, expect):
        _close(a, b, 2e-5, 2e-4, name)
    for name, spy in spies.items():  # every GEMM ran the descriptor path
        assert spy.seen and all(spy.seen), (name, spy.seen)


def test_tma_falls_back_where_no_descriptor_fits(monkeypatch, spies):
    # D = 17, I = 13: fp32 rows of 68 B and 52 B, not 16-byte aligned; transposed weights: the contiguous dim is not the kernels'
    # last one. Both run the pointer path (USE_TMA=False) and stay right.
    monkeypatch.setattr(mc, "TMA", True)
    g = torch.Generator().manual_seed(3)
    E, K, T = 3, 2, 11
    for D, I, noncontig in ((17, 13, False), (20, 12, True)):
        x = torch.randn(T, D, generator=g)
        if noncontig:
            w1 = (torch.randn(E, D, 2 * I, generator=g) * 0.3).transpose(1, 2)
            w2 = (torch.randn(E, I, D, generator=g) * 0.3).transpose(1, 2)
        else:
            w1 = torch.randn(E, 2 * I, D, generator=g) * 0.3
            w2 = torch.randn(E, D, I, generator=g) * 0.3
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        _check_experts(x, w1, w2, ids, torch.rand(T, K, generator=g) + 0.1)
    for name, spy in spies.items():
        assert spy.seen and not any(spy.seen), (name, spy.seen)


def test_tma_off_by_default(spies):
    if "DESMOE_TMA" in os.environ:
        pytest.skip("DESMOE_TMA is set in this environment")
    assert mc.TMA is False
    g = torch.Generator().manual_seed(1)
    E, K, T, D, I = 3, 2, 9, 16, 16
    _check_experts(torch.randn(T, D, generator=g), torch.randn(E, 2 * I, D, generator=g) * 0.3,
                   torch.randn(E, D, I, generator=g) * 0.3,
                   torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]), torch.rand(T, K) + 0.1)
    for spy in spies.values():
        assert spy.seen and not any(spy.seen)


@pytest.mark.parametrize("value", ["yes", "true", "2", ""])
def test_bad_tma_value_is_a_clear_error(value):
    proc = subprocess.run([sys.executable, "-c", "import desmoe.kernels.moe"], capture_output=True, text=True,
                          env={**os.environ, "DESMOE_TMA": value}, timeout=120)
    assert proc.returncode != 0
    assert "ValueError: DESMOE_TMA must be '0' (off, the default) or '1'" in proc.stderr, proc.stderr[-800:]
    assert f"got {value!r}" in proc.stderr


def test_tma_allocator_is_installed_once_per_context_and_never_replaces_one():
    """Triton keeps its allocator in a ContextVar (a new thread, e.g. autograd's backward, starts without one):
    ensure_tma_allocator sets desmoe's where none is set, is idempotent, and leaves a user's allocator alone."""
    from triton.runtime import _allocation

    def fresh():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        triton_common.ensure_tma_allocator()
        first = _allocation._allocator.get()
        triton_common.ensure_tma_allocator()
        return first, _allocation._allocator.get()

    empty = contextvars.Context()
    first, second = empty.run(fresh)
    assert first is triton_common._tma_scratch and second is first

    def user():
        mine = lambda size, alignment, stream: None  # noqa: E731
        _allocation._allocator.set(mine)
        triton_common.ensure_tma_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.Context().run(user)


def test_tma_grid_reads_the_tma_ctas_per_sm():
    # the persistent grid of a USE_TMA launch is sized from the TMA variant's own compile facts (moe_configs
    # CTAS_PER_SM "kernel:tma" entries): up_swiglu's 64x128 tile needs 158 regs under Triton 3.9 with TMA (1 CTA/SM)
    # against 128 without (2 CTAs/SM)
    meta = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP": 8}
    assert mc.ctas_per_sm("up_swiglu_kernel", {**meta, "USE_TMA": False}, mode="default") == 2
    assert mc.ctas_per_sm("up_swiglu_kernel", {**meta, "USE_TMA": True}, mode="default") == 1
