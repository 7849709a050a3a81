"""The task loss of one batch (shared by fine-tuning, base pretraining and the non-finite diagnosis)."""
from __future__ import annotations

import contextlib

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
    config says with None. ``fwd``: the module to call (a DDP wrapper of ``model``), default ``model``."""
    with train_autocast(device, bf16):
        out = (fwd or model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             **aux_kwargs(model, aux))
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
