"""Crash-safe checkpoints: exact (bitwise, CPU) resume inside every phase, atomic writes, keep-last-N, integrity
and config checks, SIGTERM/SIGINT, non-finite losses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from desmoe.train import CheckpointError, NonFiniteLossError, TrainingInterrupted, config_from_dict
from desmoe.train import checkpoint as ck
from desmoe.train import rng
from desmoe.train import trainer as tr
from desmoe.train.trainer import run
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, log=lambda *_: None)


def _cfg(root, **train):
    os.makedirs(root, exist_ok=True)
    d = tiny_cfg(root, **train)
    d["data"]["general"] = None  # no base domain: keeps every run short
    # dropout draws from the torch RNG in every training forward: resume must restore it to be exact
    d["model"]["overrides"] = {"attention_dropout": 0.1}
    return d


def _assert_same_checkpoint(a_dir, b_dir):
    a = load_file(os.path.join(a_dir, "model", "model.safetensors"))
    b = load_file(os.path.join(b_dir, "model", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    ma, mb = ck.load_method_state(a_dir), ck.load_method_state(b_dir)
    assert torch.equal(ma["tracker"]["A_LME"], mb["tracker"]["A_LME"])
    assert torch.equal(ma["tracker"]["masks_LME"], mb["tracker"]["masks_LME"])
    assert torch.equal(ma["tracker"]["counts_LME"], mb["tracker"]["counts_LME"])
    for sa, sb in zip(ma["alr"], mb["alr"]):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"ALR {k} differs"
    oa, ob = ck.load_trainer_state(a_dir)["optimizer"], ck.load_trainer_state(b_dir)["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert oa["state"][i].keys() == ob["state"][i].keys()
        for k, v in oa["state"][i].items():  # tensors, and the experts' compact row lists
            same = torch.equal(v, ob["state"][i][k]) if torch.is_tensor(v) else v == ob["state"][i][k]
            assert same, f"optimizer state {i}.{k} differs"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 10-step des_moe run with a checkpoint after every step (warm-up [0,2), stabilisation
    [2,7), consolidation [7,10))."""
    root = tmp_path_factory.mktemp("ckpt")
    d = _cfg(str(root / "data"), save_every=1)
    s = run(config_from_dict(d), str(root / "full"), **QUIET)
    return d, s, root


@pytest.mark.parametrize("at", [1, 2, 5, 8])  # inside warm-up, the stabilisation boundary, stabilisation, consolidation
def test_resume_from_any_checkpoint_is_bitwise_exact(full_run, tmp_path, at):
    d, full, root = full_run
    src = os.path.join(root, "full", "checkpoints", f"step-{at:06d}")
    assert ck.read_meta(src)["phase"] == ("warmup" if at < 2 else "stabilization" if at <= 7 else "consolidation") \
        or at == 2
    res = run(config_from_dict(d), str(tmp_path / "resumed"), resume=src, **QUIET)
    assert res["start_step"] == at and res["final_step"] == 10
    _assert_same_checkpoint(full["checkpoint"], res["checkpoint"])


def test_checkpoint_contents_and_history(full_run):
    d, full, root = full_run
    c = full["checkpoint"]
    man = ck.verify_checkpoint(c)
    assert {"model/model.safetensors", "method.pt", "trainer.pt", "meta.json", "config.json"} <= set(man["files"])
    st = ck.load_trainer_state(c)
    assert set(st["rng"]) == {"python", "numpy", "torch", "cuda"} and st["stream"]["row"] > 0
    assert st["scheduler"]["last_epoch"] == 10
    assert ck.read_meta(c)["phase"] == "consolidation"
    with open(os.path.join(root, "full", "latest")) as f:
        assert f.read().strip() == "step-000010"
    info = [json.loads(x) for x in open(os.path.join(root, "full", "run_info.json"))]
    assert info[0]["versions"]["torch"] == torch.__version__ and "git_sha" in info[0]
    assert set(full["phase_summary"]) == {"warmup", "stabilization", "consolidation"}
    assert full["phase_summary"]["stabilization"]["steps"] == 5
    log = open(os.path.join(root, "full", "train.log")).read()
    assert "phase -> consolidation" in log and "done:" in log


def test_every_file_and_directory_is_fsynced(tmp_path, monkeypatch):
    d = _cfg(str(tmp_path / "data"), max_steps=1)
    synced = set()
    real = os.fsync

    def spy(fd):
        synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    monkeypatch.setattr(os, "fsync", spy)
    s = run(config_from_dict(d), str(tmp_path / "r"), **QUIET)
    c = os.path.realpath(s["checkpoint"])
    tmp_name = c.replace("step-000001", ".tmp-step-000001")  # files are synced before the rename
    files = ([os.path.join(tmp_name, f) for f in ck.verify_checkpoint(c)["files"]]
             + [os.path.join(tmp_name, ck.MANIFEST)])
    missing = [f for f in files if f not in synced]
    assert not missing, missing
    assert os.path.dirname(c) in synced  # the rename itself is made durable
    assert tmp_name in synced and os.path.join(tmp_name, "model") in synced


def test_rng_states_roundtrip():
    import numpy as np

    st = rng.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(3)
    rng.set_rng_state(st)
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_and_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    d = _cfg(str(tmp_path / "data"), save_every=1, keep_last=2, max_steps=4, log_every=1)
    cfg = config_from_dict(d)
    calls = {"n": 0}
    real = ck.write_trainer_state

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(ck, "write_trainer_state", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        run(cfg, str(tmp_path / "r"), **QUIET)
    root = tmp_path / "r" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-000001", "step-000002"]  # no half-written step-000003, no tmp
    assert (tmp_path / "r" / "latest").read_text().strip() == "step-000002"
    ck.verify_checkpoint(str(root / "step-000002"))
    monkeypatch.setattr(ck, "write_trainer_state", real)
    s = run(cfg, str(tmp_path / "r"), resume=True, **QUIET)
    assert s["start_step"] == 2 and s["final_step"] == 4
    assert sorted(os.listdir(root)) == ["step-000003", "step-000004"]  # keep_last=2
    hist = [json.loads(x)["step"] for x in open(tmp_path / "r" / "history.jsonl")]
    assert hist == [0, 1, 2, 3]


@pytest.fixture()
def two_step_run(tmp_path):
    d = _cfg(str(tmp_path / "data"), max_steps=2)
    s = run(config_from_dict(d), str(tmp_path / "r"), **QUIET)
    return d, s, tmp_path


def _no_new_checkpoint(tmp_path):
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["step-000002"]


def test_truncated_checkpoint_is_an_error(two_step_run):
    d, s, tmp_path = two_step_run
    p = os.path.join(s["checkpoint"], "model", "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(CheckpointError, match=r"truncated.*model/model\.safetensors"):
        run(config_from_dict(d), str(tmp_path / "r"), resume=True, **QUIET)
    _no_new_checkpoint(tmp_path)


def test_bit_flip_is_an_error(two_step_run):
    d, s, tmp_path = two_step_run
    p = os.path.join(s["checkpoint"], "trainer.pt")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"corrupt: trainer\.pt does not match its sha256"):
        run(config_from_dict(d), str(tmp_path / "r"), resume=True, **QUIET)
    os.remove(os.path.join(s["checkpoint"], ck.MANIFEST))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        run(config_from_dict(d), str(tmp_path / "r"), resume=True, **QUIET)
    _no_new_checkpoint(tmp_path)


def test_mismatched_config_or_model_names_the_keys(two_step_run):
    d, s, tmp_path = two_step_run
    other = json.loads(json.dumps(d))
    other["method"]["phi"] = 0.5
    other["train"]["lr"] = 0.5
    with pytest.raises(CheckpointError, match=r"method\.phi: checkpoint=0\.6, now=0\.5.*train\.lr"):
        run(config_from_dict(other), str(tmp_path / "r"), resume=True, **QUIET)
    other = json.loads(json.dumps(d))
    other["model"]["overrides"]["num_experts"] = 4  # another model
    with pytest.raises(CheckpointError, match=r"model\.overrides\.num_experts: checkpoint='<absent>', now=4"):
        run(config_from_dict(other), str(tmp_path / "r"), resume=True, **QUIET)
    ok = json.loads(json.dumps(d))
    ok["train"]["log_every"] = 3  # display-only keys may change
    ok["train"]["max_steps"] = 2
    from desmoe.train.rundir import RunFinished

    with pytest.raises(RunFinished, match="already finished"):  # the config matched; the run has nothing left
        run(config_from_dict(ok), str(tmp_path / "r"), resume=True, **QUIET)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(config_from_dict(d), str(tmp_path / "empty"), resume=True, **QUIET)


def test_cli_resume_errors_are_clear(two_step_run, capsys):
    import yaml

    from desmoe.cli import main

    d, s, tmp_path = two_step_run
    other = json.loads(json.dumps(d))
    other["data"]["seq_len"] = 16
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(other))
    rc = main(["train", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "r"), "--resume",
               "--no-progress"])
    assert rc == 2 and "data.seq_len: checkpoint=32, now=16" in capsys.readouterr().err
    _no_new_checkpoint(tmp_path)


def test_cli_resume_dir_continues_any_checkpoint_exactly(full_run, tmp_path):
    import yaml

    from desmoe.cli import main

    d, full, root = full_run
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    src = os.path.join(root, "full", "checkpoints", "step-000006")
    rc = main(["train", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "r"), "--resume", src,
               "--no-progress"])
    assert rc == 0
    _assert_same_checkpoint(full["checkpoint"], ck.resolve_checkpoint(str(tmp_path / "r")))


def test_sigint_checkpoints_at_the_step_boundary_then_resume_is_exact(full_run, tmp_path):
    d, full, root = full_run
    d2 = json.loads(json.dumps(d))
    d2["train"]["save_every"] = 0
    sent = []

    def log(msg):  # the signal arrives at the start of step 2 (logged phase change): checkpoint 3 is written
        if msg.startswith("step 2: phase") and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    inherited = signal.getsignal(signal.SIGINT)  # whatever the parent shell left (default, or ignored)
    with pytest.raises(TrainingInterrupted, match="SIGINT received: checkpoint of step 3") as ei:
        run(config_from_dict(d2), str(tmp_path / "r"), progress=False, log=log)
    assert ei.value.exit_code == 130 and ei.value.step == 3
    assert signal.getsignal(signal.SIGINT) is inherited  # handler restored
    res = run(config_from_dict(d2), str(tmp_path / "r"), resume=True, **QUIET)
    assert res["start_step"] == 3
    _assert_same_checkpoint(full["checkpoint"], res["checkpoint"])


def test_sigterm_subprocess_writes_checkpoint_and_exits_clearly(tmp_path):
    import yaml

    d = _cfg(str(tmp_path / "data"), max_steps=200, log_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "desmoe.train", "--config", str(tmp_path / "c.yaml"), "--output-dir",
                          str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    for line in p.stdout:  # the loop flushes its log lines: we see step 1 while it runs
        if line.startswith("step     1"):
            break
        assert time.time() - t0 < 120, "no step log line"
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: checkpoint of step" in err and "--resume" in err
    c = ck.resolve_checkpoint(str(out))
    ck.verify_checkpoint(c)
    step = ck.read_meta(c)["step"]
    assert 2 <= step < 200
    st = ck.load_trainer_state(c)
    assert st["step"] == step and st["scheduler"]["last_epoch"] == step


def test_nonfinite_loss_stops_naming_step_term_and_layer(tmp_path, monkeypatch):
    d = _cfg(str(tmp_path / "data"), max_steps=5)  # T1 = floor(0.2·5) = 1: step 0 is warm-up
    real = tr.build_model

    def poisoned(*a, **k):
        m = real(*a, **k)
        with torch.no_grad():
            m.model.layers[1].mlp.experts.gate_up_proj[:, 0, :] = float("nan")
        return m

    monkeypatch.setattr(tr, "build_model", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 0 \(warmup\): task loss is nan.*model\.layers\.1") as ei:
        run(config_from_dict(d), str(tmp_path / "r"), **QUIET)
    assert "gate_up_proj" in str(ei.value) and "skip_nonfinite" in str(ei.value)


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    d = _cfg(str(tmp_path / "data"), max_steps=4, skip_nonfinite=True)
    real = tr.build_model
    calls = {"n": 0}

    def flaky(*a, **k):
        m = real(*a, **k)

        def hook(_m, _i, out):  # the 3rd training forward (step 2) produces an inf hidden state
            if torch.is_grad_enabled() and m.training:
                calls["n"] += 1
                if calls["n"] == 3:
                    return (out[0] * float("inf"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("inf")
            return out

        m.model.layers[0].register_forward_hook(hook)
        return m

    monkeypatch.setattr(tr, "build_model", flaky)
    s = run(config_from_dict(d), str(tmp_path / "r"), **QUIET)
    assert s["skipped_nonfinite"] == [2] and s["final_step"] == 4
    assert s["phase_summary"]["consolidation"]["skipped_nonfinite"] == 1  # T2 = floor(0.7·4) = 2
    w = load_file(os.path.join(s["checkpoint"], "model", "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    rec = [json.loads(x) for x in open(tmp_path / "r" / "history.jsonl")]
    assert [r["skipped_nonfinite"] for r in rec if r["step"] == 2] == [1]
    assert "skipped batch of step 2" in open(tmp_path / "r" / "train.log").read()
