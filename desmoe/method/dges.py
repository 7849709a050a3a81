"""DGES (Domain-Guided Expert Specialization): the domain×expert affinity matrix A and the expert masks.

Per MoE layer ``l``, ``A[l, d, e]`` is the share of domain ``d``'s top-k selections that went to expert ``e``
(rows sum to 1). It is accumulated over the whole warm-up, then refreshed every ``update_every`` steps by
``A = m·A + (1-m)·rownorm(counts since the last refresh)``. The mask ``M[l, d, e] = A[l, d, e] >= φ·max_e A[l, d, e]``
always keeps at least one expert (the argmax) per domain.
"""
from __future__ import annotations

import torch

from .. import ops


def check_phi(phi, name: str = "phi") -> None:
    """The DGES threshold's one rule: ``phi`` in (0, 1] (a ``ValueError`` naming ``name`` otherwise)."""
    if not 0.0 < phi <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {phi!r}")


def masks_from_affinity(A_LME: torch.Tensor, phi: float) -> torch.Tensor:
    """bool ``[L, M, E]``: ``A >= phi·rowmax``, plus each row's argmax (so ≥ 1 expert per domain).

    A domain with an all-zero row (no tokens seen) gets every expert: it has no tokens to train them anyway.
    """
    check_phi(phi)
    if A_LME.dim() != 3:
        raise ValueError(f"A_LME must be [L, M, E], got shape {tuple(A_LME.shape)}")
    max_LM1 = A_LME.amax(-1, keepdim=True)
    mask = A_LME >= phi * max_LM1
    top_LM1 = A_LME.argmax(-1, keepdim=True)
    mask.scatter_(-1, top_LM1, True)  # guards against float round-off when phi == 1
    return mask


class AffinityTracker:
    """Collects routing counts per (layer, domain, expert) and turns them into A and masks.

    Usage: ``observe(topk_ids_LTK, token_domains_T)`` after every forward; ``finish_warmup()`` once at the end
    of warm-up (A := rownorm(all warm-up counts)); ``refresh()`` every ``update_every`` steps afterwards (EMA).
    """

    def __init__(self, num_layers: int, num_domains: int, num_experts: int, *, phi: float,
                 momentum: float = 0.9, device=None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.L, self.M, self.E = num_layers, num_domains, num_experts
        self.phi, self.momentum = phi, momentum
        self.A_LME = torch.zeros(num_layers, num_domains, num_experts, dtype=torch.float32, device=device)
        self.counts_LME = torch.zeros(num_layers, num_domains, num_experts, dtype=torch.int64, device=device)
        self.initialised = False
        self.masks_LME: torch.Tensor | None = None
        self.load_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)

    def observe(self, topk_ids_LTK: torch.Tensor, token_domains_T: torch.Tensor, topk_weights_LTK=None) -> None:
        counts, _, load = ops.routing_stats(
            topk_ids_LTK.detach(), token_domains_T, self.M, self.E,
            topk_weights_LTK=None if topk_weights_LTK is None else topk_weights_LTK.detach(),
        )
        self.counts_LME += counts.to(self.counts_LME.device)
        self.load_LE += load.to(self.load_LE.device)

    def finish_warmup(self) -> torch.Tensor:
        """A := rownorm(warm-up counts); returns the masks."""
        c = self.counts_LME.float()
        self.A_LME = c / c.sum(-1, keepdim=True).clamp(min=1.0)
        self.counts_LME.zero_()
        self.initialised = True
        return self.update_masks()

    def refresh(self) -> torch.Tensor:
        """EMA-refresh A from the counts since the last refresh (momentum ``m``); returns the new masks."""
        if not self.initialised:
            return self.finish_warmup()
        ops.affinity_ema_(self.A_LME, self.counts_LME, self.momentum)
        self.counts_LME.zero_()
        return self.update_masks()

    def update_masks(self) -> torch.Tensor:
        self.masks_LME = masks_from_affinity(self.A_LME, self.phi)
        return self.masks_LME

    def routing_record(self, domain_names) -> dict:
        """Log entries: each domain's mask size (mean over layers) and the mean over layers of max/mean expert load."""
        rec = {}
        if self.masks_LME is not None:
            for m, d in enumerate(domain_names):
                rec[f"mask_size/{d}"] = float(self.masks_LME[:, m].sum(-1).float().mean())
        load = self.load_LE.float()
        if load.sum() > 0:
            rec["expert_load_max_over_mean"] = float((load.max(-1).values / load.mean(-1).clamp(min=1)).mean())
        return rec

    def masks_by_domain(self, domain_names) -> dict | None:
        """``{domain: [its mask's expert ids, per layer]}``; None before the first masks."""
        m = self.masks_LME
        if m is None:
            return None
        return {d: [m[l, i].nonzero().flatten().tolist() for l in range(m.shape[0])]
                for i, d in enumerate(domain_names)}

    def state_dict(self) -> dict:
        return {"A_LME": self.A_LME.cpu(), "counts_LME": self.counts_LME.cpu(), "initialised": self.initialised,
                "masks_LME": None if self.masks_LME is None else self.masks_LME.cpu(), "load_LE": self.load_LE.cpu(),
                "phi": self.phi, "momentum": self.momentum}

    def load_state_dict(self, sd: dict) -> None:
        if tuple(sd["A_LME"].shape) != (self.L, self.M, self.E):
            raise ValueError(f"affinity state has A of shape {tuple(sd['A_LME'].shape)}, "
                             f"expected {(self.L, self.M, self.E)}")
        dev = self.A_LME.device
        self.A_LME = sd["A_LME"].to(dev)
        self.counts_LME = sd["counts_LME"].to(dev)
        self.load_LE = sd["load_LE"].to(dev)
        self.initialised = bool(sd["initialised"])
        self.masks_LME = None if sd["masks_LME"] is None else sd["masks_LME"].to(dev)
