"""The task loss of one batch (shared by fine-tuning, base pretraining and the non-finite diagnosis), and
:class:`StepStats`, what one optimizer step of the training loop adds up."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..eval import token_losses


def train_autocast(device, bf16: bool):
    """bf16 autocast for training compute, on CUDA and (``model.dtype: bfloat16`` runs, tests) on CPU."""
    if bf16 and torch.device(device).type in ("cuda", "cpu"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def aux_kwargs(model, aux: bool | None) -> dict:
    """Forward kwargs that switch the model's own load-balancing loss on (``aux`` True) or off (False) where the
    model has one (its config has ``output_router_logits``); None: leave it to the model's config."""
    if aux is None or not hasattr(getattr(model, "config", None), "output_router_logits"):
        return {}
    return {"output_router_logits": bool(aux)}


def model_aux_loss(model, out) -> torch.Tensor | None:
    """``router_aux_loss_coef · out.aux_loss`` (float32), or None when the forward returned no aux loss. Both the
    ``desmoe train`` loop and :class:`~desmoe.train.DesMoETrainer` add it *outside* ``λ·KD + (1-λ)·task``."""
    aux = out.get("aux_loss") if hasattr(out, "get") else getattr(out, "aux_loss", None)
    if aux is None:
        return None
    coef = getattr(model, "router_aux_loss_coef", None)  # what the HF model itself adds to outputs.loss
    if coef is None:
        coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    return coef * aux.float()


def task_loss(model, batch, device, bf16, fwd=None, aux: bool | None = None):
    """``(mean CE, coef·aux loss or None, per-token CE [B,S-1], valid [B,S-1])``; aux is the model's own
    load-balancing loss, requested with ``aux=True`` (``train.aux_loss``), off with False, or as the model's
    config says with None. ``fwd``: the module to call (a DDP wrapper of ``model``), default ``model``. A batch
    with ``position_ids`` (isolated packing) goes in so that each packed document attends only to itself
    (:func:`desmoe.data.packed_forward`)."""
    from ..data.packing import packed_forward

    with train_autocast(device, bf16):
        out = packed_forward(fwd or model, batch, model=model, **aux_kwargs(model, aux))
    ce, valid = token_losses(out.logits, batch["labels"])
    loss = ce.sum() / valid.sum().clamp(min=1)
    return loss, model_aux_loss(model, out), ce.detach(), valid


def supervised_tokens(labels: torch.Tensor | None, num_tokens: int | None = None) -> torch.Tensor | None:
    """bool, flattened like the batch: the tokens a causal LM's shifted loss supervises (the label one position on
    is not -100). The method's added loss (KD) is computed over the same tokens as the task loss. None without
    labels (or when ``num_tokens`` does not match them)."""
    if labels is None or (num_tokens is not None and labels.numel() != num_tokens):
        return None
    sup = torch.zeros_like(labels, dtype=torch.bool)
    sup[..., :-1] = labels[..., 1:] != -100
    return sup.reshape(-1)


@dataclass
class StepStats:
    """One optimizer step's global-batch losses (averaged over micro-batches), tokens and per-domain task loss."""

    num_domains: int
    loss: float = 0.0
    task: float = 0.0
    kd: float = 0.0
    tokens: int = 0
    grad_norm: float | None = None
    lr: float | None = None  # the learning rate this step's update used (before the scheduler steps)
    bad: tuple | None = None  # (term, value, batch) of the first non-finite loss or gradient norm
    last_batch: dict | None = None
    dom_loss_M: torch.Tensor = field(init=False)
    dom_cnt_M: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.dom_loss_M = torch.zeros(self.num_domains, dtype=torch.float64)
        self.dom_cnt_M = torch.zeros(self.num_domains, dtype=torch.float64)

    def add(self, b: dict, ce, valid, g_task: float, g_kd: float | None, aux: float | None, *, lam: float,
            grad_accum: int) -> None:
        """Add micro-batch ``b`` of a step of ``grad_accum``: its global-batch losses (objective
        ``λ·KD + (1-λ)·task`` plus ``aux``), its per-domain task loss (``ce`` over the ``valid`` shifted
        targets) and its supervised tokens."""
        ga = grad_accum
        g_loss = g_task if g_kd is None else lam * g_kd + (1 - lam) * g_task
        self.loss += (g_loss + (aux or 0.0)) / ga
        self.task += g_task / ga
        self.kd += (g_kd if g_kd is not None else 0.0) / ga
        d_S = b["domain_ids"][:, 1:]
        ok = valid & (d_S >= 0)
        self.dom_loss_M.index_add_(0, d_S[ok].cpu(), ce[ok].double().cpu())
        self.dom_cnt_M.index_add_(0, d_S[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
        self.tokens += int((b["labels"] != -100).sum())
        self.last_batch = b

    def domain_losses(self, domain_names) -> dict:
        """``{"loss/<domain>": the step's mean task loss}`` for each domain it had tokens of."""
        return {f"loss/{d}": float(self.dom_loss_M[m] / self.dom_cnt_M[m])
                for m, d in enumerate(domain_names) if self.dom_cnt_M[m] > 0}
