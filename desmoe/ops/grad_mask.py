"""``mask_expert_grads_``: zero (or scale) the gradient rows of experts that must not move, all layers at once.

C++/CUDA op ``torch.ops.desmoe.mask_expert_grads_`` (``csrc/``); reference
:func:`desmoe.ops.reference.mask_expert_grads_reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference as _ref
from .extension import use_extension

_GRAD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fake(grads, masks, scale):
    return None


def mask_expert_grads_(grads: Sequence[torch.Tensor | None], masks: Sequence[torch.Tensor], scale: float = 0.0) -> None:
    """In place, all layers in one launch: rows ``e`` of ``grads[l]`` ([E, ...], any float dtype) whose
    ``masks[l][e]`` is False are multiplied by ``scale`` (``0.0`` writes exact zeros); rows whose mask is True
    are bitwise unchanged. ``None`` grads are skipped. ``masks[l]``: bool [E] (other dtypes are cast)."""
    if not isinstance(grads, (list, tuple)) or not isinstance(masks, (list, tuple)):
        raise TypeError("grads and masks: expected lists of tensors, got "
                        f"{type(grads).__name__}, {type(masks).__name__}")
    if len(grads) != len(masks):
        raise ValueError(f"masks: expected one mask per gradient ({len(grads)}), got {len(masks)}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    scale = float(scale)
    by_device: dict[torch.device, tuple[list, list]] = {}
    ref_g, ref_m = [], []
    for l, (g, m) in enumerate(zip(grads, masks)):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"grads[{l}]: expected a floating-point tensor, got "
                            f"{g.dtype if isinstance(g, torch.Tensor) else type(g).__name__}")
        if g.dim() < 1:
            raise ValueError(f"grads[{l}]: expected shape [E, ...], got a 0-d tensor")
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"masks[{l}]: expected a bool tensor [E], got {type(m).__name__}")
        if m.dim() != 1 or m.shape[0] != g.shape[0]:
            raise ValueError(f"masks[{l}]: expected shape [{g.shape[0]}] (grads[{l}].shape[0]), got {tuple(m.shape)}")
        m = m.to(device=g.device, dtype=torch.bool).contiguous()
        if g.is_contiguous() and g.dtype in _GRAD_DTYPES and use_extension(g.device):
            gs, ms = by_device.setdefault(g.device, ([], []))
            gs.append(g)
            ms.append(m)
        else:
            ref_g.append(g)
            ref_m.append(m)
    for gs, ms in by_device.values():
        torch.ops.desmoe.mask_expert_grads_(gs, ms, scale)
    if ref_g:
        _ref.mask_expert_grads_reference(ref_g, ref_m, scale)
