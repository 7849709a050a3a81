"""Progress for every step that can take more than a couple of seconds: what it is doing, its rate and an ETA.

``bar(iterable, desc)`` is a tqdm bar on stderr (rate and ETA when the length is known); ``stage(desc)`` brackets
opaque work (a Rust tokenizer trainer, a one-off corpus build) with a start line and a "done in N s" line.
``quiet()`` silences both for the block it wraps (the CLI's ``--quiet``); ``DESMOE_QUIET=1`` does the same for a
whole process. The switch is a context variable, so library callers and threads outside the block are unaffected.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time

_QUIET = contextvars.ContextVar("desmoe_quiet", default=False)


@contextlib.contextmanager
def quiet(on: bool = True):
    """Silence progress bars and stage lines inside the block (when ``on``)."""
    token = _QUIET.set(bool(on) or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet() -> bool:
    return _QUIET.get() or os.environ.get("DESMOE_QUIET") == "1"


def bar(it, desc: str, *, total: int | None = None, unit: str = "it", enabled: bool = True, leave: bool = True):
    """``it`` wrapped in a progress bar (rate, ETA) unless disabled, quiet, or tqdm is missing."""
    if not enabled or is_quiet():
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=leave, file=sys.stderr,
                mininterval=0.5)


@contextlib.contextmanager
def stage(desc: str, *, enabled: bool = True):
    """``desc ...`` now and ``desc: done in N s`` at the end (stderr), unless quiet."""
    show = enabled and not is_quiet()
    t0 = time.time()
    if show:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if show:
        print(f"{desc}: done in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
