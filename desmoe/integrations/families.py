"""Per model family: which of a model's parameters (outside the routers and routed experts) are shared experts,
attention, or embeddings. The method layer freezes and unfreezes parameters by these kinds.

Shared experts are found by structure: each family names the modules that hold them (``shared_experts``,
``shared_expert`` + ``shared_expert_gate``, ``shared_mlp`` ...), and a parameter is a shared expert's when one
of its module path components is such a name (never a loose substring). Every supported family
(``hf.supported_model_types()``) has an entry in :data:`SHARED_EXPERT_MODULES`, ``()`` when it has none; a
test builds the tiny model of every family and checks the table against its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

# model_type -> names of the modules holding its shared (always-on, unrouted) experts, as transformers names them
SHARED_EXPERT_MODULES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "exaone_moe", "glm4_moe",
                     "glm4_moe_lite", "solar_open"), ("shared_experts",)),
    **dict.fromkeys(("qwen2_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"),
                    ("shared_expert", "shared_expert_gate")),
    **dict.fromkeys(("granitemoeshared", "hunyuan_v1_moe"), ("shared_mlp",)),
    **dict.fromkeys(("mixtral", "minimax", "qwen3_moe", "qwen3_vl_moe", "qwen3_vl_moe_text", "olmoe", "flex_olmo",
                     "granitemoe", "lfm2_moe", "gpt_oss", "phimoe"), ()),
}
# a model of no listed type: any name a listed family uses
ANY_SHARED_EXPERT_MODULE: tuple[str, ...] = tuple(sorted({n for v in SHARED_EXPERT_MODULES.values() for n in v}))


@dataclass(frozen=True)
class ParamNames:
    """``shared_experts``: module names (whole path components); the others: substrings (and prefixes) of
    parameter names. Checked in this order."""

    shared_experts: tuple[str, ...] = ANY_SHARED_EXPERT_MODULE
    attention: tuple[str, ...] = ("self_attn", ".attention.")
    embeddings: tuple[str, ...] = ("embed", ".lm_head.")
    embedding_prefixes: tuple[str, ...] = ("lm_head",)

    def kind(self, name: str) -> str:
        """``"shared_experts"``, ``"attention"``, ``"embeddings"`` or ``"other"`` for a parameter name."""
        if any(m in self.shared_experts for m in name.split(".")[:-1]):
            return "shared_experts"
        if any(s in name for s in self.attention):
            return "attention"
        if any(s in name for s in self.embeddings) or name.startswith(self.embedding_prefixes):
            return "embeddings"
        return "other"


DEFAULT_PARAM_NAMES = ParamNames()
FAMILY_PARAM_NAMES: dict[str, ParamNames] = {mt: ParamNames(shared_experts=mods)
                                              for mt, mods in SHARED_EXPERT_MODULES.items()}


def param_names(model_type: str | None) -> ParamNames:
    return FAMILY_PARAM_NAMES.get(model_type or "", DEFAULT_PARAM_NAMES)


def shared_expert_footnote() -> str:
    """The families and their shared-expert module names, in words (the README's per-phase table footnote)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for mt, mods in SHARED_EXPERT_MODULES.items():
        groups.setdefault(mods, []).append(mt)
    parts = [" + ".join(f"`{m}`" for m in mods) + " (" + ", ".join(sorted(mts)) + ")"
             for mods, mts in groups.items() if mods]
    return "; ".join(parts) + "; none in " + ", ".join(sorted(groups.get((), [])))
