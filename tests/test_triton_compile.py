"""Every Triton kernel compiles for an H100 (sm_90) target on this machine, GPU or not.

This catches what the CPU interpreter cannot: code that fails to lower to PTX, configs that exceed shared
memory, and GEMM loops that lose tensor-core MMA (wgmma) or software pipelining (cp.async). Launch-time
specialisation is mimicked: pointers and the large sizes/strides are marked 16-divisible and unit inner strides
are constants, as Triton does for real contiguous bf16 inputs.

The compiles run in a subprocess (this file as a script) because the test process runs Triton's interpreter.
``python tests/test_triton_compile.py --full`` (TRITON_INTERPRET unset) sweeps every autotune config and prints
one JSON line per compile.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = 232448  # H100 max dynamic shared memory per block
_I32_PTRS = {"tile_expert_ptr", "tile_row_ptr", "offsets_ptr", "sorted_pairs_ptr"}
_DIV16 = {"N", "KDIM", "A_DIM", "B_DIM", "D", "S", "sx_t", "sd_t", "sw_e", "sw_r", "sw_d", "sw_i", "stride_t",
          "stride_dt"}


def _ptr(kernel: str, name: str, dt: str) -> str:
    if name in _I32_PTRS or kernel == "permute_kernel":
        return "*i32"
    if name in ("expert_mask_ptr", "pair_mask_ptr"):
        return "*u8"
    if name in ("weights_ptr", "dwp_ptr") or (kernel, name) == ("combine_kernel", "w_ptr"):
        return "*fp32"
    if kernel == "topk_route_fwd_kernel":
        return {"logits_ptr": dt, "bias_ptr": "*fp32", "ids_ptr": "*i64"}[name]
    if kernel == "topk_route_bwd_kernel":
        return {"dweights_ptr": "*fp32", "logits_ptr": dt, "ids_ptr": "*i64", "dlogits_ptr": dt}[name]
    return dt


def compile_kernel(kernel, consts: dict, num_warps: int, num_stages: int, dt: str = "*bf16") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap @triton.autotune
    name = jit.__name__
    ones = {"sx_d", "sd_d", "stride_e", "stride_de"}
    ones |= {"sw_d"} if name in ("up_swiglu_kernel", "dx_kernel") else set()
    ones |= {"sw_i"} if name in ("down_kernel", "dh_swiglu_kernel") else set()
    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        n = p.name
        if n in ones:
            sig[n], cx[n] = "constexpr", 1
            continue
        if n.endswith("_ptr") or n in _DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
        if p.is_constexpr:
            sig[n], cx[n] = "constexpr", consts[n]
        elif n.endswith("_ptr"):
            sig[n] = _ptr(name, n, dt)
        elif n in ("scaling", "renorm_eps", "masked_value"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(jit, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    return {"kernel": name, "dtype": dt, "consts": {k_: v for k_, v in consts.items()}, "num_warps": num_warps,
            "num_stages": num_stages, "shared": k.metadata.shared, "wgmma": "wgmma" in ptx,
            "cp_async": "cp.async" in ptx}


def _pruned(kern, configs, block_m):
    """The configs the kernel's own early prune keeps for bf16 inputs (the autotuner never compiles the rest)."""
    import triton

    objs = [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in configs]
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    named = {p.name: bf16 for p in kern.fn.params if p.name.endswith("_ptr")}
    keep = kern.early_config_prune(objs, named, BLOCK_M=block_m) if kern.early_config_prune else objs
    return [(c.kwargs, c.num_warps, c.num_stages) for c in keep]


def jobs(full: bool):
    from desmoe.kernels import moe as mk
    from desmoe.kernels import routing as rk

    row = mk.ROW_GEMM_GPU_CONFIGS if full else mk.ROW_GEMM_GPU_CONFIGS[:1]
    dw = mk.DW_GPU_CONFIGS if full else mk.DW_GPU_CONFIGS[:1]
    dh = {"STORE_DGU": True, "STORE_HW": True, "STORE_DWP": True, "HAS_PAIR_MASK": True}
    row_kernels = [(mk.up_swiglu_kernel, {"STORE_GATE_UP": True}), (mk.down_kernel, {}), (mk.dh_swiglu_kernel, dh),
                   (mk.dx_kernel, {})]
    for kern, extra in row_kernels:
        for BM in ((64, 128) if full else (128,)):
            for cfg, w, s in _pruned(kern, row, BM):
                yield kern, {**cfg, **extra, "BLOCK_M": BM, "IEEE": False}, w, s, "*bf16"
        # float32 inputs: the small fallback config must fit
        cfg, w, s = mk.ROW_GEMM_GPU_CONFIGS[-1]
        yield kern, {**cfg, **extra, "BLOCK_M": 128, "IEEE": True}, w, s, "*fp32"
    for kern in (mk.dw_gate_up_kernel, mk.dw_down_kernel):
        extra = {"HAS_EXPERT_MASK": True, **({"HAS_PAIR_MASK": True} if kern is mk.dw_gate_up_kernel else {})}
        for cfg, w, s in dw:
            yield kern, {**cfg, **extra, "IEEE": False}, w, s, "*bf16"
        cfg, w, s = mk.DW_GPU_CONFIGS[-1]
        yield kern, {**cfg, **extra, "IEEE": True}, w, s, "*fp32"
    yield mk.combine_kernel, {"HAS_W": True, "BLOCK_D": 1024}, 4, 1, "*bf16"
    yield rk.permute_kernel, {"BLOCK": 4096}, 8, 1, "*i32"
    route = {"TOP_K": 8, "K_PAD": 8, "E_PAD": 256, "BLOCK_T": 16, "SCORING_SIGMOID": True, "HAS_BIAS": True,
             "RENORM": True, "GROUPED": True, "N_GROUP": 8, "GROUP_SIZE": 32, "TOPK_GROUP": 4, "G_PAD": 8,
             "GROUP_TOP2SUM": True}
    yield rk.topk_route_fwd_kernel, route, 4, 1, "*bf16"
    yield rk.topk_route_fwd_kernel, {**route, "SCORING_SIGMOID": False, "HAS_BIAS": False, "GROUPED": False,
                                     "E_PAD": 128, "BLOCK_T": 32}, 4, 1, "*fp32"
    yield rk.topk_route_bwd_kernel, {"TOP_K": 8, "K_PAD": 8, "E_PAD": 128, "BLOCK_T": 32, "SCORING_SIGMOID": False,
                                     "RENORM": True}, 4, 1, "*bf16"


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset: the kernels must be real JIT functions to compile")
    full = "--full" in argv
    for kern, consts, w, s, dt in jobs(full):
        try:
            rec = compile_kernel(kern, consts, w, s, dt)
            rec["fits"] = rec["shared"] <= SMEM_LIMIT
        except Exception as exc:  # noqa: BLE001 - reported, the caller fails on it
            rec = {"kernel": str(kern), "dtype": dt, "consts": consts,
                   "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(json.dumps(rec), flush=True)
    return 0


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
    except Exception:  # noqa: BLE001
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu tests compile and run the kernels for real")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"] for r in recs}
    assert {"up_swiglu_kernel", "down_kernel", "dh_swiglu_kernel", "dx_kernel", "dw_gate_up_kernel",
            "dw_down_kernel", "combine_kernel", "permute_kernel", "topk_route_fwd_kernel",
            "topk_route_bwd_kernel"} <= names, names
    errors = [r for r in recs if "error" in r]
    assert not errors, errors
    assert all(r["fits"] for r in recs), [r for r in recs if not r["fits"]]
    gemm = [r for r in recs if r["kernel"].endswith(("swiglu_kernel", "down_kernel", "dx_kernel", "gate_up_kernel"))
            and r["dtype"] == "*bf16"]
    assert gemm and all(r["wgmma"] and r["cp_async"] for r in gemm), [r for r in gemm if not r["wgmma"]]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
