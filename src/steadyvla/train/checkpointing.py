"""Glue between the live training objects and the checkpoint package.

A save snapshots everything to CPU at an optimizer-step boundary (the only blocking part), then
writes adapter, optimizer/RNG tensors and JSON state into an atomic, manifest-verified checkpoint
on a background thread. Loading puts every piece back so the next step is the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from steadyvla.checkpoint.async_writer import AsyncCheckpointWriter
from steadyvla.checkpoint.flat_staging import FlatStaging
from steadyvla.checkpoint.layout import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS_DIR, LATEST_FILE, TRAINER_STATE_JSON, TRAINER_STATE_TENSORS,
    step_dir_name,
)
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.checkpoint.state import (
    DeviceCopies, cpu_copy, optimizer_state, restore_optimizer, restore_rng, select_prefix, snapshot_rng,
    snapshot_tensors, wait_for_copies,
)
from steadyvla.config import RunConfig
from steadyvla.data.sampler import DataPosition
from steadyvla.distributed import DistEnv, gather_to_all
from steadyvla.faults import fault_point
from steadyvla.hooks import TrainHook
from steadyvla.train.run_inputs import INPUTS_KEY
from steadyvla.versions import library_versions

STATE_FORMAT_VERSION = 1
# Every hook's state, keyed by its name: trainer_state.json["method"][name] and tensors
# "method.<name>.*" (the key predates hooks other than the method; kept for old checkpoints).
METHOD_PREFIX = "method"
REWINDS_KEY = "rewinds"  # trainer_state.json: the explicit rewinds (name@step) this history went through


@dataclass
class TrainState:
    """Everything that changes while training and must survive a restart."""

    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_position: DataPosition
    global_step: int = 0
    metrics_state: dict[str, Any] = field(default_factory=dict)
    hooks: list[TrainHook] = field(default_factory=list)
    rewinds: list[str] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)  # the last step's (not saved; names full ckpts)


@dataclass
class Snapshot:
    """CPU copies taken synchronously; writing them needs no live object."""

    step: int
    adapter: dict[str, torch.Tensor]
    adapter_config: Any
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    keep_steps: frozenset[int] = frozenset()  # checkpoints retention must keep (hooks' protected_steps)
    copies: DeviceCopies | None = None  # None: the copies were synchronous (or wait for the whole device)


def protected_steps(state: TrainState) -> frozenset[int]:
    """Steps whose checkpoints retention must keep: every hook's `protected_steps` (e.g. the best eval)."""
    return frozenset(step for hook in state.hooks for step in hook.protected_steps())


def take_snapshot(state: TrainState, cfg: RunConfig, env: DistEnv = DistEnv(),
                  inputs: dict[str, Any] | None = None,
                  adapter_view: dict[str, torch.Tensor] | None = None,
                  staging: FlatStaging | None = None) -> Snapshot | None:
    """Copy all state to CPU (blocking part of a save). Collective: every rank calls it; rank 0
    gets the snapshot (with every rank's RNG), the others None. `inputs` (dataset fingerprint,
    ICSM hash; see run_inputs) is stored so a resume can check them. `adapter_view`: the adapter
    state dict as live views of the parameters (`adapter_views`), to skip walking the model.
    `staging`: buffers reserved for the adapter + optimizer tensors (`snapshot_staging`); used
    when they still match, else each tensor is copied on its own."""
    record = trainer_record(state, cfg, env, inputs)
    if record is None:
        return None
    tensors, meta = record
    live, meta["optimizer"] = _live_state(state, adapter_view)
    copies = DeviceCopies(_param_device(state.model))
    with copies:  # adapter and optimizer state: on the side stream, overlapping the next step
        if staging is not None and staging.matches(live):
            host = staging.copy(live)
        else:
            host = {name: {key: cpu_copy(v, f"{name}.{key}") for key, v in part.items()} for name, part in live.items()}
    copies.mark_current_stream()  # hook state was copied on the training stream: hooks may change it next step
    tensors.update(host[_OPTIMIZER])
    adapter_config = copy.deepcopy(state.model.peft_config["default"])
    return Snapshot(state.global_step, host[_ADAPTER], adapter_config, tensors, meta, protected_steps(state), copies)


_ADAPTER, _OPTIMIZER = "adapter", "optimizer"  # the sections a save copies from the device


def _live_state(state: TrainState, adapter_view: dict[str, torch.Tensor] | None
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The live tensors a save copies, by section (adapter keyed as PEFT saves it, optimizer keyed
    `optim.*`), and the optimizer's JSON part."""
    peft_state = adapter_view if adapter_view is not None else _adapter_state(state.model)
    optim_tensors, optim_meta = optimizer_state(state.optimizer)
    return {_ADAPTER: peft_state, _OPTIMIZER: optim_tensors}, optim_meta


def trainer_record(state: TrainState, cfg: RunConfig, env: DistEnv = DistEnv(),
                   inputs: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The trainer state every checkpoint kind holds besides model and optimizer: (RNG of every rank
    + hook tensors, JSON record of step, epoch, scheduler, data position, metrics, hooks, world size,
    config, inputs). Collective (the RNG gather); rank 0 gets it, the others None."""
    all_rng = gather_to_all(snapshot_rng(env.rank), env)
    if not env.is_main:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for rng_tensors, _ in all_rng:
        tensors.update(rng_tensors)
    method_meta: dict[str, Any] = {}
    for hook in state.hooks:
        hook_tensors, hook_meta = hook.state_dict()
        tensors.update(snapshot_tensors(f"{METHOD_PREFIX}.{hook.name}", hook_tensors))
        method_meta[hook.name] = hook_meta
    meta = {
        "format_version": STATE_FORMAT_VERSION,
        "global_step": state.global_step,
        "epoch": state.data_position.epoch,
        "micro_step": 0,  # saves happen only at optimizer-step boundaries
        "data_position": state.data_position.to_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": {f"rank{r}": rng_meta for r, (_, rng_meta) in enumerate(all_rng)},
        "metrics": state.metrics_state,
        METHOD_PREFIX: method_meta,
        "world_size": env.world_size,
        REWINDS_KEY: list(state.rewinds),
        "config_digest": cfg.digest(),
        "config": cfg.to_dict(),
        "versions": library_versions(),
    }
    if inputs is not None:
        meta[INPUTS_KEY] = inputs
    return tensors, meta


def _adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def adapter_views(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """The adapter state dict if every tensor in it is a view of a live parameter (so it stays
    current as the optimizer updates in place, and a save need not walk the 7B model's full state
    dict again); None otherwise."""
    state = _adapter_state(model)
    params = {p.data_ptr() for p in model.parameters()}
    return state if all(t.data_ptr() in params for t in state.values()) else None


def snapshot_staging(state: TrainState, adapter_view: dict[str, torch.Tensor] | None = None) -> FlatStaging:
    """Reserve every save's buffers up front (once the optimizer has state): pinned host memory
    and, on CUDA, the flat device buffers the copies are gathered in, so that no save, the first
    included, allocates while training waits."""
    library_versions()  # cached after the first call
    return FlatStaging(_live_state(state, adapter_view)[0])


def _param_device(model: torch.nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return param.device if param is not None else None


def write_snapshot(snapshot: Snapshot, ckpt_dir: Path) -> None:
    """Write a snapshot's files into `ckpt_dir` (PEFT adapter layout + trainer state)."""
    if snapshot.copies is not None:
        snapshot.copies.wait()
    else:
        wait_for_copies()
    snapshot.adapter_config.inference_mode = True
    snapshot.adapter_config.save_pretrained(str(ckpt_dir))
    save_file(snapshot.adapter, str(ckpt_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    fault_point("mid_save", snapshot.step)
    save_file(snapshot.tensors, str(ckpt_dir / TRAINER_STATE_TENSORS), metadata={"format": "pt"})
    (ckpt_dir / TRAINER_STATE_JSON).write_text(json.dumps(snapshot.meta, indent=1))
    if not (ckpt_dir / ADAPTER_CONFIG).exists():
        raise RuntimeError(f"PEFT did not write {ADAPTER_CONFIG} into {ckpt_dir}")


def load_into(state: TrainState, ckpt_dir: Path, *, rank: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler, RNG, data position and hook state from `ckpt_dir`.

    A rank the checkpoint has no RNG for (the job grew) keeps the RNG it was seeded with.
    Returns the stored JSON state (metrics state etc.)."""
    meta = json.loads((ckpt_dir / TRAINER_STATE_JSON).read_text())
    adapter = load_file(str(ckpt_dir / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(state.model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{ckpt_dir / ADAPTER_WEIGHTS}: keys the model does not have: {result.unexpected_keys[:5]}")
    tensors = load_file(str(ckpt_dir / TRAINER_STATE_TENSORS))
    restore_optimizer(state.optimizer, tensors, meta["optimizer"])
    restore_trainer_record(state, meta, tensors, rank=rank, ckpt_name=ckpt_dir.name, log=log)
    return meta


def restore_trainer_record(state: TrainState, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                           rank: int, ckpt_name: str, log: Callable[[str], None] = print) -> None:
    """Inverse of `trainer_record` for this rank: scheduler, RNG, hooks, step, data position, metrics.

    A rank the checkpoint has no RNG for (the job grew) keeps the RNG it was seeded with."""
    state.scheduler.load_state_dict(meta["scheduler"])
    if f"rank{rank}" in meta["rng"]:
        restore_rng(rank, tensors, meta["rng"][f"rank{rank}"])
    else:
        log(f"rank {rank}: checkpoint {ckpt_name} was written by {meta['world_size']} rank(s) and has no RNG "
            "state for this rank; it keeps its seeded RNG (the data order is unaffected)")
    for hook in state.hooks:
        hook.load_state_dict(select_prefix(tensors, f"{METHOD_PREFIX}.{hook.name}"),
                             meta.get(METHOD_PREFIX, {}).get(hook.name, {}))
    state.global_step = int(meta["global_step"])
    state.data_position = DataPosition.from_dict(meta["data_position"])
    state.metrics_state = meta.get("metrics", {})
    state.rewinds = list(meta.get(REWINDS_KEY, []))


def _nothing() -> None:
    pass


T = TypeVar("T")


class SaveFailed(RuntimeError):
    """A checkpoint could not be written, also on the retry; the message names it and the cause."""


def save_failed(name: str, err: BaseException, step: int, manager: CheckpointManager,
                failed: str = "failed twice") -> SaveFailed:
    """The error that stops a run whose save of checkpoint `name` `failed` (the last time with `err`)."""
    latest = manager.read_latest()
    return SaveFailed(
        f"saving checkpoint {name} {failed}: {save_error_cause(err)}. Training stopped at step {step}; "
        f"{CHECKPOINTS_DIR}/{LATEST_FILE} still names {latest or 'no checkpoint'}. Fix the cause (e.g. free "
        f"disk space in {manager.root}) and run the same command again to continue from there")


class TrainerCheckpointer:
    """Saves TrainState checkpoints, one at a time, optionally in the background.

    A failed save (disk full, ...) is retried once from the same in-memory snapshot: at once for a
    blocking save, at the next optimizer-step boundary (`check`) for a background one. A second
    failure stops the run with `SaveFailed`; `latest` still names the previous complete checkpoint.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, log: Callable[[str], None], env: DistEnv = DistEnv(),
                 inputs: dict[str, Any] | None = None):
        self.cfg = cfg
        self.env = env
        self.inputs = inputs
        self.manager = CheckpointManager(
            run_dir, keep_last_k=cfg.keep_last_k, save_latest_only=cfg.save_latest_checkpoint_only, log=log
        )
        self.writer = AsyncCheckpointWriter()
        self.log = log
        self._pending: Snapshot | None = None  # submitted to the writer, not yet known to be written
        self._copies: DeviceCopies | None = None  # of the last snapshot, until the next update waited for them
        self._staging: FlatStaging | None = None  # set by `prepare`
        self._adapter_view: dict[str, torch.Tensor] | None = None  # set by `prepare`
        # run before a checkpoint is committed, on the thread that commits it: the loop sets it to
        # make metrics.jsonl durable first (an fsync kept off the training thread)
        self.before_commit: Callable[[], None] = _nothing

    def prepare(self, state: TrainState) -> None:
        """Once the optimizer has state (after the first update): allocate every save's pinned host
        buffers now, so that no save blocks on it. Cheap after the first call."""
        if self._staging is not None or not self.env.is_main:
            return
        self._adapter_view = adapter_views(state.model)
        self._staging = snapshot_staging(state, self._adapter_view)

    def before_update(self) -> None:
        """Before the optimizer changes parameters and moments: the training stream waits (on the
        device) for the last snapshot's copies of them."""
        copies, self._copies = self._copies, None
        if copies is not None:
            copies.before_update()

    def save(self, state: TrainState, *, blocking: bool = False) -> None:
        """Snapshot now; write now (blocking) or on the background thread. Every rank calls it
        (the RNG gather is collective); only rank 0 writes."""
        self.wait()  # never two saves in flight; the snapshot reuses host buffers
        snapshot = take_snapshot(state, self.cfg, self.env, self.inputs, self._adapter_view, self._staging)
        if snapshot is None:
            return
        self._copies = snapshot.copies
        if blocking or not self.cfg.async_save:
            self.log(f"saved checkpoint {self._write_retrying(snapshot)}")
        else:
            self._pending = snapshot
            self.writer.submit(lambda: self._write(snapshot), label=step_dir_name(snapshot.step))

    def check(self) -> None:
        """At a step boundary: collect a finished background save; retry it once if it failed."""
        if self.writer.finished:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, retrying it once if it failed."""
        snapshot, self._pending = self._pending, None
        try:
            self.writer.wait()
        except Exception as err:  # noqa: BLE001 - any failure of the write is retried, then reported
            if snapshot is None:
                raise
            self._write_retrying(snapshot, err)

    def _write(self, snapshot: Snapshot) -> Path:
        self.before_commit()
        return self.manager.save(snapshot.step, lambda d: write_snapshot(snapshot, d), keep_steps=snapshot.keep_steps)

    def _write_retrying(self, snapshot: Snapshot, error: Exception | None = None) -> Path:
        return write_with_one_retry(lambda: self._write(snapshot), f"{CHECKPOINTS_DIR}/{step_dir_name(snapshot.step)}",
                                    snapshot.step, self.manager, self.log, error)


def write_with_one_retry(write: Callable[[], T], name: str, step: int, manager: CheckpointManager,
                         log: Callable[[str], None], error: BaseException | None = None) -> T:
    """`write()` the save of checkpoint `name`; if it raises (or already failed with `error`), say so
    and write once more; a second failure raises SaveFailed (see `save_failed`)."""
    if error is None:
        try:
            return write()
        except Exception as err:  # noqa: BLE001 - any failure of the write is retried, then reported
            error = err
    log(f"saving checkpoint {name} failed ({save_error_cause(error)}); retrying once")
    try:
        return write()
    except Exception as err:  # noqa: BLE001
        raise save_failed(name, err, step, manager) from err


def save_error_cause(err: BaseException) -> str:
    """`Type: message` of a save's error, for the one-line messages."""
    return f"{type(err).__name__}: {err}"
