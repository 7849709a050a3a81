"""The training loop: data → model → loss → method hooks → optimizer, for DES-MoE and every baseline.

``run(cfg, output_dir)`` does everything (data, tokenizer, model, optional base pretraining, fine-tuning,
checkpoints, plots, before/after evaluation) and returns a JSON-able summary.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .. import patch
from ..eval import autocast_ctx, evaluate_model, token_losses
from ..method import MethodController
from . import checkpoint as ck
from .config import Config
from .plots import Scalars, save_affinity_png


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
        try:
            return AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"tokenizer.path: cannot load a tokenizer from {src!r}: {e}") from None
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
def task_loss(model, batch, device, bf16):
    """``(mean CE, coef·aux loss or None, per-token CE [B,S-1], valid [B,S-1])``; aux is the model's own
    load-balancing loss when its config enables it (``output_router_logits``)."""
    with autocast_ctx(device, bf16):
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
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


# --- the run --------------------------------------------------------------------------------------------------------
def run(cfg: Config, output_dir: str, *, max_steps: int | None = None, resume: bool = False,
        progress: bool | None = None, log=print) -> dict:
    """Fine-tune per ``cfg`` into ``output_dir``; returns the summary (also written to ``summary.json``).

    ``max_steps`` caps the steps run now (T, the phase clock, stays ``train.max_steps``); ``resume`` continues
    from the latest checkpoint in ``output_dir``.
    """
    from ..data import MixedDomainStream, tokenize_domains

    t_start = time.time()
    progress = cfg.train.progress if progress is None else progress
    torch.manual_seed(cfg.model.seed)
    device = resolve_device(cfg)
    bf16 = use_bf16(cfg, device)
    T = cfg.train.max_steps
    stop = T if max_steps is None else min(T, max_steps)
    os.makedirs(output_dir, exist_ok=True)

    domains = list(cfg.data.domains)
    general = cfg.data.general
    eval_names = domains + ([general] if general and general not in domains else [])
    ckpt = None
    if resume:
        ckpt = ck.resolve_checkpoint(output_dir)
    elif os.path.exists(os.path.join(output_dir, ck.LATEST)):
        raise ValueError(f"--output-dir {output_dir!r} already holds a run; pass --resume to continue it or choose "
                         f"another directory")
    else:
        open(os.path.join(output_dir, "history.jsonl"), "w").close()
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
        tok = build_tokenizer(cfg, train_texts)
        model = build_model(cfg, len(tok), tok).to(device)
    eos = tok.eos_token_id
    train_docs = tokenize_domains(tok, train_texts)
    eval_docs = tokenize_domains(tok, eval_texts)
    ev = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, max_batches=cfg.train.eval_batches,
              math_n=0, device=device, bf16=bf16, general=general)

    summary = {"method": cfg.method.name, "domains": domains, "total_steps": T, "output_dir": os.path.abspath(output_dir)}
    if ckpt is None and cfg.train.pretrain_steps:
        if not general:
            raise ValueError("train.pretrain_steps > 0 needs data.general (the pretraining domain)")
        ev0 = evaluate_model(model, tok, {general: eval_docs[general]}, **ev)
        pl = pretrain(model, cfg, train_docs[general], eos, device, cfg.train.pretrain_steps, progress)
        summary["pretrain"] = {"steps": cfg.train.pretrain_steps, "general_loss_random_init": ev0["domains"][general]["loss"],
                               "first_loss": pl[0], "last_loss": pl[-1]}
        model.train()

    stream = MixedDomainStream({d: train_docs[d] for d in domains}, cfg.data.seq_len, cfg.data.batch_size,
                               seed=cfg.data.seed, weights=cfg.data.weights, eos_id=eos)
    ctl = MethodController(model, cfg.method, T, list(stream.domain_names))
    model.to(device)
    ck.save_config(output_dir, cfg.to_dict())
    start = 0
    before = None
    if ckpt is not None:
        ctl.load_state_dict(ck.load_method_state(ckpt))
        st = ck.load_trainer_state(ckpt)
        start = int(st["step"])
        ctl.apply_phase(ctl.phase(min(start, T - 1)))
        opt, sched = build_optimizer(model, ctl, cfg)
        drop_frozen_state(opt)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if st.get("stream") is not None:
            stream.load_state_dict(st["stream"])
        torch.set_rng_state(st["rng"]["torch"])
        before = ck.read_meta(ckpt).get("eval_before")
        log(f"resumed from {ckpt} at step {start}")
    else:
        if cfg.method.is_esft:
            esft_stream = MixedDomainStream({d: train_docs[d] for d in domains}, cfg.data.seq_len, cfg.data.batch_size,
                                            seed=cfg.data.seed + 7, weights=cfg.data.weights, eos_id=eos)
            ctl.score_esft([_to(esft_stream.next_batch(), device) for _ in range(cfg.method.esft_batches)])
        opt, sched = build_optimizer(model, ctl, cfg)
    if before is None:
        before = evaluate_model(model, tok, eval_docs, **ev)
    scal = Scalars(os.path.join(output_dir, "tb"), enabled=True)
    hist_path = os.path.join(output_dir, "history.jsonl")
    t1, t2 = ctl.t1, ctl.t2
    summary["phases"] = ({"warmup": [0, t1], "stabilization": [t1, t2], "consolidation": [t2, T]}
                         if cfg.method.phased else {cfg.method.name: [0, T]})

    def meta(step, phase):
        return {"total_steps": T, "phase": phase, "method": cfg.method.name, "domains": ctl.domain_names,
                "eval_before": before}

    def save(step, phase):
        path = ck.save_checkpoint(output_dir, step, model=model, tokenizer=tok, controller=ctl, optimizer=opt,
                                  scheduler=sched, stream_state=stream.state_dict(), meta=meta(step, phase))
        if cfg.train.plots and ctl.tracker.initialised:
            png = save_affinity_png(os.path.join(output_dir, "plots", f"affinity_step-{step:06d}.png"),
                                    ctl.tracker.A_LME, ctl.tracker.masks_LME, ctl.domain_names,
                                    f"{cfg.method.name} step {step} ({phase})")
            if png:
                summary["plot"] = png
        return path

    bar = _progress(range(start, stop), progress, cfg.method.name)
    # tokens/s counts training compute only (not checkpoint or eval time), overall and per phase
    tokens_done, t_train, losses, phase = 0, 0.0, [], ctl.phase(start)
    per_phase: dict[str, list[float]] = {}
    n_dom = len(ctl.domain_names)
    for step in bar:
        t_step, tok_step = time.time(), 0
        prev = ctl.current_phase
        phase = ctl.begin_step(step)
        if phase != prev:
            drop_frozen_state(opt)
            if not progress:
                log(f"step {step}: phase -> {phase}")
        opt.zero_grad(set_to_none=True)
        tot = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        dom_loss_M = torch.zeros(n_dom, dtype=torch.float64)
        dom_cnt_M = torch.zeros(n_dom, dtype=torch.float64)
        for _ in range(cfg.train.grad_accum):
            b = _to(stream.next_batch(), device)
            dom_T = b["domain_ids"].reshape(-1)
            ctl.before_forward(dom_T)
            try:
                task, aux, ce, valid = task_loss(model, b, device, bf16)
            finally:  # always clear the per-batch expert masks, also when the forward raises
                kd = ctl.after_forward(dom_T)
            loss = ctl.combine(task, kd)  # λ·KD + (1-λ)·task
            if aux is not None:
                loss = loss + aux
            (loss / cfg.train.grad_accum).backward()
            tot["loss"] += loss.item() / cfg.train.grad_accum
            tot["task"] += task.item() / cfg.train.grad_accum
            tot["kd"] += (kd.item() if kd is not None else 0.0) / cfg.train.grad_accum
            d_S = b["domain_ids"][:, 1:]
            ok = valid & (d_S >= 0)
            dom_loss_M.index_add_(0, d_S[ok].cpu(), ce[ok].double().cpu())
            dom_cnt_M.index_add_(0, d_S[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
            tok_step += int((b["labels"] != -100).sum())
        ctl.before_optimizer_step(opt)  # masked experts: zero grads/state rows (before the clip norm)
        gnorm = None
        if cfg.train.max_grad_norm:
            gnorm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                         cfg.train.max_grad_norm))
        opt.step()
        ctl.after_optimizer_step()
        sched.step()
        ctl.end_step(step)
        losses.append(tot["task"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_step
        t_train += dt
        tokens_done += tok_step
        pp = per_phase.setdefault(phase, [0.0, 0.0, 0])
        pp[0] += dt
        pp[1] += tok_step
        pp[2] += 1
        tps = tokens_done / max(t_train, 1e-9)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{tot['loss']:.3f}", phase=phase, tok_s=f"{tps:.0f}")
        rec = {"step": step, "phase": phase, **tot, "lambda": ctl.last_lambda, "lr": sched.get_last_lr()[0],
               "grad_norm": gnorm, "tok_s": tps}
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
        scal.scalars(step, {k: v for k, v in rec.items() if k not in ("step", "phase")})
        if step % cfg.train.log_every == 0 or step == stop - 1:
            with open(hist_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not progress:
                log(f"step {step:5d} {phase:<13} loss {tot['loss']:.4f} task {tot['task']:.4f} kd {tot['kd']:.4f} "
                    f"lambda {ctl.last_lambda:.3f} tok/s {tps:.0f}")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < stop:
            save(step + 1, phase)
    final = save(stop, phase)
    after = evaluate_model(model, tok, eval_docs, **ev)
    if ctl.tracker.initialised and cfg.train.plots:
        from .plots import affinity_figure

        scal.figure("affinity", affinity_figure(ctl.tracker.A_LME, ctl.tracker.masks_LME, ctl.domain_names), stop)
    scal.close()
    summary.update({
        "steps_run": stop - start, "final_step": stop, "checkpoint": final,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "eval_before": before, "eval_after": after, "tokens_per_s": tokens_done / max(t_train, 1e-9),
        "phase_timing": {p: {"steps": v[2], "seconds": v[0], "tokens_per_s": v[1] / max(v[0], 1e-9)}
                         for p, v in per_phase.items()},
        "seconds": time.time() - t_start,
        "masks": _masks_summary(ctl), "esft_selection": None if ctl.esft_selection_LE is None
        else [ctl.esft_selection_LE[l].nonzero().flatten().tolist() for l in range(len(ctl.blocks))],
    })
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


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
