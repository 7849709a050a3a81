"""The ALR's files beside a Hugging Face model folder: ``desmoe_alr.safetensors`` (every router's residual MLP),
``desmoe_alr.json`` (its shape) and a notice that the folder's linear routers alone are not the trained routing.

Written by a checkpoint (:mod:`desmoe.train.checkpoint`) and read by :func:`desmoe.from_pretrained`
(:mod:`desmoe.export`); both import this module, which imports neither.
"""
from __future__ import annotations

import json
import os

import torch

from ..integrations.hf import routers as get_routers
from ..layers import TopKRouter
from .alr import attach_alr

ALR_FILE = "desmoe_alr.safetensors"
ALR_META = "desmoe_alr.json"
ALR_NOTICE = "DESMOE_README.md"

_NOTICE = """# Not the trained model on its own

This folder's routers are the *pretrained* linear routers. The model was trained with DES-MoE's adaptive router
(ALR): each layer adds a small MLP residual to the router logits, stored in `{alr}`. Stock transformers loads this
folder but ignores that file, so it routes differently from the trained model.

- To use the model as trained: `desmoe.from_pretrained("<this folder or its checkpoint>")`.
- To get a stock Hugging Face model (transformers, vLLM, SGLang) that routes like the trained one:
  `desmoe export --checkpoint <checkpoint> --out <dir>`; it reports how closely the exported routers agree.
"""


class ALRFileError(ValueError):
    """ALR files that cannot be written or read as asked (the message names the path)."""


# --- writing -------------------------------------------------------------------------------------------------------
def write_alr(model_dir: str, model, state_dict: dict | None = None) -> bool:
    """Write the routers' ALR residuals (if any) and a notice into ``model_dir``; returns whether there was one.
    ``state_dict``: a full (gathered) state dict to read them from, for FSDP-sharded models."""
    from safetensors.torch import save_file

    names = [n for n, m in model.named_modules() if isinstance(m, TopKRouter)]
    mods = [m for m in model.modules() if isinstance(m, TopKRouter)]
    alrs = [m.residual for m in mods]
    if not any(a is not None for a in alrs):
        return False
    if not all(a is not None for a in alrs):
        raise ALRFileError("either every router has an ALR residual or none does")
    tensors = {}
    for i, (name, a) in enumerate(zip(names, alrs)):
        src = a.state_dict() if state_dict is None else \
            {k[len(f"{name}.residual."):]: v for k, v in state_dict.items() if k.startswith(f"{name}.residual.")}
        for k, v in src.items():
            tensors[f"layers.{i}.{k}"] = v.detach().to("cpu", torch.float32).contiguous()
    a = alrs[0]
    save_file(tensors, os.path.join(model_dir, ALR_FILE))
    with open(os.path.join(model_dir, ALR_META), "w") as f:
        json.dump({"format": 1, "num_layers": len(alrs), "expansion": a.up.out_features / a.up.in_features,
                   "alr_width": a.up.out_features, "hidden_dim": a.up.in_features,
                   "num_experts": a.down.out_features}, f, indent=1)
    with open(os.path.join(model_dir, ALR_NOTICE), "w") as f:
        f.write(_NOTICE.format(alr=ALR_FILE))
    return True


# --- reading -------------------------------------------------------------------------------------------------------
def load_alr_(model, model_dir: str) -> bool:
    """Attach the ALR residuals stored in ``model_dir`` to a patched ``model``'s routers; False if there are none."""
    from safetensors.torch import load_file

    path = os.path.join(model_dir, ALR_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(os.path.join(model_dir, ALR_META)) as f:
            meta = json.load(f)
        tensors = load_file(path)
    except (OSError, ValueError) as e:
        raise ALRFileError(f"cannot read the ALR in {model_dir!r}: {e}") from None
    routers = get_routers(model)
    if meta.get("num_layers") != len(routers):
        raise ALRFileError(f"{path!r} holds {meta.get('num_layers')} ALR layers but the model has {len(routers)} "
                           f"routers")
    # the width as stored (older files: the integer expansion); round(expansion·D) gives it back exactly
    width = meta.get("alr_width")
    expansion = width / meta["hidden_dim"] if width is not None and meta.get("hidden_dim") else meta["expansion"]
    alrs = attach_alr(routers, expansion)
    for i, a in enumerate(alrs):
        sd = {k[len(f"layers.{i}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{i}.")}
        try:
            a.load_state_dict(sd)
        except RuntimeError as e:
            raise ALRFileError(f"{path!r} layer {i} does not fit the model: {e}") from None
    return True
