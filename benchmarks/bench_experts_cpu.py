"""CPU benchmark of the experts layer: desmoe's reference path vs transformers' ``eager`` and ``grouped_mm``.

Same HF experts module (Qwen3-MoE layout), same inputs and routing, switched between experts implementations
through transformers' own ``config._experts_implementation``. Writes the project's results JSON.

    python benchmarks/bench_experts_cpu.py [--quick] [--save | --out-dir DIR | --no-write]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import desmoe  # noqa: E402,F401  (registers the "desmoe" experts implementation)

SHAPES = {  # small CPU layers: name -> (E, K, D, I)
    "tiny_cpu": (8, 2, 64, 32),
    "small_cpu": (16, 4, 256, 128),
}
IMPLS = ("desmoe", "eager", "grouped_mm")


def make_layer(E, K, D, I, dtype=torch.float32, seed=0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    torch.manual_seed(seed)
    experts = Qwen3MoeExperts(cfg).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, D ** -0.5)
        experts.down_proj.normal_(0, I ** -0.5)
    experts._desmoe_backend = "reference"
    return experts


def inputs(T, E, K, D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g)
    w, ids = logits.softmax(-1).topk(K, dim=-1)
    return x, ids, (w / w.sum(-1, keepdim=True)).to(dtype)


def run(shapes, tokens, iters, out_dir=None, verbose=True, quick=False):
    result = _common.header("bench_experts_cpu", "cpu")
    result["quick"] = quick
    for shape in shapes:
        E, K, D, I = SHAPES[shape]
        layer = make_layer(E, K, D, I)
        for T in tokens:
            x, ids, w = inputs(T, E, K, D)
            outs = {}
            for impl in IMPLS:
                layer.config._experts_implementation = impl
                outs[impl] = layer(x, ids, w)
                for pass_ in ("fwd", "fwd+bwd"):
                    xr = x.clone().requires_grad_(pass_ == "fwd+bwd")

                    def step():
                        y = layer(xr, ids, w)
                        if pass_ == "fwd+bwd":
                            y.sum().backward()
                        return y

                    if pass_ == "fwd":
                        with torch.no_grad():
                            ms = _common.time_fn(step, iters=iters, device="cpu")
                    else:
                        ms = _common.time_fn(step, iters=iters, device="cpu")
                    layer.zero_grad(set_to_none=True)
                    flops = (6 if pass_ == "fwd" else 18) * T * K * D * I
                    result["records"].append({
                        "shape": shape, "T": T, "impl": impl, "pass": pass_, "ms": ms,
                        "tflops": flops / (ms * 1e-3) / 1e12, "peak_mem_gb": 0.0,
                    })
            for impl in IMPLS[1:]:  # the comparison is only meaningful if all agree
                torch.testing.assert_close(outs["desmoe"], outs[impl], rtol=1e-4, atol=1e-5)
    path = _common.write_results(result, out_dir) if out_dir is not None else None
    if verbose:
        _common.print_table(result["records"])
        if path:
            print(f"wrote {path}")
    return result, path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny shape, few iterations (CI)")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    out = _common.output_dir(args, quick=args.quick)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if args.quick:
        return run(["tiny_cpu"], [64], iters=3, out_dir=out, quick=True)
    return run(list(SHAPES), [256, 1024], iters=5, out_dir=out)


if __name__ == "__main__":
    main()
