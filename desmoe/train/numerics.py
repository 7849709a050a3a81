"""CPU floating-point mode for training: subnormal ("denormal") floats flushed to zero.

x86 CPUs handle a subnormal operand or result (|x| < 1.18e-38 in fp32/bf16) in microcode, tens to hundreds of
times slower than a normal one, and torch's CPU kernels do not avoid them. Measured on this project: the
same CPU FFT run's steps slowed up to 5x as training went on (0.68 s → 3.19 s per step, a 4-layer 16-expert model,
2048 tokens/step, one thread) and ran flat at 0.64 s with ``torch.set_flush_denormal(True)``.

Why flushing is safe for training: a subnormal is below 2^-126. Added to any normal-range term of a sum it is lost
anyway once that term exceeds 2^-102 (fp32 has 24 significant bits); as a probability (softmax, routing scores, KD's
teacher) it is 0 to every digit a loss or its gradient keeps; as an AdamW second moment v its square root is
< 1.1e-19, far below ``eps`` (1e-8), so the update ``m / (sqrt(v) + eps)`` is the same with v = 0, and as a first
moment m it moves a weight by less than lr·1e-30. fp64 has its own, far smaller subnormal range, likewise
irrelevant. bf16 shares fp32's exponent range. GPUs flush or handle subnormals at full speed; this only sets the
CPU's FTZ/DAZ mode (MXCSR) and is a no-op on CPUs without it.

The mode is per thread and inherited by threads created afterwards, so it is set before the first parallel op:
by ``desmoe`` CLI's ``main`` (every command: the process is desmoe's), and for the span of a run where desmoe is a
library inside someone else's process: :func:`desmoe.train.run` and ``DesMoETrainer.train`` (the Hugging Face
Trainer path) set it and restore the previous mode when they return (:func:`flushed_denormals`); the benchmarks'
shared module sets it for their processes.
"""
from __future__ import annotations

import contextlib

import torch


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on the CPU (True where the CPU supports it)."""
    return bool(torch.set_flush_denormal(True))


def denormals_flushed() -> bool:
    """Whether the CPU flushes subnormal floats now (read off an fp32 subnormal surviving a multiply)."""
    return bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0)


@contextlib.contextmanager
def flushed_denormals():
    """Subnormals flushed within the scope; the mode before it restored after."""
    before = denormals_flushed()
    flush_denormals()
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)
