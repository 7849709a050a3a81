"""Controls that separate DES-MoE's parts: what each method's gains and forgetting come from.

- ``experts_only``: every routed expert trains, nothing else (no router, shared experts, attention, embeddings,
  norms): DES-MoE without its masks, its ALR and its router training — the expert capacity alone.
- ``fft_attention_frozen``: full fine-tuning except attention: how much of FFT's gain (and forgetting) the
  attention weights carry.
"""
from __future__ import annotations

from .registry import PARAM_KINDS, Method, register_method


@register_method
class ExpertsOnly(Method):
    name = "experts_only"

    def trainable_kinds(self, phase: str) -> set[str]:
        return {"experts"}


@register_method
class FFTAttentionFrozen(Method):
    name = "fft_attention_frozen"

    def trainable_kinds(self, phase: str) -> set[str]:
        return set(PARAM_KINDS) - {"alr", "attention"}
