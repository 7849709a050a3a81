"""Plain-PyTorch reference ops: the CPU fallback and the test oracle for every fast path.

Readable first, reasonably fast second; differentiable through ordinary autograd. Weight layout is the one
Hugging Face ``transformers`` v5 uses for its fused experts (no copies, no transposes materialised):

    w_gate_up_E2ID  [E, 2*I, D]   rows [0, I) are the gate projection, rows [I, 2I) the up projection
    w_down_EDI      [E, D, I]

gpt-oss (``transformers``' ``GptOssExperts``) stores its experts differently, and the ops read that layout as it is
(``transposed=True, interleaved=True``, no weight copies), with a bias on each projection:

    w_gate_up  [E, D, 2*I]  columns 0, 2, 4 ... are the gate projection, 1, 3, 5 ... the up projection
    w_down     [E, I, D]
    b_gate_up  [E, 2*I]  (same interleaving)        b_down  [E, D]

and its clamped SwiGLU (``activation="clamped_swiglu"``): ``gate = min(gate, limit)``, ``up = clamp(up, -limit,
limit)``, ``a = (up + 1) * gate * sigmoid(alpha * gate)`` (gradients as autograd's ``clamp``: they pass where the
input lies inside the closed interval, the edges included).

Shape suffixes: T tokens, D hidden, I expert intermediate, E experts, K top-k, S = T*K (token, expert) pairs.
Inputs are validated by the dispatch layer (``desmoe.ops``), not here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import RouterSpec, as_spec

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# gated activations that are not act(gate) * up: their own formula (see clamped_swiglu)
GATED_ACTIVATIONS = ("clamped_swiglu",)
ALL_ACTIVATIONS = tuple(ACTIVATIONS) + GATED_ACTIVATIONS
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's defaults (config swiglu_alpha / swiglu_limit)


def split_gate_up(h_S2I: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` of the gate|up projection's output: halves, or even/odd columns when ``interleaved``."""
    if interleaved:
        return h_S2I[..., 0::2], h_S2I[..., 1::2]
    return h_S2I.chunk(2, dim=-1)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss's gated activation: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate,
    limit)`` (``GptOssExperts._apply_gate``)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def topk_route_reference(
    logits_TE: torch.Tensor, spec: RouterSpec | int, *, bias_E: torch.Tensor | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing from router logits, as the Hugging Face routers compute it.

    Args:
        logits_TE: router logits [T, E] (any float dtype; scoring runs in float32).
        spec: a :class:`~desmoe.ops.spec.RouterSpec`, or ``top_k`` with the spec's fields as keywords.
        bias_E: score-correction bias added to the scores for *selection only* (DeepSeek-V3); the returned
            weights are the unbiased scores.

    The steps, each one the HF routers' own: scores = softmax|sigmoid(logits); choice = scores + bias; with
    group-limited routing, experts are split into ``n_group`` contiguous groups ranked by their ``"max"`` choice
    or the sum of their top-2 (``"top2sum"``), and the experts outside the best ``topk_group`` groups get the
    choice ``masked_value`` (``-inf`` by default). The ids are ``torch.topk(choice, K)``: when K exceeds the
    eligible experts, the rest come from the masked ones, tied at ``masked_value`` and broken as ``torch.topk``
    breaks them (so on the same device, the same set as the stock router). The weights are the unbiased scores
    of those ids (or, with ``weights_from_masked``, the masked scores: ``masked_value`` for a masked expert),
    renormalised by their sum + ``renorm_eps`` (floored at ``renorm_min``) if ``renormalize``, then times
    ``scaling``.

    Returns:
        ``(topk_weights_TK float32, topk_ids_TK int64)``, ids in descending choice order.
    """
    spec = as_spec(spec, logits_TE.shape[-1], options)
    E = spec.num_experts
    logits32_TE = logits_TE.float()
    scores_TE = logits32_TE.softmax(dim=-1) if spec.scoring == "softmax" else logits32_TE.sigmoid()
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    eligible_TE = None
    if spec.grouped:
        grouped = choice_TE.view(-1, spec.n_group, E // spec.n_group)
        if spec.group_score == "top2sum":
            group_scores_TG = grouped.topk(min(2, E // spec.n_group), dim=-1).values.sum(dim=-1)
        else:
            group_scores_TG = grouped.max(dim=-1).values
        group_idx = group_scores_TG.topk(spec.topk_group, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx, True)
        eligible_TE = group_mask_TG.unsqueeze(-1).expand(-1, spec.n_group, E // spec.n_group).reshape(-1, E)
        fill = float("-inf") if spec.masked_value is None else spec.masked_value
        choice_TE = choice_TE.masked_fill(~eligible_TE, fill)
    topk_ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
    if spec.weights_from_masked and eligible_TE is not None:
        fill = float("-inf") if spec.masked_value is None else spec.masked_value
        topk_weights_TK = scores_TE.masked_fill(~eligible_TE, fill).gather(1, topk_ids_TK)
    else:
        topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if spec.renormalize:
        denom_T1 = topk_weights_TK.sum(dim=-1, keepdim=True) + spec.renorm_eps
        if spec.renorm_min:
            denom_T1 = denom_T1.clamp(min=spec.renorm_min)
        topk_weights_TK = topk_weights_TK / denom_T1
    if spec.scaling != 1.0:
        topk_weights_TK = topk_weights_TK * spec.scaling
    return topk_weights_TK, topk_ids_TK


def expert_counts_reference(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, ``counts_E`` int32 (a token counts once per selection)."""
    return torch.bincount(topk_ids_TK.reshape(-1).long(), minlength=num_experts).to(torch.int32)


def permute_reference(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-major order of the (token, k) pairs.

    Returns:
        ``sorted_pairs_S`` int64: flat pair indices (``t * K + k``) grouped by expert, stable within an expert
        (ascending pair index), and ``offsets_E1`` int32 [E+1]: expert e owns
        ``sorted_pairs_S[offsets[e]:offsets[e+1]]``.
    """
    flat_S = topk_ids_TK.reshape(-1).long()
    sorted_pairs_S = torch.sort(flat_S, stable=True).indices
    counts_E = torch.bincount(flat_S, minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, dim=0).to(torch.int32)
    return sorted_pairs_S, offsets_E1


def _gated(h_S2I: torch.Tensor, activation: str, interleaved: bool = False, alpha: float = SWIGLU_ALPHA,
           limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    gate_SI, up_SI = split_gate_up(h_S2I, interleaved)
    if activation == "clamped_swiglu":
        return clamped_swiglu(gate_SI, up_SI, alpha, limit)
    return ACTIVATIONS[activation](gate_SI) * up_SI


def _proj(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x @ w`` for a weight stored ``[in, out]`` (transposed), else ``x @ w.T`` (``[out, in]``, nn.Linear's)."""
    return x @ w if transposed else F.linear(x, w)


def moe_experts_reference(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    *,
    activation: str = "silu",
    expert_trainable_E: torch.Tensor | None = None,
    pair_trainable_TK: torch.Tensor | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """Gated (SwiGLU) expert MLP with routing-weighted combine.

    ``out[t] = sum_k w[t,k] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t,k]``.

    gpt-oss: ``b_gate_up [E, 2I]`` / ``b_down [E, D]`` are added after each projection; ``transposed`` weights
    are stored ``[E, D, 2I]`` / ``[E, I, D]``, ``interleaved`` gate/up columns alternate (see the module
    docstring); ``activation="clamped_swiglu"`` takes ``alpha`` and ``limit``. A masked pair adds nothing to
    either bias's gradient either.

    Masks (DES-MoE): a pair whose expert has ``expert_trainable_E[e] == False``, or whose own
    ``pair_trainable_TK[t,k] == False``, contributes nothing to that expert's weight gradients. Values and every
    other gradient (dX, routing weights) are unchanged. Combine accumulates in float32 (float64 for float64 inputs)
    and returns ``x``'s dtype.
    """
    T, K = topk_ids_TK.shape
    E = w_gate_up_E2ID.shape[0]
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32 accumulate; fp64 stays fp64
    out_TD = torch.zeros(T, x_TD.shape[1], dtype=acc_dtype, device=x_TD.device)
    flat_ids_S = topk_ids_TK.reshape(-1)
    trainable_S = None
    if pair_trainable_TK is not None:
        trainable_S = pair_trainable_TK.reshape(-1).bool()
    if expert_trainable_E is not None:
        by_expert_S = expert_trainable_E.bool()[flat_ids_S]
        trainable_S = by_expert_S if trainable_S is None else trainable_S & by_expert_S
    sorted_pairs_S, offsets_E1 = permute_reference(topk_ids_TK, E)
    bounds = offsets_E1.tolist()  # one host sync; the reference is not the fast path
    w_flat_S = topk_weights_TK.reshape(-1)
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        pairs = sorted_pairs_S[lo:hi]
        tokens = pairs // K
        if trainable_S is None:
            groups = [(pairs, tokens, True)]
        else:
            tr = trainable_S[pairs]
            groups = [(pairs[tr], tokens[tr], True), (pairs[~tr], tokens[~tr], False)]
        for p, t, trainable in groups:
            if p.numel() == 0:
                continue
            w1 = w_gate_up_E2ID[e] if trainable else w_gate_up_E2ID[e].detach()
            w2 = w_down_EDI[e] if trainable else w_down_EDI[e].detach()
            h = _proj(x_TD[t], w1, transposed)
            if b_gate_up is not None:
                h = h + (b_gate_up[e] if trainable else b_gate_up[e].detach())
            h = _gated(h, activation, interleaved, alpha, limit)
            y = _proj(h, w2, transposed)
            if b_down is not None:
                y = y + (b_down[e] if trainable else b_down[e].detach())
            out_TD = out_TD.index_add(0, t, y.to(acc_dtype) * w_flat_S[p].to(acc_dtype).unsqueeze(-1))
    return out_TD.to(x_TD.dtype)


def moe_experts_dense_reference(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    *,
    activation: str = "silu",
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """The same function computed densely per pair in float64: a second, independent oracle for tests."""
    x = x_TD.double()
    w1 = w_gate_up_E2ID.double()[topk_ids_TK]  # [T, K, 2I, D] ([T, K, D, 2I] transposed)
    w2 = w_down_EDI.double()[topk_ids_TK]  # [T, K, D, I] ([T, K, I, D] transposed)
    h = torch.einsum("td,tkdi->tki" if transposed else "td,tkid->tki", x, w1)
    if b_gate_up is not None:
        h = h + b_gate_up.double()[topk_ids_TK]
    h = _gated(h, activation, interleaved, alpha, limit)
    y = torch.einsum("tki,tkid->tkd" if transposed else "tki,tkdi->tkd", h, w2)
    if b_down is not None:
        y = y + b_down.double()[topk_ids_TK]
    return (y * topk_weights_TK.double().unsqueeze(-1)).sum(dim=1)


def pair_mask_reference(
    token_domains_T: torch.Tensor, topk_ids_TK: torch.Tensor, domain_expert_mask_ME: torch.Tensor
) -> torch.Tensor:
    """DES-MoE per-token masking: ``pair_trainable_TK[t, k] = mask_ME[domain[t], ids[t, k]]``.

    Tokens with a negative domain id (padding, unlabelled) get False for every pair.
    """
    valid_T = token_domains_T >= 0
    rows_TE = domain_expert_mask_ME.bool()[token_domains_T.long().clamp(min=0)]
    return rows_TE.gather(1, topk_ids_TK.long()) & valid_T.unsqueeze(1)


def swiglu_glue_forward_reference(gu_SN2: torch.Tensor) -> torch.Tensor:
    """``h = silu(g) * u`` for ``gu = [g | u]`` rows, in float32, returned in gu's dtype (the oracle of
    :func:`desmoe.ops.triton_glue.swiglu_forward`)."""
    N = gu_SN2.shape[1] // 2
    g, u = gu_SN2[:, :N].float(), gu_SN2[:, N:].float()
    return (g * torch.sigmoid(g) * u).to(gu_SN2.dtype)


def swiglu_glue_backward_reference(dhu_SN: torch.Tensor, gu_SN2: torch.Tensor, sorted_pairs_S: torch.Tensor,
                                   weights_P: torch.Tensor, pair_mask_P: torch.Tensor | None):
    """``(dgu, hw, dweights)`` of the grouped_mm engine's backward epilogue, as
    :func:`desmoe.ops.triton_glue.swiglu_backward` (its oracle): ``dh = dh_u * w``, ``d(gate|up) = [dh * u * s *
    (1 + g (1 - s)), dh * g * s]``, ``hw = h * w * mask``, ``dweights[pair] = dh_u . h``."""
    N = gu_SN2.shape[1] // 2
    sp = sorted_pairs_S.long()
    dhu = dhu_SN.float()
    g, u = gu_SN2[:, :N].float(), gu_SN2[:, N:].float()
    sig = torch.sigmoid(g)
    h = g * sig * u
    w = weights_P.reshape(-1)[sp].float()
    scale = w if pair_mask_P is None else w * pair_mask_P.reshape(-1)[sp].float()
    dweights = torch.zeros(weights_P.numel(), dtype=torch.float32, device=dhu.device)
    dweights[sp] = (dhu * h).sum(-1)
    dh = dhu * w[:, None]
    dgu = torch.cat([dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig], dim=1).to(gu_SN2.dtype)
    return dgu, (h * scale[:, None]).to(gu_SN2.dtype), dweights


# --- References for the C++/CUDA extension's ops (desmoe.ops._C); readable, host syncs allowed. -----------------------


def mask_expert_grads_reference(grads: list, masks: list, scale: float = 0.0) -> None:
    """In place: rows ``e`` of ``grads[l]`` ([E, ...]) with ``masks[l][e] == False`` become ``row * scale``
    (exact zeros when ``scale == 0``, even over NaN/Inf); rows with True are not touched. ``None`` grads are
    skipped."""
    for g, m in zip(grads, masks):
        if g is None:
            continue
        frozen = (~m.to(device=g.device, dtype=torch.bool)).nonzero().squeeze(1)
        if frozen.numel() == 0:
            continue
        if scale == 0.0:
            g.index_fill_(0, frozen, 0)
        else:
            g[frozen] = g[frozen] * scale


def pair_mask_layers_reference(
    token_domains_T: torch.Tensor, topk_ids_LTK: torch.Tensor, domain_expert_mask_LME: torch.Tensor
) -> torch.Tensor:
    """``pair_mask_reference`` for every layer: bool [L, T, K]; the mask is [L, M, E] or one [M, E] for all."""
    L = topk_ids_LTK.shape[0]
    masks = [domain_expert_mask_LME] * L if domain_expert_mask_LME.dim() == 2 else list(domain_expert_mask_LME)
    if L == 0:
        return torch.zeros(topk_ids_LTK.shape, dtype=torch.bool, device=topk_ids_LTK.device)
    return torch.stack([pair_mask_reference(token_domains_T, topk_ids_LTK[l], masks[l]) for l in range(L)])


def routing_stats_reference(
    topk_ids_LTK: torch.Tensor,
    token_domains_T: torch.Tensor,
    num_domains: int,
    num_experts: int,
    topk_weights_LTK: torch.Tensor | None = None,
    valid_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer routing statistics over valid tokens (``valid_T``, default all).

    Returns ``counts_LME`` int64 (selections per layer, domain, expert; tokens with domain < 0 excluded),
    ``mass_LME`` float32 (the same, summing routing weights in float64; zeros without weights) and ``load_LE``
    int64 (selections per expert, every valid token).
    """
    L, T, K = topk_ids_LTK.shape
    M, E = num_domains, num_experts
    dev = topk_ids_LTK.device
    ids_LTK = topk_ids_LTK.long()
    dom_T = token_domains_T.long()
    valid_T = torch.ones(T, dtype=torch.bool, device=dev) if valid_T is None else valid_T.bool()
    labelled_T = valid_T & (dom_T >= 0)
    layer_L11 = torch.arange(L, device=dev).view(L, 1, 1)
    load_LE = torch.bincount((layer_L11 * E + ids_LTK)[:, valid_T].reshape(-1), minlength=L * E).view(L, E)
    flat_LTK = (layer_L11 * M + dom_T.clamp(min=0).view(1, T, 1)) * E + ids_LTK
    flat = flat_LTK[:, labelled_T].reshape(-1)
    counts_LME = torch.bincount(flat, minlength=L * M * E).view(L, M, E)
    if topk_weights_LTK is None:
        mass_LME = torch.zeros(L, M, E, dtype=torch.float32, device=dev)
    else:
        w = topk_weights_LTK.double()[:, labelled_T].reshape(-1)
        mass_LME = torch.bincount(flat, weights=w, minlength=L * M * E).view(L, M, E).float()
    return counts_LME, mass_LME, load_LE


def affinity_ema_reference(A_LME: torch.Tensor, counts_LME: torch.Tensor, momentum: float) -> torch.Tensor:
    """In place ``A = momentum * A + (1 - momentum) * counts / rowsum(counts)`` per (layer, domain) row, in
    float64; rows whose count sum is zero keep their value. Returns ``A_LME``."""
    total_LM1 = counts_LME.sum(dim=-1, keepdim=True)
    frac = counts_LME.double() / total_LM1.double().clamp(min=1)
    new = momentum * A_LME.double() + (1.0 - momentum) * frac
    A_LME.copy_(torch.where(total_LM1 != 0, new, A_LME.double()).to(A_LME.dtype))
    return A_LME

