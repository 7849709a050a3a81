"""Pictures a person can read: heatmaps with axis titles, readable ticks and a grid in the mask panel; a loss curve
per run (task, KD, lambda, per-domain loss) written beside the heatmaps."""
import json
import os

import pytest
import torch

pytest.importorskip("matplotlib")

from desmoe.train.plots import affinity_figure, loss_curve_figure, read_history, save_loss_curve_png  # noqa: E402
from desmoe.train.trainer import run  # noqa: E402

from test_train import tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("E", [8, 128])
def test_heatmap_axes_are_titled_readable_and_the_mask_has_a_grid(E):
    import matplotlib.pyplot as plt

    L, M = 2, 3
    A = torch.rand(L, M, E)
    masks = A > 0.5
    fig = affinity_figure(A, masks, ["math", "code", "law"], title="t")
    try:
        axes = [ax for ax in fig.axes if ax.get_images()]  # the heatmaps, not the colour bars
        assert len(axes) == 2 * L
        for ax in axes:
            assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "domain"
            labels = ax.get_xticklabels()
            assert 1 <= len(labels) <= 16  # readable at 128 experts
            assert all(t.get_fontsize() >= 8 for t in labels + ax.get_yticklabels())
            assert [t.get_text() for t in ax.get_yticklabels()] == ["math", "code", "law"]
        mask_axes = axes[1::2]
        for ax in mask_axes:
            minor = ax.get_xticks(minor=True)
            assert len(minor) == E - 1  # one grid line between each pair of experts
            assert all(t.gridline.get_visible() for t in ax.xaxis.get_minor_ticks())
    finally:
        plt.close(fig)


def _history(path, n=12, kd=True):
    with open(path, "w") as f:
        for s in range(n):
            row = {"step": s, "phase": "warmup", "task": 5.0 - 0.1 * s, "kd": (0.2 if kd else 0.0),
                   "lambda": max(0.0, 1 - s / n), "loss/math": 5.1 - 0.1 * s, "loss/code": 4.9 - 0.05 * s}
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 99, "ta')  # torn last line of a killed run


def test_loss_curve_plots_task_kd_lambda_and_domains(tmp_path):
    import matplotlib.pyplot as plt

    h = tmp_path / "history.jsonl"
    _history(h)
    rows = read_history(str(h))
    assert len(rows) == 12  # the torn line is skipped
    fig = loss_curve_figure(rows)
    try:
        labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
        assert {"task loss", "KD loss", "lambda (KD weight)", "math", "code"} <= labels
        assert all(ax.get_xlabel() == "step" for ax in fig.axes if ax.get_lines() and ax.get_xlabel())
    finally:
        plt.close(fig)
    out = save_loss_curve_png(str(h), str(tmp_path / "plots" / "loss_curve.png"))
    assert out and os.path.getsize(out) > 1000
    assert save_loss_curve_png(str(tmp_path / "missing.jsonl"), str(tmp_path / "x.png")) is None


def test_a_run_with_plots_writes_its_loss_curve(tmp_path):
    cfg = tiny_cfg(str(tmp_path), max_steps=4, plots=True)
    from desmoe.train import config_from_dict

    run(config_from_dict(cfg), str(tmp_path / "run"))
    png = tmp_path / "run" / "plots" / "loss_curve.png"
    assert png.exists() and png.stat().st_size > 1000
