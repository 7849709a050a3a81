"""ALR (Adaptive Lightweight Router) and its distillation loss.

Each MoE layer's pretrained router keeps its weight frozen and becomes the KD *teacher*; a small MLP
(D -> 4D -> E, GELU) adds a residual to its logits and is the trainable part of the *student*
(``student = teacher + ALR(x)``). The output layer is zero-initialised, so at step 0 the patched model routes
exactly like the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LAMBDA_SCHEDULES = ("linear", "cosine", "exponential", "constant")


class ALRResidual(nn.Module):
    """``x_TD -> delta_logits_TE``: Linear(D, 4D) (Kaiming init) -> GELU -> Linear(4D, E) (zero init)."""

    def __init__(self, hidden_dim: int, num_experts: int, expansion: int = 4):
        super().__init__()
        if hidden_dim < 1 or num_experts < 1 or expansion < 1:
            raise ValueError(f"hidden_dim, num_experts, expansion must be >= 1, got {hidden_dim}, {num_experts}, {expansion}")
        self.up = nn.Linear(hidden_dim, expansion * hidden_dim)
        self.down = nn.Linear(expansion * hidden_dim, num_experts)
        nn.init.kaiming_normal_(self.up.weight, nonlinearity="relu")
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # run in the parameters' dtype (fp32 master weights under autocast still fine)
        return self.down(F.gelu(self.up(x_TD.to(self.up.weight.dtype))))


def attach_alr(routers, expansion: int = 4) -> list[ALRResidual]:
    """Give every :class:`desmoe.layers.TopKRouter` in ``routers`` a fresh ALR residual (on its device)."""
    out = []
    for r in routers:
        alr = ALRResidual(r.hidden_dim, r.num_experts, expansion).to(device=r.weight.device)
        r.residual = alr
        out.append(alr)
    return out


def detach_alr(routers) -> None:
    for r in routers:
        r.residual = None


def kd_loss(teacher_logits_TE: torch.Tensor, student_logits_TE: torch.Tensor, tau: float = 0.7,
            valid_T: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """``KL(softmax(teacher/tau) || softmax(student/tau))`` averaged (``reduction="mean"``) or summed (``"sum"``)
    over valid tokens (float32 scalar).

    The teacher is detached (the frozen pretrained router). ``valid_T`` (bool) drops padding tokens; with no
    valid token the loss is an exact 0 that still carries the student's graph.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if teacher_logits_TE.shape != student_logits_TE.shape:
        raise ValueError(f"teacher_logits_TE {tuple(teacher_logits_TE.shape)} and student_logits_TE "
                         f"{tuple(student_logits_TE.shape)} must have the same shape")
    log_p_TE = F.log_softmax(teacher_logits_TE.detach().float() / tau, dim=-1)
    log_q_TE = F.log_softmax(student_logits_TE.float() / tau, dim=-1)
    kl_T = (log_p_TE.exp() * (log_p_TE - log_q_TE)).sum(-1)
    if valid_T is None:
        return kl_T.mean() if reduction == "mean" else kl_T.sum()
    w_T = valid_T.to(kl_T.dtype).reshape(-1)
    total = (kl_T * w_T).sum()
    return total / w_T.sum().clamp(min=1.0) if reduction == "mean" else total


def lambda_at(alpha: float, *, schedule: str = "linear", lambda_max: float = 0.5, end: float = 0.7,
              decay_rate: float = 5.0) -> float:
    """KD weight λ(α), α = step/T in [0, 1]: starts at ``lambda_max``, reaches 0 at ``α = end`` and stays 0.

    linear: ``λmax·(1-x)``; cosine: ``λmax·(1+cos πx)/2``; exponential: ``λmax·(e^{-rx}-e^{-r})/(1-e^{-r})``
    (shifted so it hits 0 at the end); constant: ``λmax`` throughout (``end`` ignored); ``x = α/end``.
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return float(lambda_max)
    if end <= 0:
        raise ValueError(f"end must be > 0, got {end}")
    x = min(max(alpha / end, 0.0), 1.0)
    if schedule == "linear":
        f = 1.0 - x
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * x))
    else:
        r = decay_rate
        f = (math.exp(-r * x) - math.exp(-r)) / (1.0 - math.exp(-r))
    return float(lambda_max) * f
