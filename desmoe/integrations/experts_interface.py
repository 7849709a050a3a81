"""desmoe's experts implementation in transformers' ``ExpertsInterface``: the name ``"desmoe"``, its registration
(a registry call, not a patch; ``import desmoe`` makes it) and whether a module's forward dispatches to it."""
from __future__ import annotations

import torch.nn as nn

from .. import layers

EXPERTS_IMPLEMENTATION = "desmoe"


def register() -> None:
    """Register ``"desmoe"`` with transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, layers.desmoe_experts_forward)


def dispatches_to_desmoe(mod: nn.Module) -> bool:
    """The module's class forward is transformers' ``ExpertsInterface`` dispatch (set to ``"desmoe"``)."""
    forward = getattr(type(mod), "forward", None)  # through the MRO: FSDP2's FSDP<cls> subclasses keep it
    return (getattr(forward, "__module__", "").startswith("transformers.")
            and getattr(getattr(mod, "config", None), "_experts_implementation", None) == EXPERTS_IMPLEMENTATION)
