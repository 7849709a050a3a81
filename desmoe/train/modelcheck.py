"""``model.overrides`` checked against the model before any work.

A value the model's config class accepts can still make a model that cannot be built or run (a negative width,
3 attention heads over 2 key/value heads, no experts). transformers then fails deep inside a module's
constructor or forward with a message that names no config key. Here the overrides are checked in three steps,
each error naming ``model.overrides.<key>``, the value and what is expected:

1. rules: sizes and counts are >= 1, ``num_experts_per_tok`` <= the number of experts, the attention heads
   divide as the family's attention needs;
2. the config class itself (its own validation), and the model built on the ``meta`` device (no memory): an
   exception there is blamed on the override(s) that cause it, found by trying each alone;
3. a tiny model (under :data:`FORWARD_CHECK_MAX_PARAMS` parameters) also runs one forward on a few tokens on CPU.

A model that has no MoE layer left (``num_hidden_layers: 0``, every layer dense) is refused as well.
"""
from __future__ import annotations

import functools
import json
import re

# sizes and counts that must be >= 1 (0 is meaningful for shared-expert and MTP-layer counts, so those are left)
_POSITIVE = re.compile(r".*(_size|_dim|_heads|_layers|_experts|_per_tok|_embeddings|_rank)|n_group|topk_group|top_k")
_ZERO_OK = re.compile(r".*(shared|nextn|dense|sliding|lora_rank).*")
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_k", "top_k", "moe_topk")
FORWARD_CHECK_MAX_PARAMS = 30_000_000


def _bad(name, expected, got):
    raise ValueError(f"{name} must be {expected}, got {got!r}")


def _first(conf, keys):
    for k in keys:
        v = getattr(conf, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return k, v
    return None, None


def check_rules(overrides: dict, conf, source: str) -> None:
    """Rule checks on the config with the overrides applied; errors name the override(s) involved."""
    for k, v in overrides.items():
        if isinstance(v, int) and not isinstance(v, bool) and _POSITIVE.fullmatch(k) and not _ZERO_OK.fullmatch(k) \
                and v < 1:
            _bad(f"model.overrides.{k}", "an int >= 1", v)
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    ek, E = _first(text, EXPERT_COUNT_KEYS)
    kk, K = _first(text, TOPK_KEYS)
    if E is not None and K is not None and K > E and (ek in overrides or kk in overrides):
        raise ValueError(f"model.overrides: {kk}={K} routes each token to more experts than the {source} model has "
                         f"({ek}={E}); expected {kk} <= {ek}")
    H, KV = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if isinstance(H, int) and isinstance(KV, int) and H >= 1 and KV >= 1 and H % KV and \
            ("num_attention_heads" in overrides or "num_key_value_heads" in overrides):
        raise ValueError(f"model.overrides: num_attention_heads={H} is not a multiple of num_key_value_heads={KV} "
                         f"(each key/value head serves a whole group of query heads); expected num_attention_heads "
                         f"divisible by num_key_value_heads")
    D = getattr(text, "hidden_size", None)
    if isinstance(H, int) and isinstance(D, int) and H >= 1 and getattr(text, "head_dim", None) is None and D % H \
            and ("num_attention_heads" in overrides or "hidden_size" in overrides):
        raise ValueError(f"model.overrides: hidden_size={D} is not divisible by num_attention_heads={H} and the "
                         f"config sets no head_dim; expected hidden_size divisible by num_attention_heads (or set "
                         f"head_dim)")


def _blame(overrides: dict, attempt, what: str, source: str, err: Exception):
    """Raise a ValueError naming the override(s) whose presence makes ``attempt(overrides)`` fail."""
    culprits = []
    for k in overrides:
        try:
            attempt({k: overrides[k]})
        except Exception:
            culprits.append(k)
    keys = culprits or list(overrides)
    vals = ", ".join(f"model.overrides.{k}={overrides[k]!r}" for k in keys)
    others = {k: v for k, v in overrides.items() if k not in keys}
    ctx = f" (with {', '.join(f'{k}={v!r}' for k, v in others.items())})" if others and not culprits else ""
    msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    raise ValueError(f"{vals}{ctx}: the {source} model {what} with {'this value' if len(keys) == 1 else 'these values'}"
                     f" ({type(err).__name__}: {msg}); expected values the model's config accepts") from None


def _build_meta(conf):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(conf)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            from transformers import AutoModelForImageTextToText

            return AutoModelForImageTextToText.from_config(conf)


def _forward_tiny(conf) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..integrations.tiny import _VISION_LANGUAGE

    vision = getattr(conf, "model_type", None) in _VISION_LANGUAGE
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with torch.random.fork_rng():
        model = auto.from_config(conf)
        model.set_experts_implementation("eager") if hasattr(model, "set_experts_implementation") else None
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def _has_moe(model) -> bool:
    return any(getattr(m, "gate_up_proj", None) is not None for m in model.modules())


def check_tiny_overrides(model_type: str, overrides: dict) -> None:
    """The random tiny model of ``model_type`` with ``overrides``: config, construction, MoE layers, a forward."""
    key = json.dumps(overrides, sort_keys=True, default=repr)
    _check_tiny_cached(model_type, key)


@functools.lru_cache(maxsize=256)
def _base_forward_ok(model_type: str) -> bool:
    from ..integrations.tiny import tiny_config

    try:
        _forward_tiny(tiny_config(model_type))
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=256)
def _check_tiny_cached(model_type: str, key: str) -> None:
    from ..integrations.tiny import tiny_config

    overrides = json.loads(key)
    source = f"tiny {model_type}"
    try:
        conf = tiny_config(model_type, **overrides)
    except Exception as e:
        _blame(overrides, lambda o: tiny_config(model_type, **o), "config cannot be made", source, e)
    check_rules(overrides, conf, source)
    try:
        model = _build_meta(conf)
    except Exception as e:
        _blame(overrides, lambda o: _build_meta(tiny_config(model_type, **o)), "cannot be built", source, e)
    if not _has_moe(model):
        keys = [k for k in overrides if k in EXPERT_COUNT_KEYS or k in ("num_hidden_layers",) or "layer" in k
                or "sparse" in k or "dense" in k] or list(overrides)
        raise ValueError(", ".join(f"model.overrides.{k}={overrides[k]!r}" for k in keys)
                         + f": the {source} model has no MoE layer left (no experts module to fine-tune); expected "
                           f"at least one decoder layer with experts")
    n = sum(p.numel() for p in model.parameters())
    if n <= FORWARD_CHECK_MAX_PARAMS and _base_forward_ok(model_type):
        try:
            _forward_tiny(conf)
        except Exception as e:
            _blame(overrides, lambda o: _forward_tiny(tiny_config(model_type, **o)), "cannot run a forward", source, e)


def check_pretrained_overrides(path: str, conf, overrides: dict) -> None:
    """``model.path`` with ``overrides`` (``from_pretrained`` keyword arguments that set config keys)."""
    import copy

    source = repr(path)

    def apply(o):
        c = copy.deepcopy(conf)
        for k, v in o.items():
            setattr(c, k, v)
        if hasattr(c, "validate"):
            c.validate()
        return c

    try:
        c = apply(overrides)
    except Exception as e:
        _blame(overrides, apply, "config refuses the override", source, e)
    check_rules(overrides, c, source)
    if any(k in overrides for k in ("vocab_size",)):
        raise ValueError(f"model.overrides.vocab_size={overrides['vocab_size']!r}: the vocabulary of a pretrained "
                         f"model ({source}) is fixed by its embedding weights ({getattr(conf, 'vocab_size', '?')} "
                         f"rows); remove the override (a larger tokenizer resizes the embeddings itself)")
