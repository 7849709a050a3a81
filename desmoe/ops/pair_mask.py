"""``pair_mask``: DES-MoE's per-(token, k) trainable mask for every layer, ``mask[l, domain[t], ids[l, t, k]]``.

C++/CUDA op ``torch.ops.desmoe.pair_mask`` (``csrc/``); reference
:func:`desmoe.ops.reference.pair_mask_layers_reference`.
"""
from __future__ import annotations

import torch

from . import reference as _ref
from .extension import use_extension
from ._index_checks import as_index_tensor, check_range, validating


def fake(token_domains_T, topk_ids_LTK, domain_expert_mask_LME):
    return topk_ids_LTK.new_empty(topk_ids_LTK.shape, dtype=torch.bool)


def pair_mask(token_domains_T, topk_ids_LTK, domain_expert_mask_LME, *, validate: bool = True) -> torch.Tensor:
    """DES-MoE per-token masking for every layer in one launch: bool [L, T, K] with
    ``pair[l, t, k] = mask[l, dom[t], ids[l, t, k]]``, False for tokens with ``dom < 0`` (padding).

    Args:
        token_domains_T: int [T] domain id per token (< 0: padding / unlabelled).
        topk_ids_LTK: int [L, T, K], or a list of L [T, K].
        domain_expert_mask_LME: bool [L, M, E], or [M, E] shared by all layers.
        validate: raise ValueError on out-of-range ids/domains (one host sync on CUDA).
    """
    ids_LTK = as_index_tensor(topk_ids_LTK, "topk_ids_LTK", 3, "[L, T, K]")
    dom_T = as_index_tensor(token_domains_T, "token_domains_T", 1, "[T]")
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
    if validating(validate):
        check_range(ids_LTK, "topk_ids_LTK", 0, E, "expert id")
        check_range(dom_T, "token_domains_T", None, M, "domain id")
    if use_extension(ids_LTK.device):
        return torch.ops.desmoe.pair_mask(dom_T, ids_LTK, mask)
    return _ref.pair_mask_layers_reference(dom_T, ids_LTK, mask)
