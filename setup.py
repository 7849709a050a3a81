"""Build script: the package, plus the C++/CUDA extension ``desmoe.ops._C`` when torch is importable.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch (inside pip's
isolated build env torch is absent, or pip would pull a multi-GB CUDA build). Without torch at build time the
package still installs; its loader (``desmoe.ops.extension``) then JIT-builds the extension on first use, or falls
back to the PyTorch reference with one warning.

``kernels/`` is installed as the subpackage ``desmoe.kernels`` — never as a top-level ``kernels`` package, a
name that belongs to Hugging Face's kernel hub and that transformers imports when present.
"""
import glob
import os
import re
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    pkgs = [p for p in find_packages(where=HERE, include=["desmoe", "desmoe.*"])]
    pkgs.append("desmoe.kernels")
    return pkgs


# Architectures compiled when no GPU is visible to detect one (CI, CPU build machines): Ampere, Hopper, and
# PTX for newer cards. Override with TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cuda_toolkit_matches(torch, cuda_home) -> bool:
    """nvcc's major version must equal torch's CUDA major (torch refuses to build otherwise); on a mismatch
    the extension is built CPU-only instead of failing the install."""
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
        nvcc_major = int(re.search(r"release (\d+)\.", out).group(1))
    except Exception:
        return False
    ok = nvcc_major == int(torch.version.cuda.split(".")[0])
    if not ok:
        print(f"desmoe: nvcc {nvcc_major}.x does not match torch's CUDA {torch.version.cuda}: "
              "building the extension without its CUDA kernels")
    return ok


def _ext_modules_and_cmdclass():
    if os.environ.get("DESMOE_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # torch not importable in this build env: JIT build at first use instead
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("DESMOE_NO_CUDA_EXT") != "1"
        and _cuda_toolkit_matches(torch, cpp_extension.CUDA_HOME)
    )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS  # torch's auto-detection needs a visible GPU
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 up to torch 2.11,
    # C++20 from 2.12); forcing an older one breaks the newer headers.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    define_macros = []
    if with_cuda:
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        define_macros.append(("DESMOE_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "desmoe.ops._C", cpp + cu, extra_compile_args=extra, define_macros=define_macros,
            extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, "csrc")],
        )
    else:
        ext = cpp_extension.CppExtension(
            "desmoe.ops._C", cpp, extra_compile_args=extra, define_macros=define_macros,
            extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, "csrc")],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    packages=_packages(),
    package_dir={"desmoe": "desmoe", "desmoe.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
