"""Bad inputs and faults, as a new user and as a tester would try them.

Every case calls the CLI's ``main()`` in-process (or the library function a user would call) and asserts a
*clear* error: exit code 2 (or the documented code), no traceback, the field / file / directory named in the
message, and no data lost (the files of every run directory involved are unchanged, byte for byte). The helper
:func:`attempt` classifies each outcome as clear / unclear / traceback / silent / lost; with
``DESMOE_BAD_INPUT_TALLY=FILE`` every classification is appended to FILE (``benchmarks/bad_input_tally.py``
turns that into the README's reliability table).
"""
import copy
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import yaml

from desmoe.cli import main
from desmoe.train import checkpoint as ck
from desmoe.train import config_from_dict
from desmoe.train.durable import sha256_file
from desmoe.train.trainer import run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
from test_train import tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(progress=False, log=lambda *_: None)


# --- helpers ------------------------------------------------------------------------------------------------------
def snapshot(root) -> dict:
    """{relative path: sha256} of every file under ``root`` (empty if absent)."""
    out = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def classify(rc, err, exc, names, changed, expect_rc=2) -> str:
    if changed:
        return "lost"
    if exc is not None or "Traceback (most recent call last)" in err:
        return "traceback"
    if rc == 0 and expect_rc != 0:
        return "silent"
    if rc != expect_rc or any(str(n) not in err for n in names):
        return "unclear"
    return "clear"


def _record(request, outcome, detail):
    path = os.environ.get("DESMOE_BAD_INPUT_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": request.node.nodeid, "outcome": outcome, "detail": detail[-500:]}) + "\n")


def _started(request):
    """Noted before an attempt: a case that then never classifies itself hung or killed the process."""
    path = os.environ.get("DESMOE_BAD_INPUT_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": request.node.nodeid, "started": time.time()}) + "\n")


def attempt(request, capsys, argv, *, names=(), protect=(), expect_rc=2) -> str:
    """Run ``desmoe ARGV`` in-process; assert a clear error naming ``names`` with ``protect``'s files intact.
    Returns stderr."""
    capsys.readouterr()
    before = {str(p): snapshot(p) for p in protect}
    _started(request)
    rc, exc = None, None
    try:
        rc = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - an escaping exception is what this suite looks for
        exc = e
    out, err = capsys.readouterr()
    if exc is not None:
        err += "".join(traceback.format_exception(exc))
    changed = [p for p in before if snapshot(p) != before[p]]
    outcome = classify(rc, err, exc, names, changed, expect_rc)
    _record(request, outcome, err)
    assert outcome == "clear", f"{outcome}: rc={rc}, changed={changed}\nstderr: {err}\nstdout: {out[-2000:]}"
    return err


def library_attempt(request, fn, exc_type, *, names=(), protect=()):
    """The library path: ``fn()`` must raise ``exc_type`` naming ``names``, leaving ``protect`` intact."""
    before = {str(p): snapshot(p) for p in protect}
    _started(request)
    msg, other = "", None
    try:
        fn()
    except exc_type as e:
        msg = str(e)
    except BaseException as e:  # noqa: BLE001
        other = e
        msg = "".join(traceback.format_exception(e))
    changed = [p for p in before if snapshot(p) != before[p]]
    rc = 2 if other is None and msg else (0 if other is None else 1)
    outcome = classify(rc, msg, other, names, changed)
    _record(request, outcome, msg)
    assert outcome == "clear", f"{outcome}: changed={changed}\n{msg}"
    return msg


def write_cfg(path, d) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny config (no general domain: short runs) and a finished 2-step run made with it."""
    root = tmp_path_factory.mktemp("bad")
    os.makedirs(root / "data")
    d = tiny_cfg(str(root / "data"), max_steps=2, save_every=1)
    d["data"]["general"] = None
    cfg = write_cfg(root / "c.yaml", d)
    run(config_from_dict(copy.deepcopy(d)), str(root / "run"), **QUIET)
    return {"root": root, "d": d, "cfg": cfg, "run": root / "run"}


@pytest.fixture()
def run_copy(base, tmp_path):
    """A private copy of the finished run (cases that damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    (dst / "latest").write_text("step-000002\n")
    return dst


def train(base, out, *extra):
    return ["train", "--config", base["cfg"], "--output-dir", out, "--no-progress", *extra]


# --- 1. configuration values: each names field, value and expectation; nothing is created ------------------------
CONFIG_CASES = [
    ("train.lr=.nan", ["train.lr", "nan", "finite"]),
    ("train.lr=-1", ["train.lr", "-1"]),
    ("train.lr=0", ["train.lr", "(0.0, 10.0]"]),
    ("train.max_grad_norm=.nan", ["train.max_grad_norm", "nan"]),
    ("train.max_grad_norm=-2", ["train.max_grad_norm", "-2"]),
    ("train.weight_decay=.nan", ["train.weight_decay", "nan"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", "-0.1"]),
    ("train.pretrain_lr=0", ["train.pretrain_lr", "0"]),
    ("train.pretrain_lr=.inf", ["train.pretrain_lr", "inf"]),
    ("train.min_lr_ratio=-0.1", ["train.min_lr_ratio", "-0.1"]),
    ("train.beta1=1.0", ["train.beta1", "1.0"]),
    ("train.beta2=.nan", ["train.beta2", "nan"]),
    ("tokenizer.vocab_size=1000000000", ["tokenizer.vocab_size", "1000000000", "<= 1048576"]),
    ("tokenizer.vocab_size=10", ["tokenizer.vocab_size", "10", ">= 260"]),
    ("tokenizer.vocab_size=1e9", ["tokenizer.vocab_size", "1000000000", "an int"]),  # 1e9 reads as a float
    ("train.device=123", ["train.device", "123", "auto, cpu, cuda"]),
    ("train.device=gpu", ["train.device", "gpu"]),
    ("train.device=cuda:x", ["train.device", "cuda:x"]),
    ("model.overrides.hiden_size=64", ["model.overrides", "hiden_size", "not an attribute"]),
    ("model.overrides.hidden_size=abc", ["model.overrides.hidden_size", "abc", "an int"]),
    ("method.tau=.nan", ["method.tau", "nan"]),
    ("method.tau=abc", ["method.tau", "abc"]),
    ("method.tau=0", ["method.tau", "0"]),
    ("method.phi=2", ["method.phi", "2"]),
    ("method.lambda_decay_rate=.inf", ["method.lambda_decay_rate", "inf"]),
    ("method.alr_expansion=1000", ["method.alr_expansion", "1000", "<= 64"]),
    ("method.update_every=0", ["method.update_every", "0"]),
    ("method.name=lora", ["method.name", "lora"]),
    ("method.per_token_masking=maybe", ["method.per_token_masking", "maybe", "true or false"]),
    ("train.max_steps=true", ["train.max_steps", "True", "an int"]),
    ("train.max_steps=10000000000", ["train.max_steps", "10000000000"]),
    ("train.grad_accum=0", ["train.grad_accum", "0"]),
    ("train.keep_last=-1", ["train.keep_last", "-1"]),
    ("train.bf16=maybe", ["train.bf16", "maybe"]),
    ("train.skip_nonfinite=maybe", ["train.skip_nonfinite", "maybe"]),
    ("train.distributed=mpi", ["train.distributed", "mpi"]),
    ("train.lr_schedule=step", ["train.lr_schedule", "step"]),
    ("data.seq_len=1.5", ["data.seq_len", "1.5", "an int"]),
    ("data.batch_size=0", ["data.batch_size", "0"]),
    ("data.batch_size=100000000", ["data.batch_size", "100000000"]),
    ("data.domains=[]", ["data.domains"]),
    ("data.domains=[alpha,alpha]", ["data.domains", "duplicates"]),
    ("data.text_field=123", ["data.text_field", "123", "a string"]),
    ("data.weights={alpha: .inf, beta: 1, gamma: 1}", ["data.weights", "inf"]),
    ("data.sources.alpha=./missing.jsonl", ["data.sources.alpha", "missing.jsonl"]),
    ("model.tiny=gpt2", ["model.tiny", "gpt2"]),
    ("model.path=/no/such/model", ["model", "path"]),  # with model.tiny still set: the pair is the error
    # values the model or the tokenizer also define, checked against them before any work
    ("data.seq_len=256", ["data.seq_len", "256", "max_position_embeddings=128"]),
    ("model.overrides.max_position_embeddings=16", ["data.seq_len", "32", "model.overrides.max_position_embeddings"]),
    ("model.overrides.hidden_size=-8", ["model.overrides.hidden_size", "-8", ">= 1"]),
    ("model.overrides.num_attention_heads=3", ["num_attention_heads=3", "num_key_value_heads=2"]),
    ("model.overrides.num_experts=0", ["model.overrides.num_experts", "0", ">= 1"]),
    ("model.overrides.num_hidden_layers=0", ["model.overrides.num_hidden_layers", "0", ">= 1"]),
    ("model.overrides.num_experts_per_tok=99", ["num_experts_per_tok=99", "num_experts="]),
    ("model.overrides.mlp_only_layers=[0,1]", ["model.overrides.mlp_only_layers", "no MoE layer"]),
    ("model.dtype=float16", ["model.dtype", "float16", "CPU"]),
    ("train.lrr=0.1", ["train.lrr"]),
    ("trian.lr=0.1", ["trian"]),
    ("model.seed=-1", ["model.seed", "-1"]),
]


@pytest.mark.parametrize("setting,names", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value(request, capsys, base, tmp_path, setting, names):
    out = tmp_path / "out"
    attempt(request, capsys, train(base, out, "--set", setting), names=names, protect=[base["run"]])
    assert not out.exists(), "a config error must not create the output directory"


def test_set_without_equals(request, capsys, base, tmp_path):
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "train.lr"), names=["--set", "train.lr"])


def test_set_without_section(request, capsys, base, tmp_path):
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "lr=1"), names=["section.key", "lr"])


def test_config_file_missing(request, capsys, base, tmp_path):
    attempt(request, capsys, ["train", "--config", tmp_path / "none.yaml", "--output-dir", tmp_path / "o"],
            names=["none.yaml"])


def test_config_file_not_yaml(request, capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    attempt(request, capsys, ["train", "--config", p, "--output-dir", tmp_path / "o"], names=["bad.yaml", "YAML"])


def test_config_file_top_level_list(request, capsys, tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    attempt(request, capsys, ["train", "--config", p, "--output-dir", tmp_path / "o"], names=["list.yaml", "mapping"])


def test_max_steps_zero(request, capsys, base, tmp_path):
    attempt(request, capsys, train(base, tmp_path / "o", "--max-steps", "0"), names=["--max-steps", "0"])


def test_model_overrides_checked_against_a_local_model_config(request, tmp_path):
    """``model.path`` to a local directory: override keys are checked against its config.json."""
    from desmoe.integrations.tiny import tiny_config

    tiny_config("qwen3_moe").save_pretrained(tmp_path / "m")
    library_attempt(request, lambda: config_from_dict({"model": {"path": str(tmp_path / "m"),
                                                                 "overrides": {"num_expert": 4}}}),
                    ValueError, names=["model.overrides", "num_expert"])


def test_eval_bad_device(request, capsys, base):
    attempt(request, capsys, ["eval", "--checkpoint", base["run"], "--device", "gpu0"], names=["--device", "gpu0"],
            protect=[base["run"]])


def test_eval_negative_math_n(request, capsys, base):
    attempt(request, capsys, ["eval", "--checkpoint", base["run"], "--math-n", "-1"], names=["--math-n", "-1"])


def test_ops_mixed_dtypes_name_both_arguments(request):
    from desmoe.ops import moe_experts

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w, d = torch.randn(3, 6, 8), torch.randn(3, 8, 3)
    library_attempt(request, lambda: moe_experts(x, w, d, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)),
                    TypeError, names=["x_TD", "bfloat16", "float32"])


# --- 2. the output directory: in the way, unwritable, in use ---------------------------------------------------------
TOPK_ROUTE_CASES = [(dict(scaling=float("nan")), ["scaling", "nan", "finite"]),
                    (dict(scaling=-2.0), ["scaling", "-2.0", "> 0"]),
                    (dict(renorm_eps=-1e-6), ["renorm_eps", "-1e-06", ">= 0"]),
                    (dict(renorm_min=float("inf")), ["renorm_min", "inf"]),
                    (dict(masked_value=float("nan")), ["masked_value", "nan"]),
                    (dict(scoring="sigmoid", bias_E="nan"), ["bias_E", "finite", "nan", "index 3"])]


@pytest.mark.parametrize("kw,names", TOPK_ROUTE_CASES, ids=[str(sorted(c[0])) for c in TOPK_ROUTE_CASES])
def test_topk_route_refuses_nonfinite_or_negative_options(request, kw, names):
    """These once routed silently wrong (NaN weights, flipped signs) instead of naming the option."""
    from desmoe import ops

    kw = dict(kw)
    if kw.get("bias_E") == "nan":
        kw["bias_E"] = torch.zeros(8)
        kw["bias_E"][3] = float("nan")
    library_attempt(request, lambda: ops.topk_route(torch.randn(5, 8), 2, **kw), ValueError, names=names)


def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(request, capsys, base, tmp_path):
    text = open(base["cfg"]).read().replace("train:\n", "train:\n  lr: 0.5\n", 1)
    assert text.count("  lr: ") == 2  # the file sets train.lr already: now twice
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    attempt(request, capsys, ["train", "--config", p, "--output-dir", tmp_path / "o", "--no-progress"],
            names=[str(p), "duplicate key 'lr'", "line"])
    assert not (tmp_path / "o").exists()


def test_output_dir_is_a_file(request, capsys, base, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    attempt(request, capsys, train(base, f), names=[str(f), "is a file"], protect=[tmp_path])


def test_output_dir_under_a_file(request, capsys, base, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    attempt(request, capsys, train(base, f / "sub"), names=[str(f / "sub"), "a file"], protect=[tmp_path])


def test_output_dir_read_only(request, capsys, base, tmp_path, monkeypatch):
    """Read-only parent (simulated with EROFS: this suite may run as root, which ignores permission bits)."""
    out = tmp_path / "ro" / "run"
    real = os.makedirs

    def makedirs(p, *a, **k):
        if str(p).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(os, "makedirs", makedirs)
    attempt(request, capsys, train(base, out), names=[str(out), "not writable"])


def test_demo_out_is_a_file(request, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    attempt(request, capsys, ["demo", "--out", f, "--no-parity", "--quiet"], names=[str(f)], protect=[tmp_path])


def _holder(run_dir):
    """A separate process holding the run lock of ``run_dir`` (as a running `desmoe train` would)."""
    code = ("import sys, time\nfrom desmoe.train.rundir import RunLock\nRunLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_in_a_locked_dir_fails_naming_dir_and_pid_then_stale_lock_is_taken_over(
        request, capsys, base, tmp_path):
    run_copy = tmp_path / "demo" / "des_moe"
    shutil.copytree(base["run"], run_copy)
    p = _holder(run_copy)
    try:
        attempt(request, capsys, train(base, run_copy, "--resume"), names=[str(run_copy), f"pid {p.pid}", "in use"],
                protect=[run_copy])
        attempt(request, capsys, ["demo", "--out", run_copy.parent, "--overwrite", "--no-parity", "--quiet"],
                names=[f"pid {p.pid}"], protect=[run_copy])  # --overwrite never removes a run in progress
    finally:
        p.kill()  # SIGKILL: the holder cannot clean up; its pid stays in the lock file
        p.wait()
    assert json.loads((run_copy / ".desmoe.lock").read_text())["pid"] == p.pid
    err = attempt(request, capsys, train(base, run_copy, "--resume"), names=["already finished"], expect_rc=0)
    assert "stale lock" in err and f"pid {p.pid}" in err


def test_lock_is_released_after_a_run_and_after_a_failure(request, base, tmp_path):
    from desmoe.train.rundir import LOCK_NAME, RunLock

    d = copy.deepcopy(base["d"])
    d["data"]["sources"]["alpha"] = str(tmp_path / "empty.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    library_attempt(request, lambda: run(config_from_dict(d), str(tmp_path / "r"), **QUIET), ValueError,
                    names=["alpha", "no train documents"])
    with RunLock(str(tmp_path / "r")) as lk:  # free again (not stale: the failed run released it)
        assert lk.stale is None
    assert (tmp_path / "r" / LOCK_NAME).read_text() == ""


# --- 3. nothing deleted or overwritten without asking -----------------------------------------------------------------
def test_resume_of_a_finished_run_changes_nothing(request, capsys, base, run_copy):
    err = attempt(request, capsys, train(base, run_copy, "--resume"), names=["already finished", "step 2"],
                  protect=[run_copy], expect_rc=0)
    assert "nothing was changed" in err.lower()


def test_resume_into_another_runs_dir_needs_overwrite(request, capsys, base, run_copy, tmp_path):
    src = run_copy / "checkpoints" / "step-000001"
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    attempt(request, capsys, train(base, other, "--resume", src), names=[str(other), "rewind", "--overwrite"],
            protect=[other, run_copy])


def test_train_into_a_dir_holding_a_run_needs_resume(request, capsys, base, run_copy):
    attempt(request, capsys, train(base, run_copy), names=[str(run_copy), "--resume"], protect=[run_copy])


def test_demo_does_not_delete_an_earlier_run(request, capsys, base, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(base["run"], out / "des_moe")
    attempt(request, capsys, ["demo", "--out", out, "--no-parity", "--quiet", "--steps", "6", "--pretrain-steps", "1"],
            names=[str(out / "des_moe"), "--overwrite"], protect=[out])


def test_demo_overwrite_clears_the_earlier_run(base, tmp_path):
    from desmoe.train.rundir import clear_for_overwrite

    out = tmp_path / "des_moe"
    shutil.copytree(base["run"], out)
    clear_for_overwrite(str(out), overwrite=True)
    assert os.listdir(out) == [".desmoe.lock"]


# --- 4. received checkpoints: integrity, and no code ------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt, rel, obj):
    """Replace file ``rel`` of ``ckpt`` with ``torch.save(obj)`` and rewrite the manifest to match (what a
    malicious sender does)."""
    p = os.path.join(ckpt, rel)
    torch.save(obj, p)
    man = json.load(open(os.path.join(ckpt, ck.MANIFEST)))
    man["files"][rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    json.dump(man, open(os.path.join(ckpt, ck.MANIFEST), "w"))


@pytest.mark.parametrize("rel", ["method.pt", "trainer.pt"])
def test_planted_payload_is_refused_on_eval_and_resume(request, capsys, base, run_copy, tmp_path, rel):
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "step-000002"
    _plant(str(ckpt), rel, {"state": _Payload(marker)})
    names = ["refusing to load", rel, "posix.system" if os.name == "posix" else "system"]
    if rel == "method.pt":
        attempt(request, capsys, ["eval", "--checkpoint", run_copy, "--math-n", "0"], names=names, protect=[run_copy])
    src = run_copy / "checkpoints" / "step-000001"  # resume *from* the damaged one into a fresh dir
    _plant(str(src), rel, {"state": _Payload(marker)})
    attempt(request, capsys, train(base, tmp_path / "fresh", "--resume", src), names=names, protect=[run_copy])
    assert not marker.exists(), "the payload ran"


def test_planted_pickle_model_weights_are_never_loaded(request, capsys, base, run_copy, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "step-000002"
    torch.save({"x": _Payload(marker)}, ckpt / "model" / "pytorch_model.bin")
    attempt(request, capsys, ["eval", "--checkpoint", run_copy, "--math-n", "0"],
            names=["pytorch_model.bin", "manifest does not list"], protect=[run_copy])
    _plant(str(ckpt), "model/pytorch_model.bin", {"x": _Payload(marker)})  # listed too: still only safetensors load
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_copy), "--math-n", "0", "--max-batches", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert not marker.exists(), "the payload ran"


# every file of a single-process checkpoint, and which command reads it (README.md-like notices are never parsed)
CHECKPOINT_FILES = {"config.json": "both", "meta.json": "both", "method.pt": "both", "trainer.pt": "resume",
                    "model/config.json": "both", "model/model.safetensors": "both", "model/tokenizer.json": "both",
                    "model/tokenizer_config.json": "both", "model/generation_config.json": "both",
                    "model/desmoe_alr.safetensors": "both", "model/desmoe_alr.json": "both",
                    "model/DESMOE_README.md": "neither"}


def test_checkpoint_files_table_is_complete(base):
    """The table above lists every file a checkpoint holds (a new file must say who reads it)."""
    man = json.load(open(base["run"] / "checkpoints" / "step-000001" / ck.MANIFEST))
    assert set(man["files"]) == set(CHECKPOINT_FILES)


@pytest.mark.parametrize("rel", sorted(CHECKPOINT_FILES))
def test_planted_pickle_in_every_checkpoint_file(request, capsys, base, run_copy, tmp_path, rel):
    """A pickle planted in place of any file (manifest rewritten to match): every command that reads the file
    refuses it naming the file; the payload never runs."""
    marker = tmp_path / "pwned"
    reads = CHECKPOINT_FILES[rel]
    for name in ("step-000001", "step-000002"):
        _plant(str(run_copy / "checkpoints" / name), rel, {"x": _Payload(marker)})
    argv = train(base, tmp_path / "fresh", "--resume", run_copy / "checkpoints" / "step-000001")
    if reads in ("both", "resume"):
        attempt(request, capsys, argv, names=[rel.split("/")[-1]], protect=[run_copy])
    else:
        assert main([str(a) for a in argv]) == 0
    ev = ["eval", "--checkpoint", run_copy, "--math-n", "0", "--max-batches", "1"]
    if reads == "both":
        attempt(request, capsys, ev, names=[rel.split("/")[-1]], protect=[run_copy])
    else:  # eval never opens it
        assert main([str(a) for a in ev]) == 0
    assert not marker.exists(), "the payload ran"


def _truncate(p, keep=0.5):
    with open(p, "r+b") as f:
        f.truncate(int(os.path.getsize(p) * keep))


@pytest.mark.parametrize("rel", ["model/model.safetensors", "method.pt", "trainer.pt", "meta.json"])
def test_eval_of_a_truncated_checkpoint(request, capsys, run_copy, rel):
    _truncate(run_copy / "checkpoints" / "step-000002" / rel)
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["truncated", rel], protect=[run_copy])


def test_truncated_state_file_with_a_matching_manifest(request, capsys, base, run_copy, tmp_path):
    """A sender's manifest matches a truncated trainer.pt: the loader itself names the file."""
    src = run_copy / "checkpoints" / "step-000001"
    p = src / "trainer.pt"
    _truncate(p)
    man = json.load(open(src / ck.MANIFEST))
    man["files"]["trainer.pt"] = {"bytes": os.path.getsize(p), "sha256": sha256_file(str(p))}
    json.dump(man, open(src / ck.MANIFEST, "w"))
    attempt(request, capsys, train(base, tmp_path / "fresh", "--resume", src), names=["trainer.pt", "corrupt"],
            protect=[run_copy])


def test_eval_bit_flip(request, capsys, run_copy):
    p = run_copy / "checkpoints" / "step-000002" / "method.pt"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["method.pt", "sha256"], protect=[run_copy])


def test_eval_without_manifest(request, capsys, run_copy):
    os.remove(run_copy / "checkpoints" / "step-000002" / ck.MANIFEST)
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["manifest.json", "step-000001"],
            protect=[run_copy])


def test_eval_malformed_manifest(request, capsys, run_copy):
    (run_copy / "checkpoints" / "step-000002" / ck.MANIFEST).write_text("{not json")
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["manifest.json", "unreadable"],
            protect=[run_copy])


def test_manifest_path_escape(request, capsys, run_copy):
    m = run_copy / "checkpoints" / "step-000002" / ck.MANIFEST
    man = json.loads(m.read_text())
    man["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    m.write_text(json.dumps(man))
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["outside the checkpoint"], protect=[run_copy])


@pytest.mark.parametrize("content", ["../../../../etc\n", "\xff\xfe garbage", ""])
def test_latest_points_nowhere(request, capsys, run_copy, content):
    (run_copy / "latest").write_bytes(content.encode("latin-1"))
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=[str(run_copy / "latest")], protect=[run_copy])


def test_latest_names_a_missing_checkpoint(request, capsys, run_copy):
    (run_copy / "latest").write_text("step-000009\n")
    attempt(request, capsys, ["eval", "--checkpoint", run_copy], names=["step-000009", "missing"], protect=[run_copy])


def test_eval_checkpoint_is_a_file(request, capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    attempt(request, capsys, ["eval", "--checkpoint", f], names=[str(f), "not a directory"])


def correct_attempt(request, capsys, argv, check, *, protect=()) -> tuple[str, str]:
    """A case where the right behaviour is to do the work (not an error): ``desmoe ARGV`` must exit 0 and
    ``check(out, err)`` hold; recorded as *correct* (or silent / traceback / lost)."""
    capsys.readouterr()
    before = {str(p): snapshot(p) for p in protect}
    _started(request)
    rc, exc = None, None
    try:
        rc = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001
        exc = e
    out, err = capsys.readouterr()
    if exc is not None:
        err += "".join(traceback.format_exception(exc))
    changed = [p for p in before if snapshot(p) != before[p]]
    if changed:
        outcome = "lost"
    elif exc is not None or "Traceback (most recent call last)" in err:
        outcome = "traceback"
    elif rc != 0:
        outcome = "unclear"
    else:
        outcome = "correct" if check(out, err) else "silent"
    _record(request, outcome, err + out)
    assert outcome == "correct", f"{outcome}: rc={rc}, changed={changed}\nstderr: {err}\nstdout: {out[-2000:]}"
    return out, err


def test_eval_without_config_yaml(request, capsys, run_copy):
    """The checkpoint carries its own config (config.json): eval needs no config.yaml beside it."""
    os.remove(run_copy / "config.yaml")
    correct_attempt(request, capsys, ["eval", "--checkpoint", run_copy, "--math-n", "0", "--max-batches", "1"],
                    lambda out, err: "alpha" in out and "step 2" in out, protect=[run_copy])


def test_eval_uses_the_checkpoints_own_config_not_an_edited_config_yaml(request, capsys, run_copy):
    """An edited config.yaml (other seq_len, other domains) does not change what eval measures: the checkpoint's
    own config wins, and the differing keys are named on stderr."""
    argv = ["eval", "--checkpoint", run_copy, "--math-n", "0", "--max-batches", "1", "--format", "json"]
    assert main([str(a) for a in argv]) == 0
    ref = json.loads(capsys.readouterr().out)
    c = yaml.safe_load((run_copy / "config.yaml").read_text())
    c["data"]["seq_len"], c["data"]["domains"] = 8, ["alpha"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(c))
    out, err = correct_attempt(request, capsys, argv, lambda out, err: json.loads(out) == ref)
    assert "data.seq_len" in err and "data.domains" in err and "checkpoint's own config" in err


def test_overrides_vocab_size_smaller_than_the_tokenizer(request, capsys, base, tmp_path):
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.overrides.vocab_size=100"),
            names=["model.overrides.vocab_size", "100", "tokenizer", ">= 300"])


def test_overrides_vocab_size_larger_than_the_tokenizer_is_kept(request, capsys, base, tmp_path):
    """A larger explicit vocab_size is honoured (padding rows, as models pad their vocabulary), never replaced."""
    out = tmp_path / "o"

    def check(o, e):
        cfgj = json.load(open(out / "checkpoints" / "step-000002" / "model" / "config.json"))
        return cfgj["vocab_size"] == 512
    correct_attempt(request, capsys, train(base, out, "--set", "model.overrides.vocab_size=512"), check)


def test_overrides_vocab_size_with_a_pretrained_model_refused(request, base, tmp_path):
    d = copy.deepcopy(base["d"])
    d["model"] = {"path": str(base["run"] / "checkpoints" / "step-000002" / "model"), "overrides": {"vocab_size": 999}}
    library_attempt(request, lambda: config_from_dict(d), ValueError,
                    names=["model.overrides.vocab_size", "999", "embedding"])


def test_explicit_text_field_the_records_lack(request, capsys, base, tmp_path):
    """``data.text_field: body`` on records without ``body`` is an error naming the row, never another column."""
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i} " * 5, "title": "t"}) + "\n" for i in range(30)))
    attempt(request, capsys, train(base, tmp_path / "o", "--set", f"data.sources.alpha={p}",
                                   "--set", "data.text_field=body"),
            names=["a.jsonl", "line 1", "'body'", "data.text_field"])


def test_named_pipe_as_a_data_source_is_refused_not_read(request, capsys, base, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    t0 = time.time()
    attempt(request, capsys, train(base, tmp_path / "o", "--set", f"data.sources.alpha={fifo}"),
            names=["data.sources.alpha", "pipe.jsonl", "not a regular file"])
    from desmoe.data import DataSourceError, load_domain_texts

    library_attempt(request, lambda: load_domain_texts("alpha", source=str(fifo)), DataSourceError,
                    names=["pipe.jsonl", "not a regular file"])
    assert time.time() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["eval", "export", "specialization"])
def test_device_cuda_without_a_gpu(request, capsys, base, tmp_path, cmd):
    extra = ["--out", tmp_path / "x"] if cmd == "export" else []
    attempt(request, capsys, [cmd, "--checkpoint", base["run"], "--device", "cuda", *extra],
            names=["--device", "cuda", "no CUDA device"], protect=[base["run"]])


@pytest.mark.parametrize("name", ["/etc/passwd", "../setup", "../benchmarks/bench_routing", "no_such_bench",
                                  "bench_routing.py/../../x"])
def test_bench_runs_only_the_repositorys_benchmarks_by_name(request, capsys, tmp_path, name):
    marker = tmp_path / "ran"
    attempt(request, capsys, ["bench", name], names=["desmoe bench NAME", name, "not one of"])
    assert not marker.exists()


@pytest.mark.parametrize("target,names", [("dir", ["--json", "is a directory"]),
                                          ("missing/x.json", ["--json", "does not exist"]),
                                          ("file/x.json", ["--json", "is a file"])])
def test_json_target_checked_before_the_work(request, capsys, base, tmp_path, monkeypatch, target, names):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    import desmoe.train.evaluate as ev

    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    for cmd in ("eval", "specialization"):
        attempt(request, capsys, [cmd, "--checkpoint", base["run"], "--json", tmp_path / target], names=names,
                protect=[base["run"]])


def test_output_dirs_checked_before_the_work(request, capsys, base, tmp_path):
    (tmp_path / "f").write_text("x")
    attempt(request, capsys, ["experiment", "pareto", "--quick", "--out", tmp_path / "f"], names=["--out", "is a file"])
    attempt(request, capsys, ["demo", "--out", tmp_path / "f" / "sub"], names=["--out", "is a file"])
    attempt(request, capsys, train(base, tmp_path / "f" / "o"), names=["--output-dir", "is a file"])


def test_bare_model_name_fails_fast_offline(request, capsys, base, tmp_path, monkeypatch):
    """``model.path=gpt2`` (a legacy bare hub id): one clear error in seconds, no retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.tiny=null", "--set", "model.path=gpt2"),
            names=["model.path", "'gpt2'", "HF_HUB_OFFLINE"])
    assert time.time() - t0 < 10


def test_bare_model_name_unreachable_makes_one_request(request, capsys, base, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def down(self, *a, **k):
        calls.append(a)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", down)
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.tiny=null", "--set", "model.path=gpt2"),
            names=["model.path", "'gpt2'", "cannot be reached"])
    assert len(calls) == 1


def test_missing_local_data_path_is_not_sent_to_the_hub(request, capsys, base, tmp_path, monkeypatch):
    """``data/x`` where ``data/`` is a local directory: a missing local path, not a hub dataset."""
    monkeypatch.chdir(base["root"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("asked the hub"))
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "data.sources.alpha=data/x"),
            names=["data.sources.alpha", "'data/x'", "does not exist"])
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "data.sources.alpha=./x"),
            names=["data.sources.alpha", "'./x'", "does not exist"])


def test_model_directory_without_tokenizer(request, capsys, base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["run"] / "checkpoints" / "step-000002" / "model", m)
    for f in os.listdir(m):
        if "token" in f:
            os.remove(m / f)
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.tiny=null", "--set", f"model.path={m}"),
            names=["model.path", str(m), "no tokenizer files", "tokenizer.path"])


def test_missing_model_directory_says_so(request, capsys, base, tmp_path):
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.tiny=null",
                                   "--set", f"model.path={tmp_path / 'nope' / 'model'}"),
            names=["model.path", "does not exist"])
    capsys.readouterr()


def test_hf_trainer_method_state_payload_refused(request, tmp_path):
    from desmoe.train.checkpoint import CheckpointError, load_state_file

    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "desmoe_method.pt")
    library_attempt(request, lambda: load_state_file(str(tmp_path / "desmoe_method.pt")), CheckpointError,
                    names=["desmoe_method.pt", "refusing"])
    assert not marker.exists()


# --- 5. file-system faults while writing a checkpoint -------------------------------------------------------------
@pytest.mark.parametrize("writer", ["write_model", "write_method_state", "write_trainer_state", "_commit"])
def test_write_fault_during_checkpoint_keeps_the_previous_one(request, capsys, base, tmp_path, monkeypatch, writer):
    """A file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk) from the second checkpoint on:
    a clear error naming the checkpoint, its temp dir gone, the first checkpoint intact and resumable."""
    real = getattr(ck, writer)
    calls = []
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limited(*a, **k):
        calls.append(1)
        if len(calls) < 2:
            return real(*a, **k)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            return real(*a, **k)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(ck, writer, limited)
    out = tmp_path / "r"
    try:
        err = attempt(request, capsys, train(base, out), names=["step-000002", "cannot write checkpoint"])
    finally:
        signal.signal(signal.SIGXFSZ, old_xfsz)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large" in err or "os error 27" in err or "unexpected pos" in err or "write" in err
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-000001"], "temp dir left behind"
    assert (out / "latest").read_text().strip() == "step-000001"
    ck.verify_checkpoint(str(root / "step-000001"))


def test_no_space_left_from_torch_save_is_named(request, capsys, base, tmp_path, monkeypatch):
    """torch's own message for a full disk (as users meet it), raised from the zip writer."""
    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "r"
    attempt(request, capsys, train(base, out), names=["step-000001", "unexpected pos", "previous checkpoint"])
    assert os.listdir(out / "checkpoints") == []


def test_enospc_while_updating_latest(request, capsys, base, tmp_path, monkeypatch):
    real = ck.write_text_atomic

    def full(path, text):
        if path.endswith(ck.LATEST) and "000002" in text:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, text)

    monkeypatch.setattr(ck, "write_text_atomic", full)
    out = tmp_path / "r"
    attempt(request, capsys, train(base, out), names=["latest", "No space left", "--resume"])
    assert (out / "latest").read_text().strip() == "step-000001"


# --- 6. data files and names --------------------------------------------------------------------------------------
DATA_CASES = [
    ("number.json", "5", ["number.json", "int"]),
    ("dict.json", '{"a": 1, "b": 2}', ["dict.json", "list of records"]),
    ("broken.json", '[{"text": "a"', ["broken.json", "not valid JSON"]),
    ("badline.jsonl", '{"text": "a b c"}\n{oops\n', ["badline.jsonl", "line 2"]),
    ("binary.jsonl", b"\xff\xfe\x00\x81garbage", ["binary.jsonl", "UTF-8"]),
    ("garbage.parquet", b"not a parquet file at all", ["garbage.parquet", "malformed"]),
    ("nofield.jsonl", '{"foo": "a b c"}\n', ["nofield.jsonl", "text_field"]),
    ("numbers.jsonl", "1\n2\n", ["numbers.jsonl", "record 0 is a int"]),
    ("empty.jsonl", "", ["alpha", "no train documents"]),
    ("table.csv", "a,b\n1,2\n", ["table.csv", "unsupported file type"]),
]


@pytest.mark.parametrize("name,content,names", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_malformed_data_file(request, capsys, base, tmp_path, name, content, names):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    attempt(request, capsys, train(base, tmp_path / "o", "--set", f"data.sources.alpha={p}"), names=names,
            protect=[base["run"]])


def test_source_directory_without_data_files(request, capsys, base, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    attempt(request, capsys, train(base, tmp_path / "o", "--set", f"data.sources.alpha={tmp_path / 'd'}"),
            names=[str(tmp_path / "d"), "holds no"])


@pytest.mark.parametrize("field,setting", [
    ("data.sources.alpha", "data.sources.alpha=someorg/somedata"),
    ("model.path", "model.path=someorg/somemodel"),
    ("tokenizer.path", "tokenizer.path=someorg/sometok"),
])
def test_hub_name_offline_fails_fast_naming_the_field(request, capsys, base, tmp_path, monkeypatch, field, setting):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = ["--set", "model.tiny=null"] if field == "model.path" else []
    t0 = time.time()
    attempt(request, capsys, train(base, tmp_path / "o", *extra, "--set", setting),
            names=[field, setting.split("=", 1)[1], "HF_HUB_OFFLINE"])
    assert time.time() - t0 < 20


def test_hub_unreachable_fails_fast_naming_the_field(request, capsys, base, tmp_path, monkeypatch):
    import huggingface_hub

    def down(self, *a, **k):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", down)
    attempt(request, capsys, train(base, tmp_path / "o", "--set", "model.tiny=null", "--set", "model.path=org/m"),
            names=["model.path", "org/m", "cannot be reached"])


def test_hub_dataset_names_resolve_as_hub_names(base):
    """``org/name`` with no such local path is a hub name (validation accepts it; it is not "a missing file")."""
    d = copy.deepcopy(base["d"])
    d["data"]["sources"]["alpha"] = "someorg/somedata"
    assert config_from_dict(d).data.sources["alpha"] == "someorg/somedata"
    from desmoe.data.hub import is_hub_name

    assert is_hub_name("openai/gsm8k") and is_hub_name("org/name:config")
    assert not is_hub_name("dir/file.jsonl") and not is_hub_name("/abs/path") and not is_hub_name("a/b/c")


# --- 7. signals: honoured within one step outside the training loop ------------------------------------------------
@pytest.mark.parametrize("where", ["load_domain_texts", "train_tokenizer", "evaluate_model"])
def test_signal_outside_the_steps_stops_at_once(request, capsys, base, tmp_path, monkeypatch, where):
    """SIGTERM while corpora are read, the tokenizer trains, or the model is evaluated: the run stops at once
    (exit 143, a message, no traceback) instead of noting it and carrying on to the first training step."""
    import desmoe.data as data
    import desmoe.train.trainer as tr

    mod = tr if where == "evaluate_model" else data
    real = getattr(mod, where)
    reached = []

    def hit(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append(1)  # the handler raises before this line
        return real(*a, **k)

    monkeypatch.setattr(mod, where, hit)
    old = signal.getsignal(signal.SIGTERM)
    attempt(request, capsys, train(base, tmp_path / "o"), names=["SIGTERM", "stopped at once"],
            expect_rc=128 + signal.SIGTERM)
    assert not reached and signal.getsignal(signal.SIGTERM) is old
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_sigterm_during_base_pretraining_subprocess(tmp_path):
    d = tiny_cfg(str(tmp_path))
    d["train"].update(pretrain_steps=100000, max_steps=2)
    cfg = write_cfg(tmp_path / "c.yaml", d)
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "desmoe", "train", "--config", cfg, "--output-dir", str(out),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not (out / "run_info.json").exists():  # written when the run starts, before data and tokenizer
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.2)
    time.sleep(4)  # data, tokenizer and first evaluation take ~1 s here: this lands inside base pretraining
    t1 = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("SIGTERM during base pretraining was not honoured within 60 s") from None
    assert p.returncode == 128 + signal.SIGTERM, err
    assert time.time() - t1 < 10, "SIGTERM was not honoured within a step"
    assert "SIGTERM received outside the training steps" in err and "Traceback" not in err


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it(request, capsys, base, tmp_path):
    """What a requeued job passes: ``--resume`` on a run that a signal stopped before its first checkpoint (here:
    what such a run leaves, run_info.json + config.yaml), or on a directory never started, starts the run and
    says so."""
    stopped = tmp_path / "stopped"
    os.makedirs(stopped)
    (stopped / "run_info.json").write_text("[]")
    shutil.copy(base["cfg"], stopped / "config.yaml")
    for out in (stopped, tmp_path / "never"):
        capsys.readouterr()
        assert main([str(a) for a in train(base, out, "--resume")]) == 0
        o = capsys.readouterr().out
        assert "no checkpoint in" in o and "starting the run from step 0" in o and str(out) in o, o
        assert (out / ck.LATEST).is_file() and (out / "summary.json").is_file()
    # checkpoints without 'latest': never guessed at, never restarted over
    os.remove(stopped / ck.LATEST)
    attempt(request, capsys, train(base, stopped, "--resume"), names=["latest", "step-000002", "--resume"],
            protect=[stopped])


def test_ctrl_c_in_eval_is_a_message_not_a_traceback(request, capsys, base, monkeypatch):
    import desmoe.train.evaluate as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate_checkpoint", interrupted)
    attempt(request, capsys, ["eval", "--checkpoint", base["run"]], names=["interrupted"], expect_rc=130)
