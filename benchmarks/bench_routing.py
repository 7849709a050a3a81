"""Benchmark: top-k routing from router logits to everything the expert kernels consume.

Side by side, same logits:
    desmoe  fused Triton routing kernel + permutation kernel (``desmoe.ops.triton_routing.route_and_permute``) on
            CUDA; on CPU the reference routing + permutation (the Triton path needs CUDA)
    torch   the PyTorch sequence a user writes: softmax, topk, renormalise, sort, bincount, cumsum
    eager   the transformers router module's own forward on precomputed logits (softmax / topk / renorm as HF
            does it) followed by transformers ``grouped_mm``'s sort + histc, i.e. what HF runs per MoE layer
Passes: ``fwd`` and ``fwd+bwd`` (gradient of the routing weights w.r.t. the logits). Bandwidth (GB/s) counts
logits read once plus weights/ids/permutation written once; the fused kernel's target is ≥ 4× ``torch``.

    python benchmarks/bench_routing.py            # GPU: all shapes, T in {4096, 16384, 32768}
    python benchmarks/bench_routing.py --quick    # tiny, CPU OK
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402

# shape name -> (E, K, routing kwargs)
SHAPES = {
    "qwen3_30b_a3b": (128, 8, dict(renormalize=True)),
    "olmoe": (64, 8, dict(renormalize=False)),
    "deepseek_v2_lite": (64, 6, dict(renormalize=False, scaling=1.0)),
    "mixtral_8x7b": (8, 2, dict(renormalize=True)),
}
T_FULL = (4096, 16384, 32768)
T_QUICK = (64, 256)


def _torch_sequence(logits, K, renormalize=True, scaling=1.0):
    E = logits.shape[1]
    scores = logits.float().softmax(-1)
    w, ids = scores.topk(K, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * scaling
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cumsum(counts, 0)
    return w, ids, perm, offsets


def _hf_sequence(logits, K, renormalize=True, scaling=1.0):
    # transformers' softmax routers (Qwen3/OLMoE/Mixtral): softmax(float) -> topk -> optional renorm, then
    # grouped_mm_experts_forward's sort + histc
    E = logits.shape[1]
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    w, ids = torch.topk(probs, K, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * scaling
    ids_g, perm = torch.sort(ids.reshape(-1))
    hist_in = ids_g.float() if logits.device.type == "cpu" else ids_g.int()
    counts = torch.histc(hist_in, bins=E, min=0, max=E - 1)
    return w, ids, perm, torch.cumsum(counts, 0, dtype=torch.int32)


def _desmoe_sequence(logits, K, renormalize=True, scaling=1.0):
    from desmoe import ops

    if ops.resolve_backend(None, logits.device) == "triton":
        from desmoe.ops import triton_routing

        return triton_routing.route_and_permute(logits, K, renormalize=renormalize, scaling=scaling)
    w, ids = ops.topk_route(logits, K, renormalize=renormalize, scaling=scaling)
    return (w, ids, *ops.permute(ids, logits.shape[1]))


IMPLS = {"desmoe": _desmoe_sequence, "torch": _torch_sequence, "eager": _hf_sequence}


def main(argv=None) -> dict:
    from desmoe import ops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES))
    p.add_argument("--T", nargs="*", type=int, default=None)
    p.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--iters", type=int, default=None)
    _common.add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"  # CPU: small shapes
    out = _common.output_dir(args, quick=args.quick)
    Ts = args.T or (T_QUICK if quick else T_FULL)
    iters = args.iters or (3 if quick else 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = _common.header("bench_routing", device)
    result["quick"] = args.quick  # tagged only for the user's --quick
    result["small_shapes"] = quick
    result["logits_dtype"] = str(dtype).replace("torch.", "")
    for shape in args.shapes or list(SHAPES):
        E, K, kw = SHAPES[shape]
        for T in Ts:
            g = torch.Generator(device="cpu").manual_seed(T)
            logits = torch.randn(T, E, generator=g).to(device, dtype)
            nbytes = T * E * logits.element_size() + T * K * (4 + 8) + T * K * 8 + (E + 1) * 4
            for ps in args.passes:
                for name, fn in IMPLS.items():
                    if ps == "fwd":
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(logits, K, **kw)
                    else:
                        leaf = logits.detach().requires_grad_(True)
                        gw = torch.randn(T, K, device=device)

                        def step(fn=fn, leaf=leaf, gw=gw):
                            w = fn(leaf, K, **kw)[0]
                            torch.autograd.grad(w, leaf, gw)
                    _common.reset_peak(device)
                    ms = _common.time_fn(step, warmup=2, iters=iters, device=device)
                    rec = {"shape": shape, "T": T, "impl": name, "pass": ps, "ms": ms,
                           "gbps": nbytes * (2 if ps != "fwd" else 1) / (ms * 1e-3) / 1e9,
                           "peak_mem_gb": _common.peak_mem_gb(device), "E": E, "K": K}
                    if name == "desmoe":
                        rec["backend"] = ops.resolve_backend(None, device)
                    result["records"].append(rec)
    base = {(r["shape"], r["T"], r["pass"]): r["ms"] for r in result["records"] if r["impl"] == "torch"}
    for r in result["records"]:
        r["speedup_vs_torch"] = base[(r["shape"], r["T"], r["pass"])] / r["ms"]
    _common.print_table(result["records"], cols=("shape", "T", "impl", "pass", "ms", "gbps", "peak_mem_gb",
                                                  "speedup_vs_torch"))
    if not args.no_write:
        print("wrote", _common.write_results(result, out))
    return result


if __name__ == "__main__":
    main()
