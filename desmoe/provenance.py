"""Where a result came from: package versions and the git state of the source tree (one helper for the
training runs and the experiments)."""
from __future__ import annotations

import os
import platform
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions(*modules: str) -> dict:
    """``{"python": ..., module: its __version__ or None}`` for each named module."""
    out = {"python": platform.python_version()}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def git_state(root: str = _ROOT) -> tuple[str | None, bool | None]:
    """``(HEAD sha, whether tracked files differ from it)`` of the checkout at ``root``; ``(None, None)`` when it
    is not a git checkout or git is missing."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        if sha is None:
            return None, None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None
