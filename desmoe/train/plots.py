"""Heatmaps of the affinity matrix A and the DGES masks (matplotlib, imported lazily; skipped if missing)."""
from __future__ import annotations

import os


def affinity_figure(A_LME, masks_LME, domain_names, title: str = ""):
    """A matplotlib Figure: one row per layer, A (left) and mask (right); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:
        return None
    L, M, E = A_LME.shape
    fig, axes = plt.subplots(L, 2, figsize=(2 + 0.35 * E * 2, 0.9 + 0.35 * M * L + 0.4 * L), squeeze=False)
    for l in range(L):
        ax = axes[l][0]
        im = ax.imshow(A_LME[l].float().cpu().numpy(), aspect="auto", cmap="viridis")
        ax.set_title(f"layer {l}: A (domain x expert)", fontsize=8)
        ax.set_yticks(range(M), labels=list(domain_names), fontsize=7)
        ax.set_xticks(range(E), labels=[str(e) for e in range(E)], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax = axes[l][1]
        mask = masks_LME[l].float().cpu().numpy() if masks_LME is not None else A_LME[l].float().cpu().numpy() * 0
        ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1)
        ax.set_title(f"layer {l}: mask (black = may train)", fontsize=8)
        ax.set_yticks(range(M), labels=list(domain_names), fontsize=7)
        ax.set_xticks(range(E), labels=[str(e) for e in range(E)], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_affinity_png(path: str, A_LME, masks_LME, domain_names, title: str = "") -> str | None:
    """Write the heatmap PNG to ``path``; returns the path, or None when matplotlib is unavailable."""
    fig = affinity_figure(A_LME, masks_LME, domain_names, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
