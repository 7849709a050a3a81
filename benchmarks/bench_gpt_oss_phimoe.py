"""Benchmark: the gpt-oss-20b and Phi-3.5-MoE experts layers, desmoe against transformers' own experts modules.

Side by side, same inputs (the modules' weights are the benchmark's tensors, no copies), same run:
    desmoe      ``desmoe.ops.moe_experts`` with the family's variant (gpt-oss: biases, the stored [E, D, 2I]
                interleaved layout, clamped SwiGLU; on CUDA the Triton backend's gpt-oss kernels)
    grouped_mm  transformers' ``grouped_mm`` experts implementation on ``GptOssExperts`` (with its biases) /
                ``PhimoeExperts``
    eager       the same modules' per-expert loop
and ``desmoe`` with half the experts frozen (``fwd+bwd_frozen50``).

Shapes (E, K, D, I): gpt-oss-20b (32, 4, 2880, 2880), Phi-3.5-MoE (16, 2, 4096, 6400). On CPU the layers run
*reduced*: the same E and K, D and I divided by 8 (``reduced_shape: true`` in every record), float32, T = 256 by
default; on CUDA the full shapes in bf16. TFLOP/s counts 6·T·K·D·I forward, 18·T·K·D·I forward+backward.

    python benchmarks/bench_gpt_oss_phimoe.py                  # CPU: reduced shapes
    python benchmarks/bench_gpt_oss_phimoe.py --T 8192         # GPU: full shapes
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402

# shape name -> (E, K, D, I, family)
SHAPES = {
    "gpt_oss_20b": (32, 4, 2880, 2880, "gpt_oss"),
    "phi35_moe": (16, 2, 4096, 6400, "phimoe"),
}
REDUCE = 8  # CPU: D and I divided by this


def shape_of(name: str, reduced: bool) -> tuple[int, int, int, int, str]:
    E, K, D, I, fam = SHAPES[name]
    return (E, K, D // REDUCE, I // REDUCE, fam) if reduced else (E, K, D, I, fam)


def _module(fam: str, E: int, D: int, I: int, impl: str):
    """The family's transformers experts module (its own class and dispatch), parameters dropped: each call binds
    the benchmark's tensors."""
    if fam == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = GptOssConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=1)
        names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    else:
        from transformers import PhimoeConfig
        from transformers.models.phimoe.modeling_phimoe import PhimoeExperts as cls

        cfg = PhimoeConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
        names = ("gate_up_proj", "down_proj")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = cls(cfg)
    for n in names:
        del mod._parameters[n]
    return mod, names


def make_inputs(fam: str, E, K, D, I, T, device, dtype, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(T, D, generator=g)}
    if fam == "gpt_oss":  # the stored layout: [E, D, 2I] (gate even, up odd columns), [E, I, D], biases
        t.update(gate_up_proj=torch.randn(E, D, 2 * I, generator=g) / D ** 0.5,
                 gate_up_proj_bias=torch.randn(E, 2 * I, generator=g) * 0.1,
                 down_proj=torch.randn(E, I, D, generator=g) / I ** 0.5,
                 down_proj_bias=torch.randn(E, D, generator=g) * 0.1)
    else:
        t.update(gate_up_proj=torch.randn(E, 2 * I, D, generator=g) / D ** 0.5,
                 down_proj=torch.randn(E, D, I, generator=g) / I ** 0.5)
    t = {k: v.to(device, dtype) for k, v in t.items()}
    logits = torch.randn(T, E, generator=g).to(device)
    top = logits.topk(K, dim=-1)
    t["ids"], t["w"] = top.indices, top.values.softmax(-1).to(dtype)
    return t


def impls(fam: str, E: int, D: int, I: int) -> dict:
    """name -> fn(tensors: dict, expert_trainable_E) -> out."""
    from desmoe import ops

    def desmoe_fn(t, m=None):
        if fam == "gpt_oss":
            return ops.moe_experts(t["x"], t["gate_up_proj"], t["down_proj"], t["ids"], t["w"],
                                   b_gate_up=t["gate_up_proj_bias"], b_down=t["down_proj_bias"], transposed=True,
                                   interleaved=True, activation="clamped_swiglu", alpha=1.702, limit=7.0,
                                   expert_trainable_E=m, validate_ids=False)
        return ops.moe_experts(t["x"], t["gate_up_proj"], t["down_proj"], t["ids"], t["w"], expert_trainable_E=m,
                               validate_ids=False)

    out = {"desmoe": desmoe_fn}
    for impl in ("grouped_mm", "eager"):
        mod, names = _module(fam, E, D, I, impl)

        def run(t, m=None, _mod=mod, _names=names):
            for n in _names:
                setattr(_mod, n, t[n])
            return _mod(t["x"], t["ids"], t["w"])

        out[impl] = run
    return out


def bench_one(fn, t: dict, pass_name: str, device, iters: int, mask=None) -> tuple[float, float]:
    if pass_name == "fwd":
        def step():
            with torch.no_grad():
                fn(t, mask)
    else:
        leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() and k != "w" else v)
                  for k, v in t.items()}
        req = [v for k, v in leaves.items() if v.requires_grad]
        go = torch.randn_like(t["x"])

        def step():
            out = fn(leaves, mask)
            torch.autograd.grad(out, req, go, allow_unused=True)

    _common.reset_peak(device)
    ms = _common.time_fn(step, warmup=1 if device.type != "cuda" else 2, iters=iters, device=device)
    return ms, _common.peak_mem_gb(device)


def run_shape(name: str, T: int, device, dtype, iters: int, reduced: bool, emit, impl_names=None) -> None:
    E, K, D, I, fam = shape_of(name, reduced)
    t = make_inputs(fam, E, K, D, I, T, device, dtype)
    fns = impls(fam, E, D, I)
    flops = {"fwd": 6 * T * K * D * I, "fwd+bwd": 18 * T * K * D * I}
    order = ["grouped_mm", "desmoe", "eager"]  # the baseline first: every later record gets its speedup
    runs = [(n, p, None) for p in ("fwd", "fwd+bwd") for n in order if impl_names is None or n in impl_names]
    runs.append(("desmoe", "fwd+bwd_frozen50", torch.arange(E, device=device) % 2 == 0))
    base = {}
    for impl, ps, mask in runs:
        key = "fwd" if ps == "fwd" else "fwd+bwd"
        ms, mem = bench_one(fns[impl], t, key, device, iters, mask)
        rec = {"shape": name, "T": T, "impl": impl, "pass": ps, "ms": ms, "tflops": flops[key] / (ms * 1e-3) / 1e12,
               "peak_mem_gb": mem, "E": E, "K": K, "D": D, "I": I, "reduced_shape": reduced,
               "dtype": str(dtype).replace("torch.", "")}
        if impl == "grouped_mm":
            base[ps] = ms
        elif key in base:
            rec["speedup_vs_grouped_mm"] = base[key] / ms
        emit(rec)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=sorted(SHAPES))
    p.add_argument("--T", type=int, default=None, help="tokens (default: 256 on CPU, 8192 on CUDA)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--full", action="store_true", help="the full shapes even on CPU (slow, ~10 GB)")
    p.add_argument("--impls", nargs="*", default=None, help="subset of desmoe grouped_mm eager")
    _common.add_output_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = device.type != "cuda" and not args.full
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T = args.T or (8192 if device.type == "cuda" else 256)
    iters = args.iters or (10 if device.type == "cuda" else 3)
    out = _common.output_dir(args, quick=False)
    result = _common.header("bench_gpt_oss_phimoe", device)
    result.update(dtype=str(dtype).replace("torch.", ""), reduced_shape=reduced,
                  notes=[f"CPU: D and I divided by {REDUCE} (same E, K)"] if reduced else [])
    for name in args.shapes:
        run_shape(name, T, device, dtype, iters, reduced, result["records"].append, args.impls)
    _common.print_table(result["records"], cols=("shape", "T", "impl", "pass", "ms", "tflops", "peak_mem_gb",
                                                  "speedup_vs_grouped_mm"))
    if not args.no_write:
        print("wrote", _common.write_results(result, out))
    return result


if __name__ == "__main__":
    main()
