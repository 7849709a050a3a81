"""Training entrypoint: ``python -m desmoe.train --config C.yaml --output-dir DIR`` (same as ``desmoe train``)."""
from .config import (Config, DataConfig, ModelConfig, TokenizerConfig, TrainConfig, apply_overrides, config_from_dict,
                     load_config)
from .durable import CheckpointError
from .guards import NonFiniteLossError, TrainingInterrupted
from .trainer import Trainer, run

__all__ = ["Config", "DataConfig", "ModelConfig", "TokenizerConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "load_config", "run", "Trainer", "CheckpointError", "NonFiniteLossError",
           "TrainingInterrupted", "DesMoETrainer", "DesMoECallback", "StreamDataset", "DesMoESFTTrainer",
           "evaluate_checkpoint"]


def __getattr__(name):  # lazy: the adapter imports transformers.Trainer only when asked for
    if name in ("DesMoETrainer", "DesMoECallback", "StreamDataset"):
        from . import hf_trainer

        return getattr(hf_trainer, name)
    if name == "DesMoESFTTrainer":  # needs TRL (the `trl` extra)
        from .trl_trainer import DesMoESFTTrainer

        return DesMoESFTTrainer
    if name == "evaluate_checkpoint":
        from .evaluate import evaluate_checkpoint

        return evaluate_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
