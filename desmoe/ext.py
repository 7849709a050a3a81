"""The C++/CUDA extension ``desmoe._C``: loader, Python API and PyTorch-reference fallback.

Ops (also ``torch.ops.desmoe.*`` once loaded; CPU and CUDA kernels, fake impls for ``torch.compile``):

    mask_expert_grads_(grads, masks, scale=0.0)       zero/scale frozen experts' gradient rows, all layers at once
    pair_mask(token_domains_T, topk_ids_LTK, mask)    DES-MoE per-(token, k) trainable mask for every layer
    routing_stats(topk_ids_LTK, token_domains_T, M, E, ...)   counts / mass per (layer, domain, expert), load
    affinity_ema_(A_LME, counts_LME, momentum)        EMA update of the domain-expert affinity matrix

Loading order, decided once per process on first use: the prebuilt ``desmoe._C`` (``pip install
--no-build-isolation -e .``), else a JIT build of ``csrc/`` with ninja into ``$DESMOE_EXT_CACHE`` (default
``~/.cache/desmoe``) under ``ext/<torch>-<python>-<cpu|cuda>/`` (CPU sources only when torch has no CUDA), else
the plain-PyTorch reference (``desmoe.ops.reference``) with one warning. ``DESMOE_NO_EXT=1`` forces the
reference, ``DESMOE_NO_PREBUILT=1`` skips the prebuilt module (tests of the JIT path), ``DESMOE_NO_JIT=1`` skips
the JIT build. A CUDA tensor given to an extension built without CUDA also takes the reference path.

Range checks (ids in [0, E), domains < M) raise ``ValueError``; on CUDA they cost one host sync, so the hot
path may pass ``validate=False`` (the CUDA kernels then skip out-of-range entries instead of faulting). They
are skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import warnings
from typing import Sequence

import torch

from .ops import reference as _ref

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")
_GRAD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- loading


def _ops_registered() -> bool:
    return hasattr(torch.ops, "desmoe") and hasattr(torch.ops.desmoe, "pair_mask")


def _nvcc_major(cuda_home: str) -> int | None:
    """Major version of the toolkit's nvcc; torch refuses to build against another major than its own."""
    import re
    import subprocess

    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
        return int(re.search(r"release (\d+)\.", out).group(1))
    except Exception:
        return None


def _jit_build():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources in {_CSRC} (installed without the source tree)")
    cu = sorted(glob.glob(os.path.join(_CSRC, "*.cu")))
    with_cuda = (bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and _nvcc_major(cpp_extension.CUDA_HOME) == int(torch.version.cuda.split(".")[0]))
    set_archs = with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if with_cuda else 'cpu'}"
    build_dir = os.path.join(os.environ.get("DESMOE_EXT_CACHE") or os.path.expanduser("~/.cache/desmoe"), "ext", tag)
    os.makedirs(build_dir, exist_ok=True)
    defines = ["-DDESMOE_WITH_CUDA=1"] if with_cuda else []
    if set_archs:  # torch's arch auto-detection needs a visible GPU: Ampere, Hopper, PTX for newer cards
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    try:
        return cpp_extension.load(
            name="desmoe_C",
            sources=sources + (cu if with_cuda else []),
            extra_cflags=["-O3", "-fopenmp"] + defines,
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"] + defines,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[_CSRC],
            build_directory=build_dir,
            with_cuda=with_cuda,
            verbose=False,
        )
    finally:
        if set_archs:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


# The one load result of this process, (info, module or None). A plain list rather than functools.lru_cache so
# torch.compile reads it (guarding on it) instead of tracing into the loader. Load before compiling (any call
# of this module does), the loader itself is not traceable.
_LOADED: list = []


def _load() -> tuple[dict, object]:
    """Load the extension once per process; returns ``(info, module or None)``."""
    if _LOADED:
        return _LOADED[0]
    _LOADED.append(_load_uncached())
    return _LOADED[0]


def _reset_for_tests() -> None:
    """Forget the load result so the next call re-decides (tests of DESMOE_NO_EXT); ops stay registered."""
    _LOADED.clear()


@torch.compiler.disable
def _load_uncached() -> tuple[dict, object]:
    info = {"available": False, "source": "reference", "cuda": False, "cuda_arch_list": "",
            "compiler": None, "openmp": False}
    errors = []
    module = None
    if os.environ.get("DESMOE_NO_EXT") == "1":
        errors.append("disabled by DESMOE_NO_EXT=1")
    else:
        try:
            if os.environ.get("DESMOE_NO_PREBUILT") == "1":
                raise ImportError("skipped by DESMOE_NO_PREBUILT=1")
            from . import _C as module  # type: ignore[attr-defined]

            info["source"] = "prebuilt"
        except Exception as e:  # missing, or built against another torch
            errors.append(f"prebuilt desmoe._C: {type(e).__name__}: {e}")
            module = None
        if module is None and os.environ.get("DESMOE_NO_JIT") != "1":
            try:
                module = _jit_build()
                info["source"] = "jit"
            except Exception as e:
                errors.append(f"JIT build: {type(e).__name__}: {str(e)[-2000:]}")
                module = None
        elif module is None:
            errors.append("JIT build disabled by DESMOE_NO_JIT=1")
    if module is not None and not _ops_registered():
        errors.append("the extension loaded but registered no torch.ops.desmoe ops")
        module = None
        info["source"] = "reference"
    if module is not None:
        info.update(available=True, cuda=bool(module.cuda), cuda_arch_list=str(module.cuda_arch_list),
                    compiler=str(module.compiler), openmp=bool(module.openmp))
        _register_fakes()
    else:
        info["error"] = "; ".join(errors)
        warnings.warn(
            "desmoe: the C++/CUDA extension is unavailable, using the PyTorch reference ops "
            f"({info['error']}). Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return info, module


@functools.lru_cache(maxsize=None)  # once per process: a second registration is an error
def _register_fakes() -> None:
    """Shape-only implementations so the ops trace under torch.compile / FakeTensor."""

    @torch.library.register_fake("desmoe::mask_expert_grads_")
    def _(grads, masks, scale):
        return None

    @torch.library.register_fake("desmoe::pair_mask")
    def _(token_domains_T, topk_ids_LTK, domain_expert_mask_LME):
        return topk_ids_LTK.new_empty(topk_ids_LTK.shape, dtype=torch.bool)

    @torch.library.register_fake("desmoe::routing_stats")
    def _(topk_ids_LTK, token_domains_T, num_domains, num_experts, topk_weights_LTK, valid_T):
        L = topk_ids_LTK.shape[0]
        return (
            topk_ids_LTK.new_empty((L, num_domains, num_experts), dtype=torch.int64),
            topk_ids_LTK.new_empty((L, num_domains, num_experts), dtype=torch.float32),
            topk_ids_LTK.new_empty((L, num_experts), dtype=torch.int64),
        )

    @torch.library.register_fake("desmoe::affinity_ema_")
    def _(A_LME, counts_LME, momentum):
        return None


def available() -> bool:
    """True when the compiled ops (prebuilt or JIT) are in use, False on the reference fallback."""
    return _load()[0]["available"]


def info() -> dict:
    """``{"available", "source": "prebuilt"|"jit"|"reference", "cuda", "cuda_arch_list", "compiler",
    "openmp", "error"?}`` (``error`` says why the extension is not in use)."""
    return dict(_load()[0])


def _use_ext(device: torch.device) -> bool:
    info_, module = _load()
    if module is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and info_["cuda"])


# ------------------------------------------------------------------------------------------ validation


def _validating(validate: bool) -> bool:
    return validate and not torch.compiler.is_compiling()


def _as_index_tensor(x, name: str, dims: int, shape_doc: str) -> torch.Tensor:
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


def _check_range(x: torch.Tensor, name: str, lo: int | None, hi: int, what: str) -> None:
    """Raise ValueError if any element of x is < lo (when lo is given) or >= hi; one host sync."""
    if x.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.aminmax(x.long()))
    expected = f"[{lo}, {hi})" if lo is not None else f"< {hi}"
    if lo is not None and mn < lo:
        raise ValueError(f"{name}: {what} {mn} is out of range (expected {expected})")
    if mx >= hi:
        raise ValueError(f"{name}: {what} {mx} is out of range (expected {expected})")


# ----------------------------------------------------------------------------------------------- ops


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
        if g.is_contiguous() and g.dtype in _GRAD_DTYPES and _use_ext(g.device):
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


def pair_mask(token_domains_T, topk_ids_LTK, domain_expert_mask_LME, *, validate: bool = True) -> torch.Tensor:
    """DES-MoE per-token masking for every layer in one launch: bool [L, T, K] with
    ``pair[l, t, k] = mask[l, dom[t], ids[l, t, k]]``, False for tokens with ``dom < 0`` (padding).

    Args:
        token_domains_T: int [T] domain id per token (< 0: padding / unlabelled).
        topk_ids_LTK: int [L, T, K], or a list of L [T, K].
        domain_expert_mask_LME: bool [L, M, E], or [M, E] shared by all layers.
        validate: raise ValueError on out-of-range ids/domains (one host sync on CUDA).
    """
    ids_LTK = _as_index_tensor(topk_ids_LTK, "topk_ids_LTK", 3, "[L, T, K]")
    dom_T = _as_index_tensor(token_domains_T, "token_domains_T", 1, "[T]")
    mask = domain_expert_mask_LME
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"domain_expert_mask_LME: expected a bool tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != ids_LTK.shape[0]):
        raise ValueError(f"domain_expert_mask_LME: expected shape [M, E] or [L={ids_LTK.shape[0]}, M, E], "
                         f"got {tuple(mask.shape)}")
    if ids_LTK.shape[1] != dom_T.shape[0]:
        raise ValueError(f"topk_ids_LTK: expected T = {dom_T.shape[0]} tokens (token_domains_T), "
                         f"got shape {tuple(ids_LTK.shape)}")
    if ids_LTK.device != dom_T.device or mask.device != ids_LTK.device:
        raise ValueError(f"pair_mask: inputs must share one device, got token_domains_T on {dom_T.device}, "
                         f"topk_ids_LTK on {ids_LTK.device}, domain_expert_mask_LME on {mask.device}")
    mask = mask.bool().contiguous()
    M, E = mask.shape[-2], mask.shape[-1]
    if _validating(validate):
        _check_range(ids_LTK, "topk_ids_LTK", 0, E, "expert id")
        _check_range(dom_T, "token_domains_T", None, M, "domain id")
    if _use_ext(ids_LTK.device):
        return torch.ops.desmoe.pair_mask(dom_T, ids_LTK, mask)
    return _ref.pair_mask_layers_reference(dom_T, ids_LTK, mask)


def routing_stats(
    topk_ids_LTK,
    token_domains_T,
    num_domains: int,
    num_experts: int,
    *,
    topk_weights_LTK=None,
    valid_T: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing statistics for every layer in one launch, no host sync (unless ``validate`` on CUDA).

    Args:
        topk_ids_LTK: int [L, T, K] (or a list of L [T, K]); token_domains_T: int [T] (< 0: unlabelled).
        num_domains, num_experts: M and E.
        topk_weights_LTK: float [L, T, K] (or list) routing weights, optional; valid_T: bool [T], optional.

    Returns:
        ``counts_LME`` int64: (token, k) selections per (layer, domain, expert) over valid tokens with dom >= 0;
        ``mass_LME`` float32: the same summing routing weights (zeros without weights), accumulated in 32.32
        fixed point (deterministic; CPU and CUDA agree bitwise); ``load_LE`` int64: selections per expert over
        valid tokens. All three are all-reducible (sum) across ranks.
    """
    ids_LTK = _as_index_tensor(topk_ids_LTK, "topk_ids_LTK", 3, "[L, T, K]")
    dom_T = _as_index_tensor(token_domains_T, "token_domains_T", 1, "[T]")
    for name, v in (("num_domains", num_domains), ("num_experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    L, T, K = ids_LTK.shape
    if dom_T.shape[0] != T:
        raise ValueError(f"token_domains_T: expected shape [{T}] (topk_ids_LTK's T), got {tuple(dom_T.shape)}")
    w_LTK = topk_weights_LTK
    if w_LTK is not None:
        if isinstance(w_LTK, (list, tuple)):
            w_LTK = torch.stack(list(w_LTK))
        if not isinstance(w_LTK, torch.Tensor) or not w_LTK.is_floating_point():
            raise TypeError(f"topk_weights_LTK: expected a float tensor [L, T, K], got "
                            f"{w_LTK.dtype if isinstance(w_LTK, torch.Tensor) else type(w_LTK).__name__}")
        if w_LTK.shape != ids_LTK.shape:
            raise ValueError(f"topk_weights_LTK: expected shape {tuple(ids_LTK.shape)}, got {tuple(w_LTK.shape)}")
        w_LTK = w_LTK.detach().to(device=ids_LTK.device, dtype=torch.float32).contiguous()
    if valid_T is not None:
        if not isinstance(valid_T, torch.Tensor) or valid_T.shape != (T,):
            raise ValueError(f"valid_T: expected a bool tensor of shape [{T}], got "
                             f"{tuple(valid_T.shape) if isinstance(valid_T, torch.Tensor) else type(valid_T).__name__}")
        valid_T = valid_T.to(device=ids_LTK.device, dtype=torch.bool).contiguous()
    dom_T = dom_T.to(ids_LTK.device)
    if _validating(validate):
        _check_range(ids_LTK, "topk_ids_LTK", 0, num_experts, "expert id")
        _check_range(dom_T, "token_domains_T", None, num_domains, "domain id")
    if _use_ext(ids_LTK.device):
        return tuple(torch.ops.desmoe.routing_stats(ids_LTK, dom_T, num_domains, num_experts, w_LTK, valid_T))
    return _ref.routing_stats_reference(ids_LTK, dom_T, num_domains, num_experts, w_LTK, valid_T)


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
            and _use_ext(A_LME.device)):
        torch.ops.desmoe.affinity_ema_(A_LME, counts_LME.long().contiguous(), momentum)
        return A_LME
    return _ref.affinity_ema_reference(A_LME, counts_LME, momentum)


__all__ = ["available", "info", "mask_expert_grads_", "pair_mask", "routing_stats", "affinity_ema_"]
