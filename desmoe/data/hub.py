"""Hugging Face names (``org/name``) for models, tokenizers and datasets: fail fast, naming the config field.

``transformers`` and ``datasets`` retry an unreachable hub for 25-50 s and then blame whatever they were loading.
Before either is asked, :func:`check_hub_name` answers from the local cache, honours ``HF_HUB_OFFLINE`` (no
network at all), and otherwise makes one short request: a name that cannot be had becomes one clear error naming
the field (``model.path``, ``tokenizer.path``, ``data.sources.X``) within seconds.
"""
from __future__ import annotations

import os
import re

from .builtin import DataSourceError

_TRUE = ("1", "true", "yes", "on")
LOCAL_EXTS = (".json", ".jsonl", ".parquet", ".txt")


def is_hub_name(s: str) -> bool:
    """``org/name`` (optionally ``org/name:config``) as Hugging Face names datasets and models; a name ending in
    a data-file extension is a (missing) file, not a hub name."""
    return isinstance(s, str) and bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?", s)) \
        and not s.lower().endswith(LOCAL_EXTS)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is set."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except Exception:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def is_cached(name: str, repo_type: str = "model") -> bool:
    """Whether the hub cache (or ``datasets``' own cache) holds ``name``."""
    repo = name.split(":", 1)[0]
    org_name = repo.replace("/", "--")
    if os.path.isdir(os.path.join(_hub_cache(), f"{repo_type}s--{org_name}")):
        return True
    if repo_type == "dataset":
        try:
            import datasets

            root = datasets.config.HF_DATASETS_CACHE
        except Exception:
            root = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "datasets")
        return os.path.isdir(os.path.join(str(root), repo.replace("/", "___")))
    return False


def check_hub_name(name: str, field: str, repo_type: str = "model", timeout: float = 10.0) -> None:
    """Raise :class:`DataSourceError` naming ``field`` unless hub ``name`` is cached or reachable.

    One request at most (``timeout`` seconds); none under ``HF_HUB_OFFLINE``."""
    kind = "dataset" if repo_type == "dataset" else "model"
    if is_cached(name, repo_type):
        return
    get = f"`hf download {name.split(':', 1)[0]}{' --repo-type dataset' if kind == 'dataset' else ''}`"
    fix = (f"download it where there is network ({get}) and copy the Hugging Face cache here, or set {field} to a "
           f"local {'file or directory' if kind == 'dataset' else 'directory'}")
    if hub_offline():
        raise DataSourceError(f"{field}: {name!r} is not an existing local path and not in the Hugging Face cache "
                              f"({_hub_cache()}), and HF_HUB_OFFLINE is set, so it cannot be downloaded; {fix}")
    try:
        from huggingface_hub import HfApi

        HfApi().repo_info(name.split(":", 1)[0], repo_type=repo_type, timeout=timeout)
    except Exception as e:  # the hub client's exception classes differ across versions: judge by name
        cls = type(e).__name__
        if "RepositoryNotFound" in cls:
            raise DataSourceError(f"{field}: {name!r} is not an existing local path, and the Hugging Face hub has "
                                  f"no {kind} of that name (or it is private); check the path or the name") from None
        if "GatedRepo" in cls:
            raise DataSourceError(f"{field}: the {kind} {name!r} is gated: accept its terms on huggingface.co and "
                                  f"log in (`hf auth login`), or {fix}") from None
        if "HTTP" in cls and "404" not in str(e):
            raise DataSourceError(f"{field}: the Hugging Face hub refused {name!r} ({cls}: {str(e)[:200]}); {fix}") \
                from None
        raise DataSourceError(f"{field}: {name!r} is not an existing local path, not in the Hugging Face cache, and "
                              f"the hub cannot be reached ({cls}: {str(e)[:200]}); {fix} (set HF_HUB_OFFLINE=1 to use "
                              f"the cache only)") from None


def is_model_hub_name(s: str) -> bool:
    """A model or tokenizer name the hub may hold: ``org/name`` or a legacy bare id (``gpt2``)."""
    return isinstance(s, str) and bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", s)) and s not in (".", "..")


def check_config_hub_names(cfg, *, data_only: bool = False) -> None:
    """Every hub name a training config refers to (``model.path``, ``tokenizer.path``, ``data.sources``) is
    cached or reachable; called before a run loads anything (``data_only``: a resume, whose model and tokenizer
    come from the checkpoint). A bare model id (``gpt2``) counts too: transformers would otherwise retry it for
    up to a minute; anything else that is not a local path is an error naming the field."""
    models = () if data_only else (("model.path", cfg.model.path), ("tokenizer.path", cfg.tokenizer.path))
    for field, name in models:
        if name and not os.path.exists(os.path.expanduser(name)):
            if not is_model_hub_name(name):
                raise DataSourceError(f"{field}: {name!r} does not exist as a local directory and is not a Hugging "
                                      f"Face name (org/name); expected a model directory")
            check_hub_name(name, field, "model")
    for d, src in cfg.data.sources.items():
        if not os.path.exists(os.path.expanduser(src)) and is_hub_name(src):
            check_hub_name(src, f"data.sources.{d}", "dataset")
