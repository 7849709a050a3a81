"""The one place that decides which implementation runs an op: the backend rule, the routing rule, and the rule
that picks the expert MLP's implementation (variant, dtypes, GEMM engine). The entry points in :mod:`desmoe.ops`
validate, ask here, and call what this names; the launchers they call only launch.

Backends (``backend=`` argument, else ``DESMOE_BACKEND``, else ``"auto"``):
    ``"triton"``     Triton kernels (``desmoe.kernels``) behind ``torch.library.custom_op``s; CUDA tensors.
    ``"grouped"``    PyTorch grouped GEMMs with a hand-written backward (``desmoe.ops.grouped``); any device.
    ``"reference"``  plain PyTorch (``desmoe.ops.reference``): runs anywhere, the readable test oracle.
    ``"auto"``       triton for CUDA tensors when Triton and the kernels import, else grouped. Routing has
                     two implementations: triton, and the reference (which every other backend uses).

Experts implementations (:func:`experts_impl`):
    ``"triton"``          ``desmoe.ops.triton_experts``: SiLU SwiGLU, standard layout, no biases
    ``"triton_gpt_oss"``  ``desmoe.ops.triton_gpt_oss``: gpt-oss's stored layout (biases or not)
    ``"grouped_mm"``      ``desmoe.ops.grouped.moe_experts_grouped_mm``: the Triton backend's coarse-shape engine
    ``"grouped"``         ``desmoe.ops.grouped.grouped_experts``: every variant, any device
    ``"reference"``       ``desmoe.ops.reference.moe_experts_reference``

The GEMM engine of the Triton backend (``"triton"`` or ``"grouped_mm"``): desmoe's fused grouped-GEMM kernels
(gather in the A loads, SwiGLU and routing-weight epilogues, pipelined dW), or ``torch._grouped_mm``
(cuBLAS/CUTLASS grouped GEMMs) for the four GEMMs with desmoe's routing metadata, gather/scatter, deterministic
combine and gradient masks around them. The rule (``auto``): grouped_mm for *coarse* shapes only, few experts with
many rows each (Mixtral-like: E <= 16 and >= 1024 pairs per expert), in bfloat16 on CUDA with 16-byte-aligned
rows; the Triton kernels everywhere else (fine-grained MoE: many small experts, where fused gathers and epilogues
matter most). The thresholds come from the sm_90 compile facts and a projection, not a measurement:
benchmarks/gpu_run.sh measures both engines on the Mixtral and Qwen3 shapes. ``DESMOE_EXPERTS_GEMM=triton|
grouped_mm`` (or ``engine=``) overrides the rule.
"""
from __future__ import annotations

import functools
import os

import torch

from . import _autocast
from .spec import RouterSpec

BACKENDS = ("auto", "triton", "grouped", "reference")
EXPERTS_IMPLS = ("triton", "triton_gpt_oss", "grouped_mm", "grouped", "reference")
GEMM_ENGINES = ("auto", "triton", "grouped_mm")
GROUPED_MM_MAX_EXPERTS = 16
GROUPED_MM_MIN_ROWS_PER_EXPERT = 1024
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton experts kernels compute in


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        from . import triton_experts, triton_gpt_oss, triton_routing  # noqa: F401
    except Exception:  # Triton missing, or kernels not built for this platform
        return False
    return True


@torch.compiler.assume_constant_result  # a fact about the process: torch.compile bakes it in, no tracing
def triton_available() -> bool:
    """Whether Triton and ``desmoe.kernels`` import (cached for the process)."""
    return _triton_importable()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend (``"triton"``, ``"grouped"`` or ``"reference"``) for tensors on ``device``."""
    name = backend if backend is not None else os.environ.get("DESMOE_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "grouped"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' requested but Triton or desmoe.kernels is not importable: install Triton "
                "(`pip install 'desmoe[triton]'`; CUDA builds of torch include it) or use backend='reference'"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU for testing, or use backend='reference'"
            )
    return name


# --- routing ----------------------------------------------------------------------------------------------------

def kernel_routes(spec: RouterSpec) -> bool:
    """Whether the Triton routing kernel carries every option of ``spec`` (else routing runs on the reference).

    The kernel reads the weights from the unmasked scores and renormalises by ``sum + eps``: a spec whose
    weights come from the masked scores *and* that can pick masked experts (K > eligible), or whose sum is
    floored (``renorm_min``), runs on the reference.
    """
    return not (spec.weights_from_masked and spec.top_k > spec.num_eligible) and not spec.renorm_min


def routing_impl(spec: RouterSpec, backend: str | None, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for a routing call (the backend is resolved only for a spec the kernel
    carries)."""
    return "triton" if kernel_routes(spec) and resolve_backend(backend, device) == "triton" else "reference"


# --- experts ----------------------------------------------------------------------------------------------------

def triton_experts_supported(activation: str = "silu", *, has_bias: bool = False, transposed: bool = False,
                             interleaved: bool = False) -> bool:
    """Whether the Triton experts kernels carry this variant: SiLU SwiGLU in the standard layout without biases
    (``desmoe.kernels.moe``), and gpt-oss's stored layout (``transposed`` and ``interleaved``, biases or not) with
    its clamped SwiGLU or SiLU SwiGLU (``desmoe.kernels.moe_gpt_oss``). Everything else (other activations, a
    layout only half transposed/interleaved, biases on the standard layout) runs on the grouped engine
    (``desmoe.ops.grouped``: ``torch._grouped_mm`` on CUDA) when the Triton backend is asked."""
    if transposed and interleaved:
        return activation in ("silu", "clamped_swiglu")
    return activation == "silu" and not has_bias and not transposed and not interleaved


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


def experts_impl(x_TD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                 backend: str | None, activation: str, has_bias: bool, transposed: bool, interleaved: bool) -> str:
    """Which of :data:`EXPERTS_IMPLS` runs this (validated) experts call.

    On the Triton backend, a variant its kernels carry runs on them when x and the weights compute in one of
    :data:`KERNEL_DTYPES` (the autocast region's dtype where one is active) and :func:`experts_gemm_engine` says
    ``"triton"``; the ``grouped_mm`` engine takes coarse standard-layout shapes (empty inputs: the reference).
    Otherwise the standard layout falls back to the reference and gpt-oss's layout to the grouped op. Every other
    backend names itself, except the reference under ``torch.compile``, which runs the grouped op (the reference
    loop syncs with the host and branches on data; the grouped op is one opaque custom op with a fake
    implementation, tested against the reference).
    """
    name = resolve_backend(backend, x_TD.device)
    if name == "triton" and triton_experts_supported(activation, has_bias=has_bias, transposed=transposed,
                                                     interleaved=interleaved):
        dt, dt_gu, dt_dn = (_autocast.compute_dtype(t) for t in (x_TD, w_gate_up, w_down))
        if dt not in KERNEL_DTYPES or dt_gu != dt or dt_dn != dt:
            return "grouped" if transposed else "reference"
        T, D = x_TD.shape
        E = w_gate_up.shape[0]
        I2 = w_gate_up.shape[2] if transposed else w_gate_up.shape[1]
        engine = experts_gemm_engine(T, E, topk_ids_TK.shape[1], D, I2 // 2, x_TD.device, dt)
        if engine == "grouped_mm":
            if transposed:
                return "grouped"
            return "grouped_mm" if T else "reference"
        return "triton_gpt_oss" if transposed else "triton"
    if x_TD.dtype != w_gate_up.dtype and not torch.is_autocast_enabled(x_TD.device.type):
        # the reference's matmuls would fail with a message naming neither argument (autocast casts them itself)
        raise TypeError(f"x_TD ({x_TD.dtype}) and the expert weights ({w_gate_up.dtype}) differ in dtype; cast "
                        f"one of them, or run under torch.autocast")
    if name != "reference" or torch.compiler.is_compiling():
        return "grouped"
    return "reference"
