"""ESFT (Expert-Specialized Fine-Tuning): only the experts most relevant to the training domains train.

Before training, :meth:`ESFT.prepare` scores every expert on training batches (no grad) until every domain has
``esft_tokens`` scored tokens (131,072 by default, as the authors' scripts; capped by the domain's training data): per
layer and domain, the gate-score mass (``esft_gate``) or the token-selection share (``esft_token``); per layer and
domain it selects the fewest experts whose normalised scores sum to >= ``esft_p``, and a layer trains the union over
domains. Nothing else trains.
"""
from __future__ import annotations

import torch

from .. import ops
from ..context import recording
from ..data.packing import packed_forward
from .registry import Method, register_method


def select_top_p(scores_LME: torch.Tensor, p: float) -> torch.Tensor:
    """bool ``[L, M, E]``: per row, the highest-scoring experts until their (normalised) sum reaches ``p``."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    s = scores_LME / scores_LME.sum(-1, keepdim=True).clamp(min=1e-12)
    sorted_s, order = s.sort(dim=-1, descending=True)
    before = sorted_s.cumsum(-1) - sorted_s  # mass of the strictly better experts
    keep_sorted = before < p - 1e-9
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class ESFT(Method):
    """Shared by the two scorings; ``score`` picks ``routing_stats``' output: 0 counts (token), 1 mass (gate)."""

    score: int = 0

    def __init__(self, cfg, total_steps):
        super().__init__(cfg, total_steps)
        self.selection_LE: torch.Tensor | None = None  # bool, the selected experts
        self.scores_LME: torch.Tensor | None = None
        self.scored_M: dict[str, int] | None = None  # tokens scored per domain

    def trainable_kinds(self, phase: str) -> set[str]:
        return {"experts"}

    def expert_scope(self, phase: str) -> str:
        return "ESFT selection"

    def expert_trainable_LE(self, ctl) -> torch.Tensor | None:
        return self.selection_LE

    def prepare_batches(self) -> int:
        """An upper bound; :meth:`prepare` stops as soon as every domain has its tokens."""
        return self.cfg.esft_batches or 1 << 30

    def token_budget_M(self, num_domains: int, data_tokens_M: list[int] | None = None) -> torch.Tensor:
        """Tokens to score per domain: ``esft_tokens``, capped by ``data_tokens_M`` (the training data)."""
        b = torch.full((num_domains,), int(self.cfg.esft_tokens), dtype=torch.int64)
        if data_tokens_M is not None:
            b = torch.minimum(b, torch.as_tensor(data_tokens_M, dtype=torch.int64).clamp(min=1))
        return b

    @torch.no_grad()
    def prepare(self, ctl, batches, data_tokens_M: list[int] | None = None) -> torch.Tensor:
        """Score the experts on ``batches`` (an iterable of dicts with ``input_ids``, ``domain_ids``), each domain on
        its first ``token_budget_M`` tokens (later ones are ignored; iteration stops once all are scored);
        returns bool ``[L, E]``."""
        L, M, E = len(ctl.blocks), len(ctl.domain_names), ctl.num_experts
        scores = torch.zeros(L, M, E, dtype=torch.float64)
        budget_M, seen_M = self.token_budget_M(M, data_tokens_M), torch.zeros(M, dtype=torch.int64)
        was_training = ctl.model.training
        ctl.model.eval()
        for batch in batches:
            dom_T = batch["domain_ids"].reshape(-1).clone()
            for d in range(M):  # keep each domain's first (budget - seen) tokens of this batch
                idx = (dom_T == d).nonzero().flatten()
                dom_T[idx[max(int(budget_M[d] - seen_M[d]), 0):]] = -1
                seen_M[d] += int((dom_T == d).sum())
            with recording(ctl.routers) as rec:
                packed_forward(ctl.model, batch)  # as in training: packed documents apart where the batch says
            records = rec.layers()
            ids_LTK = torch.stack([r["topk_ids_TK"] for r in records])
            w_LTK = torch.stack([r["topk_weights_TK"].float() for r in records])
            stats = ops.routing_stats(ids_LTK, dom_T.to(ids_LTK.device), M, E, topk_weights_LTK=w_LTK)
            scores += stats[self.score].double().cpu()
            if bool((seen_M >= budget_M).all()):
                break
        ctl.model.train(was_training)
        self.scored_M = dict(zip(ctl.domain_names, seen_M.tolist()))
        self.scores_LME = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)).float()
        self.selection_LE = select_top_p(self.scores_LME, self.cfg.esft_p).any(dim=1)
        return self.selection_LE

    def summary(self) -> dict:
        sel = self.selection_LE
        return {"esft_selection": None if sel is None else [sel[l].nonzero().flatten().tolist()
                                                            for l in range(sel.shape[0])],
                "esft_scored_tokens": self.scored_M}

    def state_dict(self) -> dict:
        return {"esft_selection_LE": self.selection_LE, "esft_scores_LME": self.scores_LME}

    def load_state_dict(self, sd: dict) -> None:
        self.selection_LE = sd.get("esft_selection_LE")
        self.scores_LME = sd.get("esft_scores_LME")


@register_method
class ESFTGate(ESFT):
    name = "esft_gate"
    score = 1


@register_method
class ESFTToken(ESFT):
    name = "esft_token"
    score = 0
