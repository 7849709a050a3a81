"""gpt-oss's experts in desmoe's ops: biases on both projections, the stored ``[E, D, 2I]`` interleaved gate/up and
``[E, I, D]`` down layout (read as is), the clamped SwiGLU. Oracles: the float64 dense reference, and transformers'
own ``GptOssExperts`` (eager autograd) for values and every gradient, the clamp edges included. The Triton
backend runs the variant on its own kernels (tested here; their parity tests: tests/kernels/test_triton_gpt_oss.py).
"""
from unittest import mock

import pytest
import torch

from desmoe import ops
from desmoe.ops import grouped, reference as ref

LAYOUT = dict(activation="clamped_swiglu", transposed=True, interleaved=True)
SHAPES = [  # T, E, K, D, I
    (1, 4, 2, 16, 8),      # one token
    (13, 7, 3, 8, 6),      # prime T and E, unaligned widths: the per-expert fallback GEMMs
    (64, 8, 4, 32, 16),    # a larger T
    (16, 4, 4, 16, 8),     # K = E
]


def _inputs(T, E, K, D, I, dtype, seed, scale=1.0, empty=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w1 = (torch.randn(E, D, 2 * I, generator=g) * scale * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, I, D, generator=g) * I ** -0.5).to(dtype)
    b1 = (torch.randn(E, 2 * I, generator=g) * scale).to(dtype)
    b2 = (torch.randn(E, D, generator=g) * 0.5).to(dtype)
    pool = E - 1 if empty and E > K else E  # expert E-1 gets no token
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).to(dtype)
    return x, w1, w2, b1, b2, ids, w


def _run(backend, x, w1, w2, b1, b2, ids, w, limit=7.0, alpha=1.702, **masks):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, b1, b2, w)]
    out = ops.moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[5], b_gate_up=leaves[3], b_down=leaves[4],
                          backend=backend, limit=limit, alpha=alpha, **LAYOUT, **masks)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)
    return (out,) + tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


NAMES = ("out", "dx", "dw_gate_up", "dw_down", "db_gate_up", "db_down", "dweights")


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_the_dense_float64_oracle(shape):
    x, w1, w2, b1, b2, ids, w = _inputs(*shape, torch.float64, seed=sum(shape), scale=3.0)
    got = ops.moe_experts(x, w1, w2, ids, w, b_gate_up=b1, b_down=b2, backend="reference", limit=1.5, **LAYOUT)
    want = ref.moe_experts_dense_reference(x, w1, w2, ids, w, b_gate_up=b1, b_down=b2, limit=1.5, **LAYOUT)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_matches_reference_values_and_every_gradient(shape, dtype, masked):
    T, E, K, D, I = shape
    # scale 3 and limit 1.5: a good share of gates and ups lie beyond the clamps
    x, w1, w2, b1, b2, ids, w = _inputs(T, E, K, D, I, dtype, seed=T + E, scale=3.0, empty=True)
    masks = {}
    if masked:
        g = torch.Generator().manual_seed(3)
        masks = dict(expert_trainable_E=torch.rand(E, generator=g) > 0.4,
                     pair_trainable_TK=torch.rand(T, K, generator=g) > 0.3)
    got = _run("grouped", x, w1, w2, b1, b2, ids, w, limit=1.5, **masks)
    want = _run("reference", x, w1, w2, b1, b2, ids, w, limit=1.5, **masks)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    if masked:  # a frozen expert gets exactly zero gradient in its weights and both its biases
        frozen = ~masks["expert_trainable_E"]
        for name, gr in zip(NAMES[2:6], got[2:6]):
            assert gr[frozen].abs().max() == 0, name


def test_bias_gradients_are_per_expert_sums_and_masked_pairs_add_nothing():
    T, E, K, D, I = 9, 3, 2, 4, 3
    x, w1, w2, b1, b2, ids, w = _inputs(T, E, K, D, I, torch.float64, seed=5)
    pair = torch.rand(T, K, generator=torch.Generator().manual_seed(1)) > 0.5
    dout = torch.randn(T, D, dtype=torch.float64)
    for backend in ("reference", "grouped"):
        b2_ = b2.clone().requires_grad_()
        out = ops.moe_experts(x, w1, w2, ids, w, b_gate_up=b1, b_down=b2_, backend=backend,
                              pair_trainable_TK=pair, **LAYOUT)
        (g,) = torch.autograd.grad((out * dout).sum(), b2_)
        # d b_down[e] = sum over the trainable pairs (t, k) routed to e of w[t, k] * dout[t]
        want = torch.zeros(E, D, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                if pair[t, k]:
                    want[ids[t, k]] += w[t, k] * dout[t]
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{backend}: {m}")


def _stock_experts(E, D, I, alpha, limit):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, swiglu_alpha=alpha,
                       swiglu_limit=limit)
    cfg._experts_implementation = "eager"
    return GptOssExperts(cfg)


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_clamp_edges_match_stock_autograd_exactly(backend):
    # tokens that are exactly zero make h = the bias, so gate and up sit exactly on the clamp edges (gate = limit,
    # up = +-limit) and on both sides of them: autograd's clamp passes the gradient at the edge, desmoe too
    E, D, I, limit = 2, 4, 4, 2.0
    stock = _stock_experts(E, D, I, alpha=1.702, limit=limit).double()
    edge = torch.tensor([limit, limit, -limit, limit + 0.5, -limit - 0.5, 0.3, limit, -1.0], dtype=torch.float64)
    with torch.no_grad():
        stock.gate_up_proj.copy_(torch.randn(E, D, 2 * I, dtype=torch.float64))
        stock.gate_up_proj_bias.copy_(torch.stack([edge, edge.flip(0)]))
        stock.down_proj.copy_(torch.randn(E, I, D, dtype=torch.float64))
        stock.down_proj_bias.copy_(torch.randn(E, D, dtype=torch.float64))
    x = torch.zeros(3, D, dtype=torch.float64)
    x[2] = torch.randn(D, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]], dtype=torch.float64)
    dout = torch.randn(3, D, dtype=torch.float64)
    params = [stock.gate_up_proj, stock.gate_up_proj_bias, stock.down_proj, stock.down_proj_bias]

    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad((stock(xs, ids, ws) * dout).sum(), [xs, ws] + params)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = ops.moe_experts(xo, stock.gate_up_proj, stock.down_proj, ids, wo, b_gate_up=stock.gate_up_proj_bias,
                          b_down=stock.down_proj_bias, backend=backend, alpha=1.702, limit=limit, **LAYOUT)
    got = torch.autograd.grad((out * dout).sum(), [xo, wo] + params)
    torch.testing.assert_close(out, stock(x, ids, w), rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("dx", "dweights", "dw_gate_up", "db_gate_up", "dw_down", "db_down"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the edge really is the edge: the bias gradient is nonzero where gate == limit and up == +-limit
    assert want[3][0, 0] != 0 and want[3][0, 1] != 0 and want[3][0, 5] != 0


@pytest.mark.parametrize("backend", ["reference", "grouped"])
@pytest.mark.parametrize("T", [1, 13, 96])
def test_matches_stock_gpt_oss_experts_fp32_and_bf16_autocast(backend, T):
    E, K, D, I = 8, 4, 16, 12
    stock = _stock_experts(E, D, I, alpha=1.702, limit=1.0)
    g = torch.Generator().manual_seed(T)
    with torch.no_grad():
        for p in stock.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    dout = torch.randn(T, D, generator=g)
    params = list(stock.parameters())

    def grads(fn, autocast):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(xx, ww)
        gs = torch.autograd.grad((out.float() * dout).sum(), [xx, ww] + params)
        return torch.cat([out.detach().double().flatten()] + [t.double().flatten() for t in gs])

    def ours(xx, ww):
        return ops.moe_experts(xx, stock.gate_up_proj, stock.down_proj, ids, ww, b_gate_up=stock.gate_up_proj_bias,
                               b_down=stock.down_proj_bias, backend=backend, alpha=stock.alpha, limit=stock.limit,
                               **LAYOUT)

    def eager(xx, ww):
        return stock(xx, ids, ww)

    oracle = grads(eager, False)
    torch.testing.assert_close(grads(ours, False), oracle, rtol=1e-5, atol=1e-4)
    # bf16 autocast: no further from the fp32 oracle than twice stock's own autocast run (DESIGN.md's rule)
    e_bf16, o_bf16 = grads(eager, True), grads(ours, True)
    assert (o_bf16 - oracle).norm() <= 2 * (e_bf16 - oracle).norm() + 1e-3 * oracle.norm()


def test_triton_backend_runs_gpt_oss_on_the_triton_kernels():
    # the Triton kernels carry gpt-oss's variant (desmoe.kernels.moe_gpt_oss): asked for it, the Triton backend
    # runs them, not the grouped engine, and its result (values and every gradient) is the reference's; a layout
    # only half transposed/interleaved, or biases on the standard layout, still go to the grouped engine
    pytest.importorskip("triton")
    if not ops.triton_available():
        pytest.skip("desmoe.kernels do not import here")
    from desmoe.ops import triton_gpt_oss

    assert ops.triton_experts_supported("clamped_swiglu", has_bias=True, transposed=True, interleaved=True)
    assert ops.triton_experts_supported("silu", has_bias=False, transposed=True, interleaved=True)
    assert ops.triton_experts_supported("silu")
    assert not ops.triton_experts_supported("clamped_swiglu", has_bias=True, transposed=True)
    assert not ops.triton_experts_supported("silu", has_bias=True)
    assert not ops.triton_experts_supported("gelu", transposed=True, interleaved=True)
    x, w1, w2, b1, b2, ids, w = _inputs(5, 4, 2, 8, 4, torch.float32, seed=0, scale=3.0)
    with mock.patch.object(grouped, "grouped_experts", side_effect=AssertionError("grouped engine ran")), \
            mock.patch.object(triton_gpt_oss, "moe_experts_gpt_oss_fwd",
                              wraps=triton_gpt_oss.moe_experts_gpt_oss_fwd) as spy:
        got = _run("triton", x, w1, w2, b1, b2, ids, w, limit=1.5)
    assert spy.call_count == 1
    want = _run("reference", x, w1, w2, b1, b2, ids, w, limit=1.5)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bad_gpt_oss_arguments_name_the_argument():
    x, w1, w2, b1, b2, ids, w = _inputs(5, 4, 2, 8, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"w_gate_up_E2ID must be \[E, D=8, 2I\] \(transposed=True\)"):
        ops.moe_experts(x, w1.transpose(1, 2), w2, ids, w, **LAYOUT)
    with pytest.raises(ValueError, match=r"w_down_EDI must be \[E=4, I=3, D=8\] \(transposed=True\)"):
        ops.moe_experts(x, w1, w2.transpose(1, 2), ids, w, **LAYOUT)
    with pytest.raises(ValueError, match=r"b_gate_up must have shape \[4, 6\]"):
        ops.moe_experts(x, w1, w2, ids, w, b_gate_up=b1[:, :4], **LAYOUT)
    with pytest.raises(ValueError, match=r"b_down must have shape \[4, 8\]"):
        ops.moe_experts(x, w1, w2, ids, w, b_down=b2[:3], **LAYOUT)
    with pytest.raises(ValueError, match="limit .*must be a finite number > 0, got nan"):
        ops.moe_experts(x, w1, w2, ids, w, limit=float("nan"), **LAYOUT)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.moe_experts(x, w1, w2, ids, w, activation="swiglu_oai", transposed=True, interleaved=True)
