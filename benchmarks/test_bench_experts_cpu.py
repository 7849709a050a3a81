"""pytest-benchmark entry: ``pytest benchmarks --benchmark-only`` times the same layer as bench_experts_cpu.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_experts_cpu as b  # noqa: E402


@pytest.mark.parametrize("impl", b.IMPLS)
def test_experts_fwd_bwd(benchmark, impl):
    E, K, D, I = b.SHAPES["tiny_cpu"]
    layer = b.make_layer(E, K, D, I)
    layer.config._experts_implementation = impl
    x, ids, w = b.inputs(128, E, K, D)
    x.requires_grad_()

    def step():
        layer(x, ids, w).sum().backward()

    benchmark(step)
    assert x.grad is not None and torch.isfinite(x.grad).all()
