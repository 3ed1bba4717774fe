"""Model + optimizer of full training through torch.distributed.checkpoint (DCP).

Every rank writes its own shards into `<checkpoint>/model_optim/` (`.metadata.json` + `*.distcp`:
the metadata is JSON, never pickle, through dcp_storage.py's writer and reader); the
state dict is `{"model": ..., "optim": ...}` from `get_state_dict`, so model keys are the plain
VLA's `state_dict()` keys whatever the sharding, and a checkpoint written by W ranks loads on W'
(DCP reshards). The trainer state JSON / safetensors and the manifest around it are written by
rank 0 (train/full_checkpointing.py) through the same CheckpointManager as LoRA checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from steadyvla.checkpoint.dcp_storage import JsonMetadataReader, JsonMetadataWriter
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


def reusable_stager(device: torch.device) -> DefaultStager:
    """The stager of one run's async saves. It keeps its host copies between saves (pinned on CUDA, so
    every save after the first reuses them instead of allocating the whole state again) and copies on
    a background thread (on CUDA: non-blocking, on a stream of its own), while the next step's
    forward and backward run; the loop waits for it only before the optimizer changes the weights."""
    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=cuda))


def async_save_model_optim(state: dict[str, Any], ckpt_dir: Path, stager: DefaultStager,
                           process_group=None) -> tuple[Future, Future]:
    """DCP async save (collective): `stager` copies `state` to host memory in the background, then a
    background thread writes it. Returns (staged, written): `state`'s tensors must not change before
    `staged` is done (the next save must wait for `written`: the host copies are reused). On CUDA the
    caller synchronises the training stream first: the stager's stream does not wait for it."""
    response = dcp.async_save(plain_containers(state), storage_writer=JsonMetadataWriter(ckpt_dir / DCP_DIR),
                              process_group=process_group, async_stager=stager, no_dist=_single_process())
    return response.staging_completion, response.upload_completion


def plain_containers(state: Any) -> Any:
    """`state` with every mapping a dict and every sequence a list or tuple, tensors detached (same
    storage). The stager deep-copies whatever else it meets through `__reduce_ex__`, and some torch
    versions then fail on the second save (KeyError: <class 'type'>, their dispatch table cleared by
    the first); optimizer state dicts hold OrderedDicts."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, Mapping):
        return {key: plain_containers(value) for key, value in state.items()}
    if isinstance(state, list):
        return [plain_containers(value) for value in state]
    if isinstance(state, tuple):
        return tuple(plain_containers(value) for value in state)
    return state


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
