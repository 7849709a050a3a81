"""``affinity_ema_``: the EMA update of DES-MoE's domain-expert affinity matrix A, in place.

C++/CUDA op ``torch.ops.desmoe.affinity_ema_`` (``csrc/``); reference
:func:`desmoe.ops.reference.affinity_ema_reference`.
"""
from __future__ import annotations

import torch

from . import reference as _ref
from .extension import use_extension


def fake(A_LME, counts_LME, momentum):
    return None


def affinity_ema_(A_LME: torch.Tensor, counts_LME: torch.Tensor, momentum: float) -> torch.Tensor:
    """In place ``A = momentum * A + (1 - momentum) * counts / rowsum(counts)`` per (layer, domain) row (float64
    math); rows whose counts sum to zero keep their value. ``A_LME``: float [L, M, E]; ``counts_LME``: int
    [L, M, E] (e.g. from ``routing_stats``). Returns ``A_LME``."""
    def describe(x):
        return (x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__

    if not isinstance(A_LME, torch.Tensor) or not A_LME.is_floating_point() or A_LME.dim() != 3:
        raise TypeError(f"A_LME: expected a float tensor [L, M, E], got {describe(A_LME)}")
    if not isinstance(counts_LME, torch.Tensor) or counts_LME.shape != A_LME.shape:
        raise ValueError(f"counts_LME: expected a tensor of shape {tuple(A_LME.shape)} (A_LME), got "
                         f"{describe(counts_LME)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    counts_LME = counts_LME.to(A_LME.device)
    integer_counts = not counts_LME.is_floating_point() and counts_LME.dtype != torch.bool
    if (integer_counts and A_LME.is_contiguous() and A_LME.dtype in (torch.float32, torch.float64)
            and use_extension(A_LME.device)):
        torch.ops.desmoe.affinity_ema_(A_LME, counts_LME.long().contiguous(), momentum)
        return A_LME
    return _ref.affinity_ema_reference(A_LME, counts_LME, momentum)
