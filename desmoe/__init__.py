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

__all__ = ["ops", "patch", "unpatch", "supported_model_types", "UnsupportedModelError", "__version__"]
