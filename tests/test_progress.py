"""Progress on every long step (what, rate, ETA), silenced by --quiet / progress.quiet() and nowhere else."""
import os
import sys
import time

import pytest

from desmoe import progress
from desmoe.cli import _parser, main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
from test_train import tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bar_shows_what_rate_and_eta_and_quiet_silences_it(capsys):
    for _ in progress.bar(range(3), "doing a thing", unit="file"):
        time.sleep(0.01)
    err = capsys.readouterr().err
    assert "doing a thing" in err and "3/3" in err and "file/s" in err and "<" in err  # elapsed<remaining
    with progress.quiet():
        assert list(progress.bar(range(3), "hidden")) == [0, 1, 2]
        with progress.stage("hidden stage"):
            pass
    assert capsys.readouterr().err == ""
    with progress.stage("a stage"):
        pass
    err = capsys.readouterr().err
    assert "a stage ..." in err and "a stage: done in" in err


def test_quiet_is_scoped_and_env_switch(capsys, monkeypatch):
    with progress.quiet():
        pass
    assert not progress.is_quiet()
    monkeypatch.setenv("DESMOE_QUIET", "1")
    assert progress.is_quiet()


def test_corpus_build_tokenizer_and_pretraining_report_progress(tmp_path, capsys, monkeypatch):
    from desmoe.data import load_domain_texts
    from desmoe.train import config_from_dict
    from desmoe.train.trainer import run

    monkeypatch.setenv("DESMOE_CACHE_DIR", str(tmp_path / "cache"))
    load_domain_texts("law", "train", max_docs=2)  # a fresh cache: the corpus is built once, visibly
    err = capsys.readouterr().err
    assert "building the built-in 'law' corpus" in err and "done in" in err
    load_domain_texts("law", "train", max_docs=2)  # cached: nothing to report
    assert "building" not in capsys.readouterr().err
    d = tiny_cfg(str(tmp_path), max_steps=3, pretrain_steps=4, progress=True)
    run(config_from_dict(d), str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert "training a 300-token BPE tokenizer" in err
    assert "pretraining the base model" in err and "4/4" in err
    assert "des_moe" in err and "3/3" in err  # the fine-tuning bar
    assert "evaluating held-out loss" in err


def test_every_long_running_command_takes_quiet():
    p = _parser()
    for cmd in (["demo"], ["parity"], ["train", "--config", "c", "--output-dir", "o"], ["eval", "--checkpoint", "c"],
                ["experiment", "pareto", "--out", "o"], ["export", "--checkpoint", "c", "--out", "o"]):
        assert p.parse_args(cmd + ["--quiet"]).quiet is True


def test_quiet_train_prints_no_progress(tmp_path, capsys):
    import yaml

    d = tiny_cfg(str(tmp_path), max_steps=3, pretrain_steps=2, progress=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "pretraining the base model" not in err and "tokenizer" not in err and "it/s" not in err
