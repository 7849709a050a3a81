"""No recompiles for a new token count T.

Triton compiles one binary per *specialization key*: the argument types plus, for every integer argument not in the
kernel's ``do_not_specialize``, whether it equals 1 or is a multiple of 16 (and whether each pointer is 16-byte
aligned). Every size that varies with the batch (T, the pairs S, the tile-schedule length, the histogram blocks,
the pairs-per-expert bucket) is therefore listed in its kernel's ``do_not_specialize``; otherwise T = 1000, 1001,
1003, 2048 would each compile their own binaries of up to 18 kernels.

On the CPU (the interpreter runs the kernels) the test records every launch of every hot-path kernel over several
T (small ones with the residues of 1000, 1001, 1003, 2048, and 1) and computes the key Triton would derive for sm_90 from the same arguments, with Triton's own binder
(``create_function_from_signature``, the function ``JITFunction.run`` uses): no key may be new after the first T.
It also checks that the T values do exercise specialization (without ``do_not_specialize`` the keys differ).
On a GPU, ``test_no_recompiles_on_gpu`` counts the compiled binaries in every kernel's JIT cache directly.
"""
import os

import pytest
import torch

from desmoe.kernels import moe as mk
from desmoe.kernels import moe_gpt_oss as gk
from desmoe.kernels import permute as pk
from desmoe.kernels import routing as rk

KERNELS = (rk.topk_route_fwd_kernel, rk.topk_route_bwd_kernel, pk.histogram_kernel, pk.block_scan_kernel,
           pk.schedule_kernel, pk.scatter_kernel, *mk.AUTOTUNED, mk.combine_kernel, *gk.AUTOTUNED, gk.bias_grad_kernel)
# the residues mod 16 of T = 1000, 1001, 1003, 2048 (interpreter-sized), and 1: Triton specializes integers on being 1
# or a multiple of 16, so these cover every class T, S = T*K and the derived sizes can fall in
T_VALUES = (24, 25, 27, 32, 1)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _jit(kern):
    return kern.fn if hasattr(kern, "configs") else kern  # unwrap @triton.autotune


def _step(T, E=4, K=2, D=16, I=16, dtype=torch.float32, device="cpu"):
    """Routing, then both expert variants forward and backward (every hot-path kernel), at T tokens."""
    from desmoe.ops import triton_gpt_oss, triton_routing
    from desmoe.ops.triton_experts import moe_experts

    g = torch.Generator().manual_seed(T)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(True)

    logits = rnd(T, E)
    wts, ids = triton_routing.topk_route(logits, K)
    em = torch.tensor([True, False] * (E // 2), device=device)
    x, w1, w2 = rnd(T, D), rnd(E, 2 * I, D, scale=0.2), rnd(E, D, I, scale=0.2)
    out = moe_experts(x, w1, w2, ids, wts.to(dtype), expert_trainable_E=em)
    w1g, w2g, b1, b2 = rnd(E, D, 2 * I, scale=0.2), rnd(E, I, D, scale=0.2), rnd(E, 2 * I), rnd(E, D)
    out = out + triton_gpt_oss.moe_experts_gpt_oss(x, w1g, w2g, ids, wts.to(dtype), b_gate_up=b1, b_down=b2,
                                                   expert_trainable_E=em)
    out.float().square().sum().backward()


def _binders(dns: bool):
    """Per kernel: Triton's binder for sm_90, from the kernel's own ``do_not_specialize`` (or none), as the
    compiled kernel would bind its arguments (the interpreter itself keeps no specialization)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    out = {}
    for kern in KERNELS:
        jit = _jit(kern)  # an InterpretedFunction: the jit decorator's arguments are in .kwargs
        mirror = JITFunction(jit.fn, do_not_specialize=jit.kwargs.get("do_not_specialize") if dns else None)
        out[jit] = create_function_from_signature(mirror.signature, mirror.params, backend)
    return out


@pytest.mark.skipif(not INTERPRET, reason="records launches through the interpreter (the GPU test counts compiles)")
def test_specialization_keys_do_not_depend_on_T(monkeypatch):
    launches = []
    for kern in KERNELS:
        jit = _jit(kern)
        orig = jit.run

        def run(*args, _jit=jit, _orig=orig, **kwargs):
            launches.append((_jit, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(jit, "run", run)
    per_t = []
    for T in T_VALUES:
        launches.clear()
        _step(T)
        per_t.append(list(launches))
    seen = {_jit(k) for calls in per_t for k, _, _ in calls}
    assert seen == {_jit(k) for k in KERNELS}, "every hot-path kernel must run in the step"

    def keys(binders, calls):
        out = set()
        for jit, args, kwargs in calls:
            _, spec, options = binders[jit](*args, **kwargs)
            out.add((jit.__name__, str(spec), str(sorted(options.items()))))
        return out

    for dns, expect_new in ((True, False), (False, True)):
        binders = _binders(dns)
        known = keys(binders, per_t[0])
        new = {}
        for T, calls in zip(T_VALUES[1:], per_t[1:]):
            fresh = keys(binders, calls) - known
            if fresh:
                new[T] = sorted({k[0] for k in fresh})
            known |= fresh
        if expect_new:  # the T values do hit Triton's integer specialization when nothing opts out of it
            assert new, "without do_not_specialize the T values should have produced new specializations"
        else:
            assert not new, f"new specializations (recompiles) after T={T_VALUES[0]}: {new}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_recompiles_on_gpu():
    """A real count: binaries in every hot-path kernel's JIT cache (compiled or loaded from Triton's disk cache)
    after the first T, then after each new T. Shapes keep one row-tile height (pairs per expert < 256) so every
    T runs the same autotune classes; a new pairs-per-expert bucket re-tunes on the compiled binaries."""
    dev = torch.cuda.current_device()

    def compiled():
        return {_jit(k).__name__: len(_jit(k).device_caches[dev][0]) for k in KERNELS}

    counts = []
    for T in (1000, 1001, 1003, 2048):
        _step(T, E=64, K=4, D=256, I=128, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        counts.append(compiled())
    grew = {T: {n: c[n] - counts[0][n] for n in c if c[n] != counts[0][n]} for T, c in zip((1001, 1003, 2048),
                                                                                      counts[1:])}
    assert not any(grew.values()), f"recompiles after T=1000: {grew}"
