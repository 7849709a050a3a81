"""DES-MoE (arXiv 2509.16882) and the fine-tuning baselines, as pure-PyTorch pieces around a patched model.

- :mod:`.registry`: :class:`Method` (what trains in which phase, which experts move, what loss is added), what a
  method reads from its controller (:class:`~.registry.MethodContext`) and the registry of method names;
  :mod:`.phase_table`: the per-phase table of every method for the docs; one file per method: :mod:`.fft`,
  :mod:`.frozen_router`, :mod:`.esft` (gate and token scoring), :mod:`.des_moe` (DES-MoE and its ablations),
  :mod:`.controls` (experts only, FFT with attention frozen);
- :mod:`.controller`: drives one method through a run (phases, expert masks as a scope, optimizer-state rule);
  :mod:`.optim`: :class:`~.optim.ExpertRowAdamW`, AdamW with moments only for the expert rows that may train;
- :mod:`.alr`: the Adaptive Lightweight Router residual, the KD loss and the λ schedules; :mod:`.alr_files`: its
  files beside a model folder (written by checkpoints, read by ``desmoe.from_pretrained``);
- :mod:`.dges`: the domain×expert affinity matrix A (warm-up accumulation, EMA refresh) and the expert masks.
"""
from . import controls, des_moe, esft, fft, frozen_router  # noqa: F401  (register the built-in methods)
from .alr import ALRResidual, attach_alr, detach_alr, kd_loss, lambda_at
from .config import MethodConfig
from .controller import Forward, MethodController, classify_parameters
from .des_moe import PHASES, phase_bounds
from .dges import AffinityTracker, masks_from_affinity
from .esft import select_top_p
from .registry import PARAM_KINDS, Method, method_class, method_names, register_method

__all__ = ["ALRResidual", "attach_alr", "detach_alr", "kd_loss", "lambda_at", "MethodConfig", "PHASES", "Method",
           "MethodController", "Forward", "classify_parameters", "phase_bounds", "select_top_p",
           "AffinityTracker", "masks_from_affinity", "PARAM_KINDS", "method_class", "method_names",
           "register_method"]
