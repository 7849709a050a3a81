"""The training loop for DES-MoE and every other method: :class:`Trainer` reads as data → step → log → save → eval.

``run(cfg, output_dir)`` builds a :class:`Trainer` and returns its JSON-able summary. The pieces live beside it:
:mod:`.builders` (device, texts, tokenizer, model, optimizer, base pretraining), :mod:`.signals` (SIGTERM/SIGINT),
:mod:`.guards` (non-finite losses, :class:`TrainingInterrupted`), :mod:`.rundir` (one run per directory, resume
and overwrite rules), :mod:`.runlog` (train.log, history.jsonl, run_info.json, TensorBoard, per-phase summary),
:mod:`.checkpoint` (every checkpoint read and write; exact resume), :mod:`.distributed` (torchrun DDP/FSDP2).
The method (what trains when, masks, added loss) is a :class:`desmoe.method.MethodController`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..integrations.hf import patch
from ..data.hub import check_config_hub_names
from ..eval import evaluate_model
from ..method import MethodController
from . import checkpoint as ck
from . import rundir
from .builders import (build_model, build_optimizer, build_tokenizer, drop_frozen_state, enable_activation_checkpointing,
                       eval_kwargs, load_texts, lr_factor, pretrain, progress_bar, resolve_device, use_bf16)
from .config import Config
from .durable import CheckpointError
from .guards import NonFiniteLossError, TrainingInterrupted, diagnose_nonfinite
from .loss import supervised_tokens, task_loss, to_device
from .plots import save_affinity_png, save_loss_curve_png
from .rng import set_rng_state
from .runlog import RunLog, rss_mb, truncate_history
from .signals import StopFlag

__all__ = ["run", "Trainer", "NonFiniteLossError", "TrainingInterrupted", "lr_factor", "build_model"]


def run(cfg: Config, output_dir: str, *, max_steps: int | None = None, resume: bool | str = False,
        progress: bool | None = None, log=print, overwrite: bool = False) -> dict:
    """Fine-tune per ``cfg`` into ``output_dir``; returns the summary (also written to ``summary.json``).

    ``max_steps`` caps the steps run now (T, the phase clock, stays ``train.max_steps``). ``resume``: ``True``
    continues from the latest checkpoint in ``output_dir``; a path (run directory or checkpoint directory)
    continues from that checkpoint, writing on into ``output_dir``. A checkpoint is verified (manifest sizes and
    sha256) and its config compared with ``cfg`` first: any problem is a :class:`CheckpointError`, never a silent
    restart. SIGTERM/SIGINT write a checkpoint at the next step boundary and raise :class:`TrainingInterrupted`.
    Under ``torchrun`` with ``train.distributed: ddp|fsdp2`` every rank calls this. ``output_dir`` is locked for
    the run's life (:mod:`.rundir`); resuming a finished run raises ``RunFinished`` and changes nothing; a
    checkpoint from elsewhere is resumed into an ``output_dir`` holding another run only with ``overwrite``.
    A signal outside the training steps stops the run at once (:class:`desmoe.train.signals.Interrupted`).
    """
    from .distributed import Dist
    from .numerics import flushed_denormals

    dist = Dist.setup(cfg.train.distributed, cfg.train.device)
    try:
        # CPU: subnormals flushed to zero for the run (up to 5x faster steps, same results; see numerics.py)
        with flushed_denormals(), rundir.hold(output_dir, enabled=dist.is_main), StopFlag() as flag:
            return Trainer(cfg, output_dir, max_steps=max_steps, resume=resume, progress=progress, log=log,
                           dist=dist, flag=flag, overwrite=overwrite).train()
    finally:
        dist.close()


@dataclass
class StepStats:
    """One optimizer step's global-batch losses (averaged over micro-batches), tokens and per-domain task loss."""

    num_domains: int
    loss: float = 0.0
    task: float = 0.0
    kd: float = 0.0
    tokens: int = 0
    grad_norm: float | None = None
    lr: float | None = None  # the learning rate this step's update used (before the scheduler steps)
    bad: tuple | None = None  # (term, value, batch) of the first non-finite loss or gradient norm
    last_batch: dict | None = None
    dom_loss_M: torch.Tensor = field(init=False)
    dom_cnt_M: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.dom_loss_M = torch.zeros(self.num_domains, dtype=torch.float64)
        self.dom_cnt_M = torch.zeros(self.num_domains, dtype=torch.float64)


class Trainer:
    """One training session of a run directory (a fresh run or a resumed one)."""

    def __init__(self, cfg: Config, output_dir: str, *, max_steps=None, resume=False, progress=None, log=print,
                 dist, flag: StopFlag, overwrite: bool = False):
        self.cfg, self.out, self.dist, self.flag, self.resume = cfg, output_dir, dist, flag, resume
        self.overwrite = overwrite
        self.t_start = time.time()
        self.main = dist.is_main
        self.progress = (cfg.train.progress if progress is None else progress) and self.main
        torch.manual_seed(cfg.model.seed)
        self.device = dist.device(resolve_device(cfg))
        self.bf16 = use_bf16(cfg, self.device)
        self.T = cfg.train.max_steps
        self.stop = self.T if max_steps is None else min(self.T, max_steps)
        self.fsdp = cfg.train.distributed == "fsdp2"
        self.cfg_dict = cfg.to_dict()
        self.runlog = RunLog(output_dir, main=self.main, log=log)
        self.say = self.runlog.say
        self.domains = list(cfg.data.domains)
        g = cfg.data.general
        self.eval_names = self.domains + ([g] if g and g not in self.domains else [])
        self.ev = eval_kwargs(cfg, self.device)
        self.ev_val = {**self.ev, "max_batches": cfg.train.val_batches}
        self.val_docs = None  # the validation split of every evaluated domain (train.val_batches > 0)
        self.last_val: tuple[int, dict] | None = None  # (step, evaluate_model result) of the latest validation
        self.skipped: list[int] = []
        self.losses: list[float] = []
        self.tokens_done, self.t_train = 0, 0.0
        self.first_loss: float | None = None  # the run's first task loss (from the checkpoint when resumed)
        self.rss0 = self.rss_peak = rss_mb()

    # --- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Checkpoint to resume (if any) → data → tokenizer, model (→ base pretraining) → method → optimizer."""
        if self.main:
            os.makedirs(self.out, exist_ok=True)
        self.dist.barrier()
        self.ckpt = self._checkpoint_to_resume()
        self.runlog.start(self.cfg, self.device, self.dist.world, resumed=self.ckpt is not None)
        self._build_model_and_data()
        t = self.cfg.train
        enable_activation_checkpointing(self.model, t.activation_checkpointing, t.activation_checkpointing_reentrant)
        self.summary = {"method": self.cfg.method.name, "domains": self.domains, "total_steps": self.T,
                        "output_dir": os.path.abspath(self.out), "world_size": self.dist.world,
                        "distributed": self.cfg.train.distributed}
        if self.ckpt is None and self.cfg.train.pretrain_steps:
            self._pretrain_base()
        self._build_method()
        self._build_optimizer()
        self.runlog.open_scalars()
        self.summary["phases"] = {p: list(span) for p, span in self.ctl.method.phase_spans().items()}

    def _checkpoint_to_resume(self) -> str | None:
        check_config_hub_names(self.cfg, data_only=bool(self.resume))  # hub names: cached or reachable, else fail fast
        if self.resume:
            ckpt = ck.open_checkpoint(self.out if self.resume is True else str(self.resume))  # resolve + verify
            rundir.check_config_matches(ckpt, self.cfg_dict)
            rundir.check_resume(ckpt, self.out, self.stop, overwrite=self.overwrite)  # finished run / another run's dir
            return ckpt
        if os.path.exists(os.path.join(self.out, ck.LATEST)):
            raise ValueError(f"--output-dir {self.out!r} already holds a run; pass --resume to continue it or "
                             f"choose another directory")
        return None

    def _build_model_and_data(self) -> None:
        from ..data import tokenize_domains

        cfg = self.cfg
        # general's training texts are needed to pretrain on it or to train the tokenizer on every domain
        trains_tok = not (cfg.tokenizer.path or cfg.model.path)
        need_general = self.ckpt is None and bool(cfg.data.general) and (cfg.train.pretrain_steps > 0 or trains_tok)
        train_texts = load_texts(cfg, self.eval_names if need_general else self.domains, "train", cfg.data.max_docs)
        eval_texts = load_texts(cfg, self.eval_names, "test", cfg.data.eval_max_docs)
        val_texts = load_texts(cfg, self.eval_names, "validation", cfg.data.eval_max_docs) \
            if cfg.train.val_batches else None
        if self.ckpt is not None:
            self.model, self.tok = ck.load_model(self.ckpt, device=self.device, dtype=getattr(torch, cfg.model.param_dtype))
            patch(self.model, backend=cfg.model.backend)
            self.model.train()
        else:
            self.tok = self._tokenizer(train_texts, trains_tok)
            self.model = build_model(cfg, len(self.tok), self.tok).to(self.device)
        self.train_docs = tokenize_domains(self.tok, train_texts)
        self.eval_docs = tokenize_domains(self.tok, eval_texts)
        if val_texts is not None:
            self.val_docs = tokenize_domains(self.tok, val_texts)

    def _tokenizer(self, train_texts, trains_tok: bool):
        if not (self.dist.enabled and trains_tok):
            return build_tokenizer(self.cfg, train_texts)
        # BPE training is not guaranteed identical across processes: rank 0 trains, the others load it
        tok_dir = os.path.join(self.out, ".tokenizer")
        if self.main:
            build_tokenizer(self.cfg, train_texts).save_pretrained(tok_dir)
        self.dist.barrier()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tok_dir)

    def _pretrain_base(self) -> None:
        general, steps = self.cfg.data.general, self.cfg.train.pretrain_steps
        if not general:
            raise ValueError("train.pretrain_steps > 0 needs data.general (the pretraining domain)")
        ev0 = evaluate_model(self.model, self.tok, {general: self.eval_docs[general]}, **self.ev)
        pl = pretrain(self.model, self.cfg, self.train_docs[general], self.tok.eos_token_id, self.device, steps,
                      progress=self.progress)
        self.summary["pretrain"] = {"steps": steps, "general_loss_random_init": ev0["domains"][general]["loss"],
                                    "first_loss": pl[0], "last_loss": pl[-1]}
        self.model.train()

    def _stream(self, *, seed: int, batch_size: int, sharded: bool):
        from ..data import MixedDomainStream

        d = self.cfg.data
        shard = dict(rank=self.dist.rank, world_size=self.dist.world) if sharded else {}
        return MixedDomainStream({n: self.train_docs[n] for n in self.domains}, d.seq_len, batch_size, seed=seed,
                                 weights=d.weights, eos_id=self.tok.eos_token_id, **shard)

    def _build_method(self) -> None:
        """The method controller; on resume its state, else the method's preparation pass; eval before training."""
        cfg = self.cfg
        self.stream = self._stream(seed=cfg.data.seed, batch_size=cfg.data.batch_size, sharded=True)
        self.ctl = MethodController(self.model, cfg.method, self.T, list(self.stream.domain_names))
        if self.ctl.alr:
            from ..method.alr import alr_summary, format_alr_summary

            self.summary["alr"] = alr_summary(self.model, cfg.method.alr_expansion)
            self.say(format_alr_summary(self.summary["alr"]))
        self.model.to(self.device)
        if self.main:
            ck.save_config(self.out, self.cfg_dict)
        self.start, self.before, self.val_before, self.trainer_state = 0, None, None, None
        n_prep = self.ctl.method.prepare_batches()
        if self.ckpt is not None:
            self.ctl.load_state_dict(ck.load_method_state(self.ckpt))
            self.trainer_state = ck.load_trainer_state(self.ckpt, self.dist.rank)
            self.start = int(self.trainer_state["step"])
            if self.start > self.T:
                raise CheckpointError(f"checkpoint {self.ckpt!r} is at step {self.start}, beyond "
                                         f"train.max_steps={self.T}")
            self.ctl.apply_phase(self.ctl.phase(min(self.start, self.T - 1)))
            meta = ck.read_meta(self.ckpt)
            self.before = meta.get("eval_before")
            self.val_before = meta.get("val_before")
            if self.val_docs is not None and self.val_before is None:
                self.say("validation before training: unknown (the checkpoint was written without "
                         "train.val_batches); val_before stays null")
            self._restore_progress(meta.get("run_progress"))
        elif n_prep:
            # every rank prepares on the same (whole global) batches, so all ranks reach the same state
            prep = self._stream(seed=cfg.data.seed + 7, batch_size=cfg.data.batch_size * self.dist.world,
                                sharded=False)
            data_tokens_M = [sum(map(len, self.train_docs[d])) for d in self.stream.domain_names]
            self.ctl.prepare((to_device(prep.next_batch(), self.device) for _ in range(n_prep)), data_tokens_M)
        if self.before is None:
            self.before = self._evaluate_before(self.eval_docs, "test", self.ev)
        if self.val_docs is not None and self.ckpt is None:
            self.val_before = self._evaluate_before(self.val_docs, "validation", self.ev_val)

    def _evaluate_before(self, docs: dict, split: str, ev: dict) -> dict:
        """Evaluation before training, through ``train.eval_cache`` where the run may use it."""
        from . import evalcache

        if self.cfg.train.eval_cache:
            why = evalcache.why_not(self.cfg, resumed=self.ckpt is not None)
            if why is None:
                return evalcache.evaluate_before(self.cfg, self.model, self.tok, docs, split, ev, write=self.main)
            self.say(f"train.eval_cache not used: {why}")
        return evaluate_model(self.model, self.tok, docs, **ev)

    def _build_optimizer(self) -> None:
        from .distributed import fully_shard_model

        if self.fsdp:
            fully_shard_model(self.model, self.device, bf16=self.bf16)
        self.opt, self.sched = build_optimizer(self.ctl, self.cfg)
        st = self.trainer_state
        if st is not None:
            drop_frozen_state(self.opt)
            if self.fsdp:
                ck.load_sharded_optimizer(self.model, self.opt, self.ckpt)
            else:
                self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            if st.get("stream") is not None:
                self.stream.load_state_dict(st["stream"])
            set_rng_state(st["rng"])
            if self.main and self.resume:
                truncate_history(self.runlog.history_path, self.start)
            self.say(f"resumed from {self.ckpt} at step {self.start} (phase {self.ctl.current_phase})")
        self.fwd = self._wrap()

    def _wrap(self):
        """DDP registers only the parameters that train now: re-wrapped when a phase changes them."""
        from .distributed import wrap_ddp

        return wrap_ddp(self.model, self.device) if self.cfg.train.distributed == "ddp" else self.model

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Set up, then per step: data → train_step → log → save (or stop on a signal); then save and evaluate."""
        from .distributed import routing_snapshot

        self.setup()
        bar = progress_bar(range(self.start, self.stop), self.progress, self.cfg.method.name)
        self.phase = self.ctl.phase(self.start)
        self.snap = routing_snapshot(self.ctl.tracker)
        self.flag.defer(True)  # signals in the steps: checkpoint at the next step boundary
        for step in bar:
            t_step = time.time()
            out = self.train_step(step)
            self.log_step(step, out, t_step, bar)
            self.maybe_stop_or_save(step)
        final = self.save(self.stop)
        self.flag.defer(False, checkpoint=final)  # from here a signal stops at once
        return self.finish(final)

    def train_step(self, step: int) -> StepStats:
        """One optimizer step over ``train.grad_accum`` micro-batches, then the method's update after it."""
        from .distributed import routing_snapshot, sync_routing_stats_

        ctl, opt, cfg = self.ctl, self.opt, self.cfg
        prev = ctl.current_phase
        self.phase = ctl.begin_step(step)
        if self.phase != prev:
            drop_frozen_state(opt)
            if cfg.train.distributed == "ddp":
                self.fwd = self._wrap()
            self.say(f"step {step}: phase -> {self.phase}")
        opt.zero_grad(set_to_none=True)
        st = StepStats(len(ctl.domain_names))
        for micro in range(cfg.train.grad_accum):
            self.forward_backward(to_device(self.stream.next_batch(), self.device), micro, st)
        if st.bad is None:
            ctl.before_optimizer_step(opt)  # masked experts: zero grads/state rows (before the clip norm)
            if cfg.train.max_grad_norm:
                st.grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.train.max_grad_norm))
                if not math.isfinite(st.grad_norm):
                    st.bad = ("gradient norm", st.grad_norm, st.last_batch)
        if st.bad is not None:
            self._nonfinite(step, *st.bad)
        else:
            opt.step()
        st.lr = opt.param_groups[0]["lr"]
        self.sched.step()
        sync_routing_stats_(ctl.tracker, self.snap, self.dist)  # every rank: the same counts, A and masks
        ctl.end_step(step)
        self.snap = routing_snapshot(ctl.tracker) if self.dist.enabled else None
        return st

    def forward_backward(self, b: dict, micro: int, st: StepStats) -> None:
        """Forward and backward of one micro-batch under the method's masks; adds its losses to ``st``."""
        ctl, W, ga = self.ctl, self.dist.world, self.cfg.train.grad_accum
        dom_T = b["domain_ids"].reshape(-1)
        no_sync = W > 1 and hasattr(self.fwd, "no_sync") and micro < ga - 1
        with self.fwd.no_sync() if no_sync else contextlib.nullcontext():
            with ctl.applied(dom_T, supervised_T=supervised_tokens(b["labels"], dom_T.numel())) as fwd:
                task, aux, ce, valid = task_loss(self.model, b, self.device, self.bf16, fwd=self.fwd,
                                                aux=self.cfg.train.aux_loss)
            kd = fwd.added_loss
            n_kd = fwd.added_tokens if fwd.added_tokens is not None else (dom_T >= 0).sum()
            g_task, g_kd, s_task, s_kd = self._global_means(task, kd, valid.sum().double(), n_kd.double())
            terms = {"task": g_task, "kd": g_kd, "aux": None if aux is None else float(aux.detach())}
            if st.bad is None:
                st.bad = next(((n, v, b) for n, v in terms.items() if v is not None and not math.isfinite(v)), None)
            loss = ctl.combine(task * s_task, kd, added_scale=s_kd)  # λ·KD + (1-λ)·task
            if aux is not None:
                loss = loss + aux
            if st.bad is None:
                (loss / ga).backward()
        g_loss = g_task if kd is None else ctl.last_lambda * g_kd + (1 - ctl.last_lambda) * g_task
        st.loss += (g_loss + (terms["aux"] or 0.0)) / ga
        st.task += g_task / ga
        st.kd += (g_kd if g_kd is not None else 0.0) / ga
        d_S = b["domain_ids"][:, 1:]
        ok = valid & (d_S >= 0)
        st.dom_loss_M.index_add_(0, d_S[ok].cpu(), ce[ok].double().cpu())
        st.dom_cnt_M.index_add_(0, d_S[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
        st.tokens += int((b["labels"] != -100).sum())
        st.last_batch = b

    def _global_means(self, task, kd, n_task, n_kd):
        """Global-batch means of the task and added loss, and each rank's rescaling of its own mean: the averaged
        DDP gradient is then the gradient of the global-batch mean (what one process would compute)."""
        W = self.dist.world
        zero = torch.zeros((), dtype=torch.float64, device=task.device)
        red = torch.stack([task.detach().double() * n_task, n_task,
                           (kd.detach().double() if kd is not None else zero) * n_kd, n_kd]).cpu()
        self.dist.all_reduce_(red)
        g_task = float(red[0] / red[1].clamp(min=1))
        g_kd = float(red[2] / red[3].clamp(min=1)) if kd is not None else None
        s_task = float(n_task) * W / float(red[1].clamp(min=1)) if W > 1 else 1.0
        s_kd = float(n_kd) * W / float(red[3].clamp(min=1)) if W > 1 else 1.0
        return g_task, g_kd, s_task, s_kd

    def _nonfinite(self, step: int, term: str, val: float, batch: dict) -> None:
        """Raise :class:`NonFiniteLossError` naming step, term and layer, or skip the batch (``skip_nonfinite``)."""
        where = (f"step {step} ({self.phase}): {term} loss is {val}" if term != "gradient norm" else
                 f"step {step} ({self.phase}): the gradient norm is {val}")
        if not self.cfg.train.skip_nonfinite:
            diag = diagnose_nonfinite(self.model, batch, self.device, self.bf16)
            self.say(f"non-finite {where}; {diag}")
            raise NonFiniteLossError(f"non-finite {where}; {diag}. Set train.skip_nonfinite: true to skip such "
                                     f"batches instead, or lower train.lr")
        self.skipped.append(step)
        self.opt.zero_grad(set_to_none=True)
        self.say(f"skipped batch of {where} (train.skip_nonfinite; {len(self.skipped)} skipped so far)")

    # --- log, save, stop -------------------------------------------------------------------------------------
    def log_step(self, step: int, out: StepStats, t_step: float, bar) -> None:
        ctl, W = self.ctl, self.dist.world
        self.losses.append(out.task)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_step  # tokens/s counts training compute only (not checkpoint or eval time)
        self.t_train += dt
        val = self._validate(step)  # after dt: validation time is not training time
        self.tokens_done += out.tokens * W
        skipped_now = bool(self.skipped) and self.skipped[-1] == step
        self.runlog.phase_step(self.phase, step, dt, out.tokens * W, out.task, skipped_now)
        tps = self.tokens_done / max(self.t_train, 1e-9)
        if hasattr(bar, "set_postfix"):  # the task loss, as in the summary; KD and its weight beside it
            bar.set_postfix(task=f"{out.task:.3f}", kd=f"{out.kd:.3f}", lam=f"{ctl.last_lambda:.2f}",
                            phase=self.phase, tok_s=f"{tps:.0f}")
        rss = rss_mb()
        if rss is not None:
            self.rss_peak = max(self.rss_peak or 0.0, rss)
        rec = {"step": step, "phase": self.phase, "loss": out.loss, "task": out.task, "kd": out.kd,
               "lambda": ctl.last_lambda, "lr": out.lr, "grad_norm": out.grad_norm,
               "tok_s": tps, "rss_mb": rss, "skipped_nonfinite": len(self.skipped), "train_s": self.t_train, **val}
        if self.device.type == "cuda":
            rec["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        rec.update(self._routing_record(out))
        self.runlog.step(rec, write=step % self.cfg.train.log_every == 0 or step == self.stop - 1 or skipped_now
                         or bool(val))
        if self.main and not self.progress and (step % self.cfg.train.log_every == 0 or step == self.stop - 1
                                                 or skipped_now):
            self.say(f"step {step:5d} {self.phase:<13} task {out.task:.4f} kd {out.kd:.4f} lambda "
                     f"{ctl.last_lambda:.3f} (objective {out.loss:.4f}) tok/s {tps:.0f}")

    def _validate(self, step: int) -> dict:
        """Every ``train.val_every`` steps and after the last: validation loss per fine-tuning domain
        (``val/<domain>``), their mean (``val/avg``) and the general domain's (``val/general``)."""
        every = self.cfg.train.val_every
        if not every or ((step + 1) % every and step != self.stop - 1):
            return {}
        g = self.cfg.data.general
        full = evaluate_model(self.model, self.tok, self.val_docs, **self.ev_val)  # restores train mode
        self.last_val, res = (step, full), full["domains"]
        rec = {f"val/{d}": res[d]["loss"] for d in self.domains}
        rec["val/avg"] = sum(rec.values()) / len(self.domains)
        if g:
            rec["val/general"] = res[g]["loss"]
        return rec

    def _routing_record(self, out: StepStats) -> dict:
        """Per-domain loss, mask sizes and expert load of the step."""
        ctl, rec = self.ctl, {}
        for m, d in enumerate(ctl.domain_names):
            if out.dom_cnt_M[m] > 0:
                rec[f"loss/{d}"] = float(out.dom_loss_M[m] / out.dom_cnt_M[m])
        masks = ctl.tracker.masks_LME
        if masks is not None:
            for m, d in enumerate(ctl.domain_names):
                rec[f"mask_size/{d}"] = float(masks[:, m].sum(-1).float().mean())
        load = ctl.tracker.load_LE.float()
        if load.sum() > 0:
            rec["expert_load_max_over_mean"] = float((load.max(-1).values / load.mean(-1).clamp(min=1)).mean())
        return rec

    def maybe_stop_or_save(self, step: int) -> None:
        """A signal on any rank stops every rank at the same step boundary, with a checkpoint; else periodic saves."""
        flag = self.flag
        sig = self.dist.all_reduce_(torch.tensor([0 if flag.signame is None else
                                                  (2 if flag.signame == "SIGTERM" else 1)]), op="max")
        if int(sig) and step + 1 < self.stop:
            signame = flag.signame or ("SIGTERM" if int(sig) == 2 else "SIGINT")
            path = self.save(step + 1)
            self.say(f"{signame}: wrote checkpoint {path} at step {step + 1}; stopping")
            self.runlog.close()
            raise TrainingInterrupted(signame, step + 1, path)
        if self.cfg.train.save_every and (step + 1) % self.cfg.train.save_every == 0 and step + 1 < self.stop:
            self.save(step + 1)

    def save(self, step: int) -> str:
        """Checkpoint ``step`` (every rank calls this under torchrun; rank 0 commits) + the affinity plot."""
        ctl, cfg = self.ctl, self.cfg
        meta = {"total_steps": self.T, "phase": self.phase, "method": cfg.method.name, "domains": ctl.domain_names,
                "eval_before": self.before, "val_before": self.val_before, "world_size": self.dist.world,
                "distributed": cfg.train.distributed, "run_progress": self._progress_state()}
        path = ck.save_checkpoint(self.out, step, model=self.model, tokenizer=self.tok, controller=ctl,
                                  optimizer=self.opt, scheduler=self.sched, stream_state=self.stream.state_dict(),
                                  meta=meta, config=self.cfg_dict, keep=cfg.train.keep_last or None,
                                  dist=self.dist, fsdp=self.fsdp)
        if self.main and cfg.train.plots and ctl.tracker.initialised:
            png = save_affinity_png(os.path.join(self.out, "plots", f"affinity_step-{step:06d}.png"),
                                    ctl.tracker.A_LME, ctl.tracker.masks_LME, ctl.domain_names,
                                    f"{cfg.method.name} step {step} ({self.phase})")
            if png:
                self.summary["plot"] = png
        self.dist.barrier()
        return path

    def _progress_state(self) -> dict:
        """What the summary needs of the steps run so far; kept in the checkpoint so that a resumed run's summary
        covers the whole run, not only the last session."""
        first = self.first_loss if self.first_loss is not None else (self.losses[0] if self.losses else None)
        return {"phases": self.runlog.phases, "train_loss_first": first,
                "tokens_done": self.tokens_done, "t_train": self.t_train, "skipped": list(self.skipped)}

    def _restore_progress(self, st: dict | None) -> None:
        if not st:  # a checkpoint from before this was recorded: the summary covers this session only
            return
        self.runlog.phases = {p: dict(v) for p, v in st.get("phases", {}).items()}
        self.first_loss = st.get("train_loss_first")
        self.tokens_done, self.t_train = int(st.get("tokens_done", 0)), float(st.get("t_train", 0.0))
        self.skipped = list(st.get("skipped", []))

    # --- eval and summary -------------------------------------------------------------------------------------
    def finish(self, final: str) -> dict:
        """Evaluate after training, write ``summary.json`` and return it."""
        ctl, start, stop = self.ctl, self.start, self.stop
        after = evaluate_model(self.model, self.tok, self.eval_docs, **self.ev)
        if self.val_docs is not None:  # the last step's validation (train.val_every) is already val_after
            last = self.last_val[1] if self.last_val and self.last_val[0] == stop - 1 else None
            self.summary.update(val_before=self.val_before, val_after=last or evaluate_model(
                self.model, self.tok, self.val_docs, **self.ev_val))
        if self.main and ctl.tracker.initialised and self.cfg.train.plots:
            from .plots import affinity_figure

            self.runlog.scalars.figure("affinity", affinity_figure(ctl.tracker.A_LME, ctl.tracker.masks_LME,
                                                                   ctl.domain_names), stop)
        if self.main and self.cfg.train.plots:
            save_loss_curve_png(self.runlog.history_path, os.path.join(self.out, "plots", "loss_curve.png"),
                                title=self.cfg.method.name)
        self.runlog.close()
        cuda_peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        self.summary.update({
            "steps_run": stop - start, "start_step": start, "final_step": stop, "checkpoint": final,
            "resumed_from": self.ckpt,
            "train_loss_first": self.first_loss if self.first_loss is not None else (self.losses[0] if self.losses
                                                                                     else None),
            "train_loss_last": self.losses[-1] if self.losses else None, "eval_before": self.before,
            "eval_after": after, "tokens_per_s": self.tokens_done / max(self.t_train, 1e-9),
            **self.runlog.phase_summary(), "skipped_nonfinite": self.skipped,
            "memory": {"rss_mb_start": self.rss0, "rss_mb_peak": self.rss_peak, "rss_mb_end": rss_mb(),
                       "cuda_peak_mb": cuda_peak},
            "seconds": time.time() - self.t_start, "masks": self._masks_summary(), **ctl.method.summary(),
        })
        if self.dist.enabled:
            self.summary["A_LME_checksum"] = float(ctl.tracker.A_LME.double().sum())
        self.runlog.write_summary(self.summary)
        self.say(f"done: steps {start}..{stop} of {self.T}; " + "; ".join(
            f"{p} {v['steps']} steps, task loss {v['task_loss_first']:.4f} -> {v['task_loss_last']:.4f}"
            for p, v in self.runlog.phases.items())
            + (f"; {len(self.skipped)} non-finite batches skipped" if self.skipped else ""))
        self.dist.barrier()
        return self.summary

    def _masks_summary(self):
        m, names = self.ctl.tracker.masks_LME, self.ctl.domain_names
        if m is None:
            return None
        return {d: [m[l, i].nonzero().flatten().tolist() for l in range(m.shape[0])] for i, d in enumerate(names)}
