"""What this install will run on: versions, device, backends, the extension, supported model types.

``desmoe info`` prints it as a table (``--format json`` for machines); it is the first thing to paste into a bug
report. Nothing here may fail because an optional part (Triton, CUDA, the extension, matplotlib) is missing:
each fact reads "not installed" / "no" instead.
"""
from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else at import
        return "not installed" if isinstance(e, ImportError) else f"broken ({type(e).__name__}: {e})"
    return str(getattr(mod, "__version__", "unknown"))


def _device() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda_available": False, "device": "cpu", "torch_cuda": torch.version.cuda}
    idx = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    return {
        "cuda_available": True,
        "device": torch.cuda.get_device_name(idx),
        "capability": f"sm_{cap[0]}{cap[1]}",
        "device_count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
    }


def _backends(cuda: bool) -> dict:
    """The backend ``desmoe.patch(model)`` (backend="auto") resolves to for routing and experts, per device."""
    import torch

    from . import ops

    out = {"triton_kernels_importable": ops.triton_available()}
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for dev in devices:
        try:
            chosen = ops.resolve_backend(None, torch.device(dev))
        except (ValueError, RuntimeError) as e:  # e.g. DESMOE_BACKEND set to something unusable here
            chosen = f"error: {e}"
        # routing has two implementations: the Triton kernel, and the reference every other backend uses
        routing = chosen if chosen in ("triton",) or chosen.startswith("error") else "reference"
        out[f"patch_{dev}"] = {"routing": routing, "experts": chosen}
    return out


def _extension() -> dict:
    try:
        from .ops import extension

        return dict(extension.info())
    except Exception as e:
        return {"available": False, "error": f"{type(e).__name__}: {e}"}


def collect() -> dict:
    """Every fact as a JSON-serialisable dict."""
    import os

    from . import __version__
    from .integrations.hf import supported_model_types

    dev = _device()
    return {
        "desmoe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        # Hugging Face's kernel hub (transformers >= 5.25 needs it); desmoe's own Triton kernels are desmoe.kernels
        "kernels": _version("kernels"),
        "device": dev,
        "backends": _backends(dev["cuda_available"]),
        "env": {k: os.environ[k] for k in ("DESMOE_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS") if k in os.environ},
        "extension": _extension(),
        "supported_model_types": supported_model_types(),
    }


def format_table(facts: dict) -> str:
    """Two aligned columns, nested dicts flattened as ``a.b``; lists joined by commas."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif isinstance(v, (list, tuple)):
            rows.append((prefix, ", ".join(str(x) for x in v)))
        else:
            rows.append((prefix, str(v)))

    walk("", facts)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def alr_facts(model: str, expansion: float | None = None) -> dict:
    """The ALR's cost on the model whose config is ``model`` (a folder with config.json, or the file itself)."""
    import os

    from transformers import AutoConfig

    from .method import MethodConfig
    from .method.alr import alr_summary

    import math

    if expansion is not None and (not isinstance(expansion, (int, float)) or not math.isfinite(expansion)
                                  or not 0 < expansion <= 64):
        raise ValueError(f"--alr-expansion must be a number in (0, 64] (the ALR width as a multiple of the hidden "
                         f"size), got {expansion!r}")
    path = os.path.dirname(model) if os.path.basename(model) == "config.json" else model
    if not os.path.isfile(os.path.join(path, "config.json")):  # a folder or its config.json: never a hub lookup
        raise FileNotFoundError(f"--model {model!r}: no config.json there; expected a model folder holding "
                                f"config.json, or the config.json file itself")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--model: cannot read a model config from {model!r}: {e}") from None
    return alr_summary(cfg, MethodConfig().alr_expansion if expansion is None else expansion)


def main(fmt: str = "table", out=None, model: str | None = None, alr_expansion: float | None = None) -> int:
    import json

    out = out or sys.stdout
    if alr_expansion is not None and model is None:
        raise ValueError(f"--alr-expansion {alr_expansion} needs --model (the model folder whose ALR it costs)")
    if model is not None:
        alr_facts_checked = alr_facts(model, alr_expansion)  # the flags checked before anything is collected
    facts = collect()
    if model is not None:
        facts["alr"] = {"model": model, **alr_facts_checked}
    out.write((json.dumps(facts, indent=2) if fmt == "json" else format_table(facts)) + "\n")
    return 0
