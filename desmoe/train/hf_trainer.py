"""DES-MoE inside a Hugging Face ``transformers.Trainer`` script.

The KD term needs the routers' logits of the same forward as the task loss, which a callback cannot reach, so the
integration is a ``Trainer`` subclass (``compute_loss``) plus a callback (phases, masks, A, logging, method state
in checkpoints)::

    from desmoe.train import DesMoETrainer
    desmoe.patch(model)
    trainer = DesMoETrainer(model=model, args=TrainingArguments(..., max_steps=2000),
                            train_dataset=ds,                      # rows with input_ids, labels, domain_ids
                            method={"name": "des_moe"}, domain_names=["math", "code", "law"])
    trainer.train()

Every training row needs ``domain_ids`` (LongTensor[S], the domain index of each token, -1 on padding), e.g.
from :class:`StreamDataset` over a :class:`desmoe.data.MixedDomainStream`. Differences from ``desmoe train``:
gradient clipping (``max_grad_norm``) happens *before* the masked experts' gradients are zeroed (Trainer clips,
then calls ``on_pre_optimizer_step``), and the task loss is the model's own ``outputs.loss`` (less the model's
aux loss, which is added outside ``λ·KD + (1-λ)·task`` exactly as the loop does; ``aux_loss=False`` turns it off).
"""
from __future__ import annotations

import os

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is a hard dependency of desmoe
    raise ImportError(f"desmoe.train.hf_trainer needs transformers: {e}") from None

from .builders import drop_frozen_state
from .loss import aux_kwargs, model_aux_loss, supervised_tokens

METHOD_STATE = "desmoe_method.pt"


def _unwrap_optimizer(opt):
    """accelerate's ``AcceleratedOptimizer`` keeps the torch optimizer (and its ``state``) in ``.optimizer``."""
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class DesMoECallback(TrainerCallback):
    """Drives a :class:`desmoe.method.MethodController` from Trainer events: phase switches (``requires_grad``)
    at step begin, masked-expert gradients/optimizer rows before the optimizer step, A/mask updates at step end,
    and the method state (A, masks, ESFT selection) saved beside every Trainer checkpoint."""

    def __init__(self, controller):
        self.ctl = controller
        self.phase_log: list[tuple[int, str]] = []  # (step, phase) at each phase switch

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        prev = self.ctl.current_phase
        phase = self.ctl.begin_step(state.global_step)
        if phase != prev:
            self.phase_log.append((state.global_step, phase))
            opt = _unwrap_optimizer(optimizer)
            if opt is not None:  # frozen parameters keep no optimizer state
                drop_frozen_state(opt)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.ctl.before_optimizer_step(_unwrap_optimizer(optimizer))

    def on_step_end(self, args, state, control, **kw):
        self.ctl.end_step(state.global_step - 1)  # global_step was already incremented

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            d = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(d):
                torch.save(self.ctl.state_dict(), os.path.join(d, METHOD_STATE))


class StreamDataset(torch.utils.data.IterableDataset):
    """Rows (``input_ids``, ``labels``, ``domain_ids`` and ``attention_mask``, or ``position_ids`` instead of the
    mask under isolated packing; LongTensor[S]) of a :class:`desmoe.data.MixedDomainStream`, for ``Trainer`` (use
    ``max_steps``; the stream is endless). Isolated rows carry no 2-D mask: transformers separates the packed
    documents by their ``position_ids`` only without one (and without a KV cache: the trainer passes
    ``use_cache=False``); under flash attention only with one row per device batch."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        while True:
            b = self.stream.next_batch()
            if "position_ids" in b:
                b.pop("attention_mask", None)
            for i in range(b["input_ids"].shape[0]):
                yield {k: v[i] for k, v in b.items()}


def _refuse_peft(who: str, model, peft_config) -> None:
    """DES-MoE decides per phase which parameters train (router/ALR, masked experts, shared experts); a PEFT
    adapter's parameters are outside that table, so the combination is refused rather than half-applied."""
    is_peft = type(model).__module__.startswith("peft.") or hasattr(model, "peft_config")
    if is_peft or peft_config is not None:
        raise ValueError(
            f"{who}: a PEFT model or peft_config is not supported: DES-MoE sets which parameters train in each "
            f"phase (ALR/router, the DGES-masked experts, shared experts) and a LoRA adapter's parameters are not "
            f"among them, so its masks would not apply to the adapter. Train LoRA with the plain "
            f"Trainer/SFTTrainer on the desmoe-patched model (the patched experts give stock values and "
            f"gradients), or DES-MoE without PEFT")


class DesMoEMixin:
    """DES-MoE (or a baseline) inside a ``transformers.Trainer`` subclass: ALR + λ-weighted KD loss, A collection,
    per-token expert masks, phases, method state in checkpoints. One implementation behind :class:`DesMoETrainer`
    and :class:`desmoe.train.DesMoESFTTrainer` (TRL). ``method``: a :class:`desmoe.method.MethodConfig` or a dict
    of its fields; ``domain_names``: the domains indexed by the rows' ``domain_ids``. ``args.max_steps`` must be set
    (it is the phase clock T). The model is patched (``desmoe.patch``) if it is not already."""

    _desmoe_name = "DesMoETrainer"

    def __init__(self, *args, method=None, domain_names=None, aux_loss: bool = True, **kwargs):
        from ..integrations.hf import moe_blocks, patch
        from ..method import MethodConfig, MethodController, method_class

        who = self._desmoe_name
        model = kwargs.get("model", args[0] if args else None)
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is None:
            raise ValueError(f"{who}: model is required")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{who}: model must be a loaded transformers model (desmoe patches it before training), "
                            f"got {type(model).__name__} {model!r}; load it with AutoModelForCausalLM.from_pretrained")
        _refuse_peft(who, model, kwargs.get("peft_config"))
        if targs is None or getattr(targs, "max_steps", -1) is None or targs.max_steps <= 0:
            raise ValueError(f"{who}: args.max_steps must be > 0 (it is the DES-MoE phase clock T), got "
                             f"{getattr(targs, 'max_steps', None)!r}")
        if isinstance(method, dict) or method is None:
            method = MethodConfig(**(method or {}))
        if not isinstance(method, MethodConfig):
            raise TypeError(f"method must be a MethodConfig or a dict of its fields, got {type(method).__name__}")
        if isinstance(domain_names, str) or not isinstance(domain_names, (list, tuple)) or not domain_names \
                or not all(isinstance(d, str) and d for d in domain_names) \
                or len(set(domain_names)) != len(domain_names):
            raise ValueError(f"domain_names must be a non-empty list of distinct domain names (the index of each is "
                             f"a row's domain_ids value), got {domain_names!r}")
        if method_class(method.name)(method, targs.max_steps).prepare_batches():
            raise ValueError(f"{who}: method {method.name!r} needs a preparation pass over training batches "
                             f"before training (ESFT scores experts); use `desmoe train`")
        if not moe_blocks(model):
            patch(model)
        if not hasattr(model, "hf_device_map"):  # the method's tensors (A, masks, ALR) live beside the routers
            model.to(targs.device)
        if not isinstance(aux_loss, bool):
            raise ValueError(f"{who}: aux_loss must be True or False, got {aux_loss!r}")
        self.desmoe = MethodController(model, method, targs.max_steps, list(domain_names))
        self.desmoe_aux_loss = aux_loss
        self.desmoe.apply_phase(self.desmoe.phase(0))
        self._kd_sum, self._task_sum, self._n_loss, self._task_n, self._kd_n = 0.0, 0.0, 0, 0.0, 0.0
        super().__init__(*args, **kwargs)
        self.desmoe_callback = DesMoECallback(self.desmoe)
        self.add_callback(self.desmoe_callback)

    def _set_signature_columns_if_needed(self):
        """Keep ``domain_ids`` when ``remove_unused_columns`` drops what the model's forward does not take."""
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "domain_ids" not in self._signature_columns:
            self._signature_columns.append("domain_ids")

    def create_optimizer(self, model=None):
        """AdamW over the method's parameter groups (parameters that never train get no state)."""
        if self.optimizer is None:
            a = self.args
            self.optimizer = self.desmoe.optimizer(lr=a.learning_rate, weight_decay=a.weight_decay,
                                                   betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``λ·KD + (1-λ)·task``; ``inputs["domain_ids"]`` (LongTensor[B, S]) is consumed here.

        Normalised as stock ``Trainer.compute_loss`` normalises: with ``num_items_in_batch`` (the step's label
        tokens over all its micro-batches) the task loss is the model's sum over tokens divided by it, and so is
        the KD term (its sum over this micro-batch's tokens, averaged over layers), so k accumulated micro-batches
        give the gradients of the same rows in one batch. Evaluation (no gradients; rows with or without
        ``domain_ids``) is a plain forward: no masks, no routing statistics, no KD."""
        inputs = dict(inputs)
        dom = inputs.pop("domain_ids", None)
        if not torch.is_grad_enabled():  # evaluate / predict run under no_grad
            return self._evaluation_loss(model, inputs, dom, return_outputs, num_items_in_batch)
        if dom is None:
            raise ValueError(f"{self._desmoe_name}: every training batch needs 'domain_ids' (LongTensor[B, S], -1 "
                             "on padding); use desmoe.train.StreamDataset or add the column to your dataset")
        dom_T = dom.reshape(-1)
        ctl = self.desmoe
        self._own_experts()
        kwargs = dict(aux_kwargs(ctl.model, self.desmoe_aux_loss))
        scaled = bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None
        if scaled:
            kwargs["num_items_in_batch"] = num_items_in_batch
        inputs.setdefault("use_cache", False)  # no KV cache in training (and none under activation checkpointing)
        sup_T = supervised_tokens(inputs.get("labels"), dom_T.numel())  # the tokens the task loss supervises
        with ctl.applied(dom_T, supervised_T=sup_T) as fwd:
            outputs = model(**inputs, **kwargs)
        kd = fwd.added_loss
        task = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        aux = model_aux_loss(ctl.model, outputs)
        if aux is not None and "labels" in inputs:  # HF added coef·aux to outputs.loss: keep it out of (1-λ)
            task = task - aux.to(task.dtype)
        n_valid = fwd.added_tokens if fwd.added_tokens is not None else (dom_T >= 0).sum()
        n_labels = sup_T.sum() if sup_T is not None else torch.zeros((), dtype=torch.long)
        kd_scale = 1.0
        if scaled and kd is not None:  # Σ KD over this micro-batch's tokens / the step's label tokens, like task
            kd_scale = n_valid.to(kd.device, torch.float64) / torch.as_tensor(num_items_in_batch, device=kd.device,
                                                                              dtype=torch.float64)
        loss = ctl.combine(task, kd, added_scale=kd_scale)
        if aux is not None:
            loss = loss + aux
        if scaled and getattr(self.args, "average_tokens_across_devices", False):
            # as stock compute_loss: num_items_in_batch counted the tokens of every process
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        # logged as per-token means whatever the accumulation: token-weighted sums over the logging window
        task_sum = float(task.detach()) * (float(num_items_in_batch) if scaled else float(n_labels))
        self._task_sum += task_sum
        self._task_n += float(n_labels)
        if kd is not None:
            self._kd_sum += float(kd) * float(n_valid)
            self._kd_n += float(n_valid)
        self._n_loss += 1
        return (loss, outputs) if return_outputs else loss

    def _own_experts(self) -> None:
        """desmoe's experts forward on every experts module: the Trainer applies Liger-Kernel
        (``use_liger_kernel=True``) when training starts, binding Liger's fused-MoE forward on each experts module;
        take them back (warned once), keeping the rest of Liger (RMSNorm, RoPE, fused linear cross-entropy)."""
        from ..integrations.hf import foreign_experts_forward, take_over_experts

        if any(foreign_experts_forward(ex) is not None for ex in self.desmoe.experts):
            take_over_experts(self.desmoe.model)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation, plus ``<prefix>_loss/<domain>`` (the per-token loss of each domain's targets)
        for rows that carry ``domain_ids``; rows without them (a general set) give the overall loss alone."""
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                   metric_key_prefix=metric_key_prefix)
        ds = self.eval_dataset if eval_dataset is None else eval_dataset
        if ds is None or isinstance(ds, dict):  # several sets: each went through this method on its own
            return metrics
        per = self._per_domain_losses(ds)
        if per:
            extra = {f"{metric_key_prefix}_loss/{d}": v for d, v in per.items()}
            metrics.update(extra)
            self.log(extra)
        return metrics

    @torch.no_grad()
    def _per_domain_losses(self, dataset) -> dict[str, float]:
        from ..eval import token_losses

        names = self.desmoe.domain_names
        loss_M = torch.zeros(len(names), dtype=torch.float64)
        count_M = torch.zeros(len(names), dtype=torch.float64)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for batch in self.get_eval_dataloader(dataset):
                dom = batch.get("domain_ids")
                if dom is None:
                    return {}
                inputs = {k: v for k, v in batch.items() if k not in ("domain_ids", "labels")}
                inputs.setdefault("use_cache", False)  # a KV cache would turn off packed-document masks
                with self.compute_loss_context_manager():
                    logits = model(**inputs).logits
                labels = batch.get("labels", batch["input_ids"])
                ce, valid = token_losses(logits, labels)
                d_S = dom[:, 1:]  # each target token's domain (as the training loop counts them)
                ok = valid & (d_S >= 0)
                loss_M.index_add_(0, d_S[ok].cpu(), ce[ok].double().cpu())
                count_M.index_add_(0, d_S[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
        finally:
            model.train(was_training)
        return {n: float(loss_M[i] / count_M[i]) for i, n in enumerate(names) if count_M[i] > 0}

    def _evaluation_loss(self, model, inputs, dom, return_outputs, num_items_in_batch):
        """The model's own loss on rows with or without ``domain_ids`` (evaluate / predict)."""
        outputs = model(**{"use_cache": False, **inputs})
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Adds phase, λ, task/KD loss and per-domain mask sizes to the Trainer's logs."""
        ctl = self.desmoe
        if "loss" in logs and self._n_loss:
            logs["task_loss"] = self._task_sum / max(self._task_n, 1.0)
            logs["kd_loss"] = self._kd_sum / max(self._kd_n, 1.0)
            self._kd_sum, self._task_sum, self._n_loss, self._task_n, self._kd_n = 0.0, 0.0, 0, 0.0, 0.0
            logs["desmoe_lambda"] = ctl.last_lambda
            logs["desmoe_phase"] = ctl.current_phase
            m = ctl.tracker.masks_LME
            if m is not None:
                for i, d in enumerate(ctl.domain_names):
                    logs[f"mask_size/{d}"] = float(m[:, i].sum(-1).float().mean())
        return super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Also restores A, masks and the ESFT selection saved beside a Trainer checkpoint. CPU subnormals are
        flushed to zero while it trains (up to 5x faster steps, same results; desmoe/train/numerics.py) and the
        process's previous mode is restored after."""
        from .numerics import flushed_denormals

        with flushed_denormals():
            return self._train_with_method_state(resume_from_checkpoint, *args, **kwargs)

    def _train_with_method_state(self, resume_from_checkpoint=None, *args, **kwargs):
        ckpt = resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = get_last_checkpoint(self.args.output_dir)
        if isinstance(ckpt, str):
            p = os.path.join(ckpt, METHOD_STATE)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"checkpoint {ckpt!r} has no {METHOD_STATE} (not written by DesMoETrainer?)")
            from .checkpoint import load_state_file  # weights_only: a received file runs no code

            self.desmoe.load_state_dict(load_state_file(p))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, *args, **kwargs)


class DesMoETrainer(DesMoEMixin, Trainer):
    """``transformers.Trainer`` with DES-MoE (or a baseline): see :class:`DesMoEMixin`."""
