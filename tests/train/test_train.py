"""Training entrypoint: config validation, overrides, LR schedule, an end-to-end tiny run with exact resume."""
import json
import math
import os
import random

import pytest
import torch

from desmoe.train import apply_overrides, config_from_dict, load_config
from desmoe.train.trainer import lr_factor, run

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = {
    "alpha": "the cat sat on a mat and the dog ran after it in the park today".split(),
    "beta": "def foo ( x ) : return x + 1 for i in range ( 10 ) : print ( i )".split(),
    "gamma": "licence grant permission copyright holder warranty liability notice terms".split(),
    "base": "a manual page describes the command options and the files it reads and writes".split(),
}


def write_corpus(root, n=60, seed=0):
    rng = random.Random(seed)
    paths = {}
    for d, words in WORDS.items():
        p = os.path.join(root, f"{d}.jsonl")
        with open(p, "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")
        paths[d] = p
    return paths


def tiny_cfg(root, **train):
    paths = write_corpus(root)
    return {
        "model": {"tiny": "qwen3_moe"},
        "tokenizer": {"vocab_size": 300},
        "data": {"domains": ["alpha", "beta", "gamma"], "general": "base", "sources": paths, "max_docs": 60,
                 "eval_max_docs": 20, "seq_len": 32, "batch_size": 4},
        "method": {"name": "des_moe", "update_every": 2},
        "train": {"max_steps": 10, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 1, "plots": False,
                  "progress": False, **train},
    }


def test_config_errors_name_the_field(tmp_path):
    good = tiny_cfg(str(tmp_path))
    config_from_dict(good)
    cases = [
        (("train", "lr", -1.0), "train.lr"),
        (("train", "max_steps", 0), "train.max_steps"),
        (("data", "seq_len", 2), "data.seq_len"),
        (("data", "domains", []), "data.domains"),
        (("data", "domains", ["nope"]), "data.domains"),
        (("method", "phi", 2.0), "method.phi"),
        (("method", "name", "lora"), "method.name"),
        (("model", "tiny", "gpt2"), "model.tiny"),
        (("train", "lr_schedule", "step"), "train.lr_schedule"),
    ]
    for (sec, key, val), msg in cases:
        d = json.loads(json.dumps(good))
        d[sec][key] = val
        with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
            config_from_dict(d)
    d = json.loads(json.dumps(good))
    d["train"]["learning_rate"] = 1
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        config_from_dict(d)
    d = json.loads(json.dumps(good))
    d["data"]["sources"]["alpha"] = str(tmp_path / "missing" / "alpha.jsonl")
    with pytest.raises(ValueError, match="missing/alpha.jsonl"):
        config_from_dict(d)
    d = json.loads(json.dumps(good))
    d["model"] = {"tiny": "qwen3_moe", "path": "/x"}
    with pytest.raises(ValueError, match="model"):
        config_from_dict(d)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_overrides_and_yaml(tmp_path):
    import yaml

    d = tiny_cfg(str(tmp_path))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    cfg = load_config(str(p), ["method.phi=0.5", "train.max_steps=7", "method.lambda_schedule=cosine"])
    assert cfg.method.phi == 0.5 and cfg.train.max_steps == 7 and cfg.method.lambda_schedule == "cosine"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["method.phi"])
    with pytest.raises(ValueError, match="method.phi"):
        load_config(str(p), ["method.phi=3"])


def test_lr_schedule():
    cfg = config_from_dict({"model": {"tiny": "qwen3_moe"}, "data": {"domains": ["math"], "general": None},
                            "train": {"max_steps": 11, "warmup_steps": 2, "lr_schedule": "linear",
                                      "min_lr_ratio": 0.0}})
    f = [lr_factor(s, cfg) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(1 / 9) and all(a >= b for a, b in zip(f[1:], f[2:]))


def test_end_to_end_and_exact_resume(tmp_path):
    os.makedirs(tmp_path / "data", exist_ok=True)
    d = tiny_cfg(str(tmp_path / "data"))
    full = run(config_from_dict(d), str(tmp_path / "full"), progress=False, log=lambda *_: None)
    assert full["steps_run"] == 10 and full["phases"]["stabilization"] == [2, 7]
    assert set(full["masks"]) == {"alpha", "beta", "gamma"}
    assert all(len(m) >= 1 for layers in full["masks"].values() for m in layers)
    assert full["eval_after"]["domains"]["alpha"]["loss"] < full["eval_before"]["domains"]["alpha"]["loss"]
    assert "base" in full["eval_after"]["domains"]
    # interrupted at step 6 (stabilisation), resumed to the end: same weights as the uninterrupted run
    part = run(config_from_dict(d), str(tmp_path / "part"), max_steps=6, progress=False, log=lambda *_: None)
    assert part["final_step"] == 6
    res = run(config_from_dict(d), str(tmp_path / "part"), resume=True, progress=False, log=lambda *_: None)
    assert res["steps_run"] == 4 and res["final_step"] == 10
    from safetensors.torch import load_file

    a = load_file(os.path.join(full["checkpoint"], "model", "model.safetensors"))
    b = load_file(os.path.join(res["checkpoint"], "model", "model.safetensors"))
    assert a.keys() == b.keys() and not any("residual" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ma = torch.load(os.path.join(full["checkpoint"], "method.pt"), weights_only=False)
    mb = torch.load(os.path.join(res["checkpoint"], "method.pt"), weights_only=False)
    torch.testing.assert_close(ma["tracker"]["A_LME"], mb["tracker"]["A_LME"])
    for sa, sb in zip(ma["alr"], mb["alr"]):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    # the resumed run's summary covers the whole run, as the uninterrupted one does
    assert res["train_loss_first"] == full["train_loss_first"]
    for p, v in full["phase_summary"].items():
        r = res["phase_summary"][p]
        assert (r["steps"], r["first_step"], r["last_step"]) == (v["steps"], v["first_step"], v["last_step"]), p
        assert r["tokens"] == v["tokens"] and r["task_loss_first"] == pytest.approx(v["task_loss_first"], abs=1e-6)
        assert r["task_loss_last"] == pytest.approx(v["task_loss_last"], abs=1e-6)


def test_logs_mean_what_they_say(tmp_path, monkeypatch):
    """The logged LR is the one the step used; the bar, the log lines and the summary show the task loss."""
    from desmoe.train import trainer as trainer_mod

    posts = []

    class Bar(list):
        def set_postfix(self, **kw):
            posts.append(kw)

    monkeypatch.setattr(trainer_mod, "progress_bar", lambda it, enabled, desc: Bar(it))
    lines = []
    d = tiny_cfg(str(tmp_path), max_steps=6, warmup_steps=3, log_every=1)
    cfg = config_from_dict(d)
    s = run(cfg, str(tmp_path / "r"), progress=True, log=lines.append)
    hist = [json.loads(l) for l in open(tmp_path / "r" / "history.jsonl")]
    assert [h["step"] for h in hist] == list(range(6))
    for h in hist:  # the LR the optimizer applied at that step (warmup: lr·(step+1)/warmup), not the next one
        assert h["lr"] == pytest.approx(cfg.train.lr * lr_factor(h["step"], cfg), rel=1e-12)
    assert len(posts) == 6
    for p, h in zip(posts, hist):
        assert float(p["task"]) == pytest.approx(h["task"], abs=6e-4) and "loss" not in p
        assert float(p["lam"]) == pytest.approx(h["lambda"], abs=6e-3)
        assert float(p["kd"]) == pytest.approx(h["kd"], abs=6e-4)
    assert s["train_loss_last"] == hist[-1]["task"] and s["train_loss_first"] == hist[0]["task"]
    assert any(h["kd"] > 0 and h["loss"] != h["task"] for h in hist)  # the objective differs: not what is shown


def test_missing_data_file_is_named(tmp_path):
    d = tiny_cfg(str(tmp_path))
    os.remove(d["data"]["sources"]["beta"])
    with pytest.raises(ValueError, match="beta.jsonl"):
        config_from_dict(d)


@pytest.mark.parametrize("method", ["fft", "frozen_router", "esft_gate", "esft_token", "des_moe_no_alr",
                                    "des_moe_no_dges"])
def test_every_method_runs_through_the_loop(tmp_path, method):
    d = tiny_cfg(str(tmp_path))
    d["method"] = {"name": method, "esft_batches": 1, "update_every": 1}
    d["train"]["max_steps"] = 4
    d["data"]["general"] = None
    s = run(config_from_dict(d), str(tmp_path / "run"), progress=False, log=lambda *_: None)
    assert s["steps_run"] == 4 and math.isfinite(s["train_loss_last"])
    assert (s.get("esft_selection") is not None) == method.startswith("esft")
    assert (s["masks"] is not None) == method.startswith("des_moe")


def test_existing_run_needs_resume(tmp_path):
    d = tiny_cfg(str(tmp_path))
    d["train"]["max_steps"] = 2
    d["data"]["general"] = None
    run(config_from_dict(d), str(tmp_path / "run"), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--resume"):
        run(config_from_dict(d), str(tmp_path / "run"), progress=False, log=lambda *_: None)


def test_a_method_defined_here_trains_through_the_loop(tmp_path, monkeypatch):
    """A new method is one class in one file (here, this test): registered, it runs through `run` unchanged,
    and the controller asks it what trains, which phase it is in and which experts may move."""
    from desmoe.method import Method, register_method
    from desmoe.method.registry import _REGISTRY
    from desmoe.train import checkpoint as ck
    from desmoe.train import trainer as tr

    @register_method
    class AttentionAndFirstExperts(Method):
        """Two phases: attention + experts 0 and 1, then experts 0 and 1 alone."""
        name = "test_attention_and_first_experts"

        def phase_spans(self):
            return {"attn": (0, 2), "experts_only": (2, self.T)}

        def trainable_kinds(self, phase):
            return {"experts", "attention"} if phase == "attn" else {"experts"}

        def expert_trainable_LE(self, ctl):
            on_LE = torch.zeros(len(ctl.blocks), ctl.num_experts, dtype=torch.bool)
            on_LE[:, :2] = True
            return on_LE

    real, initial = tr.build_model, {}

    def recording_build(*a, **k):
        m = real(*a, **k)
        initial.update({n: p.detach().clone() for n, p in m.named_parameters()})
        return m

    monkeypatch.setattr(tr, "build_model", recording_build)
    try:
        d = tiny_cfg(str(tmp_path))
        d["method"] = {"name": AttentionAndFirstExperts.name}
        d["train"]["max_steps"] = 4
        d["data"]["general"] = None
        s = run(config_from_dict(d), str(tmp_path / "run"), progress=False, log=lambda *_: None)
    finally:
        _REGISTRY.pop(AttentionAndFirstExperts.name, None)
    assert s["steps_run"] == 4 and math.isfinite(s["train_loss_last"])
    assert s["phases"] == {"attn": [0, 2], "experts_only": [2, 4]}
    assert {p: v["steps"] for p, v in s["phase_summary"].items()} == {"attn": 2, "experts_only": 2}
    model, _ = ck.load_model(ck.list_checkpoints(str(tmp_path / "run"))[-1])
    final = {n: p.detach() for n, p in model.named_parameters()}
    assert set(final) == set(initial)
    changed = {n for n, w in final.items() if not torch.equal(w, initial[n])}
    assert any("self_attn" in n for n in changed)
    assert not [n for n in changed if "self_attn" not in n and ("embed" in n or "lm_head" in n or "norm" in n
                                                                 or n.endswith("gate.weight"))]
    for n in (n for n in final if n.endswith("experts.gate_up_proj")):
        rows = [e for e in range(final[n].shape[0]) if not torch.equal(final[n][e], initial[n][e])]
        assert rows and set(rows) <= {0, 1}, (n, rows)
