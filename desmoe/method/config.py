"""The method's configuration (one ``method:`` section of a training config)."""
from __future__ import annotations

from dataclasses import dataclass

from .alr import LAMBDA_SCHEDULES
from .dges import check_phi
from .registry import method_names

UNKNOWN_DOMAIN_MODES = ("none", "union")
SHARED_EXPERT_MODES = ("until_consolidation", "always", "never")
_SHARED_EXPERT_ALIASES = {"train": "always", "frozen": "never"}  # the earlier names


@dataclass
class MethodConfig:
    """DES-MoE and baseline settings. Fractions are of the total number of optimizer steps T.

    name: which method (a registered :class:`~desmoe.method.registry.Method`: ``method_names()``).
    warmup_frac/stabilize_frac: phase boundaries T1=warmup_frac·T, T2=stabilize_frac·T. tau, lambda_*: KD temperature
    and λ schedule (λ reaches 0 at ``lambda_end``, default the end of stabilisation). phi/ema_momentum/update_every:
    DGES mask threshold, A's EMA momentum and refresh period (steps); lock_affinity: A and the masks stop refreshing
    after T2 (consolidation keeps them, as in the paper). T1 = floor(warmup_frac·T), T2 = floor(stabilize_frac·T).
    per_token_masking: False uses one expert-level mask (the union over domains). unknown_domain: what a token with
    domain -1 (unknown; also padding, which has no gradient) updates in masked phases: ``none`` (no routed expert) or
    ``union`` (any expert some domain owns).
    shared_experts: the always-on shared experts (DeepSeek ``shared_experts``, Qwen2-MoE ``shared_expert`` + its
    gate, Granite-shared and HunYuan ``shared_mlp``: per family in :mod:`desmoe.integrations.families`) train
    ``until_consolidation`` (default, the paper: consolidation updates masked routed experts only),
    ``always`` or ``never`` (``train``/``frozen`` are accepted as the old names of always/never).
    train_attention/train_embeddings/train_other: unfreeze attention, embeddings + LM head, everything else
    (norms, dense MLPs) in the DES-MoE variants. esft_p: ESFT's top-p; esft_tokens: tokens scored per
    domain (the official scripts' 131,072, capped by the domain's training data); esft_batches: an optional cap on
    scoring batches (null: until every domain has its tokens).
    """

    name: str = "des_moe"
    warmup_frac: float = 0.2
    stabilize_frac: float = 0.7
    tau: float = 0.7
    lambda_max: float = 0.5
    lambda_schedule: str = "linear"
    lambda_end: float | None = None
    lambda_decay_rate: float = 5.0
    alr_expansion: float = 0.25
    phi: float = 0.6
    ema_momentum: float = 0.9
    update_every: int = 10
    per_token_masking: bool = True
    lock_affinity: bool = True
    unknown_domain: str = "none"
    shared_experts: str = "until_consolidation"
    train_attention: bool = False
    train_embeddings: bool = False
    train_other: bool = False
    esft_p: float = 0.2
    esft_tokens: int = 131072
    esft_batches: int | None = None

    def __post_init__(self):
        def bad(field, expected, got):
            raise ValueError(f"method.{field} must be {expected}, got {got!r}")

        if self.name not in method_names():
            bad("name", f"one of {method_names()}", self.name)
        if not 0.0 <= self.warmup_frac <= 1.0:
            bad("warmup_frac", "in [0, 1]", self.warmup_frac)
        if not self.warmup_frac <= self.stabilize_frac <= 1.0:
            bad("stabilize_frac", f"in [warmup_frac={self.warmup_frac}, 1]", self.stabilize_frac)
        if self.tau <= 0:
            bad("tau", "> 0", self.tau)
        if not 0.0 <= self.lambda_max <= 1.0:
            bad("lambda_max", "in [0, 1]", self.lambda_max)
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            bad("lambda_schedule", f"one of {LAMBDA_SCHEDULES}", self.lambda_schedule)
        if self.lambda_end is not None and not 0.0 < self.lambda_end <= 1.0:
            bad("lambda_end", "in (0, 1] or null (= stabilize_frac)", self.lambda_end)
        if self.lambda_decay_rate <= 0:
            bad("lambda_decay_rate", "> 0", self.lambda_decay_rate)
        if isinstance(self.alr_expansion, bool) or not isinstance(self.alr_expansion, (int, float)) \
                or not 0 < self.alr_expansion <= 64:
            bad("alr_expansion", "a number in (0, 64] (the ALR's hidden width is round(alr_expansion·D), at least 1)",
                self.alr_expansion)
        check_phi(self.phi, "method.phi")
        if not 0.0 <= self.ema_momentum < 1.0:
            bad("ema_momentum", "in [0, 1)", self.ema_momentum)
        if int(self.update_every) != self.update_every or self.update_every < 1:
            bad("update_every", "an int >= 1", self.update_every)
        self.shared_experts = _SHARED_EXPERT_ALIASES.get(self.shared_experts, self.shared_experts)
        if self.unknown_domain not in UNKNOWN_DOMAIN_MODES:
            bad("unknown_domain", f"one of {UNKNOWN_DOMAIN_MODES}", self.unknown_domain)
        if not isinstance(self.lock_affinity, bool):
            bad("lock_affinity", "true or false", self.lock_affinity)
        if self.shared_experts not in SHARED_EXPERT_MODES:
            bad("shared_experts", f"one of {SHARED_EXPERT_MODES}", self.shared_experts)
        if not 0.0 < self.esft_p <= 1.0:
            bad("esft_p", "in (0, 1]", self.esft_p)
        if isinstance(self.esft_tokens, bool) or int(self.esft_tokens) != self.esft_tokens or self.esft_tokens < 1:
            bad("esft_tokens", "an int >= 1", self.esft_tokens)
        if self.esft_tokens > 1 << 40:
            bad("esft_tokens", f"<= {1 << 40} (tokens scored per domain)", self.esft_tokens)
        if self.esft_batches is not None and (int(self.esft_batches) != self.esft_batches or self.esft_batches < 1):
            bad("esft_batches", "an int >= 1 or null", self.esft_batches)
