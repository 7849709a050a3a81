"""``desmoe demo``: a tiny qwen3_moe base pretrained on the built-in domains (cached), then DES-MoE and full
fine-tuning (FFT) on math/code/law, and a report of held-out losses (``general``: the forgetting probe). An
interrupted demo continues where it stopped when the same command runs again."""
from __future__ import annotations

import json
import os
import sys
import time

DEMO_DOMAINS = ["math", "code", "law"]


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
    from ..train import checkpoint as ck
    from ..train import config_from_dict
    from ..train.rundir import RunDirError, clear_for_overwrite, config_differences

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
    from ..train import run
    from ..train.rundir import RunFinished

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
    from ..experiments.base import base_cache_path, prepare_base_cached
    from ..train import TrainingInterrupted, config_from_dict

    if a.steps < 5 or a.pretrain_steps < 1:
        raise ValueError(f"--steps must be >= 5 and --pretrain-steps >= 1, got {a.steps}, {a.pretrain_steps}")
    from ..train.config import check_output_dir

    check_output_dir("--out", a.out)
    t0 = time.time()
    progress = not a.quiet
    from ..train.rundir import prepare_run_dir

    prepare_run_dir(a.out)
    cache = os.path.join(a.out, "cache")
    base_kw = dict(aux_loss_coef=0.01, pretrain_mix=DEMO_PRETRAIN_MIX)
    base_path = base_cache_path(demo_base_config(), a.pretrain_steps, cache, **base_kw)
    runs = [(m, label, os.path.join(a.out, m)) for m, label in (("des_moe", "DES-MoE"), ("fft", "FFT"))
            if m == "des_moe" or not a.no_compare]
    plans = {m: _demo_plan(d, demo_finetune_config(base_path, m, a.steps), base_path, a.overwrite)
             for m, _, d in runs}  # before any work: nothing half-done
    if not a.no_parity:
        from ..integrations.parity import parity_rows, print_parity

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
