"""Every random number generator a training step may draw from, captured and restored (exact resume).

States are tensors, ints, floats and strings only, so a checkpoint holding them loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    """Every RNG a training step may draw from: python, numpy (if installed), torch CPU, all CUDA devices; as
    tensors, ints, floats and strings only (loadable with ``weights_only=True``)."""
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "numpy": None}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        st["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    except ImportError:
        pass
    return st


def set_rng_state(st: dict) -> None:
    if st.get("python") is not None:
        random.setstate(st["python"])
    if st.get("numpy") is not None:
        import numpy as np

        n = st["numpy"]
        if isinstance(n, dict):
            n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        np.random.set_state(n)
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        # a resume on fewer/more GPUs restores what matches (CUDA RNG is per device)
        cur = torch.cuda.device_count()
        states = list(st["cuda"])[:cur]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)
