"""The ``desmoe`` argument parser: one subcommand per command, its flags and their help."""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
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
    ex.add_argument("--layer-by-layer", action="store_true",
                    help="keep the model in host memory and run one decoder layer on --device at a time (fit, "
                         "agreement, held-out losses); for models larger than the device")
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
