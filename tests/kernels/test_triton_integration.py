"""``desmoe.patch(model, backend="triton")`` on tiny HF models: the Triton kernels (CPU interpreter here) give
the eager model's logits and gradients."""
import copy

import pytest
import torch

import desmoe
from desmoe.context import MaskScope
from desmoe.integrations.tiny import tiny_model

pytest.importorskip("desmoe.ops.triton_experts")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DESMOE_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_patch_triton_matches_eager(model_type, monkeypatch):
    from desmoe.ops import triton_experts, triton_routing

    calls = {"topk_route": 0, "moe_experts": 0}
    for fn, mod in (("topk_route", triton_routing), ("moe_experts", triton_experts)):
        def counted(*a, _fn=getattr(mod, fn), _name=fn, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(mod, fn, counted)
    eager = tiny_model(model_type).to(DEV).train()
    fast = copy.deepcopy(eager)
    desmoe.patch(fast, backend="triton")
    ids = torch.randint(3, 128, (2, 7), device=DEV)
    out_e = eager(input_ids=ids, labels=ids)
    out_f = fast(input_ids=ids, labels=ids)
    assert calls["topk_route"] > 0 and calls["moe_experts"] > 0, calls  # the kernels really ran
    torch.testing.assert_close(out_f.logits, out_e.logits, atol=2e-5, rtol=1e-4)
    out_e.loss.backward()
    out_f.loss.backward()
    pf = dict(fast.named_parameters())
    n_moe = 0
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert pf[name].grad is None, name
            continue
        n_moe += name.endswith(("gate_up_proj", "down_proj", "gate.weight"))
        torch.testing.assert_close(pf[name].grad, p.grad, atol=5e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert n_moe > 0


def test_patch_triton_expert_mask_freezes_experts():
    model = tiny_model("qwen3_moe").to(DEV).train()
    desmoe.patch(model, backend="triton")
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    E = experts[0].gate_up_proj.shape[0]
    trainable = torch.arange(E, device=DEV) % 2 == 0
    masks = MaskScope()
    for m in experts:
        masks.set(m, expert_trainable_E=trainable)
    ids = torch.randint(3, 128, (2, 9), device=DEV)
    model(input_ids=ids, labels=ids).loss.backward()
    masks.clear()
    for m in experts:
        assert not m.gate_up_proj.grad[~trainable].any() and not m.down_proj.grad[~trainable].any()
        assert m.gate_up_proj.grad[trainable].abs().sum() > 0
