"""FSDP2's sharded optimizer state (torch.distributed.checkpoint) is read without running code from it: a planted
pickle in ``.metadata`` or in a ``.distcp`` value is refused naming the file. The DCP directories here
are written by ``dcp.save`` in one process (no process group), the same format FSDP2 ranks write; the 2-rank
FSDP2 resume is in ``test_distributed.py``."""
import dataclasses
import io
import os
import pickle
import warnings

import pytest
import torch

from desmoe.train.checkpoint import CheckpointError
from desmoe.train.safe_dcp import MetadataUnpickler, load_dcp, read_dcp_metadata, verify_dcp_dir


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state():
    return {"optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3),
                                          "exp_avg_sq": torch.rand(4, 3).bfloat16()}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"], "amsgrad": False,
                                            "name": None}]}}


def _blank():
    return {"optimizer": {"state": {"w": {"step": torch.tensor(0.0), "exp_avg": torch.zeros(4, 3),
                                          "exp_avg_sq": torch.zeros(4, 3).bfloat16()}},
                          "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": ["w"], "amsgrad": True,
                                            "name": None}]}}


@pytest.fixture()
def saved(tmp_path):
    import torch.distributed.checkpoint as dcp

    sd = _state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=str(tmp_path / "optim"))
    return sd, tmp_path / "optim"


def plant_metadata(dcp_dir, obj):
    with open(os.path.join(dcp_dir, ".metadata"), "wb") as f:
        pickle.dump(obj, f)


def plant_bytes_item(dcp_dir, obj, file=None, tensor=False):
    """A sender's consistent plant: ``torch.save(obj)`` appended to a ``.distcp`` file and the first non-tensor
    entry of ``.metadata`` (in data file ``file``, if given) pointed at it. Returns the file's name, or None when
    ``file`` holds no non-tensor entry. ``tensor``: a tensor entry instead (read by DCP's own reader, with
    ``weights_only=True``, inside the load)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    mpath = os.path.join(dcp_dir, ".metadata")
    with open(mpath, "rb") as f:
        md = pickle.load(f)  # our own test file
    idx = next((i for i in md.storage_data if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata)
                != tensor and file in (None, md.storage_data[i].relative_path)), None)
    if idx is None:
        return None
    info = md.storage_data[idx]
    buf = io.BytesIO()
    torch.save(obj, buf)
    p = os.path.join(dcp_dir, info.relative_path)
    with open(p, "ab") as f:
        off = f.tell()
        f.write(buf.getvalue())
    md.storage_data[idx] = dataclasses.replace(info, offset=off, length=len(buf.getvalue()))
    with open(mpath, "wb") as f:
        pickle.dump(md, f)
    return info.relative_path


def test_real_dcp_metadata_uses_only_allow_listed_globals(saved):
    """What a real save pickles: every global resolves, the metadata loads, and the state round-trips."""
    sd, d = saved
    seen = []

    class Spy(MetadataUnpickler):
        def find_class(self, module, name):
            seen.append((module, name))
            return super().find_class(module, name)

    with open(d / ".metadata", "rb") as f:
        md = Spy(f).load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in seen and ("torch", "Size") in seen
    assert md.state_dict_metadata.keys() == pickle.load(open(d / ".metadata", "rb")).state_dict_metadata.keys()
    out = _blank()
    load_dcp(out, str(d))
    assert out["optimizer"]["param_groups"] == sd["optimizer"]["param_groups"]
    for k, v in sd["optimizer"]["state"]["w"].items():
        assert torch.equal(out["optimizer"]["state"]["w"][k], v), k


def test_planted_metadata_is_refused_naming_the_file(saved, tmp_path):
    _, d = saved
    marker = tmp_path / "pwned"
    plant_metadata(d, {"x": Payload(marker)})
    for fn in (lambda: verify_dcp_dir(str(d)), lambda: load_dcp(_blank(), str(d))):
        with pytest.raises(CheckpointError) as e:
            fn()
        assert "refusing to load" in str(e.value) and ".metadata" in str(e.value) and "system" in str(e.value)
    assert not marker.exists(), "the payload ran"


def test_planted_distcp_value_is_refused_naming_the_file(saved, tmp_path):
    _, d = saved
    marker = tmp_path / "pwned"
    name = plant_bytes_item(d, Payload(marker))
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        load_dcp(_blank(), str(d))
    assert name in str(e.value) and "param_groups" in str(e.value)
    assert not marker.exists(), "the payload ran"
    # the plant is real: torch's own reader runs it
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(_blank(), checkpoint_id=str(d))
    assert marker.exists(), "the planted value did not reach torch's loader: this test proves nothing"


def test_the_safe_reader_refuses_even_without_the_check_before(saved, tmp_path, monkeypatch):
    """A file swapped between the check and the load: the reader and planner refuse on their own."""
    import desmoe.train.safe_dcp as sd_mod

    _, d = saved
    marker = tmp_path / "pwned"
    plant_bytes_item(d, Payload(marker))
    monkeypatch.setattr(sd_mod, "verify_dcp_dir", lambda p: None)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dcp(_blank(), str(d))
    plant_metadata(d, Payload(marker))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dcp(_blank(), str(d))
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("damage", ["truncate_metadata", "not_metadata", "path_escape", "out_of_bounds",
                                    "missing_distcp", "transform", "garbage_distcp", "distcp_is_a_pickle"])
def test_damaged_dcp_is_a_clear_error_naming_the_file(saved, tmp_path, damage):
    _, d = saved
    marker = tmp_path / "pwned"
    mpath = d / ".metadata"
    md = pickle.load(open(mpath, "rb"))
    data_file = d / next(iter(md.storage_data.values())).relative_path
    expect = ".metadata"
    if damage == "truncate_metadata":
        b = mpath.read_bytes()
        mpath.write_bytes(b[: len(b) // 2])
    elif damage == "not_metadata":
        plant_metadata(d, {"a": [1, 2]})
    elif damage in ("path_escape", "out_of_bounds", "transform"):
        idx, info = next(iter(md.storage_data.items()))
        change = {"path_escape": dict(relative_path="../../etc/passwd"),
                  "out_of_bounds": dict(length=10 ** 9),
                  "transform": dict(transform_descriptors=["zstd"])}[damage]
        md.storage_data[idx] = dataclasses.replace(info, **change)
        plant_metadata(d, md)
        if damage == "out_of_bounds":
            expect = data_file.name
    elif damage == "missing_distcp":
        os.remove(data_file)
        expect = data_file.name
    elif damage == "garbage_distcp":
        data_file.write_bytes(os.urandom(data_file.stat().st_size))
        expect = data_file.name
    elif damage == "distcp_is_a_pickle":  # the whole data file replaced by a torch.save'd payload
        torch.save({"x": Payload(marker)}, data_file)
        with open(data_file, "ab") as f:  # keep every entry in bounds
            f.write(b"\0" * 100000)
        expect = data_file.name
    with pytest.raises(CheckpointError) as e:
        load_dcp(_blank(), str(d))
    assert expect in str(e.value), str(e.value)
    assert "Traceback" not in str(e.value)
    assert not marker.exists()


def test_read_dcp_metadata_names_an_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match="unreadable"):
        read_dcp_metadata(str(tmp_path / "nothing" / ".metadata"))
