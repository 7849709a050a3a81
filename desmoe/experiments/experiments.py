"""The five experiments (forgetting, scaling, single_vs_mixed, ablations, convergence) and ``all``.

Each writes ``OUT/results.json`` (``{"experiment", "config", "versions", "git_sha", "seeds", "methods": {METHOD:
{"domain_loss", "general_loss_delta", "math_exact_match", "wall_clock_s", "spread"}}}`` + extras) and PNG plots.
``general_loss_delta`` = held-out general loss after fine-tuning minus the base's (forgetting; lower is better).
"""
from __future__ import annotations

import json
import os
import time

from .. import provenance
from . import plots
from .base import base_routing, prepare_base_cached
from .runner import TRAINER_METHOD, aggregate, run_cells
from .spec import ExperimentSpec

EXPERIMENTS = ("forgetting", "scaling", "single_vs_mixed", "ablations", "convergence")


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
    return {**base, "routing": base_routing(base["path"], spec)}


def _header(name: str, spec: ExperimentSpec, base: dict) -> dict:
    return {"experiment": name, "config": {**spec.to_dict(), "source": spec.source}, "versions": versions(),
            "git_sha": git_sha(), "seeds": list(range(spec.seeds)),
            "base": {k: base[k] for k in ("pretrain_steps", "n_params", "general_loss_random_init", "general_loss",
                                         "train_loss_last10pct", "train_loss_prev10pct", "seconds")
                     if k in base} | {"aux_loss_coef": base.get("aux_loss_coef", 0.0), "pretrain_mix": base.get("pretrain_mix"),
                        "routing": base["routing"]}}


def _block(cell: dict, domains) -> dict:
    out = aggregate(cell["runs"], domains)
    out["lr"] = cell["lr"]
    out["lr_search"] = cell["lr_search"]  # seed 0: avg held-out domain loss per LR
    if "lr_search_general_loss_delta" in cell:
        out["lr_search_general_loss_delta"] = cell["lr_search_general_loss_delta"]
    return out


def _cells(spec, base_path, methods, domains, log) -> dict:
    cells = [(spec.cell_of(m)[0], domains, spec.cell_of(m)[1], None) for m in methods]
    res = run_cells(spec, base_path, cells, spec.seeds, log=log)
    return dict(zip(methods, res))


def _write(out: str, res: dict) -> str:
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, "results.json")
    with open(p + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(p + ".tmp", p)
    return p


def _targets_forgetting(methods: dict, des_name: str = "des_moe", variants=()) -> dict:
    """The paper's claims, checked on our numbers (None where a needed method is absent); the same checks for
    each DES-MoE variant row under ``variants``."""
    t = {}
    if variants:
        t["variants"] = {v: _targets_forgetting(methods, v) for v in variants if v in methods}
    des, fft = methods.get(des_name), methods.get("fft_mixed")
    if des and fft:
        t["forgetting_ratio_des_over_fft"] = (des["general_loss_delta"] / fft["general_loss_delta"]
                                              if fft["general_loss_delta"] > 0 else None)
        t["forgetting_le_third_of_fft"] = (t["forgetting_ratio_des_over_fft"] is not None
                                           and t["forgetting_ratio_des_over_fft"] <= 1 / 3)
        t["avg_domain_loss_le_fft_mixed"] = des["avg_domain_loss"] <= fft["avg_domain_loss"]
    single = methods.get("fft_single")
    if des and single:
        rel = des["avg_domain_loss"] / single["avg_domain_loss"] - 1
        t["avg_domain_loss_rel_to_fft_single"] = rel
        t["within_2pct_of_fft_single"] = rel <= 0.02
    return t


def exp_forgetting(spec: ExperimentSpec, out: str, log=print) -> dict:
    base = _base(spec, log)
    cells = _cells(spec, base["path"], spec.forgetting_methods, spec.domains, log)
    methods = {m: _block(c, spec.domains) for m, c in cells.items()}
    res = {**_header("forgetting", spec, base), "domains": spec.domains, "methods": methods,
           "targets": _targets_forgetting(methods, variants=list(spec.variants))}
    plots.forgetting_bars(os.path.join(out, "forgetting.png"), methods, "forgetting: mixed fine-tuning on "
                          + ", ".join(spec.domains))
    plots.loss_curves(os.path.join(out, "loss_curves.png"), {m: c["runs"] for m, c in cells.items()})
    if "des_moe" in cells:
        plots.copy_affinity(cells["des_moe"]["runs"][0], os.path.join(out, "affinity_des_moe.png"))
    _write(out, res)
    return res


def exp_scaling(spec: ExperimentSpec, out: str, log=print) -> dict:
    base = _base(spec, log)
    counts = sorted(spec.scaling_counts)
    blocks = {}
    log(f"scaling: {counts} domains")
    todo = [(spec.cell_of(m)[0], spec.domains[:n], spec.cell_of(m)[1], None) for n in counts for m in spec.scaling_methods]
    res = iter(run_cells(spec, base["path"], todo, spec.seeds, log=log))
    for n in counts:
        doms = spec.domains[:n]
        blocks[str(n)] = {"domains": doms, "methods": {m: _block(next(res), doms) for m in spec.scaling_methods}}
    lo, hi = str(counts[0]), str(counts[-1])
    # degradation from the fewest to the most domains: change in average domain loss (up = worse) and forgetting
    # the average over a growing domain set mixes in new domains of other difficulty, so the like-for-like
    # degradation is the loss change on the domains present at every count (the first ``lo`` ones)
    common = blocks[lo]["domains"]

    def common_change(m):
        a, b = blocks[lo]["methods"][m]["domain_loss"], blocks[hi]["methods"][m]["domain_loss"]
        return sum(b[d] - a[d] for d in common) / len(common)

    degr = {m: {"avg_domain_loss_change": blocks[hi]["methods"][m]["avg_domain_loss"] - blocks[lo]["methods"][m]["avg_domain_loss"],
                "common_domain_loss_change": common_change(m),
                "general_loss_delta_change": blocks[hi]["methods"][m]["general_loss_delta"] - blocks[lo]["methods"][m]["general_loss_delta"]}
            for m in spec.scaling_methods}
    t = {"criterion": f"loss increase on the common domains {common} from {lo} to {hi} domains <= 1/3 of fft_mixed's"}
    for des in ["des_moe", *spec.variants]:
        if des in degr and "fft_mixed" in degr:
            f, d = degr["fft_mixed"]["common_domain_loss_change"], degr[des]["common_domain_loss_change"]
            t[f"{des}_degradation_le_third_of_fft"] = (d <= f / 3) if f > 0 else None
    res = {**_header("scaling", spec, base), "domain_counts": blocks, "methods": blocks[hi]["methods"],
           "degradation": {"from": int(lo), "to": int(hi), "common_domains": common, **degr}, "targets": t}
    plots.scaling_lines(os.path.join(out, "scaling.png"), blocks)
    _write(out, res)
    return res


def _single_runs(spec, base_path, log, method: str = "fft_single") -> tuple[dict, dict]:
    """``method`` (FFT, or ESFT with its own expert selection per domain: the paper's single-domain protocol) on
    each domain alone (own LR search per domain); per seed, one record combining the domains."""
    cells = dict(zip(spec.domains, run_cells(spec, base_path, [(method, [d], None, None) for d in spec.domains],
                                             spec.seeds, log=log)))
    runs = []
    for s in range(spec.seeds):
        rs = [cells[d]["runs"][s] for d in spec.domains]
        ems = [r["math_exact_match"] for r in rs if r["math_exact_match"] is not None]
        runs.append({"domains": list(spec.domains), "domain_loss": {d: cells[d]["runs"][s]["domain_loss"][d] for d in spec.domains},
                     "general_loss_delta": sum(r["general_loss_delta"] for r in rs) / len(rs),
                     "math_exact_match": ems[0] if ems else None,
                     "wall_clock_s": sum(r["wall_clock_s"] for r in rs)})
    return cells, runs


def exp_single_vs_mixed(spec: ExperimentSpec, out: str, log=print) -> dict:
    base = _base(spec, log)
    methods = {}
    for sm in spec.single_methods:
        cells, single = _single_runs(spec, base["path"], log, sm)
        methods[sm] = {**aggregate(single, spec.domains), "lr": {d: c["lr"] for d, c in cells.items()},
                       "lr_search": {d: c["lr_search"] for d, c in cells.items()},
                       "note": f"one {TRAINER_METHOD[sm]} model per domain; general_loss_delta = mean over the domain "
                               "models, wall_clock_s = sum over them"}
    mixed = _cells(spec, base["path"], ["fft_mixed", "des_moe"] + [m for m in spec.forgetting_methods
                                                                  if m in spec.variants], spec.domains, log)
    methods.update({m: _block(c, spec.domains) for m, c in mixed.items()})
    res = {**_header("single_vs_mixed", spec, base), "domains": spec.domains, "methods": methods,
           "targets": _targets_forgetting(methods, variants=list(spec.variants))}
    plots.forgetting_bars(os.path.join(out, "single_vs_mixed.png"), methods, "single-domain FFT vs mixed")
    _write(out, res)
    return res


def exp_ablations(spec: ExperimentSpec, out: str, log=print) -> dict:
    base = _base(spec, log)
    cells = _cells(spec, base["path"], ["des_moe", "des_moe_no_alr", "des_moe_no_dges"], spec.domains, log)
    methods = {m: _block(c, spec.domains) for m, c in cells.items()}
    des_lr = cells["des_moe"]["lr"]
    default_phi = spec.finetune.get("method", {}).get("phi", 0.6)
    # the φ sweep reuses DES-MoE's searched LR (a sweep of the mask threshold, not a new method)
    others = [p for p in spec.phis if abs(p - default_phi) > 1e-12]
    res = run_cells(spec, base["path"], [("des_moe", spec.domains, {"phi": p}, [des_lr]) for p in others], spec.seeds,
                    log=log)
    phi = {f"{p:g}": (methods["des_moe"] if abs(p - default_phi) <= 1e-12 else _block(res[others.index(p)], spec.domains))
           for p in spec.phis}
    full = methods["des_moe"]
    t = {f"{m}_worse": (methods[m]["avg_domain_loss"] > full["avg_domain_loss"],
                        methods[m]["general_loss_delta"] > full["general_loss_delta"])
         for m in ("des_moe_no_alr", "des_moe_no_dges")}
    t["criterion"] = "(avg domain loss higher, forgetting higher) than full des_moe"
    res = {**_header("ablations", spec, base), "domains": spec.domains, "methods": methods, "phi_sweep": phi,
           "default_phi": default_phi, "targets": t}
    plots.forgetting_bars(os.path.join(out, "ablations.png"), {**methods, **{f"phi={k}": v for k, v in phi.items()}},
                          "DES-MoE ablations")
    _write(out, res)
    return res


def _smooth(xs: list[float], w: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        win = xs[max(0, i - w + 1): i + 1]
        out.append(sum(win) / len(win))
    return out


def _avg_domain_curve(rec: dict) -> tuple[list[int], list[float]]:
    steps, vals = [], []
    for h in rec["history"]:
        v = [h[f"loss/{d}"] for d in rec["domains"] if f"loss/{d}" in h]
        if len(v) == len(rec["domains"]):
            steps.append(h["step"])
            vals.append(sum(v) / len(v))
    return steps, vals


def _avg_list(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def exp_convergence(spec: ExperimentSpec, out: str, log=print, window: int = 5) -> dict:
    """Steps / wall-clock for each method to reach FFT's final average training domain loss (smoothed over
    ``window`` logged points), from the forgetting runs' histories (no extra training)."""
    base = _base(spec, log)
    cells = _cells(spec, base["path"], spec.forgetting_methods, spec.domains, log)
    if "fft_mixed" not in cells:
        raise ValueError("convergence needs fft_mixed among forgetting_methods")
    fft_final = []
    for r in cells["fft_mixed"]["runs"]:
        _, v = _avg_domain_curve(r)
        if v:
            fft_final.append(_smooth(v, window)[-1])
    target = sum(fft_final) / len(fft_final)
    methods = {}
    for m, c in cells.items():
        blk = _block(c, spec.domains)
        st, secs, finals = [], [], []
        for r in c["runs"]:
            s, v = _avg_domain_curve(r)
            sm = _smooth(v, window)
            finals.append(sm[-1] if sm else None)
            hit = next((s[i] for i, x in enumerate(sm) if x <= target), None)
            st.append(hit)
            secs.append(None if hit is None else (hit + 1) * r["train_seconds"] / max(1, r["steps"]))
        reached = [x for x in st if x is not None]
        blk["convergence"] = {"target_avg_train_domain_loss": target, "final_avg_train_domain_loss": _avg_list(finals),
                              "steps_to_target": st,
                              "seconds_to_target": secs, "reached": f"{len(reached)}/{len(st)}",
                              "mean_steps_to_target": sum(reached) / len(reached) if reached else None,
                              "mean_seconds_to_target": (sum(x for x in secs if x is not None) / len(reached)
                                                         if reached else None)}
        methods[m] = blk
    res = {**_header("convergence", spec, base), "domains": spec.domains, "methods": methods,
           "note": f"target: fft_mixed's final training avg domain loss (moving average over {window} logged points, "
                   f"mean over seeds); a method that never reaches it has null steps"}
    plots.convergence_curves(os.path.join(out, "convergence.png"), {m: c["runs"] for m, c in cells.items()}, target, window)
    _write(out, res)
    return res


RUNNERS = {"forgetting": exp_forgetting, "scaling": exp_scaling, "single_vs_mixed": exp_single_vs_mixed,
           "ablations": exp_ablations, "convergence": exp_convergence}


def run_experiment(name: str, out: str, spec: ExperimentSpec, log=print) -> dict:
    """Run experiment ``name`` (or ``all``: each into ``out/<name>/``); returns its results dict."""
    if name == "all":
        t0 = time.time()
        res = {n: run_experiment(n, os.path.join(out, n), spec, log) for n in EXPERIMENTS}
        from .report import render

        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(render(out))
        log(f"all experiments done in {time.time() - t0:.0f}s")
        return res
    if name not in RUNNERS:
        raise ValueError(f"experiment name must be one of {EXPERIMENTS} or 'all', got {name!r}")
    t0 = time.time()
    log(f"experiment {name} -> {out}")
    res = RUNNERS[name](spec, out, log)
    log(f"experiment {name} done in {time.time() - t0:.0f}s: {os.path.join(out, 'results.json')}")
    return res
