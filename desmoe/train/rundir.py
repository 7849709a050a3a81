"""What may happen to a run directory: one run at a time, nothing deleted or rewound without asking.

- :class:`RunLock` — an exclusive ``flock`` on ``DIR/.desmoe.lock`` held for the run's life. A second run into
  the same directory fails at once naming the directory and the holder (pid, host, start time, command). The
  kernel drops the lock when its holder dies (also on SIGKILL), so a lock left by a killed run is recognised as
  stale (its pid is recorded but nobody holds it) and taken over with a note.
- :func:`prepare_run_dir` — creates the directory, turning "a file is in the way", "under a file" and "read-only"
  into a :class:`RunDirError` naming the path instead of a traceback.
- :func:`check_resume` — resuming a run that already reached its last step changes nothing
  (:class:`RunFinished`); ``--resume CKPT --output-dir OTHER`` where OTHER already holds a run would rewind
  OTHER's ``latest`` and cut its history: refused unless ``overwrite``.
- :func:`check_config_matches` — a checkpoint is resumed only under the config that wrote it (except
  ``RESUMABLE_KEYS``, which cannot change the weights); the refusal names every differing key.
- :func:`clear_for_overwrite` — what ``desmoe demo --out DIR`` calls before it replaces an earlier run: refused
  unless ``overwrite``, and never while another process holds that run's lock.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time

from .durable import CheckpointError, describe_error

LOCK_NAME = ".desmoe.lock"


class RunDirError(ValueError):
    """The output directory cannot be used: in the way, unwritable, in use by another run, or holding a run that
    would be lost."""


class RunFinished(Exception):
    """``--resume`` on a run that already reached its last step: nothing to do, nothing changed."""

    def __init__(self, msg: str, checkpoint: str, step: int):
        super().__init__(msg)
        self.checkpoint, self.step = checkpoint, step


def _explain(e: OSError, path: str) -> str:
    """``'PATH': why`` for an OSError met while creating or writing ``path``."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        why = "it (or a parent of it) is a file, not a directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"not writable ({e.strerror}); choose a writable --output-dir"
    elif e.errno == errno.ENOSPC:
        why = "no space left on the device"
    else:
        why = e.strerror or str(e)
    return f"{path!r}: {why}"


def prepare_run_dir(path: str) -> str:
    """Create ``path`` (and parents) for a run; a :class:`RunDirError` naming the path if that is impossible."""
    if not isinstance(path, str) or not path:
        raise RunDirError(f"--output-dir must be a directory path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--output-dir {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--output-dir: cannot create {_explain(e, path)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"--output-dir {path!r} is not writable; choose a writable directory")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536).decode("utf-8", "replace")
        info = json.loads(raw) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(info: dict) -> str:
    if not info:
        return "an unknown process"
    cmd = " ".join(map(str, info.get("argv", [])))[:200]
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f", command: {cmd}" if cmd else ""))


class RunLock:
    """Exclusive lock of a run directory for the life of a run (``with RunLock(dir): ...``).

    ``note``: called with a message when a stale lock (its recorded holder is gone) is taken over.
    """

    def __init__(self, run_dir: str, note=None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.note = note or (lambda m: print(m, file=sys.stderr, flush=True))
        self.fd: int | None = None
        self.stale: dict | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        prepare_run_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"--output-dir: cannot create the run lock {_explain(e, self.path)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"--output-dir {self.run_dir!r} is in use by another desmoe run ({_who(info)}); two "
                              f"runs in one directory would mix their logs and checkpoints. Wait for it to "
                              f"finish, stop it, or choose another --output-dir") from None
        except OSError as e:  # a filesystem without flock: fall back to the recorded pid
            info = _read_holder(fd)
            if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                    and info["pid"] != os.getpid() and _pid_alive(info["pid"]):
                os.close(fd)
                raise RunDirError(f"--output-dir {self.run_dir!r} is in use by another desmoe run ({_who(info)}) "
                                  f"(locking unsupported here: {e.strerror}; judged by its pid)") from None
        prev = _read_holder(fd)
        if prev.get("pid") is not None:  # a clean release empties the file: a recorded holder was killed
            self.stale = prev
            self.note(f"desmoe: taking over the stale lock of {self.run_dir!r} left by {_who(prev)} (no longer "
                      f"running)")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": list(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"--output-dir: cannot write the run lock {_explain(e, self.path)}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # an empty lock file = released cleanly (a recorded pid without a holder = killed)
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def hold(run_dir: str, enabled: bool = True):
    """``RunLock(run_dir)`` when ``enabled`` (rank 0 of a run), else a no-op context."""
    import contextlib

    return RunLock(run_dir) if enabled else contextlib.nullcontext()


def _latest_step(run_dir: str) -> int | None:
    from . import checkpoint as ck

    try:
        c = ck.resolve_checkpoint(run_dir)
        return int(ck.read_meta(c)["step"])
    except (OSError, ValueError, KeyError):
        return None


def check_resume(ckpt: str, output_dir: str, stop: int, *, overwrite: bool = False) -> None:
    """Before a resumed run writes anything: :class:`RunFinished` if ``ckpt`` is at ``stop`` already (resuming
    would only rewrite the final checkpoint and ``summary.json``); :class:`RunDirError` if ``ckpt`` lies outside
    ``output_dir`` while ``output_dir`` holds a run of its own (it would be rewound), unless ``overwrite``."""
    from . import checkpoint as ck

    step = int(ck.read_meta(ckpt)["step"])
    out = os.path.realpath(output_dir)
    inside = os.path.realpath(ckpt).startswith(out + os.sep)
    if step >= stop and inside:
        raise RunFinished(f"the run in {output_dir!r} already finished: checkpoint {ckpt} is at step {step} and "
                          f"this command would stop at step {stop}. Nothing to do, nothing was changed (raise "
                          f"train.max_steps/--max-steps to train further, or evaluate it with `desmoe eval "
                          f"--checkpoint {output_dir}`)", ckpt, step)
    if not inside and os.path.exists(os.path.join(output_dir, ck.LATEST)) and not overwrite:
        own = _latest_step(output_dir)
        raise RunDirError(f"--output-dir {output_dir!r} holds another run (at step {own}); resuming checkpoint "
                          f"{ckpt} (step {step}) into it would rewind its 'latest' and cut its history. Choose an "
                          f"empty --output-dir, or pass --overwrite to replace that run's progress")


# config keys that may change between a checkpoint and its resumption (they cannot change the weights)
RESUMABLE_KEYS = ("train.progress", "train.log_every", "train.plots", "train.save_every", "train.keep_last",
                  "train.device", "train.skip_nonfinite", "train.eval_batches", "data.eval_max_docs",
                  "train.val_batches", "train.val_every", "train.eval_cache")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# keys added after checkpoints were written without them: the value that matches what those runs did
ADDED_KEYS = {"data.packing": "concatenated"}


def config_differences(saved: dict, current: dict, ignore=RESUMABLE_KEYS) -> list[str]:
    """``["key: checkpoint=X, now=Y", ...]`` over the flattened configs, except ``ignore``d keys (a key of
    :data:`ADDED_KEYS` absent from the checkpoint's config counts as that key's listed value)."""
    a, b = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(json.loads(json.dumps(current, default=str)))
    if any(k.startswith("data.") for k in a):
        for k, v in ADDED_KEYS.items():
            a.setdefault(k, v)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: checkpoint={a.get(k, '<absent>')!r}, now={b.get(k, '<absent>')!r}")
    return diffs


def check_config_matches(ckpt: str, current: dict) -> None:
    """Refuse to resume ``ckpt`` under a config that changes training (other model, data, method, optimizer)."""
    p = os.path.join(ckpt, "config.json")
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {ckpt!r} has no config.json, so it cannot be matched to this run's config")
    try:
        with open(p) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {p!r} is unreadable ({describe_error(e)})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint file {p!r} is malformed: expected a mapping")
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt!r} was written under a different config; differing keys: "
                              + "; ".join(diffs) + f". Resume with the checkpoint's config ({p}) or start a new run "
                              f"in another --output-dir (keys that may change on resume: {', '.join(RESUMABLE_KEYS)})")


def clear_for_overwrite(run_dir: str, *, overwrite: bool, what: str = "run") -> None:
    """Remove an earlier run in ``run_dir`` (one with ``config.yaml`` or ``latest``) only when ``overwrite``;
    otherwise a :class:`RunDirError` naming it. Never while another process holds its lock."""
    from . import checkpoint as ck

    if not os.path.isdir(run_dir):
        return
    if not any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.yaml", "config.json", ck.LATEST)):
        return
    if not overwrite:
        step = _latest_step(run_dir)
        raise RunDirError(f"{run_dir!r} already holds a {what}" + (f" (at step {step})" if step is not None else "")
                          + "; pass --overwrite to replace it, or choose another output directory")
    with RunLock(run_dir, note=lambda _m: None):  # refuses while that run is still going
        for name in os.listdir(run_dir):
            if name == LOCK_NAME:
                continue
            p = os.path.join(run_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
