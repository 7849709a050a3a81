"""DES-MoE training step with and without activation checkpointing: step time and activation memory.

    python benchmarks/bench_activation_checkpointing.py --quick     # tiny model on CPU (seconds)
    python benchmarks/bench_activation_checkpointing.py --save      # CPU: hidden 256, 4 layers, 16 experts top-4
    python benchmarks/bench_activation_checkpointing.py             # GPU: the 0.5B Qwen3-MoE-like shape, bf16

One process, one model; the three modes (``off``, ``non_reentrant``, ``reentrant``: transformers' activation
checkpointing of every decoder layer) are interleaved step by step so machine load hits each alike. A step is a
DES-MoE stabilisation step (DGES masks, KD on): forward, backward, AdamW. Per mode: the median step time, its ratio
to ``off``, ``saved_mb`` (bytes of the tensors autograd holds for the backward during the forward, counted by a
``saved_tensors_hooks`` pack hook: the activation memory checkpointing removes, measured the same way on any
device) and, on CUDA, ``peak_mem_gb`` (``max_memory_allocated``). Every mode's gradients are checked equal to
``off``'s before timing (relative 1e-4 on CPU fp32, 2e-2 in bf16).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import desmoe  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402
from desmoe.method import MethodConfig, MethodController  # noqa: E402
from desmoe.train.builders import disable_activation_checkpointing, enable_activation_checkpointing  # noqa: E402

QUICK = dict(shape="tiny", overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, moe_intermediate_size=48, num_experts=8,
                                          num_experts_per_tok=2, vocab_size=512, max_position_embeddings=512),
             B=2, S=64)
CPU = dict(shape="cpu-256x4L-16e-top4", overrides=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                                        num_key_value_heads=4, head_dim=32, moe_intermediate_size=128,
                                                        num_experts=16, num_experts_per_tok=4, vocab_size=2048,
                                                        max_position_embeddings=1024), B=4, S=512)
GPU = dict(shape="qwen3moe-0.5B", overrides=dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                                 num_key_value_heads=4, head_dim=64, moe_intermediate_size=512,
                                                 num_experts=32, num_experts_per_tok=4, vocab_size=32000,
                                                 intermediate_size=2048, max_position_embeddings=4096), B=1, S=4096)
MODES = {"off": None, "non_reentrant": False, "reentrant": True}


def build(spec, device, dtype):
    torch.manual_seed(0)
    model = desmoe.patch(tiny_model("qwen3_moe", **spec["overrides"]).to(device).train())
    ctl = MethodController(model, MethodConfig(name="des_moe"), 10, [f"d{i}" for i in range(4)])
    L, E, K = len(ctl.routers), ctl.num_experts, ctl.routers[0].top_k
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(256)]) for _ in range(L)])
    ctl.tracker.observe(ids.to(device), (torch.arange(256) % 4).to(device))
    ctl.tracker.finish_warmup()
    for a in ctl.alr:
        with torch.no_grad():
            a.down.weight.normal_(0.0, 0.05, generator=None)
    opt = ctl.optimizer(lr=1e-5)
    B, S, V = spec["B"], spec["S"], spec["overrides"]["vocab_size"]
    batch = torch.randint(4, V, (B, S), generator=g).to(device)
    dom_T = (torch.arange(B * S) * 4 // (B * S)).to(device)
    return model, ctl, opt, batch, dom_T, dtype


def step(model, ctl, opt, batch, dom_T, dtype, *, count=False, with_opt=True):
    ctl.begin_step(3)  # stabilisation: masks + KD
    saved = _common.SavedBytes() if count else None
    autocast = torch.autocast(batch.device.type, dtype=dtype) if dtype != torch.float32 else None
    with ctl.applied(dom_T) as fwd:
        if saved is not None:
            saved.__enter__()
        try:
            if autocast is not None:
                with autocast:
                    out = model(input_ids=batch, labels=batch)
            else:
                out = model(input_ids=batch, labels=batch)
        finally:
            if saved is not None:
                saved.__exit__(None, None, None)
    opt.zero_grad(set_to_none=True)
    ctl.combine(out.loss, fwd.added_loss).backward()
    grads = None
    if count:
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    ctl.before_optimizer_step(opt)
    if with_opt:
        opt.step()
    return saved.bytes if saved is not None else None, grads


def set_mode(model, mode):
    if MODES[mode] is None:
        disable_activation_checkpointing(model)
    else:
        enable_activation_checkpointing(model, 1, reentrant=MODES[mode])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU")
    ap.add_argument("--iters", type=int, default=None)
    _common.add_output_args(ap)
    a = ap.parse_args(argv)
    out = _common.output_dir(a, quick=a.quick)
    cuda = torch.cuda.is_available() and not a.quick
    device = torch.device("cuda" if cuda else "cpu")
    spec = QUICK if a.quick else GPU if cuda else CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    iters = a.iters or (2 if a.quick else 7)
    model, ctl, opt, batch, dom_T, dtype = build(spec, device, dtype)
    # the gradients first (no optimizer step, so every mode sees the same weights), with the saved bytes
    saved, grads = {}, {}
    for mode in MODES:
        set_mode(model, mode)
        saved[mode], grads[mode] = step(model, ctl, opt, batch, dom_T, dtype, count=True, with_opt=False)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for mode in MODES:
        worst = max(float((grads[mode][n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in grads["off"].items())
        if worst > tol:
            raise AssertionError(f"{mode}: gradients differ from checkpointing off by {worst:.2e} (relative)")
    times = {m: [] for m in MODES}
    peaks = {m: 0.0 for m in MODES}
    for i in range(iters + 1):  # the first round warms up
        for mode in MODES:
            set_mode(model, mode)
            _common.reset_peak(device)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, ctl, opt, batch, dom_T, dtype)
            if cuda:
                torch.cuda.synchronize()
            if i:
                times[mode].append((time.perf_counter() - t0) * 1e3)
                peaks[mode] = max(peaks[mode], _common.peak_mem_gb(device))
    res = _common.header("activation_checkpointing", device)
    res["quick"] = a.quick
    tokens = batch.numel()
    n_active = sum(p.numel() for p in model.parameters())
    for mode in MODES:
        ms = sorted(times[mode])[len(times[mode]) // 2]
        res["records"].append({
            "shape": spec["shape"], "T": tokens, "impl": "desmoe", "pass": f"des_stabilization/{mode}", "ms": ms,
            "tflops": 6 * n_active * tokens / (ms * 1e-3) / 1e12, "peak_mem_gb": peaks[mode],
            "saved_mb": saved[mode] / 1e6, "ratio_to_off": None, "dtype": str(dtype).replace("torch.", ""),
            "iters": iters})
    base = res["records"][0]["ms"]
    for r in res["records"]:
        r["ratio_to_off"] = r["ms"] / base
    path = _common.write_results(res, out) if out is not None else None
    _common.print_table(res["records"], cols=("shape", "T", "pass", "ms", "ratio_to_off", "saved_mb", "peak_mem_gb"))
    if path:
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
