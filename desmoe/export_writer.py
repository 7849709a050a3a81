"""What :func:`desmoe.export.export` writes beside the fitting: the weights, tensor by tensor, and which serving
engines register the exported architecture.

:func:`write_weights_streaming` writes a model folder's safetensors as ``save_pretrained`` shards them, with the
fitted routers put in place, holding one output shard in memory at a time. :data:`SERVING_ARCHITECTURES` and
:func:`serving_engines` say, by architecture name, whether vLLM and SGLang implement the exported model natively.
"""
from __future__ import annotations

import json
import os

import torch


class ExportError(ValueError):
    """A checkpoint that cannot be loaded or exported as asked (the message names the path or option)."""


# --- serving engines ------------------------------------------------------------------------------------------
# Architecture names (config.json "architectures") that the engines implement natively. Only the MoE families desmoe
# patches matter here (text generation, causal LM). vLLM: _TEXT_GENERATION_MODELS of vllm-project/vllm
# vllm/model_executor/models/registry.py, checked at commit 0002bff0b6cb. SGLang: sgl-project/sglang registers the
# __name__ of each EntryClass in python/sglang/srt/models/*.py (models/registry.py at f7df908d8506); checked, one
# stored version per file: mixtral 02356ceed8be, qwen2_moe 0115497da8f2, qwen3_moe 008af3a6f95b, qwen3_next
# 0201bc8059b1, olmoe 067e8f42c478, granitemoe 0ba3cdd47463, hunyuan 08185617c3e2, ernie4 008b79d2358b, deepseek_v2
# 00114aef19bb, glm4_moe 005ffc65dc0f, gpt_oss 009c68085e68, phimoe 008b79d2358b, dots1 ba97b11d851d, lfm2_moe
# 01fec0786e1f, exaone_moe 0564b5215b33, glm4_moe_lite 03b1e880014d. Not in SGLang: MiniMaxForCausalLM
# (minimax_text_01 0400545e9ff8 registers MiniMaxText01ForCausalLM), GraniteMoeSharedForCausalLM (granitemoeshared
# 580ea2d722cb has no EntryClass), FlexOlmoForCausalLM (no model file), Qwen3_5MoeForCausalLM (qwen3_5 005fa711897e
# registers only the ...ForConditionalGeneration classes). Note phimoe: transformers' class is PhimoeForCausalLM, the
# engines register PhiMoEForCausalLM (the hub checkpoints' name), which an export writes (HUB_ARCHITECTURES).
SERVING_ARCHITECTURES = {
    "vllm": frozenset({
        "MixtralForCausalLM", "MiniMaxForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
        "Qwen3NextForCausalLM", "OlmoeForCausalLM", "FlexOlmoForCausalLM", "GraniteMoeForCausalLM",
        "GraniteMoeSharedForCausalLM", "HunYuanMoEV1ForCausalLM", "Ernie4_5_MoeForCausalLM", "Lfm2MoeForCausalLM",
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Dots1ForCausalLM",
        "GptOssForCausalLM", "PhiMoEForCausalLM"}),
    "sglang": frozenset({
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
        "OlmoeForCausalLM", "GraniteMoeForCausalLM", "HunYuanMoEV1ForCausalLM", "Ernie4_5_MoeForCausalLM",
        "Lfm2MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM",
        "Glm4MoeLiteForCausalLM", "Dots1ForCausalLM", "ExaoneMoeForCausalLM", "GptOssForCausalLM",
        "PhiMoEForCausalLM"}),
}


# The name an export's config.json carries where transformers' class name differs from the family's own hub
# checkpoints: Phi-3.5-MoE's hub config (and vLLM's and SGLang's registries) say PhiMoEForCausalLM, transformers'
# class is PhimoeForCausalLM; transformers loads either by ``model_type``, the engines only the hub's name.
HUB_ARCHITECTURES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}


def export_architecture(class_name: str) -> str:
    """The ``architectures`` entry an export writes for a model of class ``class_name``."""
    return HUB_ARCHITECTURES.get(class_name, class_name)


def serving_engines(architectures) -> dict[str, bool]:
    """``{engine: True when it registers one of ``architectures``}`` for vLLM and SGLang (by name, from
    :data:`SERVING_ARCHITECTURES`; nothing is run). Stock transformers is checked by loading the export."""
    archs = set(architectures or [])
    return {engine: bool(archs & names) for engine, names in SERVING_ARCHITECTURES.items()}


# --- writing weights tensor by tensor ---------------------------------------------------------------------------
def parse_size(v) -> int:
    """``max_shard_size`` in bytes: a positive int, or a size like ``"5GB"`` / ``"500MB"`` / ``"2GiB"``."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "B": 1}
    if isinstance(v, str):
        s = v.strip().upper()
        for u in sorted(units, key=len, reverse=True):
            if s.endswith(u) and s[: -len(u)].strip().replace(".", "", 1).isdigit():
                n = int(float(s[: -len(u)]) * units[u])
                if n > 0:
                    return n
    raise ExportError(f"max_shard_size must be a positive int of bytes or a size like '5GB' / '500MB', got {v!r}")


def _source_files(src_dir: str) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a model folder (one file or an index), in the index's order."""
    idx = os.path.join(src_dir, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            wm = json.load(f).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ExportError(f"{idx!r} has no weight_map")
        return {k: os.path.join(src_dir, v) for k, v in wm.items()}
    one = os.path.join(src_dir, "model.safetensors")
    if os.path.isfile(one):
        from safetensors import safe_open

        with safe_open(one, framework="pt") as f:
            return {k: one for k in f.keys()}
    names = os.listdir(src_dir) if os.path.isdir(src_dir) else []
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        raise ExportError(f"{src_dir!r} is a torch.distributed (DCP/FSDP) checkpoint, not a model folder: desmoe "
                          f"checkpoints keep the model gathered in model/ (safetensors); consolidate a DCP model "
                          f"into a Hugging Face folder first (load it into the model under FSDP and call "
                          f"save_pretrained from rank 0), then export that folder")
    raise ExportError(f"{src_dir!r} has no model.safetensors or model.safetensors.index.json")


def write_weights_streaming(src_dir: str, out_dir: str, *, replace: dict | None = None, dtype=None,
                            max_shard_size="5GB") -> dict:
    """Write the safetensors weights of model folder ``src_dir`` to ``out_dir`` as ``save_pretrained`` shards them
    (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one ``model.safetensors``),
    holding one output shard in memory at a time, never the whole model. ``replace``: ``{tensor name: tensor}``
    written instead of the source's tensor (same shape; the fitted routers); ``dtype``: floating tensors are cast
    to it (as ``model.to(dtype)``). Returns the index (``weight_map``, ``total_size``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    replace = dict(replace or {})
    where = _source_files(src_dir)
    missing = sorted(set(replace) - set(where))
    if missing:
        raise ExportError(f"replace names tensors that {src_dir!r} does not hold: {missing[:5]}")

    def out_nbytes(name, f):
        sl = f.get_slice(name)
        n = 1
        for s in sl.get_shape():
            n *= s
        src_dt = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(sl.get_dtype(), 4)
        floating = sl.get_dtype() in ("F64", "F32", "BF16", "F16")
        return n * (torch.tensor([], dtype=dtype).element_size() if dtype is not None and floating else src_dt)

    # plan: greedy shards in the source's order, sized in the output dtype (headers only: nothing loaded)
    plan, cur, cur_size, total = [], [], 0, 0
    by_file: dict[str, list[str]] = {}
    for k, fn in where.items():
        by_file.setdefault(fn, []).append(k)
    sizes = {}
    for fn, keys in by_file.items():
        with safe_open(fn, framework="pt") as f:
            for k in keys:
                sizes[k] = out_nbytes(k, f)
    for k in where:
        if cur and cur_size + sizes[k] > limit:
            plan.append(cur)
            cur, cur_size = [], 0
        cur.append(k)
        cur_size += sizes[k]
        total += sizes[k]
    if cur:
        plan.append(cur)
    os.makedirs(out_dir, exist_ok=True)
    n = len(plan)
    weight_map = {}
    for i, keys in enumerate(plan):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shard = {}
        for fn in dict.fromkeys(where[k] for k in keys):
            with safe_open(fn, framework="pt") as f:
                for k in keys:
                    if where[k] != fn:
                        continue
                    t = f.get_tensor(k)
                    if k in replace:
                        new = replace[k].detach().to("cpu")
                        if tuple(new.shape) != tuple(t.shape):
                            raise ExportError(f"replace[{k!r}] has shape {tuple(new.shape)}, the checkpoint's "
                                              f"tensor {tuple(t.shape)}")
                        t = new.float()  # as copied into the float32 model of the in-memory export
                    if dtype is not None and t.is_floating_point():
                        t = t.float().to(dtype)  # through float32, as loading in float32 and model.to(dtype)
                    shard[k] = t.contiguous()
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if n > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return index
