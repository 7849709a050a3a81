"""Parameter kinds of every supported family, on its tiny model: routed experts, router, shared experts (by the
family's module names, written out below from transformers' own parameter names, so a rename upstream fails
here), and the rest (attention, embeddings, norms)."""
import re

import pytest

import desmoe
from desmoe.integrations.families import SHARED_EXPERT_MODULES, ParamNames, param_names
from desmoe.integrations.hf import supported_model_types
from desmoe.integrations.tiny import COVERED_BY, tiny_model
from desmoe.method.controller import classify_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

_DS = {"mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
       "mlp.shared_experts.down_proj.weight"}
_QWEN = {"mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight",
         "mlp.shared_expert_gate.weight"}
# model_type -> shared-expert parameters of one decoder layer (relative to layers.N.)
SHARED = {
    **dict.fromkeys(["deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "exaone_moe", "glm4_moe", "glm4_moe_lite",
                     "solar_open"], _DS),
    **dict.fromkeys(["qwen2_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"], _QWEN),
    "granitemoeshared": {"shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight"},
    "hunyuan_v1_moe": {"mlp.shared_mlp.gate_proj.weight", "mlp.shared_mlp.up_proj.weight",
                       "mlp.shared_mlp.down_proj.weight"},
    **dict.fromkeys(["mixtral", "minimax", "qwen3_moe", "qwen3_vl_moe", "qwen3_vl_moe_text", "olmoe", "flex_olmo",
                     "granitemoe", "lfm2_moe", "gpt_oss", "phimoe"], set()),
}
# model_type -> the MoE block (relative to layers.N.) and its router's parameter (relative to the block)
MOE_BLOCK = {"granitemoe": ("block_sparse_moe", "router.weight"),
             "granitemoeshared": ("block_sparse_moe", "router.weight"),
             "hunyuan_v1_moe": ("mlp", "gate.wg.weight"), "lfm2_moe": ("feed_forward", "gate.weight"),
             "gpt_oss": ("mlp", "router.weight", "router.bias"), "phimoe": ("mlp", "router.weight")}
# families whose routed experts carry biases (gpt-oss): masked, frozen and optimised with the weights
EXPERT_BIASES = {"gpt_oss": ("experts.gate_up_proj_bias", "experts.down_proj_bias")}
# config keys that give a family's number (or width) of shared experts
_SHARED_CONFIG_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "num_shared_expert",
                       "shared_expert_intermediate_size", "shared_intermediate_size")


def _has_shared_experts(config) -> bool:
    cfgs = [config, config.get_text_config()]
    return any(isinstance(getattr(c, k, None), int) and getattr(c, k) > 0 for c in cfgs for k in _SHARED_CONFIG_KEYS)


def test_every_supported_family_has_an_entry():
    assert set(SHARED_EXPERT_MODULES) == set(supported_model_types()) == set(SHARED)
    assert all(param_names(mt).shared_experts == SHARED_EXPERT_MODULES[mt] for mt in supported_model_types())


def test_shared_experts_match_whole_module_names():
    names = ParamNames(shared_experts=("shared_mlp",))
    assert names.kind("model.layers.0.shared_mlp.input_linear.weight") == "shared_experts"
    assert names.kind("model.layers.0.mlp.shared_mlp.up_proj.weight") == "shared_experts"
    for n in ("model.layers.0.not_shared_mlp.weight", "model.layers.0.shared_mlp_norm.weight", "model.shared_mlp"):
        assert names.kind(n) == "other", n
    qwen = param_names("qwen2_moe")
    assert qwen.kind("model.layers.0.mlp.shared_expert_gate.weight") == "shared_experts"
    assert qwen.kind("model.layers.0.mlp.shared_experts.up_proj.weight") == "other"  # not Qwen's spelling


@pytest.mark.parametrize("mt", supported_model_types())
def test_parameter_kinds_of_every_family(mt):
    m = tiny_model(COVERED_BY.get(mt, mt), vocab_size=64)
    assert m.config.model_type == COVERED_BY.get(mt, mt)
    m.config.model_type = mt  # a composite and its text model are classified by their own entries
    desmoe.patch(m, backend="reference")
    kinds = classify_parameters(m)
    by_kind = {}
    for n, k in kinds.items():
        by_kind.setdefault(k, set()).add(re.sub(r"\.\d+\.", ".N.", n))
    layers = "model.language_model.layers.N." if "vl_moe" in mt else "model.layers.N."
    block, *router = MOE_BLOCK.get(mt, ("mlp", "gate.weight"))
    assert by_kind.pop("experts") == {f"{layers}{block}.{e}" for e in ("experts.gate_up_proj", "experts.down_proj")
                                      + EXPERT_BIASES.get(mt, ())}
    assert by_kind.pop("router") == {f"{layers}{block}.{r}" for r in router}
    shared = by_kind.pop("shared_experts", set())
    assert shared == {layers + s for s in SHARED[mt]}
    assert bool(shared) == _has_shared_experts(m.config)
    assert not by_kind.pop("alr", None)  # no ALR attached
    assert set(by_kind) <= {"attention", "embeddings", "other"}, set(by_kind)
    # the rest: attention under self_attn, the token embeddings and LM head, norms and the like "other"
    for n in kinds:
        p = re.sub(r"\.\d+\.", ".N.", n)
        if kinds[n] in ("experts", "router", "shared_experts"):
            continue
        if ".self_attn." in p:
            assert kinds[n] == "attention", n
        elif p.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert kinds[n] == "embeddings", n
        elif p.startswith(layers) or p.endswith(("model.norm.weight", "language_model.norm.weight")):
            assert kinds[n] == "other", n
