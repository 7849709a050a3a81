"""Benchmark: per-expert gradient masking of every MoE layer (DES-MoE frozen experts), in one call.

Side by side, same gradients and masks (about half of the experts frozen, different per layer):
    extension  ``desmoe.ops.mask_expert_grads_``: one multi-tensor launch over all layers (C++/CUDA op; on the
               reference fallback when the extension is not built — the record says which)
    torch      what a user writes: ``for g, m in zip(grads, masks): g[~m] = 0`` (or ``*= scale``)
    reference  ``desmoe.ops.reference.mask_expert_grads_reference`` (index_fill_ per layer)
plus the ceiling: ``dst.copy_(src)`` over as many bytes as the frozen rows hold (record shape ``copy``).

Bandwidth (GB/s) counts the bytes an op must move: frozen rows written once for ``scale=0`` (``zero``), read and
written for ``scale != 0`` (``scale``); the copy ceiling counts read + write. The target on GPU is
``extension`` at ≥ 70% of the copy ceiling's GB/s (``frac_of_copy``).

    python benchmarks/bench_grad_mask.py            # GPU: 26 layers x 64 experts, DeepSeek-V2-Lite bf16 grads
    python benchmarks/bench_grad_mask.py --quick    # small shapes, CPU OK
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common  # noqa: E402

# DeepSeek-V2-Lite experts: gate_up [E, 2I, D] = [64, 2816, 2048], down [E, D, I] = [64, 2048, 1408].
FULL = dict(layers=26, shapes=((64, 2816, 2048), (64, 2048, 1408)))
QUICK = dict(layers=4, shapes=((16, 256, 128), (16, 128, 128)))


def _torch_loop(grads, masks, scale):
    for g, m in zip(grads, masks):
        if scale == 0.0:
            g[~m] = 0
        else:
            g[~m] *= scale


def main(argv=None) -> dict:
    from desmoe import ops
    from desmoe.ops import extension
    from desmoe.ops import reference as ref

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--frozen-frac", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    _common.add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"  # CPU: small shapes
    out = _common.output_dir(args, quick=args.quick)
    cfg = QUICK if quick else FULL
    L = args.layers or cfg["layers"]
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (5 if quick else 20)
    gen = torch.Generator(device="cpu").manual_seed(0)
    grads, masks = [], []
    for _ in range(L):
        for shape in cfg["shapes"]:
            g = torch.empty(shape, dtype=dtype, device=device)
            g.normal_()
            grads.append(g)
            m = torch.rand(shape[0], generator=gen) >= args.frozen_frac
            masks.append(m.to(device))
    elsize = grads[0].element_size()
    frozen_bytes = sum(int((~m).sum()) * (g.numel() // g.shape[0]) * elsize for g, m in zip(grads, masks))
    total_bytes = sum(g.numel() * elsize for g in grads)
    shape_name = f"{L}x[" + "+".join("x".join(map(str, s)) for s in cfg["shapes"]) + f"] {args.dtype}"

    result = _common.header("bench_grad_mask", device)
    info = extension.info()
    result.update(quick=args.quick, small_shapes=quick, frozen_frac=args.frozen_frac, grad_bytes=total_bytes,
                  frozen_bytes=frozen_bytes, extension=info)

    # Correctness first (also the records' "ok"): frozen rows exact zero, trainable rows unchanged (checksums).
    sums_before = [g.float().sum(dim=tuple(range(1, g.dim()))) for g in grads]
    ops.mask_expert_grads_(grads, masks, 0.0)
    ok = True
    for g, m, s in zip(grads, masks, sums_before):
        after = g.float().sum(dim=tuple(range(1, g.dim())))
        ok &= bool((g[~m] == 0).all()) and bool(torch.equal(after[m], s[m]))
    del sums_before

    # Copy ceiling over as many bytes as the frozen rows hold.
    n_copy = max(frozen_bytes // elsize, 1)
    src = torch.empty(n_copy, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    _common.reset_peak(device)
    ms_copy = _common.time_fn(lambda: dst.copy_(src), warmup=2, iters=iters, device=device)
    copy_gbps = 2 * n_copy * elsize / (ms_copy * 1e-3) / 1e9
    result["records"].append({"shape": "copy", "T": None, "impl": "torch", "pass": "copy", "ms": ms_copy,
                              "gbps": copy_gbps, "peak_mem_gb": _common.peak_mem_gb(device),
                              "note": f"dst.copy_(src) of {n_copy * elsize} bytes (read + write counted)"})
    src = dst = None  # freed (the timed lambda holds them)

    impls = {
        "extension": lambda s: ops.mask_expert_grads_(grads, masks, s),
        "torch": lambda s: _torch_loop(grads, masks, s),
        "reference": lambda s: ref.mask_expert_grads_reference(grads, masks, s),
    }
    for ps, scale in (("zero", 0.0), ("scale", 0.5)):
        moved = frozen_bytes * (1 if scale == 0.0 else 2)
        for name, fn in impls.items():
            if scale != 0.0:  # keep values finite across repeated scaling
                for g in grads:
                    g.fill_(1.0)
            _common.reset_peak(device)
            ms = _common.time_fn(lambda fn=fn: fn(scale), warmup=2, iters=iters, device=device)
            gbps = moved / (ms * 1e-3) / 1e9
            rec = {"shape": shape_name, "T": None, "impl": name, "pass": ps, "ms": ms, "gbps": gbps,
                   "peak_mem_gb": _common.peak_mem_gb(device), "layers": L, "frac_of_copy": gbps / copy_gbps,
                   "ok": ok if name == "extension" else None}
            if name == "extension":
                rec["backend"] = info["source"]
            result["records"].append(rec)
    base = {r["pass"]: r["ms"] for r in result["records"] if r["impl"] == "torch" and r["shape"] != "copy"}
    for r in result["records"]:
        if r["shape"] != "copy":
            r["speedup_vs_torch"] = base[r["pass"]] / r["ms"]
    _common.print_table(result["records"], cols=("shape", "impl", "pass", "ms", "gbps", "frac_of_copy",
                                                  "speedup_vs_torch", "peak_mem_gb", "ok"))
    if not ok:
        print("WARNING: extension result check FAILED")
    if not args.no_write:
        print("wrote", _common.write_results(result, out))
    return result


if __name__ == "__main__":
    main()
