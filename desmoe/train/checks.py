"""Validation helpers of the training config (:mod:`desmoe.train.config`) and of the CLI's flags.

Typed-field checks (:func:`check_field_types`: every field against its annotation, every int against
:data:`INT_BOUNDS`; ``_int`` / ``_number`` for ranges), each a ``ValueError`` naming the dotted field, the value and
what is expected; the checks of flags and paths made before any work (a device that exists, an output file or
directory that can be written, a model directory, ``model.overrides`` keys against the model's config).
"""
from __future__ import annotations

import math
import os
import re
import types
import typing

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

