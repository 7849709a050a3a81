"""The training loop: data → model → loss → method hooks → optimizer, for DES-MoE and every baseline.

``run(cfg, output_dir)`` does everything (data, tokenizer, model, optional base pretraining, fine-tuning,
checkpoints, plots, before/after evaluation) and returns a JSON-able summary. Production behaviour:
crash-safe checkpoints and exact resume (:mod:`.checkpoint`), SIGTERM/SIGINT -> checkpoint at the next step
boundary (:class:`TrainingInterrupted`), NaN/inf -> :class:`NonFiniteLossError` naming step, loss term and layer
(or ``train.skip_nonfinite``), torchrun DDP/FSDP2 (:mod:`.distributed`), per-step RSS in ``history.jsonl``,
``run_info.json`` (versions, git sha) and a per-phase summary.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time

import torch

from .. import patch
from ..data.hub import check_config_hub_names
from ..eval import autocast_ctx, evaluate_model, token_losses
from ..method import MethodController
from . import checkpoint as ck
from . import rundir
from .config import Config
from .plots import Scalars, save_affinity_png
from .signals import StopFlag


def resolve_device(cfg: Config) -> torch.device:
    d = cfg.train.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {d!r} but no CUDA device is available")
    return torch.device(d)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.train.bf16 in ("auto", True, "true")


# --- data ------------------------------------------------------------------------------------------------------
def load_texts(cfg: Config, names: list[str], split: str, max_docs: int | None) -> dict[str, list[str]]:
    from ..data import load_domain_texts

    out = {}
    for d in names:
        texts = load_domain_texts(d, split, source=cfg.data.sources.get(d), max_docs=max_docs, seed=cfg.data.seed,
                                  text_field=cfg.data.text_field)
        if not texts:
            raise ValueError(f"data.domains: domain {d!r} has no {split} documents"
                             + (f" in {cfg.data.sources[d]!r}" if d in cfg.data.sources else ""))
        out[d] = texts
    return out


def build_tokenizer(cfg: Config, texts: dict[str, list[str]]):
    if cfg.tokenizer.path or cfg.model.path:
        from transformers import AutoTokenizer

        src = cfg.tokenizer.path or cfg.model.path  # a pretrained model brings its own tokenizer
        field = "tokenizer.path" if cfg.tokenizer.path else "model.path"
        try:
            return AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{field}: cannot load a tokenizer from {src!r}: {e}") from None
    from ..data import train_tokenizer

    corpus = [t for ts in texts.values() for t in ts]
    return train_tokenizer(corpus, vocab_size=cfg.tokenizer.vocab_size)


def build_model(cfg: Config, vocab_size: int, tokenizer=None):
    """The model (random tiny or ``from_pretrained``), vocab matched to the tokenizer, patched."""
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.tiny:
        from ..integrations.tiny import tiny_model

        extra = {}
        if tokenizer is not None:
            extra = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                     if getattr(tokenizer, k, None) is not None}
        model = tiny_model(cfg.model.tiny, seed=cfg.model.seed, dtype=dtype,
                           **{**extra, **cfg.model.overrides, "vocab_size": vocab_size})
    else:
        from transformers import AutoModelForCausalLM

        src = cfg.model.path
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **cfg.model.overrides)
        except OSError as e:
            raise FileNotFoundError(f"model.path: cannot load {src!r} (a local directory or a cached Hugging Face "
                                    f"name is needed; no downloads): {e}") from None
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
    patch(model, backend=cfg.model.backend)
    return model.train()


def lr_factor(step: int, cfg: Config) -> float:
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    x = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    f = 0.5 * (1 + math.cos(math.pi * x)) if t.lr_schedule == "cosine" else 1.0 - x
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * f


def build_optimizer(model, ctl: MethodController, cfg: Config):
    """AdamW over the method's parameter groups (parameters that never train get no state) + LR schedule."""
    opt = torch.optim.AdamW(ctl.param_groups(cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=(cfg.train.beta1, cfg.train.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def drop_frozen_state(opt: torch.optim.Optimizer) -> None:
    """Frozen parameters keep no optimizer state (after a phase freezes them)."""
    for g in opt.param_groups:
        for p in g["params"]:
            if not p.requires_grad:
                opt.state.pop(p, None)


# --- one step ------------------------------------------------------------------------------------------------------
def task_loss(model, batch, device, bf16, fwd=None):
    """``(mean CE, coef·aux loss or None, per-token CE [B,S-1], valid [B,S-1])``; aux is the model's own
    load-balancing loss when its config enables it (``output_router_logits``). ``fwd``: the module to call
    (a DDP wrapper of ``model``), default ``model``."""
    with autocast_ctx(device, bf16):
        out = (fwd or model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    ce, valid = token_losses(out.logits, batch["labels"])
    loss = ce.sum() / valid.sum().clamp(min=1)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        aux = getattr(model.config, "router_aux_loss_coef", 0.0) * aux.float()
    return loss, aux, ce.detach(), valid


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def pretrain(model, cfg: Config, docs: list[list[int]], eos_id: int, device, steps: int, progress: bool) -> list[float]:
    """Base-model pretraining on the general domain (full model, AdamW, no method): the demo's 'pretrained' MoE."""
    from ..data import MixedDomainStream

    stream = MixedDomainStream({"general": docs}, cfg.data.seq_len, cfg.data.batch_size, seed=cfg.data.seed + 1,
                               eos_id=eos_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.pretrain_lr, betas=(0.9, 0.95))
    bf16 = use_bf16(cfg, device)
    losses = []
    it = _progress(range(steps), progress, "pretrain (general)")
    for s in it:
        lr = cfg.train.pretrain_lr * min(1.0, (s + 1) / max(1, steps // 10)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, aux, _, _ = task_loss(model, _to(stream.next_batch(), device), device, bf16)
        if aux is not None:
            loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    del opt
    return losses


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, dynamic_ncols=True, leave=True)


# --- failures the loop reports --------------------------------------------------------------------------------------
class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: a checkpoint was written at the next step boundary, then the run stopped."""

    def __init__(self, signame: str, step: int, checkpoint: str):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        self.exit_code = 128 + int(getattr(signal, signame, signal.SIGTERM))
        super().__init__(f"{signame} received: checkpoint of step {step} written to {checkpoint}; continue with "
                         f"`desmoe train ... --resume` (or --resume {checkpoint})")


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


def _rss_mb() -> float | None:
    """Resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def run_info(cfg: Config, device, world_size: int) -> dict:
    """What a person needs to reproduce the session: versions, git sha, host, command line, device."""
    import platform
    import socket
    import subprocess
    import sys

    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    sha, dirty = None, None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        if sha:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
            "host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": {m: ver(m) for m in ("desmoe", "torch", "transformers", "triton", "numpy", "tokenizers")},
            "git_sha": sha, "git_dirty": dirty, "device": str(device), "world_size": world_size,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "method": cfg.method.name, "total_steps": cfg.train.max_steps}


# --- the run --------------------------------------------------------------------------------------------------------
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
    """
    from .distributed import Dist

    dist = Dist.setup(cfg.train.distributed, cfg.train.device)
    try:
        with rundir.hold(output_dir, enabled=dist.is_main), StopFlag() as flag:  # one run per directory
            return _run(cfg, output_dir, max_steps=max_steps, resume=resume, progress=progress, log=log,
                        dist=dist, flag=flag, overwrite=overwrite)
    finally:
        dist.close()


def _run(cfg: Config, output_dir: str, *, max_steps, resume, progress, log, dist, flag, overwrite=False) -> dict:
    from ..data import MixedDomainStream, tokenize_domains
    from .distributed import (fsdp_before_optimizer_step, fully_shard_model, routing_snapshot, sync_routing_stats_,
                              wrap_ddp)

    t_start = time.time()
    main = dist.is_main
    progress = (cfg.train.progress if progress is None else progress) and main
    torch.manual_seed(cfg.model.seed)
    device = dist.device(resolve_device(cfg))
    bf16 = use_bf16(cfg, device)
    T = cfg.train.max_steps
    stop = T if max_steps is None else min(T, max_steps)
    if main:
        os.makedirs(output_dir, exist_ok=True)
    dist.barrier()
    log_path = os.path.join(output_dir, "train.log")

    def say(msg: str) -> None:  # rank 0 only; flushed so a killed job leaves its log behind
        if not main:
            return
        log(msg)
        try:
            import sys

            sys.stdout.flush()
        except Exception:
            pass
        with open(log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    domains = list(cfg.data.domains)
    general = cfg.data.general
    eval_names = domains + ([general] if general and general not in domains else [])
    ckpt = None
    cfg_dict = cfg.to_dict()
    check_config_hub_names(cfg, data_only=bool(resume))  # hub names: cached or reachable, else fail fast
    if resume:
        src = output_dir if resume is True else str(resume)
        ckpt = ck.resolve_checkpoint(src)
        ck.verify_checkpoint(ckpt)
        ck.check_config_matches(ckpt, cfg_dict)
        rundir.check_resume(ckpt, output_dir, stop, overwrite=overwrite)  # finished run / another run's dir
    elif os.path.exists(os.path.join(output_dir, ck.LATEST)):
        raise ValueError(f"--output-dir {output_dir!r} already holds a run; pass --resume to continue it or choose "
                         f"another directory")
    hist_path = os.path.join(output_dir, "history.jsonl")
    if main:
        if ckpt is None:
            open(hist_path, "w").close()
            open(log_path, "w").close()
        with open(os.path.join(output_dir, "run_info.json"), "a") as f:
            f.write(json.dumps(run_info(cfg, device, dist.world), default=str) + "\n")
    # general's training texts are needed to pretrain on it or to train the tokenizer on every domain
    trains_tok = not (cfg.tokenizer.path or cfg.model.path)
    need_general = ckpt is None and bool(general) and (cfg.train.pretrain_steps > 0 or trains_tok)
    train_texts = load_texts(cfg, eval_names if need_general else domains, "train", cfg.data.max_docs)
    eval_texts = load_texts(cfg, eval_names, "test", cfg.data.eval_max_docs)

    if ckpt is not None:
        model, tok = ck.load_model(ckpt, device=device, dtype=getattr(torch, cfg.model.dtype))
        patch(model, backend=cfg.model.backend)
        model.train()
    else:
        if dist.enabled and trains_tok:  # BPE training is not guaranteed identical across processes: rank 0 trains
            tok_dir = os.path.join(output_dir, ".tokenizer")
            if main:
                build_tokenizer(cfg, train_texts).save_pretrained(tok_dir)
            dist.barrier()
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tok = build_tokenizer(cfg, train_texts)
        model = build_model(cfg, len(tok), tok).to(device)
    eos = tok.eos_token_id
    train_docs = tokenize_domains(tok, train_texts)
    eval_docs = tokenize_domains(tok, eval_texts)
    ev = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, max_batches=cfg.train.eval_batches,
              math_n=0, device=device, bf16=bf16, general=general)

    summary = {"method": cfg.method.name, "domains": domains, "total_steps": T, "output_dir": os.path.abspath(output_dir),
               "world_size": dist.world, "distributed": cfg.train.distributed}
    if ckpt is None and cfg.train.pretrain_steps:
        if not general:
            raise ValueError("train.pretrain_steps > 0 needs data.general (the pretraining domain)")
        ev0 = evaluate_model(model, tok, {general: eval_docs[general]}, **ev)
        pl = pretrain(model, cfg, train_docs[general], eos, device, cfg.train.pretrain_steps, progress)
        summary["pretrain"] = {"steps": cfg.train.pretrain_steps, "general_loss_random_init": ev0["domains"][general]["loss"],
                               "first_loss": pl[0], "last_loss": pl[-1]}
        model.train()

    stream = MixedDomainStream({d: train_docs[d] for d in domains}, cfg.data.seq_len, cfg.data.batch_size,
                               seed=cfg.data.seed, weights=cfg.data.weights, eos_id=eos, rank=dist.rank,
                               world_size=dist.world)
    ctl = MethodController(model, cfg.method, T, list(stream.domain_names))
    model.to(device)
    if main:
        ck.save_config(output_dir, cfg_dict)
    start = 0
    before = None
    st = None
    if ckpt is not None:
        ctl.load_state_dict(ck.load_method_state(ckpt))
        st = ck.load_trainer_state(ckpt, dist.rank)
        start = int(st["step"])
        if start > T:
            raise ck.CheckpointError(f"checkpoint {ckpt!r} is at step {start}, beyond train.max_steps={T}")
        ctl.apply_phase(ctl.phase(min(start, T - 1)))
        before = ck.read_meta(ckpt).get("eval_before")
    elif cfg.method.is_esft:
        # every rank scores the same (whole global) batches, so all ranks select the same experts
        esft_stream = MixedDomainStream({d: train_docs[d] for d in domains}, cfg.data.seq_len,
                                        cfg.data.batch_size * dist.world, seed=cfg.data.seed + 7,
                                        weights=cfg.data.weights, eos_id=eos)
        ctl.score_esft([_to(esft_stream.next_batch(), device) for _ in range(cfg.method.esft_batches)])
    if before is None:
        before = evaluate_model(model, tok, eval_docs, **ev)

    fsdp = cfg.train.distributed == "fsdp2"
    if fsdp:
        fully_shard_model(model, device)
    opt, sched = build_optimizer(model, ctl, cfg)
    if st is not None:
        drop_frozen_state(opt)
        if fsdp:
            _load_sharded_optimizer(model, opt, ckpt)
        else:
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if st.get("stream") is not None:
            stream.load_state_dict(st["stream"])
        ck.set_rng_state(st["rng"])
        if main and resume:
            _truncate_history(hist_path, start)
        say(f"resumed from {ckpt} at step {start} (phase {ctl.current_phase})")

    def wrap():  # DDP registers only the parameters that train now: re-wrapped when a phase changes them
        return wrap_ddp(model, device) if cfg.train.distributed == "ddp" else model

    fwd = wrap()
    scal = Scalars(os.path.join(output_dir, "tb"), enabled=main)
    t1, t2 = ctl.t1, ctl.t2
    summary["phases"] = ({"warmup": [0, t1], "stabilization": [t1, t2], "consolidation": [t2, T]}
                         if cfg.method.phased else {cfg.method.name: [0, T]})

    def meta(step, phase):
        return {"total_steps": T, "phase": phase, "method": cfg.method.name, "domains": ctl.domain_names,
                "eval_before": before, "world_size": dist.world, "distributed": cfg.train.distributed}

    def save(step, phase):
        """Every rank calls this (collective under torchrun); rank 0 commits."""
        root_tmp = ck.begin_checkpoint(output_dir, step) if main else None
        dist.barrier()
        tmp = root_tmp or os.path.join(output_dir, ck.CKPT_DIR, f".tmp-{ck.checkpoint_name(step)}")
        try:
            full_sd = _full_state_dict(model) if fsdp else None
            if fsdp:
                _save_sharded_optimizer(model, opt, tmp)
            msd = ctl.state_dict()
            if fsdp:  # ALR weights are DTensor shards: gather (collective, every rank) to plain tensors
                msd["alr"] = [{k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                               for k, v in a.items()} for a in msd["alr"]]
            if main:
                ck.write_model(tmp, model, tok, ctl.routers, state_dict=full_sd)
                ck.write_method_state(tmp, msd)
            ck.write_trainer_state(tmp, step, optimizer_state=None if fsdp else opt.state_dict(), scheduler=sched,
                                   stream_state=stream.state_dict(), rank=dist.rank,
                                   extra={"tracker": ctl.tracker.state_dict()} if dist.rank else None)
        except BaseException:
            if main:  # never leave a half-written checkpoint behind (the next save of this step would clear it too)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
        path = os.path.join(output_dir, ck.CKPT_DIR, ck.checkpoint_name(step))
        if main:
            path = ck.commit_checkpoint(output_dir, tmp, step, meta=meta(step, phase), config=cfg_dict,
                                        keep=cfg.train.keep_last or None)
            if cfg.train.plots and ctl.tracker.initialised:
                png = save_affinity_png(os.path.join(output_dir, "plots", f"affinity_step-{step:06d}.png"),
                                        ctl.tracker.A_LME, ctl.tracker.masks_LME, ctl.domain_names,
                                        f"{cfg.method.name} step {step} ({phase})")
                if png:
                    summary["plot"] = png
        dist.barrier()
        return path

    bar = _progress(range(start, stop), progress, cfg.method.name)
    # tokens/s counts training compute only (not checkpoint or eval time), overall and per phase
    tokens_done, t_train, losses, phase = 0, 0.0, [], ctl.phase(start)
    per_phase: dict[str, dict] = {}
    n_dom = len(ctl.domain_names)
    skipped: list[int] = []
    rss0, rss_peak = _rss_mb(), _rss_mb()
    snap = routing_snapshot(ctl.tracker)
    W = dist.world
    flag.defer(True)  # signals in the steps: checkpoint at the next step boundary
    for step in bar:
        t_step, tok_step = time.time(), 0
        prev = ctl.current_phase
        phase = ctl.begin_step(step)
        if phase != prev:
            drop_frozen_state(opt)
            if cfg.train.distributed == "ddp":
                fwd = wrap()
            say(f"step {step}: phase -> {phase}")
        opt.zero_grad(set_to_none=True)
        tot = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        dom_loss_M = torch.zeros(n_dom, dtype=torch.float64)
        dom_cnt_M = torch.zeros(n_dom, dtype=torch.float64)
        bad = None  # (term, value, batch) of the first non-finite micro-batch
        for micro in range(cfg.train.grad_accum):
            b = _to(stream.next_batch(), device)
            dom_T = b["domain_ids"].reshape(-1)
            ctl.before_forward(dom_T)
            sync_ctx = (fwd.no_sync() if W > 1 and hasattr(fwd, "no_sync") and micro < cfg.train.grad_accum - 1
                        else contextlib.nullcontext())
            with sync_ctx:
                try:
                    task, aux, ce, valid = task_loss(model, b, device, bf16, fwd=fwd)
                finally:  # always clear the per-batch expert masks, also when the forward raises
                    kd = ctl.after_forward(dom_T)
                # each rank's mean is rescaled to its share of the global token count, so the averaged DDP
                # gradient is the gradient of the global-batch mean (what one process would compute)
                n_task, n_kd = valid.sum().double(), (dom_T >= 0).sum().double()
                red = torch.stack([task.detach().double() * n_task, n_task,
                                   (kd.detach().double() if kd is not None else torch.zeros((), dtype=torch.float64,
                                                                                            device=task.device)) * n_kd,
                                   n_kd]).cpu()
                dist.all_reduce_(red)
                g_task = float(red[0] / red[1].clamp(min=1))
                g_kd = float(red[2] / red[3].clamp(min=1)) if kd is not None else None
                s_task = float(n_task) * W / float(red[1].clamp(min=1)) if W > 1 else 1.0
                s_kd = float(n_kd) * W / float(red[3].clamp(min=1)) if W > 1 else 1.0
                terms = {"task": g_task, "kd": g_kd, "aux": None if aux is None else float(aux.detach())}
                if bad is None:
                    for name, v in terms.items():
                        if v is not None and not math.isfinite(v):
                            bad = (name, v, b)
                            break
                loss = ctl.combine(task * s_task, None if kd is None else kd * s_kd)  # λ·KD + (1-λ)·task
                if aux is not None:
                    loss = loss + aux
                if bad is None:
                    (loss / cfg.train.grad_accum).backward()
            g_loss = g_task if kd is None else ctl.last_lambda * g_kd + (1 - ctl.last_lambda) * g_task
            tot["loss"] += (g_loss + (terms["aux"] or 0.0)) / cfg.train.grad_accum
            tot["task"] += g_task / cfg.train.grad_accum
            tot["kd"] += (g_kd if g_kd is not None else 0.0) / cfg.train.grad_accum
            d_S = b["domain_ids"][:, 1:]
            ok = valid & (d_S >= 0)
            dom_loss_M.index_add_(0, d_S[ok].cpu(), ce[ok].double().cpu())
            dom_cnt_M.index_add_(0, d_S[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
            tok_step += int((b["labels"] != -100).sum())
        gnorm = None
        if bad is None:
            # masked experts: zero grads/state rows (before the clip norm); FSDP2: on the local shards
            fsdp_before_optimizer_step(ctl, opt) if fsdp else ctl.before_optimizer_step(opt)
            if cfg.train.max_grad_norm:
                gnorm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                             cfg.train.max_grad_norm))
                if not math.isfinite(gnorm):
                    bad = ("gradient norm", gnorm, b)
        if bad is not None:
            term, val, bb = bad
            where = f"step {step} ({phase}): {term} loss is {val}" if term != "gradient norm" else \
                f"step {step} ({phase}): the gradient norm is {val}"
            if not cfg.train.skip_nonfinite:
                diag = diagnose_nonfinite(model, bb, device, bf16)
                say(f"non-finite {where}; {diag}")
                raise NonFiniteLossError(f"non-finite {where}; {diag}. Set train.skip_nonfinite: true to skip such "
                                         f"batches instead, or lower train.lr")
            skipped.append(step)
            opt.zero_grad(set_to_none=True)
            say(f"skipped batch of {where} (train.skip_nonfinite; {len(skipped)} skipped so far)")
        else:
            opt.step()
            ctl.after_optimizer_step()
        sched.step()
        sync_routing_stats_(ctl.tracker, snap, dist)  # every rank: the same counts -> the same A and masks
        ctl.end_step(step)
        snap = routing_snapshot(ctl.tracker) if dist.enabled else None
        losses.append(tot["task"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_step
        t_train += dt
        tokens_done += tok_step * W
        pp = per_phase.setdefault(phase, {"steps": 0, "seconds": 0.0, "tokens": 0, "first_step": step,
                                          "task_loss_first": tot["task"], "skipped_nonfinite": 0})
        pp["steps"] += 1
        pp["seconds"] += dt
        pp["tokens"] += tok_step * W
        pp["last_step"] = step
        pp["task_loss_last"] = tot["task"]
        pp["skipped_nonfinite"] += int(bool(skipped) and skipped[-1] == step)
        tps = tokens_done / max(t_train, 1e-9)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{tot['loss']:.3f}", phase=phase, tok_s=f"{tps:.0f}")
        rss = _rss_mb()
        if rss is not None:
            rss_peak = max(rss_peak or 0.0, rss)
        rec = {"step": step, "phase": phase, **tot, "lambda": ctl.last_lambda, "lr": sched.get_last_lr()[0],
               "grad_norm": gnorm, "tok_s": tps, "rss_mb": rss, "skipped_nonfinite": len(skipped)}
        if device.type == "cuda":
            rec["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        for m, d in enumerate(ctl.domain_names):
            if dom_cnt_M[m] > 0:
                rec[f"loss/{d}"] = float(dom_loss_M[m] / dom_cnt_M[m])
        masks = ctl.tracker.masks_LME
        if masks is not None:
            for m, d in enumerate(ctl.domain_names):
                rec[f"mask_size/{d}"] = float(masks[:, m].sum(-1).float().mean())
        load = ctl.tracker.load_LE.float()
        if load.sum() > 0:
            rec["expert_load_max_over_mean"] = float((load.max(-1).values / load.mean(-1).clamp(min=1)).mean())
        if main:
            scal.scalars(step, {k: v for k, v in rec.items() if k not in ("step", "phase")})
        if main and (step % cfg.train.log_every == 0 or step == stop - 1 or (skipped and skipped[-1] == step)):
            with open(hist_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not progress:
                say(f"step {step:5d} {phase:<13} loss {tot['loss']:.4f} task {tot['task']:.4f} kd {tot['kd']:.4f} "
                    f"lambda {ctl.last_lambda:.3f} tok/s {tps:.0f}")
        # a signal on any rank stops every rank at the same step boundary
        sig = dist.all_reduce_(torch.tensor([0 if flag.signame is None else
                                             (2 if flag.signame == "SIGTERM" else 1)]), op="max")
        if int(sig) and step + 1 < stop:
            signame = flag.signame or ("SIGTERM" if int(sig) == 2 else "SIGINT")
            path = save(step + 1, phase)
            say(f"{signame}: wrote checkpoint {path} at step {step + 1}; stopping")
            scal.close()
            raise TrainingInterrupted(signame, step + 1, path)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < stop:
            save(step + 1, phase)
    final = save(stop, phase)
    flag.defer(False, checkpoint=final)  # from here a signal stops at once
    after = evaluate_model(model, tok, eval_docs, **ev)
    if main and ctl.tracker.initialised and cfg.train.plots:
        from .plots import affinity_figure

        scal.figure("affinity", affinity_figure(ctl.tracker.A_LME, ctl.tracker.masks_LME, ctl.domain_names), stop)
    scal.close()
    rss1 = _rss_mb()
    summary.update({
        "steps_run": stop - start, "start_step": start, "final_step": stop, "checkpoint": final,
        "resumed_from": ckpt,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "eval_before": before, "eval_after": after, "tokens_per_s": tokens_done / max(t_train, 1e-9),
        "phase_timing": {p: {"steps": v["steps"], "seconds": v["seconds"],
                             "tokens_per_s": v["tokens"] / max(v["seconds"], 1e-9)} for p, v in per_phase.items()},
        "phase_summary": {p: {**v, "tokens_per_s": v["tokens"] / max(v["seconds"], 1e-9)} for p, v in per_phase.items()},
        "skipped_nonfinite": skipped, "memory": {"rss_mb_start": rss0, "rss_mb_peak": rss_peak, "rss_mb_end": rss1,
                                                 "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20
                                                 if device.type == "cuda" else None},
        "seconds": time.time() - t_start,
        "masks": _masks_summary(ctl), "esft_selection": None if ctl.esft_selection_LE is None
        else [ctl.esft_selection_LE[l].nonzero().flatten().tolist() for l in range(len(ctl.blocks))],
    })
    if dist.enabled:
        summary["A_LME_checksum"] = float(ctl.tracker.A_LME.double().sum())
    if main:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        say(f"done: steps {start}..{stop} of {T}; " + "; ".join(
            f"{p} {v['steps']} steps, task loss {v['task_loss_first']:.4f} -> {v['task_loss_last']:.4f}"
            for p, v in per_phase.items()) + (f"; {len(skipped)} non-finite batches skipped" if skipped else ""))
    dist.barrier()
    return summary


def _truncate_history(path: str, start: int) -> None:
    """On resume, drop the records of steps >= ``start`` that an interrupted session logged after its checkpoint."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", -1) < start:
                    keep.append(line)
            except ValueError:  # a line cut by the kill
                pass
    with open(path, "w") as f:
        f.writelines(keep)


# --- FSDP2 checkpoint pieces -------------------------------------------------------------------------------------
def _full_state_dict(model) -> dict:
    """Gathered (unsharded) CPU state dict on every rank (collective), for rank 0's HF-format save."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_sharded_optimizer(model, opt, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(tmp, "optim"))


def _load_sharded_optimizer(model, opt, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    sd = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "optim"))
    set_optimizer_state_dict(model, opt, sd["optimizer"])


def _masks_summary(ctl: MethodController):
    m = ctl.tracker.masks_LME
    if m is None:
        return None
    return {d: [m[l, i].nonzero().flatten().tolist() for l in range(m.shape[0])] for i, d in enumerate(ctl.domain_names)}


def prepare_base(cfg: Config, out_dir: str, steps: int, *, progress: bool = True) -> dict:
    """Build the 'pretrained' base for a from-scratch demo: a tokenizer trained on every domain's training texts,
    a random tiny MoE (``cfg.model``) pretrained for ``steps`` steps on ``data.general``; saved (HF format, with
    the tokenizer) to ``out_dir``. Returns ``{"path", "general_loss_before", "general_loss_after", ...}``."""
    from ..data import tokenize_domains
    from ..integrations.hf import unpatch

    if not cfg.data.general:
        raise ValueError("data.general must name the pretraining domain")
    device = resolve_device(cfg)
    torch.manual_seed(cfg.model.seed)
    names = list(cfg.data.domains) + ([cfg.data.general] if cfg.data.general not in cfg.data.domains else [])
    texts = load_texts(cfg, names, "train", cfg.data.max_docs)
    tok = build_tokenizer(cfg, texts)
    model = build_model(cfg, len(tok), tok).to(device)
    g = cfg.data.general
    docs = tokenize_domains(tok, {g: texts[g]})[g]
    held = tokenize_domains(tok, load_texts(cfg, [g], "test", cfg.data.eval_max_docs))
    ev = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, max_batches=cfg.train.eval_batches,
              math_n=0, device=device, bf16=use_bf16(cfg, device), general=g)
    l0 = evaluate_model(model, tok, held, **ev)["domains"][g]["loss"]
    losses = pretrain(model, cfg, docs, tok.eos_token_id, device, steps, progress) if steps else []
    l1 = evaluate_model(model, tok, held, **ev)["domains"][g]["loss"]
    unpatch(model)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"path": out_dir, "steps": steps, "general_loss_before": l0, "general_loss_after": l1,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None}
