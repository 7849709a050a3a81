"""What stops a run cleanly: SIGTERM/SIGINT in the training steps (checkpoint at the next step boundary, then
:class:`TrainingInterrupted`; the handlers are :class:`desmoe.train.signals.StopFlag`) and NaN/inf losses or
gradients (:class:`NonFiniteLossError` naming the step, the loss term and the first module with a non-finite
output, or a skipped batch under ``train.skip_nonfinite``)."""
from __future__ import annotations

import torch

from .loss import task_loss
from .signals import Interrupted


class TrainingInterrupted(Interrupted):
    """SIGTERM/SIGINT arrived: a checkpoint was written at the next step boundary, then the run stopped."""

    def __init__(self, signame: str, step: int, checkpoint: str):
        self.step = step
        super().__init__(signame, checkpoint, f"{signame} received: checkpoint of step {step} written to "
                                              f"{checkpoint}; continue with `desmoe train ... --resume` (or --resume "
                                              f"{checkpoint})")


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss or gradient (``train.skip_nonfinite: true`` skips such batches instead)."""


def diagnose_nonfinite(model, batch: dict, device, bf16: bool) -> str:
    """Re-run the forward of ``batch`` with hooks and name the first module (in execution order) whose output is
    NaN/inf, and any parameter holding NaN/inf values or gradients."""
    bad_out: list[str] = []
    handles = []

    def hook(name):
        def fn(_m, _i, out):
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
            if not bad_out and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                bad_out.append(name)
        return fn

    for name, m in model.named_modules():
        if name and name.count(".") <= 4:
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            task_loss(model, batch, device, bf16)
    except Exception as e:  # the diagnosis must not hide the original error
        bad_out.append(f"<forward raised {type(e).__name__}: {e}>")
    finally:
        for h in handles:
            h.remove()
    bad_p = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    bad_g = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    parts = [f"first module with a non-finite output: {bad_out[0] if bad_out else 'none (outputs finite on re-run)'}"]
    if bad_p:
        parts.append(f"non-finite parameters: {', '.join(bad_p[:8])}{' ...' if len(bad_p) > 8 else ''}")
    if bad_g:
        parts.append(f"non-finite gradients: {', '.join(bad_g[:8])}{' ...' if len(bad_g) > 8 else ''}")
    return "; ".join(parts)

