"""Checkpoints of full training: DCP shards from every rank + rank 0's trainer state, committed
atomically with a manifest by the same CheckpointManager as LoRA checkpoints.

A save: rank 0 opens the temporary dir (`CheckpointManager.begin`) and tells every rank its path;
every rank writes its model/optimizer shards into `model_optim/` (DCP); rank 0 then writes
trainer_state.json / .safetensors (RNG of every rank, data position, scheduler, metrics, hooks) and
commits (manifest, fsync, rename, `latest`, retention). With `async_save` the shards are copied to
host buffers reserved after the first step and reused (pinned on CUDA, checkpoint/dcp_staging.py)
while the next step computes, and written in the background (at most one save in flight, on a
process group of its own so it never interleaves with training's collectives); rank 0 commits when
they are done. The training stream waits for the copies only before the optimizer next changes the
weights (`before_update`, on the device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from steadyvla.checkpoint.async_writer import AsyncCheckpointWriter
from steadyvla.checkpoint.dcp_io import (
    async_save_model_optim, load_model_optim, model_optim_state, save_model_optim,
)
from steadyvla.checkpoint.dcp_staging import HostStaging
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, TRAINER_STATE_JSON, TRAINER_STATE_TENSORS, step_dir_name
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import RunConfig
from steadyvla.distributed import DistEnv, barrier, gather_to_all
from steadyvla.faults import fault_point
from steadyvla.train.checkpointing import TrainState, protected_steps, restore_trainer_record, trainer_record

CHECKPOINT_KIND = "full"  # trainer_state.json `kind` of full-training checkpoints


def full_dir_name(state: TrainState) -> str:
    """`step-XXXXXX-epoch-XX-loss=X.XXXX` of the state's step (loss: the step's mean over ranks)."""
    loss = state.last_metrics.get("train_loss")  # a device tensor (the loop reads metrics lazily)
    return step_dir_name(state.global_step, state.data_position.epoch, None if loss is None else float(loss))


def load_full_checkpoint(state: TrainState, ckpt_dir: Path, *, rank: int = 0,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Restore model, optimizer (resharded by DCP) and the trainer record of this rank (collective)."""
    load_model_optim(state.model, state.optimizer, ckpt_dir)
    meta = json.loads((ckpt_dir / TRAINER_STATE_JSON).read_text())
    tensors = load_file(str(ckpt_dir / TRAINER_STATE_TENSORS))
    restore_trainer_record(state, meta, tensors, rank=rank, ckpt_name=ckpt_dir.name, log=log)
    return meta


class FullCheckpointer:
    """Collective saves of full-training state; the interface the loop uses (save, check, wait)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, log: Callable[[str], None], env: DistEnv,
                 inputs: dict[str, Any] | None = None):
        self.cfg, self.env, self.log, self.inputs = cfg, env, log, inputs
        self.manager = CheckpointManager(run_dir, keep_last_k=cfg.keep_last_k,
                                         save_latest_only=cfg.save_latest_checkpoint_only, log=log)
        # background DCP writes run their collectives on a group of their own (gloo: CPU staging)
        self.group = dist.new_group(backend="gloo") if env.distributed and cfg.async_save else None
        self.committer = AsyncCheckpointWriter(name="steadyvla-full-commit")  # rank 0: wait shards, commit
        self._future = None  # this rank's DCP write in flight
        self._copies = None  # this rank's host copies in flight
        # reserved host copies of this rank's shards; under DDP every rank would hold the whole
        # state (22 GB for vla-1b, per rank) for the one copy DCP writes: DCP's transient copy there
        reserved = cfg.async_save and (cfg.strategy == "fsdp" or not env.distributed)
        self.staging = HostStaging(torch.device(env.device)) if reserved else None
        self._reserved = False
        self.before_commit: Callable[[], None] = lambda: None  # as TrainerCheckpointer.before_commit

    def prepare(self, state: TrainState) -> None:
        """Loop interface, after every step: once the optimizer has state, reserve the host buffers
        of every async save (so that no save, the first included, waits for pinning memory)."""
        if self.staging is not None and not self._reserved:
            self.staging.reserve(model_optim_state(state.model, state.optimizer))
            self._reserved = True

    def before_update(self) -> None:
        """Loop interface: the weights and optimizer state change next; the training stream waits
        (on the device) for the host copies of the save in flight."""
        copies, self._copies = self._copies, None
        if copies is not None:
            copies.before_update()

    def save(self, state: TrainState, *, blocking: bool = False) -> None:
        """Save the state of this optimizer step (every rank calls it)."""
        self.wait()  # never two saves in flight
        name = full_dir_name(state)
        tmp = self.manager.begin(name) if self.env.is_main else None
        tmp = Path(gather_to_all(str(tmp) if tmp else None, self.env)[0])
        record = trainer_record(state, self.cfg, self.env, self.inputs)
        shards = model_optim_state(state.model, state.optimizer)
        step, keep = state.global_step, protected_steps(state)
        if blocking or not self.cfg.async_save:
            save_model_optim(shards, tmp, process_group=self.group)
            if self.env.is_main:
                self.log(f"saved checkpoint {self._commit(record, tmp, step, name, keep)}")
            barrier(self.env)
            return
        self._copies, future = async_save_model_optim(shards, tmp, self.staging, process_group=self.group)
        if self.env.is_main:
            self.committer.submit(lambda: self._commit(record, tmp, step, name, keep, future), label=name)
        else:
            self._future = future

    def _commit(self, record, tmp: Path, step: int, name: str, keep: frozenset[int], future=None) -> Path:
        if future is not None:
            future.result()  # every rank's shards are written once the coordinator's save returns
        tensors, meta = record
        self.before_commit()
        meta["kind"] = CHECKPOINT_KIND
        save_file(tensors, str(tmp / TRAINER_STATE_TENSORS), metadata={"format": "pt"})
        fault_point("mid_save", step)  # tests: shards and tensors written, no JSON, no manifest
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps(meta, indent=1))
        return self.manager.commit(tmp, step, name, keep)

    def check(self) -> None:
        """At a step boundary: collect a finished background save (its error surfaces here)."""
        if self.committer.finished or (self._future is not None and self._future.done()):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed."""
        self.before_update()
        future, self._future = self._future, None
        if future is not None:
            future.result()
        saved = self.committer.wait()
        if saved is not None:
            self.log(f"saved checkpoint {CHECKPOINTS_DIR}/{Path(saved).name}")
