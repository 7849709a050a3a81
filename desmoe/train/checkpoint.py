"""All checkpoint I/O of a training run, in one module.

Layout of a run directory ``DIR``::

    DIR/config.yaml                 the validated config of the run
    DIR/checkpoints/step-000050/    one checkpoint (written to a temp dir, then renamed: atomic)
        model/                      save_pretrained (HF format, loads in stock transformers; no ALR keys)
                                    + the tokenizer (save_pretrained)
        method.pt                   ALR weights, affinity A, counts, masks, ESFT selection
        trainer.pt                  optimizer, scheduler, step, data-stream state, RNG states
        meta.json                   step, phase, method, domains, losses
    DIR/latest                      name of the newest checkpoint (replaced atomically)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"


def _write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_config(run_dir: str, cfg_dict: dict) -> None:
    import yaml

    os.makedirs(run_dir, exist_ok=True)
    _write_text_atomic(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg_dict, sort_keys=False))


def save_checkpoint(run_dir: str, step: int, *, model, tokenizer, controller, optimizer, scheduler,
                    stream_state: dict | None, meta: dict, keep: int | None = None) -> str:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; returns its directory."""
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        # the ALR residuals live inside the routers; take them out so the HF files stay stock-loadable
        residuals = [r.residual for r in controller.routers]
        for r in controller.routers:
            r.residual = None
        try:
            model.save_pretrained(os.path.join(tmp, "model"))
        finally:
            for r, res in zip(controller.routers, residuals):
                r.residual = res
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save(controller.state_dict(), os.path.join(tmp, "method.pt"))
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "stream": stream_state, "rng": rng}, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=1, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(os.path.join(run_dir, LATEST), name + "\n")
    if keep:
        olds = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
        for d in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a run directory (its ``latest``) or a checkpoint directory itself."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        ck = os.path.join(path, CKPT_DIR, name)
        if os.path.isfile(os.path.join(ck, "meta.json")):
            return ck
        raise FileNotFoundError(f"{latest} names {name!r} but {ck} is missing or incomplete")
    raise FileNotFoundError(f"no checkpoint in {path!r}: expected a run directory with a 'latest' file or a "
                            f"checkpoint directory with meta.json")


def read_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "meta.json")) as f:
        return json.load(f)


def load_model(ckpt: str, *, device="cpu", dtype=torch.float32):
    """``(model, tokenizer)`` from a checkpoint's ``model/`` directory (not yet patched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = os.path.join(ckpt, "model")
    if not os.path.isdir(mdir):
        raise FileNotFoundError(f"checkpoint {ckpt!r} has no model/ directory")
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(mdir) if os.path.isfile(os.path.join(mdir, "tokenizer.json")) else None
    return model, tok


def load_method_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "method.pt"), map_location="cpu", weights_only=False)


def load_trainer_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=False)


def run_config_path(run_or_ckpt: str) -> str | None:
    """``config.yaml`` of the run that holds this checkpoint (or run directory), if present."""
    for p in (run_or_ckpt, os.path.dirname(os.path.dirname(os.path.abspath(run_or_ckpt)))):
        c = os.path.join(p, "config.yaml")
        if os.path.isfile(c):
            return c
    return None
