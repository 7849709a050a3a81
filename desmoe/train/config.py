"""Training configuration: dataclasses validated in ``__post_init__``, loaded from YAML, ``--set a.b=c`` overrides.

Every validation error is a ``ValueError`` naming the dotted field (``train.lr``, ``data.domains`` ...), the
value and what is expected. Every field is first checked against its annotation (an ``int`` field takes an int,
a ``float`` field a finite number, never NaN/inf, a bool field true/false), every int against its bounds
(:data:`INT_BOUNDS`), then each section checks its ranges.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

from ..data.hub import LOCAL_EXTS, is_hub_name
from ..method.config import MethodConfig

LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DISTRIBUTED = ("none", "ddp", "fsdp2")
_DEVICE_RE = re.compile(r"(auto|cpu|cuda(:\d{1,3})?)")
_BIG = 10**9
# inclusive [lo, hi] of every int field (beyond these a run aborts, exhausts memory or never ends)
INT_BOUNDS = {
    "model.seed": (0, 2**63 - 1), "data.seed": (0, 2**63 - 1),
    "tokenizer.vocab_size": (260, 1 << 20),
    "data.max_docs": (1, _BIG), "data.eval_max_docs": (1, _BIG), "data.seq_len": (8, 1 << 20),
    "data.batch_size": (1, 1 << 16),
    "train.max_steps": (1, _BIG), "train.warmup_steps": (0, _BIG), "train.grad_accum": (1, 1 << 16),
    "train.log_every": (1, _BIG), "train.save_every": (0, _BIG), "train.eval_batches": (1, 1 << 20),
    "train.pretrain_steps": (0, _BIG), "train.keep_last": (0, 1 << 20), "train.val_batches": (0, 1 << 20),
    "train.val_every": (0, _BIG), "train.activation_checkpointing": (0, 1 << 20),
    "method.alr_expansion": (1, 64), "method.update_every": (1, _BIG), "method.esft_batches": (1, 1 << 20),
}


_EXPECT = {"train.device": "auto, cpu, cuda or cuda:N", "train.bf16": "auto, true or false"}


def _bad(field_name, expected, got):
    raise ValueError(f"{field_name} must be {expected}, got {got!r}")


def _int(name, v, lo=None):
    if isinstance(v, bool) or not isinstance(v, int):
        _bad(name, "an int", v)
    lo_b, hi_b = INT_BOUNDS.get(name, (lo, None))
    lo = lo if lo is not None else lo_b
    if lo is not None and v < lo:
        _bad(name, f">= {lo}", v)
    if hi_b is not None and v > hi_b:
        _bad(name, f"<= {hi_b}", v)


def _number(name, v, *, lo=None, hi=None, lo_open=False, hi_open=False, none_ok=False):
    """A finite int/float in the given range (``lo_open``: excluded)."""
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _bad(name, "a finite number" + (" or null" if none_ok else ""), v)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open or hi is None else ']'}"
        _bad(name, f"in {rng}", v)


def check_device(name: str, v) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(v, str) or not _DEVICE_RE.fullmatch(v):
        _bad(name, "auto, cpu, cuda or cuda:N", v)
    return v


def check_device_available(name: str, v) -> str:
    """:func:`check_device`, and a ``cuda`` device must exist here (checked before any work)."""
    check_device(name, v)
    if v.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{name} {v!r}: no CUDA device is available on this machine (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); expected cpu or auto")
        if ":" in v and int(v.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"{name} {v!r}: this machine has {torch.cuda.device_count()} CUDA device(s); expected "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return v


def check_output_file(name: str, path) -> str:
    """An output file named by a flag (``--json FILE``): checked before the work it records, so a bad target
    never throws the work away. Its directory must exist and take a new file; the path must not be a directory."""
    import tempfile

    if not isinstance(path, str) or not path.strip():
        _bad(name, "a file path", path)
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        raise ValueError(f"{name} {path!r} is a directory; expected a file path "
                         f"(e.g. {os.path.join(path, 'results.json')!r})")
    if os.path.exists(p) and not os.path.isfile(p):
        raise ValueError(f"{name} {path!r} exists and is not a regular file; expected a file path")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        what = "is a file" if os.path.exists(parent) else "does not exist"
        raise FileNotFoundError(f"{name} {path!r}: its directory {os.path.dirname(p) or '.'!r} {what}; expected an "
                                f"existing directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".desmoe-write-check-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{name} {path!r}: cannot write in {parent!r} ({e.strerror or e})") from None
    if os.path.isfile(p) and not os.access(p, os.W_OK):
        raise PermissionError(f"{name} {path!r} exists and is not writable")
    return path


def check_output_dir(name: str, path) -> str:
    """An output directory named by a flag: not a file, not under a file, and (where it exists) writable."""
    if not isinstance(path, str) or not path.strip():
        _bad(name, "a directory path", path)
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{name} {path!r} is a file; expected a directory")
    q = p
    while not os.path.exists(q):
        q = os.path.dirname(q)
    if not os.path.isdir(q):
        raise ValueError(f"{name} {path!r}: {q!r} is a file, so the directory cannot be made under it")
    return path


def _kinds(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (typing.get_origin(hint) or hint,)


def check_field_types(section: str, cls, values: dict) -> None:
    """Each value against its field's annotation: ``int`` (not bool, within :data:`INT_BOUNDS`), ``float`` (a
    finite int/float), ``bool``, ``str``, ``dict``, ``list``, ``None`` where the annotation allows it."""
    hints = typing.get_type_hints(cls)
    names = {"int": "an int", "float": "a finite number", "bool": "true or false", "str": "a string",
             "dict": "a mapping", "list": "a list", "NoneType": "null"}
    for k, v in values.items():
        if k not in hints:
            continue
        kinds = _kinds(hints[k])
        ok = False
        for t in kinds:
            if t is type(None):
                ok = v is None
            elif t is bool:
                ok = isinstance(v, bool)
            elif t is int:
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif t is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            else:
                ok = isinstance(v, t)
            if ok:
                break
        if not ok and f"{section}.{k}" in _EXPECT:
            _bad(f"{section}.{k}", _EXPECT[f"{section}.{k}"], v)
        if not ok:
            expected = " or ".join(names.get(getattr(t, "__name__", str(t)), str(t)) for t in kinds)
            if str in kinds and isinstance(v, (bool, int, float)):  # a name like 1e5 or yes, read as a number/bool
                raise ValueError(f"{section}.{k} must be {expected}, got {v!r} (YAML read the value as a "
                                 f"{type(v).__name__}; quote text that looks like a number or boolean)")
            _bad(f"{section}.{k}", expected, v)
        if isinstance(v, int) and not isinstance(v, bool) and f"{section}.{k}" in INT_BOUNDS:
            _int(f"{section}.{k}", v)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "vocab.txt")


def looks_like_local_path(s: str) -> bool:
    """A name that can only mean a local path: it starts with ``/``, ``./``, ``../`` or ``~``, has more than one
    path separator, or its first component is an existing local directory (``data/x`` where ``data/`` exists).
    ``org/name`` and a bare ``name`` may be Hugging Face names."""
    s = str(s)
    if s.startswith(("/", "./", "../", "~", ".\\")) or s in (".", ".."):
        return True
    parts = re.split(r"[\\/]", s)
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_model_dir(name: str, path: str) -> None:
    """``model.path`` / ``tokenizer.path``: a missing local path is named as such (not sent to the hub); an
    existing one must be a directory."""
    p = os.path.expanduser(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise ValueError(f"{name}: {path!r} is a file; expected a model directory (config.json, *.safetensors, "
                             f"tokenizer files) or a Hugging Face name")
        return
    if looks_like_local_path(path):
        raise ValueError(f"{name}: directory {path!r} does not exist (a local path; expected a directory "
                                f"holding config.json, *.safetensors and the tokenizer files)")


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _pretrained_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model.path: {os.path.join(path, 'config.json')!r} is not a usable model config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _max_positions(conf):
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    v = getattr(text, "max_position_embeddings", None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def check_overrides(overrides: dict, model_config, source: str) -> None:
    """``model.overrides`` keys must be attributes of the model's config (a typo would otherwise be written into
    the config silently), and a value must have the type of the config's own (int/float/bool) default."""
    for k, v in overrides.items():
        if not isinstance(k, str) or not hasattr(model_config, k):
            raise ValueError(f"model.overrides: {k!r} is not an attribute of the {source} config "
                             f"({type(model_config).__name__}); check the spelling against its config.json")
        cur = getattr(model_config, k)
        if isinstance(cur, bool):
            ok = isinstance(v, bool)
        elif isinstance(cur, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(cur, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = True
        if not ok:
            tn = type(cur).__name__
            article = "an" if tn[0] in "aeiou" else "a"
            _bad(f"model.overrides.{k}", f"{article} {tn} like the config's default {cur!r}", v)


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
