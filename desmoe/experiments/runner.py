"""One fine-tuning run of the experiment grid, cached by its config, and the LR search / seed aggregation.

A *cell* is (method, domains, method overrides). Per cell: the LR search runs seed 0 at every LR of
``spec.lrs`` and keeps the LR with the lowest average held-out domain loss; the other seeds run at that LR. Every
cell gets the same steps, data order (``data.seed`` = seed) and LR budget. Runs are cached in
``<cache>/ft/<key>/`` (keyed by the full training config), so experiments share runs (the 5-domain FFT run is used
by forgetting, scaling, single-vs-mixed and convergence) and a re-run only computes what is missing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time

from .spec import ExperimentSpec

# experiment METHOD name -> trainer method.name
TRAINER_METHOD = {"fft_mixed": "fft", "fft_single": "fft", "esft_gate": "esft_gate", "esft_token": "esft_token",
                  "frozen_router": "frozen_router", "des_moe": "des_moe", "des_moe_no_alr": "des_moe_no_alr",
                  "des_moe_no_dges": "des_moe_no_dges", "esft_gate_single": "esft_gate", "esft_token_single": "esft_token"}
# one run per domain (data.domains = [d]), each with its own LR search and, for ESFT, its own selected experts
SINGLE_METHODS = ("fft_single", "esft_gate_single", "esft_token_single")


def _key(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finetune_config(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], lr: float, seed: int,
                    method_overrides: dict | None = None) -> dict:
    """The ``desmoe train`` config dict of one run (validated later by ``config_from_dict``)."""
    ft = copy.deepcopy(spec.finetune)
    cfg = {"model": {"path": base_path, "seed": seed}, "tokenizer": {"path": base_path},
           "data": {**ft.get("data", {}), "domains": list(domains), "seed": seed},
           "method": {**ft.get("method", {}), **(method_overrides or {}), "name": TRAINER_METHOD[method]},
           "train": {**ft.get("train", {}), "lr": float(lr), "progress": False, "save_every": 0}}
    return cfg


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


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


def run_one(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], lr: float, seed: int,
            method_overrides: dict | None = None, *, log=print, wait: bool = True) -> dict | None:
    """Run (or load from the cache) one fine-tuning run; returns its record (losses, forgetting, timing ...).
    With ``wait=False``, returns None instead of waiting for another process that is running the same config."""
    from ..train import config_from_dict, run

    cfg_d = finetune_config(spec, base_path, method, domains, lr, seed, method_overrides)
    tag = f"{method}{''.join(f'-{k}{v}' for k, v in sorted((method_overrides or {}).items()))}"
    run_dir = os.path.join(spec.cache, "ft", f"{tag}-{len(domains)}d-lr{lr:g}-s{seed}-{_key(cfg_d)}")
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
    try:
        if os.path.isfile(rec_path):
            with open(rec_path) as f:
                return json.load(f)
        if os.path.isdir(run_dir):  # a half-written run from a crash: start it again
            shutil.rmtree(run_dir)
        log(f"  run {tag} domains={','.join(domains)} lr={lr:g} seed={seed}")
        cfg = config_from_dict(cfg_d, source=f"experiment run {tag}")
        s = run(cfg, run_dir, progress=False, log=lambda *a, **k: None)
        rec = _record(spec, s, run_dir, method, domains, lr, seed, method_overrides)
        with open(rec_path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        if spec.keep_checkpoints is False:
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        log(f"    avg domain loss {rec['avg_domain_loss']:.4f}, general delta {rec['general_loss_delta']:+.4f}, "
            f"{rec['wall_clock_s']:.0f}s")
        return rec
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def _record(spec, s: dict, run_dir: str, method, domains, lr, seed, method_overrides) -> dict:
    after, before = s["eval_after"], s["eval_before"]
    dl = {d: after["domains"][d]["loss"] for d in domains}
    em = None
    if "math" in domains and spec.math_n > 0:
        from ..train.evaluate import evaluate_checkpoint

        em = evaluate_checkpoint(run_dir, math_n=spec.math_n, domains=["math"], device="cpu")["math"]["exact_match"]
    hist = _read_history(run_dir)
    train_s = sum(v["seconds"] for v in (s.get("phase_timing") or {}).values())
    return {
        "method": method, "domains": list(domains), "lr": lr, "seed": seed, "method_overrides": method_overrides or {},
        "run_dir": os.path.abspath(run_dir), "domain_loss": dl, "avg_domain_loss": sum(dl.values()) / len(dl),
        "domain_loss_before": {d: before["domains"][d]["loss"] for d in domains},
        "general_loss_before": before["general"]["loss"], "general_loss_after": after["general"]["loss"],
        "general_loss_delta": after["general"]["loss"] - before["general"]["loss"],
        "math_exact_match": em, "wall_clock_s": s["seconds"], "train_seconds": train_s,
        "tokens_per_s": s["tokens_per_s"], "steps": s["steps_run"], "phases": s.get("phases"),
        "masks": s.get("masks"), "esft_selection": s.get("esft_selection"), "affinity_png": s.get("plot"),
        "history": [{k: v for k, v in h.items() if k == "step" or k == "phase" or k == "task" or k == "loss"
                     or k.startswith("loss/") or k == "lambda"} for h in hist],
    }


def run_cell(spec: ExperimentSpec, base_path: str, method: str, domains: list[str], seeds: int,
             method_overrides: dict | None = None, *, lrs: list[float] | None = None, log=print) -> dict:
    """LR search on seed 0 (best average held-out domain loss), then seeds 1.. at that LR; returns
    ``{"lr", "lr_search": {lr: avg domain loss}, "runs": [record per seed]}``."""
    lrs = list(lrs or spec.lrs)
    search = {lr: run_one(spec, base_path, method, domains, lr, 0, method_overrides, log=log) for lr in lrs}
    best = min(lrs, key=lambda lr: search[lr]["avg_domain_loss"])
    runs = [search[best]] + [run_one(spec, base_path, method, domains, best, s, method_overrides, log=log)
                             for s in range(1, seeds)]
    return {"lr": best, "lr_search": {f"{lr:g}": search[lr]["avg_domain_loss"] for lr in lrs}, "runs": runs}


def aggregate(runs: list[dict], domains: list[str] | None = None) -> dict:
    """The per-METHOD block of results.json: means over seeds + ``spread`` (sample std over seeds; 0 for one seed)."""
    domains = domains or runs[0]["domains"]
    per = {d: [r["domain_loss"][d] for r in runs if d in r["domain_loss"]] for d in domains}
    em = [r["math_exact_match"] for r in runs]
    out = {
        "domain_loss": {d: _avg(v) for d, v in per.items()},
        "general_loss_delta": _avg([r["general_loss_delta"] for r in runs]),
        "math_exact_match": _avg(em),
        "wall_clock_s": _avg([r["wall_clock_s"] for r in runs]),
        "avg_domain_loss": _avg([sum(r["domain_loss"].values()) / len(r["domain_loss"]) for r in runs]),
        "n_seeds": len(runs),
        "spread": {
            "stat": "sample std over seeds",
            "domain_loss": {d: _std(v) for d, v in per.items()},
            "general_loss_delta": _std([r["general_loss_delta"] for r in runs]),
            "math_exact_match": _std(em),
            "wall_clock_s": _std([r["wall_clock_s"] for r in runs]),
            "avg_domain_loss": _std([sum(r["domain_loss"].values()) / len(r["domain_loss"]) for r in runs]),
        },
    }
    return out


def _run_jobs(spec, base_path, jobs: list[tuple], log) -> list[dict]:
    """Run ``jobs`` = [(method, domains, lr, seed, overrides)]: first every job no other process is running
    (so several processes sharing the cache split the work), then wait for the rest."""
    out: list[dict | None] = [None] * len(jobs)
    for i, (m, doms, lr, seed, ov) in enumerate(jobs):
        out[i] = run_one(spec, base_path, m, doms, lr, seed, ov, log=log, wait=False)
    for i, (m, doms, lr, seed, ov) in enumerate(jobs):
        if out[i] is None:
            out[i] = run_one(spec, base_path, m, doms, lr, seed, ov, log=log)
    return out


def run_cells(spec: ExperimentSpec, base_path: str, cells: list[tuple], seeds: int, *, log=print) -> list[dict]:
    """:func:`run_cell` for many cells ``[(method, domains, overrides, lrs or None)]`` at once: all LR-search
    runs first, then all extra seeds (same results as one ``run_cell`` per cell, in any order)."""
    lrs_of = [list(c[3] or spec.lrs) for c in cells]
    stage1 = [(c[0], c[1], lr, 0, c[2]) for c, lrs in zip(cells, lrs_of) for lr in lrs]
    recs = iter(_run_jobs(spec, base_path, stage1, log))
    search = [{lr: next(recs) for lr in lrs} for lrs in lrs_of]
    best = [min(lrs, key=lambda lr: sr[lr]["avg_domain_loss"]) for lrs, sr in zip(lrs_of, search)]
    stage2 = [(c[0], c[1], b, s, c[2]) for c, b in zip(cells, best) for s in range(1, seeds)]
    recs2 = iter(_run_jobs(spec, base_path, stage2, log))
    out = []
    for c, lrs, sr, b in zip(cells, lrs_of, search, best):
        runs = [sr[b]] + [next(recs2) for _ in range(1, seeds)]
        out.append({"lr": b, "lr_search": {f"{lr:g}": sr[lr]["avg_domain_loss"] for lr in lrs},
                    "lr_search_general_loss_delta": {f"{lr:g}": sr[lr]["general_loss_delta"] for lr in lrs},
                    "runs": runs})
    return out
