"""Host copies of a full-training state dict for DCP async saves, in buffers reserved once.

DCP's own stager allocates (and, on some torch versions, pins) the whole state in host memory at
every save: for vla-1b on one rank that is 22 GB, about 6 s of the next step on an H100. Here every
tensor (each rank's local shard, for DTensors) is copied into a host buffer reserved at the start
of the run and reused by every save (pinned on CUDA; the same buffers as LoRA snapshots use,
`checkpoint/state.py`). The copies run on a side stream that waits for the training stream, so
they see the step's update and overlap the next step's forward and backward; the training stream
waits for them (on the device, not the host) only before its next update. DCP's writer thread
waits for them before it reads the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from steadyvla.checkpoint.state import DeviceCopies, cpu_copy, pinned_buffer

KEY_PREFIX = "full"  # host-buffer keys: `full.model.<fqn>`, `full.optim.state.<fqn>.exp_avg`, ...


def plain_containers(state: Any) -> Any:
    """`state` with every mapping a dict and every sequence a list or tuple, tensors detached (same
    storage): what DCP gets to plan and write (optimizer state dicts hold OrderedDicts)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, Mapping):
        return {key: plain_containers(value) for key, value in state.items()}
    if isinstance(state, list):
        return [plain_containers(value) for value in state]
    if isinstance(state, tuple):
        return tuple(plain_containers(value) for value in state)
    return state


def _map_tensors(state: Any, fn, path: tuple[str, ...] = (KEY_PREFIX,)) -> Any:
    if isinstance(state, torch.Tensor):
        return fn(state, ".".join(path))
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn, (*path, str(k))) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map_tensors(v, fn, (*path, str(i))) for i, v in enumerate(state))
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _host_copy(t: torch.Tensor, key: str) -> torch.Tensor:
    local = cpu_copy(_local(t), key)
    if isinstance(t, DTensor):
        # the same sharding spec around the host copy (DTensor.from_local would move it back to the
        # mesh's device); DCP plans the shard's place in the global tensor from the spec
        return DTensor(local, t._spec, requires_grad=False)
    return local


class HostStaging:
    """Copies state dicts into host buffers reserved once (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyvla-dcp-staging")

    def reserve(self, state: dict[str, Any]) -> None:
        """Allocate the host buffers of every later save now (pinning gigabytes takes seconds)."""
        _map_tensors(plain_containers(state), lambda t, key: pinned_buffer(key, _local(t)))

    def stage(self, state: dict[str, Any]) -> tuple[dict[str, Any], DeviceCopies]:
        """(host copy of `state`, its copies in flight). Read the copy only after `copies.wait()`;
        the next `stage` overwrites it (one save at a time)."""
        copies = DeviceCopies(self.device)
        with copies:
            host = _map_tensors(plain_containers(state), _host_copy)
        return host, copies

    def stager(self, copies: DeviceCopies) -> AsyncStager:
        """The AsyncStager to hand dcp.async_save with a `stage`d state dict."""
        return _Prestaged(copies, self._waiter)


class _Prestaged(AsyncStager):
    """Gives DCP the state dict as it is (already a host copy), once its copies are complete."""

    _synchronize_after_execute = False

    def __init__(self, copies: DeviceCopies, waiter: ThreadPoolExecutor):
        self.copies, self.waiter = copies, waiter

    def stage(self, state_dict: dict[str, Any]) -> Future:
        def complete() -> dict[str, Any]:
            self.copies.wait()
            return state_dict

        return self.waiter.submit(complete)

    def close(self) -> None:
        pass
