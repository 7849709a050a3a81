"""Hugging Face ``transformers`` (v5) drop-in: ``desmoe.patch(model)``.

``register()`` (called by ``import desmoe``) adds the experts implementation ``"desmoe"`` to transformers'
``ExpertsInterface`` — a registry call, not a patch (:mod:`.experts_interface`). ``patch(model)`` then, explicitly:

1. checks the model type is supported (else :class:`UnsupportedModelError` listing what is);
2. switches every experts module to ``"desmoe"`` (``model.set_experts_implementation``), recording the
   backend and activation on each module;
3. replaces each MoE block's router with :class:`desmoe.layers.TopKRouter`, which adopts the router's
   parameters, buffers and submodules (no weight copies; state-dict keys unchanged).

The registry :data:`MODEL_TYPES` (:mod:`.families`) says, per ``model_type``, which router class is replaced, how
its routing spec is read and where its weight and bias live; :data:`REFUSED` names the fused-experts model types
desmoe refuses and why. What is swapped, and finding it again (:func:`routers`, :func:`moe_blocks`), is
:mod:`.swap`.

``unpatch(model)`` restores the original routers and experts implementation. This module is the face of
``desmoe.integrations``: the names above are importable from here.
"""
from __future__ import annotations

import torch.nn as nn

from ..layers import TopKRouter
from .experts_interface import EXPERTS_IMPLEMENTATION, register
from .families import MODEL_TYPES, REFUSED, ModelFamily, UnsupportedModelError, family, refusal_reason, \
    supported_model_types
from .swap import check_experts_layout, check_not_quantized, experts_activation, experts_modules, \
    foreign_experts_forward, moe_blocks, replace_router, router_slots, routers, take_over_experts

__all__ = ["EXPERTS_IMPLEMENTATION", "MODEL_TYPES", "REFUSED", "ModelFamily", "UnsupportedModelError", "family",
           "foreign_experts_forward", "moe_blocks", "model_type_table", "patch", "refusal_reason", "register",
           "routers", "supported_model_types", "take_over_experts", "unpatch", "update_readme"]

# the names the upstream-test kit's plugin reads
_MODEL_TYPES = MODEL_TYPES
_experts_modules = experts_modules


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
    check_not_quantized(model)
    experts = list(experts_modules(model))
    if not experts:
        raise UnsupportedModelError(f"no fused experts modules found in this {model_type} model")
    for name, mod in experts:
        mod._desmoe_variant = check_experts_layout(name, mod, fam)
        mod._desmoe_activation = mod._desmoe_variant.get("activation") or experts_activation(mod)
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
                setattr(parent, fam.router_attr, replace_router(gate, fam, model.config, resolved))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original routers back, previous experts implementation restored."""
    for parent, attr, gate in list(router_slots(model)):
        if "_desmoe_original" in gate.__dict__:
            original = gate.__dict__["_desmoe_original"]
            original._forward_hooks.update(gate._forward_hooks)  # hooks installed while patched
            setattr(parent, attr, original)
    prev = getattr(model, "_desmoe_previous_experts_implementation", None)
    if prev is not None:
        model.set_experts_implementation(prev)
        del model._desmoe_previous_experts_implementation
    return model


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
    activation = next(mod for _, mod in experts_modules(model))._desmoe_activation
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
