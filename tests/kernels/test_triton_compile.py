"""Compile facts for sm_90 (H100/H200), on this machine, GPU or not: the CPU-side proxy for kernel speed.

Every Triton kernel is compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` for every
config its autotuner may pick after pruning (bf16, both row-tile heights), plus the float32 fallback. Read off
the artefacts:

- regs / stack: ``cuobjdump -res-usage`` on the cubin (Triton ships cuobjdump beside ptxas); stack > 0 means
  the kernel spills to local memory;
- smem: the kernel's shared memory (Triton metadata);
- buffers: the pipeline depth of the GEMM loop, the leading dimension of the shared-memory operand buffers
  (``ttg.local_alloc ... memdesc<N x ...>`` in TTGIR), and whether the loop's wait on them lets copies stay in
  flight (``ttg.async_wait {num > 0}`` inside the loop) rather than draining before every MMA;
- wgmma: Hopper tensor-core MMA in the PTX;
- tma: TMA copies (``cp.async.bulk.tensor``) in the PTX: the ``DESMOE_TMA=1`` variant of the four row-tile GEMMs
  (``USE_TMA=True``, rows marked ``tma``: the weight operand through a device-side tensor descriptor) must have
  them;
- CTAs/SM: resident blocks per SM from registers (64K per SM, 256-register warp granules) and shared memory
  (228 KB per SM, 1 KB reserved per block).

Asserted: 0 bytes of stack in every GEMM kernel (``KNOWN_STACK`` lists the per-version exceptions: float32
fallback configs only), >= 3 pipeline buffers with copies in
flight in the dW kernels, wgmma in every bf16 GEMM, TMA copies in every ``tma`` row, everything fits shared memory.
One table is printed.
gpt-oss's variant (biases, the [E, D, 2I] interleaved / [E, I, D] layout, clamped SwiGLU) is compiled too, rows
marked ``gpt_oss``: its own kernels (``desmoe.kernels.moe_gpt_oss``) with every bias / clamp / store flag on, and
the shared dx / dW kernels with the strides that layout makes 1 (dW: the same binaries, in the roles the gpt-oss
launcher gives them), under the same rules.

The compiles run in a subprocess (this file as a script) because the test process runs Triton's interpreter;
Triton's compile cache makes a rerun cheap. CI runs it twice: with the installed Triton and, in a side environment,
with Triton 3.6 (the GPU image's; ``.ci/run``'s last stage). Arguments in a kernel's ``do_not_specialize`` are
compiled without a divisibility hint, as Triton binds them at run time. ``python tests/kernels/test_triton_compile.py [--full]`` prints the table
(``--full``: the ``DESMOE_AUTOTUNE=full`` sweep) and one JSON line per compile.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = 232448  # H100/H200 max dynamic shared memory per block
SMEM_PER_SM = 233472  # 228 KB
GEMM_KERNELS = ("up_swiglu_kernel", "down_kernel", "dh_swiglu_kernel", "dx_kernel", "dw_gate_up_kernel",
                "dw_down_kernel", "up_gpt_oss_kernel", "down_gpt_oss_kernel", "dh_gpt_oss_kernel")
DW_KERNELS = ("dw_gate_up_kernel", "dw_down_kernel")
# the row-tile GEMMs with a USE_TMA constexpr (DESMOE_TMA=1: the weight operand through a tensor descriptor)
TMA_KERNELS = ("up_swiglu_kernel", "down_kernel", "dh_swiglu_kernel", "dx_kernel")
# the persistent row-tile kernels, whose grid is SMs x CTAs/SM of the config (desmoe.kernels.moe_configs.CTAS_PER_SM)
ROW_KERNELS = ("up_swiglu_kernel", "down_kernel", "dh_swiglu_kernel", "dx_kernel", "up_gpt_oss_kernel",
               "down_gpt_oss_kernel", "dh_gpt_oss_kernel")
# the grouped_mm engine's elementwise glue (desmoe.kernels.glue): one pass each, so no stack either
GLUE_KERNELS = ("swiglu_fwd_kernel", "swiglu_bwd_kernel", "zero_experts_kernel")
# Stack (bytes) a GEMM kernel is known to need under one Triton version, where the others need none; anything else
# with stack fails. Triton 3.6 (the GPU image's) spills one or two registers (an STL/LDL pair outside the K loop,
# read off the SASS) in the float32 fallback config of two gpt-oss GEMMs; 3.9 compiles the same configs with no
# stack, and every bf16 config (what the GPU runs) has none under both.
KNOWN_STACK = {("3.6", "dh_gpt_oss_kernel", "gpt_oss", "*fp32"): 8, ("3.6", "dx_kernel", "gpt_oss", "*fp32"): 8}
# Routing kernels: warp instructions per (token, expert) pair read off the sm_90 SASS (loop-free kernels, so the
# static count is what every warp runs: SASS count x warps / pairs per program), budgets a little above what Triton
# 3.9 and 3.6 compile today (3.9 / 3.6: histogram 0.59 / 2.01, scatter 7.9 / 11.05, top-k qwen3 68.6 / 68.8, dsv3
# 246 / 265; with DES-MoE's pair mask ("E128m": 2E buckets) histogram 0.83 / 3.12, scatter 7.8 / 11.3). The
# permute kernels they replaced (one-hot compares over E per pair, in a loop over 128-pair chunks) ran ~43
# (histogram) and ~147 (scatter) per pair; the top-k's former two reductions per pick 73.4 / 68.75 (qwen3) and
# 276 / 259 (dsv3).
INSTR_PER_PAIR = {("histogram_kernel", "E128"): 2.5, ("scatter_kernel", "E128"): 13.0,
                  ("histogram_kernel", "E128m"): 3.5, ("scatter_kernel", "E128m"): 13.0,
                  ("topk_route_fwd_kernel", "qwen3"): 72.0, ("topk_route_fwd_kernel", "dsv3"): 290.0}
_I32_PTRS = {"tile_expert_ptr", "tile_row_ptr", "offsets_ptr", "bounds_ptr", "counts_ptr", "sorted_pairs_ptr",
             "tok_ptr", "hist_ptr", "sorted_tok_ptr", "ids_ptr"}
_DIV16 = {"N", "KDIM", "A_DIM", "B_DIM", "D", "S", "sx_t", "sd_t", "sw_e", "sw_r", "sw_d", "sw_i", "stride_t",
          "stride_dt", "sw_j", "sb_e", "s_row"}
# the weight strides that are 1 in each kernel's layout (the standard one; gpt-oss's in its own kernels)
_UNIT_STRIDES = {"up_swiglu_kernel": {"sw_d"}, "dx_kernel": {"sw_d"}, "down_kernel": {"sw_i"},
                 "dh_swiglu_kernel": {"sw_i"}, "up_gpt_oss_kernel": {"sw_j"}, "down_gpt_oss_kernel": {"sw_d"},
                 "dh_gpt_oss_kernel": {"sw_d"}, "bias_grad_kernel": {"s_col"}}


def _ptr(kernel: str, name: str, dt: str) -> str:
    if kernel == "topk_route_fwd_kernel":
        return {"logits_ptr": dt, "bias_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32"}[name]
    if kernel == "topk_route_bwd_kernel":
        return {"dweights_ptr": "*fp32", "logits_ptr": dt, "ids_ptr": "*i64", "dlogits_ptr": dt}[name]
    if kernel in ("histogram_kernel", "scatter_kernel") and name == "ids_ptr":
        return "*i64"
    if name in _I32_PTRS:
        return "*i32"
    if name in ("expert_mask_ptr", "pair_mask_ptr", "keep_ptr"):
        return "*u8"
    if name in ("weights_ptr", "dwp_ptr") or (kernel, name) == ("combine_kernel", "w_ptr"):
        return "*fp32"
    if kernel == "bias_grad_kernel":
        return {"scale_ptr": "*fp32", "out_ptr": "*fp32", "tok_ptr": "*i32"}.get(name, dt)
    return dt


def _cuobjdump() -> str:
    from triton import knobs

    return os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{out}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4))}


def _pipeline(ttgir: str) -> tuple[int, bool]:
    """(pipeline buffers of the GEMM operands, copies kept in flight inside the loop)."""
    depths = [int(m.group(1)) for m in re.finditer(
        r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x(?:bf16|f16|f32)", ttgir)]
    in_flight = bool(re.search(r"ttg\.async_wait[^\n]*\{num = [1-9]", ttgir))
    return (min(depths) if depths else 0), in_flight


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, per_warp * num_warps)
    by_smem = SMEM_PER_SM // (smem + 1024)
    by_threads = 2048 // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, 32))


def _sass(cubin: bytes) -> tuple[int, bool]:
    """(instructions in the SASS, NOPs left out; whether it has a loop: a branch back to an earlier address other
    than the self-branch every kernel ends with)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", out)]
    loop = False
    for addr, i in ins:
        m = re.search(r"\bBRA\b.*0x([0-9a-f]+)", i)
        if m and int(m.group(1), 16) < addr:
            loop = True
    return sum(1 for _a, i in ins if not i.startswith("NOP")), loop


def compile_kernel(kernel, consts: dict, num_warps: int, num_stages: int, dt: str = "*bf16", unit_strides=None,
                   variant: str = "", pairs: int = 0) -> dict:
    """The compile facts of one config; ``pairs``: the (token, expert) pairs one program handles, for the
    instruction count per pair of a loop-free routing kernel (warp instructions: SASS count x warps / pairs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap @triton.autotune
    name = jit.__name__
    ones = {"sx_d", "sd_d", "stride_e", "stride_de"}
    ones |= _UNIT_STRIDES.get(name, set()) if unit_strides is None else set(unit_strides)
    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        n = p.name
        if n in ones:
            sig[n], cx[n] = "constexpr", 1
            continue
        # sizes in the kernel's do_not_specialize (the ones that vary with the batch) get no divisibility hint:
        # Triton never derives one for them at run time either
        if (n.endswith("_ptr") or n in _DIV16) and not p.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
        if p.is_constexpr:
            sig[n], cx[n] = "constexpr", consts[n]
        elif n.endswith("_ptr"):
            sig[n] = _ptr(name, n, dt)
        elif n in ("scaling", "renorm_eps", "masked_value", "alpha", "limit"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(jit, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    res = _resources(k.asm["cubin"])
    buffers, in_flight = _pipeline(k.asm["ttgir"])
    shared = k.metadata.shared
    cfg = {k_: v for k_, v in consts.items() if k_.startswith("BLOCK") or k_ == "GROUP"}
    if pairs:
        n, loop = _sass(k.asm["cubin"])
        res = {**res, "sass": n, "loop": loop, "instr_per_pair": round(n * num_warps / pairs, 2)}
    return {"kernel": name, "variant": variant, "triton": triton.__version__, "dtype": dt, "config": cfg, "consts": consts, "num_warps": num_warps,
            "num_stages": num_stages, "shared": shared, **res, "buffers": buffers, "in_flight": in_flight,
            "wgmma": "wgmma" in k.asm["ptx"], "tma": "cp.async.bulk.tensor" in k.asm["ptx"],
            "ctas_per_sm": ctas_per_sm(res["regs"], num_warps, shared)}


def jobs(mode: str):
    """(kernel, constexprs, num_warps, num_stages, pointer dtype) for every config the autotuner may pick."""
    from desmoe.kernels import moe as mk
    from desmoe.kernels import permute as pk
    from desmoe.kernels import routing as rk

    extra = {"up_swiglu_kernel": {"STORE_GATE_UP": True},
             "dh_swiglu_kernel": {"STORE_DGU": True, "STORE_HW": True, "STORE_DWP": True, "HAS_PAIR_MASK": True,
                                  "HAS_EXPERT_MASK": True, "DWP_COLS": mk.DWP_COLS},
             "dw_gate_up_kernel": {"HAS_EXPERT_MASK": True}, "dw_down_kernel": {"HAS_EXPERT_MASK": True}}
    n_b = {"up_swiglu_kernel": 2}
    for kern in mk.AUTOTUNED:
        name = kern.fn.__name__
        configs = mk.configs_for(name, mode)
        dw = name in DW_KERNELS
        tma = {"USE_TMA": False} if name in TMA_KERNELS else {}
        # bf16 at both row-tile heights the launcher uses; float32 inputs (the fallback) at the larger one
        variants = [(2, "*bf16", False, bm) for bm in ((None,) if dw else (64, 128))] + [(4, "*fp32", True, 128)]
        for es, dt, ieee, bm in variants:
            for c in mk.prune_configs(configs, es, bm, n_b.get(name, 1), name, mode):
                consts = {**c.kwargs, **extra.get(name, {}), "IEEE": ieee, **tma,
                          **({} if dw else {"BLOCK_M": bm or 128})}
                yield kern, consts, c.num_warps, c.num_stages, dt
    # DESMOE_TMA=1: the same bf16 configs with the weight operand through a tensor descriptor
    for kern in (mk.up_swiglu_kernel, mk.down_kernel, mk.dh_swiglu_kernel, mk.dx_kernel):
        name = kern.fn.__name__
        for bm in (64, 128):
            for c in mk.prune_configs(mk.configs_for(name, mode), 2, bm, n_b.get(name, 1), name, mode):
                consts = {**c.kwargs, **extra.get(name, {}), "IEEE": False, "USE_TMA": True, "BLOCK_M": bm}
                yield kern, consts, c.num_warps, c.num_stages, "*bf16", {"variant": "tma"}
    yield from gpt_oss_jobs(mode)
    yield mk.combine_kernel, {"HAS_W": True, "BLOCK_D": 1024}, 4, 1, "*bf16"
    # the glue kernels as their launcher runs them on a GPU (desmoe.ops.triton_glue; Triton's default warps/stages)
    from desmoe.kernels import glue as glk
    from desmoe.ops.triton_glue import SWIGLU_BLOCKS

    bs, bn = SWIGLU_BLOCKS
    yield glk.swiglu_fwd_kernel, {"BLOCK_S": bs, "BLOCK_N": bn}, 4, 3, "*bf16"
    yield glk.swiglu_bwd_kernel, {"HAS_PAIR_MASK": True, "BLOCK_S": bs, "BLOCK_N": bn}, 4, 3, "*bf16"
    yield glk.zero_experts_kernel, {"BLOCK": 4096}, 4, 3, "*bf16"
    # routing metadata as desmoe.ops.triton_permute launches it on a GPU (E = 128: Qwen3-30B-A3B, OLMoE)
    from desmoe.ops import triton_permute as tp

    B, per = tp.PERMUTE_BLOCK, {"variant": "E128", "pairs": tp.PERMUTE_BLOCK}
    # and with DES-MoE's pair mask: 2E buckets (kept / masked per expert), so E_PAD doubles
    keep = {"variant": "E128m", "pairs": tp.PERMUTE_BLOCK}
    yield pk.histogram_kernel, {"BLOCK": B, "E_PAD": 128, "HAS_KEEP": False}, tp.PERMUTE_WARPS, 1, "*i32", per
    yield pk.histogram_kernel, {"BLOCK": B, "E_PAD": 256, "HAS_KEEP": True}, tp.PERMUTE_WARPS, 1, "*i32", keep
    yield pk.block_scan_kernel, {"ROWS": 64, "ECOLS": 16}, tp.PERMUTE_WARPS, 1, "*i32"
    for paired in (False, True):
        yield pk.schedule_kernel, {"BLOCK_M": 128, "E_PAD": 128, "SLOTS": 64, "PAIRED": paired}, tp.PERMUTE_WARPS, 1, \
            "*i32"
    for e_pad, has_keep, opts in ((128, False, per), (256, True, keep)):
        yield pk.scatter_kernel, {"BLOCK": B, "LOG_BLOCK": B.bit_length() - 1, "E_PAD": e_pad, "HAS_KEEP": has_keep}, \
            tp.PERMUTE_WARPS, 1, "*i32", opts
    route = {"TOP_K": 8, "K_PAD": 8, "E_PAD": 256, "BLOCK_T": 16, "SCORING_SIGMOID": True, "HAS_BIAS": True,
             "RENORM": True, "GROUPED": True, "N_GROUP": 8, "GROUP_SIZE": 32, "TOPK_GROUP": 4, "G_PAD": 8,
             "GROUP_TOP2SUM": True}
    yield rk.topk_route_fwd_kernel, route, 4, 1, "*bf16", {"variant": "dsv3", "pairs": 16 * 8}
    # Qwen3-30B-A3B's router: softmax over 128 experts, top-8, bf16 logits
    qwen3 = {**route, "SCORING_SIGMOID": False, "HAS_BIAS": False, "GROUPED": False, "E_PAD": 128, "BLOCK_T": 32}
    yield rk.topk_route_fwd_kernel, qwen3, 4, 1, "*bf16", {"variant": "qwen3", "pairs": 32 * 8}
    yield rk.topk_route_fwd_kernel, qwen3, 4, 1, "*fp32"
    yield rk.topk_route_bwd_kernel, {"TOP_K": 8, "K_PAD": 8, "E_PAD": 128, "BLOCK_T": 32, "SCORING_SIGMOID": False,
                                     "RENORM": True}, 4, 1, "*bf16"


def gpt_oss_jobs(mode: str):
    """gpt-oss's variant: its own kernels with every bias / clamp / store flag on, and the shared dx / dW kernels
    with the strides its layout makes 1 (dx reads W_gate_up [E, D, 2I] along its contiguous 2I; dW_gate_up runs on
    dw_down_kernel and dW_down on dw_gate_up_kernel, with the token-gathered operand unit-strided as before).
    Yields (kernel, constexprs, num_warps, num_stages, pointer dtype, {"unit_strides", "variant"})."""
    from desmoe.kernels import moe as mk
    from desmoe.kernels import moe_gpt_oss as gk

    flags = {"up_gpt_oss_kernel": {"STORE_GATE_UP": True, "HAS_BIAS": True, "CLAMPED": True},
             "down_gpt_oss_kernel": {"HAS_BIAS": True},
             "dh_gpt_oss_kernel": {"STORE_DGU": True, "STORE_HW": True, "STORE_DWP": True, "HAS_PAIR_MASK": True,
                                   "HAS_EXPERT_MASK": True, "CLAMPED": True, "DWP_COLS": mk.DWP_COLS},
             "dx_kernel": {"USE_TMA": False}, "dw_gate_up_kernel": {"HAS_EXPERT_MASK": True},
             "dw_down_kernel": {"HAS_EXPERT_MASK": True}}
    units = {"dx_kernel": {"sw_r"}, "dw_gate_up_kernel": set(), "dw_down_kernel": set()}
    kernels = list(gk.AUTOTUNED) + [mk.dx_kernel, mk.dw_gate_up_kernel, mk.dw_down_kernel]
    for kern in kernels:
        name = kern.fn.__name__
        dw = name in DW_KERNELS
        configs = mk.configs_for(name, mode)
        variants = [(2, "*bf16", False, bm) for bm in ((None,) if dw else (64, 128))] + [(4, "*fp32", True, 128)]
        for es, dt, ieee, bm in variants:
            n_b = 2 if name == "up_gpt_oss_kernel" else 1
            for c in mk.prune_configs(configs, es, bm, n_b, name, mode):
                consts = {**c.kwargs, **flags[name], "IEEE": ieee, **({} if dw else {"BLOCK_M": bm or 128})}
                yield kern, consts, c.num_warps, c.num_stages, dt, {"unit_strides": units.get(name),
                                                                   "variant": "gpt_oss"}
    for gather in (False, True):  # bias gradients: d(gate|up) rows / w * dout[tok] rows per expert
        yield gk.bias_grad_kernel, {"GATHER": gather, "HAS_SCALE": gather, "HAS_EXPERT_MASK": True, "BLOCK_R": 32,
                                    "BLOCK_N": 128}, 4, 1, "*bf16", {"variant": "gpt_oss"}


def table(recs) -> str:
    head = f"{'kernel':<22} {'var':<7} {'dtype':<5} {'config':<34} {'w':>2} {'s':>2} {'regs':>4} {'stack':>5} {'smem':>7} " \
           f"{'bufs':>4} {'flight':>6} {'wgmma':>5} {'tma':>5} {'CTA/SM':>6} {'i/pair':>6}"
    lines = [head, "-" * len(head)]
    for r in recs:
        if "error" in r:
            lines.append(f"{r['kernel']:<22} ERROR {r['error'][:80]}")
            continue
        cfg = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in r["config"].items())
        lines.append(f"{r['kernel']:<22} {r.get('variant', ''):<7} {r['dtype'][1:]:<5} {cfg:<34} {r['num_warps']:>2} {r['num_stages']:>2} "
                     f"{r['regs']:>4} {r['stack']:>5} {r['shared']:>7} {r['buffers']:>4} {str(r['in_flight']):>6} "
                     f"{str(r['wgmma']):>5} {str(r.get('tma', '')):>5} {r['ctas_per_sm']:>6} "
                     f"{r.get('instr_per_pair', ''):>6}")
    return "\n".join(lines)


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset: the kernels must be real JIT functions to compile")
    recs = []
    for kern, consts, w, s, dt, *opts in jobs("full" if "--full" in argv else "default"):
        try:
            rec = compile_kernel(kern, consts, w, s, dt, **(opts[0] if opts else {}))
            rec["fits"] = rec["shared"] <= SMEM_LIMIT
        except Exception as exc:  # noqa: BLE001 - reported, the caller fails on it
            name = getattr(getattr(kern, "fn", kern), "__name__", str(kern))
            rec = {"kernel": name, "variant": (opts[0] if opts else {}).get("variant", ""), "dtype": dt,
                   "consts": consts, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    print(table(recs), flush=True)
    if "--ctas" in argv:  # this version's column of desmoe.kernels.moe_configs.CTAS_PER_SM
        ver = ".".join(recs[0]["triton"].split(".")[:2])
        for key, n in sorted(cta_table(recs).items()):
            print(f"CTAS {key!r}: {{{ver!r}: {n}}},")
    return 0


def cta_table(recs) -> dict:
    """CTAs/SM per ``moe_configs.cta_key`` of every compiled row-tile config under this run's Triton (the minimum
    over the variants that share a kernel: dx with the standard and gpt-oss strides). The ``tma`` rows
    (``DESMOE_TMA=1``) are the entries of ``kernel:tma``."""
    out = {}
    for r in recs:
        if r["kernel"] in ROW_KERNELS and "error" not in r:
            c = r["consts"]
            name = r["kernel"] + (":tma" if r.get("variant") == "tma" else "")
            key = (name, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP"], r["num_warps"], r["num_stages"])
            out[key] = min(out.get(key, r["ctas_per_sm"]), r["ctas_per_sm"])
    return out


def cta_table_mismatches(recs) -> list:
    """Where ``moe_configs.CTAS_PER_SM`` differs from the compile facts of this run's Triton: a wrong value, a
    compiled config without an entry, an entry no default config compiles (stale), or a BLOCK_M class whose
    configs the grid cannot tell apart by their kwargs (it sees no num_warps / num_stages)."""
    from desmoe.kernels import moe_configs as mc

    ver = ".".join(recs[0]["triton"].split(".")[:2])
    got = cta_table(recs)
    bad = [f"{k}: CTAS_PER_SM has {mc.CTAS_PER_SM[k].get(ver)} for Triton {ver}, the compile facts say {n}"
           for k, n in got.items() if k in mc.CTAS_PER_SM and mc.CTAS_PER_SM[k].get(ver) != n]
    bad += [f"{k}: not in CTAS_PER_SM (Triton {ver}: {n} CTAs/SM)" for k, n in got.items() if k not in mc.CTAS_PER_SM]
    bad += [f"{k}: in CTAS_PER_SM, but no default config compiles it" for k in mc.CTAS_PER_SM if k not in got]
    for kern in ROW_KERNELS:
        for bm, cls in mc.GPU_CONFIGS["default"][kern].items():
            kws = [tuple(sorted(c.kwargs.items())) for c in cls]
            if len(set(kws)) != len(kws):
                bad.append(f"{kern} BLOCK_M={bm}: two default configs with the same kwargs {kws}")
    return bad


def violations(recs) -> list:
    """Every compile-fact rule a record breaks, as readable strings."""
    bad = []
    for r in recs:
        tag = f"{r['kernel']}{' (' + r['variant'] + ')' if r.get('variant') else ''} {r['dtype']} {r.get('consts')} " \
              f"w{r.get('num_warps')} s{r.get('num_stages')}"
        if "error" in r:
            bad.append(f"{tag}: {r['error']}")
            continue
        if not r["fits"]:
            bad.append(f"{tag}: shared memory {r['shared']} > {SMEM_LIMIT}")
        if r["kernel"] in GLUE_KERNELS and (r["local"] or r["stack"]):
            bad.append(f"{tag}: {r['stack']} bytes of stack (spills), Triton {r.get('triton')}")
        if r["kernel"] in GEMM_KERNELS:
            known = KNOWN_STACK.get((".".join(r.get("triton", "").split(".")[:2]), r["kernel"], r.get("variant", ""),
                                     r["dtype"]), 0)
            if r["local"] or r["stack"] not in (0, known):
                bad.append(f"{tag}: {r['stack']} bytes of stack (spills), Triton {r.get('triton')}")
            if r["dtype"] == "*bf16" and not r["wgmma"]:
                bad.append(f"{tag}: no wgmma")
        if "instr_per_pair" in r:
            budget = INSTR_PER_PAIR[(r["kernel"], r["variant"])]
            if r["loop"] or r["instr_per_pair"] > budget:
                bad.append(f"{tag}: {r['instr_per_pair']} warp instructions per pair (budget {budget}), "
                           f"loop: {r['loop']}, Triton {r.get('triton')}")
        if r.get("variant") == "tma" and not r["tma"]:
            bad.append(f"{tag}: no TMA copies (cp.async.bulk.tensor) in the PTX, Triton {r.get('triton')}")
        if r["kernel"] in DW_KERNELS and r["dtype"] == "*bf16" and (r["buffers"] < 3 or not r["in_flight"]):
            bad.append(f"{tag}: {r['buffers']} pipeline buffers, copies in flight: {r['in_flight']}")
    return bad


_RECORDS = []


def _compile_records() -> list:
    """The compile facts of every default config (one subprocess per test session, shared by the tests)."""
    if not _RECORDS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _RECORDS.extend(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    return _RECORDS


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
    except Exception:  # noqa: BLE001
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu tests compile and run the kernels for real")
def test_compile_facts_sm90():
    recs = _compile_records()
    print(f"Triton {recs[0].get('triton') if recs else '?'}")
    print(table(recs))
    names = {r["kernel"] for r in recs}
    assert set(GEMM_KERNELS) | set(GLUE_KERNELS) | {"combine_kernel", "histogram_kernel", "block_scan_kernel",
                                                    "schedule_kernel", "scatter_kernel", "topk_route_fwd_kernel",
                                                    "topk_route_bwd_kernel"} <= names, names
    # every routing kernel with an instruction budget was compiled and counted
    assert {(r["kernel"], r["variant"]) for r in recs if "instr_per_pair" in r} == set(INSTR_PER_PAIR)
    # gpt-oss's variant: its kernels, and both dW kernels in the roles its launcher gives them (bf16, so the
    # pipeline-depth rule applies to them)
    # DESMOE_TMA=1's variant of each row-tile GEMM, bf16 at both row-tile heights
    tma = {(r["kernel"], r["consts"]["BLOCK_M"]) for r in recs if r.get("variant") == "tma"}
    assert tma == {(k, bm) for k in TMA_KERNELS for bm in (64, 128)}, tma
    gpt = {r["kernel"] for r in recs if r.get("variant") == "gpt_oss" and r.get("dtype") == "*bf16"}
    assert {"up_gpt_oss_kernel", "down_gpt_oss_kernel", "dh_gpt_oss_kernel", "dx_kernel", "dw_gate_up_kernel",
            "dw_down_kernel", "bias_grad_kernel"} <= gpt, gpt
    bad = violations(recs)
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu tests compile and run the kernels for real")
def test_cta_table_matches_compile_facts():
    """The persistent grid's CTAs/SM table holds, for this Triton version, exactly what the compile facts give."""
    recs = _compile_records()
    bad = cta_table_mismatches(recs)
    assert not bad, "\n".join(bad)


def test_ctas_per_sm_arithmetic():
    # 128 regs x 8 warps = 32K registers, 100 KB smem -> 2 by registers, 2 by shared memory
    assert ctas_per_sm(128, 8, 100 * 1024) == 2
    assert ctas_per_sm(255, 8, 10 * 1024) == 1  # 256-register granules: 255 -> 256 per thread
    assert ctas_per_sm(64, 4, 200 * 1024) == 1  # shared-memory bound


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
