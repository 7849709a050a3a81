"""Training entrypoint: ``python -m desmoe.train --config C.yaml --output-dir DIR`` (same as ``desmoe train``)."""
from .config import (Config, DataConfig, ModelConfig, TokenizerConfig, TrainConfig, apply_overrides, config_from_dict,
                     load_config)
from .checkpoint import CheckpointError
from .trainer import NonFiniteLossError, TrainingInterrupted, run

__all__ = ["Config", "DataConfig", "ModelConfig", "TokenizerConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "load_config", "run", "CheckpointError", "NonFiniteLossError", "TrainingInterrupted"]
