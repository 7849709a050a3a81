"""The model families desmoe drives, one table: :data:`MODEL_TYPES` (``model_type`` -> :class:`ModelFamily`).

Per family: which router class is replaced, how its routing spec is read off the router (the spec builders
below, each read off the family's router forward), where its weight and biases live, its experts variant, and
the modules holding its shared experts. :data:`REFUSED` names the fused-experts model types desmoe refuses and why;
:func:`family` and :func:`refusal_reason` are the lookups :func:`desmoe.integrations.hf.patch` uses.

Parameter kinds: which of a model's parameters (outside the routers and routed experts) are shared experts,
attention, or embeddings (:func:`param_names`); the method layer freezes and unfreezes parameters by these kinds.
Shared experts are found by structure: each family names the modules that hold them (``shared_experts``,
``shared_expert`` + ``shared_expert_gate``, ``shared_mlp`` ...), and a parameter is a shared expert's when one
of its module path components is such a name (never a loose substring). Every family states its shared-expert
modules (``()`` when it has none); a test builds the tiny model of every family and checks them against its
parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..layers import RouterSpec


class UnsupportedModelError(ValueError):
    """Raised by :func:`patch` for a model desmoe cannot drive."""



# --- router specs, one per HF router family (read off each router's forward) ------------------------------
# Each builder reads a RouterSpec off one of the model's router modules. What each family's stock router does
# is checked against the installed transformers' own router modules in tests/integrations/test_hf_routers.py.

def _softmax_topk(gate, config):
    # softmax(float32) -> topk -> renormalised -> float32 weights (Mixtral, MiniMax)
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True)


def _softmax_topk_norm_flag(gate, config):
    # softmax(float32) -> topk -> renormalised iff norm_topk_prob -> weights cast back to the logits dtype
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=bool(gate.norm_topk_prob),
                      weights_dtype="logits")


def _softmax_topk_norm(gate, config):
    # softmax(float32) -> topk -> always renormalised -> weights cast back to the logits dtype (Qwen3.5/VL)
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True, weights_dtype="logits")


def _topk_softmax(gate, config):
    # float32 logits from a model-dtype linear; topk of the logits, softmax over the K picked (== softmax, topk,
    # renormalise); weights in the input dtype
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True, logits_dtype="model_float",
                      weights_dtype="input")


def _hunyuan(gate, config):
    # logits in the router weight's dtype (float32 as built), softmax, topk, renormalised, logits dtype
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True, logits_dtype="weight",
                      weights_dtype="logits")


def _ernie(gate, config):
    # float32 logits (autocast off), softmax, topk of softmax + bias (moe_statics), weights unbiased, sum floored
    # at norm_min
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True,
                      renorm_min=float(gate.norm_min), logits_dtype="float32_exact", weights_dtype="input")


def _lfm2(gate, config):
    # sigmoid in the model dtype, topk of sigmoid (+ the block's expert_bias), renormalised (+1e-6), scaled
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, scoring="sigmoid",
                      renormalize=bool(gate.norm_topk_prob), renorm_eps=1e-6,
                      scaling=float(gate.routed_scaling_factor), weights_dtype="logits")


def _gpt_oss(gate, config):
    # logits = linear(x, weight, bias) in the model dtype; topk of the logits, softmax over the K picked in the
    # logits' dtype (== softmax, topk, renormalise); the bias is adopted as the logits bias (ModelFamily)
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, renormalize=True, weights_dtype="logits")


def _phimoe(gate, config):
    # SparseMixer picks exactly two experts (transformers' sparsemixer ignores other top_k): the spec states K and
    # E; the selection itself is the family's own function (_sparsemixer_select)
    return RouterSpec(top_k=2, num_experts=gate.num_experts, renormalize=True, weights_dtype="logits")


def _sparsemixer_select(gate):
    """Phi-3.5-MoE's SparseMixer, transformers' own function (from the stock router's module, resolved here at
    patch time so nothing is imported inside a forward that torch.compile traces), on the (ALR-adjusted) logits:
    eval, the top-2 by logit with masked-softmax weights; training, Gumbel sampling among the unmasked experts with
    the straight-through (Heun) multiplier gradient. The router's ``router_jitter_noise`` is its mask threshold."""
    import sys

    sparsemixer = sys.modules[type(gate).__module__].sparsemixer

    def select(router, logits_TE):
        return sparsemixer(logits_TE, jitter_eps=router.router_jitter_noise, training=router.training, top_k=2)

    return select


def _deepseek_v2(gate, config):
    method = gate.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(
            f"deepseek_v2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    # softmax; ineligible experts filled with 0.0 *in the scores*, so a masked expert picked weighs 0.0
    return RouterSpec(
        top_k=gate.top_k, num_experts=gate.num_experts, scoring="softmax", renormalize=False,
        n_group=gate.num_group if grouped else 1, topk_group=gate.topk_group if grouped else 1,
        group_score="max", masked_value=0.0, weights_from_masked=True, scaling=float(gate.routed_scaling_factor),
        logits_dtype="float32",
    )


def _deepseek_v3(gate, config):
    # sigmoid; + bias for selection; groups by top-2 sum; ineligible experts -inf; weights unbiased
    return RouterSpec(
        top_k=gate.top_k, num_experts=gate.num_experts, scoring="sigmoid", renormalize=bool(gate.norm_topk_prob),
        n_group=gate.num_group, topk_group=gate.topk_group, group_score="top2sum", renorm_eps=1e-20,
        scaling=float(gate.routed_scaling_factor), logits_dtype="float32",
    )



# --- the model-type registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    """How desmoe drives one ``model_type``'s MoE blocks.

    Attributes:
        router_class: class name of the model's router module (only routers of this class are replaced).
        spec: builds the :class:`RouterSpec` from one router module and the model config.
        routing: the routing family, in words (README table).
        router_attr: attribute of the MoE block that holds the router (``gate`` or ``router``).
        weight_path: where the router weight lives inside the router (kept there: same state-dict keys).
        bias_path: the selection bias inside the router, if the family has one.
        logits_bias_path: the bias of the router's logits linear, if it has one (gpt-oss).
        select: builds the family's own selection from the stock router, ``select(stock_router)`` ->
            ``fn(router, logits_TE) -> (weights_TK, ids_TK)``, for routing the spec cannot express (Phi-3.5-MoE's
            SparseMixer); None: :func:`desmoe.ops.topk_route` with the spec.
        router_attrs: attributes copied from the stock router onto desmoe's (the ones ``select`` reads; an
            ``input_jitter_noise`` one is applied as the family's router applies it).
        experts: the experts variant: ``"standard"`` (bias-free concatenated ``[E, 2I, D]`` gated MLP) or
            ``"gpt_oss"`` (biases, ``[E, D, 2I]`` interleaved gate/up, ``[E, I, D]`` down, clamped SwiGLU).
        shared_experts: names of the modules holding the family's shared (always-on, unrouted) experts, as
            transformers names them; ``()`` when it has none.
    """

    router_class: str
    spec: Callable[[nn.Module, object], RouterSpec]
    routing: str
    router_attr: str = "gate"
    weight_path: str = "weight"
    bias_path: str | None = None
    logits_bias_path: str | None = None
    select: Callable | None = None
    router_attrs: tuple[str, ...] = ()
    experts: str = "standard"
    shared_experts: tuple[str, ...] = ()




_SOFTMAX = "softmax top-k, renormalised"
_SOFTMAX_FLAG = "softmax top-k, renormalised iff norm_topk_prob"
_V3 = "sigmoid + bias, group-limited (top-2 sum), DeepSeek-V3"
_TOPK_SOFTMAX = "top-k logits, softmax over the K"
_E_BIAS = "e_score_correction_bias"
# shared-expert module names, as transformers names them
_SHARED = ("shared_experts",)
_QWEN_SHARED = ("shared_expert", "shared_expert_gate")
_SHARED_MLP = ("shared_mlp",)

# Experts of every type here are the standard fused gated layout (``gate_up_proj [E, 2I, D]``, ``down_proj
# [E, D, I]``) dispatched through ExpertsInterface, except gpt_oss's (experts="gpt_oss"); the patch refuses a
# module that is not its family's variant.
MODEL_TYPES: dict[str, ModelFamily] = {
    "mixtral": ModelFamily("MixtralTopKRouter", _softmax_topk, _SOFTMAX),
    "minimax": ModelFamily("MiniMaxTopKRouter", _softmax_topk, _SOFTMAX),
    "qwen2_moe": ModelFamily("Qwen2MoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG,
                             shared_experts=_QWEN_SHARED),
    "qwen3_moe": ModelFamily("Qwen3MoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "qwen3_next": ModelFamily("Qwen3NextTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG,
                              shared_experts=_QWEN_SHARED),
    "olmoe": ModelFamily("OlmoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "flex_olmo": ModelFamily("FlexOlmoTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "qwen3_5_moe": ModelFamily("Qwen3_5MoeTopKRouter", _softmax_topk_norm, _SOFTMAX, shared_experts=_QWEN_SHARED),
    "qwen3_5_moe_text": ModelFamily("Qwen3_5MoeTopKRouter", _softmax_topk_norm, _SOFTMAX,
                                    shared_experts=_QWEN_SHARED),
    "qwen3_vl_moe": ModelFamily("Qwen3VLMoeTextTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "qwen3_vl_moe_text": ModelFamily("Qwen3VLMoeTextTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "granitemoe": ModelFamily("GraniteMoeTopKRouter", _topk_softmax, _TOPK_SOFTMAX, router_attr="router"),
    "granitemoeshared": ModelFamily("GraniteMoeSharedTopKRouter", _topk_softmax, _TOPK_SOFTMAX,
                                    router_attr="router", shared_experts=_SHARED_MLP),
    "hunyuan_v1_moe": ModelFamily("HunYuanMoEV1Gate", _hunyuan, _SOFTMAX, weight_path="wg.weight",
                                  shared_experts=_SHARED_MLP),
    "ernie4_5_moe": ModelFamily("Ernie4_5_MoeTopKRouter", _ernie, "softmax + bias top-k, sum floored at norm_min",
                                bias_path="moe_statics.e_score_correction_bias", shared_experts=_SHARED),
    "lfm2_moe": ModelFamily("Lfm2MoeTopKRouter", _lfm2, "sigmoid (+ expert bias) top-k, renormalised, scaled"),
    "deepseek_v2": ModelFamily("DeepseekV2TopkRouter", _deepseek_v2, "softmax, group-limited (max), DeepSeek-V2",
                               shared_experts=_SHARED),
    "deepseek_v3": ModelFamily("DeepseekV3TopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS, shared_experts=_SHARED),
    "glm4_moe": ModelFamily("Glm4MoeTopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS, shared_experts=_SHARED),
    "glm4_moe_lite": ModelFamily("Glm4MoeLiteTopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS,
                                 shared_experts=_SHARED),
    "dots1": ModelFamily("Dots1TopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS, shared_experts=_SHARED),
    "exaone_moe": ModelFamily("ExaoneMoeTopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS, shared_experts=_SHARED),
    "solar_open": ModelFamily("SolarOpenTopkRouter", _deepseek_v3, _V3, bias_path=_E_BIAS, shared_experts=_SHARED),
    "gpt_oss": ModelFamily("GptOssTopKRouter", _gpt_oss, "linear + bias, top-k logits, softmax over the K",
                           router_attr="router", logits_bias_path="bias", experts="gpt_oss"),
    "phimoe": ModelFamily("PhimoeTopKRouter", _phimoe, "SparseMixer (top-2; the family's own selection)",
                          router_attr="router", select=_sparsemixer_select,
                          router_attrs=("router_jitter_noise", "input_jitter_noise")),
}

# Model types whose MoE block uses transformers' fused experts module but that desmoe refuses, and why (none now:
# gpt_oss and phimoe, once here, are supported).
REFUSED: dict[str, str] = {}


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)



def family(model_type: str | None) -> ModelFamily:
    """The registry entry of ``model_type``, or :class:`UnsupportedModelError` saying why not."""
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type in REFUSED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by desmoe.patch: {REFUSED[model_type]}")
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported by desmoe.patch: {refusal_reason(model_type)}; "
        f"supported: {', '.join(supported_model_types())}"
    )


_LAYOUT_FLAGS = {"has_gate=False": "no gate projection", "has_bias=True": "expert biases",
                 "is_transposed=True": "transposed weights", "is_concatenated=False": "an interleaved gate/up layout",
                 "has_post_expert_norm=True": "a post-expert norm"}


def refusal_reason(model_type: str) -> str:
    """Why desmoe refuses ``model_type``: the registry's reason, else what its transformers modeling file
    declares (an experts layout desmoe's ops do not implement, or a router not checked against a family)."""
    import importlib
    import inspect
    import re

    if model_type in REFUSED:
        return REFUSED[model_type]
    try:
        source = inspect.getsource(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"))
    except (ImportError, OSError, TypeError):
        return "it is not a transformers model type with fused experts that desmoe knows"
    decorators = re.findall(r"@use_experts_implementation(?:\(([^)]*)\))?", source)
    if not decorators:
        return "its MoE block does not use transformers' fused experts module"
    layout = [why for d in decorators for flag, why in _LAYOUT_FLAGS.items() if flag in d.replace(" ", "")]
    if layout:
        return f"its experts use {', '.join(sorted(set(layout)))}, which desmoe's experts ops do not implement"
    routers_ = sorted(set(re.findall(r"^class (\w*(?:Router|Gate)\w*)\(", source, re.M))) or ["its router"]
    return (f"its router ({', '.join(routers_)}) has not been checked against desmoe's routing families "
            "(tests/integrations/test_hf_routers.py), so desmoe will not guess its semantics")



# --- parameter kinds --------------------------------------------------------------------------------------

# model_type -> names of the modules holding its shared experts (the table's ``shared_experts``)
SHARED_EXPERT_MODULES: dict[str, tuple[str, ...]] = {mt: fam.shared_experts for mt, fam in MODEL_TYPES.items()}
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


def param_names(model_type: str | None) -> ParamNames:
    """The parameter kinds of ``model_type``'s models; a model of no listed type: :data:`DEFAULT_PARAM_NAMES`."""
    fam = MODEL_TYPES.get(model_type or "")
    return DEFAULT_PARAM_NAMES if fam is None else ParamNames(shared_experts=fam.shared_experts)


def shared_expert_footnote() -> str:
    """The families and their shared-expert module names, in words (the README's per-phase table footnote)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for mt, mods in SHARED_EXPERT_MODULES.items():
        groups.setdefault(mods, []).append(mt)
    # the names most families use first
    named = sorted(((mods, mts) for mods, mts in groups.items() if mods), key=lambda g: (-len(g[1]), g[0]))
    parts = [" + ".join(f"`{m}`" for m in mods) + " (" + ", ".join(sorted(mts)) + ")" for mods, mts in named]
    return "; ".join(parts) + "; none in " + ", ".join(sorted(groups.get((), [])))
