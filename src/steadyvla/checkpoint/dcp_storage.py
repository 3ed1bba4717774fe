"""DCP storage writer/reader whose checkpoint metadata is JSON, and which never unpickle.

torch's `FileSystemWriter` pickles the checkpoint `Metadata` into `.metadata` and its reader
unpickles it; its default load planner also unpickles the non-tensor entries (optimizer
`param_groups`, Python numbers) with a full (pickle) torch load, weights_only off. Checkpoints here are never
unpickled, so:

- `JsonMetadataWriter` writes the metadata as `.metadata.json` (exact round trip, see
  dcp_metadata_json.py), atomically and fsynced; tensors and bytes go into the `*.distcp` files
  exactly as torch writes them. It is a `FileSystemWriter`, so `dcp.save` and `dcp.async_save`
  take it as `storage_writer=`.
- `JsonMetadataReader` reads that file back, and loads non-tensor entries with
  `torch.load(weights_only=True)`; tensors are read by torch with `weights_only=True` already.
  It is a drop-in for `FileSystemReader(path)` in `read_metadata()` and in
  `dcp.load(..., storage_reader=...)`, with any planner derived from torch's `DefaultLoadPlanner`.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import WriteResult

from steadyvla.atomic_files import atomic_write_text
from steadyvla.checkpoint.dcp_metadata_json import DcpMetadataError, metadata_from_json, metadata_to_json

METADATA_JSON = ".metadata.json"


def _metadata_name(rank: int | None) -> str:
    return METADATA_JSON if rank is None else f"__{rank}{METADATA_JSON}"


class JsonMetadataWriter(FileSystemWriter):
    """`FileSystemWriter` that stores the DCP metadata as JSON in `.metadata.json` (no pickle)."""

    def _get_metadata_path(self, rank: int | None = None) -> os.PathLike:
        return Path(self.path) / _metadata_name(rank)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Complete the metadata as torch's writer does, then write it as JSON, atomically."""
        metadata.version = CURRENT_DCP_VERSION
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        # Encoded before anything is written: an unknown field fails the save, no file is left.
        text = json.dumps(metadata_to_json(metadata), allow_nan=False)
        rank = self.rank if not self.use_collectives and self.rank is not None else None
        atomic_write_text(self._get_metadata_path(rank), text)


class _WeightsOnlyBytes:
    """A load planner seen through a window whose `load_bytes` unpickles nothing but plain data."""

    def __init__(self, planner: DefaultLoadPlanner) -> None:
        self._planner = planner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # What DefaultLoadPlanner.load_bytes does, with weights_only=True instead of False.
        obj = torch.load(value, weights_only=True)
        p = self._planner
        if p.flatten_state_dict:
            set_element(p.original_state_dict, p.mappings[read_item.dest_index.fqn], obj)
        else:
            p.state_dict[read_item.dest_index.fqn] = obj


class JsonMetadataReader(FileSystemReader):
    """`FileSystemReader` for checkpoints written by `JsonMetadataWriter`; never calls pickle."""

    def _get_metadata_path(self, rank: int | None = None) -> os.PathLike:
        return Path(self.path) / _metadata_name(rank)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's `Metadata` from its JSON file; a clear error naming the file if it is unusable."""
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not path.is_file():
            pickled = path.with_name(path.name.removesuffix(".json"))
            hint = (f" (it has {pickled.name}, torch's pickled metadata, which is never loaded: this checkpoint "
                    f"was not written by steadyvla's JSON-metadata writer)" if pickled.is_file() else "")
            raise DcpMetadataError(f"{path}: DCP metadata file missing{hint}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DcpMetadataError(f"{path}: DCP metadata is not valid JSON ({exc})") from exc
        metadata = metadata_from_json(data, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """torch's reader, with non-tensor entries loaded `weights_only=True`."""
        if not isinstance(planner, DefaultLoadPlanner) or type(planner).load_bytes is not DefaultLoadPlanner.load_bytes:
            raise DcpMetadataError(
                f"JsonMetadataReader supports load planners derived from DefaultLoadPlanner that keep its "
                f"load_bytes; got {type(planner).__qualname__}")
        return super().read_data(plan, _WeightsOnlyBytes(planner))
