"""Grouped-GEMM experts: the two implementations that run the expert MLP as grouped GEMMs over expert-sorted pairs.

Why two, and which runs (:func:`desmoe.ops.dispatch.experts_impl` decides; nothing here does):

- :func:`grouped_experts` (``"grouped"``, ``backend="auto"`` on CPU, and any variant the Triton kernels do not
  carry): portable, pure PyTorch around ``torch.nn.functional.grouped_mm`` (a per-expert loop where no grouped
  GEMM exists), every activation, biases and gpt-oss's layout; sort-based pair order and an ``index_add_``
  combine. It keeps ``x_g``, ``h``, ``act(gate)`` and ``a`` for the backward.
- :func:`moe_experts_grouped_mm` (``"grouped_mm"``: the Triton backend's GEMM engine for coarse shapes on CUDA,
  SiLU SwiGLU in the standard layout): the same four GEMMs on ``torch._grouped_mm``, but inside the Triton
  backend's O(S) routing metadata and its fixed-order combine kernel, so it is deterministic on CUDA (the
  ``index_add_`` combine is not) and keeps only the gate|up pre-activation, as the Triton kernels do. It needs
  Triton, so it cannot replace the portable one; the portable one lacks its determinism and memory profile.

The portable op is one ``torch.library.custom_op`` for the forward and one for the backward, both with fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them; inside, eager PyTorch on the sorted
pairs:

    forward   pairs sorted by expert (stable) -> x_g = x[tok] -> h = x_g @ W1[e]^T (grouped) -> a = act(gate) * up
              -> y = (w * a) @ W2[e]^T (grouped; the weight folded into the narrower input) -> out[tok] += y
              (fp32 accumulate)
    backward  g = dout[tok] @ W2[e] (grouped, unweighted) -> dw = <g, a>, da = w * g -> dh = act'(h) (da)
              -> dx[tok] += dh @ W1[e] (grouped) -> dW1 = dh^T x_g, dW2 = dout[tok]^T (w * a) (grouped, K = pairs)

``y`` is never stored (``dw = <dout, y> = <dout @ W2, a>``). In both, the DES-MoE masks act on the two dW GEMMs
only (values, dX and d(weights) are untouched): a frozen expert's dW GEMMs are skipped (or zeroed), and a
non-trainable pair's rows are zeroed. Shapes as in :mod:`desmoe.ops.reference` (whose per-expert loop stays the
readable oracle).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autocast
from .reference import ACTIVATIONS, ALL_ACTIVATIONS, split_gate_up


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _gmm(a: Tensor, b: Tensor, offs_E: Tensor) -> Tensor:
    """Grouped GEMM over row groups ending at ``offs_E``: 2D x 3D -> rows of ``a[g] @ b[e]``; 2D x 2D (the
    group dimension being the shared K) -> ``[E, M, N]``. A per-expert loop where no grouped GEMM exists."""
    if _GROUPED_MM is not None and _grouped_mm_ok(a) and _grouped_mm_ok(b):
        # Contiguous: the kernel pads rows to 16 bytes (e.g. bf16 with 2I = 12), and the custom ops' fake
        # implementations promise dense outputs to torch.compile
        out = _GROUPED_MM(a, b, offs=offs_E).contiguous()
        if b.dim() == 2 and out.is_cuda:  # dW of an empty group: zeros on CPU (tested); CUDA may leave it unwritten
            out.masked_fill_(~_nonempty_groups(offs_E).view(-1, 1, 1), 0)
        return out
    bounds = [0] + offs_E.tolist()
    if b.dim() == 3:
        return torch.cat([a[lo:hi] @ b[e] for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    return torch.stack([a[:, lo:hi] @ b[lo:hi] for lo, hi in zip(bounds, bounds[1:])])


def _dw_rows(offs_E: Tensor, perm_S: Tensor, trainable_E: Tensor | None, trainable_S: Tensor | None):
    """The dW GEMMs' rows under masks: ``(src_S, ends_E)`` of :func:`_trainable_rows` over this op's metadata
    (``offs_E`` group ends, ``perm_S`` the pair of each sorted row): the trainable rows first, in expert order,
    so a frozen expert's group is empty and a masked pair is in no group (no dW FLOPs for either)."""
    return _trainable_rows(torch.cat([offs_E.new_zeros(1), offs_E]), perm_S, trainable_E, trainable_S)


def _nonempty_groups(ends_E: Tensor) -> Tensor:
    """bool ``[E]``: the groups (ending at ``ends_E``) that hold at least one row."""
    return ends_E > torch.cat([ends_E.new_zeros(1), ends_E[:-1]])


def _grouped_mm_ok(t: Tensor) -> bool:
    """The grouped GEMM kernels want 16-byte aligned data and strides, and a float32/16 or bfloat16 dtype on
    CPU (bfloat16 on CUDA, where the other dtypes are not implemented on every architecture)."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if t.device.type != "cpu" and t.dtype != torch.bfloat16:
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st == 1 or (st * size) % 16 == 0 or n == 1
                                          for n, st in zip(t.shape, t.stride()))


def _act_backward(activation: str, grad: Tensor, x: Tensor, act_x: Tensor) -> Tensor:
    """``grad * act'(x)`` with aten's own activation backward kernels (a custom op's body runs below
    autograd, so it cannot differentiate by tracing)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, act_x, 0)
    raise ValueError(f"activation must be one of {sorted(ALL_ACTIVATIONS)}, got {activation!r}")


def _gate_forward(h_S2I: Tensor, activation: str, interleaved: bool, alpha: float, limit: float):
    """``(act_SI, a_SI)``: the gate's activation (gpt-oss: ``g·σ(α·g)`` of the clamped gate) and the gated
    output."""
    gate_SI, up_SI = split_gate_up(h_S2I, interleaved)
    if activation == "clamped_swiglu":
        g = gate_SI.clamp(max=limit)
        act_SI = g * torch.sigmoid(g * alpha)
        return act_SI, (up_SI.clamp(min=-limit, max=limit) + 1) * act_SI
    act_SI = ACTIVATIONS[activation](gate_SI)
    return act_SI, act_SI * up_SI


def _gate_backward(da_SI: Tensor, h_S2I: Tensor, act_SI: Tensor, activation: str, interleaved: bool, alpha: float,
                   limit: float) -> Tensor:
    """``dh_S2I`` (in ``h``'s column layout) from ``da_SI``. The clamps pass the gradient where the input lies in
    the closed interval, as autograd's ``clamp`` does (the edges included)."""
    gate_SI, up_SI = split_gate_up(h_S2I, interleaved)
    if activation == "clamped_swiglu":
        g = gate_SI.clamp(max=limit)
        sig = torch.sigmoid(g * alpha)
        dgate = da_SI * (up_SI.clamp(min=-limit, max=limit) + 1) * (sig + alpha * g * sig * (1 - sig))
        dgate = dgate * (gate_SI <= limit)
        dup = da_SI * act_SI * ((up_SI >= -limit) & (up_SI <= limit))
    else:
        dgate = _act_backward(activation, da_SI * up_SI, gate_SI, act_SI)
        dup = da_SI * act_SI
    if interleaved:
        return torch.stack([dgate, dup], dim=-1).flatten(-2)
    return torch.cat([dgate, dup], dim=-1)


def _views(w_gate_up: Tensor, w_down: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """The weights as ``[E, in, out]`` views (``x @ W[e]``): the stored tensors when transposed, else their
    transposes (no copies)."""
    if transposed:
        return w_gate_up, w_down
    return w_gate_up.transpose(-2, -1), w_down.transpose(-2, -1)


def _row_experts(offs_E: Tensor, S: int) -> Tensor:
    """The expert of each sorted pair row (no host sync)."""
    rows = torch.arange(S, device=offs_E.device, dtype=offs_E.dtype)
    return torch.searchsorted(offs_E, rows, right=True)


def _pairs(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    flat_S = topk_ids_TK.reshape(-1)
    perm_S = torch.sort(flat_S, stable=True).indices
    offs_E = torch.cumsum(torch.bincount(flat_S, minlength=num_experts), 0).to(torch.int32)
    return perm_S, offs_E


@torch.library.custom_op("desmoe::grouped_experts_fwd", mutates_args=())
def grouped_experts_fwd(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor,
    trainable_S: Tensor | None, trainable_E: Tensor | None, activation: str, b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None, transposed: bool = False, interleaved: bool = False, alpha: float = 1.702,
    limit: float = 7.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out_TD, perm_S int64, offs_E int32, x_SD, h_S2I, act_SI, a_SI)``; all but ``out_TD`` are saved
    for the backward (the masks too: they only act on the dW of the backward)."""
    T, K = topk_ids_TK.shape
    S = T * K
    perm_S, offs_E = _pairs(topk_ids_TK, w_gate_up_E2ID.shape[0])
    tok_S = perm_S // K
    wdt = w_gate_up_E2ID.dtype
    w1, w2 = _views(w_gate_up_E2ID, w_down_EDI, transposed)
    x_SD = x_TD.index_select(0, tok_S).to(wdt)  # index_select: a row copy, ~2x aten::index on CPU
    h_S2I = _gmm(x_SD, w1, offs_E)
    e_S = _row_experts(offs_E, S) if b_gate_up is not None or b_down is not None else None
    if b_gate_up is not None:  # as stock: the GEMM's output (its dtype) plus the bias (its dtype, promoted)
        h_S2I = h_S2I + b_gate_up.index_select(0, e_S)
    # the routing weight is folded into the down projection's input ([S, I], narrower than its output)
    w_S1 = topk_weights_TK.reshape(-1)[perm_S].unsqueeze(1)
    act_SI, a_SI = _gate_forward(h_S2I, activation, interleaved, alpha, limit)
    aw_SI = (a_SI * w_S1).to(wdt)
    y_SD = _gmm(aw_SI, w2, offs_E)
    out_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
    if b_down is not None:
        y_SD = y_SD.to(out_TD.dtype) + b_down.index_select(0, e_S).to(out_TD.dtype) * w_S1.to(out_TD.dtype)
    out_TD.index_add_(0, tok_S, y_SD.to(out_TD.dtype))  # fp32 accumulate of the K contributions
    return out_TD.to(x_TD.dtype), perm_S, offs_E, x_SD, h_S2I, act_SI, a_SI


@grouped_experts_fwd.register_fake
def _(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, trainable_S, trainable_E, activation,
      b_gate_up=None, b_down=None, transposed=False, interleaved=False, alpha=1.702, limit=7.0):
    S = topk_ids_TK.numel()
    I2 = w_gate_up_E2ID.shape[2] if transposed else w_gate_up_E2ID.shape[1]
    hdt = w_gate_up_E2ID.dtype if b_gate_up is None else torch.promote_types(w_gate_up_E2ID.dtype, b_gate_up.dtype)
    return (x_TD.new_empty(x_TD.shape), topk_ids_TK.new_empty((S,), dtype=torch.int64),
            topk_ids_TK.new_empty((w_gate_up_E2ID.shape[0],), dtype=torch.int32),
            w_gate_up_E2ID.new_empty((S, x_TD.shape[1])), w_gate_up_E2ID.new_empty((S, I2), dtype=hdt),
            w_gate_up_E2ID.new_empty((S, I2 // 2), dtype=hdt), w_gate_up_E2ID.new_empty((S, I2 // 2), dtype=hdt))


@torch.library.custom_op("desmoe::grouped_experts_bwd", mutates_args=())
def grouped_experts_bwd(
    dout_TD: Tensor, x_SD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_weights_TK: Tensor,
    perm_S: Tensor, offs_E: Tensor, h_S2I: Tensor, act_SI: Tensor, a_SI: Tensor, trainable_S: Tensor | None,
    trainable_E: Tensor | None, activation: str, need_dx: bool, need_dw: bool, need_dweights: bool,
    b_down: Tensor | None = None, has_bias: bool = False, transposed: bool = False, interleaved: bool = False,
    alpha: float = 1.702, limit: float = 7.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx_TD, dw_gate_up, dw_down, dweights_TK, db_gate_up, db_down)``. The dW GEMMs take only the trainable
    rows (``trainable_S``, pair order t*K+k, and ``trainable_E``): a masked pair costs no dW FLOPs and adds
    nothing to the bias sums, a frozen expert's group is empty (zeros). A gradient not needed (``need_*``
    False; the biases' with ``need_dw``, and only with ``has_bias``) is skipped and returned as an empty tensor."""
    T, K = topk_weights_TK.shape
    S = T * K
    tok_S = perm_S // K
    wdt = w_down_EDI.dtype
    acc = torch.promote_types(dout_TD.dtype, torch.float32)  # fp32 math for low precision; fp64 stays fp64
    w1, w2 = _views(w_gate_up_E2ID, w_down_EDI, transposed)
    w_S1 = topk_weights_TK.reshape(-1)[perm_S].unsqueeze(1).to(wdt)
    dout_SD = dout_TD.index_select(0, tok_S).to(wdt)
    g_SI = _gmm(dout_SD, w2.transpose(-2, -1), offs_E)  # d(y) @ W2^T, before the routing weight
    e_S = _row_experts(offs_E, S) if has_bias else None

    def skipped():  # a fresh empty tensor each: a custom op's outputs must not alias one another
        return dout_TD.new_empty(0)

    dweights_TK = skipped()
    if need_dweights:
        dweights_S = torch.linalg.vecdot(g_SI.to(acc), a_SI.to(acc))
        if b_down is not None:  # the down bias is weighted too: d w = <dout, y + b_down>
            dweights_S = dweights_S + torch.linalg.vecdot(dout_SD.to(acc), b_down.index_select(0, e_S).to(acc))
        dweights_TK = torch.empty_like(dweights_S).index_copy_(0, perm_S, dweights_S).view(T, K)
        dweights_TK = dweights_TK.to(topk_weights_TK.dtype)
    da_SI = g_SI.to(a_SI.dtype) * w_S1.to(a_SI.dtype)
    dh_S2I = _gate_backward(da_SI, h_S2I, act_SI, activation, interleaved, alpha, limit)
    dx_TD = skipped()
    if need_dx:
        dx_TD = torch.zeros(T, dout_TD.shape[1], dtype=acc, device=dout_TD.device)
        dx_TD.index_add_(0, tok_S, _gmm(dh_S2I.to(wdt), w1.transpose(-2, -1), offs_E).to(acc))
        dx_TD = dx_TD.to(dout_TD.dtype)
    dw1, dw2, db1, db2 = skipped(), skipped(), skipped(), skipped()
    if need_dw:
        aw_SI = a_SI * w_S1.to(a_SI.dtype)
        dh_w, aw_w, x_w, dout_w, ends = dh_S2I, aw_SI, x_SD, dout_SD, offs_E
        if trainable_S is not None or trainable_E is not None:  # only the trainable rows reach the dW GEMMs
            src, ends = _dw_rows(offs_E, perm_S, trainable_E, trainable_S)
            dh_w, aw_w, x_w, dout_w = dh_S2I[src], aw_SI[src], x_SD[src], dout_SD[src]
        dh_w, aw_w = dh_w.to(wdt), aw_w.to(wdt)
        if transposed:  # stored [E, D, 2I] / [E, I, D]
            dw1, dw2 = _gmm(x_w.t(), dh_w, ends), _gmm(aw_w.t(), dout_w, ends)
        else:  # stored [E, 2I, D] / [E, D, I]
            dw1, dw2 = _gmm(dh_w.t(), x_w, ends), _gmm(dout_w.t(), aw_w, ends)
        if has_bias:  # per-expert sums (fp32) of the pairs' rows; a masked pair's or frozen expert's add nothing
            dout_w_SD = dout_SD
            if trainable_S is not None:
                keep_S1 = trainable_S[perm_S].unsqueeze(1)
                dh_S2I, dout_w_SD = dh_S2I * keep_S1, dout_SD * keep_S1
            E = offs_E.shape[0]
            keep_E = None if trainable_E is None else trainable_E.index_select(0, e_S).unsqueeze(1)
            rows1 = dh_S2I.to(acc)
            rows2 = dout_w_SD.to(acc) * w_S1.to(acc)
            if keep_E is not None:
                rows1, rows2 = rows1 * keep_E, rows2 * keep_E
            db1 = torch.zeros(E, rows1.shape[1], dtype=acc, device=dout_TD.device).index_add_(0, e_S, rows1)
            db2 = torch.zeros(E, rows2.shape[1], dtype=acc, device=dout_TD.device).index_add_(0, e_S, rows2)
    return dx_TD, dw1, dw2, dweights_TK, db1, db2


@grouped_experts_bwd.register_fake
def _(dout_TD, x_SD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK, perm_S, offs_E, h_S2I, act_SI, a_SI,
      trainable_S, trainable_E, activation, need_dx, need_dw, need_dweights, b_down=None, has_bias=False,
      transposed=False, interleaved=False, alpha=1.702, limit=7.0):
    def shaped(t, need, shape=None, dtype=None):
        return t.new_empty((shape or t.shape) if need else (0,), dtype=dtype)

    E = w_gate_up_E2ID.shape[0]
    acc = torch.promote_types(dout_TD.dtype, torch.float32)
    bias = need_dw and has_bias
    return (shaped(dout_TD, need_dx), shaped(w_gate_up_E2ID, need_dw), shaped(w_down_EDI, need_dw),
            shaped(topk_weights_TK, need_dweights), shaped(dout_TD, bias, (E, h_S2I.shape[1]), acc),
            shaped(dout_TD, bias, (E, dout_TD.shape[1]), acc))


def _setup_context(ctx, inputs, output):
    (_x, w_gate_up_E2ID, w_down_EDI, _ids, topk_weights_TK, trainable_S, trainable_E, activation, b_gate_up,
     b_down, transposed, interleaved, alpha, limit) = inputs
    _out, perm_S, offs_E, x_SD, h_S2I, act_SI, a_SI = output
    ctx.mark_non_differentiable(perm_S, offs_E, x_SD, h_S2I, act_SI, a_SI)
    ctx.save_for_backward(x_SD, w_gate_up_E2ID, w_down_EDI, topk_weights_TK, perm_S, offs_E, h_S2I, act_SI, a_SI,
                          trainable_S, trainable_E, b_down)
    ctx.activation = activation
    ctx.has_bias = b_gate_up is not None or b_down is not None
    ctx.bias_dtypes = (None if b_gate_up is None else b_gate_up.dtype, None if b_down is None else b_down.dtype)
    ctx.layout = (transposed, interleaved, alpha, limit)


def _backward(ctx, dout_TD, *_saved_grads):
    (x_SD, w1, w2, weights_TK, perm_S, offs_E, h_S2I, act_SI, a_SI, trainable_S, trainable_E,
     b_down) = ctx.saved_tensors
    need = ctx.needs_input_grad  # as many as the arguments the call passed (trailing defaults are dropped)
    need_dx, need_dweights = need[0], need[4]
    need_db1, need_db2 = (len(need) > 8 and need[8]), (len(need) > 9 and need[9])
    need_dw = need[1] or need[2] or need_db1 or need_db2
    dx, dw1, dw2, dweights, db1, db2 = grouped_experts_bwd(
        dout_TD.contiguous(), x_SD, w1, w2, weights_TK, perm_S, offs_E, h_S2I, act_SI, a_SI, trainable_S,
        trainable_E, ctx.activation, need_dx, need_dw, need_dweights, b_down, ctx.has_bias, *ctx.layout)
    dt1, dt2 = ctx.bias_dtypes
    grads = (dx if need_dx else None, dw1 if need[1] else None, dw2 if need[2] else None, None,
             dweights if need_dweights else None, None, None, None,
             db1.to(dt1) if need_db1 else None, db2.to(dt2) if need_db2 else None, None, None, None, None)
    return grads[:len(need)]


grouped_experts_fwd.register_autograd(_backward, setup_context=_setup_context)
# bf16 compute under torch.autocast over fp32 masters: the GEMM operands take the region's dtype (the op's own
# Autocast kernel, so torch.compile and every caller get it); routing weights and the biases stay as given (stock
# gpt-oss adds its fp32 biases to the bf16 GEMM outputs, so the gate runs in fp32)
_autocast.register("desmoe::grouped_experts_fwd", ("x_TD", "w_gate_up_E2ID", "w_down_EDI"))


def grouped_experts(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    activation: str = "silu", trainable_S: Tensor | None = None, trainable_E: Tensor | None = None,
    b_gate_up: Tensor | None = None, b_down: Tensor | None = None, transposed: bool = False,
    interleaved: bool = False, alpha: float = 1.702, limit: float = 7.0,
) -> Tensor:
    """``out_TD`` (dtype of ``x_TD``), differentiable in x, both weights, the biases and the routing weights.
    Layout and gpt-oss options as :func:`desmoe.ops.reference.moe_experts_reference`."""
    return grouped_experts_fwd(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK, trainable_S,
                               trainable_E, activation, b_gate_up, b_down, bool(transposed), bool(interleaved),
                               float(alpha), float(limit))[0]


# --- the Triton backend's coarse-shape engine: torch._grouped_mm GEMMs in desmoe's Triton metadata, combine, masks

def _to_pair_rows(v_sorted: Tensor, sorted_pairs: Tensor) -> Tensor:
    out = torch.empty_like(v_sorted)
    out[sorted_pairs] = v_sorted
    return out


def _trainable_rows(off_E1: Tensor, sorted_pairs_S: Tensor, em_E: Tensor | None, pm_TK: Tensor | None):
    """The dW GEMMs' row order under masks, without a host sync: the trainable sorted rows (pair kept, expert not
    frozen) first, in expert order, then the others, which no group covers (``torch._grouped_mm`` stops at the last
    offset). Returns ``(src_S, ends_E)``: the sorted row at each position, and the groups' end offsets (int32), so
    frozen experts' groups are empty and masked pairs cost no dW FLOPs (before, frozen experts' dW were computed
    and then zeroed, masked pairs were zero rows in the GEMM)."""
    S, dev = sorted_pairs_S.numel(), sorted_pairs_S.device
    rows = torch.arange(S, device=dev)
    keep = torch.ones(S, dtype=torch.bool, device=dev)
    if pm_TK is not None:
        keep &= pm_TK.reshape(-1)[sorted_pairs_S].bool()
    if em_E is not None:
        expert = torch.searchsorted(off_E1[1:].long(), rows, right=True)  # expert of each sorted row
        keep &= em_E.bool()[expert]
    kept = keep.long().cumsum(0)
    n_kept = kept[-1:]
    dest = torch.where(keep, kept - 1, n_kept + rows - kept)  # the others after all the kept rows, in order
    src = torch.empty_like(rows)
    src[dest] = rows
    ends = torch.cat([kept.new_zeros(1), kept])[off_E1[1:].long()]  # kept rows up to each expert's end
    return src, ends.to(torch.int32)


class _GroupedMMExperts(torch.autograd.Function):
    """SwiGLU experts with the four GEMMs (and both dW) on ``torch._grouped_mm``; same contract and masks as
    :func:`desmoe.ops.triton_experts.moe_experts`. Saves x, the weights, the routing metadata and the gate|up
    pre-activation."""

    @staticmethod
    def forward(ctx, x_TD, w1, w2, ids_TK, w_TK, em, pm):
        T, K, E = x_TD.shape[0], ids_TK.shape[1], w1.shape[0]
        from .triton_permute import routing_metadata

        plan = routing_metadata(ids_TK, E, 0)
        sp, off, tok = plan.sorted_pairs_S.long(), plan.offsets_E1, plan.sorted_tok_S.long()
        ends = off[1:]
        from . import triton_glue  # the Triton backend's engine: Triton is there (not at import: CPU installs)

        gu = torch._grouped_mm(x_TD[tok], w1.transpose(1, 2), offs=ends)  # [S, 2I], sorted rows
        h = triton_glue.swiglu_forward(gu)  # one pass, float32 in registers
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=ends)  # [S, D]
        from .triton_common import combine

        out = combine(_to_pair_rows(y, sp), w_TK.contiguous(), T, K)
        ctx.save_for_backward(x_TD, w1, w2, w_TK, sp, off, tok, gu, em, pm)
        return out

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w1, w2, w_TK, sp, off, tok, gu, em, pm = ctx.saved_tensors
        T, K = x_TD.shape[0], w_TK.shape[1]
        ends = off[1:]
        from . import triton_glue
        from .triton_common import mask_u8

        dout_s = dout_TD.contiguous()[tok]
        dh_u = torch._grouped_mm(dout_s, w2, offs=ends)  # dout[t] @ W_down[e], [S, I]
        # one pass: d(gate|up), hw = h * w * mask (dW_down's operand) and the routing-weight gradient per pair
        pm_u8 = None if pm is None else mask_u8(pm, pm)
        dgu, hw, dweights = triton_glue.swiglu_backward(dh_u, gu, sp.to(torch.int32), w_TK.reshape(-1).float(),
                                                        pm_u8)
        dx = None
        if ctx.needs_input_grad[0]:
            from .triton_common import combine

            dx = combine(_to_pair_rows(torch._grouped_mm(dgu, w1, offs=ends), sp), None, T, K)
        dw1 = dw2 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if em is None and pm is None:
                dw1 = torch._grouped_mm(dgu.t(), x_TD[tok], offs=ends)  # [E, 2I, D]
                dw2 = torch._grouped_mm(dout_s.t(), hw, offs=ends)  # [E, D, I]
            else:  # only the trainable rows: frozen experts' groups empty, masked pairs in no group
                src, ends_dw = _trainable_rows(off, sp, em, pm)
                dw1 = torch._grouped_mm(dgu[src].t(), x_TD[tok[src]], offs=ends_dw)
                dw2 = torch._grouped_mm(dout_s[src].t(), hw[src], offs=ends_dw)
                ends = ends_dw
            # an expert with no (trainable) rows: its slice is not written by every grouped GEMM, so it is zeroed
            # in place, touching only those slices
            keep = _nonempty_groups(ends)
            triton_glue.zero_experts_(dw1, keep)
            triton_glue.zero_experts_(dw2, keep)
        dwts = dweights.view(T, K).to(w_TK.dtype) if ctx.needs_input_grad[4] else None
        return dx, dw1, dw2, None, dwts, None, None


def moe_experts_grouped_mm(
    x_TD: Tensor, w_gate_up_E2ID: Tensor, w_down_EDI: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *,
    expert_trainable_E: Tensor | None = None, pair_trainable_TK: Tensor | None = None,
) -> Tensor:
    """SiLU SwiGLU experts in the standard layout with ``torch._grouped_mm`` GEMMs inside desmoe's O(S) Triton
    metadata, gather/scatter, deterministic combine and masks: the Triton backend's coarse-shape GEMM engine
    (``grouped_mm`` in :func:`desmoe.ops.dispatch.experts_impl`, which also sends it only non-empty inputs)."""
    # an autograd.Function has no Autocast kernel: the same rule as the custom ops, applied at its entry (the casts
    # are autograd ops, so the fp32 masters get fp32 gradients)
    x_TD, w_gate_up_E2ID, w_down_EDI = _autocast.cast_operands(x_TD, w_gate_up_E2ID, w_down_EDI)
    return _GroupedMMExperts.apply(x_TD, w_gate_up_E2ID, w_down_EDI, topk_ids_TK, topk_weights_TK,
                                   expert_trainable_E, pair_trainable_TK)
