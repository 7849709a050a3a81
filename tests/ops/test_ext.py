"""The C++/CUDA extension (``desmoe.ops._C``, loaded by ``desmoe.ops.extension``; one Python module per op in
``desmoe.ops``): CPU ops vs the PyTorch reference, errors, fallback, torch.compile, nvcc compile-only check of the
CUDA sources, and CUDA-vs-CPU tests (``@pytest.mark.gpu``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

from desmoe import ops
from desmoe.ops import extension as ext
from desmoe.ops import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")

needs_ext = pytest.mark.skipif(not ext.available(), reason=f"extension not built: {ext.info().get('error')}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (NaN payloads included) for bitwise comparisons."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(view)


def _random_grads(E_list, dtypes, device="cpu", poison=True):
    grads, masks = [], []
    for i, (E, dtype) in enumerate(zip(E_list, dtypes)):
        shape = [(E, 3, 5), (E, 33), (E, 1), (E, 4, 2, 3)][i % 4]
        g = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
        m = torch.rand(E, device=device) > 0.5
        if poison and E > 0:
            g.view(E, -1)[:, 0] = float("nan")  # NaN/Inf in every row: zeros must overwrite, kept rows keep them
            g.view(E, -1)[:, -1] = float("inf")
        grads.append(g)
        masks.append(m)
    return grads, masks


# ------------------------------------------------------------------------------------------ info / API


def test_info_reports_source_and_build():
    inf = ext.info()
    for key in ("available", "source", "cuda", "cuda_arch_list", "compiler", "openmp"):
        assert key in inf
    assert inf["source"] in ("prebuilt", "jit", "reference")
    assert inf["available"] == (inf["source"] != "reference") == ext.available()
    if inf["available"]:
        assert hasattr(torch.ops.desmoe, "routing_stats")
        assert isinstance(inf["compiler"], str) and inf["compiler"]
    else:
        assert inf["error"]


def test_import_is_lazy():
    """``import desmoe.ops.extension`` neither loads nor builds the extension: that happens on first use."""
    code = ("import sys, desmoe.ops.extension as x; a = 'desmoe.ops._C' in sys.modules; x.available(); "
            "print(a, bool(x._LOADED))")
    env = dict(os.environ, DESMOE_NO_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


# ------------------------------------------------------------------------------------ mask_expert_grads_


@needs_ext
@pytest.mark.parametrize("scale", [0.0, 0.5, -3.0])
def test_mask_expert_grads_matches_reference_mixed_dtypes(scale):
    E_list = [7, 13, 1, 64, 5, 0]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bfloat16, torch.float32]
    grads, masks = _random_grads(E_list, dtypes)
    originals = [g.clone() for g in grads]
    expected = [g.clone() for g in grads]
    ref.mask_expert_grads_reference(expected, masks, scale)
    ops.mask_expert_grads_(grads + [None], masks + [torch.ones(3, dtype=torch.bool)], scale)
    for g, e, o, m in zip(grads, expected, originals, masks):
        # Exact values; NaN * scale may carry another NaN payload than PyTorch's, so NaN == NaN here.
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(_bits(g[m]), _bits(o[m])), "a trainable row changed"
        if scale == 0.0 and (~m).any():
            assert (_bits(g[~m]) == 0).all(), "frozen rows must be exact +0.0 even over NaN/Inf"


@needs_ext
def test_mask_expert_grads_many_layers_one_call_and_noncontiguous():
    L, E = 26, 11
    grads = [torch.randn(E, 6, 4, dtype=torch.bfloat16) for _ in range(L)]
    grads += [torch.randn(E, 5, 6).transpose(1, 2)]  # non-contiguous: reference path, same semantics
    masks = [torch.rand(E) > 0.3 for _ in grads]
    masks[0][:] = True
    masks[1][:] = False
    expected = [g.clone() for g in grads]
    ref.mask_expert_grads_reference(expected, masks, 0.0)
    ops.mask_expert_grads_(grads, masks)
    for g, e in zip(grads, expected):
        assert torch.equal(_bits(g), _bits(e))
    assert (grads[1] == 0).all()


@needs_ext
def test_mask_expert_grads_op_checks_arguments():
    g = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="masks"):
        torch.ops.desmoe.mask_expert_grads_([g], [torch.ones(4, dtype=torch.int32)], 0.0)
    with pytest.raises(RuntimeError, match="masks"):
        torch.ops.desmoe.mask_expert_grads_([g], [torch.ones(5, dtype=torch.bool)], 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.desmoe.mask_expert_grads_([g.t()], [torch.ones(3, dtype=torch.bool)], 0.0)


def test_mask_expert_grads_wrapper_errors():
    g = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one mask per gradient"):
        ops.mask_expert_grads_([g], [])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        ops.mask_expert_grads_([g], [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        ops.mask_expert_grads_([torch.ones(4, 3, dtype=torch.int64)], [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(TypeError, match="scale"):
        ops.mask_expert_grads_([g], [torch.ones(4, dtype=torch.bool)], scale="0")


# ------------------------------------------------------------------------------------------ pair_mask


@needs_ext
@pytest.mark.parametrize(
    "L,T,K,M,E,id_dtype,shared_mask",
    [(3, 17, 2, 3, 7, torch.int64, False), (1, 1, 1, 1, 1, torch.int32, True), (2, 0, 4, 2, 5, torch.int64, False),
     (4, 31, 13, 5, 13, torch.int32, False), (2, 64, 6, 4, 64, torch.int64, True)],
)
def test_pair_mask_matches_oracle(L, T, K, M, E, id_dtype, shared_mask):
    ids_LTK = torch.stack([torch.rand(T, E).argsort(dim=1)[:, :K] for _ in range(L)]).to(id_dtype)
    dom_T = torch.randint(-1, M, (T,), dtype=id_dtype)
    mask = torch.rand((M, E) if shared_mask else (L, M, E)) > 0.5
    out = ops.pair_mask(dom_T, ids_LTK, mask)
    assert out.dtype == torch.bool and out.shape == (L, T, K)
    for l in range(L):  # the existing per-layer oracle
        assert torch.equal(out[l], ref.pair_mask_reference(dom_T, ids_LTK[l], mask if shared_mask else mask[l]))
    as_list = ops.pair_mask(dom_T, list(ids_LTK.unbind(0)), mask)
    assert torch.equal(as_list, out)


def test_pair_mask_out_of_range_is_a_clear_error():
    dom_T = torch.tensor([0, 1, -1])
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"topk_ids_LTK: expert id 5 is out of range"):
        ops.pair_mask(dom_T, torch.tensor([[[0], [5], [1]]]), mask)
    with pytest.raises(ValueError, match=r"topk_ids_LTK: expert id -2"):
        ops.pair_mask(dom_T, torch.tensor([[[0], [-2], [1]]]), mask)
    with pytest.raises(ValueError, match=r"token_domains_T: domain id 2"):
        ops.pair_mask(torch.tensor([0, 2, -1]), torch.tensor([[[0], [1], [1]]]), mask)
    with pytest.raises(ValueError, match="topk_ids_LTK"):
        ops.pair_mask(dom_T, torch.zeros(3, 1, dtype=torch.long), mask)  # [T, K] without L
    with pytest.raises(ValueError, match="domain_expert_mask_LME"):
        ops.pair_mask(dom_T, torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(3, 2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_domains_T"):
        ops.pair_mask(dom_T.float(), torch.zeros(1, 3, 1, dtype=torch.long), mask)


@needs_ext
def test_pair_mask_op_raises_on_out_of_range_without_python_validation():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"topk_ids_LTK.*expert id 7 at \[0, 1, 0\]"):
        torch.ops.desmoe.pair_mask(torch.tensor([0, 1]), torch.tensor([[[0], [7]]]), mask)
    with pytest.raises(RuntimeError, match="token_domains_T.*domain id 3"):
        torch.ops.desmoe.pair_mask(torch.tensor([0, 3]), torch.tensor([[[0], [1]]]), mask)
    with pytest.raises(RuntimeError, match="domain_expert_mask_LME.*bool"):
        torch.ops.desmoe.pair_mask(torch.tensor([0, 1]), torch.tensor([[[0], [1]]]), mask.int())


# ------------------------------------------------------------------------------------- routing_stats


def _random_routing(L, T, K, M, E, id_dtype=torch.int64, device="cpu"):
    ids_LTK = torch.stack([torch.rand(T, E, device=device).argsort(dim=1)[:, :K] for _ in range(L)]).to(id_dtype)
    w_LTK = torch.rand(L, T, K, device=device).softmax(dim=-1)
    dom_T = torch.randint(-1, M, (T,), device=device)
    valid_T = torch.rand(T, device=device) > 0.2
    return ids_LTK, w_LTK, dom_T, valid_T


@needs_ext
@pytest.mark.parametrize(
    "L,T,K,M,E,id_dtype", [(3, 37, 2, 3, 7, torch.int64), (1, 1, 1, 1, 1, torch.int32), (2, 0, 3, 2, 5, torch.int64),
                           (5, 129, 6, 4, 61, torch.int32), (2, 50, 8, 2, 8, torch.int64)],
)
@pytest.mark.parametrize("with_weights,with_valid", [(True, True), (False, False), (True, False)])
def test_routing_stats_matches_reference(L, T, K, M, E, id_dtype, with_weights, with_valid):
    ids_LTK, w_LTK, dom_T, valid_T = _random_routing(L, T, K, M, E, id_dtype)
    w_LTK = w_LTK if with_weights else None
    valid_T = valid_T if with_valid else None
    counts, mass, load = ops.routing_stats(ids_LTK, dom_T, M, E, topk_weights_LTK=w_LTK, valid_T=valid_T)
    r_counts, r_mass, r_load = ref.routing_stats_reference(ids_LTK, dom_T, M, E, w_LTK, valid_T)
    assert counts.dtype == torch.int64 and mass.dtype == torch.float32 and load.dtype == torch.int64
    assert counts.shape == (L, M, E) and mass.shape == (L, M, E) and load.shape == (L, E)
    assert torch.equal(counts, r_counts) and torch.equal(load, r_load)
    torch.testing.assert_close(mass, r_mass, rtol=1e-6, atol=T * K * 2.0**-32 + 1e-7)
    # Independent invariants, not just reference agreement.
    v = torch.ones(T, dtype=torch.bool) if valid_T is None else valid_T
    assert int(load.sum()) == L * K * int(v.sum())
    assert int(counts.sum()) == L * K * int((v & (dom_T >= 0)).sum())
    again = ops.routing_stats(ids_LTK, dom_T, M, E, topk_weights_LTK=w_LTK, valid_T=valid_T)
    assert all(torch.equal(a, b) for a, b in zip(again, (counts, mass, load))), "not deterministic"


def test_routing_stats_errors():
    ids = torch.tensor([[[0, 1], [2, 3]]])
    dom = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="topk_ids_LTK: expert id 3"):
        ops.routing_stats(ids, dom, 2, 3)
    with pytest.raises(ValueError, match="token_domains_T: domain id 1"):
        ops.routing_stats(ids, dom, 1, 4)
    with pytest.raises(ValueError, match="num_experts"):
        ops.routing_stats(ids, dom, 2, 0)
    with pytest.raises(ValueError, match="topk_weights_LTK"):
        ops.routing_stats(ids, dom, 2, 4, topk_weights_LTK=torch.rand(1, 2, 3))
    with pytest.raises(ValueError, match="valid_T"):
        ops.routing_stats(ids, dom, 2, 4, valid_T=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_domains_T"):
        ops.routing_stats(ids, torch.tensor([0, 1, 0]), 2, 4)


@needs_ext
def test_routing_stats_op_raises_on_out_of_range_without_python_validation():
    with pytest.raises(RuntimeError, match=r"topk_ids_LTK.*expert id 9"):
        torch.ops.desmoe.routing_stats(torch.tensor([[[0, 9]]]), torch.tensor([0]), 1, 4, None, None)
    with pytest.raises(RuntimeError, match="topk_weights_LTK.*float32"):
        torch.ops.desmoe.routing_stats(torch.tensor([[[0, 1]]]), torch.tensor([0]), 1, 4,
                                       torch.ones(1, 1, 2, dtype=torch.float64), None)


# ------------------------------------------------------------------------------------- affinity_ema_


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0])
def test_affinity_ema_matches_reference(dtype, momentum):
    L, M, E = 3, 4, 13
    A = torch.rand(L, M, E, dtype=dtype)
    counts = torch.randint(0, 50, (L, M, E))
    counts[0, 1] = 0  # a domain with no tokens this step keeps its row
    counts[2, 3] = 0
    expected = ref.affinity_ema_reference(A.clone(), counts, momentum)
    before = A.clone()
    out = ops.affinity_ema_(A, counts, momentum)
    assert out is A
    torch.testing.assert_close(A, expected, rtol=0, atol=0 if dtype == torch.float64 else 1e-7)
    assert torch.equal(A[0, 1], before[0, 1]) and torch.equal(A[2, 3], before[2, 3])
    if momentum == 0.0:  # pure frequency: rows with counts sum to 1
        torch.testing.assert_close(A[1].sum(-1).double(), torch.ones(M, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_affinity_ema_errors():
    A = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="momentum"):
        ops.affinity_ema_(A, torch.zeros(1, 2, 3, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="counts_LME"):
        ops.affinity_ema_(A, torch.zeros(1, 2, 4, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="A_LME"):
        ops.affinity_ema_(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.5)


# ------------------------------------------------------------------------------------------ fallback


@needs_ext
def test_reference_fallback_equals_extension(monkeypatch):
    grads, masks = _random_grads([7, 5], [torch.float32, torch.bfloat16])
    ids_LTK, w_LTK, dom_T, valid_T = _random_routing(2, 23, 3, 3, 9)
    mask_LME = torch.rand(2, 3, 9) > 0.5
    A = torch.rand(2, 3, 9)

    def run():
        gs = [g.clone() for g in grads]
        ops.mask_expert_grads_(gs, masks, 0.25)
        p = ops.pair_mask(dom_T, ids_LTK, mask_LME)
        c, m, ld = ops.routing_stats(ids_LTK, dom_T, 3, 9, topk_weights_LTK=w_LTK, valid_T=valid_T)
        a = ops.affinity_ema_(A.clone(), c, 0.8)
        return gs, p, c, m, ld, a

    fast = run()
    monkeypatch.setenv("DESMOE_NO_EXT", "1")
    ext._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="DESMOE_NO_EXT"):
            assert not ext.available()
        assert ext.info()["source"] == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per process, not per call
            slow = run()
    finally:
        monkeypatch.delenv("DESMOE_NO_EXT")
        ext._reset_for_tests()
    assert ext.available()
    for g, h in zip(fast[0], slow[0]):
        torch.testing.assert_close(g, h, rtol=0, atol=0, equal_nan=True)
    for name, a, b in zip(("pair", "counts", "mass", "load", "A"), fast[1:], slow[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_jit_build_fallback():
    """A fresh process without the prebuilt module JIT-builds csrc/ (ninja) into the cache and uses it. The
    cache (DESMOE_EXT_CACHE or ~/.cache/desmoe) makes reruns a quick no-op; the first build takes ~1-2 min."""
    pytest.importorskip("ninja")
    code = ("import torch, desmoe.ops as o, desmoe.ops.extension as x; i = x.info(); assert i['source'] == 'jit', i; "
            "p = o.pair_mask(torch.tensor([0, -1]), torch.tensor([[[1], [0]]]), torch.tensor([[False, True]])); "
            "assert p.tolist() == [[[True], [False]]], p; print('ok', i['openmp'])")
    env = dict(os.environ, DESMOE_NO_PREBUILT="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]


# ------------------------------------------------------------------------------------- torch.compile


@needs_ext
def test_ops_under_torch_compile_fullgraph():
    def step(g1, g2, m1, m2, ids_LTK, dom_T, mask_LME, A_LME):
        ops.mask_expert_grads_([g1, g2], [m1, m2], 0.0)
        pair = ops.pair_mask(dom_T, ids_LTK, mask_LME)
        counts, mass, load = ops.routing_stats(ids_LTK, dom_T, 3, 5)
        ops.affinity_ema_(A_LME, counts, 0.9)
        return pair, counts, mass, load

    args = [torch.randn(5, 4), torch.randn(5, 2, 3).bfloat16(), torch.rand(5) > 0.5, torch.rand(5) > 0.5,
            torch.randint(0, 5, (2, 4, 2)), torch.randint(-1, 3, (4,)), torch.rand(2, 3, 5) > 0.5, torch.zeros(2, 3, 5)]
    eager_args = [a.clone() for a in args]
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(step, fullgraph=True)(*args)
    except Exception as e:  # a compiler toolchain problem, not ours, must still be visible
        if time.perf_counter() - t0 > 30:
            pytest.skip(f"torch.compile too slow here: {e}")
        raise
    eager = step(*eager_args)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    for a, b in zip(args, eager_args):  # in-place effects happened in the compiled graph too
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- nvcc compile-only


def _nvcc():
    from torch.utils import cpp_extension

    path = shutil.which("nvcc")
    if path is None and cpp_extension.CUDA_HOME:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        path = cand if os.path.exists(cand) else None
    return path


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
def test_cuda_sources_compile_with_nvcc():
    """Compile-only: every csrc/*.cu against this torch's headers (a CPU torch lacks one generated CUDA
    header, shimmed here), as one translation unit. Linking and running is the GPU tests' job."""
    from torch.utils import cpp_extension

    sources = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
    assert sources, "no CUDA sources in csrc/"
    with tempfile.TemporaryDirectory() as tmp:
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}"]
        torch_inc = cpp_extension.include_paths()[0]
        if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
            shim = os.path.join(tmp, "shim", "c10", "cuda", "impl")
            os.makedirs(shim)
            with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(f"-I{os.path.join(tmp, 'shim')}")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        # One translation unit including every .cu: the torch headers are parsed once (~3x faster than one
        # nvcc per file on a busy 2-core machine); the real build still compiles them separately.
        unity = os.path.join(tmp, "all_sources.cu")
        with open(unity, "w") as f:
            f.writelines(f'#include "{os.path.join(CSRC, src)}"\n' for src in sources)
        obj = os.path.join(tmp, "all_sources.o")
        cmd = [_nvcc(), "-c", unity, "-o", obj, "-std=c++20", "-arch=sm_90", "-O1", "-Xcompiler", "-O0",
               "--expt-relaxed-constexpr", "-DDESMOE_WITH_CUDA=1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", *includes]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        failures = [] if out.returncode == 0 else [out.stdout[-4000:]]
        if not failures and os.path.getsize(obj) == 0:
            failures.append("empty object file")
        assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------- CUDA vs CPU


def _needs_cuda_ext():
    if not (ext.available() and ext.info()["cuda"]):
        pytest.skip(f"extension built without CUDA kernels: {ext.info()}")


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_cuda_mask_expert_grads_matches_cpu(scale):
    _needs_cuda_ext()
    E_list = [7, 13, 64, 3, 1]
    dtypes = [torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float64]
    grads, masks = _random_grads(E_list, dtypes)
    grads.append(torch.randn(5, 40000, 3, dtype=torch.bfloat16))  # rows spanning several 64 KiB chunks
    masks.append(torch.tensor([False, True, False, True, False]))
    grads_cuda = [g.cuda() for g in grads]
    masks_cuda = [m.cuda() for m in masks]
    off = torch.randn(9 * 7 + 1, device="cuda")[1:].view(9, 7)  # 4-byte-offset storage: scalar path
    grads_cuda.append(off)
    masks_cuda.append(torch.rand(9, device="cuda") > 0.5)
    grads.append(off.cpu())
    masks.append(masks_cuda[-1].cpu())
    ops.mask_expert_grads_(grads, masks, scale)
    ops.mask_expert_grads_(grads_cuda, masks_cuda, scale)
    torch.cuda.synchronize()
    for g, gc, m in zip(grads, grads_cuda, masks):
        torch.testing.assert_close(g, gc.cpu(), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(_bits(g[m]), _bits(gc.cpu()[m]))


@pytest.mark.gpu
@pytest.mark.parametrize("L,T,K,M,E",
                         [(3, 1000, 6, 4, 64), (2, 3001, 8, 16, 256), (1, 0, 2, 2, 5), (26, 257, 6, 3, 61)])
def test_cuda_pair_mask_and_routing_stats_match_cpu(L, T, K, M, E):
    _needs_cuda_ext()
    ids_LTK, w_LTK, dom_T, valid_T = _random_routing(L, T, K, M, E)
    mask = torch.rand(L, M, E) > 0.5
    pair_cpu = ops.pair_mask(dom_T, ids_LTK, mask)
    pair_gpu = ops.pair_mask(dom_T.cuda(), ids_LTK.cuda(), mask.cuda(), validate=False)
    assert torch.equal(pair_cpu, pair_gpu.cpu())
    cpu = ops.routing_stats(ids_LTK, dom_T, M, E, topk_weights_LTK=w_LTK, valid_T=valid_T)
    gpu = ops.routing_stats(ids_LTK.cuda(), dom_T.cuda(), M, E, topk_weights_LTK=w_LTK.cuda(),
                            valid_T=valid_T.cuda(), validate=False)
    for a, b in zip(cpu, gpu):  # fixed-point mass: bitwise equal, whatever the block schedule
        assert torch.equal(a, b.cpu())
    A = torch.rand(L, M, E)
    A_gpu = A.cuda()
    ops.affinity_ema_(A, cpu[0], 0.9)
    ops.affinity_ema_(A_gpu, gpu[0], 0.9)
    torch.testing.assert_close(A, A_gpu.cpu(), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ fuzzing

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    st = None


if st is not None:

    @needs_ext
    @settings(max_examples=40, deadline=None)
    @given(L=st.integers(1, 4), T=st.integers(0, 40), M=st.integers(1, 5), E=st.integers(1, 17),
           data=st.data())
    def test_fuzz_pair_mask_and_routing_stats(L, T, M, E, data):
        K = data.draw(st.integers(1, E))
        seed = data.draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        ids_LTK = torch.randint(0, E, (L, T, K), generator=g)  # repeats allowed: the ops do not assume unique
        dom_T = torch.randint(-1, M, (T,), generator=g)
        w_LTK = torch.rand(L, T, K, generator=g)
        valid_T = torch.rand(T, generator=g) > 0.3
        mask = torch.rand(L, M, E, generator=g) > 0.5
        assert torch.equal(ops.pair_mask(dom_T, ids_LTK, mask), ref.pair_mask_layers_reference(dom_T, ids_LTK, mask))
        got = ops.routing_stats(ids_LTK, dom_T, M, E, topk_weights_LTK=w_LTK, valid_T=valid_T)
        exp = ref.routing_stats_reference(ids_LTK, dom_T, M, E, w_LTK, valid_T)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[2], exp[2])
        torch.testing.assert_close(got[1], exp[1], rtol=1e-6, atol=1e-6)
