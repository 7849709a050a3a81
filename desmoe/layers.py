"""nn.Modules and module-level forwards that put desmoe ops inside Hugging Face MoE blocks.

- :class:`TopKRouter` replaces a model's router module. It *shares* the original ``weight`` Parameter (and the
  DeepSeek-V3 ``e_score_correction_bias`` buffer) — no copies, same state-dict keys, so ``save_pretrained``
  output loads in stock ``transformers``. It returns ``(logits, weights, ids)`` like the HF routers, optionally
  adds a residual logit module (DES-MoE's ALR) and, inside :func:`desmoe.context.recording`, records what it
  routed.
- :func:`desmoe_experts_forward` is registered with transformers' ``ExpertsInterface`` under the name
  ``"desmoe"``; it runs on the HF experts module's own 3-D parameters and honours the DES-MoE masks held for
  that module (:class:`desmoe.context.MaskScope`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .context import added_loss, expert_masks, recorder
from .ops.spec import RouterSpec  # noqa: F401  (re-exported: desmoe.layers.RouterSpec)


class RouterAddedLoss:
    """A loss a method adds inside every router's forward (DES-MoE's KD), held from a forward through its backward.

    ``loss_fn(teacher_logits_TE, student_logits_TE) -> float32 scalar`` (both on the router's detached input).
    Each router's term is attached to the autograd graph inside the router (:class:`_AddLossInBackward`), the way
    DeepSeek-MoE attaches its auxiliary loss, so its gradient reaches the ALR even when activation checkpointing
    replays the layer inside the backward (reentrant: the first forward builds no graph at all). The term's
    gradient weight ``grad_weight`` (a 0-d tensor) is written in place before the backward reaches the routers
    (by a hook on the combined loss, :meth:`desmoe.method.MethodController.combine`). ``values`` keeps each
    router's term of the first forward (detached), keyed by ``id(router)``: a replay leaves it as it is.
    """

    def __init__(self, loss_fn, device):
        self.loss_fn = loss_fn
        self.grad_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.values: dict[int, torch.Tensor] = {}


class _AddLossInBackward(torch.autograd.Function):
    """Identity on ``x``; in the backward, ``loss`` receives the gradient ``weight`` (a 0-d tensor read then)."""

    @staticmethod
    def forward(ctx, x, loss, weight):
        ctx.weight, ctx.loss_meta = weight, (loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        dtype, device = ctx.loss_meta
        return grad_x, ctx.weight.detach().to(device=device, dtype=dtype, copy=True), None


class TopKRouter(nn.Module):
    """Router over a pretrained gate weight ``[E, D]``, computed by :func:`desmoe.ops.topk_route`.

    The routing options are one :class:`RouterSpec`, passed whole to the op. ``weight_path`` / ``bias_path`` name
    where the weight and the selection bias live when they belong to a submodule adopted from the model's own
    router (e.g. ``"wg.weight"``, ``"moe_statics.e_score_correction_bias"``), so state-dict keys stay the model's.

    Set by the method layer (optional): ``residual``, a module mapping ``x_TD -> delta_logits_TE`` added to the
    pretrained logits (ALR). Held for this router in :mod:`desmoe.context` (not attributes):

    - the recording it writes to (:func:`desmoe.context.recording`): ``{"x_TD", "base_logits_TE", "logits_TE",
      "topk_ids_TK", "topk_weights_TK"}`` of its latest forward for routing statistics; ``x_TD`` and
      ``base_logits_TE`` are detached, ``logits_TE`` keeps its graph (the pretraining load-balancing loss).
      Recording adds no computation, so a forward replayed by activation checkpointing saves the same tensors.
    - the loss a method adds (:class:`desmoe.context.AddedLossScope`, a :class:`RouterAddedLoss`: DES-MoE's KD):
      with a residual, each forward computes its term on the student ``base_logits.detach() +
      residual(x.detach())`` and attaches it to the graph here. A residual with ``shares_kd_evaluation = True``
      (the ALR) is evaluated once for both: ``residual(x, pair=True)`` returns the routing copy and a KD copy
      whose gradient stops at the residual.
    """

    def __init__(self, weight: nn.Parameter, spec: RouterSpec, bias_E: torch.Tensor | None = None, backend=None,
                 *, weight_path: str = "weight", bias_path: str | None = None, logits_bias_path: str | None = None,
                 select=None, input_jitter_noise: float = 0.0):
        # nn.Module's init directly: patch() may mix the model's own router class in after this one (so
        # transformers' output recorders, which match by isinstance, still see a router), and that class's
        # __init__ takes a config we do not have.
        nn.Module.__init__(self)
        if weight.dim() != 2 or weight.shape[0] != spec.num_experts:
            raise ValueError(f"router weight must be [E={spec.num_experts}, D], got {tuple(weight.shape)}")
        self.weight_path = weight_path
        if weight_path == "weight":
            self.weight = weight  # the same Parameter object as the original router's
        if bias_E is not None:
            self.register_buffer("e_score_correction_bias", bias_E)
            bias_path = bias_path or "e_score_correction_bias"
        self.bias_path = bias_path
        # the bias of the logits linear itself (gpt-oss: ``F.linear(x, weight, bias)``), adopted like the weight
        self.logits_bias_path = logits_bias_path
        # a family whose selection the spec cannot express (Phi-3.5-MoE's SparseMixer): its own function,
        # ``select(router, logits_TE) -> (weights_TK, ids_TK)``, run on the (ALR-adjusted) logits; the spec then
        # only describes K and E (and the routing statistics / export use its top-k as the eval-time selection)
        self.select = select
        # training-time multiplicative input jitter, in place on the router's input as the family's router does
        self.input_jitter_noise = float(input_jitter_noise)
        self.spec = spec
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.hidden_dim = weight.shape[1]
        self.backend = backend
        self.index_first = False  # return (ids, weights, logits): the order some families' routers use
        self.residual: nn.Module | None = None

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("weight_path", "weight") != "weight":
            return self._resolve(self.weight_path)
        return super().__getattr__(name)

    def _resolve(self, path: str):
        obj = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def bias_E(self) -> torch.Tensor | None:
        """The selection bias ``[E]`` (None when the family has none)."""
        return None if self.bias_path is None else self._resolve(self.bias_path).reshape(-1)

    def routing_parameters(self) -> list[torch.Tensor]:
        """The pretrained router's own parameters: the weight, and the logits bias where the family has one."""
        b = self.logits_bias()
        return [self.weight] + ([b] if isinstance(b, nn.Parameter) else [])

    def logits_bias(self) -> torch.Tensor | None:
        """The logits linear's bias ``[E]`` (None when the family has none)."""
        return None if self.logits_bias_path is None else self._resolve(self.logits_bias_path)

    def base_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        w = self._resolve(self.weight_path)
        b = self.logits_bias()
        if self.spec.logits_dtype == "float32":
            return F.linear(x_TD.float(), w.float(), None if b is None else b.float())
        if self.spec.logits_dtype == "float32_exact":
            with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even inside an autocast region
                return F.linear(x_TD.float(), w.float(), None if b is None else b.float())
        if self.spec.logits_dtype == "weight":
            return F.linear(x_TD.to(w.dtype), w, b)
        if self.spec.logits_dtype == "model_float":
            return F.linear(x_TD, w, b).float()
        return F.linear(x_TD, w, b)

    def forward(self, hidden_states: torch.Tensor, expert_bias: torch.Tensor | None = None):
        """``(logits_TE, weights_TK, ids_TK)`` like the HF routers; ``expert_bias`` is the selection bias a
        family passes in (LFM2-MoE) instead of holding it."""
        if self.training and self.input_jitter_noise > 0:  # in place, as the family's router (the block sees it)
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter_noise,
                                                                      1.0 + self.input_jitter_noise)
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        base_TE = self.base_logits(x_TD)
        added, kd_TE = added_loss(self), None
        if self.residual is None:
            logits_TE = base_TE
        elif added is not None and getattr(self.residual, "shares_kd_evaluation", False):
            # one ALR evaluation for the routing path and the KD student (its KD copy's gradient stops at the ALR)
            r_TE, kd_TE = self.residual(x_TD, pair=True)
            logits_TE = base_TE + r_TE.to(base_TE.dtype)
        else:
            logits_TE = base_TE + self.residual(x_TD).to(base_TE.dtype)
        s = self.spec
        bias_E = expert_bias if expert_bias is not None else self.bias_E()
        if self.select is not None:
            weights_TK, ids_TK = self.select(self, logits_TE)
        else:
            weights_TK, ids_TK = ops.topk_route(logits_TE, s, bias_E=bias_E, backend=self.backend)
        if s.weights_dtype == "logits":
            weights_TK = weights_TK.to(logits_TE.dtype)
        elif s.weights_dtype == "input":
            weights_TK = weights_TK.to(hidden_states.dtype)
        if added is not None and self.residual is not None:
            # the ALR student on the detached input, inside this forward (under FSDP2 the ALR's parameters are
            # only gathered here), so the added loss reaches the ALR only
            if kd_TE is None:
                kd_TE = self.residual(x_TD.detach())
            student_TE = base_TE.detach() + kd_TE.to(base_TE.dtype)
            term = added.loss_fn(base_TE.detach(), student_TE)
            added.values.setdefault(id(self), term.detach())  # the first forward's; a replay computes the same
            if torch.is_grad_enabled() and term.requires_grad:
                weights_TK = _AddLossInBackward.apply(weights_TK, term, added.grad_weight)
        rec = recorder(self)
        if rec is not None:
            rec.put(self, {"x_TD": x_TD.detach(), "base_logits_TE": base_TE.detach(), "logits_TE": logits_TE,
                           "topk_ids_TK": ids_TK, "topk_weights_TK": weights_TK})
        if self.index_first:
            return ids_TK, weights_TK, logits_TE
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


def experts_parameters(experts: nn.Module) -> list[torch.Tensor]:
    """The routed experts' parameters, each ``[E, ...]`` (one row per expert): ``gate_up_proj``, ``down_proj`` and,
    where the module has them (gpt-oss), ``gate_up_proj_bias`` and ``down_proj_bias``. Masks, freezing and the
    optimizer-state handling of the method layer act on all of them."""
    out = [experts.gate_up_proj, experts.down_proj]
    if getattr(experts, "has_bias", False):
        out += [b for b in (getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None))
                if isinstance(b, torch.Tensor)]
    return out


@functools.lru_cache(maxsize=None)
def _gpt_oss_gate():
    """``GptOssExperts._apply_gate`` of the installed transformers (None where it has no gpt_oss)."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return None
    return getattr(GptOssExperts, "_apply_gate", None)


def experts_variant(mod: nn.Module) -> dict:
    """What an HF experts module's flags call for beyond the standard bias-free concatenated ``[E, 2I, D]``
    SwiGLU (``{}``): ``has_bias``, ``transposed``, ``interleaved``, ``activation="clamped_swiglu"`` (gpt-oss).
    Flags only (no tensors: the forward reads the module's current biases, alpha and limit). ``ValueError``
    naming the module's class for a variant the ops do not implement."""
    kw: dict = {}
    cls = type(mod).__name__
    if not getattr(mod, "has_gate", True):
        raise ValueError(f"experts module {cls} has no gate projection (has_gate=False): desmoe's experts are gated")
    if getattr(mod, "has_post_expert_norm", False):
        raise ValueError(f"experts module {cls} has a post-expert norm, which desmoe's experts ops do not implement")
    if getattr(mod, "has_bias", False):
        b1, b2 = getattr(mod, "gate_up_proj_bias", None), getattr(mod, "down_proj_bias", None)
        if not isinstance(b1, torch.Tensor) or not isinstance(b2, torch.Tensor):
            raise ValueError(f"experts module {cls} declares expert biases (has_bias=True) but has no "
                             "gate_up_proj_bias / down_proj_bias tensors")
        kw["has_bias"] = True
    if getattr(mod, "is_transposed", False):
        kw["transposed"] = True
    if not getattr(mod, "is_concatenated", True):
        kw["interleaved"] = True
    gate = getattr(type(mod), "_apply_gate", None)
    if gate is not None and gate is _gpt_oss_gate():
        kw["activation"] = "clamped_swiglu"
    else:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # older transformers: no per-class gate hook
            _default_apply_gate = None
        if gate is not None and _default_apply_gate is not None and gate is not _default_apply_gate:
            raise ValueError(f"experts module {cls} has its own gated activation ({cls}._apply_gate), which "
                             "desmoe's experts ops do not implement")
    return kw


def desmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` implementation ``"desmoe"`` (runs on the HF module's own parameters)."""
    variant = self.__dict__.get("_desmoe_variant")
    if variant is None:  # set by desmoe.patch; a model loaded with experts_implementation="desmoe" reads it here
        variant = experts_variant(self)
    activation = variant.get("activation") or getattr(self, "_desmoe_activation", None)
    if activation is None:
        activation = activation_name(getattr(self.config, "hidden_act", "silu"))
    extra = {k: True for k in ("transposed", "interleaved") if variant.get(k)}
    if activation == "clamped_swiglu":
        extra.update(alpha=float(self.alpha), limit=float(self.limit))
    if variant.get("has_bias"):
        extra.update(b_gate_up=self.gate_up_proj_bias, b_down=self.down_proj_bias)
    masks = expert_masks(self) if torch.is_grad_enabled() else None  # masks act on gradients only
    trainable_E = pair_TK = None
    if masks is not None:
        trainable_E = masks.expert_trainable_E
        if masks.token_domains_T is not None:
            pair_TK = pair_trainable_from_domains(masks.token_domains_T, top_k_index, masks.domain_expert_mask_ME)
    return ops.moe_experts(
        hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights,
        activation=activation, expert_trainable_E=trainable_E,
        pair_trainable_TK=pair_TK, backend=getattr(self, "_desmoe_backend", None), validate_ids=False, **extra,
    )
