"""What every Triton launcher of :mod:`desmoe.ops` shares: allocation (poisoned on request), device scope, the
experts kernels' row-tile grids and the deterministic combine.

Debugging aid: with ``DESMOE_POISON_OUTPUTS=1`` every buffer a launcher allocates is filled with NaN (ints with
-1) first, so an element a kernel forgets to write shows up in the tests.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton

from ..kernels import moe as _mk
from ..kernels import moe_configs as _mc

Tensor = torch.Tensor
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def poison() -> bool:
    return os.environ.get("DESMOE_POISON_OUTPUTS") == "1"


def empty(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison():
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


def on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


# --- the experts kernels' row-tile grids (shared by the standard and gpt-oss launchers) ----------------------

def block_m(S: int, E: int) -> int:
    if INTERPRET:
        return 16
    return 128 if S >= 256 * E else 64


def rows_bucket(S: int, E: int) -> int:
    # autotune key: pairs per expert rounded to a power of two (the raw token count stays out of the key)
    return min(pow2(S // max(E, 1)), 1 << 16)


def max_programs(device: torch.device, ctas_per_sm: int = _mc.UNKNOWN_CTAS_PER_SM) -> int:
    """Grid cap of the persistent row-tile kernels: one wave, SMs x the config's CTAs per SM (3 in the
    interpreter, so the tests exercise the work loop)."""
    if device.type != "cuda":
        return 3
    return ctas_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def row_grid(kernel, max_tiles, N, device):
    """The persistent row-tile grid of ``kernel`` (an autotuned row-tile kernel): one program per work item up to
    one wave, SMs x CTAs/SM of the config the autotuner picked (``moe_configs.CTAS_PER_SM``, looked up from the
    config's constexprs in ``meta``)."""
    name = kernel.fn.__name__

    def grid(meta):
        ctas = _mc.ctas_per_sm(name, meta) if device.type == "cuda" else _mc.UNKNOWN_CTAS_PER_SM
        return (max(1, min(max_tiles * triton.cdiv(N, meta["BLOCK_N"]), max_programs(device, ctas))),)

    return grid


# --- DESMOE_TMA=1: the row-tile GEMMs' weight operand through tensor descriptors (moe_configs.TMA) ---------------

def _tma_scratch(size: int, alignment: int, stream):
    """Triton's allocator for the device-side descriptors' global scratch (128 B per program and descriptor),
    from torch's caching allocator on the current device (the launchers run under ``on_device``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Install ``_tma_scratch`` as Triton's allocator unless one is set. Triton keeps it in a ContextVar, so a
    thread starts without one (autograd runs the backward in its own): every TMA launch calls this; idempotent."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # pragma: no cover - a Triton without the ContextVar: set it
        unset = True
    if unset:
        triton.set_allocator(_tma_scratch)


def use_tma(w: Tensor, strides=None) -> bool:
    """The ``USE_TMA`` constexpr of a row-tile GEMM whose weight operand is ``w`` (``strides``: its strides in
    the roles the kernel reads them, expert first, the contiguous one last; default ``w.stride()``): switch on
    (``DESMOE_TMA=1``), an sm_90+ GPU or the interpreter, and a weight a tensor descriptor can address (last
    stride 1, the other strides and the base 16-byte aligned); otherwise the pointer path. Installs the
    allocator the descriptors need."""
    if not _mc.TMA:
        return False
    st = tuple(w.stride()) if strides is None else tuple(strides)
    es = w.element_size()
    ok = st[-1] == 1 and all(s * es % 16 == 0 for s in st[:-1]) and w.data_ptr() % 16 == 0
    if w.is_cuda:
        ok = ok and torch.cuda.get_device_capability(w.device)[0] >= 9
        if ok:
            ensure_tma_allocator()
    else:
        ok = ok and INTERPRET
    return ok


def mask_u8(mask: Optional[Tensor], like: Tensor) -> Tensor:
    return mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else like


def combine(y_SD: Tensor, w_TK: Optional[Tensor], T: int, K: int) -> Tensor:
    """``out[t] = sum_k w[t, k] * y[t*K + k]`` (``w_TK`` None: unweighted) in a fixed order: deterministic."""
    D = y_SD.shape[1]
    out_TD = empty((T, D), y_SD.dtype, y_SD.device)
    BD = min(1024, pow2(D))
    with on_device(y_SD):
        _mk.combine_kernel[(T, triton.cdiv(D, BD))](y_SD, y_SD if w_TK is None else w_TK, out_TD, T, D, K,
                                                     HAS_W=w_TK is not None, BLOCK_D=BD)
    return out_TD
