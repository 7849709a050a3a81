"""Checkpoint reads and writes of a training run (built on :mod:`.durable`; RNG states from :mod:`.rng`; whether a
checkpoint's config allows resuming it: :func:`desmoe.train.rundir.check_config_matches`).

Layout of a run directory ``DIR``::

    DIR/config.yaml                 the validated config of the run
    DIR/run_info.json               versions, git sha, host, command line, world size (one entry per session)
    DIR/checkpoints/step-000050/    one checkpoint: written to .tmp-step-000050, every file and the directory
                                    fsync'ed, then renamed (a crash leaves either nothing or a whole checkpoint)
        model/                      save_pretrained (HF format, loads in stock transformers; no ALR keys)
                                    + the tokenizer (save_pretrained)
        method.pt                   ALR weights, affinity A, counts, masks, ESFT selection
        trainer.pt                  optimizer, scheduler, step, data-stream state, RNG states (rank 0)
        rng-rank000001.pt ...       RNG states of the other ranks (distributed runs)
                                    (the .pt files hold only tensors, numbers, strings and containers, RNG states
                                    included, and are read with ``torch.load(weights_only=True)``: a received
                                    checkpoint can carry no code; a file asking for any other object is refused)
        optim/                      FSDP2 only: sharded optimizer state (torch.distributed.checkpoint), read
                                    through ``safe_dcp`` (allow-listed metadata unpickler, weights_only values)
        config.json                 the config that wrote it (resume refuses a different one, naming the keys)
        meta.json                   step, phase, method, domains, eval (and validation) before training
        manifest.json               written last: size + sha256 of every file (truncation / bit flips detected)
    DIR/latest                      name of the newest checkpoint (replaced atomically)

Every file-system failure while writing (no space left, read-only, a file in the way) is a
:class:`CheckpointError` naming the path; the temporary directory is removed and the previous checkpoint and
``latest`` stay as they were.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil

import torch

from ..method.alr_files import write_alr
from .durable import (CheckpointError, describe_error, fsync_dir, fsync_file, is_write_fault, list_files,
                      sha256_file, write_text_atomic)
from .rng import rng_state

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: RNG states as tensors, every state file loadable with weights_only=True


def writes_checkpoint(fn):
    """Decorator for the writers below: a file-system failure becomes a :class:`CheckpointError` naming the
    directory being written (the callers remove their temporary directory)."""

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:
            if not is_write_fault(e):
                raise
            raise CheckpointError(f"cannot write checkpoint files in {path!r}: {describe_error(e)}. Nothing was "
                                  f"committed: the previous checkpoint and 'latest' are unchanged (free space or "
                                  f"fix permissions, then resume)") from e
    return wrapper


def save_config(run_dir: str, cfg_dict: dict) -> None:
    """``config.yaml``; strings that read as floats (a name ``1e5``) are quoted, so it loads back unchanged."""
    from . import yamlio

    os.makedirs(run_dir, exist_ok=True)
    write_text_atomic(os.path.join(run_dir, "config.yaml"), yamlio.dump(cfg_dict, sort_keys=False))


# --- writing --------------------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@writes_checkpoint
def begin_checkpoint(run_dir: str, step: int) -> str:
    """Create (empty) the temporary directory of checkpoint ``step``; returns it. The name is deterministic so
    every rank of a distributed run can write its own files into it (rank 0 calls this, then a barrier)."""
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{checkpoint_name(step)}")
    if os.path.exists(tmp):  # left over by a crash during an earlier save of this step
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


@writes_checkpoint
def write_model(tmp: str, model, tokenizer, routers, state_dict: dict | None = None) -> None:
    """HF-format model (+ tokenizer) without the ALR residuals, so stock transformers can load it; the ALR goes
    to ``model/desmoe_alr.safetensors`` (read by :func:`desmoe.from_pretrained`; ``desmoe export`` folds it into
    the routers for a stock model)."""
    residuals = [r.residual for r in routers]
    full_state_dict = state_dict
    for r in routers:
        r.residual = None
    try:
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if ".residual." not in k}
            model.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
        else:
            model.save_pretrained(os.path.join(tmp, "model"))
    finally:
        for r, res in zip(routers, residuals):
            r.residual = res
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
    # the ALR beside the HF files, with a notice that model/ alone is not the trained routing
    write_alr(os.path.join(tmp, "model"), model, full_state_dict)


@writes_checkpoint
def write_method_state(tmp: str, state: dict) -> None:
    """``method.pt``: the method controller's state (tensors and plain values only)."""
    torch.save(state, os.path.join(tmp, "method.pt"))


@writes_checkpoint
def write_trainer_state(tmp: str, step: int, *, optimizer_state, scheduler, stream_state, rank: int = 0,
                        extra: dict | None = None) -> None:
    """``trainer.pt`` (rank 0) or ``rng-rankNNNNNN.pt`` (other ranks: RNG, stream position, and ``extra``, e.g. the
    rank's affinity state so that a test or a person can check every rank agreed)."""
    if rank == 0:
        torch.save({"step": step, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "stream": stream_state, "rng": rng_state(), **(extra or {})}, os.path.join(tmp, "trainer.pt"))
    else:
        torch.save({"step": step, "rng": rng_state(), "stream": stream_state, **(extra or {})},
                   os.path.join(tmp, f"rng-rank{rank:06d}.pt"))


def commit_checkpoint(run_dir: str, tmp: str, step: int, *, meta: dict, config: dict | None,
                      keep: int | None = None) -> str:
    """Rank 0, after every rank wrote its files into ``tmp``: meta + config + manifest, fsync everything, rename
    to ``step-NNNNNN``, point ``latest`` at it, drop all but the newest ``keep``. Returns the final directory."""
    root = os.path.join(run_dir, CKPT_DIR)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    try:
        _commit(tmp, final, root, step, meta, config)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_write_fault(e):
            raise CheckpointError(f"cannot write checkpoint {final!r}: {describe_error(e)}. The temporary directory "
                                  f"was removed; the previous checkpoint and 'latest' are unchanged (free space or fix "
                                  f"permissions, then resume)") from e
        raise
    try:
        write_text_atomic(os.path.join(run_dir, LATEST), name + "\n")
    except OSError as e:
        raise CheckpointError(f"checkpoint {final!r} was written but {os.path.join(run_dir, LATEST)!r} could not be "
                              f"updated ({describe_error(e)}); resume with --resume {final}") from e
    if keep:
        olds = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
        for d in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        fsync_dir(root)
    return final


def _commit(tmp: str, final: str, root: str, step: int, meta: dict, config: dict | None) -> None:
    """meta + config + manifest into ``tmp``, fsync every file and directory, rename ``tmp`` to ``final``."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, "format": FORMAT_VERSION, **meta}, f, indent=1, default=str)
    if config is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1, default=str)
    files = {}
    for rel in list_files(tmp):
        p = os.path.join(tmp, rel)
        fsync_file(p)
        files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"format": FORMAT_VERSION, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for dp, _, _ in os.walk(tmp):
        fsync_dir(dp)
    old = None
    if os.path.exists(final):  # a rewritten step (resumed from an earlier checkpoint): keep it until replaced
        old = os.path.join(root, f".old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, *, model, tokenizer, controller, optimizer, scheduler,
                    stream_state: dict | None, meta: dict, keep: int | None = None, config: dict | None = None,
                    dist=None, fsdp: bool = False) -> str:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; returns its directory.

    Under torchrun (``dist``: :class:`desmoe.train.distributed.Dist`) every rank calls this (collective): rank 0
    creates and commits the directory, every rank writes its RNG/stream state, and with ``fsdp`` the model is
    gathered for rank 0's HF-format save while each rank writes its optimizer shard."""
    main = dist is None or dist.is_main
    rank = 0 if dist is None else dist.rank
    tmp = begin_checkpoint(run_dir, step) if main else None
    _barrier(dist)
    tmp = tmp or os.path.join(run_dir, CKPT_DIR, f".tmp-{checkpoint_name(step)}")
    try:
        full_sd = _full_state_dict(model) if fsdp else None
        if fsdp:
            _save_sharded_optimizer(model, optimizer, tmp)
        msd = controller.state_dict()
        if fsdp:  # ALR weights are DTensor shards: gather (collective, every rank) to plain tensors
            msd["alr"] = [{k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                           for k, v in a.items()} for a in msd["alr"]]
        if main:
            write_model(tmp, model, tokenizer, controller.routers, state_dict=full_sd)
            write_method_state(tmp, msd)
        write_trainer_state(tmp, step, optimizer_state=None if fsdp or optimizer is None else optimizer.state_dict(),
                            scheduler=scheduler, stream_state=stream_state, rank=rank,
                            extra={"tracker": controller.tracker.state_dict()} if rank else None)
    except BaseException:
        if main:  # never leave a half-written checkpoint behind (the next save of this step would clear it too)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(dist)
    if not main:
        return os.path.join(run_dir, CKPT_DIR, checkpoint_name(step))
    return commit_checkpoint(run_dir, tmp, step, meta=meta, config=config, keep=keep)


def _barrier(dist) -> None:
    if dist is not None:
        dist.barrier()


# --- FSDP2 pieces ------------------------------------------------------------------------------------------------
def _full_state_dict(model) -> dict:
    """Gathered (unsharded) CPU state dict on every rank (collective), for rank 0's HF-format save."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_sharded_optimizer(model, opt, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(tmp, "optim"))


def load_sharded_optimizer(model, opt, ckpt: str) -> None:
    """FSDP2: every rank loads its optimizer shard from ``ckpt/optim`` (collective), through
    :func:`desmoe.train.safe_dcp.load_dcp`: torch's own reader would unpickle ``.metadata`` and the non-tensor
    values without restriction."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from .safe_dcp import load_dcp

    sd = {"optimizer": get_optimizer_state_dict(model, opt)}
    load_dcp(sd, os.path.join(ckpt, "optim"))  # no code from the files: see safe_dcp
    set_optimizer_state_dict(model, opt, sd["optimizer"])


# --- reading --------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a run directory (its ``latest``) or a checkpoint directory itself."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        try:
            with open(latest, encoding="utf-8") as f:
                name = f.read(256).strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{latest} is unreadable ({describe_error(e)})") from None
        if not re.fullmatch(r"step-\d{6,}", name):
            raise CheckpointError(f"{latest} should name a checkpoint like 'step-000050', it holds {name[:60]!r}")
        ck = os.path.join(path, CKPT_DIR, name)
        if os.path.isfile(os.path.join(ck, "meta.json")):
            return ck
        raise FileNotFoundError(f"{latest} names {name!r} but {ck} is missing or incomplete")
    raise FileNotFoundError(f"no checkpoint in {path!r}: expected a run directory with a 'latest' file or a "
                            f"checkpoint directory with meta.json")


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-")]


def verify_checkpoint(ckpt: str) -> dict:
    """Check every file against ``manifest.json`` (presence, size, sha256); returns the manifest.

    Raises :class:`CheckpointError` naming the first bad file and what is wrong with it.
    """
    mpath = os.path.join(ckpt, MANIFEST)
    others = [c for c in list_checkpoints(os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))) if
              os.path.abspath(c) != os.path.abspath(ckpt)]
    hint = (f"; earlier checkpoints you can pass to --resume: {', '.join(os.path.basename(c) for c in others[-3:])}"
            if others else "")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {ckpt!r} has no {MANIFEST}: it is incomplete or was written by an older "
                              f"desmoe, so its integrity cannot be checked{hint}")
    try:
        with open(mpath) as f:
            man = json.load(f)
        files = man["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt!r}: {MANIFEST} is unreadable ({e}){hint}") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {ckpt!r}: {MANIFEST} is malformed (no file table){hint}")
    extra = sorted(set(list_files(ckpt)) - set(files) - {MANIFEST})
    if extra:
        raise CheckpointError(f"checkpoint {ckpt!r} holds file(s) its manifest does not list: {', '.join(extra[:5])}"
                              f"; it was altered after it was written{hint}")
    for rel, info in files.items():
        p = os.path.join(ckpt, rel)
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise CheckpointError(f"checkpoint {ckpt!r}: {MANIFEST} names a path outside the checkpoint: {rel!r}")
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {ckpt!r} is incomplete: {rel} is missing{hint}")
        size = os.path.getsize(p)
        if not isinstance(info, dict) or "bytes" not in info or "sha256" not in info:
            raise CheckpointError(f"checkpoint {ckpt!r}: {MANIFEST} entry for {rel} is malformed{hint}")
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {ckpt!r} is truncated or corrupt: {rel} has {size} bytes, the "
                                  f"manifest says {info['bytes']}{hint}")
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: {rel} does not match its sha256 in the "
                                  f"manifest (bit flip or partial overwrite){hint}")
    return man


def read_meta(ckpt: str) -> dict:
    p = os.path.join(ckpt, "meta.json")
    try:
        with open(p) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {p!r} is unreadable ({describe_error(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("domains"), list):
        raise CheckpointError(f"checkpoint file {p!r} is malformed: expected an object with an integer 'step' and "
                              f"a list of 'domains'")
    return meta


def open_checkpoint(path: str) -> str:
    """Resolve ``path`` (run or checkpoint directory) and verify it against its manifest: what eval and resume
    call before loading anything from it."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    if os.path.isdir(os.path.join(ckpt, "optim")):  # FSDP2's sharded optimizer state: checked without running it
        from .safe_dcp import verify_dcp_dir

        verify_dcp_dir(os.path.join(ckpt, "optim"))
    return ckpt


def check_model_files(mdir: str) -> None:
    """Before transformers reads a model folder: its weights are safetensors (a ``pytorch_model.bin`` is a pickle
    and is never read), every ``*.json`` parses and every ``*.safetensors`` has a whole, valid header. Each failure
    is a :class:`CheckpointError` naming the file."""
    if not os.path.isdir(mdir):
        raise CheckpointError(f"model folder {mdir!r} is missing or not a directory")
    names = sorted(os.listdir(mdir))
    if "config.json" not in names:
        raise CheckpointError(f"model folder {mdir!r} has no config.json")
    weights = [n for n in names if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n)]
    if not weights:
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise CheckpointError(
            f"model folder {mdir!r} has no model.safetensors" + (
                f", only {', '.join(pickled[:3])}: desmoe reads weights from safetensors only (a .bin is a pickle, "
                f"which can run code when loaded). Convert it where you trust the file, e.g. "
                f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) (writes model.safetensors)"
                if pickled else ""))
    from safetensors import safe_open

    for n in names:
        p = os.path.join(mdir, n)
        if not os.path.isfile(p):
            continue
        try:
            if n.endswith(".json"):
                with open(p, encoding="utf-8") as f:
                    json.load(f)
            elif n.endswith(".safetensors"):
                with safe_open(p, framework="pt") as f:
                    f.keys()
        except OSError as e:
            raise CheckpointError(f"checkpoint file {p!r} is unreadable ({describe_error(e)})") from None
        except Exception as e:  # JSON / UTF-8 errors, safetensors' header errors (truncated, not safetensors)
            kind = "not valid JSON" if n.endswith(".json") else "not a valid safetensors file (truncated or corrupt)"
            raise CheckpointError(f"checkpoint file {p!r} is {kind} ({describe_error(e)})") from None


def load_model(ckpt: str, *, device="cpu", dtype=torch.float32):
    """``(model, tokenizer)`` from a checkpoint's ``model/`` directory (not yet patched). Only safetensors
    weights are read (a ``pytorch_model.bin`` is a pickle and is never loaded from a checkpoint), and no remote
    code runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = os.path.join(ckpt, "model")
    if not os.path.isdir(mdir):
        raise CheckpointError(f"checkpoint {ckpt!r} has no model/ directory")
    check_model_files(mdir)
    try:
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False).to(device)
        tok = (AutoTokenizer.from_pretrained(mdir, trust_remote_code=False)
               if os.path.isfile(os.path.join(mdir, "tokenizer.json")) else None)
    except Exception as e:  # noqa: BLE001 - whatever transformers/safetensors raise on a damaged folder
        raise CheckpointError(f"checkpoint {ckpt!r}: cannot load the model in {mdir!r} ({describe_error(e)})") from None
    return model, tok


def _legacy_numpy_globals() -> list:
    """Format-2 checkpoints stored numpy's RNG state as an ndarray: the (data-only) globals to rebuild it."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dt = getattr(np, "dtypes", None)
    if dt is not None:
        out.append(type(np.dtype(np.uint32)))
    return out


def load_state_file(path: str) -> dict:
    """A ``.pt`` state file of a checkpoint, read with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and containers only. A file that asks the unpickler for anything else (a planted payload) is refused
    with a :class:`CheckpointError` naming the file and the object it asked for; a truncated or corrupt file
    likewise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} is missing")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        asked = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"refusing to load {path!r}: it holds objects other than tensors and plain values "
                              f"({asked or 'an unsupported pickle opcode'}), which could run code; desmoe never "
                              f"writes such files, so it was altered or is not a desmoe checkpoint") from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(f"checkpoint file {path!r} is truncated or corrupt ({describe_error(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path!r} holds a {type(obj).__name__}, expected a mapping")
    return obj


def load_method_state(ckpt: str) -> dict:
    return load_state_file(os.path.join(ckpt, "method.pt"))


def load_trainer_state(ckpt: str, rank: int = 0) -> dict:
    """``trainer.pt``; for ``rank > 0`` its RNG states come from ``rng-rankNNNNNN.pt`` when present."""
    st = load_state_file(os.path.join(ckpt, "trainer.pt"))
    if rank:
        p = os.path.join(ckpt, f"rng-rank{rank:06d}.pt")
        if os.path.isfile(p):
            st["rng"] = load_state_file(p)["rng"]
    return st


def run_config_path(run_or_ckpt: str) -> str | None:
    """``config.yaml`` of the run that holds this checkpoint (or run directory), if present."""
    for p in (run_or_ckpt, os.path.dirname(os.path.dirname(os.path.abspath(run_or_ckpt)))):
        c = os.path.join(p, "config.yaml")
        if os.path.isfile(c):
            return c
    return None
