"""nn.Modules and module-level forwards that put desmoe ops inside Hugging Face MoE blocks.

- :class:`TopKRouter` replaces a model's router module. It *shares* the original ``weight`` Parameter (and the
  DeepSeek-V3 ``e_score_correction_bias`` buffer) — no copies, same state-dict keys, so ``save_pretrained``
  output loads in stock ``transformers``. It returns ``(logits, weights, ids)`` like the HF routers, optionally
  adds a residual logit module (DES-MoE's ALR) and records what it routed for the method layer.
- :func:`desmoe_experts_forward` is registered with transformers' ``ExpertsInterface`` under the name
  ``"desmoe"``; it runs on the HF experts module's own 3-D parameters and honours the DES-MoE masks set on
  that module (see :func:`set_expert_masks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops import reference


@dataclass(frozen=True)
class RouterSpec:
    """How a model family turns router logits into top-k weights (mirrors its HF router exactly)."""

    top_k: int
    num_experts: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    scaling: float = 1.0
    renorm_eps: float = 0.0
    masked_value: float | None = None
    fp32_logits: bool = False  # compute logits as float32 linear (DeepSeek) instead of in the model dtype
    weights_dtype: str = "float32"  # "float32" or "logits": dtype of returned weights
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.weights_dtype not in ("float32", "logits"):
            raise ValueError(f"weights_dtype must be 'float32' or 'logits', got {self.weights_dtype!r}")


class TopKRouter(nn.Module):
    """Router over a pretrained gate weight ``[E, D]``, computed by :func:`desmoe.ops.topk_route`.

    Attributes set by the method layer (all optional):
        residual: module mapping ``x_TD -> delta_logits_TE`` added to the pretrained logits (ALR).
        record: when True (or ``"kd"``), ``last`` holds ``{"x_TD", "base_logits_TE", "logits_TE", "topk_ids_TK",
            "topk_weights_TK", "kd_student_logits_TE"}`` of the latest forward for KD and routing statistics;
            ``x_TD`` and ``base_logits_TE`` are detached, ``logits_TE`` keeps its graph (the pretraining
            load-balancing loss); with ``"kd"`` and a residual, ``kd_student_logits_TE`` is
            ``base_logits.detach() + residual(x.detach())`` (else None).
    """

    def __init__(self, weight: nn.Parameter, spec: RouterSpec, bias_E: torch.Tensor | None = None, backend=None):
        # nn.Module's init directly: patch() may mix the model's own router class in after this one (so
        # transformers' output recorders, which match by isinstance, still see a router), and that class's
        # __init__ takes a config we do not have.
        nn.Module.__init__(self)
        if weight.dim() != 2 or weight.shape[0] != spec.num_experts:
            raise ValueError(f"router weight must be [E={spec.num_experts}, D], got {tuple(weight.shape)}")
        self.weight = weight  # the same Parameter object as the original router's
        if bias_E is not None:
            self.register_buffer("e_score_correction_bias", bias_E)
        else:
            self.e_score_correction_bias = None
        self.spec = spec
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.hidden_dim = weight.shape[1]
        self.backend = backend
        self.residual: nn.Module | None = None
        self.record = False
        self.last: dict | None = None

    def base_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.spec.fp32_logits:
            return F.linear(x_TD.float(), self.weight.float())
        return F.linear(x_TD, self.weight)

    def forward(self, hidden_states: torch.Tensor):
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        base_TE = self.base_logits(x_TD)
        logits_TE = base_TE if self.residual is None else base_TE + self.residual(x_TD).to(base_TE.dtype)
        s = self.spec
        weights_TK, ids_TK = ops.topk_route(
            logits_TE, s.top_k, scoring=s.scoring, renormalize=s.renormalize, bias_E=self.e_score_correction_bias,
            n_group=s.n_group, topk_group=s.topk_group, group_score=s.group_score, scaling=s.scaling,
            renorm_eps=s.renorm_eps, masked_value=s.masked_value, backend=self.backend,
        )
        if s.weights_dtype == "logits":
            weights_TK = weights_TK.to(logits_TE.dtype)
        if self.record:
            # record == "kd": the ALR student for KD on the detached input, inside this forward (under FSDP2 the
            # ALR's parameters are only gathered here), so KD reaches the ALR only
            kd_TE = (base_TE.detach() + self.residual(x_TD.detach()).to(base_TE.dtype)
                     if self.record == "kd" and self.residual is not None else None)
            self.last = {"kd_student_logits_TE": kd_TE, "x_TD": x_TD.detach(), "base_logits_TE": base_TE.detach(), "logits_TE": logits_TE,
                         "topk_ids_TK": ids_TK, "topk_weights_TK": weights_TK}
        return logits_TE, weights_TK, ids_TK

    def extra_repr(self) -> str:
        return f"{self.num_experts}, {self.hidden_dim}, spec={self.spec}"


# --- experts -----------------------------------------------------------------------------------------------

_ACT_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "relu": "relu"}


def activation_name(hidden_act: str) -> str:
    """Map a transformers ``hidden_act`` string to a desmoe activation name, or raise ``ValueError``."""
    try:
        return _ACT_NAMES[hidden_act]
    except KeyError:
        raise ValueError(
            f"hidden_act {hidden_act!r} is not supported by desmoe experts; supported: {sorted(_ACT_NAMES)}"
        ) from None


def set_expert_masks(
    experts: nn.Module,
    *,
    expert_trainable_E: torch.Tensor | None = None,
    token_domains_T: torch.Tensor | None = None,
    domain_expert_mask_ME: torch.Tensor | None = None,
) -> None:
    """Set (or clear, with ``None``) the DES-MoE gradient masks an experts module applies in its backward.

    ``expert_trainable_E``: experts with False get no weight gradient. ``token_domains_T`` (int, one per
    flattened token of the next forward) with ``domain_expert_mask_ME`` (bool [M, E]): a (token, expert) pair
    updates that expert only if the token's domain owns it (per-token masking for mixed-domain batches).
    """
    experts.desmoe_expert_trainable_E = expert_trainable_E
    experts.desmoe_token_domains_T = token_domains_T
    experts.desmoe_domain_expert_mask_ME = domain_expert_mask_ME


def pair_trainable_from_domains(
    token_domains_T: torch.Tensor, topk_ids_TK: torch.Tensor, domain_expert_mask_ME: torch.Tensor
) -> torch.Tensor:
    """``pair_trainable_TK[t, k] = mask_ME[domain[t], ids[t, k]]``; tokens with a negative domain (padding)
    train nothing."""
    if token_domains_T.shape[0] != topk_ids_TK.shape[0]:
        raise ValueError(
            f"token_domains_T has {token_domains_T.shape[0]} entries but the forward routed "
            f"{topk_ids_TK.shape[0]} tokens; set the domains for the exact batch (flattened B*S)"
        )
    return ops.pair_mask(token_domains_T, topk_ids_TK[None], domain_expert_mask_ME, validate=False)[0]


def desmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` implementation ``"desmoe"`` (runs on the HF module's own parameters)."""
    activation = getattr(self, "_desmoe_activation", None)
    if activation is None:
        activation = activation_name(getattr(self.config, "hidden_act", "silu"))
    pair_TK = None
    domains_T = getattr(self, "desmoe_token_domains_T", None)
    if domains_T is not None:
        pair_TK = pair_trainable_from_domains(domains_T, top_k_index, self.desmoe_domain_expert_mask_ME)
    return ops.moe_experts(
        hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights,
        activation=activation, expert_trainable_E=getattr(self, "desmoe_expert_trainable_E", None),
        pair_trainable_TK=pair_TK, backend=getattr(self, "_desmoe_backend", None), validate_ids=False,
    )
