"""The training loop for DES-MoE and every other method: :class:`Trainer` reads as data → step → log → save → eval.

``run(cfg, output_dir)`` builds a :class:`Trainer` and returns its JSON-able summary. The pieces live beside it:
:mod:`.builders` (device, texts, tokenizer, model, optimizer, base pretraining), :mod:`.signals` (SIGTERM/SIGINT),
:mod:`.guards` (non-finite losses, :class:`TrainingInterrupted`), :mod:`.rundir` (one run per directory, resume
and overwrite rules), :mod:`.runlog` (train.log, history.jsonl, run_info.json, TensorBoard, the summary's losses,
speed and memory), :mod:`.checkpoint` (every checkpoint read and write; exact resume), :mod:`.distributed`
(torchrun DDP/FSDP2).
The method (what trains when, masks, added loss) is a :class:`desmoe.method.MethodController`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from ..integrations.hf import patch
from ..data.hub import check_config_hub_names
from ..eval import evaluate_model
from ..method import MethodController
from . import checkpoint as ck
from . import evalcache, rundir
from .builders import (build_model, build_optimizer, build_tokenizer, drop_frozen_state,
                       enable_activation_checkpointing, eval_kwargs, load_texts, lr_factor, pretrain, progress_bar,
                       resolve_device, use_bf16)
from .config import Config
from .distributed import Dist, fully_shard_model, global_means, routing_snapshot, sync_routing_stats_, wrap_ddp
from .durable import CheckpointError
from .guards import NonFiniteLossError, TrainingInterrupted, diagnose_nonfinite
from .loss import StepStats, supervised_tokens, task_loss, to_device
from .plots import save_affinity_png, save_loss_curve_png
from .rng import set_rng_state
from .runlog import RunLog, truncate_history
from .signals import StopFlag

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from ..data import MixedDomainStream

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
    from .numerics import flushed_denormals

    dist = Dist.setup(cfg.train.distributed, cfg.train.device)
    try:
        # CPU: subnormals flushed to zero for the run (up to 5x faster steps, same results; see numerics.py)
        with flushed_denormals(), rundir.hold(output_dir, enabled=dist.is_main), StopFlag() as flag:
            return Trainer(cfg, output_dir, max_steps=max_steps, resume=resume, progress=progress, log=log,
                           dist=dist, flag=flag, overwrite=overwrite).train()
    finally:
        dist.close()


class Trainer:
    """One training session of a run directory (a fresh run or a resumed one).

    Every attribute is declared here (as torchtitan's Trainer does): ``__init__`` sets those of the first group,
    :meth:`setup` builds the second, :meth:`train` the third."""

    # the session's settings (__init__)
    cfg: Config
    cfg_dict: dict  # cfg as written to config.yaml and every checkpoint's config.json
    out: str  # the run directory
    dist: Dist
    flag: StopFlag  # SIGTERM/SIGINT: deferred inside the steps
    resume: bool | str  # True (the run's latest checkpoint), a checkpoint or run path, or False
    overwrite: bool
    main: bool  # rank 0: writes the run's files
    progress: bool
    device: torch.device
    bf16: bool
    fsdp: bool
    T: int  # train.max_steps: the phase clock
    stop: int  # the step this session stops before (max_steps caps it)
    t_start: float
    runlog: RunLog  # the run's record: logs, history, summary entries of the steps
    say: Callable[[str], None]  # a message on the console and in train.log (rank 0)
    domains: list[str]  # the fine-tuning domains
    eval_names: list[str]  # the fine-tuning domains + the general domain (the forgetting probe)
    ev: dict  # evaluate_model's arguments (test split)
    ev_val: dict  # ... and for validation (train.val_batches)
    val_docs: dict | None  # the validation split of every evaluated domain (train.val_batches > 0)
    last_val: tuple[int, dict] | None  # (step, evaluate_model result) of the latest validation
    # built by setup()
    ckpt: str | None  # the checkpoint this session resumes from
    model: nn.Module
    tok: PreTrainedTokenizerBase
    train_docs: dict[str, list]  # token docs per domain
    eval_docs: dict[str, list]
    summary: dict  # summary.json, filled in as the run goes
    stream: MixedDomainStream  # the training batches (this rank's shard)
    ctl: MethodController
    start: int  # the first step of this session
    before: dict | None  # evaluation before training (test split); from the checkpoint when resumed
    val_before: dict | None
    trainer_state: dict | None  # the checkpoint's trainer.pt (resumed sessions)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    fwd: nn.Module  # what the forward calls: the model, or its DDP wrapper
    # the loop (train)
    phase: str
    snap: tuple[torch.Tensor, torch.Tensor] | None  # the routing counts after the last sync (distributed runs)

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
        self.eval_names = cfg.data.eval_domains()
        self.ev = eval_kwargs(cfg, self.device)
        self.ev_val = {**self.ev, "max_batches": cfg.train.val_batches}
        self.val_docs = None
        self.last_val = None

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
            dtype = getattr(torch, cfg.model.param_dtype)
            self.model, self.tok = ck.load_model(self.ckpt, device=self.device, dtype=dtype)
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
                                 weights=d.weights, eos_id=self.tok.eos_token_id, packing=d.packing, **shard)

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
            self.runlog.restore_progress(meta.get("run_progress"))
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
        if self.cfg.train.eval_cache:
            why = evalcache.why_not(self.cfg, resumed=self.ckpt is not None)
            if why is None:
                return evalcache.evaluate_before(self.cfg, self.model, self.tok, docs, split, ev, write=self.main)
            self.say(f"train.eval_cache not used: {why}")
        return evaluate_model(self.model, self.tok, docs, **ev)

    def _build_optimizer(self) -> None:
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
        return wrap_ddp(self.model, self.device) if self.cfg.train.distributed == "ddp" else self.model

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Set up, then per step: data → train_step → log → save (or stop on a signal); then save and evaluate."""
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
            g_task, g_kd, s_task, s_kd = global_means(self.dist, task, kd, valid.sum().double(), n_kd.double())
            terms = {"task": g_task, "kd": g_kd, "aux": None if aux is None else float(aux.detach())}
            if st.bad is None:
                st.bad = next(((n, v, b) for n, v in terms.items() if v is not None and not math.isfinite(v)), None)
            loss = ctl.combine(task * s_task, kd, added_scale=s_kd)  # λ·KD + (1-λ)·task
            if aux is not None:
                loss = loss + aux
            if st.bad is None:
                (loss / ga).backward()
        st.add(b, ce, valid, g_task, g_kd, terms["aux"], lam=ctl.last_lambda, grad_accum=ga)

    def _nonfinite(self, step: int, term: str, val: float, batch: dict) -> None:
        """Raise :class:`NonFiniteLossError` naming step, term and layer, or skip the batch (``skip_nonfinite``)."""
        where = (f"step {step} ({self.phase}): {term} loss is {val}" if term != "gradient norm" else
                 f"step {step} ({self.phase}): the gradient norm is {val}")
        if not self.cfg.train.skip_nonfinite:
            diag = diagnose_nonfinite(self.model, batch, self.device, self.bf16)
            self.say(f"non-finite {where}; {diag}")
            raise NonFiniteLossError(f"non-finite {where}; {diag}. Set train.skip_nonfinite: true to skip such "
                                     f"batches instead, or lower train.lr")
        self.runlog.skipped.append(step)
        self.opt.zero_grad(set_to_none=True)
        self.say(f"skipped batch of {where} (train.skip_nonfinite; {len(self.runlog.skipped)} skipped so far)")

    # --- log, save, stop -------------------------------------------------------------------------------------
    def log_step(self, step: int, out: StepStats, t_step: float, bar) -> None:
        ctl, rl = self.ctl, self.runlog
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_step  # tokens/s counts training compute only (not checkpoint or eval time)
        tps, skipped_now = rl.count_step(self.phase, step, dt, out.tokens * self.dist.world, out.task)
        val = self._validate(step)  # after dt: validation time is not training time
        if hasattr(bar, "set_postfix"):  # the task loss, as in the summary; KD and its weight beside it
            bar.set_postfix(task=f"{out.task:.3f}", kd=f"{out.kd:.3f}", lam=f"{ctl.last_lambda:.2f}",
                            phase=self.phase, tok_s=f"{tps:.0f}")
        rec = {"step": step, "phase": self.phase, "loss": out.loss, "task": out.task, "kd": out.kd,
               "lambda": ctl.last_lambda, "lr": out.lr, "grad_norm": out.grad_norm, "tok_s": tps,
               "rss_mb": rl.rss_now(), "skipped_nonfinite": len(rl.skipped), "train_s": rl.t_train, **val}
        if self.device.type == "cuda":
            rec["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        rec.update(out.domain_losses(ctl.domain_names))
        rec.update(ctl.tracker.routing_record(ctl.domain_names))
        due = step % self.cfg.train.log_every == 0 or step == self.stop - 1 or skipped_now
        rl.step(rec, write=due or bool(val))
        if self.main and not self.progress and due:
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
                "distributed": cfg.train.distributed, "run_progress": self.runlog.progress_state()}
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
            "resumed_from": self.ckpt, "eval_before": self.before, "eval_after": after,
            **self.runlog.run_summary(cuda_peak), "seconds": time.time() - self.t_start,
            "masks": ctl.tracker.masks_by_domain(ctl.domain_names), **ctl.method.summary(),
        })
        if self.dist.enabled:
            self.summary["A_LME_checksum"] = float(ctl.tracker.A_LME.double().sum())
        self.runlog.write_summary(self.summary)
        self.runlog.say_done(start, stop, self.T)
        self.dist.barrier()
        return self.summary
