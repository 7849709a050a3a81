"""The trained model as users load it: desmoe.from_pretrained (model + ALR, exactly as trained) and
`desmoe export` (a stock HF model whose linear routers are fitted to the trained routing, with its report)."""
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import desmoe
from desmoe.cli import main
from desmoe.export import ExportError, export, fit_linear_routers, routing_agreement
from desmoe.integrations.hf import routers as get_routers
from desmoe.method.alr_files import ALR_FILE, ALR_NOTICE
from desmoe.train import checkpoint as ck
from desmoe.train import config_from_dict
from desmoe.train.trainer import run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
from test_train import tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DES-MoE run whose ALR is far from zero (so routing differs from the base router)."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(str(root), max_steps=6, lr=3e-2)
    out = root / "run"
    run(config_from_dict(cfg), str(out))
    return out


def _ids(n=2, T=24, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n, T), generator=g)


def _old_path_model(run_dir):
    """The trained model rebuilt the long way (HF model + patch + the method controller's saved ALR state)."""
    from desmoe.method import MethodController
    from desmoe.train.config import load_config

    ckpt = ck.resolve_checkpoint(str(run_dir))
    cfg = load_config(ck.run_config_path(ckpt))
    model, _ = ck.load_model(ckpt)
    desmoe.patch(model, backend="reference")
    meta = ck.read_meta(ckpt)
    ctl = MethodController(model, cfg.method, int(meta["total_steps"]), list(meta["domains"]))
    ctl.load_state_dict(ck.load_method_state(ckpt))
    return model.eval()


def test_checkpoint_model_folder_carries_the_alr_and_says_it_is_not_the_trained_model(trained):
    mdir = os.path.join(ck.resolve_checkpoint(str(trained)), "model")
    assert os.path.isfile(os.path.join(mdir, ALR_FILE))
    notice = open(os.path.join(mdir, ALR_NOTICE)).read()
    assert "desmoe export" in notice and "from_pretrained" in notice


def test_from_pretrained_is_exactly_the_trained_model_and_stock_loading_is_not(trained):
    ids = _ids()
    model, tok = desmoe.from_pretrained(str(trained), backend="reference")
    assert tok is not None
    assert all(r.residual is not None for r in get_routers(model))
    ref = _old_path_model(trained)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = ref(input_ids=ids).logits
        mdir = os.path.join(ck.resolve_checkpoint(str(trained)), "model")
        stock = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
        c = stock(input_ids=ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4  # model/ alone routes with the pretrained router: not the trained model


def test_fitted_routers_agree_better_than_the_pretrained_router(trained):
    model, _ = desmoe.from_pretrained(str(trained), backend="reference")
    fit = [{"input_ids": _ids(4, 32, seed=s)} for s in range(4)]
    held = [{"input_ids": _ids(4, 32, seed=100 + s)} for s in range(2)]
    fitted = fit_linear_routers(model, fit)
    base = [r.weight.detach().float().cpu() for r in get_routers(model)]
    a_fit = routing_agreement(model, fitted, held)
    a_base = routing_agreement(model, base, held)
    assert len(a_fit) == len(get_routers(model))
    assert sum(a["topk_overlap"] for a in a_fit) > sum(a["topk_overlap"] for a in a_base)
    assert all(0.0 <= a["topk_exact"] <= 1.0 and a["tokens"] == 4 * 2 * 32 for a in a_fit)


def test_export_writes_a_stock_model_with_its_report(trained, tmp_path):
    out = tmp_path / "exported"
    rep = export(str(trained), str(out), fit_tokens=2048, eval_tokens=512, min_agreement=0.0)
    assert rep["had_alr"] and not rep["below_threshold"]
    saved = json.loads((out / "desmoe_export.json").read_text())
    assert saved["agreement"] == rep["agreement"] and len(saved["agreement"]) == len(rep["agreement"])
    assert set(rep["held_out_loss"]) == {"alpha", "beta", "gamma", "base"}
    # loads and runs in plain transformers, with no ALR file and linear routers that differ from the base's
    assert not (out / ALR_FILE).exists()
    stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(
        os.path.join(ck.resolve_checkpoint(str(trained)), "model"), dtype=torch.float32)
    gate_keys = [k for k in stock.state_dict() if k.endswith("mlp.gate.weight")]
    assert gate_keys and any(not torch.equal(stock.state_dict()[k], base.state_dict()[k]) for k in gate_keys)
    for k, v in stock.state_dict().items():  # everything but the routers is the trained checkpoint's
        if k not in gate_keys:
            assert torch.equal(v, base.state_dict()[k]), k
    with torch.no_grad():
        assert torch.isfinite(stock(input_ids=_ids()).logits).all()
    for r in rep["held_out_loss"].values():
        assert abs(r["delta"] - (r["exported"] - r["trained"])) < 1e-12


def test_export_refuses_below_the_threshold_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match="nothing written"):
        export(str(trained), str(out), fit_tokens=512, eval_tokens=512, min_agreement=1.0 + 0.0, on_low="refuse",
               ridge=1e6)  # a huge ridge keeps the pretrained router: it cannot reproduce the ALR everywhere
    assert not out.exists()


def test_export_cli_and_bad_input(trained, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out), "--fit-tokens", "1024",
                 "--eval-tokens", "512", "--min-agreement", "0"]) == 0
    text = capsys.readouterr().out
    assert "top-k exact" in text and "exported" in text
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 2  # not empty: never overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "y"), "--min-agreement", "2"]) == 2
    assert "min_agreement" in capsys.readouterr().err


# --- export and from_pretrained verify what they read, and export cleans up after itself ------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def run_copy(trained, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _export_fails(capsys, ckpt, out, *names):
    capsys.readouterr()
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--fit-tokens", "512", "--eval-tokens", "512",
               "--min-agreement", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    for n in names:
        assert str(n) in err, (n, err)
    assert not out.exists() and not (out.parent / (out.name + ".tmp-export")).exists()
    return err


def test_export_verifies_the_checkpoint_like_eval(run_copy, tmp_path, capsys):
    ckpt = ck.resolve_checkpoint(str(run_copy))
    p = os.path.join(ckpt, "model", "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    _export_fails(capsys, run_copy, tmp_path / "out", "truncated", "model/model.safetensors")
    # the checkpoint's model/ folder passed directly: still verified as part of its checkpoint
    _export_fails(capsys, os.path.join(ckpt, "model"), tmp_path / "out", "truncated", "model.safetensors")


def test_a_bin_only_model_folder_is_refused_naming_the_file(run_copy, tmp_path, capsys):
    """A folder with only ``pytorch_model.bin`` (a pickle): never unpickled, the error says what to do."""
    import shutil

    marker = tmp_path / "pwned"
    mdir = tmp_path / "hf"
    shutil.copytree(os.path.join(ck.resolve_checkpoint(str(run_copy)), "model"), mdir)
    os.remove(mdir / "model.safetensors")
    torch.save({"x": _Payload(marker)}, mdir / "pytorch_model.bin")
    with pytest.raises(ck.CheckpointError, match="pytorch_model.bin") as e:
        desmoe.from_pretrained(str(mdir))
    assert "safetensors" in str(e.value)
    # export reads the model folder of a run: place it as one
    _export_fails(capsys, mdir, tmp_path / "out", "pytorch_model.bin", "safetensors")
    assert not marker.exists(), "the payload ran"


def test_an_exported_folder_with_a_planted_pickle_is_never_unpickled(trained, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "exported"
    export(str(trained), str(out), fit_tokens=512, eval_tokens=512, min_agreement=0.0)
    desmoe.from_pretrained(str(out))  # the export loads back through desmoe
    torch.save({"x": _Payload(marker)}, out / "pytorch_model.bin")  # beside the safetensors: ignored
    desmoe.from_pretrained(str(out))
    good = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ck.CheckpointError, match="config.json"):
        desmoe.from_pretrained(str(out))
    (out / "config.json").write_bytes(good)
    os.remove(out / "model.safetensors")  # alone: refused naming it
    with pytest.raises(ck.CheckpointError, match="pytorch_model.bin"):
        desmoe.from_pretrained(str(out))
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("fault", ["disk_full", "ctrl_c"])
def test_a_failed_export_leaves_nothing_behind(trained, tmp_path, capsys, monkeypatch, fault):
    """A full disk while writing (or Ctrl-C while measuring the exported model): OUT and OUT.tmp-export are
    removed, the message names --out."""
    import errno

    import desmoe.export as ex

    out = tmp_path / "out"
    if fault == "disk_full":
        real = ex.write_weights_streaming

        def full(src, d, *a, **k):
            real(src, d, *a, **k)  # shards half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(d, "model.safetensors"))

        monkeypatch.setattr(ex, "write_weights_streaming", full)
        _export_fails(capsys, trained, out, str(out), "No space left on device", "nothing was written")
    else:
        calls = []
        real = ex._held_out_loss

        def interrupted(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # the exported model's evaluation, inside OUT.tmp-export's life
                assert (tmp_path / "out.tmp-export").is_dir()
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(ex, "_held_out_loss", interrupted)
        capsys.readouterr()
        rc = main(["export", "--checkpoint", str(trained), "--out", str(out), "--fit-tokens", "512",
                   "--eval-tokens", "512", "--min-agreement", "0"])
        assert rc == 130 and "interrupted" in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "out.tmp-export").exists()


def test_export_out_is_checked_before_the_work(trained, tmp_path, capsys, monkeypatch):
    import desmoe.export as ex

    monkeypatch.setattr(ex, "_model_dir", lambda p: pytest.fail("the checkpoint was read before --out was checked"))
    f = tmp_path / "file"
    f.write_text("x")
    for out, name in ((f, "is a file"), (f / "sub", "is a file")):
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert name in err and str(f) in err, err


def test_export_dtype_shards_and_the_validation_gate(trained, tmp_path):
    # bf16 on disk when asked (auto: the run's model.dtype, float32 for this tiny run), sharded safetensors with an
    # index, the gate judged on the validation split while test agreement is reported
    out = tmp_path / "bf16"
    rep = export(str(trained), str(out), fit_tokens=2048, eval_tokens=512, min_agreement=0.0, dtype="bfloat16",
                 max_shard_size=20_000)
    assert rep["dtype"] == "bfloat16" and rep["gate_split"] == "validation"
    assert len(rep["agreement_validation"]) == len(rep["agreement"])
    assert rep["min_topk_exact"] == min(a["topk_exact"] for a in rep["agreement_validation"])
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    stock = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(stock.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert rep["architectures"] == stock.config.architectures and "desmoe" not in (out / "config.json").read_text()
    assert export(str(trained), str(tmp_path / "auto"), fit_tokens=2048, eval_tokens=512,
                  min_agreement=0.0)["dtype"] == "float32"
    with pytest.raises(ExportError, match="dtype must be one of"):
        export(str(trained), str(tmp_path / "x"), dtype="int8")


def _tiny_task(root):
    """A multiple-choice lm-eval task of our own: a YAML and a local JSONL (no hub)."""
    root.mkdir(exist_ok=True)
    rows = [{"question": f"alpha beta {i}", "choices": ["alpha", "beta", "gamma"], "answer": i % 3} for i in range(6)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "desmoe_tiny_mc.yaml").write_text(
        "task: desmoe_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return root


def test_eval_tasks_on_the_checkpoint_and_on_an_export(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = _tiny_task(tmp_path / "tasks")
    out_json = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(trained), "--tasks", "desmoe_tiny_mc", "--include-path", str(tasks),
                 "--max-batches", "1", "--math-n", "0", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert 0.0 <= res["lm_eval"]["desmoe_tiny_mc"]["acc,none"] <= 1.0
    assert res["domains"]  # next to the held-out losses
    assert "desmoe_tiny_mc" in capsys.readouterr().out
    exp = tmp_path / "exp"
    export(str(trained), str(exp), fit_tokens=2048, eval_tokens=512, min_agreement=0.0)
    assert main(["eval", "--checkpoint", str(exp), "--tasks", "desmoe_tiny_mc", "--include-path", str(tasks),
                 "--format", "json"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert set(res2) == {"lm_eval"} and "acc,none" in res2["lm_eval"]["desmoe_tiny_mc"]
    assert main(["eval", "--checkpoint", str(trained), "--tasks", "no_such_task", "--include-path",
                 str(tasks)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err
