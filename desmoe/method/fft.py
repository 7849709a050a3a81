"""Full fine-tuning: every parameter trains, every expert may move, no added loss."""
from __future__ import annotations

from .registry import PARAM_KINDS, Method, register_method


@register_method
class FFT(Method):
    name = "fft"

    def trainable_kinds(self, phase: str) -> set[str]:
        return set(PARAM_KINDS) - {"alr"}
