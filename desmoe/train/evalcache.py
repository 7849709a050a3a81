"""``train.eval_cache``: the evaluations before training of runs that start from a saved model, computed once.

Why one base evaluation serves every method: before its first optimizer step every method computes the unchanged
base model's function. Full fine-tuning and its frozen-router / frozen-attention / experts-only variants and ESFT
only choose which parameters train; DES-MoE's adaptive router (ALR) adds a residual whose output projection is
zero-initialised, so it adds exactly zero until it has trained. So ``eval_before`` / ``val_before`` of a run from
``model.path`` depend on the base and the evaluation settings, not on the method or the training seed (held-out
documents are drawn with a fixed seed), and a grid of methods × seeds × learning rates needs them once per
(domain, split). Runs that change the model before evaluating never use the cache: a tiny random model, base
pretraining (``train.pretrain_steps``), or a resume (whose ``eval_before`` comes from the checkpoint).

The key of one entry (stored in the file and compared on read; its hash names the file): the absolute
``model.path`` with the name, size and mtime of every file in it (weights, config), ``model.overrides``, the
parameter dtype and backend, the tokenizer path and vocabulary size, the split, the domain, its data source and
text field, ``data.eval_max_docs``, ``seq_len``, ``batch_size``, ``max_batches``, the bf16 flag, the device type
(CPU and GPU numbers differ in the last bits), the fact that the starting model is the unchanged base, and a digest
of the tokenized documents themselves (which covers the data and the tokenizer's output exactly). Files are written
atomically (temporary file + ``os.replace``), so concurrent runs sharing the directory never read a partial entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from pathlib import Path

import torch

from ..data._util import read_json_cache, write_json_atomic

_VERSION = 1


def why_not(cfg, resumed: bool) -> str | None:
    """None when a run under ``cfg`` may use the cache, else the reason it may not."""
    if resumed:
        return "a resumed run takes its evaluations before training from the checkpoint"
    if not cfg.model.path:
        return "the run starts from a random model (model.tiny), not from model.path"
    if cfg.train.pretrain_steps:
        return "train.pretrain_steps changes the model before it is evaluated"
    if not os.path.isdir(os.path.expanduser(cfg.model.path)):
        return f"model.path {cfg.model.path!r} is not a local directory (its files identify the cached base)"
    return None


def _files(path: str) -> list:
    return sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in os.scandir(path) if e.is_file())


def _docs_digest(docs: list[list[int]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for doc in docs:
        h.update(array("q", doc).tobytes())
        if getattr(doc, "mask", None) is not None:  # an SFT document: its targets are part of its identity
            h.update(b"m" + doc.mask + (b"e" if doc.eos_target else b"n"))
        h.update(b"|")
    return h.hexdigest()


def entry_key(cfg, *, split: str, domain: str, docs: list[list[int]], max_batches, bf16: bool, vocab: int,
              device: str = "cpu") -> dict:
    """The identity of one (domain, split) evaluation before training (see the module docstring)."""
    model = os.path.abspath(os.path.expanduser(cfg.model.path))
    tok = os.path.abspath(os.path.expanduser(cfg.tokenizer.path)) if cfg.tokenizer.path else model
    d = cfg.data
    return {"version": _VERSION, "start": "unchanged base model", "model_path": model, "model_files": _files(model),
            "model_overrides": cfg.model.overrides, "param_dtype": cfg.model.param_dtype,
            "backend": cfg.model.backend, "tokenizer_path": tok, "vocab": vocab, "split": split, "domain": domain,
            "source": d.sources.get(domain, "built-in"), "text_field": d.text_field,
            "eval_max_docs": d.eval_max_docs, "seq_len": d.seq_len, "batch_size": d.batch_size,
            "packing": d.packing,
            "max_batches": max_batches, "bf16": bool(bf16), "device": device, "docs": _docs_digest(docs)}


def _path(cache_dir: str, key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    name = re.sub(r"[^\w.-]", "_", f"{key['domain']}-{key['split']}")[:80]
    return Path(os.path.expanduser(cache_dir)) / f"{name}-{digest}.json"


def lookup(cache_dir: str, key: dict) -> dict | None:
    entry = read_json_cache(_path(cache_dir, key))
    want = json.loads(json.dumps(key, default=str))
    if isinstance(entry, dict) and entry.get("key") == want and isinstance(entry.get("result"), dict):
        return entry["result"]
    return None


def store(cache_dir: str, key: dict, result: dict) -> None:
    write_json_atomic(_path(cache_dir, key), {"key": json.loads(json.dumps(key, default=str)), "result": result})


def evaluate_before(cfg, model, tok, docs_by_domain: dict, split: str, ev: dict, *, write: bool = True) -> dict:
    """:func:`desmoe.eval.evaluate_model` of ``docs_by_domain`` with keyword arguments ``ev``, each domain's
    result taken from ``cfg.train.eval_cache`` when there and stored there when not (``write``: this process
    writes; under torchrun only rank 0 does)."""
    from ..eval import evaluate_model

    cache = cfg.train.eval_cache
    if ev.get("math_n"):  # math exact match is not a per-domain loss: not cached
        return evaluate_model(model, tok, docs_by_domain, **ev)
    keys = {d: entry_key(cfg, split=split, domain=d, docs=docs, max_batches=ev["max_batches"], bf16=ev["bf16"],
                         vocab=len(tok), device=torch.device(ev.get("device", "cpu")).type)
            for d, docs in docs_by_domain.items()}
    found = {d: lookup(cache, k) for d, k in keys.items()}
    missing = {d: docs_by_domain[d] for d, r in found.items() if r is None}
    if missing:
        fresh = evaluate_model(model, tok, missing, **{**ev, "general": None})["domains"]
        for d, r in fresh.items():
            found[d] = r
            if write:
                store(cache, keys[d], r)
    res = {"domains": {d: found[d] for d in docs_by_domain}}
    general = ev.get("general")
    if general is not None and general in res["domains"]:
        res["general"] = res["domains"][general]
    return res
