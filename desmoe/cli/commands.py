"""The ``desmoe`` commands other than the demo: train, eval, export, specialization, experiment, parity, bench,
info. Each ``cmd_<name>(args)`` returns the exit status; a bad input raises ``ValueError`` / ``FileNotFoundError``
naming the flag, which :func:`desmoe.cli.main` turns into status 2."""
from __future__ import annotations

import json
import os
import sys


def _resume_or_start(resume, output_dir: str):
    """``--resume`` (bare) where ``--output-dir`` has no checkpoint yet — a run stopped before its first one, or a
    requeued job whose first attempt never got that far: start the run, saying so. Checkpoints without a
    ``latest`` file are not guessed at (an error names them)."""
    from ..train import checkpoint as ck

    if resume is not True or os.path.exists(os.path.join(output_dir, ck.LATEST)):
        return resume
    found = ck.list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if found:
        raise ValueError(f"--resume: {output_dir!r} holds checkpoints ({', '.join(map(os.path.basename, found[-3:]))}) "
                         f"but no 'latest' file naming the one to continue; pass --resume "
                         f"{found[-1]} to continue from it")
    if os.environ.get("RANK", "0") == "0":
        print(f"desmoe train: --resume: no checkpoint in {output_dir!r} yet (the run stopped before its first one, "
              f"or never started): starting the run from step 0", flush=True)
    return False


def cmd_train(a) -> int:
    from ..train import NonFiniteLossError, load_config, run

    if a.max_steps is not None and a.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {a.max_steps}")
    cfg = load_config(a.config, a.overrides)
    from ..train.config import check_output_dir

    check_output_dir("--output-dir", a.output_dir)
    from ..train.builders import resolve_device

    resolve_device(cfg)  # the device exists and takes model.dtype: checked before the run directory is touched
    if a.no_progress or a.quiet:
        cfg.train.progress = False
    from ..train.rundir import RunFinished
    from ..train.signals import Interrupted

    if isinstance(a.resume, str) and not os.path.isdir(a.resume):
        raise FileNotFoundError(f"--resume {a.resume!r}: no such checkpoint or run directory"
                                + (" (it is a file)" if os.path.exists(a.resume) else ""))
    resume = _resume_or_start(a.resume, a.output_dir)
    try:
        s = run(cfg, a.output_dir, max_steps=a.max_steps, resume=resume, overwrite=a.overwrite)
    except RunFinished as e:
        print(f"desmoe train: {e}", file=sys.stderr, flush=True)
        return 0
    except Interrupted as e:  # TrainingInterrupted too (a checkpoint was written first)
        print(f"desmoe train: stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"desmoe train: error: {e}", file=sys.stderr, flush=True)
        return 3
    if s.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return 0
    loss = (f"task loss {s['train_loss_first']:.4f} -> {s['train_loss_last']:.4f}" if s["train_loss_first"] is not None
            else "no steps left to run")
    print(f"done: {s['steps_run']} steps of {cfg.method.name} in {s['seconds']:.1f}s; {loss}; "
          f"checkpoint {s['checkpoint']}", flush=True)
    return 0


def cmd_eval(a) -> int:
    from ..eval import format_table
    from ..train.evaluate import evaluate_checkpoint

    if a.math_n < 0 or (a.max_batches is not None and a.max_batches < 1):
        raise ValueError(f"--math-n must be >= 0 and --max-batches >= 1, got {a.math_n}, {a.max_batches}")
    from ..train.config import check_device_available, check_output_file

    check_device_available("--device", a.device)
    if a.json is not None:
        check_output_file("--json", a.json)
    tasks = None if a.tasks is None else [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.tasks is not None and not tasks:
        raise ValueError(f"--tasks: expected comma-separated lm-eval task names, got {a.tasks!r}")
    if not os.path.exists(a.checkpoint):
        raise FileNotFoundError(f"--checkpoint {a.checkpoint!r} does not exist; expected a run directory or a "
                                f"checkpoint directory")
    exported = _is_export(a.checkpoint)
    if exported and not tasks:
        raise ValueError(f"--checkpoint {a.checkpoint!r} is an exported model (desmoe_export.json): its held-out "
                         f"losses are in that report; pass --tasks to run benchmarks on it")
    res = {} if exported else evaluate_checkpoint(a.checkpoint, max_batches=a.max_batches, math_n=a.math_n,
                                                  device=a.device,
                                                  log=lambda m: print(f"desmoe eval: {m}", file=sys.stderr))
    if tasks:
        res["lm_eval"] = _lm_eval(a, tasks, exported)
    text = json.dumps(res, indent=1, default=str)
    if a.format == "json":  # machine output only: nothing else on stdout
        print(text)
    else:
        if not exported:
            print(f"checkpoint {res['checkpoint']} (method {res['method']}, step {res['step']})")
            print(format_table(res))
        if tasks:
            from ..eval.harness import format_tasks

            print(("exported model " + a.checkpoint + "\n" if exported else "") + format_tasks(res["lm_eval"]))
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


def _is_export(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "desmoe_export.json"))
            and os.path.isfile(os.path.join(path, "config.json")))


def _lm_eval(a, tasks: list[str], exported: bool) -> dict:
    """lm-eval tasks on the model as trained (``desmoe.from_pretrained``: ALR included) or on an export (stock)."""
    import torch

    from ..eval.harness import run_tasks

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    from ..export import from_pretrained

    model, tok = from_pretrained(a.checkpoint, device=dev)  # verified, safetensors only
    if exported:  # what a server runs: stock transformers modules
        from ..integrations.hf import unpatch

        unpatch(model)
    return run_tasks(model.to(dev), tok, tasks, include_path=a.include_path, limit=a.limit, device=dev)


def cmd_bench(a) -> int:
    import runpy

    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "benchmarks")
    have = sorted(f for f in os.listdir(root) if f.startswith("bench_") and f.endswith(".py")) \
        if os.path.isdir(root) else []
    # a name, never a path: only the repository's own benchmarks/ scripts run
    m = re.fullmatch(r"([A-Za-z0-9_]+?)(?:\.py)?", a.name)
    cands = [os.path.join(root, f"bench_{m.group(1)}.py"), os.path.join(root, f"{m.group(1)}.py")] if m else []
    path = next((c for c in cands if os.path.isfile(c)), None)
    if path is None:
        raise FileNotFoundError(f"desmoe bench NAME: {a.name!r} is not one of the repository's benchmarks "
                                f"({', '.join(have) or 'none found in ' + root}); expected a name such as "
                                f"{have[0][6:-3] if have else 'train_step'} (a name, not a path: other files are never "
                                f"run; benchmarks/ ships with the source checkout, not the wheel)")
    old = sys.argv
    sys.argv = [path, *[x for x in a.args if x != "--"]]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old
    return 0



def cmd_parity(a) -> int:
    from ..integrations.parity import parity_rows, print_parity

    rows = parity_rows(a.model_types or None)
    print_parity(rows)
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_experiment(a) -> int:
    from ..experiments import EXPERIMENTS, load_spec, run_experiment

    if a.name not in EXPERIMENTS + ("all", "sweep"):
        raise ValueError(f"experiment name must be one of {', '.join(EXPERIMENTS)}, all (the paper-claim experiments) "
                         f"or sweep (the same over several bases), got {a.name!r}")
    from ..train.config import check_output_dir

    check_output_dir("--out", a.out)
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if a.name == "sweep":
        from ..experiments.sweep import load_sweep, run_sweep

        sw, spec = load_sweep(a.config, quick=a.quick, seeds=a.seeds)
        if a.cache is not None:
            spec.cache = a.cache
        run_sweep(sw, spec, a.out, log=log, workers=a.workers)
        return 0
    spec = load_spec(a.config, quick=a.quick, seeds=a.seeds)
    if a.cache is not None:
        spec.cache = a.cache
    run_experiment(a.name, a.out, spec, log=log, workers=a.workers)
    return 0


def _shard_size(v: str):
    """``--max-shard-size``: an int of bytes, or a size like 5GB / 500MB (what save_pretrained takes)."""
    import re

    if re.fullmatch(r"\d+", v):
        return int(v)
    if re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)", v, re.I):
        return v
    raise ValueError(f"--max-shard-size: expected bytes or a size like 5GB / 500MB, got {v!r}")


def cmd_export(a) -> int:
    import warnings

    from ..export import export, format_report
    from ..train.config import check_device_available

    check_device_available("--device", a.device)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = export(a.checkpoint, a.out, fit_tokens=a.fit_tokens, eval_tokens=a.eval_tokens,
                     min_agreement=a.min_agreement, on_low=a.on_low, overwrite=a.overwrite, device=a.device,
                     dtype=a.dtype, max_shard_size=_shard_size(a.max_shard_size), layer_by_layer=a.layer_by_layer)
    if a.format == "json":
        print(json.dumps(rep, indent=1))
    else:
        mode = (f"layer by layer: one decoder layer on {rep['device']} at a time" if rep.get("layer_by_layer")
                else f"whole model on {rep['device']}")
        print(f"exported {rep['checkpoint']} -> {rep['out_dir']} (stock Hugging Face model; forwards: {mode})")
        print(format_report(rep))
    for w in caught:
        if "exported routers" in str(w.message) or "differs from the config checkpoint" in str(w.message):
            print(f"desmoe export: warning: {w.message}", file=sys.stderr)
    return 0


def cmd_specialization(a) -> int:
    from ..experiments.specialization import format_table, specialization_of_checkpoint
    from ..train.config import check_device_available, check_output_file

    if a.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {a.tokens}")
    check_device_available("--device", a.device)
    if a.json is not None:
        check_output_file("--json", a.json)
    if not os.path.exists(a.checkpoint):
        raise FileNotFoundError(f"--checkpoint {a.checkpoint!r} does not exist")
    res = specialization_of_checkpoint(a.checkpoint, tokens=a.tokens, device=a.device)
    text = json.dumps(res, indent=1)
    if a.format == "json":
        print(text)
    else:
        print(f"checkpoint {res['checkpoint']} ({res['split']} split)")
        print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


def cmd_info(a) -> int:
    from ..info import main as info_main

    return info_main(a.format, model=a.model, alr_expansion=a.alr_expansion)
