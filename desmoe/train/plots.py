"""Heatmaps of the affinity matrix A and the DGES masks (matplotlib, imported lazily; skipped if missing)."""
from __future__ import annotations

import json
import os


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def _expert_ticks(E: int) -> list[int]:
    """At most ~16 labelled expert ticks so that labels stay readable at 64-128 experts."""
    step = max(1, -(-E // 16))
    return list(range(0, E, step))


def _heat_axes(ax, M: int, E: int, domain_names, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(M), labels=list(domain_names), fontsize=9)
    ticks = _expert_ticks(E)
    ax.set_xticks(ticks, labels=[str(e) for e in ticks], fontsize=9)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("domain", fontsize=9)


def affinity_figure(A_LME, masks_LME, domain_names, title: str = ""):
    """A matplotlib Figure: one row per layer, A (left) and mask (right); None if matplotlib is missing."""
    plt = _matplotlib()
    if plt is None:
        return None
    L, M, E = A_LME.shape
    width = min(24.0, 3.0 + 0.22 * E * 2)
    fig, axes = plt.subplots(L, 2, figsize=(width, 1.2 + (0.35 * M + 1.0) * L), squeeze=False)
    for l in range(L):
        ax = axes[l][0]
        im = ax.imshow(A_LME[l].float().cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        _heat_axes(ax, M, E, domain_names, f"layer {l}: affinity A (share of the domain's tokens)")
        cb = fig.colorbar(im, ax=ax, fraction=0.04)
        cb.ax.tick_params(labelsize=8)
        ax = axes[l][1]
        mask = masks_LME[l].float().cpu().numpy() if masks_LME is not None else A_LME[l].float().cpu().numpy() * 0
        ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        _heat_axes(ax, M, E, domain_names, f"layer {l}: mask (black = may train)")
        # cell borders, so single experts can be read off the mask
        ax.set_xticks([e - 0.5 for e in range(1, E)], minor=True)
        ax.set_yticks([m - 0.5 for m in range(1, M)], minor=True)
        ax.grid(which="minor", color="tab:gray", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_affinity_png(path: str, A_LME, masks_LME, domain_names, title: str = "") -> str | None:
    """Write the heatmap PNG to ``path``; returns the path, or None when matplotlib is unavailable."""
    return _save(affinity_figure(A_LME, masks_LME, domain_names, title), path)


def _save(fig, path: str) -> str | None:
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_history(path: str) -> list[dict]:
    """The rows of a run's ``history.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve_figure(rows: list[dict], title: str = ""):
    """Training curves of one run: task loss and KD loss (left), lambda (right axis), and per-domain training
    loss (second panel). None if matplotlib is missing or there are no step rows."""
    plt = _matplotlib()
    rows = [r for r in rows if "step" in r and "task" in r]
    if plt is None or not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(steps, [r["task"] for r in rows], label="task loss", color="tab:blue")
    if any(r.get("kd") for r in rows):
        ax.plot(steps, [r.get("kd", 0.0) for r in rows], label="KD loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(r.get("lambda") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("lambda") or 0.0 for r in rows], label="lambda (KD weight)", color="tab:green",
                 linestyle="--")
        ax2.set_ylabel("lambda")
        ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=9, loc="upper right")
    ax.set_title("training loss", fontsize=10)
    domains = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("loss/")})
    for d in domains:
        pts = [(r["step"], r[f"loss/{d}"]) for r in rows if f"loss/{d}" in r]
        axd.plot([p[0] for p in pts], [p[1] for p in pts], label=d)
    axd.set_xlabel("step")
    axd.set_ylabel("task loss on the domain's training tokens")
    axd.set_title("per-domain training loss", fontsize=10)
    axd.grid(alpha=0.3)
    if domains:
        axd.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_loss_curve_png(history_path: str, path: str, title: str = "") -> str | None:
    """Write the run's loss curves (from ``history.jsonl``) to ``path``; None without matplotlib or rows."""
    if not os.path.exists(history_path):
        return None
    return _save(loss_curve_figure(read_history(history_path), title), path)


class Scalars:
    """TensorBoard writer if ``tensorboard`` is importable, else a no-op (never an error)."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self.w = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.w = SummaryWriter(log_dir)
            except Exception:
                self.w = None

    def scalars(self, step: int, values: dict) -> None:
        if self.w is not None:
            for k, v in values.items():
                if v is not None:
                    self.w.add_scalar(k, float(v), step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.w is not None and fig is not None:
            self.w.add_figure(tag, fig, step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
