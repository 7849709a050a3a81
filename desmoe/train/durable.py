"""Durable files: atomic writes, fsync of files and directories, content hashes, and the words for a failed write.

What every writer of a run directory builds on (:mod:`.checkpoint`, ``config.yaml``, ``latest``, ``desmoe export``):
a file is written to a temporary name, flushed and fsync'ed, then renamed over the old one, and the directory is
fsync'ed, so a crash leaves either the old file or the new one. :class:`CheckpointError` is the one error a bad or
unwritable checkpoint file becomes (raised here, in :mod:`.checkpoint`, :mod:`.safe_dcp` and :mod:`.rundir`).
"""
from __future__ import annotations

import hashlib
import os
import tempfile


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, unsafe to load, or does not match the run that wants to resume
    from it; or writing one failed (the message names the path)."""


def is_write_fault(e: BaseException) -> bool:
    """An exception a full disk / read-only or vanished directory raises from a writer: OSError, torch's zip
    writer (``RuntimeError: ... inline_container.cc ... unexpected pos`` / ``file write failed``), safetensors'
    ``SafetensorError`` (``No space left on device (os error 28)``)."""
    if isinstance(e, OSError):
        return True
    return type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("inline_container", "PytorchStreamWriter", "file write failed", "os error")))


def describe_error(e: BaseException) -> str:
    """One line for a message: an OSError's reason and file name, else the exception's first line."""
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}"
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created/renamed files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file in the same directory, fsync, rename, fsync)."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(d)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: str) -> list[str]:
    """Every file under ``root``, as sorted paths relative to it."""
    out = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            out.append(os.path.relpath(os.path.join(dp, fn), root))
    return sorted(out)
