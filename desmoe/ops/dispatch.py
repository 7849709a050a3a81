"""The one rule that picks the GEMM engine of the expert MLP on the Triton backend.

``"triton"``: desmoe's fused grouped-GEMM kernels (gather in the A loads, SwiGLU and routing-weight epilogues,
pipelined dW). ``"grouped_mm"``: ``torch._grouped_mm`` (cuBLAS/CUTLASS grouped GEMMs) for the four GEMMs, with
desmoe's routing metadata, gather/scatter, deterministic combine and gradient masks around them.

The rule (``auto``): grouped_mm for *coarse* shapes only, few experts with many rows each (Mixtral-like: E <= 16
and >= 1024 pairs per expert), in bfloat16 on CUDA with 16-byte-aligned rows; the Triton kernels everywhere else
(fine-grained MoE: many small experts, where fused gathers and epilogues matter most). The thresholds come from
the sm_90 compile facts and a projection, not a measurement: benchmarks/gpu_run.sh measures both engines on the
Mixtral and Qwen3 shapes. ``DESMOE_EXPERTS_GEMM=triton|grouped_mm`` (or ``engine=``) overrides the rule.
"""
from __future__ import annotations

import os

import torch

GEMM_ENGINES = ("auto", "triton", "grouped_mm")
GROUPED_MM_MAX_EXPERTS = 16
GROUPED_MM_MIN_ROWS_PER_EXPERT = 1024


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def experts_gemm_engine(num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int,
                        device: torch.device, dtype: torch.dtype, engine: str | None = None) -> str:
    """``"triton"`` or ``"grouped_mm"`` for an expert MLP of this shape (host-side sizes only: no sync)."""
    name = engine if engine is not None else os.environ.get("DESMOE_EXPERTS_GEMM", "auto")
    if name not in GEMM_ENGINES:
        raise ValueError(f"DESMOE_EXPERTS_GEMM / engine must be one of {GEMM_ENGINES}, got {name!r}")
    if name == "grouped_mm" and not grouped_mm_available():
        raise RuntimeError(f"engine 'grouped_mm' needs torch._grouped_mm (torch {torch.__version__} lacks it)")
    if name != "auto":
        return name
    if device.type != "cuda" or dtype != torch.bfloat16 or not grouped_mm_available():
        return "triton"
    if hidden % 8 or intermediate % 8:  # grouped_mm needs 16-byte-aligned rows
        return "triton"
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if num_experts <= GROUPED_MM_MAX_EXPERTS and rows_per_expert >= GROUPED_MM_MIN_ROWS_PER_EXPERT:
        return "grouped_mm"
    return "triton"
