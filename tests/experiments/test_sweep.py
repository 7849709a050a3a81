"""``desmoe experiment sweep``: the LR search's rules, the DES-MoE − FFT readings, and the quick sweep end to end
(two tiny bases, results.json, plot, cache reuse)."""
import json
import os

import pytest

from desmoe.cli import main
from desmoe.experiments.spec import CONFIG_DIR, load_spec
from desmoe.experiments.sweep import around, load_sweep, overall, versus, widen

LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def test_around_centres_three_rungs_and_stays_on_the_ladder():
    assert around(LADDER, 1e-3) == [3e-4, 1e-3, 3e-3]
    assert around(LADDER, 1e-4) == [1e-4, 3e-4, 1e-3]
    assert around(LADDER, 1e-2) == [1e-3, 3e-3, 1e-2]


def test_widen_adds_a_rung_only_where_the_choice_is_an_edge():
    g = {"a": [3e-4, 1e-3, 3e-3], "b": [3e-4, 1e-3, 3e-3], "c": [1e-4, 3e-4, 1e-3]}
    assert widen(g, {"a": 1e-3, "b": 3e-3, "c": 1e-4}, LADDER)
    assert g["a"] == [3e-4, 1e-3, 3e-3]  # interior: unchanged
    assert sorted(g["b"]) == [3e-4, 1e-3, 3e-3, 1e-2]  # upper edge: one more above
    assert g["c"] == [1e-4, 3e-4, 1e-3]  # the ladder's end: nothing to add
    assert not widen({"c": [1e-4, 3e-4, 1e-3]}, {"c": 1e-4}, LADDER)


def _m(value, per_seed):
    return {"value": value, "per_seed": per_seed}


def test_versus_is_des_minus_fft_with_the_paired_spread():
    res = {"paired_diff_sd_median": 0.01, "paired_forgetting_diff_sd_median": 0.02}
    des = {"at_matched_forgetting": {"fft_mixed": _m(3.60, {0: 3.60, 1: 3.61, 2: 3.59}),
                                     "des_moe": _m(3.62, {0: 3.62, 1: 3.62, 2: 3.62})},
           "at_matched_domain_loss": {"fft_mixed": _m(None, {0: None, 1: None, 2: None}),
                                      "des_moe": _m(0.05, {0: 0.05, 1: 0.05, 2: 0.05})}}
    fft = {"at_matched_forgetting": {"fft_mixed": _m(3.70, {0: 3.70, 1: 3.70, 2: 3.70}),
                                     "des_moe": _m(3.621, {0: 3.621, 1: 3.62, 2: 3.622})},
           "at_matched_domain_loss": {"fft_mixed": _m(0.04, {0: 0.04, 1: 0.04, 2: 0.04}),
                                      "des_moe": _m(0.03, {0: 0.03, 1: 0.03, 2: 0.03})}}
    v = versus({"methods": {"des_moe": des, "fft_mixed": fft}, "resolution": res})
    a = v["at_matched_forgetting@fft_mixed"]
    assert a["delta"] == pytest.approx(-0.10) and a["paired_sd"] == pytest.approx(0.01) and a["resolved"]
    assert a["advantage_bound"] == pytest.approx(0.12)
    b = v["at_matched_forgetting@des_moe"]
    assert b["delta"] == pytest.approx(-0.001) and not b["resolved"]
    assert v["at_matched_domain_loss@fft_mixed"]["delta"] is None  # DES-MoE never gets that low
    c = v["at_matched_domain_loss@des_moe"]  # identical seeds: no per-seed spread -> the experiment's median
    assert c["paired_sd"] == pytest.approx(0.0) and c["delta"] == pytest.approx(0.02) and c["resolved"]
    o = overall([{"pretrain_steps": 10, "versus": v}])
    assert o["at_matched_forgetting@fft_mixed"]["des_moe_better_at"] == [10]
    assert o["at_matched_domain_loss@des_moe"]["fft_better_at"] == [10]


def test_sweep_config_shares_the_paper_experiment():
    sw, spec = load_sweep()
    paper = load_spec()
    assert spec.base == paper.base and spec.finetune == paper.finetune and spec.domains == paper.domains
    assert spec.cache == paper.cache and spec.seeds == paper.seeds
    assert sw.pretrain_steps[0] == paper.base["pretrain_steps"]  # the committed experiment is the first base
    assert all(sw.start_lrs[m] in sw.lr_ladder for m in sw.methods + sw.single_methods)


@pytest.mark.parametrize("key,value,msg", [
    ("pretrain_steps", [10, 10], "distinct ints"), ("lr_ladder", [0.01, 0.001, 0.1], "increasing"),
    ("methods", ["des_moe"], "missing \\['fft_mixed'\\]"), ("start_lrs", {"fft_mixed": 0.5}, "start_lrs.fft_mixed"),
    ("experiment", "nope.yaml", "no such file")])
def test_bad_sweep_configs_name_the_key(tmp_path, key, value, msg):
    import yaml

    d = yaml.safe_load(open(f"{CONFIG_DIR}/sweep_quick.yaml"))
    d["experiment"] = f"{CONFIG_DIR}/quick.yaml"
    d[key] = value
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        load_sweep(str(p))


def test_quick_sweep_end_to_end(tmp_path, capsys):
    out, cache = tmp_path / "results" / "sweep", tmp_path / "cache"
    args = ["experiment", "sweep", "--quick", "--out", str(out), "--cache", str(cache), "--workers", "1"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    sw, spec = load_sweep(quick=True)
    assert [b["pretrain_steps"] for b in res["bases"]] == sorted(sw.pretrain_steps)
    for b in res["bases"]:
        sp = b["specialization"]
        assert 0 <= sp["mi_norm"] <= 1 and sp["concentration_uniform"] <= sp["concentration"] <= 1
        for m, g in b["lr_grids"].items():
            lr = b["selected"][m]["lr"]
            assert lr in g and len(g) >= 3
            i = sw.lr_ladder.index(lr)  # a tried rung on each side of the choice, unless the ladder ends there
            assert (i == 0 or sw.lr_ladder[i - 1] in g) and (i == len(sw.lr_ladder) - 1 or sw.lr_ladder[i + 1] in g)
        assert set(b["versus"]) == {f"{k}@{r}" for k in ("at_matched_forgetting", "at_matched_domain_loss")
                                    for r in ("fft_mixed", "des_moe")}
        assert set(b["scaling"]) == set(spec.scaling_methods) and b["claims"]
        per = json.loads((out / f"base-{b['pretrain_steps']}" / "pareto" / "results.json").read_text())
        assert per["base"]["pretrain_steps"] == b["pretrain_steps"]
        assert per["methods"]["des_moe"]["selected_lr"] == b["selected"]["des_moe"]["lr"]
    assert (out / "sweep.png").stat().st_size > 1000
    assert "DES-MoE minus FFT" in (out / "summary.md").read_text()
    from desmoe.experiments.report import render

    md = render(str(tmp_path / "results"))  # the results dir's report (docs/experiments.md) carries the sweep
    assert "### The base sweep" in md and "Bases finished: [4, 10]." in md and "still to run" not in md
    t = json.loads((out / "timing.json").read_text())
    assert len(t["invocations"]) == 1 and t["invocations"][0]["runs_computed"] > 0
    n = len(list((cache / "ft").iterdir()))
    assert main(args) == 0  # everything cached: no run computed, the timing kept
    assert len(list((cache / "ft").iterdir())) == n
    assert json.loads((out / "timing.json").read_text())["invocations"] == t["invocations"]
    def same(bases):  # all but this invocation's wall time
        return [{k: v for k, v in b.items() if k != "invocation_seconds_when_done"} for b in bases]

    again = json.loads((out / "results.json").read_text())["bases"]
    assert same(again) == same(res["bases"]) and all(b["invocation_seconds_when_done"] > 0 for b in again)
    (out / "sweep.png").unlink()
    (out / "summary.md").unlink()
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "desmoe.experiments.sweep", str(out)], check=True)  # redrawn from the json
    assert (out / "sweep.png").stat().st_size > 1000 and "DES-MoE minus FFT" in (out / "summary.md").read_text()


def test_report_renders_every_sweep_folder(tmp_path):
    """sweep/ first, then its variants (sweep-*/), each under its own heading with its own plot."""
    import shutil

    from desmoe.experiments.report import render

    src = os.path.join(os.path.dirname(__file__), "..", "..", "results", "experiments", "sweep", "results.json")
    for name in ("sweep-fine", "sweep"):
        (tmp_path / name).mkdir()
        shutil.copy(src, tmp_path / name / "results.json")
    md = render(str(tmp_path), img="IMG/")
    a, b = md.index("### The base sweep ("), md.index("### The base sweep's variant `sweep-fine`")
    assert a < b and "IMG/sweep/sweep.png" in md and "IMG/sweep-fine/sweep.png" in md
