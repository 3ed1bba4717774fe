"""Offline reading of a full-training checkpoint's DCP directory, without a process group.

A full run's checkpoint holds ``model_optim/``: a ``torch.distributed.checkpoint`` directory whose
state dict is ``{"model": <VLA state dict>, "optim": <optimizer state dict>}``, written as shards
by every rank. Here one process reads the ``"model"`` half back as plain full tensors (DCP
reassembles and reshards the chunks), in groups of keys so that host memory holds only the group
being read; ``"optim"`` is never touched. DCP's ``.metadata`` file is DCP's own format: callers
verify the checkpoint's sha256 manifest before reading it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from steadyvla.checkpoint.dcp_storage import JsonMetadataReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from steadyvla.checkpoint.layout import DCP_DIR, DCP_MODEL_KEY, DCP_OPTIM_KEY

# Top-level keys of the DCP state dict (the contract shared with the trainer that writes it).
MODEL_KEY = DCP_MODEL_KEY
OPTIM_KEY = DCP_OPTIM_KEY
_MODEL_PREFIX = MODEL_KEY + "."


class DCPReadError(RuntimeError):
    """A DCP directory cannot be read as a full-training checkpoint; the message names it and why."""


@dataclass(frozen=True)
class TensorEntry:
    """Shape and dtype of one full (unsharded) tensor in a DCP checkpoint."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def dcp_dir(ckpt_dir: Path) -> Path:
    """The ``model_optim/`` directory of a full-training checkpoint (an error if it has none)."""
    path = Path(ckpt_dir) / DCP_DIR
    if not path.is_dir():
        raise DCPReadError(f"{ckpt_dir}: no {DCP_DIR}/ directory; this is not a full-training checkpoint "
                           "(a LoRA checkpoint is exported with `steadyvla merge`)")
    return path


def model_entries(path: Path) -> dict[str, TensorEntry]:
    """Every tensor under ``"model"`` in the DCP directory ``path``: module name -> shape, dtype.

    Reads only DCP's ``.metadata``. Names are the unwrapped VLA's state-dict keys.
    """
    try:
        metadata = JsonMetadataReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is one message naming the dir
        raise DCPReadError(f"{path}: unreadable DCP metadata ({type(err).__name__}: {err})") from err
    entries: dict[str, TensorEntry] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(_MODEL_PREFIX):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise DCPReadError(f"{path}: entry {key!r} is not a tensor; expected the model's state dict under "
                               f"{MODEL_KEY!r}")
        entries[key[len(_MODEL_PREFIX):]] = TensorEntry(tuple(meta.size), meta.properties.dtype)
    if not entries:
        found = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata})
        raise DCPReadError(f"{path}: no tensors under {MODEL_KEY!r} (top-level keys found: {found}); expected "
                           f"{{{MODEL_KEY!r}: model state dict, {OPTIM_KEY!r}: optimizer state dict}}")
    return entries


def load_model_tensors(path: Path, entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Read the named model tensors (full, on the CPU, in their stored dtype) from the DCP dir.

    Single process, no process group (``no_dist``): DCP assembles each tensor from whatever
    chunks the writing ranks saved.
    """
    tensors = {name: torch.empty(e.shape, dtype=e.dtype) for name, e in entries.items()}
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load({MODEL_KEY: tensors}, storage_reader=JsonMetadataReader(str(path)), no_dist=True)
        except Exception as err:  # noqa: BLE001 - truncated chunk files etc.: name the dir
            raise DCPReadError(f"{path}: reading model tensors failed ({type(err).__name__}: {err})") from err
    return tensors
