"""``RouterSpec``: every routing option of a model family in one validated, immutable value.

The spec travels whole from the HF integration (which reads it off a model's router) through
:class:`desmoe.layers.TopKRouter` to :func:`desmoe.ops.topk_route`; only the custom-op boundary (Triton) unpacks it
into primitives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ROUTING_SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2sum")
WEIGHTS_DTYPES = ("float32", "logits", "input")
LOGITS_DTYPES = ("model", "float32", "float32_exact", "weight", "model_float")


@dataclass(frozen=True)
class RouterSpec:
    """How a model family turns router logits ``[T, E]`` into top-k ``(weights [T, K], ids [T, K])``.

    Fields (semantics in :func:`desmoe.ops.reference.topk_route_reference`):
        top_k, num_experts: K and E (1 <= K <= E).
        scoring: ``"softmax"`` over experts or ``"sigmoid"`` per expert.
        renormalize: divide the K selected weights by their sum (+ ``renorm_eps``), floored at ``renorm_min``
            (ERNIE-4.5 clamps the sum at ``moe_norm_min``).
        n_group, topk_group, group_score: group-limited selection (``n_group`` contiguous groups, the best
            ``topk_group`` eligible, groups ranked by ``"max"`` or ``"top2sum"``).
        masked_value: selection score of ineligible experts (``None`` = ``-inf``). When ``top_k`` exceeds the
            eligible experts, the rest are picked from the ineligible ones, as ``torch.topk`` picks them.
        weights_from_masked: the weights are read from the masked selection scores (DeepSeek-V2: an ineligible
            expert picked gets ``masked_value`` as its weight) instead of the unmasked scores.
        scaling: multiply the final weights (``routed_scaling_factor``).
        logits_dtype: the router's logits linear runs in the model dtype (``"model"``), in float32
            (``"float32"``, DeepSeek family; under autocast the linear still takes the region's dtype, as
            stock), in float32 with autocast off (``"float32_exact"``, ERNIE-4.5 forces it), in the router
            weight's dtype (``"weight"``, HunYuan), or in the
            model dtype then cast to float32 (``"model_float"``, Granite).
        weights_dtype: ``"float32"``, ``"logits"`` (cast to the logits' dtype) or ``"input"`` (to the hidden
            states' dtype).
    """

    top_k: int
    num_experts: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    scaling: float = 1.0
    renorm_eps: float = 0.0
    renorm_min: float = 0.0
    masked_value: float | None = None
    weights_from_masked: bool = False
    logits_dtype: str = "model"
    weights_dtype: str = "float32"

    def __post_init__(self):
        for name in ("top_k", "num_experts", "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"RouterSpec.{name} must be an int, got {type(v).__name__} ({v!r})")
        if self.num_experts < 1:
            raise ValueError(f"RouterSpec.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"RouterSpec.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name, choices in (("scoring", ROUTING_SCORINGS), ("group_score", GROUP_SCORES),
                              ("logits_dtype", LOGITS_DTYPES), ("weights_dtype", WEIGHTS_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"RouterSpec.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(
                f"RouterSpec.n_group must be >= 1 and divide num_experts={self.num_experts}, got {self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"RouterSpec.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        # numbers: finite, and the sign the semantics need (a NaN or negative one routes silently wrong)
        for name, ok, expected in (("scaling", lambda v: v > 0, "a finite number > 0"),
                                   ("renorm_eps", lambda v: v >= 0, "a finite number >= 0"),
                                   ("renorm_min", lambda v: v >= 0, "a finite number >= 0")):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"RouterSpec.{name} must be {expected}, got {v!r}")
        mv = self.masked_value
        if mv is not None and (not isinstance(mv, (int, float)) or isinstance(mv, bool) or math.isnan(mv)):
            raise ValueError(f"RouterSpec.masked_value must be None or a number (-inf allowed), got {mv!r}")

    @property
    def grouped(self) -> bool:
        """Whether group-limited selection can exclude any expert."""
        return self.n_group > 1 and self.topk_group < self.n_group

    @property
    def num_eligible(self) -> int:
        """Experts eligible per token under group-limited selection (all of them when not grouped)."""
        return self.topk_group * (self.num_experts // self.n_group) if self.grouped else self.num_experts


def as_spec(spec: RouterSpec | int, num_experts: int, options: dict) -> RouterSpec:
    """``spec`` itself, or (for the keyword form ``topk_route(logits, top_k, scoring=...)``) a spec built from
    ``top_k``, ``num_experts`` and the routing keywords. Passing both a spec and keywords is an error."""
    if isinstance(spec, RouterSpec):
        if options:
            raise TypeError(f"pass routing options in the RouterSpec, not as keywords too (got {sorted(options)})")
        if spec.num_experts != num_experts:
            raise ValueError(f"RouterSpec.num_experts={spec.num_experts} but logits_TE has {num_experts} experts")
        return spec
    if not isinstance(spec, int) or isinstance(spec, bool):
        raise TypeError(f"top_k must be an int (or a RouterSpec), got {type(spec).__name__}")
    if not 1 <= spec <= num_experts:  # the spec would say it too; this names the argument the caller passed
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {spec}")
    return RouterSpec(top_k=spec, num_experts=num_experts, **options)
