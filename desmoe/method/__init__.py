"""DES-MoE (arXiv 2509.16882) and the fine-tuning baselines, as pure-PyTorch pieces around a patched model.

- :mod:`.alr`: the Adaptive Lightweight Router residual, the KD loss and the λ schedules;
- :mod:`.dges`: the domain×expert affinity matrix A (warm-up accumulation, EMA refresh) and the expert masks;
- :mod:`.controller`: phases, which parameters train when, per-token gradient masks, ESFT expert selection.
"""
from .alr import ALRResidual, attach_alr, detach_alr, kd_loss, lambda_at
from .config import METHODS, MethodConfig
from .controller import PHASES, MethodController, classify_parameters, phase_at, phase_bounds, select_top_p
from .dges import AffinityTracker, masks_from_affinity

__all__ = ["ALRResidual", "attach_alr", "detach_alr", "kd_loss", "lambda_at", "METHODS", "MethodConfig", "PHASES",
           "MethodController", "classify_parameters", "phase_at", "phase_bounds", "select_top_p",
           "AffinityTracker", "masks_from_affinity"]
