"""The first call of a new shape runs the autotuner: every candidate config runs on the real buffers. Its result
must equal the second call's and the reference, values and every gradient.

Under the interpreter each kernel normally has one config (no autotuning at all), so this test gives every
autotuned kernel two configs with different tile sizes, clears the autotune caches, and checks call 1 and call 2.
A kernel whose output depends on which configs ran (partial sums per column tile, scratch rows) fails here.
"""
import inspect

import pytest
import torch
import triton

from desmoe.ops import reference as ref

triton_experts = pytest.importorskip("desmoe.ops.triton_experts")
from desmoe import ops  # noqa: E402
from desmoe.kernels import moe as mk  # noqa: E402
from desmoe.kernels import moe_gpt_oss as gk  # noqa: E402

_BLOCKS = {"BLOCK_N": (16, 32), "BLOCK_A": (16, 32), "BLOCK_B": (32, 16)}


def _two_configs(kern):
    base = kern.configs[0]
    out = []
    for i in range(2):
        kw = dict(base.kwargs)
        for name, sizes in _BLOCKS.items():
            if name in kw:
                kw[name] = sizes[i]
        out.append(triton.Config(kw, num_warps=base.num_warps, num_stages=base.num_stages))
    return out


def _fake_bench(winner: str):
    """The interpreter has no GPU timer: each benchmark just runs the kernel once (as the autotuner would, on the
    real buffers) and reports a time that makes the first or the last config benchmarked the winner."""
    calls = [0]

    def bench(fn, quantiles=None, **_kw):
        fn()
        calls[0] += 1
        t = float(calls[0] if winner == "first" else -calls[0])
        return [t, t, t] if quantiles else t

    return bench


@pytest.fixture(params=["first", "last"])
def two_configs_each(request):
    saved = {}
    for kern in mk.AUTOTUNED + gk.AUTOTUNED:
        saved[kern] = (kern.configs, dict(kern.cache), kern._do_bench)
        kern.configs = _two_configs(kern)
        kern.cache.clear()
        _set_bench(kern, _fake_bench(request.param))
        if hasattr(kern, "configs_timings"):
            del kern.configs_timings
    yield request.param
    for kern, (configs, cache, bench) in saved.items():
        kern.configs = configs
        _set_bench(kern, bench)
        kern.cache.clear()
        kern.cache.update(cache)


def _set_bench(kern, bench):
    # Autotuner.do_bench is a cached_property over _do_bench: drop the cached value too
    kern._do_bench = bench
    kern.__dict__.pop("do_bench", None)


def test_first_call_equals_second_and_reference(two_configs_each):
    masks = two_configs_each == "last"  # both winners, with and without DES-MoE masks, in two runs
    T, E, K, D, I = 23, 5, 2, 24, 40  # I = 40: two 16-wide and one 32-wide ... column tiles differ per config
    x = torch.randn(T, D)
    w1 = torch.randn(E, 2 * I, D) * 0.2
    w2 = torch.randn(E, D, I) * 0.2
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    wts = torch.rand(T, K) + 0.1
    em = torch.tensor([True, False, True, True, False]) if masks else None
    pm = (torch.rand(T, K) > 0.3) if masks else None
    dout = torch.randn(T, D)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, wts)]
        out = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        grads = torch.autograd.grad(out, leaves, dout)
        return [out.detach(), *grads]

    def fast(*a):
        return triton_experts.moe_experts(*a, expert_trainable_E=em, pair_trainable_TK=pm)

    def oracle(*a):
        return ref.moe_experts_reference(*a, activation="silu", expert_trainable_E=em, pair_trainable_TK=pm)

    expect = run(oracle)
    before = mk.autotune_stats()
    first = run(fast)
    after = mk.autotune_stats()
    tuned = [k for k in mk.AUTOTUNED if len(getattr(k, "configs_timings", None) or {}) == 2]
    assert len(tuned) == len(mk.AUTOTUNED), "every autotuned kernel must have benchmarked both configs"
    # the first call's compile count: 2 configs for each of the 6 kernels, one tuning each
    assert {n: after[n]["compiles"] - before[n]["compiles"] for n in after} == {n: 2 for n in after}
    second = run(fast)
    assert {n: v["compiles"] for n, v in mk.autotune_stats().items()} == {n: v["compiles"] for n, v in after.items()}
    names = ["out", "dx", "dW_gate_up", "dW_down", "d weights"]
    for name, a, b, c in zip(names, first, second, expect):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4, msg=lambda m: f"call 1, {name}: {m}")
        torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4, msg=lambda m: f"call 2, {name}: {m}")



def test_gpt_oss_first_call_equals_second_and_reference(two_configs_each):
    """gpt-oss's variant (biases, [E, D, 2I] interleaved / [E, I, D], clamped SwiGLU with the clamps binding): its
    own kernels and the shared dx / dW kernels, each benchmarking two configs on the first call."""
    masks = two_configs_each == "last"
    T, E, K, D, I = 23, 5, 2, 24, 40
    x = torch.randn(T, D)
    w1 = torch.randn(E, D, 2 * I) * 0.6
    w2 = torch.randn(E, I, D) * 0.2
    b1 = torch.randn(E, 2 * I) * 2
    b2 = torch.randn(E, D)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    wts = torch.rand(T, K) + 0.1
    em = torch.tensor([True, False, True, True, False]) if masks else None
    pm = (torch.rand(T, K) > 0.3) if masks else None
    dout = torch.randn(T, D)
    layout = dict(activation="clamped_swiglu", transposed=True, interleaved=True, limit=1.5,
                  expert_trainable_E=em, pair_trainable_TK=pm)

    def run(backend):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, wts, b1, b2)]
        out = ops.moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[3], b_gate_up=leaves[4],
                              b_down=leaves[5], backend=backend, **layout)
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        return [out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))]

    expect = run("reference")
    first = run("triton")
    used = list(gk.AUTOTUNED) + [mk.dx_kernel, mk.dw_gate_up_kernel, mk.dw_down_kernel]
    untuned = [k.fn.__name__ for k in used if len(getattr(k, "configs_timings", None) or {}) != 2]
    assert not untuned, f"these kernels did not benchmark both configs: {untuned}"
    second = run("triton")
    names = ["out", "dx", "dW_gate_up", "dW_down", "d weights", "db_gate_up", "db_down"]
    for name, a, b, c in zip(names, first, second, expect):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4, msg=lambda m: f"call 1, {name}: {m}")
        torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4, msg=lambda m: f"call 2, {name}: {m}")


def test_autotune_keys_hold_every_work_changing_constexpr():
    """A constexpr that changes the work (STORE_*, masks, BLOCK_M) must be in the key, or one variant's tuning is
    reused for another. IEEE follows the input dtype (the autotuner adds dtypes to the key); DWP_COLS is fixed."""
    for kern in mk.AUTOTUNED + gk.AUTOTUNED:
        tuned = set(kern.configs[0].kwargs)
        params = inspect.signature(kern.base_fn).parameters.values()
        constexprs = {p.name for p in params if "constexpr" in str(p.annotation)} - tuned - {"IEEE", "DWP_COLS"}
        assert "BLOCK_M" in constexprs or kern.fn.__name__.startswith("dw_")
        assert constexprs <= set(kern.keys), (kern.fn.__name__, constexprs - set(kern.keys))


def test_default_config_sets_are_small():
    """The default sweep (a first call's compiles) stays at 2 candidates per kernel and row-tile height; the full
    sweep (DESMOE_AUTOTUNE=full) contains it."""
    for name, by_bm in mk.GPU_CONFIGS["default"].items():
        for bm, configs in by_bm.items():
            assert 1 <= len(configs) <= 2, (name, bm)
            assert all(c in mk.GPU_CONFIGS["full"][name][bm] for c in configs)
            for c in configs:  # every candidate's routing-weight partial-dot layout is config independent
                assert c.kwargs.get("BLOCK_N", 32) % 32 == 0


def test_bad_autotune_mode_is_a_clear_error():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import desmoe.kernels.moe"], capture_output=True, text=True,
                          env={**__import__("os").environ, "DESMOE_AUTOTUNE": "fast"}, timeout=120)
    assert proc.returncode != 0 and "DESMOE_AUTOTUNE must be 'default' or 'full', got 'fast'" in proc.stderr
