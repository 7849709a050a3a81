"""ALR (Adaptive Lightweight Router) and its distillation loss.

Each MoE layer's pretrained router keeps its weight frozen and becomes the KD *teacher*; a small MLP
(D -> W -> E, GELU; W = round(method.alr_expansion·D): 0.25·D by default, the paper's 4·D with 4) adds a residual
to its logits and is the trainable part of the *student*
(``student = teacher + ALR(x)``). The output layer is zero-initialised, so at step 0 the patched model routes
exactly like the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LAMBDA_SCHEDULES = ("linear", "cosine", "exponential", "constant")


def alr_width(hidden_dim: int, expansion: float) -> int:
    """The ALR's hidden width: ``round(expansion·D)``, at least 1."""
    return max(1, int(round(float(expansion) * hidden_dim)))


def alr_cost(hidden_dim: int, num_experts: int, expansion: float) -> tuple[int, int]:
    """``(parameters, forward FLOPs per token)`` of one layer's ALR (weights and biases; 2 FLOPs per MAC). Training
    adds a backward of about twice the forward while the ALR trains (dW and dX)."""
    h = alr_width(hidden_dim, expansion)
    return hidden_dim * h + h + h * num_experts + num_experts, 2 * (hidden_dim * h + h * num_experts)


class _TwoCopies(torch.autograd.Function):
    """One evaluation of the ALR MLP returned twice with identical values: ``(routing copy, KD copy)``.

    The backward sums both copies' gradients for the parameters, and takes dX from the routing copy's alone, so the
    KD term reaches the ALR's parameters and never ``x`` (the layer below), as ``ALR(x.detach())`` would, at the cost
    of one forward instead of two and one dW instead of two. Compute dtype: the autocast dtype when autocast is on
    for ``x``'s device (what ``nn.Linear`` would use), else the weights' dtype; parameter gradients come back in the
    parameters' dtype. Deterministic, and a replay (activation checkpointing) saves the same tensors."""

    @staticmethod
    def forward(ctx, x_TD, w_up, b_up, w_down, b_down):
        dev = x_TD.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w_up.dtype
        with torch.autocast(dev, enabled=False):
            x = x_TD.to(dt)
            wu, wd = w_up.to(dt), w_down.to(dt)
            pre_TH = F.linear(x, wu, b_up.to(dt))
            out_TE = F.linear(F.gelu(pre_TH), wd, b_down.to(dt))
        ctx.save_for_backward(x, pre_TH, wu, wd)
        ctx.x_dtype, ctx.dtypes = x_TD.dtype, (w_up.dtype, b_up.dtype, w_down.dtype, b_down.dtype)
        ctx.set_materialize_grads(False)
        return out_TE, out_TE.clone()

    @staticmethod
    def backward(ctx, g_route_TE, g_kd_TE):
        x, pre_TH, wu, wd = ctx.saved_tensors
        dev = x.device.type
        need_x, need_wu, need_bu, need_wd, need_bd = ctx.needs_input_grad
        dx = dwu = dbu = dwd = dbd = None
        with torch.autocast(dev, enabled=False):
            g_TE = g_route_TE if g_kd_TE is None else g_kd_TE if g_route_TE is None else g_route_TE + g_kd_TE
            if g_TE is None:
                return None, None, None, None, None
            g_TE = g_TE.to(wd.dtype)
            if need_wd:
                dwd = (g_TE.t() @ F.gelu(pre_TH)).to(ctx.dtypes[2])
            if need_bd:
                dbd = g_TE.sum(0).to(ctx.dtypes[3])
            if need_wu or need_bu:
                dpre_TH = torch.ops.aten.gelu_backward(g_TE @ wd, pre_TH)
                if need_wu:
                    dwu = (dpre_TH.t() @ x).to(ctx.dtypes[0])
                if need_bu:
                    dbu = dpre_TH.sum(0).to(ctx.dtypes[1])
            if need_x and g_route_TE is not None:
                if g_kd_TE is None and (need_wu or need_bu):
                    dpre_route_TH = dpre_TH  # no KD gradient: the same chain
                else:
                    dpre_route_TH = torch.ops.aten.gelu_backward(g_route_TE.to(wd.dtype) @ wd, pre_TH)
                dx = (dpre_route_TH @ wu).to(ctx.x_dtype)
        return dx, dwu, dbu, dwd, dbd


class ALRResidual(nn.Module):
    """``x_TD -> delta_logits_TE``: Linear(D, H) (Kaiming init) -> GELU -> Linear(H, E) (zero init), with the
    hidden width ``H = round(expansion·D)`` (:func:`alr_width`)."""

    shares_kd_evaluation = True  # the router calls forward(x, pair=True) when it also needs the KD student

    def __init__(self, hidden_dim: int, num_experts: int, expansion: float = 4):
        super().__init__()
        if hidden_dim < 1 or num_experts < 1 or not expansion > 0:
            raise ValueError(f"hidden_dim, num_experts must be >= 1 and expansion > 0, got {hidden_dim}, "
                             f"{num_experts}, {expansion}")
        h = alr_width(hidden_dim, expansion)
        self.up = nn.Linear(hidden_dim, h)
        self.down = nn.Linear(h, num_experts)
        nn.init.kaiming_normal_(self.up.weight, nonlinearity="relu")
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x_TD: torch.Tensor, pair: bool = False):
        """``delta_logits_TE``; with ``pair=True`` the tuple ``(routing copy, KD copy)`` of it from one evaluation
        (:class:`_TwoCopies`): the KD copy's gradient reaches the parameters only, as ``self(x_TD.detach())``'s
        would. Through ``__call__`` either way, so module hooks (FSDP2's gathering) run."""
        if pair:
            x = x_TD if torch.is_autocast_enabled(x_TD.device.type) else x_TD.to(self.up.weight.dtype)
            return _TwoCopies.apply(x, self.up.weight, self.up.bias, self.down.weight, self.down.bias)
        # run in the parameters' dtype (fp32 master weights under autocast still fine)
        return self.down(F.gelu(self.up(x_TD.to(self.up.weight.dtype))))


def attach_alr(routers, expansion: float = 4) -> list[ALRResidual]:
    """Give every :class:`desmoe.layers.TopKRouter` in ``routers`` a fresh ALR residual (on its device)."""
    out = []
    for r in routers:
        alr = ALRResidual(r.hidden_dim, r.num_experts, expansion).to(device=r.weight.device)
        r.residual = alr
        out.append(alr)
    return out


def detach_alr(routers) -> None:
    for r in routers:
        r.residual = None


def kd_loss(teacher_logits_TE: torch.Tensor, student_logits_TE: torch.Tensor, tau: float = 0.7,
            valid_T: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """``KL(softmax(teacher/tau) || softmax(student/tau))`` averaged (``reduction="mean"``) or summed (``"sum"``)
    over valid tokens (float32 scalar).

    The teacher is detached (the frozen pretrained router). ``valid_T`` (bool) drops padding tokens; with no
    valid token the loss is an exact 0 that still carries the student's graph.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if teacher_logits_TE.shape != student_logits_TE.shape:
        raise ValueError(f"teacher_logits_TE {tuple(teacher_logits_TE.shape)} and student_logits_TE "
                         f"{tuple(student_logits_TE.shape)} must have the same shape")
    log_p_TE = F.log_softmax(teacher_logits_TE.detach().float() / tau, dim=-1)
    log_q_TE = F.log_softmax(student_logits_TE.float() / tau, dim=-1)
    kl_T = (log_p_TE.exp() * (log_p_TE - log_q_TE)).sum(-1)
    if valid_T is None:
        return kl_T.mean() if reduction == "mean" else kl_T.sum()
    w_T = valid_T.to(kl_T.dtype).reshape(-1)
    total = (kl_T * w_T).sum()
    return total / w_T.sum().clamp(min=1.0) if reduction == "mean" else total


def lambda_at(alpha: float, *, schedule: str = "linear", lambda_max: float = 0.5, end: float = 0.7,
              decay_rate: float = 5.0) -> float:
    """KD weight λ(α), α = step/T in [0, 1]: starts at ``lambda_max``, reaches 0 at ``α = end`` and stays 0.

    linear: ``λmax·(1-x)``; cosine: ``λmax·(1+cos πx)/2``; exponential: ``λmax·(e^{-rx}-e^{-r})/(1-e^{-r})``
    (shifted so it hits 0 at the end); constant: ``λmax`` throughout (``end`` ignored); ``x = α/end``.
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return float(lambda_max)
    if end <= 0:
        raise ValueError(f"end must be > 0, got {end}")
    x = min(max(alpha / end, 0.0), 1.0)
    if schedule == "linear":
        f = 1.0 - x
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * x))
    else:
        r = decay_rate
        f = (math.exp(-r * x) - math.exp(-r)) / (1.0 - math.exp(-r))
    return float(lambda_max) * f


def alr_summary(model_or_config, expansion: float = 4) -> dict:
    """The ALR's cost on a model (a ``PreTrainedModel`` or its config; nothing is allocated: a config is
    instantiated on the meta device): per layer and in total, its parameters (with their fp32 AdamW state, 16 bytes
    per parameter with the fp32 weight and gradient) and forward FLOPs per token, against the model's active
    parameters per token (all but the input embedding, routed experts counted ``K/E``), whose forward is
    ``2·N_active`` FLOPs per token. Attention's S×S products are left out of both."""
    import torch as _t

    model = model_or_config
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        with _t.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    cfg = model.config
    experts = [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), _t.Tensor)
               and getattr(m, "gate_up_proj").dim() == 3]
    if not experts:
        raise ValueError(f"{type(model).__name__} has no fused MoE experts (3-D gate_up_proj): no ALR to cost")
    E = experts[0].gate_up_proj.shape[0]
    K = int(getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "moe_k", None) or 1)
    D = int(cfg.hidden_size)
    L = len(experts)
    total = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for m in model.modules() if isinstance(m, ALRResidual) for p in m.parameters())  # ALRs attached
    emb = model.get_input_embeddings().weight.numel()
    expert_params = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    active = total - emb - expert_params + expert_params * K / E
    p_layer, f_layer = alr_cost(D, E, expansion)
    return {"expansion": expansion, "width": alr_width(D, expansion), "D": D, "E": E, "K": K, "moe_layers": L,
            "params_per_layer": p_layer, "params": p_layer * L, "train_state_gb_fp32_adamw": 16 * p_layer * L / 1e9,
            "fwd_flops_per_token": f_layer * L, "active_params": int(active),
            "share_of_active_flops": f_layer * L / (2 * active)}


def format_alr_summary(s: dict) -> str:
    """One line for logs: ``ALR (expansion 4, width 8192): 17.3M params/layer × 26 layers = 450M; ...``."""
    return (f"ALR (method.alr_expansion {s['expansion']:g}: width {s['width']}, D {s['D']}, E {s['E']}): "
            f"{s['params_per_layer'] / 1e6:.3g}M params per layer × {s['moe_layers']} MoE layers = "
            f"{s['params'] / 1e6:.4g}M ({s['train_state_gb_fp32_adamw']:.3g} GB weights+grad+AdamW in fp32); "
            f"{s['fwd_flops_per_token'] / 1e6:.4g} MFLOPs/token forward = {100 * s['share_of_active_flops']:.2f}% of "
            f"the model's {2 * s['active_params'] / 1e6:.4g} MFLOPs/token over its {s['active_params'] / 1e6:.4g}M "
            f"active parameters")
