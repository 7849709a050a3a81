"""PNG plots of the experiments (matplotlib, Agg backend; every function is a no-op without matplotlib)."""
from __future__ import annotations

import os
import shutil


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        return plt
    except Exception:
        return None


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def forgetting_bars(path: str, methods: dict, title: str) -> str | None:
    """Two panels: forgetting (general loss increase) and average held-out domain loss, mean ± std over seeds."""
    plt = _plt()
    if plt is None or not methods:
        return None
    names = list(methods)
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.3 * len(names) + 3), 3.6))
    for ax, key, lab in ((axes[0], "general_loss_delta", "general loss increase (forgetting)"),
                         (axes[1], "avg_domain_loss", "avg held-out domain loss")):
        vals = [methods[m][key] for m in names]
        errs = [methods[m]["spread"][key] or 0.0 for m in names]
        ax.bar(range(len(names)), vals, yerr=errs, capsize=3,
               color=["tab:green" if m.startswith(("des_moe", "phi")) else "tab:gray" for m in names])
        ax.set_xticks(range(len(names)), labels=names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(lab, fontsize=8)
        if key == "avg_domain_loss":
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.5 * (hi - lo + 1e-3) - 0.02, hi + 0.5 * (hi - lo + 1e-3) + 0.02)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def scaling_lines(path: str, blocks: dict) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    counts = sorted(blocks, key=int)
    methods = list(blocks[counts[0]]["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for m in methods:
        for ax, key in ((axes[0], "avg_domain_loss"), (axes[1], "general_loss_delta")):
            ys = [blocks[c]["methods"][m][key] for c in counts]
            es = [blocks[c]["methods"][m]["spread"][key] or 0.0 for c in counts]
            ax.errorbar([int(c) for c in counts], ys, yerr=es, marker="o", capsize=3, label=m)
    axes[0].set_ylabel("avg held-out domain loss", fontsize=8)
    axes[1].set_ylabel("general loss increase (forgetting)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("number of fine-tuning domains", fontsize=8)
        ax.set_xticks([int(c) for c in counts])
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _phase_spans(ax, phases: dict | None):
    colors = {"warmup": "#fde0c5", "stabilization": "#d5e8d4", "consolidation": "#dae8fc"}
    for name, (a, b) in (phases or {}).items():
        if name in colors:
            ax.axvspan(a, b, color=colors[name], alpha=0.6, lw=0, label=name)


def loss_curves(path: str, runs_by_method: dict) -> str | None:
    """Training task loss of seed 0 per method; DES-MoE's phases shaded."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    des = runs_by_method.get("des_moe")
    if des:
        _phase_spans(ax, des[0].get("phases"))
    from .experiments import _smooth

    for m, runs in runs_by_method.items():
        h = runs[0]["history"]
        ax.plot([x["step"] for x in h], _smooth([x["task"] for x in h], 5), label=m, lw=1.4 if m == "des_moe" else 0.9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("training task loss (mixed batch, MA5, seed 0)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def convergence_curves(path: str, runs_by_method: dict, target: float, window: int) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    from .experiments import _avg_domain_curve, _smooth

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for m, runs in runs_by_method.items():
        s, v = _avg_domain_curve(runs[0])
        ax.plot(s, _smooth(v, window), label=m, lw=1)
    ax.axhline(target, color="k", ls="--", lw=0.8, label="FFT final")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(f"avg training domain loss (MA{window})", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def copy_affinity(record: dict, dest: str) -> str | None:
    """The trainer's final affinity/mask heatmap (A per layer, DGES masks) of one run, copied to ``dest``."""
    src = record.get("affinity_png")
    if not src or not os.path.isfile(src):
        return None
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    shutil.copyfile(src, dest)
    return dest
