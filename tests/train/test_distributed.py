"""torchrun on CPU (gloo, 2 processes): DDP equals the single-process run with the same global batch (loss,
weights, A, masks), every rank holds the same A/masks, save on 2 ranks + resume on 2 ranks is exact; FSDP2
(``fully_shard``) runs and matches too. Launched exactly as the README says:
``torchrun --nproc-per-node 2 -m desmoe.train --config C.yaml --output-dir DIR``."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import torch.distributed as tdist
from desmoe.train import config_from_dict
from desmoe.train import checkpoint as ck
from desmoe.train.durable import sha256_file
from desmoe.train.trainer import run
from test_train import tiny_cfg

pytestmark = [pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed not available"),
              pytest.mark.usefixtures("one_thread")]
QUIET = dict(progress=False, log=lambda *_: None)


def _torchrun(tmp_path, cfg: dict, out, *extra, nproc=2, timeout=120):
    p = tmp_path / f"cfg-{os.path.basename(str(out))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "desmoe.train", "--config", str(p), "--output-dir", str(out), "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _weights(ckpt):
    return load_file(os.path.join(ckpt, "model", "model.safetensors"))


def _history(run_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run_dir, "history.jsonl")))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer saved once (so every process uses the same one) and the single-process reference run with
    the global batch (4 rows = 2 ranks × 2)."""
    from desmoe.data import train_tokenizer

    root = tmp_path_factory.mktemp("dist")
    os.makedirs(root / "data")
    d = tiny_cfg(str(root / "data"), max_steps=6, log_every=1, device="cpu")
    d["data"]["general"] = None
    d["train"]["aux_loss"] = False  # the load-balancing loss is per rank (nonlinear in the batch): not comparable
    texts = [json.loads(x)["text"] for p in d["data"]["sources"].values() for x in open(p)]
    train_tokenizer(texts, vocab_size=300).save_pretrained(str(root / "tok"))
    d["tokenizer"] = {"path": str(root / "tok")}
    d["data"]["batch_size"] = 4
    # Judged on the reference experts: with AdamW at lr 1e-2, weights whose gradient is near zero turn the
    # last-bit differences of a split batch into ~1e-5 weight differences within 6 steps, and how many cross
    # this test's tolerance depends on the kernel's rounding (the grouped-GEMM path: one weight of 768 at 4e-5).
    # The kernels' equivalence is tested on their own (tests/ops/test_grouped_ops.py).
    d["model"]["backend"] = "reference"
    single = run(config_from_dict(d), str(root / "single"), **QUIET)
    dd = json.loads(json.dumps(d))
    dd["data"]["batch_size"] = 2  # per rank
    dd["train"]["distributed"] = "ddp"
    return d, dd, single, root


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def dist_full(request, setup, tmp_path_factory):
    """The uninterrupted 2-rank run of each mode."""
    d, dd, single, root = setup
    dd = json.loads(json.dumps(dd))
    dd["train"]["distributed"] = "none"  # selected on the command line, as in the README
    tmp = tmp_path_factory.mktemp(request.param)
    r = _torchrun(tmp, dd, tmp / "full", "--set", f"train.distributed={request.param}")
    return request.param, dd, tmp / "full", r


def test_two_ranks_match_single_process_and_agree(setup, dist_full):
    d, _, single, root = setup
    mode, dd, out, r = dist_full
    assert "done: 6 steps of des_moe" in r.stdout
    s = json.load(open(out / "summary.json"))
    assert s["world_size"] == 2 and s["distributed"] == mode
    hs, hd = _history(root / "single"), _history(out)
    for step in range(6):  # the global-batch loss, step by step
        assert hd[step]["task"] == pytest.approx(hs[step]["task"], rel=1e-5, abs=1e-6), step
        assert hd[step]["kd"] == pytest.approx(hs[step]["kd"], rel=1e-4, abs=1e-6), step
    ws, wd = _weights(single["checkpoint"]), _weights(s["checkpoint"])
    assert ws.keys() == wd.keys()
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5, msg=k)
    m0 = ck.load_method_state(s["checkpoint"])["tracker"]
    m1 = torch.load(os.path.join(s["checkpoint"], "rng-rank000001.pt"), weights_only=False)["tracker"]
    msingle = ck.load_method_state(single["checkpoint"])["tracker"]
    for k in ("A_LME", "masks_LME", "counts_LME", "load_LE"):  # rank 0 == rank 1 == one process, exactly
        assert torch.equal(m0[k], m1[k]), k
        assert torch.equal(m0[k], msingle[k]), k
    assert s["masks"] == single["masks"]
    if mode == "fsdp2":  # sharded optimizer state through torch.distributed.checkpoint
        assert os.path.isdir(os.path.join(s["checkpoint"], "optim"))


def test_save_on_two_ranks_resume_on_two_ranks_is_exact(dist_full, tmp_path):
    mode, dd, full, _ = dist_full
    part = tmp_path / "part"
    sel = ("--set", f"train.distributed={mode}")
    _torchrun(tmp_path, dd, part, "--max-steps", "3", *sel)  # stops inside stabilisation ([1, 4) of T=6)
    r = _torchrun(tmp_path, dd, part, "--resume", *sel)
    assert "resumed from" in r.stdout and "done: 3 steps" in r.stdout
    a = _weights(os.path.join(full, "checkpoints", "step-000006"))
    b = _weights(os.path.join(part, "checkpoints", "step-000006"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = ck.load_method_state(os.path.join(full, "checkpoints", "step-000006"))["tracker"]
    mb = ck.load_method_state(os.path.join(part, "checkpoints", "step-000006"))["tracker"]
    assert torch.equal(ma["A_LME"], mb["A_LME"]) and torch.equal(ma["masks_LME"], mb["masks_LME"])


def test_distributed_needs_torchrun(setup, tmp_path, monkeypatch):
    d, dd, single, root = setup
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        run(config_from_dict(dd), str(tmp_path / "x"), **QUIET)
    bad = json.loads(json.dumps(dd))
    bad["train"]["distributed"] = "deepspeed"
    with pytest.raises(ValueError, match="train.distributed"):
        config_from_dict(bad)


# (mode, file planted in the 2-rank run's last checkpoint): every file a DDP or FSDP2 checkpoint adds
PLANTS = [("ddp", "rng-rank000001.pt"), ("fsdp2", "optim/.metadata"), ("fsdp2", "optim/__0_0.distcp"),
          ("fsdp2", "optim/__1_0.distcp"), ("fsdp2", "optim/__1_0.distcp:tensor")]


@pytest.mark.parametrize("rel", sorted({r for _, r in PLANTS}))
def test_planted_payload_in_a_distributed_checkpoint_is_refused_on_resume(dist_full, tmp_path, rel):
    """A received 2-rank checkpoint with a pickle planted (and its manifest rewritten to match, as a sender
    would): ``--resume`` on 2 ranks refuses it naming the file, and the payload never runs (torch's
    DCP reader unpickles ``.metadata`` and non-tensor values without restriction)."""
    mode, dd, full, _ = dist_full
    if (mode, rel) not in PLANTS:
        pytest.skip(f"{rel} is not part of a {mode} checkpoint")
    from test_safe_dcp import Payload, plant_bytes_item, plant_metadata

    src = tmp_path / "src"
    shutil.copytree(full, src)
    ckpt = src / "checkpoints" / "step-000006"
    marker = tmp_path / "pwned"
    rel, _, tensor = rel.partition(":")
    p = ckpt / rel
    if tensor:  # a tensor entry of rank 1's file: only DCP's reader (weights_only) meets it, inside the collective
        assert plant_bytes_item(ckpt / "optim", Payload(marker), file=os.path.basename(rel), tensor=True)
    elif rel.endswith(".pt"):
        torch.save({"rng": Payload(marker)}, p)
    elif rel.endswith(".metadata"):
        plant_metadata(ckpt / "optim", {"x": Payload(marker)})
    elif plant_bytes_item(ckpt / "optim", Payload(marker), file=os.path.basename(rel)) is None:
        # no non-tensor value in this rank's file (DCP stores each once, in one rank's file): the whole file
        # replaced by a pickle, padded to its size, read inside the collective load
        size = os.path.getsize(p)
        torch.save({"x": Payload(marker)}, p)
        with open(p, "ab") as f:
            f.write(b"\0" * max(0, size - os.path.getsize(p)))
    man = json.load(open(ckpt / ck.MANIFEST))
    for r in man["files"]:
        man["files"][r] = {"bytes": os.path.getsize(ckpt / r), "sha256": sha256_file(str(ckpt / r))}
    json.dump(man, open(ckpt / ck.MANIFEST, "w"))
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(dd))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "desmoe.train", "--config", str(cfgp), "--output-dir", str(tmp_path / "fresh"),
                        "--no-progress", "--resume", str(ckpt), "--set", f"train.distributed={mode}"],
                       capture_output=True, text=True, timeout=120, env=env)
    err = r.stdout + r.stderr
    assert r.returncode != 0, err[-3000:]
    assert "desmoe train: error:" in err and rel.split("/")[-1] in err, err[-3000:]
    assert "refusing to load" in err or "truncated or corrupt" in err, err[-3000:]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("mode,reentrant", [("ddp", False), ("fsdp2", False), ("ddp", True), ("fsdp2", True)])
def test_activation_checkpointing_under_torchrun_matches_single_process(setup, tmp_path, mode, reentrant):
    # DES-MoE with every decoder layer checkpointed, 2 ranks: the same losses and weights as one process without
    # checkpointing (masks held through the backward's replay; KD attached inside the routers)
    d, dd, single, root = setup
    dd = json.loads(json.dumps(dd))
    dd["train"]["distributed"] = "none"
    out = tmp_path / "ac"
    _torchrun(tmp_path, dd, out, "--set", f"train.distributed={mode}", "--set", "train.activation_checkpointing=1",
              "--set", f"train.activation_checkpointing_reentrant={str(reentrant).lower()}")
    hs, hd = _history(root / "single"), _history(out)
    for step in range(6):
        assert hd[step]["task"] == pytest.approx(hs[step]["task"], rel=1e-5, abs=1e-6), step
        assert hd[step]["kd"] == pytest.approx(hs[step]["kd"], rel=1e-4, abs=1e-6), step
    s = json.load(open(out / "summary.json"))
    ws, wd = _weights(single["checkpoint"]), _weights(s["checkpoint"])
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5, msg=k)
    assert s["masks"] == single["masks"]
