"""Autotune configurations of the grouped-GEMM expert kernels (:mod:`desmoe.kernels.moe`,
:mod:`desmoe.kernels.moe_gpt_oss`): the per-kernel config sets (``GPU_CONFIGS``: "default", and "full" behind
``DESMOE_AUTOTUNE=full``), the float32 fallbacks, the shared-memory prune, the autotune keys and the batch-varying
sizes that are never specialized. Kept beside the kernels; the compile facts of every config are asserted in
tests/kernels/test_triton_compile.py."""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# "default": a small config set per kernel (a first call compiles ~2 configs per kernel); "full": the whole sweep
AUTOTUNE = os.environ.get("DESMOE_AUTOTUNE", "default")
if AUTOTUNE not in ("default", "full"):
    raise ValueError(f"DESMOE_AUTOTUNE must be 'default' or 'full', got {AUTOTUNE!r}")
# DESMOE_TMA=1: the four row-tile GEMMs (up_swiglu, down, dh_swiglu, dx) read their weight (B) operand through a
# device-side tensor descriptor (TMA copies on sm_90), where the weight qualifies (desmoe.ops.triton_common.use_tma);
# the gathered token rows (A) stay pointer loads. Off by default: the default path compiles as before (USE_TMA=False).
# The launchers read this attribute at call time, so a test can flip it with monkeypatch.
_TMA_ENV = os.environ.get("DESMOE_TMA", "0")
if _TMA_ENV not in ("0", "1"):
    raise ValueError(f"DESMOE_TMA must be '0' (off, the default) or '1' (TMA for the experts GEMMs' weight operand "
                     f"on sm_90), got {_TMA_ENV!r}")
TMA = _TMA_ENV == "1"
# dh_swiglu_kernel writes its routing-weight partial dots at this column granularity, whatever the config (see
# there): every BLOCK_N is a multiple of it, so the partial-dot buffer layout does not depend on the config
DWP_COLS = 16 if INTERPRET else 32
# The dh epilogues run in half-width passes, or quarter-width ones where a half would hold more than this many
# accumulator elements: on a GPU the 64x128, 128x64 and 128x128 tiles (fewer registers: 128x128 no longer spills,
# 128x64 fits 2 CTAs/SM); in the interpreter the 16x32 tiles, so its tests run both paths
EPI_ELEMS = 128 if INTERPRET else 2048


def _c(kw, w, s):
    return triton.Config(kw, num_warps=w, num_stages=s)


def _row(bn, bk, w, s, group=8):
    return _c({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP": group}, w, s)


def _dw(ba, bb, bk, w, s, group=8):
    return _c({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_K": bk, "GROUP": group}, w, s)


# Candidates per kernel and row-tile height (BLOCK_M, chosen by the launcher from the pairs per expert; None for
# the dW kernels). "default" keeps 2 per class, so a first call compiles ~2 configs per kernel; "full" adds the
# rest of the sweep. Every listed bf16 config compiles for sm_90 with no stack (spills) and fits shared memory:
# tests/kernels/test_triton_compile.py asserts that for every config the prune can keep. BLOCK_M = 64 classes include
# configs that fit 2-3 CTAs per SM, so one tile's epilogue overlaps another's loads on short-K GEMMs.
# The small-footprint fallback is what float32 inputs run (tests, debugging; no tensor cores there).
_ROW_FALLBACK = _row(32, 32, 4, 2)
_DW_FALLBACK = _dw(64, 64, 32, 4, 2)
# kernels whose float32 path needs a smaller tile than the shared fallback to stay free of spills (gpt-oss's up
# GEMM: one [BLOCK_K, 2*BLOCK_N] interleaved B tile, FMA dot)
_ROW_FALLBACKS = {"up_gpt_oss_kernel": _row(32, 16, 4, 2)}
_ALL_FALLBACKS = (_ROW_FALLBACK, _DW_FALLBACK, *_ROW_FALLBACKS.values())
_DEFAULT = {
    # BLOCK_M = 64: N128,K32 (8 warps, 4 stages) is 128 regs and 80 KB, so 2 CTAs/SM; it replaced N128,K64 w8 s3
    # (the same tile at 140 regs and 120 KB: 1 CTA/SM), now in the full sweep
    "up_swiglu_kernel": {64: [_row(128, 32, 8, 4), _row(64, 64, 4, 4)],
                         128: [_row(128, 64, 8, 3), _row(64, 64, 8, 4)]},
    # down has a short K (I, 12 steps at I=768): a 2-CTA/SM candidate overlaps one tile's epilogue with the next
    "down_kernel": {64: [_row(128, 64, 8, 4), _row(64, 64, 4, 4)], 128: [_row(128, 64, 8, 4), _row(64, 64, 4, 4)]},
    # quarter-width epilogue passes at 128 columns: BLOCK_M = 64 takes N128,K32 at 4 warps (2 CTAs/SM; it replaced
    # N128,K64 w8 s4, 1 CTA/SM); BLOCK_M = 128 takes the 128x128 tile (no stack; 1 CTA/SM) and N64 w8 (127 regs:
    # 2 CTAs/SM), which replaced N32 w4 (also 2 CTAs/SM, but half the width: twice the gathered dout re-reads)
    "dh_swiglu_kernel": {64: [_row(128, 32, 4, 4), _row(64, 64, 4, 4)],
                         128: [_row(128, 64, 8, 4), _row(64, 64, 8, 4)]},
    "dx_kernel": {64: [_row(128, 64, 8, 4), _row(64, 64, 4, 4)], 128: [_row(128, 64, 8, 4), _row(256, 64, 8, 3)]},
    "dw_gate_up_kernel": {None: [_dw(128, 128, 64, 8, 4), _dw(128, 256, 64, 8, 3)]},
    "dw_down_kernel": {None: [_dw(128, 128, 64, 8, 4), _dw(128, 256, 64, 8, 3)]},
    # gpt-oss's variant (desmoe.kernels.moe_gpt_oss): the same tile classes as the SwiGLU kernels it mirrors (its
    # up tile is one [BLOCK_K, 2*BLOCK_N] interleaved B tile, the footprint of the two [BLOCK_K, BLOCK_N] ones)
    "up_gpt_oss_kernel": {64: [_row(128, 64, 8, 3), _row(64, 64, 4, 4)],
                          128: [_row(128, 64, 8, 3), _row(64, 64, 8, 4)]},
    "down_gpt_oss_kernel": {64: [_row(128, 64, 8, 4), _row(64, 64, 4, 4)],
                            128: [_row(128, 64, 8, 4), _row(64, 64, 4, 4)]},
    # as dh_swiglu's, except at BLOCK_M = 128, where N64 w8 stays at 1 CTA/SM (143-150 regs): the 128x128 tile
    # replaced it (same residency, half the gathered dout re-reads) and N32 w4 (2 CTAs/SM) stays
    "dh_gpt_oss_kernel": {64: [_row(128, 32, 4, 4), _row(64, 64, 4, 4)],
                          128: [_row(128, 64, 8, 4), _row(32, 64, 4, 4)]},
}
_EXTRA = {
    "up_swiglu_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 8, 3)], 128: [_row(64, 64, 4, 4)]},
    "down_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 4, 3)], 128: [_row(128, 128, 8, 3), _row(256, 64, 8, 3)]},
    "dh_swiglu_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 8, 4)], 128: [_row(64, 64, 8, 3), _row(32, 64, 4, 4)]},
    "dx_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 4, 3)], 128: [_row(128, 128, 8, 3), _row(64, 64, 4, 4)]},
    "dw_gate_up_kernel": {None: [_dw(128, 128, 64, 8, 3), _dw(64, 128, 64, 4, 4)]},
    "dw_down_kernel": {None: [_dw(128, 128, 64, 8, 3), _dw(64, 128, 64, 4, 4)]},
    "up_gpt_oss_kernel": {64: [_row(64, 64, 8, 4), _row(128, 32, 4, 4)], 128: [_row(64, 64, 4, 4)]},
    "down_gpt_oss_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 4, 3)],
                            128: [_row(128, 128, 8, 3), _row(256, 64, 8, 3)]},
    "dh_gpt_oss_kernel": {64: [_row(64, 64, 8, 4), _row(128, 64, 8, 4)], 128: [_row(64, 64, 8, 3), _row(64, 64, 8, 4)]},
}
GPU_CONFIGS = {
    "default": _DEFAULT,
    "full": {k: {bm: v + _EXTRA[k][bm] for bm, v in by_bm.items()} for k, by_bm in _DEFAULT.items()},
}
# CTAs per SM on sm_90 of every row-tile config the default set can pick (and the float32 fallback at
# BLOCK_M = 128), per Triton version ("major.minor"), from registers and shared memory: the persistent row-tile
# grid is SMs x the minimum over versions (one wave). Key: (kernel, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, num_warps,
# num_stages); dx_kernel's entries are the minimum over its standard and gpt-oss strides. Kernel names ending in
# ":tma" are the DESMOE_TMA=1 variant (USE_TMA=True: other registers, so other CTAs/SM), bf16 configs only.
# tests/kernels/test_triton_compile.py recomputes every entry from the compile facts under the Triton it runs
# (3.9 here, 3.6 in CI's side environment) and fails on any difference, missing or extra entry; `python
# tests/kernels/test_triton_compile.py --ctas` prints this version's column.
CTAS_PER_SM = {
    ("up_swiglu_kernel", 64, 128, 32, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("up_swiglu_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("up_swiglu_kernel", 128, 128, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("up_swiglu_kernel", 128, 64, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("up_swiglu_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 2, "3.9": 2},
    ("down_kernel", 64, 128, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("down_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("down_kernel", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("down_kernel", 128, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("down_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 3, "3.9": 4},
    ("dh_swiglu_kernel", 64, 128, 32, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_swiglu_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 2},
    ("dh_swiglu_kernel", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("dh_swiglu_kernel", 128, 64, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("dh_swiglu_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 2, "3.9": 2},
    ("dx_kernel", 64, 128, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("dx_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("dx_kernel", 128, 256, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("dx_kernel", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("dx_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 3, "3.9": 4},
    ("up_gpt_oss_kernel", 64, 128, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("up_gpt_oss_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("up_gpt_oss_kernel", 128, 128, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("up_gpt_oss_kernel", 128, 64, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("up_gpt_oss_kernel", 128, 32, 16, 8, 4, 2): {"3.6": 2, "3.9": 2},
    ("down_gpt_oss_kernel", 64, 128, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("down_gpt_oss_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("down_gpt_oss_kernel", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("down_gpt_oss_kernel", 128, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("down_gpt_oss_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 3, "3.9": 4},
    ("dh_gpt_oss_kernel", 64, 128, 32, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_gpt_oss_kernel", 64, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_gpt_oss_kernel", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("dh_gpt_oss_kernel", 128, 32, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_gpt_oss_kernel", 128, 32, 32, 8, 4, 2): {"3.6": 3, "3.9": 2},
    ("up_swiglu_kernel:tma", 64, 128, 32, 8, 8, 4): {"3.6": 2, "3.9": 1},
    ("up_swiglu_kernel:tma", 64, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("up_swiglu_kernel:tma", 128, 128, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("up_swiglu_kernel:tma", 128, 64, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("down_kernel:tma", 64, 128, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("down_kernel:tma", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("down_kernel:tma", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("down_kernel:tma", 128, 64, 64, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_swiglu_kernel:tma", 64, 128, 32, 8, 4, 4): {"3.6": 2, "3.9": 2},
    ("dh_swiglu_kernel:tma", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("dh_swiglu_kernel:tma", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
    ("dh_swiglu_kernel:tma", 128, 64, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("dx_kernel:tma", 64, 128, 64, 8, 8, 4): {"3.6": 2, "3.9": 2},
    ("dx_kernel:tma", 64, 64, 64, 8, 4, 4): {"3.6": 3, "3.9": 3},
    ("dx_kernel:tma", 128, 256, 64, 8, 8, 3): {"3.6": 1, "3.9": 1},
    ("dx_kernel:tma", 128, 128, 64, 8, 8, 4): {"3.6": 1, "3.9": 1},
}
# configs without an entry (the full sweep's, float32 at BLOCK_M = 64, configs set by hand): the former flat cap
UNKNOWN_CTAS_PER_SM = 4


def cta_key(kernel: str, block_m: int, c) -> tuple:
    kw = c.kwargs
    return (kernel, block_m, kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP"], c.num_warps, c.num_stages)


def ctas_per_sm(kernel: str, meta: dict, mode: str = AUTOTUNE) -> int:
    """CTAs/SM of the row-tile config a launch runs, from what Triton hands the grid callable: the kernel's bound
    arguments, the config's kwargs among them, but not num_warps / num_stages (Triton 3.6 and 3.9 pass those to
    the compiler as options only, jit.py ``grid(bound_args)``). So the config is the one candidate of the
    ``BLOCK_M`` class whose kwargs ``meta`` holds (unique in the default set; tests/kernels/test_triton_compile.py
    asserts it); no such single candidate or no entry: ``UNKNOWN_CTAS_PER_SM``. A launch with ``USE_TMA`` reads
    the ``kernel:tma`` entries."""
    bm = meta.get("BLOCK_M")
    cands = GPU_CONFIGS[mode].get(kernel, {}).get(bm, []) + [_ROW_FALLBACKS.get(kernel, _ROW_FALLBACK)]
    match = [c for c in cands if all(meta.get(k) == v for k, v in c.kwargs.items())]
    name = kernel + (":tma" if meta.get("USE_TMA") else "")
    entry = CTAS_PER_SM.get(cta_key(name, bm, match[0])) if len(match) == 1 else None
    return min(entry.values()) if entry else UNKNOWN_CTAS_PER_SM


_INTERPRET_CONFIGS = {"row": [_row(16, 16, 1, 1, group=2)], "dw": [_dw(16, 16, 16, 1, 1, group=2)]}


def configs_for(kernel: str, mode: str = AUTOTUNE) -> list:
    """The autotune candidates of ``kernel``: the union over row-tile heights of the mode's set, plus the
    fallback (the prune narrows them per call); one small config in the interpreter."""
    if INTERPRET:
        return _INTERPRET_CONFIGS["dw" if kernel.startswith("dw_") else "row"]
    out = []
    for group in GPU_CONFIGS[mode][kernel].values():
        out += [c for c in group if c not in out]
    return out + [_DW_FALLBACK if kernel.startswith("dw_") else _ROW_FALLBACKS.get(kernel, _ROW_FALLBACK)]


_SMEM_BUDGET = 220 * 1024  # H100/H200: 227 KB per block, minus room for the epilogue's layout conversions


def _smem(c, bm: int, n_b_tiles: int, es: int) -> int:
    kw = c.kwargs
    if "BLOCK_A" in kw:
        return c.num_stages * es * kw["BLOCK_K"] * (kw["BLOCK_A"] + kw["BLOCK_B"])
    return c.num_stages * es * kw["BLOCK_K"] * (bm + n_b_tiles * kw["BLOCK_N"])


def prune_configs(configs, element_size: int, block_m=None, n_b_tiles: int = 1, kernel=None, mode=AUTOTUNE):
    """The configs the autotuner benchmarks for one call: the kernel's class for this row-tile height (when
    ``kernel`` is given and the candidates are the listed ones), that fit shared memory; float32 inputs run the
    small fallback only."""
    fallback = [c for c in configs if c in _ALL_FALLBACKS]
    if element_size >= 4 and fallback:
        return fallback
    cand = [c for c in configs if c not in fallback]
    if kernel is not None:
        cls = GPU_CONFIGS[mode][kernel].get(block_m if not kernel.startswith("dw_") else None, [])
        cand = [c for c in cand if c in cls] or cand
    fit = [c for c in cand if _smem(c, block_m or 128, n_b_tiles, element_size) <= _SMEM_BUDGET]
    return fit or fallback or configs[-1:]


def _pruner(kernel: str, n_b_tiles: int, a_arg: str):
    def prune(configs, named_args, **kwargs):
        a = named_args.get(a_arg)
        es = a.element_size() if hasattr(a, "element_size") else 2
        keep = prune_configs(configs, es, kwargs.get("BLOCK_M"), n_b_tiles, kernel)
        for c in keep:
            bn = c.kwargs.get("BLOCK_N")
            if bn is not None and bn % DWP_COLS:
                raise ValueError(f"autotune config BLOCK_N={bn} is not a multiple of DWP_COLS={DWP_COLS}")
        prune.compiles.append(len(keep))  # the autotuner prunes once per new key: these are compiled and run
        return keep

    prune.compiles = []
    return {"early_config_prune": prune}


# Autotune keys: the GEMM's static sizes, a power-of-two bucket of pairs per expert (never the raw token count),
# and every constexpr that changes the work (stores, masks), so a no-grad forward and training tune separately.
_ROW_KEY = ["N", "KDIM", "BLOCK_M", "ROWS_BUCKET"]
_DW_KEY = ["A_DIM", "B_DIM", "ROWS_BUCKET", "HAS_EXPERT_MASK"]
# Sizes that vary with the batch are not specialized (``do_not_specialize``): Triton specializes an integer argument
# on being 1 or a multiple of 16, so without this a new token count T (sequence packing, a variable batch) compiles
# new binaries. They are the schedule length ``num_tiles``, the pairs ``S``, the pairs-per-expert bucket (an autotune
# key only; a new bucket re-tunes but reuses the compiled binaries) and ``T``. None of them is the stride of a
# vectorized access (S strides dh's routing-weight partials, stored per pair anyway): the GEMMs compile to the same
# code (tests/kernels/test_triton_compile.py compiles them unspecialized; tests/kernels/test_triton_specialization.py).
ROW_DNS = ["num_tiles", "ROWS_BUCKET"]
DW_DNS = ["ROWS_BUCKET"]
