"""torch.distributed for the one training loop: torchrun environment, DDP wrapping, collectives.

`steadyvla finetune` under `torchrun --nproc_per_node N` trains data-parallel: every rank holds
the model, takes its share of each global batch from the shared sampler order, and gradients are
averaged by DDP (NCCL on GPUs, gloo on CPU). Rank 0 alone writes logs and checkpoints; the
RNG states of every rank go into rank 0's checkpoint so a resume restores each rank exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


_control: tuple[Any, Any] | None = None  # (the default group it was made for, its gloo control group)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group if N > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistEnv(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=device)


@contextlib.contextmanager
def one_rank_group(env: DistEnv) -> Iterator[None]:
    """A process group of this process alone while the block runs, unless the job already has one:
    FSDP2 and DCP then take the same path on one GPU as on many (an in-memory store: no port)."""
    if env.distributed or dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if env.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shutdown(env: DistEnv) -> None:
    """Destroy the process groups (the control group too: a gloo group still referenced at
    interpreter exit aborts the process from its threads' destructors)."""
    global _control
    _control = None
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wrap_data_parallel(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP around the (PEFT) model for N > 1, else the model itself.

    find_unused_parameters: LoRA also sits on tower parts the VLA never runs (the last ViT block
    and SigLIP's pooling head, kept for checkpoint compatibility with OpenVLA).
    """
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.local_rank] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def mean_across_ranks(values: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """Average scalar metrics (floats or 0-dim tensors) over ranks (keys in sorted order on every
    rank). The result stays a float64 tensor on the communication device: nothing waits for the
    device here; the caller reads it when it logs."""
    if not env.distributed:
        return values
    keys = sorted(values)
    device = _comm_device(env)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    dist.all_reduce(t)
    t = t / env.world_size
    return {k: t[i] for i, k in enumerate(keys)}


def control_group() -> Any:
    """A gloo group over every rank for host-side agreement (a preemption flag, a save's outcome),
    created on first use (every rank reaches that use at the same point of the loop). Under NCCL a
    flag agreed on a GPU tensor and read with `.item()` waits for every kernel queued before it, so
    the host could never run ahead of the device; gloo's collective runs on host memory only."""
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0] is not world:
        _control = (world, dist.new_group(backend="gloo"))
    return _control[1]


def _agree(flag: bool, env: DistEnv, op: Any) -> bool:
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=op, group=control_group())
    return bool(t.item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any rank (e.g. a preemption signal seen by one)."""
    return _agree(flag, env, dist.ReduceOp.MAX)


def all_ranks(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on every rank (e.g. every rank's part of a save finished)."""
    return _agree(flag, env, dist.ReduceOp.MIN)


def gather_to_all(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (JSON-able values, CPU tensors), in rank order. In-memory only."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")
