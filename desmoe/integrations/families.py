"""Per model family: which of a model's parameters (outside the routers and routed experts) are shared experts,
attention, or embeddings. The method layer freezes and unfreezes parameters by these kinds.

Every supported family (``hf.supported_model_types()``) names them the same way today, so one rule set serves
all; a family that names them differently adds its own :class:`ParamNames` to ``FAMILY_PARAM_NAMES``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamNames:
    """Substrings (and prefixes) of parameter names that mark each kind; checked in this order."""

    shared_experts: tuple[str, ...] = ("shared_expert",)
    attention: tuple[str, ...] = ("self_attn", ".attention.")
    embeddings: tuple[str, ...] = ("embed", ".lm_head.")
    embedding_prefixes: tuple[str, ...] = ("lm_head",)

    def kind(self, name: str) -> str:
        """``"shared_experts"``, ``"attention"``, ``"embeddings"`` or ``"other"`` for a parameter name."""
        if any(s in name for s in self.shared_experts):
            return "shared_experts"
        if any(s in name for s in self.attention):
            return "attention"
        if any(s in name for s in self.embeddings) or name.startswith(self.embedding_prefixes):
            return "embeddings"
        return "other"


DEFAULT_PARAM_NAMES = ParamNames()
FAMILY_PARAM_NAMES: dict[str, ParamNames] = {}  # model_type -> names, where a family differs from the default


def param_names(model_type: str | None) -> ParamNames:
    return FAMILY_PARAM_NAMES.get(model_type or "", DEFAULT_PARAM_NAMES)
