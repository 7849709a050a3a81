"""Loader of the C++/CUDA extension ``desmoe.ops._C`` (the ops ``torch.ops.desmoe.*``), shared by the op modules.

Loading order, decided once per process on first use: the prebuilt ``desmoe.ops._C`` (``pip install
--no-build-isolation -e .``), else a JIT build of ``csrc/`` with ninja into ``$DESMOE_EXT_CACHE`` (default
``~/.cache/desmoe``) under ``ext/<torch>-<python>-<cpu|cuda>/`` (CPU sources only when torch has no CUDA), else
the plain-PyTorch reference (``desmoe.ops.reference``) with one warning. ``DESMOE_NO_EXT=1`` forces the
reference, ``DESMOE_NO_PREBUILT=1`` skips the prebuilt module (tests of the JIT path), ``DESMOE_NO_JIT=1`` skips
the JIT build. A CUDA tensor given to an extension built without CUDA also takes the reference path.

Each op's Python side (validation, fake implementation, dispatch) lives in its own module:
:mod:`.grad_mask`, :mod:`.pair_mask`, :mod:`.routing_stats`, :mod:`.affinity`.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import warnings

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CSRC = os.path.join(_ROOT, "csrc")


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
            errors.append(f"prebuilt desmoe.ops._C: {type(e).__name__}: {e}")
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
    """Shape-only implementations (each beside its op) so the ops trace under torch.compile / FakeTensor."""
    import importlib

    # by module path: ``desmoe.ops.pair_mask`` / ``.routing_stats`` as attributes are the functions, not modules
    for mod, name in (("grad_mask", "mask_expert_grads_"), ("pair_mask", "pair_mask"),
                      ("routing_stats", "routing_stats"), ("affinity", "affinity_ema_")):
        torch.library.register_fake(f"desmoe::{name}")(importlib.import_module(f"{__package__}.{mod}").fake)


def available() -> bool:
    """True when the compiled ops (prebuilt or JIT) are in use, False on the reference fallback."""
    return _load()[0]["available"]


def info() -> dict:
    """``{"available", "source": "prebuilt"|"jit"|"reference", "cuda", "cuda_arch_list", "compiler",
    "openmp", "error"?}`` (``error`` says why the extension is not in use)."""
    return dict(_load()[0])


def use_extension(device: torch.device) -> bool:
    """Whether the compiled op runs for tensors on ``device`` (loads the extension on first call)."""
    info_, module = _load()
    if module is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and info_["cuda"])
