"""desmoe ops: validated entry points that dispatch to a backend.

Every entry point validates its inputs here, once, for all backends, and raises ``ValueError`` / ``TypeError``
naming the argument and what was expected; :mod:`desmoe.ops.dispatch` then decides which implementation runs
(backends ``"triton"``, ``"grouped"``, ``"reference"``, ``"auto"``; the experts op's variant, dtype and GEMM-engine
rule), and the entry point calls it. One module per op family below: ``triton_routing``, ``triton_permute``,
``triton_experts``, ``triton_gpt_oss`` (launchers over ``desmoe.kernels``' routing, permute, moe, moe_gpt_oss),
``grouped`` (the grouped-GEMM experts), ``reference`` (plain PyTorch, the oracle), and one module per C++ op.
"""
from __future__ import annotations

import torch

from . import reference
from .dispatch import (BACKENDS, experts_impl, kernel_routes, resolve_backend, routing_impl, triton_available,
                       triton_experts_supported)
from .spec import GROUP_SCORES, ROUTING_SCORINGS, RouterSpec, as_spec

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t, *, dim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move them to one device")


def check_routing_args(logits_TE, spec: RouterSpec, bias_E=None) -> None:
    """Validate the tensors of a routing call against its (already validated) spec."""
    _check_tensor("logits_TE", logits_TE, dim=2, dtypes=_FLOAT_DTYPES)
    E = logits_TE.shape[1]
    if spec.num_experts != E:
        raise ValueError(f"logits_TE has {E} experts but RouterSpec.num_experts={spec.num_experts}")
    if bias_E is not None:
        _check_tensor("bias_E", bias_E, dim=1, dtypes=_FLOAT_DTYPES, device=logits_TE.device)
        if bias_E.shape[0] != E:
            raise ValueError(f"bias_E must have shape [{E}] (num_experts), got {tuple(bias_E.shape)}")
        _check_finite_once("bias_E", bias_E)


def _check_finite_once(name: str, t: torch.Tensor) -> None:
    """``t`` holds no NaN/inf. Checked once per in-place version of the tensor (a model's bias buffer is checked
    on its first forward, then again only after it changes), so the hot path pays no host sync per call; not
    under ``torch.compile`` or CUDA-graph capture."""
    if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if getattr(t, "_desmoe_finite_version", None) == t._version:
        return
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0]) if t.dim() else 0
        raise ValueError(f"{name} must be finite, got {t.flatten()[i].item()} at index {i}")
    try:
        t._desmoe_finite_version = t._version
    except (AttributeError, RuntimeError):  # e.g. an inference tensor: just check every call
        pass


def topk_route(
    logits_TE: torch.Tensor,
    spec: RouterSpec | int,
    *,
    bias_E: torch.Tensor | None = None,
    backend: str | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing ``logits [T, E] -> (weights [T, K] float32, ids [T, K] int64)``.

    ``spec`` is a :class:`RouterSpec` (or ``top_k`` with the spec's fields as keywords, e.g.
    ``topk_route(logits, 2, scoring="sigmoid")``). Semantics: :func:`desmoe.ops.reference.topk_route_reference`.
    """
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.dim() != 2:
        _check_tensor("logits_TE", logits_TE, dim=2)
    spec = as_spec(spec, logits_TE.shape[1], options)
    check_routing_args(logits_TE, spec, bias_E)
    if routing_impl(spec, backend, logits_TE.device) == "triton":
        from . import triton_routing

        # the custom-op boundary: primitives only
        return triton_routing.topk_route(
            logits_TE, spec.top_k, scoring=spec.scoring, renormalize=spec.renormalize, bias_E=bias_E,
            n_group=spec.n_group, topk_group=spec.topk_group, group_score=spec.group_score, scaling=spec.scaling,
            renorm_eps=spec.renorm_eps, masked_value=spec.masked_value,
        )
    return reference.topk_route_reference(logits_TE, spec, bias_E=bias_E)


def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, int32 [E]."""
    _check_ids(topk_ids_TK, num_experts)
    return reference.expert_counts_reference(topk_ids_TK, num_experts)


def permute(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-major pair order and offsets; see :func:`desmoe.ops.reference.permute_reference`."""
    _check_ids(topk_ids_TK, num_experts)
    return reference.permute_reference(topk_ids_TK, num_experts)


def _check_ids(topk_ids_TK, num_experts, validate_range: bool = True) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    _check_tensor("topk_ids_TK", topk_ids_TK, dim=2, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    if validate_range and topk_ids_TK.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids_TK must lie in [0, {num_experts}) (num_experts), got values in [{lo}, {hi}]")


def check_experts_args(
    x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, *, activation="silu",
    expert_trainable_E=None, pair_trainable_TK=None, validate_ids: bool = True, b_gate_up=None, b_down=None,
    transposed: bool = False, interleaved: bool = False, alpha: float = reference.SWIGLU_ALPHA,
    limit: float = reference.SWIGLU_LIMIT,
) -> None:
    _check_tensor("x_TD", x_TD, dim=2, dtypes=_FLOAT_DTYPES)
    dev = x_TD.device
    _check_tensor("w_gate_up_E2ID", w_gate_up_E2ID, dim=3, dtypes=_FLOAT_DTYPES, device=dev)
    _check_tensor("w_down_EDI", w_down_EDI, dim=3, dtypes=_FLOAT_DTYPES, device=dev)
    T, D = x_TD.shape
    if transposed:  # gpt-oss: [E, D, 2I] and [E, I, D]
        E, D1, I2 = w_gate_up_E2ID.shape
        gu_form, dn_shape, dn_form = "[E, D={D}, 2I]", (E, I2 // 2, D), "[E={E}, I={I}, D={D}]"
    else:
        E, I2, D1 = w_gate_up_E2ID.shape
        gu_form, dn_shape, dn_form = "[E, 2I, D={D}]", (E, D, I2 // 2), "[E={E}, D={D}, I={I}]"
    layout = " (transposed=True)" if transposed else ""
    if D1 != D:
        raise ValueError(f"w_gate_up_E2ID must be {gu_form.format(D=D)}{layout} (D from x_TD), "
                         f"got {tuple(w_gate_up_E2ID.shape)}")
    if I2 % 2:
        raise ValueError(f"w_gate_up_E2ID's gate|up dim must be 2*I (even){layout}, got {I2}")
    if tuple(w_down_EDI.shape) != dn_shape:
        raise ValueError(f"w_down_EDI must be {dn_form.format(E=E, D=D, I=I2 // 2)}{layout}, "
                         f"got {tuple(w_down_EDI.shape)}")
    if w_gate_up_E2ID.dtype != w_down_EDI.dtype:
        raise TypeError(f"w_gate_up_E2ID ({w_gate_up_E2ID.dtype}) and w_down_EDI ({w_down_EDI.dtype}) differ in dtype")
    for name, b, shape in (("b_gate_up", b_gate_up, (E, I2)), ("b_down", b_down, (E, D))):
        if b is not None:
            _check_tensor(name, b, dim=2, dtypes=_FLOAT_DTYPES, device=dev)
            if tuple(b.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} ([E, {'2I' if name == 'b_gate_up' else 'D'}]),"
                                 f" got {tuple(b.shape)}")
    _check_tensor("topk_ids_TK", topk_ids_TK, device=dev)
    _check_ids(topk_ids_TK, E, validate_range=validate_ids)
    if topk_ids_TK.shape[0] != T:
        raise ValueError(f"topk_ids_TK must have T={T} rows (from x_TD), got {tuple(topk_ids_TK.shape)}")
    if topk_ids_TK.shape[1] > E:
        raise ValueError(f"top-k ({topk_ids_TK.shape[1]}) must not exceed num_experts ({E})")
    _check_tensor("topk_weights_TK", topk_weights_TK, dim=2, dtypes=_FLOAT_DTYPES, device=dev)
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(
            f"topk_weights_TK must match topk_ids_TK's shape {tuple(topk_ids_TK.shape)}, "
            f"got {tuple(topk_weights_TK.shape)}"
        )
    if activation not in reference.ALL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.ALL_ACTIVATIONS)}, got {activation!r}")
    if activation == "clamped_swiglu":
        import math

        for name, v in (("alpha", alpha), ("limit", limit)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} (clamped_swiglu) must be a finite number > 0, got {v!r}")
    if expert_trainable_E is not None:
        _check_tensor("expert_trainable_E", expert_trainable_E, dim=1, dtypes=(torch.bool,), device=dev)
        if expert_trainable_E.shape[0] != E:
            raise ValueError(
                f"expert_trainable_E must have shape [{E}] (num_experts), got {tuple(expert_trainable_E.shape)}")
    if pair_trainable_TK is not None:
        _check_tensor("pair_trainable_TK", pair_trainable_TK, dim=2, dtypes=(torch.bool,), device=dev)
        if pair_trainable_TK.shape != topk_ids_TK.shape:
            raise ValueError(
                f"pair_trainable_TK must match topk_ids_TK's shape {tuple(topk_ids_TK.shape)}, "
                f"got {tuple(pair_trainable_TK.shape)}"
            )


def moe_experts(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    *,
    activation: str = "silu",
    expert_trainable_E: torch.Tensor | None = None,
    pair_trainable_TK: torch.Tensor | None = None,
    backend: str | None = None,
    validate_ids: bool = True,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = reference.SWIGLU_ALPHA,
    limit: float = reference.SWIGLU_LIMIT,
) -> torch.Tensor:
    """Gated expert MLP with weighted combine: ``x [T, D] -> out [T, D]`` (dtype of ``x``).

    Masks: see :func:`desmoe.ops.reference.moe_experts_reference`. ``validate_ids`` checks id range (one
    device sync; the HF integration turns it off since its router produced the ids). gpt-oss's experts:
    ``b_gate_up [E, 2I]``, ``b_down [E, D]``, ``transposed`` (weights ``[E, D, 2I]`` / ``[E, I, D]``),
    ``interleaved`` (gate/up in the even/odd columns), ``activation="clamped_swiglu"`` with ``alpha``/``limit``;
    the Triton backend runs them on ``desmoe.kernels.moe_gpt_oss`` (see :func:`triton_experts_supported`).
    """
    check_experts_args(
        x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, activation=activation,
        expert_trainable_E=expert_trainable_E, pair_trainable_TK=pair_trainable_TK, validate_ids=validate_ids,
        b_gate_up=b_gate_up, b_down=b_down, transposed=transposed, interleaved=interleaved, alpha=alpha,
        limit=limit,
    )
    impl = experts_impl(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, backend=backend, activation=activation,
                        has_bias=b_gate_up is not None or b_down is not None, transposed=transposed,
                        interleaved=interleaved)
    masks = dict(expert_trainable_E=expert_trainable_E, pair_trainable_TK=pair_trainable_TK)
    if impl == "triton":
        from .triton_experts import moe_experts as launch

        return launch(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, **masks)
    if impl == "triton_gpt_oss":
        from .triton_gpt_oss import moe_experts_gpt_oss

        return moe_experts_gpt_oss(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, b_gate_up=b_gate_up,
                                   b_down=b_down, activation=activation, alpha=alpha, limit=limit, **masks)
    if impl == "grouped_mm":
        from .grouped import moe_experts_grouped_mm

        return moe_experts_grouped_mm(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, **masks)
    layout = dict(b_gate_up=b_gate_up, b_down=b_down, transposed=transposed, interleaved=interleaved, alpha=alpha,
                  limit=limit)
    if impl == "grouped":
        from .grouped import grouped_experts

        trainable_S = None if pair_trainable_TK is None else pair_trainable_TK.reshape(-1)
        return grouped_experts(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK,
                               activation=activation, trainable_S=trainable_S, trainable_E=expert_trainable_E,
                               **layout)
    return reference.moe_experts_reference(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK,
                                           activation=activation, **masks, **layout)


# The C++/CUDA extension's ops, one module each (validation, fake, dispatch to the extension or the reference).
from .affinity import affinity_ema_  # noqa: E402
from .grad_mask import mask_expert_grads_  # noqa: E402
from .pair_mask import pair_mask  # noqa: E402
from .routing_stats import routing_stats  # noqa: E402

__all__ = [
    "BACKENDS", "RouterSpec", "ROUTING_SCORINGS", "GROUP_SCORES", "resolve_backend", "triton_available",
    "kernel_routes", "topk_route", "expert_counts", "permute", "moe_experts", "triton_experts_supported",
    "check_routing_args", "check_experts_args", "reference",
    "mask_expert_grads_", "pair_mask", "routing_stats", "affinity_ema_",
]
