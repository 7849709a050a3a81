"""desmoe: faster Mixture-of-Experts fine-tuning that forgets less.

``import desmoe`` registers the experts implementation ``"desmoe"`` with transformers (a registry call);
``desmoe.patch(model)`` explicitly switches a loaded model to desmoe's ops.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .integrations.hf import UnsupportedModelError, patch, supported_model_types, unpatch


def _register_with_transformers() -> None:
    try:
        from .integrations.hf import register
    except ImportError:  # transformers missing: ops still usable
        return
    try:
        register()
    except ImportError:
        pass


_register_with_transformers()


def from_pretrained(path: str, **kwargs):
    """``(model, tokenizer)`` exactly as trained (desmoe-patched, with the ALR if it had one), from a run,
    checkpoint or model folder; see :func:`desmoe.export.from_pretrained`."""
    from .export import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)

__all__ = ["ops", "from_pretrained", "patch", "unpatch", "supported_model_types", "UnsupportedModelError",
           "__version__"]
