"""DES-MoE in the training stack people run: activation checkpointing and gradient accumulation, through our own
loop (``desmoe.train.trainer.Trainer.forward_backward``) and ``DesMoETrainer`` (transformers' Trainer).

One matrix: {our loop, DesMoETrainer} x {checkpointing off, non-reentrant, reentrant} x {accumulation 1, 2} x
{DES-MoE, FFT}; every cell's gradients (every parameter: experts under per-token DGES masks, the ALR with its KD
gradient, attention, ...) equal the plain cell's (checkpointing off, one batch of the same rows) to fp32 rounding.
The DES-MoE cells run in stabilisation, where both the masks and the KD term are on.
"""
import os

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import desmoe  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402
from desmoe.train.builders import disable_activation_checkpointing, enable_activation_checkpointing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT = {"off": None, "non_reentrant": False, "reentrant": True}
B, S, VOCAB = 4, 16, 64


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    dom = torch.tensor([0, 1, 1, 0]).view(B, 1).expand(B, S).clone()
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(B, S, dtype=torch.long),
            "domain_ids": dom}


def _seed_masks(ctl, seed=0):
    """Warm-up statistics from fixed routing, then the DGES masks (some experts of each domain frozen)."""
    g = torch.Generator().manual_seed(seed)
    L, E, K = len(ctl.routers), ctl.num_experts, ctl.routers[0].top_k
    T = 64
    ids = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) for _ in range(L)])
    dom = torch.arange(T) % len(ctl.domain_names)
    ctl.tracker.observe(ids, dom)
    ctl.tracker.finish_warmup()


def _nonzero_alr(ctl, seed=0):
    g = torch.Generator().manual_seed(seed)
    for a in ctl.alr:  # the ALR starts at 0 (student == teacher, KD 0): give it a residual so KD has a gradient
        with torch.no_grad():
            a.down.weight.copy_(torch.randn(a.down.weight.shape, generator=g) * 0.3)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want, what):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for n, w in want.items():
        err = (got[n] - w).norm() / w.norm().clamp(min=1e-12)
        assert err <= 1e-5 or (got[n] - w).abs().max() <= 1e-7, f"{what}: {n} differs by {float(err):.2e} (rel)"


# --- our loop -------------------------------------------------------------------------------------------------

def _loop_trainer(tmp_path, method, **train):
    from desmoe.train.config import config_from_dict
    from desmoe.train.distributed import Dist
    from desmoe.train.signals import StopFlag
    from desmoe.train.trainer import Trainer

    from test_train import tiny_cfg

    d = tiny_cfg(str(tmp_path), **train)
    d["method"] = {"name": method, "update_every": 2}
    d["data"]["batch_size"] = B
    d["data"]["seq_len"] = S
    d["train"]["aux_loss"] = False  # the model's aux loss is per micro-batch: accumulation changes it, in stock too
    cfg = config_from_dict(d)
    tr = Trainer(cfg, str(tmp_path / "run"), dist=Dist.setup("none", "cpu"), flag=StopFlag(), progress=False,
                 log=lambda *a, **k: None)
    tr.setup()
    return tr


def _loop_grads(tr, rows, step, ga):
    from desmoe.train.loss import StepStats

    ctl, model = tr.ctl, tr.model
    model.zero_grad(set_to_none=True)
    ctl.begin_step(step)
    tr.cfg.train.grad_accum = ga
    st = StepStats(len(ctl.domain_names))
    n = B // ga
    for micro in range(ga):
        tr.forward_backward({k: v[micro * n:(micro + 1) * n] for k, v in rows.items()}, micro, st)
    assert st.bad is None
    g = _grads(model)
    ctl.release()
    return g


@pytest.fixture(scope="module")
def loop_trainers(tmp_path_factory):
    out = {}
    for method in ("des_moe", "fft"):
        tr = _loop_trainer(tmp_path_factory.mktemp(method), method)
        if method == "des_moe":
            _seed_masks(tr.ctl)
            _nonzero_alr(tr.ctl)
        out[method] = tr
    return out


def _set_checkpointing(model, mode):
    if CKPT[mode] is None:
        disable_activation_checkpointing(model)
    else:
        enable_activation_checkpointing(model, 1, reentrant=CKPT[mode])


@pytest.mark.parametrize("method", ["des_moe", "fft"])
def test_our_loop_matrix_equals_the_plain_step(loop_trainers, method):
    tr = loop_trainers[method]
    tr.model.train()
    rows = {k: v.clone() for k, v in _rows().items()}
    rows["input_ids"] = rows["input_ids"] % len(tr.tok)
    rows["labels"] = rows["input_ids"].clone()
    step = 3  # stabilisation (T=10: warm-up [0, 2)), masks and KD on for DES-MoE
    _set_checkpointing(tr.model, "off")
    plain = _loop_grads(tr, rows, step, 1)
    if method == "des_moe":
        ctl = tr.ctl
        assert ctl.current_phase == "stabilization" and ctl.last_lambda > 0 and ctl.tracker.masks_LME is not None
        assert not ctl.tracker.masks_LME.all()  # some experts are masked for some domain
        assert any(".residual." in n for n in plain)
        assert all(g.abs().sum() > 0 for n, g in plain.items() if ".residual." in n)
    for mode in CKPT:
        _set_checkpointing(tr.model, mode)
        assert tr.model.is_gradient_checkpointing == (CKPT[mode] is not None)
        for ga in (1, 2):
            if mode == "off" and ga == 1:
                continue
            _assert_same_grads(_loop_grads(tr, rows, step, ga), plain, f"loop {method} {mode} ga={ga}")
    _set_checkpointing(tr.model, "off")


def test_statistics_are_counted_once_under_checkpointing(loop_trainers):
    tr = loop_trainers["des_moe"]
    rows = {k: v.clone() for k, v in _rows().items()}
    rows["input_ids"] = rows["input_ids"] % len(tr.tok)
    rows["labels"] = rows["input_ids"].clone()
    counts = {}
    for mode in CKPT:
        _set_checkpointing(tr.model, mode)
        before = tr.ctl.tracker.counts_LME.clone()
        _loop_grads(tr, rows, 3, 1)
        counts[mode] = tr.ctl.tracker.counts_LME - before
    _set_checkpointing(tr.model, "off")
    assert counts["off"].sum() == len(tr.ctl.routers) * B * S * tr.ctl.routers[0].top_k
    for mode in ("non_reentrant", "reentrant"):
        assert torch.equal(counts[mode], counts["off"]), mode


# --- DesMoETrainer --------------------------------------------------------------------------------------------

class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows, with_domains=True):
        self.rows = rows
        self.keys = [k for k in rows if with_domains or k != "domain_ids"]

    def __len__(self):
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: self.rows[k][i] for k in self.keys}


def _hf_grads(tmp_path, method, mode, ga, *, stock=False, seed_model=0):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from desmoe.train import DesMoETrainer

    torch.manual_seed(seed_model)
    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=VOCAB, seed=seed_model))
    ckpt = CKPT[mode]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{method}-{mode}-{ga}-{stock}"), max_steps=10, per_device_train_batch_size=B // ga,
        gradient_accumulation_steps=ga, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        save_strategy="no", logging_steps=1, gradient_checkpointing=ckpt is not None,
        gradient_checkpointing_kwargs=None if ckpt is None else {"use_reentrant": ckpt})
    grads = {}

    class Grab(TrainerCallback):  # after DesMoECallback's pre-optimizer hook; stops after the first step
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.update(_grads(model))

        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = True

    ds = _Rows(_rows(), with_domains=not stock)
    if stock:
        tr = Trainer(model=model, args=args, train_dataset=ds)
    else:
        tr = DesMoETrainer(model=model, args=args, train_dataset=ds, aux_loss=False, domain_names=["a", "b"],
                           method={"name": method, "warmup_frac": 0.0, "update_every": 2})
        if method == "des_moe":
            _seed_masks(tr.desmoe)
            torch.manual_seed(1)
            _nonzero_alr(tr.desmoe)
    tr.add_callback(Grab())
    tr.train()
    if not stock:
        ctl = tr.desmoe
        assert ctl.current_phase == ("stabilization" if method == "des_moe" else ctl.current_phase)
    return grads, tr


@pytest.mark.parametrize("method", ["des_moe", "fft"])
def test_desmoe_trainer_matrix_equals_the_plain_step(tmp_path, method):
    plain, tr = _hf_grads(tmp_path, method, "off", 1)
    if method == "des_moe":
        assert tr.desmoe.tracker.masks_LME is not None and not tr.desmoe.tracker.masks_LME.all()
        assert any(".residual." in n for n in plain)
    for mode in CKPT:
        for ga in (1, 2):
            if mode == "off" and ga == 1:
                continue
            got, _ = _hf_grads(tmp_path, method, mode, ga)
            _assert_same_grads(got, plain, f"DesMoETrainer {method} {mode} ga={ga}")


def test_desmoe_trainer_accumulation_matches_stock_trainer(tmp_path):
    # FFT through DesMoETrainer and stock transformers.Trainer on the same rows: the same gradients, with and
    # without accumulation (stock's num_items_in_batch convention)
    for ga in (1, 2):
        ours, _ = _hf_grads(tmp_path, "fft", "off", ga)
        stock, _ = _hf_grads(tmp_path, "fft", "off", ga, stock=True)
        _assert_same_grads(ours, stock, f"DesMoETrainer fft vs stock Trainer ga={ga}")


def test_logged_losses_are_per_token_means_whatever_the_accumulation(tmp_path):
    logs = {}
    for ga in (1, 2):
        _, tr = _hf_grads(tmp_path, "des_moe", "off", ga)
        row = next(h for h in tr.state.log_history if "task_loss" in h)
        logs[ga] = (row["task_loss"], row["kd_loss"])
    assert logs[1][1] > 0
    assert logs[2] == pytest.approx(logs[1], rel=1e-5)


def test_evaluate_and_predict_without_domain_ids(tmp_path):
    from transformers import TrainingArguments

    from desmoe.train import DesMoETrainer

    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=VOCAB))
    args = TrainingArguments(output_dir=str(tmp_path / "e"), max_steps=10, per_device_eval_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    tr = DesMoETrainer(model=model, args=args, domain_names=["a", "b"], method={"name": "des_moe"})
    counts = tr.desmoe.tracker.counts_LME.clone()
    general = _Rows(_rows(), with_domains=False)
    m = tr.evaluate(eval_dataset=general)
    assert m["eval_loss"] > 0
    pred = tr.predict(general)
    assert pred.metrics["test_loss"] == pytest.approx(m["eval_loss"], rel=1e-6)
    assert not any(k.startswith("eval_loss/") for k in m)  # no domains, no per-domain losses
    m2 = tr.evaluate(eval_dataset=_Rows(_rows()))  # with domain ids: the same loss, statistics untouched
    assert m2["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-6)
    assert torch.equal(tr.desmoe.tracker.counts_LME, counts)
    # and the loss of each domain's target tokens; one batch of 4 equal rows: their token-weighted mean is eval_loss
    assert {"eval_loss/a", "eval_loss/b"} <= set(m2)
    tr.args.per_device_eval_batch_size = 4
    m3 = tr.evaluate(eval_dataset=_Rows(_rows()))
    rows = _rows()
    n_a = int((rows["domain_ids"][:, 1:] == 0).sum())
    n_b = int((rows["domain_ids"][:, 1:] == 1).sum())
    mean = (m3["eval_loss/a"] * n_a + m3["eval_loss/b"] * n_b) / (n_a + n_b)
    assert mean == pytest.approx(m3["eval_loss"], rel=1e-5)
    assert m3["eval_loss/a"] != m3["eval_loss/b"]


def test_training_rows_without_domain_ids_are_refused(tmp_path):
    from transformers import TrainingArguments

    from desmoe.train import DesMoETrainer

    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=VOCAB))
    args = TrainingArguments(output_dir=str(tmp_path / "r"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    tr = DesMoETrainer(model=model, args=args, train_dataset=_Rows(_rows(), with_domains=False),
                       domain_names=["a", "b"], method={"name": "des_moe"})
    with pytest.raises(ValueError, match="every training batch needs 'domain_ids'"):
        tr.train()


# --- every method, every experts backend, under both checkpointing modes (the controller's own contract) --------

def _controller_step(model, ctl, rows, step):
    model.zero_grad(set_to_none=True)
    ctl.begin_step(step)
    with ctl.applied(rows["domain_ids"].reshape(-1)) as fwd:
        out = model(input_ids=rows["input_ids"], labels=rows["labels"])
    ctl.combine(out.loss, fwd.added_loss).backward()
    g = _grads(model)
    ctl.release()
    return g, fwd.added_loss


def _controller(method, backend="grouped"):
    from desmoe.method import MethodConfig, MethodController

    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=VOCAB), backend=backend).train()
    ctl = MethodController(model, MethodConfig(name=method, esft_p=0.5), 10, ["a", "b"])
    if ctl.method.prepare_batches():
        ctl.prepare([_rows(1)])
    if ctl.alr:
        _nonzero_alr(ctl)
    _seed_masks(ctl)
    return model, ctl


def _check_modes(model, ctl, what, step=3):
    rows = _rows()
    disable_activation_checkpointing(model)
    plain, kd = _controller_step(model, ctl, rows, step)
    for mode in ("non_reentrant", "reentrant"):
        enable_activation_checkpointing(model, 1, reentrant=CKPT[mode])
        got, kd_mode = _controller_step(model, ctl, rows, step)
        _assert_same_grads(got, plain, f"{what} {mode}")
        assert (kd is None) == (kd_mode is None) and (kd is None or torch.allclose(kd, kd_mode, rtol=1e-6))
    disable_activation_checkpointing(model)
    return plain, kd


@pytest.mark.parametrize("method", ["des_moe", "des_moe_no_alr", "des_moe_no_dges", "esft_gate", "esft_token",
                                    "fft", "frozen_router", "experts_only", "fft_attention_frozen"])
def test_every_method_under_activation_checkpointing(method):
    model, ctl = _controller(method)
    plain, kd = _check_modes(model, ctl, method)
    if method in ("des_moe", "des_moe_no_dges"):
        assert kd is not None and kd > 0 and any(".residual." in n for n in plain)


@pytest.mark.parametrize("backend", ["reference", "grouped", "triton"])
def test_every_experts_backend_under_activation_checkpointing(backend):
    from desmoe import ops

    if backend == "triton" and (os.environ.get("TRITON_INTERPRET") != "1" or not ops.triton_available()):
        pytest.skip("Triton under the CPU interpreter is not available here")
    model, ctl = _controller("des_moe", backend)
    _check_modes(model, ctl, f"des_moe/{backend}")


def test_kd_reaches_only_the_alr_under_reentrant_checkpointing():
    # the reentrant first forward runs without gradients: the KD term is attached again in the backward's replay
    model, ctl = _controller("des_moe")
    for p in model.parameters():
        p.requires_grad_(True)
    enable_activation_checkpointing(model, 1, reentrant=True)
    rows = _rows()
    model.zero_grad(set_to_none=True)
    ctl.last_lambda = 0.5
    with ctl.applied(rows["domain_ids"].reshape(-1)) as fwd:
        out = model(input_ids=rows["input_ids"], labels=rows["labels"])
    ctl.combine(out.loss * 0.0, fwd.added_loss).backward()  # the KD term's gradient alone
    kinds = ctl.kinds
    for n, p in model.named_parameters():
        if kinds[n] != "alr":
            assert p.grad is None or not p.grad.any(), f"KD reached {n} ({kinds[n]})"
    assert all(a.down.weight.grad is not None and a.down.weight.grad.abs().sum() > 0 for a in ctl.alr)
    ctl.release()
    disable_activation_checkpointing(model)


def test_every_n_layers_and_the_config_switch(tmp_path):
    from desmoe.train.config import TrainConfig
    from transformers.modeling_layers import GradientCheckpointingLayer

    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        TrainConfig(activation_checkpointing=-1)
    with pytest.raises(ValueError, match="train.activation_checkpointing_reentrant"):
        TrainConfig(activation_checkpointing_reentrant="yes")
    tr = _loop_trainer(tmp_path, "des_moe", activation_checkpointing=2)
    flags = [m.gradient_checkpointing for m in tr.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(flags) >= 2 and flags[::2] == [True] * len(flags[::2]) and not any(flags[1::2])
    model, ctl = _controller("des_moe")
    disable_activation_checkpointing(model)
    rows = _rows()
    plain, _ = _controller_step(model, ctl, rows, 3)
    enable_activation_checkpointing(model, 2)
    got, _ = _controller_step(model, ctl, rows, 3)
    _assert_same_grads(got, plain, "every 2nd layer")
