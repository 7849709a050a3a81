"""One fine-tuning run of the experiment grid, cached by its config, and the grid itself.

A *job* is (method, domains, lr, seed, method overrides). Every run starts from the cached base (``model.path``)
with ``train.max_steps = steps_per_domain × len(domains)``; for a seed, every method sees the same data order
(``data.seed``) and initial weights (``model.seed``): the comparison is paired. Runs are cached in
``<cache>/ft/<key>/record.json`` (keyed by the full training config), so experiments share runs (scaling reuses
the 5-domain Pareto runs) and a re-run only computes what is missing. ``workers`` > 1 runs jobs in that many
processes (one thread each); several commands sharing a cache also split the work (a lock per run).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time

from ..method.config import MethodConfig
from .methods import TRAINER_METHOD
from .pareto import mean as _avg
from .pareto import sd as _std
from .spec import ExperimentSpec


def _key(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Defaults that changed after runs were cached. A run's key is its config dict as written, which leaves defaults
# out; so that a new default never reuses a run made under the old one, each field here is written into the key
# with its resolved value, and left out where that value is the reference (the default the older keys were made
# under; a config that pins the reference keeps its cached runs). A field whose default changes goes here.
KEY_REFERENCE_DEFAULTS: dict[tuple[str, str], object] = {("method", "alr_expansion"): 4}
_CURRENT_DEFAULTS = {"method": MethodConfig}


def key_config(cfg_d: dict) -> dict:
    """``cfg_d`` as keyed: every :data:`KEY_REFERENCE_DEFAULTS` field resolved, and written only where it differs
    from its reference."""
    d = copy.deepcopy(cfg_d)
    for (section, field), reference in KEY_REFERENCE_DEFAULTS.items():
        sec = d.get(section) if isinstance(d.get(section), dict) else {}
        value = sec.get(field, getattr(_CURRENT_DEFAULTS[section](), field))
        sec.pop(field, None)
        if value != reference:
            sec[field] = value
        if sec or section in d:
            d[section] = sec
    return d


FP_ENV = "DESMOE_CORPORA_FINGERPRINT"


@contextlib.contextmanager
def pinned_corpora(spec: ExperimentSpec):
    """Every built-in corpus the experiment reads comes from ``<cache>/corpora/`` — snapshotted at first use — in
    this process and the worker processes it starts, and every run's cache key carries the snapshot's fingerprint
    (yielded). Without it, installing a package (its description joins ``general``, its licence ``law``) would
    change the held-out sets between runs that are compared as pairs."""
    from ..data.builtin import PIN_ENV, builtin_docs

    pin = os.path.abspath(os.path.join(spec.cache, "corpora"))
    saved = {k: os.environ.get(k) for k in (PIN_ENV, FP_ENV)}
    os.environ[PIN_ENV] = pin
    try:
        base_data = spec.base.get("config", {}).get("data", {})
        names = {*spec.domains, *base_data.get("domains", []), base_data.get("general"),
                 spec.finetune.get("data", {}).get("general")} - {None, "math"}  # math is generated, not read
        h = hashlib.sha1()
        for d in sorted(names):
            builtin_docs(d)  # snapshots it when missing
            with open(os.path.join(pin, f"{d}.json"), "rb") as f:
                h.update(d.encode() + b"\0" + hashlib.sha1(f.read()).digest())
        os.environ[FP_ENV] = h.hexdigest()[:12]
        yield os.environ[FP_ENV]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def finetune_config(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], lr: float, seed: int,
                    method_overrides: dict | None = None) -> dict:
    """The ``desmoe train`` config dict of one run (validated later by ``config_from_dict``)."""
    ft = copy.deepcopy(spec.finetune)
    cfg = {"model": {"path": base_path, "seed": seed}, "tokenizer": {"path": base_path},
           "data": {**ft.get("data", {}), "domains": list(domains), "seed": seed},
           "method": {**ft.get("method", {}), **(method_overrides or {}), "name": TRAINER_METHOD[method]},
           "train": {**ft.get("train", {}), "max_steps": spec.steps_per_domain * len(domains), "lr": float(lr),
                     "progress": False, "save_every": 0}}
    return cfg


def _read_history(run_dir: str) -> list[dict]:
    p = os.path.join(run_dir, "history.jsonl")
    if not os.path.isfile(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def _acquire(lock: str, result: str, log, wait: bool = True) -> bool | None:
    """True if we own ``lock``; False once another process (sharing the cache) has written ``result``; None
    when another live process holds the lock and ``wait`` is False."""
    warned = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(open(lock).read().strip() or 0)
                os.kill(pid, 0)
                alive = True
            except (ValueError, ProcessLookupError, PermissionError, OSError):
                alive = False
            if os.path.isfile(result):
                return False
            if not alive:  # a crashed run left its lock
                os.remove(lock)
                continue
            if not wait:
                return None
            if not warned:
                log(f"  waiting for another process running {os.path.dirname(lock)}")
                warned = True
            time.sleep(2)


def run_dir_of(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], lr: float, seed: int,
               method_overrides: dict | None = None, cfg_d: dict | None = None) -> str:
    """The cache directory of one run (``cfg_d``: its :func:`finetune_config`, when already built)."""
    if cfg_d is None:
        cfg_d = finetune_config(spec, base_path, method, domains, lr, seed, method_overrides)
    tag = f"{method}{''.join(f'-{k}{v}' for k, v in sorted((method_overrides or {}).items()))}"
    fp = os.environ.get(FP_ENV)  # set by pinned_corpora: runs on other corpora never share a cache entry
    keyed = key_config(cfg_d)
    key = _key({**keyed, "corpora": fp} if fp else keyed)
    return os.path.join(spec.cache, "ft", f"{tag}-{len(domains)}d-lr{lr:g}-s{seed}-{key}")


def run_one(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], lr: float, seed: int,
            method_overrides: dict | None = None, *, log=print, wait: bool = True) -> dict | None:
    """Run (or load from the cache) one fine-tuning run; returns its record (losses, forgetting, timing ...).
    With ``wait=False``, returns None instead of waiting for another process that is running the same config."""
    from ..train import config_from_dict, run

    cfg_d = finetune_config(spec, base_path, method, domains, lr, seed, method_overrides)
    run_dir = run_dir_of(spec, base_path, method, domains, lr, seed, method_overrides, cfg_d)  # key without the cache
    cfg_d["train"].setdefault("eval_cache", os.path.join(spec.cache, "eval"))
    rec_path = os.path.join(run_dir, "record.json")
    if os.path.isfile(rec_path):
        with open(rec_path) as f:
            return json.load(f)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    lock = run_dir + ".lock"
    got = _acquire(lock, rec_path, log, wait)
    if got is None:
        return None
    if not got:
        with open(rec_path) as f:
            return json.load(f)
    tag = os.path.basename(run_dir).rsplit("-", 1)[0]
    try:
        if os.path.isfile(rec_path):
            with open(rec_path) as f:
                return json.load(f)
        if os.path.isdir(run_dir):  # a half-written run from a crash: start it again
            shutil.rmtree(run_dir)
        cfg = config_from_dict(cfg_d, source=f"experiment run {tag}")
        s = run(cfg, run_dir, progress=False, log=lambda *a, **k: None)
        rec = _record(spec, s, run_dir, method, domains, lr, seed, method_overrides)
        with open(rec_path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        if spec.keep_checkpoints is False:
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        log(f"  {tag}: test avg domain loss {rec['avg_domain_loss']:.4f}, forgetting {rec['forgetting']:+.4f} "
            f"(val {rec['avg_domain_loss_val']:.4f} / {rec['forgetting_val']:+.4f}), {rec['wall_clock_s']:.0f}s")
        return rec
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def _record(spec, s: dict, run_dir: str, method, domains, lr, seed, method_overrides) -> dict:
    after, before = s["eval_after"], s["eval_before"]
    va, vb = s["val_after"], s["val_before"]
    dl = {d: after["domains"][d]["loss"] for d in domains}
    dlv = {d: va["domains"][d]["loss"] for d in domains}
    em = None
    if "math" in domains and spec.math_n > 0:
        from ..train.evaluate import evaluate_checkpoint

        em = evaluate_checkpoint(run_dir, math_n=spec.math_n, domains=["math"], device="cpu")["math"]["exact_match"]
    hist = _read_history(run_dir)
    timing = s.get("phase_timing") or {}
    masks = s.get("masks")
    return {
        "method": method, "domains": list(domains), "lr": lr, "seed": seed, "method_overrides": method_overrides or {},
        "run_dir": os.path.abspath(run_dir),
        "domain_loss": dl, "avg_domain_loss": sum(dl.values()) / len(dl),
        "domain_loss_se": {d: after["domains"][d].get("loss_se") for d in domains},
        "domain_loss_before": {d: before["domains"][d]["loss"] for d in domains},
        "general_loss_before": before["general"]["loss"], "general_loss_after": after["general"]["loss"],
        "general_loss_se": after["general"].get("loss_se"),
        "forgetting": after["general"]["loss"] - before["general"]["loss"],
        "domain_loss_val": dlv, "avg_domain_loss_val": sum(dlv.values()) / len(dlv),
        "general_loss_val_before": vb["general"]["loss"], "general_loss_val_after": va["general"]["loss"],
        "forgetting_val": va["general"]["loss"] - vb["general"]["loss"],
        "eval_tokens": {d: after["domains"][d]["tokens"] for d in after["domains"]},
        "math_exact_match": em, "wall_clock_s": s["seconds"],
        "train_seconds": sum(v["seconds"] for v in timing.values()),
        "phase_timing": {p: {"steps": v["steps"], "seconds": v["seconds"]} for p, v in timing.items()},
        "tokens_per_s": s["tokens_per_s"], "steps": s["steps_run"], "phases": s.get("phases"),
        "mask_sizes": None if not masks else {d: sum(map(len, v)) / len(v) for d, v in masks.items()},
        "esft_selection": s.get("esft_selection"),
        "val_curve": [{"step": h["step"], "train_s": h.get("train_s"), "val_avg": h["val/avg"],
                       "val_general": h.get("val/general")} for h in hist if "val/avg" in h],
        "history": [{k: v for k, v in h.items() if k in ("step", "phase", "task", "train_s")} for h in hist],
    }


def _job(spec, base_path, job):
    import torch

    torch.set_num_threads(1)
    m, doms, lr, seed, ov = job
    return run_one(spec, base_path, m, doms, lr, seed, ov, log=lambda msg: print(msg, flush=True))


def run_jobs(spec: ExperimentSpec, base_path: str, jobs: list[tuple], *, workers: int = 1, log=print) -> list[dict]:
    """Run ``jobs`` = [(method, domains, lr, seed, overrides)] (cached ones are loaded, not rerun) and return their
    records in order. ``workers`` > 1: that many processes; else in this process, first every job no other
    process is running, then waiting for the rest."""
    out: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, (m, doms, lr, seed, ov) in enumerate(jobs):
        p = os.path.join(run_dir_of(spec, base_path, m, doms, lr, seed, ov), "record.json")
        if os.path.isfile(p):
            with open(p) as f:
                out[i] = json.load(f)
        else:
            todo.append(i)
    if todo:
        log(f"  {len(todo)} of {len(jobs)} runs to compute ({len(jobs) - len(todo)} cached)"
            + (f", {workers} workers" if workers > 1 else ""))
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {i: ex.submit(_job, spec, base_path, jobs[i]) for i in todo}
            for i, f in futs.items():
                out[i] = f.result()
        return out
    for i in todo:
        m, doms, lr, seed, ov = jobs[i]
        out[i] = run_one(spec, base_path, m, doms, lr, seed, ov, log=log, wait=False)
    for i in todo:
        if out[i] is None:
            m, doms, lr, seed, ov = jobs[i]
            out[i] = run_one(spec, base_path, m, doms, lr, seed, ov, log=log)
    return out


def combine_single(recs: list[dict]) -> dict:
    """One point of a one-model-per-domain method from its per-domain runs (same LR and seed): each domain's loss
    from its own model; forgetting, its validation twin and the times are the mean / sum over the models."""
    doms = [r["domains"][0] for r in recs]
    dl = {r["domains"][0]: r["domain_loss"][r["domains"][0]] for r in recs}
    dlv = {r["domains"][0]: r["domain_loss_val"][r["domains"][0]] for r in recs}
    return {"method": recs[0]["method"], "domains": doms, "lr": recs[0]["lr"], "seed": recs[0]["seed"],
            "domain_loss": dl, "avg_domain_loss": sum(dl.values()) / len(dl),
            "domain_loss_val": dlv, "avg_domain_loss_val": sum(dlv.values()) / len(dlv),
            "forgetting": sum(r["forgetting"] for r in recs) / len(recs),
            "forgetting_val": sum(r["forgetting_val"] for r in recs) / len(recs),
            "wall_clock_s": sum(r["wall_clock_s"] for r in recs),
            "train_seconds": sum(r["train_seconds"] for r in recs),
            "steps": sum(r["steps"] for r in recs), "math_exact_match": None,
            "note": "one model per domain: each domain's loss from its own model; forgetting = mean over the models, "
                    "seconds = sum"}


def aggregate(runs: list[dict], domains: list[str] | None = None) -> dict:
    """Means over seeds + ``spread`` (sample std over seeds; 0 for one seed) of a list of run records."""
    domains = domains or runs[0]["domains"]
    per = {d: [r["domain_loss"][d] for r in runs if d in r["domain_loss"]] for d in domains}
    keys = ("avg_domain_loss", "forgetting", "avg_domain_loss_val", "forgetting_val", "wall_clock_s",
            "train_seconds", "math_exact_match")
    out = {"domain_loss": {d: _avg(v) for d, v in per.items()}, "n_seeds": len(runs)}
    out.update({k: _avg([r.get(k) for r in runs]) for k in keys})
    out["spread"] = {"stat": "sample std over seeds", "domain_loss": {d: _std(v) for d, v in per.items()},
                     **{k: _std([r.get(k) for r in runs]) for k in keys}}
    return out
