"""A long base pretraining survives being stopped: ``pretrain(state_path=...)`` continues from its last save and
ends with the same weights and loss curve as an uninterrupted run."""
import os

import pytest
import torch

from desmoe.data import tokenize_domains
from desmoe.experiments.spec import load_spec
from desmoe.train import config_from_dict
from desmoe.train.builders import build_model, build_tokenizer, load_texts, pretrain


def _setup():
    spec = load_spec(quick=True)
    cfg = config_from_dict(spec.base["config"], source="test base")
    texts = load_texts(cfg, ["general"], "train", cfg.data.max_docs)
    tok = build_tokenizer(cfg, texts)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), tok)
    docs = tokenize_domains(tok, {"general": texts["general"]})["general"]
    return cfg, tok, model, docs


class _Stop(Exception):
    pass


def test_stopped_pretraining_continues_bitwise(tmp_path, monkeypatch):
    cfg, tok, model, docs = _setup()
    ref_losses = pretrain(model, cfg, docs, tok.eos_token_id, torch.device("cpu"), 7, aux_coef=0.01)
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    cfg, tok, model, docs = _setup()
    state = str(tmp_path / "state.pt")
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def stopping_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # stopped in step 6: the save after step 4 is the one to continue from
            raise _Stop
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", stopping_step)
    with pytest.raises(_Stop):
        pretrain(model, cfg, docs, tok.eos_token_id, torch.device("cpu"), 7, aux_coef=0.01, state_path=state,
                 save_every=2)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert os.path.isfile(state)

    cfg, tok, model, docs = _setup()  # a new process: fresh model, fresh stream
    losses = pretrain(model, cfg, docs, tok.eos_token_id, torch.device("cpu"), 7, aux_coef=0.01, state_path=state,
                      save_every=2)
    assert losses == ref_losses
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_state_of_another_length_is_refused(tmp_path):
    cfg, tok, model, docs = _setup()
    state = str(tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not this run's 9"):
        pretrain(model, cfg, docs, tok.eos_token_id, torch.device("cpu"), 4, state_path=state, save_every=2)
        pretrain(model, cfg, docs, tok.eos_token_id, torch.device("cpu"), 9, state_path=state, save_every=2)
