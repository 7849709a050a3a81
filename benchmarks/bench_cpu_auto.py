"""CPU: desmoe's ``backend="auto"`` experts against transformers' CPU experts implementations, masks included.

The layer is one Qwen3-MoE experts module (fine-grained: E=64, K=8, D=256, I=128), 2048 tokens, float32,
forward + backward, one thread. Every implementation runs on the same module, inputs and routing, switched
through transformers' own ``config._experts_implementation``; desmoe runs twice, without masks and with the
DES-MoE masks of a mixed-domain batch (half the experts frozen, per-token domain ownership). Timing is
interleaved round-robin (one step of each implementation per round) so that load from other processes on the
machine hits every implementation alike; the table reports the fastest and the median step of each.

    python benchmarks/bench_cpu_auto.py [--rounds N] [--tokens T] [--out DIR]

The verdict line compares desmoe (auto, and auto with masks) with the fastest transformers implementation
that fits in memory (``batched_mm`` gathers one weight matrix per (token, expert) pair: it is skipped when that
needs more than ``--max-gb``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import desmoe  # noqa: E402,F401  (registers the "desmoe" experts implementation)
from desmoe.context import MaskScope  # noqa: E402

SHAPE = dict(E=64, K=8, D=256, I=128)  # a fine-grained shape (Qwen3-MoE-like, CPU-sized)
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


def make_layer(E, K, D, I, seed=0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(seed)
    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=K))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, D ** -0.5)
        experts.down_proj.normal_(0, I ** -0.5)
    experts._desmoe_backend = None  # backend "auto": what desmoe.patch(model) gives by default
    return experts


def inputs(T, E, K, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w, ids = torch.randn(T, E, generator=g).softmax(-1).topk(K, dim=-1)
    domains = torch.randint(0, 2, (T,), generator=g)
    owner_ME = torch.rand(2, E, generator=g) < 0.5
    return x, ids, w / w.sum(-1, keepdim=True), domains, owner_ME


def run(tokens: int, rounds: int, max_gb: float, out_dir=None, verbose=True):
    torch.set_num_threads(1)
    E, K, D, I = SHAPE["E"], SHAPE["K"], SHAPE["D"], SHAPE["I"]
    layer = make_layer(E, K, D, I)
    x, ids, w, domains, owner_ME = inputs(tokens, E, K, D)
    trainable_E = torch.arange(E) % 2 == 0
    variants = {}
    for impl in HF_IMPLS:
        if impl == "batched_mm":
            need_gb = tokens * K * 3 * I * D * 4 / 1e9  # per-pair gathered gate_up + down weights
            if need_gb > max_gb:
                if verbose:
                    print(f"skipping batched_mm: it gathers {need_gb:.1f} GB of weights at this shape (> --max-gb)")
                continue
        variants[impl] = (impl, False)
    variants["desmoe"] = ("desmoe", False)
    variants["desmoe+masks"] = ("desmoe", True)

    def step(name):
        impl, masked = variants[name]
        layer.config._experts_implementation = impl
        with MaskScope() as masks:
            if masked:
                masks.set(layer, expert_trainable_E=trainable_E, token_domains_T=domains,
                          domain_expert_mask_ME=owner_ME)
            xr = x.clone().requires_grad_()
            y = layer(xr, ids, w)
            y.sum().backward()
        layer.zero_grad(set_to_none=True)
        return y.detach()

    ref = step("grouped_mm")
    for name in variants:  # the comparison means something only if they agree; doubles as warm-up
        torch.testing.assert_close(step(name), ref, rtol=1e-4, atol=1e-5)
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            step(name)
            times[name].append((time.perf_counter() - t0) * 1e3)

    result = _common.header("bench_cpu_auto", "cpu")
    result.update(shape=dict(SHAPE, T=tokens), threads=1, rounds=rounds, dtype="float32")
    flops = 18 * tokens * K * D * I
    for name, ts in times.items():
        result["records"].append({
            "shape": "qwen3_fine_cpu", "T": tokens, "impl": variants[name][0], "pass": "fwd+bwd",
            "masks": "half frozen + per-token domains" if variants[name][1] else "none",
            "ms": min(ts), "median_ms": statistics.median(ts), "tflops": flops / (min(ts) * 1e-3) / 1e12,
            "peak_mem_gb": 0.0,
        })
    best_hf = min((n for n in variants if n in HF_IMPLS), key=lambda n: min(times[n]))
    result["verdict"] = {
        "best_transformers_impl": best_hf,
        "desmoe_over_best": min(times["desmoe"]) / min(times[best_hf]),
        "desmoe_masked_over_best": min(times["desmoe+masks"]) / min(times[best_hf]),
        "desmoe_over_best_median": statistics.median(times["desmoe"]) / statistics.median(times[best_hf]),
    }
    path = _common.write_results(result, out_dir)
    if verbose:
        _common.print_table(result["records"],
                            cols=("shape", "T", "impl", "masks", "pass", "ms", "median_ms", "tflops"))
        v = result["verdict"]
        print(f"desmoe auto / {best_hf}: {v['desmoe_over_best']:.3f} (fastest step), "
              f"{v['desmoe_over_best_median']:.3f} (median); with masks: {v['desmoe_masked_over_best']:.3f}")
        print(f"wrote {path}")
    return result, path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-gb", type=float, default=2.0, help="skip implementations needing more memory")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    return run(args.tokens, args.rounds, args.max_gb, out_dir=args.out)


if __name__ == "__main__":
    main()
