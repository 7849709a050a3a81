"""PEFT (LoRA) with desmoe's experts: LoRA on attention (``target_modules``) and on the fused experts' 3-D
parameters (``target_parameters``) gives stock transformers' values and gradients, whether ``desmoe.patch`` comes
before or after ``get_peft_model``. (DES-MoE's own trainers refuse PEFT: tests/train/test_trl_trainer.py.)"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import desmoe  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)  # non-zero B: the adapters change the output


def _run(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_lora_on_attention_and_fused_experts_matches_stock(order):
    torch.manual_seed(0)
    base = tiny_model("qwen3_moe", vocab_size=64).train()
    base.set_experts_implementation("eager")
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    stock = peft.get_peft_model(copy.deepcopy(base), _lora())
    if order == "patch_then_peft":
        torch.manual_seed(1)
        ours = peft.get_peft_model(desmoe.patch(copy.deepcopy(base)), _lora())
    else:
        torch.manual_seed(1)
        ours = peft.get_peft_model(copy.deepcopy(base), _lora())
        desmoe.patch(ours.base_model.model)
    ref_logits, ref_grads = _run(stock, ids)
    logits, grads = _run(ours, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    lora_names = [n for n in ref_grads if "lora_" in n]
    assert any("experts" in n for n in lora_names) and any("q_proj" in n for n in lora_names)
    assert set(grads) == set(ref_grads)  # only the adapters train, in both
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
