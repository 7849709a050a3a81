"""Full fine-tuning with the routers frozen (routing stays the base model's)."""
from __future__ import annotations

from .registry import PARAM_KINDS, Method, register_method


@register_method
class FrozenRouter(Method):
    name = "frozen_router"

    def trainable_kinds(self, phase: str) -> set[str]:
        return set(PARAM_KINDS) - {"alr", "router"}
