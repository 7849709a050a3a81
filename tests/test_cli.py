"""``desmoe`` CLI in-process: train → eval on a tiny run, bad input → exit 2 with a message naming the field or
file, bench/experiment dispatch, ``python -m desmoe.train``."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from desmoe.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
from test_train import tiny_cfg  # noqa: E402


@pytest.fixture()
def cfg_file(tmp_path):
    d = tiny_cfg(str(tmp_path))
    d["data"]["domains"] = ["math", "beta"]  # built-in math (generated) + a local file domain
    d["data"]["sources"].pop("alpha")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_train_then_eval(tmp_path, cfg_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_file), "--output-dir", str(out), "--max-steps", "4", "--no-progress",
               "--set", "train.max_steps=6", "--set", "method.name=des_moe"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "done: 4 steps of des_moe" in text and "phase -> stabilization" in text
    assert (out / "latest").read_text().strip() == "step-000004"
    assert (out / "config.yaml").exists() and (out / "summary.json").exists()
    hist = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert hist[0]["phase"] == "warmup" and "loss/math" in hist[0] and "lambda" in hist[0]
    js = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(out), "--math-n", "2", "--max-batches", "1", "--json", str(js)])
    assert rc == 0
    res = json.loads(js.read_text())
    assert set(res["domains"]) == {"math", "beta", "base"} and res["general"] == res["domains"]["base"]
    assert res["math"]["n"] == 2 and res["step"] == 4 and res["method"] == "des_moe"
    text = capsys.readouterr().out
    assert "forgetting probe" in text  # the table
    assert '"domains"' not in text  # and no JSON dump after it unless asked
    rc = main(["eval", "--checkpoint", str(out), "--math-n", "0", "--max-batches", "1", "--format", "json"])
    assert rc == 0
    out_json = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert out_json["step"] == 4 and out_json["domains"].keys() == res["domains"].keys()


def test_bad_inputs_exit_2_with_clear_message(tmp_path, cfg_file, capsys):
    assert main(["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "r"),
                 "--set", "method.tau=-1"]) == 2
    assert "method.tau" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    d = yaml.safe_load(cfg_file.read_text())
    os.remove(d["data"]["sources"]["beta"])
    assert main(["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "r")]) == 2
    assert "beta.jsonl" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    # --resume with no checkpoint yet starts the run (a requeued job); a named checkpoint that is not there is an
    # error naming it
    missing = tmp_path / "r2" / "checkpoints" / "step-000005"
    assert main(["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "r3"), "--resume", str(missing),
                 "--set", f"data.sources.beta={d['data']['sources']['gamma']}"]) == 2
    assert "step-000005" in capsys.readouterr().err
    assert main(["bench", "no_such_bench"]) == 2
    assert "bench_train_step.py" in capsys.readouterr().err
    assert main(["experiment", "paper", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "paper-claim experiments" in err and "pareto" in err and "issue" not in err


def test_bench_dispatch(tmp_path, capsys):
    assert main(["bench", "train_step", "--quick", "--iters", "1", "--out-dir", str(tmp_path)]) == 0
    files = os.listdir(tmp_path)
    assert len(files) == 1
    res = json.loads((tmp_path / files[0]).read_text())
    passes = {(r["impl"], r["pass"]) for r in res["records"]}
    assert ("desmoe", "des_consolidation") in passes and ("eager", "fft") in passes


def test_python_dash_m_desmoe_train_help():
    r = subprocess.run([sys.executable, "-m", "desmoe.train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--output-dir" in r.stdout


def test_demo_end_to_end_short(tmp_path, capsys):
    """The README's main command, shortened: base (cached), DES-MoE and FFT runs, and the summary table."""
    from desmoe.cli import main

    args = ["demo", "--steps", "6", "--pretrain-steps", "3", "--no-parity", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "forgetting probe" in out and "DES-MoE phases" in out and "FFT" in out
    assert (tmp_path / "des_moe" / "summary.json").is_file() and (tmp_path / "fft" / "summary.json").is_file()
    assert any(p.name.startswith("base-") for p in (tmp_path / "cache").iterdir())
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 2  # bad argument: clear error, exit 2


def test_quick_bench_leaves_the_source_tree_alone(tmp_path, capsys, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(root, "benchmarks", "results")
    before = sorted(os.listdir(results))

    def status():
        return subprocess.run(["git", "status", "--porcelain", "--", "benchmarks"], cwd=root, capture_output=True,
                              text=True).stdout

    s0 = status()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "train_step", "--quick", "--iters", "1"]) == 0
    assert sorted(os.listdir(results)) == before and status() == s0
    (name,) = os.listdir(tmp_path / "runs" / "bench")
    assert name.endswith("-quick.json")
    assert json.loads((tmp_path / "runs" / "bench" / name).read_text())["quick"] is True
    capsys.readouterr()
    assert main(["bench", "train_step", "--quick", "--save"]) == 2  # quick results are never committed results
    assert "quick" in capsys.readouterr().err
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    assert report.latest_results(str(tmp_path / "runs" / "bench")) == []  # never in the README's tables


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_demo_says_how_and_the_same_command_continues_it(tmp_path, capsys, monkeypatch, sig):
    """Ctrl-C / SIGTERM during the demo's fine-tuning: a message and the signal's exit code, no traceback; the
    same command resumes the run from its checkpoint, then reuses the finished run; other settings need
    --overwrite."""
    import signal

    import desmoe.train as train_pkg
    from desmoe.cli import main

    real, sent = train_pkg.run, []

    def run_with_signal(cfg, out, **kw):
        def log(msg):
            if msg.startswith("step ") and not sent:
                sent.append(1)
                os.kill(os.getpid(), getattr(signal, sig))
        return real(cfg, out, log=log, **kw)

    args = ["demo", "--steps", "6", "--pretrain-steps", "3", "--no-parity", "--quiet", "--no-compare",
            "--out", str(tmp_path)]
    monkeypatch.setattr(train_pkg, "run", run_with_signal)
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 128 + getattr(signal, sig) and sent, err
    assert "Traceback" not in err and "run the same `desmoe demo` command again" in err, err
    assert (tmp_path / "des_moe" / "latest").is_file() and not (tmp_path / "des_moe" / "summary.json").exists()
    monkeypatch.setattr(train_pkg, "run", real)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "continuing the interrupted run" in out and "forgetting probe" in out
    s = json.loads((tmp_path / "des_moe" / "summary.json").read_text())
    assert s["start_step"] > 0
    assert main(args) == 0  # finished: reused, nothing rerun
    out = capsys.readouterr().out
    assert "already finished" in out and "forgetting probe" in out
    assert main([*args[:2], "7", *args[3:]]) == 2  # other settings: never mixed into the earlier run
    err = capsys.readouterr().err
    assert str(tmp_path / "des_moe") in err and "--overwrite" in err and "max_steps" in err
