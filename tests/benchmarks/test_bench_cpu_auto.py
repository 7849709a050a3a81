"""benchmarks/bench_cpu_auto.py runs end to end (tiny token count) and writes a complete results file."""
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def test_bench_cpu_auto_quick(tmp_path, one_thread):
    sys.path.insert(0, BENCH)
    try:
        import bench_cpu_auto
    finally:
        sys.path.remove(BENCH)
    result, path = bench_cpu_auto.run(tokens=32, rounds=1, max_gb=1e-6, out_dir=str(tmp_path), verbose=False)
    saved = json.load(open(path))
    impls = {(r["impl"], r["masks"]) for r in saved["records"]}
    assert ("desmoe", "none") in impls and ("grouped_mm", "none") in impls and ("eager", "none") in impls
    assert any(impl == "desmoe" and masks != "none" for impl, masks in impls)
    assert ("batched_mm", "none") not in impls  # over --max-gb: skipped, not timed
    v = saved["verdict"]
    assert v["best_transformers_impl"] in ("eager", "grouped_mm") and v["desmoe_over_best"] > 0
