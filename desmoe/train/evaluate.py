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


def checkpoint_config(ckpt: str, log=None):
    """The config a checkpoint was written under: its own ``config.json`` (covered by the manifest), not the
    run's ``config.yaml``, which anyone may have edited since. Where ``config.yaml`` beside it differs, ``log``
    gets one line naming the differing keys (the checkpoint's config is used). The model and tokenizer come from
    the checkpoint's ``model/`` folder, so the paths the run started from need not exist any more."""
    import json

    from .config import config_from_dict

    p = os.path.join(ckpt, "config.json")
    if not os.path.isfile(p):  # a checkpoint from before config.json existed: the run's config.yaml is all there is
        cfg_path = ck.run_config_path(ckpt)
        if cfg_path is None:
            raise FileNotFoundError(f"checkpoint {ckpt!r} has neither its own config.json nor a config.yaml beside it")
        return load_config(cfg_path)
    try:
        with open(p) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ck.CheckpointError(f"checkpoint file {p!r} is unreadable ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ck.CheckpointError(f"checkpoint file {p!r} is malformed: expected the run's config (a mapping with a "
                                 f"'model' section)")
    cfg_yaml = ck.run_config_path(ckpt)
    if cfg_yaml is not None and log is not None:
        from .config import read_yaml
        from .rundir import config_differences

        try:
            diffs = config_differences(saved, read_yaml(cfg_yaml))
        except (OSError, ValueError) as e:
            diffs = [f"unreadable: {e}"]
        if diffs:
            log(f"{cfg_yaml} differs from the config checkpoint {ckpt!r} was written under ({'; '.join(diffs[:5])}"
                f"{'; ...' if len(diffs) > 5 else ''}): evaluating with the checkpoint's own config ({p})")
    d = json.loads(json.dumps(saved))
    mdir = os.path.join(ckpt, "model")
    d["model"].update(tiny=None, path=mdir, overrides={})
    d.setdefault("tokenizer", {})
    if isinstance(d["tokenizer"], dict):
        d["tokenizer"]["path"] = mdir
    return config_from_dict(d, source=p)


def evaluate_checkpoint(path: str, *, max_batches: int | None = None, math_n: int = 16, device: str = "auto",
                        domains: list[str] | None = None, log=None) -> dict:
    """Load a run directory's latest checkpoint (or a checkpoint directory) and evaluate it, under the config
    the checkpoint was written under (:func:`checkpoint_config`)."""
    ckpt = ck.open_checkpoint(path)  # verified against its manifest before anything is loaded
    cfg = checkpoint_config(ckpt, log=log)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tok = ck.load_model(ckpt, device=dev)
    if tok is None:
        raise FileNotFoundError(f"checkpoint {ckpt!r} has no tokenizer in model/")
    patch(model, backend=cfg.model.backend)
    meta = ck.read_meta(ckpt)
    ctl = MethodController(model, cfg.method, max(int(meta.get("total_steps", 1)), 1), list(meta["domains"]))
    ctl.load_state_dict(ck.load_method_state(ckpt))
    model.to(dev)
    names = domains or cfg.data.eval_domains()
    docs = tokenize_domains(tok, load_texts(cfg, names, "test", cfg.data.eval_max_docs))  # the trainer's eval docs
    res = evaluate_model(model, tok, docs, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                         max_batches=max_batches or cfg.train.eval_batches, math_n=math_n if "math" in names else 0,
                         device=dev,
                         bf16=cfg.train.bf16 in ("auto", True, "true"), general=cfg.data.general,
                         packing=cfg.data.packing)
    res["checkpoint"] = os.path.abspath(ckpt)
    res["step"] = meta["step"]
    res["method"] = cfg.method.name
    return res
