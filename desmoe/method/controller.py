"""The method as hooks around one training step, shared by DES-MoE, its ablations and the baselines.

The trainer calls, per optimizer step::

    ctl.begin_step(step)                      # phase switch -> requires_grad; routers record
    for micro-batch:
        ctl.before_forward(domain_ids_T)      # per-token expert masks for this batch
        out = model(...)
        kd = ctl.after_forward(domain_ids_T)  # KD loss (or None), routing statistics; clears the masks
        loss = ctl.combine(task, kd, step)    # λ(α)·KD + (1-λ(α))·task
        loss.backward()
    ctl.before_optimizer_step(optimizer)      # masked experts: zero grads + optimizer-state rows; expert decay
    optimizer.step()                          # (optimizer built from ctl.param_groups(weight_decay))
    ctl.end_step(step)                        # A: end of warm-up / EMA refresh -> new masks

Phases (DES-MoE variants) over T steps: warm-up ``[0, T1)``: router (ALR) + all experts train, A collected;
stabilisation ``[T1, T2)``: router (ALR) + masked experts; consolidation ``[T2, T)``: router frozen, masked experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..integrations.hf import moe_blocks
from ..layers import set_expert_masks
from . import _ext
from .alr import attach_alr, kd_loss, lambda_at
from .config import MethodConfig
from .dges import AffinityTracker

PHASES = ("warmup", "stabilization", "consolidation")
PARAM_KINDS = ("experts", "router", "alr", "shared_experts", "attention", "embeddings", "other")


def phase_bounds(total_steps: int, warmup_frac: float, stabilize_frac: float) -> tuple[int, int]:
    """``(T1, T2)``: first step of stabilisation and of consolidation (rounded to whole steps)."""
    return int(round(warmup_frac * total_steps)), int(round(stabilize_frac * total_steps))


def phase_at(step: int, total_steps: int, warmup_frac: float = 0.2, stabilize_frac: float = 0.7) -> str:
    t1, t2 = phase_bounds(total_steps, warmup_frac, stabilize_frac)
    return PHASES[0] if step < t1 else PHASES[1] if step < t2 else PHASES[2]


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` with kind in ``PARAM_KINDS`` (model must be patched; ALR attached or not)."""
    blocks = moe_blocks(model)
    ids = {}
    for _, router, experts in blocks:
        ids[id(router.weight)] = "router"
        if router.residual is not None:
            for p in router.residual.parameters():
                ids[id(p)] = "alr"
        ids[id(experts.gate_up_proj)] = "experts"
        ids[id(experts.down_proj)] = "experts"
    out = {}
    for name, p in model.named_parameters():
        kind = ids.get(id(p))
        if kind is None:
            if "shared_expert" in name:
                kind = "shared_experts"
            elif "self_attn" in name or ".attention." in name:
                kind = "attention"
            elif "embed" in name or name.startswith("lm_head") or ".lm_head." in name:
                kind = "embeddings"
            else:
                kind = "other"
        out[name] = kind
    return out


class MethodController:
    """Applies one method (``MethodConfig.name``) to a patched model for a run of ``total_steps`` steps."""

    def __init__(self, model: nn.Module, cfg: MethodConfig, total_steps: int, domain_names: list[str]):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not domain_names:
            raise ValueError("domain_names must name at least one domain")
        self.model, self.cfg, self.T = model, cfg, int(total_steps)
        self.domain_names = list(domain_names)
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no patched MoE blocks: call desmoe.patch(model) first")
        self.routers = [r for _, r, _ in self.blocks]
        self.experts = [e for _, _, e in self.blocks]
        E = {r.num_experts for r in self.routers}
        if len(E) != 1:
            raise ValueError(f"all MoE layers must have the same number of experts, got {sorted(E)}")
        self.num_experts = E.pop()
        dev = self.routers[0].weight.device
        self.alr = attach_alr(self.routers, cfg.alr_expansion) if cfg.uses_alr else []
        self.tracker = AffinityTracker(len(self.blocks), len(self.domain_names), self.num_experts,
                                       phi=cfg.phi, momentum=cfg.ema_momentum, device=dev)
        self.t1, self.t2 = phase_bounds(self.T, cfg.warmup_frac, cfg.stabilize_frac)
        self.esft_selection_LE: torch.Tensor | None = None  # bool, ESFT's selected experts
        self.esft_scores_LME: torch.Tensor | None = None
        self.current_phase: str | None = None
        self.kinds = classify_parameters(model)
        self.last_lambda = 0.0

    # --- phases and trainable parameters ----------------------------------------------------------------
    def phase(self, step: int) -> str:
        if not self.cfg.phased:
            return self.cfg.name
        return PHASES[0] if step < self.t1 else PHASES[1] if step < self.t2 else PHASES[2]

    def trainable_kinds(self, phase: str) -> set[str]:
        c = self.cfg
        if c.name in ("fft", "frozen_router"):
            kinds = set(PARAM_KINDS) - {"alr"}
            return kinds - {"router"} if c.name == "frozen_router" else kinds
        if c.is_esft:
            return {"experts"}
        kinds = {"experts"}
        if phase != "consolidation":
            kinds.add("alr" if c.uses_alr else "router")
        if c.shared_experts == "train":
            kinds.add("shared_experts")
        if c.train_attention:
            kinds.add("attention")
        if c.train_embeddings:
            kinds.add("embeddings")
        if c.train_other:
            kinds.add("other")
        return kinds

    def apply_phase(self, phase: str) -> None:
        """Set ``requires_grad`` of every parameter for ``phase``."""
        kinds = self.trainable_kinds(phase)
        self.kinds = classify_parameters(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.kinds[name] in kinds)
        self.current_phase = phase

    def masked_phase(self, phase: str | None = None) -> bool:
        phase = phase or self.current_phase
        return self.cfg.uses_dges and phase in ("stabilization", "consolidation")

    def domain_masks_LME(self) -> torch.Tensor | None:
        """The DGES masks in force now (None when every expert trains)."""
        if self.masked_phase() and self.tracker.masks_LME is not None:
            return self.tracker.masks_LME
        return None

    def expert_trainable_LE(self) -> torch.Tensor | None:
        """bool ``[L, E]``: experts that may change in the current phase (None: all of them)."""
        if self.cfg.is_esft:
            return self.esft_selection_LE
        m = self.domain_masks_LME()
        return None if m is None else m.any(dim=1)

    def begin_step(self, step: int) -> str:
        phase = self.phase(step)
        if phase != self.current_phase:
            self.apply_phase(phase)
        for r in self.routers:
            r.record = True
        self.last_lambda = self.lambda_at(step)
        return phase

    def lambda_at(self, step: int) -> float:
        c = self.cfg
        if not c.uses_alr or self.current_phase == "consolidation":
            return 0.0
        end = c.lambda_end if c.lambda_end is not None else c.stabilize_frac
        return lambda_at(step / self.T, schedule=c.lambda_schedule, lambda_max=c.lambda_max,
                         end=max(end, 1e-9), decay_rate=c.lambda_decay_rate)

    # --- per micro-batch ------------------------------------------------------------------------------------
    def before_forward(self, domain_ids_T: torch.Tensor) -> None:
        """Install the expert gradient masks for the next forward (``domain_ids_T``: flattened B*S, -1 pad)."""
        trainable_LE = self.expert_trainable_LE()
        masks = self.domain_masks_LME() if self.cfg.per_token_masking else None
        for l, ex in enumerate(self.experts):
            if masks is not None:
                set_expert_masks(ex, expert_trainable_E=trainable_LE[l], token_domains_T=domain_ids_T,
                                 domain_expert_mask_ME=masks[l])
            else:
                set_expert_masks(ex, expert_trainable_E=None if trainable_LE is None else trainable_LE[l])

    def after_forward(self, domain_ids_T: torch.Tensor) -> torch.Tensor | None:
        """Clear the masks, record routing statistics; returns the KD loss averaged over layers (or None)."""
        for ex in self.experts:
            set_expert_masks(ex)
        lasts = [r.last for r in self.routers]
        for r in self.routers:
            r.last = None
        if any(x is None for x in lasts):
            return None
        ids_LTK = torch.stack([x["topk_ids_TK"] for x in lasts])
        self.tracker.observe(ids_LTK, domain_ids_T.to(ids_LTK.device))
        alr_trains = self.cfg.uses_alr and self.current_phase != "consolidation"
        if not alr_trains or self.last_lambda == 0.0:
            return None
        valid_T = domain_ids_T >= 0
        losses = [kd_loss(x["base_logits_TE"], x["logits_TE"], self.cfg.tau, valid_T.to(x["logits_TE"].device))
                  for x in lasts]
        return torch.stack(losses).mean()

    def combine(self, task_loss: torch.Tensor, kd: torch.Tensor | None) -> torch.Tensor:
        """``λ·KD + (1-λ)·task`` (task alone when there is no KD term)."""
        if kd is None:
            return task_loss
        lam = self.last_lambda
        return lam * kd + (1.0 - lam) * task_loss

    # --- around the optimizer ---------------------------------------------------------------------------
    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """AdamW parameter groups over every parameter that trains in *some* phase of this method (the others
        never get optimizer state). Expert weights get their decoupled weight decay from
        :meth:`apply_expert_weight_decay_` (only on rows that may train), so the optimizer sees ``weight_decay=0``
        for them; 1-D parameters (norms, biases) get none."""
        phases = PHASES if self.cfg.phased else (self.cfg.name,)
        kinds = set().union(*(self.trainable_kinds(p) for p in phases))
        experts, decay, no_decay = [], [], []
        for n, p in self.model.named_parameters():
            k = self.kinds[n]
            if k not in kinds:
                continue
            (experts if k == "experts" else no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": experts, "weight_decay": 0.0, "desmoe_expert_decay": float(weight_decay)},
                  {"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Experts outside the current masks (DGES union / ESFT selection) must not move: zero their weight
        gradients and their rows of the optimizer state. With zero grad and zero Adam moments the Adam update of
        those rows is exactly 0; decoupled weight decay on experts is applied by
        :meth:`apply_expert_weight_decay_` to trainable rows only. No weight copies are made."""
        trainable_LE = self.expert_trainable_LE()
        if trainable_LE is not None:
            mask_grads = _ext.get("mask_expert_grads_")
            for l, ex in enumerate(self.experts):
                params = [p for p in (ex.gate_up_proj, ex.down_proj) if p.requires_grad]
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    mask_grads(grads, [trainable_LE[l].to(g.device) for g in grads])
                off_E = ~trainable_LE[l]
                if optimizer is None or not off_E.any():
                    continue
                for p in params:
                    st = optimizer.state.get(p, {})
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                        if key in st and st[key].shape == p.shape:
                            st[key][off_E.to(p.device)] = 0
        if optimizer is not None:
            self.apply_expert_weight_decay_(optimizer)

    @torch.no_grad()
    def apply_expert_weight_decay_(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW's decoupled decay ``p *= 1 - lr·wd`` on the trainable expert rows of groups marked
        ``desmoe_expert_decay`` (as AdamW would, only for parameters that got a gradient)."""
        trainable_LE = self.expert_trainable_LE()
        layer_of = {id(p): l for l, ex in enumerate(self.experts) for p in (ex.gate_up_proj, ex.down_proj)}
        for g in optimizer.param_groups:
            wd = g.get("desmoe_expert_decay", 0.0)
            if not wd:
                continue
            f = 1.0 - g["lr"] * wd
            for p in g["params"]:
                if p.grad is None:
                    continue
                l = layer_of.get(id(p))
                if l is None or trainable_LE is None:
                    p.mul_(f)
                else:
                    rows = trainable_LE[l].to(p.device)
                    p[rows] = p[rows] * f

    def after_optimizer_step(self) -> None:
        """Kept for symmetry of the step protocol (nothing to undo: frozen rows never move)."""

    def end_step(self, step: int) -> bool:
        """Update A/masks after optimizer step ``step``; returns True when the masks changed."""
        if not self.cfg.phased:
            return False
        nxt = step + 1
        if nxt == self.t1 or (self.t1 == 0 and not self.tracker.initialised):
            self.tracker.finish_warmup()
            return True
        if nxt > self.t1 and (nxt - self.t1) % self.cfg.update_every == 0:
            self.tracker.refresh()
            return True
        return False

    # --- ESFT -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_esft(self, batches) -> torch.Tensor:
        """ESFT relevance on training batches (no grad): per layer & domain, gate-score mass (``esft_gate``) or
        token-selection share (``esft_token``) per expert; selects, per layer and domain, the fewest experts whose
        normalised scores sum to ≥ ``esft_p``; a layer trains the union over domains. Returns bool ``[L, E]``."""
        L, M, E = len(self.blocks), len(self.domain_names), self.num_experts
        scores = torch.zeros(L, M, E, dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        for r in self.routers:
            r.record = True
        stats = _ext.get("routing_stats")
        for batch in batches:
            dom_T = batch["domain_ids"].reshape(-1)
            self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            ids_LTK = torch.stack([r.last["topk_ids_TK"] for r in self.routers])
            w_LTK = torch.stack([r.last["topk_weights_TK"].float() for r in self.routers])
            counts, mass, _ = stats(ids_LTK, dom_T.to(ids_LTK.device), M, E, topk_weights_LTK=w_LTK)
            scores += (mass if self.cfg.name == "esft_gate" else counts).double().cpu()
        for r in self.routers:
            r.last = None
        self.model.train(was_training)
        self.esft_scores_LME = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)).float()
        self.esft_selection_LE = select_top_p(self.esft_scores_LME, self.cfg.esft_p).any(dim=1)
        return self.esft_selection_LE

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.cfg.name, "tracker": self.tracker.state_dict(),
                "alr": [a.state_dict() for a in self.alr],
                "esft_selection_LE": self.esft_selection_LE, "esft_scores_LME": self.esft_scores_LME,
                "domain_names": self.domain_names}

    def load_state_dict(self, sd: dict) -> None:
        if sd["method"] != self.cfg.name:
            raise ValueError(f"checkpoint method is {sd['method']!r} but the config says {self.cfg.name!r}")
        if list(sd["domain_names"]) != self.domain_names:
            raise ValueError(f"checkpoint domains {sd['domain_names']} differ from the config's {self.domain_names}")
        self.tracker.load_state_dict(sd["tracker"])
        for a, s in zip(self.alr, sd["alr"]):
            a.load_state_dict(s)
        self.esft_selection_LE = sd.get("esft_selection_LE")
        self.esft_scores_LME = sd.get("esft_scores_LME")


def select_top_p(scores_LME: torch.Tensor, p: float) -> torch.Tensor:
    """bool ``[L, M, E]``: per row, the highest-scoring experts until their (normalised) sum reaches ``p``."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    s = scores_LME / scores_LME.sum(-1, keepdim=True).clamp(min=1e-12)
    sorted_s, order = s.sort(dim=-1, descending=True)
    before = sorted_s.cumsum(-1) - sorted_s  # mass of the strictly better experts
    keep_sorted = before < p - 1e-9
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
