"""A small-scale replication of the DES-MoE paper's claims: ``desmoe experiment NAME --out DIR``.

A tiny MoE is pretrained once on ``general`` (cached), then fine-tuned on the built-in domains by every method
with the same steps, data order and LR-search budget; results.json + PNG plots per experiment.
"""
from .experiments import EXPERIMENTS, run_experiment
from .runner import TRAINER_METHOD, aggregate, finetune_config, run_cell, run_cells, run_one
from .spec import ExperimentSpec, load_spec

METHOD_NAMES = tuple(TRAINER_METHOD)

__all__ = ["EXPERIMENTS", "METHOD_NAMES", "ExperimentSpec", "aggregate", "finetune_config", "load_spec",
           "run_cell", "run_cells", "run_experiment", "run_one"]
