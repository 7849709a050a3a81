"""Generated bad inputs: config shapes and values, CLI flags and the public Python API.

Every case runs in-process and fast (config validation, argument checks, the ops' input checks: nothing trains),
so the whole file runs in the CPU suite in well under a minute. Each case is classified as in
``tests/test_bad_inputs.py``: *clear* (an error naming the field / flag / argument), *correct* (a value that is
valid and accepted), *unclear* (an error that does not name it), *traceback* (an unexpected exception type),
*silent* (a bad value accepted). With ``DESMOE_BAD_INPUT_TALLY=FILE`` each classification is appended to FILE
(``benchmarks/bad_input_tally.py``). A case fails unless it is clear or correct.

What counts as *correct* when a value is accepted is listed in :data:`ACCEPTED`, each with its reason; any
other accepted value is silent.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import traceback

import pytest
import torch

from desmoe.cli import main
from desmoe.train.config import _SECTIONS, config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(request, outcome, detail):
    path = os.environ.get("DESMOE_BAD_INPUT_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": request.node.nodeid, "outcome": outcome, "detail": str(detail)[-400:]}) + "\n")
            f.flush()


def _validate(d: dict):
    """What a run checks before any work: the config, the hub names (offline here), the device and dtype."""
    from desmoe.data.hub import check_config_hub_names
    from desmoe.train.builders import resolve_device

    cfg = config_from_dict(d, source="fuzz")
    check_config_hub_names(cfg)
    resolve_device(cfg)
    return cfg


BASE = {"model": {"tiny": "qwen3_moe"}, "tokenizer": {"vocab_size": 300},
        "data": {"domains": ["math", "code"], "general": None, "seq_len": 32, "batch_size": 2},
        "method": {"name": "des_moe"}, "train": {"max_steps": 2, "eval_batches": 1}}

# the values tried in every field
KINDS = {
    "text": "abc", "unicode": "é✓ 中文", "empty": "", "list": [1, 2], "mapping": {"a": 1}, "nan": math.nan,
    "inf": math.inf, "negative": -1, "zero": 0, "huge": 10**30, "bool": True,
}

# (field, kind) accepted by design, with the reason (anything else accepted is silent)
_ANY_TEXT = ("text", "unicode")
ACCEPTED = {
    # free text: a column name, a cache directory path, a tokenizer/model name checked where it is loaded
    **{("data.text_field", k): "any column name" for k in _ANY_TEXT},
    **{("train.eval_cache", k): "a directory path (created on use)" for k in _ANY_TEXT},
    # floats where 0 / large values are meaningful
    ("train.weight_decay", "zero"): "no weight decay",
    ("train.min_lr_ratio", "zero"): "decay to 0",
    ("train.beta1", "zero"): "no momentum",
    ("train.beta2", "zero"): "AdamW accepts 0",
    ("method.lambda_max", "zero"): "no KD",
    ("method.warmup_frac", "zero"): "no warm-up phase",
    ("method.ema_momentum", "zero"): "A replaced at each refresh",
    ("method.lambda_end", "zero"): "lambda reaches 0 at step 0",
    ("method.lambda_decay_rate", "zero"): "exponential schedule with rate 0 is constant",
    ("train.max_grad_norm", "huge"): "clipping effectively off",
    ("method.lambda_decay_rate", "huge"): "lambda drops to 0 at once",
    ("method.tau", "huge"): "a flat teacher/student: legal, if useless",
    # ints where 0 means off / none
    **{(f"train.{k}", "zero"): "0 = off" for k in ("warmup_steps", "save_every", "pretrain_steps", "keep_last",
                                                  "val_batches", "val_every", "activation_checkpointing")},
    ("model.seed", "zero"): "seed 0", ("data.seed", "zero"): "seed 0",
    ("data.weights", "list"): "weights in data.domains' order (documented)",
    ("model.seed", "bool"): "", ("data.seed", "bool"): "",  # placeholders removed below (bool is not an int)
    # null-able sections and values
    ("data.general", "empty"): "",  # removed below
    # bool fields given true
    **{(f"{s}.{k}", "bool"): "true" for s, k in (
        ("model", "pure_dtype"), ("train", "plots"), ("train", "progress"), ("train", "skip_nonfinite"),
        ("train", "aux_loss"), ("train", "activation_checkpointing_reentrant"), ("method", "per_token_masking"),
        ("method", "lock_affinity"), ("method", "train_attention"), ("method", "train_embeddings"),
        ("method", "train_other"), ("train", "bf16"))},
}
for k in (("model.seed", "bool"), ("data.seed", "bool"), ("data.general", "empty")):
    ACCEPTED.pop(k)


def _field_cases():
    out = []
    for sec, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            for kind in KINDS:
                out.append((f"{sec}.{f.name}", kind))
    return out


FIELD_CASES = _field_cases()


def _outcome_of(fn, names, accepted_reason=None):
    """(outcome, detail) of calling ``fn``: an error must name every one of ``names``."""
    try:
        fn()
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e)
        return ("clear" if all(n in msg for n in names) else "unclear"), msg
    except SystemExit as e:  # argparse's own usage error: exit 2 with the flag named on stderr
        return ("clear" if e.code == 2 else "unclear"), f"SystemExit({e.code})"
    except Exception as e:  # noqa: BLE001 - any other exception type is what this suite looks for
        from desmoe.data import DataSourceError

        if isinstance(e, DataSourceError):
            return ("clear" if all(n in str(e) for n in names) else "unclear"), str(e)
        return "traceback", "".join(traceback.format_exception(e))[-1500:]
    return ("correct", accepted_reason) if accepted_reason is not None else ("silent", "accepted")


@pytest.mark.parametrize("field,kind", FIELD_CASES, ids=[f"{f}={k}" for f, k in FIELD_CASES])
def test_config_field(request, monkeypatch, field, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sec, key = field.split(".")
    d = copy.deepcopy(BASE)
    d.setdefault(sec, {})[key] = copy.deepcopy(KINDS[kind])
    if field == "model.path":
        d["model"].pop("tiny")
    outcome, detail = _outcome_of(lambda: _validate(d), [field], ACCEPTED.get((field, kind)))
    _record(request, outcome, detail)
    assert outcome in ("clear", "correct"), f"{outcome}: {field}={KINDS[kind]!r}: {detail}"


SHAPES = {"mapping": {"unknown_key": 1}, "list": [1, 2], "scalar": 3, "text": "abc", "null": None, "empty": {}}


@pytest.mark.parametrize("section", sorted(_SECTIONS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_config_section_shape(request, section, shape):
    d = copy.deepcopy(BASE)
    d[section] = copy.deepcopy(SHAPES[shape])
    # null / empty sections take the defaults (model: none exist, so it is an error); others name the section
    ok = shape in ("null", "empty") and section != "model"
    names = [section] + (["unknown_key"] if shape == "mapping" else [])
    outcome, detail = _outcome_of(lambda: config_from_dict(d, source="fuzz"), names,
                                  "the section's defaults" if ok else None)
    _record(request, outcome, detail)
    assert outcome in ("clear", "correct"), f"{outcome}: {section}={SHAPES[shape]!r}: {detail}"


@pytest.mark.parametrize("top", [[], "text", 3, None, [{"model": {}}]],
                         ids=["list", "text", "int", "null", "list-of-map"])
def test_config_top_level_shape(request, top):
    outcome, detail = _outcome_of(lambda: config_from_dict(top, source="fuzz.yaml"), ["fuzz.yaml", "mapping"])
    _record(request, outcome, detail)
    assert outcome == "clear", detail


# --- CLI flags: each refused before any work, naming the flag --------------------------------------------------
CLI_CASES = [
    *[(["train", "--config", "c.yaml", "--output-dir", "o", "--max-steps", v], "--max-steps") for v in
      ("abc", "-1", "0", "1e99", "nan", "")],
    *[(["eval", "--checkpoint", "nope", "--math-n", v], "--math-n") for v in ("abc", "-1", "1.5")],
    *[(["eval", "--checkpoint", "nope", "--max-batches", v], "--max-batches") for v in ("0", "-5", "x")],
    *[(["eval", "--checkpoint", "nope", "--device", v], "--device")
      for v in ("gpu", "cuda:x", "", "tpu", "cuda:99999")],
    *[(["eval", "--checkpoint", "nope", "--format", v], "--format") for v in ("xml", "")],
    *[(["eval", "--checkpoint", "nope", "--tasks", v], "--tasks") for v in (",", " , ")],
    *[(["export", "--checkpoint", "nope", "--out", "o", "--min-agreement", v], "min_agreement") for v in
      ("nan", "2", "-1")],
    (["export", "--checkpoint", "nope", "--out", "o", "--min-agreement", "abc"], "--min-agreement"),
    *[(["export", "--checkpoint", "nope", "--out", "o", "--fit-tokens", v], "fit_tokens") for v in ("0", "-1")],
    *[(["export", "--checkpoint", "nope", "--out", "o", "--eval-tokens", v], "eval_tokens") for v in ("0", "-3")],
    (["export", "--checkpoint", "nope", "--out", "o", "--dtype", "int8"], "--dtype"),
    *[(["export", "--checkpoint", "nope", "--out", "o", "--max-shard-size", v], "--max-shard-size") for v in
      ("abc", "-5GB", "5 parsecs", "")],
    (["export", "--checkpoint", "nope", "--out", "o", "--on-low", "maybe"], "--on-low"),
    (["export", "--checkpoint", "nope", "--out", "", ], "--out"),
    *[(["specialization", "--checkpoint", "nope", "--tokens", v], "--tokens") for v in ("0", "-1", "abc")],
    (["specialization", "--checkpoint", "nope", "--device", "gpu"], "--device"),
    (["experiment", "nonsense", "--out", "o"], "experiment name"),
    *[(["experiment", "pareto", "--out", "o", "--workers", v], "--workers") for v in ("0", "-2", "x")],
    *[(["demo", "--steps", v], "--steps") for v in ("0", "-1", "abc", "4")],
    *[(["demo", "--pretrain-steps", v], "--pretrain-steps") for v in ("0", "-1")],
    (["info", "--format", "xml"], "--format"),
    *[(["info", "--model", "nope", "--alr-expansion", v], "alr") for v in ("nan", "-1", "0", "1000")],
    (["info", "--alr-expansion", "2"], "--model"),
    (["info", "--model", "/no/such/model/dir"], "/no/such/model/dir"),
    *[(["bench", v], v) for v in ("/etc/passwd", "../setup.py", "..", "", "bench_routing/../../x", "x;rm -rf")],
    (["nonsense"], "invalid choice"),
    (["train"], "--config"),
    (["train", "--config", "missing.yaml", "--output-dir", "o"], "missing.yaml"),
    (["train", "--config", "c.yaml", "--output-dir", "o", "--set", "nodot=1"], "--set"),
    (["train", "--config", "c.yaml", "--output-dir", "o", "--set", "train.lr"], "--set"),
    (["train", "--config", "c.yaml", "--output-dir", "o", "--set", "train.lr=[unclosed"], "train.lr"),
    (["train", "--config", "c.yaml", "--output-dir", "o", "--set", "model.tiny.x=1"], "tiny"),
    (["train", "--config", "c.yaml", "--output-dir", "", ], "--output-dir"),
    (["train", "--config", "c.yaml", "--output-dir", "o", "--resume", "no/such/ckpt"], "no/such/ckpt"),
]


@pytest.fixture()
def cli_dir(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(BASE))
    return tmp_path


@pytest.mark.parametrize("argv,name", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_flag(request, capsys, cli_dir, argv, name):
    t0 = time.time()
    rc, exc = None, None
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse: usage error (exit 2), message on stderr
        rc = e.code
    except BaseException as e:  # noqa: BLE001
        exc = e
    out, err = capsys.readouterr()
    if exc is not None:
        outcome, detail = "traceback", "".join(traceback.format_exception(exc))[-1500:]
    elif rc == 0:
        outcome, detail = "silent", out[-300:]
    else:
        outcome = "clear" if rc == 2 and name in err and "Traceback" not in err else "unclear"
        detail = err[-400:]
    _record(request, outcome, detail)
    assert outcome == "clear", f"{outcome} (rc={rc}): {detail}"
    assert time.time() - t0 < 20, "a bad flag must be refused before any work"
    assert not (cli_dir / "o").exists(), "nothing may be created"


# --- the public Python API -------------------------------------------------------------------------------------
def _logits(T=5, E=4):
    return torch.randn(T, E)


def _experts(T=5, D=8, I=6, E=4, K=2):
    x = torch.randn(T, D)
    w1, w2 = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    ids = torch.randint(0, E, (T, K))
    w = torch.rand(T, K)
    return x, w1, w2, ids, w


def _api_cases():
    import desmoe
    from desmoe import ops

    x, w1, w2, ids, w = _experts()
    cases = {
        "topk_route(list)": (lambda: ops.topk_route([[1.0, 2.0]], 1), ["logits"]),
        "topk_route(1-D)": (lambda: ops.topk_route(torch.randn(4), 1), ["logits"]),
        "topk_route(k=0)": (lambda: ops.topk_route(_logits(), 0), ["k"]),
        "topk_route(k>E)": (lambda: ops.topk_route(_logits(), 9), ["top_k"]),
        "topk_route(k=-1)": (lambda: ops.topk_route(_logits(), -1), ["k"]),
        "topk_route(k=1.5)": (lambda: ops.topk_route(_logits(), 1.5), ["k"]),
        "topk_route(k='2')": (lambda: ops.topk_route(_logits(), "2"), ["k"]),
        "topk_route(int logits)": (lambda: ops.topk_route(torch.ones(5, 4, dtype=torch.long), 2), ["logits"]),
        "topk_route(bias wrong size)": (lambda: ops.topk_route(_logits(), 2, bias_E=torch.zeros(3)), ["bias"]),
        "topk_route(bias nan)": (lambda: ops.topk_route(_logits(), 2, bias_E=torch.full((4,), math.nan)), ["bias"]),
        "topk_route(scaling nan)": (lambda: ops.topk_route(_logits(), 2, scaling=math.nan), ["scaling"]),
        "topk_route(scaling -1)": (lambda: ops.topk_route(_logits(), 2, scaling=-1.0), ["scaling"]),
        "topk_route(scoring bad)": (lambda: ops.topk_route(_logits(), 2, scoring="relu"), ["scoring"]),
        "topk_route(unknown kw)": (lambda: ops.topk_route(_logits(), 2, nonsense=1), ["nonsense"]),
        "expert_counts(E=0)": (lambda: ops.expert_counts(ids, 0), ["num_experts", "0"]),
        "expert_counts(id>=E)": (lambda: ops.expert_counts(torch.tensor([[7, 1]]), 4), ["ids"]),
        "expert_counts(float ids)": (lambda: ops.expert_counts(ids.float(), 4), ["ids"]),
        "expert_counts(negative id)": (lambda: ops.expert_counts(torch.tensor([[-1, 1]]), 4), ["ids"]),
        "permute(E=-1)": (lambda: ops.permute(ids, -1), ["num_experts", "-1"]),
        "moe_experts(x 1-D)": (lambda: ops.moe_experts(x[0], w1, w2, ids, w), ["x"]),
        "moe_experts(w1 wrong D)": (lambda: ops.moe_experts(x, w1[:, :, :5], w2, ids, w), ["gate_up"]),
        "moe_experts(w2 wrong I)": (lambda: ops.moe_experts(x, w1, w2[:, :, :5], ids, w), ["down"]),
        "moe_experts(ids wrong T)": (lambda: ops.moe_experts(x, w1, w2, ids[:3], w), ["ids"]),
        "moe_experts(weights shape)": (lambda: ops.moe_experts(x, w1, w2, ids, w[:, :1]), ["weights"]),
        "moe_experts(id out of range)": (lambda: ops.moe_experts(x, w1, w2, ids + 10, w), ["ids"]),
        "moe_experts(dtype mix)": (lambda: ops.moe_experts(x.double(), w1, w2, ids, w), ["dtype"]),
        "moe_experts(mask wrong E)": (lambda: ops.moe_experts(x, w1, w2, ids, w,
                                                              expert_trainable_E=torch.ones(3, dtype=torch.bool)),
                                      ["expert_trainable"]),
        "moe_experts(pair mask shape)": (lambda: ops.moe_experts(x, w1, w2, ids, w,
                                                                 pair_trainable_TK=torch.ones(2, 2, dtype=torch.bool)),
                                         ["pair_trainable"]),
        "patch(None)": (lambda: desmoe.patch(None), ["model"]),
        "patch(str)": (lambda: desmoe.patch("Qwen/Qwen3-30B-A3B"), ["model"]),
        "patch(Linear)": (lambda: desmoe.patch(torch.nn.Linear(2, 2)), ["model"]),
        "patch(backend bad)": (lambda: desmoe.patch(_tiny_model(), backend="cuda-magic"), ["backend"]),
        "from_pretrained(missing)": (lambda: desmoe.from_pretrained("/no/such/ckpt"), ["/no/such/ckpt"]),
        "from_pretrained(None)": (lambda: desmoe.from_pretrained(None), ["None"]),
        "from_pretrained(file)": (lambda: desmoe.from_pretrained(__file__), ["test_fuzz_inputs.py"]),
        "from_pretrained(device bad)": (lambda: desmoe.from_pretrained("/no/such/ckpt", device="gpu"), ["gpu"]),
        "DesMoETrainer(method bad)": (lambda: _trainer(method={"name": "lora"}), ["method.name", "lora"]),
        "DesMoETrainer(method phi)": (lambda: _trainer(method={"name": "des_moe", "phi": 2.0}), ["method.phi"]),
        "DesMoETrainer(method str)": (lambda: _trainer(method="des_moe"), ["method"]),
        "DesMoETrainer(method key)": (lambda: _trainer(method={"name": "des_moe", "phee": 1}), ["phee"]),
        "DesMoETrainer(domain_names empty)": (lambda: _trainer(domain_names=[]), ["domain_names"]),
        "DesMoETrainer(domain_names dup)": (lambda: _trainer(domain_names=["a", "a"]), ["domain_names"]),
        "DesMoETrainer(domain_names str)": (lambda: _trainer(domain_names="math"), ["domain_names"]),
    }
    return cases


_MODEL = {}


def _tiny_model():
    if "m" not in _MODEL:
        from desmoe.integrations.tiny import tiny_model

        _MODEL["m"] = tiny_model("qwen3_moe")
    return _MODEL["m"]


def _trainer(*, method=None, domain_names=("a", "b"), patched=True):
    import desmoe
    from desmoe.integrations.tiny import tiny_model
    from desmoe.train import DesMoETrainer
    from transformers import TrainingArguments

    model = tiny_model("qwen3_moe")
    if patched:
        desmoe.patch(model, backend="reference")
    args = TrainingArguments(os.path.join(os.environ.get("TMPDIR", "/tmp"), "desmoe-fuzz-trainer"), max_steps=1,
                             report_to=[], use_cpu=True)
    return DesMoETrainer(model=model, args=args, train_dataset=[{"input_ids": torch.tensor([1, 2, 3])}],
                         method=method if method is not None else {"name": "des_moe"},
                         domain_names=list(domain_names) if isinstance(domain_names, tuple) else domain_names)




def _api_ids():
    import re
    import inspect

    return re.findall(r'^\s+"([^"]+)": \(lambda', inspect.getsource(_api_cases), re.M)


def test_trainer_patches_an_unpatched_model(request):
    """Correct behaviour, not an error: DesMoETrainer patches a model that is not patched yet."""
    from desmoe.integrations.hf import moe_blocks

    tr = _trainer(patched=False)
    ok = bool(moe_blocks(tr.model))
    _record(request, "correct" if ok else "silent", "patched by the trainer")
    assert ok


@pytest.mark.parametrize("case", _api_ids())
def test_public_api(request, case):
    fn, names = _api_cases()[case]
    outcome, detail = _outcome_of(fn, names)
    _record(request, outcome, detail)
    assert outcome == "clear", f"{outcome}: {case}: {detail}"
