"""bf16 compute under torch.autocast over fp32 master weights, as the training recipe runs (`model.dtype: bfloat16`).

autocast never reaches inside a custom op: the experts and routing ops carry their own Autocast kernels
(`desmoe/ops/_autocast.py`). Checked here: the dtypes *inside* the ops (a dispatch mode below autocast and
autograd records what the op's implementation receives), parity with transformers' own eager experts under the
same autocast (the DESIGN.md bf16 tolerance rule against an fp32 oracle), fp32 gradients on the masters, and
torch.compile.
"""
import copy
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import desmoe
from desmoe import ops
from desmoe.integrations.tiny import tiny_model, tiny_model_types

SUPPORTED = tiny_model_types()
BF16 = torch.bfloat16


class OpInputs(TorchDispatchMode):
    """Records the tensor dtypes each ``desmoe::`` op's implementation receives (below autocast and autograd)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name.startswith("desmoe."):
            self.calls.append((name, [a.dtype if isinstance(a, torch.Tensor) else None for a in args]))
        return func(*args, **(kwargs or {}))

    def dtypes(self, op: str) -> list[list]:
        return [d for n, d in self.calls if n == op]


def _experts_inputs(T=24, D=16, I=12, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).requires_grad_()
    w1 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).requires_grad_()
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    wts = torch.rand(T, K, generator=g)
    return x, w1, w2, ids, wts


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_experts_op_receives_bf16_operands_under_autocast_and_fp32_without(autocast):
    x, w1, w2, ids, wts = _experts_inputs()
    rec = OpInputs()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast), rec:
        out = ops.moe_experts(x, w1, w2, ids, wts, backend="grouped")
    (fwd,) = rec.dtypes("desmoe.grouped_experts_fwd")
    want = BF16 if autocast else torch.float32
    assert fwd[:3] == [want, want, want]  # x, W_gate_up, W_down: the GEMM operands
    assert fwd[4] == torch.float32  # routing weights are not a GEMM operand: kept as given
    assert out.dtype == want
    rec = OpInputs()
    with rec:
        out.float().square().sum().backward()
    (bwd,) = rec.dtypes("desmoe.grouped_experts_bwd")
    assert bwd[0] == want and bwd[2] == want  # dout and the saved weights: the backward GEMMs in bf16 too
    for p in (x, w1, w2):  # the masters and the input get fp32 gradients (the casts are autograd ops)
        assert p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_autocast_fp16_region_casts_to_fp16():
    # the target is the region's dtype, read at call time, not a dtype baked in at registration
    x, w1, w2, ids, wts = _experts_inputs()
    rec = OpInputs()
    with torch.autocast("cpu", dtype=torch.float16), rec:
        out = ops.moe_experts(x, w1, w2, ids, wts, backend="grouped")
    assert rec.dtypes("desmoe.grouped_experts_fwd")[0][:3] == [torch.float16] * 3
    assert out.dtype == torch.float16


def test_float64_and_disabled_regions_are_left_alone():
    x, w1, w2, ids, wts = (t.double() if t.is_floating_point() else t for t in _experts_inputs())
    rec = OpInputs()
    with torch.autocast("cpu", dtype=BF16), rec:
        ops.moe_experts(x, w1, w2, ids, wts, backend="grouped")
        with torch.autocast("cpu", enabled=False):
            ops.moe_experts(x.float(), w1.float(), w2.float(), ids, wts, backend="grouped")
    first, second = rec.dtypes("desmoe.grouped_experts_fwd")
    assert first[:3] == [torch.float64] * 3  # autocast never lowers float64 (as for its own ops)
    assert second[:3] == [torch.float32] * 3


def test_autocast_values_and_grads_match_explicit_bf16_operands():
    # the Autocast kernel == casting the operands by hand to bf16 (the op itself unchanged), values and grads
    x, w1, w2, ids, wts = _experts_inputs()
    with torch.autocast("cpu", dtype=BF16):
        a = ops.moe_experts(x, w1, w2, ids, wts, backend="grouped")
    a.float().square().sum().backward()
    ga = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    b = ops.moe_experts(x.to(BF16), w1.to(BF16), w2.to(BF16), ids, wts, backend="grouped")
    b.float().square().sum().backward()
    assert torch.equal(a, b)
    for g, t in zip(ga, (x, w1, w2)):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


def test_triton_experts_op_receives_bf16_under_autocast():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or the interpreter")
    if not ops.triton_available():
        pytest.skip("Triton not importable")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w1, w2, ids, wts = (t.to(dev) for t in _experts_inputs(T=8, D=16, I=16, E=4, K=2))
    rec = OpInputs()
    with torch.autocast(dev, dtype=BF16), rec:
        out = ops.moe_experts(x, w1, w2, ids, wts, backend="triton")
    calls = rec.dtypes("desmoe.moe_experts_fwd") or rec.dtypes("desmoe.grouped_experts_fwd")
    assert calls, rec.calls
    assert calls[0][:3] == [BF16] * 3
    assert out.dtype == BF16


def test_routing_op_under_autocast_scores_in_fp32():
    # routing follows autocast's softmax policy (fp32 scores, as every HF router computes them); the Triton op
    # gets the rule registered, the reference computes in fp32 already: same weights either way
    logits = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=BF16):
        w_ac, i_ac = ops.topk_route(logits.to(BF16), 2)
    w, i = ops.topk_route(logits.to(BF16).float(), 2)
    assert w_ac.dtype == torch.float32
    assert torch.equal(i_ac, i) and torch.equal(w_ac, w)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_patched_model_under_autocast_runs_its_experts_in_bf16(model_type):
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = desmoe.patch(tiny_model(model_type).train())  # fp32 masters, default backend (grouped on CPU)
    rec = OpInputs()
    with torch.autocast("cpu", dtype=BF16), rec:
        loss = ours(ids, labels=ids).loss
    loss.backward()
    fwd = rec.dtypes("desmoe.grouped_experts_fwd")
    assert len(fwd) >= ours.config.num_hidden_layers - 1  # every MoE layer (some families have a dense first)
    assert all(d[:3] == [BF16] * 3 for d in fwd), fwd
    for n, p in ours.named_parameters():
        assert p.dtype == torch.float32, n
        if p.grad is not None:
            assert p.grad.dtype == torch.float32, n


def _flat_grads(model):
    return torch.cat([p.grad.double().reshape(-1) for _, p in sorted(model.named_parameters()) if p.grad is not None])


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_parity_with_stock_eager_under_the_same_autocast(model_type):
    # fp32 masters under torch.autocast(bf16), stock eager experts vs desmoe's default backend: logits and every
    # gradient no further from the fp32 oracle than twice stock's own distance (the DESIGN.md bf16 rule)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    oracle = tiny_model(model_type).train()
    oracle.set_experts_implementation("eager")
    stock = copy.deepcopy(oracle)
    ours = desmoe.patch(copy.deepcopy(oracle))
    ref = oracle(ids, labels=ids)
    ref.loss.backward()
    with torch.autocast("cpu", dtype=BF16):
        e = stock(ids, labels=ids)
        o = ours(ids, labels=ids)
    e.loss.backward()
    o.loss.backward()
    r, el, ol = (t.logits.double() for t in (ref, e, o))
    assert (ol - r).norm() <= 2 * (el - r).norm() + 1e-2 * r.norm()
    g_ref, g_eager, g_ours = _flat_grads(oracle), _flat_grads(stock), _flat_grads(ours)
    assert g_ours.shape == g_ref.shape
    assert (g_ours - g_ref).norm() <= 2 * (g_eager - g_ref).norm() + 1e-3 * g_ref.norm()
    # and it is bf16 compute, not fp32 that happens to be close: desmoe's distance is of bf16's order
    assert (ol - r).norm() > 1e-4 * r.norm()


def test_compiled_model_step_under_autocast_equals_eager():
    x, w1, w2, ids, wts = _experts_inputs()

    def f(x, w1, w2):
        return ops.moe_experts(x, w1, w2, ids, wts)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=BF16):
        a = cf(x, w1, w2)
        b = f(x, w1, w2)
    assert a.dtype == BF16 and torch.equal(a, b)
    a.float().sum().backward()
    assert w1.grad.dtype == torch.float32


class _LaunchSpy:
    """Wraps a Triton kernel: records (first operand's dtype, IEEE constexpr) of each launch."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen.append((args[0].dtype, args[1].dtype, kwargs.get("IEEE")))
            return launch(*args, **kwargs)

        return call

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["triton", "grouped_mm"])
def test_gpu_triton_kernels_get_bf16_and_never_ieee_under_autocast(monkeypatch, engine):
    # fp32 masters under torch.autocast(bf16) on CUDA: the kernels receive bf16 x and weights and run tensor-core
    # tl.dot (IEEE=False), forward and backward; both GEMM engines of the Triton backend
    from desmoe.ops import triton_experts

    monkeypatch.setenv("DESMOE_EXPERTS_GEMM", engine)
    spies = {}
    for name in ("up_swiglu_kernel", "down_kernel"):
        spies[name] = _LaunchSpy(getattr(triton_experts._mk, name))
        monkeypatch.setattr(triton_experts._mk, name, spies[name])
    x, w1, w2, ids, wts = (t.cuda() for t in _experts_inputs(T=512, D=256, I=128, E=8, K=2))
    x, w1, w2 = (t.detach().requires_grad_() for t in (x, w1, w2))
    rec = OpInputs()
    with torch.autocast("cuda", dtype=BF16), rec:
        out = ops.moe_experts(x, w1, w2, ids, wts, backend="triton")
    assert out.dtype == BF16
    out.float().square().sum().backward()
    assert w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    if engine == "triton":
        assert rec.dtypes("desmoe.moe_experts_fwd")[0][:3] == [BF16] * 3
        seen = spies["up_swiglu_kernel"].seen + spies["down_kernel"].seen
        assert seen and all(a == BF16 and b == BF16 and ieee is False for a, b, ieee in seen), seen
    # parity with the same op on explicit bf16 operands
    ref = ops.moe_experts(x.detach().to(BF16), w1.detach().to(BF16), w2.detach().to(BF16), ids, wts,
                          backend="triton")
    torch.testing.assert_close(out, ref)
