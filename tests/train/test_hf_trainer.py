"""DES-MoE through ``transformers.Trainer`` (DesMoETrainer + DesMoECallback): the same phase behaviour as our
own loop: which parameter kinds change in each phase, masked experts frozen, frozen parameters without optimizer
state, method state beside the Trainer checkpoints."""

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import desmoe  # noqa: E402
from desmoe.data import MixedDomainStream  # noqa: E402
from desmoe.train import DesMoECallback, DesMoETrainer, StreamDataset  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _docs(seed, n=40, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3 + 20 * seed, 23 + 20 * seed, (int(torch.randint(8, 30, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def test_trainer_phases_match_our_loop(tmp_path):
    from transformers import TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", vocab_size=64)
    desmoe.patch(model, backend="reference")
    stream = MixedDomainStream({"a": _docs(0), "b": _docs(1)}, seq_len=16, batch_size=4, eos_id=2)
    T = 10
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=T, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, logging_steps=1, save_steps=5, save_strategy="steps", report_to=[],
                             use_cpu=True, dataloader_num_workers=0,  # remove_unused_columns keeps domain_ids
                             disable_tqdm=True, seed=0)
    trainer = DesMoETrainer(model=model, args=args, train_dataset=StreamDataset(stream),
                            method={"name": "des_moe", "update_every": 2, "phi": 0.9}, domain_names=["a", "b"])
    ctl = trainer.desmoe
    kinds = ctl.kinds
    seen = []

    class Watch(TrainerCallback):  # snapshot around every optimizer step, after DesMoECallback's hooks
        def on_step_begin(self, args, state, control, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.phase = ctl.current_phase
            m = ctl.tracker.masks_LME
            self.masks = None if m is None else m.clone()

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            changed = {n for n, p in model.named_parameters() if not torch.equal(self.before[n], p.detach())}
            experts = {}
            for l, (bname, _, _) in enumerate(ctl.blocks):
                name = f"{bname}.experts.gate_up_proj"
                p = dict(model.named_parameters())[name].detach()
                experts[l] = {e for e in range(p.shape[0]) if not torch.equal(self.before[name][e], p[e])}
            opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            stateful = {kinds[n] for n, p in model.named_parameters() if p in opt.state}
            seen.append((state.global_step - 1, self.phase, {kinds[n] for n in changed}, experts, self.masks, stateful))

    trainer.add_callback(Watch())
    assert any(isinstance(c, DesMoECallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert [s[0] for s in seen] == list(range(T))
    want = {"warmup": {"experts", "alr"}, "stabilization": {"experts", "alr"}, "consolidation": {"experts"}}
    for step, phase, changed_kinds, experts, masks, stateful in seen:
        assert phase == ctl.phase(step)
        assert changed_kinds == want[phase], (step, phase, changed_kinds)
        assert stateful <= {"experts", "alr"}  # frozen kinds never get optimizer state
        if phase == "consolidation":
            assert "alr" not in stateful  # ALR state dropped when it froze
        if phase != "warmup":
            for l, got in experts.items():
                allowed = set(masks[l].any(0).nonzero().flatten().tolist())
                assert got and got <= allowed, (step, l, got, allowed)
    assert trainer.desmoe_callback.phase_log == [(ctl.method.t1, "stabilization"), (ctl.method.t2, "consolidation")]
    assert ctl.tracker.initialised
    logs = [h for h in trainer.state.log_history if "desmoe_phase" in h]
    assert logs and {"task_loss", "kd_loss", "desmoe_lambda", "mask_size/a"} <= set(logs[-1])
    assert logs[0]["kd_loss"] >= 0 and logs[-1]["desmoe_phase"] == "consolidation"
    ck5 = tmp_path / "out" / "checkpoint-5" / "desmoe_method.pt"
    assert ck5.is_file()
    st = torch.load(ck5, weights_only=False)
    assert st["tracker"]["initialised"] and st["tracker"]["masks_LME"] is not None

    # resume from checkpoint-5: the method state (A, masks) comes back with the Trainer's own state
    model2 = tiny_model("qwen3_moe", vocab_size=64)
    desmoe.patch(model2, backend="reference")
    t2 = DesMoETrainer(model=model2, args=args, train_dataset=StreamDataset(stream),
                       method={"name": "des_moe", "update_every": 2, "phi": 0.9}, domain_names=["a", "b"])
    loaded = []

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            loaded.append(t2.desmoe.tracker.A_LME.clone())

    t2.add_callback(Peek())
    t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert torch.equal(loaded[0], st["tracker"]["A_LME"]) and t2.state.global_step == T
    with pytest.raises(FileNotFoundError, match="desmoe_method.pt"):
        t2.train(resume_from_checkpoint=str(tmp_path))


def test_trainer_bad_arguments(tmp_path):
    from transformers import TrainingArguments

    model = tiny_model("qwen3_moe", vocab_size=64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)  # max_steps = -1
    with pytest.raises(ValueError, match="max_steps"):
        DesMoETrainer(model=model, args=args, domain_names=["a"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3)
    with pytest.raises(ValueError, match="domain_names"):
        DesMoETrainer(model=model, args=args, domain_names=[])
    with pytest.raises(ValueError, match="method.name"):
        DesMoETrainer(model=model, args=args, domain_names=["a"], method={"name": "lora"})


def test_aux_loss_included_the_same_way_in_the_loop_and_the_trainer(tmp_path):
    """The model's own load-balancing loss is on by default and added outside λ·KD + (1-λ)·task in both paths
    (HF's outputs.loss already holds coef·aux: the Trainer path must not scale it by 1-λ); aux_loss=False drops it."""
    from transformers import TrainingArguments

    from desmoe.train.loss import supervised_tokens, task_loss

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", vocab_size=64, router_aux_loss_coef=0.5)  # large: a (1-λ) scaling would show
    desmoe.patch(model, backend="reference")
    stream = MixedDomainStream({"a": _docs(0), "b": _docs(1)}, seq_len=16, batch_size=4, eos_id=2)
    b = stream.next_batch()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=10, report_to=[], use_cpu=True)
    losses = {}
    for aux_on in (True, False):
        torch.manual_seed(1)  # the same ALR in both runs
        tr = DesMoETrainer(model=model, args=args, method={"name": "des_moe"}, domain_names=["a", "b"],
                           aux_loss=aux_on)
        ctl = tr.desmoe
        ctl.begin_step(0)
        for a in ctl.alr:
            torch.nn.init.normal_(a.down.weight, std=0.3)
        assert 0 < ctl.last_lambda < 1
        dom_T = b["domain_ids"].reshape(-1)
        with ctl.applied(dom_T, supervised_T=supervised_tokens(b["labels"])) as fwd:  # the loop's formula
            task, aux, _, _ = task_loss(model, b, torch.device("cpu"), False, aux=aux_on)
        assert (aux is not None) == aux_on
        loop = ctl.combine(task, fwd.added_loss) + (aux if aux is not None else 0.0)
        # the rows as StreamDataset gives them (isolated packing: position_ids, no 2-D mask)
        hf = tr.compute_loss(model, {k: b[k] for k in ("input_ids", "labels", "position_ids", "domain_ids")})
        torch.testing.assert_close(hf, loop, rtol=1e-5, atol=1e-6)
        losses[aux_on] = (float(loop.detach()), None if aux is None else float(aux.detach()))
        for a in ctl.alr:
            torch.nn.init.zeros_(a.down.weight)
    assert losses[True][0] - losses[False][0] == pytest.approx(losses[True][1], rel=1e-4)
