"""PNG plots of the experiments (matplotlib, Agg backend; every function is a no-op without matplotlib)."""
from __future__ import annotations

import os


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


def _colors(names):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"] if len(names) <= 10 else matplotlib.colormaps["tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def pareto(path: str, methods: dict, title: str) -> str | None:
    """Domain loss against forgetting, test (left) and validation (right): every run as a dot, the per-LR means
    joined in LR order and labelled with the LR, each method's validation-selected LR circled."""
    plt = _plt()
    if plt is None or not methods:
        return None
    col = _colors(list(methods))
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, sfx, split in ((axes[0], "", "test"), (axes[1], "_val", "validation")):
        for m, b in methods.items():
            pts = b["points"]
            ax.scatter([p["forgetting" + sfx] for p in pts], [p["domain_loss" + sfx] for p in pts], s=10,
                       color=col[m], alpha=0.35)
            rows = b["lr_means"]
            xs, ys = [r["forgetting" + sfx] for r in rows], [r["domain_loss" + sfx] for r in rows]
            ax.plot(xs, ys, "-o", color=col[m], ms=4, lw=1.3, label=m)
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r['lr']:g}", (x, y), fontsize=6, color=col[m], xytext=(2, 2), textcoords="offset points")
                if r["lr"] == b["selected_lr"]:
                    ax.scatter([x], [y], s=90, facecolors="none", edgecolors=col[m], linewidths=1.5)
        ax.set_xlabel(f"forgetting (Δ general loss, {split})")
        ax.set_ylabel(f"average domain loss ({split})")
        ax.set_title(f"{title} — {split}" + (" (reported)" if split == "test" else " (selection)"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def wall_clock(path: str, curves: dict, target: float) -> str | None:
    """Validation average domain loss against training seconds (seed 0 at each method's selected LR), with the
    target (FFT's final validation loss)."""
    plt = _plt()
    if plt is None or not curves:
        return None
    col = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(8, 5))
    for m, c in curves.items():
        if c:
            ax.plot([r["train_s"] for r in c], [r["val_avg"] for r in c], "-o", ms=3, color=col[m], label=m)
    ax.axhline(target, color="k", ls="--", lw=1, label="FFT's final validation loss")
    ax.set_xlabel("training seconds (1 CPU thread)")
    ax.set_ylabel("validation average domain loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def scaling(path: str, counts: list[int], methods: dict, common: list[str]) -> str | None:
    """Loss on the common domains and forgetting against the number of domains (mean ± std over seeds)."""
    plt = _plt()
    if plt is None or not methods:
        return None
    col = _colors(list(methods))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m, b in methods.items():
        per = [b["per_count"][str(n)] for n in counts]
        axes[0].errorbar(counts, [p["common_domain_loss"] for p in per], yerr=[p["common_domain_loss_sd"] for p in per],
                         fmt="-o", color=col[m], label=m, capsize=3)
        axes[1].errorbar(counts, [p["forgetting"] for p in per], yerr=[p["forgetting_sd"] for p in per], fmt="-o",
                         color=col[m], label=m, capsize=3)
    axes[0].set_ylabel(f"test loss on {', '.join(common)}")
    axes[1].set_ylabel("forgetting (Δ general loss, test)")
    for ax in axes:
        ax.set_xlabel("domains in the mix (fixed steps per domain)")
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def sweep(path: str, bases: list[dict]) -> str | None:
    """DES-MoE − FFT against the base's specialization (normalised I(domain; expert)), one point per base with
    twice the paired per-seed spread as error bars: domain loss at FFT's and at DES-MoE's forgetting (left),
    forgetting at their domain losses (right). Below zero: DES-MoE better."""
    plt = _plt()
    pts = [b for b in bases if (b.get("specialization") or {}).get("mi_norm") is not None]
    if plt is None or not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, kind, what in ((axes[0], "at_matched_forgetting", "domain loss at matched forgetting"),
                           (axes[1], "at_matched_domain_loss", "forgetting at matched domain loss")):
        for ref, mk, dx in (("fft_mixed", "o", -0.0005), ("des_moe", "s", 0.0005)):  # dodged apart
            xs, ys, es, labels = [], [], [], []
            for b in pts:
                v = b["versus"][f"{kind}@{ref}"]
                if v["delta"] is None:
                    continue
                xs.append(b["specialization"]["mi_norm"] + dx)
                ys.append(v["delta"])
                es.append(2 * (v["spread_used"] or 0))
                labels.append(f"{b['pretrain_steps']}")
            ax.errorbar(xs, ys, yerr=es, fmt=mk + "-", capsize=3, label=f"at {ref}'s level")
            for x, y, t in zip(xs, ys, labels):
                ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("base specialization: I(domain; expert) / H(domain), mean over layers (series dodged ±0.0005)")
        ax.set_ylabel(f"DES-MoE − FFT, {what} (test)")
        ax.set_title(f"{what} (labels: pretraining steps)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
