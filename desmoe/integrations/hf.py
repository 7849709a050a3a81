"""Hugging Face ``transformers`` (v5) drop-in: ``desmoe.patch(model)``.

``register()`` (called by ``import desmoe``) adds the experts implementation ``"desmoe"`` to transformers'
``ExpertsInterface`` — a registry call, not a patch. ``patch(model)`` then, explicitly:

1. checks the model type is supported (else :class:`UnsupportedModelError` listing what is);
2. switches every experts module to ``"desmoe"`` (``model.set_experts_implementation``), recording the
   backend and activation on each module;
3. replaces each MoE block's router with :class:`desmoe.layers.TopKRouter`, which adopts the router's
   parameters, buffers and submodules (no weight copies; state-dict keys unchanged).

The registry :data:`MODEL_TYPES` says, per ``model_type``, which router class is replaced, how its routing
spec is read and where its weight and bias live; :data:`REFUSED` names the fused-experts model types desmoe
refuses and why.

``unpatch(model)`` restores the original routers and experts implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import layers
from ..layers import RouterSpec, TopKRouter

EXPERTS_IMPLEMENTATION = "desmoe"


class UnsupportedModelError(ValueError):
    """Raised by :func:`patch` for a model desmoe cannot drive."""


def register() -> None:
    """Register ``"desmoe"`` with transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, layers.desmoe_experts_forward)


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
        raise UnsupportedModelError(f"deepseek_v2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
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


_SOFTMAX = "softmax top-k, renormalised"
_SOFTMAX_FLAG = "softmax top-k, renormalised iff norm_topk_prob"
_V3 = "sigmoid + bias, group-limited (top-2 sum), DeepSeek-V3"

# Experts of every type here are the standard fused gated layout (``gate_up_proj [E, 2I, D]``, ``down_proj
# [E, D, I]``) dispatched through ExpertsInterface, except gpt_oss's (experts="gpt_oss"); _check_experts_layout
# refuses a module that is not its family's variant.
MODEL_TYPES: dict[str, ModelFamily] = {
    "mixtral": ModelFamily("MixtralTopKRouter", _softmax_topk, _SOFTMAX),
    "minimax": ModelFamily("MiniMaxTopKRouter", _softmax_topk, _SOFTMAX),
    "qwen2_moe": ModelFamily("Qwen2MoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "qwen3_moe": ModelFamily("Qwen3MoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "qwen3_next": ModelFamily("Qwen3NextTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "olmoe": ModelFamily("OlmoeTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "flex_olmo": ModelFamily("FlexOlmoTopKRouter", _softmax_topk_norm_flag, _SOFTMAX_FLAG),
    "qwen3_5_moe": ModelFamily("Qwen3_5MoeTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "qwen3_5_moe_text": ModelFamily("Qwen3_5MoeTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "qwen3_vl_moe": ModelFamily("Qwen3VLMoeTextTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "qwen3_vl_moe_text": ModelFamily("Qwen3VLMoeTextTopKRouter", _softmax_topk_norm, _SOFTMAX),
    "granitemoe": ModelFamily("GraniteMoeTopKRouter", _topk_softmax, "top-k logits, softmax over the K",
                              router_attr="router"),
    "granitemoeshared": ModelFamily("GraniteMoeSharedTopKRouter", _topk_softmax, "top-k logits, softmax over the K",
                                    router_attr="router"),
    "hunyuan_v1_moe": ModelFamily("HunYuanMoEV1Gate", _hunyuan, _SOFTMAX, weight_path="wg.weight"),
    "ernie4_5_moe": ModelFamily("Ernie4_5_MoeTopKRouter", _ernie, "softmax + bias top-k, sum floored at norm_min",
                                bias_path="moe_statics.e_score_correction_bias"),
    "lfm2_moe": ModelFamily("Lfm2MoeTopKRouter", _lfm2, "sigmoid (+ expert bias) top-k, renormalised, scaled"),
    "deepseek_v2": ModelFamily("DeepseekV2TopkRouter", _deepseek_v2, "softmax, group-limited (max), DeepSeek-V2"),
    "deepseek_v3": ModelFamily("DeepseekV3TopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "glm4_moe": ModelFamily("Glm4MoeTopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "glm4_moe_lite": ModelFamily("Glm4MoeLiteTopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "dots1": ModelFamily("Dots1TopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "exaone_moe": ModelFamily("ExaoneMoeTopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "solar_open": ModelFamily("SolarOpenTopkRouter", _deepseek_v3, _V3, bias_path="e_score_correction_bias"),
    "gpt_oss": ModelFamily("GptOssTopKRouter", _gpt_oss, "linear + bias, top-k logits, softmax over the K",
                           router_attr="router", logits_bias_path="bias", experts="gpt_oss"),
    "phimoe": ModelFamily("PhimoeTopKRouter", _phimoe, "SparseMixer (top-2; the family's own selection)",
                          router_attr="router", select=_sparsemixer_select,
                          router_attrs=("router_jitter_noise", "input_jitter_noise")),
}
_MODEL_TYPES = MODEL_TYPES  # the name the upstream-test kit's plugin reads

# Model types whose MoE block uses transformers' fused experts module but that desmoe refuses, and why (none now:
# gpt_oss and phimoe, once here, are supported).
REFUSED: dict[str, str] = {}

MXFP4_ADVICE = ("load it dequantized: `from transformers import Mxfp4Config; AutoModelForCausalLM.from_pretrained("
                "name, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)` (the fine-tuning "
                "recipes' way), then desmoe.patch(model)")


def _check_not_quantized(model: nn.Module) -> None:
    """A gpt-oss model whose experts are still MXFP4 (transformers' ``Mxfp4GptOssExperts``: packed uint8 blocks
    and scales, no gradients) cannot run desmoe's experts: :class:`UnsupportedModelError` saying how to load it."""
    quantized = [n for n, m in model.named_modules() if type(m).__name__.startswith("Mxfp4")]
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    dequantize = qc.get("dequantize", False) if isinstance(qc, dict) else getattr(qc, "dequantize", False)
    method = getattr(method, "value", method)
    if quantized or (method == "mxfp4" and not dequantize and any(
            getattr(getattr(m, "gate_up_proj", None), "dtype", None) == torch.uint8 for m in model.modules())):
        where = f" (e.g. {quantized[0]!r})" if quantized else ""
        raise UnsupportedModelError(
            f"this model's experts are MXFP4-quantized{where}: desmoe trains and runs dequantized experts only; "
            + MXFP4_ADVICE)


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def _liger_experts(mod: nn.Module) -> bool:
    """Liger-Kernel's ``LigerExperts`` (swapped in for a transformers experts class): HF's fused layout
    (``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``), SiLU only, no ``has_gate`` flags."""
    return (type(mod).__module__.startswith("liger_kernel.") and getattr(mod, "gate_up_proj", None) is not None
            and getattr(mod, "down_proj", None) is not None and mod.gate_up_proj.dim() == 3)


def _experts_modules(model: nn.Module):
    for name, mod in model.named_modules():
        if (hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and hasattr(mod, "has_gate")) \
                or _liger_experts(mod):
            yield name, mod


def _custom_gate(mod: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # older transformers: no per-class gate hook
        return False
    gate = getattr(type(mod), "_apply_gate", _default_apply_gate)
    return gate is not _default_apply_gate


_GPT_OSS_VARIANT = {"has_bias": True, "transposed": True, "interleaved": True, "activation": "clamped_swiglu"}


def _check_experts_layout(name: str, mod: nn.Module, fam: ModelFamily | None = None) -> dict:
    """The experts module's variant (:func:`desmoe.layers.experts_variant`) if it is its family's; else
    :class:`UnsupportedModelError` naming what desmoe does not support."""
    expected = _GPT_OSS_VARIANT if fam is not None and fam.experts == "gpt_oss" else {}
    try:
        variant = layers.experts_variant(mod)
    except ValueError as e:
        raise UnsupportedModelError(f"{e} (at {name!r})") from None
    if variant == expected:
        return variant
    problems = []
    for key, why in (("has_bias", "expert biases"), ("transposed", "transposed weights"),
                     ("interleaved", "interleaved gate/up layout")):
        if variant.get(key) and not expected.get(key):
            problems.append(why)
        elif expected.get(key) and not variant.get(key):
            problems.append(f"no {why} (gpt_oss's experts have them)")
    if variant.get("activation") != expected.get("activation"):
        problems.append(f"the gated activation {variant.get('activation', 'act(gate) * up')!r} (its family's: "
                        f"{expected.get('activation', 'act(gate) * up')!r})")
    raise UnsupportedModelError(f"experts module {name!r} uses {', '.join(problems)}, which desmoe does not support "
                                "for this model type")


def family(model_type: str | None) -> ModelFamily:
    """The registry entry of ``model_type``, or :class:`UnsupportedModelError` saying why not."""
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported by desmoe.patch: {REFUSED[model_type]}")
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


def _activation(mod: nn.Module) -> str:
    """The experts' gate activation: their ``act_fn`` when it is plain SiLU (LFM2-MoE hard-codes ``F.silu``),
    else the config's ``hidden_act``."""
    act = getattr(mod, "act_fn", None)
    if act is F.silu or isinstance(act, nn.SiLU) or _liger_experts(mod):  # LigerExperts: SiLU only
        return "silu"
    return layers.activation_name(mod.config.hidden_act)


def patch(model: nn.Module, backend: str = "auto", *, router: bool = True) -> nn.Module:
    """Switch a loaded HF MoE model to desmoe's experts and router ops, in place; returns the model.

    Args:
        model: a ``transformers`` model of a supported ``model_type`` (see :func:`supported_model_types`).
        backend: ``"auto"`` (Triton on CUDA, else the grouped-GEMM path), ``"triton"``, ``"grouped"`` or
            ``"reference"``; the ``DESMOE_BACKEND`` environment variable overrides ``"auto"``.
        router: also replace routers with :class:`desmoe.layers.TopKRouter` (needed by DES-MoE's ALR).
    """
    from ..ops import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    fam = family(model_type)
    _check_not_quantized(model)
    experts = list(_experts_modules(model))
    if not experts:
        raise UnsupportedModelError(f"no fused experts modules found in this {model_type} model")
    for name, mod in experts:
        mod._desmoe_variant = _check_experts_layout(name, mod, fam)
        mod._desmoe_activation = mod._desmoe_variant.get("activation") or _activation(mod)
    register()
    resolved = None if backend == "auto" else backend
    for _, mod in experts:
        mod._desmoe_backend = resolved
    if model.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        model._desmoe_previous_experts_implementation = model.config._experts_implementation
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    take_over_experts(model, experts)
    if router:
        for parent in list(model.modules()):
            gate = getattr(parent, fam.router_attr, None)
            if isinstance(gate, TopKRouter):
                gate.backend = resolved
            elif gate is not None and type(gate).__name__ == fam.router_class:
                setattr(parent, fam.router_attr, _replace_router(gate, fam, model.config, resolved))
    return model


def _returns_index_first(gate: nn.Module, weight) -> bool:
    """Whether this router returns ``(ids, weights, logits)`` rather than ``(logits, weights, ids)`` (the order
    changed across transformers releases for some families): one probe call on a single token, hooks bypassed."""
    args = (weight.new_zeros(1, weight.shape[1]),)
    if getattr(gate, "use_expert_bias", False):  # LFM2-MoE: the block passes its selection bias in
        args += (weight.new_zeros(weight.shape[0], dtype=torch.float32),)
    with torch.no_grad():
        out = type(gate).forward(gate, *args)
    return not out[0].is_floating_point()


def _replace_router(gate: nn.Module, fam: ModelFamily, config, backend) -> TopKRouter:
    weight = gate.get_parameter(fam.weight_path)
    bias = getattr(gate, "e_score_correction_bias", None) if fam.bias_path == "e_score_correction_bias" else None
    new = _router_class(type(gate))(weight, fam.spec(gate, config), bias_E=bias, backend=backend,
                                    weight_path=fam.weight_path, bias_path=fam.bias_path,
                                    logits_bias_path=fam.logits_bias_path,
                                    select=None if fam.select is None else fam.select(gate),
                                    input_jitter_noise=float(getattr(gate, "input_jitter_noise", 0.0) or 0.0))
    for attr in fam.router_attrs:  # what the family's own selection reads off its router
        setattr(new, attr, getattr(gate, attr))
    new.train(gate.training)  # a model patched in eval mode routes as in eval (SparseMixer samples in training)
    new.index_first = _returns_index_first(gate, weight)
    # adopt the original's submodules, parameters and buffers (the same objects): state-dict keys unchanged
    for name, child in gate.named_children():
        new.add_module(name, child)
    for name, p in gate._parameters.items():
        new._parameters.setdefault(name, p)
    for name, b in gate._buffers.items():
        new._buffers.setdefault(name, b)
    # transformers' output-capturing hooks (router logits for the aux loss) may already sit on the original
    # router: carry them over so output_router_logits keeps working
    new._forward_hooks.update(gate._forward_hooks)
    new._forward_pre_hooks.update(gate._forward_pre_hooks)
    # kept for unpatch(); stored outside nn.Module's registry so it adds no state-dict keys
    new.__dict__["_desmoe_original"] = gate
    return new


_ROUTER_CLASSES: dict[type, type] = {}


def _router_class(hf_router_cls: type) -> type:
    """``TopKRouter`` that is also an instance of the model's own router class.

    transformers records router logits for the load-balancing loss with hooks placed on modules matched by
    ``isinstance(module, <ModelTopKRouter>)``; the mixed-in class keeps that working. ``TopKRouter`` comes first
    in the MRO, so its ``__init__`` and ``forward`` are the ones that run.
    """
    cls = _ROUTER_CLASSES.get(hf_router_cls)
    if cls is None:
        cls = type(f"DesmoeRouter_{hf_router_cls.__name__}", (TopKRouter, hf_router_cls), {"__module__": __name__})
        _ROUTER_CLASSES[hf_router_cls] = cls
    return cls


def _router_slots(model: nn.Module):
    """``(parent, attribute, router)`` for every patched router."""
    for parent in list(model.modules()):
        for attr in ("gate", "router"):
            r = getattr(parent, attr, None)
            if isinstance(r, TopKRouter):
                yield parent, attr, r


def _describe(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _dispatches_to_desmoe(mod: nn.Module) -> bool:
    """The module's class forward is transformers' ``ExpertsInterface`` dispatch (set to ``"desmoe"``)."""
    forward = getattr(type(mod), "forward", None)  # through the MRO: FSDP2's FSDP<cls> subclasses keep it
    return (getattr(forward, "__module__", "").startswith("transformers.")
            and getattr(getattr(mod, "config", None), "_experts_implementation", None) == EXPERTS_IMPLEMENTATION)


def take_over_experts(model: nn.Module, experts=None) -> list[str]:
    """Make desmoe's experts forward the one that runs on every experts module, whatever another library bound
    there (Liger-Kernel binds its fused-MoE ``forward`` on each instance, or swaps the class): an instance-level
    ``forward`` (and the ``_get_name`` Liger binds beside it) is removed, and a module whose class forward is not
    transformers' dispatch gets desmoe's forward bound on the instance. Returns one line per module taken over
    (also warned); the rest of such a library (norms, RoPE, the fused linear cross-entropy) stays in place."""
    import types
    import warnings

    taken = []
    for name, mod in experts if experts is not None else _experts_modules(model):
        bound = mod.__dict__.get("forward")
        if bound is not None and getattr(bound, "__func__", None) is layers.desmoe_experts_forward:
            continue
        what = []
        if bound is not None:
            what.append(f"a forward bound on the instance ({_describe(bound)})")
            del mod.__dict__["forward"]
            mod.__dict__.pop("_get_name", None)
        if not _dispatches_to_desmoe(mod):
            what.append(f"the class forward of {type(mod).__module__}.{type(mod).__qualname__}")
            mod.__dict__["forward"] = types.MethodType(layers.desmoe_experts_forward, mod)
        if what:
            taken.append(f"{name}: replaced {' and '.join(what)} with desmoe's experts forward")
    if taken:
        warnings.warn("desmoe.patch took over experts modules another library had patched: " + "; ".join(taken[:3])
                      + (f"; and {len(taken) - 3} more" if len(taken) > 3 else ""), stacklevel=3)
    return taken


def foreign_experts_forward(mod: nn.Module) -> str | None:
    """What would run instead of desmoe's experts forward on ``mod`` (a forward bound after :func:`patch`, a
    swapped class, another experts implementation), or None when desmoe's runs."""
    bound = mod.__dict__.get("forward")
    if bound is not None:
        if getattr(bound, "__func__", None) is layers.desmoe_experts_forward:
            return None
        return f"a forward bound on the instance: {_describe(bound)}"
    if not _dispatches_to_desmoe(mod):
        impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
        return (f"the class forward of {type(mod).__module__}.{type(mod).__qualname__} "
                f"(experts implementation {impl!r})")
    return None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original routers back, previous experts implementation restored."""
    for parent, attr, gate in list(_router_slots(model)):
        if "_desmoe_original" in gate.__dict__:
            original = gate.__dict__["_desmoe_original"]
            original._forward_hooks.update(gate._forward_hooks)  # hooks installed while patched
            setattr(parent, attr, original)
    prev = getattr(model, "_desmoe_previous_experts_implementation", None)
    if prev is not None:
        model.set_experts_implementation(prev)
        del model._desmoe_previous_experts_implementation
    return model


def routers(model: nn.Module) -> list[TopKRouter]:
    """The patched routers in layer order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, router, experts)`` for every patched MoE block, in layer order."""
    out = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        for attr in ("gate", "router"):
            gate = getattr(mod, attr, None)
            if isinstance(gate, TopKRouter) and experts is not None and hasattr(experts, "gate_up_proj"):
                out.append((name, gate, experts))
    return out


# --- the README's model-type table, generated from the registry -------------------------------------------

README_BEGIN = "<!-- model-types:begin (generated: python -m desmoe.integrations.hf --update-readme) -->"
README_END = "<!-- model-types:end -->"


def _paths(model_type: str) -> tuple[str, str]:
    """(CUDA path, CPU path) for the tiny model of ``model_type`` (its default config's routing spec and
    experts activation decide what the kernels carry)."""
    from ..ops import kernel_routes
    from .tiny import COVERED_BY, tiny_model

    model = tiny_model(COVERED_BY.get(model_type, model_type))
    patch(model, backend="reference")
    spec = routers(model)[0].spec
    activation = next(mod for _, mod in _experts_modules(model))._desmoe_activation
    fam = MODEL_TYPES[model.config.model_type]
    if fam.select is not None:
        routing = "family's own selection (transformers')"
    else:
        routing = "Triton routing" if kernel_routes(spec) else "reference routing"
    if fam.experts == "gpt_oss":
        experts = "grouped experts (biases, clamped SwiGLU)"
    else:
        experts = "Triton experts" if activation == "silu" else f"grouped experts ({activation})"
    cpu_routing = routing if fam.select is not None else "reference routing"
    cpu_experts = "grouped experts (biases, clamped SwiGLU)" if fam.experts == "gpt_oss" else "grouped experts"
    return f"{routing}, {experts}", f"{cpu_routing}, {cpu_experts}"


def model_type_table() -> str:
    """Markdown: one row per supported model type (router, routing family, kernel paths, masks), then the
    model types refused with their reason."""
    lines = ["| model type | router replaced | routing family | CUDA path | CPU path | DES-MoE masks |",
             "|---|---|---|---|---|---|"]
    for mt in supported_model_types():
        fam = MODEL_TYPES[mt]
        cuda, cpu = _paths(mt)
        lines.append(f"| `{mt}` | `{fam.router_attr}`: `{fam.router_class}` | {fam.routing} | {cuda} | {cpu} "
                     f"| per expert, per (token, expert) |")
    if REFUSED:
        lines += ["", "| refused model type | why |", "|---|---|"]
        lines += [f"| `{mt}` | {why} |" for mt, why in sorted(REFUSED.items())]
    return "\n".join(lines)


def update_readme(path: str) -> bool:
    """Rewrite the generated table between the README markers; returns whether the file changed."""
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN!r} ... {README_END!r} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{model_type_table()}\n{README_END}{tail}"
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Print (or write into the README) the model-type table.")
    ap.add_argument("--update-readme", nargs="?", const="docs/families.md", default=None, metavar="PATH")
    args = ap.parse_args()
    if args.update_readme:
        print("updated" if update_readme(args.update_readme) else "unchanged", args.update_readme)
    else:
        print(model_type_table())
