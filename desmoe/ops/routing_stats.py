"""``routing_stats``: per (layer, domain, expert) selection counts and routing mass, and per-expert load.

C++/CUDA op ``torch.ops.desmoe.routing_stats`` (``csrc/``); reference
:func:`desmoe.ops.reference.routing_stats_reference`.
"""
from __future__ import annotations

import torch

from . import reference as _ref
from .extension import use_extension
from ._index_checks import as_index_tensor, check_range, validating


def fake(topk_ids_LTK, token_domains_T, num_domains, num_experts, topk_weights_LTK, valid_T):
    L = topk_ids_LTK.shape[0]
    return (
        topk_ids_LTK.new_empty((L, num_domains, num_experts), dtype=torch.int64),
        topk_ids_LTK.new_empty((L, num_domains, num_experts), dtype=torch.float32),
        topk_ids_LTK.new_empty((L, num_experts), dtype=torch.int64),
    )


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
    ids_LTK = as_index_tensor(topk_ids_LTK, "topk_ids_LTK", 3, "[L, T, K]")
    dom_T = as_index_tensor(token_domains_T, "token_domains_T", 1, "[T]")
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
    if validating(validate):
        check_range(ids_LTK, "topk_ids_LTK", 0, num_experts, "expert id")
        check_range(dom_T, "token_domains_T", None, num_domains, "domain id")
    if use_extension(ids_LTK.device):
        return tuple(torch.ops.desmoe.routing_stats(ids_LTK, dom_T, num_domains, num_experts, w_LTK, valid_T))
    return _ref.routing_stats_reference(ids_LTK, dom_T, num_domains, num_experts, w_LTK, valid_T)
