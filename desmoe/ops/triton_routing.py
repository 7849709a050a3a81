"""Triton top-k routing: launchers for ``desmoe.kernels.routing`` wrapped as ``torch.library`` custom ops.

    desmoe::topk_route_fwd   logits [T,E] -> weights [T,K] f32, ids [T,K] i64
    desmoe::topk_route_bwd   d weights -> d logits

Each with a fake (meta) impl and ``register_autograd``, so they trace under ``torch.compile(fullgraph=True)`` as
single opaque nodes. Nothing here syncs with the host. Inputs are validated by :mod:`desmoe.ops`, and which
routing runs on these kernels is :mod:`desmoe.ops.dispatch`'s rule, before they arrive here.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels import routing as _rk
from . import _autocast
from .triton_common import empty, on_device, pow2
from .triton_permute import moe_permute

Tensor = torch.Tensor


def _route_block_t(E_PAD: int) -> int:
    # ~4K scores in registers per program; rows are independent so any power of two works
    return max(1, min(64, 4096 // E_PAD))


@torch.library.custom_op("desmoe::topk_route_fwd", mutates_args=())
def topk_route_fwd(
    logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, scoring: str, renormalize: bool, n_group: int,
    topk_group: int, group_score: str, scaling: float, renorm_eps: float, masked_value: Optional[float],
) -> tuple[Tensor, Tensor]:
    T, E = logits_TE.shape
    weights_TK = empty((T, top_k), torch.float32, logits_TE.device)
    ids_TK = empty((T, top_k), torch.int64, logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    E_PAD = pow2(E)
    BLOCK_T = _route_block_t(E_PAD)
    grouped = n_group > 1 and topk_group < n_group
    bias = bias_E.contiguous() if bias_E is not None else logits_TE
    with on_device(logits_TE):
        _rk.topk_route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits_TE, bias, weights_TK, ids_TK, T, E, logits_TE.stride(0), logits_TE.stride(1),
            float(scaling), float(renorm_eps), float("-inf") if masked_value is None else float(masked_value),
            TOP_K=top_k, K_PAD=pow2(top_k), E_PAD=E_PAD, BLOCK_T=BLOCK_T,
            SCORING_SIGMOID=scoring == "sigmoid", HAS_BIAS=bias_E is not None, RENORM=bool(renormalize),
            GROUPED=grouped, N_GROUP=n_group, GROUP_SIZE=E // n_group, TOPK_GROUP=topk_group,
            G_PAD=pow2(n_group), GROUP_TOP2SUM=group_score == "top2sum",
        )
    return weights_TK, ids_TK


@topk_route_fwd.register_fake
def _(logits_TE, bias_E, top_k, scoring, renormalize, n_group, topk_group, group_score, scaling, renorm_eps,
      masked_value):
    T = logits_TE.shape[0]
    return (logits_TE.new_empty((T, top_k), dtype=torch.float32), logits_TE.new_empty((T, top_k), dtype=torch.int64))


@torch.library.custom_op("desmoe::topk_route_bwd", mutates_args=())
def topk_route_bwd(
    dweights_TK: Tensor, logits_TE: Tensor, ids_TK: Tensor, scoring: str, renormalize: bool, scaling: float,
    renorm_eps: float,
) -> Tensor:
    T, E = logits_TE.shape
    K = ids_TK.shape[1]
    dlogits_TE = empty((T, E), logits_TE.dtype, logits_TE.device)
    if T == 0:
        return dlogits_TE
    E_PAD = pow2(E)
    BLOCK_T = _route_block_t(E_PAD)
    with on_device(logits_TE):
        _rk.topk_route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            dweights_TK.contiguous(), logits_TE, ids_TK.contiguous(), dlogits_TE, T, E,
            logits_TE.stride(0), logits_TE.stride(1), dlogits_TE.stride(0), dlogits_TE.stride(1),
            float(scaling), float(renorm_eps),
            TOP_K=K, K_PAD=pow2(K), E_PAD=E_PAD, BLOCK_T=BLOCK_T, SCORING_SIGMOID=scoring == "sigmoid",
            RENORM=bool(renormalize),
        )
    return dlogits_TE


@topk_route_bwd.register_fake
def _(dweights_TK, logits_TE, ids_TK, scoring, renormalize, scaling, renorm_eps):
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    logits_TE, _bias, _k, scoring, renormalize, _ng, _tg, _gs, scaling, renorm_eps, _mv = inputs
    ctx.save_for_backward(logits_TE, output[1])
    ctx.args = (scoring, bool(renormalize), float(scaling), float(renorm_eps))


def _route_backward(ctx, dweights_TK, _dids):
    logits_TE, ids_TK = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0] and dweights_TK is not None:
        dlogits = topk_route_bwd(dweights_TK.float(), logits_TE, ids_TK, *ctx.args)
    return dlogits, None, None, None, None, None, None, None, None, None, None


topk_route_fwd.register_autograd(_route_backward, setup_context=_route_setup_context)
# under torch.autocast, scores in fp32 (autocast's softmax policy, as every HF router scores): logits upcast
_autocast.register("desmoe::topk_route_fwd", ("logits_TE", "bias_E"), policy="float32")


def topk_route(
    logits_TE: Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
    bias_E: Tensor | None = None, n_group: int = 1, topk_group: int = 1, group_score: str = "max",
    scaling: float = 1.0, renorm_eps: float = 0.0, masked_value: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused top-k routing; same contract as :func:`desmoe.ops.reference.topk_route_reference`.

    Returns ``(weights_TK float32, ids_TK int64)``; ``weights_TK`` is differentiable w.r.t. ``logits_TE``
    (``bias_E`` only steers the selection and gets no gradient).
    """
    return topk_route_fwd(
        logits_TE, bias_E, int(top_k), scoring, bool(renormalize), int(n_group), int(topk_group), group_score,
        float(scaling), float(renorm_eps), None if masked_value is None else float(masked_value),
    )


def route_and_permute(logits_TE: Tensor, top_k: int, **route_kwargs):
    """Routing plus everything the expert kernels consume, without a host sync.

    Returns ``(weights_TK, ids_TK, counts_E int32, offsets_E1 int32, sorted_pairs_S int64)``.
    """
    weights_TK, ids_TK = topk_route(logits_TE, top_k, **route_kwargs)
    sorted_pairs_S, offsets_E1 = moe_permute(ids_TK, logits_TE.shape[1])
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    return weights_TK, ids_TK, counts_E, offsets_E1, sorted_pairs_S.long()


__all__ = ["topk_route", "route_and_permute", "topk_route_fwd", "topk_route_bwd"]
