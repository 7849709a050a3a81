"""The task loss of one batch (shared by fine-tuning, base pretraining and the non-finite diagnosis)."""
from __future__ import annotations

import torch

from ..eval import autocast_ctx, token_losses


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def task_loss(model, batch, device, bf16, fwd=None):
    """``(mean CE, coef·aux loss or None, per-token CE [B,S-1], valid [B,S-1])``; aux is the model's own
    load-balancing loss when its config enables it (``output_router_logits``). ``fwd``: the module to call
    (a DDP wrapper of ``model``), default ``model``."""
    with autocast_ctx(device, bf16):
        out = (fwd or model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    ce, valid = token_losses(out.logits, batch["labels"])
    loss = ce.sum() / valid.sum().clamp(min=1)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        aux = getattr(model.config, "router_aux_loss_coef", 0.0) * aux.float()
    return loss, aux, ce.detach(), valid
