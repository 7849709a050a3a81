"""Routing statistics and gradient masks: ``desmoe.ext`` when importable, else the plain-PyTorch versions here.

The four functions mirror ``desmoe.ext``'s API exactly (same names, shapes, semantics), so the method layer
calls :func:`get` and never cares which one it got. The local versions are also the test oracle.
"""
from __future__ import annotations

import torch


def mask_expert_grads_(grads: list[torch.Tensor], masks: list[torch.Tensor], scale: float = 0.0) -> None:
    """In place: ``grads[i][e] *= scale`` for every expert ``e`` with ``masks[i][e] == False``."""
    for g, m in zip(grads, masks):
        if g is None:
            continue
        off_E = ~m.to(device=g.device, dtype=torch.bool)
        if off_E.any():
            g[off_E] *= scale


def pair_mask(token_domains_T: torch.Tensor, topk_ids_LTK: torch.Tensor, domain_expert_mask_LME: torch.Tensor) -> torch.Tensor:
    """bool ``[L, T, K]``: ``mask_LME[l, domain[t], ids[l, t, k]]``; negative domains train nothing."""
    valid_T = token_domains_T >= 0
    d_T = token_domains_T.long().clamp(min=0)
    rows_LTE = domain_expert_mask_LME.bool()[:, d_T]  # [L, T, E]
    return rows_LTE.gather(2, topk_ids_LTK.long()) & valid_T.view(1, -1, 1)


def routing_stats(topk_ids_LTK, token_domains_T, num_domains, num_experts, *, topk_weights_LTK=None, valid_T=None):
    """``(counts_LME int64, mass_LME float32, load_LE int64)`` of one batch's routing.

    counts: top-k selections of domain ``m``'s tokens by expert ``e``; mass: the same weighted by the routing
    weights (zeros when ``topk_weights_LTK`` is None); load: selections per expert over all valid tokens.
    Tokens with a negative domain are left out of counts/mass; ``valid_T`` (bool) removes tokens everywhere.
    """
    L, T, K = topk_ids_LTK.shape
    dev = topk_ids_LTK.device
    ok_T = torch.ones(T, dtype=torch.bool, device=dev) if valid_T is None else valid_T.bool()
    ids_LTK = topk_ids_LTK.long()
    load_LE = torch.zeros(L, num_experts, dtype=torch.int64, device=dev)
    load_LE.scatter_add_(1, ids_LTK.reshape(L, -1), ok_T.view(1, T, 1).expand(L, T, K).reshape(L, -1).long())
    dom_T = token_domains_T.long()
    has_T = ok_T & (dom_T >= 0)
    flat_LS = dom_T.clamp(min=0).view(1, T, 1) * num_experts + ids_LTK  # [L, T, K] indices into M*E
    w_LTK = has_T.view(1, T, 1).expand(L, T, K)
    counts = torch.zeros(L, num_domains * num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(1, flat_LS.reshape(L, -1), w_LTK.reshape(L, -1).long())
    mass = torch.zeros(L, num_domains * num_experts, dtype=torch.float32, device=dev)
    if topk_weights_LTK is not None:
        mass.scatter_add_(1, flat_LS.reshape(L, -1), (topk_weights_LTK.float() * w_LTK).reshape(L, -1))
    return counts.view(L, num_domains, num_experts), mass.view(L, num_domains, num_experts), load_LE


def affinity_ema_(A_LME: torch.Tensor, counts_LME: torch.Tensor, momentum: float) -> torch.Tensor:
    """In place ``A = m*A + (1-m)*rownorm(counts)``; domains with no tokens in ``counts`` keep their row."""
    c = counts_LME.to(A_LME.dtype)
    tot_LM1 = c.sum(-1, keepdim=True)
    has_LM1 = tot_LM1 > 0
    new = torch.where(has_LM1, c / tot_LM1.clamp(min=1), A_LME)
    A_LME.copy_(torch.where(has_LM1, momentum * A_LME + (1 - momentum) * new, A_LME))
    return A_LME


_LOCAL = {"mask_expert_grads_": mask_expert_grads_, "pair_mask": pair_mask, "routing_stats": routing_stats,
          "affinity_ema_": affinity_ema_}


def get(name: str):
    """``desmoe.ext.<name>`` when that module imports, else the local reference of the same name."""
    try:
        from .. import ext  # written in parallel; may not exist yet in every checkout
        return getattr(ext, name)
    except (ImportError, AttributeError):
        return _LOCAL[name]
