"""What :func:`desmoe.integrations.hf.patch` swaps in a model, and finding it again.

Experts: the fused experts modules found (transformers' and Liger-Kernel's), their layout checked against the
family's variant, their activation read; :func:`take_over_experts` makes desmoe's experts forward the one that runs
whatever another library bound there. Routers: each stock router replaced by a :class:`desmoe.layers.TopKRouter`
that is also an instance of the stock class and adopts its parameters, buffers, submodules and hooks (no weight
copies; state-dict keys unchanged). :func:`routers` and :func:`moe_blocks` find the patched ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import layers
from ..layers import TopKRouter
from .experts_interface import dispatches_to_desmoe
from .families import ModelFamily, UnsupportedModelError

# --- experts ----------------------------------------------------------------------------------------------

MXFP4_ADVICE = ("load it dequantized: `from transformers import Mxfp4Config; AutoModelForCausalLM.from_pretrained("
                "name, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)` (the fine-tuning "
                "recipes' way), then desmoe.patch(model)")


def check_not_quantized(model: nn.Module) -> None:
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


def _liger_experts(mod: nn.Module) -> bool:
    """Liger-Kernel's ``LigerExperts`` (swapped in for a transformers experts class): HF's fused layout
    (``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``), SiLU only, no ``has_gate`` flags."""
    return (type(mod).__module__.startswith("liger_kernel.") and getattr(mod, "gate_up_proj", None) is not None
            and getattr(mod, "down_proj", None) is not None and mod.gate_up_proj.dim() == 3)


def experts_modules(model: nn.Module):
    """``(name, module)`` for every fused experts module (transformers' or Liger-Kernel's)."""
    for name, mod in model.named_modules():
        if (hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and hasattr(mod, "has_gate")) \
                or _liger_experts(mod):
            yield name, mod


_GPT_OSS_VARIANT = {"has_bias": True, "transposed": True, "interleaved": True, "activation": "clamped_swiglu"}


def check_experts_layout(name: str, mod: nn.Module, fam: ModelFamily | None = None) -> dict:
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


def experts_activation(mod: nn.Module) -> str:
    """The experts' gate activation: their ``act_fn`` when it is plain SiLU (LFM2-MoE hard-codes ``F.silu``),
    else the config's ``hidden_act``."""
    act = getattr(mod, "act_fn", None)
    if act is F.silu or isinstance(act, nn.SiLU) or _liger_experts(mod):  # LigerExperts: SiLU only
        return "silu"
    return layers.activation_name(mod.config.hidden_act)


def _describe(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def take_over_experts(model: nn.Module, experts=None) -> list[str]:
    """Make desmoe's experts forward the one that runs on every experts module, whatever another library bound
    there (Liger-Kernel binds its fused-MoE ``forward`` on each instance, or swaps the class): an instance-level
    ``forward`` (and the ``_get_name`` Liger binds beside it) is removed, and a module whose class forward is not
    transformers' dispatch gets desmoe's forward bound on the instance. Returns one line per module taken over
    (also warned); the rest of such a library (norms, RoPE, the fused linear cross-entropy) stays in place."""
    import types
    import warnings

    taken = []
    for name, mod in experts if experts is not None else experts_modules(model):
        bound = mod.__dict__.get("forward")
        if bound is not None and getattr(bound, "__func__", None) is layers.desmoe_experts_forward:
            continue
        what = []
        if bound is not None:
            what.append(f"a forward bound on the instance ({_describe(bound)})")
            del mod.__dict__["forward"]
            mod.__dict__.pop("_get_name", None)
        if not dispatches_to_desmoe(mod):
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
    if not dispatches_to_desmoe(mod):
        impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
        return (f"the class forward of {type(mod).__module__}.{type(mod).__qualname__} "
                f"(experts implementation {impl!r})")
    return None



# --- routers ----------------------------------------------------------------------------------------------

def _returns_index_first(gate: nn.Module, weight) -> bool:
    """Whether this router returns ``(ids, weights, logits)`` rather than ``(logits, weights, ids)`` (the order
    changed across transformers releases for some families): one probe call on a single token, hooks bypassed."""
    args = (weight.new_zeros(1, weight.shape[1]),)
    if getattr(gate, "use_expert_bias", False):  # LFM2-MoE: the block passes its selection bias in
        args += (weight.new_zeros(weight.shape[0], dtype=torch.float32),)
    with torch.no_grad():
        out = type(gate).forward(gate, *args)
    return not out[0].is_floating_point()


def replace_router(gate: nn.Module, fam: ModelFamily, config, backend) -> TopKRouter:
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


def router_slots(model: nn.Module):
    """``(parent, attribute, router)`` for every patched router."""
    for parent in list(model.modules()):
        for attr in ("gate", "router"):
            r = getattr(parent, attr, None)
            if isinstance(r, TopKRouter):
                yield parent, attr, r


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

