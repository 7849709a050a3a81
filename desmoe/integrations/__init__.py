"""Integrations with other libraries (Hugging Face transformers)."""
from .hf import UnsupportedModelError, moe_blocks, patch, register, routers, supported_model_types, unpatch

__all__ = ["UnsupportedModelError", "patch", "unpatch", "register", "routers", "moe_blocks", "supported_model_types"]


def __getattr__(name):  # lazy: the Trainer integration imports transformers.Trainer only when asked for
    if name in ("DesMoETrainer", "DesMoECallback", "StreamDataset"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
