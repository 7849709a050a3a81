"""The paper-claim experiments — ``pareto`` (every method × LR grid × seeds, paired; matched comparisons, controls,
wall-clock) and ``scaling`` (2 → N domains, fixed steps per domain) — and ``all``.

Each writes ``OUT/results.json`` and PNG plots. Choices are made on the validation split, numbers are reported
on the test split. Forgetting = held-out general loss after fine-tuning minus the base's (lower is better).
"""
from __future__ import annotations

import json
import os
import time

from .. import provenance
from . import pareto as P
from . import plots
from .base import base_routing, base_specialization, prepare_base_cached
from .methods import SINGLE_METHODS
from .runner import aggregate, combine_single, pinned_corpora, run_jobs
from .spec import ExperimentSpec

EXPERIMENTS = ("pareto", "scaling")


def versions() -> dict:
    return provenance.versions("torch", "transformers", "triton", "desmoe")


def git_sha() -> str:
    sha, dirty = provenance.git_state()
    return "unknown" if sha is None else sha + ("-dirty" if dirty else "")


def _base(spec: ExperimentSpec, log) -> dict:
    cfg = spec.base["config"]
    doms = cfg.get("data", {}).get("domains", [])
    if set(spec.domains) - set(doms):
        raise ValueError(f"base.config.data.domains {doms} must include every experiment domain {spec.domains} "
                         f"(the tokenizer is trained on them)")
    base = prepare_base_cached(cfg, spec.base["pretrain_steps"], spec.cache,
                               aux_loss_coef=spec.base.get("aux_loss_coef", 0.0),
                               pretrain_mix=spec.base.get("pretrain_mix"), log=log)
    return {**base, "routing": base_routing(base["path"], spec),
            "specialization": _spec_summary(base_specialization(base["path"], spec))}


def _spec_summary(sp: dict) -> dict:
    """The base's specialization as results carry it: the layer means, the uniform-routing concentration and the
    per-layer normalised mutual information."""
    return {**sp["mean"], "concentration_uniform": sp["concentration_uniform"], "n_top": sp["n_top"],
            "mi_norm_per_layer": [r["mi_norm"] for r in sp["layers"]], "tokens_per_domain": sp["key"]["tokens"]}


def _rel(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (results name configs the same on any clone)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = os.path.abspath(path)
    return os.path.relpath(ap, root) if ap.startswith(root + os.sep) else path


def _header(name: str, spec: ExperimentSpec, base: dict) -> dict:
    keys = ("pretrain_steps", "n_params", "general_loss_random_init", "general_loss", "train_loss_last10pct",
            "train_loss_prev10pct", "seconds")
    return {"experiment": name, "config": {**spec.to_dict(), "source": _rel(spec.source), "cache": _rel(spec.cache)},
            "versions": versions(),
            "git_sha": git_sha(), "seeds": list(range(spec.seeds)),
            "split": {"select": "validation", "report": "test"},
            "base": {k: base[k] for k in keys if k in base} | {
                "aux_loss_coef": base.get("aux_loss_coef", 0.0), "pretrain_mix": base.get("pretrain_mix"),
                "model": spec.base["config"]["model"], "routing": base["routing"],
                "specialization": base.get("specialization")}}


def _write(out: str, res: dict) -> str:
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, "results.json")
    with open(p + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(p + ".tmp", p)
    return p


def _jobs(spec: ExperimentSpec, methods: list[str], singles: list[str], lrs: dict | None = None) -> list[tuple]:
    """Seed-major (a stopped command leaves whole seeds behind), then LR, then method; one-model-per-domain
    methods as one job per domain. ``lrs``: method -> its own LR grid (default: ``spec.lrs`` for every method)."""
    def grid(m):
        return (lrs or {}).get(m) or spec.lrs

    jobs = []
    for seed in range(spec.seeds):
        for lr in sorted({x for m in [*methods, *singles] for x in grid(m)}):
            for m in methods:
                if lr in grid(m):
                    meth, ov = spec.cell_of(m)
                    jobs.append((meth, list(spec.domains), lr, seed, ov))
            for sm in singles:
                if lr in grid(sm):
                    jobs.extend((sm, [d], lr, seed, None) for d in spec.domains)
    return jobs


def _cell_key(meth: str, ov: dict | None) -> tuple[str, str]:
    return meth, json.dumps(ov or {}, sort_keys=True)


def _names(spec: ExperimentSpec, methods) -> dict[tuple[str, str], str]:
    """(trainer-level METHOD, overrides) -> the experiment's name for it (a method or a variant)."""
    return {_cell_key(*spec.cell_of(m)): m for m in methods}


def _group(spec: ExperimentSpec, jobs: list[tuple], recs: list[dict], methods, singles) -> dict[str, list[dict]]:
    """Records per method name (variants by their own name); one-model-per-domain runs combined per (LR, seed)."""
    names = _names(spec, methods)
    out: dict[str, list[dict]] = {m: [] for m in [*methods, *singles]}
    single: dict[tuple, list[dict]] = {}
    for (meth, doms, lr, seed, ov), r in zip(jobs, recs):
        if meth in SINGLE_METHODS:
            single.setdefault((meth, lr, seed), []).append(r)
        else:
            out[names[_cell_key(meth, ov)]].append(r)
    for (meth, lr, seed), rs in single.items():
        out[meth].append(combine_single(rs))
    return out


def _point(r: dict) -> dict:
    return {"lr": r["lr"], "seed": r["seed"], "domain_loss": r["avg_domain_loss"], "forgetting": r["forgetting"],
            "domain_loss_val": r["avg_domain_loss_val"], "forgetting_val": r["forgetting_val"],
            "per_domain_loss": r["domain_loss"]}


def _selected(spec: ExperimentSpec, recs: list[dict]) -> tuple[float, list[dict]]:
    lr = P.select_lr([_point(r) for r in recs])
    return lr, sorted((r for r in recs if r["lr"] == lr), key=lambda r: r["seed"])


def _phase_step_s(recs: list[dict]) -> dict:
    """Mean seconds per step of each phase over ``recs`` (training compute only)."""
    out: dict[str, list[float]] = {}
    for r in recs:
        for p, v in (r.get("phase_timing") or {}).items():
            if v["steps"]:
                out.setdefault(p, []).append(v["seconds"] / v["steps"])
    return {p: sum(v) / len(v) for p, v in out.items()}


def _eval_se(recs: list[dict]) -> float | None:
    """Standard error of one run's average test domain loss from the evaluation alone (domains independent)."""
    vals = []
    for r in recs:
        se = [s for s in (r.get("domain_loss_se") or {}).values() if s is not None]
        if se and len(se) == len(r["domain_loss"]):
            vals.append(sum(s * s for s in se) ** 0.5 / len(se))
    return sum(vals) / len(vals) if vals else None


def exp_pareto(spec: ExperimentSpec, out: str, log=print, workers: int = 1, lrs: dict | None = None) -> dict:
    """``lrs``: method -> its own LR grid (the base sweep's searches); default ``spec.lrs`` for all."""
    base = _base(spec, log)
    methods_, singles = list(spec.pareto_methods), list(spec.single_methods)
    jobs = _jobs(spec, methods_, singles, lrs)
    log(f"pareto: {len(methods_)} mixed + {len(singles)} one-model-per-domain methods × "
        f"{'their own' if lrs else len(spec.lrs)} LRs × {spec.seeds} seeds ({len(jobs)} runs)")
    recs = run_jobs(spec, base["path"], jobs, workers=workers, log=log)
    grouped = _group(spec, jobs, recs, methods_, singles)
    methods: dict[str, dict] = {}
    sel_recs: dict[str, list[dict]] = {}
    for m, rs in grouped.items():
        pts = [_point(r) for r in rs]
        lr, srs = _selected(spec, rs)
        sel_recs[m] = srs
        rows = P.lr_means(pts)
        methods[m] = {"points": pts, "lr_means": rows, "selected_lr": lr, "selected": aggregate(srs, spec.domains),
                      "frontier": [{"domain_loss": a, "forgetting": b} for a, b in
                                   P.frontier([(r["domain_loss"], r["forgetting"]) for r in rows])],
                      "one_model_per_domain": m in SINGLE_METHODS}
    refs = {r: {"lr": methods[r]["selected_lr"], "domain_loss": methods[r]["selected"]["avg_domain_loss"],
                "forgetting": methods[r]["selected"]["forgetting"]} for r in ("des_moe", "fft_mixed")}
    for m, b in methods.items():
        b["at_matched_forgetting"] = {r: P.matched(b["points"], forgetting=v["forgetting"]) for r, v in refs.items()}
        b["at_matched_domain_loss"] = {r: P.matched(b["points"], loss=v["domain_loss"]) for r, v in refs.items()}
    # wall-clock: steps / seconds to FFT's final validation loss of the same seed (each method at its selected LR)
    fft_by_seed = {r["seed"]: r["val_curve"][-1]["val_avg"] for r in sel_recs["fft_mixed"] if r.get("val_curve")}
    for m, b in methods.items():
        if m in SINGLE_METHODS:
            continue
        rs = [r for r in sel_recs[m] if r["seed"] in fft_by_seed]
        b["wall_clock"] = {**P.time_to_target([r["val_curve"] for r in rs], [fft_by_seed[r["seed"]] for r in rs]),
                           "train_seconds": b["selected"]["train_seconds"],
                           "step_seconds_by_phase": _phase_step_s(sel_recs[m]),
                           "steps": sel_recs[m][0]["steps"]}
    target = sum(fft_by_seed.values()) / len(fft_by_seed)
    five = next(r for r in recs if len(r["domains"]) == len(spec.domains))
    base_loss = sum(five["domain_loss_before"].values()) / len(five["domain_loss_before"])
    res = {**_header("pareto", spec, base), "domains": spec.domains,
           "steps": {"mixed": spec.steps_per_domain * len(spec.domains), "per_domain_model": spec.steps_per_domain},
           **({"lrs_by_method": {m: sorted(v) for m, v in lrs.items()}} if lrs else {}),
           "methods": methods, "references": refs,
           "base_domain_loss": base_loss,
           "wall_clock_target": {"what": "per seed: fft_mixed's final validation average domain loss at its "
                                         "selected LR (value: the mean over seeds)", "value": target,
                                 "per_seed": fft_by_seed},
           "resolution": P.resolution({m: b["points"] for m, b in methods.items()}, _eval_se(recs),
                                      ("des_moe", "fft_mixed")),
           "eval_tokens_per_domain": recs[0].get("eval_tokens"),
           "mask_sizes_des_moe": sel_recs["des_moe"][0].get("mask_sizes")}
    plots.pareto(os.path.join(out, "pareto.png"), {m: b for m, b in methods.items()},
                 f"{len(spec.domains)} domains, {spec.steps_per_domain} steps per domain, LRs {spec.lrs}")
    plots.pareto(os.path.join(out, "pareto_core.png"),
                 {m: methods[m] for m in ("fft_mixed", "experts_only", "esft_gate", "des_moe") if m in methods},
                 "core methods")
    plots.wall_clock(os.path.join(out, "wall_clock.png"),
                     {m: sel_recs[m][0].get("val_curve") for m in methods if m not in SINGLE_METHODS},
                     fft_by_seed.get(sel_recs["fft_mixed"][0]["seed"], target))
    _write(out, res)
    return res


def exp_scaling(spec: ExperimentSpec, out: str, log=print, workers: int = 1, lrs: dict | None = None) -> dict:
    """The scaling methods at the LR chosen on validation in the Pareto grid (its runs are reused; ``lrs``:
    method -> LR, already chosen), on the first n domains for each n of ``scaling_counts``, ``steps_per_domain ×
    n`` steps."""
    base = _base(spec, log)
    ms = list(spec.scaling_methods)
    if lrs is None:
        pjobs = _jobs(spec, ms, [])
        log(f"scaling: the LR grid of {ms} (from the Pareto runs)")
        grouped = _group(spec, pjobs, run_jobs(spec, base["path"], pjobs, workers=workers, log=log), ms, [])
        lrs = {m: _selected(spec, grouped[m])[0] for m in ms}
    counts = sorted(spec.scaling_counts)
    jobs = [(*spec.cell_of(m), n, lrs[m], s) for s in range(spec.seeds) for n in counts for m in ms]
    jobs = [(meth, list(spec.domains[:n]), lr, s, ov) for meth, ov, n, lr, s in jobs]
    log(f"scaling: {counts} domains × {ms} × {spec.seeds} seeds")
    recs = run_jobs(spec, base["path"], jobs, workers=workers, log=log)
    common = list(spec.domains[:counts[0]])
    names = _names(spec, ms)
    by: dict[str, dict[int, list[dict]]] = {m: {} for m in ms}
    for (meth, doms, lr, s, ov), r in zip(jobs, recs):
        by[names[_cell_key(meth, ov)]].setdefault(len(doms), []).append(r)
    methods = {}
    for m in ms:
        per = {}
        for n in counts:
            rs = sorted(by[m][n], key=lambda r: r["seed"])
            cl = [sum(r["domain_loss"][d] for d in common) / len(common) for r in rs]
            per[str(n)] = {"domains": list(spec.domains[:n]), "steps": spec.steps_per_domain * n,
                           "common_domain_loss": P.mean(cl), "common_domain_loss_sd": P.sd(cl),
                           "common_domain_loss_per_seed": cl, "forgetting": P.mean([r["forgetting"] for r in rs]),
                           "forgetting_sd": P.sd([r["forgetting"] for r in rs]),
                           "forgetting_per_seed": [r["forgetting"] for r in rs], **{
                               "avg_domain_loss": P.mean([r["avg_domain_loss"] for r in rs])}}
        lo, hi = per[str(counts[0])], per[str(counts[-1])]
        d_loss = [b - a for a, b in zip(lo["common_domain_loss_per_seed"], hi["common_domain_loss_per_seed"])]
        d_forg = [b - a for a, b in zip(lo["forgetting_per_seed"], hi["forgetting_per_seed"])]
        methods[m] = {"lr": lrs[m], "per_count": per,
                      "change": {"from": counts[0], "to": counts[-1], "common_domain_loss": P.mean(d_loss),
                                 "common_domain_loss_sd": P.sd(d_loss), "forgetting": P.mean(d_forg),
                                 "forgetting_sd": P.sd(d_forg)}}
    res = {**_header("scaling", spec, base), "domains": spec.domains, "counts": counts, "common_domains": common,
           "steps_per_domain": spec.steps_per_domain, "methods": methods,
           "note": "each method at the LR chosen on validation in the Pareto grid; change = (most domains) − "
                   "(fewest), paired per seed; the loss is on the domains present at every count"}
    plots.scaling(os.path.join(out, "scaling.png"), counts, methods, common)
    _write(out, res)
    return res


def _n_records(spec: ExperimentSpec) -> int:
    d = os.path.join(spec.cache, "ft")
    return sum(os.path.isfile(os.path.join(d, r, "record.json")) for r in os.listdir(d)) if os.path.isdir(d) else 0


RUNNERS = {"pareto": exp_pareto, "scaling": exp_scaling}


def run_experiment(name: str, out: str, spec: ExperimentSpec, log=print, workers: int = 1) -> dict:
    """Run experiment ``name`` (or ``all``: each into ``out/<name>/``, then ``out/summary.md``)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an int >= 1, got {workers!r}")
    if name == "all":
        t0, n0 = time.time(), _n_records(spec)
        res = {n: run_experiment(n, os.path.join(out, n), spec, log, workers) for n in EXPERIMENTS}
        from .report import render

        secs, computed = time.time() - t0, _n_records(spec) - n0
        this = {"command": "desmoe experiment all", "config": _rel(spec.source), "workers": workers, "seconds": secs,
                "runs_computed": computed}
        tp = os.path.join(out, "timing.json")
        old = json.load(open(tp)) if os.path.isfile(tp) else None
        if old is None or computed > 0:  # an invocation that found everything cached keeps the file
            # invocations that extended the same result set (e.g. a grid grown by one LR) add up
            runs = (old.get("invocations") or [old]) if old and old.get("runs_computed") else []
            runs = [*({k: r.get(k) for k in this} for r in runs), this]
            timing = {**this, "seconds": sum(r["seconds"] for r in runs),
                      "runs_computed": sum(r["runs_computed"] for r in runs), "runs_total": _n_records(spec),
                      "base_seconds": res["pareto"]["base"].get("seconds"), "invocations": runs,
                      "note": "wall time of the invocations that computed the runs (the base is built once and "
                              "cached: base_seconds); one that finds everything cached keeps this file"}
            with open(tp, "w") as f:
                json.dump(timing, f, indent=1)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(render(out))
        log(f"all experiments done in {secs:.0f}s ({computed} runs computed)")
        return res
    if name not in RUNNERS:
        raise ValueError(f"experiment name must be one of {EXPERIMENTS} or 'all', got {name!r}")
    t0 = time.time()
    log(f"experiment {name} -> {out}")
    with pinned_corpora(spec) as fp:
        log(f"corpora pinned in {os.path.join(spec.cache, 'corpora')} (fingerprint {fp})")
        res = RUNNERS[name](spec, out, log, workers)
    log(f"experiment {name} done in {time.time() - t0:.0f}s: {os.path.join(out, 'results.json')}")
    return res
