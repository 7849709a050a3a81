"""Tiny randomly initialised HF MoE models, built locally from small configs (no downloads).

Used by tests, the demo and the CPU benchmarks. ``tiny_config(model_type)`` returns a transformers config with
the model family's real MoE machinery (shared experts, group-limited routing …) at toy size.
"""
from __future__ import annotations

import torch

_COMMON = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

_COMMON_TEXT = {k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}

_TINY = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "flex_olmo": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, kv_lora_rank=16,
                        num_key_value_heads=4,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, num_key_value_heads=4,
                        qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5, head_dim=8),
    "glm4_moe_lite": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                          n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                          routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, num_key_value_heads=4,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, mlp_layer_types=["sparse", "sparse"]),
    "dots1": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                  routed_scaling_factor=2.5, head_dim=8),
    "exaone_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       num_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                       routed_scaling_factor=2.5, head_dim=8),
    "solar_open": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                       n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True,
                       routed_scaling_factor=2.5, head_dim=8),
    "minimax": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "qwen3_next": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, head_dim=8,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                             num_experts=8, num_experts_per_tok=2, head_dim=8, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                             linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"]),
    # a vision-language model: text-only inputs, a one-block vision tower
    "qwen3_vl_moe": dict(text_config=dict(_COMMON_TEXT, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [1, 1, 2]}),
                         vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                            out_hidden_size=32, num_position_embeddings=16,
                                            deepstack_visual_indexes=[0],
                                            patch_size=4, temporal_patch_size=1, spatial_merge_size=1)),
    "granitemoe": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=32),
    "hunyuan_v1_moe": dict(intermediate_size=24, num_experts=8, moe_topk=2, head_dim=8, num_shared_expert=1),
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=24, moe_num_experts=8, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1),
    "lfm2_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                     num_dense_layers=0, norm_topk_prob=True, use_expert_bias=True, routed_scaling_factor=1.5,
                     layer_types=["conv", "full_attention"]),
    # top-3 of 8 (gpt-oss-20b: top-4 of 32); alternating sliding/full attention as the family's default
    "gpt_oss": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=3, head_dim=8, sliding_window=8,
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4,
                                     "rope_theta": 150000.0}),
    # SparseMixer routes exactly two; its default router_jitter_noise (0.01) is the mask threshold
    "phimoe": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
}
_VISION_LANGUAGE = {"qwen3_vl_moe"}
# model types whose MoE machinery is that of another tiny model type (a composite and its text model)
COVERED_BY = {"qwen3_5_moe": "qwen3_5_moe_text", "qwen3_vl_moe_text": "qwen3_vl_moe"}


def tiny_model_types() -> list[str]:
    return sorted(_TINY)


def tiny_config(model_type: str, **overrides):
    """A small config of ``model_type`` (keys of the family's own config class; ``overrides`` win)."""
    from transformers import AutoConfig

    if model_type not in _TINY:
        raise ValueError(f"model_type must be one of {tiny_model_types()}, got {model_type!r}")
    if model_type in _VISION_LANGUAGE:
        return AutoConfig.for_model(model_type, tie_word_embeddings=False, **{**_TINY[model_type], **overrides})
    kwargs = {**_COMMON, **_TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised ``AutoModelForCausalLM`` of ``model_type`` with non-trivial routing.

    HF initialises some routers to zeros (every token ties); we draw router weights (and the DeepSeek-V3 bias)
    so routing is informative, deterministically from ``seed``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type in _VISION_LANGUAGE else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(("gate_up_proj_bias", "down_proj_bias", "router.bias")):  # gpt-oss's biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        for name, p in model.named_parameters(remove_duplicate=False):  # ERNIE keeps its bias as a parameter
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
