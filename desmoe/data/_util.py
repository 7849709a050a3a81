"""Small deterministic helpers shared by the data modules: stable hashing, split assignment, an on-disk cache.

Everything here is independent of Python's randomised ``hash`` and of numpy/torch RNG versions, so splits and
streams are identical across machines, processes and library versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SPLITS = ("train", "validation", "test")
TEST_BUCKETS = 10  # keys hash into 10 buckets: bucket 0 is test (~10%), bucket 1 validation (~10%), the rest train
HELDOUT_SEED = 0  # held-out (validation/test) subsets are drawn with this seed, whatever the training seed
_MASK64 = (1 << 64) - 1


def stable_hash(*parts: object) -> int:
    """64-bit hash of the parts' string forms (blake2b): the same on every machine and run."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little")


def split_of(key: str) -> str:
    """The split of a document, fixed by hashing its key (file path, problem id, ...): 'test' for hash bucket 0
    (~10%, the same documents as when there were only two splits), 'validation' for bucket 1 (~10%), else 'train'."""
    bucket = stable_hash("desmoe-split", key) % TEST_BUCKETS
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def check_split(split: str, name: str = "split") -> str:
    if split not in SPLITS:
        raise ValueError(f"{name} must be one of {SPLITS}, got {split!r}")
    return split


def split_seed(split: str, seed: int) -> int:
    """The subset seed for ``split``: the training seed for 'train', :data:`HELDOUT_SEED` for the held-out splits,
    so every training seed is evaluated on the same held-out documents."""
    return seed if check_split(split) == "train" else HELDOUT_SEED


def splitmix64(x: int) -> int:
    """One step of SplitMix64: a tiny counter-based RNG whose state is a plain int (JSON-able)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform01(*key: object) -> float:
    """A uniform float in [0, 1) that is a pure function of ``key``."""
    return (splitmix64(stable_hash(*key)) >> 11) / float(1 << 53)


def permutation(n: int, *key: object) -> list[int]:
    """A Fisher-Yates permutation of range(n) that is a pure function of ``key`` (own RNG: version-stable)."""
    perm = list(range(n))
    state = stable_hash("perm", *key)
    for i in range(n - 1, 0, -1):
        state = splitmix64(state)
        j = state % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def seeded_subset(items: list, max_items: int | None, seed: int, *key: object) -> list:
    """The first ``max_items`` of a seeded shuffle of ``items`` (all of them, in order, when None)."""
    if max_items is None:
        return list(items)
    if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 0:
        raise ValueError(f"max_docs must be a non-negative int or None, got {max_items!r}")
    if max_items >= len(items):
        return list(items)
    perm = permutation(len(items), "subset", seed, *key)
    return [items[i] for i in sorted(perm[:max_items])]


def cache_root() -> Path:
    """Cache directory: $DESMOE_CACHE_DIR, else ~/.cache/desmoe."""
    env = os.environ.get("DESMOE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "desmoe"


def read_json_cache(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temp file + rename so concurrent readers never see a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    except OSError:  # an unwritable cache only costs speed
        pass
