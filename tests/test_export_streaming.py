"""Export writing weights tensor by tensor (peak memory about one output shard, not the model), equal bitwise to
the in-memory save_pretrained path; the serving-engine table checked against exported configs."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from desmoe.export import (SERVING_ARCHITECTURES, ExportError, export_architecture, serving_engines,
                           write_weights_streaming)


def _tiny(layers=2, hidden=32, experts=4, inter=16, vocab=97):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=2 * inter, moe_intermediate_size=inter,
                         num_experts=experts, num_experts_per_tok=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).float()


def _tensors(folder):
    idx = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(os.path.join(folder, fn), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_weights_equal_the_in_memory_export_bitwise(tmp_path, dtype):
    model = _tiny()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size=20_000)  # a checkpoint in several shards
    assert len(set(json.load(open(src / "model.safetensors.index.json"))["weight_map"].values())) > 2
    gates = [n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")]
    g = torch.Generator().manual_seed(1)
    fitted = {n: torch.randn(model.get_parameter(n).shape, generator=g) for n in gates}
    # the in-memory path: fp32 model, routers replaced, cast, save_pretrained
    mem = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for n, w in fitted.items():
            mem.get_parameter(n).copy_(w)
    mem.to(dtype).save_pretrained(tmp_path / "mem", max_shard_size=20_000)
    index = write_weights_streaming(str(src), str(tmp_path / "stream"), replace=fitted, dtype=dtype,
                                    max_shard_size=20_000)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert set(a) == set(b) == set(index["weight_map"])
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.getsize(tmp_path / "stream" / s) < 20_000 + 4096 for s in shards)
    # loads in stock transformers once a config sits beside it
    mem.config.save_pretrained(tmp_path / "stream")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "stream", dtype=dtype)
    assert torch.equal(back.get_parameter(gates[0]), fitted[gates[0]].to(dtype))


def test_streaming_bad_input(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "src")
    gate = next(n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight"))
    with pytest.raises(ExportError, match="does not hold"):
        write_weights_streaming(str(tmp_path / "src"), str(tmp_path / "o"), replace={"nope.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match=r"replace\[.*has shape \(1,\)"):
        write_weights_streaming(str(tmp_path / "src"), str(tmp_path / "o"), replace={gate: torch.zeros(1)})
    with pytest.raises(ExportError, match="max_shard_size must be a positive int of bytes or a size like"):
        write_weights_streaming(str(tmp_path / "src"), str(tmp_path / "o"), max_shard_size="lots")
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    (dcp / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ExportError, match="DCP/FSDP.*consolidate"):
        write_weights_streaming(str(dcp), str(tmp_path / "o"))


def test_streaming_peak_memory_is_about_a_shard_not_the_model(tmp_path):
    """A ~40 MB model in ~3 MB shards: the writer's resident-memory growth (in a fresh process, the resident size
    sampled every millisecond during the call, over the one before it) stays well under the model's size."""
    model = _tiny(layers=6, hidden=256, experts=8, inter=256, vocab=2048)
    size = sum(p.numel() * 4 for p in model.parameters())
    assert size > 40e6
    model.save_pretrained(tmp_path / "src", max_shard_size="3MB")
    del model
    script = textwrap.dedent(f"""
        import resource, sys, threading, time, torch
        from desmoe.export import write_weights_streaming
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        before, peak, done = rss(), [0], []
        def watch():  # the resident size, sampled every millisecond while the writer runs
            while not done:
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)
        t = threading.Thread(target=watch)
        t.start()
        if sys.argv[1] == "stream":
            write_weights_streaming({str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}, dtype=torch.bfloat16,
                                    max_shard_size="3MB")
        else:  # the in-memory way, for contrast: the whole model is resident
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "src")!r}, dtype=torch.float32)
            m.to(torch.bfloat16).save_pretrained({str(tmp_path / "mem")!r}, max_shard_size="3MB")
        done.append(1)
        t.join()
        print(max(peak[0], rss()) - before)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    growth = {}
    for how in ("stream", "in_memory"):
        r = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        growth[how] = int(r.stdout.strip().splitlines()[-1])
    print(f"model {size / 1e6:.1f} MB; resident growth: streaming {growth['stream'] / 1e6:.1f} MB, "
          f"in memory {growth['in_memory'] / 1e6:.1f} MB")
    assert growth["stream"] < size / 3 < growth["in_memory"], (growth, size)
    assert _tensors(tmp_path / "out").keys() == _tensors(tmp_path / "src").keys()


def test_serving_table_against_exported_configs():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    from desmoe.integrations.hf import MODEL_TYPES

    assert serving_engines(["Qwen3MoeForCausalLM"]) == {"vllm": True, "sglang": True}
    assert serving_engines(["PhimoeForCausalLM"]) == {"vllm": False, "sglang": False}  # engines: PhiMoE...
    # ...which an export writes for phimoe (transformers loads it by model_type): the engines serve it
    assert serving_engines([export_architecture("PhimoeForCausalLM")]) == {"vllm": True, "sglang": True}
    assert export_architecture("Qwen3MoeForCausalLM") == "Qwen3MoeForCausalLM"
    assert serving_engines(None) == {"vllm": False, "sglang": False}
    # every name in the table is a causal-LM architecture of a family desmoe patches (or the engines' phimoe name)
    ours = {CAUSAL.get(t) for t in MODEL_TYPES} - {None}
    for engine, names in SERVING_ARCHITECTURES.items():
        assert names - ours <= {"PhiMoEForCausalLM"}, (engine, names - ours)
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
            "DeepseekV3ForCausalLM"} <= SERVING_ARCHITECTURES["vllm"] & SERVING_ARCHITECTURES["sglang"]


def test_export_report_names_the_serving_engines(tmp_path):
    """The architecture name an export writes (the HF class of the model) is what the table is checked against."""
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    arch = json.load(open(tmp_path / "m" / "config.json"))["architectures"]
    assert arch == ["Qwen3MoeForCausalLM"] and serving_engines(arch) == {"vllm": True, "sglang": True}


def test_phimoe_export_name_loads_in_stock_transformers(tmp_path):
    """An export's config.json names phimoe as the hub checkpoints do (PhiMoEForCausalLM, what vLLM and SGLang
    register); stock transformers still loads it, by model_type, as its own PhimoeForCausalLM."""
    import json

    from desmoe.integrations.tiny import tiny_model

    m = tiny_model("phimoe", vocab_size=64)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = [export_architecture(type(m).__name__)]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(stock).__name__ == "PhimoeForCausalLM"
    assert stock.config.architectures == ["PhiMoEForCausalLM"]
    assert serving_engines(stock.config.architectures) == {"vllm": True, "sglang": True}
