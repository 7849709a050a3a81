"""The MoE benchmark scripts run end to end in ``--quick`` mode and write the project's one results format."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import _common, bench_moe_layer, bench_routing  # noqa: E402


def _load_single(out_dir):
    files = os.listdir(out_dir)
    assert len(files) == 1 and files[0].endswith(".json"), files
    with open(os.path.join(out_dir, files[0])) as f:
        return json.load(f)


def test_bench_moe_layer_quick(tmp_path):
    res = bench_moe_layer.main(["--quick", "--shapes", "qwen3_30b_a3b", "mixtral_8x7b", "--iters", "1",
                                "--out-dir", str(tmp_path)])
    data = _load_single(tmp_path)
    assert data["benchmark"] == "bench_moe_layer" and data["records"] == json.loads(json.dumps(res["records"]))
    for key in ("device", "torch", "triton", "transformers", "date", "git_sha", "roofline_tflops"):
        assert key in data
    for rec in data["records"]:
        _common.check_record(rec)
        assert rec["ms"] > 0 and rec["tflops"] > 0
    seen = {(r["shape"], r["impl"], r["pass"]) for r in data["records"]}
    for shape in ("qwen3_30b_a3b", "mixtral_8x7b"):
        for impl in ("desmoe", "eager", "grouped_mm", "torch"):
            assert (shape, impl, "fwd") in seen and (shape, impl, "fwd+bwd") in seen
        assert (shape, "desmoe", "fwd+bwd_frozen50") in seen
    assert all("speedup_vs_grouped_mm" in r for r in data["records"])


def test_bench_routing_quick(tmp_path):
    bench_routing.main(["--quick", "--shapes", "qwen3_30b_a3b", "--T", "64", "--iters", "1",
                        "--out-dir", str(tmp_path)])
    data = _load_single(tmp_path)
    assert data["benchmark"] == "bench_routing"
    impls = {(r["impl"], r["pass"]) for r in data["records"]}
    assert impls == {(i, p) for i in ("desmoe", "torch", "eager") for p in ("fwd", "fwd+bwd")}
    for rec in data["records"]:
        _common.check_record(rec)
        assert rec["gbps"] > 0


def test_bench_routing_sequences_agree():
    """The three routing sequences the benchmark times compute the same weights and ids."""
    import torch

    logits = torch.randn(50, 16)
    outs = [fn(logits, 4, renormalize=True) for fn in bench_routing.IMPLS.values()]
    for w, ids, *_ in outs[1:]:
        assert torch.equal(ids, outs[0][1])
        torch.testing.assert_close(w, outs[0][0])


@pytest.mark.gpu
def test_bench_moe_layer_gpu_smoke(tmp_path):
    res = bench_moe_layer.main(["--shapes", "mixtral_8x7b", "--T", "4096", "--iters", "2", "--impls", "desmoe",
                                "grouped_mm", "--out-dir", str(tmp_path)])
    assert {r["impl"] for r in res["records"]} >= {"desmoe", "grouped_mm"}
    assert all(r.get("backend", "triton") == "triton" for r in res["records"])


def test_bench_activation_checkpointing_quick(tmp_path):
    # every mode's gradients equal checkpointing off (the script asserts it), and checkpointing saves less
    from benchmarks import bench_activation_checkpointing

    res = bench_activation_checkpointing.main(["--quick", "--iters", "1", "--out-dir", str(tmp_path)])
    rec = {r["pass"].split("/")[1]: r for r in res["records"]}
    assert set(rec) == {"off", "non_reentrant", "reentrant"}
    assert rec["non_reentrant"]["saved_mb"] < 0.5 * rec["off"]["saved_mb"]
    assert rec["reentrant"]["saved_mb"] < 0.5 * rec["off"]["saved_mb"]
    assert list(tmp_path.glob("activation_checkpointing-*-quick.json"))
