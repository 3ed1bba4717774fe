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

A save that fails on any rank (a shard, or rank 0's commit) is written once more, by every rank at
the same step boundary (the ranks agree on each in-flight save's outcome on a gloo group of their
own); an async save is written again from the same host copies, so the retried checkpoint holds the
step it was taken at. A second failure stops the run with `SaveFailed` on every rank, `latest`
still naming the previous complete checkpoint. Without reserved host copies (async saves under
DDP: DCP's own transient copy) there is nothing to write again: the first failure stops the run.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
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
from steadyvla.distributed import DistEnv, all_ranks, gather_to_all
from steadyvla.faults import fault_point
from steadyvla.train.checkpointing import (
    TrainState, protected_steps, restore_trainer_record, save_failed, trainer_record, write_with_one_retry,
)

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
        # the ranks agree on a save's outcome on `control_group()` (distributed.py), from the training
        # thread, while the background write may be using `group` (one group's collectives must come
        # in one order on every rank)
        self.committer = AsyncCheckpointWriter(name="steadyvla-full-commit")  # rank 0: wait shards, commit
        self._in_flight: _Save | None = None  # the background save until every rank has finished it
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
        name, step, keep = full_dir_name(state), state.global_step, protected_steps(state)
        record = trainer_record(state, self.cfg, self.env, self.inputs)
        shards = model_optim_state(state.model, state.optimizer)
        save = _Save(name, step, keep, record)
        if blocking or not self.cfg.async_save:
            self._write_retrying(save, lambda tmp: save_model_optim(shards, tmp, process_group=self.group))
            return
        tmp = self._begin(name)
        self._copies, save.future, save.host = async_save_model_optim(shards, tmp, self.staging,
                                                                      process_group=self.group)
        if self.env.is_main:
            self.committer.submit(lambda: self._commit(save, tmp, save.future), label=name)
        self._in_flight = save

    def _begin(self, name: str) -> Path:
        """Rank 0 opens the temporary dir of checkpoint `name`; every rank gets its path."""
        tmp = self.manager.begin(name) if self.env.is_main else None
        return Path(gather_to_all(str(tmp) if tmp else None, self.env)[0])

    def _commit(self, save: "_Save", tmp: Path, future: Future | None = None) -> Path:
        if future is not None:
            future.result()  # every rank's shards are written once the coordinator's save returns
        tensors, meta = save.record
        self.before_commit()
        meta["kind"] = CHECKPOINT_KIND
        save_file(tensors, str(tmp / TRAINER_STATE_TENSORS), metadata={"format": "pt"})
        fault_point("mid_save", save.step)  # tests: shards and tensors written, no JSON, no manifest
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps(meta, indent=1))
        return self.manager.commit(tmp, save.step, save.name, save.keep)

    def _write_retrying(self, save: "_Save", write_shards: Callable[[Path], None],
                        error: BaseException | None = None) -> None:
        """Write `save` now (every rank), once more if that fails on any rank; `error`: the first
        attempt already failed (in the background) with it. Raises SaveFailed on every rank after two
        failures."""
        write_with_one_retry(lambda: self._attempt(save, write_shards), f"{CHECKPOINTS_DIR}/{save.name}", save.step,
                             self.manager, self.log, error)

    def _attempt(self, save: "_Save", write_shards: Callable[[Path], None]) -> None:
        """One write of `save` by every rank; raises on every rank if it failed on any."""
        error: BaseException | None = None
        saved = None
        try:
            tmp = self._begin(save.name)
            write_shards(tmp)
            if self.env.is_main:
                saved = self._commit(save, tmp)
        except Exception as err:  # noqa: BLE001 - every failure is agreed on, then raised on every rank
            error = err
        error = self._agreed_error(error)
        if error is not None:
            raise error
        if saved is not None:
            self.log(f"saved checkpoint {CHECKPOINTS_DIR}/{saved.name}")

    def _agreed_error(self, error: BaseException | None) -> BaseException | None:
        """None on every rank if no rank had an error, else this rank's `error` (or a stand-in) on every rank."""
        if all_ranks(error is None, self.env):
            return None
        return error or RuntimeError("the save failed on another rank")

    def check(self) -> None:
        """At a step boundary: collect the background save once every rank's part of it finished
        (decided together, so that a retry starts on every rank at the same step)."""
        save = self._in_flight
        if save is None:
            return
        done = self.committer.finished if self.env.is_main else save.future.done()
        if all_ranks(done, self.env):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed on every rank; a failure
        on any rank is retried once from the same host copies, then raises SaveFailed."""
        self.before_update()
        save, self._in_flight = self._in_flight, None
        if save is None:
            return
        error: BaseException | None = None
        saved = None
        try:
            if self.env.is_main:
                saved = self.committer.wait()  # its commit waited for the shards' future first
            else:
                save.future.result()
        except Exception as err:  # noqa: BLE001
            error = err
        error = self._agreed_error(error)
        if error is None:
            if saved is not None:
                self.log(f"saved checkpoint {CHECKPOINTS_DIR}/{Path(saved).name}")
            return
        if save.host is None:  # DCP's own transient copy (DDP): the step's state is gone
            raise save_failed(f"{CHECKPOINTS_DIR}/{save.name}", error, save.step, self.manager,
                              "failed (not retried: async saves under DDP keep no host copy to write again)") from error
        self._write_retrying(save, lambda tmp: save_model_optim(save.host, tmp, process_group=self.group), error)


@dataclass
class _Save:
    """One save of one step, kept until every rank knows it is committed (a retry writes it again)."""

    name: str
    step: int
    keep: frozenset[int]
    record: tuple[dict[str, torch.Tensor], dict[str, Any]]
    future: Future | None = None  # this rank's background DCP write
    host: dict[str, Any] | None = None  # this rank's host copy of the shards (None: DCP's own copy)
