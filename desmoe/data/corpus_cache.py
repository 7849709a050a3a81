"""Where the built-in domains' parsed corpora are kept: a per-machine cache, and an experiment's pinned snapshot.

The cache (``<cache>/corpora/<domain>-<signature>.json``) is keyed by a hash of the source file list (paths, sizes,
mtimes), so a second load takes well under a second and an installed or removed file rebuilds the domain. A
snapshot folder named by ``$DESMOE_CORPORA_PIN`` (:data:`PIN_ENV`) overrides it: once a domain is written there, it
is read from there whatever is installed later.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..progress import stage
from ._util import cache_root, read_json_cache, stable_hash, write_json_atomic

_CACHE_VERSION = 7
Doc = tuple  # (split_key, text)


def _signature(files: list[tuple[str, str]]) -> str:
    h = []
    for key, path in files:
        try:
            st = os.stat(path)
            h.append((key, st.st_size, int(st.st_mtime)))
        except OSError:
            h.append((key, -1, -1))
    return format(stable_hash(_CACHE_VERSION, h), "016x")


PIN_ENV = "DESMOE_CORPORA_PIN"


def cached_docs(domain: str, files: list[tuple[str, str]], build: Callable[[], list[Doc]]) -> list[Doc]:
    """The domain's documents: from the pinned snapshot ``$DESMOE_CORPORA_PIN/<domain>.json`` when that is set
    and holds one (an experiment's corpora stay fixed whatever is installed later: installing a package adds its
    description to ``general`` and its licence to ``law``), else from the per-machine cache keyed by the file
    list, built when missing (and copied into the snapshot folder when one is set)."""
    pin = os.environ.get(PIN_ENV)
    if pin:
        pinned = Path(pin) / f"{domain}.json"
        docs = read_json_cache(pinned)
        if isinstance(docs, list):
            return [tuple(d) for d in docs]
        docs = _built(domain, files, build)
        pin_write(pinned, docs)
        return docs
    return _built(domain, files, build)


def pin_write(path: Path, docs: list) -> None:
    """Write a pinned snapshot atomically; unlike the per-machine cache, a snapshot that cannot be written is an
    error (the experiment would silently read whatever is installed next time)."""
    import json
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(docs, f, ensure_ascii=False)
    os.replace(tmp, path)


def _built(domain: str, files: list[tuple[str, str]], build: Callable[[], list[Doc]]) -> list[Doc]:
    path = cache_root() / "corpora" / f"{domain}-{_signature(files)}.json"
    docs = read_json_cache(path)
    if isinstance(docs, list):
        return [tuple(d) for d in docs]
    with stage(f"building the built-in '{domain}' corpus from {len(files)} installed files "
               f"(once; cached in {path.parent})"):
        docs = build()
    write_json_atomic(path, docs)
    for old in path.parent.glob(f"{domain}-*.json"):  # corpora of older file lists / versions
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass
    return docs

