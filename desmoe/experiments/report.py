"""Markdown tables from the experiments' results.json files: ``python -m desmoe.experiments.report DIR``
(DIR holds ``forgetting/``, ``scaling/`` ... as written by ``desmoe experiment all --out DIR``)."""
from __future__ import annotations

import json
import os
import sys


def _f(x, nd=3, sign=False):
    if x is None:
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _pm(blk, key, nd=3, sign=False):
    v, s = blk.get(key), blk["spread"].get(key)
    return _f(v, nd, sign) + ("" if s is None else f" ± {s:.{nd}f}")


def method_table(methods: dict, domains: list[str]) -> str:
    head = ["method", "LR", *domains, "avg domain loss", "forgetting (Δ general loss)", "math EM", "wall-clock s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, b in methods.items():
        lr = b.get("lr")
        lr = "per domain" if isinstance(lr, dict) else _f(lr, 4) if lr is not None else "–"
        rows.append("| " + " | ".join([m, lr, *[_f(b["domain_loss"].get(d)) for d in domains],
                                        _pm(b, "avg_domain_loss"), _pm(b, "general_loss_delta", sign=True),
                                        _f(b.get("math_exact_match"), 2), _f(b.get("wall_clock_s"), 0)]) + " |")
    return "\n".join(rows)


def render(root: str) -> str:
    out = []

    def load(name):
        p = os.path.join(root, name, "results.json")
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            return json.load(f)

    r = load("forgetting")
    if r:
        b = r["base"]
        mix = f"a mix {b['pretrain_mix']}" if b.get("pretrain_mix") else "general"
        out.append(f"**Base**: {b['n_params'] / 1e6:.2f}M params, {b['pretrain_steps']} pretraining steps on {mix} "
                   f"(held-out general loss {b['general_loss_random_init']:.2f} → {b['general_loss']:.3f}); seeds "
                   f"{r['seeds']}; mean ± sample std over seeds.\n")
        out.append("### Forgetting (5 domains mixed)\n\n" + method_table(r["methods"], r["domains"]))
        out.append("targets: " + json.dumps(r["targets"]))
        lrs = sorted({lr for b in r["methods"].values() for lr in b.get("lr_search", {})}, key=float)
        rows = ["| method (seed 0) | " + " | ".join(f"LR {lr}: avg loss / forgetting" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
        for m, b in r["methods"].items():
            g = b.get("lr_search_general_loss_delta", {})
            rows.append(f"| {m} | " + " | ".join(f"{_f(b['lr_search'].get(lr))} / {_f(g.get(lr), sign=True)}"
                                                 for lr in lrs) + " |")
        out.append("LR search (the trade-off each method offers):\n\n" + "\n".join(rows))
    r = load("single_vs_mixed")
    if r:
        out.append("### Single-domain vs mixed\n\n" + method_table(r["methods"], r["domains"]))
        out.append("targets: " + json.dumps(r["targets"]))
    r = load("scaling")
    if r:
        rows = ["| method | " + " | ".join(f"{n} domains: avg loss / forgetting" for n in r["domain_counts"]) +
                " | Δ avg loss | Δ loss on common domains | Δ forgetting |", "|---|" + "---|" * (len(r["domain_counts"]) + 3)]
        for m in r["methods"]:
            cells = [f"{_f(blk['methods'][m]['avg_domain_loss'])} / {_f(blk['methods'][m]['general_loss_delta'], sign=True)}"
                     for blk in r["domain_counts"].values()]
            dg = r["degradation"][m]
            rows.append(f"| {m} | " + " | ".join(cells) + f" | {_f(dg['avg_domain_loss_change'], sign=True)} | "
                        f"{_f(dg.get('common_domain_loss_change'), sign=True)} | "
                        f"{_f(dg['general_loss_delta_change'], sign=True)} |")
        out.append(f"### Scaling ({r['degradation']['from']} → {r['degradation']['to']} domains)\n\n" + "\n".join(rows))
        out.append("targets: " + json.dumps(r["targets"]))
    r = load("ablations")
    if r:
        meth = {**r["methods"], **{f"des_moe φ={k}": v for k, v in r.get("phi_sweep", {}).items()}}
        out.append("### Ablations\n\n" + method_table(meth, r["domains"]))
        out.append("targets: " + json.dumps(r["targets"]))
    r = load("convergence")
    if r:
        rows = ["| method | final train avg domain loss | reached FFT's final | mean steps | mean seconds |",
                "|---|---|---|---|---|"]
        for m, b in r["methods"].items():
            c = b["convergence"]
            rows.append(f"| {m} | {_f(c.get('final_avg_train_domain_loss'))} | {c['reached']} | "
                        f"{_f(c['mean_steps_to_target'], 0)} | {_f(c['mean_seconds_to_target'], 1)} |")
        out.append("### Convergence\n\n" + "\n".join(rows) + f"\n\n{r['note']}")
    for sub in sorted(os.listdir(root)):  # nested result sets (e.g. seen_tokens/ from another config)
        d = os.path.join(root, sub)
        if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, n, "results.json")) for n in os.listdir(d)
                                    if os.path.isdir(os.path.join(d, n))):
            out.append(f"## {sub}\n\n" + render(d))
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python -m desmoe.experiments.report RESULTS_DIR")
    print(render(sys.argv[1]))
