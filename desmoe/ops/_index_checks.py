"""Input checks shared by the extension ops (index tensors, value ranges)."""
from __future__ import annotations

import torch

def validating(validate: bool) -> bool:
    return validate and not torch.compiler.is_compiling()


def as_index_tensor(x, name: str, dims: int, shape_doc: str) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(t, torch.Tensor) for t in x):
            raise TypeError(f"{name}: expected a tensor {shape_doc} or a non-empty list of tensors, got {x!r:.80}")
        x = torch.stack(list(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {shape_doc}, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        x = x.long() if (not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool) else x
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected an integer tensor, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected shape {shape_doc}, got {tuple(x.shape)}")
    return x.contiguous()


def check_range(x: torch.Tensor, name: str, lo: int | None, hi: int, what: str) -> None:
    """Raise ValueError if any element of x is < lo (when lo is given) or >= hi; one host sync."""
    if x.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.aminmax(x.long()))
    expected = f"[{lo}, {hi})" if lo is not None else f"< {hi}"
    if lo is not None and mn < lo:
        raise ValueError(f"{name}: {what} {mn} is out of range (expected {expected})")
    if mx >= hi:
        raise ValueError(f"{name}: {what} {mx} is out of range (expected {expected})")
