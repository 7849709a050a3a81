"""Test configuration: markers, and Triton's CPU interpreter for machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported, so it is set here at collection time, and only
when no CUDA device exists (on a GPU machine the kernels run for real).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    """The versions this run tested (CI's log shows them first)."""
    import importlib.metadata as md

    parts = []
    for dist in ("torch", "transformers", "kernels", "triton", "accelerate"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return "desmoe deps: " + ", ".join(parts)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # the CPU's flush-to-zero mode is process state that desmoe's entry points (and the benchmarks' module, at
    # import) turn on: every test starts without it, as a user's process does (hypothesis refuses to run with it)
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 shared cores: OpenMP spinning between 2 threads costs ~6x. Modules of tiny training runs
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
