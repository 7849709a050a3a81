"""`desmoe export --layer-by-layer`: the model in host memory, one decoder layer at a time on the device
(desmoe.export_layers). Checked on CPU: the same fitted routers, agreement, held-out losses and files as the
whole-model export; at most one decoder layer off the host at any moment; the model families' forwards equal;
models it cannot run refused by name."""
import json
import os
import sys

import pytest
import torch
from torch import nn

import desmoe.export_layers as el
from desmoe.cli import main
from desmoe.data import eval_batches
from desmoe.eval import domain_loss
from desmoe.export import ExportError, export
from desmoe.export_layers import decoder_layers, layer_major_heads, run_layer_major
from desmoe.integrations.hf import patch
from desmoe.integrations.tiny import tiny_model, tiny_model_types

sys.path.insert(0, os.path.dirname(__file__))
from test_export import trained  # noqa: E402,F401  (the tiny DES-MoE run with a far-from-zero ALR)
from test_export_streaming import _tensors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = {"fit_tokens": 1024, "eval_tokens": 256, "min_agreement": 0.0}


@pytest.fixture(params=["isolated", "concatenated"])
def packing(request, monkeypatch):
    """The run's packing (isolated: position_ids, the default) or the checkpoint's config read back with
    ``data.packing: concatenated`` (batches with a 2-D attention_mask and no position_ids)."""
    if request.param == "concatenated":
        import dataclasses

        import desmoe.train.evaluate as ev

        real = ev.checkpoint_config

        def concatenated(*a, **k):
            cfg = real(*a, **k)
            return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing="concatenated"))

        monkeypatch.setattr(ev, "checkpoint_config", concatenated)
    return request.param


def test_layer_by_layer_export_equals_the_whole_model_export(trained, tmp_path, packing):  # noqa: F811
    whole = export(str(trained), str(tmp_path / "whole"), **TOKENS)
    lbl = export(str(trained), str(tmp_path / "lbl"), layer_by_layer=True, **TOKENS)
    assert lbl["layer_by_layer"] and not whole["layer_by_layer"] and whole["had_alr"]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "lbl")
    assert set(a) == set(b)
    gates = [k for k in a if k.endswith("mlp.gate.weight")]
    assert len(gates) == 2
    for k in gates:  # the fitted routers
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    for k in a:  # every tensor written (fitted routers included) is the same
        assert torch.equal(a[k], b[k]), k
    for split in ("agreement", "agreement_validation"):
        assert len(whole[split]) == len(lbl[split]) == 2
        for x, y in zip(whole[split], lbl[split]):
            assert x["tokens"] == y["tokens"] > 0
            for key in ("topk_exact", "topk_overlap"):
                assert abs(x[key] - y[key]) < 1e-5, (split, key, x, y)
    assert set(whole["held_out_loss"]) == set(lbl["held_out_loss"]) == {"alpha", "beta", "gamma", "base"}
    for d, x in whole["held_out_loss"].items():
        for key in ("trained", "exported", "delta"):
            assert abs(x[key] - lbl["held_out_loss"][d][key]) < 1e-5, (d, key)
    # the numbers compared are informative: the export is not the trained model, the agreement not all 1
    assert any(abs(x["delta"]) > 1e-6 for x in whole["held_out_loss"].values())
    assert min(x["topk_exact"] for x in whole["agreement"]) < 1.0


def _record_moves(monkeypatch):
    """Wrap the two functions that move a decoder layer; every decoder layer's forward asserts it is on the device."""
    events, on_device = [], set()
    real_dev, real_host = el._to_device, el._to_host

    def must_be_on_device(mod, args, kwargs):
        assert id(mod) in on_device, f"{type(mod).__name__} ran in host memory"

    def to_device(layer, device):
        assert not on_device, "a second decoder layer went to the device before the first came back"
        if not getattr(layer, "_test_hooked", False):
            layer.register_forward_pre_hook(must_be_on_device, with_kwargs=True)
            layer._test_hooked = True
        real_dev(layer, device)
        on_device.add(id(layer))
        events.append(("device", layer))

    def to_host(layer):
        assert on_device == {id(layer)}, "a layer came back that was not the one on the device"
        real_host(layer)
        on_device.discard(id(layer))
        events.append(("host", layer))

    monkeypatch.setattr(el, "_to_device", to_device)
    monkeypatch.setattr(el, "_to_host", to_host)
    return events, on_device


def _passes(events, n_layers):
    """The recorded moves as passes: each pass moves layers 0..L-1 of one model to the device and back, in order."""
    assert len(events) % (2 * n_layers) == 0, len(events)
    passes = []
    for p in range(0, len(events), 2 * n_layers):
        chunk = events[p:p + 2 * n_layers]
        layers = [layer for _, layer in chunk[::2]]
        assert [kind for kind, _ in chunk] == ["device", "host"] * n_layers
        assert [layer for _, layer in chunk[1::2]] == layers  # each one back before the next goes
        assert len({id(x) for x in layers}) == n_layers  # every layer once
        passes.append(layers)
    return passes


def test_at_most_one_decoder_layer_is_off_the_host(trained, tmp_path, monkeypatch):  # noqa: F811
    events, on_device = _record_moves(monkeypatch)
    rep = export(str(trained), str(tmp_path / "lbl"), layer_by_layer=True, **TOKENS)
    assert not on_device
    passes = _passes(events, 2)
    # fit, agreement on validation, agreement on test, the trained model's losses, the exported model's losses
    assert len(passes) == 5
    assert len({id(p[0]) for p in passes[:4]}) == 1 and passes[4][0] is not passes[0][0]  # two models
    assert rep["layer_by_layer"]
    events.clear()
    export(str(trained), str(tmp_path / "whole"), **TOKENS)
    assert events == []  # the whole-model path moves no layer


def test_run_layer_major_on_a_model_moves_each_layer_once(monkeypatch):
    events, on_device = _record_moves(monkeypatch)
    model = tiny_model("qwen3_moe").eval()
    docs = [list(range(3, 3 + n)) for n in (9, 17, 5, 30, 11)]
    batches = eval_batches(docs, 16, 2, 2)
    with torch.no_grad():  # the whole model first (the recorder's hooks then insist on the device)
        ref = [model.model(**{k: b[k] for k in ("input_ids", "position_ids")}, use_cache=False).last_hidden_state
               for b in batches]
    called = []
    finals = run_layer_major(model, batches, device="cpu", before_batch=called.append)
    assert [layer for layer in _passes(events, 2)[0]] == list(decoder_layers(model)) and not on_device
    assert called == [b for _ in range(2) for b in batches]  # before each batch's forward, per layer
    for h, r in zip(finals, ref):  # the last layer's output, before the final norm
        assert torch.equal(model.model.norm(h), r)


@pytest.mark.parametrize("pack", ["isolated", "concatenated"])
def test_every_family_layer_major_loss_equals_the_whole_model_loss(pack):
    """domain_loss through the layer-major head equals domain_loss on the whole model, bitwise, for every tiny family
    (per-layer masks: gpt-oss sliding windows, qwen3-next / lfm2 linear-attention layers; MLA; shared experts)."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 120, (int(n),), generator=g).tolist() for n in torch.randint(5, 30, (10,), generator=g)]
    kw = dict(seq_len=24, batch_size=3, eos_id=2, packing=pack)
    batches = eval_batches(docs, **kw)
    bad = {}
    for mt in tiny_model_types():
        model = tiny_model(mt).eval()
        patch(model, backend="reference")
        ref = domain_loss(model, docs, **kw)["loss"]
        with layer_major_heads(model, {"d": batches}, device="cpu") as heads:
            got = domain_loss(heads["d"], docs, **kw)["loss"]
        assert not model.training  # domain_loss on the head leaves the model's mode as it was
        if got != ref:
            bad[mt] = (ref, got)
    assert not bad, bad


# --- models it cannot run, refused by name ---------------------------------------------------------------------
class ToyDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None, scale=1.0):
        return (torch.tanh(self.lin(hidden_states)) * scale, None)  # a tuple, as older transformers layers return


class ToyModel(nn.Module):
    """A causal-LM-shaped model: embeddings, three decoder layers (tuple outputs), norm, head."""

    def __init__(self, mode="ok"):
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(ToyDecoderLayer() for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask=None, **kw):
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers[:2] if self.mode == "skip" else self.layers):
            h = layer(h, attention_mask=attention_mask, scale=1.0 + i)[0]
            if self.mode == "between":
                h = h + 1.0
        return type("Out", (), {"logits": self.lm_head(self.norm(h))})()


def test_layer_major_toy_with_tuple_layers_and_its_refusals():
    batches = [{"input_ids": torch.randint(0, 20, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
                "labels": torch.randint(0, 20, (2, 6))} for _ in range(2)]
    model = ToyModel().eval()
    with torch.no_grad():
        ref = [model(b["input_ids"], b["attention_mask"]).logits for b in batches]
        with layer_major_heads(model, {"a": batches}, device="cpu") as heads:
            got = [heads["a"](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    assert all(torch.equal(r, x) for r, x in zip(ref, got))
    assert all(isinstance(m, ToyDecoderLayer) for m in model.layers)  # the stand-ins are gone
    with pytest.raises(ExportError, match=r"ToyModel changes the hidden states between decoder layers 0 and 1"):
        run_layer_major(ToyModel("between"), batches, device="cpu")
    with pytest.raises(ExportError, match=r"called 2 of its 3 decoder layers"):
        run_layer_major(ToyModel("skip"), batches, device="cpu")
    plain = nn.Sequential(nn.Embedding(20, 8), nn.ModuleList([nn.Linear(8, 8)]))
    with pytest.raises(ExportError, match=r"Sequential has no decoder layers.*class names end in 'DecoderLayer'"):
        run_layer_major(plain, batches, device="cpu")
    m = ToyModel("between")
    with pytest.raises(ExportError):
        run_layer_major(m, batches, device="cpu")
    assert all(isinstance(x, ToyDecoderLayer) for x in m.layers)  # restored after a refusal too


def test_recorded_arguments_keep_shared_tensors_shared_and_drop_a_kv_cache():
    """A mask shared by every layer stays one tensor per batch; a cache the model made for itself is not carried
    from layer to layer (it would hold every layer's keys and values of every batch)."""
    from transformers import DynamicCache

    mask = torch.ones(2, 3)
    calls = el._moved([{"attention_mask": mask, "cache": DynamicCache(), "pe": (mask, mask), "use_cache": True}] * 2,
                      "cpu", {})
    assert calls[0]["cache"] is None and calls[0]["use_cache"] is True
    assert calls[0]["attention_mask"] is calls[1]["attention_mask"] is calls[0]["pe"][1]


def test_export_layer_by_layer_bad_input(trained, tmp_path):  # noqa: F811
    with pytest.raises(ExportError, match="layer_by_layer must be a bool, got 'yes'"):
        export(str(trained), str(tmp_path / "x"), layer_by_layer="yes")
    assert not (tmp_path / "x").exists()


def test_cli_layer_by_layer_names_the_mode(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out), "--fit-tokens", "512",
                 "--eval-tokens", "256", "--min-agreement", "0", "--layer-by-layer"]) == 0
    text = capsys.readouterr().out
    assert "forwards: layer by layer: one decoder layer on cpu at a time" in text and "top-k exact" in text
    assert json.loads((out / "desmoe_export.json").read_text())["layer_by_layer"] is True
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "w"), "--fit-tokens", "512",
                 "--eval-tokens", "256", "--min-agreement", "0"]) == 0
    assert "forwards: whole model on cpu" in capsys.readouterr().out
    from desmoe.cli.parser import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "export")[1]
    assert "one decoder layer on --device at a time" in " ".join(sub.format_help().split())
    assert "larger than the device" in " ".join(sub.format_help().split())
