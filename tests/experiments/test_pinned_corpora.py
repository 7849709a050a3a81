"""An experiment's corpora are pinned: what is installed later (a package's description joins ``general``, its
licence ``law``) cannot change the held-out sets between runs compared as pairs, and runs on other corpora never
share a cache entry."""
import json
import os

import pytest

from desmoe.data.builtin import PIN_ENV, builtin_docs
from desmoe.experiments.runner import FP_ENV, pinned_corpora, run_dir_of
from desmoe.experiments.spec import load_spec


def test_a_pinned_snapshot_wins_over_what_is_installed(tmp_path, monkeypatch):
    pin = tmp_path / "pin"
    pin.mkdir()
    pinned = [(f"licenses/x{i}", f"pinned licence text {i}") for i in range(60)]
    (pin / "law.json").write_text(json.dumps(pinned))
    monkeypatch.setenv(PIN_ENV, str(pin))
    assert builtin_docs("law") == pinned
    monkeypatch.delenv(PIN_ENV)
    assert builtin_docs("law") != pinned  # the installed files


def test_pinned_corpora_snapshot_fingerprint_and_run_keys(tmp_path):
    spec = load_spec(quick=True)
    spec.cache = str(tmp_path / "cache")
    outside = run_dir_of(spec, "/base", "des_moe", ["math", "code"], 0.001, 0)
    with pinned_corpora(spec) as fp:
        assert os.environ[PIN_ENV] == str(tmp_path / "cache" / "corpora") and os.environ[FP_ENV] == fp
        assert sorted(os.listdir(tmp_path / "cache" / "corpora")) == ["code.json", "general.json"]  # math: generated
        inside = run_dir_of(spec, "/base", "des_moe", ["math", "code"], 0.001, 0)
        assert inside != outside
        with pinned_corpora(spec) as fp2:
            assert fp2 == fp
        snap = tmp_path / "cache" / "corpora" / "code.json"
        docs = json.loads(snap.read_text())
        snap.write_text(json.dumps(docs[:-1]))  # another snapshot: another fingerprint, other run keys
    assert PIN_ENV not in os.environ and FP_ENV not in os.environ  # restored
    with pinned_corpora(spec) as fp3:
        assert fp3 != fp and run_dir_of(spec, "/base", "des_moe", ["math", "code"], 0.001, 0) != inside


def test_an_unwritable_snapshot_folder_is_an_error(tmp_path, monkeypatch):
    spec = load_spec(quick=True)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    spec.cache = str(blocker)
    with pytest.raises(OSError):
        with pinned_corpora(spec):
            pass
    assert PIN_ENV not in os.environ
