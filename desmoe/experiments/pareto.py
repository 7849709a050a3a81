"""The analysis of the Pareto experiment: pure functions of the runs' points (no training here).

A *point* is one run (method, LR, seed): average held-out domain loss (lower is better) and forgetting (held-out
general loss after minus before; lower is better), each on the test split and on the validation split. Choices
(LR per method, the reference levels) are made on validation; what is reported is test.

"Domain loss at matched forgetting f" is the lowest domain loss a method reaches with forgetting ≤ f, read off its
Pareto frontier (the non-dominated points, joined linearly: LRs between the grid's would land near those lines);
it is flat beyond the frontier's most-forgetting end (more allowed forgetting does not help) and undefined (None)
below its least-forgetting end (the method cannot forget that little). "Forgetting at matched domain loss L" is
the same read the other way: the least forgetting with domain loss ≤ L; None when the method never gets to L.
"""
from __future__ import annotations

import math


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sd(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def frontier(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated ``(domain_loss, forgetting)`` points, sorted by forgetting ascending (so domain loss is
    descending); a point is dominated when another is no worse in both and better in one."""
    pts = sorted(set(pts), key=lambda p: (p[1], p[0]))
    out: list[tuple[float, float]] = []
    for p in pts:  # forgetting ascending: keep a point only if it beats every kept point's loss
        if not out or p[0] < out[-1][0]:
            out.append(p)
    return out


def _interp(x, x0, y0, x1, y1):
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def loss_at_forgetting(front: list[tuple[float, float]], f: float) -> float | None:
    """Lowest domain loss with forgetting ≤ ``f`` on ``front`` (from :func:`frontier`); None if out of reach."""
    if not front or f < front[0][1]:
        return None
    for (l0, f0), (l1, f1) in zip(front, front[1:]):
        if f0 <= f <= f1:
            return _interp(f, f0, l0, f1, l1)
    return front[-1][0]


def forgetting_at_loss(front: list[tuple[float, float]], loss: float) -> float | None:
    """Least forgetting with domain loss ≤ ``loss`` on ``front``; None if the method never gets that low."""
    if not front or loss < front[-1][0]:
        return None
    if loss >= front[0][0]:
        return front[0][1]
    for (l0, f0), (l1, f1) in zip(front, front[1:]):
        if l1 <= loss <= l0:
            return _interp(loss, l0, f0, l1, f1)
    return None  # unreachable: the frontier covers [front[-1][0], front[0][0]]


def by_lr(points: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for p in points:
        out.setdefault(p["lr"], []).append(p)
    return dict(sorted(out.items()))


def lr_means(points: list[dict]) -> list[dict]:
    """Per LR: mean ± sample std over seeds of the four numbers of the points."""
    rows = []
    for lr, ps in by_lr(points).items():
        row = {"lr": lr, "n_seeds": len(ps)}
        for k in ("domain_loss", "forgetting", "domain_loss_val", "forgetting_val"):
            row[k], row[k + "_sd"] = mean([p[k] for p in ps]), sd([p[k] for p in ps])
        rows.append(row)
    return rows


def select_lr(points: list[dict]) -> float:
    """The LR with the lowest mean validation domain loss (ties: the smaller LR)."""
    rows = lr_means(points)
    return min(rows, key=lambda r: (r["domain_loss_val"], r["lr"]))["lr"]


def matched(points: list[dict], *, forgetting: float | None = None, loss: float | None = None,
            split: str = "test") -> dict:
    """Domain loss at matched ``forgetting`` (or forgetting at matched ``loss``) on ``split``: from the frontier of
    the per-LR means, and per seed from that seed's own frontier (mean ± std over the seeds that reach it)."""
    if (forgetting is None) == (loss is None):
        raise ValueError("matched: give exactly one of forgetting= and loss=")
    sfx = "" if split == "test" else "_val"
    read = ((lambda fr: loss_at_forgetting(fr, forgetting)) if loss is None
            else (lambda fr: forgetting_at_loss(fr, loss)))
    mean_front = frontier([(r["domain_loss" + sfx], r["forgetting" + sfx]) for r in lr_means(points)])
    seeds: dict[int, list[dict]] = {}
    for p in points:
        seeds.setdefault(p["seed"], []).append(p)
    per_seed = {s: read(frontier([(p["domain_loss" + sfx], p["forgetting" + sfx]) for p in ps]))
                for s, ps in sorted(seeds.items())}
    got = [v for v in per_seed.values() if v is not None]
    return {"value": read(mean_front), "per_seed": per_seed, "seed_mean": mean(got), "seed_sd": sd(got),
            "seeds_reaching": f"{len(got)}/{len(per_seed)}"}


def time_to_target(curves: list[list[dict]], target) -> dict:
    """Steps and training seconds until a validation curve (``[{"step", "train_s", "val_avg"}]`` per seed) first
    gets to its target or below (``target``: one number, or one per curve — the paired seed's); None for a seed
    that never does."""
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(curves)
    if len(targets) != len(curves):
        raise ValueError(f"time_to_target: {len(targets)} targets for {len(curves)} curves")
    steps, secs = [], []
    for c, t in zip(curves, targets):
        hit = next((r for r in c if r["val_avg"] <= t), None)
        steps.append(None if hit is None else hit["step"] + 1)
        secs.append(None if hit is None else hit["train_s"])
    got = [s for s in steps if s is not None]
    return {"target": target, "steps": steps, "seconds": secs, "reached": f"{len(got)}/{len(steps)}",
            "mean_steps": mean(steps) if len(got) == len(steps) else None,
            "mean_seconds": mean(secs) if len(got) == len(steps) else None}


def _paired_sd(a: list[dict], b: list[dict], key: str) -> float | None:
    """Median over LRs of the std over seeds of ``a[key] - b[key]`` at the same LR and seed."""
    other = {(p["lr"], p["seed"]): p[key] for p in b}
    diffs: dict[float, list[float]] = {}
    for p in a:
        if (p["lr"], p["seed"]) in other:
            diffs.setdefault(p["lr"], []).append(p[key] - other[(p["lr"], p["seed"])])
    sds = sorted(sd(v) for v in diffs.values() if len(v) > 1)
    return sds[len(sds) // 2] if sds else None


def resolution(points_by_method: dict[str, list[dict]], se_avg: float | None, pair: tuple[str, str]) -> dict:
    """Can a 0.01 difference in average domain loss be told apart? The seed spread (std over seeds at one method
    and LR, median over them), the paired spread (std over seeds of the difference between ``pair``'s two methods
    at the same LR and seed, median over LRs; also for forgetting) and the evaluation's own standard error
    ``se_avg``."""
    sds = sorted(sd([p["domain_loss"] for p in ps]) for pts in points_by_method.values()
                 for ps in by_lr(pts).values() if len(ps) > 1)
    a, b = (points_by_method.get(m, []) for m in pair)
    seed_sd = sds[len(sds) // 2] if sds else None
    pair_sd, pair_f_sd = _paired_sd(a, b, "domain_loss"), _paired_sd(a, b, "forgetting")
    worst = max([x for x in (seed_sd, se_avg) if x is not None], default=None)
    return {"seed_sd_median": seed_sd, "paired_diff_sd_median": pair_sd,
            "paired_forgetting_diff_sd_median": pair_f_sd, "pair": list(pair),
            "eval_se_avg_domain_loss": se_avg,
            "resolves_0.01_unpaired": None if worst is None else 2 * worst < 0.01,
            "resolves_0.01_paired": None if pair_sd is None else 2 * pair_sd < 0.01,
            "criterion": "a difference resolves when it exceeds twice the spread (about a 95% interval)"}
