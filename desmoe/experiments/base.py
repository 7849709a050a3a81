"""The shared pretrained base of every experiment: a tiny MoE pretrained on ``general`` until its loss flattens.

Built once per base config and cached (HF format + tokenizer) in ``<cache>/base-<hash>/``; every fine-tuning run
of every experiment starts from it (``model.path``), so they differ only in method, LR, seed and domains.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def base_cache_path(base_cfg: dict, pretrain_steps: int, cache: str, *, aux_loss_coef: float = 0.0,
                    pretrain_mix: dict | None = None) -> str:
    """Where :func:`prepare_base_cached` keeps (or will keep) this base: ``CACHE/base-<hash of its recipe>``
    (absolute: the ``model.path`` fine-tuning runs on it are given)."""
    key = {"cfg": base_cfg, "steps": pretrain_steps, **({"aux": aux_loss_coef} if aux_loss_coef else {}),
           **({"mix": pretrain_mix} if pretrain_mix else {})}
    return os.path.abspath(os.path.join(cache, f"base-{_hash(key)}"))


def prepare_base_cached(base_cfg: dict, pretrain_steps: int, cache: str, *, aux_loss_coef: float = 0.0,
                        pretrain_mix: dict | None = None, log=print) -> dict:
    """Pretrain (or reuse) the base; returns ``base_info`` (path, pretraining loss curve, general loss).

    ``base_cfg`` is a training-config dict (model.tiny + data + tokenizer + train.pretrain_lr); its
    ``data.domains`` must list every fine-tuning domain so the tokenizer covers them all.
    """
    if not isinstance(pretrain_steps, int) or pretrain_steps < 1:
        raise ValueError(f"base.pretrain_steps must be an int >= 1, got {pretrain_steps!r}")
    out = base_cache_path(base_cfg, pretrain_steps, cache, aux_loss_coef=aux_loss_coef, pretrain_mix=pretrain_mix)
    info_path = os.path.join(out, "base_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)
    from .runner import _acquire

    os.makedirs(cache, exist_ok=True)
    lock = out + ".lock"
    if not _acquire(lock, info_path, log):  # another process built it meanwhile
        with open(info_path) as f:
            return json.load(f)
    try:
        return _build_base(base_cfg, pretrain_steps, aux_loss_coef, out, info_path, log, pretrain_mix)
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def _build_base(base_cfg, pretrain_steps, aux_loss_coef, out, info_path, log, mix=None) -> dict:
    from ..data import tokenize_domains
    from ..eval import evaluate_model
    from ..integrations.hf import unpatch
    from ..train import config_from_dict
    from ..train.builders import build_model, build_tokenizer, eval_kwargs, load_texts, pretrain, resolve_device

    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)
    # the experiments' bases pack concatenated, as every base was built before data.packing existed (the recipe's
    # hash, which names the cached base, is of base_cfg as written: an explicit data.packing still counts)
    cfg = config_from_dict({**base_cfg, "data": {"packing": "concatenated", **base_cfg.get("data", {})}},
                           source="experiment base")
    g = cfg.data.general
    if not g:
        raise ValueError("base.data.general must name the pretraining domain")
    t0 = time.time()
    device = resolve_device(cfg)
    torch.manual_seed(cfg.model.seed)
    names = cfg.data.eval_domains()
    texts = load_texts(cfg, names, "train", cfg.data.max_docs)
    tok = build_tokenizer(cfg, texts)
    model = build_model(cfg, len(tok), tok).to(device)
    if mix:  # the base also sees a little of each fine-tuning domain (its tokens get trained embeddings)
        bad = set(mix) - set(names)
        if bad:
            raise ValueError(f"base.pretrain_mix: {sorted(bad)} not among base.config.data domains {names}")
        docs = tokenize_domains(tok, {d: texts[d] for d in mix})
    else:
        docs = tokenize_domains(tok, {g: texts[g]})[g]
    held = tokenize_domains(tok, load_texts(cfg, [g], "test", cfg.data.eval_max_docs))
    ev = eval_kwargs(cfg, device)
    l0 = evaluate_model(model, tok, held, **ev)["domains"][g]["loss"]
    log(f"base: pretraining {pretrain_steps} steps on {mix or g!r} -> {out}")
    state = out + ".pretrain-state.pt"  # a stopped build continues from its last save (every 500 steps)
    if os.path.isfile(state):
        log(f"base: continuing the pretraining saved in {state}")
    losses = pretrain(model, cfg, docs, tok.eos_token_id, device, pretrain_steps, aux_coef=aux_loss_coef,
                      weights=dict(mix) if mix else None, progress=True, state_path=state)  # silent under quiet()
    l1 = evaluate_model(model, tok, held, **ev)["domains"][g]["loss"]
    unpatch(model)
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    # loss flattening check: mean train loss of the last 10% vs the 10% before it
    k = max(1, pretrain_steps // 10)
    tail = sum(losses[-k:]) / k
    prev = sum(losses[-2 * k:-k]) / k if pretrain_steps >= 2 * k else float("nan")
    info = {"path": os.path.abspath(out), "pretrain_steps": pretrain_steps, "aux_loss_coef": aux_loss_coef,
            "pretrain_mix": mix, "n_params": n_params,
            "general_loss_random_init": l0, "general_loss": l1,
            "train_loss_curve": losses[:: max(1, pretrain_steps // 200)],
            "train_loss_last10pct": tail, "train_loss_prev10pct": prev,
            "seconds": time.time() - t0, "config": base_cfg}
    with open(os.path.join(tmp, "base_info.json"), "w") as f:
        json.dump({**info}, f, indent=1)
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    if os.path.isfile(state):
        os.remove(state)
    log(f"base: general loss {l0:.3f} -> {l1:.3f} ({time.time() - t0:.0f}s, {n_params / 1e6:.2f}M params)")
    return info


@torch.no_grad()
def base_routing(base_path: str, spec, max_batches: int = 2) -> dict:
    """How domain-specific the base's routing is (cached in ``base_path/routing.json``): per layer, the mean
    over domains of the total-variation distance between the domain's expert-selection distribution and the
    all-domain mean (0 = domain-agnostic, 1 = disjoint experts), the experts' max/mean load, and the number of
    experts DGES would give each domain at φ = the config's phi."""
    from ..context import recording
    from ..data import load_domain_texts, tokenize_domains
    from ..data import eval_batches
    from ..integrations.hf import moe_blocks
    from ..method.config import MethodConfig
    from ..method.dges import masks_from_affinity
    from ..integrations.hf import patch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(base_path, "routing.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    ft = spec.finetune.get("data", {})
    seq, bs = ft.get("seq_len", 128), ft.get("batch_size", 8)
    phi = spec.finetune.get("method", {}).get("phi", MethodConfig.phi)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    patch(model)
    model.eval()
    routers = [r for _, r, _ in moe_blocks(model)]
    E = routers[0].num_experts
    counts_LME = torch.zeros(len(routers), len(spec.domains), E)
    docs = tokenize_domains(tok, {d: load_domain_texts(d, "test", max_docs=ft.get("eval_max_docs", 64))
                                  for d in spec.domains})
    with recording(routers) as rec:
        for m, d in enumerate(spec.domains):
            for b in eval_batches(docs[d], seq, bs, tok.eos_token_id, max_batches=max_batches):
                model(input_ids=b["input_ids"])
                for l, last in enumerate(rec.layers()):
                    counts_LME[l, m] += torch.bincount(last["topk_ids_TK"].reshape(-1), minlength=E).float()
                rec.clear()
    A_LME = counts_LME / counts_LME.sum(-1, keepdim=True).clamp(min=1)
    mean_LE = A_LME.mean(1, keepdim=True)
    tv_L = 0.5 * (A_LME - mean_LE).abs().sum(-1).mean(-1)
    load_LE = counts_LME.sum(1)
    masks = masks_from_affinity(A_LME, phi)
    res = {"domains": list(spec.domains), "tv_from_mean_per_layer": tv_L.tolist(),
           "load_max_over_mean_per_layer": (load_LE.max(-1).values / load_LE.mean(-1).clamp(min=1)).tolist(),
           "dges_mask_sizes_per_layer": masks.sum(-1).tolist(), "phi": phi}
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return res


@torch.no_grad()
def base_specialization(base_path: str, spec, tokens: int = 16384) -> dict:
    """:func:`desmoe.experiments.specialization.specialization` of the base on ``tokens`` held-out (test split)
    tokens of each experiment domain: per layer I(domain; expert), ESFT concentration and the DGES masks' overlap
    at the fine-tuning ``phi`` (cached in ``base_path/specialization.json`` per (tokens, phi, domains))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import eval_batches, load_domain_texts, tokenize_domains
    from ..integrations.hf import patch
    from ..method.config import MethodConfig
    from .specialization import specialization

    ft = spec.finetune.get("data", {})
    seq, bs = ft.get("seq_len", 128), ft.get("batch_size", 8)
    phi = spec.finetune.get("method", {}).get("phi", MethodConfig.phi)
    key = {"tokens": tokens, "phi": phi, "domains": list(spec.domains), "seq_len": seq}
    path = os.path.join(base_path, "specialization.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    patch(model)
    model.eval()
    n = -(-tokens // (seq * bs))
    docs = tokenize_domains(tok, {d: load_domain_texts(d, "test", max_docs=ft.get("eval_max_docs", 64))
                                  for d in spec.domains})
    batches = {d: list(eval_batches(docs[d], seq, bs, tok.eos_token_id, max_batches=n)) for d in spec.domains}
    res = {**specialization(model, batches, max_tokens=tokens, phi=phi), "key": key, "split": "test"}
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    return res
