"""``desmoe experiment``: quick mode end to end (results.json schema, plots, cache reuse), aggregation, and bad
input (exit 2 / ValueError naming the key)."""
import json
import os

import pytest
import yaml

from desmoe.cli import main
from desmoe.experiments import METHOD_NAMES, aggregate, load_spec
from desmoe.experiments.spec import CONFIG_DIR

BLOCK_KEYS = {"domain_loss", "general_loss_delta", "math_exact_match", "wall_clock_s", "spread"}


def check_block(blk: dict, domains: list[str]) -> None:
    assert BLOCK_KEYS <= set(blk)
    assert set(blk["domain_loss"]) == set(domains)
    for d in domains:
        assert 0.0 < blk["domain_loss"][d] < 20.0
        assert blk["spread"]["domain_loss"][d] >= 0.0
    assert isinstance(blk["general_loss_delta"], float)
    assert blk["wall_clock_s"] > 0
    assert blk["spread"]["general_loss_delta"] >= 0.0
    if "math" in domains:
        assert 0.0 <= blk["math_exact_match"] <= 1.0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    out, cache = root / "forgetting", root / "cache"
    rc = main(["experiment", "forgetting", "--quick", "--out", str(out), "--cache", str(cache)])
    assert rc == 0
    return out, cache


def test_quick_forgetting_schema(quick_run):
    out, cache = quick_run
    res = json.loads((out / "results.json").read_text())
    assert {"experiment", "config", "versions", "git_sha", "seeds", "methods"} <= set(res)
    assert res["experiment"] == "forgetting"
    spec = load_spec(quick=True)
    assert res["seeds"] == list(range(spec.seeds))
    assert set(res["methods"]) == set(spec.forgetting_methods)
    assert set(res["methods"]) <= set(METHOD_NAMES)
    for m, blk in res["methods"].items():
        check_block(blk, spec.domains)
        assert blk["n_seeds"] == spec.seeds
        assert str(blk["lr"]) and blk["lr_search"]
    # every method started from the same cached base: its general loss is the shared 'before'
    base_dirs = [p for p in os.listdir(cache) if p.startswith("base-")]
    assert len(base_dirs) == 1
    befores = set()
    for d in os.listdir(cache / "ft"):
        rec = cache / "ft" / d / "record.json"
        if rec.is_file():
            r = json.loads(rec.read_text())
            if r["seed"] == 0:
                befores.add(round(r["general_loss_before"], 6))
    assert len(befores) == 1
    # FFT updates everything, ESFT only a few experts: ESFT must move general loss less than FFT
    m = res["methods"]
    assert abs(m["esft_gate"]["general_loss_delta"]) < abs(m["fft_mixed"]["general_loss_delta"])
    for png in ("forgetting.png", "loss_curves.png", "affinity_des_moe.png"):
        assert (out / png).stat().st_size > 1000


def test_cached_runs_are_reused(quick_run, tmp_path):
    _, cache = quick_run
    n_runs = len(os.listdir(cache / "ft"))
    out = tmp_path / "conv"
    assert main(["experiment", "convergence", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    assert len(os.listdir(cache / "ft")) == n_runs  # convergence reads the forgetting runs' histories
    res = json.loads((out / "results.json").read_text())
    conv = res["methods"]["fft_mixed"]["convergence"]
    assert conv["target_avg_train_domain_loss"] > 0
    assert len(conv["steps_to_target"]) == load_spec(quick=True).seeds
    from desmoe.experiments.report import render

    md = render(str(quick_run[0].parent))
    assert "### Forgetting" in md and "| fft_mixed |" in md and "| des_moe |" in md


def test_aggregate_mean_and_spread():
    runs = [{"domains": ["a", "b"], "domain_loss": {"a": 1.0, "b": 3.0}, "general_loss_delta": 0.1,
             "math_exact_match": None, "wall_clock_s": 2.0},
            {"domains": ["a", "b"], "domain_loss": {"a": 2.0, "b": 5.0}, "general_loss_delta": 0.3,
             "math_exact_match": None, "wall_clock_s": 4.0}]
    blk = aggregate(runs)
    assert blk["domain_loss"] == {"a": 1.5, "b": 4.0}
    assert blk["general_loss_delta"] == pytest.approx(0.2)
    assert blk["avg_domain_loss"] == pytest.approx(2.75)
    assert blk["spread"]["domain_loss"]["a"] == pytest.approx(2 ** -0.5)
    assert blk["spread"]["general_loss_delta"] == pytest.approx(0.1 * 2 ** 0.5)
    assert blk["math_exact_match"] is None


def test_bad_input(tmp_path, capsys):
    assert main(["experiment", "paper", "--out", str(tmp_path)]) == 2
    assert "experiment name" in capsys.readouterr().err
    assert main(["experiment", "forgetting", "--quick", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["experiment", "forgetting", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    d = yaml.safe_load(open(os.path.join(CONFIG_DIR, "quick.yaml")))
    for key, val, msg in (("domains", ["math", "general"], "forgetting probe"), ("lrs", [], "lrs"),
                          ("scaling_counts", [9], "scaling_counts"), ("forgetting_methods", ["sgd"], "forgetting_methods"),
                          ("bogus", 1, "unknown key")):
        p = tmp_path / f"{key}.yaml"
        p.write_text(yaml.safe_dump({**d, key: val}))
        with pytest.raises(ValueError, match=msg):
            load_spec(str(p))


def test_shipped_configs_validate():
    for name in os.listdir(CONFIG_DIR):
        spec = load_spec(os.path.join(CONFIG_DIR, name))
        assert set(spec.domains) <= set(spec.base["config"]["data"]["domains"])


def test_single_domain_esft_protocol_runs_one_model_per_domain(monkeypatch):
    """single_methods: esft_gate_single trains one ESFT model per domain (data.domains = [d], its own selection)."""
    import dataclasses

    from desmoe.experiments import experiments as ex
    from desmoe.experiments.runner import finetune_config

    spec = dataclasses.replace(load_spec(quick=True), single_methods=["fft_single", "esft_gate_single"])
    seen = []

    def fake_run_cells(spec_, base_path, cells, seeds, log=print):
        seen.extend(cells)
        return [{"lr": 1e-3, "lr_search": {}, "runs": [
            {"domains": c[1], "domain_loss": {c[1][0]: 1.0}, "general_loss_delta": 0.1, "math_exact_match": None,
             "wall_clock_s": 1.0} for _ in range(seeds)]} for c in cells]

    monkeypatch.setattr(ex, "run_cells", fake_run_cells)
    cells, runs = ex._single_runs(spec, "base", print, "esft_gate_single")
    assert [(c[0], c[1]) for c in seen] == [("esft_gate_single", [d]) for d in spec.domains]
    cfg = finetune_config(spec, "base", "esft_gate_single", [spec.domains[0]], 1e-3, 0)
    assert cfg["method"]["name"] == "esft_gate" and cfg["data"]["domains"] == [spec.domains[0]]
    assert set(runs[0]["domain_loss"]) == set(spec.domains)
    with pytest.raises(ValueError, match="single_methods"):
        dataclasses.replace(spec, single_methods=["des_moe"])
