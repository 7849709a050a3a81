"""Liger-Kernel beside desmoe: desmoe owns the experts forward, and knows it.

Liger binds its fused-MoE ``forward`` on every experts module instance (``_patch_swiglu_module``), or swaps the
experts class in transformers' modeling module; either way DES-MoE's masks would silently not apply. Checked:
``desmoe.patch`` takes the experts back whatever is bound, saying what it replaced; a method step whose masks a
foreign forward would drop stops with an error naming the module; ``DesMoETrainer(use_liger_kernel=True)`` trains
with desmoe's experts and leaves the rest of Liger in place. Liger's own Triton kernels (RMSNorm, RoPE, fused
linear cross-entropy) need a GPU: the CPU tests apply Liger's experts swap only; the ``gpu`` test the full set.
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("liger_kernel", reason="liger-kernel not installed")

import desmoe  # noqa: E402
from desmoe.integrations.hf import foreign_experts_forward  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402
from desmoe.method import MethodConfig, MethodController  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS_ONLY = {"rope": False, "rms_norm": False, "fused_linear_cross_entropy": False, "cross_entropy": False,
                "swiglu": True}


def _liger_experts_swap(model):
    from liger_kernel.transformers.monkey_patch import _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerExperts

    for layer in model.model.layers:
        _patch_swiglu_module(layer.mlp.experts, LigerExperts)


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _ids():
    return torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_patch_takes_over_a_liger_bound_forward_and_says_so():
    ref = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64)).train()
    m = copy.deepcopy(ref)
    _liger_experts_swap(m)
    assert all("LigerExperts.forward" in foreign_experts_forward(ex) for ex in _experts(m))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts: replaced a forward bound on the "
                                         r"instance \(liger_kernel\.transformers\.swiglu\.LigerExperts\.forward\)"):
        desmoe.patch(m)
    assert all(foreign_experts_forward(ex) is None for ex in _experts(m))
    assert all(ex._get_name() == type(ex).__name__ for ex in _experts(m))  # Liger's renaming gone too
    ids = _ids()
    a, b = ref(ids, labels=ids), m(ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.logits, b.logits)
    for (n, p), q in zip(ref.named_parameters(), m.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        desmoe.patch(m)  # nothing foreign left: no warning the second time


def test_patch_takes_over_a_liger_swapped_experts_class(monkeypatch):
    from liger_kernel.transformers.swiglu import LigerExperts
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    monkeypatch.setattr(modeling_qwen3_moe, "Qwen3MoeExperts", LigerExperts)  # what Liger does on transformers 5
    m = tiny_model("qwen3_moe", vocab_size=64)
    assert isinstance(m.model.layers[0].mlp.experts, LigerExperts)
    with pytest.warns(UserWarning, match="the class forward of liger_kernel.transformers.swiglu.LigerExperts"):
        desmoe.patch(m)
    assert all(foreign_experts_forward(ex) is None for ex in _experts(m))
    ctl = MethodController(m, MethodConfig(name="esft_gate"), 10, ["a", "b"])
    ctl.method.selection_LE = torch.zeros(len(ctl.experts), ctl.num_experts, dtype=torch.bool)
    ctl.method.selection_LE[:, 0] = True
    ctl.begin_step(0)
    ids = _ids()
    with ctl.applied(torch.zeros(ids.numel(), dtype=torch.long)):
        out = m(ids, labels=ids)
    out.loss.backward()
    for ex in _experts(m):  # only expert 0 of each layer got a weight gradient: the mask was applied
        g = ex.gate_up_proj.grad
        assert g[1:].abs().sum() == 0 and g[0].abs().sum() > 0


def test_a_forward_bound_after_patch_stops_a_masked_step_naming_the_module():
    m = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64)).train()
    ctl = MethodController(m, MethodConfig(name="des_moe"), 10, ["a", "b"])
    ids = _ids()
    ctl.begin_step(0)  # warm-up: no masks, a foreign forward would drop nothing (Liger's kernel needs a GPU)
    _liger_experts_swap(m)
    with ctl.applied(torch.zeros(ids.numel(), dtype=torch.long)):
        pass
    ctl.tracker.observe(torch.randint(0, ctl.num_experts, (len(ctl.experts), 8, 2)), torch.zeros(8, dtype=torch.long))
    ctl.tracker.finish_warmup()
    ctl.begin_step(5)  # stabilisation: DGES masks
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts runs a forward bound on the instance: "
                                           r"liger_kernel\.transformers\.swiglu\.LigerExperts\.forward.*silently "
                                           r"dropped.*desmoe\.patch\(model\) again"):
        with ctl.applied(torch.zeros(ids.numel(), dtype=torch.long)):
            m(ids)
    with pytest.warns(UserWarning):
        desmoe.patch(m)
    with ctl.applied(torch.zeros(ids.numel(), dtype=torch.long)):
        m(ids)


def test_another_experts_implementation_after_patch_is_refused_too():
    m = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64)).train()
    ctl = MethodController(m, MethodConfig(name="esft_gate"), 10, ["a", "b"])
    ctl.method.selection_LE = torch.ones(len(ctl.experts), ctl.num_experts, dtype=torch.bool)
    m.set_experts_implementation("eager")
    ctl.begin_step(0)
    with pytest.raises(RuntimeError, match="experts implementation 'eager'"):
        with ctl.applied(torch.zeros(24, dtype=torch.long)):
            pass


def _rows():
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i], "labels": ids[i].clone(), "domain_ids": torch.full((16,), i % 2)} for i in range(4)]


@pytest.fixture()
def restore_transformers(monkeypatch):
    """Liger's apply_liger_kernel_to_* (which the Trainer calls for use_liger_kernel=True) also replaces classes
    and functions in transformers' modeling module for every model built afterwards: put them back after the test."""
    from transformers.loss import loss_utils
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    for name, value in list(vars(modeling_qwen3_moe).items()):
        if not name.startswith("__"):
            monkeypatch.setattr(modeling_qwen3_moe, name, value)
    for cls in (modeling_qwen3_moe.Qwen3MoeForCausalLM,):
        monkeypatch.setattr(cls, "forward", cls.forward)
    monkeypatch.setattr(loss_utils.nn.functional, "cross_entropy", loss_utils.nn.functional.cross_entropy)


def _trainer(tmp_path, liger_config, **kw):
    from transformers import TrainingArguments

    from desmoe.train import DesMoETrainer

    m = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64, **kw))
    args = TrainingArguments(output_dir=str(tmp_path / "lg"), max_steps=4, per_device_train_batch_size=2,
                             report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             save_strategy="no", logging_steps=1, use_liger_kernel=True,
                             liger_kernel_config=liger_config)
    return DesMoETrainer(model=m, args=args, train_dataset=_rows(), domain_names=["a", "b"],
                         method={"name": "des_moe", "warmup_frac": 0.25, "update_every": 1}), m


def test_desmoe_trainer_with_use_liger_kernel_trains_desmoe_experts(tmp_path, restore_transformers):
    pytest.importorskip("accelerate")
    tr, m = _trainer(tmp_path, EXPERTS_ONLY)
    with pytest.warns(UserWarning, match="LigerExperts.forward"):
        tr.train()  # the Trainer applies Liger at train(): DesMoETrainer takes the experts back before step 1
    assert all(foreign_experts_forward(ex) is None for ex in _experts(m))
    from liger_kernel.transformers.swiglu import LigerExperts
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    assert modeling_qwen3_moe.Qwen3MoeExperts is LigerExperts  # what Liger did globally (undone after the test)
    phases = [h.get("desmoe_phase") for h in tr.state.log_history if "desmoe_phase" in h]
    assert "stabilization" in phases  # steps with DGES masks ran (the guard would have stopped them otherwise)


@pytest.mark.gpu
def test_gpu_desmoe_trainer_with_liger_full_set(tmp_path, restore_transformers):
    # Liger's full set (RMSNorm, RoPE, fused linear cross-entropy) stays in place; the experts are desmoe's
    pytest.importorskip("accelerate")
    tr, m = _trainer(tmp_path, None)
    with pytest.warns(UserWarning, match="LigerExperts"):
        tr.train()
    assert all(foreign_experts_forward(ex) is None for ex in _experts(m))
    assert "liger" in type(m.model.norm).__module__.lower() or "liger" in str(type(m.model.norm.forward)).lower() \
        or "liger" in getattr(m.model.norm.forward, "__module__", "")
    assert "liger" in m.forward.__func__.__module__  # fused linear cross-entropy forward
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
