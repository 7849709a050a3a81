"""A fine-tuning method as a type: what trains in which phase, which experts may move, what loss it adds.

:class:`desmoe.method.MethodController` drives one :class:`Method` through a run and asks it every question a
method answers; it never branches on a method's name. A new method is a subclass registered under its name::

    @register_method
    class MyMethod(Method):
        name = "my_method"

        def trainable_kinds(self, phase):
            return {"experts", "attention"}

after which ``method: {name: my_method}`` works in a config, ``desmoe train`` and the ``transformers.Trainer``
adapter. The built-in methods live one per file beside this one (``fft.py``, ``frozen_router.py``, ``esft.py``,
``des_moe.py``).
"""
from __future__ import annotations

import contextlib
from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from .dges import AffinityTracker

PARAM_KINDS = ("experts", "router", "alr", "shared_experts", "attention", "embeddings", "other")

_REGISTRY: dict[str, type["Method"]] = {}


class MethodContext(Protocol):
    """What a :class:`Method` reads from the :class:`~desmoe.method.MethodController` that drives it (the
    ``ctl`` argument of its hooks)."""

    model: nn.Module
    blocks: list  # (block, router, experts) per MoE layer: desmoe.integrations.hf.moe_blocks
    routers: list  # desmoe.layers.TopKRouter per MoE layer
    domain_names: list[str]
    num_experts: int
    tracker: AffinityTracker  # the affinity A of the run (DGES)
    current_phase: str | None
    last_lambda: float  # this step's λ

    def recording(self) -> contextlib.AbstractContextManager[list[dict]]:
        """A scope in which the routers record their forward (one record per layer afterwards)."""


class Method:
    """Base class: one phase named after the method, nothing masked, no added loss, nothing to prepare.

    ``cfg`` is the run's :class:`~desmoe.method.MethodConfig` (which validates its name against this registry, so
    the config module imports this one, not the other way round); ``total_steps`` is T, the phase clock.
    """

    name: ClassVar[str] = ""
    uses_alr: ClassVar[bool] = False  # attach the ALR residual to every router (its parameters are kind "alr")

    def __init__(self, cfg, total_steps: int):
        self.cfg, self.T = cfg, int(total_steps)

    # --- phases and trainable parameters ----------------------------------------------------------------------
    def phase_spans(self) -> dict[str, tuple[int, int]]:
        """``{phase: (first step, end step)}`` in order; the default is one phase over the whole run."""
        return {self.name: (0, self.T)}

    def phase(self, step: int) -> str:
        for p, (_, end) in self.phase_spans().items():
            if step < end:
                return p
        return p

    def trainable_kinds(self, phase: str) -> set[str]:
        """Parameter kinds (``PARAM_KINDS``) that train in ``phase``."""
        raise NotImplementedError(f"method {self.name!r} must define trainable_kinds(phase)")

    def expert_scope(self, phase: str) -> str:
        """Which routed experts may train in ``phase``, in words (the README's per-phase table)."""
        return "all"

    # --- experts --------------------------------------------------------------------------------------------
    def expert_trainable_LE(self, ctl: MethodContext) -> torch.Tensor | None:
        """bool ``[L, E]``: experts that may change now (None: all of them)."""
        return None

    def token_masks_LME(self, ctl: MethodContext) -> torch.Tensor | None:
        """bool ``[L, M, E]``: per-token masks in force now (a token's gradient reaches only its domain's experts)."""
        return None

    # --- loss --------------------------------------------------------------------------------------------------
    def lambda_at(self, step: int, phase: str) -> float:
        """Weight λ of the added loss at ``step``: the step's loss is ``λ·added + (1-λ)·task``."""
        return 0.0

    def router_loss(self, ctl: MethodContext, valid_T: torch.Tensor, phase: str):
        """The loss this method adds inside every router's forward over the tokens ``valid_T`` (bool, flattened
        B*S), or None: ``(loss_fn, scale)`` with
        ``loss_fn(teacher_logits_TE, student_logits_TE) -> scalar`` (a :class:`desmoe.layers.RouterAddedLoss`
        term per router) and ``scale`` turning the sum of the routers' terms into the added loss."""
        return None

    # --- around the run ----------------------------------------------------------------------------------------
    def prepare_batches(self) -> int:
        """Training batches :meth:`prepare` needs before the first step (0: none)."""
        return 0

    def prepare(self, ctl: MethodContext, batches, data_tokens_M: list[int] | None = None) -> torch.Tensor | None:
        """Before training, on ``prepare_batches()`` training batches (ESFT scores and selects experts here);
        ``data_tokens_M``: the training tokens of each domain, when known (ESFT caps its scoring budget by them)."""
        return None

    def end_step(self, ctl: MethodContext, step: int) -> bool:
        """After optimizer step ``step``; returns True when the masks changed."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def summary(self) -> dict:
        """Entries for the run's ``summary.json``."""
        return {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name: <cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"register_method expects a Method subclass with a non-empty name, got {cls!r}")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Names of every registered method."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method.name must be one of {method_names()}, got {name!r}") from None
