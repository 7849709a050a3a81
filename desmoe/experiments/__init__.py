"""A small-scale test of the DES-MoE paper's claims: ``desmoe experiment NAME --out DIR``.

A fine-grained DeepSeek-style MoE is pretrained once (cached), then fine-tuned on the built-in domains by every
method over an LR grid and seeds, paired (same data order and initial weights per seed); choices are made on the
validation split and the test split is reported (``pareto``, ``scaling``; results.json + PNG plots each).
"""
from .experiments import EXPERIMENTS, run_experiment
from .methods import TRAINER_METHOD
from .runner import aggregate, finetune_config, run_jobs, run_one
from .spec import ExperimentSpec, load_spec

METHOD_NAMES = tuple(TRAINER_METHOD)

__all__ = ["EXPERIMENTS", "METHOD_NAMES", "ExperimentSpec", "aggregate", "finetune_config", "load_spec",
           "run_experiment", "run_jobs", "run_one"]
