"""Floats as users write them (YAML 1.2 / Python spellings such as ``1e-5``) in config files and ``--set``;
NaN/inf refused naming the field; strings that look like floats survive ``config.yaml``."""
import os

import pytest
import yaml

from desmoe.train import apply_overrides, load_config
from desmoe.train import yamlio

from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = [("1e-5", 1e-5), ("1E-5", 1e-5), ("1e+3", 1e3), ("+1e3", 1e3), (".5", 0.5), ("5.", 5.0),
          ("-2.5e-3", -2.5e-3), ("-.5", -0.5), ("1_000.0", 1000.0), ("1.0e5", 1e5), ("3.0e-3", 3e-3)]
NON_FINITE = ["nan", "NaN", ".nan", ".NaN", "inf", ".inf", "-inf", "-.inf", "+.inf", ".Inf"]


def _config_file(tmp_path, key, text, name="c.yaml"):
    """A config file whose ``train.<key>`` is written exactly as ``text``."""
    d = tiny_cfg(str(tmp_path))
    d["train"][key] = "VALUE_PLACEHOLDER"
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d).replace("VALUE_PLACEHOLDER", text))
    return str(p)


@pytest.mark.parametrize("text,want", FLOATS)
def test_float_spellings_in_set_and_yaml(tmp_path, text, want):
    """``--set train.lr=TEXT`` and ``lr: TEXT`` in the file give the float (``train.max_grad_norm``, which has no
    upper bound, for values above lr's 10; negative values reach the range check, not the type check)."""
    key = "lr" if 0 < want <= 10 else "max_grad_norm"
    assert type(yamlio.load(text)) is float
    assert apply_overrides({}, [f"train.{key}={text}"]) == {"train": {key: want}}
    plain = _config_file(tmp_path, key, "1.0")
    from_file = _config_file(tmp_path, key, text, name="f.yaml")
    for args in ((plain, [f"train.{key}={text}"]), (from_file, [])):
        if want > 0:
            assert getattr(load_config(*args).train, key) == want
        else:
            with pytest.raises(ValueError, match=rf"train\.{key} must be in \(0"):
                load_config(*args)
    if 0 < want <= 1:  # the other sections' float fields alike
        assert load_config(plain, [f"method.phi={text}"]).method.phi == want


@pytest.mark.parametrize("text", NON_FINITE)
def test_nan_and_inf_are_refused_naming_the_field(tmp_path, text):
    with pytest.raises(ValueError, match=r"train\.lr must be a finite number"):
        load_config(_config_file(tmp_path, "lr", "0.01"), [f"train.lr={text}"])
    with pytest.raises(ValueError, match=r"train\.lr must be a finite number"):
        load_config(_config_file(tmp_path, "lr", text))


def test_float_looking_text_in_string_fields(tmp_path):
    p = _config_file(tmp_path, "lr", "0.01")
    with pytest.raises(ValueError, match=r"data\.text_field must be a string.*quote text"):
        load_config(p, ["data.text_field=1e5"])
    assert load_config(p, ['data.text_field="1e5"']).data.text_field == "1e5"
    # what desmoe writes (config.yaml) quotes such strings, so they load back as text
    from desmoe.train.checkpoint import save_config

    d = {"data": {"text_field": "1e5", "general": "-.5"}, "train": {"lr": 1e-5}}
    save_config(str(tmp_path / "run"), d)
    assert yamlio.load((tmp_path / "run" / "config.yaml").read_text()) == d
    assert apply_overrides({}, ["train.max_steps=7", "method.name=des_moe", "train.plots=false"]) == {
        "train": {"max_steps": 7, "plots": False}, "method": {"name": "des_moe"}}  # ints, names, bools unchanged
    with pytest.raises(ValueError, match=r"--set train\.lr"):
        apply_overrides({}, ["train.lr=[1e-5"])


def test_experiment_spec_lrs(tmp_path):
    from desmoe.experiments import load_spec
    from desmoe.experiments.spec import CONFIG_DIR

    src = open(os.path.join(CONFIG_DIR, "quick.yaml")).read()
    assert "lrs: [0.001, 0.003]" in src
    p = tmp_path / "q.yaml"
    p.write_text(src.replace("lrs: [0.001, 0.003]", "lrs: [1e-3, 3E-3]"))
    assert load_spec(str(p)).lrs == [1e-3, 3e-3]
    p.write_text(src.replace("lrs: [0.001, 0.003]", "lrs: [1e-3, .nan]"))
    with pytest.raises(ValueError, match="lrs must be"):
        load_spec(str(p))


def test_cli_train_accepts_set_lr_1e_5(tmp_path, capsys):
    """``desmoe train --set train.lr=1e-5`` runs (it was refused as the string '1e-5'); the run's config.yaml
    holds the float."""
    from desmoe.cli import main

    p = _config_file(tmp_path, "lr", "0.01")
    out = tmp_path / "run"
    rc = main(["train", "--config", p, "--output-dir", str(out), "--max-steps", "1", "--quiet",
               "--set", "train.lr=1e-5", "--set", "train.max_steps=2", "--set", "train.pretrain_lr=1E-3"])
    assert rc == 0, capsys.readouterr().err
    assert "done: 1 steps" in capsys.readouterr().out
    saved = yamlio.load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-5 and saved["train"]["pretrain_lr"] == 1e-3
