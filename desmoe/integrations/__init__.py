"""Integrations with other libraries (Hugging Face transformers)."""
from .hf import UnsupportedModelError, moe_blocks, patch, register, routers, supported_model_types, unpatch

__all__ = ["UnsupportedModelError", "patch", "unpatch", "register", "routers", "moe_blocks", "supported_model_types"]


def __getattr__(name):
    # The transformers.Trainer adapter lives beside the training loop (desmoe.train.hf_trainer); this lazy alias
    # keeps `from desmoe.integrations import DesMoETrainer` working without an import-time dependency on train.
    if name in ("DesMoETrainer", "DesMoECallback", "StreamDataset"):
        from ..train import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
