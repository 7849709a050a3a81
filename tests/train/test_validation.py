"""Validation in the trainer: the validation split evaluated before/after and every ``train.val_every`` steps,
held-out documents independent of ``data.seed``, ``train_s`` in the history, and ``train.eval_cache``."""
import json
import os
import time

import pytest

from desmoe.train import config_from_dict
from desmoe.train import trainer as trainer_mod
from desmoe.train.builders import load_texts
from desmoe.train.trainer import run

from test_train import tiny_cfg, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(progress=False, log=lambda *_: None)


def _tiny(root, **train):
    os.makedirs(root, exist_ok=True)
    return tiny_cfg(str(root), **train)


def _history(path):
    return [json.loads(line) for line in open(path)]


def test_validation_config_errors(tmp_path):
    good = _tiny(tmp_path)
    for train, match in (({"val_every": 5}, r"train\.val_every=5 needs train\.val_batches > 0"),
                         ({"val_batches": -1}, r"train\.val_batches must be >= 0, got -1"),
                         ({"val_every": 1.5, "val_batches": 1}, r"train\.val_every must be an int, got 1\.5"),
                         ({"eval_cache": 3}, r"train\.eval_cache must be a string or null, got 3"),
                         ({"eval_cache": " "}, r"train\.eval_cache must be a directory path")):
        d = json.loads(json.dumps(good))
        d["train"].update(train)
        with pytest.raises(ValueError, match=match):
            config_from_dict(d)
    d = json.loads(json.dumps(good))
    d["train"].update(val_batches=2, val_every=3, eval_cache=str(tmp_path / "c"))
    assert config_from_dict(d).train.val_every == 3


def test_val_every_history_summary_and_resume(tmp_path, monkeypatch):
    """Validation rows at steps 1, 3 and the last; it costs no training time, leaves the model in train mode and
    changes nothing of the training; val_before/val_after in the summary, val_before kept across a resume."""
    real, calls = trainer_mod.evaluate_model, []

    def slow_eval(model, *a, **k):
        time.sleep(0.4)
        out = real(model, *a, **k)
        calls.append(model.training)
        return out

    d = _tiny(tmp_path / "data", max_steps=5, log_every=100, val_batches=1, val_every=2)
    monkeypatch.setattr(trainer_mod, "evaluate_model", slow_eval)
    s = run(config_from_dict(d), str(tmp_path / "r"), **QUIET)
    monkeypatch.setattr(trainer_mod, "evaluate_model", real)
    hist = _history(tmp_path / "r" / "history.jsonl")
    assert [h["step"] for h in hist] == [0, 1, 3, 4]  # step 0 by log_every; 1, 3 by val_every; 4 the last
    assert all(calls)  # the model is back in train mode after every evaluation
    doms = ["alpha", "beta", "gamma"]
    for h in hist:
        assert h["train_s"] > 0
        if h["step"] == 0:
            assert not any(k.startswith("val/") for k in h)
            continue
        assert {f"val/{x}" for x in doms} | {"val/avg", "val/general"} <= set(h)
        assert h["val/avg"] == pytest.approx(sum(h[f"val/{x}"] for x in doms) / 3)
        assert "val/base" not in h  # the general domain is reported as val/general only
    assert [h["train_s"] for h in hist] == sorted(h["train_s"] for h in hist)
    # 3 evaluations inside the loop slept 1.2 s of wall time that is not training time
    assert hist[-1]["train_s"] < s["seconds"] - 1.2
    for key in ("val_before", "val_after"):
        assert set(s[key]["domains"]) == set(doms) | {"base"} and s[key]["general"] == s[key]["domains"]["base"]
    last = hist[-1]
    assert last["val/alpha"] == pytest.approx(s["val_after"]["domains"]["alpha"]["loss"], rel=1e-6)
    assert last["val/general"] == pytest.approx(s["val_after"]["general"]["loss"], rel=1e-6)
    assert s["val_after"]["domains"]["alpha"]["loss"] < s["val_before"]["domains"]["alpha"]["loss"]
    assert s["val_before"]["domains"]["alpha"] != s["eval_before"]["domains"]["alpha"]  # other documents
    # validation changes nothing of the training: the same step losses without it
    d0 = _tiny(tmp_path / "data", max_steps=5, log_every=1)
    s0 = run(config_from_dict(d0), str(tmp_path / "r0"), **QUIET)
    plain = {h["step"]: h["task"] for h in _history(tmp_path / "r0" / "history.jsonl")}
    assert all(h["task"] == plain[h["step"]] for h in hist)
    assert "val_before" not in s0 and not any("val/" in k for k in _history(tmp_path / "r0" / "history.jsonl")[0])
    # a resumed run keeps the validation before training of its start (from the checkpoint)
    run(config_from_dict(d), str(tmp_path / "p"), max_steps=3, **QUIET)
    res = run(config_from_dict(d), str(tmp_path / "p"), resume=True, **QUIET)
    assert res["val_before"] == s["val_before"]
    assert res["val_after"]["domains"]["alpha"]["loss"] == pytest.approx(s["val_after"]["domains"]["alpha"]["loss"],
                                                                        rel=1e-5)
    assert [h["step"] for h in _history(tmp_path / "p" / "history.jsonl")] == [0, 1, 2, 3, 4]  # 2: last of session 1


def test_heldout_docs_do_not_depend_on_data_seed(tmp_path, monkeypatch):
    """Two runs that differ in data.seed train on different subsets but evaluate on identical documents."""
    from desmoe.data import train_tokenizer

    paths = write_corpus(str(tmp_path), n=400)
    texts = [json.loads(line)["text"] for p in paths.values() for line in open(p)]
    train_tokenizer(texts, vocab_size=300).save_pretrained(str(tmp_path / "tok"))  # the same tokens in both runs
    seen = []

    def record(model, tok, docs, **k):
        seen.append({d: list(map(tuple, v)) for d, v in docs.items()})
        return real(model, tok, docs, **k)

    real = trainer_mod.evaluate_model
    monkeypatch.setattr(trainer_mod, "evaluate_model", record)
    cfgs = []
    for seed in (0, 1):
        d = _tiny(tmp_path / f"c{seed}", max_steps=1, val_batches=1)
        d["data"].update(sources=paths, seed=seed, max_docs=100)
        d["tokenizer"] = {"path": str(tmp_path / "tok")}
        cfgs.append(config_from_dict(d))
        run(cfgs[-1], str(tmp_path / f"r{seed}"), **QUIET)
    assert len(seen) == 8  # per run: test and validation, before and after
    assert seen[:4] == seen[4:]
    names = ["alpha", "base"]
    for split in ("test", "validation"):  # more documents than eval_max_docs: the subset is drawn, seed-free
        assert len(load_texts(cfgs[0], names, split, None)["alpha"]) > cfgs[0].data.eval_max_docs
        assert load_texts(cfgs[0], names, split, 20) == load_texts(cfgs[1], names, split, 20)
    assert load_texts(cfgs[0], names, "train", 100) != load_texts(cfgs[1], names, "train", 100)


def _saved_base(root):
    """A tiny model + tokenizer saved as a model directory (what model.path points at)."""
    from desmoe.data import train_tokenizer
    from desmoe.integrations.tiny import tiny_model

    os.makedirs(root / "data")
    paths = write_corpus(str(root / "data"))
    texts = [json.loads(line)["text"] for p in paths.values() for line in open(p)]
    tok = train_tokenizer(texts, vocab_size=300)
    base = root / "base"
    tok.save_pretrained(str(base))
    tiny_model("qwen3_moe", vocab_size=len(tok)).save_pretrained(str(base))
    return paths, str(base)


def test_eval_cache_reuses_the_base_evaluations(tmp_path, monkeypatch):
    import desmoe.eval as ev

    paths, base = _saved_base(tmp_path)
    real, calls = ev.domain_loss, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ev, "domain_loss", counted)
    cache = str(tmp_path / "cache")

    def cfg(method, **train):
        d = _tiny(tmp_path / "unused", max_steps=2, val_batches=1, eval_cache=cache, **train)
        d["model"] = {"path": base}
        d["data"]["sources"] = paths
        d["method"] = {"name": method, "update_every": 1}
        return config_from_dict(d)

    a = run(cfg("fft"), str(tmp_path / "a"), **QUIET)
    assert len(calls) == 16  # 4 domains x (test, validation) x (before, after)
    assert len(os.listdir(cache)) == 8 and not any(f.endswith(".tmp") for f in os.listdir(cache))
    calls.clear()
    b = run(cfg("des_moe"), str(tmp_path / "b"), **QUIET)  # another method: the same base, the same entries
    assert len(calls) == 8  # only after training
    assert b["eval_before"] == a["eval_before"] and b["val_before"] == a["val_before"]
    assert b["eval_after"] != a["eval_after"]
    calls.clear()
    c = run(cfg("fft", eval_batches=2), str(tmp_path / "c"), **QUIET)  # other eval batches: test entries miss
    assert len(calls) == 4 + 8 and c["val_before"] == a["val_before"]
    assert len(os.listdir(cache)) == 12
    # what the cache claims: DES-MoE (zero-initialised ALR) evaluates like the base before training
    d = cfg("des_moe")
    d.train.eval_cache = None
    fresh = run(d, str(tmp_path / "d"), **QUIET)
    for x, r in a["eval_before"]["domains"].items():
        assert fresh["eval_before"]["domains"][x]["loss"] == pytest.approx(r["loss"], rel=1e-6), x
    # a random tiny model never uses the cache
    calls.clear()
    t = _tiny(tmp_path / "t", max_steps=1, val_batches=1, eval_cache=cache)
    run(config_from_dict(t), str(tmp_path / "t" / "run"), **QUIET)
    assert len(calls) == 16 and len(os.listdir(cache)) == 12
