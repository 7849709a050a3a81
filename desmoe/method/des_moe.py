"""DES-MoE (arXiv 2509.16882) and its two ablations.

Phases over T steps: warm-up ``[0, T1)``: router (ALR) + all experts train, the affinity A is collected;
stabilisation ``[T1, T2)``: router (ALR) + the experts of each domain's DGES mask; consolidation ``[T2, T)``:
router frozen, masked experts. The ALR student is distilled towards the frozen router with weight λ(step).
``des_moe_no_alr`` trains the router itself and adds no KD term; ``des_moe_no_dges`` masks no experts.
"""
from __future__ import annotations

import math

import torch

from .alr import kd_loss, lambda_at
from .registry import Method, register_method

PHASES = ("warmup", "stabilization", "consolidation")


def phase_bounds(total_steps: int, warmup_frac: float, stabilize_frac: float) -> tuple[int, int]:
    """``(T1, T2) = (floor(warmup_frac·T), floor(stabilize_frac·T))``: first step of stabilisation and of
    consolidation (a 1e-9 slack keeps e.g. 0.29·100 = 28.999… at 29)."""
    return math.floor(warmup_frac * total_steps + 1e-9), math.floor(stabilize_frac * total_steps + 1e-9)


@register_method
class DesMoE(Method):
    name = "des_moe"
    uses_alr = True
    uses_dges = True  # domain-guided expert masks after warm-up

    def __init__(self, cfg, total_steps):
        super().__init__(cfg, total_steps)
        self.t1, self.t2 = phase_bounds(self.T, cfg.warmup_frac, cfg.stabilize_frac)

    def phase_spans(self) -> dict[str, tuple[int, int]]:
        return {PHASES[0]: (0, self.t1), PHASES[1]: (self.t1, self.t2), PHASES[2]: (self.t2, self.T)}

    def phase(self, step: int) -> str:
        return PHASES[0] if step < self.t1 else PHASES[1] if step < self.t2 else PHASES[2]

    def trainable_kinds(self, phase: str) -> set[str]:
        c = self.cfg
        kinds = {"experts"}
        if phase != "consolidation":
            kinds.add("alr" if self.uses_alr else "router")
        shared = c.shared_experts == "always" or (c.shared_experts == "until_consolidation"
                                                   and phase != "consolidation")
        optional = {"shared_experts": shared, "attention": c.train_attention,
                    "embeddings": c.train_embeddings, "other": c.train_other}
        return kinds | {k for k, on in optional.items() if on}

    def expert_scope(self, phase: str) -> str:
        return "DGES masks" if self.uses_dges and phase != PHASES[0] else "all"

    def domain_masks_LME(self, ctl) -> torch.Tensor | None:
        """The DGES masks in force now (None while every expert trains)."""
        if self.uses_dges and ctl.current_phase in PHASES[1:] and ctl.tracker.masks_LME is not None:
            return ctl.tracker.masks_LME
        return None

    def expert_trainable_LE(self, ctl) -> torch.Tensor | None:
        m = self.domain_masks_LME(ctl)
        return None if m is None else m.any(dim=1)

    def token_masks_LME(self, ctl) -> torch.Tensor | None:
        return self.domain_masks_LME(ctl) if self.cfg.per_token_masking else None

    def lambda_at(self, step: int, phase: str) -> float:
        c = self.cfg
        if not self.uses_alr or phase == "consolidation":
            return 0.0
        end = c.lambda_end if c.lambda_end is not None else c.stabilize_frac
        return lambda_at(step / self.T, schedule=c.lambda_schedule, lambda_max=c.lambda_max,
                         end=max(end, 1e-9), decay_rate=c.lambda_decay_rate)

    def router_loss(self, ctl, valid_T, phase):
        """KD of the ALR student towards the frozen router, averaged over layers, while the ALR trains.

        Each router adds ``Σ_valid tokens KL(softmax(base/τ) || softmax(student/τ))`` computed in its own forward
        on its *detached* input, ``student = base(x.detach()) + ALR(x.detach())``, so the KD term reaches the ALR
        only: no expert, attention, embedding or earlier-layer parameter gets a KD gradient (the routing forward
        itself, and so the task loss, is unchanged). ``valid_T``: the tokens KD covers (bool, flattened B*S).
        ``scale`` turns the sum over layers into the per-token mean averaged over layers."""
        if not self.uses_alr or phase == "consolidation" or ctl.last_lambda == 0.0:
            return None
        tau = self.cfg.tau

        def loss_fn(teacher_TE, student_TE):
            return kd_loss(teacher_TE, student_TE, tau, valid_T.to(teacher_TE.device), reduction="sum")

        scale = 1.0 / (len(ctl.routers) * valid_T.sum().clamp(min=1).double())
        return loss_fn, scale

    def end_step(self, ctl, step: int) -> bool:
        """A at the end of warm-up (rownorm of the warm-up counts), then an EMA refresh every ``update_every``
        steps; with ``lock_affinity`` (default) the last refresh is at T2 and consolidation keeps A and the masks."""
        nxt = step + 1
        if nxt == self.t1 or (self.t1 == 0 and not ctl.tracker.initialised):
            ctl.tracker.finish_warmup()
            return True
        if self.cfg.lock_affinity and nxt > self.t2:
            return False
        if nxt > self.t1 and (nxt - self.t1) % self.cfg.update_every == 0:
            ctl.tracker.refresh()
            return True
        return False


@register_method
class DesMoENoALR(DesMoE):
    name = "des_moe_no_alr"
    uses_alr = False


@register_method
class DesMoENoDGES(DesMoE):
    name = "des_moe_no_dges"
    uses_dges = False
