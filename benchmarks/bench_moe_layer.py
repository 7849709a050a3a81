"""Benchmark: one MoE experts layer (SwiGLU, transformers v5 weight layout), forward and forward+backward.

Side by side, same inputs, same run:
    desmoe      ``desmoe.ops.moe_experts`` (Triton kernels on CUDA; the reference on CPU)
    eager       transformers' per-expert loop (the experts module's own forward)
    grouped_mm  transformers' default ``grouped_mm_experts_forward`` (``torch._grouped_mm``)
    torch       plain PyTorch: ``desmoe.ops.reference.moe_experts_reference``
    liger       Liger-Kernel's ``LigerFusedMoEFunction`` when ``liger_kernel`` imports (skipped with a note if not)
plus ``desmoe`` with half the experts frozen (``expert_trainable_E``; pass ``fwd+bwd_frozen50``), and a dense
bf16 matmul measured on the same device as the roofline (``roofline_tflops`` in the JSON header).

TFLOP/s counts the useful work: 6·T·K·D·I forward, 18·T·K·D·I forward+backward (the frozen run is reported with
the same 18·T·K·D·I so its TFLOP/s compares directly; it skips 1/3 of half the backward).

    python benchmarks/bench_moe_layer.py                 # GPU: all shapes, T in {4096, 16384, 32768}, bf16
    python benchmarks/bench_moe_layer.py --quick         # tiny shapes (CPU-friendly, reference path), for CI
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402

# shape name -> (E, K, D, I)
SHAPES = {
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "olmoe": (64, 8, 2048, 1024),
    "deepseek_v2_lite": (64, 6, 2048, 1408),
    "mixtral_8x7b": (8, 2, 4096, 14336),
}
QUICK_SHAPES = {  # same families, toy sizes: keep E/K, shrink D/I
    "qwen3_30b_a3b": (16, 4, 32, 24),
    "olmoe": (8, 4, 32, 32),
    "deepseek_v2_lite": (8, 3, 32, 40),
    "mixtral_8x7b": (4, 2, 48, 64),
}
T_FULL = (4096, 16384, 32768)
T_QUICK = (64,)


def _hf_experts(E, D, I, impl):
    """A transformers experts module (the real HF class and dispatch) for the given implementation."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=1,
                         hidden_act="silu")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    # drop the (meta) Parameters: each call binds the benchmark's own weight tensors, so all impls share inputs
    del mod._parameters["gate_up_proj"], mod._parameters["down_proj"]
    return mod


def _make_inputs(E, K, D, I, T, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(T, D, generator=g)).to(device, dtype)
    w1 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(device, dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    weights, ids = logits.softmax(-1).topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, w1, w2, ids, weights.float()


def _impls(E, D, I, device=None):
    """name -> fn(x, w1, w2, ids, w, expert_trainable_E) or a string saying why it is skipped."""
    from desmoe import ops
    from desmoe.ops import reference

    out = {"desmoe": lambda x, w1, w2, ids, w, m=None: ops.moe_experts(x, w1, w2, ids, w, expert_trainable_E=m,
                                                                      validate_ids=False)}
    for impl in ("eager", "grouped_mm"):
        try:
            mod = _hf_experts(E, D, I, impl)
        except Exception as exc:  # noqa: BLE001 - a transformers version without this class/impl
            out[impl] = f"unavailable: {exc}"
            continue

        def run(x, w1, w2, ids, w, m=None, _mod=mod):
            # the module's weights are the benchmark's own tensors (no copies): same inputs for every impl
            _mod.gate_up_proj, _mod.down_proj = w1, w2
            return _mod(x, ids, w.to(x.dtype))

        out[impl] = run
    out["torch"] = lambda x, w1, w2, ids, w, m=None: reference.moe_experts_reference(x, w1, w2, ids, w)
    try:
        if device is not None and torch.device(device).type != "cuda":
            raise RuntimeError("Liger's Triton kernels need CUDA (the CPU interpreter cannot run them)")
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        def liger(x, w1, w2, ids, w, m=None):
            return LigerFusedMoEFunction.apply(x, w1, w2, ids.int(), w.to(x.dtype))

        out["liger"] = liger
    except Exception as exc:  # noqa: BLE001
        out["liger"] = f"skipped: liger_kernel not usable here ({type(exc).__name__}: {exc})"
    return out


def _bench_one(fn, inputs, pass_name, device, iters, frozen_mask=None):
    x, w1, w2, ids, w = inputs
    if pass_name == "fwd":
        def step():
            with torch.no_grad():
                fn(x, w1, w2, ids, w, frozen_mask)
    else:
        xl, w1l, w2l, wl = (t.detach().requires_grad_(True) for t in (x, w1, w2, w))
        leaves = (xl, w1l, w2l, wl)
        go = torch.randn_like(x)

        def step():
            out = fn(xl, w1l, w2l, ids, wl, frozen_mask)
            torch.autograd.grad(out, leaves, go, allow_unused=True)

    _common.reset_peak(device)
    ms = _common.time_fn(step, warmup=2 if device.type == "cuda" else 1, iters=iters, device=device)
    return ms, _common.peak_mem_gb(device)


def _roofline_tflops(device, dtype, quick):
    """Dense matmul throughput on this device (the ceiling a grouped GEMM can approach)."""
    n = 256 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _common.time_fn(lambda: a @ b, warmup=2, iters=5 if quick else 20, device=device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU OK; the reference path off CUDA)")
    p.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES))
    p.add_argument("--T", nargs="*", type=int, default=None, help="token counts")
    p.add_argument("--impls", nargs="*", default=None, help="subset of desmoe eager grouped_mm torch liger")
    p.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    _common.add_output_args(p)
    args = p.parse_args(argv)

    from desmoe import ops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"  # CPU: small shapes
    out = _common.output_dir(args, quick=args.quick)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    table = QUICK_SHAPES if quick else SHAPES
    shapes = args.shapes or list(table)
    Ts = args.T or (T_QUICK if quick else T_FULL)
    iters = args.iters or (3 if quick else 10)
    result = _common.header("bench_moe_layer", device)
    result["dtype"] = str(dtype).replace("torch.", "")
    result["quick"] = args.quick  # tagged only for the user's --quick
    result["small_shapes"] = quick
    result["roofline_tflops"] = _roofline_tflops(device, dtype, quick)
    result["notes"] = []
    for shape in shapes:
        E, K, D, I = table[shape]
        impls = _impls(E, D, I, device)
        for T in Ts:
            inputs = _make_inputs(E, K, D, I, T, device, dtype)
            flops = {"fwd": 6 * T * K * D * I, "fwd+bwd": 18 * T * K * D * I}
            runs = [(name, fn, ps, None) for ps in args.passes for name, fn in impls.items()
                    if args.impls is None or name in args.impls]
            if "fwd+bwd" in args.passes and (args.impls is None or "desmoe" in args.impls):
                half = torch.arange(E, device=device) % 2 == 0
                runs.append(("desmoe", impls["desmoe"], "fwd+bwd_frozen50", half))
            for name, fn, ps, mask in runs:
                if isinstance(fn, str):
                    note = f"{shape} T={T} {name}: {fn}"
                    if note not in result["notes"]:
                        result["notes"].append(note)
                    continue
                try:
                    ms, mem = _bench_one(fn, inputs, "fwd" if ps == "fwd" else "fwd+bwd", device, iters, mask)
                except torch.cuda.OutOfMemoryError:
                    result["notes"].append(f"{shape} T={T} {name} {ps}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                fl = flops["fwd" if ps == "fwd" else "fwd+bwd"]
                result["records"].append({
                    "shape": shape, "T": T, "impl": name, "pass": ps, "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12,
                    "peak_mem_gb": mem, "E": E, "K": K, "D": D, "I": I,
                    **({"backend": ops.resolve_backend(None, device)} if name == "desmoe" else {}),
                })
    _add_speedups(result)
    _common.print_table(result["records"], cols=("shape", "T", "impl", "pass", "ms", "tflops", "peak_mem_gb",
                                                  "speedup_vs_grouped_mm", "pct_roofline"))
    print(f"roofline (dense {result['dtype']} matmul): {result['roofline_tflops']:.1f} TFLOP/s")
    for n in result["notes"]:
        print("note:", n)
    if not args.no_write:
        print("wrote", _common.write_results(result, out))
    return result


def _add_speedups(result):
    base = {(r["shape"], r["T"], r["pass"]): r["ms"] for r in result["records"] if r["impl"] == "grouped_mm"}
    for r in result["records"]:
        key_pass = "fwd+bwd" if r["pass"].startswith("fwd+bwd") else r["pass"]
        b = base.get((r["shape"], r["T"], key_pass))
        if b:
            r["speedup_vs_grouped_mm"] = b / r["ms"]
        r["pct_roofline"] = 100.0 * r["tflops"] / result["roofline_tflops"]


if __name__ == "__main__":
    main()
