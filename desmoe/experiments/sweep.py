"""Where does the paper's claim appear, if anywhere? ``desmoe experiment sweep``: one experiment over bases
pretrained for longer (experts more or less specialized), each measured and compared the same way.

A sweep config (``configs/experiments/sweep.yaml``) names an experiment config (the base recipe, fine-tuning
settings, domains and seeds: ``paper.yaml``, whose runs it shares) and lists the bases' ``pretrain_steps``, the
methods and an LR ladder. For each base, in order:

1. the base's specialization (:func:`desmoe.experiments.base.base_specialization`: I(domain; expert), ESFT
   concentration, DGES-mask overlap, layer means);
2. each method's LR searched on **validation**: three rungs of the ladder around its start (the config's
   ``start_lrs`` on the first base, the LR chosen on the previous base after that), one more rung added on a side
   while the chosen LR is the grid's edge there, so the choice always has a tried rung on each side (or is the
   ladder's end);
3. the Pareto experiment on those grids and the scaling experiment at the chosen LRs (``OUT/base-<steps>/``), on
   **test**;
4. DES-MoE minus FFT at matched forgetting and at matched domain loss (read off each method's frontier over its LR
   grid, at each of the two methods' own chosen levels) with the paired per-seed spread, and the report's claim
   verdicts (:func:`desmoe.experiments.report.claims`).

``OUT/results.json`` holds every base's figures (written after each base: a stopped sweep keeps what it finished),
``OUT/sweep.png`` plots DES-MoE − FFT at matched forgetting against the base's specialization, ``OUT/timing.json``
the wall time of every invocation. Runs and bases are cached (a base build continues where it stopped).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from . import plots
from . import report as R
from .runner import pinned_corpora
from .spec import CONFIG_DIR, ExperimentSpec, load_spec

DEFAULT_SWEEP = "sweep.yaml"
QUICK_SWEEP = "sweep_quick.yaml"
REQUIRED = ("des_moe", "fft_mixed")


@dataclasses.dataclass
class SweepSpec:
    experiment: str
    pretrain_steps: list
    methods: list
    single_methods: list
    start_lrs: dict
    lr_ladder: list
    source: str = "sweep config"

    def __post_init__(self):
        s = self.source
        st = self.pretrain_steps
        if (not isinstance(st, list) or not st or len(set(st)) != len(st)
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in st)):
            raise ValueError(f"{s}: pretrain_steps must be a non-empty list of distinct ints >= 1, got {st!r}")
        lad = self.lr_ladder
        if (not isinstance(lad, list) or len(lad) < 3 or sorted(set(lad)) != lad
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in lad)):
            raise ValueError(f"{s}: lr_ladder must be an increasing list of at least 3 distinct numbers > 0, "
                             f"got {lad!r}")
        for k in ("methods", "single_methods"):
            v = getattr(self, k)
            if not isinstance(v, list) or any(not isinstance(m, str) for m in v) or len(set(v)) != len(v):
                raise ValueError(f"{s}: {k} must be a list of distinct method names, got {v!r}")
        missing = [m for m in REQUIRED if m not in self.methods]
        if missing:
            raise ValueError(f"{s}: methods must include {list(REQUIRED)} (the compared pair), missing {missing}")
        if not isinstance(self.start_lrs, dict):
            raise ValueError(f"{s}: start_lrs must be a mapping method -> LR, got {self.start_lrs!r}")
        for m in [*self.methods, *self.single_methods]:
            lr = self.start_lrs.get(m)
            if lr not in lad:
                raise ValueError(f"{s}: start_lrs.{m} must be one of lr_ladder {lad}, got {lr!r}")
        extra = set(self.start_lrs) - set(self.methods) - set(self.single_methods)
        if extra:
            raise ValueError(f"{s}: start_lrs names methods the sweep does not run: {sorted(extra)}")


def load_sweep(path: str | None = None, *, quick: bool = False,
               seeds: int | None = None) -> tuple[SweepSpec, ExperimentSpec]:
    """The sweep config at ``path`` (default ``configs/experiments/sweep.yaml``; ``sweep_quick.yaml`` with
    ``quick``) and the experiment spec it names (``experiment``, relative to the sweep config's folder), with the
    sweep's methods and ladder."""
    from ..train.config import read_yaml

    if path is None:
        path = os.path.join(CONFIG_DIR, QUICK_SWEEP if quick else DEFAULT_SWEEP)
    d = read_yaml(path, "--config: sweep config")
    if not isinstance(d, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping at the top level")
    fields = {f.name for f in dataclasses.fields(SweepSpec)} - {"source"}
    if set(d) - fields or fields - set(d):
        raise ValueError(f"{path}: a sweep config has exactly the keys {sorted(fields)}; unknown "
                         f"{sorted(set(d) - fields)}, missing {sorted(fields - set(d))}")
    sw = SweepSpec(**d, source=path)
    if not isinstance(sw.experiment, str):
        raise ValueError(f"{path}: experiment must be the path of an experiment config, got {sw.experiment!r}")
    exp_path = os.path.join(os.path.dirname(os.path.abspath(path)), sw.experiment)
    if not os.path.isfile(exp_path):
        raise FileNotFoundError(f"{path}: experiment {sw.experiment!r}: no such file {exp_path}")
    spec = load_spec(exp_path, seeds=seeds)
    spec = dataclasses.replace(spec, pareto_methods=list(sw.methods), single_methods=list(sw.single_methods),
                               lrs=list(sw.lr_ladder), variants={}, source=exp_path)
    return sw, spec


def around(ladder: list, lr: float) -> list:
    """Three rungs of ``ladder`` centred on ``lr``'s (two-and-one at the ladder's ends)."""
    i = ladder.index(lr)
    lo = min(max(0, i - 1), len(ladder) - 3)
    return list(ladder[lo:lo + 3])


def widen(grids: dict, chosen: dict, ladder: list) -> bool:
    """Add one rung on each side where a method's chosen LR is its grid's edge and the ladder goes on; True if
    any grid grew (in place)."""
    grew = False
    for m, g in grids.items():
        i = ladder.index(chosen[m])
        for edge, j in ((min(g), i - 1), (max(g), i + 1)):
            if chosen[m] == edge and 0 <= j < len(ladder) and ladder[j] not in g:
                g.append(ladder[j])
                grew = True
    return grew


def versus(p: dict) -> dict:
    """DES-MoE − FFT, from a Pareto result: domain loss at matched forgetting and forgetting at matched domain
    loss, at each method's own chosen level (``<kind>@<ref>``), with the paired per-seed spread (std over seeds of
    the per-seed differences; the experiment's median paired spread where fewer than 2 seeds reach both).
    ``resolved``: |delta| > 2 × spread. ``advantage_bound``: the most DES-MoE can be better by (lower loss or
    less forgetting) within that interval, 0 if none."""
    M, res, out = p["methods"], p["resolution"], {}
    for kind, what, fallback in (("at_matched_forgetting", "domain_loss", "paired_diff_sd_median"),
                                 ("at_matched_domain_loss", "forgetting", R.FORG)):
        for ref in REQUIRED:
            a, b = M["des_moe"][kind][ref], M["fft_mixed"][kind][ref]
            d = None if a["value"] is None or b["value"] is None else a["value"] - b["value"]
            sd = R.paired_sd(a.get("per_seed"), b.get("per_seed"))
            sd_used = sd if sd is not None else res.get(fallback)
            out[f"{kind}@{ref}"] = {
                "what": what, "level_of": ref, "des_moe": a["value"], "fft_mixed": b["value"], "delta": d,
                "paired_sd": sd, "spread_used": sd_used,
                "resolved": d is not None and R._resolved(d, {fallback: sd_used}, fallback),
                "advantage_bound": None if d is None or sd_used is None else max(0.0, 2 * sd_used - d)}
    return out


def growth(s: dict) -> dict:
    """Per scaling method: forgetting at the fewest and the most domains, its absolute change and its relative
    growth (most / fewest), and the common-domain loss change."""
    out = {}
    for m, b in s["methods"].items():
        lo, hi = b["per_count"][str(s["counts"][0])], b["per_count"][str(s["counts"][-1])]
        out[m] = {"forgetting_from": lo["forgetting"], "forgetting_to": hi["forgetting"],
                  "forgetting_change": b["change"]["forgetting"], "forgetting_change_sd": b["change"]["forgetting_sd"],
                  "forgetting_ratio": hi["forgetting"] / lo["forgetting"] if lo["forgetting"] > 0 else None,
                  "common_loss_change": b["change"]["common_domain_loss"],
                  "common_loss_change_sd": b["change"]["common_domain_loss_sd"]}
    return out


def _base_block(steps: int, p: dict, s: dict, grids: dict, rounds: int) -> dict:
    b = p["base"]
    return {"pretrain_steps": steps, "general_loss": b["general_loss"], "n_params": b["n_params"],
            "base_seconds": b.get("seconds"), "specialization": b.get("specialization"),
            "lr_grids": {m: sorted(g) for m, g in grids.items()}, "search_rounds": rounds,
            "selected": {m: {"lr": v["selected_lr"], "avg_domain_loss": v["selected"]["avg_domain_loss"],
                             "forgetting": v["selected"]["forgetting"]} for m, v in p["methods"].items()},
            "versus": versus(p), "scaling": growth(s), "resolution": p["resolution"],
            "claims": [dict(zip(("claim", "paper", "ours", "verdict"), r)) for r in R.claims(p, s)]}


def overall(bases: list[dict]) -> dict:
    """Across bases: where DES-MoE beats FFT by a resolved margin (at matched forgetting: lower domain loss; at
    matched domain loss: less forgetting), and otherwise the largest advantage the data leave room for."""
    out = {}
    for key in ("at_matched_forgetting@fft_mixed", "at_matched_forgetting@des_moe",
                "at_matched_domain_loss@fft_mixed", "at_matched_domain_loss@des_moe"):
        rows = [(b["pretrain_steps"], b["versus"][key]) for b in bases]
        wins = [n for n, v in rows if v["delta"] is not None and v["delta"] < 0 and v["resolved"]]
        losses = [n for n, v in rows if v["delta"] is not None and v["delta"] > 0 and v["resolved"]]
        bounds = [v["advantage_bound"] for _, v in rows if v["advantage_bound"] is not None]
        out[key] = {"des_moe_better_at": wins, "fft_better_at": losses,
                    "largest_possible_des_moe_advantage": max(bounds) if bounds else None}
    return out


def run_sweep(sw: SweepSpec, spec: ExperimentSpec, out: str, log=print, workers: int = 1) -> dict:
    from .experiments import _n_records, _rel, git_sha, versions

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an int >= 1, got {workers!r}")
    os.makedirs(out, exist_ok=True)
    t0, n0 = time.time(), _n_records(spec)
    starts = dict(sw.start_lrs)
    bases = []
    res = {"experiment": "sweep", "config": _rel(sw.source), "experiment_config": _rel(spec.source),
           "versions": versions(), "git_sha": git_sha(), "seeds": list(range(spec.seeds)),
           "split": {"select": "validation", "report": "test"}, "lr_ladder": sw.lr_ladder,
           "planned_pretrain_steps": sorted(sw.pretrain_steps), "bases": bases}
    with pinned_corpora(spec) as fp:
        res["corpora_fingerprint"] = fp
        _sweep_bases(sw, spec, out, res, bases, starts, log, workers, t0)
    _timing(out, sw, workers, time.time() - t0, _n_records(spec) - n0)
    return res


def render_outputs(out: str, res: dict | None = None) -> None:
    """``OUT/sweep.png`` and ``OUT/summary.md`` from ``OUT/results.json`` (written after every finished base, so a
    stopped sweep leaves them for what it finished): ``python -m desmoe.experiments.sweep OUT`` redraws them."""
    if res is None:
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
    plots.sweep(os.path.join(out, "sweep.png"), res["bases"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(R.sweep_md(res))


def _sweep_bases(sw, spec, out, res, bases, starts, log, workers, t0) -> None:
    from .experiments import exp_pareto, exp_scaling

    for steps in sorted(sw.pretrain_steps):
        sp = dataclasses.replace(spec, base={**spec.base, "pretrain_steps": steps})
        bout = os.path.join(out, f"base-{steps}")
        grids = {m: around(sw.lr_ladder, starts[m]) for m in [*sw.methods, *sw.single_methods]}
        rounds = 0
        while True:
            rounds += 1
            log(f"sweep: base {steps} steps, LR search round {rounds}: {grids}")
            p = exp_pareto(sp, os.path.join(bout, "pareto"), log, workers, lrs=grids)
            chosen = {m: p["methods"][m]["selected_lr"] for m in grids}
            if not widen(grids, chosen, sw.lr_ladder):
                break
        s = exp_scaling(sp, os.path.join(bout, "scaling"), log, workers,
                        lrs={m: chosen[m] for m in sp.scaling_methods})
        bases.append(_base_block(steps, p, s, grids, rounds))
        starts.update(chosen)
        res["overall"] = overall(bases)
        b = bases[-1]
        b["invocation_seconds_when_done"] = time.time() - t0  # this invocation's wall time up to this base
        _write_json(os.path.join(out, "results.json"), res)
        render_outputs(out, res)
        log(f"sweep: base {steps} done ({b['invocation_seconds_when_done']:.0f}s so far)")


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _timing(out: str, sw: SweepSpec, workers: int, secs: float, computed: int) -> None:
    """Every invocation's wall time and the runs it computed (one that finds everything cached adds nothing)."""
    from .experiments import _rel

    p = os.path.join(out, "timing.json")
    old = json.load(open(p)) if os.path.isfile(p) else {"invocations": []}
    if computed > 0 or not old["invocations"]:
        old["invocations"].append({"command": "desmoe experiment sweep", "config": _rel(sw.source),
                                   "workers": workers, "seconds": secs, "runs_computed": computed})
    old["seconds"] = sum(r["seconds"] for r in old["invocations"])
    old["note"] = ("wall time of each invocation that computed runs (bases are built once and cached; a base's "
                   "build time is in results.json as base_seconds)")
    _write_json(p, old)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "results.json")):
        sys.exit("usage: python -m desmoe.experiments.sweep SWEEP_OUT_DIR (a folder holding a sweep's results.json)")
    render_outputs(sys.argv[1])
