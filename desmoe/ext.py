"""Compatibility name for the C++/CUDA extension ops; their home is :mod:`desmoe.ops` (one module per op:
:mod:`desmoe.ops.grad_mask`, :mod:`desmoe.ops.pair_mask`, :mod:`desmoe.ops.routing_stats`,
:mod:`desmoe.ops.affinity`; loader :mod:`desmoe.ops.extension`)."""
from .ops.affinity import affinity_ema_
from .ops.extension import _LOADED, _reset_for_tests, available, info  # noqa: F401
from .ops.grad_mask import mask_expert_grads_
from .ops.pair_mask import pair_mask
from .ops.routing_stats import routing_stats

__all__ = ["available", "info", "mask_expert_grads_", "pair_mask", "routing_stats", "affinity_ema_"]
