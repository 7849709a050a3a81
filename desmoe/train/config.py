"""Training configuration: dataclasses validated in ``__post_init__``, loaded from YAML, ``--set a.b=c`` overrides.

Every validation error is a ``ValueError`` naming the dotted field (``train.lr``, ``data.domains`` ...), the
value and what is expected. Every field is first checked against its annotation (an ``int`` field takes an int,
a ``float`` field a finite number, never NaN/inf, a bool field true/false), every int against its bounds
(:data:`INT_BOUNDS`), then each section checks its ranges.

The section dataclasses are in :mod:`desmoe.train.sections`, the field and path checks in
:mod:`desmoe.train.checks`; this module is the face of all three (``from desmoe.train.config import X``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..method.config import MethodConfig
from .checks import (DISTRIBUTED, DTYPES, INT_BOUNDS, LR_SCHEDULES, _TOKENIZER_FILES, _max_positions,
                     _pretrained_config, check_device, check_device_available, check_field_types, check_model_dir,
                     check_output_dir, check_output_file, check_overrides, has_tokenizer_files,
                     looks_like_local_path)
from .sections import DataConfig, ModelConfig, TokenizerConfig, TrainConfig

__all__ = ["Config", "ModelConfig", "TokenizerConfig", "DataConfig", "TrainConfig", "MethodConfig",
           "config_from_dict", "apply_overrides", "read_yaml", "load_config", "LR_SCHEDULES", "DTYPES",
           "DISTRIBUTED", "INT_BOUNDS", "check_device", "check_device_available", "check_output_file",
           "check_output_dir", "check_field_types", "looks_like_local_path", "check_model_dir",
           "has_tokenizer_files", "check_overrides"]


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        """Checks across sections, before any work: the model's context against ``data.seq_len``, the tokenizer
        files of a local ``model.path`` / ``tokenizer.path``."""
        m = self.model
        conf, where = None, None
        if m.tiny is not None:
            from ..integrations.tiny import tiny_config

            conf, where = tiny_config(m.tiny, **m.overrides), f"the tiny {m.tiny} model"
        elif os.path.isfile(os.path.join(os.path.expanduser(m.path), "config.json")):
            conf, where = _pretrained_config(os.path.expanduser(m.path)), f"model.path {m.path!r}"
            for k, v in m.overrides.items():
                setattr(conf, k, v)
        limit = _max_positions(conf) if conf is not None else None
        if limit is not None and self.data.seq_len > limit:
            src = "model.overrides.max_position_embeddings" if "max_position_embeddings" in m.overrides else where
            raise ValueError(f"data.seq_len={self.data.seq_len} is longer than the model's context "
                             f"(max_position_embeddings={limit}, from {src}); expected data.seq_len <= {limit}"
                             + (" (or raise model.overrides.max_position_embeddings)" if m.tiny else ""))
        tok_dir = self.tokenizer.path or m.path
        if tok_dir is not None and os.path.isdir(os.path.expanduser(tok_dir)) \
                and not has_tokenizer_files(os.path.expanduser(tok_dir)):
            field_name = "tokenizer.path" if self.tokenizer.path else "model.path"
            raise ValueError(
                f"{field_name}: the directory {tok_dir!r} has no tokenizer files "
                f"(none of {', '.join(_TOKENIZER_FILES)})"
                + ("; set tokenizer.path to a tokenizer directory (e.g. the one the model was trained with)"
                   if field_name == "model.path" else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "method": MethodConfig,
             "train": TrainConfig}


def config_from_dict(d: dict, *, source: str = "config") -> Config:
    """Build and validate a :class:`Config`; unknown sections/keys raise ``ValueError`` naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
    unknown = set(d) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    if "model" not in d:
        raise ValueError(f"{source}: missing section 'model' (set model.tiny or model.path)")
    kw = {}
    for name, cls in _SECTIONS.items():
        sec = d.get(name) or {}
        if not isinstance(sec, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {type(sec).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(sec) - fields
        if bad:
            raise ValueError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in sorted(bad))}; "
                             f"valid keys: {', '.join(sorted(fields))}")
        check_field_types(name, cls, sec)
        try:
            kw[name] = cls(**sec)
        except TypeError as e:
            raise ValueError(f"{source}: section {name!r}: {e}") from None
    return Config(**kw)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` (value parsed as YAML, as :func:`read_yaml` reads a file: ``1e-5`` is a float)
    to the nested dict ``d`` in place; returns it."""
    import yaml

    from . import yamlio

    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. method.phi=0.5), got {item!r}")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"--set key must be section.key (e.g. train.lr), got {key!r}")
        cur = d
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
            cur = nxt
        try:
            cur[parts[-1]] = yamlio.load(val)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key}: {val!r} is not a valid YAML value: {e}") from None
    return d


def read_yaml(path: str, what: str = "config file"):
    """The YAML document at ``path`` (``{}`` when empty); ``what`` names the file in the errors. Floats as
    YAML 1.2 and Python write them (``1e-5``, ``1E+3``, ``.5``: :mod:`desmoe.train.yamlio`)."""
    import yaml

    from . import yamlio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    with open(path) as f:
        try:
            return yamlio.load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {path!r} is not valid YAML: {e}") from None


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Read YAML ``path``, apply ``--set`` overrides, validate."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides or []), source=path)
