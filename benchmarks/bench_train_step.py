"""One optimizer step of a Qwen3-MoE-like model: stock transformers vs desmoe FFT vs DES-MoE per phase.

    python benchmarks/bench_train_step.py --quick      # tiny model on CPU (seconds)
    python benchmarks/bench_train_step.py              # GPU: ~0.5B-param Qwen3-MoE-like model, seq 4096, bf16

Rows: impl ``eager`` / ``grouped_mm`` = stock transformers experts implementations (full fine-tuning, HF router);
``desmoe`` = patched model with pass ``fft`` (full fine-tuning) or ``des_warmup`` / ``des_stabilization`` /
``des_consolidation`` (DES-MoE: ALR + KD, DGES masks from a fixed affinity matrix with phi=0.6). Step = forward,
backward, AdamW step. ``tflops`` = 6·N_active·tokens / time (N_active counts K of E experts per layer), so it is
a model-FLOP rate, comparable across rows (frozen parts make DES phases do less real work).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import desmoe  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402
from desmoe.method import MethodConfig, MethodController  # noqa: E402

QUICK = dict(shape="tiny", overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, moe_intermediate_size=48,
                                          num_experts=8, num_experts_per_tok=2, vocab_size=1024,
                                          max_position_embeddings=512), B=4, S=128)
GPU = dict(shape="qwen3moe-0.5B", overrides=dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                                 num_key_value_heads=4, head_dim=64, moe_intermediate_size=512,
                                                 num_experts=32, num_experts_per_tok=4, vocab_size=32000,
                                                 intermediate_size=2048, max_position_embeddings=4096), B=1, S=4096)
M_DOMAINS = 4


def active_params(model) -> int:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3)
    return int(total - expert + expert * cfg.num_experts_per_tok / cfg.num_experts)


def make_model(spec, dtype, device, impl):
    m = tiny_model("qwen3_moe", dtype=dtype, **spec["overrides"]).to(device).train()
    if impl == "desmoe":
        desmoe.patch(m)
    else:
        m.set_experts_implementation(impl)
    return m


def bench_one(spec, impl, pass_, device, dtype, iters, warmup):
    torch.manual_seed(0)
    model = make_model(spec, dtype, device, impl)
    B, S, V = spec["B"], spec["S"], spec["overrides"]["vocab_size"]
    ids = torch.randint(4, V, (B, S), device=device)
    dom_T = torch.arange(B * S, device=device) * M_DOMAINS // (B * S)  # contiguous domain blocks
    ctl = None
    if pass_.startswith("des_"):
        ctl = MethodController(model, MethodConfig(name="des_moe"), 100, [f"d{i}" for i in range(M_DOMAINS)])
        ctl.alr = [a.to(dtype) for a in ctl.alr]
        g = torch.Generator().manual_seed(1)
        A = torch.rand(len(ctl.blocks), M_DOMAINS, ctl.num_experts, generator=g) ** 4
        ctl.tracker.A_LME = (A / A.sum(-1, keepdim=True)).to(device)
        ctl.tracker.initialised = True
        ctl.tracker.update_masks()
        phase = pass_[len("des_"):]
        step0 = {"warmup": 0, "stabilization": 30, "consolidation": 90}[phase]
        ctl.begin_step(step0)
    opt = torch.optim.AdamW(ctl.param_groups() if ctl is not None else model.parameters(), lr=1e-5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step():
        with ctl.applied(dom_T) if ctl is not None else contextlib.nullcontext() as fwd, autocast:
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if ctl is not None:
            loss = ctl.combine(loss, fwd.added_loss)
        loss.backward()
        if ctl is not None:
            ctl.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _common.reset_peak(device)
    ms = _common.time_fn(step, warmup=warmup, iters=iters, device=device)
    tokens = B * S
    rec = {"shape": spec["shape"], "T": tokens, "impl": impl, "pass": pass_, "ms": ms,
           "tflops": 6 * active_params(model) * tokens / (ms * 1e-3) / 1e12, "tokens_per_s": tokens / (ms * 1e-3),
           "peak_mem_gb": _common.peak_mem_gb(device),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "total_params": sum(p.numel() for p in model.parameters())}
    model = opt = ctl = None  # freed (the step closure holds them) before empty_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU")
    ap.add_argument("--iters", type=int, default=None)
    _common.add_output_args(ap)
    a = ap.parse_args(argv)
    out = _common.output_dir(a, quick=a.quick)
    cuda = torch.cuda.is_available() and not a.quick
    device = torch.device("cuda" if cuda else "cpu")
    spec = GPU if cuda else QUICK
    dtype = torch.bfloat16 if cuda else torch.float32
    iters = a.iters or (10 if cuda else 5)
    runs = [("eager", "fft"), ("grouped_mm", "fft"), ("desmoe", "fft"), ("desmoe", "des_warmup"),
            ("desmoe", "des_stabilization"), ("desmoe", "des_consolidation")]
    res = _common.header("train_step", device)
    res["quick"] = a.quick
    for impl, pass_ in runs:
        try:
            rec = bench_one(spec, impl, pass_, device, dtype, iters, warmup=2)
        except Exception as e:  # e.g. grouped_mm unsupported on this device/torch: note it, keep going
            print(f"skip {impl}/{pass_}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        res["records"].append(rec)
        print(f"{impl:>10} {pass_:<18} {rec['ms']:9.2f} ms  {rec['tokens_per_s']:10.0f} tok/s", flush=True)
    path = _common.write_results(res, out) if out is not None else None
    _common.print_table(res["records"], cols=("shape", "T", "impl", "pass", "ms", "tokens_per_s", "tflops",
                                              "peak_mem_gb", "trainable_params"))
    if path:
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
