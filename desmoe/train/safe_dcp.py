"""Reading ``torch.distributed.checkpoint`` (DCP) directories without running code from them.

DCP reads a checkpoint's ``.metadata`` with plain ``pickle.load`` and every non-tensor value (``BYTE_IO`` items in
the ``.distcp`` files: an optimizer's ``param_groups`` — lr, betas, ...) with ``torch.load(weights_only=False)``,
so a planted pickle in either runs on load. The FSDP2 optimizer state of a desmoe checkpoint (``optim/``) is read
here instead:

* ``.metadata`` with :class:`MetadataUnpickler`, which resolves only the classes DCP's metadata is made of (its
  dataclasses, ``torch.Size``, dtypes, layouts, paths) and refuses any other global, naming the file and it;
* the result checked for shape: a ``Metadata`` whose storage entries point at plain file names in the directory,
  within their size, with no stream transforms (desmoe writes none);
* every ``BYTE_IO`` item loaded with ``torch.load(weights_only=True)`` — before the load (:func:`verify_dcp_dir`,
  called by :func:`desmoe.train.checkpoint.open_checkpoint`) and again during it (:class:`SafeLoadPlanner`);
  tensors are read by DCP itself with ``weights_only=True``.

Every refusal is a :class:`~desmoe.train.durable.CheckpointError` naming the file.
"""
from __future__ import annotations

import io
import os
import pickle

import torch

from .durable import CheckpointError

METADATA = ".metadata"

_DCP_MD = "torch.distributed.checkpoint.metadata"
# (module, name) of every global a DCP .metadata pickle holds (torch 2.4 .. 2.13: listed from real saves)
_ALLOWED = {(_DCP_MD, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                   "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                   "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
             ("pathlib._local", "PurePosixPath"), ("pathlib._local", "PureWindowsPath")}


def _error(msg: str):
    return CheckpointError(msg)


def _refusal(path: str, what: str) -> Exception:
    return _error(f"refusing to load {path!r}: {what}, which could run code; desmoe never writes such files, so it "
                  f"was altered or is not a desmoe checkpoint")


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a truncated or garbled pickle)."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP metadata and nothing else: any global outside :data:`_ALLOWED` (and the
    ``torch`` dtypes) is refused; persistent ids and extension codes are refused by :class:`pickle.Unpickler`
    itself (``persistent_load`` unset) or resolve through :meth:`find_class`."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"GLOBAL {module}.{name} (not one of the classes DCP metadata is made of)")


def read_dcp_metadata(path: str):
    """The ``Metadata`` in file ``path`` (a DCP ``.metadata``), through :class:`MetadataUnpickler`; its shape
    checked. Raises :class:`~desmoe.train.durable.CheckpointError` naming ``path``."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            md = MetadataUnpickler(f).load()
    except _Refused as e:
        raise _refusal(path, f"it asks the unpickler for {e}") from None
    except OSError as e:
        raise _error(f"checkpoint file {path!r} is unreadable ({e.strerror or e})") from None
    except Exception as e:  # truncated, garbage, a dataclass fed the wrong arguments
        raise _error(f"checkpoint file {path!r} is truncated or corrupt ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise _error(f"checkpoint file {path!r} is malformed: expected torch.distributed.checkpoint Metadata, got "
                     f"{type(md).__name__}")
    return md


def _storage_items(dcp_dir: str, md) -> list:
    """``[(MetadataIndex, file path, offset, length, is_bytes)]``, every entry checked to stay inside ``dcp_dir``
    and its file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    mpath = os.path.join(dcp_dir, METADATA)
    out, sizes = [], {}
    for idx, info in md.storage_data.items():
        rel, off, n = getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(info, "length", None)
        fqn = getattr(idx, "fqn", None)
        if not isinstance(rel, str) or not rel or os.path.basename(rel) != rel or rel in (".", "..") \
                or "\\" in rel:
            raise _error(f"checkpoint file {mpath!r} is malformed: entry {fqn!r} points at {rel!r}, not a file "
                         f"of {dcp_dir!r}")
        if getattr(info, "transform_descriptors", None):
            raise _error(f"checkpoint file {mpath!r}: entry {fqn!r} asks for stream transforms "
                         f"{info.transform_descriptors!r}; desmoe writes none")
        p = os.path.join(dcp_dir, rel)
        if p not in sizes:
            if not os.path.isfile(p):
                raise _error(f"checkpoint {dcp_dir!r} is incomplete: {rel} (named in {METADATA}) is missing")
            sizes[p] = os.path.getsize(p)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, n)) \
                or off + n > sizes[p]:
            raise _error(f"checkpoint file {p!r} is truncated or corrupt: entry {fqn!r} spans bytes "
                         f"[{off}, {off}+{n}) of a {sizes[p]}-byte file")
        is_bytes = isinstance(md.state_dict_metadata.get(fqn), BytesStorageMetadata)
        out.append((idx, p, off, n, is_bytes))
    return out


def load_bytes_item(raw: bytes, path: str, fqn: str):
    """One ``BYTE_IO`` value (a ``torch.save`` blob) with ``weights_only=True``."""
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        asked = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        if asked:
            raise _refusal(path, f"its entry {fqn!r} holds objects other than tensors and plain values "
                                 f"({asked})") from None
        raise _error(f"checkpoint file {path!r} is truncated or corrupt: entry {fqn!r} is not a torch.save'd "
                     f"value") from None
    except Exception as e:
        raise _error(f"checkpoint file {path!r} is truncated or corrupt: entry {fqn!r} does not load "
                     f"({type(e).__name__})") from None


def verify_dcp_dir(dcp_dir: str):
    """Check a DCP directory without running anything from it: the metadata (restricted unpickler), every
    storage entry's bounds, every ``BYTE_IO`` value (``weights_only=True``). Returns the metadata."""
    mpath = os.path.join(dcp_dir, METADATA)
    if not os.path.isfile(mpath):
        raise _error(f"checkpoint {os.path.dirname(dcp_dir)!r} has an {os.path.basename(dcp_dir)}/ directory "
                     f"without {METADATA}: it is incomplete")
    md = read_dcp_metadata(mpath)
    for idx, p, off, n, is_bytes in _storage_items(dcp_dir, md):
        if is_bytes:
            with open(p, "rb") as f:
                f.seek(off)
                load_bytes_item(f.read(n), p, idx.fqn)
    return md


def _reader_and_planner(dcp_dir: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeFileSystemReader(FileSystemReader):
        """Reads ``.metadata`` through :class:`MetadataUnpickler`; a failure while reading a data file names it."""

        current = None

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # rank-local metadata: desmoe never writes it
                raise _error(f"{dcp_dir!r}: rank-local DCP metadata is not supported")
            md = read_dcp_metadata(os.path.join(dcp_dir, METADATA))
            _storage_items(dcp_dir, md)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def _slice_file(self, file, sinfo):
            self.current = os.path.join(dcp_dir, sinfo.relative_path)
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except Exception as e:
                if isinstance(e, CheckpointError):
                    raise
                raise _error(f"checkpoint file {self.current or dcp_dir!r} is truncated or corrupt "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, with ``BYTE_IO`` values loaded by ``torch.load(weights_only=True)``."""

        reader = None

        def load_bytes(self, read_item, value):
            assert read_item.type == LoadItemType.BYTE_IO
            where = (self.reader.current if self.reader is not None else None) or dcp_dir
            obj = load_bytes_item(value.read(), where, read_item.dest_index.fqn)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    reader = SafeFileSystemReader(dcp_dir)
    planner = SafeLoadPlanner()
    planner.reader = reader
    return reader, planner


def _unwrap(e: BaseException, dcp_dir: str) -> Exception:
    """DCP wraps every rank's failure into a ``CheckpointException`` (a ``BaseException`` holding tracebacks):
    the first :class:`CheckpointError` in it, or one naming the directory."""
    fails = getattr(e, "failures", None) or {}
    excs = [f[0] if isinstance(f, tuple) else f for f in fails.values()]
    for x in excs:
        if isinstance(x, CheckpointError):
            return CheckpointError(str(x))
    first = excs[0] if excs else e
    return CheckpointError(f"cannot load the sharded state in {dcp_dir!r} ({type(first).__name__}: "
                           f"{str(first).splitlines()[0] if str(first) else ''})")


def load_dcp(state_dict: dict, dcp_dir: str) -> None:
    """``torch.distributed.checkpoint.load(state_dict, ...)`` from ``dcp_dir`` (in place, collective under a
    process group), after :func:`verify_dcp_dir`, with the safe reader and planner. Every failure is a
    :class:`~desmoe.train.durable.CheckpointError` naming the file (or directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    verify_dcp_dir(dcp_dir)
    reader, planner = _reader_and_planner(dcp_dir)
    try:
        dcp.load(state_dict, storage_reader=reader, planner=planner)
    except CheckpointException as e:
        raise _unwrap(e, dcp_dir) from None
