"""Evaluate a run's checkpoint: the application around :func:`desmoe.eval.evaluate_model` (``desmoe eval``)."""
from __future__ import annotations

import os

import torch

from ..integrations.hf import patch
from ..data import tokenize_domains
from ..eval import evaluate_model
from ..method import MethodController
from . import checkpoint as ck
from .builders import load_texts
from .config import load_config


def evaluate_checkpoint(path: str, *, max_batches: int | None = None, math_n: int = 16, device: str = "auto",
                        domains: list[str] | None = None) -> dict:
    """Load a run directory's latest checkpoint (or a checkpoint directory) and evaluate it."""
    ckpt = ck.open_checkpoint(path)  # verified against its manifest before anything is loaded
    cfg_path = ck.run_config_path(ckpt)
    if cfg_path is None:
        raise FileNotFoundError(f"no config.yaml found beside checkpoint {ckpt!r}")
    cfg = load_config(cfg_path)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tok = ck.load_model(ckpt, device=dev)
    if tok is None:
        raise FileNotFoundError(f"checkpoint {ckpt!r} has no tokenizer in model/")
    patch(model, backend=cfg.model.backend)
    meta = ck.read_meta(ckpt)
    ctl = MethodController(model, cfg.method, max(int(meta.get("total_steps", 1)), 1), list(meta["domains"]))
    ctl.load_state_dict(ck.load_method_state(ckpt))
    model.to(dev)
    g = cfg.data.general
    names = domains or list(cfg.data.domains) + ([g] if g and g not in cfg.data.domains else [])
    docs = tokenize_domains(tok, load_texts(cfg, names, "test", cfg.data.eval_max_docs))  # the trainer's eval docs
    res = evaluate_model(model, tok, docs, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                         max_batches=max_batches or cfg.train.eval_batches, math_n=math_n if "math" in names else 0, device=dev,
                         bf16=cfg.train.bf16 in ("auto", True, "true"), general=cfg.data.general)
    res["checkpoint"] = os.path.abspath(ckpt)
    res["step"] = meta["step"]
    res["method"] = cfg.method.name
    return res
