"""Autocast rules of desmoe's custom ops, registered on the ops themselves (the Autocast dispatch keys).

``torch.autocast`` only changes the ops it knows; a ``torch.library`` custom op receives whatever dtype reaches
it, so fp32 master weights under ``torch.autocast(dtype=bf16)`` would run the experts in fp32 (no tensor cores
on CUDA). Each rule here is an Autocast kernel, the mechanism ``torch.library.register_autocast`` uses, so eager
calls, ``torch.compile`` and every caller (the HF Trainer included) get it. Unlike ``register_autocast``, which
bakes in one dtype, the target is read at call time:

- ``"autocast"``: floating operands are cast to the region's dtype (``torch.get_autocast_dtype``: bf16 or fp16),
  as autocast does for ``matmul``/``linear``; the kernels accumulate in fp32. The casts are ordinary autograd
  ops, so gradients reach fp32 master parameters in fp32.
- ``"float32"``: floating operands are upcast to fp32 (autocast's policy for ``softmax``): routing scores.

float64 tensors, integer/bool tensors, tensors on another device type and the arguments not named stay as
they are.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor
DEVICE_TYPES = ("cpu", "cuda")
POLICIES = ("autocast", "float32")

# Registrations live as long as this Library object (what torch.library.custom_op keeps for its own impls).
_LIB = torch.library.Library("desmoe", "FRAGMENT")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or None outside an autocast region."""
    if device_type not in DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _eligible(t, device_type: str) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype an ``"autocast"``-policy operand ``t`` is computed in: the autocast dtype inside a region on its
    device type, else its own."""
    dt = autocast_dtype(t.device.type)
    return dt if dt is not None and _eligible(t, t.device.type) else t.dtype


def cast_operands(*tensors):
    """``tensors`` cast as the ``"autocast"`` policy would (for callers that are not custom ops, e.g. an
    ``autograd.Function``); None passes through."""
    return tuple(t if t is None else t.to(compute_dtype(t)) for t in tensors)


def register(qualname: str, arg_names: tuple[str, ...], policy: str = "autocast") -> None:
    """Register the Autocast kernel of custom op ``qualname`` (``"desmoe::name"``) for CPU and CUDA: the
    arguments ``arg_names`` follow ``policy``, then the op runs with autocast excluded."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    schema_names = [a.name for a in op._schema.arguments]
    missing = [a for a in arg_names if a not in schema_names]
    if missing:
        raise ValueError(f"{qualname} has no argument(s) {missing}; its arguments are {schema_names}")
    positions = frozenset(schema_names.index(a) for a in arg_names)

    for device_type in DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _keyset_excluded=keyset):
            target = torch.float32 if policy == "float32" else torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_keyset_excluded):
                cast = [a.to(target) if i in positions and _eligible(a, _device_type) else a
                        for i, a in enumerate(args)]
                return op(*cast)

        _LIB.impl(name, kernel, key, with_keyset=True)
