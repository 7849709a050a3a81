"""Run cache keys: a changed default never reuses a run made under the old one; a config that pins the old value
keeps its cached runs."""
import json
import os

from desmoe.experiments import runner
from desmoe.experiments.runner import KEY_REFERENCE_DEFAULTS, _key, finetune_config, key_config, run_dir_of
from desmoe.experiments.spec import load_spec
from desmoe.method.config import MethodConfig


def _job(spec, **overrides):
    return dict(spec=spec, base_path="/base", method="des_moe", domains=["math", "code"], lr=1e-3, seed=0,
                method_overrides=overrides or None)


def test_paper_config_pins_the_reference_width_and_keeps_its_keys():
    spec = load_spec()  # paper.yaml pins alr_expansion 4, the width its cached runs were made with
    assert spec.finetune["method"]["alr_expansion"] == KEY_REFERENCE_DEFAULTS[("method", "alr_expansion")]
    cfg = finetune_config(**_job(spec))
    written_before = json.loads(json.dumps(cfg))
    del written_before["method"]["alr_expansion"]  # the dict the key was made from before the default changed
    assert os.path.basename(run_dir_of(**_job(spec))).endswith(_key(written_before))


def test_a_new_default_is_written_into_the_key():
    assert MethodConfig().alr_expansion != KEY_REFERENCE_DEFAULTS[("method", "alr_expansion")]
    unpinned = {"method": {"name": "des_moe"}, "train": {"lr": 1e-3}}
    keyed = key_config(unpinned)
    assert keyed["method"]["alr_expansion"] == MethodConfig().alr_expansion
    assert _key(keyed) != _key(unpinned)  # the run made when 4 was the default is not reused
    pinned = {"method": {"name": "des_moe", "alr_expansion": 4.0}, "train": {"lr": 1e-3}}
    assert key_config(pinned) == unpinned  # pinning the reference is the old, default-free key
    other = {"method": {"name": "des_moe", "alr_expansion": 1}}
    assert key_config(other) == other
    assert unpinned == {"method": {"name": "des_moe"}, "train": {"lr": 1e-3}}  # the caller's dict is not changed


def test_each_reference_field_exists_with_a_default(monkeypatch):
    for (section, field), _ in KEY_REFERENCE_DEFAULTS.items():
        assert hasattr(runner._CURRENT_DEFAULTS[section](), field)
    # were the default the reference again, keys would be the dicts as written
    monkeypatch.setitem(KEY_REFERENCE_DEFAULTS, ("method", "alr_expansion"), MethodConfig().alr_expansion)
    assert key_config({"method": {"name": "fft"}}) == {"method": {"name": "fft"}}
