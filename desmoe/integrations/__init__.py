"""Integrations with other libraries (Hugging Face transformers)."""
from .hf import UnsupportedModelError, moe_blocks, patch, register, routers, supported_model_types, unpatch

__all__ = ["UnsupportedModelError", "patch", "unpatch", "register", "routers", "moe_blocks", "supported_model_types"]

