"""``desmoe`` command line: demo, train, eval, export, specialization, bench, experiment, parity, info.

``main(argv)`` returns the exit status (0 ok, 2 bad input: the message names the field or file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEMO_DOMAINS = ["math", "code", "law"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="desmoe", description="Fast MoE fine-tuning that forgets less (DES-MoE).")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="CPU demo: tiny MoE, built-in domains, base pretraining, DES-MoE vs FFT")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--steps", type=int, default=150, help="fine-tuning steps T (default 150)")
    d.add_argument("--pretrain-steps", type=int, default=400,
                   help="base pretraining steps (default 400; the base is cached in OUT/cache by its config)")
    d.add_argument("--no-compare", action="store_true", help="skip the full fine-tuning (FFT) comparison run")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--no-parity", action="store_true", help="skip the desmoe.patch parity table")
    d.add_argument("--overwrite", action="store_true", help="replace the runs an earlier demo left in --out")

    pa = sub.add_parser("parity", help="desmoe.patch vs transformers eager on tiny models of every supported type")
    pa.add_argument("--model-types", nargs="*", default=None, help="subset of model types (default: all)")

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--output-dir", required=True, help="run directory (checkpoints, plots, summary.json)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (the phase clock stays train.max_steps)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the latest checkpoint in --output-dir, or from checkpoint/run directory DIR "
                        "(verified: a corrupt or mismatched checkpoint is an error, never a restart from step 0)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method.phi=0.5 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    t.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    t.add_argument("--overwrite", action="store_true",
                   help="with --resume CKPT: allow rewinding an --output-dir that holds another run to CKPT")

    e = sub.add_parser("eval", help="evaluate a checkpoint: per-domain loss/ppl, math exact match, general loss")
    e.add_argument("--checkpoint", required=True, help="run directory (uses its latest checkpoint) or checkpoint dir")
    e.add_argument("--max-batches", type=int, default=None,
                   help="held-out batches per domain (default: the run's train.eval_batches)")
    e.add_argument("--math-n", type=int, default=16, help="math problems for exact match (0 = skip)")
    e.add_argument("--json", default=None, help="also write the results JSON to this file")
    e.add_argument("--format", choices=["table", "json"], default="table",
                   help="stdout: a table (default) or the results JSON alone")
    e.add_argument("--device", default="auto")
    e.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks to run too (needs "
                   "the `eval` extra); on a checkpoint (as trained, ALR included) or an exported folder")
    e.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")

    b = sub.add_parser("bench", help="run a script from benchmarks/ (e.g. desmoe bench train_step --quick)")
    b.add_argument("name", help="benchmark name: bench_<name>.py or <name>.py in benchmarks/")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")

    x = sub.add_parser("experiment", help="replicate the paper's claims at small scale (results.json + plots)")
    x.add_argument("name", help="pareto | scaling | all (the paper's claims) | sweep (the same over several bases; "
                   "--config: a sweep config, default configs/experiments/sweep.yaml)")
    x.add_argument("--out", required=True, help="output directory (results.json + PNG plots; 'all': one subdir each)")
    x.add_argument("--quick", action="store_true", help="tiny config (configs/experiments/quick.yaml), < 60 s")
    x.add_argument("--seeds", type=int, default=None, help="seeds per method (default: the config's, 3)")
    x.add_argument("--config", default=None, help="experiment config (default configs/experiments/paper.yaml)")
    x.add_argument("--workers", type=int, default=1, help="fine-tuning runs in parallel, one process and one "
                   "thread each (2 on a 2-core machine)")
    x.add_argument("--cache", default=None, help="where the base model and fine-tuning runs are cached "
                   "(default: the config's cache, under runs/)")
    ex = sub.add_parser("export", help="write a stock Hugging Face model that routes like the trained checkpoint "
                                       "(the ALR folded into fitted linear routers)")
    ex.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    ex.add_argument("--out", required=True, help="output folder: a stock HF model (+ tokenizer, desmoe_export.json)")
    ex.add_argument("--min-agreement", type=float, default=0.9,
                    help="lowest acceptable share of held-out tokens whose top-k expert set is unchanged, per layer "
                         "(default 0.9)")
    ex.add_argument("--on-low", choices=["warn", "refuse"], default="warn",
                    help="below --min-agreement: export with a warning (default) or write nothing and fail")
    ex.add_argument("--fit-tokens", type=int, default=65536, help="tokens per training domain to fit routers on")
    ex.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain for the report")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="weights' dtype on disk (default auto: the run's model.dtype, bf16 for a bf16 run)")
    ex.add_argument("--max-shard-size", default="5GB",
                    help="safetensors shards of at most this size, with an index (as save_pretrained; default 5GB)")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--format", choices=["table", "json"], default="table")

    sp = sub.add_parser("specialization", help="how specialized a checkpoint's experts are to its domains, per "
                                               "layer: I(domain; expert), ESFT concentration, DGES mask overlap")
    sp.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    sp.add_argument("--tokens", type=int, default=16384,
                    help="held-out (test split) tokens per training domain (default 16384)")
    sp.add_argument("--json", default=None, help="also write the results JSON to this file")
    sp.add_argument("--format", choices=["table", "json"], default="table")
    sp.add_argument("--device", default="cpu")

    for q in (pa, e, x, ex, sp):
        q.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")

    i = sub.add_parser("info", help="versions, device, which backends patch() will use, extension, model types")
    i.add_argument("--format", choices=["table", "json"], default="table", help="table (default) or json")
    i.add_argument("--model", default=None, help="a model folder or config.json: also print the ALR's cost on it "
                   "(parameters, FLOPs per token, share of the active parameters' FLOPs)")
    i.add_argument("--alr-expansion", type=float, default=None, help="with --model: the ALR width to cost "
                   "(default: method.alr_expansion's default)")
    return p


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass


def _resume_or_start(resume, output_dir: str):
    """``--resume`` (bare) where ``--output-dir`` has no checkpoint yet — a run stopped before its first one, or a
    requeued job whose first attempt never got that far: start the run, saying so. Checkpoints without a
    ``latest`` file are not guessed at (an error names them)."""
    from .train import checkpoint as ck

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
    from .train import NonFiniteLossError, load_config, run

    if a.max_steps is not None and a.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {a.max_steps}")
    cfg = load_config(a.config, a.overrides)
    from .train.config import check_output_dir

    check_output_dir("--output-dir", a.output_dir)
    from .train.builders import resolve_device

    resolve_device(cfg)  # the device exists and takes model.dtype: checked before the run directory is touched
    if a.no_progress or a.quiet:
        cfg.train.progress = False
    from .train.rundir import RunFinished
    from .train.signals import Interrupted

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
    from .eval import format_table
    from .train.evaluate import evaluate_checkpoint

    if a.math_n < 0 or (a.max_batches is not None and a.max_batches < 1):
        raise ValueError(f"--math-n must be >= 0 and --max-batches >= 1, got {a.math_n}, {a.max_batches}")
    from .train.config import check_device_available, check_output_file

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
            from .eval.harness import format_tasks

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

    from .eval.harness import run_tasks

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    from .export import from_pretrained

    model, tok = from_pretrained(a.checkpoint, device=dev)  # verified, safetensors only
    if exported:  # what a server runs: stock transformers modules
        from .integrations.hf import unpatch

        unpatch(model)
    return run_tasks(model.to(dev), tok, tasks, include_path=a.include_path, limit=a.limit, device=dev)


def cmd_bench(a) -> int:
    import runpy

    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
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


def demo_base_config() -> dict:
    """The demo's base model: a tiny Qwen3-MoE (4 layers, 16 experts top-2, D 128, ~3.9M parameters)."""
    return {
        "model": {"tiny": "qwen3_moe", "seed": 0, "overrides": {
            "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 128, "num_experts": 16,
            "num_experts_per_tok": 2, "max_position_embeddings": 256}},
        "tokenizer": {"vocab_size": 2048},
        "data": {"domains": list(DEMO_DOMAINS), "general": "general", "max_docs": 1500, "eval_max_docs": 48,
                 "seq_len": 128, "batch_size": 8,
                 "packing": "concatenated"},  # the demo's published numbers were made with it
        "train": {"eval_batches": 3, "pretrain_lr": 3e-3},
    }


# The base pretrains mostly on `general` with a little of each fine-tuning domain, as a real pretrained LLM has
# seen code and math, and with a load-balancing loss so all experts are in use (see the README's Results).
DEMO_PRETRAIN_MIX = {"general": 0.85, **{d: 0.05 for d in DEMO_DOMAINS}}


def demo_finetune_config(base_path: str, method: str, steps: int) -> dict:
    return {
        "model": {"path": base_path}, "tokenizer": {"path": base_path},
        "data": {"domains": list(DEMO_DOMAINS), "general": "general", "max_docs": 600, "eval_max_docs": 48,
                 "seq_len": 128, "batch_size": 8,
                 "packing": "concatenated"},
        "method": {"name": method, "update_every": 5},
        "train": {"max_steps": steps, "lr": 1e-3, "warmup_steps": 5, "log_every": 25, "eval_batches": 3},
    }


def _demo_plan(run_dir: str, cfg_dict: dict, base_path: str, overwrite: bool) -> str:
    """What the demo does with ``run_dir`` (checked before any work): ``"new"`` (nothing there, or ``overwrite``:
    cleared), ``"restart"`` (an earlier demo stopped before its first checkpoint), ``"resume"`` (an interrupted
    demo run with these settings: continued from its latest checkpoint), ``"done"`` (finished with these settings:
    its ``summary.json`` is reused). A run made with other settings is an error unless ``overwrite``."""
    from .train import checkpoint as ck
    from .train import config_from_dict
    from .train.rundir import RunDirError, clear_for_overwrite, config_differences

    if overwrite:
        clear_for_overwrite(run_dir, overwrite=True, what="demo run (from an earlier demo)")
        return "new"
    if not os.path.isdir(run_dir):
        return "new"
    if not os.path.exists(os.path.join(run_dir, ck.LATEST)):
        if ck.list_checkpoints(run_dir):
            raise RunDirError(f"{run_dir!r} holds checkpoints but no 'latest' file; pass --overwrite to replace that "
                              f"demo run, or choose another --out")
        has_run = any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.yaml", "run_info.json"))
        return "restart" if has_run else "new"
    try:
        ckpt = ck.resolve_checkpoint(run_dir)
        with open(os.path.join(ckpt, "config.json")) as f:
            saved = json.load(f)
        # the base may not be built yet (its cache removed): validate with the run's own model folder in its place
        probe = json.loads(json.dumps(cfg_dict))
        probe["model"]["path"] = probe["tokenizer"]["path"] = os.path.join(ckpt, "model")
        cur = config_from_dict(probe, source="demo").to_dict()
        cur["model"]["path"] = cur["tokenizer"]["path"] = base_path
        diffs = config_differences(saved, cur)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{run_dir!r} already holds a demo run that cannot be continued ({e}); pass --overwrite "
                          f"to replace it, or choose another --out") from None
    if diffs:
        raise RunDirError(f"{run_dir!r} already holds a demo run made with other settings ({'; '.join(diffs[:3])}); "
                          f"pass --overwrite to replace it, or choose another --out")
    return "done" if os.path.isfile(os.path.join(run_dir, "summary.json")) else "resume"


def _demo_run(cfg, run_dir: str, plan: str, label: str, progress: bool) -> dict:
    from .train import run
    from .train.rundir import RunFinished

    if plan == "done":
        print(f"      {label}: already finished in {run_dir}; its results are reused (--overwrite runs it again)")
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    if plan == "restart":
        print(f"      {label}: the earlier run in {run_dir} stopped before its first checkpoint; starting it again")
    if plan == "resume":
        print(f"      {label}: continuing the interrupted run in {run_dir} from its latest checkpoint")
    try:
        return run(cfg, run_dir, progress=progress, resume=plan == "resume")
    except RunFinished:  # trained to the end, stopped during the final evaluation
        raise ValueError(f"{label} run in {run_dir!r} finished training but was stopped during its final "
                         f"evaluation: `desmoe eval --checkpoint {run_dir}` evaluates it, or pass --overwrite to run "
                         f"the demo again") from None


def cmd_demo(a) -> int:
    """The demo. Interrupted (Ctrl-C, SIGTERM), the same command continues it: the base is cached, a fine-tuning
    run resumes from its latest checkpoint and a finished one is reused."""
    from .experiments.base import base_cache_path, prepare_base_cached
    from .train import TrainingInterrupted, config_from_dict

    if a.steps < 5 or a.pretrain_steps < 1:
        raise ValueError(f"--steps must be >= 5 and --pretrain-steps >= 1, got {a.steps}, {a.pretrain_steps}")
    from .train.config import check_output_dir

    check_output_dir("--out", a.out)
    t0 = time.time()
    progress = not a.quiet
    from .train.rundir import prepare_run_dir

    prepare_run_dir(a.out)
    cache = os.path.join(a.out, "cache")
    base_kw = dict(aux_loss_coef=0.01, pretrain_mix=DEMO_PRETRAIN_MIX)
    base_path = base_cache_path(demo_base_config(), a.pretrain_steps, cache, **base_kw)
    runs = [(m, label, os.path.join(a.out, m)) for m, label in (("des_moe", "DES-MoE"), ("fft", "FFT"))
            if m == "des_moe" or not a.no_compare]
    plans = {m: _demo_plan(d, demo_finetune_config(base_path, m, a.steps), base_path, a.overwrite)
             for m, _, d in runs}  # before any work: nothing half-done
    if not a.no_parity:
        from .integrations.parity import parity_rows, print_parity

        print("[0/3] desmoe.patch parity against transformers' eager experts (tiny models, fp32, logits and grads)")
        rows = parity_rows()
        print_parity(rows)
        if not all(r["ok"] for r in rows):
            raise ValueError("parity check failed for: " + ", ".join(r["model_type"] for r in rows if not r["ok"]))
    print(f"[1/3] base model: tiny qwen3_moe (4 layers, 16 experts, top-2), BPE tokenizer trained on the built-in "
          f"domains, {a.pretrain_steps} pretraining steps on 85% 'general' + 5% of each of {', '.join(DEMO_DOMAINS)}, "
          f"with a load-balancing loss (cached in {cache})")
    info = prepare_base_cached(demo_base_config(), a.pretrain_steps, cache, log=print, **base_kw)
    base = {"general_loss_before": info["general_loss_random_init"], "general_loss_after": info["general_loss"]}
    out = {}
    try:
        for m, label, d in runs:
            print(f"[2/3] DES-MoE fine-tuning on {', '.join(DEMO_DOMAINS)} for {a.steps} steps" if m == "des_moe" else
                  "[3/3] full fine-tuning (FFT) baseline, same data and steps")
            cfg = config_from_dict(demo_finetune_config(base_path, m, a.steps), source="demo")
            out[m] = _demo_run(cfg, d, plans[m], label, progress)
    except TrainingInterrupted as e:
        print(f"desmoe demo: stopped: {e.signame} received: checkpoint of step {e.step} written to "
              f"{e.checkpoint}; run the same `desmoe demo` command again to continue from there", file=sys.stderr,
              flush=True)
        return e.exit_code
    print(demo_report(base, out["des_moe"], out.get("fft"), time.time() - t0))
    return 0


def demo_report(base: dict, des: dict, fft: dict | None, seconds: float) -> str:
    L = []
    L.append("=" * 78)
    L.append(f"base pretraining: held-out 'general' loss {base['general_loss_before']:.3f} -> "
             f"{base['general_loss_after']:.3f}")
    ph = des["phases"]
    L.append("DES-MoE phases (steps): " + ", ".join(f"{k} [{v[0]}, {v[1]})" for k, v in ph.items()))
    if des.get("masks"):
        L.append("expert masks per domain (experts each domain's tokens may update), per layer:")
        for dom, layers in des["masks"].items():
            L.append(f"  {dom:<12} " + "  ".join(f"L{l}:{{{','.join(map(str, ex))}}}" for l, ex in enumerate(layers)))
    hdr = f"  {'held-out loss':<14}{'base':>8}{'DES-MoE':>9}" + (f"{'FFT':>8}" if fft else "")
    L.append(hdr)
    for dom, r in des["eval_before"]["domains"].items():
        row = f"  {dom:<14}{r['loss']:>8.3f}{des['eval_after']['domains'][dom]['loss']:>9.3f}"
        if fft:
            row += f"{fft['eval_after']['domains'][dom]['loss']:>8.3f}"
        if dom == "general":
            row += "   <- forgetting probe (lower = forgot less)"
        L.append(row)
    if des.get("phase_timing"):
        tp = ", ".join(f"{k} {v['tokens_per_s']:.0f}" for k, v in des["phase_timing"].items())
        L.append(f"training tokens/s (CPU, this machine): DES-MoE {tp}"
                 + (f"; FFT {fft['tokens_per_s']:.0f}" if fft else ""))
    if des.get("plot"):
        L.append(f"affinity/mask heatmap: {des['plot']}")
    L.append(f"checkpoints: {des['checkpoint']}" + (f", {fft['checkpoint']}" if fft else ""))
    L.append(f"total {seconds:.0f}s")
    return "\n".join(L)


def cmd_parity(a) -> int:
    from .integrations.parity import parity_rows, print_parity

    rows = parity_rows(a.model_types or None)
    print_parity(rows)
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_experiment(a) -> int:
    from .experiments import EXPERIMENTS, load_spec, run_experiment

    if a.name not in EXPERIMENTS + ("all", "sweep"):
        raise ValueError(f"experiment name must be one of {', '.join(EXPERIMENTS)}, all (the paper-claim experiments) "
                         f"or sweep (the same over several bases), got {a.name!r}")
    from .train.config import check_output_dir

    check_output_dir("--out", a.out)
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if a.name == "sweep":
        from .experiments.sweep import load_sweep, run_sweep

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

    from .export import export, format_report
    from .train.config import check_device_available

    check_device_available("--device", a.device)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = export(a.checkpoint, a.out, fit_tokens=a.fit_tokens, eval_tokens=a.eval_tokens,
                     min_agreement=a.min_agreement, on_low=a.on_low, overwrite=a.overwrite, device=a.device,
                     dtype=a.dtype, max_shard_size=_shard_size(a.max_shard_size))
    if a.format == "json":
        print(json.dumps(rep, indent=1))
    else:
        print(f"exported {rep['checkpoint']} -> {rep['out_dir']} (stock Hugging Face model)")
        print(format_report(rep))
    for w in caught:
        if "exported routers" in str(w.message) or "differs from the config checkpoint" in str(w.message):
            print(f"desmoe export: warning: {w.message}", file=sys.stderr)
    return 0


def cmd_specialization(a) -> int:
    from .experiments.specialization import format_table, specialization_of_checkpoint
    from .train.config import check_device_available, check_output_file

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
    from .info import main as info_main

    return info_main(a.format, model=a.model, alr_expansion=a.alr_expansion)


def _cpu_threads(cmd: str) -> None:
    """One intra-op thread on CPU for the commands that train or evaluate the project's tiny models, unless
    OMP_NUM_THREADS says otherwise: their ops are too small to gain from a second thread, and two spinning OpenMP
    threads on a busy 2-core machine made the same run up to 20x slower (27.5 s vs 7.5 s measured)."""
    import torch

    if cmd in ("demo", "train", "eval", "export", "specialization", "experiment", "parity") \
            and not torch.cuda.is_available() and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    from .progress import quiet

    args = _parser().parse_args(argv)
    _quiet_transformers()
    _cpu_threads(args.cmd)
    from .train.numerics import flush_denormals

    flush_denormals()  # subnormal floats slow CPU training up to 5x; flushing them changes nothing kept (numerics.py)
    fn = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo,
          "experiment": cmd_experiment, "parity": cmd_parity, "info": cmd_info,
          "export": cmd_export, "specialization": cmd_specialization}[args.cmd]
    from .train.signals import Interrupted

    try:
        with quiet(getattr(args, "quiet", False)):
            return fn(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"desmoe {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system (read-only, full, a file in the way): the message names the path
        print(f"desmoe {args.cmd}: error: {e.strerror or e}" + (f": {e.filename!r}" if e.filename else ""),
              file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"desmoe {args.cmd}: stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"desmoe {args.cmd}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
