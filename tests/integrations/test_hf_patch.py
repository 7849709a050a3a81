"""Hugging Face drop-in: desmoe.patch(model) on tiny, locally built models of every supported model type.

Parity is against the same model with transformers' own ``eager`` experts implementation: logits and every
parameter's gradient, float32 tight and bf16 within the DESIGN.md tolerance rule.
"""
import copy

import pytest
import torch

import desmoe
from desmoe.integrations import moe_blocks, routers
from desmoe.integrations.tiny import COVERED_BY, tiny_model, tiny_model_types
from desmoe.context import MaskScope, recording
from desmoe.layers import TopKRouter

SUPPORTED = tiny_model_types()  # every supported model type, or the one whose machinery it shares


def test_every_supported_type_has_a_tiny_model():
    covered = set(tiny_model_types()) | {t for t, by in COVERED_BY.items() if by in tiny_model_types()}
    assert set(desmoe.supported_model_types()) == covered
    for must in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"):
        assert must in SUPPORTED


def test_import_registers_experts_implementation():
    from transformers.integrations.moe import ExpertsInterface

    assert "desmoe" in ExpertsInterface._global_mapping


def _ids(vocab=128, B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, S), generator=g)


def _run(model, ids, **kw):
    # one seed per forward: a family that samples in training (Phi-3.5-MoE's SparseMixer: Gumbel noise, the Heun
    # mask) then draws the same numbers in the stock and the patched model (desmoe runs its own selection function)
    torch.manual_seed(1234)
    return model(ids, **kw)


def _loss(model, ids):
    out = _run(model, ids, labels=ids)
    return out.logits, out.loss


def _eager_and_patched(model_type, dtype=torch.float32):
    ref = tiny_model(model_type, dtype=dtype).train()
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    assert desmoe.patch(ours, backend="reference") is ours
    return ref, ours


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_patched_matches_eager_fp32_logits_and_grads(model_type):
    ref, ours = _eager_and_patched(model_type)
    assert len(routers(ours)) >= 1 and len(moe_blocks(ours)) == len(routers(ours))
    ids = _ids()
    lr, loss_r = _loss(ref, ids)
    lo, loss_o = _loss(ours, ids)
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    loss_r.backward()
    loss_o.backward()
    grads_o = dict(ours.named_parameters())
    n = 0
    for name, p in ref.named_parameters():
        q = grads_o[name]
        if p.grad is None:
            assert q.grad is None or q.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 10


# A logit-norm rule cannot absorb one token choosing another expert in bf16 (desmoe's experts accumulate in
# fp32, transformers' eager ones in bf16, so they round differently), which the tiny models of some types do on
# this input (glm4_moe_lite on 5.24, dots1 on 5.17): the logits rule runs on four families, the bf16
# gradient rule below on every type.
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe"])
def test_patched_bf16_within_tolerance_rule(model_type):
    ids = _ids()
    oracle = tiny_model(model_type, dtype=torch.float32)
    oracle.set_experts_implementation("eager")
    ref_logits = oracle(ids).logits.double()
    eager_bf16 = tiny_model(model_type, dtype=torch.bfloat16)
    eager_bf16.set_experts_implementation("eager")
    ours = desmoe.patch(copy.deepcopy(eager_bf16), backend="reference")
    e_logits = eager_bf16(ids).logits.double()
    o_logits = ours(ids).logits.double()
    assert ours(ids).logits.dtype == torch.bfloat16
    assert (o_logits - ref_logits).norm() <= 2 * (e_logits - ref_logits).norm() + 1e-2


def _flat_grads(model):
    return torch.cat([p.grad.double().reshape(-1) for _, p in sorted(model.named_parameters()) if p.grad is not None])


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_patched_bf16_gradients_within_tolerance_rule(model_type):
    # every parameter's gradient, bf16, default backend (the grouped path on CPU): no further from the fp32
    # oracle than twice what transformers' own bf16 eager experts are
    ids = _ids()
    oracle = tiny_model(model_type, dtype=torch.float32).train()
    oracle.set_experts_implementation("eager")
    _run(oracle, ids, labels=ids).loss.backward()
    eager_bf16 = tiny_model(model_type, dtype=torch.bfloat16).train()
    eager_bf16.set_experts_implementation("eager")
    ours = desmoe.patch(copy.deepcopy(eager_bf16))
    _run(eager_bf16, ids, labels=ids).loss.backward()
    _run(ours, ids, labels=ids).loss.backward()
    g_ref, g_eager, g_ours = _flat_grads(oracle), _flat_grads(eager_bf16), _flat_grads(ours)
    assert g_ours.shape == g_ref.shape
    assert (g_ours - g_ref).norm() <= 2 * (g_eager - g_ref).norm() + 1e-3 * g_ref.norm()


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_patch_keeps_every_state_dict_key(model_type):
    model = tiny_model(model_type)
    keys = set(model.state_dict())
    desmoe.patch(model)
    assert set(model.state_dict()) == keys and len(routers(model)) >= 1
    desmoe.unpatch(model)
    assert set(model.state_dict()) == keys and not routers(model)


def test_patch_shares_parameters_and_keeps_state_dict_keys():
    model = tiny_model("deepseek_v3")
    keys = set(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    desmoe.patch(model)
    assert set(model.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert all(isinstance(r, TopKRouter) for r in routers(model))
    assert model.config._experts_implementation == "desmoe"


def test_save_pretrained_of_patched_model_loads_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = desmoe.patch(tiny_model("qwen3_moe"))
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert loaded.config._experts_implementation == "eager"
    assert not any(isinstance(m, TopKRouter) for m in loaded.modules())
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_original_modules():
    model = tiny_model("mixtral")
    impl = model.config._experts_implementation
    originals = [type(m.gate).__name__ for _, m in model.named_modules()
                 if hasattr(m, "gate") and hasattr(m, "experts")]
    desmoe.patch(model)
    desmoe.unpatch(model)
    assert model.config._experts_implementation == impl
    now = [type(m.gate).__name__ for _, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    assert now == originals and not routers(model)


def test_patch_twice_is_idempotent():
    model = tiny_model("olmoe")
    desmoe.patch(model)
    n = len(routers(model))
    desmoe.patch(model, backend="reference")
    assert len(routers(model)) == n and all(r.backend == "reference" for r in routers(model))


def test_unsupported_model_raises_listing_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(desmoe.UnsupportedModelError, match="mixtral") as e:
        desmoe.patch(model)
    assert "llama" in str(e.value)
    with pytest.raises(ValueError, match="backend"):
        desmoe.patch(tiny_model("mixtral"), backend="cuda")


def test_expert_mask_on_patched_model_freezes_expert_weights():
    model = desmoe.patch(tiny_model("qwen3_moe")).train()
    E = model.config.num_experts
    mask = torch.zeros(E, dtype=torch.bool)
    mask[:3] = True
    with MaskScope() as masks:
        for _, _, experts in moe_blocks(model):
            masks.set(experts, expert_trainable_E=mask)
        ids = _ids()
        model(ids, labels=ids).loss.backward()
    for _, _, experts in moe_blocks(model):
        assert (experts.gate_up_proj.grad[~mask] == 0).all() and (experts.down_proj.grad[~mask] == 0).all()
        assert experts.gate_up_proj.grad[mask].abs().sum() > 0


def test_per_token_domain_mask_on_patched_model():
    """Tokens of domain 0 may update experts {0..3}, domain 1 experts {4..7}: with all tokens in domain 0, the
    experts 4..7 get exactly zero weight gradient even though tokens are routed to them."""
    model = desmoe.patch(tiny_model("mixtral")).train()
    ids = _ids(B=2, S=16)
    mask_ME = torch.zeros(2, 8, dtype=torch.bool)
    mask_ME[0, :4] = True
    mask_ME[1, 4:] = True
    doms = torch.zeros(ids.numel(), dtype=torch.long)
    blocks = moe_blocks(model)
    masks = MaskScope()
    for _, r, experts in blocks:
        masks.set(experts, token_domains_T=doms, domain_expert_mask_ME=mask_ME)
    with recording([r for _, r, _ in blocks]) as rec:
        model(ids, labels=ids).loss.backward()
    for _, r, experts in blocks:
        routed = set(rec.last(r)["topk_ids_TK"].flatten().tolist())
        assert routed & {4, 5, 6, 7}, "test needs tokens routed to the masked experts"
        assert (experts.gate_up_proj.grad[4:] == 0).all()
        assert experts.gate_up_proj.grad[:4].abs().sum() > 0
    # a wrongly sized domain vector is a clear error
    for _, _, experts in blocks:
        masks.set(experts, token_domains_T=doms[:5], domain_expert_mask_ME=mask_ME)
    with pytest.raises(ValueError, match="token_domains_T"):
        model(ids)
    masks.clear()


def test_router_residual_starts_as_identity_and_records():
    model = desmoe.patch(tiny_model("deepseek_v3"))
    ids = _ids()
    base = model(ids).logits
    for r in routers(model):
        lin = torch.nn.Linear(r.hidden_dim, r.num_experts)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        r.residual = lin
    with recording(routers(model)) as rec:
        torch.testing.assert_close(model(ids).logits, base)
    for r in routers(model):
        assert rec.last(r)["topk_ids_TK"].shape == (ids.numel(), r.top_k)


def test_parity_cli(capsys):
    from desmoe.cli import main

    assert main(["parity", "--model-types", "mixtral", "qwen2_moe"]) == 0
    out = capsys.readouterr().out
    assert "mixtral" in out and "qwen2_moe" in out and "NO" not in out
    assert main(["parity", "--model-types", "llama"]) == 2


def test_unsupported_experts_layout_is_refused():
    model = tiny_model("qwen3_moe")
    _, _, experts = next((n, None, m) for n, m in model.named_modules() if hasattr(m, "gate_up_proj"))
    experts.has_post_expert_norm = True
    with pytest.raises(desmoe.UnsupportedModelError, match="post-expert norm"):
        desmoe.patch(model)
    experts.has_post_expert_norm = False
    experts.has_bias = True
    with pytest.raises(desmoe.UnsupportedModelError, match="expert biases"):
        desmoe.patch(model)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("forward_before_patch", [True, False])
def test_router_aux_loss_still_works_after_patch(model_type, forward_before_patch):
    """transformers records router logits (for its load-balancing loss) by hooks on its router class: the
    patched router must still be recorded, whether the hooks were installed before or after patching."""
    ref = tiny_model(model_type).train()
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    ids = _ids()
    if forward_before_patch:
        ours(ids, output_router_logits=True)
    desmoe.patch(ours, backend="reference")
    r = ref(ids, labels=ids, output_router_logits=True)
    o = ours(ids, labels=ids, output_router_logits=True)
    assert r.aux_loss is not None and o.aux_loss is not None
    torch.testing.assert_close(o.aux_loss, r.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.loss, r.loss, rtol=1e-5, atol=1e-6)
    desmoe.unpatch(ours)
    u = ours(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(u.aux_loss, r.aux_loss, rtol=1e-5, atol=1e-6)


def test_parity_timings_are_warm_medians_not_the_cold_first_call(monkeypatch):
    import desmoe.integrations.parity as par

    calls = []
    real = par._warm_ms

    def spy(m, ids, iters):
        calls.append(iters)
        return real(m, ids, iters)

    monkeypatch.setattr(par, "_warm_ms", spy)
    (row,) = par.parity_rows(["qwen3_moe"], timing_iters=3)
    assert calls == [3, 3] and row["ok"] and row["eager_ms"] > 0 and row["desmoe_ms"] > 0
    (row,) = par.parity_rows(["qwen3_moe"], timing_iters=0)  # no timing: the table shows "-"
    assert row["eager_ms"] is None and row["ok"]
    import torch

    from desmoe.integrations.tiny import tiny_model

    m = tiny_model("qwen3_moe").train()
    ids = torch.randint(3, 50, (1, 8))
    m(ids, labels=ids).loss.backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert par._warm_ms(m, ids, 2) > 0
    for n, p in m.named_parameters():  # timing restores the first call's gradients
        if n in before:
            assert torch.equal(p.grad, before[n]), n


def test_from_pretrained_with_experts_implementation_desmoe(tmp_path):
    # the idiomatic entry: after `import desmoe`, transformers loads a model with desmoe's experts (routers still
    # need desmoe.patch: the implementation switch covers the experts module only)
    from unittest import mock

    from transformers import AutoModelForCausalLM

    from desmoe import ops

    ref = tiny_model("qwen3_moe", vocab_size=64)
    ref.save_pretrained(str(tmp_path / "m"))
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), experts_implementation="desmoe")
    assert m.config._experts_implementation == "desmoe"
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(ops, "moe_experts", wraps=ops.moe_experts) as spy:
        out = m(ids)
    assert spy.call_count == m.config.num_hidden_layers
    ref.set_experts_implementation("eager")
    torch.testing.assert_close(out.logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(x, TopKRouter) for x in m.modules())  # routers: desmoe.patch(m)
    desmoe.patch(m)
    assert any(isinstance(x, TopKRouter) for x in m.modules())
