"""Model + optimizer of full training through torch.distributed.checkpoint (DCP).

Every rank writes its own shards into `<checkpoint>/model_optim/` (`.metadata.json` + `*.distcp`:
the metadata is JSON, never pickle, through dcp_storage.py's writer and reader); the
state dict is `{"model": ..., "optim": ...}` from `get_state_dict`, so model keys are the plain
VLA's `state_dict()` keys whatever the sharding, and a checkpoint written by W ranks loads on W'
(DCP reshards). The trainer state JSON / safetensors and the manifest around it are written by
rank 0 (train/full_checkpointing.py) through the same CheckpointManager as LoRA checkpoints.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from steadyvla.checkpoint.dcp_staging import HostStaging, plain_containers
from steadyvla.checkpoint.dcp_storage import JsonMetadataReader, JsonMetadataWriter
from steadyvla.checkpoint.state import DeviceCopies
from steadyvla.checkpoint.layout import DCP_DIR, DCP_MODEL_KEY, DCP_OPTIM_KEY


def _single_process() -> bool:
    """One process without a process group: DCP reads and writes alone (said, not warned about)."""
    return not (dist.is_available() and dist.is_initialized())


def model_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...} of the (possibly FSDP2-sharded) model: DTensor shards, FQN keys."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {DCP_MODEL_KEY: model_sd, DCP_OPTIM_KEY: optim_sd}


def save_model_optim(state: dict[str, Any], ckpt_dir: Path, process_group=None) -> None:
    """Blocking DCP save into `ckpt_dir/model_optim` (collective: every rank calls it)."""
    dcp.save(state, storage_writer=JsonMetadataWriter(ckpt_dir / DCP_DIR), process_group=process_group,
             no_dist=_single_process())


def async_save_model_optim(state: dict[str, Any], ckpt_dir: Path, staging: HostStaging | None,
                           process_group=None) -> tuple[DeviceCopies | None, Future, dict[str, Any] | None]:
    """DCP async save (collective): `staging` copies `state` into its reused host buffers (in flight
    on CUDA), then a background thread writes the copy once it is complete. Returns (copies,
    written, host copy): `state` must not change before `copies.before_update()` (on the device)
    and the next save must wait for `written` (the host buffers are reused; until then the host
    copy can be written again). Without `staging`, DCP copies the state to fresh host memory of its
    own before returning (copies and host copy None)."""
    writer = JsonMetadataWriter(ckpt_dir / DCP_DIR)
    if staging is None:
        return None, dcp.async_save(plain_containers(state), storage_writer=writer, process_group=process_group,
                                    no_dist=_single_process()), None
    host, copies = staging.stage(state)
    response = dcp.async_save(host, storage_writer=writer, process_group=process_group,
                              async_stager=staging.stager(copies), no_dist=_single_process())
    return copies, response.upload_completion, host


def load_model_optim(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    """Load model and optimizer from `ckpt_dir/model_optim`, resharded onto this job's layout."""
    state = model_optim_state(model, optimizer)
    dcp.load(state, storage_reader=JsonMetadataReader(ckpt_dir / DCP_DIR), no_dist=_single_process())
    set_state_dict(model, optimizer, model_state_dict=state[DCP_MODEL_KEY], optim_state_dict=state[DCP_OPTIM_KEY])


def load_model_only(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Initialise the model's weights from a full-training checkpoint (its optimizer is not read)."""
    state = {DCP_MODEL_KEY: get_model_state_dict(model)}
    dcp.load(state, storage_reader=JsonMetadataReader(ckpt_dir / DCP_DIR), no_dist=_single_process())
    set_model_state_dict(model, state[DCP_MODEL_KEY])


def is_full_checkpoint(ckpt_dir: Path) -> bool:
    """True for a full-training checkpoint dir (it holds model_optim/)."""
    return (Path(ckpt_dir) / DCP_DIR).is_dir()
