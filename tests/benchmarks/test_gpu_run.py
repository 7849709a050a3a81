"""benchmarks/gpu_run.sh: the one GPU run, rehearsed on CPU (``--dry``), and its budget rule."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks import gpu_run  # noqa: E402

STAGES = ["env", "cold_first_call", "ceilings", "correctness", "qwen3_30b_a3b", "routing", "mixtral_8x7b", "liger",
          "olmoe", "deepseek_v2_lite", "gpt_oss_phimoe", "grad_mask", "activation_checkpointing", "method_cost"]


def test_gpu_run_dry(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert files == ["log.txt", "results.jsonl"]  # at most 4 files come back from a device call
    recs = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    # stages in the specified order, each finished (or, for the env line, present)
    order = [r["stage"] for r in recs if "done_s" in r or r["stage"] == "env"]
    assert order == STAGES, order
    assert not [r for r in recs if "error" in r]
    corr = [r for r in recs if r["stage"] == "correctness" and "call" in r]
    assert {(r["call"], r["tensor"]) for r in corr} == {(c, t) for c in (1, 2)
                                                        for t in ("out", "dx", "dw_gate_up", "dw_down", "dweights")}
    assert all(r["ok"] and r["backend"] == "triton" for r in corr), corr
    native = [r for r in recs if "native_grouped_mm" in r]
    assert native and all(r["native_grouped_mm"] for r in native)
    # the cold first call: its own process (the line comes before the ceilings' and any layer's), Triton's cache
    # folder counted (the interpreter compiles nothing)
    (cold,) = [r for r in recs if r["stage"] == "cold_first_call" and "what" in r]
    assert cold["interpreter"] and cold["compiles"] == 0 and cold["s"] > 0
    assert recs.index(cold) < min(i for i, r in enumerate(recs) if r["stage"] == "ceilings")
    # every headline is its own line
    heads = {r["headline"] for r in recs if "headline" in r}
    assert {"cold first fwd+bwd (Qwen3-30B-A3B layer)", "routing + permute vs the torch sequence",
            "qwen3_30b_a3b fwd+bwd, desmoe vs transformers grouped_mm",
            "qwen3_30b_a3b fwd+bwd, half the experts frozen / all trainable",
            "mixtral_8x7b fwd+bwd, desmoe vs transformers grouped_mm",
            "grad mask (zero frozen experts' rows), share of the copy ceiling"} <= heads, heads
    # Liger is optional: skipped with its reason (no CUDA here), never an error
    assert [r for r in recs if r.get("impl") == "liger" and "skipped" in r]
    assert any(r.get("what", "").startswith("per-kernel") and r["kernels"] for r in recs)
    assert [r for r in recs if r["stage"] == "routing" and r.get("speedup")]


def test_a_missing_transformers_baseline_is_an_error_not_a_skip(tmp_path, monkeypatch):
    from benchmarks import bench_moe_layer as bml

    real = bml._impls
    monkeypatch.setattr(bml, "_impls", lambda *a, **k: {**real(*a, **k), "grouped_mm": "unavailable: test"})
    out = tmp_path / "r.jsonl"
    run = gpu_run.Run(str(out), budget=60.0, start=time.time(), dry=True)
    with pytest.raises(RuntimeError, match="baseline 'grouped_mm' cannot run here"):  # a real run goes on
        run.stage("olmoe", 1, lambda: gpu_run._layer(run, "olmoe", 8, frozen=False))
    recs = [json.loads(line) for line in open(out)]
    err = [r for r in recs if "error" in r]
    assert err and "baseline 'grouped_mm' cannot run here: unavailable: test" in err[0]["error"], recs


def test_cache_binaries_counts_compiled_kernels(tmp_path):
    (tmp_path / "a1").mkdir()
    (tmp_path / "a1" / "k.cubin").write_bytes(b"x")
    (tmp_path / "a1" / "k.json").write_text("{}")
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "j.cubin").write_bytes(b"x")
    assert gpu_run._cache_binaries(str(tmp_path)) == 2


def test_stage_skipped_when_budget_spent(tmp_path):
    out = tmp_path / "r.jsonl"
    run = gpu_run.Run(str(out), budget=5.0, start=0.0, dry=False)  # started at epoch 0: nothing left
    ran = []
    run.stage("big", 60, lambda: ran.append(1))
    assert not ran
    (rec,) = [json.loads(line) for line in open(out)]
    assert rec["stage"] == "big" and rec["skipped"] == "budget"
