"""One method (a :class:`~desmoe.method.registry.Method`) applied to a patched model, step by step.

The training loop calls, per optimizer step::

    ctl.begin_step(step)                        # the method's phase -> requires_grad; λ of this step
    for micro-batch:
        with ctl.applied(domain_ids_T) as fwd:  # this micro-batch's expert masks and router loss (KD)
            out = model(...)
        loss = ctl.combine(task, fwd.added_loss)  # λ·added + (1-λ)·task; statistics recorded
        loss.backward()                         # masks still held: activation checkpointing replays see them
    ctl.before_optimizer_step(optimizer)        # releases the masks; masked experts: zero grads + optimizer-state
                                                # rows; expert decay
    optimizer.step()                            # (optimizer built from ctl.param_groups(weight_decay))
    ctl.end_step(step)                          # the method's update after the step (DES-MoE: A and masks)

The controller owns what every method shares (the MoE blocks, the routing statistics, the ALR residuals, the
masking arithmetic) and asks the method everything else.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops
from ..integrations.families import param_names
from ..integrations.hf import foreign_experts_forward, moe_blocks
from ..context import AddedLossScope, MaskScope, recording
from ..layers import RouterAddedLoss, experts_parameters
from .alr import attach_alr
from .config import MethodConfig
from .dges import AffinityTracker
from .registry import PARAM_KINDS, Method, method_class


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` with kind in ``PARAM_KINDS`` (model must be patched; ALR attached or not)."""
    ids = {}
    for _, router, experts in moe_blocks(model):
        for p in router.routing_parameters():  # the weight (and gpt-oss's logits bias)
            ids[id(p)] = "router"
        if router.residual is not None:
            for p in router.residual.parameters():
                ids[id(p)] = "alr"
        for p in experts_parameters(experts):  # the weights (and gpt-oss's biases)
            ids[id(p)] = "experts"
    names = param_names(getattr(getattr(model, "config", None), "model_type", None))
    return {n: ids.get(id(p)) or names.kind(n) for n, p in model.named_parameters()}


def local_rows(t: torch.Tensor, rows_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local tensor of t, the rows of rows_E it holds)`` for a DTensor sharded on dim 0 (FSDP2) or a plain
    tensor (all rows), so the masking arithmetic runs on each rank's shard without a gather."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t, rows_E.to(t.device)
    local = to_local()
    from torch.distributed.tensor.placement_types import Shard

    pl = t.placements
    if len(pl) != 1 or not isinstance(pl[0], Shard) or pl[0].dim != 0:
        raise ValueError(f"expert weights must be sharded on dim 0 (experts) for masking, got placements {pl}")
    # torch.chunk semantics (FSDP2's even sharding with padding on the last ranks)
    E, W, r = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    lo = min(r * -(-E // W), E)
    return local, rows_E[lo: lo + local.shape[0]].to(local.device)


@dataclass
class Forward:
    """What :meth:`MethodController.applied` leaves after its scope: the value of the loss the method adds (or
    None), detached: its gradient enters inside the routers (see :meth:`MethodController.combine`)."""

    added_loss: torch.Tensor | None = None
    added_tokens: torch.Tensor | None = None  # the tokens the added loss averages over (its normaliser)


class MethodController:
    """Applies the method named by ``cfg.name`` to a patched model for a run of ``total_steps`` steps."""

    def __init__(self, model: nn.Module, cfg: MethodConfig, total_steps: int, domain_names: list[str]):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not domain_names:
            raise ValueError("domain_names must name at least one domain")
        self.model, self.cfg, self.T = model, cfg, int(total_steps)
        self.method: Method = method_class(cfg.name)(cfg, self.T)
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
        self.alr = attach_alr(self.routers, cfg.alr_expansion) if self.method.uses_alr else []
        self.tracker = AffinityTracker(len(self.blocks), len(self.domain_names), self.num_experts,
                                       phi=cfg.phi, momentum=cfg.ema_momentum, device=dev)
        self.current_phase: str | None = None
        self.kinds = classify_parameters(model)
        self.last_lambda = 0.0
        self._added: tuple[RouterAddedLoss, torch.Tensor] | None = None  # this micro-batch's router loss, scale
        self.masks = MaskScope()  # this micro-batch's expert masks, held through its backward
        self.added_losses = AddedLossScope()  # and its router loss

    # --- phases and trainable parameters ----------------------------------------------------------------
    def phase(self, step: int) -> str:
        return self.method.phase(step)

    def apply_phase(self, phase: str) -> None:
        """Set ``requires_grad`` of every parameter for ``phase``."""
        kinds = self.method.trainable_kinds(phase)
        self.kinds = classify_parameters(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.kinds[name] in kinds)
        self.current_phase = phase

    def expert_trainable_LE(self) -> torch.Tensor | None:
        """bool ``[L, E]``: experts that may change in the current phase (None: all of them)."""
        return self.method.expert_trainable_LE(self)

    def begin_step(self, step: int) -> str:
        self.release()
        phase = self.phase(step)
        if phase != self.current_phase:
            self.apply_phase(phase)
        self.last_lambda = self.method.lambda_at(step, phase)
        return phase

    # --- per micro-batch ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, domain_ids_T: torch.Tensor, supervised_T: torch.Tensor | None = None):
        """This step's expert gradient masks and the method's router loss for one forward of the tokens
        ``domain_ids_T`` (flattened B*S, -1 on padding). The routing statistics are recorded once, from this
        forward, and the yielded :class:`Forward` holds the value of the method's added loss, computed over the
        tokens with a domain and, when ``supervised_T`` (bool, flattened B*S) is given, that the task loss
        supervises (SFT: the assistant / completion tokens), so task and KD cover the same tokens.

        The masks (held by :attr:`masks`, a :class:`desmoe.context.MaskScope` keyed by experts module) and the router
        loss (:attr:`added_losses`, a :class:`desmoe.context.AddedLossScope` keyed by router) stay after the scope,
        through the backward, so that a layer that activation checkpointing replays inside the backward computes
        exactly what the forward did (and saves the same tensors); the next ``applied``,
        :meth:`before_optimizer_step`, :meth:`begin_step` or :meth:`release` removes them. Forwards without
        gradients ignore the masks. The routers record this forward through
        :func:`desmoe.context.recording`."""
        self.release()  # the previous micro-batch's (its backward is done)
        out = Forward()
        trainable_LE = self.expert_trainable_LE()
        masks_LME = self.method.token_masks_LME(self)
        mask_domains_T = domain_ids_T
        if masks_LME is not None and self.cfg.unknown_domain == "union":
            # for the masks only, domain -1 (unknown) tokens become domain M, whose mask is the union over domains
            masks_LME = torch.cat([masks_LME, masks_LME.any(1, keepdim=True)], dim=1)
            mask_domains_T = torch.where(domain_ids_T < 0, masks_LME.shape[1] - 1, domain_ids_T)
        if trainable_LE is not None or masks_LME is not None:
            self._check_experts_forward()
        for l, ex in enumerate(self.experts):
            self.masks.set(ex, expert_trainable_E=None if trainable_LE is None else trainable_LE[l],
                           **({} if masks_LME is None else {"token_domains_T": mask_domains_T,
                                                            "domain_expert_mask_ME": masks_LME[l]}))
        loss_T = domain_ids_T >= 0
        if supervised_T is not None:
            loss_T = loss_T & supervised_T.to(loss_T.device).reshape(-1)
        spec = self.method.router_loss(self, loss_T, self.current_phase)
        added = None
        if spec is not None:
            added = RouterAddedLoss(spec[0], self.routers[0].weight.device)
            self.added_losses.set(self.routers, added)
            self._added = (added, spec[1])
        try:
            with recording(self.routers) as rec:
                yield out
        except BaseException:
            self.release()
            raise
        records = rec.layers()
        if records:
            ids_LTK = torch.stack([x["topk_ids_TK"] for x in records])
            self.tracker.observe(ids_LTK, domain_ids_T.to(ids_LTK.device))
        if added is not None and len(added.values) == len(self.routers):
            dev = self.routers[0].weight.device
            out.added_loss = (spec[1] * sum(v.to(dev).double() for v in added.values.values())).float()
            out.added_tokens = loss_T.sum()

    def _check_experts_forward(self) -> None:
        """Masks are consumed by desmoe's experts op only: stop before a step whose masks another forward would
        silently drop (one bound after ``desmoe.patch``, e.g. by Liger-Kernel, or another experts implementation)."""
        for name, _, ex in self.blocks:
            foreign = foreign_experts_forward(ex)
            if foreign is not None:
                raise RuntimeError(
                    f"{name}.experts runs {foreign}, not desmoe's experts op, so this step's expert gradient masks "
                    f"would be silently dropped; call desmoe.patch(model) again after the library that patched it "
                    f"(e.g. after Liger-Kernel's apply_liger_kernel_to_*): it takes the experts modules back")

    def release(self) -> None:
        """Drop the current micro-batch's masks and router loss (after its backward)."""
        self.masks.clear()
        self.added_losses.clear()
        self._added = None

    def combine(self, task_loss: torch.Tensor, added: torch.Tensor | None, added_scale=1.0) -> torch.Tensor:
        """``λ·added_scale·added + (1-λ)·task`` (task alone when the method adds nothing).

        ``added`` is :attr:`Forward.added_loss`, a value: the added loss's gradient enters inside the routers,
        where each router attached its term to the graph. A hook on the returned loss, which the backward reaches
        before any router, hands them their gradient weight: ``d(final loss)/d(returned loss) · λ · added_scale ·
        scale``, so whatever the caller does to the returned loss (divide by the accumulation steps, add an aux
        loss) applies to the added term as to the task term."""
        if added is None:
            return task_loss
        lam = self.last_lambda
        loss = lam * added_scale * added.to(task_loss.device) + (1.0 - lam) * task_loss
        cur = self._added
        if cur is not None and loss.requires_grad:
            weight, scale = cur[0].grad_weight, cur[1]

            def _hand_weight(grad):
                weight.copy_(grad.detach().double() * (lam * added_scale) * scale.to(grad.device))

            loss.register_hook(_hand_weight)
        return loss

    # --- around the optimizer ---------------------------------------------------------------------------
    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """AdamW parameter groups over every parameter that trains in *some* phase of this method (the others
        never get optimizer state). Expert weights get their decoupled weight decay from
        :meth:`apply_expert_weight_decay_` (only on rows that may train), so the optimizer sees ``weight_decay=0``
        for them; 1-D parameters (norms, biases) get none."""
        kinds = set().union(*(self.method.trainable_kinds(p) for p in self.method.phase_spans()))
        experts, decay, no_decay = [], [], []
        for n, p in self.model.named_parameters():
            k = self.kinds[n]
            if k not in kinds:
                continue
            (experts if k == "experts" else no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": experts, "weight_decay": 0.0, "desmoe_expert_decay": float(weight_decay)},
                  {"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def _expert_layer_of(self) -> dict[int, int]:
        """``id(parameter) -> layer`` for every routed-experts parameter (read afresh: FSDP2 replaces them)."""
        return {id(p): l for l, ex in enumerate(self.experts) for p in experts_parameters(ex)}

    def expert_rows(self) -> dict[int, torch.Tensor] | None:
        """``id(experts weight) -> bool [E]``: the rows that may change now (None: all rows of every weight)."""
        trainable_LE = self.expert_trainable_LE()
        if trainable_LE is None:
            return None
        return {i: trainable_LE[l] for i, l in self._expert_layer_of().items()}

    def optimizer(self, *, lr: float, weight_decay: float = 0.0, **adamw) -> torch.optim.Optimizer:
        """AdamW over :meth:`param_groups`, keeping the experts' moments only for the rows that may train
        (:class:`desmoe.method.optim.ExpertRowAdamW`); ``adamw``: betas, eps, ..."""
        from .optim import ExpertRowAdamW

        return ExpertRowAdamW(self.param_groups(weight_decay), rows_of=self.expert_rows, lr=lr, **adamw)

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Experts outside the current masks must not move: zero their weight gradients and their rows of the
        optimizer state. With zero grad and zero Adam moments the Adam update of those rows is exactly 0;
        decoupled weight decay on experts is applied by :meth:`apply_expert_weight_decay_` to trainable rows
        only. No weight copies are made. Under FSDP2 all of it happens on each rank's local shard."""
        self.release()  # the step's backward is done
        trainable_LE = self.expert_trainable_LE()
        if trainable_LE is not None:
            for l, ex in enumerate(self.experts):
                params = [p for p in experts_parameters(ex) if p.requires_grad]
                local = [local_rows(p.grad, trainable_LE[l]) for p in params if p.grad is not None]
                if local:
                    ops.mask_expert_grads_([g for g, _ in local], [m for _, m in local])
                for p in params if optimizer is not None else ():
                    st = optimizer.state.get(p, {})
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                        if key in st and tuple(st[key].shape) == tuple(p.shape):
                            s, off = local_rows(st[key], ~trainable_LE[l])
                            s[off] = 0
        if optimizer is not None:
            self.apply_expert_weight_decay_(optimizer)

    @torch.no_grad()
    def apply_expert_weight_decay_(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW's decoupled decay ``p *= 1 - lr·wd`` on the trainable expert rows of groups marked
        ``desmoe_expert_decay`` (as AdamW would, only for parameters that got a gradient). The experts' biases
        (gpt-oss's ``[E, n]`` ones) are not decayed, as HF ``Trainer`` leaves every bias undecayed; they stay in
        the experts' group, so optimizer checkpoints keep their group layout."""
        trainable_LE = self.expert_trainable_LE()
        layer_of = self._expert_layer_of()
        for g in optimizer.param_groups:
            wd = g.get("desmoe_expert_decay", 0.0)
            if not wd:
                continue
            f = 1.0 - g["lr"] * wd
            for p in g["params"]:
                if p.grad is None or (id(p) in layer_of and p.dim() < 3):  # no grad, or an expert bias [E, n]
                    continue
                l = layer_of.get(id(p))
                if l is None or trainable_LE is None:
                    (p.to_local() if hasattr(p, "to_local") else p).mul_(f)
                else:
                    local, rows = local_rows(p, trainable_LE[l])
                    local[rows] = local[rows] * f

    def end_step(self, step: int) -> bool:
        """The method's update after optimizer step ``step``; returns True when the masks changed."""
        return self.method.end_step(self, step)

    def prepare(self, batches, data_tokens_M: list[int] | None = None) -> torch.Tensor | None:
        """The method's pass before training (ESFT's expert scoring) over ``batches``; ``data_tokens_M``: the
        training tokens of each domain, when known (ESFT scores at most that many)."""
        return self.method.prepare(self, batches, data_tokens_M)

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.cfg.name, "tracker": self.tracker.state_dict(),
                "alr": [a.state_dict() for a in self.alr], "domain_names": self.domain_names,
                **self.method.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["method"] != self.cfg.name:
            raise ValueError(f"checkpoint method is {sd['method']!r} but the config says {self.cfg.name!r}")
        if list(sd["domain_names"]) != self.domain_names:
            raise ValueError(f"checkpoint domains {sd['domain_names']} differ from the config's {self.domain_names}")
        self.tracker.load_state_dict(sd["tracker"])
        for a, s in zip(self.alr, sd["alr"]):
            a.load_state_dict(s)
        self.method.load_state_dict(sd)


__all__ = ["MethodController", "Forward", "classify_parameters", "local_rows", "PARAM_KINDS"]
