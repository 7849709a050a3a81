"""Hugging Face ``transformers`` (v5) drop-in: ``desmoe.patch(model)``.

``register()`` (called by ``import desmoe``) adds the experts implementation ``"desmoe"`` to transformers'
``ExpertsInterface`` — a registry call, not a patch. ``patch(model)`` then, explicitly:

1. checks the model type is supported (else :class:`UnsupportedModelError` listing what is);
2. switches every experts module to ``"desmoe"`` (``model.set_experts_implementation``), recording the
   backend and activation on each module;
3. replaces each MoE block's router with :class:`desmoe.layers.TopKRouter`, which shares the router's
   Parameter (no weight copies; state-dict keys unchanged).

``unpatch(model)`` restores the original routers and experts implementation.
"""
from __future__ import annotations

import torch.nn as nn

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

def _softmax_router(gate: nn.Module, config, *, renormalize: bool, weights_dtype: str) -> RouterSpec:
    return RouterSpec(top_k=gate.top_k, num_experts=gate.num_experts, scoring="softmax",
                      renormalize=renormalize, weights_dtype=weights_dtype)


def _mixtral(gate, config):
    # softmax(logits.float()) -> topk -> always renormalised; float32 weights
    return _softmax_router(gate, config, renormalize=True, weights_dtype="float32")


def _qwen_like(gate, config):
    # softmax(float) -> topk -> renormalised iff norm_topk_prob; weights cast back to the logits dtype
    return _softmax_router(gate, config, renormalize=bool(gate.norm_topk_prob), weights_dtype="logits")


def _deepseek_v2(gate, config):
    method = gate.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"deepseek_v2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    return RouterSpec(
        top_k=gate.top_k, num_experts=gate.num_experts, scoring="softmax", renormalize=False,
        n_group=gate.num_group if grouped else 1, topk_group=gate.topk_group if grouped else 1,
        group_score="max", masked_value=0.0, scaling=float(gate.routed_scaling_factor), fp32_logits=True,
    )


def _deepseek_v3(gate, config):
    return RouterSpec(
        top_k=gate.top_k, num_experts=gate.num_experts, scoring="sigmoid", renormalize=bool(gate.norm_topk_prob),
        n_group=gate.num_group, topk_group=gate.topk_group, group_score="top2sum", renorm_eps=1e-20,
        scaling=float(gate.routed_scaling_factor), fp32_logits=True,
    )


# model_type -> (router class name, spec builder). Experts of all of these are the standard fused SwiGLU
# layout (`gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`) dispatched through ExpertsInterface.
_MODEL_TYPES = {
    "mixtral": ("MixtralTopKRouter", _mixtral),
    "qwen2_moe": ("Qwen2MoeTopKRouter", _qwen_like),
    "qwen3_moe": ("Qwen3MoeTopKRouter", _qwen_like),
    "olmoe": ("OlmoeTopKRouter", _qwen_like),
    "flex_olmo": ("FlexOlmoTopKRouter", _qwen_like),
    "deepseek_v2": ("DeepseekV2TopkRouter", _deepseek_v2),
    "deepseek_v3": ("DeepseekV3TopkRouter", _deepseek_v3),
    "glm4_moe": ("Glm4MoeTopkRouter", _deepseek_v3),
    "glm4_moe_lite": ("Glm4MoeLiteTopkRouter", _deepseek_v3),
    "dots1": ("Dots1TopkRouter", _deepseek_v3),
    "exaone_moe": ("ExaoneMoeTopkRouter", _deepseek_v3),
    "solar_open": ("SolarOpenTopkRouter", _deepseek_v3),
    "minimax": ("MiniMaxTopKRouter", _mixtral),
    "qwen3_next": ("Qwen3NextTopKRouter", _qwen_like),
}


def supported_model_types() -> list[str]:
    return sorted(_MODEL_TYPES)


def _experts_modules(model: nn.Module):
    for name, mod in model.named_modules():
        if hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and hasattr(mod, "has_gate"):
            yield name, mod


def _check_experts_layout(name: str, mod: nn.Module) -> None:
    problems = []
    if not mod.has_gate:
        problems.append("no gate projection")
    if getattr(mod, "has_bias", False):
        problems.append("expert biases")
    if getattr(mod, "is_transposed", False):
        problems.append("transposed weights")
    if not getattr(mod, "is_concatenated", True):
        problems.append("interleaved gate/up layout")
    if getattr(mod, "has_post_expert_norm", False):  # transformers >= 5.2x: a norm after each expert
        problems.append("a post-expert norm")
    if problems:
        raise UnsupportedModelError(f"experts module {name!r} uses {', '.join(problems)}, which desmoe does not support")


def patch(model: nn.Module, backend: str = "auto", *, router: bool = True) -> nn.Module:
    """Switch a loaded HF MoE model to desmoe's experts and router ops, in place; returns the model.

    Args:
        model: a ``transformers`` model of a supported ``model_type`` (see :func:`supported_model_types`).
        backend: ``"auto"`` (Triton on CUDA, else reference), ``"triton"`` or ``"reference"``; the
            ``DESMOE_BACKEND`` environment variable overrides ``"auto"``.
        router: also replace routers with :class:`desmoe.layers.TopKRouter` (needed by DES-MoE's ALR).
    """
    from ..ops import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by desmoe.patch; supported: {', '.join(supported_model_types())}"
        )
    router_cls_name, spec_fn = _MODEL_TYPES[model_type]
    experts = list(_experts_modules(model))
    if not experts:
        raise UnsupportedModelError(f"no fused experts modules found in this {model_type} model")
    for name, mod in experts:
        _check_experts_layout(name, mod)
        mod._desmoe_activation = layers.activation_name(mod.config.hidden_act)
    register()
    resolved = None if backend == "auto" else backend
    for _, mod in experts:
        mod._desmoe_backend = resolved
    if model.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        model._desmoe_previous_experts_implementation = model.config._experts_implementation
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if router:
        for parent in list(model.modules()):
            gate = getattr(parent, "gate", None)
            if gate is None:
                continue
            if isinstance(gate, TopKRouter):
                gate.backend = resolved
                continue
            if type(gate).__name__ != router_cls_name:
                continue
            new = _router_class(type(gate))(gate.weight, spec_fn(gate, model.config),
                                            bias_E=getattr(gate, "e_score_correction_bias", None), backend=resolved)
            # transformers' output-capturing hooks (router logits for the aux loss) may already sit on the
            # original router: carry them over so output_router_logits keeps working
            new._forward_hooks.update(gate._forward_hooks)
            new._forward_pre_hooks.update(gate._forward_pre_hooks)
            # kept for unpatch(); stored outside nn.Module's registry so it adds no state-dict keys
            new.__dict__["_desmoe_original"] = gate
            parent.gate = new
    return model


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


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original routers back, previous experts implementation restored."""
    for parent in list(model.modules()):
        gate = getattr(parent, "gate", None)
        if isinstance(gate, TopKRouter) and "_desmoe_original" in gate.__dict__:
            original = gate.__dict__["_desmoe_original"]
            original._forward_hooks.update(gate._forward_hooks)  # hooks installed while patched
            parent.gate = original
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
        gate, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        if isinstance(gate, TopKRouter) and experts is not None and hasattr(experts, "gate_up_proj"):
            out.append((name, gate, experts))
    return out
