"""benchmarks/gpu_run.sh: the one GPU run, rehearsed on CPU (``--dry``), and its budget rule."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks import gpu_run  # noqa: E402

STAGES = ["env", "ceilings", "correctness", "qwen3_30b_a3b", "routing", "mixtral_8x7b", "liger", "olmoe",
          "deepseek_v2_lite", "gpt_oss_phimoe", "activation_checkpointing", "method_cost"]


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
    assert any(r.get("what", "").startswith("first fwd+bwd") for r in recs)
    assert any(r.get("what", "").startswith("per-kernel") and r["kernels"] for r in recs)
    assert [r for r in recs if r["stage"] == "routing" and r.get("speedup")]


def test_stage_skipped_when_budget_spent(tmp_path):
    out = tmp_path / "r.jsonl"
    run = gpu_run.Run(str(out), budget=5.0, start=0.0, dry=False)  # started at epoch 0: nothing left
    ran = []
    run.stage("big", 60, lambda: ran.append(1))
    assert not ran
    (rec,) = [json.loads(line) for line in open(out)]
    assert rec["stage"] == "big" and rec["skipped"] == "budget"
