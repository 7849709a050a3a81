"""What a run is built from: device, texts, tokenizer, model, optimizer + LR schedule, and the base-model
pretraining that precedes fine-tuning when a run starts from a random model."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..context import recording
from ..integrations.hf import patch
from .config import Config
from .loss import task_loss, to_device


def resolve_device(cfg: Config) -> torch.device:
    d = cfg.train.device
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {d!r} but no CUDA device is available")
    dev = torch.device("cuda" if d == "auto" and torch.cuda.is_available() else "cpu" if d == "auto" else d)
    if dev.type == "cpu" and cfg.model.dtype == "float16":
        raise ValueError(f"model.dtype=float16 on CPU (train.device={d!r}): float16 parameters without loss scaling "
                         f"overflow to NaN on CPU within a few steps; expected model.dtype float32 or bfloat16 (bf16 "
                         f"compute over float32 master weights) on CPU, float16 only on a CUDA device")
    return dev


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast compute: always for ``model.dtype: bfloat16`` (on CPU too; over float32 master weights unless
    ``model.pure_dtype``), else on CUDA when ``train.bf16`` is auto/true; ``train.bf16: false`` turns it off."""
    if cfg.train.bf16 in (False, "false"):
        return False
    return cfg.model.dtype == "bfloat16" or (device.type == "cuda" and cfg.train.bf16 in ("auto", True, "true"))


def eval_kwargs(cfg: Config, device: torch.device) -> dict:
    """Keyword arguments of :func:`desmoe.eval.evaluate_model` for a run under ``cfg``."""
    return dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, max_batches=cfg.train.eval_batches,
                math_n=0, device=device, bf16=use_bf16(cfg, device), general=cfg.data.general,
                packing=cfg.data.packing)


def load_texts(cfg: Config, names: list[str], split: str, max_docs: int | None) -> dict[str, list[str]]:
    """Texts of ``split`` per domain. Training texts are subset with ``data.seed``; held-out ones (validation,
    test) with a fixed seed, so runs that differ only in ``data.seed`` evaluate on the same documents."""
    from ..data import load_domain_texts
    from ..data._util import split_seed

    out = {}
    for d in names:
        texts = load_domain_texts(d, split, source=cfg.data.sources.get(d), max_docs=max_docs,
                                  seed=split_seed(split, cfg.data.seed), text_field=cfg.data.text_field)
        if not texts:
            raise ValueError(f"data.domains: domain {d!r} has no {split} documents"
                             + (f" in {cfg.data.sources[d]!r}" if d in cfg.data.sources else ""))
        out[d] = texts
    return out


def build_tokenizer(cfg: Config, texts: dict[str, list[str]]):
    if cfg.tokenizer.path or cfg.model.path:
        from transformers import AutoTokenizer

        src = cfg.tokenizer.path or cfg.model.path  # a pretrained model brings its own tokenizer
        key = "tokenizer.path" if cfg.tokenizer.path else "model.path"
        from .checks import _TOKENIZER_FILES, has_tokenizer_files

        if os.path.isdir(src) and not has_tokenizer_files(src):
            raise FileNotFoundError(f"{key}: the directory {src!r} has no tokenizer files (none of "
                                    f"{', '.join(_TOKENIZER_FILES)}); set tokenizer.path to a tokenizer directory")
        try:
            return AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{key}: cannot load a tokenizer from {src!r}: {e}") from None
    from ..data import train_tokenizer

    from ..progress import stage

    corpus = [t for ts in texts.values() for t in ts]
    with stage(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {len(corpus)} documents "
               f"({sum(map(len, corpus)) / 1e6:.1f} M characters)"):
        return train_tokenizer(corpus, vocab_size=cfg.tokenizer.vocab_size)


def build_model(cfg: Config, vocab_size: int, tokenizer=None):
    """The model (random tiny or ``from_pretrained``) in ``model.param_dtype`` (float32 master weights for
    ``dtype: bfloat16``), vocab matched to the tokenizer, patched."""
    dtype = getattr(torch, cfg.model.param_dtype)
    if dtype != torch.float32:
        import warnings

        warnings.warn(f"model.dtype={cfg.model.dtype} with pure {cfg.model.dtype} parameters: AdamW runs on "
                      f"{cfg.model.dtype} weights and state, and updates below half an ulp (lr·1 < |w|·2^-9 for "
                      f"bf16) are lost; drop model.pure_dtype for float32 master weights + bf16 autocast",
                      stacklevel=2)
    if cfg.model.tiny:
        from ..integrations.tiny import tiny_model

        extra = {}
        if tokenizer is not None:
            extra = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                     if getattr(tokenizer, k, None) is not None}
        want = cfg.model.overrides.get("vocab_size")
        if want is not None and want < vocab_size:
            raise ValueError(f"model.overrides.vocab_size={want} is smaller than the tokenizer's {vocab_size} tokens "
                             f"(token ids up to {vocab_size - 1} would index past the embeddings); expected >= "
                             f"{vocab_size}, or remove it (the tiny model's vocabulary is then the tokenizer's)")
        # an explicit larger vocab_size is kept (unused embedding rows, as models pad their vocabulary)
        model = tiny_model(cfg.model.tiny, seed=cfg.model.seed, dtype=dtype,
                           **{**extra, **cfg.model.overrides, "vocab_size": want or vocab_size})
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


def enable_activation_checkpointing(model, every_n: int, reentrant: bool = False) -> None:
    """transformers' activation checkpointing on every ``every_n``-th decoder layer (0: leave it as it is),
    ``use_reentrant=reentrant``. The method's per-forward state (masks, the KD term) holds across the backward's
    replay of a layer (:meth:`desmoe.method.MethodController.applied`)."""
    if not every_n:
        return
    kwargs = {"use_reentrant": bool(reentrant)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if every_n > 1:
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for i, m in enumerate(layers):
                m.gradient_checkpointing = i % every_n == 0


def disable_activation_checkpointing(model) -> None:
    """Activation checkpointing off (transformers' current name where it has one)."""
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def lr_factor(step: int, cfg: Config) -> float:
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    x = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    f = 0.5 * (1 + math.cos(math.pi * x)) if t.lr_schedule == "cosine" else 1.0 - x
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * f


def build_optimizer(ctl, cfg: Config):
    """AdamW over the method's parameter groups (parameters that never train get no state) + LR schedule."""
    opt = ctl.optimizer(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(cfg.train.beta1, cfg.train.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def drop_frozen_state(opt: torch.optim.Optimizer) -> None:
    """Frozen parameters keep no optimizer state (after a phase freezes them)."""
    for g in opt.param_groups:
        for p in g["params"]:
            if not p.requires_grad:
                opt.state.pop(p, None)


def progress_bar(it, enabled: bool, desc: str, unit: str = "step"):
    from ..progress import bar

    return bar(it, desc, enabled=enabled, unit=unit)


# --- base-model pretraining ----------------------------------------------------------------------------------------
def load_balance_loss(records: list[dict]) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E·Σ_e f_e·P_e`` averaged over layers, from the routers' records of
    one forward (``f_e``: share of top-k slots routed to ``e``, ``P_e``: mean router probability). HF's own aux
    loss needs ``router_logits`` outputs that the patched model does not return, so it is computed here."""
    losses = []
    for last in records:
        logits_TE, ids_TK = last["logits_TE"], last["topk_ids_TK"]
        E = logits_TE.shape[-1]
        f_E = torch.bincount(ids_TK.reshape(-1), minlength=E).float() / max(1, ids_TK.numel())
        P_E = F.softmax(logits_TE.float(), dim=-1).mean(0)
        losses.append(E * (f_E * P_E).sum())
    return torch.stack(losses).mean()


def pretrain(model, cfg: Config, docs, eos_id: int, device, steps: int, *, aux_coef: float = 0.0,
             weights: dict | None = None, progress: bool = False, state_path: str | None = None,
             save_every: int = 500) -> list[float]:
    """Base-model pretraining (full model, AdamW, warm-up + cosine LR to 10%, no method): the 'pretrained' MoE of
    the demo and the experiments. ``docs``: token docs of the general domain, or ``{domain: docs}`` mixed with
    ``weights``. ``aux_coef`` > 0 adds that multiple of :func:`load_balance_loss` so every expert gets used.
    Returns the per-step loss (task loss + the model's own aux loss, if its config enables one).

    ``state_path``: every ``save_every`` steps the model, optimizer, data stream and RNG are written there
    (atomically); a call that finds the file continues from it, with the same result as an uninterrupted run
    (a long base survives being stopped). The file is this process's own, read without running code."""
    from ..data import MixedDomainStream
    from ..integrations.hf import moe_blocks

    routers = [r for _, r, _ in moe_blocks(model)]
    stream = MixedDomainStream(docs if isinstance(docs, dict) else {"general": docs}, cfg.data.seq_len,
                               cfg.data.batch_size, seed=cfg.data.seed + 1, eos_id=eos_id, weights=weights,
                               packing=cfg.data.packing)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.pretrain_lr, betas=(0.9, 0.95))
    bf16 = use_bf16(cfg, device)
    losses, start = [], 0
    if state_path and os.path.isfile(state_path):
        losses, start = _load_pretrain_state(state_path, model, opt, stream, steps)
    it = progress_bar(range(start, steps), progress, "pretraining the base model")
    for s in it:
        lr = (cfg.train.pretrain_lr * min(1.0, (s + 1) / max(1, steps // 10))
              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        with recording(routers if aux_coef > 0 else []) as rec:
            loss, aux, _, _ = task_loss(model, to_device(stream.next_batch(), device), device, bf16)
        if aux is not None:
            loss = loss + aux
        total = loss + aux_coef * load_balance_loss(rec.layers()) if aux_coef > 0 else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{losses[-1]:.3f}")
        if state_path and (s + 1) % save_every == 0 and s + 1 < steps:
            _save_pretrain_state(state_path, model, opt, stream, losses, steps)
    del opt
    return losses


def _save_pretrain_state(path: str, model, opt, stream, losses: list[float], steps: int) -> None:
    state = {"step": len(losses), "steps": steps, "losses": list(losses), "model": model.state_dict(),
             "opt": opt.state_dict(), "stream": stream.state_dict(), "rng": torch.get_rng_state()}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_pretrain_state(path: str, model, opt, stream, steps: int) -> tuple[list[float], int]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("steps") != steps or not 0 < state.get("step", 0) < steps:
        raise ValueError(f"pretraining state {path} is for {state.get('steps')} steps (at step {state.get('step')}), "
                         f"not this run's {steps}: remove it to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["rng"])
    return list(state["losses"]), state["step"]
