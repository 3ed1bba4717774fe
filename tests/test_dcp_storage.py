"""DCP checkpoints with JSON metadata: exact round trip, async save, and no pickle on load."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from steadyvla.checkpoint.dcp_metadata_json import DcpMetadataError, metadata_to_json
from steadyvla.checkpoint.dcp_storage import METADATA_JSON, JsonMetadataReader, JsonMetadataWriter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is")


def saved_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w32": torch.randn(5, 3, generator=g),
            "wbf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "w16": torch.randn(7, generator=g).to(torch.float16),
            "ids": torch.randint(-2**62, 2**62, (6,), generator=g, dtype=torch.int64),
            "mask": torch.rand(3, 2, generator=g) > 0.5,
            "scalar": torch.tensor(3.25, dtype=torch.float64),
        },
        "optim": {
            "state": {"w32": {"step": torch.tensor(11.0), "exp_avg": torch.randn(5, 3, generator=g)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
                              "foreach": None, "params": ["w32"]}],
        },
        "count": 7,
        "ratio": 0.125,
        "tag": "step-7",
        "history": [1, 2, 3],
    }


def allocated_state() -> dict:
    """Same structure, other values: what a resuming job allocates before loading."""
    def zeroed(sd):
        return {k: zeroed(v) if isinstance(v, dict) else torch.zeros_like(v) if isinstance(v, torch.Tensor)
                else v for k, v in sd.items()}
    state = zeroed(saved_state())
    state["optim"]["param_groups"] = [{"lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0, "amsgrad": True,
                                       "foreach": True, "params": ["other"]}]
    state.update(count=0, ratio=0.0, tag="", history=[])
    return state


def assert_bitwise_equal(got, want, where="state") -> None:
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_bitwise_equal(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.view(torch.uint8) if got.dim() else got.reshape(1).view(torch.uint8),
                           want.view(torch.uint8) if want.dim() else want.reshape(1).view(torch.uint8)), where
    else:
        assert got == want, where


@pytest.fixture
def no_pickle(monkeypatch):
    """Any pickle load, through torch's DCP module or the builtin module, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used to load")

    class RefusingUnpickler:  # torch.load(weights_only=False) subclasses pickle.Unpickler
        __init__ = refuse

    for module in (pickle, dcp_filesystem.pickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
        monkeypatch.setattr(module, "Unpickler", RefusingUnpickler)


class RecordingWriter(JsonMetadataWriter):
    """Keeps the Metadata object the writer serialised, to compare with what the reader rebuilds."""

    def finish(self, metadata, results):
        super().finish(metadata, results)
        self.written = metadata


def test_guard_catches_torch_own_reader(tmp_path, no_pickle):
    """The no_pickle guard is real: torch's stock reader trips it (metadata and param_groups)."""
    dcp.save(saved_state(), storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    with pytest.raises(CheckpointException, match="pickle was used to load"):
        dcp.load(allocated_state(), checkpoint_id=str(tmp_path), no_dist=True)

    class JsonMetadataOnly(JsonMetadataReader):  # JSON metadata, but torch's bytes loading
        read_data = FileSystemReader.read_data

    json_dir = tmp_path / "json"
    dcp.save(saved_state(), storage_writer=JsonMetadataWriter(json_dir), no_dist=True)
    with pytest.raises(CheckpointException, match="pickle was used to load"):
        dcp.load(allocated_state(), storage_reader=JsonMetadataOnly(json_dir), no_dist=True)


def test_round_trip_bitwise_json_no_pickle(tmp_path, no_pickle):
    writer = RecordingWriter(tmp_path)
    dcp.save(saved_state(), storage_writer=writer, no_dist=True)

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [METADATA_JSON, "__0_0.distcp"], names
    raw = (tmp_path / METADATA_JSON).read_bytes()
    assert not raw.startswith(b"\x80")
    doc = json.loads(raw)
    assert doc["format"] == "steadyvla-dcp-metadata"
    assert dict(doc["state_dict_metadata"])["model.wbf16"]["properties"]["dtype"] == "bfloat16"

    metadata = JsonMetadataReader(str(tmp_path)).read_metadata()
    assert metadata.storage_meta.load_id is not None
    metadata.storage_meta.load_id = None
    assert metadata == writer.written  # exact: every field, every chunk, every storage entry
    assert metadata.planner_data["optim.param_groups.0.params"] == ("optim", "param_groups", 0, "params")
    assert list(metadata.storage_data) == list(writer.written.storage_data)

    state = allocated_state()
    dcp.load(state, storage_reader=JsonMetadataReader(tmp_path), no_dist=True)
    assert_bitwise_equal(state, saved_state())


def test_async_save_and_load_from_keys(tmp_path, no_pickle):
    dcp.async_save(saved_state(), storage_writer=JsonMetadataWriter(tmp_path), no_dist=True).result()
    state = allocated_state()
    dcp.load(state, storage_reader=JsonMetadataReader(tmp_path), no_dist=True)
    assert_bitwise_equal(state, saved_state())
    # Loading without a target state dict (as tests and tools do) also goes through the reader.
    loaded = _load_state_dict_from_keys(storage_reader=JsonMetadataReader(tmp_path))
    assert_bitwise_equal(loaded["model"], saved_state()["model"])
    assert loaded["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("content", [b"", b"{\"format\": ", b"\x80\x04garbage", b"{}", b"[1, 2]",
                                     b'{"format": "steadyvla-dcp-metadata", "format_version": 1}'])
def test_corrupt_metadata_is_a_clear_error(tmp_path, content, no_pickle):
    dcp.save(saved_state(), storage_writer=JsonMetadataWriter(tmp_path), no_dist=True)
    (tmp_path / METADATA_JSON).write_bytes(content)
    with pytest.raises(DcpMetadataError, match=METADATA_JSON):
        JsonMetadataReader(tmp_path).read_metadata()
    with pytest.raises(CheckpointException, match=f"{METADATA_JSON}: DCP metadata is not"):  # wraps ours
        dcp.load(allocated_state(), storage_reader=JsonMetadataReader(tmp_path), no_dist=True)


def test_missing_metadata_and_torch_pickled_checkpoint_are_refused(tmp_path, no_pickle):
    with pytest.raises(DcpMetadataError, match=f"{METADATA_JSON}: DCP metadata file missing$"):
        JsonMetadataReader(tmp_path).read_metadata()
    dcp.save(saved_state(), storage_writer=FileSystemWriter(tmp_path), no_dist=True)  # torch's pickled .metadata
    with pytest.raises(DcpMetadataError, match=r"it has \.metadata, torch's pickled metadata, which is never loaded"):
        JsonMetadataReader(tmp_path).read_metadata()


def test_unknown_metadata_content_fails_at_save(tmp_path):
    with pytest.raises(DcpMetadataError, match=r"planner_data\['x'\]: cannot serialise a value of type object"):
        metadata_to_json(Metadata(state_dict_metadata={}, planner_data={"x": object()}))
    md = Metadata(state_dict_metadata={})
    md.extra = 1  # a field this codec does not know
    with pytest.raises(DcpMetadataError, match="has fields .*'extra'"):
        metadata_to_json(md)

    class Odd(JsonMetadataWriter):
        def finish(self, metadata, results):
            metadata.planner_data = {"x": {1, 2}}
            super().finish(metadata, results)

    with pytest.raises(CheckpointException, match="planner_data\\['x'\\]: cannot serialise a value of type set"):
        dcp.save(saved_state(), storage_writer=Odd(tmp_path), no_dist=True)
    assert not (tmp_path / METADATA_JSON).exists()


def test_reused_host_buffers_keep_each_save_its_own_values(tmp_path, no_pickle):
    """Two async saves through one run's HostStaging: the second reuses the first's host buffers (no
    new allocation), and each checkpoint holds the values of the moment it was saved."""
    from steadyvla.checkpoint import state as host_state
    from steadyvla.checkpoint.dcp_io import async_save_model_optim, save_model_optim
    from steadyvla.checkpoint.dcp_staging import HostStaging
    from steadyvla.checkpoint.layout import DCP_DIR

    staging = HostStaging(torch.device("cpu"))
    state = saved_state()
    staging.reserve(state)
    reserved = {k: v.data_ptr() for k, v in host_state._PINNED.items() if k.startswith("full.")}
    assert {"full.model.w32", "full.optim.state.w32.exp_avg"} <= set(reserved)
    first = {k: v.clone() for k, v in state["model"].items()}
    copies, written, _host = async_save_model_optim(state, tmp_path / "one", staging)
    copies.before_update()
    written.result()  # the next save waits for this one's write: its host buffers are reused
    state["model"]["w32"].add_(1.0)  # the update after the copy
    state["optim"]["state"]["w32"]["exp_avg"].mul_(2.0)
    second = {k: v.clone() for k, v in state["model"].items()}
    copies, written, host = async_save_model_optim(state, tmp_path / "two", staging)
    written.result()
    state["model"]["w32"].add_(1.0)  # training goes on; a retry writes the step's host copy again
    save_model_optim(host, tmp_path / "again")
    assert {k: v.data_ptr() for k, v in host_state._PINNED.items() if k.startswith("full.")} == reserved
    for name, want in (("one", first), ("two", second), ("again", second)):
        loaded = allocated_state()
        dcp.load(loaded, storage_reader=JsonMetadataReader(tmp_path / name / DCP_DIR), no_dist=True)
        assert_bitwise_equal(loaded["model"], want, name)
    assert not torch.equal(first["w32"], second["w32"])


def test_staged_state_has_only_plain_containers_and_the_same_storage():
    """What the stager deep-copies: dicts, lists, tuples, primitives and tensors sharing the live
    storage (an OrderedDict or a tensor attribute would go through __reduce_ex__, which some torch
    versions fail on at the second save)."""
    from collections import OrderedDict

    from steadyvla.checkpoint.dcp_staging import plain_containers

    weight = torch.ones(3)
    weight.marker = OrderedDict  # a class object hanging off a tensor
    state = {"model": OrderedDict(w=weight), "optim": {"param_groups": [OrderedDict(lr=0.1, betas=(0.9, 0.99))]}}
    plain = plain_containers(state)
    assert type(plain["model"]) is dict and type(plain["optim"]["param_groups"][0]) is dict
    assert plain["optim"]["param_groups"][0] == {"lr": 0.1, "betas": (0.9, 0.99)}
    assert plain["model"]["w"].data_ptr() == weight.data_ptr() and not hasattr(plain["model"]["w"], "marker")

    def kinds(x):
        if isinstance(x, dict):
            return {type(x)} | set().union(*(kinds(v) for v in x.values()))
        if isinstance(x, (list, tuple)):
            return {type(x)} | set().union(*(kinds(v) for v in x))
        return {type(x)}

    assert kinds(plain) <= {dict, list, tuple, float, torch.Tensor}


def test_async_save_without_reserved_buffers_copies_before_returning(tmp_path, no_pickle):
    """The DDP path (no reserved host buffers): DCP's own copy is taken before the call returns, so
    an update right after it does not reach the checkpoint."""
    from steadyvla.checkpoint.dcp_io import async_save_model_optim
    from steadyvla.checkpoint.layout import DCP_DIR

    state = saved_state()
    copies, written, host = async_save_model_optim(state, tmp_path, None)
    assert copies is None and host is None  # nothing of ours to write again
    state["model"]["w32"].add_(1.0)
    written.result()
    loaded = allocated_state()
    dcp.load(loaded, storage_reader=JsonMetadataReader(tmp_path / DCP_DIR), no_dist=True)
    assert_bitwise_equal(loaded["model"], saved_state()["model"])
