"""Routing parity against the installed transformers' own router modules, family by family.

Each case builds a tiny model of the type, takes one of its stock router modules, and compares it with the
desmoe router that ``patch`` would put in its place on the same hidden states: the selected experts (as sets:
the stock routers return them unsorted), their weights, the logits and the weights' dtype. The cases include
the configurations the families accept that are easy to get wrong: top_k larger than the experts eligible under
group-limited routing (the rest come from the masked groups, at the family's fill value), and a selection bias
that makes every eligible score negative.
"""
import copy

import pytest
import torch

import desmoe
from desmoe.integrations import hf, swap
from desmoe.integrations.tiny import tiny_model, tiny_model_types

V3_FAMILY = ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "solar_open"]

CASES = [(mt, {}, None) for mt in tiny_model_types()]
for mt in V3_FAMILY:
    CASES += [
        (mt, dict(num_experts_per_tok=8, n_group=2, topk_group=1), None),  # K = E, only half eligible
        (mt, dict(num_experts_per_tok=6, n_group=4, topk_group=1), None),  # K > eligible, masked at -inf
        (mt, dict(num_experts_per_tok=2, n_group=4, topk_group=2), -1.5),  # every choice score negative
        (mt, dict(num_experts_per_tok=3, n_group=1, topk_group=1), None),  # one group
    ]
CASES += [
    ("deepseek_v2", dict(num_experts_per_tok=4, n_group=4, topk_group=1), None),  # masked picks weigh 0.0
    ("deepseek_v2", dict(num_experts_per_tok=8, n_group=2, topk_group=1), None),
    ("deepseek_v2", dict(topk_method="greedy"), None),
    ("ernie4_5_moe", dict(moe_norm_min=0.9), None),  # the floored renormalisation binds
    ("lfm2_moe", dict(use_expert_bias=False), None),
    ("lfm2_moe", dict(norm_topk_prob=False), -2.0),
]


def _first_router(model, fam):
    for block in model.modules():
        gate = getattr(block, fam.router_attr, None)
        if gate is not None and type(gate).__name__ == fam.router_class:
            return block, gate
    raise AssertionError(f"no {fam.router_class} in the model")


def _route(block, router, x):
    """``(logits, weights, ids)`` whatever order this transformers release's router returns them in."""
    if hasattr(block, "expert_bias") and getattr(block, "use_expert_bias", False):  # LFM2-MoE passes its bias
        out = router(x, block.expert_bias)
    else:
        out = router(x)
    return tuple(reversed(out)) if not out[0].is_floating_point() else out


def _bias_tensor(router):
    for name, t in list(router.named_parameters()) + list(router.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            return t
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type,overrides,bias_shift", CASES,
                         ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}-{b}" for m, o, b in CASES])
def test_router_matches_stock(model_type, overrides, bias_shift, dtype):
    model = tiny_model(model_type, dtype=dtype, **overrides)
    fam = hf.MODEL_TYPES[model.config.model_type]
    block, stock = _first_router(model, fam)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if bias_shift is not None:
            bias = _bias_tensor(stock) if hasattr(stock, "named_parameters") else None
            if bias is None and hasattr(block, "expert_bias"):
                bias = block.expert_bias
            assert bias is not None, "a bias case needs a family with a selection bias"
            bias.copy_(torch.rand(bias.shape, generator=g) * 0.1 + bias_shift)
    ours = swap.replace_router(copy.deepcopy(stock), fam, model.config, "reference")
    hidden = model.config.get_text_config().hidden_size
    x = torch.randn(37, hidden, generator=g).to(dtype)

    logits_s, w_s, ids_s = _route(block, stock, x)
    logits_o, w_o, ids_o = _route(block, ours, x)

    assert ids_o.shape == ids_s.shape and w_o.dtype == w_s.dtype and logits_o.dtype == logits_s.dtype
    torch.testing.assert_close(logits_o, logits_s, rtol=0, atol=0)
    ids_s_sorted, order_s = ids_s.sort(dim=-1)
    ids_o_sorted, order_o = ids_o.sort(dim=-1)
    assert torch.equal(ids_o_sorted, ids_s_sorted), "different experts selected"
    assert all(len(set(r.tolist())) == ids_o.shape[1] for r in ids_o), "an expert selected twice"
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(w_o.gather(1, order_o), w_s.gather(1, order_s), **tol)


def test_cases_cover_every_family_and_the_edge_configurations():
    covered = {m for m, _, _ in CASES}
    assert set(tiny_model_types()) <= covered
    k_over_eligible = [m for m, o, _ in CASES
                       if o.get("num_experts_per_tok", 2) > o.get("topk_group", 2) * 8 // o.get("n_group", 4)]
    assert set(V3_FAMILY) | {"deepseek_v2"} <= set(k_over_eligible)


def test_group_limited_k_over_eligible_runs_on_a_patched_model():
    # the upstream tests' DeepSeek-V3 config: 8 of 8 experts with one of two groups eligible
    model = tiny_model("deepseek_v3", num_experts_per_tok=8, n_group=2, topk_group=1).train()
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    desmoe.patch(model)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
