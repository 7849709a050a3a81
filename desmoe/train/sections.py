"""The sections of the training config: ``model``, ``tokenizer``, ``data``, ``train`` (``method`` is
:class:`desmoe.method.config.MethodConfig`). Each dataclass validates itself in ``__post_init__``: first every field
against its annotation (:func:`desmoe.train.checks.check_field_types`), then its ranges; a ``ValueError`` names the
dotted field. :class:`desmoe.train.config.Config` holds them and checks across sections.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..data.hub import LOCAL_EXTS, is_hub_name
from .checks import (DISTRIBUTED, DTYPES, LR_SCHEDULES, _bad, _int, _number, _pretrained_config, check_device,
                     check_field_types, check_model_dir, check_overrides, looks_like_local_path)


@dataclass
class ModelConfig:
    """Either ``tiny: <model_type>`` (random init; ``overrides`` are config keys) or ``path`` (local directory
    or Hugging Face name, loaded with ``from_pretrained``, no downloads unless already cached)."""

    tiny: str | None = None
    path: str | None = None
    overrides: dict = field(default_factory=dict)
    backend: str = "auto"
    dtype: str = "float32"
    pure_dtype: bool = False
    seed: int = 0

    @property
    def param_dtype(self) -> str:
        """The parameters' dtype: ``dtype: bfloat16`` means bf16 *compute* (autocast) over float32 master weights
        and float32 AdamW state, unless ``pure_dtype: true`` (parameters and optimizer state in bf16: updates
        below half an ulp are lost; warned at build). ``float16`` keeps float16 parameters (no autocast + loss
        scaling path), warned the same way."""
        return "float32" if self.dtype == "bfloat16" and not self.pure_dtype else self.dtype

    def __post_init__(self):
        check_field_types("model", ModelConfig, vars(self))
        if (self.tiny is None) == (self.path is None):
            raise ValueError(f"model: set exactly one of model.tiny (a model_type) or model.path, "
                             f"got tiny={self.tiny!r}, path={self.path!r}")
        if self.tiny is not None:
            from ..integrations.tiny import tiny_model_types

            if self.tiny not in tiny_model_types():
                _bad("model.tiny", f"one of {tiny_model_types()}", self.tiny)
        if not isinstance(self.overrides, dict):
            _bad("model.overrides", "a mapping of config keys", self.overrides)
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            _bad("model.path", "a local model directory or a Hugging Face name (org/name)", self.path)
        if self.path is not None:
            check_model_dir("model.path", self.path)
        if self.overrides:
            if self.tiny is not None:
                from ..integrations.tiny import tiny_config

                check_overrides(self.overrides, tiny_config(self.tiny), f"tiny {self.tiny}")
                from .modelcheck import check_tiny_overrides

                check_tiny_overrides(self.tiny, self.overrides)  # buildable, has MoE layers, runs (names the key)
            elif os.path.isfile(os.path.join(self.path, "config.json")):
                from .modelcheck import check_pretrained_overrides

                conf = _pretrained_config(self.path)
                check_overrides(self.overrides, conf, repr(self.path))
                check_pretrained_overrides(self.path, conf, self.overrides)
        from ..ops import BACKENDS

        if self.backend not in BACKENDS:
            _bad("model.backend", f"one of {BACKENDS}", self.backend)
        if self.dtype not in DTYPES:
            _bad("model.dtype", f"one of {DTYPES}", self.dtype)
        if not isinstance(self.pure_dtype, bool):
            _bad("model.pure_dtype", "true or false", self.pure_dtype)
        _int("model.seed", self.seed)


@dataclass
class TokenizerConfig:
    """``path``: a saved tokenizer directory; else a byte-level BPE is trained on the training texts."""

    path: str | None = None
    vocab_size: int = 2048

    def __post_init__(self):
        check_field_types("tokenizer", TokenizerConfig, vars(self))
        _int("tokenizer.vocab_size", self.vocab_size, 260)
        if self.path is not None and not isinstance(self.path, str) or self.path == "":
            _bad("tokenizer.path", "a tokenizer directory, a Hugging Face name (org/name) or null", self.path)
        if self.path is not None:
            check_model_dir("tokenizer.path", self.path)


@dataclass
class DataConfig:
    """``domains``: fine-tuning domains (built-in names, or any name with a ``sources`` entry: a hub dataset or a
    local json/jsonl/parquet/text file). ``general``: the base model's domain, the forgetting probe.
    ``packing``: ``isolated`` (default: each document packed into a row attends only to itself, with positions
    from 0, where the model allows it, else a clear error at the first forward) or ``concatenated`` (documents
    of a row attend to the earlier ones of that row); see :mod:`desmoe.data.stream`."""

    domains: list = field(default_factory=lambda: ["math", "code", "law"])
    sources: dict = field(default_factory=dict)
    general: str | None = "general"
    max_docs: int | None = 400
    eval_max_docs: int | None = 64
    seq_len: int = 128
    batch_size: int = 8
    weights: dict | list | None = None
    text_field: str = "text"
    seed: int = 0
    packing: str = "isolated"

    def eval_domains(self) -> list[str]:
        """What a run evaluates: the fine-tuning domains, then ``general`` (the forgetting probe) when it is set and
        not one of them."""
        g = self.general
        return list(self.domains) + ([g] if g and g not in self.domains else [])

    def __post_init__(self):
        if isinstance(self.domains, str):
            self.domains = [self.domains]
        check_field_types("data", DataConfig, vars(self))
        if isinstance(self.domains, str):
            self.domains = [self.domains]
        if not isinstance(self.domains, list) or not self.domains or not all(isinstance(d, str) for d in self.domains):
            _bad("data.domains", "a non-empty list of domain names", self.domains)
        if len(set(self.domains)) != len(self.domains):
            _bad("data.domains", "a list without duplicates", self.domains)
        if not isinstance(self.sources, dict):
            _bad("data.sources", "a mapping domain -> dataset name or file", self.sources)
        from ..data import DOMAINS

        if self.general is not None and not self.general.strip():
            _bad("data.general", "a domain name or null (no forgetting probe)", self.general)
        if not self.text_field.strip():
            _bad("data.text_field", "a column name", self.text_field)
        from ..data.stream import PACKING_MODES

        if self.packing not in PACKING_MODES:
            _bad("data.packing", " or ".join(PACKING_MODES), self.packing)
        for d in self.domains + ([self.general] if self.general else []):
            if d not in DOMAINS and d not in self.sources:
                which = "data.general" if d == self.general and d not in self.domains else "data.domains"
                raise ValueError(f"{which}: {d!r} is not a built-in domain ({', '.join(DOMAINS)}) and has no "
                                 f"data.sources entry")
        for d, src in self.sources.items():
            if not isinstance(src, str) or not src:
                _bad(f"data.sources.{d}", "a dataset name or file path", src)
            p = os.path.expanduser(src)
            if os.path.exists(p) and not (os.path.isfile(p) or os.path.isdir(p)):
                raise ValueError(f"data.sources.{d}: {src!r} is not a regular file or directory (a named pipe, "
                                 f"socket or device would block or never end); expected a json/jsonl/parquet/txt "
                                 f"file or a directory of them")
            if not os.path.exists(p) and (looks_like_local_path(src) or not is_hub_name(src) and (
                    os.sep in src or src.startswith((".", "~")) or src.lower().endswith(LOCAL_EXTS))):
                raise ValueError(f"data.sources.{d}: local path {src!r} does not exist (expected a "
                                        f"json/jsonl/parquet/txt file or a directory, or a Hugging Face dataset "
                                        f"name org/name)")
        if self.max_docs is not None:
            _int("data.max_docs", self.max_docs, 1)
        if self.eval_max_docs is not None:
            _int("data.eval_max_docs", self.eval_max_docs, 1)
        _int("data.seq_len", self.seq_len, 8)
        _int("data.batch_size", self.batch_size, 1)
        if isinstance(self.weights, list) and len(self.weights) == len(self.domains):
            self.weights = dict(zip(self.domains, self.weights))
        if self.weights is not None and (not isinstance(self.weights, dict) or set(self.weights) != set(self.domains)
                                         or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0
                                                or not math.isfinite(w) for w in self.weights.values())):
            _bad("data.weights", f"a mapping {{domain: positive number}} over exactly {self.domains} (or a list "
                 f"in that order, or null for balanced mixing)", self.weights)


@dataclass
class TrainConfig:
    """Optimisation. ``max_steps`` = T (optimizer steps); ``pretrain_steps``: optional base pretraining on
    ``data.general`` before fine-tuning (for demos from a random init).

    ``save_every``: checkpoint period in steps (0: only at the end); ``keep_last``: keep the newest N checkpoints
    (0: all). ``skip_nonfinite``: a NaN/inf loss or gradient skips that batch (counted, logged) instead of
    stopping the run. ``distributed``: ``none``, ``ddp`` or ``fsdp2`` (launch with ``torchrun``);
    ``data.batch_size`` is per rank, so the global batch is ``batch_size × world_size``.

    Validation (model selection; the test split is only reported): ``val_batches`` > 0 loads the validation split
    of every evaluated domain (``data.eval_max_docs`` documents) and evaluates it before and after training
    (``val_before``/``val_after`` in ``summary.json``, as ``eval_before``/``eval_after``); ``val_every`` > 0
    also evaluates it every that many steps and after the last (``val/<domain>``, ``val/avg``, ``val/general`` in
    that step's ``history.jsonl`` row; not counted in training time). ``eval_cache``: a directory where the
    evaluations before training of a run starting from ``model.path`` are kept and reused (see
    :mod:`desmoe.train.evalcache`). ``activation_checkpointing``: 0 off, ``n`` recomputes every n-th decoder
    layer's activations in the backward (1: every layer) through transformers' activation checkpointing,
    non-reentrant unless ``activation_checkpointing_reentrant``."""

    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: str | bool = "auto"
    device: str = "auto"
    log_every: int = 10
    save_every: int = 0
    eval_batches: int = 4
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    plots: bool = True
    progress: bool = True
    keep_last: int = 0
    skip_nonfinite: bool = False
    distributed: str = "none"
    aux_loss: bool = True
    val_batches: int = 0
    val_every: int = 0
    eval_cache: str | None = None
    activation_checkpointing: int = 0
    activation_checkpointing_reentrant: bool = False

    def __post_init__(self):
        check_field_types("train", TrainConfig, vars(self))
        _int("train.max_steps", self.max_steps, 1)
        _number("train.lr", self.lr, lo=0.0, hi=10.0, lo_open=True)
        _number("train.pretrain_lr", self.pretrain_lr, lo=0.0, hi=10.0, lo_open=True)
        _number("train.min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
        if self.lr_schedule not in LR_SCHEDULES:
            _bad("train.lr_schedule", f"one of {LR_SCHEDULES}", self.lr_schedule)
        _int("train.warmup_steps", self.warmup_steps, 0)
        _number("train.weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        for n in ("beta1", "beta2"):
            _number(f"train.{n}", getattr(self, n), lo=0.0, hi=1.0, hi_open=True)
        _int("train.grad_accum", self.grad_accum, 1)
        _number("train.max_grad_norm", self.max_grad_norm, lo=0.0, lo_open=True, none_ok=True)
        if self.bf16 not in ("auto", True, False, "true", "false"):
            _bad("train.bf16", "auto, true or false", self.bf16)
        check_device("train.device", self.device)
        _int("train.log_every", self.log_every, 1)
        _int("train.save_every", self.save_every, 0)
        _int("train.eval_batches", self.eval_batches, 1)
        _int("train.pretrain_steps", self.pretrain_steps, 0)
        _int("train.keep_last", self.keep_last, 0)
        for n in ("skip_nonfinite", "plots", "progress"):
            if not isinstance(getattr(self, n), bool):
                _bad(f"train.{n}", "true or false", getattr(self, n))
        if self.distributed not in DISTRIBUTED:
            _bad("train.distributed", f"one of {DISTRIBUTED}", self.distributed)
        if not isinstance(self.aux_loss, bool):
            _bad("train.aux_loss", "true or false", self.aux_loss)
        _int("train.activation_checkpointing", self.activation_checkpointing, 0)
        if not isinstance(self.activation_checkpointing_reentrant, bool):
            _bad("train.activation_checkpointing_reentrant", "true or false", self.activation_checkpointing_reentrant)
        _int("train.val_batches", self.val_batches, 0)
        _int("train.val_every", self.val_every, 0)
        if self.val_every and not self.val_batches:
            raise ValueError(f"train.val_every={self.val_every} needs train.val_batches > 0 (the number of validation "
                             f"batches per evaluation), got train.val_batches={self.val_batches}")
        if self.eval_cache is not None and (not isinstance(self.eval_cache, str) or not self.eval_cache.strip()):
            _bad("train.eval_cache", "a directory path (a non-empty string) or null", self.eval_cache)

