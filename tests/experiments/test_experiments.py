"""``desmoe experiment``: the Pareto analysis (frontier, matched comparisons, selection on validation, time to
target, resolution), quick mode end to end (results.json in its documented format, plots, cache reuse, pairing), the
README's generated Results block, and bad input (exit 2 / ValueError naming the key)."""
import json
import os

import pytest
import yaml

from desmoe.cli import main
from desmoe.experiments import METHOD_NAMES, load_spec
from desmoe.experiments import pareto as P
from desmoe.experiments.spec import CONFIG_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pt(lr, seed, loss, forg, loss_val=None, forg_val=None):
    return {"lr": lr, "seed": seed, "domain_loss": loss, "forgetting": forg,
            "domain_loss_val": loss if loss_val is None else loss_val,
            "forgetting_val": forg if forg_val is None else forg_val}


def test_frontier_drops_dominated_points():
    pts = [(4.0, 0.1), (3.5, 0.3), (3.8, 0.35), (3.0, 0.5), (3.0, 0.6)]
    assert P.frontier(pts) == [(4.0, 0.1), (3.5, 0.3), (3.0, 0.5)]


def test_matched_reads_of_the_frontier():
    front = [(4.0, 0.1), (3.5, 0.3), (3.0, 0.5)]
    assert P.loss_at_forgetting(front, 0.2) == pytest.approx(3.75)
    assert P.loss_at_forgetting(front, 0.05) is None  # cannot forget that little
    assert P.loss_at_forgetting(front, 0.9) == pytest.approx(3.0)  # more forgetting allowed does not help
    assert P.forgetting_at_loss(front, 3.25) == pytest.approx(0.4)
    assert P.forgetting_at_loss(front, 2.9) is None  # never that low
    assert P.forgetting_at_loss(front, 4.5) == pytest.approx(0.1)


def test_matched_per_seed_and_mean_frontier():
    pts = [_pt(1e-4, 0, 4.0, 0.1), _pt(1e-3, 0, 3.0, 0.5), _pt(1e-4, 1, 4.2, 0.1), _pt(1e-3, 1, 3.2, 0.5)]
    m = P.matched(pts, forgetting=0.3)
    assert m["value"] == pytest.approx(3.6)  # mean frontier: (4.1, 0.1) -> (3.1, 0.5)
    assert m["per_seed"] == {0: pytest.approx(3.5), 1: pytest.approx(3.7)}
    assert m["seed_sd"] == pytest.approx(0.2 / 2 ** 0.5) and m["seeds_reaching"] == "2/2"
    assert P.matched(pts, loss=3.0)["seeds_reaching"] == "1/2"
    with pytest.raises(ValueError, match="exactly one"):
        P.matched(pts)


def test_lr_is_selected_on_validation_not_test():
    # test prefers 1e-3, validation prefers 1e-4: the selection must follow validation
    pts = [_pt(1e-4, s, 4.0, 0.1, loss_val=3.0) for s in range(2)] + [_pt(1e-3, s, 3.0, 0.5, loss_val=3.5)
                                                                       for s in range(2)]
    assert P.select_lr(pts) == 1e-4
    rows = P.lr_means(pts)
    assert [r["lr"] for r in rows] == [1e-4, 1e-3] and rows[0]["domain_loss_val"] == 3.0


def test_time_to_target():
    c = [{"step": 9, "train_s": 1.0, "val_avg": 4.0}, {"step": 19, "train_s": 2.0, "val_avg": 3.4},
         {"step": 29, "train_s": 3.0, "val_avg": 3.2}]
    t = P.time_to_target([c, c[:2]], 3.3)
    assert t["steps"] == [30, None] and t["reached"] == "1/2" and t["mean_seconds"] is None
    t = P.time_to_target([c], 3.5)
    assert t["steps"] == [20] and t["mean_seconds"] == 2.0
    t = P.time_to_target([c, c], [3.5, 3.2])  # one target per seed (the paired FFT run's)
    assert t["steps"] == [20, 30] and t["mean_steps"] == 25
    with pytest.raises(ValueError, match="targets"):
        P.time_to_target([c], [3.5, 3.2])


def test_resolution_uses_paired_differences():
    a = [_pt(1e-3, s, 3.0 + 0.1 * s, 0.1) for s in range(3)]
    b = [_pt(1e-3, s, 3.02 + 0.1 * s, 0.2) for s in range(3)]  # same seed effect: the difference is exact
    r = P.resolution({"a": a, "b": b}, 0.001, ("a", "b"))
    assert r["paired_diff_sd_median"] == pytest.approx(0.0, abs=1e-12) and r["resolves_0.01_paired"] is True
    assert r["seed_sd_median"] == pytest.approx(0.1) and r["resolves_0.01_unpaired"] is False


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    out, cache = root / "out", root / "cache"
    rc = main(["experiment", "all", "--quick", "--out", str(out), "--cache", str(cache), "--workers", "1"])
    assert rc == 0
    return out, cache


def test_quick_pareto_results_have_the_documented_fields(quick_all):
    out, cache = quick_all
    res = json.loads((out / "pareto" / "results.json").read_text())
    spec = load_spec(quick=True)
    assert res["split"] == {"select": "validation", "report": "test"}
    assert set(res["methods"]) == set(spec.pareto_methods) | set(spec.single_methods)
    assert set(res["methods"]) <= set(METHOD_NAMES)
    for m, b in res["methods"].items():
        pts = b["points"]
        assert len(pts) == len(spec.lrs) * spec.seeds
        assert {(p["lr"], p["seed"]) for p in pts} == {(lr, s) for lr in spec.lrs for s in range(spec.seeds)}
        for p in pts:
            assert {"lr", "seed", "domain_loss", "forgetting", "domain_loss_val", "forgetting_val"} <= set(p)
            assert 0 < p["domain_loss"] < 20 and 0 < p["domain_loss_val"] < 20
        assert b["selected_lr"] == P.select_lr(pts)
        assert set(b["at_matched_forgetting"]) == {"des_moe", "fft_mixed"}
    assert res["methods"]["des_moe"]["wall_clock"]["steps"] == spec.steps_per_domain * len(spec.domains)
    assert "wall_clock" not in res["methods"]["esft_gate_single"]
    for png in ("pareto.png", "pareto_core.png", "wall_clock.png"):
        assert (out / "pareto" / png).stat().st_size > 1000
    sc = json.loads((out / "scaling" / "results.json").read_text())
    assert sc["counts"] == [1, 2] and set(sc["methods"]) == set(spec.scaling_methods)
    assert (out / "scaling" / "scaling.png").stat().st_size > 1000
    t = json.loads((out / "timing.json").read_text())
    assert t["runs_computed"] == t["runs_total"] > 0 and t["seconds"] > 0
    md = (out / "summary.md").read_text()
    assert "The paper's claims, measured" in md and "| des_moe |" in md and "Scaling 1 → 2" in md


def test_runs_are_paired_and_reused(quick_all, tmp_path):
    out, cache = quick_all
    recs = [json.loads((cache / "ft" / d / "record.json").read_text()) for d in os.listdir(cache / "ft")
            if (cache / "ft" / d / "record.json").is_file()]
    # every mixed run of a seed starts from the same base and the same held-out sets: one general 'before' value
    befores = {round(r["general_loss_before"], 6) for r in recs}
    assert len(befores) == 1
    assert {round(r["general_loss_val_before"], 6) for r in recs} and all(r["val_curve"] for r in recs)
    n = len(os.listdir(cache / "ft"))
    timing = (out / "timing.json").read_text()
    assert main(["experiment", "all", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    assert (out / "timing.json").read_text() == timing  # the invocation that computed the runs is kept
    import shutil

    shutil.rmtree(next(p for p in (cache / "ft").iterdir() if p.name.startswith("des_moe-2d")))
    assert main(["experiment", "all", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    t0, t1 = json.loads(timing), json.loads((out / "timing.json").read_text())
    assert len(t1["invocations"]) == 2 and t1["runs_computed"] == t0["runs_computed"] + 1  # invocations add up
    assert t1["seconds"] == pytest.approx(t0["seconds"] + t1["invocations"][1]["seconds"])
    assert main(["experiment", "scaling", "--quick", "--out", str(tmp_path / "s"), "--cache", str(cache)]) == 0
    assert len(os.listdir(cache / "ft")) == n  # everything came from the cache
    assert json.loads((tmp_path / "s" / "results.json").read_text())["methods"] == \
        json.loads((out / "scaling" / "results.json").read_text())["methods"]


def test_readme_results_block_is_generated_from_the_committed_json():
    from desmoe.experiments.report import readme_block

    root = os.path.join(ROOT, "results", "experiments")
    if not os.path.isfile(os.path.join(root, "pareto", "results.json")):
        pytest.skip("no committed experiment results")
    readme = open(os.path.join(ROOT, "docs", "experiments.md")).read()
    assert readme_block(root) in readme, ("README's Results block is stale: run python -m desmoe.experiments.report "
                                          "results/experiments --readme docs/experiments.md")


def test_bad_input(tmp_path, capsys):
    assert main(["experiment", "paper", "--out", str(tmp_path)]) == 2
    assert "experiment name" in capsys.readouterr().err
    assert main(["experiment", "pareto", "--quick", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["experiment", "pareto", "--quick", "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["experiment", "pareto", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    d = yaml.safe_load(open(os.path.join(CONFIG_DIR, "quick.yaml")))
    for key, val, msg in (("domains", ["math", "general"], "forgetting probe"), ("lrs", [], "lrs"),
                          ("lrs", [1e-3, 1e-3], "distinct"), ("scaling_counts", [9, 1], "scaling_counts"),
                          ("pareto_methods", ["sgd", "des_moe"], "pareto_methods"),
                          ("pareto_methods", ["des_moe"], "fft_mixed"), ("steps_per_domain", 0, "steps_per_domain"),
                          ("scaling_methods", ["frozen_router"], "also be in pareto_methods"),
                          ("single_methods", ["des_moe"], "single_methods"), ("bogus", 1, "unknown key")):
        p = tmp_path / f"{key}.yaml"
        p.write_text(yaml.safe_dump({**d, key: val}))
        with pytest.raises(ValueError, match=msg):
            load_spec(str(p))
    p = tmp_path / "max_steps.yaml"
    train = {**d["finetune"]["train"], "max_steps": 5}
    p.write_text(yaml.safe_dump({**d, "finetune": {**d["finetune"], "train": train}}))
    with pytest.raises(ValueError, match="steps_per_domain"):
        load_spec(str(p))


def test_shipped_configs_validate():
    from desmoe.experiments.sweep import load_sweep

    for name in os.listdir(CONFIG_DIR):
        path = os.path.join(CONFIG_DIR, name)
        spec = load_sweep(path)[1] if name.startswith("sweep") else load_spec(path)
        assert set(spec.domains) <= set(spec.base["config"]["data"]["domains"])


def test_claim_verdicts_follow_their_rules():
    from desmoe.experiments.report import claims

    def blk(loss, forg):
        return {"selected": {"avg_domain_loss": loss, "forgetting": forg},
                "at_matched_forgetting": {"des_moe": {"value": loss}},
                "at_matched_domain_loss": {"des_moe": {"value": forg}}}

    res = {"paired_diff_sd_median": 0.002, "paired_forgetting_diff_sd_median": 0.003}
    p = {"methods": {"des_moe": blk(3.635, 0.05), "fft_mixed": blk(3.614, 0.08)}, "resolution": res,
         "references": {"des_moe": {"forgetting": 0.05}}, "base_domain_loss": 3.69}
    p["methods"]["fft_mixed"]["at_matched_domain_loss"]["des_moe"]["value"] = 0.03
    def row(start):
        return next(r for r in claims(p, None) if r[0].startswith(start))

    keep = row("DES-MoE keeps general ability")
    assert "ratio 0.62" in keep[2] and keep[3].startswith("partly")
    assert row("… also at matched learning")[3] == "no (FFT forgets less)"
    match = row("DES-MoE matches mixed FFT")
    assert match[3].startswith("no") and "72% of its gain" in match[2]  # 0.021 worse > 2 x 0.002
    res["paired_diff_sd_median"] = 0.02  # now the difference is inside the spread
    assert row("DES-MoE matches mixed FFT")[3] == "yes"


def test_near_tie_forgetting_growth_and_wins_follow_their_rules():
    from desmoe.experiments.report import _forgetting_growth_row, claims, near_tie, wins

    def lrrow(lr, val, forg):
        return {"lr": lr, "domain_loss_val": val, "domain_loss": val, "forgetting": forg}

    res = {"seed_sd_median": 0.003, "paired_diff_sd_median": 0.002, "paired_forgetting_diff_sd_median": 0.003}
    b = {"selected_lr": 3e-4, "lr_means": [lrrow(1e-4, 3.66, 0.02), lrrow(3e-4, 3.635, 0.08), lrrow(1e-3, 3.637, 0.24)]}
    t = near_tie(b, res)
    assert t["lr"] == 1e-3 and t["gap"] == pytest.approx(0.002) and t["forgetting"] == 0.24
    assert near_tie(b, {**res, "seed_sd_median": 0.001}) is None  # 0.002 apart is outside a 0.001 spread

    def blk(loss, forg, lr_means=None, sel=None):
        return {"selected": {"avg_domain_loss": loss, "forgetting": forg}, "selected_lr": sel,
                "lr_means": lr_means or [],
                "at_matched_forgetting": {"des_moe": {"value": loss, "per_seed": {0: loss, 1: loss + 1e-4}}},
                "at_matched_domain_loss": {"des_moe": {"value": forg, "per_seed": {0: forg, 1: forg + 1e-4}}}}

    p = {"methods": {"des_moe": blk(3.635, 0.053), "fft_mixed": blk(3.614, 0.08, b["lr_means"], 3e-4),
                     "esft_gate": blk(3.70, 0.06)}, "resolution": res,
         "references": {"des_moe": {"forgetting": 0.053}}, "base_domain_loss": 3.69}
    keep = next(r for r in claims(p, None) if r[0].startswith("DES-MoE keeps general ability"))
    assert "validation near-tie" in keep[2] and "forgets +0.240" in keep[2]
    assert keep[3] == "partly (less, not ≤ ⅓) — rests on that near-tie (at fft_mixed's runner-up LR: yes)"
    p["methods"]["esft_gate"]["at_matched_forgetting"]["des_moe"]["value"] = 3.70
    w = wins(p)
    assert w.endswith("lower domain loss at its forgetting than esft_gate (+0.065); less forgetting at its domain "
                      "loss than fft_mixed (+0.027), esft_gate (+0.007).")  # FFT's lower loss at 0.053 is no win

    def sc(des_lo, des_hi, fft_lo, fft_hi):
        def m(lo, hi):
            return {"per_count": {"2": {"forgetting_per_seed": lo}, "5": {"forgetting_per_seed": hi}}}
        return {"counts": [2, 5], "methods": {"des_moe": m(des_lo, des_hi), "fft_mixed": m(fft_lo, fft_hi)}}

    # absolute growth less (0.02 vs 0.04), relative growth the same (x2): "in absolute terms only"
    row = _forgetting_growth_row(sc([0.02, 0.021, 0.019], [0.04, 0.042, 0.038], [0.04, 0.041, 0.039],
                                    [0.08, 0.082, 0.078]))
    assert row[3] == "in absolute terms only" and "×2.00 vs ×2.00" in row[2]
    row = _forgetting_growth_row(sc([0.02, 0.021, 0.019], [0.03, 0.0315, 0.0285], [0.04, 0.041, 0.039],
                                    [0.08, 0.082, 0.078]))
    assert row[3] == "yes, absolute and relative"
