"""The measurements of one GPU run, in order of importance, streamed as they are taken (driven by gpu_run.sh).

Every measurement is one JSON line appended (and flushed) to ``--out`` the moment it is taken, so a run cut short
by its time limit keeps everything measured so far. A stage starts only if its estimated cost fits the time left
of ``--budget`` seconds (counted from ``--start``, the epoch second the whole run began); a skipped stage is one
line ``{"stage": ..., "skipped": "budget"}``.

Stages: the cold first call (the Qwen3-30B-A3B layer's first fwd+bwd at T=32768 in a fresh process with an empty
Triton cache, its compilations counted from the binaries the cache holds afterwards); ceilings (8192^3 bf16
matmul, device copy); correctness at a real shape on the 1st and 2nd call against
an fp32 reference (values and every gradient, backend confirmed ``triton``); the Qwen3-30B-A3B layer at T=32768
fwd / fwd+bwd / half-frozen vs transformers' grouped_mm (its ``aten::_grouped_mm`` confirmed in a profile), a
per-kernel CUDA-time table, the chosen configs and fwd+bwd with ``DESMOE_TMA=1`` against the default;
routing + permute (T=32768, E=128, K=8) vs the torch sequence; Mixtral at T=16384; Liger if importable; OLMoE and
DeepSeek-V2-Lite. ``--dry``: the same stages on CPU at tiny shapes, for the CPU suite: correctness and routing
run the Triton kernels in the interpreter, the layer stages run desmoe's ``auto`` backend (the reference on CPU).

Every headline (each layer's fwd+bwd vs grouped_mm and vs Liger, routing vs torch, the half-frozen ratio, the cold
first call, the grad-mask op) is also one line ``{"headline": ..., "value": ...}`` the moment it is measured. A
transformers baseline that cannot run is an ``error`` line naming why, never a silent skip (Liger, an optional
install, is a ``skipped`` line with the reason).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402
from benchmarks import bench_moe_layer as bml  # noqa: E402

QWEN3 = bml.SHAPES["qwen3_30b_a3b"]


class Run:
    def __init__(self, out: str, budget: float, start: float, dry: bool):
        self.out, self.budget, self.start, self.dry = out, budget, start, dry
        self.dev = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.iters = 1 if dry else 10
        self.warmup = 0 if dry else 2
        self.current = "cold_first_call"  # the stage running (headline lines carry it)
        self.ms: dict = {}  # (shape, impl, pass) -> ms, across stages (Liger's stage reads desmoe's and grouped_mm's)

    def emit(self, rec: dict) -> None:
        rec = {"t_s": round(time.time() - self.start, 1), **rec}
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def stage(self, name: str, est_s: float, fn) -> None:
        if not self.dry and self.left() < est_s:
            self.emit({"stage": name, "skipped": "budget", "left_s": round(self.left(), 1), "est_s": est_s})
            return
        t0 = time.time()
        self.current = name
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one stage failing must not lose the others
            self.emit({"stage": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            if self.dry:
                raise
        self.emit({"stage": name, "done_s": round(time.time() - t0, 1)})
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def time(self, fn) -> float:
        return _common.time_fn(fn, warmup=self.warmup, iters=self.iters, device=self.dev)

    def headline(self, name: str, value, unit: str, **extra) -> None:
        self.emit({"stage": self.current, "headline": name, "value": value, "unit": unit, **extra})


def _cache_binaries(cache_dir: str) -> int:
    """Kernel binaries in a Triton cache folder (one per compilation: cubin on NVIDIA)."""
    return sum(f.endswith((".cubin", ".hsaco")) for _, _, files in os.walk(cache_dir) for f in files)


def cold_first_call(r: Run) -> None:
    """The first fwd+bwd of the Qwen3-30B-A3B layer at T=32768, in a fresh process whose Triton cache is an empty
    folder: what a user's first step pays (compiles + autotuning). The child appends its own lines."""
    import subprocess
    import tempfile

    cache = tempfile.mkdtemp(prefix="desmoe-triton-cold-")
    cmd = [sys.executable, os.path.abspath(__file__), "--cold-child", "--out", r.out, "--start", str(r.start)]
    proc = subprocess.run(cmd + (["--dry"] if r.dry else []), env={**os.environ, "TRITON_CACHE_DIR": cache},
                          capture_output=True, text=True, timeout=max(30.0, r.left()))
    if proc.returncode != 0:
        raise RuntimeError(f"the cold first-call process failed (rc {proc.returncode}): {proc.stderr[-600:]}")


def _cold_child(r: Run) -> None:
    from desmoe.kernels import moe as mk

    t0 = time.time()
    E, K, D, I = _shape(r, "qwen3_30b_a3b")
    T = 8 if r.dry else 32768
    x, w1, w2, ids, w = bml._make_inputs(E, K, D, I, T, r.dev, r.dtype)
    fn = bml._impls(E, D, I, r.dev)["desmoe"]
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, w)]
    if r.dev.type == "cuda":
        torch.cuda.synchronize()
    setup_s, t1 = time.time() - t0, time.time()
    out = fn(*leaves[:3], ids, leaves[3])
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    if r.dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.time() - t1
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    n = _cache_binaries(cache) if cache else None
    stats = mk.autotune_stats()
    r.emit({"stage": "cold_first_call", "what": "first fwd+bwd, fresh process, empty Triton cache", "s": s,
            "setup_s": setup_s, "T": T, "compiles": n, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
            "autotune_candidates": {k: v["compiles"] for k, v in stats.items()},
            "chosen": {k: v["chosen"] for k, v in stats.items()}})
    r.headline("cold first fwd+bwd (Qwen3-30B-A3B layer)", s, "s", compiles=n, T=T)


def ceilings(r: Run) -> None:
    n = 256 if r.dry else 8192
    a = torch.randn(n, n, device=r.dev, dtype=r.dtype)
    ms = r.time(lambda: a @ a)
    r.emit({"stage": "ceilings", "what": f"matmul {n}^3", "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9})
    big = torch.empty(2 ** 20 if r.dry else 2 ** 30, dtype=torch.uint8, device=r.dev)
    dst = torch.empty_like(big)
    ms = r.time(lambda: dst.copy_(big))
    r.emit({"stage": "ceilings", "what": "device copy", "bytes": big.numel(), "ms": ms,
            "gbps": 2 * big.numel() / ms / 1e6})


def _shape(r: Run, name: str):
    return (bml.QUICK_SHAPES if r.dry else bml.SHAPES)[name]


def correctness(r: Run) -> None:
    from desmoe import ops
    from desmoe.ops import reference

    E, K, D, I = _shape(r, "qwen3_30b_a3b")
    T = 12 if r.dry else 4096
    x, w1, w2, ids, w = bml._make_inputs(E, K, D, I, T, r.dev, r.dtype, seed=1)
    backend = ops.resolve_backend("triton", r.dev)  # the Triton kernels (the interpreter in --dry), or an error
    go = torch.randn_like(x)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w1, w2, w)]
        out = fn(*leaves[:3], ids, leaves[3])
        return [out.detach(), *torch.autograd.grad(out, leaves, go.to(dtype))]

    ref32 = grads(lambda a, b, c, i, ww: reference.moe_experts_reference(a, b, c, i, ww), torch.float32)
    ref_lp = grads(lambda a, b, c, i, ww: reference.moe_experts_reference(a, b, c, i, ww), r.dtype)
    for call in (1, 2):
        fast = grads(lambda a, b, c, i, ww: ops.moe_experts(a, b, c, i, ww, validate_ids=False, backend=backend),
                     r.dtype)
        for name, f, lp, ref in zip(("out", "dx", "dw_gate_up", "dw_down", "dweights"), fast, ref_lp, ref32):
            err = (f.float() - ref).norm().item()
            base = (lp.float() - ref).norm().item()
            ok = err <= 2 * base + 1e-6 * ref.norm().item() + 1e-6
            r.emit({"stage": "correctness", "call": call, "tensor": name, "backend": backend, "err": err,
                    "torch_lowp_err": base, "ref_norm": ref.norm().item(), "ok": bool(ok), "T": T,
                    "E": E, "K": K, "D": D, "I": I})


def _layer(r: Run, shape: str, T: int, impls=("desmoe", "grouped_mm"), frozen=True, profile=False) -> None:
    from desmoe import ops

    E, K, D, I = _shape(r, shape)
    T = 8 if r.dry else T
    inputs = bml._make_inputs(E, K, D, I, T, r.dev, r.dtype)
    fns = bml._impls(E, D, I, r.dev)
    flops = {"fwd": 6 * T * K * D * I, "fwd+bwd": 18 * T * K * D * I}
    # the baseline first in each pass, so every other impl's line (and headline) carries its ratio
    runs = [(n, p, None) for p in ("fwd", "fwd+bwd") for n in sorted(impls, key=lambda n: n != "grouped_mm")]
    if frozen:
        runs.append(("desmoe", "fwd+bwd_frozen50", torch.arange(E, device=r.dev) % 2 == 0))
    base = {}
    for name, ps, mask in runs:
        fn = fns.get(name)
        if isinstance(fn, str) or fn is None:
            why = fn or "unknown impl"
            if name == "liger":  # an optional install: skipped, with the reason
                r.emit({"stage": shape, "impl": name, "skipped": why})
                continue
            raise RuntimeError(f"baseline {name!r} cannot run here: {why}")
        try:
            ms, mem = bml._bench_one(fn, inputs, "fwd" if ps == "fwd" else "fwd+bwd", r.dev, r.iters, mask)
        except torch.cuda.OutOfMemoryError:
            r.emit({"stage": shape, "impl": name, "pass": ps, "T": T, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        r.ms[(shape, name, ps)] = ms
        fl = flops["fwd" if ps == "fwd" else "fwd+bwd"]
        rec = {"stage": shape, "shape": shape, "T": T, "impl": name, "pass": ps, "ms": ms,
               "tflops": fl / ms / 1e9, "peak_mem_gb": mem, "E": E, "K": K, "D": D, "I": I}
        if name == "grouped_mm":
            base[ps] = ms
        elif (shape, "grouped_mm", ps) in r.ms:  # measured in an earlier stage (Liger's)
            base.setdefault(ps, r.ms[(shape, "grouped_mm", ps)])
        if name == "liger" and ps == "fwd+bwd" and (shape, "desmoe", ps) in r.ms:
            rec["desmoe_speedup_vs_liger"] = ms / r.ms[(shape, "desmoe", ps)]
            r.headline(f"{shape} fwd+bwd, desmoe vs Liger", rec["desmoe_speedup_vs_liger"], "x", T=T)
        key = "fwd+bwd" if ps.startswith("fwd+bwd") else ps
        if name != "grouped_mm" and key in base:
            rec["speedup_vs_grouped_mm"] = base[key] / ms
            if ps == "fwd+bwd":
                r.headline(f"{shape} fwd+bwd, {name} vs transformers grouped_mm", base[key] / ms, "x", T=T)
        if name == "desmoe":
            rec["backend"] = ops.resolve_backend(None, r.dev)
            if ps == "fwd+bwd":
                base["desmoe_all"] = ms
            if ps == "fwd+bwd_frozen50" and "desmoe_all" in base:
                rec["ratio_vs_all_trainable"] = ms / base["desmoe_all"]
                r.headline(f"{shape} fwd+bwd, half the experts frozen / all trainable", ms / base["desmoe_all"], "x")
        r.emit(rec)
    if "grouped_mm" in impls and not isinstance(fns.get("grouped_mm"), str):
        ran = _profiled_ops(r, fns["grouped_mm"], inputs)
        r.emit({"stage": shape, "impl": "grouped_mm", "native_grouped_mm": "aten::_grouped_mm" in ran,
                "note": "aten::_grouped_mm in the profile means transformers ran its native path, not a loop"})
    if profile:
        _kernel_table(r, shape, fns["desmoe"], inputs)


def tma_vs_default(r: Run) -> None:
    """One line: the Qwen3-30B-A3B layer's fwd+bwd at T=32768 with ``DESMOE_TMA=1``'s path (the row-tile GEMMs'
    weight operand through tensor descriptors) against the default, in this process: the launchers read
    ``moe_configs.TMA`` at call time and ``USE_TMA`` is in the autotune keys, so the TMA variant tunes and compiles
    on its first call (the warm-up, outside the timing; about 8 compiles) while the default reuses this stage's
    binaries. Interleaved default/TMA/default/TMA, the best of each. In ``--dry`` the layer runs the CPU reference,
    so the line only rehearses the plumbing."""
    from desmoe import ops
    from desmoe.kernels import moe_configs as mc
    from desmoe.ops import triton_common

    E, K, D, I = _shape(r, "qwen3_30b_a3b")
    T = 8 if r.dry else 32768
    inputs = bml._make_inputs(E, K, D, I, T, r.dev, r.dtype)
    fn = bml._impls(E, D, I, r.dev)["desmoe"]
    was, ms = mc.TMA, {False: [], True: []}
    try:
        mc.TMA = True
        used = {"w_gate_up": triton_common.use_tma(inputs[1]), "w_down": triton_common.use_tma(inputs[2])}
        for _ in range(2):
            for tma in (False, True):
                mc.TMA = tma
                ms[tma].append(bml._bench_one(fn, inputs, "fwd+bwd", r.dev, r.iters)[0])
    finally:
        mc.TMA = was
    r.emit({"stage": r.current, "what": "DESMOE_TMA=1 vs default, fwd+bwd", "shape": "qwen3_30b_a3b", "T": T,
            "default_ms": min(ms[False]), "tma_ms": min(ms[True]), "tma_speedup": min(ms[False]) / min(ms[True]),
            "tma_used": used, "backend": ops.resolve_backend(None, r.dev),
            "runs_ms": {"default": ms[False], "tma": ms[True]}})


def _profiled_ops(r: Run, fn, inputs) -> set:
    from torch.profiler import ProfilerActivity, profile

    x, w1, w2, ids, w = inputs
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x, w1, w2, ids, w)
    return {e.key for e in prof.key_averages()}


def _kernel_table(r: Run, shape: str, fn, inputs) -> None:
    from torch.profiler import ProfilerActivity, profile

    x, w1, w2, ids, w = inputs
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, w)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        out = fn(*leaves[:3], ids, leaves[3])
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        if r.dev.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
        if r.dev.type == "cuda" and dev_us <= 0:
            continue
        rows.append({"name": e.key[:80], "calls": e.count,
                     "us": dev_us if r.dev.type == "cuda" else e.self_cpu_time_total})
    rows.sort(key=lambda d: -d["us"])
    r.emit({"stage": shape, "what": "per-kernel time, one fwd+bwd (CUDA time on GPU)", "kernels": rows[:25]})


def routing(r: Run) -> None:
    from desmoe.ops import triton_routing

    E, K = 128, 8
    T = 64 if r.dry else 32768
    logits = torch.randn(T, E, device=r.dev, dtype=r.dtype)

    def torch_seq():
        w, ids = logits.float().softmax(-1).topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        offsets = torch.cumsum(torch.bincount(flat, minlength=E), 0)
        return w, order, offsets

    def ours():
        return triton_routing.route_and_permute(logits, K)

    t_torch, t_ours = r.time(torch_seq), r.time(ours)
    r.emit({"stage": "routing", "T": T, "E": E, "K": K, "torch_ms": t_torch, "desmoe_ms": t_ours,
            "speedup": t_torch / t_ours})
    r.headline("routing + permute vs the torch sequence", t_torch / t_ours, "x", T=T, E=E, K=K)


def grad_mask(r: Run) -> None:
    """DES-MoE's per-expert gradient masking over DeepSeek-V2-Lite's expert gradients (4 layers, half frozen),
    against the copy ceiling and a torch loop (bench_grad_mask); the record names the op's source (CUDA extension
    or the PyTorch reference)."""
    from benchmarks import bench_grad_mask as bgm

    res = bgm.main(["--quick", "--iters", "1", "--no-write"] if r.dry else ["--layers", "4", "--iters", "10",
                                                                            "--no-write"])
    for rec in res["records"]:
        r.emit({"stage": "grad_mask", **rec})
    ext = next(x for x in res["records"] if x["impl"] == "extension" and x["pass"] == "zero")
    r.headline("grad mask (zero frozen experts' rows), share of the copy ceiling", ext["frac_of_copy"], "x",
               backend=ext.get("backend"), gbps=ext["gbps"], ok=ext["ok"])


def activation_checkpointing(r: Run) -> None:
    """A DES-MoE stabilisation step (masks + KD) with activation checkpointing off / non-reentrant / reentrant:
    gradients checked equal, then step time and peak memory, interleaved (bench_activation_checkpointing)."""
    from benchmarks import bench_activation_checkpointing as bac

    res = bac.main(["--quick", "--iters", "1", "--no-write"] if r.dry else ["--iters", "5", "--no-write"])
    for rec in res["records"]:
        r.emit({"stage": "activation_checkpointing", **rec})


def method_cost(r: Run) -> None:
    """One step of each method on DeepSeek-V2-Lite's layer shapes, interleaved: DES-MoE per phase, FFT, ESFT,
    frozen_router; step time as a ratio to FFT's, peak memory, optimizer state, FLOP floor (bench_method_cost)."""
    from benchmarks import bench_method_cost as bmc

    res = bmc.main(["--quick", "--iters", "1", "--no-write", "--no-rss"] if r.dry else ["--iters", "5", "--no-write"])
    for rec in res["records"]:
        r.emit({"stage": "method_cost", **{k: v for k, v in rec.items() if k != "times_ms"}})


def gpt_oss_phimoe(r: Run) -> None:
    """gpt-oss-20b (E=32 K=4 D=I=2880, biases, clamped SwiGLU) and Phi-3.5-MoE (E=16 K=2 D=4096 I=6400) experts
    layers: desmoe against transformers' grouped_mm (with biases) on the full shapes, T=8192 (dry: reduced, T=8)."""
    from benchmarks import bench_gpt_oss_phimoe as bgp

    for name in bgp.SHAPES:
        bgp.run_shape(name, 8 if r.dry else 8192, r.dev, r.dtype, r.iters, r.dry,
                      lambda rec, _n=name: r.emit({"stage": "gpt_oss_phimoe", **rec}),
                      impl_names=("grouped_mm", "desmoe"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON-lines file, appended to")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all stages, counted from --start")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the run began (default: now)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    p.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    r = Run(args.out, args.budget, args.start or time.time(), args.dry)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry for the CPU rehearsal")
    if args.cold_child:
        _cold_child(r)
        return 0
    r.emit({"stage": "env", **_common.versions(), "device": _common.device_name(r.dev), "git_sha": _common.git_sha(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry": args.dry})
    T_big = 32768
    r.stage("cold_first_call", 60, lambda: cold_first_call(r))
    r.stage("ceilings", 20, lambda: ceilings(r))
    r.stage("correctness", 60, lambda: correctness(r))
    # + ~20 s: the DESMOE_TMA=1 line (about 8 compiles of the TMA variant, 24 timed fwd+bwd)
    r.stage("qwen3_30b_a3b", 170, lambda: (_layer(r, "qwen3_30b_a3b", T_big, profile=True), tma_vs_default(r)))
    r.stage("routing", 15, lambda: routing(r))
    r.stage("mixtral_8x7b", 60, lambda: _layer(r, "mixtral_8x7b", 16384, frozen=False))
    r.stage("liger", 40, lambda: _layer(r, "qwen3_30b_a3b", T_big, impls=("liger",), frozen=False))
    r.stage("olmoe", 50, lambda: _layer(r, "olmoe", T_big, frozen=False))
    r.stage("deepseek_v2_lite", 50, lambda: _layer(r, "deepseek_v2_lite", T_big, frozen=False))
    r.stage("gpt_oss_phimoe", 60, lambda: gpt_oss_phimoe(r))
    r.stage("grad_mask", 30, lambda: grad_mask(r))
    r.stage("activation_checkpointing", 60, lambda: activation_checkpointing(r))
    r.stage("method_cost", 90, lambda: method_cost(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
