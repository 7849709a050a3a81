"""Benchmark: DES-MoE routing statistics of every MoE layer in one call, plus the affinity EMA update.

Per training step, from top-k ids/weights [L, T, K], token domains [T] and a valid-token mask:
domain x expert counts and routing mass [L, M, E], per-expert load [L, E], then ``A = m*A + (1-m)*freq``.
Side by side, same inputs:
    extension  ``desmoe.ops.routing_stats(..., validate=False)`` + ``desmoe.ops.affinity_ema_`` (C++/CUDA ops,
               no host sync; on the reference fallback when not built — the record's ``backend`` says which)
    torch      what a user writes: a loop over layers of ``bincount`` / ``index_add_`` and the EMA in PyTorch
    reference  ``desmoe.ops.reference.routing_stats_reference`` + ``affinity_ema_reference`` (vectorised bincount)
GB/s counts the inputs read once (ids int64, weights float32, domains, valid) plus the outputs written once.
The target: statistics at ≤ 1% of a training step (DeepSeek-V2-Lite: a step over 32k tokens takes seconds).

    python benchmarks/bench_routing_stats.py            # GPU: 26 layers, E=64, K=6, M=4, T in {8192, 32768}
    python benchmarks/bench_routing_stats.py --quick    # small, CPU OK
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402

# DeepSeek-V2-Lite: 26 MoE layers, 64 routed experts, top-6; M domains of a DES-MoE run.
FULL = dict(L=26, E=64, K=6, M=4, T=(8192, 32768))
QUICK = dict(L=4, E=64, K=6, M=4, T=(1024, 4096))
MOMENTUM = 0.9


def _torch_loop(ids_LTK, dom_T, M, E, w_LTK, valid_T, A_LME):
    L = ids_LTK.shape[0]
    counts = torch.zeros(L, M, E, dtype=torch.int64, device=ids_LTK.device)
    mass = torch.zeros(L, M, E, dtype=torch.float32, device=ids_LTK.device)
    load = torch.zeros(L, E, dtype=torch.int64, device=ids_LTK.device)
    sel_T = valid_T & (dom_T >= 0)
    dom_sel = dom_T[sel_T]
    for l in range(L):
        ids = ids_LTK[l]
        load[l] = torch.bincount(ids[valid_T].reshape(-1), minlength=E)
        flat = (dom_sel.unsqueeze(1) * E + ids[sel_T]).reshape(-1)
        counts[l].view(-1).index_add_(0, flat, torch.ones_like(flat))
        mass[l].view(-1).index_add_(0, flat, w_LTK[l][sel_T].reshape(-1))
    total = counts.sum(-1, keepdim=True)
    freq = counts.float() / total.clamp(min=1)
    A_LME.copy_(torch.where(total > 0, MOMENTUM * A_LME + (1 - MOMENTUM) * freq, A_LME))
    return counts, mass, load


def main(argv=None) -> dict:
    from desmoe import ops
    from desmoe.ops import extension
    from desmoe.ops import reference as ref

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--T", nargs="*", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    _common.add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"  # CPU: small shapes
    out = _common.output_dir(args, quick=args.quick)
    cfg = QUICK if quick else FULL
    L, E, K, M = cfg["L"], cfg["E"], cfg["K"], cfg["M"]
    iters = args.iters or (10 if quick else 50)
    info = extension.info()
    result = _common.header("bench_routing_stats", device)
    result.update(quick=args.quick, small_shapes=quick, extension=info, L=L, E=E, K=K, M=M)

    def ext_step(ids, dom, w, valid, A):
        c, m, ld = ops.routing_stats(ids, dom, M, E, topk_weights_LTK=w, valid_T=valid, validate=False)
        ops.affinity_ema_(A, c, MOMENTUM)
        return c, m, ld

    def ref_step(ids, dom, w, valid, A):
        c, m, ld = ref.routing_stats_reference(ids, dom, M, E, w, valid)
        ref.affinity_ema_reference(A, c, MOMENTUM)
        return c, m, ld

    def torch_step(ids, dom, w, valid, A):
        return _torch_loop(ids, dom, M, E, w, valid, A)

    impls = {"extension": ext_step, "torch": torch_step, "reference": ref_step}
    for T in args.T or cfg["T"]:
        g = torch.Generator(device="cpu").manual_seed(T)
        ids = torch.stack([torch.rand(T, E, generator=g).argsort(dim=1)[:, :K] for _ in range(L)]).to(device)
        w = torch.rand(L, T, K, generator=g).softmax(-1).to(device)
        dom = torch.randint(-1, M, (T,), generator=g).to(device)
        valid = (torch.rand(T, generator=g) > 0.05).to(device)
        nbytes = ids.numel() * 8 + w.numel() * 4 + T * (8 + 1) + L * M * E * (8 + 4 + 2 * 4) + L * E * 8
        expected = ref.routing_stats_reference(ids, dom, M, E, w, valid)
        for name, fn in impls.items():
            A = torch.zeros(L, M, E, device=device)
            got = fn(ids, dom, w, valid, A)
            ok = (torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
                  and torch.allclose(got[1], expected[1], rtol=1e-5, atol=1e-5))
            _common.reset_peak(device)
            ms = _common.time_fn(lambda fn=fn, A=A: fn(ids, dom, w, valid, A), warmup=3, iters=iters, device=device)
            rec = {"shape": f"L{L}xE{E}xK{K}xM{M}", "T": T, "impl": name, "pass": "stats+ema", "ms": ms,
                   "gbps": nbytes / (ms * 1e-3) / 1e9, "peak_mem_gb": _common.peak_mem_gb(device), "ok": ok}
            if name == "extension":
                rec["backend"] = info["source"]
            result["records"].append(rec)
    base = {r["T"]: r["ms"] for r in result["records"] if r["impl"] == "torch"}
    for r in result["records"]:
        r["speedup_vs_torch"] = base[r["T"]] / r["ms"]
    _common.print_table(result["records"], cols=("shape", "T", "impl", "pass", "ms", "gbps", "speedup_vs_torch",
                                                  "peak_mem_gb", "ok"))
    if not args.no_write:
        print("wrote", _common.write_results(result, out))
    return result


if __name__ == "__main__":
    main()
