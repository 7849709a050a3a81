"""Triton kernels of desmoe, installed as ``desmoe.kernels`` (never as a top-level ``kernels`` package).

- :mod:`desmoe.kernels.routing`: fused top-k routing forward/backward.
- :mod:`desmoe.kernels.permute`: O(S) routing metadata (histogram -> scan -> stable scatter, tile schedule).
- :mod:`desmoe.kernels.moe`: grouped-GEMM SwiGLU expert MLP forward/backward with DES-MoE gradient masks.

Launchers, validation of what the kernels assume, and the ``torch.library`` custom ops live in
:mod:`desmoe.ops.triton_ops`.
"""
